//! Flash attention for f32 on the CPU: no `[T, T]` matrix, only cache-sized tiles of it.
//!
//! The forward pass runs one task per (batch, head, block of query rows): the scores of
//! the rows against a tile of keys are formed by one `gemm` call, turned into
//! probabilities with an online softmax (running max and sum per row; the accumulated
//! output is rescaled when the max grows), and multiplied into the output accumulator by
//! a second call. The rows' log-sum-exp is saved for the backward pass.
//!
//! The backward pass follows FlashAttention-2: `D_i = rowsum(dO_i * O_i)`, and per tile
//! `P = exp(S - lse)`, `dV += P^T dO`, `dP = dO V^T`, `dS = P * (dP - D)`,
//! `dQ += dS K scale`, `dK += dS^T Q scale`. A task owns (batch, head, range of key
//! tiles), so dK and dV are written by one task each; dQ sums over key tiles and is
//! written directly when a head is one task (the usual case: batch * heads >= threads),
//! else into per-task partial sums added at the end. Measured on 2 threads at 512 px:
//! one task per head makes a UNet step's attention backward 6.6-6.9 s against 8.3-9.1 s
//! with one task per key tile and partial dQ sums (same run, loaded machine).
//!
//! The inputs are read in place through their strides (the heads of a `[B, T, H*dh]`
//! view are column ranges), and the outputs are written in the merged layout, so no head
//! split or merge copies exist. The tile products run on the `gemm` crate (candle's own
//! CPU matmul, with its AVX-512 kernels: the `x86-v4` feature in Cargo.toml); the
//! elementwise passes (exp, max, sums) are plain loops compiled for AVX-512 or AVX2 when
//! the CPU has them, chosen at run time (`simd::multiversion`).

use candle_core::{CpuStorage, Layout, Storage, Tensor};
use rayon::prelude::*;

use super::super::simd::{exp, multiversion};
use super::AttentionMask;

/// Query rows per forward task. gemm packs the key (and value) tile again in every call,
/// so more rows per call spread that copy over more products: at SD 1.5's 64x64 level
/// (4096 tokens, 8 heads of 40) a step's self-attention forward took 145-151 ms per call
/// with 64 rows, 114-120 with 256 and 111 with 512 (`attention_step_timing`, 2-core
/// Xeon, same hour); 512 rows was slower at 256 tokens. Small levels (64 tokens x 8
/// heads) still give a task per head.
const FWD_ROWS: usize = 256;
/// Keys per forward tile: a 256 x 512 score tile is 512 KiB, which stays in L2 (2 MiB
/// per core on the development machine) with the key and value tiles.
const FWD_KEYS: usize = 512;
/// Query rows and keys per backward tile: the scores, probabilities and their gradient
/// (three 256 x 256 tiles, 768 KiB) plus the dK and dV accumulators of the key tile stay
/// in L2. Against 64 x 128 tiles, a 512 px step's attention backward (the harness's sum)
/// went from 1691-1762 to 1393-1436 ms; 256 x 512 and 128 x 512 were slower again.
const BWD_ROWS: usize = 256;
const BWD_KEYS: usize = 256;

/// A `[B, T, C]` f32 tensor on the CPU read in place: its storage, the offset of its
/// first value and its batch and row strides (the last dimension is contiguous).
struct Strided<'a> {
    data: &'a [f32],
    start: usize,
    batch_stride: usize,
    row_stride: usize,
}

impl Strided<'_> {
    /// Pointer to row `t` of batch `b`, column `col`.
    fn at(&self, b: usize, t: usize, col: usize) -> *const f32 {
        let i = self.start + b * self.batch_stride + t * self.row_stride + col;
        // In bounds: `strided` checked that the last row of the last batch fits.
        self.data[i..].as_ptr()
    }
}

/// The storage slice of an f32 CPU tensor.
fn f32_data<'a>(storage: &'a Storage, what: &str) -> candle_core::Result<&'a [f32]> {
    match storage {
        Storage::Cpu(CpuStorage::F32(v)) => Ok(v),
        _ => candle_core::bail!("attention: {what} is not f32 on the cpu"),
    }
}

