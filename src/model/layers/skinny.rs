//! Products with 16 columns on the CPU (AVX-512; the input gradient also on AVX2): the
//! convolutions of SD's 4x4 level (a 256 px image's deepest level), whose 16 output
//! pixels make `W [O, K] x cols [K, 16]` and its input gradient `W^T [K, O] x g [O, 16]`.
//!
//! gemm runs these on one 16-row register tile with 6 accumulators, reading the kernel
//! `W` (59 MB at 1280 channels) as it goes; for the input gradient it reads `W` down its
//! columns, one cache line per row 46 KB apart, which the hardware prefetchers cannot
//! follow, so the product waits on memory: measured in a 256 px step, 6.5 ms per
//! 1280-channel input gradient (73 GFLOP/s) and 3.6 ms per forward call, where reading
//! the kernel once takes about 2.5 ms on this machine (24 GB/s). The kernels here read
//! `W` row after row, a few rows at a time: the forward pass keeps 20 rows' outputs in
//! registers; the input gradient keeps 16 rows of `g` in registers and adds each group of
//! 16 kernel rows into the column gradient, 8 columns at a time.
//!
//! Every output value is a sum over `k` (forward) or over `O` (input gradient) in
//! increasing order, one fused multiply-add per term. A 256 px SD 1.5 step (`sdti bench
//! --resolution 256 --steps 3`, the two builds alternating, three rounds): 2127-2178 ms
//! with gemm, 2003-2110 with these kernels.
//!
//! Without AVX-512 the input gradient runs on AVX2 ([`input_grad_avx2`]): 4 rows of `g`
//! (two vectors each) in registers, 3 columns at a time (`skinny_input_grad_timing` on the
//! 2-core AVX2 machine: 1280 -> 1280 channels 7.1 ms, 67 GFLOP/s, against gemm's 8.4;
//! 2560 -> 1280 13.9 against 19.1). The forward pass keeps gemm there (which reads `W`
//! along its rows, 6.2 ms at 1280 channels).

use rayon::prelude::*;

/// Output columns of the products here: one AVX-512 vector.
pub(super) const COLS: usize = 16;

/// Whether the kernels can run here: an x86-64 CPU with AVX-512F. Elsewhere the callers
/// use gemm.
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX512.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Rows of `W` per forward task: 20 accumulators (the outputs of 20 rows) in registers.
const FWD_ROWS: usize = 20;
/// Rows of `W` (and `g`) per pass of the input gradient: 16 of `g`'s rows in registers.
const BWD_ROWS: usize = 16;
/// Columns of `W` per step of the input gradient: 8 independent accumulators.
const BWD_COLS: usize = 8;

/// Whether [`input_grad`] can run here: AVX-512F, or AVX2 and FMA (its [`avx2`] kernel).
pub(super) fn input_grad_available() -> bool {
    available() || super::simd::avx2_fma()
}

/// An error unless the kernels can run (`can`) and every slice holds its shape.
fn check(what: &str, can: bool, sizes: &[(usize, usize)]) -> candle_core::Result<()> {
    if !can {
        candle_core::bail!(
            "{what}: the 16-column kernels need AVX-512F (or AVX2 and FMA for the input gradient)"
        );
    }
    if let Some((have, need)) = sizes.iter().find(|(have, need)| have < need) {
        candle_core::bail!("{what}: an operand holds {have} values, {need} needed");
    }
    Ok(())
}

