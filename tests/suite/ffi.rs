//! The C ABI (src/ffi): the header, the misuse suite (in-process, through the same
//! `extern "C"` functions), and hosts that load the built library: C (dlopen, also under
//! valgrind), C++17 (linked), Rust (libloading) and Python (the ComfyUI node pack).

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sdti::ffi::*;

use crate::common::fixture;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub(crate) fn c(s: &str) -> CString {
    CString::new(s).expect("no NUL in test strings")
}

pub(crate) fn path_c(p: &Path) -> CString {
    c(p.to_str().expect("UTF-8 test path"))
}

/// This thread's last error, through `sdti_last_error`.
pub(crate) fn last_error() -> String {
    let mut buf = vec![0 as c_char; 4096];
    // SAFETY: a writable buffer of its length.
    unsafe { sdti_last_error(buf.as_mut_ptr(), buf.len(), std::ptr::null_mut()) };
    // SAFETY: sdti_last_error NUL-terminates.
    unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Asserts a status; for failures, that a message came with it. Returns the message.
#[track_caller]
pub(crate) fn expect(got: sdti_status, want: sdti_status, what: &str) -> String {
    let msg = last_error();
    assert_eq!(
        got, want,
        "{what}: got {got}, want {want}; last error: {msg}"
    );
    if want != SDTI_OK {
        assert!(!msg.is_empty(), "{what}: no message");
    }
    msg
}

/// A 64x64 RGB picture, varying with `k`.
pub(crate) fn picture(k: usize) -> Vec<u8> {
    let mut data = vec![0u8; 64 * 64 * 3];
    for y in 0..64 {
        for x in 0..64 {
            let (dx, dy) = (x as f32 - 32.0 - k as f32 * 3.0, y as f32 - 30.0);
            let inside = dx * dx + dy * dy < 300.0;
            let p = (y * 64 + x) * 3;
            data[p] = if inside { 220 } else { 30 + (k * 20) as u8 };
            data[p + 1] = if inside { 60 } else { 90 };
            data[p + 2] = if inside { 40 } else { 160 - x as u8 };
        }
    }
    data
}

/// Trainer params on the tiny model; the strings live in the returned vector.
pub(crate) fn tiny_params(token: &str) -> (sdti_trainer_params, Vec<CString>) {
    let strings = vec![path_c(&fixture("tiny-sd")), c(token), c("toy"), c("cpu")];
    let mut p = unsafe_params_init();
    p.model_path = strings[0].as_ptr();
    p.token = strings[1].as_ptr();
    p.init_text = strings[2].as_ptr();
    p.device = strings[3].as_ptr();
    p.vectors = 2;
    p.resolution = 64;
    p.max_steps = 50;
    p.seed = 7;
    (p, strings)
}

pub(crate) fn unsafe_params_init() -> sdti_trainer_params {
    let mut p = std::mem::MaybeUninit::<sdti_trainer_params>::uninit();
    // SAFETY: a writable params struct.
    assert_eq!(unsafe { sdti_trainer_params_init(p.as_mut_ptr()) }, SDTI_OK);
    // SAFETY: initialised by sdti_trainer_params_init.
    unsafe { p.assume_init() }
}

pub(crate) fn new_trainer(p: &sdti_trainer_params) -> *mut sdti_trainer {
    let mut t = std::ptr::null_mut();
    // SAFETY: valid params and out pointer.
    expect(
        unsafe { sdti_trainer_new(p, &mut t) },
        SDTI_OK,
        "trainer_new",
    );
    assert!(!t.is_null());
    t
}

pub(crate) fn add_pictures(t: *mut sdti_trainer, n: usize) {
    for k in 0..n {
        let px = picture(k);
        // SAFETY: 64x64 RGB8 pixels.
        let rc = unsafe {
            sdti_trainer_add_image(t, px.as_ptr(), 64, 64, 0, SDTI_PIXEL_RGB8, std::ptr::null())
        };
        expect(rc, SDTI_OK, "add_image");
    }
}

pub(crate) fn stats() -> sdti_step_stats {
    sdti_step_stats {
        struct_size: std::mem::size_of::<sdti_step_stats>() as u32,
        ..Default::default()
    }
}

fn vectors_of(t: *mut sdti_trainer) -> Vec<f32> {
    let mut needed = 0usize;
    // SAFETY: size query.
    let rc = unsafe {
        sdti_trainer_get_vectors(
            t,
            std::ptr::null_mut(),
            0,
            &mut needed,
            std::ptr::null_mut(),
        )
    };
    expect(rc, SDTI_ERR_BUFFER_TOO_SMALL, "vectors size query");
    let mut v = vec![0f32; needed];
    // SAFETY: a buffer of `needed` floats.
    let rc = unsafe {
        sdti_trainer_get_vectors(
            t,
            v.as_mut_ptr(),
            v.len(),
            &mut needed,
            std::ptr::null_mut(),
        )
    };
    expect(rc, SDTI_OK, "get_vectors");
    v
}

fn encoder_of(t: *mut sdti_trainer) -> *mut sdti_encoder {
    let mut e = std::ptr::null_mut();
    // SAFETY: a live trainer and an out pointer.
    expect(
        unsafe { sdti_encoder_new_from_trainer(t, &mut e) },
        SDTI_OK,
        "encoder_new_from_trainer",
    );
    e
}

fn encode(e: *mut sdti_encoder, prompt: &str) -> Vec<f32> {
    let prompt = c(prompt);
    let (mut needed, mut rows) = (0usize, 0u32);
    // SAFETY: size query.
    let rc = unsafe {
        sdti_encoder_encode(
            e,
            prompt.as_ptr(),
            std::ptr::null_mut(),
            0,
            &mut needed,
            &mut rows,
        )
    };
    expect(rc, SDTI_ERR_BUFFER_TOO_SMALL, "encode size query");
    assert_eq!(needed, rows as usize * 32, "[rows, dim] of the tiny model");
    let mut out = vec![0f32; needed];
    // SAFETY: a buffer of `needed` floats.
    let rc = unsafe {
        sdti_encoder_encode(
            e,
            prompt.as_ptr(),
            out.as_mut_ptr(),
            out.len(),
            &mut needed,
            &mut rows,
        )
    };
    expect(rc, SDTI_OK, "encode");
    assert!(out.iter().all(|v| v.is_finite()));
    out
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

// ---------------------------------------------------------------- header

/// include/sdti.h as the pinned cbindgen generates it from src/ffi.
fn generated_header() -> String {
    let config = cbindgen::Config::from_file(root().join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(root().join("src/ffi/mod.rs"))
        .generate()
        .expect("cbindgen generates the header from src/ffi");
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("the header is UTF-8")
}

#[test]
fn header_is_current() {
    let path = root().join("include/sdti.h");
    let fresh = generated_header();
    if std::env::var_os("UPDATE_HEADER").is_some() {
        std::fs::write(&path, &fresh).expect("write include/sdti.h");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "include/sdti.h is stale (src/ffi or cbindgen.toml changed): run with UPDATE_HEADER=1 cargo test header"
    );
    for needed in [
        "#define SDTI_ABI_MAJOR",
        "#define SDTI_ABI_MINOR",
        "sdti_trainer_step",
    ] {
        assert!(fresh.contains(needed), "{needed}");
    }
    assert!(
        !fresh.contains("debug_panic"),
        "test hooks stay out of the header"
    );
}

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
}

fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    text
}

const STRICT: [&str; 4] = ["-Wall", "-Wextra", "-pedantic", "-Werror"];

#[test]
fn header_compiles_as_c99_c11_and_cpp17() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("use_header.c");
    std::fs::write(
        &src,
        "#include \"sdti.h\"\n\
         #if SDTI_ABI_MAJOR != 1\n#error major\n#endif\n\
         static int32_t cb(void *u, const sdti_progress *p) { (void)u; return p->step > 10; }\n\
         int main(void) {\n\
           sdti_trainer_params p; sdti_step_stats s; sdti_trainer *t = 0; sdti_encoder *e = 0;\n\
           p.progress = cb; s.struct_size = sizeof s; (void)t; (void)e;\n\
           return (int)(sizeof p + s.struct_size) == 0;\n}\n",
    )
    .unwrap();
    let include = root().join("include");
    let mut ran = 0;
    for (compiler, std, lang) in [
        ("cc", "-std=c99", "c"),
        ("cc", "-std=c11", "c"),
        ("c++", "-std=c++17", "c++"),
    ] {
        if !have(compiler) {
            eprintln!("SKIPPED: {compiler} not found; the header was not compiled as {std}");
            continue;
        }
        run_ok(
            Command::new(compiler)
                .args(STRICT)
                .args([std, "-fsyntax-only", "-x", lang, "-I"])
                .arg(&include)
                .arg(&src),
            &format!("{compiler} {std} sdti.h"),
        );
        ran += 1;
    }
    assert!(
        ran > 0 || std::env::var_os("CI").is_none(),
        "no C compiler in CI"
    );
}

// ---------------------------------------------------------------- versions, errors

#[test]
fn versions_features_and_status_strings() {
    assert_eq!(sdti_abi_version() >> 16, SDTI_ABI_MAJOR);
    assert_eq!(sdti_abi_version() & 0xffff, SDTI_ABI_MINOR);
    // SAFETY: static NUL-terminated strings.
    let version = unsafe { CStr::from_ptr(sdti_version_string()) };
    assert_eq!(version.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    // SAFETY: live handles from this test, NUL-terminated strings and buffers of the sizes passed.
    let has = |id: &str| unsafe { sdti_has_feature(c(id).as_ptr()) };
    for id in ["sdti.train/1", "sdti.encoder/1", "sdti.formats.a1111-pt/1"] {
        assert_eq!(has(id), 1, "{id}");
    }
    assert_eq!(has("sdti.train/2"), 0);
    assert_eq!(has("sdti.train"), 0);
    assert_eq!(has("sdti.cuda/1"), i32::from(cfg!(feature = "cuda")));
    assert_eq!(has("sdti.precision.auto/1"), 1);
    assert_eq!(has("sdti.train.recompute/1"), 1);
    for id in [
        "sdti.model.sd2/1",
        "sdti.model.sdxl/1",
        "sdti.formats.diffusers-sdxl/1",
    ] {
        assert_eq!(has(id), 1, "{id} (ABI 1.4)");
    }
    for id in [
        "sdti.prompt.weights/1",
        "sdti.train.preview/1",
        "sdti.train.fit-check/1",
    ] {
        assert_eq!(has(id), 1, "{id} (ABI 1.5)");
    }
    // Since ABI 1.1 the device chooses the precision unless the host does (every other
    // test here trains through that default on the CPU, i.e. in f32).
    assert_eq!(unsafe_params_init().precision, SDTI_PRECISION_AUTO);
    let mut mp = std::mem::MaybeUninit::<sdti_model_params>::uninit();
    // SAFETY: a writable params struct.
    expect(
        unsafe { sdti_model_params_init(mp.as_mut_ptr()) },
        SDTI_OK,
        "model params",
    );
    // SAFETY: initialised above.
    assert_eq!(unsafe { mp.assume_init() }.precision, SDTI_PRECISION_AUTO);
    // SAFETY: NULL and invalid UTF-8 are answered with 0.
    assert_eq!(unsafe { sdti_has_feature(std::ptr::null()) }, 0);
    // SAFETY: live handles from this test, NUL-terminated strings and buffers of the sizes passed.
    assert_eq!(unsafe { sdti_has_feature(c"\xff\xfe".as_ptr()) }, 0);
    for code in 0..=SDTI_ERR_MEMORY {
        // SAFETY: static strings.
        let s = unsafe { CStr::from_ptr(sdti_status_str(code)) };
        assert!(
            !s.to_bytes().is_empty() && s.to_bytes() != b"unknown status",
            "{code}"
        );
    }
    // SAFETY: static string.
    assert_eq!(
        // SAFETY: live handles from this test, NUL-terminated strings and buffers of the sizes passed.
        unsafe { CStr::from_ptr(sdti_status_str(-5)) }.to_bytes(),
        b"unknown status"
    );
}

#[test]
fn last_error_is_per_thread_with_a_size_query() {
    // SAFETY: NULL params is the misuse under test.
    let rc = unsafe { sdti_trainer_new(std::ptr::null(), &mut std::ptr::null_mut()) };
    let msg = expect(rc, SDTI_ERR_INVALID_ARGUMENT, "new(NULL)");
    assert!(msg.contains("params is NULL"), "{msg}");
    let mut needed = 0usize;
    // SAFETY: NULL buffer: a size query.
    let rc = unsafe { sdti_last_error(std::ptr::null_mut(), 0, &mut needed) };
    assert_eq!(rc, SDTI_ERR_BUFFER_TOO_SMALL);
    assert_eq!(needed, msg.len() + 1);
    let mut small = [0x55 as c_char; 7];
    // SAFETY: a 7-byte buffer.
    let rc = unsafe { sdti_last_error(small.as_mut_ptr(), small.len(), &mut needed) };
    assert_eq!(rc, SDTI_ERR_BUFFER_TOO_SMALL);
    // SAFETY: truncated but NUL-terminated.
    assert_eq!(
        // SAFETY: live handles from this test, NUL-terminated strings and buffers of the sizes passed.
        unsafe { CStr::from_ptr(small.as_ptr()) }.to_bytes(),
        &msg.as_bytes()[..6]
    );
    // Another thread has its own (empty) last error.
    let other = std::thread::spawn(last_error).join().unwrap();
    assert_eq!(other, "");
    assert_eq!(last_error(), msg, "reading it does not change it");
}

// ---------------------------------------------------------------- the main paths

#[test]
fn resume_through_params_equals_a_straight_run_and_autosaves() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _s) = tiny_params("sks");
    let straight = new_trainer(&p);
    add_pictures(straight, 2);
    let mut st = stats();
    // SAFETY: live trainer, stats with struct_size.
    expect(
        unsafe { sdti_trainer_step(straight, 4, &mut st) },
        SDTI_OK,
        "4 steps",
    );
    assert_eq!((st.steps_done, st.step, st.total_steps), (4, 4, 50));
    assert!(st.loss.is_finite() && st.loss > 0.0 && st.seconds > 0.0);
    assert_eq!(st.learning_rate, 0.005);

    let out_dir = path_c(&dir.path().join("run"));
    let mut p2 = p;
    p2.output_dir = out_dir.as_ptr();
    p2.save_every = 2;
    let first = new_trainer(&p2);
    add_pictures(first, 2);
    // SAFETY: as above; NULL stats are allowed.
    expect(
        unsafe { sdti_trainer_step(first, 2, std::ptr::null_mut()) },
        SDTI_OK,
        "2 steps",
    );
    sdti_trainer_free(first);
    let ckpt = dir.path().join("run/sks.checkpoint.safetensors");
    assert!(ckpt.exists() && dir.path().join("run/sks-2.safetensors").exists());

    let ckpt_c = path_c(&ckpt);
    let mut p3 = p;
    p3.resume_checkpoint = ckpt_c.as_ptr();
    let resumed = new_trainer(&p3);
    add_pictures(resumed, 2);
    let mut st = stats();
    // SAFETY: as above.
    expect(
        unsafe { sdti_trainer_step(resumed, 2, &mut st) },
        SDTI_OK,
        "2 more steps",
    );
    assert_eq!(st.step, 4);
    assert_eq!(vectors_of(resumed), vectors_of(straight), "bit for bit");

    // A checkpoint of another run does not fit.
    let mut p4 = p3;
    p4.seed = 8;
    let other = new_trainer(&p4);
    add_pictures(other, 2);
    // SAFETY: as above.
    let msg = expect(
        unsafe { sdti_trainer_step(other, 1, std::ptr::null_mut()) },
        SDTI_ERR_CHECKPOINT,
        "resume another run's checkpoint",
    );
    assert!(msg.contains("other options"), "{msg}");
    for t in [straight, resumed, other] {
        sdti_trainer_free(t);
    }
}

