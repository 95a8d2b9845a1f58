//! `sdti_encoder_*`: prompts to conditioning hidden states with learned words injected,
//! for hosts.

use std::ffi::c_char;
use std::sync::{Arc, LazyLock};

use super::boundary::*;
use super::trainer::{load_options, sdti_trainer, TRAINERS};
use super::*;
use crate::model::TextEncoder;
use crate::prompt::chunks::ChunkStyle;
use crate::prompt::encoder::PromptEncoder;

/// An opaque prompt encoder on one model. Create with `sdti_encoder_new` or
/// `sdti_encoder_new_from_trainer`, release with `sdti_encoder_free`.
pub struct sdti_encoder {
    _opaque: [u8; 0],
}

/// Long prompts chunked as AUTOMATIC1111 does (the default).
pub const SDTI_CHUNKS_A1111: u32 = 0;
/// Long prompts chunked as ComfyUI does.
pub const SDTI_CHUNKS_COMFYUI: u32 = 1;

/// Which model to load. Fill with `sdti_model_params_init`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct sdti_model_params {
    /// `sizeof(sdti_model_params)`, set by `sdti_model_params_init`.
    pub struct_size: u32,
    /// `SDTI_PRECISION_AUTO` (default: bf16 on CUDA, f32 elsewhere), `_F32`, `_F16` or
    /// `_BF16`: the UNet's and VAE's dtype (prompts are always encoded in f32).
    pub precision: sdti_precision,
    /// Required: a diffusers folder or a single-file `.safetensors` SD 1.x checkpoint.
    pub model_path: *const c_char,
    /// `"cpu"` (NULL), `"cuda"`, `"cuda:N"`, `"metal"`.
    pub device: *const c_char,
}

const MODEL_PARAMS_V1: usize = std::mem::size_of::<sdti_model_params>();

impl Default for sdti_model_params {
    fn default() -> Self {
        Self {
            struct_size: MODEL_PARAMS_V1 as u32,
            precision: SDTI_PRECISION_AUTO,
            model_path: std::ptr::null(),
            device: std::ptr::null(),
        }
    }
}

pub(crate) static ENCODERS: LazyLock<Registry<PromptEncoder>> =
    LazyLock::new(|| Registry::new("encoder"));

fn insert(encoder: PromptEncoder, out: *mut *mut sdti_encoder) {
    let key = ENCODERS.insert(Handle::new(encoder, Default::default()));
    // SAFETY: the callers checked `out` for NULL; writable by their contract.
    unsafe { out.write(key as *mut sdti_encoder) };
}

/// Fills `params` with the defaults and its `struct_size`.
///
/// # Safety
/// `params` is NULL or a writable `sdti_model_params`.
///
/// `[thread-safe]`
#[no_mangle]
pub unsafe extern "C" fn sdti_model_params_init(params: *mut sdti_model_params) -> sdti_status {
    call(|| {
        if params.is_null() {
            return Err(invalid("params is NULL"));
        }
        // SAFETY: non-NULL and writable by contract.
        unsafe { params.write(sdti_model_params::default()) };
        Ok(())
    })
}

/// Loads a model's text encoder for prompt encoding (only the text encoder: the UNet and
/// VAE weights are not read); `*out` receives the handle. For SDXL both text encoders
/// are loaded and the encoded states are `[L || G]` side by side (`sdti_encoder_dim` is
/// their width, 768 + 1280); its words are registered from files.
///
/// Statuses: as `sdti_trainer_new` (`SDTI_ERR_MODEL`, `SDTI_ERR_DEVICE`,
/// `SDTI_ERR_STRUCT_SIZE`, ...).
///
/// # Safety
/// `params` points to `params->struct_size` readable bytes, its strings NULL or
/// NUL-terminated; `out` is writable.
///
/// `[thread-safe]`
#[no_mangle]
pub unsafe extern "C" fn sdti_encoder_new(
    params: *const sdti_model_params,
    out: *mut *mut sdti_encoder,
) -> sdti_status {
    call(|| {
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        // SAFETY: the caller's contract.
        let p = unsafe {
            read_versioned(
                params,
                sdti_model_params::default(),
                MODEL_PARAMS_V1,
                "params",
            )
        }?;
        // SAFETY: NULL or NUL-terminated by contract.
        let (path, device) = unsafe {
            (
                cpath(p.model_path, "params.model_path")?,
                opt_cstr(p.device, "params.device")?,
            )
        };
        let opts = load_options(device, p.precision)?;
        let (first, second) = TextEncoder::load_all(&path, &opts)?;
        insert(
            PromptEncoder::with_encoders(Arc::new(first), second.map(Arc::new))?,
            out,
        );
        Ok(())
    })
}

