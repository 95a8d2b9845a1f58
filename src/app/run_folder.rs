//! A training run on disk, written as training goes: the options as JSON, checkpoints,
//! the learned word by step in the chosen formats, preview images with a fixed seed and
//! prompt (and a grid of them over time), `loss.csv` and a loss plot.
//!
//! ```text
//! DIR/config.json                      what the run was started with (RunConfig)
//! DIR/loss.csv                         step,loss,lr,seconds (seconds: that step's time)
//! DIR/loss.png                         the loss and its moving average
//! DIR/checkpoints/step-000500.safetensors   resumable state (vectors, AdamW, RNGs)
//! DIR/previews/step-000500.png         what the word draws at that step
//! DIR/previews.png                     every preview so far, in a labelled grid
//! DIR/WORD.pt                          the word at the end, in the first chosen format
//! DIR/embeddings/WORD-500.pt           the word by step, in the first chosen format
//! DIR/formats/FORMAT/WORD.EXT          the same in each further chosen format, one
//! DIR/formats/FORMAT/WORD-500.EXT      folder per format
//! ```
//!
//! Hosts (A1111, ComfyUI) name a word after its file's stem, so every file's stem is the
//! name stored inside it: `WORD` at the end, `WORD-500` at step 500 (A1111 names its own
//! by-step files so), never `WORD.diffusers`. Within one format's files each name appears
//! once: copying `DIR/WORD.pt`, or the `embeddings/` folder, or one `formats/FORMAT`
//! folder into a host's embeddings folder adds those words and nothing else.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::app::plot::{loss_chart, write_png, LossPoint};
use crate::app::preview::{grid, sample_image, EmptyNegative, SampleFieldNames, SampleOptions};
use crate::embedding::{write_embedding_to, Existing, Family, Format, Precision};
use crate::error::{Error, Result};
use crate::prompt::encoder::PromptEncoder;
use crate::train::{StepStats, TrainConfig, Trainer};

/// `kind` of a run folder's `config.json`.
pub const RUN_KIND: &str = "sdti-run/1";
pub const CONFIG_FILE: &str = "config.json";
pub const LOSS_CSV: &str = "loss.csv";
pub const LOSS_PNG: &str = "loss.png";
pub const PREVIEW_GRID: &str = "previews.png";
const CSV_HEADER: &str = "step,loss,lr,seconds";
/// The loss plot is redrawn at least this often (and at every checkpoint and preview).
const PLOT_EVERY: u64 = 10;

/// Preview images drawn while training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PreviewSettings {
    /// Draw a preview every this many steps (and before the first and after the last);
    /// 0 turns previews off.
    pub every: u64,
    /// `{}` stands for the learned word.
    pub prompt: String,
    pub negative: String,
    /// What an empty negative prompt gives an SDXL model: zeros (diffusers, A1111) or
    /// the encoded "" (ComfyUI). Folders written before SDXL read as zeros.
    pub empty_negative: EmptyNegative,
    pub steps: usize,
    pub guidance: f64,
    pub seed: u64,
    /// Pixels; 0 means the training resolution.
    pub size: usize,
}

impl Default for PreviewSettings {
    fn default() -> Self {
        Self {
            every: 500,
            prompt: "a photo of {}".into(),
            negative: String::new(),
            empty_negative: EmptyNegative::Zeros,
            steps: 20,
            guidance: 7.5,
            seed: 0,
            size: 0,
        }
    }
}

/// How the run is written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunSettings {
    /// A checkpoint and the word in every chosen format every this many steps (and at
    /// the end).
    pub save_every: u64,
    /// The formats the word is written in; the first is the main one (see the module
    /// docs). Stored in `config.json` by name (`"a1111-pt"`).
    #[serde(with = "format_names")]
    pub formats: Vec<Format>,
    /// Stored as `"f32"` or `"f16"`.
    #[serde(with = "precision_name")]
    pub precision: Precision,
    pub preview: PreviewSettings,
}

