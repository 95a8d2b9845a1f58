//! Activations with their own input gradients: SiLU, quick GELU, erf GELU and GEGLU.

use candle_core::Tensor;

use super::cpu::{is_cpu_f32, map_cpu, with_f32, zip_cpu};
use super::custom_op::input_grad_only_saving;
use super::simd::{self, Unary};
use crate::error::Result;

/// `x * sigmoid(x)`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    let forward = |x: &Tensor| Ok((x.silu()?, ()));
    let backward = |g: &Tensor, x: &Tensor, _: &Tensor, _: &()| silu_grad(g, x);
    Ok(input_grad_only_saving("silu", x, forward, backward)?)
}

/// SiLU off the graph (in parallel on the CPU in f32: candle's unary op runs on one
/// thread there).
pub(crate) fn silu_apply(x: &Tensor) -> candle_core::Result<Tensor> {
    if is_cpu_f32(&[x]) {
        return map_cpu(x, |o, x| simd::map(o, x, Unary::XSigmoid(1.0)));
    }
    x.silu()
}

/// The input gradient of SiLU at `x` for the output gradient `g`:
/// `g * s (1 + x (1 - s))`, `s = sigmoid(x)`.
pub(crate) fn silu_grad(g: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
    if is_cpu_f32(&[g, x]) {
        return zip_cpu(g, x, |o, g, x| simd::grad(o, g, x, Unary::XSigmoid(1.0)));
    }
    #[cfg(feature = "cuda")]
    if crate::gpu::fusable(&[g, x]) {
        return crate::gpu::silu_backward(g, x);
    }
    let s = candle_nn::ops::sigmoid(x)?;
    let d = (&s * ((x * (1.0 - &s)?)? + 1.0)?)?;
    g * d
}

/// The constant of CLIP's quick GELU, `x * sigmoid(1.702 x)` (a sigmoid fit of the erf
/// GELU, from the GELU paper).
pub const QUICK_GELU_ALPHA: f64 = 1.702;

/// CLIP's quick GELU as an elementwise CPU pass.
const QUICK_GELU: Unary = Unary::XSigmoid(QUICK_GELU_ALPHA as f32);

/// The activations of feed-forward layers, with their input gradients off the graph (the
/// block-level ops call these directly).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// CLIP's `x * sigmoid(1.702 x)`.
    QuickGelu,
    /// The exact (erf) GELU.
    GeluErf,
}

impl Activation {
    /// The activation of a tensor off the graph.
    pub(crate) fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::QuickGelu if is_cpu_f32(&[x]) => {
                map_cpu(x, |o, x| simd::map(o, x, QUICK_GELU))
            }
            #[cfg(feature = "cuda")]
            Activation::QuickGelu if crate::gpu::fusable(&[x]) => crate::gpu::quick_gelu_forward(x),
            Activation::QuickGelu => {
                let s = candle_nn::ops::sigmoid(&(x * QUICK_GELU_ALPHA)?)?;
                x * s
            }
            Activation::GeluErf if is_cpu_f32(&[x]) => {
                map_cpu(x, |o, x| simd::map(o, x, Unary::Gelu))
            }
            Activation::GeluErf => x.gelu_erf(),
        }
    }

    /// d(loss)/d(x) from the output gradient `g`.
    pub(crate) fn input_grad(self, g: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::QuickGelu if is_cpu_f32(&[g, x]) => {
                zip_cpu(g, x, |o, g, x| simd::grad(o, g, x, QUICK_GELU))
            }
            #[cfg(feature = "cuda")]
            Activation::QuickGelu if crate::gpu::fusable(&[g, x]) => {
                crate::gpu::quick_gelu_backward(g, x)
            }
            Activation::QuickGelu => {
                let s = candle_nn::ops::sigmoid(&(x * QUICK_GELU_ALPHA)?)?;
                // s + 1.702 x s (1 - s)
                let d = (&s + ((x * &s)? * (1.0 - &s)?)?.affine(QUICK_GELU_ALPHA, 0.0)?)?;
                g * d
            }
            Activation::GeluErf if is_cpu_f32(&[g, x]) => {
                zip_cpu(g, x, |o, g, x| simd::grad(o, g, x, Unary::Gelu))
            }
            #[cfg(feature = "cuda")]
            Activation::GeluErf if crate::gpu::fusable(&[g, x]) => {
                crate::gpu::gelu_erf_backward(g, x)
            }
            Activation::GeluErf => {
                // Phi(x) + x phi(x)
                let cdf = ((x / std::f64::consts::SQRT_2)?.erf()? + 1.0)?.affine(0.5, 0.0)?;
                let pdf = (x.sqr()? * -0.5)?
                    .exp()?
                    .affine(1.0 / (2.0 * std::f64::consts::PI).sqrt(), 0.0)?;
                g * (cdf + (x * pdf)?)?
            }
        }
    }

    /// The activation as a layer of the graph.
    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        let kind = match self {
            Activation::QuickGelu => "quick_gelu",
            Activation::GeluErf => "gelu",
        };
        let forward = |x: &Tensor| Ok((self.apply(x)?, ()));
        let backward = move |g: &Tensor, x: &Tensor, _: &Tensor, _: &()| self.input_grad(g, x);
        Ok(input_grad_only_saving(kind, x, forward, backward)?)
    }
}

