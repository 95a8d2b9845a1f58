//! SDXL training: the denoising loss and the gradients on both learned tables (L and G,
//! through the context and the pooled vector), AdamW on the two tables with their joint
//! gradient norm clipped, and the trainer end to end (time ids from the data, the word
//! exported as `{clip_l, clip_g}`, exact resume), against
//! tests/reference/make_tiny_sdxl.py.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use sdti::embedding::{read_embedding, Encoder, Existing, Format, Precision};
use sdti::model::unet::AddedCond;
use sdti::model::{
    Injection, LatentDist, LoadOptions, NoiseSchedule, PredictionType, Recompute, SchedulerConfig,
    SdModel,
};
use sdti::train::data::{ImageSource, PixelFormat};
use sdti::train::loss::{denoising_loss, text_conditioning, DenoisingBatch};
use sdti::train::{AdamW, Init, Templates, TrainConfig, Trainer};

use crate::common::{assert_close, fixture, rel_err, test_device};

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("tiny-sdxl-expected.safetensors"), &test_device())
        .expect("reference fixture tiny-sdxl-expected.safetensors")
}

/// The tiny SDXL diffusers folder, loaded as users load models.
fn sdxl_model(dtype: DType) -> SdModel {
    SdModel::load(
        &fixture("tiny-sdxl"),
        &LoadOptions {
            dtype,
            device: test_device(),
            ..LoadOptions::default()
        },
    )
    .expect("tiny SDXL folder loads")
}

/// Reference ids `[1, 77]` (placeholders 49408.. as learned slots holding id 0) as ids,
/// index and mask. The L ids (padded with the end token): G pads with 0 by its own rule.
fn prompt(raw: &Tensor) -> (Tensor, Tensor, Tensor) {
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
    (
        Tensor::from_vec(ids, (1, n), &dev).unwrap(),
        Tensor::from_vec(index, (1, n), &dev).unwrap(),
        Tensor::from_vec(mask, (1, n), &dev).unwrap(),
    )
}

/// The three objectives of the fixture: epsilon, v, and v on the zero-terminal-SNR
/// schedule (NoobAI-style), with their key prefix.
const OBJECTIVES: [(PredictionType, bool, &str); 3] = [
    (PredictionType::Epsilon, false, "loss"),
    (PredictionType::VPrediction, false, "loss_v"),
    (PredictionType::VPrediction, true, "loss_vz"),
];

fn schedule(
    model: &SdModel,
    exp: &HashMap<String, Tensor>,
    prediction: PredictionType,
    zero_snr: bool,
) -> NoiseSchedule {
    let schedule = SchedulerConfig {
        prediction_type: prediction,
        rescale_betas_zero_snr: zero_snr,
        ..model.config.scheduler.clone()
    }
    .noise_schedule()
    .unwrap();
    let key = if zero_snr {
        "ddpm.alphas_cumprod_zsnr"
    } else {
        "ddpm.alphas_cumprod"
    };
    let ac: Vec<f32> = exp[key].to_vec1().unwrap();
    // The zero-SNR rescale is computed in another order than torch's: within an ulp.
    for (got, want) in schedule.alphas_cumprod().iter().zip(&ac) {
        assert!(
            (got - want).abs() <= 2e-7 * want.max(1e-3),
            "{key}: {got} vs {want}"
        );
    }
    schedule
}

/// The fixture's loss sample in `dtype`: latents, noise, timestep.
fn loss_sample(exp: &HashMap<String, Tensor>, dtype: DType) -> (Tensor, Tensor, usize) {
    (
        exp["loss.latents"].to_dtype(dtype).unwrap(),
        exp["loss.noise"].to_dtype(dtype).unwrap(),
        exp["loss.timestep"].to_vec1::<i64>().unwrap()[0] as usize,
    )
}