#[test]
fn exported_words_register_in_every_format_and_syntax() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _s) = tiny_params("sks");
    let t = new_trainer(&p);
    add_pictures(t, 1);
    // SAFETY: live trainer.
    expect(
        unsafe { sdti_trainer_step(t, 2, std::ptr::null_mut()) },
        SDTI_OK,
        "steps",
    );
    let from_trainer = encoder_of(t);
    let want = encode(from_trainer, "a photo of sks");
    // The three prompt syntaxes name the same word.
    for prompt in ["a photo of embedding:sks", "a photo of <sks>"] {
        assert_eq!(encode(from_trainer, prompt), want, "{prompt}");
    }
    assert!(max_abs_diff(&encode(from_trainer, "a photo of cat"), &want) > 1e-4);

    let model = path_c(&fixture("tiny-sd"));
    let mut mp = std::mem::MaybeUninit::<sdti_model_params>::uninit();
    // SAFETY: writable.
    expect(
        unsafe { sdti_model_params_init(mp.as_mut_ptr()) },
        SDTI_OK,
        "init",
    );
    // SAFETY: initialised above.
    let mut mp = unsafe { mp.assume_init() };
    mp.model_path = model.as_ptr();
    let mut enc = std::ptr::null_mut();
    // SAFETY: valid params.
    expect(
        unsafe { sdti_encoder_new(&mp, &mut enc) },
        SDTI_OK,
        "encoder_new",
    );
    for (format, ext) in [
        (SDTI_FORMAT_A1111_PT, "pt"),
        (SDTI_FORMAT_SAFETENSORS, "safetensors"),
        (SDTI_FORMAT_DIFFUSERS_SAFETENSORS, "safetensors"),
        (SDTI_FORMAT_DIFFUSERS_BIN, "bin"),
        (SDTI_FORMAT_A1111_PNG, "png"),
        (SDTI_FORMAT_KOHYA_PT, "pt"),
        (SDTI_FORMAT_KOHYA_SAFETENSORS, "safetensors"),
        (SDTI_FORMAT_ONETRAINER, "safetensors"),
    ] {
        let stem = format!("word{format}");
        let file = path_c(&dir.path().join(format!("{stem}.{ext}")));
        // SAFETY: live trainer, NUL-terminated path.
        let rc = unsafe { sdti_trainer_export(t, file.as_ptr(), format) };
        expect(rc, SDTI_OK, &format!("export format {format}"));
        // Registered under its stem (A1111's naming).
        // SAFETY: live encoder, NULL token, NUL-terminated path.
        let rc = unsafe { sdti_encoder_register_token(enc, std::ptr::null(), file.as_ptr()) };
        expect(rc, SDTI_OK, &format!("register format {format}"));
        let got = encode(enc, &format!("a photo of {stem}"));
        assert_eq!(
            got, want,
            "format {format} gives the trainer's word exactly"
        );
    }
    // Convert and inspect.
    let src = path_c(&dir.path().join("word1.pt"));
    let dst = path_c(&dir.path().join("half.safetensors"));
    // SAFETY: NUL-terminated paths.
    let rc = unsafe {
        sdti_embedding_convert(
            src.as_ptr(),
            dst.as_ptr(),
            SDTI_FORMAT_AUTO,
            SDTI_PRECISION_F16,
        )
    };
    expect(rc, SDTI_OK, "convert to f16 safetensors");
    let mut needed = 0usize;
    // SAFETY: size query.
    let rc = unsafe { sdti_embedding_inspect(dst.as_ptr(), std::ptr::null_mut(), 0, &mut needed) };
    expect(rc, SDTI_ERR_BUFFER_TOO_SMALL, "inspect size query");
    let mut json = vec![0 as c_char; needed];
    // SAFETY: a buffer of `needed` bytes.
    let rc =
        unsafe { sdti_embedding_inspect(dst.as_ptr(), json.as_mut_ptr(), needed, &mut needed) };
    expect(rc, SDTI_OK, "inspect");
    // SAFETY: NUL-terminated.
    let json = unsafe { CStr::from_ptr(json.as_ptr()) }
        .to_str()
        .unwrap()
        .to_string();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["vectors"], 2, "{json}");
    assert_eq!(v["widths"], serde_json::json!([32]), "{json}");
    // SAFETY: NUL-terminated paths; an SD1 word cannot be written as SDXL.
    let rc = unsafe {
        sdti_embedding_convert(src.as_ptr(), dst.as_ptr(), SDTI_FORMAT_SDXL_SAFETENSORS, 0)
    };
    expect(rc, SDTI_ERR_UNSUPPORTED, "convert SD1 to sdxl");
    // SAFETY: live handles from this test, NUL-terminated strings and buffers of the sizes passed.
    let rc = unsafe { sdti_embedding_convert(src.as_ptr(), dst.as_ptr(), 0, SDTI_PRECISION_BF16) };
    expect(rc, SDTI_ERR_INVALID_ARGUMENT, "convert to bf16");
    let junk = path_c(&fixture("tiny-sd/model_index.json"));
    // SAFETY: NUL-terminated paths.
    let rc = unsafe { sdti_embedding_convert(junk.as_ptr(), dst.as_ptr(), 0, 0) };
    expect(rc, SDTI_ERR_EMBEDDING, "convert a JSON file");
    sdti_encoder_free(enc);
    sdti_encoder_free(from_trainer);
    sdti_trainer_free(t);
}

#[test]
fn encoder_registers_vectors_and_tokenizes_learned_slots() {
    let (p, _s) = tiny_params("sks");
    let t = new_trainer(&p);
    let e = encoder_of(t);
    sdti_trainer_free(t);
    let mut dim = 0u32;
    // SAFETY: writable.
    expect(unsafe { sdti_encoder_dim(e, &mut dim) }, SDTI_OK, "dim");
    assert_eq!(dim, 32);
    let vectors: Vec<f32> = (0..3 * 32).map(|i| (i as f32 * 0.37).sin()).collect();
    let word = c("zq-word");
    // SAFETY: 3 x 32 floats.
    let rc = unsafe { sdti_encoder_register_vectors(e, word.as_ptr(), vectors.as_ptr(), 3, 32) };
    expect(rc, SDTI_OK, "register_vectors");
    let prompt = c("a <zq-word> and sks, embedding:zq-word");
    let mut needed = 0usize;
    // SAFETY: size query.
    let rc = unsafe {
        sdti_encoder_tokenize(
            e,
            prompt.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
            &mut needed,
        )
    };
    expect(rc, SDTI_ERR_BUFFER_TOO_SMALL, "tokenize size query");
    assert_eq!(needed, 77);
    let (mut ids, mut words, mut idx) = (vec![0u32; 77], vec![0i32; 77], vec![0i32; 77]);
    // SAFETY: three buffers of 77.
    let rc = unsafe {
        sdti_encoder_tokenize(
            e,
            prompt.as_ptr(),
            ids.as_mut_ptr(),
            words.as_mut_ptr(),
            idx.as_mut_ptr(),
            77,
            &mut needed,
        )
    };
    expect(rc, SDTI_OK, "tokenize");
    assert_eq!(ids[0], 49406, "BOS");
    // "sks" was registered first (from the trainer), "zq-word" second.
    let learned: Vec<(i32, i32)> = words
        .iter()
        .zip(&idx)
        .filter(|(w, _)| **w >= 0)
        .map(|(w, i)| (*w, *i))
        .collect();
    assert_eq!(
        learned,
        [
            (1, 0),
            (1, 1),
            (1, 2),
            (0, 0),
            (0, 1),
            (1, 0),
            (1, 1),
            (1, 2)
        ]
    );
    // The dim must be the model's; NULL vectors; n out of range.
    // SAFETY: live handles from this test, NUL-terminated strings and buffers of the sizes passed.
    let rc = unsafe { sdti_encoder_register_vectors(e, word.as_ptr(), vectors.as_ptr(), 1, 768) };
    expect(rc, SDTI_ERR_INVALID_ARGUMENT, "register 768-wide vectors");
    // SAFETY: live handles from this test, NUL-terminated strings and buffers of the sizes passed.
    let rc = unsafe { sdti_encoder_register_vectors(e, word.as_ptr(), std::ptr::null(), 1, 32) };
    expect(rc, SDTI_ERR_INVALID_ARGUMENT, "register NULL vectors");
    // SAFETY: live handles from this test, NUL-terminated strings and buffers of the sizes passed.
    let rc = unsafe { sdti_encoder_register_vectors(e, word.as_ptr(), vectors.as_ptr(), 0, 32) };
    expect(rc, SDTI_ERR_INVALID_ARGUMENT, "register 0 vectors");
    let spaced = c("two words");
    // SAFETY: live handles from this test, NUL-terminated strings and buffers of the sizes passed.
    let rc = unsafe { sdti_encoder_register_vectors(e, spaced.as_ptr(), vectors.as_ptr(), 1, 32) };
    expect(
        rc,
        SDTI_ERR_INVALID_ARGUMENT,
        "register a token with a space",
    );
    // A file for another model width.
    let sd2 = path_c(&fixture("embeddings/a1111_sd2.pt"));
    // SAFETY: live handles from this test, NUL-terminated strings and buffers of the sizes passed.
    let rc = unsafe { sdti_encoder_register_token(e, std::ptr::null(), sd2.as_ptr()) };
    let msg = expect(rc, SDTI_ERR_EMBEDDING, "register an SD2 file");
    assert!(msg.contains("width"), "{msg}");
    let missing = path_c(Path::new("/nonexistent/x.pt"));
    // SAFETY: live handles from this test, NUL-terminated strings and buffers of the sizes passed.
    let rc = unsafe { sdti_encoder_register_token(e, std::ptr::null(), missing.as_ptr()) };
    expect(rc, SDTI_ERR_IO, "register a missing file");
    // Encode into a too-small buffer: the size comes back, nothing runs.
    let mut small = vec![0f32; 10];
    let (mut needed, mut rows) = (0usize, 0u32);
    // SAFETY: live handles from this test, NUL-terminated strings and buffers of the sizes passed.
    let rc = unsafe {
        sdti_encoder_encode(
            e,
            prompt.as_ptr(),
            small.as_mut_ptr(),
            10,
            &mut needed,
            &mut rows,
        )
    };
    expect(rc, SDTI_ERR_BUFFER_TOO_SMALL, "encode into 10 floats");
    assert_eq!((needed, rows), (77 * 32, 77));
    // Clip skip and chunk style.
    expect(sdti_encoder_set_clip_skip(e, 2), SDTI_OK, "clip skip 2");
    expect(
        sdti_encoder_set_clip_skip(e, 0),
        SDTI_ERR_INVALID_ARGUMENT,
        "clip skip 0",
    );
    expect(
        sdti_encoder_set_chunk_style(e, SDTI_CHUNKS_COMFYUI),
        SDTI_OK,
        "comfy chunks",
    );
    expect(
        sdti_encoder_set_chunk_style(e, 9),
        SDTI_ERR_INVALID_ARGUMENT,
        "chunk style 9",
    );
    let long = (0..100)
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ");
    assert_eq!(encode(e, &long).len() % (77 * 32), 0);
    sdti_encoder_free(e);
}

// ---------------------------------------------------------------- SD 2.x and SDXL (ABI 1.4)

/// The reference tensors of a fixture (made by diffusers/transformers), as flat f32.
fn reference(file: &str) -> std::collections::HashMap<String, Vec<f32>> {
    candle_core::safetensors::load(fixture(file), &candle_core::Device::Cpu)
        .unwrap_or_else(|e| panic!("{file}: {e}"))
        .into_iter()
        .filter(|(_, t)| t.dtype() == candle_core::DType::F32)
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

/// `||a - b|| / ||b||` in f64, the suite's relative error.
fn rel_err_f32(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let (mut diff, mut norm) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        diff += (f64::from(*x) - f64::from(*y)).powi(2);
        norm += f64::from(*y).powi(2);
    }
    (diff / norm.max(1e-300)).sqrt()
}

/// An encoder loaded from a model path (text encoders only).
pub(crate) fn encoder_at(model: &Path) -> *mut sdti_encoder {
    let mut mp = std::mem::MaybeUninit::<sdti_model_params>::uninit();
    // SAFETY: a writable params struct.
    expect(
        unsafe { sdti_model_params_init(mp.as_mut_ptr()) },
        SDTI_OK,
        "model params",
    );
    // SAFETY: initialised above.
    let mut mp = unsafe { mp.assume_init() };
    let path = path_c(model);
    mp.model_path = path.as_ptr();
    let mut e = std::ptr::null_mut();
    // SAFETY: valid params and out pointer.
    expect(
        unsafe { sdti_encoder_new(&mp, &mut e) },
        SDTI_OK,
        &format!("encoder_new {}", model.display()),
    );
    e
}

