//! 3x3 convolutions (stride 1, padding 1) on the CPU in f32 by Winograd's minimal
//! filtering, F(2x2, 3x3) (Lavin and Gray 2015, "Fast Algorithms for Convolutional Neural
//! Networks"): each 2x2 block of outputs comes from a 4x4 block of inputs with 16
//! multiplications per channel pair instead of 36, so the matrix products, most of a
//! UNet's resnet blocks, do 2.25x less work than the column (im2col) convolution.
//!
//! The transforms (`B^T d B` of each input block, `G g G^T` of each kernel, `A^T m A` of
//! each product block) use only additions and halvings, exact in binary, so the results
//! differ from a direct convolution by rounding only. The 16 products, one per position of
//! the transformed block, are independent matrix products `M = U V` over the channels, run
//! in parallel.
//!
//! The input gradient of the same convolution is the convolution of the output gradient
//! with the kernel flipped in space and transposed in channels; it runs through the same
//! code with the flip applied inside the kernel transform and the transpose expressed as
//! matrix strides, so no flipped kernel is ever built.

use rayon::prelude::*;

/// Values held at once by the transformed inputs and products of one band of tiles:
/// 16M (64 MiB), as the column convolution's budget.
const BAND_BUDGET: usize = 16 << 20;

/// Output pixels per image from which the Winograd path is taken. Below it the kernel
/// transform, paid on every call, costs more than the products save (the 16x16 and 8x8
/// levels of a UNet, with 1280 channels).
const MIN_PIXELS: usize = 32 * 32;

/// A work buffer of at least the asked length, taken from buffers earlier calls gave
/// back, so that the large transformed inputs and products do not page-fault fresh
/// memory in on every convolution; given back when dropped. Its values are stale: every
/// user writes each value before reading it.
pub(super) struct Scratch {
    buf: Vec<f32>,
    len: usize,
}

/// Buffers given back, at most [`SCRATCH_KEPT`] of them.
static SCRATCH: std::sync::Mutex<Vec<Vec<f32>>> = std::sync::Mutex::new(Vec::new());

/// Buffers kept between convolutions (the kernel, the inputs and the products of one).
const SCRATCH_KEPT: usize = 3;

impl Scratch {
    fn take(len: usize) -> Self {
        let kept = SCRATCH.lock().ok().and_then(|mut pool| {
            // The smallest buffer that is large enough, else the largest (grown).
            let fit = (0..pool.len())
                .filter(|&i| pool[i].len() >= len)
                .min_by_key(|&i| pool[i].len())
                .or_else(|| (0..pool.len()).max_by_key(|&i| pool[i].len()))?;
            Some(pool.swap_remove(fit))
        });
        let mut buf = kept.unwrap_or_default();
        if buf.len() < len {
            buf = vec![0f32; len];
        }
        Self { buf, len }
    }
}

impl std::ops::Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[..self.len]
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf[..self.len]
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if let Ok(mut pool) = SCRATCH.lock() {
            pool.push(buf);
            if pool.len() > SCRATCH_KEPT {
                // Drop the smallest.
                if let Some(i) = (0..pool.len()).min_by_key(|&i| pool[i].len()) {
                    pool.swap_remove(i);
                }
            }
        }
    }
}

/// Whether the Winograd path is on: `SDTI_WINOGRAD=0` in the environment turns it off (the
/// column convolution runs instead), to compare speed or results. Read once.
pub(super) fn enabled() -> bool {
    #[cfg(test)]
    if timing::OFF.with(|off| off.get()) {
        return false;
    }
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("SDTI_WINOGRAD").map_or(true, |v| v.trim() != "0"))
}

/// Whether a convolution of these sizes runs here: 3x3, stride 1, padding 1 (output the
/// size of the input), large enough to pay for the kernel transform.
pub(super) fn applies(
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    h: usize,
    w: usize,
) -> bool {
    (kh, kw, stride, padding) == (3, 3, 1, 1) && h * w >= MIN_PIXELS
}

