//! SD 2.x: OpenCLIP ViT-H conditioning, the SD 2.x UNet, training, against the
//! reference fixtures of tests/reference/make_tiny_sd2.py.
//!
//! The text encoder conditions on the penultimate of its 24 blocks plus the final layer
//! norm, with 0 after the first end token of each chunk. The diffusers folder holds 23
//! blocks (block 24 dropped by the conversion), the single file all 24.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Tensor, Var};
use sdti::embedding::{Encoder, Family, Format};
use sdti::model::clip::Conditioning;
use sdti::model::{LoadOptions, NoiseSchedule, PredictionType, SdModel, TextEncoder};
use sdti::prompt::chunks::ChunkStyle;
use sdti::prompt::encoder::PromptEncoder;
use sdti::tokenizer::ClipTokenizer;
use sdti::train::loss::{denoising_loss, DenoisingBatch};

use crate::common::train::{export_and_read, random_latents, train_config, train_finite};
use crate::common::{
    assert_close, assert_rel, central_differences, checked_schedule, clip_config, fixture,
    fixture_model, load_options, reference, rel_err, scalar, test_device, text_encoder_from_files,
    tiny_model, ReferencePrompt,
};

fn expected() -> HashMap<String, Tensor> {
    reference("tiny-sd2-expected.safetensors")
}

/// The folder's 23-layer text encoder, built from its files as a folder loader builds it:
/// the config says 23 layers, and the encoder knows it lacks the original's block 24.
fn folder_encoder(dtype: DType) -> TextEncoder {
    let dir = fixture("tiny-sd2/text_encoder");
    let mut config = clip_config(&dir);
    assert_eq!(config.num_hidden_layers, 23);
    config.dropped_final_layers = 1;
    text_encoder_from_files(&dir, &config, Family::Sd2, Encoder::Single, dtype)
}

