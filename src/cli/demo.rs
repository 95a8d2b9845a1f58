//! `sdti demo`: the whole job end to end. Without --model: a random tiny model of the SD
//! 1.x architecture and synthetic pictures, trained on the CPU in a few minutes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use image::{Rgb, RgbImage};
use sdti::app::eval::{fixed_noise_loss, image_latents};
use sdti::app::preview::{sample_image, SampleOptions};
use sdti::app::run_folder::{
    folder_state, FolderState, ImageEntry, PreviewSettings, RunConfig, RunFolder, RunSettings,
};
use sdti::embedding::{read_embedding, Existing, Format, Precision};
use sdti::model::random::{random_model, tiny_sd1_config};
use sdti::model::SdModel;
use sdti::prompt::encoder::PromptEncoder;
use sdti::train::data::TrainImage;
use sdti::train::{Init, TrainConfig, Trainer};

use super::common::{human_duration, load_model, CliError, CliResult, Context, DeviceArgs};
use super::train::{add_images, train_loop, Outcome};

pub const EXAMPLES: &str = "\
Examples:
  sdti demo                          # random tiny SD 1.x, 128 px, CPU, about a minute
  sdti demo --steps 50 -o /tmp/demo  # quicker
  sdti demo --model v1-5-pruned-emaonly.safetensors --device cuda   # a real model at 512

It draws synthetic pictures of a concept (a red disc), trains the word 'red-disc' from
them into a run folder (checkpoints, embeddings, previews, loss plot), exports the word in
every writable format and reads each file back, encodes a prompt with the new word, and
samples a picture from it. A folder made by an earlier demo is replaced.";

