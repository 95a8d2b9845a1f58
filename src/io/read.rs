//! Bounded reads of the paths a user gives: every file sdti reads whole from a path it
//! was handed (embeddings, images, captions, templates, configs, checkpoints) comes
//! through [`read_bounded`] or [`read_text`], and every file it memory-maps or hands to
//! another library through [`open_regular`].
//!
//! Why not `std::fs::read` after a size check: the size in a file's metadata is 0 for a
//! character device or a pipe, so `/dev/zero` passed the check and was read until the
//! machine ran out of memory, and opening a FIFO that nobody writes to blocked forever.
//! Here the bound is counted on the bytes that arrive, whatever the metadata says;
//! opening never waits for a writer (`O_NONBLOCK`), a pipe is read only while data keeps
//! coming ([`PIPE_WAIT`]), and anything that is neither a regular file nor a pipe
//! (devices, sockets, folders) is refused before it is opened.
//!
//! A pipe is read on purpose: `sdti inspect <(curl ...)`, `/dev/stdin`, a named FIFO.
//! Errors name the path as the user typed it (`/dev/fd/63`, what bash passed), the field
//! ("embedding file", "caption", ...) and the reason.

use std::fmt;
use std::fs::{File, FileType};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// What one kind of file is called in messages and how large it may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadLimit {
    /// What the file is to the user: "embedding file", "caption", ...
    pub field: &'static str,
    /// The most bytes accepted.
    pub max_bytes: u64,
    /// Why that is enough, said when a file is refused.
    pub why: &'static str,
}

/// Learned-embedding files keep the readers' own bound ([`crate::embedding::MAX_FILE_BYTES`]).
pub const EMBEDDING_FILE: ReadLimit = ReadLimit {
    field: "embedding file",
    max_bytes: crate::embedding::MAX_FILE_BYTES,
    why: "learned-embedding files are kilobytes, A1111 preview PNGs a few MiB",
};

/// Training pictures: 64 Mpx (the decoder's `MAX_PIXELS`) of incompressible RGB is 192 MiB.
pub const TRAINING_IMAGE: ReadLimit = ReadLimit {
    field: "training image",
    max_bytes: 256 * MIB,
    why: "a picture at the 64 Mpx limit is at most about 192 MiB even uncompressed",
};

/// A caption is a line of text; CLIP reads 75 tokens of it.
pub const CAPTION: ReadLimit = ReadLimit {
    field: "caption",
    max_bytes: MIB,
    why: "a caption is a line of text, of which CLIP reads 75 tokens",
};

/// A1111's template files are a few dozen short lines.
pub const TEMPLATE_FILE: ReadLimit = ReadLimit {
    field: "template file",
    max_bytes: 4 * MIB,
    why: "template files are a few dozen lines of text",
};

/// diffusers `config.json`, `model_index.json` and shard indexes are kilobytes.
pub const MODEL_CONFIG: ReadLimit = ReadLimit {
    field: "model config",
    max_bytes: 4 * MIB,
    why: "diffusers configs and shard indexes are kilobytes",
};

/// `scheduler_config.json` holds a dozen numbers (a `trained_betas` list of 1000 at most).
pub const SCHEDULER_CONFIG: ReadLimit = ReadLimit {
    field: "scheduler config",
    max_bytes: 4 * MIB,
    why: "scheduler configs are kilobytes",
};

/// A run folder's `config.json`: the run's options, kilobytes.
pub const RUN_CONFIG: ReadLimit = ReadLimit {
    field: "run config",
    max_bytes: 4 * MIB,
    why: "a run's options are kilobytes",
};

/// A run folder's `loss.csv`: about 40 bytes a step, so over a million steps fit.
pub const LOSS_LOG: ReadLimit = ReadLimit {
    field: "loss log",
    max_bytes: 64 * MIB,
    why: "about 40 bytes a step, over a million steps",
};

/// Training checkpoints: the vectors and two AdamW moments (3 x 75 x 2048 f32 is 1.8 MiB
/// at the widest) plus the run's state as JSON.
pub const TRAINING_CHECKPOINT: ReadLimit = ReadLimit {
    field: "training checkpoint",
    max_bytes: 16 * MIB,
    why: "75 vectors with their optimizer moments and the run's state are a few MiB",
};

