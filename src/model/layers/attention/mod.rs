//! Memory-bounded scaled dot-product attention, off the graph: [`attention_forward`] and
//! [`attention_backward`] on the merged-head `[B, tokens, H*dh]` layout (the block-level
//! ops call them and keep `o` and `lse` for their own backward pass; the VAE's attention,
//! which has no backward pass, calls the forward alone). f32 on the CPU runs the flash
//! kernel of [`flash`]; f16/bf16 on CUDA runs cuDNN's fused attention when cuDNN is loaded
//! (`crate::gpu::cudnn`, the `cuda` feature); everything else runs candle ops, blocked by
//! rows ([`generic`]).

#[cfg(test)]
mod api_tests;
mod flash;
mod generic;
#[cfg(test)]
mod timing;

use candle_core::Tensor;

use super::cpu::is_cpu_f32;
use crate::model::profile::{self, Pass};

/// Score-matrix values per block on the CPU: small enough that a block's scores,
/// probabilities and their gradients stay in cache (measured: 512-row blocks of a
/// 4096-token head run the backward pass twice as fast as whole heads on the CPU).
const ATTENTION_BLOCK_CPU: usize = 2 * 1024 * 1024;

/// On a GPU, blocks only bound memory (a block of 64M scores is 128 MiB in bf16) while
/// keeping the number of kernel launches small: at 512 px and batch 8 the largest
/// self-attention is 16 blocks of 4 heads.
const ATTENTION_BLOCK_GPU: usize = 64 * 1024 * 1024;

fn attention_block(device: &candle_core::Device) -> usize {
    if device.is_cpu() {
        ATTENTION_BLOCK_CPU
    } else {
        ATTENTION_BLOCK_GPU
    }
}

/// Attention mask kinds the models use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionMask {
    None,
    /// Query `i` sees keys `0..=i` (CLIP's text encoder).
    Causal,
}

/// Whether `mask` hides later keys (cuDNN's causal mask, aligned top-left as here).
#[cfg(feature = "cuda")]
fn causal(mask: AttentionMask) -> bool {
    mask == AttentionMask::Causal
}

/// The shapes of an attention call, checked: `(batch, queries, keys, channels)`.
fn check_inputs(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
) -> candle_core::Result<(usize, usize, usize, usize)> {
    let (b, n, c) = q.dims3()?;
    let (kb, m, kc) = k.dims3()?;
    let vd = v.dims3()?;
    if heads == 0 || c % heads != 0 {
        candle_core::bail!("attention: {c} channels do not split into {heads} heads");
    }
    if (kb, kc) != (b, c) || vd != (b, m, c) {
        candle_core::bail!(
            "attention: q {:?}, k {:?} and v {:?} do not match ([B, N, C], [B, M, C], [B, M, C])",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if b == 0 || n == 0 || m == 0 || c == 0 {
        candle_core::bail!(
            "attention: empty input (q {:?}, k {:?})",
            q.dims(),
            k.dims()
        );
    }
    for t in [k, v] {
        if t.dtype() != q.dtype() || !t.device().same_device(q.device()) {
            candle_core::bail!(
                "attention: q, k and v differ in dtype or device ({:?}/{:?} vs {:?}/{:?})",
                q.dtype(),
                q.device().location(),
                t.dtype(),
                t.device().location()
            );
        }
    }
    Ok((b, n, m, c))
}

/// Off-graph multi-head attention forward. q: `[B, N, H*dh]`, k and v: `[B, M, H*dh]`; each
/// may be a strided view whose last dimension is contiguous (e.g. `qkv.narrow(2, 0, C)` of
/// a fused `[B, N, 3C]` projection output), heads are the consecutive dh-wide slices of
/// the last dimension.
///
/// Returns o: `[B, N, H*dh]` contiguous (heads already merged, ready for the output
/// projection) and lse: `[B, H, N]` (f32, f64 for f64 inputs), the row log-sum-exp of the
/// scaled scores, which is what [`attention_backward`] needs.
pub fn attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    mask: AttentionMask,
) -> candle_core::Result<(Tensor, Tensor)> {
    check_inputs(q, k, v, heads)?;
    profile::time("attention", Pass::Forward, q.device(), || {
        if is_cpu_f32(&[q, k, v]) {
            return flash::forward(q, k, v, heads, scale, mask);
        }
        #[cfg(feature = "cuda")]
        if let Some(out) = crate::gpu::cudnn::sdpa_forward(q, k, v, heads, scale, causal(mask))? {
            return Ok(out);
        }
        generic::forward(q, k, v, heads, scale, mask)
    })
}

/// Off-graph backward: given the forward's inputs, its output `o` and `lse`, and the
/// output gradient `g` (`[B, N, H*dh]`), the gradients of q, k and v in the same
/// `[B, tokens, H*dh]` layout (contiguous). `need` says which are wanted (`[q, k, v]`);
/// the others come back `None` and are not computed.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    g: &Tensor,
    heads: usize,
    scale: f64,
    mask: AttentionMask,
    need: [bool; 3],
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (b, n, _, _) = check_inputs(q, k, v, heads)?;
    if o.dims() != q.dims() || g.dims() != q.dims() || lse.dims() != [b, heads, n] {
        candle_core::bail!(
            "attention backward: o {:?}, g {:?} and lse {:?} do not match q {:?} and {heads} heads",
            o.dims(),
            g.dims(),
            lse.dims(),
            q.dims()
        );
    }
    if !need.iter().any(|&x| x) {
        return Ok((None, None, None));
    }
    profile::time("attention", Pass::Backward, q.device(), || {
        if is_cpu_f32(&[q, k, v, o, lse, g]) {
            return flash::backward(q, k, v, o, lse, g, heads, scale, mask, need);
        }
        #[cfg(feature = "cuda")]
        if let Some((dq, dk, dv)) =
            crate::gpu::cudnn::sdpa_backward(q, k, v, o, lse, g, heads, scale, causal(mask))?
        {
            let keep = |t: Tensor, i: usize| need[i].then_some(t);
            return Ok((keep(dq, 0), keep(dk, 1), keep(dv, 2)));
        }
        generic::backward(q, k, v, o, lse, g, heads, scale, mask, need)
    })
}
