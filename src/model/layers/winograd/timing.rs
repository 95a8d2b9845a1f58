//! Timing of the 3x3 convolutions of a 256 px and a 512 px SD 1.5 step, Winograd F(2x2,
//! 3x3) and F(4x4, 3x3) against the column convolution, through `Conv2d` (forward with
//! bias, input gradient). Not a test: run it by hand, in release, with
//! `cargo test --release --lib winograd_step_timing -- --ignored --nocapture`.
//! `SDTI_TIMING_ONLY=1280->1280@8` times that shape alone (30 repetitions, for `perf`),
//! `SDTI_TIMING_CHOICE=F4` (or `Off`, `F2`) that variant alone.

use std::cell::Cell;
use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::model::layers::Conv2d;
use crate::model::weights::Weights;

use super::Choice;

thread_local! {
    /// Overrides the Winograd choice on this thread (for the comparisons).
    pub(super) static FORCE: Cell<Option<super::Choice>> = const { Cell::new(None) };
    /// Takes the Winograd path at every size (to time it below its threshold).
    pub(super) static ANY_SIZE: Cell<bool> = const { Cell::new(false) };
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
    // At 256 px the UNet's convolutions are the same at half the side; the VAE's are left
    // out.
    let half: Vec<_> = SHAPES
        .iter()
        .filter(|s| s.3 > 0)
        .map(|&(cin, cout, side, calls)| (cin, cout, side / 2, calls))
        .collect();
    for (px, shapes) in [(256, &half[..]), (512, &SHAPES[..])] {
        println!("{px} px:");
        step_table(shapes)?;
    }
    Ok(())
}

/// The rows of [`winograd_step_timing`] for `shapes`, then the sums per step.
fn step_table(shapes: &[(usize, usize, usize, usize)]) -> crate::error::Result<()> {
    let d = Device::Cpu;
    println!("| shape | column fwd / bwd | F2 fwd / bwd | F4 fwd / bwd | calls |");
    let mut sums = [0.0; 3];
    ANY_SIZE.with(|a| a.set(true));
    let only = std::env::var("SDTI_TIMING_ONLY")
        .ok()
        .filter(|o| !o.is_empty());
    for &(cin, cout, side, calls) in shapes {
        if only
            .as_deref()
            .is_some_and(|o| o != format!("{cin}->{cout}@{side}"))
        {
            continue;
        }
        let mut t = HashMap::new();
        t.insert(
            "c.weight".to_string(),
            Tensor::randn(0f32, 0.05, (cout, cin, 3, 3), &d)?,
        );
        t.insert("c.bias".to_string(), Tensor::randn(0f32, 0.05, cout, &d)?);
        let conv = Conv2d::new(&Weights::from_tensors(t, DType::F32, d.clone()), "c", 1, 1)?;
        let x = Tensor::randn(0f32, 1.0, (1, cin, side, side), &d)?;
        let g = Tensor::randn(0f32, 1.0, (1, cout, side, side), &d)?;
        let reps = if side > 128 {
            1
        } else if only.is_some() {
            30
        } else {
            3
        };
        let mut row = Vec::new();
        let pick = std::env::var("SDTI_TIMING_CHOICE")
            .ok()
            .filter(|p| !p.is_empty());
        for choice in [Choice::Off, Choice::F2, Choice::F4] {
            if pick.as_deref().is_some_and(|p| p != format!("{choice:?}")) {
                row.push((0.0, 0.0));
                continue;
            }
            FORCE.with(|f| f.set(Some(choice)));
            let f = best(reps, || conv.apply(&x))?;
            let b = if calls > 0 {
                best(reps, || conv.input_grad(&g, side, side))?
            } else {
                0.0
            };
            row.push((f, b));
        }
        FORCE.with(|f| f.set(None));
        for (sum, (f, b)) in sums.iter_mut().zip(&row) {
            *sum += (f + b) * calls as f64;
        }
        let cells: Vec<String> = row
            .iter()
            .map(|(f, b)| format!("{f:.1} / {b:.1}"))
            .collect();
        println!(
            "| {cin}->{cout} @ {side}x{side} | {} | {calls} |",
            cells.join(" | ")
        );
    }
    println!(
        "UNet step sum: column {:.0} ms, F2 {:.0} ms, F4 {:.0} ms",
        sums[0], sums[1], sums[2]
    );
    ANY_SIZE.with(|a| a.set(false));
    Ok(())
}

/// The largest error against an f64 convolution, relative to the largest f64 value, of
/// the column convolution and both Winograd variants at SD 1.5 widths (f32, forward).
/// Not a test: `cargo test --release --lib winograd_accuracy -- --ignored --nocapture`.
#[test]
#[ignore = "slow (an f64 convolution at full width), run by hand"]
fn winograd_accuracy_at_sd_widths() -> crate::error::Result<()> {
    let d = Device::Cpu;
    for (cin, cout, side) in [(320, 320, 64), (1280, 640, 64)] {
        let mut t = HashMap::new();
        let k = Tensor::randn(0f32, 0.02, (cout, cin, 3, 3), &d)?;
        t.insert("c.weight".to_string(), k.clone());
        t.insert("c.bias".to_string(), Tensor::zeros(cout, DType::F32, &d)?);
        let conv = Conv2d::new(&Weights::from_tensors(t, DType::F32, d.clone()), "c", 1, 1)?;
        let x = Tensor::randn(0f32, 1.0, (1, cin, side, side), &d)?;
        let want = x
            .to_dtype(DType::F64)?
            .conv2d(&k.to_dtype(DType::F64)?, 1, 1, 1, 1)?;
        let scale = want.abs()?.max_all()?.to_scalar::<f64>()?;
        let mut cells = Vec::new();
        for choice in [Choice::Off, Choice::F2, Choice::F4] {
            FORCE.with(|f| f.set(Some(choice)));
            let got = conv.apply(&x)?.to_dtype(DType::F64)?;
            let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f64>()? / scale;
            cells.push(format!("{choice:?} {err:.2e}"));
        }
        FORCE.with(|f| f.set(None));
        println!("{cin}->{cout} @ {side}x{side}: {}", cells.join(", "));
    }
    Ok(())
}
