//! The textual-inversion objective: the denoising loss of the frozen UNet, conditioned on
//! prompts that carry the learned vectors.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::model::{Injection, SdModel};

/// What the UNet is trained to predict (the model's `prediction_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Prediction {
    /// The added noise (SD 1.x).
    Epsilon,
    /// `sqrt(ac) * noise - sqrt(1 - ac) * latents` (v-prediction fine-tunes).
    Velocity,
}

impl Prediction {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "epsilon" => Ok(Prediction::Epsilon),
            "v_prediction" => Ok(Prediction::Velocity),
            other => Err(Error::config(
                "prediction_type",
                format!("'{other}' is not supported (epsilon or v_prediction)"),
            )),
        }
    }
}

/// One batch of the denoising objective.
pub struct DenoisingBatch<'a> {
    /// Scaled latents `[B, 4, h, w]` (`latent * scaling_factor`).
    pub latents: &'a Tensor,
    /// Gaussian noise like `latents`.
    pub noise: &'a Tensor,
    /// Training timesteps, one per sample.
    pub timesteps: &'a [usize],
    /// `alphas_cumprod[t]` for each sample, as the schedule computes them.
    pub alphas_cumprod: &'a [f32],
    /// Token ids `[B, T]` (u32), T a multiple of 77.
    pub ids: &'a Tensor,
    pub injection: Option<&'a Injection<'a>>,
    pub clip_skip: usize,
}

/// Mean squared error between the UNet's prediction and its target, in f32.
pub fn denoising_loss(
    model: &SdModel,
    batch: &DenoisingBatch<'_>,
    prediction: Prediction,
) -> Result<Tensor> {
    let b = batch.latents.dim(0)?;
    if batch.timesteps.len() != b || batch.alphas_cumprod.len() != b {
        return Err(Error::input(
            "training batch",
            format!(
                "{b} latents with {} timesteps and {} schedule values",
                batch.timesteps.len(),
                batch.alphas_cumprod.len()
            ),
        ));
    }
    let dtype = model.dtype();
    let device = batch.latents.device();
    let column = |f: &dyn Fn(f32) -> f32| -> Result<Tensor> {
        let v: Vec<f32> = batch.alphas_cumprod.iter().map(|&a| f(a)).collect();
        Ok(Tensor::from_vec(v, (b, 1, 1, 1), device)?.to_dtype(dtype)?)
    };
    // diffusers' add_noise: sqrt(ac) and sqrt(1 - ac) in f32, then the compute dtype.
    let sqrt_ac = column(&|a| a.sqrt())?;
    let sqrt_one_minus = column(&|a| (1.0 - a).sqrt())?;
    let latents = batch.latents.to_dtype(dtype)?;
    let noise = batch.noise.to_dtype(dtype)?;
    let noisy = (latents.broadcast_mul(&sqrt_ac)? + noise.broadcast_mul(&sqrt_one_minus)?)?;
    let context = model
        .text_encoder
        .encode(batch.ids, batch.injection, batch.clip_skip)?;
    let t: Vec<f64> = batch.timesteps.iter().map(|&t| t as f64).collect();
    let pred = model.unet.forward(&noisy, &t, &context)?;
    let target = match prediction {
        Prediction::Epsilon => noise,
        Prediction::Velocity => {
            (noise.broadcast_mul(&sqrt_ac)? - latents.broadcast_mul(&sqrt_one_minus)?)?
        }
    };
    // The loss in f32 at least (f64 models keep f64, for gradient checks).
    let loss_dtype = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let diff = (pred.to_dtype(loss_dtype)? - target.to_dtype(loss_dtype)?)?;
    Ok(diff.sqr()?.mean_all()?)
}