fn ids_of(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

#[test]
fn sd2_text_states_match_transformers() {
    let exp = expected();
    let te = folder_encoder(DType::F32);
    assert_eq!(te.full_depth(), 24);
    let cond = te.conditioning(None).unwrap();
    assert_eq!(
        (cond.clip_skip, cond.final_norm, cond.pad_after_eos),
        (2, true, Some(0))
    );
    let prompt = ReferencePrompt::new(&exp["te.input_ids"]);
    let ids = &prompt.ids;
    let inj = prompt.inject(&exp["te.vectors"]);
    let states = te.encode(ids, Some(&inj), 2).unwrap();
    assert_close(
        "penultimate + LN, pad 0",
        &states,
        &exp["te.last_hidden_state"],
        1e-5,
    );
    // The same ids padded with the end token (the shared prompt layout): the encoder
    // rewrites them itself.
    let eos_ids = ReferencePrompt::new(&exp["te.input_ids_eos_pad"]).ids;
    let from_eos = te.encode(&eos_ids, Some(&inj), 2).unwrap();
    assert_eq!(rel_err(&from_eos, &states), 0.0);
    // Kept as given, the end-token padding is what the reference shows is different.
    let eos_kept = Conditioning {
        pad_after_eos: None,
        ..cond
    };
    let (kept, _) = te
        .encode_with_pooled(&eos_ids, Some(&inj), &eos_kept)
        .unwrap();
    assert_close(
        "end-token padding (the SD 1.x rule)",
        &kept,
        &exp["te.eos_pad_last_hidden_state"],
        1e-5,
    );
    assert!(rel_err(&kept, &states) > 1e-2);
    // clip skip 3 = hidden_states[-3] of the 24 blocks = the folder's penultimate.
    let skip3 = te.encode(ids, Some(&inj), 3).unwrap();
    assert_close("clip skip 3", &skip3, &exp["te.clip_skip3"], 1e-5);
    // Without learned vectors.
    let raw = ReferencePrompt::new(&exp["te.input_ids_raw"]).ids;
    let plain = te.encode(&raw, None, 2).unwrap();
    assert_close(
        "plain prompt",
        &plain,
        &exp["te.plain_last_hidden_state"],
        1e-5,
    );
    // Block 24 is not in the folder.
    let err = te.encode(ids, None, 1).unwrap_err().to_string();
    assert!(err.contains("lacks block 24"), "{err}");
}

/// Prompts through the shared layout (EOS padding) and the encoder's pad rule, in both
/// chunk styles: the reference ids and states, learned slots staying learned.
#[test]
fn sd2_pad_zero_after_first_eos() {
    let exp = expected();
    let te = Arc::new(folder_encoder(DType::F32));
    let vectors: Vec<f32> = exp["te.vectors"].flatten_all().unwrap().to_vec1().unwrap();
    let long_prompt = "a photo of a sks toy red green blue cat dog tree house car sky sun red green blue cat dog tree house car sky sun red green blue cat dog tree house car sky sun red green blue cat dog tree house car sky sun red green blue cat dog tree house car sky sun red green blue cat dog tree house car sky sun red green blue cat dog tree house car sky sun red green blue sks cat dog tree house car sky sun red";
    for style in [ChunkStyle::A1111, ChunkStyle::ComfyUi] {
        let mut enc = PromptEncoder::new(te.clone()).unwrap();
        enc.set_chunk_style(style);
        enc.register("sks", &vectors).unwrap();
        assert_eq!(enc.clip_skip(), 2);
        // Short prompt: ids (learned slots 5, 6; 0 after the end token at 8) and states.
        let slots = enc.tokenize("a photo of a sks toy");
        let want = ids_of(&exp["te.input_ids"]);
        assert_eq!(slots.len(), 77);
        for (i, (slot, &want)) in slots.iter().zip(&want).enumerate() {
            if want >= 49408 {
                assert_eq!(slot.learned, Some((0, (want - 49408) as usize)), "slot {i}");
            } else {
                assert_eq!(
                    (slot.id, slot.learned),
                    (want, None),
                    "slot {i} ({style:?})"
                );
            }
        }
        let states = enc.encode("a photo of a sks toy").unwrap();
        assert_close(
            "short prompt",
            &states.unsqueeze(0).unwrap(),
            &exp["te.last_hidden_state"],
            1e-5,
        );
        // Two chunks, each padded with 0 after its own end token.
        let slots = enc.tokenize(long_prompt);
        let want = ids_of(&exp["te.long_input_ids"]);
        assert_eq!(slots.len(), want.len());
        for (i, (slot, &want)) in slots.iter().zip(&want).enumerate() {
            if want >= 49408 {
                assert!(slot.learned.is_some(), "slot {i} ({style:?})");
            } else {
                assert_eq!(slot.id, want, "slot {i} ({style:?})");
            }
        }
        let states = enc.encode(long_prompt).unwrap();
        assert_close(
            "long prompt",
            &states.unsqueeze(0).unwrap(),
            &exp["te.long_last_hidden_state"],
            1e-5,
        );
        // The empty prompt: [BOS, EOS, 0 x 75].
        let states = enc.encode("").unwrap();
        assert_close(
            "empty prompt",
            &states.unsqueeze(0).unwrap(),
            &exp["te.empty_last_hidden_state"],
            1e-5,
        );
    }
}

/// A literal `!` is BPE (256, `!!` 748), as open_clip, A1111 and ComfyUI tokenise it, not
/// the pad id 0 HF's tokenizer of an SD 2.x folder makes of it.
#[test]
fn sd2_bang_is_bpe_not_pad() {
    let exp = expected();
    let tok = ClipTokenizer::new().unwrap();
    let prompt_text = "a cat! a dog!! wow";
    let ids = tok.encode(prompt_text);
    let want = ids_of(&exp["te.bang_input_ids"]);
    assert_eq!(ids, want[1..=ids.len()].to_vec());
    assert!(ids.contains(&256) && ids.contains(&748));
    let te = Arc::new(folder_encoder(DType::F32));
    let enc = PromptEncoder::new(te).unwrap();
    let slots: Vec<u32> = enc.tokenize(prompt_text).iter().map(|s| s.id).collect();
    assert_eq!(slots, want);
    let states = enc.encode(prompt_text).unwrap();
    assert_close(
        "'!' prompt",
        &states.unsqueeze(0).unwrap(),
        &exp["te.bang_last_hidden_state"],
        1e-5,
    );
}

/// The tiny SD 2.x diffusers folder, loaded as users load models.
fn sd2_model(dtype: DType) -> SdModel {
    fixture_model("tiny-sd2", dtype)
}

/// Loaded as a model (and as a text encoder alone), the folder's encoder is the SD 2.x one:
/// 24 blocks deep, penultimate + LN, the reference states.
#[test]
fn sd2_folder_loads_with_its_conditioning() {
    let exp = expected();
    let model = sd2_model(DType::F32);
    assert_eq!(model.config.family, Family::Sd2);
    let alone = TextEncoder::load(&fixture("tiny-sd2"), &load_options(DType::F32)).unwrap();
    let prompt = ReferencePrompt::new(&exp["te.input_ids"]);
    let inj = prompt.inject(&exp["te.vectors"]);
    for te in [model.text_encoder.as_ref(), &alone] {
        assert_eq!((te.family(), te.full_depth()), (Family::Sd2, 24));
        assert_eq!(te.default_conditioning().clip_skip, 2);
        let clip_skip = te.default_conditioning().clip_skip;
        let states = te.encode(&prompt.ids, Some(&inj), clip_skip).unwrap();
        assert_close("SD 2.x states", &states, &exp["te.last_hidden_state"], 1e-5);
    }
}

fn timesteps(t: &Tensor) -> Vec<f64> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as f64)
        .collect()
}

