//! SDXL training: the denoising loss and the gradients on both learned tables (L and G,
//! through the context and the pooled vector), AdamW on the two tables with their joint
//! gradient norm clipped, and the trainer end to end (time ids from the data, the word
//! exported as `{clip_l, clip_g}`, exact resume), against
//! tests/reference/make_tiny_sdxl.py.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use sdti::embedding::{Encoder, Format};
use sdti::model::unet::AddedCond;
use sdti::model::{Injection, LoadOptions, NoiseSchedule, PredictionType, Recompute, SdModel};
use sdti::train::data::ImageSource;
use sdti::train::loss::{denoising_loss, text_conditioning, DenoisingBatch};
use sdti::train::{AdamW, TrainConfig, Trainer};

use crate::common::train::{
    disc_picture, export_and_read, random_latents, straight_and_resumed, train_config,
    train_finite, trainer_with_images,
};
use crate::common::{
    assert_close, assert_rel, central_differences, checked_schedule, fixture, fixture_model,
    load_options, reference, rel_err, scalar, test_device, tiny_model, ReferencePrompt,
};

fn expected() -> HashMap<String, Tensor> {
    reference("tiny-sdxl-expected.safetensors")
}

/// The tiny SDXL diffusers folder, loaded as users load models.
fn sdxl_model(dtype: DType) -> SdModel {
    fixture_model("tiny-sdxl", dtype)
}

/// The three objectives of the fixture: epsilon, v, and v on the zero-terminal-SNR
/// schedule (NoobAI-style), with their key prefix.
const OBJECTIVES: [(PredictionType, bool, &str); 3] = [
    (PredictionType::Epsilon, false, "loss"),
    (PredictionType::VPrediction, false, "loss_v"),
    (PredictionType::VPrediction, true, "loss_vz"),
];

