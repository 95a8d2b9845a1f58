//! Unicode NFC normalisation (canonical decomposition, reordering, composition) from the
//! embedded Unicode 14 table, as Python 3.11's `unicodedata.normalize("NFC", ...)` does.

use std::borrow::Cow;
use std::collections::HashMap;

use super::{gunzip, TokenizerError};

static NFC_GZ: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/assets/unicode_nfc.txt.gz"
));

pub(super) struct Nfc {
    /// Full (recursive) canonical decomposition, Hangul syllables excluded.
    decomp: HashMap<char, Vec<char>>,
    /// Primary composites.
    compose: HashMap<(char, char), char>,
    /// Canonical combining class ranges, sorted: (first, last, ccc).
    ccc: Vec<(u32, u32, u8)>,
}

fn parse_hex(s: &str) -> Result<char, TokenizerError> {
    u32::from_str_radix(s, 16)
        .ok()
        .and_then(char::from_u32)
        .ok_or_else(|| TokenizerError::UnicodeTable(format!("bad code point {s:?}")))
}

impl Nfc {
    pub(super) fn load() -> Result<Self, TokenizerError> {
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
            && (a32 - S_BASE).is_multiple_of(T_COUNT)
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
    pub(super) fn nfc<'a>(&self, s: &'a str) -> Cow<'a, str> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nfc_basics() {
        let nfc = match Nfc::load() {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(nfc.nfc("e\u{301}"), "\u{e9}");
        assert_eq!(nfc.nfc("\u{212b}"), "\u{c5}");
        assert_eq!(nfc.nfc("a\u{323}\u{308}"), "\u{1ea1}\u{308}");
        assert_eq!(nfc.nfc("\u{1100}\u{1161}\u{11a8}"), "\u{ac01}");
        assert_eq!(nfc.nfc("plain ascii"), "plain ascii");
    }
}
