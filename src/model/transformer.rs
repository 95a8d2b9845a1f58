//! diffusers' `Transformer2DModel` and its `BasicTransformerBlock`s as one graph node per
//! spatial transformer, with a hand-written backward pass.
//!
//! The forward pass runs off the graph and keeps, per transformer block, only what the
//! backward pass reads: the block's input, the fused q/k/v projection, each attention's
//! output and row log-sum-exp, the two residual sums, the cross-attention query and its
//! context keys and values, the GEGLU input and the norms' statistics: 17 activations of
//! the block's width. No linear layer's input is kept (its input gradient is `dy W`), no
//! head is split or merged by a copy, and the saved state is freed block by block as the
//! backward pass goes through it.
//!
//! Blocks at most [`REBUILD_WIDTH`] wide whose state waits for the backward pass
//! ([`Keep::Lean`], recompute off) and whose activations are at least
//! [`REBUILD_MIN_ELEMENTS`] large keep 3 of the 17: the input and the two attention
//! outputs (and the small ones). The backward pass rebuilds the rest, the two residual
//! sums, the fused q/k/v, the cross-attention query and the GEGLU input, with the forward
//! pass's own products, so with the same bits; the attention outputs, which would cost
//! far more to rebuild, are kept. A block rerun by recompute ([`Keep::All`]) keeps all.

use candle_core::{DType, Tensor};

use super::config::UnetConfig;
use super::layers::AttentionMask;
use super::layers::{
    apply_block, attention_backward, attention_forward, geglu_apply, geglu_input_grad, matmul,
    Bias, Block, Conv2d, GroupNorm, Keep, LayerNorm, Linear, Recompute, Stats,
};
use super::weights::Weights;
use crate::error::Result;

/// The shape of one level's spatial transformers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct TransformerConfig {
    pub channels: usize,
    pub heads: usize,
    /// Transformer blocks per spatial transformer.
    pub depth: usize,
    /// Group-norm groups of the input norm.
    pub groups: usize,
    /// Linear (SD 2.x style) instead of 1x1 convolution projections in and out.
    pub linear_projection: bool,
    /// Attention scores, softmax and probabilities in f32 when the UNet computes in f16
    /// or bf16 (diffusers' `upcast_attention`, SD 2.1's `ATTN_PRECISION=fp32`).
    pub upcast: bool,
}

impl TransformerConfig {
    /// The transformers of config level `block` (an index into `block_out_channels`).
    pub(crate) fn at(cfg: &UnetConfig, block: usize) -> Self {
        Self {
            channels: cfg.block_out_channels[block],
            heads: cfg.heads(block),
            depth: cfg
                .transformer_layers_per_block
                .as_ref()
                .and_then(|d| d.at(block))
                .unwrap_or(1),
            groups: cfg.norm_num_groups,
            linear_projection: cfg.use_linear_projection,
            upcast: cfg.upcast_attention,
        }
    }
}

/// diffusers `BasicTransformerBlock` with a GEGLU feed-forward: self-attention (q, k and
/// v from one fused projection, no bias), cross-attention to the text context (k and v
/// fused), each after a layer norm and added to the residual stream.
#[derive(Clone, Debug)]
struct TransformerBlock {
    norm1: LayerNorm,
    /// `to_q`, `to_k`, `to_v` of `attn1`, stacked: `[3C, C]`.
    qkv1: Linear,
    out1: Linear,
    norm2: LayerNorm,
    q2: Linear,
    /// `to_k`, `to_v` of `attn2`, stacked: `[2C, D]`.
    kv2: Linear,
    out2: Linear,
    norm3: LayerNorm,
    ff_proj: Linear,
    ff_out: Linear,
    heads: usize,
    upcast: bool,
    /// The block's width (channels).
    width: usize,
    /// [`REBUILD_MIN_ELEMENTS`] (a test lowers it to run the rebuild on small inputs).
    rebuild_min_elements: usize,
}

/// The widest transformer block that rebuilds its projections for a backward pass that
/// waits ([`Keep::Lean`]) rather than keeping them. Rebuilding an activation costs one
/// multiply-add per element and channel, so it is cheapest in narrow blocks, which at
/// SD 1.x's 512 px also hold most of the state (the 64x64 and 32x32 latents' levels, 320
/// and 640 wide: 14 of their 17 activations, about 525 MiB, for 6-20% of their passes'
/// time, `transformer_keep_timing`); the 1280-wide levels keep everything (SDXL's 16x16
/// level, where the rebuild would cost a fifth of its passes).
pub(crate) const REBUILD_WIDTH: usize = 640;

