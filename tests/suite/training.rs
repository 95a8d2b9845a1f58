//! The training loop on the tiny model: determinism, resume, learning.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use sdti::model::{Recompute, SdModel};
use sdti::train::config::RecomputeMode;
use sdti::train::data::{ImageSource, PixelFormat};
use sdti::train::lr_schedule::{DiffusersLrKind, LrSchedule};
use sdti::train::{TrainConfig, Trainer};

pub use crate::common::tempdir;
use crate::common::tiny_model;
use crate::common::train::{disc_picture, straight_and_resumed, train_config, trainer_with_images};

fn model() -> Arc<SdModel> {
    Arc::new(tiny_model(DType::F32))
}

/// A 64x64 RGB picture: a coloured disc on a background, varying with `k`.
fn concept_image(k: usize) -> ImageSource {
    disc_picture(k, (64, 64), (32.0 + k as f32 * 3.0, 30.0), |x| {
        160 - (x as u8)
    })
}

fn config(steps: u64) -> TrainConfig {
    train_config(steps, 7)
}

/// The tiny SD 1.x with three pictures added.
fn trainer(model: &Arc<SdModel>, cfg: TrainConfig) -> Trainer {
    trainer_with_images(model, cfg, (0..3).map(concept_image))
}

#[test]
fn same_seed_same_vectors_bit_for_bit() {
    let m = model();
    let mut a = trainer(&m, config(4));
    let mut b = trainer(&m, config(4));
    a.train(4, |_| true).unwrap();
    b.train(4, |_| true).unwrap();
    assert_eq!(a.vectors().unwrap(), b.vectors().unwrap());
    let mut c = trainer(
        &m,
        TrainConfig {
            seed: 8,
            ..config(4)
        },
    );
    c.train(4, |_| true).unwrap();
    assert_ne!(a.vectors().unwrap(), c.vectors().unwrap());
}

/// Recompute reruns each block's ops in the same order: the same vectors bit for bit, and
/// a run checkpointed without it resumes with it (it is no option a checkpoint compares).
#[test]
fn recompute_changes_no_bit_and_may_change_on_resume() {
    let m = model();
    let mut off = trainer(&m, config(4));
    off.train(4, |_| true).unwrap();
    let mut on = trainer(&m, config(4));
    let choice = on.choose_recompute(RecomputeMode::On, None);
    assert_eq!(
        (choice.recompute, on.recompute()),
        (Recompute::On, Recompute::On)
    );
    let losses_on = on.train(4, |_| true).unwrap();
    assert_eq!(on.vectors().unwrap(), off.vectors().unwrap());
    assert!(losses_on.iter().all(|s| s.loss.is_finite()));

    let dir = tempdir();
    let ckpt = dir.join("recompute.safetensors");
    let mut first = trainer(&m, config(4));
    first.train(2, |_| true).unwrap();
    first.save_checkpoint(&ckpt).unwrap();
    let mut resumed = trainer(&m, config(4));
    resumed.set_recompute(Recompute::On);
    resumed.load_checkpoint(&ckpt).unwrap();
    resumed.train(2, |_| true).unwrap();
    assert_eq!(resumed.vectors().unwrap(), off.vectors().unwrap());
}

/// Auto recomputes only when the estimated step does not fit the budget; off and on are
/// taken as given whatever the budget.
#[test]
fn auto_recompute_follows_the_memory_budget() {
    let m = model();
    let mut t = trainer(&m, config(1));
    let need = t.step_memory(Recompute::Off).total();
    assert!(t.step_memory(Recompute::On).total() < need);
    let mib = need >> 20;
    let fits = t.choose_recompute(RecomputeMode::Auto, Some(mib + 1));
    assert_eq!(fits.recompute, Recompute::Off, "{fits}");
    assert_eq!(t.recompute(), Recompute::Off);
    // Just under: rerunning some of the transformers when that fits, else every block.
    // The tiny model's choices differ by less than a MiB, so this is every block (the
    // unit test of `RecomputeChoice::decide` takes the partial path).
    let tight = t.choose_recompute(RecomputeMode::Auto, Some(mib - 1));
    assert_ne!(tight.recompute, Recompute::Off, "{tight}");
    assert_eq!(t.recompute(), tight.recompute);
    assert_eq!(tight.peak, t.step_memory(tight.recompute).total());
    assert!(tight.to_string().starts_with("recompute on"), "{tight}");
    // Far under: every block, and a warning.
    let under = t.choose_recompute(RecomputeMode::Auto, Some(1));
    assert_eq!(under.recompute, Recompute::On, "{under}");
    assert!(
        under.to_string().starts_with("recompute on (auto:")
            && under.to_string().contains("may not fit"),
        "{under}"
    );
    assert_eq!(
        t.choose_recompute(RecomputeMode::Off, Some(1)).recompute,
        Recompute::Off
    );
    assert_eq!(
        t.choose_recompute(RecomputeMode::On, Some(1 << 40))
            .recompute,
        Recompute::On
    );
    // Without a budget the CPU's available memory decides: the tiny model fits anywhere.
    let free = t.choose_recompute(RecomputeMode::Auto, None);
    assert_eq!(free.recompute, Recompute::Off, "{free}");
    assert!(free.budget.is_some(), "{free}");
}