/// How long a pipe may stay silent (before its first byte and between chunks) before the
/// read gives up: a writer that started is rarely this slow, one that never will is told.
pub const PIPE_WAIT: Duration = Duration::from_secs(10);

/// Bytes asked of the source per read call.
const CHUNK: usize = 64 << 10;
/// Most the buffer grows by at once, so it never holds more than what arrived plus this.
const MAX_GROWTH: usize = 8 << 20;

/// What is at a path, as the refusals say it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Regular,
    /// A FIFO or an anonymous pipe (`/dev/fd/N`, `/dev/stdin`).
    Pipe,
    Directory,
    CharDevice,
    BlockDevice,
    Socket,
    Other,
}

impl FileKind {
    fn of(ft: &FileType) -> FileKind {
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileTypeExt;
            if ft.is_fifo() {
                return FileKind::Pipe;
            }
            if ft.is_char_device() {
                return FileKind::CharDevice;
            }
            if ft.is_block_device() {
                return FileKind::BlockDevice;
            }
            if ft.is_socket() {
                return FileKind::Socket;
            }
        }
        if ft.is_file() {
            FileKind::Regular
        } else if ft.is_dir() {
            FileKind::Directory
        } else {
            FileKind::Other
        }
    }
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileKind::Regular => "a regular file",
            FileKind::Pipe => "a pipe",
            FileKind::Directory => "a folder",
            FileKind::CharDevice => "a character device",
            FileKind::BlockDevice => "a block device",
            FileKind::Socket => "a socket",
            FileKind::Other => "a special file",
        })
    }
}

/// Why a read was refused or failed.
#[derive(Debug)]
pub enum ReadFailure {
    /// Opening or reading failed in the operating system.
    Io(io::Error),
    /// Neither a regular file nor a pipe.
    NotReadable(FileKind),
    /// Not a regular file where one is needed (memory-mapped, or opened by another library).
    NotRegular(FileKind),
    /// More than the limit: `size` is the metadata's length for a regular file, `None`
    /// when the excess was found by reading; `read` is what was taken from the source.
    TooLarge {
        limit: ReadLimit,
        size: Option<u64>,
        read: u64,
    },
    /// A pipe stayed silent for the whole wait.
    TimedOut(Duration),
    /// Text was expected.
    NotUtf8,
}

impl fmt::Display for ReadFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadFailure::Io(e) => write!(f, "{e}"),
            ReadFailure::NotReadable(kind) => {
                write!(f, "is {kind}; only regular files and pipes are read")
            }
            ReadFailure::NotRegular(kind) => write!(
                f,
                "is {kind}, not a regular file (model files are memory-mapped, which needs one)"
            ),
            ReadFailure::TooLarge { limit, size, .. } => {
                match size {
                    Some(n) => write!(f, "is {n} bytes")?,
                    None => write!(f, "more than {} bytes arrived", limit.max_bytes)?,
                }
                write!(
                    f,
                    ", over the {} MiB limit for a {} ({})",
                    limit.max_bytes / MIB,
                    limit.field,
                    limit.why
                )
            }
            ReadFailure::TimedOut(wait) => write!(
                f,
                "no data arrived on this pipe for {} s; is anything writing to it?",
                wait.as_secs_f64()
            ),
            ReadFailure::NotUtf8 => f.write_str("is not valid UTF-8 text"),
        }
    }
}

impl std::error::Error for ReadFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ReadFailure::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl ReadFailure {
    fn io_kind(&self) -> io::ErrorKind {
        match self {
            ReadFailure::Io(e) => e.kind(),
            ReadFailure::NotReadable(_) | ReadFailure::NotRegular(_) => io::ErrorKind::InvalidInput,
            ReadFailure::TooLarge { .. } | ReadFailure::NotUtf8 => io::ErrorKind::InvalidData,
            ReadFailure::TimedOut(_) => io::ErrorKind::TimedOut,
        }
    }
}

/// A refused or failed read: the path as given, the field and the reason.
#[derive(Debug)]
pub struct ReadError {
    pub path: PathBuf,
    pub field: &'static str,
    pub failure: ReadFailure,
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: {}",
            self.path.display(),
            self.field,
            self.failure
        )
    }
}

