//! Shared helpers: fixture paths, loading models and reference fixtures, reference
//! prompts, comparisons; what the training tests set up is in [`train`].

pub mod train;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sdti::embedding::{Encoder, Family};
use sdti::model::weights::WeightIndex;
use sdti::model::TextEncoder;
use sdti::model::{ClipConfig, Injection, LoadOptions, NoiseSchedule, SchedulerConfig, SdModel};

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

/// The tensors of a reference run (a `tests/fixtures/*-expected.safetensors` written by
/// a script under tests/reference/), on the test device.
pub fn reference(file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(file), &test_device())
        .unwrap_or_else(|e| panic!("reference fixture {file}: {e}"))
}

/// The tensors of the SD 1.x reference run (tests/reference/make_tiny_sd.py).
pub fn expected() -> HashMap<String, Tensor> {
    reference("tiny-sd-expected.safetensors")
}

/// Loading in `dtype` on the test device.
pub fn load_options(dtype: DType) -> LoadOptions {
    LoadOptions {
        dtype,
        device: test_device(),
        ..LoadOptions::default()
    }
}

/// A model under tests/fixtures (`tiny-sd`, `tiny-sd2`, `tiny-sdxl`), loaded as users
/// load models, in `dtype` on the test device.
pub fn fixture_model(name: &str, dtype: DType) -> SdModel {
    SdModel::load(&fixture(name), &load_options(dtype))
        .unwrap_or_else(|e| panic!("fixture model {name} loads: {e}"))
}

/// The tiny SD 1.x reference model in `dtype` on the test device.
pub fn tiny_model(dtype: DType) -> SdModel {
    fixture_model("tiny-sd", dtype)
}

/// The CLIP configuration of a diffusers text-encoder folder (`config.json`).
pub fn clip_config(dir: &Path) -> ClipConfig {
    let text = std::fs::read_to_string(dir.join("config.json")).expect("config.json");
    serde_json::from_str(&text).expect("a CLIP text config")
}

/// A text encoder built from a diffusers text-encoder folder's `model.safetensors`
/// directly with `config`, whatever loads the rest of the model.
pub fn text_encoder_from_files(
    dir: &Path,
    config: &ClipConfig,
    family: Family,
    encoder: Encoder,
    dtype: DType,
) -> TextEncoder {
    let mut index = WeightIndex::default();
    for (key, _) in index.map_file(&dir.join("model.safetensors")).unwrap() {
        index.alias_last(&key, format!("te.{key}"));
    }
    let w = index.finish(dtype, test_device());
    TextEncoder::for_family(&w.pp("te"), config, family, encoder)
        .unwrap_or_else(|e| panic!("{family:?} text encoder builds: {e}"))
}

/// A reference prompt's ids `[1, T]` (placeholders 49408.. as learned slots holding id
/// 0), the learned slots' index into the word's table and their mask; chunks (rows of
/// the reference) are laid side by side in one row, as sdti lays out a long prompt.
pub struct ReferencePrompt {
    pub ids: Tensor,
    pub index: Tensor,
    pub mask: Tensor,
}

impl ReferencePrompt {
    pub fn new(raw: &Tensor) -> Self {
        let raw: Vec<i64> = raw.flatten_all().unwrap().to_vec1().unwrap();
        let n = raw.len();
        let ids: Vec<u32> = raw
            .iter()
            .map(|&id| if id >= 49408 { 0 } else { id as u32 })
            .collect();
        let index: Vec<u32> = raw
            .iter()
            .map(|&id| if id >= 49408 { (id - 49408) as u32 } else { 0 })
            .collect();
        let mask: Vec<f32> = raw
            .iter()
            .map(|&id| if id >= 49408 { 1.0 } else { 0.0 })
            .collect();
        let dev = test_device();
        Self {
            ids: Tensor::from_vec(ids, (1, n), &dev).unwrap(),
            index: Tensor::from_vec(index, (1, n), &dev).unwrap(),
            mask: Tensor::from_vec(mask, (1, n), &dev).unwrap(),
        }
    }

    /// `table`'s rows in this prompt's learned slots.
    pub fn inject<'a>(&'a self, table: &'a Tensor) -> Injection<'a> {
        Injection {
            table,
            index: &self.index,
            mask: &self.mask,
        }
    }
}

/// The noise schedule of `config`, its `alphas_cumprod` checked against the reference's
/// `want` within `tol` relative (0: equal).
pub fn checked_schedule(config: &SchedulerConfig, want: &Tensor, tol: f32) -> NoiseSchedule {
    let schedule = config.noise_schedule().unwrap();
    let want: Vec<f32> = want.to_vec1().unwrap();
    let got = schedule.alphas_cumprod();
    assert_eq!(got.len(), want.len(), "alphas_cumprod length");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= tol * w.max(1e-3),
            "alphas_cumprod[{i}]: {g} vs {w}"
        );
    }
    schedule
}

/// A one-element tensor's value as f64.
pub fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
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

/// `got` within `tol` of `want`, relative: `|(got - want) / want| <= tol`.
pub fn assert_rel(what: &str, got: f64, want: f64, tol: f64) {
    assert!(
        ((got - want) / want).abs() <= tol,
        "{what}: {got} vs the reference's {want}"
    );
}

/// Central differences `(f(x + h e_i) - f(x - h e_i)) / 2h` of `f` at `base` for each
/// coordinate `i` of `coords`, as a tensor on the test device.
pub fn central_differences(
    base: &[f64],
    coords: &[usize],
    h: f64,
    f: impl Fn(&[f64]) -> f64,
) -> Tensor {
    let fd: Vec<f64> = coords
        .iter()
        .map(|&i| {
            let mut plus = base.to_vec();
            plus[i] += h;
            let mut minus = base.to_vec();
            minus[i] -= h;
            (f(&plus) - f(&minus)) / (2.0 * h)
        })
        .collect();
    let n = fd.len();
    Tensor::from_vec(fd, n, &test_device()).unwrap()
}

/// A folder of this test thread's own under the system's temporary folder.
pub fn tempdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "sdti-test-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}
