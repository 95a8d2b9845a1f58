//! The CLIP text transformer of SD 1.x (transformers `CLIPTextModel` key names), with
//! learned vectors injected into the token slots.

use candle_core::{DType, Device, Tensor};

use super::config::ClipConfig;
use super::layers::{
    apply_block, attention_backward, attention_forward, Activation, AttentionMask, Block,
    LayerNorm, Linear, Recompute, Stats,
};
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

/// One CLIP encoder layer (pre-norm self-attention with a causal mask, then a two-layer
/// MLP), one graph node with a hand-written backward pass: it keeps its input, the fused
/// q/k/v projection, the attention's output and row log-sum-exp, the residual sum after
/// attention, the MLP's hidden pre-activation and the norms' statistics.
#[derive(Clone, Debug)]
struct ClipLayer {
    layer_norm1: LayerNorm,
    /// `q_proj`, `k_proj`, `v_proj` stacked: `[3D, D]`.
    qkv_proj: Linear,
    out_proj: Linear,
    heads: usize,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

/// What a CLIP layer's backward pass reads besides its input.
struct ClipSaved {
    stats1: Option<Stats>,
    qkv: Tensor,
    o: Tensor,
    lse: Tensor,
    x1: Tensor,
    stats2: Option<Stats>,
    h: Tensor,
}

impl ClipLayer {
    fn new(w: &Weights, cfg: &ClipConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let a = w.pp("self_attn");
        Ok(Self {
            layer_norm1: LayerNorm::new(w, "layer_norm1", d, cfg.layer_norm_eps)?,
            qkv_proj: Linear::concat(&[
                Linear::new(&a, "q_proj", true)?,
                Linear::new(&a, "k_proj", true)?,
                Linear::new(&a, "v_proj", true)?,
            ])?,
            out_proj: Linear::new(&a, "out_proj", true)?,
            heads: cfg.num_attention_heads,
            layer_norm2: LayerNorm::new(w, "layer_norm2", d, cfg.layer_norm_eps)?,
            fc1: Linear::new(w, "mlp.fc1", true)?,
            fc2: Linear::new(w, "mlp.fc2", true)?,
            activation: if cfg.hidden_act == "quick_gelu" {
                Activation::QuickGelu
            } else {
                Activation::GeluErf
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(apply_block(self, x, None, Recompute::Off)?)
    }

    fn scale(&self, d: usize) -> f64 {
        ((d / self.heads) as f64).powf(-0.5)
    }
}

impl Block for ClipLayer {
    type Saved = ClipSaved;
    const KIND: &'static str = "clip_layer";

    fn run(
        &self,
        x: &Tensor,
        _: Option<&Tensor>,
        save: bool,
    ) -> candle_core::Result<(Tensor, Option<ClipSaved>)> {
        let (n1, stats1) = self.layer_norm1.apply(x)?;
        let qkv = self.qkv_proj.apply(&n1)?;
        drop(n1);
        let [q, k, v] = Linear::parts(&qkv)?;
        let scale = self.scale(q.dim(2)?);
        let (o, lse) = attention_forward(&q, &k, &v, self.heads, scale, AttentionMask::Causal)?;
        let x1 = (x + self.out_proj.apply(&o)?)?;
        let (n2, stats2) = self.layer_norm2.apply(&x1)?;
        let h = self.fc1.apply(&n2)?;
        drop(n2);
        let y = (&x1 + self.fc2.apply(&self.activation.apply(&h)?)?)?;
        let saved = save.then_some(ClipSaved {
            stats1,
            qkv,
            o,
            lse,
            x1,
            stats2,
            h,
        });
        Ok((y, saved))
    }

    fn backward(
        &self,
        s: ClipSaved,
        x: &Tensor,
        _: Option<&Tensor>,
        g: &Tensor,
        need: [bool; 2],
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if !need[0] {
            return Ok((None, None));
        }
        // y = x1 + fc2(act(fc1(norm2(x1)))), x1 = x + out(attn(qkv(norm1(x)))).
        let da = self.fc2.input_grad(g)?;
        let dh = self.activation.input_grad(&da, &s.h)?;
        drop((da, s.h));
        let dn2 = self.fc1.input_grad(&dh)?;
        drop(dh);
        let dx1 = (g + self
            .layer_norm2
            .input_grad(&dn2, &s.x1, s.stats2.as_ref())?)?;
        drop((dn2, s.x1));
        let do_ = self.out_proj.input_grad(&dx1)?;
        let [q, k, v] = Linear::parts(&s.qkv)?;
        let scale = self.scale(q.dim(2)?);
        let grads = attention_backward(
            &q,
            &k,
            &v,
            &s.o,
            &s.lse,
            &do_,
            self.heads,
            scale,
            AttentionMask::Causal,
            [true; 3],
        )?;
        drop((do_, q, k, v, s.qkv, s.o, s.lse));
        let dn1 = self
            .qkv_proj
            .input_grad_of_parts([grads.0, grads.1, grads.2])?;
        let dx = (dx1 + self.layer_norm1.input_grad(&dn1, x, s.stats1.as_ref())?)?;
        Ok((Some(dx), None))
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
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
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
        let keep = self.layers.len() + 1 - clip_skip;
        for layer in &self.layers[..keep] {
            x = layer.forward(&x)?;
        }
        self.final_layer_norm.forward(&x)
    }
}
