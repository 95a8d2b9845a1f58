//! cuDNN's fused attention (forward and backward) and convolutions (forward with bias, input
//! gradient) for f16/bf16 CUDA tensors, through sdti's C++ shim over the cuDNN frontend
//! (`shim.cpp`, `shim.h`; build.rs compiles it with the `cuda` feature).
//!
//! The shim opens `libcudnn.so.9` at run time (`SDTI_CUDNN_LIB` names another file), so a
//! CUDA build links nothing cuDNN. The decision is made once, at the first f16/bf16 CUDA
//! call: cuDNN present -> used; absent -> one line on stderr and candle's kernels run, as
//! without this module. `SDTI_CUDNN=0` turns it off. Each wrapper returns `Ok(None)` where
//! cuDNN does not apply (CPU or f32 tensors, shapes cuDNN has no engine for, misaligned
//! views); the caller then runs its own path.
//!
//! One shim handle per CUDA stream (candle runs one stream per device), with its graph
//! cache (one built plan per shape) and one grow-only workspace (device memory from
//! candle's allocator, on the same stream). The raw-pointer calls into the shim live here
//! and nowhere else in the engine.

pub mod layout;

use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop,
};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaDevice, DType, Device, Layout, Result, Storage, Tensor};

use layout::{ConvDesc, SdpaDesc, View};

/// The shim's C functions (shim.h).
mod sys {
    use super::layout::{ConvDesc, SdpaDesc};
    use std::ffi::{c_char, c_void};

    pub const OK: i32 = 0;
    pub const NEED_WORKSPACE: i32 = 2;
    pub const UNSUPPORTED: i32 = 3;

    /// The opaque `sdti_dnn` handle.
    #[repr(C)]
    pub struct Dnn {
        _private: [u8; 0],
    }

    extern "C" {
        pub fn sdti_dnn_probe(
            lib: *const c_char,
            version: *mut usize,
            err: *mut c_char,
            err_len: usize,
        ) -> i32;
        pub fn sdti_dnn_create(
            stream: *mut c_void,
            out: *mut *mut Dnn,
            err: *mut c_char,
            err_len: usize,
        ) -> i32;
        pub fn sdti_dnn_destroy(h: *mut Dnn);
        pub fn sdti_dnn_sdpa_fwd(
            h: *mut Dnn,
            desc: *const SdpaDesc,
            q: *const c_void,
            k: *const c_void,
            v: *const c_void,
            o: *mut c_void,
            stats: *mut f32,
            ws: *mut c_void,
            ws_len: usize,
            ws_needed: *mut usize,
            err: *mut c_char,
            err_len: usize,
        ) -> i32;
        pub fn sdti_dnn_sdpa_bwd(
            h: *mut Dnn,
            desc: *const SdpaDesc,
            q: *const c_void,
            k: *const c_void,
            v: *const c_void,
            o: *const c_void,
            dout: *const c_void,
            stats: *const f32,
            dq: *mut c_void,
            dk: *mut c_void,
            dv: *mut c_void,
            ws: *mut c_void,
            ws_len: usize,
            ws_needed: *mut usize,
            err: *mut c_char,
            err_len: usize,
        ) -> i32;
        pub fn sdti_dnn_conv_fwd(
            h: *mut Dnn,
            desc: *const ConvDesc,
            x: *const c_void,
            w: *const c_void,
            bias: *const c_void,
            y: *mut c_void,
            ws: *mut c_void,
            ws_len: usize,
            ws_needed: *mut usize,
            err: *mut c_char,
            err_len: usize,
        ) -> i32;
        pub fn sdti_dnn_conv_dgrad(
            h: *mut Dnn,
            desc: *const ConvDesc,
            dy: *const c_void,
            w: *const c_void,
            dx: *mut c_void,
            ws: *mut c_void,
            ws_len: usize,
            ws_needed: *mut usize,
            err: *mut c_char,
            err_len: usize,
        ) -> i32;
    }
}

/// Room for the shim's error messages.
const ERR_LEN: usize = 1024;