/// The fewest elements (batch x tokens x width) of one activation for which a narrow
/// block rebuilds its projections rather than keeping them: 2 MiB in f32. Below it the
/// 14 activations a block would give back are small (at SD 1.5's 256 px, 32x32 and
/// 16x16 latents, 116 MiB over its ten narrow blocks), while the rebuild costs those
/// blocks' passes the same share as elsewhere or more: 21-37% at 1024 tokens 320 wide and
/// 256 tokens 640 wide (`transformer_keep_timing`, 2026-12-02). From 512 px (64x64 and
/// 32x32 latents, 1.3M and 655K elements) SD 1.x's narrow blocks rebuild, as do SDXL's
/// 640-wide ones, where the memory is what a step needs.
pub(crate) const REBUILD_MIN_ELEMENTS: usize = 1 << 19;

/// Whether a transformer block `width` wide, whose activations have `elements` elements
/// (batch x tokens x width), rebuilds its projections in the backward pass: when its
/// state waits for it (`lean`), the block is narrow enough and its activations are large
/// enough to be worth giving back.
pub(crate) fn rebuilds(width: usize, elements: usize, lean: bool) -> bool {
    rebuilds_from(width, elements, lean, REBUILD_MIN_ELEMENTS)
}

/// [`rebuilds`] with the least activation size `min_elements` given.
fn rebuilds_from(width: usize, elements: usize, lean: bool, min_elements: usize) -> bool {
    lean && width <= REBUILD_WIDTH && elements >= min_elements
}

/// Activations of its width (tokens x width) a transformer block `width` wide keeps for
/// its backward pass when its activations have `elements` elements: the input and the
/// two attention outputs when it [`rebuilds`] the rest, else all 17.
pub(crate) fn kept_activations(width: usize, elements: usize, lean: bool) -> u64 {
    if rebuilds(width, elements, lean) {
        3
    } else {
        17
    }
}

/// What one transformer block's backward pass reads. The `Option`s are left out by
/// [`Keep::Lean`] and rebuilt by the backward pass from what is kept, with the same
/// products and so the same bits.
struct BlockSaved {
    /// The block's input (the residual stream before `norm1`).
    x: Tensor,
    stats1: Option<Stats>,
    /// The fused q/k/v projection.
    qkv: Option<Tensor>,
    o1: Tensor,
    lse1: Tensor,
    /// The residual stream after self-attention (`norm2`'s input): `x + out1(o1)`.
    x1: Option<Tensor>,
    stats2: Option<Stats>,
    q2: Option<Tensor>,
    kv2: Tensor,
    o2: Tensor,
    lse2: Tensor,
    /// The residual stream after cross-attention (`norm3`'s input): `x1 + out2(o2)`.
    x2: Option<Tensor>,
    stats3: Option<Stats>,
    /// The GEGLU's input, `ff_proj`'s output.
    h: Option<Tensor>,
}

impl TransformerBlock {
    fn new(w: &Weights, cfg: &TransformerConfig) -> Result<Self> {
        let dim = cfg.channels;
        let (a1, a2) = (w.pp("attn1"), w.pp("attn2"));
        Ok(Self {
            norm1: LayerNorm::new(w, "norm1", dim, 1e-5)?,
            qkv1: Linear::concat(&[
                Linear::new(&a1, "to_q", false)?,
                Linear::new(&a1, "to_k", false)?,
                Linear::new(&a1, "to_v", false)?,
            ])?,
            out1: Linear::new(&a1, "to_out.0", true)?,
            norm2: LayerNorm::new(w, "norm2", dim, 1e-5)?,
            q2: Linear::new(&a2, "to_q", false)?,
            kv2: Linear::concat(&[
                Linear::new(&a2, "to_k", false)?,
                Linear::new(&a2, "to_v", false)?,
            ])?,
            out2: Linear::new(&a2, "to_out.0", true)?,
            norm3: LayerNorm::new(w, "norm3", dim, 1e-5)?,
            ff_proj: Linear::new(w, "ff.net.0.proj", true)?,
            ff_out: Linear::new(w, "ff.net.2", true)?,
            heads: cfg.heads,
            upcast: cfg.upcast,
            width: dim,
            rebuild_min_elements: REBUILD_MIN_ELEMENTS,
        })
    }

