//! Finding, identifying and indexing SD model files: diffusers folders and the
//! single-file checkpoints A1111 and ComfyUI keep, mapped to one internal layout.
//! (Named `files`, not `checkpoint`: elsewhere a checkpoint is a training run's state.)
//!
//! Internal names are diffusers' and transformers': `text_encoder.text_model.*` (and
//! SDXL's `text_encoder_2.text_model.*`, `text_encoder_2.text_projection.weight`),
//! `unet.*`, `vae.*`. Single files come in three layouts: SD 1.x (`cond_stage_model.
//! transformer.*`, CLIP in transformers' names), SD 2.x (`cond_stage_model.model.*`, or
//! `conditioner.embedders.0.model.*` when saved by Stability's SGM code: OpenCLIP's
//! names, q/k/v packed) and SDXL (`conditioner.embedders.0.transformer.*` for CLIP-L,
//! `conditioner.embedders.1.model.*` for OpenCLIP bigG). The UNet and the VAE use the
//! LDM names in all three.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::config::{
    ClipConfig, DownBlockKind, ModelConfig, PerBlock, UnetConfig, UpBlockKind, VaeConfig,
};
use super::scheduler::{PredictionType, SchedulerConfig};
use super::weights::{WeightIndex, Weights};
use crate::error::{Error, Result};

pub use crate::embedding::Family;

/// Indexed weights with their configuration.
pub struct LoadedWeights {
    pub weights: Weights,
    pub config: ModelConfig,
    pub family: Family,
    pub source: PathBuf,
    /// What the loader decided from clues rather than a configuration (the prediction
    /// type of a single file and the rule that chose it, a marker key it read), one
    /// sentence each, for a front to print.
    pub notes: Vec<String>,
}

/// The text encoder(s) of a model, indexed alone (what encoding prompts needs).
pub struct LoadedTextEncoders {
    /// Weights under `text_encoder.` (and `text_encoder_2.` for SDXL).
    pub weights: Weights,
    pub family: Family,
    pub text_encoder: ClipConfig,
    /// SDXL's second encoder (OpenCLIP bigG).
    pub text_encoder_2: Option<ClipConfig>,
    pub source: PathBuf,
}

fn model_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Model {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Indexes an SD 1.x, SD 2.x or SDXL model: a diffusers folder or a single `.safetensors`
/// checkpoint. `config` replaces what is inferred (single files carry no configuration);
/// it must be for the family the files hold.
pub fn index_model(
    path: &Path,
    dtype: DType,
    device: &Device,
    config: Option<&ModelConfig>,
) -> Result<LoadedWeights> {
    if !path.exists() {
        return Err(model_err(path, "no such file or folder"));
    }
    let mut loaded = if path.is_dir() {
        index_diffusers_folder(path, dtype, device)?
    } else {
        index_single_file(path, dtype, device, config)?
    };
    if let Some(c) = config {
        check_override_family(path, c.family, loaded.family)?;
        let (given, found) = (
            c.scheduler.prediction_type,
            loaded.config.scheduler.prediction_type,
        );
        if given != found {
            loaded.notes.push(format!(
                "the given configuration's prediction type ({}) replaces the one found ({})",
                prediction_name(given),
                prediction_name(found)
            ));
        }
        loaded.config = c.clone();
    }
    Ok(loaded)
}

fn check_override_family(path: &Path, given: Family, found: Family) -> Result<()> {
    if given != found {
        return Err(model_err(
            path,
            format!(
                "the given configuration is for {} but the model is {}",
                given.model_name(),
                found.model_name()
            ),
        ));
    }
    Ok(())
}

fn prediction_name(p: PredictionType) -> &'static str {
    match p {
        PredictionType::Epsilon => "epsilon",
        PredictionType::VPrediction => "v-prediction",
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = crate::io::read::read_text(path, &crate::io::read::MODEL_CONFIG)?;
    serde_json::from_str(&text).map_err(|e| model_err(path, format!("invalid config: {e}")))
}

/// The safetensors files holding one diffusers component.
fn component_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    for name in [
        format!("{stem}.safetensors"),
        format!("{stem}.fp16.safetensors"),
    ] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(vec![p]);
        }
    }
    for name in [
        format!("{stem}.safetensors.index.json"),
        format!("{stem}.safetensors.index.fp16.json"),
    ] {
        let p = dir.join(&name);
        if p.is_file() {
            #[derive(serde::Deserialize)]
            struct ShardIndex {
                weight_map: HashMap<String, String>,
            }
            let index: ShardIndex = read_json(&p)?;
            let shards: BTreeSet<String> = index.weight_map.into_values().collect();
            return Ok(shards.into_iter().map(|s| dir.join(s)).collect());
        }
    }
    let pickled = ["bin", "ckpt", "pt", "pth"]
        .iter()
        .any(|ext| dir.join(format!("{stem}.{ext}")).is_file());
    Err(model_err(
        dir,
        if pickled {
            format!("only pickled weights ({stem}.bin) found: sdti reads safetensors only, convert the model first")
        } else {
            format!("no {stem}.safetensors found")
        },
    ))
}

fn index_diffusers_folder(dir: &Path, dtype: DType, device: &Device) -> Result<LoadedWeights> {
    let mut index = WeightIndex::default();
    let texts = diffusers_text_encoders(dir, &mut index)?;
    let vae: VaeConfig = read_json(&dir.join("vae/config.json"))?;
    let (scheduler, mut notes) = folder_scheduler(dir, texts.family)?;
    let mut unet = texts.unet;
    // SD 2.0's config leaves upcast_attention off, but every SD 2.x is run with f32
    // attention scores (ComfyUI's SD20 attn_precision, A1111's upcast option; 2.1 in
    // f16 overflows without it), so sdti upcasts for the whole family.
    if texts.family == Family::Sd2 && !unet.upcast_attention {
        unet.upcast_attention = true;
        notes.push(
            "SD 2.x: attention scores in f32 (upcast_attention), as for every SD 2.x model".into(),
        );
    }
    for (part, stem) in [
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
    ] {
        for file in component_files(&dir.join(part), stem)? {
            for (key, _) in index.map_file(&file)? {
                index.alias_last(&key, format!("{part}.{key}"));
            }
        }
    }
    let weights = index.finish(dtype, device.clone());
    check_sdxl_projection(dir, texts.family, &weights)?;
    Ok(LoadedWeights {
        weights,
        config: ModelConfig {
            family: texts.family,
            text_encoder: texts.text,
            text_encoder_2: texts.text_2,
            unet,
            vae,
            scheduler,
        },
        family: texts.family,
        source: dir.to_path_buf(),
        notes,
    })
}

/// A folder's `scheduler/scheduler_config.json` (epsilon without one), with a note saying
/// what it gives.
fn folder_scheduler(dir: &Path, family: Family) -> Result<(SchedulerConfig, Vec<String>)> {
    let sched_path = dir.join("scheduler/scheduler_config.json");
    Ok(if sched_path.is_file() {
        let s = SchedulerConfig::from_file(&sched_path)?;
        let note = format!(
            "{} folder: {}{} (scheduler/scheduler_config.json); override with --prediction-type",
            family.model_name(),
            prediction_name(s.prediction_type),
            if s.rescale_betas_zero_snr {
                ", zero terminal SNR"
            } else {
                ""
            }
        );
        (s, vec![note])
    } else {
        let note = format!(
            "{} folder: epsilon (no scheduler/scheduler_config.json); override with --prediction-type",
            family.model_name()
        );
        (SchedulerConfig::default(), vec![note])
    })
}

/// What a model is, read without building it: its family and scheduler (prediction
/// type, zero-SNR rescaling) with notes saying which rule decided, as
/// [`LoadedWeights::notes`] has them. For `sdti inspect` and tests.
#[derive(Clone, Debug)]
pub struct Detection {
    pub family: Family,
    pub scheduler: SchedulerConfig,
    pub notes: Vec<String>,
}

/// Detects a diffusers folder's or a single file's family and prediction type, refusing
/// what sdti does not read (with the reason), and maps no more than those rules read.
pub fn detect_model(path: &Path) -> Result<Detection> {
    if !path.exists() {
        return Err(model_err(path, "no such file or folder"));
    }
    let mut index = WeightIndex::default();
    let (family, (scheduler, notes)) = if path.is_dir() {
        let texts = diffusers_text_encoders(path, &mut index)?;
        (texts.family, folder_scheduler(path, texts.family)?)
    } else {
        let (keys, family) = map_single_file(path, &mut index)?;
        let unet_keys = sub_keys(&keys, "model.diffusion_model.");
        let layout = ldm_unet_layout(path, &unet_keys)?;
        for (ldm, name) in ldm_unet_map(&unet_keys, layout.lpb) {
            index.alias_last(
                &format!("model.diffusion_model.{ldm}"),
                format!("unet.{name}"),
            );
        }
        let weights = index.finish(DType::F32, Device::Cpu);
        (
            family,
            single_file_scheduler(path, family, &keys, &weights, layout.lpb)?,
        )
    };
    Ok(Detection {
        family,
        scheduler,
        notes,
    })
}

