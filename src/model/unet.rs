//! The UNet of SD 1.x, SD 2.x and SDXL (diffusers `UNet2DConditionModel` key names),
//! training grade: frozen weights, gradients flow to the conditioning only (the text
//! context and, for SDXL, the pooled text vector through the added embedding).

use candle_core::{DType, Device, Tensor};

use super::config::{PerBlock, UnetConfig};
use super::layers::{silu, upsample_nearest_to, Conv2d, GroupNorm, Linear, Recompute};
use super::resnet::{ResnetBlock, ResnetConfig};
use super::transformer::{SpatialTransformer, TransformerConfig};
use super::weights::Weights;
use crate::error::{Error, Result};

/// The layout of one down or up level as the config describes it, shared by the model
/// and [`random`](super::random)'s weights.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct LevelPlan {
    /// Input and output channels of each resnet (up levels: skip channels included).
    pub resnets: Vec<(usize, usize)>,
    /// Whether each resnet is followed by a spatial transformer.
    pub cross_attention: bool,
    /// The config level (index into `block_out_channels`) whose heads and depth the
    /// transformers take; the level's output channels are `block_out_channels[block]`.
    pub block: usize,
    /// Whether a down- or upsampler ends the level (all but the last).
    pub resample: bool,
}

/// The down levels, in order.
pub(crate) fn down_levels(cfg: &UnetConfig) -> Vec<LevelPlan> {
    let boc = &cfg.block_out_channels;
    let mut out_c = boc.first().copied().unwrap_or(0);
    let mut levels = Vec::with_capacity(boc.len());
    for (i, kind) in cfg.down_block_types.iter().enumerate() {
        let in_c = out_c;
        out_c = boc[i];
        levels.push(LevelPlan {
            resnets: (0..cfg.layers_per_block)
                .map(|j| (if j == 0 { in_c } else { out_c }, out_c))
                .collect(),
            cross_attention: kind.has_cross_attention(),
            block: i,
            resample: i + 1 < boc.len(),
        });
    }
    levels
}

/// The up levels, in order (widest first); each resnet also takes a skip connection.
pub(crate) fn up_levels(cfg: &UnetConfig) -> Vec<LevelPlan> {
    let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
    let count = rev.len();
    let layers = cfg.layers_per_block + 1;
    let mut output_c = rev.first().copied().unwrap_or(0);
    let mut levels = Vec::with_capacity(count);
    for (i, kind) in cfg.up_block_types.iter().enumerate() {
        let prev_output_c = output_c;
        output_c = rev[i];
        let input_c = rev[(i + 1).min(count - 1)];
        levels.push(LevelPlan {
            resnets: (0..layers)
                .map(|j| {
                    let skip_c = if j == layers - 1 { input_c } else { output_c };
                    let rin = if j == 0 { prev_output_c } else { output_c };
                    (rin + skip_c, output_c)
                })
                .collect(),
            cross_attention: kind.has_cross_attention(),
            block: count - 1 - i,
            resample: i + 1 < count,
        });
    }
    levels
}

/// One down or up level: resnets, optional attentions, optional resampler.
#[derive(Debug)]
struct Level {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    resample: Option<Conv2d>,
}

/// A level's down- or upsampling convolution: its weight name and stride.
struct Resampler {
    name: &'static str,
    stride: usize,
}

const DOWNSAMPLER: Resampler = Resampler {
    name: "downsamplers.0.conv",
    stride: 2,
};
const UPSAMPLER: Resampler = Resampler {
    name: "upsamplers.0.conv",
    stride: 1,
};

impl Level {
    fn new(w: &Weights, plan: &LevelPlan, cfg: &UnetConfig, resampler: &Resampler) -> Result<Self> {
        let transformer = TransformerConfig::at(cfg, plan.block);
        let mut resnets = Vec::with_capacity(plan.resnets.len());
        let mut attentions = Vec::new();
        for (j, &(in_channels, out_channels)) in plan.resnets.iter().enumerate() {
            let resnet = ResnetConfig {
                in_channels,
                out_channels,
                groups: cfg.norm_num_groups,
                eps: cfg.norm_eps,
                time_embedding: true,
            };
            resnets.push(ResnetBlock::new(&w.pp(&format!("resnets.{j}")), &resnet)?);
            if plan.cross_attention {
                let wa = w.pp(&format!("attentions.{j}"));
                attentions.push(SpatialTransformer::new(&wa, &transformer)?);
            }
        }
        let resample = if plan.resample {
            Some(Conv2d::new(w, resampler.name, resampler.stride, 1)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            resample,
        })
    }
}

