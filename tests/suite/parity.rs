//! Reference parity against tests/reference/make_tiny_sd.py (diffusers, transformers).

use candle_core::{DType, Tensor, Var};
use sdti::model::{
    Injection, LoadOptions, NoiseSchedule, PredictionType, Recompute, SchedulerConfig, SdModel,
};
use sdti::train::loss::{denoising_loss, denoising_loss_with, DenoisingBatch};

use crate::common::{assert_close, expected, fixture, rel_err, test_device, tiny_model};

/// The reference prompt's ids with the two placeholder ids (49408, 49409) turned into
/// injection slots.
struct Prompt {
    ids: Tensor,
    index: Tensor,
    mask: Tensor,
}

fn reference_prompt(exp: &std::collections::HashMap<String, Tensor>) -> Prompt {
    let raw: Vec<i64> = exp["te.input_ids"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut ids = Vec::new();
    let mut index = Vec::new();
    let mut mask = Vec::new();
    for &id in &raw {
        if id >= 49408 {
            ids.push(0u32);
            index.push((id - 49408) as u32);
            mask.push(1f32);
        } else {
            ids.push(id as u32);
            index.push(0);
            mask.push(0.0);
        }
    }
    let n = raw.len();
    Prompt {
        ids: Tensor::from_vec(ids, (1, n), &test_device()).unwrap(),
        index: Tensor::from_vec(index, (1, n), &test_device()).unwrap(),
        mask: Tensor::from_vec(mask, (1, n), &test_device()).unwrap(),
    }
}

fn encode(
    model: &SdModel,
    exp: &std::collections::HashMap<String, Tensor>,
    vectors: &Tensor,
    skip: usize,
) -> Tensor {
    let p = reference_prompt(exp);
    let inj = Injection {
        table: vectors,
        index: &p.index,
        mask: &p.mask,
    };
    model
        .text_encoder
        .forward(&p.ids, Some(&inj), skip)
        .unwrap()
}

#[test]
fn text_encoder_with_injected_vectors_matches_transformers() {
    let exp = expected();
    let model = tiny_model(DType::F32);
    let states = encode(&model, &exp, &exp["te.vectors"], 1);
    assert_close(
        "last_hidden_state",
        &states,
        &exp["te.last_hidden_state"],
        1e-5,
    );
    let skip2 = encode(&model, &exp, &exp["te.vectors"], 2);
    assert_close("clip_skip 2", &skip2, &exp["te.clip_skip2"], 1e-5);
}

#[test]
fn vae_latent_distribution_matches_diffusers() {
    let exp = expected();
    let model = tiny_model(DType::F32);
    let dist = model.vae().unwrap().encode(&exp["vae.image"]).unwrap();
    assert_close("latent mean", &dist.mean, &exp["vae.latent_mean"], 1e-4);
    assert_close(
        "latent logvar",
        &dist.logvar,
        &exp["vae.latent_logvar"],
        1e-4,
    );
}

fn timesteps(t: &Tensor) -> Vec<f64> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as f64)
        .collect()
}

/// The UNet's prediction for the reference sample, timesteps and context.
fn reference_prediction(
    model: &SdModel,
    exp: &std::collections::HashMap<String, Tensor>,
) -> Tensor {
    model
        .unet
        .forward(
            &exp["unet.sample"],
            &timesteps(&exp["unet.timesteps"]),
            &exp["unet.context"],
        )
        .unwrap()
}

#[test]
fn unet_noise_prediction_matches_diffusers() {
    let exp = expected();
    let model = tiny_model(DType::F32);
    let pred = reference_prediction(&model, &exp);
    assert_close("noise prediction", &pred, &exp["unet.noise_pred"], 1e-4);
}

/// The model's noise schedule with `prediction`, which is diffusers' to the bit.
fn schedule(
    model: &SdModel,
    exp: &std::collections::HashMap<String, Tensor>,
    prediction: PredictionType,
) -> NoiseSchedule {
    let schedule = SchedulerConfig {
        prediction_type: prediction,
        ..model.config.scheduler.clone()
    }
    .noise_schedule()
    .unwrap();
    let ac: Vec<f32> = exp["ddpm.alphas_cumprod"].to_vec1().unwrap();
    assert_eq!(schedule.alphas_cumprod(), &ac[..]);
    schedule
}