#[test]
fn resume_equals_straight_run() {
    let m = model();
    let dir = tempdir();
    let ckpt = dir.join("ckpt.safetensors");
    let (straight, resumed) = straight_and_resumed(|| trainer(&m, config(20)), 20, 10, &ckpt);
    assert_eq!(resumed.vectors().unwrap(), straight.vectors().unwrap());

    // A run with other options refuses the checkpoint.
    let mut other = trainer(
        &m,
        TrainConfig {
            seed: 9,
            ..config(20)
        },
    );
    let err = other.load_checkpoint(&ckpt).unwrap_err().to_string();
    assert!(err.contains("other options"), "{err}");
}

#[test]
fn training_changes_only_the_vectors_and_adamw_matches_torch() {
    // One AdamW step against torch: drive the optimizer with the fixture's gradients by
    // checking the update rule on a trainer whose vectors are the fixture's.
    let exp = crate::common::expected();
    let p0: Vec<f32> = exp["adamw.param0"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let g1: Vec<f32> = exp["adamw.grad1"].flatten_all().unwrap().to_vec1().unwrap();
    let g2: Vec<f32> = exp["adamw.grad2"].flatten_all().unwrap().to_vec1().unwrap();
    let want1: Vec<f32> = exp["adamw.param1"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let want2: Vec<f32> = exp["adamw.param2"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut opt = sdti::train::AdamW::new(0.9, 0.999, 1e-8, 1e-2, None);
    let p = Tensor::from_vec(p0, (2, 32), &Device::Cpu).unwrap();
    let p1 = opt
        .update(
            &p,
            &Tensor::from_vec(g1.clone(), (2, 32), &Device::Cpu).unwrap(),
            5e-3,
        )
        .unwrap();
    let got1: Vec<f32> = p1.flatten_all().unwrap().to_vec1().unwrap();
    let p2 = opt
        .update(
            &p1,
            &Tensor::from_vec(g2.clone(), (2, 32), &Device::Cpu).unwrap(),
            5e-3,
        )
        .unwrap();
    let got2: Vec<f32> = p2.flatten_all().unwrap().to_vec1().unwrap();
    for (g, w) in got1.iter().zip(&want1).chain(got2.iter().zip(&want2)) {
        assert!(
            (g - w).abs() <= 1e-7 + 1e-6 * w.abs(),
            "adamw {g} vs torch {w}"
        );
    }
    // With gradient clipping at 0.1.
    let want_c2: Vec<f32> = exp["adamw_clip.param2"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut clip = sdti::train::AdamW::new(0.9, 0.999, 1e-8, 1e-2, Some(0.1));
    let c1 = clip
        .update(
            &p,
            &Tensor::from_vec(g1, (2, 32), &Device::Cpu).unwrap(),
            5e-3,
        )
        .unwrap();
    let c2 = clip
        .update(
            &c1,
            &Tensor::from_vec(g2, (2, 32), &Device::Cpu).unwrap(),
            5e-3,
        )
        .unwrap();
    let got_c2: Vec<f32> = c2.flatten_all().unwrap().to_vec1().unwrap();
    for (g, w) in got_c2.iter().zip(&want_c2) {
        assert!(
            (g - w).abs() <= 1e-7 + 1e-6 * w.abs(),
            "clipped adamw {g} vs torch {w}"
        );
    }
}

#[test]
fn a_step_needs_images() {
    let m = model();
    let mut t = Trainer::new(m, config(1)).unwrap();
    assert!(t.step().unwrap_err().to_string().contains("no images"));
}

/// A step frees the VAE (its latents are cached); an image added later brings it back,
/// and the run goes on as one with the VAE kept: the same vectors, bit for bit.
/// Steps free the VAE, and a new trainer the token tables' rows no prompt of the run
/// holds; a new image brings the VAE back, and its caption's tokens are kept from the
/// next step on; the vectors are those of a model that keeps everything.
#[test]
fn steps_free_the_vae_and_new_images_bring_it_back() {
    let m = model();
    let captioned = TrainConfig {
        templates: sdti::train::config::Templates::List(vec!["[filewords], [name]".into()]),
        ..config(4)
    };
    let mut t = trainer(&m, captioned.clone());
    // The tables are freed when the trainer is made (the templates' tokens known), the
    // VAE at the first step.
    assert!(m.vae_loaded() && !m.text_encoder.token_table_loaded());
    t.train(2, |_| true).unwrap();
    assert!(!m.vae_loaded());
    assert!(!m.text_encoder.token_table_loaded());
    t.add_image(concept_image(3), Some("a zebra in the snow".into()))
        .unwrap();
    assert!(m.vae_loaded());
    t.train(2, |_| true).unwrap();
    assert!(!m.vae_loaded());
    assert!(
        !m.text_encoder.token_table_loaded(),
        "the caption's tokens are kept"
    );

    // The same run on a model that keeps its VAE (built from weights in memory).
    let files = sdti::model::files::index_model(
        &crate::common::fixture("tiny-sd"),
        DType::F32,
        &crate::common::test_device(),
        None,
    )
    .unwrap();
    let kept = Arc::new(SdModel::from_weights(&files.weights, files.config, files.source).unwrap());
    let mut k = trainer(&kept, captioned);
    k.train(2, |_| true).unwrap();
    k.add_image(concept_image(3), Some("a zebra in the snow".into()))
        .unwrap();
    k.train(2, |_| true).unwrap();
    assert!(kept.vae_loaded() && kept.text_encoder.token_table_loaded());
    assert_eq!(t.vectors().unwrap(), k.vectors().unwrap());
}

#[test]
fn bad_options_name_their_field() {
    let m = model();
    for (cfg, field) in [
        (
            TrainConfig {
                resolution: Some(100),
                ..config(1)
            },
            "resolution",
        ),
        (
            TrainConfig {
                vectors: 0,
                ..config(1)
            },
            "vectors",
        ),
        (
            // A schedule string where diffusers' curve needs one number.
            TrainConfig {
                learning_rate: LrSchedule::parse("0.005:100, 1e-3").unwrap(),
                lr_scheduler: Some(DiffusersLrKind::Cosine),
                ..config(1)
            },
            "learning_rate",
        ),
        (
            TrainConfig {
                token: "two words".into(),
                ..config(1)
            },
            "token",
        ),
    ] {
        let err = Trainer::new(m.clone(), cfg)
            .err()
            .expect("rejected")
            .to_string();
        assert!(err.starts_with(field), "{err}");
    }
    // A malformed rate is refused where the text enters: parsing, or reading config.json.
    assert!(LrSchedule::parse("0.005:abc").is_err());
    let mut json = serde_json::to_value(config(1)).unwrap();
    json["learning_rate"] = "0.005:abc".into();
    let err = serde_json::from_value::<TrainConfig>(json)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("learning_rate"), "{err}");
}

#[test]
fn images_from_files_with_captions_and_clear_errors() {
    let m = model();
    let dir = tempdir().join("images");
    std::fs::create_dir_all(&dir).unwrap();
    let ImageSource::Pixels {
        data,
        width,
        height,
        ..
    } = concept_image(1)
    else {
        unreachable!()
    };
    let png = dir.join("00012-a red ball.png");
    image::RgbImage::from_raw(width, height, data)
        .unwrap()
        .save(&png)
        .unwrap();
    std::fs::write(dir.join("00012-a red ball.txt"), "a shiny red ball").unwrap();
    let mut t = Trainer::new(m.clone(), config(2)).unwrap();
    t.add_image(ImageSource::File(png), None).unwrap();
    t.train(2, |_| true).unwrap();
    assert_eq!(t.step_count(), 2);

    let broken = dir.join("broken.png");
    std::fs::write(&broken, b"\x89PNG\r\n\x1a\n truncated").unwrap();
    let err = t
        .add_image(ImageSource::File(broken.clone()), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("broken.png"), "{err}");
    let err = t
        .add_image(
            ImageSource::Pixels {
                data: vec![0; 10],
                width: 4,
                height: 4,
                stride: 12,
                format: PixelFormat::Rgb8,
            },
            None,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("in-memory image"), "{err}");
    assert_eq!(t.image_count(), 1);
}

/// A trained word exported in every writable format registers in an encoder and
/// conditions a prompt exactly as the trainer's own vectors do.
#[test]
fn exported_words_condition_prompts_like_the_trained_vectors() {
    use sdti::embedding::{Format, Precision};
    use sdti::prompt::encoder::PromptEncoder;
    let m = model();
    let mut t = trainer(&m, config(3));
    t.train(3, |_| true).unwrap();
    let mut direct = PromptEncoder::new(m.text_encoder.clone()).unwrap();
    direct.register("sks", &t.vectors().unwrap()).unwrap();
    let want = direct.encode("a photo of sks on a table").unwrap();
    let dir = tempdir().join("exports");
    std::fs::create_dir_all(&dir).unwrap();
    for format in [
        Format::A1111Pt,
        Format::A1111Safetensors,
        Format::DiffusersSafetensors,
        Format::DiffusersBin,
        Format::A1111Png,
    ] {
        let path = dir.join(format!("sks.{}", format.extension()));
        t.export(
            &path,
            format,
            Precision::F32,
            sdti::embedding::Existing::Replace,
        )
        .unwrap();
        let mut enc = PromptEncoder::new(m.text_encoder.clone()).unwrap();
        let word = enc.register_file(None, &path).unwrap();
        assert_eq!(word, "sks");
        let got = enc.encode("a photo of sks on a table").unwrap();
        let diff = (&got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "{format}");
    }
    // The SDXL layout does not fit an SD 1.x model.
    let sdxl = dir.join("sks-xl.safetensors");
    let mut emb = t.embedding().unwrap();
    let mut g = emb.parts[0].clone();
    g.encoder = sdti::embedding::Encoder::ClipG;
    g.dim = 1280;
    g.data = vec![0.0; 1280 * g.vectors];
    emb.parts[0].encoder = sdti::embedding::Encoder::ClipL;
    emb.parts[0].dim = 768;
    emb.parts[0].data = vec![0.0; 768 * emb.parts[0].vectors];
    emb.parts.push(g);
    sdti::embedding::write_embedding(&sdxl, &emb, Format::SdxlSafetensors, Precision::F16).unwrap();
    let mut enc = PromptEncoder::new(m.text_encoder.clone()).unwrap();
    let err = enc.register_file(None, &sdxl).unwrap_err().to_string();
    assert!(err.contains("SDXL") && err.contains("sks-xl"), "{err}");
}

/// f16 runs scale the loss (torch GradScaler's rules): the steps stay finite, a step
/// whose scaled gradient overflows f16 changes nothing and halves the scale, and the
/// scale survives a checkpoint. bf16 and f32 runs need no scale.
#[test]
fn f16_training_scales_the_loss_and_skips_overflowing_steps() {
    use sdti::train::LossScale;
    let model = Arc::new(tiny_model(DType::F16));
    let mut t = trainer(&model, config(10));
    assert_eq!(t.loss_scale().map(|s| s.scale), Some(LossScale::INITIAL));
    for _ in 0..3 {
        let s = t.step().unwrap();
        assert!(s.loss.is_finite(), "loss {}", s.loss);
    }
    let v = t
        .vectors_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(v.iter().all(|x| x.is_finite()));
    // At 2^16 the tiny model's f16 backward pass may overflow: each such step halves
    // the scale (measured: the first two steps here), then steps go through.
    let ls = t.loss_scale().unwrap();
    let halvings = (LossScale::INITIAL / ls.scale).log2();
    assert!(
        halvings.fract() == 0.0 && halvings + ls.good_steps as f64 <= 3.0 && ls.good_steps >= 1,
        "{ls:?}"
    );

    // A scale no f16 gradient survives: the step is skipped and the scale halved.
    t.set_loss_scale(LossScale {
        scale: 2f64.powi(100),
        good_steps: 5,
    });
    let before = t.vectors_tensor().to_vec2::<f32>().unwrap();
    let s = t.step().unwrap();
    assert_eq!(s.step, 4, "a skipped step still counts");
    assert_eq!(t.vectors_tensor().to_vec2::<f32>().unwrap(), before);
    assert_eq!(
        t.loss_scale(),
        Some(LossScale {
            scale: 2f64.powi(99),
            good_steps: 0
        })
    );

    // The scale is part of the checkpoint.
    let dir = tempdir();
    let ckpt = dir.join("f16.safetensors");
    t.save_checkpoint(&ckpt).unwrap();
    let mut resumed = trainer(&model, config(10));
    resumed.load_checkpoint(&ckpt).unwrap();
    assert_eq!(resumed.loss_scale(), t.loss_scale());

    let f32_run = trainer(&self::model(), config(10));
    assert_eq!(f32_run.loss_scale(), None);
}
