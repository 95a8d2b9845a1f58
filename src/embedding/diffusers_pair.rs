//! diffusers' SDXL pair. `examples/textual_inversion/textual_inversion_sdxl.py` saves one
//! word as two files: `learned_embeds.safetensors` `{token: [n, 768]}` (rows of
//! `text_encoder`, CLIP ViT-L) and `learned_embeds_2.safetensors` `{token: [n, 1280]}`
//! (rows of `text_encoder_2`, OpenCLIP bigG), both with metadata `{"format": "pt"}`. A
//! diffusers user loads them with one `load_textual_inversion(folder, weight_name=...,
//! text_encoder=..., tokenizer=...)` per encoder.
//!
//! sdti names a pair by its first file: writing `NAME.safetensors` as `diffusers-sdxl` puts
//! `NAME.safetensors` (clip_l) and `NAME_2.safetensors` (clip_g) side by side, so
//! `out/learned_embeds.safetensors` gives exactly diffusers' two names. Both files are
//! written or neither. Reading takes `FIRST+SECOND`, or a folder holding diffusers' two
//! names; the halves must hold one word: the same token, the same number of vectors (where
//! diffusers would load a mismatch silently), clip_l's width first.

use std::path::{Path, PathBuf};

use super::read_write::{put_file, read_one};
use super::{
    safetensors_layouts, validate, EmbeddingError, EmbeddingFile, EmbeddingPart, Encoder, Existing,
    Format, Precision,
};

/// The first file's name in diffusers' output folder (`text_encoder`, clip_l).
pub const DIFFUSERS_SDXL_FIRST: &str = "learned_embeds.safetensors";
/// The second file's name in diffusers' output folder (`text_encoder_2`, clip_g).
pub const DIFFUSERS_SDXL_SECOND: &str = "learned_embeds_2.safetensors";

/// diffusers' widths: CLIP ViT-L and OpenCLIP bigG, to tell a swapped pair.
const L_WIDTH: usize = 768;
const G_WIDTH: usize = 1280;

/// Where the second (clip_g) file of a `diffusers-sdxl` pair written to `first` goes:
/// `NAME_2.safetensors` beside `NAME.safetensors`, as diffusers names
/// `learned_embeds_2.safetensors`. `first` must end in `.safetensors`.
///
/// ```
/// use sdti::embedding::diffusers_sdxl_second_path;
/// use std::path::Path;
/// let second = diffusers_sdxl_second_path(Path::new("out/learned_embeds.safetensors")).unwrap();
/// assert_eq!(second, Path::new("out/learned_embeds_2.safetensors"));
/// assert!(diffusers_sdxl_second_path(Path::new("cat.pt")).is_err());
/// ```
pub fn diffusers_sdxl_second_path(first: &Path) -> Result<PathBuf, EmbeddingError> {
    let refuse = |reason: &str| EmbeddingError::Unsupported {
        file: first.display().to_string(),
        format: Format::DiffusersSdxl,
        reason: reason.to_string(),
    };
    let ext = first
        .extension()
        .and_then(|e| e.to_str())
        .filter(|e| e.eq_ignore_ascii_case("safetensors"))
        .ok_or_else(|| {
            refuse(
                "the pair is written as NAME.safetensors and NAME_2.safetensors; \
                 give a path ending in .safetensors (diffusers names it learned_embeds.safetensors)",
            )
        })?;
    let stem = first
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| refuse("the file name has no stem (or is not UTF-8) to add _2 to"))?;
    Ok(first.with_file_name(format!("{stem}_2.{ext}")))
}

