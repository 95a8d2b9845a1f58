//! The CLIP text transformer (transformers `CLIPTextModel` key names): SD 1.x's CLIP
//! ViT-L, SD 2.x's OpenCLIP ViT-H and SDXL's two encoders, with learned vectors injected
//! into the token slots and each family's way of turning hidden states into conditioning
//! ([`Conditioning`]).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use candle_core::{DType, Device, Tensor};

use super::config::ClipConfig;
use super::layers::{
    apply_block, attention_backward, attention_forward, Activation, AttentionMask, Block, Keep,
    LayerNorm, Linear, Recompute, Stats,
};
use super::weights::Weights;
use crate::embedding::{Encoder, Family};
use crate::error::{Error, Result};
use crate::tokenizer::EOS;

/// How one text encoder's hidden states condition the UNet: which layer, whether the
/// final layer norm follows, what fills the slots after the end token, and whether the
/// pooled vector is wanted. Each family and encoder has its own
/// ([`Conditioning::default_for`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conditioning {
    /// `hidden_states[-clip_skip]` of the full-depth encoder: 1 = the last block's
    /// output, 2 = the penultimate. Counted from the original encoder's end, also when
    /// the weights lack final blocks (`ClipConfig::dropped_final_layers`).
    pub clip_skip: usize,
    /// Apply `final_layer_norm` to the chosen hidden states (SD 1.x and 2.x; SDXL not).
    pub final_norm: bool,
    /// `Some(id)`: every slot after the first end token (49407) of each 77-slot window is
    /// rewritten to `id` before the lookup (OpenCLIP's `tokenize` pads with 0; A1111's
    /// `process_tokens`). `None`: the ids as given (CLIP ViT-L pads with the end token).
    /// Learned slots stay learned: their vectors replace the looked-up rows whatever id
    /// they hold.
    pub pad_after_eos: Option<u32>,
    /// Also compute the pooled vector: `final_layer_norm` of the last block's output at
    /// the first end token of each row, through `text_projection` (SDXL's second encoder).
    pub pooled: bool,
}

impl Conditioning {
    /// SD 1.x: the last layer and the final layer norm, padded with the end token.
    pub const SD1: Self = Self {
        clip_skip: 1,
        final_norm: true,
        pad_after_eos: None,
        pooled: false,
    };

    /// What the family conditions on through `encoder`: SD 1.x the last layer + final LN;
    /// SD 2.x (OpenCLIP ViT-H) the penultimate block + final LN, 0 after the first end
    /// token (Stability's v2-inference.yaml `layer: penultimate`, open_clip's padding);
    /// SDXL's CLIP ViT-L `hidden_states[-2]` without LN; SDXL's OpenCLIP bigG
    /// `hidden_states[-2]` without LN, 0 after the first end token, and the pooled vector
    /// (sd_xl_base.yaml: `layer_idx: 11`, `penultimate`, `legacy: False`,
    /// `always_return_pooled`).
    pub fn default_for(family: Family, encoder: Encoder) -> Result<Self> {
        Ok(match (family, encoder) {
            (Family::Sd1, Encoder::Single) => Self::SD1,
            (Family::Sd2, Encoder::Single) => Self {
                clip_skip: 2,
                final_norm: true,
                pad_after_eos: Some(0),
                pooled: false,
            },
            (Family::Sdxl, Encoder::ClipL) => Self {
                clip_skip: 2,
                final_norm: false,
                pad_after_eos: None,
                pooled: false,
            },
            (Family::Sdxl, Encoder::ClipG) => Self {
                clip_skip: 2,
                final_norm: false,
                pad_after_eos: Some(0),
                pooled: true,
            },
            (family, encoder) => {
                return Err(Error::config(
                    "text encoder",
                    format!(
                        "{} models have no {encoder:?} text encoder",
                        family.model_name()
                    ),
                ))
            }
        })
    }

    /// The same with `clip_skip` in place of the family's.
    pub fn with_clip_skip(self, clip_skip: usize) -> Self {
        Self { clip_skip, ..self }
    }
}

/// Position of the first end token (49407) in `ids`, skipping learned slots (`learned[i]`
/// true: the id is a stand-in, never the end of the text).
pub fn first_end_token(ids: &[u32], learned: impl Fn(usize) -> bool) -> Option<usize> {
    ids.iter()
        .enumerate()
        .position(|(i, &id)| id == EOS && !learned(i))
}

