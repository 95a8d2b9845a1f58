//! Random weights of the SD 1.x, SD 2.x and SDXL architectures for any configuration:
//! the real key names and shapes, for demos, benchmarks and tests when no model file is
//! at hand.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::config::{ClipConfig, ModelConfig, PerBlock, UnetConfig, VaeConfig};
use super::transformer::TransformerConfig;
use super::unet::{down_levels, up_levels, LevelPlan};
use crate::error::Result;
use crate::rng::{Rng, RngState};

/// Tensors of at least this many values are filled in parallel chunks of this size (none
/// of the tiny test configurations' tensors is that large).
const PARALLEL_FILL: usize = 4 << 20;

struct Builder<'a> {
    rng: &'a mut Rng,
    out: HashMap<String, Tensor>,
}

impl Builder<'_> {
    fn normal(&mut self, name: String, shape: &[usize], std: f32) -> Result<()> {
        let mut data = vec![0f32; shape.iter().product()];
        if data.len() < PARALLEL_FILL {
            self.rng.fill_normal(&mut data);
        } else {
            // Large tensors (the real-size model has a billion values) in parallel chunks,
            // each from its own stream of a seed drawn here: still a function of the seed.
            use rayon::prelude::*;
            let root = Rng::new(self.rng.next_u64());
            data.par_chunks_mut(PARALLEL_FILL)
                .enumerate()
                .for_each(|(i, chunk)| root.fork(i as u64).fill_normal(chunk));
        }
        for v in &mut data {
            *v *= std;
        }
        self.out
            .insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        Ok(())
    }

    fn constant(&mut self, name: String, shape: &[usize], value: f32) -> Result<()> {
        let t = Tensor::full(value, shape, &Device::Cpu)?;
        self.out.insert(name, t);
        Ok(())
    }

    /// A weight scaled by `1/sqrt(fan_in)`, so activations keep their size.
    fn weight(&mut self, name: String, shape: &[usize]) -> Result<()> {
        let fan_in: usize = shape[1..].iter().product();
        self.normal(name, shape, 1.0 / (fan_in.max(1) as f32).sqrt())
    }

    fn linear(&mut self, p: &str, out: usize, inp: usize, bias: bool) -> Result<()> {
        self.weight(format!("{p}.weight"), &[out, inp])?;
        if bias {
            self.constant(format!("{p}.bias"), &[out], 0.0)?;
        }
        Ok(())
    }

    fn conv(&mut self, p: &str, out: usize, inp: usize, k: usize) -> Result<()> {
        self.weight(format!("{p}.weight"), &[out, inp, k, k])?;
        self.constant(format!("{p}.bias"), &[out], 0.0)
    }

    fn norm(&mut self, p: &str, c: usize) -> Result<()> {
        self.constant(format!("{p}.weight"), &[c], 1.0)?;
        self.constant(format!("{p}.bias"), &[c], 0.0)
    }

    fn resnet(&mut self, p: &str, inp: usize, out: usize, temb: Option<usize>) -> Result<()> {
        self.norm(&format!("{p}.norm1"), inp)?;
        self.conv(&format!("{p}.conv1"), out, inp, 3)?;
        if let Some(t) = temb {
            self.linear(&format!("{p}.time_emb_proj"), out, t, true)?;
        }
        self.norm(&format!("{p}.norm2"), out)?;
        self.conv(&format!("{p}.conv2"), out, out, 3)?;
        if inp != out {
            self.conv(&format!("{p}.conv_shortcut"), out, inp, 1)?;
        }
        Ok(())
    }

    /// The spatial transformers of config level `block` at `p`.
    fn transformer(&mut self, p: &str, cfg: &UnetConfig, block: usize) -> Result<()> {
        let tc = TransformerConfig::at(cfg, block);
        let (c, cross) = (tc.channels, cfg.cross_attention_dim);
        self.norm(&format!("{p}.norm"), c)?;
        for proj in ["proj_in", "proj_out"] {
            if tc.linear_projection {
                self.linear(&format!("{p}.{proj}"), c, c, true)?;
            } else {
                self.conv(&format!("{p}.{proj}"), c, c, 1)?;
            }
        }
        for i in 0..tc.depth {
            let b = format!("{p}.transformer_blocks.{i}");
            for n in ["norm1", "norm2", "norm3"] {
                self.norm(&format!("{b}.{n}"), c)?;
            }
            for (attn, ctx) in [("attn1", c), ("attn2", cross)] {
                self.linear(&format!("{b}.{attn}.to_q"), c, c, false)?;
                self.linear(&format!("{b}.{attn}.to_k"), c, ctx, false)?;
                self.linear(&format!("{b}.{attn}.to_v"), c, ctx, false)?;
                self.linear(&format!("{b}.{attn}.to_out.0"), c, c, true)?;
            }
            self.linear(&format!("{b}.ff.net.0.proj"), 8 * c, c, true)?;
            self.linear(&format!("{b}.ff.net.2"), c, 4 * c, true)?;
        }
        Ok(())
    }

    /// A text encoder's token table, its first tensor (`p`: its `text_model`).
    fn token_table(&mut self, p: &str, cfg: &ClipConfig) -> Result<()> {
        let shape = [cfg.vocab_size, cfg.hidden_size];
        self.normal(
            format!("{p}.embeddings.token_embedding.weight"),
            &shape,
            0.02,
        )
    }

    /// A CLIP text encoder under `part` (`text_encoder`, `text_encoder_2`), with
    /// transformers' `CLIPTextModelWithProjection` projection when `projection`.
    fn clip(&mut self, part: &str, cfg: &ClipConfig, projection: bool) -> Result<()> {
        let p = &format!("{part}.text_model");
        let d = cfg.hidden_size;
        self.token_table(p, cfg)?;
        self.normal(
            format!("{p}.embeddings.position_embedding.weight"),
            &[cfg.max_position_embeddings, d],
            0.01,
        )?;
        for i in 0..cfg.num_hidden_layers {
            let l = format!("{p}.encoder.layers.{i}");
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                self.linear(&format!("{l}.self_attn.{proj}"), d, d, true)?;
            }
            self.norm(&format!("{l}.layer_norm1"), d)?;
            self.norm(&format!("{l}.layer_norm2"), d)?;
            self.linear(&format!("{l}.mlp.fc1"), cfg.intermediate_size, d, true)?;
            self.linear(&format!("{l}.mlp.fc2"), d, cfg.intermediate_size, true)?;
        }
        self.norm(&format!("{p}.final_layer_norm"), d)?;
        match cfg.projection_dim {
            Some(width) if projection => {
                self.linear(&format!("{part}.text_projection"), width, d, false)
            }
            _ => Ok(()),
        }
    }

    fn unet(&mut self, cfg: &UnetConfig) -> Result<()> {
        let boc = &cfg.block_out_channels;
        let levels = boc.len();
        let c0 = boc[0];
        let temb = 4 * c0;
        self.conv("unet.conv_in", c0, cfg.in_channels, 3)?;
        self.linear("unet.time_embedding.linear_1", temb, c0, true)?;
        self.linear("unet.time_embedding.linear_2", temb, temb, true)?;
        if let Some(input) = cfg.projection_class_embeddings_input_dim {
            self.linear("unet.add_embedding.linear_1", temb, input, true)?;
            self.linear("unet.add_embedding.linear_2", temb, temb, true)?;
        }
        for (i, plan) in down_levels(cfg).iter().enumerate() {
            self.unet_level(&format!("unet.down_blocks.{i}"), plan, cfg, "downsamplers")?;
        }
        let top = boc[levels - 1];
        self.resnet("unet.mid_block.resnets.0", top, top, Some(temb))?;
        self.transformer("unet.mid_block.attentions.0", cfg, levels - 1)?;
        self.resnet("unet.mid_block.resnets.1", top, top, Some(temb))?;
        for (i, plan) in up_levels(cfg).iter().enumerate() {
            self.unet_level(&format!("unet.up_blocks.{i}"), plan, cfg, "upsamplers")?;
        }
        self.norm("unet.conv_norm_out", c0)?;
        self.conv("unet.conv_out", cfg.out_channels, c0, 3)
    }

    /// One down or up level `p` laid out as [`LevelPlan`] says; `resampler` names its
    /// down- or upsampler.
    fn unet_level(
        &mut self,
        p: &str,
        plan: &LevelPlan,
        cfg: &UnetConfig,
        resampler: &str,
    ) -> Result<()> {
        let temb = 4 * cfg.block_out_channels[0];
        let out_c = cfg.block_out_channels[plan.block];
        for (j, &(rin, rout)) in plan.resnets.iter().enumerate() {
            self.resnet(&format!("{p}.resnets.{j}"), rin, rout, Some(temb))?;
            if plan.cross_attention {
                self.transformer(&format!("{p}.attentions.{j}"), cfg, plan.block)?;
            }
        }
        if plan.resample {
            self.conv(&format!("{p}.{resampler}.0.conv"), out_c, out_c, 3)?;
        }
        Ok(())
    }

    fn vae_mid(&mut self, p: &str, c: usize) -> Result<()> {
        self.resnet(&format!("{p}.resnets.0"), c, c, None)?;
        self.norm(&format!("{p}.attentions.0.group_norm"), c)?;
        for proj in ["to_q", "to_k", "to_v", "to_out.0"] {
            self.linear(&format!("{p}.attentions.0.{proj}"), c, c, true)?;
        }
        self.resnet(&format!("{p}.resnets.1"), c, c, None)
    }

    fn vae(&mut self, cfg: &VaeConfig) -> Result<()> {
        let boc = &cfg.block_out_channels;
        let levels = boc.len();
        let top = boc[levels - 1];
        let lat = cfg.latent_channels;
        self.conv("vae.encoder.conv_in", boc[0], cfg.in_channels, 3)?;
        let mut out_c = boc[0];
        for (i, &c) in boc.iter().enumerate() {
            let in_c = out_c;
            out_c = c;
            for j in 0..cfg.layers_per_block {
                let rin = if j == 0 { in_c } else { out_c };
                self.resnet(
                    &format!("vae.encoder.down_blocks.{i}.resnets.{j}"),
                    rin,
                    out_c,
                    None,
                )?;
            }
            if i + 1 < levels {
                self.conv(
                    &format!("vae.encoder.down_blocks.{i}.downsamplers.0.conv"),
                    out_c,
                    out_c,
                    3,
                )?;
            }
        }
        self.vae_mid("vae.encoder.mid_block", top)?;
        self.norm("vae.encoder.conv_norm_out", top)?;
        self.conv("vae.encoder.conv_out", 2 * lat, top, 3)?;
        self.conv("vae.quant_conv", 2 * lat, 2 * lat, 1)?;
        self.conv("vae.post_quant_conv", lat, lat, 1)?;
        self.conv("vae.decoder.conv_in", top, lat, 3)?;
        self.vae_mid("vae.decoder.mid_block", top)?;
        let rev: Vec<usize> = boc.iter().rev().copied().collect();
        let mut out_c = rev[0];
        for (i, &c) in rev.iter().enumerate() {
            let prev = out_c;
            out_c = c;
            for j in 0..cfg.layers_per_block + 1 {
                let rin = if j == 0 { prev } else { out_c };
                self.resnet(
                    &format!("vae.decoder.up_blocks.{i}.resnets.{j}"),
                    rin,
                    out_c,
                    None,
                )?;
            }
            if i + 1 < levels {
                self.conv(
                    &format!("vae.decoder.up_blocks.{i}.upsamplers.0.conv"),
                    out_c,
                    out_c,
                    3,
                )?;
            }
        }
        self.norm("vae.decoder.conv_norm_out", boc[0])?;
        self.conv("vae.decoder.conv_out", cfg.out_channels, boc[0], 3)
    }
}

