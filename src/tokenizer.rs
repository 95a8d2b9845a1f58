//! CLIP byte-pair-encoding tokenizer of the Stable Diffusion 1.x text encoder
//! (OpenAI CLIP ViT-L/14), plus the prompt chunking rules of AUTOMATIC1111 and ComfyUI.
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
//! differently from a Python 3.11 reference (they are "unassigned", hence dropped, there).
//!
//! # Chunking
//!
//! [`chunk_slots`] splits a long prompt into 77-slot chunks the way A1111
//! (`modules/sd_hijack_clip.py`, `tokenize_line`) or ComfyUI (`comfy/sd1_clip.py`,
//! `SDTokenizer.tokenize_with_weights`) do; see its documentation.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Mutex, OnceLock};

use regex::Regex;

/// `<|startoftext|>`.
pub const BOS: u32 = 49406;
/// `<|endoftext|>`; also the padding token of the SD 1.x tokenizer (`pad_token`).
pub const EOS: u32 = 49407;
/// Number of entries in the vocabulary.
pub const VOCAB_SIZE: usize = 49408;
/// Length of one CLIP text-encoder input (BOS + 75 tokens + EOS).
pub const CONTEXT_LEN: usize = 77;
/// Prompt slots per chunk (between BOS and EOS).
pub const CHUNK_TOKENS: usize = CONTEXT_LEN - 2;
/// A1111's `comma_padding_backtrack` default: how far back from the end of a full chunk a
/// comma may be for the text after it to move to the next chunk.
pub const A1111_COMMA_BACKTRACK: usize = 20;
/// ComfyUI's `max_word_length`: groups at least this long may be split across chunks.
pub const COMFY_MAX_WORD_LENGTH: usize = 8;

const NUM_MERGES: usize = 49152 - 256 - 2;
const BOS_STR: &str = "<|startoftext|>";
const EOS_STR: &str = "<|endoftext|>";
const CACHE_LIMIT: usize = 1 << 16;

static VOCAB_GZ: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/assets/bpe_simple_vocab_16e6.txt.gz"
));
static NFC_GZ: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/assets/unicode_nfc.txt.gz"
));

/// CLIP's pre-tokenizer pattern as the Python `regex` module evaluates it under
/// `re.IGNORECASE`: the literal alternatives match case-insensitively, the positive
/// property classes do not case-fold, and the negated class excludes every character
/// with a case variant in `\s`/`\p{L}`/`\p{N}` — of the non-letters that is only
/// U+0345 COMBINING GREEK YPOGEGRAMMENI (checked over all code points), which therefore
/// matches no alternative and is dropped, as in the reference.
const PATTERN: &str = r"(?i:<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d)|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}\x{345}]+";

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

// ---------------------------------------------------------------------------------------
// Tables
// ---------------------------------------------------------------------------------------

struct Nfc {
    /// Full (recursive) canonical decomposition, Hangul syllables excluded.
    decomp: HashMap<char, Vec<char>>,
    /// Primary composites.
    compose: HashMap<(char, char), char>,
    /// Canonical combining class ranges, sorted: (first, last, ccc).
    ccc: Vec<(u32, u32, u8)>,
}

