//! The training loop: cached latents, the denoising step, AdamW on the learned vectors,
//! atomic checkpoints and exact resume.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::data::{prepare_views, CropMode, ImageSource, TrainImage};
use super::loss::{denoising_loss, DenoisingBatch};
use super::lr_schedule::{LrSchedule, LrScheduleError};
use super::templates::{Builtin, TemplateSet};
use crate::embedding::{
    write_embedding_to, EmbeddingFile, EmbeddingPart, Encoder, Existing, Format, Precision,
};
use crate::error::{Error, Result};
use crate::model::{Injection, LatentDist, NoiseSchedule, SchedulerConfig, SdModel};
use crate::prompt::chunks::ChunkStyle;
use crate::prompt::{encode_prompts, Word};
use crate::rng::{Rng, RngState};
use crate::tokenizer::ClipTokenizer;

/// How the learned vectors start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    /// The token vectors of a text, repeated or truncated to the vector count (A1111).
    Text(String),
    Zeros,
    /// Gaussian with the token table's standard deviation.
    Random,
}

/// Which prompt templates to train with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Templates {
    /// The paper's / diffusers' object list ("a photo of a {}", ...).
    Object,
    /// The paper's / diffusers' style list ("a painting in the style of {}", ...).
    Style,
    /// An A1111-style template file (`[name]`, `[filewords]`).
    File(PathBuf),
    /// Given templates.
    List(Vec<String>),
}

/// Every training option. Defaults name their reference.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// The word the vectors are learned for.
    pub token: String,
    /// Default: the text "*" (A1111's default initialization text).
    pub init: Init,
    /// Vectors per token (A1111 default 1).
    pub vectors: usize,
    /// Training resolution in pixels, a multiple of 8 (SD 1.x: 512).
    pub resolution: usize,
    /// Center crop (diffusers' default) or random crop (one crop per image, cached).
    pub random_crop: bool,
    /// Probability of the horizontally flipped view (diffusers' flip_p 0.5).
    pub flip_probability: f64,
    /// A number or an A1111 schedule string (A1111 default 0.005).
    pub learning_rate: String,
    /// `constant`, `constant_with_warmup`, `linear` or `cosine` (diffusers' get_scheduler);
    /// when set, `learning_rate` must be a plain number.
    pub lr_scheduler: Option<String>,
    pub lr_warmup_steps: u64,
    /// Optimizer steps (the diffusers example README runs 3000).
    pub max_steps: u64,
    /// Images per micro-batch (diffusers' train_batch_size default 1... its README uses 4).
    pub batch_size: usize,
    /// Micro-batches per optimizer step (A1111 and diffusers default 1).
    pub gradient_accumulation: usize,
    /// AdamW as diffusers' example configures it: 0.9, 0.999, 1e-8, weight decay 1e-2.
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub weight_decay: f64,
    /// Clip the gradient's L2 norm (off by default, as in both references).
    pub max_grad_norm: Option<f64>,
    pub seed: u64,
    pub templates: Templates,
    /// 1 = the last CLIP layer, as SD 1.x was trained.
    pub clip_skip: usize,
    /// Overrides the model's scheduler `prediction_type` (`epsilon` / `v_prediction`).
    pub prediction_type: Option<String>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            token: "sdti-word".into(),
            init: Init::Text("*".into()),
            vectors: 1,
            resolution: 512,
            random_crop: false,
            flip_probability: 0.5,
            learning_rate: "0.005".into(),
            lr_scheduler: None,
            lr_warmup_steps: 0,
            max_steps: 3000,
            batch_size: 1,
            gradient_accumulation: 1,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            weight_decay: 1e-2,
            max_grad_norm: None,
            seed: 0,
            templates: Templates::Object,
            clip_skip: 1,
            prediction_type: None,
        }
    }
}

