//! Trainer parameters revision 3 (ABI 1.5): the prediction type, zero terminal SNR, clip
//! skip and random crop from a C host, and `SDTI_ERR_MEMORY`, a run that cannot fit
//! refused before its weights are read; the same from the command line.

use std::path::Path;

use sdti::ffi::*;

use crate::cli::{fails, ok, pictures, s, tiny_train_args};
use crate::common::fixture;
use crate::ffi::{add_pictures, expect, new_trainer, path_c, stats, tiny_params};

/// `sdti_trainer_prediction` of a run.
fn prediction(t: *mut sdti_trainer) -> (sdti_prediction, sdti_zero_snr) {
    let (mut p, mut z) = (u32::MAX, u32::MAX);
    // SAFETY: a live handle and writable outs.
    let rc = unsafe { sdti_trainer_prediction(t, &mut p, &mut z) };
    expect(rc, SDTI_OK, "trainer_prediction");
    (p, z)
}

/// A failing `sdti_trainer_new`'s status and message.
fn refused(p: &sdti_trainer_params, want: sdti_status, what: &str) -> String {
    let mut t = std::ptr::null_mut();
    // SAFETY: valid params and out pointer.
    let rc = unsafe { sdti_trainer_new(p, &mut t) };
    let msg = expect(rc, want, what);
    assert!(t.is_null(), "{what}: no handle on failure");
    msg
}

#[test]
fn params_revision_3_defaults_and_size() {
    let (p, _s) = tiny_params("rev-three");
    assert_eq!(
        p.struct_size as usize,
        std::mem::size_of::<sdti_trainer_params>()
    );
    #[cfg(target_pointer_width = "64")]
    assert_eq!(p.struct_size, 152);
    assert_eq!(p.prediction_type, SDTI_PREDICTION_MODEL);
    assert_eq!(p.zero_terminal_snr, SDTI_ZERO_SNR_MODEL);
    assert_eq!(p.clip_skip, 0);
    assert_eq!(p.random_crop, 0);
    assert_eq!(sdti_abi_version() & 0xffff, 5);
}

#[test]
fn prediction_and_zero_snr_overrides_reach_the_run() {
    let (mut p, _s) = tiny_params("pred-word");
    // The tiny SD 1.x folder's scheduler config says epsilon, no zero SNR.
    let t = new_trainer(&p);
    assert_eq!(prediction(t), (SDTI_PREDICTION_EPSILON, SDTI_ZERO_SNR_OFF));
    sdti_trainer_free(t);

    p.prediction_type = SDTI_PREDICTION_V;
    p.zero_terminal_snr = SDTI_ZERO_SNR_ON;
    let t = new_trainer(&p);
    assert_eq!(prediction(t), (SDTI_PREDICTION_V, SDTI_ZERO_SNR_ON));
    // Either out may be NULL.
    let mut only = 0;
    // SAFETY: a live handle, one writable out.
    let rc = unsafe { sdti_trainer_prediction(t, &mut only, std::ptr::null_mut()) };
    expect(rc, SDTI_OK, "prediction only");
    assert_eq!(only, SDTI_PREDICTION_V);
    // The run trains with it: a step of v-prediction on a zero-SNR schedule is finite.
    add_pictures(t, 2);
    let mut st = stats();
    // SAFETY: a live handle and a sized stats struct.
    expect(unsafe { sdti_trainer_step(t, 1, &mut st) }, SDTI_OK, "step");
    assert!(st.loss.is_finite() && st.loss > 0.0, "{}", st.loss);
    sdti_trainer_free(t);

    p.prediction_type = 7;
    let m = refused(&p, SDTI_ERR_INVALID_ARGUMENT, "prediction 7");
    assert!(m.contains("params.prediction_type 7"), "{m}");
    p.prediction_type = SDTI_PREDICTION_MODEL;
    p.zero_terminal_snr = 3;
    let m = refused(&p, SDTI_ERR_INVALID_ARGUMENT, "zero snr 3");
    assert!(m.contains("params.zero_terminal_snr 3"), "{m}");
}

#[test]
fn clip_skip_and_random_crop_from_the_params() {
    let (mut p, _s) = tiny_params("skip-word");
    p.clip_skip = 2;
    let t = new_trainer(&p);
    let mut enc = std::ptr::null_mut();
    // SAFETY: a live trainer and a writable out.
    let rc = unsafe { sdti_encoder_new_from_trainer(t, &mut enc) };
    expect(rc, SDTI_OK, "encoder from trainer");
    let mut skip = 0;
    // SAFETY: a live encoder and a writable out.
    expect(
        unsafe { sdti_encoder_clip_skip(enc, &mut skip) },
        SDTI_OK,
        "clip_skip",
    );
    assert_eq!(skip, 2, "the encoder conditions as the run trains");
    sdti_encoder_free(enc);
    sdti_trainer_free(t);

    // The tiny text encoder has 12 layers (its config), so 13 is refused by name.
    p.clip_skip = 13;
    let m = refused(&p, SDTI_ERR_INVALID_ARGUMENT, "clip skip 13");
    assert!(m.contains("clip_skip") && m.contains("13"), "{m}");

    p.clip_skip = 0;
    p.random_crop = 2;
    let m = refused(&p, SDTI_ERR_INVALID_ARGUMENT, "random crop 2");
    assert!(m.contains("params.random_crop 2"), "{m}");
    p.random_crop = 1;
    let t = new_trainer(&p);
    sdti_trainer_free(t);
}

