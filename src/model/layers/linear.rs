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

    /// The layers stacked along their outputs (same inputs): one matrix product computes
    /// all their outputs side by side, e.g. an attention's q, k and v. Concatenated once,
    /// when the model loads; the parts' weights are not kept.
    pub(crate) fn concat(parts: &[Linear]) -> Result<Self> {
        let weights: Vec<&Tensor> = parts.iter().map(|l| &l.weight).collect();
        let weight = Tensor::cat(&weights, 0)?;
        let bias = if parts.iter().all(|l| l.bias.is_none()) {
            None
        } else {
            let biases = parts
                .iter()
                .map(|l| match &l.bias {
                    Some(b) => Ok(b.clone()),
                    None => l.weight.narrow(1, 0, 1)?.squeeze(1)?.zeros_like(),
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Some(Tensor::cat(&biases, 0)?)
        };
        Ok(Self { weight, bias })
    }

    /// The `N` equal parts of a [`Linear::concat`] layer's output `y` (last dimension), as
    /// views: e.g. q, k and v of a fused projection.
    pub(crate) fn parts<const N: usize>(y: &Tensor) -> candle_core::Result<[Tensor; N]> {
        let last = y.rank() - 1;
        let width = y.dim(last)? / N;
        let mut parts = Vec::with_capacity(N);
        for i in 0..N {
            parts.push(y.narrow(last, i * width, width)?);
        }
        parts
            .try_into()
            .map_err(|_| candle_core::Error::Msg("fused projection: wrong part count".into()))
    }

    /// The input gradient of a [`Linear::concat`] layer from its parts' output gradients,
    /// each of which must be there: one product with the stacked weights.
    pub(crate) fn input_grad_of_parts<const N: usize>(
        &self,
        parts: [Option<Tensor>; N],
    ) -> candle_core::Result<Tensor> {
        let parts = parts
            .into_iter()
            .map(|p| {
                p.ok_or_else(|| {
                    candle_core::Error::Msg("fused projection: a part's gradient is missing".into())
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let last = parts.first().map_or(0, |p| p.rank().saturating_sub(1));
        self.input_grad(&Tensor::cat(&parts, last)?)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let layer = self.clone();
        Ok(input_grad_only(
            "linear",
            x,
            |x| self.apply(x),
            move |g| layer.input_grad(g),
        )?)
    }

    /// The layer on a tensor off the graph.
    pub(crate) fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let last = dims.len() - 1;
        let rows = x.elem_count() / dims[last];
        let y = x.reshape((rows, dims[last]))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims;
        out_dims[last] = self.weight.dim(0)?;
        y.reshape(out_dims)
    }

    /// d(loss)/d(input) from the output gradient `g`: `g W` (the input is not needed).
    pub(crate) fn input_grad(&self, g: &Tensor) -> candle_core::Result<Tensor> {
        let dims = g.dims().to_vec();
        let last = dims.len() - 1;
        let rows = g.elem_count() / dims[last];
        let gx = g.reshape((rows, dims[last]))?.matmul(&self.weight)?;
        let mut in_dims = dims;
        in_dims[last] = self.weight.dim(1)?;
        gx.reshape(in_dims)
    }
}
