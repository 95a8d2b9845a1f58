//! The off-graph attention on any device and dtype, written with candle tensor ops: the
//! heads are split with copies and the scores are formed in blocks of rows, so no
//! `[T, T]` matrix of a long sequence exists at once. The softmax and the log-sum-exp
//! are computed in f32 (f64 for f64 inputs), so f16/bf16 lose nothing there and f64 is
//! exact enough for the gradient checks.

use candle_core::{DType, Tensor, D};

use super::{attention_block, AttentionMask};

/// The dtype the softmax runs in: f64 for f64 inputs, f32 otherwise.
fn softmax_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `[B, T, H*dh]` (any strides) to `[B*H, T, dh]` contiguous.
fn split_heads(x: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    x.reshape((b, t, heads, c / heads))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b * heads, t, c / heads))
}

/// `[B*H, T, dh]` to `[B, T, H*dh]` contiguous.
fn merge_heads(x: &Tensor, batch: usize, heads: usize) -> candle_core::Result<Tensor> {
    let (_, t, dh) = x.dims3()?;
    x.reshape((batch, heads, t, dh))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((batch, t, heads * dh))
}

/// Rows of a `[slices, rows, keys]` score block per block, whole slices while they fit.
fn row_blocks(slices: usize, rows: usize, keys: usize, block: usize) -> usize {
    if slices * rows * keys <= block {
        rows.max(1)
    } else {
        (block / (slices * keys).max(1)).clamp(16, rows.max(1))
    }
}

/// The scaled scores of query rows `r .. r + n` against all keys, in the softmax dtype,
/// with the causal mask applied (key `j` is hidden from query `i` when `j > i`).
fn scores(
    q: &Tensor,
    k_t: &Tensor,
    r: usize,
    n: usize,
    scale: f64,
    mask: AttentionMask,
) -> candle_core::Result<Tensor> {
    let s = (q.narrow(1, r, n)? * scale)?
        .matmul(k_t)?
        .to_dtype(softmax_dtype(q.dtype()))?;
    match mask {
        AttentionMask::None => Ok(s),
        AttentionMask::Causal => {
            let dev = s.device();
            let m = s.dim(2)?;
            let rows = Tensor::arange(r as u32, (r + n) as u32, dev)?.reshape((n, 1))?;
            let cols = Tensor::arange(0u32, m as u32, dev)?.reshape((1, m))?;
            let hidden = cols.broadcast_gt(&rows)?.broadcast_as(s.shape())?;
            let neg = Tensor::new(f64::NEG_INFINITY, dev)?
                .to_dtype(s.dtype())?
                .broadcast_as(s.shape())?;
            hidden.where_cond(&neg, &s)
        }
    }
}

pub(super) fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    mask: AttentionMask,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (b, n, _) = q.dims3()?;
    let m = k.dim(1)?;
    let dtype = q.dtype();
    let (q, k_t, v) = (
        split_heads(q, heads)?,
        split_heads(k, heads)?.transpose(1, 2)?.contiguous()?,
        split_heads(v, heads)?,
    );
    let rows = row_blocks(b * heads, n, m, attention_block(q.device()));
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for r in (0..n).step_by(rows) {
        let len = rows.min(n - r);
        let s = scores(&q, &k_t, r, len, scale, mask)?;
        let max = s.max_keepdim(D::Minus1)?;
        let sum = s.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?;
        let lse = (max + sum.log()?)?;
        let p = s.broadcast_sub(&lse)?.exp()?.to_dtype(dtype)?;
        outs.push(p.matmul(&v)?);
        lses.push(lse.squeeze(D::Minus1)?);
    }
    let o = Tensor::cat(&outs, 1)?;
    let lse = Tensor::cat(&lses, 1)?;
    let lse = if dtype == DType::F64 {
        lse
    } else {
        lse.to_dtype(DType::F32)?
    };
    Ok((merge_heads(&o, b, heads)?, lse.reshape((b, heads, n))?))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    g: &Tensor,
    heads: usize,
    scale: f64,
    mask: AttentionMask,
    need: [bool; 3],
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (b, n, _) = q.dims3()?;
    let m = k.dim(1)?;
    let dtype = q.dtype();
    let acc = softmax_dtype(dtype);
    let (q, k, v, o, g) = (
        split_heads(q, heads)?,
        split_heads(k, heads)?,
        split_heads(v, heads)?,
        split_heads(o, heads)?,
        split_heads(g, heads)?,
    );
    let k_t = k.t()?.contiguous()?;
    let v_t = v.t()?.contiguous()?;
    let lse = lse.to_dtype(acc)?.reshape((b * heads, n, 1))?;
    // sum_j dP_ij P_ij equals dO_i . O_i: a [T, d] product instead of a pass over [T, T].
    let dot = (g.to_dtype(acc)? * o.to_dtype(acc)?)?.sum_keepdim(D::Minus1)?;
    let rows = row_blocks(b * heads, n, m, attention_block(q.device()));
    let (mut dqs, mut dk, mut dv): (Vec<Tensor>, Option<Tensor>, Option<Tensor>) =
        (Vec::new(), None, None);
    let add = |sum: Option<Tensor>, x: Tensor| -> candle_core::Result<Option<Tensor>> {
        Ok(Some(match sum {
            Some(s) => (s + x)?,
            None => x,
        }))
    };
    for r in (0..n).step_by(rows) {
        let len = rows.min(n - r);
        let s = scores(&q, &k_t, r, len, scale, mask)?;
        let p = s.broadcast_sub(&lse.narrow(1, r, len)?)?.exp()?;
        let gc = g.narrow(1, r, len)?;
        if need[2] {
            dv = add(dv, p.to_dtype(dtype)?.t()?.matmul(&gc)?)?;
        }
        if need[0] || need[1] {
            let dp = gc.matmul(&v_t)?.to_dtype(acc)?;
            let ds = (p * dp.broadcast_sub(&dot.narrow(1, r, len)?)?)?.to_dtype(dtype)?;
            if need[0] {
                dqs.push((ds.matmul(&k)? * scale)?);
            }
            if need[1] {
                dk = add(dk, (ds.t()?.matmul(&q.narrow(1, r, len)?)? * scale)?)?;
            }
        }
    }
    let dq = if need[0] {
        Some(merge_heads(&Tensor::cat(&dqs, 1)?, b, heads)?)
    } else {
        None
    };
    let dk = dk.map(|t| merge_heads(&t, b, heads)).transpose()?;
    let dv = dv.map(|t| merge_heads(&t, b, heads)).transpose()?;
    Ok((dq, dk, dv))
}