impl TrainConfig {
    /// Checks every value, naming the field that is wrong.
    pub fn validate(&self) -> Result<()> {
        crate::names::check_word_name(&self.token).map_err(|why| Error::config("token", why))?;
        if !(1..=75).contains(&self.vectors) {
            return Err(Error::config(
                "vectors",
                format!("{} is outside 1..=75", self.vectors),
            ));
        }
        if self.resolution < 64 || self.resolution % 8 != 0 || self.resolution > 4096 {
            return Err(Error::config(
                "resolution",
                format!(
                    "{} must be a multiple of 8 between 64 and 4096",
                    self.resolution
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.flip_probability) {
            return Err(Error::config("flip_probability", "must be within 0..=1"));
        }
        if self.batch_size == 0 || self.batch_size > 256 {
            return Err(Error::config(
                "batch_size",
                format!("{} is outside 1..=256", self.batch_size),
            ));
        }
        if self.gradient_accumulation == 0 {
            return Err(Error::config("gradient_accumulation", "must be at least 1"));
        }
        for (field, v) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                return Err(Error::config(field, format!("{v} is outside [0, 1)")));
            }
        }
        let eps_ok = self.adam_epsilon.is_finite() && self.adam_epsilon > 0.0;
        let wd_ok = self.weight_decay.is_finite() && self.weight_decay >= 0.0;
        if !(eps_ok && wd_ok) {
            return Err(Error::config(
                "adam_epsilon/weight_decay",
                "must be positive / non-negative",
            ));
        }
        if let Some(n) = self.max_grad_norm {
            if !n.is_finite() || n <= 0.0 {
                return Err(Error::config(
                    "max_grad_norm",
                    format!("{n} must be positive"),
                ));
            }
        }
        if self.clip_skip == 0 {
            return Err(Error::config("clip_skip", "must be at least 1"));
        }
        self.lr_schedule()?;
        Ok(())
    }

    /// The learning-rate schedule these options describe.
    pub fn lr_schedule(&self) -> Result<LrSchedule> {
        let bad = |e: LrScheduleError| Error::config("learning_rate", e.to_string());
        match &self.lr_scheduler {
            None => LrSchedule::parse(&self.learning_rate).map_err(bad),
            Some(name) => {
                let base: f64 = self.learning_rate.trim().parse().map_err(|_| {
                    Error::config(
                        "learning_rate",
                        format!(
                            "'{}' must be a number when lr_scheduler is '{name}'",
                            self.learning_rate
                        ),
                    )
                })?;
                LrSchedule::diffusers(name, base, self.lr_warmup_steps, self.max_steps).map_err(bad)
            }
        }
    }
}

/// What one optimizer step did.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct StepStats {
    /// Steps done so far (1 after the first).
    pub step: u64,
    /// Mean denoising loss over the step's samples.
    pub loss: f32,
    pub learning_rate: f64,
    pub seconds: f64,
}

/// One training image: the latent distributions of its views (original, flipped).
struct CachedImage {
    views: Vec<LatentDist>,
    caption: Option<String>,
}

/// The state that a checkpoint keeps beside the tensors.
#[derive(Serialize, Deserialize)]
struct CheckpointState {
    format: String,
    step: u64,
    rng_data: RngState,
    rng_noise: RngState,
    order: Vec<usize>,
    order_pos: usize,
    images: usize,
    config: TrainConfig,
    /// f16 runs: the dynamic loss scale (absent in checkpoints of other runs).
    #[serde(default)]
    loss_scale: Option<LossScale>,
}

/// Dynamic loss scaling for f16 models, as torch's `GradScaler` does it: the loss is
/// multiplied by `scale` before the backward pass (so that small gradients do not flush
/// to zero in f16) and the vectors' f32 gradient divided by it; a step whose gradient is
/// not finite (an f16 overflow) is skipped and the scale halved; after `GROWTH_INTERVAL`
/// good steps in a row the scale doubles.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    pub scale: f64,
    pub good_steps: u64,
}

impl LossScale {
    /// torch.amp.GradScaler's defaults: init_scale 2^16, growth_interval 2000.
    pub const INITIAL: f64 = 65536.0;
    pub const GROWTH_INTERVAL: u64 = 2000;

    fn new() -> Self {
        Self {
            scale: Self::INITIAL,
            good_steps: 0,
        }
    }

    /// Records a step; returns whether its update may be applied.
    fn update(&mut self, finite: bool) -> bool {
        if finite {
            self.good_steps += 1;
            if self.good_steps >= Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale = (self.scale / 2.0).max(1.0);
            self.good_steps = 0;
        }
        finite
    }
}

const CHECKPOINT_FORMAT: &str = "sdti-checkpoint/1";

