//! Prompts that use learned words: finding the words in the text, laying out token slots
//! in 77-slot chunks, and the id/index/mask tensors the text encoder takes.
//!
//! A learned word is recognised in three spellings, as the hosts write it: the bare word
//! (A1111 uses the embedding file's stem), `embedding:word` (ComfyUI; a file extension
//! after the name is ignored) and `<word>` (diffusers' placeholder tokens). Prompt weights
//! (`(word:1.2)`, `[word]`, `BREAK`) are read as A1111 or ComfyUI read them in
//! [`weights`].

pub mod chunks;
pub mod encoder;
pub mod weights;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::prompt::chunks::{chunk_slots, ChunkStyle, Slot};
use crate::tokenizer::ClipTokenizer;

/// A word whose vectors live in rows `offset .. offset + vectors` of a vector table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Word {
    pub name: String,
    pub vectors: usize,
    pub offset: usize,
}

/// Where a learned word occurs in `text`: (start, end, word index).
fn find_words(text: &str, words: &[Word]) -> Vec<(usize, usize, usize)> {
    let mut order: Vec<usize> = (0..words.len()).collect();
    // Longest names first, so "cat-v2" wins over "cat".
    order.sort_by_key(|&i| std::cmp::Reverse(words[i].name.len()));
    let bytes = text.as_bytes();
    let is_word_byte = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b >= 0x80;
    let mut found = Vec::new();
    let mut pos = 0;
    'scan: while pos < text.len() {
        if !text.is_char_boundary(pos) {
            pos += 1;
            continue;
        }
        let at_boundary = pos == 0 || !is_word_byte(bytes[pos - 1]);
        if at_boundary {
            for &w in &order {
                let name = words[w].name.as_str();
                if name.is_empty() {
                    continue;
                }
                let rest = &text[pos..];
                let candidates = [
                    (format!("embedding:{name}"), true),
                    (format!("<{name}>"), false),
                    (name.to_string(), true),
                ];
                for (pattern, needs_end_boundary) in candidates {
                    if let Some(after) = rest.strip_prefix(pattern.as_str()) {
                        let mut end = pos + pattern.len();
                        // ComfyUI allows the file extension: embedding:name.pt
                        if pattern.starts_with("embedding:") {
                            for ext in [".safetensors", ".pt", ".bin"] {
                                if after.starts_with(ext) {
                                    end += ext.len();
                                }
                            }
                        }
                        let ends_ok =
                            !needs_end_boundary || end == text.len() || !is_word_byte(bytes[end]);
                        if ends_ok {
                            found.push((pos, end, w));
                            pos = end;
                            continue 'scan;
                        }
                    }
                }
            }
        }
        pos += 1;
    }
    found
}

/// The slots of `text` (no BOS/EOS): vocabulary tokens and learned-vector slots.
pub fn prompt_slots(tokenizer: &ClipTokenizer, text: &str, words: &[Word]) -> Vec<Slot> {
    let mut slots = Vec::new();
    let mut last = 0;
    for (start, end, w) in find_words(text, words) {
        slots.extend(
            tokenizer
                .encode(&text[last..start])
                .into_iter()
                .map(Slot::Token),
        );
        slots.extend((0..words[w].vectors).map(|index| Slot::Learned { word: w, index }));
        last = end;
    }
    slots.extend(tokenizer.encode(&text[last..]).into_iter().map(Slot::Token));
    slots
}

/// Token ids, vector-table rows and the learned-slot mask of a batch of prompts.
#[derive(Clone, Debug)]
pub struct EncodedPrompts {
    /// `[B, 77 * chunks]` u32; learned slots hold 0.
    pub ids: Tensor,
    /// `[B, 77 * chunks]` u32: the table row of each learned slot, 0 elsewhere.
    pub index: Tensor,
    /// `[B, 77 * chunks]` f32: 1 on learned slots.
    pub mask: Tensor,
    /// Chunks per prompt (all prompts are padded to the longest).
    pub chunks: usize,
}

