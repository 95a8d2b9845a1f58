//! The textual-inversion objective: the denoising loss of the frozen UNet, conditioned on
//! prompts that carry the learned vectors.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::model::scheduler::{Coefs, NoiseSchedule, SchedulerError};
use crate::model::unet::AddedCond;
use crate::model::{Injection, Recompute, SdModel};

/// One batch of the denoising objective.
pub struct DenoisingBatch<'a> {
    /// Scaled latents `[B, 4, h, w]` (`latent * scaling_factor`).
    pub latents: &'a Tensor,
    /// Gaussian noise like `latents`.
    pub noise: &'a Tensor,
    /// Training timesteps, one per sample.
    pub timesteps: &'a [usize],
    /// Token ids `[B, T]` (u32), T a multiple of 77.
    pub ids: &'a Tensor,
    /// The learned vectors of each text encoder, in conditioning order (SD 1.x/2.x: one
    /// entry; SDXL: L then G), `None` for an encoder without; empty: none for any.
    pub injections: &'a [Option<&'a Injection<'a>>],
    /// SDXL's size and crop conditioning `[B, 6]` (`(orig_h, orig_w, crop_top, crop_left,
    /// target_h, target_w)` per sample, f32, in pixels): required by a UNet with the added
    /// embedding, refused by others.
    pub time_ids: Option<&'a Tensor>,
    pub clip_skip: usize,
}

/// Mean squared error between the UNet's prediction and its target, in f32: the latents
/// noised with `schedule`'s `add_noise` coefficients, the target its prediction type's.
pub fn denoising_loss(
    model: &SdModel,
    batch: &DenoisingBatch<'_>,
    schedule: &NoiseSchedule,
) -> Result<Tensor> {
    denoising_loss_with(model, batch, schedule, Recompute::Off)
}

/// [`denoising_loss`] with the UNet's blocks keeping their activations for the backward
/// pass or recomputing them there: the same loss and gradients, bit for bit, for less
/// memory and more time. (An argument rather than a [`DenoisingBatch`] field, so that the
/// batches of evaluations and tests, which never train a whole run, stay as they are.)
pub fn denoising_loss_with(
    model: &SdModel,
    batch: &DenoisingBatch<'_>,
    schedule: &NoiseSchedule,
    recompute: Recompute,
) -> Result<Tensor> {
    let b = batch.latents.dim(0)?;
    if batch.timesteps.len() != b {
        return Err(Error::input(
            "training batch",
            format!("{b} latents with {} timesteps", batch.timesteps.len()),
        ));
    }
    type CoefsAt = fn(&NoiseSchedule, usize) -> std::result::Result<Coefs, SchedulerError>;
    let coefs = |f: CoefsAt| -> Result<Vec<Coefs>> {
        batch
            .timesteps
            .iter()
            .map(|&t| f(schedule, t).map_err(|e| Error::input("training batch", e.to_string())))
            .collect()
    };
    let dtype = model.dtype();
    let latents = batch.latents.to_dtype(dtype)?;
    let noise = batch.noise.to_dtype(dtype)?;
    let noisy = combine(&latents, &noise, &coefs(NoiseSchedule::add_noise_coefs)?)?;
    let encoders = model.text_encoders().len();
    let none = vec![None; encoders];
    let injections = if batch.injections.is_empty() {
        &none[..]
    } else {
        batch.injections
    };
    let (context, pooled) = text_conditioning(model, batch.ids, injections, batch.clip_skip)?;
    let added = added_conditioning(model, b, pooled, batch.time_ids)?;
    let t: Vec<f64> = batch.timesteps.iter().map(|&t| t as f64).collect();
    let pred = model
        .unet
        .forward_with(&noisy, &t, &context, added.as_ref(), recompute)?;
    let target = combine(&latents, &noise, &coefs(NoiseSchedule::target_coefs)?)?;
    // The loss in f32 at least (f64 models keep f64, for gradient checks).
    let loss_dtype = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let diff = (pred.to_dtype(loss_dtype)? - target.to_dtype(loss_dtype)?)?;
    Ok(diff.sqr()?.mean_all()?)
}

