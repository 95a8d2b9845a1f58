//! torch zip archives (`torch.save` since 1.6): A1111 `.pt`, rinongal `.pt`,
//! kohya `.pt` and diffusers `learned_embeds.bin`.

use super::pickle::{self, op, Obj, Pickle, StorageType, TensorRef};
use super::zip::{self, Archive};
use super::{
    encode_part, make_part, Ctx, DType, EmbeddingError, EmbeddingFile, EmbeddingPart, Encoder,
    Format, Precision,
};

struct Loaded<'a> {
    archive: Archive<'a>,
    prefix: String,
    big_endian: bool,
    pickle: Pickle,
}

fn load<'a>(ctx: &Ctx, bytes: &'a [u8]) -> Result<Loaded<'a>, EmbeddingError> {
    let archive = Archive::parse(ctx, bytes)?;
    let pkls: Vec<&zip::Entry> = archive
        .entries
        .iter()
        .filter(|e| e.name == "data.pkl" || e.name.ends_with("/data.pkl"))
        .collect();
    let pkl = match pkls.as_slice() {
        [one] => *one,
        [] => {
            return Err(EmbeddingError::UnknownFormat {
                file: ctx.file.clone(),
                reason: "a zip without data.pkl, so not a torch archive".to_string(),
            })
        }
        many => {
            let names: Vec<&str> = many.iter().map(|e| e.name.as_str()).collect();
            return Err(ctx.invalid(
                "data.pkl",
                format!("several pickles ({}); ambiguous", names.join(", ")),
            ));
        }
    };
    let prefix = pkl.name.strip_suffix("data.pkl").unwrap_or("").to_string();
    let big_endian = match archive.find(&format!("{prefix}byteorder")) {
        None => false,
        Some(e) => match &*archive.read(ctx, e)? {
            b"little" => false,
            b"big" => true,
            other => {
                return Err(ctx.invalid(
                    "byteorder",
                    format!(
                        "'{}' is neither little nor big",
                        String::from_utf8_lossy(other)
                    ),
                ))
            }
        },
    };
    let data = archive.read(ctx, pkl)?;
    let pickle = pickle::parse(ctx, &pkl.name, &data)?;
    Ok(Loaded {
        archive,
        prefix,
        big_endian,
        pickle,
    })
}

