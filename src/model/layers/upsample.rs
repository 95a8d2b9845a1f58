//! Nearest-neighbour upsampling.

use candle_core::Tensor;

use super::custom_op::input_grad_only;
use crate::error::Result;

/// Nearest-neighbour upsampling to `h` x `w` (torch's `nearest`: source index
/// `floor(dst * in / out)`); exact 2x takes the fast path below, other sizes gather rows
/// and columns (whose backward candle provides).
pub fn upsample_nearest_to(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, xh, xw) = x.dims4()?;
    if h == 2 * xh && w == 2 * xw {
        return upsample_nearest_2x(x);
    }
    let index = |out: usize, inp: usize| -> Result<Tensor> {
        let idx: Vec<u32> = (0..out)
            .map(|d| ((d as f64 * inp as f64 / out as f64).floor() as usize).min(inp - 1) as u32)
            .collect();
        Ok(Tensor::from_vec(idx, out, x.device())?)
    };
    let rows = x.index_select(&index(h, xh)?, 2)?;
    Ok(rows.index_select(&index(w, xw)?, 3)?)
}

/// Nearest-neighbour 2x upsampling; its input gradient sums each 2x2 block.
pub fn upsample_nearest_2x(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let forward = |x: &Tensor| x.upsample_nearest2d(2 * h, 2 * w);
    let backward = |g: &Tensor| g.avg_pool2d(2)? * 4.0;
    Ok(input_grad_only("upsample", x, forward, backward)?)
}
