//! Small f32 CPU helpers shared by the layers' fused CPU kernels.

use candle_core::{CpuStorage, DType, Storage, Tensor};

pub(super) fn is_cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// Runs `f` on the contiguous f32 values of `t` (CPU), without copying them.
pub(super) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => {
            let start = layout.start_offset();
            let values = v
                .get(start..start + t.elem_count())
                .ok_or_else(|| candle_core::Error::Msg("tensor storage too short".into()))?;
            Ok(f(values))
        }
        _ => candle_core::bail!("expected f32 cpu storage"),
    }
}

/// [`with_f32`] on a tensor that may be absent (`f(None)` then).
pub(super) fn with_optional_f32<R>(
    t: Option<&Tensor>,
    f: impl FnOnce(Option<&[f32]>) -> R,
) -> candle_core::Result<R> {
    match t {
        Some(t) => with_f32(t, |v| f(Some(v))),
        None => Ok(f(None)),
    }
}

/// Values per parallel task of the elementwise passes.
const CHUNK: usize = 1 << 14;

/// An elementwise pass over an f32 CPU tensor, in parallel, one pass: `f(out, a)` on
/// matching chunks of the output and of `a`'s values.
pub(super) fn map_cpu(
    a: &Tensor,
    f: impl Fn(&mut [f32], &[f32]) + Sync,
) -> candle_core::Result<Tensor> {
    use rayon::prelude::*;
    let out = with_f32(a, |av| {
        let mut out = vec![0f32; av.len()];
        out.par_chunks_mut(CHUNK)
            .zip(av.par_chunks(CHUNK))
            .for_each(|(o, x)| f(o, x));
        out
    })?;
    Tensor::from_vec(out, a.dims(), a.device())
}

/// An elementwise pass over two same-shaped f32 CPU tensors, in parallel, one pass:
/// `f(out, a, b)` on matching chunks.
pub(super) fn zip_cpu(
    a: &Tensor,
    b: &Tensor,
    f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync,
) -> candle_core::Result<Tensor> {
    use rayon::prelude::*;
    if a.dims() != b.dims() {
        candle_core::bail!("shape mismatch {:?} vs {:?}", a.dims(), b.dims());
    }
    let out = with_f32(a, |av| {
        with_f32(b, |bv| {
            let mut out = vec![0f32; av.len()];
            out.par_chunks_mut(CHUNK)
                .zip(av.par_chunks(CHUNK).zip(bv.par_chunks(CHUNK)))
                .for_each(|(o, (x, y))| f(o, x, y));
            out
        })
    })??;
    Tensor::from_vec(out, a.dims(), a.device())
}
