//! `sdti_encoder_*`: prompts to conditioning hidden states with learned words injected,
//! for hosts.

use std::ffi::c_char;
use std::sync::{Arc, LazyLock};

use super::boundary::*;
use super::trainer::{load_options, sdti_trainer, TRAINERS};
use super::*;
use crate::embedding::{Encoder, Family};
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
    /// Required: a diffusers folder or a single-file `.safetensors` checkpoint of SD 1.x,
    /// SD 2.x or SDXL (base and its fine-tunes).
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
/// VAE weights are not read); `*out` receives the handle. SD 1.x and 2.x have one text
/// encoder; for SDXL both are loaded, the encoded context is `[L || G]` side by side
/// (`sdti_encoder_dim` is their width, 768 + 1280) and `sdti_encoder_encode_pooled` also
/// gives the pooled vector. `sdti_encoder_family` tells which the model is.
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

/// Registers the trainer's current word (its token and vectors) in `encoder`: one part
/// per text encoder (SDXL: `clip_l`, `clip_g`), each at the encoder's width.
fn register_trainer_word(encoder: &mut PromptEncoder, trainer: *mut sdti_trainer) -> FfiResult {
    let handle = TRAINERS.get(trainer as usize)?;
    let guard = lock_state(&handle, "trainer", false)?;
    let Some(state) = guard.as_ref() else {
        return Err(fail(SDTI_ERR_INVALID_HANDLE, "the trainer was freed"));
    };
    let emb = state.trainer.embedding()?;
    let trainer_family = state.trainer.model().config.family;
    let widths = encoder.part_widths();
    let kinds: Vec<Encoder> = encoder
        .text_encoders()
        .iter()
        .map(|e| e.encoder())
        .collect();
    let mut parts = Vec::with_capacity(kinds.len());
    for (kind, &width) in kinds.iter().zip(&widths) {
        let part = match (kind, emb.parts.as_slice()) {
            (Encoder::Single, [single]) => Some(single),
            (Encoder::Single, _) => None,
            (_, all) => all.iter().find(|p| p.encoder == *kind),
        };
        match part {
            Some(p) if p.dim == width => parts.push(p.data.as_slice()),
            _ => {
                return Err(invalid(format!(
                    "the trainer's model ({}, word widths {:?}) does not fit this encoder's ({}, widths {widths:?})",
                    trainer_family.model_name(),
                    emb.parts.iter().map(|p| p.dim).collect::<Vec<_>>(),
                    encoder.family().model_name(),
                )))
            }
        }
    }
    encoder.register_parts(&state.trainer.config().token, &parts)?;
    Ok(())
}

/// A prompt encoder on the trainer's text encoder(s) (shared, not loaded again) at the
/// run's clip skip, with the trainer's current word registered under its token (SDXL: both
/// tables): it encodes prompts as training conditions on them. Call `sdti_encoder_register_trainer` to
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
        let (first, second, clip_skip) = {
            let handle = TRAINERS.get(trainer as usize)?;
            let guard = lock_state(&handle, "trainer", false)?;
            match guard.as_ref() {
                Some(state) => {
                    let model = state.trainer.model();
                    (
                        Arc::clone(&model.text_encoder),
                        model.text_encoder_2.clone(),
                        state.trainer.clip_skip(),
                    )
                }
                None => return Err(fail(SDTI_ERR_INVALID_HANDLE, "the trainer was freed")),
            }
        };
        let mut encoder = PromptEncoder::with_encoders(first, second)?;
        // Encoded as the run conditions (its clip skip, the family's unless the run's
        // options or checkpoint say otherwise).
        if clip_skip != encoder.clip_skip() {
            encoder.set_clip_skip(clip_skip)?;
        }
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
/// safetensors layouts, diffusers `.bin`, kohya, OneTrainer; for SDXL the `{clip_l,
/// clip_g}` files, and diffusers' pair as `"FIRST+SECOND"` or their folder) as `token`,
/// or, when `token` is NULL, as the file's stem (what A1111 calls it). An SDXL model
/// refuses one-part files and SD 1.x/2.x models refuse SDXL files, saying so. A registered word replaces one of
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
/// SDXL words have a part per text encoder: `sdti_encoder_register_vectors_sdxl` (here
/// SDXL gets `SDTI_ERR_INVALID_ARGUMENT`).
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
        if enc.family() == Family::Sdxl {
            return Err(invalid(format!(
                "an SDXL word has a part per text encoder (widths {:?}): use sdti_encoder_register_vectors_sdxl",
                enc.part_widths()
            )));
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

/// The context's width into `*dim`: the text encoder's (768 for SD 1.x, 1024 for SD 2.x),
/// or SDXL's two side by side (768 + 1280 = 2048).
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
        // SAFETY: NULL or writable by contract.
        unsafe { write_out(dim, enc.dim() as u32, "dim") }
    })
}

