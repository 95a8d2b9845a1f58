//! sdti_trainer_preview: a C host draws what the word does while it trains: the size
//! query, the picture's size, seeds, the word changing as it trains, calls from the
//! progress callback, the run's prediction type and zero-SNR schedule (the same picture
//! as `sdti sample` draws with the exported word and those flags), SDXL, and misuse.

use std::ffi::{c_void, CStr, CString};

use sdti::ffi::*;

use crate::cli::{ok, s};
use crate::common::fixture;
use crate::ffi::{add_pictures, c, expect, new_trainer, path_c, stats, tiny_params};

/// DDIM steps of the previews here: few, the tiny model draws noise-like pictures anyway.
const STEPS: u32 = 4;

/// `sdti_trainer_preview` into a buffer sized by its own size query: (RGB8, width, height).
fn preview(
    t: *mut sdti_trainer,
    prompt: Option<&CStr>,
    seed: u64,
    steps: u32,
    size: u32,
) -> (Vec<u8>, u32, u32) {
    let prompt = prompt.map_or(std::ptr::null(), CStr::as_ptr);
    let (mut w, mut h) = (0u32, 0u32);
    // SAFETY: a size query: NULL pixels, writable sizes.
    let rc = unsafe {
        sdti_trainer_preview(
            t,
            prompt,
            seed,
            steps,
            size,
            std::ptr::null_mut(),
            0,
            &mut w,
            &mut h,
        )
    };
    let msg = expect(rc, SDTI_ERR_BUFFER_TOO_SMALL, "size query");
    assert!(
        msg.contains(&format!("{}", w as usize * h as usize * 3)),
        "{msg}"
    );
    let mut rgb = vec![0u8; w as usize * h as usize * 3];
    let (mut w2, mut h2) = (0u32, 0u32);
    // SAFETY: a buffer of the size asked for, writable sizes.
    let rc = unsafe {
        sdti_trainer_preview(
            t,
            prompt,
            seed,
            steps,
            size,
            rgb.as_mut_ptr(),
            rgb.len(),
            &mut w2,
            &mut h2,
        )
    };
    expect(rc, SDTI_OK, "preview");
    assert_eq!((w2, h2), (w, h));
    (rgb, w, h)
}

fn differ(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x != y).count()
}

