//! The training loop: cached latents, the denoising step, AdamW on the learned vectors,
//! atomic checkpoints and exact resume.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;

use super::config::{
    BudgetSource, Init, MemoryBudget, RecomputeChoice, RecomputeMode, Templates, TrainConfig,
};
use super::data::{prepare_views, CropMode, ImageSource, SizeCond, TrainImage};
use super::loss::{denoising_loss_with, DenoisingBatch};
use super::lr_schedule::LrSchedule;
use super::optimizer::{AdamW, LossScale};
use super::templates::{fill, Builtin, TemplateSet};
use crate::embedding::{
    write_embedding_to, EmbeddingFile, EmbeddingPart, Encoder, Existing, Format, Precision,
};
use crate::error::{Error, Result};
use crate::model::awake::awake;
use crate::model::clip::split_columns;
use crate::model::memory::{
    available_bytes, recompute_order, return_free_memory, token_table_bytes, transformer_count,
    vae_bytes, StepMemory,
};
use crate::model::{Injection, LatentDist, NoiseSchedule, Recompute, SdModel, TextEncoder};
use crate::prompt::chunks::ChunkStyle;
use crate::prompt::{encode_prompts, Word};
use crate::rng::Rng;
use crate::tokenizer::ClipTokenizer;

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

/// One view of a training image: its latent distribution and, for SDXL's time ids, where
/// its pixels came from.
#[derive(Clone)]
pub(super) struct CachedView {
    dist: LatentDist,
    size: SizeCond,
}

/// One training image: its views (original, flipped).
pub(super) struct CachedImage {
    views: Vec<CachedView>,
    caption: Option<String>,
}

/// A textual-inversion training run on one model.
pub struct Trainer {
    pub(super) model: Arc<SdModel>,
    pub(super) tokenizer: ClipTokenizer,
    pub(super) config: TrainConfig,
    /// The learned vectors, `[n, sum of widths]`: one table per text encoder side by side
    /// (SD 1.x/2.x: the one table; SDXL: `[clip_l ‖ clip_g]` per row, `[n, 768 + 1280]`).
    /// One tensor for all, so that AdamW, elementwise, steps each table exactly as it
    /// would alone, and `max_grad_norm` clips the joint norm of both (torch's
    /// `clip_grad_norm_([l, g])`); each encoder's injection is its column range.
    pub(super) vectors: Var,
    /// Each text encoder's width, in conditioning order (SDXL: L then G).
    pub(super) widths: Vec<usize>,
    pub(super) optimizer: AdamW,
    pub(super) step: u64,
    pub(super) rng_data: Rng,
    pub(super) rng_noise: Rng,
    pub(super) order: Vec<usize>,
    pub(super) order_pos: usize,
    pub(super) images: Vec<CachedImage>,
    pub(super) noise_schedule: NoiseSchedule,
    pub(super) lr: LrSchedule,
    pub(super) templates: TemplateSet,
    pub(super) cancel: Arc<AtomicBool>,
    /// Present when the model computes in f16.
    pub(super) loss_scale: Option<LossScale>,
    /// How the UNet's blocks treat their activations: a runtime choice, not an option of
    /// the run ([`RecomputeMode`] says why).
    pub(super) recompute: Recompute,
    /// The token ids the run's prompts can hold (every template filled with the word
    /// and each image's caption), and how many of the images they cover: the rows of the
    /// token tables a step keeps ([`SdModel::release_token_tables`]).
    pub(super) prompt_tokens: (usize, BTreeSet<u32>),
}