/// Linear projections in and out of the transformers, 2/2/4/4 heads of 16 channels.
#[test]
fn sd2_unet_matches_diffusers() {
    let exp = expected();
    let model = sd2_model(DType::F32);
    let pred = model
        .unet
        .forward(
            &exp["unet.sample"],
            &timesteps(&exp["unet.timesteps"]),
            &exp["unet.context"],
        )
        .unwrap();
    assert_close(
        "SD 2.x noise prediction",
        &pred,
        &exp["unet.noise_pred"],
        1e-4,
    );
    let odd = model
        .unet
        .forward(&exp["unet.sample_odd"], &[300.0], &exp["unet.context_odd"])
        .unwrap();
    assert_close(
        "SD 2.x noise prediction (20x28)",
        &odd,
        &exp["unet.noise_pred_odd"],
        1e-4,
    );
}

/// The model's schedule with prediction type `p`, its `alphas_cumprod` torch's exactly.
fn schedule(model: &SdModel, exp: &HashMap<String, Tensor>, p: PredictionType) -> NoiseSchedule {
    let config = model.config.scheduler.with_overrides(Some(p), None);
    checked_schedule(&config, &exp["ddpm.alphas_cumprod"], 0.0)
}

/// The denoising loss with `vectors` as the learned word (the model's dtype).
fn loss_with(
    model: &SdModel,
    exp: &HashMap<String, Tensor>,
    prediction: PredictionType,
    vectors: &Tensor,
) -> Tensor {
    let prompt = ReferencePrompt::new(&exp["te.input_ids"]);
    let inj = prompt.inject(vectors);
    let dtype = model.text_encoder.dtype();
    let latents = exp["loss.latents"].to_dtype(dtype).unwrap();
    let noise = exp["loss.noise"].to_dtype(dtype).unwrap();
    let t = exp["loss.timestep"].to_vec1::<i64>().unwrap()[0] as usize;
    let batch = DenoisingBatch {
        latents: &latents,
        noise: &noise,
        timesteps: &[t],
        ids: &prompt.ids,
        injections: &[Some(&inj)],
        time_ids: None,
        clip_skip: model.text_encoder.default_conditioning().clip_skip,
    };
    denoising_loss(model, &batch, &schedule(model, exp, prediction)).unwrap()
}

fn loss_and_grad(
    model: &SdModel,
    exp: &HashMap<String, Tensor>,
    prediction: PredictionType,
) -> (f64, Tensor) {
    let dtype = match model.text_encoder.dtype() {
        DType::F64 => DType::F64,
        _ => DType::F32,
    };
    let vectors = Var::from_tensor(&exp["te.vectors"].to_dtype(dtype).unwrap()).unwrap();
    let loss = loss_with(model, exp, prediction, vectors.as_tensor());
    let grads = loss.backward().unwrap();
    let grad = grads
        .get(vectors.as_tensor())
        .expect("gradient reaches the vectors")
        .clone();
    (scalar(&loss), grad)
}

#[test]
fn sd2_loss_and_grad_eps_and_v() {
    let exp = expected();
    let model = sd2_model(DType::F32);
    for (prediction, key) in [
        (PredictionType::Epsilon, "loss"),
        (PredictionType::VPrediction, "loss_v"),
    ] {
        let (loss, grad) = loss_and_grad(&model, &exp, prediction);
        let want = exp[&format!("{key}.value")].to_scalar::<f32>().unwrap() as f64;
        assert_rel(&format!("{key}: loss"), loss, want, 1e-5);
        assert_close(
            &format!("{key} gradient"),
            &grad,
            &exp[&format!("{key}.grad")],
            1e-3,
        );
    }
}