const DEMO_MARKER: &str = "demo.json";
const TOKEN: &str = "red-disc";

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// A real SD 1.x or SD 2.x model (diffusers folder or .safetensors); default: a random
    /// tiny SD 1.x one (SDXL words: `sdti train` and `sdti sample`)
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Where everything goes
    #[arg(long, short, default_value = "sdti-demo", value_name = "DIR")]
    pub output: PathBuf,
    /// Training steps [500; 1000 with --model]
    #[arg(long = "steps", id = "max_steps")]
    pub steps: Option<u64>,
    /// Training resolution [128; 512 with --model]
    #[arg(long)]
    pub resolution: Option<usize>,
    /// Seed of the model, the pictures and the training
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Replace the output folder even when an earlier demo did not make it (only sdti
    /// run or demo folders)
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// A red disc (the concept) at a place and size of its own on a varied background.
fn concept_picture(k: usize, size: u32) -> RgbImage {
    let s = size as f32;
    let (cx, cy) = (
        s * (0.35 + 0.06 * (k % 4) as f32),
        s * (0.4 + 0.05 * (k % 3) as f32),
    );
    let r = s * (0.18 + 0.03 * (k % 3) as f32);
    let backgrounds: [[u8; 3]; 4] = [
        [30, 120, 140],
        [40, 100, 60],
        [200, 200, 190],
        [60, 60, 110],
    ];
    let bg = backgrounds[k % backgrounds.len()];
    RgbImage::from_fn(size, size, |x, y| {
        let (dx, dy) = (x as f32 - cx, y as f32 - cy);
        let d = (dx * dx + dy * dy).sqrt();
        if d < r * 0.35 {
            Rgb([240, 200, 60]) // a yellow centre makes the concept more than a colour
        } else if d < r {
            Rgb([210, 40, 30])
        } else {
            let shade = (y as f32 / s * 40.0) as u8;
            Rgb([
                bg[0].saturating_add(shade),
                bg[1].saturating_add(shade),
                bg[2],
            ])
        }
    })
}

fn prepare_output(dir: &Path, overwrite: bool) -> CliResult<()> {
    let is_demo = dir.join(DEMO_MARKER).is_file();
    match folder_state(dir) {
        FolderState::Missing | FolderState::Empty => {}
        _ if is_demo => {
            std::fs::remove_dir_all(dir)
                .map_err(|e| CliError::new(format!("output folder {}: {e}", dir.display())))?;
        }
        FolderState::Run if overwrite => {
            std::fs::remove_dir_all(dir)
                .map_err(|e| CliError::new(format!("output folder {}: {e}", dir.display())))?;
        }
        _ => {
            return Err(CliError::new(format!(
                "output folder {} already exists and was not made by sdti demo; choose another --output",
                dir.display()
            )))
        }
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError::new(format!("output folder {}: {e}", dir.display())))?;
    let marker =
        serde_json::json!({ "kind": "sdti-demo/1", "sdti_version": env!("CARGO_PKG_VERSION") });
    std::fs::write(dir.join(DEMO_MARKER), format!("{marker:#}\n"))
        .map_err(|e| CliError::new(format!("output folder {}: {e}", dir.display())))
}

fn rel(p: &Path, base: &Path) -> String {
    p.strip_prefix(base).unwrap_or(p).display().to_string()
}

pub fn run(a: DemoArgs) -> CliResult<()> {
    let started = Instant::now();
    let real = a.model.is_some();
    let steps = a.steps.unwrap_or(if real { 1000 } else { 500 });
    let resolution = a.resolution.unwrap_or(if real { 512 } else { 128 });
    if steps == 0 {
        return Err(CliError::new("--steps must be at least 1"));
    }
    let dir = a.output.clone();
    // 0. The model (before touching the folder, so a bad --model changes nothing).
    let (model, model_name): (Arc<SdModel>, String) = match &a.model {
        Some(p) => {
            let model = load_model(p, &a.device)?;
            // The demo writes and reads back every one-table format and uses A1111's .pt,
            // which cannot hold an SDXL word.
            if model.config.family == sdti::model::Family::Sdxl {
                return Err(CliError::new(format!(
                    "--model {}: sdti demo runs SD 1.x and SD 2.x models; for SDXL run sdti train and sdti sample",
                    p.display()
                )));
            }
            (model, p.display().to_string())
        }
        None => {
            let opts = a.device.load_options()?;
            let m = random_model(&tiny_sd1_config(), a.seed, opts.dtype, &opts.device)?;
            (Arc::new(m), format!("random tiny SD 1.x (seed {})", a.seed))
        }
    };
    prepare_output(&dir, a.overwrite)?;
    println!("sdti demo: {model_name} on {}", a.device.device);
    if !real {
        println!(
            "  (random weights of the SD 1.x architecture at widths 32-64: it learns, but draws noise-like pictures)"
        );
    }

    // 1. Pictures of the concept.
    let images = write_pictures(&dir, resolution)?;

    // 2. Training into a run folder.
    let plan = TrainPlan {
        steps,
        resolution,
        seed: a.seed,
        real,
    };
    let trainer = train_word(&model, &model_name, &images, &dir, &plan)?;

    // 3. Every writable format, each read back and compared.
    let exported = export_every_format(&trainer, &dir)?;

    // 4. A prompt with the new word, through a host-style encoder.
    let prompt = format!("a photo of {TOKEN} on a table");
    let a1111_pt = exported
        .iter()
        .find(|(f, _)| *f == Format::A1111Pt)
        .map(|(_, p)| p.clone())
        .ok_or_else(|| CliError::new("the a1111-pt export is missing"))?;
    let encoder = encode_with_word(&model, &a1111_pt, &prompt, &dir)?;

    // 5. A picture drawn with the word.
    let sample_path = dir.join("sample.png");
    let opts = SampleOptions {
        prompt: prompt.clone(),
        steps: if real { 30 } else { 20 },
        seed: a.seed,
        width: resolution,
        height: resolution,
        ..SampleOptions::default()
    };
    let img = sample_image(&model, &encoder, &opts)?;
    sdti::app::plot::write_png(&sample_path, &img)?;
    println!(
        "5/5 sampled \"{prompt}\" ({} DDIM steps, guidance {}) to {}",
        opts.steps,
        opts.guidance,
        rel(&sample_path, &dir)
    );

    print_summary(&dir, started, &a1111_pt, &prompt);
    Ok(())
}

/// Six synthetic pictures of the concept (a red disc), written to DIR/images.
fn write_pictures(dir: &Path, resolution: usize) -> CliResult<Vec<ImageEntry>> {
    let images_dir = dir.join("images");
    std::fs::create_dir_all(&images_dir)
        .map_err(|e| CliError::new(format!("{}: {e}", images_dir.display())))?;
    let picture_size = (resolution as u32 * 3 / 2).max(96);
    let mut images = Vec::new();
    for k in 0..6 {
        let path = images_dir.join(format!("concept-{k}.png"));
        sdti::app::plot::write_png(&path, &concept_picture(k, picture_size))?;
        images.push(ImageEntry {
            path,
            caption: Some("a red disc".into()),
        });
    }
    println!(
        "1/5 pictures: {} synthetic pictures of a red disc in {}",
        images.len(),
        rel(&images_dir, dir)
    );

    Ok(images)
}

/// The trained word in every writable one-table (SD 1.x, 2.x) format under DIR/export, each read back and
/// compared with the trained vectors.
fn export_every_format(trainer: &Trainer, dir: &Path) -> CliResult<Vec<(Format, PathBuf)>> {
    let export_dir = dir.join("export");
    let want = trainer.vectors()?;
    let mut exported = Vec::new();
    for format in Format::ALL {
        if !format.writable() || format.sdxl_only() {
            continue;
        }
        let sub = export_dir.join(format.name());
        std::fs::create_dir_all(&sub)
            .map_err(|e| CliError::new(format!("{}: {e}", sub.display())))?;
        let path = sub.join(format!("{TOKEN}.{}", format.extension()));
        trainer
            .export(&path, format, Precision::F32, Existing::Replace)
            .context(format!("export {format}"))?;
        let back = read_embedding(&path)?;
        let same = back.parts.len() == 1 && back.parts[0].data == want;
        if !same {
            return Err(CliError::new(format!(
                "{}: the vectors read back differ from the trained ones",
                path.display()
            )));
        }
        exported.push((format, path));
    }
    println!(
        "3/5 exported {} formats to {} (sdxl needs two text encoders; png-pixels and rinongal-pt are read-only), each read back identical",
        exported.len(),
        rel(&export_dir, dir)
    );

    Ok(exported)
}

/// A host-style encoder with the exported word registered from its file; prints how the
/// prompt tokenizes and the shape of its hidden states.
fn encode_with_word(
    model: &SdModel,
    a1111_pt: &Path,
    prompt: &str,
    dir: &Path,
) -> CliResult<PromptEncoder> {
    let mut encoder = PromptEncoder::for_model(model)?;
    encoder.register_file(None, a1111_pt)?;
    let slots = encoder.tokenize(prompt);
    let end = slots
        .iter()
        .enumerate()
        .skip(1)
        .find(|(_, s)| s.learned.is_none() && s.id == sdti::tokenizer::EOS)
        .map_or(slots.len(), |(i, _)| i + 1);
    let shown: Vec<String> = slots[..end]
        .iter()
        .map(|s| match s.learned {
            Some((_, v)) => format!("[{TOKEN}#{v}]"),
            None => s.id.to_string(),
        })
        .collect();
    let states = encoder.encode(prompt)?;
    println!(
        "4/5 encoded \"{prompt}\" (word from {}): {} -> hidden states {:?}",
        rel(a1111_pt, dir),
        shown.join(" "),
        states.dims()
    );

    Ok(encoder)
}

/// Where everything is, and what to try next.
fn print_summary(dir: &Path, started: Instant, a1111_pt: &Path, prompt: &str) {
    println!();
    println!(
        "Everything is in {} ({} in all):",
        dir.display(),
        human_duration(started.elapsed().as_secs_f64())
    );
    let lines = [
        ("images/", "the training pictures"),
        ("run/config.json", "the run's options"),
        (
            "run/loss.csv, run/loss.png",
            "the loss by step and its plot",
        ),
        (
            "run/checkpoints/",
            "resumable checkpoints (sdti train --resume -o DIR/run)",
        ),
        ("run/embeddings/", "the word by step (red-disc-N.pt)"),
        (
            "run/previews.png",
            "previews over time (run/previews/ one by one)",
        ),
        (
            "run/red-disc.pt",
            "the trained word (A1111); copy it into a host's embeddings folder",
        ),
        ("run/formats/safetensors/", "the same words as safetensors"),
        ("export/FORMAT/", "the word in every writable format"),
        ("sample.png", "a picture drawn with the word"),
    ];
    for (path, what) in lines {
        println!("  {path:<28} {what}");
    }
    println!(
        "Try: sdti inspect {} ; sdti encode --embedding {} \"{prompt}\"",
        a1111_pt.display(),
        a1111_pt.display()
    );
}

/// What the demo trains: its length, size, seed, and whether the model is a real one.
struct TrainPlan {
    steps: u64,
    resolution: usize,
    seed: u64,
    real: bool,
}

/// Trains the word into DIR/run, reporting the loss at fixed noise before and after.
fn train_word(
    model: &Arc<SdModel>,
    model_name: &str,
    images: &[ImageEntry],
    dir: &Path,
    plan: &TrainPlan,
) -> CliResult<Trainer> {
    let train = TrainConfig {
        token: TOKEN.into(),
        init: Init::Text("ball".into()),
        vectors: 2,
        resolution: Some(plan.resolution),
        max_steps: plan.steps,
        seed: plan.seed,
        ..TrainConfig::default()
    };
    let run_settings = RunSettings {
        save_every: (plan.steps / 3).max(1),
        formats: vec![Format::A1111Pt, Format::A1111Safetensors],
        precision: Precision::F32,
        preview: PreviewSettings {
            every: (plan.steps / 4).max(1),
            prompt: "a photo of {}".into(),
            steps: if plan.real { 20 } else { 10 },
            seed: plan.seed,
            ..PreviewSettings::default()
        },
    };
    let run_dir = dir.join("run");
    let config = RunConfig::new(
        model_name.to_string(),
        images.to_vec(),
        train.clone(),
        run_settings,
    );
    let mut trainer = Trainer::new(Arc::clone(model), train)?;
    add_images(&mut trainer, images)?;
    let mut run = RunFolder::create(&run_dir, config, false)?;
    // A yardstick that, unlike the per-step loss, does not swing with the timestep.
    let eval_images: Vec<TrainImage> = images.iter().map(|i| TrainImage::file(&i.path)).collect();
    let latents = image_latents(model, &eval_images, plan.resolution)?;
    let eval_prompt = format!("a photo of a {TOKEN}");
    let eval = |v: &candle_core::Tensor| {
        fixed_noise_loss(model, &latents, TOKEN, v, &eval_prompt, 8, 1234)
    };
    let before = eval(trainer.vectors_tensor())?;
    println!(
        "2/5 training '{TOKEN}' (2 vectors, init 'ball') at {} px for {} steps into {}",
        plan.resolution,
        plan.steps,
        rel(&run_dir, dir)
    );
    let train_start = Instant::now();
    let outcome = train_loop(&mut trainer, &mut run, Some((plan.steps / 10).max(1)))?;
    if outcome == Outcome::Interrupted {
        eprintln!(
            "stopped at step {}; the run folder {} has its checkpoint",
            trainer.step_count(),
            run_dir.display()
        );
        return Err(CliError {
            message: String::new(),
            code: 130,
        });
    }
    let train_seconds = train_start.elapsed().as_secs_f64();
    let after = eval(trainer.vectors_tensor())?;
    println!(
        "    done in {} ({:.0} ms/step); loss at fixed noise and timesteps: {before:.4} with the initial word, {after:.4} with the trained one ({:+.1}%)",
        human_duration(train_seconds),
        train_seconds * 1000.0 / plan.steps as f64,
        (f64::from(after) / f64::from(before) - 1.0) * 100.0
    );

    Ok(trainer)
}
