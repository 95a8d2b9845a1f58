//! The panic boundary, the thread-local last error, C string and buffer helpers, and the
//! registry of live handles.
//!
//! Handles are `Arc`s kept in a registry keyed by the address given to the host: a call
//! looks its handle up (so a freed or foreign pointer is an error, not a crash) and holds
//! a clone while it runs, so a `_free` on another thread never pulls memory from under a
//! running call.

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use super::*;
use crate::embedding::EmbeddingError;
use crate::Error;

/// A failed call: its status and the message for `sdti_last_error`.
#[derive(Debug)]
pub(crate) struct Failure {
    pub status: sdti_status,
    pub message: String,
}

pub(crate) type FfiResult<T = ()> = Result<T, Failure>;

pub(crate) fn fail(status: sdti_status, message: impl Into<String>) -> Failure {
    Failure {
        status,
        message: message.into(),
    }
}

pub(crate) fn invalid(message: impl Into<String>) -> Failure {
    fail(SDTI_ERR_INVALID_ARGUMENT, message)
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        // Exhaustive: a new kind of error must be given its status here.
        let status = match &e {
            Error::Candle(_) => SDTI_ERR_COMPUTE,
            Error::Io { .. } => SDTI_ERR_IO,
            Error::Model { .. } | Error::Weight { .. } | Error::Scheduler(_) => SDTI_ERR_MODEL,
            Error::Tokenizer(_) => SDTI_ERR_MODEL,
            Error::Config { .. } | Error::LrSchedule(_) | Error::Templates(_) => {
                SDTI_ERR_INVALID_ARGUMENT
            }
            Error::Device(_) => SDTI_ERR_DEVICE,
            Error::Data(_) => SDTI_ERR_IMAGE,
            Error::Input { .. } => SDTI_ERR_INVALID_ARGUMENT,
            Error::Checkpoint { .. } | Error::Rng(_) => SDTI_ERR_CHECKPOINT,
            Error::Embedding(inner) => embedding_status(inner),
            Error::Memory(_) => SDTI_ERR_MEMORY,
            Error::Cancelled => SDTI_CANCELLED,
        };
        fail(status, e.to_string())
    }
}

pub(crate) fn embedding_status(e: &EmbeddingError) -> sdti_status {
    match e {
        EmbeddingError::Io { .. } => SDTI_ERR_IO,
        EmbeddingError::Exists { .. } => SDTI_ERR_EXISTS,
        EmbeddingError::UnknownFormatName { .. } => SDTI_ERR_INVALID_ARGUMENT,
        EmbeddingError::Unsupported { .. } => SDTI_ERR_UNSUPPORTED,
        _ => SDTI_ERR_EMBEDDING,
    }
}

impl From<candle_core::Error> for Failure {
    fn from(e: candle_core::Error) -> Self {
        fail(SDTI_ERR_COMPUTE, format!("tensor operation failed: {e}"))
    }
}

impl From<EmbeddingError> for Failure {
    fn from(e: EmbeddingError) -> Self {
        fail(embedding_status(&e), e.to_string())
    }
}

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

pub(crate) fn set_last_error(message: String) {
    LAST_ERROR.with(|m| *m.borrow_mut() = message);
}

pub(crate) fn last_error() -> String {
    LAST_ERROR.with(|m| m.borrow().clone())
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string());
    format!("sdti panicked (a bug; please report it): {what}")
}

/// The one panic boundary: runs an export's body, turns its failure or panic into a
/// status and the thread's last error.
pub(crate) fn call(body: impl FnOnce() -> FfiResult) -> sdti_status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => SDTI_OK,
        Ok(Err(f)) => {
            set_last_error(f.message);
            f.status
        }
        Err(payload) => {
            set_last_error(panic_message(payload.as_ref()));
            SDTI_ERR_PANIC
        }
    }
}

/// The boundary for exports that return no status (`_free`, `_cancel`): a panic is
/// recorded in the last error and otherwise swallowed.
pub(crate) fn call_void(body: impl FnOnce()) {
    if let Err(payload) = catch_unwind(AssertUnwindSafe(body)) {
        set_last_error(panic_message(payload.as_ref()));
    }
}

