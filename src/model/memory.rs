//! How much memory a training step needs, estimated from the model's configuration, so
//! that training can choose [`Recompute`] before the first step instead of running out
//! of memory in it.
//!
//! The estimate walks the UNet as [`Unet::forward_with`](super::Unet::forward_with) runs
//! it and counts what stays alive until the backward pass reaches it:
//!
//! * the tensors between graph nodes, which candle's graph holds until the backward pass
//!   ends (each block's input, the inputs of `conv_in`, of the down- and upsamplers and of
//!   `conv_out`; not the up path's joins with the skips, `apply_block_joined`), with or
//!   without recompute;
//! * what each block keeps for its backward pass (`ResnetSaved`: the first half's output;
//!   `SpatialSaved`: per transformer block its input, the fused q/k/v, both attentions'
//!   queries, outputs and row log-sum-exps, the context keys and values, the two residual
//!   sums and the GEGLU input: 17 activations of the block's width plus the small ones,
//!   of which blocks at most `transformer::REBUILD_WIDTH` wide on activations of at
//!   least `transformer::REBUILD_MIN_ELEMENTS` keep only 3 without recompute). Without
//!   recompute all of them are alive when the backward pass starts, the peak; with
//!   recompute only one block's at a time, rebuilt inside its backward pass, while the
//!   skip connections' gradients wait for the down path;
//! * the largest transient of a block's passes (the convolutions' column buffers, the
//!   feed-forward's gradients);
//! * the weights a step holds (counted from the configuration; the text encoder always in
//!   f32; not the VAE's, which the first step frees: `SdModel::release_vae`, nor the token
//!   tables but their prompts' rows: `SdModel::release_token_tables`), the text
//!   encoder's saved state and a fixed allowance for the process itself.
//!
//! Calibration: `sdti bench --recompute off|on` on a random SD 1.5 (f32, batch 1, one
//! image, 2-core CPU), the peak RSS from the warm-up step on (VmHWM reset before it,
//! once the VAE is freed as the first step would free it); the weights are 4,068 MiB
//! (text encoder 470 with its token table 145, UNet 3,279, VAE 319), of which a step
//! holds 3,604:
//!
//! | resolution | recompute | measured | estimated |
//! | --- | --- | --- | --- |
//! | 256 px | off | 3,981-3,986 MiB | 4,102 MiB (+2.9%) |
//! | 256 px | on | 3,797 MiB | 3,918 MiB (+3.2%) |
//! | 512 px | off | 4,298 MiB | 4,391 MiB (+2.2%) |
//! | 512 px | on | 4,073 MiB | 4,199 MiB (+3.1%) |
//!
//! The estimate errs a little high, the safe side for a choice that must not run out of
//! memory. (Before the VAE was freed ahead of the reset, the 256 px rows measured the
//! RSS when the steps began, 4,095 MiB with the VAE still loaded; until 2026-12-02 the
//! narrow blocks rebuilt at 256 px too, 3,866 MiB measured, 3,970 estimated.) At 512 px
//! recompute keeps about 470 MiB over the step's weights where keeping everything takes
//! 694 MiB (narrow transformer blocks rebuilding their projections:
//! `transformer::REBUILD_WIDTH`, `transformer::REBUILD_MIN_ELEMENTS`). SDXL at 512 px
//! (recompute off): 14,495 MiB measured, 14,584 estimated (+0.6%).

use super::config::{ClipConfig, ModelConfig, UnetConfig, VaeConfig, CLIP_CONTEXT_LEN};
use super::layers::Recompute;
use super::transformer::{kept_activations, rebuilds, TransformerConfig};
use super::unet::{down_levels, up_levels};

/// What the process holds besides the weights and the step: the code, the tokenizer,
/// the cached latents, the allocator's slack and the threads' stacks. Chosen so that the
/// estimate stays at or above the peaks measured with `sdti bench` (the module's table).
pub const OVERHEAD_BYTES: u64 = 192 << 20;

/// The estimated peak memory of one training step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepMemory {
    /// The weights a step holds: the text encoders' and the UNet's. The VAE is freed for
    /// the steps ([`SdModel::release_vae`](super::SdModel::release_vae)); a model that
    /// cannot free it adds [`vae_bytes`].
    pub weights: u64,
    /// What the step adds at its peak: [`activation_bytes`] plus the text encoder's.
    pub activations: u64,
    /// [`OVERHEAD_BYTES`].
    pub overhead: u64,
}

