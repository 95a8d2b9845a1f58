//! Prompt weights as the hosts read them: A1111's emphasis (`(word)`, `[word]`,
//! `(word:1.3)`, `BREAK`, escapes) and ComfyUI's (`(word:1.3)` and nesting), each parsed
//! the way that host's own parser does it, laid out in 77-slot chunks with the weights
//! riding along, and applied to the encoder's hidden states by that host's rule.
//!
//! Sources followed (the commits are in `tests/reference/README.md`):
//! * A1111 `modules/prompt_parser.py` `parse_prompt_attention` ([`parse_a1111`]),
//!   `modules/sd_hijack_clip.py` `tokenize_line` (`BREAK`, multipliers per token) and
//!   `modules/sd_emphasis.py` `EmphasisOriginal`, the default "Original" emphasis: each
//!   chunk's states are multiplied by their tokens' weights, then scaled back to the
//!   chunk's original mean ([`emphasis_original`]). Per text encoder: SDXL's two are
//!   weighted each on its own, and the pooled vector is taken before weighting.
//! * ComfyUI `comfy/sd1_clip.py` `escape_important`, `token_weights`,
//!   `parse_parentheses` ([`parse_comfyui`]), `SDTokenizer.tokenize_with_weights` and
//!   `ClipTokenWeightEncoder.encode_token_weights`: where a token's weight is not 1 its
//!   state becomes `(z - z_empty) * w + z_empty`, `z_empty` the states of the empty
//!   prompt ([`comfy_interpolate`]); the pooled vector is the unweighted first chunk's.
//!
//! Of A1111's emphasis modes only its default, "Original", is implemented; "None" (no
//! parsing) is prompt weights off ([`weighted_chunks`] with `weights` false), and "No norm"
//! and "Ignore" are not offered. ComfyUI has one rule.
//!
//! Deviations, all for inputs that the hosts turn into NaN, infinity or a crash: a weight
//! that is not finite (`(a:inf)` in ComfyUI, 400 digits in A1111) is refused, and so is
//! ComfyUI nesting deeper than [`MAX_COMFY_NESTING`] (Python's recursion limit stops
//! ComfyUI there). Python's `\d` and `float()` also read non-ASCII decimal digits
//! (`(a:１.２)`); sdti reads ASCII digits only and treats such text as ComfyUI/A1111 treat
//! any other text that is not a number.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::prompt::chunks::{
    chunk_a1111_sections, chunk_groups_comfy_items, comfy_groups, ChunkStyle, WeightedSlot,
};
use crate::prompt::{prompt_slots, Word};
use crate::tokenizer::{ClipTokenizer, CONTEXT_LEN};

/// A1111's `(word)` multiplier.
pub const A1111_ROUND: f64 = 1.1;
/// ComfyUI's `(word)` multiplier.
pub const COMFY_ROUND: f64 = 1.1;
/// The deepest ComfyUI nesting read (ComfyUI's recursive `token_weights` meets Python's
/// recursion limit of 1000 not far above).
pub const MAX_COMFY_NESTING: usize = 500;

/// A piece of a parsed prompt and its weight. A1111 marks a `BREAK` as the piece
/// `("BREAK", -1)`, as `parse_prompt_attention` does ([`Span::is_break`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Span {
    pub text: String,
    pub weight: f64,
}

impl Span {
    fn new(text: impl Into<String>, weight: f64) -> Self {
        Span {
            text: text.into(),
            weight,
        }
    }

    /// A1111's `BREAK` marker: text `BREAK` with weight exactly -1 (a `BREAK` inside
    /// brackets has its -1 multiplied, and A1111 then reads it as the word "BREAK").
    pub fn is_break(&self) -> bool {
        self.text == "BREAK" && self.weight == -1.0
    }
}