/// SDXL's UNet takes the second encoder's pooled vector, which needs its projection.
fn check_sdxl_projection(path: &Path, family: Family, weights: &Weights) -> Result<()> {
    if family == Family::Sdxl && !weights.contains("text_encoder_2.text_projection.weight") {
        return Err(model_err(
            path,
            "SDXL's second text encoder has no text_projection, so the pooled vector the \
             UNet takes cannot be computed (an incomplete conversion?)",
        ));
    }
    Ok(())
}

/// A transformers CLIP key of one text encoder in internal naming under `target`
/// (`text_encoder`, `text_encoder_2`). transformers writes CLIP keys under `text_model.`
/// up to 5.5 and without it from 5.6 (`CLIPTextModelWithProjection` keeps it); the
/// integer `position_ids` buffer is never read.
fn text_encoder_name(target: &str, key: &str) -> Option<String> {
    if key.ends_with("position_ids") {
        None
    } else if key.starts_with("text_model.") {
        Some(format!("{target}.{key}"))
    } else if ["embeddings.", "encoder.", "final_layer_norm."]
        .iter()
        .any(|p| key.starts_with(p))
    {
        Some(format!("{target}.text_model.{key}"))
    } else if key == "text_projection.weight" {
        Some(format!("{target}.{key}"))
    } else {
        None
    }
}

fn family_from_configs(text: &ClipConfig, unet: &UnetConfig) -> Family {
    if unet.addition_embed_type.is_some() {
        Family::Sdxl
    } else if unet.use_linear_projection
        || unet.cross_attention_dim == 1024
        || text.hidden_act == "gelu"
    {
        Family::Sd2
    } else {
        Family::Sd1
    }
}

/// The UNet variants no family trains, from a diffusers `unet/config.json`.
fn refuse_unet_config(dir: &Path, family: Family, unet: &UnetConfig) -> Result<()> {
    if unet.in_channels != 4 {
        return Err(model_err(dir, in_channels_reason(unet.in_channels)));
    }
    if let Some(kind) = &unet.class_embed_type {
        return Err(model_err(
            dir,
            format!(
                "unet/config.json has class_embed_type {kind:?} (an unCLIP or upscaler UNet); \
                 sdti trains text-conditioned UNets only"
            ),
        ));
    }
    match (family, unet.addition_embed_type.as_deref()) {
        (Family::Sdxl, Some("text_time")) | (Family::Sd1 | Family::Sd2, None) => Ok(()),
        (_, other) => Err(model_err(
            dir,
            format!(
                "unet/config.json has addition_embed_type {other:?}, which a {} UNet does not \
                 have (SDXL's is \"text_time\")",
                family.model_name()
            ),
        )),
    }
}

fn in_channels_reason(n: usize) -> String {
    format!(
        "the UNet takes {n} input channels (9: inpainting, 8: instruct-pix2pix, 5: SD 2.x \
         depth, 7: the x4 upscaler); sdti trains the standard 4-channel UNet"
    )
}

fn index_single_file(
    path: &Path,
    dtype: DType,
    device: &Device,
    config: Option<&ModelConfig>,
) -> Result<LoadedWeights> {
    let mut index = WeightIndex::default();
    let (keys, family) = map_single_file(path, &mut index)?;
    let unet_keys = sub_keys(&keys, "model.diffusion_model.");
    let vae_keys = sub_keys(&keys, "first_stage_model.");
    let layout = ldm_unet_layout(path, &unet_keys)?;
    for (ldm, name) in ldm_unet_map(&unet_keys, layout.lpb) {
        index.alias_last(
            &format!("model.diffusion_model.{ldm}"),
            format!("unet.{name}"),
        );
    }
    let (vae_cfg, vae_map) = ldm_vae(path, &vae_keys, family)?;
    for (ldm, name) in vae_map {
        index.alias_last(&format!("first_stage_model.{ldm}"), format!("vae.{name}"));
    }
    let towers = towers_of(path, family, &keys)?;
    for tower in &towers {
        alias_tower(path, &mut index, &keys, tower)?;
    }
    let config = match config {
        Some(c) => {
            check_override_family(path, c.family, family)?;
            c.clone()
        }
        None => {
            let text = tower_config(path, &keys, &towers[0])?;
            let text_2 = towers
                .get(1)
                .map(|t| tower_config(path, &keys, t))
                .transpose()?;
            let pooled = text_2.as_ref().and_then(|c| c.projection_dim);
            ModelConfig {
                family,
                text_encoder: text,
                text_encoder_2: text_2,
                unet: ldm_unet_config(path, &unet_keys, &layout, family, pooled)?,
                vae: vae_cfg,
                scheduler: SchedulerConfig::default(),
            }
        }
    };
    let weights = index.finish(dtype, device.clone());
    check_sdxl_projection(path, family, &weights)?;
    let (scheduler, notes) = single_file_scheduler(path, family, &keys, &weights, layout.lpb)?;
    Ok(LoadedWeights {
        weights,
        config: ModelConfig {
            scheduler,
            ..config
        },
        family,
        source: path.to_path_buf(),
        notes,
    })
}

/// The prediction type (and zero-SNR rescaling) of a single file, which carries no
/// scheduler configuration, with one sentence saying which rule decided. In order: a
/// sidecar `<stem>.yaml` (A1111's convention: its `parameterization`), the `v_pred` /
/// `ztsnr` marker keys (ComfyUI's and Forge's, written by SDXL v-prediction fine-tunes),
/// for SD 2.x ComfyUI's rule (the population std of the last output block's
/// `norm1.bias` above 0.09 means v-prediction), else epsilon.
fn single_file_scheduler(
    path: &Path,
    family: Family,
    keys: &HashMap<String, Vec<usize>>,
    weights: &Weights,
    lpb: usize,
) -> Result<(SchedulerConfig, Vec<String>)> {
    const STD_KEY: &str = "output_blocks.11.1.transformer_blocks.0.norm1.bias";
    let mut scheduler = SchedulerConfig::default();
    let (prediction, why) = if let Some((p, yaml)) = sidecar_parameterization(path)? {
        (p, format!("parameterization in {}", yaml.display()))
    } else if keys.contains_key("v_pred") {
        (
            PredictionType::VPrediction,
            "the file's 'v_pred' marker key".to_string(),
        )
    } else if family == Family::Sd2 {
        let bias = ldm_unet_name(STD_KEY, lpb)
            .map(|n| format!("unet.{n}"))
            .filter(|n| weights.contains(n));
        match bias {
            Some(name) => {
                let v: Vec<f64> = weights
                    .get_raw(&name)?
                    .to_dtype(DType::F64)?
                    .flatten_all()?
                    .to_vec1()?;
                let n = v.len().max(1) as f64;
                let mean = v.iter().sum::<f64>() / n;
                let std = (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n).sqrt();
                if std > 0.09 {
                    (
                        PredictionType::VPrediction,
                        format!("{STD_KEY} std {std:.3} > 0.09, ComfyUI's rule"),
                    )
                } else {
                    (
                        PredictionType::Epsilon,
                        format!("{STD_KEY} std {std:.3} <= 0.09, ComfyUI's rule"),
                    )
                }
            }
            None => (
                PredictionType::Epsilon,
                format!("no {STD_KEY} for ComfyUI's rule, so the default"),
            ),
        }
    } else {
        (
            PredictionType::Epsilon,
            "no sidecar .yaml and no 'v_pred' key, so the default".to_string(),
        )
    };
    scheduler.prediction_type = prediction;
    let mut notes = vec![format!(
        "{} single file: {} ({why}); override with --prediction-type",
        family.model_name(),
        prediction_name(prediction)
    )];
    if keys.contains_key("ztsnr") {
        if prediction == PredictionType::VPrediction {
            scheduler.rescale_betas_zero_snr = true;
            notes.push(
                "zero terminal SNR: the betas are rescaled (the file's 'ztsnr' marker key)".into(),
            );
        } else {
            notes.push(
                "the 'ztsnr' marker key is ignored: ComfyUI applies it to v-prediction models only"
                    .into(),
            );
        }
    }
    Ok((scheduler, notes))
}

/// A1111's sidecar config: `<stem>.yaml` beside the checkpoint, whose
/// `parameterization: "v"` (under `model.params`) makes it a v-prediction model; without
/// the line the LDM default, epsilon, applies.
fn sidecar_parameterization(path: &Path) -> Result<Option<(PredictionType, PathBuf)>> {
    let yaml = path.with_extension("yaml");
    if !yaml.is_file() {
        return Ok(None);
    }
    let text = crate::io::read::read_text(&yaml, &crate::io::read::MODEL_CONFIG)?;
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(value) = line.strip_prefix("parameterization:") else {
            continue;
        };
        let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
        return match value {
            "v" => Ok(Some((PredictionType::VPrediction, yaml))),
            "eps" => Ok(Some((PredictionType::Epsilon, yaml))),
            other => Err(model_err(
                &yaml,
                format!("parameterization {other:?} is not one sdti trains (\"eps\" or \"v\")"),
            )),
        };
    }
    Ok(Some((PredictionType::Epsilon, yaml)))
}

