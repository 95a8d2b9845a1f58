//! `sdti_trainer_*`: a textual-inversion run behind an opaque handle.

use std::ffi::{c_char, c_void};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock};

use super::boundary::*;
use super::embedding::format_for;
use super::*;
use crate::app::preview::SampleOptions;
use crate::app::run_folder::{draw_with_vectors, PreviewSettings};
use crate::device::{auto_dtype, open_device};
use crate::embedding::{write_embedding_to, Existing, Precision};
use crate::model::PredictionType;
use crate::model::Recompute;
use crate::model::{LoadOptions, SdModel};
use crate::train::config::RecomputeMode;
use crate::train::data::{ImageSource, PixelFormat, MAX_PIXELS, MAX_SIDE, MIN_SIDE};
use crate::train::{check_fits, Init, StepStats, Templates, TrainConfig, Trainer};

/// An `SDTI_RECOMPUTE_*` value (a `uint32_t`).
pub type sdti_recompute = u32;

/// Keep every UNet block's activations for the backward pass (fastest, most memory).
pub const SDTI_RECOMPUTE_OFF: sdti_recompute = 0;
/// Keep only each block's inputs and rerun its forward pass inside the backward pass:
/// the same numbers for much less activation memory and about one more UNet forward pass
/// per step.
pub const SDTI_RECOMPUTE_ON: sdti_recompute = 1;
/// Off when the estimated peak of a step fits `memory_budget_mib` (or, at 0, what the
/// device has available when the run starts), else on. The default since ABI 1.3; a host
/// built against an older header gets it too (its steps are recomputed only where they
/// would not fit).
pub const SDTI_RECOMPUTE_AUTO: sdti_recompute = 2;

/// An `SDTI_PREDICTION_*` value (a `uint32_t`): what the UNet predicts.
pub type sdti_prediction = u32;

/// The model's: its scheduler config, else its markers and the family's rules (what
/// `sdti_trainer_notes` explains). The default.
pub const SDTI_PREDICTION_MODEL: sdti_prediction = 0;
/// The noise (epsilon), as SD 1.x, SD 2.x base and SDXL base predict.
pub const SDTI_PREDICTION_EPSILON: sdti_prediction = 1;
/// The velocity (v-prediction), as the 768-v SD 2.x models and the v-prediction SDXL
/// fine-tunes predict.
pub const SDTI_PREDICTION_V: sdti_prediction = 2;

/// An `SDTI_ZERO_SNR_*` value (a `uint32_t`): whether the noise schedule is rescaled to
/// zero terminal SNR (diffusers' `rescale_betas_zero_snr`).
pub type sdti_zero_snr = u32;

/// The model's: its scheduler config or its `ztsnr` marker. The default.
pub const SDTI_ZERO_SNR_MODEL: sdti_zero_snr = 0;
/// The model's schedule as its betas give it.
pub const SDTI_ZERO_SNR_OFF: sdti_zero_snr = 1;
/// Rescaled to zero terminal SNR, as the v-prediction SDXL fine-tunes are trained.
pub const SDTI_ZERO_SNR_ON: sdti_zero_snr = 2;

/// An opaque training run. Create with `sdti_trainer_new`, release with
/// `sdti_trainer_free`.
pub struct sdti_trainer {
    _opaque: [u8; 0],
}

/// What the progress callback sees after each optimizer step. Library-owned, valid only
/// during the callback; fields are only ever appended (check `struct_size`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct sdti_progress {
    /// `sizeof(sdti_progress)` of the library.
    pub struct_size: u32,
    /// Steps the running `sdti_trainer_step` call has done, this one included.
    pub steps_done: u32,
    /// Optimizer steps of the run so far (1 after the first).
    pub step: u64,
    /// The step the run ends at (`max_steps`, or earlier where a schedule ends).
    pub total_steps: u64,
    /// The step's mean denoising loss.
    pub loss: f64,
    /// The learning rate the step used.
    pub learning_rate: f64,
    /// Seconds the step took.
    pub seconds: f64,
}

/// The progress callback: called on the thread that called `sdti_trainer_step`, after
/// each step, never after `sdti_trainer_free` returned. Return 0 to go on; any other
/// value cancels (the step call returns `SDTI_CANCELLED`).
pub type sdti_progress_fn =
    Option<unsafe extern "C" fn(user_data: *mut c_void, progress: *const sdti_progress) -> i32>;

/// What `sdti_trainer_step` did. Set `struct_size = sizeof(sdti_step_stats)` first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct sdti_step_stats {
    /// Set by the caller to `sizeof(sdti_step_stats)`.
    pub struct_size: u32,
    /// Steps this call did.
    pub steps_done: u32,
    /// Optimizer steps of the run so far.
    pub step: u64,
    /// The step the run ends at.
    pub total_steps: u64,
    /// The last step's mean denoising loss (0 when this call did no step).
    pub loss: f64,
    /// The last step's learning rate.
    pub learning_rate: f64,
    /// Seconds of all steps of this call.
    pub seconds: f64,
}