    /// Whether attention on `dtype` inputs runs in f32: with upcast attention and a half
    /// precision UNet (f32 and f64 runs are untouched).
    fn upcasts(&self, dtype: DType) -> bool {
        self.upcast && matches!(dtype, DType::F16 | DType::BF16)
    }

    /// Attention of q over k and v (`[B, tokens, C]`), in f32 when [`Self::upcasts`]: q,
    /// k and v are converted for the kernel and the output converted back (the row
    /// log-sum-exp is f32 either way).
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let dtype = q.dtype();
        if !self.upcasts(dtype) {
            return attention_forward(q, k, v, self.heads, scale, AttentionMask::None);
        }
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let (o, lse) = attention_forward(
            &f32(q)?,
            &f32(k)?,
            &f32(v)?,
            self.heads,
            scale,
            AttentionMask::None,
        )?;
        Ok((o.to_dtype(dtype)?, lse))
    }

    /// The backward pass of [`Self::attend`], in f32 when it ran in f32; the gradients
    /// come back in the inputs' dtype.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn attend_backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        lse: &Tensor,
        g: &Tensor,
        scale: f64,
        need: [bool; 3],
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dtype = q.dtype();
        if !self.upcasts(dtype) {
            return attention_backward(
                q,
                k,
                v,
                o,
                lse,
                g,
                self.heads,
                scale,
                AttentionMask::None,
                need,
            );
        }
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let (dq, dk, dv) = attention_backward(
            &f32(q)?,
            &f32(k)?,
            &f32(v)?,
            &f32(o)?,
            lse,
            &f32(g)?,
            self.heads,
            scale,
            AttentionMask::None,
            need,
        )?;
        let back = |t: Option<Tensor>| t.map(|t| t.to_dtype(dtype)).transpose();
        Ok((back(dq)?, back(dk)?, back(dv)?))
    }

    /// The attention scale of heads `inner / heads` wide.
    fn scale(&self, inner: usize) -> f64 {
        ((inner / self.heads) as f64).powf(-0.5)
    }

    /// The block on tokens `[B, N, C]` off the graph; unless `keep` is
    /// [`Keep::Nothing`], what the backward pass reads.
    fn run(
        &self,
        x: &Tensor,
        context: &Tensor,
        keep: Keep,
    ) -> candle_core::Result<(Tensor, Option<BlockSaved>)> {
        let (n1, stats1) = self.norm1.apply(x)?;
        let qkv = self.qkv1.apply(&n1)?;
        drop(n1);
        let [q, k, v] = Linear::parts(&qkv)?;
        let scale = self.scale(q.dim(2)?);
        let (o1, lse1) = self.attend(&q, &k, &v, scale)?;
        let x1 = self.out1.apply_add(&o1, Some(x))?;

        let (n2, stats2) = self.norm2.apply(&x1)?;
        let q2 = self.q2.apply(&n2)?;
        drop(n2);
        let kv2 = self.kv2.apply(context)?;
        let [k2, v2] = Linear::parts(&kv2)?;
        let (o2, lse2) = self.attend(&q2, &k2, &v2, scale)?;
        let x2 = self.out2.apply_add(&o2, Some(&x1))?;

        let (n3, stats3) = self.norm3.apply(&x2)?;
        let h = self.ff_proj.apply(&n3)?;
        drop(n3);
        let y = self.ff_out.apply_add(&geglu_apply(&h)?, Some(&x2))?;
        // Kept: everything, but for a backward pass that waits a narrow block on large
        // enough activations keeps only its input and the attentions' outputs and
        // rebuilds the projections from them.
        let kept = !rebuilds_from(
            self.width,
            x.elem_count(),
            keep == Keep::Lean,
            self.rebuild_min_elements,
        );
        let saved = keep.any().then(|| BlockSaved {
            x: x.clone(),
            stats1,
            qkv: kept.then_some(qkv),
            o1,
            lse1,
            x1: kept.then_some(x1),
            stats2,
            q2: kept.then_some(q2),
            kv2,
            o2,
            lse2,
            x2: kept.then_some(x2),
            stats3,
            h: kept.then_some(h),
        });
        Ok((y, saved))
    }

    /// The gradients of the block's input (when `need_x`) and of the context from the
    /// output gradient `g`.
    fn backward(
        &self,
        s: BlockSaved,
        g: &Tensor,
        need_x: bool,
        need_context: bool,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let scale = self.scale(s.o1.dim(2)?);
        // What was not kept is rebuilt as the forward pass built it.
        let x1 = match s.x1 {
            Some(x1) => x1,
            None => self.out1.apply_add(&s.o1, Some(&s.x))?,
        };
        let x2 = match s.x2 {
            Some(x2) => x2,
            None => self.out2.apply_add(&s.o2, Some(&x1))?,
        };
        let h = match s.h {
            Some(h) => h,
            None => self.ff_proj.apply(&self.norm3.apply(&x2)?.0)?,
        };

        // Feed-forward: y = x2 + ff_out(geglu(ff_proj(norm3(x2)))).
        let da = self.ff_out.input_grad(g)?;
        let dh = geglu_input_grad(&da, &h)?;
        drop((da, h));
        let dn3 = self.ff_proj.input_grad(&dh)?;
        drop(dh);
        let dx2 = self.norm3.input_grad_add(&dn3, &x2, s.stats3.as_ref(), g)?;
        drop((dn3, x2));

        // Cross-attention: x2 = x1 + out2(attn(q2(norm2(x1)), kv2(context))).
        let q2 = match s.q2 {
            Some(q2) => q2,
            None => self.q2.apply(&self.norm2.apply(&x1)?.0)?,
        };
        let do2 = self.out2.input_grad(&dx2)?;
        let [k2, v2] = Linear::parts(&s.kv2)?;
        let (dq2, dk2, dv2) = self.attend_backward(
            &q2,
            &k2,
            &v2,
            &s.o2,
            &s.lse2,
            &do2,
            scale,
            [need_x, need_context, need_context],
        )?;
        drop((do2, k2, v2, s.kv2, q2, s.o2, s.lse2));
        let dcontext = if need_context {
            Some(self.kv2.input_grad_of_parts([dk2, dv2])?)
        } else {
            None
        };
        if !need_x {
            return Ok((None, dcontext));
        }
        let dq2 =
            dq2.ok_or_else(|| candle_core::Error::Msg("attention: no query gradient".into()))?;
        let dn2 = self.q2.input_grad(&dq2)?;
        drop(dq2);
        let dx1 = self
            .norm2
            .input_grad_add(&dn2, &x1, s.stats2.as_ref(), &dx2)?;
        drop((dn2, dx2, x1));

        // Self-attention: x1 = x + out1(attn(qkv1(norm1(x)))).
        let qkv = match s.qkv {
            Some(qkv) => qkv,
            None => self.qkv1.apply(&self.norm1.apply(&s.x)?.0)?,
        };
        let do1 = self.out1.input_grad(&dx1)?;
        let [q, k, v] = Linear::parts(&qkv)?;
        let (dq, dk, dv) =
            self.attend_backward(&q, &k, &v, &s.o1, &s.lse1, &do1, scale, [true; 3])?;
        drop((do1, q, k, v, qkv, s.o1, s.lse1));
        let dn1 = self.qkv1.input_grad_of_parts([dq, dk, dv])?;
        let dx = self
            .norm1
            .input_grad_add(&dn1, &s.x, s.stats1.as_ref(), &dx1)?;
        Ok((Some(dx), dcontext))
    }
}

