//! Conditioning for hosts: a text encoder with registered learned words, turning prompts
//! into the hidden states a UNet is conditioned on.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::{encode_prompts, prompt_slots, Word};
use crate::embedding::read_embedding;
use crate::error::{Error, Result};
use crate::model::clip::pad_after_first_end_token;
use crate::model::{Injection, TextEncoder};
use crate::prompt::chunks::{chunk_slots, ChunkStyle, Slot};
use crate::tokenizer::ClipTokenizer;

/// A registered word and its vectors.
#[derive(Clone, Debug)]
struct Registered {
    name: String,
    vectors: Vec<f32>,
}

/// One token slot of a tokenized prompt, for hosts that run their own text encoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenSlot {
    /// The vocabulary id (for learned slots, the end-of-text id as a stand-in).
    pub id: u32,
    /// `Some((word, vector))` where the slot carries a learned vector.
    pub learned: Option<(usize, usize)>,
}

/// Prompts to hidden states with learned words injected. Holds only the text encoder
/// (shared with a model or a trainer, or loaded alone with [`TextEncoder::load`]).
pub struct PromptEncoder {
    text_encoder: Arc<TextEncoder>,
    tokenizer: ClipTokenizer,
    words: Vec<Registered>,
    style: ChunkStyle,
    /// `None`: the model family's ([`TextEncoder::default_conditioning`]).
    clip_skip: Option<usize>,
}

impl PromptEncoder {
    pub fn new(text_encoder: Arc<TextEncoder>) -> Result<Self> {
        Ok(Self {
            text_encoder,
            tokenizer: ClipTokenizer::new()?,
            words: Vec::new(),
            style: ChunkStyle::A1111,
            clip_skip: None,
        })
    }

    pub fn text_encoder(&self) -> &Arc<TextEncoder> {
        &self.text_encoder
    }

    /// Long prompts are chunked the way A1111 (default) or ComfyUI do it.
    pub fn set_chunk_style(&mut self, style: ChunkStyle) {
        self.style = style;
    }

    /// Conditions on `hidden_states[-clip_skip]` of the full-depth text encoder (1 = the
    /// last layer). Unset, the model family's: 1 for SD 1.x, 2 for SD 2.x (its OpenCLIP
    /// encoder's penultimate block) and SDXL. An SD 2.x diffusers folder lacks the last
    /// block, so 1 is refused there.
    pub fn set_clip_skip(&mut self, clip_skip: usize) -> Result<()> {
        self.text_encoder.conditioning(Some(clip_skip))?;
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
            .unwrap_or_else(|| self.text_encoder.default_conditioning().clip_skip)
    }

    /// The text encoder's width.
    pub fn dim(&self) -> usize {
        self.text_encoder.config().hidden_size
    }

    /// Registers (or replaces) `name` with `vectors` (`[n, dim]` row-major).
    pub fn register(&mut self, name: &str, vectors: &[f32]) -> Result<()> {
        let dim = self.dim();
        let n = vectors.len() / dim.max(1);
        if name.trim().is_empty() || name.chars().any(char::is_whitespace) {
            return Err(Error::input(
                "token",
                format!("'{name}' must be one word without spaces"),
            ));
        }
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
        let entry = Registered {
            name: name.to_string(),
            vectors: vectors.to_vec(),
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
        let dim = self.dim();
        let part = match emb.parts.as_slice() {
            [single] => single,
            parts => {
                // An SDXL file: its clip_l part is the SD 1.x-width one, but it was
                // trained with clip_g beside it; refuse rather than guess.
                return Err(Error::input(
                    path.display().to_string(),
                    format!(
                        "holds {} parts (an SDXL embedding?); this SD 1.x model takes one part of width {dim}",
                        parts.len()
                    ),
                ));
            }
        };
        if part.dim != dim {
            return Err(Error::input(
                path.display().to_string(),
                format!(
                    "vectors of width {} do not fit this model's text encoder (width {dim}){}",
                    part.dim,
                    if part.dim == 1024 {
                        ": an SD 2.x embedding"
                    } else {
                        ""
                    }
                ),
            ));
        }
        self.register(&word, &part.data)?;
        Ok(word)
    }

    /// Registered words in registration order.
    pub fn words(&self) -> Vec<(String, usize)> {
        let dim = self.dim();
        self.words
            .iter()
            .map(|w| (w.name.clone(), w.vectors.len() / dim))
            .collect()
    }

    fn layout(&self) -> (Vec<Word>, Vec<f32>) {
        let dim = self.dim();
        let mut words = Vec::with_capacity(self.words.len());
        let mut table = Vec::new();
        for w in &self.words {
            words.push(Word {
                name: w.name.clone(),
                vectors: w.vectors.len() / dim,
                offset: table.len() / dim,
            });
            table.extend_from_slice(&w.vectors);
        }
        (words, table)
    }

    /// The prompt's slots in 77-slot chunks (BOS ... EOS, padded as the model's text
    /// encoder takes them: with the end token for CLIP ViT-L, with 0 after each chunk's
    /// first end token for OpenCLIP (SD 2.x)).
    pub fn tokenize(&self, prompt: &str) -> Vec<TokenSlot> {
        let (words, _) = self.layout();
        let slots = prompt_slots(&self.tokenizer, prompt, &words);
        let pad = self.text_encoder.default_conditioning().pad_after_eos;
        chunk_slots(&slots, self.style, self.tokenizer.comma_id())
            .into_iter()
            .flat_map(|chunk| {
                let mut ids: Vec<u32> = chunk
                    .iter()
                    .map(|s| match *s {
                        Slot::Token(id) => id,
                        Slot::Learned { .. } => crate::tokenizer::EOS,
                    })
                    .collect();
                if let Some(pad) = pad {
                    let learned = |i: usize| matches!(chunk[i], Slot::Learned { .. });
                    pad_after_first_end_token(&mut ids, learned, pad);
                }
                chunk
                    .iter()
                    .zip(ids)
                    .map(|(s, id)| TokenSlot {
                        id,
                        learned: match *s {
                            Slot::Token(_) => None,
                            Slot::Learned { word, index } => Some((word, index)),
                        },
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Hidden states `[chunks * 77, dim]` (f32) for `prompt`.
    pub fn encode(&self, prompt: &str) -> Result<Tensor> {
        let (words, table) = self.layout();
        let device: &Device = self.text_encoder.device();
        let enc = encode_prompts(
            &self.tokenizer,
            &[prompt.to_string()],
            &words,
            self.style,
            device,
        )?;
        let dim = self.dim();
        let rows = (table.len() / dim).max(1);
        let table = if table.is_empty() {
            Tensor::zeros((1, dim), DType::F32, device)?
        } else {
            Tensor::from_vec(table, (rows, dim), device)?
        };
        let injection = Injection {
            table: &table,
            index: &enc.index,
            mask: &enc.mask,
        };
        let states = self
            .text_encoder
            .encode(&enc.ids, Some(&injection), self.clip_skip())?;
        Ok(states.squeeze(0)?.to_dtype(DType::F32)?)
    }
}
