//! A1111 PNG embeddings.
//!
//! * Text chunk (`tEXt`/`zTXt`/`iTXt`, keyword `sd-ti-embedding`): base64 of the
//!   JSON in [`super::json`]. Read and written.
//! * Pixel borders (`insert_image_data_embed`): zlib'd JSON split into nibbles,
//!   XOR-scrambled with an LCG and painted as two blocks left and right of the
//!   preview, separated by black columns. Read only, mirroring
//!   `extract_image_data_embed` step by step.
//!
//! Either way every chunk's CRC-32 is checked first: a changed byte is an error
//! naming the chunk, as PIL and libpng report it, never a silently different read.

use std::io::Read;

use super::{json, round_to, Ctx, EmbeddingError, EmbeddingFile, EmbeddingPart, Format, Precision};

pub(crate) const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
const KEYWORD: &[u8] = b"sd-ti-embedding";

/// One chunk of the walk, as an error message names it.
fn chunk_field(index: usize, kind: &[u8], pos: usize) -> String {
    format!("PNG chunk {index} ({} at byte {pos})", kind.escape_ascii())
}

/// An `sd-ti-embedding` chunk: its type and what follows the keyword's NUL.
type TextChunk<'a> = (&'a [u8], &'a [u8]);

/// Walk every chunk up to `IEND`, checking lengths and each chunk's CRC-32, and
/// return the last `sd-ti-embedding` text chunk's kind and data (PIL's `.text`
/// keeps the last of repeated keys). The CRCs are checked for every chunk, the
/// pixel data included: PIL refuses a bad CRC in the chunks it parses, libpng in
/// all of them, so a changed byte is an error here rather than a guess.
fn walk_chunks<'a>(ctx: &Ctx, bytes: &'a [u8]) -> Result<Option<TextChunk<'a>>, EmbeddingError> {
    let mut pos = SIGNATURE.len();
    let mut found = None;
    for index in 0.. {
        let Some(head) = bytes.get(pos..pos + 8) else {
            return Err(ctx.truncated(
                "PNG chunks",
                format!("chunk {index}: header cut short at byte {pos} (no IEND)"),
            ));
        };
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let kind = &head[4..8];
        let field = chunk_field(index, kind, pos);
        let data = bytes.get(pos + 8..pos + 8 + len).ok_or_else(|| {
            ctx.truncated(&field, format!("{len} bytes of data run past the end"))
        })?;
        let Some(stored) = bytes.get(pos + 8 + len..pos + 12 + len) else {
            return Err(ctx.truncated(&field, "CRC-32 cut short"));
        };
        let stored = u32::from_be_bytes([stored[0], stored[1], stored[2], stored[3]]);
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        if crc.sum() != stored {
            return Err(ctx.invalid(
                field,
                format!(
                    "CRC-32 mismatch (stored 0x{stored:08x}, computed 0x{:08x}): the file is \
                     corrupt, as PIL and libpng would also report",
                    crc.sum()
                ),
            ));
        }
        pos += 12 + len;
        match kind {
            b"tEXt" | b"zTXt" | b"iTXt"
                if data
                    .strip_prefix(KEYWORD)
                    .is_some_and(|r| r.first() == Some(&0)) =>
            {
                found = Some((kind, &data[KEYWORD.len() + 1..]));
            }
            b"IEND" => break,
            _ => {}
        }
    }
    Ok(found)
}

/// The text of an `sd-ti-embedding` chunk (after its keyword and NUL), inflated
/// where the chunk says it is compressed.
fn chunk_text(ctx: &Ctx, kind: &[u8], rest: &[u8]) -> Result<Vec<u8>, EmbeddingError> {
    let field = "PNG sd-ti-embedding chunk";
    match kind {
        b"zTXt" => {
            let comp = rest
                .get(1..)
                .ok_or_else(|| ctx.truncated(field, "zTXt without method byte"))?;
            inflate(ctx, field, comp)
        }
        b"iTXt" => {
            // compression flag, method, language\0, translated keyword\0, text
            let (&flag, rest) = rest
                .split_first()
                .ok_or_else(|| ctx.truncated(field, "iTXt header cut short"))?;
            let rest = rest
                .get(1..)
                .ok_or_else(|| ctx.truncated(field, "iTXt header cut short"))?;
            let mut it = rest.splitn(3, |b| *b == 0);
            let (_, _, text) = (it.next(), it.next(), it.next());
            let text = text.ok_or_else(|| ctx.truncated(field, "iTXt header cut short"))?;
            if flag == 1 {
                inflate(ctx, field, text)
            } else {
                Ok(text.to_vec())
            }
        }
        _ => Ok(rest.to_vec()),
    }
}