fn message(buf: &[c_char]) -> String {
    // SAFETY: the shim always NUL-terminates within the buffer it was given (and the buffer
    // starts zeroed, so an untouched one is the empty string).
    unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Whether cuDNN is used: decided once per process (see the module comment). `Some(v)`:
/// cuDNN version `v` (e.g. 91900) is loaded.
pub fn version() -> Option<usize> {
    static VERSION: OnceLock<Option<usize>> = OnceLock::new();
    *VERSION.get_or_init(|| {
        if std::env::var("SDTI_CUDNN").is_ok_and(|v| v.trim() == "0") {
            eprintln!(
                "sdti: cuDNN off (SDTI_CUDNN=0): attention and convolutions run candle's kernels"
            );
            return None;
        }
        let lib = std::env::var("SDTI_CUDNN_LIB")
            .ok()
            .and_then(|p| CString::new(p).ok());
        let mut err = [0 as c_char; ERR_LEN];
        let mut version = 0usize;
        // SAFETY: `lib` is NULL or a NUL-terminated string that outlives the call; `version`
        // and `err` are valid for writes of one usize and ERR_LEN bytes.
        let rc = unsafe {
            sys::sdti_dnn_probe(
                lib.as_ref().map_or(std::ptr::null(), |l| l.as_ptr()),
                &mut version,
                err.as_mut_ptr(),
                ERR_LEN,
            )
        };
        if rc == sys::OK {
            Some(version)
        } else {
            eprintln!(
                "sdti: cuDNN not available ({}): attention and convolutions run candle's kernels",
                message(&err)
            );
            None
        }
    })
}

/// Whether cuDNN is loaded and on.
pub fn available() -> bool {
    version().is_some()
}

/// A shim handle with its grow-only workspace.
struct Handle {
    raw: *mut sys::Dnn,
    workspace: Option<CudaSlice<u8>>,
}

// SAFETY: the handle is only used under its mutex (one thread at a time), which is what
// cuDNN asks of a handle; the raw pointer is never shared outside it.
unsafe impl Send for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: `raw` came from sdti_dnn_create and is destroyed once, here.
        unsafe { sys::sdti_dnn_destroy(self.raw) }
    }
}

/// Set when creating a handle failed: cuDNN is then off for the rest of the process.
static HANDLE_FAILED: AtomicBool = AtomicBool::new(false);

/// The handle of `dev`'s stream, created at its first use (`None`: creating it failed).
fn handle(dev: &CudaDevice) -> Result<Option<Arc<Mutex<Handle>>>> {
    static HANDLES: OnceLock<Mutex<HashMap<usize, Arc<Mutex<Handle>>>>> = OnceLock::new();
    let stream = dev.cuda_stream();
    let key = stream.cu_stream() as usize;
    let mut handles = HANDLES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(h) = handles.get(&key) {
        return Ok(Some(h.clone()));
    }
    stream.context().bind_to_thread().w()?;
    let mut raw = std::ptr::null_mut();
    let mut err = [0 as c_char; ERR_LEN];
    // SAFETY: the stream belongs to the context just bound to this thread and lives as long
    // as the device (candle keeps it); `raw` and `err` are valid for writes.
    let rc = unsafe {
        sys::sdti_dnn_create(
            stream.cu_stream() as *mut c_void,
            &mut raw,
            err.as_mut_ptr(),
            ERR_LEN,
        )
    };
    if rc != sys::OK {
        // A library that loads but cannot serve this device (an unsupported GPU, no memory):
        // cuDNN is off for the rest of the run, as when it is absent.
        HANDLE_FAILED.store(true, Ordering::Relaxed);
        eprintln!(
            "sdti: cuDNN cannot create a handle ({}): attention and convolutions run candle's \
             kernels",
            message(&err)
        );
        return Ok(None);
    }
    let h = Arc::new(Mutex::new(Handle {
        raw,
        workspace: None,
    }));
    handles.insert(key, h.clone());
    Ok(Some(h))
}

/// What a shim call came back with.
enum Outcome {
    Done,
    /// No handle (reported once when creating it failed).
    NoHandle,
    /// No engine for this shape: the message, for the one line that reports it.
    Unsupported(String),
}

