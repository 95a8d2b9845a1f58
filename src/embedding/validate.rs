//! What every embedding must satisfy, on read and on write, and whether its
//! width fits a model family.

use super::{EmbeddingError, EmbeddingFile, EmbeddingPart, Encoder, Family};

/// A CLIP prompt chunk holds 75 tokens; a longer embedding can never be used whole.
pub const MAX_VECTORS: usize = 75;
/// Widest token embedding we accept per encoder (bigG is 1280; leave room).
pub const MAX_DIM: usize = 8192;

/// Content checks every part must pass, on read and on write.
pub(crate) fn check_part(
    file: &str,
    field: &str,
    part: &EmbeddingPart,
) -> Result<(), EmbeddingError> {
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
pub(crate) fn validate(emb: &EmbeddingFile, file: &str) -> Result<(), EmbeddingError> {
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
                        "clip_l has {} vector{} but clip_g has {}: an SDXL word needs the same number in both encoders (diffusers would load them misaligned without a word)",
                        l.vectors,
                        if l.vectors == 1 { "" } else { "s" },
                        g.vectors
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