/// Checks that the `[B, T, C]` layout reads inside `data` with a contiguous last
/// dimension.
fn strided<'a>(data: &'a [f32], layout: &Layout, what: &str) -> candle_core::Result<Strided<'a>> {
    let dims = layout.dims();
    let stride = layout.stride();
    if dims.len() != 3 || (stride[2] != 1 && dims[2] > 1) {
        candle_core::bail!("attention: {what} is not [B, T, C] with contiguous rows");
    }
    if dims.contains(&0) {
        candle_core::bail!("attention: {what} is empty");
    }
    let last =
        layout.start_offset() + (dims[0] - 1) * stride[0] + (dims[1] - 1) * stride[1] + dims[2];
    if last > data.len() {
        candle_core::bail!("attention: {what} layout reads outside its storage");
    }
    Ok(Strided {
        data,
        start: layout.start_offset(),
        batch_stride: stride[0],
        row_stride: stride[1],
    })
}

/// A tensor whose last dimension is contiguous (views of fused projections are), else a
/// contiguous copy.
fn rows_contiguous(t: &Tensor) -> candle_core::Result<Tensor> {
    if t.stride()[2] == 1 || t.dim(2)? == 1 {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// A raw pointer shared by tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: every task writes its own disjoint part of the buffer (see each use), and the
// buffer outlives the parallel loop.
unsafe impl Send for SharedMut {}
// SAFETY: as above.
unsafe impl Sync for SharedMut {}

/// A read-only matrix operand: element `(r, c)` is at `ptr + r * rs + c * cs`.
#[derive(Clone, Copy)]
struct Mat {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

impl Mat {
    fn rows(ptr: *const f32, row_stride: usize) -> Self {
        Mat {
            ptr,
            rs: row_stride as isize,
            cs: 1,
        }
    }

    /// The transpose of the row-major matrix at `ptr` with `row_stride`.
    fn rows_t(ptr: *const f32, row_stride: usize) -> Self {
        Mat {
            ptr,
            rs: 1,
            cs: row_stride as isize,
        }
    }
}

/// `dst[m, n] (+)= beta * lhs[m, k] rhs[k, n]` on one thread; `dst` is row-major with
/// `dst_rs` between rows; `accumulate` adds to it instead of overwriting.
///
/// # Safety
/// Every operand must be valid for its extent, and `dst` must not overlap the others.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    beta: f32,
) {
    // SAFETY: the caller guarantees the extents; gemm reads lhs and rhs and writes dst.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs.ptr,
            lhs.cs,
            lhs.rs,
            rhs.ptr,
            rhs.cs,
            rhs.rs,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Lanes of the partial sums and maxima: a multiple of every vector width, so that the
/// reductions vectorise (a float sum in order would not).
const LANES: usize = 16;

#[inline(always)]
fn row_max_body(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    acc.iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// `x = exp(x - shift)` in place; returns the sum of the new values.
#[inline(always)]
fn exp_shift_sum_body(x: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
            *v = exp(*v - shift);
            *a += *v;
        }
    }
    let mut sum = 0.0;
    for v in chunks.into_remainder() {
        *v = exp(*v - shift);
        sum += *v;
    }
    acc.iter().sum::<f32>() + sum
}

/// `x = exp(x - shift)` in place.
#[inline(always)]
fn exp_shift_body(x: &mut [f32], shift: f32) {
    for v in x.iter_mut() {
        *v = exp(*v - shift);
    }
}

/// `dp = scale * p * (dp - d)`: the score gradient, scaled for dQ and dK.
#[inline(always)]
fn score_grad_body(dp: &mut [f32], p: &[f32], d: f32, scale: f32) {
    for (g, &p) in dp.iter_mut().zip(p) {
        *g = scale * p * (*g - d);
    }
}

/// `sum(a * b)`.
#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let rest: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((a, &x), &y) in acc.iter_mut().zip(x).zip(y) {
            *a += x * y;
        }
    }
    acc.iter().sum::<f32>() + rest
}

multiversion! {
    fn row_max(x: &[f32]) -> f32 = row_max_body;
}
multiversion! {
    fn exp_shift_sum(x: &mut [f32], shift: f32) -> f32 = exp_shift_sum_body;
}
multiversion! {
    fn exp_shift(x: &mut [f32], shift: f32) = exp_shift_body;
}
multiversion! {
    fn score_grad(dp: &mut [f32], p: &[f32], d: f32, scale: f32) = score_grad_body;
}
multiversion! {
    fn dot(a: &[f32], b: &[f32]) -> f32 = dot_body;
}

