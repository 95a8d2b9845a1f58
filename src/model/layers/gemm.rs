//! Matrix products of the layers: on f32 CPU tensors, gemm writes straight into a fresh
//! output, with the bias (and a residual) filled in first.
//!
//! candle's CPU matmul zero-fills its output (`vec![0; n]`: a memset, plus the page faults
//! of a fresh block) before gemm overwrites it, and a bias or a residual is then one more
//! full pass into one more new tensor. Here the output is either left uninitialised for
//! gemm to write (no bias) or filled once with `residual + bias` for gemm to add the
//! product to. Operands are read through their strides, so a transposed view (a weight's
//! `W^T`, an image read as tokens) is never copied. Other devices and dtypes (f64 for the
//! gradient checks, f16, CUDA) go through candle's own ops, as before.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use rayon::prelude::*;

use super::skinny;

/// A bias added to a product's output.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Bias<'a> {
    None,
    /// One value per output column, `[n]`: a linear layer's on tokens.
    Cols(&'a Tensor),
    /// One value per output row, `[m]`: a 1x1 convolution's on a channels-first image.
    Rows(&'a Tensor),
}

/// `a b + bias + residual`: `a` is `[m, k]` or `[B, m, k]`, `b` is `[k, n]` or `[B, k, n]`
/// (a matrix is shared by every batch), at any strides; the result is a contiguous
/// `[m, n]` or `[B, m, n]`. `residual`, when given, has the result's shape.
pub(crate) fn matmul(
    a: &Tensor,
    b: &Tensor,
    bias: Bias,
    residual: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    if is_cpu_f32(&[a, b]) {
        return cpu_product(&[(a, b)], bias, residual);
    }
    let y = a.broadcast_matmul(b)?;
    let y = match bias {
        Bias::None => y,
        Bias::Cols(bias) => y.broadcast_add(bias)?,
        Bias::Rows(bias) => y.broadcast_add(&bias.reshape((bias.elem_count(), 1))?)?,
    };
    match residual {
        Some(r) => y + r,
        None => Ok(y),
    }
}

/// `Σ a_i b_i` over products of one output shape (the `k` may differ): the input gradient
/// of a fused projection from its parts' gradients, without concatenating them. `None`
/// unless every operand is an f32 CPU tensor (the caller then takes candle's path).
pub(crate) fn matmul_sum(terms: &[(&Tensor, &Tensor)]) -> Option<candle_core::Result<Tensor>> {
    let operands: Vec<&Tensor> = terms.iter().flat_map(|(a, b)| [*a, *b]).collect();
    (!terms.is_empty() && is_cpu_f32(&operands)).then(|| cpu_product(terms, Bias::None, None))
}

fn is_cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// candle's thread count (`RAYON_NUM_THREADS`, else the cores), as candle's own CPU
/// matmul uses.
fn threads() -> usize {
    candle_core::utils::get_num_threads().max(1)
}

/// Products whose smaller output side is at most this many rows or columns are split by
/// [`gemm_f32`] itself (see there).
const SPLIT_SIDE: usize = 128;

/// ... and that have at least this many multiply-adds: below it, gemm's own choice (often
/// one thread) was as fast or faster.
const SPLIT_MIN_MACS: usize = 32 << 20;

/// Products whose smaller side is at most [`SPLIT_WIDE_SIDE`] and that have at least
/// [`SPLIT_WIDE_MIN_MACS`] multiply-adds are split too: SDXL's 256-token products at
/// 1280 channels (its 16x16 level at 512 px, 60 transformer blocks). SDXL steps at 512
/// px, builds alternating: 29.7 and 29.7 s without, 24.8 and 23.6 s with this rule (and
/// 10-23% faster in three pairs splitting every 129-256-row product, which made SD 1.5's
/// 256 px step about 6% slower: its 640-channel products stay under 1G multiply-adds
/// and keep gemm's threading).
const SPLIT_WIDE_SIDE: usize = 256;
const SPLIT_WIDE_MIN_MACS: usize = 1 << 30;

/// Whether [`gemm_f32`] splits an `[m, k] x [k, n]` product itself.
fn splits(m: usize, n: usize, k: usize) -> bool {
    let (side, macs) = (m.min(n), m * n * k);
    (side <= SPLIT_SIDE && macs >= SPLIT_MIN_MACS)
        || (side <= SPLIT_WIDE_SIDE && macs >= SPLIT_WIDE_MIN_MACS)
}

/// A raw pointer shared by the parallel parts of one product (each writes its own block).
#[derive(Clone, Copy)]
struct SharedPtr<T>(*const T);
// SAFETY: only used by `gemm_f32`, whose parts read shared operands and write disjoint
// blocks of the output.
unsafe impl<T> Send for SharedPtr<T> {}
// SAFETY: as for Send: the shared operands are only read, the output blocks are disjoint.
unsafe impl<T> Sync for SharedPtr<T> {}

/// One f32 product on `threads` threads, `dst (+)= lhs rhs`, `[m, k] x [k, n]`; the
/// output and the operands at any (row, column) strides.
///
/// gemm's own threading splits the output in blocks of its cache tiling, so a product with
/// few rows or columns (the 64 tokens of SD's 8x8 level, CLIP's 77, a convolution over 64
/// pixels) runs on one thread: measured on 2 cores, `[64, 1280] x [1280, 10240]` at 95
/// GFLOP/s and `[77, 768] x [768, 3072]` at 98, against 290 for large products. Those are
/// split here along their long side into one part per thread, each run by gemm on one
/// thread (199 and 233 GFLOP/s). Every output value is computed by the same kernel over
/// the same `k` blocks (gemm's `kc` depends on `k` alone), so the split does not change
/// the sums' order.
///
/// # Safety
/// Every element of the three views must lie in its allocation, the output must not
/// overlap an operand, and, when `read` is true, it must be initialised.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_f32(
    threads: usize,
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs, dst_cs): (*mut f32, usize, usize),
    read: bool,
    (lhs, lhs_rs, lhs_cs): (*const f32, usize, usize),
    (rhs, rhs_rs, rhs_cs): (*const f32, usize, usize),
) {
    let long = m.max(n);
    let parts = if threads > 1 && splits(m, n, k) {
        threads.min(long / 16).max(1)
    } else {
        1
    };
    let run = |rows: usize, cols: usize, dst: *mut f32, lhs: *const f32, rhs: *const f32, par| {
        // SAFETY: the caller's contract, for a block of the output and the operands' rows
        // and columns that produce it.
        unsafe {
            gemm::gemm(
                rows,
                cols,
                k,
                dst,
                dst_cs as isize,
                dst_rs as isize,
                read,
                lhs,
                lhs_cs as isize,
                lhs_rs as isize,
                rhs,
                rhs_cs as isize,
                rhs_rs as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                par,
            )
        }
    };
    if parts == 1 {
        let par = match threads {
            1 => gemm::Parallelism::None,
            t => gemm::Parallelism::Rayon(t),
        };
        run(m, n, dst, lhs, rhs, par);
        return;
    }
    let (dst, lhs, rhs) = (SharedPtr(dst), SharedPtr(lhs), SharedPtr(rhs));
    // Part boundaries on multiples of 16 (a whole number of gemm's register tiles).
    let step = long.div_ceil(parts).div_ceil(16) * 16;
    (0..parts).into_par_iter().for_each(|p| {
        let (dst, lhs, rhs) = (dst, lhs, rhs);
        let first = p * step;
        if first >= long {
            return;
        }
        let len = step.min(long - first);
        // SAFETY: part p covers output rows (or columns) first..first + len, inside the
        // output; the parts are disjoint.
        unsafe {
            if n >= m {
                run(
                    m,
                    len,
                    dst.0.cast_mut().add(first * dst_cs),
                    lhs.0,
                    rhs.0.add(first * rhs_cs),
                    gemm::Parallelism::None,
                );
            } else {
                run(
                    len,
                    n,
                    dst.0.cast_mut().add(first * dst_rs),
                    lhs.0.add(first * lhs_rs),
                    rhs.0,
                    gemm::Parallelism::None,
                );
            }
        }
    });
}

