//! Conditioning for hosts: a model's text encoder(s) with registered learned words,
//! turning prompts into the hidden states a UNet is conditioned on (and, for SDXL, the
//! pooled vector).

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::{encode_chunks, Word};
use crate::embedding::{read_embedding, Encoder, Family};
use crate::error::{Error, Result};
use crate::model::clip::pad_after_first_end_token;
use crate::model::text_encoder::encode_context;
use crate::model::{Injection, SdModel, TextEncoder};
use crate::prompt::chunks::{chunk_slots, ChunkStyle, Slot, WeightedSlot};
use crate::prompt::weights::{comfy_interpolate, emphasis_original, weighted_chunks};
use crate::tokenizer::ClipTokenizer;

/// A registered word and its vectors, one row-major `[n, width]` table per text encoder.
#[derive(Clone, Debug)]
struct Registered {
    name: String,
    parts: Vec<Vec<f32>>,
}

/// One token slot of a tokenized prompt, for hosts that run their own text encoder.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenSlot {
    /// The vocabulary id (for learned slots, the end-of-text id as a stand-in).
    pub id: u32,
    /// `Some((word, vector))` where the slot carries a learned vector.
    pub learned: Option<(usize, usize)>,
    /// The prompt weight of the slot (1 without one, and with prompt weights off).
    pub weight: f32,
}

/// Prompts to hidden states with learned words injected. Holds only the text encoder(s)
/// (shared with a model or a trainer, or loaded alone with [`TextEncoder::load_all`]):
/// one for SD 1.x and 2.x, SDXL's CLIP ViT-L and OpenCLIP bigG side by side.
pub struct PromptEncoder {
    /// The encoders in conditioning order (SDXL: L, then G).
    encoders: Vec<Arc<TextEncoder>>,
    tokenizer: ClipTokenizer,
    words: Vec<Registered>,
    style: ChunkStyle,
    /// Prompt weights read and applied as the chunk style's host does (the default).
    weights: bool,
    /// `None`: the model family's ([`TextEncoder::default_conditioning`]).
    clip_skip: Option<usize>,
}

impl PromptEncoder {
    /// A prompt encoder on one text encoder (SD 1.x, SD 2.x).
    pub fn new(text_encoder: Arc<TextEncoder>) -> Result<Self> {
        Self::with_encoders(text_encoder, None)
    }

    /// A prompt encoder on a model's text encoders.
    pub fn for_model(model: &SdModel) -> Result<Self> {
        Self::with_encoders(model.text_encoder.clone(), model.text_encoder_2.clone())
    }

    /// A prompt encoder on `first` and, for SDXL, `second` (its OpenCLIP bigG): the two
    /// must be one SDXL model's CLIP ViT-L and bigG.
    pub fn with_encoders(
        first: Arc<TextEncoder>,
        second: Option<Arc<TextEncoder>>,
    ) -> Result<Self> {
        let pair = (
            first.family(),
            first.encoder(),
            second.as_ref().map(|s| s.encoder()),
        );
        match pair {
            (Family::Sd1 | Family::Sd2, Encoder::Single, None)
            | (Family::Sdxl, Encoder::ClipL, Some(Encoder::ClipG)) => {}
            (Family::Sdxl, _, _) => {
                return Err(Error::config(
                    "text_encoder",
                    "an SDXL model has two text encoders, CLIP ViT-L then OpenCLIP bigG: give both (PromptEncoder::for_model takes a model's)",
                ))
            }
            (family, encoder, second) => {
                return Err(Error::config(
                    "text_encoder",
                    format!(
                        "an {} model has one text encoder, not {encoder:?}{}",
                        family.model_name(),
                        second.map_or(String::new(), |s| format!(" and {s:?}"))
                    ),
                ))
            }
        }
        let mut encoders = vec![first];
        encoders.extend(second);
        Ok(Self {
            encoders,
            tokenizer: ClipTokenizer::new()?,
            words: Vec::new(),
            style: ChunkStyle::A1111,
            weights: true,
            clip_skip: None,
        })
    }

    /// The first (for SD 1.x and 2.x the only) text encoder.
    pub fn text_encoder(&self) -> &Arc<TextEncoder> {
        &self.encoders[0]
    }

    /// The text encoders in conditioning order.
    pub fn text_encoders(&self) -> &[Arc<TextEncoder>] {
        &self.encoders
    }

    /// The model family the encoders belong to.
    pub fn family(&self) -> Family {
        self.encoders[0].family()
    }

    /// Long prompts are chunked, and prompt weights read and applied, the way A1111
    /// (default) or ComfyUI do it ([`crate::prompt::weights`]).
    pub fn set_chunk_style(&mut self, style: ChunkStyle) {
        self.style = style;
    }