impl std::error::Error for ReadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.failure.source()
    }
}

impl ReadError {
    fn new(path: &Path, field: &'static str, failure: ReadFailure) -> ReadError {
        ReadError {
            path: path.to_path_buf(),
            field,
            failure,
        }
    }

    /// The kind of `io::Error` this is (`NotFound` for a missing file).
    pub fn kind(&self) -> io::ErrorKind {
        self.failure.io_kind()
    }

    /// The reason alone, as an `io::Error`, for error types that already name the path
    /// and the field (`"{path}: cannot read template file: {source}"`).
    pub fn into_reason(self) -> io::Error {
        match self.failure {
            ReadFailure::Io(e) => e,
            other => io::Error::new(other.io_kind(), other),
        }
    }
}

/// The field and the reason, for [`crate::error::Error::Io`], which prints the path itself.
#[derive(Debug)]
struct FieldReason {
    field: &'static str,
    failure: ReadFailure,
}

impl fmt::Display for FieldReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.failure)
    }
}

impl std::error::Error for FieldReason {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.failure.source()
    }
}

impl From<ReadError> for crate::error::Error {
    fn from(e: ReadError) -> Self {
        let kind = e.failure.io_kind();
        crate::error::Error::Io {
            path: e.path,
            source: io::Error::new(
                kind,
                FieldReason {
                    field: e.field,
                    failure: e.failure,
                },
            ),
        }
    }
}

/// What a read returned: the bytes and what they came from.
#[derive(Debug)]
pub struct Contents {
    pub bytes: Vec<u8>,
    pub kind: FileKind,
}

/// Reads the whole of `path` (a regular file or a pipe), at most `limit.max_bytes`.
pub fn read_bounded(path: &Path, limit: &ReadLimit) -> Result<Vec<u8>, ReadError> {
    read_bounded_within(path, limit, PIPE_WAIT).map(|c| c.bytes)
}

/// [`read_bounded`] for UTF-8 text.
pub fn read_text(path: &Path, limit: &ReadLimit) -> Result<String, ReadError> {
    let bytes = read_bounded(path, limit)?;
    String::from_utf8(bytes).map_err(|_| ReadError::new(path, limit.field, ReadFailure::NotUtf8))
}

/// [`read_bounded`] with the pipe's wait chosen by the caller; says what was read.
pub fn read_bounded_within(
    path: &Path,
    limit: &ReadLimit,
    pipe_wait: Duration,
) -> Result<Contents, ReadError> {
    let fail = |failure| ReadError::new(path, limit.field, failure);
    // Look before opening: opening a device can have effects of its own (a tape rewinds).
    let kind = stat_kind(path).map_err(&fail)?;
    if !matches!(kind, FileKind::Regular | FileKind::Pipe) {
        return Err(fail(ReadFailure::NotReadable(kind)));
    }
    let (mut file, meta) = open_no_wait(path).map_err(|e| fail(ReadFailure::Io(e)))?;
    // The path may have changed between the look and the open: what counts is what opened.
    let kind = FileKind::of(&meta.file_type());
    match kind {
        FileKind::Regular => {
            if meta.len() > limit.max_bytes {
                return Err(fail(ReadFailure::TooLarge {
                    limit: *limit,
                    size: Some(meta.len()),
                    read: 0,
                }));
            }
            set_blocking(&file).map_err(|e| fail(ReadFailure::Io(e)))?;
            let bytes = read_capped(&mut file, limit, None).map_err(&fail)?;
            Ok(Contents { bytes, kind })
        }
        FileKind::Pipe => {
            let bytes = read_capped(&mut &file, limit, Some((&file, pipe_wait))).map_err(&fail)?;
            Ok(Contents { bytes, kind })
        }
        other => Err(fail(ReadFailure::NotReadable(other))),
    }
}

