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

use super::simd;

/// Values held at once by the transformed inputs and products of one band of tiles:
/// 8M (32 MiB). A UNet's convolutions at 512 px fit in one band; the VAE's at 512 px
/// (128 channels) take bands of 7 tile rows, and the budget adds to the encoding's peak.
const BAND_BUDGET: usize = 8 << 20;

/// Where the Winograd path starts and where it takes F(4x4, 3x3) rather than F(2x2, 3x3),
/// by the CPU's vectors ([`sizes`]). A convolution pays the kernel transform on every
/// call, which reads the kernel and writes A*A/9 times as many values (16/9 for F(2x2),
/// 4x for F(4x4)), so Winograd pays only where the image is large against that; the
/// faster the CPU's products against its memory, the larger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sizes {
    /// Output pixels per image from which the Winograd path is taken.
    min_pixels: usize,
    /// Output pixels per image from which it takes F(4x4).
    f4_pixels: usize,
    /// Channel pairs (out times in) up to which it takes F(4x4) from `min_pixels` too.
    f4_small_pairs: usize,
}

/// With AVX-512 (products about 4x as fast as with AVX2 on the machines measured).
/// Measured on the 2-core AVX-512 machine (Sapphire Rapids) with the timing harness, ms
/// forward / input gradient, SD 1.5 at 512 px, before [`Kernel::Blocked`], when the
/// transformed kernel was always whole: 320 channels at 64x64, column 36 / 39, F(2x2) 22 /
/// 22, F(4x4) 15 / 16; 640 at 32x32, column 26 / 26, F(2x2) 20 / 21, F(4x4) 32 / 40; 1280
/// to 640 at 32x32, column 58 / 72, F(2x2) 56 / 59 (42 / 44 in a build that kept its
/// 13M-value transformed kernel, for 50 MiB more at the peak); 1280 at 16x16, column 25 /
/// 27, F(2x2) 48 / 67. F(4x4) also runs from 32x32 for the channel pairs whose transformed
/// kernel (36 values a pair) fits a kept buffer ([`SCRATCH_MAX`]); at 256 px (32x32
/// latents): 320 channels, column 8.3 / 7.7, F(2x2) 7.1 / 7.6, F(4x4) 5.8 / 6.0; 640 to
/// 320, column 15.6 / 14.9, F(2x2) 12.2 / 11.4, F(4x4) 10.9 / 10.2.
const WIDE_VECTORS: Sizes = Sizes {
    min_pixels: 32 * 32,
    f4_pixels: 64 * 64,
    f4_small_pairs: SCRATCH_MAX / 36,
};

/// Without AVX-512 (AVX2 and FMA), measured on a 2-core AMD EPYC (Zen 1, 2 GHz, about 64
/// GFLOP/s at most for both cores, more in its faster hours) with the harness and
/// [`Kernel::Blocked`], ms forward / input gradient, before the kernel transform ran on
/// AVX2 vectors ([`kernel_x86`]): at 16x16, 640 channels, column 27.6 / 27.7, F(2x2) 19.6
/// / 20.9, F(4x4) 21.3 / 20.8; 1280 to 640, column 55.7 / 55.9, F(2x2) 40.8 / 44.8; 1280,
/// column 111.5 / 107.8, F(2x2) 74.0 / 83.5, F(4x4) 84.0 / 84.4; at 32x32, 640 channels,
/// F(2x2) 72.5 / 73.1, F(4x4) 56.6 / 54.3; 1280 to 640, F(2x2) 137.7 / 135.1, F(4x4) 105.7
/// / 103.3; at 8x8, 1280 channels, column 28.3 / 32.3, F(2x2) 31.6 / 36.2. With it, in
/// one later hour: at 16x16, 640 channels, F(2x2) 15.5 / 16.4, F(4x4) 13.6 / 13.9; 1280 to
/// 640, F(2x2) 30.4 / 31.0, F(4x4) 26.2 / 26.3; 1280, F(2x2) 56.6 / 63.6, F(4x4) 49.7 /
/// 53.4; so F(4x4) from 16x16. At 8x8 (1280 channels) F(2x2) won with the harness's
/// kernels (19.4 / 22.5 against the column's 22.6 / 24.6) but not in a step: in a profiled
/// 256 px step the 8x8 level's 2560-channel resnets took 181 + 271 ms against 148 + 170.
/// With the planes of the transforms an odd number of cache lines apart
/// ([`plane_stride`]) and the kernel rows prefetched, F(2x2) at 8x8 takes 16.9 / 20.1 ms
/// against the column's 22.5 / 24.5, and in a step those resnets 119 + 140 ms against
/// 150 + 165 (a 256 px step 4,499 -> 4,392 ms), so Winograd starts at 8x8. At 4x4 the
/// column convolution is far faster (6.3 / 8.5 against F(2x2)'s 13.3 / 16.4).
const NARROW_VECTORS: Sizes = Sizes {
    min_pixels: 8 * 8,
    f4_pixels: 16 * 16,
    f4_small_pairs: 0,
};

/// The sizes for this CPU: [`WIDE_VECTORS`] with AVX-512 and off x86-64 (not measured
/// there), [`NARROW_VECTORS`] on x86-64 without it.
fn sizes() -> Sizes {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if !*AVX512.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f")) {
            return NARROW_VECTORS;
        }
    }
    WIDE_VECTORS
}

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

/// The largest buffer kept: 8M values (32 MiB). Larger ones are freed after use, and the
/// VAE's encoding frees what it kept ([`release_scratch`]), so that they do not stay in
/// the process's memory through training; a UNet step at 512 px keeps about 50 MiB here.
const SCRATCH_MAX: usize = 8 << 20;

/// Frees the buffers kept for later convolutions: after the VAE's encoding, whose buffers
/// are larger than a training step's and would otherwise stay through training.
pub(crate) fn release_scratch() {
    if let Ok(mut pool) = SCRATCH.lock() {
        pool.clear();
    }
}

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
        if buf.len() > SCRATCH_MAX {
            return;
        }
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

/// Which Winograd variant runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Choice {
    Off,
    /// By size ([`Sizes`]).
    Auto,
    F2,
    F4,
}

/// `SDTI_WINOGRAD` in the environment: `0` turns the Winograd path off (the column
/// convolution runs instead), `2` or `4` uses only F(2x2, 3x3) or F(4x4, 3x3) (from
/// the size where Winograd starts, [`Sizes::min_pixels`]); unset or anything else chooses
/// by size. Read once.
fn choice() -> Choice {
    #[cfg(test)]
    if let Some(forced) = timing::FORCE.with(|f| f.get()) {
        return forced;
    }
    static CHOICE: std::sync::OnceLock<Choice> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(
        || match std::env::var("SDTI_WINOGRAD").as_deref().map(str::trim) {
            Ok("0") => Choice::Off,
            Ok("2") => Choice::F2,
            Ok("4") => Choice::F4,
            _ => Choice::Auto,
        },
    )
}