/// OpenCLIP's padding on one 77-slot window, as A1111's `process_tokens` does it for SD 2.x:
/// every slot after the first end token becomes `pad`. Learned slots keep their vectors
/// whatever id they hold (their vectors replace the looked-up rows).
pub fn pad_after_first_end_token(ids: &mut [u32], learned: impl Fn(usize) -> bool, pad: u32) {
    if let Some(eos) = first_end_token(ids, learned) {
        for id in &mut ids[eos + 1..] {
            *id = pad;
        }
    }
}

/// The first end token of each row of `ids` (`[B, T]` u32), skipping the slots `learned`
/// marks (`[B, T]`, non-zero on learned slots).
pub(crate) fn first_eos(ids: &Tensor, learned: Option<&Tensor>) -> Result<Vec<Option<usize>>> {
    let rows: Vec<Vec<u32>> = ids.to_vec2()?;
    let learned: Option<Vec<Vec<f32>>> = match learned {
        Some(m) => Some(m.to_dtype(DType::F32)?.to_vec2()?),
        None => None,
    };
    Ok(rows
        .iter()
        .enumerate()
        .map(|(r, row)| {
            let mask = learned.as_ref().and_then(|m| m.get(r));
            first_end_token(row, |i| {
                mask.and_then(|m| m.get(i)).is_some_and(|&m| m != 0.0)
            })
        })
        .collect())
}

/// `ids` with every slot after `eos[row]` rewritten to `pad` (rows without an end token
/// stay as they are).
fn pad_after(ids: &Tensor, eos: &[Option<usize>], pad: u32) -> Result<Tensor> {
    let mut rows: Vec<Vec<u32>> = ids.to_vec2()?;
    let mut changed = false;
    for (row, e) in rows.iter_mut().zip(eos) {
        if let Some(e) = *e {
            for id in &mut row[e + 1..] {
                changed |= *id != pad;
                *id = pad;
            }
        }
    }
    if !changed {
        return Ok(ids.clone());
    }
    let (b, t) = ids.dims2()?;
    Ok(Tensor::from_vec(
        rows.into_iter().flatten().collect::<Vec<u32>>(),
        (b, t),
        ids.device(),
    )?)
}

/// Learned vectors placed into token slots: `table` holds the vectors (`[M, dim]`,
/// possibly a trainable variable), `index` (`[B, T]` u32) picks a row for each slot and
/// `mask` (`[B, T]`, 1 where a slot carries a learned vector) says which slots use it.
#[derive(Debug)]
pub struct Injection<'a> {
    pub table: &'a Tensor,
    pub index: &'a Tensor,
    pub mask: &'a Tensor,
}

impl<'a> Injection<'a> {
    /// One injection per table, all at the same slots: each text encoder's learned
    /// vectors (SDXL: clip_l's table, then clip_g's) in one prompt layout.
    pub fn per_table(tables: &'a [Tensor], index: &'a Tensor, mask: &'a Tensor) -> Vec<Self> {
        tables
            .iter()
            .map(|table| Injection { table, index, mask })
            .collect()
    }
}

/// The per-encoder tables of a joint table `[n, sum of widths]` (how the trainer holds an
/// SDXL word: each row `[clip_l ‖ clip_g]`): one contiguous `[n, width]` per width, on the
/// gradient path (the copy's backward passes the gradient through). One width: the table
/// itself.
pub fn split_columns(table: &Tensor, widths: &[usize]) -> Result<Vec<Tensor>> {
    if widths.len() == 1 {
        return Ok(vec![table.clone()]);
    }
    let mut start = 0;
    let mut out = Vec::with_capacity(widths.len());
    for &w in widths {
        out.push(table.narrow(1, start, w)?.contiguous()?);
        start += w;
    }
    Ok(out)
}