/// Random f32 CPU weights for `config`, named as [`super::weights::Weights`] expects.
pub fn random_weights(config: &ModelConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    Ok(random_weights_and_states(config, seed)?.0)
}

/// The generator's states where parts of [`random_weights`] begin, from which they are
/// drawn again when the model has freed them.
struct RedrawStates {
    /// The VAE's weights (they come last): [`random_vae_weights`].
    vae: RngState,
    /// Each text encoder's token table (each encoder's first tensor):
    /// [`random_token_table`].
    token_tables: Vec<RngState>,
}

/// [`random_weights`], and where the parts a model frees for training begin.
fn random_weights_and_states(
    config: &ModelConfig,
    seed: u64,
) -> Result<(HashMap<String, Tensor>, RedrawStates)> {
    let mut rng = Rng::new(seed);
    let mut b = Builder {
        rng: &mut rng,
        out: HashMap::new(),
    };
    let mut token_tables = vec![b.rng.state()];
    // SD 2.x's diffusers folders hold a plain CLIPTextModel; SDXL's second encoder is a
    // CLIPTextModelWithProjection.
    b.clip("text_encoder", &config.text_encoder, false)?;
    if let Some(te2) = &config.text_encoder_2 {
        token_tables.push(b.rng.state());
        b.clip("text_encoder_2", te2, true)?;
    }
    b.unet(&config.unet)?;
    let vae = b.rng.state();
    b.vae(&config.vae)?;
    Ok((b.out, RedrawStates { vae, token_tables }))
}

