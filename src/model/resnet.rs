//! diffusers `ResnetBlock2D`, shared by the UNet (with a time embedding) and the VAE
//! (without one).

use candle_core::Tensor;

use super::layers::{Conv2d, GroupNorm, Linear};
use super::weights::Weights;
use crate::error::Result;

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
#[derive(Debug)]
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

    /// `temb` is the already activated time embedding (`silu(temb)`), `[B, C]`.
    pub(crate) fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.conv1.forward_after_norm_silu(&self.norm1, x)?;
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => {
                let t = proj.forward(t)?;
                let (b, c) = t.dims2()?;
                h.broadcast_add(&t.reshape((b, c, 1, 1))?)?
            }
            _ => h,
        };
        let h = self.conv2.forward_after_norm_silu(&self.norm2, &h)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        Ok((shortcut + h)?)
    }
}