/// SDXL's added conditioning (diffusers `added_cond_kwargs`): the pooled text vector and
/// the size and crop conditioning.
#[derive(Clone, Debug)]
pub struct AddedCond {
    /// The second text encoder's pooled, projected vector `[B, P]` (`text_embeds`); on a
    /// gradient path when the learned vectors train through it.
    pub pooled: Tensor,
    /// `[B, 6]`: original height and width, crop top and left, target height and width
    /// (diffusers' `time_ids`, height first), in pixels.
    pub time_ids: Tensor,
}

/// SDXL's `add_time_proj` and `add_embedding` (`addition_embed_type = "text_time"`).
#[derive(Debug)]
struct AddEmbedding {
    /// Sinusoid width per time id (`addition_time_embed_dim`).
    time_dim: usize,
    /// `linear_1`'s input: pooled width + 6 * `time_dim`.
    input_dim: usize,
    linear_1: Linear,
    linear_2: Linear,
}

/// The six time ids SDXL conditions on.
const TIME_IDS: usize = 6;

impl AddEmbedding {
    fn new(w: &Weights, cfg: &UnetConfig) -> Result<Option<Self>> {
        let Some(kind) = cfg.addition_embed_type.as_deref() else {
            return Ok(None);
        };
        if kind != "text_time" {
            return Err(Error::config(
                "unet.addition_embed_type",
                format!("{kind:?} is not implemented (sdti builds \"text_time\", SDXL's)"),
            ));
        }
        let time_dim = cfg.addition_time_embed_dim.ok_or_else(|| {
            Error::config(
                "unet.addition_time_embed_dim",
                "missing, which addition_embed_type \"text_time\" needs",
            )
        })?;
        let input_dim = cfg.projection_class_embeddings_input_dim.ok_or_else(|| {
            Error::config(
                "unet.projection_class_embeddings_input_dim",
                "missing, which addition_embed_type \"text_time\" needs",
            )
        })?;
        if time_dim == 0 || input_dim <= TIME_IDS * time_dim {
            return Err(Error::config(
                "unet.projection_class_embeddings_input_dim",
                format!(
                    "{input_dim} leaves no room for a pooled vector beside {TIME_IDS} time ids of {time_dim}"
                ),
            ));
        }
        let wa = w.pp("add_embedding");
        let linear_1 = Linear::new(&wa, "linear_1", true)?;
        let linear_2 = Linear::new(&wa, "linear_2", true)?;
        Ok(Some(Self {
            time_dim,
            input_dim,
            linear_1,
            linear_2,
        }))
    }

    /// The pooled vector's width.
    fn pooled_dim(&self) -> usize {
        self.input_dim - TIME_IDS * self.time_dim
    }
}

/// The UNet.
#[derive(Debug)]
pub struct Unet {
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    add_embedding: Option<AddEmbedding>,
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
        let levels = cfg.block_out_channels.len();
        let conv_in = Conv2d::new(w, "conv_in", 1, 1)?;
        let time_linear_1 = Linear::new(w, "time_embedding.linear_1", true)?;
        let time_linear_2 = Linear::new(w, "time_embedding.linear_2", true)?;
        let add_embedding = AddEmbedding::new(w, cfg)?;
        let down = down_levels(cfg)
            .iter()
            .enumerate()
            .map(|(i, plan)| {
                Level::new(&w.pp(&format!("down_blocks.{i}")), plan, cfg, &DOWNSAMPLER)
            })
            .collect::<Result<Vec<_>>>()?;
        let top = cfg.block_out_channels[levels - 1];
        let mid = ResnetConfig {
            in_channels: top,
            out_channels: top,
            groups: cfg.norm_num_groups,
            eps: cfg.norm_eps,
            time_embedding: true,
        };
        let wm = w.pp("mid_block");
        let mid_resnets = [
            ResnetBlock::new(&wm.pp("resnets.0"), &mid)?,
            ResnetBlock::new(&wm.pp("resnets.1"), &mid)?,
        ];
        let mid_attention = SpatialTransformer::new(
            &wm.pp("attentions.0"),
            &TransformerConfig::at(cfg, levels - 1),
        )?;
        let up = up_levels(cfg)
            .iter()
            .enumerate()
            .map(|(i, plan)| Level::new(&w.pp(&format!("up_blocks.{i}")), plan, cfg, &UPSAMPLER))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            conv_in,
            time_linear_1,
            time_linear_2,
            add_embedding,
            down,
            mid_resnets,
            mid_attention,
            up,
            conv_norm_out: GroupNorm::new(
                w,
                "conv_norm_out",
                cfg.block_out_channels[0],
                cfg.norm_num_groups,
                cfg.norm_eps,
            )?,
            conv_out: Conv2d::new(w, "conv_out", 1, 1)?,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &UnetConfig {
        &self.config
    }

