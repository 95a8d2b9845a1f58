//! Memory-mapped safetensors weights under one naming scheme.
//!
//! Every model file, a diffusers folder or a single-file checkpoint, is indexed into
//! diffusers-style names (`unet.down_blocks.0.resnets.0.conv1.weight`,
//! `text_encoder.text_model.encoder.layers.0.mlp.fc1.weight`, `vae.encoder.conv_in.weight`)
//! so that the model code reads one layout. Tensors are read from the map on demand and
//! converted to the compute dtype and device.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, SafeTensors};

use crate::error::{Error, Result};

/// Where one named tensor lives.
#[derive(Clone, Debug)]
struct Entry {
    file: usize,
    /// Byte range of the data inside the mapped file.
    start: usize,
    end: usize,
    dtype: StDtype,
    /// The shape under this name (the stored shape reversed when `transpose2d`).
    shape: Vec<usize>,
    /// The key as written in the file, for error messages.
    source_key: String,
    /// A 2-D tensor stored as the transpose of what this name means (OpenCLIP's
    /// `text_projection` is `x @ P`, transformers' is a Linear weight `P^T`): transposed
    /// into a copy when read.
    transpose2d: bool,
}

/// One mapped safetensors file.
struct MappedFile {
    path: PathBuf,
    map: Mmap,
}

/// The raw index: what [`Weights`] is built from.
#[derive(Default)]
pub struct WeightIndex {
    files: Vec<MappedFile>,
    entries: HashMap<String, Entry>,
}

