//! Deterministic tensors for the blocks' unit tests: no random generator, the same
//! values on every machine.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

/// Values of `shape`, `scale` times a sine of the index (f32, CPU).
pub(crate) fn wave(shape: &[usize], seed: f64, scale: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|i| (scale * ((i as f64 + 1.0) * 0.7137 + seed).sin()) as f32)
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).expect("shape")
}

/// Named weights, each a [`wave`] of its own seed (1, 2, ... in the order put).
#[derive(Default)]
pub(crate) struct Waves {
    pub map: HashMap<String, Tensor>,
    seed: f64,
}

impl Waves {
    pub(crate) fn put(&mut self, name: &str, shape: &[usize], scale: f64) {
        self.seed += 1.0;
        self.map
            .insert(name.to_string(), wave(shape, self.seed, scale));
    }
}
