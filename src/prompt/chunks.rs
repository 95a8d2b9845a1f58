//! Long prompts in 77-slot chunks, the way A1111 (`modules/sd_hijack_clip.py`,
//! `tokenize_line`) or ComfyUI (`comfy/sd1_clip.py`, `SDTokenizer.tokenize_with_weights`)
//! split them; see [`chunk_slots`]. The chunkers are generic over [`ChunkItem`], so a
//! [`WeightedSlot`]'s prompt weight moves with its token, as the hosts' multipliers do.

use crate::tokenizer::{BOS, CHUNK_TOKENS, CONTEXT_LEN, EOS};

/// A1111's `comma_padding_backtrack` default: how far back from the end of a full chunk a
/// comma may be for the text after it to move to the next chunk.
pub const A1111_COMMA_BACKTRACK: usize = 20;
/// ComfyUI's `max_word_length`: groups at least this long may be split across chunks.
pub const COMFY_MAX_WORD_LENGTH: usize = 8;

/// A token slot in a prompt: a vocabulary id, or a slot that carries vector `index` of
/// registered word `word`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Slot {
    /// A vocabulary token id.
    Token(u32),
    /// Vector `index` of learned (textual-inversion) word number `word`.
    Learned {
        /// Which registered word.
        word: usize,
        /// Which of its vectors.
        index: usize,
    },
}

/// Whose long-prompt chunking rules [`chunk_slots`] follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChunkStyle {
    /// AUTOMATIC1111 stable-diffusion-webui (`sd_hijack_clip.py`, `tokenize_line`).
    A1111,
    /// ComfyUI (`sd1_clip.py`, `SDTokenizer.tokenize_with_weights`).
    ComfyUi,
}

/// What the chunkers move around: a bare [`Slot`], or a [`WeightedSlot`] that carries
/// its prompt weight through the chunking (A1111's multipliers, ComfyUI's token
/// weights ride along with their tokens the same way).
pub trait ChunkItem: Copy {
    /// The slot itself.
    fn slot(&self) -> Slot;
    /// A start, end or padding slot (weight 1 where there is a weight).
    fn special(id: u32) -> Self;
}

impl ChunkItem for Slot {
    fn slot(&self) -> Slot {
        *self
    }
    fn special(id: u32) -> Self {
        Slot::Token(id)
    }
}

/// A slot and its prompt weight (1 where the prompt gives none; see
/// [`crate::prompt::weights`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WeightedSlot {
    pub slot: Slot,
    pub weight: f32,
}

impl ChunkItem for WeightedSlot {
    fn slot(&self) -> Slot {
        self.slot
    }
    fn special(id: u32) -> Self {
        WeightedSlot {
            slot: Slot::Token(id),
            weight: 1.0,
        }
    }
}

/// Length of the learned-word occurrence at the start of `slots`: `Learned` slots of one
/// word with consecutive indices (a slot with `index == 0` starts a new occurrence).
/// 0 if `slots` does not start with a `Learned` slot.
fn learned_run_len<T: ChunkItem>(slots: &[T]) -> usize {
    let mut n = 0;
    let mut prev: Option<(usize, usize)> = None;
    for s in slots {
        match (s.slot(), prev) {
            (Slot::Learned { word, index }, None) => prev = Some((word, index)),
            (Slot::Learned { word, index }, Some((w, i)))
                if word == w && index != 0 && Some(index) == i.checked_add(1) =>
            {
                prev = Some((word, index))
            }
            _ => break,
        }
        n += 1;
    }
    n
}

fn finish_chunk<T: ChunkItem>(body: &[T]) -> Vec<T> {
    let mut chunk = Vec::with_capacity(CONTEXT_LEN);
    chunk.push(T::special(BOS));
    chunk.extend_from_slice(body);
    chunk.resize(CONTEXT_LEN - 1, T::special(EOS));
    chunk.push(T::special(EOS));
    chunk
}

