//! The optimizer of the learned vectors: AdamW as torch computes it, and the dynamic
//! loss scaling f16 models need.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// Dynamic loss scaling for f16 models, as torch's `GradScaler` does it: the loss is
/// multiplied by `scale` before the backward pass (so that small gradients do not flush
/// to zero in f16) and the vectors' f32 gradient divided by it; a step whose gradient is
/// not finite (an f16 overflow) is skipped and the scale halved; after `GROWTH_INTERVAL`
/// good steps in a row the scale doubles.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    pub scale: f64,
    pub good_steps: u64,
}

impl LossScale {
    /// torch.amp.GradScaler's defaults: init_scale 2^16, growth_interval 2000.
    pub const INITIAL: f64 = 65536.0;
    pub const GROWTH_INTERVAL: u64 = 2000;

    pub(super) fn new() -> Self {
        Self {
            scale: Self::INITIAL,
            good_steps: 0,
        }
    }

    /// Records a step; returns whether its update may be applied.
    pub(super) fn update(&mut self, finite: bool) -> bool {
        if finite {
            self.good_steps += 1;
            if self.good_steps >= Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale = (self.scale / 2.0).max(1.0);
            self.good_steps = 0;
        }
        finite
    }
}

/// torch.optim.AdamW on one f32 tensor, step for step: decoupled weight decay,
/// bias-corrected moments, optional `clip_grad_norm_` first.
pub struct AdamW {
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    max_grad_norm: Option<f64>,
    m: Option<Tensor>,
    v: Option<Tensor>,
    steps: u64,
}

impl AdamW {
    pub fn new(
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        max_grad_norm: Option<f64>,
    ) -> Self {
        Self {
            beta1,
            beta2,
            eps,
            weight_decay,
            max_grad_norm,
            m: None,
            v: None,
            steps: 0,
        }
    }

    /// The parameter after one step with gradient `grad` at learning rate `lr`.
    pub fn update(&mut self, param: &Tensor, grad: &Tensor, lr: f64) -> Result<Tensor> {
        let grad = grad.to_dtype(DType::F32)?;
        let grad = match self.max_grad_norm {
            Some(max) => {
                let norm = grad.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
                // clip_grad_norm_ scales by max / (norm + 1e-6) when that is below 1.
                let scale = (max / (norm + 1e-6)).min(1.0);
                (grad * scale)?
            }
            None => grad,
        };
        let zeros = || grad.zeros_like();
        let m = match &self.m {
            Some(m) => m.clone(),
            None => zeros()?,
        };
        let v = match &self.v {
            Some(v) => v.clone(),
            None => zeros()?,
        };
        self.steps += 1;
        let t = i32::try_from(self.steps).unwrap_or(i32::MAX);
        let (b1, b2) = (self.beta1, self.beta2);
        let m = ((m * b1)? + (&grad * (1.0 - b1))?)?;
        let v = ((v * b2)? + (grad.sqr()? * (1.0 - b2))?)?;
        let bias1 = 1.0 - b1.powi(t);
        let bias2_sqrt = (1.0 - b2.powi(t)).sqrt();
        let decayed = (param.to_dtype(DType::F32)? * (1.0 - lr * self.weight_decay))?;
        let denom = ((v.sqrt()? / bias2_sqrt)? + self.eps)?;
        let update = ((&m / denom)? * (lr / bias1))?;
        self.m = Some(m);
        self.v = Some(v);
        Ok((decayed - update)?.to_dtype(param.dtype())?)
    }

    /// The first and second moments as named CPU tensors (zeros before the first step).
    pub(super) fn moments(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (name, t) in [("adam.m", &self.m), ("adam.v", &self.v)] {
            if let Some(t) = t {
                out.push((name.to_string(), t.to_device(&Device::Cpu)?));
            }
        }
        Ok(out)
    }

    pub(super) fn restore(&mut self, m: Tensor, v: Tensor, steps: u64) {
        self.m = Some(m);
        self.v = Some(v);
        self.steps = steps;
    }
}