/// The model's schedule with the objective's prediction type and zero-SNR setting, its
/// `alphas_cumprod` checked against torch's (the zero-SNR rescale is computed in another
/// order than torch's: within an ulp).
fn schedule(
    model: &SdModel,
    exp: &HashMap<String, Tensor>,
    prediction: PredictionType,
    zero_snr: bool,
) -> NoiseSchedule {
    let key = if zero_snr {
        "ddpm.alphas_cumprod_zsnr"
    } else {
        "ddpm.alphas_cumprod"
    };
    let config = model
        .config
        .scheduler
        .with_overrides(Some(prediction), Some(zero_snr));
    checked_schedule(&config, &exp[key], 2e-7)
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
    let prompt = ReferencePrompt::new(&exp["te.input_ids_l"]);
    let (inj_l, inj_g) = (prompt.inject(l), prompt.inject(g));
    let (latents, noise, t) = loss_sample(exp, model.text_encoder.dtype());
    let batch = DenoisingBatch {
        latents: &latents,
        noise: &noise,
        timesteps: &[t],
        ids: &prompt.ids,
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
        assert_rel(
            &format!("{key}: loss"),
            loss,
            scalar(&exp[&format!("{key}.value")]),
            1e-5,
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
    let prompt = ReferencePrompt::new(&exp["te.input_ids_l"]);
    for (detach_context, key) in [
        (true, "loss.grad_g_pooled_only"),
        (false, "loss.grad_g_context_only"),
    ] {
        let (l, g) = vars(&model, &exp);
        let (inj_l, inj_g) = (prompt.inject(l.as_tensor()), prompt.inject(g.as_tensor()));
        let (context, pooled) =
            text_conditioning(&model, &prompt.ids, &[Some(&inj_l), Some(&inj_g)], 2).unwrap();
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
        assert_rel("loss", scalar(&loss), scalar(&exp["loss.value"]), 1e-5);
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
        // diffusers keeps the timestep and time-id sinusoids and alphas_cumprod in f32
        // even in f64 runs: both sides share those constants.
        assert_rel(
            &format!("{key} f64: loss"),
            loss,
            scalar(&exp[&format!("{key}.value_f64")]),
            1e-6,
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
            if which == 0 {
                central_differences(&l0, &coords(0), h, |l| loss_at(l, &g0))
            } else {
                central_differences(&g0, &coords(1), h, |g| loss_at(&l0, g))
            }
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
    let centre = (width as f32 / 2.0 + k as f32 * 4.0, height as f32 / 2.0);
    disc_picture(k, (width, height), centre, |x| (x * 255 / width) as u8)
}

fn config(steps: u64) -> TrainConfig {
    TrainConfig {
        random_crop: true,
        ..train_config(steps, 5)
    }
}

/// The tiny SDXL with two landscape pictures (96 x 64, cropped at random) added.
fn trainer(model: &Arc<SdModel>, cfg: TrainConfig) -> Trainer {
    trainer_with_images(model, cfg, (0..2).map(|k| picture(k, 96, 64)))
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
    let sd2 = Arc::new(fixture_model("tiny-sd2", DType::F32));
    let sd1 = Arc::new(tiny_model(DType::F32));
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
            .unwrap()
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

    train_finite(&mut trainer, 3);
    // Both token tables are freed but the prompts' rows (bigG's padding id among them):
    // no step read either table again.
    assert!(model.vae_releasable(), "loaded from files");
    for te in model.text_encoders() {
        assert!(!te.token_table_loaded());
    }
    let trained = trainer.vector_parts().unwrap();
    assert_ne!(trained[0], init[0], "L's table moved");
    assert_ne!(trained[1], init[1], "G's table moved");

    let dir = tempfile::tempdir().unwrap();
    for format in [Format::SdxlSafetensors, Format::KohyaPt] {
        let path = dir.path().join(format!("sks-{format:?}.safetensors"));
        let back = export_and_read(&trainer, &path, format);
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
    host.add_latents(vec![random_latents()], None).unwrap();
    assert_eq!(
        host.time_ids(0, 0),
        Some([64.0, 64.0, 0.0, 0.0, 64.0, 64.0])
    );
    train_finite(&mut host, 1);
}

/// The SDXL loss refuses a batch without time ids, time ids for a model without the
/// added embedding, and a table count that is not one per encoder, saying which.
#[test]
fn sdxl_loss_checks_its_inputs() {
    let exp = expected();
    let model = sdxl_model(DType::F32);
    let schedule = schedule(&model, &exp, PredictionType::Epsilon, false);
    let prompt = ReferencePrompt::new(&exp["te.input_ids_l"]);
    let inj = prompt.inject(&exp["te.vectors_l"]);
    let (latents, noise, t) = loss_sample(&exp, DType::F32);
    let timesteps = [t];
    let loss = |injections: &[Option<&Injection<'_>>], time_ids: Option<&Tensor>| {
        let batch = DenoisingBatch {
            latents: &latents,
            noise: &noise,
            timesteps: &timesteps,
            ids: &prompt.ids,
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

    let sd1 = tiny_model(DType::F32);
    let sd1_latents = Tensor::zeros((1, 4, 8, 8), DType::F32, &test_device()).unwrap();
    let sd1_batch = DenoisingBatch {
        latents: &sd1_latents,
        noise: &sd1_latents,
        timesteps: &[t],
        ids: &prompt.ids,
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
    let (straight, resumed) = straight_and_resumed(|| trainer(&model, config(4)), 4, 2, &ckpt);
    assert_eq!(
        resumed.vector_parts().unwrap(),
        straight.vector_parts().unwrap()
    );

    // An SD 1.x run refuses the SDXL checkpoint (its table is 32, not 32 + 48, wide).
    let sd1 = Arc::new(tiny_model(DType::F32));
    let same_options = TrainConfig {
        clip_skip: Some(2),
        ..config(4)
    };
    let mut other = trainer(&sd1, same_options);
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
                config,
                ..load_options(dtype)
            },
        )
        .unwrap()
    };
    let half = Arc::new(load("tiny-sdxl", DType::F16, None));
    assert!(half.config.vae.force_upcast);
    assert_eq!(half.config.vae.scaling_factor, 0.13025);
    assert_eq!((half.dtype(), half.vae_dtype()), (DType::F16, DType::F32));
    let dist = half.vae().unwrap().encode(&exp["vae.image"]).unwrap();
    assert_eq!(dist.mean.dtype(), DType::F32);
    assert_close(
        "f32 VAE of an f16 model",
        &dist.mean,
        &exp["vae.latent_mean"],
        1e-4,
    );
    let scaled = half.scale_latents(&dist.mean).unwrap();
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
    train_finite(&mut t, 2);
}
