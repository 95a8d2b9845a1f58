//! Model configurations: the SD 1.x presets and the diffusers `config.json` files.

use serde::{Deserialize, Deserializer, Serialize};

use super::scheduler::{PredictionType, SchedulerConfig};
pub use crate::embedding::Family;

/// The token positions of SD 1.x's CLIP text encoder (openai/clip-vit-large-patch14's
/// `max_position_embeddings`): one prompt chunk, BOS and EOS included.
pub const CLIP_CONTEXT_LEN: usize = 77;

/// The latent scaling factor of SD 1.x's VAE (runwayml/stable-diffusion-v1-5
/// vae/config.json `scaling_factor`, diffusers' `AutoencoderKL` default).
pub const SD1_VAE_SCALING_FACTOR: f64 = 0.18215;

/// The latent scaling factor of SDXL's VAE (Stability's sd_xl_base.yaml `scale_factor`,
/// stable-diffusion-xl-base-1.0 vae/config.json).
pub const SDXL_VAE_SCALING_FACTOR: f64 = 0.13025;

/// The CLIP text transformer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_clip_act")]
    pub hidden_act: String,
    #[serde(default = "default_clip_eps")]
    pub layer_norm_eps: f64,
    /// The width of `text_projection` (transformers' `CLIPTextModelWithProjection`), which
    /// SDXL's second encoder applies to its pooled state; `None` without a projection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projection_dim: Option<usize>,
    /// Final blocks of the original encoder these weights lack: 1 for an SD 2.x diffusers
    /// folder, whose conversion drops OpenCLIP's block 24 (SD 2.x conditions on block 23,
    /// so the folder's last layer is the original's penultimate). Clip skip counts from
    /// the original's end (`hidden_states[-clip_skip]` of the full-depth encoder).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped_final_layers: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn default_clip_act() -> String {
    "quick_gelu".into()
}
fn default_clip_eps() -> f64 {
    1e-5
}

impl ClipConfig {
    /// openai/clip-vit-large-patch14 text config.json, SD 1.x's text encoder.
    pub fn sd1() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: CLIP_CONTEXT_LEN,
            hidden_act: default_clip_act(),
            layer_norm_eps: default_clip_eps(),
            projection_dim: None,
            dropped_final_layers: 0,
        }
    }

    /// OpenCLIP ViT-H/14's text tower, SD 2.x's encoder, with `layers` blocks: 24 in the
    /// original (single-file) checkpoints, 23 in diffusers folders, which drop the last
    /// block because SD 2.x conditions on the penultimate one.
    pub fn open_clip_h(layers: usize) -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: layers,
            num_attention_heads: 16,
            max_position_embeddings: CLIP_CONTEXT_LEN,
            hidden_act: "gelu".into(),
            layer_norm_eps: default_clip_eps(),
            projection_dim: Some(1024),
            dropped_final_layers: 24usize.saturating_sub(layers),
        }
    }

    /// OpenCLIP ViT-bigG/14's text tower, SDXL's second encoder (`text_encoder_2`).
    pub fn open_clip_bigg() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 1280,
            intermediate_size: 5120,
            num_hidden_layers: 32,
            num_attention_heads: 20,
            max_position_embeddings: CLIP_CONTEXT_LEN,
            hidden_act: "gelu".into(),
            layer_norm_eps: default_clip_eps(),
            projection_dim: Some(1280),
            dropped_final_layers: 0,
        }
    }
}

/// An integer or a per-block list, as diffusers configs write head counts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    pub fn at(&self, i: usize) -> Option<usize> {
        match self {
            PerBlock::One(v) => Some(*v),
            PerBlock::Each(v) => v.get(i).copied(),
        }
    }
}

/// A UNet down block, serialised under diffusers' class name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DownBlockKind {
    /// Resnets each followed by a spatial transformer.
    #[serde(rename = "CrossAttnDownBlock2D")]
    CrossAttn,
    /// Resnets only.
    #[serde(rename = "DownBlock2D")]
    Plain,
}

/// A UNet up block, serialised under diffusers' class name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpBlockKind {
    /// Resnets each followed by a spatial transformer.
    #[serde(rename = "CrossAttnUpBlock2D")]
    CrossAttn,
    /// Resnets only.
    #[serde(rename = "UpBlock2D")]
    Plain,
}

/// A block kind with diffusers' names, for parsing a config's block lists.
trait BlockKind: Sized + Copy {
    /// The config field that lists blocks of this kind.
    const FIELD: &'static str;
    /// diffusers' class names of the kinds sdti builds.
    const NAMES: [(&'static str, Self); 2];

    fn from_name(name: &str) -> Option<Self> {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|&(_, k)| k)
    }
}

impl BlockKind for DownBlockKind {
    const FIELD: &'static str = "down_block_types";
    const NAMES: [(&'static str, Self); 2] = [
        ("CrossAttnDownBlock2D", Self::CrossAttn),
        ("DownBlock2D", Self::Plain),
    ];
}

impl BlockKind for UpBlockKind {
    const FIELD: &'static str = "up_block_types";
    const NAMES: [(&'static str, Self); 2] = [
        ("CrossAttnUpBlock2D", Self::CrossAttn),
        ("UpBlock2D", Self::Plain),
    ];
}

impl DownBlockKind {
    pub fn has_cross_attention(self) -> bool {
        self == Self::CrossAttn
    }