/// CLIP's `x * sigmoid(1.702 x)`.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    Activation::QuickGelu.forward(x)
}

/// The exact (erf) GELU of diffusers' GEGLU.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    Activation::GeluErf.forward(x)
}

/// diffusers' GEGLU on a projection `h` (`[..., 2n]`, last dimension): the first half
/// gated by the erf GELU of the second.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let last = h.rank() - 1;
    let half = h.dim(last)? / 2;
    Ok((h.narrow(last, 0, half)? * gelu_erf(&h.narrow(last, half, half)?)?)?)
}

/// [`geglu`] off the graph; on the CPU in f32 one parallel pass that reads both halves of
/// each row and writes the gated half.
pub(crate) fn geglu_apply(h: &Tensor) -> candle_core::Result<Tensor> {
    let last = h.rank() - 1;
    let half = h.dim(last)? / 2;
    if !is_cpu_f32(&[h]) {
        #[cfg(feature = "cuda")]
        if crate::gpu::fusable(&[h]) {
            return crate::gpu::geglu_forward(h);
        }
        let gate = Activation::GeluErf.apply(&h.narrow(last, half, half)?)?;
        return h.narrow(last, 0, half)? * gate;
    }
    let mut dims = h.dims().to_vec();
    dims[last] = half;
    let out = with_f32(h, |hv| {
        use rayon::prelude::*;
        let mut out = vec![0f32; hv.len() / 2];
        out.par_chunks_mut(half)
            .zip(hv.par_chunks(2 * half))
            .for_each(|(o, row)| {
                let (a, b) = row.split_at(half);
                simd::geglu_row(o, a, b);
            });
        out
    })?;
    Tensor::from_vec(out, dims, h.device())
}