/// A projection in or out of a spatial transformer: a 1x1 convolution on the image or a
/// linear layer on the tokens (SD 2.x), both a matrix product with a weight `[out, in]`
/// and a bias. The image is read as tokens, and tokens written as the image, through
/// transposed views in the products: no permuted copy either way.
#[derive(Clone, Debug)]
struct Projection {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Projection {
    fn new(w: &Weights, name: &str, linear: bool) -> Result<Self> {
        Ok(if linear {
            let l = Linear::new(w, name, true)?;
            Projection {
                weight: l.weight().clone(),
                bias: l.bias().cloned(),
            }
        } else {
            let (weight, bias) = Conv2d::new(w, name, 1, 0)?.matrix()?;
            Projection {
                weight,
                bias: Some(bias),
            }
        })
    }

    /// Image `[B, C, H, W]` to tokens `[B, H*W, C']`: `X^T W^T + b`.
    fn image_to_tokens(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = x.reshape((b, c, h * w))?.transpose(1, 2)?;
        let bias = self.bias.as_ref().map_or(Bias::None, Bias::Cols);
        matmul(&tokens, &self.weight.t()?, bias, None)
    }

    /// The input gradient of [`Self::image_to_tokens`] from the tokens' gradient, in the
    /// image's layout: dX `[C, HW]` = W^T `[C, C']` g^T `[C', HW]`.
    fn image_to_tokens_grad(&self, g: &Tensor, h: usize, w: usize) -> candle_core::Result<Tensor> {
        let b = g.dim(0)?;
        let gx = matmul(&self.weight.t()?, &g.transpose(1, 2)?, Bias::None, None)?;
        let c = gx.dim(1)?;
        gx.reshape((b, c, h, w))
    }