/// `out [O, 16] = W [O, K] cols [K, 16] (+ bias per row)`, all row-major and contiguous.
/// An error without AVX-512 (callers check [`available`]) or when a slice is shorter
/// than its shape.
pub(super) fn forward(
    w: &[f32],
    cols: &[f32],
    bias: Option<&[f32]>,
    (o, k): (usize, usize),
    out: &mut [f32],
) -> candle_core::Result<()> {
    let bias_len = bias.map_or(o, <[f32]>::len);
    let sizes = [
        (w.len(), o * k),
        (cols.len(), k * COLS),
        (out.len(), o * COLS),
        (bias_len, o),
    ];
    check("skinny::forward", available(), &sizes)?;
    out[..o * COLS]
        .par_chunks_mut(FWD_ROWS * COLS)
        .enumerate()
        .for_each(|(blk, dst)| {
            let r0 = blk * FWD_ROWS;
            let rows = dst.len() / COLS;
            let w = &w[r0 * k..(r0 + rows) * k];
            let bias = bias.map(|b| &b[r0..r0 + rows]);
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512F is present (checked above); the slices hold `rows` rows
            // of `k` (w), `k` rows of 16 (cols) and `rows` rows of 16 (dst).
            unsafe {
                if rows == FWD_ROWS {
                    x86::forward_rows::<FWD_ROWS>(w, cols, bias, k, dst);
                } else {
                    for r in 0..rows {
                        let b = bias.map(|b| &b[r..r + 1]);
                        let dst = &mut dst[r * COLS..(r + 1) * COLS];
                        x86::forward_rows::<1>(&w[r * k..(r + 1) * k], cols, b, k, dst);
                    }
                }
            }
        });
    Ok(())
}

/// `dcols [K, 16] = W^T g`, for `W [O, K]` and `g [O, 16]`, all row-major and contiguous.
/// Errors as [`forward`].
pub(super) fn input_grad(
    w: &[f32],
    g: &[f32],
    (o, k): (usize, usize),
    threads: usize,
    dcols: &mut [f32],
) -> candle_core::Result<()> {
    let sizes = [
        (w.len(), o * k),
        (g.len(), o * COLS),
        (dcols.len(), k * COLS),
    ];
    check("skinny::input_grad", input_grad_available(), &sizes)?;
    let wide = available();
    let dcols = &mut dcols[..k * COLS];
    dcols.fill(0.0);
    // One range of columns of W per thread, a multiple of BWD_COLS.
    let span = k.div_ceil(threads.max(1)).div_ceil(BWD_COLS) * BWD_COLS;
    dcols
        .par_chunks_mut(span.max(BWD_COLS) * COLS)
        .enumerate()
        .for_each(|(part, dst)| {
            let c0 = part * span.max(BWD_COLS);
            let width = dst.len() / COLS;
            if !wide {
                input_grad_avx2(w, g, (o, k), c0, dst);
                return;
            }
            by_rows(w, g, (o, k), BWD_ROWS, |w, g, whole| {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX-512F is present (checked above); w holds BWD_ROWS rows of
                // `k` (or one when not `whole`), columns c0 .. c0 + width of which exist;
                // g as many rows of 16; dst `width` rows of 16.
                unsafe {
                    if whole {
                        x86::input_grad_rows::<BWD_ROWS>(w, g, k, c0, width, dst);
                    } else {
                        x86::input_grad_rows::<1>(w, g, k, c0, width, dst);
                    }
                }
            });
        });
    Ok(())
}

/// Rows of `W` (and `g`) per pass of the AVX2 input gradient: 4 of `g`'s rows, two
/// vectors each, stay in registers beside 3 columns' accumulators.
const AVX2_ROWS: usize = 4;
/// Columns of the AVX2 input gradient's accumulators per step.
const AVX2_COLS: usize = 3;

