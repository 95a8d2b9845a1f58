//! Bounded reads of user paths (src/io/read.rs): devices are refused at once, a FIFO
//! without a writer does not hang, a pipe is read with the same bound as a file, and the
//! errors name the path as typed, the field and the reason.

use std::ffi::{c_char, CStr, CString};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sdti::embedding::{read_embedding, EmbeddingError, MAX_FILE_BYTES};
use sdti::io::read::{read_bounded_within, ReadFailure, ReadLimit, EMBEDDING_FILE, TEMPLATE_FILE};
use sdti::model::{LoadOptions, SdModel};
use sdti::train::data::{load_rgb, AlphaMode, ImageSource};
use sdti::train::templates::TemplateSet;

use crate::common::fixture;

const DEV_ZERO: &str = "/dev/zero";

/// A new FIFO in `dir`, or `None` (with the reason printed) where there is no `mkfifo`.
fn fifo(dir: &Path, name: &str) -> Option<PathBuf> {
    let path = dir.join(name);
    match Command::new("mkfifo").arg(&path).status() {
        Ok(s) if s.success() => Some(path),
        Ok(s) => {
            eprintln!("skipped: mkfifo {} exited with {s}", path.display());
            None
        }
        Err(e) => {
            eprintln!("skipped: no mkfifo ({e})");
            None
        }
    }
}

/// Writes `bytes` into the FIFO from another thread; returns how many it wrote before
/// the reader went away (a refused read closes its end: the writer gets EPIPE).
fn feed(path: &Path, bytes: Vec<u8>) -> JoinHandle<u64> {
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(&path) else {
            return 0;
        };
        let mut written = 0u64;
        for chunk in bytes.chunks(64 << 10) {
            if f.write_all(chunk).is_err() {
                break;
            }
            written += chunk.len() as u64;
        }
        written
    })
}

fn have_dev_zero() -> bool {
    let ok = Path::new(DEV_ZERO).exists();
    if !ok {
        eprintln!("skipped: no {DEV_ZERO}");
    }
    ok
}

/// Each refusal of /dev/zero comes at once: it is never read (it would never end).
fn quick<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{what} took {:?}",
        start.elapsed()
    );
    out
}

#[test]
fn a_character_device_is_refused_everywhere_a_path_is_read() {
    if !have_dev_zero() {
        return;
    }
    let zero = Path::new(DEV_ZERO);
    let device = "is a character device";

    let e = quick("embedding", || read_embedding(zero).unwrap_err()).to_string();
    assert!(
        e.starts_with("/dev/zero: embedding file: ") && e.contains(device),
        "{e}"
    );

    let e = quick("image", || {
        load_rgb(
            &ImageSource::File(zero.to_path_buf()),
            AlphaMode::Drop,
            false,
        )
        .unwrap_err()
    })
    .to_string();
    assert!(e.starts_with("/dev/zero: ") && e.contains(device), "{e}");

    let e = quick("template", || TemplateSet::from_file(zero).unwrap_err()).to_string();
    assert!(
        e.starts_with("/dev/zero: cannot read template file: ") && e.contains(device),
        "{e}"
    );

    let e = quick("model", || {
        SdModel::load(zero, &LoadOptions::default()).expect_err("/dev/zero is no model")
    })
    .to_string();
    assert!(
        e.starts_with("/dev/zero: model file: ") && e.contains(device),
        "{e}"
    );

    // A caption beside an image that is a link to the device: never read as one.
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("cat.png");
    std::fs::copy(fixture("embeddings/a1111_text.png"), &image).unwrap();
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(zero, dir.path().join("cat.txt")).unwrap();
        let img = sdti::train::data::TrainImage {
            source: ImageSource::File(image),
            caption: None,
        };
        let caption = quick("caption", || sdti::train::data::resolve_caption(&img));
        assert!(caption.is_ok(), "{caption:?}");
    }

    // The C ABI's paths reach the same reads.
    let path = CString::new(DEV_ZERO).unwrap();
    let mut needed = 0usize;
    // SAFETY: a NUL-terminated path; no output buffer, and `needed` is writable.
    let rc = quick("sdti_embedding_inspect", || unsafe {
        sdti::ffi::sdti_embedding_inspect(path.as_ptr(), std::ptr::null_mut(), 0, &mut needed)
    });
    assert_ne!(rc, sdti::ffi::SDTI_OK);
    let mut buf = vec![0 as c_char; 1024];
    // SAFETY: a writable buffer of its length.
    unsafe { sdti::ffi::sdti_last_error(buf.as_mut_ptr(), buf.len(), std::ptr::null_mut()) };
    // SAFETY: sdti_last_error NUL-terminates.
    let e = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy();
    assert!(e.contains("/dev/zero") && e.contains(device), "{e}");
}