/// Whether the Winograd path is on.
pub(super) fn enabled() -> bool {
    choice() != Choice::Off
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
    #[cfg(test)]
    let min = if timing::ANY_SIZE.with(|a| a.get()) {
        0
    } else {
        sizes().min_pixels
    };
    #[cfg(not(test))]
    let min = sizes().min_pixels;
    (kh, kw, stride, padding) == (3, 3, 1, 1) && h * w >= min
}

/// Which convolution [`conv`] computes with a layer's kernel `[out, in, 3, 3]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Pass {
    /// The layer's own: `x` has `in` channels, the result `out`.
    Forward,
    /// Its input gradient: `x` is the output gradient (`out` channels), the result has
    /// `in`; the kernel is flipped in the transform and read transposed.
    InputGrad,
}

/// What a convolution does besides its product, so that no-gradient passes (the VAE's)
/// need no tensor for a normalised input or for an output before a residual sum.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Fused<'a> {
    /// Per image and input channel (`[b, channels]`), `(scale, shift)`: the input is read
    /// as `silu(x scale + shift)`, a group norm's affine then SiLU ([`simd::norm_silu`],
    /// the same values as the separate pass), the padding still zeros.
    pub norm_silu: Option<&'a [(f32, f32)]>,
    /// Add the convolution to the output's values instead of writing it there.
    pub accumulate: bool,
}

/// A 3x3, stride 1, padding 1 convolution's operands besides its input and output.
#[derive(Clone, Copy)]
pub(super) struct Spec<'a> {
    /// Images, height and width of the input (and of the output).
    pub shape: (usize, usize, usize),
    /// The layer's kernel, `[out, in, 3, 3]`, and its `(out, in)`.
    pub weight: &'a [f32],
    pub channels: (usize, usize),
    /// The layer's own convolution or its input gradient.
    pub pass: Pass,
    /// Added per result channel.
    pub bias: Option<&'a [f32]>,
    pub fused: Fused<'a>,
    pub threads: usize,
}

/// The convolution `spec` describes of `x` (`[b, channels, h, w]`, contiguous), by the
/// variant `SDTI_WINOGRAD` and the size choose ([`choice`]).
pub(super) fn conv(x: &[f32], spec: Spec) -> candle_core::Result<Vec<f32>> {
    let (b, h, w) = spec.shape;
    let (out, inp) = spec.channels;
    let result = match spec.pass {
        Pass::Forward => out,
        Pass::InputGrad => inp,
    };
    let mut y = vec![0f32; b * result * h * w];
    conv_into(x, spec, &mut y)?;
    Ok(y)
}

/// [`conv`] into `y` (`[b, result channels, h, w]`), read and written as `spec.fused`
/// says.
pub(super) fn conv_into(x: &[f32], spec: Spec, y: &mut [f32]) -> candle_core::Result<()> {
    let (_, h, w) = spec.shape;
    let f4 = match choice() {
        Choice::F4 => true,
        Choice::Auto => {
            let (out, inp) = spec.channels;
            let sizes = sizes();
            h * w >= sizes.f4_pixels || out * inp <= sizes.f4_small_pairs
        }
        Choice::F2 | Choice::Off => false,
    };
    if f4 {
        conv_with::<F4, 4, 6>(x, spec, y)
    } else {
        conv_with::<F2, 2, 4>(x, spec, y)
    }
}

/// Tiles (of all images) up to which [`conv_with`] transforms the kernel block by block
/// whatever its size.
const BLOCKED_TILES: usize = 64;

/// [`conv_into`] by variant `V`.
fn conv_with<V: Variant<M, A>, const M: usize, const A: usize>(
    x: &[f32],
    spec: Spec,
    y: &mut [f32],
) -> candle_core::Result<()> {
    let (b, h, w) = spec.shape;
    let (out, inp) = spec.channels;
    let (cin, cout, layout) = match spec.pass {
        Pass::Forward => (inp, out, KernelLayout::OutIn),
        Pass::InputGrad => (out, inp, KernelLayout::InOut),
    };
    let (bias, fused, threads) = (spec.bias, spec.fused, spec.threads);
    // Blocked when the whole transformed kernel would be a fresh allocation on every
    // call, and when there are few tiles: then the whole kernel, written out and read back
    // through memory, took longer than blocks kept in the cache (320 channels at 32x32,
    // 64 tiles: 9.2 / 9.7 -> 8.5 / 9.4 ms forward / input gradient on the AVX2 machine;
    // at 64x64, 256 tiles, 32.4 -> 41.5 ms forward the other way).
    let tiles = b * h.div_ceil(M) * w.div_ceil(M);
    if A * A * out * inp > SCRATCH_MAX || tiles <= BLOCKED_TILES {
        let kernel = Kernel::Blocked {
            weight: spec.weight,
            layout,
            cout,
        };
        return conv3x3_into::<V, M, A>(x, (b, cin, h, w), kernel, bias, fused, threads, y);
    }
    let flip = spec.pass == Pass::InputGrad;
    let u = transform_kernel::<V, M, A>(spec.weight, out, inp, flip);
    let kernel = Kernel::Transformed {
        u: &u,
        layout,
        cout,
    };
    conv3x3_into::<V, M, A>(x, (b, cin, h, w), kernel, bias, fused, threads, y)
}

/// One of Winograd's minimal algorithms F(M x M, 3 x 3): each M x M block of outputs from
/// an A x A block of inputs (A = M + 2), as three 1-D transforms applied to the columns,
/// then the rows, of a block.
pub(super) trait Variant<const M: usize, const A: usize> {
    /// `B^T d` of A inputs.
    fn input(d: [f32; A]) -> [f32; A];
    /// `G g` of a kernel's 3 taps (of one kernel, or of [`KERNEL_LANES`] at once).
    fn kernel<T: Tap>(g: [T; 3]) -> [T; A];
    /// [`transform_kernel`]'s work for one task: the kernels `taps` (9 values each)
    /// transformed into `planes` (one slice per position of the A x A block).
    fn transform_task(taps: &[f32], planes: &mut [&mut [f32]], flip: bool);
    /// `A^T m` of A products.
    fn output(m: [f32; A]) -> [f32; M];
}

/// F(2x2, 3x3): 16 products per 4 outputs, transforms of additions and halvings only.
pub(super) struct F2;