/// One operand as gemm reads it: its values, the offset of its first element, and its
/// batch, row and column strides (batch 0 for a matrix shared by every batch).
struct Operand<'a> {
    values: &'a [f32],
    start: usize,
    batch: usize,
    /// `(rows, cols)` of one matrix.
    dims: (usize, usize),
    strides: [usize; 3],
}

/// The operand view of `t` (rank 2 or 3) held by `storage`.
fn operand<'a>(t: &Tensor, storage: &'a Storage, what: &str) -> candle_core::Result<Operand<'a>> {
    let Storage::Cpu(CpuStorage::F32(values)) = storage else {
        candle_core::bail!("matmul: {what} is not an f32 cpu tensor");
    };
    let layout = t.layout();
    let (dims, strides) = (layout.dims(), layout.stride());
    let (batch, rows, cols, strides) = match (dims, strides) {
        ([r, c], [rs, cs]) => (1, *r, *c, [0, *rs, *cs]),
        ([b, r, c], [bs, rs, cs]) => (*b, *r, *c, [if *b == 1 { 0 } else { *bs }, *rs, *cs]),
        _ => candle_core::bail!("matmul: {what} has shape {dims:?}, not a matrix or a batch"),
    };
    let start = layout.start_offset();
    // The last element read must lie in the storage: gemm reads through raw pointers.
    if batch * rows * cols > 0 {
        let last =
            start + (batch - 1) * strides[0] + (rows - 1) * strides[1] + (cols - 1) * strides[2];
        if last >= values.len() {
            candle_core::bail!("matmul: {what}'s view runs past its storage");
        }
    }
    Ok(Operand {
        values,
        start,
        batch,
        dims: (rows, cols),
        strides,
    })
}