/// Split a long token sequence into 77-slot chunks (`[BOS, 75 slots, EOS]` each, padded
/// with EOS), the way A1111 / ComfyUI do. An empty input yields one chunk
/// `[BOS, EOS × 76]`.
///
/// A learned-word occurrence is a run of [`Slot::Learned`] slots of one `word` with
/// consecutive `index` values (a new occurrence starts at `index == 0`).
///
/// **A1111** (`FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line`; `BREAK` is
/// [`chunk_a1111_sections`]): tokens fill 75-slot chunks. When a chunk is full and the next slot is not
/// a comma, and the last comma (`comma_id`, normally `,</w>` = 267; `None` disables this)
/// sits at most [`A1111_COMMA_BACKTRACK`] slots before the end, everything after that
/// comma moves to the next chunk and the full one is padded. A comma that itself arrives
/// when the chunk is full opens the next chunk and is not remembered as a backtrack point
/// (as in A1111). A learned word that does not fit in the current chunk's remaining
/// slots pads the chunk and starts the next one. Deviations, both in cases where A1111
/// misbehaves: a learned word longer than 75 vectors (A1111 builds an over-long chunk) is
/// split across chunks; learned slots relocated by the comma backtrack move with the
/// text (A1111 leaves their vectors at the old offsets).
///
/// **ComfyUI** (`SDTokenizer.tokenize_with_weights`, current master, `pad_with_end`):
/// the sequence is cut into groups — each maximal run of [`Slot::Token`]s (ComfyUI's text
/// between `embedding:` references, within one weight segment) and each learned-word
/// occurrence. A group that does not fit in the current chunk is moved whole to the next
/// one (chunk padded with EOS) when shorter than [`COMFY_MAX_WORD_LENGTH`]; longer
/// groups fill the current chunk and continue in the next. Use [`chunk_groups_comfy`] to
/// supply the groups yourself (e.g. one per weight segment). `comma_id` is ignored.
pub fn chunk_slots(slots: &[Slot], style: ChunkStyle, comma_id: Option<u32>) -> Vec<Vec<Slot>> {
    match style {
        ChunkStyle::A1111 => chunk_a1111_sections(&[slots], comma_id),
        ChunkStyle::ComfyUi => chunk_groups_comfy(&comfy_groups(slots)),
    }
}

/// `slots` cut into ComfyUI's groups (see [`chunk_slots`]): each maximal run of
/// [`Slot::Token`]s and each learned-word occurrence.
pub fn comfy_groups<T: ChunkItem>(slots: &[T]) -> Vec<&[T]> {
    let mut groups: Vec<&[T]> = Vec::new();
    let mut pos = 0;
    while pos < slots.len() {
        let len = match slots[pos].slot() {
            Slot::Token(_) => slots[pos..]
                .iter()
                .take_while(|s| matches!(s.slot(), Slot::Token(_)))
                .count(),
            Slot::Learned { .. } => learned_run_len(&slots[pos..]),
        }
        .max(1);
        groups.push(&slots[pos..pos + len]);
        pos += len;
    }
    groups
}

/// ComfyUI's batching of pre-grouped slots (see [`chunk_slots`]): groups shorter than
/// [`COMFY_MAX_WORD_LENGTH`] are never split across chunks.
pub fn chunk_groups_comfy<G: AsRef<[Slot]>>(groups: &[G]) -> Vec<Vec<Slot>> {
    chunk_groups_comfy_items(groups)
}

/// [`chunk_groups_comfy`] for any [`ChunkItem`] (weighted slots keep their weights).
pub fn chunk_groups_comfy_items<T: ChunkItem, G: AsRef<[T]>>(groups: &[G]) -> Vec<Vec<T>> {
    let limit = CONTEXT_LEN - 1; // max_length - has_end_token
    let mut chunks: Vec<Vec<T>> = Vec::new();
    let mut batch: Vec<T> = vec![T::special(BOS)];
    for group in groups {
        let mut g = group.as_ref();
        let is_large = g.len() >= COMFY_MAX_WORD_LENGTH;
        while !g.is_empty() {
            if g.len() + batch.len() > limit {
                let remaining = limit.saturating_sub(batch.len());
                if is_large {
                    batch.extend_from_slice(&g[..remaining]);
                    g = &g[remaining..];
                }
                batch.resize(CONTEXT_LEN, T::special(EOS));
                chunks.push(std::mem::replace(&mut batch, vec![T::special(BOS)]));
            } else {
                batch.extend_from_slice(g);
                g = &[];
            }
        }
    }
    batch.resize(CONTEXT_LEN, T::special(EOS));
    chunks.push(batch);
    chunks
}