/// The denoising loss with `l` and `g` as the word's two tables, the fixture's time ids.
fn loss_with(
    model: &SdModel,
    exp: &HashMap<String, Tensor>,
    schedule: &NoiseSchedule,
    l: &Tensor,
    g: &Tensor,
) -> Tensor {
    let (ids, index, mask) = prompt(&exp["te.input_ids_l"]);
    let inj_l = Injection {
        table: l,
        index: &index,
        mask: &mask,
    };
    let inj_g = Injection {
        table: g,
        index: &index,
        mask: &mask,
    };
    let (latents, noise, t) = loss_sample(exp, model.text_encoder.dtype());
    let batch = DenoisingBatch {
        latents: &latents,
        noise: &noise,
        timesteps: &[t],
        ids: &ids,
        injections: &[Some(&inj_l), Some(&inj_g)],
        time_ids: Some(&exp["loss.time_ids"]),
        clip_skip: model.text_encoder.default_conditioning().clip_skip,
    };
    denoising_loss(model, &batch, schedule).unwrap()
}

/// The fixture's vectors as Vars in the text encoders' dtype (f32, or f64 for f64 models).
fn vars(model: &SdModel, exp: &HashMap<String, Tensor>) -> (Var, Var) {
    let dtype = model.text_encoder.dtype();
    let var = |k: &str| Var::from_tensor(&exp[k].to_dtype(dtype).unwrap()).unwrap();
    (var("te.vectors_l"), var("te.vectors_g"))
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// The loss and both tables' gradients.
fn loss_and_grads(
    model: &SdModel,
    exp: &HashMap<String, Tensor>,
    schedule: &NoiseSchedule,
) -> (f64, Tensor, Tensor) {
    let (l, g) = vars(model, exp);
    let loss = loss_with(model, exp, schedule, l.as_tensor(), g.as_tensor());
    let grads = loss.backward().unwrap();
    let grad = |v: &Var| grads.get(v.as_tensor()).expect("a gradient").clone();
    (scalar(&loss), grad(&l), grad(&g))
}

/// Epsilon, v and v with zero terminal SNR: the loss (1e-5) and the gradients on L's and
/// G's tables (1e-3 each) match torch. The trainer's layout, one `[2, 32 + 48]` table whose
/// column ranges are the two injections, gives the two gradients side by side.
#[test]
fn sdxl_loss_and_grads_both_tables() {
    let exp = expected();
    let model = sdxl_model(DType::F32);
    for (prediction, zero_snr, key) in OBJECTIVES {
        let schedule = schedule(&model, &exp, prediction, zero_snr);
        let (loss, grad_l, grad_g) = loss_and_grads(&model, &exp, &schedule);
        let want = scalar(&exp[&format!("{key}.value")]);
        assert!(
            ((loss - want) / want).abs() <= 1e-5,
            "{key}: loss {loss} vs torch {want}"
        );
        assert_close(
            &format!("{key} grad_l"),
            &grad_l,
            &exp[&format!("{key}.grad_l")],
            1e-3,
        );
        assert_close(
            &format!("{key} grad_g"),
            &grad_g,
            &exp[&format!("{key}.grad_g")],
            1e-3,
        );
        if key == "loss" {
            let joint = Var::from_tensor(
                &Tensor::cat(&[&exp["te.vectors_l"], &exp["te.vectors_g"]], 1).unwrap(),
            )
            .unwrap();
            let t = joint.as_tensor();
            let loss = loss_with(
                &model,
                &exp,
                &schedule,
                &t.narrow(1, 0, 32).unwrap().contiguous().unwrap(),
                &t.narrow(1, 32, 48).unwrap().contiguous().unwrap(),
            );
            let grads = loss.backward().unwrap();
            let g = grads.get(t).expect("the joint table's gradient");
            assert_eq!(g.dims(), &[2, 80]);
            assert_eq!(rel_err(&g.narrow(1, 0, 32).unwrap(), &grad_l), 0.0);
            assert_eq!(rel_err(&g.narrow(1, 32, 48).unwrap(), &grad_g), 0.0);
        }
    }
}

/// G's gradient splits into its two paths: with G's half of the context detached only the
/// pooled vector -> add_embedding -> every resnet's time projection path is left
/// (`grad_g_pooled_only`, the one place a missing or mis-wired pooled gradient shows);
/// with the pooled vector detached, the cross-attention path (`grad_g_context_only`).
#[test]
fn sdxl_grad_g_pooled_only() {
    let exp = expected();
    let model = sdxl_model(DType::F32);
    let schedule = schedule(&model, &exp, PredictionType::Epsilon, false);
    let (latents, noise, t) = loss_sample(&exp, DType::F32);
    let coefs = schedule.add_noise_coefs(t).unwrap();
    let noisy = ((&latents * f64::from(coefs.sample_coef)).unwrap()
        + (&noise * f64::from(coefs.noise_coef)).unwrap())
    .unwrap();
    assert_close("noisy latents", &noisy, &exp["loss.noisy_latents"], 1e-6);
    let (ids, index, mask) = prompt(&exp["te.input_ids_l"]);
    for (detach_context, key) in [
        (true, "loss.grad_g_pooled_only"),
        (false, "loss.grad_g_context_only"),
    ] {
        let (l, g) = vars(&model, &exp);
        let inj_l = Injection {
            table: l.as_tensor(),
            index: &index,
            mask: &mask,
        };
        let inj_g = Injection {
            table: g.as_tensor(),
            index: &index,
            mask: &mask,
        };
        let (context, pooled) =
            text_conditioning(&model, &ids, &[Some(&inj_l), Some(&inj_g)], 2).unwrap();
        let mut pooled = pooled.expect("SDXL gives a pooled vector");
        let context = if detach_context {
            let l_half = context.narrow(2, 0, 32).unwrap();
            let g_half = context.narrow(2, 32, 48).unwrap().detach();
            Tensor::cat(&[&l_half, &g_half], 2).unwrap()
        } else {
            pooled = pooled.detach();
            context
        };
        let cond = AddedCond {
            pooled,
            time_ids: exp["loss.time_ids"].clone(),
        };
        let pred = model
            .unet
            .forward_with(&noisy, &[t as f64], &context, Some(&cond), Recompute::Off)
            .unwrap();
        let loss = (pred - &noise).unwrap().sqr().unwrap().mean_all().unwrap();
        let want = scalar(&exp["loss.value"]);
        assert!(((scalar(&loss) - want) / want).abs() <= 1e-5);
        let grads = loss.backward().unwrap();
        let grad = grads.get(g.as_tensor()).expect("G's gradient");
        assert_close(key, grad, &exp[key], 1e-3);
    }
}

/// In f64: the loss and both gradients against torch's f64 run (1e-6) for the three
/// objectives, and the backward pass against central differences on coordinates of each
/// table (epsilon).
#[test]
fn sdxl_grad_fd_f64() {
    let exp = expected();
    let model = sdxl_model(DType::F64);
    for (prediction, zero_snr, key) in OBJECTIVES {
        let schedule = schedule(&model, &exp, prediction, zero_snr);
        let (loss, grad_l, grad_g) = loss_and_grads(&model, &exp, &schedule);
        let want = scalar(&exp[&format!("{key}.value_f64")]);
        // diffusers keeps the timestep and time-id sinusoids and alphas_cumprod in f32
        // even in f64 runs: both sides share those constants.
        assert!(
            ((loss - want) / want).abs() <= 1e-6,
            "{key} f64: loss {loss} vs torch {want}"
        );
        for (table, grad) in [("l", &grad_l), ("g", &grad_g)] {
            assert_close(
                &format!("{key} f64 grad_{table} vs torch f64"),
                grad,
                &exp[&format!("{key}.grad_{table}_f64")],
                1e-6,
            );
        }
        if prediction != PredictionType::Epsilon {
            continue;
        }
        let base = |k: &str| -> Vec<f64> {
            exp[k]
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (l0, g0) = (base("te.vectors_l"), base("te.vectors_g"));
        let table = |v: Vec<f64>, w: usize| Tensor::from_vec(v, (2, w), &test_device()).unwrap();
        let loss_at = |l: &[f64], g: &[f64]| -> f64 {
            scalar(&loss_with(
                &model,
                &exp,
                &schedule,
                &table(l.to_vec(), 32),
                &table(g.to_vec(), 48),
            ))
        };
        // h = 1e-5 balances the central difference's truncation (h^2) and rounding
        // (1e-16 / h) errors for a loss of order 1 in f64 (as sd2_grad_fd_f64).
        let h = 1e-5;
        // Every 4th coordinate of L's 64 and every 6th of G's 96 (both rows, first and
        // last columns among them): 32 coordinates, 64 f64 losses, a few seconds.
        let coords = |which: usize| -> Vec<usize> {
            if which == 0 {
                (0..l0.len()).step_by(4).collect()
            } else {
                (0..g0.len()).step_by(6).collect()
            }
        };
        let central = |which: usize| -> Tensor {
            let fd: Vec<f64> = coords(which)
                .into_iter()
                .map(|i| {
                    let moved = |d: f64| {
                        let (mut l, mut g) = (l0.clone(), g0.clone());
                        if which == 0 {
                            l[i] += d;
                        } else {
                            g[i] += d;
                        }
                        loss_at(&l, &g)
                    };
                    (moved(h) - moved(-h)) / (2.0 * h)
                })
                .collect();
            let n = fd.len();
            Tensor::from_vec(fd, n, &test_device()).unwrap()
        };
        for (which, name, grad) in [(0, "L", &grad_l), (1, "G", &grad_g)] {
            let all: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
            let picked: Vec<f64> = coords(which).into_iter().map(|i| all[i]).collect();
            let n = picked.len();
            let picked = Tensor::from_vec(picked, n, &test_device()).unwrap();
            let e = rel_err(&picked, &central(which));
            eprintln!("{name}: backward vs central differences: {e:.3e}");
            assert!(
                e <= 1e-6,
                "{name}: backward vs central differences: relative error {e:.3e}"
            );
        }
    }
}

/// Two AdamW steps on the two tables as one `[2, 32 + 48]` tensor (the trainer's layout)
/// equal torch's `AdamW([l, g])` after `clip_grad_norm_([l, g], 0.1)`: AdamW is elementwise,
/// and the clipping scales both tables by their joint norm.
#[test]
fn sdxl_adamw_clips_the_joint_norm_of_both_tables() {
    let exp = expected();
    let cpu = |k: &str| exp[k].to_device(&Device::Cpu).unwrap();
    let joint =
        |k: &str| Tensor::cat(&[cpu(&format!("{k}_l")), cpu(&format!("{k}_g"))], 1).unwrap();
    let mut opt = AdamW::new(0.9, 0.999, 1e-8, 1e-2, Some(0.1));
    let mut p = Tensor::cat(&[cpu("te.vectors_l"), cpu("te.vectors_g")], 1).unwrap();
    for step in 1..=2 {
        let grad = joint(&format!("adamw_joint_clip.grad{step}"));
        p = opt.update(&p, &grad, 5e-3).unwrap();
        let want = joint(&format!("adamw_joint_clip.param{step}"));
        let got: Vec<f32> = p.flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-7 + 1e-6 * w.abs(),
                "step {step}: adamw {g} vs torch {w}"
            );
        }
    }
    // L's table clipped by its own norm would move otherwise by the second step (the
    // first AdamW step is blind to the gradient's scale): the clip is joint.
    let mut alone = AdamW::new(0.9, 0.999, 1e-8, 1e-2, Some(0.1));
    let mut l = cpu("te.vectors_l");
    for step in 1..=2 {
        let grad = cpu(&format!("adamw_joint_clip.grad{step}_l"));
        l = alone.update(&l, &grad, 5e-3).unwrap();
    }
    let want_l = cpu("adamw_joint_clip.param2_l");
    let moved = |a: &Tensor| (a - &cpu("te.vectors_l")).unwrap();
    assert!(rel_err(&moved(&l), &moved(&want_l)) > 1e-4);
}

