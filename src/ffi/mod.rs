//! The C ABI: the only place in sdti with `extern "C"`, `#[no_mangle]` and raw pointers.
//!
//! `include/sdti.h` is generated from this module by the pinned cbindgen
//! (`cbindgen.toml`; `UPDATE_HEADER=1 cargo test header` rewrites it). Conventions, kept
//! by every export:
//!
//! * Every symbol is `sdti_<object>_<verb>`, every constant `SDTI_...`.
//! * Fallible calls return `sdti_status` (`SDTI_OK` = 0). Out-parameters come last and are
//!   written only on success (and, for size queries, the needed size on
//!   `SDTI_ERR_BUFFER_TOO_SMALL`). `sdti_last_error` gives this thread's detail of the
//!   last failure.
//! * Structs passed in start with `uint32_t struct_size`, are filled by `sdti_*_init`,
//!   and only grow at the end: the library reads `min(struct_size, sizeof)` bytes and
//!   defaults the rest; a `struct_size` below the first revision's size is an error.
//! * Handles are opaque. `_free(NULL)` is a no-op; a handle that is not live (never
//!   created, or freed) gets `SDTI_ERR_INVALID_HANDLE` instead of a crash, as long as its
//!   address has not been reused by a later `_new`.
//! * No panic crosses the boundary: a panic becomes `SDTI_ERR_PANIC`, and the handle it
//!   happened on is poisoned (every later call on it but `_free` returns
//!   `SDTI_ERR_POISONED`).
//! * Inputs (strings, pixels, vectors) are copied before a call returns; outputs go into
//!   caller buffers.

#![allow(non_camel_case_types)]

mod boundary;
mod embedding;
mod encoder;
mod trainer;

use std::ffi::{c_char, CStr};

pub use embedding::*;
pub use encoder::*;
pub use trainer::*;

use boundary::{call, write_bytes_with_nul};

/// The ABI's major version: a host built against another major must not use this library.
pub const SDTI_ABI_MAJOR: u32 = 1;
/// The ABI's minor version: grows when functions, constants or struct fields are added.
/// 1: `SDTI_PRECISION_AUTO`, the params' new default.
/// 2: writes refuse to replace an existing path (`SDTI_ERR_EXISTS`) unless
///    `SDTI_WRITE_OVERWRITE` is passed to the `_ex` functions; `sdti_name_check`;
///    `sdti_format_from_name` and codes for the read-only formats.
/// 3: `sdti_trainer_params.recompute` and `.memory_budget_mib` (revision 2 of the params),
///    `SDTI_RECOMPUTE_*`, `sdti_trainer_recompute`.
/// 4: SD 2.x and SDXL models (`sdti.model.sd2/1`, `sdti.model.sdxl/1`): `SDTI_FAMILY_*`,
///    `sdti_encoder_family`, `sdti_encoder_pooled_dim`, `sdti_encoder_part_dims`,
///    `sdti_encoder_encode_pooled`, `sdti_encoder_register_vectors_sdxl`,
///    `sdti_encoder_set_clip_layer` (ComfyUI's negative layer indices),
///    `sdti_encoder_clip_skip`, `sdti_trainer_family`, `sdti_trainer_notes`,
///    `sdti_trainer_get_part_vectors`; `SDTI_FORMAT_DIFFUSERS_SDXL`
///    (`sdti.formats.diffusers-sdxl/1`); `sdti_trainer_params.resolution` 0 (the new
///    default) picks the model family's resolution, `sdti_trainer_resolution` tells it.
/// 5 (`sdti.prompt.weights/1`, `sdti.train.preview/1`, `sdti.train.fit-check/1`):
///    `sdti_trainer_params.prediction_type`, `.zero_terminal_snr`, `.clip_skip` and
///    `.random_crop` (revision 3 of the params), `SDTI_PREDICTION_*`, `SDTI_ZERO_SNR_*`,
///    `sdti_trainer_prediction`; `SDTI_ERR_MEMORY`: `sdti_trainer_new` refuses a run
///    that cannot fit in memory before it reads the weights; prompt weights read and
///    applied by `sdti_encoder_encode` as the chunk style's host does,
///    `sdti_encoder_set_prompt_weights`, `sdti_encoder_token_weights`;
///    `sdti_trainer_preview`: a picture of the word as the run has learned it so far.
pub const SDTI_ABI_MINOR: u32 = 5;