/// Runs `call(handle, ws, ws_len, ws_needed, err)` on `dev`'s handle, growing the workspace
/// and calling again when the plan needs more.
fn run(
    dev: &CudaDevice,
    op: &str,
    call: impl Fn(*mut sys::Dnn, *mut c_void, usize, *mut usize, *mut c_char) -> i32,
) -> Result<Outcome> {
    let Some(h) = handle(dev)? else {
        return Ok(Outcome::NoHandle);
    };
    let mut h = h.lock().unwrap_or_else(|e| e.into_inner());
    let stream = dev.cuda_stream();
    stream.context().bind_to_thread().w()?;
    for _ in 0..2 {
        let mut err = [0 as c_char; ERR_LEN];
        let mut needed = 0usize;
        let raw = h.raw;
        let rc = match h.workspace.as_mut() {
            Some(ws) => {
                let len = ws.len();
                let (ptr, _sync) = ws.device_ptr_mut(&stream);
                call(raw, ptr as *mut c_void, len, &mut needed, err.as_mut_ptr())
            }
            None => call(raw, std::ptr::null_mut(), 0, &mut needed, err.as_mut_ptr()),
        };
        match rc {
            sys::OK => return Ok(Outcome::Done),
            sys::UNSUPPORTED => return Ok(Outcome::Unsupported(message(&err))),
            sys::NEED_WORKSPACE => {
                // Grow only; round up to 1 MiB so that small differences do not reallocate.
                let bytes = needed.div_ceil(1 << 20) << 20;
                h.workspace = None;
                // SAFETY: cuDNN uses the workspace as scratch and initialises what it reads.
                h.workspace = Some(unsafe { dev.alloc::<u8>(bytes) }?);
            }
            _ => bail!("cuDNN {op}: {}", message(&err)),
        }
    }
    bail!("cuDNN {op}: the workspace did not suffice after growing it")
}

/// One line for the first shape of each op cuDNN has no engine for (the others run
/// candle's kernels silently).
fn report_unsupported(flag: &AtomicBool, op: &str, shape: String, why: &str) {
    if !flag.swap(true, Ordering::Relaxed) {
        eprintln!("sdti: cuDNN has no {op} engine for {shape} ({why}); candle's kernels run it (further shapes not reported)");
    }
}

fn dnn_dtype(dtype: DType) -> Option<i32> {
    match dtype {
        DType::F16 => Some(layout::DNN_F16),
        DType::BF16 => Some(layout::DNN_BF16),
        _ => None,
    }
}

/// The CUDA device of `t` when it and all of `others` are f16/bf16 of one dtype on it and
/// cuDNN is available (checked in that order, so that CPU and f32 calls never load cuDNN).
fn cudnn_device(t: &Tensor, others: &[&Tensor]) -> Option<CudaDevice> {
    let Device::Cuda(dev) = t.device() else {
        return None;
    };
    dnn_dtype(t.dtype())?;
    if !others
        .iter()
        .all(|o| o.dtype() == t.dtype() && o.device().same_device(t.device()))
    {
        return None;
    }
    (available() && !HANDLE_FAILED.load(Ordering::Relaxed)).then(|| dev.clone())
}

fn view(l: &Layout) -> View<'_> {
    View {
        dims: l.dims(),
        strides: l.stride(),
    }
}

/// A storage type cuDNN runs here (f16, bf16; f32 for the statistics): the fused kernels'
/// storage types (`super::Elem`, whose `alloc` and `tensor` helpers these calls share).
trait Elem: super::Elem + 'static {}
impl<T: super::Elem + 'static> Elem for T {}

use super::{alloc, tensor};

/// The device address of a tensor's first value, kept with the guard that orders the
/// stream after the storage's last write.
struct Ptr<'a> {
    addr: u64,
    _sync: SyncOnDrop<'a>,
}

/// The address of value `l.start_offset()` of `s`, or `None` when it is not 16-byte
/// aligned (cuDNN's vector loads need that).
fn ptr<'a, T: Elem>(s: &'a Storage, l: &Layout, stream: &'a CudaStream) -> Result<Option<Ptr<'a>>> {
    let slice = super::cuda_storage(s)?.as_cuda_slice::<T>()?;
    let (base, sync) = slice.device_ptr(stream);
    let addr = base + (l.start_offset() * std::mem::size_of::<T>()) as u64;
    Ok(addr.is_multiple_of(16).then_some(Ptr { addr, _sync: sync }))
}

macro_rules! by_half_dtype {
    ($dtype:expr, $f:ident ( $($arg:expr),* $(,)? )) => {
        match $dtype {
            DType::F16 => $f::<half::f16>($($arg),*),
            DType::BF16 => $f::<half::bf16>($($arg),*),
            other => bail!("cuDNN runs f16 or bf16 here, not {other:?}"),
        }
    };
}

