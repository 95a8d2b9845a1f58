//! Layer normalisation over the last dimension with a frozen affine, and the
//! normalisation arithmetic group normalisation shares.

use candle_core::{DType, Tensor, D};

use super::custom_op::input_grad_only_saving;
use crate::error::Result;
use crate::model::weights::Weights;

/// Layer normalisation over the last dimension with a frozen affine.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(w: &Weights, prefix: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get_shaped(&format!("{prefix}.weight"), &[dim])?,
            bias: w.get_shaped(&format!("{prefix}.bias"), &[dim])?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (gamma, beta, eps) = (&self.weight, &self.bias, self.eps);
        // candle-nn's fused kernel has no f64 version.
        if !x.track_op() && x.dtype() != DType::F64 {
            return Ok(candle_nn::ops::layer_norm(
                &x.contiguous()?,
                gamma,
                beta,
                eps as f32,
            )?);
        }
        let forward = |x: &Tensor| {
            if uses_fused_norm(x) {
                let y = candle_nn::ops::layer_norm(&x.contiguous()?, gamma, beta, eps as f32)?;
                return Ok((y, None));
            }
            let (xhat, mean, rstd) = normalise_last_dim(x, eps)?;
            let y = xhat.broadcast_mul(gamma)?.broadcast_add(beta)?;
            Ok((y, Some((mean, rstd))))
        };
        let gamma_b = gamma.clone();
        let backward = move |g: &Tensor, x: &Tensor, _: &Tensor, stats: &Option<Stats>| {
            let (mean, rstd) = stats_or_recomputed(stats.as_ref(), x, eps)?;
            normalise_last_dim_backward(&g.broadcast_mul(&gamma_b)?, x, &mean, &rstd)
        };
        Ok(input_grad_only_saving("layer_norm", x, forward, backward)?)
    }
}

/// Per-group (or per-row) mean and `1/std`, `[..., 1]`.
pub(super) type Stats = (Tensor, Tensor);
/// Whether a norm's forward pass runs candle-nn's fused layer-norm kernel: on GPUs (where
/// the composed version costs a dozen kernel launches), not in f64 (no such kernel) and
/// not on the CPU (which has its own fused group norm and keeps the exact composition).
pub(super) fn uses_fused_norm(x: &Tensor) -> bool {
    !x.device().is_cpu() && x.dtype() != DType::F64
}

/// The statistics a forward pass kept, or those of `x` over its last dimension when it
/// kept none (a fused kernel computed them): the mean and `1/sqrt(var + eps)`, in f32 at
/// least.
pub(super) fn stats_or_recomputed(
    stats: Option<&Stats>,
    x: &Tensor,
    eps: f64,
) -> candle_core::Result<Stats> {
    if let Some((mean, rstd)) = stats {
        return Ok((mean.clone(), rstd.clone()));
    }
    let x = at_least_f32(x)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let var = x.broadcast_sub(&mean)?.sqr()?.mean_keepdim(D::Minus1)?;
    Ok((mean, (var + eps)?.sqrt()?.recip()?))
}

/// `(x - mean) / sqrt(var + eps)` over the last dimension (biased variance, as torch),
/// computed in f32 at least; returns the normalised values, the mean and
/// `1/sqrt(var + eps)` (the statistics are `[..., 1]`).
pub(super) fn normalise_last_dim(
    x: &Tensor,
    eps: f64,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let dtype = x.dtype();
    let x = at_least_f32(x)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let rstd = (var + eps)?.sqrt()?.recip()?;
    let xhat = centred.broadcast_mul(&rstd)?.to_dtype(dtype)?;
    Ok((xhat, mean, rstd))
}

fn at_least_f32(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.dtype() == DType::F64 {
        Ok(x.clone())
    } else {
        x.to_dtype(DType::F32)
    }
}

/// Input gradient of [`normalise_last_dim`] from the gradient `g` of the normalised
/// values and the input statistics (the normalised values are recomputed, not kept):
/// `rstd * (g - mean(g) - xhat * mean(g * xhat))`.
pub(super) fn normalise_last_dim_backward(
    g: &Tensor,
    x: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
) -> candle_core::Result<Tensor> {
    let dtype = g.dtype();
    let g = at_least_f32(g)?;
    let xhat = at_least_f32(x)?.broadcast_sub(mean)?.broadcast_mul(rstd)?;
    let mean_g = g.mean_keepdim(D::Minus1)?;
    let mean_gx = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
    let inner = g
        .broadcast_sub(&mean_g)?
        .sub(&xhat.broadcast_mul(&mean_gx)?)?;
    inner.broadcast_mul(rstd)?.to_dtype(dtype)
}
