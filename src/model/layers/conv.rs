//! A frozen 2-D convolution: a column (im2col) forward pass on the CPU and an input
//! gradient by col2im; cuDNN's (forward with bias, input gradient) for f16/bf16 CUDA
//! tensors when cuDNN is loaded (`crate::gpu::cudnn`), candle's convolution elsewhere.

use candle_core::{DType, Tensor};

use super::activation::silu;
use super::cpu::{is_cpu_f32, with_f32, with_optional_f32};
use super::custom_op::{input_grad_only, input_grad_only_saving};
use super::gemm::{matmul, Bias};
use super::group_norm::GroupNorm;
use super::skinny;
use super::winograd::{self, Pass};
use crate::error::Result;
use crate::model::weights::Weights;

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

    /// A 1x1 convolution's kernel as a matrix (`[out, in]`) and its bias, for layers that
    /// apply it as a matrix product on tokens.
    pub(crate) fn matrix(&self) -> Result<(Tensor, Tensor)> {
        let (o, i, kh, kw) = self.weight.dims4()?;
        if (kh, kw, self.stride, self.padding) != (1, 1, 1, 0) {
            return Err(crate::error::Error::input(
                "convolution",
                format!(
                    "a {kh}x{kw} kernel (stride {}, padding {}) is not a 1x1 projection",
                    self.stride, self.padding
                ),
            ));
        }
        let bias = match &self.bias {
            Some(b) => b.clone(),
            None => Tensor::zeros(o, self.weight.dtype(), self.weight.device())?,
        };
        Ok((self.weight.reshape((o, i))?, bias))
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
    pub(crate) fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.apply_with_bias(x, self.bias.as_ref())
    }

    /// The convolution of a tensor off the graph with `bias` (`[out]`) in place of the
    /// layer's own: a resnet block folds its time embedding into its first convolution's
    /// bias, which every path adds with the product.
    pub(crate) fn apply_with_bias(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(y) =
            crate::gpu::cudnn::conv_forward(x, &self.weight, bias, self.padding, self.stride)?
        {
            return Ok(y);
        }
        if let Some(y) = winograd_forward(x, &self.weight, bias, self.stride, self.padding)? {
            return Ok(y);
        }
        conv2d(x, &self.weight, bias, self.padding, self.stride)
    }

    /// The layer's bias, `[out]`.
    pub(crate) fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// d(loss)/d(input) for an input of `in_h` x `in_w` from the output gradient `g`.
    pub(crate) fn input_grad(
        &self,
        g: &Tensor,
        in_h: usize,
        in_w: usize,
    ) -> candle_core::Result<Tensor> {
        let (w, stride, padding) = (&self.weight, self.stride, self.padding);
        if is_cpu_f32(&[g, w]) {
            if let Some(gx) = winograd_input_grad(g, w, stride, padding, in_h, in_w)? {
                return Ok(gx);
            }
            return conv2d_input_grad_cpu(g, w, stride, padding, in_h, in_w);
        }
        #[cfg(feature = "cuda")]
        if let Some(gx) = crate::gpu::cudnn::conv_input_grad(g, w, padding, stride, in_h, in_w)? {
            return Ok(gx);
        }
        // The transposed, flipped kernel is made for each backward pass and dropped:
        // keeping it would double the UNet's convolution weights in memory.
        let kernel = input_grad_kernel(w)?;
        conv2d_input_grad(g, &kernel, stride, padding, in_h, in_w)
    }

    /// `self(silu(norm(x)))` off the graph without the normalised tensor: the Winograd
    /// convolution reads `x` through the norm's per-channel affine and the SiLU, so a
    /// no-gradient resnet (the VAE's) holds its input and this output, not a third tensor
    /// between them. The values are those of the separate passes. None where that path
    /// does not serve (another device or dtype, another kind of convolution).
    pub(crate) fn apply_after_norm_silu(
        &self,
        norm: &GroupNorm,
        x: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let Some(shape) = self.fused_shape(x)? else {
            return Ok(None);
        };
        let Some(affines) = norm.channel_affines(x)? else {
            return Ok(None);
        };
        let (b, _, h, w) = shape;
        let o = self.out_channels();
        let bias = self.bias_values()?;
        let mut y = vec![0f32; b * o * h * w];
        let fused = winograd::Fused {
            norm_silu: Some(&affines),
            accumulate: false,
        };
        with_f32(x, |x| {
            self.fused_conv(x, shape, bias.as_deref(), fused, &mut y)
        })??;
        Ok(Some(Tensor::from_vec(y, (b, o, h, w), x.device())?))
    }

    /// `into += self(silu(norm(x)))`, written into `into`'s own values: a no-gradient
    /// resnet's residual sum with no tensor for its second half. Every tensor that shares
    /// `into`'s storage sees the sum, so `into` must be its storage's only holder and off
    /// the graph. Returns false, having written nothing, where the path does not serve
    /// ([`Self::apply_after_norm_silu`]).
    pub(crate) fn add_after_norm_silu(
        &self,
        norm: &GroupNorm,
        x: &Tensor,
        into: &Tensor,
    ) -> candle_core::Result<bool> {
        let Some(shape) = self.fused_shape(x)? else {
            return Ok(false);
        };
        let (b, _, h, w) = shape;
        if into.dims() != [b, self.out_channels(), h, w]
            || !is_cpu_f32(&[into])
            || into.track_op()
            || !into.is_contiguous()
        {
            return Ok(false);
        }
        let Some(affines) = norm.channel_affines(x)? else {
            return Ok(false);
        };
        let op = AddInto {
            conv: self,
            shape,
            affines,
            bias: self.bias_values()?,
        };
        into.inplace_op2(x, &op)?;
        Ok(true)
    }

    /// `x`'s shape when the fused Winograd path serves this layer's convolution of it.
    fn fused_shape(&self, x: &Tensor) -> candle_core::Result<Option<(usize, usize, usize, usize)>> {
        if x.rank() != 4 {
            return Ok(None);
        }
        winograd_shape(
            x,
            &self.weight,
            self.bias.as_ref(),
            self.stride,
            self.padding,
        )
    }

    fn bias_values(&self) -> candle_core::Result<Option<Vec<f32>>> {
        self.bias.as_ref().map(|b| b.to_vec1::<f32>()).transpose()
    }

    /// The fused Winograd convolution of `x` (`shape`, contiguous values) into `y`.
    fn fused_conv(
        &self,
        x: &[f32],
        (b, c, h, w): (usize, usize, usize, usize),
        bias: Option<&[f32]>,
        fused: winograd::Fused,
        y: &mut [f32],
    ) -> candle_core::Result<()> {
        let o = self.out_channels();
        with_f32(&self.weight, |k| {
            let spec = winograd::Spec {
                shape: (b, h, w),
                weight: k,
                channels: (o, c),
                pass: Pass::Forward,
                bias,
                fused,
                threads: candle_core::utils::get_num_threads(),
            };
            winograd::conv_into(x, spec, y)
        })?
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
                let gs = conv.input_grad(g, in_h, in_w)?;
                norm_b.silu_input_grad(&gs, x, None, None)
            },
        )?)
    }
}

