//! `sdti bench`: training steps per second on a random model of the SD 1.x, SD 2.x or
//! SDXL architecture (tiny or real size) or on a given model.
//!
//! The timing itself is `sdti::app::bench`, which benches/train_step.rs (`cargo bench`,
//! with diffusers' step beside sdti's) shares; this file holds the flags, the report and
//! the `--profile` breakdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::{Args, ValueEnum};
use sdti::app::bench::{BenchRun, BenchSetup, BENCH_TOKEN};
use sdti::model::config::ModelConfig;
use sdti::model::profile::{Level, LevelTotal, Pass};
use sdti::model::random::{random_model, tiny_sd1_config, tiny_sd2_config, tiny_sdxl_config};
use sdti::model::SdModel;
use sdti::train::Trainer;
use serde::Serialize;

use super::common::{human_duration, load_model, print_json, CliError, CliResult, DeviceArgs};
use super::train::RecomputeArgs;

pub const EXAMPLES: &str = "\
Examples:
  sdti bench                                   # random SD 1.5-size model, 512 px, CPU
  sdti bench --config tiny --resolution 64 --steps 20
  sdti bench --config sdxl --resolution 512    # random SDXL-size model (1024 px by default)
  sdti bench --config sd2                      # random SD 2.1-size model (768 px, v-prediction)
  sdti bench --model v1-5.safetensors --device cuda --dtype f16 --batch-size 4
  sdti bench --device cuda --batch-size 1,4,8 --profile   # where each step's time goes
  sdti bench --resolution 256 --recompute on   # the time recompute costs, the memory it saves
  sdti bench --json

A step is the whole optimizer step: forward through CLIP and the UNet, the backward pass to
the learned vectors, AdamW. Images are VAE-encoded once when added (as in training), so
that time is reported apart. One warm-up step is not timed.";

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchConfig {
    /// The SD 1.x block structure at widths 32-64 (seconds per step on a CPU)
    Tiny,
    /// The SD 2.x structure (OpenCLIP-style encoder, linear projections) at tiny widths
    TinySd2,
    /// The SDXL structure (two text encoders, added embedding) at tiny widths
    TinySdxl,
    /// Stable Diffusion 1.5's sizes (runwayml/stable-diffusion-v1-5 configs)
    Sd15,
    /// Stable Diffusion 2.1's sizes (stabilityai/stable-diffusion-2-1: 768 px, v-prediction)
    Sd2,
    /// SDXL base 1.0's sizes (stabilityai/stable-diffusion-xl-base-1.0)
    Sdxl,
}

impl BenchConfig {
    /// The name `--config` takes.
    fn name(self) -> &'static str {
        match self {
            BenchConfig::Tiny => "tiny",
            BenchConfig::TinySd2 => "tiny-sd2",
            BenchConfig::TinySdxl => "tiny-sdxl",
            BenchConfig::Sd15 => "sd15",
            BenchConfig::Sd2 => "sd2",
            BenchConfig::Sdxl => "sdxl",
        }
    }

    fn model_config(self) -> ModelConfig {
        match self {
            BenchConfig::Tiny => tiny_sd1_config(),
            BenchConfig::TinySd2 => tiny_sd2_config(),
            BenchConfig::TinySdxl => tiny_sdxl_config(),
            BenchConfig::Sd15 => ModelConfig::sd1(),
            BenchConfig::Sd2 => ModelConfig::sd2(),
            BenchConfig::Sdxl => ModelConfig::sdxl(),
        }
    }

    fn tiny(self) -> bool {
        matches!(
            self,
            BenchConfig::Tiny | BenchConfig::TinySd2 | BenchConfig::TinySdxl
        )
    }
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Random weights of this architecture (ignored with --model)
    #[arg(long, value_enum, default_value = "sd15")]
    pub config: BenchConfig,
    /// A real model instead of random weights
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Training resolution in pixels [the model's: 512, 768 for SD 2.x v-prediction, 1024
    /// for SDXL; 64 for the tiny configs]
    #[arg(long)]
    pub resolution: Option<usize>,
    /// Timed steps after one warm-up step
    #[arg(long, default_value_t = 3)]
    pub steps: u64,
    /// Images per step; a list (1,4,8) runs each on the same model, one report each
    #[arg(
        long,
        default_value = "1",
        value_delimiter = ',',
        value_name = "N[,N...]"
    )]
    pub batch_size: Vec<usize>,
    /// Vectors of the learned word
    #[arg(long, default_value_t = 1)]
    pub vectors: usize,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
    /// Also time the stages of a step (text encoder, UNet forward, backward) and each
    /// layer kind's forward and backward passes, waiting for the device around each
    #[arg(long)]
    pub profile: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub memory: RecomputeArgs,
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
    /// The process's peak RSS over the steps, the warm-up step included (Linux).
    peak_rss_mib: Option<f64>,
    /// Whether the steps recomputed the blocks' activations: "off", "on", or "K of N
    /// transformers" when auto reran only some.
    recompute: String,
    /// The estimated peak memory of a step with that choice (`sdti::model::memory`), to
    /// compare with the measured peaks.
    estimated_peak_mib: f64,
    /// Device memory high-water marks over the timed steps (CUDA): in use by tensors and
    /// workspaces, and reserved by the memory pool.
    device_peak_mib: Option<f64>,
    device_reserved_peak_mib: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    profile: Option<Profile>,
}

