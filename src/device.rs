//! Device selection: `cpu`, `cuda` / `cuda:N`, `metal` / `metal:N`.

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// Parses a device name and opens the device, with an error that says what to do when
/// this build or this machine lacks it.
pub fn open_device(name: &str) -> Result<Device> {
    let name = name.trim().to_ascii_lowercase();
    let (kind, ordinal) = match name.split_once(':') {
        Some((k, n)) => {
            let n: usize = n
                .parse()
                .map_err(|_| Error::Device(format!("'{name}': '{n}' is not a device number")))?;
            (k.to_string(), n)
        }
        None => (name.clone(), 0),
    };
    match kind.as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if !cfg!(feature = "cuda") {
                return Err(Error::Device(
                    "'cuda' was asked for, but this build has no CUDA support (build with --features cuda)"
                        .into(),
                ));
            }
            Device::new_cuda(ordinal)
                .map_err(|e| Error::Device(format!("cuda:{ordinal} could not be opened: {e}")))
        }
        "metal" => {
            if !cfg!(feature = "metal") {
                return Err(Error::Device(
                    "'metal' was asked for, but this build has no Metal support (build with --features metal)"
                        .into(),
                ));
            }
            Device::new_metal(ordinal)
                .map_err(|e| Error::Device(format!("metal:{ordinal} could not be opened: {e}")))
        }
        other => Err(Error::Device(format!(
            "'{other}' is not a device (cpu, cuda, cuda:N, metal)"
        ))),
    }
}

/// Device memory held by tensors on `device`, in bytes, as high-water marks since the
/// last [`reset_memory_peak`]: `(in use, reserved)`. On CUDA these are the attributes of
/// the device's default memory pool, from which candle allocates every tensor and
/// workspace (comparable to torch's `max_memory_allocated` / `max_memory_reserved`; the
/// CUDA context itself is in neither). None on the CPU and Metal.
pub fn memory_peak(device: &Device) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        device.synchronize().ok()?;
        return cuda_pool::peak(d).ok();
    }
    let _ = device;
    None
}

/// Starts a new high-water mark for [`memory_peak`] (no-op off CUDA).
pub fn reset_memory_peak(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        let _ = cuda_pool::reset(d);
    }
    let _ = device;
}

/// The dtype of the frozen UNet and VAE when the user leaves it to the device: bf16 on
/// CUDA (mixed precision), f32 elsewhere (candle's CPU backend has no bf16 matrix
/// products, and f16 is slower than f32 there).
pub fn auto_dtype(device: &Device) -> DType {
    if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
}

#[cfg(feature = "cuda")]
mod cuda_pool {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::cuda_backend::CudaDevice;

    type DriverResult<T> =
        std::result::Result<T, candle_core::cuda_backend::cudarc::driver::DriverError>;

    fn pool(d: &CudaDevice) -> DriverResult<sys::CUmemoryPool> {
        let stream = d.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread()?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: `pool` is a valid out-pointer and the device handle comes from a live
        // context bound to this thread.
        unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }.result()?;
        Ok(pool)
    }

    fn attribute(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute) -> DriverResult<u64> {
        let mut v: u64 = 0;
        // SAFETY: these attributes are cuuint64_t values; `v` outlives the call.
        unsafe { sys::cuMemPoolGetAttribute(pool, attr, (&mut v as *mut u64).cast()) }.result()?;
        Ok(v)
    }

    pub fn peak(d: &CudaDevice) -> DriverResult<(u64, u64)> {
        let p = pool(d)?;
        Ok((
            attribute(p, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
            attribute(
                p,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
            )?,
        ))
    }

    pub fn reset(d: &CudaDevice) -> DriverResult<()> {
        let p = pool(d)?;
        for attr in [
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
        ] {
            let mut zero: u64 = 0;
            // SAFETY: the high-water attributes may only be set to 0, through a cuuint64_t.
            unsafe { sys::cuMemPoolSetAttribute(p, attr, (&mut zero as *mut u64).cast()) }
                .result()?;
        }
        Ok(())
    }
}

/// Which accelerators this build can use.
pub fn compiled_backends() -> Vec<&'static str> {
    let mut b = vec!["cpu"];
    if cfg!(feature = "cuda") {
        b.push("cuda");
    }
    if cfg!(feature = "metal") {
        b.push("metal");
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_missing_backends_say_so() {
        assert!(matches!(open_device("cpu"), Ok(Device::Cpu)));
        assert!(matches!(open_device(" CPU "), Ok(Device::Cpu)));
        let err = open_device("tpu").unwrap_err().to_string();
        assert!(err.contains("'tpu' is not a device"), "{err}");
        let err = open_device("cuda:x").unwrap_err().to_string();
        assert!(err.contains("not a device number"), "{err}");
        if !cfg!(feature = "cuda") {
            let err = open_device("cuda:0").unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
    }
}