impl StepMemory {
    /// The estimate for `config` at `batch` samples of `latent_h` x `latent_w` latents,
    /// the UNet and VAE computing in `dtype_bytes`-byte floats.
    pub fn estimate(
        config: &ModelConfig,
        batch: usize,
        latent_h: usize,
        latent_w: usize,
        dtype_bytes: usize,
        recompute: Recompute,
    ) -> Self {
        Self {
            weights: weight_bytes(config, dtype_bytes),
            activations: activation_bytes(
                &config.unet,
                batch,
                latent_h,
                latent_w,
                dtype_bytes,
                recompute,
            ) + text_encoder_bytes(&config.text_encoder, batch)
                + config
                    .text_encoder_2
                    .as_ref()
                    .map_or(0, |te2| text_encoder_bytes(te2, batch)),
            overhead: OVERHEAD_BYTES,
        }
    }

    /// Everything together: the process's expected peak.
    pub fn total(&self) -> u64 {
        self.weights + self.activations + self.overhead
    }
}

/// Bytes of the weights a step holds ([`StepMemory::weights`]): the UNet in
/// `dtype_bytes`, the text encoders in f32 (they compute in f32 in every precision) but
/// their token tables, of which a step keeps only its prompts' rows
/// ([`SdModel::release_token_tables`](super::SdModel::release_token_tables)); a model
/// that cannot free them adds [`token_table_bytes`].
pub fn weight_bytes(config: &ModelConfig, dtype_bytes: usize) -> u64 {
    let unet = unet_parameters(&config.unet);
    let text = clip_parameters(&config.text_encoder, false)
        + config
            .text_encoder_2
            .as_ref()
            .map_or(0, |te2| clip_parameters(te2, true));
    unet * dtype_bytes as u64 + text * 4 - token_table_bytes(config)
}

/// The process's memory once a model is loaded, before a trainer frees the whole token
/// tables and its first step the VAE: `step`'s weights and overhead plus those, the VAE
/// in `vae_dtype_bytes`-byte floats.
pub fn loading_bytes(config: &ModelConfig, step: &StepMemory, vae_dtype_bytes: usize) -> u64 {
    step.weights + vae_bytes(config, vae_dtype_bytes) + token_table_bytes(config) + step.overhead
}

/// Bytes of the text encoders' token tables (f32).
pub fn token_table_bytes(config: &ModelConfig) -> u64 {
    let table = |c: &ClipConfig| (c.vocab_size * c.hidden_size) as u64 * 4;
    table(&config.text_encoder) + config.text_encoder_2.as_ref().map_or(0, table)
}

/// Bytes of the VAE's weights in `dtype_bytes`.
pub fn vae_bytes(config: &ModelConfig, dtype_bytes: usize) -> u64 {
    vae_parameters(&config.vae) * dtype_bytes as u64
}

/// Parameters of a diffusers `ResnetBlock2D` (with a time projection of `temb` inputs).
fn resnet_parameters(inp: usize, out: usize, temb: Option<usize>) -> u64 {
    let (i, o) = (inp as u64, out as u64);
    let mut n = 2 * i + (9 * i * o + o) + 2 * o + (9 * o * o + o);
    if let Some(t) = temb {
        n += t as u64 * o + o;
    }
    if i != o {
        n += i * o + o;
    }
    n
}

/// Parameters of a `Transformer2DModel` of `depth` blocks, `c` wide, attending to a
/// `cross`-wide context.
fn transformer_parameters(c: usize, cross: usize, depth: usize) -> u64 {
    let (c, d) = (c as u64, cross as u64);
    let block = 6 * c // three layer norms
        + (3 * c * c + c * c + c) // attn1: q, k, v, out
        + (c * c + 2 * c * d + c * c + c) // attn2
        + (8 * c * c + 8 * c) // GEGLU projection
        + (4 * c * c + c); // feed-forward out
    2 * c + 2 * (c * c + c) + depth as u64 * block
}

