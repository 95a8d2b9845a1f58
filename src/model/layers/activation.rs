//! Activations with their own input gradients: SiLU, quick GELU, erf GELU and GEGLU.

use candle_core::Tensor;

use super::cpu::{is_cpu_f32, map_cpu, with_f32, zip_cpu};
use super::custom_op::input_grad_only_saving;
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
        return map_cpu(x, |v| v / (1.0 + (-v).exp()));
    }
    x.silu()
}

/// The input gradient of SiLU at `x` for the output gradient `g`:
/// `g * s (1 + x (1 - s))`, `s = sigmoid(x)`.
pub(crate) fn silu_grad(g: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
    if is_cpu_f32(&[g, x]) {
        return zip_cpu(g, x, |g, x| {
            let s = 1.0 / (1.0 + (-x).exp());
            g * s * (1.0 + x * (1.0 - s))
        });
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
            Activation::QuickGelu if is_cpu_f32(&[x]) => map_cpu(x, quick_gelu_f32),
            #[cfg(feature = "cuda")]
            Activation::QuickGelu if crate::gpu::fusable(&[x]) => crate::gpu::quick_gelu_forward(x),
            Activation::QuickGelu => {
                let s = candle_nn::ops::sigmoid(&(x * QUICK_GELU_ALPHA)?)?;
                x * s
            }
            // candle's own formula, in parallel (its CPU unary op runs on one thread).
            Activation::GeluErf if is_cpu_f32(&[x]) => map_cpu(x, gelu_erf_f32),
            Activation::GeluErf => x.gelu_erf(),
        }
    }

    /// d(loss)/d(x) from the output gradient `g`.
    pub(crate) fn input_grad(self, g: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::QuickGelu if is_cpu_f32(&[g, x]) => {
                zip_cpu(g, x, |g, x| g * quick_gelu_grad_f32(x))
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
                zip_cpu(g, x, |g, x| g * gelu_erf_grad_f32(x))
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
                for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                    *o = a * gelu_erf_f32(b);
                }
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
                    for ((((oa, ob), &a), &b), &g) in
                        oa.iter_mut().zip(ob.iter_mut()).zip(a).zip(b).zip(gr)
                    {
                        *oa = g * gelu_erf_f32(b);
                        *ob = g * a * gelu_erf_grad_f32(b);
                    }
                });
            out
        })
    })??;
    Tensor::from_vec(out, h.dims(), h.device())
}

/// `x sigmoid(1.702 x)`.
fn quick_gelu_f32(x: f32) -> f32 {
    x / (1.0 + (-(QUICK_GELU_ALPHA as f32) * x).exp())
}

/// `s + 1.702 x s (1 - s)`, `s = sigmoid(1.702 x)`.
fn quick_gelu_grad_f32(x: f32) -> f32 {
    let a = QUICK_GELU_ALPHA as f32;
    let s = 1.0 / (1.0 + (-a * x).exp());
    s + a * x * s * (1.0 - s)
}

/// `x Phi(x)`, as candle's `gelu_erf` computes it on the CPU.
fn gelu_erf_f32(x: f32) -> f32 {
    (candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * x
}

/// `d/dx x Phi(x) = Phi(x) + x phi(x)`.
fn gelu_erf_grad_f32(x: f32) -> f32 {
    let cdf = 0.5 * (candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2) + 1.0);
    let pdf = (-0.5 * x * x).exp()
        * (0.5 * std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2);
    cdf + x * pdf
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// The fused CPU GELU passes equal candle's op and the composed derivative.
    #[test]
    fn fused_gelu_matches_the_composition() -> candle_core::Result<()> {
        let d = Device::Cpu;
        let x = (Tensor::randn(0f32, 1.0, (3, 1000), &d)? * 3.0)?;
        let y = map_cpu(&x, gelu_erf_f32)?;
        let diff = (&y - x.gelu_erf()?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        let x64 = x.to_dtype(DType::F64)?;
        let cdf = ((&x64 / std::f64::consts::SQRT_2)?.erf()? + 1.0)?.affine(0.5, 0.0)?;
        let pdf = (x64.sqr()? * -0.5)?
            .exp()?
            .affine(1.0 / (2.0 * std::f64::consts::PI).sqrt(), 0.0)?;
        let want = (cdf + (&x64 * pdf)?)?;
        let got = map_cpu(&x, gelu_erf_grad_f32)?.to_dtype(DType::F64)?;
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-6, "{diff}");
        Ok(())
    }
}