/// A textual-inversion training run on one model.
pub struct Trainer {
    model: Arc<SdModel>,
    tokenizer: ClipTokenizer,
    config: TrainConfig,
    vectors: Var,
    optimizer: AdamW,
    step: u64,
    rng_data: Rng,
    rng_noise: Rng,
    order: Vec<usize>,
    order_pos: usize,
    images: Vec<CachedImage>,
    noise_schedule: NoiseSchedule,
    lr: LrSchedule,
    templates: TemplateSet,
    cancel: Arc<AtomicBool>,
    /// Present when the model computes in f16.
    loss_scale: Option<LossScale>,
}

fn rng_err(e: impl std::fmt::Display) -> Error {
    Error::config("rng state", e.to_string())
}

impl Trainer {
    /// Starts a run: validates the options and initialises the vectors.
    pub fn new(model: Arc<SdModel>, config: TrainConfig) -> Result<Self> {
        config.validate()?;
        let tokenizer =
            ClipTokenizer::new().map_err(|e| Error::input("tokenizer", e.to_string()))?;
        let noise_schedule = match config.prediction_type.as_deref() {
            None => model.config.scheduler.noise_schedule()?,
            Some(p) => SchedulerConfig {
                prediction_type: p.parse().map_err(|_| {
                    Error::config(
                        "prediction_type",
                        format!("'{p}' is not supported (epsilon or v_prediction)"),
                    )
                })?,
                ..model.config.scheduler.clone()
            }
            .noise_schedule()?,
        };
        let templates = match &config.templates {
            Templates::Object => TemplateSet::builtin(Builtin::Object),
            Templates::Style => TemplateSet::builtin(Builtin::Style),
            Templates::File(p) => {
                TemplateSet::from_file(p).map_err(|e| Error::config("templates", e.to_string()))?
            }
            Templates::List(l) => TemplateSet::custom(l.iter())
                .map_err(|e| Error::config("templates", e.to_string()))?,
        };
        let root = Rng::new(config.seed);
        let mut rng_init = root.fork(3);
        let init = initial_vectors(&model, &tokenizer, &config, &mut rng_init)?;
        let vectors = Var::from_tensor(&init)?;
        Ok(Self {
            lr: config.lr_schedule()?,
            tokenizer,
            vectors,
            optimizer: AdamW::new(
                config.adam_beta1,
                config.adam_beta2,
                config.adam_epsilon,
                config.weight_decay,
                config.max_grad_norm,
            ),
            step: 0,
            rng_data: root.fork(1),
            rng_noise: root.fork(2),
            order: Vec::new(),
            order_pos: 0,
            images: Vec::new(),
            noise_schedule,
            templates,
            cancel: Arc::new(AtomicBool::new(false)),
            loss_scale: (model.dtype() == DType::F16).then(LossScale::new),
            model,
            config,
        })
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The noise schedule the loss draws timesteps and coefficients from: the model's,
    /// with the run's `prediction_type` where it overrides the model's.
    pub fn noise_schedule(&self) -> &NoiseSchedule {
        &self.noise_schedule
    }

    pub fn model(&self) -> &Arc<SdModel> {
        &self.model
    }

    /// The dynamic loss scale of an f16 run (None in f32 and bf16).
    pub fn loss_scale(&self) -> Option<LossScale> {
        self.loss_scale
    }

    /// Sets the loss scale of an f16 run (ignored in f32 and bf16, which need none).
    pub fn set_loss_scale(&mut self, scale: LossScale) {
        if self.loss_scale.is_some() {
            self.loss_scale = Some(scale);
        }
    }

    /// Optimizer steps done.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The steps this run trains for (an A1111 schedule can end it early).
    pub fn total_steps(&self) -> u64 {
        self.lr.stop_step(self.config.max_steps)
    }

    pub fn image_count(&self) -> usize {
        self.images.len()
    }

    /// A flag that stops a running [`Trainer::train`] between micro-batches; safe to
    /// set from any thread.
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }

    /// The current vectors, `[vectors, dim]` f32 row-major.
    pub fn vectors(&self) -> Result<Vec<f32>> {
        Ok(self
            .vectors
            .as_tensor()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?)
    }

    pub fn vectors_tensor(&self) -> &Tensor {
        self.vectors.as_tensor()
    }

