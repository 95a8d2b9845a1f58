//! Training-grade Stable Diffusion model code (SD 1.x, SD 2.x, SDXL) on candle tensors.

pub mod awake;
pub mod clip;
pub mod config;
pub mod files;
pub mod layers;
pub mod memory;
pub mod profile;
pub mod random;
mod resnet;
pub mod scheduler;
#[cfg(test)]
mod test_weights;
pub mod text_encoder;
mod transformer;
pub mod unet;
pub mod vae;
pub mod weights;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use candle_core::{DType, Device};

pub use clip::{ClipTextTransformer, Injection};
pub use config::{ClipConfig, ModelConfig, UnetConfig, VaeConfig};
pub use files::Family;
pub use layers::Recompute;
pub use scheduler::{NoiseSchedule, PredictionType, SchedulerConfig};
pub use text_encoder::TextEncoder;
pub use unet::Unet;
pub use vae::{LatentDist, Vae};

use crate::embedding::Encoder;
use crate::error::{Error, Result};

/// The dtype a model's VAE computes in when its weights are `dtype`: `dtype`, except
/// SDXL's VAE with f16 weights, which computes in f32 unless its config says
/// `force_upcast: false` (the fp16-fix VAE). SDXL's original VAE overflows in f16 (NaN
/// latents and black images; diffusers upcasts it for `force_upcast: true`, OneTrainer's
/// SDXL presets keep it in f32). Encoding happens once per training image, so the cost is
/// small; bf16, whose range is f32's, is kept.
pub fn vae_dtype(config: &ModelConfig, dtype: DType) -> DType {
    if dtype == DType::F16 && config.family == Family::Sdxl && config.vae.force_upcast {
        DType::F32
    } else {
        dtype
    }
}

/// How to load a model.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// The dtype the frozen weights are computed in.
    pub dtype: DType,
    pub device: Device,
    /// Overrides the configuration found in (or inferred from) the model files.
    pub config: Option<ModelConfig>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            config: None,
        }
    }
}

/// A loaded model: text encoder(s), UNet and VAE, frozen.
#[derive(Debug)]
pub struct SdModel {
    /// Shared, so a prompt encoder can hold it without the UNet and the VAE.
    pub text_encoder: Arc<TextEncoder>,
    /// SDXL's second text encoder (OpenCLIP bigG), `None` for SD 1.x and 2.x.
    pub text_encoder_2: Option<Arc<TextEncoder>>,
    pub unet: Unet,
    /// The VAE, held only while it is needed ([`SdModel::vae`], [`SdModel::release_vae`]).
    vae: VaeSlot,
    pub config: ModelConfig,
    pub source: PathBuf,
    /// What loading decided from clues rather than a configuration (a single file's
    /// prediction type and the rule that chose it), one sentence each, for a front to
    /// print ([`files::LoadedWeights::notes`]).
    pub notes: Vec<String>,
}