fn unet_parameters(cfg: &UnetConfig) -> u64 {
    let boc = &cfg.block_out_channels;
    let (Some(&c0), Some(&top)) = (boc.first(), boc.last()) else {
        return 0;
    };
    let temb = 4 * c0;
    let conv3 = |o: usize, i: usize| 9 * (o * i) as u64 + o as u64;
    let mut n = conv3(c0, cfg.in_channels)
        + (c0 * temb + temb) as u64
        + (temb * temb + temb) as u64
        + 2 * c0 as u64
        + conv3(cfg.out_channels, c0);
    // SDXL's add_embedding: linear_1 (pooled + time ids -> temb), linear_2.
    if let Some(input) = cfg.projection_class_embeddings_input_dim {
        n += (input * temb + temb + temb * temb + temb) as u64;
    }
    let depth = |block: usize| TransformerConfig::at(cfg, block).depth;
    for plan in down_levels(cfg).iter().chain(up_levels(cfg).iter()) {
        let out_c = boc[plan.block];
        for &(rin, rout) in &plan.resnets {
            n += resnet_parameters(rin, rout, Some(temb));
            if plan.cross_attention {
                n += transformer_parameters(rout, cfg.cross_attention_dim, depth(plan.block));
            }
        }
        if plan.resample {
            n += conv3(out_c, out_c);
        }
    }
    n + 2 * resnet_parameters(top, top, Some(temb))
        + transformer_parameters(top, cfg.cross_attention_dim, depth(boc.len() - 1))
}

fn vae_parameters(cfg: &VaeConfig) -> u64 {
    let boc = &cfg.block_out_channels;
    let (Some(&c0), Some(&top)) = (boc.first(), boc.last()) else {
        return 0;
    };
    let conv = |o: usize, i: usize, k: usize| (k * k * o * i + o) as u64;
    let mid = |c: usize| 2 * resnet_parameters(c, c, None) + 2 * c as u64 + 4 * (c * c + c) as u64;
    let lat = cfg.latent_channels;
    let mut n = conv(c0, cfg.in_channels, 3) + mid(top) + 2 * top as u64;
    n += conv(2 * lat, top, 3) + conv(2 * lat, 2 * lat, 1) + conv(lat, lat, 1);
    n += conv(top, lat, 3) + mid(top) + 2 * c0 as u64 + conv(cfg.out_channels, c0, 3);
    let mut out_c = c0;
    for (i, &c) in boc.iter().enumerate() {
        let in_c = std::mem::replace(&mut out_c, c);
        for j in 0..cfg.layers_per_block {
            n += resnet_parameters(if j == 0 { in_c } else { c }, c, None);
        }
        if i + 1 < boc.len() {
            n += conv(c, c, 3);
        }
    }
    let mut out_c = top;
    for (i, &c) in boc.iter().rev().enumerate() {
        let prev = std::mem::replace(&mut out_c, c);
        for j in 0..cfg.layers_per_block + 1 {
            n += resnet_parameters(if j == 0 { prev } else { c }, c, None);
        }
        if i + 1 < boc.len() {
            n += conv(c, c, 3);
        }
    }
    n
}

/// Parameters of a CLIP text encoder, with its `text_projection` when `projection`
/// (SDXL's second encoder; SD 2.x's diffusers folders hold none).
fn clip_parameters(cfg: &ClipConfig, projection: bool) -> u64 {
    let (d, i) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
    let layer = 4 * (d * d + d) + 4 * d + (i * d + i) + (d * i + d);
    let projection = match cfg.projection_dim {
        Some(p) if projection => p as u64 * d,
        _ => 0,
    };
    (cfg.vocab_size + cfg.max_position_embeddings) as u64 * d
        + cfg.num_hidden_layers as u64 * layer
        + 2 * d
        + projection
}

/// What the text encoder keeps for the gradient of the learned vectors, in f32, for one
/// 77-token chunk per sample (longer prompts are rare in training): per layer (`ClipSaved`)
/// its input, the fused q/k/v, the attention's output and row log-sum-exps, the residual
/// sum and the MLP's hidden pre-activation, six activations of its width and one of the
/// MLP's.
fn text_encoder_bytes(cfg: &ClipConfig, batch: usize) -> u64 {
    let tokens = (batch * CLIP_CONTEXT_LEN) as u64;
    let per_token = 6 * cfg.hidden_size + cfg.intermediate_size + cfg.num_attention_heads;
    4 * tokens * per_token as u64 * cfg.num_hidden_layers as u64
}

