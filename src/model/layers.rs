//! Frozen layers whose backward pass yields the input gradient only.
//!
//! candle's autograd computes a gradient for every operand of an op on the path to a
//! variable, frozen weights included (a convolution's kernel gradient costs as much as
//! its input gradient), and candle-nn's fused `LayerNorm`/`softmax_last_dim` cut the
//! graph. Every layer here runs its forward pass on a detached input with candle's fast
//! kernels and attaches, through one custom op, a backward closure that computes
//! d(loss)/d(input) and nothing else. When the input does not depend on a variable the
//! layer is a plain forward pass with no graph at all.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, DType, Layout, MetalStorage, Shape, Storage, Tensor, D,
};

use super::profile::{self, Pass};
use super::weights::Weights;
use crate::error::Result;

/// Maps (output gradient, input, output) to the input gradient. The input and output
/// are the graph's own tensors (detached), so a backward pass keeps no copy of them.
type Backward = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync>;

/// Carries a precomputed output into the graph and the closure that maps the output
/// gradient to the input gradient.
struct InputGradOnly {
    output: Mutex<Option<Tensor>>,
    backward: Backward,
}

/// Takes the precomputed output out of its slot (each op runs its forward once).
fn take_output(slot: &Mutex<Option<Tensor>>) -> candle_core::Result<Tensor> {
    slot.lock()
        .map_err(|_| candle_core::Error::Msg("precomputed output lock poisoned".into()))?
        .take()
        .ok_or_else(|| candle_core::Error::Msg("precomputed output used twice".into()))
}

/// The storage of a precomputed output, handed to candle as a custom op's result; one
/// function per backend, as candle's custom ops have one forward per backend.
fn cpu_result(out: Tensor) -> candle_core::Result<(CpuStorage, Shape)> {
    let (storage, layout) = out.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
        _ => candle_core::bail!("precomputed output is not on the cpu"),
    }
}

