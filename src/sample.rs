//! Drawing latents with the frozen UNet: a deterministic DDIM sampler (eta 0) with
//! classifier-free guidance, as users check what a learned word draws. The DDIM math
//! (timesteps, alphas, the step) is the model's scheduler's:
//! [`crate::model::scheduler::DdimSchedule`].

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::model::scheduler::DdimSchedule;
use crate::model::SdModel;

/// Runs `steps` DDIM steps from `noise` (`[B, 4, h, w]`) under `cond` (and `uncond`
/// with guidance `scale` when given); returns unscaled latents for the VAE decoder.
pub fn ddim_sample(
    model: &SdModel,
    noise: &Tensor,
    cond: &Tensor,
    uncond: Option<(&Tensor, f64)>,
    steps: usize,
) -> Result<Tensor> {
    let scheduler = &model.config.scheduler;
    let max = scheduler.num_train_timesteps;
    if steps == 0 || steps > max {
        return Err(Error::config(
            "steps",
            format!("{steps} is outside 1..={max}"),
        ));
    }
    let ddim = DdimSchedule::new(scheduler, steps)?;
    let b = noise.dim(0)?;
    let mut x = noise.to_dtype(model.dtype())?;
    for step in ddim.steps() {
        let ts = vec![step.timestep as f64; b];
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
        x = ddim.step(step, &x, &out)?;
    }
    Ok((x / model.config.vae.scaling_factor)?.to_dtype(DType::F32)?)
}