/// A1111's chunking (see [`chunk_slots`]) of a prompt that `BREAK` cut into `sections`:
/// each `BREAK` pads the chunk being filled (even an empty one, as A1111's
/// `next_chunk()` does) and forgets the last comma. A trailing `BREAK` adds no chunk.
pub fn chunk_a1111_sections<T: ChunkItem, S: AsRef<[T]>>(
    sections: &[S],
    comma_id: Option<u32>,
) -> Vec<Vec<T>> {
    let mut chunks: Vec<Vec<T>> = Vec::new();
    let mut chunk: Vec<T> = Vec::with_capacity(CHUNK_TOKENS);
    let mut last_comma: Option<usize> = None;
    for (n, section) in sections.iter().enumerate() {
        if n > 0 {
            chunks.push(finish_chunk(&chunk));
            chunk.clear();
            last_comma = None;
        }
        let slots = section.as_ref();
        let mut pos = 0;
        while pos < slots.len() {
            let item = slots[pos];
            let is_comma = matches!((item.slot(), comma_id), (Slot::Token(t), Some(c)) if t == c);
            if is_comma {
                last_comma = Some(chunk.len());
            } else if chunk.len() == CHUNK_TOKENS {
                if let Some(lc) = last_comma {
                    if CHUNK_TOKENS - lc <= A1111_COMMA_BACKTRACK {
                        let reloc = chunk.split_off(lc + 1);
                        chunks.push(finish_chunk(&chunk));
                        chunk = reloc;
                        last_comma = None;
                    }
                }
            }
            if chunk.len() >= CHUNK_TOKENS {
                chunks.push(finish_chunk(&chunk));
                chunk.clear();
                last_comma = None;
            }
            match item.slot() {
                Slot::Token(_) => {
                    chunk.push(item);
                    pos += 1;
                }
                Slot::Learned { .. } => {
                    let len = learned_run_len(&slots[pos..]).max(1);
                    let mut run = &slots[pos..pos + len];
                    if chunk.len() + run.len() > CHUNK_TOKENS {
                        if !chunk.is_empty() {
                            chunks.push(finish_chunk(&chunk));
                            chunk.clear();
                            last_comma = None;
                        }
                        // Only for words longer than a whole chunk (A1111 breaks there).
                        while run.len() > CHUNK_TOKENS {
                            chunks.push(finish_chunk(&run[..CHUNK_TOKENS]));
                            run = &run[CHUNK_TOKENS..];
                        }
                    }
                    chunk.extend_from_slice(run);
                    pos += len;
                }
            }
        }
    }
    if !chunk.is_empty() || chunks.is_empty() {
        chunks.push(finish_chunk(&chunk));
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(n: usize, base: u32) -> Vec<Slot> {
        (0..n).map(|i| Slot::Token(base + i as u32)).collect()
    }

    fn learned(word: usize, n: usize) -> Vec<Slot> {
        (0..n).map(|index| Slot::Learned { word, index }).collect()
    }

    #[test]
    fn run_lengths() {
        let mut s = learned(0, 3);
        s.extend(learned(0, 2));
        s.extend(learned(1, 4));
        assert_eq!(learned_run_len(&s), 3);
        assert_eq!(learned_run_len(&s[3..]), 2);
        assert_eq!(learned_run_len(&s[5..]), 4);
        assert_eq!(learned_run_len(&toks(2, 1)), 0);
    }
}