    /// The host whose chunking and prompt weights are followed.
    pub fn chunk_style(&self) -> ChunkStyle {
        self.style
    }

    /// Prompt weights on (the default, as both hosts have them) or off: off, brackets,
    /// colons and `BREAK` are ordinary text and every token has weight 1.
    pub fn set_prompt_weights(&mut self, on: bool) {
        self.weights = on;
    }

    /// Whether prompt weights are read and applied.
    pub fn prompt_weights(&self) -> bool {
        self.weights
    }

    /// Conditions on `hidden_states[-clip_skip]` of the full-depth text encoder(s) (1 =
    /// the last layer). Unset, the model family's: 1 for SD 1.x, 2 for SD 2.x (its
    /// OpenCLIP encoder's penultimate block) and SDXL (both encoders, no final norm). An
    /// SD 2.x diffusers folder lacks the last block, so 1 is refused there.
    pub fn set_clip_skip(&mut self, clip_skip: usize) -> Result<()> {
        for encoder in &self.encoders {
            encoder.conditioning(Some(clip_skip))?;
        }
        self.clip_skip = Some(clip_skip);
        Ok(())
    }

    /// Back to the model family's clip skip.
    pub fn reset_clip_skip(&mut self) {
        self.clip_skip = None;
    }

    /// The clip skip prompts are encoded with.
    pub fn clip_skip(&self) -> usize {
        self.clip_skip
            .unwrap_or_else(|| self.encoders[0].default_conditioning().clip_skip)
    }

    /// The context's width: the text encoder's, or SDXL's two side by side (2048).
    pub fn dim(&self) -> usize {
        self.part_widths().iter().sum()
    }

    /// The width of each encoder's vectors, in conditioning order (SDXL: 768, 1280).
    pub fn part_widths(&self) -> Vec<usize> {
        self.encoders
            .iter()
            .map(|e| e.config().hidden_size)
            .collect()
    }

    /// The pooled vector's width (SDXL: 1280), `None` when the model has none.
    pub fn pooled_dim(&self) -> Option<usize> {
        self.encoders
            .iter()
            .find(|e| e.default_conditioning().pooled)
            .and_then(|e| e.config().projection_dim)
    }

    /// Registers (or replaces) `name` with `vectors` (`[n, dim]` row-major) for a model
    /// with one text encoder; SDXL words have a part per encoder
    /// ([`PromptEncoder::register_parts`]).
    pub fn register(&mut self, name: &str, vectors: &[f32]) -> Result<()> {
        if self.encoders.len() != 1 {
            return Err(Error::input(
                format!("vectors of '{name}'"),
                format!(
                    "an SDXL word has a part per text encoder (widths {:?}): register both",
                    self.part_widths()
                ),
            ));
        }
        self.register_parts(name, &[vectors])
    }

    /// Registers (or replaces) `name` with one row-major `[n, width]` table per text
    /// encoder, in conditioning order (SDXL: `clip_l` then `clip_g`), each with the same
    /// `n`.
    pub fn register_parts(&mut self, name: &str, parts: &[&[f32]]) -> Result<()> {
        if name.trim().is_empty() || name.chars().any(char::is_whitespace) {
            return Err(Error::input(
                "token",
                format!("'{name}' must be one word without spaces"),
            ));
        }
        let widths = self.part_widths();
        if parts.len() != widths.len() {
            return Err(Error::input(
                format!("vectors of '{name}'"),
                format!(
                    "{} parts given; this model's words have {} (widths {widths:?})",
                    parts.len(),
                    widths.len()
                ),
            ));
        }
        let mut rows = None;
        for (vectors, &dim) in parts.iter().zip(&widths) {
            let n = vectors.len() / dim.max(1);
            if vectors.is_empty() || !vectors.len().is_multiple_of(dim) || n > 75 {
                return Err(Error::input(
                    format!("vectors of '{name}'"),
                    format!(
                        "{} values are not 1..=75 vectors of width {dim}",
                        vectors.len()
                    ),
                ));
            }
            if vectors.iter().any(|v| !v.is_finite()) {
                return Err(Error::input(
                    format!("vectors of '{name}'"),
                    "contain NaN or infinity",
                ));
            }
            if rows.is_some_and(|r| r != n) {
                return Err(Error::input(
                    format!("vectors of '{name}'"),
                    format!(
                        "its parts have {} and {n} vectors: they must match",
                        rows.unwrap_or(0)
                    ),
                ));
            }
            rows = Some(n);
        }
        let entry = Registered {
            name: name.to_string(),
            parts: parts.iter().map(|p| p.to_vec()).collect(),
        };
        match self.words.iter_mut().find(|w| w.name == name) {
            Some(w) => *w = entry,
            None => self.words.push(entry),
        }
        Ok(())
    }

