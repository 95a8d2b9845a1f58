//! What a learned word draws: prompts (with learned words) to RGB images through the DDIM
//! sampler, classifier-free guidance and the VAE decoder, and a labelled grid of images.
//! SDXL's UNet also takes the pooled text vector and the time ids `(H, W, 0, 0, H, W)`;
//! its unconditional branch for an empty negative prompt is zeros unless asked otherwise
//! ([`EmptyNegative`]).

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use crate::app::plot::{draw_text, text_height, text_width};
use crate::error::{Error, Result};
use crate::model::scheduler::{PredictionType, SchedulerConfig};
use crate::model::unet::AddedCond;
use crate::model::{ModelConfig, SdModel};
use crate::prompt::encoder::PromptEncoder;
use crate::rng::Rng;
use crate::sample::{ddim_sample_with, inference_time_ids, Conditioning};
use crate::tokenizer::CONTEXT_LEN;

/// The unconditional branch of an SDXL model when the negative prompt is empty. The
/// tools differ: diffusers' SDXL pipelines without a negative prompt
/// (`force_zeros_for_empty_prompt`, true in SDXL base's `model_index.json`; an explicit ""
/// is encoded there) and A1111 with an empty one (`sd_models_xl.py`,
/// `force_zero_negative_prompt`) give zeros for the context and the pooled vector;
/// ComfyUI encodes "". SD 1.x and 2.x have no such rule: every tool encodes "", and so
/// does sdti whatever this says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmptyNegative {
    /// Zeros for the context and the pooled vector (diffusers, A1111).
    #[default]
    Zeros,
    /// The encoded empty prompt "" (ComfyUI).
    Encode,
}

/// How to draw one image.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleOptions {
    pub prompt: String,
    /// The negative prompt (empty: the unconditional prompt "", or zeros for SDXL as
    /// [`EmptyNegative`] says).
    pub negative: String,
    /// What an empty negative prompt gives an SDXL model.
    pub empty_negative: EmptyNegative,
    /// Overrides the model's prediction type (as training's `prediction_type` does).
    pub prediction_type: Option<PredictionType>,
    /// Overrides the model's zero-terminal-SNR schedule (`rescale_betas_zero_snr`), as
    /// training's `zero_terminal_snr` does: a word trained with it on is drawn with it on.
    pub zero_terminal_snr: Option<bool>,
    /// DDIM steps (1..=1000).
    pub steps: usize,
    /// Classifier-free guidance scale; 1 or below runs the conditional branch alone.
    pub guidance: f64,
    /// Seed of the initial noise.
    pub seed: u64,
    /// Image size in pixels, multiples of 8.
    pub width: usize,
    pub height: usize,
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative: String::new(),
            empty_negative: EmptyNegative::Zeros,
            prediction_type: None,
            zero_terminal_snr: None,
            steps: 30,
            guidance: 7.5,
            seed: 0,
            width: 512,
            height: 512,
        }
    }
}

/// The names [`SampleOptions::validate_named`] gives its fields in errors.
#[derive(Clone, Copy, Debug)]
pub struct SampleFieldNames {
    pub width: &'static str,
    pub height: &'static str,
    pub steps: &'static str,
    pub guidance: &'static str,
}

impl SampleOptions {
    /// The scheduler these options sample `model` with: the model's, with its prediction
    /// type and its zero-terminal-SNR rescaling overridden where these options say, as
    /// training overrides them ([`SchedulerConfig::with_overrides`], which
    /// [`crate::train::TrainConfig::scheduler_for`] uses too); the timestep spacing stays
    /// the model's, as a single file's `ztsnr` marker leaves it.
    pub fn scheduler_for(&self, model: &ModelConfig) -> SchedulerConfig {
        model
            .scheduler
            .with_overrides(self.prediction_type, self.zero_terminal_snr)
    }

    /// Checks every value, naming the field as `sdti sample` does.
    pub fn validate(&self) -> Result<()> {
        self.validate_named(SampleFieldNames {
            width: "width",
            height: "height",
            steps: "steps",
            guidance: "guidance",
        })
    }

