//! Layer normalisation over the last dimension with a frozen affine, and the
//! normalisation arithmetic group normalisation shares.

use candle_core::{DType, Tensor, D};

use super::cpu::{is_cpu_f32, with_f32, with_optional_f32};
use super::custom_op::input_grad_only_saving;
use super::simd;
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
        // candle-nn's fused kernel has no f64 version.
        if !x.track_op() && x.dtype() != DType::F64 {
            return Ok(self.apply(x)?.0);
        }
        let layer = self.clone();
        let backward = move |g: &Tensor, x: &Tensor, _: &Tensor, stats: &Option<Stats>| {
            layer.input_grad(g, x, stats.as_ref())
        };
        Ok(input_grad_only_saving(
            "layer_norm",
            x,
            |x| self.apply(x),
            backward,
        )?)
    }

    /// The normalisation of a tensor off the graph, with the per-row mean and `1/std`
    /// when they came for free (None: [`Self::input_grad`] recomputes them).
    pub(crate) fn apply(&self, x: &Tensor) -> candle_core::Result<(Tensor, Option<Stats>)> {
        let (gamma, beta, eps) = (&self.weight, &self.bias, self.eps);
        if is_cpu_f32(&[x, gamma]) {
            let (y, stats) = layer_norm_cpu(x, gamma, beta, eps)?;
            return Ok((y, Some(stats)));
        }
        // sdti's CUDA kernel, which keeps the statistics for the backward pass.
        #[cfg(feature = "cuda")]
        if crate::gpu::fusable(&[x, gamma, beta]) {
            let (y, mean, rstd) = crate::gpu::layer_norm_forward(x, gamma, beta, eps)?;
            return Ok((y, Some((mean, rstd))));
        }
        if uses_fused_norm(x) {
            let y = candle_nn::ops::layer_norm(&x.contiguous()?, gamma, beta, eps as f32)?;
            return Ok((y, None));
        }
        let (xhat, mean, rstd) = normalise_last_dim(x, eps)?;
        let y = xhat.broadcast_mul(gamma)?.broadcast_add(beta)?;
        Ok((y, Some((mean, rstd))))
    }

    /// d(loss)/d(x) from the output gradient `g`, with the statistics of [`Self::apply`].
    pub(crate) fn input_grad(
        &self,
        g: &Tensor,
        x: &Tensor,
        stats: Option<&Stats>,
    ) -> candle_core::Result<Tensor> {
        self.input_grad_plus(g, x, stats, None)
    }

    /// `d_residual + self.input_grad(g, x, stats)`: the gradient of a residual stream that
    /// also feeds this norm (a pre-norm block's input); one pass on a GPU and on the CPU
    /// in f32.
    pub(crate) fn input_grad_add(
        &self,
        g: &Tensor,
        x: &Tensor,
        stats: Option<&Stats>,
        d_residual: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.input_grad_plus(g, x, stats, Some(d_residual))
    }

    /// [`Self::input_grad`] plus `add` when given, summed in the same pass by the CPU and
    /// CUDA kernels, after it by candle's ops.
    fn input_grad_plus(
        &self,
        g: &Tensor,
        x: &Tensor,
        stats: Option<&Stats>,
        add: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (mean, rstd) = stats_or_recomputed(stats, x, self.eps)?;
        let mut operands = vec![g, x, &mean, &rstd, &self.weight];
        operands.extend(add);
        if is_cpu_f32(&operands) && add.is_none_or(|a| a.dims() == g.dims()) {
            return layer_norm_backward_cpu(g, x, &mean, &rstd, &self.weight, add);
        }
        #[cfg(feature = "cuda")]
        {
            let mut operands = vec![g, x, &self.weight];
            operands.extend(add);
            if crate::gpu::fusable(&operands) && mean.dtype() == DType::F32 {
                return crate::gpu::layer_norm_backward(g, x, &mean, &rstd, &self.weight, add);
            }
        }
        let dx = normalise_last_dim_backward(&g.broadcast_mul(&self.weight)?, x, &mean, &rstd)?;
        match add {
            Some(a) => a + dx,
            None => Ok(dx),
        }
    }
}