/// Everything a training run is made from. Fill with `sdti_trainer_params_init`, then
/// set fields. Strings are copied by `sdti_trainer_new`; NULL picks the default.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct sdti_trainer_params {
    /// `sizeof(sdti_trainer_params)`, set by `sdti_trainer_params_init`.
    pub struct_size: u32,
    /// `SDTI_PRECISION_AUTO` (default: bf16 on CUDA, f32 elsewhere), `_F32`, `_F16` or
    /// `_BF16`: the dtype of the frozen UNet and VAE.
    pub precision: sdti_precision,
    /// Required: a diffusers folder or a single-file `.safetensors` checkpoint of SD 1.x,
    /// SD 2.x or SDXL (base and its fine-tunes). SDXL words are learned as two tables,
    /// `clip_l` and `clip_g`, each started from `init_text`.
    pub model_path: *const c_char,
    /// `"cpu"` (NULL), `"cuda"`, `"cuda:N"`, `"metal"`.
    pub device: *const c_char,
    /// Required: the word to learn, one word without spaces.
    pub token: *const c_char,
    /// The text whose token vectors start the word (default `"*"`, as A1111).
    pub init_text: *const c_char,
    /// Vectors per token, 1..=75 (default 1).
    pub vectors: u32,
    /// Training resolution, a multiple of 8 in 64..=4096, or 0 (the default since ABI 1.4):
    /// the model family's, the resolution it was trained at: 1024 for SDXL, 768 for SD 2.x
    /// with v-prediction, 512 otherwise (SD 1.x, SD 2.x base; what older libraries used).
    /// `sdti_trainer_resolution` tells what a run uses.
    pub resolution: u32,
    /// A number or an A1111 schedule (`"0.005:100, 1e-3:1000, 1e-5"`); default `"0.005"`.
    pub learning_rate: *const c_char,
    /// Images per micro-batch, 1..=256 (default 1).
    pub batch_size: u32,
    /// Micro-batches per optimizer step (default 1).
    pub gradient_accumulation: u32,
    /// Fixes every random choice (default 0).
    pub seed: u64,
    /// `"object"` (NULL, the default), `"style"`, or the path of an A1111 template file.
    pub templates: *const c_char,
    /// Optimizer steps of the whole run (default 3000).
    pub max_steps: u64,
    /// Folder for automatic saves (NULL: none): `<token>-<step>.safetensors` (the word
    /// named `<token>-<step>` inside too, as A1111 names its by-step files) and
    /// `<token>.checkpoint.safetensors` every `save_every` steps. Without
    /// `resume_checkpoint`, `sdti_trainer_new` refuses a folder that already holds that
    /// checkpoint (`SDTI_ERR_EXISTS`).
    pub output_dir: *const c_char,
    /// Save every this many steps (0, the default: never).
    pub save_every: u64,
    /// A checkpoint of the same run to resume from (NULL: none). It is restored at the
    /// first `sdti_trainer_step`, after the same images were added in the same order.
    pub resume_checkpoint: *const c_char,
    /// Called after each step (NULL: none).
    pub progress: sdti_progress_fn,
    /// Passed to `progress` unchanged.
    pub progress_user_data: *mut c_void,
    /// Since ABI 1.3 (revision 2 of this struct): `SDTI_RECOMPUTE_AUTO` (the default),
    /// `_OFF` or `_ON`; `sdti_trainer_recompute` tells what auto chose. It never changes
    /// the numbers, so a resumed run may use another.
    pub recompute: sdti_recompute,
    /// Since ABI 1.3: the memory `SDTI_RECOMPUTE_AUTO` may plan a step for, in MiB, for
    /// the whole process (the GPU's memory on CUDA); 0 (the default): on the CPU what the
    /// process holds plus the system's available memory when the run starts, on CUDA the
    /// device's free memory plus the weights; elsewhere auto stays off.
    pub memory_budget_mib: u32,
    /// Since ABI 1.5 (revision 3 of this struct): `SDTI_PREDICTION_MODEL` (the default),
    /// `_EPSILON` or `_V`, for a checkpoint whose files do not say what it predicts (a
    /// v-prediction SDXL fine-tune without a `v_pred` key). `sdti_trainer_prediction`
    /// tells what a run uses.
    pub prediction_type: sdti_prediction,
    /// Since ABI 1.5: `SDTI_ZERO_SNR_MODEL` (the default), `_OFF` or `_ON`.
    pub zero_terminal_snr: sdti_zero_snr,
    /// Since ABI 1.5: condition on `hidden_states[-clip_skip]` of the full-depth text
    /// encoder(s), 1 = the last layer; 0 (the default): the family's (1 for SD 1.x, 2 for
    /// SD 2.x and SDXL, as each was trained). An encoder made from the trainer
    /// (`sdti_encoder_from_trainer`) uses the same.
    pub clip_skip: u32,
    /// Since ABI 1.5: 0 (the default) crops each picture at its center, as diffusers
    /// does; 1 picks one random crop per picture (fixed by `seed`, kept for the run).
    pub random_crop: u32,
}

// No revision has implicit padding, so any later revision's `struct_size` cut ends on a
// field boundary.
#[cfg(target_pointer_width = "64")]
const _: () = assert!(std::mem::size_of::<sdti_trainer_params>() == 152);
/// Revision 1 ends with `progress_user_data`.
const PARAMS_V1: usize = std::mem::offset_of!(sdti_trainer_params, recompute);
const STATS_V1: usize = std::mem::size_of::<sdti_step_stats>();

impl Default for sdti_trainer_params {
    fn default() -> Self {
        let d = TrainConfig::default();
        Self {
            struct_size: std::mem::size_of::<sdti_trainer_params>() as u32,
            precision: SDTI_PRECISION_AUTO,
            model_path: std::ptr::null(),
            device: std::ptr::null(),
            token: std::ptr::null(),
            init_text: std::ptr::null(),
            vectors: d.vectors as u32,
            // 0: the family's (TrainConfig's None).
            resolution: d.resolution.map_or(0, |r| r as u32),
            learning_rate: std::ptr::null(),
            batch_size: d.batch_size as u32,
            gradient_accumulation: d.gradient_accumulation as u32,
            seed: d.seed,
            templates: std::ptr::null(),
            max_steps: d.max_steps,
            output_dir: std::ptr::null(),
            save_every: 0,
            resume_checkpoint: std::ptr::null(),
            progress: None,
            progress_user_data: std::ptr::null_mut(),
            recompute: SDTI_RECOMPUTE_AUTO,
            memory_budget_mib: 0,
            prediction_type: SDTI_PREDICTION_MODEL,
            zero_terminal_snr: SDTI_ZERO_SNR_MODEL,
            clip_skip: d.clip_skip.map_or(0, |n| n as u32),
            random_crop: u32::from(d.random_crop),
        }
    }
}

/// The engine's mode for a params' `recompute` value.
fn recompute_mode(value: sdti_recompute) -> FfiResult<RecomputeMode> {
    match value {
        SDTI_RECOMPUTE_OFF => Ok(RecomputeMode::Off),
        SDTI_RECOMPUTE_ON => Ok(RecomputeMode::On),
        SDTI_RECOMPUTE_AUTO => Ok(RecomputeMode::Auto),
        other => Err(invalid(format!(
            "params.recompute {other} is not SDTI_RECOMPUTE_OFF (0), _ON (1) or _AUTO (2)"
        ))),
    }
}

/// The engine's override for a params' `prediction_type` value (None: the model's).
fn prediction_override(value: sdti_prediction) -> FfiResult<Option<PredictionType>> {
    match value {
        SDTI_PREDICTION_MODEL => Ok(None),
        SDTI_PREDICTION_EPSILON => Ok(Some(PredictionType::Epsilon)),
        SDTI_PREDICTION_V => Ok(Some(PredictionType::VPrediction)),
        other => Err(invalid(format!(
            "params.prediction_type {other} is not SDTI_PREDICTION_MODEL (0), _EPSILON (1) or _V (2)"
        ))),
    }
}

