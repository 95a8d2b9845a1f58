//! What the training tests set up: pictures, options, trainers with data, resumed runs,
//! exported words.

use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;
use sdti::embedding::{read_embedding, EmbeddingFile, Existing, Format, Precision};
use sdti::model::{LatentDist, SdModel};
use sdti::train::data::{ImageSource, PixelFormat};
use sdti::train::{Init, Templates, TrainConfig, Trainer};

use super::test_device;

/// A `width x height` RGB picture: a disc (radius about 17 px) centred at `centre` on a
/// background whose red varies with `k` and whose blue is `blue(x)`.
pub fn disc_picture(
    k: usize,
    (width, height): (usize, usize),
    centre: (f32, f32),
    blue: impl Fn(usize) -> u8,
) -> ImageSource {
    let mut data = vec![0u8; width * height * 3];
    for y in 0..height {
        for x in 0..width {
            let dx = x as f32 - centre.0;
            let dy = y as f32 - centre.1;
            let inside = dx * dx + dy * dy < 300.0;
            let p = (y * width + x) * 3;
            data[p] = if inside { 220 } else { 30 + (k * 20) as u8 };
            data[p + 1] = if inside { 60 } else { 90 };
            data[p + 2] = if inside { 40 } else { blue(x) };
        }
    }
    ImageSource::Pixels {
        data,
        width: width as u32,
        height: height as u32,
        stride: width * 3,
        format: PixelFormat::Rgb8,
    }
}

/// The short runs' options: the word `sks` of 2 vectors from "toy", 64 px, batch 2,
/// object templates, `steps` steps from `seed`.
pub fn train_config(steps: u64, seed: u64) -> TrainConfig {
    TrainConfig {
        token: "sks".into(),
        init: Init::Text("toy".into()),
        vectors: 2,
        resolution: Some(64),
        max_steps: steps,
        batch_size: 2,
        seed,
        templates: Templates::Object,
        ..TrainConfig::default()
    }
}

/// A trainer of `cfg` on `model` with `images` added.
pub fn trainer_with_images(
    model: &Arc<SdModel>,
    cfg: TrainConfig,
    images: impl IntoIterator<Item = ImageSource>,
) -> Trainer {
    let mut t = Trainer::new(model.clone(), cfg).unwrap();
    for image in images {
        t.add_image(image, None).unwrap();
    }
    t
}

/// A latent distribution whose samples are `mean` (a log-variance of -30).
pub fn sharp_latents(mean: Tensor) -> LatentDist {
    LatentDist {
        logvar: (mean.zeros_like().unwrap() - 30.0).unwrap(),
        mean,
    }
}

/// Sharp latents of one random 64 px picture (`[1, 4, 8, 8]`), as a host might give.
pub fn random_latents() -> LatentDist {
    sharp_latents(Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &test_device()).unwrap())
}

/// Trains `steps` steps: as many losses as steps, each finite.
pub fn train_finite(trainer: &mut Trainer, steps: u64) -> Vec<f32> {
    let losses: Vec<f32> = trainer
        .train(steps, |_| true)
        .unwrap()
        .iter()
        .map(|s| s.loss)
        .collect();
    assert_eq!(losses.len() as u64, steps, "{losses:?}");
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    losses
}

/// A run of `total` steps straight through, and one interrupted after `split` steps,
/// checkpointed to `ckpt` and resumed by a fresh trainer to the end: (straight, resumed),
/// both made by `make`.
pub fn straight_and_resumed(
    make: impl Fn() -> Trainer,
    total: u64,
    split: u64,
    ckpt: &Path,
) -> (Trainer, Trainer) {
    let mut straight = make();
    straight.train(total, |_| true).unwrap();
    let mut first = make();
    first.train(split, |_| true).unwrap();
    first.save_checkpoint(ckpt).unwrap();
    drop(first);
    let mut resumed = make();
    resumed.load_checkpoint(ckpt).unwrap();
    assert_eq!(resumed.step_count(), split);
    resumed.train(total - split, |_| true).unwrap();
    (straight, resumed)
}

/// The trainer's word exported to `path` in `format` (f32, refusing an existing file),
/// read back.
pub fn export_and_read(trainer: &Trainer, path: &Path, format: Format) -> EmbeddingFile {
    trainer
        .export(path, format, Precision::F32, Existing::Refuse)
        .unwrap();
    read_embedding(path).unwrap()
}