/// The contiguous f32 values of a small vector or a residual, as a new tensor when `t`
/// is a strided view.
fn contiguous_f32(t: &Tensor, len: usize, what: &str) -> candle_core::Result<Tensor> {
    if t.elem_count() != len {
        candle_core::bail!(
            "matmul: {what} has {} values, the output needs {len}",
            t.elem_count()
        );
    }
    if !is_cpu_f32(&[t]) {
        candle_core::bail!("matmul: {what} is not an f32 cpu tensor");
    }
    t.contiguous()
}

fn f32_values<'a>(t: &Tensor, storage: &'a Storage) -> candle_core::Result<&'a [f32]> {
    match storage {
        Storage::Cpu(CpuStorage::F32(v)) => {
            let start = t.layout().start_offset();
            v.get(start..start + t.elem_count())
                .ok_or_else(|| candle_core::Error::Msg("matmul: storage too short".into()))
        }
        _ => candle_core::bail!("matmul: expected f32 cpu storage"),
    }
}

/// Rows per parallel task of the output fill: about 64 KiB each.
fn fill_rows(n: usize) -> usize {
    (16384 / n.max(1)).max(1)
}

/// The f32 CPU product: checks every shape and view, then runs gemm per batch (or once,
/// over the batches stacked as rows, when a shared right matrix allows it).
fn cpu_product(
    terms: &[(&Tensor, &Tensor)],
    bias: Bias,
    residual: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let storages: Vec<_> = terms
        .iter()
        .map(|(a, b)| (a.storage_and_layout().0, b.storage_and_layout().0))
        .collect();
    let mut ops = Vec::with_capacity(terms.len());
    for ((a, b), (sa, sb)) in terms.iter().zip(&storages) {
        ops.push((operand(a, sa, "lhs")?, operand(b, sb, "rhs")?));
    }
    let Some((a0, b0)) = ops.first() else {
        candle_core::bail!("matmul: no product");
    };
    let (m, n) = (a0.dims.0, b0.dims.1);
    let batch = ops
        .iter()
        .flat_map(|(a, b)| [a.batch, b.batch])
        .max()
        .unwrap_or(1);
    for (a, b) in &ops {
        if a.dims.1 != b.dims.0 || a.dims.0 != m || b.dims.1 != n {
            candle_core::bail!(
                "matmul: shape mismatch, [{}, {}] x [{}, {}] for a [{m}, {n}] output",
                a.dims.0,
                a.dims.1,
                b.dims.0,
                b.dims.1
            );
        }
        if (a.batch != 1 && a.batch != batch) || (b.batch != 1 && b.batch != batch) {
            candle_core::bail!(
                "matmul: batch mismatch, {} x {} for {batch}",
                a.batch,
                b.batch
            );
        }
    }
    let len = batch * m * n;
    let mut out: Vec<f32> = Vec::with_capacity(len);

    // The output's initial values, when it has any: residual + bias.
    let bias_t = match bias {
        Bias::None => None,
        Bias::Cols(t) => Some((contiguous_f32(t, n, "bias")?, true)),
        Bias::Rows(t) => Some((contiguous_f32(t, m, "bias")?, false)),
    };
    let residual_t = residual
        .map(|r| contiguous_f32(r, len, "residual"))
        .transpose()?;
    let read_dst = bias_t.is_some() || residual_t.is_some();
    let bias_s = bias_t.as_ref().map(|(t, _)| t.storage_and_layout().0);
    let res_s = residual_t.as_ref().map(|t| t.storage_and_layout().0);
    let bias_v = match (&bias_t, &bias_s) {
        (Some((t, cols)), Some(s)) => Some((f32_values(t, s)?, *cols)),
        _ => None,
    };
    let res_v = match (&residual_t, &res_s) {
        (Some(t), Some(s)) => Some(f32_values(t, s)?),
        _ => None,
    };
    let threads = threads();

    // Products computed transposed, `[n, rows]` column-major, are transposed into the
    // output with the bias and residual.
    let transposed = match sixteen_rows(&ops, batch, (m, n), threads)? {
        Some(cols) => Some(cols),
        None => column_major(&ops, batch, (m, n), threads),
    };
    if let Some(cols) = transposed {
        transpose_into(
            &mut out.spare_capacity_mut()[..len],
            &cols,
            (batch * m, n, m),
            bias_v,
            res_v,
        );
        // SAFETY: `transpose_into` wrote every one of the `len` values.
        unsafe { out.set_len(len) };
        drop(storages);
        return output(out, terms, batch, m, n);
    }

    if read_dst && len > 0 {
        let chunk = fill_rows(n) * n;
        out.spare_capacity_mut()[..len]
            .par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(c, dst)| {
                let first = c * chunk;
                for (r, row) in dst.chunks_mut(n).enumerate() {
                    let at = first + r * n;
                    // The output row within its matrix: a row bias's index.
                    let i = (at / n) % m;
                    for (j, d) in row.iter_mut().enumerate() {
                        let b = bias_at(bias_v, i, j);
                        let x = res_v.map_or(0.0, |v| v[at + j]);
                        d.write(x + b);
                    }
                }
            });
    }

    let dst = out.as_mut_ptr();
    for (t, (a, b)) in ops.iter().enumerate() {
        // The first product overwrites an uninitialised output; the others add to it.
        let read = read_dst || t > 0;
        let fold = folds(a, b, batch, m);
        let (steps, rows) = if fold { (1, batch * m) } else { (batch, m) };
        for s in 0..steps {
            // SAFETY: `operand` checked that every element of each view (all batches)
            // lies in its storage; dst has capacity for `len = batch * m * n` values, of
            // which this call writes rows `s * m ..` up to `len` (rows * n each step), and
            // it reads them only when `read` (they were written by the fill or by an
            // earlier product). The output does not overlap any operand (a new Vec).
            unsafe {
                gemm_f32(
                    threads,
                    (rows, n, a.dims.1),
                    (dst.add(s * m * n), n, 1),
                    read,
                    (
                        a.values.as_ptr().add(a.start + s * a.strides[0]),
                        a.strides[1],
                        a.strides[2],
                    ),
                    (
                        b.values.as_ptr().add(b.start + s * b.strides[0]),
                        b.strides[1],
                        b.strides[2],
                    ),
                );
            }
        }
    }
    // SAFETY: the fill or the first product (gemm with read_dst false writes every
    // element, zeros when k is 0) initialised all `len` values.
    unsafe { out.set_len(len) };
    drop(storages);
    output(out, terms, batch, m, n)
}