/// Indexes only the text encoder of an SD 1.x or SD 2.x model (a diffusers folder or a
/// single `.safetensors` checkpoint), named under `text_encoder.`: what encoding prompts
/// needs. UNet and VAE weights are not mapped. `config` overrides the text encoder's
/// configuration. SDXL, whose two encoders this cannot return, is refused:
/// [`index_text_encoders`] returns both.
pub fn index_text_encoder(
    path: &Path,
    dtype: DType,
    device: &Device,
    config: Option<&ClipConfig>,
) -> Result<(Weights, ClipConfig)> {
    let loaded = text_encoders(path, dtype, device, config, None, None)?;
    if loaded.family == Family::Sdxl {
        return Err(model_err(
            path,
            "this is an SDXL model, which has two text encoders: load them with \
             index_text_encoders",
        ));
    }
    Ok((loaded.weights, loaded.text_encoder))
}

/// Indexes only the text encoder(s) of a model of any family sdti reads, named under
/// `text_encoder.` (and `text_encoder_2.`); UNet and VAE weights are not mapped.
/// `config`'s text encoders replace what is inferred; its family must be the model's.
pub fn index_text_encoders(
    path: &Path,
    dtype: DType,
    device: &Device,
    config: Option<&ModelConfig>,
) -> Result<LoadedTextEncoders> {
    text_encoders(
        path,
        dtype,
        device,
        config.map(|c| &c.text_encoder),
        config.and_then(|c| c.text_encoder_2.as_ref()),
        config.map(|c| c.family),
    )
}

fn text_encoders(
    path: &Path,
    dtype: DType,
    device: &Device,
    config: Option<&ClipConfig>,
    config_2: Option<&ClipConfig>,
    family: Option<Family>,
) -> Result<LoadedTextEncoders> {
    if !path.exists() {
        return Err(model_err(path, "no such file or folder"));
    }
    let mut index = WeightIndex::default();
    let (found, text, text_2) = if path.is_dir() {
        let t = diffusers_text_encoders(path, &mut index)?;
        (t.family, t.text, t.text_2)
    } else {
        let (keys, found) = map_single_file(path, &mut index)?;
        let towers = towers_of(path, found, &keys)?;
        for tower in &towers {
            alias_tower(path, &mut index, &keys, tower)?;
        }
        let text = match config {
            Some(c) => c.clone(),
            None => tower_config(path, &keys, &towers[0])?,
        };
        let text_2 = match (towers.get(1), config_2) {
            (None, _) => None,
            (Some(_), Some(c)) => Some(c.clone()),
            (Some(t), None) => Some(tower_config(path, &keys, t)?),
        };
        (found, text, text_2)
    };
    if let Some(given) = family {
        check_override_family(path, given, found)?;
    }
    let weights = index.finish(dtype, device.clone());
    check_sdxl_projection(path, found, &weights)?;
    Ok(LoadedTextEncoders {
        weights,
        family: found,
        text_encoder: config.cloned().unwrap_or(text),
        text_encoder_2: config_2.cloned().or(text_2),
        source: path.to_path_buf(),
    })
}

/// A diffusers folder's text encoder(s), mapped, with their configs and the UNet's (a
/// small JSON file that tells the families apart; the UNet's weights stay unread).
struct FolderTexts {
    family: Family,
    text: ClipConfig,
    text_2: Option<ClipConfig>,
    unet: UnetConfig,
}

fn diffusers_text_encoders(dir: &Path, index: &mut WeightIndex) -> Result<FolderTexts> {
    let has_second = dir.join("text_encoder_2").is_dir();
    if has_second && !dir.join("text_encoder").is_dir() {
        return Err(model_err(
            dir,
            "an SDXL refiner (text_encoder_2 without text_encoder): sdti trains base models; \
             textual inversion for the refiner is not supported",
        ));
    }
    for part in ["text_encoder", "unet", "vae"] {
        if !dir.join(part).is_dir() {
            return Err(model_err(
                dir,
                format!("not a diffusers model folder: the '{part}' subfolder is missing"),
            ));
        }
    }
    let mut text: ClipConfig = read_json(&dir.join("text_encoder/config.json"))?;
    let unet: UnetConfig = read_json(&dir.join("unet/config.json"))?;
    text.projection_dim = map_folder_text_encoder(dir, "text_encoder", index)?;
    let text_2 = if has_second {
        let mut c: ClipConfig = read_json(&dir.join("text_encoder_2/config.json"))?;
        c.projection_dim = map_folder_text_encoder(dir, "text_encoder_2", index)?;
        Some(c)
    } else {
        None
    };
    let family = if has_second {
        Family::Sdxl
    } else {
        family_from_configs(&text, &unet)
    };
    refuse_unet_config(dir, family, &unet)?;
    // diffusers' SD 2.x conversion drops OpenCLIP ViT-H's last block (SD 2.x conditions on
    // the penultimate one, so the folder's last layer is it).
    if family == Family::Sd2 && text.num_hidden_layers == 23 && text.dropped_final_layers == 0 {
        text.dropped_final_layers = 1;
    }
    Ok(FolderTexts {
        family,
        text,
        text_2,
        unet,
    })
}

/// Maps one diffusers text encoder folder under `part.`; returns the width of its
/// `text_projection` when it has one (the config's `projection_dim` is written whether or
/// not the model class has the projection).
fn map_folder_text_encoder(
    dir: &Path,
    part: &str,
    index: &mut WeightIndex,
) -> Result<Option<usize>> {
    let mut projection = None;
    for file in component_files(&dir.join(part), "model")? {
        for (key, shape) in index.map_file(&file)? {
            if let Some(name) = text_encoder_name(part, &key) {
                if key == "text_projection.weight" {
                    projection = shape.first().copied();
                }
                index.alias_last(&key, name);
            }
        }
    }
    Ok(projection)
}

/// Maps a single-file checkpoint's tensors (refusing pickles, which could run code) and
/// tells its family from the keys.
fn map_single_file(
    path: &Path,
    index: &mut WeightIndex,
) -> Result<(HashMap<String, Vec<usize>>, Family)> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if matches!(ext.as_str(), "ckpt" | "pt" | "pth" | "bin") {
        return Err(model_err(
            path,
            "pickled checkpoints (.ckpt/.pt/.bin) are not loaded, since unpickling can run code: \
             use the .safetensors version of the model",
        ));
    }
    let keys: HashMap<String, Vec<usize>> = index.map_file(path)?.into_iter().collect();
    let family = family_from_keys(path, &keys)?;
    let fp8 = keys
        .keys()
        .filter(|k| {
            index.dtype_last(k).is_some_and(|d| {
                matches!(d, safetensors::Dtype::F8_E4M3 | safetensors::Dtype::F8_E5M2)
            })
        })
        .min();
    if let Some(first) = fp8 {
        return Err(model_err(
            path,
            format!(
                "an fp8 checkpoint ('{first}' is stored in 8-bit floats): sdti reads f32, f16 \
                 and bf16 weights; use the f16 version of the model"
            ),
        ));
    }
    Ok((keys, family))
}

/// How a single file stores one text encoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TowerLayout {
    /// transformers' CLIP names (`text_model.encoder.layers.N.self_attn.q_proj.weight`).
    Transformers,
    /// OpenCLIP's (`transformer.resblocks.N.attn.in_proj_weight`, q/k/v packed).
    OpenClip,
}

/// One text encoder of a single file: where its keys are, how they are laid out, and
/// the internal prefix it is named under.
#[derive(Clone, Copy, Debug)]
struct Tower {
    prefix: &'static str,
    layout: TowerLayout,
    target: &'static str,
    /// Read off nothing in the file: CLIP ViT-L uses quick GELU, OpenCLIP the erf GELU.
    hidden_act: &'static str,
}

/// The text encoders of a single file of `family`, in order (SDXL: CLIP-L, then bigG).
fn towers_of(
    path: &Path,
    family: Family,
    keys: &HashMap<String, Vec<usize>>,
) -> Result<Vec<Tower>> {
    let has = |p: &str| keys.keys().any(|k| k.starts_with(p));
    let open_clip = |prefix, target| Tower {
        prefix,
        layout: TowerLayout::OpenClip,
        target,
        hidden_act: "gelu",
    };
    let towers = match family {
        Family::Sd1 => vec![Tower {
            prefix: "cond_stage_model.transformer.",
            layout: TowerLayout::Transformers,
            target: "text_encoder",
            hidden_act: "quick_gelu",
        }],
        Family::Sd2 if has("cond_stage_model.model.") => {
            vec![open_clip("cond_stage_model.model.", "text_encoder")]
        }
        Family::Sd2 if has("conditioner.embedders.0.model.") => {
            vec![open_clip("conditioner.embedders.0.model.", "text_encoder")]
        }
        // OpenCLIP ViT-H already converted to transformers' names.
        Family::Sd2 => vec![Tower {
            prefix: "cond_stage_model.transformer.",
            layout: TowerLayout::Transformers,
            target: "text_encoder",
            hidden_act: "gelu",
        }],
        Family::Sdxl => vec![
            Tower {
                prefix: "conditioner.embedders.0.transformer.",
                layout: TowerLayout::Transformers,
                target: "text_encoder",
                hidden_act: "quick_gelu",
            },
            open_clip("conditioner.embedders.1.model.", "text_encoder_2"),
        ],
    };
    for t in &towers {
        if !has(t.prefix) {
            return Err(model_err(
                path,
                format!(
                    "no '{}*' text encoder keys, which a {} checkpoint has",
                    t.prefix,
                    family.model_name()
                ),
            ));
        }
    }
    Ok(towers)
}