/// A `width x height` RGB picture: a disc on a background, varying with `k`.
fn picture(k: usize, width: usize, height: usize) -> ImageSource {
    let mut data = vec![0u8; width * height * 3];
    for y in 0..height {
        for x in 0..width {
            let dx = x as f32 - width as f32 / 2.0 - k as f32 * 4.0;
            let dy = y as f32 - height as f32 / 2.0;
            let inside = dx * dx + dy * dy < 300.0;
            let p = (y * width + x) * 3;
            data[p] = if inside { 220 } else { 30 + (k * 20) as u8 };
            data[p + 1] = if inside { 60 } else { 90 };
            data[p + 2] = if inside { 40 } else { (x * 255 / width) as u8 };
        }
    }
    ImageSource::Pixels {
        data,
        width: width as u32,
        height: height as u32,
        stride: width * 3,
        format: PixelFormat::Rgb8,
    }
}

fn config(steps: u64) -> TrainConfig {
    TrainConfig {
        token: "sks".into(),
        init: Init::Text("toy".into()),
        vectors: 2,
        resolution: Some(64),
        random_crop: true,
        max_steps: steps,
        batch_size: 2,
        seed: 5,
        templates: Templates::Object,
        ..TrainConfig::default()
    }
}

/// The tiny SDXL with two landscape pictures (96 x 64, cropped at random) added.
fn trainer(model: &Arc<SdModel>, cfg: TrainConfig) -> Trainer {
    let mut t = Trainer::new(model.clone(), cfg).unwrap();
    for k in 0..2 {
        t.add_image(picture(k, 96, 64), None).unwrap();
    }
    t
}