/// d(loss)/d(h) of [`geglu_apply`] from the gradient `g` of its output: the first half
/// `g * gelu(b)`, the second `g * a * gelu'(b)` (one pass on the CPU in f32).
pub(crate) fn geglu_input_grad(g: &Tensor, h: &Tensor) -> candle_core::Result<Tensor> {
    let last = h.rank() - 1;
    let half = h.dim(last)? / 2;
    if !is_cpu_f32(&[g, h]) {
        #[cfg(feature = "cuda")]
        if crate::gpu::fusable(&[g, h]) {
            return crate::gpu::geglu_backward(g, h);
        }
        let (a, b) = (h.narrow(last, 0, half)?, h.narrow(last, half, half)?);
        let da = (g * Activation::GeluErf.apply(&b)?)?;
        let db = Activation::GeluErf.input_grad(&(g * a)?, &b)?;
        return Tensor::cat(&[da, db], last);
    }
    let out = with_f32(g, |gv| {
        with_f32(h, |hv| {
            use rayon::prelude::*;
            let mut out = vec![0f32; hv.len()];
            out.par_chunks_mut(2 * half)
                .zip(hv.par_chunks(2 * half).zip(gv.par_chunks(half)))
                .for_each(|(o, (row, gr))| {
                    let (a, b) = row.split_at(half);
                    let (oa, ob) = o.split_at_mut(half);
                    simd::geglu_grad_row(oa, ob, a, b, gr);
                });
            out
        })
    })??;
    Tensor::from_vec(out, h.dims(), h.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// The CPU activation passes (vectorised erf and exp) against candle's f64 ops: GELU
    /// and its derivative, SiLU and quick GELU, with their gradients, through the public
    /// layers.
    #[test]
    fn cpu_activations_match_candle_in_f64() -> candle_core::Result<()> {
        let d = Device::Cpu;
        // Fixed inputs (random ones made the test depend on the draw): x on an even grid
        // over [-12, 12], gradients a wave of amplitude 3. Odd length: the vector loops'
        // remainders run too.
        let wave = |n: usize, amp: f64, seed: f64| -> candle_core::Result<Tensor> {
            let v: Vec<f32> = (0..n)
                .map(|i| (amp * ((i as f64 + 1.0) * 0.7137 + seed).sin()) as f32)
                .collect();
            Tensor::from_vec(v, n, &d)
        };
        let grid: Vec<f32> = (0..3003)
            .map(|i| -12.0 + i as f32 * (24.0 / 3002.0))
            .collect();
        let x = Tensor::from_vec(grid, (3, 1001), &d)?;
        let g = wave(3003, 3.0, 0.1)?.reshape((3, 1001))?;
        let x64 = x.to_dtype(DType::F64)?;
        let g64 = g.to_dtype(DType::F64)?;
        let max_diff = |a: &Tensor, b: &Tensor| -> candle_core::Result<f64> {
            (a.to_dtype(DType::F64)? - b)?
                .abs()?
                .max_all()?
                .to_scalar::<f64>()
        };
        // The sigmoid gradients `s + a x s (1 - s)` lose `1 - s` to f32 rounding where s
        // is near 1, an error of about eps * a|x| * |g|: 2.7e-6 here for quick GELU (a =
        // 1.702, |x| 12, |g| 3), whatever the exp. Their bound is that, twice; the erf
        // GELU's gradient has no such term.
        let sigmoid_grad_bound = |a: f64| 2.0 * f64::from(f32::EPSILON) * 3.0 * (1.0 + a * 12.0);
        for (act, grad_bound) in [
            (Activation::GeluErf, 2e-6),
            (Activation::QuickGelu, sigmoid_grad_bound(QUICK_GELU_ALPHA)),
        ] {
            let y = act.apply(&x)?;
            let want = act.apply(&x64)?;
            let diff = max_diff(&y, &want)?;
            assert!(diff < 2e-6, "{act:?} forward: {diff}");
            let dx = act.input_grad(&g, &x)?;
            let want = act.input_grad(&g64, &x64)?;
            let diff = max_diff(&dx, &want)?;
            assert!(
                diff < grad_bound,
                "{act:?} gradient: {diff} (bound {grad_bound})"
            );
        }
        let y = silu_apply(&x)?;
        let diff = max_diff(&y, &x64.silu()?)?;
        assert!(diff < 2e-6, "silu: {diff}");
        let dx = silu_grad(&g, &x)?;
        let diff = max_diff(&dx, &silu_grad(&g64, &x64)?)?;
        assert!(diff < sigmoid_grad_bound(1.0), "silu gradient: {diff}");

        // GEGLU and its input gradient against the composition in f64.
        let h = Tensor::cat(&[&x, &g], 1)?;
        let h64 = h.to_dtype(DType::F64)?;
        let y = geglu_apply(&h)?;
        let diff = max_diff(&y, &geglu_apply(&h64)?)?;
        // a gelu(b) with |a| up to about 12.
        assert!(diff < 1e-5, "geglu: {diff}");
        let dy = wave(y.elem_count(), 3.0, 0.2)?.reshape(y.dims())?;
        let dh = geglu_input_grad(&dy, &h)?;
        let want = geglu_input_grad(&dy.to_dtype(DType::F64)?, &h64)?;
        let diff = max_diff(&dh, &want)?;
        assert!(diff < 2e-5, "geglu gradient: {diff}");
        Ok(())
    }
}
