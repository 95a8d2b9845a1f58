//! Elementwise f32 CPU kernels written for the compiler to vectorise, compiled for AVX-512
//! or AVX2 when the CPU has them ([`multiversion`]): the exponential, the activations and
//! their gradients. The baseline x86-64 build has only SSE2, and `f32::exp` and libm's
//! `erff` are scalar calls, which made GEGLU's two passes cost more than its matrix
//! product's at SD's widths.

/// Generates a function that runs `$body` compiled for AVX-512 or else AVX2 and FMA when
/// the CPU has them: the elementwise loops are written so that the compiler vectorises
/// them, and the baseline x86-64 build only has SSE2. (AVX-512 target features need Rust
/// 1.89, the crate's minimum since gemm's AVX-512 kernels came in; measured in a profile,
/// these loops take about 6% of the kernel's time with AVX-512 and 11% with AVX2.)
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? = $body:ident;) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has AVX-512F, AVX2 and FMA, checked just above.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has AVX2 and FMA, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

/// Whether the CPU has AVX2 and FMA (x86-64), asked once: what the hand-written AVX2
/// kernels need (`winograd::kernel_x86`, `skinny`'s input gradient).
pub(crate) fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2_FMA: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX2_FMA.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `exp(x)` to about one ulp over the range where f32 `exp` is normal, and 0 below it
/// (masked scores are `-inf`): `2^n exp(r)` with `r = x - n ln 2` and Cephes' degree 6
/// polynomial, in branch-free arithmetic that vectorises. The steps are fused
/// multiply-adds (`mul_add`): one instruction each in the [`multiversion`] builds, which
/// have FMA, against a product and a sum (the attention's softmax passes 5-7% faster on
/// the AVX2 machine). Outside them (the baseline build's fallback, the flash kernel's one
/// call per row) an x86-64 `mul_add` is a library call.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = if x < -87.0 { -87.0 } else { x };
    let xc = if xc > 88.0 { 88.0 } else { xc };
    let t = xc.mul_add(LOG2E, ROUND);
    let n = t - ROUND;
    let k = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, xc));
    let p = 1.987_569_1e-4_f32;
    let p = p.mul_add(r, 1.398_199_9e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 1.666_666_5e-1);
    let p = p.mul_add(r, 0.5);
    let y = (p * r).mul_add(r, r) + 1.0;
    let y = y * f32::from_bits(((k + 127) << 23) as u32);
    if x < -87.0 {
        0.0
    } else {
        y
    }
}

pub(crate) use multiversion;

/// Abramowitz and Stegun 7.1.26: `erf(x) = 1 - t (a1 + t (a2 + ...)) exp(-x^2)`,
/// `t = 1 / (1 + p |x|)`, absolute error at most 1.5e-7; torch's vectorised CPU `erf`
/// uses the same formula.
const ERF_P: f32 = 0.327_591_1;
const ERF_A: [f32; 5] = [
    0.254_829_6,
    -0.284_496_74,
    1.421_413_7,
    -1.453_152_1,
    1.061_405_4,
];

/// `(erf(x), exp(-x^2))`: the Gaussian factor comes with the error function for free.
/// Below |x| = 0.5, where `1 - erfc` loses digits in f32, erf's Taylor series to x^13
/// (next term under 5e-10) replaces the formula; both are computed and one selected, so
/// the loop stays branch-free.
#[inline(always)]
fn erf_gauss(x: f32) -> (f32, f32) {
    // 2 / sqrt(pi) times the series' coefficients (-1)^n / (n! (2n + 1)).
    const SERIES: [f32; 7] = [
        std::f32::consts::FRAC_2_SQRT_PI,
        -0.376_126_4,
        0.112_837_92,
        -0.026_866_17,
        0.005_223_977,
        -0.000_854_832_7,
        0.000_120_553_33,
    ];
    let ax = x.abs();
    let t = 1.0 / ERF_P.mul_add(ax, 1.0);
    let poly = ERF_A[4];
    let poly = poly.mul_add(t, ERF_A[3]);
    let poly = poly.mul_add(t, ERF_A[2]);
    let poly = poly.mul_add(t, ERF_A[1]);
    let poly = poly.mul_add(t, ERF_A[0]);
    let x2 = x * x;
    let gauss = exp(-x2);
    let large = (1.0 - poly * t * gauss).copysign(x);
    let series = SERIES[6];
    let series = series.mul_add(x2, SERIES[5]);
    let series = series.mul_add(x2, SERIES[4]);
    let series = series.mul_add(x2, SERIES[3]);
    let series = series.mul_add(x2, SERIES[2]);
    let series = series.mul_add(x2, SERIES[1]);
    let series = series.mul_add(x2, SERIES[0]);
    let small = series * x;
    (if ax < 0.5 { small } else { large }, gauss)
}

