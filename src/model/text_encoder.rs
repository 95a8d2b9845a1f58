//! The text encoder as prompts use it: the CLIP text transformer plus what encoding a
//! prompt needs beyond one forward pass (77-token windows concatenated, learned vectors
//! injected, clip skip). It loads alone, so a host that only encodes prompts does not
//! hold a UNet and a VAE.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::clip::{ClipTextTransformer, Injection};
use super::config::ClipConfig;
use super::files::index_text_encoder;
use super::weights::Weights;
use super::LoadOptions;
use crate::error::{Error, Result};

/// A frozen CLIP text encoder.
pub struct TextEncoder {
    clip: ClipTextTransformer,
}

impl std::fmt::Debug for TextEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextEncoder")
            .field("config", self.config())
            .field("dtype", &self.dtype())
            .finish_non_exhaustive()
    }
}

impl TextEncoder {
    /// Builds the encoder from weights named as transformers' `CLIPTextModel` (`w` already
    /// scoped to the text encoder).
    ///
    /// With f16 or bf16 weights (mixed precision) it still computes in f32: the learned
    /// vectors enter here and their gradient comes out of it, and diffusers'
    /// textual_inversion example keeps it in f32 too. It is small next to the UNet (77
    /// tokens per prompt), so this costs little time; in f16 it cuts the gradient's error
    /// from about 8% to the UNet's share (tests/suite/parity.rs).
    pub fn new(w: &Weights, config: &ClipConfig) -> Result<Self> {
        let dtype = match w.dtype() {
            DType::F16 | DType::BF16 => DType::F32,
            other => other,
        };
        Ok(Self {
            clip: ClipTextTransformer::new(&w.with_dtype(dtype), config)?,
        })
    }

    /// Loads only the text encoder of a diffusers folder or a single-file `.safetensors`
    /// SD 1.x checkpoint; the UNet and VAE weights stay unread. `opts.config`, when set,
    /// gives the text encoder's configuration.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Self> {
        let (weights, config) = index_text_encoder(
            path,
            opts.dtype,
            &opts.device,
            opts.config.as_ref().map(|c| &c.text_encoder),
        )?;
        Self::new(&weights.pp("text_encoder"), &config)
    }

    pub fn config(&self) -> &ClipConfig {
        self.clip.config()
    }

    /// The token embedding table `[vocab, dim]`.
    pub fn token_table(&self) -> &Tensor {
        self.clip.token_table()
    }

    pub fn device(&self) -> &Device {
        self.clip.device()
    }

    /// The dtype it computes in (f32 under mixed precision, see [`TextEncoder::new`]).
    pub fn dtype(&self) -> DType {
        self.clip.dtype()
    }

    /// One window: hidden states `[B, T, dim]` for ids `[B, T]`, T at most 77.
    pub fn forward(
        &self,
        ids: &Tensor,
        injection: Option<&Injection<'_>>,
        clip_skip: usize,
    ) -> Result<Tensor> {
        self.clip.forward(ids, injection, clip_skip)
    }

    /// Encodes `[B, 77*k]` ids window by window and concatenates the hidden states along
    /// the token axis, as A1111 and ComfyUI condition on prompts longer than one chunk.
    pub fn encode(
        &self,
        ids: &Tensor,
        injection: Option<&Injection<'_>>,
        clip_skip: usize,
    ) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let chunk = self.config().max_position_embeddings;
        if t <= chunk {
            return self.forward(ids, injection, clip_skip);
        }
        if t % chunk != 0 {
            return Err(Error::input(
                "prompt",
                format!("{t} token slots are not whole chunks of {chunk}"),
            ));
        }
        let mut parts = Vec::with_capacity(t / chunk);
        for start in (0..t).step_by(chunk) {
            let part_ids = ids.narrow(1, start, chunk)?;
            let part = match injection {
                Some(inj) => {
                    let index = inj.index.narrow(1, start, chunk)?;
                    let mask = inj.mask.narrow(1, start, chunk)?;
                    let sub = Injection {
                        table: inj.table,
                        index: &index,
                        mask: &mask,
                    };
                    self.forward(&part_ids, Some(&sub), clip_skip)?
                }
                None => self.forward(&part_ids, None, clip_skip)?,
            };
            parts.push(part);
        }
        Ok(Tensor::cat(&parts, 1)?)
    }
}
