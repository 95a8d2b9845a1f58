//! `sdti_embedding_*`: learned-embedding files without a model (convert, inspect), and
//! the `SDTI_FORMAT_*` codes.

use std::ffi::c_char;
use std::path::Path;

use super::boundary::*;
use super::*;
use crate::embedding::{inspect, read_embedding, write_embedding, Format, Precision};

/// Pick the format from the file extension (`.pt`, `.safetensors`, `.bin`, `.png`).
pub const SDTI_FORMAT_AUTO: u32 = 0;
/// A1111 `.pt` (torch zip pickle with `string_to_param`).
pub const SDTI_FORMAT_A1111_PT: u32 = 1;
/// safetensors with the single key `emb_params` (A1111, kohya).
pub const SDTI_FORMAT_SAFETENSORS: u32 = 2;
/// diffusers `learned_embeds.safetensors` (`{token: [n, dim]}`).
pub const SDTI_FORMAT_DIFFUSERS_SAFETENSORS: u32 = 3;
/// diffusers `learned_embeds.bin` (torch zip pickle `{token: tensor}`).
pub const SDTI_FORMAT_DIFFUSERS_BIN: u32 = 4;
/// A1111 PNG with the `sd-ti-embedding` text chunk.
pub const SDTI_FORMAT_A1111_PNG: u32 = 5;
/// kohya sd-scripts `.pt` (`emb_params`).
pub const SDTI_FORMAT_KOHYA_PT: u32 = 6;
/// kohya sd-scripts `.safetensors` (`emb_params`).
pub const SDTI_FORMAT_KOHYA_SAFETENSORS: u32 = 7;
/// OneTrainer safetensors (`emp_params`, or `clip_l`/`clip_g`).
pub const SDTI_FORMAT_ONETRAINER: u32 = 8;
/// SDXL safetensors (`clip_l` + `clip_g`); only for SDXL embeddings.
pub const SDTI_FORMAT_SDXL_SAFETENSORS: u32 = 9;

/// The engine format of an `SDTI_FORMAT_*` code.
pub(crate) fn format_for(code: u32, path: &Path) -> FfiResult<Format> {
    Ok(match code {
        SDTI_FORMAT_AUTO => {
            let ext = path
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_default();
            match ext.as_str() {
                "pt" => Format::A1111Pt,
                "safetensors" => Format::A1111Safetensors,
                "bin" => Format::DiffusersBin,
                "png" => Format::A1111Png,
                _ => {
                    return Err(invalid(format!(
                        "{}: SDTI_FORMAT_AUTO needs the extension .pt, .safetensors, .bin or .png; pass a format",
                        path.display()
                    )))
                }
            }
        }
        SDTI_FORMAT_A1111_PT => Format::A1111Pt,
        SDTI_FORMAT_SAFETENSORS => Format::A1111Safetensors,
        SDTI_FORMAT_DIFFUSERS_SAFETENSORS => Format::DiffusersSafetensors,
        SDTI_FORMAT_DIFFUSERS_BIN => Format::DiffusersBin,
        SDTI_FORMAT_A1111_PNG => Format::A1111Png,
        SDTI_FORMAT_KOHYA_PT => Format::KohyaPt,
        SDTI_FORMAT_KOHYA_SAFETENSORS => Format::KohyaSafetensors,
        SDTI_FORMAT_ONETRAINER => Format::OneTrainer,
        SDTI_FORMAT_SDXL_SAFETENSORS => Format::SdxlSafetensors,
        other => {
            return Err(invalid(format!(
                "format {other} is not an SDTI_FORMAT_* value (0..=9)"
            )))
        }
    })
}

/// Reads `src` (any layout sdti reads, detected from the bytes) and writes it to `dst` as
/// `format` at `precision` (`SDTI_PRECISION_F32` or `_F16`), atomically.
///
/// Statuses: `SDTI_ERR_EMBEDDING` (unreadable or malformed `src`), `SDTI_ERR_IO`,
/// `SDTI_ERR_UNSUPPORTED` (e.g. an SDXL file as a single-tensor format),
/// `SDTI_ERR_INVALID_ARGUMENT` (unknown format or precision).
///
/// # Safety
/// `src` and `dst` are NUL-terminated strings.
///
/// `[thread-safe]`
#[no_mangle]
pub unsafe extern "C" fn sdti_embedding_convert(
    src: *const c_char,
    dst: *const c_char,
    format: u32,
    precision: u32,
) -> sdti_status {
    call(|| {
        // SAFETY: NUL-terminated by contract.
        let (src, dst) = unsafe { (cpath(src, "src")?, cpath(dst, "dst")?) };
        let format = format_for(format, &dst)?;
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
        write_embedding(&dst, &emb, format, precision)?;
        Ok(())
    })
}

/// Describes an embedding file as a JSON object (NUL-terminated UTF-8) in `json`:
/// `name`, `step`, `vectors`, `width`, `family` (`"sd1"`, `"sd2"`, `"sdxl"` or null),
/// `source_format`, `sd_checkpoint`, `sd_checkpoint_name`, `checksum` (A1111's), and
/// `parts` with per-vector norms. `*needed` (optional) gets the size with the NUL; with
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