/// Opens `path` for a library that maps it or reads it itself (safetensors weights),
/// refusing anything but a regular file. `field` names it in errors ("model file").
pub fn open_regular(path: &Path, field: &'static str) -> Result<File, ReadError> {
    let fail = |failure| ReadError::new(path, field, failure);
    let kind = stat_kind(path).map_err(&fail)?;
    if kind != FileKind::Regular {
        return Err(fail(ReadFailure::NotRegular(kind)));
    }
    let (file, meta) = open_no_wait(path).map_err(|e| fail(ReadFailure::Io(e)))?;
    let kind = FileKind::of(&meta.file_type());
    if kind != FileKind::Regular {
        return Err(fail(ReadFailure::NotRegular(kind)));
    }
    set_blocking(&file).map_err(|e| fail(ReadFailure::Io(e)))?;
    Ok(file)
}

/// Reads everything `source` gives, refusing as soon as more than the limit arrived.
/// Works on any reader, so the bound is tested without files.
pub fn read_capped_from(source: &mut dyn Read, limit: &ReadLimit) -> Result<Vec<u8>, ReadFailure> {
    read_capped(source, limit, None)
}

fn stat_kind(path: &Path) -> Result<FileKind, ReadFailure> {
    std::fs::metadata(path)
        .map(|m| FileKind::of(&m.file_type()))
        .map_err(ReadFailure::Io)
}

/// A pipe to wait on: its descriptor's file, and how long to wait for data.
type PipeWait<'a> = Option<(&'a File, Duration)>;

/// Reads until end of file. With `pipe`, the source is that non-blocking pipe: wait up to
/// the given time for data before each read that would block, and before the first (a
/// FIFO whose writer has not connected yet reads as end of file).
fn read_capped(
    source: &mut dyn Read,
    limit: &ReadLimit,
    pipe: PipeWait<'_>,
) -> Result<Vec<u8>, ReadFailure> {
    // One byte past the limit is enough to know it was passed.
    let stop = usize::try_from(limit.max_bytes.saturating_add(1)).unwrap_or(usize::MAX);
    let mut chunk = vec![0u8; CHUNK];
    let mut out: Vec<u8> = Vec::new();
    wait_for_data(pipe)?;
    loop {
        let want = CHUNK.min(stop - out.len());
        let n = match source.read(&mut chunk[..want]) {
            Ok(0) => return Ok(out),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && pipe.is_some() => {
                wait_for_data(pipe)?;
                continue;
            }
            Err(e) => return Err(ReadFailure::Io(e)),
        };
        if out.capacity() - out.len() < n {
            // Grow with what arrived (amortised), never past the stop nor by more than
            // MAX_GROWTH at once: what is held is what arrived plus a bounded margin.
            let grow = out.len().clamp(CHUNK, MAX_GROWTH).min(stop - out.len());
            out.reserve_exact(grow.max(n));
        }
        out.extend_from_slice(&chunk[..n]);
        if out.len() >= stop {
            return Err(ReadFailure::TooLarge {
                limit: *limit,
                size: None,
                read: out.len() as u64,
            });
        }
    }
}

/// Waits until the pipe has data or its writer left; without a pipe, returns at once.
fn wait_for_data(pipe: PipeWait<'_>) -> Result<(), ReadFailure> {
    let Some((file, wait)) = pipe else {
        return Ok(());
    };
    match poll_readable(file, wait) {
        Ok(true) => Ok(()),
        Ok(false) => Err(ReadFailure::TimedOut(wait)),
        Err(e) => Err(ReadFailure::Io(e)),
    }
}

#[cfg(unix)]
fn open_no_wait(path: &Path) -> io::Result<(File, std::fs::Metadata)> {
    use std::os::unix::fs::OpenOptionsExt;
    // O_NONBLOCK: opening a FIFO with no writer returns at once instead of waiting for one.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    Ok((file, meta))
}

#[cfg(not(unix))]
fn open_no_wait(path: &Path) -> io::Result<(File, std::fs::Metadata)> {
    let file = File::open(path)?;
    let meta = file.metadata()?;
    Ok((file, meta))
}

