//! The text encoder as prompts use it: the CLIP text transformer plus what encoding a
//! prompt needs beyond one forward pass (77-token windows concatenated, learned vectors
//! injected, clip skip, the family's conditioning rules). It loads alone, so a host that
//! only encodes prompts does not hold a UNet and a VAE.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::clip::{ClipTextTransformer, Conditioning, Injection};
use super::config::ClipConfig;
use super::files::index_text_encoders;
use super::weights::Weights;
use super::LoadOptions;
use crate::embedding::{Encoder, Family};
use crate::error::{Error, Result};

/// A frozen CLIP text encoder, knowing which model family and which of its encoders it
/// is (so how it conditions the UNet by default).
pub struct TextEncoder {
    clip: ClipTextTransformer,
    family: Family,
    encoder: Encoder,
    /// The family's conditioning for this encoder ([`Conditioning::default_for`]).
    conditioning: Conditioning,
}

impl std::fmt::Debug for TextEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextEncoder")
            .field("config", self.config())
            .field("family", &self.family)
            .field("encoder", &self.encoder)
            .field("dtype", &self.dtype())
            .finish_non_exhaustive()
    }
}

impl TextEncoder {
    /// Builds SD 1.x's encoder from weights named as transformers' `CLIPTextModel` (`w`
    /// already scoped to the text encoder); [`TextEncoder::for_family`] builds the others.
    ///
    /// With f16 or bf16 weights (mixed precision) it still computes in f32: the learned
    /// vectors enter here and their gradient comes out of it, and diffusers'
    /// textual_inversion example keeps it in f32 too. It is small next to the UNet (77
    /// tokens per prompt), so this costs little time; in f16 it cuts the gradient's error
    /// from about 8% to the UNet's share (tests/suite/parity.rs).
    pub fn new(w: &Weights, config: &ClipConfig) -> Result<Self> {
        Self::for_family(w, config, Family::Sd1, Encoder::Single)
    }

    /// Builds `family`'s `encoder` (`Encoder::Single` for SD 1.x and 2.x, `ClipL` or
    /// `ClipG` for SDXL), conditioning as that family does by default
    /// ([`Conditioning::default_for`]); `text_projection.weight` beside `text_model` is
    /// loaded when `config.projection_dim` is set. Refuses a default the weights cannot
    /// give (an SD 2.x folder must say `dropped_final_layers`; SDXL's second encoder needs
    /// its projection).
    pub fn for_family(
        w: &Weights,
        config: &ClipConfig,
        family: Family,
        encoder: Encoder,
    ) -> Result<Self> {
        let conditioning = Conditioning::default_for(family, encoder)?;
        let dtype = match w.dtype() {
            DType::F16 | DType::BF16 => DType::F32,
            other => other,
        };
        let clip = ClipTextTransformer::new(&w.with_dtype(dtype), config)?;
        clip.check_clip_skip(conditioning.clip_skip)?;
        if conditioning.pooled && !clip.has_projection() {
            return Err(Error::config(
                "text_projection",
                format!(
                    "the {} text encoder {encoder:?} needs text_projection.weight (and projection_dim in its config) for the pooled vector",
                    family.model_name()
                ),
            ));
        }
        Ok(Self {
            clip,
            family,
            encoder,
            conditioning,
        })
    }

    /// Loads only the text encoder of a diffusers folder or a single-file `.safetensors`
    /// SD 1.x or SD 2.x checkpoint, conditioning as its family does; the UNet and VAE
    /// weights stay unread. SDXL has two encoders: [`TextEncoder::load_all`]. `opts.config`,
    /// when set, gives the text encoder's configuration (and its family).
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Self> {
        let (first, second) = Self::load_all(path, opts)?;
        if second.is_some() {
            return Err(Error::Model {
                path: path.to_path_buf(),
                reason:
                    "this SDXL model has two text encoders: load both with TextEncoder::load_all"
                        .into(),
            });
        }
        Ok(first)
    }