/// The keys query row `i` sees: all, or `0..=i` under the causal mask.
fn visible_keys(i: usize, keys: usize, mask: AttentionMask) -> usize {
    match mask {
        AttentionMask::None => keys,
        AttentionMask::Causal => (i + 1).min(keys),
    }
}

/// Sets the scores of the keys row `i0 + r` does not see to `-inf`, for a tile of
/// `rows x cols` scores of keys `j0 ..`.
fn mask_tile(s: &mut [f32], cols: usize, i0: usize, j0: usize, mask: AttentionMask) {
    if mask == AttentionMask::Causal {
        for (r, row) in s.chunks_exact_mut(cols).enumerate() {
            let seen = (i0 + r + 1).saturating_sub(j0).min(cols);
            row[seen..].fill(f32::NEG_INFINITY);
        }
    }
}

/// The shapes of one call: queries, keys, heads, head width, channels.
#[derive(Clone, Copy)]
struct Dims {
    n: usize,
    m: usize,
    h: usize,
    dh: usize,
    c: usize,
}

pub(super) fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    mask: AttentionMask,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (b, n, c) = q.dims3()?;
    let m = k.dim(1)?;
    let dims = Dims {
        n,
        m,
        h: heads,
        dh: c / heads,
        c,
    };
    let (q, k, v) = (
        rows_contiguous(q)?,
        rows_contiguous(k)?,
        rows_contiguous(v)?,
    );
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let qv = strided(f32_data(&qs, "q")?, ql, "q")?;
    let kv = strided(f32_data(&ks, "k")?, kl, "k")?;
    let vv = strided(f32_data(&vs, "v")?, vl, "v")?;
    let mut out = vec![0f32; b * n * c];
    let mut lse = vec![0f32; b * heads * n];
    let (out_ptr, lse_ptr) = (SharedMut(out.as_mut_ptr()), SharedMut(lse.as_mut_ptr()));
    let blocks = n.div_ceil(FWD_ROWS);
    (0..b * heads * blocks).into_par_iter().for_each(|task| {
        let (bh, blk) = (task / blocks, task % blocks);
        let i0 = blk * FWD_ROWS;
        let rows = FWD_ROWS.min(n - i0);
        // SAFETY: the task writes rows i0 .. i0 + rows of head bh % heads of batch
        // bh / heads: its own columns of its own rows in `out`, its own span of `lse`.
        unsafe {
            forward_block(
                &qv,
                &kv,
                &vv,
                dims,
                (bh / heads, bh % heads, i0, rows),
                scale as f32,
                mask,
                out_ptr,
                lse_ptr,
            )
        }
    });
    drop((qs, ks, vs));
    let out = Tensor::from_vec(out, (b, n, c), q.device())?;
    let lse = Tensor::from_vec(lse, (b, heads, n), q.device())?;
    Ok((out, lse))
}