/// The result of every fallible call. Codes are never renumbered.
pub type sdti_status = i32;

/// Success.
pub const SDTI_OK: sdti_status = 0;
/// The run was cancelled (`sdti_trainer_cancel` or a progress callback); not a failure.
pub const SDTI_CANCELLED: sdti_status = 1;
/// A required pointer was NULL, or a value is out of range or malformed.
pub const SDTI_ERR_INVALID_ARGUMENT: sdti_status = 2;
/// A string argument is not valid UTF-8.
pub const SDTI_ERR_INVALID_UTF8: sdti_status = 3;
/// A struct's `struct_size` is smaller than the first revision of that struct.
pub const SDTI_ERR_STRUCT_SIZE: sdti_status = 4;
/// A caller buffer is too small; the needed size was written to the size out-parameter.
pub const SDTI_ERR_BUFFER_TOO_SMALL: sdti_status = 5;
/// The handle is NULL, was freed, or did not come from this library.
pub const SDTI_ERR_INVALID_HANDLE: sdti_status = 6;
/// Another thread is using the handle right now.
pub const SDTI_ERR_BUSY: sdti_status = 7;
/// An earlier call on this handle panicked; only `_free` is allowed on it now.
pub const SDTI_ERR_POISONED: sdti_status = 8;
/// The library panicked inside this call (a bug); the message says where.
pub const SDTI_ERR_PANIC: sdti_status = 9;
/// A file could not be read or written.
pub const SDTI_ERR_IO: sdti_status = 10;
/// The model could not be loaded (not SD 1.x, 2.x or SDXL base, a missing or misshaped
/// weight).
pub const SDTI_ERR_MODEL: sdti_status = 11;
/// The device name is unknown, or this build or machine lacks that device.
pub const SDTI_ERR_DEVICE: sdti_status = 12;
/// A training image is unusable (size, stride, buffer, decoding).
pub const SDTI_ERR_IMAGE: sdti_status = 13;
/// A learned-embedding file is unreadable, malformed or does not fit the model.
pub const SDTI_ERR_EMBEDDING: sdti_status = 14;
/// A training checkpoint is unreadable or belongs to another run.
pub const SDTI_ERR_CHECKPOINT: sdti_status = 15;
/// The call does not fit the handle's state (a step before any image was added).
pub const SDTI_ERR_STATE: sdti_status = 16;
/// The operation or format is not supported (a read-only format, a missing feature).
pub const SDTI_ERR_UNSUPPORTED: sdti_status = 17;
/// A tensor computation failed.
pub const SDTI_ERR_COMPUTE: sdti_status = 18;
/// The destination exists (a file, a folder, a symlink, dangling or not) and replacing it
/// was not asked for (`SDTI_WRITE_OVERWRITE`).
pub const SDTI_ERR_EXISTS: sdti_status = 19;
/// The job needs more memory than the device has available (or than the memory budget
/// given): the message says how much it needs, how much there is and what lowers it.
/// Since ABI 1.5.
pub const SDTI_ERR_MEMORY: sdti_status = 20;

/// An `SDTI_PRECISION_*` value (a `uint32_t`: the type says which constants fit).
pub type sdti_precision = u32;
/// An `SDTI_PIXEL_*` value (a `uint32_t`).
pub type sdti_pixel_format = u32;
/// An `SDTI_FORMAT_*` value (a `uint32_t`).
pub type sdti_format = u32;
/// `SDTI_WRITE_*` flags, or-ed (a `uint32_t`).
pub type sdti_write_flags = u32;

