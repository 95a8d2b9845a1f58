//! Frozen layers whose backward pass yields the input gradient only.
//!
//! candle's autograd computes a gradient for every operand of an op on the path to a
//! variable, frozen weights included (a convolution's kernel gradient costs as much as
//! its input gradient), and candle-nn's fused `LayerNorm`/`softmax_last_dim` cut the
//! graph. Every layer here runs its forward pass on a detached input with candle's fast
//! kernels and attaches, through one custom op, a backward closure that computes
//! d(loss)/d(input) and nothing else. When the input does not depend on a variable the
//! layer is a plain forward pass with no graph at all.
//!
//! One file per layer kind; `custom_op` holds the plumbing they share and `cpu` the
//! f32 CPU helpers of their fused kernels.

mod activation;
mod attention;
mod conv;
mod cpu;
mod custom_op;
mod gemm;
mod group_norm;
mod layer_norm;
mod linear;
#[cfg(test)]
mod linear_timing;
mod simd;
mod skinny;
mod upsample;
mod winograd;

pub(crate) use self::gemm::{matmul, Bias};
pub use activation::{geglu, gelu_erf, quick_gelu, silu, Activation, QUICK_GELU_ALPHA};
pub(crate) use activation::{geglu_apply, geglu_input_grad};
pub use attention::{attention_backward, attention_forward, AttentionMask};
pub use conv::Conv2d;
pub use custom_op::Recompute;
pub(crate) use custom_op::{apply_block, apply_block_joined, Block, Keep};
pub use group_norm::GroupNorm;
pub use layer_norm::LayerNorm;
pub(crate) use layer_norm::Stats;
pub use linear::Linear;
pub use upsample::{upsample_nearest_2x, upsample_nearest_to};
pub(crate) use winograd::release_scratch;