/// Python's `\w` for `str` patterns (alphanumerics and `_`).
fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Python's `\s` for `str` patterns (also the ASCII separators 0x1c..0x1f).
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `re.split(r"\s*\bBREAK\b\s*", text)`.
fn split_break(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut last = 0;
    let mut p = 0;
    while p < text.len() {
        let rest = &text[p..];
        let ws: usize = rest
            .chars()
            .take_while(|&c| is_py_space(c))
            .map(char::len_utf8)
            .sum();
        let q = p + ws;
        let before_ok = text[..q]
            .chars()
            .next_back()
            .is_none_or(|c| !is_word_char(c));
        if before_ok && text[q..].starts_with("BREAK") {
            let r = q + "BREAK".len();
            let after_ok = text[r..].chars().next().is_none_or(|c| !is_word_char(c));
            if after_ok {
                let trail: usize = text[r..]
                    .chars()
                    .take_while(|&c| is_py_space(c))
                    .map(char::len_utf8)
                    .sum();
                parts.push(&text[last..p]);
                last = r + trail;
                p = last;
                continue;
            }
        }
        p += rest.chars().next().map_or(1, char::len_utf8);
    }
    parts.push(&text[last..]);
    parts
}

/// One match of A1111's `re_attention`.
enum A1111Token<'a> {
    /// `\(`, `\)`, `\[`, `\]`, `\\` (the escaped character) or a lone `\` (nothing).
    Escaped(&'a str),
    OpenRound,
    OpenSquare,
    /// `:NUMBER)`, with the number's text (`[+-]?[.\d]+`) and the whole match.
    Weight(&'a str, &'a str),
    CloseRound,
    CloseSquare,
    /// Text without `\ ( ) [ ] :`, or a `:` that starts no weight.
    Plain(&'a str),
}

fn a1111_tokens(text: &str) -> Vec<A1111Token<'_>> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => match b.get(i + 1) {
                Some(b'(' | b')' | b'[' | b']' | b'\\') => {
                    out.push(A1111Token::Escaped(&text[i + 1..i + 2]));
                    i += 2;
                }
                _ => {
                    out.push(A1111Token::Escaped(""));
                    i += 1;
                }
            },
            b'(' => {
                out.push(A1111Token::OpenRound);
                i += 1;
            }
            b'[' => {
                out.push(A1111Token::OpenSquare);
                i += 1;
            }
            b':' => {
                let mut j = i + 1;
                if matches!(b.get(j), Some(b'+' | b'-')) {
                    j += 1;
                }
                let k = j + b[j..]
                    .iter()
                    .take_while(|c| c.is_ascii_digit() || **c == b'.')
                    .count();
                if k > j && b.get(k) == Some(&b')') {
                    out.push(A1111Token::Weight(&text[i + 1..k], &text[i..k + 1]));
                    i = k + 1;
                } else {
                    out.push(A1111Token::Plain(&text[i..i + 1]));
                    i += 1;
                }
            }
            b')' => {
                out.push(A1111Token::CloseRound);
                i += 1;
            }
            b']' => {
                out.push(A1111Token::CloseSquare);
                i += 1;
            }
            _ => {
                let n = b[i..]
                    .iter()
                    .take_while(|c| !matches!(c, b'\\' | b'(' | b')' | b'[' | b']' | b':'))
                    .count();
                out.push(A1111Token::Plain(&text[i..i + n]));
                i += n;
            }
        }
    }
    out
}