impl Trainer {
    /// Starts a run: validates the options and initialises the vectors.
    pub fn new(model: Arc<SdModel>, mut config: TrainConfig) -> Result<Self> {
        config.validate()?;
        // Checked here, against the model, rather than at the first step; unset, the
        // family's default, recorded in the config (and so in checkpoints).
        let depth = model.text_encoder.full_depth();
        if let Some(n) = config.clip_skip.filter(|&n| n > depth) {
            return Err(Error::config(
                "clip_skip",
                format!("{n} is more than this text encoder's {depth} layers"),
            ));
        }
        let conditioning = model.text_encoder.conditioning(config.clip_skip)?;
        if let Some(second) = &model.text_encoder_2 {
            second.conditioning(Some(conditioning.clip_skip))?;
        }
        config.clip_skip = Some(conditioning.clip_skip);
        // Unset, the family's resolution, recorded like clip_skip.
        config.resolution = Some(config.resolution_for(&model.config));
        let tokenizer = ClipTokenizer::new()?;
        let noise_schedule = config.scheduler_for(&model.config).noise_schedule()?;
        let templates = match &config.templates {
            Templates::Object => TemplateSet::builtin(Builtin::Object),
            Templates::Style => TemplateSet::builtin(Builtin::Style),
            Templates::File(p) => TemplateSet::from_file(p)?,
            Templates::List(l) => TemplateSet::custom(l.iter())?,
        };
        let root = Rng::new(config.seed);
        let mut rng_init = root.fork(3);
        let encoders = model.text_encoders();
        let widths = encoders.iter().map(|e| e.config().hidden_size).collect();
        let init = encoders
            .iter()
            .map(|e| initial_vectors(e, &model, &tokenizer, &config, &mut rng_init))
            .collect::<Result<Vec<_>>>()?;
        let vectors = Var::from_tensor(&Tensor::cat(&init, 1)?)?;
        let mut trainer = Self {
            lr: config.lr_schedule()?,
            tokenizer,
            vectors,
            widths,
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
            recompute: Recompute::Off,
            prompt_tokens: (0, BTreeSet::new()),
            model,
            config,
        };
        // The templates' tokens are known now: the whole tables are freed before the
        // images' encoding, the process's peak at 512 px, rather than at the first step.
        let no_caption = trainer.prompt_ids(None)?;
        trainer.prompt_tokens.1.extend(no_caption);
        trainer.release_token_tables()?;
        Ok(trainer)
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The clip skip the run conditions on: the config's, or the model family's default
    /// ([`Trainer::new`] fills the config's in).
    pub fn clip_skip(&self) -> usize {
        self.config
            .clip_skip
            .unwrap_or_else(|| self.model.text_encoder.default_conditioning().clip_skip)
    }

    /// The training resolution in pixels: the config's, or the model family's default
    /// ([`Trainer::new`] fills the config's in; [`TrainConfig::family_resolution`]).
    pub fn resolution(&self) -> usize {
        self.config.resolution_for(&self.model.config)
    }

    /// The noise schedule the loss draws timesteps and coefficients from: the model's,
    /// with the run's `prediction_type` where it overrides the model's.
    pub fn noise_schedule(&self) -> &NoiseSchedule {
        &self.noise_schedule
    }

    /// Whether the run's noise schedule is rescaled to zero terminal SNR: the config's
    /// `zero_terminal_snr` where given, else the model's.
    pub fn zero_terminal_snr(&self) -> bool {
        self.config
            .scheduler_for(&self.model.config)
            .rescale_betas_zero_snr
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

    /// Whether the steps recompute the UNet blocks' activations (Off until set).
    pub fn recompute(&self) -> Recompute {
        self.recompute
    }

    /// Sets recompute for the following steps; the numbers stay the same, bit for bit.
    pub fn set_recompute(&mut self, recompute: Recompute) {
        self.recompute = recompute;
    }

    /// The estimated peak memory of one of this run's steps (see
    /// [`crate::model::memory`]).
    pub fn step_memory(&self, recompute: Recompute) -> StepMemory {
        let latent = self.resolution() / 8;
        let mut m = StepMemory::estimate(
            &self.model.config,
            self.config.batch_size,
            latent,
            latent,
            self.model.dtype().size_in_bytes(),
            recompute,
        );
        if !self.model.vae_releasable() {
            m.weights += vae_bytes(&self.model.config, self.model.vae_dtype().size_in_bytes());
        }
        if !self.model.token_tables_releasable() {
            m.weights += token_table_bytes(&self.model.config);
        }
        m
    }

    /// Decides recompute for this run, once, before training: `mode` off or on as given;
    /// auto compares the estimated peak of a step without recompute with `budget_mib`
    /// (MiB for the whole process), or without one with what the device has available
    /// now ([`available_bytes`]), and recomputes only when the step would not fit, then
    /// only as many of the UNet's transformers as it takes to fit (in the order of
    /// [`recompute_order`]), or every block when that is not enough. Returns the decision
    /// and its grounds, for the caller to show.
    pub fn choose_recompute(
        &mut self,
        mode: RecomputeMode,
        budget_mib: Option<u64>,
    ) -> RecomputeChoice {
        let off = self.step_memory(Recompute::Off);
        let on = self.step_memory(Recompute::On);
        let budget = match budget_mib {
            Some(mib) => Some(MemoryBudget {
                bytes: mib.saturating_mul(1 << 20),
                source: BudgetSource::Given,
            }),
            None if mode == RecomputeMode::Auto => {
                available_bytes(self.model.device(), off.weights).map(|bytes| MemoryBudget {
                    bytes,
                    source: BudgetSource::Available,
                })
            }
            None => None,
        };
        let latent = self.resolution() / 8;
        let order = recompute_order(
            &self.model.config.unet,
            self.config.batch_size,
            latent,
            latent,
        );
        let mut mask = 0u32;
        let partial: Vec<(Recompute, u64)> = order
            .iter()
            .map(|&i| {
                mask |= 1 << i;
                let r = Recompute::Transformers(mask);
                (r, self.step_memory(r).total())
            })
            .collect();
        let count = transformer_count(&self.model.config.unet);
        let choice =
            RecomputeChoice::decide(mode, off.total(), on.total(), &partial, count, budget);
        self.recompute = choice.recompute;
        choice
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

    /// The current vectors, `[vectors, dim]` f32 row-major, `dim` the sum of the text
    /// encoders' widths: for SDXL each row is `[clip_l ‖ clip_g]` (768 + 1280);
    /// [`Trainer::vector_parts`] gives each encoder's table.
    pub fn vectors(&self) -> Result<Vec<f32>> {
        Ok(self
            .vectors
            .as_tensor()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?)
    }

    /// The learned table, `[vectors, dim]` ([`Trainer::vectors`] says what `dim` is).
    pub fn vectors_tensor(&self) -> &Tensor {
        self.vectors.as_tensor()
    }

    /// Each text encoder's width, in conditioning order (SD 1.x: `[768]`, SD 2.x:
    /// `[1024]`, SDXL: `[768, 1280]`).
    pub fn part_widths(&self) -> &[usize] {
        &self.widths
    }

    /// Each text encoder's learned table, `[vectors, width]` f32 row-major, in
    /// conditioning order (SDXL: `clip_l` then `clip_g`), as
    /// [`crate::prompt::encoder::PromptEncoder::register_parts`] takes them.
    pub fn vector_parts(&self) -> Result<Vec<Vec<f32>>> {
        self.part_tensors()?
            .iter()
            .map(|t| Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?))
            .collect()
    }

    /// The column range of each encoder's table in the joint one.
    fn part_tensors(&self) -> Result<Vec<Tensor>> {
        split_columns(self.vectors.as_tensor(), &self.widths)
    }

    /// The learned word as an embedding file (name, step, vectors, the model's file name):
    /// one part for SD 1.x/2.x, `clip_l` and `clip_g` for SDXL.
    pub fn embedding(&self) -> Result<EmbeddingFile> {
        let labels: Vec<Encoder> = self
            .model
            .text_encoders()
            .iter()
            .map(|e| e.encoder())
            .collect();
        let parts = self
            .vector_parts()?
            .into_iter()
            .zip(self.widths.iter().zip(labels))
            .map(|(data, (&dim, encoder))| EmbeddingPart {
                encoder,
                vectors: data.len() / dim,
                dim,
                data,
            })
            .collect();
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
            parts,
            source_format: Format::A1111Safetensors,
        })
    }

