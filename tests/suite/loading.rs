//! Model loading: layouts, key variants, and clear errors for what is not SD 1.x.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sdti::model::{LoadOptions, SdModel};

use crate::common::{assert_close, expected, fixture, test_device, tiny_model};
use crate::training::tempdir;

fn load_err(path: &Path) -> String {
    match SdModel::load(path, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

/// A safetensors file holding zero tensors of the given names and shapes.
fn write_keys(path: &Path, keys: &[(&str, &[usize])]) {
    let tensors: Vec<(String, Tensor)> = keys
        .iter()
        .map(|(k, s)| {
            (
                k.to_string(),
                Tensor::zeros(*s, DType::F16, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    candle_core::safetensors::save(&tensors.into_iter().collect(), path).unwrap();
}

#[test]
fn other_families_and_files_are_named_in_the_error() {
    let dir = tempdir().join("families");
    std::fs::create_dir_all(&dir).unwrap();
    type Keys<'a> = Vec<(&'a str, &'a [usize])>;
    let cases: Vec<(&str, Keys, &str)> = vec![
        (
            "sdxl.safetensors",
            vec![
                (
                    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                    &[4],
                ),
                (
                    "model.diffusion_model.input_blocks.0.0.weight",
                    &[4, 4, 3, 3],
                ),
            ],
            "SDXL",
        ),
        (
            "sd2.safetensors",
            vec![
                ("cond_stage_model.model.ln_final.weight", &[4]),
                (
                    "model.diffusion_model.input_blocks.0.0.weight",
                    &[4, 4, 3, 3],
                ),
            ],
            "SD 2.x",
        ),
        (
            "lora.safetensors",
            vec![("lora_unet_down_blocks_0_attentions_0.alpha", &[1])],
            "not a Stable Diffusion checkpoint",
        ),
        (
            "inpaint.safetensors",
            vec![
                (
                    "model.diffusion_model.input_blocks.0.0.weight",
                    &[4, 9, 3, 3],
                ),
                (
                    "cond_stage_model.transformer.text_model.final_layer_norm.weight",
                    &[4],
                ),
                ("first_stage_model.quant_conv.weight", &[8, 8, 1, 1]),
            ],
            "9 input channels",
        ),
    ];
    for (name, keys, want) in cases {
        let path = dir.join(name);
        write_keys(&path, &keys);
        let err = load_err(&path);
        assert!(err.contains(want) && err.contains(name), "{name}: {err}");
    }
    let ckpt = dir.join("model.ckpt");
    std::fs::write(&ckpt, b"PK\x03\x04 pickle").unwrap();
    let err = load_err(&ckpt);
    assert!(
        err.contains("pickled") && err.contains("safetensors"),
        "{err}"
    );
    let garbage = dir.join("garbage.safetensors");
    std::fs::write(&garbage, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}").unwrap();
    assert!(load_err(&garbage).contains("not a readable safetensors file"));
    assert!(load_err(&dir.join("missing.safetensors")).contains("no such file"));
    let empty_dir = dir.join("empty-folder");
    std::fs::create_dir_all(&empty_dir).unwrap();
    assert!(load_err(&empty_dir).contains("'text_encoder' subfolder is missing"));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The reference prompt's plain token ids, `[1, 77]` u32.
fn raw_ids(exp: &std::collections::HashMap<String, Tensor>) -> Tensor {
    let ids: Vec<u32> = exp["te.input_ids_raw"]
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect();
    Tensor::from_vec(ids, (1, 77), &Device::Cpu).unwrap()
}

/// transformers 5.6+ saves CLIP without the `text_model.` prefix; both load the same.
#[test]
fn text_encoder_keys_without_prefix_load_the_same() {
    let dir = tempdir().join("no-prefix");
    copy_dir(&fixture("tiny-sd"), &dir);
    let te = dir.join("text_encoder/model.safetensors");
    let tensors = candle_core::safetensors::load(&te, &Device::Cpu).unwrap();
    let renamed: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("text_model.").unwrap_or(&k).to_string(), v))
        .collect();
    assert!(renamed.keys().all(|k| !k.starts_with("text_model.")));
    candle_core::safetensors::save(&renamed, &te).unwrap();
    let model = SdModel::load(&dir, &LoadOptions::default()).unwrap();
    let exp = expected();
    let ids = raw_ids(&exp);
    let states = model.text_encoder.forward(&ids, None, 1).unwrap();
    assert_close(
        "prefix-less CLIP",
        &states,
        &exp["te.plain_last_hidden_state"],
        1e-5,
    );
}

/// The same weights in f16 (and bf16 off the CPU) stay close to f32 in the VAE, which
/// computes in the weights' dtype; bf16 on the CPU is refused with the reason.
#[test]
fn reduced_precision_compute_stays_close() {
    let exp = expected();
    let mut dtypes = vec![DType::F16];
    if !test_device().is_cpu() {
        dtypes.push(DType::BF16);
    }
    for dtype in dtypes {
        let model = tiny_model(dtype);
        let dist = model.vae.encode(&exp["vae.image"]).unwrap();
        assert_eq!(dist.mean.dtype(), dtype);
        assert_close(
            &format!("{dtype:?} VAE latent mean"),
            &dist.mean,
            &exp["vae.latent_mean"],
            3e-2,
        );
    }
    if test_device().is_cpu() {
        let err = SdModel::load(
            &fixture("tiny-sd"),
            &LoadOptions {
                dtype: DType::BF16,
                ..LoadOptions::default()
            },
        )
        .expect_err("bf16 on the CPU is refused")
        .to_string();
        assert!(err.contains("bf16 needs a GPU"), "{err}");
    }
}
