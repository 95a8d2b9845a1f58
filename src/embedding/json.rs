//! The JSON A1111 stores in PNGs: `json.dumps(data, cls=EmbeddingEncoder)` of
//! the `.pt` dict, tensors as `{"TORCHTENSOR": nested lists}`.
//!
//! Parsing is typed (tensor lists stream straight into a `Vec<f32>`, unknown
//! fields are skipped without allocating), so memory stays within 2x the text.
//! Writing reproduces Python's `json.dumps` byte for byte, floats included.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::{make_part, Ctx, EmbeddingError, EmbeddingFile, EmbeddingPart, Encoder, Format};

const MAX_DEPTH: usize = 4;
/// No valid embedding has more values; stopping here keeps a hostile JSON
/// from growing a vector beyond the allocation bound.
const MAX_VALUES: usize = super::MAX_VECTORS * super::MAX_DIM;

#[derive(Debug, Default)]
pub(crate) struct JsonTensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

/// Nested list at `depth`: records each level's length (must be rectangular).
struct Level<'a> {
    t: &'a mut JsonTensor,
    depth: usize,
    seen: &'a mut Vec<Option<usize>>,
}

impl<'de> DeserializeSeed<'de> for Level<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Level<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number or a list of numbers")
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        if self.seen.len() != self.depth && !self.seen.is_empty() {
            return Err(E::custom(
                "ragged tensor: numbers at different nesting depths",
            ));
        }
        if self.seen.is_empty() {
            self.seen.resize(self.depth, None);
        }
        if self.t.data.len() >= MAX_VALUES {
            return Err(E::custom(format!(
                "more than {MAX_VALUES} values; no embedding is that large"
            )));
        }
        self.t.data.push(v as f32);
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.visit_f64(v as f64)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.visit_f64(v as f64)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.depth >= MAX_DEPTH {
            return Err(de::Error::custom("tensor nested too deeply"));
        }
        let mut n = 0usize;
        while seq
            .next_element_seed(Level {
                t: &mut *self.t,
                depth: self.depth + 1,
                seen: &mut *self.seen,
            })?
            .is_some()
        {
            n += 1;
        }
        if self.seen.len() <= self.depth {
            // Empty list: depth of numbers unknown; record the level anyway.
            self.seen.resize(self.depth + 1, None);
        }
        match self.seen[self.depth] {
            None => self.seen[self.depth] = Some(n),
            Some(m) if m == n => {}
            Some(m) => {
                return Err(de::Error::custom(format!(
                    "ragged tensor: rows of {m} and {n}"
                )))
            }
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for JsonTensor {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = JsonTensor;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("{\"TORCHTENSOR\": [...]}")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JsonTensor, A::Error> {
                let mut t = JsonTensor::default();
                let mut seen: Vec<Option<usize>> = Vec::new();
                let mut found = false;
                while let Some(k) = map.next_key::<String>()? {
                    if k == "TORCHTENSOR" && !found {
                        map.next_value_seed(Level {
                            t: &mut t,
                            depth: 0,
                            seen: &mut seen,
                        })?;
                        found = true;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                if !found {
                    return Err(de::Error::custom("tensor object without TORCHTENSOR"));
                }
                t.shape = seen.into_iter().map(|s| s.unwrap_or(0)).collect();
                Ok(t)
            }
        }
        d.deserialize_map(V)
    }
}

/// `string_to_param`: the first term's tensor is parsed, later terms' values are
/// skipped unparsed (only their names are kept, for the multiple-terms error).
#[derive(Default)]
struct Terms {
    keys: Vec<String>,
    first: Option<JsonTensor>,
}

impl<'de> Deserialize<'de> for Terms {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Terms;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of term -> tensor")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Terms, A::Error> {
                let mut t = Terms::default();
                while let Some(k) = map.next_key::<String>()? {
                    if t.first.is_none() {
                        t.first = Some(map.next_value::<JsonTensor>()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                    if t.keys.len() < 64 {
                        t.keys.push(k);
                    }
                }
                Ok(t)
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Deserialize)]
struct Payload {
    string_to_param: Option<Terms>,
    name: Option<String>,
    step: Option<u64>,
    sd_checkpoint: Option<String>,
    sd_checkpoint_name: Option<String>,
}

pub(crate) fn parse(
    ctx: &Ctx,
    field: &str,
    text: &[u8],
    format: Format,
) -> Result<EmbeddingFile, EmbeddingError> {
    let p: Payload =
        serde_json::from_slice(text).map_err(|e| ctx.invalid(field, format!("JSON: {e}")))?;
    let Some(stp) = p.string_to_param else {
        return Err(ctx.invalid(field, "no string_to_param in the embedded data"));
    };
    let mut parts = Vec::new();
    match (stp.keys.len(), stp.first) {
        (1, Some(t)) => {
            let n = t.shape.iter().try_fold(1usize, |a, s| a.checked_mul(*s));
            if n != Some(t.data.len()) {
                return Err(ctx.invalid(field, "tensor list is ragged"));
            }
            parts.push(make_part(
                ctx,
                &format!("{field}: string_to_param"),
                Encoder::Single,
                &t.shape,
                t.data,
            )?);
        }
        (0, _) | (_, None) => {
            return Err(EmbeddingError::Empty {
                file: ctx.file.clone(),
                field: format!("{field}: string_to_param"),
            })
        }
        _ => {
            return Err(EmbeddingError::MultipleTerms {
                file: ctx.file.clone(),
                field: format!("{field}: string_to_param"),
                terms: stp.keys.iter().map(|k| format!("'{k}'")).collect(),
            })
        }
    }
    Ok(EmbeddingFile {
        name: p.name,
        step: p.step,
        sd_checkpoint: p.sd_checkpoint,
        sd_checkpoint_name: p.sd_checkpoint_name,
        parts,
        source_format: format,
    })
}

/// Python `repr(float)`: shortest round-trip digits; exponent form when the
/// decimal exponent is < -4 or >= 16, written `1e-05` / `1.5e+16`.
pub(crate) fn py_float(v: f64, out: &mut String) {
    use std::fmt::Write;
    if v.is_nan() {
        out.push_str("NaN");
        return;
    }
    if v.is_infinite() {
        out.push_str(if v > 0.0 { "Infinity" } else { "-Infinity" });
        return;
    }
    let sci = format!("{v:e}"); // e.g. "-1.2345e-5", shortest round-trip digits
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if v != 0.0 && !(-4..16).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        let _ = write!(out, "{mant}e{sign}{:02}", exp.abs());
        return;
    }
    let s = format!("{v}");
    out.push_str(&s);
    if !s.contains('.') {
        out.push_str(".0");
    }
}

fn py_str(s: &str, out: &mut String) {
    use std::fmt::Write;
    // json.dumps default: ensure_ascii=True.
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{u:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn py_opt_str(s: Option<&str>, out: &mut String) {
    match s {
        Some(s) => py_str(s, out),
        None => out.push_str("null"),
    }
}

/// What A1111's `embedding_to_b64` JSON-encodes: the `.pt` dict.
pub(crate) fn write(
    emb: &EmbeddingFile,
    part: &EmbeddingPart,
    values: &[f32],
    default_name: &str,
) -> String {
    let mut o = String::with_capacity(values.len() * 22 + 256);
    o.push_str(
        "{\"string_to_token\": {\"*\": 265}, \"string_to_param\": {\"*\": {\"TORCHTENSOR\": [",
    );
    for (r, row) in values.chunks(part.dim.max(1)).enumerate() {
        if r > 0 {
            o.push_str(", ");
        }
        o.push('[');
        for (i, v) in row.iter().enumerate() {
            if i > 0 {
                o.push_str(", ");
            }
            py_float(*v as f64, &mut o);
        }
        o.push(']');
    }
    o.push_str("]}}, \"name\": ");
    py_opt_str(Some(emb.name.as_deref().unwrap_or(default_name)), &mut o);
    o.push_str(", \"step\": ");
    match emb.step {
        Some(s) => o.push_str(&s.to_string()),
        None => o.push_str("null"),
    }
    o.push_str(", \"sd_checkpoint\": ");
    py_opt_str(emb.sd_checkpoint.as_deref(), &mut o);
    o.push_str(", \"sd_checkpoint_name\": ");
    py_opt_str(emb.sd_checkpoint_name.as_deref(), &mut o);
    o.push('}');
    o
}

#[cfg(test)]
mod tests {
    use super::py_float;

    #[test]
    fn floats_match_python_json_dumps() {
        // Expected strings from python3: json.dumps([...]) of the same doubles.
        let cases: [(f64, &str); 16] = [
            (1e-05, "1e-05"),
            (0.0001, "0.0001"),
            (0.00012, "0.00012"),
            (1.5e16, "1.5e+16"),
            (1e16, "1e+16"),
            (9999999999999998.0, "9999999999999998.0"),
            (123456789012345.6, "123456789012345.6"),
            (0.1f32 as f64, "0.10000000149011612"),
            (-0.0, "-0.0"),
            (0.0, "0.0"),
            (f32::MAX as f64, "3.4028234663852886e+38"),
            (1.401298464324817e-45, "1.401298464324817e-45"),
            (-2.5e-5f32 as f64, "-2.499999936844688e-05"),
            (1.0, "1.0"),
            (-7.0, "-7.0"),
            (1e22, "1e+22"),
        ];
        for (v, want) in cases {
            let mut s = String::new();
            py_float(v, &mut s);
            assert_eq!(s, want, "{v:e}");
        }
    }
}
