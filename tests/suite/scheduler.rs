//! The model's scheduler config reaches training: a diffusers folder that asks for zero
//! terminal SNR trains with diffusers' zero-SNR schedule (tests/fixtures/zero_snr_schedule.json,
//! made by tests/reference/make_zero_snr_schedule.py), and a setting sdti does not
//! implement stops the load, naming the setting and the file.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use sdti::model::{LoadOptions, NoiseSchedule, SdModel};
use sdti::train::loss::{denoising_loss, DenoisingBatch};
use sdti::train::{TrainConfig, Trainer};
use serde_json::Value;

use crate::common::{fixture, test_device};

/// A copy of tests/fixtures/tiny-sd whose scheduler_config.json has `key` set to `value`.
fn tiny_sd_with(dir: &Path, key: &str, value: Value) -> std::path::PathBuf {
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
    let folder = dir.join("tiny-sd");
    copy_dir(&fixture("tiny-sd"), &folder);
    let path = folder.join("scheduler/scheduler_config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config[key] = value;
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    folder
}

fn load(folder: &Path) -> sdti::error::Result<SdModel> {
    SdModel::load(
        folder,
        &LoadOptions {
            dtype: DType::F32,
            device: test_device(),
            ..LoadOptions::default()
        },
    )
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// `schedule` agrees with diffusers' tables in `want` at the fixture's timesteps, to 1e-6
/// relative (zeros exactly): `alphas_cumprod`, and the betas as `alphas = 1 - betas`, which
/// is what the schedule multiplies. The betas themselves can differ by 4e-5 relative: the
/// zero-SNR rescale takes `sqrt(alphas_cumprod)`, torch's vectorised CPU sqrt is 1 ulp off
/// the correctly rounded one at five of the thousand timesteps (AVX-512, torch 2.15; which
/// ones depends on the CPU), and `1 - ac[t] / ac[t - 1]` turns 1 ulp of `ac` into 1e-7 of a
/// beta near 0.005. sdti rounds correctly, so it does not follow a particular CPU's ulp.
fn assert_schedule_is(schedule: &NoiseSchedule, fx: &Value, want: &str) {
    let ts: Vec<usize> = fx["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(schedule.num_train_timesteps(), 1000);
    let alphas = |betas: Vec<f32>| -> Vec<f32> { betas.iter().map(|b| 1.0 - b).collect() };
    for (table, got, want_values) in [
        (
            "1 - betas",
            alphas(schedule.betas().to_vec()),
            alphas(f32s(&fx[want]["betas"])),
        ),
        (
            "alphas_cumprod",
            schedule.alphas_cumprod().to_vec(),
            f32s(&fx[want]["alphas_cumprod"]),
        ),
    ] {
        assert_eq!(want_values.len(), ts.len());
        for (&t, &w) in ts.iter().zip(&want_values) {
            let g = got[t];
            assert!(
                (f64::from(g) - f64::from(w)).abs() <= 1e-6 * f64::from(w).abs(),
                "{want} {table}[{t}]: sdti {g:e}, diffusers {w:e}"
            );
        }
    }
}

/// `[1, 77]` ids of "a photo of a cat", padded with EOS.
fn prompt_ids() -> Tensor {
    let mut ids = vec![49406u32, 320, 1125, 539, 320, 2368];
    ids.resize(77, 49407);
    Tensor::from_vec(ids, (1, 77), &test_device()).unwrap()
}

/// `mse(unet(sqrt(ac) * latents + sqrt(1 - ac) * noise, t), noise)`, written out with
/// diffusers' `alphas_cumprod[t]` (epsilon prediction).
fn loss_by_hand(model: &SdModel, latents: &Tensor, noise: &Tensor, t: usize, ac: f32) -> f32 {
    let noisy = ((latents * f64::from(ac.sqrt())).unwrap()
        + (noise * f64::from((1.0 - ac).sqrt())).unwrap())
    .unwrap();
    let context = model.text_encoder.forward(&prompt_ids(), None, 1).unwrap();
    let pred = model.unet.forward(&noisy, &[t as f64], &context).unwrap();
    (pred - noise)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn a_zero_snr_folder_trains_with_diffusers_zero_snr_schedule() {
    let text = std::fs::read_to_string(fixture("zero_snr_schedule.json")).unwrap();
    let fx: Value = serde_json::from_str(&text).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let folder = tiny_sd_with(tmp.path(), "rescale_betas_zero_snr", Value::Bool(true));
    let model = Arc::new(load(&folder).unwrap());
    assert!(model.config.scheduler.rescale_betas_zero_snr);
    assert_schedule_is(
        &model.config.scheduler.noise_schedule().unwrap(),
        &fx,
        "scaled_linear_zero_snr",
    );
    // The unchanged folder keeps the ordinary schedule.
    let plain = load(&fixture("tiny-sd")).unwrap();
    assert_schedule_is(
        &plain.config.scheduler.noise_schedule().unwrap(),
        &fx,
        "scaled_linear",
    );

    // The trainer takes the model's schedule, and its loss noises the latents with it: at
    // the last timestep zero SNR leaves no signal, so the UNet sees the noise alone.
    let trainer = Trainer::new(model.clone(), TrainConfig::default()).unwrap();
    let schedule = trainer.noise_schedule();
    assert_schedule_is(schedule, &fx, "scaled_linear_zero_snr");
    assert_eq!(schedule.alphas_cumprod()[999], 0.0);
    let latents = (Tensor::arange(0f32, 256.0, &test_device())
        .unwrap()
        .reshape((1, 4, 8, 8))
        .unwrap()
        * 0.05)
        .unwrap()
        .sin()
        .unwrap();
    let noise = (Tensor::arange(0f32, 256.0, &test_device())
        .unwrap()
        .reshape((1, 4, 8, 8))
        .unwrap()
        * 0.37)
        .unwrap()
        .cos()
        .unwrap();
    let ts: Vec<usize> = fx["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as usize)
        .collect();
    let want_ac = f32s(&fx["scaled_linear_zero_snr"]["alphas_cumprod"]);
    let plain_ac = f32s(&fx["scaled_linear"]["alphas_cumprod"]);
    for t in [500usize, 990, 999] {
        let i = ts.iter().position(|&p| p == t).unwrap();
        let ids = prompt_ids();
        let batch = DenoisingBatch {
            latents: &latents,
            noise: &noise,
            timesteps: &[t],
            ids: &ids,
            injections: &[],
            time_ids: None,
            clip_skip: 1,
        };
        let got = denoising_loss(&model, &batch, schedule)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let want = loss_by_hand(&model, &latents, &noise, t, want_ac[i]);
        assert!(
            ((got - want) / want).abs() <= 1e-6,
            "t={t}: loss {got} vs {want} with diffusers' zero-SNR alphas_cumprod"
        );
        if t == 999 {
            let ordinary = loss_by_hand(&model, &latents, &noise, t, plain_ac[i]);
            assert!(
                ((got - ordinary) / ordinary).abs() > 1e-4,
                "t={t}: the zero-SNR loss {got} equals the ordinary schedule's {ordinary}"
            );
        }
    }
}

#[test]
fn a_scheduler_setting_sdti_does_not_implement_names_the_field_and_the_file() {
    for (key, value) in [
        ("thresholding", Value::Bool(true)),
        ("variance_type", Value::String("learned_range".into())),
        ("trained_sigmas", Value::from(vec![0.1, 0.2])),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let folder = tiny_sd_with(tmp.path(), key, value);
        let err = match load(&folder) {
            Ok(_) => panic!("{key}: the folder loaded"),
            Err(e) => e.to_string(),
        };
        let file = folder.join("scheduler/scheduler_config.json");
        assert!(
            err.contains(&format!("'{key}'")) && err.contains(&file.display().to_string()),
            "{key}: {err}"
        );
    }
}