/// What one OpenCLIP text-tower key (prefix stripped) becomes.
enum OpenClipKey {
    /// Renamed as is.
    Plain(String),
    /// `in_proj_weight` / `in_proj_bias`: q, k, v row blocks under `base.{q,k,v}_proj.suffix`.
    Packed { base: String, suffix: &'static str },
    /// `text_projection` (`x @ P`): transformers' Linear weight is its transpose.
    Transposed(String),
}

/// OpenCLIP's text tower in transformers' `CLIPTextModel` names under `T =
/// target.text_model.` (diffusers `convert_open_clip_checkpoint`, ComfyUI
/// `clip_text_transformers_convert`). `logit_scale`, `attn_mask` and unknown keys map to
/// nothing.
fn open_clip_name(target: &str, key: &str) -> Option<OpenClipKey> {
    let t = format!("{target}.text_model.");
    match key {
        "token_embedding.weight" => {
            return Some(OpenClipKey::Plain(format!(
                "{t}embeddings.token_embedding.weight"
            )))
        }
        "positional_embedding" => {
            return Some(OpenClipKey::Plain(format!(
                "{t}embeddings.position_embedding.weight"
            )))
        }
        "text_projection" => {
            return Some(OpenClipKey::Transposed(format!(
                "{target}.text_projection.weight"
            )))
        }
        "text_projection.weight" => {
            return Some(OpenClipKey::Plain(format!(
                "{target}.text_projection.weight"
            )))
        }
        _ => {}
    }
    if let Some(r) = key.strip_prefix("ln_final.") {
        return Some(OpenClipKey::Plain(format!("{t}final_layer_norm.{r}")));
    }
    let rest = key.strip_prefix("transformer.resblocks.")?;
    let (i, rest) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let layer = format!("{t}encoder.layers.{i}.");
    match rest {
        "attn.in_proj_weight" => {
            return Some(OpenClipKey::Packed {
                base: format!("{layer}self_attn."),
                suffix: "weight",
            })
        }
        "attn.in_proj_bias" => {
            return Some(OpenClipKey::Packed {
                base: format!("{layer}self_attn."),
                suffix: "bias",
            })
        }
        _ => {}
    }
    const RENAMES: [(&str, &str); 5] = [
        ("ln_1.", "layer_norm1."),
        ("ln_2.", "layer_norm2."),
        ("attn.out_proj.", "self_attn.out_proj."),
        ("mlp.c_fc.", "mlp.fc1."),
        ("mlp.c_proj.", "mlp.fc2."),
    ];
    RENAMES.iter().find_map(|(old, new)| {
        rest.strip_prefix(old)
            .map(|r| OpenClipKey::Plain(format!("{layer}{new}{r}")))
    })
}

/// Names one text encoder's tensors of a single file (the most recently mapped file of
/// `index`) internally; OpenCLIP's packed q/k/v become three row ranges of one tensor.
fn alias_tower(
    path: &Path,
    index: &mut WeightIndex,
    keys: &HashMap<String, Vec<usize>>,
    tower: &Tower,
) -> Result<()> {
    for (key, shape) in keys {
        let Some(rest) = key.strip_prefix(tower.prefix) else {
            continue;
        };
        match tower.layout {
            TowerLayout::Transformers => {
                if let Some(name) = text_encoder_name(tower.target, rest) {
                    index.alias_last(key, name);
                }
            }
            TowerLayout::OpenClip => match open_clip_name(tower.target, rest) {
                None => {}
                Some(OpenClipKey::Plain(name)) => index.alias_last(key, name),
                Some(OpenClipKey::Transposed(name)) => index.alias_transposed(key, name)?,
                Some(OpenClipKey::Packed { base, suffix }) => {
                    let rows = shape.first().copied().unwrap_or(0);
                    if rows == 0 || !rows.is_multiple_of(3) {
                        return Err(Error::Weight {
                            path: path.to_path_buf(),
                            key: key.clone(),
                            reason: format!(
                                "has shape {shape:?}: packed q/k/v need a first dimension of 3 x width"
                            ),
                        });
                    }
                    let d = rows / 3;
                    for (j, part) in ["q", "k", "v"].iter().enumerate() {
                        index.alias_rows(key, format!("{base}{part}_proj.{suffix}"), j * d, d)?;
                    }
                }
            },
        }
    }
    Ok(())
}

/// A text encoder's configuration read off a single file's shapes. Heads are not stored:
/// CLIP ViT-L/14 and OpenCLIP ViT-H/14 and bigG/14 all use 64 channels per head.
fn tower_config(
    path: &Path,
    keys: &HashMap<String, Vec<usize>>,
    tower: &Tower,
) -> Result<ClipConfig> {
    let sub = sub_keys(keys, tower.prefix);
    match tower.layout {
        TowerLayout::Transformers => ldm_clip_config(path, &sub, tower.hidden_act),
        TowerLayout::OpenClip => open_clip_config(path, &sub),
    }
}

fn open_clip_config(path: &Path, keys: &HashMap<String, Vec<usize>>) -> Result<ClipConfig> {
    let get = |name: &str| {
        keys.get(name)
            .ok_or_else(|| model_err(path, format!("OpenCLIP text encoder: '{name}' is missing")))
    };
    let table = get("token_embedding.weight")?;
    let positions = get("positional_embedding")?;
    let fc = get("transformer.resblocks.0.mlp.c_fc.weight")?;
    let layers = keys
        .keys()
        .filter_map(|k| k.strip_prefix("transformer.resblocks."))
        .filter_map(|r| r.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |m| m + 1);
    let projection_dim = match (
        keys.get("text_projection"),
        keys.get("text_projection.weight"),
    ) {
        (Some(p), _) => p.get(1).copied(),
        (None, Some(p)) => p.first().copied(),
        (None, None) => None,
    };
    let hidden = table.get(1).copied().unwrap_or(0);
    Ok(ClipConfig {
        vocab_size: table[0],
        hidden_size: hidden,
        intermediate_size: fc[0],
        num_hidden_layers: layers,
        num_attention_heads: heads_of_64(path, hidden)?,
        max_position_embeddings: positions[0],
        hidden_act: "gelu".into(),
        layer_norm_eps: 1e-5,
        projection_dim,
        dropped_final_layers: 0,
    })
}

fn heads_of_64(path: &Path, hidden: usize) -> Result<usize> {
    if hidden == 0 || !hidden.is_multiple_of(64) {
        return Err(model_err(
            path,
            format!(
                "text encoder width {hidden} is not a multiple of 64, so its head count is \
                 unknown: use the model as a diffusers folder, whose config.json gives it, or \
                 pass a configuration"
            ),
        ));
    }
    Ok(hidden / 64)
}

fn sub_keys(keys: &HashMap<String, Vec<usize>>, prefix: &str) -> HashMap<String, Vec<usize>> {
    keys.iter()
        .filter_map(|(k, s)| k.strip_prefix(prefix).map(|r| (r.to_string(), s.clone())))
        .collect()
}

/// Tells SD 1.x, SD 2.x and SDXL apart by their keys (first match wins: SDXL's second
/// encoder, an SGM-format OpenCLIP encoder alone (SD 2.x at width 1024, the SDXL refiner
/// at 1280), OpenCLIP under `cond_stage_model.model.` or a 1024-wide cross-attention
/// (SD 2.x), else SD 1.x), or says what the file holds and why sdti does not train it.
pub fn family_from_keys(path: &Path, keys: &HashMap<String, Vec<usize>>) -> Result<Family> {
    let has = |p: &str| keys.keys().any(|k| k.starts_with(p));
    if !has("model.diffusion_model.") {
        let mut prefixes: Vec<&str> = keys
            .keys()
            .map(|k| k.split('.').next().unwrap_or(""))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .take(8)
            .collect();
        prefixes.sort();
        return Err(model_err(
            path,
            format!(
                "not a Stable Diffusion checkpoint: no 'model.diffusion_model.*' UNet keys \
                 (top-level names found: {}); a LoRA or an embedding file is not a model",
                prefixes.join(", ")
            ),
        ));
    }
    refuse_variants(path, keys)?;
    let adm = keys
        .get("model.diffusion_model.label_emb.0.0.weight")
        .and_then(|s| s.get(1).copied());
    let family = if has("conditioner.embedders.1.model.") {
        Family::Sdxl
    } else if has("conditioner.embedders.0.model.") {
        let width = keys
            .get("conditioner.embedders.0.model.token_embedding.weight")
            .and_then(|s| s.get(1).copied());
        if width == Some(1280) || adm == Some(2560) {
            return Err(model_err(
                path,
                format!(
                    "an SDXL refiner (one OpenCLIP encoder under 'conditioner.embedders.0.model.', \
                     width {}, added conditioning of {} inputs with the aesthetic score): sdti \
                     trains base models; textual inversion for the refiner is not supported",
                    width.map_or("?".into(), |w| w.to_string()),
                    adm.map_or("?".into(), |w| w.to_string()),
                ),
            ));
        }
        Family::Sd2
    } else if has("conditioner.embedders.") {
        return Err(model_err(
            path,
            "an SGM-format checkpoint ('conditioner.embedders.*') with neither SDXL's two text \
             encoders nor SD 2.x's one: not a model sdti knows",
        ));
    } else if has("cond_stage_model.model.") {
        Family::Sd2
    } else if has("cond_stage_model.transformer.") {
        let ctx = keys
            .iter()
            .find(|(k, _)| {
                k.starts_with("model.diffusion_model.") && k.ends_with("attn2.to_k.weight")
            })
            .and_then(|(_, s)| s.get(1).copied());
        if ctx == Some(1024) {
            Family::Sd2
        } else {
            Family::Sd1
        }
    } else {
        return Err(model_err(
            path,
            "no text encoder keys ('cond_stage_model.*' for SD 1.x/2.x, \
             'conditioner.embedders.*' for SDXL) in the checkpoint",
        ));
    };
    if family != Family::Sdxl {
        if let Some(adm) = adm {
            return Err(model_err(
                path,
                format!(
                    "the UNet has an added class/image embedding ('label_emb', {adm} inputs: an \
                     SD 2.x unCLIP or another variant); sdti trains text-conditioned {} UNets \
                     without it",
                    family.model_name()
                ),
            ));
        }
    } else if adm.is_none() {
        return Err(model_err(
            path,
            "an SDXL checkpoint without the UNet's added embedding ('label_emb.0.0'): the \
             pooled text and size conditioning SDXL needs is missing",
        ));
    }
    if !has("first_stage_model.") {
        return Err(model_err(
            path,
            "no 'first_stage_model.*' VAE keys in the checkpoint",
        ));
    }
    Ok(family)
}

/// Variants of every family that sdti does not train: other UNet inputs (inpainting,
/// depth, instruct-pix2pix, upscalers), EDM schedules, fp8 scaling.
fn refuse_variants(path: &Path, keys: &HashMap<String, Vec<usize>>) -> Result<()> {
    let has = |p: &str| keys.keys().any(|k| k.starts_with(p));
    let refuse = |reason: &str| Err(model_err(path, reason));
    if has("depth_model.") {
        return refuse(
            "an SD 2.x depth model ('depth_model.*' keys: the UNet also takes a depth map); \
             sdti trains the standard text-to-image UNet",
        );
    }
    if let Some(shape) = keys.get("model.diffusion_model.input_blocks.0.0.weight") {
        let n = shape.get(1).copied().unwrap_or(0);
        if n != 4 {
            return Err(model_err(path, in_channels_reason(n)));
        }
    }
    if keys.contains_key("edm_mean") || keys.contains_key("edm_std") {
        return refuse(
            "an EDM model ('edm_mean'/'edm_std' keys, as Playground v2.5): its noise schedule \
             is not the DDPM one sdti trains with",
        );
    }
    if has("edm_vpred.") {
        return refuse(
            "an EDM v-prediction model ('edm_vpred.sigma_max' key): its noise schedule is not \
             the DDPM one sdti trains with",
        );
    }
    if keys.contains_key("scaled_fp8") {
        return refuse(
            "an fp8 checkpoint ('scaled_fp8' key): sdti reads f32, f16 and bf16 weights; use \
             the f16 version of the model",
        );
    }
    Ok(())
}

fn shape_at<'a>(
    path: &Path,
    keys: &'a HashMap<String, Vec<usize>>,
    key: &str,
    part: &str,
) -> Result<&'a Vec<usize>> {
    keys.get(key)
        .ok_or_else(|| model_err(path, format!("{part} key '{key}' is missing")))
}

