//! Vectors as files store them: element types, little-endian decoding and
//! encoding, and tensor shapes to `[vectors, width]` parts.

use super::{check_part, Ctx, EmbeddingError, EmbeddingPart, Encoder, Precision};

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