impl Default for RunSettings {
    fn default() -> Self {
        Self {
            save_every: 500,
            formats: vec![Format::A1111Pt, Format::A1111Safetensors],
            precision: Precision::F32,
            preview: PreviewSettings::default(),
        }
    }
}

/// `Vec<Format>` as the names `Format` parses, so `config.json` stays readable.
mod format_names {
    use super::Format;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(formats: &[Format], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(formats.iter().map(|f| f.name()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Format>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|name| name.parse().map_err(serde::de::Error::custom))
            .collect()
    }
}

/// `Precision` as `"f32"` / `"f16"`.
mod precision_name {
    use super::Precision;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(p: &Precision, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match p {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
        })
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Precision, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl RunSettings {
    /// Checks the formats: at least one, each writable, none twice (whether they hold the
    /// model's words is [`RunSettings::check_for_family`]).
    fn check_formats(&self) -> Result<()> {
        for (i, f) in self.formats.iter().enumerate() {
            if !f.writable() {
                return Err(Error::config(
                    "formats",
                    format!("'{f}' is a read-only layout"),
                ));
            }
            if self.formats[..i].contains(f) {
                return Err(Error::config("formats", format!("'{f}' is named twice")));
            }
        }
        if self.formats.is_empty() {
            return Err(Error::config("formats", "name at least one format"));
        }
        Ok(())
    }

    /// The formats a run writes unless told: A1111's `.pt` and safetensors for SD 1.x and
    /// 2.x, `sdxl` (`{clip_l, clip_g}` safetensors, which A1111, ComfyUI, kohya and
    /// OneTrainer read) for SDXL, whose words A1111's `.pt` cannot hold.
    pub fn default_formats(family: Family) -> Vec<Format> {
        match family {
            Family::Sdxl => vec![Format::SdxlSafetensors],
            Family::Sd1 | Family::Sd2 => RunSettings::default().formats,
        }
    }

    /// Checks that every format holds a word of a `family` model: two tables (`clip_l`,
    /// `clip_g`) for SDXL, one for SD 1.x and 2.x.
    pub fn check_for_family(&self, family: Family) -> Result<()> {
        const SDXL: [Format; 4] = [
            Format::SdxlSafetensors,
            Format::DiffusersSdxl,
            Format::KohyaPt,
            Format::OneTrainer,
        ];
        let name = family.model_name();
        for f in &self.formats {
            match family {
                Family::Sdxl if !SDXL.contains(f) => {
                    return Err(Error::config(
                        "formats",
                        format!(
                            "'{f}' holds one text encoder's vectors; an {name} word has two (clip_l, clip_g): write sdxl, diffusers-sdxl, kohya-pt or onetrainer"
                        ),
                    ))
                }
                Family::Sd1 | Family::Sd2 if f.sdxl_only() => {
                    return Err(Error::config(
                        "formats",
                        format!("'{f}' holds two text encoders' vectors (SDXL's); an {name} word has one"),
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<()> {
        self.check_formats()?;
        if self.save_every == 0 {
            return Err(Error::config("save_every", "must be at least 1"));
        }
        if self.preview.every > 0 {
            let size = self.preview.size;
            if size != 0 && (!size.is_multiple_of(8) || size < 64) {
                return Err(Error::config(
                    "preview_size",
                    format!("{size} must be a multiple of 8, at least 64"),
                ));
            }
            SampleOptions {
                steps: self.preview.steps,
                guidance: self.preview.guidance,
                ..SampleOptions::default()
            }
            .validate_named(SampleFieldNames {
                width: "preview_size",
                height: "preview_size",
                steps: "preview_steps",
                guidance: "preview_cfg",
            })?;
        }
        Ok(())
    }
}

/// One training image as the run was given it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageEntry {
    pub path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
}

/// Everything a run was started with: `config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// [`RUN_KIND`].
    pub kind: String,
    pub sdti_version: String,
    /// The model path, or a description of a generated model.
    pub model: String,
    pub images: Vec<ImageEntry>,
    pub train: TrainConfig,
    pub run: RunSettings,
}

impl RunConfig {
    pub fn new(
        model: String,
        images: Vec<ImageEntry>,
        train: TrainConfig,
        run: RunSettings,
    ) -> Self {
        Self {
            kind: RUN_KIND.into(),
            sdti_version: env!("CARGO_PKG_VERSION").into(),
            model,
            images,
            train,
            run,
        }
    }
}

/// What is at a folder path before a run is started there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FolderState {
    Missing,
    Empty,
    /// A folder with an sdti run's `config.json`.
    Run,
    /// Anything else (a file, or a folder with other content).
    Other,
}

/// What is at `dir`.
pub fn folder_state(dir: &Path) -> FolderState {
    if !dir.exists() {
        return FolderState::Missing;
    }
    if !dir.is_dir() {
        return FolderState::Other;
    }
    if read_config(dir).is_ok() {
        return FolderState::Run;
    }
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            if entries.into_iter().next().is_none() {
                FolderState::Empty
            } else {
                FolderState::Other
            }
        }
        Err(_) => FolderState::Other,
    }
}

fn read_config(dir: &Path) -> Result<RunConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = crate::io::read::read_text(&path, &crate::io::read::RUN_CONFIG)?;
    let config: RunConfig = serde_json::from_str(&text).map_err(|e| {
        Error::input(
            path.display().to_string(),
            format!("not an sdti run configuration: {e}"),
        )
    })?;
    if config.kind != RUN_KIND {
        return Err(Error::input(
            path.display().to_string(),
            format!("kind '{}' is not {RUN_KIND}", config.kind),
        ));
    }
    Ok(config)
}

/// A file written for a step.
#[derive(Clone, Debug, PartialEq)]
pub enum Written {
    Checkpoint(PathBuf),
    Embedding(PathBuf),
    Preview(PathBuf),
}

/// A training run's folder.
pub struct RunFolder {
    dir: PathBuf,
    config: RunConfig,
    formats: Vec<Format>,
    precision: Precision,
    losses: Vec<LossPoint>,
    previews: Vec<(u64, PathBuf)>,
    last_plot: u64,
}

fn step_name(step: u64) -> String {
    format!("{step:06}")
}

impl RunFolder {
    /// Creates the folder (replacing an existing run folder when `replace`) and writes
    /// `config.json` and the `loss.csv` header. Refuses a folder that holds anything but
    /// an sdti run.
    pub fn create(dir: &Path, config: RunConfig, replace: bool) -> Result<Self> {
        config.train.validate()?;
        config.run.validate()?;
        match folder_state(dir) {
            FolderState::Missing | FolderState::Empty => {}
            FolderState::Run if replace => {
                std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            FolderState::Run => {
                return Err(Error::input(
                    dir.display().to_string(),
                    "already holds a training run",
                ))
            }
            FolderState::Other => {
                return Err(Error::input(
                    dir.display().to_string(),
                    "exists and is not an sdti run folder",
                ))
            }
        }
        for sub in ["", "checkpoints", "embeddings", "previews"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
        }
        let json = serde_json::to_string_pretty(&config)
            .map_err(|e| Error::config("run configuration", e.to_string()))?;
        crate::io::write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())?;
        crate::io::write_atomic(&dir.join(LOSS_CSV), format!("{CSV_HEADER}\n").as_bytes())?;
        Self::from_config(dir, config)
    }

