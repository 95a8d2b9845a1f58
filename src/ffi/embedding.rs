//! `sdti_embedding_*`: learned-embedding files without a model (convert, inspect), and
//! the `SDTI_FORMAT_*` codes.

use std::ffi::c_char;
use std::path::Path;

use super::boundary::*;
use super::*;
use crate::embedding::{inspect, read_embedding, write_embedding_to, Existing, Format, Precision};

/// Pick the format from the file extension (`.pt`, `.safetensors`, `.bin`, `.png`).
pub const SDTI_FORMAT_AUTO: sdti_format = 0;
/// A1111 `.pt` (torch zip pickle with `string_to_param`).
pub const SDTI_FORMAT_A1111_PT: sdti_format = 1;
/// safetensors with the single key `emb_params` (A1111, kohya).
pub const SDTI_FORMAT_SAFETENSORS: sdti_format = 2;
/// diffusers `learned_embeds.safetensors` (`{token: [n, dim]}`).
pub const SDTI_FORMAT_DIFFUSERS_SAFETENSORS: sdti_format = 3;
/// diffusers `learned_embeds.bin` (torch zip pickle `{token: tensor}`).
pub const SDTI_FORMAT_DIFFUSERS_BIN: sdti_format = 4;
/// A1111 PNG with the `sd-ti-embedding` text chunk.
pub const SDTI_FORMAT_A1111_PNG: sdti_format = 5;
/// kohya sd-scripts `.pt` (`emb_params`).
pub const SDTI_FORMAT_KOHYA_PT: sdti_format = 6;
/// kohya sd-scripts `.safetensors` (`emb_params`).
pub const SDTI_FORMAT_KOHYA_SAFETENSORS: sdti_format = 7;
/// OneTrainer safetensors (`emp_params`, or `clip_l`/`clip_g`).
pub const SDTI_FORMAT_ONETRAINER: sdti_format = 8;
/// SDXL safetensors (`clip_l` + `clip_g`); only for SDXL embeddings.
pub const SDTI_FORMAT_SDXL_SAFETENSORS: sdti_format = 9;
/// A1111 PNG with the vectors in the pixel borders (read only: a source format).
pub const SDTI_FORMAT_A1111_PNG_PIXELS: sdti_format = 10;
/// rinongal/textual_inversion `.pt` (read only: a source format).
pub const SDTI_FORMAT_RINONGAL_PT: sdti_format = 11;
/// A1111 lossless WebP with the vectors in the pixel borders (read only: a source format).
pub const SDTI_FORMAT_A1111_WEBP_PIXELS: sdti_format = 12;
/// diffusers' SDXL pair (`textual_inversion_sdxl.py`), only for SDXL embeddings: a write to
/// `NAME.safetensors` also writes `NAME_2.safetensors` beside it (clip_l `{token: [n, 768]}`
/// in the first, clip_g `{token: [n, 1280]}` in the second), both or neither.
pub const SDTI_FORMAT_DIFFUSERS_SDXL: sdti_format = 13;

/// Write flag: replace whatever is at the destination (without it, a write refuses with
/// `SDTI_ERR_EXISTS`).
pub const SDTI_WRITE_OVERWRITE: sdti_write_flags = 1;

/// Every `SDTI_FORMAT_*` code but `AUTO`, with its engine format: one table for both
/// directions.
const FORMAT_CODES: [(u32, Format); 13] = [
    (SDTI_FORMAT_A1111_PT, Format::A1111Pt),
    (SDTI_FORMAT_SAFETENSORS, Format::A1111Safetensors),
    (
        SDTI_FORMAT_DIFFUSERS_SAFETENSORS,
        Format::DiffusersSafetensors,
    ),
    (SDTI_FORMAT_DIFFUSERS_BIN, Format::DiffusersBin),
    (SDTI_FORMAT_A1111_PNG, Format::A1111Png),
    (SDTI_FORMAT_KOHYA_PT, Format::KohyaPt),
    (SDTI_FORMAT_KOHYA_SAFETENSORS, Format::KohyaSafetensors),
    (SDTI_FORMAT_ONETRAINER, Format::OneTrainer),
    (SDTI_FORMAT_SDXL_SAFETENSORS, Format::SdxlSafetensors),
    (SDTI_FORMAT_A1111_PNG_PIXELS, Format::A1111PngPixels),
    (SDTI_FORMAT_RINONGAL_PT, Format::RinongalPt),
    (SDTI_FORMAT_A1111_WEBP_PIXELS, Format::A1111WebpPixels),
    (SDTI_FORMAT_DIFFUSERS_SDXL, Format::DiffusersSdxl),
];