#[test]
fn preview_sizes_seeds_and_training() {
    let (mut p, _s) = tiny_params("pre-word");
    // A fast learning rate, so that three steps change the word's picture for sure.
    let lr = c("0.1");
    p.learning_rate = lr.as_ptr();
    let t = new_trainer(&p);

    // The size query: the run's resolution (64) for size 0, the asked size otherwise.
    for (size, side) in [(0u32, 64u32), (72, 72), (128, 128)] {
        let (mut w, mut h) = (0u32, 0u32);
        // SAFETY: NULL pixels, writable sizes.
        let rc = unsafe {
            sdti_trainer_preview(
                t,
                std::ptr::null(),
                0,
                STEPS,
                size,
                std::ptr::null_mut(),
                0,
                &mut w,
                &mut h,
            )
        };
        let msg = expect(rc, SDTI_ERR_BUFFER_TOO_SMALL, "size query");
        assert_eq!((w, h), (side, side), "size {size}");
        assert!(msg.contains(&format!("{}", side * side * 3)), "{msg}");
    }
    // One byte short: nothing is drawn or written.
    let mut short = vec![7u8; 64 * 64 * 3 - 1];
    // SAFETY: a buffer of its length; NULL sizes are allowed.
    let rc = unsafe {
        sdti_trainer_preview(
            t,
            std::ptr::null(),
            0,
            STEPS,
            0,
            short.as_mut_ptr(),
            short.len(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    let msg = expect(rc, SDTI_ERR_BUFFER_TOO_SMALL, "short buffer");
    assert!(msg.contains("12288") && msg.contains("12287"), "{msg}");
    assert!(short.iter().all(|&b| b == 7), "a short buffer was written");

    // Drawn before any image was added or step done: the initial word.
    let (first, w, h) = preview(t, None, 1, STEPS, 0);
    assert_eq!((w, h, first.len()), (64, 64, 64 * 64 * 3));
    let (wide, w, h) = preview(t, None, 1, STEPS, 96);
    assert_eq!((w, h, wide.len()), (96, 96, 96 * 96 * 3));
    // Not a flat picture.
    assert!(
        first.iter().max() > first.iter().min(),
        "the preview is flat"
    );
    // The same seed draws the same bytes; another seed another picture.
    assert_eq!(preview(t, None, 1, STEPS, 0).0, first);
    let other = preview(t, None, 2, STEPS, 0).0;
    assert!(
        differ(&first, &other) > first.len() / 4,
        "seed 2 drew nearly seed 1's picture"
    );
    // NULL, "" and the default prompt with {} or the token are the same prompt.
    let spelled = [c(""), c("a photo of {}"), c("a photo of pre-word")];
    for prompt in &spelled {
        assert_eq!(preview(t, Some(prompt), 1, STEPS, 0).0, first, "{prompt:?}");
    }
    let elsewhere = c("a painting of {} on a table");
    assert_ne!(preview(t, Some(&elsewhere), 1, STEPS, 0).0, first);
    // More steps: another picture of the same noise.
    assert_ne!(preview(t, None, 1, STEPS + 2, 0).0, first);

    // As the word trains its picture changes; previews do not change the training.
    add_pictures(t, 2);
    let mut st = stats();
    // SAFETY: a live handle and a sized stats struct.
    expect(unsafe { sdti_trainer_step(t, 3, &mut st) }, SDTI_OK, "step");
    let trained = preview(t, None, 1, STEPS, 0).0;
    assert!(
        differ(&first, &trained) > 0,
        "three steps at lr 0.1 left the picture as it was"
    );
    assert_eq!(preview(t, None, 1, STEPS, 0).0, trained);
    sdti_trainer_free(t);
}

/// What the progress callback of `from_callback` collects.
struct Drawn {
    trainer: *mut sdti_trainer,
    pictures: Vec<(u64, Vec<u8>)>,
    statuses: Vec<sdti_status>,
}

/// A progress callback that draws a preview after every step, on the trainer whose
/// `sdti_trainer_step` is running (the handle is unlocked during the callback).
unsafe extern "C" fn from_callback(user: *mut c_void, progress: *const sdti_progress) -> i32 {
    // SAFETY: the test passes a live `Drawn` as the user data, and the progress is valid
    // during the callback.
    let (drawn, step) = unsafe { (&mut *user.cast::<Drawn>(), (*progress).step) };
    let mut rgb = vec![0u8; 64 * 64 * 3];
    // SAFETY: a buffer of its length; NULL sizes.
    let rc = unsafe {
        sdti_trainer_preview(
            drawn.trainer,
            std::ptr::null(),
            3,
            STEPS,
            0,
            rgb.as_mut_ptr(),
            rgb.len(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    drawn.statuses.push(rc);
    drawn.pictures.push((step, rgb));
    0
}

fn vectors(t: *mut sdti_trainer) -> Vec<f32> {
    let mut out = vec![0f32; 2 * 32];
    let mut needed = 0usize;
    // SAFETY: a buffer of its length and writable sizes.
    let rc = unsafe {
        sdti_trainer_get_vectors(
            t,
            out.as_mut_ptr(),
            out.len(),
            &mut needed,
            std::ptr::null_mut(),
        )
    };
    expect(rc, SDTI_OK, "get_vectors");
    assert_eq!(needed, out.len());
    out
}

#[test]
fn preview_from_the_progress_callback_is_the_preview_between_steps() {
    // Owned through a raw pointer while the library holds it as user data.
    let drawn = Box::into_raw(Box::new(Drawn {
        trainer: std::ptr::null_mut(),
        pictures: Vec::new(),
        statuses: Vec::new(),
    }));
    let (mut p, _s) = tiny_params("cb-word");
    p.progress = Some(from_callback);
    p.progress_user_data = drawn.cast();
    let t = new_trainer(&p);
    // SAFETY: the library calls back only during sdti_trainer_step, not now.
    unsafe { (*drawn).trainer = t };
    add_pictures(t, 2);
    let mut st = stats();
    // SAFETY: a live handle and a sized stats struct.
    expect(unsafe { sdti_trainer_step(t, 3, &mut st) }, SDTI_OK, "step");
    let with_previews = vectors(t);
    sdti_trainer_free(t);
    // SAFETY: from Box::into_raw above; the trainer that held it is freed.
    let drawn = unsafe { Box::from_raw(drawn) };
    assert_eq!(drawn.statuses, [SDTI_OK; 3]);
    let steps: Vec<u64> = drawn.pictures.iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, [1, 2, 3]);

    // The same run without a callback, one step per call, previewed between the calls:
    // the same pictures, and the same word at the end (previews take nothing from the run).
    let (p, _s2) = tiny_params("cb-word");
    let t = new_trainer(&p);
    add_pictures(t, 2);
    for (step, picture) in &drawn.pictures {
        let mut st = stats();
        // SAFETY: a live handle and a sized stats struct.
        expect(unsafe { sdti_trainer_step(t, 1, &mut st) }, SDTI_OK, "step");
        assert_eq!(st.step, *step);
        assert!(
            preview(t, None, 3, STEPS, 0).0 == *picture,
            "step {step}: the callback's preview differs"
        );
    }
    assert_eq!(vectors(t), with_previews);
    sdti_trainer_free(t);
}

#[test]
fn preview_uses_the_runs_prediction_type_and_zero_snr() {
    // The same word (same seed and init) under three schedules: each draws its own
    // picture, so the prediction type and zero SNR each reach the sampler.
    let initial = |prediction: sdti_prediction, zero_snr: sdti_zero_snr| {
        let (mut p, _s) = tiny_params("zsnr-word");
        p.prediction_type = prediction;
        p.zero_terminal_snr = zero_snr;
        let t = new_trainer(&p);
        let picture = preview(t, None, 5, STEPS, 0).0;
        sdti_trainer_free(t);
        picture
    };
    let plain = initial(SDTI_PREDICTION_MODEL, SDTI_ZERO_SNR_MODEL);
    let v = initial(SDTI_PREDICTION_V, SDTI_ZERO_SNR_OFF);
    let v_zero_snr = initial(SDTI_PREDICTION_V, SDTI_ZERO_SNR_ON);
    assert!(
        differ(&plain, &v) > 0,
        "v-prediction drew epsilon's picture"
    );
    assert!(
        differ(&v, &v_zero_snr) > 0,
        "zero SNR drew the plain schedule's picture"
    );
    assert_eq!(initial(SDTI_PREDICTION_EPSILON, SDTI_ZERO_SNR_OFF), plain);

    // A trained v-prediction, zero-SNR word: `sdti sample` with the exported word and the
    // run's flags draws the same bytes.
    let tmp = tempfile::tempdir().unwrap();
    let (mut p, _s) = tiny_params("zsnr-word");
    p.prediction_type = SDTI_PREDICTION_V;
    p.zero_terminal_snr = SDTI_ZERO_SNR_ON;
    let t = new_trainer(&p);
    add_pictures(t, 2);
    let mut st = stats();
    // SAFETY: a live handle and a sized stats struct.
    expect(unsafe { sdti_trainer_step(t, 2, &mut st) }, SDTI_OK, "step");
    let (picture, w, h) = preview(t, None, 5, STEPS, 0);
    let word = tmp.path().join("zsnr-word.safetensors");
    let path = path_c(&word);
    // SAFETY: a live handle and a NUL-terminated path.
    let rc = unsafe { sdti_trainer_export(t, path.as_ptr(), SDTI_FORMAT_AUTO) };
    expect(rc, SDTI_OK, "export");
    sdti_trainer_free(t);

    let model = fixture("tiny-sd");
    let sample = |zero_snr: &str, out: &std::path::Path| {
        let steps = STEPS.to_string();
        ok(&[
            "sample",
            "--model",
            &s(&model),
            "--embedding",
            &s(&word),
            "--prompt",
            "a photo of zsnr-word",
            "--steps",
            &steps,
            "--width",
            "64",
            "--height",
            "64",
            "--seed",
            "5",
            "--prediction-type",
            "v_prediction",
            "--zero-terminal-snr",
            zero_snr,
            "-o",
            &s(out),
        ]);
        image::open(out).unwrap().to_rgb8()
    };
    let sampled = sample("on", &tmp.path().join("on.png"));
    assert_eq!((sampled.width(), sampled.height()), (w, h));
    assert!(
        sampled.as_raw() == &picture,
        "the preview differs from sdti sample's picture of the exported word"
    );
    // --zero-terminal-snr off: the model's plain schedule, another picture.
    let off = sample("off", &tmp.path().join("off.png"));
    assert!(
        differ(off.as_raw(), &picture) > 0,
        "sample --zero-terminal-snr on and off drew the same picture"
    );
}

#[test]
fn preview_of_an_sdxl_word() {
    let strings = [
        path_c(&fixture("tiny-sdxl")),
        c("xl-word"),
        c("toy"),
        c("cpu"),
    ];
    let (mut p, _s) = tiny_params("unused");
    p.model_path = strings[0].as_ptr();
    p.token = strings[1].as_ptr();
    p.init_text = strings[2].as_ptr();
    p.device = strings[3].as_ptr();
    let t = new_trainer(&p);
    let (first, w, h) = preview(t, None, 1, STEPS, 0);
    assert_eq!((w, h), (64, 64));
    assert_eq!(preview(t, None, 1, STEPS, 0).0, first);
    assert!(differ(&first, &preview(t, None, 2, STEPS, 0).0) > first.len() / 4);
    let lr = c("0.1");
    p.learning_rate = lr.as_ptr();
    sdti_trainer_free(t);
    let t = new_trainer(&p);
    add_pictures(t, 1);
    let mut st = stats();
    // SAFETY: a live handle and a sized stats struct.
    expect(unsafe { sdti_trainer_step(t, 2, &mut st) }, SDTI_OK, "step");
    assert!(differ(&first, &preview(t, None, 1, STEPS, 0).0) > 0);
    sdti_trainer_free(t);
}

#[test]
fn preview_misuse_is_refused_with_the_argument_named() {
    let (p, _s) = tiny_params("bad-word");
    let t = new_trainer(&p);
    // A buffer for the run's 64 px: the bad values are refused before it is looked at.
    let call = |t: *mut sdti_trainer, prompt: *const std::ffi::c_char, steps: u32, size: u32| {
        let mut rgb = vec![0u8; 64 * 64 * 3];
        // SAFETY: a buffer of its length; NULL sizes.
        unsafe {
            sdti_trainer_preview(
                t,
                prompt,
                0,
                steps,
                size,
                rgb.as_mut_ptr(),
                rgb.len(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        }
    };
    for size in [8u32, 60, 63, 4104, u32::MAX] {
        let m = expect(
            call(t, std::ptr::null(), STEPS, size),
            SDTI_ERR_INVALID_ARGUMENT,
            "size",
        );
        assert!(m.contains(&format!("size {size}")), "{m}");
    }
    let m = expect(
        call(t, std::ptr::null(), 1001, 0),
        SDTI_ERR_INVALID_ARGUMENT,
        "steps",
    );
    assert!(m.contains("steps 1001"), "{m}");
    let bad_utf8 = CString::new(vec![b'a', 0xff, b'b']).unwrap();
    let m = expect(
        call(t, bad_utf8.as_ptr(), STEPS, 0),
        SDTI_ERR_INVALID_UTF8,
        "prompt",
    );
    assert!(m.contains("prompt"), "{m}");
    // A weight the A1111 chunker reads is fine; the prompt is the encoder's to read.
    let weighted = c("a photo of ({}:1.3)");
    expect(call(t, weighted.as_ptr(), 1, 0), SDTI_OK, "weighted prompt");
    // NULL and freed handles.
    expect(
        call(std::ptr::null_mut(), std::ptr::null(), STEPS, 0),
        SDTI_ERR_INVALID_HANDLE,
        "NULL trainer",
    );
    sdti_trainer_free(t);
    expect(
        call(t, std::ptr::null(), STEPS, 0),
        SDTI_ERR_INVALID_HANDLE,
        "freed trainer",
    );
}