/// Layer normalisation of f32 CPU rows in one pass per row (statistics accumulated in
/// f64, as the group norm's), in parallel over rows; returns the output and the per-row
/// mean and `1/std` (`[..., 1]`, f32). candle's composed version is eight passes, most of
/// them on one thread.
fn layer_norm_cpu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> candle_core::Result<(Tensor, Stats)> {
    use rayon::prelude::*;
    let dims = x.dims().to_vec();
    let c = *dims.last().unwrap_or(&1);
    let gamma: Vec<f32> = weight.to_vec1()?;
    let beta: Vec<f32> = bias.to_vec1()?;
    if gamma.len() != c || beta.len() != c {
        candle_core::bail!("layer norm: {} weights for rows of {c}", gamma.len());
    }
    let (out, mean, rstd) = with_f32(x, |src| {
        let rows = src.len() / c.max(1);
        let mut out = vec![0f32; src.len()];
        let mut mean = vec![0f32; rows];
        let mut rstd = vec![0f32; rows];
        out.par_chunks_mut(c)
            .zip(src.par_chunks(c))
            .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
            .for_each(|((dst, row), (m_out, r_out))| {
                let m = simd::sum_f64(row, 0.0, false) / c as f64;
                let var = simd::sum_f64(row, m, true) / c as f64;
                let r = 1.0 / (var + eps).sqrt();
                let (mf, rf) = (m as f32, r as f32);
                simd::affine_row(dst, row, &gamma, &beta, (mf, rf));
                *m_out = mf;
                *r_out = rf;
            });
        (out, mean, rstd)
    })?;
    let mut stat_dims = dims.clone();
    if let Some(last) = stat_dims.last_mut() {
        *last = 1;
    }
    let device = x.device();
    Ok((
        Tensor::from_vec(out, dims, device)?,
        (
            Tensor::from_vec(mean, stat_dims.clone(), device)?,
            Tensor::from_vec(rstd, stat_dims, device)?,
        ),
    ))
}

/// The input gradient of [`layer_norm_cpu`] per row: with `gs = g * gamma` and
/// `xhat = (x - mean) * rstd`, `rstd * (gs - mean(gs) - xhat * mean(gs * xhat))`, plus
/// `add` (a residual stream's gradient, same shape as `g`) when given, in the same pass.
fn layer_norm_backward_cpu(
    g: &Tensor,
    x: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    weight: &Tensor,
    add: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    use rayon::prelude::*;
    let dims = g.dims().to_vec();
    let c = *dims.last().unwrap_or(&1);
    let gamma: Vec<f32> = weight.to_vec1()?;
    if gamma.len() != c || x.dims() != dims.as_slice() {
        candle_core::bail!(
            "layer norm backward: {} weights, gradient {dims:?}",
            gamma.len()
        );
    }
    let means: Vec<f32> = mean.flatten_all()?.to_vec1()?;
    let rstds: Vec<f32> = rstd.flatten_all()?.to_vec1()?;
    let add = add.map(|t| t.contiguous()).transpose()?;
    let out = with_f32(g, |gv| {
        with_f32(x, |xv| {
            with_optional_f32(add.as_ref(), |addv| {
                let mut out = vec![0f32; gv.len()];
                out.par_chunks_mut(c)
                    .zip(gv.par_chunks(c).zip(xv.par_chunks(c)))
                    .zip(means.par_iter().zip(rstds.par_iter()))
                    .enumerate()
                    .for_each(|(row, ((dst, (gr, xr)), (&m, &r)))| {
                        let (sum_g, sum_gx) = simd::row_grad_sums(gr, xr, &gamma, (m, r));
                        let mean_g = (sum_g / c as f64) as f32;
                        let mean_gx = (sum_gx / c as f64) as f32;
                        let add = addv.map(|a| &a[row * c..(row + 1) * c]);
                        simd::row_grad(dst, gr, xr, &gamma, (m, r), (mean_g, mean_gx), add);
                    });
                out
            })
        })
    })???;
    Tensor::from_vec(out, dims, g.device())
}

/// Per-group (or per-row) mean and `1/std`, `[..., 1]`.
pub(crate) type Stats = (Tensor, Tensor);
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The residual gradient summed inside the CPU backward pass equals the separate sum,
    /// bit for bit, and the composed f64 path.
    #[test]
    fn fused_residual_sum_equals_the_separate_sum() -> candle_core::Result<()> {
        let d = Device::Cpu;
        let norm = LayerNorm {
            weight: Tensor::randn(1f32, 0.3, 24, &d)?,
            bias: Tensor::randn(0f32, 0.3, 24, &d)?,
            eps: 1e-5,
        };
        let x = Tensor::randn(0.5f32, 2.0, (2, 7, 24), &d)?;
        let g = Tensor::randn(0f32, 1.0, (2, 7, 24), &d)?;
        let r = Tensor::randn(0f32, 1.0, (2, 7, 24), &d)?;
        let (_, stats) = norm.apply(&x)?;
        let alone = norm.input_grad(&g, &x, stats.as_ref())?;
        let fused = norm.input_grad_add(&g, &x, stats.as_ref(), &r)?;
        let separate = (&r + &alone)?;
        assert!(
            fused.flatten_all()?.to_vec1::<f32>()? == separate.flatten_all()?.to_vec1::<f32>()?
        );
        let norm64 = LayerNorm {
            weight: norm.weight.to_dtype(DType::F64)?,
            bias: norm.bias.to_dtype(DType::F64)?,
            eps: norm.eps,
        };
        let want = norm64.input_grad_add(
            &g.to_dtype(DType::F64)?,
            &x.to_dtype(DType::F64)?,
            None,
            &r.to_dtype(DType::F64)?,
        )?;
        let diff = (fused.to_dtype(DType::F64)? - want)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }
}