/// (family, context width, pooled width, part widths, clip skip) of an encoder.
fn encoder_shape(e: *mut sdti_encoder) -> (sdti_family, u32, u32, Vec<u32>, u32) {
    let (mut family, mut dim, mut pooled, mut skip, mut count) = (0, 0, 0, 0, 0usize);
    let mut dims = [0u32; 4];
    // SAFETY: writable out-parameters and a buffer of 4.
    unsafe {
        expect(sdti_encoder_family(e, &mut family), SDTI_OK, "family");
        expect(sdti_encoder_dim(e, &mut dim), SDTI_OK, "dim");
        expect(
            sdti_encoder_pooled_dim(e, &mut pooled),
            SDTI_OK,
            "pooled_dim",
        );
        expect(sdti_encoder_clip_skip(e, &mut skip), SDTI_OK, "clip_skip");
        expect(
            sdti_encoder_part_dims(e, dims.as_mut_ptr(), dims.len(), &mut count),
            SDTI_OK,
            "part_dims",
        );
    }
    (family, dim, pooled, dims[..count].to_vec(), skip)
}

/// The context and the pooled vector through `sdti_encoder_encode_pooled` (the size
/// query first); the pooled vector is empty for models without one.
fn encode_pooled(e: *mut sdti_encoder, prompt: &str) -> (Vec<f32>, Vec<f32>, u32) {
    let prompt = c(prompt);
    let (mut needed, mut rows, mut pooled_dim) = (0usize, 0u32, 0u32);
    // SAFETY: writable.
    expect(
        unsafe { sdti_encoder_pooled_dim(e, &mut pooled_dim) },
        SDTI_OK,
        "pooled_dim",
    );
    // SAFETY: size query.
    let rc = unsafe {
        sdti_encoder_encode_pooled(
            e,
            prompt.as_ptr(),
            std::ptr::null_mut(),
            0,
            std::ptr::null_mut(),
            0,
            &mut needed,
            &mut rows,
        )
    };
    expect(rc, SDTI_ERR_BUFFER_TOO_SMALL, "encode_pooled size query");
    let mut context = vec![f32::NAN; needed];
    let mut pooled = vec![f32::NAN; pooled_dim as usize];
    let pooled_ptr = if pooled.is_empty() {
        std::ptr::null_mut()
    } else {
        pooled.as_mut_ptr()
    };
    // SAFETY: buffers of the sizes passed.
    let rc = unsafe {
        sdti_encoder_encode_pooled(
            e,
            prompt.as_ptr(),
            context.as_mut_ptr(),
            context.len(),
            pooled_ptr,
            pooled.len(),
            &mut needed,
            &mut rows,
        )
    };
    expect(rc, SDTI_OK, "encode_pooled");
    (context, pooled, rows)
}

/// `sdti_encoder_encode` (the ABI 1.0 call) into a buffer of the needed size.
fn encode_any(e: *mut sdti_encoder, prompt: &str) -> Vec<f32> {
    let prompt = c(prompt);
    let mut needed = 0usize;
    // SAFETY: size query, then a buffer of that size.
    unsafe {
        sdti_encoder_encode(
            e,
            prompt.as_ptr(),
            std::ptr::null_mut(),
            0,
            &mut needed,
            std::ptr::null_mut(),
        );
        let mut out = vec![0f32; needed];
        expect(
            sdti_encoder_encode(
                e,
                prompt.as_ptr(),
                out.as_mut_ptr(),
                out.len(),
                &mut needed,
                std::ptr::null_mut(),
            ),
            SDTI_OK,
            "encode",
        );
        out
    }
}

/// Slot ids and word indexes of a one-chunk prompt through `sdti_encoder_tokenize`.
fn tokenize(e: *mut sdti_encoder, prompt: &str) -> (Vec<u32>, Vec<i32>) {
    let prompt = c(prompt);
    let (mut ids, mut words, mut needed) = (vec![0u32; 77], vec![0i32; 77], 0usize);
    // SAFETY: two buffers of 77.
    let rc = unsafe {
        sdti_encoder_tokenize(
            e,
            prompt.as_ptr(),
            ids.as_mut_ptr(),
            words.as_mut_ptr(),
            std::ptr::null_mut(),
            77,
            &mut needed,
        )
    };
    expect(rc, SDTI_OK, "tokenize");
    assert_eq!(needed, 77);
    (ids, words)
}

/// A reference's ids of "a photo of a sks toy" (`text_encoder_case.<key>` of `file`), with
/// the learned slots' stand-in, the end token, where the reference has 49408/49409.
fn reference_ids(file: &str, key: &str) -> Vec<u32> {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(file)).unwrap()).unwrap();
    let ids = json["text_encoder_case"][key]
        .as_array()
        .unwrap_or_else(|| panic!("{file}: text_encoder_case.{key}"));
    ids.iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .map(|id| if id >= 49408 { 49407 } else { id })
        .collect()
}

fn register_sdxl(e: *mut sdti_encoder, word: &str, l: &[f32], g: &[f32]) -> sdti_status {
    let word = c(word);
    // SAFETY: slices of the lengths passed.
    unsafe {
        sdti_encoder_register_vectors_sdxl(
            e,
            word.as_ptr(),
            l.as_ptr(),
            l.len() / 32,
            32,
            g.as_ptr(),
            g.len() / 48,
            48,
        )
    }
}