    /// Loads a model's text encoders only: the one of SD 1.x and 2.x, or SDXL's CLIP ViT-L
    /// and OpenCLIP bigG, each conditioning as the family does.
    pub fn load_all(path: &Path, opts: &LoadOptions) -> Result<(Self, Option<Self>)> {
        let loaded = index_text_encoders(path, opts.dtype, &opts.device, opts.config.as_ref())?;
        let family = loaded.family;
        let first = Self::for_family(
            &loaded.weights.pp("text_encoder"),
            &loaded.text_encoder,
            family,
            match family {
                Family::Sdxl => Encoder::ClipL,
                _ => Encoder::Single,
            },
        )?;
        let second = match &loaded.text_encoder_2 {
            Some(c) => Some(Self::for_family(
                &loaded.weights.pp("text_encoder_2"),
                c,
                family,
                Encoder::ClipG,
            )?),
            None => None,
        };
        Ok((first, second))
    }

    pub fn config(&self) -> &ClipConfig {
        self.clip.config()
    }

    /// The model family this encoder belongs to.
    pub fn family(&self) -> Family {
        self.family
    }

    /// Which of the family's encoders this is.
    pub fn encoder(&self) -> Encoder {
        self.encoder
    }

    /// The family's conditioning for this encoder (clip skip 1 for SD 1.x, 2 for SD 2.x
    /// and SDXL).
    pub fn default_conditioning(&self) -> Conditioning {
        self.conditioning
    }

    /// The family's conditioning with `clip_skip` in place of its default (`None`: the
    /// default), checked against what the weights hold.
    pub fn conditioning(&self, clip_skip: Option<usize>) -> Result<Conditioning> {
        let cond = match clip_skip {
            Some(n) => self.conditioning.with_clip_skip(n),
            None => self.conditioning,
        };
        self.clip.check_clip_skip(cond.clip_skip)?;
        Ok(cond)
    }

    /// The blocks of the original encoder (the loaded ones plus those a diffusers
    /// conversion dropped), which clip skip counts from the end of.
    pub fn full_depth(&self) -> usize {
        self.clip.full_depth()
    }

    /// The token embedding table `[vocab, dim]` (read again if training released it:
    /// [`TextEncoder::release_token_table`]).
    pub fn token_table(&self) -> Result<Tensor> {
        self.clip.token_table()
    }

    /// Frees the token table but the rows of `keep` while it can be read again, for
    /// training: its prompts use a few hundred tokens of 49,408 (SD 1.x 145 MiB less in
    /// f32, SDXL's two tables 386 MiB). A prompt with another token reads the table
    /// again. Returns whether it was released: a text encoder loaded alone, or built
    /// from weights in memory without a way to draw them again, keeps it.
    pub fn release_token_table(&self, keep: &[u32]) -> Result<bool> {
        // The family's padding after the end token (bigG's 0) is embedded too.
        let mut keep = keep.to_vec();
        keep.extend(self.conditioning.pad_after_eos);
        self.clip.release_token_table(&keep)
    }

    /// Whether the whole token table is in memory now.
    pub fn token_table_loaded(&self) -> bool {
        self.clip.token_table_loaded()
    }

    /// Whether [`TextEncoder::release_token_table`] frees the table.
    pub fn token_table_releasable(&self) -> bool {
        self.clip.token_table_releasable()
    }

    /// Lets [`TextEncoder::release_token_table`] free the table, `reload` reading it
    /// again.
    pub(crate) fn set_token_reload(&mut self, reload: super::clip::TableReload) {
        self.clip.set_token_reload(reload);
    }

    pub fn device(&self) -> &Device {
        self.clip.device()
    }

    /// The dtype it computes in (f32 under mixed precision, see [`TextEncoder::new`]).
    pub fn dtype(&self) -> DType {
        self.clip.dtype()
    }

    /// One window: hidden states `[B, T, dim]` for ids `[B, T]`, T at most 77,
    /// `hidden_states[-clip_skip]` of the full-depth encoder with the family's final norm
    /// and padding rules ([`TextEncoder::default_conditioning`]).
    pub fn forward(
        &self,
        ids: &Tensor,
        injection: Option<&Injection<'_>>,
        clip_skip: usize,
    ) -> Result<Tensor> {
        let cond = Conditioning {
            pooled: false,
            ..self.conditioning.with_clip_skip(clip_skip)
        };
        Ok(self.clip.forward_conditioned(ids, injection, &cond)?.0)
    }