impl Variant<2, 4> for F2 {
    fn input([d0, d1, d2, d3]: [f32; 4]) -> [f32; 4] {
        [d0 - d2, d1 + d2, d2 - d1, d1 - d3]
    }
    // Inlined into the kernel transform compiled for the CPU's vectors
    // (`simd::multiversion`); as a call it ran in the baseline build's SSE2.
    #[inline(always)]
    fn kernel<T: Tap>([g0, g1, g2]: [T; 3]) -> [T; 4] {
        [g0, (g0 + g1 + g2) * 0.5, (g0 - g1 + g2) * 0.5, g2]
    }
    fn transform_task(taps: &[f32], planes: &mut [&mut [f32]], flip: bool) {
        transform_task::<Self, 2, 4>(taps, planes, flip, transform_task_f2);
    }
    fn output([m0, m1, m2, m3]: [f32; 4]) -> [f32; 2] {
        [m0 + m1 + m2, m1 - m2 - m3]
    }
}

/// F(4x4, 3x3): 36 products per 16 outputs (4x fewer than the direct convolution's 144),
/// with the transforms of Lavin and Gray's paper (points 0, 1, -1, 2, -2).
pub(super) struct F4;

impl Variant<4, 6> for F4 {
    fn input([d0, d1, d2, d3, d4, d5]: [f32; 6]) -> [f32; 6] {
        [
            4.0 * d0 - 5.0 * d2 + d4,
            d3 + d4 - 4.0 * (d1 + d2),
            d4 - d3 + 4.0 * (d1 - d2),
            d4 - d2 + 2.0 * (d3 - d1),
            d4 - d2 + 2.0 * (d1 - d3),
            4.0 * d1 - 5.0 * d3 + d5,
        ]
    }
    // Inlined into the kernel transform compiled for the CPU's vectors
    // (`simd::multiversion`); as a call it ran in the baseline build's SSE2. Products
    // with the reciprocals, not divisions: a vector division takes as long as about six
    // products on Zen 1, and nine of them a call were a large part of F(4x4)'s kernel
    // transform (1280 channels at 16x16: 51.6 / 55.8 -> 45.3 / 49.0 ms forward / input
    // gradient on the AVX2 machine). Within an ulp of the divisions' values.
    #[inline(always)]
    fn kernel<T: Tap>([g0, g1, g2]: [T; 3]) -> [T; 6] {
        let (even, odd) = (g0 + g2, g1);
        let (outer, odd2) = (g0 + g2 * 4.0, g1 * 2.0);
        [
            g0 * 0.25,
            (even + odd) * (-1.0 / 6.0),
            (even - odd) * (-1.0 / 6.0),
            (outer + odd2) * (1.0 / 24.0),
            (outer - odd2) * (1.0 / 24.0),
            g2,
        ]
    }
    fn transform_task(taps: &[f32], planes: &mut [&mut [f32]], flip: bool) {
        transform_task::<Self, 4, 6>(taps, planes, flip, transform_task_f4);
    }
    fn output([m0, m1, m2, m3, m4, m5]: [f32; 6]) -> [f32; 4] {
        let (s12, d12, s34, d34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
        [
            m0 + s12 + s34,
            d12 + 2.0 * d34,
            s12 + 4.0 * s34,
            d12 + 8.0 * d34 + m5,
        ]
    }
}

/// The kernel `[out, in, 3, 3]` transformed, `G g G^T` for every channel pair, laid out
/// `[A*A, out, in]`; with `flip`, of each 3x3 kernel rotated by 180 degrees (the input
/// gradient's kernel, read transposed by [`conv3x3`]).
pub(super) fn transform_kernel<V: Variant<M, A>, const M: usize, const A: usize>(
    weight: &[f32],
    out: usize,
    inp: usize,
    flip: bool,
) -> Scratch {
    let pairs = out * inp;
    let stride = plane_stride(pairs);
    let mut u = Scratch::take(A * A * stride);
    // Pairs in chunks, each chunk's A*A slices (one per plane) filled by one task.
    let chunk = 4096;
    let mut tasks: Vec<Vec<&mut [f32]>> = (0..pairs.div_ceil(chunk))
        .map(|_| Vec::with_capacity(A * A))
        .collect();
    for plane in u.chunks_mut(stride) {
        for (task, part) in tasks.iter_mut().zip(plane[..pairs].chunks_mut(chunk)) {
            task.push(part);
        }
    }
    tasks
        .into_par_iter()
        .enumerate()
        .for_each(|(j, mut planes)| {
            let first = j * chunk;
            let len = planes.first().map_or(0, |p| p.len());
            let taps = &weight[first * 9..(first + len) * 9];
            V::transform_task(taps, &mut planes, flip);
        });
    u
}

/// Kernels transformed together by [`transform_kernel`]: a cache line of each plane.
const KERNEL_LANES: usize = 16;

/// What the kernel transform's arithmetic runs on: one value, or [`Lanes`].
pub(super) trait Tap:
    Copy
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::Mul<f32, Output = Self>
{
}

impl Tap for f32 {}

/// One tap of [`KERNEL_LANES`] kernels, transformed together lane by lane: loops the
/// compiler vectorises.
#[derive(Clone, Copy)]
pub(super) struct Lanes([f32; KERNEL_LANES]);

impl Tap for Lanes {}

/// `impl $trait<$rhs> for Lanes`, lane by lane: lane `$i` of `$a` becomes `$e`.
macro_rules! lanes_op {
    ($trait:ident, $method:ident, $rhs:ty, |$a:ident, $r:ident, $i:ident| $e:expr) => {
        impl std::ops::$trait<$rhs> for Lanes {
            type Output = Lanes;
            #[inline(always)]
            fn $method(mut self, $r: $rhs) -> Lanes {
                for ($i, $a) in self.0.iter_mut().enumerate() {
                    *$a = $e;
                }
                self
            }
        }
    };
}

lanes_op!(Add, add, Lanes, |a, r, i| *a + r.0[i]);
lanes_op!(Sub, sub, Lanes, |a, r, i| *a - r.0[i]);
lanes_op!(Mul, mul, f32, |a, r, _i| *a * r);

impl std::ops::Neg for Lanes {
    type Output = Lanes;
    #[inline(always)]
    fn neg(mut self) -> Lanes {
        for a in &mut self.0 {
            *a = -*a;
        }
        self
    }
}

/// A kernel transform over some kernels' taps into the planes ([`Variant::transform_task`]).
type TransformTask = fn(&[f32], &mut [&mut [f32]], bool);

/// [`Variant::transform_task`]: on x86-64 with AVX2 and FMA, the whole groups of eight
/// kernels by [`kernel_x86::transform_task`] and the rest by `portable`; elsewhere all by
/// `portable` (the [`transform_task_body`] of the variant).
fn transform_task<V: Variant<M, A>, const M: usize, const A: usize>(
    taps: &[f32],
    planes: &mut [&mut [f32]],
    flip: bool,
    portable: TransformTask,
) {
    #[cfg(target_arch = "x86_64")]
    if simd::avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA, checked just above.
        let done = unsafe { kernel_x86::transform_task::<V, M, A>(taps, planes, flip) };
        if let Some(rest) = taps.get(done * 9..).filter(|rest| !rest.is_empty()) {
            let mut planes: Vec<&mut [f32]> = planes
                .iter_mut()
                .filter_map(|p| p.get_mut(done..))
                .collect();
            portable(rest, &mut planes, flip);
        }
        return;
    }
    portable(taps, planes, flip);
}