/// `erf(x)`.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    erf_gauss(x).0
}

/// `(gelu(x), gelu'(x))` of the exact GELU `x Phi(x)`: `Phi(x) + x phi(x)`.
#[inline(always)]
fn gelu_and_grad(x: f32) -> (f32, f32) {
    // 1 / sqrt(2 pi)
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let (e, gauss) = erf_gauss(x * std::f32::consts::FRAC_1_SQRT_2);
    let cdf = 0.5 * (1.0 + e);
    (x * cdf, cdf + x * INV_SQRT_2PI * gauss)
}

/// The exact GELU, `x Phi(x)`.
#[inline(always)]
pub(crate) fn gelu(x: f32) -> f32 {
    x * 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `d/dx x Phi(x)`.
#[inline(always)]
pub(crate) fn gelu_grad(x: f32) -> f32 {
    gelu_and_grad(x).1
}

/// `x sigmoid(a x)`: SiLU at `a = 1`, CLIP's quick GELU at 1.702.
#[inline(always)]
pub(crate) fn x_sigmoid(x: f32, a: f32) -> f32 {
    x / (1.0 + exp(-a * x))
}

/// `d/dx x sigmoid(a x) = s + a x s (1 - s)`, `s = sigmoid(a x)`.
#[inline(always)]
pub(crate) fn x_sigmoid_grad(x: f32, a: f32) -> f32 {
    let s = 1.0 / (1.0 + exp(-a * x));
    s + a * x * s * (1.0 - s)
}

#[inline(always)]
fn geglu_row_body(out: &mut [f32], a: &[f32], b: &[f32]) {
    for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
        *o = a * gelu(b);
    }
}

#[inline(always)]
fn geglu_grad_row_body(da: &mut [f32], db: &mut [f32], a: &[f32], b: &[f32], g: &[f32]) {
    let rows = da.iter_mut().zip(db.iter_mut()).zip(a).zip(b).zip(g);
    for ((((da, db), &a), &b), &g) in rows {
        let (y, dy) = gelu_and_grad(b);
        *da = g * y;
        *db = g * a * dy;
    }
}

#[inline(always)]
fn map_body(out: &mut [f32], x: &[f32], op: Unary) {
    match op {
        Unary::Gelu => out.iter_mut().zip(x).for_each(|(o, &x)| *o = gelu(x)),
        Unary::XSigmoid(a) => out
            .iter_mut()
            .zip(x)
            .for_each(|(o, &x)| *o = x_sigmoid(x, a)),
    }
}

#[inline(always)]
fn grad_body(out: &mut [f32], g: &[f32], x: &[f32], op: Unary) {
    let it = out.iter_mut().zip(g).zip(x);
    match op {
        Unary::Gelu => it.for_each(|((o, &g), &x)| *o = g * gelu_grad(x)),
        Unary::XSigmoid(a) => it.for_each(|((o, &g), &x)| *o = g * x_sigmoid_grad(x, a)),
    }
}

/// Lanes of the f64 partial sums below: the sums vectorise (a sum in order would not).
const SUM_LANES: usize = 8;

