//! Learned-embedding ("textual inversion") files: every common layout, read and
//! written safely.
//!
//! Readers detect the layout from the bytes (not the extension), never execute
//! anything (pickles go through a small opcode VM with a global allow-list), and
//! bound every allocation: reading a file of `n` bytes never charges more than
//! `2 * n + 64 MiB` to its [`Budget`] (decompressed zip members, tensors, decoded
//! PNG pixels, pickle objects, JSON vectors), and files over [`MAX_FILE_BYTES`]
//! are refused up front.
//!
//! Supported layouts (see [`Format`]):
//! * A1111 `.pt` (torch zip + pickle dict with `string_to_param`), rinongal's
//!   original `.pt` (`nn.ParameterDict`), kohya `.pt` (`emb_params`), diffusers
//!   `learned_embeds.bin` (`{token: tensor}`);
//! * single-key safetensors (`emb_params`; kohya; OneTrainer `emp_params`),
//!   diffusers `learned_embeds.safetensors`, SDXL `clip_l` + `clip_g`;
//! * A1111 PNG (`sd-ti-embedding` text chunk) and A1111's pixel-border PNG and
//!   lossless WebP (read).

mod inspect;
mod json;
mod pickle;
mod png;
mod pt;
mod safetensors_layouts;
mod webp;
mod zip;

use std::cell::Cell;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

pub use crate::io::Existing;
pub use inspect::{inspect, Inspection, NearToken, PartInspection, VectorInspection, Vocab};

/// Largest file any reader accepts. Real embeddings are kilobytes (75 x 2048
/// f32 is 600 KiB); A1111 preview PNGs a few MiB.
pub const MAX_FILE_BYTES: u64 = 64 << 20;
/// A CLIP prompt chunk holds 75 tokens; a longer embedding can never be used whole.
pub const MAX_VECTORS: usize = 75;
/// Widest token embedding we accept per encoder (bigG is 1280; leave room).
pub const MAX_DIM: usize = 8192;
/// Fixed slack of the allocation bound, on top of twice the input size.
pub const ALLOC_SLACK_BYTES: u64 = 64 << 20;

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

/// Which text encoder a part feeds; named as the files name it (`clip_l`, `clip_g`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoder {
    /// The only text encoder (SD1 CLIP ViT-L, SD2 OpenCLIP ViT-H).
    Single,
    /// SDXL's first encoder (CLIP ViT-L, 768 wide).
    ClipL,
    /// SDXL's second encoder (OpenCLIP bigG, 1280 wide).
    ClipG,
}

impl FromStr for Encoder {
    type Err = EmbeddingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "single" => Ok(Encoder::Single),
            "clip_l" => Ok(Encoder::ClipL),
            "clip_g" => Ok(Encoder::ClipG),
            _ => Err(EmbeddingError::UnknownFormatName {
                name: s.to_string(),
                known: "single, clip_l, clip_g".to_string(),
            }),
        }
    }
}

/// Names print and parse the same way, so what `inspect --json` prints can be given back.
macro_rules! serialize_as_display {
    ($($t:ty),*) => {$(
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    )*};
}
serialize_as_display!(Encoder, Format);

impl fmt::Display for Encoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Encoder::Single => "single",
            Encoder::ClipL => "clip_l",
            Encoder::ClipG => "clip_g",
        })
    }
}

