//! Files: writing that never leaves a half-written file behind nor replaces what it was
//! not asked to, and bounded reads of whatever path a user gives ([`read`]).

pub mod read;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// What a write does when its destination already exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// Replace it (atomically).
    Replace,
    /// Refuse: the destination may be a user's file of any kind (a symlink too, dangling or
    /// not); the write fails with [`std::io::ErrorKind::AlreadyExists`].
    Refuse,
}

/// A failed write: which step failed and why.
#[derive(Debug)]
pub struct WriteError {
    pub op: &'static str,
    pub source: std::io::Error,
}

/// Prefix and marker of the temporary files a write leaves only if the process dies
/// mid-write (`.NAME.sdti-tmp-PID-N`); [`remove_stale_temp_files`] clears them.
const TMP_MARKER: &str = ".sdti-tmp-";

/// Environment variable for crash tests: when set, a write whose file name contains its
/// value stops after the temporary file is complete and before it is put in place,
/// creates `<temporary file>.held`, and waits there until the process is killed.
pub const HOLD_BEFORE_RENAME_ENV: &str = "SDTI_TEST_HOLD_BEFORE_RENAME";

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// What is at `path`, without following a symlink there: `None` when nothing is.
pub fn existing_kind(path: &Path) -> Option<&'static str> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    let ft = meta.file_type();
    Some(if ft.is_symlink() {
        if std::fs::metadata(path).is_ok() {
            "a symlink"
        } else {
            "a symlink to nothing (dangling or looping)"
        }
    } else if ft.is_dir() {
        "a folder"
    } else if ft.is_file() {
        "a file"
    } else {
        "a special file"
    })
}

/// Writes `bytes` to a new temporary file beside `path`, syncs it and puts it in place, so
/// that `path` holds either what it held before or the whole new content. With
/// [`Existing::Refuse`] nothing that exists at `path` (of any kind) is replaced: the
/// temporary file is hard-linked to `path`, which fails if anything is there, and only
/// where the file system has no hard links is it checked and then renamed.
pub fn write_bytes_atomic(
    path: &Path,
    bytes: &[u8],
    existing: Existing,
) -> std::result::Result<(), WriteError> {
    let fail = |op, source| WriteError { op, source };
    let name = path.file_name().ok_or_else(|| {
        fail(
            "name the file",
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
        )
    })?;
    if existing == Existing::Refuse {
        if let Some(kind) = existing_kind(path) {
            return Err(fail("refuse to replace", already_exists(kind)));
        }
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".{}{TMP_MARKER}{}-{n}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        // create_new: never write through something already at the temporary name.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| fail("create a temporary file", e))?;
        f.write_all(bytes).map_err(|e| fail("write", e))?;
        f.sync_all().map_err(|e| fail("sync", e))?;
        drop(f);
        hold_if_asked(&tmp, name);
        match existing {
            Existing::Replace => {
                std::fs::rename(&tmp, path).map_err(|e| fail("rename into place", e))
            }
            Existing::Refuse => put_in_place_without_replacing(&tmp, path),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

fn already_exists(kind: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        format!("{kind} is already there; ask to overwrite it or choose another name"),
    )
}

fn put_in_place_without_replacing(tmp: &Path, path: &Path) -> std::result::Result<(), WriteError> {
    match std::fs::hard_link(tmp, path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(WriteError {
            op: "refuse to replace",
            source: already_exists(existing_kind(path).unwrap_or("something")),
        }),
        // No hard links here (FAT, some network shares): check, then rename.
        Err(_) => {
            if let Some(kind) = existing_kind(path) {
                return Err(WriteError {
                    op: "refuse to replace",
                    source: already_exists(kind),
                });
            }
            std::fs::rename(tmp, path).map_err(|e| WriteError {
                op: "rename into place",
                source: e,
            })
        }
    }
}

fn hold_if_asked(tmp: &Path, name: &std::ffi::OsStr) {
    let Some(pattern) = std::env::var_os(HOLD_BEFORE_RENAME_ENV) else {
        return;
    };
    if pattern.is_empty() || !name.to_string_lossy().contains(&*pattern.to_string_lossy()) {
        return;
    }
    let mut marker = tmp.as_os_str().to_owned();
    marker.push(".held");
    let _ = std::fs::write(PathBuf::from(marker), b"");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// Writes `bytes` to `path` atomically, replacing what is there (files sdti owns: a run
/// folder's checkpoints, config and logs).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_bytes_atomic(path, bytes, Existing::Replace).map_err(|e| Error::io(path, e.source))
}

/// Removes the temporary files that writes into `dir` left behind when their process was
/// killed mid-write (an interrupted run is resumed in the same folder). Returns how many.
pub fn remove_stale_temp_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let own = format!("{TMP_MARKER}{}-", std::process::id());
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = name.starts_with('.') && name.contains(TMP_MARKER) && !name.contains(&own);
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if ours && is_file && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuse_keeps_every_kind_of_existing_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file.pt");
        std::fs::write(&file, b"user data").unwrap();
        let folder = dir.path().join("folder.pt");
        std::fs::create_dir(&folder).unwrap();
        let mut cases = vec![(file.clone(), "a file"), (folder, "a folder")];
        #[cfg(unix)]
        {
            let dangling = dir.path().join("dangling.pt");
            std::os::unix::fs::symlink(dir.path().join("missing"), &dangling).unwrap();
            let looping = dir.path().join("loop.pt");
            std::os::unix::fs::symlink(&looping, &looping).unwrap();
            let link = dir.path().join("link.pt");
            std::os::unix::fs::symlink(&file, &link).unwrap();
            cases.push((dangling, "dangling"));
            cases.push((looping, "dangling or looping"));
            cases.push((link, "a symlink"));
        }
        for (path, kind) in cases {
            let e = write_bytes_atomic(&path, b"new", Existing::Refuse).unwrap_err();
            assert_eq!(
                e.source.kind(),
                std::io::ErrorKind::AlreadyExists,
                "{path:?}"
            );
            assert!(
                e.source.to_string().contains(kind),
                "{path:?}: {}",
                e.source
            );
        }
        assert_eq!(std::fs::read(&file).unwrap(), b"user data");
        // Nothing left behind.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains(TMP_MARKER)), "{names:?}");
        let fresh = dir.path().join("fresh.pt");
        write_bytes_atomic(&fresh, b"new", Existing::Refuse).unwrap();
        assert_eq!(std::fs::read(&fresh).unwrap(), b"new");
        write_bytes_atomic(&fresh, b"newer", Existing::Replace).unwrap();
        assert_eq!(std::fs::read(&fresh).unwrap(), b"newer");
    }

    #[test]
    fn stale_temp_files_of_dead_writers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join(format!(".w.pt{TMP_MARKER}999999999-0"));
        std::fs::write(&stale, b"half").unwrap();
        std::fs::write(dir.path().join("w.pt"), b"whole").unwrap();
        assert_eq!(remove_stale_temp_files(dir.path()), 1);
        assert!(!stale.exists());
        assert!(dir.path().join("w.pt").exists());
    }
}