/// Weights computed in 32-bit floats.
pub const SDTI_PRECISION_F32: sdti_precision = 0;
/// Weights computed in IEEE half floats (for GPUs).
pub const SDTI_PRECISION_F16: sdti_precision = 1;
/// Weights computed in bfloat16 (for GPUs; refused on the CPU).
pub const SDTI_PRECISION_BF16: sdti_precision = 2;
/// The device chooses (the default since ABI 1.1): bf16 on CUDA, f32 elsewhere. The text
/// encoder, the learned vectors, the optimizer and the loss are f32 in every precision.
pub const SDTI_PRECISION_AUTO: sdti_precision = 3;

/// Pixels of 3 bytes, R G B.
pub const SDTI_PIXEL_RGB8: sdti_pixel_format = 0;
/// Pixels of 4 bytes, R G B A (straight alpha; alpha is ignored).
pub const SDTI_PIXEL_RGBA8: sdti_pixel_format = 1;

/// An `SDTI_FAMILY_*` value (a `uint32_t`): which Stable Diffusion a model is.
pub type sdti_family = u32;

/// Stable Diffusion 1.x: CLIP ViT-L/14, words 768 wide.
pub const SDTI_FAMILY_SD1: sdti_family = 1;
/// Stable Diffusion 2.x (512 epsilon and 768 v-prediction): OpenCLIP ViT-H/14, words
/// 1024 wide.
pub const SDTI_FAMILY_SD2: sdti_family = 2;
/// SDXL base and its fine-tunes: CLIP ViT-L (768) and OpenCLIP bigG (1280), words with a
/// part for each, a 2048-wide context and a 1280-wide pooled vector.
pub const SDTI_FAMILY_SDXL: sdti_family = 3;

/// The `SDTI_FAMILY_*` code of an engine family.
pub(crate) fn family_code(family: crate::embedding::Family) -> sdti_family {
    match family {
        crate::embedding::Family::Sd1 => SDTI_FAMILY_SD1,
        crate::embedding::Family::Sd2 => SDTI_FAMILY_SD2,
        crate::embedding::Family::Sdxl => SDTI_FAMILY_SDXL,
    }
}

/// `ABI_MAJOR << 16 | ABI_MINOR`, what `sdti_abi_version` returns.
pub const SDTI_ABI_VERSION: u32 = (SDTI_ABI_MAJOR << 16) | SDTI_ABI_MINOR;

/// The capabilities `sdti_has_feature` answers yes to: `name/revision`.
fn features() -> Vec<&'static str> {
    let mut f = vec![
        "sdti.train/1",
        "sdti.precision.auto/1",
        "sdti.train.resume/1",
        "sdti.train.recompute/1",
        "sdti.encoder/1",
        "sdti.encoder.tokenize/1",
        "sdti.embedding.convert/1",
        "sdti.embedding.inspect/1",
        "sdti.names/1",
        "sdti.write.no-clobber/1",
        "sdti.formats.a1111-pt/1",
        "sdti.formats.safetensors/1",
        "sdti.formats.diffusers/1",
        "sdti.formats.diffusers-bin/1",
        "sdti.formats.png/1",
        "sdti.formats.kohya/1",
        "sdti.formats.onetrainer/1",
        "sdti.formats.sdxl/1",
        "sdti.formats.diffusers-sdxl/1",
        "sdti.model.sd2/1",
        "sdti.model.sdxl/1",
        "sdti.prompt.a1111/1",
        "sdti.prompt.comfyui/1",
        "sdti.prompt.diffusers/1",
        "sdti.prompt.weights/1",
        "sdti.train.preview/1",
        "sdti.train.fit-check/1",
    ];
    if cfg!(feature = "cuda") {
        f.push("sdti.cuda/1");
    }
    if cfg!(feature = "metal") {
        f.push("sdti.metal/1");
    }
    f
}

/// The ABI version this library implements: `SDTI_ABI_MAJOR << 16 | SDTI_ABI_MINOR`.
/// A host checks the major first: `(sdti_abi_version() >> 16) == SDTI_ABI_MAJOR`.
///
/// `[thread-safe]`
#[no_mangle]
pub extern "C" fn sdti_abi_version() -> u32 {
    SDTI_ABI_VERSION
}

