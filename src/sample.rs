//! Drawing latents with the frozen UNet: a deterministic DDIM sampler (eta 0) with
//! classifier-free guidance, as users check what a learned word draws.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::model::SdModel;

/// DDIM timesteps with diffusers' "leading" spacing and `steps_offset` 1 (SD 1.x's
/// scheduler config): `t_i = i * (T / steps) + 1`, from the last to the first.
pub fn ddim_timesteps(train_steps: usize, steps: usize) -> Vec<usize> {
    let ratio = train_steps / steps.max(1);
    (0..steps.max(1))
        .rev()
        .map(|i| (i * ratio + 1).min(train_steps - 1))
        .collect()
}

/// Runs `steps` DDIM steps from `noise` (`[B, 4, h, w]`) under `cond` (and `uncond`
/// with guidance `scale` when given); returns unscaled latents for the VAE decoder.
pub fn ddim_sample(
    model: &SdModel,
    noise: &Tensor,
    cond: &Tensor,
    uncond: Option<(&Tensor, f64)>,
    steps: usize,
) -> Result<Tensor> {
    if steps == 0 || steps > 1000 {
        return Err(Error::config(
            "steps",
            format!("{steps} is outside 1..=1000"),
        ));
    }
    let schedule = model.config.scheduler.noise_schedule()?;
    let ac = schedule.alphas_cumprod();
    let train_steps = ac.len();
    let ratio = train_steps / steps;
    let velocity = model.config.scheduler.prediction_type == "v_prediction";
    let b = noise.dim(0)?;
    let mut x = noise.to_dtype(model.dtype())?;
    for t in ddim_timesteps(train_steps, steps) {
        let ts = vec![t as f64; b];
        let out = match uncond {
            Some((u, scale)) => {
                let both = model.unet.forward(
                    &Tensor::cat(&[&x, &x], 0)?,
                    &[ts.clone(), ts.clone()].concat(),
                    &Tensor::cat(&[u, cond], 0)?,
                )?;
                let (eu, ec) = (both.narrow(0, 0, b)?, both.narrow(0, b, b)?);
                (&eu + ((ec - &eu)? * scale)?)?
            }
            None => model.unet.forward(&x, &ts, cond)?,
        };
        let a_t = ac[t] as f64;
        let a_prev = if t >= ratio {
            ac[t - ratio] as f64
        } else {
            1.0
        };
        let (x0, eps) = if velocity {
            let x0 = ((&x * a_t.sqrt())? - (&out * (1.0 - a_t).sqrt())?)?;
            let eps = ((&out * a_t.sqrt())? + (&x * (1.0 - a_t).sqrt())?)?;
            (x0, eps)
        } else {
            let x0 = ((&x - (&out * (1.0 - a_t).sqrt())?)? / a_t.sqrt())?;
            (x0, out)
        };
        x = ((x0 * a_prev.sqrt())? + (eps * (1.0 - a_prev).sqrt())?)?;
    }
    Ok((x / model.config.vae.scaling_factor)?.to_dtype(DType::F32)?)
}