fn cuda_result(out: Tensor) -> candle_core::Result<(CudaStorage, Shape)> {
    let (storage, layout) = out.storage_and_layout();
    match &*storage {
        Storage::Cuda(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
        _ => candle_core::bail!("precomputed output is not on the cuda device"),
    }
}

fn metal_result(out: Tensor) -> candle_core::Result<(MetalStorage, Shape)> {
    let (storage, layout) = out.storage_and_layout();
    match &*storage {
        Storage::Metal(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
        _ => candle_core::bail!("precomputed output is not on the metal device"),
    }
}

/// A contiguous tensor starting at offset 0 of its storage, so that its storage can be
/// handed to candle as the op's result.
fn standalone(t: Tensor) -> candle_core::Result<Tensor> {
    if t.is_contiguous() && t.layout().start_offset() == 0 {
        Ok(t)
    } else {
        t.force_contiguous()
    }
}

impl CustomOp1 for InputGradOnly {
    fn name(&self) -> &'static str {
        "sdti-input-grad-only"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_result(take_output(&self.output)?)
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        cuda_result(take_output(&self.output)?)
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        metal_result(take_output(&self.output)?)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        (self.backward)(grad, &arg.detach(), &res.detach()).map(Some)
    }
}

/// Applies `forward` to `x`; when `x` is on a gradient path, the result carries
/// `backward` (output gradient -> input gradient) and no other gradient.
///
/// `kind` names the layer for [`profile`](super::profile) (`"conv2d"`: its passes are
/// timed as `conv2d.fwd` and `conv2d.bwd`).
pub fn input_grad_only<F, B>(
    kind: &'static str,
    x: &Tensor,
    forward: F,
    backward: B,
) -> candle_core::Result<Tensor>
where
    F: FnOnce(&Tensor) -> candle_core::Result<Tensor>,
    B: Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
{
    if !x.track_op() {
        return profile::time(kind, Pass::Forward, x.device(), || forward(x));
    }
    let out = profile::time(kind, Pass::Forward, x.device(), || {
        standalone(forward(&x.detach())?)
    })?;
    let op = InputGradOnly {
        output: Mutex::new(Some(out)),
        backward: Box::new(move |g, _, _| {
            profile::time(kind, Pass::Backward, g.device(), || backward(g))
        }),
    };
    x.apply_op1(op)
}

/// Like [`input_grad_only`], for layers whose backward needs the input, the output or
/// small values computed in the forward pass (statistics): `forward` returns the output
/// and the saved state, `backward` gets the output gradient, the input, the output and
/// the state. Large intermediates are recomputed from the input rather than saved.
fn input_grad_only_saving<S, F, B>(
    kind: &'static str,
    x: &Tensor,
    forward: F,
    backward: B,
) -> candle_core::Result<Tensor>
where
    S: Send + Sync + 'static,
    F: FnOnce(&Tensor) -> candle_core::Result<(Tensor, S)>,
    B: Fn(&Tensor, &Tensor, &Tensor, &S) -> candle_core::Result<Tensor> + Send + Sync + 'static,
{
    if !x.track_op() {
        return profile::time(kind, Pass::Forward, x.device(), || {
            forward(x).map(|(out, _)| out)
        });
    }
    let (out, saved) = profile::time(kind, Pass::Forward, x.device(), || {
        let (out, saved) = forward(&x.detach())?;
        Ok((standalone(out)?, saved))
    })?;
    let op = InputGradOnly {
        output: Mutex::new(Some(out)),
        backward: Box::new(move |g, x, y| {
            profile::time(kind, Pass::Backward, g.device(), || {
                backward(g, x, y, &saved)
            })
        }),
    };
    x.apply_op1(op)
}

/// A frozen fully connected layer, `y = x W^T + b`, over the last dimension.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `{prefix}.weight` (`[out, in]`) and, when `bias`, `{prefix}.bias`.
    pub fn new(w: &Weights, prefix: &str, bias: bool) -> Result<Self> {
        let weight = w.get2(&format!("{prefix}.weight"))?;
        let bias = if bias {
            Some(w.get_shaped(&format!("{prefix}.bias"), &[weight.dim(0)?])?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// Output features.
    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let weight = self.weight.clone();
        let bias = self.bias.clone();
        let forward = |x: &Tensor| {
            let dims = x.dims().to_vec();
            let last = dims.len() - 1;
            let rows = x.elem_count() / dims[last];
            let y = x.reshape((rows, dims[last]))?.matmul(&weight.t()?)?;
            let y = match &bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            };
            let mut out_dims = dims;
            out_dims[last] = weight.dim(0)?;
            y.reshape(out_dims)
        };
        let w = self.weight.clone();
        let backward = move |g: &Tensor| {
            let dims = g.dims().to_vec();
            let last = dims.len() - 1;
            let rows = g.elem_count() / dims[last];
            let gx = g.reshape((rows, dims[last]))?.matmul(&w)?;
            let mut in_dims = dims;
            in_dims[last] = w.dim(1)?;
            gx.reshape(in_dims)
        };
        Ok(input_grad_only("linear", x, forward, backward)?)
    }
}

/// A frozen 2-D convolution (groups 1, dilation 1) with symmetric padding.
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// Loads `{prefix}.weight` (`[out, in, k, k]`) and `{prefix}.bias`.
    pub fn new(w: &Weights, prefix: &str, stride: usize, padding: usize) -> Result<Self> {
        let weight = w.get4(&format!("{prefix}.weight"))?;
        let bias = Some(w.get_shaped(&format!("{prefix}.bias"), &[weight.dim(0)?])?);
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
        })
    }

    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }

    /// The dtype the layer computes in (its weights').
    pub fn dtype(&self) -> DType {
        self.weight.dtype()
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, in_h, in_w) = x.dims4()?;
        let layer = self.clone();
        let backward = move |g: &Tensor| layer.input_grad(g, in_h, in_w);
        Ok(input_grad_only("conv2d", x, |x| self.apply(x), backward)?)
    }

    /// The convolution of a tensor off the graph.
    fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = conv2d(x, &self.weight, self.padding, self.stride)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
            None => Ok(y),
        }
    }

    /// d(loss)/d(input) for an input of `in_h` x `in_w` from the output gradient `g`.
    fn input_grad(&self, g: &Tensor, in_h: usize, in_w: usize) -> candle_core::Result<Tensor> {
        let (w, stride, padding) = (&self.weight, self.stride, self.padding);
        if is_cpu_f32(&[g, w]) {
            return conv2d_input_grad_cpu(g, w, stride, padding, in_h, in_w);
        }
        // The transposed, flipped kernel is made for each backward pass and dropped:
        // keeping it would double the UNet's convolution weights in memory.
        let kernel = input_grad_kernel(w)?;
        conv2d_input_grad(g, &kernel, stride, padding, in_h, in_w)
    }

    /// `self(silu(norm(x)))` as one layer, as every resnet block starts its two halves.
    /// As three layers the graph kept the norm's input, the norm's output and the SiLU's
    /// output for the backward pass; as one it keeps only `x` and recomputes the norm and
    /// the SiLU there (two cheap elementwise passes), which saves two activations per
    /// half-block and two graph nodes.
    pub fn forward_after_norm_silu(&self, norm: &GroupNorm, x: &Tensor) -> Result<Tensor> {
        if !x.track_op() {
            return self.forward(&silu(&norm.forward(x)?)?);
        }
        let (_, _, in_h, in_w) = x.dims4()?;
        let (conv, norm_b) = (self.clone(), norm.clone());
        Ok(input_grad_only_saving(
            "norm_silu_conv",
            x,
            |x: &Tensor| Ok((self.apply(&norm.apply(x)?.0.silu()?)?, ())),
            move |g: &Tensor, x: &Tensor, _: &Tensor, _: &()| {
                let (a, stats) = norm_b.apply(x)?;
                let gs = conv.input_grad(g, in_h, in_w)?;
                let ga = silu_grad(&gs, &a)?;
                norm_b.input_grad(&ga, x, stats.as_ref())
            },
        )?)
    }
}