impl Loaded<'_> {
    /// Gather a tensor's elements (any strides) into row-major f32, after
    /// checking its extent against both the declared storage size and the record.
    fn tensor(
        &self,
        ctx: &Ctx,
        field: &str,
        t: &TensorRef,
    ) -> Result<(Vec<usize>, Vec<f32>), EmbeddingError> {
        let dtype = match t.storage {
            StorageType::Float(d) => d,
            StorageType::Other(name) => {
                return Err(ctx.invalid(
                    field,
                    format!("tensor holds {name}; vectors must be floating point"),
                ))
            }
        };
        let elem = dtype.size() as u64;
        let mut numel: u64 = 1;
        let mut last: u64 = t.offset;
        for (s, st) in t.size.iter().zip(&t.stride) {
            numel = numel
                .checked_mul(*s)
                .ok_or_else(|| ctx.invalid(field, "element count overflows"))?;
            if *s > 0 {
                last = (s - 1)
                    .checked_mul(*st)
                    .and_then(|x| x.checked_add(last))
                    .ok_or_else(|| ctx.invalid(field, "tensor extent overflows"))?;
            }
        }
        let shape: Vec<usize> = t
            .size
            .iter()
            .map(|s| usize::try_from(*s).map_err(|_| ctx.invalid(field, "dimension overflows")))
            .collect::<Result<_, _>>()?;
        if numel == 0 {
            return Ok((shape, Vec::new()));
        }
        if last >= t.storage_numel {
            return Err(ctx.invalid(
                field,
                format!(
                    "tensor {:?} (offset {}, stride {:?}) reaches element {last} of a {}-element storage",
                    t.size, t.offset, t.stride, t.storage_numel
                ),
            ));
        }
        let record = format!("{}data/{}", self.prefix, t.key);
        let entry = self
            .archive
            .find(&record)
            .ok_or_else(|| ctx.truncated(field, format!("storage record {record} is missing")))?;
        let raw = self.archive.read(ctx, entry)?;
        let need = t.storage_numel.saturating_mul(elem);
        if (raw.len() as u64) < need {
            return Err(ctx.truncated(
                field,
                format!(
                    "storage {record} has {} bytes, its {} elements need {need}",
                    raw.len(),
                    t.storage_numel
                ),
            ));
        }
        ctx.charge(numel.saturating_mul(4), field)?;
        let mut out = Vec::with_capacity(numel as usize);
        let e = elem as usize;
        let read = |i: u64| -> Option<f32> {
            // i <= last < storage_numel and raw holds storage_numel elements, so
            // this never misses; `get` keeps it panic-free regardless.
            let at = usize::try_from(i).ok()?.checked_mul(e)?;
            let mut b = [0u8; 8];
            b[..e].copy_from_slice(raw.get(at..at + e)?);
            if self.big_endian {
                b[..e].reverse();
            }
            Some(match dtype {
                DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                DType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
                DType::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
                DType::F64 => f64::from_le_bytes(b) as f32,
            })
        };
        // Odometer over the multi-index, innermost dimension fastest.
        let mut idx = vec![0u64; t.size.len()];
        for _ in 0..numel {
            let off: u64 = t.offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<u64>();
            out.push(
                read(off).ok_or_else(|| {
                    ctx.truncated(field, format!("element {off} outside storage"))
                })?,
            );
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < t.size[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        Ok((shape, out))
    }

    fn part(
        &self,
        ctx: &Ctx,
        field: &str,
        encoder: Encoder,
        id: usize,
    ) -> Result<EmbeddingPart, EmbeddingError> {
        let Obj::Tensor(t) = self.pickle.get(id) else {
            return Err(ctx.invalid(
                field,
                format!("is a {}, expected a tensor", self.pickle.type_name(id)),
            ));
        };
        let (shape, data) = self.tensor(ctx, field, t)?;
        make_part(ctx, field, encoder, &shape, data)
    }

    fn meta_str(&self, ctx: &Ctx, key: &str) -> Result<Option<String>, EmbeddingError> {
        match self
            .pickle
            .lookup(self.pickle.root, key)
            .map(|id| (id, self.pickle.get(id)))
        {
            None | Some((_, Obj::None)) => Ok(None),
            Some((_, Obj::Str(s))) => Ok(Some(s.clone())),
            Some((id, _)) => Err(ctx.invalid(
                key,
                format!("is a {}, expected a string", self.pickle.type_name(id)),
            )),
        }
    }

    fn meta_step(&self, ctx: &Ctx) -> Result<Option<u64>, EmbeddingError> {
        match self
            .pickle
            .lookup(self.pickle.root, "step")
            .map(|id| (id, self.pickle.get(id)))
        {
            None | Some((_, Obj::None)) => Ok(None),
            Some((_, Obj::Int(i))) if *i >= 0 => Ok(Some(*i as u64)),
            Some((_, Obj::Float(f))) if *f >= 0.0 && f.fract() == 0.0 && *f < 1e18 => {
                Ok(Some(*f as u64))
            }
            Some((id, _)) => Err(ctx.invalid(
                "step",
                format!(
                    "is a {} that is not a non-negative integer",
                    self.pickle.type_name(id)
                ),
            )),
        }
    }

    fn keys(&self, items: &[(usize, usize)]) -> Vec<String> {
        items
            .iter()
            .map(|(k, _)| match self.pickle.get(*k) {
                Obj::Str(s) => format!("'{s}'"),
                _ => format!("<{}>", self.pickle.type_name(*k)),
            })
            .collect()
    }
}

pub(crate) fn read(ctx: &Ctx, bytes: &[u8]) -> Result<EmbeddingFile, EmbeddingError> {
    let l = load(ctx, bytes)?;
    let p = &l.pickle;
    let Obj::Dict(root_items) = p.get(p.root) else {
        return Err(EmbeddingError::UnknownFormat {
            file: ctx.file.clone(),
            reason: format!(
                "the pickle holds a {}, expected a dict",
                p.type_name(p.root)
            ),
        });
    };
    let mut emb = EmbeddingFile {
        name: None,
        step: None,
        sd_checkpoint: None,
        sd_checkpoint_name: None,
        parts: Vec::new(),
        source_format: Format::A1111Pt,
    };
    if let Some(stp) = p.lookup(p.root, "string_to_param") {
        return read_a1111(ctx, &l, stp, emb);
    }
    if let Some(t) = p.lookup(p.root, "emb_params") {
        emb.source_format = Format::KohyaPt;
        emb.parts
            .push(l.part(ctx, "emb_params", Encoder::Single, t)?);
        return Ok(emb);
    }
    if let (Some(lt), Some(gt)) = (p.lookup(p.root, "clip_l"), p.lookup(p.root, "clip_g")) {
        emb.source_format = Format::KohyaPt;
        emb.parts.push(l.part(ctx, "clip_l", Encoder::ClipL, lt)?);
        emb.parts.push(l.part(ctx, "clip_g", Encoder::ClipG, gt)?);
        return Ok(emb);
    }
    // diffusers: {placeholder_token: tensor}.
    if !root_items.is_empty()
        && root_items
            .iter()
            .all(|(_, v)| matches!(p.get(*v), Obj::Tensor(_)))
    {
        if root_items.len() > 1 {
            return Err(EmbeddingError::MultipleTerms {
                file: ctx.file.clone(),
                field: "top-level dict".to_string(),
                terms: l.keys(root_items),
            });
        }
        let (k, v) = root_items[0];
        let token = p
            .as_str(k)
            .ok_or_else(|| ctx.invalid("token", "diffusers token key is not a string"))?;
        emb.source_format = Format::DiffusersBin;
        emb.parts
            .push(l.part(ctx, &format!("'{token}'"), Encoder::Single, v)?);
        emb.name = Some(token.to_string());
        return Ok(emb);
    }
    Err(EmbeddingError::UnknownFormat {
        file: ctx.file.clone(),
        reason: format!(
            "torch dict with keys [{}]: no string_to_param, emb_params, clip_l/clip_g or single token tensor",
            l.keys(root_items).join(", ")
        ),
    })
}

/// A1111's dict (`string_to_param` holding one tensor, plus name, step and
/// checkpoint), or rinongal's, which has the same keys.
fn read_a1111(
    ctx: &Ctx,
    l: &Loaded,
    stp: pickle::Id,
    mut emb: EmbeddingFile,
) -> Result<EmbeddingFile, EmbeddingError> {
    let p = &l.pickle;
    let items = p.dict_items(stp).ok_or_else(|| {
        ctx.invalid(
            "string_to_param",
            format!("is a {}, expected a dict", p.type_name(stp)),
        )
    })?;
    match items {
        [] => {
            return Err(EmbeddingError::Empty {
                file: ctx.file.clone(),
                field: "string_to_param".to_string(),
            })
        }
        [(_, t)] => emb
            .parts
            .push(l.part(ctx, "string_to_param", Encoder::Single, *t)?),
        many => {
            return Err(EmbeddingError::MultipleTerms {
                file: ctx.file.clone(),
                field: "string_to_param".to_string(),
                terms: l.keys(many),
            })
        }
    }
    // rinongal's trainer saves an nn.ParameterDict and 0-d token tensors.
    let token_tensors = p
        .lookup(p.root, "string_to_token")
        .and_then(|s| p.dict_items(s))
        .is_some_and(|its| its.iter().any(|(_, v)| matches!(p.get(*v), Obj::Tensor(_))));
    let is_module = matches!(p.get(stp), Obj::Object { .. });
    emb.source_format = if token_tensors || is_module {
        Format::RinongalPt
    } else {
        Format::A1111Pt
    };
    emb.name = l.meta_str(ctx, "name")?;
    emb.step = l.meta_step(ctx)?;
    emb.sd_checkpoint = l.meta_str(ctx, "sd_checkpoint")?;
    emb.sd_checkpoint_name = l.meta_str(ctx, "sd_checkpoint_name")?;
    Ok(emb)
}

/// torch names the archive folder after the file stem; A1111's check wants `[^/]+`.
fn archive_prefix(stem: &str) -> String {
    let s: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_-.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s == "." || s == ".." {
        "archive".to_string()
    } else {
        s
    }
}

fn storage_class(p: Precision) -> &'static str {
    match p {
        Precision::F32 => "FloatStorage",
        Precision::F16 => "HalfStorage",
    }
}