    /// Tokens `[B, H*W, C']` to the image `[B, C, H, W]`, plus the `residual` image:
    /// Y `[C, HW]` = W `[C, C']` T^T `[C', HW]` + b + residual.
    fn tokens_to_image(
        &self,
        t: &Tensor,
        h: usize,
        w: usize,
        residual: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let b = t.dim(0)?;
        let c = self.weight.dim(0)?;
        let bias = self.bias.as_ref().map_or(Bias::None, Bias::Rows);
        let residual = residual.reshape((b, c, h * w))?;
        matmul(&self.weight, &t.transpose(1, 2)?, bias, Some(&residual))?.reshape((b, c, h, w))
    }

    /// The input gradient of [`Self::tokens_to_image`] from the image's gradient: g^T W.
    fn tokens_to_image_grad(&self, g: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = g.dims4()?;
        let g = g.reshape((b, c, h * w))?.transpose(1, 2)?;
        matmul(&g, &self.weight, Bias::None, None)
    }
}

/// diffusers `Transformer2DModel`: group norm, projection in, transformer blocks,
/// projection out, residual.
#[derive(Clone, Debug)]
pub(crate) struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

/// What a spatial transformer's backward pass reads.
pub(crate) struct SpatialSaved {
    norm_stats: Option<Stats>,
    blocks: Vec<BlockSaved>,
}

impl SpatialTransformer {
    pub(crate) fn new(w: &Weights, cfg: &TransformerConfig) -> Result<Self> {
        let linear = cfg.linear_projection;
        Ok(Self {
            norm: GroupNorm::new(w, "norm", cfg.channels, cfg.groups, 1e-6)?,
            proj_in: Projection::new(w, "proj_in", linear)?,
            blocks: (0..cfg.depth)
                .map(|i| TransformerBlock::new(&w.pp(&format!("transformer_blocks.{i}")), cfg))
                .collect::<Result<Vec<_>>>()?,
            proj_out: Projection::new(w, "proj_out", linear)?,
        })
    }

    /// `x` `[B, C, H, W]` attending to `context` `[B, M, D]`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        recompute: Recompute,
    ) -> Result<Tensor> {
        Ok(apply_block(self, x, Some(context), recompute)?)
    }
}

impl Block for SpatialTransformer {
    type Saved = SpatialSaved;
    const KIND: &'static str = "transformer";

    fn run(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        keep: Keep,
    ) -> candle_core::Result<(Tensor, Option<SpatialSaved>)> {
        let context = context
            .ok_or_else(|| candle_core::Error::Msg("spatial transformer: no context".into()))?;
        let (_, _, hgt, wid) = x.dims4()?;
        let (hn, norm_stats) = self.norm.apply(x)?;
        let mut h = self.proj_in.image_to_tokens(&hn)?;
        drop(hn);
        let mut blocks = Vec::with_capacity(if keep.any() { self.blocks.len() } else { 0 });
        for block in &self.blocks {
            let (next, saved) = block.run(&h, context, keep)?;
            blocks.extend(saved);
            h = next;
        }
        let y = self.proj_out.tokens_to_image(&h, hgt, wid, x)?;
        Ok((y, keep.any().then_some(SpatialSaved { norm_stats, blocks })))
    }