/// Unset, the resolution is the family's: 1024 for SDXL, 768 for a v-prediction SD 2.x,
/// 512 for SD 1.x and SD 2.x with epsilon; recorded in the config. A given one wins.
#[test]
fn default_resolution_follows_the_family() {
    let unset = TrainConfig {
        resolution: None,
        ..config(1)
    };
    let sdxl = Arc::new(sdxl_model(DType::F32));
    let sd2 = Arc::new(
        SdModel::load(
            &fixture("tiny-sd2"),
            &LoadOptions {
                device: test_device(),
                ..LoadOptions::default()
            },
        )
        .unwrap(),
    );
    let sd1 = Arc::new(crate::common::tiny_model(DType::F32));
    for (model, prediction, want) in [
        (&sdxl, None, 1024),
        (&sd2, None, 512),
        (&sd2, Some(PredictionType::VPrediction), 768),
        (&sd1, None, 512),
    ] {
        let t = Trainer::new(
            model.clone(),
            TrainConfig {
                prediction_type: prediction,
                ..unset.clone()
            },
        )
        .unwrap();
        assert_eq!(
            (t.config().resolution, t.resolution()),
            (Some(want), want),
            "{:?} {prediction:?}",
            model.config.family
        );
    }
    let given = Trainer::new(sdxl.clone(), config(1)).unwrap();
    assert_eq!(given.resolution(), 64);
}