/// The engine's override for a params' `zero_terminal_snr` value (None: the model's).
fn zero_snr_override(value: sdti_zero_snr) -> FfiResult<Option<bool>> {
    match value {
        SDTI_ZERO_SNR_MODEL => Ok(None),
        SDTI_ZERO_SNR_OFF => Ok(Some(false)),
        SDTI_ZERO_SNR_ON => Ok(Some(true)),
        other => Err(invalid(format!(
            "params.zero_terminal_snr {other} is not SDTI_ZERO_SNR_MODEL (0), _OFF (1) or _ON (2)"
        ))),
    }
}

/// The host's callback pointer and user data. The library only hands them back to the
/// host, on the host's own thread.
#[derive(Clone, Copy)]
struct Callback {
    func: sdti_progress_fn,
    user_data: *mut c_void,
}

// SAFETY: the pointers are never dereferenced by the library; they are passed back to the
// host's callback on the thread that called `sdti_trainer_step`.
unsafe impl Send for Callback {}

pub(crate) struct TrainerState {
    pub trainer: Trainer,
    resume: Option<PathBuf>,
    output_dir: Option<PathBuf>,
    save_every: u64,
    callback: Callback,
}

pub(crate) static TRAINERS: LazyLock<Registry<TrainerState>> =
    LazyLock::new(|| Registry::new("trainer"));

/// The load options of `sdti_model_params`' device and precision.
pub(crate) fn load_options(device: Option<&str>, precision: u32) -> FfiResult<LoadOptions> {
    // None: the device chooses.
    let dtype = match precision {
        SDTI_PRECISION_F32 => Some(candle_core::DType::F32),
        SDTI_PRECISION_F16 => Some(candle_core::DType::F16),
        SDTI_PRECISION_BF16 => Some(candle_core::DType::BF16),
        SDTI_PRECISION_AUTO => None,
        other => {
            return Err(invalid(format!(
                "precision {other} is not SDTI_PRECISION_F32 (0), _F16 (1), _BF16 (2) or _AUTO (3)"
            )))
        }
    };
    let device = open_device(device.unwrap_or("cpu"))?;
    let dtype = dtype.unwrap_or_else(|| auto_dtype(&device));
    Ok(LoadOptions {
        dtype,
        device,
        config: None,
    })
}

/// Fills `params` with the defaults (see each field) and its `struct_size`. Returns
/// `SDTI_ERR_INVALID_ARGUMENT` for NULL.
///
/// # Safety
/// `params` is NULL or points to a writable `sdti_trainer_params`.
///
/// `[thread-safe]`
#[no_mangle]
pub unsafe extern "C" fn sdti_trainer_params_init(params: *mut sdti_trainer_params) -> sdti_status {
    call(|| {
        if params.is_null() {
            return Err(invalid("params is NULL"));
        }
        // SAFETY: non-NULL and writable by contract.
        unsafe { params.write(sdti_trainer_params::default()) };
        Ok(())
    })
}

/// Loads the model and starts a run; `*out` receives the handle on success.
///
/// Statuses: `SDTI_ERR_INVALID_ARGUMENT` (NULL, a bad value; the message names the
/// field), `SDTI_ERR_STRUCT_SIZE`, `SDTI_ERR_INVALID_UTF8`, `SDTI_ERR_DEVICE`,
/// `SDTI_ERR_MODEL`, `SDTI_ERR_IO`, `SDTI_ERR_MEMORY` (the run cannot fit in the memory
/// available or in `memory_budget_mib`, found from the model's headers before its weights
/// are read; the message says what it needs). A `struct_size` larger than this library's (a newer
/// host) is accepted; the fields this library does not know are ignored.
///
/// # Safety
/// `params` points to at least `params->struct_size` readable bytes, its strings are NULL
/// or NUL-terminated; `out` is writable.
///
/// `[thread-safe]`
#[no_mangle]
pub unsafe extern "C" fn sdti_trainer_new(
    params: *const sdti_trainer_params,
    out: *mut *mut sdti_trainer,
) -> sdti_status {
    call(|| {
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        // SAFETY: the caller's contract.
        let p =
            unsafe { read_versioned(params, sdti_trainer_params::default(), PARAMS_V1, "params") }?;
        // SAFETY: every string field is NULL or NUL-terminated by contract.
        let (config, model_path, device, output_dir, resume) = unsafe {
            let templates = match opt_cstr(p.templates, "params.templates")? {
                None => Templates::Object,
                Some(t) if t.eq_ignore_ascii_case("object") => Templates::Object,
                Some(t) if t.eq_ignore_ascii_case("style") => Templates::Style,
                Some(_) => Templates::File(cpath(p.templates, "params.templates")?),
            };
            let defaults = TrainConfig::default();
            let config = TrainConfig {
                token: cstr(p.token, "params.token")?.to_string(),
                init: Init::Text(
                    opt_cstr(p.init_text, "params.init_text")?
                        .map(str::to_string)
                        .unwrap_or_else(|| "*".to_string()),
                ),
                vectors: p.vectors as usize,
                resolution: (p.resolution != 0).then_some(p.resolution as usize),
                learning_rate: match opt_cstr(p.learning_rate, "params.learning_rate")? {
                    None => defaults.learning_rate.clone(),
                    // Parsed here, once: the engine holds the schedule, not its text.
                    Some(text) => crate::train::lr_schedule::LrSchedule::parse(text)
                        .map_err(|e| invalid(format!("params.learning_rate: {e}")))?,
                },
                batch_size: p.batch_size as usize,
                gradient_accumulation: p.gradient_accumulation as usize,
                seed: p.seed,
                templates,
                max_steps: p.max_steps,
                prediction_type: prediction_override(p.prediction_type)?,
                zero_terminal_snr: zero_snr_override(p.zero_terminal_snr)?,
                clip_skip: (p.clip_skip != 0).then_some(p.clip_skip as usize),
                random_crop: match p.random_crop {
                    0 => false,
                    1 => true,
                    other => {
                        return Err(invalid(format!(
                            "params.random_crop {other} is not 0 (center) or 1 (random)"
                        )))
                    }
                },
                ..defaults
            };
            (
                config,
                cpath(p.model_path, "params.model_path")?,
                opt_cstr(p.device, "params.device")?.map(str::to_string),
                opt_cpath(p.output_dir, "params.output_dir")?,
                opt_cpath(p.resume_checkpoint, "params.resume_checkpoint")?,
            )
        };
        // Check the options before the (slow) model load.
        config.validate()?;
        let recompute = recompute_mode(p.recompute)?;
        if let (Some(dir), None) = (&output_dir, &resume) {
            // A new run must not take over the files of an earlier run of the same word.
            let ckpt = run_checkpoint_path(dir, &config.token);
            if let Some(kind) = crate::io::existing_kind(&ckpt) {
                return Err(fail(
                    SDTI_ERR_EXISTS,
                    format!(
                        "params.output_dir: {} is already there ({kind}): an earlier run of '{}'; resume it (params.resume_checkpoint) or choose another folder or token",
                        ckpt.display(),
                        config.token
                    ),
                ));
            }
        }
        let budget = (p.memory_budget_mib > 0).then_some(u64::from(p.memory_budget_mib));
        // A job that cannot fit is refused from the files' headers, before the weights.
        let options = load_options(device.as_deref(), p.precision)?;
        let model = SdModel::load_checked(&model_path, &options, |model| {
            check_fits(
                model,
                options.dtype,
                &options.device,
                &config,
                recompute,
                budget,
            )
        })?;
        let mut trainer = Trainer::new(Arc::new(model), config)?;
        trainer.choose_recompute(recompute, budget);
        let cancel = trainer.cancel_flag();
        let state = TrainerState {
            trainer,
            resume,
            output_dir,
            save_every: p.save_every,
            callback: Callback {
                func: p.progress,
                user_data: p.progress_user_data,
            },
        };
        let key = TRAINERS.insert(Handle::new(state, cancel));
        // SAFETY: writable by contract.
        unsafe { out.write(key as *mut sdti_trainer) };
        Ok(())
    })
}