/// The two files of a `diffusers-sdxl` word: clip_l's `{token: [n, 768]}`, then clip_g's
/// `{token: [n, 1280]}`, each with diffusers' metadata `{"format": "pt"}`. The token is
/// the embedding's name, else `stem`.
pub fn write_embedding_pair_bytes(
    emb: &EmbeddingFile,
    precision: Precision,
    stem: &str,
) -> Result<(Vec<u8>, Vec<u8>), EmbeddingError> {
    validate(emb, stem)?;
    let (l, g) = match emb.parts.as_slice() {
        [l, g] => (l, g),
        _ => {
            return Err(EmbeddingError::Unsupported {
                file: stem.to_string(),
                format: Format::DiffusersSdxl,
                reason: "needs clip_l and clip_g parts; this embedding has one encoder \
                         (write it as diffusers for a one-encoder model)"
                    .to_string(),
            })
        }
    };
    let token = emb.name.clone().unwrap_or_else(|| stem.to_string());
    // diffusers' save_progress writes this metadata in both files.
    let meta: &[(&str, &str)] = &[("format", "pt")];
    let first = safetensors_layouts::write(stem, &[(token.as_str(), l)], precision, Some(meta))?;
    let second = safetensors_layouts::write(
        &format!("{stem}_2"),
        &[(token.as_str(), g)],
        precision,
        Some(meta),
    )?;
    Ok((first, second))
}