impl WeightIndex {
    /// Maps `path` and returns its keys with their shapes, for the caller to rename.
    pub fn map_file(&mut self, path: &Path) -> Result<Vec<(String, Vec<usize>)>> {
        // A pipe or a device cannot be mapped (and opening a FIFO would wait for a writer).
        let file = crate::io::read::open_regular(path, "model file")?;
        // SAFETY: the map is read-only; a checkpoint modified while training is the
        // user's concurrent write, as with every tool that mmaps weights.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&map).map_err(|e| Error::Model {
                path: path.to_path_buf(),
                reason: format!("not a readable safetensors file: {e}"),
            })?;
        let data_start = 8 + header_len;
        let file_index = self.files.len();
        let mut keys = Vec::new();
        for (key, info) in metadata.tensors() {
            let (begin, end) = info.data_offsets;
            let (start, end) = (data_start + begin, data_start + end);
            if end > map.len() || start > end {
                return Err(Error::Weight {
                    path: path.to_path_buf(),
                    key,
                    reason: format!(
                        "data range {begin}..{end} lies outside the file (truncated file?)"
                    ),
                });
            }
            keys.push((key.clone(), info.shape.clone()));
            self.entries.insert(
                format!("\0{file_index}\0{key}"),
                Entry {
                    file: file_index,
                    start,
                    end,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    source_key: key,
                    transpose2d: false,
                },
            );
        }
        self.files.push(MappedFile {
            path: path.to_path_buf(),
            map,
        });
        Ok(keys)
    }

    /// Makes the tensor `source_key` of the most recently mapped file available as `name`.
    pub fn alias_last(&mut self, source_key: &str, name: String) {
        let file = self.files.len().saturating_sub(1);
        if let Some(entry) = self
            .entries
            .get(&format!("\0{file}\0{source_key}"))
            .cloned()
        {
            self.entries.insert(name, entry);
        }
    }

    /// The raw entry `source_key` of the most recently mapped file, or an error naming it.
    fn last_entry(&self, source_key: &str) -> Result<Entry> {
        let file = self.files.len().saturating_sub(1);
        self.entries
            .get(&format!("\0{file}\0{source_key}"))
            .cloned()
            .ok_or_else(|| Error::Weight {
                path: self
                    .files
                    .get(file)
                    .map(|f| f.path.clone())
                    .unwrap_or_default(),
                key: source_key.to_string(),
                reason: "missing from the model".into(),
            })
    }

    fn entry_error(&self, e: &Entry, reason: String) -> Error {
        Error::Weight {
            path: self
                .files
                .get(e.file)
                .map(|f| f.path.clone())
                .unwrap_or_default(),
            key: e.source_key.clone(),
            reason,
        }
    }

    /// Makes rows `row_start .. row_start + rows` of the most recently mapped file's
    /// `source_key` (a matrix, or a vector: its elements) available as `name`, without a
    /// copy: the rows of a row-major tensor are one contiguous byte range. OpenCLIP packs
    /// the query, key and value projections into one `in_proj_weight [3d, d]` (and
    /// `in_proj_bias [3d]`); transformers' CLIP reads them as three `[d, d]` (and `[d]`).
    pub fn alias_rows(
        &mut self,
        source_key: &str,
        name: String,
        row_start: usize,
        rows: usize,
    ) -> Result<()> {
        let e = self.last_entry(source_key)?;
        if e.shape.is_empty() || e.shape.len() > 2 {
            return Err(self.entry_error(
                &e,
                format!(
                    "has shape {:?}; rows are sliced off a matrix or a vector",
                    e.shape
                ),
            ));
        }
        let total_rows = e.shape[0];
        let end_row = row_start.saturating_add(rows);
        if end_row > total_rows {
            return Err(self.entry_error(
                &e,
                format!(
                    "has {total_rows} rows; rows {row_start}..{end_row} do not fit (shape {:?})",
                    e.shape
                ),
            ));
        }
        let cols: usize = e.shape[1..].iter().product();
        let bits = e.dtype.bitsize();
        let row_bits = cols * bits;
        if !row_bits.is_multiple_of(8) {
            return Err(self.entry_error(
                &e,
                format!("rows of {cols} {:?} values are not whole bytes", e.dtype),
            ));
        }
        let row_bytes = row_bits / 8;
        if e.end - e.start != total_rows * row_bytes {
            return Err(self.entry_error(
                &e,
                format!(
                    "holds {} bytes, but shape {:?} of {:?} needs {}",
                    e.end - e.start,
                    e.shape,
                    e.dtype,
                    total_rows * row_bytes
                ),
            ));
        }
        let start = e.start + row_start * row_bytes;
        let mut shape = e.shape.clone();
        shape[0] = rows;
        self.entries.insert(
            name,
            Entry {
                start,
                end: start + rows * row_bytes,
                shape,
                ..e
            },
        );
        Ok(())
    }

    /// Makes the most recently mapped file's 2-D `source_key` available as `name`
    /// transposed (`[a, b]` stored, `[b, a]` read). Reading it copies, so this is for small
    /// matrices: OpenCLIP's `text_projection` (1-6 MB).
    pub fn alias_transposed(&mut self, source_key: &str, name: String) -> Result<()> {
        let e = self.last_entry(source_key)?;
        if e.shape.len() != 2 {
            return Err(self.entry_error(
                &e,
                format!("has shape {:?}; only a matrix can be transposed", e.shape),
            ));
        }
        let shape = vec![e.shape[1], e.shape[0]];
        self.entries.insert(
            name,
            Entry {
                shape,
                transpose2d: true,
                ..e
            },
        );
        Ok(())
    }

    /// The stored dtype of the most recently mapped file's `source_key`.
    pub fn dtype_last(&self, source_key: &str) -> Option<StDtype> {
        self.last_entry(source_key).ok().map(|e| e.dtype)
    }

    /// Drops the per-file raw keys, keeping only the aliases.
    pub fn finish(mut self, dtype: DType, device: Device) -> Weights {
        self.entries.retain(|k, _| !k.starts_with('\0'));
        Weights {
            inner: Arc::new(Inner {
                index: self,
                memory: HashMap::new(),
                hand_over: false,
                device,
            }),
            prefix: String::new(),
            dtype,
        }
    }
}

impl Weights {
    /// Weights held in memory under the internal names (see the module doc); a tensor can
    /// be read any number of times.
    pub fn from_tensors(tensors: HashMap<String, Tensor>, dtype: DType, device: Device) -> Self {
        Self::in_memory(tensors, dtype, device, false)
    }

    /// Weights held in memory that are handed over when read: the first read of a name
    /// takes its tensor out of the map and a second read is an error. A model built from
    /// them holds its weights alone, so what it frees or replaces while it is built (the
    /// parts of a fused q/k/v projection) is freed then, not when the map goes.
    pub fn handing_over(tensors: HashMap<String, Tensor>, dtype: DType, device: Device) -> Self {
        Self::in_memory(tensors, dtype, device, true)
    }

    fn in_memory(
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: Device,
        hand_over: bool,
    ) -> Self {
        let memory = tensors
            .into_iter()
            .map(|(name, t)| {
                let held = Held {
                    shape: t.dims().to_vec(),
                    tensor: Mutex::new(Some(t)),
                };
                (name, held)
            })
            .collect();
        Weights {
            inner: Arc::new(Inner {
                index: WeightIndex::default(),
                memory,
                hand_over,
                device,
            }),
            prefix: String::new(),
            dtype,
        }
    }
}

