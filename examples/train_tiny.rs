//! Trains a word on the tiny SD 1.x test model with synthetic pictures, on the CPU, in
//! about a minute: the engine end to end (latent caching, the step, AdamW, checkpoint).
//!
//! `cargo run --example train_tiny [-- STEPS]`

use std::path::PathBuf;
use std::sync::Arc;

use sdti::model::{LoadOptions, SdModel};
use sdti::train::data::{ImageSource, PixelFormat};
use sdti::train::{Init, TrainConfig, Trainer};

/// A 96x80 picture of a red disc on a blue-green background, shifted by `k`.
fn picture(k: usize) -> ImageSource {
    let (w, h) = (96usize, 80usize);
    let mut data = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            let (dx, dy) = (x as f32 - 40.0 - 4.0 * k as f32, y as f32 - 40.0);
            let disc = dx * dx + dy * dy < 400.0;
            let p = (y * w + x) * 3;
            data[p..p + 3].copy_from_slice(if disc {
                &[210, 50, 40]
            } else {
                &[20, 120, 140]
            });
        }
    }
    ImageSource::Pixels {
        data,
        width: w as u32,
        height: h as u32,
        stride: w * 3,
        format: PixelFormat::Rgb8,
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let steps: u64 = match std::env::args().nth(1) {
        Some(s) => s
            .parse()
            .map_err(|_| format!("STEPS must be a number, got '{s}'"))?,
        None => 200,
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model_path = root.join("tests/fixtures/tiny-sd");
    let model = Arc::new(SdModel::load(&model_path, &LoadOptions::default())?);
    let config = TrainConfig {
        token: "red-disc".into(),
        init: Init::Text("ball".into()),
        vectors: 2,
        resolution: 64,
        max_steps: steps,
        batch_size: 2,
        seed: 42,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(model, config)?;
    for k in 0..4 {
        trainer.add_image(picture(k), Some("a red disc".into()))?;
    }
    println!(
        "model: {} (tiny SD 1.x, random weights)",
        model_path.display()
    );
    println!(
        "training '{}' with {} vectors for {steps} steps",
        trainer.config().token,
        trainer.config().vectors
    );
    let mut window = Vec::new();
    trainer.train(steps, |s| {
        window.push(s.loss);
        if s.step % 20 == 0 || s.step == steps {
            let mean = window.iter().sum::<f32>() / window.len() as f32;
            println!(
                "step {:>5}  loss {mean:.5}  lr {:.2e}  {:.0} ms/step",
                s.step,
                s.learning_rate,
                s.seconds * 1000.0
            );
            window.clear();
        }
        true
    })?;
    let out = root.join("target/demo");
    std::fs::create_dir_all(&out)?;
    let ckpt = out.join("red-disc.checkpoint.safetensors");
    trainer.save_checkpoint(&ckpt)?;
    let v = trainer.vectors()?;
    let dim = v.len() / trainer.config().vectors;
    for (i, row) in v.chunks(dim).enumerate() {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        println!("vector {i}: norm {norm:.4}");
    }
    println!(
        "checkpoint (vectors, AdamW moments, RNG state): {}",
        ckpt.display()
    );
    Ok(())
}