/// One CLIP encoder layer (pre-norm self-attention with a causal mask, then a two-layer
/// MLP), one graph node with a hand-written backward pass: it keeps its input, the fused
/// q/k/v projection, the attention's output and row log-sum-exp, the residual sum after
/// attention, the MLP's hidden pre-activation and the norms' statistics.
#[derive(Clone, Debug)]
struct ClipLayer {
    layer_norm1: LayerNorm,
    /// `q_proj`, `k_proj`, `v_proj` stacked: `[3D, D]`.
    qkv_proj: Linear,
    out_proj: Linear,
    heads: usize,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

/// What a CLIP layer's backward pass reads besides its input.
struct ClipSaved {
    stats1: Option<Stats>,
    qkv: Tensor,
    o: Tensor,
    lse: Tensor,
    x1: Tensor,
    stats2: Option<Stats>,
    h: Tensor,
}

impl ClipLayer {
    fn new(w: &Weights, cfg: &ClipConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let a = w.pp("self_attn");
        Ok(Self {
            layer_norm1: LayerNorm::new(w, "layer_norm1", d, cfg.layer_norm_eps)?,
            qkv_proj: Linear::concat(&[
                Linear::new(&a, "q_proj", true)?,
                Linear::new(&a, "k_proj", true)?,
                Linear::new(&a, "v_proj", true)?,
            ])?,
            out_proj: Linear::new(&a, "out_proj", true)?,
            heads: cfg.num_attention_heads,
            layer_norm2: LayerNorm::new(w, "layer_norm2", d, cfg.layer_norm_eps)?,
            fc1: Linear::new(w, "mlp.fc1", true)?,
            fc2: Linear::new(w, "mlp.fc2", true)?,
            activation: if cfg.hidden_act == "quick_gelu" {
                Activation::QuickGelu
            } else {
                Activation::GeluErf
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(apply_block(self, x, None, Recompute::Off)?)
    }

    fn scale(&self, d: usize) -> f64 {
        ((d / self.heads) as f64).powf(-0.5)
    }
}

impl Block for ClipLayer {
    type Saved = ClipSaved;
    const KIND: &'static str = "clip_layer";

    fn run(
        &self,
        x: &Tensor,
        _: Option<&Tensor>,
        keep: Keep,
    ) -> candle_core::Result<(Tensor, Option<ClipSaved>)> {
        let (n1, stats1) = self.layer_norm1.apply(x)?;
        let qkv = self.qkv_proj.apply(&n1)?;
        drop(n1);
        let [q, k, v] = Linear::parts(&qkv)?;
        let scale = self.scale(q.dim(2)?);
        let (o, lse) = attention_forward(&q, &k, &v, self.heads, scale, AttentionMask::Causal)?;
        let x1 = self.out_proj.apply_add(&o, Some(x))?;
        let (n2, stats2) = self.layer_norm2.apply(&x1)?;
        let h = self.fc1.apply(&n2)?;
        drop(n2);
        let y = self.fc2.apply_add(&self.activation.apply(&h)?, Some(&x1))?;
        let saved = keep.any().then_some(ClipSaved {
            stats1,
            qkv,
            o,
            lse,
            x1,
            stats2,
            h,
        });
        Ok((y, saved))
    }

    fn backward(
        &self,
        s: ClipSaved,
        x: &Tensor,
        _: Option<&Tensor>,
        g: &Tensor,
        need: [bool; 2],
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if !need[0] {
            return Ok((None, None));
        }
        // y = x1 + fc2(act(fc1(norm2(x1)))), x1 = x + out(attn(qkv(norm1(x)))).
        let da = self.fc2.input_grad(g)?;
        let dh = self.activation.input_grad(&da, &s.h)?;
        drop((da, s.h));
        let dn2 = self.fc1.input_grad(&dh)?;
        drop(dh);
        let dx1 = self
            .layer_norm2
            .input_grad_add(&dn2, &s.x1, s.stats2.as_ref(), g)?;
        drop((dn2, s.x1));
        let do_ = self.out_proj.input_grad(&dx1)?;
        let [q, k, v] = Linear::parts(&s.qkv)?;
        let scale = self.scale(q.dim(2)?);
        let grads = attention_backward(
            &q,
            &k,
            &v,
            &s.o,
            &s.lse,
            &do_,
            self.heads,
            scale,
            AttentionMask::Causal,
            [true; 3],
        )?;
        drop((do_, q, k, v, s.qkv, s.o, s.lse));
        let dn1 = self
            .qkv_proj
            .input_grad_of_parts([grads.0, grads.1, grads.2])?;
        let dx = self
            .layer_norm1
            .input_grad_add(&dn1, x, s.stats1.as_ref(), &dx1)?;
        Ok((Some(dx), None))
    }
}

/// Reads a token table again, for [`ClipTextTransformer::token_table`] and for prompts
/// with tokens a release did not keep.
pub(crate) type TableReload = Box<dyn Fn() -> Result<Tensor> + Send + Sync>;

/// A text encoder's token table (`[vocab, dim]`: 145 MiB for CLIP ViT-L in f32, 241 MiB
/// for SDXL's bigG), held whole, or, while training has released it, only the rows of
/// the tokens its prompts use. Training embeds a few hundred distinct tokens at most, so
/// a step need not hold the rest; a prompt with a token not kept reads the whole table
/// again (from the model's files, or a random model's generator) and keeps it until the
/// next release. The rows are copies, so the embeddings are the same bit for bit.
struct TokenTable {
    table: Mutex<Table>,
    reload: Option<TableReload>,
}

enum Table {
    Full(Tensor),
    /// `rows[slot[id]]` is the table's row `id`.
    Kept {
        rows: Tensor,
        slot: HashMap<u32, u32>,
    },
}

impl TokenTable {
    fn new(full: Tensor) -> Self {
        Self {
            table: Mutex::new(Table::Full(full)),
            reload: None,
        }
    }

    /// The table's state; a thread that panicked holding the lock left a valid one.
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The whole table, read again (and kept) if it was released.
    fn full(&self) -> Result<Tensor> {
        let mut table = self.lock();
        self.loaded(&mut table)
    }

    fn loaded(&self, table: &mut Table) -> Result<Tensor> {
        if let Table::Full(t) = table {
            return Ok(t.clone());
        }
        let reload = self
            .reload
            .as_ref()
            .ok_or_else(|| Error::input("token table", "was released and cannot be read again"))?;
        let full = reload()?;
        *table = Table::Full(full.clone());
        Ok(full)
    }

    /// The rows of `ids` (`[n]`, an integer dtype): `[n, dim]`.
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let mut table = self.lock();
        if let Table::Kept { rows, slot } = &*table {
            let wanted = ids.to_dtype(DType::U32)?.to_vec1::<u32>()?;
            let slots: Option<Vec<u32>> = wanted.iter().map(|id| slot.get(id).copied()).collect();
            if let Some(slots) = slots {
                let slots = Tensor::from_vec(slots, wanted.len(), ids.device())?;
                return Ok(rows.index_select(&slots, 0)?);
            }
        }
        Ok(self.loaded(&mut table)?.index_select(ids, 0)?)
    }

    /// Keeps only the rows of `keep` (copied out of the whole table, read again if need
    /// be) when the table can be read again; false, keeping it whole, when it cannot.
    fn release(&self, keep: &[u32]) -> Result<bool> {
        if self.reload.is_none() {
            return Ok(false);
        }
        let mut table = self.lock();
        if let Table::Kept { slot, .. } = &*table {
            if keep.iter().all(|id| slot.contains_key(id)) {
                return Ok(true);
            }
        }
        let full = self.loaded(&mut table)?;
        let mut ids = keep.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let vocab = full.dim(0)?;
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::input(
                "token table",
                format!("token id {bad} is outside the {vocab}-token table"),
            ));
        }
        let index = Tensor::from_vec(ids.clone(), ids.len(), full.device())?;
        let rows = full.index_select(&index, 0)?;
        let slot = ids.into_iter().zip(0u32..).collect();
        *table = Table::Kept { rows, slot };
        Ok(true)
    }
}

impl std::fmt::Debug for TokenTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kept = match &*self.lock() {
            Table::Full(_) => None,
            Table::Kept { slot, .. } => Some(slot.len()),
        };
        f.debug_struct("TokenTable")
            .field("kept_rows", &kept)
            .field("reloadable", &self.reload.is_some())
            .finish()
    }
}