/// A short SDXL run on the tiny model at 64 px: each table starts at its own encoder's
/// token rows of the init text, the time ids are the data's (original size, crop, target;
/// the mirrored view's crop mirrored), the losses are finite, both tables move, the word
/// is exported as `{clip_l [2, 32], clip_g [2, 48]}` and read back, and a prompt encoder
/// with the exported word conditions as the training path does.
#[test]
fn sdxl_training_run() {
    use sdti::prompt::chunks::ChunkStyle;
    use sdti::prompt::encoder::PromptEncoder;
    use sdti::prompt::{encode_prompts, Word};
    use sdti::tokenizer::ClipTokenizer;

    let model = Arc::new(sdxl_model(DType::F32));
    let mut trainer = trainer(&model, config(3));
    assert_eq!(trainer.part_widths(), &[32, 48]);
    assert_eq!(trainer.vectors_tensor().dims(), &[2, 80]);

    // Init: "toy"'s token row of each encoder's own table.
    let toy = ClipTokenizer::new().unwrap().encode("toy");
    assert_eq!(toy.len(), 1);
    let idx = Tensor::new(&[toy[0], toy[0]], &test_device()).unwrap();
    let init = trainer.vector_parts().unwrap();
    for (part, te) in init
        .iter()
        .zip([&model.text_encoder, model.text_encoder_2.as_ref().unwrap()])
    {
        let want: Vec<f32> = te
            .token_table()
            .index_select(&idx, 0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(part, &want);
    }

    // The time ids: the 96 x 64 source (height first), the crop's top-left in the image
    // resized to 96 x 64 (here the source size), the 64 px target; mirrored, the crop's
    // left edge seen from the other side.
    for image in 0..2 {
        let ids = trainer.time_ids(image, 0).expect("view 0");
        let left = ids[3];
        assert_eq!(ids, [64.0, 96.0, 0.0, left, 64.0, 64.0], "image {image}");
        assert!((0.0..=32.0).contains(&left));
        let mirrored = trainer.time_ids(image, 1).expect("view 1");
        assert_eq!(mirrored, [64.0, 96.0, 0.0, 32.0 - left, 64.0, 64.0]);
    }
    assert_eq!(trainer.time_ids(2, 0), None);

    let mut losses = Vec::new();
    trainer
        .train(3, |s| {
            losses.push(s.loss);
            true
        })
        .unwrap();
    assert_eq!(losses.len(), 3);
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    let trained = trainer.vector_parts().unwrap();
    assert_ne!(trained[0], init[0], "L's table moved");
    assert_ne!(trained[1], init[1], "G's table moved");

    let dir = tempfile::tempdir().unwrap();
    for format in [Format::SdxlSafetensors, Format::KohyaPt] {
        let path = dir.path().join(format!("sks-{format:?}.safetensors"));
        trainer
            .export(&path, format, Precision::F32, Existing::Refuse)
            .unwrap();
        let back = read_embedding(&path).unwrap();
        assert_eq!(back.parts.len(), 2, "{format:?}");
        let part = |e: Encoder| {
            back.parts
                .iter()
                .find(|p| p.encoder == e)
                .unwrap_or_else(|| panic!("{format:?}: no {e:?} part"))
        };
        let (l, g) = (part(Encoder::ClipL), part(Encoder::ClipG));
        assert_eq!((l.vectors, l.dim, g.vectors, g.dim), (2, 32, 2, 48));
        assert_eq!((&l.data, &g.data), (&trained[0], &trained[1]));
    }

    // A host's prompt encoder with the exported word gives the training path's context
    // and pooled vector.
    let path = dir.path().join("sks-SdxlSafetensors.safetensors");
    let mut encoder = PromptEncoder::for_model(&model).unwrap();
    encoder.register_file(Some("sks"), &path).unwrap();
    let text = "a photo of a sks toy";
    let (context, pooled) = encoder.encode_with_pooled(text).unwrap();
    let enc = encode_prompts(
        &ClipTokenizer::new().unwrap(),
        &[text.to_string()],
        &[Word {
            name: "sks".into(),
            vectors: 2,
            offset: 0,
        }],
        ChunkStyle::A1111,
        &test_device(),
    )
    .unwrap();
    let t = trainer.vectors_tensor();
    let part = |start, width| t.narrow(1, start, width).unwrap().contiguous().unwrap();
    let (l, g) = (part(0, 32), part(32, 48));
    let inj = |table| Injection {
        table,
        index: &enc.index,
        mask: &enc.mask,
    };
    let (want_context, want_pooled) = text_conditioning(
        &model,
        &enc.ids,
        &[Some(&inj(&l)), Some(&inj(&g))],
        trainer.clip_skip(),
    )
    .unwrap();
    assert_close(
        "context",
        &context.unsqueeze(0).unwrap(),
        &want_context,
        1e-6,
    );
    let pooled = pooled.expect("pooled vector");
    assert_close(
        "pooled",
        &pooled
            .reshape(want_pooled.as_ref().unwrap().dims())
            .unwrap(),
        want_pooled.as_ref().unwrap(),
        1e-6,
    );

    // Latents from a host: the training resolution's square, uncropped.
    let mut host = Trainer::new(model.clone(), config(1)).unwrap();
    let mean = Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &test_device()).unwrap();
    let logvar = (mean.zeros_like().unwrap() - 30.0).unwrap();
    host.add_latents(vec![LatentDist { mean, logvar }], None)
        .unwrap();
    assert_eq!(
        host.time_ids(0, 0),
        Some([64.0, 64.0, 0.0, 0.0, 64.0, 64.0])
    );
    let stats = host.train(1, |_| true).unwrap();
    assert!(stats[0].loss.is_finite());
}

