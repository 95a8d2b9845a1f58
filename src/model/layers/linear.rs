//! A frozen fully connected layer.

use candle_core::{DType, Tensor};

use super::custom_op::input_grad_only;
use super::gemm::{matmul, matmul_sum, Bias};
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
        Self::with_weight(w, prefix, bias, w.get2(&format!("{prefix}.weight"))?)
    }

    /// [`Linear::new`] with the weight's shape checked: `[out, in]`.
    pub fn new_shaped(
        w: &Weights,
        prefix: &str,
        bias: bool,
        (out, inp): (usize, usize),
    ) -> Result<Self> {
        let weight = w.get_shaped(&format!("{prefix}.weight"), &[out, inp])?;
        Self::with_weight(w, prefix, bias, weight)
    }

    /// The layer of `weight` (`[out, in]`) and, when `bias`, `{prefix}.bias` (`[out]`).
    fn with_weight(w: &Weights, prefix: &str, bias: bool, weight: Tensor) -> Result<Self> {
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
    /// each of which must be there: on f32 CPU tensors the sum of each part's product with
    /// its rows of the stacked weights (no concatenated copy of the gradients), elsewhere
    /// one product with the stacked weights.
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
        let Some(first) = parts.first() else {
            candle_core::bail!("fused projection: no parts");
        };
        let mut in_dims = first.dims().to_vec();
        let last = in_dims.len().saturating_sub(1);
        let mut weights = Vec::with_capacity(parts.len());
        let mut rows = Vec::with_capacity(parts.len());
        let mut offset = 0;
        for p in &parts {
            let width = p.dim(last)?;
            weights.push(self.weight.narrow(0, offset, width)?);
            rows.push(as_rows(p)?);
            offset += width;
        }
        let terms: Vec<(&Tensor, &Tensor)> = rows.iter().zip(&weights).collect();
        match matmul_sum(&terms) {
            Some(gx) => {
                in_dims[last] = self.weight.dim(1)?;
                gx?.reshape(in_dims)
            }
            None => self.input_grad(&Tensor::cat(&parts, last)?),
        }
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
        self.apply_add(x, None)
    }

    /// The layer plus `residual` (the output's shape), added as the output is made: a
    /// residual connection without another pass over the output.
    pub(crate) fn apply_add(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let xr = as_rows(x)?;
        let bias = match &self.bias {
            Some(b) => Bias::Cols(b),
            None => Bias::None,
        };
        let mut out_dims = x.dims().to_vec();
        let last = out_dims.len().saturating_sub(1);
        out_dims[last] = self.weight.dim(0)?;
        let mut product_dims = xr.dims().to_vec();
        product_dims[xr.rank() - 1] = self.weight.dim(0)?;
        let residual = residual.map(|r| r.reshape(product_dims)).transpose()?;
        matmul(&xr, &self.weight.t()?, bias, residual.as_ref())?.reshape(out_dims)
    }

    /// d(loss)/d(input) from the output gradient `g`: `g W` (the input is not needed).
    pub(crate) fn input_grad(&self, g: &Tensor) -> candle_core::Result<Tensor> {
        let mut in_dims = g.dims().to_vec();
        let last = in_dims.len().saturating_sub(1);
        in_dims[last] = self.weight.dim(1)?;
        matmul(&as_rows(g)?, &self.weight, Bias::None, None)?.reshape(in_dims)
    }

    /// A layer of the given weight (`[out, in]`) and bias, for the timing harnesses.
    #[cfg(test)]
    pub(super) fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// The weight, `[out, in]`.
    pub(crate) fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, `[out]`, when the layer has one.
    pub(crate) fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

/// `x` (`[..., in]`) as the rows of a product: a `[rows, in]` view when it is contiguous,
/// a strided f32 CPU `[B, N, in]` view as it is (gemm reads its strides), else a
/// contiguous copy.
fn as_rows(x: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let Some(&width) = dims.last() else {
        candle_core::bail!("linear: a scalar input has no features");
    };
    let cpu_f32 = x.device().is_cpu() && x.dtype() == DType::F32;
    if dims.len() == 3 && !x.is_contiguous() && cpu_f32 {
        return Ok(x.clone());
    }
    x.reshape((x.elem_count() / width.max(1), width))
}
