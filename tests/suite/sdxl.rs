//! SDXL: two text encoders, the pooled vector and time ids, two learned tables, against
//! the reference fixtures of tests/reference/make_tiny_sdxl.py.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor, Var};
use sdti::model::config::{ClipConfig, UnetConfig};
use sdti::model::random::{random_weights, tiny_sdxl_config};
use sdti::model::unet::AddedCond;
use sdti::model::weights::{WeightIndex, Weights};
use sdti::model::{ModelConfig, Recompute, Unet};

use crate::common::{assert_close, fixture, test_device, tiny_model};

/// The tensors of the SDXL reference run, on the test device.
fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("tiny-sdxl-expected.safetensors"), &test_device())
        .expect("reference fixture tiny-sdxl-expected.safetensors")
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> T {
    let text = std::fs::read_to_string(path).expect("fixture config");
    serde_json::from_str(&text).expect("fixture config parses")
}

/// The keys and shapes of one safetensors file of the fixture folder.
fn file_keys(path: &Path) -> Vec<(String, Vec<usize>)> {
    WeightIndex::default().map_file(path).expect("fixture file")
}

/// The UNet of the diffusers folder `tiny-sdxl/unet` (config.json and its fp16
/// safetensors), straight through the weight index, in `dtype`.
fn fixture_unet(dtype: DType) -> Unet {
    let dir = fixture("tiny-sdxl/unet");
    let cfg: UnetConfig = read_json(&dir.join("config.json"));
    let mut index = WeightIndex::default();
    for (key, _) in index
        .map_file(&dir.join("diffusion_pytorch_model.safetensors"))
        .expect("fixture unet weights")
    {
        index.alias_last(&key, key.clone());
    }
    let weights = index.finish(dtype, test_device());
    Unet::new(&weights, &cfg).expect("the tiny SDXL UNet builds")
}

fn timesteps(t: &Tensor) -> Vec<f64> {
    t.to_vec1::<i64>()
        .expect("int64 timesteps")
        .into_iter()
        .map(|v| v as f64)
        .collect()
}

fn reference_cond(exp: &HashMap<String, Tensor>) -> AddedCond {
    AddedCond {
        pooled: exp["unet.text_embeds"].clone(),
        time_ids: exp["unet.time_ids"].clone(),
    }
}

/// `add_time_proj` (one sinusoid per time id, `[cos | sin]`, in id order) and
/// `add_embedding` match diffusers, for the two UNet samples and the loss's time ids.
#[test]
fn sdxl_time_ids_embedding() {
    let exp = expected();
    let unet = fixture_unet(DType::F32);
    for (ids, want) in [
        ("unet.time_ids", "unet.add_time_proj"),
        ("loss.time_ids", "loss.add_time_proj"),
    ] {
        let got = unet.added_time_features(&exp[ids]).expect("features");
        assert_close(want, &got, &exp[want], 1e-6);
    }
    let aug = unet
        .added_embedding(&reference_cond(&exp))
        .expect("added embedding");
    assert_close("unet.aug_emb", &aug, &exp["unet.aug_emb"], 1e-5);
}

/// The UNet's prediction for two samples with different timesteps and time ids.
#[test]
fn sdxl_unet_matches_diffusers() {
    let exp = expected();
    let unet = fixture_unet(DType::F32);
    let cond = reference_cond(&exp);
    let pred = unet
        .forward_with(
            &exp["unet.sample"],
            &timesteps(&exp["unet.timesteps"]),
            &exp["unet.context"],
            Some(&cond),
            Recompute::Off,
        )
        .expect("forward");
    assert_close("unet.noise_pred", &pred, &exp["unet.noise_pred"], 1e-4);

    // The time ids reach the prediction: swapped between the samples, it moves.
    let swapped = AddedCond {
        time_ids: Tensor::cat(
            &[
                cond.time_ids.narrow(0, 1, 1).expect("row"),
                cond.time_ids.narrow(0, 0, 1).expect("row"),
            ],
            0,
        )
        .expect("cat"),
        ..cond
    };
    let moved = unet
        .forward_with(
            &exp["unet.sample"],
            &timesteps(&exp["unet.timesteps"]),
            &exp["unet.context"],
            Some(&swapped),
            Recompute::Off,
        )
        .expect("forward");
    assert!(crate::common::rel_err(&moved, &exp["unet.noise_pred"]) > 1e-3);
}