/// Adds a training image from pixels: `width` x `height` (each 2..=16384), rows `stride`
/// bytes apart (0: tightly packed), `pixel_format` `SDTI_PIXEL_RGB8` or
/// `SDTI_PIXEL_RGBA8`; `caption` (NULL: none) fills A1111's `[filewords]`. The pixels are
/// copied, resized and encoded by the VAE before the call returns. Steps free the VAE's
/// weights (their memory goes to the step); an image added after a step reads them again
/// from the model's files, and a model file changed or removed since the model was
/// loaded is then an `SDTI_ERR_MODEL` naming it.
///
/// Statuses: `SDTI_ERR_IMAGE` (size, stride), `SDTI_ERR_INVALID_ARGUMENT` (NULL pixels,
/// unknown pixel format), `SDTI_ERR_INVALID_UTF8` (caption).
///
/// # Safety
/// `pixels` points to at least `stride * (height - 1) + width * bytes_per_pixel` readable
/// bytes (checked sizes are validated before anything is read).
///
/// `[one thread at a time per handle]`
#[no_mangle]
pub unsafe extern "C" fn sdti_trainer_add_image(
    trainer: *mut sdti_trainer,
    pixels: *const u8,
    width: u32,
    height: u32,
    stride: usize,
    pixel_format: sdti_pixel_format,
    caption: *const c_char,
) -> sdti_status {
    with_state(&TRAINERS, trainer as usize, |state| {
        let format = match pixel_format {
            SDTI_PIXEL_RGB8 => PixelFormat::Rgb8,
            SDTI_PIXEL_RGBA8 => PixelFormat::Rgba8,
            other => {
                return Err(invalid(format!(
                    "pixel_format {other} is not SDTI_PIXEL_RGB8 (0) or SDTI_PIXEL_RGBA8 (1)"
                )))
            }
        };
        if pixels.is_null() {
            return Err(invalid("pixels is NULL"));
        }
        let image_err = |m: String| fail(SDTI_ERR_IMAGE, format!("in-memory image: {m}"));
        if !(MIN_SIDE..=MAX_SIDE).contains(&width) || !(MIN_SIDE..=MAX_SIDE).contains(&height) {
            return Err(image_err(format!(
                "{width}x{height}: each side must be {MIN_SIDE}..={MAX_SIDE} pixels"
            )));
        }
        if u64::from(width) * u64::from(height) > MAX_PIXELS {
            return Err(image_err(format!(
                "{width}x{height} is more than {MAX_PIXELS} pixels"
            )));
        }
        let row = width as usize * format.bytes_per_pixel();
        let stride = if stride == 0 { row } else { stride };
        if stride < row {
            return Err(image_err(format!(
                "stride {stride} is smaller than a row of {width} pixels ({row} bytes)"
            )));
        }
        let len = stride
            .checked_mul(height as usize - 1)
            .and_then(|n| n.checked_add(row))
            .ok_or_else(|| image_err(format!("stride {stride} x height {height} overflows")))?;
        // SAFETY: the caller provides `len` readable bytes (the documented size).
        let data = unsafe { std::slice::from_raw_parts(pixels, len) }.to_vec();
        // SAFETY: NULL or NUL-terminated by contract.
        let caption = unsafe { opt_cstr(caption, "caption") }?.map(str::to_string);
        state.trainer.add_image(
            ImageSource::Pixels {
                data,
                width,
                height,
                stride,
                format,
            },
            caption,
        )?;
        Ok(())
    })
}

/// Adds a training image from a PNG, JPEG or WebP file (a `.txt` beside it is its
/// caption). Statuses: `SDTI_ERR_IMAGE` (unreadable, undecodable, too small or large),
/// `SDTI_ERR_INVALID_ARGUMENT`.
///
/// # Safety
/// `path` is a NUL-terminated string.
///
/// `[one thread at a time per handle]`
#[no_mangle]
pub unsafe extern "C" fn sdti_trainer_add_image_file(
    trainer: *mut sdti_trainer,
    path: *const c_char,
) -> sdti_status {
    with_state(&TRAINERS, trainer as usize, |state| {
        // SAFETY: NUL-terminated by contract.
        let path = unsafe { cpath(path, "path") }?;
        state.trainer.add_image(ImageSource::File(path), None)?;
        Ok(())
    })
}