/// The product's values as a tensor: `[m, n]` when every operand is a matrix, else
/// `[batch, m, n]`.
fn output(
    out: Vec<f32>,
    terms: &[(&Tensor, &Tensor)],
    batch: usize,
    m: usize,
    n: usize,
) -> candle_core::Result<Tensor> {
    let shape: Vec<usize> = if terms.iter().all(|(a, b)| a.rank() == 2 && b.rank() == 2) {
        vec![m, n]
    } else {
        vec![batch, m, n]
    };
    Tensor::from_vec(out, shape, &Device::Cpu)
}

/// Whether a product of few rows with a transposed right operand (a linear layer's
/// `x W^T` on CLIP's 77 tokens or SD's 64 at 8x8) runs column-major into a scratch matrix
/// that is then transposed into the output (with the bias and residual, in the pass that
/// would fill them anyway).
///
/// gemm vectorises along the output's contiguous side. Row-major, that is `W`'s rows,
/// which it must then copy into panels (a transposing copy of the whole weight) on every
/// call, at a cost that a few rows do not repay. Column-major it runs along the tokens,
/// reads `W^T` where it lies (its columns are `W`'s rows, contiguous) and copies only the
/// small `x`. Measured on 2 cores, GFLOP/s row-major vs column-major with the transpose:
/// `[64, 1280] x [1280, 10240]` 166 vs 235, `[77, 3072] x [3072, 768]` 145 vs 190,
/// `[16, 1280] x [1280, 1280]` 70 vs 125.
///
/// Up to 512 rows it still wins where the product is at least as deep as it is wide
/// (`k >= n`: the attention outputs' and the feed-forward's output layer, whose `W^T` is
/// the costliest to pack), and loses where it is wider. Measured with cold weights (1 GiB
/// of copies in turn), GFLOP/s row-major vs column-major: `[256, 2560] x [2560, 640]`
/// 113-135 vs 194-201, `[256, 5120] x [5120, 1280]` 156-181 vs 214-238, `[256, 640] x
/// [640, 640]` 133-138 vs 170-178, `[256, 1280] x [1280, 1280]` 201-214 vs 215-226,
/// `[512, 5120] x [5120, 1280]` 216-225 vs 240-245; `[512, 1280] x [1280, 1280]` even;
/// losing: `[256, 640] x [640, 5120]` 207-224 vs 180-191, `[1024, 2560] x [2560, 640]`
/// 235-241 vs 195-214, `[1024, 640] x [640, 640]` 209-226 vs 191-201.
fn by_columns(rows: usize, n: usize, k: usize, b: &Operand) -> bool {
    let shape = rows <= SPLIT_SIDE || (rows <= 256 && k >= n) || (rows <= 512 && k >= 4 * n);
    shape && b.strides[1] == 1 && k > 1 && rows * n * k >= SPLIT_MIN_MACS
}