/// [`Variant::transform_task`]: [`KERNEL_LANES`] kernels at a time, `G g G^T` computed
/// lane by lane, each plane written a cache line at a time.
#[inline(always)]
fn transform_task_body<V: Variant<M, A>, const M: usize, const A: usize>(
    taps: &[f32],
    planes: &mut [&mut [f32]],
    flip: bool,
) {
    for (b, kernels) in taps.chunks(9 * KERNEL_LANES).enumerate() {
        let lanes = kernels.len() / 9;
        let mut g = [Lanes([0.0; KERNEL_LANES]); 9];
        for (lane, kernel) in kernels.chunks_exact(9).enumerate() {
            for (tap, &v) in kernel.iter().enumerate() {
                g[if flip { 8 - tap } else { tap }].0[lane] = v;
            }
        }
        let at = b * KERNEL_LANES;
        for (i, row) in kernel_columns::<V, M, A, Lanes>(g).iter().enumerate() {
            for (j, v) in V::kernel(*row).into_iter().enumerate() {
                if let Some(plane) = planes.get_mut(i * A + j) {
                    plane[at..at + lanes].copy_from_slice(&v.0[..lanes]);
                }
            }
        }
    }
}

/// `G g` of a kernel's 9 taps `g` (of one kernel, or of lanes of kernels at once), A rows
/// of 3: the first half of `G g G^T`, whose row i, through [`Variant::kernel`], gives the
/// planes (i, 0..A). (Loops, not closures: the AVX2 transform inlines this, and a
/// closure there was not inlined.)
#[inline(always)]
fn kernel_columns<V: Variant<M, A>, const M: usize, const A: usize, T: Tap>(
    g: [T; 9],
) -> [[T; 3]; A] {
    let mut t = [[g[0]; 3]; A];
    for c in 0..3 {
        let col = V::kernel([g[c], g[3 + c], g[6 + c]]);
        for (row, v) in t.iter_mut().zip(col) {
            row[c] = v;
        }
    }
    t
}

#[inline(always)]
fn transform_task_f2_body(taps: &[f32], planes: &mut [&mut [f32]], flip: bool) {
    transform_task_body::<F2, 2, 4>(taps, planes, flip);
}

#[inline(always)]
fn transform_task_f4_body(taps: &[f32], planes: &mut [&mut [f32]], flip: bool) {
    transform_task_body::<F4, 4, 6>(taps, planes, flip);
}

simd::multiversion! {
    /// [`transform_task_body`] for F(2x2).
    fn transform_task_f2(taps: &[f32], planes: &mut [&mut [f32]], flip: bool) = transform_task_f2_body;
}

simd::multiversion! {
    /// [`transform_task_body`] for F(4x4).
    fn transform_task_f4(taps: &[f32], planes: &mut [&mut [f32]], flip: bool) = transform_task_f4_body;
}

/// How [`conv3x3`] reads the transformed kernel: `[A*A, out, in]` as [`transform_kernel`]
/// lays out a convolution's own kernel, or `[A*A, in, out]` (the kernel of the
/// convolution whose input gradient this is, transformed with `flip`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum KernelLayout {
    OutIn,
    InOut,
}

/// The kernel as [`conv3x3_into`] reads it, with its output channel count.
#[derive(Clone, Copy)]
pub(super) enum Kernel<'a> {
    /// Transformed whole by [`transform_kernel`] (`flip` for [`KernelLayout::InOut`]).
    Transformed {
        u: &'a [f32],
        layout: KernelLayout,
        cout: usize,
    },
    /// The layer's kernel `[out, in, 3, 3]` as it is: the products transform it a block
    /// at a time ([`blocked_products`]), flipped for [`KernelLayout::InOut`], so that no
    /// transformed kernel larger than a block is ever held. For kernels whose whole
    /// transform would not fit a kept buffer ([`SCRATCH_MAX`]): 1280 channels, whose 26M
    /// transformed values (105 MB) were paged in fresh on every call, took as long as
    /// the column convolution's whole product at 16x16.
    Blocked {
        weight: &'a [f32],
        layout: KernelLayout,
        cout: usize,
    },
}

impl Kernel<'_> {
    fn cout(&self) -> usize {
        match *self {
            Kernel::Transformed { cout, .. } | Kernel::Blocked { cout, .. } => cout,
        }
    }
}

/// The 3x3, stride 1, padding 1 convolution of `x` (`[b, cin, h, w]`, contiguous) with the
/// transformed kernel `u` (see [`KernelLayout`]), plus `bias` per output channel:
/// `[b, cout, h, w]` (empty if the sizes disagree).
#[cfg(test)]
fn conv3x3<V: Variant<M, A>, const M: usize, const A: usize>(
    x: &[f32],
    (b, cin, h, w): (usize, usize, usize, usize),
    u: &[f32],
    layout: KernelLayout,
    cout: usize,
    bias: Option<&[f32]>,
    threads: usize,
) -> Vec<f32> {
    let mut y = vec![0f32; b * cout * h * w];
    let kernel = Kernel::Transformed { u, layout, cout };
    let fused = Fused::default();
    conv3x3_into::<V, M, A>(x, (b, cin, h, w), kernel, bias, fused, threads, &mut y)
        .map(|()| y)
        .unwrap_or_default()
}