/// The shape of an LDM UNet's block lists: resnets per level and levels.
struct UnetLayout {
    lpb: usize,
    levels: usize,
}

/// The LDM UNet layout: `input_blocks.N.M`, `middle_block.N`, `output_blocks.N.M`.
fn ldm_unet_layout(path: &Path, keys: &HashMap<String, Vec<usize>>) -> Result<UnetLayout> {
    let n_in = count_indices(keys, "input_blocks.");
    let n_out = count_indices(keys, "output_blocks.");
    // input_blocks.0 is conv_in; the first downsampler sits right after the first level's resnets.
    let first_op = (1..n_in)
        .find(|i| keys.contains_key(&format!("input_blocks.{i}.0.op.weight")))
        .ok_or_else(|| model_err(path, "UNet: no downsampler ('input_blocks.N.0.op') found"))?;
    let lpb = first_op - 1;
    if lpb == 0 || !n_out.is_multiple_of(lpb + 1) {
        return Err(model_err(
            path,
            format!(
                "UNet: {n_out} output blocks do not form levels of {} layers",
                lpb + 1
            ),
        ));
    }
    Ok(UnetLayout {
        lpb,
        levels: n_out / (lpb + 1),
    })
}

/// 1 + the largest `N` of keys `prefix.N.*` (0 when there is none).
fn count_indices(keys: &HashMap<String, Vec<usize>>, prefix: &str) -> usize {
    keys.keys()
        .filter_map(|k| k.strip_prefix(prefix))
        .filter_map(|r| r.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |m| m + 1)
}

/// The LDM -> diffusers key map of a UNet.
fn ldm_unet_map(keys: &HashMap<String, Vec<usize>>, lpb: usize) -> Vec<(String, String)> {
    keys.keys()
        .filter_map(|k| ldm_unet_name(k, lpb).map(|n| (k.clone(), n)))
        .collect()
}