/// The kernel `[out, in, 3, 3]` transformed, `G g G^T` for every channel pair, laid out
/// `[16, out, in]`; with `flip`, of each 3x3 kernel rotated by 180 degrees (the input
/// gradient's kernel, read transposed by [`conv3x3`]).
pub(super) fn transform_kernel(weight: &[f32], out: usize, inp: usize, flip: bool) -> Scratch {
    let pairs = out * inp;
    let mut u = Scratch::take(16 * pairs);
    // Pairs in chunks, each chunk's 16 slices (one per plane) filled by one task.
    let chunk = 4096;
    let mut tasks: Vec<Vec<&mut [f32]>> = (0..pairs.div_ceil(chunk))
        .map(|_| Vec::with_capacity(16))
        .collect();
    for plane in u.chunks_mut(pairs.max(1)) {
        for (task, part) in tasks.iter_mut().zip(plane.chunks_mut(chunk)) {
            task.push(part);
        }
    }
    tasks
        .into_par_iter()
        .enumerate()
        .for_each(|(j, mut planes)| {
            let first = j * chunk;
            let len = planes.first().map_or(0, |p| p.len());
            for p in 0..len {
                let base = (first + p) * 9;
                let mut g = [0f32; 9];
                g.copy_from_slice(&weight[base..base + 9]);
                if flip {
                    g.reverse();
                }
                let t = kernel_tile(&g);
                for (plane, v) in planes.iter_mut().zip(t) {
                    plane[p] = v;
                }
            }
        });
    u
}

/// `G g G^T` of one 3x3 kernel `g` (row-major), row-major 4x4, with
/// `G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]`.
fn kernel_tile(g: &[f32; 9]) -> [f32; 16] {
    // t = G g (4x3), one column of g at a time.
    let mut t = [0f32; 12];
    for c in 0..3 {
        let (a, b, d) = (g[c], g[3 + c], g[6 + c]);
        t[c] = a;
        t[3 + c] = 0.5 * (a + b + d);
        t[6 + c] = 0.5 * (a - b + d);
        t[9 + c] = d;
    }
    // t G^T (4x4), one row of t at a time.
    let mut u = [0f32; 16];
    for r in 0..4 {
        let (a, b, d) = (t[3 * r], t[3 * r + 1], t[3 * r + 2]);
        u[4 * r] = a;
        u[4 * r + 1] = 0.5 * (a + b + d);
        u[4 * r + 2] = 0.5 * (a - b + d);
        u[4 * r + 3] = d;
    }
    u
}

/// How [`conv3x3`] reads the transformed kernel: `[16, out, in]` as [`transform_kernel`]
/// lays out a convolution's own kernel, or `[16, in, out]` (the kernel of the convolution
/// whose input gradient this is, transformed with `flip`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum KernelLayout {
    OutIn,
    InOut,
}

/// The 3x3, stride 1, padding 1 convolution of `x` (`[b, cin, h, w]`, contiguous) with the
/// transformed kernel `u` (see [`KernelLayout`]), plus `bias` per output channel:
/// `[b, cout, h, w]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv3x3(
    x: &[f32],
    (b, cin, h, w): (usize, usize, usize, usize),
    u: &[f32],
    layout: KernelLayout,
    cout: usize,
    bias: Option<&[f32]>,
    threads: usize,
) -> Vec<f32> {
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let mut y = vec![0f32; b * cout * h * w];
    if y.is_empty() || cin == 0 {
        return y;
    }
    let per_tile_row = 16 * (cin + cout) * tw;
    let band = (BAND_BUDGET / per_tile_row.max(1)).clamp(1, th);
    let mut v = Scratch::take(16 * cin * band * tw);
    let mut m = Scratch::take(16 * cout * band * tw);
    let plane = h * w;
    for bi in 0..b {
        let xs = &x[bi * cin * plane..(bi + 1) * cin * plane];
        let ys = &mut y[bi * cout * plane..(bi + 1) * cout * plane];
        for first in (0..th).step_by(band) {
            let rows = band.min(th - first);
            let tiles = rows * tw;
            let v = &mut v[..16 * cin * tiles];
            let m = &mut m[..16 * cout * tiles];
            transform_input(xs, cin, h, w, first, rows, v);
            products(u, layout, v, m, cin, cout, tiles, threads);
            transform_output(m, cout, h, w, first, rows, bias, ys);
        }
    }
    y
}