/// Where a step's time goes (`--profile`).
#[derive(Serialize)]
struct Profile {
    /// One forward and backward pass of the step's batch, each stage timed alone.
    text_encoder_ms: f64,
    unet_forward_ms: f64,
    backward_ms: f64,
    /// A step with every layer timed (slower than a real step: the device waits around
    /// each layer).
    profiled_step_ms: f64,
    /// Per layer kind: (kind, calls per step, ms per step).
    layers: Vec<(String, f64, f64)>,
    /// Per layer kind and level, slowest first.
    levels: Vec<LevelRow>,
}

/// One line of the profile by level: a layer kind at one input size, both passes.
#[derive(Serialize)]
struct LevelRow {
    name: String,
    #[serde(flatten)]
    level: Level,
    /// Calls per step of the forward pass.
    calls: f64,
    /// ms per step, forward and backward.
    forward_ms: f64,
    backward_ms: f64,
}

/// The per-level totals of `steps` profiled steps as rows, slowest first.
fn level_rows(totals: Vec<LevelTotal>, steps: f64) -> Vec<LevelRow> {
    let mut rows: Vec<LevelRow> = Vec::new();
    for t in totals {
        let i = match rows
            .iter()
            .position(|r| r.name == t.name && r.level == t.level)
        {
            Some(i) => i,
            None => {
                rows.push(LevelRow {
                    name: t.name.clone(),
                    level: t.level,
                    calls: 0.0,
                    forward_ms: 0.0,
                    backward_ms: 0.0,
                });
                rows.len() - 1
            }
        };
        let ms = t.seconds * 1000.0 / steps;
        match t.pass {
            Pass::Forward => {
                rows[i].forward_ms += ms;
                rows[i].calls += t.calls as f64 / steps;
            }
            Pass::Backward => rows[i].backward_ms += ms,
        }
    }
    rows.sort_by(|a, b| (b.forward_ms + b.backward_ms).total_cmp(&(a.forward_ms + a.backward_ms)));
    rows
}

pub fn run(a: BenchArgs) -> CliResult<()> {
    if a.steps == 0 {
        return Err(CliError::new("--steps must be at least 1"));
    }
    let opts = a.device.load_options()?;
    let start = Instant::now();
    let (model, name) = match &a.model {
        Some(path) => (load_model(path, &a.device)?, path.display().to_string()),
        None => {
            let config = a.config.model_config();
            if !a.json {
                eprintln!("building a random {} model...", a.config.name());
            }
            let m = random_model(&config, 0x5d71, opts.dtype, &opts.device)?;
            (Arc::new(m), format!("random {}", a.config.name()))
        }
    };
    let load_seconds = start.elapsed().as_secs_f64();
    let resolution = match (a.resolution, &a.model) {
        (Some(r), _) => r,
        (None, None) if a.config.tiny() => 64,
        (None, _) => sdti::train::TrainConfig::family_resolution(
            model.config.family,
            model.config.scheduler.prediction_type,
        ),
    };
    let mut reports = Vec::new();
    for &batch in &a.batch_size {
        let report = BenchReport {
            load_seconds,
            ..bench_batch(&a, &model, &name, opts.dtype, resolution, batch)?
        };
        if !a.json {
            print_report(&report);
        }
        reports.push(report);
    }
    match (a.json, reports.len()) {
        (false, _) => Ok(()),
        // One batch size: one object; several: an array of them.
        (true, 1) => print_json(&reports[0]),
        (true, _) => print_json(&reports),
    }
}