    /// Registers the word of an embedding file in any format sdti reads. The word is
    /// `name`, or the file's stem (as A1111 names embeddings).
    pub fn register_file(&mut self, name: Option<&str>, path: &Path) -> Result<String> {
        let emb = read_embedding(path)?;
        let word = match name {
            Some(n) => n.to_string(),
            None => path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .ok_or_else(|| Error::input(path.display().to_string(), "has no file name"))?,
        };
        let file = path.display().to_string();
        let widths = self.part_widths();
        let model = self.family().model_name();
        let wanted: Vec<Encoder> = self.encoders.iter().map(|e| e.encoder()).collect();
        let mut parts = Vec::with_capacity(wanted.len());
        for (&encoder, &dim) in wanted.iter().zip(&widths) {
            let part = match (encoder, emb.parts.as_slice()) {
                (Encoder::Single, [single]) => single,
                (Encoder::Single, several) => {
                    // An SDXL file: its clip_l part is the SD 1.x-width one, but it was
                    // trained with clip_g beside it; refuse rather than guess.
                    return Err(Error::input(
                        file,
                        format!(
                            "holds {} parts (an SDXL embedding?); this {model} model takes one part of width {dim}",
                            several.len()
                        ),
                    ));
                }
                (_, all) => all.iter().find(|p| p.encoder == encoder).ok_or_else(|| {
                    Error::input(
                        file.clone(),
                        format!(
                            "has no {} part: an SDXL word needs clip_l (768) and clip_g (1280) vectors{}",
                            match encoder {
                                Encoder::ClipL => "clip_l",
                                _ => "clip_g",
                            },
                            if all.len() == 1 {
                                " (this is a one-encoder embedding, for SD 1.x or 2.x)"
                            } else {
                                ""
                            }
                        ),
                    )
                })?,
            };
            if part.dim != dim {
                return Err(Error::input(
                    file,
                    format!(
                        "vectors of width {} do not fit this {model} model's text encoder (width {dim}){}",
                        part.dim,
                        match part.dim {
                            768 if wanted.len() == 1 => ": an SD 1.x embedding",
                            1024 => ": an SD 2.x embedding",
                            _ => "",
                        }
                    ),
                ));
            }
            parts.push(part.data.as_slice());
        }
        self.register_parts(&word, &parts)?;
        Ok(word)
    }

    /// Registered words in registration order, with their vector counts.
    pub fn words(&self) -> Vec<(String, usize)> {
        let dim = self.part_widths()[0].max(1);
        self.words
            .iter()
            .map(|w| (w.name.clone(), w.parts[0].len() / dim))
            .collect()
    }

    /// The words' slots and one vector table per encoder.
    fn layout(&self) -> (Vec<Word>, Vec<Vec<f32>>) {
        let widths = self.part_widths();
        let mut words = Vec::with_capacity(self.words.len());
        let mut tables = vec![Vec::new(); widths.len()];
        for w in &self.words {
            let offset = tables[0].len() / widths[0].max(1);
            words.push(Word {
                name: w.name.clone(),
                vectors: w.parts[0].len() / widths[0].max(1),
                offset,
            });
            for (table, part) in tables.iter_mut().zip(&w.parts) {
                table.extend_from_slice(part);
            }
        }
        (words, tables)
    }

    /// The prompt's slots in 77-slot chunks with their weights, as the chunk style's host
    /// lays them out ([`weighted_chunks`]). Fails where that host fails (A1111 on a
    /// weight that is not a number, `(a:1.2.3)`), or on a weight that is not finite.
    pub fn weighted_chunks(&self, prompt: &str) -> Result<Vec<Vec<WeightedSlot>>> {
        let (words, _) = self.layout();
        weighted_chunks(&self.tokenizer, prompt, &words, self.style, self.weights)
    }

    /// The prompt's slots in 77-slot chunks (BOS ... EOS, padded as the model's first
    /// text encoder takes them: with the end token for CLIP ViT-L (SD 1.x, SDXL's L), with
    /// 0 after each chunk's first end token for OpenCLIP (SD 2.x). SDXL's G takes the same
    /// slots with that 0 padding. With prompt weights on, brackets and weights are read
    /// (not tokens) and each slot carries its weight; a prompt the host cannot read
    /// ([`PromptEncoder::try_tokenize`] fails) is laid out as plain text here, and
    /// [`PromptEncoder::encode`] refuses it.
    pub fn tokenize(&self, prompt: &str) -> Vec<TokenSlot> {
        self.try_tokenize(prompt).unwrap_or_else(|_| {
            let (words, _) = self.layout();
            let plain = weighted_chunks(&self.tokenizer, prompt, &words, self.style, false)
                .unwrap_or_default();
            self.token_slots(plain)
        })
    }