    /// Opens an existing run folder (to resume it).
    pub fn open(dir: &Path) -> Result<Self> {
        let config = read_config(dir)?;
        // create() checks before it touches the folder; a folder read back is checked here.
        config.run.validate()?;
        let mut folder = Self::from_config(dir, config)?;
        folder.losses = folder.read_losses()?;
        folder.previews = folder.scan_previews()?;
        Ok(folder)
    }

    fn from_config(dir: &Path, config: RunConfig) -> Result<Self> {
        Ok(Self {
            dir: dir.to_path_buf(),
            formats: config.run.formats.clone(),
            precision: config.run.precision,
            config,
            losses: Vec::new(),
            previews: Vec::new(),
            last_plot: 0,
        })
    }

    /// Replaces the run settings, the model path and the images (when a run is resumed
    /// with other ones) and rewrites `config.json`; the training options stay.
    pub fn update_settings(
        &mut self,
        run: RunSettings,
        model: &str,
        images: &[ImageEntry],
    ) -> Result<()> {
        run.validate()?;
        self.formats = run.formats.clone();
        self.precision = run.precision;
        self.config.run = run;
        self.config.model = model.to_string();
        self.config.images = images.to_vec();
        let json = serde_json::to_string_pretty(&self.config)
            .map_err(|e| Error::config("run configuration", e.to_string()))?;
        crate::io::write_atomic(&self.dir.join(CONFIG_FILE), json.as_bytes())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &RunConfig {
        &self.config
    }

    pub fn formats(&self) -> &[Format] {
        &self.formats
    }

    pub fn checkpoint_path(&self, step: u64) -> PathBuf {
        self.dir
            .join("checkpoints")
            .join(format!("step-{}.safetensors", step_name(step)))
    }

    pub fn preview_path(&self, step: u64) -> PathBuf {
        self.dir
            .join("previews")
            .join(format!("step-{}.png", step_name(step)))
    }

    /// Where the word named `name` (`WORD`, or `WORD-500` for a step) goes in `format`:
    /// the first chosen format at the top (the final word) or in `embeddings/` (by step),
    /// each further format in its own `formats/FORMAT/` folder.
    pub fn embedding_path(&self, name: &str, format: Format, by_step: bool) -> PathBuf {
        let file = format!("{name}.{}", format.extension());
        match self.formats.first() {
            Some(first) if *first == format && by_step => self.dir.join("embeddings").join(file),
            Some(first) if *first == format => self.dir.join(file),
            _ => self.dir.join("formats").join(format.name()).join(file),
        }
    }

    /// The word's final files, one per chosen format.
    pub fn final_embeddings(&self) -> Vec<PathBuf> {
        let token = &self.config.train.token;
        self.formats
            .iter()
            .map(|f| self.embedding_path(token, *f, false))
            .collect()
    }

    /// Writes the word, named `name` inside as in its file name, in every chosen format.
    fn export_all(&self, trainer: &Trainer, name: &str, by_step: bool) -> Result<Vec<Written>> {
        let mut emb = trainer.embedding()?;
        emb.name = Some(name.to_string());
        let mut out = Vec::new();
        for format in &self.formats {
            let path = self.embedding_path(name, *format, by_step);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
            // The run folder is sdti's: a resumed run writes its steps again.
            write_embedding_to(&path, &emb, *format, self.precision, Existing::Replace)?;
            out.push(Written::Embedding(path));
        }
        Ok(out)
    }

    /// The newest checkpoint: `(step, path)`.
    pub fn latest_checkpoint(&self) -> Result<Option<(u64, PathBuf)>> {
        let dir = self.dir.join("checkpoints");
        let mut best: Option<(u64, PathBuf)> = None;
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&dir, e)),
        };
        for entry in entries {
            let path = entry.map_err(|e| Error::io(&dir, e))?.path();
            let step = step_of(&path, ".safetensors");
            if let Some(step) = step {
                if best.as_ref().is_none_or(|(s, _)| step > *s) {
                    best = Some((step, path));
                }
            }
        }
        Ok(best)
    }

