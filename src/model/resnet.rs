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

    /// [`Self::forward`] for a no-gradient pass without a time embedding (the VAE's) that
    /// owns its input, with two image-sized tensors at a time instead of three: on the
    /// CPU in f32 the first convolution reads `x` through its norm and SiLU, and the
    /// second adds its output, read the same way from the first's, into `x` itself (or
    /// into the shortcut's output). The values are those of [`Self::forward`].
    ///
    /// `x` must be its storage's only holder: the sum is written into it.
    pub(crate) fn forward_owned(&self, x: Tensor) -> Result<Tensor> {
        if self.time_emb_proj.is_some() || x.track_op() {
            return self.forward(&x, None, Recompute::Off);
        }
        let Some(h1) = self.conv1.apply_after_norm_silu(&self.norm1, &x)? else {
            return self.forward(&x, None, Recompute::Off);
        };
        let out = match &self.conv_shortcut {
            Some(c) => c.apply(&x)?,
            None => x,
        };
        if self.conv2.add_after_norm_silu(&self.norm2, &h1, &out)? {
            return Ok(out);
        }
        let (a2, _) = self.norm2.apply_silu(&h1)?;
        drop(h1);
        Ok((out + self.conv2.apply(&a2)?)?)
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

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::model::test_weights::{wave, Waves};

    /// A VAE-style block (no time embedding), `cin` to `cout` channels.
    fn block(cin: usize, cout: usize) -> ResnetBlock {
        let mut w = Waves::default();
        let mut put = |name: &str, shape: &[usize], scale: f64| w.put(name, shape, scale);
        for (norm, c) in [("norm1", cin), ("norm2", cout)] {
            put(&format!("{norm}.weight"), &[c], 1.0);
            put(&format!("{norm}.bias"), &[c], 0.3);
        }
        put("conv1.weight", &[cout, cin, 3, 3], 0.2);
        put("conv1.bias", &[cout], 0.1);
        put("conv2.weight", &[cout, cout, 3, 3], 0.2);
        put("conv2.bias", &[cout], 0.1);
        if cin != cout {
            put("conv_shortcut.weight", &[cout, cin, 1, 1], 0.3);
            put("conv_shortcut.bias", &[cout], 0.1);
        }
        let weights = Weights::from_tensors(w.map, DType::F32, Device::Cpu);
        let cfg = ResnetConfig {
            in_channels: cin,
            out_channels: cout,
            groups: 4,
            eps: 1e-6,
            time_embedding: false,
        };
        ResnetBlock::new(&weights, &cfg).expect("block")
    }

    /// The owned no-gradient pass (norms read by the convolutions, the sum written into
    /// the input) gives the separate passes' values bit for bit: with and without a
    /// shortcut, at sizes taking the Winograd path (64x64, and odd, 33x35), two images.
    #[test]
    fn owned_pass_equals_the_separate_passes() -> Result<()> {
        for (cin, cout) in [(8, 8), (8, 12)] {
            let r = block(cin, cout);
            for (h, w) in [(64, 64), (33, 35)] {
                let x = wave(&[2, cin, h, w], 0.5, 2.0);
                // The fused path serves these sizes (so the comparison is not of the
                // ordinary pass with itself).
                let h1 = r.conv1.apply_after_norm_silu(&r.norm1, &x)?;
                let h1 = h1.ok_or_else(|| Error::input("test", "not fused"))?;
                let into = Tensor::zeros((2, cout, h, w), DType::F32, &Device::Cpu)?;
                assert!(r.conv2.add_after_norm_silu(&r.norm2, &h1, &into)?);
                let expected = r.forward(&x, None, Recompute::Off)?;
                let owned = r.forward_owned(x.copy()?)?;
                let (a, b) = (
                    expected.flatten_all()?.to_vec1::<f32>()?,
                    owned.flatten_all()?.to_vec1::<f32>()?,
                );
                assert_eq!(a, b, "{cin} -> {cout} at {h}x{w}");
                // The input was written only where it is the output.
                let unchanged = x.copy()?;
                let _ = r.forward_owned(unchanged.clone())?;
                if cin != cout {
                    assert_eq!(
                        unchanged.flatten_all()?.to_vec1::<f32>()?,
                        x.flatten_all()?.to_vec1::<f32>()?
                    );
                }
            }
        }
        Ok(())
    }

    /// Below the Winograd sizes the owned pass is the ordinary one.
    #[test]
    fn owned_pass_falls_back_on_small_images() -> Result<()> {
        let r = block(8, 8);
        // 4x4: below where Winograd starts with either CPU's sizes (8x8 without AVX-512).
        let x = wave(&[1, 8, 4, 4], 0.5, 2.0);
        assert!(r.conv1.apply_after_norm_silu(&r.norm1, &x)?.is_none());
        let expected = r.forward(&x, None, Recompute::Off)?;
        let owned = r.forward_owned(x.copy()?)?;
        assert_eq!(
            expected.flatten_all()?.to_vec1::<f32>()?,
            owned.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }
}