/// A 2-D convolution (groups 1, dilation 1). On the CPU in f32 it lays the input out as
/// columns (`[C*k*k, H'*W']`, each row a shifted copy of one channel) and runs one matrix
/// product with the kernel, which is about twice as fast as candle's own CPU convolution
/// and yields NCHW directly; elsewhere it is candle's.
pub fn conv2d(
    x: &Tensor,
    kernel: &Tensor,
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    if !(x.device().is_cpu() && x.dtype() == DType::F32 && kernel.dtype() == DType::F32) {
        return x.conv2d(kernel, padding, stride, 1, 1);
    }
    let (b, c, h, w) = x.dims4()?;
    let (o, kc, kh, kw) = kernel.dims4()?;
    if kc != c || h + 2 * padding < kh || w + 2 * padding < kw || stride == 0 {
        return x.conv2d(kernel, padding, stride, 1, 1);
    }
    let oh = (h + 2 * padding - kh) / stride + 1;
    let ow = (w + 2 * padding - kw) / stride + 1;
    let k = c * kh * kw;
    let weights = kernel.reshape((o, k))?;
    if kh == 1 && kw == 1 && stride == 1 && padding == 0 {
        let y = weights.broadcast_matmul(&x.reshape((b, c, h * w))?)?;
        return y.reshape((b, o, h, w));
    }
    let cols = with_f32(x, |src| {
        let n = oh * ow;
        let mut cols = vec![0f32; b * k * n];
        use rayon::prelude::*;
        cols.par_chunks_mut(n).enumerate().for_each(|(row, out)| {
            let bi = row / k;
            let r = row % k;
            let (ci, ky, kx) = (r / (kh * kw), (r / kw) % kh, r % kw);
            let plane = &src[(bi * c + ci) * h * w..(bi * c + ci + 1) * h * w];
            for oy in 0..oh {
                let iy = (oy * stride + ky) as isize - padding as isize;
                if iy < 0 || iy >= h as isize {
                    continue;
                }
                let line = &plane[iy as usize * w..(iy as usize + 1) * w];
                let dst = &mut out[oy * ow..(oy + 1) * ow];
                if stride == 1 {
                    if let Some((start, end, from)) = shifted_span(w, ow, kx, padding) {
                        dst[start..end].copy_from_slice(&line[from..from + (end - start)]);
                    }
                } else {
                    for (ox, d) in dst.iter_mut().enumerate() {
                        if let Some(ix) = input_index(ox, stride, kx, padding, w) {
                            *d = line[ix];
                        }
                    }
                }
            }
        });
        cols
    })?;
    let cols = Tensor::from_vec(cols, (b, k, oh * ow), x.device())?;
    weights.broadcast_matmul(&cols)?.reshape((b, o, oh, ow))
}

/// d(loss)/d(input) of a convolution on the CPU in f32, as torch computes it: one matrix
/// product of the kernel's transpose (a view, no copy) with the output gradient gives the
/// gradient of every column of the forward pass's column matrix (`[C*k*k, H'*W']`), and
/// `col2im` adds each column back onto the input pixels it was copied from. No flipped
/// kernel is built (rebuilding it in every backward pass cost more than the product on the
/// large UNet layers) and strided layers need no zero-dilated gradient.
fn conv2d_input_grad_cpu(
    g: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
    in_h: usize,
    in_w: usize,
) -> candle_core::Result<Tensor> {
    use rayon::prelude::*;
    let (b, o, oh, ow) = g.dims4()?;
    let (wo, c, kh, kw) = weight.dims4()?;
    if wo != o || stride == 0 {
        candle_core::bail!(
            "conv2d backward: gradient {:?} vs kernel {:?}",
            g.dims(),
            weight.dims()
        );
    }
    let k = c * kh * kw;
    let n = oh * ow;
    let wt = weight.reshape((o, k))?.t()?;
    if kh == 1 && kw == 1 && stride == 1 && padding == 0 && (oh, ow) == (in_h, in_w) {
        let gx = wt.broadcast_left(b)?.matmul(&g.reshape((b, o, n))?)?;
        return gx.reshape((b, c, in_h, in_w));
    }
    let mut out = vec![0f32; b * c * in_h * in_w];
    for bi in 0..b {
        let cols = wt.matmul(&g.get(bi)?.reshape((o, n))?)?;
        let plane_len = in_h * in_w;
        let dst_batch = &mut out[bi * c * plane_len..(bi + 1) * c * plane_len];
        with_f32(&cols, |cols| {
            dst_batch
                .par_chunks_mut(plane_len)
                .enumerate()
                .for_each(|(ci, plane)| {
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let row = (ci * kh + ky) * kw + kx;
                            let src = &cols[row * n..(row + 1) * n];
                            for oy in 0..oh {
                                let iy = (oy * stride + ky) as isize - padding as isize;
                                if iy < 0 || iy >= in_h as isize {
                                    continue;
                                }
                                let line = &mut plane[iy as usize * in_w..(iy as usize + 1) * in_w];
                                let srow = &src[oy * ow..(oy + 1) * ow];
                                if stride == 1 {
                                    if let Some((start, end, from)) =
                                        shifted_span(in_w, ow, kx, padding)
                                    {
                                        for (d, &v) in line[from..from + (end - start)]
                                            .iter_mut()
                                            .zip(&srow[start..end])
                                        {
                                            *d += v;
                                        }
                                    }
                                } else {
                                    for (ox, &v) in srow.iter().enumerate() {
                                        if let Some(ix) = input_index(ox, stride, kx, padding, in_w)
                                        {
                                            line[ix] += v;
                                        }
                                    }
                                }
                            }
                        }
                    }
                });
        })?;
    }
    Tensor::from_vec(out, (b, c, in_h, in_w), g.device())
}

/// In a row of a column matrix (kernel column `kx`), output `x` reads input
/// `x * stride + kx - padding`: that input index, when it lies inside `0..w`.
fn input_index(ox: usize, stride: usize, kx: usize, padding: usize, w: usize) -> Option<usize> {
    let ix = (ox * stride + kx) as isize - padding as isize;
    (ix >= 0 && ix < w as isize).then_some(ix as usize)
}