/// [`Conv2d::add_after_norm_silu`] as candle's in-place op: the destination's storage is
/// written under its lock, the source (`x`) read under its own.
struct AddInto<'a> {
    conv: &'a Conv2d,
    shape: (usize, usize, usize, usize),
    affines: Vec<(f32, f32)>,
    bias: Option<Vec<f32>>,
}

impl candle_core::InplaceOp2 for AddInto<'_> {
    fn name(&self) -> &'static str {
        "add_conv_after_norm_silu"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let name = self.name();
        let (candle_core::CpuStorage::F32(dst), candle_core::CpuStorage::F32(src)) = (s1, s2)
        else {
            candle_core::bail!("{name}: expected f32 storage");
        };
        let values = |layout: &candle_core::Layout, len: usize| {
            layout
                .contiguous_offsets()
                .filter(|(start, end)| end - start == len)
                .ok_or_else(|| candle_core::Error::Msg(format!("{name}: not contiguous")))
        };
        let (b, c, h, w) = self.shape;
        let (xs, xe) = values(l2, b * c * h * w)?;
        let (ys, ye) = values(l1, b * self.conv.out_channels() * h * w)?;
        let (Some(x), Some(y)) = (src.get(xs..xe), dst.get_mut(ys..ye)) else {
            candle_core::bail!("{name}: storage too short");
        };
        let fused = winograd::Fused {
            norm_silu: Some(&self.affines),
            accumulate: true,
        };
        self.conv
            .fused_conv(x, self.shape, self.bias.as_deref(), fused, y)
    }
}