    fn backward(
        &self,
        saved: SpatialSaved,
        x: &Tensor,
        // The context's keys and values are in the saved state.
        _: Option<&Tensor>,
        g: &Tensor,
        need: [bool; 2],
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, _, hgt, wid) = x.dims4()?;
        let SpatialSaved {
            norm_stats,
            mut blocks,
        } = saved;
        let mut dh = self.proj_out.tokens_to_image_grad(g)?;
        let mut dcontext: Option<Tensor> = None;
        for (i, block) in self.blocks.iter().enumerate().rev() {
            let s = blocks.pop().ok_or_else(|| {
                candle_core::Error::Msg("transformer: saved state missing".into())
            })?;
            // The first block's input gradient is needed only when x's is.
            let need_x = i > 0 || need[0];
            let (dx, dc) = block.backward(s, &dh, need_x, need[1])?;
            if let Some(dc) = dc {
                dcontext = Some(match dcontext {
                    Some(sum) => (sum + dc)?,
                    None => dc,
                });
            }
            match dx {
                Some(dx) => dh = dx,
                None => break,
            }
        }
        if !need[0] {
            return Ok((None, dcontext));
        }
        let dhn = self.proj_in.image_to_tokens_grad(&dh, hgt, wid)?;
        drop(dh);
        let dx = self.norm.input_grad_add(&dhn, x, norm_stats.as_ref(), g)?;
        Ok((Some(dx), dcontext))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor, Var};

    use super::*;
    use crate::model::test_weights::{wave, Waves};

    /// The weights of one SD 2.x-style spatial transformer (linear projections), `c`
    /// wide, one block, attending to a `d`-wide context; q and k `qk` times larger than
    /// the rest, so that the scores can leave f16's range.
    fn transformer_weights(c: usize, d: usize, qk: f64) -> HashMap<String, Tensor> {
        let mut w = Waves::default();
        let mut put = |name: &str, shape: &[usize], scale: f64| w.put(name, shape, scale);
        let norm = |put: &mut dyn FnMut(&str, &[usize], f64), p: &str| {
            put(&format!("{p}.weight"), &[c], 1.0);
            put(&format!("{p}.bias"), &[c], 0.1);
        };
        let b = "transformer_blocks.0";
        put("norm.weight", &[c], 0.2);
        put("norm.bias", &[c], 0.1);
        for p in ["proj_in", "proj_out"] {
            put(&format!("{p}.weight"), &[c, c], 0.3);
            put(&format!("{p}.bias"), &[c], 0.1);
        }
        for n in ["norm1", "norm2", "norm3"] {
            norm(&mut put, &format!("{b}.{n}"));
        }
        for (attn, ctx) in [("attn1", c), ("attn2", d)] {
            put(&format!("{b}.{attn}.to_q.weight"), &[c, c], 0.3 * qk);
            put(&format!("{b}.{attn}.to_k.weight"), &[c, ctx], 0.3 * qk);
            put(&format!("{b}.{attn}.to_v.weight"), &[c, ctx], 0.3);
            put(&format!("{b}.{attn}.to_out.0.weight"), &[c, c], 0.3);
            put(&format!("{b}.{attn}.to_out.0.bias"), &[c], 0.1);
        }
        put(&format!("{b}.ff.net.0.proj.weight"), &[8 * c, c], 0.3);
        put(&format!("{b}.ff.net.0.proj.bias"), &[8 * c], 0.1);
        put(&format!("{b}.ff.net.2.weight"), &[c, 4 * c], 0.3);
        put(&format!("{b}.ff.net.2.bias"), &[c], 0.1);
        w.map
    }

    /// The transformer's output and the context's gradient (of the output's sum of
    /// squares), in f32.
    fn run(
        tensors: &HashMap<String, Tensor>,
        cfg: &TransformerConfig,
        dtype: DType,
    ) -> (Tensor, Tensor) {
        let w = Weights::from_tensors(tensors.clone(), dtype, Device::Cpu);
        let st = SpatialTransformer::new(&w, cfg).expect("weights");
        let x = wave(&[1, cfg.channels, 4, 4], 0.5, 2.0)
            .to_dtype(dtype)
            .expect("x");
        let ctx = Var::from_tensor(
            &wave(&[1, 5, 8], 0.25, 1.0)
                .to_dtype(dtype)
                .expect("context"),
        )
        .expect("var");
        let y = st
            .forward(&x, ctx.as_tensor(), Recompute::Off)
            .expect("forward");
        let loss = y
            .to_dtype(DType::F32)
            .and_then(|y| y.sqr()?.sum_all())
            .expect("loss");
        let grads = loss.backward().expect("backward");
        let g = grads.get(ctx.as_tensor()).expect("context gradient");
        (
            y.to_dtype(DType::F32).expect("y"),
            g.to_dtype(DType::F32).expect("g"),
        )
    }

    fn finite(t: &Tensor) -> bool {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("values")
            .iter()
            .all(|v| v.is_finite())
    }

    fn rel(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).and_then(|d| d.sqr()?.sum_all()?.to_scalar::<f32>());
        let n = b.sqr().and_then(|n| n.sum_all()?.to_scalar::<f32>());
        (d.expect("diff") / n.expect("norm")).sqrt()
    }

    /// A narrow block that rebuilds its projections in the backward pass gives the same
    /// output and the same input and context gradients, bit for bit, as one that keeps
    /// them; the rebuild runs only on activations of at least [`REBUILD_MIN_ELEMENTS`]
    /// (lowered here so that a small block takes that path).
    #[test]
    fn rebuilt_projections_give_the_kept_gradients() -> candle_core::Result<()> {
        let (c, side) = (16, 6);
        let cfg = TransformerConfig {
            channels: c,
            heads: 2,
            depth: 2,
            groups: 4,
            linear_projection: false,
            upcast: false,
        };
        let mut tensors = transformer_weights(c, 8, 1.0);
        // A second block: block 0's weights times 0.9 under block 1's names.
        let second = tensors
            .iter()
            .filter_map(|(k, v)| {
                let rest = k.strip_prefix("transformer_blocks.0.")?;
                Some((v * 0.9).map(|v| (format!("transformer_blocks.1.{rest}"), v)))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        tensors.extend(second);
        for p in ["proj_in", "proj_out"] {
            let w = tensors[&format!("{p}.weight")].reshape((c, c, 1, 1))?;
            tensors.insert(format!("{p}.weight"), w);
        }
        let w = Weights::from_tensors(tensors, DType::F32, Device::Cpu);
        let mut st = SpatialTransformer::new(&w, &cfg)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let x = wave(&[1, c, side, side], 0.5, 2.0);
        let ctx = wave(&[1, 5, 8], 0.25, 1.0);
        let g = wave(&[1, c, side, side], 0.75, 1.0);
        let elements = c * side * side;
        assert!(
            !rebuilds(c, elements, true),
            "the default threshold keeps small blocks"
        );
        // The output, the input and context gradients, and whether every block rebuilt.
        let pass =
            |st: &SpatialTransformer, keep: Keep| -> candle_core::Result<([Tensor; 3], bool)> {
                let (y, saved) = st.run(&x, Some(&ctx), keep)?;
                let saved = saved.ok_or_else(|| candle_core::Error::Msg("nothing kept".into()))?;
                let rebuilt = saved
                    .blocks
                    .iter()
                    .all(|b| b.qkv.is_none() && b.h.is_none());
                let (dx, dctx) = st.backward(saved, &x, Some(&ctx), &g, [true, true])?;
                let (dx, dctx) = dx
                    .zip(dctx)
                    .ok_or_else(|| candle_core::Error::Msg("no gradient".into()))?;
                Ok(([y, dx, dctx], rebuilt))
            };
        let (kept, kept_rebuilt) = pass(&st, Keep::All)?;
        let (_, small_rebuilt) = pass(&st, Keep::Lean)?;
        for b in &mut st.blocks {
            b.rebuild_min_elements = elements;
        }
        let (rebuilt, large_rebuilt) = pass(&st, Keep::Lean)?;
        assert!(!kept_rebuilt, "Keep::All keeps everything");
        assert!(!small_rebuilt, "a small block keeps everything");
        assert!(large_rebuilt, "a large enough block rebuilds");
        for (name, (a, b)) in ["output", "input gradient", "context gradient"]
            .iter()
            .zip(kept.iter().zip(&rebuilt))
        {
            let (a, b) = (
                a.flatten_all()?.to_vec1::<f32>()?,
                b.flatten_all()?.to_vec1::<f32>()?,
            );
            assert!(a.iter().any(|v| *v != 0.0), "{name} is not all zeros");
            let same = a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(same, "{name} differs when rebuilt");
        }
        Ok(())
    }

    /// Timing of one spatial transformer's forward and backward passes with its state
    /// kept in full ([`Keep::All`]) and lean ([`Keep::Lean`], rebuilt in the backward
    /// pass), alternating, at the 512 px levels of SD 1.5 and SDXL (one block). Not a
    /// test: run it by hand, in release, with `cargo test --release --lib
    /// transformer_keep_timing -- --ignored --nocapture`.
    #[test]
    #[ignore = "a timing harness, run by hand"]
    fn transformer_keep_timing() -> candle_core::Result<()> {
        // (width, heads, latent side): SD 1.5's three levels, SDXL's two.
        let levels = [
            (320, 8, 64),
            (640, 8, 32),
            (1280, 8, 16),
            (640, 10, 32),
            (1280, 20, 16),
        ];
        println!("| width x tokens (heads) | all ms | lean ms | lean / all |");
        for (c, heads, side) in levels {
            let cfg = TransformerConfig {
                channels: c,
                heads,
                depth: 1,
                groups: 32,
                linear_projection: true,
                upcast: false,
            };
            let w =
                Weights::from_tensors(transformer_weights(c, 768, 1.0), DType::F32, Device::Cpu);
            let st = SpatialTransformer::new(&w, &cfg)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            let x = wave(&[1, c, side, side], 0.5, 1.0);
            let ctx = wave(&[1, 77, 768], 0.25, 1.0);
            let g = wave(&[1, c, side, side], 0.75, 1.0);
            let mut times = [Vec::new(), Vec::new()];
            for rep in 0..10 {
                let mode = rep % 2;
                let keep = if mode == 0 { Keep::All } else { Keep::Lean };
                let start = std::time::Instant::now();
                let (_, saved) = st.run(&x, Some(&ctx), keep)?;
                let saved = saved.ok_or_else(|| candle_core::Error::Msg("nothing kept".into()))?;
                drop(st.backward(saved, &x, Some(&ctx), &g, [true, true])?);
                if rep >= 2 {
                    times[mode].push(start.elapsed().as_secs_f64() * 1e3);
                }
            }
            let median = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let (all, lean) = (median(&mut times[0]), median(&mut times[1]));
            println!(
                "| {c} x {} ({heads}) | {all:.1} | {lean:.1} | {:.3} |",
                side * side,
                lean / all
            );
        }
        Ok(())
    }

    /// Upcast attention: scores past f16's range stay finite when upcast and match f32
    /// (output and context gradient); without upcast f16 overflows (SD 2.1's black
    /// images); in f32 upcast changes nothing, bit for bit.
    #[test]
    fn upcast_attention_keeps_half_precision_scores_in_range() {
        let cfg = TransformerConfig {
            channels: 8,
            heads: 2,
            depth: 1,
            groups: 4,
            linear_projection: true,
            upcast: true,
        };
        let plain = TransformerConfig {
            upcast: false,
            ..cfg
        };
        // q and k 1000x larger: scores of order 1e5, past f16's 65504.
        let tensors = transformer_weights(8, 8, 1000.0);
        let (y32, g32) = run(&tensors, &cfg, DType::F32);
        let (y32_plain, g32_plain) = run(&tensors, &plain, DType::F32);
        assert!(finite(&y32) && finite(&g32));
        let bits = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("v");
        assert_eq!(bits(&y32), bits(&y32_plain), "f32 output changed by upcast");
        assert_eq!(
            bits(&g32),
            bits(&g32_plain),
            "f32 gradient changed by upcast"
        );

        let (y16, g16) = run(&tensors, &cfg, DType::F16);
        assert!(finite(&y16) && finite(&g16), "upcast f16 is not finite");
        assert!(rel(&y16, &y32) < 1e-2, "output {}", rel(&y16, &y32));
        assert!(rel(&g16, &g32) < 1e-2, "gradient {}", rel(&g16, &g32));
        let (y16_plain, _) = run(&tensors, &plain, DType::F16);
        assert!(
            !finite(&y16_plain),
            "the scores were meant to overflow f16 without upcast"
        );
    }
}