#[inline(always)]
fn sum_body(x: &[f32], shift: f64, squares: bool) -> f64 {
    let mut acc = [0f64; SUM_LANES];
    let body = x.len() / SUM_LANES * SUM_LANES;
    for chunk in x[..body].chunks_exact(SUM_LANES) {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            let d = v as f64 - shift;
            *a += if squares { d * d } else { d };
        }
    }
    for (a, &v) in acc.iter_mut().zip(&x[body..]) {
        let d = v as f64 - shift;
        *a += if squares { d * d } else { d };
    }
    acc.iter().sum()
}

multiversion! {
    /// `Σ (x - shift)` (or, with `squares`, `Σ (x - shift)^2`) in f64, in 8 lanes.
    pub(crate) fn sum_f64(x: &[f32], shift: f64, squares: bool) -> f64 = sum_body;
}

#[inline(always)]
fn norm_silu_body(out: &mut [f32], x: &[f32], scale: f32, shift: f32) {
    for (o, &x) in out.iter_mut().zip(x) {
        *o = x_sigmoid(x * scale + shift, 1.0);
    }
}

multiversion! {
    /// `out = silu(x scale + shift)`: one channel of a group norm followed by SiLU.
    pub(crate) fn norm_silu(out: &mut [f32], x: &[f32], scale: f32, shift: f32) = norm_silu_body;
}

/// The first half of a norm's backward pass over one channel: writes `gs` of each
/// `(g, x)` and returns `(Σ gs, Σ gs xhat)` in f64 lanes, `term` giving `(gs, gs xhat)`.
#[inline(always)]
fn grad_sums(
    out: &mut [f32],
    g: &[f32],
    x: &[f32],
    term: impl Fn(f32, f32) -> (f32, f64),
) -> (f64, f64) {
    let mut sg = [0f64; SUM_LANES];
    let mut sgx = [0f64; SUM_LANES];
    let body = out.len() / SUM_LANES * SUM_LANES;
    let (ob, ot) = out.split_at_mut(body);
    for ((o, gc), xc) in ob
        .chunks_exact_mut(SUM_LANES)
        .zip(g[..body].chunks_exact(SUM_LANES))
        .zip(x[..body].chunks_exact(SUM_LANES))
    {
        for l in 0..SUM_LANES {
            let (gs, gsx) = term(gc[l], xc[l]);
            o[l] = gs;
            sg[l] += gs as f64;
            sgx[l] += gsx;
        }
    }
    for (l, ((o, &g), &x)) in ot.iter_mut().zip(&g[body..]).zip(&x[body..]).enumerate() {
        let (gs, gsx) = term(g, x);
        *o = gs;
        sg[l] += gs as f64;
        sgx[l] += gsx;
    }
    (sg.iter().sum(), sgx.iter().sum())
}

/// One channel of a group norm + SiLU's backward pass, first half: for the normalised
/// value `n = x scale + shift` and `xhat = (x - mean) rstd`, writes `gs = g silu'(n) gamma`
/// and returns `(Σ gs, Σ gs xhat)` in f64.
#[inline(always)]
fn norm_silu_grad_body(
    out: &mut [f32],
    g: &[f32],
    x: &[f32],
    (scale, shift, gamma): (f32, f32, f32),
    (mean, rstd): (f32, f32),
) -> (f64, f64) {
    grad_sums(out, g, x, |g, x| {
        let gs = g * x_sigmoid_grad(x * scale + shift, 1.0) * gamma;
        (gs, (gs * ((x - mean) * rstd)) as f64)
    })
}

multiversion! {
    /// See [`norm_silu_grad_body`].
    pub(crate) fn norm_silu_grad(
        out: &mut [f32],
        g: &[f32],
        x: &[f32],
        affine: (f32, f32, f32),
        stats: (f32, f32)
    ) -> (f64, f64) = norm_silu_grad_body;
}