/// A 2-D convolution (groups 1, dilation 1). On the CPU in f32 it lays the input out as
/// columns (`[C*k*k, H'*W']`, each row a shifted copy of one channel) and runs one matrix
/// product with the kernel, which is about twice as fast as candle's own CPU convolution
/// and yields NCHW directly; elsewhere it is candle's.
fn conv2d(
    x: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    conv2d_within(x, kernel, bias, padding, stride, COLUMN_BUDGET)
}

/// candle's convolution, plus `bias` per output channel.
fn candle_conv2d(
    x: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    let y = x.conv2d(kernel, padding, stride, 1, 1)?;
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
        None => Ok(y),
    }
}

/// [`conv2d`] building at most `budget` column values at once.
fn conv2d_within(
    x: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
    budget: usize,
) -> candle_core::Result<Tensor> {
    let mut operands = vec![x, kernel];
    operands.extend(bias);
    if !is_cpu_f32(&operands) {
        return candle_conv2d(x, kernel, bias, padding, stride);
    }
    let (b, c, h, w) = x.dims4()?;
    let (o, kc, kh, kw) = kernel.dims4()?;
    if kc != c || h + 2 * padding < kh || w + 2 * padding < kw || stride == 0 {
        return candle_conv2d(x, kernel, bias, padding, stride);
    }
    let row_bias = match bias {
        Some(t) => Bias::Rows(t),
        None => Bias::None,
    };
    let oh = (h + 2 * padding - kh) / stride + 1;
    let ow = (w + 2 * padding - kw) / stride + 1;
    let k = c * kh * kw;
    let weights = kernel.reshape((o, k))?;
    if kh == 1 && kw == 1 && stride == 1 && padding == 0 {
        let x = x.reshape((b, c, h * w))?;
        if h * w == skinny::COLS && skinny::available() {
            return skinny_forward(&weights, &x, bias, (b, o, h, w));
        }
        let y = matmul(&weights, &x, row_bias, None)?;
        return y.reshape((b, o, h, w));
    }
    let geo = ColumnGeometry {
        kh,
        kw,
        stride,
        padding,
        in_h: h,
        in_w: w,
        oh,
        ow,
    };
    let n = oh * ow;
    // Output rows per column matrix: the whole batch at once while its columns fit the
    // budget, else bands of rows of one image at a time (a 3x3 convolution over 128
    // channels at 512x512, the VAE's first layers, has 1.2 GB of columns).
    let band = (budget / (k * ow).max(1)).clamp(1, oh);
    if band == oh && b * k * n <= budget {
        let cols = columns(x, &geo, 0..b, 0..oh)?;
        let cols = Tensor::from_vec(cols, (b, k, n), x.device())?;
        if n == skinny::COLS && skinny::available() {
            return skinny_forward(&weights, &cols, bias, (b, o, oh, ow));
        }
        return matmul(&weights, &cols, row_bias, None)?.reshape((b, o, oh, ow));
    }
    let mut out = vec![0f32; b * o * n];
    for bi in 0..b {
        for first in (0..oh).step_by(band) {
            let rows = first..(first + band).min(oh);
            let span = rows.len() * ow;
            let cols =
                Tensor::from_vec(columns(x, &geo, bi..bi + 1, rows)?, (k, span), x.device())?;
            let y = matmul(&weights, &cols, row_bias, None)?;
            with_f32(&y, |y| {
                for (oc, part) in y.chunks(span).enumerate() {
                    let at = (bi * o + oc) * n + first * ow;
                    out[at..at + span].copy_from_slice(part);
                }
            })?;
        }
    }
    Tensor::from_vec(out, (b, o, oh, ow), x.device())
}