/// The model family of the encoder's model (`SDTI_FAMILY_SD1`, `_SD2` or `_SDXL`), into
/// `*family`. Since ABI 1.4.
///
/// # Safety
/// `family` is writable.
///
/// `[one thread at a time per handle]`
#[no_mangle]
pub unsafe extern "C" fn sdti_encoder_family(
    encoder: *mut sdti_encoder,
    family: *mut sdti_family,
) -> sdti_status {
    with_state(&ENCODERS, encoder as usize, |enc| {
        // SAFETY: NULL or writable by contract.
        unsafe { write_out(family, family_code(enc.family()), "family") }
    })
}

/// The pooled vector's width into `*dim`: 1280 for SDXL (OpenCLIP bigG's projection), 0
/// for models without one (SD 1.x, SD 2.x). Since ABI 1.4.
///
/// # Safety
/// `dim` is writable.
///
/// `[one thread at a time per handle]`
#[no_mangle]
pub unsafe extern "C" fn sdti_encoder_pooled_dim(
    encoder: *mut sdti_encoder,
    dim: *mut u32,
) -> sdti_status {
    with_state(&ENCODERS, encoder as usize, |enc| {
        // SAFETY: NULL or writable by contract.
        unsafe { write_out(dim, enc.pooled_dim().unwrap_or(0) as u32, "dim") }
    })
}

/// The width of each text encoder's word vectors, in conditioning order, into `dims`
/// (`cap` elements): `[768]` for SD 1.x, `[1024]` for SD 2.x, `[768, 1280]` for SDXL
/// (`clip_l`, `clip_g`; their sum is `sdti_encoder_dim`). `*count` (optional) gets the
/// number of parts; with `dims` NULL or `cap` smaller the call returns
/// `SDTI_ERR_BUFFER_TOO_SMALL` and writes no width. Since ABI 1.4.
///
/// # Safety
/// `dims` is NULL or `cap` writable elements; `count` NULL or writable.
///
/// `[one thread at a time per handle]`
#[no_mangle]
pub unsafe extern "C" fn sdti_encoder_part_dims(
    encoder: *mut sdti_encoder,
    dims: *mut u32,
    cap: usize,
    count: *mut usize,
) -> sdti_status {
    with_state(&ENCODERS, encoder as usize, |enc| {
        let widths: Vec<u32> = enc.part_widths().iter().map(|&w| w as u32).collect();
        // SAFETY: the caller's contract.
        unsafe { write_slice(&widths, dims, cap, count, "part widths") }
    })
}