/// SDXL's added conditioning of a batch of `b`: the pooled vector the text encoders gave
/// (on the learned vectors' gradient path) and the batch's time ids, for a UNet with the
/// added embedding; `None` for one without. A missing or extra part is an error that says
/// which.
fn added_conditioning(
    model: &SdModel,
    b: usize,
    pooled: Option<Tensor>,
    time_ids: Option<&Tensor>,
) -> Result<Option<AddedCond>> {
    let name = model.config.family.model_name();
    if !model.unet.takes_added_cond() {
        return match time_ids {
            Some(_) => Err(Error::input(
                "training batch",
                format!(
                    "time ids were given for a {name} model, whose UNet has no added embedding (only SDXL's takes them)"
                ),
            )),
            None => Ok(None),
        };
    }
    let time_ids = time_ids.ok_or_else(|| {
        Error::input(
            "training batch",
            format!(
                "this {name} model's UNet (addition_embed_type \"text_time\") needs the time ids [{b}, 6] (original size, crop, target size per sample), and none were given"
            ),
        )
    })?;
    if time_ids.dims() != [b, 6] {
        return Err(Error::input(
            "training batch",
            format!(
                "time ids of shape {:?} for {b} samples: expected [{b}, 6]",
                time_ids.dims()
            ),
        ));
    }
    let pooled = pooled.ok_or_else(|| {
        Error::input(
            "training batch",
            format!(
                "this {name} model's UNet takes a pooled text vector, and none of its text encoders gives one (SDXL's second encoder, with its text_projection, does)"
            ),
        )
    })?;
    Ok(Some(AddedCond {
        pooled,
        time_ids: time_ids.to_dtype(DType::F32)?,
    }))
}

/// The UNet's text conditioning for token ids `[B, T]`: the model's text encoders (SDXL:
/// L then G), each with its learned vectors (`injections`, one entry per encoder), as
/// [`crate::model::text_encoder::encode_context`] joins them: the context `[B, T, width]`
/// (SDXL `[L ‖ G]`) and the pooled vector `[B, p]` where the model has one (SDXL's G,
/// first chunk).
pub fn text_conditioning(
    model: &SdModel,
    ids: &Tensor,
    injections: &[Option<&Injection<'_>>],
    clip_skip: usize,
) -> Result<(Tensor, Option<Tensor>)> {
    let encoders = model.text_encoders();
    if injections.len() != encoders.len() {
        return Err(Error::input(
            "training batch",
            format!(
                "{} learned-vector tables for a {} model's {} text encoders: give one per encoder",
                injections.len(),
                model.config.family.model_name(),
                encoders.len()
            ),
        ));
    }
    let parts: Vec<_> = encoders
        .into_iter()
        .zip(injections.iter().copied())
        .collect();
    crate::model::text_encoder::encode_context(&parts, ids, Some(clip_skip))
}

/// `sample_coef * latents + noise_coef * noise` per sample, the coefficients in f32 (as
/// diffusers computes them) cast to the latents' dtype. A term whose coefficients are all
/// 0 is left out and one whose coefficients are all 1 taken as it is, so the epsilon
/// target is the noise itself.
fn combine(latents: &Tensor, noise: &Tensor, coefs: &[Coefs]) -> Result<Tensor> {
    let column = |f: fn(&Coefs) -> f32| -> Result<Option<Tensor>> {
        let v: Vec<f32> = coefs.iter().map(f).collect();
        if v.iter().all(|&c| c == 1.0) {
            return Ok(None);
        }
        let column = Tensor::from_vec(v, (coefs.len(), 1, 1, 1), latents.device())?;
        Ok(Some(column.to_dtype(latents.dtype())?))
    };
    let term = |x: &Tensor, f: fn(&Coefs) -> f32| -> Result<Option<Tensor>> {
        if coefs.iter().all(|c| f(c) == 0.0) {
            return Ok(None);
        }
        Ok(Some(match column(f)? {
            Some(c) => x.broadcast_mul(&c)?,
            None => x.clone(),
        }))
    };
    let sample = term(latents, |c| c.sample_coef)?;
    let noise = term(noise, |c| c.noise_coef)?;
    Ok(match (sample, noise) {
        (Some(s), Some(n)) => (s + n)?,
        (Some(x), None) | (None, Some(x)) => x,
        (None, None) => latents.zeros_like()?,
    })
}