/// Registers the trainer's current word (its token and vectors) in `encoder`.
fn register_trainer_word(encoder: &mut PromptEncoder, trainer: *mut sdti_trainer) -> FfiResult {
    let handle = TRAINERS.get(trainer as usize)?;
    let guard = lock_state(&handle, "trainer", false)?;
    let Some(state) = guard.as_ref() else {
        return Err(fail(SDTI_ERR_INVALID_HANDLE, "the trainer was freed"));
    };
    let dim = state.trainer.model().config.text_encoder.hidden_size;
    if dim != encoder.dim() {
        return Err(invalid(format!(
            "the trainer's model is {dim} wide, this encoder's {}",
            encoder.dim()
        )));
    }
    let vectors = state.trainer.vectors()?;
    encoder.register(&state.trainer.config().token, &vectors)?;
    Ok(())
}

/// A prompt encoder on the trainer's text encoder (shared, not loaded again), with the trainer's
/// current word registered under its token. Call `sdti_encoder_register_trainer` to
/// refresh the word after more steps. The encoder outlives the trainer if freed later.
///
/// # Safety
/// `out` is writable.
///
/// `[one thread at a time per handle]` (for the trainer)
#[no_mangle]
pub unsafe extern "C" fn sdti_encoder_new_from_trainer(
    trainer: *mut sdti_trainer,
    out: *mut *mut sdti_encoder,
) -> sdti_status {
    call(|| {
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        let (first, second) = {
            let handle = TRAINERS.get(trainer as usize)?;
            let guard = lock_state(&handle, "trainer", false)?;
            match guard.as_ref() {
                Some(state) => {
                    let model = state.trainer.model();
                    (
                        Arc::clone(&model.text_encoder),
                        model.text_encoder_2.clone(),
                    )
                }
                None => return Err(fail(SDTI_ERR_INVALID_HANDLE, "the trainer was freed")),
            }
        };
        let mut encoder = PromptEncoder::with_encoders(first, second)?;
        register_trainer_word(&mut encoder, trainer)?;
        insert(encoder, out);
        Ok(())
    })
}

/// (Re)registers the trainer's current word (its token and vectors) in `encoder`: the
/// word is usable in the next encode. The models must have the same width.
///
/// Statuses: `SDTI_ERR_BUSY` while the trainer is stepping on another thread.
///
/// `[one thread at a time per handle]` (both handles)
#[no_mangle]
pub extern "C" fn sdti_encoder_register_trainer(
    encoder: *mut sdti_encoder,
    trainer: *mut sdti_trainer,
) -> sdti_status {
    with_state(&ENCODERS, encoder as usize, |enc| {
        register_trainer_word(enc, trainer)
    })
}

/// Registers the word of an embedding file in any format sdti reads (A1111 `.pt`/PNG,
/// safetensors layouts, diffusers `.bin`, kohya, OneTrainer) as `token`, or, when `token`
/// is NULL, as the file's stem (what A1111 calls it). A registered word replaces one of
/// the same name. Prompts use it as `word` (A1111), `embedding:word` (ComfyUI) or
/// `<word>` (diffusers).
///
/// Statuses: `SDTI_ERR_EMBEDDING` (unreadable, or not this model's width),
/// `SDTI_ERR_IO`, `SDTI_ERR_INVALID_ARGUMENT` (a token with spaces).
///
/// # Safety
/// `token` is NULL or NUL-terminated; `path` is NUL-terminated.
///
/// `[one thread at a time per handle]`
#[no_mangle]
pub unsafe extern "C" fn sdti_encoder_register_token(
    encoder: *mut sdti_encoder,
    token: *const c_char,
    path: *const c_char,
) -> sdti_status {
    with_state(&ENCODERS, encoder as usize, |enc| {
        // SAFETY: the caller's contract.
        let (token, path) = unsafe { (opt_cstr(token, "token")?, cpath(path, "path")?) };
        enc.register_file(token, &path).map_err(|e| {
            let mut f = Failure::from(e);
            if f.status == SDTI_ERR_INVALID_ARGUMENT && !f.message.contains("token") {
                // A width that does not fit the model is a file problem.
                f.status = SDTI_ERR_EMBEDDING;
            }
            f
        })?;
        Ok(())
    })
}