struct Tables {
    /// id -> token string.
    tokens: Vec<String>,
    /// token string -> id.
    ids: HashMap<String, u32>,
    /// (left id, right id) -> (merge rank, merged id).
    ranks: HashMap<(u32, u32), (u32, u32)>,
    /// byte -> id of its byte symbol (add 256 for the `</w>` form).
    byte_id: [u32; 256],
    /// byte-symbol char -> byte, for decoding.
    byte_of_char: HashMap<char, u8>,
    nfc: Nfc,
    pattern: Regex,
    /// Characters of general category C* (and U+FFFD), removed by `_clean_text`.
    other: Regex,
    /// BPE results per pre-token.
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

static TABLES: OnceLock<Result<Arc<Tables>, TokenizerError>> = OnceLock::new();

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

/// GPT-2 / CLIP `bytes_to_unicode`: for each vocabulary position 0..256, the byte it
/// stands for and the printable char that represents it.
fn bytes_to_unicode() -> Vec<(u8, char)> {
    let mut out: Vec<(u8, char)> = Vec::with_capacity(256);
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    for b in 0u32..256 {
        if printable(b) {
            if let (Ok(byte), Some(c)) = (u8::try_from(b), char::from_u32(b)) {
                out.push((byte, c));
            }
        }
    }
    let mut n = 0u32;
    for b in 0u32..256 {
        if !printable(b) {
            if let (Ok(byte), Some(c)) = (u8::try_from(b), char::from_u32(256 + n)) {
                out.push((byte, c));
            }
            n += 1;
        }
    }
    out
}

fn parse_hex(s: &str) -> Result<char, TokenizerError> {
    u32::from_str_radix(s, 16)
        .ok()
        .and_then(char::from_u32)
        .ok_or_else(|| TokenizerError::UnicodeTable(format!("bad code point {s:?}")))
}

impl Nfc {
    fn load() -> Result<Self, TokenizerError> {
        let text = gunzip("Unicode NFC table", NFC_GZ)?;
        let mut one_level: HashMap<char, Vec<char>> = HashMap::new();
        let mut compose = HashMap::new();
        let mut ccc = Vec::new();
        for line in text.lines() {
            let mut f = line.split(' ');
            match f.next() {
                Some("d") => {
                    let cp = parse_hex(f.next().unwrap_or(""))?;
                    let parts = f.map(parse_hex).collect::<Result<Vec<_>, _>>()?;
                    if parts.is_empty() {
                        return Err(TokenizerError::UnicodeTable(line.to_string()));
                    }
                    one_level.insert(cp, parts);
                }
                Some("p") => {
                    let parts = f.map(parse_hex).collect::<Result<Vec<_>, _>>()?;
                    match parts[..] {
                        [a, b, c] => {
                            compose.insert((a, b), c);
                        }
                        _ => return Err(TokenizerError::UnicodeTable(line.to_string())),
                    }
                }
                Some("c") => {
                    let parts: Vec<&str> = f.collect();
                    let (a, b, c) = match parts[..] {
                        [a, b, c] => (a, b, c),
                        _ => return Err(TokenizerError::UnicodeTable(line.to_string())),
                    };
                    let first = u32::from_str_radix(a, 16).ok();
                    let last = u32::from_str_radix(b, 16).ok();
                    let class = c.parse::<u8>().ok();
                    match (first, last, class) {
                        (Some(first), Some(last), Some(class)) if first <= last => {
                            ccc.push((first, last, class))
                        }
                        _ => return Err(TokenizerError::UnicodeTable(line.to_string())),
                    }
                }
                Some(s) if s.starts_with('#') || s.is_empty() => {}
                _ => return Err(TokenizerError::UnicodeTable(line.to_string())),
            }
        }
        ccc.sort_unstable();
        // Expand decompositions recursively (depth is tiny; guard against cycles anyway).
        let mut decomp = HashMap::with_capacity(one_level.len());
        for (&cp, parts) in &one_level {
            let mut cur = parts.clone();
            for _ in 0..8 {
                if !cur.iter().any(|c| one_level.contains_key(c)) {
                    break;
                }
                cur = cur
                    .iter()
                    .flat_map(|c| one_level.get(c).cloned().unwrap_or_else(|| vec![*c]))
                    .collect();
            }
            decomp.insert(cp, cur);
        }
        Ok(Nfc {
            decomp,
            compose,
            ccc,
        })
    }

    fn ccc(&self, c: char) -> u8 {
        let cp = c as u32;
        if cp < 0x300 {
            return 0;
        }
        let i = self.ccc.partition_point(|&(_, last, _)| last < cp);
        match self.ccc.get(i) {
            Some(&(first, _, class)) if first <= cp => class,
            _ => 0,
        }
    }