/// Number of images added so far, into `*count`.
///
/// # Safety
/// `count` is writable.
///
/// `[one thread at a time per handle]`
#[no_mangle]
pub unsafe extern "C" fn sdti_trainer_image_count(
    trainer: *mut sdti_trainer,
    count: *mut u32,
) -> sdti_status {
    with_state(&TRAINERS, trainer as usize, |state| {
        // SAFETY: NULL or writable by contract.
        unsafe { write_out(count, state.trainer.image_count() as u32, "count") }
    })
}

/// Whether the run's steps recompute the UNet blocks' activations, into `*recompute`:
/// `SDTI_RECOMPUTE_OFF` or `SDTI_RECOMPUTE_ON` (what `SDTI_RECOMPUTE_AUTO` chose when
/// the run was created; also ON when it reruns only some of the UNet's transformers, the
/// least that fits its budget). Since ABI 1.3.
///
/// # Safety
/// `recompute` is writable.
///
/// `[one thread at a time per handle]`
#[no_mangle]
pub unsafe extern "C" fn sdti_trainer_recompute(
    trainer: *mut sdti_trainer,
    recompute: *mut sdti_recompute,
) -> sdti_status {
    with_state(&TRAINERS, trainer as usize, |state| {
        let value = match state.trainer.recompute() {
            Recompute::Off | Recompute::Transformers(0) => SDTI_RECOMPUTE_OFF,
            // Auto rerunning some of the transformers: on, for some blocks.
            Recompute::On | Recompute::Transformers(_) => SDTI_RECOMPUTE_ON,
        };
        // SAFETY: NULL or writable by contract.
        unsafe { write_out(recompute, value, "recompute") }
    })
}

/// What the run's UNet predicts and its noise schedule, into `*prediction`
/// (`SDTI_PREDICTION_EPSILON` or `_V`) and `*zero_snr` (`SDTI_ZERO_SNR_OFF` or `_ON`):
/// the params' overrides where given, else what the model's files say
/// (`sdti_trainer_notes` tells how that was decided). Either pointer may be NULL. Since
/// ABI 1.5.
///
/// # Safety
/// `prediction` and `zero_snr` are NULL or writable.
///
/// `[one thread at a time per handle]`
#[no_mangle]
pub unsafe extern "C" fn sdti_trainer_prediction(
    trainer: *mut sdti_trainer,
    prediction: *mut sdti_prediction,
    zero_snr: *mut sdti_zero_snr,
) -> sdti_status {
    with_state(&TRAINERS, trainer as usize, |state| {
        let p = match state.trainer.noise_schedule().prediction_type() {
            PredictionType::Epsilon => SDTI_PREDICTION_EPSILON,
            PredictionType::VPrediction => SDTI_PREDICTION_V,
        };
        let z = if state.trainer.zero_terminal_snr() {
            SDTI_ZERO_SNR_ON
        } else {
            SDTI_ZERO_SNR_OFF
        };
        // SAFETY: NULL or writable by contract.
        unsafe {
            if !prediction.is_null() {
                write_out(prediction, p, "prediction")?;
            }
            if !zero_snr.is_null() {
                write_out(zero_snr, z, "zero_snr")?;
            }
        }
        Ok(())
    })
}

/// The model family of the trainer's model (`SDTI_FAMILY_SD1`, `_SD2` or `_SDXL`), into
/// `*family`. Since ABI 1.4.
///
/// # Safety
/// `family` is writable.
///
/// `[one thread at a time per handle]`
#[no_mangle]
pub unsafe extern "C" fn sdti_trainer_family(
    trainer: *mut sdti_trainer,
    family: *mut sdti_family,
) -> sdti_status {
    with_state(&TRAINERS, trainer as usize, |state| {
        // SAFETY: NULL or writable by contract.
        unsafe {
            write_out(
                family,
                family_code(state.trainer.model().config.family),
                "family",
            )
        }
    })
}

/// The resolution the run trains at, in pixels, into `*resolution`: the params' or, for
/// 0, the model family's. Since ABI 1.4.
///
/// # Safety
/// `resolution` is writable.
///
/// `[one thread at a time per handle]`
#[no_mangle]
pub unsafe extern "C" fn sdti_trainer_resolution(
    trainer: *mut sdti_trainer,
    resolution: *mut u32,
) -> sdti_status {
    with_state(&TRAINERS, trainer as usize, |state| {
        // SAFETY: NULL or writable by contract.
        unsafe { write_out(resolution, state.trainer.resolution() as u32, "resolution") }
    })
}

/// What loading the model decided from clues rather than a configuration (a single
/// file's prediction type and the rule that chose it, zero-SNR, ...), one sentence a line,
/// as NUL-terminated UTF-8 into `buf` (`""` when nothing was guessed): for the host to
/// show where a person sees it. `*needed` (optional) gets the size with the NUL; with
/// `buf` NULL or `len` smaller the call returns `SDTI_ERR_BUFFER_TOO_SMALL` (writing as
/// much as fits, NUL-terminated, when `len > 0`). Since ABI 1.4.
///
/// # Safety
/// `buf` is NULL or `len` writable bytes; `needed` NULL or writable.
///
/// `[one thread at a time per handle]`
#[no_mangle]
pub unsafe extern "C" fn sdti_trainer_notes(
    trainer: *mut sdti_trainer,
    buf: *mut c_char,
    len: usize,
    needed: *mut usize,
) -> sdti_status {
    with_state(&TRAINERS, trainer as usize, |state| {
        let text = state.trainer.model().notes.join("\n");
        // SAFETY: the caller's contract.
        let rc = unsafe { write_bytes_with_nul(text.as_bytes(), buf, len, needed) };
        if rc != SDTI_OK {
            return Err(fail(
                rc,
                format!(
                    "the notes need {} bytes, the buffer holds {len}",
                    text.len() + 1
                ),
            ));
        }
        Ok(())
    })
}

enum StepEnd {
    Done,
    Cancelled(String),
}

fn progress_of(s: &StepStats, done: u32, total: u64) -> sdti_progress {
    sdti_progress {
        struct_size: std::mem::size_of::<sdti_progress>() as u32,
        steps_done: done,
        step: s.step,
        total_steps: total,
        loss: f64::from(s.loss),
        learning_rate: s.learning_rate,
        seconds: s.seconds,
    }
}