/// The 3x3, stride 1, padding 1 convolution of `x` (`[b, cin, h, w]`, contiguous) with
/// `kernel`, plus `bias` per output channel, into `y` (`[b, cout, h, w]`), read and
/// written as `fused` says. Band by band of tile rows: the input transform reads the
/// rows of `x` it needs, the output transform writes the band's rows of `y`.
pub(super) fn conv3x3_into<V: Variant<M, A>, const M: usize, const A: usize>(
    x: &[f32],
    (b, cin, h, w): (usize, usize, usize, usize),
    kernel: Kernel,
    bias: Option<&[f32]>,
    fused: Fused,
    threads: usize,
    y: &mut [f32],
) -> candle_core::Result<()> {
    let cout = kernel.cout();
    let (th, tw) = (h.div_ceil(M), w.div_ceil(M));
    let plane = h * w;
    let affine_len = fused.norm_silu.map_or(b * cin, <[_]>::len);
    if y.len() != b * cout * plane || x.len() != b * cin * plane || affine_len != b * cin {
        candle_core::bail!(
            "winograd convolution: {} input, {} output and {affine_len} affine values \
             for [{b}, {cin} -> {cout}, {h}, {w}]",
            x.len(),
            y.len()
        );
    }
    if let Kernel::Blocked { weight, .. } = kernel {
        if weight.len() != cin * cout * 9 {
            candle_core::bail!(
                "winograd convolution: a kernel of {} values for {cin} -> {cout} channels",
                weight.len()
            );
        }
    }
    if y.is_empty() || cin == 0 {
        return Ok(());
    }
    let per_tile_row = A * A * (cin + cout) * tw;
    let band = (BAND_BUDGET / per_tile_row.max(1)).clamp(1, th);
    let mut v = Scratch::take(A * A * plane_stride(cin * band * tw));
    let mut m = Scratch::take(A * A * plane_stride(cout * band * tw));
    for bi in 0..b {
        let xs = &x[bi * cin * plane..(bi + 1) * cin * plane];
        let ys = &mut y[bi * cout * plane..(bi + 1) * cout * plane];
        let affine = fused
            .norm_silu
            .and_then(|a| a.get(bi * cin..(bi + 1) * cin));
        for first in (0..th).step_by(band) {
            let rows = band.min(th - first);
            let tiles = rows * tw;
            let v = &mut v[..A * A * plane_stride(cin * tiles)];
            let m = &mut m[..A * A * plane_stride(cout * tiles)];
            transform_input::<V, M, A>(xs, (cin, h, w), affine, first, rows, v);
            match kernel {
                Kernel::Transformed { u, layout, .. } => {
                    products(u, layout, v, m, cin, cout, tiles, threads);
                }
                Kernel::Blocked { weight, layout, .. } => {
                    blocked_products::<V, M, A>(weight, layout, v, m, (cin, cout, tiles), threads);
                }
            }
            let out = Output {
                bias,
                accumulate: fused.accumulate,
            };
            transform_output::<V, M, A>(m, (cout, h, w), first, rows, out, ys);
        }
    }
    Ok(())
}

/// `B^T d B` of every A x A input block of tile rows `first..first + rows`, into `v`
/// (`[A*A, cin, tiles]`); the padding reads as zeros. With `affine` (per channel), each
/// row read is first taken through `silu(x scale + shift)`.
fn transform_input<V: Variant<M, A>, const M: usize, const A: usize>(
    x: &[f32],
    (cin, h, w): (usize, usize, usize),
    affine: Option<&[(f32, f32)]>,
    first: usize,
    rows: usize,
    v: &mut [f32],
) {
    let tw = w.div_ceil(M);
    let tiles = rows * tw;
    // Each channel writes its own `tiles` values in each of the A*A planes: split `v` into
    // those rows, grouped by channel, and fill the channels in parallel.
    let mut by_channel: Vec<Vec<&mut [f32]>> =
        (0..cin).map(|_| Vec::with_capacity(A * A)).collect();
    for plane in v.chunks_mut(plane_stride(cin * tiles)) {
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
            let affine = affine.and_then(|a| a.get(c).copied());
            // A padded input rows, read once per tile row: one zero on the left, zeros
            // past the right edge up to the last tile's end.
            let padded = tw * M + 2;
            let mut lines = vec![[0f32; A]; padded];
            let mut activated = vec![0f32; if affine.is_some() { w } else { 0 }];
            for r in 0..rows {
                let top = (M * (first + r)) as isize - 1;
                for k in 0..A {
                    let iy = top + k as isize;
                    let row = (iy >= 0 && (iy as usize) < h).then(|| {
                        let row = &src[iy as usize * w..(iy as usize + 1) * w];
                        match affine {
                            Some((scale, shift)) => {
                                simd::norm_silu(&mut activated, row, scale, shift);
                                &activated[..]
                            }
                            None => row,
                        }
                    });
                    for (xx, column) in lines.iter_mut().enumerate() {
                        column[k] = match row {
                            Some(row) if xx >= 1 && xx <= w => row[xx - 1],
                            _ => 0.0,
                        };
                    }
                }
                for tx in 0..tw {
                    let x0 = M * tx;
                    // Columns first: t = B^T d, one column of the block at a time.
                    let mut t = [[0f32; A]; A];
                    for j in 0..A {
                        for (i, v) in V::input(lines[x0 + j]).into_iter().enumerate() {
                            t[i][j] = v;
                        }
                    }
                    // Then t B, row by row.
                    let at = r * tw + tx;
                    for (i, row) in t.into_iter().enumerate() {
                        for (j, v) in V::input(row).into_iter().enumerate() {
                            out[i * A + j][at] = v;
                        }
                    }
                }
            }
        });
}

/// The products `M[xi] = U[xi] V[xi]` (`[cout, cin] x [cin, tiles]`), one per position
/// of the transformed block, in parallel, one thread each.
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
    let (us, vs) = (plane_stride(pairs), plane_stride(cin * tiles));
    let one = |xi: usize, dst: &mut [f32]| {
        let lhs = &u[xi * us..xi * us + pairs];
        let rhs = &v[xi * vs..xi * vs + cin * tiles];
        let dst = &mut dst[..cout * tiles];
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
                gemm::Parallelism::None,
            );
        }
    };
    let chunk = plane_stride(cout * tiles);
    if threads <= 1 {
        for (xi, dst) in m.chunks_mut(chunk).enumerate() {
            one(xi, dst);
        }
    } else {
        m.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(xi, dst)| one(xi, dst));
    }
}

/// Transformed kernel values of one block of [`blocked_products`]: 256K (1 MiB), per
/// thread.
const BLOCK_VALUES: usize = 1 << 18;

/// Result channels of one task of [`blocked_products`], at most, by [`KernelLayout`]:
/// a layer's own convolution reads a run of `BLOCK_VALUES / (A*A rows)` kernels from each
/// of its rows, the input gradient a run of `rows` kernels, so the input gradient takes
/// more rows and the forward pass fewer, for longer runs (2-9 KB) than 64 rows each gave.
/// `winograd_step_timing` (AVX2 machine), ms forward / input gradient, 64 rows each
/// against these: F(2x2) at 8x8, 1280 channels, 15.4 / 18.9 -> 14.7 / 17.6; F(4x4) at
/// 16x16, 1280 channels, 35.6 / 39.3 -> 32.9 / 37.5; 640 channels 9.5 / 10.0 -> 8.9 / 10.2;
/// at 32x32, 1280 to 640, 62.5 / 65.4 -> 64.7 / 63.6. 16 rows forward was faster at
/// 16x16 and below but slower at 32x32 (73 ms); 256 rows for the input gradient slower.
const BLOCK_ROWS_FORWARD: usize = 32;
const BLOCK_ROWS_INPUT_GRAD: usize = 128;

thread_local! {
    /// Each thread's buffer for the kernel blocks of [`blocked_products`], kept between
    /// calls (at most [`BLOCK_VALUES`]: A*A x the rows x the chunk).
    static BLOCK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`products`] for [`Kernel::Blocked`]: `m[xi] = U[xi] v[xi]` with `U` transformed from