/// `B^T d B` of every 4x4 input block of tile rows `first..first + rows`, into `v`
/// (`[16, cin, tiles]`), with `B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0],
/// [0, 1, 0, -1]]`; the padding reads as zeros.
fn transform_input(
    x: &[f32],
    cin: usize,
    h: usize,
    w: usize,
    first: usize,
    rows: usize,
    v: &mut [f32],
) {
    let tw = w.div_ceil(2);
    let tiles = rows * tw;
    let plane_stride = cin * tiles;
    // Each channel writes its own `tiles` values in each of the 16 planes: split `v` into
    // those rows, grouped by channel, and fill the channels in parallel.
    let mut by_channel: Vec<Vec<&mut [f32]>> = (0..cin).map(|_| Vec::with_capacity(16)).collect();
    for plane in v.chunks_mut(plane_stride.max(1)) {
        for (c, row) in plane.chunks_mut(tiles.max(1)).enumerate() {
            if let Some(rows) = by_channel.get_mut(c) {
                rows.push(row);
            }
        }
    }
    by_channel
        .into_par_iter()
        .enumerate()
        .for_each(|(c, mut out)| {
            let src = &x[c * h * w..(c + 1) * h * w];
            // Four padded input rows, read once per tile row.
            let padded = w + 3;
            let mut lines = vec![0f32; 4 * padded];
            for r in 0..rows {
                let top = 2 * (first + r) as isize - 1;
                for (k, line) in lines.chunks_mut(padded).enumerate() {
                    line.fill(0.0);
                    let iy = top + k as isize;
                    if iy >= 0 && (iy as usize) < h {
                        let iy = iy as usize;
                        line[1..1 + w].copy_from_slice(&src[iy * w..(iy + 1) * w]);
                    }
                }
                let (l0, rest) = lines.split_at(padded);
                let (l1, rest) = rest.split_at(padded);
                let (l2, l3) = rest.split_at(padded);
                for tx in 0..tw {
                    let x0 = 2 * tx;
                    // Column transform first: t = B^T d (rows combined), per column.
                    let mut t = [0f32; 16];
                    for j in 0..4 {
                        let (d0, d1, d2, d3) = (l0[x0 + j], l1[x0 + j], l2[x0 + j], l3[x0 + j]);
                        t[j] = d0 - d2;
                        t[4 + j] = d1 + d2;
                        t[8 + j] = d2 - d1;
                        t[12 + j] = d1 - d3;
                    }
                    // Then t B, per row.
                    let at = r * tw + tx;
                    for i in 0..4 {
                        let (a, b, c2, d) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
                        out[4 * i][at] = a - c2;
                        out[4 * i + 1][at] = b + c2;
                        out[4 * i + 2][at] = c2 - b;
                        out[4 * i + 3][at] = b - d;
                    }
                }
            }
        });
}

