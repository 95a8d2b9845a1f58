//! The BPE tables decoded from the embedded merge list, and the no-ftfy normalisation and
//! pre-tokenisation pipeline the module documentation describes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use regex::Regex;

use super::nfc::Nfc;
use super::{gunzip, TokenizerError, BOS, EOS, VOCAB_SIZE};

const NUM_MERGES: usize = 49152 - 256 - 2;
const BOS_STR: &str = "<|startoftext|>";
const EOS_STR: &str = "<|endoftext|>";
const CACHE_LIMIT: usize = 1 << 16;

static VOCAB_GZ: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/assets/bpe_simple_vocab_16e6.txt.gz"
));

/// CLIP's pre-tokenizer pattern as the Python `regex` module evaluates it under
/// `re.IGNORECASE`: the literal alternatives match case-insensitively, the positive
/// property classes do not case-fold, and the negated class excludes every character
/// with a case variant in `\s`/`\p{L}`/`\p{N}` — of the non-letters that is only
/// U+0345 COMBINING GREEK YPOGEGRAMMENI (checked over all code points), which therefore
/// matches no alternative and is dropped, as in the reference.
const PATTERN: &str = r"(?i:<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d)|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}\x{345}]+";

pub(super) struct Tables {
    /// id -> token string.
    pub(super) tokens: Vec<String>,
    /// token string -> id.
    pub(super) ids: HashMap<String, u32>,
    /// (left id, right id) -> (merge rank, merged id).
    ranks: HashMap<(u32, u32), (u32, u32)>,
    /// byte -> id of its byte symbol (add 256 for the `</w>` form).
    byte_id: [u32; 256],
    /// byte-symbol char -> byte, for decoding.
    pub(super) byte_of_char: HashMap<char, u8>,
    nfc: Nfc,
    pattern: Regex,
    /// Characters of general category C* (and U+FFFD), removed by `_clean_text`.
    other: Regex,
    /// BPE results per pre-token.
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

static TABLES: OnceLock<Result<Arc<Tables>, TokenizerError>> = OnceLock::new();

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

    pub(super) fn encode(&self, text: &str) -> Vec<u32> {
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
pub(super) fn is_py_space(c: char) -> bool {
    matches!(c, '\t'..='\r' | '\u{1c}'..='\u{20}' | '\u{85}' | '\u{a0}' | '\u{1680}'
        | '\u{2000}'..='\u{200a}' | '\u{2028}' | '\u{2029}' | '\u{202f}' | '\u{205f}' | '\u{3000}')
}

/// BERT's "Chinese character" ranges (`BasicTokenizer._is_chinese_char`).
fn is_cjk(c: char) -> bool {
    matches!(c as u32, 0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F | 0x2B820..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}

pub(super) fn tables() -> Result<Arc<Tables>, TokenizerError> {
    TABLES.get_or_init(|| Tables::load().map(Arc::new)).clone()
}