/// The output rows and log-sum-exp of one block of query rows of one head.
///
/// # Safety
/// `out` holds `[B, N, C]` and `lse` `[B, H, N]` values; no other task writes this block's
/// part of them.
#[allow(clippy::too_many_arguments)]
unsafe fn forward_block(
    q: &Strided,
    k: &Strided,
    v: &Strided,
    d: Dims,
    (b, h, i0, rows): (usize, usize, usize, usize),
    scale: f32,
    mask: AttentionMask,
    out: SharedMut,
    lse: SharedMut,
) {
    let dh = d.dh;
    let col = h * dh;
    let keys = visible_keys(i0 + rows - 1, d.m, mask);
    let tile = FWD_KEYS.min(keys);
    let mut s = vec![0f32; rows * tile];
    let mut acc = vec![0f32; rows * dh];
    let mut max = vec![f32::NEG_INFINITY; rows];
    let mut sum = vec![0f32; rows];
    for j0 in (0..keys).step_by(tile) {
        let cols = tile.min(keys - j0);
        let s = &mut s[..rows * cols];
        // SAFETY: q rows i0 .. i0 + rows and k rows j0 .. j0 + cols of this head exist
        // (checked by `strided`), and s holds rows x cols values.
        unsafe {
            matmul(
                rows,
                cols,
                dh,
                s.as_mut_ptr(),
                cols,
                false,
                Mat::rows(q.at(b, i0, col), q.row_stride),
                Mat::rows_t(k.at(b, j0, col), k.row_stride),
                scale,
            )
        };
        mask_tile(s, cols, i0, j0, mask);
        for (r, row) in s.chunks_exact_mut(cols).enumerate() {
            let new_max = row_max(row).max(max[r]);
            if new_max == f32::NEG_INFINITY {
                // Every key so far is masked for this row (never the first tile's key 0).
                row.fill(0.0);
                continue;
            }
            let correction = exp(max[r] - new_max);
            sum[r] = sum[r] * correction + exp_shift_sum(row, new_max);
            if correction != 1.0 {
                acc[r * dh..(r + 1) * dh]
                    .iter_mut()
                    .for_each(|a| *a *= correction);
            }
            max[r] = new_max;
        }
        // SAFETY: s holds rows x cols probabilities, v rows j0 .. j0 + cols exist, acc
        // holds rows x dh values.
        unsafe {
            matmul(
                rows,
                dh,
                cols,
                acc.as_mut_ptr(),
                dh,
                true,
                Mat::rows(s.as_ptr(), cols),
                Mat::rows(v.at(b, j0, col), v.row_stride),
                1.0,
            )
        };
    }
    for r in 0..rows {
        let i = i0 + r;
        let inv = 1.0 / sum[r];
        // SAFETY: row i of batch b, columns col .. col + dh, is this task's (caller).
        let dst =
            unsafe { std::slice::from_raw_parts_mut(out.0.add((b * d.n + i) * d.c + col), dh) };
        for (o, &a) in dst.iter_mut().zip(&acc[r * dh..(r + 1) * dh]) {
            *o = a * inv;
        }
        // SAFETY: as above, for the row's log-sum-exp.
        unsafe { *lse.0.add((b * d.h + h) * d.n + i) = max[r] + sum[r].ln() };
    }
}