    /// The kind with or without cross-attention.
    pub fn with_cross_attention(cross: bool) -> Self {
        if cross {
            Self::CrossAttn
        } else {
            Self::Plain
        }
    }
}

impl UpBlockKind {
    pub fn has_cross_attention(self) -> bool {
        self == Self::CrossAttn
    }

    /// The kind with or without cross-attention.
    pub fn with_cross_attention(cross: bool) -> Self {
        if cross {
            Self::CrossAttn
        } else {
            Self::Plain
        }
    }
}

/// Parses a list of block names, naming the field and the value that is not a block of
/// the SD 1.x UNet.
fn block_kinds<'de, D: Deserializer<'de>, K: BlockKind>(d: D) -> Result<Vec<K>, D::Error> {
    let names = Vec::<String>::deserialize(d)?;
    names
        .iter()
        .map(|name| {
            K::from_name(name).ok_or_else(|| {
                let known: Vec<&str> = K::NAMES.iter().map(|(n, _)| *n).collect();
                serde::de::Error::custom(format!(
                    "{}: block type {name:?} is not part of the SD 1.x UNet (known: {})",
                    K::FIELD,
                    known.join(", ")
                ))
            })
        })
        .collect()
}

/// The SD 1.x UNet (diffusers `UNet2DConditionModel` config.json fields).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnetConfig {
    #[serde(default = "four")]
    pub in_channels: usize,
    #[serde(default = "four")]
    pub out_channels: usize,
    #[serde(deserialize_with = "block_kinds")]
    pub down_block_types: Vec<DownBlockKind>,
    #[serde(deserialize_with = "block_kinds")]
    pub up_block_types: Vec<UpBlockKind>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "two")]
    pub layers_per_block: usize,
    pub cross_attention_dim: usize,
    /// Historically the number of heads in SD 1.x configs (8).
    #[serde(default = "eight_heads")]
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default = "groups32")]
    pub norm_num_groups: usize,
    #[serde(default = "eps1e5")]
    pub norm_eps: f64,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: usize,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub transformer_layers_per_block: Option<PerBlock>,
    /// SDXL's added conditioning (`addition_embed_type = "text_time"`): the sinusoid width
    /// of each of the six size/crop time ids (256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addition_time_embed_dim: Option<usize>,
    /// SDXL's `add_embedding.linear_1` input: the pooled text vector plus six time-id
    /// sinusoids (1280 + 6 * 256 = 2816).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// The config.json fields sdti has no field for, kept so that the UNet can refuse
    /// values it does not implement (`reverse_transformer_layers_per_block`,
    /// `mid_block_type`, ...) instead of silently building another network. Not written
    /// back, and not part of the configuration's equality.
    #[serde(flatten, skip_serializing)]
    pub other_fields: OtherFields,
}

/// A config.json's fields that have no field of their own in sdti's configuration (see
/// [`UnetConfig::other_fields`]). Two configurations that differ only here compare
/// equal: what sdti builds is decided by its own fields, and these only let it refuse
/// a network it would build wrongly.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(transparent)]
pub struct OtherFields(pub std::collections::BTreeMap<String, serde_json::Value>);

impl PartialEq for OtherFields {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

fn four() -> usize {
    4
}
fn two() -> usize {
    2
}
fn eight_heads() -> PerBlock {
    PerBlock::One(8)
}
fn groups32() -> usize {
    32
}
fn eps1e5() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}

impl UnetConfig {
    /// runwayml/stable-diffusion-v1-5 unet/config.json.
    pub fn sd1() -> Self {
        Self::sd1_with(vec![320, 640, 1280, 1280], 2, 768)
    }

    /// The SD 1.x block structure with other widths (single-file checkpoints).
    pub fn sd1_with(
        block_out_channels: Vec<usize>,
        layers_per_block: usize,
        cross_attention_dim: usize,
    ) -> Self {
        let levels = block_out_channels.len();
        let mut down = vec![DownBlockKind::CrossAttn; levels];
        let mut up = vec![UpBlockKind::CrossAttn; levels];
        if let Some(last) = down.last_mut() {
            *last = DownBlockKind::Plain;
        }
        if let Some(first) = up.first_mut() {
            *first = UpBlockKind::Plain;
        }
        Self {
            in_channels: 4,
            out_channels: 4,
            down_block_types: down,
            up_block_types: up,
            block_out_channels,
            layers_per_block,
            cross_attention_dim,
            attention_head_dim: eight_heads(),
            num_attention_heads: None,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            flip_sin_to_cos: true,
            freq_shift: 0,
            use_linear_projection: false,
            upcast_attention: false,
            addition_embed_type: None,
            class_embed_type: None,
            transformer_layers_per_block: None,
            addition_time_embed_dim: None,
            projection_class_embeddings_input_dim: None,
            other_fields: Default::default(),
        }
    }

