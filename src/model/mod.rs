//! Training-grade Stable Diffusion model code (SD 1.x, SD 2.x, SDXL) on candle tensors.

pub mod clip;
pub mod config;
pub mod files;
pub mod layers;
pub mod memory;
pub mod profile;
pub mod random;
mod resnet;
pub mod scheduler;
pub mod text_encoder;
mod transformer;
pub mod unet;
pub mod vae;
pub mod weights;

use std::path::{Path, PathBuf};
use std::sync::Arc;

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
use crate::error::Result;

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
    pub vae: Vae,
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
        let mut model = Self::from_weights(&loaded.weights, loaded.config, loaded.source)?;
        model.notes = loaded.notes;
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
            vae: Vae::new(
                &w.pp("vae").with_dtype(vae_dtype(&config, w.dtype())),
                &config.vae,
            )?,
            config,
            source,
            notes: Vec::new(),
        })
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
        self.vae.dtype()
    }

    /// The dtype the UNet and the VAE compute in (the weights' dtype); the text encoder
    /// computes in [`TextEncoder::dtype`].
    pub fn dtype(&self) -> DType {
        self.unet.dtype()
    }
}
