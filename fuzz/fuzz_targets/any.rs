//! Whatever the content sniffer makes of arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sdti::embedding::read_embedding_bytes(data, "fuzz");
});
