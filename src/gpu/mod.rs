//! sdti's own CUDA kernels (builds with the `cuda` feature only): fused versions of the
//! memory-bound steps that candle composes from many small ops, for f32, f16 and bf16
//! storage with f32 arithmetic.
//!
//! - GEGLU forward and backward (diffusers' feed-forward gate, exact erf GELU);
//! - the erf GELU's, SiLU's and quick GELU's input gradients, and the quick GELU forward;
//! - layer normalisation forward with its per-row statistics kept, and backward from them,
//!   optionally adding the residual stream's gradient in the same pass;
//! - group normalisation over `[B, C, ...]` forward with its per-(n, group) statistics kept,
//!   and backward from them, each optionally followed by SiLU (the resnet block's norm ->
//!   SiLU), the groups split across blocks (only 32 groups at batch 1).
//!
//! The `.cu` files under `src/gpu/kernels` are compiled to PTX by `build.rs` (nvcc, as
//! candle-kernels builds its own), embedded as strings, loaded once per device with candle's
//! `get_or_load_custom_func` and launched on candle's stream, so they order with candle's own
//! kernels and use no CUDA runtime call. Each wrapper checks devices, dtypes and shapes and
//! returns an error where it does not apply; the layers (`src/model/layers`) ask [`fusable`]
//! first and keep candle's composed ops for everything else, the CPU included.
//! `SDTI_FUSED_KERNELS=0` in the environment turns the kernels off (the composed ops run), to
//! compare the two.

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{
    bail, CudaDevice, CudaStorage, DType, Device, Layout, Result, Shape, Storage, Tensor, WithDType,
};

pub mod cudnn;

/// The PTX of each `src/gpu/kernels/*.cu` file, one constant per file (build.rs).
mod ptx {
    include!(concat!(env!("OUT_DIR"), "/sdti_ptx.rs"));
}

/// A PTX module: one `.cu` file.
#[derive(Clone, Copy, Debug)]
enum Module {
    Activations,
    LayerNorm,
    GroupNorm,
}

impl Module {
    /// The name candle caches the loaded module under (per device).
    fn name(self) -> &'static str {
        match self {
            Module::Activations => "sdti_activations",
            Module::LayerNorm => "sdti_layer_norm",
            Module::GroupNorm => "sdti_group_norm",
        }
    }

    fn ptx(self) -> &'static str {
        match self {
            Module::Activations => ptx::ACTIVATIONS,
            Module::LayerNorm => ptx::LAYER_NORM,
            Module::GroupNorm => ptx::GROUP_NORM,
        }
    }
}

/// A kernel: its module and its name without the storage-type suffix (`_f32`, `_f16`,
/// `_bf16`: the `.cu` files define one entry point per type). tests/suite/gpu_kernels.rs
/// reads these definitions and checks that each entry point exists in the `.cu` sources.
#[derive(Clone, Copy, Debug)]
struct Kernel {
    module: Module,
    name: &'static str,
}

const GEGLU_FWD: Kernel = Kernel {
    module: Module::Activations,
    name: "geglu_fwd",
};
const GEGLU_BWD: Kernel = Kernel {
    module: Module::Activations,
    name: "geglu_bwd",
};
const GELU_ERF_BWD: Kernel = Kernel {
    module: Module::Activations,
    name: "gelu_erf_bwd",
};
const SILU_BWD: Kernel = Kernel {
    module: Module::Activations,
    name: "silu_bwd",
};
const QUICK_GELU_FWD: Kernel = Kernel {
    module: Module::Activations,
    name: "quick_gelu_fwd",
};
const QUICK_GELU_BWD: Kernel = Kernel {
    module: Module::Activations,
    name: "quick_gelu_bwd",
};
const LAYER_NORM_FWD: Kernel = Kernel {
    module: Module::LayerNorm,
    name: "layer_norm_fwd",
};
const LAYER_NORM_BWD: Kernel = Kernel {
    module: Module::LayerNorm,
    name: "layer_norm_bwd",
};
const LAYER_NORM_BWD_ADD: Kernel = Kernel {
    module: Module::LayerNorm,
    name: "layer_norm_bwd_add",
};