    /// The SDXL time ids `(orig_h, orig_w, crop_top, crop_left, target_h, target_w)` the
    /// steps give the UNet for view `view` (0 the image, 1 its mirror) of image `image`
    /// (in the order added): the view's [`SizeCond`] at the training resolution, in f32
    /// (never rounded to half precision: diffusers' example casts them to bf16, which
    /// moves e.g. 1365 to 1368). `None` for an image or view that is not there.
    pub fn time_ids(&self, image: usize, view: usize) -> Option<[f32; 6]> {
        let v = self.images.get(image)?.views.get(view)?;
        let res = u32::try_from(self.resolution()).ok()?;
        Some(v.size.time_ids(res).map(|x| x as f32))
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
        let res = self.resolution();
        let resolution =
            u32::try_from(res).map_err(|_| Error::config("resolution", "is too large"))?;
        let image = TrainImage { source, caption };
        // The data module's errors already name the file (or in-memory image) and field.
        let views = prepare_views(&image, resolution, crop, &mut crop_rng)?;
        let device = self.model.device().clone();
        let awake = awake(&device)?;
        // The VAE's dtype: f32 for SDXL's f16 models (crate::model::vae_dtype).
        let vae = self.model.vae()?;
        let dtype = vae.dtype();
        let mut dists = Vec::with_capacity(views.len());
        let mut caption_out = None;
        for view in &views {
            let pixels = Tensor::from_slice(&view.chw, (1, 3, res, res), &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(&device)?;
            dists.push(CachedView {
                dist: awake.run(|| vae.encode(&pixels))?,
                size: view.size,
            });
            // The encoding's work is freed; the next view's (or the first step's) peak
            // starts from the memory given back.
            return_free_memory();
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
    ///
    /// SDXL's time ids of such a sample are `(res, res, 0, 0, res, res)` for both views
    /// (`res` the training resolution): the latents say nothing of the source image's
    /// size or crop, so they are taken as a square image at the training resolution,
    /// uncropped, as diffusers' pipelines condition by default.
    pub fn add_latents(&mut self, views: Vec<LatentDist>, caption: Option<String>) -> Result<()> {
        let res = self.resolution();
        let expected = res / 8;
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
        let side = u32::try_from(res).map_err(|_| Error::config("resolution", "is too large"))?;
        let size = SizeCond {
            original: (side, side),
            crop_top_left: (0, 0),
        };
        let views = views
            .into_iter()
            .map(|dist| CachedView { dist, size })
            .collect();
        self.images.push(CachedImage { views, caption });
        Ok(())
    }

    /// Frees the text encoders' token tables but the rows of the tokens the run's
    /// prompts can hold, which [`Trainer::micro_batch`] then embeds from those rows.
    fn release_token_tables(&mut self) -> Result<()> {
        // Captions reach the prompts only through `[filewords]`; without it the templates'
        // tokens, known from the start, are all.
        let covered = self.prompt_tokens.0;
        if self.templates.uses_filewords() {
            for i in covered..self.images.len() {
                let ids = self.prompt_ids(self.images[i].caption.as_deref())?;
                self.prompt_tokens.1.extend(ids);
            }
        }
        self.prompt_tokens.0 = self.images.len();
        let keep: Vec<u32> = self.prompt_tokens.1.iter().copied().collect();
        self.model.release_token_tables(&keep)?;
        Ok(())
    }

    /// The learned word as the prompts' encoder takes it.
    fn words(&self) -> [Word; 1] {
        [Word {
            name: self.config.token.clone(),
            vectors: self.config.vectors,
            offset: 0,
        }]
    }

    /// The token ids of every template filled with the word and `caption`, as
    /// [`Trainer::micro_batch`] encodes them.
    fn prompt_ids(&self, caption: Option<&str>) -> Result<Vec<u32>> {
        let words = self.words();
        let prompts: Vec<String> = self
            .templates
            .templates()
            .iter()
            .map(|t| fill(t, &self.config.token, caption))
            .collect();
        let enc = encode_prompts(
            &self.tokenizer,
            &prompts,
            &words,
            ChunkStyle::A1111,
            &Device::Cpu,
        )?;
        Ok(enc.ids.flatten_all()?.to_vec1::<u32>()?)
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

    /// Standard normal noise in the model's dtype.
    fn normal(&mut self, shape: &[usize]) -> Result<Tensor> {
        self.normal_in(shape, self.model.dtype())
    }

    fn normal_in(&mut self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let mut data = vec![0f32; shape.iter().product()];
        self.rng_noise.fill_normal(&mut data);
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(self.model.device())?)
    }

    /// One micro-batch: returns its loss and its gradient on the vectors.
    fn micro_batch(&mut self) -> Result<(f32, Tensor)> {
        let b = self.config.batch_size;
        let mut latents = Vec::with_capacity(b);
        let mut timesteps = Vec::with_capacity(b);
        let mut prompts = Vec::with_capacity(b);
        let mut time_ids: Vec<f32> = Vec::with_capacity(6 * b);
        for _ in 0..b {
            let i = self.next_image();
            let flipped = self.config.flip_probability > 0.0
                && self.images[i].views.len() > 1
                && self.rng_data.bernoulli(self.config.flip_probability);
            let view = usize::from(flipped);
            time_ids.extend(
                self.time_ids(i, view)
                    .ok_or_else(|| Error::input("training", "a cached view is missing"))?,
            );
            let dist = self.images[i].views[view].dist.clone();
            let caption = self.images[i].caption.clone();
            prompts.push(self.templates.choose(
                &mut self.rng_data,
                &self.config.token,
                caption.as_deref(),
            ));
            // Drawn in the latents' dtype (the VAE's: f32 for SDXL's f16 models); the loss
            // converts the sample to the UNet's.
            let eps = self.normal_in(dist.mean.dims(), dist.mean.dtype())?;
            latents.push(self.model.scale_latents(&dist.sample_with(&eps)?)?);
            timesteps.push(self.noise_schedule.random_timestep(&mut self.rng_noise));
        }
        let latents = Tensor::cat(&latents, 0)?;
        let noise = self.normal(latents.dims())?;
        let words = self.words();
        let enc = encode_prompts(
            &self.tokenizer,
            &prompts,
            &words,
            ChunkStyle::A1111,
            self.model.device(),
        )?;
        // One injection per text encoder, each its own columns of the joint table (SD 1.x
        // and 2.x: the whole table, as it is).
        let tables = self.part_tensors()?;
        let injections = Injection::per_table(&tables, &enc.index, &enc.mask);
        let injections: Vec<Option<&Injection<'_>>> = injections.iter().map(Some).collect();
        // SDXL's size and crop conditioning, f32 on the model's device.
        let time_ids = if self.model.unet.takes_added_cond() {
            Some(Tensor::from_vec(time_ids, (b, 6), self.model.device())?)
        } else {
            None
        };
        let batch = DenoisingBatch {
            latents: &latents,
            noise: &noise,
            timesteps: &timesteps,
            ids: &enc.ids,
            injections: &injections,
            time_ids: time_ids.as_ref(),
            clip_skip: self.clip_skip(),
        };
        let loss = denoising_loss_with(&self.model, &batch, &self.noise_schedule, self.recompute)?;
        // The forward pass's work is freed and the backward pass's start is the step's
        // peak (everything the blocks kept).
        return_free_memory();
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
        // A step reads only the cached latents: the VAE's memory goes to its activations
        // (it comes back for a preview or a new image). The token tables keep only the
        // run's prompts' rows, those of images' captions added since the last step too
        // (a table read again in between, by a preview or a host, is freed again).
        self.model.release_vae();
        self.release_token_tables()?;
        let awake = awake(self.model.device())?;
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
        let (grad, loss_sum) = match awake.run(|| self.accumulate(accum)) {
            Ok(v) => v,
            Err(e) => {
                let (data, noise, order, pos) = saved;
                self.rng_data = Rng::from_state(data)?;
                self.rng_noise = Rng::from_state(noise)?;
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
}

/// The initial `[vectors, width]` f32 table of one text encoder: the init text's token
/// rows of this encoder's table (SDXL: the same token ids in both), or Gaussian with its
/// table's standard deviation (SDXL: L's draws, then G's, from the one stream).
fn initial_vectors(
    encoder: &TextEncoder,
    model: &SdModel,
    tokenizer: &ClipTokenizer,
    config: &TrainConfig,
    rng: &mut Rng,
) -> Result<Tensor> {
    let table = encoder.token_table()?;
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
