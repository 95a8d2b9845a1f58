//! `sdti bench`: training steps per second on a random model of the SD 1.x architecture
//! (tiny or real size) or on a given model.
//!
//! benches/train_step.rs (`cargo bench`) is the fuller benchmark, with diffusers' step
//! beside sdti's; once its reusable core moves into the library this command should call
//! it instead of repeating the timing loop here.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::{Args, ValueEnum};
use sdti::model::config::ModelConfig;
use sdti::model::random::{random_model, tiny_sd1_config};
use sdti::train::data::{ImageSource, PixelFormat};
use sdti::train::{Init, TrainConfig, Trainer};
use serde::Serialize;

use super::common::{
    human_duration, load_model, peak_rss_mib, print_json, CliError, CliResult, DeviceArgs,
};

pub const EXAMPLES: &str = "\
Examples:
  sdti bench                                   # random SD 1.5-size model, 512 px, CPU
  sdti bench --config tiny --resolution 64 --steps 20
  sdti bench --model v1-5.safetensors --device cuda --dtype f16 --batch-size 4
  sdti bench --json

A step is the whole optimizer step: forward through CLIP and the UNet, the backward pass to
the learned vectors, AdamW. Images are VAE-encoded once when added (as in training), so
that time is reported apart. One warm-up step is not timed.";

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchConfig {
    /// The SD 1.x block structure at widths 32-64 (seconds per step on a CPU)
    Tiny,
    /// Stable Diffusion 1.5's sizes (runwayml/stable-diffusion-v1-5 configs)
    Sd15,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Random weights of this architecture (ignored with --model)
    #[arg(long, value_enum, default_value = "sd15")]
    pub config: BenchConfig,
    /// A real model instead of random weights
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Training resolution in pixels [512; 64 for --config tiny]
    #[arg(long)]
    pub resolution: Option<usize>,
    /// Timed steps after one warm-up step
    #[arg(long, default_value_t = 3)]
    pub steps: u64,
    /// Images per step
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Vectors of the learned word
    #[arg(long, default_value_t = 1)]
    pub vectors: usize,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Serialize)]
struct BenchReport {
    model: String,
    device: String,
    dtype: String,
    resolution: usize,
    batch_size: usize,
    vectors: usize,
    steps: u64,
    load_seconds: f64,
    /// VAE-encoding the image (and its mirror), once per image.
    cache_seconds: f64,
    warmup_ms: f64,
    mean_ms_per_step: f64,
    min_ms_per_step: f64,
    max_ms_per_step: f64,
    steps_per_second: f64,
    images_per_second: f64,
    peak_rss_mib: Option<f64>,
}

/// A synthetic picture: a disc on a gradient.
fn picture(size: usize) -> ImageSource {
    let mut data = vec![0u8; size * size * 3];
    let c = size as f32 / 2.0;
    for y in 0..size {
        for x in 0..size {
            let (dx, dy) = (x as f32 - c, y as f32 - c);
            let inside = dx * dx + dy * dy < (size as f32 / 4.0).powi(2);
            let p = (y * size + x) * 3;
            let g = (255 * y / size.max(1)) as u8;
            data[p..p + 3].copy_from_slice(&if inside { [220, 60, 40] } else { [20, g, 140] });
        }
    }
    ImageSource::Pixels {
        data,
        width: size as u32,
        height: size as u32,
        stride: size * 3,
        format: PixelFormat::Rgb8,
    }
}

pub fn run(a: BenchArgs) -> CliResult<()> {
    if a.steps == 0 {
        return Err(CliError::new("--steps must be at least 1"));
    }
    let resolution = a.resolution.unwrap_or(match (&a.model, a.config) {
        (None, BenchConfig::Tiny) => 64,
        _ => 512,
    });
    let opts = a.device.load_options()?;
    let start = Instant::now();
    let (model, name) = match &a.model {
        Some(path) => (load_model(path, &a.device)?, path.display().to_string()),
        None => {
            let config: ModelConfig = match a.config {
                BenchConfig::Tiny => tiny_sd1_config(),
                BenchConfig::Sd15 => ModelConfig::sd1(),
            };
            if !a.json {
                eprintln!(
                    "building a random {} model...",
                    format!("{:?}", a.config).to_ascii_lowercase()
                );
            }
            let m = random_model(&config, 0x5d71, opts.dtype, &opts.device)?;
            (
                Arc::new(m),
                format!("random {}", format!("{:?}", a.config).to_ascii_lowercase()),
            )
        }
    };
    let load_seconds = start.elapsed().as_secs_f64();
    let config = TrainConfig {
        token: "bench-word".into(),
        init: Init::Text("thing".into()),
        vectors: a.vectors,
        resolution,
        batch_size: a.batch_size,
        max_steps: a.steps + 1,
        seed: 1,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(model, config)?;
    let start = Instant::now();
    trainer.add_image(picture(resolution), Some("a red disc".into()))?;
    let cache_seconds = start.elapsed().as_secs_f64();
    let warmup = trainer.step()?;
    let mut times = Vec::new();
    for _ in 0..a.steps {
        let s = trainer.step()?;
        times.push(s.seconds * 1000.0);
        if !a.json {
            eprintln!(
                "step {}: {:.1} ms (loss {:.4})",
                s.step - 1,
                s.seconds * 1000.0,
                s.loss
            );
        }
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let report = BenchReport {
        model: name,
        device: a.device.device.clone(),
        dtype: a.device.dtype.clone(),
        resolution,
        batch_size: a.batch_size,
        vectors: a.vectors,
        steps: a.steps,
        load_seconds,
        cache_seconds,
        warmup_ms: warmup.seconds * 1000.0,
        mean_ms_per_step: mean,
        min_ms_per_step: times.iter().copied().fold(f64::INFINITY, f64::min),
        max_ms_per_step: times.iter().copied().fold(0.0, f64::max),
        steps_per_second: 1000.0 / mean,
        images_per_second: 1000.0 / mean * a.batch_size as f64,
        peak_rss_mib: peak_rss_mib(),
    };
    if a.json {
        return print_json(&report);
    }
    println!(
        "{} on {} ({}), {} px, batch {}, {} vector{}",
        report.model,
        report.device,
        report.dtype,
        resolution,
        a.batch_size,
        a.vectors,
        if a.vectors == 1 { "" } else { "s" }
    );
    println!(
        "  model {:.1}s, latent cache {:.2}s, warm-up step {:.0} ms",
        load_seconds, cache_seconds, report.warmup_ms
    );
    println!(
        "  step: mean {:.1} ms, min {:.1} ms, max {:.1} ms over {} steps = {:.2} steps/s",
        mean, report.min_ms_per_step, report.max_ms_per_step, a.steps, report.steps_per_second
    );
    println!(
        "  3000 steps would take {}",
        human_duration(3000.0 * mean / 1000.0)
    );
    if let Some(rss) = report.peak_rss_mib {
        println!("  peak memory {rss:.0} MiB");
    }
    Ok(())
}
