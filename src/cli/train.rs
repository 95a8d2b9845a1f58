//! `sdti train`: options to a run configuration, the run folder, the progress bar,
//! Ctrl-C to a checkpoint, `--resume`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use sdti::app::run_folder::{
    folder_state, FolderState, ImageEntry, PreviewSettings, RunConfig, RunFolder, RunSettings,
    Written,
};
use sdti::embedding::Format;
use sdti::train::config::{RecomputeChoice, RecomputeMode};
use sdti::train::data::ImageSource;
use sdti::train::lr_schedule::LrSchedule;
use sdti::train::{Init, StepStats, Templates, TrainConfig, Trainer};

use super::common::{load_model_checked, CliError, CliResult, Context, DeviceArgs};

pub const EXAMPLES: &str = "\
Examples:
  # Learn 'my-cat' from a folder of photos (a .txt beside an image is its caption)
  sdti train --model v1-5-pruned-emaonly.safetensors --token my-cat --init cat \\
       --vectors 4 photos/ -o runs/my-cat

  # A diffusers-style run: constant schedule with warmup, batch 4, previews every 250 steps
  sdti train --model ./stable-diffusion-v1-5 --token '<my-style>' --templates style \\
       --learning-rate 5e-4 --lr-scheduler constant_with_warmup --lr-warmup-steps 100 \\
       --batch-size 4 --preview-every 250 --preview-prompt 'a city in the style of {}' \\
       art/*.png -o runs/my-style

  # An A1111 learning-rate schedule string, f16 embeddings in three formats
  sdti train --model model.safetensors --token thing --learning-rate '0.005:100, 1e-3:1000, 1e-5' \\
       --formats a1111-pt,safetensors,diffusers --precision f16 imgs/ -o runs/thing

  # SDXL (1024 px, clip skip 2; the word is written as {clip_l, clip_g} safetensors)
  sdti train --model sd_xl_base_1.0.safetensors --token my-cat-xl --init cat \\
       photos/ -o runs/my-cat-xl

  # SD 2.x 768-v (768 px, v-prediction as the model's scheduler says; 1024-wide word)
  sdti train --model ./stable-diffusion-2-1 --token my-cat-sd2 --init cat photos/ -o runs/sd2

  # Ctrl-C writes a checkpoint; continue later with the saved options
  sdti train --resume -o runs/my-cat

The run folder: config.json, loss.csv (step,loss,lr,seconds), loss.png,
checkpoints/step-N.safetensors, embeddings/WORD-N.EXT, previews/step-N.png, previews.png
(every preview in a grid), and WORD.EXT at the end. An existing folder is refused unless
--resume (continue it) or --overwrite (replace it; only sdti run folders are replaced).
Exit status: 0 done, 1 error, 130 stopped by Ctrl-C (after writing a checkpoint).";

/// Every training option of the engine (defaults in brackets are the engine's; see the
/// README's table for their references).
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Training images: files, or folders of PNG/JPEG/WebP files
    #[arg(value_name = "IMAGES")]
    pub images: Vec<PathBuf>,
    /// The model (SD 1.x, SD 2.x or SDXL): a diffusers folder or a single-file
    /// .safetensors checkpoint
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// The run folder to write
    #[arg(long, short, value_name = "DIR")]
    pub output: PathBuf,
    /// Continue the run in --output from its newest checkpoint, with its saved options
    #[arg(long)]
    pub resume: bool,
    /// Replace an existing run folder
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,

    /// The new word (one word, no spaces) [sdti-word]
    #[arg(long, help_heading = "Word")]
    pub token: Option<String>,
    /// Initialize the vectors from the token vectors of this text [*]
    #[arg(long, value_name = "TEXT", help_heading = "Word")]
    pub init: Option<String>,
    /// Initialize the vectors with zeros
    #[arg(long, conflicts_with_all = ["init", "init_random"], help_heading = "Word")]
    pub init_zeros: bool,
    /// Initialize the vectors randomly (the token table's standard deviation)
    #[arg(long, conflicts_with = "init", help_heading = "Word")]
    pub init_random: bool,
    /// Vectors per token, 1..=75 [1]
    #[arg(long, value_name = "N", help_heading = "Word")]
    pub vectors: Option<usize>,

    /// Training resolution in pixels, a multiple of 8 [the model's: 512; 768 for SD 2.x
    /// v-prediction; 1024 for SDXL]
    #[arg(long, value_name = "PIXELS", help_heading = "Data")]
    pub resolution: Option<usize>,
    /// Crop each image at a random place instead of the center
    #[arg(long, help_heading = "Data")]
    pub random_crop: bool,
    /// Probability of training on the mirrored image [0.5]
    #[arg(long, value_name = "P", help_heading = "Data")]
    pub flip_probability: Option<f64>,
    /// Prompt templates: object, style, or an A1111 template file ([name], [filewords]) [object]
    #[arg(long, value_name = "object|style|FILE", help_heading = "Data")]
    pub templates: Option<String>,
    /// A prompt template with {} for the word (repeatable; replaces --templates)
    #[arg(
        long = "template",
        value_name = "TEXT",
        conflicts_with = "templates",
        help_heading = "Data"
    )]
    pub template_list: Vec<String>,

    /// Optimizer steps [3000]
    #[arg(
        long = "steps",
        id = "max_steps",
        value_name = "N",
        help_heading = "Optimization"
    )]
    pub steps: Option<u64>,
    /// A number or an A1111 schedule such as '0.005:100, 1e-3:1000, 1e-5' [0.005]
    #[arg(long, alias = "lr", value_name = "LR", help_heading = "Optimization")]
    pub learning_rate: Option<String>,
    /// diffusers scheduler: constant, constant_with_warmup, linear or cosine [none]
    #[arg(long, value_name = "NAME", help_heading = "Optimization")]
    pub lr_scheduler: Option<String>,
    /// Warmup steps of --lr-scheduler [0]
    #[arg(long, value_name = "N", help_heading = "Optimization")]
    pub lr_warmup_steps: Option<u64>,
    /// Images per micro-batch [1]
    #[arg(long, value_name = "N", help_heading = "Optimization")]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step [1]
    #[arg(long, value_name = "N", help_heading = "Optimization")]
    pub gradient_accumulation: Option<usize>,
    /// AdamW beta1 [0.9]
    #[arg(long, value_name = "B", help_heading = "Optimization")]
    pub adam_beta1: Option<f64>,
    /// AdamW beta2 [0.999]
    #[arg(long, value_name = "B", help_heading = "Optimization")]
    pub adam_beta2: Option<f64>,
    /// AdamW epsilon [1e-8]
    #[arg(long, value_name = "EPS", help_heading = "Optimization")]
    pub adam_epsilon: Option<f64>,
    /// AdamW decoupled weight decay [1e-2]
    #[arg(long, value_name = "W", help_heading = "Optimization")]
    pub weight_decay: Option<f64>,
    /// Clip the gradient's L2 norm to this [off]
    #[arg(long, value_name = "NORM", help_heading = "Optimization")]
    pub max_grad_norm: Option<f64>,
    /// Seed of every random choice [0]
    #[arg(long, value_name = "N", help_heading = "Optimization")]
    pub seed: Option<u64>,
    /// Use the output of this CLIP layer from the end (1 = last) [the model family's: 1 for
    /// SD 1.x, 2 for SD 2.x and SDXL]
    #[arg(long, value_name = "N", help_heading = "Optimization")]
    pub clip_skip: Option<usize>,
    /// Override the model's prediction type: epsilon or v_prediction
    #[arg(long, value_name = "TYPE", help_heading = "Optimization")]
    pub prediction_type: Option<String>,
    /// Override the model's zero-terminal-SNR noise schedule: on or off [the model's]
    #[arg(
        long,
        value_name = "on|off",
        value_parser = ["on", "off"],
        help_heading = "Optimization"
    )]
    pub zero_terminal_snr: Option<String>,

    /// Write a checkpoint and the word every N steps (and at the end) [500]
    #[arg(long, value_name = "N", help_heading = "Run folder")]
    pub save_every: Option<u64>,
    /// Embedding formats, comma-separated (see `sdti convert --help`) [a1111-pt,safetensors;
    /// sdxl for SDXL]
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "LIST",
        help_heading = "Run folder"
    )]
    pub formats: Option<Vec<String>>,
    /// Precision of the embedding files: f32 or f16 [f32]
    #[arg(long, value_name = "P", help_heading = "Run folder")]
    pub precision: Option<String>,
    /// Draw a preview every N steps (and at the start and end); 0 turns previews off [500]
    #[arg(long, value_name = "N", help_heading = "Run folder")]
    pub preview_every: Option<u64>,
    /// Preview prompt; {} stands for the word [a photo of {}]
    #[arg(long, value_name = "TEXT", help_heading = "Run folder")]
    pub preview_prompt: Option<String>,
    /// Preview negative prompt [empty]
    #[arg(long, value_name = "TEXT", help_heading = "Run folder")]
    pub preview_negative: Option<String>,
    /// SDXL previews with an empty negative prompt: encode "" (ComfyUI) instead of zeros
    /// for the context and the pooled vector (diffusers, A1111)
    #[arg(long, help_heading = "Run folder")]
    pub preview_negative_encode: bool,
    /// Preview DDIM steps [20]
    #[arg(long, value_name = "N", help_heading = "Run folder")]
    pub preview_steps: Option<usize>,
    /// Preview classifier-free guidance scale [7.5]
    #[arg(long, value_name = "SCALE", help_heading = "Run folder")]
    pub preview_cfg: Option<f64>,
    /// Preview noise seed [0]
    #[arg(long, value_name = "N", help_heading = "Run folder")]
    pub preview_seed: Option<u64>,
    /// Preview size in pixels [the training resolution]
    #[arg(long, value_name = "PIXELS", help_heading = "Run folder")]
    pub preview_size: Option<usize>,
    /// Print a progress line every N steps when stderr is not a terminal [steps / 20]
    #[arg(long, value_name = "N", help_heading = "Run folder")]
    pub log_every: Option<u64>,

    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub memory: RecomputeArgs,
}

/// How much of the step's activations to keep (`sdti train` and `sdti bench`). Not saved
/// in the run folder: a resumed run chooses again (see `RecomputeMode`).
#[derive(Args, Clone, Debug)]
pub struct RecomputeArgs {
    /// Rerun each UNet block's forward pass in the backward pass instead of keeping its
    /// activations: on (less memory, about one more forward pass per step), off, or auto
    /// (only when a step would not fit in --memory-budget or the memory available, and
    /// then for as few of the UNet's transformers as it takes to fit)
    #[arg(
        long,
        default_value = "auto",
        value_name = "off|on|auto",
        value_parser = ["off", "on", "auto"],
        help_heading = "Memory"
    )]
    pub recompute: String,
    /// The memory auto may plan for, in MiB, for the whole process (or the GPU) [on the
    /// CPU: what the process holds plus the system's available memory when training starts]
    #[arg(long, value_name = "MIB", help_heading = "Memory")]
    pub memory_budget: Option<u64>,
}

impl RecomputeArgs {
    pub fn mode(&self) -> CliResult<RecomputeMode> {
        self.recompute.parse().context("--recompute")
    }

    /// `--memory-budget`, checked.
    pub fn budget(&self) -> CliResult<Option<u64>> {
        if self.memory_budget == Some(0) {
            return Err(CliError::new("--memory-budget must be at least 1 MiB"));
        }
        Ok(self.memory_budget)
    }

    /// Decides recompute for `trainer` (once, before its first step).
    pub fn choose(&self, trainer: &mut Trainer) -> CliResult<RecomputeChoice> {
        Ok(trainer.choose_recompute(self.mode()?, self.budget()?))
    }
}

/// `base` with the options given on the command line.
fn train_config(base: TrainConfig, a: &TrainArgs) -> CliResult<TrainConfig> {
    let mut c = base;
    if let Some(v) = &a.token {
        c.token = v.clone();
    }
    if let Some(v) = &a.init {
        c.init = Init::Text(v.clone());
    }
    if a.init_zeros {
        c.init = Init::Zeros;
    }
    if a.init_random {
        c.init = Init::Random;
    }
    macro_rules! set {
        ($($field:ident <- $arg:ident),* $(,)?) => {
            $(if let Some(v) = &a.$arg { c.$field = v.clone(); })*
        };
    }
    set!(
        vectors <- vectors,
        flip_probability <- flip_probability,
        lr_warmup_steps <- lr_warmup_steps,
        max_steps <- steps,
        batch_size <- batch_size,
        gradient_accumulation <- gradient_accumulation,
        adam_beta1 <- adam_beta1,
        adam_beta2 <- adam_beta2,
        adam_epsilon <- adam_epsilon,
        weight_decay <- weight_decay,
        seed <- seed,
    );
    if let Some(n) = a.clip_skip {
        c.clip_skip = Some(n);
    }
    if let Some(r) = a.resolution {
        c.resolution = Some(r);
    }
    if a.random_crop {
        c.random_crop = true;
    }
    // Parsed here, once, with the flag in the error.
    if let Some(v) = &a.learning_rate {
        c.learning_rate = LrSchedule::parse(v).context("--learning-rate")?;
    }
    if let Some(v) = &a.lr_scheduler {
        c.lr_scheduler = Some(v.parse().context("--lr-scheduler")?);
    }
    if let Some(v) = a.max_grad_norm {
        c.max_grad_norm = Some(v);
    }
    if let Some(v) = &a.prediction_type {
        c.prediction_type = Some(v.parse().context("--prediction-type")?);
    }
    if let Some(v) = &a.zero_terminal_snr {
        c.zero_terminal_snr = Some(v == "on");
    }
    if !a.template_list.is_empty() {
        c.templates = Templates::List(a.template_list.clone());
    } else if let Some(t) = &a.templates {
        c.templates = match t.as_str() {
            "object" => Templates::Object,
            "style" => Templates::Style,
            path => Templates::File(absolute(Path::new(path))),
        };
    }
    Ok(c)
}

/// `base` with the run-folder options given on the command line.
fn run_settings(base: RunSettings, a: &TrainArgs) -> CliResult<RunSettings> {
    let mut r = base;
    if let Some(v) = a.save_every {
        r.save_every = v;
    }
    if let Some(v) = &a.formats {
        // Parsed here, once; a format named twice counts once.
        r.formats.clear();
        for name in v {
            let f: Format = name.trim().parse().context("--formats")?;
            if !r.formats.contains(&f) {
                r.formats.push(f);
            }
        }
    }
    if let Some(v) = &a.precision {
        r.precision = v.parse().context("--precision")?;
    }
    let p: &mut PreviewSettings = &mut r.preview;
    if let Some(v) = a.preview_every {
        p.every = v;
    }
    if let Some(v) = &a.preview_prompt {
        p.prompt = v.clone();
    }
    if let Some(v) = &a.preview_negative {
        p.negative = v.clone();
    }
    if a.preview_negative_encode {
        p.empty_negative = sdti::app::preview::EmptyNegative::Encode;
    }
    if let Some(v) = a.preview_steps {
        p.steps = v;
    }
    if let Some(v) = a.preview_cfg {
        p.guidance = v;
    }
    if let Some(v) = a.preview_seed {
        p.seed = v;
    }
    if let Some(v) = a.preview_size {
        p.size = v;
    }
    Ok(r)
}

/// The fields (as flags) whose values differ between two configurations.
fn differing_options(saved: &TrainConfig, given: &TrainConfig) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(saved), serde_json::to_value(given))
    else {
        return vec!["(unreadable options)".into()];
    };
    a.iter()
        .filter(|(k, v)| b.get(*k) != Some(*v))
        .map(|(k, v)| {
            format!(
                "{} (saved {}, given {})",
                super::common::flag_name(k),
                v,
                b.get(k).cloned().unwrap_or_default()
            )
        })
        .collect()
}

pub fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// Files as given, folders expanded to their image files (sorted); every path checked.
pub fn expand_images(paths: &[PathBuf]) -> CliResult<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| CliError::new(format!("image folder {}: {e}", p.display())))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.is_file()
                        && f.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                            IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str())
                        })
                })
                .collect();
            if found.is_empty() {
                return Err(CliError::new(format!(
                    "image folder {} holds no PNG, JPEG or WebP files",
                    p.display()
                )));
            }
            found.sort();
            out.extend(found.into_iter().map(|f| absolute(&f)));
        } else if p.is_file() {
            out.push(absolute(p));
        } else {
            return Err(CliError::new(format!(
                "image {}: no such file or folder",
                p.display()
            )));
        }
    }
    Ok(out)
}

/// The flag the Ctrl-C handler sets: the running trainer's cancel flag.
static CANCEL: Mutex<Option<Arc<AtomicBool>>> = Mutex::new(None);
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs the Ctrl-C handler once: the first Ctrl-C asks the trainer to stop after its
/// step (a checkpoint is then written), a second one quits at once.
pub fn handle_ctrl_c(cancel: Arc<AtomicBool>) {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    if let Ok(mut slot) = CANCEL.lock() {
        *slot = Some(cancel);
    }
    INSTALLED.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            if INTERRUPTED.swap(true, Ordering::SeqCst) {
                eprintln!("\ninterrupted again: quitting without a checkpoint");
                std::process::exit(130);
            }
            eprintln!(
                "\nstopping after this step to write a checkpoint (Ctrl-C again quits at once)"
            );
            if let Ok(slot) = CANCEL.lock() {
                if let Some(flag) = slot.as_ref() {
                    flag.store(true, Ordering::SeqCst);
                }
            }
        });
    });
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// The progress bar (a terminal) or progress lines (a log).
pub struct Progress {
    bar: ProgressBar,
    log_every: u64,
    total: u64,
    start: Instant,
    start_step: u64,
    ema: f64,
    ema_n: i32,
}

impl Progress {
    pub fn new(start_step: u64, total: u64, log_every: Option<u64>) -> Self {
        let bar = ProgressBar::new(total).with_position(start_step);
        let style = ProgressStyle::with_template(
            "{bar:28.cyan/blue} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.reset_eta();
        Self {
            bar,
            log_every: log_every.unwrap_or((total / 20).max(1)).max(1),
            total,
            start: Instant::now(),
            start_step,
            ema: 0.0,
            ema_n: 0,
        }
    }

    /// The loss averaged exponentially (weight 0.9, bias-corrected).
    fn smoothed(&mut self, loss: f32) -> f64 {
        self.ema = self.ema * 0.9 + f64::from(loss) * 0.1;
        self.ema_n += 1;
        self.ema / (1.0 - 0.9f64.powi(self.ema_n))
    }

    pub fn step(&mut self, s: &StepStats) {
        let smooth = self.smoothed(s.loss);
        let elapsed = self.start.elapsed().as_secs_f64();
        let rate = (s.step - self.start_step) as f64 / elapsed.max(1e-9);
        let msg = format!("loss {smooth:.4} lr {:.2e} {rate:.2} it/s", s.learning_rate);
        self.bar.set_message(msg.clone());
        self.bar.set_position(s.step);
        if self.bar.is_hidden() && (s.step.is_multiple_of(self.log_every) || s.step == self.total) {
            let eta = (self.total - s.step) as f64 / rate.max(1e-9);
            eprintln!(
                "step {}/{} {msg} eta {} (this step: loss {:.4}, {:.0} ms)",
                s.step,
                self.total,
                super::common::human_duration(eta),
                s.loss,
                s.seconds * 1000.0
            );
        }
    }

    /// A line above the bar (or on its own when the bar is hidden).
    pub fn note(&self, text: &str) {
        if self.bar.is_hidden() {
            eprintln!("{text}");
        } else {
            self.bar.println(text);
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

fn describe(written: &[Written], dir: &Path) -> Option<String> {
    let rel = |p: &Path| p.strip_prefix(dir).unwrap_or(p).display().to_string();
    let parts: Vec<String> = written
        .iter()
        .filter_map(|w| match w {
            Written::Checkpoint(p) => Some(format!("checkpoint {}", rel(p))),
            Written::Preview(p) => Some(format!("preview {}", rel(p))),
            Written::Embedding(_) => None,
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// How a training loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    Interrupted,
}

/// Trains to the end of the run (or Ctrl-C), writing the run folder as it goes.
pub fn train_loop(
    trainer: &mut Trainer,
    run: &mut RunFolder,
    log_every: Option<u64>,
) -> CliResult<Outcome> {
    handle_ctrl_c(trainer.cancel_flag());
    let total = trainer.total_steps();
    let mut progress = Progress::new(trainer.step_count(), total, log_every);
    let dir = run.dir().to_path_buf();
    if let Some(text) = describe(&run.begin(trainer)?, &dir) {
        progress.note(&format!("step {}: {text}", trainer.step_count()));
    }
    while trainer.step_count() < total {
        match trainer.step() {
            Ok(stats) => {
                progress.step(&stats);
                let written = run.after_step(trainer, &stats)?;
                if let Some(text) = describe(&written, &dir) {
                    progress.note(&format!("step {}: {text}", stats.step));
                }
            }
            Err(sdti::Error::Cancelled) => {
                progress.finish();
                run.save(trainer)?;
                return Ok(Outcome::Interrupted);
            }
            Err(e) => {
                progress.finish();
                return Err(CliError::from(e))
                    .context(format!("step {}", trainer.step_count() + 1));
            }
        }
    }
    progress.finish();
    if interrupted() {
        // Ctrl-C during the last step: the run is complete anyway.
        INTERRUPTED.store(false, Ordering::SeqCst);
    }
    run.finish(trainer)?;
    Ok(Outcome::Finished)
}

/// Adds the images, with a progress line per image on big models.
pub fn add_images(trainer: &mut Trainer, images: &[ImageEntry]) -> CliResult<()> {
    let bar = ProgressBar::new(images.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("caching latents {bar:28.cyan/blue} {pos}/{len}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    for img in images {
        if interrupted() {
            bar.finish_and_clear();
            return Err(CliError {
                message: "interrupted before training started".into(),
                code: 130,
            });
        }
        trainer
            .add_image(ImageSource::File(img.path.clone()), img.caption.clone())
            .map_err(|e| match e {
                // The data module's message names the file and the reason.
                sdti::Error::Input { reason, .. } => CliError::new(format!("image {reason}")),
                other => CliError::from(other),
            })?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(())
}

pub fn run(a: TrainArgs) -> CliResult<()> {
    let dir = a.output.clone();
    let state = folder_state(&dir);
    // 1. The configuration: fresh, or the saved one (given options must agree with it).
    let (mut config, mut folder) = if a.resume {
        match state {
            FolderState::Run => {}
            FolderState::Missing => {
                return Err(CliError::new(format!(
                    "--resume: {} does not exist; start the run without --resume",
                    dir.display()
                )))
            }
            _ => {
                return Err(CliError::new(format!(
                    "--resume: {} is not an sdti run folder (it has no config.json)",
                    dir.display()
                )))
            }
        }
        let folder = RunFolder::open(&dir)?;
        let saved = folder.config().clone();
        let train = train_config(saved.train.clone(), &a)?;
        let diff = differing_options(&saved.train, &train);
        if !diff.is_empty() {
            return Err(CliError::new(format!(
                "--resume continues {} with its saved options; these differ: {}",
                dir.display(),
                diff.join(", ")
            )));
        }
        let mut config = saved.clone();
        config.run = run_settings(saved.run, &a)?;
        if let Some(m) = &a.model {
            config.model = absolute(m).display().to_string();
        }
        if !a.images.is_empty() {
            config.images = expand_images(&a.images)?
                .into_iter()
                .map(|path| ImageEntry {
                    path,
                    caption: None,
                })
                .collect();
        }
        (config, Some(folder))
    } else {
        match state {
            FolderState::Missing | FolderState::Empty => {}
            FolderState::Run if a.overwrite => {}
            FolderState::Other if a.overwrite => {
                return Err(CliError::new(format!(
                    "--overwrite replaces only sdti run folders; {} holds other files",
                    dir.display()
                )))
            }
            _ => {
                return Err(CliError::new(format!(
                    "output folder {} already exists; pass --resume to continue it or --overwrite to replace it",
                    dir.display()
                )))
            }
        }
        let model = a.model.as_ref().ok_or_else(|| {
            CliError::new(
                "--model is required: an SD 1.x, SD 2.x or SDXL diffusers folder or .safetensors file",
            )
        })?;
        if a.images.is_empty() {
            return Err(CliError::new(
                "no training images given: pass image files or folders",
            ));
        }
        let train = train_config(TrainConfig::default(), &a)?;
        let run = run_settings(RunSettings::default(), &a)?;
        let images = expand_images(&a.images)?
            .into_iter()
            .map(|path| ImageEntry {
                path,
                caption: None,
            })
            .collect();
        (
            RunConfig::new(absolute(model).display().to_string(), images, train, run),
            None,
        )
    };
    config.train.validate()?;
    config.run.validate()?;

    // 2. The model, the trainer and its images; only then the folder.
    // A job that cannot fit says so from the files' headers, before the weights load.
    let (mode, budget) = (a.memory.mode()?, a.memory.budget()?);
    let model = load_model_checked(Path::new(&config.model), &a.device, |model, opts| {
        sdti::train::check_fits(model, opts.dtype, &opts.device, &config.train, mode, budget)
    })?;
    let family = model.config.family;
    if folder.is_none() && a.formats.is_none() {
        config.run.formats = RunSettings::default_formats(family);
    }
    config.run.check_for_family(family)?;
    // The resolution is the model family's unless given: known once the trainer has it.
    let mut trainer = Trainer::new(model, config.train.clone())?;
    sdti::app::preview::check_size([
        ("resolution", trainer.resolution()),
        (
            "preview_size",
            config.run.preview.size.max(trainer.resolution()),
        ),
    ])?;
    if folder.is_none() {
        // config.json records what the run trains with (the family's resolution and clip
        // skip filled in), as its checkpoints do.
        config.train = trainer.config().clone();
    }
    let recompute = a.memory.choose(&mut trainer)?;
    add_images(&mut trainer, &config.images)?;
    let mut run = match folder.take() {
        Some(mut f) => {
            f.update_settings(config.run.clone(), &config.model, &config.images)?;
            let step = f.resume(&mut trainer)?;
            if step >= trainer.total_steps() {
                eprintln!("{}: the run is complete (step {step})", dir.display());
            } else {
                eprintln!("resuming {} at step {step}", dir.display());
            }
            f
        }
        None => RunFolder::create(&dir, config.clone(), a.overwrite)?,
    };
    let total = trainer.total_steps();
    eprintln!(
        "training '{}' ({} vector{}) on {} image{} at {} px for {total} steps into {}",
        config.train.token,
        config.train.vectors,
        if config.train.vectors == 1 { "" } else { "s" },
        config.images.len(),
        if config.images.len() == 1 { "" } else { "s" },
        trainer.resolution(),
        dir.display()
    );
    eprintln!("{recompute}");
    let outcome = train_loop(&mut trainer, &mut run, a.log_every)?;
    let step = trainer.step_count();
    match outcome {
        Outcome::Interrupted => {
            eprintln!(
                "stopped at step {step} of {total}; checkpoint {}",
                run.checkpoint_path(step).display()
            );
            eprintln!("continue with: sdti train --resume -o {}", dir.display());
            Err(CliError {
                message: String::new(),
                code: 130,
            })
        }
        Outcome::Finished => {
            println!("trained '{}' for {step} steps", config.train.token);
            for p in run.final_embeddings() {
                println!("  {}", p.display());
            }
            println!("  {}", dir.join(sdti::app::run_folder::LOSS_PNG).display());
            if config.run.preview.every > 0 {
                println!(
                    "  {}",
                    dir.join(sdti::app::run_folder::PREVIEW_GRID).display()
                );
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Train {
        #[command(flatten)]
        args: TrainArgs,
    }

    fn parse(extra: &[&str]) -> Result<TrainArgs, clap::Error> {
        let base = ["sdti-train", "-o", "run"];
        Train::try_parse_from(base.iter().chain(extra)).map(|t| t.args)
    }

    #[test]
    fn recompute_flags_parse() {
        let default = parse(&[]).unwrap();
        assert_eq!(default.memory.mode().unwrap(), RecomputeMode::Auto);
        assert_eq!(default.memory.memory_budget, None);
        let given = parse(&["--recompute", "on", "--memory-budget", "22000"]).unwrap();
        assert_eq!(given.memory.mode().unwrap(), RecomputeMode::On);
        assert_eq!(given.memory.memory_budget, Some(22000));
        assert_eq!(
            parse(&["--recompute", "off"])
                .unwrap()
                .memory
                .mode()
                .unwrap(),
            RecomputeMode::Off
        );
        let err = parse(&["--recompute", "sometimes"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("sometimes") && err.contains("auto"), "{err}");
        assert!(parse(&["--memory-budget", "lots"]).is_err());
    }

    /// Recompute is no training option: a resumed run compares none of it.
    #[test]
    fn recompute_is_not_compared_on_resume() {
        let a = parse(&["--recompute", "on", "--memory-budget", "1"]).unwrap();
        let saved = TrainConfig::default();
        let given = train_config(saved.clone(), &a).unwrap();
        assert!(differing_options(&saved, &given).is_empty());
    }
}