/// `weight` (`[out, in, 3, 3]`, flipped for [`KernelLayout::InOut`]) a block at a time.
/// The result channels are cut into ranges of at most [`BLOCK_ROWS_FORWARD`] or
/// [`BLOCK_ROWS_INPUT_GRAD`], several per thread; a task runs through the reduction
/// channels in chunks, transforms that block of the kernel into its thread's buffer and
/// adds the block's A*A products into its rows of `m`. The chunk length depends on A and
/// the layout alone, so the sums, and their bits, do not depend on the thread count (nor
/// does gemm's `k` blocking, which depends on `k` alone).
fn blocked_products<V: Variant<M, A>, const M: usize, const A: usize>(
    weight: &[f32],
    layout: KernelLayout,
    v: &[f32],
    m: &mut [f32],
    (cin, cout, tiles): (usize, usize, usize),
    threads: usize,
) {
    if cin == 0 || cout == 0 || tiles == 0 {
        return;
    }
    let block_rows = match layout {
        KernelLayout::OutIn => BLOCK_ROWS_FORWARD,
        KernelLayout::InOut => BLOCK_ROWS_INPUT_GRAD,
    };
    let range = cout
        .div_ceil(4 * threads.max(1))
        .div_ceil(8)
        .saturating_mul(8)
        .clamp(8, block_rows);
    // A multiple of 8: whole groups of the kernel transform's vectors.
    let chunk = (BLOCK_VALUES / (A * A * block_rows) / 8 * 8).max(8);
    // Each task's rows of every plane of m.
    let mut tasks: Vec<Vec<&mut [f32]>> = (0..cout.div_ceil(range))
        .map(|_| Vec::with_capacity(A * A))
        .collect();
    for plane in m.chunks_mut(plane_stride(cout * tiles)) {
        for (task, part) in tasks
            .iter_mut()
            .zip(plane[..cout * tiles].chunks_mut(range * tiles))
        {
            task.push(part);
        }
    }
    let vs = plane_stride(cin * tiles);
    let run = |t: usize, mut dst: Vec<&mut [f32]>| {
        let r0 = t * range;
        let rows = dst.first().map_or(0, |d| d.len() / tiles);
        BLOCK.with(|buf| {
            let mut buf = buf.borrow_mut();
            if buf.len() < A * A * plane_stride(rows * chunk) {
                buf.resize(A * A * plane_stride(rows * chunk), 0.0);
            }
            for (step, c0) in (0..cin).step_by(chunk).enumerate() {
                let cols = chunk.min(cin - c0);
                let ps = plane_stride(rows * cols);
                let block = &mut buf[..A * A * ps];
                transform_block::<V, M, A>(
                    weight,
                    layout,
                    (r0, rows),
                    (c0, cols),
                    (cin, cout),
                    block,
                );
                for (xi, d) in dst.iter_mut().enumerate() {
                    let lhs = &block[xi * ps..xi * ps + rows * cols];
                    let (lhs_rs, lhs_cs) = match layout {
                        KernelLayout::OutIn => (cols as isize, 1),
                        KernelLayout::InOut => (1, rows as isize),
                    };
                    let rhs = &v[xi * vs + c0 * tiles..xi * vs + (c0 + cols) * tiles];
                    // SAFETY: the pointers and strides describe `lhs` ([rows, cols]),
                    // `rhs` ([cols, tiles], row-major) and `d` ([rows, tiles], row-major),
                    // all in bounds; the first chunk writes every value of `d` and reads
                    // none, the later ones add to it.
                    unsafe {
                        gemm::gemm(
                            rows,
                            tiles,
                            cols,
                            d.as_mut_ptr(),
                            1,
                            tiles as isize,
                            step > 0,
                            lhs.as_ptr(),
                            lhs_cs,
                            lhs_rs,
                            rhs.as_ptr(),
                            1,
                            tiles as isize,
                            1.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                }
            }
        });
    };
    if threads <= 1 {
        for (t, dst) in tasks.into_iter().enumerate() {
            run(t, dst);
        }
    } else {
        tasks
            .into_par_iter()
            .enumerate()
            .for_each(|(t, dst)| run(t, dst));
    }
}

/// The block of the transformed kernel that [`blocked_products`] multiplies: result
/// channels `r0..r0 + rows` and reduction channels `c0..c0 + cols` of the convolution
/// (`cin -> cout`), as A*A planes in `block`. [`KernelLayout::OutIn`] (the layer's own
/// convolution) plane by plane `[rows, cols]`; [`KernelLayout::InOut`] (its input
/// gradient, `weight` read `[cin, cout]`, flipped) `[cols, rows]`: either way one run of
/// the layer's kernel pairs per plane row, as [`transform_kernel`] writes them.
fn transform_block<V: Variant<M, A>, const M: usize, const A: usize>(
    weight: &[f32],
    layout: KernelLayout,
    (r0, rows): (usize, usize),
    (c0, cols): (usize, usize),
    (cin, cout): (usize, usize),
    block: &mut [f32],
) {
    let flip = layout == KernelLayout::InOut;
    // The layer's kernel rows (its out channels) in the block, the run of pairs each
    // takes, and the layer's in channel count.
    let (first_out, outs, first_in, width, inp) = match layout {
        KernelLayout::OutIn => (r0, rows, c0, cols, cin),
        KernelLayout::InOut => (c0, cols, r0, rows, cout),
    };
    let ps = plane_stride(outs * width);
    // What is left of each plane; each row takes its run off the front (no allocation a
    // row: a block has up to 128 rows).
    let mut rest: Vec<&mut [f32]> = block
        .chunks_mut(ps)
        .map(|p| &mut p[..outs * width])
        .collect();
    let mut parts: Vec<&mut [f32]> = Vec::with_capacity(A * A);
    let run = |o: usize| &weight[(o * inp + first_in) * 9..(o * inp + first_in + width) * 9];
    for row in 0..outs {
        let o = first_out + row;
        let taps = run(o);
        #[cfg(target_arch = "x86_64")]
        if row + 1 < outs {
            kernel_x86::prefetch_start(run(o + 1));
        }
        parts.clear();
        for plane in rest.iter_mut() {
            let (head, tail) = std::mem::take(plane).split_at_mut(width);
            parts.push(head);
            *plane = tail;
        }
        V::transform_task(taps, &mut parts, flip);
    }
}

/// The distance between the planes of a buffer of A*A planes of `len` values: `len`
/// rounded up to whole cache lines (16 values), plus one line when that is an even number
/// of lines. Planes a multiple of 4 KiB apart fall into one set of the L1 cache (64 sets of
/// 8 lines), so writing or reading the same place in 16 or 36 planes at once would evict
/// its own lines; an odd number of lines apart, up to 64 planes fall into different sets.
fn plane_stride(len: usize) -> usize {
    let lines = len.div_ceil(16);
    16 * (lines | 1)
}

/// How [`transform_output`] writes: the bias per output channel, and whether it adds to
/// the output's values.
#[derive(Clone, Copy, Default)]
struct Output<'a> {
    bias: Option<&'a [f32]>,
    accumulate: bool,
}

/// `A^T m A` of every product block, plus the bias, written to (or added to) the output
/// pixels of tile rows `first..first + rows` that exist.
fn transform_output<V: Variant<M, A>, const M: usize, const A: usize>(
    m: &[f32],
    (cout, h, w): (usize, usize, usize),
    first: usize,
    rows: usize,
    Output { bias, accumulate }: Output,
    y: &mut [f32],
) {
    let tw = w.div_ceil(M);
    let tiles = rows * tw;
    let stride = plane_stride(cout * tiles);
    y.par_chunks_mut(h * w).enumerate().for_each(|(o, out)| {
        let add = bias.and_then(|b| b.get(o).copied()).unwrap_or(0.0);
        let base = o * tiles;
        for r in 0..rows {
            let y0 = M * (first + r);
            for tx in 0..tw {
                let t = base + r * tw + tx;
                // s = A^T m (M x A), column by column; then s A (M x M), row by row.
                let mut s = [[0f32; A]; M];
                for j in 0..A {
                    let mut col = [0f32; A];
                    for (k, c) in col.iter_mut().enumerate() {
                        *c = m[(k * A + j) * stride + t];
                    }
                    for (i, v) in V::output(col).into_iter().enumerate() {
                        s[i][j] = v;
                    }
                }
                let x0 = M * tx;
                let cols = M.min(w - x0);
                for (i, row) in s.into_iter().enumerate() {
                    let yy = y0 + i;
                    if yy >= h {
                        break;
                    }
                    let dst = &mut out[yy * w + x0..yy * w + x0 + cols];
                    if accumulate {
                        for (d, v) in dst.iter_mut().zip(V::output(row)) {
                            *d += v + add;
                        }
                    } else {
                        for (d, v) in dst.iter_mut().zip(V::output(row)) {
                            *d = v + add;
                        }
                    }
                }
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod kernel_x86;

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

    /// Odd and even sides, one-pixel images, several bands, batch 2; the last has more
    /// kernel pairs than one kernel-transform task takes (4096), in a partial lane block.
    const CASES: &[(usize, usize, usize, usize, usize)] = &[
        (1, 3, 7, 9, 5),
        (2, 4, 8, 8, 6),
        (1, 2, 1, 1, 3),
        (1, 5, 5, 2, 4),
        (2, 3, 13, 11, 2),
        (1, 70, 5, 6, 61),
        // More tiles than BLOCKED_TILES for both variants: the whole kernel transform.
        (1, 3, 34, 36, 5),
    ];

    /// Both variants' forward pass equals candle's convolution, with and without bias,
    /// one thread and several.
    #[test]
    fn forward_matches_candle() -> candle_core::Result<()> {
        let d = Device::Cpu;
        for choice in [Choice::F2, Choice::F4] {
            super::timing::FORCE.with(|f| f.set(Some(choice)));
            for &(b, c, h, w, o) in CASES {
                let x = Tensor::randn(0f32, 1.0, (b, c, h, w), &d)?;
                let k = Tensor::randn(0f32, 1.0, (o, c, 3, 3), &d)?;
                let bias = Tensor::randn(0f32, 1.0, o, &d)?;
                let want = x
                    .conv2d(&k, 1, 1, 1, 1)?
                    .broadcast_add(&bias.reshape((1, o, 1, 1))?)?;
                for threads in [1, 2] {
                    let (x, k, bias) = (values(&x), values(&k), values(&bias));
                    let spec = Spec {
                        shape: (b, h, w),
                        weight: &k,
                        channels: (o, c),
                        pass: Pass::Forward,
                        bias: Some(&bias),
                        fused: Fused::default(),
                        threads,
                    };
                    let got = conv(&x, spec)?;
                    let err = max_rel(&got, &values(&want));
                    assert!(
                        err < 1e-5,
                        "{choice:?} {b}x{c}x{h}x{w} -> {o}, {threads} threads: {err}"
                    );
                }
            }
        }
        super::timing::FORCE.with(|f| f.set(None));
        Ok(())
    }

    /// The flipped, transposed kernel gives the input gradient candle's autograd gives.
    #[test]
    fn input_gradient_matches_candle() -> candle_core::Result<()> {
        let d = Device::Cpu;
        for choice in [Choice::F2, Choice::F4] {
            super::timing::FORCE.with(|f| f.set(Some(choice)));
            for &(b, c, h, w, o) in CASES {
                let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, h, w), &d)?)?;
                let k = Tensor::randn(0f32, 1.0, (o, c, 3, 3), &d)?;
                let y = x.as_tensor().conv2d(&k, 1, 1, 1, 1)?;
                let g = Tensor::randn(0f32, 1.0, y.dims(), &d)?;
                let grads = (y * &g)?.sum_all()?.backward()?;
                let Some(want) = grads.get(x.as_tensor()) else {
                    panic!("no gradient for the input");
                };
                let k = values(&k);
                let spec = Spec {
                    shape: (b, h, w),
                    weight: &k,
                    channels: (o, c),
                    pass: Pass::InputGrad,
                    bias: None,
                    fused: Fused::default(),
                    threads: 2,
                };
                let got = conv(&values(&g), spec)?;
                let err = max_rel(&got, &values(want));
                assert!(err < 1e-5, "{choice:?} {b}x{c}x{h}x{w} -> {o}: {err}");
            }
        }
        super::timing::FORCE.with(|f| f.set(None));
        Ok(())
    }

    /// A tiny SD 1.x UNet at 64x64 latents (its two top levels' convolutions run here) gives
    /// the output and the latent's input gradient the column convolution gives, at the
    /// UNet's parity tolerance (the parity tests against diffusers use 8x8 and 16x16
    /// latents, below [`Sizes::min_pixels`] with AVX-512).
    #[test]
    fn unet_matches_the_column_convolution() -> crate::error::Result<()> {
        use crate::model::random::{random_model, tiny_sd1_config};
        let d = Device::Cpu;
        let model = random_model(&tiny_sd1_config(), 5, candle_core::DType::F32, &d)?;
        let x = Tensor::randn(0f32, 1.0, (1, 4, 64, 64), &d)?;
        let context = Tensor::randn(0f32, 1.0, (1, 77, 64), &d)?;
        let mut runs = Vec::new();
        for choice in [Choice::Off, Choice::F2, Choice::F4, Choice::Auto] {
            super::timing::FORCE.with(|f| f.set(Some(choice)));
            let var = Var::from_tensor(&x)?;
            let y = model.unet.forward(var.as_tensor(), &[500.0], &context)?;
            let grads = y.sqr()?.sum_all()?.backward()?;
            let Some(gx) = grads.get(var.as_tensor()) else {
                panic!("no gradient for the latent");
            };
            runs.push((values(&y), values(gx)));
        }
        super::timing::FORCE.with(|f| f.set(None));
        let column = &runs[0];
        for (name, wino) in [("F2", &runs[1]), ("F4", &runs[2]), ("auto", &runs[3])] {
            assert!(max_rel(&wino.0, &column.0) < 1e-4, "{name}: output");
            assert!(max_rel(&wino.1, &column.1) < 1e-4, "{name}: input gradient");
            // The Winograd path did run: its results are not the column path's bit for bit.
            assert_ne!(wino.0, column.0, "{name}");
        }
        Ok(())
    }

    /// The kernel transformed block by block gives the whole transform's results, for the
    /// convolution and its input gradient, with several reduction chunks and a partial
    /// range of result channels, and the same bits on one thread and two.
    #[test]
    fn blocked_kernel_matches_the_whole_transform() {
        blocked_matches_for::<F2, 2, 4>();
        blocked_matches_for::<F4, 4, 6>();
    }

    fn blocked_matches_for<V: Variant<M, A>, const M: usize, const A: usize>() {
        let (c, h, w, o) = (300, 5, 6, 70);
        // Values in [-1, 1) from a multiplicative hash, which do not cancel in the sums.
        let spread =
            |i: usize, seed: usize| ((i * 2_654_435_761 + seed) % 2000) as f32 / 1000.0 - 1.0;
        let k: Vec<f32> = (0..o * c * 9).map(|i| spread(i, 7)).collect();
        for (pass, cin, cout) in [(Pass::Forward, c, o), (Pass::InputGrad, o, c)] {
            let x: Vec<f32> = (0..cin * h * w).map(|i| spread(i, 3)).collect();
            let (layout, flip) = match pass {
                Pass::Forward => (KernelLayout::OutIn, false),
                Pass::InputGrad => (KernelLayout::InOut, true),
            };
            let u = transform_kernel::<V, M, A>(&k, o, c, flip);
            let whole = conv3x3::<V, M, A>(&x, (1, cin, h, w), &u, layout, cout, None, 2);
            let mut runs = Vec::new();
            for threads in [1, 2] {
                let mut y = vec![f32::NAN; cout * h * w];
                let kernel = Kernel::Blocked {
                    weight: &k,
                    layout,
                    cout,
                };
                conv3x3_into::<V, M, A>(
                    &x,
                    (1, cin, h, w),
                    kernel,
                    None,
                    Fused::default(),
                    threads,
                    &mut y,
                )
                .expect("blocked convolution");
                // Rounding only: F(4x4)'s transforms scale values by up to 8 (the whole
                // transform and the column convolution differ as much).
                let err = max_rel(&y, &whole);
                let tolerance = if A == 4 { 1e-5 } else { 1e-4 };
                assert!(err < tolerance, "{pass:?} A={A}, {threads} threads: {err}");
                runs.push(y);
            }
            assert_eq!(runs[0], runs[1], "{pass:?} A={A}: threads changed the bits");
            // A kernel of the wrong length is an error, not a panic.
            let short = Kernel::Blocked {
                weight: &k[..k.len() - 1],
                layout,
                cout,
            };
            let mut y = vec![0f32; cout * h * w];
            let fused = Fused::default();
            let run = conv3x3_into::<V, M, A>(&x, (1, cin, h, w), short, None, fused, 2, &mut y);
            assert!(run.is_err(), "{pass:?} A={A}: a short kernel was taken");
        }
    }

    /// The kernel transform as [`Variant::transform_task`] runs it (on AVX2 vectors where
    /// the CPU has them, the kernels past the last whole group portably) writes the
    /// portable transform's bits, flipped or not, for both variants.
    #[test]
    fn kernel_transform_matches_the_portable_one() {
        kernel_transform_matches_for::<F2, 2, 4>(transform_task_f2_body);
        kernel_transform_matches_for::<F4, 4, 6>(transform_task_f4_body);
    }

    fn kernel_transform_matches_for<V: Variant<M, A>, const M: usize, const A: usize>(
        portable: TransformTask,
    ) {
        // 8 groups of 8 and a partial one, values with many bits set.
        let kernels = 69;
        let taps: Vec<f32> = (0..kernels * 9)
            .map(|i| ((i * 2_654_435_761) % 2003) as f32 / 997.0 - 1.0)
            .collect();
        for flip in [false, true] {
            let run = |f: TransformTask| {
                let mut u = vec![f32::NAN; A * A * kernels];
                let mut planes: Vec<&mut [f32]> = u.chunks_mut(kernels).collect();
                f(&taps, &mut planes, flip);
                u
            };
            let got = run(V::transform_task);
            let want = run(portable);
            assert!(
                got.iter().all(|v| v.is_finite()),
                "A={A}: a value not written"
            );
            let (got, want): (Vec<u32>, Vec<u32>) = (
                got.iter().map(|v| v.to_bits()).collect(),
                want.iter().map(|v| v.to_bits()).collect(),
            );
            assert_eq!(got, want, "A={A}, flip {flip}");
        }
    }

    /// Bands of one tile row give the same values as one band, for both variants.
    #[test]
    fn bands_agree() {
        bands_agree_for::<F2, 2, 4>();
        bands_agree_for::<F4, 4, 6>();
    }

    fn bands_agree_for<V: Variant<M, A>, const M: usize, const A: usize>() {
        let (c, h, w, o) = (3, 9, 7, 4);
        let x: Vec<f32> = (0..c * h * w)
            .map(|i| ((i * 37) % 11) as f32 - 5.0)
            .collect();
        let k: Vec<f32> = (0..o * c * 9)
            .map(|i| ((i * 13) % 7) as f32 - 3.0)
            .collect();
        let u = transform_kernel::<V, M, A>(&k, o, c, false);
        let whole = conv3x3::<V, M, A>(&x, (1, c, h, w), &u, KernelLayout::OutIn, o, None, 2);
        // The same computation band by band (one thread: the same products in order).
        let (th, tw) = (h.div_ceil(M), w.div_ceil(M));
        let mut y = vec![0f32; o * h * w];
        for first in 0..th {
            let mut v = vec![0f32; A * A * plane_stride(c * tw)];
            let mut m = vec![0f32; A * A * plane_stride(o * tw)];
            transform_input::<V, M, A>(&x, (c, h, w), None, first, 1, &mut v);
            products(&u, KernelLayout::OutIn, &v, &mut m, c, o, tw, 1);
            let out = Output::default();
            transform_output::<V, M, A>(&m, (o, h, w), first, 1, out, &mut y);
        }
        assert_eq!(whole, y);
    }
}