    fn compose_pair(&self, a: char, b: char) -> Option<char> {
        const S_BASE: u32 = 0xAC00;
        const L_BASE: u32 = 0x1100;
        const V_BASE: u32 = 0x1161;
        const T_BASE: u32 = 0x11A7;
        const L_COUNT: u32 = 19;
        const V_COUNT: u32 = 21;
        const T_COUNT: u32 = 28;
        const S_COUNT: u32 = L_COUNT * V_COUNT * T_COUNT;
        let (a32, b32) = (a as u32, b as u32);
        if (L_BASE..L_BASE + L_COUNT).contains(&a32) && (V_BASE..V_BASE + V_COUNT).contains(&b32) {
            return char::from_u32(S_BASE + ((a32 - L_BASE) * V_COUNT + (b32 - V_BASE)) * T_COUNT);
        }
        if (S_BASE..S_BASE + S_COUNT).contains(&a32)
            && (a32 - S_BASE) % T_COUNT == 0
            && (T_BASE + 1..T_BASE + T_COUNT).contains(&b32)
        {
            return char::from_u32(a32 + (b32 - T_BASE));
        }
        self.compose.get(&(a, b)).copied()
    }

    fn push_decomposed(&self, c: char, out: &mut Vec<char>) {
        const S_BASE: u32 = 0xAC00;
        const S_COUNT: u32 = 11172;
        let cp = c as u32;
        if (S_BASE..S_BASE + S_COUNT).contains(&cp) {
            let s = cp - S_BASE;
            let l = char::from_u32(0x1100 + s / 588);
            let v = char::from_u32(0x1161 + (s % 588) / 28);
            let t = s % 28;
            if let (Some(l), Some(v)) = (l, v) {
                out.push(l);
                out.push(v);
                if t != 0 {
                    if let Some(t) = char::from_u32(0x11A7 + t) {
                        out.push(t);
                    }
                }
                return;
            }
        }
        match self.decomp.get(&c) {
            Some(parts) => out.extend_from_slice(parts),
            None => out.push(c),
        }
    }

    /// Unicode NFC, as Python's `unicodedata.normalize("NFC", s)`.
    fn nfc<'a>(&self, s: &'a str) -> Cow<'a, str> {
        if s.chars().all(|c| (c as u32) < 0x300) && s.chars().all(|c| !self.decomp.contains_key(&c))
        {
            // No decomposable characters and no combining marks below U+0300.
            return Cow::Borrowed(s);
        }
        let mut chars: Vec<char> = Vec::with_capacity(s.len());
        for c in s.chars() {
            self.push_decomposed(c, &mut chars);
        }
        // Canonical ordering: stable sort of each run of non-starters by class.
        let mut i = 0;
        while i < chars.len() {
            if self.ccc(chars[i]) == 0 {
                i += 1;
                continue;
            }
            let start = i;
            while i < chars.len() && self.ccc(chars[i]) != 0 {
                i += 1;
            }
            chars[start..i].sort_by_key(|&c| self.ccc(c));
        }
        // Canonical composition.
        let mut out: Vec<char> = Vec::with_capacity(chars.len());
        let mut starter: Option<usize> = None;
        let mut last_ccc: u8 = 0;
        for c in chars {
            let class = self.ccc(c);
            if let Some(sp) = starter {
                let adjacent = out.len() == sp + 1;
                let unblocked = adjacent || (last_ccc != 0 && last_ccc < class);
                if unblocked {
                    if let Some(composed) = self.compose_pair(out[sp], c) {
                        out[sp] = composed;
                        continue;
                    }
                }
            }
            if class == 0 {
                starter = Some(out.len());
                last_ccc = 0;
            } else {
                last_ccc = class;
            }
            out.push(c);
        }
        Cow::Owned(out.into_iter().collect())
    }
}

