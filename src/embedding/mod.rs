//! Learned-embedding ("textual inversion") files: every common layout, read and
//! written safely.
//!
//! Readers detect the layout from the bytes (not the extension), never execute
//! anything (pickles go through a small opcode VM with a global allow-list), and
//! bound every allocation: reading a file of `n` bytes never charges more than
//! `2 * n + 64 MiB` to its read budget (decompressed zip members, tensors, decoded
//! PNG pixels, pickle objects, JSON vectors), and files over [`MAX_FILE_BYTES`]
//! are refused up front.
//!
//! Supported layouts (see [`Format`]):
//! * A1111 `.pt` (torch zip + pickle dict with `string_to_param`), rinongal's
//!   original `.pt` (`nn.ParameterDict`), kohya `.pt` (`emb_params`), diffusers
//!   `learned_embeds.bin` (`{token: tensor}`);
//! * single-key safetensors (`emb_params`; kohya; OneTrainer `emp_params`),
//!   diffusers `learned_embeds.safetensors`, SDXL `clip_l` + `clip_g`;
//! * diffusers' SDXL pair `learned_embeds.safetensors` + `learned_embeds_2.safetensors`;
//! * A1111 PNG (`sd-ti-embedding` text chunk) and A1111's pixel-border PNG and
//!   lossless WebP (read).

mod budget;
mod diffusers_pair;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod inspect;
mod json;
mod names;
mod pickle;
mod png;
mod pt;
mod read_write;
mod safetensors_layouts;
mod tensor;
mod validate;
mod webp;
mod zip;

pub use crate::io::Existing;
pub use budget::{ALLOC_SLACK_BYTES, MAX_FILE_BYTES};
pub use diffusers_pair::{
    diffusers_sdxl_second_path, read_embedding_pair, write_embedding_pair_bytes,
    DIFFUSERS_SDXL_FIRST, DIFFUSERS_SDXL_SECOND,
};
pub use error::EmbeddingError;
pub use inspect::{inspect, Inspection, NearToken, PartInspection, VectorInspection, Vocab};
pub use names::{Encoder, Family, Format, Precision};
pub use read_write::{
    convert, read_embedding, read_embedding_bytes, write_embedding, write_embedding_bytes,
    write_embedding_to, zip_member_names,
};
pub use tensor::round_to;
pub use validate::{check_for_family, MAX_DIM, MAX_VECTORS};

pub(crate) use budget::Ctx;
pub(crate) use tensor::{decode_le, encode_part, make_part, DType};
pub(crate) use validate::{check_part, validate};

/// One learned word.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingFile {
    pub name: Option<String>,
    pub step: Option<u64>,
    pub sd_checkpoint: Option<String>,
    pub sd_checkpoint_name: Option<String>,
    /// One part for SD1/SD2; two (`ClipL`, `ClipG`) for SDXL.
    pub parts: Vec<EmbeddingPart>,
    /// What it was read from.
    pub source_format: Format,
}

/// The vectors one text encoder sees.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingPart {
    pub encoder: Encoder,
    pub vectors: usize,
    pub dim: usize,
    /// Row-major `[vectors, dim]`.
    pub data: Vec<f32>,
}