/// Registers `token` with `n` vectors of width `dim` (`[n, dim]` f32 row-major, copied).
/// `dim` must be the model's width (`sdti_encoder_dim`); `n` in 1..=75; values finite.
///
/// # Safety
/// `token` is NUL-terminated; `vectors` points to `n * dim` readable floats.
///
/// `[one thread at a time per handle]`
#[no_mangle]
pub unsafe extern "C" fn sdti_encoder_register_vectors(
    encoder: *mut sdti_encoder,
    token: *const c_char,
    vectors: *const f32,
    n: usize,
    dim: usize,
) -> sdti_status {
    with_state(&ENCODERS, encoder as usize, |enc| {
        // SAFETY: NUL-terminated by contract.
        let token = unsafe { cstr(token, "token") }?;
        if vectors.is_null() {
            return Err(invalid("vectors is NULL"));
        }
        if dim != enc.dim() {
            return Err(invalid(format!(
                "dim {dim} is not this model's width {}",
                enc.dim()
            )));
        }
        if n == 0 || n > crate::embedding::MAX_VECTORS {
            return Err(invalid(format!("n {n} is outside 1..=75")));
        }
        // SAFETY: `n * dim` readable floats by contract (n <= 75, dim the model's width).
        let data = unsafe { std::slice::from_raw_parts(vectors, n * dim) }.to_vec();
        enc.register(token, &data)?;
        Ok(())
    })
}

/// The text encoder's width (768 for SD 1.x), into `*dim`.
///
/// # Safety
/// `dim` is writable.
///
/// `[one thread at a time per handle]`
#[no_mangle]
pub unsafe extern "C" fn sdti_encoder_dim(
    encoder: *mut sdti_encoder,
    dim: *mut u32,
) -> sdti_status {
    with_state(&ENCODERS, encoder as usize, |enc| {
        if dim.is_null() {
            return Err(invalid("dim is NULL"));
        }
        // SAFETY: writable by contract.
        unsafe { dim.write(enc.dim() as u32) };
        Ok(())
    })
}

/// Chunks long prompts as A1111 (`SDTI_CHUNKS_A1111`, the default) or ComfyUI
/// (`SDTI_CHUNKS_COMFYUI`) do.
///
/// `[one thread at a time per handle]`
#[no_mangle]
pub extern "C" fn sdti_encoder_set_chunk_style(
    encoder: *mut sdti_encoder,
    style: u32,
) -> sdti_status {
    with_state(&ENCODERS, encoder as usize, |enc| {
        enc.set_chunk_style(match style {
            SDTI_CHUNKS_A1111 => ChunkStyle::A1111,
            SDTI_CHUNKS_COMFYUI => ChunkStyle::ComfyUi,
            other => {
                return Err(invalid(format!(
                    "chunk style {other} is not SDTI_CHUNKS_A1111 (0) or SDTI_CHUNKS_COMFYUI (1)"
                )))
            }
        });
        Ok(())
    })
}

/// Takes the hidden states of the `clip_skip`-th layer from the end of the full-depth
/// text encoder (1 = last; 2 = the penultimate layer, as many SD 1.x fine-tunes use).
/// Never set, it is the model family's: 1 for SD 1.x, 2 for SD 2.x (OpenCLIP ViT-H's
/// penultimate block, the last layer an SD 2.x diffusers folder holds, so 1 is refused
/// there) and for SDXL. 0 is refused.
///
/// `[one thread at a time per handle]`
#[no_mangle]
pub extern "C" fn sdti_encoder_set_clip_skip(
    encoder: *mut sdti_encoder,
    clip_skip: u32,
) -> sdti_status {
    with_state(&ENCODERS, encoder as usize, |enc| {
        enc.set_clip_skip(clip_skip as usize)?;
        Ok(())
    })
}