/// With stride 1 a column row is the input row shifted by `kx - padding`: the output
/// range `start..end` (of `0..ow`) that reads inside `0..w`, and the input index of
/// `start`.
fn shifted_span(w: usize, ow: usize, kx: usize, padding: usize) -> Option<(usize, usize, usize)> {
    let shift = kx as isize - padding as isize;
    let start = (-shift).max(0) as usize;
    let end = (w as isize - shift).min(ow as isize).max(0) as usize;
    (start < end).then(|| (start, end, (start as isize + shift) as usize))
}

/// The kernel flipped in space and transposed in channels: `[in, out, k, k]` (the GPU
/// path of the input gradient; the CPU computes it by col2im).
fn input_grad_kernel(weight: &Tensor) -> candle_core::Result<Tensor> {
    weight
        .transpose(0, 1)?
        .contiguous()?
        .flip(&[2, 3])?
        .contiguous()
}

/// d(loss)/d(input) of a convolution: the output gradient, dilated by the stride,
/// convolved with `kernel` (from [`input_grad_kernel`]).
fn conv2d_input_grad(
    g: &Tensor,
    kernel: &Tensor,
    stride: usize,
    padding: usize,
    in_h: usize,
    in_w: usize,
) -> candle_core::Result<Tensor> {
    let (_, _, k_h, k_w) = kernel.dims4()?;
    if k_h == 1 && k_w == 1 && stride == 1 && padding == 0 {
        return conv2d(g, kernel, 0, 1);
    }
    if k_h != k_w || padding >= k_h {
        candle_core::bail!("conv2d backward: unsupported kernel {k_h}x{k_w} padding {padding}");
    }
    let g = if stride > 1 {
        dilate(g, stride)?
    } else {
        g.clone()
    };
    let gx = conv2d(&g, kernel, k_h - 1 - padding, 1)?;
    fit_spatial(&gx, in_h, in_w)
}

/// Inserts `stride - 1` zeros after every element along both spatial dimensions.
fn dilate(g: &Tensor, stride: usize) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = g.dims4()?;
    let g = g.reshape((b, c, h, 1, w, 1))?;
    let g = g.pad_with_zeros(5, 0, stride - 1)?;
    let g = g.pad_with_zeros(3, 0, stride - 1)?;
    g.reshape((b, c, h * stride, w * stride))
}