const GROUP_NORM_STATS: Kernel = Kernel {
    module: Module::GroupNorm,
    name: "group_norm_stats",
};
const GROUP_NORM_FWD: Kernel = Kernel {
    module: Module::GroupNorm,
    name: "group_norm_fwd",
};
const GROUP_NORM_SILU_FWD: Kernel = Kernel {
    module: Module::GroupNorm,
    name: "group_norm_silu_fwd",
};
const GROUP_NORM_BWD_SUMS: Kernel = Kernel {
    module: Module::GroupNorm,
    name: "group_norm_bwd_sums",
};
const GROUP_NORM_SILU_BWD_SUMS: Kernel = Kernel {
    module: Module::GroupNorm,
    name: "group_norm_silu_bwd_sums",
};
const GROUP_NORM_BWD: Kernel = Kernel {
    module: Module::GroupNorm,
    name: "group_norm_bwd",
};
const GROUP_NORM_SILU_BWD: Kernel = Kernel {
    module: Module::GroupNorm,
    name: "group_norm_silu_bwd",
};

/// Threads per block of the elementwise and layer-norm kernels (eight warps: eight rows of a
/// layer norm per block).
const BLOCK: u32 = 256;
/// The most blocks a launch uses; the kernels loop (grid-stride) over the rest.
const MAX_BLOCKS: u32 = 1 << 16;

/// A storage type the kernels take.
trait Elem: CudaDType + DeviceRepr + WithDType {}
impl<T: CudaDType + DeviceRepr + WithDType> Elem for T {}

/// Runs `$f::<T>(args)` for the Rust type `T` of the storage dtype.
macro_rules! by_dtype {
    ($dtype:expr, $f:ident ( $($arg:expr),* $(,)? )) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F16 => $f::<half::f16>($($arg),*),
            DType::BF16 => $f::<half::bf16>($($arg),*),
            other => bail!("sdti's fused CUDA kernels take f32, f16 or bf16 tensors, not {other:?}"),
        }
    };
}

/// Whether the fused kernels are on (`SDTI_FUSED_KERNELS=0` turns them off; read once).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("SDTI_FUSED_KERNELS").map_or(true, |v| v.trim() != "0"))
}

/// Whether the layers should run the fused kernels on these tensors: the kernels are on, and
/// the tensors all live on the same CUDA device with the same f32, f16 or bf16 dtype.
/// (Checked on every layer call: no error is built when the answer is no.)
pub fn fusable(ts: &[&Tensor]) -> bool {
    let Some(first) = ts.first() else {
        return false;
    };
    let (device, dtype) = (first.device(), first.dtype());
    enabled()
        && device.is_cuda()
        && matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
        && ts
            .iter()
            .all(|t| t.dtype() == dtype && t.device().same_device(device))
}

/// The CUDA device and the dtype all of `ts` share, or an error naming `op`.
fn common(ts: &[&Tensor], op: &str) -> Result<(CudaDevice, DType)> {
    let Some(first) = ts.first() else {
        bail!("{op}: no tensors");
    };
    let Device::Cuda(dev) = first.device() else {
        bail!(
            "{op}: the fused kernels run on CUDA devices, not {:?}",
            first.device().location()
        );
    };
    let dtype = first.dtype();
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        bail!("{op}: the fused kernels take f32, f16 or bf16 tensors, not {dtype:?}");
    }
    for t in &ts[1..] {
        if !t.device().same_device(first.device()) {
            bail!("{op}: the tensors are on different devices");
        }
        if t.dtype() != dtype {
            bail!("{op}: mixed dtypes {dtype:?} and {:?}", t.dtype());
        }
    }
    Ok((dev.clone(), dtype))
}

/// A count for a kernel parameter: at most 2^31 - 1, so that the kernels' u32 grid-stride
/// indices cannot wrap around.
fn as_u32(n: usize, what: &str) -> Result<u32> {
    match i32::try_from(n) {
        Ok(n) => Ok(n as u32),
        Err(_) => bail!("{what} {n} exceeds 2^31 - 1"),
    }
}

fn cuda_storage(s: &Storage) -> Result<&CudaStorage> {
    match s {
        Storage::Cuda(s) => Ok(s),
        _ => bail!("expected a tensor on a CUDA device"),
    }
}

/// The values of a contiguous tensor's storage, from its offset.
fn view<'a, T: Elem>(s: &'a Storage, l: &Layout) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("expected a contiguous tensor");
    };
    Ok(cuda_storage(s)?.as_cuda_slice::<T>()?.slice(start..end))
}

/// The entry point of `k` for `dtype` (its module loaded on `dev` at the first use).
fn load(dev: &CudaDevice, k: Kernel, dtype: DType) -> Result<CudaFunction> {
    let suffix = match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => bail!("no {} kernel for {other:?}", k.name),
    };
    let name = format!("{}_{suffix}", k.name);
    Ok(dev
        .get_or_load_custom_func(&name, k.module.name(), k.module.ptx())?
        .into_cuda_function())
}

/// Uninitialised device memory for `n` values that a kernel then writes in full.
fn alloc<T: Elem>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every caller launches a kernel that writes all `n` values before the memory is
    // read (on the same stream, so in order).
    unsafe { dev.alloc::<T>(n) }
}