    /// Checks every value, naming the fields as given (a run folder's previews name them
    /// `preview_steps`, `preview_cfg`, ...).
    pub fn validate_named(&self, names: SampleFieldNames) -> Result<()> {
        for (field, v) in [(names.width, self.width), (names.height, self.height)] {
            if v < 8 || v % 8 != 0 || v > 4096 {
                return Err(Error::config(
                    field,
                    format!("{v} must be a multiple of 8 between 8 and 4096"),
                ));
            }
        }
        if self.steps == 0 || self.steps > 1000 {
            return Err(Error::config(
                names.steps,
                format!("{} is outside 1..=1000", self.steps),
            ));
        }
        if !self.guidance.is_finite() || self.guidance < 0.0 {
            return Err(Error::config(
                names.guidance,
                format!("{} must be a number >= 0", self.guidance),
            ));
        }
        Ok(())
    }
}

/// The initial latent noise for `seed`: `[1, 4, h/8, w/8]` standard normal values from
/// sdti's own generator, so a seed draws the same picture on every machine.
pub fn seeded_noise(seed: u64, width: usize, height: usize, device: &Device) -> Result<Tensor> {
    let shape = (1, 4, height / 8, width / 8);
    let mut data = vec![0f32; 4 * (height / 8) * (width / 8)];
    Rng::new(seed).fill_normal(&mut data);
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?.to_device(device)?)
}

/// Pads the shorter of two conditionings (`[chunks * 77, dim]`) with `empty` chunks, as
/// A1111 does when prompt and negative prompt have different lengths.
fn pad_chunks(a: Tensor, b: Tensor, empty: &Tensor) -> Result<(Tensor, Tensor)> {
    let (na, nb) = (a.dim(0)?, b.dim(0)?);
    let pad = |t: Tensor, n: usize| -> Result<Tensor> {
        let mut parts = vec![t];
        for _ in 0..n / CONTEXT_LEN {
            parts.push(empty.clone());
        }
        Ok(Tensor::cat(&parts, 0)?)
    };
    Ok(match na.cmp(&nb) {
        std::cmp::Ordering::Less => (pad(a, nb - na)?, b),
        std::cmp::Ordering::Greater => {
            let b = pad(b, na - nb)?;
            (a, b)
        }
        std::cmp::Ordering::Equal => (a, b),
    })
}