/// A text encoder's token table of [`random_weights`], drawn again from `state`.
fn random_token_table(cfg: &ClipConfig, state: RngState) -> Result<Tensor> {
    let mut rng = Rng::from_state(state)?;
    let mut b = Builder {
        rng: &mut rng,
        out: HashMap::new(),
    };
    b.token_table("", cfg)?;
    b.out
        .into_values()
        .next()
        .ok_or_else(|| crate::error::Error::input("random model", "no token table was drawn"))
}

/// The VAE's weights of [`random_weights`], drawn again from `state`.
fn random_vae_weights(config: &ModelConfig, state: RngState) -> Result<HashMap<String, Tensor>> {
    let mut rng = Rng::from_state(state)?;
    let mut b = Builder {
        rng: &mut rng,
        out: HashMap::new(),
    };
    b.vae(&config.vae)?;
    Ok(b.out)
}

/// A small SD 1.x configuration (the real block structure at widths 32-64) for demos:
/// seconds per step on a CPU.
pub fn tiny_sd1_config() -> ModelConfig {
    let mut config = ModelConfig::sd1();
    config.text_encoder = ClipConfig {
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        ..ClipConfig::sd1()
    };
    config.unet = UnetConfig::sd1_with(vec![32, 32, 64, 64], 1, 64);
    config.vae = VaeConfig {
        block_out_channels: vec![32, 32, 64, 64],
        layers_per_block: 1,
        ..VaeConfig::sd1()
    };
    config
}

