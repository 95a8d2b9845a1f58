//! Drawing latents with the frozen UNet: a deterministic DDIM sampler (eta 0) with
//! classifier-free guidance, as users check what a learned word draws. The DDIM math
//! (timesteps, alphas, the step) is the scheduler's:
//! [`crate::model::scheduler::DdimSchedule`]; SDXL's UNet also takes the pooled text
//! vector and the size/crop time ids ([`AddedCond`]).

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::scheduler::{DdimSchedule, SchedulerConfig};
use crate::model::unet::AddedCond;
use crate::model::{Recompute, SdModel};

/// What the UNet is conditioned on for a batch of `B` images: the text context
/// `[B, T, D]` and, for SDXL, the pooled vector and the time ids.
#[derive(Clone, Debug)]
pub struct Conditioning {
    pub context: Tensor,
    pub added: Option<AddedCond>,
}

impl Conditioning {
    /// Both batches stacked, `self` first (classifier-free guidance runs them as one).
    fn cat(&self, other: &Self) -> Result<Self> {
        let added = match (&self.added, &other.added) {
            (Some(a), Some(b)) => Some(AddedCond {
                pooled: Tensor::cat(&[&a.pooled, &b.pooled], 0)?,
                time_ids: Tensor::cat(&[&a.time_ids, &b.time_ids], 0)?,
            }),
            (None, None) => None,
            _ => {
                return Err(Error::input(
                    "sampler",
                    "the conditional and unconditional batches disagree on the pooled vector and time ids",
                ))
            }
        };
        Ok(Self {
            context: Tensor::cat(&[&self.context, &other.context], 0)?,
            added,
        })
    }
}

/// SDXL's time ids when drawing a `height x width` image, for `batch` images: `(H, W, 0,
/// 0, H, W)` (original size, crop top-left, target size; height first), as diffusers'
/// `StableDiffusionXLPipeline` passes them by default (`original_size = target_size =
/// (height, width)`, `crops_coords_top_left = (0, 0)`) and A1111's
/// `sd_models_xl.get_learned_conditioning` does. `[batch, 6]` f32.
pub fn inference_time_ids(
    height: usize,
    width: usize,
    batch: usize,
    device: &Device,
) -> Result<Tensor> {
    let (h, w) = (height as f32, width as f32);
    let row = [h, w, 0.0, 0.0, h, w];
    let data: Vec<f32> = (0..batch).flat_map(|_| row).collect();
    Ok(Tensor::from_vec(data, (batch, 6), device)?)
}

/// Runs `steps` DDIM steps of the model's scheduler from `noise` (`[B, 4, h, w]`) under
/// the context `cond` (and `uncond` with guidance `scale` when given), for a UNet without
/// added inputs (SD 1.x, SD 2.x; SDXL's needs [`ddim_sample_with`]); returns unscaled
/// latents for the VAE decoder.
pub fn ddim_sample(
    model: &SdModel,
    noise: &Tensor,
    cond: &Tensor,
    uncond: Option<(&Tensor, f64)>,
    steps: usize,
) -> Result<Tensor> {
    let plain = |context: &Tensor| Conditioning {
        context: context.clone(),
        added: None,
    };
    let uncond = uncond.map(|(u, scale)| (plain(u), scale));
    ddim_sample_with(
        model,
        &model.config.scheduler,
        noise,
        &plain(cond),
        uncond.as_ref().map(|(u, scale)| (u, *scale)),
        steps,
    )
}

/// Runs `steps` DDIM steps of `scheduler` from `noise` (`[B, 4, h, w]`) under `cond`
/// (and `uncond` with guidance `scale` when given); returns unscaled latents for the VAE
/// decoder. `scheduler` is the model's, or the model's with an overridden prediction type.
pub fn ddim_sample_with(
    model: &SdModel,
    scheduler: &SchedulerConfig,
    noise: &Tensor,
    cond: &Conditioning,
    uncond: Option<(&Conditioning, f64)>,
    steps: usize,
) -> Result<Tensor> {
    let max = scheduler.num_train_timesteps;
    if steps == 0 || steps > max {
        return Err(Error::config(
            "steps",
            format!("{steps} is outside 1..={max}"),
        ));
    }
    let ddim = DdimSchedule::new(scheduler, steps)?;
    let awake = crate::model::awake::awake(noise.device())?;
    awake.run(|| denoise(model, noise, &ddim, cond, uncond))
}

/// [`ddim_sample_with`]'s loop over the schedule's steps.
fn denoise(
    model: &SdModel,
    noise: &Tensor,
    ddim: &DdimSchedule,
    cond: &Conditioning,
    uncond: Option<(&Conditioning, f64)>,
) -> Result<Tensor> {
    let b = noise.dim(0)?;
    let guided = match uncond {
        Some((u, scale)) => Some((u.cat(cond)?, scale)),
        None => None,
    };
    let mut x = noise.to_dtype(model.dtype())?;
    for step in ddim.steps() {
        let ts = vec![step.timestep as f64; b];
        let out = match &guided {
            Some((both, scale)) => {
                let out = model.unet.forward_with(
                    &Tensor::cat(&[&x, &x], 0)?,
                    &[ts.clone(), ts].concat(),
                    &both.context,
                    both.added.as_ref(),
                    Recompute::Off,
                )?;
                let (eu, ec) = (out.narrow(0, 0, b)?, out.narrow(0, b, b)?);
                (&eu + ((ec - &eu)? * *scale)?)?
            }
            None => model.unet.forward_with(
                &x,
                &ts,
                &cond.context,
                cond.added.as_ref(),
                Recompute::Off,
            )?,
        };
        x = ddim.step(step, &x, &out)?;
    }
    Ok((x / model.config.vae.scaling_factor)?.to_dtype(DType::F32)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_ids_are_height_width_zero_zero_height_width() -> Result<()> {
        let ids = inference_time_ids(768, 1344, 2, &Device::Cpu)?;
        assert_eq!(
            ids.to_vec2::<f32>()?,
            vec![vec![768.0, 1344.0, 0.0, 0.0, 768.0, 1344.0]; 2]
        );
        Ok(())
    }
}
