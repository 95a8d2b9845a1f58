//! A1111 PNGs: text chunks (base64 JSON) and pixel-border decoding.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sdti::embedding::read_embedding_bytes;

fuzz_target!(|data: &[u8]| {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend_from_slice(data.strip_prefix(b"\x89PNG\r\n\x1a\n".as_slice()).unwrap_or(data));
    let _ = read_embedding_bytes(&png, "fuzz.png");
});