impl SdModel {
    /// Loads a diffusers folder or a single-file `.safetensors` checkpoint.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Self> {
        Self::load_checked(path, opts, |_| Ok(()))
    }

    /// Loads as [`SdModel::load`] does, first calling `check` with the configuration read
    /// from the files' headers, before any weight is read: a job that cannot run (one
    /// that does not fit in memory, [`crate::train::check_fits`]) is refused at once
    /// instead of after loading half the model.
    pub fn load_checked(
        path: &Path,
        opts: &LoadOptions,
        check: impl FnOnce(&ModelConfig) -> Result<()>,
    ) -> Result<Self> {
        let loaded = files::index_model(path, opts.dtype, &opts.device, opts.config.as_ref())?;
        check(&loaded.config)?;
        let stamps = |part: &str, what: &'static str| {
            loaded
                .weights
                .pp(part)
                .source_files()
                .into_iter()
                .map(|f| FileStamp::of(&f, what))
                .collect::<Result<Vec<_>>>()
        };
        let vae_stamps = stamps("vae", "the VAE")?;
        let table_stamps = [
            stamps("text_encoder", TABLE)?,
            stamps("text_encoder_2", TABLE)?,
        ];
        let mut model = Self::from_weights(&loaded.weights, loaded.config, loaded.source)?;
        model.notes = loaded.notes;
        let (path, opts, config) = (path.to_path_buf(), opts.clone(), model.config.clone());
        for ((part, encoder), stamps) in ["text_encoder", "text_encoder_2"]
            .into_iter()
            .zip(model.text_encoders_mut())
            .zip(table_stamps)
        {
            let Some(encoder) = encoder else {
                continue;
            };
            let (path, opts, config) = (path.clone(), opts.clone(), config.clone());
            let dtype = encoder.dtype();
            let shape = [encoder.config().vocab_size, encoder.config().hidden_size];
            encoder.set_token_reload(Box::new(move || {
                FileStamp::check_all(&stamps)?;
                let loaded =
                    files::index_text_encoders(&path, opts.dtype, &opts.device, Some(&config))?;
                loaded
                    .weights
                    .pp(part)
                    .with_dtype(dtype)
                    .get_shaped("text_model.embeddings.token_embedding.weight", &shape)
            }));
        }
        model.vae.reload = Some(Box::new(move || {
            FileStamp::check_all(&vae_stamps)?;
            let loaded = files::index_model(&path, opts.dtype, &opts.device, Some(&config))?;
            vae_from(&loaded.weights, &config)
        }));
        Ok(model)
    }

    /// Builds the model from indexed or in-memory weights (diffusers names under
    /// `text_encoder.`, `text_encoder_2.` for SDXL, `unet.`, `vae.`), e.g. a random model
    /// of the real architecture for benchmarks.
    ///
    /// With f16 or bf16 weights the text encoder still computes in f32
    /// ([`TextEncoder::new`] says why).
    pub fn from_weights(
        w: &weights::Weights,
        config: ModelConfig,
        source: PathBuf,
    ) -> Result<Self> {
        if w.dtype() == DType::BF16 && w.device().is_cpu() {
            return Err(crate::error::Error::config(
                "dtype",
                "bf16 needs a GPU: candle's CPU backend has no bf16 matrix products (use f32 or f16 on the CPU)",
            ));
        }
        Ok(Self {
            // Each encoder conditions as its family does (text_encoder::Conditioning).
            text_encoder: Arc::new(TextEncoder::for_family(
                &w.pp("text_encoder"),
                &config.text_encoder,
                config.family,
                match config.family {
                    Family::Sdxl => Encoder::ClipL,
                    _ => Encoder::Single,
                },
            )?),
            text_encoder_2: match &config.text_encoder_2 {
                Some(c) => Some(Arc::new(TextEncoder::for_family(
                    &w.pp("text_encoder_2"),
                    c,
                    config.family,
                    Encoder::ClipG,
                )?)),
                None => None,
            },
            unet: Unet::new(&w.pp("unet"), &config.unet)?,
            vae: VaeSlot {
                dtype: vae_dtype(&config, w.dtype()),
                loaded: Mutex::new(Some(Arc::new(vae_from(w, &config)?))),
                reload: None,
            },
            config,
            source,
            notes: Vec::new(),
        })
    }

    /// The text encoders in conditioning order, each while nothing else holds it (a model
    /// just built; None for one shared, and for SD 1.x and 2.x's missing second one).
    pub(crate) fn text_encoders_mut(&mut self) -> [Option<&mut TextEncoder>; 2] {
        [
            Arc::get_mut(&mut self.text_encoder),
            self.text_encoder_2.as_mut().and_then(Arc::get_mut),
        ]
    }

    /// The text encoders in conditioning order (SDXL: CLIP ViT-L, then OpenCLIP bigG).
    pub fn text_encoders(&self) -> Vec<&TextEncoder> {
        let mut out = vec![self.text_encoder.as_ref()];
        out.extend(self.text_encoder_2.as_deref());
        out
    }

    pub fn device(&self) -> &Device {
        self.text_encoder.device()
    }

    /// The dtype the VAE computes in ([`vae_dtype`]).
    pub fn vae_dtype(&self) -> DType {
        self.vae.dtype
    }

    /// The VAE, read again from where the model came from when it was released
    /// ([`SdModel::release_vae`]). The error of a model file changed or removed since it
    /// was loaded names the file.
    pub fn vae(&self) -> Result<Arc<Vae>> {
        let mut loaded = self.vae.lock();
        if let Some(vae) = loaded.as_ref() {
            return Ok(vae.clone());
        }
        let reload = self.vae.reload.as_ref().ok_or_else(|| {
            Error::input("vae", "was released and this model cannot read it again")
        })?;
        let vae = Arc::new(reload()?);
        *loaded = Some(vae.clone());
        Ok(vae)
    }

    /// Frees the VAE's weights (SD 1.x: 319 MiB in f32, SDXL: the same) when the model
    /// can read them again, for training: a step needs only the latents cached when the
    /// images were added, and the VAE comes back when a preview or a new image needs it.
    /// A caller still holding it from [`SdModel::vae`] keeps its copy. Returns whether
    /// it was released: a model built from weights in memory
    /// ([`SdModel::from_weights`]) keeps it.
    pub fn release_vae(&self) -> bool {
        if !self.vae_releasable() {
            return false;
        }
        let mut loaded = self.vae.lock();
        loaded.take();
        true
    }

    /// Frees each text encoder's token table but the rows of `keep`, for training
    /// ([`TextEncoder::release_token_table`]); returns whether any was released.
    pub fn release_token_tables(&self, keep: &[u32]) -> Result<bool> {
        let mut released = false;
        for encoder in self.text_encoders() {
            released |= encoder.release_token_table(keep)?;
        }
        Ok(released)
    }

    /// Whether [`SdModel::release_token_tables`] frees every token table (a model loaded
    /// from files, or random).
    pub fn token_tables_releasable(&self) -> bool {
        self.text_encoders()
            .iter()
            .all(|e| e.token_table_releasable())
    }

    /// Whether [`SdModel::release_vae`] frees the VAE (a model loaded from files, or
    /// random).
    pub fn vae_releasable(&self) -> bool {
        self.vae.reload.is_some()
    }

    /// Whether the VAE is in memory now.
    pub fn vae_loaded(&self) -> bool {
        self.vae.lock().is_some()
    }

    /// Lets [`SdModel::release_vae`] free the VAE, `reload` building it again when it is
    /// next needed (a random model: from its generator's state).
    pub(crate) fn set_vae_reload(&mut self, reload: VaeReload) {
        self.vae.reload = Some(reload);
    }

    /// Scales a latent sample for the UNet (`latent * scaling_factor`); the VAE's
    /// weights need not be loaded.
    pub fn scale_latents(&self, latents: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        Ok((latents * self.config.vae.scaling_factor)?)
    }

    /// The dtype the UNet and the VAE compute in (the weights' dtype); the text encoder
    /// computes in [`TextEncoder::dtype`].
    pub fn dtype(&self) -> DType {
        self.unet.dtype()
    }
}