/// Tokenizes `prompt` as the encoder would, into 77-slot chunks (BOS, 75 slots, EOS,
/// padded): for slot `i`, `ids[i]` is the vocabulary id (the end-of-text id 49407 as a
/// stand-in on learned slots), `words[i]` the registered word's index in registration
/// order or -1, and `vector_index[i]` which of its vectors, or -1. Any of the three
/// arrays may be NULL. `*needed` (optional) gets the slot count; with `cap` smaller the
/// call returns `SDTI_ERR_BUFFER_TOO_SMALL` and writes no slot.
///
/// # Safety
/// `prompt` is NUL-terminated; each array NULL or `cap` writable elements; `needed` NULL
/// or writable.
///
/// `[one thread at a time per handle]`
#[no_mangle]
pub unsafe extern "C" fn sdti_encoder_tokenize(
    encoder: *mut sdti_encoder,
    prompt: *const c_char,
    ids: *mut u32,
    words: *mut i32,
    vector_index: *mut i32,
    cap: usize,
    needed: *mut usize,
) -> sdti_status {
    with_state(&ENCODERS, encoder as usize, |enc| {
        // SAFETY: NUL-terminated by contract.
        let prompt = unsafe { cstr(prompt, "prompt") }?;
        let slots = enc.tokenize(prompt);
        if !needed.is_null() {
            // SAFETY: writable by contract.
            unsafe { needed.write(slots.len()) };
        }
        if slots.len() > cap {
            return Err(fail(
                SDTI_ERR_BUFFER_TOO_SMALL,
                format!("{} slots needed, the buffers hold {cap}", slots.len()),
            ));
        }
        for (i, s) in slots.iter().enumerate() {
            let (w, v) = s.learned.map_or((-1, -1), |(w, v)| (w as i32, v as i32));
            // SAFETY: each non-NULL array has `cap > i` writable elements.
            unsafe {
                if !ids.is_null() {
                    ids.add(i).write(s.id);
                }
                if !words.is_null() {
                    words.add(i).write(w);
                }
                if !vector_index.is_null() {
                    vector_index.add(i).write(v);
                }
            }
        }
        Ok(())
    })
}

/// Encodes `prompt` into the conditioning hidden states a UNet takes: `[chunks * 77,
/// dim]` f32 row-major into `out` (`cap` floats), with registered words injected in any
/// of the three spellings. `*needed_floats` and `*rows` (each optional) get the size;
/// with `out` NULL or `cap` too small the call returns `SDTI_ERR_BUFFER_TOO_SMALL` after
/// writing them, without running the model (a cheap size query).
///
/// # Safety
/// `prompt` is NUL-terminated; `out` NULL or `cap` writable floats; `needed_floats`,
/// `rows` NULL or writable.
///
/// `[one thread at a time per handle]`
#[no_mangle]
pub unsafe extern "C" fn sdti_encoder_encode(
    encoder: *mut sdti_encoder,
    prompt: *const c_char,
    out: *mut f32,
    cap: usize,
    needed_floats: *mut usize,
    rows: *mut u32,
) -> sdti_status {
    with_state(&ENCODERS, encoder as usize, |enc| {
        // SAFETY: NUL-terminated by contract.
        let prompt = unsafe { cstr(prompt, "prompt") }?;
        let n_rows = enc.tokenize(prompt).len();
        let want = n_rows * enc.dim();
        // SAFETY: writable by contract.
        unsafe {
            if !needed_floats.is_null() {
                needed_floats.write(want);
            }
            if !rows.is_null() {
                rows.write(n_rows as u32);
            }
        }
        if out.is_null() || cap < want {
            return Err(fail(
                SDTI_ERR_BUFFER_TOO_SMALL,
                format!("{want} floats ({n_rows} rows) needed, the buffer holds {cap}"),
            ));
        }
        let states = enc.encode(prompt)?;
        let data: Vec<f32> = states.flatten_all().and_then(|t| t.to_vec1())?;
        if data.len() != want {
            return Err(fail(
                SDTI_ERR_COMPUTE,
                format!(
                    "the encoder gave {} floats, {want} were expected",
                    data.len()
                ),
            ));
        }
        // SAFETY: `out` has `cap >= want` writable floats.
        unsafe { write_slice(&data, out, cap, std::ptr::null_mut(), "hidden states") }
    })
}

/// Releases the encoder. `NULL`, and a handle freed already, are no-ops.
///
/// `[one thread at a time per handle]`
#[no_mangle]
pub extern "C" fn sdti_encoder_free(encoder: *mut sdti_encoder) {
    free_handle(&ENCODERS, encoder as usize);
}
