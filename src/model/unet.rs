//! The SD 1.x UNet (diffusers `UNet2DConditionModel` key names), training grade: frozen
//! weights, gradients flow to the conditioning only.

use candle_core::{DType, Device, Tensor};

use super::config::UnetConfig;
use super::layers::{attention, gelu_erf, silu, upsample_nearest_to, Conv2d, GroupNorm, Linear};
use super::weights::Weights;
use crate::error::{Error, Result};

/// diffusers `ResnetBlock2D`.
pub(crate) struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    /// `temb`: whether the block takes a time embedding (the UNet's do, the VAE's don't).
    pub(crate) fn new(
        w: &Weights,
        in_c: usize,
        out_c: usize,
        groups: usize,
        eps: f64,
        temb: bool,
    ) -> Result<Self> {
        let conv_shortcut = if in_c != out_c {
            Some(Conv2d::new(w, "conv_shortcut", 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::new(w, "norm1", in_c, groups, eps)?,
            conv1: Conv2d::new(w, "conv1", 1, 1)?,
            time_emb_proj: if temb {
                Some(Linear::new(w, "time_emb_proj", true)?)
            } else {
                None
            },
            norm2: GroupNorm::new(w, "norm2", out_c, groups, eps)?,
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

/// diffusers `Attention` as used by `BasicTransformerBlock`: no bias on q, k, v.
struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl CrossAttention {
    fn new(w: &Weights, heads: usize) -> Result<Self> {
        Ok(Self {
            to_q: Linear::new(w, "to_q", false)?,
            to_k: Linear::new(w, "to_k", false)?,
            to_v: Linear::new(w, "to_v", false)?,
            to_out: Linear::new(w, "to_out.0", true)?,
            heads,
        })
    }

    /// `x`: `[B, N, C]`; `context`: `[B, M, D]` or `None` for self-attention.
    fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        let (b, n, inner) = q.dims3()?;
        let m = k.dim(1)?;
        let h = self.heads;
        let dh = inner / h;
        let split = |y: Tensor, len: usize| -> Result<Tensor> {
            Ok(y.reshape((b, len, h, dh))?
                .transpose(1, 2)?
                .reshape((b * h, len, dh))?)
        };
        let o = attention(
            &split(q, n)?,
            &split(k, m)?,
            &split(v, m)?,
            (dh as f64).powf(-0.5),
            None,
        )?;
        let o = o
            .reshape((b, h, n, dh))?
            .transpose(1, 2)?
            .reshape((b, n, inner))?;
        self.to_out.forward(&o)
    }
}

/// diffusers `BasicTransformerBlock` with a GEGLU feed-forward.
struct TransformerBlock {
    norm1: super::layers::LayerNorm,
    attn1: CrossAttention,
    norm2: super::layers::LayerNorm,
    attn2: CrossAttention,
    norm3: super::layers::LayerNorm,
    ff_proj: Linear,
    ff_out: Linear,
}

impl TransformerBlock {
    fn new(w: &Weights, dim: usize, heads: usize) -> Result<Self> {
        use super::layers::LayerNorm;
        Ok(Self {
            norm1: LayerNorm::new(w, "norm1", dim, 1e-5)?,
            attn1: CrossAttention::new(&w.pp("attn1"), heads)?,
            norm2: LayerNorm::new(w, "norm2", dim, 1e-5)?,
            attn2: CrossAttention::new(&w.pp("attn2"), heads)?,
            norm3: LayerNorm::new(w, "norm3", dim, 1e-5)?,
            ff_proj: Linear::new(w, "ff.net.0.proj", true)?,
            ff_out: Linear::new(w, "ff.net.2", true)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context))?
            + &x)?;
        let h = self.ff_proj.forward(&self.norm3.forward(&x)?)?;
        let half = h.dim(2)? / 2;
        let gated = (h.narrow(2, 0, half)? * gelu_erf(&h.narrow(2, half, half)?)?)?;
        Ok((self.ff_out.forward(&gated)? + x)?)
    }
}

/// diffusers `Transformer2DModel` (SD 1.x: 1x1 convolutions in and out, one block).
struct SpatialTransformer {
    norm: GroupNorm,
    proj_in_conv: Option<Conv2d>,
    proj_in_linear: Option<Linear>,
    blocks: Vec<TransformerBlock>,
    proj_out_conv: Option<Conv2d>,
    proj_out_linear: Option<Linear>,
}

impl SpatialTransformer {
    fn new(
        w: &Weights,
        channels: usize,
        heads: usize,
        cfg: &UnetConfig,
        depth: usize,
    ) -> Result<Self> {
        let linear = cfg.use_linear_projection;
        Ok(Self {
            norm: GroupNorm::new(w, "norm", channels, cfg.norm_num_groups, 1e-6)?,
            proj_in_conv: if linear {
                None
            } else {
                Some(Conv2d::new(w, "proj_in", 1, 0)?)
            },
            proj_in_linear: if linear {
                Some(Linear::new(w, "proj_in", true)?)
            } else {
                None
            },
            blocks: (0..depth)
                .map(|i| {
                    TransformerBlock::new(
                        &w.pp(&format!("transformer_blocks.{i}")),
                        channels,
                        heads,
                    )
                })
                .collect::<Result<Vec<_>>>()?,
            proj_out_conv: if linear {
                None
            } else {
                Some(Conv2d::new(w, "proj_out", 1, 0)?)
            },
            proj_out_linear: if linear {
                Some(Linear::new(w, "proj_out", true)?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, hgt, wid) = x.dims4()?;
        let h = self.norm.forward(x)?;
        let to_tokens = |t: Tensor| -> Result<Tensor> {
            let ch = t.dim(1)?;
            Ok(t.permute((0, 2, 3, 1))?.reshape((b, hgt * wid, ch))?)
        };
        let mut h = match (&self.proj_in_conv, &self.proj_in_linear) {
            (Some(conv), _) => to_tokens(conv.forward(&h)?)?,
            (None, Some(lin)) => lin.forward(&to_tokens(h)?)?,
            (None, None) => to_tokens(h)?,
        };
        for block in &self.blocks {
            h = block.forward(&h, context)?;
        }
        let inner = h.dim(2)?;
        let to_image = |t: Tensor, ch: usize| -> Result<Tensor> {
            Ok(t.reshape((b, hgt, wid, ch))?.permute((0, 3, 1, 2))?)
        };
        let h = match (&self.proj_out_conv, &self.proj_out_linear) {
            (Some(conv), _) => conv.forward(&to_image(h, inner)?.contiguous()?)?,
            (None, Some(lin)) => to_image(lin.forward(&h)?, c)?,
            (None, None) => to_image(h, inner)?,
        };
        Ok((h + x)?)
    }
}

/// One down or up level: resnets, optional attentions, optional resampler.
struct Level {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    resample: Option<Conv2d>,
}

/// The UNet.
pub struct Unet {
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    down: Vec<Level>,
    mid_resnets: [ResnetBlock; 2],
    mid_attention: SpatialTransformer,
    up: Vec<Level>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    config: UnetConfig,
}

impl Unet {
    /// The dtype the UNet computes in.
    pub fn dtype(&self) -> DType {
        self.conv_in.dtype()
    }

    pub fn new(w: &Weights, cfg: &UnetConfig) -> Result<Self> {
        validate(cfg)?;
        let boc = &cfg.block_out_channels;
        let levels = boc.len();
        let (groups, eps) = (cfg.norm_num_groups, cfg.norm_eps);
        let depth = |i: usize| {
            cfg.transformer_layers_per_block
                .as_ref()
                .and_then(|d| d.at(i))
                .unwrap_or(1)
        };
        let conv_in = Conv2d::new(w, "conv_in", 1, 1)?;
        let time_linear_1 = Linear::new(w, "time_embedding.linear_1", true)?;
        let time_linear_2 = Linear::new(w, "time_embedding.linear_2", true)?;

        let mut down = Vec::with_capacity(levels);
        let mut out_c = boc[0];
        for (i, kind) in cfg.down_block_types.iter().enumerate() {
            let wb = w.pp(&format!("down_blocks.{i}"));
            let in_c = out_c;
            out_c = boc[i];
            let cross = kind.starts_with("CrossAttn");
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..cfg.layers_per_block {
                let rin = if j == 0 { in_c } else { out_c };
                resnets.push(ResnetBlock::new(
                    &wb.pp(&format!("resnets.{j}")),
                    rin,
                    out_c,
                    groups,
                    eps,
                    true,
                )?);
                if cross {
                    attentions.push(SpatialTransformer::new(
                        &wb.pp(&format!("attentions.{j}")),
                        out_c,
                        cfg.heads(i),
                        cfg,
                        depth(i),
                    )?);
                }
            }
            let resample = if i + 1 < levels {
                Some(Conv2d::new(&wb, "downsamplers.0.conv", 2, 1)?)
            } else {
                None
            };
            down.push(Level {
                resnets,
                attentions,
                resample,
            });
        }

        let top = boc[levels - 1];
        let wm = w.pp("mid_block");
        let mid_resnets = [
            ResnetBlock::new(&wm.pp("resnets.0"), top, top, groups, eps, true)?,
            ResnetBlock::new(&wm.pp("resnets.1"), top, top, groups, eps, true)?,
        ];
        let mid_attention = SpatialTransformer::new(
            &wm.pp("attentions.0"),
            top,
            cfg.heads(levels - 1),
            cfg,
            depth(levels - 1),
        )?;

        let rev: Vec<usize> = boc.iter().rev().copied().collect();
        let mut up = Vec::with_capacity(levels);
        let mut output_c = rev[0];
        for (i, kind) in cfg.up_block_types.iter().enumerate() {
            let wb = w.pp(&format!("up_blocks.{i}"));
            let prev_output_c = output_c;
            output_c = rev[i];
            let input_c = rev[(i + 1).min(levels - 1)];
            let cross = kind.starts_with("CrossAttn");
            let layers = cfg.layers_per_block + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers {
                let skip_c = if j == layers - 1 { input_c } else { output_c };
                let rin = if j == 0 { prev_output_c } else { output_c };
                resnets.push(ResnetBlock::new(
                    &wb.pp(&format!("resnets.{j}")),
                    rin + skip_c,
                    output_c,
                    groups,
                    eps,
                    true,
                )?);
                if cross {
                    attentions.push(SpatialTransformer::new(
                        &wb.pp(&format!("attentions.{j}")),
                        output_c,
                        cfg.heads(levels - 1 - i),
                        cfg,
                        depth(levels - 1 - i),
                    )?);
                }
            }
            let resample = if i + 1 < levels {
                Some(Conv2d::new(&wb, "upsamplers.0.conv", 1, 1)?)
            } else {
                None
            };
            up.push(Level {
                resnets,
                attentions,
                resample,
            });
        }
        Ok(Self {
            conv_in,
            time_linear_1,
            time_linear_2,
            down,
            mid_resnets,
            mid_attention,
            up,
            conv_norm_out: GroupNorm::new(w, "conv_norm_out", boc[0], groups, eps)?,
            conv_out: Conv2d::new(w, "conv_out", 1, 1)?,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &UnetConfig {
        &self.config
    }

    /// Noise (or velocity) prediction for `sample` `[B, 4, h, w]` at `timesteps` (one per
    /// sample, in training steps 0..1000) under `context` `[B, 77*k, D]`.
    pub fn forward(&self, sample: &Tensor, timesteps: &[f64], context: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = sample.dims4()?;
        if timesteps.len() != b || context.dim(0)? != b {
            return Err(Error::input(
                "unet input",
                format!(
                    "batch of {b} samples with {} timesteps and {} contexts",
                    timesteps.len(),
                    context.dim(0)?
                ),
            ));
        }
        if h < 2 || w < 2 {
            return Err(Error::input("latent size", format!("{h}x{w} is too small")));
        }
        // Inputs in another dtype (f32 states of the text encoder under mixed precision)
        // are converted here; the conversion's backward converts the gradient back.
        let sample = &sample.to_dtype(self.dtype())?;
        let context = &context.to_dtype(self.dtype())?;
        let temb = timestep_embedding(
            timesteps,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift as f64,
            sample.device(),
        )?
        .to_dtype(sample.dtype())?;
        let temb = self
            .time_linear_2
            .forward(&silu(&self.time_linear_1.forward(&temb)?)?)?;
        // Every resnet applies silu to the time embedding first: do it once.
        let temb = silu(&temb)?;
        let temb = Some(&temb);

        let mut x = self.conv_in.forward(sample)?;
        let mut skips = vec![x.clone()];
        for level in &self.down {
            for (j, resnet) in level.resnets.iter().enumerate() {
                x = resnet.forward(&x, temb)?;
                if let Some(attn) = level.attentions.get(j) {
                    x = attn.forward(&x, context)?;
                }
                skips.push(x.clone());
            }
            if let Some(down) = &level.resample {
                x = down.forward(&x)?;
                skips.push(x.clone());
            }
        }
        x = self.mid_resnets[0].forward(&x, temb)?;
        x = self.mid_attention.forward(&x, context)?;
        x = self.mid_resnets[1].forward(&x, temb)?;
        for level in &self.up {
            for (j, resnet) in level.resnets.iter().enumerate() {
                let skip = skips
                    .pop()
                    .ok_or_else(|| Error::input("unet", "skip stack underflow"))?;
                x = resnet.forward(&Tensor::cat(&[&x, &skip], 1)?, temb)?;
                if let Some(attn) = level.attentions.get(j) {
                    x = attn.forward(&x, context)?;
                }
            }
            if let Some(upc) = &level.resample {
                // Upsample to the size of the skip connection it meets next: twice the
                // size, except after a downsampler rounded an odd side up (diffusers'
                // forward_upsample_size).
                let (th, tw) = match skips.last() {
                    Some(skip) => (skip.dim(2)?, skip.dim(3)?),
                    None => (2 * x.dim(2)?, 2 * x.dim(3)?),
                };
                x = upc.forward(&upsample_nearest_to(&x, th, tw)?)?;
            }
        }
        self.conv_out
            .forward_after_norm_silu(&self.conv_norm_out, &x)
    }
}

/// Sinusoidal timestep features as diffusers' `get_timestep_embedding` computes them
/// (f32 frequencies `exp(-ln(10000) * i / (half - shift))`).
pub fn timestep_embedding(
    timesteps: &[f64],
    dim: usize,
    flip_sin_to_cos: bool,
    shift: f64,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let mut data = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let mut sin = Vec::with_capacity(half);
        let mut cos = Vec::with_capacity(half);
        for i in 0..half {
            let exponent = -(10000f32.ln()) * (i as f32) / (half as f32 - shift as f32);
            let arg = (t as f32) * exponent.exp();
            sin.push(arg.sin());
            cos.push(arg.cos());
        }
        if flip_sin_to_cos {
            data.extend(cos);
            data.extend(sin);
        } else {
            data.extend(sin);
            data.extend(cos);
        }
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Ok(Tensor::from_vec(data, (timesteps.len(), dim), device)?.to_dtype(DType::F32)?)
}

fn validate(cfg: &UnetConfig) -> Result<()> {
    let levels = cfg.block_out_channels.len();
    if levels == 0 || cfg.down_block_types.len() != levels || cfg.up_block_types.len() != levels {
        return Err(Error::config(
            "unet.block_out_channels",
            format!(
                "{levels} levels with {} down and {} up blocks",
                cfg.down_block_types.len(),
                cfg.up_block_types.len()
            ),
        ));
    }
    for kind in cfg.down_block_types.iter().chain(&cfg.up_block_types) {
        let known = [
            "CrossAttnDownBlock2D",
            "DownBlock2D",
            "CrossAttnUpBlock2D",
            "UpBlock2D",
        ];
        if !known.contains(&kind.as_str()) {
            return Err(Error::config(
                "unet.down_block_types/up_block_types",
                format!("block type {kind} is not part of the SD 1.x UNet"),
            ));
        }
    }
    if cfg.layers_per_block == 0 {
        return Err(Error::config("unet.layers_per_block", "must be at least 1"));
    }
    for (i, &c) in cfg.block_out_channels.iter().enumerate() {
        let heads = cfg.heads(i);
        if heads == 0 || c % heads != 0 || c % cfg.norm_num_groups.max(1) != 0 {
            return Err(Error::config(
                "unet.block_out_channels",
                format!(
                    "{c} channels do not fit {heads} heads and {} groups",
                    cfg.norm_num_groups
                ),
            ));
        }
    }
    Ok(())
}

pub(crate) use ResnetBlock as Resnet;
