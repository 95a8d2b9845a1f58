//! safetensors layouts: `emb_params` (A1111/ComfyUI/InvokeAI/sd.cpp/kohya),
//! `emp_params` (OneTrainer), `{token: t}` (diffusers), `clip_l`+`clip_g` (SDXL).

use std::collections::HashMap;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use super::{
    decode_le, encode_part, make_part, Ctx, DType, EmbeddingError, EmbeddingFile, EmbeddingPart,
    Encoder, Format, Precision,
};

/// An embedding's header is a few hundred bytes (kohya adds training metadata,
/// still kilobytes); the safetensors crate allows 100 MB, which it would parse
/// into a HashMap before we could look.
const MAX_HEADER: u64 = 1 << 20;
const MAX_TENSORS: usize = 16;

/// 8-byte little-endian header length, then a JSON object. A header length
/// past the end still counts (so a cut-short file says "truncated").
pub(crate) fn looks_like(bytes: &[u8]) -> bool {
    bytes.len() >= 9
        && bytes[..8]
            .try_into()
            .map(u64::from_le_bytes)
            .is_ok_and(|n| (2..=MAX_HEADER).contains(&n))
        && bytes[8] == b'{'
}

fn dtype_of(ctx: &Ctx, field: &str, d: Dtype) -> Result<DType, EmbeddingError> {
    match d {
        Dtype::F32 => Ok(DType::F32),
        Dtype::F16 => Ok(DType::F16),
        Dtype::BF16 => Ok(DType::BF16),
        Dtype::F64 => Ok(DType::F64),
        other => Err(ctx.invalid(
            field,
            format!("dtype {other:?}; vectors must be F32, F16, BF16 or F64"),
        )),
    }
}

fn part(
    ctx: &Ctx,
    field: &str,
    encoder: Encoder,
    t: &TensorView<'_>,
) -> Result<EmbeddingPart, EmbeddingError> {
    let dtype = dtype_of(ctx, field, t.dtype())?;
    let numel = t
        .shape()
        .iter()
        .try_fold(1usize, |a, s| a.checked_mul(*s))
        .ok_or_else(|| ctx.invalid(field, "element count overflows"))?;
    let data = decode_le(ctx, field, t.data(), dtype, numel)?;
    make_part(ctx, field, encoder, t.shape(), data)
}

/// The header, checked for size first and parsed by the safetensors crate, and
/// whether its metadata is kohya's (`ss_*` keys).
fn parse_header<'b>(ctx: &Ctx, bytes: &'b [u8]) -> Result<(SafeTensors<'b>, bool), EmbeddingError> {
    let field = "safetensors header";
    let n = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| ctx.truncated(field, "shorter than the 8-byte header length"))?;
    if n > MAX_HEADER {
        return Err(ctx.invalid(
            field,
            format!("{n}-byte header; an embedding's is at most {MAX_HEADER}"),
        ));
    }
    // The crate's own parse: data_offsets contiguous, in bounds, matching dtype x shape.
    ctx.charge(n.saturating_mul(8), field)?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| {
        let msg = e.to_string();
        if (bytes.len() as u64) < n + 8
            || msg.contains("incomplete")
            || msg.to_lowercase().contains("buffer")
        {
            ctx.truncated(field, format!("{msg} (file is {} bytes)", bytes.len()))
        } else {
            ctx.invalid(field, msg)
        }
    })?;
    let (_, meta) =
        SafeTensors::read_metadata(bytes).map_err(|e| ctx.invalid(field, e.to_string()))?;
    let kohya_meta = meta
        .metadata()
        .as_ref()
        .is_some_and(|m| m.keys().any(|k| k.starts_with("ss_")));
    Ok((st, kohya_meta))
}