/// Running sums of the walk, in elements of the UNet's dtype.
#[derive(Default)]
struct Tally {
    /// Tensors between graph nodes, alive until the backward pass ends.
    held: u64,
    /// Every block's saved state (all alive at the start of the backward pass without
    /// recompute).
    saved: u64,
    /// The largest saved state of one block plus its backward pass's transient (the peak
    /// inside one block's backward pass with recompute: its rebuilt state and its work).
    block_peak: u64,
    /// The largest transient of any block's passes.
    transient: u64,
    /// The skip connections, whose gradients the up path's backward pass leaves waiting
    /// for the down path.
    skips: u64,
    /// Whether the activations are on a gradient path yet: the sample is not, the text
    /// context is, so the blocks before the first transformer run with no graph (SDXL:
    /// the pooled vector reaches every resnet through the time embedding, so all are
    /// on it).
    tracked: bool,
    /// The spatial transformers in the order they run.
    transformers: Vec<TransformerTally>,
}

/// One spatial transformer's part of the [`Tally`].
#[derive(Clone, Copy)]
struct TransformerTally {
    /// The saved state of the blocks before it.
    saved_before: u64,
    /// Its saved state.
    saved: u64,
    /// Its saved state plus its backward pass's transient.
    peak: u64,
    /// The multiply-adds of its forward pass, what recomputing it costs.
    cost: u64,
}

impl Tally {
    /// A block with an `output` held by the graph, `saved` kept for a backward pass that
    /// waits (recompute off), `rerun` kept when its backward pass follows at once (a
    /// recompute's rerun) and the largest `transient` of its passes.
    fn block(&mut self, output: u64, saved: u64, rerun: u64, transient: u64) {
        self.held += output;
        if self.tracked {
            self.saved += saved;
            self.block_peak = self.block_peak.max(rerun + transient);
        }
        self.transient = self.transient.max(transient);
    }

    /// A resnet from `inp` to `out` channels on `hw` positions (times the batch).
    fn resnet(&mut self, inp: u64, out: u64, hw: u64) {
        // Saved: h1 (the second norm's input). Transient: a convolution's column buffer
        // (9 shifted copies of its input) and three activations of the output's width.
        let columns = 9 * inp.max(out) * hw;
        self.block(
            out * hw,
            out * hw,
            out * hw,
            columns + 3 * out * hw + inp * hw,
        );
    }

    /// A spatial transformer `c` wide on `n` tokens (times the batch) of `depth` blocks
    /// with `heads` heads, attending to `m` context tokens `d` wide.
    fn transformer(&mut self, c: u64, n: u64, depth: u64, heads: u64, m: u64, d: u64) {
        self.tracked = true;
        // BlockSaved: x, qkv (3), o1, x1, q2, o2, x2 and the GEGLU input h (8): 17
        // activations of width c, or only x, o1 and o2 in a narrow block whose state waits
        // (`transformer::kept_activations`); two log-sum-exps per head and position (f32,
        // counted as one element each, close enough in f32 and under by half in f16); kv2.
        let small = 2 * heads * n + 2 * c * m;
        let elements = (c * n) as usize;
        let kept = |lean| kept_activations(c as usize, elements, lean) * c * n + small;
        // The backward pass's largest moment: the GEGLU input's gradient (8c), the
        // feed-forward's (4c), the output gradient and the attention gradients (4c); in a
        // block that kept little, also the rebuilt residual sums and GEGLU input (10c).
        let transient = 17 * c * n + c * d;
        let rebuilt = if rebuilds(c as usize, elements, true) {
            10 * c * n
        } else {
            0
        };
        let saved_before = self.saved;
        self.block(
            c * n,
            depth * kept(true),
            depth * kept(false),
            transient + rebuilt,
        );
        // Per block the projections (18 c^2 per token: q, k, v, two outputs, the second
        // query, GEGLU 8 and its output 4), the context's keys and values, self- and
        // cross-attention; the projections in and out.
        let block_cost = 18 * n * c * c + 2 * m * c * d + 2 * n * n * c + 2 * n * m * c;
        self.transformers.push(TransformerTally {
            saved_before,
            saved: depth * kept(true),
            peak: depth * kept(false) + transient,
            cost: depth * block_cost + 2 * n * c * c,
        });
    }
}