/// One channel of a group norm's backward pass, first half: writes `gs = g gamma` and
/// returns `(Σ gs, Σ gs xhat)` in f64, `xhat = (x - mean) rstd`.
#[inline(always)]
fn scaled_grad_sums_body(
    out: &mut [f32],
    g: &[f32],
    x: &[f32],
    gamma: f32,
    (mean, rstd): (f32, f32),
) -> (f64, f64) {
    grad_sums(out, g, x, |g, x| {
        let gs = g * gamma;
        (gs, gs as f64 * ((x - mean) * rstd) as f64)
    })
}

multiversion! {
    /// See [`scaled_grad_sums_body`].
    pub(crate) fn scaled_grad_sums(out: &mut [f32], g: &[f32], x: &[f32], gamma: f32, stats: (f32, f32)) -> (f64, f64) =
        scaled_grad_sums_body;
}

/// A layer norm's backward pass over one row, first half: with `gs = g gamma` and
/// `xhat = (x - mean) rstd`, `(Σ gs, Σ gs xhat)` in f64.
#[inline(always)]
fn row_grad_sums_body(g: &[f32], x: &[f32], gamma: &[f32], (mean, rstd): (f32, f32)) -> (f64, f64) {
    let mut sg = [0f64; SUM_LANES];
    let mut sgx = [0f64; SUM_LANES];
    let body = g.len() / SUM_LANES * SUM_LANES;
    let term = |g: f32, x: f32, w: f32| {
        let gs = g * w;
        (gs as f64, gs as f64 * ((x - mean) * rstd) as f64)
    };
    for ((gc, xc), wc) in g[..body]
        .chunks_exact(SUM_LANES)
        .zip(x[..body].chunks_exact(SUM_LANES))
        .zip(gamma[..body].chunks_exact(SUM_LANES))
    {
        for l in 0..SUM_LANES {
            let (a, b) = term(gc[l], xc[l], wc[l]);
            sg[l] += a;
            sgx[l] += b;
        }
    }
    for (l, ((&g, &x), &w)) in g[body..]
        .iter()
        .zip(&x[body..])
        .zip(&gamma[body..])
        .enumerate()
    {
        let (a, b) = term(g, x, w);
        sg[l] += a;
        sgx[l] += b;
    }
    (sg.iter().sum(), sgx.iter().sum())
}

multiversion! {
    /// See [`row_grad_sums_body`].
    pub(crate) fn row_grad_sums(g: &[f32], x: &[f32], gamma: &[f32], stats: (f32, f32)) -> (f64, f64) =
        row_grad_sums_body;
}

/// A layer norm's backward pass over one row, second half: `out = rstd (g gamma - mean_g -
/// xhat mean_gx)` (+ `add`).
#[inline(always)]
fn row_grad_body(
    out: &mut [f32],
    g: &[f32],
    x: &[f32],
    gamma: &[f32],
    (mean, rstd): (f32, f32),
    (mean_g, mean_gx): (f32, f32),
    add: Option<&[f32]>,
) {
    let values = out.iter_mut().zip(g).zip(x).zip(gamma);
    let d = |g: f32, x: f32, w: f32| rstd * (g * w - mean_g - (x - mean) * rstd * mean_gx);
    match add {
        Some(add) => values
            .zip(add)
            .for_each(|((((o, &g), &x), &w), &a)| *o = a + d(g, x, w)),
        None => values.for_each(|(((o, &g), &x), &w)| *o = d(g, x, w)),
    }
}

multiversion! {
    /// See [`row_grad_body`].
    pub(crate) fn row_grad(
        out: &mut [f32],
        g: &[f32],
        x: &[f32],
        gamma: &[f32],
        stats: (f32, f32),
        means: (f32, f32),
        add: Option<&[f32]>
    ) = row_grad_body;
}

#[inline(always)]
fn affine_row_body(
    out: &mut [f32],
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    (mean, rstd): (f32, f32),
) {
    for (((o, &v), &gm), &bt) in out.iter_mut().zip(x).zip(gamma).zip(beta) {
        *o = (v - mean) * rstd * gm + bt;
    }
}

