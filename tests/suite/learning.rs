//! It learns: on the tiny model, training lowers the denoising loss against the init
//! word, and recovers a known vector from latents drawn with it.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use sdti::model::{Injection, LatentDist, SdModel};
use sdti::prompt::{encode_prompts, Word};
use sdti::sample::ddim_sample;
use sdti::tokenizer::{ChunkStyle, ClipTokenizer};
use sdti::train::loss::{denoising_loss, DenoisingBatch, Prediction};
use sdti::train::rng::Rng;
use sdti::train::schedule::{DdpmConfig, NoiseSchedule};
use sdti::train::{Init, Templates, TrainConfig, Trainer};

use crate::common::tiny_model;

const PROMPT: &str = "a photo of a sks";

fn word(n: usize) -> [Word; 1] {
    [Word {
        name: "sks".into(),
        vectors: n,
        offset: 0,
    }]
}

/// Mean denoising loss of `vectors` on `latents` (scaled) over a fixed set of noises and
/// timesteps, the same for every call.
fn eval_loss(model: &SdModel, latents: &[Tensor], vectors: &Tensor) -> f64 {
    let tok = ClipTokenizer::new().unwrap();
    let n = vectors.dim(0).unwrap();
    let enc = encode_prompts(
        &tok,
        &[PROMPT.to_string()],
        &word(n),
        ChunkStyle::A1111,
        &Device::Cpu,
    )
    .unwrap();
    let inj = Injection {
        table: vectors,
        index: &enc.index,
        mask: &enc.mask,
    };
    let schedule = NoiseSchedule::new(&DdpmConfig::stable_diffusion()).unwrap();
    let mut rng = Rng::new(1234);
    let mut total = 0.0;
    let mut count = 0;
    for lat in latents {
        for _ in 0..8 {
            let t = schedule.random_timestep(&mut rng);
            let mut noise = vec![0f32; lat.elem_count()];
            rng.fill_normal(&mut noise);
            let noise = Tensor::from_vec(noise, lat.dims(), &Device::Cpu).unwrap();
            let batch = DenoisingBatch {
                latents: lat,
                noise: &noise,
                timesteps: &[t],
                alphas_cumprod: &[schedule.alphas_cumprod()[t]],
                ids: &enc.ids,
                injection: Some(&inj),
                clip_skip: 1,
            };
            total += denoising_loss(model, &batch, Prediction::Epsilon)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            count += 1;
        }
    }
    total / count as f64
}

/// Latents drawn by the model itself under `PROMPT` with `target` as the word.
fn latents_made_with(model: &SdModel, target: &Tensor, count: usize) -> Vec<Tensor> {
    let tok = ClipTokenizer::new().unwrap();
    let enc = encode_prompts(
        &tok,
        &[PROMPT.to_string()],
        &word(target.dim(0).unwrap()),
        ChunkStyle::A1111,
        &Device::Cpu,
    )
    .unwrap();
    let inj = Injection {
        table: target,
        index: &enc.index,
        mask: &enc.mask,
    };
    let cond = model.text_encoder.forward(&enc.ids, Some(&inj), 1).unwrap();
    let mut rng = Rng::new(99);
    (0..count)
        .map(|_| {
            let mut noise = vec![0f32; 4 * 8 * 8];
            rng.fill_normal(&mut noise);
            let noise = Tensor::from_vec(noise, (1, 4, 8, 8), &Device::Cpu).unwrap();
            ddim_sample(model, &noise, &cond, None, 20).unwrap()
        })
        .collect()
}

fn cosine(a: &Tensor, b: &Tensor) -> f64 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    let dot: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (*x as f64) * (*y as f64))
        .sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn token_vector(model: &SdModel, text: &str) -> Tensor {
    let tok = ClipTokenizer::new().unwrap();
    let id = tok.encode(text)[0];
    model
        .text_encoder
        .token_table()
        .narrow(0, id as usize, 1)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

fn trainer_on(model: &Arc<SdModel>, latents: &[Tensor], steps: u64, lr: &str) -> Trainer {
    let cfg = TrainConfig {
        token: "sks".into(),
        init: Init::Text("cat".into()),
        vectors: 1,
        resolution: 64,
        max_steps: steps,
        batch_size: 2,
        learning_rate: lr.into(),
        weight_decay: 0.0,
        flip_probability: 0.0,
        seed: 5,
        templates: Templates::List(vec!["a photo of a [name]".into()]),
        ..TrainConfig::default()
    };
    let mut t = Trainer::new(model.clone(), cfg).unwrap();
    for lat in latents {
        // Unscaled latents with a negligible variance: the sample is the latent itself.
        let unscaled = (lat / model.config.vae.scaling_factor).unwrap();
        let dist = LatentDist {
            logvar: (unscaled.zeros_like().unwrap() - 30.0).unwrap(),
            mean: unscaled,
        };
        t.add_latents(vec![dist], None).unwrap();
    }
    t
}

#[test]
fn training_lowers_the_loss_and_recovers_a_known_vector() {
    let model = Arc::new(tiny_model(DType::F32));
    let target = token_vector(&model, "dog");
    let init = token_vector(&model, "cat");
    let latents: Vec<Tensor> = latents_made_with(&model, &target, 6)
        .into_iter()
        .map(|l| (l * model.config.vae.scaling_factor).unwrap())
        .collect();
    let mut trainer = trainer_on(&model, &latents, 150, "0.01");
    let before_loss = eval_loss(&model, &latents, &init);
    let before_cos = cosine(&init, &target);
    trainer.train(150, |_| true).unwrap();
    let learned = trainer.vectors_tensor().clone();
    let after_loss = eval_loss(&model, &latents, &learned);
    let after_cos = cosine(&learned, &target);
    let target_loss = eval_loss(&model, &latents, &target);
    eprintln!("loss: init {before_loss:.5} learned {after_loss:.5} target {target_loss:.5}; cosine to target: init {before_cos:.4} learned {after_cos:.4}");
    // Measured (seed 5, 150 steps, lr 0.01): loss 1.13321 -> 1.13313, cosine -0.253 -> 0.067.
    // The tiny random UNet barely depends on its conditioning, so the loss moves little
    // but deterministically; the vector's direction is the clear signal. Thresholds: the
    // loss must drop, the cosine must rise by at least 0.2 (measured 0.32).
    assert!(
        after_loss < before_loss,
        "loss {after_loss} did not drop below {before_loss}"
    );
    assert!(
        after_cos > before_cos + 0.2,
        "cosine to the target rose only from {before_cos:.4} to {after_cos:.4}"
    );
}
