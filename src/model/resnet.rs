//! diffusers `ResnetBlock2D`, shared by the UNet (with a time embedding) and the VAE
//! (without one).

use candle_core::{DType, Tensor};

use super::layers::{
    apply_block, apply_block_joined, Block, Conv2d, GroupNorm, Keep, Linear, Recompute, Stats,
};
use super::weights::Weights;
use crate::error::{Error, Result};

/// The shape of one resnet block.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Group-norm groups and epsilon of both norms.
    pub groups: usize,
    pub eps: f64,
    /// Whether the block adds a projected time embedding (the UNet's do, the VAE's don't).
    pub time_embedding: bool,
}

/// diffusers `ResnetBlock2D`.
#[derive(Clone, Debug)]
pub(crate) struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    pub(crate) fn new(w: &Weights, cfg: &ResnetConfig) -> Result<Self> {
        let conv_shortcut = if cfg.in_channels != cfg.out_channels {
            Some(Conv2d::new(w, "conv_shortcut", 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::new(w, "norm1", cfg.in_channels, cfg.groups, cfg.eps)?,
            conv1: Conv2d::new(w, "conv1", 1, 1)?,
            time_emb_proj: if cfg.time_embedding {
                Some(Linear::new(w, "time_emb_proj", true)?)
            } else {
                None
            },
            norm2: GroupNorm::new(w, "norm2", cfg.out_channels, cfg.groups, cfg.eps)?,
            conv2: Conv2d::new(w, "conv2", 1, 1)?,
            conv_shortcut,
        })
    }

    /// `temb` is the already activated time embedding (`silu(temb)`), `[B, T]`. It is the
    /// block's second input: when it is on a gradient path (SDXL's pooled text vector
    /// feeds it through the added embedding), the block's backward pass yields its
    /// gradient too.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        temb: Option<&Tensor>,
        recompute: Recompute,
    ) -> Result<Tensor> {
        let temb = self.time_embedding(temb)?;
        Ok(apply_block(self, x, temb, recompute)?)
    }

    /// [`Self::forward`] on `x` and `skip` joined along the channels (the UNet's up path),
    /// without keeping the join for the backward pass ([`apply_block_joined`]).
    pub(crate) fn forward_joined(
        &self,
        x: &Tensor,
        skip: &Tensor,
        temb: Option<&Tensor>,
        recompute: Recompute,
    ) -> Result<Tensor> {
        let temb = self.time_embedding(temb)?;
        Ok(apply_block_joined(self, [x, skip], temb, recompute)?)
    }

    /// `temb` when the block projects a time embedding, None when it does not; an error
    /// when the two disagree.
    fn time_embedding<'a>(&self, temb: Option<&'a Tensor>) -> Result<Option<&'a Tensor>> {
        Ok(match (&self.time_emb_proj, temb) {
            (Some(_), Some(t)) => Some(t),
            (Some(_), None) => {
                return Err(Error::input(
                    "resnet block",
                    "the block projects a time embedding but none was given",
                ))
            }
            (None, Some(_)) => {
                return Err(Error::input(
                    "resnet block",
                    "a time embedding was given to a block without a time projection",
                ))
            }
            (None, None) => None,
        })
    }
}

/// What a resnet block's backward pass reads besides its input: the first convolution's
/// output (time embedding added, the second norm's input) and the norms' statistics.
pub(crate) struct ResnetSaved {
    stats1: Option<Stats>,
    h1: Tensor,
    stats2: Option<Stats>,
}

impl Block for ResnetBlock {
    type Saved = ResnetSaved;
    const KIND: &'static str = "resnet";

    /// `temb`: the activated time embedding `[B, T]` (the UNet's blocks), projected here
    /// to `[B, C]` and added to every position.
    fn run(
        &self,
        x: &Tensor,
        temb: Option<&Tensor>,
        keep: Keep,
    ) -> candle_core::Result<(Tensor, Option<ResnetSaved>)> {
        let r = self;
        let (a1, stats1) = r.norm1.apply_silu(x)?;
        let h1 = match (&r.time_emb_proj, temb) {
            (Some(proj), Some(t)) => {
                let t = proj.apply(t)?;
                let (b, c) = t.dims2()?;
                if b == 1 {
                    // One value per channel: added with conv1's bias, in the same pass
                    // as the product, not as one more pass over the image.
                    let t = t.reshape(c)?;
                    let bias = match r.conv1.bias() {
                        Some(cb) => (cb + t)?,
                        None => t,
                    };
                    r.conv1.apply_with_bias(&a1, Some(&bias))?
                } else {
                    r.conv1
                        .apply(&a1)?
                        .broadcast_add(&t.reshape((b, c, 1, 1))?)?
                }
            }
            _ => r.conv1.apply(&a1)?,
        };
        drop(a1);
        let (a2, stats2) = r.norm2.apply_silu(&h1)?;
        // Kept for the backward pass, or freed before the second convolution (the VAE's
        // encoding at 512 px: 128 MiB less at its peak).
        let saved = keep.any().then_some(ResnetSaved { stats1, h1, stats2 });
        let h2 = r.conv2.apply(&a2)?;
        drop(a2);
        let y = match &r.conv_shortcut {
            Some(c) => (c.apply(x)? + h2)?,
            None => (x + h2)?,
        };
        Ok((y, saved))
    }

    fn backward(
        &self,
        s: ResnetSaved,
        x: &Tensor,
        _: Option<&Tensor>,
        g: &Tensor,
        need: [bool; 2],
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if !need[0] && !need[1] {
            return Ok((None, None));
        }
        let r = self;
        let (_, _, h, w) = x.dims4()?;
        let (_, _, h1h, h1w) = s.h1.dims4()?;
        // y = shortcut(x) + conv2(silu(norm2(h1))), h1 = conv1(silu(norm1(x))) + time.
        let da2 = r.conv2.input_grad(g, h1h, h1w)?;
        // The SiLU's input is recomputed from h1 (one elementwise pass), not kept; on CUDA
        // one fused kernel takes the SiLU's and the norm's gradients together.
        let dh1 = r
            .norm2
            .silu_input_grad(&da2, &s.h1, s.stats2.as_ref(), None)?;
        drop((da2, s.h1));
        // The time embedding is added at every position: its projection's gradient is
        // dh1 summed over space (in f32 at least), then through the projection.
        let dtemb = match (&r.time_emb_proj, need[1]) {
            (Some(proj), true) => {
                let dtype = dh1.dtype();
                let acc = if dtype == DType::F64 {
                    DType::F64
                } else {
                    DType::F32
                };
                let dt = dh1.to_dtype(acc)?.sum((2, 3))?.to_dtype(dtype)?;
                Some(proj.input_grad(&dt)?)
            }
            _ => None,
        };
        if !need[0] {
            return Ok((None, dtemb));
        }
        let da1 = r.conv1.input_grad(&dh1, h, w)?;
        drop(dh1);
        let shortcut = match &r.conv_shortcut {
            Some(c) => c.input_grad(g, h, w)?,
            None => g.clone(),
        };
        // The shortcut's gradient is summed in the norm's last pass.
        let dx = r
            .norm1
            .silu_input_grad(&da1, x, s.stats1.as_ref(), Some(&shortcut))?;
        Ok((Some(dx), dtemb))
    }
}
