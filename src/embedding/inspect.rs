//! Human/JSON summary of an embedding: metadata, shape, family, per-vector
//! norms and, given the text encoder's token table, the nearest real tokens.

use std::fmt;

use serde::Serialize;

use super::{EmbeddingFile, Encoder, Family, Format};

#[derive(Debug, Clone, Serialize)]
pub struct NearToken {
    pub id: u32,
    pub token: String,
    pub cosine: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct VectorInspection {
    pub index: usize,
    pub norm: f32,
    /// Empty unless a vocabulary of this part's width was given.
    pub nearest: Vec<NearToken>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PartInspection {
    pub encoder: Encoder,
    pub vectors: usize,
    pub width: usize,
    pub vectors_detail: Vec<VectorInspection>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub name: Option<String>,
    pub step: Option<u64>,
    pub vectors: usize,
    /// One width per part: `[768]`, or `[768, 1280]` for SDXL (clip_l, clip_g).
    pub widths: Vec<usize>,
    pub family: Option<Family>,
    pub source_format: Format,
    pub sd_checkpoint: Option<String>,
    pub sd_checkpoint_name: Option<String>,
    /// A1111's 4-hex-digit checksum shown in its UI (`Embedding.checksum`).
    pub checksum: String,
    pub parts: Vec<PartInspection>,
}

/// A1111 `const_hash(vec.reshape(-1) * 100) & 0xffff`, with Python's
/// unbounded ints emulated modulo 2^32 (all the result keeps).
fn a1111_checksum(emb: &EmbeddingFile) -> String {
    let mut r: u64 = 0;
    for v in emb.parts.iter().flat_map(|p| p.data.iter()) {
        let x = (*v * 100.0).trunc(); // f32 multiply as torch does, then int()
        let low = if !x.is_finite() {
            0
        } else if x.abs() < 9.0e18 {
            (x as i64) as u64 & 0xFFFF_FFFF
        } else {
            0 // |x| >= 2^63 is a multiple of 2^32 for an f32
        };
        r = ((r * 281) ^ (low * 997)) & 0xFFFF_FFFF;
    }
    format!("{:04x}", r & 0xFFFF)
}

/// The text encoder's token table `[n_vocab, dim]`, its width, and id -> token text.
pub type Vocab<'a> = (&'a [f32], usize, &'a dyn Fn(u32) -> String);

pub fn inspect(emb: &EmbeddingFile, vocab: Option<Vocab<'_>>, top_k: usize) -> Inspection {
    let mut parts = Vec::new();
    for p in &emb.parts {
        // Nearest tokens only make sense against the table this part feeds.
        let table = vocab.filter(|(t, d, _)| *d == p.dim && *d > 0 && t.len() % d == 0);
        let norms: Option<Vec<f32>> = table.map(|(t, d, _)| {
            t.chunks_exact(d)
                .map(|r| r.iter().map(|x| x * x).sum::<f32>().sqrt())
                .collect()
        });
        let mut detail = Vec::new();
        for (i, row) in p.data.chunks_exact(p.dim.max(1)).enumerate() {
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            let mut nearest = Vec::new();
            if let (Some((t, d, name)), Some(norms)) = (table, norms.as_ref()) {
                if top_k > 0 && norm > 0.0 {
                    let mut best: Vec<(f32, u32)> = Vec::with_capacity(top_k + 1);
                    for (id, (tok, tn)) in t.chunks_exact(d).zip(norms).enumerate() {
                        if *tn == 0.0 {
                            continue;
                        }
                        let cos =
                            tok.iter().zip(row).map(|(a, b)| a * b).sum::<f32>() / (tn * norm);
                        if !cos.is_finite() {
                            continue;
                        }
                        if best.len() < top_k || best.last().is_some_and(|(c, _)| cos > *c) {
                            let at = best.partition_point(|(c, _)| *c >= cos);
                            best.insert(at, (cos, id as u32));
                            best.truncate(top_k);
                        }
                    }
                    nearest = best
                        .into_iter()
                        .map(|(cosine, id)| NearToken {
                            id,
                            token: name(id),
                            cosine,
                        })
                        .collect();
                }
            }
            detail.push(VectorInspection {
                index: i,
                norm,
                nearest,
            });
        }
        parts.push(PartInspection {
            encoder: p.encoder,
            vectors: p.vectors,
            width: p.dim,
            vectors_detail: detail,
        });
    }
    Inspection {
        name: emb.name.clone(),
        step: emb.step,
        vectors: emb.parts.first().map_or(0, |p| p.vectors),
        widths: emb.parts.iter().map(|p| p.dim).collect(),
        family: Family::of(emb),
        source_format: emb.source_format,
        sd_checkpoint: emb.sd_checkpoint.clone(),
        sd_checkpoint_name: emb.sd_checkpoint_name.clone(),
        checksum: a1111_checksum(emb),
        parts,
    }
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".to_string());
        writeln!(f, "name:        {}", opt(&self.name))?;
        writeln!(f, "format:      {}", self.source_format)?;
        writeln!(
            f,
            "shape:       {} vector{} x {} ({})",
            self.vectors,
            if self.vectors == 1 { "" } else { "s" },
            self.widths
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join("+"),
            self.family
                .map_or("no known family".to_string(), |fam| fam.to_string())
        )?;
        writeln!(
            f,
            "step:        {}",
            self.step.map_or("-".to_string(), |s| s.to_string())
        )?;
        writeln!(
            f,
            "checkpoint:  {} [{}]",
            opt(&self.sd_checkpoint_name),
            opt(&self.sd_checkpoint)
        )?;
        writeln!(f, "checksum:    {}", self.checksum)?;
        for p in &self.parts {
            for v in &p.vectors_detail {
                write!(f, "  {} #{:<2} norm {:.4}", p.encoder, v.index, v.norm)?;
                if !v.nearest.is_empty() {
                    let near: Vec<String> = v
                        .nearest
                        .iter()
                        .map(|n| format!("{} ({:.3})", n.token, n.cosine))
                        .collect();
                    write!(f, "  near: {}", near.join(", "))?;
                }
                writeln!(f)?;
            }
        }
        Ok(())
    }
}
