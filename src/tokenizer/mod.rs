//! CLIP byte-pair-encoding tokenizer of the Stable Diffusion 1.x text encoder
//! (OpenAI CLIP ViT-L/14). The BPE tables and the normalisation pipeline are in `bpe`,
//! Unicode NFC in `nfc`; long prompts are chunked in [`crate::prompt::chunks`].
//!
//! # Reference behaviour
//!
//! Token ids are identical to transformers' *slow* `CLIPTokenizer` (transformers 4.x, the
//! class diffusers, ComfyUI and A1111 instantiate for SD 1.x) built from the
//! `vocab.json` / `merges.txt` pair that `openai/clip-vit-large-patch14` ships, which is
//! derived from the embedded `bpe_simple_vocab_16e6.txt.gz` (header line, then merges
//! 1..=48 894; vocabulary = 256 byte symbols, the same with `</w>`, the joined merges,
//! `<|startoftext|>` = 49406, `<|endoftext|>` = 49407).
//!
//! ## Normalisation: the no-ftfy (`BasicTokenizer`) path
//!
//! `CLIPTokenizer` normalises text in one of two ways, depending on whether the `ftfy`
//! package can be imported:
//!
//! * with ftfy: `whitespace_clean(ftfy.fix_text(text)).lower()` (ftfy also un-escapes
//!   HTML entities such as `&amp;`, straightens curly quotes, folds full-width forms and
//!   Latin ligatures, repairs mojibake heuristically);
//! * without ftfy: transformers' `BasicTokenizer(strip_accents=False,
//!   do_split_on_punc=False)`.
//!
//! This module implements the **no-ftfy path**, because
//! (1) it is what a default ComfyUI install (requirements: `transformers`, `tokenizers`,
//! no `ftfy`) and a default diffusers install run, and ComfyUI is where most SD 1.x
//! embeddings are used today; A1111 does pull ftfy in (through `open-clip-torch` and the
//! OpenAI `CLIP` package), so A1111 differs on the inputs listed above;
//! (2) it is fully specified and can be reproduced exactly, whereas ftfy's repairs are
//! heuristic. For ordinary prompts (ASCII or precomposed accented text, punctuation,
//! weights syntax) all variants give the same ids.
//!
//! The no-ftfy pipeline, reproduced step by step:
//! 1. split the raw text on the exact strings `<|startoftext|>` / `<|endoftext|>`
//!    (transformers' added-token trie); those become [`BOS`] / [`EOS`];
//! 2. for each remaining piece: drop U+0000, U+FFFD and every character of general
//!    category `C*` except `\t \n \r`; turn `\t \n \r` and `Zs` into a space; put spaces
//!    around CJK ideographs (the BERT ranges); NFC-normalise; split on (Python) whitespace;
//!    lower-case each word (full Unicode lower-casing, final sigma included); join with
//!    single spaces;
//! 3. find tokens with CLIP's pattern (case-insensitive)
//!    `<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`;
//!    a match equal to a special-token string maps to that special token, anything else
//!    is byte-encoded and BPE-merged (last symbol carries `</w>`).
//!
//! Differences from `CLIPTokenizerFast` (and from transformers 5, whose `CLIPTokenizer`
//! *is* the fast one): the fast tokenizer keeps control / format characters (e.g.
//! zero-width joiners, `\x00`) as byte tokens, does not space out CJK ideographs (so
//! `猫犬` is one BPE word there), lower-cases a word-final `Σ` to `σ` rather than `ς`, and
//! does not pre-split on case-sensitive special tokens (`!<|ENDOFTEXT|>`). On plain
//! prompts both agree.
//!
//! Unicode data: NFC tables come from `assets/unicode_nfc.txt.gz` (Unicode 14, generated
//! with Python 3.11 by `tests/reference/make_nfc_table.py`); general categories and
//! `\p{L}`/`\p{N}` come from the `regex` crate and lower-casing from `std`, whose Unicode
//! versions are newer, so characters assigned after Unicode 14 may be treated

mod bpe;
mod nfc;

use std::io::Read;
use std::sync::Arc;

use bpe::{is_py_space, tables, Tables};