/// Bytes that candle's graph and the blocks keep alive at the peak of a training step's
/// UNet pass for `batch` samples of `latent_h` x `latent_w` latents in `dtype_bytes`-byte
/// floats, with or without `recompute` (the weights not included: see [`StepMemory`]).
pub fn activation_bytes(
    config: &UnetConfig,
    batch: usize,
    latent_h: usize,
    latent_w: usize,
    dtype_bytes: usize,
    recompute: Recompute,
) -> u64 {
    let t = walk(config, batch, latent_h, latent_w);
    let elements = match recompute {
        Recompute::Off => t.elements(0),
        Recompute::On => t.held + t.skips + t.block_peak.max(t.transient),
        Recompute::Transformers(mask) => t.elements(mask),
    };
    elements * dtype_bytes as u64
}

/// The UNet's spatial transformers (their indices in the order they run, as
/// [`Recompute::Transformers`] numbers them) in the order `auto` chooses them for
/// recompute: each next one the transformer whose rerun lowers the estimated peak the
/// most per multiply-add of the rerun (ties: the earliest), until none lowers it.
/// Rerunning a late transformer alone gains little: its state is rebuilt at the start of
/// the backward pass, while everything before it is still kept; and a narrow block keeps
/// less without recompute than its rerun rebuilds (`transformer::kept_activations`).
pub fn recompute_order(
    config: &UnetConfig,
    batch: usize,
    latent_h: usize,
    latent_w: usize,
) -> Vec<usize> {
    let t = walk(config, batch, latent_h, latent_w);
    let count = t.transformers.len().min(32);
    let mut order = Vec::with_capacity(count);
    let mut mask = 0u32;
    while order.len() < count {
        let now = t.elements(mask);
        let mut best: Option<(usize, f64)> = None;
        for (i, tt) in t.transformers.iter().enumerate().take(count) {
            if Recompute::Transformers(mask).reruns_transformer(i) {
                continue;
            }
            let gain = now.saturating_sub(t.elements(mask | 1 << i));
            if gain == 0 {
                continue;
            }
            let per_cost = gain as f64 / tt.cost.max(1) as f64;
            match best {
                Some((_, b)) if per_cost <= b => {}
                _ => best = Some((i, per_cost)),
            }
        }
        let Some((i, _)) = best else { break };
        mask |= 1 << i;
        order.push(i);
    }
    order
}

/// How many spatial transformers the UNet has (what [`Recompute::Transformers`] numbers).
pub fn transformer_count(config: &UnetConfig) -> usize {
    walk(config, 1, 8, 8).transformers.len()
}

impl Tally {
    /// Elements alive at the peak when the transformers in `mask` rerun in the backward
    /// pass and every other block keeps its state (`mask` 0: recompute off): at the start
    /// of the backward pass the kept state and the largest transient; while a chosen
    /// transformer reruns, the kept state of the blocks before it, its rebuilt state and
    /// transient, and the skips' gradients waiting for the down path.
    fn elements(&self, mask: u32) -> u64 {
        let mut rerun_before = 0;
        let mut worst = 0;
        for (i, tt) in self.transformers.iter().enumerate() {
            if Recompute::Transformers(mask).reruns_transformer(i) {
                let kept_before = tt.saved_before - rerun_before;
                worst = worst.max(self.skips + kept_before + tt.peak);
                rerun_before += tt.saved;
            }
        }
        self.held + worst.max(self.saved - rerun_before + self.transient)
    }
}