    /// Whether the UNet takes SDXL's added conditioning ([`AddedCond`]).
    pub fn takes_added_cond(&self) -> bool {
        self.add_embedding.is_some()
    }

    /// SDXL's `add_time_proj` of `time_ids` `[B, 6]`: `[B, 6 * addition_time_embed_dim]`
    /// f32 sinusoids, per id `[cos | sin]`, ids in order. An error for a UNet without
    /// added conditioning.
    pub fn added_time_features(&self, time_ids: &Tensor) -> Result<Tensor> {
        let add = self.added()?;
        let batch = time_ids.dim(0)?;
        let cond = AddedCond {
            pooled: Tensor::zeros((batch, add.pooled_dim()), DType::F32, time_ids.device())?,
            time_ids: time_ids.clone(),
        };
        add.features(&cond, batch, &self.config)
    }

    /// SDXL's added embedding `add_embedding(concat(pooled, add_time_proj(time_ids)))`,
    /// `[B, time_embed_dim]` in the UNet's dtype: what [`Self::forward_with`] adds to the
    /// timestep's embedding. An error for a UNet without added conditioning.
    pub fn added_embedding(&self, cond: &AddedCond) -> Result<Tensor> {
        let batch = cond.pooled.dim(0)?;
        self.added()?
            .forward(cond, batch, &self.config, self.dtype())
    }

    fn added(&self) -> Result<&AddEmbedding> {
        self.add_embedding.as_ref().ok_or_else(|| {
            Error::input(
                "unet added conditioning",
                "this UNet has no added embedding (only SDXL's takes a pooled vector and time ids)",
            )
        })
    }

    /// Noise (or velocity) prediction for `sample` `[B, 4, h, w]` at `timesteps` (one per
    /// sample, in training steps 0..1000) under `context` `[B, 77*k, D]`, for a UNet without
    /// added conditioning (SD 1.x, SD 2.x; an SDXL UNet needs [`Self::forward_with`]).
    pub fn forward(&self, sample: &Tensor, timesteps: &[f64], context: &Tensor) -> Result<Tensor> {
        self.forward_with(sample, timesteps, context, None, Recompute::Off)
    }

