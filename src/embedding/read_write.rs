//! The entry points: read any layout from a path or from memory, write one
//! layout atomically, convert between them.

use std::path::Path;

use super::{
    diffusers_pair, png, pt, safetensors_layouts, validate, webp, zip, Ctx, EmbeddingError,
    EmbeddingFile, EmbeddingPart, Existing, Format, Precision, MAX_FILE_BYTES,
};

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
/// arrive); devices, sockets and folders are refused, except diffusers' SDXL pair:
/// `FIRST+SECOND` where nothing is at that path itself (`learned_embeds.safetensors+learned_embeds_2.safetensors`),
/// or a folder holding `learned_embeds.safetensors` and `learned_embeds_2.safetensors`
/// (see [`read_embedding_pair`](super::read_embedding_pair)).
pub fn read_embedding(path: &Path) -> Result<EmbeddingFile, EmbeddingError> {
    if let Some((first, second)) = diffusers_pair::pair_paths(path) {
        return diffusers_pair::read_embedding_pair(&first, &second);
    }
    read_one(path)
}

/// One file, whatever its layout.
pub(super) fn read_one(path: &Path) -> Result<EmbeddingFile, EmbeddingError> {
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
        Format::DiffusersSdxl => {
            return Err(EmbeddingError::Unsupported {
                file: stem.to_string(),
                format,
                reason: "two files (NAME.safetensors + NAME_2.safetensors): write it to a path \
                         with write_embedding, or take both files' bytes from write_embedding_pair_bytes"
                    .to_string(),
            })
        }
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
/// destination is untouched and no temporary file remains. `diffusers-sdxl` writes two
/// files, `path` (`NAME.safetensors`) and
/// [`diffusers_sdxl_second_path`](super::diffusers_sdxl_second_path) (`NAME_2.safetensors`),
/// both or neither.
pub fn write_embedding_to(
    path: &Path,
    emb: &EmbeddingFile,
    format: Format,
    precision: Precision,
    existing: Existing,
) -> Result<(), EmbeddingError> {
    if format == Format::DiffusersSdxl {
        return diffusers_pair::write(path, emb, precision, existing);
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "embedding".to_string());
    let bytes = write_embedding_bytes(emb, format, precision, &stem)?;
    put_file(path, &bytes, existing)
}

/// `bytes` to `path` atomically, refusing or replacing what is there, with the writers' errors.
pub(super) fn put_file(
    path: &Path,
    bytes: &[u8],
    existing: Existing,
) -> Result<(), EmbeddingError> {
    let file = display_name(path);
    crate::io::write_bytes_atomic(path, bytes, existing).map_err(|e| {
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