/// The walk behind [`activation_bytes`] and [`recompute_order`], in elements.
fn walk(config: &UnetConfig, batch: usize, latent_h: usize, latent_w: usize) -> Tally {
    let boc = &config.block_out_channels;
    if boc.is_empty() {
        return Tally::default();
    }
    let b = batch as u64;
    let m = b * CLIP_CONTEXT_LEN as u64;
    let d = config.cross_attention_dim as u64;
    let mut t = Tally {
        tracked: config.addition_embed_type.is_some(),
        ..Tally::default()
    };
    let transformer = |t: &mut Tally, block: usize, hw: u64| {
        let tc = TransformerConfig::at(config, block);
        t.transformer(
            tc.channels as u64,
            hw,
            tc.depth as u64,
            tc.heads as u64,
            m,
            d,
        );
    };
    let (mut h, mut w) = (latent_h, latent_w);
    let mut hw = b * (h * w) as u64;
    // conv_in's output, the first skip.
    let c0 = boc[0] as u64;
    t.held += c0 * hw;
    t.transient = 9 * config.in_channels as u64 * hw;
    // The skips as (channels, positions): the up path's concatenations take them back.
    let mut skips = vec![(c0, hw)];
    for plan in down_levels(config) {
        let c = boc[plan.block] as u64;
        for &(rin, rout) in &plan.resnets {
            t.resnet(rin as u64, rout as u64, hw);
            if plan.cross_attention {
                transformer(&mut t, plan.block, hw);
            }
            skips.push((c, hw));
        }
        if plan.resample {
            // Stride 2, padding 1: each side halves, rounded up.
            (h, w) = (h.div_ceil(2), w.div_ceil(2));
            let out = b * (h * w) as u64;
            t.held += c * out;
            t.transient = t.transient.max(9 * c * out);
            hw = out;
            skips.push((c, hw));
        }
    }
    let top = boc[boc.len() - 1] as u64;
    t.resnet(top, top, hw);
    transformer(&mut t, boc.len() - 1, hw);
    t.resnet(top, top, hw);
    t.skips = skips.iter().map(|&(c, n)| c * n).sum();
    for plan in up_levels(config) {
        let c = boc[plan.block] as u64;
        for &(rin, rout) in &plan.resnets {
            // The join with the skip is made again in the backward pass (the resnet's
            // transient counts its input), not held (`apply_block_joined`).
            t.resnet(rin as u64, rout as u64, hw);
            if plan.cross_attention {
                transformer(&mut t, plan.block, hw);
            }
            skips.pop();
        }
        if plan.resample {
            // To the size of the skip it meets next (twice the size, or one less).
            let out = skips.last().map_or(4 * hw, |&(_, n)| n);
            // The nearest upsampling and the convolution after it.
            t.held += 2 * c * out;
            t.transient = t.transient.max(9 * c * out);
            hw = out;
        }
    }
    // conv_out's input is the last level's output (held above); the prediction, the
    // difference and its square are small.
    t.held += 3 * config.out_channels as u64 * hw;
    t
}

/// Hands the allocator's free pages back to the system (glibc's `malloc_trim`; nothing
/// elsewhere). glibc keeps freed blocks under 32 MiB in its heaps, where the process's
/// resident memory still counts them; where a phase has just freed much and the next one
/// is the process's peak, returning them first lowers that peak (SD 1.5 at 512 px: the
/// second view's encoding, about 70 MiB lower) for a few milliseconds and the page faults
/// of memory used again.
pub fn return_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers; it only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The memory a training step may use on `device` as far as the system says: on the CPU
/// what this process holds now (`VmRSS`) plus what the system could still give it
/// (`MemAvailable` of `/proc/meminfo`), read once; on CUDA the device's free memory plus
/// `resident` (the weights the process already holds there). None where neither is
/// known (another system, Metal).
pub fn available_bytes(device: &candle_core::Device, resident: u64) -> Option<u64> {
    match device {
        candle_core::Device::Cpu => {
            let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
            let status = std::fs::read_to_string("/proc/self/status").ok()?;
            Some(kib_field(&meminfo, "MemAvailable")? + kib_field(&status, "VmRSS")?)
        }
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(d) => cuda_free(d).ok().map(|free| free + resident),
        _ => {
            let _ = resident;
            None
        }
    }
}

/// A `NAME: N kB` line of a /proc file, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text
        .lines()
        .find(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with(':')))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The device's free memory (`cuMemGetInfo`), with the device's context bound as
