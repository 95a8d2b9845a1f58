//! safetensors layouts (emb_params / emp_params / diffusers / SDXL).
#![no_main]
use libfuzzer_sys::fuzz_target;
use sdti::embedding::{fuzzing, read_embedding_bytes};

fuzz_target!(|data: &[u8]| {
    let _ = read_embedding_bytes(data, "fuzz.safetensors");
    // The budgeted reader dispatches anything not PNG/zip to safetensors.
    let (_, used, limit) = fuzzing::read_with_budget(data);
    assert!(used <= limit);
});