fn tensor<T: Elem>(out: CudaSlice<T>, dev: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

/// One block per row (grid-stride), its threads over `n` columns.
fn rows_config(rows: u32, n: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.clamp(1, MAX_BLOCKS), 1, 1),
        block_dim: (n.div_ceil(32).clamp(1, BLOCK / 32) * 32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `n` values, one per thread (grid-stride).
fn elementwise_config(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, MAX_BLOCKS as usize) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One warp per row, `BLOCK / 32` rows per block (grid-stride).
fn warp_rows_config(rows: u32) -> LaunchConfig {
    let blocks = rows.div_ceil(BLOCK / 32).clamp(1, MAX_BLOCKS);
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// diffusers' GEGLU of a projection `h` (`[..., 2n]`): `a * gelu(b)` for the halves
/// `a = h[..., :n]`, `b = h[..., n:]` (exact erf GELU), `[..., n]`, in one pass.
pub fn geglu_forward(h: &Tensor) -> Result<Tensor> {
    let (dev, dtype) = common(&[h], "geglu_forward")?;
    let dims = h.dims();
    let Some(&width) = dims.last() else {
        bail!("geglu_forward: a scalar has no halves");
    };
    if width % 2 != 0 {
        bail!("geglu_forward: the last dimension ({width}) is odd");
    }
    let mut out_dims = dims.to_vec();
    let last = out_dims.len() - 1;
    out_dims[last] = width / 2;
    if h.elem_count() == 0 {
        return Tensor::zeros(out_dims, dtype, h.device());
    }
    let rows = as_u32(h.elem_count() / width, "geglu_forward: rows")?;
    let n = as_u32(width / 2, "geglu_forward: width")?;
    let h = h.contiguous()?;
    by_dtype!(dtype, geglu_forward_t(&dev, &h, rows, n, out_dims))
}

fn geglu_forward_t<T: Elem>(
    dev: &CudaDevice,
    h: &Tensor,
    rows: u32,
    n: u32,
    out_dims: Vec<usize>,
) -> Result<Tensor> {
    let (hs, hl) = h.storage_and_layout();
    let hv = view::<T>(&hs, hl)?;
    let mut out = alloc::<T>(dev, rows as usize * n as usize)?;
    let func = load(dev, GEGLU_FWD, T::DTYPE)?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(&hv).arg(&mut out).arg(&rows).arg(&n);
    // SAFETY: the entry point takes (const T* h, T* out, u32 rows, u32 n), as pushed above;
    // h holds rows * 2n values and out rows * n.
    unsafe { b.launch(rows_config(rows, n)) }.w()?;
    drop(b);
    Ok(tensor(out, dev, out_dims))
}

/// The gradient of [`geglu_forward`]'s input `h` from the gradient `g` of its output:
/// `[g * gelu(b), g * a * gelu'(b)]`, shaped as `h`.
pub fn geglu_backward(g: &Tensor, h: &Tensor) -> Result<Tensor> {
    let (dev, dtype) = common(&[g, h], "geglu_backward")?;
    let (gd, hd) = (g.dims(), h.dims());
    let shapes_match = gd.len() == hd.len()
        && !hd.is_empty()
        && gd[..gd.len() - 1] == hd[..hd.len() - 1]
        && gd[gd.len() - 1] * 2 == hd[hd.len() - 1];
    if !shapes_match {
        bail!("geglu_backward: gradient {gd:?} does not match the projection {hd:?}");
    }
    if h.elem_count() == 0 {
        return Tensor::zeros(hd, dtype, h.device());
    }
    let width = hd[hd.len() - 1];
    let rows = as_u32(h.elem_count() / width, "geglu_backward: rows")?;
    let n = as_u32(width / 2, "geglu_backward: width")?;
    let (g, h) = (g.contiguous()?, h.contiguous()?);
    by_dtype!(dtype, geglu_backward_t(&dev, &g, &h, rows, n))
}

fn geglu_backward_t<T: Elem>(
    dev: &CudaDevice,
    g: &Tensor,
    h: &Tensor,
    rows: u32,
    n: u32,
) -> Result<Tensor> {
    let (gs, gl) = g.storage_and_layout();
    let (hs, hl) = h.storage_and_layout();
    let (gv, hv) = (view::<T>(&gs, gl)?, view::<T>(&hs, hl)?);
    let mut dh = alloc::<T>(dev, h.elem_count())?;
    let func = load(dev, GEGLU_BWD, T::DTYPE)?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(&gv).arg(&hv).arg(&mut dh).arg(&rows).arg(&n);
    // SAFETY: the entry point takes (const T* g, const T* h, T* dh, u32 rows, u32 n), as
    // pushed above; g holds rows * n values, h and dh rows * 2n.
    unsafe { b.launch(rows_config(rows, n)) }.w()?;
    drop(b);
    Ok(tensor(dh, dev, h.dims()))
}

/// The input gradient of the exact (erf) GELU: `g * (Phi(x) + x phi(x))`.
pub fn gelu_erf_backward(g: &Tensor, x: &Tensor) -> Result<Tensor> {
    grad_map(GELU_ERF_BWD, g, x)
}

/// The input gradient of SiLU: `g * s (1 + x (1 - s))`, `s = sigmoid(x)`.
pub fn silu_backward(g: &Tensor, x: &Tensor) -> Result<Tensor> {
    grad_map(SILU_BWD, g, x)
}

/// CLIP's quick GELU, `x sigmoid(1.702 x)`.
pub fn quick_gelu_forward(x: &Tensor) -> Result<Tensor> {
    let (dev, dtype) = common(&[x], "quick_gelu_forward")?;
    if x.elem_count() == 0 {
        return Tensor::zeros(x.dims(), dtype, x.device());
    }
    let x = x.contiguous()?;
    by_dtype!(dtype, map_t(&dev, QUICK_GELU_FWD, &x))
}

/// The input gradient of the quick GELU: `g * (s + 1.702 x s (1 - s))`,
/// `s = sigmoid(1.702 x)`.
pub fn quick_gelu_backward(g: &Tensor, x: &Tensor) -> Result<Tensor> {
    grad_map(QUICK_GELU_BWD, g, x)
}

fn grad_map(k: Kernel, g: &Tensor, x: &Tensor) -> Result<Tensor> {
    let (dev, dtype) = common(&[g, x], k.name)?;
    if g.dims() != x.dims() {
        bail!(
            "{}: gradient {:?} and input {:?} differ in shape",
            k.name,
            g.dims(),
            x.dims()
        );
    }
    if x.elem_count() == 0 {
        return Tensor::zeros(x.dims(), dtype, x.device());
    }
    let (g, x) = (g.contiguous()?, x.contiguous()?);
    by_dtype!(dtype, grad_map_t(&dev, k, &g, &x))
}

fn map_t<T: Elem>(dev: &CudaDevice, k: Kernel, x: &Tensor) -> Result<Tensor> {
    let (xs, xl) = x.storage_and_layout();
    let xv = view::<T>(&xs, xl)?;
    let n = x.elem_count();
    let mut y = alloc::<T>(dev, n)?;
    let func = load(dev, k, T::DTYPE)?;
    let count = n as u64;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(&xv).arg(&mut y).arg(&count);
    // SAFETY: the entry point takes (const T* x, T* y, u64 n), as pushed above; x and y hold
    // n values.
    unsafe { b.launch(elementwise_config(n)) }.w()?;
    drop(b);
    Ok(tensor(y, dev, x.dims()))
}

fn grad_map_t<T: Elem>(dev: &CudaDevice, k: Kernel, g: &Tensor, x: &Tensor) -> Result<Tensor> {
    let (gs, gl) = g.storage_and_layout();
    let (xs, xl) = x.storage_and_layout();
    let (gv, xv) = (view::<T>(&gs, gl)?, view::<T>(&xs, xl)?);
    let n = x.elem_count();
    let mut dx = alloc::<T>(dev, n)?;
    let func = load(dev, k, T::DTYPE)?;
    let count = n as u64;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(&gv).arg(&xv).arg(&mut dx).arg(&count);
    // SAFETY: the entry point takes (const T* g, const T* x, T* dx, u64 n), as pushed above;
    // g, x and dx hold n values.
    unsafe { b.launch(elementwise_config(n)) }.w()?;
    drop(b);
    Ok(tensor(dx, dev, x.dims()))
}

/// Layer normalisation of `x` over its last dimension (`c` values) with the affine
/// `gamma`, `beta` (`[c]`, the dtype of `x`): `(y, mean, rstd)`, the statistics in f32 shaped
/// `[..., 1]` (as [`crate::model::layers`]' own `Stats`), `rstd = 1/sqrt(var + eps)`.
pub fn layer_norm_forward(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (dev, dtype) = common(&[x, gamma, beta], "layer_norm_forward")?;
    let Some(&c) = x.dims().last() else {
        bail!("layer_norm_forward: a scalar has no last dimension");
    };
    if gamma.dims() != [c] || beta.dims() != [c] {
        bail!(
            "layer_norm_forward: weight {:?} and bias {:?} do not match the last dimension {c}",
            gamma.dims(),
            beta.dims()
        );
    }
    let mut stat_dims = x.dims().to_vec();
    let last = stat_dims.len() - 1;
    stat_dims[last] = 1;
    if x.elem_count() == 0 {
        let zeros = |dims: &[usize], dt| Tensor::zeros(dims, dt, x.device());
        return Ok((
            zeros(x.dims(), dtype)?,
            zeros(&stat_dims, DType::F32)?,
            zeros(&stat_dims, DType::F32)?,
        ));
    }
    let rows = as_u32(x.elem_count() / c, "layer_norm_forward: rows")?;
    let c32 = as_u32(c, "layer_norm_forward: width")?;
    let (x, gamma, beta) = (x.contiguous()?, gamma.contiguous()?, beta.contiguous()?);
    let args = (rows, c32, eps as f32);
    by_dtype!(
        dtype,
        layer_norm_forward_t(&dev, &x, &gamma, &beta, args, stat_dims)
    )
}

fn layer_norm_forward_t<T: Elem>(
    dev: &CudaDevice,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    (rows, c, eps): (u32, u32, f32),
    stat_dims: Vec<usize>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = gamma.storage_and_layout();
    let (bs, bl) = beta.storage_and_layout();
    let (xv, wv, bv) = (
        view::<T>(&xs, xl)?,
        view::<T>(&ws, wl)?,
        view::<T>(&bs, bl)?,
    );
    let mut y = alloc::<T>(dev, x.elem_count())?;
    let mut mean = alloc::<f32>(dev, rows as usize)?;
    let mut rstd = alloc::<f32>(dev, rows as usize)?;
    let func = load(dev, LAYER_NORM_FWD, T::DTYPE)?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(&xv)
        .arg(&wv)
        .arg(&bv)
        .arg(&mut y)
        .arg(&mut mean)
        .arg(&mut rstd);
    b.arg(&rows).arg(&c).arg(&eps);
    // SAFETY: the entry point takes (const T* x, const T* gamma, const T* beta, T* y,
    // f32* mean, f32* rstd, u32 rows, u32 c, f32 eps), as pushed above; x and y hold rows * c
    // values, gamma and beta c, mean and rstd rows.
    unsafe { b.launch(warp_rows_config(rows)) }.w()?;
    drop(b);
    Ok((
        tensor(y, dev, x.dims()),
        tensor(mean, dev, stat_dims.clone()),
        tensor(rstd, dev, stat_dims),
    ))
}

/// The input gradient of [`layer_norm_forward`] from the output gradient `g` and the
/// statistics it kept (f32, one per row): `rstd * (gs - mean(gs) - xhat * mean(gs * xhat))`,
/// `gs = g * gamma`, `xhat = (x - mean) * rstd`; plus `d_residual` (shaped as `x`) when given,
/// in the same pass.
pub fn layer_norm_backward(
    g: &Tensor,
    x: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    gamma: &Tensor,
    d_residual: Option<&Tensor>,
) -> Result<Tensor> {
    let mut same = vec![g, x, gamma];
    same.extend(d_residual);
    let (dev, dtype) = common(&same, "layer_norm_backward")?;
    let Some(&c) = x.dims().last() else {
        bail!("layer_norm_backward: a scalar has no last dimension");
    };
    if g.dims() != x.dims() || d_residual.is_some_and(|d| d.dims() != x.dims()) {
        bail!(
            "layer_norm_backward: the gradients do not match the input {:?}",
            x.dims()
        );
    }
    if gamma.dims() != [c] {
        bail!(
            "layer_norm_backward: weight {:?} does not match the width {c}",
            gamma.dims()
        );
    }
    let rows_n = x.elem_count().checked_div(c).unwrap_or(0);
    for (name, s) in [("mean", mean), ("rstd", rstd)] {
        if s.dtype() != DType::F32
            || !s.device().same_device(x.device())
            || s.elem_count() != rows_n
        {
            bail!(
                "layer_norm_backward: {name} must be f32 on the input's device with one value per \
                 row ({rows_n}), not {:?} {:?}",
                s.dtype(),
                s.dims()
            );
        }
    }
    if x.elem_count() == 0 {
        return Tensor::zeros(x.dims(), dtype, x.device());
    }
    let rows = as_u32(rows_n, "layer_norm_backward: rows")?;
    let c32 = as_u32(c, "layer_norm_backward: width")?;
    let (g, x, gamma) = (g.contiguous()?, x.contiguous()?, gamma.contiguous()?);
    let (mean, rstd) = (mean.contiguous()?, rstd.contiguous()?);
    let d_residual = d_residual.map(Tensor::contiguous).transpose()?;
    let inputs = [&g, &x, &mean, &rstd, &gamma];
    by_dtype!(
        dtype,
        layer_norm_backward_t(&dev, inputs, d_residual.as_ref(), rows, c32)
    )
}

fn layer_norm_backward_t<T: Elem>(
    dev: &CudaDevice,
    [g, x, mean, rstd, gamma]: [&Tensor; 5],
    d_residual: Option<&Tensor>,
    rows: u32,
    c: u32,
) -> Result<Tensor> {
    let (gs, gl) = g.storage_and_layout();
    let (xs, xl) = x.storage_and_layout();
    let (ms, ml) = mean.storage_and_layout();
    let (rs, rl) = rstd.storage_and_layout();
    let (ws, wl) = gamma.storage_and_layout();
    let (gv, xv, wv) = (
        view::<T>(&gs, gl)?,
        view::<T>(&xs, xl)?,
        view::<T>(&ws, wl)?,
    );
    let (mv, rv) = (view::<f32>(&ms, ml)?, view::<f32>(&rs, rl)?);
    let residual = d_residual.map(Tensor::storage_and_layout);
    let residual_view = match &residual {
        Some((s, l)) => Some(view::<T>(s, l)?),
        None => None,
    };
    let mut dx = alloc::<T>(dev, x.elem_count())?;
    let kernel = if residual_view.is_some() {
        LAYER_NORM_BWD_ADD
    } else {
        LAYER_NORM_BWD
    };
    let func = load(dev, kernel, T::DTYPE)?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(&gv).arg(&xv).arg(&mv).arg(&rv).arg(&wv);
    if let Some(rv) = &residual_view {
        b.arg(rv);
    }
    b.arg(&mut dx).arg(&rows).arg(&c);
    // SAFETY: the entry points take (const T* g, const T* x, const f32* mean,
    // const f32* rstd, const T* gamma, [const T* d_residual,] T* dx, u32 rows, u32 c), as
    // pushed above; g, x, d_residual and dx hold rows * c values, mean and rstd rows, gamma c.
    unsafe { b.launch(warp_rows_config(rows)) }.w()?;
    drop(b);
    Ok(tensor(dx, dev, x.dims()))
}

/// Values of a group one block of the group-norm kernels reduces, about (256 threads x 8).
const GN_CHUNK: usize = 2048;
/// The most blocks one group is split across (the apply kernels combine their group's
/// partial results serially, in one thread).
const GN_MAX_CHUNKS: usize = 128;

/// The shape of a group-norm launch: `[B, C, ...]` as `rows = B*G` groups of `n = cpg * hw`
/// contiguous values, each split into `chunks` chunks of `chunk_len` (the last one shorter),
/// one block per chunk.
#[derive(Clone, Copy, Debug)]
struct GnShape {
    rows: usize,
    n: u32,
    chunk_len: u32,
    chunks: u32,
    hw: u32,
    cpg: u32,
    groups: u32,
}

impl GnShape {
    fn new(x: &Tensor, groups: usize, op: &str) -> Result<Self> {
        let dims = x.dims();
        if dims.len() < 2 {
            bail!("{op}: expected [batch, channels, ...], got {dims:?}");
        }
        let c = dims[1];
        if groups == 0 || !c.is_multiple_of(groups) {
            bail!("{op}: {c} channels cannot be split into {groups} groups");
        }
        let hw: usize = dims[2..].iter().product();
        let n = (c / groups) * hw;
        let chunks = n.div_ceil(GN_CHUNK).clamp(1, GN_MAX_CHUNKS);
        let chunk_len = n.div_ceil(chunks).max(1);
        // Recounted so that no chunk is empty.
        let chunks = n.div_ceil(chunk_len).max(1);
        let rows = dims[0] * groups;
        as_u32(rows * chunks, &format!("{op}: blocks"))?;
        Ok(Self {
            rows,
            n: as_u32(n, &format!("{op}: values per group"))?,
            chunk_len: as_u32(chunk_len, &format!("{op}: chunk"))?,
            chunks: chunks as u32,
            hw: as_u32(hw, &format!("{op}: spatial size"))?,
            cpg: as_u32(c / groups, &format!("{op}: channels per group"))?,
            groups: as_u32(groups, &format!("{op}: groups"))?,
        })
    }

    /// One block of [`BLOCK`] threads per (group, chunk).
    fn config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: ((self.rows * self.chunks as usize) as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Two f32 partial results per block.
    fn partials(&self) -> usize {
        2 * self.rows * self.chunks as usize
    }
}

/// Checks a group norm's per-channel `gamma`, `beta` (`[C]`) against `x`.
fn gn_affine(x: &Tensor, gamma: &Tensor, beta: &Tensor, op: &str) -> Result<()> {
    let c = x.dims()[1];
    if gamma.dims() != [c] || beta.dims() != [c] {
        bail!(
            "{op}: weight {:?} and bias {:?} do not match the {c} channels",
            gamma.dims(),
            beta.dims()
        );
    }
    Ok(())
}

/// Group normalisation of `x` (`[B, C, ...]`, `groups` groups of `C / groups` channels) with
/// the per-channel affine `gamma`, `beta` (`[C]`, the dtype of `x`), followed by SiLU when
/// `silu`: `(y, mean, rstd)`, the statistics in f32 shaped `[B, groups, 1]` (as
/// [`crate::model::layers`]' group norm keeps them), `rstd = 1/sqrt(var + eps)` (biased
/// variance, as torch).
pub fn group_norm_forward(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "group_norm_forward";
    let (dev, dtype) = common(&[x, gamma, beta], op)?;
    let shape = GnShape::new(x, groups, op)?;
    gn_affine(x, gamma, beta, op)?;
    let stat_dims = vec![x.dims()[0], groups, 1];
    if x.elem_count() == 0 {
        // No values: the output is empty; the statistics of empty groups are 0 and 1/sqrt(eps).
        let y = Tensor::zeros(x.dims(), dtype, x.device())?;
        let mean = Tensor::zeros(stat_dims.clone(), DType::F32, x.device())?;
        let rstd = Tensor::full((1.0 / eps.sqrt()) as f32, stat_dims, x.device())?;
        return Ok((y, mean, rstd));
    }
    let (x, gamma, beta) = (x.contiguous()?, gamma.contiguous()?, beta.contiguous()?);
    let args = (shape, eps as f32, silu);
    by_dtype!(
        dtype,
        group_norm_forward_t(&dev, &x, &gamma, &beta, args, stat_dims)
    )
}

fn group_norm_forward_t<T: Elem>(
    dev: &CudaDevice,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    (s, eps, silu): (GnShape, f32, bool),
    stat_dims: Vec<usize>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = gamma.storage_and_layout();
    let (bs, bl) = beta.storage_and_layout();
    let (xv, wv, bv) = (
        view::<T>(&xs, xl)?,
        view::<T>(&ws, wl)?,
        view::<T>(&bs, bl)?,
    );
    let mut part = alloc::<f32>(dev, s.partials())?;
    let mut y = alloc::<T>(dev, x.elem_count())?;
    let mut mean = alloc::<f32>(dev, s.rows)?;
    let mut rstd = alloc::<f32>(dev, s.rows)?;
    let stream = dev.cuda_stream();

    let func = load(dev, GROUP_NORM_STATS, T::DTYPE)?;
    let mut b = stream.launch_builder(&func);
    b.arg(&xv).arg(&mut part);
    b.arg(&s.n).arg(&s.chunk_len).arg(&s.chunks).arg(&s.groups);
    // SAFETY: the entry point takes (const T* x, f32* part, u32 n, u32 chunk_len,
    // u32 chunks, u32 groups), as pushed above; x holds rows * n values, part two per block
    // of the grid (rows * chunks blocks), every one of which it writes.
    unsafe { b.launch(s.config()) }.w()?;
    drop(b);

    let kernel = if silu {
        GROUP_NORM_SILU_FWD
    } else {
        GROUP_NORM_FWD
    };
    let func = load(dev, kernel, T::DTYPE)?;
    let mut b = stream.launch_builder(&func);
    b.arg(&xv).arg(&wv).arg(&bv).arg(&part);
    b.arg(&mut y).arg(&mut mean).arg(&mut rstd);
    b.arg(&s.n).arg(&s.chunk_len).arg(&s.chunks);
    b.arg(&s.hw).arg(&s.cpg).arg(&s.groups).arg(&eps);
    // SAFETY: the entry points take (const T* x, const T* gamma, const T* beta,
    // const f32* part, T* y, f32* mean, f32* rstd, u32 n, u32 chunk_len, u32 chunks, u32 hw,
    // u32 cpg, u32 groups, f32 eps), as pushed above; x and y hold rows * n values, gamma and
    // beta groups * cpg, part the stats kernel's partials, mean and rstd rows.
    unsafe { b.launch(s.config()) }.w()?;
    drop(b);
    Ok((
        tensor(y, dev, x.dims()),
        tensor(mean, dev, stat_dims.clone()),
        tensor(rstd, dev, stat_dims),
    ))
}

/// The input gradient of [`group_norm_forward`] (with the same `silu`) from the output
/// gradient `g` and the statistics it kept (f32, one per (n, group)): with
/// `xhat = (x - mean) * rstd`, `gs = g * gamma` (with SiLU, `g * silu'(xhat * gamma + beta)
/// * gamma`, the SiLU's input recomputed), per group
/// `rstd * (gs - mean(gs) - xhat * mean(gs * xhat))`.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_backward(
    g: &Tensor,
    x: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    silu: bool,
) -> Result<Tensor> {
    let op = "group_norm_backward";
    let (dev, dtype) = common(&[g, x, gamma, beta], op)?;
    let shape = GnShape::new(x, groups, op)?;
    gn_affine(x, gamma, beta, op)?;
    if g.dims() != x.dims() {
        bail!(
            "{op}: gradient {:?} does not match the input {:?}",
            g.dims(),
            x.dims()
        );
    }
    for (name, st) in [("mean", mean), ("rstd", rstd)] {
        if st.dtype() != DType::F32
            || !st.device().same_device(x.device())
            || st.elem_count() != shape.rows
        {
            bail!(
                "{op}: {name} must be f32 on the input's device with one value per (batch, \
                 group) ({}), not {:?} {:?}",
                shape.rows,
                st.dtype(),
                st.dims()
            );
        }
    }
    if x.elem_count() == 0 {
        return Tensor::zeros(x.dims(), dtype, x.device());
    }
    let (g, x) = (g.contiguous()?, x.contiguous()?);
    let (gamma, beta) = (gamma.contiguous()?, beta.contiguous()?);
    let (mean, rstd) = (mean.contiguous()?, rstd.contiguous()?);
    let inputs = [&g, &x, &mean, &rstd, &gamma, &beta];
    by_dtype!(dtype, group_norm_backward_t(&dev, inputs, shape, silu))
}

fn group_norm_backward_t<T: Elem>(
    dev: &CudaDevice,
    [g, x, mean, rstd, gamma, beta]: [&Tensor; 6],
    s: GnShape,
    silu: bool,
) -> Result<Tensor> {
    let (gs, gl) = g.storage_and_layout();
    let (xs, xl) = x.storage_and_layout();
    let (ms, ml) = mean.storage_and_layout();
    let (rs, rl) = rstd.storage_and_layout();
    let (ws, wl) = gamma.storage_and_layout();
    let (bs, bl) = beta.storage_and_layout();
    let (gv, xv) = (view::<T>(&gs, gl)?, view::<T>(&xs, xl)?);
    let (wv, bv) = (view::<T>(&ws, wl)?, view::<T>(&bs, bl)?);
    let (mv, rv) = (view::<f32>(&ms, ml)?, view::<f32>(&rs, rl)?);
    let mut part = alloc::<f32>(dev, s.partials())?;
    let mut dx = alloc::<T>(dev, x.elem_count())?;
    let stream = dev.cuda_stream();

    let (sums, apply) = if silu {
        (GROUP_NORM_SILU_BWD_SUMS, GROUP_NORM_SILU_BWD)
    } else {
        (GROUP_NORM_BWD_SUMS, GROUP_NORM_BWD)
    };
    let func = load(dev, sums, T::DTYPE)?;
    let mut b = stream.launch_builder(&func);
    b.arg(&gv).arg(&xv).arg(&mv).arg(&rv).arg(&wv).arg(&bv);
    b.arg(&mut part);
    b.arg(&s.n).arg(&s.chunk_len).arg(&s.chunks);
    b.arg(&s.hw).arg(&s.cpg).arg(&s.groups);
    // SAFETY: the entry points take (const T* dy, const T* x, const f32* mean,
    // const f32* rstd, const T* gamma, const T* beta, f32* part, u32 n, u32 chunk_len,
    // u32 chunks, u32 hw, u32 cpg, u32 groups), as pushed above; dy and x hold rows * n
    // values, mean and rstd rows, gamma and beta groups * cpg, part two per block of the grid,
    // every one of which it writes.
    unsafe { b.launch(s.config()) }.w()?;
    drop(b);

    let func = load(dev, apply, T::DTYPE)?;
    let mut b = stream.launch_builder(&func);
    b.arg(&gv).arg(&xv).arg(&mv).arg(&rv).arg(&wv).arg(&bv);
    b.arg(&part).arg(&mut dx);
    b.arg(&s.n).arg(&s.chunk_len).arg(&s.chunks);
    b.arg(&s.hw).arg(&s.cpg).arg(&s.groups);
    // SAFETY: the entry points take the sums kernel's arguments with part read-only, then
    // T* dx (rows * n values), as pushed above.
    unsafe { b.launch(s.config()) }.w()?;
    drop(b);
    Ok(tensor(dx, dev, x.dims()))
}