/// A small SD 2.x configuration (SD 2.1's block structure, OpenCLIP-style text encoder
/// with GELU, linear projections, 16-channel heads, upcast attention) at widths 32-64.
pub fn tiny_sd2_config() -> ModelConfig {
    let mut config = ModelConfig::sd2_base();
    config.text_encoder = ClipConfig {
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        projection_dim: None,
        // As a diffusers folder holds it: the original's last block dropped.
        dropped_final_layers: 1,
        ..ClipConfig::open_clip_h(3)
    };
    config.unet = UnetConfig {
        attention_head_dim: PerBlock::Each(vec![2, 2, 4, 4]),
        ..UnetConfig::sd1_with(vec![32, 32, 64, 64], 1, 64)
    };
    config.unet.use_linear_projection = true;
    config.unet.upcast_attention = true;
    config.vae = tiny_sd1_config().vae;
    config
}

/// A small SDXL configuration: SDXL's three levels (no attention in the first),
/// transformer depths 1/2/3, two text encoders of different widths (32 and 48, the
/// second with a projection) whose states concatenate to the 80-wide context, and the
/// added embedding of a 48-wide pooled vector and six 8-wide time-id sinusoids (the
/// shapes of tests/reference/make_tiny_sdxl.py's UNet).
pub fn tiny_sdxl_config() -> ModelConfig {
    let mut config = ModelConfig::sdxl();
    config.text_encoder = ClipConfig {
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        ..ClipConfig::sd1()
    };
    config.text_encoder_2 = Some(ClipConfig {
        hidden_size: 48,
        intermediate_size: 96,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        projection_dim: Some(48),
        ..ClipConfig::open_clip_bigg()
    });
    config.unet = UnetConfig {
        block_out_channels: vec![32, 32, 64],
        attention_head_dim: PerBlock::Each(vec![2, 2, 4]),
        transformer_layers_per_block: Some(PerBlock::Each(vec![1, 2, 3])),
        cross_attention_dim: 80,
        addition_time_embed_dim: Some(8),
        projection_class_embeddings_input_dim: Some(6 * 8 + 48),
        ..UnetConfig::sdxl()
    };
    config.vae = VaeConfig {
        scaling_factor: config.vae.scaling_factor,
        ..tiny_sd1_config().vae
    };
    config
}

