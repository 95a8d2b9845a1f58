//! The names of layouts, encoders, precisions and model families: how each is
//! printed and parsed. Every name printed (by `inspect --json`, the CLI, the C ABI's
//! `sdti_format_name`) parses back to the same value.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use super::{check_for_family, EmbeddingError, EmbeddingFile};

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
    /// diffusers' SDXL pair (`textual_inversion_sdxl.py`): `NAME.safetensors`
    /// `{token: [n, 768]}` for `text_encoder` and `NAME_2.safetensors` `{token: [n, 1280]}`
    /// for `text_encoder_2`. Written from one path (`NAME.safetensors`, the second file
    /// beside it); read from `FIRST+SECOND` or a folder with diffusers' two names
    /// ([`read_embedding`](super::read_embedding)).
    DiffusersSdxl,
}

impl Format {
    pub const ALL: [Format; 13] = [
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
        Format::DiffusersSdxl,
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
            Format::DiffusersSdxl => "diffusers-sdxl",
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

    /// The layout a file is written in when only its name is given: `.pt` is A1111's,
    /// `.bin` diffusers', `.png` A1111's text chunk, and `.safetensors` A1111's
    /// `emb_params`, or `sdxl` (`clip_l` + `clip_g`) when `sdxl` is set, since one key
    /// cannot hold two encoders. The extension is matched case-insensitively; any other
    /// (or none) is `None`, for the caller to ask for a format by name.
    ///
    /// ```
    /// use sdti::embedding::Format;
    /// use std::path::Path;
    /// assert_eq!(Format::from_extension(Path::new("cat.PT"), false), Some(Format::A1111Pt));
    /// assert_eq!(Format::from_extension(Path::new("cat.safetensors"), true), Some(Format::SdxlSafetensors));
    /// assert_eq!(Format::from_extension(Path::new("cat.webp"), false), None);
    /// ```
    pub fn from_extension(path: &Path, sdxl: bool) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        Some(match ext.as_str() {
            "pt" => Format::A1111Pt,
            "safetensors" if sdxl => Format::SdxlSafetensors,
            "safetensors" => Format::A1111Safetensors,
            "bin" => Format::DiffusersBin,
            "png" => Format::A1111Png,
            _ => return None,
        })
    }

    /// Whether [`write_embedding`](super::write_embedding) can produce it.
    pub fn writable(self) -> bool {
        !matches!(
            self,
            Format::A1111PngPixels | Format::RinongalPt | Format::A1111WebpPixels
        )
    }

    /// Whether it holds only SDXL words (`clip_l` + `clip_g`): `sdxl` and `diffusers-sdxl`.
    /// The other writable layouts hold one encoder's vectors (kohya-pt and onetrainer
    /// hold either).
    pub fn sdxl_only(self) -> bool {
        matches!(self, Format::SdxlSafetensors | Format::DiffusersSdxl)
    }

    /// How many files a write produces: two for `diffusers-sdxl`, else one.
    pub fn files(self) -> usize {
        match self {
            Format::DiffusersSdxl => 2,
            _ => 1,
        }
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
            "diffusers-sdxl" | "diffusers-sdxl-pair" | "diffusers-pair" => Format::DiffusersSdxl,
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

/// A Stable Diffusion model family: which text encoders condition the UNet, hence which
/// embedding widths fit it. Model loading tells it from a model's files
/// ([`crate::model::files`]); an embedding's shape says which it fits ([`Family::of`]).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// CLIP ViT-L/14: 768 wide.
    #[default]
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

    /// The family's name in sentences about models: "SD 1.x", "SD 2.x", "SDXL".
    pub fn model_name(self) -> &'static str {
        match self {
            Family::Sd1 => "SD 1.x",
            Family::Sd2 => "SD 2.x",
            Family::Sdxl => "SDXL",
        }
    }

    pub(super) fn widths(self) -> &'static str {
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