/// Serialised (e.g. by `inspect --json`) as [`Format::name`], which [`Format::from_str`]
/// and the C ABI's `sdti_format_from_name` take back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// torch zip pickle dict `{string_to_token, string_to_param, name, step, ...}`.
    A1111Pt,
    /// safetensors with the single key `emb_params`.
    A1111Safetensors,
    /// safetensors `{placeholder_token: [n, dim]}` (diffusers `learned_embeds.safetensors`).
    DiffusersSafetensors,
    /// torch zip pickle `{placeholder_token: tensor}` (diffusers `learned_embeds.bin`).
    DiffusersBin,
    /// safetensors `{clip_l: [n, 768], clip_g: [n, 1280]}`.
    SdxlSafetensors,
    /// PNG with an `sd-ti-embedding` text chunk (base64 JSON).
    A1111Png,
    /// PNG with the data hidden in the pixel borders (read only).
    A1111PngPixels,
    /// rinongal/textual_inversion `.pt` (`nn.ParameterDict`, 0-d token tensors; read only).
    RinongalPt,
    /// OneTrainer safetensors `emp_params` (SDXL variant is `clip_l`/`clip_g`).
    OneTrainer,
    /// kohya sd-scripts `.pt`: `{emb_params}` (SDXL: `{clip_l, clip_g}`).
    KohyaPt,
    /// kohya sd-scripts `.safetensors`: `emb_params` (same bytes as A1111's).
    KohyaSafetensors,
    /// Lossless WebP with the data hidden in the pixel borders, as A1111 loads
    /// `.webp` embeddings (read only).
    A1111WebpPixels,
}

impl Format {
    pub const ALL: [Format; 12] = [
        Format::A1111Pt,
        Format::A1111Safetensors,
        Format::DiffusersSafetensors,
        Format::DiffusersBin,
        Format::SdxlSafetensors,
        Format::A1111Png,
        Format::A1111PngPixels,
        Format::RinongalPt,
        Format::OneTrainer,
        Format::KohyaPt,
        Format::KohyaSafetensors,
        Format::A1111WebpPixels,
    ];

    /// Canonical command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Format::A1111Pt => "a1111-pt",
            Format::A1111Safetensors => "safetensors",
            Format::DiffusersSafetensors => "diffusers",
            Format::DiffusersBin => "diffusers-bin",
            Format::SdxlSafetensors => "sdxl",
            Format::A1111Png => "png",
            Format::A1111PngPixels => "png-pixels",
            Format::RinongalPt => "rinongal-pt",
            Format::OneTrainer => "onetrainer",
            Format::KohyaPt => "kohya-pt",
            Format::KohyaSafetensors => "kohya-safetensors",
            Format::A1111WebpPixels => "webp-pixels",
        }
    }

    /// The extension the home tool uses.
    pub fn extension(self) -> &'static str {
        match self {
            Format::A1111Pt | Format::RinongalPt | Format::KohyaPt => "pt",
            Format::DiffusersBin => "bin",
            Format::A1111Png | Format::A1111PngPixels => "png",
            Format::A1111WebpPixels => "webp",
            _ => "safetensors",
        }
    }

    /// Whether [`write_embedding`] can produce it.
    pub fn writable(self) -> bool {
        !matches!(
            self,
            Format::A1111PngPixels | Format::RinongalPt | Format::A1111WebpPixels
        )
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = EmbeddingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let f = match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "a1111-pt" | "a1111" | "pt" => Format::A1111Pt,
            "safetensors" | "a1111-safetensors" | "emb-params" => Format::A1111Safetensors,
            "diffusers" | "diffusers-safetensors" => Format::DiffusersSafetensors,
            "diffusers-bin" | "bin" => Format::DiffusersBin,
            "sdxl" | "sdxl-safetensors" => Format::SdxlSafetensors,
            "png" | "a1111-png" => Format::A1111Png,
            "png-pixels" | "a1111-png-pixels" => Format::A1111PngPixels,
            "rinongal" | "rinongal-pt" => Format::RinongalPt,
            "onetrainer" | "one-trainer" => Format::OneTrainer,
            "kohya-pt" => Format::KohyaPt,
            "kohya" | "kohya-safetensors" => Format::KohyaSafetensors,
            "webp-pixels" | "a1111-webp-pixels" | "webp" => Format::A1111WebpPixels,
            _ => {
                let names: Vec<&str> = Format::ALL.iter().map(|f| f.name()).collect();
                return Err(EmbeddingError::UnknownFormatName {
                    name: s.to_string(),
                    known: names.join(", "),
                });
            }
        };
        Ok(f)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    F16,
}

