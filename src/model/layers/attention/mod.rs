//! Memory-bounded scaled dot-product attention with a recomputing backward pass.
//!
//! Two interfaces: [`attention_forward`] and [`attention_backward`] work off the graph on
//! the merged-head `[B, tokens, H*dh]` layout (the block-level ops call them and keep `o`
//! and `lse` for their own backward), and the graph-level [`attention`] over split heads.
//! f32 on the CPU runs the flash kernel of [`flash`]; everything else runs candle ops
//! ([`generic`]).

#[cfg(test)]
mod api_tests;
mod flash;
mod generic;
#[cfg(test)]
mod timing;

use std::sync::Mutex;

use candle_core::{CpuStorage, CudaStorage, Layout, MetalStorage, Shape, Tensor, D};

use super::cpu::is_cpu_f32;
use super::custom_op::{cpu_result, cuda_result, metal_result, standalone, take_output};
use crate::error::Result;
use crate::model::profile::{self, Pass};

/// Carries a precomputed attention output into the graph; the backward pass recomputes
/// the probabilities chunk by chunk instead of keeping the `[T, T]` matrices alive.
struct AttentionOp {
    output: Mutex<Option<Tensor>>,
    scale: f64,
    mask: Option<Tensor>,
    need: [bool; 3],
    /// The forward's row log-sum-exp when it ran through [`attention_forward`] (no mask):
    /// the backward pass is then [`attention_backward`].
    lse: Option<Tensor>,
}

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

/// Rows of one slice per block when a slice's `tq x tk` scores exceed `block`.
fn block_rows(tq: usize, tk: usize, block: usize) -> usize {
    (block / tk.max(1)).clamp(64, tq.max(1))
}

/// The blocks of an attention over `[slices, tq, _]` x `[slices, tk, _]` with `block`
/// scores at most per block: whole slices while several fit in a block, else rows of one
/// slice.
fn attention_blocks(
    slices: usize,
    tq: usize,
    tk: usize,
    block: usize,
) -> Vec<(usize, usize, usize, usize)> {
    let per_slice = (tq * tk).max(1);
    let mut blocks = Vec::new();
    if per_slice <= block {
        let chunk = (block / per_slice).clamp(1, slices.max(1));
        for s in (0..slices).step_by(chunk) {
            blocks.push((s, chunk.min(slices - s), 0, tq));
        }
    } else {
        let rows = block_rows(tq, tk, block);
        for s in 0..slices {
            for r in (0..tq).step_by(rows) {
                blocks.push((s, 1, r, rows.min(tq - r)));
            }
        }
    }
    blocks
}

fn attention_probs(
    q: &Tensor,
    k_t: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    // Scaling q ([T, d]) is cheaper than scaling the [T, T] scores.
    let scores = (q * scale)?.matmul(k_t)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    candle_nn::ops::softmax_last_dim(&scores)
}

/// The rows `r .. r + n` of the `[T, T]` mask.
fn mask_rows(mask: Option<&Tensor>, r: usize, n: usize) -> candle_core::Result<Option<Tensor>> {
    mask.map(|m| m.narrow(0, r, n)).transpose()
}

fn split_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let (slices, tq, _) = q.dims3()?;
    let tk = k.dim(1)?;
    let block = attention_block(q.device());
    let k_t = k.transpose(1, 2)?.contiguous()?;
    let mut outs = Vec::new();
    for (s, len, r, n) in attention_blocks(slices, tq, tk, block) {
        let p = attention_probs(
            &q.narrow(0, s, len)?.narrow(1, r, n)?,
            &k_t.narrow(0, s, len)?,
            scale,
            mask_rows(mask, r, n)?.as_ref(),
        )?;
        outs.push(p.matmul(&v.narrow(0, s, len)?)?);
    }
    if outs.len() == 1 {
        Ok(outs.remove(0))
    } else if tq * tk <= block {
        Tensor::cat(&outs, 0)
    } else {
        // Row blocks of each slice, slice after slice.
        let per = tq.div_ceil(block_rows(tq, tk, block));
        let rows: Vec<Tensor> = outs
            .chunks(per)
            .map(|c| Tensor::cat(c, 1))
            .collect::<candle_core::Result<_>>()?;
        Tensor::cat(&rows, 0)
    }
}