/// Builds a random model in `dtype` on `device`.
pub fn random_model(
    config: &ModelConfig,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<super::SdModel> {
    random_model_inspected(config, seed, dtype, device, |_| {})
}

/// [`random_model`], showing `inspect` the generated weights ([`random_weights`]'s map)
/// before the model is built from them (the benchmark checks their names and shapes
/// against diffusers').
pub fn random_model_inspected(
    config: &ModelConfig,
    seed: u64,
    dtype: DType,
    device: &Device,
    inspect: impl FnOnce(&HashMap<String, Tensor>),
) -> Result<super::SdModel> {
    let (tensors, states) = random_weights_and_states(config, seed)?;
    inspect(&tensors);
    let weights = super::weights::Weights::handing_over(tensors, dtype, device.clone());
    let mut model = super::SdModel::from_weights(
        &weights,
        config.clone(),
        format!("random {} (seed {seed})", config.family.model_name()).into(),
    )?;
    drop(weights);
    // Released for training (SdModel::release_token_tables), a token table is drawn
    // again, the same, in the encoder's dtype.
    for (encoder, state) in model
        .text_encoders_mut()
        .into_iter()
        .zip(states.token_tables)
    {
        let Some(encoder) = encoder else {
            continue;
        };
        let (cfg, dtype, device) = (encoder.config().clone(), encoder.dtype(), device.clone());
        encoder.set_token_reload(Box::new(move || {
            let table = random_token_table(&cfg, state)?;
            Ok(table.to_dtype(dtype)?.to_device(&device)?)
        }));
    }
    // Released for training (SdModel::release_vae), the VAE is drawn again, the same.
    let (config, device, vae_state) = (config.clone(), device.clone(), states.vae);
    model.set_vae_reload(Box::new(move || {
        let w = super::weights::Weights::handing_over(
            random_vae_weights(&config, vae_state)?,
            dtype,
            device.clone(),
        );
        super::vae_from(&w, &config)
    }));
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::files::index_model;

    /// The generator and the loader agree with the reference checkpoints (SD 1.x and
    /// SD 2.x diffusers folders) on every name and shape: what diffusers writes is what
    /// the random model holds. (SDXL: tests/suite/sdxl.rs.)
    #[test]
    fn random_weights_have_the_reference_names_and_shapes() -> Result<()> {
        for fixture in ["tiny-sd", "tiny-sd2"] {
            let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(fixture);
            let loaded = index_model(&root, DType::F32, &Device::Cpu, None)?;
            let random = random_weights(&loaded.config, 1)?;
            let mut names = loaded.weights.names();
            names.retain(|n| !n.ends_with("position_ids"));
            let mut random_names: Vec<String> = random.keys().cloned().collect();
            random_names.sort();
            assert_eq!(names, random_names, "{fixture}");
            for name in &names {
                let want = loaded.weights.shape_of(name).unwrap_or_default();
                assert_eq!(random[name].dims(), want.as_slice(), "{fixture}: {name}");
            }
        }
        let model = random_model(&tiny_sd1_config(), 3, DType::F32, &Device::Cpu)?;
        assert_eq!(model.config.unet.layers_per_block, 1);
        Ok(())
    }

    /// The tiny SD 2.x and SDXL presets build into models (SDXL's UNet takes the added
    /// conditioning, SD 2.x's upcasts its attention).
    #[test]
    fn tiny_presets_build() -> Result<()> {
        let sd2 = random_model(&tiny_sd2_config(), 3, DType::F32, &Device::Cpu)?;
        assert!(!sd2.unet.takes_added_cond());
        assert!(sd2.config.unet.upcast_attention && sd2.config.unet.use_linear_projection);
        let sdxl = random_model(&tiny_sdxl_config(), 3, DType::F32, &Device::Cpu)?;
        assert!(sdxl.unet.takes_added_cond());
        assert!(sdxl.config.text_encoder_2.is_some());
        Ok(())
    }
}
