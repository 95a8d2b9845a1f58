//! A training run's state on disk: the checkpoint `Trainer::save_checkpoint` writes (the
//! vectors, the optimizer moments, the step, the RNG states, the data order and the
//! options) and `Trainer::load_checkpoint` restores, bit for bit.
//!
//! The vectors and the moments are the trainer's joint table: `[n, width]` for SD 1.x and
//! SD 2.x, `[n, 768 + 1280]` for SDXL, each row `[clip_l ‖ clip_g]`, so an SDXL
//! checkpoint holds both tables and both pairs of AdamW moments.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use super::optimizer::LossScale;
use super::trainer::Trainer;
use crate::error::{Error, Result};
use crate::rng::{Rng, RngState};

/// The state that a checkpoint keeps beside the tensors.
#[derive(Serialize, Deserialize)]
struct CheckpointState {
    format: String,
    step: u64,
    rng_data: RngState,
    rng_noise: RngState,
    order: Vec<usize>,
    order_pos: usize,
    images: usize,
    config: TrainConfig,
    /// f16 runs: the dynamic loss scale (absent in checkpoints of other runs).
    #[serde(default)]
    loss_scale: Option<LossScale>,
}

const CHECKPOINT_FORMAT: &str = "sdti-checkpoint/1";

impl Trainer {
    /// Writes the vectors, the optimizer moments, the step, the RNG states and the
    /// options to `path`, atomically (a temporary file renamed over it).
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let state = CheckpointState {
            format: CHECKPOINT_FORMAT.into(),
            step: self.step,
            rng_data: self.rng_data.state(),
            rng_noise: self.rng_noise.state(),
            order: self.order.clone(),
            order_pos: self.order_pos,
            images: self.images.len(),
            config: self.config.clone(),
            loss_scale: self.loss_scale,
        };
        let json = serde_json::to_string(&state).map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let tensors: HashMap<String, Tensor> = [(
            "vectors".to_string(),
            self.vectors
                .as_tensor()
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?,
        )]
        .into_iter()
        .chain(self.optimizer.moments()?)
        .collect();
        let mut meta = HashMap::new();
        meta.insert("sdti.checkpoint".to_string(), json);
        let bytes = serialize_tensors(&tensors, meta).map_err(|reason| Error::Checkpoint {
            path: path.to_path_buf(),
            reason,
        })?;
        crate::io::write_atomic(path, &bytes)
    }

    /// Restores a checkpoint written by [`Trainer::save_checkpoint`] of a run with the
    /// same options and the same images (added before this call, in the same order).
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<()> {
        let err = |reason: String| Error::Checkpoint {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = crate::io::read::read_bounded(path, &crate::io::read::TRAINING_CHECKPOINT)?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| err(format!("not a safetensors file: {e}")))?;
        let json = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("sdti.checkpoint"))
            .ok_or_else(|| err("no 'sdti.checkpoint' metadata: not an sdti checkpoint".into()))?;
        let state: CheckpointState =
            serde_json::from_str(json).map_err(|e| err(format!("unreadable state: {e}")))?;
        if state.format != CHECKPOINT_FORMAT {
            return Err(err(format!(
                "format '{}' is not {CHECKPOINT_FORMAT}",
                state.format
            )));
        }
        if state.config != self.config {
            return Err(err("it was written by a run with other options".into()));
        }
        if state.images != self.images.len() {
            return Err(err(format!(
                "it was written with {} images, this run has {}",
                state.images,
                self.images.len()
            )));
        }
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
        let get = |name: &str| -> Result<Tensor> {
            let t = tensors
                .get(name)
                .ok_or_else(|| err(format!("tensor '{name}' is missing")))?;
            if t.dims() != self.vectors.as_tensor().dims() {
                return Err(err(format!("tensor '{name}' has shape {:?}", t.dims())));
            }
            Ok(t.to_dtype(DType::F32)?.to_device(self.model.device())?)
        };
        let vectors = get("vectors")?;
        // A checkpoint written before the first step has no moments yet.
        if state.step > 0 || tensors.contains_key("adam.m") {
            self.optimizer
                .restore(get("adam.m")?, get("adam.v")?, state.step);
        }
        self.vectors
            .set(&vectors.to_dtype(self.vectors.as_tensor().dtype())?)?;
        self.step = state.step;
        if self.loss_scale.is_some() {
            self.loss_scale = Some(state.loss_scale.unwrap_or_else(LossScale::new));
        }
        self.rng_data = Rng::from_state(state.rng_data)?;
        self.rng_noise = Rng::from_state(state.rng_noise)?;
        self.order = state.order;
        self.order_pos = state.order_pos;
        Ok(())
    }
}

/// safetensors bytes of `tensors` (f32, CPU) with string metadata.
fn serialize_tensors(
    tensors: &HashMap<String, Tensor>,
    meta: HashMap<String, String>,
) -> std::result::Result<Vec<u8>, String> {
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in tensors {
        let values: Vec<f32> = t
            .flatten_all()
            .and_then(|f| f.to_vec1())
            .map_err(|e| e.to_string())?;
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        data.push((name.clone(), t.dims().to_vec(), bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(n, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| e.to_string())
        })
        .collect::<std::result::Result<_, _>>()?;
    safetensors::serialize(views, Some(meta)).map_err(|e| e.to_string())
}