static SDPA_UNSUPPORTED: AtomicBool = AtomicBool::new(false);
static CONV_UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// cuDNN's fused attention forward on merged-head tensors, as
/// [`crate::model::layers::attention::attention_forward`] defines it: q `[B, N, H*dh]`,
/// k and v `[B, M, H*dh]` (strided views with a contiguous last dimension are read in
/// place). Returns o `[B, N, H*dh]` (contiguous) and the row log-sum-exp `[B, H, N]` (f32),
/// or `None` where cuDNN does not apply.
pub fn sdpa_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    causal: bool,
) -> Result<Option<(Tensor, Tensor)>> {
    let Some(dev) = cudnn_device(q, &[k, v]) else {
        return Ok(None);
    };
    let Some(dtype) = dnn_dtype(q.dtype()) else {
        return Ok(None);
    };
    let (ql, kl, vl) = (q.layout(), k.layout(), v.layout());
    let Some(desc) = layout::sdpa_desc(view(ql), view(kl), view(vl), heads, dtype, causal, scale)
    else {
        return Ok(None);
    };
    by_half_dtype!(q.dtype(), sdpa_forward_t(&dev, &desc, q, k, v))
}

fn sdpa_forward_t<T: Elem>(
    dev: &CudaDevice,
    desc: &SdpaDesc,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<Option<(Tensor, Tensor)>> {
    let (b, n, c) = q.dims3()?;
    let h = desc.h as usize;
    let stream = dev.cuda_stream();
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (Some(qp), Some(kp), Some(vp)) = (
        ptr::<T>(&qs, ql, &stream)?,
        ptr::<T>(&ks, kl, &stream)?,
        ptr::<T>(&vs, vl, &stream)?,
    ) else {
        return Ok(None);
    };
    let mut o = alloc::<T>(dev, b * n * c)?;
    let mut stats = alloc::<f32>(dev, b * h * n)?;
    let outcome = {
        let (op, _os) = o.device_ptr_mut(&stream);
        let (sp, _ss) = stats.device_ptr_mut(&stream);
        run(dev, "attention forward", |hd, ws, len, needed, err| {
            // SAFETY: the pointers address live device buffers of the sizes `desc`
            // describes (checked by layout::sdpa_desc against the tensors' layouts; o and
            // stats were allocated for them), on the handle's stream; `needed` and `err`
            // are valid for writes.
            unsafe {
                sys::sdti_dnn_sdpa_fwd(
                    hd,
                    desc,
                    qp.addr as *const c_void,
                    kp.addr as *const c_void,
                    vp.addr as *const c_void,
                    op as *mut c_void,
                    sp as *mut f32,
                    ws,
                    len,
                    needed,
                    err,
                    ERR_LEN,
                )
            }
        })?
    };
    if matches!(outcome, Outcome::NoHandle) {
        return Ok(None);
    }
    if let Outcome::Unsupported(why) = outcome {
        let shape = format!("q {:?} k {:?}, {h} heads", q.dims(), k.dims());
        report_unsupported(&SDPA_UNSUPPORTED, "attention", shape, &why);
        return Ok(None);
    }
    Ok(Some((
        tensor(o, dev, (b, n, c)),
        tensor(stats, dev, (b, h, n)),
    )))
}

/// cuDNN's fused attention backward: from the forward's inputs, its output `o`, its row
/// log-sum-exp `lse` (`[B, H, N]`, f32) and the output gradient `g`, the gradients of q, k
/// and v (contiguous, in the merged-head layout), or `None` where cuDNN does not apply.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn sdpa_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    g: &Tensor,
    heads: usize,
    scale: f64,
    causal: bool,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let Some(dev) = cudnn_device(q, &[k, v, o, g]) else {
        return Ok(None);
    };
    let Some(dtype) = dnn_dtype(q.dtype()) else {
        return Ok(None);
    };
    if lse.dtype() != DType::F32 || !lse.device().same_device(q.device()) {
        return Ok(None);
    }
    let Some(desc) = layout::sdpa_desc(
        view(q.layout()),
        view(k.layout()),
        view(v.layout()),
        heads,
        dtype,
        causal,
        scale,
    ) else {
        return Ok(None);
    };
    let (o, g, lse) = (o.contiguous()?, g.contiguous()?, lse.contiguous()?);
    by_half_dtype!(
        q.dtype(),
        sdpa_backward_t(&dev, &desc, [q, k, v, &o, &g], &lse)
    )
}