/// [`input_grad`]'s part for columns `c0 .. c0 + dst.len() / 16` on AVX2 and FMA: all
/// rows of `W` in groups of [`AVX2_ROWS`], in increasing order (each sum over `O` in order,
/// one fused multiply-add per term, as the AVX-512 kernel's). The caller checked the CPU
/// and the slices' lengths. (Running the rows over spans of 384-4096 columns at a time, to
/// keep the accumulators in L2, was slower: 7.2-7.8 ms against 7.1 at 1280 channels.)
fn input_grad_avx2(w: &[f32], g: &[f32], (o, k): (usize, usize), c0: usize, dst: &mut [f32]) {
    let width = dst.len() / COLS;
    by_rows(w, g, (o, k), AVX2_ROWS, |w, g, whole| {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 and FMA are present (the caller's check); w holds AVX2_ROWS rows of
        // `k` (or one when not `whole`), columns c0 .. c0 + width of which exist; g as
        // many rows of 16; dst `width` rows of 16.
        unsafe {
            if whole {
                avx2::input_grad_rows::<AVX2_ROWS>(w, g, k, c0, width, dst);
            } else {
                avx2::input_grad_rows::<1>(w, g, k, c0, width, dst);
            }
        }
    });
}

/// Runs `pass` over the rows of `W [O, K]` and `g [O, 16]` in increasing order, in groups
/// of `group` rows (`whole` true) and the rows left after the last whole group one at a
/// time (`whole` false).
fn by_rows(
    w: &[f32],
    g: &[f32],
    (o, k): (usize, usize),
    group: usize,
    mut pass: impl FnMut(&[f32], &[f32], bool),
) {
    let mut r0 = 0;
    while r0 < o {
        let rows = group.min(o - r0);
        let (w, g) = (
            &w[r0 * k..(r0 + rows) * k],
            &g[r0 * COLS..(r0 + rows) * COLS],
        );
        if rows == group {
            pass(w, g, true);
        } else {
            for r in 0..rows {
                pass(&w[r * k..(r + 1) * k], &g[r * COLS..(r + 1) * COLS], false);
            }
        }
        r0 += rows;
    }
}

/// The input gradient on AVX2 and FMA: 16 columns as two 256-bit vectors.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::{
        __m256, _mm256_broadcast_ss, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_setzero_ps,
        _mm256_storeu_ps,
    };

    use super::{AVX2_COLS, COLS};

    /// `dst [width, 16] += w[:, c0 .. c0 + width]^T g` for `w [R, k]` and `g [R, 16]`.
    ///
    /// # Safety
    /// AVX2 and FMA; `w` holds R rows of `k` with `c0 + width <= k`, `g` R rows of 16 and
    /// `dst` `width` rows of 16.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn input_grad_rows<const R: usize>(
        w: &[f32],
        g: &[f32],
        k: usize,
        c0: usize,
        width: usize,
        dst: &mut [f32],
    ) {
        let mut gv = [[_mm256_setzero_ps(); 2]; R];
        for (r, v) in gv.iter_mut().enumerate() {
            // SAFETY: row r of g has 16 values.
            unsafe {
                v[0] = _mm256_loadu_ps(g.as_ptr().add(r * COLS));
                v[1] = _mm256_loadu_ps(g.as_ptr().add(r * COLS + 8));
            }
        }
        let (wp, dp) = (w.as_ptr(), dst.as_mut_ptr());
        let full = width / AVX2_COLS * AVX2_COLS;
        let mut c = 0;
        while c < full {
            // SAFETY: columns c0 + c .. c0 + c + 3 of every row of w, and rows c .. c + 3
            // of dst, are in bounds (c + 3 <= width).
            unsafe {
                let mut acc: [[__m256; 2]; AVX2_COLS] = [[_mm256_setzero_ps(); 2]; AVX2_COLS];
                for (j, a) in acc.iter_mut().enumerate() {
                    a[0] = _mm256_loadu_ps(dp.add((c + j) * COLS));
                    a[1] = _mm256_loadu_ps(dp.add((c + j) * COLS + 8));
                }
                for (r, gr) in gv.iter().enumerate() {
                    let row = wp.add(r * k + c0 + c);
                    for (j, a) in acc.iter_mut().enumerate() {
                        let b = _mm256_broadcast_ss(&*row.add(j));
                        a[0] = _mm256_fmadd_ps(b, gr[0], a[0]);
                        a[1] = _mm256_fmadd_ps(b, gr[1], a[1]);
                    }
                }
                for (j, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(dp.add((c + j) * COLS), a[0]);
                    _mm256_storeu_ps(dp.add((c + j) * COLS + 8), a[1]);
                }
            }
            c += AVX2_COLS;
        }
        for c in full..width {
            // SAFETY: as above, for one column.
            unsafe {
                let mut a0 = _mm256_loadu_ps(dp.add(c * COLS));
                let mut a1 = _mm256_loadu_ps(dp.add(c * COLS + 8));
                for (r, gr) in gv.iter().enumerate() {
                    let b = _mm256_broadcast_ss(&*wp.add(r * k + c0 + c));
                    a0 = _mm256_fmadd_ps(b, gr[0], a0);
                    a1 = _mm256_fmadd_ps(b, gr[1], a1);
                }
                _mm256_storeu_ps(dp.add(c * COLS), a0);
                _mm256_storeu_ps(dp.add(c * COLS + 8), a1);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        __m512, _mm512_add_ps, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_setzero_ps,
        _mm512_storeu_ps,
    };

    use super::{BWD_COLS, COLS};

    /// `dst [R, 16] = w [R, k] cols [k, 16] (+ bias)`.
    ///
    /// # Safety
    /// AVX-512F; `w` holds R rows of `k`, `cols` `k` rows of 16, `dst` R rows of 16, and
    /// `bias` (when given) R values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn forward_rows<const R: usize>(
        w: &[f32],
        cols: &[f32],
        bias: Option<&[f32]>,
        k: usize,
        dst: &mut [f32],
    ) {
        let mut acc = [_mm512_setzero_ps(); R];
        let (wp, cp) = (w.as_ptr(), cols.as_ptr());
        for kk in 0..k {
            // SAFETY: row kk of cols and column kk of every row of w are in bounds.
            unsafe {
                let b = _mm512_loadu_ps(cp.add(kk * COLS));
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_set1_ps(*wp.add(r * k + kk)), b, *a);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let v = match bias {
                Some(b) => add_scalar(*a, b[r]),
                None => *a,
            };
            // SAFETY: row r of dst has 16 values.
            unsafe { _mm512_storeu_ps(dst.as_mut_ptr().add(r * COLS), v) };
        }
    }

    /// `a + b` in every lane.
    #[target_feature(enable = "avx512f")]
    fn add_scalar(a: __m512, b: f32) -> __m512 {
        _mm512_add_ps(a, _mm512_set1_ps(b))
    }

    /// `dst [width, 16] += w[:, c0 .. c0 + width]^T g` for `w [R, k]` and `g [R, 16]`.
    ///
    /// # Safety
    /// AVX-512F; `w` holds R rows of `k` with `c0 + width <= k`, `g` R rows of 16 and
    /// `dst` `width` rows of 16.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn input_grad_rows<const R: usize>(
        w: &[f32],
        g: &[f32],
        k: usize,
        c0: usize,
        width: usize,
        dst: &mut [f32],
    ) {
        let mut gv = [_mm512_setzero_ps(); R];
        for (r, v) in gv.iter_mut().enumerate() {
            // SAFETY: row r of g has 16 values.
            *v = unsafe { _mm512_loadu_ps(g.as_ptr().add(r * COLS)) };
        }
        let (wp, dp) = (w.as_ptr(), dst.as_mut_ptr());
        let full = width / BWD_COLS * BWD_COLS;
        let mut c = 0;
        while c < full {
            // SAFETY: columns c0 + c .. c0 + c + 8 of every row of w, and rows c .. c + 8
            // of dst, are in bounds (c + 8 <= width).
            unsafe {
                let mut acc = [_mm512_setzero_ps(); BWD_COLS];
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_loadu_ps(dp.add((c + j) * COLS));
                }
                for (r, gr) in gv.iter().enumerate() {
                    let row = wp.add(r * k + c0 + c);
                    for (j, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(_mm512_set1_ps(*row.add(j)), *gr, *a);
                    }
                }
                for (j, a) in acc.iter().enumerate() {
                    _mm512_storeu_ps(dp.add((c + j) * COLS), *a);
                }
            }
            c += BWD_COLS;
        }
        for c in full..width {
            // SAFETY: as above, for one column.
            unsafe {
                let mut a = _mm512_loadu_ps(dp.add(c * COLS));
                for (r, gr) in gv.iter().enumerate() {
                    a = _mm512_fmadd_ps(_mm512_set1_ps(*wp.add(r * k + c0 + c)), *gr, a);
                }
                _mm512_storeu_ps(dp.add(c * COLS), a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(n: usize, seed: f64) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f64 + 1.0) * 0.7137 + seed).sin() as f32)
            .collect()
    }

    /// Both kernels against f64 sums, at sizes with and without remainders (rows not a
    /// multiple of 20 or 16, columns not a multiple of 8, more threads than columns).
    #[test]
    fn kernels_match_f64_sums() {
        if !input_grad_available() {
            return;
        }
        for (o, k, threads) in [
            (40, 72, 2),
            (23, 19, 2),
            (1, 5, 3),
            (37, 200, 1),
            (16, 8, 4),
            // Rows past whole groups of 4, columns past whole groups of 3.
            (9, 3200, 1),
        ] {
            let w = wave(o * k, 0.3);
            let x = wave(k * COLS, 1.1);
            let bias = wave(o, 2.0);
            let mut out = vec![f32::NAN; o * COLS];
            if available() {
                forward(&w, &x, Some(&bias), (o, k), &mut out).expect("forward");
            }
            for r in (0..o).filter(|_| available()) {
                for p in 0..COLS {
                    let want: f64 = bias[r] as f64
                        + (0..k)
                            .map(|i| w[r * k + i] as f64 * x[i * COLS + p] as f64)
                            .sum::<f64>();
                    let got = out[r * COLS + p] as f64;
                    assert!(
                        (got - want).abs() < 1e-4,
                        "forward {o}x{k} [{r},{p}]: {got} vs {want}"
                    );
                }
            }
            let g = wave(o * COLS, 2.7);
            let mut dcols = vec![f32::NAN; k * COLS];
            input_grad(&w, &g, (o, k), threads, &mut dcols).expect("input grad");
            for c in 0..k {
                for p in 0..COLS {
                    let want: f64 = (0..o)
                        .map(|r| w[r * k + c] as f64 * g[r * COLS + p] as f64)
                        .sum();
                    let got = dcols[c * COLS + p] as f64;
                    assert!(
                        (got - want).abs() < 1e-4,
                        "input grad {o}x{k} [{c},{p}]: {got} vs {want}"
                    );
                }
            }
        }
        // A short operand is an error, not a panic.
        let mut out = vec![0f32; COLS];
        assert!(forward(&[0.0; 3], &[0.0; COLS], None, (1, 4), &mut out).is_err());
        assert!(input_grad(&[0.0; 4], &[0.0; 3], (1, 4), 1, &mut [0.0; 4 * COLS]).is_err());
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    /// The input gradient of SD's 4x4-level convolutions (1280 -> 1280 and 2560 -> 1280
    /// channels), best of 20 calls. Not a test: `cargo test --release --lib
    /// skinny_input_grad_timing -- --ignored --nocapture`.
    #[test]
    #[ignore = "a timing harness, run by hand"]
    fn skinny_input_grad_timing() {
        if !input_grad_available() {
            return;
        }
        for (o, k) in [(1280, 1280 * 9), (1280, 2560 * 9)] {
            let w: Vec<f32> = (0..o * k).map(|i| (i % 7) as f32 * 0.01).collect();
            let g: Vec<f32> = (0..o * COLS).map(|i| (i % 5) as f32 * 0.1).collect();
            let mut out = vec![0f32; k * COLS];
            let mut best = f64::INFINITY;
            for _ in 0..20 {
                let t = std::time::Instant::now();
                input_grad(&w, &g, (o, k), rayon::current_num_threads(), &mut out)
                    .expect("input grad");
                best = best.min(t.elapsed().as_secs_f64());
            }
            let gflops = 2.0 * (o * k * COLS) as f64 / best / 1e9;
            println!("{o} x {k}: {:.2} ms, {gflops:.0} GFLOP/s", best * 1e3);
        }
    }
}