#[allow(clippy::too_many_arguments, clippy::type_complexity)]
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
    let (b, n, c) = q.dims3()?;
    let m = k.dim(1)?;
    let d = Dims {
        n,
        m,
        h: heads,
        dh: c / heads,
        c,
    };
    let (q, k, v, o, g) = (
        rows_contiguous(q)?,
        rows_contiguous(k)?,
        rows_contiguous(v)?,
        rows_contiguous(o)?,
        rows_contiguous(g)?,
    );
    let lse = lse.contiguous()?;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (os, ol) = o.storage_and_layout();
    let (gs, gl) = g.storage_and_layout();
    let (ls, ll) = lse.storage_and_layout();
    let ins = Inputs {
        q: strided(f32_data(&qs, "q")?, ql, "q")?,
        k: strided(f32_data(&ks, "k")?, kl, "k")?,
        v: strided(f32_data(&vs, "v")?, vl, "v")?,
        o: strided(f32_data(&os, "o")?, ol, "o")?,
        g: strided(f32_data(&gs, "g")?, gl, "g")?,
        lse: f32_data(&ls, "lse")?
            .get(ll.start_offset()..ll.start_offset() + b * heads * n)
            .ok_or_else(|| candle_core::Error::Msg("attention: lse storage too short".into()))?,
    };
    // Key tiles per task: a head per task when there are enough heads to keep every
    // thread busy, else the heads' key tiles split into chunks with partial dQ sums.
    let tiles = m.div_ceil(BWD_KEYS);
    let threads = rayon::current_num_threads();
    let chunks = (2 * threads).div_ceil(b * heads).clamp(1, tiles);
    let per_chunk = tiles.div_ceil(chunks);
    let chunks = tiles.div_ceil(per_chunk);
    let mut dq = vec![0f32; if need[0] { b * n * c } else { 0 }];
    let mut dk = vec![0f32; if need[1] { b * m * c } else { 0 }];
    let mut dv = vec![0f32; if need[2] { b * m * c } else { 0 }];
    // Partial dQ per (batch, head, chunk) when a head's key tiles are split, each
    // `[N, dh]`; else dQ is written in place.
    let partial = need[0] && chunks > 1;
    let mut dq_parts = vec![
        0f32;
        if partial {
            b * heads * chunks * n * d.dh
        } else {
            0
        }
    ];
    let outs = Outputs {
        dq: SharedMut(dq.as_mut_ptr()),
        dk: SharedMut(dk.as_mut_ptr()),
        dv: SharedMut(dv.as_mut_ptr()),
        dq_parts: SharedMut(dq_parts.as_mut_ptr()),
    };
    (0..b * heads * chunks).into_par_iter().for_each(|task| {
        let (bh, chunk) = (task / chunks, task % chunks);
        let t0 = chunk * per_chunk;
        let t1 = (t0 + per_chunk).min(tiles);
        // SAFETY: the task writes the dK and dV rows of its key tiles t0 .. t1 of head
        // bh, and either its own partial dQ or (one chunk per head) dQ's columns of the
        // head: no other task writes them.
        unsafe {
            backward_head(
                &ins,
                d,
                (bh / heads, bh % heads),
                (t0 * BWD_KEYS, (t1 * BWD_KEYS).min(m)),
                scale as f32,
                mask,
                need,
                &outs,
                partial.then(|| task * n * d.dh),
            )
        }
    });
    drop((qs, ks, vs, os, gs, ls));
    if partial {
        let dh = d.dh;
        dq.par_chunks_mut(n * c).enumerate().for_each(|(bi, dq)| {
            for h in 0..heads {
                for ch in 0..chunks {
                    let base = ((bi * heads + h) * chunks + ch) * n * dh;
                    let part = &dq_parts[base..base + n * dh];
                    for (row, p) in dq.chunks_exact_mut(c).zip(part.chunks_exact(dh)) {
                        for (x, &y) in row[h * dh..(h + 1) * dh].iter_mut().zip(p) {
                            *x += y;
                        }
                    }
                }
            }
        });
    }
    let dev = q.device();
    let make = |want: bool, data: Vec<f32>, t: usize| {
        want.then(|| Tensor::from_vec(data, (b, t, c), dev))
            .transpose()
    };
    Ok((
        make(need[0], dq, n)?,
        make(need[1], dk, m)?,
        make(need[2], dv, m)?,
    ))
}

/// The backward pass's inputs, read in place.
struct Inputs<'a> {
    q: Strided<'a>,
    k: Strided<'a>,
    v: Strided<'a>,
    o: Strided<'a>,
    g: Strided<'a>,
    /// `[B, H, N]`, contiguous.
    lse: &'a [f32],
}

/// The gradient buffers: dq `[B, N, C]`, dk and dv `[B, M, C]` (empty when not wanted),
/// and the partial dQ sums `[B, H, chunks, N, dh]` (empty unless a head is split).
struct Outputs {
    dq: SharedMut,
    dk: SharedMut,
    dv: SharedMut,
    dq_parts: SharedMut,
}