/// Crops or zero-pads (at the end) the spatial dimensions to `h` x `w`.
fn fit_spatial(x: &Tensor, h: usize, w: usize) -> candle_core::Result<Tensor> {
    let (_, _, xh, xw) = x.dims4()?;
    let x = if xh > h {
        x.narrow(2, 0, h)?
    } else {
        x.pad_with_zeros(2, 0, h - xh)?
    };
    if xw > w {
        x.narrow(3, 0, w)
    } else {
        x.pad_with_zeros(3, 0, w - xw)
    }
}

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
        if groups == 0 || channels % groups != 0 {
            return Err(crate::error::Error::config(
                format!("{prefix}: norm_num_groups"),
                format!("{channels} channels cannot be split into {groups} groups"),
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
    fn apply(&self, x: &Tensor) -> candle_core::Result<(Tensor, Option<Stats>)> {
        let dims = x.dims().to_vec();
        let b = dims[0];
        let (groups, eps) = (self.groups, self.eps);
        let (weight, bias) = (&self.weight, &self.bias);
        if x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32 {
            let (y, stats) = group_norm_cpu(x, weight, bias, groups, eps)?;
            return Ok((y, Some(stats)));
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
    fn input_grad(
        &self,
        g: &Tensor,
        x: &Tensor,
        stats: Option<&Stats>,
    ) -> candle_core::Result<Tensor> {
        let b = x.dim(0)?;
        let groups = self.groups;
        let xg = x.reshape((b, groups, ()))?;
        let (mean, rstd) = stats_or_recomputed(stats, &xg, self.eps)?;
        if is_cpu_f32(&[g, x, &mean, &rstd, &self.weight]) {
            return group_norm_backward_cpu(g, x, &mean, &rstd, &self.weight, groups);
        }
        let (gamma, _) = self.affine(x.rank())?;
        let gs = g.broadcast_mul(&gamma)?.reshape((b, groups, ()))?;
        let gx = normalise_last_dim_backward(&gs, &xg, &mean, &rstd)?;
        gx.reshape(g.dims())
    }
}

/// Per-group (or per-row) mean and `1/std`, `[..., 1]`.
type Stats = (Tensor, Tensor);

/// Group normalisation of f32 CPU data in one pass per group (statistics accumulated in
/// f64, then the normalised, scaled and shifted values written), in parallel over groups;
/// returns the output and the per-group mean and `1/std` (`[B, G, 1]`, f32).
fn group_norm_cpu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
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
                let mean = part.iter().map(|&v| v as f64).sum::<f64>() / per_group as f64;
                let var =
                    part.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / per_group as f64;
                let rstd = 1.0 / (var + eps).sqrt();
                let first_channel = (gi % groups) * (c / groups);
                for (ch, (d, s)) in dst
                    .chunks_mut(per_channel)
                    .zip(part.chunks(per_channel))
                    .enumerate()
                {
                    let scale = rstd as f32 * gamma[first_channel + ch];
                    let shift = beta[first_channel + ch] - mean as f32 * scale;
                    for (o, &v) in d.iter_mut().zip(s) {
                        *o = v * scale + shift;
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

fn is_cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// Runs `f` on the contiguous f32 values of `t` (CPU), without copying them.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => {
            let start = layout.start_offset();
            let values = v
                .get(start..start + t.elem_count())
                .ok_or_else(|| candle_core::Error::Msg("tensor storage too short".into()))?;
            Ok(f(values))
        }
        _ => candle_core::bail!("expected f32 cpu storage"),
    }
}

/// `f(a)` elementwise over an f32 CPU tensor, in parallel, one pass.
fn map_cpu(a: &Tensor, f: impl Fn(f32) -> f32 + Sync) -> candle_core::Result<Tensor> {
    use rayon::prelude::*;
    let out = with_f32(a, |av| {
        let mut out = vec![0f32; av.len()];
        out.par_chunks_mut(1 << 14)
            .zip(av.par_chunks(1 << 14))
            .for_each(|(o, x)| {
                for (o, &x) in o.iter_mut().zip(x) {
                    *o = f(x);
                }
            });
        out
    })?;
    Tensor::from_vec(out, a.dims(), a.device())
}

/// `f(a, b)` elementwise over two same-shaped f32 CPU tensors, in parallel, one pass.
fn zip_cpu(
    a: &Tensor,
    b: &Tensor,
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> candle_core::Result<Tensor> {
    use rayon::prelude::*;
    if a.dims() != b.dims() {
        candle_core::bail!("shape mismatch {:?} vs {:?}", a.dims(), b.dims());
    }
    let out = with_f32(a, |av| {
        with_f32(b, |bv| {
            let mut out = vec![0f32; av.len()];
            out.par_chunks_mut(1 << 14)
                .zip(av.par_chunks(1 << 14).zip(bv.par_chunks(1 << 14)))
                .for_each(|(o, (x, y))| {
                    for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
                        *o = f(x, y);
                    }
                });
            out
        })
    })??;
    Tensor::from_vec(out, a.dims(), a.device())
}

/// The input gradient of [`group_norm_cpu`]: per group, with `gs = g * gamma` and
/// `xhat = (x - mean) * rstd`, `rstd * (gs - mean(gs) - xhat * mean(gs * xhat))`; two
/// passes per group, in parallel over groups.
fn group_norm_backward_cpu(
    g: &Tensor,
    x: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    weight: &Tensor,
    groups: usize,
) -> candle_core::Result<Tensor> {
    use rayon::prelude::*;
    let dims = g.dims().to_vec();
    let c = dims[1];
    let per_channel: usize = dims[2..].iter().product();
    let per_group = (c / groups) * per_channel;
    let gamma: Vec<f32> = weight.to_vec1()?;
    let means: Vec<f32> = mean.flatten_all()?.to_vec1()?;
    let rstds: Vec<f32> = rstd.flatten_all()?.to_vec1()?;
    let out = with_f32(g, |gv| {
        with_f32(x, |xv| {
            let mut out = vec![0f32; gv.len()];
            out.par_chunks_mut(per_group)
                .enumerate()
                .for_each(|(gi, dst)| {
                    let range = gi * per_group..(gi + 1) * per_group;
                    let (gp, xp) = (&gv[range.clone()], &xv[range]);
                    let (m, r) = (means[gi], rstds[gi]);
                    let first_channel = (gi % groups) * (c / groups);
                    let (mut sum_g, mut sum_gx) = (0f64, 0f64);
                    for (ch, (gc, xc)) in gp
                        .chunks(per_channel)
                        .zip(xp.chunks(per_channel))
                        .enumerate()
                    {
                        let w = gamma[first_channel + ch];
                        for (&gi, &xi) in gc.iter().zip(xc) {
                            let gs = (gi * w) as f64;
                            sum_g += gs;
                            sum_gx += gs * ((xi - m) * r) as f64;
                        }
                    }
                    let mean_g = (sum_g / per_group as f64) as f32;
                    let mean_gx = (sum_gx / per_group as f64) as f32;
                    for (ch, ((d, gc), xc)) in dst
                        .chunks_mut(per_channel)
                        .zip(gp.chunks(per_channel))
                        .zip(xp.chunks(per_channel))
                        .enumerate()
                    {
                        let w = gamma[first_channel + ch];
                        for ((o, &gi), &xi) in d.iter_mut().zip(gc).zip(xc) {
                            let xhat = (xi - m) * r;
                            *o = r * (gi * w - mean_g - xhat * mean_gx);
                        }
                    }
                });
            out
        })
    })??;
    Tensor::from_vec(out, dims, g.device())
}

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

/// Whether a norm's forward pass runs candle-nn's fused layer-norm kernel: on GPUs (where
/// the composed version costs a dozen kernel launches), not in f64 (no such kernel) and
/// not on the CPU (which has its own fused group norm and keeps the exact composition).
fn uses_fused_norm(x: &Tensor) -> bool {
    !x.device().is_cpu() && x.dtype() != DType::F64
}

/// The statistics a forward pass kept, or those of `x` over its last dimension when it
/// kept none (a fused kernel computed them): the mean and `1/sqrt(var + eps)`, in f32 at
/// least.
fn stats_or_recomputed(stats: Option<&Stats>, x: &Tensor, eps: f64) -> candle_core::Result<Stats> {
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
fn normalise_last_dim(x: &Tensor, eps: f64) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
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
fn normalise_last_dim_backward(
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

/// Softmax over the last dimension with its own backward: `y * (g - sum(g * y))`, `y`
/// being the op's own output.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let forward = |x: &Tensor| Ok((candle_nn::ops::softmax_last_dim(&x.contiguous()?)?, ()));
    let backward = |g: &Tensor, _: &Tensor, y: &Tensor, _: &()| {
        let dot = (g * y)?.sum_keepdim(D::Minus1)?;
        y * g.broadcast_sub(&dot)?
    };
    Ok(input_grad_only_saving("softmax", x, forward, backward)?)
}

/// `x * sigmoid(x)`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    let forward = |x: &Tensor| Ok((x.silu()?, ()));
    let backward = |g: &Tensor, x: &Tensor, _: &Tensor, _: &()| silu_grad(g, x);
    Ok(input_grad_only_saving("silu", x, forward, backward)?)
}

/// The input gradient of SiLU at `x` for the output gradient `g`:
/// `g * s (1 + x (1 - s))`, `s = sigmoid(x)`.
fn silu_grad(g: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
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

/// CLIP's `x * sigmoid(1.702 x)`.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    let forward = |x: &Tensor| {
        let s = candle_nn::ops::sigmoid(&(x * 1.702)?)?;
        Ok(((x * &s)?, ()))
    };
    let backward = |g: &Tensor, x: &Tensor, _: &Tensor, _: &()| {
        let s = candle_nn::ops::sigmoid(&(x * 1.702)?)?;
        // s + 1.702 x s (1 - s)
        let d = (&s + ((x * &s)? * (1.0 - &s)?)?.affine(1.702, 0.0)?)?;
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

/// Nearest-neighbour upsampling to `h` x `w` (torch's `nearest`: source index
/// `floor(dst * in / out)`); exact 2x takes the fast path below, other sizes gather rows
/// and columns (whose backward candle provides).
pub fn upsample_nearest_to(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, xh, xw) = x.dims4()?;
    if h == 2 * xh && w == 2 * xw {
        return upsample_nearest_2x(x);
    }
    let index = |out: usize, inp: usize| -> Result<Tensor> {
        let idx: Vec<u32> = (0..out)
            .map(|d| ((d as f64 * inp as f64 / out as f64).floor() as usize).min(inp - 1) as u32)
            .collect();
        Ok(Tensor::from_vec(idx, out, x.device())?)
    };
    let rows = x.index_select(&index(h, xh)?, 2)?;
    Ok(rows.index_select(&index(w, xw)?, 3)?)
}

/// Nearest-neighbour 2x upsampling; its input gradient sums each 2x2 block.
pub fn upsample_nearest_2x(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let forward = |x: &Tensor| x.upsample_nearest2d(2 * h, 2 * w);
    let backward = |g: &Tensor| g.avg_pool2d(2)? * 4.0;
    Ok(input_grad_only("upsample", x, forward, backward)?)
}

/// Carries a precomputed attention output into the graph; the backward pass recomputes
/// the probabilities chunk by chunk instead of keeping the `[T, T]` matrices alive.
struct AttentionOp {
    output: Mutex<Option<Tensor>>,
    scale: f64,
    mask: Option<Tensor>,
    need: [bool; 3],
}

/// Score-matrix values per block on the CPU: small enough that a block's scores,
/// probabilities and their gradients stay in cache (measured: 512-row blocks of a
/// 4096-token head run the backward pass twice as fast as whole heads on the CPU).
const ATTENTION_BLOCK_CPU: usize = 2 * 1024 * 1024;

/// On a GPU, blocks only bound memory (a block of 64M scores is 128 MiB in bf16) while
/// keeping the number of kernel launches small: at 512 px and batch 8 the largest
/// self-attention is 16 blocks of 4 heads.
const ATTENTION_BLOCK_GPU: usize = 64 * 1024 * 1024;

fn attention_block(device: &candle_core::Device) -> usize {
    if device.is_cpu() {
        ATTENTION_BLOCK_CPU
    } else {
        ATTENTION_BLOCK_GPU
    }
}

/// Rows of one slice per block when a slice's `tq x tk` scores exceed `block`.
fn block_rows(tq: usize, tk: usize, block: usize) -> usize {
    (block / tk.max(1)).clamp(64, tq.max(1))
}

/// The blocks of an attention over `[slices, tq, _]` x `[slices, tk, _]` with `block`
/// scores at most per block: whole slices while several fit in a block, else rows of one
/// slice.
fn attention_blocks(
    slices: usize,
    tq: usize,
    tk: usize,
    block: usize,
) -> Vec<(usize, usize, usize, usize)> {
    let per_slice = (tq * tk).max(1);
    let mut blocks = Vec::new();
    if per_slice <= block {
        let chunk = (block / per_slice).clamp(1, slices.max(1));
        for s in (0..slices).step_by(chunk) {
            blocks.push((s, chunk.min(slices - s), 0, tq));
        }
    } else {
        let rows = block_rows(tq, tk, block);
        for s in 0..slices {
            for r in (0..tq).step_by(rows) {
                blocks.push((s, 1, r, rows.min(tq - r)));
            }
        }
    }
    blocks
}

fn attention_probs(
    q: &Tensor,
    k_t: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    // Scaling q ([T, d]) is cheaper than scaling the [T, T] scores.
    let scores = (q * scale)?.matmul(k_t)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    candle_nn::ops::softmax_last_dim(&scores)
}

/// The rows `r .. r + n` of the `[T, T]` mask.
fn mask_rows(mask: Option<&Tensor>, r: usize, n: usize) -> candle_core::Result<Option<Tensor>> {
    mask.map(|m| m.narrow(0, r, n)).transpose()
}

fn attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let (slices, tq, _) = q.dims3()?;
    let tk = k.dim(1)?;
    let block = attention_block(q.device());
    let k_t = k.transpose(1, 2)?.contiguous()?;
    let mut outs = Vec::new();
    for (s, len, r, n) in attention_blocks(slices, tq, tk, block) {
        let p = attention_probs(
            &q.narrow(0, s, len)?.narrow(1, r, n)?,
            &k_t.narrow(0, s, len)?,
            scale,
            mask_rows(mask, r, n)?.as_ref(),
        )?;
        outs.push(p.matmul(&v.narrow(0, s, len)?)?);
    }
    if outs.len() == 1 {
        Ok(outs.remove(0))
    } else if tq * tk <= block {
        Tensor::cat(&outs, 0)
    } else {
        // Row blocks of each slice, slice after slice.
        let per = tq.div_ceil(block_rows(tq, tk, block));
        let rows: Vec<Tensor> = outs
            .chunks(per)
            .map(|c| Tensor::cat(c, 1))
            .collect::<candle_core::Result<_>>()?;
        Tensor::cat(&rows, 0)
    }
}

impl candle_core::CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "sdti-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_result(take_output(&self.output)?)
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        cuda_result(take_output(&self.output)?)
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        metal_result(take_output(&self.output)?)
    }

    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        profile::time("attention", Pass::Backward, g.device(), || {
            self.backward(q, k, v, res, g)
        })
    }
}