/// Trains `steps` timed steps (after one warm-up step) at batch size `batch`.
fn bench_batch(
    a: &BenchArgs,
    model: &Arc<SdModel>,
    name: &str,
    dtype: candle_core::DType,
    resolution: usize,
    batch: usize,
) -> CliResult<BenchReport> {
    if batch == 0 {
        return Err(CliError::new("--batch-size must be at least 1"));
    }
    let steps = usize::try_from(a.steps).map_err(|_| CliError::new("--steps is too large"))?;
    let setup = BenchSetup {
        resolution,
        batch_size: batch,
        vectors: a.vectors,
        steps,
    };
    let mut run = BenchRun::new(model.clone(), setup)?;
    let choice = a.memory.choose(run.trainer_mut())?;
    if !a.json {
        eprintln!("batch {batch}: {choice}");
    }
    let recompute = choice.recompute;
    // The peak of the steps (the warm-up included), not of building the model or caching
    // the latents. The first step frees the VAE; freed before the reset, it is not counted
    // in the RSS the peak starts from (at 256 px that RSS was above any step's).
    run.trainer_mut().model().release_vae();
    sdti::app::bench::reset_peak_rss();
    let estimated_peak = choice.peak;
    let times = run.time_steps(|s| {
        if !a.json && s.index > 0 {
            eprintln!(
                "batch {batch} step {}: {:.1} ms (loss {:.4})",
                s.index, s.ms, s.loss
            );
        }
    })?;
    let mean = times.mean_ms();
    let profile = if a.profile {
        Some(profile(model, run.trainer_mut(), batch, resolution)?)
    } else {
        None
    };
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    Ok(BenchReport {
        model: name.to_string(),
        device: a.device.device.clone(),
        dtype: format!("{dtype:?}").to_ascii_lowercase(),
        resolution,
        batch_size: batch,
        vectors: a.vectors,
        steps: a.steps,
        load_seconds: 0.0,
        cache_seconds: run.cache_seconds,
        warmup_ms: times.warmup_ms,
        mean_ms_per_step: mean,
        min_ms_per_step: times.min_ms(),
        max_ms_per_step: times.max_ms(),
        steps_per_second: 1000.0 / mean,
        images_per_second: 1000.0 / mean * batch as f64,
        peak_rss_mib: times.peak_rss_mib,
        recompute: match choice.transformers {
            Some((k, n)) => format!("{k} of {n} transformers"),
            None => format!("{recompute:?}").to_ascii_lowercase(),
        },
        estimated_peak_mib: mib(estimated_peak),
        device_peak_mib: times.device_peak.map(|p| mib(p.0)),
        device_reserved_peak_mib: times.device_peak.map(|p| mib(p.1)),
        profile,
    })
}

fn print_report(report: &BenchReport) {
    let mean = report.mean_ms_per_step;
    println!(
        "{} on {} ({}), {} px, batch {}, {} vector{}",
        report.model,
        report.device,
        report.dtype,
        report.resolution,
        report.batch_size,
        report.vectors,
        if report.vectors == 1 { "" } else { "s" }
    );
    println!(
        "  model {:.1}s, latent cache {:.2}s, warm-up step {:.0} ms",
        report.load_seconds, report.cache_seconds, report.warmup_ms
    );
    println!(
        "  step: mean {:.1} ms, min {:.1} ms, max {:.1} ms over {} steps = {:.2} steps/s, {:.2} images/s",
        mean,
        report.min_ms_per_step,
        report.max_ms_per_step,
        report.steps,
        report.steps_per_second,
        report.images_per_second
    );
    println!(
        "  3000 steps would take {}",
        human_duration(3000.0 * mean / 1000.0)
    );
    if let Some(rss) = report.peak_rss_mib {
        println!(
            "  peak memory {rss:.0} MiB (recompute {}; estimated {:.0} MiB)",
            report.recompute, report.estimated_peak_mib
        );
    } else {
        println!(
            "  recompute {}; estimated peak {:.0} MiB",
            report.recompute, report.estimated_peak_mib
        );
    }
    if let (Some(used), Some(reserved)) = (report.device_peak_mib, report.device_reserved_peak_mib)
    {
        println!("  peak device memory {used:.0} MiB in use, {reserved:.0} MiB reserved");
    }
    if let Some(p) = &report.profile {
        println!(
            "  stages: text encoder {:.1} ms, UNet forward {:.1} ms, backward {:.1} ms",
            p.text_encoder_ms, p.unet_forward_ms, p.backward_ms
        );
        println!(
            "  layers (ms per step, in a profiled step of {:.1} ms):",
            p.profiled_step_ms
        );
        for (kind, calls, ms) in &p.layers {
            println!("    {kind:<16} {ms:>9.2} ms  {calls:>6.0} calls");
        }
        println!(
            "  by level (the input's channels x height x width; ms per step, forward + backward):"
        );
        for r in &p.levels {
            let at = format!("{}x{}x{}", r.level.channels, r.level.height, r.level.width);
            println!(
                "    {:<24} {at:<12} {:>8.2} + {:>8.2} ms  {:>4.0} calls",
                r.name, r.forward_ms, r.backward_ms, r.calls
            );
        }
    }
}

