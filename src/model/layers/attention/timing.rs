//! Timing of the attention shapes of a 512 px SD 1.5 training step (batch 1) through the
//! off-graph API. Not a test: run it by hand, in release, with
//! `cargo test --release --lib attention_step_timing -- --ignored --nocapture`
//! (`RAYON_NUM_THREADS` sets the threads).
//!
//! Measured on the 2-core Xeon (AVX-512) development machine, 2 threads, best of 2-5
//! runs, q/k/v as views of a fused projection for the new path, against the graph-level
//! attention over split heads it replaced (with the callers' head split and merge copies;
//! removed once no caller was left), in ms:
//!
//! | shape (8 heads)      | old fwd | old bwd | new fwd | new bwd |
//! |----------------------|--------:|--------:|--------:|--------:|
//! | self 4096 x dh 40    |     430 |    1007 |     207 |     449 |
//! | cross 4096x77 x 40   |    11.9 |    30.2 |     6.7 |    11.1 |
//! | self 1024 x 80       |    35.7 |    92.8 |    18.6 |    47.7 |
//! | cross 1024x77 x 80   |     3.9 |     8.4 |     2.2 |     3.7 |
//! | self 256 x 160       |     4.8 |    11.0 |     2.2 |     5.3 |
//! | cross 256x77 x 160   |     1.8 |     5.0 |     1.0 |     1.8 |
//! | self 64 x 160        |     0.7 |     3.1 |     0.4 |     0.5 |
//! | cross 64x77 x 160    |     0.8 |     2.9 |     0.4 |     0.5 |
//! | CLIP 77 causal, 12 h |     0.8 |     2.0 |     0.2 |     0.4 |
//! | UNet step (31 calls) |    2444 |    5778 |    1190 |    2592 |
//!
//! so a 512 px step's attention goes from 8.2 s to 3.8 s. The machine was shared (load
//! 3-5 on 2 cores); runs under heavier load were up to 2.5x slower for both paths. With
//! gemm's `x86-v4` feature (AVX-512 micro-kernels; it needs Rust 1.89) the new path's
//! step sum was 903 + 1875 ms in the same conditions. (The table was measured with the
//! kernel's elementwise loops compiled for AVX-512; for Rust 1.85 they are AVX2 now, and
//! their share of the new path's time went from about 6% to 11% in a profile.) With both
//! AVX-512 changes in (rust-version 1.89), the new path's step sum was 1013 + 1967 ms in
//! a run where the old path's was 2330 + 6926.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::{attention_backward, attention_forward, AttentionMask};

/// One attention shape: label, queries, keys, heads, head width, causal, calls per step.
type Shape = (&'static str, usize, usize, usize, usize, bool, usize);

/// The UNet's attentions at 512 px: down blocks 0-2 have two transformers each, up
/// blocks 1-3 three, the mid block one; each has a self- and a cross-attention (77
/// context tokens). CLIP's twelve layers are listed for reference, not in the UNet sum.
const SHAPES: [Shape; 9] = [
    ("self 4096 x 40", 4096, 4096, 8, 40, false, 5),
    ("cross 4096x77 x 40", 4096, 77, 8, 40, false, 5),
    ("self 1024 x 80", 1024, 1024, 8, 80, false, 5),
    ("cross 1024x77 x 80", 1024, 77, 8, 80, false, 5),
    ("self 256 x 160", 256, 256, 8, 160, false, 5),
    ("cross 256x77 x 160", 256, 77, 8, 160, false, 5),
    ("self 64 x 160", 64, 64, 8, 160, false, 1),
    ("cross 64x77 x 160", 64, 77, 8, 160, false, 1),
    ("clip 77 causal x 64", 77, 77, 12, 64, true, 0),
];

/// The fastest of `reps` runs of `f`, in seconds.
fn best<R>(reps: usize, mut f: impl FnMut() -> candle_core::Result<R>) -> candle_core::Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        std::hint::black_box(f()?);
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

#[test]
#[ignore = "timing, run by hand in release"]
fn attention_step_timing() -> candle_core::Result<()> {
    let d = Device::Cpu;
    let threads = rayon::current_num_threads();
    println!("threads: {threads}");
    println!("{:<22} {:>9} {:>9} {:>6}", "shape", "fwd", "bwd", "calls");
    let mut sums = [0f64; 2];
    for (label, n, m, heads, dh, causal, calls) in SHAPES {
        let c = heads * dh;
        let scale = (dh as f64).powf(-0.5);
        // q, k, v as views of one fused projection when they share the tokens, as the
        // block ops will pass them.
        let (q, k, v) = if n == m {
            let qkv = Tensor::randn(0f32, 1.0, (1, n, 3 * c), &d)?;
            (
                qkv.narrow(2, 0, c)?,
                qkv.narrow(2, c, c)?,
                qkv.narrow(2, 2 * c, c)?,
            )
        } else {
            let kv = Tensor::randn(0f32, 1.0, (1, m, 2 * c), &d)?;
            (
                Tensor::randn(0f32, 1.0, (1, n, c), &d)?,
                kv.narrow(2, 0, c)?,
                kv.narrow(2, c, c)?,
            )
        };
        let g = Tensor::randn(0f32, 1.0, (1, n, c), &d)?;
        let mask = if causal {
            AttentionMask::Causal
        } else {
            AttentionMask::None
        };
        let reps = if n >= 4096 { 2 } else { 5 };
        let new_fwd = best(reps, || attention_forward(&q, &k, &v, heads, scale, mask))?;
        let (o, lse) = attention_forward(&q, &k, &v, heads, scale, mask)?;
        assert_eq!(lse.dtype(), DType::F32);
        let new_bwd = best(reps, || {
            attention_backward(&q, &k, &v, &o, &lse, &g, heads, scale, mask, [true; 3])
        })?;
        println!(
            "{label:<22} {:>8.1}ms {:>8.1}ms {calls:>6}",
            new_fwd * 1e3,
            new_bwd * 1e3
        );
        for (s, t) in sums.iter_mut().zip([new_fwd, new_bwd]) {
            *s += t * calls as f64;
        }
    }
    println!(
        "{:<22} {:>8.0}ms {:>8.0}ms",
        "UNet step sum",
        sums[0] * 1e3,
        sums[1] * 1e3
    );
    Ok(())
}