/// Builds a VAE again, for [`SdModel::vae`] after [`SdModel::release_vae`].
pub(crate) type VaeReload = Box<dyn Fn() -> Result<Vae> + Send + Sync>;

/// The VAE of a model, loaded or released, and how to load it again.
struct VaeSlot {
    dtype: DType,
    loaded: Mutex<Option<Arc<Vae>>>,
    reload: Option<VaeReload>,
}

impl VaeSlot {
    /// The loaded VAE, if any; a thread that panicked holding the lock left either a VAE
    /// or none, both valid.
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Arc<Vae>>> {
        self.loaded.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for VaeSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaeSlot")
            .field("dtype", &self.dtype)
            .field("loaded", &self.loaded)
            .field("reloadable", &self.reload.is_some())
            .finish()
    }
}

/// The VAE of `config` from weights named as [`SdModel::from_weights`] reads them.
pub(crate) fn vae_from(w: &weights::Weights, config: &ModelConfig) -> Result<Vae> {
    Vae::new(
        &w.pp("vae").with_dtype(vae_dtype(config, w.dtype())),
        &config.vae,
    )
}

/// What [`FileStamp`]'s errors call a text encoder's token table.
const TABLE: &str = "the text encoder's token table";

/// A model file's size and modification time when it was loaded: reading its VAE (or a
/// token table) again from a file that has since changed would pair the UNet with
/// another VAE.
struct FileStamp {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
    /// What is read again from the file, for the errors ("the VAE").
    what: &'static str,
}

impl FileStamp {
    fn of(path: &Path, what: &'static str) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        Ok(Self::from_metadata(path, &meta, what))
    }

    fn from_metadata(path: &Path, meta: &std::fs::Metadata, what: &'static str) -> Self {
        Self {
            path: path.to_path_buf(),
            len: meta.len(),
            modified: meta.modified().ok(),
            what,
        }
    }

    /// [`Self::check_unchanged`] of each of `stamps`: the first error.
    fn check_all(stamps: &[FileStamp]) -> Result<()> {
        stamps.iter().try_for_each(FileStamp::check_unchanged)
    }

    fn check_unchanged(&self) -> Result<()> {
        // A file that is not there is gone; any other failure (permissions, I/O) keeps
        // its own reason.
        let now = match std::fs::metadata(&self.path) {
            Ok(meta) => Self::from_metadata(&self.path, &meta, self.what),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::Model {
                    path: self.path.clone(),
                    reason: format!(
                        "is gone; sdti freed {} during training and cannot read it again",
                        self.what
                    ),
                })
            }
            Err(e) => return Err(Error::io(&self.path, e)),
        };
        if now.len != self.len || now.modified != self.modified {
            return Err(Error::Model {
                path: self.path.clone(),
                reason: format!(
                    "changed since the model was loaded; sdti freed {} during training and \
                     will not read it from a different file",
                    self.what
                ),
            });
        }
        Ok(())
    }
}
