//! A1111 image embeddings in WebP, and the other picture types A1111's loader opens.
//!
//! A1111's `load_from_file` hands `.png`, `.webp`, `.jxl` and `.avif` files to
//! PIL. Only PIL's PNG images carry a `.text` mapping, so for the others it always
//! takes the pixel-border route (`extract_image_data_embed`): the data lives in the
//! low 4 bits of every pixel of two side blocks, which only a lossless encoding
//! keeps. A lossless WebP is decoded here (image-webp, pure Rust) and goes through
//! the same pixel decoder as a PNG. A lossy WebP is refused before decoding, since
//! its pixels can never give the data back. JPEG XL and AVIF are recognised and
//! refused with what to convert them to: AVIF decoding needs the C library dav1d,
//! and stock PIL does not open JPEG XL at all, so neither earns a new dependency.

use image::ImageDecoder;

use super::{json, png, Ctx, EmbeddingError, EmbeddingFile, Format};

const FIELD: &str = "WebP pixel-embedded data";

/// `RIFF <size> WEBP`.
pub(crate) fn looks_like(bytes: &[u8]) -> bool {
    bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP"
}

/// Which bitstream the file holds, from its RIFF chunk list.
#[derive(Debug, PartialEq)]
enum Kind {
    Lossless,
    Lossy,
    Animated,
}

fn kind(ctx: &Ctx, bytes: &[u8]) -> Result<Kind, EmbeddingError> {
    let mut pos = 12;
    let (mut lossy, mut lossless) = (false, false);
    while let Some(head) = bytes.get(pos..pos + 8) {
        let fourcc = &head[..4];
        let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
        match fourcc {
            b"ANIM" | b"ANMF" => return Ok(Kind::Animated),
            b"VP8 " | b"ALPH" => lossy = true,
            b"VP8L" => lossless = true,
            _ => {}
        }
        // Chunks are padded to an even length.
        pos = pos
            .saturating_add(8)
            .saturating_add(len)
            .saturating_add(len & 1);
    }
    match (lossy, lossless) {
        (true, _) => Ok(Kind::Lossy),
        (false, true) => Ok(Kind::Lossless),
        (false, false) => Err(ctx.truncated(
            "WebP chunks",
            "no VP8 or VP8L image chunk before the end of the file",
        )),
    }
}

pub(crate) fn read(ctx: &Ctx, bytes: &[u8]) -> Result<EmbeddingFile, EmbeddingError> {
    match kind(ctx, bytes)? {
        Kind::Lossless => {}
        Kind::Lossy => {
            return Err(ctx.invalid(
                FIELD,
                "a lossy WebP (VP8) cannot hold A1111's pixel-border embedding: lossy \
                 compression changes the low 4 bits of the pixels that carry it, so A1111 \
                 cannot read it either; use the original PNG or re-save it as lossless WebP",
            ))
        }
        Kind::Animated => {
            return Err(ctx.invalid(
                FIELD,
                "an animated WebP; A1111's image embeddings are still pictures \
                 (PNG or lossless WebP)",
            ))
        }
    }
    let decoder = image::codecs::webp::WebPDecoder::new(std::io::Cursor::new(bytes))
        .map_err(|e| ctx.invalid("WebP", e.to_string()))?;
    let (w, h) = decoder.dimensions();
    let (w, h) = (w as usize, h as usize);
    let out = decoder.total_bytes();
    // Charged before decoding: the output, plus the RGBA scratch image-webp
    // decodes an opaque lossless picture into before dropping alpha.
    let scratch = (w as u64).saturating_mul(h as u64).saturating_mul(4);
    ctx.charge(out.saturating_add(scratch), "WebP pixels")?;
    let channels = match decoder.color_type() {
        image::ColorType::Rgb8 => 3,
        image::ColorType::Rgba8 => 4,
        other => {
            return Err(ctx.invalid(
                "WebP pixels",
                format!("decoder gave {other:?}; expected 8-bit RGB or RGBA"),
            ))
        }
    };
    let len = usize::try_from(out)
        .ok()
        .filter(|n| *n == w * h * channels)
        .ok_or_else(|| ctx.invalid("WebP pixels", format!("{w} x {h} image is too large")))?;
    let mut buf = vec![0u8; len];
    decoder
        .read_image(&mut buf)
        .map_err(|e| ctx.invalid("WebP pixels", e.to_string()))?;
    if channels == 4 {
        // PIL's convert('RGB') drops alpha without compositing; done in place.
        for i in 0..w * h {
            buf.copy_within(i * 4..i * 4 + 3, i * 3);
        }
        buf.truncate(w * h * 3);
    }
    let raw = png::extract_pixel_data(
        ctx,
        FIELD,
        (w, h, &buf),
        "a WebP without A1111 pixel-border data (A1111 reads a WebP embedding only from its pixels)",
    )?;
    json::parse(ctx, FIELD, &raw, Format::A1111WebpPixels)
}

/// JPEG XL and AVIF, which A1111's loader also opens: refused with what to do.
pub(crate) fn unsupported_picture(ctx: &Ctx, bytes: &[u8]) -> Option<EmbeddingError> {
    let jxl = bytes.starts_with(&[0xFF, 0x0A]) || bytes.starts_with(b"\0\0\0\x0cJXL \r\n\x87\n");
    let avif =
        bytes.get(4..8) == Some(b"ftyp") && matches!(bytes.get(8..12), Some(b"avif" | b"avis"));
    let what = if jxl {
        "a JPEG XL image: sdti does not decode JPEG XL (and stock PIL, so A1111, does not \
         open it either); convert it losslessly to PNG (e.g. `djxl in.jxl out.png`) and read that"
    } else if avif {
        "an AVIF image: sdti does not decode AVIF (its decoder is the C library dav1d); \
         convert it to PNG (e.g. `avifdec in.avif out.png`) and read that, which works only if \
         the AVIF was lossless, as A1111's pixel-border data needs"
    } else {
        return None;
    };
    Some(EmbeddingError::UnknownFormat {
        file: ctx.file.clone(),
        reason: what.to_string(),
    })
}