impl TrainerState {
    /// One optimizer step with the pending resume and the automatic saves.
    fn one_step(&mut self) -> FfiResult<StepStats> {
        if let Some(path) = self.resume.take() {
            self.trainer.load_checkpoint(&path)?;
        }
        let stats = self.trainer.step()?;
        if let Some(dir) = &self.output_dir {
            if self.save_every > 0 && stats.step % self.save_every == 0 {
                std::fs::create_dir_all(dir)
                    .map_err(|e| fail(SDTI_ERR_IO, format!("output_dir {}: {e}", dir.display())))?;
                let token = &self.trainer.config().token;
                // Named as A1111 names its by-step files, inside as in the file name.
                let name = format!("{token}-{}", stats.step);
                let mut emb = self.trainer.embedding()?;
                emb.name = Some(name.clone());
                // This run's own files: checked at sdti_trainer_new, rewritten after a resume.
                write_embedding_to(
                    &dir.join(format!("{name}.safetensors")),
                    &emb,
                    crate::embedding::Format::A1111Safetensors,
                    Precision::F32,
                    Existing::Replace,
                )?;
                self.trainer
                    .save_checkpoint(&run_checkpoint_path(dir, token))?;
            }
        }
        Ok(stats)
    }
}

/// The checkpoint the automatic saves of a run with `output_dir` write.
fn run_checkpoint_path(dir: &Path, token: &str) -> PathBuf {
    dir.join(format!("{token}.checkpoint.safetensors"))
}

/// Runs up to `steps` optimizer steps (fewer when the run reaches `max_steps`, which is
/// `SDTI_OK` with `stats->step == stats->total_steps`). `stats` (NULL allowed, else its
/// `struct_size` set) is written on `SDTI_OK` and on `SDTI_CANCELLED`.
///
/// The progress callback runs after each step on this thread, with the handle unlocked:
/// it may call `sdti_trainer_cancel`, `sdti_trainer_export`,
/// `sdti_trainer_save_checkpoint` or even `sdti_trainer_free` on this trainer.
///
/// Statuses: `SDTI_CANCELLED` (by `sdti_trainer_cancel`, a non-zero callback return or a
/// `_free` on another thread; the steps done are kept), `SDTI_ERR_STATE` (no images),
/// `SDTI_ERR_CHECKPOINT` (the resume checkpoint does not fit), `SDTI_ERR_IO` (automatic
/// saves), `SDTI_ERR_BUSY`, `SDTI_ERR_POISONED`.
///
/// # Safety
/// `stats` is NULL or a writable `sdti_step_stats` with `struct_size` set.
///
/// `[one thread at a time per handle]`; `sdti_trainer_cancel` may be called from any
/// thread while it runs.
#[no_mangle]
pub unsafe extern "C" fn sdti_trainer_step(
    trainer: *mut sdti_trainer,
    steps: u32,
    stats: *mut sdti_step_stats,
) -> sdti_status {
    call(|| {
        let handle = TRAINERS.get(trainer as usize)?;
        if !stats.is_null() {
            // SAFETY: readable by contract.
            let size = unsafe { stats.cast::<u32>().read_unaligned() } as usize;
            if size < STATS_V1 {
                return Err(fail(
                    SDTI_ERR_STRUCT_SIZE,
                    format!("stats.struct_size is {size}; at least {STATS_V1} is needed"),
                ));
            }
        }
        let mut out = sdti_step_stats {
            struct_size: STATS_V1 as u32,
            ..Default::default()
        };
        let mut guard = lock_state(&handle, "trainer", false)?;
        let end = loop {
            let Some(state) = guard.as_mut() else {
                break StepEnd::Cancelled("the trainer was freed during sdti_trainer_step".into());
            };
            out.step = state.trainer.step_count();
            out.total_steps = state.trainer.total_steps();
            if handle.cancel.swap(false, Ordering::SeqCst) {
                break StepEnd::Cancelled("cancelled by sdti_trainer_cancel".into());
            }
            if out.steps_done >= steps || out.step >= out.total_steps {
                break StepEnd::Done;
            }
            if out.steps_done == 0 && state.trainer.image_count() == 0 {
                return Err(fail(
                    SDTI_ERR_STATE,
                    "no images were added: call sdti_trainer_add_image first",
                ));
            }
            let result = poison_on_panic(&handle, || state.one_step());
            let s = match result {
                Ok(s) => s,
                Err(f) if f.status == SDTI_CANCELLED => {
                    handle.cancel.store(false, Ordering::SeqCst);
                    break StepEnd::Cancelled("cancelled by sdti_trainer_cancel".into());
                }
                Err(f) => return Err(f),
            };
            out.steps_done += 1;
            out.step = s.step;
            out.loss = f64::from(s.loss);
            out.learning_rate = s.learning_rate;
            out.seconds += s.seconds;
            let callback = state.callback;
            if let Some(func) = callback.func {
                let progress = progress_of(&s, out.steps_done, out.total_steps);
                // Unlocked during the callback, so that it may use this handle.
                drop(guard);
                // SAFETY: the host's callback with the host's user data, on its thread.
                let rc = unsafe { func(callback.user_data, &progress) };
                guard = lock_state(&handle, "trainer", true).or_else(|f| {
                    if f.status == SDTI_ERR_INVALID_HANDLE {
                        // Freed by the callback: stop without touching the state.
                        Ok(handle.state.lock().unwrap_or_else(|p| p.into_inner()))
                    } else {
                        Err(f)
                    }
                })?;
                if rc != 0 {
                    handle.cancel.store(false, Ordering::SeqCst);
                    break StepEnd::Cancelled(format!(
                        "cancelled by the progress callback (it returned {rc})"
                    ));
                }
            }
        };
        drop(guard);
        if !stats.is_null() {
            // SAFETY: writable by contract; struct_size checked above.
            unsafe { write_versioned(stats, &out, STATS_V1, "stats") }?;
        }
        match end {
            StepEnd::Done => Ok(()),
            StepEnd::Cancelled(why) => Err(fail(
                SDTI_CANCELLED,
                format!("{why} after {} step(s) of this call", out.steps_done),
            )),
        }
    })
}

/// Asks a running (or the next) `sdti_trainer_step` to stop: it returns `SDTI_CANCELLED`
/// after the micro-batch in flight (one step of the tiny test model is ~0.1 s), keeping
/// the steps done. The request is consumed by the step call it stops; cancelling twice
/// is the same as once. NULL and freed handles are ignored.
///
/// `[thread-safe]`
#[no_mangle]
pub extern "C" fn sdti_trainer_cancel(trainer: *mut sdti_trainer) {
    call_void(|| {
        if let Ok(handle) = TRAINERS.get(trainer as usize) {
            handle.cancel.store(true, Ordering::SeqCst);
        }
    });
}