fn loss_and_grad(
    model: &SdModel,
    exp: &std::collections::HashMap<String, Tensor>,
    prediction: PredictionType,
) -> (f64, Tensor) {
    loss_and_grad_with(model, exp, prediction, Recompute::Off)
}

fn loss_and_grad_with(
    model: &SdModel,
    exp: &std::collections::HashMap<String, Tensor>,
    prediction: PredictionType,
    recompute: Recompute,
) -> (f64, Tensor) {
    let p = reference_prompt(exp);
    // The learned vectors are f32 as in training (f64 for the f64 gradient checks).
    let vector_dtype = match model.text_encoder.dtype() {
        DType::F64 => DType::F64,
        _ => DType::F32,
    };
    let vectors = Var::from_tensor(&exp["te.vectors"].to_dtype(vector_dtype).unwrap()).unwrap();
    let inj = Injection {
        table: vectors.as_tensor(),
        index: &p.index,
        mask: &p.mask,
    };
    let t = exp["loss.timestep"].to_vec1::<i64>().unwrap()[0] as usize;
    let schedule = schedule(model, exp, prediction);
    let latents = exp["loss.latents"]
        .to_dtype(model.text_encoder.dtype())
        .unwrap();
    let noise = exp["loss.noise"]
        .to_dtype(model.text_encoder.dtype())
        .unwrap();
    let batch = DenoisingBatch {
        latents: &latents,
        noise: &noise,
        timesteps: &[t],
        ids: &p.ids,
        injections: &[Some(&inj)],
        time_ids: None,
        clip_skip: 1,
    };
    let loss = denoising_loss_with(model, &batch, &schedule, recompute).unwrap();
    let grads = loss.backward().unwrap();
    let grad = grads
        .get(vectors.as_tensor())
        .expect("gradient reaches the vectors")
        .clone();
    (
        loss.to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap(),
        grad,
    )
}

#[test]
fn loss_and_gradient_on_the_vectors_match_torch() {
    let exp = expected();
    let model = tiny_model(DType::F32);
    let (loss, grad) = loss_and_grad(&model, &exp, PredictionType::Epsilon);
    let want = exp["loss.value"].to_scalar::<f32>().unwrap() as f64;
    assert!(
        ((loss - want) / want).abs() <= 1e-5,
        "loss {loss} vs torch {want}"
    );
    assert_close("gradient", &grad, &exp["loss.grad"], 1e-3);

    let (loss_v, grad_v) = loss_and_grad(&model, &exp, PredictionType::VPrediction);
    let want_v = exp["loss_v.value"].to_scalar::<f32>().unwrap() as f64;
    assert!(
        ((loss_v - want_v) / want_v).abs() <= 1e-5,
        "v loss {loss_v} vs torch {want_v}"
    );
    assert_close("v gradient", &grad_v, &exp["loss_v.grad"], 1e-3);
}