/// zlib inflate, capped by the read budget; trailing bytes after the stream
/// end are ignored, as Python's `zlib.decompress` does.
fn inflate(ctx: &Ctx, field: &str, data: &[u8]) -> Result<Vec<u8>, EmbeddingError> {
    // Half the remaining budget: the Vec may hold up to twice what it read.
    let cap = ctx.budget.limit().saturating_sub(ctx.budget.used()) / 2;
    let mut out = Vec::new();
    flate2::read::ZlibDecoder::new(data)
        .take(cap.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| ctx.invalid(field, format!("zlib stream is corrupt: {e}")))?;
    ctx.charge(out.capacity() as u64, field)?;
    Ok(out)
}

fn b64_decode(ctx: &Ctx, field: &str, text: &[u8]) -> Result<Vec<u8>, EmbeddingError> {
    ctx.charge(text.len() as u64, field)?;
    let mut out = Vec::with_capacity(text.len() / 4 * 3 + 3);
    let mut acc = 0u32;
    let mut bits = 0;
    let mut pad = 0;
    for (i, &c) in text.iter().enumerate() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => {
                pad += 1;
                continue;
            }
            b' ' | b'\n' | b'\r' | b'\t' => continue,
            _ => return Err(ctx.invalid(field, format!("byte {i} (0x{c:02x}) is not base64"))),
        };
        if pad > 0 {
            return Err(ctx.invalid(field, "base64 data after '=' padding"));
        }
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

