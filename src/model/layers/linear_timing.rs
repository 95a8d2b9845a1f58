//! Timing of linear layers with few rows (tokens), forward (`x W^T + b`) and input
//! gradient (`g W`), through [`Linear`], with cold weights as in a training step (copies
//! of the layer totalling 1 GiB, used in turn). Not a test: run it by hand, in release,
//! with `cargo test --release --lib linear_step_timing -- --ignored --nocapture`
//! (`RAYON_NUM_THREADS` sets the threads). It measured the column-major route of
//! `layers::gemm` (see `by_columns` there).

use std::time::Instant;

use candle_core::{Device, Tensor};

use super::linear::Linear;

/// (tokens, in, out): CLIP's 77 tokens (ViT-L and bigG), the 16x16 level of a 512 px
/// step (SD 1.5 and SDXL, 256 tokens), the 8x8 level (64), SD 1.5's mid block at 256 px
/// (16), and wider products for comparison.
const SHAPES: [(usize, usize, usize); 14] = [
    (77, 768, 3072),
    (77, 3072, 768),
    (77, 1280, 5120),
    (77, 5120, 1280),
    (16, 1280, 10240),
    (16, 5120, 1280),
    (64, 1280, 10240),
    (64, 5120, 1280),
    (256, 640, 640),
    (256, 2560, 640),
    (256, 1280, 1280),
    (256, 1280, 10240),
    (256, 5120, 1280),
    (1024, 2560, 640),
];

#[test]
#[ignore = "a timing harness, run by hand"]
fn linear_step_timing() -> candle_core::Result<()> {
    let d = Device::Cpu;
    println!("| tokens x in x out | forward ms | GFLOP/s | input grad ms | GFLOP/s |");
    for (t, inn, out) in SHAPES {
        let copies = (1usize << 30) / (out * inn * 4) + 1;
        let layers = (0..copies)
            .map(|c| {
                let w = Tensor::full(0.5f32 + c as f32 * 1e-3, (out, inn), &d)?;
                Ok(Linear::from_parts(w, Some(Tensor::full(0.1f32, out, &d)?)))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let x = Tensor::full(1.0f32, (1, t, inn), &d)?;
        let g = Tensor::full(1.0f32, (1, t, out), &d)?;
        let flops = 2.0 * (t * inn * out) as f64;
        let mut row = format!("| {t} x {inn} x {out} |");
        for backward in [false, true] {
            let calls = 2 * copies;
            let start = Instant::now();
            for i in 0..calls {
                let l = &layers[i % copies];
                drop(if backward {
                    l.input_grad(&g)?
                } else {
                    l.apply(&x)?
                });
            }
            let s = start.elapsed().as_secs_f64() / calls as f64;
            row += &format!(" {:.2} | {:.0} |", s * 1e3, flops / s / 1e9);
        }
        println!("{row}");
    }
    Ok(())
}