/// Whether the product's `batch` matrices of `m` rows stack into one of `batch * m` rows:
/// `b` is shared by every batch and `a`'s batches follow row on row.
fn folds(a: &Operand, b: &Operand, batch: usize, m: usize) -> bool {
    b.strides[0] == 0 && (batch == 1 || a.strides[0] == m * a.strides[1])
}

/// A single product that [`by_columns`] takes, run column-major into a new `[n, rows]`
/// scratch matrix; `None` for any other.
fn column_major(
    ops: &[(Operand, Operand)],
    batch: usize,
    (m, n): (usize, usize),
    threads: usize,
) -> Option<Vec<f32>> {
    let [(a, b)] = ops else {
        return None;
    };
    let rows = batch * m;
    if !(folds(a, b, batch, m) && by_columns(rows, n, a.dims.1, b)) {
        return None;
    }
    let len = rows * n;
    let mut cols: Vec<f32> = Vec::with_capacity(len);
    // SAFETY: `operand` checked that every element of each view lies in its storage; the
    // column-major scratch `cols` (`[n, rows]`) has capacity for all `len` values, is new,
    // and is written, not read (`read` false).
    unsafe {
        gemm_f32(
            threads,
            (rows, n, a.dims.1),
            (cols.as_mut_ptr(), 1, rows),
            false,
            (a.values.as_ptr().add(a.start), a.strides[1], a.strides[2]),
            (b.values.as_ptr().add(b.start), b.strides[1], b.strides[2]),
        );
        cols.set_len(len);
    }
    Some(cols)
}

/// How a right operand of [`sixteen_rows`] holds its weight `W`, contiguous from its
/// start: transposed (`W^T`, a linear layer's forward `x W^T`) or as it is (`W`, the
/// input gradient `g W`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Weight {
    Transposed,
    AsIs,
}

/// The [`Weight`] form of `b`, `[k, n]`, when its values are a contiguous matrix in
/// either order.
fn weight_form(b: &Operand) -> Option<Weight> {
    let (k, n) = b.dims;
    let whole = b.values.len() >= b.start + k * n;
    match b.strides {
        [0, 1, cs] if cs == k && whole => Some(Weight::Transposed),
        [0, rs, 1] if rs == n && whole => Some(Weight::AsIs),
        _ => None,
    }
}

/// The fewest multiply-adds of a 16-row product that [`sixteen_rows`] takes: a weight of
/// 1M values (4 MiB), which gemm reads at a fraction of memory speed.
const SIXTEEN_ROWS_MIN_MACS: usize = 16 << 20;

/// `Σ a_i b_i` for products of 16 rows (after folding batches) and a weight of at least
/// 1M values, by the 16-column kernels of `layers::skinny`, as the transposed output
/// `[n, 16]` (which [`transpose_into`] reads): SD 1.x's and 2.x's mid-block transformer
/// at 256 px, 16 tokens, whose products gemm runs at 49-109 GFLOP/s, 6-9 GB/s of weight
/// (`linear_step_timing`), where the kernels read each weight once, row after row. `None`
/// where this does not apply (no AVX-512, other sizes, a weight that is not contiguous).
fn sixteen_rows(
    ops: &[(Operand, Operand)],
    batch: usize,
    (m, n): (usize, usize),
    threads: usize,
) -> candle_core::Result<Option<Vec<f32>>> {
    const ROWS: usize = skinny::COLS;
    // Each term's weight form, where every term fits.
    let form = |(a, b): &(Operand, Operand)| {
        (folds(a, b, batch, m) && a.dims.1 * n * ROWS >= SIXTEEN_ROWS_MIN_MACS)
            .then(|| weight_form(b))
            .flatten()
    };
    if batch * m != ROWS || !skinny::available() || ops.is_empty() {
        return Ok(None);
    }
    let Some(forms) = ops.iter().map(form).collect::<Option<Vec<_>>>() else {
        return Ok(None);
    };
    let mut cols = vec![0f32; n * ROWS];
    let mut term = if ops.len() > 1 {
        vec![0f32; n * ROWS]
    } else {
        Vec::new()
    };
    for (t, ((a, b), form)) in ops.iter().zip(forms).enumerate() {
        let k = a.dims.1;
        // a^T, [k, 16]: row r of a (batches stacked) is column r.
        let mut at = vec![0f32; k * ROWS];
        for r in 0..ROWS {
            let (bi, ri) = (r / m, r % m);
            let row = a.start + bi * a.strides[0] + ri * a.strides[1];
            for (i, dst) in at.iter_mut().skip(r).step_by(ROWS).enumerate() {
                *dst = a.values[row + i * a.strides[2]];
            }
        }
        let w = &b.values[b.start..b.start + k * n];
        let dst = if t == 0 { &mut cols } else { &mut term };
        match form {
            // W [n, k]: out^T = W a^T.
            Weight::Transposed => skinny::forward(w, &at, None, (n, k), dst)?,
            // W [k, n]: out^T = W^T a^T.
            Weight::AsIs => skinny::input_grad(w, &at, (k, n), threads, dst)?,
        }
        if t > 0 {
            cols.iter_mut().zip(&term).for_each(|(c, v)| *c += v);
        }
    }
    Ok(Some(cols))
}