/// Members exactly as A1111's `safe.py` accepts: `data.pkl`, `data/<n>`, `version`.
fn archive(stem: &str, pkl: Vec<u8>, storages: Vec<Vec<u8>>) -> Vec<u8> {
    let prefix = archive_prefix(stem);
    let mut members: Vec<(String, &[u8])> = vec![(format!("{prefix}/data.pkl"), &pkl)];
    for (i, s) in storages.iter().enumerate() {
        members.push((format!("{prefix}/data/{i}"), s));
    }
    members.push((format!("{prefix}/version"), b"3\n"));
    zip::write_stored(&members)
}

/// A1111 `Embedding.save`: the dict, in its key order.
pub(crate) fn write_a1111(
    emb: &EmbeddingFile,
    part: &EmbeddingPart,
    precision: Precision,
    stem: &str,
) -> Result<Vec<u8>, EmbeddingError> {
    let data = encode_part(stem, "string_to_param", part, precision)?;
    let mut w = pickle::Writer::new();
    w.op(op::EMPTY_DICT);
    w.op(op::MARK);
    w.str("string_to_token");
    w.op(op::EMPTY_DICT);
    w.str("*");
    w.int(265); // A1111 always writes 265, the id of '*'
    w.op(op::SETITEM);
    w.str("string_to_param");
    w.op(op::EMPTY_DICT);
    w.str("*");
    w.tensor_2d(storage_class(precision), "0", part.vectors, part.dim);
    w.op(op::SETITEM);
    w.str("name");
    w.opt_str(emb.name.as_deref().or(Some(stem)));
    w.str("step");
    match emb.step {
        Some(s) => w.int(i64::try_from(s).unwrap_or(i64::MAX)),
        None => w.op(op::NONE),
    }
    w.str("sd_checkpoint");
    w.opt_str(emb.sd_checkpoint.as_deref());
    w.str("sd_checkpoint_name");
    w.opt_str(emb.sd_checkpoint_name.as_deref());
    w.op(op::SETITEMS);
    Ok(archive(stem, w.finish(), vec![data]))
}

/// `torch.save({key: tensor, ...})` (kohya `.pt`, diffusers `.bin`).
pub(crate) fn write_tensor_dict(
    entries: &[(&str, &EmbeddingPart)],
    precision: Precision,
    stem: &str,
) -> Result<Vec<u8>, EmbeddingError> {
    let mut w = pickle::Writer::new();
    let mut storages = Vec::new();
    w.op(op::EMPTY_DICT);
    w.op(op::MARK);
    for (i, (key, part)) in entries.iter().enumerate() {
        storages.push(encode_part(stem, key, part, precision)?);
        w.str(key);
        w.tensor_2d(
            storage_class(precision),
            &i.to_string(),
            part.vectors,
            part.dim,
        );
    }
    w.op(op::SETITEMS);
    Ok(archive(stem, w.finish(), storages))
}