/// The library's version, e.g. `"0.1.0"`: a static string, never freed.
///
/// `[thread-safe]`
#[no_mangle]
pub extern "C" fn sdti_version_string() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// 1 when this build has the capability `id` (`"name/revision"`, e.g. `"sdti.train/1"`,
/// `"sdti.formats.a1111-pt/1"`, `"sdti.cuda/1"` only in CUDA builds), else 0 (also for
/// NULL or invalid UTF-8). Revisions are exact: a host asking for `/2` of a capability
/// this build has at `/1` gets 0.
///
/// # Safety
/// `id` is NULL or a NUL-terminated string.
///
/// `[thread-safe]`
#[no_mangle]
pub unsafe extern "C" fn sdti_has_feature(id: *const c_char) -> i32 {
    let mut found = false;
    let _ = call(|| {
        // SAFETY: the caller passes NULL or a NUL-terminated string.
        let id = unsafe { boundary::cstr(id, "id") }?;
        found = features().contains(&id);
        Ok(())
    });
    i32::from(found)
}

/// A static description of a status code (`"invalid argument"`); never NULL, never freed.
///
/// `[thread-safe]`
#[no_mangle]
pub extern "C" fn sdti_status_str(status: sdti_status) -> *const c_char {
    let s: &'static CStr = match status {
        SDTI_OK => c"ok",
        SDTI_CANCELLED => c"cancelled",
        SDTI_ERR_INVALID_ARGUMENT => c"invalid argument",
        SDTI_ERR_INVALID_UTF8 => c"string is not valid UTF-8",
        SDTI_ERR_STRUCT_SIZE => c"struct_size is too small",
        SDTI_ERR_BUFFER_TOO_SMALL => c"buffer too small",
        SDTI_ERR_INVALID_HANDLE => c"invalid handle",
        SDTI_ERR_BUSY => c"handle is in use on another thread",
        SDTI_ERR_POISONED => c"handle is poisoned by an earlier panic",
        SDTI_ERR_PANIC => c"internal panic",
        SDTI_ERR_IO => c"file error",
        SDTI_ERR_MODEL => c"model error",
        SDTI_ERR_DEVICE => c"device error",
        SDTI_ERR_IMAGE => c"image error",
        SDTI_ERR_EMBEDDING => c"embedding file error",
        SDTI_ERR_CHECKPOINT => c"checkpoint error",
        SDTI_ERR_STATE => c"call out of order",
        SDTI_ERR_UNSUPPORTED => c"unsupported",
        SDTI_ERR_COMPUTE => c"computation failed",
        SDTI_ERR_EXISTS => c"destination exists",
        SDTI_ERR_MEMORY => c"not enough memory for the job",
        _ => c"unknown status",
    };
    s.as_ptr()
}

/// Copies this thread's message about its last failed call (a path, a shape, a reason)
/// into `buf` as a NUL-terminated UTF-8 string; `""` when nothing failed yet. Successful
/// calls leave it unchanged, so read it right after a call returned non-zero.
///
/// `*needed` (if not NULL) receives the size with the NUL. When `buf` is NULL or `len`
/// is smaller, returns `SDTI_ERR_BUFFER_TOO_SMALL` and writes as much as fits, still
/// NUL-terminated (when `len > 0`). This call never changes the last error.
///
/// # Safety
/// `buf` is NULL or points to `len` writable bytes; `needed` is NULL or writable.
///
/// `[thread-safe]` (each thread has its own last error)
#[no_mangle]
pub unsafe extern "C" fn sdti_last_error(
    buf: *mut c_char,
    len: usize,
    needed: *mut usize,
) -> sdti_status {
    let message = boundary::last_error();
    // SAFETY: the caller's contract above.
    unsafe { write_bytes_with_nul(message.as_bytes(), buf, len, needed) }
}