/// Attention mask kinds the models use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionMask {
    None,
    /// Query `i` sees keys `0..=i` (CLIP's text encoder).
    Causal,
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
            flash::forward(q, k, v, heads, scale, mask)
        } else {
            generic::forward(q, k, v, heads, scale, mask)
        }
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
            flash::backward(q, k, v, o, lse, g, heads, scale, mask, need)
        } else {
            generic::backward(q, k, v, o, lse, g, heads, scale, mask, need)
        }
    })
}

impl candle_core::CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "sdti-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_result(take_output(&self.output)?)
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        cuda_result(take_output(&self.output)?)
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        metal_result(take_output(&self.output)?)
    }

    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        match &self.lse {
            Some(lse) => attention_backward(
                &q.detach(),
                &k.detach(),
                &v.detach(),
                &res.detach(),
                lse,
                g,
                1,
                self.scale,
                AttentionMask::None,
                self.need,
            ),
            None => profile::time("attention", Pass::Backward, g.device(), || {
                self.backward(q, k, v, res, g)
            }),
        }
    }
}

impl AttentionOp {
    #[allow(clippy::type_complexity)]
    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v, out) = (q.detach(), k.detach(), v.detach(), res.detach());
        let (slices, tq, _) = q.dims3()?;
        let tk = k.dim(1)?;
        let k_t = k.transpose(1, 2)?.contiguous()?;
        let v_t = v.transpose(1, 2)?.contiguous()?;
        let mut dq_rows: Vec<Tensor> = Vec::new();
        let (mut dqs, mut dks, mut dvs) = (Vec::new(), Vec::new(), Vec::new());
        // dk and dv of the slice (chunk) being worked on, summed over its row blocks.
        let mut acc: Option<(usize, Option<Tensor>, Option<Tensor>)> = None;
        let flush = |acc: &mut Option<(usize, Option<Tensor>, Option<Tensor>)>,
                     dks: &mut Vec<Tensor>,
                     dvs: &mut Vec<Tensor>| {
            if let Some((_, dk, dv)) = acc.take() {
                dks.extend(dk);
                dvs.extend(dv);
            }
        };
        let block = attention_block(q.device());
        for (s, len, r, n) in attention_blocks(slices, tq, tk, block) {
            if acc.as_ref().is_some_and(|(cur, _, _)| *cur != s) {
                flush(&mut acc, &mut dks, &mut dvs);
                if !dq_rows.is_empty() {
                    dqs.push(Tensor::cat(&dq_rows, 1)?);
                    dq_rows.clear();
                }
            }
            let qc = q.narrow(0, s, len)?.narrow(1, r, n)?;
            let gc = g.narrow(0, s, len)?.narrow(1, r, n)?;
            let p = attention_probs(
                &qc,
                &k_t.narrow(0, s, len)?,
                self.scale,
                mask_rows(self.mask.as_ref(), r, n)?.as_ref(),
            )?;
            let entry = acc.get_or_insert((s, None, None));
            if self.need[2] {
                let dv = p.t()?.matmul(&gc)?;
                entry.2 = Some(match entry.2.take() {
                    Some(sum) => (sum + dv)?,
                    None => dv,
                });
            }
            if self.need[0] || self.need[1] {
                let dp = gc.matmul(&v_t.narrow(0, s, len)?)?;
                // sum_j dP_ij P_ij equals dO_i . O_i (as flash attention computes it):
                // a [T, d] product instead of another pass over [T, T].
                let oc = out.narrow(0, s, len)?.narrow(1, r, n)?;
                let dot = (&gc * oc)?.sum_keepdim(D::Minus1)?;
                // The scale is applied to the [T, d] results, not to the [T, T] matrix.
                let ds = (p * dp.broadcast_sub(&dot)?)?;
                if self.need[0] {
                    dq_rows.push((ds.matmul(&k.narrow(0, s, len)?)? * self.scale)?);
                }
                if self.need[1] {
                    let dk = (ds.t()?.matmul(&qc)? * self.scale)?;
                    entry.1 = Some(match entry.1.take() {
                        Some(sum) => (sum + dk)?,
                        None => dk,
                    });
                }
            }
        }
        flush(&mut acc, &mut dks, &mut dvs);
        if !dq_rows.is_empty() {
            dqs.push(Tensor::cat(&dq_rows, 1)?);
        }
        let join = |parts: Vec<Tensor>| -> candle_core::Result<Option<Tensor>> {
            if parts.is_empty() {
                Ok(None)
            } else {
                Tensor::cat(&parts, 0).map(Some)
            }
        };
        Ok((join(dqs)?, join(dks)?, join(dvs)?))
    }
}