fn b64_encode(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for k in 0..4 {
            if k <= c.len() {
                s.push(A[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// Decode to 8-bit RGB the way PIL's `convert('RGB')` does (alpha dropped,
/// grey replicated), within the budget.
fn decode_rgb(ctx: &Ctx, bytes: &[u8]) -> Result<(usize, usize, Vec<u8>), EmbeddingError> {
    let field = "PNG pixels";
    let avail = ctx.budget.limit().saturating_sub(ctx.budget.used());
    // The chunk walk has checked every CRC already; the decoder is strict too (by
    // default it skips ancillary chunks with a bad CRC and ignores zlib's Adler-32,
    // which zlib itself, and so PIL and libpng, check).
    let mut opts = ::png::DecodeOptions::default();
    opts.set_ignore_crc(false);
    opts.set_ignore_adler32(false);
    opts.set_skip_ancillary_crc_failures(false);
    let mut dec = ::png::Decoder::new_with_options(std::io::Cursor::new(bytes), opts);
    dec.set_limits(::png::Limits {
        bytes: usize::try_from(avail / 2).unwrap_or(usize::MAX),
    });
    dec.set_transformations(::png::Transformations::EXPAND | ::png::Transformations::STRIP_16);
    let mut reader = dec
        .read_info()
        .map_err(|e| ctx.invalid(field, e.to_string()))?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| ctx.invalid(field, "image too large"))?;
    ctx.charge(size as u64, field)?;
    let mut buf = vec![0u8; size];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| ctx.truncated(field, e.to_string()))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let ch = match info.color_type {
        ::png::ColorType::Grayscale => 1,
        ::png::ColorType::GrayscaleAlpha => 2,
        ::png::ColorType::Rgb => 3,
        ::png::ColorType::Rgba => 4,
        ::png::ColorType::Indexed => return Err(ctx.invalid(field, "palette not expanded")),
    };
    ctx.charge((w * h * 3) as u64, field)?;
    let mut rgb = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        let row = buf
            .get(y * info.line_size..y * info.line_size + w * ch)
            .ok_or_else(|| ctx.truncated(field, "row cut short"))?;
        for px in row.chunks_exact(ch) {
            if ch >= 3 {
                rgb.extend_from_slice(&px[..3]);
            } else {
                rgb.extend_from_slice(&[px[0], px[0], px[0]]);
            }
        }
    }
    Ok((w, h, rgb))
}

/// A1111's `lcg()`: numpy's generator XORed into the nibbles.
struct Lcg(u64);
impl Iterator for Lcg {
    type Item = u8;
    fn next(&mut self) -> Option<u8> {
        self.0 = (1_664_525u64 * self.0 + 1_013_904_223) % (1 << 32);
        Some((self.0 % 255) as u8)
    }
}

/// `extract_image_data_embed`, step by step, on 8-bit RGB pixels (row-major,
/// `w * h * 3` bytes): the zlib'd JSON it hides. `none` says what the picture
/// is when it holds no such data.
pub(crate) fn extract_pixel_data(
    ctx: &Ctx,
    field: &str,
    (w, h, rgb): (usize, usize, &[u8]),
    none: &str,
) -> Result<Vec<u8>, EmbeddingError> {
    let none = || EmbeddingError::UnknownFormat {
        file: ctx.file.clone(),
        reason: none.to_string(),
    };
    if rgb.len() != w * h * 3 {
        return Err(ctx.truncated(field, format!("{} bytes for {w} x {h} RGB", rgb.len())));
    }
    let px = |x: usize, y: usize| -> &[u8] { &rgb[(y * w + x) * 3..(y * w + x) * 3 + 3] };
    // crop_black(tol=0): bounding box of pixels whose channels are all > 0.
    let lit = |x: usize, y: usize| px(x, y).iter().all(|c| *c > 0);
    let col_lit: Vec<bool> = (0..w).map(|x| (0..h).any(|y| lit(x, y))).collect();
    let row_lit: Vec<bool> = (0..h).map(|y| (0..w).any(|x| lit(x, y))).collect();
    // numpy argmax of an all-false mask is 0, so an all-dark image is not cropped.
    let cs = col_lit.iter().position(|b| *b).unwrap_or(0);
    let ce = w - col_lit.iter().rev().position(|b| *b).unwrap_or(0);
    let rs = row_lit.iter().position(|b| *b).unwrap_or(0);
    let re = h - row_lit.iter().rev().position(|b| *b).unwrap_or(0);
    let (cw, ch) = (ce.saturating_sub(cs), re.saturating_sub(rs));
    let nib = |x: usize, y: usize, c: usize| px(cs + x, rs + y)[c] & 0x0F;
    let black: Vec<usize> = (0..cw)
        .filter(|&x| (0..ch).all(|y| (0..3).all(|c| nib(x, y, c) == 0)))
        .collect();
    let (Some(&first), Some(&last)) = (black.first(), black.last()) else {
        return Err(none());
    };
    if black.len() < 2 {
        return Err(none());
    }
    let (lw, uw) = (first, cw - last - 1);
    if lw != uw || lw == 0 {
        return Err(ctx.invalid(
            field,
            format!("data blocks are {lw} and {uw} columns wide; A1111 writes two equal blocks"),
        ));
    }
    let block = |x0: usize| -> Vec<u8> {
        let mut g = Lcg(0);
        let mut v = Vec::with_capacity(ch * lw * 3);
        for y in 0..ch {
            for x in 0..lw {
                for c in 0..3 {
                    v.push(nib(x0 + x, y, c) ^ (g.next().unwrap_or(0) & 0x0F));
                }
            }
        }
        v
    };
    ctx.charge((ch * lw * 3 * 3) as u64, field)?;
    let lower = block(0);
    let upper = block(last + 1);
    let packed: Vec<u8> = lower
        .iter()
        .zip(&upper)
        .map(|(l, u)| (u << 4) | l)
        .collect();
    inflate(ctx, field, &packed)
}

pub(crate) fn read(ctx: &Ctx, bytes: &[u8]) -> Result<EmbeddingFile, EmbeddingError> {
    if let Some((kind, rest)) = walk_chunks(ctx, bytes)? {
        let field = "PNG sd-ti-embedding chunk";
        let text = chunk_text(ctx, kind, rest)?;
        let raw = b64_decode(ctx, field, &text)?;
        return json::parse(ctx, field, &raw, Format::A1111Png);
    }
    let field = "PNG pixel-embedded data";
    let (w, h, rgb) = decode_rgb(ctx, bytes)?;
    let raw = extract_pixel_data(
        ctx,
        field,
        (w, h, &rgb),
        "a PNG with neither an sd-ti-embedding text chunk nor A1111 pixel-border data",
    )?;
    json::parse(ctx, field, &raw, Format::A1111PngPixels)
}

/// Rewrite every chunk's CRC-32 so that mutated bytes reach the layers behind the
/// checksum (for fuzzing); stops at IEND or at the first chunk that runs past the end.
pub(crate) fn fix_crcs(bytes: &mut [u8]) {
    let mut pos = SIGNATURE.len();
    while let Some(head) = bytes.get(pos..pos + 8) {
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let end = pos.saturating_add(8).saturating_add(len);
        if end.saturating_add(4) > bytes.len() {
            break;
        }
        let mut crc = flate2::Crc::new();
        crc.update(&bytes[pos + 4..end]);
        bytes[end..end + 4].copy_from_slice(&crc.sum().to_be_bytes());
        if &bytes[pos + 4..pos + 8] == b"IEND" {
            break;
        }
        pos = end + 4;
    }
}

/// A small preview: one band per vector, columns = dimensions averaged into 128
/// pixels, red for positive and blue for negative values (scaled to the largest
/// magnitude), on a dark-grey background.
fn preview(part: &EmbeddingPart, values: &[f32]) -> (u32, u32, Vec<u8>) {
    const W: usize = 128;
    let band = (96 / part.vectors).clamp(2, 24);
    let h = band * part.vectors;
    let max = values
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(f32::MIN_POSITIVE);
    let mut img = vec![0u8; W * h * 3];
    for v in 0..part.vectors {
        let row = &values[v * part.dim..(v + 1) * part.dim];
        for x in 0..W {
            let (a, b) = (
                x * part.dim / W,
                ((x + 1) * part.dim / W).max(x * part.dim / W + 1),
            );
            let seg = &row[a..b.min(part.dim)];
            let mean = seg.iter().sum::<f32>() / seg.len().max(1) as f32;
            let t = (mean / max).clamp(-1.0, 1.0);
            let mag = (t.abs().sqrt() * 215.0) as u8;
            let rgb = if t >= 0.0 {
                [40 + mag, 40, 40]
            } else {
                [40, 40, 40 + mag]
            };
            for y in v * band..(v + 1) * band {
                img[(y * W + x) * 3..(y * W + x) * 3 + 3].copy_from_slice(&rgb);
            }
        }
    }
    (W as u32, h as u32, img)
}

pub(crate) fn write(
    emb: &EmbeddingFile,
    part: &EmbeddingPart,
    precision: Precision,
    stem: &str,
) -> Result<Vec<u8>, EmbeddingError> {
    let values = round_to(&part.data, precision);
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(EmbeddingError::NonFinite {
            file: stem.to_string(),
            field: "string_to_param (as f16)".to_string(),
            vector: i / part.dim,
            column: i % part.dim,
            value: values[i],
        });
    }
    let text = b64_encode(json::write(emb, part, &values, stem).as_bytes());
    let (w, h, img) = preview(part, &values);
    let err = |e: ::png::EncodingError| EmbeddingError::Invalid {
        file: stem.to_string(),
        field: "PNG".to_string(),
        reason: e.to_string(),
    };
    let mut out = Vec::new();
    {
        let mut enc = ::png::Encoder::new(&mut out, w, h);
        enc.set_color(::png::ColorType::Rgb);
        enc.set_depth(::png::BitDepth::Eight);
        enc.add_text_chunk("sd-ti-embedding".to_string(), text)
            .map_err(err)?;
        let mut wr = enc.write_header().map_err(err)?;
        wr.write_image_data(&img).map_err(err)?;
        wr.finish().map_err(err)?;
    }
    Ok(out)
}