/// A1111's `parse_prompt_attention`: the prompt as `(text, weight)` pieces, runs of equal
/// weight merged, `BREAK` as `("BREAK", -1)`. `(a)` multiplies by 1.1, `[a]` divides by
/// 1.1, `(a:1.3)` multiplies by 1.3, brackets left open apply to the end of the prompt,
/// a `)` or `]` without its opening bracket and a `:` that is no weight are text, `\(`
/// `\)` `\[` `\]` `\\` are the characters and a lone `\` is dropped. A weight A1111
/// cannot read (`(a:1.2.3)`, `(a:.)`) is an error there (Python's `float()` raises) and
/// here.
pub fn parse_a1111(text: &str) -> Result<Vec<Span>> {
    let mut res: Vec<Span> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<Span>, start: usize, m: f64| {
        for s in &mut res[start..] {
            s.weight *= m;
        }
    };
    for token in a1111_tokens(text) {
        match token {
            A1111Token::Escaped(c) => res.push(Span::new(c, 1.0)),
            A1111Token::OpenRound => round.push(res.len()),
            A1111Token::OpenSquare => square.push(res.len()),
            A1111Token::Weight(number, _) if !round.is_empty() => {
                let w: f64 = number.parse().map_err(|_| {
                    Error::input(
                        "prompt",
                        format!(
                            "the weight in ':{number})' is not a number (A1111 fails on this prompt too)"
                        ),
                    )
                })?;
                if let Some(start) = round.pop() {
                    multiply(&mut res, start, w);
                }
            }
            A1111Token::CloseRound if !round.is_empty() => {
                if let Some(start) = round.pop() {
                    multiply(&mut res, start, A1111_ROUND);
                }
            }
            A1111Token::CloseSquare if !square.is_empty() => {
                if let Some(start) = square.pop() {
                    multiply(&mut res, start, 1.0 / A1111_ROUND);
                }
            }
            other => {
                let plain = match other {
                    A1111Token::Weight(_, whole) => whole,
                    A1111Token::CloseRound => ")",
                    A1111Token::CloseSquare => "]",
                    A1111Token::Plain(t) => t,
                    _ => "",
                };
                for (i, part) in split_break(plain).into_iter().enumerate() {
                    if i > 0 {
                        res.push(Span::new("BREAK", -1.0));
                    }
                    res.push(Span::new(part, 1.0));
                }
            }
        }
    }
    for start in round {
        multiply(&mut res, start, A1111_ROUND);
    }
    for start in square {
        multiply(&mut res, start, 1.0 / A1111_ROUND);
    }
    if res.is_empty() {
        res.push(Span::new("", 1.0));
    }
    let mut i = 0;
    while i + 1 < res.len() {
        if res[i].weight == res[i + 1].weight {
            let next = res.remove(i + 1);
            res[i].text.push_str(&next.text);
        } else {
            i += 1;
        }
    }
    Ok(res)
}

/// ComfyUI's `parse_parentheses`: top-level text and `( ... )` groups.
fn parse_parentheses(string: &str) -> Vec<String> {
    let mut result = Vec::new();
    let mut current = String::new();
    let mut nesting: i64 = 0;
    for c in string.chars() {
        match c {
            '(' => {
                if nesting == 0 {
                    if !current.is_empty() {
                        result.push(std::mem::take(&mut current));
                    }
                    current = "(".into();
                } else {
                    current.push(c);
                }
                nesting += 1;
            }
            ')' => {
                nesting -= 1;
                if nesting == 0 {
                    current.push(')');
                    result.push(std::mem::take(&mut current));
                } else {
                    current.push(c);
                }
            }
            _ => current.push(c),
        }
    }
    if !current.is_empty() {
        result.push(current);
    }
    result
}

/// Python's `float(str)` for ASCII text: surrounding whitespace, `_` between digits,
/// `inf`/`infinity`/`nan` with a sign, any case.
fn python_float(s: &str) -> Option<f64> {
    let t = s.trim_matches(is_py_space);
    let body = t.strip_prefix(['+', '-']).unwrap_or(t);
    let lower = body.to_ascii_lowercase();
    if matches!(lower.as_str(), "inf" | "infinity" | "nan") {
        return t.parse().ok();
    }
    // Underscores only between two digits.
    let b = t.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        if c == b'_' {
            let digit = |j: Option<usize>| j.and_then(|j| b.get(j)).is_some_and(u8::is_ascii_digit);
            if !digit(i.checked_sub(1)) || !digit(Some(i + 1)) {
                return None;
            }
        } else if !(c.is_ascii_digit() || matches!(c, b'.' | b'e' | b'E' | b'+' | b'-')) {
            return None;
        }
    }
    t.replace('_', "").parse().ok()
}

