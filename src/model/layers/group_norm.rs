//! Group normalisation with a frozen affine, with a fused one-pass CPU kernel.

use candle_core::{DType, Tensor};

use super::activation::{silu_apply, silu_grad};
use super::cpu::{is_cpu_f32, with_f32, with_optional_f32};
use super::custom_op::input_grad_only_saving;
use super::layer_norm::{
    normalise_last_dim, normalise_last_dim_backward, stats_or_recomputed, uses_fused_norm, Stats,
};
use super::simd;
use crate::error::Result;
use crate::model::weights::Weights;

/// Group normalisation over `[B, C, ...]` with a frozen per-channel affine.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(
        w: &Weights,
        prefix: &str,
        channels: usize,
        groups: usize,
        eps: f64,
    ) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(crate::error::Error::config(
                "norm_num_groups",
                format!("{prefix}: {channels} channels cannot be split into {groups} groups"),
            ));
        }
        Ok(Self {
            weight: w.get_shaped(&format!("{prefix}.weight"), &[channels])?,
            bias: w.get_shaped(&format!("{prefix}.bias"), &[channels])?,
            groups,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let layer = self.clone();
        let backward = move |g: &Tensor, x: &Tensor, _: &Tensor, stats: &Option<Stats>| {
            layer.input_grad(g, x, stats.as_ref())
        };
        Ok(input_grad_only_saving(
            "group_norm",
            x,
            |x| self.apply(x),
            backward,
        )?)
    }

    /// The normalisation of a tensor off the graph, with the per-group mean and `1/std`
    /// when they came for free (None: the backward pass recomputes them).
    pub(crate) fn apply(&self, x: &Tensor) -> candle_core::Result<(Tensor, Option<Stats>)> {
        let dims = x.dims().to_vec();
        let b = dims[0];
        let (groups, eps) = (self.groups, self.eps);
        let (weight, bias) = (&self.weight, &self.bias);
        if x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32 {
            let (y, stats) = group_norm_cpu(x, weight, bias, groups, eps, false)?;
            return Ok((y, Some(stats)));
        }
        // sdti's CUDA kernels, which keep the statistics for the backward pass.
        #[cfg(feature = "cuda")]
        if crate::gpu::fusable(&[x, weight, bias]) {
            let (y, mean, rstd) =
                crate::gpu::group_norm_forward(x, weight, bias, groups, eps, false)?;
            return Ok((y, Some((mean, rstd))));
        }
        let xg = x.reshape((b, groups, ()))?;
        let (xhat, stats) = if uses_fused_norm(x) {
            // One fused kernel for the normalisation (candle-nn's layer norm over each
            // group's values, no affine); the backward pass recomputes the statistics.
            let xg = xg.contiguous()?;
            let n = xg.dim(2)?;
            let ones = Tensor::ones(n, x.dtype(), x.device())?;
            let zeros = Tensor::zeros(n, x.dtype(), x.device())?;
            (
                candle_nn::ops::layer_norm(&xg, &ones, &zeros, eps as f32)?,
                None,
            )
        } else {
            let (xhat, mean, rstd) = normalise_last_dim(&xg, eps)?;
            (xhat, Some((mean, rstd)))
        };
        let (gamma, beta) = self.affine(dims.len())?;
        let y = xhat
            .reshape(dims)?
            .broadcast_mul(&gamma)?
            .broadcast_add(&beta)?;
        Ok((y, stats))
    }

    /// `silu(norm(x))` off the graph, as a resnet block's halves start, with the statistics
    /// when they came for free. On CUDA one fused kernel (`crate::gpu`) computes both;
    /// elsewhere the normalisation, then the SiLU.
    pub(crate) fn apply_silu(&self, x: &Tensor) -> candle_core::Result<(Tensor, Option<Stats>)> {
        #[cfg(feature = "cuda")]
        if crate::gpu::fusable(&[x, &self.weight, &self.bias]) {
            let (y, mean, rstd) = crate::gpu::group_norm_forward(
                x,
                &self.weight,
                &self.bias,
                self.groups,
                self.eps,
                true,
            )?;
            return Ok((y, Some((mean, rstd))));
        }
        if is_cpu_f32(&[x, &self.weight, &self.bias]) {
            let (w, b) = (&self.weight, &self.bias);
            let (y, stats) = group_norm_cpu(x, w, b, self.groups, self.eps, true)?;
            return Ok((y, Some(stats)));
        }
        let (n, stats) = self.apply(x)?;
        Ok((silu_apply(&n)?, stats))
    }

    /// The normalisation of `x` (`[B, C, ...]`, f32 on the CPU) as `x scale + shift` per
    /// image and channel (`[B, C]`), with the statistics [`Self::apply_silu`] takes, so
    /// that a fused reader ([`super::Conv2d::apply_after_norm_silu`]) gives its values
    /// without the normalised tensor; None on other devices and dtypes.
    pub(crate) fn channel_affines(
        &self,
        x: &Tensor,
    ) -> candle_core::Result<Option<Vec<(f32, f32)>>> {
        use rayon::prelude::*;
        if !is_cpu_f32(&[x, &self.weight, &self.bias]) || x.rank() < 2 {
            return Ok(None);
        }
        let (b, c) = (x.dim(0)?, x.dim(1)?);
        let groups = self.groups;
        let per_group = x.elem_count() / (b * groups).max(1);
        let gamma: Vec<f32> = self.weight.to_vec1()?;
        let beta: Vec<f32> = self.bias.to_vec1()?;
        if gamma.len() != c || !c.is_multiple_of(groups) {
            candle_core::bail!("group norm of {} channels given {c}", gamma.len());
        }
        let per_group_channels = c / groups;
        let affines = with_f32(x, |src| {
            let mut out = vec![(0f32, 0f32); b * c];
            out.par_chunks_mut(per_group_channels.max(1))
                .zip(src.par_chunks(per_group.max(1)))
                .enumerate()
                .for_each(|(gi, (dst, part))| {
                    let stats = group_stats(part, self.eps);
                    let first_channel = (gi % groups) * per_group_channels;
                    for (ch, d) in dst.iter_mut().enumerate() {
                        let k = first_channel + ch;
                        *d = channel_affine(stats, gamma[k], beta[k]);
                    }
                });
            out
        })?;
        Ok(Some(affines))
    }

    /// d(loss)/d(x) of [`Self::apply_silu`] from its output gradient `g`, with the
    /// statistics it gave (`None`: those of the normalisation recomputed here), plus `add`
    /// (a residual path's gradient) when given. On CUDA with the statistics, one fused
    /// kernel; elsewhere the SiLU's input is recomputed (one normalisation pass) and the
    /// two gradients composed, `add` summed in the norm's last pass on the CPU.
    pub(crate) fn silu_input_grad(
        &self,
        g: &Tensor,
        x: &Tensor,
        stats: Option<&Stats>,
        add: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some((mean, rstd)) = stats {
            if crate::gpu::fusable(&[g, x, &self.weight, &self.bias]) && mean.dtype() == DType::F32
            {
                let dx = crate::gpu::group_norm_backward(
                    g,
                    x,
                    mean,
                    rstd,
                    &self.weight,
                    &self.bias,
                    self.groups,
                    true,
                )?;
                return match add {
                    Some(a) => dx + a,
                    None => Ok(dx),
                };
            }
        }
        let cpu_add = add.is_none_or(|a| is_cpu_f32(&[a]) && a.dims() == g.dims());
        if is_cpu_f32(&[g, x, &self.weight, &self.bias]) && cpu_add {
            let b = x.dim(0)?;
            let xg = x.reshape((b, self.groups, ()))?;
            let (mean, rstd) = stats_or_recomputed(stats, &xg, self.eps)?;
            if is_cpu_f32(&[&mean, &rstd]) {
                let add = add.map(|a| a.contiguous()).transpose()?;
                let (w, bias) = (&self.weight, &self.bias);
                return group_norm_backward_cpu(
                    g,
                    x,
                    (&mean, &rstd),
                    (w, Some(bias)),
                    self.groups,
                    add.as_ref(),
                );
            }
        }
        let (a, fresh) = self.apply(x)?;
        let dn = silu_grad(g, &a)?;
        drop(a);
        self.input_grad_plus(&dn, x, stats.or(fresh.as_ref()), add)
    }

    /// `gamma` and `beta` shaped `[1, C, 1, ...]` for a tensor of `rank` dimensions.
    fn affine(&self, rank: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let mut shape = vec![1, self.weight.dim(0)?];
        shape.extend(std::iter::repeat_n(1, rank - 2));
        Ok((
            self.weight.reshape(shape.clone())?,
            self.bias.reshape(shape)?,
        ))
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

    /// `d_residual + self.input_grad(g, x, stats)`, in the same pass on the CPU in f32.
    pub(crate) fn input_grad_add(
        &self,
        g: &Tensor,
        x: &Tensor,
        stats: Option<&Stats>,
        d_residual: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.input_grad_plus(g, x, stats, Some(d_residual))
    }

    /// [`Self::input_grad`] plus `add` when given.
    fn input_grad_plus(
        &self,
        g: &Tensor,
        x: &Tensor,
        stats: Option<&Stats>,
        add: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let b = x.dim(0)?;
        let groups = self.groups;
        let xg = x.reshape((b, groups, ()))?;
        let (mean, rstd) = stats_or_recomputed(stats, &xg, self.eps)?;
        let cpu_add = add.is_none_or(|a| is_cpu_f32(&[a]) && a.dims() == g.dims());
        if is_cpu_f32(&[g, x, &mean, &rstd, &self.weight]) && cpu_add {
            let add = add.map(|a| a.contiguous()).transpose()?;
            let w = &self.weight;
            let stats = (&mean, &rstd);
            return group_norm_backward_cpu(g, x, stats, (w, None), groups, add.as_ref());
        }
        let dx = self.input_grad_composed(g, x, &xg, mean, rstd)?;
        match add {
            Some(a) => a + dx,
            None => Ok(dx),
        }
    }

    /// [`Self::input_grad`] off the CPU fast path: a CUDA kernel or candle's ops.
    fn input_grad_composed(
        &self,
        g: &Tensor,
        x: &Tensor,
        xg: &Tensor,
        mean: Tensor,
        rstd: Tensor,
    ) -> candle_core::Result<Tensor> {
        let (b, groups) = (x.dim(0)?, self.groups);
        #[cfg(feature = "cuda")]
        if crate::gpu::fusable(&[g, x, &self.weight, &self.bias]) && mean.dtype() == DType::F32 {
            let (w, bias) = (&self.weight, &self.bias);
            return crate::gpu::group_norm_backward(g, x, &mean, &rstd, w, bias, groups, false);
        }
        let (gamma, _) = self.affine(x.rank())?;
        let gs = g.broadcast_mul(&gamma)?.reshape((b, groups, ()))?;
        let gx = normalise_last_dim_backward(&gs, xg, &mean, &rstd)?;
        gx.reshape(g.dims())
    }
}

/// One group's mean and `1/std`: two passes, summed in f64 lanes.
fn group_stats(part: &[f32], eps: f64) -> (f64, f64) {
    let n = part.len().max(1) as f64;
    let mean = simd::sum_f64(part, 0.0, false) / n;
    let var = simd::sum_f64(part, mean, true) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// A channel's normalisation as `x scale + shift`, from its group's statistics and the
/// channel's affine.
fn channel_affine((mean, rstd): (f64, f64), gamma: f32, beta: f32) -> (f32, f32) {
    let scale = rstd as f32 * gamma;
    (scale, beta - mean as f32 * scale)
}

/// Group normalisation of f32 CPU data, in parallel over groups: per group the mean and
/// the variance (two passes, summed in f64 lanes), then the normalised, scaled and shifted
/// values written, through SiLU when `silu` (a resnet's halves); returns the output and
/// the per-group mean and `1/std` (`[B, G, 1]`, f32).
fn group_norm_cpu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> candle_core::Result<(Tensor, (Tensor, Tensor))> {
    use rayon::prelude::*;
    let dims = x.dims().to_vec();
    let (b, c) = (dims[0], dims[1]);
    let per_channel: usize = dims[2..].iter().product();
    let per_group = (c / groups) * per_channel;
    let gamma: Vec<f32> = weight.to_vec1()?;
    let beta: Vec<f32> = bias.to_vec1()?;
    let (out, stats) = with_f32(x, |src| {
        let mut out = vec![0f32; src.len()];
        let mut stats = vec![(0f32, 0f32); b * groups];
        out.par_chunks_mut(per_group)
            .zip(stats.par_iter_mut())
            .enumerate()
            .for_each(|(gi, (dst, stat))| {
                let part = &src[gi * per_group..(gi + 1) * per_group];
                let (mean, rstd) = group_stats(part, eps);
                let first_channel = (gi % groups) * (c / groups);
                for (ch, (d, s)) in dst
                    .chunks_mut(per_channel)
                    .zip(part.chunks(per_channel))
                    .enumerate()
                {
                    let k = first_channel + ch;
                    let (scale, shift) = channel_affine((mean, rstd), gamma[k], beta[k]);
                    if silu {
                        simd::norm_silu(d, s, scale, shift);
                    } else {
                        for (o, &v) in d.iter_mut().zip(s) {
                            *o = v * scale + shift;
                        }
                    }
                }
                *stat = (mean as f32, rstd as f32);
            });
        (out, stats)
    })?;
    let device = x.device();
    let y = Tensor::from_vec(out, dims, device)?;
    let mean = Tensor::from_vec(
        stats.iter().map(|s| s.0).collect::<Vec<_>>(),
        (b, groups, 1),
        device,
    )?;
    let rstd = Tensor::from_vec(
        stats.iter().map(|s| s.1).collect::<Vec<_>>(),
        (b, groups, 1),
        device,
    )?;
    Ok((y, (mean, rstd)))
}
/// The input gradient of [`group_norm_cpu`], plus `add` (contiguous, `g`'s shape) when
/// given, in two passes per group, in parallel over groups: the first writes `gs = g
/// gamma` and sums `gs` and `gs xhat` (`xhat = (x - mean) rstd`); the second turns `gs`
/// into `rstd (gs - mean(gs) - xhat mean(gs xhat))` (+ add) in place. With `silu_bias`
/// (the norm's bias: the forward pass was `silu(norm(x))`), `g` is first taken through
/// the SiLU, whose input is recomputed from `x`; as composed ops that was three more
/// tensors: the normalisation again, the SiLU's gradient and the result.
fn group_norm_backward_cpu(
    g: &Tensor,
    x: &Tensor,
    (mean, rstd): (&Tensor, &Tensor),
    (weight, silu_bias): (&Tensor, Option<&Tensor>),
    groups: usize,
    add: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    use rayon::prelude::*;
    let dims = g.dims().to_vec();
    if x.dims() != dims.as_slice() {
        candle_core::bail!(
            "group norm backward: gradient {dims:?} vs input {:?}",
            x.dims()
        );
    }
    let c = dims[1];
    let per_channel: usize = dims[2..].iter().product();
    let per_group = (c / groups) * per_channel;
    let gamma: Vec<f32> = weight.to_vec1()?;
    let beta: Option<Vec<f32>> = silu_bias.map(|b| b.to_vec1()).transpose()?;
    let means: Vec<f32> = mean.flatten_all()?.to_vec1()?;
    let rstds: Vec<f32> = rstd.flatten_all()?.to_vec1()?;
    if per_group == 0 || means.len() * per_group != g.elem_count() {
        candle_core::bail!(
            "group norm backward: {} statistics for {dims:?}",
            means.len()
        );
    }
    let out = with_f32(g, |gv| {
        with_f32(x, |xv| {
            with_optional_f32(add, |addv| {
                let mut out = vec![0f32; gv.len()];
                out.par_chunks_mut(per_group)
                    .enumerate()
                    .for_each(|(gi, dst)| {
                        let range = gi * per_group..(gi + 1) * per_group;
                        let addp = addv.map(|a| &a[range.clone()]);
                        let (gp, xp) = (&gv[range.clone()], &xv[range]);
                        let (m, r) = (means[gi], rstds[gi]);
                        let first_channel = (gi % groups) * (c / groups);
                        let (mut sum_g, mut sum_gx) = (0f64, 0f64);
                        for (ch, ((d, gc), xc)) in dst
                            .chunks_mut(per_channel)
                            .zip(gp.chunks(per_channel))
                            .zip(xp.chunks(per_channel))
                            .enumerate()
                        {
                            let w = gamma[first_channel + ch];
                            let (sg, sgx) = match &beta {
                                Some(beta) => {
                                    let scale = r * w;
                                    let shift = beta[first_channel + ch] - m * scale;
                                    simd::norm_silu_grad(d, gc, xc, (scale, shift, w), (m, r))
                                }
                                None => simd::scaled_grad_sums(d, gc, xc, w, (m, r)),
                            };
                            sum_g += sg;
                            sum_gx += sgx;
                        }
                        let mean_g = (sum_g / per_group as f64) as f32;
                        let mean_gx = (sum_gx / per_group as f64) as f32;
                        for (i, (o, &xi)) in dst.iter_mut().zip(xp).enumerate() {
                            let xhat = (xi - m) * r;
                            let v = r * (*o - mean_g - xhat * mean_gx);
                            *o = addp.map_or(v, |a| a[i] + v);
                        }
                    });
                out
            })
        })
    })???;
    Tensor::from_vec(out, dims, g.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The residual gradient summed inside the CPU backward pass (`input_grad_add`, the
    /// SiLU variant's `add`) equals the separate sum, bit for bit, and the gradient alone
    /// is unchanged.
    #[test]
    fn fused_residual_sum_equals_the_separate_sum() -> candle_core::Result<()> {
        let Setup { norm, x, g, r } = setup()?;
        let (_, stats) = norm.apply(&x)?;
        let same = |a: &Tensor, b: &Tensor| -> candle_core::Result<bool> {
            Ok(a.flatten_all()?.to_vec1::<f32>()? == b.flatten_all()?.to_vec1::<f32>()?)
        };
        let alone = norm.input_grad(&g, &x, stats.as_ref())?;
        let fused = norm.input_grad_add(&g, &x, stats.as_ref(), &r)?;
        assert!(same(&fused, &(&r + &alone)?)?);
        let alone = norm.silu_input_grad(&g, &x, stats.as_ref(), None)?;
        let fused = norm.silu_input_grad(&g, &x, stats.as_ref(), Some(&r))?;
        assert!(same(&fused, &(&r + &alone)?)?);
        // The composed path (f64) agrees with the fused f32 one.
        let (norm64, x64, g64, r64) = (norm.to_f64()?, f64(&x)?, f64(&g)?, f64(&r)?);
        let want = norm64.input_grad_add(&g64, &x64, None, &r64)?;
        let got = norm.input_grad_add(&g, &x, None, &r)?;
        assert!(max_diff(&got, &want)? < 1e-5);
        Ok(())
    }

    /// The CPU's fused norm + SiLU, forward and backward (with and without the forward's
    /// statistics, with a residual gradient), agrees with candle's composed ops in f64.
    #[test]
    fn fused_norm_silu_matches_the_f64_composition() -> candle_core::Result<()> {
        let Setup { norm, x, g, r } = setup()?;
        let (norm64, x64, g64, r64) = (norm.to_f64()?, f64(&x)?, f64(&g)?, f64(&r)?);
        let (y, stats) = norm.apply_silu(&x)?;
        let (y64, _) = norm64.apply_silu(&x64)?;
        assert!(max_diff(&y, &y64)? < 1e-5);
        let want = norm64.silu_input_grad(&g64, &x64, None, Some(&r64))?;
        for stats in [stats.as_ref(), None] {
            let got = norm.silu_input_grad(&g, &x, stats, Some(&r))?;
            assert!(max_diff(&got, &want)? < 1e-5);
        }
        Ok(())
    }

    /// A 4-group norm over 12 channels of a `[2, 12, 5, 3]` input (15 values per channel,
    /// 45 per group: a remainder after the 8-lane sums), its gradient `g` and a residual
    /// gradient `r`.
    struct Setup {
        norm: GroupNorm,
        x: Tensor,
        g: Tensor,
        r: Tensor,
    }

    fn setup() -> candle_core::Result<Setup> {
        let d = Device::Cpu;
        Ok(Setup {
            norm: GroupNorm {
                weight: Tensor::randn(1f32, 0.3, 12, &d)?,
                bias: Tensor::randn(0f32, 0.3, 12, &d)?,
                groups: 4,
                eps: 1e-5,
            },
            x: Tensor::randn(0.5f32, 2.0, (2, 12, 5, 3), &d)?,
            g: Tensor::randn(0f32, 1.0, (2, 12, 5, 3), &d)?,
            r: Tensor::randn(0f32, 1.0, (2, 12, 5, 3), &d)?,
        })
    }

    impl GroupNorm {
        fn to_f64(&self) -> candle_core::Result<GroupNorm> {
            Ok(GroupNorm {
                weight: f64(&self.weight)?,
                bias: f64(&self.bias)?,
                ..self.clone()
            })
        }
    }

    fn f64(t: &Tensor) -> candle_core::Result<Tensor> {
        t.to_dtype(DType::F64)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
        (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()
    }
}