fn sdpa_backward_t<T: Elem>(
    dev: &CudaDevice,
    desc: &SdpaDesc,
    [q, k, v, o, g]: [&Tensor; 5],
    lse: &Tensor,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let (b, n, c) = q.dims3()?;
    let m = k.dim(1)?;
    let stream = dev.cuda_stream();
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (os, ol) = o.storage_and_layout();
    let (gs, gl) = g.storage_and_layout();
    let (ls, ll) = lse.storage_and_layout();
    let (Some(qp), Some(kp), Some(vp), Some(op), Some(gp), Some(lp)) = (
        ptr::<T>(&qs, ql, &stream)?,
        ptr::<T>(&ks, kl, &stream)?,
        ptr::<T>(&vs, vl, &stream)?,
        ptr::<T>(&os, ol, &stream)?,
        ptr::<T>(&gs, gl, &stream)?,
        ptr::<f32>(&ls, ll, &stream)?,
    ) else {
        return Ok(None);
    };
    let mut dq = alloc::<T>(dev, b * n * c)?;
    let mut dk = alloc::<T>(dev, b * m * c)?;
    let mut dv = alloc::<T>(dev, b * m * c)?;
    let outcome = {
        let (dqp, _s1) = dq.device_ptr_mut(&stream);
        let (dkp, _s2) = dk.device_ptr_mut(&stream);
        let (dvp, _s3) = dv.device_ptr_mut(&stream);
        run(dev, "attention backward", |hd, ws, len, needed, err| {
            // SAFETY: as in sdpa_forward_t: live device buffers of the sizes `desc`
            // describes (o, g and lse contiguous, the outputs allocated for it).
            unsafe {
                sys::sdti_dnn_sdpa_bwd(
                    hd,
                    desc,
                    qp.addr as *const c_void,
                    kp.addr as *const c_void,
                    vp.addr as *const c_void,
                    op.addr as *const c_void,
                    gp.addr as *const c_void,
                    lp.addr as *const f32,
                    dqp as *mut c_void,
                    dkp as *mut c_void,
                    dvp as *mut c_void,
                    ws,
                    len,
                    needed,
                    err,
                    ERR_LEN,
                )
            }
        })?
    };
    if matches!(outcome, Outcome::NoHandle) {
        return Ok(None);
    }
    if let Outcome::Unsupported(why) = outcome {
        let shape = format!("q {:?} k {:?}, {} heads", q.dims(), k.dims(), desc.h);
        report_unsupported(&SDPA_UNSUPPORTED, "attention backward", shape, &why);
        return Ok(None);
    }
    Ok(Some((
        tensor(dq, dev, (b, n, c)),
        tensor(dk, dev, (b, m, c)),
        tensor(dv, dev, (b, m, c)),
    )))
}

/// cuDNN's convolution of `x` (`[N, C, H, W]`) by `weight` (`[K, C, R, S]`), symmetric
/// padding, one stride, groups and dilation 1, plus `bias` (`[K]`) per output channel,
/// added in f32 in the same graph. `None` where cuDNN does not apply.
pub fn conv_forward(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    pad: usize,
    stride: usize,
) -> Result<Option<Tensor>> {
    let others: Vec<&Tensor> = std::iter::once(weight).chain(bias).collect();
    let Some(dev) = cudnn_device(x, &others) else {
        return Ok(None);
    };
    let Some(dtype) = dnn_dtype(x.dtype()) else {
        return Ok(None);
    };
    let bias = match bias {
        Some(b) if b.dims() == [weight.dim(0)?] => Some(b.contiguous()?),
        Some(_) => return Ok(None),
        None => None,
    };
    let Some(desc) = layout::conv_desc(
        view(x.layout()),
        view(weight.layout()),
        pad,
        stride,
        dtype,
        bias.is_some(),
    ) else {
        return Ok(None);
    };
    let y = by_half_dtype!(
        x.dtype(),
        conv_forward_t(&dev, &desc, x, weight, bias.as_ref())
    )?;
    match (y, bias) {
        (Some(y), _) => Ok(Some(y)),
        // No engine for conv + bias in one graph: the convolution alone, then candle's add.
        (None, Some(b)) => {
            let desc = ConvDesc {
                has_bias: 0,
                ..desc
            };
            let y = by_half_dtype!(x.dtype(), conv_forward_t(&dev, &desc, x, weight, None))?;
            y.map(|y| y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?))
                .transpose()
        }
        (None, None) => Ok(None),
    }
}