    /// stabilityai/stable-diffusion-2-1 unet/config.json: SD 1.x's blocks with 64-channel
    /// heads (5, 10, 20, 20), linear projections in and out of the transformers, a 1024-wide
    /// context and attention scores in f32.
    pub fn sd2() -> Self {
        Self {
            attention_head_dim: PerBlock::Each(vec![5, 10, 20, 20]),
            use_linear_projection: true,
            upcast_attention: true,
            ..Self::sd1_with(vec![320, 640, 1280, 1280], 2, 1024)
        }
    }

    /// stabilityai/stable-diffusion-xl-base-1.0 unet/config.json: three levels (no
    /// attention in the first), transformer depths 1/2/10 (mid 10), 64-channel heads, a
    /// 2048-wide context and the pooled-text + time-id embedding.
    pub fn sdxl() -> Self {
        Self {
            down_block_types: vec![
                DownBlockKind::Plain,
                DownBlockKind::CrossAttn,
                DownBlockKind::CrossAttn,
            ],
            up_block_types: vec![
                UpBlockKind::CrossAttn,
                UpBlockKind::CrossAttn,
                UpBlockKind::Plain,
            ],
            attention_head_dim: PerBlock::Each(vec![5, 10, 20]),
            use_linear_projection: true,
            addition_embed_type: Some("text_time".into()),
            transformer_layers_per_block: Some(PerBlock::Each(vec![1, 2, 10])),
            addition_time_embed_dim: Some(256),
            projection_class_embeddings_input_dim: Some(2816),
            ..Self::sd1_with(vec![320, 640, 1280], 2, 2048)
        }
    }

    /// Attention heads of down block `i` (diffusers: `num_attention_heads or attention_head_dim`).
    pub fn heads(&self, i: usize) -> usize {
        self.num_attention_heads
            .as_ref()
            .and_then(|h| h.at(i))
            .or_else(|| self.attention_head_dim.at(i))
            .unwrap_or(8)
    }
}

/// The SD 1.x VAE (diffusers `AutoencoderKL` config.json fields).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "groups32")]
    pub norm_num_groups: usize,
    #[serde(default = "sd1_scaling")]
    pub scaling_factor: f64,
    /// diffusers' `force_upcast` (default true, as `AutoencoderKL`'s): the VAE must not
    /// compute in f16. SDXL's original VAE overflows there (NaN latents, black images);
    /// the fp16-fix VAE (`madebyollin/sdxl-vae-fp16-fix`) says `false`. sdti honours it
    /// for SDXL ([`crate::model::vae_dtype`]).
    #[serde(default = "yes")]
    pub force_upcast: bool,
}

fn three() -> usize {
    3
}
fn one() -> usize {
    1
}
fn sd1_scaling() -> f64 {
    SD1_VAE_SCALING_FACTOR
}

impl VaeConfig {
    /// runwayml/stable-diffusion-v1-5 vae/config.json.
    pub fn sd1() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: sd1_scaling(),
            force_upcast: true,
        }
    }
}

/// The networks' configurations of one model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Which family the model is (configurations written before sdti knew more than
    /// SD 1.x have no field and are SD 1.x).
    #[serde(default)]
    pub family: Family,
    pub text_encoder: ClipConfig,
    /// SDXL's second text encoder (OpenCLIP bigG, diffusers' `text_encoder_2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_encoder_2: Option<ClipConfig>,
    pub unet: UnetConfig,
    pub vae: VaeConfig,
    pub scheduler: SchedulerConfig,
}

impl ModelConfig {
    /// Stable Diffusion 1.5.
    pub fn sd1() -> Self {
        Self {
            family: Family::Sd1,
            text_encoder: ClipConfig::sd1(),
            text_encoder_2: None,
            unet: UnetConfig::sd1(),
            vae: VaeConfig::sd1(),
            scheduler: SchedulerConfig::default(),
        }
    }

    /// Stable Diffusion 2.1 (768 px, v-prediction) as a diffusers folder holds it: the
    /// text encoder without its last block. [`ModelConfig::sd2_base`] is the 512 px
    /// epsilon model.
    pub fn sd2() -> Self {
        let scheduler = SchedulerConfig {
            prediction_type: PredictionType::VPrediction,
            ..SchedulerConfig::default()
        };
        Self {
            family: Family::Sd2,
            text_encoder: ClipConfig::open_clip_h(23),
            text_encoder_2: None,
            unet: UnetConfig::sd2(),
            vae: VaeConfig::sd1(),
            scheduler,
        }
    }

    /// Stable Diffusion 2.1-base (512 px, epsilon).
    pub fn sd2_base() -> Self {
        Self {
            scheduler: SchedulerConfig::default(),
            ..Self::sd2()
        }
    }

    /// SDXL base 1.0.
    pub fn sdxl() -> Self {
        Self {
            family: Family::Sdxl,
            text_encoder: ClipConfig::sd1(),
            text_encoder_2: Some(ClipConfig::open_clip_bigg()),
            unet: UnetConfig::sdxl(),
            vae: VaeConfig {
                scaling_factor: SDXL_VAE_SCALING_FACTOR,
                ..VaeConfig::sd1()
            },
            scheduler: SchedulerConfig::default(),
        }
    }
}