/// ComfyUI's `token_weights`, with its recursion.
fn comfy_token_weights(
    string: &str,
    current: f64,
    depth: usize,
    out: &mut Vec<Span>,
) -> Result<()> {
    if depth > MAX_COMFY_NESTING {
        return Err(Error::input(
            "prompt",
            format!("brackets nested deeper than {MAX_COMFY_NESTING} levels (ComfyUI fails on deep nesting too)"),
        ));
    }
    for x in parse_parentheses(string) {
        let n = x.chars().count();
        if n >= 2 && x.starts_with('(') && x.ends_with(')') {
            let inner = &x[1..x.len() - 1];
            let mut weight = current * COMFY_ROUND;
            let mut text = inner;
            if let Some(colon) = inner.rfind(':').filter(|&c| c > 0) {
                if let Some(w) = python_float(&inner[colon + 1..]) {
                    weight = w;
                    text = &inner[..colon];
                }
            }
            comfy_token_weights(text, weight, depth + 1, out)?;
        } else {
            out.push(Span::new(x, current));
        }
    }
    Ok(())
}

/// ComfyUI's reading of a prompt (`escape_important`, `token_weights(text, 1.0)`, then
/// `unescape_important` on each piece): `(a)` multiplies by 1.1 at each level, `(a:1.3)`
/// sets 1.3 whatever the enclosing weight (ComfyUI does not multiply it), a weight that
/// is not a number leaves the colon in the text and keeps the 1.1, `[a]` is text, `\(`
/// and `\)` are the characters (other backslashes stay), unbalanced brackets follow
/// `parse_parentheses` (a `(` left open makes the rest plain text, brackets and all).
/// Pieces are not merged, and empty groups give no piece.
pub fn parse_comfyui(text: &str) -> Result<Vec<Span>> {
    let escaped = text.replace("\\)", "\0\u{1}").replace("\\(", "\0\u{2}");
    let mut out = Vec::new();
    comfy_token_weights(&escaped, 1.0, 0, &mut out)?;
    for s in &mut out {
        s.text = s.text.replace("\0\u{1}", ")").replace("\0\u{2}", "(");
    }
    Ok(out)
}

/// The prompt's spans as `style`'s host reads them.
pub fn parse(text: &str, style: ChunkStyle) -> Result<Vec<Span>> {
    match style {
        ChunkStyle::A1111 => parse_a1111(text),
        ChunkStyle::ComfyUi => parse_comfyui(text),
    }
}

fn weighted(slots: Vec<crate::prompt::chunks::Slot>, weight: f32) -> Vec<WeightedSlot> {
    slots
        .into_iter()
        .map(|slot| WeightedSlot { slot, weight })
        .collect()
}

/// The prompt's slots in 77-slot chunks with their weights, as `style`'s host lays them
/// out: each piece tokenized on its own, learned words found within a piece (so a word
/// inside a weighted span has the span's weight on every one of its vectors), A1111's
/// `BREAK` starting a new chunk, ComfyUI's pieces kept whole across chunk ends when short.
/// With `weights` false the prompt is read as plain text (brackets are tokens) and every
/// weight is 1.
pub fn weighted_chunks(
    tokenizer: &ClipTokenizer,
    text: &str,
    words: &[Word],
    style: ChunkStyle,
    weights: bool,
) -> Result<Vec<Vec<WeightedSlot>>> {
    let comma = tokenizer.comma_id();
    if !weights {
        let slots = weighted(prompt_slots(tokenizer, text, words), 1.0);
        return Ok(match style {
            ChunkStyle::A1111 => chunk_a1111_sections(&[slots], comma),
            ChunkStyle::ComfyUi => chunk_groups_comfy_items(&comfy_groups(&slots)),
        });
    }
    let spans = parse(text, style)?;
    let check = |s: &Span| -> Result<f32> {
        let w = s.weight as f32;
        if w.is_finite() {
            Ok(w)
        } else {
            Err(Error::input(
                "prompt",
                format!(
                    "the weight of '{}' is {} (refused: it would make the conditioning NaN or infinite)",
                    s.text, s.weight
                ),
            ))
        }
    };
    Ok(match style {
        ChunkStyle::A1111 => {
            let mut sections: Vec<Vec<WeightedSlot>> = vec![Vec::new()];
            for s in &spans {
                if s.is_break() {
                    sections.push(Vec::new());
                    continue;
                }
                let w = check(s)?;
                if let Some(last) = sections.last_mut() {
                    last.extend(weighted(prompt_slots(tokenizer, &s.text, words), w));
                }
            }
            chunk_a1111_sections(&sections, comma)
        }
        ChunkStyle::ComfyUi => {
            let mut groups: Vec<Vec<WeightedSlot>> = Vec::new();
            for s in &spans {
                let w = check(s)?;
                let slots = weighted(prompt_slots(tokenizer, &s.text, words), w);
                groups.extend(comfy_groups(&slots).into_iter().map(<[_]>::to_vec));
            }
            chunk_groups_comfy_items(&groups)
        }
    })
}

