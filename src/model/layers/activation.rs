//! Activations with their own input gradients: SiLU, quick GELU, erf GELU and GEGLU.

use candle_core::Tensor;

use super::cpu::{is_cpu_f32, map_cpu, zip_cpu};
use super::custom_op::input_grad_only_saving;
use crate::error::Result;

/// `x * sigmoid(x)`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    let forward = |x: &Tensor| Ok((x.silu()?, ()));
    let backward = |g: &Tensor, x: &Tensor, _: &Tensor, _: &()| silu_grad(g, x);
    Ok(input_grad_only_saving("silu", x, forward, backward)?)
}

/// The input gradient of SiLU at `x` for the output gradient `g`:
/// `g * s (1 + x (1 - s))`, `s = sigmoid(x)`.
pub(super) fn silu_grad(g: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
    if is_cpu_f32(&[g, x]) {
        return zip_cpu(g, x, |g, x| {
            let s = 1.0 / (1.0 + (-x).exp());
            g * s * (1.0 + x * (1.0 - s))
        });
    }
    let s = candle_nn::ops::sigmoid(x)?;
    let d = (&s * ((x * (1.0 - &s)?)? + 1.0)?)?;
    g * d
}

/// The constant of CLIP's quick GELU, `x * sigmoid(1.702 x)` (a sigmoid fit of the erf
/// GELU, from the GELU paper).
pub const QUICK_GELU_ALPHA: f64 = 1.702;

/// CLIP's `x * sigmoid(1.702 x)`.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    let forward = |x: &Tensor| {
        let s = candle_nn::ops::sigmoid(&(x * QUICK_GELU_ALPHA)?)?;
        Ok(((x * &s)?, ()))
    };
    let backward = |g: &Tensor, x: &Tensor, _: &Tensor, _: &()| {
        let s = candle_nn::ops::sigmoid(&(x * QUICK_GELU_ALPHA)?)?;
        // s + 1.702 x s (1 - s)
        let d = (&s + ((x * &s)? * (1.0 - &s)?)?.affine(QUICK_GELU_ALPHA, 0.0)?)?;
        g * d
    };
    Ok(input_grad_only_saving("quick_gelu", x, forward, backward)?)
}

/// The exact (erf) GELU of diffusers' GEGLU.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    let forward = |x: &Tensor| {
        if is_cpu_f32(&[x]) {
            // candle's own formula, in parallel (its CPU unary op runs on one thread).
            return Ok((map_cpu(x, gelu_erf_f32)?, ()));
        }
        Ok((x.gelu_erf()?, ()))
    };
    let backward = |g: &Tensor, x: &Tensor, _: &Tensor, _: &()| {
        if is_cpu_f32(&[g, x]) {
            return zip_cpu(g, x, |g, x| g * gelu_erf_grad_f32(x));
        }
        // Phi(x) + x phi(x)
        let cdf = ((x / std::f64::consts::SQRT_2)?.erf()? + 1.0)?.affine(0.5, 0.0)?;
        let pdf = (x.sqr()? * -0.5)?
            .exp()?
            .affine(1.0 / (2.0 * std::f64::consts::PI).sqrt(), 0.0)?;
        g * (cdf + (x * pdf)?)?
    };
    Ok(input_grad_only_saving("gelu", x, forward, backward)?)
}

/// diffusers' GEGLU on a projection `h` (`[..., 2n]`, last dimension): the first half
/// gated by the erf GELU of the second.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let last = h.rank() - 1;
    let half = h.dim(last)? / 2;
    Ok((h.narrow(last, 0, half)? * gelu_erf(&h.narrow(last, half, half)?)?)?)
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