#[test]
fn sd1_encoder_has_no_pooled_vector_and_both_clip_skip_conventions() {
    let e = encoder_at(&fixture("tiny-sd"));
    assert_eq!(encoder_shape(e), (SDTI_FAMILY_SD1, 32, 0, vec![32], 1));
    let prompt = c("a photo of a toy");
    let mut pooled = [7f32; 4];
    let mut context = vec![0f32; 77 * 32];
    // SAFETY: buffers of the sizes passed.
    let rc = unsafe {
        sdti_encoder_encode_pooled(
            e,
            prompt.as_ptr(),
            context.as_mut_ptr(),
            context.len(),
            pooled.as_mut_ptr(),
            pooled.len(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    let msg = expect(rc, SDTI_ERR_UNSUPPORTED, "a pooled buffer on SD 1.x");
    assert!(msg.contains("no pooled vector"), "{msg}");
    assert_eq!(pooled, [7.0; 4], "nothing written on failure");
    // Without a pooled buffer it is the old call.
    let (ctx, no_pooled, rows) = encode_pooled(e, "a photo of a toy");
    assert!(no_pooled.is_empty());
    assert_eq!(rows, 77);
    assert_eq!(ctx, encode_any(e, "a photo of a toy"));
    // A two-part word on a one-encoder model.
    let v = vec![0.1f32; 32];
    let rc = register_sdxl(e, "w", &v, &[0.1; 48]);
    let msg = expect(rc, SDTI_ERR_INVALID_ARGUMENT, "sdxl word on SD 1.x");
    assert!(msg.contains("one part"), "{msg}");
    // ComfyUI's -1 is SD 1.x's default (the last layer), -2 A1111's clip skip 2.
    let last = encode_any(e, "a photo of a toy");
    expect(sdti_encoder_set_clip_layer(e, -2), SDTI_OK, "layer -2");
    let penultimate = encode_any(e, "a photo of a toy");
    assert!(max_abs_diff(&last, &penultimate) > 1e-3);
    expect(sdti_encoder_set_clip_skip(e, 2), SDTI_OK, "clip skip 2");
    assert_eq!(encode_any(e, "a photo of a toy"), penultimate);
    expect(sdti_encoder_set_clip_layer(e, -1), SDTI_OK, "layer -1");
    assert_eq!(encode_any(e, "a photo of a toy"), last);
    expect(
        sdti_encoder_set_clip_layer(e, 2),
        SDTI_OK,
        "layer 2 (A1111)",
    );
    assert_eq!(encode_any(e, "a photo of a toy"), penultimate);
    expect(
        sdti_encoder_set_clip_layer(e, 0),
        SDTI_OK,
        "layer 0 (the family's)",
    );
    assert_eq!(encoder_shape(e).4, 1);
    assert_eq!(encode_any(e, "a photo of a toy"), last);
    let msg = expect(
        sdti_encoder_set_clip_layer(e, -13),
        SDTI_ERR_INVALID_ARGUMENT,
        "layer -13 of 12",
    );
    assert!(msg.contains("-13"), "{msg}");
    assert_eq!(encoder_shape(e).4, 1, "a refused layer changes nothing");
    // SAFETY: NULL out-parameters are the misuse under test.
    unsafe {
        expect(
            sdti_encoder_pooled_dim(e, std::ptr::null_mut()),
            SDTI_ERR_INVALID_ARGUMENT,
            "pooled_dim NULL",
        );
        expect(
            sdti_encoder_family(e, std::ptr::null_mut()),
            SDTI_ERR_INVALID_ARGUMENT,
            "family NULL",
        );
        let mut count = 0usize;
        expect(
            sdti_encoder_part_dims(e, std::ptr::null_mut(), 0, &mut count),
            SDTI_ERR_BUFFER_TOO_SMALL,
            "part_dims size query",
        );
        assert_eq!(count, 1);
    }
    sdti_encoder_free(e);
}

#[test]
fn sd2_encoder_through_the_abi_matches_the_reference() {
    let exp = reference("tiny-sd2-expected.safetensors");
    let folder = encoder_at(&fixture("tiny-sd2"));
    assert_eq!(encoder_shape(folder), (SDTI_FAMILY_SD2, 32, 0, vec![32], 2));
    let word = c("sks");
    let v = &exp["te.vectors"];
    // SAFETY: 2 x 32 floats.
    let rc = unsafe { sdti_encoder_register_vectors(folder, word.as_ptr(), v.as_ptr(), 2, 32) };
    expect(rc, SDTI_OK, "register sks");
    let (ctx, pooled, rows) = encode_pooled(folder, "a photo of a sks toy");
    assert!(pooled.is_empty(), "SD 2.x has no pooled vector");
    // OpenCLIP's padding: 0 after the first end token.
    let (ids, words) = tokenize(folder, "a photo of a sks toy");
    assert_eq!(ids, reference_ids("tiny-sd2-expected.json", "ids"));
    assert_eq!((ids[8], ids[9], ids[76]), (49407, 0, 0));
    assert_eq!(&words[4..8], &[-1, 0, 0, -1]);
    assert_eq!(rows, 77);
    let e = rel_err_f32(&ctx, &exp["te.last_hidden_state"]);
    assert!(e <= 1e-5, "SD 2.x context: relative error {e:.3e}");
    // The 23-layer folder lacks the last block: ComfyUI's -1 is refused, -2 is the default.
    expect(
        sdti_encoder_set_clip_layer(folder, -1),
        SDTI_ERR_INVALID_ARGUMENT,
        "layer -1 on a 23-layer folder",
    );
    expect(sdti_encoder_set_clip_layer(folder, -2), SDTI_OK, "layer -2");
    assert_eq!(encode_any(folder, "a photo of a sks toy"), ctx);
    sdti_encoder_free(folder);
}

#[test]
fn sdxl_encoder_through_the_abi_matches_the_reference() {
    let exp = reference("tiny-sdxl-expected.safetensors");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny-sdxl-expected.json")).unwrap())
            .unwrap();
    let long_prompt = json["chunks_case"]["prompt"]
        .as_str()
        .expect("chunks_case.prompt")
        .replace("<sks-0> <sks-1>", "sks");
    let (l, g) = (&exp["te.vectors_l"], &exp["te.vectors_g"]);
    // The tiny single files need a configuration (their widths do not give the head
    // counts), which the C ABI does not take: the folder stands for both here.
    {
        let model = fixture("tiny-sdxl");
        let what = model.display().to_string();
        let e = encoder_at(&model);
        assert_eq!(
            encoder_shape(e),
            (SDTI_FAMILY_SDXL, 80, 48, vec![32, 48], 2),
            "{what}"
        );
        expect(register_sdxl(e, "sks", l, g), SDTI_OK, "register sks");
        let (ctx, pooled, rows) = encode_pooled(e, "a photo of a sks toy");
        assert_eq!(rows, 77);
        let err = rel_err_f32(&ctx, &exp["te.context"]);
        assert!(
            err <= 1e-5,
            "{what}: context [L || G]: relative error {err:.3e}"
        );
        let err = rel_err_f32(&pooled, &exp["te2.pooled_eos"]);
        assert!(err <= 1e-5, "{what}: pooled: relative error {err:.3e}");
        // The old call gives the same context.
        assert_eq!(encode_any(e, "a photo of a sks toy"), ctx);
        // The slots are CLIP ViT-L's (end-token padding), sks on slots 5 and 6.
        let (ids, words) = tokenize(e, "a photo of a sks toy");
        assert_eq!(ids, reference_ids("tiny-sdxl-expected.json", "ids_l"));
        assert_eq!(ids[76], 49407);
        assert_eq!(&words[4..8], &[-1, 0, 0, -1]);
        // ComfyUI's uncond (the empty prompt).
        let (ctx, pooled, _) = encode_pooled(e, "");
        assert!(
            rel_err_f32(&ctx, &exp["uncond.context"]) <= 1e-5,
            "{what}: uncond"
        );
        assert!(
            rel_err_f32(&pooled, &exp["uncond.pooled"]) <= 1e-5,
            "{what}: uncond pooled"
        );
        // Two chunks, pooled from the first.
        let (ctx, pooled, rows) = encode_pooled(e, &long_prompt);
        assert_eq!(rows, 154);
        let err = rel_err_f32(&ctx, &exp["chunks.context"]);
        assert!(err <= 1e-5, "{what}: two chunks: relative error {err:.3e}");
        let err = rel_err_f32(&pooled, &exp["chunks.pooled"]);
        assert!(
            err <= 1e-5,
            "{what}: two-chunk pooled: relative error {err:.3e}"
        );
        // ComfyUI's CLIPSetLastLayer(-1) is another layer; -2 (the default) and 0 are back.
        expect(sdti_encoder_set_clip_layer(e, -1), SDTI_OK, "layer -1");
        let (last, _, _) = encode_pooled(e, "a photo of a sks toy");
        assert!(
            rel_err_f32(&last, &exp["te.context"]) > 1e-2,
            "{what}: layer -1"
        );
        expect(sdti_encoder_set_clip_layer(e, -2), SDTI_OK, "layer -2");
        let (ctx, _, _) = encode_pooled(e, "a photo of a sks toy");
        assert!(
            rel_err_f32(&ctx, &exp["te.context"]) <= 1e-5,
            "{what}: layer -2"
        );
        sdti_encoder_free(e);
    }

    // Misuse on an SDXL encoder.
    let e = encoder_at(&fixture("tiny-sdxl"));
    let msg = expect(
        register_sdxl(e, "sks", l, &g[..48]),
        SDTI_ERR_INVALID_ARGUMENT,
        "clip_l 2 rows, clip_g 1",
    );
    assert!(
        msg.contains("2") && msg.contains("1") && msg.contains("clip_g"),
        "{msg}"
    );
    let word = c("sks");
    // SAFETY: each pointer has the floats its sizes say (or is NULL, the misuse).
    unsafe {
        let rc = sdti_encoder_register_vectors_sdxl(
            e,
            word.as_ptr(),
            l.as_ptr(),
            2,
            48,
            g.as_ptr(),
            2,
            32,
        );
        let msg = expect(rc, SDTI_ERR_INVALID_ARGUMENT, "widths swapped");
        assert!(msg.contains("clip_l") && msg.contains("32"), "{msg}");
        let rc = sdti_encoder_register_vectors_sdxl(
            e,
            word.as_ptr(),
            l.as_ptr(),
            2,
            32,
            std::ptr::null(),
            2,
            48,
        );
        expect(rc, SDTI_ERR_INVALID_ARGUMENT, "clip_g NULL");
        let rc = sdti_encoder_register_vectors_sdxl(
            e,
            word.as_ptr(),
            l.as_ptr(),
            0,
            32,
            g.as_ptr(),
            0,
            48,
        );
        expect(rc, SDTI_ERR_INVALID_ARGUMENT, "0 vectors");
        let rc = sdti_encoder_register_vectors(e, word.as_ptr(), l.as_ptr(), 2, 32);
        let msg = expect(rc, SDTI_ERR_INVALID_ARGUMENT, "one-part word on SDXL");
        assert!(msg.contains("sdti_encoder_register_vectors_sdxl"), "{msg}");
    }
    let mut non_finite = l.clone();
    non_finite[3] = f32::NAN;
    expect(
        register_sdxl(e, "sks", &non_finite, g),
        SDTI_ERR_INVALID_ARGUMENT,
        "NaN in clip_l",
    );
    // Files: an SD 1.x word and SDXL files of the real widths do not fit the tiny model.
    for (file, want) in [
        ("embeddings/a1111_sd1.pt", "clip_g"),
        ("embeddings/sdxl.safetensors", "width"),
    ] {
        let path = path_c(&fixture(file));
        // SAFETY: NUL-terminated strings.
        let rc = unsafe { sdti_encoder_register_token(e, std::ptr::null(), path.as_ptr()) };
        let msg = expect(rc, SDTI_ERR_EMBEDDING, file);
        assert!(msg.contains(want), "{file}: {msg}");
    }
    // Buffers: a short pooled buffer or context is a size error; nothing is written.
    expect(register_sdxl(e, "sks", l, g), SDTI_OK, "register sks");
    let prompt = c("a photo of a sks toy");
    let mut context = vec![5f32; 77 * 80];
    let mut pooled = vec![5f32; 47];
    let (mut needed, mut rows) = (0usize, 0u32);
    // SAFETY: buffers of the sizes passed.
    unsafe {
        let rc = sdti_encoder_encode_pooled(
            e,
            prompt.as_ptr(),
            context.as_mut_ptr(),
            context.len(),
            pooled.as_mut_ptr(),
            pooled.len(),
            &mut needed,
            &mut rows,
        );
        let msg = expect(rc, SDTI_ERR_BUFFER_TOO_SMALL, "47-float pooled buffer");
        assert!(msg.contains("48"), "{msg}");
        let rc = sdti_encoder_encode_pooled(
            e,
            prompt.as_ptr(),
            context.as_mut_ptr(),
            context.len(),
            std::ptr::null_mut(),
            0,
            &mut needed,
            &mut rows,
        );
        expect(rc, SDTI_ERR_BUFFER_TOO_SMALL, "no pooled buffer on SDXL");
        let rc = sdti_encoder_encode_pooled(
            e,
            prompt.as_ptr(),
            context.as_mut_ptr(),
            77 * 80 - 1,
            pooled.as_mut_ptr(),
            pooled.len(),
            &mut needed,
            &mut rows,
        );
        expect(rc, SDTI_ERR_BUFFER_TOO_SMALL, "short context");
    }
    assert_eq!((needed, rows), (77 * 80, 77));
    assert!(
        context.iter().chain(&pooled).all(|&v| v == 5.0),
        "written on failure"
    );
    sdti_encoder_free(e);
}

/// An SDXL (or SD 2.x) run through the same trainer calls: the family's resolution for 0,
/// the family, the notes, both tables, and the word in every SDXL format read back by an
/// encoder to the trainer's numbers.
#[test]
fn sdxl_and_sd2_train_through_the_abi_and_export_every_sdxl_format() {
    let dir = tempfile::tempdir().unwrap();
    let model = path_c(&fixture("tiny-sdxl"));
    let (mut p, _s) = tiny_params("sks");
    p.model_path = model.as_ptr();
    // 0: the family's resolution.
    p.resolution = 0;
    assert_eq!(unsafe_params_init().resolution, 0, "0 is the default");
    let t = new_trainer(&p);
    let (mut family, mut res) = (0, 0);
    // SAFETY: writable out-parameters.
    unsafe {
        expect(sdti_trainer_family(t, &mut family), SDTI_OK, "family");
        expect(sdti_trainer_resolution(t, &mut res), SDTI_OK, "resolution");
    }
    assert_eq!((family, res), (SDTI_FAMILY_SDXL, 1024));
    // What loading decided (the folder's prediction type and where it came from).
    let mut needed = 0usize;
    // SAFETY: size query.
    let rc = unsafe { sdti_trainer_notes(t, std::ptr::null_mut(), 0, &mut needed) };
    expect(rc, SDTI_ERR_BUFFER_TOO_SMALL, "notes size query");
    let mut buf = vec![0 as c_char; needed];
    // SAFETY: a buffer of `needed` bytes.
    let rc = unsafe { sdti_trainer_notes(t, buf.as_mut_ptr(), buf.len(), &mut needed) };
    expect(rc, SDTI_OK, "notes");
    // SAFETY: NUL-terminated by the call.
    let notes = unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    assert!(
        notes.contains("SDXL") && notes.contains("epsilon"),
        "notes: {notes:?}"
    );
    sdti_trainer_free(t);

    p.resolution = 64;
    let t = new_trainer(&p);
    add_pictures(t, 2);
    let mut st = stats();
    // SAFETY: a stats struct with its size.
    expect(
        unsafe { sdti_trainer_step(t, 2, &mut st) },
        SDTI_OK,
        "2 SDXL steps",
    );
    assert!(st.loss.is_finite() && st.loss > 0.0);
    let part = |t: *mut sdti_trainer, k: u32| {
        let (mut needed, mut rows, mut dim) = (0usize, 0u32, 0u32);
        // SAFETY: size query.
        let rc = unsafe {
            sdti_trainer_get_part_vectors(
                t,
                k,
                std::ptr::null_mut(),
                0,
                &mut needed,
                &mut rows,
                &mut dim,
            )
        };
        (rc, needed, rows, dim)
    };
    assert_eq!(part(t, 0), (SDTI_ERR_BUFFER_TOO_SMALL, 64, 2, 32), "clip_l");
    assert_eq!(part(t, 1), (SDTI_ERR_BUFFER_TOO_SMALL, 96, 2, 48), "clip_g");
    expect(part(t, 2).0, SDTI_ERR_INVALID_ARGUMENT, "part 2");
    assert_eq!(vectors_of(t).len(), 64, "get_vectors: the clip_l table");

    // The trainer's word in an encoder sharing its model...
    let from_trainer = encoder_of(t);
    let prompt = "a photo of sks";
    let (want_ctx, want_pooled, _) = encode_pooled(from_trainer, prompt);
    // ...and each SDXL format read back by an encoder of its own.
    let formats = [
        ("sdxl.safetensors", SDTI_FORMAT_SDXL_SAFETENSORS),
        ("auto.safetensors", SDTI_FORMAT_AUTO),
        ("kohya.pt", SDTI_FORMAT_KOHYA_PT),
        ("onetrainer.safetensors", SDTI_FORMAT_ONETRAINER),
        ("pair.safetensors", SDTI_FORMAT_DIFFUSERS_SDXL),
    ];
    let e = encoder_at(&fixture("tiny-sdxl"));
    for (name, format) in formats {
        let path = dir.path().join(name);
        let cpath = path_c(&path);
        // SAFETY: NUL-terminated path.
        let rc = unsafe { sdti_trainer_export(t, cpath.as_ptr(), format) };
        expect(rc, SDTI_OK, &format!("export {name}"));
        let src = if format == SDTI_FORMAT_DIFFUSERS_SDXL {
            let second = dir.path().join("pair_2.safetensors");
            assert!(second.exists(), "the pair's second file");
            path_c(Path::new(&format!(
                "{}+{}",
                path.display(),
                second.display()
            )))
        } else {
            cpath
        };
        let word = c("sks");
        // SAFETY: NUL-terminated strings.
        let rc = unsafe { sdti_encoder_register_token(e, word.as_ptr(), src.as_ptr()) };
        expect(rc, SDTI_OK, &format!("register {name}"));
        let (ctx, pooled, _) = encode_pooled(e, prompt);
        assert!(max_abs_diff(&ctx, &want_ctx) < 1e-6, "{name}: context");
        assert!(max_abs_diff(&pooled, &want_pooled) < 1e-6, "{name}: pooled");
    }
    // A one-table format cannot hold an SDXL word.
    let pt = path_c(&dir.path().join("one.pt"));
    // SAFETY: NUL-terminated path.
    let rc = unsafe { sdti_trainer_export(t, pt.as_ptr(), SDTI_FORMAT_A1111_PT) };
    expect(rc, SDTI_ERR_UNSUPPORTED, "an SDXL word as A1111 .pt");
    // The trainer's word refreshed into the file-loaded encoder equals it too.
    expect(
        sdti_encoder_register_trainer(e, t),
        SDTI_OK,
        "register_trainer",
    );
    assert!(max_abs_diff(&encode_pooled(e, prompt).0, &want_ctx) < 1e-6);
    // An SD 1.x trainer's word does not fit the SDXL encoder.
    let (p1, _s1) = tiny_params("sks");
    let t1 = new_trainer(&p1);
    let msg = expect(
        sdti_encoder_register_trainer(e, t1),
        SDTI_ERR_INVALID_ARGUMENT,
        "SD 1.x word into an SDXL encoder",
    );
    assert!(msg.contains("SD 1.x") && msg.contains("SDXL"), "{msg}");
    sdti_trainer_free(t1);
    sdti_encoder_free(e);
    sdti_encoder_free(from_trainer);
    sdti_trainer_free(t);

    // SD 2.x: the same calls; 0 is 512 for the epsilon folder; the word is one table.
    let model = path_c(&fixture("tiny-sd2"));
    let (mut p, _s) = tiny_params("sks");
    p.model_path = model.as_ptr();
    p.resolution = 0;
    let t = new_trainer(&p);
    // SAFETY: writable out-parameters.
    unsafe {
        expect(sdti_trainer_family(t, &mut family), SDTI_OK, "family");
        expect(sdti_trainer_resolution(t, &mut res), SDTI_OK, "resolution");
    }
    assert_eq!((family, res), (SDTI_FAMILY_SD2, 512));
    sdti_trainer_free(t);
    p.resolution = 64;
    let t = new_trainer(&p);
    add_pictures(t, 1);
    // SAFETY: NULL stats allowed.
    expect(
        unsafe { sdti_trainer_step(t, 1, std::ptr::null_mut()) },
        SDTI_OK,
        "SD 2.x step",
    );
    assert_eq!(part(t, 0).0, SDTI_ERR_BUFFER_TOO_SMALL);
    let path = path_c(&dir.path().join("sd2.safetensors"));
    // SAFETY: NUL-terminated path.
    expect(
        unsafe { sdti_trainer_export(t, path.as_ptr(), SDTI_FORMAT_AUTO) },
        SDTI_OK,
        "export SD 2.x",
    );
    let sdxl_path = path_c(&dir.path().join("sd2-as-sdxl.safetensors"));
    // SAFETY: NUL-terminated path.
    expect(
        unsafe { sdti_trainer_export(t, sdxl_path.as_ptr(), SDTI_FORMAT_SDXL_SAFETENSORS) },
        SDTI_ERR_UNSUPPORTED,
        "an SD 2.x word as SDXL",
    );
    let e = encoder_of(t);
    let e2 = encoder_at(&fixture("tiny-sd2"));
    // SAFETY: NUL-terminated strings.
    let rc = unsafe { sdti_encoder_register_token(e2, std::ptr::null(), path.as_ptr()) };
    expect(rc, SDTI_OK, "register the SD 2.x file");
    assert!(
        max_abs_diff(
            &encode_any(e, "a photo of sks"),
            &encode_any(e2, "a photo of sd2")
        ) < 1e-6
    );
    sdti_encoder_free(e);
    sdti_encoder_free(e2);
    sdti_trainer_free(t);
}

// ---------------------------------------------------------------- misuse

#[test]
fn misuse_null_arguments_and_handles() {
    let (p, _s) = tiny_params("sks");
    let null_t: *mut sdti_trainer = std::ptr::null_mut();
    let null_e: *mut sdti_encoder = std::ptr::null_mut();
    // SAFETY: every NULL below is the misuse under test.
    unsafe {
        expect(
            sdti_trainer_params_init(std::ptr::null_mut()),
            SDTI_ERR_INVALID_ARGUMENT,
            "params_init(NULL)",
        );
        expect(
            sdti_model_params_init(std::ptr::null_mut()),
            SDTI_ERR_INVALID_ARGUMENT,
            "model_params_init(NULL)",
        );
        expect(
            sdti_trainer_new(&p, std::ptr::null_mut()),
            SDTI_ERR_INVALID_ARGUMENT,
            "new(out NULL)",
        );
        let mut no_token = p;
        no_token.token = std::ptr::null();
        let mut t = std::ptr::null_mut();
        let msg = expect(
            sdti_trainer_new(&no_token, &mut t),
            SDTI_ERR_INVALID_ARGUMENT,
            "token NULL",
        );
        assert!(msg.contains("params.token"), "{msg}");
        assert!(t.is_null(), "out written only on success");
        let mut no_model = p;
        no_model.model_path = std::ptr::null();
        expect(
            sdti_trainer_new(&no_model, &mut t),
            SDTI_ERR_INVALID_ARGUMENT,
            "model NULL",
        );
        let px = picture(0);
        let msg = expect(
            sdti_trainer_add_image(null_t, px.as_ptr(), 64, 64, 0, 0, std::ptr::null()),
            SDTI_ERR_INVALID_HANDLE,
            "add_image(NULL trainer)",
        );
        assert!(msg.contains("NULL"), "{msg}");
        expect(
            sdti_trainer_step(null_t, 1, std::ptr::null_mut()),
            SDTI_ERR_INVALID_HANDLE,
            "step(NULL)",
        );
        expect(
            sdti_trainer_export(null_t, c"x.pt".as_ptr(), 0),
            SDTI_ERR_INVALID_HANDLE,
            "export(NULL)",
        );
        expect(
            sdti_encoder_encode(
                null_e,
                c"x".as_ptr(),
                std::ptr::null_mut(),
                0,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            ),
            SDTI_ERR_INVALID_HANDLE,
            "encode(NULL)",
        );
        expect(
            sdti_encoder_new(std::ptr::null(), &mut std::ptr::null_mut()),
            SDTI_ERR_INVALID_ARGUMENT,
            "encoder_new(NULL)",
        );
        // A pointer that never came from the library.
        let mut junk = [0u64; 4];
        let fake = junk.as_mut_ptr().cast::<sdti_trainer>();
        let msg = expect(
            sdti_trainer_step(fake, 1, std::ptr::null_mut()),
            SDTI_ERR_INVALID_HANDLE,
            "step(foreign pointer)",
        );
        assert!(msg.contains("not a live trainer"), "{msg}");
        sdti_trainer_free(fake); // ignored
        sdti_trainer_cancel(fake);
        sdti_trainer_free(null_t);
        sdti_trainer_cancel(null_t);
        sdti_encoder_free(null_e);

        let t = new_trainer(&p);
        expect(
            sdti_trainer_add_image(t, std::ptr::null(), 64, 64, 0, 0, std::ptr::null()),
            SDTI_ERR_INVALID_ARGUMENT,
            "NULL pixels",
        );
        expect(
            sdti_trainer_add_image_file(t, std::ptr::null()),
            SDTI_ERR_INVALID_ARGUMENT,
            "NULL image path",
        );
        expect(
            sdti_trainer_export(t, std::ptr::null(), 0),
            SDTI_ERR_INVALID_ARGUMENT,
            "export NULL path",
        );
        expect(
            sdti_trainer_save_checkpoint(t, std::ptr::null()),
            SDTI_ERR_INVALID_ARGUMENT,
            "checkpoint NULL path",
        );
        expect(
            sdti_trainer_image_count(t, std::ptr::null_mut()),
            SDTI_ERR_INVALID_ARGUMENT,
            "count NULL",
        );
        let e = encoder_of(t);
        expect(
            sdti_encoder_encode(
                e,
                std::ptr::null(),
                std::ptr::null_mut(),
                0,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            ),
            SDTI_ERR_INVALID_ARGUMENT,
            "encode NULL prompt",
        );
        expect(
            sdti_encoder_register_token(e, std::ptr::null(), std::ptr::null()),
            SDTI_ERR_INVALID_ARGUMENT,
            "register NULL path",
        );
        expect(
            sdti_encoder_new_from_trainer(t, std::ptr::null_mut()),
            SDTI_ERR_INVALID_ARGUMENT,
            "from_trainer out NULL",
        );
        expect(
            sdti_encoder_register_trainer(e, null_t),
            SDTI_ERR_INVALID_HANDLE,
            "register NULL trainer",
        );
        sdti_encoder_free(e);
        sdti_trainer_free(t);
    }
}

/// A resolution of the tiny model and a memory budget (MiB) that its step fits in only
/// with recompute, and loading (the weights with the VAE's, freed for the steps) fits in
/// too: the first size, from 64 px up, where both can be had.
fn recompute_only_budget() -> (u32, u32) {
    use sdti::model::memory::{loading_bytes, StepMemory};
    use sdti::model::Recompute;
    let config = crate::common::tiny_model(candle_core::DType::F32).config;
    for latent in [8usize, 16, 24, 32, 40, 48, 64] {
        let peak = |r| StepMemory::estimate(&config, 1, latent, latent, 4, r);
        let on = peak(Recompute::On);
        let loading = loading_bytes(&config, &on, 4);
        let mib = on.total().max(loading).div_ceil(1 << 20);
        if peak(Recompute::Off).total() > mib << 20 {
            return (8 * latent as u32, mib as u32);
        }
    }
    panic!("no tiny resolution up to 512 px has a budget that only recompute fits");
}

/// Revision 2 of the params (ABI 1.3): `recompute` and `memory_budget_mib`. A host built
/// against revision 1 (struct_size 128) gets the default, auto, whatever lies past its
/// struct; what auto chose can be read back; recompute never changes the vectors.
#[test]
fn recompute_params_old_hosts_and_choices() {
    let recompute_of = |t: *mut sdti_trainer| {
        let mut r = u32::MAX;
        // SAFETY: a live trainer and a writable out-parameter.
        expect(
            unsafe { sdti_trainer_recompute(t, &mut r) },
            SDTI_OK,
            "sdti_trainer_recompute",
        );
        r
    };
    let init = unsafe_params_init();
    assert_eq!(
        (init.recompute, init.memory_budget_mib),
        (SDTI_RECOMPUTE_AUTO, 0)
    );
    assert_eq!(
        init.struct_size as usize,
        std::mem::size_of::<sdti_trainer_params>()
    );
    let (p, _s) = tiny_params("rc");
    let budget = recompute_only_budget();
    // Revision 1: the two fields past its end are not read (a 1 MiB budget would turn
    // recompute on, 77 is no mode); auto keeps the tiny model's steps as they are.
    let old = sdti_trainer_params {
        struct_size: 128,
        recompute: 77,
        memory_budget_mib: 1,
        ..p
    };
    let mut by_choice = Vec::new();
    for (params, want) in [
        (old, SDTI_RECOMPUTE_OFF),
        (
            sdti_trainer_params {
                recompute: SDTI_RECOMPUTE_ON,
                ..p
            },
            SDTI_RECOMPUTE_ON,
        ),
        // Auto with a budget the step fits in only with recompute (a smaller one is
        // refused: ffi_params).
        (
            sdti_trainer_params {
                resolution: budget.0,
                memory_budget_mib: budget.1,
                ..p
            },
            SDTI_RECOMPUTE_ON,
        ),
        // The same run without recompute, for the vectors.
        (
            sdti_trainer_params {
                resolution: budget.0,
                recompute: SDTI_RECOMPUTE_OFF,
                ..p
            },
            SDTI_RECOMPUTE_OFF,
        ),
    ] {
        let t = new_trainer(&params);
        assert_eq!(recompute_of(t), want, "struct_size {}", params.struct_size);
        add_pictures(t, 1);
        let mut st = stats();
        // SAFETY: a live trainer and a stats struct with struct_size set.
        expect(unsafe { sdti_trainer_step(t, 2, &mut st) }, SDTI_OK, "step");
        by_choice.push(vectors_of(t));
        sdti_trainer_free(t);
    }
    assert_eq!(by_choice[0], by_choice[1], "recompute changed the vectors");
    assert_eq!(by_choice[2], by_choice[3]);
    let bad = sdti_trainer_params { recompute: 3, ..p };
    let mut t = std::ptr::null_mut();
    // SAFETY: valid params and out pointer.
    let msg = expect(
        unsafe { sdti_trainer_new(&bad, &mut t) },
        SDTI_ERR_INVALID_ARGUMENT,
        "recompute 3",
    );
    assert!(msg.contains("params.recompute"), "{msg}");
    // SAFETY: a NULL handle and a NULL out-parameter are refused, not read.
    let rc = unsafe { sdti_trainer_recompute(std::ptr::null_mut(), std::ptr::null_mut()) };
    assert_ne!(rc, SDTI_OK);
}

#[test]
fn misuse_struct_sizes_small_and_large() {
    let (p, _s) = tiny_params("sks");
    let mut t = std::ptr::null_mut();
    for size in [0u32, 4, 127] {
        let mut small = p;
        small.struct_size = size;
        // SAFETY: the struct is larger than the size claimed.
        let msg = expect(
            unsafe { sdti_trainer_new(&small, &mut t) },
            SDTI_ERR_STRUCT_SIZE,
            "small struct_size",
        );
        assert!(msg.contains("struct_size"), "{msg}");
    }
    // A newer host's larger struct: the known prefix is used, the rest ignored.
    #[repr(C)]
    struct Newer {
        p: sdti_trainer_params,
        future: [u64; 6],
    }
    let mut newer = Newer {
        p,
        future: [0xdead_beef; 6],
    };
    newer.p.struct_size = std::mem::size_of::<Newer>() as u32;
    let mut t = std::ptr::null_mut();
    // SAFETY: the struct has struct_size readable bytes.
    let rc = unsafe { sdti_trainer_new((&newer as *const Newer).cast(), &mut t) };
    expect(rc, SDTI_OK, "larger struct_size");
    // Stats too: too small is refused, larger is written only as far as known.
    add_pictures(t, 1);
    let mut st = stats();
    st.struct_size = 8;
    // SAFETY: the stats struct is larger than claimed.
    expect(
        unsafe { sdti_trainer_step(t, 1, &mut st) },
        SDTI_ERR_STRUCT_SIZE,
        "small stats",
    );
    #[repr(C)]
    struct NewerStats {
        s: sdti_step_stats,
        future: u64,
    }
    let mut ns = NewerStats {
        s: stats(),
        future: 7,
    };
    ns.s.struct_size = std::mem::size_of::<NewerStats>() as u32;
    // SAFETY: struct_size readable and writable bytes.
    let rc = unsafe { sdti_trainer_step(t, 1, (&mut ns as *mut NewerStats).cast()) };
    expect(rc, SDTI_OK, "larger stats");
    assert_eq!((ns.s.steps_done, ns.future), (1, 7));
    assert_eq!(ns.s.struct_size as usize, std::mem::size_of::<NewerStats>());
    sdti_trainer_free(t);
    // Model params.
    let model = path_c(&fixture("tiny-sd"));
    let mp = sdti_model_params {
        struct_size: 12,
        precision: 0,
        model_path: model.as_ptr(),
        device: std::ptr::null(),
    };
    let mut e = std::ptr::null_mut();
    // SAFETY: 12 < sizeof.
    expect(
        unsafe { sdti_encoder_new(&mp, &mut e) },
        SDTI_ERR_STRUCT_SIZE,
        "small model params",
    );
}

#[test]
fn misuse_invalid_utf8_and_bad_values() {
    let (p, _s) = tiny_params("sks");
    let bad = c"caf\xe9";
    let mut t = std::ptr::null_mut();
    let mut q = p;
    q.token = bad.as_ptr();
    // SAFETY: valid pointers; the bytes are the misuse.
    let msg = expect(
        unsafe { sdti_trainer_new(&q, &mut t) },
        SDTI_ERR_INVALID_UTF8,
        "token not UTF-8",
    );
    assert!(msg.contains("params.token"), "{msg}");
    let mut q = p;
    q.device = c"tpu".as_ptr();
    let msg = expect(
        // SAFETY: live handles from this test, NUL-terminated strings and buffers of the sizes passed.
        unsafe { sdti_trainer_new(&q, &mut t) },
        SDTI_ERR_DEVICE,
        "device tpu",
    );
    assert!(msg.contains("tpu"), "{msg}");
    if !cfg!(feature = "cuda") {
        q.device = c"cuda:0".as_ptr();
        expect(
            // SAFETY: live handles from this test, NUL-terminated strings and buffers of the sizes passed.
            unsafe { sdti_trainer_new(&q, &mut t) },
            SDTI_ERR_DEVICE,
            "cuda without CUDA",
        );
    }
    let mut q = p;
    q.precision = 9;
    expect(
        // SAFETY: live handles from this test, NUL-terminated strings and buffers of the sizes passed.
        unsafe { sdti_trainer_new(&q, &mut t) },
        SDTI_ERR_INVALID_ARGUMENT,
        "precision 9",
    );
    let mut q = p;
    q.vectors = 0;
    let msg = expect(
        // SAFETY: live handles from this test, NUL-terminated strings and buffers of the sizes passed.
        unsafe { sdti_trainer_new(&q, &mut t) },
        SDTI_ERR_INVALID_ARGUMENT,
        "0 vectors",
    );
    assert!(msg.contains("vectors"), "{msg}");
    let mut q = p;
    q.learning_rate = c"fast".as_ptr();
    expect(
        // SAFETY: live handles from this test, NUL-terminated strings and buffers of the sizes passed.
        unsafe { sdti_trainer_new(&q, &mut t) },
        SDTI_ERR_INVALID_ARGUMENT,
        "learning rate 'fast'",
    );
    let mut q = p;
    q.resolution = 65;
    expect(
        // SAFETY: live handles from this test, NUL-terminated strings and buffers of the sizes passed.
        unsafe { sdti_trainer_new(&q, &mut t) },
        SDTI_ERR_INVALID_ARGUMENT,
        "resolution 65",
    );
    let mut q = p;
    q.templates = c"/nonexistent/templates.txt".as_ptr();
    expect(
        // SAFETY: live handles from this test, NUL-terminated strings and buffers of the sizes passed.
        unsafe { sdti_trainer_new(&q, &mut t) },
        SDTI_ERR_INVALID_ARGUMENT,
        "missing template file",
    );
    let mut q = p;
    q.model_path = c"/nonexistent/model".as_ptr();
    // SAFETY: live handles from this test, NUL-terminated strings and buffers of the sizes passed.
    let st = unsafe { sdti_trainer_new(&q, &mut t) };
    assert!(
        st == SDTI_ERR_MODEL || st == SDTI_ERR_IO,
        "missing model: {st} {}",
        last_error()
    );
    assert!(t.is_null());

    let t = new_trainer(&p);
    let e = encoder_of(t);
    // SAFETY: live handles from this test, NUL-terminated strings and buffers of the sizes passed.
    let rc = unsafe {
        sdti_encoder_encode(
            e,
            bad.as_ptr(),
            std::ptr::null_mut(),
            0,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    expect(rc, SDTI_ERR_INVALID_UTF8, "prompt not UTF-8");
    let px = picture(0);
    let rc =
        // SAFETY: live handles from this test, NUL-terminated strings and buffers of the sizes passed.
        unsafe { sdti_trainer_add_image(t, px.as_ptr(), 64, 64, 0, SDTI_PIXEL_RGB8, bad.as_ptr()) };
    expect(rc, SDTI_ERR_INVALID_UTF8, "caption not UTF-8");
    let mut count = 9;
    expect(
        // SAFETY: live handles from this test, NUL-terminated strings and buffers of the sizes passed.
        unsafe { sdti_trainer_image_count(t, &mut count) },
        SDTI_OK,
        "count",
    );
    assert_eq!(count, 0, "a failed add adds nothing");
    sdti_encoder_free(e);
    sdti_trainer_free(t);
}

#[test]
fn misuse_images_and_steps_without_images() {
    let (p, _s) = tiny_params("sks");
    let t = new_trainer(&p);
    let mut st = stats();
    // SAFETY: live trainer.
    let msg = expect(
        unsafe { sdti_trainer_step(t, 1, &mut st) },
        SDTI_ERR_STATE,
        "step without images",
    );
    assert!(msg.contains("no images"), "{msg}");
    let px = picture(0);
    let tiny = [1u8; 4];
    // SAFETY: every call below reads at most the bytes its arguments promise, or nothing.
    unsafe {
        let msg = expect(
            sdti_trainer_add_image(t, tiny.as_ptr(), 1, 1, 0, SDTI_PIXEL_RGB8, std::ptr::null()),
            SDTI_ERR_IMAGE,
            "1x1",
        );
        assert!(msg.contains("1x1"), "{msg}");
        // Refused before a byte is read: the 12 KiB buffer is far from 30 GB.
        let msg = expect(
            sdti_trainer_add_image(
                t,
                px.as_ptr(),
                100_000,
                100_000,
                0,
                SDTI_PIXEL_RGB8,
                std::ptr::null(),
            ),
            SDTI_ERR_IMAGE,
            "100000x100000",
        );
        assert!(msg.contains("100000x100000"), "{msg}");
        let msg = expect(
            sdti_trainer_add_image(
                t,
                px.as_ptr(),
                64,
                64,
                100,
                SDTI_PIXEL_RGB8,
                std::ptr::null(),
            ),
            SDTI_ERR_IMAGE,
            "stride below a row",
        );
        assert!(msg.contains("stride"), "{msg}");
        expect(
            sdti_trainer_add_image(
                t,
                px.as_ptr(),
                64,
                64,
                usize::MAX / 2,
                SDTI_PIXEL_RGB8,
                std::ptr::null(),
            ),
            SDTI_ERR_IMAGE,
            "overflowing stride",
        );
        expect(
            sdti_trainer_add_image(t, px.as_ptr(), 64, 64, 0, 7, std::ptr::null()),
            SDTI_ERR_INVALID_ARGUMENT,
            "pixel format 7",
        );
        let missing = c("/nonexistent/picture.png");
        expect(
            sdti_trainer_add_image_file(t, missing.as_ptr()),
            SDTI_ERR_IMAGE,
            "missing image file",
        );
        let not_image = path_c(&fixture("tiny-sd/model_index.json"));
        expect(
            sdti_trainer_add_image_file(t, not_image.as_ptr()),
            SDTI_ERR_IMAGE,
            "a JSON file as image",
        );
        // RGBA with padded rows is fine; the pixels are copied.
        let stride = 64 * 4 + 8;
        let mut rgba = vec![200u8; stride * 64];
        expect(
            sdti_trainer_add_image(
                t,
                rgba.as_ptr(),
                64,
                64,
                stride,
                SDTI_PIXEL_RGBA8,
                c"a caption".as_ptr(),
            ),
            SDTI_OK,
            "RGBA8 with stride",
        );
        rgba.fill(0);
        drop(rgba);
        expect(
            sdti_trainer_step(t, 1, &mut st),
            SDTI_OK,
            "step with the image",
        );
    }
    sdti_trainer_free(t);
}

#[test]
fn misuse_unknown_format_and_unwritable_export() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _s) = tiny_params("sks");
    let t = new_trainer(&p);
    let ok_path = path_c(&dir.path().join("w.pt"));
    // SAFETY: live trainer, NUL-terminated paths.
    unsafe {
        let msg = expect(
            sdti_trainer_export(t, ok_path.as_ptr(), 77),
            SDTI_ERR_INVALID_ARGUMENT,
            "format 77",
        );
        assert!(msg.contains("77"), "{msg}");
        let no_ext = path_c(&dir.path().join("w.weird"));
        expect(
            sdti_trainer_export(t, no_ext.as_ptr(), SDTI_FORMAT_AUTO),
            SDTI_ERR_INVALID_ARGUMENT,
            "auto without a known extension",
        );
        expect(
            sdti_trainer_export(t, ok_path.as_ptr(), SDTI_FORMAT_SDXL_SAFETENSORS),
            SDTI_ERR_UNSUPPORTED,
            "SD1 word as sdxl",
        );
        let unwritable = path_c(&dir.path().join("missing-folder/w.pt"));
        expect(
            sdti_trainer_export(t, unwritable.as_ptr(), SDTI_FORMAT_AUTO),
            SDTI_ERR_IO,
            "export into a missing folder",
        );
        // A path below a regular file.
        let below_file = path_c(&fixture("tiny-sd/model_index.json").join("w.pt"));
        expect(
            sdti_trainer_export(t, below_file.as_ptr(), SDTI_FORMAT_AUTO),
            SDTI_ERR_IO,
            "export below a file",
        );
        expect(
            sdti_trainer_save_checkpoint(t, unwritable.as_ptr()),
            SDTI_ERR_IO,
            "checkpoint into a missing folder",
        );
        expect(
            sdti_trainer_export(t, ok_path.as_ptr(), SDTI_FORMAT_AUTO),
            SDTI_OK,
            "export works after all that",
        );
    }
    sdti_trainer_free(t);
}

#[test]
fn writes_refuse_existing_paths_unless_asked_and_names_are_names() {
    let dir = tempfile::tempdir().unwrap();
    // A word's name is a name, never a path: refused by sdti_name_check and at _new.
    for bad in [
        "../checkpoints/victim",
        "/abs",
        "..",
        ".hidden",
        "a\\b",
        "CON",
        "x:y",
    ] {
        let name = c(bad);
        // SAFETY: NUL-terminated.
        let msg = expect(
            unsafe { sdti_name_check(name.as_ptr()) },
            SDTI_ERR_INVALID_ARGUMENT,
            bad,
        );
        assert!(msg.contains("cannot name a word"), "{bad}: {msg}");
        let (p, _s) = tiny_params(bad);
        let mut t = std::ptr::null_mut();
        // SAFETY: valid params and out-pointer.
        let msg = expect(
            unsafe { sdti_trainer_new(&p, &mut t) },
            SDTI_ERR_INVALID_ARGUMENT,
            bad,
        );
        assert!(msg.contains("token") && t.is_null(), "{bad}: {msg}");
    }
    // SAFETY: NUL-terminated.
    expect(
        unsafe { sdti_name_check(c"my-cat".as_ptr()) },
        SDTI_OK,
        "my-cat",
    );

    let (p, _s) = tiny_params("sks");
    let t = new_trainer(&p);
    let target = dir.path().join("victim.safetensors");
    std::fs::write(&target, b"a user's checkpoint").unwrap();
    let dangling = dir.path().join("dangling.pt");
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
    for path in [&target, &dangling] {
        let pc = path_c(path);
        // SAFETY: live trainer, NUL-terminated path.
        let msg = expect(
            unsafe { sdti_trainer_export(t, pc.as_ptr(), SDTI_FORMAT_AUTO) },
            SDTI_ERR_EXISTS,
            "export over an existing path",
        );
        assert!(msg.contains("already there"), "{msg}");
        let src = path_c(&fixture("embeddings/a1111_sd1.pt"));
        // SAFETY: NUL-terminated paths.
        expect(
            unsafe { sdti_embedding_convert(src.as_ptr(), pc.as_ptr(), SDTI_FORMAT_AUTO, 0) },
            SDTI_ERR_EXISTS,
            "convert over an existing path",
        );
    }
    assert_eq!(std::fs::read(&target).unwrap(), b"a user's checkpoint");
    assert!(std::fs::symlink_metadata(&dangling)
        .unwrap()
        .file_type()
        .is_symlink());
    let pc = path_c(&target);
    // SAFETY: as above.
    unsafe {
        expect(
            sdti_trainer_export_ex(t, pc.as_ptr(), SDTI_FORMAT_AUTO, 2),
            SDTI_ERR_INVALID_ARGUMENT,
            "unknown flag",
        );
        expect(
            sdti_trainer_export_ex(t, pc.as_ptr(), SDTI_FORMAT_AUTO, SDTI_WRITE_OVERWRITE),
            SDTI_OK,
            "export with SDTI_WRITE_OVERWRITE",
        );
    }
    assert_eq!(
        sdti::embedding::read_embedding(&target).unwrap().parts[0].vectors,
        2
    );
    sdti_trainer_free(t);

    // A new run does not take over an output_dir that holds a run of the same word.
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::write(run.join("sks.checkpoint.safetensors"), b"earlier").unwrap();
    let run_c = path_c(&run);
    let mut p2 = p;
    p2.output_dir = run_c.as_ptr();
    p2.save_every = 1;
    let mut t2 = std::ptr::null_mut();
    // SAFETY: valid params and out-pointer.
    let msg = expect(
        unsafe { sdti_trainer_new(&p2, &mut t2) },
        SDTI_ERR_EXISTS,
        "output_dir of an earlier run",
    );
    assert!(msg.contains("resume it"), "{msg}");
}

#[test]
fn format_names_from_inspect_are_taken_back() {
    use sdti::embedding::{Encoder, Format};
    for f in Format::ALL {
        let printed = serde_json::to_value(f).unwrap();
        let name = printed.as_str().unwrap();
        assert_eq!(name.parse::<Format>().unwrap(), f, "{name}");
        let name_c = c(name);
        let mut code = u32::MAX;
        // SAFETY: NUL-terminated, writable.
        expect(
            unsafe { sdti_format_from_name(name_c.as_ptr(), &mut code) },
            SDTI_OK,
            name,
        );
        assert_ne!(code, SDTI_FORMAT_AUTO, "{name}");
    }
    for e in [Encoder::Single, Encoder::ClipL, Encoder::ClipG] {
        let printed = serde_json::to_value(e).unwrap();
        assert_eq!(printed.as_str().unwrap().parse::<Encoder>().unwrap(), e);
        assert_eq!(printed.as_str().unwrap(), e.to_string());
    }
    let mut code = 0;
    // SAFETY: NUL-terminated, writable.
    let msg = expect(
        unsafe { sdti_format_from_name(c"jpeg".as_ptr(), &mut code) },
        SDTI_ERR_INVALID_ARGUMENT,
        "unknown name",
    );
    assert!(msg.contains("a1111-pt"), "{msg}");
    // inspect's JSON: widths are numbers, parts named as in the files.
    let json = sdti::embedding::inspect(
        &sdti::embedding::read_embedding(&fixture("embeddings/sdxl.safetensors")).unwrap(),
        None,
        0,
    );
    let v = serde_json::to_value(&json).unwrap();
    assert_eq!(v["widths"], serde_json::json!([768, 1280]));
    assert_eq!(v["parts"][0]["encoder"], "clip_l");
    assert!(v["source_format"]
        .as_str()
        .unwrap()
        .parse::<Format>()
        .is_ok());
}

unsafe extern "C" fn cancel_at_two(user_data: *mut c_void, p: *const sdti_progress) -> i32 {
    // SAFETY: the test passes an AtomicU32 and the library a valid progress.
    let (calls, p) = unsafe { (&*(user_data as *const AtomicU32), &*p) };
    calls.fetch_add(1, Ordering::SeqCst);
    assert_eq!(p.struct_size as usize, std::mem::size_of::<sdti_progress>());
    i32::from(p.steps_done >= 2)
}

#[test]
fn cancel_twice_and_a_callback_that_cancels() {
    let calls = AtomicU32::new(0);
    let (mut p, _s) = tiny_params("sks");
    p.progress = Some(cancel_at_two);
    p.progress_user_data = (&calls as *const AtomicU32).cast_mut().cast();
    let t = new_trainer(&p);
    add_pictures(t, 1);
    let mut st = stats();
    // SAFETY: live trainer.
    unsafe {
        let msg = expect(
            sdti_trainer_step(t, 10, &mut st),
            SDTI_CANCELLED,
            "callback cancels",
        );
        assert!(msg.contains("progress callback"), "{msg}");
        assert_eq!(
            (st.steps_done, st.step, calls.load(Ordering::SeqCst)),
            (2, 2, 2)
        );
        // A cancel before a step is kept for it; twice is the same as once.
        sdti_trainer_cancel(t);
        sdti_trainer_cancel(t);
        expect(
            sdti_trainer_step(t, 10, &mut st),
            SDTI_CANCELLED,
            "cancel twice",
        );
        assert_eq!((st.steps_done, st.step), (0, 2));
        // Consumed: the next call runs (and the callback cancels it again after 2).
        expect(
            sdti_trainer_step(t, 10, &mut st),
            SDTI_CANCELLED,
            "after the cancel",
        );
        assert_eq!((st.steps_done, st.step), (2, 4));
    }
    sdti_trainer_free(t);
    sdti_trainer_cancel(t); // freed: ignored
}

#[test]
fn cancel_from_another_thread_returns_promptly() {
    let (p, _s) = tiny_params("sks");
    let t = new_trainer(&p);
    add_pictures(t, 2);
    let key = t as usize;
    let started = Instant::now();
    let worker = std::thread::spawn(move || {
        let mut st = stats();
        // SAFETY: a live trainer; this thread is its only user but for cancel.
        let rc = unsafe { sdti_trainer_step(key as *mut sdti_trainer, 10_000, &mut st) };
        (rc, st, Instant::now())
    });
    std::thread::sleep(Duration::from_millis(400));
    let cancelled_at = Instant::now();
    sdti_trainer_cancel(t);
    let (rc, st, returned_at) = worker.join().unwrap();
    assert_eq!(rc, SDTI_CANCELLED);
    assert!(st.steps_done < 10_000 && st.step == u64::from(st.steps_done));
    let latency = returned_at.duration_since(cancelled_at);
    assert!(
        latency < Duration::from_secs(3),
        "took {latency:?} to stop (after {:?})",
        started.elapsed()
    );
    sdti_trainer_free(t);
}

#[cfg(debug_assertions)]
#[test]
fn a_panic_poisons_only_its_handle() {
    let (p, _s) = tiny_params("sks");
    let t = new_trainer(&p);
    let healthy = new_trainer(&p);
    let e = encoder_of(t);
    let msg = expect(sdti_debug_panic_trainer(t), SDTI_ERR_PANIC, "panic");
    assert!(msg.contains("sdti_debug_panic_trainer was called"), "{msg}");
    // SAFETY: live (poisoned) handles.
    unsafe {
        let msg = expect(
            sdti_trainer_step(t, 1, std::ptr::null_mut()),
            SDTI_ERR_POISONED,
            "step after a panic",
        );
        assert!(msg.contains("poisoned"), "{msg}");
        expect(
            sdti_trainer_export(t, c"x.pt".as_ptr(), 0),
            SDTI_ERR_POISONED,
            "export after a panic",
        );
        expect(
            sdti_encoder_register_trainer(e, t),
            SDTI_ERR_POISONED,
            "register a poisoned trainer",
        );
        expect(
            sdti_encoder_new_from_trainer(t, &mut std::ptr::null_mut()),
            SDTI_ERR_POISONED,
            "encoder from a poisoned trainer",
        );
        add_pictures(healthy, 1);
        expect(
            sdti_trainer_step(healthy, 1, std::ptr::null_mut()),
            SDTI_OK,
            "another trainer still works",
        );
    }
    encode(e, "sks");
    sdti_trainer_free(t);
    sdti_trainer_free(healthy);
    sdti_encoder_free(e);
}

#[test]
fn free_twice_through_different_handles() {
    let (p, _s) = tiny_params("sks");
    let t = new_trainer(&p);
    add_pictures(t, 1);
    // SAFETY: live trainer.
    expect(
        unsafe { sdti_trainer_step(t, 1, std::ptr::null_mut()) },
        SDTI_OK,
        "step",
    );
    let e1 = encoder_of(t);
    let e2 = encoder_of(t);
    let before = encode(e1, "a sks");
    // The trainer and its encoders share the model; each handle is freed on its own.
    sdti_trainer_free(t);
    assert_eq!(
        encode(e2, "a sks"),
        before,
        "the encoder outlives the trainer"
    );
    sdti_trainer_free(t); // twice: a no-op
                          // SAFETY: a freed handle is answered, not dereferenced.
    let msg = expect(
        unsafe { sdti_trainer_step(t, 1, std::ptr::null_mut()) },
        SDTI_ERR_INVALID_HANDLE,
        "step on a freed trainer",
    );
    assert!(msg.contains("not a live trainer"), "{msg}");
    expect(
        sdti_encoder_register_trainer(e1, t),
        SDTI_ERR_INVALID_HANDLE,
        "register a freed trainer",
    );
    sdti_encoder_free(e1);
    sdti_encoder_free(e1);
    assert_eq!(encode(e2, "a sks"), before);
    sdti_encoder_free(e2);
    // A trainer handle passed to the encoder's free is not an encoder: ignored.
    let t2 = new_trainer(&p);
    sdti_encoder_free(t2.cast());
    let mut count = 5;
    // SAFETY: still live.
    expect(
        unsafe { sdti_trainer_image_count(t2, &mut count) },
        SDTI_OK,
        "t2 survives",
    );
    sdti_trainer_free(t2);
}

struct CallbackData {
    trainer: AtomicUsize,
    path: *const c_char,
}

#[test]
fn callback_may_use_its_trainer_and_free_stops_the_run() {
    unsafe extern "C" fn export_then_free(user_data: *mut c_void, p: *const sdti_progress) -> i32 {
        // SAFETY: the test passes a CallbackData and the library a valid progress.
        let (data, step) = unsafe { (&*(user_data as *const CallbackData), (*p).step) };
        let (t, path) = (
            data.trainer.load(Ordering::SeqCst) as *mut sdti_trainer,
            data.path,
        );
        if step == 1 {
            // SAFETY: the handle is unlocked during the callback.
            let rc = unsafe { sdti_trainer_export(t, path, SDTI_FORMAT_AUTO) };
            assert_eq!(rc, SDTI_OK, "export from the callback: {}", last_error());
        } else {
            sdti_trainer_free(t);
        }
        0
    }
    let dir = tempfile::tempdir().unwrap();
    let out = path_c(&dir.path().join("from-callback.pt"));
    let data = CallbackData {
        trainer: AtomicUsize::new(0),
        path: out.as_ptr(),
    };
    let (mut p, _s) = tiny_params("sks");
    p.progress = Some(export_then_free);
    p.progress_user_data = (&data as *const CallbackData).cast_mut().cast();
    let t = new_trainer(&p);
    data.trainer.store(t as usize, Ordering::SeqCst);
    add_pictures(t, 1);
    let mut st = stats();
    // SAFETY: live trainer; the callback frees it at step 2.
    let msg = expect(
        unsafe { sdti_trainer_step(t, 5, &mut st) },
        SDTI_CANCELLED,
        "freed by its callback",
    );
    assert!(msg.contains("freed"), "{msg}");
    assert_eq!(st.steps_done, 2);
    assert!(dir.path().join("from-callback.pt").exists());
}

// ---------------------------------------------------------------- hosts

/// The cdylib that `cargo test` built beside this test binary (target/<profile>/deps,
/// or target/<profile>).
pub(crate) fn cdylib() -> PathBuf {
    let name = format!(
        "{}sdti{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps folder");
    for dir in [deps, deps.parent().unwrap_or(deps)] {
        let p = dir.join(&name);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "{name} not found beside {}: build the cdylib (cargo build)",
        exe.display()
    );
}

fn build_c_host(out: &Path) -> Option<PathBuf> {
    if !have("cc") {
        eprintln!("SKIPPED: cc not found; the C host was not built");
        return None;
    }
    let exe = out.join("c_host");
    run_ok(
        Command::new("cc")
            .args(["-std=c11", "-O1", "-g"])
            .args(STRICT)
            .arg("-I")
            .arg(root().join("include"))
            .arg(root().join("tests/hosts/c_host.c"))
            .arg("-o")
            .arg(&exe)
            .args(["-ldl", "-lm"]),
        "cc c_host.c",
    );
    Some(exe)
}

#[test]
fn c_host_dlopens_the_library_and_runs_a_job() {
    let dir = tempfile::tempdir().unwrap();
    let Some(exe) = build_c_host(dir.path()) else {
        return;
    };
    // The SD 1.x job, then an SDXL prompt against diffusers' numbers.
    let text = run_ok(
        Command::new(&exe)
            .arg(cdylib())
            .arg(fixture("tiny-sd"))
            .arg(dir.path())
            .arg("3")
            .arg(fixture("tiny-sdxl"))
            .arg(fixture("tiny-sdxl-expected.safetensors")),
        "c_host",
    );
    assert!(text.contains("c host: ok"), "{text}");
    assert!(text.contains("sdxl: family 3, context 80 wide"), "{text}");
}

#[test]
fn c_host_under_valgrind_has_no_errors_or_leaks() {
    if !have("valgrind") {
        eprintln!("SKIPPED: valgrind not found; the C host did not run under valgrind (apt-get install valgrind)");
        return;
    }
    if std::env::var_os("SDTI_SKIP_VALGRIND").is_some() {
        eprintln!("SKIPPED: SDTI_SKIP_VALGRIND is set");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(exe) = build_c_host(dir.path()) else {
        return;
    };
    let text = run_ok(
        Command::new("valgrind")
            .args(["--error-exitcode=1", "--leak-check=full", "--quiet"])
            .arg(format!(
                "--suppressions={}",
                root().join("tests/hosts/valgrind.supp").display()
            ))
            .arg(&exe)
            .arg(cdylib())
            .arg(fixture("tiny-sd"))
            .arg(dir.path())
            .arg("1")
            .arg(fixture("tiny-sdxl"))
            .arg(fixture("tiny-sdxl-expected.safetensors")),
        "valgrind c_host",
    );
    assert!(text.contains("c host: ok"), "{text}");
}

#[test]
fn cpp17_host_links_the_library() {
    if !have("c++") {
        eprintln!("SKIPPED: c++ not found; the C++ host was not built");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lib_dir = cdylib().parent().unwrap().to_path_buf();
    let exe = dir.path().join("cpp_host");
    run_ok(
        Command::new("c++")
            .args(["-std=c++17", "-O1"])
            .args(STRICT)
            .arg("-I")
            .arg(root().join("include"))
            .arg(root().join("tests/hosts/cpp_host.cpp"))
            .arg("-o")
            .arg(&exe)
            .arg("-L")
            .arg(&lib_dir)
            .arg("-lsdti")
            .arg(format!("-Wl,-rpath,{}", lib_dir.display())),
        "c++ cpp_host.cpp",
    );
    let text = run_ok(
        Command::new(&exe)
            .arg(fixture("tiny-sd"))
            .arg(dir.path())
            .arg(fixture("tiny-sdxl"))
            .arg(fixture("tiny-sdxl-expected.safetensors")),
        "cpp_host",
    );
    assert!(text.contains("cpp host: ok"), "{text}");
    assert!(text.contains("cpp host sdxl: context [77, 80]"), "{text}");
}

#[test]
fn rust_host_through_libloading() {
    type New =
        unsafe extern "C" fn(*const sdti_trainer_params, *mut *mut sdti_trainer) -> sdti_status;
    type Init = unsafe extern "C" fn(*mut sdti_trainer_params) -> sdti_status;
    type AddImage = unsafe extern "C" fn(
        *mut sdti_trainer,
        *const u8,
        u32,
        u32,
        usize,
        u32,
        *const c_char,
    ) -> sdti_status;
    type Step = unsafe extern "C" fn(*mut sdti_trainer, u32, *mut sdti_step_stats) -> sdti_status;
    type FromTrainer =
        unsafe extern "C" fn(*mut sdti_trainer, *mut *mut sdti_encoder) -> sdti_status;
    type Encode = unsafe extern "C" fn(
        *mut sdti_encoder,
        *const c_char,
        *mut f32,
        usize,
        *mut usize,
        *mut u32,
    ) -> sdti_status;
    type LastError = unsafe extern "C" fn(*mut c_char, usize, *mut usize) -> sdti_status;
    type Free<T> = unsafe extern "C" fn(*mut T);

    // SAFETY: loading our own library, whose exports have exactly these signatures.
    unsafe {
        let lib = libloading::Library::new(cdylib()).expect("load libsdti");
        let abi: libloading::Symbol<unsafe extern "C" fn() -> u32> =
            lib.get(b"sdti_abi_version").unwrap();
        assert_eq!(abi() >> 16, SDTI_ABI_MAJOR);
        let init: libloading::Symbol<Init> = lib.get(b"sdti_trainer_params_init").unwrap();
        let new: libloading::Symbol<New> = lib.get(b"sdti_trainer_new").unwrap();
        let add: libloading::Symbol<AddImage> = lib.get(b"sdti_trainer_add_image").unwrap();
        let step: libloading::Symbol<Step> = lib.get(b"sdti_trainer_step").unwrap();
        let from_trainer: libloading::Symbol<FromTrainer> =
            lib.get(b"sdti_encoder_new_from_trainer").unwrap();
        let encode: libloading::Symbol<Encode> = lib.get(b"sdti_encoder_encode").unwrap();
        let last_error: libloading::Symbol<LastError> = lib.get(b"sdti_last_error").unwrap();
        let free_t: libloading::Symbol<Free<sdti_trainer>> = lib.get(b"sdti_trainer_free").unwrap();
        let free_e: libloading::Symbol<Free<sdti_encoder>> = lib.get(b"sdti_encoder_free").unwrap();

        let mut p = std::mem::MaybeUninit::uninit();
        assert_eq!(init(p.as_mut_ptr()), SDTI_OK);
        let mut p = p.assume_init();
        let model = path_c(&fixture("tiny-sd"));
        p.model_path = model.as_ptr();
        p.token = c"rust-word".as_ptr();
        p.resolution = 64;
        let mut t = std::ptr::null_mut();
        assert_eq!(new(&p, &mut t), SDTI_OK);
        // The library's own last error, separate from this process's copy of sdti.
        assert_eq!(step(t, 1, std::ptr::null_mut()), SDTI_ERR_STATE);
        let mut needed = 0;
        last_error(std::ptr::null_mut(), 0, &mut needed);
        assert!(needed > 1);
        let px = picture(2);
        assert_eq!(
            add(t, px.as_ptr(), 64, 64, 0, SDTI_PIXEL_RGB8, std::ptr::null()),
            SDTI_OK
        );
        let mut st = stats();
        assert_eq!(step(t, 2, &mut st), SDTI_OK);
        assert_eq!(st.step, 2);
        let mut e = std::ptr::null_mut();
        assert_eq!(from_trainer(t, &mut e), SDTI_OK);
        free_t(t);
        let (mut n, mut rows) = (0usize, 0u32);
        let prompt = c"a <rust-word>";
        assert_eq!(
            encode(
                e,
                prompt.as_ptr(),
                std::ptr::null_mut(),
                0,
                &mut n,
                &mut rows
            ),
            SDTI_ERR_BUFFER_TOO_SMALL
        );
        let mut out = vec![0f32; n];
        assert_eq!(
            encode(e, prompt.as_ptr(), out.as_mut_ptr(), n, &mut n, &mut rows),
            SDTI_OK
        );
        assert!(rows == 77 && out.iter().all(|v| v.is_finite()));
        free_e(e);
        // Not unloaded: its compute threads outlive this test (as with any plugin that
        // starts threads, a host keeps it loaded).
        std::mem::forget(lib);
    }
}

#[test]
fn python_comfyui_pack_runs_on_the_library() {
    if !have("python3") {
        eprintln!(
            "SKIPPED: python3 not found; the ComfyUI node pack (Python ctypes host) was not tested"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let text = run_ok(
        Command::new("python3")
            .arg(root().join("plugin-manifests/comfyui/tests/test_nodes.py"))
            .env("SDTI_LIBRARY", cdylib())
            .env("SDTI_TEST_MODEL", fixture("tiny-sd"))
            .env("SDTI_TEST_OUT", dir.path())
            .env("PYTHONDONTWRITEBYTECODE", "1"),
        "python3 test_nodes.py",
    );
    assert!(text.contains("comfyui pack: ok"), "{text}");
    if text.contains("numpy not installed") {
        eprintln!("NOTE: numpy is missing; the pack was tested with nested lists for IMAGE");
    }
}

#[test]
fn comfyui_install_script_gives_a_working_pack() {
    if !(have("sh") && have("python3")) {
        eprintln!("SKIPPED: sh or python3 not found; scripts/install-comfyui.sh was not tested");
        return;
    }
    let comfy = tempfile::tempdir().unwrap();
    run_ok(
        Command::new("sh")
            .arg(root().join("scripts/install-comfyui.sh"))
            .arg(comfy.path())
            .arg("--lib")
            .arg(cdylib()),
        "scripts/install-comfyui.sh",
    );
    let pack = comfy.path().join("custom_nodes/sdti");
    // The installed pack finds the manifest and the library next to itself.
    let out = tempfile::tempdir().unwrap();
    let text = run_ok(
        Command::new("python3")
            .arg(pack.join("tests/test_nodes.py"))
            .env_remove("SDTI_LIBRARY")
            .env("SDTI_TEST_MODEL", fixture("tiny-sd"))
            .env("SDTI_TEST_OUT", out.path())
            .env("PYTHONDONTWRITEBYTECODE", "1"),
        "installed test_nodes.py",
    );
    assert!(text.contains("comfyui pack: ok"), "{text}");
}

#[test]
fn install_script_installs_lib_header_and_pkg_config() {
    if !have("sh") {
        eprintln!("SKIPPED: sh not found");
        return;
    }
    let prefix = tempfile::tempdir().unwrap();
    run_ok(
        Command::new("sh")
            .arg(root().join("scripts/install.sh"))
            .arg("--prefix")
            .arg(prefix.path())
            .arg("--lib")
            .arg(cdylib()),
        "scripts/install.sh",
    );
    let lib = prefix
        .path()
        .join("lib")
        .join(cdylib().file_name().unwrap());
    let header = prefix.path().join("include/sdti.h");
    let pc = prefix.path().join("lib/pkgconfig/sdti.pc");
    for p in [&lib, &header, &pc] {
        assert!(p.exists(), "{} was not installed", p.display());
    }
    let pc_text = std::fs::read_to_string(&pc).unwrap();
    assert!(
        pc_text.contains(&format!("Version: {}", env!("CARGO_PKG_VERSION"))),
        "{pc_text}"
    );
    if !(have("pkg-config") && have("cc")) {
        eprintln!("SKIPPED: pkg-config or cc not found; the installed library was not linked");
        return;
    }
    let flags = run_ok(
        Command::new("pkg-config")
            .args(["--cflags", "--libs", "sdti"])
            .env("PKG_CONFIG_PATH", prefix.path().join("lib/pkgconfig")),
        "pkg-config sdti",
    );
    let src = prefix.path().join("hello.c");
    std::fs::write(
        &src,
        "#include <sdti.h>\n#include <stdio.h>\nint main(void) {\n\
         printf(\"sdti %s\\n\", sdti_version_string());\n\
         return (sdti_abi_version() >> 16) == SDTI_ABI_MAJOR ? 0 : 1;\n}\n",
    )
    .unwrap();
    let exe = prefix.path().join("hello");
    run_ok(
        Command::new("cc")
            .args(["-std=c99"])
            .args(STRICT)
            .arg(&src)
            .arg("-o")
            .arg(&exe)
            .args(flags.split_whitespace())
            .arg(format!(
                "-Wl,-rpath,{}",
                prefix.path().join("lib").display()
            )),
        "cc hello.c with pkg-config flags",
    );
    let text = run_ok(&mut Command::new(&exe), "hello");
    assert!(text.contains(env!("CARGO_PKG_VERSION")), "{text}");
}

/// The integer constants of `include/sdti.h`: `#define NAME value` and `const T NAME = value;`,
/// where value is a literal, possibly cast or parenthesised (`((sdti_format)3)`, `3u`).
/// Expressions of other constants (`SDTI_ABI_VERSION`) are left out.
fn header_constants(header: &str) -> std::collections::BTreeMap<String, i64> {
    let mut out = std::collections::BTreeMap::new();
    for line in header.lines() {
        let line = line.trim();
        let (name, value) = if let Some(rest) = line.strip_prefix("#define ") {
            match rest.split_once(char::is_whitespace) {
                Some((name, value)) => (name, value),
                None => continue,
            }
        } else if let (true, Some((lhs, value))) = (
            line.starts_with("const ") || line.starts_with("static const "),
            line.split_once('='),
        ) {
            match lhs.split_whitespace().last() {
                Some(name) => (name, value.trim_end_matches(';')),
                None => continue,
            }
        } else {
            continue;
        };
        // Drop casts such as `(sdti_format)` and the parentheses around the literal.
        let mut v = value.trim().to_string();
        // Innermost pair first, so `((sdti_format)3)` loses its cast, then its parentheses.
        while let Some(close) = v.find(')') {
            let Some(open) = v[..close].rfind('(') else {
                break;
            };
            let inner = &v[open + 1..close];
            let is_cast = inner
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ' ')
                && inner.chars().any(|c| c.is_ascii_alphabetic());
            let keep = if is_cast {
                String::new()
            } else {
                inner.to_string()
            };
            v = format!("{}{}{}", &v[..open], keep, &v[close + 1..]);
        }
        let v = v.trim().trim_end_matches(['u', 'U', 'l', 'L']);
        let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
            Some(hex) => i64::from_str_radix(hex, 16).ok(),
            None => v.parse::<i64>().ok(),
        };
        if let Some(n) = parsed {
            out.insert(name.to_string(), n);
        }
    }
    out
}

/// Issue 11 item 6: every code in the manifest's `constants` (which the ComfyUI pack sends to
/// the library) is the header's constant of the same meaning, its ABI is the header's, and
/// every format the header can write is either in the manifest or left out for a reason
/// stated here. The ctypes binding's own constants are checked the same way.
#[test]
fn plugin_manifest_codes_match_the_header() {
    // The forms a typed header may use (cbindgen writes casts for typed constants).
    let forms = header_constants(
        "#define A ((sdti_format)3)\n#define B (sdti_precision)2u\n#define C 7\n\
         #define D ((A << 16) | C)\nstatic const int32_t E = 0x13;\n",
    );
    let want = [("A", 3), ("B", 2), ("C", 7), ("E", 19)];
    assert_eq!(
        forms,
        want.map(|(n, v)| (n.to_string(), v)).into(),
        "header_constants"
    );
    let header = std::fs::read_to_string(root().join("include/sdti.h")).unwrap();
    let defines = header_constants(&header);
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("plugin-manifests/sdti.plugin.json")).unwrap(),
    )
    .unwrap();
    let define = |name: &str| -> i64 {
        *defines
            .get(name)
            .unwrap_or_else(|| panic!("include/sdti.h has no integer constant {name}"))
    };
    // Each manifest table, and each of its names with the header constant it stands for.
    let meanings: &[(&str, &[(&str, &str)])] = &[
        (
            "format",
            &[
                ("auto", "SDTI_FORMAT_AUTO"),
                ("a1111-pt", "SDTI_FORMAT_A1111_PT"),
                ("safetensors", "SDTI_FORMAT_SAFETENSORS"),
                ("diffusers", "SDTI_FORMAT_DIFFUSERS_SAFETENSORS"),
                ("diffusers-bin", "SDTI_FORMAT_DIFFUSERS_BIN"),
                ("png", "SDTI_FORMAT_A1111_PNG"),
                ("kohya-pt", "SDTI_FORMAT_KOHYA_PT"),
                ("kohya-safetensors", "SDTI_FORMAT_KOHYA_SAFETENSORS"),
                ("onetrainer", "SDTI_FORMAT_ONETRAINER"),
                ("sdxl", "SDTI_FORMAT_SDXL_SAFETENSORS"),
                ("diffusers-sdxl", "SDTI_FORMAT_DIFFUSERS_SDXL"),
            ],
        ),
        (
            "precision",
            &[
                ("f32", "SDTI_PRECISION_F32"),
                ("f16", "SDTI_PRECISION_F16"),
                ("bf16", "SDTI_PRECISION_BF16"),
                ("auto", "SDTI_PRECISION_AUTO"),
            ],
        ),
        (
            "recompute",
            &[
                ("off", "SDTI_RECOMPUTE_OFF"),
                ("on", "SDTI_RECOMPUTE_ON"),
                ("auto", "SDTI_RECOMPUTE_AUTO"),
            ],
        ),
        (
            "status",
            &[
                ("ok", "SDTI_OK"),
                ("cancelled", "SDTI_CANCELLED"),
                ("invalid_argument", "SDTI_ERR_INVALID_ARGUMENT"),
                ("buffer_too_small", "SDTI_ERR_BUFFER_TOO_SMALL"),
                ("exists", "SDTI_ERR_EXISTS"),
            ],
        ),
        ("write_flags", &[("overwrite", "SDTI_WRITE_OVERWRITE")]),
        (
            "pixel_format",
            &[("rgb8", "SDTI_PIXEL_RGB8"), ("rgba8", "SDTI_PIXEL_RGBA8")],
        ),
    ];
    let constants = manifest["constants"]
        .as_object()
        .expect("manifest constants");
    for (table, values) in constants {
        if table == "format_extension" {
            continue; // file extensions, not codes: checked below
        }
        let Some((_, names)) = meanings.iter().find(|(t, _)| t == table) else {
            panic!("manifest constants.{table}: no header meaning known to this test; add it");
        };
        for (name, code) in values.as_object().expect("a table of codes") {
            let Some((_, define_name)) = names.iter().find(|(n, _)| n == name) else {
                panic!("manifest constants.{table}.{name}: no header constant known to this test");
            };
            assert_eq!(
                code.as_i64(),
                Some(define(define_name)),
                "manifest constants.{table}.{name} is {code}, include/sdti.h has {define_name} {}",
                define(define_name)
            );
        }
    }

    // The library's own name table agrees (sdti_format_from_name).
    let formats = constants["format"].as_object().unwrap();
    for (name, code) in formats.iter().filter(|(n, _)| n.as_str() != "auto") {
        let mut got = u32::MAX;
        let cname = c(name);
        // SAFETY: a NUL-terminated name and a writable out-parameter.
        let status = unsafe { sdti_format_from_name(cname.as_ptr(), &mut got) };
        assert_eq!(
            status,
            SDTI_OK,
            "sdti_format_from_name({name}): {}",
            last_error()
        );
        assert_eq!(Some(i64::from(got)), code.as_i64(), "format {name}");
    }
    let extensions = constants["format_extension"].as_object().unwrap();
    let mut written: Vec<&String> = extensions.keys().collect();
    let mut named: Vec<&String> = formats.keys().filter(|n| n.as_str() != "auto").collect();
    written.sort();
    named.sort();
    assert_eq!(
        written, named,
        "every manifest format has an extension, and only those"
    );

    // Every format the header has is in the manifest, or is one the pack cannot write.
    let left_out = [
        // Read-only source formats (the header says so; checked below).
        "SDTI_FORMAT_A1111_PNG_PIXELS",
        "SDTI_FORMAT_RINONGAL_PT",
        "SDTI_FORMAT_A1111_WEBP_PIXELS",
    ];
    let in_manifest: Vec<&str> = meanings[0].1.iter().map(|(_, d)| *d).collect();
    let header_formats: Vec<&String> = defines
        .keys()
        .filter(|n| n.starts_with("SDTI_FORMAT_"))
        .collect();
    assert!(
        header_formats.len() >= in_manifest.len(),
        "{header_formats:?}"
    );
    for name in header_formats {
        assert!(
            in_manifest.contains(&name.as_str()) || left_out.contains(&name.as_str()),
            "include/sdti.h has {name}, which the manifest lacks: add it to \
             plugin-manifests/sdti.plugin.json (and the pack's Convert choices), or say here \
             why the pack cannot write it"
        );
    }
    for name in &left_out {
        let doc = header
            .lines()
            .collect::<Vec<_>>()
            .windows(2)
            .find(|w| w[1].trim_start().starts_with(&format!("#define {name} ")))
            .map(|w| w[0])
            .unwrap_or_else(|| panic!("{name} missing from include/sdti.h"));
        assert!(
            doc.contains("read only"),
            "{name} is left out as read only; the header says: {doc}"
        );
    }

    // The ABI: the same major, and a minor the header has reached.
    let abi = &manifest["abi"];
    assert_eq!(
        abi["major"].as_i64(),
        Some(define("SDTI_ABI_MAJOR")),
        "manifest abi.major"
    );
    let minor = abi["minor"].as_i64().expect("manifest abi.minor");
    assert!(
        minor <= define("SDTI_ABI_MINOR"),
        "manifest abi.minor {minor} is newer than the header's {}",
        define("SDTI_ABI_MINOR")
    );
    assert_eq!(
        (define("SDTI_ABI_MAJOR"), define("SDTI_ABI_MINOR")),
        (i64::from(SDTI_ABI_MAJOR), i64::from(SDTI_ABI_MINOR)),
        "include/sdti.h and the Rust ABI version differ"
    );

    // The ctypes binding's constants (`SDTI_X = n`, `ABI_MAJOR = n`).
    let binding =
        std::fs::read_to_string(root().join("plugin-manifests/comfyui/sdti_lib.py")).unwrap();
    let mut checked = 0;
    for line in binding.lines() {
        let Some((name, value)) = line.split_once(" = ") else {
            continue;
        };
        let value = value.split('#').next().unwrap().trim();
        let Ok(value) = value.parse::<i64>() else {
            continue;
        };
        let header_name = match name {
            "ABI_MAJOR" => "SDTI_ABI_MAJOR",
            n if n.starts_with("SDTI_") => n,
            _ => continue,
        };
        assert_eq!(value, define(header_name), "sdti_lib.py: {line}");
        checked += 1;
    }
    assert!(
        checked >= 5,
        "sdti_lib.py's constants were not found ({checked})"
    );
}
