//! A1111 PNGs: chunk CRCs, text chunks (base64 JSON) and pixel-border decoding.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sdti::embedding::{fuzzing, read_embedding_bytes};

fuzz_target!(|data: &[u8]| {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend_from_slice(
        data.strip_prefix(b"\x89PNG\r\n\x1a\n".as_slice())
            .unwrap_or(data),
    );
    // As given: mostly the CRC check's refusals.
    let _ = read_embedding_bytes(&png, "fuzz.png");
    // With every CRC recomputed, so mutations reach the decoders behind it.
    let fixed = fuzzing::png_with_fixed_crcs(&png);
    let _ = read_embedding_bytes(&fixed, "fuzz.png");
    let (_, used, limit) = fuzzing::read_with_budget(&fixed);
    assert!(used <= limit);
});