/// Lays out prompts as SD conditions on them: `[BOS, 75 slots, EOS]` chunks padded with
/// EOS, every prompt padded with empty chunks to the longest. The text is plain (what
/// training conditions on): prompt weights are [`weights::weighted_chunks`]'s.
pub fn encode_prompts(
    tokenizer: &ClipTokenizer,
    texts: &[String],
    words: &[Word],
    style: ChunkStyle,
    device: &Device,
) -> Result<EncodedPrompts> {
    let per_prompt: Vec<Vec<Vec<Slot>>> = texts
        .iter()
        .map(|t| {
            chunk_slots(
                &prompt_slots(tokenizer, t, words),
                style,
                tokenizer.comma_id(),
            )
        })
        .collect();
    encode_chunks(&per_prompt, words, style, device)
}

/// [`encode_prompts`] for prompts already laid out in 77-slot chunks (one list of
/// chunks per prompt; shorter prompts are padded with empty chunks).
pub fn encode_chunks(
    per_prompt: &[Vec<Vec<Slot>>],
    words: &[Word],
    style: ChunkStyle,
    device: &Device,
) -> Result<EncodedPrompts> {
    let chunks = per_prompt.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let width = crate::tokenizer::CONTEXT_LEN * chunks;
    let mut ids = Vec::with_capacity(per_prompt.len() * width);
    let mut index = Vec::with_capacity(per_prompt.len() * width);
    let mut mask = Vec::with_capacity(per_prompt.len() * width);
    let empty = chunk_slots(&[], style, None);
    for prompt in per_prompt {
        for c in 0..chunks {
            let chunk = prompt.get(c).or(empty.first()).ok_or_else(|| {
                Error::input(
                    "prompt",
                    "the tokenizer produced no chunk for an empty prompt",
                )
            })?;
            if chunk.len() != crate::tokenizer::CONTEXT_LEN {
                return Err(Error::input(
                    "prompt",
                    format!("a chunk of {} slots instead of 77", chunk.len()),
                ));
            }
            for slot in chunk {
                match *slot {
                    Slot::Token(id) => {
                        ids.push(id);
                        index.push(0);
                        mask.push(0f32);
                    }
                    Slot::Learned { word, index: i } => {
                        let row = words.get(word).map(|w| w.offset + i).ok_or_else(|| {
                            Error::input(
                                "prompt",
                                format!("learned word #{word} is not registered"),
                            )
                        })?;
                        ids.push(0);
                        index.push(row as u32);
                        mask.push(1.0);
                    }
                }
            }
        }
    }
    let b = per_prompt.len();
    Ok(EncodedPrompts {
        ids: Tensor::from_vec(ids, (b, width), device)?,
        index: Tensor::from_vec(index, (b, width), device)?,
        mask: Tensor::from_vec(mask, (b, width), device)?,
        chunks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words() -> Vec<Word> {
        vec![
            Word {
                name: "sks".into(),
                vectors: 2,
                offset: 0,
            },
            Word {
                name: "sks-v2".into(),
                vectors: 1,
                offset: 2,
            },
        ]
    }

    #[test]
    fn finds_each_spelling_on_word_boundaries() {
        let w = words();
        let text = "a sks, embedding:sks-v2.pt and <sks> but not asks or sks_x";
        let found: Vec<(String, usize)> = find_words(text, &w)
            .into_iter()
            .map(|(s, e, i)| (text[s..e].to_string(), i))
            .collect();
        assert_eq!(
            found,
            vec![
                ("sks".to_string(), 0),
                ("embedding:sks-v2.pt".to_string(), 1),
                ("<sks>".to_string(), 0)
            ]
        );
    }

    #[test]
    fn slots_carry_every_vector_of_the_word() -> Result<()> {
        let tok = ClipTokenizer::new()?;
        let slots = prompt_slots(&tok, "a photo of sks toy", &words());
        let learned: Vec<&Slot> = slots
            .iter()
            .filter(|s| matches!(s, Slot::Learned { .. }))
            .collect();
        assert_eq!(learned.len(), 2);
        let enc = encode_prompts(
            &tok,
            &["a photo of sks toy".into()],
            &words(),
            ChunkStyle::A1111,
            &Device::Cpu,
        )?;
        assert_eq!(enc.ids.dims(), &[1, 77]);
        let mask: Vec<f32> = enc.mask.flatten_all()?.to_vec1()?;
        assert_eq!(mask.iter().filter(|&&m| m == 1.0).count(), 2);
        // BOS, a, photo, of, [v0, v1], toy, EOS
        assert_eq!(mask[4], 1.0);
        assert_eq!(mask[5], 1.0);
        Ok(())
    }
}