/// `x`'s shape `(b, c, h, w)` when [`winograd`] serves its convolution with `kernel` (plus
/// `bias`): f32 on the CPU, the path on, 3x3, stride 1, padding 1, large enough.
fn winograd_shape(
    x: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Option<(usize, usize, usize, usize)>> {
    let mut operands = vec![x, kernel];
    operands.extend(bias);
    if !is_cpu_f32(&operands) || !winograd::enabled() {
        return Ok(None);
    }
    let (b, c, h, w) = x.dims4()?;
    let (_, kc, kh, kw) = kernel.dims4()?;
    if kc != c || !winograd::applies(kh, kw, stride, padding, h, w) {
        return Ok(None);
    }
    Ok(Some((b, c, h, w)))
}

/// `x` convolved with `kernel` (plus `bias`) by [`winograd`] when the convolution is one it
/// serves on the CPU in f32 (3x3, stride 1, padding 1, large enough); `None` otherwise.
fn winograd_forward(
    x: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Option<Tensor>> {
    let Some((b, c, h, w)) = winograd_shape(x, kernel, bias, stride, padding)? else {
        return Ok(None);
    };
    let o = kernel.dim(0)?;
    let bias = match bias {
        Some(t) => Some(t.flatten_all()?.to_vec1::<f32>()?),
        None => None,
    };
    let y = with_f32(x, |x| {
        with_f32(kernel, |k| {
            let spec = winograd::Spec {
                shape: (b, h, w),
                weight: k,
                channels: (o, c),
                pass: Pass::Forward,
                bias: bias.as_deref(),
                fused: winograd::Fused::default(),
                threads: candle_core::utils::get_num_threads(),
            };
            winograd::conv(x, spec)
        })
    })???;
    Ok(Some(Tensor::from_vec(y, (b, o, h, w), x.device())?))
}

/// The input gradient by [`winograd`] (the output gradient convolved with the flipped,
/// transposed kernel, taken from `weight` inside the kernel transform) when the
/// convolution is one it serves; `None` otherwise.
fn winograd_input_grad(
    g: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
    in_h: usize,
    in_w: usize,
) -> candle_core::Result<Option<Tensor>> {
    if !winograd::enabled() {
        return Ok(None);
    }
    let (b, o, oh, ow) = g.dims4()?;
    let (wo, c, kh, kw) = weight.dims4()?;
    if wo != o || (oh, ow) != (in_h, in_w) || !winograd::applies(kh, kw, stride, padding, oh, ow) {
        return Ok(None);
    }
    let gx = with_f32(g, |g| {
        with_f32(weight, |k| {
            let spec = winograd::Spec {
                shape: (b, oh, ow),
                weight: k,
                channels: (o, c),
                pass: Pass::InputGrad,
                bias: None,
                fused: winograd::Fused::default(),
                threads: candle_core::utils::get_num_threads(),
            };
            winograd::conv(g, spec)
        })
    })???;
    Ok(Some(Tensor::from_vec(gx, (b, c, in_h, in_w), g.device())?))
}

/// Column-matrix values built at once by the CPU convolution: 16M (64 MiB), bounding its
/// memory while keeping each matrix product large.
const COLUMN_BUDGET: usize = 16 << 20;

/// The column matrices (`[C*k*k, rows x W']` per image) of images `images` of `x`
/// (`[B, C, H, W]`, f32 CPU) for output rows `rows`, images one after another.
fn columns(
    x: &Tensor,
    geo: &ColumnGeometry,
    images: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
) -> candle_core::Result<Vec<f32>> {
    use rayon::prelude::*;
    let (_, c, h, w) = x.dims4()?;
    let (kh, kw) = (geo.kh, geo.kw);
    let k = c * kh * kw;
    let span = rows.len() * geo.ow;
    let first = images.start;
    with_f32(x, |src| {
        let mut cols = vec![0f32; images.len() * k * span];
        cols.par_chunks_mut(span.max(1))
            .enumerate()
            .for_each(|(row, out)| {
                let bi = first + row / k;
                let r = row % k;
                let (ci, ky, kx) = (r / (kh * kw), (r / kw) % kh, r % kw);
                let plane = &src[(bi * c + ci) * h * w..(bi * c + ci + 1) * h * w];
                im2col_row(out, plane, ky, kx, *geo, rows.clone());
            });
        cols
    })
}

/// `W [O, K] x cols [B, K, 16]` plus the bias, as `[B, O, oh, ow]`, by the 16-column
/// kernel (`layers::skinny`: the 4x4 level's convolutions, whose product gemm runs at
/// memory speed).
fn skinny_forward(
    weights: &Tensor,
    cols: &Tensor,
    bias: Option<&Tensor>,
    (b, o, oh, ow): (usize, usize, usize, usize),
) -> candle_core::Result<Tensor> {
    let k = weights.dim(1)?;
    let mut out = vec![0f32; b * o * skinny::COLS];
    with_f32(weights, |w| {
        with_f32(cols, |cols| {
            with_optional_f32(bias, |bias| {
                for (bi, dst) in out.chunks_mut(o * skinny::COLS).enumerate() {
                    let src = cols
                        .get(bi * k * skinny::COLS..(bi + 1) * k * skinny::COLS)
                        .ok_or_else(|| candle_core::Error::Msg("conv: short columns".into()))?;
                    skinny::forward(w, src, bias, (o, k), dst)?;
                }
                Ok::<(), candle_core::Error>(())
            })
        })
    })????;
    Tensor::from_vec(out, (b, o, oh, ow), cols.device())
}

/// The column gradient `W^T g` (`[K, 16]`) of image `bi` of `g` (`[B, O, 16]`, rows of
/// 16 output pixels), by the 16-column kernel.
fn skinny_input_grad(weights: &Tensor, g: &Tensor, bi: usize) -> candle_core::Result<Tensor> {
    let (o, k) = weights.dims2()?;
    let mut out = vec![0f32; k * skinny::COLS];
    let gb = g.get(bi)?;
    with_f32(weights, |w| {
        with_f32(&gb, |g| {
            skinny::input_grad(
                w,
                g,
                (o, k),
                candle_core::utils::get_num_threads(),
                &mut out,
            )
        })
    })???;
    Tensor::from_vec(out, (k, skinny::COLS), g.device())
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
    let n = g.dim(2)? * g.dim(3)?;
    let transposed = (TRANSPOSED_COLUMNS_FROM..=TRANSPOSED_COLUMNS_TO).contains(&n);
    conv2d_input_grad_columns(g, weight, (stride, padding), (in_h, in_w), transposed)
}

/// Output sizes (pixels) whose column gradient [`conv2d_input_grad_columns`] computes
/// transposed, `[H'*W', C*k*k] = g^T W`. The usual `W^T g` makes gemm copy the whole
/// kernel into its panels in every call (its right operand, read across rows), a cost
/// the product repays only over many pixels; the transposed product reads the kernel in
/// place, down its columns. Measured on 2 cores (`winograd_step_timing`, the column path,
/// ms per input gradient, best of 3, same hour): 1280->1280 at 16x16 28-33 -> 25-26,
/// 1920->1280 50-54 -> 37-38, 2560->1280 70-78 -> 49-51 (with the caches flushed between
/// calls, as in a step: 37 -> 27-30 and 72-79 -> 50-62); 640 at 16x16 the same; at 32x32
/// (320 to 1280 channels) the same or slower. At 8x8 (64 pixels) it wins with cold
/// kernels (`column_input_grad_timing`, two runs: 2560->1280 20.1-21.6 -> 17.7-17.8 ms,
/// 1920->1280 13.9-14.3 -> 12.9-13.3, 640->1280 7.1-7.3 -> 4.5-4.8, 1280->1280 9.3 ->
/// 8.9-9.5), though not with the warm ones of `winograd_step_timing`; and more at 12x12
/// and 24x24 (144 and 576 pixels, SD 2.x's 768 px step): 2560->1280 47.7 -> 30.2 and
/// 215-252 -> 138-139, 1280->1280 18.5 -> 14.9 and 69 -> 59-61. At 32x32 (1024 pixels,
/// where only strided convolutions take this path) it does not win: 640->640 28.0 ->
/// 28.5, 320->320 7.6 -> 8.4. 4x4 (16 pixels) takes the 16-column kernels with AVX-512;
/// without it (gemm, a 2-core Zen 1) the two orientations are even there: 2560->1280
/// 19.06 -> 19.13 ms, 1280->1280 8.33 -> 8.35.
const TRANSPOSED_COLUMNS_FROM: usize = 64;
const TRANSPOSED_COLUMNS_TO: usize = 1023;

/// [`conv2d_input_grad_cpu`] with the column gradient as `W^T g` (`[C*k*k, H'*W']`) or,
/// `transposed`, as `g^T W` (`[H'*W', C*k*k]`), which col2im reads across.
fn conv2d_input_grad_columns(
    g: &Tensor,
    weight: &Tensor,
    (stride, padding): (usize, usize),
    (in_h, in_w): (usize, usize),
    transposed: bool,
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
    let skinny = n == skinny::COLS && skinny::input_grad_available();
    // The 16-column kernel writes kernel rows.
    let transposed = transposed && !skinny;
    if kh == 1 && kw == 1 && stride == 1 && padding == 0 && (oh, ow) == (in_h, in_w) {
        let g = g.reshape((b, o, n))?;
        if skinny {
            let w = weight.reshape((o, k))?;
            let parts = (0..b)
                .map(|bi| skinny_input_grad(&w, &g, bi))
                .collect::<candle_core::Result<Vec<_>>>()?;
            return Tensor::stack(&parts, 0)?.reshape((b, c, in_h, in_w));
        }
        let gx = matmul(&wt, &g, Bias::None, None)?;
        return gx.reshape((b, c, in_h, in_w));
    }
    let geo = ColumnGeometry {
        kh,
        kw,
        stride,
        padding,
        in_h,
        in_w,
        oh,
        ow,
    };
    let plane_len = in_h * in_w;
    let mut out = vec![0f32; b * c * plane_len];
    for bi in 0..b {
        let gb = g.get(bi)?.reshape((o, n))?;
        let cols = if skinny {
            skinny_input_grad(&weight.reshape((o, k))?, &g.reshape((b, o, n))?, bi)?
        } else if transposed {
            matmul(&gb.t()?, &weight.reshape((o, k))?, Bias::None, None)?
        } else {
            matmul(&wt, &gb, Bias::None, None)?
        };
        let dst_batch = &mut out[bi * c * plane_len..(bi + 1) * c * plane_len];
        let layout = if transposed {
            ColumnLayout::PixelRows
        } else {
            ColumnLayout::KernelRows
        };
        with_f32(&cols, |cols| {
            dst_batch
                .par_chunks_mut(plane_len)
                .enumerate()
                .for_each(|(ci, plane)| col2im_plane(plane, cols, layout, ci, geo));
        })?;
    }
    Tensor::from_vec(out, (b, c, in_h, in_w), g.device())
}

/// The sizes of one convolution as its column matrix sees them: kernel, stride and
/// padding, input and output sides.
#[derive(Clone, Copy, Debug)]
struct ColumnGeometry {
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    in_h: usize,
    in_w: usize,
    oh: usize,
    ow: usize,
}

impl ColumnGeometry {
    /// The input row that output row `oy` reads with kernel row `ky`, when it lies inside
    /// the input.
    fn input_row(&self, oy: usize, ky: usize) -> Option<usize> {
        let iy = (oy * self.stride + ky) as isize - self.padding as isize;
        (iy >= 0 && iy < self.in_h as isize).then_some(iy as usize)
    }
}

/// One row of the column matrix (kernel offset `ky`, `kx` of one input `plane`), output
/// rows `rows`: for each output pixel the input pixel it reads, zero where that lies in
/// the padding.
fn im2col_row(
    out: &mut [f32],
    plane: &[f32],
    ky: usize,
    kx: usize,
    geo: ColumnGeometry,
    rows: std::ops::Range<usize>,
) {
    let (w, ow) = (geo.in_w, geo.ow);
    let first = rows.start;
    for oy in rows {
        let Some(iy) = geo.input_row(oy, ky) else {
            continue;
        };
        let line = &plane[iy * w..(iy + 1) * w];
        let dst = &mut out[(oy - first) * ow..(oy - first + 1) * ow];
        if geo.stride == 1 {
            if let Some((start, end, from)) = shifted_span(w, ow, kx, geo.padding) {
                dst[start..end].copy_from_slice(&line[from..from + (end - start)]);
            }
            continue;
        }
        for (ox, d) in dst.iter_mut().enumerate() {
            if let Some(ix) = input_index(ox, geo.stride, kx, geo.padding, w) {
                *d = line[ix];
            }
        }
    }
}

/// How a column gradient is laid out: a row per kernel tap (`[C*k*k, H'*W']`, as the
/// forward pass's column matrix) or a row per output pixel (its transpose).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ColumnLayout {
    KernelRows,
    PixelRows,
}

/// Adds the column gradient `cols` of input channel `ci` onto its input `plane`: every
/// tap's value back onto the pixel it was copied from.
fn col2im_plane(
    plane: &mut [f32],
    cols: &[f32],
    layout: ColumnLayout,
    ci: usize,
    geo: ColumnGeometry,
) {
    let (n, ow, in_w) = (geo.oh * geo.ow, geo.ow, geo.in_w);
    let taps = cols.len() / n.max(1);
    for ky in 0..geo.kh {
        for kx in 0..geo.kw {
            let row = (ci * geo.kh + ky) * geo.kw + kx;
            for oy in 0..geo.oh {
                let Some(iy) = geo.input_row(oy, ky) else {
                    continue;
                };
                let line = &mut plane[iy * in_w..(iy + 1) * in_w];
                match layout {
                    ColumnLayout::KernelRows => {
                        let src = &cols[row * n + oy * ow..row * n + (oy + 1) * ow];
                        add_column_row(line, src, kx, geo);
                    }
                    ColumnLayout::PixelRows => {
                        for ox in 0..ow {
                            let ix = input_index(ox, geo.stride, kx, geo.padding, in_w);
                            if let Some(ix) = ix {
                                line[ix] += cols[(oy * ow + ox) * taps + row];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Adds one output row of a column row (kernel column `kx`) onto the input row `line`
/// it read.
fn add_column_row(line: &mut [f32], srow: &[f32], kx: usize, geo: ColumnGeometry) {
    if geo.stride == 1 {
        if let Some((start, end, from)) = shifted_span(geo.in_w, geo.ow, kx, geo.padding) {
            let dst = &mut line[from..from + (end - start)];
            for (d, &v) in dst.iter_mut().zip(&srow[start..end]) {
                *d += v;
            }
        }
        return;
    }
    for (ox, &v) in srow.iter().enumerate() {
        if let Some(ix) = input_index(ox, geo.stride, kx, geo.padding, geo.in_w) {
            line[ix] += v;
        }
    }
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
        return conv2d(g, kernel, None, 0, 1);
    }
    if k_h != k_w || padding >= k_h {
        candle_core::bail!("conv2d backward: unsupported kernel {k_h}x{k_w} padding {padding}");
    }
    let g = if stride > 1 {
        dilate(g, stride)?
    } else {
        g.clone()
    };
    let gx = conv2d(&g, kernel, None, k_h - 1 - padding, 1)?;
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
#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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
        // 16 output pixels (`layers::skinny` where the CPU has AVX-512): 3x3 and 1x1,
        // output channels not a multiple of its 20 rows, taps not of its 8 columns.
        (2, 21, 4, 4, 23, 3, 1, 1),
        (1, 24, 4, 4, 41, 1, 0, 1),
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
            let geometry = ((stride, pad), (h, w));
            let by_pixels = conv2d_input_grad_columns(&g, &kern, geometry.0, geometry.1, true)?;
            let flipped = conv2d_input_grad(&g, &input_grad_kernel(&kern)?, stride, pad, h, w)?;
            for (name, t) in [
                ("col2im", &got),
                ("col2im by pixel rows", &by_pixels),
                ("flipped kernel", &flipped),
            ] {
                let diff = (t - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    diff < 1e-4,
                    "{name} {b}x{c}x{h}x{w} k{k} pad {pad} stride {stride}: {diff}"
                );
            }
        }
        Ok(())
    }

    /// The column convolution equals candle's on odd sizes, strides and paddings, with and
    /// without a bias.
    #[test]
    fn column_conv2d_matches_candle() -> candle_core::Result<()> {
        let d = Device::Cpu;
        for (&(b, c, h, w, o, k, pad, stride), with_bias) in CONV_CASES
            .iter()
            .flat_map(|case| [(case, false), (case, true)])
        {
            let x = Tensor::randn(0f32, 1.0, (b, c, h, w), &d)?;
            let kern = Tensor::randn(0f32, 1.0, (o, c, k, k), &d)?;
            let bias = Tensor::randn(0f32, 1.0, o, &d)?;
            let bias = with_bias.then_some(&bias);
            let want = candle_conv2d(&x, &kern, bias, pad, stride)?;
            // Whole batches, bands of a few rows, and one output row per band.
            for budget in [COLUMN_BUDGET, 3 * c * k * k * w, 1] {
                let got = conv2d_within(&x, &kern, bias, pad, stride, budget)?;
                assert_eq!(got.dims(), want.dims());
                let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    diff < 1e-4,
                    "{b}x{c}x{h}x{w} k{k} pad {pad} stride {stride} budget {budget}: {diff}"
                );
            }
        }
        Ok(())
    }
}

/// Timing of the column input gradient, `W^T g` against `g^T W`, with cold kernels as in
/// a training step (copies of the kernel totalling 1 GiB, used in turn), at the 4x4 to
/// 32x32 levels (12x12 and 24x24: SD 2.x at 768 px). Not a test: run it by hand, in
/// release, with `cargo test --release --lib column_input_grad_timing -- --ignored
/// --nocapture`. It set [`TRANSPOSED_COLUMNS_FROM`] and [`TRANSPOSED_COLUMNS_TO`].
#[cfg(test)]
mod column_timing {
    use super::*;
    use candle_core::Device;

    #[test]
    #[ignore = "a timing harness, run by hand"]
    fn column_input_grad_timing() -> candle_core::Result<()> {
        let d = Device::Cpu;
        println!("| in -> out channels @ side | W^T g ms | g^T W ms |");
        for (cin, cout, side) in [
            (2560, 1280, 4),
            (1280, 1280, 4),
            (2560, 1280, 8),
            (1920, 1280, 8),
            (1280, 1280, 8),
            (640, 1280, 8),
            (2560, 1280, 12),
            (1280, 1280, 12),
            (1280, 1280, 16),
            (1280, 1280, 24),
            (2560, 1280, 24),
            (640, 640, 32),
            (320, 320, 32),
        ] {
            let copies = (1usize << 30) / (cin * cout * 9 * 4) + 1;
            let kernels = (0..copies)
                .map(|c| Tensor::full(0.01f32 + c as f32 * 1e-4, (cout, cin, 3, 3), &d))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let g = Tensor::full(1.0f32, (1, cout, side, side), &d)?;
            let mut row = format!("| {cin} -> {cout} @ {side} |");
            for transposed in [false, true] {
                let calls = 2 * copies;
                let start = std::time::Instant::now();
                for i in 0..calls {
                    let k = &kernels[i % copies];
                    drop(conv2d_input_grad_columns(
                        &g,
                        k,
                        (1, 1),
                        (side, side),
                        transposed,
                    )?);
                }
                let ms = start.elapsed().as_secs_f64() * 1e3 / calls as f64;
                row += &format!(" {ms:.2} |");
            }
            println!("{row}");
        }
        Ok(())
    }
}