/// The SDXL loss refuses a batch without time ids, time ids for a model without the
/// added embedding, and a table count that is not one per encoder, saying which.
#[test]
fn sdxl_loss_checks_its_inputs() {
    let exp = expected();
    let model = sdxl_model(DType::F32);
    let schedule = schedule(&model, &exp, PredictionType::Epsilon, false);
    let (ids, index, mask) = prompt(&exp["te.input_ids_l"]);
    let inj = Injection {
        table: &exp["te.vectors_l"],
        index: &index,
        mask: &mask,
    };
    let (latents, noise, t) = loss_sample(&exp, DType::F32);
    let timesteps = [t];
    let loss = |injections: &[Option<&Injection<'_>>], time_ids: Option<&Tensor>| {
        let batch = DenoisingBatch {
            latents: &latents,
            noise: &noise,
            timesteps: &timesteps,
            ids: &ids,
            injections,
            time_ids,
            clip_skip: 2,
        };
        denoising_loss(&model, &batch, &schedule)
    };
    let err = |r: sdti::error::Result<Tensor>| r.expect_err("refused").to_string();
    let e = err(loss(&[], None));
    assert!(e.contains("time ids [1, 6]"), "{e}");
    let wrong = exp["loss.time_ids"].narrow(1, 0, 5).unwrap();
    let e = err(loss(&[], Some(&wrong)));
    assert!(e.contains("expected [1, 6]"), "{e}");
    let e = err(loss(&[Some(&inj)], Some(&exp["loss.time_ids"])));
    assert!(e.contains("one per encoder"), "{e}");
    // No learned vectors at all is fine (the empty list).
    let plain = loss(&[], Some(&exp["loss.time_ids"])).unwrap();
    assert!(scalar(&plain).is_finite());

    let sd1 = crate::common::tiny_model(DType::F32);
    let sd1_latents = Tensor::zeros((1, 4, 8, 8), DType::F32, &test_device()).unwrap();
    let sd1_batch = DenoisingBatch {
        latents: &sd1_latents,
        noise: &sd1_latents,
        timesteps: &[t],
        ids: &ids,
        injections: &[],
        time_ids: Some(&exp["loss.time_ids"]),
        clip_skip: 1,
    };
    let e = err(denoising_loss(&sd1, &sd1_batch, &schedule));
    assert!(e.contains("only SDXL's takes them"), "{e}");
}