/// `crate::device` binds it for its memory-pool queries.
#[cfg(feature = "cuda")]
fn cuda_free(
    d: &candle_core::cuda_backend::CudaDevice,
) -> std::result::Result<u64, candle_core::cuda_backend::cudarc::driver::DriverError> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let stream = d.cuda_stream();
    stream.context().bind_to_thread()?;
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: both are valid out-pointers to size_t values, and a context is bound.
    unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) }.result()?;
    Ok(free as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::random::{tiny_sd1_config, tiny_sd2_config, tiny_sdxl_config};

    /// The counts match the weights a random model of each architecture has, and the
    /// published UNet sizes (diffusers' `num_parameters()`).
    #[test]
    fn parameter_counts_match_the_reference_layout() -> crate::error::Result<()> {
        for config in [tiny_sd1_config(), tiny_sd2_config(), tiny_sdxl_config()] {
            let weights = crate::model::random::random_weights(&config, 1)?;
            let count = |prefix: &str| -> u64 {
                weights
                    .iter()
                    .filter(|(k, _)| k.starts_with(prefix))
                    .map(|(_, t)| t.elem_count() as u64)
                    .sum()
            };
            let family = config.family;
            assert_eq!(unet_parameters(&config.unet), count("unet."), "{family}");
            assert_eq!(vae_parameters(&config.vae), count("vae."), "{family}");
            assert_eq!(
                clip_parameters(&config.text_encoder, false),
                count("text_encoder.text_model."),
                "{family}"
            );
            let te2 = config
                .text_encoder_2
                .as_ref()
                .map_or(0, |c| clip_parameters(c, true));
            assert_eq!(te2, count("text_encoder_2."), "{family}");
        }
        // SD 1.5's UNet: 859,520,964 parameters; SD 2.1's 865,910,724; SDXL base's
        // 2,567,463,684 (diffusers' num_parameters() of the Hub models).
        assert_eq!(unet_parameters(&UnetConfig::sd1()), 859_520_964);
        assert_eq!(unet_parameters(&UnetConfig::sd2()), 865_910_724);
        assert_eq!(unet_parameters(&UnetConfig::sdxl()), 2_567_463_684);
        Ok(())
    }

    #[test]
    fn proc_fields_are_read_in_bytes() {
        let text = "MemTotal:       16315592 kB\nMemAvailable:    9010180 kB\n";
        assert_eq!(kib_field(text, "MemAvailable"), Some(9_010_180 * 1024));
        assert_eq!(kib_field(text, "Mem"), None);
        if cfg!(target_os = "linux") {
            assert!(available_bytes(&candle_core::Device::Cpu, 0).is_some_and(|b| b > 0));
        }
    }

    /// More pixels or samples need more memory; recompute needs less.
    #[test]
    fn the_estimate_grows_with_the_step_and_shrinks_with_recompute() {
        let unet = UnetConfig::sd1();
        let at = |b: usize, side: usize, r: Recompute| activation_bytes(&unet, b, side, side, 4, r);
        for r in [Recompute::Off, Recompute::On] {
            assert!(at(1, 64, r) > at(1, 32, r), "{r:?}");
            assert!(at(2, 64, r) > at(1, 64, r), "{r:?}");
            assert!(at(1, 64, r) > 0);
        }
        for (b, side) in [(1, 32), (1, 64), (4, 64), (1, 128)] {
            let (off, on) = (at(b, side, Recompute::Off), at(b, side, Recompute::On));
            assert!(on < off, "{b}x{side}: on {on} off {off}");
        }
        // Odd latent sides round up through the downsamplers and still count.
        assert!(
            activation_bytes(&unet, 1, 33, 31, 4, Recompute::Off) > at(1, 32, Recompute::Off) / 2
        );
        // Half-size floats halve the activations.
        assert_eq!(
            activation_bytes(&unet, 1, 64, 64, 2, Recompute::On) * 2,
            at(1, 64, Recompute::On)
        );
    }

    /// Each transformer added in `recompute_order` lowers the estimated peak; the order
    /// ranks transformers at most once, starting in the forward pass's first half.
    #[test]
    fn rerunning_more_transformers_needs_less_memory() {
        for (unet, side, count) in [(UnetConfig::sd1(), 64, 16), (UnetConfig::sdxl(), 128, 11)] {
            let order = recompute_order(&unet, 1, side, side);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), order.len(), "{order:?}");
            assert!(
                !order.is_empty() && order.iter().all(|&i| i < count),
                "{order:?}"
            );
            let at = |r| activation_bytes(&unet, 1, side, side, 4, r);
            assert_eq!(at(Recompute::Transformers(0)), at(Recompute::Off));
            let mut mask = 0u32;
            let mut last = at(Recompute::Off);
            for (n, &i) in order.iter().enumerate() {
                mask |= 1 << i;
                let now = at(Recompute::Transformers(mask));
                assert!(
                    now < last,
                    "{count} transformers, {mask:b}: {now} >= {last}"
                );
                if n == 0 {
                    // The first choice is in the first half of the forward pass (the
                    // down path and the mid block: 7 transformers in SD 1.5, 5 in SDXL).
                    assert!(i < count / 2, "{count}: first {i}");
                }
                last = now;
            }
        }
    }
}