impl AttentionOp {
    #[allow(clippy::type_complexity)]
    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v, out) = (q.detach(), k.detach(), v.detach(), res.detach());
        let (slices, tq, _) = q.dims3()?;
        let tk = k.dim(1)?;
        let k_t = k.transpose(1, 2)?.contiguous()?;
        let v_t = v.transpose(1, 2)?.contiguous()?;
        let mut dq_rows: Vec<Tensor> = Vec::new();
        let (mut dqs, mut dks, mut dvs) = (Vec::new(), Vec::new(), Vec::new());
        // dk and dv of the slice (chunk) being worked on, summed over its row blocks.
        let mut acc: Option<(usize, Option<Tensor>, Option<Tensor>)> = None;
        let flush = |acc: &mut Option<(usize, Option<Tensor>, Option<Tensor>)>,
                     dks: &mut Vec<Tensor>,
                     dvs: &mut Vec<Tensor>| {
            if let Some((_, dk, dv)) = acc.take() {
                dks.extend(dk);
                dvs.extend(dv);
            }
        };
        let block = attention_block(q.device());
        for (s, len, r, n) in attention_blocks(slices, tq, tk, block) {
            if acc.as_ref().is_some_and(|(cur, _, _)| *cur != s) {
                flush(&mut acc, &mut dks, &mut dvs);
                if !dq_rows.is_empty() {
                    dqs.push(Tensor::cat(&dq_rows, 1)?);
                    dq_rows.clear();
                }
            }
            let qc = q.narrow(0, s, len)?.narrow(1, r, n)?;
            let gc = g.narrow(0, s, len)?.narrow(1, r, n)?;
            let p = attention_probs(
                &qc,
                &k_t.narrow(0, s, len)?,
                self.scale,
                mask_rows(self.mask.as_ref(), r, n)?.as_ref(),
            )?;
            let entry = acc.get_or_insert((s, None, None));
            if self.need[2] {
                let dv = p.t()?.matmul(&gc)?;
                entry.2 = Some(match entry.2.take() {
                    Some(sum) => (sum + dv)?,
                    None => dv,
                });
            }
            if self.need[0] || self.need[1] {
                let dp = gc.matmul(&v_t.narrow(0, s, len)?)?;
                // sum_j dP_ij P_ij equals dO_i . O_i (as flash attention computes it):
                // a [T, d] product instead of another pass over [T, T].
                let oc = out.narrow(0, s, len)?.narrow(1, r, n)?;
                let dot = (&gc * oc)?.sum_keepdim(D::Minus1)?;
                // The scale is applied to the [T, d] results, not to the [T, T] matrix.
                let ds = (p * dp.broadcast_sub(&dot)?)?;
                if self.need[0] {
                    dq_rows.push((ds.matmul(&k.narrow(0, s, len)?)? * self.scale)?);
                }
                if self.need[1] {
                    let dk = (ds.t()?.matmul(&qc)? * self.scale)?;
                    entry.1 = Some(match entry.1.take() {
                        Some(sum) => (sum + dk)?,
                        None => dk,
                    });
                }
            }
        }
        flush(&mut acc, &mut dks, &mut dvs);
        if !dq_rows.is_empty() {
            dqs.push(Tensor::cat(&dq_rows, 1)?);
        }
        let join = |parts: Vec<Tensor>| -> candle_core::Result<Option<Tensor>> {
            if parts.is_empty() {
                Ok(None)
            } else {
                Tensor::cat(&parts, 0).map(Some)
            }
        };
        Ok((join(dqs)?, join(dks)?, join(dvs)?))
    }
}

