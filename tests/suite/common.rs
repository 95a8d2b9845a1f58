//! Shared helpers: fixture paths, loading, comparisons.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sdti::model::{LoadOptions, SdModel};

/// A file under tests/fixtures of the checkout the tests were built in, or of
/// `SDTI_REPO_ROOT` (a test binary carried to a GPU machine, run from another checkout).
pub fn fixture(rel: &str) -> PathBuf {
    let root = std::env::var_os("SDTI_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    root.join("tests/fixtures").join(rel)
}

/// The device the model tests run on: `SDTI_TEST_DEVICE` (`cpu`, `cuda`, `cuda:N`;
/// default `cpu`), so that scripts/gpu-check.sh runs the same parity tests on a GPU.
/// Opened once: each `Device::new_cuda` is a device of its own, whose tensors do not mix
/// with another's.
pub fn test_device() -> Device {
    static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    DEVICE
        .get_or_init(|| {
            let name = std::env::var("SDTI_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
            sdti::device::open_device(&name).expect("SDTI_TEST_DEVICE names a usable device")
        })
        .clone()
}

/// The tensors of the reference run (tests/reference/make_tiny_sd.py), on the test device.
pub fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("tiny-sd-expected.safetensors"), &test_device())
        .expect("reference fixture tiny-sd-expected.safetensors")
}

/// The tiny reference model in `dtype` on the test device.
pub fn tiny_model(dtype: DType) -> SdModel {
    SdModel::load(
        &fixture("tiny-sd"),
        &LoadOptions {
            dtype,
            device: test_device(),
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