/// Registers `token` as an SDXL word: `clip_l` (`[n_l, dim_l]` f32 row-major) for the
/// CLIP ViT-L encoder and `clip_g` (`[n_g, dim_g]`) for OpenCLIP bigG, both copied. The
/// widths must be the model's (`sdti_encoder_part_dims`: 768 and 1280), `n_l == n_g` in
/// 1..=75, values finite. On an SD 1.x or 2.x encoder it returns
/// `SDTI_ERR_INVALID_ARGUMENT` (their words have one part: `sdti_encoder_register_vectors`).
/// Since ABI 1.4.
///
/// # Safety
/// `token` is NUL-terminated; `clip_l` points to `n_l * dim_l` readable floats and
/// `clip_g` to `n_g * dim_g` (only read once every size checks out).
///
/// `[one thread at a time per handle]`
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn sdti_encoder_register_vectors_sdxl(
    encoder: *mut sdti_encoder,
    token: *const c_char,
    clip_l: *const f32,
    n_l: usize,
    dim_l: usize,
    clip_g: *const f32,
    n_g: usize,
    dim_g: usize,
) -> sdti_status {
    with_state(&ENCODERS, encoder as usize, |enc| {
        // SAFETY: NUL-terminated by contract.
        let token = unsafe { cstr(token, "token") }?;
        let widths = enc.part_widths();
        if enc.family() != Family::Sdxl {
            return Err(invalid(format!(
                "this {} model's words have one part (width {widths:?}): use sdti_encoder_register_vectors",
                enc.family().model_name()
            )));
        }
        for (name, ptr, n, dim, want) in [
            ("clip_l", clip_l, n_l, dim_l, widths[0]),
            ("clip_g", clip_g, n_g, dim_g, widths[1]),
        ] {
            if ptr.is_null() {
                return Err(invalid(format!("{name} is NULL")));
            }
            if dim != want {
                return Err(invalid(format!(
                    "{name}: width {dim} is not this model's {want}"
                )));
            }
            if n == 0 || n > crate::embedding::MAX_VECTORS {
                return Err(invalid(format!("{name}: n {n} is outside 1..=75")));
            }
        }
        if n_l != n_g {
            return Err(invalid(format!(
                "clip_l has {n_l} vectors and clip_g {n_g}: an SDXL word has as many of each"
            )));
        }
        // SAFETY: `n * dim` readable floats by contract (n <= 75, dims the model's widths).
        let (l, g) = unsafe {
            (
                std::slice::from_raw_parts(clip_l, n_l * dim_l).to_vec(),
                std::slice::from_raw_parts(clip_g, n_g * dim_g).to_vec(),
            )
        };
        enc.register_parts(token, &[&l, &g])?;
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

/// Whether prompts are read with weights (`enabled` 1, the default since ABI 1.5) as the
/// chunk style's host reads them, A1111's `(word)`, `(word:1.3)`, `[word]`, `BREAK` and
/// its mean-keeping rescale, or ComfyUI's `(word:1.3)` and its interpolation from the
/// empty prompt; or (0) as plain text, brackets and colons as tokens, as sdti did before.
/// Since ABI 1.5.
///
/// Statuses: `SDTI_ERR_INVALID_ARGUMENT` (`enabled` not 0 or 1).
///
/// `[one thread at a time per handle]`
#[no_mangle]
pub extern "C" fn sdti_encoder_set_prompt_weights(
    encoder: *mut sdti_encoder,
    enabled: u32,
) -> sdti_status {
    with_state(&ENCODERS, encoder as usize, |enc| {
        enc.set_prompt_weights(match enabled {
            0 => false,
            1 => true,
            other => {
                return Err(invalid(format!(
                    "prompt weights {other} is not 0 (plain text) or 1 (read weights)"
                )))
            }
        });
        Ok(())
    })
}

/// The prompt weight of each slot `sdti_encoder_tokenize` gives for `prompt` (1 where
/// none applies, and everywhere with prompt weights off), into `weights` (`cap` floats).
/// `*needed` (optional) gets the slot count; with `cap` smaller the call returns
/// `SDTI_ERR_BUFFER_TOO_SMALL` and writes no weight. A prompt whose weights the chunk
/// style's host cannot read (A1111's `(word:1.2.3)`) is refused with
/// `SDTI_ERR_INVALID_ARGUMENT` and the reason, as `sdti_encoder_encode` refuses it. Since
/// ABI 1.5.
///
/// # Safety
/// `prompt` is NUL-terminated; `weights` NULL or `cap` writable floats; `needed` NULL or
/// writable.
///
/// `[one thread at a time per handle]`
#[no_mangle]
pub unsafe extern "C" fn sdti_encoder_token_weights(
    encoder: *mut sdti_encoder,
    prompt: *const c_char,
    weights: *mut f32,
    cap: usize,
    needed: *mut usize,
) -> sdti_status {
    with_state(&ENCODERS, encoder as usize, |enc| {
        // SAFETY: NUL-terminated by contract.
        let prompt = unsafe { cstr(prompt, "prompt") }?;
        let slots = enc
            .try_tokenize(prompt)
            .map_err(|e| invalid(format!("prompt: {e}")))?;
        if !needed.is_null() {
            // SAFETY: writable by contract.
            unsafe { needed.write(slots.len()) };
        }
        if slots.len() > cap || weights.is_null() {
            return Err(fail(
                SDTI_ERR_BUFFER_TOO_SMALL,
                format!("{} slots needed, the buffer holds {cap}", slots.len()),
            ));
        }
        for (i, s) in slots.iter().enumerate() {
            // SAFETY: `cap > i` writable floats by contract.
            unsafe { weights.add(i).write(s.weight) };
        }
        Ok(())
    })
}

/// Takes the hidden states of the `clip_skip`-th layer from the end of the full-depth
/// text encoder (1 = last; 2 = the penultimate layer, as many SD 1.x fine-tunes use;
/// A1111's "Clip skip" setting). Never set, it is the model family's: 1 for SD 1.x, 2
/// for SD 2.x (OpenCLIP ViT-H's penultimate block, the last layer an SD 2.x diffusers
/// folder holds, so 1 is refused there) and for SDXL (both encoders, without the final
/// layer norm). 0 is refused. ComfyUI's negative layer indices:
/// `sdti_encoder_set_clip_layer`.
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

/// Chooses the text layer the way either front spells it: a negative `layer` is
/// ComfyUI's `CLIPSetLastLayer` (`stop_at_clip_layer`): -1 the last layer, -2 the
/// penultimate, the same as `sdti_encoder_set_clip_skip(-layer)`; a positive one is
/// A1111's "Clip skip" (`sdti_encoder_set_clip_skip(layer)`); 0 goes back to the model
/// family's default (`sdti_encoder_clip_skip` tells which). The final layer norm follows
/// the family, as in both tools: applied for SD 1.x and 2.x, not for SDXL. Note that
/// ComfyUI without that node uses -2 on SD 2.x and SDXL, and that inserting the node with
/// its default -1 switches them to the last layer. Since ABI 1.4.
///
/// Statuses: `SDTI_ERR_INVALID_ARGUMENT` (beyond the encoder's depth, or -1/1 on an SD
/// 2.x diffusers folder, which lacks the last block).
///
/// `[one thread at a time per handle]`
#[no_mangle]
pub extern "C" fn sdti_encoder_set_clip_layer(
    encoder: *mut sdti_encoder,
    layer: i32,
) -> sdti_status {
    with_state(&ENCODERS, encoder as usize, |enc| {
        if layer == 0 {
            enc.reset_clip_skip();
        } else {
            enc.set_clip_skip(layer.unsigned_abs() as usize)
                .map_err(|e| invalid(format!("clip layer {layer}: {e}")))?;
        }
        Ok(())
    })
}

/// The clip skip prompts are encoded with (set, or the family's), into `*clip_skip`: 1 =
/// the last layer. Since ABI 1.4.
///
/// # Safety
/// `clip_skip` is writable.
///
/// `[one thread at a time per handle]`
#[no_mangle]
pub unsafe extern "C" fn sdti_encoder_clip_skip(
    encoder: *mut sdti_encoder,
    clip_skip: *mut u32,
) -> sdti_status {
    with_state(&ENCODERS, encoder as usize, |enc| {
        // SAFETY: NULL or writable by contract.
        unsafe { write_out(clip_skip, enc.clip_skip() as u32, "clip_skip") }
    })
}

/// Tokenizes `prompt` as the encoder would, into 77-slot chunks (BOS, 75 slots, EOS,
/// padded): for slot `i`, `ids[i]` is the vocabulary id (the end-of-text id 49407 as a
/// stand-in on learned slots), `words[i]` the registered word's index in registration
/// order or -1, and `vector_index[i]` which of its vectors, or -1. Any of the three
/// arrays may be NULL. `*needed` (optional) gets the slot count; with `cap` smaller the
/// call returns `SDTI_ERR_BUFFER_TOO_SMALL` and writes no slot. Padding: the end token
/// for CLIP ViT-L (SD 1.x and SDXL's first encoder, whose ids these are for SDXL), 0
/// after each chunk's first end token for OpenCLIP (SD 2.x; SDXL's bigG takes these slots
/// with that padding).
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
/// writing them, without running the model (a cheap size query). SDXL also needs the
/// pooled vector: `sdti_encoder_encode_pooled`. Since ABI 1.5 prompt weights apply as the
/// chunk style's host applies them (`sdti_encoder_set_prompt_weights`); a prompt whose
/// weights that host cannot read gives `SDTI_ERR_INVALID_ARGUMENT`.
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
        // SAFETY: the caller's contract.
        unsafe { encode_into(enc, prompt, out, cap, None, needed_floats, rows) }
    })
}