/// Writes the learned word to `path` as `format`, refusing to replace anything at `path`:
/// `sdti_trainer_export_ex` with `flags` 0.
///
/// # Safety
/// `path` is a NUL-terminated string.
///
/// `[one thread at a time per handle]`
#[no_mangle]
pub unsafe extern "C" fn sdti_trainer_export(
    trainer: *mut sdti_trainer,
    path: *const c_char,
    format: sdti_format,
) -> sdti_status {
    // SAFETY: forwarded contract.
    unsafe { sdti_trainer_export_ex(trainer, path, format, 0) }
}

/// Writes the learned word to `path` as `format` (`SDTI_FORMAT_*`; `SDTI_FORMAT_AUTO`
/// picks it from the extension: `.pt` A1111, `.safetensors` A1111/kohya `emb_params`
/// (for an SDXL word `{clip_l, clip_g}`, `SDTI_FORMAT_SDXL_SAFETENSORS`), `.bin`
/// diffusers, `.png` A1111 PNG), in f32, atomically. `flags`: 0, or
/// `SDTI_WRITE_OVERWRITE` to replace what is at `path`. An SDXL word is written by the
/// formats that hold both its tables: `SDTI_FORMAT_SDXL_SAFETENSORS`, `_KOHYA_PT`,
/// `_ONETRAINER` and `_DIFFUSERS_SDXL` (two files, see its constant).
///
/// Statuses: `SDTI_ERR_EXISTS` (something is at `path`, a dangling symlink included, and
/// `flags` is 0), `SDTI_ERR_INVALID_ARGUMENT` (unknown format or flag),
/// `SDTI_ERR_UNSUPPORTED` (a read-only format, a one-table format for an SDXL word or an
/// SDXL format for an SD 1.x/2.x word), `SDTI_ERR_IO` (unwritable path).
///
/// # Safety
/// `path` is a NUL-terminated string.
///
/// `[one thread at a time per handle]`
#[no_mangle]
pub unsafe extern "C" fn sdti_trainer_export_ex(
    trainer: *mut sdti_trainer,
    path: *const c_char,
    format: sdti_format,
    flags: sdti_write_flags,
) -> sdti_status {
    with_state(&TRAINERS, trainer as usize, |state| {
        // SAFETY: NUL-terminated by contract.
        let path = unsafe { cpath(path, "path") }?;
        let sdxl = state.trainer.model().config.family == crate::embedding::Family::Sdxl;
        let format = format_for(format, &path, sdxl)?;
        let existing = existing_for(flags)?;
        state
            .trainer
            .export(&path, format, Precision::F32, existing)?;
        Ok(())
    })
}

/// Writes a checkpoint (vectors, optimizer moments, step, RNG states, options) to
/// `path`, atomically. Resume it with `params.resume_checkpoint`.
///
/// # Safety
/// `path` is a NUL-terminated string.
///
/// `[one thread at a time per handle]`
#[no_mangle]
pub unsafe extern "C" fn sdti_trainer_save_checkpoint(
    trainer: *mut sdti_trainer,
    path: *const c_char,
) -> sdti_status {
    with_state(&TRAINERS, trainer as usize, |state| {
        // SAFETY: NUL-terminated by contract.
        let path = unsafe { cpath(path, "path") }?;
        state.trainer.save_checkpoint(&path)?;
        Ok(())
    })
}

/// Copies the current vectors (`[rows, dim]` f32, row-major) into `out` (`cap` floats).
/// `*needed_floats` and `*rows` (each optional) get the size; with `out` NULL or `cap`
/// too small the call returns `SDTI_ERR_BUFFER_TOO_SMALL` after writing them. For SDXL
/// this is the `clip_l` table; `sdti_trainer_get_part_vectors` gives either.
///
/// # Safety
/// `out` is NULL or `cap` writable floats; `needed_floats` and `rows` NULL or writable.
///
/// `[one thread at a time per handle]`
#[no_mangle]
pub unsafe extern "C" fn sdti_trainer_get_vectors(
    trainer: *mut sdti_trainer,
    out: *mut f32,
    cap: usize,
    needed_floats: *mut usize,
    rows: *mut u32,
) -> sdti_status {
    // SAFETY: forwarded contract.
    unsafe {
        sdti_trainer_get_part_vectors(
            trainer,
            0,
            out,
            cap,
            needed_floats,
            rows,
            std::ptr::null_mut(),
        )
    }
}

/// Copies the current vectors of one table (`[rows, dim]` f32, row-major) into `out`
/// (`cap` floats): `part` 0 is the only table of SD 1.x and 2.x words; SDXL words have
/// `clip_l` (0) and `clip_g` (1), in the order of `sdti_encoder_part_dims`.
/// `*needed_floats`, `*rows` and `*dim` (each optional) get the size; with `out` NULL or
/// `cap` too small the call returns `SDTI_ERR_BUFFER_TOO_SMALL` after writing them.
/// Since ABI 1.4.
///
/// Statuses: `SDTI_ERR_INVALID_ARGUMENT` (`part` beyond the word's tables).
///
/// # Safety
/// `out` is NULL or `cap` writable floats; `needed_floats`, `rows` and `dim` NULL or
/// writable.
///
/// `[one thread at a time per handle]`
#[no_mangle]
pub unsafe extern "C" fn sdti_trainer_get_part_vectors(
    trainer: *mut sdti_trainer,
    part: u32,
    out: *mut f32,
    cap: usize,
    needed_floats: *mut usize,
    rows: *mut u32,
    dim: *mut u32,
) -> sdti_status {
    with_state(&TRAINERS, trainer as usize, |state| {
        let emb = state.trainer.embedding()?;
        let count = emb.parts.len();
        let Some(table) = emb.parts.get(part as usize) else {
            return Err(invalid(format!(
                "part {part}: this {} word has {count} table(s) (0..{count})",
                state.trainer.model().config.family.model_name()
            )));
        };
        // SAFETY: writable by contract.
        unsafe {
            if !rows.is_null() {
                rows.write(table.vectors as u32);
            }
            if !dim.is_null() {
                dim.write(table.dim as u32);
            }
        }
        // SAFETY: the caller's contract.
        unsafe { write_slice(&table.data, out, cap, needed_floats, "vectors") }
    })
}

