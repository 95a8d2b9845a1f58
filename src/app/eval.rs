//! A fixed yardstick for a learned word: the denoising loss on a set of images at noise
//! and timesteps drawn once from a seed. The per-step training loss swings with the random
//! timestep; this number compares the initial word with the trained one, or two steps.

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::model::clip::split_columns;
use crate::model::{Injection, SdModel};
use crate::prompt::chunks::ChunkStyle;
use crate::prompt::{encode_prompts, Word};
use crate::rng::Rng;
use crate::tokenizer::ClipTokenizer;
use crate::train::data::{prepare_views, CropMode, TrainImage};
use crate::train::loss::{denoising_loss, DenoisingBatch};

/// Images as scaled latent means (`[1, 4, r/8, r/8]` each, center crop, not mirrored).
pub fn image_latents(
    model: &SdModel,
    images: &[TrainImage],
    resolution: usize,
) -> Result<Vec<Tensor>> {
    let res = u32::try_from(resolution).map_err(|_| Error::config("resolution", "is too large"))?;
    let mut out = Vec::with_capacity(images.len());
    let vae = model.vae()?;
    for image in images {
        let views = prepare_views(image, res, CropMode::Center, &mut Rng::new(0))
            .map_err(|e| Error::input("image", e.to_string()))?;
        let view = views
            .first()
            .ok_or_else(|| Error::input("image", "no view could be prepared"))?;
        let pixels = Tensor::from_slice(&view.chw, (1, 3, resolution, resolution), &Device::Cpu)?
            .to_dtype(model.dtype())?
            .to_device(model.device())?;
        out.push(model.scale_latents(&vae.encode(&pixels)?.mean)?);
    }
    Ok(out)
}

/// The mean denoising loss of `vectors` (`[n, dim]`) as `word` in `prompt` over `latents`,
/// `samples` noise/timestep pairs per latent drawn from `seed` (the same on every call).
/// `dim` is the sum of the text encoders' widths, SDXL's rows `[clip_l ‖ clip_g]` (as
/// [`crate::train::Trainer::vectors_tensor`] holds them); SDXL's time ids are
/// `(H, W, 0, 0, H, W)` for a latent of `H/8 x W/8` (uncropped, at its own size).
pub fn fixed_noise_loss(
    model: &SdModel,
    latents: &[Tensor],
    word: &str,
    vectors: &Tensor,
    prompt: &str,
    samples: usize,
    seed: u64,
) -> Result<f32> {
    let tokenizer = ClipTokenizer::new()?;
    let words = [Word {
        name: word.to_string(),
        vectors: vectors.dim(0)?,
        offset: 0,
    }];
    let enc = encode_prompts(
        &tokenizer,
        &[prompt.to_string()],
        &words,
        ChunkStyle::A1111,
        model.device(),
    )?;
    let table = vectors.to_device(model.device())?;
    let widths: Vec<usize> = model
        .text_encoders()
        .iter()
        .map(|e| e.config().hidden_size)
        .collect();
    if table.dim(1)? != widths.iter().sum::<usize>() {
        return Err(Error::input(
            "evaluation",
            format!(
                "vectors {:?} for a model whose text encoders are {widths:?} wide",
                table.dims()
            ),
        ));
    }
    let tables = split_columns(&table, &widths)?;
    let injections = Injection::per_table(&tables, &enc.index, &enc.mask);
    let injections: Vec<Option<&Injection<'_>>> = injections.iter().map(Some).collect();
    let schedule = model.config.scheduler.noise_schedule()?;
    let mut rng = Rng::new(seed);
    let (mut total, mut count) = (0f64, 0usize);
    for latent in latents {
        for _ in 0..samples {
            let t = schedule.random_timestep(&mut rng);
            let mut noise = vec![0f32; latent.elem_count()];
            rng.fill_normal(&mut noise);
            let noise = Tensor::from_vec(noise, latent.dims(), &Device::Cpu)?
                .to_dtype(latent.dtype())?
                .to_device(latent.device())?;
            let time_ids = if model.unet.takes_added_cond() {
                let (h, w) = ((latent.dim(2)? * 8) as f32, (latent.dim(3)? * 8) as f32);
                Some(Tensor::new(&[[h, w, 0.0, 0.0, h, w]], model.device())?)
            } else {
                None
            };
            let batch = DenoisingBatch {
                latents: latent,
                noise: &noise,
                timesteps: &[t],
                ids: &enc.ids,
                injections: &injections,
                time_ids: time_ids.as_ref(),
                clip_skip: model.text_encoder.default_conditioning().clip_skip,
            };
            let loss = denoising_loss(model, &batch, &schedule)?;
            total += f64::from(loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?);
            count += 1;
        }
    }
    if count == 0 {
        return Err(Error::input("evaluation", "no images or samples"));
    }
    Ok((total / count as f64) as f32)
}