impl FromStr for Precision {
    type Err = EmbeddingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" | "float" => Ok(Precision::F32),
            "f16" | "fp16" | "float16" | "half" => Ok(Precision::F16),
            _ => Err(EmbeddingError::UnknownFormatName {
                name: s.to_string(),
                known: "f32, f16".to_string(),
            }),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// CLIP ViT-L/14: 768 wide.
    Sd1,
    /// OpenCLIP ViT-H/14: 1024 wide.
    Sd2,
    /// CLIP ViT-L (768) + OpenCLIP bigG (1280).
    Sdxl,
}

impl Family {
    /// Which family an embedding's shape fits, if any.
    pub fn of(emb: &EmbeddingFile) -> Option<Family> {
        [Family::Sd1, Family::Sd2, Family::Sdxl]
            .into_iter()
            .find(|f| check_for_family(emb, *f).is_ok())
    }

    fn widths(self) -> &'static str {
        match self {
            Family::Sd1 => "768 (CLIP ViT-L/14)",
            Family::Sd2 => "1024 (OpenCLIP ViT-H/14)",
            Family::Sdxl => "clip_l 768 + clip_g 1280",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Sd1 => "SD1",
            Family::Sd2 => "SD2",
            Family::Sdxl => "SDXL",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EmbeddingError {
    #[error("{file}: {op}: {source}")]
    Io {
        file: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The destination exists and replacing it was not asked for.
    #[error("{file}: {reason}")]
    Exists { file: String, reason: String },
    #[error("{file}: {field}: {reason}")]
    Invalid {
        file: String,
        field: String,
        reason: String,
    },
    #[error("{file}: {field}: global '{global}' is not allowed in a learned-embedding file (only tensor-rebuilding globals are; nothing in the file is ever executed)")]
    ForbiddenGlobal {
        file: String,
        field: String,
        global: String,
    },
    #[error("{file}: {field}: file has multiple terms in it ({}); an embedding file must hold exactly one learned word", terms.join(", "))]
    MultipleTerms {
        file: String,
        field: String,
        terms: Vec<String>,
    },
    #[error("{file}: {field}: no vectors: an embedding needs at least one")]
    Empty { file: String, field: String },
    #[error("{file}: {field}: vector {vector}, column {column} is {value}; a non-finite value would poison every prompt using this word")]
    NonFinite {
        file: String,
        field: String,
        vector: usize,
        column: usize,
        value: f32,
    },
    #[error("{file}: {field}: too many vectors: {vectors}; at most {max} fit in one 75-token CLIP prompt chunk")]
    TooManyVectors {
        file: String,
        field: String,
        vectors: usize,
        max: usize,
    },
    #[error("{file}: {field}: width {found} does not fit {family}, which needs {expected}")]
    WidthMismatch {
        file: String,
        field: String,
        family: Family,
        found: String,
        expected: &'static str,
    },
    #[error("{file}: {field}: truncated: {reason}")]
    Truncated {
        file: String,
        field: String,
        reason: String,
    },
    #[error("{file}: {field}: needs {needed} bytes, over the {limit}-byte limit ({reason})")]
    TooLarge {
        file: String,
        field: String,
        needed: u64,
        limit: u64,
        reason: &'static str,
    },
    #[error("{file}: unrecognised learned-embedding file: {reason}")]
    UnknownFormat { file: String, reason: String },
    #[error("{file}: cannot write as {format}: {reason}")]
    Unsupported {
        file: String,
        format: Format,
        reason: String,
    },
    #[error("unknown name '{name}' (known: {known})")]
    UnknownFormatName { name: String, known: String },
}

/// Allocation accounting for one read: every reader charges what it allocates
/// from file content here before allocating it.
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    used: Cell<u64>,
}

impl Budget {
    /// `2 * input + 64 MiB`.
    pub fn for_input(len: usize) -> Budget {
        Budget {
            limit: (len as u64)
                .saturating_mul(2)
                .saturating_add(ALLOC_SLACK_BYTES),
            used: Cell::new(0),
        }
    }
    pub fn used(&self) -> u64 {
        self.used.get()
    }
    pub fn limit(&self) -> u64 {
        self.limit
    }
}

/// What every reader needs: the file's display name (for messages) and the budget.
pub(crate) struct Ctx {
    pub(crate) file: String,
    pub(crate) budget: Budget,
}

impl Ctx {
    pub(crate) fn new(file: &str, len: usize) -> Ctx {
        Ctx {
            file: file.to_string(),
            budget: Budget::for_input(len),
        }
    }

    pub(crate) fn charge(&self, bytes: u64, field: &str) -> Result<(), EmbeddingError> {
        let used = self.budget.used.get().saturating_add(bytes);
        if used > self.budget.limit {
            return Err(EmbeddingError::TooLarge {
                file: self.file.clone(),
                field: field.to_string(),
                needed: used,
                limit: self.budget.limit,
                reason: "reading never allocates more than 2 x file size + 64 MiB",
            });
        }
        self.budget.used.set(used);
        Ok(())
    }

    pub(crate) fn invalid(
        &self,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> EmbeddingError {
        EmbeddingError::Invalid {
            file: self.file.clone(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn truncated(
        &self,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> EmbeddingError {
        EmbeddingError::Truncated {
            file: self.file.clone(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Element types vectors may be stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DType {
    F32,
    F16,
    BF16,
    F64,
}

impl DType {
    pub(crate) fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
            DType::F64 => 8,
        }
    }
}

/// Decode `count` little-endian elements starting at element `offset`; the
/// caller has checked bounds, but a short slice still yields an error, not a panic.
pub(crate) fn decode_le(
    ctx: &Ctx,
    field: &str,
    bytes: &[u8],
    dtype: DType,
    count: usize,
) -> Result<Vec<f32>, EmbeddingError> {
    let need = count
        .checked_mul(dtype.size())
        .ok_or_else(|| ctx.invalid(field, "element count overflows"))?;
    let Some(bytes) = bytes.get(..need) else {
        return Err(ctx.truncated(
            field,
            format!("needs {need} bytes of tensor data, has {}", bytes.len()),
        ));
    };
    ctx.charge((count as u64).saturating_mul(4), field)?;
    let out = match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
    };
    Ok(out)
}

/// `[n, dim]` from a tensor shape: `[dim]` is one vector (old diffusers
/// concepts); leading 1s are squeezed (`[1, n, dim]`).
pub(crate) fn vectors_dim(
    ctx: &Ctx,
    field: &str,
    shape: &[usize],
) -> Result<(usize, usize), EmbeddingError> {
    let mut s = shape;
    while s.len() > 2 && s.first() == Some(&1) {
        s = &s[1..];
    }
    match *s {
        [dim] => Ok((1, dim)),
        [n, dim] => Ok((n, dim)),
        _ => Err(ctx.invalid(
            field,
            format!("tensor shape {shape:?} is not [vectors, width]"),
        )),
    }
}

pub(crate) fn make_part(
    ctx: &Ctx,
    field: &str,
    encoder: Encoder,
    shape: &[usize],
    data: Vec<f32>,
) -> Result<EmbeddingPart, EmbeddingError> {
    let (vectors, dim) = vectors_dim(ctx, field, shape)?;
    let part = EmbeddingPart {
        encoder,
        vectors,
        dim,
        data,
    };
    check_part(&ctx.file, field, &part)?;
    Ok(part)
}

/// Content checks every part must pass, on read and on write.
fn check_part(file: &str, field: &str, part: &EmbeddingPart) -> Result<(), EmbeddingError> {
    if part.vectors == 0 || part.dim == 0 {
        return Err(EmbeddingError::Empty {
            file: file.to_string(),
            field: field.to_string(),
        });
    }
    if part.vectors > MAX_VECTORS {
        return Err(EmbeddingError::TooManyVectors {
            file: file.to_string(),
            field: field.to_string(),
            vectors: part.vectors,
            max: MAX_VECTORS,
        });
    }
    if part.dim > MAX_DIM {
        return Err(EmbeddingError::Invalid {
            file: file.to_string(),
            field: field.to_string(),
            reason: format!(
                "width {} exceeds {MAX_DIM}; no text encoder is that wide",
                part.dim
            ),
        });
    }
    if part.data.len() != part.vectors * part.dim {
        return Err(EmbeddingError::Invalid {
            file: file.to_string(),
            field: field.to_string(),
            reason: format!(
                "{} values for {} x {}",
                part.data.len(),
                part.vectors,
                part.dim
            ),
        });
    }
    if let Some(i) = part.data.iter().position(|v| !v.is_finite()) {
        return Err(EmbeddingError::NonFinite {
            file: file.to_string(),
            field: field.to_string(),
            vector: i / part.dim,
            column: i % part.dim,
            value: part.data[i],
        });
    }
    Ok(())
}

/// Structural and content checks of a whole embedding (not the family width).
pub fn validate(emb: &EmbeddingFile, file: &str) -> Result<(), EmbeddingError> {
    match emb.parts.as_slice() {
        [] => {
            return Err(EmbeddingError::Empty {
                file: file.to_string(),
                field: "parts".to_string(),
            })
        }
        [p] if p.encoder == Encoder::Single => {}
        [l, g] if l.encoder == Encoder::ClipL && g.encoder == Encoder::ClipG => {
            if l.vectors != g.vectors {
                return Err(EmbeddingError::Invalid {
                    file: file.to_string(),
                    field: "clip_l/clip_g".to_string(),
                    reason: format!(
                        "clip_l has {} vectors but clip_g has {}; SDXL needs one per token in both",
                        l.vectors, g.vectors
                    ),
                });
            }
        }
        other => {
            let encs: Vec<String> = other.iter().map(|p| p.encoder.to_string()).collect();
            return Err(EmbeddingError::Invalid {
                file: file.to_string(),
                field: "parts".to_string(),
                reason: format!(
                    "parts [{}]; expected [single] or [clip_l, clip_g]",
                    encs.join(", ")
                ),
            });
        }
    }
    for p in &emb.parts {
        check_part(file, &p.encoder.to_string(), p)?;
    }
    Ok(())
}

/// Does the width fit the model family? (The vectors are fed straight into the
/// text encoder's token-embedding table, so the width must match exactly.)
pub fn check_for_family(emb: &EmbeddingFile, family: Family) -> Result<(), EmbeddingError> {
    let file = emb.name.clone().unwrap_or_else(|| "embedding".to_string());
    let found = emb
        .parts
        .iter()
        .map(|p| format!("{} {}", p.encoder, p.dim))
        .collect::<Vec<_>>()
        .join(" + ");
    let ok = match (family, emb.parts.as_slice()) {
        (Family::Sd1, [p]) => p.encoder == Encoder::Single && p.dim == 768,
        (Family::Sd2, [p]) => p.encoder == Encoder::Single && p.dim == 1024,
        (Family::Sdxl, [l, g]) => {
            l.encoder == Encoder::ClipL
                && g.encoder == Encoder::ClipG
                && l.dim == 768
                && g.dim == 1280
                && l.vectors == g.vectors
        }
        _ => false,
    };
    if ok {
        return Ok(());
    }
    Err(EmbeddingError::WidthMismatch {
        file,
        field: "width".to_string(),
        family,
        found,
        expected: family.widths(),
    })
}

fn display_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

fn io_err(file: &str, op: &'static str, source: std::io::Error) -> EmbeddingError {
    EmbeddingError::Io {
        file: file.to_string(),
        op,
        source,
    }
}

/// Read a learned embedding from disk, whatever its layout.
/// Regular files and pipes are read (at most [`MAX_FILE_BYTES`], counted as bytes
/// arrive); devices, sockets and folders are refused.
pub fn read_embedding(path: &Path) -> Result<EmbeddingFile, EmbeddingError> {
    use crate::io::read::{self, FileKind, ReadFailure};
    let limit = read::EMBEDDING_FILE;
    let contents = read::read_bounded_within(path, &limit, read::PIPE_WAIT).map_err(|e| {
        // Named as typed: `/dev/fd/63`, not its last component.
        let file = path.display().to_string();
        match e.failure {
            ReadFailure::TooLarge { size, read, .. } => EmbeddingError::TooLarge {
                file,
                field: "file size".to_string(),
                needed: size.unwrap_or(read),
                limit: limit.max_bytes,
                reason: "learned-embedding files are kilobytes; this is not one",
            },
            _ => io_err(&file, limit.field, e.into_reason()),
        }
    })?;
    // A pipe's last component is a descriptor number (`63`): name the whole path.
    let file = match contents.kind {
        FileKind::Pipe => path.display().to_string(),
        _ => display_name(path),
    };
    read_embedding_bytes(&contents.bytes, &file)
}

/// Read a learned embedding from memory. `name_hint` names the file in errors
/// and gives the word's name when the file stores none (A1111 uses the stem).
pub fn read_embedding_bytes(
    bytes: &[u8],
    name_hint: &str,
) -> Result<EmbeddingFile, EmbeddingError> {
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(EmbeddingError::TooLarge {
            file: name_hint.to_string(),
            field: "file size".to_string(),
            needed: bytes.len() as u64,
            limit: MAX_FILE_BYTES,
            reason: "learned-embedding files are kilobytes; this is not one",
        });
    }
    let ctx = Ctx::new(name_hint, bytes.len());
    let mut emb = if bytes.starts_with(png::SIGNATURE) {
        png::read(&ctx, bytes)?
    } else if webp::looks_like(bytes) {
        webp::read(&ctx, bytes)?
    } else if let Some(e) = webp::unsupported_picture(&ctx, bytes) {
        return Err(e);
    } else if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
        pt::read(&ctx, bytes)?
    } else if safetensors_layouts::looks_like(bytes) {
        safetensors_layouts::read(&ctx, bytes)?
    } else if bytes.first() == Some(&0x80) {
        return Err(EmbeddingError::UnknownFormat {
            file: ctx.file.clone(),
            reason: "a bare pickle (torch < 1.6 legacy serialisation); re-save it with torch >= 1.6 (zip) or as safetensors".to_string(),
        });
    } else if bytes.is_empty() {
        return Err(ctx.truncated("file", "the file is empty"));
    } else {
        let magic: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        return Err(EmbeddingError::UnknownFormat {
            file: ctx.file.clone(),
            reason: format!(
                "starts with bytes {}; expected a torch zip (.pt/.bin), safetensors, PNG or WebP",
                magic.join(" ")
            ),
        });
    };
    if emb.name.is_none() {
        let stem = Path::new(name_hint)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .filter(|s| !s.is_empty());
        emb.name = stem;
    }
    validate(&emb, &ctx.file)?;
    Ok(emb)
}

/// Serialise to bytes. `stem` names the torch archive folder and the diffusers
/// token when the embedding has no name.
pub fn write_embedding_bytes(
    emb: &EmbeddingFile,
    format: Format,
    precision: Precision,
    stem: &str,
) -> Result<Vec<u8>, EmbeddingError> {
    validate(emb, stem)?;
    let single = |what: &str| -> Result<&EmbeddingPart, EmbeddingError> {
        match emb.parts.as_slice() {
            [p] => Ok(p),
            _ => Err(EmbeddingError::Unsupported {
                file: stem.to_string(),
                format,
                reason: format!("{what} holds one tensor; this is an SDXL (clip_l + clip_g) embedding, write it as sdxl"),
            }),
        }
    };
    let sdxl = || -> Result<(&EmbeddingPart, &EmbeddingPart), EmbeddingError> {
        match emb.parts.as_slice() {
            [l, g] => Ok((l, g)),
            _ => Err(EmbeddingError::Unsupported {
                file: stem.to_string(),
                format,
                reason: "needs clip_l and clip_g parts; this embedding has one encoder".to_string(),
            }),
        }
    };
    let token = emb.name.clone().unwrap_or_else(|| stem.to_string());
    let out = match format {
        Format::A1111Pt => pt::write_a1111(emb, single("A1111 .pt")?, precision, stem)?,
        Format::KohyaPt => match emb.parts.as_slice() {
            [p] => pt::write_tensor_dict(&[("emb_params", p)], precision, stem)?,
            _ => {
                let (l, g) = sdxl()?;
                pt::write_tensor_dict(&[("clip_l", l), ("clip_g", g)], precision, stem)?
            }
        },
        Format::DiffusersBin => pt::write_tensor_dict(
            &[(token.as_str(), single("diffusers .bin")?)],
            precision,
            stem,
        )?,
        Format::A1111Safetensors | Format::KohyaSafetensors => safetensors_layouts::write(
            stem,
            &[("emb_params", single("emb_params")?)],
            precision,
            None,
        )?,
        Format::OneTrainer => match emb.parts.as_slice() {
            [p] => safetensors_layouts::write(stem, &[("emp_params", p)], precision, None)?,
            _ => {
                let (l, g) = sdxl()?;
                safetensors_layouts::write(stem, &[("clip_l", l), ("clip_g", g)], precision, None)?
            }
        },
        Format::DiffusersSafetensors => safetensors_layouts::write(
            stem,
            &[(token.as_str(), single("diffusers learned_embeds")?)],
            precision,
            // diffusers' textual_inversion example writes this metadata.
            Some(&[("format", "pt")]),
        )?,
        Format::SdxlSafetensors => {
            let (l, g) = sdxl()?;
            safetensors_layouts::write(stem, &[("clip_g", g), ("clip_l", l)], precision, None)?
        }
        Format::A1111Png => png::write(emb, single("A1111 PNG")?, precision, stem)?,
        Format::A1111PngPixels | Format::RinongalPt | Format::A1111WebpPixels => {
            return Err(EmbeddingError::Unsupported {
                file: stem.to_string(),
                format,
                reason: "read-only layout; write png, a1111-pt or safetensors instead".to_string(),
            })
        }
    };
    Ok(out)
}

/// Writes atomically (a temporary file beside `path`, synced, then put in place) and
/// refuses to replace anything already at `path`, a symlink of any kind included; see
/// [`write_embedding_to`] to replace.
pub fn write_embedding(
    path: &Path,
    emb: &EmbeddingFile,
    format: Format,
    precision: Precision,
) -> Result<(), EmbeddingError> {
    write_embedding_to(path, emb, format, precision, Existing::Refuse)
}

/// [`write_embedding`], saying what to do when `path` exists. On any failure the
/// destination is untouched and no temporary file remains.
pub fn write_embedding_to(
    path: &Path,
    emb: &EmbeddingFile,
    format: Format,
    precision: Precision,
    existing: Existing,
) -> Result<(), EmbeddingError> {
    let file = display_name(path);
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "embedding".to_string());
    let bytes = write_embedding_bytes(emb, format, precision, &stem)?;
    crate::io::write_bytes_atomic(path, &bytes, existing).map_err(|e| {
        if e.source.kind() == std::io::ErrorKind::AlreadyExists {
            EmbeddingError::Exists {
                file: path.display().to_string(),
                reason: e.source.to_string(),
            }
        } else {
            io_err(&file, e.op, e.source)
        }
    })
}

/// Read `src` (any layout) and write it to `dst` as `format`, never replacing what is
/// at `dst` unless `existing` says so.
pub fn convert(
    src: &Path,
    dst: &Path,
    format: Format,
    precision: Precision,
    existing: Existing,
) -> Result<(), EmbeddingError> {
    let emb = read_embedding(src)?;
    write_embedding_to(dst, &emb, format, precision, existing)
}

/// Round to the precision a writer would store (what a reader gets back).
pub fn round_to(data: &[f32], precision: Precision) -> Vec<f32> {
    match precision {
        Precision::F32 => data.to_vec(),
        Precision::F16 => data
            .iter()
            .map(|v| half::f16::from_f32(*v).to_f32())
            .collect(),
    }
}

/// Little-endian bytes of a part at `precision`; values that overflow f16
/// become infinite, which is refused rather than silently written.
pub(crate) fn encode_part(
    file: &str,
    field: &str,
    part: &EmbeddingPart,
    precision: Precision,
) -> Result<Vec<u8>, EmbeddingError> {
    match precision {
        Precision::F32 => Ok(part.data.iter().flat_map(|v| v.to_le_bytes()).collect()),
        Precision::F16 => {
            let mut out = Vec::with_capacity(part.data.len() * 2);
            for (i, v) in part.data.iter().enumerate() {
                let h = half::f16::from_f32(*v);
                if !h.is_finite() {
                    return Err(EmbeddingError::NonFinite {
                        file: file.to_string(),
                        field: format!("{field} (as f16)"),
                        vector: i / part.dim.max(1),
                        column: i % part.dim.max(1),
                        value: h.to_f32(),
                    });
                }
                out.extend_from_slice(&h.to_le_bytes());
            }
            Ok(out)
        }
    }
}

/// Names of a zip's members and whether each is STORED, after the same
/// bounded parse the readers use (for tests and diagnostics).
pub fn zip_member_names(
    bytes: &[u8],
    name_hint: &str,
) -> Result<Vec<(String, bool)>, EmbeddingError> {
    let ctx = Ctx::new(name_hint, bytes.len());
    let a = zip::Archive::parse(&ctx, bytes)?;
    Ok(a.entries
        .iter()
        .map(|e| (e.name.clone(), e.stored()))
        .collect())
}

/// Entry points for the fuzz targets: each layer on its own, so the fuzzer
/// does not have to get through the outer layers first.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// Run a raw pickle through the VM (as if it were an archive's data.pkl).
    pub fn pickle(bytes: &[u8]) -> Result<usize, EmbeddingError> {
        let ctx = Ctx::new("fuzz.pkl", bytes.len());
        let p = pickle::parse(&ctx, "data.pkl", bytes)?;
        Ok(p.arena.len())
    }

    /// Parse a zip and read every member.
    pub fn zip(bytes: &[u8]) -> Result<usize, EmbeddingError> {
        let ctx = Ctx::new("fuzz.zip", bytes.len());
        let a = zip::Archive::parse(&ctx, bytes)?;
        let mut total = 0;
        for e in &a.entries {
            total += a.read(&ctx, e)?.len();
        }
        Ok(total)
    }

    /// Budget used by a full read, to check the allocation bound.
    pub fn read_with_budget(bytes: &[u8]) -> (Result<EmbeddingFile, EmbeddingError>, u64, u64) {
        let ctx = Ctx::new("fuzz", bytes.len());
        let r = match bytes.first() {
            Some(0x89) => png::read(&ctx, bytes),
            _ if webp::looks_like(bytes) => webp::read(&ctx, bytes),
            Some(b'P') => pt::read(&ctx, bytes),
            _ => safetensors_layouts::read(&ctx, bytes),
        };
        (r, ctx.budget.used(), ctx.budget.limit())
    }

    /// A copy of a PNG with every chunk's CRC-32 recomputed, so that a fuzzer's
    /// mutations get past the checksum to the decoders behind it.
    pub fn png_with_fixed_crcs(bytes: &[u8]) -> Vec<u8> {
        let mut out = bytes.to_vec();
        png::fix_crcs(&mut out);
        out
    }
}