/// What a write does with an existing destination, from `SDTI_WRITE_*` flags.
pub(crate) fn existing_for(flags: u32) -> FfiResult<Existing> {
    match flags {
        0 => Ok(Existing::Refuse),
        SDTI_WRITE_OVERWRITE => Ok(Existing::Replace),
        other => Err(invalid(format!(
            "flags {other:#x}: the only write flag is SDTI_WRITE_OVERWRITE (1)"
        ))),
    }
}

/// The engine format of an `SDTI_FORMAT_*` code; `sdxl` says the word is an SDXL one.
pub(crate) fn format_for(code: u32, path: &Path, sdxl: bool) -> FfiResult<Format> {
    Ok(match code {
        // `.safetensors`: `emb_params` for one-table words, `{clip_l, clip_g}` for SDXL's.
        SDTI_FORMAT_AUTO => Format::from_extension(path, sdxl).ok_or_else(|| {
            invalid(format!(
                "{}: SDTI_FORMAT_AUTO needs the extension .pt, .safetensors, .bin or .png; pass a format",
                path.display()
            ))
        })?,
        other => match FORMAT_CODES.iter().find(|(c, _)| *c == other) {
            Some((_, f)) => *f,
            None => {
                return Err(invalid(format!(
                    "format {other} is not an SDTI_FORMAT_* value (0..={})",
                    FORMAT_CODES.len()
                )))
            }
        },
    })
}

/// Reads `src` (any layout sdti reads, detected from the bytes) and writes it to `dst` as
/// `format` at `precision` (`SDTI_PRECISION_F32` or `_F16`), atomically, refusing to
/// replace anything at `dst`: `sdti_embedding_convert_ex` with `flags` 0.
///
/// # Safety
/// `src` and `dst` are NUL-terminated strings.
///
/// `[thread-safe]`
#[no_mangle]
pub unsafe extern "C" fn sdti_embedding_convert(
    src: *const c_char,
    dst: *const c_char,
    format: sdti_format,
    precision: sdti_precision,
) -> sdti_status {
    // SAFETY: forwarded contract.
    unsafe { sdti_embedding_convert_ex(src, dst, format, precision, 0) }
}

/// Reads `src` (any layout sdti reads, detected from the bytes) and writes it to `dst` as
/// `format` at `precision` (`SDTI_PRECISION_F32` or `_F16`), atomically. `flags`: 0, or
/// `SDTI_WRITE_OVERWRITE` to replace what is at `dst`. A diffusers SDXL pair is read from
/// `"FIRST+SECOND"` (`learned_embeds.safetensors+learned_embeds_2.safetensors`) or from a
/// folder holding those two names; `SDTI_FORMAT_DIFFUSERS_SDXL` writes `dst` and
/// `NAME_2.safetensors` beside it, and with `flags` 0 refuses when either exists.
///
/// Statuses: `SDTI_ERR_EMBEDDING` (unreadable or malformed `src`), `SDTI_ERR_EXISTS`
/// (something is at `dst`, a dangling symlink included, and `flags` is 0), `SDTI_ERR_IO`,
/// `SDTI_ERR_UNSUPPORTED` (e.g. an SDXL file as a single-tensor format, a read-only
/// format), `SDTI_ERR_INVALID_ARGUMENT` (unknown format, precision or flag).
///
/// # Safety
/// `src` and `dst` are NUL-terminated strings.
///
/// `[thread-safe]`
#[no_mangle]
pub unsafe extern "C" fn sdti_embedding_convert_ex(
    src: *const c_char,
    dst: *const c_char,
    format: sdti_format,
    precision: sdti_precision,
    flags: sdti_write_flags,
) -> sdti_status {
    call(|| {
        // SAFETY: NUL-terminated by contract.
        let (src, dst) = unsafe { (cpath(src, "src")?, cpath(dst, "dst")?) };
        // An unknown code is refused before the source is read.
        format_for(format, &dst, false)?;
        let existing = existing_for(flags)?;
        let precision = match precision {
            SDTI_PRECISION_F32 => Precision::F32,
            SDTI_PRECISION_F16 => Precision::F16,
            other => {
                return Err(invalid(format!(
                    "precision {other}: embedding files are written as SDTI_PRECISION_F32 (0) or SDTI_PRECISION_F16 (1)"
                )))
            }
        };
        let emb = read_embedding(&src)?;
        let format = format_for(format, &dst, emb.parts.len() > 1)?;
        write_embedding_to(&dst, &emb, format, precision, existing)?;
        Ok(())
    })
}