/// The bias of output row `i` (within its matrix), column `j`: a column bias
/// (`(values, true)`) is indexed by `j`, a row bias by `i`.
fn bias_at(bias: Option<(&[f32], bool)>, i: usize, j: usize) -> f32 {
    match bias {
        Some((v, true)) => v[j],
        Some((v, false)) => v[i],
        None => 0.0,
    }
}

/// `out[r, j] = cols[j * rows + r] + bias + residual[r, j]` for the `[rows, n]` output of
/// matrices `m` rows high, in parallel over blocks of 16 rows (one cache line of each of
/// `cols`'s columns).
fn transpose_into(
    out: &mut [std::mem::MaybeUninit<f32>],
    cols: &[f32],
    (rows, n, m): (usize, usize, usize),
    bias: Option<(&[f32], bool)>,
    residual: Option<&[f32]>,
) {
    const BLOCK: usize = 16;
    if n == 0 {
        return;
    }
    out.par_chunks_mut(BLOCK * n)
        .enumerate()
        .for_each(|(blk, dst)| {
            let first = blk * BLOCK;
            let height = dst.len() / n;
            for j in 0..n {
                let src = &cols[j * rows + first..j * rows + first + height];
                for (r, &v) in src.iter().enumerate() {
                    let i = first + r;
                    let b = bias_at(bias, i % m, j);
                    let x = residual.map_or(0.0, |res| res[i * n + j]);
                    dst[r * n + j].write(v + b + x);
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values of `shape`, a sine of the index.
    fn wave(shape: &[usize], seed: f64) -> Tensor {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|i| ((i as f64 + 1.0) * 0.7137 + seed).sin() as f32)
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).expect("shape")
    }

    /// The largest difference from candle's f64 product of the same views.
    fn max_diff(got: &Tensor, want: &Tensor) -> f64 {
        let d = (got.to_dtype(DType::F64).expect("f64") - want).expect("diff");
        d.abs()
            .and_then(|d| d.flatten_all()?.max(0)?.to_scalar::<f64>())
            .expect("max")
    }

    fn f64(t: &Tensor) -> Tensor {
        t.to_dtype(DType::F64).expect("f64")
    }

    /// Transposed views, batches (shared and not), row and column biases and a residual
    /// against candle's f64 product; and the same call on f64 tensors takes candle's path.
    #[test]
    fn strided_products_match_candle() {
        let x = wave(&[2, 6, 5], 0.1); // [B, C, HW]
        let w = wave(&[4, 6], 0.2); // [out, in]
        let bias = wave(&[4], 0.3);
        let tokens = x.transpose(1, 2).expect("t"); // [B, HW, C], a view
        let res = wave(&[2, 5, 4], 0.4);
        let got = matmul(&tokens, &w.t().expect("t"), Bias::Cols(&bias), Some(&res)).expect("y");
        let want = matmul(
            &f64(&tokens),
            &f64(&w).t().expect("t"),
            Bias::Cols(&f64(&bias)),
            Some(&f64(&res)),
        )
        .expect("y64");
        assert_eq!(got.dims(), &[2, 5, 4]);
        assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));

        // W [4, 6] times the image [B, 6, HW]: channels first, bias per row.
        let got = matmul(&w, &x, Bias::Rows(&bias), None).expect("y");
        let want = matmul(&f64(&w), &f64(&x), Bias::Rows(&f64(&bias)), None).expect("y64");
        assert_eq!(got.dims(), &[2, 4, 5]);
        assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));

        // A contiguous batch over a shared matrix (stacked into rows), no bias.
        let a = wave(&[3, 7, 6], 0.5);
        let got = matmul(&a, &w.t().expect("t"), Bias::None, None).expect("y");
        let want = f64(&a)
            .broadcast_matmul(&f64(&w).t().expect("t"))
            .expect("y64");
        assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));

        // A narrowed view (a fused projection's part) and an empty inner dimension.
        let part = a.narrow(2, 2, 3).expect("narrow");
        let wp = w.narrow(1, 2, 3).expect("narrow").t().expect("t");
        let got = matmul(&part, &wp, Bias::Cols(&bias), None).expect("y");
        let want = f64(&part)
            .broadcast_matmul(&f64(&wp))
            .and_then(|y| y.broadcast_add(&f64(&bias)))
            .expect("y64");
        assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));
        let empty = Tensor::zeros((3, 0), DType::F32, &Device::Cpu).expect("empty");
        let empty_w = Tensor::zeros((0, 4), DType::F32, &Device::Cpu).expect("empty");
        let got = matmul(&empty, &empty_w, Bias::Cols(&bias), None).expect("y");
        let want = f64(&bias).broadcast_as((3, 4)).expect("b");
        assert_eq!(max_diff(&got, &want), 0.0);
    }

    /// A sum of products equals the product of the concatenations.
    #[test]
    fn sum_of_products_matches_concatenated_product() {
        let g = [wave(&[5, 3], 0.1), wave(&[5, 2], 0.2)];
        let w = [wave(&[3, 4], 0.3), wave(&[2, 4], 0.4)];
        let got = matmul_sum(&[(&g[0], &w[0]), (&g[1], &w[1])])
            .expect("f32 cpu")
            .expect("y");
        let want = Tensor::cat(&[f64(&g[0]), f64(&g[1])], 1)
            .and_then(|g| g.matmul(&Tensor::cat(&[f64(&w[0]), f64(&w[1])], 0)?))
            .expect("y64");
        assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));
        assert!(matmul_sum(&[(&f64(&g[0]), &f64(&w[0]))]).is_none());
    }

    /// Products split by `gemm_f32` along their long side (columns, then rows; strided
    /// operands; accumulating into a filled output) equal the same products run whole,
    /// bit for bit, and candle's f64 product.
    #[test]
    fn split_products_equal_whole_products() {
        for (m, k, n, read) in [
            (64, 1024, 600, false),
            (700, 1000, 48, true),
            (77, 768, 770, true),
            (200, 4096, 1400, true),
        ] {
            assert!(splits(m, n, k), "{m}x{k}x{n}");
            let a = wave(&[k, m], 0.1).t().expect("t"); // a transposed view
            let b = wave(&[k, n], 0.2);
            let fill = wave(&[m, n], 0.3);
            let run = |threads: usize| -> Vec<f32> {
                let mut out = fill.flatten_all().and_then(|t| t.to_vec1()).expect("fill");
                let av = a
                    .t()
                    .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                    .expect("a");
                let bv = b.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("b");
                // SAFETY: a is [m, k] read at strides (1, m) from its [k, m] values, b is
                // [k, n] contiguous, out is [m, n]; all within their vectors.
                unsafe {
                    gemm_f32(
                        threads,
                        (m, n, k),
                        (out.as_mut_ptr(), n, 1),
                        read,
                        (av.as_ptr(), 1, m),
                        (bv.as_ptr(), n, 1),
                    )
                };
                out
            };
            let whole = run(1);
            for threads in [2, 3] {
                assert!(run(threads) == whole, "{m}x{k}x{n} on {threads} threads");
            }
            let got = Tensor::from_vec(whole, (m, n), &Device::Cpu).expect("y");
            let mut want = f64(&a).matmul(&f64(&b)).expect("y64");
            if read {
                want = (want + f64(&fill)).expect("sum");
            }
            assert!(max_diff(&got, &want) < 1e-3, "{}", max_diff(&got, &want));
        }
    }

    /// `x W^T + bias + res` against candle's f64 product, within 1e-3.
    fn assert_linear_matches(x: &Tensor, wt: &Tensor, bias: &Tensor, res: &Tensor) {
        let got = matmul(x, wt, Bias::Cols(bias), Some(res)).expect("y");
        let want = f64(x)
            .broadcast_matmul(&f64(wt))
            .and_then(|y| y.broadcast_add(&f64(bias))?.add(&f64(res)))
            .expect("y64");
        assert_eq!(got.dims(), want.dims());
        assert!(max_diff(&got, &want) < 1e-3, "{}", max_diff(&got, &want));
    }

    /// Products of few rows with a transposed weight run column-major and are transposed
    /// into the output: one matrix and a folded batch, with column and row biases and a
    /// residual, against candle's f64 product.
    #[test]
    fn column_major_products_match_candle() {
        let w = wave(&[600, 1024], 0.1); // a linear weight [out, in]
        let wt = w.t().expect("t");
        let bias = wave(&[600], 0.2);
        // Rows up to 512 take it where the product is deeper than it is wide.
        for (shape, rows) in [
            (vec![64, 1024], 64),
            (vec![2, 40, 1024], 80),
            (vec![256, 1024], 256),
        ] {
            let x = wave(&shape, 0.3);
            let mut out_shape = shape.clone();
            *out_shape.last_mut().expect("dims") = 600;
            let res = wave(&out_shape, 0.4);
            let storage = wt.storage_and_layout().0;
            let op = operand(&wt, &storage, "rhs").expect("operand");
            assert!(
                by_columns(rows, 600, 1024, &op),
                "{shape:?} takes the route"
            );
            assert!(!by_columns(512, 600, 1024, &op), "a wider product does not");
            drop(storage);
            assert_linear_matches(&x, &wt, &bias, &res);
            let got = matmul(&x, &wt, Bias::None, None).expect("y");
            let want = f64(&x).broadcast_matmul(&f64(&wt)).expect("y64");
            assert!(max_diff(&got, &want) < 1e-3, "{}", max_diff(&got, &want));
        }
        // A row bias (one per output row) on the route: W [64, 1024] times an image read
        // as a transposed view [1024, 600].
        let rows_bias = wave(&[64], 0.5);
        let img = wave(&[600, 1024], 0.6).t().expect("t");
        let a = wave(&[64, 1024], 0.7);
        let got = matmul(&a, &img, Bias::Rows(&rows_bias), None).expect("y");
        let want = f64(&a)
            .matmul(&f64(&img))
            .and_then(|y| y.broadcast_add(&f64(&rows_bias).reshape((64, 1))?))
            .expect("y64");
        assert!(max_diff(&got, &want) < 1e-3, "{}", max_diff(&got, &want));
    }

    /// Products of 16 rows with a weight of at least 1M values run by the 16-column
    /// kernels: a linear layer's forward with its bias and a residual (also from a batch
    /// of two 8-row matrices), its input gradient, and the input gradient of a fused
    /// projection's parts, against candle's f64 products.
    #[test]
    fn sixteen_row_products_match_candle() {
        if !skinny::available() {
            return;
        }
        let (out_f, in_f) = (1040, 1024); // rows not a multiple of 20, columns of 8 plus
        let w = wave(&[out_f, in_f], 0.1);
        let wt = w.t().expect("t");
        let bias = wave(&[out_f], 0.2);
        {
            let x = wave(&[16, in_f], 0.3);
            let (xs, ws) = (x.storage_and_layout().0, wt.storage_and_layout().0);
            let ops = [(
                operand(&x, &xs, "lhs").expect("lhs"),
                operand(&wt, &ws, "rhs").expect("rhs"),
            )];
            assert_eq!(weight_form(&ops[0].1), Some(Weight::Transposed));
            let taken = sixteen_rows(&ops, 1, (16, out_f), 2).expect("product");
            assert!(taken.is_some(), "16 rows did not take the route");
            let not = sixteen_rows(&ops, 1, (17, out_f), 2).expect("product");
            assert!(not.is_none(), "17 rows took the route");
        }
        for shape in [vec![16, in_f], vec![2, 8, in_f]] {
            let x = wave(&shape, 0.3);
            let mut out_shape = shape.clone();
            *out_shape.last_mut().expect("dims") = out_f;
            let res = wave(&out_shape, 0.4);
            assert_linear_matches(&x, &wt, &bias, &res);
        }
        let g = wave(&[16, out_f], 0.5);
        let storage = w.storage_and_layout().0;
        let form = weight_form(&operand(&w, &storage, "rhs").expect("operand"));
        assert_eq!(form, Some(Weight::AsIs));
        drop(storage);
        let got = matmul(&g, &w, Bias::None, None).expect("dx");
        let want = f64(&g).matmul(&f64(&w)).expect("dx64");
        assert!(max_diff(&got, &want) < 1e-3, "{}", max_diff(&got, &want));
        // A fused projection's parts: the sum of the parts' products.
        let (w0, w1) = (
            w.narrow(0, 0, 640).expect("w0"),
            w.narrow(0, 640, 400).expect("w1"),
        );
        let (g0, g1) = (
            g.narrow(1, 0, 640).expect("g0"),
            g.narrow(1, 640, 400).expect("g1"),
        );
        let got = matmul_sum(&[(&g0, &w0), (&g1, &w1)])
            .expect("f32 cpu")
            .expect("dx");
        assert!(max_diff(&got, &want) < 1e-3, "{}", max_diff(&got, &want));
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let a = wave(&[3, 4], 0.1);
        let b = wave(&[5, 2], 0.2);
        assert!(matmul(&a, &b, Bias::None, None).is_err());
        let b = wave(&[4, 2], 0.2);
        let bias = wave(&[3], 0.3);
        assert!(matmul(&a, &b, Bias::Cols(&bias), None).is_err());
        let res = wave(&[2, 2], 0.3);
        assert!(matmul(&a, &b, Bias::None, Some(&res)).is_err());
    }
}
