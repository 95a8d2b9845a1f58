//! The SD 1.x VAE (diffusers `AutoencoderKL` key names): the encoder for latent caching,
//! the decoder for previews. Neither sits on the training gradient path.

use candle_core::{DType, Tensor};

use super::config::VaeConfig;
use super::layers::{
    attention_forward, release_scratch, upsample_nearest_2x, AttentionMask, Conv2d, GroupNorm,
    Linear,
};
use super::resnet::{ResnetBlock as Resnet, ResnetConfig};
use super::weights::Weights;
use crate::error::{Error, Result};

const EPS: f64 = 1e-6;

/// The VAE's resnets: no time embedding, epsilon 1e-6.
fn resnet(w: &Weights, in_channels: usize, out_channels: usize, groups: usize) -> Result<Resnet> {
    let cfg = ResnetConfig {
        in_channels,
        out_channels,
        groups,
        eps: EPS,
        time_embedding: false,
    };
    Resnet::new(w, &cfg)
}

/// The mid-block self-attention: one head over all channels.
#[derive(Debug)]
struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl VaeAttention {
    fn new(w: &Weights, channels: usize, groups: usize) -> Result<Self> {
        // diffusers < 0.14 wrote query/key/value/proj_attn.
        let name = |new: &str, old: &str| {
            if w.contains(&format!("{new}.weight")) {
                new.to_string()
            } else {
                old.to_string()
            }
        };
        Ok(Self {
            group_norm: GroupNorm::new(w, "group_norm", channels, groups, EPS)?,
            to_q: Linear::new(w, &name("to_q", "query"), true)?,
            to_k: Linear::new(w, &name("to_k", "key"), true)?,
            to_v: Linear::new(w, &name("to_v", "value"), true)?,
            to_out: Linear::new(w, &name("to_out.0", "proj_attn"), true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.to_q.forward(&t)?;
        let k = self.to_k.forward(&t)?;
        let v = self.to_v.forward(&t)?;
        // One head over all channels; the VAE has no backward pass.
        let (o, _) = attention_forward(&q, &k, &v, 1, (c as f64).powf(-0.5), AttentionMask::None)?;
        let o = self.to_out.forward(&o)?;
        let o = o.transpose(1, 2)?.reshape((b, c, h, w))?;
        Ok((o + x)?)
    }
}

#[derive(Debug)]
struct MidBlock {
    resnet0: Resnet,
    attention: VaeAttention,
    resnet1: Resnet,
}

impl MidBlock {
    fn new(w: &Weights, c: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            resnet0: resnet(&w.pp("resnets.0"), c, c, groups)?,
            attention: VaeAttention::new(&w.pp("attentions.0"), c, groups)?,
            resnet1: resnet(&w.pp("resnets.1"), c, c, groups)?,
        })
    }

    fn forward(&self, x: Tensor) -> Result<Tensor> {
        let x = self.resnet0.forward_owned(x)?;
        let x = self.attention.forward(&x)?;
        self.resnet1.forward_owned(x)
    }
}

/// The latent distribution of one image: `mean` and `logvar`, each `[B, 4, h, w]`.
#[derive(Clone, Debug)]
pub struct LatentDist {
    pub mean: Tensor,
    pub logvar: Tensor,
}

#[derive(Debug)]
struct Encoder {
    conv_in: Conv2d,
    blocks: Vec<(Vec<Resnet>, Option<Conv2d>)>,
    mid: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Conv2d,
}

#[derive(Debug)]
struct Decoder {
    post_quant_conv: Conv2d,
    conv_in: Conv2d,
    mid: MidBlock,
    blocks: Vec<(Vec<Resnet>, Option<Conv2d>)>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

/// The autoencoder.
#[derive(Debug)]
pub struct Vae {
    encoder: Encoder,
    decoder: Option<Decoder>,
    config: VaeConfig,
}

impl Vae {
    /// Loads the encoder, and the decoder when its weights are present.
    pub fn new(w: &Weights, cfg: &VaeConfig) -> Result<Self> {
        let boc = &cfg.block_out_channels;
        if boc.is_empty() {
            return Err(Error::config("vae.block_out_channels", "is empty"));
        }
        let groups = cfg.norm_num_groups;
        let levels = boc.len();
        let we = w.pp("encoder");
        let mut blocks = Vec::with_capacity(levels);
        let mut out_c = boc[0];
        for (i, &c) in boc.iter().enumerate() {
            let in_c = out_c;
            out_c = c;
            let wb = we.pp(&format!("down_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let rin = if j == 0 { in_c } else { out_c };
                    resnet(&wb.pp(&format!("resnets.{j}")), rin, out_c, groups)
                })
                .collect::<Result<Vec<_>>>()?;
            // Downsample2D with padding 0: the input is padded by one on the right and
            // bottom before a stride-2 convolution.
            let down = if i + 1 < levels {
                Some(Conv2d::new(&wb, "downsamplers.0.conv", 2, 0)?)
            } else {
                None
            };
            blocks.push((resnets, down));
        }
        let top = boc[levels - 1];
        let encoder = Encoder {
            conv_in: Conv2d::new(&we, "conv_in", 1, 1)?,
            blocks,
            mid: MidBlock::new(&we.pp("mid_block"), top, groups)?,
            conv_norm_out: GroupNorm::new(&we, "conv_norm_out", top, groups, EPS)?,
            conv_out: Conv2d::new(&we, "conv_out", 1, 1)?,
            quant_conv: Conv2d::new(w, "quant_conv", 1, 0)?,
        };
        let decoder = if w.contains("decoder.conv_in.weight") {
            Some(Self::decoder(w, cfg)?)
        } else {
            None
        };
        Ok(Self {
            encoder,
            decoder,
            config: cfg.clone(),
        })
    }

    fn decoder(w: &Weights, cfg: &VaeConfig) -> Result<Decoder> {
        let boc = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups;
        let levels = boc.len();
        let wd = w.pp("decoder");
        let rev: Vec<usize> = boc.iter().rev().copied().collect();
        let mut blocks = Vec::with_capacity(levels);
        let mut out_c = rev[0];
        for (i, &c) in rev.iter().enumerate() {
            let prev = out_c;
            out_c = c;
            let wb = wd.pp(&format!("up_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let rin = if j == 0 { prev } else { out_c };
                    resnet(&wb.pp(&format!("resnets.{j}")), rin, out_c, groups)
                })
                .collect::<Result<Vec<_>>>()?;
            let up = if i + 1 < levels {
                Some(Conv2d::new(&wb, "upsamplers.0.conv", 1, 1)?)
            } else {
                None
            };
            blocks.push((resnets, up));
        }
        Ok(Decoder {
            post_quant_conv: Conv2d::new(w, "post_quant_conv", 1, 0)?,
            conv_in: Conv2d::new(&wd, "conv_in", 1, 1)?,
            mid: MidBlock::new(&wd.pp("mid_block"), rev[0], groups)?,
            blocks,
            conv_norm_out: GroupNorm::new(&wd, "conv_norm_out", boc[0], groups, EPS)?,
            conv_out: Conv2d::new(&wd, "conv_out", 1, 1)?,
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The dtype it computes in (its weights'; see [`crate::model::vae_dtype`]). Inputs
    /// in another dtype are converted; its outputs are in this one.
    pub fn dtype(&self) -> DType {
        self.encoder.conv_in.dtype()
    }

    /// The latent distribution of images `[B, 3, H, W]` in [-1, 1] (unscaled latents).
    pub fn encode(&self, image: &Tensor) -> Result<LatentDist> {
        let e = &self.encoder;
        let image = image.to_dtype(e.conv_in.dtype())?;
        let mut x = e.conv_in.forward(&image)?;
        // Each `x` below is the only holder of its values (a convolution's, a resnet's or
        // the attention's fresh output), as the resnets' owned passes require: they
        // write their residual sums into it, two image-sized tensors at a time.
        for (resnets, down) in &e.blocks {
            for r in resnets {
                x = r.forward_owned(x)?;
            }
            if let Some(d) = down {
                // One row and column of zeros at the bottom and right, as diffusers pads
                // before the stride-2 convolution. Each copy is freed as soon as the next
                // is made: at 512 px they are 128 MiB each, and holding the input and
                // both copies through the convolution was the encoding's peak.
                let padded = {
                    let right = x.pad_with_zeros(3, 0, 1)?;
                    drop(x);
                    right.pad_with_zeros(2, 0, 1)?
                };
                x = d.forward(&padded)?;
            }
        }
        x = e.mid.forward(x)?;
        x = e.conv_out.forward_after_norm_silu(&e.conv_norm_out, &x)?;
        // The convolutions' buffers at the image's size are not a step's: freed, not kept.
        release_scratch();
        let moments = e.quant_conv.forward(&x)?;
        let half = moments.dim(1)? / 2;
        let mean = moments.narrow(1, 0, half)?;
        let logvar = moments.narrow(1, half, half)?.clamp(-30f32, 20f32)?;
        Ok(LatentDist { mean, logvar })
    }

    /// Images (nominally in [-1, 1], unclamped) from unscaled latents.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let d = self
            .decoder
            .as_ref()
            .ok_or_else(|| Error::input("vae", "this model file has no VAE decoder weights"))?;
        let latents = latents.to_dtype(d.post_quant_conv.dtype())?;
        let mut x = d.conv_in.forward(&d.post_quant_conv.forward(&latents)?)?;
        // As in the encoding, `x` is always the only holder of its values.
        x = d.mid.forward(x)?;
        for (resnets, up) in &d.blocks {
            for r in resnets {
                x = r.forward_owned(x)?;
            }
            if let Some(u) = up {
                x = u.forward(&upsample_nearest_2x(&x)?)?;
            }
        }
        d.conv_out.forward_after_norm_silu(&d.conv_norm_out, &x)
    }
}

impl LatentDist {
    /// `mean + exp(logvar / 2) * noise`, the sample diffusers' `latent_dist.sample()` draws.
    pub fn sample_with(&self, noise: &Tensor) -> Result<Tensor> {
        let std = (&self.logvar * 0.5)?.exp()?;
        Ok((&self.mean + std.mul(noise)?)?)
    }
}
