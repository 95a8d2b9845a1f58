//! Timing of the 3x3 convolutions of a 512 px SD 1.5 step, Winograd against the column
//! convolution, through `Conv2d` (forward with bias, input gradient). Not a test: run it
//! by hand, in release, with
//! `cargo test --release --lib winograd_step_timing -- --ignored --nocapture`.

use std::cell::Cell;
use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::model::layers::Conv2d;
use crate::model::weights::Weights;

thread_local! {
    /// Turns the Winograd path off on this thread (for the comparison below).
    pub(super) static OFF: Cell<bool> = const { Cell::new(false) };
}

/// (in channels, out channels, side, calls per step): the UNet's resnet convolutions at
/// 512 px (64x64 latents), and the VAE encoder's first layers at 512 px (forward only).
const SHAPES: [(usize, usize, usize, usize); 7] = [
    (320, 320, 64, 11),
    (640, 320, 64, 2),
    (640, 640, 32, 9),
    (1280, 640, 32, 2),
    (1280, 1280, 16, 9),
    (1280, 1280, 8, 10),
    (128, 128, 512, 0),
];

fn best(
    reps: usize,
    mut f: impl FnMut() -> candle_core::Result<Tensor>,
) -> candle_core::Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        let y = f()?;
        drop(y);
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best * 1e3)
}

#[test]
#[ignore = "a timing harness, run by hand"]
fn winograd_step_timing() -> crate::error::Result<()> {
    let d = Device::Cpu;
    println!("| shape | column fwd | winograd fwd | column bwd | winograd bwd | calls |");
    let (mut sum_col, mut sum_win) = (0.0, 0.0);
    for (cin, cout, side, calls) in SHAPES {
        let mut t = HashMap::new();
        t.insert(
            "c.weight".to_string(),
            Tensor::randn(0f32, 0.05, (cout, cin, 3, 3), &d)?,
        );
        t.insert("c.bias".to_string(), Tensor::randn(0f32, 0.05, cout, &d)?);
        let conv = Conv2d::new(&Weights::from_tensors(t, DType::F32, d.clone()), "c", 1, 1)?;
        let x = Tensor::randn(0f32, 1.0, (1, cin, side, side), &d)?;
        let g = Tensor::randn(0f32, 1.0, (1, cout, side, side), &d)?;
        let reps = if side > 128 { 1 } else { 3 };
        let mut row = Vec::new();
        for off in [true, false] {
            OFF.with(|o| o.set(off));
            let f = best(reps, || conv.apply(&x))?;
            let b = if calls > 0 {
                best(reps, || conv.input_grad(&g, side, side))?
            } else {
                0.0
            };
            row.push((f, b));
        }
        OFF.with(|o| o.set(false));
        let ((cf, cb), (wf, wb)) = (row[0], row[1]);
        sum_col += (cf + cb) * calls as f64;
        sum_win += (wf + wb) * calls as f64;
        println!(
            "| {cin}->{cout} @ {side}x{side} | {cf:.1} | {wf:.1} | {cb:.1} | {wb:.1} | {calls} |"
        );
    }
    println!("UNet step sum: column {sum_col:.0} ms, winograd {sum_win:.0} ms");
    Ok(())
}