/// Encodes `prompt` as `sdti_encoder_encode` does into `context` (`context_cap` floats,
/// `[chunks * 77, dim]`: SDXL's `[L || G]`, 2048 wide) and writes the pooled vector
/// (`sdti_encoder_pooled_dim` floats: SDXL's OpenCLIP bigG projection of the first
/// chunk's first end token, what A1111, ComfyUI and training use) into `pooled`
/// (`pooled_cap` floats). `*needed_floats` and `*rows` (each optional) get the context's
/// size; with `context` NULL or `context_cap` too small, or `pooled` NULL or `pooled_cap`
/// below the pooled width, the call returns `SDTI_ERR_BUFFER_TOO_SMALL` after writing
/// them, without running the model. For a model without a pooled vector (SD 1.x, 2.x;
/// `sdti_encoder_pooled_dim` 0) pass `pooled` NULL and `pooled_cap` 0; a pooled buffer
/// there gets `SDTI_ERR_UNSUPPORTED`. Since ABI 1.4.
///
/// # Safety
/// `prompt` is NUL-terminated; `context` NULL or `context_cap` writable floats; `pooled`
/// NULL or `pooled_cap` writable floats; `needed_floats`, `rows` NULL or writable.
///
/// `[one thread at a time per handle]`
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn sdti_encoder_encode_pooled(
    encoder: *mut sdti_encoder,
    prompt: *const c_char,
    context: *mut f32,
    context_cap: usize,
    pooled: *mut f32,
    pooled_cap: usize,
    needed_floats: *mut usize,
    rows: *mut u32,
) -> sdti_status {
    with_state(&ENCODERS, encoder as usize, |enc| {
        // SAFETY: the caller's contract.
        unsafe {
            encode_into(
                enc,
                prompt,
                context,
                context_cap,
                Some((pooled, pooled_cap)),
                needed_floats,
                rows,
            )
        }
    })
}

