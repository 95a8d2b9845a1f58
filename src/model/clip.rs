//! The CLIP text transformer of SD 1.x (transformers `CLIPTextModel` key names), with
//! learned vectors injected into the token slots.

use candle_core::{DType, Device, Tensor};

use super::config::ClipConfig;
use super::layers::{attention, gelu_erf, quick_gelu, LayerNorm, Linear};
use super::weights::Weights;
use crate::error::{Error, Result};

/// Learned vectors placed into token slots: `table` holds the vectors (`[M, dim]`,
/// possibly a trainable variable), `index` (`[B, T]` u32) picks a row for each slot and
/// `mask` (`[B, T]`, 1 where a slot carries a learned vector) says which slots use it.
#[derive(Debug)]
pub struct Injection<'a> {
    pub table: &'a Tensor,
    pub index: &'a Tensor,
    pub mask: &'a Tensor,
}

#[derive(Debug)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

impl ClipAttention {
    fn new(w: &Weights, cfg: &ClipConfig) -> Result<Self> {
        Ok(Self {
            q_proj: Linear::new(w, "q_proj", true)?,
            k_proj: Linear::new(w, "k_proj", true)?,
            v_proj: Linear::new(w, "v_proj", true)?,
            out_proj: Linear::new(w, "out_proj", true)?,
            heads: cfg.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let h = self.heads;
        let dh = d / h;
        let split = |y: Tensor| -> Result<Tensor> {
            Ok(y.reshape((b, t, h, dh))?
                .transpose(1, 2)?
                .reshape((b * h, t, dh))?)
        };
        let q = split(self.q_proj.forward(x)?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let o = attention(&q, &k, &v, (dh as f64).powf(-0.5), Some(mask))?;
        let o = o
            .reshape((b, h, t, dh))?
            .transpose(1, 2)?
            .reshape((b, t, d))?;
        self.out_proj.forward(&o)
    }
}

#[derive(Debug)]
struct ClipLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    quick: bool,
}

impl ClipLayer {
    fn new(w: &Weights, cfg: &ClipConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            layer_norm1: LayerNorm::new(w, "layer_norm1", d, cfg.layer_norm_eps)?,
            self_attn: ClipAttention::new(&w.pp("self_attn"), cfg)?,
            layer_norm2: LayerNorm::new(w, "layer_norm2", d, cfg.layer_norm_eps)?,
            fc1: Linear::new(w, "mlp.fc1", true)?,
            fc2: Linear::new(w, "mlp.fc2", true)?,
            quick: cfg.hidden_act == "quick_gelu",
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, mask)?;
        let x = (x + h)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        let h = if self.quick {
            quick_gelu(&h)?
        } else {
            gelu_erf(&h)?
        };
        Ok((x + self.fc2.forward(&h)?)?)
    }
}

/// The text transformer: token and position lookups, layers, final layer norm.
#[derive(Debug)]
pub struct ClipTextTransformer {
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<ClipLayer>,
    final_layer_norm: LayerNorm,
    config: ClipConfig,
}

impl ClipTextTransformer {
    /// Loads from weights named as transformers names them under `text_model.`.
    pub fn new(w: &Weights, cfg: &ClipConfig) -> Result<Self> {
        if cfg.num_attention_heads == 0 || cfg.hidden_size % cfg.num_attention_heads != 0 {
            return Err(Error::config(
                "text_encoder.num_attention_heads",
                format!(
                    "{} heads do not divide hidden size {}",
                    cfg.num_attention_heads, cfg.hidden_size
                ),
            ));
        }
        let w = w.pp("text_model");
        let d = cfg.hidden_size;
        let token_embedding =
            w.get_shaped("embeddings.token_embedding.weight", &[cfg.vocab_size, d])?;
        let position_embedding = w.get_shaped(
            "embeddings.position_embedding.weight",
            &[cfg.max_position_embeddings, d],
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipLayer::new(&w.pp(&format!("encoder.layers.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::new(&w, "final_layer_norm", d, cfg.layer_norm_eps)?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// The token table `[vocab, dim]`, for initialising vectors from words.
    pub fn token_table(&self) -> &Tensor {
        &self.token_embedding
    }

    pub fn device(&self) -> &Device {
        self.token_embedding.device()
    }

    pub fn dtype(&self) -> DType {
        self.token_embedding.dtype()
    }

    /// Hidden states `[B, T, dim]` for token ids `[B, T]` (u32): the output of layer
    /// `layers - clip_skip + 1` (clip_skip 1 = the last layer, as SD 1.x uses), then the
    /// final layer norm, as A1111, ComfyUI and diffusers apply it.
    pub fn forward(
        &self,
        ids: &Tensor,
        injection: Option<&Injection<'_>>,
        clip_skip: usize,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t > self.config.max_position_embeddings {
            return Err(Error::input(
                "prompt",
                format!(
                    "{t} tokens exceed the text encoder's {} positions",
                    self.config.max_position_embeddings
                ),
            ));
        }
        if clip_skip == 0 || clip_skip > self.layers.len() {
            return Err(Error::config(
                "clip_skip",
                format!("must be 1..={} for this text encoder", self.layers.len()),
            ));
        }
        let d = self.config.hidden_size;
        let flat = ids.flatten_all()?;
        let mut x = self
            .token_embedding
            .index_select(&flat, 0)?
            .reshape((b, t, d))?;
        if let Some(inj) = injection {
            let rows = inj
                .table
                .to_dtype(x.dtype())?
                .index_select(&inj.index.flatten_all()?, 0)?
                .reshape((b, t, d))?;
            let mask = inj.mask.to_dtype(x.dtype())?.reshape((b, t, 1))?;
            let keep = (1.0 - &mask)?;
            x = (x.broadcast_mul(&keep)? + rows.broadcast_mul(&mask)?)?;
        }
        let pos = self.position_embedding.narrow(0, 0, t)?;
        x = x.broadcast_add(&pos)?;
        let mask = causal_mask(t, x.dtype(), x.device())?;
        let keep = self.layers.len() + 1 - clip_skip;
        for layer in &self.layers[..keep] {
            x = layer.forward(&x, &mask)?;
        }
        self.final_layer_norm.forward(&x)
    }
}

/// `[T, T]` additive mask: 0 on and below the diagonal, -inf above.
fn causal_mask(t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(values, (t, t), device)?.to_dtype(dtype)?)
}