fn conv_forward_t<T: Elem>(
    dev: &CudaDevice,
    desc: &ConvDesc,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let stream = dev.cuda_stream();
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = weight.storage_and_layout();
    let bias = bias.map(|b| b.storage_and_layout());
    let (Some(xp), Some(wp)) = (ptr::<T>(&xs, xl, &stream)?, ptr::<T>(&ws, wl, &stream)?) else {
        return Ok(None);
    };
    let bp = match &bias {
        Some((bs, bl)) => match ptr::<T>(bs, bl, &stream)? {
            Some(p) => Some(p),
            None => return Ok(None),
        },
        None => None,
    };
    let dims = [desc.n, desc.k, desc.out_h, desc.out_w].map(|d| d as usize);
    let mut y = alloc::<T>(dev, dims.iter().product())?;
    let outcome = {
        let (yp, _sy) = y.device_ptr_mut(&stream);
        run(dev, "convolution", |hd, ws, len, needed, err| {
            // SAFETY: live device buffers of the sizes `desc` describes (from the tensors'
            // layouts by layout::conv_desc; y allocated for it; the bias contiguous [K]).
            unsafe {
                sys::sdti_dnn_conv_fwd(
                    hd,
                    desc,
                    xp.addr as *const c_void,
                    wp.addr as *const c_void,
                    bp.as_ref()
                        .map_or(std::ptr::null(), |p| p.addr as *const c_void),
                    yp as *mut c_void,
                    ws,
                    len,
                    needed,
                    err,
                    ERR_LEN,
                )
            }
        })?
    };
    if matches!(outcome, Outcome::NoHandle) {
        return Ok(None);
    }
    if let Outcome::Unsupported(why) = outcome {
        if desc.has_bias == 0 {
            let shape = format!("x {:?} w {:?}", x.dims(), weight.dims());
            report_unsupported(&CONV_UNSUPPORTED, "convolution", shape, &why);
        }
        return Ok(None);
    }
    Ok(Some(tensor(y, dev, dims.to_vec())))
}

/// cuDNN's input gradient of [`conv_forward`] (without bias) for an input of `in_h` x
/// `in_w`, from the output gradient `g`: `[N, C, in_h, in_w]`, or `None` where cuDNN does
/// not apply.
pub fn conv_input_grad(
    g: &Tensor,
    weight: &Tensor,
    pad: usize,
    stride: usize,
    in_h: usize,
    in_w: usize,
) -> Result<Option<Tensor>> {
    let Some(dev) = cudnn_device(g, &[weight]) else {
        return Ok(None);
    };
    let Some(dtype) = dnn_dtype(g.dtype()) else {
        return Ok(None);
    };
    let Some(desc) = layout::dgrad_desc(
        view(g.layout()),
        view(weight.layout()),
        pad,
        stride,
        in_h,
        in_w,
        dtype,
    ) else {
        return Ok(None);
    };
    by_half_dtype!(g.dtype(), conv_input_grad_t(&dev, &desc, g, weight))
}

fn conv_input_grad_t<T: Elem>(
    dev: &CudaDevice,
    desc: &ConvDesc,
    g: &Tensor,
    weight: &Tensor,
) -> Result<Option<Tensor>> {
    let stream = dev.cuda_stream();
    let (gs, gl) = g.storage_and_layout();
    let (ws, wl) = weight.storage_and_layout();
    let (Some(gp), Some(wp)) = (ptr::<T>(&gs, gl, &stream)?, ptr::<T>(&ws, wl, &stream)?) else {
        return Ok(None);
    };
    let dims = [desc.n, desc.c, desc.h, desc.w].map(|d| d as usize);
    let mut dx = alloc::<T>(dev, dims.iter().product())?;
    let outcome = {
        let (dxp, _sx) = dx.device_ptr_mut(&stream);
        run(
            dev,
            "convolution input gradient",
            |hd, ws, len, needed, err| {
                // SAFETY: live device buffers of the sizes `desc` describes (from the layouts
                // by layout::dgrad_desc; dx allocated for it).
                unsafe {
                    sys::sdti_dnn_conv_dgrad(
                        hd,
                        desc,
                        gp.addr as *const c_void,
                        wp.addr as *const c_void,
                        dxp as *mut c_void,
                        ws,
                        len,
                        needed,
                        err,
                        ERR_LEN,
                    )
                }
            },
        )?
    };
    if matches!(outcome, Outcome::NoHandle) {
        return Ok(None);
    }
    if let Outcome::Unsupported(why) = outcome {
        let shape = format!("dy {:?} w {:?}", g.dims(), weight.dims());
        report_unsupported(&CONV_UNSUPPORTED, "convolution input-gradient", shape, &why);
        return Ok(None);
    }
    Ok(Some(tensor(dx, dev, dims.to_vec())))
}