/// The mean of a tensor's values, accumulated in f64 (torch's `mean` sums pairwise; a
/// plain f32 sum would drift further from it).
fn mean_f64(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?)
}

/// A1111's "Original" emphasis (`EmphasisOriginal.after_transformers`) on hidden states
/// `[chunks * 77, dim]` (f32), one weight per row: within each 77-row chunk and each
/// encoder's columns (`parts`: their widths, SDXL's `[768, 1280]`), `z = z * w`, then `z
/// *= mean(z before) / mean(z after)`. Chunks whose weights are all 1 are left as they
/// are (A1111's arithmetic leaves them bit for bit too).
pub fn emphasis_original(states: &Tensor, weights: &[f32], parts: &[usize]) -> Result<Tensor> {
    let (rows, dim) = states.dims2()?;
    check_rows(rows, weights.len(), parts, dim)?;
    let mut chunks = Vec::with_capacity(rows / CONTEXT_LEN);
    for c in 0..rows / CONTEXT_LEN {
        let w = &weights[c * CONTEXT_LEN..(c + 1) * CONTEXT_LEN];
        let z = states.narrow(0, c * CONTEXT_LEN, CONTEXT_LEN)?;
        if w.iter().all(|&x| x == 1.0) {
            chunks.push(z);
            continue;
        }
        let m = Tensor::from_slice(w, (CONTEXT_LEN, 1), states.device())?;
        let mut cols = Vec::with_capacity(parts.len());
        let mut offset = 0;
        for &width in parts {
            let part = z.narrow(1, offset, width)?;
            offset += width;
            let original = mean_f64(&part)? as f32;
            let scaled = part.broadcast_mul(&m)?;
            let new = mean_f64(&scaled)? as f32;
            let ratio = original / new;
            if !ratio.is_finite() {
                return Err(Error::input(
                    "prompt",
                    "A1111's emphasis divides by the weighted states' mean, which is 0 here: change the weights",
                ));
            }
            cols.push((scaled * f64::from(ratio))?);
        }
        chunks.push(Tensor::cat(&cols, 1)?);
    }
    Ok(Tensor::cat(&chunks, 0)?)
}

/// ComfyUI's weighting (`ClipTokenWeightEncoder.encode_token_weights`) on hidden states
/// `[chunks * 77, dim]` (f32), one weight per row: a row whose weight is not 1 becomes
/// `(z - z_empty) * w + z_empty`, `z_empty` (`[77, dim]`) the states of the empty
/// prompt at the same position; rows of weight 1 stay as they are. SDXL's `[L ‖ G]` is
/// weighted column for column, each encoder against its own empty prompt.
pub fn comfy_interpolate(states: &Tensor, empty: &Tensor, weights: &[f32]) -> Result<Tensor> {
    let (rows, dim) = states.dims2()?;
    check_rows(rows, weights.len(), &[dim], dim)?;
    if empty.dims() != [CONTEXT_LEN, dim] {
        return Err(Error::input(
            "empty prompt states",
            format!("shape {:?}, not [{CONTEXT_LEN}, {dim}]", empty.dims()),
        ));
    }
    let empty = empty.to_dtype(states.dtype())?;
    let mut chunks = Vec::with_capacity(rows / CONTEXT_LEN);
    for c in 0..rows / CONTEXT_LEN {
        let w = &weights[c * CONTEXT_LEN..(c + 1) * CONTEXT_LEN];
        let z = states.narrow(0, c * CONTEXT_LEN, CONTEXT_LEN)?;
        if w.iter().all(|&x| x == 1.0) {
            chunks.push(z);
            continue;
        }
        let device = states.device();
        let m = Tensor::from_slice(w, (CONTEXT_LEN, 1), device)?;
        let flags: Vec<u8> = w.iter().map(|&x| u8::from(x != 1.0)).collect();
        let mask =
            Tensor::from_vec(flags, (CONTEXT_LEN, 1), device)?.broadcast_as((CONTEXT_LEN, dim))?;
        let moved = (z.sub(&empty)?.broadcast_mul(&m)? + &empty)?;
        chunks.push(mask.where_cond(&moved, &z)?);
    }
    Ok(Tensor::cat(&chunks, 0)?)
}