/// Writes the pair to `first` and its [`diffusers_sdxl_second_path`]: both files or
/// neither. With [`Existing::Refuse`] nothing is written when either path is taken; with
/// [`Existing::Replace`] a failure of the second write puts back what the first path held
/// (a regular file's contents; anything else there is gone, as with any replacing write).
pub(crate) fn write(
    first: &Path,
    emb: &EmbeddingFile,
    precision: Precision,
    existing: Existing,
) -> Result<(), EmbeddingError> {
    let second = diffusers_sdxl_second_path(first)?;
    let stem = first
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "embedding".to_string());
    let (first_bytes, second_bytes) = write_embedding_pair_bytes(emb, precision, &stem)?;
    if existing == Existing::Refuse {
        for p in [first, second.as_path()] {
            if let Some(kind) = crate::io::existing_kind(p) {
                return Err(EmbeddingError::Exists {
                    file: p.display().to_string(),
                    reason: format!(
                        "{kind} is already there; the diffusers-sdxl pair {} + {} is written whole or not at all: ask to overwrite or choose another name",
                        file_name(first),
                        file_name(&second)
                    ),
                });
            }
        }
    }
    // What a replaced first file held, to put back if the second write fails.
    let previous = match existing {
        Existing::Replace => std::fs::symlink_metadata(first)
            .ok()
            .filter(|m| m.is_file() && m.len() <= super::MAX_FILE_BYTES)
            .and_then(|_| std::fs::read(first).ok()),
        Existing::Refuse => None,
    };
    put_file(first, &first_bytes, existing)?;
    if let Err(e) = put_file(&second, &second_bytes, existing) {
        // Best effort: the error of the second write is the one to report.
        let _ = match previous {
            Some(old) => put_file(first, &old, Existing::Replace),
            None => std::fs::remove_file(first).map_err(|source| EmbeddingError::Io {
                file: first.display().to_string(),
                op: "remove the first file of an unfinished pair",
                source,
            }),
        };
        return Err(e);
    }
    Ok(())
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// One half of a pair, read alone; a missing file says which half it is.
fn read_half(path: &Path, which: Encoder) -> Result<EmbeddingFile, EmbeddingError> {
    if std::fs::symlink_metadata(path).is_err() {
        return Err(EmbeddingError::Io {
            file: path.display().to_string(),
            op: match which {
                Encoder::ClipG => {
                    "read the second (clip_g, text_encoder_2) file of a diffusers SDXL pair"
                }
                _ => "read the first (clip_l, text_encoder) file of a diffusers SDXL pair",
            },
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    let emb = read_one(path)?;
    if emb.parts.len() != 1 {
        return Err(EmbeddingError::Invalid {
            file: file_name(path),
            field: "tensors".to_string(),
            reason: format!(
                "holds clip_l and clip_g already ({}); read it alone, not as half of a diffusers SDXL pair",
                emb.source_format
            ),
        });
    }
    Ok(emb)
}

/// Reads diffusers' SDXL pair: `first` holds clip_l's vectors (`learned_embeds.safetensors`,
/// `[n, 768]`), `second` clip_g's (`learned_embeds_2.safetensors`, `[n, 1280]`). Each may be
/// any one-encoder layout sdti reads (diffusers writes `{token: tensor}` safetensors).
/// Refused: a missing half, halves in the wrong order (1280 then 768), different numbers of
/// vectors, different tokens, a half that already holds two encoders.
pub fn read_embedding_pair(first: &Path, second: &Path) -> Result<EmbeddingFile, EmbeddingError> {
    let l = read_half(first, Encoder::ClipL)?;
    let g = read_half(second, Encoder::ClipG)?;
    let pair = format!("{} + {}", file_name(first), file_name(second));
    let (lp, gp) = (&l.parts[0], &g.parts[0]);
    if (lp.dim, gp.dim) == (G_WIDTH, L_WIDTH) {
        return Err(EmbeddingError::Invalid {
            file: pair,
            field: "widths".to_string(),
            reason: format!(
                "the first file is {G_WIDTH} wide (clip_g, OpenCLIP bigG) and the second {L_WIDTH} \
                 (clip_l, CLIP ViT-L): the pair is swapped; give the {L_WIDTH}-wide file \
                 ({DIFFUSERS_SDXL_FIRST}) first and the {G_WIDTH}-wide one ({DIFFUSERS_SDXL_SECOND}) second"
            ),
        });
    }
    if lp.vectors != gp.vectors {
        return Err(EmbeddingError::Invalid {
            file: pair,
            field: "vectors".to_string(),
            reason: format!(
                "{} has {} vector{} (clip_l) but {} has {} (clip_g); one word needs the same \
                 number in both encoders (diffusers would load them misaligned)",
                file_name(first),
                lp.vectors,
                if lp.vectors == 1 { "" } else { "s" },
                file_name(second),
                gp.vectors
            ),
        });
    }
    // Tokens are stored only by diffusers' layouts; other layouts' names are file stems.
    let stores_token = |e: &EmbeddingFile| {
        matches!(
            e.source_format,
            Format::DiffusersSafetensors | Format::DiffusersBin
        )
    };
    if stores_token(&l) && stores_token(&g) && l.name != g.name {
        return Err(EmbeddingError::Invalid {
            file: pair,
            field: "token".to_string(),
            reason: format!(
                "'{}' in {} but '{}' in {}: the two files of a pair hold one word",
                l.name.as_deref().unwrap_or(""),
                file_name(first),
                g.name.as_deref().unwrap_or(""),
                file_name(second)
            ),
        });
    }
    let part = |p: &EmbeddingPart, encoder| EmbeddingPart {
        encoder,
        vectors: p.vectors,
        dim: p.dim,
        data: p.data.clone(),
    };
    let emb = EmbeddingFile {
        name: l.name.clone(),
        step: None,
        sd_checkpoint: None,
        sd_checkpoint_name: None,
        parts: vec![part(lp, Encoder::ClipL), part(gp, Encoder::ClipG)],
        source_format: Format::DiffusersSdxl,
    };
    validate(&emb, &pair)?;
    Ok(emb)
}

/// The two files `spec` names: when nothing is at `spec` itself, `FIRST+SECOND` (split at
/// the `+` where both exist, else where the first exists, else at the first `+`); or a
/// folder holding either of diffusers' two file names (the pair's reader then names a
/// missing one).
pub(crate) fn pair_paths(spec: &Path) -> Option<(PathBuf, PathBuf)> {
    match std::fs::symlink_metadata(spec) {
        Ok(m) if m.is_dir() || (m.file_type().is_symlink() && spec.is_dir()) => {
            let (a, b) = (
                spec.join(DIFFUSERS_SDXL_FIRST),
                spec.join(DIFFUSERS_SDXL_SECOND),
            );
            (a.is_file() || b.is_file()).then_some((a, b))
        }
        Ok(_) => None,
        Err(_) => {
            let s = spec.to_str()?;
            let splits: Vec<(PathBuf, PathBuf)> = s
                .match_indices('+')
                .map(|(i, _)| (&s[..i], &s[i + 1..]))
                .filter(|(a, b)| !a.is_empty() && !b.is_empty())
                .map(|(a, b)| (PathBuf::from(a), PathBuf::from(b)))
                .collect();
            let exists = |p: &Path| std::fs::symlink_metadata(p).is_ok();
            splits
                .iter()
                .find(|(a, b)| exists(a) && exists(b))
                .or_else(|| splits.iter().find(|(a, _)| exists(a)))
                .or_else(|| splits.first())
                .cloned()
        }
    }
}