/// In f64: the loss and gradient against torch's f64 run, and the backward pass against
/// central differences on every coordinate of both vectors (epsilon and v).
#[test]
fn sd2_grad_fd_f64() {
    let exp = expected();
    let model = sd2_model(DType::F64);
    for (prediction, key) in [
        (PredictionType::Epsilon, "loss"),
        (PredictionType::VPrediction, "loss_v"),
    ] {
        let (loss, grad) = loss_and_grad(&model, &exp, prediction);
        let want = exp[&format!("{key}.value_f64")].to_scalar::<f64>().unwrap();
        // diffusers keeps the sinusoids and alphas_cumprod in f32 even in f64 runs:
        // the f64 runs share those constants, so they agree far below f32 rounding.
        assert_rel(&format!("{key} f64: loss"), loss, want, 1e-6);
        assert_close(
            &format!("{key} f64 gradient vs torch f64"),
            &grad,
            &exp[&format!("{key}.grad_f64")],
            1e-6,
        );
        let base: Vec<f64> = exp["te.vectors"]
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let loss_at = |v: &[f64]| -> f64 {
            let table = Tensor::from_vec(v.to_vec(), (2, 32), &test_device()).unwrap();
            loss_with(&model, &exp, prediction, &table)
                .to_scalar::<f64>()
                .unwrap()
        };
        // h = 1e-5: for a loss of order 1 in f64 it balances the central difference's
        // truncation error (h^2) against its rounding error (1e-16 / h); at 1e-6 the
        // rounding alone is 1e-10 per coordinate, about 1e-6 of the gradient's norm.
        let h = 1e-5;
        let every: Vec<usize> = (0..base.len()).collect();
        let fd = central_differences(&base, &every, h, loss_at);
        let analytic = grad.flatten_all().unwrap();
        let e = rel_err(&analytic, &fd);
        eprintln!("{key}: backward vs central differences: {e:.3e}");
        assert!(
            e <= 1e-6,
            "{key}: backward vs central differences: relative error {e:.3e}"
        );
    }
}

/// The single file's OpenCLIP tower has all 24 blocks: clip skip 1 is its last block +
/// LN (ComfyUI's CLIPSetLastLayer(-1)), 2 (the default) the folder's states, and its
/// transposed `text_projection` gives the reference pooled vector. The UNet is the
/// folder's.
#[test]
fn sd2_single_file_has_all_24_blocks() {
    let exp = expected();
    let folder = sd2_model(DType::F32);
    // Single files carry no configuration and the tiny widths do not follow the real
    // models' 64-channel heads, so the folder's is passed, with the 24-block tower.
    let mut config = folder.config.clone();
    config.text_encoder.num_hidden_layers = 24;
    config.text_encoder.dropped_final_layers = 0;
    config.text_encoder.projection_dim = Some(32);
    let single = SdModel::load(
        &fixture("tiny-sd2.safetensors"),
        &LoadOptions {
            config: Some(config),
            ..load_options(DType::F32)
        },
    )
    .expect("tiny SD 2.x single file loads");
    let te = &single.text_encoder;
    assert_eq!(
        (
            te.family(),
            te.full_depth(),
            te.default_conditioning().clip_skip
        ),
        (Family::Sd2, 24, 2)
    );
    let prompt = ReferencePrompt::new(&exp["te.input_ids"]);
    let ids = &prompt.ids;
    let inj = prompt.inject(&exp["te.vectors"]);
    let last = te.encode(ids, Some(&inj), 1).unwrap();
    assert_close("block 24 + LN", &last, &exp["te.last24_hidden_state"], 1e-5);
    let penultimate = te.encode(ids, Some(&inj), 2).unwrap();
    assert_close(
        "block 23 + LN",
        &penultimate,
        &exp["te.last_hidden_state"],
        1e-5,
    );
    let from_folder = folder.text_encoder.encode(ids, Some(&inj), 2).unwrap();
    assert_close("single file vs folder", &penultimate, &from_folder, 1e-6);
    let skip3 = te.encode(ids, Some(&inj), 3).unwrap();
    assert_close("clip skip 3", &skip3, &exp["te.clip_skip3"], 1e-5);
    let pooled_cond = Conditioning {
        pooled: true,
        ..te.conditioning(Some(1)).unwrap()
    };
    let (_, pooled) = te
        .encode_with_pooled(ids, Some(&inj), &pooled_cond)
        .unwrap();
    assert_close(
        "pooled through the transposed text_projection",
        &pooled.expect("a pooled vector"),
        &exp["te.pooled24"],
        1e-5,
    );
    let t = timesteps(&exp["unet.timesteps"]);
    let a = single
        .unet
        .forward(&exp["unet.sample"], &t, &exp["unet.context"])
        .unwrap();
    let b = folder
        .unet
        .forward(&exp["unet.sample"], &t, &exp["unet.context"])
        .unwrap();
    assert_close("single-file UNet vs folder", &a, &b, 1e-5);
}