/// Draws what the word does now: `prompt` (NULL or `""`: `"a photo of {}"`; `{}` and the
/// run's token both stand for the word; read as A1111 reads prompts, weights included,
/// as `sdti train`'s previews read theirs) with the run's current vectors (SDXL: both
/// tables, the pooled vector and the time ids), its clip skip, prediction type and
/// zero-terminal-SNR schedule, by DDIM from the noise of `seed` with guidance 7.5 and an
/// empty negative prompt (zeros for SDXL, as diffusers and A1111), what `sdti train`'s
/// previews draw. `steps`: DDIM steps, 1..=1000, or 0 for 20 (the CLI's previews).
/// `size`: the square's side in pixels, a multiple of 8 in 64..=4096, or 0 for the run's
/// resolution. The same arguments on the same vectors draw the same bytes; training is
/// not changed by a preview (no random state of the run is used). A resumed run's
/// checkpoint is restored at its first step: before that a preview draws the initial
/// word. Since ABI 1.5.
///
/// The picture goes into `rgb` as tightly packed RGB8 rows, `*width * *height * 3` bytes.
/// `*width` and `*height` (each optional) get its size first: with `rgb` NULL or `cap`
/// smaller than that, the call returns `SDTI_ERR_BUFFER_TOO_SMALL` without drawing (a
/// size query is cheap). Drawing takes `steps` guided UNet passes and a VAE decode (the
/// VAE read again from the model's files after a step freed it, as for
/// `sdti_trainer_add_image`).
///
/// It may be called from the progress callback (the handle is unlocked there), which is
/// how a host shows the word while it trains.
///
/// Statuses: `SDTI_ERR_INVALID_ARGUMENT` (`steps`, `size`, a prompt whose weights A1111
/// cannot read; the message names it), `SDTI_ERR_INVALID_UTF8` (`prompt`),
/// `SDTI_ERR_BUFFER_TOO_SMALL`, `SDTI_ERR_COMPUTE`, `SDTI_ERR_BUSY` (a call on another
/// thread holds the trainer).
///
/// # Safety
/// `prompt` is NULL or NUL-terminated; `rgb` is NULL or `cap` writable bytes; `width` and
/// `height` are NULL or writable.
///
/// `[one thread at a time per handle]`, and from the progress callback of a
/// `sdti_trainer_step` on the same handle.
#[no_mangle]
pub unsafe extern "C" fn sdti_trainer_preview(
    trainer: *mut sdti_trainer,
    prompt: *const c_char,
    seed: u64,
    steps: u32,
    size: u32,
    rgb: *mut u8,
    cap: usize,
    width: *mut u32,
    height: *mut u32,
) -> sdti_status {
    with_state(&TRAINERS, trainer as usize, |state| {
        // SAFETY: NULL or NUL-terminated by contract.
        let prompt = unsafe { opt_cstr(prompt, "prompt") }?;
        // What `sdti train` draws its previews with.
        let defaults = PreviewSettings::default();
        let steps = if steps == 0 {
            defaults.steps
        } else if steps > 1000 {
            return Err(invalid(format!(
                "steps {steps} is more than 1000 (0 picks {})",
                defaults.steps
            )));
        } else {
            steps as usize
        };
        let side = if size == 0 {
            state.trainer.resolution()
        } else {
            if !(64..=4096).contains(&size) || !size.is_multiple_of(8) {
                return Err(invalid(format!(
                    "size {size} must be a multiple of 8 in 64..=4096, or 0 for the run's resolution"
                )));
            }
            size as usize
        };
        let bytes = side * side * 3;
        // SAFETY: NULL or writable by contract.
        unsafe {
            if !width.is_null() {
                width.write(side as u32);
            }
            if !height.is_null() {
                height.write(side as u32);
            }
        }
        if rgb.is_null() || cap < bytes {
            return Err(fail(
                SDTI_ERR_BUFFER_TOO_SMALL,
                format!(
                    "rgb: a {side}x{side} preview needs {bytes} bytes, the buffer holds {}",
                    if rgb.is_null() { 0 } else { cap }
                ),
            ));
        }
        let trainer = &state.trainer;
        let opts = SampleOptions {
            prompt: prompt
                .unwrap_or(&defaults.prompt)
                .replace("{}", &trainer.config().token),
            prediction_type: Some(trainer.noise_schedule().prediction_type()),
            zero_terminal_snr: Some(trainer.zero_terminal_snr()),
            steps,
            guidance: defaults.guidance,
            empty_negative: defaults.empty_negative,
            seed,
            width: side,
            height: side,
            ..SampleOptions::default()
        };
        let image = draw_with_vectors(trainer, &opts)?;
        let pixels = image.as_raw();
        if pixels.len() != bytes {
            return Err(fail(
                SDTI_ERR_COMPUTE,
                format!(
                    "the preview came out {}x{}, not {side}x{side}",
                    image.width(),
                    image.height()
                ),
            ));
        }
        // SAFETY: `rgb` has `cap >= bytes` writable bytes.
        unsafe { std::ptr::copy_nonoverlapping(pixels.as_ptr(), rgb, bytes) };
        Ok(())
    })
}

/// Ends the run: stops a `sdti_trainer_step` running on another thread (waiting for its
/// micro-batch), then releases everything. The progress callback is never called after
/// this returns. `NULL`, and a handle freed already, are no-ops. Encoders made with
/// `sdti_encoder_new_from_trainer` stay valid (they share the model, not the trainer).
///
/// `[one thread at a time per handle]`, except that it may be called while
/// `sdti_trainer_step` runs on another thread: it stops that step first.
#[no_mangle]
pub extern "C" fn sdti_trainer_free(trainer: *mut sdti_trainer) {
    free_handle(&TRAINERS, trainer as usize);
}

/// Test hook (debug builds only, not in the header): panics inside a trainer call, to
/// test the panic boundary and poisoning.
///
/// `[one thread at a time per handle]`
#[cfg(debug_assertions)]
#[doc(hidden)]
#[no_mangle]
pub extern "C" fn sdti_debug_panic_trainer(trainer: *mut sdti_trainer) -> sdti_status {
    with_state(&TRAINERS, trainer as usize, |_| {
        panic!("sdti_debug_panic_trainer was called")
    })
}