/// An SDXL UNet without added conditioning, an SD 1.x UNet with it and a pooled vector
/// of the wrong width are refused with messages that say what is missing or wrong.
#[test]
fn sdxl_added_conditioning_is_required_and_checked() {
    let exp = expected();
    let unet = fixture_unet(DType::F32);
    assert!(unet.takes_added_cond());
    let (sample, t, ctx) = (
        &exp["unet.sample"],
        timesteps(&exp["unet.timesteps"]),
        &exp["unet.context"],
    );
    let err = unet.forward(sample, &t, ctx).expect_err("no added cond");
    assert!(err.to_string().contains("pooled text vector"), "{err}");

    let narrow = AddedCond {
        pooled: exp["unet.text_embeds"].narrow(1, 0, 40).expect("narrow"),
        time_ids: exp["unet.time_ids"].clone(),
    };
    let err = unet
        .forward_with(sample, &t, ctx, Some(&narrow), Recompute::Off)
        .expect_err("narrow pooled");
    assert!(err.to_string().contains("[2, 40]"), "{err}");

    let sd1 = tiny_model(DType::F32);
    assert!(!sd1.unet.takes_added_cond());
    let sd1_ctx = Tensor::zeros((1, 77, 32), DType::F32, &test_device()).expect("ctx");
    let sd1_sample = Tensor::zeros((1, 4, 8, 8), DType::F32, &test_device()).expect("x");
    let cond = AddedCond {
        pooled: exp["unet.text_embeds"].narrow(0, 0, 1).expect("row"),
        time_ids: exp["unet.time_ids"].narrow(0, 0, 1).expect("row"),
    };
    let err = sd1
        .unet
        .forward_with(&sd1_sample, &[10.0], &sd1_ctx, Some(&cond), Recompute::Off)
        .expect_err("SD 1.x refuses added cond");
    assert!(err.to_string().contains("only SDXL"), "{err}");
}

/// The gradient of a UNet loss with respect to the pooled vector (through
/// add_embedding and every resnet's time projection) and the context agrees with
/// central differences in f64, and recompute gives it bit for bit.
#[test]
fn sdxl_unet_gradient_matches_finite_differences_in_f64() {
    let exp = expected();
    let unet = fixture_unet(DType::F64);
    let f64_of = |t: &Tensor| t.to_dtype(DType::F64).expect("f64");
    // One sample at 8x8 (levels 8, 4, 2).
    let sample = f64_of(
        &exp["unet.sample"]
            .narrow(0, 1, 1)
            .and_then(|s| s.narrow(2, 0, 8)?.narrow(3, 0, 8))
            .expect("crop"),
    );
    let target = f64_of(
        &exp["unet.sample"]
            .narrow(0, 0, 1)
            .and_then(|s| s.narrow(2, 8, 8)?.narrow(3, 8, 8))
            .expect("crop"),
    );
    let context = f64_of(&exp["unet.context"].narrow(0, 1, 1).expect("row"));
    let pooled = f64_of(&exp["unet.text_embeds"].narrow(0, 1, 1).expect("row"));
    let time_ids = exp["unet.time_ids"].narrow(0, 1, 1).expect("row");
    let loss_of = |context: &Tensor, pooled: &Tensor, recompute: Recompute| -> Tensor {
        let cond = AddedCond {
            pooled: pooled.clone(),
            time_ids: time_ids.clone(),
        };
        let pred = unet
            .forward_with(&sample, &[700.0], context, Some(&cond), recompute)
            .expect("forward");
        (pred - &target)
            .and_then(|d| d.sqr()?.mean_all())
            .expect("loss")
    };
    let grads_of = |recompute: Recompute| -> (Vec<f64>, Vec<f64>) {
        let (c, p) = (
            Var::from_tensor(&context).expect("var"),
            Var::from_tensor(&pooled).expect("var"),
        );
        let grads = loss_of(c.as_tensor(), p.as_tensor(), recompute)
            .backward()
            .expect("backward");
        let flat = |v: &Var| -> Vec<f64> {
            grads
                .get(v.as_tensor())
                .expect("a gradient")
                .flatten_all()
                .and_then(|g| g.to_vec1())
                .expect("values")
        };
        (flat(&c), flat(&p))
    };
    let (g_context, g_pooled) = grads_of(Recompute::Off);
    for recompute in [Recompute::On, Recompute::Transformers(0b1)] {
        assert_eq!(
            (g_context.clone(), g_pooled.clone()),
            grads_of(recompute),
            "{recompute:?} changes the gradients"
        );
    }
    assert!(g_pooled.iter().any(|&g| g != 0.0), "no pooled gradient");

    let h = 1e-6;
    let central = |base: &Tensor, i: usize, at: &dyn Fn(&Tensor) -> f64| -> f64 {
        let flat: Vec<f64> = base.flatten_all().and_then(|t| t.to_vec1()).expect("v");
        let moved = |delta: f64| {
            let mut v = flat.clone();
            v[i] += delta;
            Tensor::from_vec(v, base.dims(), base.device()).expect("tensor")
        };
        (at(&moved(h)) - at(&moved(-h))) / (2.0 * h)
    };
    let check = |what: &str, i: usize, grad: f64, fd: f64| {
        assert!(
            (fd - grad).abs() <= 1e-6 * grad.abs().max(1e-3),
            "{what} coordinate {i}: backward {grad} vs central differences {fd}"
        );
    };
    for i in [0usize, 17, 30, 47] {
        let fd = central(&pooled, i, &|p| {
            loss_of(&context, p, Recompute::Off)
                .to_scalar::<f64>()
                .expect("scalar")
        });
        check("pooled", i, g_pooled[i], fd);
    }
    // Context rows: the first token and a later one, in L's and in G's columns.
    for i in [3usize, 40, 5 * 80 + 10, 5 * 80 + 70] {
        let fd = central(&context, i, &|c| {
            loss_of(c, &pooled, Recompute::Off)
                .to_scalar::<f64>()
                .expect("scalar")
        });
        check("context", i, g_context[i], fd);
    }
}