/// The gradients of head `h` of batch `b` from keys `j_begin .. j_end` (whole tiles).
///
/// # Safety
/// The buffers of `out` have their documented sizes for `need`; no other task writes the
/// dK and dV rows of these keys, nor this head's dQ columns (`dq_part: None`) or the
/// partial dQ at offset `dq_part`.
#[allow(clippy::too_many_arguments)]
unsafe fn backward_head(
    x: &Inputs,
    d: Dims,
    (b, h): (usize, usize),
    (j_begin, j_end): (usize, usize),
    scale: f32,
    mask: AttentionMask,
    need: [bool; 3],
    out: &Outputs,
    dq_part: Option<usize>,
) {
    let (n, dh, c) = (d.n, d.dh, d.c);
    let col = h * dh;
    let lse = &x.lse[(b * d.h + h) * n..(b * d.h + h + 1) * n];
    // D_i = dO_i . O_i: with lse, what dS needs of the whole row.
    let dots: Vec<f32> = if need[0] || need[1] {
        (0..n)
            .map(|i| {
                // SAFETY: row i of g and o, columns col .. col + dh, exist (`strided`).
                let (gi, oi) = unsafe {
                    (
                        std::slice::from_raw_parts(x.g.at(b, i, col), dh),
                        std::slice::from_raw_parts(x.o.at(b, i, col), dh),
                    )
                };
                dot(gi, oi)
            })
            .collect()
    } else {
        Vec::new()
    };
    // The partial buffer holds this task's [N, dh] at the offset, dQ (when wanted)
    // [B, N, C] with this head's columns from `col`.
    let (dq, dq_rs) = match dq_part {
        Some(offset) => (out.dq_parts.0.wrapping_add(offset), dh),
        None => (out.dq.0.wrapping_add(b * n * c + col), c),
    };
    let mut p = vec![0f32; BWD_ROWS * BWD_KEYS];
    let mut ds = vec![0f32; BWD_ROWS * BWD_KEYS];
    for j0 in (j_begin..j_end).step_by(BWD_KEYS) {
        let cols = BWD_KEYS.min(j_end - j0);
        // dK and dV hold [B, M, C] when wanted; these rows of this head are this task's.
        let (dk, dv) = (
            out.dk.0.wrapping_add((b * d.m + j0) * c + col),
            out.dv.0.wrapping_add((b * d.m + j0) * c + col),
        );
        // Under the causal mask, queries before j0 see none of these keys.
        let i_begin = match mask {
            AttentionMask::None => 0,
            AttentionMask::Causal => (j0 / BWD_ROWS) * BWD_ROWS,
        };
        for i0 in (i_begin..n).step_by(BWD_ROWS) {
            let rows = BWD_ROWS.min(n - i0);
            let p = &mut p[..rows * cols];
            let ds = &mut ds[..rows * cols];
            let (qi, gi, kj, vj) = (
                Mat::rows(x.q.at(b, i0, col), x.q.row_stride),
                Mat::rows(x.g.at(b, i0, col), x.g.row_stride),
                x.k.at(b, j0, col),
                x.v.at(b, j0, col),
            );
            // SAFETY: (this product and those below) the q, g rows i0 .. i0 + rows and k, v rows
            // j0 .. j0 + cols of this head exist (`strided`); p and ds hold rows x cols
            // values; dq, dk and dv are this task's (caller).
            unsafe {
                matmul(
                    rows,
                    cols,
                    dh,
                    p.as_mut_ptr(),
                    cols,
                    false,
                    qi,
                    Mat::rows_t(kj, x.k.row_stride),
                    scale,
                )
            };
            mask_tile(p, cols, i0, j0, mask);
            for (r, row) in p.chunks_exact_mut(cols).enumerate() {
                exp_shift(row, lse[i0 + r]);
            }
            if need[2] {
                // SAFETY: see above.
                unsafe {
                    matmul(
                        cols,
                        dh,
                        rows,
                        dv,
                        c,
                        true,
                        Mat::rows_t(p.as_ptr(), cols),
                        gi,
                        1.0,
                    )
                };
            }
            if !(need[0] || need[1]) {
                continue;
            }
            // SAFETY: see above.
            unsafe {
                matmul(
                    rows,
                    cols,
                    dh,
                    ds.as_mut_ptr(),
                    cols,
                    false,
                    gi,
                    Mat::rows_t(vj, x.v.row_stride),
                    1.0,
                )
            };
            for (r, (g, p)) in ds
                .chunks_exact_mut(cols)
                .zip(p.chunks_exact(cols))
                .enumerate()
            {
                score_grad(g, p, dots[i0 + r], scale);
            }
            if need[0] {
                // SAFETY: see above; rows i0 .. i0 + rows of this head's dQ.
                unsafe {
                    matmul(
                        rows,
                        dh,
                        cols,
                        dq.wrapping_add(i0 * dq_rs),
                        dq_rs,
                        true,
                        Mat::rows(ds.as_ptr(), cols),
                        Mat::rows(kj, x.k.row_stride),
                        1.0,
                    )
                };
            }
            if need[1] {
                // SAFETY: see above.
                unsafe {
                    matmul(
                        cols,
                        dh,
                        rows,
                        dk,
                        c,
                        true,
                        Mat::rows_t(ds.as_ptr(), cols),
                        qi,
                        1.0,
                    )
                };
            }
        }
    }
}
