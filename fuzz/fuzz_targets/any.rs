//! Whatever the content sniffer makes of arbitrary bytes (PNG, WebP, zip,
//! safetensors, refusals).
#![no_main]
use libfuzzer_sys::fuzz_target;
use sdti::embedding::{fuzzing, read_embedding_bytes};

fuzz_target!(|data: &[u8]| {
    let _ = read_embedding_bytes(data, "fuzz");
    let (_, used, limit) = fuzzing::read_with_budget(data);
    assert!(used <= limit);
    // PNG mutations rarely keep a valid CRC-32; recompute them to reach the decoders.
    if data.starts_with(b"\x89PNG\r\n\x1a\n") {
        let _ = read_embedding_bytes(&fuzzing::png_with_fixed_crcs(data), "fuzz");
    }
});