/// The text transformer: token and position lookups, layers, final layer norm, and the
/// pooled vector's projection where the weights have one.
#[derive(Debug)]
pub struct ClipTextTransformer {
    token_embedding: TokenTable,
    position_embedding: Tensor,
    layers: Vec<ClipLayer>,
    final_layer_norm: LayerNorm,
    /// `text_projection` (`[projection_dim, dim]`, transformers'
    /// `CLIPTextModelWithProjection` layout), loaded when the config has a
    /// `projection_dim` and the weights hold it.
    text_projection: Option<Linear>,
    config: ClipConfig,
}

impl ClipTextTransformer {
    /// Loads from weights named as transformers names them: `text_model.*`, and
    /// `text_projection.weight` beside it.
    pub fn new(w: &Weights, cfg: &ClipConfig) -> Result<Self> {
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(Error::config(
                "text_encoder.num_attention_heads",
                format!(
                    "{} heads do not divide hidden size {}",
                    cfg.num_attention_heads, cfg.hidden_size
                ),
            ));
        }
        let text_projection = match cfg.projection_dim {
            Some(p) if w.contains("text_projection.weight") => Some(Linear::new_shaped(
                w,
                "text_projection",
                false,
                (p, cfg.hidden_size),
            )?),
            _ => None,
        };
        let w = w.pp("text_model");
        let d = cfg.hidden_size;
        let token_embedding =
            w.get_shaped("embeddings.token_embedding.weight", &[cfg.vocab_size, d])?;
        let position_embedding = w.get_shaped(
            "embeddings.position_embedding.weight",
            &[cfg.max_position_embeddings, d],
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipLayer::new(&w.pp(&format!("encoder.layers.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::new(&w, "final_layer_norm", d, cfg.layer_norm_eps)?;
        Ok(Self {
            token_embedding: TokenTable::new(token_embedding),
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// The token table `[vocab, dim]`, for initialising vectors from words; read again
    /// when training released it ([`Self::release_token_table`]).
    pub fn token_table(&self) -> Result<Tensor> {
        self.token_embedding.full()
    }

    /// Keeps only the rows of `keep` of the token table while the whole table can be
    /// read again (see `TokenTable`); false, keeping it whole, when it cannot.
    pub fn release_token_table(&self, keep: &[u32]) -> Result<bool> {
        self.token_embedding.release(keep)
    }

    /// Lets [`Self::release_token_table`] free the table, `reload` reading it again.
    pub(crate) fn set_token_reload(&mut self, reload: TableReload) {
        self.token_embedding.reload = Some(reload);
    }

    /// Whether [`Self::release_token_table`] frees the table.
    pub fn token_table_releasable(&self) -> bool {
        self.token_embedding.reload.is_some()
    }

    /// Whether the whole token table is in memory now.
    pub fn token_table_loaded(&self) -> bool {
        matches!(*self.token_embedding.lock(), Table::Full(_))
    }

    pub fn device(&self) -> &Device {
        self.position_embedding.device()
    }

    pub fn dtype(&self) -> DType {
        self.position_embedding.dtype()
    }

    /// The number of blocks of the original encoder: the loaded layers plus the final
    /// blocks the weights lack (`ClipConfig::dropped_final_layers`).
    pub fn full_depth(&self) -> usize {
        self.layers.len() + self.config.dropped_final_layers
    }

    /// Whether the weights hold `text_projection`, which the pooled vector needs.
    pub fn has_projection(&self) -> bool {
        self.text_projection.is_some()
    }

    /// Checks that `clip_skip` picks a layer these weights hold: 1 ..= the full depth,
    /// and not one of the dropped final blocks.
    pub fn check_clip_skip(&self, clip_skip: usize) -> Result<()> {
        let full = self.full_depth();
        let dropped = self.config.dropped_final_layers;
        if clip_skip == 0 || clip_skip > full {
            return Err(Error::config(
                "clip_skip",
                format!("{clip_skip} is outside 1..={full} for this text encoder"),
            ));
        }
        if clip_skip <= dropped {
            let lacks = if dropped == 1 {
                format!("block {full}")
            } else {
                format!("blocks {} to {full}", full + 1 - dropped)
            };
            return Err(Error::config(
                "clip_skip",
                format!(
                    "{clip_skip} conditions on the output of block {} of {full}, but this diffusers folder lacks {lacks} (its conversion dropped what SD 2.x does not use): use clip_skip {} or more, or the model's single-file checkpoint",
                    full + 1 - clip_skip,
                    dropped + 1
                ),
            ));
        }
        Ok(())
    }

    /// Hidden states `[B, T, dim]` for token ids `[B, T]` (u32): `hidden_states[-clip_skip]`
    /// (clip_skip 1 = the last layer, as SD 1.x uses), then the final layer norm, as
    /// A1111, ComfyUI and diffusers apply it to SD 1.x; ids as given.
    pub fn forward(
        &self,
        ids: &Tensor,
        injection: Option<&Injection<'_>>,
        clip_skip: usize,
    ) -> Result<Tensor> {
        let cond = Conditioning::SD1.with_clip_skip(clip_skip);
        Ok(self.forward_conditioned(ids, injection, &cond)?.0)
    }

    /// One window of at most 77 tokens conditioned as `cond` says: the hidden states
    /// `[B, T, dim]` and, when `cond.pooled`, the pooled vector `[B, projection_dim]`
    /// (`text_projection(final_layer_norm(last block)[first end token])`). Runs only the
    /// blocks the result needs. The gradient reaches the injected vectors through both.
    pub fn forward_conditioned(
        &self,
        ids: &Tensor,
        injection: Option<&Injection<'_>>,
        cond: &Conditioning,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, t) = ids.dims2()?;
        if t > self.config.max_position_embeddings {
            return Err(Error::input(
                "prompt",
                format!(
                    "{t} tokens exceed the text encoder's {} positions",
                    self.config.max_position_embeddings
                ),
            ));
        }
        self.check_clip_skip(cond.clip_skip)?;
        let projection = match (cond.pooled, &self.text_projection) {
            (false, _) => None,
            (true, None) => {
                return Err(Error::config(
                    "text_projection",
                    "the pooled vector needs the text encoder's text_projection.weight (and a projection_dim in its config), which this model lacks",
                ))
            }
            (true, Some(_)) if self.config.dropped_final_layers > 0 => {
                return Err(Error::config(
                    "text_projection",
                    "the pooled vector needs the text encoder's last block, which these weights lack",
                ))
            }
            (true, Some(p)) => Some(p),
        };
        let eos = match (cond.pad_after_eos, cond.pooled) {
            (None, false) => Vec::new(),
            _ => first_eos(ids, injection.map(|inj| inj.mask))?,
        };
        let padded;
        let ids = match cond.pad_after_eos {
            Some(pad) => {
                padded = pad_after(ids, &eos, pad)?;
                &padded
            }
            None => ids,
        };
        let d = self.config.hidden_size;
        let flat = ids.flatten_all()?;
        let mut x = self.token_embedding.embed(&flat)?.reshape((b, t, d))?;
        if let Some(inj) = injection {
            let rows = inj
                .table
                .to_dtype(x.dtype())?
                .index_select(&inj.index.flatten_all()?, 0)?
                .reshape((b, t, d))?;
            let mask = inj.mask.to_dtype(x.dtype())?.reshape((b, t, 1))?;
            let keep = (1.0 - &mask)?;
            x = (x.broadcast_mul(&keep)? + rows.broadcast_mul(&mask)?)?;
        }
        let pos = self.position_embedding.narrow(0, 0, t)?;
        x = x.broadcast_add(&pos)?;
        // hidden_states[-clip_skip] is the output of block full + 1 - clip_skip; the pooled
        // vector needs the last one.
        let keep = self.full_depth() + 1 - cond.clip_skip;
        let run = if projection.is_some() {
            self.layers.len()
        } else {
            keep
        };
        let mut states = None;
        for (i, layer) in self.layers[..run].iter().enumerate() {
            x = layer.forward(&x)?;
            if i + 1 == keep {
                states = Some(x.clone());
            }
        }
        let states = states.ok_or_else(|| {
            Error::config("clip_skip", format!("{} selects no layer", cond.clip_skip))
        })?;
        let states = if cond.final_norm {
            self.final_layer_norm.forward(&states)?
        } else {
            states
        };
        let pooled = match projection {
            None => None,
            Some(projection) => {
                let last = self.final_layer_norm.forward(&x)?;
                let rows = eos
                    .iter()
                    .enumerate()
                    .map(|(r, e)| {
                        let e = e.ok_or_else(|| {
                            Error::input(
                                "prompt",
                                format!(
                                    "token row {r} has no end-of-text token ({EOS}), where the pooled vector is taken"
                                ),
                            )
                        })?;
                        Ok(last.narrow(0, r, 1)?.narrow(1, e, 1)?.squeeze(1)?)
                    })
                    .collect::<Result<Vec<Tensor>>>()?;
                Some(projection.forward(&Tensor::cat(&rows, 0)?)?)
            }
        };
        Ok((states, pooled))
    }
}