/// The 16 products `M[xi] = U[xi] V[xi]` (`[cout, cin] x [cin, tiles]`), in parallel, one
/// thread each while there are enough of them.
#[allow(clippy::too_many_arguments)]
fn products(
    u: &[f32],
    layout: KernelLayout,
    v: &[f32],
    m: &mut [f32],
    cin: usize,
    cout: usize,
    tiles: usize,
    threads: usize,
) {
    let (u_rs, u_cs) = match layout {
        KernelLayout::OutIn => (cin as isize, 1),
        KernelLayout::InOut => (1, cout as isize),
    };
    let pairs = cin * cout;
    let one = |xi: usize, dst: &mut [f32], par: gemm::Parallelism| {
        let lhs = &u[xi * pairs..(xi + 1) * pairs];
        let rhs = &v[xi * cin * tiles..(xi + 1) * cin * tiles];
        // SAFETY: the pointers and strides describe `lhs` ([cout, cin]), `rhs`
        // ([cin, tiles], row-major) and `dst` ([cout, tiles], row-major), all in bounds;
        // with `read_dst` false gemm writes every value of `dst` and reads none.
        unsafe {
            gemm::gemm(
                cout,
                tiles,
                cin,
                dst.as_mut_ptr(),
                1,
                tiles as isize,
                false,
                lhs.as_ptr(),
                u_cs,
                u_rs,
                rhs.as_ptr(),
                1,
                tiles as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        }
    };
    let chunk = cout * tiles;
    if threads <= 1 {
        for (xi, dst) in m.chunks_mut(chunk).enumerate() {
            one(xi, dst, gemm::Parallelism::None);
        }
    } else {
        m.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(xi, dst)| one(xi, dst, gemm::Parallelism::None));
    }
}