struct Inner {
    index: WeightIndex,
    /// Tensors held in memory (random models for benchmarks and tests).
    memory: HashMap<String, Held>,
    /// Whether a read takes a tensor out of `memory` ([`Weights::handing_over`]).
    hand_over: bool,
    device: Device,
}

/// A tensor held in memory, and its shape (known after it has been handed over).
struct Held {
    shape: Vec<usize>,
    tensor: Mutex<Option<Tensor>>,
}

/// A view of the indexed weights under a name prefix, converted to a compute dtype.
#[derive(Clone)]
pub struct Weights {
    inner: Arc<Inner>,
    prefix: String,
    dtype: DType,
}

impl Weights {
    /// The same weights seen under `prefix.`.
    pub fn pp(&self, prefix: &str) -> Weights {
        Weights {
            inner: self.inner.clone(),
            prefix: self.full(prefix),
            dtype: self.dtype,
        }
    }

    /// The same weights, converted to `dtype` when read.
    pub fn with_dtype(&self, dtype: DType) -> Weights {
        Weights {
            dtype,
            ..self.clone()
        }
    }

    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.inner.device
    }

    /// The files that hold the tensors under this view's prefix (none for weights in
    /// memory), each once, in mapping order.
    pub fn source_files(&self) -> Vec<PathBuf> {
        let prefix = self.full("");
        let mut used = vec![false; self.inner.index.files.len()];
        for (name, e) in &self.inner.index.entries {
            if name.starts_with(&prefix) {
                if let Some(u) = used.get_mut(e.file) {
                    *u = true;
                }
            }
        }
        self.inner
            .index
            .files
            .iter()
            .zip(used)
            .filter(|(_, u)| *u)
            .map(|(f, _)| f.path.clone())
            .collect()
    }

    /// Whether `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        let full = self.full(name);
        self.inner.index.entries.contains_key(&full) || self.inner.memory.contains_key(&full)
    }

    /// The shape of `name` without reading it.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        let full = self.full(name);
        match self.inner.memory.get(&full) {
            Some(held) => Some(held.shape.clone()),
            None => self.inner.index.entries.get(&full).map(|e| e.shape.clone()),
        }
    }

    /// Every indexed name that starts with this view's prefix.
    pub fn names(&self) -> Vec<String> {
        let p = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}.", self.prefix)
        };
        let mut names: Vec<String> = self
            .inner
            .index
            .entries
            .keys()
            .chain(self.inner.memory.keys())
            .filter_map(|k| k.strip_prefix(&p).map(str::to_string))
            .collect();
        names.sort();
        names
    }

    fn entry(&self, name: &str) -> Result<(&Entry, &MappedFile)> {
        let full = self.full(name);
        let index = &self.inner.index;
        match index.entries.get(&full) {
            Some(e) => Ok((e, &index.files[e.file])),
            None => Err(Error::Weight {
                path: index
                    .files
                    .first()
                    .map(|f| f.path.clone())
                    .unwrap_or_default(),
                key: full,
                reason: "missing from the model (is this the right model family?)".into(),
            }),
        }
    }

    /// Reads `name` in its stored dtype and shape, on the CPU.
    pub fn get_raw(&self, name: &str) -> Result<Tensor> {
        let full = self.full(name);
        if let Some(held) = self.inner.memory.get(&full) {
            let mut tensor = held.tensor.lock().unwrap_or_else(PoisonError::into_inner);
            let t = if self.inner.hand_over {
                tensor.take()
            } else {
                tensor.clone()
            };
            return t.ok_or_else(|| {
                self.memory_error(
                    name,
                    "was handed over already (a weight held in memory is read once)".into(),
                )
            });
        }
        let (e, file) = self.entry(name)?;
        let bytes = &file.map[e.start..e.end];
        let dtype = match e.dtype {
            StDtype::F32 => DType::F32,
            StDtype::F16 => DType::F16,
            StDtype::BF16 => DType::BF16,
            StDtype::F64 => DType::F64,
            other => {
                return Err(Error::Weight {
                    path: file.path.clone(),
                    key: e.source_key.clone(),
                    reason: format!("dtype {other:?} is not supported (need f32, f16 or bf16)"),
                })
            }
        };
        let stored: Vec<usize> = if e.transpose2d {
            e.shape.iter().rev().copied().collect()
        } else {
            e.shape.clone()
        };
        let expected = stored.iter().product::<usize>() * dtype.size_in_bytes();
        if bytes.len() != expected {
            return Err(Error::Weight {
                path: file.path.clone(),
                key: e.source_key.clone(),
                reason: format!(
                    "holds {} bytes, but shape {:?} of {dtype:?} needs {expected}",
                    bytes.len(),
                    stored
                ),
            });
        }
        let t = Tensor::from_raw_buffer(bytes, dtype, &stored, &Device::Cpu)?;
        if e.transpose2d {
            return Ok(t.t()?.contiguous()?);
        }
        Ok(t)
    }

    /// Reads `name` converted to the compute dtype and device.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        let t = self.get_raw(name)?;
        Ok(t.to_dtype(self.dtype)?.to_device(&self.inner.device)?)
    }

    /// Reads `name`, checking its shape; a `[o, i, 1, 1]` tensor is accepted for `[o, i]`
    /// (LDM checkpoints store the VAE attention projections as 1x1 convolutions).
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.get(name)?;
        if t.dims() == shape {
            return Ok(t);
        }
        let squeezable = t.rank() == shape.len() + 2
            && t.dims()[..shape.len()] == *shape
            && t.dims()[shape.len()..].iter().all(|&d| d == 1);
        if squeezable {
            return Ok(t.reshape(shape)?);
        }
        Err(self.shape_error(
            name,
            format!("has shape {:?}, expected {shape:?}", t.dims()),
        ))
    }

    fn shape_error(&self, name: &str, reason: String) -> Error {
        match self.entry(name) {
            Ok((e, file)) => Error::Weight {
                path: file.path.clone(),
                key: e.source_key.clone(),
                reason,
            },
            Err(_) => self.memory_error(name, reason),
        }
    }

    /// An error about `name`, a tensor held in memory.
    fn memory_error(&self, name: &str, reason: String) -> Error {
        Error::Weight {
            path: PathBuf::from("<memory>"),
            key: self.full(name),
            reason,
        }
    }

    /// Reads a matrix (squeezing trailing 1x1 kernel dimensions).
    pub fn get2(&self, name: &str) -> Result<Tensor> {
        let shape = self.shape_of(name).ok_or_else(|| {
            self.entry(name)
                .err()
                .unwrap_or_else(|| self.shape_error(name, "missing".into()))
        })?;
        if shape.len() < 2 {
            return self.get_shaped(name, &[0, 0]);
        }
        self.get_shaped(name, &shape[..2])
    }

    /// Reads a 4-D convolution kernel.
    pub fn get4(&self, name: &str) -> Result<Tensor> {
        let t = self.get(name)?;
        if t.rank() != 4 {
            return Err(self.shape_error(
                name,
                format!("has shape {:?}, expected a 4-D kernel", t.dims()),
            ));
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file with `packed [6, 2]` f32 = 0..12, `bias [6]` f16 = 0..6 and
    /// `proj [2, 3]` f32 = 0..6, as OpenCLIP stores `in_proj_weight`, `in_proj_bias` and
    /// `text_projection` (scaled down).
    fn packed_file() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("packed.safetensors");
        let packed = Tensor::arange(0f32, 12., &Device::Cpu)
            .unwrap()
            .reshape((6, 2))
            .unwrap();
        let bias = Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let proj = Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let tensors: HashMap<String, Tensor> = [
            ("packed".to_string(), packed),
            ("bias".to_string(), bias),
            ("proj".to_string(), proj),
        ]
        .into_iter()
        .collect();
        candle_core::safetensors::save(&tensors, &path).unwrap();
        (dir, path)
    }

    fn entry_of<'a>(index: &'a WeightIndex, name: &str) -> &'a Entry {
        &index.entries[name]
    }

    #[test]
    fn row_aliases_are_byte_ranges_of_the_packed_tensor() -> Result<()> {
        let (_dir, path) = packed_file();
        let mut index = WeightIndex::default();
        index.map_file(&path)?;
        for (i, part) in ["q", "k", "v"].iter().enumerate() {
            index.alias_rows("packed", format!("{part}.weight"), 2 * i, 2)?;
            index.alias_rows("bias", format!("{part}.bias"), 2 * i, 2)?;
        }
        let raw = index.last_entry("packed")?;
        let raw_bias = index.last_entry("bias")?;
        // Three 2x2 f32 blocks of 16 bytes, back to back in the packed tensor's range.
        for (i, part) in ["q", "k", "v"].iter().enumerate() {
            let w = entry_of(&index, &format!("{part}.weight"));
            assert_eq!(
                (w.start, w.end),
                (raw.start + 16 * i, raw.start + 16 * (i + 1))
            );
            assert_eq!(w.shape, vec![2, 2]);
            let b = entry_of(&index, &format!("{part}.bias"));
            assert_eq!(
                (b.start, b.end),
                (raw_bias.start + 4 * i, raw_bias.start + 4 * (i + 1))
            );
            assert_eq!(b.shape, vec![2]);
        }
        let w = index.finish(DType::F32, Device::Cpu);
        assert_eq!(w.shape_of("k.weight"), Some(vec![2, 2]));
        assert_eq!(
            w.get("k.weight")?.to_vec2::<f32>()?,
            vec![vec![4., 5.], vec![6., 7.]]
        );
        assert_eq!(
            w.get("v.weight")?.to_vec2::<f32>()?,
            vec![vec![8., 9.], vec![10., 11.]]
        );
        assert_eq!(w.get_raw("v.bias")?.dtype(), DType::F16);
        assert_eq!(w.get("v.bias")?.to_vec1::<f32>()?, vec![4., 5.]);
        assert_eq!(w.get("q.bias")?.to_vec1::<f32>()?, vec![0., 1.]);
        Ok(())
    }

    #[test]
    fn transposed_alias_reads_the_transpose() -> Result<()> {
        let (_dir, path) = packed_file();
        let mut index = WeightIndex::default();
        index.map_file(&path)?;
        index.alias_transposed("proj", "proj.weight".into())?;
        index.alias_last("proj", "proj.raw".into());
        let w = index.finish(DType::F32, Device::Cpu);
        assert_eq!(w.shape_of("proj.weight"), Some(vec![3, 2]));
        let t = w.get("proj.weight")?;
        assert!(t.is_contiguous());
        assert_eq!(
            t.to_vec2::<f32>()?,
            vec![vec![0., 3.], vec![1., 4.], vec![2., 5.]]
        );
        assert_eq!(w.get("proj.raw")?.dims(), &[2, 3]);
        assert_eq!(w.get2("proj.weight")?.dims(), &[3, 2]);
        Ok(())
    }

    #[test]
    fn bad_aliases_name_the_key_and_the_reason() -> Result<()> {
        let (_dir, path) = packed_file();
        let mut index = WeightIndex::default();
        index.map_file(&path)?;
        let err = index
            .alias_rows("packed", "x".into(), 4, 3)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("'packed'") && err.contains("rows 4..7"),
            "{err}"
        );
        let err = index
            .alias_rows("absent", "x".into(), 0, 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("'absent'") && err.contains("missing"), "{err}");
        let err = index
            .alias_transposed("bias", "x".into())
            .unwrap_err()
            .to_string();
        assert!(err.contains("'bias'") && err.contains("matrix"), "{err}");
        assert_eq!(index.dtype_last("bias"), Some(StDtype::F16));
        assert_eq!(index.dtype_last("absent"), None);
        Ok(())
    }

    #[test]
    fn weights_in_memory_are_handed_over_once_or_shared() -> Result<()> {
        let tensors = || -> HashMap<String, Tensor> {
            let t = Tensor::arange(0f32, 6., &Device::Cpu).unwrap();
            [("a.w".to_string(), t.reshape((2, 3)).unwrap())]
                .into_iter()
                .collect()
        };
        let shared = Weights::from_tensors(tensors(), DType::F32, Device::Cpu).pp("a");
        for _ in 0..2 {
            assert_eq!(shared.get2("w")?.dims(), &[2, 3]);
        }
        let handed = Weights::handing_over(tensors(), DType::F32, Device::Cpu).pp("a");
        assert_eq!(
            handed.get("w")?.to_vec2::<f32>()?,
            vec![vec![0., 1., 2.], vec![3., 4., 5.]]
        );
        // Its name and shape stay known; a second read names the tensor and says why.
        assert!(handed.contains("w"));
        assert_eq!(handed.shape_of("w"), Some(vec![2, 3]));
        assert_eq!(handed.names(), vec!["w".to_string()]);
        let err = handed.get("w").unwrap_err().to_string();
        assert!(
            err.contains("'a.w'") && err.contains("handed over"),
            "{err}"
        );
        Ok(())
    }
}