/// A NUL-terminated UTF-8 argument.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string that outlives `'a`.
pub(crate) unsafe fn cstr<'a>(p: *const c_char, what: &str) -> FfiResult<&'a str> {
    if p.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str().map_err(|e| {
        fail(
            SDTI_ERR_INVALID_UTF8,
            format!("{what} is not valid UTF-8 (byte {})", e.valid_up_to()),
        )
    })
}

/// An optional string: NULL (or `""`) is `None`.
///
/// # Safety
/// As [`cstr`].
pub(crate) unsafe fn opt_cstr<'a>(p: *const c_char, what: &str) -> FfiResult<Option<&'a str>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: forwarded contract.
    let s = unsafe { cstr(p, what) }?;
    Ok(if s.is_empty() { None } else { Some(s) })
}

/// A path argument: any bytes on Unix, UTF-8 elsewhere.
///
/// # Safety
/// As [`cstr`].
pub(crate) unsafe fn cpath(p: *const c_char, what: &str) -> FfiResult<PathBuf> {
    if p.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    if bytes.is_empty() {
        return Err(invalid(format!("{what} is empty")));
    }
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(PathBuf::from(std::ffi::OsStr::from_bytes(bytes)))
    }
    #[cfg(not(unix))]
    {
        // SAFETY: forwarded contract.
        Ok(PathBuf::from(unsafe { cstr(p, what) }?))
    }
}

/// An optional path: NULL or `""` is `None`.
///
/// # Safety
/// As [`cstr`].
pub(crate) unsafe fn opt_cpath(p: *const c_char, what: &str) -> FfiResult<Option<PathBuf>> {
    // SAFETY: forwarded contract.
    if p.is_null() || unsafe { *p } == 0 {
        return Ok(None);
    }
    // SAFETY: forwarded contract.
    unsafe { cpath(p, what) }.map(Some)
}

/// Copies `bytes` and a NUL into a caller buffer of `len` bytes, reporting the size with
/// the NUL in `needed`; truncates (still NUL-terminated) and says so when it does not fit.
///
/// # Safety
/// `buf` is NULL or `len` writable bytes; `needed` is NULL or writable.
pub(crate) unsafe fn write_bytes_with_nul(
    bytes: &[u8],
    buf: *mut c_char,
    len: usize,
    needed: *mut usize,
) -> sdti_status {
    let want = bytes.len() + 1;
    if !needed.is_null() {
        // SAFETY: writable by contract.
        unsafe { needed.write(want) };
    }
    if buf.is_null() || len == 0 {
        return SDTI_ERR_BUFFER_TOO_SMALL;
    }
    let n = bytes.len().min(len - 1);
    // SAFETY: `buf` has `len > n` writable bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), n);
        buf.add(n).write(0);
    }
    if want > len {
        SDTI_ERR_BUFFER_TOO_SMALL
    } else {
        SDTI_OK
    }
}

/// Writes one value through a caller's out-pointer, refusing NULL (`what` names the
/// argument).
///
/// # Safety
/// `out` is NULL or writable.
pub(crate) unsafe fn write_out<T>(out: *mut T, value: T, what: &str) -> FfiResult {
    if out.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: writable by contract.
    unsafe { out.write(value) };
    Ok(())
}

/// Copies `data` into a caller array of `cap` elements; `needed` gets `data.len()`.
/// Writes nothing but `needed` when it does not fit.
///
/// # Safety
/// `out` is NULL or `cap` writable elements; `needed` is NULL or writable.
pub(crate) unsafe fn write_slice<T: Copy>(
    data: &[T],
    out: *mut T,
    cap: usize,
    needed: *mut usize,
    what: &str,
) -> FfiResult {
    if !needed.is_null() {
        // SAFETY: writable by contract.
        unsafe { needed.write(data.len()) };
    }
    if data.len() > cap || (out.is_null() && !data.is_empty()) {
        return Err(fail(
            SDTI_ERR_BUFFER_TOO_SMALL,
            format!(
                "{what}: {} elements needed, the buffer holds {cap}",
                data.len()
            ),
        ));
    }
    if !data.is_empty() {
        // SAFETY: `out` has `cap >= data.len()` writable elements.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), out, data.len()) };
    }
    Ok(())
}