    /// The learned word as an embedding file (name, step, vectors, the model's file name).
    pub fn embedding(&self) -> Result<EmbeddingFile> {
        let data = self.vectors()?;
        let dim = self.model.config.text_encoder.hidden_size;
        let model_name = self
            .model
            .source
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned());
        Ok(EmbeddingFile {
            name: Some(self.config.token.clone()),
            step: Some(self.step),
            sd_checkpoint: None,
            sd_checkpoint_name: model_name,
            parts: vec![EmbeddingPart {
                encoder: Encoder::Single,
                vectors: data.len() / dim,
                dim,
                data,
            }],
            source_format: Format::A1111Safetensors,
        })
    }

    /// Writes the learned word to `path` in `format` (atomically), replacing what is at
    /// `path` only when `existing` says so.
    pub fn export(
        &self,
        path: &Path,
        format: Format,
        precision: Precision,
        existing: Existing,
    ) -> Result<()> {
        Ok(write_embedding_to(
            path,
            &self.embedding()?,
            format,
            precision,
            existing,
        )?)
    }

    /// Adds a training image: prepared at the training resolution, each view (the image
    /// and its mirror) encoded by the VAE once, its latent distribution kept.
    pub fn add_image(&mut self, source: ImageSource, caption: Option<String>) -> Result<()> {
        let crop = if self.config.random_crop {
            CropMode::Random
        } else {
            CropMode::Center
        };
        // One crop stream per image, so that the same images give the same crops after resume.
        let mut crop_rng = Rng::new(self.config.seed).fork(1000 + self.images.len() as u64);
        let resolution = u32::try_from(self.config.resolution)
            .map_err(|_| Error::config("resolution", "is too large"))?;
        let image = TrainImage { source, caption };
        // The data module's errors already name the file (or in-memory image) and field.
        let views = prepare_views(&image, resolution, crop, &mut crop_rng)
            .map_err(|e| Error::input("training image", e.to_string()))?;
        let res = self.config.resolution;
        let device = self.model.device().clone();
        let dtype = self.model.dtype();
        let mut dists = Vec::with_capacity(views.len());
        let mut caption_out = None;
        for view in &views {
            let pixels = Tensor::from_slice(&view.chw, (1, 3, res, res), &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(&device)?;
            dists.push(self.model.vae.encode(&pixels)?);
            if caption_out.is_none() {
                caption_out = view.caption.clone();
            }
        }
        if dists.is_empty() {
            return Err(Error::input("image", "no view could be prepared"));
        }
        self.images.push(CachedImage {
            views: dists,
            caption: caption_out,
        });
        Ok(())
    }

    /// Adds a training sample given as latent distributions (unscaled VAE latents,
    /// `[1, C, h, w]` each, the image then optionally its mirror), for hosts that encode
    /// images themselves.
    pub fn add_latents(&mut self, views: Vec<LatentDist>, caption: Option<String>) -> Result<()> {
        let expected = self.config.resolution / 8;
        for v in &views {
            let d = v.mean.dims();
            if d.len() != 4
                || d[0] != 1
                || d[2] != expected
                || d[3] != expected
                || v.logvar.dims() != d
            {
                return Err(Error::input(
                    "latents",
                    format!(
                        "shape {d:?}: expected [1, C, {expected}, {expected}] for mean and logvar"
                    ),
                ));
            }
        }
        if views.is_empty() {
            return Err(Error::input("latents", "no views given"));
        }
        self.images.push(CachedImage { views, caption });
        Ok(())
    }

    fn next_image(&mut self) -> usize {
        if self.order_pos >= self.order.len() || self.order.len() != self.images.len() {
            self.order = (0..self.images.len()).collect();
            self.rng_data.shuffle(&mut self.order);
            self.order_pos = 0;
        }
        let i = self.order[self.order_pos];
        self.order_pos += 1;
        i
    }

    fn normal(&mut self, shape: &[usize]) -> Result<Tensor> {
        let mut data = vec![0f32; shape.iter().product()];
        self.rng_noise.fill_normal(&mut data);
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?
            .to_dtype(self.model.dtype())?
            .to_device(self.model.device())?)
    }

    /// One micro-batch: returns its loss and its gradient on the vectors.
    fn micro_batch(&mut self) -> Result<(f32, Tensor)> {
        let b = self.config.batch_size;
        let mut latents = Vec::with_capacity(b);
        let mut timesteps = Vec::with_capacity(b);
        let mut prompts = Vec::with_capacity(b);
        for _ in 0..b {
            let i = self.next_image();
            let flipped = self.config.flip_probability > 0.0
                && self.images[i].views.len() > 1
                && self.rng_data.bernoulli(self.config.flip_probability);
            let dist = self.images[i].views[usize::from(flipped)].clone();
            let caption = self.images[i].caption.clone();
            prompts.push(self.templates.choose(
                &mut self.rng_data,
                &self.config.token,
                caption.as_deref(),
            ));
            let eps = self.normal(dist.mean.dims())?;
            latents.push(self.model.vae.scale(&dist.sample_with(&eps)?)?);
            timesteps.push(self.noise_schedule.random_timestep(&mut self.rng_noise));
        }
        let latents = Tensor::cat(&latents, 0)?;
        let noise = self.normal(latents.dims())?;
        let words = [Word {
            name: self.config.token.clone(),
            vectors: self.config.vectors,
            offset: 0,
        }];
        let enc = encode_prompts(
            &self.tokenizer,
            &prompts,
            &words,
            ChunkStyle::A1111,
            self.model.device(),
        )?;
        let injection = Injection {
            table: self.vectors.as_tensor(),
            index: &enc.index,
            mask: &enc.mask,
        };
        let batch = DenoisingBatch {
            latents: &latents,
            noise: &noise,
            timesteps: &timesteps,
            ids: &enc.ids,
            injection: Some(&injection),
            clip_skip: self.config.clip_skip,
        };
        let loss = denoising_loss(&self.model, &batch, &self.noise_schedule)?;
        let scale = self.loss_scale.map_or(1.0, |s| s.scale);
        let grads = if scale == 1.0 {
            loss.backward()?
        } else {
            (&loss * scale)?.backward()?
        };
        let grad = match grads.get(self.vectors.as_tensor()) {
            Some(g) if scale == 1.0 => g.clone(),
            Some(g) => (g / scale)?,
            // The word did not occur in any prompt (a template without [name]).
            None => self.vectors.as_tensor().zeros_like()?,
        };
        Ok((loss.to_dtype(DType::F32)?.to_scalar::<f32>()?, grad))
    }

    /// Runs `accum` micro-batches: the mean gradient and the summed loss.
    fn accumulate(&mut self, accum: usize) -> Result<(Tensor, f32)> {
        let mut grad_sum: Option<Tensor> = None;
        let mut loss_sum = 0f32;
        for _ in 0..accum {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            let (loss, grad) = self.micro_batch()?;
            loss_sum += loss;
            grad_sum = Some(match grad_sum {
                Some(s) => (s + grad)?,
                None => grad,
            });
        }
        match grad_sum {
            Some(g) => Ok(((g / accum as f64)?, loss_sum)),
            None => Err(Error::input("training", "no micro-batch ran")),
        }
    }

    /// One optimizer step (all micro-batches, clipping, AdamW).
    pub fn step(&mut self) -> Result<StepStats> {
        if self.images.is_empty() {
            return Err(Error::input("training", "no images were added"));
        }
        let start = Instant::now();
        let accum = self.config.gradient_accumulation;
        // A step that fails or is cancelled leaves no trace: the random streams and the
        // data order go back to where the step began, so a checkpoint written after a
        // cancel resumes exactly like an uninterrupted run.
        let saved = (
            self.rng_data.state(),
            self.rng_noise.state(),
            self.order.clone(),
            self.order_pos,
        );
        let (grad, loss_sum) = match self.accumulate(accum) {
            Ok(v) => v,
            Err(e) => {
                let (data, noise, order, pos) = saved;
                self.rng_data = Rng::from_state(data).map_err(rng_err)?;
                self.rng_noise = Rng::from_state(noise).map_err(rng_err)?;
                self.order = order;
                self.order_pos = pos;
                return Err(e);
            }
        };
        let lr = self.lr.lr_at(self.step);
        let finite = grad
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?
            .is_finite();
        let apply = match self.loss_scale.as_mut() {
            Some(s) => s.update(finite),
            None if finite => true,
            None => {
                return Err(Error::input(
                    "training",
                    format!(
                    "step {}: the gradient is not finite (loss {}); the vectors were not changed",
                    self.step + 1,
                    loss_sum / accum as f32
                ),
                ))
            }
        };
        if apply {
            let updated = self.optimizer.update(self.vectors.as_tensor(), &grad, lr)?;
            self.vectors.set(&updated)?;
        }
        self.step += 1;
        Ok(StepStats {
            step: self.step,
            loss: loss_sum / accum as f32,
            learning_rate: lr,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Up to `n` steps (stopping at the run's end); `progress` sees each step and stops
    /// the run by returning false.
    pub fn train(
        &mut self,
        n: u64,
        mut progress: impl FnMut(&StepStats) -> bool,
    ) -> Result<Vec<StepStats>> {
        let mut out = Vec::new();
        let end = self.total_steps();
        for _ in 0..n {
            if self.step >= end {
                break;
            }
            let stats = self.step()?;
            out.push(stats);
            if !progress(&stats) {
                break;
            }
        }
        Ok(out)
    }

    /// Writes the vectors, the optimizer moments, the step, the RNG states and the
    /// options to `path`, atomically (a temporary file renamed over it).
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let state = CheckpointState {
            format: CHECKPOINT_FORMAT.into(),
            step: self.step,
            rng_data: self.rng_data.state(),
            rng_noise: self.rng_noise.state(),
            order: self.order.clone(),
            order_pos: self.order_pos,
            images: self.images.len(),
            config: self.config.clone(),
            loss_scale: self.loss_scale,
        };
        let json = serde_json::to_string(&state).map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let tensors: HashMap<String, Tensor> = [(
            "vectors".to_string(),
            self.vectors
                .as_tensor()
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?,
        )]
        .into_iter()
        .chain(self.optimizer.moments()?)
        .collect();
        let mut meta = HashMap::new();
        meta.insert("sdti.checkpoint".to_string(), json);
        let bytes = serialize_tensors(&tensors, meta).map_err(|reason| Error::Checkpoint {
            path: path.to_path_buf(),
            reason,
        })?;
        crate::io::write_atomic(path, &bytes)
    }

    /// Restores a checkpoint written by [`Trainer::save_checkpoint`] of a run with the
    /// same options and the same images (added before this call, in the same order).
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<()> {
        let err = |reason: String| Error::Checkpoint {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = crate::io::read::read_bounded(path, &crate::io::read::TRAINING_CHECKPOINT)?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| err(format!("not a safetensors file: {e}")))?;
        let json = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("sdti.checkpoint"))
            .ok_or_else(|| err("no 'sdti.checkpoint' metadata: not an sdti checkpoint".into()))?;
        let state: CheckpointState =
            serde_json::from_str(json).map_err(|e| err(format!("unreadable state: {e}")))?;
        if state.format != CHECKPOINT_FORMAT {
            return Err(err(format!(
                "format '{}' is not {CHECKPOINT_FORMAT}",
                state.format
            )));
        }
        if state.config != self.config {
            return Err(err("it was written by a run with other options".into()));
        }
        if state.images != self.images.len() {
            return Err(err(format!(
                "it was written with {} images, this run has {}",
                state.images,
                self.images.len()
            )));
        }
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
        let get = |name: &str| -> Result<Tensor> {
            let t = tensors
                .get(name)
                .ok_or_else(|| err(format!("tensor '{name}' is missing")))?;
            if t.dims() != self.vectors.as_tensor().dims() {
                return Err(err(format!("tensor '{name}' has shape {:?}", t.dims())));
            }
            Ok(t.to_dtype(DType::F32)?.to_device(self.model.device())?)
        };
        let vectors = get("vectors")?;
        // A checkpoint written before the first step has no moments yet.
        if state.step > 0 || tensors.contains_key("adam.m") {
            self.optimizer
                .restore(get("adam.m")?, get("adam.v")?, state.step);
        }
        self.vectors
            .set(&vectors.to_dtype(self.vectors.as_tensor().dtype())?)?;
        self.step = state.step;
        if self.loss_scale.is_some() {
            self.loss_scale = Some(state.loss_scale.unwrap_or_else(LossScale::new));
        }
        self.rng_data = Rng::from_state(state.rng_data).map_err(rng_err)?;
        self.rng_noise = Rng::from_state(state.rng_noise).map_err(rng_err)?;
        self.order = state.order;
        self.order_pos = state.order_pos;
        Ok(())
    }
}

/// torch.optim.AdamW on one f32 tensor, step for step: decoupled weight decay,
/// bias-corrected moments, optional `clip_grad_norm_` first.
pub struct AdamW {
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    max_grad_norm: Option<f64>,
    m: Option<Tensor>,
    v: Option<Tensor>,
    steps: u64,
}

impl AdamW {
    pub fn new(
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        max_grad_norm: Option<f64>,
    ) -> Self {
        Self {
            beta1,
            beta2,
            eps,
            weight_decay,
            max_grad_norm,
            m: None,
            v: None,
            steps: 0,
        }
    }

    /// The parameter after one step with gradient `grad` at learning rate `lr`.
    pub fn update(&mut self, param: &Tensor, grad: &Tensor, lr: f64) -> Result<Tensor> {
        let grad = grad.to_dtype(DType::F32)?;
        let grad = match self.max_grad_norm {
            Some(max) => {
                let norm = grad.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
                // clip_grad_norm_ scales by max / (norm + 1e-6) when that is below 1.
                let scale = (max / (norm + 1e-6)).min(1.0);
                (grad * scale)?
            }
            None => grad,
        };
        let zeros = || grad.zeros_like();
        let m = match &self.m {
            Some(m) => m.clone(),
            None => zeros()?,
        };
        let v = match &self.v {
            Some(v) => v.clone(),
            None => zeros()?,
        };
        self.steps += 1;
        let t = i32::try_from(self.steps).unwrap_or(i32::MAX);
        let (b1, b2) = (self.beta1, self.beta2);
        let m = ((m * b1)? + (&grad * (1.0 - b1))?)?;
        let v = ((v * b2)? + (grad.sqr()? * (1.0 - b2))?)?;
        let bias1 = 1.0 - b1.powi(t);
        let bias2_sqrt = (1.0 - b2.powi(t)).sqrt();
        let decayed = (param.to_dtype(DType::F32)? * (1.0 - lr * self.weight_decay))?;
        let denom = ((v.sqrt()? / bias2_sqrt)? + self.eps)?;
        let update = ((&m / denom)? * (lr / bias1))?;
        self.m = Some(m);
        self.v = Some(v);
        Ok((decayed - update)?.to_dtype(param.dtype())?)
    }

    /// The first and second moments as named CPU tensors (zeros before the first step).
    fn moments(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (name, t) in [("adam.m", &self.m), ("adam.v", &self.v)] {
            if let Some(t) = t {
                out.push((name.to_string(), t.to_device(&Device::Cpu)?));
            }
        }
        Ok(out)
    }

    fn restore(&mut self, m: Tensor, v: Tensor, steps: u64) {
        self.m = Some(m);
        self.v = Some(v);
        self.steps = steps;
    }
}

/// The initial `[vectors, dim]` f32 table.
fn initial_vectors(
    model: &SdModel,
    tokenizer: &ClipTokenizer,
    config: &TrainConfig,
    rng: &mut Rng,
) -> Result<Tensor> {
    let table = model.text_encoder.token_table();
    let dim = table.dim(1)?;
    let n = config.vectors;
    let device = model.device();
    match &config.init {
        Init::Zeros => Ok(Tensor::zeros((n, dim), DType::F32, device)?),
        Init::Random => {
            let std = table.to_dtype(DType::F32)?.flatten_all()?;
            let mean = std.mean_all()?;
            let std = std
                .broadcast_sub(&mean)?
                .sqr()?
                .mean_all()?
                .sqrt()?
                .to_scalar::<f32>()?;
            let mut data = vec![0f32; n * dim];
            rng.fill_normal(&mut data);
            for v in &mut data {
                *v *= std;
            }
            Ok(Tensor::from_vec(data, (n, dim), device)?)
        }
        Init::Text(text) => {
            let ids = tokenizer.encode(text);
            if ids.is_empty() {
                return Err(Error::config(
                    "init",
                    format!("the init text '{text}' has no tokens: give at least one word"),
                ));
            }
            // A1111's create_embedding: vector i is the token vector of token i mod len.
            let picks: Vec<u32> = (0..n).map(|i| ids[i % ids.len()]).collect();
            let idx = Tensor::from_vec(picks, n, device)?;
            Ok(table.index_select(&idx, 0)?.to_dtype(DType::F32)?)
        }
    }
}

/// safetensors bytes of `tensors` (f32, CPU) with string metadata.
fn serialize_tensors(
    tensors: &HashMap<String, Tensor>,
    meta: HashMap<String, String>,
) -> std::result::Result<Vec<u8>, String> {
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in tensors {
        let values: Vec<f32> = t
            .flatten_all()
            .and_then(|f| f.to_vec1())
            .map_err(|e| e.to_string())?;
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        data.push((name.clone(), t.dims().to_vec(), bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(n, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| e.to_string())
        })
        .collect::<std::result::Result<_, _>>()?;
    safetensors::serialize(views, Some(meta)).map_err(|e| e.to_string())
}