/// `softmax(q k^T * scale + mask) v` over `[batch*heads, tokens, head_dim]` tensors.
/// Memory-bounded: the forward pass works in chunks of slices and the backward pass
/// recomputes the probabilities, so no `[T, T]` matrix outlives its chunk.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let need = [q.track_op(), k.track_op(), v.track_op()];
    if mask.is_none() {
        // The off-graph attention with one head per slice: the flash kernel for f32 on
        // the CPU. (Arbitrary mask tensors keep the blocked path below.)
        if !need.iter().any(|&n| n) {
            return Ok(attention_forward(&q, &k, &v, 1, scale, AttentionMask::None)?.0);
        }
        let (out, lse) = attention_forward(
            &q.detach(),
            &k.detach(),
            &v.detach(),
            1,
            scale,
            AttentionMask::None,
        )?;
        let op = AttentionOp {
            output: Mutex::new(Some(standalone(out)?)),
            scale,
            mask: None,
            need,
            lse: Some(lse),
        };
        return Ok(q.apply_op3(&k, &v, op)?);
    }
    if !need.iter().any(|&n| n) {
        return Ok(profile::time(
            "attention",
            Pass::Forward,
            q.device(),
            || split_forward(&q, &k, &v, scale, mask),
        )?);
    }
    let out = profile::time("attention", Pass::Forward, q.device(), || {
        standalone(split_forward(
            &q.detach(),
            &k.detach(),
            &v.detach(),
            scale,
            mask,
        )?)
    })?;
    let op = AttentionOp {
        output: Mutex::new(Some(out)),
        scale,
        mask: mask.cloned(),
        need,
        lse: None,
    };
    Ok(q.apply_op3(&k, &v, op)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The graph attention, without a mask (the flash kernel) and with a causal mask
    /// tensor (blocked: whole slices, and row blocks of long slices), gives the output
    /// and the q, k, v gradients of the plain composition, which candle differentiates.
    #[test]
    fn blocked_attention_matches_the_plain_composition() -> candle_core::Result<()> {
        use candle_core::Var;
        let d = Device::Cpu;
        for (slices, t, dh, masked) in [
            (3usize, 50usize, 8usize, false),
            (2, 1500, 8, false),
            (3, 50, 8, true),
            (2, 1500, 8, true),
        ] {
            let mask = masked
                .then(|| {
                    let m: Vec<f32> = (0..t)
                        .flat_map(|i| {
                            (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })
                        })
                        .collect();
                    Tensor::from_vec(m, (t, t), &d)
                })
                .transpose()?;
            let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (slices, t, dh), &d)?)?;
            let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (slices, t, dh), &d)?)?;
            let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (slices, t, dh), &d)?)?;
            let w = Tensor::randn(0f32, 1.0, (slices, t, dh), &d)?;
            let scale = 0.3;
            let ours = attention(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                scale,
                mask.as_ref(),
            )
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            let mut scores = (q.as_tensor().matmul(&k.as_tensor().t()?)? * scale)?;
            if let Some(m) = &mask {
                scores = scores.broadcast_add(m)?;
            }
            let max = scores.max_keepdim(D::Minus1)?.detach();
            let e = scores.broadcast_sub(&max)?.exp()?;
            let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
            let plain = p.matmul(v.as_tensor())?;
            let diff = (&ours - &plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "output {slices}x{t}: {diff}");
            let g_ours = (ours * &w)?.sum_all()?.backward()?;
            let g_plain = (plain * &w)?.sum_all()?.backward()?;
            for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
                let a = g_ours.get(var.as_tensor()).expect("gradient");
                let b = g_plain.get(var.as_tensor()).expect("gradient");
                let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let size = b.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    diff <= 1e-4 * size.max(1.0),
                    "d{name} {slices}x{t}: {diff} (max {size})"
                );
            }
        }
        Ok(())
    }
}