impl Tables {
    fn load() -> Result<Self, TokenizerError> {
        let text = gunzip("BPE vocabulary", VOCAB_GZ)?;
        let lines: Vec<&str> = text.split('\n').collect();
        if lines.len() < NUM_MERGES + 1 {
            return Err(TokenizerError::Vocab(format!(
                "expected at least {} lines, found {}",
                NUM_MERGES + 1,
                lines.len()
            )));
        }
        let byte_syms = bytes_to_unicode();
        if byte_syms.len() != 256 {
            return Err(TokenizerError::Vocab(
                "byte alphabet is not 256 symbols".into(),
            ));
        }
        let mut merges: Vec<(&str, &str)> = Vec::with_capacity(NUM_MERGES);
        for (n, line) in lines[1..=NUM_MERGES].iter().enumerate() {
            let parts: Vec<&str> = line.split_whitespace().collect();
            match parts[..] {
                [a, b] => merges.push((a, b)),
                _ => {
                    return Err(TokenizerError::Vocab(format!(
                        "merge line {} is not a pair: {line:?}",
                        n + 1
                    )))
                }
            }
        }
        let mut tokens: Vec<String> = Vec::with_capacity(VOCAB_SIZE);
        tokens.extend(byte_syms.iter().map(|&(_, c)| c.to_string()));
        tokens.extend(byte_syms.iter().map(|&(_, c)| format!("{c}</w>")));
        tokens.extend(merges.iter().map(|&(a, b)| format!("{a}{b}")));
        tokens.push(BOS_STR.to_string());
        tokens.push(EOS_STR.to_string());
        if tokens.len() != VOCAB_SIZE {
            return Err(TokenizerError::Vocab(format!(
                "vocabulary has {} entries, expected {VOCAB_SIZE}",
                tokens.len()
            )));
        }
        let mut ids: HashMap<String, u32> = HashMap::with_capacity(VOCAB_SIZE);
        for (i, t) in tokens.iter().enumerate() {
            let id = u32::try_from(i).map_err(|e| TokenizerError::Vocab(e.to_string()))?;
            if ids.insert(t.clone(), id).is_some() {
                return Err(TokenizerError::Vocab(format!("duplicate token {t:?}")));
            }
        }
        let mut ranks = HashMap::with_capacity(NUM_MERGES);
        for (rank, &(a, b)) in merges.iter().enumerate() {
            let lookup = |s: &str| {
                ids.get(s)
                    .copied()
                    .ok_or_else(|| TokenizerError::Vocab(format!("merge part {s:?} not in vocab")))
            };
            let merged = lookup(&format!("{a}{b}"))?;
            let rank = u32::try_from(rank).map_err(|e| TokenizerError::Vocab(e.to_string()))?;
            ranks
                .entry((lookup(a)?, lookup(b)?))
                .or_insert((rank, merged));
        }
        let mut byte_id = [0u32; 256];
        let mut byte_of_char = HashMap::with_capacity(256);
        for (i, &(b, c)) in byte_syms.iter().enumerate() {
            byte_id[usize::from(b)] = i as u32;
            byte_of_char.insert(c, b);
        }
        let pattern = Regex::new(PATTERN).map_err(|e| TokenizerError::Pattern(e.to_string()))?;
        let other =
            Regex::new(r"[\p{C}\x{FFFD}]").map_err(|e| TokenizerError::Pattern(e.to_string()))?;
        Ok(Tables {
            tokens,
            ids,
            ranks,
            byte_id,
            byte_of_char,
            nfc: Nfc::load()?,
            pattern,
            other,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// BPE-merge one pre-token (a regex match of the normalised text).
    fn bpe(&self, word: &str) -> Vec<u32> {
        let bytes = word.as_bytes();
        let mut syms: Vec<u32> = bytes
            .iter()
            .map(|&b| self.byte_id[usize::from(b)])
            .collect();
        match syms.last_mut() {
            Some(last) => *last += 256,
            None => return Vec::new(),
        }
        while syms.len() > 1 {
            let best = syms
                .windows(2)
                .filter_map(|w| self.ranks.get(&(w[0], w[1])).map(|&(r, _)| (r, w[0], w[1])))
                .min_by_key(|&(r, _, _)| r);
            let Some((rank, first, second)) = best else {
                break;
            };
            let merged = self.ranks.get(&(first, second)).map_or(0, |&(_, m)| m);
            debug_assert_eq!(merged, 512 + rank);
            let mut out = Vec::with_capacity(syms.len());
            let mut i = 0;
            while i < syms.len() {
                if i + 1 < syms.len() && syms[i] == first && syms[i + 1] == second {
                    out.push(merged);
                    i += 2;
                } else {
                    out.push(syms[i]);
                    i += 1;
                }
            }
            syms = out;
        }
        syms
    }

    fn bpe_cached(&self, word: &str, out: &mut Vec<u32>) {
        if let Ok(cache) = self.cache.lock() {
            if let Some(ids) = cache.get(word) {
                out.extend_from_slice(ids);
                return;
            }
        }
        let ids = self.bpe(word);
        out.extend_from_slice(&ids);
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
            cache.insert(word.to_string(), ids);
        }
    }

    /// transformers' `BasicTokenizer(strip_accents=False, do_split_on_punc=False)`
    /// followed by `" ".join(...)`.
    fn normalize(&self, text: &str) -> String {
        // _clean_text + _tokenize_chinese_chars
        let mut cleaned = String::with_capacity(text.len() + 8);
        let push_segment = |seg: &str, out: &mut String| {
            for c in seg.chars() {
                if is_zs(c) {
                    out.push(' ');
                } else if is_cjk(c) {
                    out.push(' ');
                    out.push(c);
                    out.push(' ');
                } else {
                    out.push(c);
                }
            }
        };
        let mut last = 0;
        for m in self.other.find_iter(text) {
            push_segment(&text[last..m.start()], &mut cleaned);
            if matches!(m.as_str(), "\t" | "\n" | "\r") {
                cleaned.push(' ');
            }
            last = m.end();
        }
        push_segment(&text[last..], &mut cleaned);
        let normalized = self.nfc.nfc(&cleaned);
        let mut out = String::with_capacity(normalized.len());
        for word in normalized.split(is_py_space).filter(|w| !w.is_empty()) {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(&word.to_lowercase());
        }
        out
    }

    fn encode_piece(&self, piece: &str, out: &mut Vec<u32>) {
        let normalized = self.normalize(piece);
        for m in self.pattern.find_iter(&normalized) {
            match m.as_str() {
                BOS_STR => out.push(BOS),
                EOS_STR => out.push(EOS),
                word => self.bpe_cached(word, out),
            }
        }
    }

    fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut rest = text;
        loop {
            let next = [(BOS_STR, BOS), (EOS_STR, EOS)]
                .iter()
                .filter_map(|&(s, id)| rest.find(s).map(|pos| (pos, s.len(), id)))
                .min_by_key(|&(pos, _, _)| pos);
            match next {
                Some((pos, len, id)) => {
                    if pos > 0 {
                        self.encode_piece(&rest[..pos], &mut out);
                    }
                    out.push(id);
                    rest = &rest[pos + len..];
                }
                None => {
                    if !rest.is_empty() {
                        self.encode_piece(rest, &mut out);
                    }
                    return out;
                }
            }
        }
    }
}

/// General category Zs (stable set since Unicode 6.3).
fn is_zs(c: char) -> bool {
    matches!(
        c,
        ' ' | '\u{a0}' | '\u{1680}' | '\u{2000}'
            ..='\u{200a}' | '\u{202f}' | '\u{205f}' | '\u{3000}'
    )
}

/// Python's `str.isspace()` (what `str.split()` / `str.strip()` use).
fn is_py_space(c: char) -> bool {
    matches!(c, '\t'..='\r' | '\u{1c}'..='\u{20}' | '\u{85}' | '\u{a0}' | '\u{1680}'
        | '\u{2000}'..='\u{200a}' | '\u{2028}' | '\u{2029}' | '\u{202f}' | '\u{205f}' | '\u{3000}')
}

/// BERT's "Chinese character" ranges (`BasicTokenizer._is_chinese_char`).
fn is_cjk(c: char) -> bool {
    matches!(c as u32, 0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F | 0x2B820..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}

fn tables() -> Result<Arc<Tables>, TokenizerError> {
    TABLES.get_or_init(|| Tables::load().map(Arc::new)).clone()
}

// ---------------------------------------------------------------------------------------
// Public tokenizer
// ---------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------
// Chunking
// ---------------------------------------------------------------------------------------

/// Length of the learned-word occurrence at the start of `slots`: `Learned` slots of one
/// word with consecutive indices (a slot with `index == 0` starts a new occurrence).
/// 0 if `slots` does not start with a `Learned` slot.
fn learned_run_len(slots: &[Slot]) -> usize {
    let mut n = 0;
    let mut prev: Option<(usize, usize)> = None;
    for s in slots {
        match (*s, prev) {
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

fn finish_chunk(body: &[Slot]) -> Vec<Slot> {
    let mut chunk = Vec::with_capacity(CONTEXT_LEN);
    chunk.push(Slot::Token(BOS));
    chunk.extend_from_slice(body);
    chunk.resize(CONTEXT_LEN - 1, Slot::Token(EOS));
    chunk.push(Slot::Token(EOS));
    chunk
}

/// Split a long token sequence into 77-slot chunks (`[BOS, 75 slots, EOS]` each, padded
/// with EOS), the way A1111 / ComfyUI do. An empty input yields one chunk
/// `[BOS, EOS × 76]`.
///
/// A learned-word occurrence is a run of [`Slot::Learned`] slots of one `word` with
/// consecutive `index` values (a new occurrence starts at `index == 0`).
///
/// **A1111** (`FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line`, BREAK not
/// represented): tokens fill 75-slot chunks. When a chunk is full and the next slot is not
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
        ChunkStyle::A1111 => chunk_a1111(slots, comma_id),
        ChunkStyle::ComfyUi => {
            let mut groups: Vec<&[Slot]> = Vec::new();
            let mut pos = 0;
            while pos < slots.len() {
                let len = match slots[pos] {
                    Slot::Token(_) => slots[pos..]
                        .iter()
                        .take_while(|s| matches!(s, Slot::Token(_)))
                        .count(),
                    Slot::Learned { .. } => learned_run_len(&slots[pos..]),
                }
                .max(1);
                groups.push(&slots[pos..pos + len]);
                pos += len;
            }
            chunk_groups_comfy(&groups)
        }
    }
}

/// ComfyUI's batching of pre-grouped slots (see [`chunk_slots`]): groups shorter than
/// [`COMFY_MAX_WORD_LENGTH`] are never split across chunks.
pub fn chunk_groups_comfy<G: AsRef<[Slot]>>(groups: &[G]) -> Vec<Vec<Slot>> {
    let limit = CONTEXT_LEN - 1; // max_length - has_end_token
    let mut chunks: Vec<Vec<Slot>> = Vec::new();
    let mut batch: Vec<Slot> = vec![Slot::Token(BOS)];
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
                batch.resize(CONTEXT_LEN, Slot::Token(EOS));
                chunks.push(std::mem::replace(&mut batch, vec![Slot::Token(BOS)]));
            } else {
                batch.extend_from_slice(g);
                g = &[];
            }
        }
    }
    batch.resize(CONTEXT_LEN, Slot::Token(EOS));
    chunks.push(batch);
    chunks
}

fn chunk_a1111(slots: &[Slot], comma_id: Option<u32>) -> Vec<Vec<Slot>> {
    let mut chunks: Vec<Vec<Slot>> = Vec::new();
    let mut chunk: Vec<Slot> = Vec::with_capacity(CHUNK_TOKENS);
    let mut last_comma: Option<usize> = None;
    let mut pos = 0;
    while pos < slots.len() {
        let slot = slots[pos];
        let is_comma = matches!((slot, comma_id), (Slot::Token(t), Some(c)) if t == c);
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
        match slot {
            Slot::Token(_) => {
                chunk.push(slot);
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

    #[test]
    fn nfc_basics() {
        let t = match tables() {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(t.nfc.nfc("e\u{301}"), "\u{e9}");
        assert_eq!(t.nfc.nfc("\u{212b}"), "\u{c5}");
        assert_eq!(t.nfc.nfc("a\u{323}\u{308}"), "\u{1ea1}\u{308}");
        assert_eq!(t.nfc.nfc("\u{1100}\u{1161}\u{11a8}"), "\u{ac01}");
        assert_eq!(t.nfc.nfc("plain ascii"), "plain ascii");
    }
}
