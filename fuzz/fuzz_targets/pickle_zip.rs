//! The torch-archive path: raw pickle VM, zip reader, and the whole `.pt` read.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sdti::embedding::{fuzzing, read_embedding_bytes};

fuzz_target!(|data: &[u8]| {
    let _ = fuzzing::pickle(data);
    let _ = fuzzing::zip(data);
    let (_, used, limit) = fuzzing::read_with_budget(data);
    assert!(used <= limit);
    // Steer the content sniffer onto the zip path.
    let mut pt = b"PK\x03\x04".to_vec();
    pt.extend_from_slice(data);
    let _ = read_embedding_bytes(&pt, "fuzz.pt");
});