/// `<|startoftext|>`.
pub const BOS: u32 = 49406;
/// `<|endoftext|>`; also the padding token of the SD 1.x tokenizer (`pad_token`).
pub const EOS: u32 = 49407;
/// Number of entries in the vocabulary.
pub const VOCAB_SIZE: usize = 49408;
/// Length of one CLIP text-encoder input (BOS + 75 tokens + EOS).
pub const CONTEXT_LEN: usize = crate::model::config::CLIP_CONTEXT_LEN;
/// Prompt slots per chunk (between BOS and EOS).
pub const CHUNK_TOKENS: usize = CONTEXT_LEN - 2;

/// Errors while building the tokenizer tables.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenizerError {
    /// An embedded gzip asset could not be decompressed or is not UTF-8.
    #[error("cannot decompress embedded {what}: {msg}")]
    Decompress {
        /// Which asset.
        what: &'static str,
        /// The underlying error.
        msg: String,
    },
    /// The BPE merge list does not have the expected shape.
    #[error("malformed BPE vocabulary: {0}")]
    Vocab(String),
    /// The embedded Unicode normalisation table is malformed.
    #[error("malformed Unicode table: {0}")]
    UnicodeTable(String),
    /// A regular expression failed to compile.
    #[error("cannot compile pre-tokenizer pattern: {0}")]
    Pattern(String),
}

fn gunzip(what: &'static str, data: &[u8]) -> Result<String, TokenizerError> {
    let mut out = String::new();
    flate2::read::GzDecoder::new(data)
        .read_to_string(&mut out)
        .map_err(|e| TokenizerError::Decompress {
            what,
            msg: e.to_string(),
        })?;
    Ok(out)
}

/// The SD 1.x CLIP tokenizer. Cheap to create after the first one (all instances share
/// the decoded tables and the BPE cache); `Send + Sync`.
#[derive(Clone)]
pub struct ClipTokenizer {
    t: Arc<Tables>,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.t.tokens.len())
            .finish()
    }
}

impl ClipTokenizer {
    /// Build from the embedded vocabulary (decoded once per process).
    pub fn new() -> Result<Self, TokenizerError> {
        Ok(Self { t: tables()? })
    }

    /// Token ids of `text`, without BOS/EOS, normalised and lower-cased as the reference
    /// does. Literal `<|startoftext|>` / `<|endoftext|>` in the text become BOS / EOS.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.t.encode(text)
    }

    /// `[BOS, ids (first 75), EOS, EOS padding]`, always [`CONTEXT_LEN`] long — what
    /// `tokenizer(text, padding="max_length", max_length=77, truncation=True)` returns.
    pub fn encode_padded(&self, text: &str) -> Vec<u32> {
        let ids = self.encode(text);
        let mut out = Vec::with_capacity(CONTEXT_LEN);
        out.push(BOS);
        out.extend(ids.iter().take(CHUNK_TOKENS));
        out.push(EOS);
        out.resize(CONTEXT_LEN, EOS);
        out
    }

    /// Text of `ids` as the reference's `convert_tokens_to_string` gives it: token bytes
    /// joined, decoded as UTF-8 with replacement characters, `</w>` turned into a space,
    /// surrounding whitespace stripped. Special tokens are kept as their text; ids outside
    /// the vocabulary are skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            if let Some(tok) = self.id_to_token(id) {
                for c in tok.chars() {
                    // Every vocabulary char is a byte symbol; specials are ASCII.
                    if let Some(&b) = self.t.byte_of_char.get(&c) {
                        bytes.push(b);
                    }
                }
            }
        }
        let text = String::from_utf8_lossy(&bytes).replace("</w>", " ");
        text.trim_matches(is_py_space).to_string()
    }

    /// The vocabulary string of `id` (byte-level symbols, `</w>` marks a word end).
    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.t
            .tokens
            .get(usize::try_from(id).ok()?)
            .map(String::as_str)
    }

    /// The id of a vocabulary string (e.g. `"cat</w>"`, `",</w>"`, `"<|endoftext|>"`).
    pub fn token_to_id(&self, tok: &str) -> Option<u32> {
        self.t.ids.get(tok).copied()
    }

    /// Id of `,</w>`, the comma A1111 backtracks to (267).
    pub fn comma_id(&self) -> Option<u32> {
        self.token_to_id(",</w>")
    }
}