pub(crate) fn read(ctx: &Ctx, bytes: &[u8]) -> Result<EmbeddingFile, EmbeddingError> {
    let field = "safetensors header";
    let (st, kohya_meta) = parse_header(ctx, bytes)?;
    let mut names: Vec<&str> = st.names();
    names.sort_unstable();
    if names.len() > MAX_TENSORS {
        return Err(ctx.invalid(
            field,
            format!("{} tensors; an embedding has one or two", names.len()),
        ));
    }
    let get = |k: &str| st.tensor(k).map_err(|e| ctx.invalid(k, e.to_string()));
    let mut emb = EmbeddingFile {
        name: None,
        step: None,
        sd_checkpoint: None,
        sd_checkpoint_name: None,
        parts: Vec::new(),
        source_format: Format::A1111Safetensors,
    };
    let has = |k: &str| names.contains(&k);
    // OneTrainer may add `<key>_out` output-embedding tensors; they are not
    // input vectors and are ignored.
    let terms: Vec<&str> = names
        .iter()
        .copied()
        .filter(|k| !k.ends_with("_out"))
        .collect();
    if has("clip_l") && has("clip_g") {
        emb.source_format = Format::SdxlSafetensors;
        emb.parts
            .push(part(ctx, "clip_l", Encoder::ClipL, &get("clip_l")?)?);
        emb.parts
            .push(part(ctx, "clip_g", Encoder::ClipG, &get("clip_g")?)?);
        if terms.len() > 2 {
            return Err(EmbeddingError::MultipleTerms {
                file: ctx.file.clone(),
                field: "tensors".to_string(),
                terms: terms.iter().map(|s| s.to_string()).collect(),
            });
        }
        return Ok(emb);
    }
    match terms.as_slice() {
        [] => Err(EmbeddingError::Empty {
            file: ctx.file.clone(),
            field: "tensors".to_string(),
        }),
        ["emb_params"] => {
            emb.source_format = if kohya_meta {
                Format::KohyaSafetensors
            } else {
                Format::A1111Safetensors
            };
            emb.parts.push(part(
                ctx,
                "emb_params",
                Encoder::Single,
                &get("emb_params")?,
            )?);
            Ok(emb)
        }
        ["emp_params"] => {
            emb.source_format = Format::OneTrainer;
            emb.parts.push(part(
                ctx,
                "emp_params",
                Encoder::Single,
                &get("emp_params")?,
            )?);
            Ok(emb)
        }
        [token] => {
            emb.source_format = Format::DiffusersSafetensors;
            emb.parts.push(part(
                ctx,
                &format!("'{token}'"),
                Encoder::Single,
                &get(token)?,
            )?);
            emb.name = Some(token.to_string());
            Ok(emb)
        }
        many => Err(EmbeddingError::MultipleTerms {
            file: ctx.file.clone(),
            field: "tensors".to_string(),
            terms: many.iter().map(|s| format!("'{s}'")).collect(),
        }),
    }
}

pub(crate) fn write(
    file: &str,
    entries: &[(&str, &EmbeddingPart)],
    precision: Precision,
    metadata: Option<&[(&str, &str)]>,
) -> Result<Vec<u8>, EmbeddingError> {
    let dtype = match precision {
        Precision::F32 => Dtype::F32,
        Precision::F16 => Dtype::F16,
    };
    let mut owned = Vec::new();
    for (k, p) in entries {
        owned.push((
            k.to_string(),
            encode_part(file, k, p, precision)?,
            vec![p.vectors, p.dim],
        ));
    }
    let mut views = Vec::new();
    for (k, data, shape) in &owned {
        let v =
            TensorView::new(dtype, shape.clone(), data).map_err(|e| EmbeddingError::Invalid {
                file: file.to_string(),
                field: k.clone(),
                reason: e.to_string(),
            })?;
        views.push((k.clone(), v));
    }
    let meta: Option<HashMap<String, String>> = metadata.map(|m| {
        m.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    });
    safetensors::serialize(views, meta).map_err(|e| EmbeddingError::Invalid {
        file: file.to_string(),
        field: "safetensors".to_string(),
        reason: e.to_string(),
    })
}
