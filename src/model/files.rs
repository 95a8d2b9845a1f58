//! Finding, identifying and indexing SD model files: diffusers folders and the
//! single-file checkpoints A1111 and ComfyUI keep, mapped to one internal layout.
//! (Named `files`, not `checkpoint`: elsewhere a checkpoint is a training run's state.)

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::config::{ClipConfig, DownBlockKind, ModelConfig, UnetConfig, UpBlockKind, VaeConfig};
use super::scheduler::SchedulerConfig;
use super::weights::{WeightIndex, Weights};
use crate::error::{Error, Result};

pub use crate::embedding::Family;

/// Indexed weights with their configuration.
pub struct LoadedWeights {
    pub weights: Weights,
    pub config: ModelConfig,
    pub family: Family,
    pub source: PathBuf,
}

fn model_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Model {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Indexes an SD 1.x model: a diffusers folder or a single `.safetensors` checkpoint.
/// `config` overrides what is inferred (single files carry no configuration).
pub fn index_model(
    path: &Path,
    dtype: DType,
    device: &Device,
    config: Option<&ModelConfig>,
) -> Result<LoadedWeights> {
    if !path.exists() {
        return Err(model_err(path, "no such file or folder"));
    }
    let loaded = if path.is_dir() {
        index_diffusers_folder(path, dtype, device)?
    } else {
        index_single_file(path, dtype, device, config)?
    };
    if loaded.family != Family::Sd1 {
        return Err(model_err(
            path,
            format!(
                "this is an {} model; sdti trains SD 1.x models (SD 1.4, 1.5 and their fine-tunes)",
                loaded.family.model_name()
            ),
        ));
    }
    Ok(match config {
        Some(c) => LoadedWeights {
            config: c.clone(),
            ..loaded
        },
        None => loaded,
    })
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
    let Some((text, unet)) = diffusers_text_encoder(dir, &mut index)? else {
        return Ok(LoadedWeights {
            weights: index.finish(dtype, device.clone()),
            config: ModelConfig::sd1(),
            family: Family::Sdxl,
            source: dir.to_path_buf(),
        });
    };
    let vae: VaeConfig = read_json(&dir.join("vae/config.json"))?;
    let sched_path = dir.join("scheduler/scheduler_config.json");
    let scheduler = if sched_path.is_file() {
        SchedulerConfig::from_file(&sched_path)?
    } else {
        SchedulerConfig::default()
    };
    let family = family_from_configs(&text, &unet);
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
    Ok(LoadedWeights {
        weights: index.finish(dtype, device.clone()),
        config: ModelConfig {
            family,
            text_encoder_2: None,
            text_encoder: text,
            unet,
            vae,
            scheduler,
        },
        family,
        source: dir.to_path_buf(),
    })
}

/// transformers writes CLIP keys under `text_model.` up to 5.5 and without it from 5.6.
fn text_encoder_name(key: &str) -> Option<String> {
    if key.starts_with("text_model.") {
        Some(format!("text_encoder.{key}"))
    } else if ["embeddings.", "encoder.", "final_layer_norm."]
        .iter()
        .any(|p| key.starts_with(p))
    {
        Some(format!("text_encoder.text_model.{key}"))
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

fn index_single_file(
    path: &Path,
    dtype: DType,
    device: &Device,
    config: Option<&ModelConfig>,
) -> Result<LoadedWeights> {
    let mut index = WeightIndex::default();
    let (keys, family) = map_single_file(path, &mut index)?;
    if family != Family::Sd1 {
        return Ok(LoadedWeights {
            weights: index.finish(dtype, device.clone()),
            config: ModelConfig::sd1(),
            family,
            source: path.to_path_buf(),
        });
    }
    let unet_keys = sub_keys(&keys, "model.diffusion_model.");
    let vae_keys = sub_keys(&keys, "first_stage_model.");
    let text_keys = sub_keys(&keys, "cond_stage_model.transformer.");
    let (unet_cfg, unet_map) = ldm_unet(path, &unet_keys)?;
    let (vae_cfg, vae_map) = ldm_vae(path, &vae_keys)?;
    let text_cfg = match config {
        Some(c) => c.text_encoder.clone(),
        None => ldm_clip_config(path, &text_keys)?,
    };
    for (ldm, name) in unet_map {
        index.alias_last(
            &format!("model.diffusion_model.{ldm}"),
            format!("unet.{name}"),
        );
    }
    for (ldm, name) in vae_map {
        index.alias_last(&format!("first_stage_model.{ldm}"), format!("vae.{name}"));
    }
    alias_ldm_text_encoder(&mut index, &text_keys);
    Ok(LoadedWeights {
        weights: index.finish(dtype, device.clone()),
        config: ModelConfig {
            family,
            text_encoder_2: None,
            text_encoder: text_cfg,
            unet: unet_cfg,
            vae: vae_cfg,
            scheduler: SchedulerConfig::default(),
        },
        family,
        source: path.to_path_buf(),
    })
}

/// Indexes only the CLIP text encoder of an SD 1.x model (a diffusers folder or a single
/// `.safetensors` checkpoint), named under `text_encoder.`: what encoding prompts needs.
/// The checks on the model's family are [`index_model`]'s; UNet and VAE weights are not
/// mapped. `config` overrides the text encoder's configuration.
pub fn index_text_encoder(
    path: &Path,
    dtype: DType,
    device: &Device,
    config: Option<&ClipConfig>,
) -> Result<(Weights, ClipConfig)> {
    if !path.exists() {
        return Err(model_err(path, "no such file or folder"));
    }
    let mut index = WeightIndex::default();
    let (family, text) = if path.is_dir() {
        text_encoder_of_folder(path, &mut index)?
    } else {
        text_encoder_of_file(path, &mut index, config)?
    };
    if family != Family::Sd1 {
        return Err(model_err(
            path,
            format!(
                "this is an {} model; sdti trains SD 1.x models (SD 1.4, 1.5 and their fine-tunes)",
                family.model_name()
            ),
        ));
    }
    let text = config.cloned().unwrap_or(text);
    Ok((index.finish(dtype, device.clone()), text))
}

fn text_encoder_of_folder(dir: &Path, index: &mut WeightIndex) -> Result<(Family, ClipConfig)> {
    Ok(match diffusers_text_encoder(dir, index)? {
        Some((text, unet)) => (family_from_configs(&text, &unet), text),
        None => (Family::Sdxl, ClipConfig::sd1()),
    })
}

/// A diffusers folder's text encoder, mapped under `text_encoder.`, with its config and
/// the UNet's (a small JSON file that tells SD 2.x apart; the UNet's weights stay
/// unread). `None` for SDXL (a second text encoder). Every part must be there.
fn diffusers_text_encoder(
    dir: &Path,
    index: &mut WeightIndex,
) -> Result<Option<(ClipConfig, UnetConfig)>> {
    if dir.join("text_encoder_2").is_dir() {
        return Ok(None);
    }
    for part in ["text_encoder", "unet", "vae"] {
        if !dir.join(part).is_dir() {
            return Err(model_err(
                dir,
                format!("not a diffusers model folder: the '{part}' subfolder is missing"),
            ));
        }
    }
    let text: ClipConfig = read_json(&dir.join("text_encoder/config.json"))?;
    let unet: UnetConfig = read_json(&dir.join("unet/config.json"))?;
    for file in component_files(&dir.join("text_encoder"), "model")? {
        for (key, _) in index.map_file(&file)? {
            if let Some(name) = text_encoder_name(&key) {
                index.alias_last(&key, name);
            }
        }
    }
    Ok(Some((text, unet)))
}

fn text_encoder_of_file(
    path: &Path,
    index: &mut WeightIndex,
    config: Option<&ClipConfig>,
) -> Result<(Family, ClipConfig)> {
    let (keys, family) = map_single_file(path, index)?;
    if family != Family::Sd1 {
        return Ok((family, ClipConfig::sd1()));
    }
    let text_keys = sub_keys(&keys, "cond_stage_model.transformer.");
    let text = match config {
        Some(c) => c.clone(),
        None => ldm_clip_config(path, &text_keys)?,
    };
    alias_ldm_text_encoder(index, &text_keys);
    Ok((family, text))
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
    Ok((keys, family))
}

/// Names a single file's CLIP tensors (`cond_stage_model.transformer.*`, given without
/// that prefix) as the text encoder's.
fn alias_ldm_text_encoder(index: &mut WeightIndex, text_keys: &HashMap<String, Vec<usize>>) {
    for key in text_keys.keys() {
        if let Some(name) = text_encoder_name(key) {
            index.alias_last(&format!("cond_stage_model.transformer.{key}"), name);
        }
    }
}

fn sub_keys(keys: &HashMap<String, Vec<usize>>, prefix: &str) -> HashMap<String, Vec<usize>> {
    keys.iter()
        .filter_map(|(k, s)| k.strip_prefix(prefix).map(|r| (r.to_string(), s.clone())))
        .collect()
}

/// Tells SD 1.x, SD 2.x and SDXL apart by their keys, or says what the file holds.
pub fn family_from_keys(path: &Path, keys: &HashMap<String, Vec<usize>>) -> Result<Family> {
    let has = |p: &str| keys.keys().any(|k| k.starts_with(p));
    if has("conditioner.embedders.") {
        return Ok(Family::Sdxl);
    }
    if has("cond_stage_model.model.") {
        return Ok(Family::Sd2);
    }
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
    if !has("cond_stage_model.transformer.") {
        return Err(model_err(
            path,
            "no 'cond_stage_model.transformer.*' CLIP text encoder keys: not an SD 1.x checkpoint",
        ));
    }
    if !has("first_stage_model.") {
        return Err(model_err(
            path,
            "no 'first_stage_model.*' VAE keys in the checkpoint",
        ));
    }
    if let Some(shape) = keys.get("model.diffusion_model.input_blocks.0.0.weight") {
        if shape.get(1).copied() != Some(4) {
            return Err(model_err(
                path,
                format!(
                    "the UNet takes {} input channels (an inpainting or instruct model?); \
                     sdti trains the standard 4-channel SD 1.x UNet",
                    shape.get(1).copied().unwrap_or(0)
                ),
            ));
        }
    }
    if let Some(shape) =
        keys.get("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    {
        if shape.get(1) == Some(&1024) {
            return Ok(Family::Sd2);
        }
    }
    Ok(Family::Sd1)
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

/// The LDM UNet layout: `input_blocks.N.M`, `middle_block.N`, `output_blocks.N.M`.
/// Returns the configuration read off the shapes and the LDM -> diffusers key map.
fn ldm_unet(
    path: &Path,
    keys: &HashMap<String, Vec<usize>>,
) -> Result<(UnetConfig, Vec<(String, String)>)> {
    let count = |prefix: &str| -> usize {
        keys.keys()
            .filter_map(|k| k.strip_prefix(prefix))
            .filter_map(|r| r.split('.').next()?.parse::<usize>().ok())
            .max()
            .map_or(0, |m| m + 1)
    };
    let n_in = count("input_blocks.");
    let n_out = count("output_blocks.");
    // input_blocks.0 is conv_in; the first downsampler sits right after the first level's resnets.
    let first_op = (1..n_in)
        .find(|i| keys.contains_key(&format!("input_blocks.{i}.0.op.weight")))
        .ok_or_else(|| model_err(path, "UNet: no downsampler ('input_blocks.N.0.op') found"))?;
    let lpb = first_op - 1;
    if lpb == 0 || n_out % (lpb + 1) != 0 {
        return Err(model_err(
            path,
            format!(
                "UNet: {n_out} output blocks do not form levels of {} layers",
                lpb + 1
            ),
        ));
    }
    let levels = n_out / (lpb + 1);
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
        .find(|k| k.ends_with("attn2.to_k.weight"))
        .ok_or_else(|| model_err(path, "UNet: no cross-attention ('attn2.to_k') found"))?;
    let cross_dim = keys[ctx_key].get(1).copied().unwrap_or(0);
    let mut cfg = UnetConfig::sd1_with(boc, lpb, cross_dim);
    cfg.down_block_types = cross
        .iter()
        .map(|&c| DownBlockKind::with_cross_attention(c))
        .collect();
    cfg.up_block_types = cross
        .iter()
        .rev()
        .map(|&c| UpBlockKind::with_cross_attention(c))
        .collect();
    if let Some(s) = keys.get("input_blocks.1.1.proj_in.weight") {
        cfg.use_linear_projection = s.len() == 2;
    }

    let mut map = Vec::with_capacity(keys.len());
    for key in keys.keys() {
        if let Some(name) = ldm_unet_name(key, lpb) {
            map.push((key.clone(), name));
        }
    }
    Ok((cfg, map))
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
        scaling_factor: super::config::SD1_VAE_SCALING_FACTOR,
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

/// The CLIP configuration read off a single file's shapes. Heads are not stored: SD 1.x's
/// CLIP ViT-L/14 uses 64 channels per head.
fn ldm_clip_config(path: &Path, keys: &HashMap<String, Vec<usize>>) -> Result<ClipConfig> {
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
    if hidden == 0 || hidden % 64 != 0 {
        return Err(model_err(
            path,
            format!("CLIP width {hidden} is not a multiple of 64, so its head count is unknown: use the model as a diffusers folder, whose text_encoder/config.json gives it"),
        ));
    }
    Ok(ClipConfig {
        vocab_size: table[0],
        hidden_size: hidden,
        intermediate_size: fc1[0],
        num_hidden_layers: layers,
        num_attention_heads: hidden / 64,
        max_position_embeddings: positions[0],
        hidden_act: "quick_gelu".into(),
        layer_norm_eps: 1e-5,
        projection_dim: None,
        dropped_final_layers: 0,
    })
}