/// An SDXL run interrupted and resumed from its checkpoint ends with both tables bit for
/// bit as the straight run's.
#[test]
fn sdxl_resume_is_exact() {
    let model = Arc::new(sdxl_model(DType::F32));
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt.safetensors");
    let mut straight = trainer(&model, config(4));
    straight.train(4, |_| true).unwrap();

    let mut first = trainer(&model, config(4));
    first.train(2, |_| true).unwrap();
    first.save_checkpoint(&ckpt).unwrap();
    drop(first);
    let mut resumed = trainer(&model, config(4));
    resumed.load_checkpoint(&ckpt).unwrap();
    assert_eq!(resumed.step_count(), 2);
    resumed.train(2, |_| true).unwrap();
    assert_eq!(
        resumed.vector_parts().unwrap(),
        straight.vector_parts().unwrap()
    );

    // An SD 1.x run refuses the SDXL checkpoint (its table is 32, not 32 + 48, wide).
    let sd1 = Arc::new(crate::common::tiny_model(DType::F32));
    let same_options = TrainConfig {
        clip_skip: Some(2),
        ..config(4)
    };
    let mut other = Trainer::new(sd1, same_options).unwrap();
    for k in 0..2 {
        other.add_image(picture(k, 96, 64), None).unwrap();
    }
    let err = other.load_checkpoint(&ckpt).unwrap_err().to_string();
    assert!(err.contains("shape"), "{err}");
}

