//! It learns: on the tiny model, training lowers the denoising loss against the init
//! word, and recovers a known vector from latents drawn with it.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use sdti::model::weights::Weights;
use sdti::model::{Injection, NoiseSchedule, SchedulerConfig, SdModel};
use sdti::prompt::chunks::ChunkStyle;
use sdti::prompt::{encode_prompts, EncodedPrompts, Word};
use sdti::rng::Rng;
use sdti::sample::ddim_sample;
use sdti::tokenizer::ClipTokenizer;
use sdti::train::loss::{denoising_loss, DenoisingBatch};
use sdti::train::{Init, Templates, TrainConfig, Trainer};

use crate::common::train::sharp_latents;
use crate::common::{fixture, test_device};

const PROMPT: &str = "a photo of a sks";
const GAIN: f64 = 20.0;
const STEPS: usize = 60;
const LR: f64 = 0.01;
const COS_RISE: f64 = 0.5;

fn word(n: usize) -> [Word; 1] {
    [Word {
        name: "sks".into(),
        vectors: n,
        offset: 0,
    }]
}

/// `PROMPT` with the word of `n` vectors in it (A1111 chunks), on the test device.
fn prompt_with_word(n: usize) -> EncodedPrompts {
    let tok = ClipTokenizer::new().unwrap();
    encode_prompts(
        &tok,
        &[PROMPT.to_string()],
        &word(n),
        ChunkStyle::A1111,
        &test_device(),
    )
    .unwrap()
}