    fn read_losses(&self) -> Result<Vec<LossPoint>> {
        let path = self.dir.join(LOSS_CSV);
        let text = match crate::io::read::read_text(&path, &crate::io::read::LOSS_LOG) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        Ok(text
            .lines()
            .skip(1)
            .filter_map(|line| {
                let mut cols = line.split(',');
                let step = cols.next()?.trim().parse().ok()?;
                let loss = cols.next()?.trim().parse().ok()?;
                Some(LossPoint { step, loss })
            })
            .collect())
    }

    fn scan_previews(&self) -> Result<Vec<(u64, PathBuf)>> {
        let dir = self.dir.join("previews");
        let mut out = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries {
                let path = entry.map_err(|e| Error::io(&dir, e))?.path();
                let step = step_of(&path, ".png");
                if let Some(step) = step {
                    out.push((step, path));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Restores `trainer` (built from this folder's configuration, with its images added)
    /// from the newest checkpoint, and forgets what was logged after it. Returns the step
    /// it continues from (0 when no checkpoint was written yet).
    pub fn resume(&mut self, trainer: &mut Trainer) -> Result<u64> {
        self.remove_stale_temp_files();
        let step = match self.latest_checkpoint()? {
            Some((step, path)) => {
                trainer.load_checkpoint(&path)?;
                step
            }
            None => 0,
        };
        self.losses.retain(|p| p.step <= step);
        let mut csv = format!("{CSV_HEADER}\n");
        let path = self.dir.join(LOSS_CSV);
        let old = crate::io::read::read_text(&path, &crate::io::read::LOSS_LOG).unwrap_or_default();
        for line in old.lines().skip(1) {
            let s: Option<u64> = line.split(',').next().and_then(|s| s.trim().parse().ok());
            if s.is_some_and(|s| s <= step) {
                csv.push_str(line);
                csv.push('\n');
            }
        }
        crate::io::write_atomic(&path, csv.as_bytes())?;
        // Previews after the checkpoint are drawn again as the run gets there.
        for (s, p) in &self.previews {
            if *s > step {
                let _ = std::fs::remove_file(p);
            }
        }
        self.previews.retain(|(s, _)| *s <= step);
        self.last_plot = step;
        Ok(step)
    }

    /// Temporary files of writes cut short when an earlier process was killed.
    fn remove_stale_temp_files(&self) {
        let mut dirs = vec![self.dir.clone()];
        for sub in ["checkpoints", "embeddings", "previews"] {
            dirs.push(self.dir.join(sub));
        }
        if let Ok(entries) = std::fs::read_dir(self.dir.join("formats")) {
            dirs.extend(entries.flatten().map(|e| e.path()));
        }
        for d in dirs {
            crate::io::remove_stale_temp_files(&d);
        }
    }

    /// Before the first step: the preview of the initial word.
    pub fn begin(&mut self, trainer: &Trainer) -> Result<Vec<Written>> {
        let step = trainer.step_count();
        let mut out = Vec::new();
        if self.config.run.preview.every > 0 && !self.previews.iter().any(|(s, _)| *s == step) {
            out.push(self.preview(trainer)?);
        }
        Ok(out)
    }

    /// After each step: logs the loss; writes a checkpoint, the word and a preview when
    /// their step comes; redraws the loss plot.
    pub fn after_step(&mut self, trainer: &Trainer, stats: &StepStats) -> Result<Vec<Written>> {
        self.log(stats)?;
        let step = stats.step;
        let mut out = Vec::new();
        if step.is_multiple_of(self.config.run.save_every) {
            out.extend(self.save(trainer)?);
        }
        let every = self.config.run.preview.every;
        if every > 0 && step.is_multiple_of(every) {
            out.push(self.preview(trainer)?);
        }
        if !out.is_empty() || step >= self.last_plot + PLOT_EVERY {
            self.write_plot()?;
        }
        Ok(out)
    }

    /// At the end (or when stopped): the checkpoint and word of the current step, the
    /// final files, the last preview and the plot.
    pub fn finish(&mut self, trainer: &Trainer) -> Result<Vec<Written>> {
        let step = trainer.step_count();
        let mut out = Vec::new();
        if !self.checkpoint_path(step).is_file() {
            out.extend(self.save(trainer)?);
        }
        out.extend(self.export_all(trainer, &self.config.train.token, false)?);
        if self.config.run.preview.every > 0 && !self.previews.iter().any(|(s, _)| *s == step) {
            out.push(self.preview(trainer)?);
        }
        self.write_plot()?;
        Ok(out)
    }

    /// Writes the checkpoint and the word of the current step only (Ctrl-C).
    pub fn save(&mut self, trainer: &Trainer) -> Result<Vec<Written>> {
        let step = trainer.step_count();
        // The words before the checkpoint: a checkpoint on disk then means its step's words
        // are too, so a run killed in between resumes from the step before and writes them.
        let name = format!("{}-{step}", self.config.train.token);
        let words = self.export_all(trainer, &name, true)?;
        let ckpt = self.checkpoint_path(step);
        trainer.save_checkpoint(&ckpt)?;
        let mut out = vec![Written::Checkpoint(ckpt)];
        out.extend(words);
        self.write_plot()?;
        Ok(out)
    }

    fn log(&mut self, stats: &StepStats) -> Result<()> {
        let path = self.dir.join(LOSS_CSV);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        writeln!(
            f,
            "{},{},{},{:.4}",
            stats.step, stats.loss, stats.learning_rate, stats.seconds
        )
        .map_err(|e| Error::io(&path, e))?;
        self.losses.push(LossPoint {
            step: stats.step,
            loss: stats.loss,
        });
        Ok(())
    }

    /// Redraws `loss.png`.
    pub fn write_plot(&mut self) -> Result<()> {
        let img = loss_chart(&self.losses, 800, 480)?;
        write_png(&self.dir.join(LOSS_PNG), &img)?;
        self.last_plot = self.losses.last().map_or(0, |p| p.step);
        Ok(())
    }

    /// The preview prompt with the word filled in.
    pub fn preview_prompt(&self) -> String {
        self.config
            .run
            .preview
            .prompt
            .replace("{}", &self.config.train.token)
    }

    /// Draws the preview of the current step and redraws the grid.
    pub fn preview(&mut self, trainer: &Trainer) -> Result<Written> {
        let p = &self.config.run.preview;
        let size = if p.size == 0 {
            trainer.resolution()
        } else {
            p.size
        };
        let opts = SampleOptions {
            prompt: self.preview_prompt(),
            negative: p.negative.clone(),
            empty_negative: p.empty_negative,
            prediction_type: self.config.train.prediction_type,
            zero_terminal_snr: self.config.train.zero_terminal_snr,
            steps: p.steps,
            guidance: p.guidance,
            seed: p.seed,
            width: size,
            height: size,
        };
        let img = draw_with_vectors(trainer, &opts)?;
        let step = trainer.step_count();
        let path = self.preview_path(step);
        write_png(&path, &img)?;
        self.previews.retain(|(s, _)| *s != step);
        self.previews.push((step, path.clone()));
        self.previews.sort();
        self.write_grid()?;
        Ok(Written::Preview(path))
    }

    fn write_grid(&self) -> Result<()> {
        let mut images = Vec::new();
        for (step, path) in &self.previews {
            let img = image::open(path)
                .map_err(|e| Error::input(path.display().to_string(), e.to_string()))?
                .to_rgb8();
            images.push((format!("step {step}"), img));
        }
        let tiles: Vec<(String, &image::RgbImage)> =
            images.iter().map(|(l, i)| (l.clone(), i)).collect();
        write_png(&self.dir.join(PREVIEW_GRID), &grid(&tiles, 6))
    }
}

/// Draws `opts` with the trainer's current vectors registered as its word (SDXL: both
/// encoders' parts), on the model's encoders with the run's clip skip.
pub fn draw_with_vectors(trainer: &Trainer, opts: &SampleOptions) -> Result<image::RgbImage> {
    let mut encoder = PromptEncoder::for_model(trainer.model())?;
    encoder.set_clip_skip(trainer.clip_skip())?;
    let word = trainer.embedding()?;
    let parts: Vec<&[f32]> = word.parts.iter().map(|p| p.data.as_slice()).collect();
    encoder.register_parts(&trainer.config().token, &parts)?;
    sample_image(trainer.model(), &encoder, opts)
}

/// The step of a `step-NNNNNN<ext>` file name.
fn step_of(path: &Path, ext: &str) -> Option<u64> {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("step-"))
        .and_then(|n| n.strip_suffix(ext))
        .and_then(|n| n.parse::<u64>().ok())
}