/// Regular files are read and mapped in blocking mode, as every library expects.
#[cfg(unix)]
fn set_blocking(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor `file` owns and keeps open; F_GETFL reads its flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; F_SETFL changes only this descriptor's status flags.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(unix))]
fn set_blocking(_file: &File) -> io::Result<()> {
    Ok(())
}

/// Whether the pipe became readable (data, or its writer left) within `wait`.
#[cfg(unix)]
fn poll_readable(file: &File, wait: Duration) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let deadline = std::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        // Rounded up, so that the last fraction of a millisecond does not spin.
        let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        let mut pfd = libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for a descriptor `file` owns and keeps open.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc > 0 {
            // POLLIN, POLLHUP or POLLERR: the next read says which.
            return Ok(true);
        }
        if rc == 0 {
            if std::time::Instant::now() >= deadline {
                return Ok(false);
            }
            continue;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Elsewhere pipes are refused before they are read (only regular files open).
#[cfg(not(unix))]
fn poll_readable(_file: &File, _wait: Duration) -> io::Result<bool> {
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: ReadLimit = ReadLimit {
        field: "test file",
        max_bytes: 1 << 20,
        why: "a test limit",
    };

    #[test]
    fn the_limit_is_counted_on_what_arrives() {
        let exact = vec![7u8; SMALL.max_bytes as usize];
        let got = read_capped_from(&mut exact.as_slice(), &SMALL).unwrap();
        assert_eq!(got.len(), exact.len());

        // An endless source (what /dev/zero is) stops one byte past the limit.
        let e = read_capped_from(&mut io::repeat(0), &SMALL).unwrap_err();
        match e {
            ReadFailure::TooLarge { size, read, .. } => {
                assert_eq!(size, None);
                assert_eq!(read, SMALL.max_bytes + 1);
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn the_buffer_holds_what_arrived_plus_a_bounded_margin() {
        let big = ReadLimit {
            max_bytes: 64 << 20,
            ..SMALL
        };
        for len in [0usize, 1, CHUNK + 1, 3 << 20, 20 << 20] {
            let data = vec![1u8; len];
            let got = read_capped_from(&mut data.as_slice(), &big).unwrap();
            assert_eq!(got.len(), len);
            assert!(
                got.capacity() <= len + MAX_GROWTH,
                "{len} bytes held in {}",
                got.capacity()
            );
        }
    }

    #[test]
    fn errors_name_the_path_the_field_and_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.txt");
        let e = read_bounded(&missing, &CAPTION).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("{}: caption: ", missing.display())),
            "{text}"
        );

        let e = read_bounded(dir.path(), &TEMPLATE_FILE).unwrap_err();
        assert!(matches!(
            e.failure,
            ReadFailure::NotReadable(FileKind::Directory)
        ));
        assert!(e.to_string().contains("template file: is a folder"), "{e}");

        let e = open_regular(dir.path(), "model file").unwrap_err();
        assert!(e.to_string().contains("model file: is a folder"), "{e}");

        // Through the engine's error, the path is said once, then the field.
        let big = dir.path().join("big.json");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MODEL_CONFIG.max_bytes + 1)
            .unwrap();
        let e: crate::error::Error = read_text(&big, &MODEL_CONFIG).unwrap_err().into();
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("{}: model config: is ", big.display()))
                && text.contains("over the 4 MiB limit"),
            "{text}"
        );

        let bad = dir.path().join("bad.txt");
        std::fs::write(&bad, [0xff, 0xfe]).unwrap();
        let e = read_text(&bad, &CAPTION).unwrap_err();
        assert!(matches!(e.failure, ReadFailure::NotUtf8), "{e}");
    }

    #[test]
    fn regular_files_are_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        std::fs::write(&p, "a caption\n").unwrap();
        assert_eq!(read_text(&p, &CAPTION).unwrap(), "a caption\n");
        let c = read_bounded_within(&p, &CAPTION, PIPE_WAIT).unwrap();
        assert_eq!(c.kind, FileKind::Regular);
        assert!(open_regular(&p, "model file").is_ok());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn devices_are_refused_before_they_are_read() {
        let zero = Path::new("/dev/zero");
        let e = read_bounded(zero, &EMBEDDING_FILE).unwrap_err();
        assert!(matches!(
            e.failure,
            ReadFailure::NotReadable(FileKind::CharDevice)
        ));
        assert_eq!(
            e.to_string(),
            "/dev/zero: embedding file: is a character device; only regular files and pipes are read"
        );
        let e = open_regular(zero, "model file").unwrap_err();
        assert!(matches!(
            e.failure,
            ReadFailure::NotRegular(FileKind::CharDevice)
        ));
    }
}