/// SDXL's VAE with f16 weights computes in f32 (its config's `force_upcast: true`, the
/// original SDXL VAE's, which overflows in f16), in f16 when the config says
/// `force_upcast: false` (the fp16-fix VAE); SD 1.x keeps the weights' dtype. Its latents
/// scale by 0.13025, and an f16 SDXL run trains on them.
#[test]
fn sdxl_vae_scaling_and_dtype_policy() {
    let exp = expected();
    let load = |path: &str, dtype, config| {
        SdModel::load(
            &fixture(path),
            &LoadOptions {
                dtype,
                device: test_device(),
                config,
            },
        )
        .unwrap()
    };
    let half = Arc::new(load("tiny-sdxl", DType::F16, None));
    assert!(half.config.vae.force_upcast);
    assert_eq!(half.config.vae.scaling_factor, 0.13025);
    assert_eq!((half.dtype(), half.vae_dtype()), (DType::F16, DType::F32));
    let dist = half.vae.encode(&exp["vae.image"]).unwrap();
    assert_eq!(dist.mean.dtype(), DType::F32);
    assert_close(
        "f32 VAE of an f16 model",
        &dist.mean,
        &exp["vae.latent_mean"],
        1e-4,
    );
    let scaled = half.vae.scale(&dist.mean).unwrap();
    assert_close(
        "latents x 0.13025",
        &scaled,
        &(&exp["vae.latent_mean"] * 0.13025).unwrap(),
        1e-4,
    );

    let mut fp16_fix = half.config.clone();
    fp16_fix.vae.force_upcast = false;
    let fixed = load("tiny-sdxl", DType::F16, Some(fp16_fix));
    assert_eq!(fixed.vae_dtype(), DType::F16);
    let sd1 = load("tiny-sd", DType::F16, None);
    assert_eq!(sd1.vae_dtype(), DType::F16);
    let full = load("tiny-sdxl", DType::F32, None);
    assert_eq!(full.vae_dtype(), DType::F32);

    // An f16 SDXL run: f32 latents from the VAE, the f16 UNet with loss scaling.
    let mut t = Trainer::new(
        half.clone(),
        TrainConfig {
            batch_size: 1,
            ..config(2)
        },
    )
    .unwrap();
    assert!(t.loss_scale().is_some());
    t.add_image(picture(0, 96, 64), None).unwrap();
    let stats = t.train(2, |_| true).unwrap();
    assert!(stats.iter().all(|s| s.loss.is_finite()), "{stats:?}");
}