/// Reads a caller's `struct_size`-versioned struct: `min(struct_size, sizeof)` bytes over
/// `defaults`. `first_size` is the size of the struct's first revision.
///
/// # Safety
/// `p` is NULL or points to at least `struct_size` readable bytes whose first 4 are the
/// `uint32_t struct_size`; `T` is a `repr(C)` struct of integers, raw pointers and
/// optional function pointers, laid out without implicit padding.
pub(crate) unsafe fn read_versioned<T: Copy>(
    p: *const T,
    defaults: T,
    first_size: usize,
    what: &str,
) -> FfiResult<T> {
    if p.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: the struct starts with its `uint32_t struct_size`.
    let size = unsafe { p.cast::<u32>().read_unaligned() } as usize;
    if size < first_size {
        return Err(fail(
            SDTI_ERR_STRUCT_SIZE,
            format!(
                "{what}.struct_size is {size}; at least {first_size} (the first revision) is needed: fill it with its _init function"
            ),
        ));
    }
    let mut out = defaults;
    let n = size.min(std::mem::size_of::<T>());
    // SAFETY: the caller has `size >= n` readable bytes; every bit pattern is valid for
    // T's fields (integers, raw pointers, Option<fn>), and `n` ends on a field boundary
    // because the structs have no implicit padding.
    unsafe { std::ptr::copy_nonoverlapping(p.cast::<u8>(), (&mut out as *mut T).cast::<u8>(), n) };
    Ok(out)
}

/// Writes a library struct into a caller's `struct_size`-versioned out-struct: the first
/// `min(struct_size, sizeof)` bytes, keeping the caller's `struct_size`.
///
/// # Safety
/// `p` is writable for its `struct_size` bytes, which start with the `uint32_t struct_size`.
pub(crate) unsafe fn write_versioned<T: Copy>(
    p: *mut T,
    value: &T,
    first_size: usize,
    what: &str,
) -> FfiResult {
    // SAFETY: the struct starts with its `uint32_t struct_size`.
    let size = unsafe { p.cast::<u32>().read_unaligned() } as usize;
    if size < first_size {
        return Err(fail(
            SDTI_ERR_STRUCT_SIZE,
            format!("{what}.struct_size is {size}; at least {first_size} is needed"),
        ));
    }
    let n = size.min(std::mem::size_of::<T>());
    // SAFETY: writable for `size >= n` bytes; bytes 0..4 are overwritten with the same
    // leading field layout, then restored to the caller's size.
    unsafe {
        std::ptr::copy_nonoverlapping((value as *const T).cast::<u8>(), p.cast::<u8>(), n);
        p.cast::<u32>().write_unaligned(size as u32);
    }
    Ok(())
}

/// One live handle: its state behind a lock, a poison flag, and a cancel flag.
pub(crate) struct Handle<S> {
    pub state: Mutex<Option<S>>,
    pub poisoned: AtomicBool,
    /// Set by `_cancel` and by `_free`; read by running calls.
    pub cancel: Arc<AtomicBool>,
}

impl<S> Handle<S> {
    pub fn new(state: S, cancel: Arc<AtomicBool>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(Some(state)),
            poisoned: AtomicBool::new(false),
            cancel,
        })
    }
}

/// Live handles of one kind, keyed by the address the host holds.
pub(crate) struct Registry<S> {
    kind: &'static str,
    live: Mutex<HashMap<usize, Arc<Handle<S>>>>,
}