/// Images in `[-1, 1]` `[B, 3, H, W]` to 8-bit RGB.
pub fn to_rgb8(images: &Tensor) -> Result<Vec<RgbImage>> {
    let (b, c, h, w) = images.dims4()?;
    if c != 3 {
        return Err(Error::input(
            "decoded image",
            format!("has {c} channels, not 3"),
        ));
    }
    let pixels = ((images.to_dtype(DType::F32)?.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?
        .round()?
        .permute((0, 2, 3, 1))?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let per = h * w * 3;
    (0..b)
        .map(|i| {
            let data: Vec<u8> = pixels[i * per..(i + 1) * per]
                .iter()
                .map(|v| *v as u8)
                .collect();
            RgbImage::from_raw(w as u32, h as u32, data)
                .ok_or_else(|| Error::input("decoded image", "has the wrong size"))
        })
        .collect()
}

/// Decodes unscaled latents with the model's VAE into 8-bit RGB images.
pub fn decode_rgb8(model: &SdModel, latents: &Tensor) -> Result<Vec<RgbImage>> {
    let dtype = model.dtype();
    to_rgb8(&model.vae()?.decode(&latents.to_dtype(dtype)?)?)
}

/// Image sides must be multiples of this: 8 pixels per latent cell (the UNet takes any
/// latent size, rounding odd sides as diffusers does).
pub const SIZE_MULTIPLE: usize = 8;

/// Checks that image sides are whole latent cells, naming the field.
pub fn check_size(fields: [(&'static str, usize); 2]) -> Result<()> {
    let m = SIZE_MULTIPLE;
    for (field, v) in fields {
        if v % m != 0 {
            return Err(Error::config(
                field,
                format!("{v} must be a multiple of {m} (the VAE's 8 pixels per latent cell)"),
            ));
        }
    }
    Ok(())
}

/// The UNet's conditional batch for `opts` and, with guidance above 1, its
/// unconditional one: the prompt and negative prompt through `encoder`, padded to the same
/// number of 77-token chunks (A1111's way); for SDXL, the pooled vectors and the time ids
/// `(H, W, 0, 0, H, W)`, and zeros for an empty negative prompt unless `opts` says
/// [`EmptyNegative::Encode`]. In the model's dtype, batch 1.
pub fn sample_conditioning(
    model: &SdModel,
    encoder: &PromptEncoder,
    opts: &SampleOptions,
) -> Result<(Conditioning, Option<Conditioning>)> {
    if encoder.family() != model.config.family {
        return Err(Error::input(
            "sampler",
            format!(
                "the prompt encoder is for an {} model and the model is {}",
                encoder.family().model_name(),
                model.config.family.model_name()
            ),
        ));
    }
    let dtype = model.dtype();
    let device = model.device();
    let batch = |context: Tensor, pooled: Option<Tensor>| -> Result<Conditioning> {
        let added = match pooled {
            Some(p) => Some(AddedCond {
                pooled: p.unsqueeze(0)?.to_dtype(dtype)?.to_device(device)?,
                time_ids: inference_time_ids(opts.height, opts.width, 1, device)?,
            }),
            None => None,
        };
        Ok(Conditioning {
            context: context.unsqueeze(0)?.to_dtype(dtype)?.to_device(device)?,
            added,
        })
    };
    let (cond, cond_pooled) = encoder.encode_with_pooled(&opts.prompt)?;
    if opts.guidance <= 1.0 {
        return Ok((batch(cond, cond_pooled)?, None));
    }
    let zeros = opts.negative.is_empty()
        && cond_pooled.is_some()
        && opts.empty_negative == EmptyNegative::Zeros;
    let (cond, uncond, uncond_pooled) = if zeros {
        // diffusers' `torch.zeros_like(prompt_embeds)`: as many chunks as the prompt.
        let pooled = match &cond_pooled {
            Some(p) => Some(p.zeros_like()?),
            None => None,
        };
        let uncond = cond.zeros_like()?;
        (cond, uncond, pooled)
    } else {
        let (uncond, uncond_pooled) = encoder.encode_with_pooled(&opts.negative)?;
        let empty = if opts.negative.is_empty() {
            uncond.clone()
        } else {
            encoder.encode("")?
        };
        let (cond, uncond) = pad_chunks(cond, uncond, &empty)?;
        (cond, uncond, uncond_pooled)
    };
    Ok((
        batch(cond, cond_pooled)?,
        Some(batch(uncond, uncond_pooled)?),
    ))
}

/// The scheduler `opts` samples `model` with ([`SampleOptions::scheduler_for`]).
pub fn sample_scheduler(model: &SdModel, opts: &SampleOptions) -> SchedulerConfig {
    opts.scheduler_for(&model.config)
}

/// Draws one image with `model`'s UNet and VAE: the prompt and negative prompt through
/// `encoder` (learned words registered there; it must be on `model`'s text encoders),
/// DDIM from seeded noise with classifier-free guidance, VAE decode.
pub fn sample_image(
    model: &SdModel,
    encoder: &PromptEncoder,
    opts: &SampleOptions,
) -> Result<RgbImage> {
    opts.validate()?;
    check_size([("width", opts.width), ("height", opts.height)])?;
    let (cond, uncond) = sample_conditioning(model, encoder, opts)?;
    let noise = seeded_noise(opts.seed, opts.width, opts.height, model.device())?;
    let scheduler = sample_scheduler(model, opts);
    let latents = ddim_sample_with(
        model,
        &scheduler,
        &noise,
        &cond,
        uncond.as_ref().map(|u| (u, opts.guidance)),
        opts.steps,
    )?;
    decode_rgb8(model, &latents)?
        .into_iter()
        .next()
        .ok_or_else(|| Error::input("sampler", "drew no image"))
}

/// Images side by side, `columns` per row, each with its label above it (e.g. the step).
pub fn grid(tiles: &[(String, &RgbImage)], columns: usize) -> RgbImage {
    let columns = columns.clamp(1, tiles.len().max(1));
    let rows = tiles.len().div_ceil(columns).max(1);
    let tw = tiles.iter().map(|(_, i)| i.width()).max().unwrap_or(64);
    let th = tiles.iter().map(|(_, i)| i.height()).max().unwrap_or(64);
    let scale = if tw >= 256 { 2 } else { 1 };
    let label_h = text_height(scale) + 6;
    let gap = 4;
    let cell_w = tw + gap;
    let cell_h = th + label_h + gap;
    let mut out = RgbImage::from_pixel(
        columns as u32 * cell_w + gap,
        rows as u32 * cell_h + gap,
        image::Rgb([255, 255, 255]),
    );
    for (k, (label, img)) in tiles.iter().enumerate() {
        let (cx, cy) = (
            (k % columns) as u32 * cell_w + gap,
            (k / columns) as u32 * cell_h + gap,
        );
        let lw = text_width(label, scale).min(tw);
        draw_text(
            &mut out,
            i64::from(cx + (tw - lw) / 2),
            i64::from(cy + 2),
            label,
            scale,
            [40, 40, 40],
        );
        image::imageops::replace(&mut out, *img, i64::from(cx), i64::from(cy + label_h));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rgb8_conversion_maps_the_range_and_layout() -> Result<()> {
        // One 1x2 image: left pixel black, right pixel white (and clamped beyond).
        let t = Tensor::from_vec(
            vec![-1f32, 3.0, -1.0, 1.0, -1.0, 0.0],
            (1, 3, 1, 2),
            &Device::Cpu,
        )?;
        let img = to_rgb8(&t)?;
        assert_eq!(img[0].get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(img[0].get_pixel(1, 0).0, [255, 255, 128]);
        Ok(())
    }

    /// A preview draws a word with the schedule it was trained with: for every model
    /// family, both of the model's prediction types and zero-SNR settings, and every
    /// combination of the two overrides, the sampler's scheduler is training's.
    #[test]
    fn preview_and_training_schedulers_agree_for_every_override() {
        use crate::train::TrainConfig;
        let mut models = Vec::new();
        for base in [
            ModelConfig::sd1(),
            ModelConfig::sd2_base(),
            ModelConfig::sd2(),
            ModelConfig::sdxl(),
        ] {
            for zsnr in [false, true] {
                let mut m = base.clone();
                m.scheduler.rescale_betas_zero_snr = zsnr;
                models.push(m);
            }
        }
        let predictions = [
            None,
            Some(PredictionType::Epsilon),
            Some(PredictionType::VPrediction),
        ];
        for model in &models {
            for prediction_type in predictions {
                for zero_terminal_snr in [None, Some(false), Some(true)] {
                    let sample = SampleOptions {
                        prediction_type,
                        zero_terminal_snr,
                        ..SampleOptions::default()
                    };
                    let train = TrainConfig {
                        prediction_type,
                        zero_terminal_snr,
                        ..TrainConfig::default()
                    };
                    let drawn = sample.scheduler_for(model);
                    assert_eq!(
                        drawn,
                        train.scheduler_for(model),
                        "{:?} {prediction_type:?} {zero_terminal_snr:?}",
                        model.family
                    );
                    // And the overrides took: what was asked, else the model's.
                    assert_eq!(
                        drawn.prediction_type,
                        prediction_type.unwrap_or(model.scheduler.prediction_type)
                    );
                    assert_eq!(
                        drawn.rescale_betas_zero_snr,
                        zero_terminal_snr.unwrap_or(model.scheduler.rescale_betas_zero_snr)
                    );
                }
            }
        }
    }

    #[test]
    fn grid_places_tiles_under_labels() {
        let red = RgbImage::from_pixel(16, 16, image::Rgb([255, 0, 0]));
        let tiles: Vec<(String, &RgbImage)> = (0..5).map(|i| (format!("{i}"), &red)).collect();
        let g = grid(&tiles, 3);
        let reds = g.pixels().filter(|p| p.0 == [255, 0, 0]).count();
        assert_eq!(reds, 5 * 16 * 16);
        assert_eq!(g.width(), 3 * 20 + 4);
    }
}