    /// [`PromptEncoder::tokenize`], failing where the host fails to read the weights.
    pub fn try_tokenize(&self, prompt: &str) -> Result<Vec<TokenSlot>> {
        Ok(self.token_slots(self.weighted_chunks(prompt)?))
    }

    fn token_slots(&self, chunks: Vec<Vec<WeightedSlot>>) -> Vec<TokenSlot> {
        let pad = self.encoders[0].default_conditioning().pad_after_eos;
        chunks
            .into_iter()
            .flat_map(|chunk| {
                let mut ids: Vec<u32> = chunk
                    .iter()
                    .map(|s| match s.slot {
                        Slot::Token(id) => id,
                        Slot::Learned { .. } => crate::tokenizer::EOS,
                    })
                    .collect();
                if let Some(pad) = pad {
                    let learned = |i: usize| matches!(chunk[i].slot, Slot::Learned { .. });
                    pad_after_first_end_token(&mut ids, learned, pad);
                }
                chunk
                    .iter()
                    .zip(ids)
                    .map(|(s, id)| TokenSlot {
                        id,
                        learned: match s.slot {
                            Slot::Token(_) => None,
                            Slot::Learned { word, index } => Some((word, index)),
                        },
                        weight: s.weight,
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Hidden states `[chunks * 77, dim]` (f32) for `prompt` (SDXL: `[L ‖ G]`, 2048 wide).
    pub fn encode(&self, prompt: &str) -> Result<Tensor> {
        Ok(self.encode_with_pooled(prompt)?.0)
    }

    /// [`PromptEncoder::encode`] and the pooled vector `[pooled_dim]` (f32) of the first
    /// chunk, for models that have one (SDXL); what training conditions on.
    ///
    /// Prompt weights (on by default) are applied as the chunk style's host applies them:
    /// A1111's "Original" emphasis per chunk and per text encoder, or ComfyUI's
    /// interpolation from the empty prompt's states. The pooled vector is the unweighted
    /// one, in both hosts.
    pub fn encode_with_pooled(&self, prompt: &str) -> Result<(Tensor, Option<Tensor>)> {
        let chunks = self.weighted_chunks(prompt)?;
        let weights: Vec<f32> = chunks.iter().flatten().map(|s| s.weight).collect();
        let slots: Vec<Vec<Slot>> = chunks
            .iter()
            .map(|c| c.iter().map(|s| s.slot).collect())
            .collect();
        let (states, pooled) = self.encode_slots(&slots)?;
        if weights.iter().all(|&w| w == 1.0) {
            return Ok((states, pooled));
        }
        let states = match self.style {
            ChunkStyle::A1111 => emphasis_original(&states, &weights, &self.part_widths())?,
            ChunkStyle::ComfyUi => {
                let empty = chunk_slots(&[], self.style, None);
                let (empty_states, _) = self.encode_slots(&empty)?;
                comfy_interpolate(&states, &empty_states, &weights)?
            }
        };
        Ok((states, pooled))
    }

    /// Hidden states `[chunks * 77, dim]` and the pooled vector (f32) of laid-out chunks.
    fn encode_slots(&self, chunks: &[Vec<Slot>]) -> Result<(Tensor, Option<Tensor>)> {
        let (words, tables) = self.layout();
        let device: &Device = self.encoders[0].device();
        let enc = encode_chunks(&[chunks.to_vec()], &words, self.style, device)?;
        let tables = tables
            .into_iter()
            .zip(self.part_widths())
            .map(|(table, dim)| -> Result<Tensor> {
                Ok(if table.is_empty() {
                    Tensor::zeros((1, dim), DType::F32, device)?
                } else {
                    let rows = table.len() / dim;
                    Tensor::from_vec(table, (rows, dim), device)?
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let injections = Injection::per_table(&tables, &enc.index, &enc.mask);
        let parts: Vec<(&TextEncoder, Option<&Injection<'_>>)> = self
            .encoders
            .iter()
            .zip(&injections)
            .map(|(e, inj)| (e.as_ref(), Some(inj)))
            .collect();
        let (states, pooled) = encode_context(&parts, &enc.ids, Some(self.clip_skip()))?;
        let pooled = match pooled {
            Some(p) => Some(p.squeeze(0)?.to_dtype(DType::F32)?),
            None => None,
        };
        Ok((states.squeeze(0)?.to_dtype(DType::F32)?, pooled))
    }
}