#[test]
fn sdti_inspect_refuses_a_device_at_once() {
    if !have_dev_zero() {
        return;
    }
    let out = quick("sdti inspect /dev/zero", || {
        Command::new(env!("CARGO_BIN_EXE_sdti"))
            .args(["inspect", DEV_ZERO])
            .output()
            .expect("the sdti binary runs")
    });
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("/dev/zero: embedding file: is a character device"),
        "{err}"
    );
}

#[test]
fn a_fifo_without_a_writer_does_not_hang() {
    let dir = tempfile::tempdir().unwrap();
    let Some(path) = fifo(dir.path(), "nobody.pt") else {
        return;
    };
    let start = Instant::now();
    let e = read_bounded_within(&path, &EMBEDDING_FILE, Duration::from_millis(300)).unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert!(matches!(e.failure, ReadFailure::TimedOut(_)), "{e}");
    let text = e.to_string();
    assert!(
        text.starts_with(&format!(
            "{}: embedding file: no data arrived",
            path.display()
        )),
        "{text}"
    );

    // Model files are mapped: a FIFO is refused before it is opened.
    let Some(model) = fifo(dir.path(), "model.safetensors") else {
        return;
    };
    let e = quick("model", || {
        SdModel::load(&model, &LoadOptions::default()).expect_err("a FIFO is no model")
    })
    .to_string();
    assert!(
        e.contains("model file: is a pipe, not a regular file"),
        "{e}"
    );
}

#[test]
fn a_fifo_fed_past_the_limit_is_refused_after_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let Some(path) = fifo(dir.path(), "flood.txt") else {
        return;
    };
    let limit = ReadLimit {
        max_bytes: 1 << 20,
        ..TEMPLATE_FILE
    };
    let writer = feed(&path, vec![b'a'; 8 << 20]);
    let e = read_bounded_within(&path, &limit, Duration::from_secs(5)).unwrap_err();
    let written = writer.join().unwrap();
    match e.failure {
        ReadFailure::TooLarge { size, read, .. } => {
            assert_eq!(size, None, "a pipe has no size");
            // The reader stops one byte past the limit, whatever the writer has left.
            assert_eq!(read, limit.max_bytes + 1);
        }
        other => panic!("{other}"),
    }
    // The writer's count adds at most the pipe's own buffer and a chunk in flight.
    assert!(written < limit.max_bytes + (2 << 20), "{written}");
}

#[test]
fn an_embedding_through_a_fifo_is_read_with_the_same_limit() {
    let dir = tempfile::tempdir().unwrap();
    let Some(path) = fifo(dir.path(), "word.pt") else {
        return;
    };
    let source = fixture("embeddings/a1111_sd1.pt");
    let want = read_embedding(&source).unwrap();

    let writer = feed(&path, std::fs::read(&source).unwrap());
    let got = read_embedding(&path).unwrap();
    writer.join().unwrap();
    assert_eq!(got.parts, want.parts);

    // More than the embedding limit through the same FIFO: refused once it arrived.
    let writer = feed(&path, vec![0u8; (MAX_FILE_BYTES + (4 << 20)) as usize]);
    let e = read_embedding(&path).unwrap_err();
    let written = writer.join().unwrap();
    assert!(matches!(e, EmbeddingError::TooLarge { .. }), "{e}");
    assert!(written < MAX_FILE_BYTES + (2 << 20), "{written}");
    assert!(
        e.to_string().starts_with(&path.display().to_string()),
        "{e}"
    );
}

#[test]
fn a_process_substitution_is_named_as_typed() {
    if Command::new("bash").arg("-c").arg("true").status().is_err() {
        eprintln!("skipped: no bash");
        return;
    }
    let sdti = env!("CARGO_BIN_EXE_sdti");
    let source = fixture("embeddings/a1111_sd1.pt");
    let run = |script: String| {
        Command::new("bash")
            .arg("-c")
            .arg(script)
            .output()
            .expect("bash runs")
    };
    let out = run(format!("'{sdti}' inspect <(cat '{}')", source.display()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Not an embedding: the error names /dev/fd/N, not the bare number.
    let out = run(format!("'{sdti}' inspect <(echo not an embedding)"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("error: /dev/fd/"), "{err}");

    // The kind a path has is checked on what opened, so /dev/stdin works as a pipe too.
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "cat '{}' | '{sdti}' inspect /dev/stdin",
            source.display()
        ))
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