/// Times the stages of one step's work on a batch like the trainer's, then two trainer
/// steps with every layer timed.
fn profile(
    model: &Arc<SdModel>,
    trainer: &mut Trainer,
    batch: usize,
    resolution: usize,
) -> sdti::Result<Profile> {
    use candle_core::{DType, Tensor, Var};
    use sdti::model::clip::split_columns;
    use sdti::model::unet::AddedCond;
    use sdti::model::Injection;
    use sdti::prompt::{encode_prompts, Word};
    use sdti::tokenizer::ClipTokenizer;

    let device = model.device();
    let sync = || device.synchronize();
    let tok = ClipTokenizer::new().map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let prompts = vec![format!("a photo of a {BENCH_TOKEN}"); batch];
    let words = [Word {
        name: BENCH_TOKEN.into(),
        vectors: trainer.vectors_tensor().dim(0)?,
        offset: 0,
    }];
    let enc = encode_prompts(
        &tok,
        &prompts,
        &words,
        sdti::prompt::chunks::ChunkStyle::A1111,
        device,
    )?;
    let vectors = Var::from_tensor(trainer.vectors_tensor())?;
    let widths = trainer.part_widths().to_vec();
    let side = resolution / 8;
    let noisy =
        Tensor::randn(0f32, 1.0, (batch, 4, side, side), device)?.to_dtype(model.dtype())?;
    let timesteps = vec![500.0; batch];
    // SDXL's time ids of an uncropped square picture.
    let time_ids = sdti::sample::inference_time_ids(resolution, resolution, batch, device)?;
    let mut te = 0.0;
    let mut fwd = 0.0;
    let mut bwd = 0.0;
    let rounds = 3;
    for _ in 0..rounds {
        sync()?;
        let t0 = Instant::now();
        // Each encoder's table: SDXL's rows are [clip_l || clip_g].
        let tables = split_columns(vectors.as_tensor(), &widths)?;
        let injections = Injection::per_table(&tables, &enc.index, &enc.mask);
        let injections: Vec<Option<&Injection<'_>>> = injections.iter().map(Some).collect();
        let (ctx, pooled) = sdti::train::loss::text_conditioning(
            model,
            &enc.ids,
            &injections,
            trainer.clip_skip(),
        )?;
        let added = pooled.map(|pooled| AddedCond {
            pooled,
            time_ids: time_ids.clone(),
        });
        sync()?;
        let t1 = Instant::now();
        let pred = model.unet.forward_with(
            &noisy,
            &timesteps,
            &ctx,
            added.as_ref(),
            trainer.recompute(),
        )?;
        let loss = pred.to_dtype(DType::F32)?.sqr()?.mean_all()?;
        sync()?;
        let t2 = Instant::now();
        let grads = loss.backward()?;
        drop(grads);
        sync()?;
        let t3 = Instant::now();
        te += (t1 - t0).as_secs_f64();
        fwd += (t2 - t1).as_secs_f64();
        bwd += (t3 - t2).as_secs_f64();
    }
    let per = |s: f64| s * 1000.0 / rounds as f64;
    let steps = 2;
    sdti::model::profile::reset();
    sdti::model::profile::enable(true);
    let start = Instant::now();
    let result = (0..steps).try_for_each(|_| trainer.step().map(|_| ()));
    sdti::model::profile::enable(false);
    result?;
    let profiled_step_ms = start.elapsed().as_secs_f64() * 1000.0 / steps as f64;
    let mut layers: Vec<(String, f64, f64)> = sdti::model::profile::totals()
        .into_iter()
        .map(|(k, n, s)| (k, n as f64 / steps as f64, s * 1000.0 / steps as f64))
        .collect();
    layers.sort_by(|a, b| b.2.total_cmp(&a.2));
    let levels = level_rows(sdti::model::profile::totals_by_level(), steps as f64);
    Ok(Profile {
        text_encoder_ms: per(te),
        unet_forward_ms: per(fwd),
        backward_ms: per(bwd),
        profiled_step_ms,
        layers,
        levels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both passes of a kind at one level make one row (calls from the forward pass),
    /// another level another row, and the slowest row comes first.
    #[test]
    fn level_rows_join_the_passes_of_a_level() {
        let at = |channels| Level {
            channels,
            height: 8,
            width: 8,
        };
        let total = |level, pass, calls, seconds| LevelTotal {
            name: "resnet".into(),
            level,
            pass,
            calls,
            seconds,
        };
        let rows = level_rows(
            vec![
                total(at(320), Pass::Forward, 4, 0.002),
                total(at(1280), Pass::Backward, 2, 0.010),
                total(at(320), Pass::Backward, 4, 0.004),
                total(at(1280), Pass::Forward, 4, 0.006),
            ],
            2.0,
        );
        let got: Vec<_> = rows
            .iter()
            .map(|r| (r.level.channels, r.calls, r.forward_ms, r.backward_ms))
            .collect();
        assert_eq!(got, [(1280, 2.0, 3.0, 5.0), (320, 2.0, 1.0, 2.0)]);
    }
}