    /// Encodes `[B, 77*k]` ids window by window and concatenates the hidden states along
    /// the token axis, as A1111 and ComfyUI condition on prompts longer than one chunk;
    /// the family's final norm and padding rules with `clip_skip`.
    pub fn encode(
        &self,
        ids: &Tensor,
        injection: Option<&Injection<'_>>,
        clip_skip: usize,
    ) -> Result<Tensor> {
        let cond = Conditioning {
            pooled: false,
            ..self.conditioning.with_clip_skip(clip_skip)
        };
        Ok(self.encode_with_pooled(ids, injection, &cond)?.0)
    }

    /// [`TextEncoder::encode`] conditioned as `cond` says: the hidden states `[B, 77*k,
    /// dim]` and, when `cond.pooled`, the pooled vector `[B, projection_dim]` of the first
    /// window (ComfyUI's and A1111's pooled output for a long prompt is chunk 0's).
    pub fn encode_with_pooled(
        &self,
        ids: &Tensor,
        injection: Option<&Injection<'_>>,
        cond: &Conditioning,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (_, t) = ids.dims2()?;
        let chunk = self.config().max_position_embeddings;
        if t <= chunk {
            return self.clip.forward_conditioned(ids, injection, cond);
        }
        if t % chunk != 0 {
            return Err(Error::input(
                "prompt",
                format!("{t} token slots are not whole chunks of {chunk}"),
            ));
        }
        let mut parts = Vec::with_capacity(t / chunk);
        let mut pooled = None;
        for start in (0..t).step_by(chunk) {
            let part_ids = ids.narrow(1, start, chunk)?;
            // Only the first window's pooled vector is used.
            let part_cond = Conditioning {
                pooled: cond.pooled && start == 0,
                ..*cond
            };
            let (part, part_pooled) = match injection {
                Some(inj) => {
                    let index = inj.index.narrow(1, start, chunk)?;
                    let mask = inj.mask.narrow(1, start, chunk)?;
                    let sub = Injection {
                        table: inj.table,
                        index: &index,
                        mask: &mask,
                    };
                    self.clip
                        .forward_conditioned(&part_ids, Some(&sub), &part_cond)?
                }
                None => self.clip.forward_conditioned(&part_ids, None, &part_cond)?,
            };
            if start == 0 {
                pooled = part_pooled;
            }
            parts.push(part);
        }
        Ok((Tensor::cat(&parts, 1)?, pooled))
    }
}