    /// [`Self::forward`] with SDXL's `added` conditioning (required by an SDXL UNet,
    /// refused by others), the resnets and transformers keeping their activations for the
    /// backward pass or recomputing them there.
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        context: &Tensor,
        added: Option<&AddedCond>,
        recompute: Recompute,
    ) -> Result<Tensor> {
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
        let temb = match (&self.add_embedding, added) {
            (Some(add), Some(cond)) => (temb + add.forward(cond, b, &self.config, sample.dtype())?)?,
            (None, None) => temb,
            (Some(_), None) => {
                return Err(Error::input(
                    "unet input",
                    "this UNet (addition_embed_type \"text_time\", SDXL) needs the pooled text vector and the time ids, and none were given",
                ))
            }
            (None, Some(_)) => {
                return Err(Error::input(
                    "unet input",
                    "a pooled text vector and time ids were given to a UNet without an added embedding (only SDXL's takes them)",
                ))
            }
        };
        // Every resnet applies silu to the time embedding first: do it once.
        let temb = silu(&temb)?;
        let temb = Some(&temb);

        // The spatial transformers in the order they run (Recompute::Transformers).
        let mut ran = 0;
        let mut attend = |attn: &SpatialTransformer, x: &Tensor| {
            ran += 1;
            attn.forward(x, context, recompute.transformer(ran - 1))
        };
        let resnet_recompute = recompute.other();
        let mut x = self.conv_in.forward(sample)?;
        let mut skips = vec![x.clone()];
        for level in &self.down {
            for (j, resnet) in level.resnets.iter().enumerate() {
                x = resnet.forward(&x, temb, resnet_recompute)?;
                if let Some(attn) = level.attentions.get(j) {
                    x = attend(attn, &x)?;
                }
                skips.push(x.clone());
            }
            if let Some(down) = &level.resample {
                x = down.forward(&x)?;
                skips.push(x.clone());
            }
        }
        x = self.mid_resnets[0].forward(&x, temb, resnet_recompute)?;
        x = attend(&self.mid_attention, &x)?;
        x = self.mid_resnets[1].forward(&x, temb, resnet_recompute)?;
        for level in &self.up {
            for (j, resnet) in level.resnets.iter().enumerate() {
                let skip = skips
                    .pop()
                    .ok_or_else(|| Error::input("unet", "skip stack underflow"))?;
                x = resnet.forward_joined(&x, &skip, temb, resnet_recompute)?;
                if let Some(attn) = level.attentions.get(j) {
                    x = attend(attn, &x)?;
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

impl AddEmbedding {
    /// `add_embedding(concat(pooled, add_time_proj(time_ids)))` `[B, 1280]`, in the UNet's
    /// dtype (diffusers `UNet2DConditionModel.get_aug_embed`, "text_time").
    fn forward(
        &self,
        cond: &AddedCond,
        batch: usize,
        cfg: &UnetConfig,
        dtype: DType,
    ) -> Result<Tensor> {
        let features = self.features(cond, batch, cfg)?;
        let pooled = cond.pooled.to_dtype(dtype)?;
        let input = Tensor::cat(&[&pooled, &features.to_dtype(dtype)?], 1)?;
        self.linear_2
            .forward(&silu(&self.linear_1.forward(&input)?)?)
    }

    /// `add_time_proj` of the time ids, `[B, 6 * time_dim]` in f32, checking the inputs'
    /// shapes against the configuration.
    fn features(&self, cond: &AddedCond, batch: usize, cfg: &UnetConfig) -> Result<Tensor> {
        let pooled = cond.pooled.dims();
        if pooled != [batch, self.pooled_dim()] {
            return Err(Error::input(
                "unet added conditioning",
                format!(
                    "pooled text vector of shape {pooled:?} where the UNet takes [{batch}, {}] (projection_class_embeddings_input_dim {} minus {TIME_IDS} x {})",
                    self.pooled_dim(),
                    self.input_dim,
                    self.time_dim
                ),
            ));
        }
        let ids = cond.time_ids.dims();
        if ids != [batch, TIME_IDS] {
            return Err(Error::input(
                "unet added conditioning",
                format!("time ids of shape {ids:?} where the UNet takes [{batch}, {TIME_IDS}]"),
            ));
        }
        let ids: Vec<f64> = cond
            .time_ids
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1()?;
        // The ids are numbers read off any device; the features go where the pooled
        // vector is (the model's device).
        let device = cond.pooled.device();
        time_id_features(&ids, self.time_dim, cfg, device)?
            .reshape((batch, TIME_IDS * self.time_dim))
            .map_err(Into::into)
    }
}

/// `add_time_proj`: the sinusoid of each time id (`[N, time_dim]`, f32), with the main
/// timestep's `flip_sin_to_cos` and `freq_shift` (diffusers builds both `Timesteps` from
/// the same config fields).
fn time_id_features(
    ids: &[f64],
    time_dim: usize,
    cfg: &UnetConfig,
    device: &Device,
) -> Result<Tensor> {
    timestep_embedding(
        ids,
        time_dim,
        cfg.flip_sin_to_cos,
        cfg.freq_shift as f64,
        device,
    )
}

/// Sinusoidal timestep features as diffusers' `get_timestep_embedding` computes them
/// (f32 frequencies `exp(-ln(10000) * i / (half - shift))`).
fn timestep_embedding(
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

/// diffusers `UNet2DConditionModel` config fields that change the network but have no
/// field in [`UnetConfig`]: the error names the field, and the values sdti builds (as
/// JSON; diffusers' defaults, which SD 1.x, SD 2.x and SDXL use). A field that is absent
/// takes its default.
const FIXED_FIELDS: &[(&str, &str, &[&str])] = &[
    (
        "reverse_transformer_layers_per_block",
        "unet.reverse_transformer_layers_per_block",
        &["null"],
    ),
    (
        "mid_block_type",
        "unet.mid_block_type",
        &["\"UNetMidBlock2DCrossAttn\""],
    ),
    ("num_class_embeds", "unet.num_class_embeds", &["null"]),
    (
        "resnet_time_scale_shift",
        "unet.resnet_time_scale_shift",
        &["\"default\""],
    ),
    (
        "time_embedding_type",
        "unet.time_embedding_type",
        &["\"positional\""],
    ),
    ("time_embedding_dim", "unet.time_embedding_dim", &["null"]),
    (
        "time_embedding_act_fn",
        "unet.time_embedding_act_fn",
        &["null"],
    ),
    ("timestep_post_act", "unet.timestep_post_act", &["null"]),
    (
        "only_cross_attention",
        "unet.only_cross_attention",
        &["false"],
    ),
    (
        "dual_cross_attention",
        "unet.dual_cross_attention",
        &["false"],
    ),
    ("attention_type", "unet.attention_type", &["\"default\""]),
    (
        "cross_attention_norm",
        "unet.cross_attention_norm",
        &["null"],
    ),
    ("encoder_hid_dim", "unet.encoder_hid_dim", &["null"]),
    (
        "encoder_hid_dim_type",
        "unet.encoder_hid_dim_type",
        &["null"],
    ),
    (
        "class_embeddings_concat",
        "unet.class_embeddings_concat",
        &["false"],
    ),
    ("conv_in_kernel", "unet.conv_in_kernel", &["3"]),
    ("conv_out_kernel", "unet.conv_out_kernel", &["3"]),
    ("act_fn", "unet.act_fn", &["\"silu\""]),
    ("downsample_padding", "unet.downsample_padding", &["1"]),
    (
        "mid_block_scale_factor",
        "unet.mid_block_scale_factor",
        &["1"],
    ),
    (
        "resnet_out_scale_factor",
        "unet.resnet_out_scale_factor",
        &["1"],
    ),
    (
        "resnet_skip_time_act",
        "unet.resnet_skip_time_act",
        &["false"],
    ),
    (
        "center_input_sample",
        "unet.center_input_sample",
        &["false"],
    ),
];

/// Whether a config value equals one written as JSON (numbers by value: `1` is `1.0`).
fn json_equals(value: &serde_json::Value, json: &str) -> bool {
    let Ok(want) = serde_json::from_str::<serde_json::Value>(json) else {
        return false;
    };
    match (value.as_f64(), want.as_f64()) {
        (Some(a), Some(b)) => a == b,
        _ => *value == want,
    }
}

fn validate(cfg: &UnetConfig) -> Result<()> {
    for (key, field, accepted) in FIXED_FIELDS {
        if let Some(value) = cfg.other_fields.0.get(*key) {
            if !accepted.iter().any(|a| json_equals(value, a)) {
                return Err(Error::config(
                    field,
                    format!(
                        "{value} is not implemented (sdti builds {})",
                        accepted.join(" or ")
                    ),
                ));
            }
        }
    }
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
    if let Some(kind) = &cfg.class_embed_type {
        return Err(Error::config(
            "unet.class_embed_type",
            format!("{kind:?} is not implemented (SD 1.x, SD 2.x and SDXL have none)"),
        ));
    }
    // A per-level list must have one entry per level (a short one would fall back to
    // a default for the missing levels).
    for (field, list, what) in [
        (
            "unet.transformer_layers_per_block",
            cfg.transformer_layers_per_block.as_ref(),
            "depths",
        ),
        (
            "unet.attention_head_dim",
            Some(&cfg.attention_head_dim),
            "head counts",
        ),
        (
            "unet.num_attention_heads",
            cfg.num_attention_heads.as_ref(),
            "head counts",
        ),
    ] {
        if let Some(PerBlock::Each(values)) = list {
            if values.len() != levels {
                return Err(Error::config(
                    field,
                    format!("{} {what} for {levels} levels", values.len()),
                ));
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::{DownBlockKind, UpBlockKind};

    /// Block kinds read and write diffusers' class names; an unknown kind names the field
    /// and the value.
    #[test]
    fn block_kinds_parse_with_the_config() {
        let cfg = UnetConfig::sd1();
        let json = serde_json::to_value(&cfg).expect("serialises");
        assert_eq!(json["down_block_types"][0], "CrossAttnDownBlock2D");
        assert_eq!(json["down_block_types"][3], "DownBlock2D");
        assert_eq!(json["up_block_types"][0], "UpBlock2D");
        assert_eq!(json["up_block_types"][1], "CrossAttnUpBlock2D");
        let back: UnetConfig = serde_json::from_value(json.clone()).expect("parses");
        assert_eq!(back, cfg);
        assert_eq!(back.down_block_types[3], DownBlockKind::Plain);
        assert_eq!(back.up_block_types[1], UpBlockKind::CrossAttn);

        let mut bad = json;
        bad["up_block_types"][2] = "AttnUpBlock2D".into();
        let err = serde_json::from_value::<UnetConfig>(bad)
            .expect_err("unknown kind")
            .to_string();
        assert!(
            err.contains("up_block_types") && err.contains("AttnUpBlock2D"),
            "{err}"
        );
    }

    /// diffusers config fields that would change the network are refused with the field
    /// named; their defaults (as diffusers writes them) pass.
    #[test]
    fn fields_sdti_does_not_build_are_refused() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny-sdxl/unet/config.json");
        let text = std::fs::read_to_string(path).expect("fixture config");
        let json: serde_json::Value = serde_json::from_str(&text).expect("json");
        let parse = |j: &serde_json::Value| -> UnetConfig {
            serde_json::from_value(j.clone()).expect("parses")
        };
        validate(&parse(&json)).expect("diffusers' defaults are what sdti builds");
        let with = |key: &str, value: serde_json::Value| {
            let mut j = json.clone();
            j[key] = value;
            validate(&parse(&j)).err().map(|e| e.to_string())
        };
        assert_eq!(with("mid_block_scale_factor", 1.0.into()), None);
        for (key, value) in [
            (
                "reverse_transformer_layers_per_block",
                serde_json::json!([[3, 3, 3], [2, 2, 2], [0, 0, 0]]),
            ),
            ("mid_block_type", "UNetMidBlock2D".into()),
            ("resnet_time_scale_shift", "scale_shift".into()),
            ("conv_in_kernel", 7.into()),
        ] {
            let err = with(key, value).expect("refused");
            assert!(
                err.contains(key) && err.contains("not implemented"),
                "{err}"
            );
        }
        let err = with("transformer_layers_per_block", serde_json::json!([1, 2])).expect("refused");
        assert!(err.contains("2 depths for 3 levels"), "{err}");
        // The fields do not take part in equality: the same network compares equal.
        let mut j = json.clone();
        j["sample_size"] = 128.into();
        assert_eq!(parse(&j), parse(&json));
    }

    /// The level plans give SD 1.5's resnet channels (diffusers' UNet2DConditionModel).
    #[test]
    fn level_plans_follow_diffusers() {
        let cfg = UnetConfig::sd1();
        let down = down_levels(&cfg);
        assert_eq!(down[1].resnets, vec![(320, 640), (640, 640)]);
        assert!(down[0].cross_attention && !down[3].cross_attention);
        assert!(down[2].resample && !down[3].resample);
        let up = up_levels(&cfg);
        assert_eq!(
            up[0].resnets,
            vec![(2560, 1280), (2560, 1280), (2560, 1280)]
        );
        assert_eq!(up[3].resnets, vec![(960, 320), (640, 320), (640, 320)]);
        assert_eq!((up[0].block, up[3].block), (3, 0));
        assert!(!up[0].cross_attention && up[1].cross_attention);
    }
}
