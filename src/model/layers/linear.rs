//! A frozen fully connected layer.

use candle_core::Tensor;

use super::custom_op::input_grad_only;
use crate::error::Result;
use crate::model::weights::Weights;

/// A frozen fully connected layer, `y = x W^T + b`, over the last dimension.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `{prefix}.weight` (`[out, in]`) and, when `bias`, `{prefix}.bias`.
    pub fn new(w: &Weights, prefix: &str, bias: bool) -> Result<Self> {
        let weight = w.get2(&format!("{prefix}.weight"))?;
        let bias = if bias {
            Some(w.get_shaped(&format!("{prefix}.bias"), &[weight.dim(0)?])?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let weight = self.weight.clone();
        let bias = self.bias.clone();
        let forward = |x: &Tensor| {
            let dims = x.dims().to_vec();
            let last = dims.len() - 1;
            let rows = x.elem_count() / dims[last];
            let y = x.reshape((rows, dims[last]))?.matmul(&weight.t()?)?;
            let y = match &bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            };
            let mut out_dims = dims;
            out_dims[last] = weight.dim(0)?;
            y.reshape(out_dims)
        };
        let w = self.weight.clone();
        let backward = move |g: &Tensor| {
            let dims = g.dims().to_vec();
            let last = dims.len() - 1;
            let rows = g.elem_count() / dims[last];
            let gx = g.reshape((rows, dims[last]))?.matmul(&w)?;
            let mut in_dims = dims;
            in_dims[last] = w.dim(1)?;
            gx.reshape(in_dims)
        };
        Ok(input_grad_only("linear", x, forward, backward)?)
    }
}