/// The `SDTI_FORMAT_*` code of a format name: any name `sdti_embedding_inspect` prints as
/// `source_format` (`"a1111-pt"`, `"safetensors"`, `"png-pixels"`, ...) or the `sdti`
/// command's `--format` takes, case-insensitive. Read-only formats have codes too (a
/// write to them fails with `SDTI_ERR_UNSUPPORTED`). `*code` is written on success.
///
/// Statuses: `SDTI_ERR_INVALID_ARGUMENT` (NULL, or an unknown name; the last error lists
/// the known ones).
///
/// # Safety
/// `name` is NULL or NUL-terminated; `code` is NULL or writable.
///
/// `[thread-safe]`
#[no_mangle]
pub unsafe extern "C" fn sdti_format_from_name(
    name: *const c_char,
    code: *mut sdti_format,
) -> sdti_status {
    call(|| {
        // SAFETY: NUL-terminated by contract.
        let name = unsafe { cstr(name, "name") }?;
        if code.is_null() {
            return Err(invalid("code is NULL"));
        }
        let format: Format = name.parse()?;
        let found = FORMAT_CODES
            .iter()
            .find(|(_, f)| *f == format)
            .map(|(c, _)| *c)
            .ok_or_else(|| fail(SDTI_ERR_UNSUPPORTED, format!("{name}: no format code")))?;
        // SAFETY: non-NULL and writable by contract.
        unsafe { *code = found };
        Ok(())
    })
}

/// Checks that `name` can name a learned word and the files it is written to: one token,
/// a file name and never a path (no `/`, `\`, `:`, `..` or leading `.`, no control
/// characters or whitespace, not a device name Windows reserves such as `CON` or `COM1`,
/// at most 128 bytes). Hosts that build a file name from a user's word check it here
/// before writing; `sdti_trainer_new` checks `params.token` the same way.
///
/// Statuses: `SDTI_ERR_INVALID_ARGUMENT` (the last error says why), `SDTI_ERR_INVALID_UTF8`.
///
/// # Safety
/// `name` is NULL or NUL-terminated.
///
/// `[thread-safe]`
#[no_mangle]
pub unsafe extern "C" fn sdti_name_check(name: *const c_char) -> sdti_status {
    call(|| {
        // SAFETY: NUL-terminated by contract.
        let name = unsafe { cstr(name, "name") }?;
        crate::names::check_word_name(name).map_err(invalid)?;
        Ok(())
    })
}

/// Describes an embedding file as a JSON object (NUL-terminated UTF-8) in `json` (`path`
/// may name a diffusers SDXL pair as `"FIRST+SECOND"` or by its folder, as in
/// `sdti_embedding_convert_ex`):
/// `name`, `step`, `vectors`, `widths` (numbers, one per part: `[768]`, `[768, 1280]`),
/// `family` (`"sd1"`, `"sd2"`, `"sdxl"` or null), `source_format` (a name
/// `sdti_format_from_name` takes), `sd_checkpoint`, `sd_checkpoint_name`, `checksum`
/// (A1111's), and `parts` (`encoder`: `"single"`, `"clip_l"` or `"clip_g"`) with
/// per-vector norms. `*needed` (optional) gets the size with the NUL; with
/// `json` NULL or `len` smaller the call returns `SDTI_ERR_BUFFER_TOO_SMALL`.
///
/// # Safety
/// `path` is NUL-terminated; `json` NULL or `len` writable bytes; `needed` NULL or writable.
///
/// `[thread-safe]`
#[no_mangle]
pub unsafe extern "C" fn sdti_embedding_inspect(
    path: *const c_char,
    json: *mut c_char,
    len: usize,
    needed: *mut usize,
) -> sdti_status {
    call(|| {
        // SAFETY: NUL-terminated by contract.
        let path = unsafe { cpath(path, "path") }?;
        let emb = read_embedding(&path)?;
        let text = serde_json::to_string(&inspect(&emb, None, 0))
            .map_err(|e| fail(SDTI_ERR_EMBEDDING, format!("{}: {e}", path.display())))?;
        // SAFETY: the caller's contract.
        let rc = unsafe { write_bytes_with_nul(text.as_bytes(), json, len, needed) };
        if rc != SDTI_OK {
            return Err(fail(
                rc,
                format!(
                    "the JSON needs {} bytes, the buffer holds {len}",
                    text.len() + 1
                ),
            ));
        }
        Ok(())
    })
}