/// Recomputing each block's activations in the backward pass runs the same operations
/// on the same values: the loss and the gradient are those of the saving mode, bit for
/// bit, in f32 and in f64 (whose gradient the central differences below check).
#[test]
fn recompute_gives_the_same_loss_and_gradient_bit_for_bit() {
    let exp = expected();
    for dtype in [DType::F32, DType::F64] {
        let model = tiny_model(dtype);
        for prediction in [PredictionType::Epsilon, PredictionType::VPrediction] {
            let (loss, grad) = loss_and_grad_with(&model, &exp, prediction, Recompute::Off);
            let values = |g: &Tensor| -> Vec<f64> {
                g.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            // Every block, and some transformers only (the first and the third).
            for recompute in [Recompute::On, Recompute::Transformers(0b101)] {
                let (loss_r, grad_r) = loss_and_grad_with(&model, &exp, prediction, recompute);
                assert_eq!(
                    loss.to_bits(),
                    loss_r.to_bits(),
                    "{dtype:?} {prediction:?} {recompute:?} loss"
                );
                assert_eq!(
                    values(&grad),
                    values(&grad_r),
                    "{dtype:?} {prediction:?} {recompute:?} gradient"
                );
            }
        }
    }
}

/// Central differences in f64 against the backward pass, on every coordinate of both
/// vectors: checks the custom backward of every frozen layer on the path.
#[test]
fn gradient_matches_finite_differences_in_f64() {
    let exp = expected();
    let model = tiny_model(DType::F64);
    let (_, grad) = loss_and_grad(&model, &exp, PredictionType::Epsilon);
    assert_close(
        "f64 gradient vs torch f64",
        &grad,
        &exp["loss.grad_f64"],
        1e-6,
    );

    let p = reference_prompt(&exp);
    let t = exp["loss.timestep"].to_vec1::<i64>().unwrap()[0] as usize;
    let schedule = schedule(&model, &exp, PredictionType::Epsilon);
    let latents = exp["loss.latents"].to_dtype(DType::F64).unwrap();
    let noise = exp["loss.noise"].to_dtype(DType::F64).unwrap();
    let base: Vec<f64> = exp["te.vectors"]
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let loss_at = |v: &[f64]| -> f64 {
        let table = Tensor::from_vec(v.to_vec(), (2, 32), &test_device()).unwrap();
        let inj = Injection {
            table: &table,
            index: &p.index,
            mask: &p.mask,
        };
        let batch = DenoisingBatch {
            latents: &latents,
            noise: &noise,
            timesteps: &[t],
            ids: &p.ids,
            injections: &[Some(&inj)],
            time_ids: None,
            clip_skip: 1,
        };
        denoising_loss(&model, &batch, &schedule)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let analytic: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
    let h = 1e-6;
    let mut fd = Vec::new();
    for i in 0..base.len() {
        let mut plus = base.clone();
        plus[i] += h;
        let mut minus = base.clone();
        minus[i] -= h;
        fd.push((loss_at(&plus) - loss_at(&minus)) / (2.0 * h));
    }
    let fd = Tensor::from_vec(fd, base.len(), &test_device()).unwrap();
    let analytic = Tensor::from_vec(analytic, base.len(), &test_device()).unwrap();
    let e = rel_err(&analytic, &fd);
    assert!(
        e <= 1e-6,
        "backward vs central differences: relative error {e:.3e}"
    );
}

#[test]
fn single_file_checkpoint_gives_the_same_numbers() {
    let exp = expected();
    let folder = tiny_model(DType::F32);
    // Single files carry no configuration; the tiny CLIP's 4 heads of 8 channels do not
    // follow SD 1.x's 64-channel rule, so the folder's configuration is passed along.
    let single = SdModel::load(
        &fixture("tiny-sd.safetensors"),
        &LoadOptions {
            config: Some(folder.config.clone()),
            device: test_device(),
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let states = encode(&single, &exp, &exp["te.vectors"], 1);
    assert_close(
        "single-file text encoder",
        &states,
        &exp["te.last_hidden_state"],
        1e-5,
    );
    let dist = single.vae().unwrap().encode(&exp["vae.image"]).unwrap();
    assert_close("single-file VAE", &dist.mean, &exp["vae.latent_mean"], 1e-4);
    let pred = single
        .unet
        .forward(
            &exp["unet.sample"],
            &timesteps(&exp["unet.timesteps"]),
            &exp["unet.context"],
        )
        .unwrap();
    assert_close("single-file UNet", &pred, &exp["unet.noise_pred"], 1e-4);
}

/// The host-facing encoder: a registered word in a prompt gives transformers' states.
#[test]
fn prompt_encoder_injects_registered_words() {
    let exp = expected();
    let model = std::sync::Arc::new(tiny_model(DType::F32));
    let mut enc = sdti::prompt::encoder::PromptEncoder::new(model.text_encoder.clone()).unwrap();
    let vectors: Vec<f32> = exp["te.vectors"].flatten_all().unwrap().to_vec1().unwrap();
    enc.register("sks", &vectors).unwrap();
    let want = exp["te.last_hidden_state"].squeeze(0).unwrap();
    for prompt in [
        "a photo of a sks toy",
        "a photo of a embedding:sks toy",
        "a photo of a <sks> toy",
    ] {
        let states = enc.encode(prompt).unwrap();
        assert_close(prompt, &states, &want, 1e-5);
    }
    let slots = enc.tokenize("a photo of a sks toy");
    assert_eq!(slots.len(), 77);
    assert_eq!(slots[5].learned, Some((0, 0)));
    assert_eq!(slots[6].learned, Some((0, 1)));
    // A prompt past 75 tokens is two chunks.
    let long = vec!["sks"; 40].join(" ");
    assert_eq!(enc.encode(&long).unwrap().dims(), &[154, 32]);
    // Bad vectors are refused with a reason.
    let err = enc
        .register("bad", &[f32::NAN; 32])
        .unwrap_err()
        .to_string();
    assert!(err.contains("NaN"), "{err}");
    let err = enc.register("bad", &[0.0; 31]).unwrap_err().to_string();
    assert!(err.contains("width 32"), "{err}");
}

/// Latent sides that are not multiples of 8 (images that are multiples of 8 but not of
/// 64): downsamplers round up and the up path meets the skips at their sizes.
#[test]
fn unet_handles_latents_that_are_not_multiples_of_8() {
    let exp = expected();
    let model = tiny_model(DType::F32);
    let pred = model
        .unet
        .forward(&exp["unet.sample_odd"], &[300.0], &exp["unet.context_odd"])
        .unwrap();
    assert_close(
        "20x28 noise prediction",
        &pred,
        &exp["unet.noise_pred_odd"],
        1e-4,
    );
}

/// The backward pass through odd-sized levels (9x9 latents: 9 -> 5 -> 3 -> 2 and back)
/// agrees with central differences.
#[test]
fn gradient_through_odd_latent_sizes_matches_finite_differences() {
    let exp = expected();
    let model = tiny_model(DType::F64);
    let p = reference_prompt(&exp);
    let latents = (Tensor::arange(0f64, 324.0, &test_device())
        .unwrap()
        .reshape((1, 4, 9, 9))
        .unwrap()
        * 0.013)
        .unwrap()
        .sin()
        .unwrap();
    let noise = (Tensor::arange(0f64, 324.0, &test_device())
        .unwrap()
        .reshape((1, 4, 9, 9))
        .unwrap()
        * 0.71)
        .unwrap()
        .cos()
        .unwrap();
    let base = exp["te.vectors"].to_dtype(DType::F64).unwrap();
    let schedule = schedule(&model, &exp, PredictionType::Epsilon);
    let loss_of = |table: &Tensor, recompute: Recompute| -> Tensor {
        let inj = Injection {
            table,
            index: &p.index,
            mask: &p.mask,
        };
        let batch = DenoisingBatch {
            latents: &latents,
            noise: &noise,
            timesteps: &[400],
            ids: &p.ids,
            injections: &[Some(&inj)],
            time_ids: None,
            clip_skip: 1,
        };
        denoising_loss_with(&model, &batch, &schedule, recompute).unwrap()
    };
    let grad_of = |recompute: Recompute| -> Vec<f64> {
        let var = Var::from_tensor(&base).unwrap();
        let grad = loss_of(var.as_tensor(), recompute)
            .backward()
            .unwrap()
            .get(var.as_tensor())
            .unwrap()
            .clone();
        grad.flatten_all().unwrap().to_vec1().unwrap()
    };
    let grad = grad_of(Recompute::Off);
    for recompute in [Recompute::On, Recompute::Transformers(0b10)] {
        assert_eq!(
            grad,
            grad_of(recompute),
            "{recompute:?} changes the gradient"
        );
    }
    let flat: Vec<f64> = base.flatten_all().unwrap().to_vec1().unwrap();
    let h = 1e-6;
    for i in [0usize, 17, 40, 63] {
        let mut plus = flat.clone();
        plus[i] += h;
        let mut minus = flat.clone();
        minus[i] -= h;
        let at = |v: Vec<f64>| {
            loss_of(
                &Tensor::from_vec(v, (2, 32), &test_device()).unwrap(),
                Recompute::Off,
            )
            .to_scalar::<f64>()
            .unwrap()
        };
        let fd = (at(plus) - at(minus)) / (2.0 * h);
        assert!(
            (fd - grad[i]).abs() <= 1e-6 * grad[i].abs().max(1e-3),
            "coordinate {i}: backward {} vs {fd}",
            grad[i]
        );
    }
}

/// Mixed precision: the UNet in f16 or bf16 (the text encoder, the vectors and the loss
/// in f32) against the f32 reference. The tolerance is torch's own error for the same
/// placement (tests/reference/make_half_precision.py) times 2, and for the loss at least
/// one f16 ulp (2^-11): on an H200 sdti's f16 loss was 1.4e-4 off against torch's 6.7e-5
/// (on the CPU 9.9e-5), both rounding of a loss near 1. On this tiny random model the
/// vectors' gradient is a small signal that half precision moves by several percent in
/// f16 and by more than its size in bf16, in torch as in sdti; the inversion tests in
/// learning.rs show that training still works in both.
#[test]
fn half_precision_models_stay_within_torchs_own_error() {
    let exp = expected();
    let half = candle_core::safetensors::load(fixture("tiny-sd-half.safetensors"), &test_device())
        .expect("fixture tiny-sd-half.safetensors");
    let scalar = |k: &str| {
        half[k]
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let want_loss = exp["loss.value"].to_scalar::<f32>().unwrap() as f64;
    let mut cases = vec![(DType::F16, "f16")];
    // candle's CPU matrix products have no bf16.
    if !test_device().is_cpu() {
        cases.push((DType::BF16, "bf16"));
    }
    // Every case is measured and printed before any is judged.
    let mut failures = Vec::new();
    for (dtype, name) in cases {
        let model = tiny_model(dtype);
        let states = encode(&model, &exp, &exp["te.vectors"], 1);
        assert_eq!(states.dtype(), DType::F32, "the text encoder stays f32");
        assert_close(
            "f32 text encoder",
            &states,
            &exp["te.last_hidden_state"],
            1e-5,
        );
        let pred = reference_prediction(&model, &exp);
        assert_eq!(pred.dtype(), dtype);
        let unet = rel_err(&pred, &exp["unet.noise_pred"]);
        let (loss, grad) = loss_and_grad(&model, &exp, PredictionType::Epsilon);
        assert_eq!(grad.dtype(), DType::F32, "the vectors' gradient is f32");
        let loss_err = ((loss - want_loss) / want_loss).abs();
        let grad_err = rel_err(&grad, &exp["loss.grad"]);
        let torch_unet = scalar(&format!("half.{name}.unet_err"));
        let torch_loss = ((scalar(&format!("half.{name}.loss")) - want_loss) / want_loss).abs();
        let torch_grad = scalar(&format!("half.{name}.grad_err"));
        eprintln!(
            "{name}: unet {unet:.2e} (torch {torch_unet:.2e}), loss {loss_err:.2e} (torch {torch_loss:.2e}), \
             gradient {grad_err:.2e} (torch {torch_grad:.2e})"
        );
        let finite = grad
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| v.is_finite());
        let f16_ulp = 2f64.powi(-11);
        for (ok, what) in [
            (finite, "gradient finite".to_string()),
            (
                unet <= 2.0 * torch_unet,
                format!("UNet {unet:.3e} <= 2 x {torch_unet:.3e}"),
            ),
            (
                loss_err <= (2.0 * torch_loss).max(f16_ulp),
                format!("loss {loss_err:.3e} <= max(2 x {torch_loss:.3e}, {f16_ulp:.3e})"),
            ),
            (
                grad_err <= 2.0 * torch_grad,
                format!("gradient {grad_err:.3e} <= 2 x {torch_grad:.3e}"),
            ),
        ] {
            if !ok {
                failures.push(format!("{name}: {what}"));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}