multiversion! {
    /// A layer norm's output row: `(x - mean) rstd gamma + beta`.
    pub(crate) fn affine_row(out: &mut [f32], x: &[f32], gamma: &[f32], beta: &[f32], stats: (f32, f32)) =
        affine_row_body;
}

/// An elementwise activation of [`map`] and [`grad`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Unary {
    /// The exact GELU.
    Gelu,
    /// `x sigmoid(a x)`.
    XSigmoid(f32),
}

multiversion! {
    /// `out = a * gelu(b)`: GEGLU on one row's halves.
    pub(crate) fn geglu_row(out: &mut [f32], a: &[f32], b: &[f32]) = geglu_row_body;
}
multiversion! {
    /// GEGLU's input gradient on one row: `da = g gelu(b)`, `db = g a gelu'(b)`.
    pub(crate) fn geglu_grad_row(da: &mut [f32], db: &mut [f32], a: &[f32], b: &[f32], g: &[f32]) =
        geglu_grad_row_body;
}
multiversion! {
    /// `out = op(x)`.
    pub(crate) fn map(out: &mut [f32], x: &[f32], op: Unary) = map_body;
}
multiversion! {
    /// `out = g op'(x)`.
    pub(crate) fn grad(out: &mut [f32], g: &[f32], x: &[f32], op: Unary) = grad_body;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf and exp against f64 on a dense grid and at the extremes; the vectorised slice
    /// passes equal the scalar formulas on odd lengths.
    #[test]
    fn erf_and_exp_match_f64() {
        let grid: Vec<f32> = (-4000..=4000).map(|i| i as f32 * 0.0025).collect();
        let mut worst = 0f64;
        for &x in grid.iter().chain(&[-100.0, -9.0, 9.0, 100.0]) {
            let want = candle_core::cpu::erf::erf_f64(f64::from(x));
            let got = f64::from(erf(x));
            worst = worst.max((got - want).abs());
            // 1.5e-7 for the formula, plus f32 rounding.
            assert!((got - want).abs() < 4e-7, "erf({x}) = {got}, want {want}");
            if x < -87.0 {
                // Below f32's normal range: flushed to zero.
                assert_eq!(exp(x), 0.0);
                continue;
            }
            if x > 88.0 {
                // Clamped to exp(88) (f32's largest power of e), never infinite.
                assert_eq!(exp(x), exp(88.0));
                continue;
            }
            let want = f64::from(x).exp();
            let got = f64::from(exp(x));
            assert!(
                (got - want).abs() <= 3e-7 * want,
                "exp({x}) = {got}, want {want}"
            );
        }
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        println!("largest erf error {worst:e}");

        let a: Vec<f32> = grid.iter().map(|x| (x * 1.3).sin()).take(1001).collect();
        let b: Vec<f32> = grid.iter().rev().copied().take(1001).collect();
        let mut out = vec![0f32; a.len()];
        geglu_row(&mut out, &a, &b);
        for ((&o, &a), &b) in out.iter().zip(&a).zip(&b) {
            assert_eq!(o, a * gelu(b));
        }
        let (mut da, mut db) = (vec![0f32; a.len()], vec![0f32; a.len()]);
        geglu_grad_row(&mut da, &mut db, &a, &b, &a);
        for (i, (&a, &b)) in a.iter().zip(&b).enumerate() {
            assert_eq!(da[i], a * gelu(b));
            assert_eq!(db[i], a * a * gelu_grad(b));
        }
        for op in [Unary::Gelu, Unary::XSigmoid(1.0), Unary::XSigmoid(1.702)] {
            map(&mut out, &b, op);
            grad(&mut da, &a, &b, op);
            for (i, (&a, &b)) in a.iter().zip(&b).enumerate() {
                let (y, dy) = match op {
                    Unary::Gelu => (gelu(b), gelu_grad(b)),
                    Unary::XSigmoid(s) => (x_sigmoid(b, s), x_sigmoid_grad(b, s)),
                };
                assert_eq!(out[i], y, "{op:?} at {b}");
                assert_eq!(da[i], a * dy, "{op:?}' at {b}");
            }
        }
    }
}