/// Mean denoising loss of `vectors` on `latents` (scaled) over a fixed set of noises and
/// timesteps, the same for every call.
fn eval_loss(model: &SdModel, latents: &[Tensor], vectors: &Tensor) -> f64 {
    let n = vectors.dim(0).unwrap();
    let enc = prompt_with_word(n);
    let inj = injection(vectors, &enc);
    let schedule = SchedulerConfig::default().noise_schedule().unwrap();
    let mut rng = Rng::new(1234);
    let mut total = 0.0;
    let mut count = 0;
    for lat in latents {
        for _ in 0..8 {
            let t = schedule.random_timestep(&mut rng);
            let mut noise = vec![0f32; lat.elem_count()];
            rng.fill_normal(&mut noise);
            let noise = Tensor::from_vec(noise, lat.dims(), &test_device()).unwrap();
            let batch = DenoisingBatch {
                latents: lat,
                noise: &noise,
                timesteps: &[t],
                ids: &enc.ids,
                injections: &[Some(&inj)],
                time_ids: None,
                clip_skip: 1,
            };
            total += denoising_loss(model, &batch, &schedule)
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
    let enc = prompt_with_word(target.dim(0).unwrap());
    let inj = injection(target, &enc);
    let cond = model.text_encoder.forward(&enc.ids, Some(&inj), 1).unwrap();
    let mut rng = Rng::new(99);
    (0..count)
        .map(|_| {
            let mut noise = vec![0f32; 4 * 8 * 8];
            rng.fill_normal(&mut noise);
            let noise = Tensor::from_vec(noise, (1, 4, 8, 8), &test_device()).unwrap();
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
        .unwrap()
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
        resolution: Some(64),
        max_steps: steps,
        batch_size: 2,
        learning_rate: sdti::train::lr_schedule::LrSchedule::parse(lr).unwrap(),
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
        t.add_latents(vec![sharp_latents(unscaled)], None).unwrap();
    }
    t
}

/// The trainer on pictures of a concept (latents the model draws under a word) lowers the
/// denoising loss against the init word. On the conditioned tiny model: the plain one
/// responds so little to its conditioning (the loss moved 1.13321 -> 1.13290 in 150 steps)
/// that a change of rounding in the matrix products (gemm's AVX-512 kernels) turned the
/// drop into a rise of 5e-5, which said nothing about training.
#[test]
fn training_lowers_the_loss_on_the_concept() {
    let model = Arc::new(conditioned("tiny-sd", GAIN, DType::F32));
    let target = token_vector(&model, "dog");
    let init = token_vector(&model, "cat");
    let latents: Vec<Tensor> = latents_made_with(&model, &target, 6)
        .into_iter()
        .map(|l| (l * model.config.vae.scaling_factor).unwrap())
        .collect();
    let mut trainer = trainer_on(&model, &latents, 150, "0.01");
    let before = eval_loss(&model, &latents, &init);
    trainer.train(150, |_| true).unwrap();
    let after = eval_loss(&model, &latents, trainer.vectors_tensor());
    eprintln!("loss at fixed noise and timesteps: init {before:.5}, learned {after:.5}");
    // Measured 1.11727 -> about 1.1140 (seed 5, 150 steps, lr 0.01; deterministic on the
    // CPU, the last digit moves with the matrix products' and activations' rounding).
    assert!(after < before, "loss {after} did not drop below {before}");
}

/// Inversion with a known answer: latents made with a target vector so that, for the
/// chosen noises and timesteps, the target reproduces the model's own noise prediction
/// exactly (loss 0). Descent with the engine's loss, gradient and AdamW from another word
/// moves the vector to the target.
#[test]
fn inversion_moves_the_vector_to_a_known_target() {
    // Measured: loss 0.001706 -> 0.000014, cosine -0.253 -> 0.623 in 60 steps.
    check_inversion(DType::F32);
}

/// The same inversion with the frozen model in half precision (the vectors, the
/// optimizer and the loss in f32): f16 everywhere, bf16 where candle has bf16 matrix
/// products (not on the CPU). Same thresholds as f32.
#[test]
fn inversion_works_in_half_precision() {
    check_inversion(DType::F16);
    if !test_device().is_cpu() {
        check_inversion(DType::BF16);
    }
}

/// `table`'s rows in the learned slots of `enc`.
fn injection<'a>(table: &'a Tensor, enc: &'a EncodedPrompts) -> Injection<'a> {
    Injection {
        table,
        index: &enc.index,
        mask: &enc.mask,
    }
}

/// The mean denoising loss over `data` (`(x0, eps, t)`: the noise `eps` at timestep `t`
/// is the model's own prediction at `x_t`) with the prompt `ids` and its learned words.
fn mean_loss(
    model: &SdModel,
    schedule: &NoiseSchedule,
    data: &[(Tensor, Tensor, usize)],
    ids: &Tensor,
    injections: &[Option<&Injection>],
    time_ids: Option<&Tensor>,
    clip_skip: usize,
) -> Tensor {
    let mut total: Option<Tensor> = None;
    for (x0, eps, t) in data {
        let batch = DenoisingBatch {
            latents: x0,
            noise: eps,
            timesteps: &[*t],
            ids,
            injections,
            time_ids,
            clip_skip,
        };
        let l = denoising_loss(model, &batch, schedule).unwrap();
        total = Some(match total {
            Some(s) => (s + l).unwrap(),
            None => l,
        });
    }
    (total.unwrap() / data.len() as f64).unwrap()
}

/// [`STEPS`] steps of AdamW (lr [`LR`], no weight decay) on `loss_at` from `init`, each
/// step's vectors passed through `keep` (what stays frozen): the learned vectors.
fn descend(
    init: &Tensor,
    loss_at: impl Fn(&Tensor) -> Tensor,
    keep: impl Fn(&Tensor) -> Tensor,
) -> Tensor {
    let var = candle_core::Var::from_tensor(init).unwrap();
    let mut opt = sdti::train::AdamW::new(0.9, 0.999, 1e-8, 0.0, None);
    for _ in 0..STEPS {
        let grads = loss_at(var.as_tensor()).backward().unwrap();
        let g = grads.get(var.as_tensor()).unwrap().clone();
        let next = opt.update(var.as_tensor(), &g, LR).unwrap();
        var.set(&keep(&next)).unwrap();
    }
    var.as_tensor().clone()
}

fn check_inversion(dtype: DType) {
    let (before_loss, after_loss, before_cos, after_cos) = inversion(dtype);
    eprintln!("inversion {dtype:?}: loss {before_loss:.6} -> {after_loss:.6}; cosine to target {before_cos:.4} -> {after_cos:.4}");
    assert!(
        after_loss.is_finite() && after_cos.is_finite(),
        "{dtype:?}: non-finite result"
    );
    assert!(
        after_loss < 0.2 * before_loss,
        "{dtype:?}: loss {before_loss} -> {after_loss}"
    );
    assert!(
        after_cos > before_cos + COS_RISE,
        "{dtype:?}: cosine {before_cos:.4} -> {after_cos:.4}"
    );
}

/// (loss before, loss after, cosine to the target before, after).
fn inversion(dtype: DType) -> (f32, f32, f64, f64) {
    let model = conditioned("tiny-sd", GAIN, dtype);
    let device = test_device();
    let enc = prompt_with_word(1);
    let target = token_vector(&model, "dog");
    let init = token_vector(&model, "cat");
    let schedule = SchedulerConfig::default().noise_schedule().unwrap();
    let inj = injection(&target, &enc);
    let cond = model.text_encoder.forward(&enc.ids, Some(&inj), 1).unwrap();
    let mut rng = Rng::new(77);
    // (x0, eps, t) with sqrt(a) x0 + sqrt(1-a) eps = x_t and eps = unet(x_t, t, target).
    let mut data = Vec::new();
    for t in [50usize, 200, 400, 600, 800] {
        let mut xt = vec![0f32; 4 * 8 * 8];
        rng.fill_normal(&mut xt);
        let xt = Tensor::from_vec(xt, (1, 4, 8, 8), &device)
            .unwrap()
            .to_dtype(model.dtype())
            .unwrap();
        let eps = model.unet.forward(&xt, &[t as f64], &cond).unwrap();
        let a = schedule.alphas_cumprod()[t] as f64;
        let x0 = ((&xt - (&eps * (1.0 - a).sqrt()).unwrap()).unwrap() / a.sqrt()).unwrap();
        data.push((x0, eps, t));
    }
    let loss_at = |v: &Tensor| -> Tensor {
        let inj = injection(v, &enc);
        mean_loss(&model, &schedule, &data, &enc.ids, &[Some(&inj)], None, 1)
    };
    let before_loss = loss_at(&init).to_scalar::<f32>().unwrap();
    let before_cos = cosine(&init, &target);
    let learned = descend(&init, loss_at, |next| next.clone());
    let after_loss = loss_at(&learned).to_scalar::<f32>().unwrap();
    let after_cos = cosine(&learned, &target);
    (before_loss, after_loss, before_cos, after_cos)
}

/// A tiny reference model (a diffusers folder under tests/fixtures) with its UNet's
/// cross-attention outputs scaled by `gain`, in `dtype`: a random UNet otherwise barely
/// responds to the prompt (the loss moves by 1e-4 between words), so no vector could be
/// told apart from the data. Same architecture and code paths.
fn conditioned(folder: &str, gain: f64, dtype: DType) -> SdModel {
    let dir = fixture(folder);
    let loaded = sdti::model::files::index_model(&dir, DType::F32, &Device::Cpu, None).unwrap();
    let mut tensors = std::collections::HashMap::new();
    for name in loaded.weights.names() {
        let v = loaded
            .weights
            .get_raw(&name)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let v = if name.starts_with("unet.") && name.ends_with("attn2.to_out.0.weight") {
            (v * gain).unwrap()
        } else {
            v
        };
        tensors.insert(name, v);
    }
    let weights = Weights::from_tensors(tensors, dtype, test_device());
    SdModel::from_weights(&weights, loaded.config, dir).unwrap()
}

/// The rows of `text`'s first token in each of the model's token tables, joined
/// `[1, sum of widths]` as the trainer holds an SDXL word (`[clip_l ‖ clip_g]`).
fn family_token_vectors(model: &SdModel, text: &str) -> Tensor {
    let id = ClipTokenizer::new().unwrap().encode(text)[0] as usize;
    let mut parts = vec![model
        .text_encoder
        .token_table()
        .unwrap()
        .narrow(0, id, 1)
        .unwrap()];
    if let Some(g) = &model.text_encoder_2 {
        parts.push(g.token_table().unwrap().narrow(0, id, 1).unwrap());
    }
    Tensor::cat(&parts, 1)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// What one family inversion did: the loss before and after, and per table the cosine
/// to its target before and after.
struct FamilyInversion {
    loss: (f32, f32),
    cosines: Vec<(f64, f64)>,
    /// Relative distance of the word's conditioning (context, and SDXL's pooled vector)
    /// from the target's, before and after.
    conditioning: (f64, f64),
}

/// The known-answer inversion of [`inversion`] on an SD 2.x or SDXL model, through the
/// family's own conditioning (SD 2.x: OpenCLIP's penultimate states with 0 padding;
/// SDXL: both tables, the pooled vector and the time ids) and the engine's loss and
/// AdamW, one joint table as the trainer holds it.
/// `trained`: which tables move (the others stay at their targets).
fn family_inversion(model: &SdModel, trained: &[bool]) -> FamilyInversion {
    let device = test_device();
    let enc = prompt_with_word(1);
    let mut widths = vec![model.text_encoder.config().hidden_size];
    widths.extend(
        model
            .text_encoder_2
            .as_ref()
            .map(|g| g.config().hidden_size),
    );
    let clip_skip = model.text_encoder.default_conditioning().clip_skip;
    let schedule = model.config.scheduler.noise_schedule().unwrap();
    assert_eq!(
        model.config.scheduler.prediction_type,
        sdti::model::PredictionType::Epsilon
    );
    let time_ids = model
        .unet
        .takes_added_cond()
        .then(|| Tensor::from_vec(vec![64f32, 64., 0., 0., 64., 64.], (1, 6), &device).unwrap());
    // The loss of the joint table `v` on one (x0, eps, t), or the UNet's prediction at
    // x_t when `x0` is None.
    let parts_of = |v: &Tensor| -> Vec<Tensor> {
        let mut start = 0;
        widths
            .iter()
            .map(|&w| {
                let p = v.narrow(1, start, w).unwrap();
                start += w;
                p
            })
            .collect()
    };
    // The conditioning the joint table `v` gives, flattened: context, then pooled.
    let conditioning_of = |v: &Tensor| -> Tensor {
        let parts = parts_of(v);
        let injs: Vec<Injection> = parts.iter().map(|p| injection(p, &enc)).collect();
        let refs: Vec<Option<&Injection>> = injs.iter().map(Some).collect();
        let (context, pooled) =
            sdti::train::loss::text_conditioning(model, &enc.ids, &refs, clip_skip).unwrap();
        let mut flat = vec![context.flatten_all().unwrap()];
        flat.extend(pooled.map(|p| p.flatten_all().unwrap()));
        Tensor::cat(&flat, 0).unwrap().detach()
    };
    let distance = |a: &Tensor, b: &Tensor| -> f64 {
        let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
        let n = b.sqr().unwrap().sum_all().unwrap();
        (d.to_scalar::<f32>().unwrap() as f64 / n.to_scalar::<f32>().unwrap() as f64).sqrt()
    };
    let target = family_token_vectors(model, "dog");
    let cat = family_token_vectors(model, "cat");
    assert_eq!(trained.len(), widths.len());
    // Frozen tables at their targets, the trained ones from "cat".
    let mix = |v: &Tensor| -> Tensor {
        let parts: Vec<Tensor> = parts_of(v)
            .into_iter()
            .zip(parts_of(&target))
            .zip(trained)
            .map(|((p, t), &train)| if train { p } else { t })
            .collect();
        Tensor::cat(&parts, 1).unwrap()
    };
    let init = mix(&cat);
    let mut rng = Rng::new(77);
    let mut data = Vec::new();
    {
        let parts = parts_of(&target);
        let injs: Vec<Injection> = parts.iter().map(|p| injection(p, &enc)).collect();
        let refs: Vec<Option<&Injection>> = injs.iter().map(Some).collect();
        let (context, pooled) =
            sdti::train::loss::text_conditioning(model, &enc.ids, &refs, clip_skip).unwrap();
        let added = match (pooled, &time_ids) {
            (Some(pooled), Some(ids)) => Some(sdti::model::unet::AddedCond {
                pooled,
                time_ids: ids.clone(),
            }),
            _ => None,
        };
        for t in [100usize, 400, 700] {
            let mut xt = vec![0f32; 4 * 8 * 8];
            rng.fill_normal(&mut xt);
            let xt = Tensor::from_vec(xt, (1, 4, 8, 8), &device).unwrap();
            let eps = model
                .unet
                .forward_with(
                    &xt,
                    &[t as f64],
                    &context,
                    added.as_ref(),
                    sdti::model::Recompute::Off,
                )
                .unwrap()
                .detach();
            let a = schedule.alphas_cumprod()[t] as f64;
            let x0 = ((&xt - (&eps * (1.0 - a).sqrt()).unwrap()).unwrap() / a.sqrt()).unwrap();
            data.push((x0, eps, t));
        }
    }
    let loss_at = |v: &Tensor| -> Tensor {
        let parts = parts_of(v);
        let injs: Vec<Injection> = parts.iter().map(|p| injection(p, &enc)).collect();
        let refs: Vec<Option<&Injection>> = injs.iter().map(Some).collect();
        mean_loss(
            model,
            &schedule,
            &data,
            &enc.ids,
            &refs,
            time_ids.as_ref(),
            clip_skip,
        )
    };
    let target_cond = conditioning_of(&target);
    let cond_before = distance(&conditioning_of(&init), &target_cond);
    let before = loss_at(&init).to_scalar::<f32>().unwrap();
    let cos_before: Vec<f64> = parts_of(&init)
        .iter()
        .zip(parts_of(&target))
        .map(|(a, b)| cosine(a, &b))
        .collect();
    let learned = descend(&init, loss_at, mix);
    let after = loss_at(&learned).to_scalar::<f32>().unwrap();
    let cos_after: Vec<f64> = parts_of(&learned)
        .iter()
        .zip(parts_of(&target))
        .map(|(a, b)| cosine(a, &b))
        .collect();
    let cond_after = distance(&conditioning_of(&learned), &target_cond);
    FamilyInversion {
        loss: (before, after),
        cosines: cos_before.into_iter().zip(cos_after).collect(),
        conditioning: (cond_before, cond_after),
    }
}

/// SD 2.x and SDXL learn too: the known-answer inversion on each family's tiny reference
/// model, through each family's conditioning and with both SDXL tables trained together,
/// drives the loss down (at most a fifth, as SD 1.x's) and the word's conditioning
/// (context, and SDXL's pooled vector) towards the target's (at most half as far).
/// Measured: SD 2.x loss 0.00232 -> 0.00001, conditioning 0.149 -> 0.016 off; SDXL loss
/// 0.00043 -> 0.00001, conditioning 0.096 -> 0.034 off (its tiny clip_g moves the
/// conditioning little: the UNet attends to a 48-wide half of an 80-wide context).
/// The vectors' own cosine to the target is no measure here, unlike SD 1.x's: on these
/// tiny random encoders many vectors give nearly the target's conditioning (SDXL's
/// clip_g trained alone reached a 99% lower loss while its cosine to the target moved
/// only -0.14 -> -0.04), so the test asks for the conditioning instead.
#[test]
fn inversion_reaches_known_targets_on_sd2_and_sdxl() {
    for folder in ["tiny-sd2", "tiny-sdxl"] {
        let model = conditioned(folder, GAIN, DType::F32);
        let tables = model.text_encoder_2.as_ref().map_or(1, |_| 2);
        let r = family_inversion(&model, &vec![true; tables]);
        let (before, after) = r.loss;
        let (cond_before, cond_after) = r.conditioning;
        eprintln!(
            "{folder}: loss {before:.6} -> {after:.6}; conditioning off the target's \
             {cond_before:.4} -> {cond_after:.4}; cosines to target {:?}",
            r.cosines
        );
        assert!(
            after.is_finite() && after < 0.2 * before,
            "{folder}: loss {before} -> {after}"
        );
        assert!(
            cond_after < 0.5 * cond_before,
            "{folder}: conditioning off the target's {cond_before} -> {cond_after}"
        );
    }
}