/// The UNet's text conditioning from a model's text encoders, each with its learned
/// vectors: one encoder's states as they are (SD 1.x, 2.x), or SDXL's two side by side
/// along the width in encoder order (`[L (768) ‖ G (1280)]` = 2048, SGM's
/// `GeneralConditioner` and diffusers' `encode_prompt`), and the pooled vector of the
/// encoder that gives one (SDXL's G, first window). Every encoder takes the same ids (one
/// tokenizer, so the same slots; each applies its own padding rule) and the same
/// `clip_skip` (`None`: each encoder's family default).
pub fn encode_context(
    encoders: &[(&TextEncoder, Option<&Injection<'_>>)],
    ids: &Tensor,
    clip_skip: Option<usize>,
) -> Result<(Tensor, Option<Tensor>)> {
    let mut states = Vec::with_capacity(encoders.len());
    let mut pooled = None;
    for (encoder, injection) in encoders {
        let cond = encoder.conditioning(clip_skip)?;
        let (s, p) = encoder.encode_with_pooled(ids, *injection, &cond)?;
        states.push(s);
        if pooled.is_none() {
            pooled = p;
        }
    }
    match states.len() {
        0 => Err(Error::config(
            "text_encoder",
            "a model without a text encoder",
        )),
        1 => Ok((states.remove(0), pooled)),
        _ => Ok((Tensor::cat(&states, 2)?, pooled)),
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::model::random::{random_weights, tiny_sd1_config};
    use crate::tokenizer::{BOS, EOS};

    /// A random 3-block encoder of width 16 (`projection`: with a `text_projection`).
    fn tiny(
        family: Family,
        encoder: Encoder,
        dropped: usize,
        projection: bool,
    ) -> Result<TextEncoder> {
        // The tiny UNet and VAE come along (random_weights builds all three).
        let mut config = tiny_sd1_config();
        config.text_encoder = ClipConfig {
            hidden_size: 16,
            intermediate_size: 32,
            num_hidden_layers: 3,
            num_attention_heads: 2,
            hidden_act: "gelu".into(),
            projection_dim: projection.then_some(8),
            dropped_final_layers: dropped,
            ..ClipConfig::sd1()
        };
        let mut tensors: std::collections::HashMap<String, Tensor> = random_weights(&config, 5)?
            .into_iter()
            .filter(|(k, _)| k.starts_with("text_encoder."))
            .collect();
        if projection {
            let p = Tensor::randn(0f32, 0.3, (8, 16), &Device::Cpu)?;
            tensors.insert("text_encoder.text_projection.weight".into(), p);
        }
        let w = Weights::from_tensors(tensors, DType::F32, Device::Cpu);
        TextEncoder::for_family(&w.pp("text_encoder"), &config.text_encoder, family, encoder)
    }

    fn ids(rows: &[&[u32]]) -> Result<Tensor> {
        let t = rows[0].len();
        let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Ok(Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu)?)
    }

    #[test]
    fn family_defaults() -> Result<()> {
        let sd1 = Conditioning::default_for(Family::Sd1, Encoder::Single)?;
        assert_eq!(sd1, Conditioning::SD1);
        let sd2 = Conditioning::default_for(Family::Sd2, Encoder::Single)?;
        assert_eq!(
            (sd2.clip_skip, sd2.final_norm, sd2.pad_after_eos, sd2.pooled),
            (2, true, Some(0), false)
        );
        let l = Conditioning::default_for(Family::Sdxl, Encoder::ClipL)?;
        assert_eq!(
            (l.clip_skip, l.final_norm, l.pad_after_eos, l.pooled),
            (2, false, None, false)
        );
        let g = Conditioning::default_for(Family::Sdxl, Encoder::ClipG)?;
        assert_eq!(
            (g.clip_skip, g.final_norm, g.pad_after_eos, g.pooled),
            (2, false, Some(0), true)
        );
        assert!(Conditioning::default_for(Family::Sd1, Encoder::ClipG).is_err());
        assert!(Conditioning::default_for(Family::Sdxl, Encoder::Single).is_err());
        Ok(())
    }

    /// A folder that lacks the last block: clip skip counts from the original's end, 1 is
    /// refused with the reason, the default (2) is the folder's last layer.
    #[test]
    fn a_folder_without_the_last_block() -> Result<()> {
        let folder = tiny(Family::Sd2, Encoder::Single, 1, false)?;
        assert_eq!(folder.full_depth(), 4);
        assert_eq!(folder.conditioning(None)?.clip_skip, 2);
        let err = folder.conditioning(Some(1)).unwrap_err().to_string();
        assert!(err.contains("lacks block 4"), "{err}");
        assert!(folder.conditioning(Some(5)).is_err());
        assert!(folder.conditioning(Some(0)).is_err());
        assert_eq!(folder.conditioning(Some(4))?.clip_skip, 4);
        let x = ids(&[&[BOS, 320, EOS, EOS, EOS]])?;
        assert!(folder.forward(&x, None, 1).is_err());
        // An SD 1.x encoder of the same depth takes 1..=3.
        let sd1 = tiny(Family::Sd1, Encoder::Single, 0, false)?;
        assert_eq!(sd1.conditioning(None)?.clip_skip, 1);
        assert!(sd1.conditioning(Some(4)).is_err());
        Ok(())
    }

    /// OpenCLIP's padding: after the first end token every slot holds 0, so an SD 2.x
    /// encoder gives the same states for EOS- and 0-padded ids, unlike SD 1.x; a learned
    /// slot holding the end token as a stand-in is not the end.
    #[test]
    fn zero_padding_after_the_first_end_token() -> Result<()> {
        let sd2 = tiny(Family::Sd2, Encoder::Single, 0, false)?;
        let eos_padded = ids(&[&[BOS, 320, 1125, EOS, EOS, EOS]])?;
        let zero_padded = ids(&[&[BOS, 320, 1125, EOS, 0, 0]])?;
        let a = sd2.forward(&eos_padded, None, 2)?;
        let b = sd2.forward(&zero_padded, None, 2)?;
        assert_eq!(a.to_vec3::<f32>()?, b.to_vec3::<f32>()?);
        let sd1 = tiny(Family::Sd1, Encoder::Single, 0, false)?;
        let a = sd1.forward(&eos_padded, None, 2)?;
        let b = sd1.forward(&zero_padded, None, 2)?;
        assert_ne!(a.to_vec3::<f32>()?, b.to_vec3::<f32>()?);

        let eos = super::super::clip::first_eos(
            &ids(&[&[BOS, EOS, 320, EOS, EOS], &[BOS, 320, 320, 320, 320]])?,
            Some(&Tensor::from_vec(
                vec![0f32, 1., 0., 0., 0., 0., 0., 0., 0., 0.],
                (2, 5),
                &Device::Cpu,
            )?),
        )?;
        assert_eq!(eos, vec![Some(3), None]);
        Ok(())
    }

    /// The pooled vector: the first window's, with a gradient to the injected vectors
    /// even when only the pooled vector is used.
    #[test]
    fn pooled_vector_of_the_first_window_with_gradient() -> Result<()> {
        let g = tiny(Family::Sdxl, Encoder::ClipG, 0, true)?;
        let cond = g.default_conditioning();
        let table = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 16), &Device::Cpu)?)?;
        let chunk = [BOS, 0, 320, EOS, 0, 0];
        let one = ids(&[&chunk])?;
        let mask1 = Tensor::from_vec(vec![0f32, 1., 0., 0., 0., 0.], (1, 6), &Device::Cpu)?;
        let index1 = Tensor::zeros((1, 6), DType::U32, &Device::Cpu)?;
        let inj = Injection {
            table: table.as_tensor(),
            index: &index1,
            mask: &mask1,
        };
        let (states, pooled) = g.encode_with_pooled(&one, Some(&inj), &cond)?;
        assert_eq!(states.dims(), &[1, 6, 16]);
        let pooled = pooled.ok_or_else(|| Error::input("test", "no pooled vector"))?;
        assert_eq!(pooled.dims(), &[1, 8]);
        let grads = pooled.sqr()?.sum_all()?.backward()?;
        let grad = grads
            .get(table.as_tensor())
            .ok_or_else(|| Error::input("test", "no gradient"))?;
        assert!(grad.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);

        // Two 77-slot chunks: the pooled vector is the first one's.
        let window = |body: &[u32]| {
            let mut w = vec![BOS];
            w.extend_from_slice(body);
            w.push(EOS);
            w.resize(77, EOS);
            w
        };
        let first = window(&[320, 1125]);
        let mut both = first.clone();
        both.extend(window(&[539, 1929, 4558]));
        let (_, p1) = g.encode_with_pooled(&ids(&[&first])?, None, &cond)?;
        let (states2, p2) = g.encode_with_pooled(&ids(&[&both])?, None, &cond)?;
        assert_eq!(states2.dims(), &[1, 154, 16]);
        let (p1, p2) = (
            p1.map(|p| p.to_vec2::<f32>()),
            p2.map(|p| p.to_vec2::<f32>()),
        );
        assert_eq!(p1.transpose()?, p2.transpose()?);
        // Without a projection there is no pooled vector to give.
        let no_projection = tiny(Family::Sd2, Encoder::Single, 0, false)?;
        let want_pooled = Conditioning {
            pooled: true,
            ..no_projection.default_conditioning()
        };
        assert!(no_projection
            .encode_with_pooled(&one, None, &want_pooled)
            .is_err());
        Ok(())
    }
}