/// The UNet configuration read off an LDM UNet's shapes: widths, resnets per level,
/// which levels attend, the context width, transformer depths per level, heads (SD 1.x:
/// 8 per block; SD 2.x and SDXL: 64 channels each, diffusers'
/// `create_unet_diffusers_config_from_ldm`), linear projections (the rank of `proj_in`),
/// SDXL's added embedding (`label_emb`: its input is the pooled width `pooled` plus six
/// time-id sinusoids) and f32 attention scores for SD 2.x.
fn ldm_unet_config(
    path: &Path,
    keys: &HashMap<String, Vec<usize>>,
    layout: &UnetLayout,
    family: Family,
    pooled: Option<usize>,
) -> Result<UnetConfig> {
    let UnetLayout { lpb, levels } = *layout;
    let mut boc = Vec::with_capacity(levels);
    let mut cross = Vec::with_capacity(levels);
    for level in 0..levels {
        let first = 1 + level * (lpb + 1);
        let conv = shape_at(
            path,
            keys,
            &format!("input_blocks.{first}.0.in_layers.2.weight"),
            "UNet",
        )?;
        boc.push(conv[0]);
        cross.push(keys.contains_key(&format!("input_blocks.{first}.1.proj_in.weight")));
    }
    let ctx_key = keys
        .keys()
        .filter(|k| k.ends_with("attn2.to_k.weight"))
        .min()
        .ok_or_else(|| model_err(path, "UNet: no cross-attention ('attn2.to_k') found"))?;
    let cross_dim = keys[ctx_key].get(1).copied().unwrap_or(0);
    let mut cfg = UnetConfig::sd1_with(boc.clone(), lpb, cross_dim);
    cfg.down_block_types = cross
        .iter()
        .map(|&c| DownBlockKind::with_cross_attention(c))
        .collect();
    cfg.up_block_types = cross
        .iter()
        .rev()
        .map(|&c| UpBlockKind::with_cross_attention(c))
        .collect();
    if let Some(level) = cross.iter().position(|&c| c) {
        let key = format!("input_blocks.{}.1.proj_in.weight", 1 + level * (lpb + 1));
        cfg.use_linear_projection = keys.get(&key).is_some_and(|s| s.len() == 2);
    }
    if family != Family::Sd1 {
        let heads = boc
            .iter()
            .map(|&c| {
                if c == 0 || !c.is_multiple_of(64) {
                    Err(model_err(
                        path,
                        format!(
                            "UNet width {c} is not a multiple of 64, so its head count is \
                             unknown ({} uses 64-channel heads): use the model as a diffusers \
                             folder, whose unet/config.json gives it, or pass a configuration",
                            family.model_name()
                        ),
                    ))
                } else {
                    Ok(c / 64)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        cfg.attention_head_dim = PerBlock::Each(heads);
    }
    cfg.upcast_attention = family == Family::Sd2;
    cfg.transformer_layers_per_block = transformer_depths(path, keys, layout, &cross)?;
    if let Some(label) = keys.get("label_emb.0.0.weight") {
        let adm = label.get(1).copied().unwrap_or(0);
        let pooled = pooled.ok_or_else(|| {
            model_err(
                path,
                "the UNet's added embedding needs the second text encoder's projection width, \
                 and its text_projection is missing",
            )
        })?;
        if adm <= pooled || !(adm - pooled).is_multiple_of(6) {
            return Err(model_err(
                path,
                format!(
                    "UNet 'label_emb.0.0.weight' takes {adm} inputs, which is not the pooled \
                     width {pooled} plus six time-id sinusoids"
                ),
            ));
        }
        shape_at(path, keys, "label_emb.0.2.weight", "UNet")?;
        cfg.addition_embed_type = Some("text_time".into());
        cfg.projection_class_embeddings_input_dim = Some(adm);
        cfg.addition_time_embed_dim = Some((adm - pooled) / 6);
    }
    Ok(cfg)
}

/// Transformer blocks per attention level, counted from the keys; `None` when every
/// level has one (SD 1.x and 2.x). diffusers' config gives one depth per level (the up
/// blocks mirror the down blocks, the mid block takes the last level's), so a UNet whose
/// blocks differ within a level (distillations such as SSD-1B) is refused by name.
fn transformer_depths(
    path: &Path,
    keys: &HashMap<String, Vec<usize>>,
    layout: &UnetLayout,
    cross: &[bool],
) -> Result<Option<PerBlock>> {
    let UnetLayout { lpb, levels } = *layout;
    let depth = |block: &str| count_indices(keys, &format!("{block}.1.transformer_blocks."));
    let mut depths = Vec::with_capacity(levels);
    let mut found = Vec::new();
    for (level, &attends) in cross.iter().enumerate() {
        if !attends {
            depths.push(1);
            continue;
        }
        let down: Vec<usize> = (0..lpb)
            .map(|j| depth(&format!("input_blocks.{}", 1 + level * (lpb + 1) + j)))
            .collect();
        let up_level = levels - 1 - level;
        let up: Vec<usize> = (0..=lpb)
            .map(|j| depth(&format!("output_blocks.{}", up_level * (lpb + 1) + j)))
            .collect();
        found.push(format!("level {level}: down {down:?}, up {up:?}"));
        let d = down[0];
        if down.iter().chain(&up).any(|&x| x != d) {
            return Err(model_err(
                path,
                format!(
                    "the UNet's transformer depths differ within a level ({}): a distilled \
                     layout (SSD-1B, Vega, KOALA?) that sdti's UNet does not build yet",
                    found.join("; ")
                ),
            ));
        }
        depths.push(d);
    }
    let mid = depth("middle_block");
    let last = depths.last().copied().unwrap_or(1);
    if mid != last {
        return Err(model_err(
            path,
            format!(
                "the UNet's middle block has {mid} transformer blocks and its last level {last}: \
                 a distilled layout that sdti's UNet does not build yet"
            ),
        ));
    }
    Ok(if depths.iter().all(|&d| d == 1) {
        None
    } else {
        Some(PerBlock::Each(depths))
    })
}

/// `rest` with the first matching old prefix of `renames` replaced by its new one.
fn rename_prefix(rest: &str, renames: &[(&str, &str)]) -> String {
    for (old, new) in renames {
        if let Some(r) = rest.strip_prefix(old) {
            return format!("{new}{r}");
        }
    }
    rest.to_string()
}

fn resnet_name(rest: &str) -> String {
    const RENAMES: [(&str, &str); 6] = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ];
    rename_prefix(rest, &RENAMES)
}

fn is_resnet_part(rest: &str) -> bool {
    [
        "in_layers.",
        "emb_layers.",
        "out_layers.",
        "skip_connection.",
    ]
    .iter()
    .any(|p| rest.starts_with(p))
}

/// One LDM UNet key in diffusers naming (the inverse of what diffusers'
/// `convert_ldm_unet_checkpoint` undoes).
fn ldm_unet_name(key: &str, lpb: usize) -> Option<String> {
    let simple = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
        ("label_emb.0.0.", "add_embedding.linear_1."),
        ("label_emb.0.2.", "add_embedding.linear_2."),
    ];
    for (old, new) in simple {
        if let Some(r) = key.strip_prefix(old) {
            return Some(format!("{new}{r}"));
        }
    }
    let mut parts = key.splitn(4, '.');
    let group = parts.next()?;
    match group {
        "input_blocks" => {
            let i: usize = parts.next()?.parse().ok()?;
            let j: usize = parts.next()?.parse().ok()?;
            let rest = parts.next()?;
            if i == 0 {
                return None;
            }
            let block = (i - 1) / (lpb + 1);
            let layer = (i - 1) % (lpb + 1);
            if layer == lpb {
                let r = rest.strip_prefix("op.")?;
                return Some(format!("down_blocks.{block}.downsamplers.0.conv.{r}"));
            }
            if j == 0 {
                Some(format!(
                    "down_blocks.{block}.resnets.{layer}.{}",
                    resnet_name(rest)
                ))
            } else {
                Some(format!("down_blocks.{block}.attentions.{layer}.{rest}"))
            }
        }
        "middle_block" => {
            let i: usize = parts.next()?.parse().ok()?;
            let rest = key.splitn(3, '.').nth(2)?;
            match i {
                0 => Some(format!("mid_block.resnets.0.{}", resnet_name(rest))),
                1 => Some(format!("mid_block.attentions.0.{rest}")),
                2 => Some(format!("mid_block.resnets.1.{}", resnet_name(rest))),
                _ => None,
            }
        }
        "output_blocks" => {
            let i: usize = parts.next()?.parse().ok()?;
            let j: usize = parts.next()?.parse().ok()?;
            let rest = parts.next()?;
            let block = i / (lpb + 1);
            let layer = i % (lpb + 1);
            if j == 0 {
                Some(format!(
                    "up_blocks.{block}.resnets.{layer}.{}",
                    resnet_name(rest)
                ))
            } else if let Some(r) = rest.strip_prefix("conv.") {
                Some(format!("up_blocks.{block}.upsamplers.0.conv.{r}"))
            } else if is_resnet_part(rest) {
                None
            } else {
                Some(format!("up_blocks.{block}.attentions.{layer}.{rest}"))
            }
        }
        _ => None,
    }
}

/// The LDM VAE layout: `encoder.down.N.block.M`, `decoder.up.N` (in reverse order),
/// `mid.block_1`, `mid.attn_1` (1x1 convolutions for q/k/v).
fn ldm_vae(
    path: &Path,
    keys: &HashMap<String, Vec<usize>>,
    family: Family,
) -> Result<(VaeConfig, Vec<(String, String)>)> {
    let levels = keys
        .keys()
        .filter_map(|k| k.strip_prefix("encoder.down."))
        .filter_map(|r| r.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |m| m + 1);
    if levels == 0 {
        return Err(model_err(
            path,
            "VAE: no 'first_stage_model.encoder.down.*' keys",
        ));
    }
    let lpb = keys
        .keys()
        .filter_map(|k| k.strip_prefix("encoder.down.0.block."))
        .filter_map(|r| r.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |m| m + 1);
    let mut boc = Vec::with_capacity(levels);
    for level in 0..levels {
        let s = shape_at(
            path,
            keys,
            &format!("encoder.down.{level}.block.0.conv1.weight"),
            "VAE",
        )?;
        boc.push(s[0]);
    }
    let quant = shape_at(path, keys, "quant_conv.weight", "VAE")?;
    let cfg = VaeConfig {
        in_channels: 3,
        out_channels: 3,
        block_out_channels: boc,
        layers_per_block: lpb,
        latent_channels: quant[0] / 2,
        norm_num_groups: 32,
        scaling_factor: match family {
            Family::Sdxl => super::config::SDXL_VAE_SCALING_FACTOR,
            Family::Sd1 | Family::Sd2 => super::config::SD1_VAE_SCALING_FACTOR,
        },
        // A single file says nothing: its VAE is taken as the original's.
        force_upcast: true,
    };
    let map = keys
        .keys()
        .filter_map(|k| ldm_vae_name(k, levels).map(|n| (k.clone(), n)))
        .collect();
    Ok((cfg, map))
}

fn vae_resnet_name(rest: &str) -> String {
    match rest.strip_prefix("nin_shortcut.") {
        Some(r) => format!("conv_shortcut.{r}"),
        None => rest.to_string(),
    }
}

fn vae_attention_name(rest: &str) -> String {
    const RENAMES: [(&str, &str); 5] = [
        ("norm.", "group_norm."),
        ("q.", "to_q."),
        ("k.", "to_k."),
        ("v.", "to_v."),
        ("proj_out.", "to_out.0."),
    ];
    rename_prefix(rest, &RENAMES)
}

fn ldm_vae_name(key: &str, levels: usize) -> Option<String> {
    for (old, new) in [
        ("quant_conv.", "quant_conv."),
        ("post_quant_conv.", "post_quant_conv."),
    ] {
        if let Some(r) = key.strip_prefix(old) {
            return Some(format!("{new}{r}"));
        }
    }
    let (side, rest) = key.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    for (old, new) in [
        ("conv_in.", "conv_in."),
        ("conv_out.", "conv_out."),
        ("norm_out.", "conv_norm_out."),
    ] {
        if let Some(r) = rest.strip_prefix(old) {
            return Some(format!("{side}.{new}{r}"));
        }
    }
    if let Some(r) = rest.strip_prefix("mid.") {
        let (part, r) = r.split_once('.')?;
        return match part {
            "block_1" => Some(format!("{side}.mid_block.resnets.0.{}", vae_resnet_name(r))),
            "block_2" => Some(format!("{side}.mid_block.resnets.1.{}", vae_resnet_name(r))),
            "attn_1" => Some(format!(
                "{side}.mid_block.attentions.0.{}",
                vae_attention_name(r)
            )),
            _ => None,
        };
    }
    let (kind, r) = rest.split_once('.')?;
    let (n, r) = r.split_once('.')?;
    let n: usize = n.parse().ok()?;
    let (block_kind, level) = match (side, kind) {
        ("encoder", "down") => ("down_blocks", n),
        ("decoder", "up") => ("up_blocks", levels.checked_sub(1 + n)?),
        _ => return None,
    };
    if let Some(r) = r.strip_prefix("block.") {
        let (j, r) = r.split_once('.')?;
        return Some(format!(
            "{side}.{block_kind}.{level}.resnets.{j}.{}",
            vae_resnet_name(r)
        ));
    }
    if let Some(r) = r.strip_prefix("downsample.conv.") {
        return Some(format!(
            "{side}.{block_kind}.{level}.downsamplers.0.conv.{r}"
        ));
    }
    if let Some(r) = r.strip_prefix("upsample.conv.") {
        return Some(format!("{side}.{block_kind}.{level}.upsamplers.0.conv.{r}"));
    }
    None
}

/// The configuration of a CLIP in transformers' names read off a single file's shapes.
/// Heads are not stored: CLIP ViT-L/14 uses 64 channels per head.
fn ldm_clip_config(
    path: &Path,
    keys: &HashMap<String, Vec<usize>>,
    hidden_act: &str,
) -> Result<ClipConfig> {
    let pick = |name: &str| -> Option<&Vec<usize>> {
        keys.get(&format!("text_model.{name}"))
            .or_else(|| keys.get(name))
    };
    let table = pick("embeddings.token_embedding.weight")
        .ok_or_else(|| model_err(path, "CLIP: token embedding weight is missing"))?;
    let positions = pick("embeddings.position_embedding.weight")
        .ok_or_else(|| model_err(path, "CLIP: position embedding weight is missing"))?;
    let fc1 = pick("encoder.layers.0.mlp.fc1.weight")
        .ok_or_else(|| model_err(path, "CLIP: encoder layer 0 is missing"))?;
    let layers = keys
        .keys()
        .filter_map(|k| {
            k.strip_prefix("text_model.")
                .unwrap_or(k)
                .strip_prefix("encoder.layers.")
        })
        .filter_map(|r| r.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |m| m + 1);
    let hidden = table.get(1).copied().unwrap_or(0);
    Ok(ClipConfig {
        vocab_size: table[0],
        hidden_size: hidden,
        intermediate_size: fc1[0],
        num_hidden_layers: layers,
        num_attention_heads: heads_of_64(path, hidden)?,
        max_position_embeddings: positions[0],
        hidden_act: hidden_act.into(),
        layer_norm_eps: 1e-5,
        projection_dim: keys
            .get("text_projection.weight")
            .and_then(|s| s.first().copied()),
        dropped_final_layers: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    type Keys = HashMap<String, Vec<usize>>;

    /// The shapes config inference reads of an LDM UNet (no prefix): `depths[level]`
    /// transformer blocks per attention (0: no attention), the up blocks' depths by
    /// `up_depths` (default: the same), `mid` in the middle block.
    fn ldm_unet_keys(
        boc: &[usize],
        lpb: usize,
        depths: &[usize],
        up_depths: Option<&[usize]>,
        mid: usize,
        ctx: usize,
    ) -> Keys {
        let mut k = Keys::new();
        let levels = boc.len();
        let linear = |k: &mut Keys, block: String, c: usize, depth: usize| {
            if depth == 0 {
                return;
            }
            k.insert(format!("{block}.1.proj_in.weight"), vec![c, c]);
            for n in 0..depth {
                k.insert(
                    format!("{block}.1.transformer_blocks.{n}.attn2.to_k.weight"),
                    vec![c, ctx],
                );
                k.insert(
                    format!("{block}.1.transformer_blocks.{n}.norm1.bias"),
                    vec![c],
                );
            }
        };
        k.insert("input_blocks.0.0.weight".into(), vec![boc[0], 4, 3, 3]);
        for (level, &c) in boc.iter().enumerate() {
            for j in 0..lpb {
                let block = format!("input_blocks.{}", 1 + level * (lpb + 1) + j);
                k.insert(format!("{block}.0.in_layers.2.weight"), vec![c, c, 3, 3]);
                linear(&mut k, block, c, depths[level]);
            }
            if level + 1 < levels {
                k.insert(
                    format!("input_blocks.{}.0.op.weight", 1 + level * (lpb + 1) + lpb),
                    vec![c, c, 3, 3],
                );
            }
            let up = up_depths.unwrap_or(depths)[level];
            let u = levels - 1 - level;
            for j in 0..=lpb {
                let block = format!("output_blocks.{}", u * (lpb + 1) + j);
                k.insert(format!("{block}.0.in_layers.2.weight"), vec![c, c, 3, 3]);
                linear(&mut k, block, c, up);
            }
        }
        let last = boc[levels - 1];
        linear(&mut k, "middle_block".into(), last, mid);
        k
    }

    fn family_of(keys: &[(&str, &[usize])]) -> Result<Family> {
        let mut k: Keys = keys
            .iter()
            .map(|(k, s)| (k.to_string(), s.to_vec()))
            .collect();
        k.insert(
            "model.diffusion_model.input_blocks.0.0.weight".into(),
            vec![320, 4, 3, 3],
        );
        k.insert(
            "first_stage_model.quant_conv.weight".into(),
            vec![8, 8, 1, 1],
        );
        family_from_keys(Path::new("m.safetensors"), &k)
    }

    #[test]
    fn families_from_keys_follow_the_rule_order() -> Result<()> {
        let adm: (&str, &[usize]) = ("model.diffusion_model.label_emb.0.0.weight", &[1280, 2816]);
        let clip_l: (&str, &[usize]) = (
            "cond_stage_model.transformer.text_model.final_layer_norm.weight",
            &[768],
        );
        let ctx = |w: usize| -> Vec<usize> { vec![320, w] };
        let ctx768 = ctx(768);
        let ctx1024 = ctx(1024);
        let to_k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight";
        assert_eq!(family_of(&[clip_l, (to_k, &ctx768)])?, Family::Sd1);
        // OpenCLIP H converted to transformers' names: told by the 1024-wide context.
        assert_eq!(family_of(&[clip_l, (to_k, &ctx1024)])?, Family::Sd2);
        assert_eq!(
            family_of(&[("cond_stage_model.model.ln_final.weight", &[1024])])?,
            Family::Sd2
        );
        // SGM format: one OpenCLIP encoder, 1024 wide (SD 2.x) or 1280 (the refiner).
        let sgm = "conditioner.embedders.0.model.token_embedding.weight";
        assert_eq!(family_of(&[(sgm, &[49408, 1024])])?, Family::Sd2);
        let sgm_unclip = family_of(&[
            (sgm, &[49408, 1024]),
            ("model.diffusion_model.label_emb.0.0.weight", &[1280, 2048]),
        ])
        .unwrap_err()
        .to_string();
        assert!(sgm_unclip.contains("unCLIP"), "{sgm_unclip}");
        let refiner = family_of(&[
            (sgm, &[49408, 1280]),
            ("model.diffusion_model.label_emb.0.0.weight", &[1536, 2560]),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            refiner.contains("refiner") && refiner.contains("2560"),
            "{refiner}"
        );
        let sdxl = [
            (
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                &[768][..],
            ),
            ("conditioner.embedders.1.model.ln_final.weight", &[1280][..]),
            adm,
        ];
        assert_eq!(family_of(&sdxl)?, Family::Sdxl);
        let no_adm = family_of(&sdxl[..2]).unwrap_err().to_string();
        assert!(no_adm.contains("label_emb"), "{no_adm}");
        let unclip = family_of(&[
            ("cond_stage_model.model.ln_final.weight", &[1024]),
            ("model.diffusion_model.label_emb.0.0.weight", &[1280, 1536]),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            unclip.contains("unCLIP") && unclip.contains("1536"),
            "{unclip}"
        );
        Ok(())
    }

    #[test]
    fn variants_are_refused_with_what_was_found() {
        let sdxl = [
            ("conditioner.embedders.1.model.ln_final.weight", &[1280][..]),
            (
                "model.diffusion_model.label_emb.0.0.weight",
                &[1280, 2816][..],
            ),
        ];
        let cases: [(&str, &[usize], &str); 5] = [
            ("edm_mean", &[1, 4, 1, 1], "EDM model"),
            ("edm_vpred.sigma_max", &[], "EDM v-prediction"),
            ("scaled_fp8", &[0], "fp8"),
            (
                "depth_model.model.pretrained.act_postprocess1.0.project.0.weight",
                &[1],
                "depth",
            ),
            (
                "model.diffusion_model.input_blocks.0.0.weight",
                &[320, 9, 3, 3],
                "9 input channels",
            ),
        ];
        for (key, shape, want) in cases {
            let mut keys: Vec<(&str, &[usize])> = sdxl.to_vec();
            keys.push((key, shape));
            let mut k: Keys = keys
                .iter()
                .map(|(k, s)| (k.to_string(), s.to_vec()))
                .collect();
            k.entry("model.diffusion_model.input_blocks.0.0.weight".into())
                .or_insert_with(|| vec![320, 4, 3, 3]);
            let err = family_from_keys(Path::new("m.safetensors"), &k)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(want) && err.contains("m.safetensors"),
                "{key}: {err}"
            );
        }
    }

    #[test]
    fn sd2_unet_config_has_64_channel_heads_and_linear_projections() -> Result<()> {
        let keys = ldm_unet_keys(&[64, 128, 256, 256], 2, &[1, 1, 1, 0], None, 1, 1024);
        let path = Path::new("sd2.safetensors");
        let layout = ldm_unet_layout(path, &keys)?;
        let cfg = ldm_unet_config(path, &keys, &layout, Family::Sd2, None)?;
        assert_eq!(cfg.attention_head_dim, PerBlock::Each(vec![1, 2, 4, 4]));
        assert!(cfg.use_linear_projection && cfg.upcast_attention);
        assert_eq!(cfg.cross_attention_dim, 1024);
        assert_eq!(cfg.transformer_layers_per_block, None);
        assert_eq!(cfg.addition_embed_type, None);
        // SD 1.x keeps 8 heads whatever the width.
        let sd1 = ldm_unet_config(path, &keys, &layout, Family::Sd1, None)?;
        assert_eq!(sd1.attention_head_dim, PerBlock::One(8));
        assert!(!sd1.upcast_attention);
        // A width that is no multiple of 64 leaves the heads unknown.
        let odd = ldm_unet_keys(&[32, 64, 64, 64], 2, &[1, 1, 1, 0], None, 1, 1024);
        let err = ldm_unet_config(path, &odd, &ldm_unet_layout(path, &odd)?, Family::Sd2, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("width 32") && err.contains("64"), "{err}");
        Ok(())
    }

    #[test]
    fn sdxl_unet_config_reads_depths_and_the_added_embedding() -> Result<()> {
        let path = Path::new("sdxl.safetensors");
        let mut keys = ldm_unet_keys(&[64, 128, 256], 2, &[0, 2, 3], None, 3, 160);
        keys.insert("label_emb.0.0.weight".into(), vec![256, 112]);
        keys.insert("label_emb.0.2.weight".into(), vec![256, 256]);
        let layout = ldm_unet_layout(path, &keys)?;
        let cfg = ldm_unet_config(path, &keys, &layout, Family::Sdxl, Some(64))?;
        assert_eq!(
            cfg.down_block_types,
            vec![
                DownBlockKind::Plain,
                DownBlockKind::CrossAttn,
                DownBlockKind::CrossAttn
            ]
        );
        assert_eq!(
            cfg.up_block_types,
            vec![
                UpBlockKind::CrossAttn,
                UpBlockKind::CrossAttn,
                UpBlockKind::Plain
            ]
        );
        assert_eq!(cfg.attention_head_dim, PerBlock::Each(vec![1, 2, 4]));
        assert_eq!(
            cfg.transformer_layers_per_block,
            Some(PerBlock::Each(vec![1, 2, 3]))
        );
        assert!(cfg.use_linear_projection && !cfg.upcast_attention);
        assert_eq!(cfg.addition_embed_type.as_deref(), Some("text_time"));
        assert_eq!(cfg.projection_class_embeddings_input_dim, Some(112));
        assert_eq!(cfg.addition_time_embed_dim, Some(8));
        assert_eq!(
            ldm_unet_name("label_emb.0.2.weight", 2).as_deref(),
            Some("add_embedding.linear_2.weight")
        );
        // Up blocks deeper than down blocks (SSD-1B style) are refused by name.
        let ssd = ldm_unet_keys(&[64, 128, 256], 2, &[0, 2, 4], Some(&[0, 1, 2]), 0, 160);
        let err = ldm_unet_config(
            path,
            &ssd,
            &ldm_unet_layout(path, &ssd)?,
            Family::Sdxl,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("differ within a level") && err.contains("up [1, 1, 1]"),
            "{err}"
        );
        // An input width that is not pooled + 6 sinusoids.
        keys.insert("label_emb.0.0.weight".into(), vec![256, 113]);
        let err = ldm_unet_config(path, &keys, &layout, Family::Sdxl, Some(64))
            .unwrap_err()
            .to_string();
        assert!(err.contains("113"), "{err}");
        Ok(())
    }

    #[test]
    fn open_clip_keys_map_to_transformers_names() -> Result<()> {
        let path = Path::new("sd2.safetensors");
        let mut keys = Keys::new();
        keys.insert("token_embedding.weight".into(), vec![49408, 128]);
        keys.insert("positional_embedding".into(), vec![77, 128]);
        keys.insert("text_projection".into(), vec![128, 96]);
        for i in 0..24 {
            let b = format!("transformer.resblocks.{i}.");
            keys.insert(format!("{b}mlp.c_fc.weight"), vec![512, 128]);
            keys.insert(format!("{b}attn.in_proj_weight"), vec![384, 128]);
        }
        let cfg = open_clip_config(path, &keys)?;
        assert_eq!(
            (
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.num_hidden_layers,
                cfg.num_attention_heads
            ),
            (128, 512, 24, 2)
        );
        assert_eq!(cfg.hidden_act, "gelu");
        assert_eq!(cfg.projection_dim, Some(96));
        keys.remove("text_projection");
        keys.insert("text_projection.weight".into(), vec![80, 128]);
        assert_eq!(open_clip_config(path, &keys)?.projection_dim, Some(80));

        let name = |k: &str| match open_clip_name("te", k) {
            Some(OpenClipKey::Plain(n)) => format!("plain {n}"),
            Some(OpenClipKey::Transposed(n)) => format!("transposed {n}"),
            Some(OpenClipKey::Packed { base, suffix }) => format!("packed {base} {suffix}"),
            None => "none".into(),
        };
        let t = "te.text_model.";
        for (k, want) in [
            (
                "positional_embedding",
                format!("plain {t}embeddings.position_embedding.weight"),
            ),
            ("ln_final.bias", format!("plain {t}final_layer_norm.bias")),
            (
                "text_projection",
                "transposed te.text_projection.weight".into(),
            ),
            (
                "text_projection.weight",
                "plain te.text_projection.weight".into(),
            ),
            (
                "transformer.resblocks.23.ln_1.weight",
                format!("plain {t}encoder.layers.23.layer_norm1.weight"),
            ),
            (
                "transformer.resblocks.3.ln_2.bias",
                format!("plain {t}encoder.layers.3.layer_norm2.bias"),
            ),
            (
                "transformer.resblocks.3.attn.out_proj.weight",
                format!("plain {t}encoder.layers.3.self_attn.out_proj.weight"),
            ),
            (
                "transformer.resblocks.3.mlp.c_fc.bias",
                format!("plain {t}encoder.layers.3.mlp.fc1.bias"),
            ),
            (
                "transformer.resblocks.3.mlp.c_proj.weight",
                format!("plain {t}encoder.layers.3.mlp.fc2.weight"),
            ),
            (
                "transformer.resblocks.3.attn.in_proj_weight",
                format!("packed {t}encoder.layers.3.self_attn. weight"),
            ),
            (
                "transformer.resblocks.3.attn.in_proj_bias",
                format!("packed {t}encoder.layers.3.self_attn. bias"),
            ),
            ("logit_scale", "none".into()),
            ("attn_mask", "none".into()),
        ] {
            assert_eq!(name(k), want, "{k}");
        }
        Ok(())
    }

    #[test]
    fn transformers_text_keys_with_and_without_the_prefix() {
        for (key, want) in [
            (
                "text_model.encoder.layers.0.mlp.fc1.weight",
                Some("te.text_model.encoder.layers.0.mlp.fc1.weight"),
            ),
            (
                "encoder.layers.0.mlp.fc1.weight",
                Some("te.text_model.encoder.layers.0.mlp.fc1.weight"),
            ),
            (
                "final_layer_norm.bias",
                Some("te.text_model.final_layer_norm.bias"),
            ),
            ("text_projection.weight", Some("te.text_projection.weight")),
            ("text_model.embeddings.position_ids", None),
            ("logit_scale", None),
        ] {
            assert_eq!(text_encoder_name("te", key).as_deref(), want, "{key}");
        }
    }
}
