//! Entry points for the fuzz targets: each layer on its own, so the fuzzer
//! does not have to get through the outer layers first.

use super::{pickle, png, pt, safetensors_layouts, webp, zip, Ctx, EmbeddingError, EmbeddingFile};

/// Run a raw pickle through the VM (as if it were an archive's data.pkl).
pub fn pickle(bytes: &[u8]) -> Result<usize, EmbeddingError> {
    let ctx = Ctx::new("fuzz.pkl", bytes.len());
    let p = pickle::parse(&ctx, "data.pkl", bytes)?;
    Ok(p.arena.len())
}

/// Parse a zip and read every member.
pub fn zip(bytes: &[u8]) -> Result<usize, EmbeddingError> {
    let ctx = Ctx::new("fuzz.zip", bytes.len());
    let a = zip::Archive::parse(&ctx, bytes)?;
    let mut total = 0;
    for e in &a.entries {
        total += a.read(&ctx, e)?.len();
    }
    Ok(total)
}

/// Budget used by a full read, to check the allocation bound.
pub fn read_with_budget(bytes: &[u8]) -> (Result<EmbeddingFile, EmbeddingError>, u64, u64) {
    let ctx = Ctx::new("fuzz", bytes.len());
    let r = match bytes.first() {
        Some(0x89) => png::read(&ctx, bytes),
        _ if webp::looks_like(bytes) => webp::read(&ctx, bytes),
        Some(b'P') => pt::read(&ctx, bytes),
        _ => safetensors_layouts::read(&ctx, bytes),
    };
    (r, ctx.budget.used(), ctx.budget.limit())
}

/// A copy of a PNG with every chunk's CRC-32 recomputed, so that a fuzzer's
/// mutations get past the checksum to the decoders behind it.
pub fn png_with_fixed_crcs(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    png::fix_crcs(&mut out);
    out
}
