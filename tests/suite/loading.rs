//! Model loading: layouts, key variants, families (SD 1.x, SD 2.x, SDXL), and clear
//! errors for what sdti does not train.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sdti::model::config::PerBlock;
use sdti::model::files::{self, Family, LoadedWeights};
use sdti::model::{LoadOptions, ModelConfig, PredictionType, SdModel};

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
            "sgm-unknown.safetensors",
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
            "neither SDXL's two text encoders nor SD 2.x's one",
        ),
        (
            "sd2-no-vae.safetensors",
            vec![
                ("cond_stage_model.model.ln_final.weight", &[4]),
                (
                    "model.diffusion_model.input_blocks.0.0.weight",
                    &[4, 4, 3, 3],
                ),
            ],
            "no 'first_stage_model.*' VAE keys",
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
        let dist = model.vae().unwrap().encode(&exp["vae.image"]).unwrap();
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

/// Indexes `path` (any family, SDXL included) in f32 on the CPU.
fn index(path: &Path, config: Option<&ModelConfig>) -> LoadedWeights {
    files::index_model(path, DType::F32, &Device::Cpu, config)
        .unwrap_or_else(|e| panic!("{} indexes: {e}", path.display()))
}

/// A stored tensor as f32 values (both sides come from the same fp16 weights, so equal
/// values are exact).
fn values(w: &sdti::model::weights::Weights, name: &str) -> Vec<f32> {
    w.get_raw(name)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `shape` without trailing 1x1 kernel dimensions (LDM stores the VAE's attention
/// projections as 1x1 convolutions, diffusers as matrices).
fn squeezed(shape: Vec<usize>) -> Vec<usize> {
    if shape.len() == 4 && shape[2..] == [1, 1] {
        shape[..2].to_vec()
    } else {
        shape
    }
}

/// Every name of `folder` is in `single` with the same shape and the same values;
/// returns the names only `single` has.
fn assert_single_holds_folder(folder: &LoadedWeights, single: &LoadedWeights) -> Vec<String> {
    let names = folder.weights.names();
    let single_names: std::collections::BTreeSet<String> =
        single.weights.names().into_iter().collect();
    assert!(names.len() > 100, "{} names", names.len());
    for name in &names {
        assert!(single_names.contains(name), "single file lacks {name}");
        let (a, b) = (
            folder.weights.shape_of(name).unwrap(),
            single.weights.shape_of(name).unwrap(),
        );
        assert_eq!(squeezed(a), squeezed(b), "{name}");
        assert!(
            values(&folder.weights, name) == values(&single.weights, name),
            "{name}: values differ"
        );
    }
    let folder_names: std::collections::BTreeSet<String> = names.into_iter().collect();
    single_names.difference(&folder_names).cloned().collect()
}

/// The raw tensor `key` of a single file.
fn raw(path: &Path, key: &str) -> Tensor {
    let mut all = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    all.remove(key)
        .unwrap_or_else(|| panic!("{key} in {}", path.display()))
        .to_dtype(DType::F32)
        .unwrap()
}

#[test]
fn sd2_single_file_holds_the_folders_tensors() {
    let folder = index(&fixture("tiny-sd2"), None);
    assert_eq!(folder.family, Family::Sd2);
    assert_eq!(folder.config.family, Family::Sd2);
    let te = &folder.config.text_encoder;
    assert_eq!((te.num_hidden_layers, te.dropped_final_layers), (23, 1));
    assert_eq!(te.hidden_act, "gelu");
    // The config says projection_dim 32, but CLIPTextModel has no projection.
    assert_eq!(te.projection_dim, None);
    assert!(folder.config.unet.use_linear_projection && folder.config.unet.upcast_attention);
    assert!(
        folder
            .notes
            .iter()
            .any(|n| n.contains("SD 2.x folder: epsilon")),
        "{:?}",
        folder.notes
    );

    // The tiny widths (32, heads of 8 and 16 channels) do not follow the 64-channel rule, so
    // the single file needs the configuration; the real one infers it (unit tests).
    let path = fixture("tiny-sd2.safetensors");
    let err = files::index_model(&path, DType::F32, &Device::Cpu, None)
        .err()
        .expect("tiny widths have no inferable heads")
        .to_string();
    assert!(err.contains("not a multiple of 64"), "{err}");
    let mut cfg = folder.config.clone();
    cfg.text_encoder.num_hidden_layers = 24;
    cfg.text_encoder.dropped_final_layers = 0;
    cfg.text_encoder.projection_dim = Some(32);
    let single = files::index_model(&path, DType::F32, &Device::Cpu, Some(&cfg)).unwrap();
    assert_eq!(single.family, Family::Sd2);
    assert_eq!(single.config, cfg);

    // The folder dropped OpenCLIP's block 24 and text_projection; q/k/v came out of the
    // packed in_proj tensors.
    let extra = assert_single_holds_folder(&folder, &single);
    assert_eq!(extra.len(), 17, "{extra:?}");
    assert!(
        extra
            .iter()
            .all(|n| n == "text_encoder.text_projection.weight"
                || n.starts_with("text_encoder.text_model.encoder.layers.23.")),
        "{extra:?}"
    );
    for part in ["q", "k", "v"] {
        assert!(extra.contains(&format!(
            "text_encoder.text_model.encoder.layers.23.self_attn.{part}_proj.weight"
        )));
    }
    let proj = single
        .weights
        .get("text_encoder.text_projection.weight")
        .unwrap();
    let stored = raw(&path, "cond_stage_model.model.text_projection");
    let want = stored.t().unwrap().contiguous().unwrap();
    assert_eq!(
        proj.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        "text_projection is read transposed"
    );
    assert_ne!(
        stored.to_vec2::<f32>().unwrap(),
        want.to_vec2::<f32>().unwrap(),
        "a symmetric projection would not tell"
    );
}

#[test]
fn sdxl_single_file_holds_the_folders_tensors() {
    let folder = index(&fixture("tiny-sdxl"), None);
    assert_eq!(folder.family, Family::Sdxl);
    let c = &folder.config;
    assert_eq!(c.family, Family::Sdxl);
    let g = c.text_encoder_2.as_ref().expect("text_encoder_2 config");
    assert_eq!(
        (g.hidden_size, g.num_hidden_layers, g.projection_dim),
        (48, 32, Some(48))
    );
    assert_eq!(c.text_encoder.projection_dim, None);
    assert_eq!(c.unet.addition_embed_type.as_deref(), Some("text_time"));
    assert_eq!(c.vae.scaling_factor, 0.13025);

    let path = fixture("tiny-sdxl.safetensors");
    let single = index(&path, Some(c));
    assert_eq!(single.family, Family::Sdxl);
    let extra = assert_single_holds_folder(&folder, &single);
    assert!(extra.is_empty(), "{extra:?}");
    // Every folder name is in the single file and the two hold as many: the same set.
    assert_eq!(folder.weights.names().len(), single.weights.names().len());
    let proj = single
        .weights
        .get("text_encoder_2.text_projection.weight")
        .unwrap();
    let stored = raw(&path, "conditioner.embedders.1.model.text_projection");
    assert_eq!(
        proj.to_vec2::<f32>().unwrap(),
        stored.t().unwrap().to_vec2::<f32>().unwrap()
    );
    for name in [
        "unet.add_embedding.linear_1.weight",
        "unet.add_embedding.linear_2.bias",
    ] {
        assert!(single.weights.contains(name), "{name}");
    }
}

#[test]
fn text_encoders_load_alone_with_their_family() {
    let sdxl =
        files::index_text_encoders(&fixture("tiny-sdxl"), DType::F32, &Device::Cpu, None).unwrap();
    assert_eq!(sdxl.family, Family::Sdxl);
    assert_eq!(
        sdxl.text_encoder_2.as_ref().and_then(|c| c.projection_dim),
        Some(48)
    );
    assert!(sdxl
        .weights
        .contains("text_encoder_2.text_model.encoder.layers.31.mlp.fc2.weight"));
    assert!(!sdxl.weights.names().iter().any(|n| n.starts_with("unet.")));
    let folder = index(&fixture("tiny-sdxl"), None);
    let single = files::index_text_encoders(
        &fixture("tiny-sdxl.safetensors"),
        DType::F32,
        &Device::Cpu,
        Some(&folder.config),
    )
    .unwrap();
    assert_eq!(single.family, Family::Sdxl);
    assert_eq!(single.weights.names(), sdxl.weights.names());
    let err = files::index_text_encoder(&fixture("tiny-sdxl"), DType::F32, &Device::Cpu, None)
        .err()
        .expect("one encoder cannot hold SDXL")
        .to_string();
    assert!(err.contains("two text encoders"), "{err}");

    let (_, sd2) =
        files::index_text_encoder(&fixture("tiny-sd2"), DType::F32, &Device::Cpu, None).unwrap();
    assert_eq!((sd2.num_hidden_layers, sd2.dropped_final_layers), (23, 1));
    let sd2_file = files::index_text_encoders(
        &fixture("tiny-sd2.safetensors"),
        DType::F32,
        &Device::Cpu,
        Some(&ModelConfig::sd2()),
    )
    .unwrap();
    assert_eq!(sd2_file.family, Family::Sd2);
    let wrong = files::index_text_encoders(
        &fixture("tiny-sd2.safetensors"),
        DType::F32,
        &Device::Cpu,
        Some(&ModelConfig::sd1()),
    )
    .err()
    .expect("an SD 1.x configuration for an SD 2.x file")
    .to_string();
    assert!(
        wrong.contains("configuration is for SD 1.x but the model is SD 2.x"),
        "{wrong}"
    );
}

/// A copy of `from` with tensors replaced or added.
fn rewrite(from: &Path, to: &Path, changes: Vec<(&str, Tensor)>) {
    let mut all = candle_core::safetensors::load(from, &Device::Cpu).unwrap();
    for (k, v) in changes {
        all.insert(k.to_string(), v);
    }
    candle_core::safetensors::save(&all, to).unwrap();
}

#[test]
fn prediction_type_of_single_files_follows_the_rule_order() {
    let dir = tempdir().join("prediction");
    std::fs::create_dir_all(&dir).unwrap();
    let sd2 = fixture("tiny-sd2.safetensors");
    let d = files::detect_model(&sd2).unwrap();
    assert_eq!(d.family, Family::Sd2);
    assert_eq!(d.scheduler.prediction_type, PredictionType::Epsilon);
    assert!(
        d.notes[0].starts_with("SD 2.x single file: epsilon (output_blocks.11.1.transformer_blocks.0.norm1.bias std 0.0")
            && d.notes[0].contains("<= 0.09, ComfyUI's rule); override with --prediction-type"),
        "{:?}",
        d.notes
    );

    // ComfyUI's rule: a spread-out norm1.bias in the last output block means v.
    let wide = dir.join("sd2-wide-bias.safetensors");
    let key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias";
    let n = raw(&sd2, key).elem_count();
    let spread = (Tensor::arange(0f32, n as f32, &Device::Cpu).unwrap() * 0.05)
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap();
    rewrite(&sd2, &wide, vec![(key, spread)]);
    let d = files::detect_model(&wide).unwrap();
    assert_eq!(d.scheduler.prediction_type, PredictionType::VPrediction);
    assert!(
        d.notes[0].contains("> 0.09, ComfyUI's rule"),
        "{:?}",
        d.notes
    );

    // A1111's sidecar config wins over the rule, either way.
    std::fs::write(
        dir.join("sd2-wide-bias.yaml"),
        "model:\n  params:\n    parameterization: \"eps\" # A1111\n",
    )
    .unwrap();
    let d = files::detect_model(&wide).unwrap();
    assert_eq!(d.scheduler.prediction_type, PredictionType::Epsilon);
    assert!(
        d.notes[0].contains("parameterization in") && d.notes[0].contains("sd2-wide-bias.yaml"),
        "{:?}",
        d.notes
    );
    let plain = dir.join("sd2.safetensors");
    std::fs::copy(&sd2, &plain).unwrap();
    std::fs::write(
        dir.join("sd2.yaml"),
        "model:\n  params:\n    parameterization: \"v\"\n",
    )
    .unwrap();
    assert_eq!(
        files::detect_model(&plain)
            .unwrap()
            .scheduler
            .prediction_type,
        PredictionType::VPrediction
    );
    std::fs::write(
        dir.join("sd2.yaml"),
        "model:\n  params:\n    parameterization: x0\n",
    )
    .unwrap();
    let err = files::detect_model(&plain).unwrap_err().to_string();
    assert!(err.contains("sd2.yaml") && err.contains("\"x0\""), "{err}");

    // SDXL fine-tunes mark v-prediction and zero terminal SNR with empty keys.
    let sdxl = fixture("tiny-sdxl.safetensors");
    let d = files::detect_model(&sdxl).unwrap();
    assert_eq!(d.family, Family::Sdxl);
    assert_eq!(d.scheduler.prediction_type, PredictionType::Epsilon);
    assert!(!d.scheduler.rescale_betas_zero_snr);
    let empty = || Tensor::zeros(0, DType::F32, &Device::Cpu).unwrap();
    let vpred = dir.join("sdxl-vpred.safetensors");
    rewrite(&sdxl, &vpred, vec![("v_pred", empty()), ("ztsnr", empty())]);
    let d = files::detect_model(&vpred).unwrap();
    assert_eq!(d.scheduler.prediction_type, PredictionType::VPrediction);
    assert!(d.scheduler.rescale_betas_zero_snr);
    assert!(
        d.notes[0].starts_with("SDXL single file: v-prediction (the file's 'v_pred' marker key)"),
        "{:?}",
        d.notes
    );
    assert!(d.notes[1].contains("zero terminal SNR"), "{:?}", d.notes);
    let ztsnr_only = dir.join("sdxl-ztsnr.safetensors");
    rewrite(&sdxl, &ztsnr_only, vec![("ztsnr", empty())]);
    let d = files::detect_model(&ztsnr_only).unwrap();
    assert!(!d.scheduler.rescale_betas_zero_snr);
    assert!(d.notes[1].contains("ignored"), "{:?}", d.notes);

    // The detected type reaches the loaded config and its notes; a given configuration
    // replaces it and says so.
    let folder = index(&fixture("tiny-sdxl"), None);
    let mut cfg = folder.config.clone();
    let loaded = index(&vpred, Some(&cfg));
    assert_eq!(
        loaded.config.scheduler.prediction_type,
        PredictionType::Epsilon
    );
    assert!(
        loaded
            .notes
            .iter()
            .any(|n| n.contains("replaces the one found (v-prediction)")),
        "{:?}",
        loaded.notes
    );
    cfg.scheduler.prediction_type = PredictionType::VPrediction;
    cfg.scheduler.rescale_betas_zero_snr = true;
    let loaded = index(&vpred, Some(&cfg));
    assert_eq!(loaded.notes.len(), 2, "{:?}", loaded.notes);

    // Folders: scheduler_config.json.
    let d = files::detect_model(&fixture("tiny-sdxl")).unwrap();
    assert_eq!(d.family, Family::Sdxl);
    assert!(
        d.notes[0].starts_with("SDXL folder: epsilon (scheduler/scheduler_config.json)"),
        "{:?}",
        d.notes
    );
}

/// A safetensors file of zeros, any dtype name safetensors knows (candle cannot make fp8).
fn write_header_file(path: &Path, keys: &[(&str, &str, &[usize])]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (key, dtype, shape) in keys {
        let bytes = shape.iter().product::<usize>()
            * match *dtype {
                "F8_E4M3" | "F8_E5M2" | "U8" => 1,
                "F16" | "BF16" => 2,
                "I64" | "F64" => 8,
                _ => 4,
            };
        header.insert(
            key.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut text = serde_json::Value::Object(header).to_string();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.resize(out.len() + offset, 0);
    std::fs::write(path, out).unwrap();
}

#[test]
fn variants_sdti_does_not_train_say_what_was_found() {
    let dir = tempdir().join("variants");
    std::fs::create_dir_all(&dir).unwrap();
    let unet_in = |c: usize| -> (&'static str, &'static str, Vec<usize>) {
        (
            "model.diffusion_model.input_blocks.0.0.weight",
            "F16",
            vec![320, c, 3, 3],
        )
    };
    let vae = (
        "first_stage_model.quant_conv.weight",
        "F16",
        vec![8, 8, 1, 1],
    );
    let sd2_te = ("cond_stage_model.model.ln_final.weight", "F16", vec![1024]);
    let xl = vec![
        (
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
            "F16",
            vec![768],
        ),
        (
            "conditioner.embedders.1.model.ln_final.weight",
            "F16",
            vec![1280],
        ),
        (
            "model.diffusion_model.label_emb.0.0.weight",
            "F16",
            vec![1280, 2816],
        ),
        vae.clone(),
    ];
    let with = |mut base: Vec<(&'static str, &'static str, Vec<usize>)>,
                extra: Vec<(&'static str, &'static str, Vec<usize>)>| {
        base.extend(extra);
        base
    };
    let cases = vec![
        (
            "sd2-inpaint",
            vec![sd2_te.clone(), unet_in(9), vae.clone()],
            "9 input channels (9: inpainting",
        ),
        (
            "sdxl-inpaint",
            with(xl.clone(), vec![unet_in(9)]),
            "9 input channels",
        ),
        (
            "sd2-depth",
            vec![
                sd2_te.clone(),
                unet_in(5),
                vae.clone(),
                (
                    "depth_model.model.scratch.output_conv.0.weight",
                    "F16",
                    vec![1],
                ),
            ],
            "SD 2.x depth model",
        ),
        (
            "sd2-unclip",
            vec![
                sd2_te.clone(),
                unet_in(4),
                vae.clone(),
                (
                    "model.diffusion_model.label_emb.0.0.weight",
                    "F16",
                    vec![1280, 2048],
                ),
            ],
            "SD 2.x unCLIP",
        ),
        (
            "refiner",
            vec![
                (
                    "conditioner.embedders.0.model.token_embedding.weight",
                    "F16",
                    vec![49408, 1280],
                ),
                unet_in(4),
                (
                    "model.diffusion_model.label_emb.0.0.weight",
                    "F16",
                    vec![1536, 2560],
                ),
                vae.clone(),
            ],
            "SDXL refiner",
        ),
        (
            "playground",
            with(
                xl.clone(),
                vec![
                    unet_in(4),
                    ("edm_mean", "F32", vec![1, 4, 1, 1]),
                    ("edm_std", "F32", vec![1, 4, 1, 1]),
                ],
            ),
            "EDM model",
        ),
        (
            "edm-vpred",
            with(
                xl.clone(),
                vec![unet_in(4), ("edm_vpred.sigma_max", "F32", vec![])],
            ),
            "EDM v-prediction",
        ),
        (
            "scaled-fp8",
            with(
                xl.clone(),
                vec![unet_in(4), ("scaled_fp8", "F8_E4M3", vec![0])],
            ),
            "fp8 checkpoint ('scaled_fp8'",
        ),
        (
            "fp8",
            with(
                xl.clone(),
                vec![(
                    "model.diffusion_model.input_blocks.0.0.weight",
                    "F8_E4M3",
                    vec![320, 4, 3, 3],
                )],
            ),
            "8-bit floats",
        ),
    ];
    for (name, keys, want) in cases {
        let path = dir.join(format!("{name}.safetensors"));
        let keys: Vec<(&str, &str, &[usize])> = keys
            .iter()
            .map(|(k, d, s)| (*k, *d, s.as_slice()))
            .collect();
        write_header_file(&path, &keys);
        let err = load_err(&path);
        assert!(
            err.contains(want) && err.contains(&format!("{name}.safetensors")),
            "{name}: {err}"
        );
        let detected = files::detect_model(&path).unwrap_err().to_string();
        assert!(detected.contains(want), "{name}: {detected}");
    }

    // A diffusers refiner folder: text_encoder_2 without text_encoder.
    let refiner = dir.join("refiner-folder");
    std::fs::create_dir_all(refiner.join("text_encoder_2")).unwrap();
    assert!(load_err(&refiner).contains("SDXL refiner"));
}

/// An SD 2.x diffusers folder builds into a model whose notes say the prediction type.
#[test]
fn sd2_folder_loads_as_a_model() {
    let model = SdModel::load(&fixture("tiny-sd2"), &LoadOptions::default()).unwrap();
    assert_eq!(model.config.family, Family::Sd2);
    assert!(model.text_encoder_2.is_none());
    assert!(
        model
            .notes
            .iter()
            .any(|n| n.contains("SD 2.x folder: epsilon")),
        "{:?}",
        model.notes
    );
}

/// The SD 2.x single file builds too (with the configuration its tiny widths need): its
/// text encoder keeps OpenCLIP's 24 blocks and conditions on the 23rd, as the folder's
/// 23 do.
#[test]
fn sd2_single_file_loads_as_a_model() {
    let folder = SdModel::load(&fixture("tiny-sd2"), &LoadOptions::default()).unwrap();
    let mut cfg = folder.config.clone();
    cfg.text_encoder.num_hidden_layers = 24;
    cfg.text_encoder.dropped_final_layers = 0;
    cfg.text_encoder.projection_dim = Some(32);
    let single = SdModel::load(
        &fixture("tiny-sd2.safetensors"),
        &LoadOptions {
            config: Some(cfg),
            ..LoadOptions::default()
        },
    )
    .unwrap();
    assert_eq!(single.config.family, Family::Sd2);
    assert_eq!(single.text_encoder.full_depth(), 24);
    assert_eq!(folder.text_encoder.full_depth(), 24);
    assert!(
        single.notes.iter().any(|n| n.contains("ComfyUI's rule")),
        "{:?}",
        single.notes
    );
}

/// SDXL builds from its folder and its single file (past the training gate): two text
/// encoders, the second with its projection, and the UNet's added embedding.
#[test]
fn sdxl_builds_from_folder_and_single_file() {
    let folder = index(&fixture("tiny-sdxl"), None);
    let config = folder.config.clone();
    for loaded in [
        folder,
        index(&fixture("tiny-sdxl.safetensors"), Some(&config)),
    ] {
        let model = SdModel::from_weights(&loaded.weights, loaded.config, loaded.source).unwrap();
        assert_eq!(model.config.family, Family::Sdxl);
        assert_eq!(model.text_encoder.config().hidden_size, 32);
        let g = model.text_encoder_2.as_ref().expect("the second encoder");
        assert_eq!(g.config().hidden_size, 48);
        assert_eq!(g.encoder(), sdti::embedding::Encoder::ClipG);
        assert!(model.unet.takes_added_cond());
    }
}

/// An SD 2.0 folder (upcast_attention false in its config) computes attention scores in
/// f32 all the same, and says so.
#[test]
fn sd2_folders_always_upcast_attention() {
    let dir = tempdir().join("sd20");
    copy_dir(&fixture("tiny-sd2"), &dir);
    let path = dir.join("unet/config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["upcast_attention"] = false.into();
    std::fs::write(&path, config.to_string()).unwrap();
    let loaded = index(&dir, None);
    assert!(loaded.config.unet.upcast_attention);
    assert!(
        loaded
            .notes
            .iter()
            .any(|n| n.contains("attention scores in f32")),
        "{:?}",
        loaded.notes
    );
}

/// SDXL's `text_encoder_2` keys load with or without transformers' `text_model.` prefix.
#[test]
fn sdxl_second_encoder_keys_without_prefix_load_the_same() {
    let dir = tempdir().join("sdxl-no-prefix");
    copy_dir(&fixture("tiny-sdxl"), &dir);
    let te = dir.join("text_encoder_2/model.safetensors");
    let tensors = candle_core::safetensors::load(&te, &Device::Cpu).unwrap();
    let renamed: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("text_model.").unwrap_or(&k).to_string(), v))
        .collect();
    assert!(renamed.contains_key("encoder.layers.31.mlp.fc2.weight"));
    candle_core::safetensors::save(&renamed, &te).unwrap();
    let original = index(&fixture("tiny-sdxl"), None);
    let bare = index(&dir, None);
    assert_eq!(bare.weights.names(), original.weights.names());
    assert_eq!(bare.config, original.config);
}

/// The (key, dtype, shape) header of a safetensors file.
fn read_header(path: &Path) -> Vec<(String, String, Vec<usize>)> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, v)| {
            let shape = v["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            (k, v["dtype"].as_str().unwrap().to_string(), shape)
        })
        .collect()
}

/// A zero-filled copy of a tiny single file with every width times `factor` (so 64-channel
/// heads divide them, as in the real models), for the configuration read off the shapes
/// alone.
fn widened(from: &Path, to: &Path, factor: usize) {
    let keys: Vec<(String, String, Vec<usize>)> = read_header(from)
        .into_iter()
        .map(|(k, d, s)| {
            let s = s
                .into_iter()
                .map(|x| {
                    if x >= 16 && x != 49408 && x != 77 {
                        factor * x
                    } else {
                        x
                    }
                })
                .collect();
            (k, d, s)
        })
        .collect();
    let refs: Vec<(&str, &str, &[usize])> = keys
        .iter()
        .map(|(k, d, s)| (k.as_str(), d.as_str(), s.as_slice()))
        .collect();
    write_header_file(to, &refs);
}

/// Without a configuration, a single file's is read off its shapes: SD 2.x's 24 OpenCLIP
/// blocks (the folder has 23) with their projection, 64-channel heads, linear projections,
/// f32 attention; SDXL's two encoders, per-level depths and added embedding.
#[test]
fn single_file_configs_are_read_off_the_shapes() {
    let dir = tempdir().join("widened");
    std::fs::create_dir_all(&dir).unwrap();

    let sd2 = dir.join("sd2.safetensors");
    widened(&fixture("tiny-sd2.safetensors"), &sd2, 2);
    let folder = index(&fixture("tiny-sd2"), None).config;
    let single = index(&sd2, None).config;
    assert_eq!(single.family, Family::Sd2);
    let (t, f) = (&single.text_encoder, &folder.text_encoder);
    assert_eq!(
        (
            f.num_hidden_layers,
            f.dropped_final_layers,
            f.projection_dim
        ),
        (23, 1, None)
    );
    assert_eq!(
        (
            t.num_hidden_layers,
            t.dropped_final_layers,
            t.projection_dim
        ),
        (24, 0, Some(64))
    );
    assert_eq!(
        (t.hidden_size, t.intermediate_size),
        (2 * f.hidden_size, 2 * f.intermediate_size)
    );
    assert_eq!((t.num_attention_heads, t.hidden_act.as_str()), (1, "gelu"));
    let (u, fu) = (&single.unet, &folder.unet);
    assert_eq!(u.down_block_types, fu.down_block_types);
    assert_eq!(u.up_block_types, fu.up_block_types);
    let doubled: Vec<usize> = fu.block_out_channels.iter().map(|c| 2 * c).collect();
    assert_eq!(u.block_out_channels, doubled);
    assert_eq!(u.attention_head_dim, PerBlock::Each(vec![1, 1, 2, 2]));
    assert_eq!(u.cross_attention_dim, 2 * fu.cross_attention_dim);
    assert!(u.use_linear_projection && u.upcast_attention);
    assert_eq!(u.transformer_layers_per_block, None);
    assert_eq!(u.addition_embed_type, None);
    assert_eq!(single.vae.scaling_factor, 0.18215);
    assert_eq!(single.scheduler.prediction_type, PredictionType::Epsilon);

    let sdxl = dir.join("sdxl.safetensors");
    // bigG's tiny width 48 becomes 192: three 64-channel heads.
    widened(&fixture("tiny-sdxl.safetensors"), &sdxl, 4);
    let folder = index(&fixture("tiny-sdxl"), None).config;
    let single = index(&sdxl, None).config;
    assert_eq!(single.family, Family::Sdxl);
    let l = &single.text_encoder;
    assert_eq!(
        (l.hidden_size, l.num_hidden_layers, l.hidden_act.as_str()),
        (128, 12, "quick_gelu")
    );
    assert_eq!(l.projection_dim, None);
    let g = single.text_encoder_2.as_ref().unwrap();
    assert_eq!(
        (g.hidden_size, g.num_hidden_layers, g.hidden_act.as_str()),
        (192, 32, "gelu")
    );
    assert_eq!((g.num_attention_heads, g.projection_dim), (3, Some(192)));
    let (u, fu) = (&single.unet, &folder.unet);
    assert_eq!(u.down_block_types, fu.down_block_types);
    assert_eq!(u.up_block_types, fu.up_block_types);
    assert_eq!(u.attention_head_dim, PerBlock::Each(vec![2, 2, 4]));
    assert_eq!(
        u.transformer_layers_per_block,
        fu.transformer_layers_per_block
    );
    assert_eq!(u.cross_attention_dim, 4 * fu.cross_attention_dim);
    assert_eq!(u.addition_embed_type.as_deref(), Some("text_time"));
    assert_eq!(
        u.projection_class_embeddings_input_dim,
        fu.projection_class_embeddings_input_dim.map(|d| 4 * d)
    );
    assert_eq!(
        u.addition_time_embed_dim,
        fu.addition_time_embed_dim.map(|d| 4 * d)
    );
    assert!(u.use_linear_projection && !u.upcast_attention);
    assert_eq!(single.vae.scaling_factor, 0.13025);
}

/// SD 2.x saved by Stability's SGM code keeps OpenCLIP under
/// `conditioner.embedders.0.model.`: the same tensors under the same names.
#[test]
fn sgm_format_sd2_loads_as_sd2() {
    let dir = tempdir().join("sgm");
    std::fs::create_dir_all(&dir).unwrap();
    let original = fixture("tiny-sd2.safetensors");
    let sgm = dir.join("sd2-sgm.safetensors");
    let tensors = candle_core::safetensors::load(&original, &Device::Cpu).unwrap();
    let renamed: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| {
            let k = match k.strip_prefix("cond_stage_model.model.") {
                Some(rest) => format!("conditioner.embedders.0.model.{rest}"),
                None => k,
            };
            (k, v)
        })
        .collect();
    assert!(!renamed.keys().any(|k| k.starts_with("cond_stage_model.")));
    candle_core::safetensors::save(&renamed, &sgm).unwrap();
    let cfg = {
        let mut c = index(&fixture("tiny-sd2"), None).config;
        c.text_encoder.num_hidden_layers = 24;
        c.text_encoder.dropped_final_layers = 0;
        c.text_encoder.projection_dim = Some(32);
        c
    };
    let a = index(&original, Some(&cfg));
    let b = index(&sgm, Some(&cfg));
    assert_eq!(b.family, Family::Sd2);
    assert_eq!(a.weights.names(), b.weights.names());
    for name in [
        "text_encoder.text_model.encoder.layers.5.self_attn.v_proj.bias",
        "text_encoder.text_projection.weight",
    ] {
        assert!(
            values(&a.weights, name) == values(&b.weights, name),
            "{name}"
        );
    }
}

/// The tiny SD 1.x as its folder and as a copy of its single file in a folder of the
/// test's own (`name`), which a test may change; the copy's path.
fn folder_and_single_copy(name: &str) -> (SdModel, SdModel, std::path::PathBuf) {
    let dir = tempdir().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let single = dir.join("tiny-sd.safetensors");
    std::fs::copy(fixture("tiny-sd.safetensors"), &single).unwrap();
    let opts = crate::common::load_options(DType::F32);
    let folder = SdModel::load(&fixture("tiny-sd"), &opts).unwrap();
    // The tiny CLIP's heads do not follow SD 1.x's rule: the folder's configuration.
    let single_opts = LoadOptions {
        config: Some(folder.config.clone()),
        ..opts
    };
    let single_model = SdModel::load(&single, &single_opts).unwrap();
    (folder, single_model, single)
}

/// Moves a file's modification time an hour on, as an edit would.
fn touch_later(path: &Path) {
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(later)
        .unwrap();
}

/// The VAE that training frees (`SdModel::release_vae`) comes back the same, bit for
/// bit, from a folder, from a single file and from a random model's generator; from a
/// file changed or removed since loading it does not, and the error names the file. A
/// model built from weights in memory keeps its VAE.
#[test]
fn a_released_vae_comes_back_the_same() {
    use sdti::model::random::{random_model, random_weights, tiny_sd1_config};
    use sdti::model::weights::Weights;

    let dev = test_device();
    let n = 3 * 64 * 64;
    let image = ((Tensor::arange(0u32, n as u32, &dev).unwrap())
        .to_dtype(DType::F32)
        .unwrap()
        .reshape((1, 3, 64, 64))
        .unwrap()
        * (2.0 / n as f64))
        .unwrap()
        .affine(1.0, -1.0)
        .unwrap();
    let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (folder, single_model, single) = folder_and_single_copy("vae-release");
    let models = [
        ("folder", folder),
        ("single file", single_model),
        (
            "random",
            random_model(&tiny_sd1_config(), 3, DType::F32, &dev).unwrap(),
        ),
    ];
    for (what, model) in &models {
        let vae = model.vae().unwrap();
        let mean = vae.encode(&image).unwrap().mean;
        let pixels = vae.decode(&mean).unwrap();
        drop(vae);
        assert!(model.vae_releasable() && model.release_vae(), "{what}");
        assert!(!model.vae_loaded(), "{what}");
        let again = model.vae().unwrap();
        assert!(model.vae_loaded(), "{what}");
        assert_eq!(
            values(&again.encode(&image).unwrap().mean),
            values(&mean),
            "{what}"
        );
        assert_eq!(
            values(&again.decode(&mean).unwrap()),
            values(&pixels),
            "{what}"
        );
    }

    let model = &models[1].1;
    assert!(model.release_vae());
    touch_later(&single);
    let err = model.vae().unwrap_err().to_string();
    for part in ["tiny-sd.safetensors", "changed since the model was loaded"] {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }
    std::fs::remove_file(&single).unwrap();
    let err = model.vae().unwrap_err().to_string();
    for part in ["tiny-sd.safetensors", "is gone"] {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }

    let config = tiny_sd1_config();
    let weights =
        Weights::from_tensors(random_weights(&config, 1).unwrap(), DType::F32, dev.clone());
    let kept = SdModel::from_weights(&weights, config, "in memory".into()).unwrap();
    assert!(!kept.vae_releasable() && !kept.release_vae());
    assert!(kept.vae_loaded());
    kept.vae().unwrap();
}

/// The token tables that training frees but for its prompts' rows
/// (`SdModel::release_token_tables`) embed those prompts the same, bit for bit, without
/// the whole table; a prompt with another token reads the table again, the same, from a
/// folder, a single file or a random model's generator (SDXL: both tables, bigG's
/// padding id kept); from a file changed since loading it does not, and the error names
/// the file. A model built from weights in memory keeps its tables.
#[test]
fn a_released_token_table_comes_back_the_same() {
    use sdti::model::random::{random_model, random_weights, tiny_sd1_config, tiny_sdxl_config};
    use sdti::model::weights::Weights;
    use sdti::tokenizer::ClipTokenizer;

    let dev = test_device();
    let tok = ClipTokenizer::new().unwrap();
    let ids = |text: &str| {
        let ids = tok.encode_padded(text);
        let n = ids.len();
        (ids.clone(), Tensor::from_vec(ids, (1, n), &dev).unwrap())
    };
    let (kept, kept_ids) = ids("a photo of a cat");
    let (_, other_ids) = ids("an oil painting of a dog");
    let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (folder, single_model, single) = folder_and_single_copy("token-table-release");
    let opts = crate::common::load_options(DType::F32);
    let models = [
        ("folder", folder),
        ("single file", single_model),
        (
            "sdxl folder",
            SdModel::load(&fixture("tiny-sdxl"), &opts).unwrap(),
        ),
        (
            "random",
            random_model(&tiny_sd1_config(), 3, DType::F32, &dev).unwrap(),
        ),
        (
            "random sdxl",
            random_model(&tiny_sdxl_config(), 3, DType::F32, &dev).unwrap(),
        ),
    ];
    for (what, model) in &models {
        let encoders = model.text_encoders();
        let states = |e: &sdti::model::TextEncoder, ids: &Tensor| {
            let skip = e.default_conditioning().clip_skip;
            values(&e.forward(ids, None, skip).unwrap())
        };
        let before: Vec<_> = encoders
            .iter()
            .map(|e| {
                let table = values(&e.token_table().unwrap());
                (table, states(e, &kept_ids), states(e, &other_ids))
            })
            .collect();
        assert!(model.release_token_tables(&kept).unwrap(), "{what}");
        for (e, (table, kept_states, other_states)) in encoders.iter().zip(&before) {
            assert!(!e.token_table_loaded(), "{what}");
            assert_eq!(&states(e, &kept_ids), kept_states, "{what}");
            assert!(!e.token_table_loaded(), "{what}: the kept rows serve");
            assert_eq!(&states(e, &other_ids), other_states, "{what}");
            assert!(
                e.token_table_loaded(),
                "{what}: another token reads it again"
            );
            assert!(model.release_token_tables(&kept).unwrap());
            assert_eq!(&values(&e.token_table().unwrap()), table, "{what}");
        }
    }

    let model = &models[1].1;
    assert!(model.release_token_tables(&kept).unwrap());
    touch_later(&single);
    let skip = model.text_encoder.default_conditioning().clip_skip;
    let err = model
        .text_encoder
        .forward(&other_ids, None, skip)
        .unwrap_err()
        .to_string();
    for part in [
        "tiny-sd.safetensors",
        "changed since the model was loaded",
        "token table",
    ] {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }

    let config = tiny_sd1_config();
    let weights =
        Weights::from_tensors(random_weights(&config, 1).unwrap(), DType::F32, dev.clone());
    let in_memory = SdModel::from_weights(&weights, config, "in memory".into()).unwrap();
    assert!(!in_memory.release_token_tables(&kept).unwrap());
    assert!(in_memory.text_encoder.token_table_loaded());
}