impl<S> Registry<S> {
    pub fn new(kind: &'static str) -> Self {
        Self {
            kind,
            live: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> MutexGuard<'_, HashMap<usize, Arc<Handle<S>>>> {
        // The map is only inserted into and removed from; a poisoned lock still holds a
        // consistent map.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a handle and returns the address the host gets.
    pub fn insert(&self, handle: Arc<Handle<S>>) -> usize {
        let key = Arc::as_ptr(&handle) as usize;
        self.map().insert(key, handle);
        key
    }

    pub fn get(&self, key: usize) -> FfiResult<Arc<Handle<S>>> {
        if key == 0 {
            return Err(fail(
                SDTI_ERR_INVALID_HANDLE,
                format!("the {} handle is NULL", self.kind),
            ));
        }
        self.map().get(&key).cloned().ok_or_else(|| {
            fail(
                SDTI_ERR_INVALID_HANDLE,
                format!(
                    "{key:#x} is not a live {} handle (freed already, or not from this library)",
                    self.kind
                ),
            )
        })
    }

    pub fn remove(&self, key: usize) -> Option<Arc<Handle<S>>> {
        self.map().remove(&key)
    }

    pub fn kind(&self) -> &'static str {
        self.kind
    }
}

/// Locks a handle's state for one call: `SDTI_ERR_BUSY` while another thread holds it.
pub(crate) fn lock_state<'h, S>(
    handle: &'h Handle<S>,
    kind: &str,
    wait: bool,
) -> FfiResult<MutexGuard<'h, Option<S>>> {
    if handle.poisoned.load(Ordering::SeqCst) {
        return Err(poisoned(kind));
    }
    let guard = if wait {
        handle.state.lock().map_err(|_| poisoned(kind))?
    } else {
        match handle.state.try_lock() {
            Ok(g) => g,
            Err(TryLockError::WouldBlock) => {
                return Err(fail(
                    SDTI_ERR_BUSY,
                    format!("the {kind} is in use by a call on another thread (or by the call whose progress callback this is)"),
                ))
            }
            Err(TryLockError::Poisoned(_)) => return Err(poisoned(kind)),
        }
    };
    if guard.is_none() {
        return Err(fail(
            SDTI_ERR_INVALID_HANDLE,
            format!("the {kind} was freed"),
        ));
    }
    Ok(guard)
}

pub(crate) fn poisoned(kind: &str) -> Failure {
    fail(
        SDTI_ERR_POISONED,
        format!("the {kind} is poisoned: an earlier call on it panicked; free it"),
    )
}

/// Runs `body` on a panic boundary that poisons `handle` when it panics.
pub(crate) fn poison_on_panic<S, T>(
    handle: &Handle<S>,
    body: impl FnOnce() -> FfiResult<T>,
) -> FfiResult<T> {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(r) => r,
        Err(payload) => {
            handle.poisoned.store(true, Ordering::SeqCst);
            Err(fail(SDTI_ERR_PANIC, panic_message(payload.as_ref())))
        }
    }
}

/// The usual handle call: look up, lock (busy if held), run on a poisoning boundary.
pub(crate) fn with_state<S>(
    registry: &Registry<S>,
    key: usize,
    body: impl FnOnce(&mut S) -> FfiResult,
) -> sdti_status {
    call(|| {
        let handle = registry.get(key)?;
        let mut guard = lock_state(&handle, registry.kind(), false)?;
        match guard.as_mut() {
            Some(state) => poison_on_panic(&handle, || body(state)),
            None => Err(fail(SDTI_ERR_INVALID_HANDLE, "the handle was freed")),
        }
    })
}

/// `_free`: unregisters, asks a running call to stop, waits for it, drops the state.
/// NULL and handles that are not live are no-ops.
pub(crate) fn free_handle<S>(registry: &Registry<S>, key: usize) {
    call_void(|| {
        if key == 0 {
            return;
        }
        let Some(handle) = registry.remove(key) else {
            return;
        };
        handle.cancel.store(true, Ordering::SeqCst);
        let state = {
            let mut guard = handle.state.lock().unwrap_or_else(|p| p.into_inner());
            guard.take()
        };
        drop(state);
    });
}