/// `softmax(q k^T * scale + mask) v` over `[batch*heads, tokens, head_dim]` tensors.
/// Memory-bounded: the forward pass works in chunks of slices and the backward pass
/// recomputes the probabilities, so no `[T, T]` matrix outlives its chunk.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let need = [q.track_op(), k.track_op(), v.track_op()];
    if !need.iter().any(|&n| n) {
        return Ok(profile::time(
            "attention",
            Pass::Forward,
            q.device(),
            || attention_forward(&q, &k, &v, scale, mask),
        )?);
    }
    let out = profile::time("attention", Pass::Forward, q.device(), || {
        standalone(attention_forward(
            &q.detach(),
            &k.detach(),
            &v.detach(),
            scale,
            mask,
        )?)
    })?;
    let op = AttentionOp {
        output: Mutex::new(Some(out)),
        scale,
        mask: mask.cloned(),
        need,
    };
    Ok(q.apply_op3(&k, &v, op)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Blocked attention (whole slices, and row blocks of long slices) gives the output
    /// and the q, k, v gradients of the plain composition, which candle differentiates.
    #[test]
    fn blocked_attention_matches_the_plain_composition() -> candle_core::Result<()> {
        use candle_core::Var;
        let d = Device::Cpu;
        for (slices, t, dh) in [(3usize, 50usize, 8usize), (2, 1500, 8)] {
            let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (slices, t, dh), &d)?)?;
            let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (slices, t, dh), &d)?)?;
            let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (slices, t, dh), &d)?)?;
            let w = Tensor::randn(0f32, 1.0, (slices, t, dh), &d)?;
            let scale = 0.3;
            let ours = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale, None)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            let scores = (q.as_tensor().matmul(&k.as_tensor().t()?)? * scale)?;
            let max = scores.max_keepdim(D::Minus1)?.detach();
            let e = scores.broadcast_sub(&max)?.exp()?;
            let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
            let plain = p.matmul(v.as_tensor())?;
            let diff = (&ours - &plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "output {slices}x{t}: {diff}");
            let g_ours = (ours * &w)?.sum_all()?.backward()?;
            let g_plain = (plain * &w)?.sum_all()?.backward()?;
            for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
                let a = g_ours.get(var.as_tensor()).expect("gradient");
                let b = g_plain.get(var.as_tensor()).expect("gradient");
                let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let size = b.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    diff <= 1e-4 * size.max(1.0),
                    "d{name} {slices}x{t}: {diff} (max {size})"
                );
            }
        }
        Ok(())
    }

    /// (batch, channels, height, width, out channels, kernel, padding, stride): odd sizes,
    /// strides 1 and 2, paddings 0 to 2, 1x1 and 3x3 kernels.
    type ConvCase = (usize, usize, usize, usize, usize, usize, usize, usize);
    const CONV_CASES: &[ConvCase] = &[
        (2, 3, 7, 9, 5, 3, 1, 1),
        (1, 4, 8, 8, 6, 3, 1, 2),
        (1, 4, 9, 7, 2, 3, 1, 2),
        (1, 4, 9, 7, 2, 3, 0, 2),
        (2, 5, 6, 6, 3, 1, 0, 1),
        (1, 2, 5, 5, 2, 3, 0, 1),
        (1, 2, 5, 5, 2, 3, 2, 1),
    ];

    /// The col2im input gradient equals candle's own gradient of its convolution (and the
    /// flipped-kernel path used off the CPU) on odd sizes, strides and paddings.
    #[test]
    fn col2im_input_gradient_matches_candle() -> candle_core::Result<()> {
        use candle_core::Var;
        let d = Device::Cpu;
        for &(b, c, h, w, o, k, pad, stride) in CONV_CASES {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, h, w), &d)?)?;
            let kern = Tensor::randn(0f32, 1.0, (o, c, k, k), &d)?;
            let y = x.as_tensor().conv2d(&kern, pad, stride, 1, 1)?;
            let g = Tensor::randn(0f32, 1.0, y.dims(), &d)?;
            let want = (y * &g)?.sum_all()?.backward()?;
            let want = want.get(x.as_tensor()).expect("gradient");
            let got = conv2d_input_grad_cpu(&g, &kern, stride, pad, h, w)?;
            let flipped = conv2d_input_grad(&g, &input_grad_kernel(&kern)?, stride, pad, h, w)?;
            for (name, t) in [("col2im", &got), ("flipped kernel", &flipped)] {
                let diff = (t - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    diff < 1e-4,
                    "{name} {b}x{c}x{h}x{w} k{k} pad {pad} stride {stride}: {diff}"
                );
            }
        }
        Ok(())
    }

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

    /// The column convolution equals candle's on odd sizes, strides and paddings.
    #[test]
    fn column_conv2d_matches_candle() -> candle_core::Result<()> {
        let d = Device::Cpu;
        for &(b, c, h, w, o, k, pad, stride) in CONV_CASES {
            let x = Tensor::randn(0f32, 1.0, (b, c, h, w), &d)?;
            let kern = Tensor::randn(0f32, 1.0, (o, c, k, k), &d)?;
            let want = x.conv2d(&kern, pad, stride, 1, 1)?;
            let got = conv2d(&x, &kern, pad, stride)?;
            assert_eq!(got.dims(), want.dims());
            let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff < 1e-4,
                "{b}x{c}x{h}x{w} k{k} pad {pad} stride {stride}: {diff}"
            );
        }
        Ok(())
    }
}