/// The body of both encode calls; `pooled` is the pooled buffer of `_encode_pooled`.
///
/// # Safety
/// As `sdti_encoder_encode_pooled`.
unsafe fn encode_into(
    enc: &mut PromptEncoder,
    prompt: *const c_char,
    out: *mut f32,
    cap: usize,
    pooled: Option<(*mut f32, usize)>,
    needed_floats: *mut usize,
    rows: *mut u32,
) -> FfiResult {
    // SAFETY: NUL-terminated by contract.
    let prompt = unsafe { cstr(prompt, "prompt") }?;
    let pooled_dim = enc.pooled_dim().unwrap_or(0);
    if let Some((buf, pooled_cap)) = pooled {
        if pooled_dim == 0 && (!buf.is_null() || pooled_cap > 0) {
            return Err(fail(
                SDTI_ERR_UNSUPPORTED,
                format!(
                    "this {} model has no pooled vector (sdti_encoder_pooled_dim is 0): pass pooled NULL and pooled_cap 0, or use sdti_encoder_encode",
                    enc.family().model_name()
                ),
            ));
        }
    }
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
            format!("{want} floats ({n_rows} rows) needed, the context buffer holds {cap}"),
        ));
    }
    if let Some((buf, pooled_cap)) = pooled {
        if pooled_dim > 0 && (buf.is_null() || pooled_cap < pooled_dim) {
            return Err(fail(
                SDTI_ERR_BUFFER_TOO_SMALL,
                format!(
                    "the pooled vector has {pooled_dim} floats, the pooled buffer holds {}",
                    if buf.is_null() { 0 } else { pooled_cap }
                ),
            ));
        }
    }
    let (states, pooled_vector) = enc.encode_with_pooled(prompt)?;
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
    let pooled_data: Option<Vec<f32>> = match (pooled, pooled_vector) {
        (Some(_), Some(p)) if pooled_dim > 0 => {
            let v: Vec<f32> = p.flatten_all().and_then(|t| t.to_vec1())?;
            if v.len() != pooled_dim {
                return Err(fail(
                    SDTI_ERR_COMPUTE,
                    format!(
                        "the encoder gave a pooled vector of {} floats, {pooled_dim} were expected",
                        v.len()
                    ),
                ));
            }
            Some(v)
        }
        (Some(_), None) if pooled_dim > 0 => {
            return Err(fail(
                SDTI_ERR_COMPUTE,
                "the encoder gave no pooled vector for a model that has one",
            ))
        }
        _ => None,
    };
    // Both outputs only once both are computed: nothing is written on failure.
    // SAFETY: `out` has `cap >= want` writable floats.
    unsafe { write_slice(&data, out, cap, std::ptr::null_mut(), "hidden states") }?;
    if let (Some((buf, pooled_cap)), Some(v)) = (pooled, pooled_data) {
        // SAFETY: `buf` has `pooled_cap >= pooled_dim` writable floats (checked above).
        unsafe { write_slice(&v, buf, pooled_cap, std::ptr::null_mut(), "pooled vector") }?;
    }
    Ok(())
}

/// Releases the encoder. `NULL`, and a handle freed already, are no-ops.
///
/// `[one thread at a time per handle]`
#[no_mangle]
pub extern "C" fn sdti_encoder_free(encoder: *mut sdti_encoder) {
    free_handle(&ENCODERS, encoder as usize);
}