fn check_rows(rows: usize, weights: usize, parts: &[usize], dim: usize) -> Result<()> {
    if !rows.is_multiple_of(CONTEXT_LEN) || rows != weights || parts.iter().sum::<usize>() != dim {
        return Err(Error::input(
            "prompt weights",
            format!(
                "{weights} weights for {rows} rows of width {dim} (parts {parts:?}): the rows must be whole chunks of {CONTEXT_LEN}, one weight each"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(v: &[(&str, f64)]) -> Vec<Span> {
        v.iter().map(|&(t, w)| Span::new(t, w)).collect()
    }

    #[test]
    fn a1111_doctests() -> Result<()> {
        // The examples in parse_prompt_attention's docstring.
        assert_eq!(parse_a1111("normal text")?, spans(&[("normal text", 1.0)]));
        assert_eq!(
            parse_a1111("an (important) word")?,
            spans(&[("an ", 1.0), ("important", 1.1), (" word", 1.0)])
        );
        assert_eq!(parse_a1111("(unbalanced")?, spans(&[("unbalanced", 1.1)]));
        assert_eq!(parse_a1111("\\(literal\\]")?, spans(&[("(literal]", 1.0)]));
        assert_eq!(
            parse_a1111("(unnecessary)(parens)")?,
            spans(&[("unnecessaryparens", 1.1)])
        );
        assert_eq!(
            parse_a1111("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")?,
            spans(&[
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ])
        );
        Ok(())
    }

    #[test]
    fn a1111_break_and_malformed() -> Result<()> {
        assert_eq!(
            parse_a1111("a BREAK b")?,
            spans(&[("a", 1.0), ("BREAK", -1.0), ("b", 1.0)])
        );
        // Not a word boundary: text.
        assert_eq!(parse_a1111("aBREAK b")?, spans(&[("aBREAK b", 1.0)]));
        assert_eq!(parse_a1111("a:b)")?, spans(&[("a:b)", 1.0)]));
        assert_eq!(parse_a1111("x :1.5) y")?, spans(&[("x :1.5) y", 1.0)]));
        assert_eq!(parse_a1111("(a:abc)")?, spans(&[("a:abc", 1.1)]));
        assert_eq!(parse_a1111("a\\b")?, spans(&[("ab", 1.0)]));
        assert!(parse_a1111("(a:1.2.3)").is_err());
        assert!(parse_a1111("(a:.)").is_err());
        assert_eq!(parse_a1111("(a:1.)")?, spans(&[("a", 1.0)]));
        assert_eq!(parse_a1111("(a:.5)")?, spans(&[("a", 0.5)]));
        assert_eq!(parse_a1111("")?, spans(&[("", 1.0)]));
        Ok(())
    }

    #[test]
    fn comfy_reads_as_comfyui() -> Result<()> {
        assert_eq!(
            parse_comfyui("a (b) ((c)) (d:1.5) [e]")?,
            spans(&[
                ("a ", 1.0),
                ("b", 1.1),
                (" ", 1.0),
                ("c", 1.1 * 1.1),
                (" ", 1.0),
                ("d", 1.5),
                (" [e]", 1.0)
            ])
        );
        // An inner explicit weight replaces the enclosing one.
        assert_eq!(parse_comfyui("((d:1.5))")?, spans(&[("d", 1.5)]));
        assert_eq!(parse_comfyui("(a:abc)")?, spans(&[("a:abc", 1.1)]));
        assert_eq!(parse_comfyui("(a: 2 )")?, spans(&[("a", 2.0)]));
        assert_eq!(parse_comfyui("(a:1_5)")?, spans(&[("a", 15.0)]));
        assert_eq!(parse_comfyui("\\(a\\) b")?, spans(&[("(a) b", 1.0)]));
        assert_eq!(parse_comfyui("(a")?, spans(&[("(a", 1.0)]));
        assert_eq!(parse_comfyui("a) (b")?, spans(&[("a) (b", 1.0)]));
        assert_eq!(parse_comfyui("()")?, spans(&[]));
        assert_eq!(parse_comfyui("(:2)")?, spans(&[(":2", 1.1)]));
        let deep = format!("{}a{}", "(".repeat(600), ")".repeat(600));
        assert!(parse_comfyui(&deep).is_err());
        Ok(())
    }

    #[test]
    fn python_floats() {
        assert_eq!(python_float(" 1.5 "), Some(1.5));
        assert_eq!(python_float("1."), Some(1.0));
        assert_eq!(python_float("-.5"), Some(-0.5));
        assert_eq!(python_float("1e2"), Some(100.0));
        assert_eq!(python_float("1_000"), Some(1000.0));
        assert_eq!(python_float("_1"), None);
        assert_eq!(python_float("1__0"), None);
        assert_eq!(python_float("abc"), None);
        assert_eq!(python_float(""), None);
        assert!(python_float("-Infinity").is_some_and(|x| x == f64::NEG_INFINITY));
        assert!(python_float("nan").is_some_and(f64::is_nan));
    }

    #[test]
    fn weights_follow_their_tokens_into_chunks() -> Result<()> {
        let tok = ClipTokenizer::new()?;
        let words = vec![Word {
            name: "sks".into(),
            vectors: 3,
            offset: 0,
        }];
        let c = weighted_chunks(&tok, "a (sks:1.3) toy", &words, ChunkStyle::ComfyUi, true)?;
        let w: Vec<f32> = c[0][..7].iter().map(|s| s.weight).collect();
        // BOS, a, sks#0..2, toy, EOS
        assert_eq!(w, vec![1.0, 1.0, 1.3, 1.3, 1.3, 1.0, 1.0]);
        let c = weighted_chunks(&tok, "a BREAK b", &words, ChunkStyle::A1111, true)?;
        assert_eq!(c.len(), 2);
        let c = weighted_chunks(&tok, "a BREAK b", &words, ChunkStyle::A1111, false)?;
        assert_eq!(c.len(), 1);
        Ok(())
    }

    #[test]
    fn emphasis_keeps_the_mean_and_comfy_leaves_weight_one_rows() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let states = Tensor::randn(0.5f32, 1.0, (CONTEXT_LEN, 6), &dev)?;
        let mut w = vec![1.0f32; CONTEXT_LEN];
        w[3] = 1.5;
        let out = emphasis_original(&states, &w, &[2, 4])?;
        for (off, width) in [(0, 2), (2, 4)] {
            let a = mean_f64(&states.narrow(1, off, width)?)?;
            let b = mean_f64(&out.narrow(1, off, width)?)?;
            assert!((a - b).abs() < 1e-5, "{a} {b}");
        }
        let empty = Tensor::randn(0f32, 1.0, (CONTEXT_LEN, 6), &dev)?;
        let out = comfy_interpolate(&states, &empty, &w)?;
        let diff: Vec<f32> = (out - &states)?.abs()?.sum(1)?.to_vec1()?;
        assert!(diff
            .iter()
            .enumerate()
            .all(|(i, &d)| (d == 0.0) == (i != 3)));
        assert!(emphasis_original(&states, &w[1..], &[6]).is_err());
        Ok(())
    }
}