/// `random_weights` gives the tiny SDXL configuration the reference folder's UNet and
/// second-encoder names and shapes (CLIPTextModelWithProjection, `text_projection`).
#[test]
fn sdxl_random_weights_have_the_reference_names_and_shapes() {
    let dir = fixture("tiny-sdxl");
    let mut config: ModelConfig = tiny_sdxl_config();
    config.unet = read_json(&dir.join("unet/config.json"));
    config.text_encoder = read_json::<ClipConfig>(&dir.join("text_encoder/config.json"));
    config.text_encoder_2 = Some(read_json(&dir.join("text_encoder_2/config.json")));
    let random = random_weights(&config, 1).expect("random weights");
    let clip_name = |key: &str| -> Option<String> {
        if key.ends_with("position_ids") {
            None
        } else if key.starts_with("text_model.") || key == "text_projection.weight" {
            Some(key.to_string())
        } else {
            Some(format!("text_model.{key}"))
        }
    };
    for (part, file) in [
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
        ("text_encoder_2", "model.safetensors"),
    ] {
        let mut want: Vec<(String, Vec<usize>)> = file_keys(&dir.join(part).join(file))
            .into_iter()
            .filter_map(|(k, shape)| {
                let name = if part == "unet" {
                    Some(k)
                } else {
                    clip_name(&k)
                };
                name.map(|n| (format!("{part}.{n}"), shape))
            })
            .collect();
        want.sort();
        let prefix = format!("{part}.");
        let mut got: Vec<(String, Vec<usize>)> = random
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(k, t)| (k.clone(), t.dims().to_vec()))
            .collect();
        got.sort();
        assert_eq!(got, want, "{part}");
    }
    assert!(random.contains_key("text_encoder_2.text_projection.weight"));
    // The random UNet of the tiny configuration runs with its added conditioning.
    let tiny = tiny_sdxl_config();
    let weights = Weights::from_tensors(
        random_weights(&tiny, 2).expect("weights"),
        DType::F32,
        test_device(),
    );
    let unet = Unet::new(&weights.pp("unet"), &tiny.unet).expect("unet");
    let dev = test_device();
    let cond = AddedCond {
        pooled: Tensor::ones((1, 48), DType::F32, &dev).expect("pooled"),
        time_ids: Tensor::new(&[[64f32, 64., 0., 0., 64., 64.]], &dev).expect("ids"),
    };
    let x = Tensor::ones((1, 4, 8, 8), DType::F32, &dev).expect("x");
    let ctx = Tensor::ones((1, 77, 80), DType::F32, &dev).expect("ctx");
    let y = unet
        .forward_with(&x, &[500.0], &ctx, Some(&cond), Recompute::Off)
        .expect("forward");
    assert_eq!(y.dims(), &[1, 4, 8, 8]);
}
