//! Shared helpers: fixture paths, loading, comparisons.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sdti::model::{LoadOptions, SdModel};

pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// The tensors of the reference run (tests/reference/make_tiny_sd.py).
pub fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("tiny-sd-expected.safetensors"), &Device::Cpu)
        .expect("reference fixture tiny-sd-expected.safetensors")
}

pub fn tiny_model(dtype: DType) -> SdModel {
    SdModel::load(
        &fixture("tiny-sd"),
        &LoadOptions {
            dtype,
            ..LoadOptions::default()
        },
    )
    .expect("tiny diffusers model loads")
}

/// Norm-wise relative error `||a - b|| / ||b||`, computed in f64.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let diff = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap();
    let norm = b.sqr().unwrap().sum_all().unwrap();
    (diff.to_scalar::<f64>().unwrap() / norm.to_scalar::<f64>().unwrap().max(1e-300)).sqrt()
}

pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
}