/// A short SD 2.x run through the trainer (epsilon and the v-prediction override): the
/// family's clip skip (2) is what it trains and records, the loss stays finite, and the
/// word is written at the encoder's width and read back. An explicit clip skip wins and
/// is checked against what the folder holds.
#[test]
fn sd2_training_smoke() {
    use sdti::model::LatentDist;
    use sdti::train::{TrainConfig, Trainer};

    let exp = expected();
    let model = Arc::new(sd2_model(DType::F32));
    let dist = model.vae().unwrap().encode(&exp["vae.image"]).unwrap();
    let width = model.text_encoder.config().hidden_size;
    for prediction in [None, Some(PredictionType::VPrediction)] {
        let config = TrainConfig {
            resolution: Some(128),
            batch_size: 1,
            prediction_type: prediction,
            ..train_config(3, 3)
        };
        assert_eq!(config.clip_skip, None);
        let mut trainer = Trainer::new(model.clone(), config.clone()).unwrap();
        assert_eq!(trainer.config().clip_skip, Some(2));
        let flipped = LatentDist {
            mean: dist.mean.flip(&[3]).unwrap(),
            logvar: dist.logvar.flip(&[3]).unwrap(),
        };
        trainer
            .add_latents(vec![dist.clone(), flipped], None)
            .unwrap();
        let before = trainer.vectors().unwrap();
        train_finite(&mut trainer, 3);
        assert_ne!(trainer.vectors().unwrap(), before);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sks.safetensors");
        let back = export_and_read(&trainer, &path, Format::A1111Safetensors);
        assert_eq!(back.parts.len(), 1);
        assert_eq!((back.parts[0].vectors, back.parts[0].dim), (2, width));
        assert_eq!(back.parts[0].data, trainer.vectors().unwrap());

        let explicit = |n| {
            Trainer::new(
                model.clone(),
                TrainConfig {
                    clip_skip: Some(n),
                    ..config.clone()
                },
            )
        };
        assert_eq!(explicit(3).unwrap().config().clip_skip, Some(3));
        let err = explicit(1).err().expect("clip skip 1 refused").to_string();
        assert!(err.contains("lacks block 24"), "{err}");
        let err = explicit(25)
            .err()
            .expect("clip skip 25 refused")
            .to_string();
        assert!(
            err.contains("more than this text encoder's 24 layers"),
            "{err}"
        );
    }
}

/// At SD 2.x's real text width (a random model with OpenCLIP ViT-H's 1024-wide encoder and
/// a tiny UNet): the trained word is 1024 wide, read back as an SD 2.x embedding, usable in
/// the model's prompts and refused by an SD 1.x model with the reason.
#[test]
fn sd2_words_are_1024_wide() {
    use sdti::model::random::{random_model, tiny_sd2_config};
    use sdti::train::{Init, Templates, TrainConfig, Trainer};

    let mut config = tiny_sd2_config();
    config.text_encoder.hidden_size = 1024;
    config.text_encoder.num_attention_heads = 16;
    config.text_encoder.intermediate_size = 256;
    config.unet.cross_attention_dim = 1024;
    let model = Arc::new(random_model(&config, 7, DType::F32, &test_device()).unwrap());
    let mut trainer = Trainer::new(
        model.clone(),
        TrainConfig {
            token: "wide".into(),
            init: Init::Text("a toy".into()),
            vectors: 2,
            resolution: Some(64),
            max_steps: 2,
            seed: 1,
            templates: Templates::Object,
            ..TrainConfig::default()
        },
    )
    .unwrap();
    assert_eq!(trainer.config().clip_skip, Some(2));
    trainer.add_latents(vec![random_latents()], None).unwrap();
    train_finite(&mut trainer, 2);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wide.safetensors");
    let emb = export_and_read(&trainer, &path, Format::A1111Safetensors);
    assert_eq!((emb.parts[0].vectors, emb.parts[0].dim), (2, 1024));
    assert_eq!(Family::of(&emb), Some(Family::Sd2));

    let mut enc = PromptEncoder::new(model.text_encoder.clone()).unwrap();
    assert_eq!(enc.register_file(None, &path).unwrap(), "wide");
    assert_eq!(enc.encode("a photo of wide").unwrap().dims(), &[77, 1024]);
    let sd1 = tiny_model(DType::F32);
    let mut sd1_enc = PromptEncoder::new(sd1.text_encoder.clone()).unwrap();
    let err = sd1_enc.register_file(None, &path).unwrap_err().to_string();
    assert!(err.contains("an SD 2.x embedding"), "{err}");
}
