//! Memory-mapped safetensors weights under one naming scheme.
//!
//! Every model file, a diffusers folder or a single-file checkpoint, is indexed into
//! diffusers-style names (`unet.down_blocks.0.resnets.0.conv1.weight`,
//! `text_encoder.text_model.encoder.layers.0.mlp.fc1.weight`, `vae.encoder.conv_in.weight`)
//! so that the model code reads one layout. Tensors are read from the map on demand and
//! converted to the compute dtype and device.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    shape: Vec<usize>,
    /// The key as written in the file, for error messages.
    source_key: String,
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

    /// Drops the per-file raw keys, keeping only the aliases.
    pub fn finish(mut self, dtype: DType, device: Device) -> Weights {
        self.entries.retain(|k, _| !k.starts_with('\0'));
        Weights {
            inner: Arc::new(Inner {
                index: self,
                memory: HashMap::new(),
                device,
            }),
            prefix: String::new(),
            dtype,
        }
    }
}

impl Weights {
    /// Weights held in memory under the internal names (see the module doc).
    pub fn from_tensors(tensors: HashMap<String, Tensor>, dtype: DType, device: Device) -> Self {
        Weights {
            inner: Arc::new(Inner {
                index: WeightIndex::default(),
                memory: tensors,
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
    memory: HashMap<String, Tensor>,
    device: Device,
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

    /// Whether `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        let full = self.full(name);
        self.inner.index.entries.contains_key(&full) || self.inner.memory.contains_key(&full)
    }

    /// The shape of `name` without reading it.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        let full = self.full(name);
        match self.inner.memory.get(&full) {
            Some(t) => Some(t.dims().to_vec()),
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
        if let Some(t) = self.inner.memory.get(&self.full(name)) {
            return Ok(t.clone());
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
        let expected = e.shape.iter().product::<usize>() * dtype.size_in_bytes();
        if bytes.len() != expected {
            return Err(Error::Weight {
                path: file.path.clone(),
                key: e.source_key.clone(),
                reason: format!(
                    "holds {} bytes, but shape {:?} of {dtype:?} needs {expected}",
                    bytes.len(),
                    e.shape
                ),
            });
        }
        Ok(Tensor::from_raw_buffer(
            bytes,
            dtype,
            &e.shape,
            &Device::Cpu,
        )?)
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
            Err(_) => Error::Weight {
                path: PathBuf::from("<memory>"),
                key: self.full(name),
                reason,
            },
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