#[test]
fn revision_2_hosts_get_the_new_defaults() {
    let (mut p, _s) = tiny_params("old-host");
    // An ABI 1.3/1.4 host's struct ends at memory_budget_mib: the fields after it hold
    // garbage the library must not read.
    p.struct_size = std::mem::offset_of!(sdti_trainer_params, prediction_type) as u32;
    p.prediction_type = 99;
    p.zero_terminal_snr = 99;
    p.clip_skip = 99;
    p.random_crop = 99;
    let t = new_trainer(&p);
    assert_eq!(prediction(t), (SDTI_PREDICTION_EPSILON, SDTI_ZERO_SNR_OFF));
    sdti_trainer_free(t);
}

/// Copies the tiny SD 1.x folder into `dir`, with the UNet's `conv_out.bias` declared
/// `[2, 2]` instead of `[4]` in its safetensors header (same bytes): the configuration
/// and the index are fine, building the UNet from the weights fails.
fn tiny_sd_with_a_bad_unet_weight(dir: &Path) {
    let src = fixture("tiny-sd");
    for sub in ["scheduler", "text_encoder", "tokenizer", "unet", "vae"] {
        std::fs::create_dir_all(dir.join(sub)).expect("mkdir");
        for entry in std::fs::read_dir(src.join(sub)).expect("fixture folder") {
            let entry = entry.expect("entry");
            std::fs::copy(entry.path(), dir.join(sub).join(entry.file_name())).expect("copy");
        }
    }
    std::fs::copy(src.join("model_index.json"), dir.join("model_index.json")).expect("copy");
    let path = dir.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&path).expect("read unet");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).expect("UTF-8 header");
    let at = header
        .find("\"conv_out.bias\":{")
        .expect("conv_out.bias in the header");
    let shape = at
        + header[at..]
            .find("\"shape\":[4]")
            .expect("conv_out.bias is [4]");
    let patched = format!(
        "{}\"shape\":[2,2]{}",
        &header[..shape],
        &header[shape + "\"shape\":[4]".len()..]
    );
    let mut out = (patched.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(patched.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&path, out).expect("write unet");
}

#[test]
fn a_run_that_cannot_fit_is_refused_before_the_weights_are_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    tiny_sd_with_a_bad_unet_weight(dir.path());
    let (mut p, _s) = tiny_params("too-big");
    let model = path_c(dir.path());
    p.model_path = model.as_ptr();
    // Reading the weights finds the bad one...
    let m = refused(&p, SDTI_ERR_MODEL, "bad weight");
    assert!(m.contains("conv_out"), "{m}");
    // ...but a run that cannot fit never gets there: refused from the headers.
    p.memory_budget_mib = 1;
    let m = refused(&p, SDTI_ERR_MEMORY, "1 MiB budget");
    assert!(m.contains("training SD 1.x at 64x64 px, batch 1"), "{m}");
    assert!(m.contains("even with recompute on"), "{m}");
    assert!(m.contains("; 1 MiB the memory budget"), "{m}");
    // SAFETY: a static string.
    let name = unsafe { std::ffi::CStr::from_ptr(sdti_status_str(SDTI_ERR_MEMORY)) };
    assert_eq!(name.to_str(), Ok("not enough memory for the job"));
}

#[test]
fn the_command_line_overrides_and_refuses_the_same() {
    let dir = tempfile::tempdir().expect("tempdir");
    let images = pictures(dir.path(), 2);
    let bad = dir.path().join("bad-model");
    tiny_sd_with_a_bad_unet_weight(&bad);
    let run = dir.path().join("run");
    let mut args = tiny_train_args(&images, &run, &["--memory-budget", "1"]);
    let model_at = args.iter().position(|a| a == "--model").expect("--model") + 1;
    args[model_at] = s(&bad);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let line = fails(&args, "training SD 1.x at 64x64 px, batch 1");
    assert!(line.contains("even with recompute on"), "{line}");
    assert!(line.contains("--memory-budget"), "{line}");
    assert!(!run.exists(), "nothing is written for a refused run");

    // v-prediction on a zero-SNR schedule, recorded in the run's config.
    let args = tiny_train_args(
        &images,
        &run,
        &[
            "--steps",
            "1",
            "--prediction-type",
            "v_prediction",
            "--zero-terminal-snr",
            "on",
            "--preview-every",
            "0",
        ],
    );
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("config.json")).expect("config.json"),
    )
    .expect("JSON");
    assert_eq!(
        config["train"]["prediction_type"], "v_prediction",
        "{config}"
    );
    assert_eq!(config["train"]["zero_terminal_snr"], true, "{config}");
}