/// `A^T m A` of every product block, with `A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]`, plus the
/// bias, written to the output pixels of tile rows `first..first + rows` that exist.
#[allow(clippy::too_many_arguments)]
fn transform_output(
    m: &[f32],
    cout: usize,
    h: usize,
    w: usize,
    first: usize,
    rows: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let tw = w.div_ceil(2);
    let tiles = rows * tw;
    let plane_stride = cout * tiles;
    y.par_chunks_mut(h * w).enumerate().for_each(|(o, out)| {
        let add = bias.and_then(|b| b.get(o).copied()).unwrap_or(0.0);
        let at = |xi: usize, t: usize| m[xi * plane_stride + o * tiles + t];
        for r in 0..rows {
            let y0 = 2 * (first + r);
            for tx in 0..tw {
                let t = r * tw + tx;
                // s = A^T m (2x4), then s A (2x2).
                let mut s = [0f32; 8];
                for j in 0..4 {
                    let (a, b, c, d) = (at(j, t), at(4 + j, t), at(8 + j, t), at(12 + j, t));
                    s[j] = a + b + c;
                    s[4 + j] = b - c - d;
                }
                let x0 = 2 * tx;
                for i in 0..2 {
                    let yy = y0 + i;
                    if yy >= h {
                        break;
                    }
                    let (a, b, c, d) = (s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]);
                    out[yy * w + x0] = a + b + c + add;
                    if x0 + 1 < w {
                        out[yy * w + x0 + 1] = b - c - d + add;
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod timing;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, Var};

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .unwrap_or_default()
    }

    fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    /// Odd and even sides, one-pixel images, several bands, batch 2.
    const CASES: &[(usize, usize, usize, usize, usize)] = &[
        (1, 3, 7, 9, 5),
        (2, 4, 8, 8, 6),
        (1, 2, 1, 1, 3),
        (1, 5, 5, 2, 4),
        (2, 3, 13, 11, 2),
    ];

    /// The forward pass equals candle's convolution, with and without bias, one thread
    /// and several.
    #[test]
    fn forward_matches_candle() -> candle_core::Result<()> {
        let d = Device::Cpu;
        for &(b, c, h, w, o) in CASES {
            let x = Tensor::randn(0f32, 1.0, (b, c, h, w), &d)?;
            let k = Tensor::randn(0f32, 1.0, (o, c, 3, 3), &d)?;
            let bias = Tensor::randn(0f32, 1.0, o, &d)?;
            let want = x
                .conv2d(&k, 1, 1, 1, 1)?
                .broadcast_add(&bias.reshape((1, o, 1, 1))?)?;
            let u = transform_kernel(&values(&k), o, c, false);
            for threads in [1, 2] {
                let got = conv3x3(
                    &values(&x),
                    (b, c, h, w),
                    &u,
                    KernelLayout::OutIn,
                    o,
                    Some(&values(&bias)),
                    threads,
                );
                let err = max_rel(&got, &values(&want));
                assert!(
                    err < 1e-5,
                    "{b}x{c}x{h}x{w} -> {o}, {threads} threads: {err}"
                );
            }
        }
        Ok(())
    }

    /// The flipped, transposed kernel gives the input gradient candle's autograd gives.
    #[test]
    fn input_gradient_matches_candle() -> candle_core::Result<()> {
        let d = Device::Cpu;
        for &(b, c, h, w, o) in CASES {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, h, w), &d)?)?;
            let k = Tensor::randn(0f32, 1.0, (o, c, 3, 3), &d)?;
            let y = x.as_tensor().conv2d(&k, 1, 1, 1, 1)?;
            let g = Tensor::randn(0f32, 1.0, y.dims(), &d)?;
            let grads = (y * &g)?.sum_all()?.backward()?;
            let Some(want) = grads.get(x.as_tensor()) else {
                panic!("no gradient for the input");
            };
            let u = transform_kernel(&values(&k), o, c, true);
            let got = conv3x3(
                &values(&g),
                (b, o, h, w),
                &u,
                KernelLayout::InOut,
                c,
                None,
                2,
            );
            let err = max_rel(&got, &values(want));
            assert!(err < 1e-5, "{b}x{c}x{h}x{w} -> {o}: {err}");
        }
        Ok(())
    }

    /// A tiny SD 1.x UNet at 32x32 latents (its top level's convolutions run here) gives
    /// the output and the latent's input gradient the column convolution gives, at the
    /// UNet's parity tolerance (the parity tests against diffusers use 8x8 and 16x16
    /// latents, below [`MIN_PIXELS`]).
    #[test]
    fn unet_matches_the_column_convolution() -> crate::error::Result<()> {
        use crate::model::random::{random_model, tiny_sd1_config};
        let d = Device::Cpu;
        let model = random_model(&tiny_sd1_config(), 5, candle_core::DType::F32, &d)?;
        let x = Tensor::randn(0f32, 1.0, (1, 4, 32, 32), &d)?;
        let context = Tensor::randn(0f32, 1.0, (1, 77, 64), &d)?;
        let mut runs = Vec::new();
        for off in [true, false] {
            super::timing::OFF.with(|o| o.set(off));
            let var = Var::from_tensor(&x)?;
            let y = model.unet.forward(var.as_tensor(), &[500.0], &context)?;
            let grads = y.sqr()?.sum_all()?.backward()?;
            let Some(gx) = grads.get(var.as_tensor()) else {
                panic!("no gradient for the latent");
            };
            runs.push((values(&y), values(gx)));
        }
        super::timing::OFF.with(|o| o.set(false));
        let (column, wino) = (&runs[0], &runs[1]);
        assert!(max_rel(&wino.0, &column.0) < 1e-4, "output");
        assert!(max_rel(&wino.1, &column.1) < 1e-4, "input gradient");
        // The Winograd path did run: its results are not the column path's bit for bit.
        assert_ne!(wino.0, column.0);
        Ok(())
    }

    /// Bands of one tile row give the same values as one band.
    #[test]
    fn bands_agree() {
        let (c, h, w, o) = (3, 9, 7, 4);
        let x: Vec<f32> = (0..c * h * w)
            .map(|i| ((i * 37) % 11) as f32 - 5.0)
            .collect();
        let k: Vec<f32> = (0..o * c * 9)
            .map(|i| ((i * 13) % 7) as f32 - 3.0)
            .collect();
        let u = transform_kernel(&k, o, c, false);
        let whole = conv3x3(&x, (1, c, h, w), &u, KernelLayout::OutIn, o, None, 2);
        // The same computation band by band.
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        let mut y = vec![0f32; o * h * w];
        for first in 0..th {
            let mut v = vec![0f32; 16 * c * tw];
            let mut m = vec![0f32; 16 * o * tw];
            transform_input(&x, c, h, w, first, 1, &mut v);
            products(&u, KernelLayout::OutIn, &v, &mut m, c, o, tw, 1);
            transform_output(&m, o, h, w, first, 1, None, &mut y);
        }
        // Small integers: every sum is exact, so the two agree bit for bit.
        assert_eq!(whole, y);
    }
}
