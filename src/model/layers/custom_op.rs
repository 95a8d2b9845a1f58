//! The one custom op every layer goes through: a precomputed output carried into
//! candle's graph with a backward closure that yields the input gradient only.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, Layout, MetalStorage, Shape, Storage, Tensor,
};

use crate::model::profile::{self, Pass};

/// Maps (output gradient, input, output) to the input gradient. The input and output
/// are the graph's own tensors (detached), so a backward pass keeps no copy of them.
type Backward = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync>;

/// Carries a precomputed output into the graph and the closure that maps the output
/// gradient to the input gradient.
struct InputGradOnly {
    output: Mutex<Option<Tensor>>,
    backward: Backward,
}

/// Takes the precomputed output out of its slot (each op runs its forward once).
pub(super) fn take_output(slot: &Mutex<Option<Tensor>>) -> candle_core::Result<Tensor> {
    slot.lock()
        .map_err(|_| candle_core::Error::Msg("precomputed output lock poisoned".into()))?
        .take()
        .ok_or_else(|| candle_core::Error::Msg("precomputed output used twice".into()))
}

/// The storage of a precomputed output, handed to candle as a custom op's result; one
/// function per backend, as candle's custom ops have one forward per backend.
pub(super) fn cpu_result(out: Tensor) -> candle_core::Result<(CpuStorage, Shape)> {
    let (storage, layout) = out.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
        _ => candle_core::bail!("precomputed output is not on the cpu"),
    }
}

pub(super) fn cuda_result(out: Tensor) -> candle_core::Result<(CudaStorage, Shape)> {
    let (storage, layout) = out.storage_and_layout();
    match &*storage {
        Storage::Cuda(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
        _ => candle_core::bail!("precomputed output is not on the cuda device"),
    }
}

pub(super) fn metal_result(out: Tensor) -> candle_core::Result<(MetalStorage, Shape)> {
    let (storage, layout) = out.storage_and_layout();
    match &*storage {
        Storage::Metal(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
        _ => candle_core::bail!("precomputed output is not on the metal device"),
    }
}

/// A contiguous tensor starting at offset 0 of its storage, so that its storage can be
/// handed to candle as the op's result.
pub(super) fn standalone(t: Tensor) -> candle_core::Result<Tensor> {
    if t.is_contiguous() && t.layout().start_offset() == 0 {
        Ok(t)
    } else {
        t.force_contiguous()
    }
}

impl CustomOp1 for InputGradOnly {
    fn name(&self) -> &'static str {
        "sdti-input-grad-only"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_result(take_output(&self.output)?)
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        cuda_result(take_output(&self.output)?)
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        metal_result(take_output(&self.output)?)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        (self.backward)(grad, &arg.detach(), &res.detach()).map(Some)
    }
}

/// Applies `forward` to `x`; when `x` is on a gradient path, the result carries
/// `backward` (output gradient -> input gradient) and no other gradient.
///
/// `kind` names the layer for [`profile`](crate::model::profile) (`"conv2d"`: its passes are
/// timed as `conv2d.fwd` and `conv2d.bwd`).
pub(super) fn input_grad_only<F, B>(
    kind: &'static str,
    x: &Tensor,
    forward: F,
    backward: B,
) -> candle_core::Result<Tensor>
where
    F: FnOnce(&Tensor) -> candle_core::Result<Tensor>,
    B: Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
{
    if !x.track_op() {
        return profile::time(kind, Pass::Forward, x.device(), || forward(x));
    }
    let out = profile::time(kind, Pass::Forward, x.device(), || {
        standalone(forward(&x.detach())?)
    })?;
    let op = InputGradOnly {
        output: Mutex::new(Some(out)),
        backward: Box::new(move |g, _, _| {
            profile::time(kind, Pass::Backward, g.device(), || backward(g))
        }),
    };
    x.apply_op1(op)
}

/// Like [`input_grad_only`], for layers whose backward needs the input, the output or
/// small values computed in the forward pass (statistics): `forward` returns the output
/// and the saved state, `backward` gets the output gradient, the input, the output and
/// the state. Large intermediates are recomputed from the input rather than saved.
pub(super) fn input_grad_only_saving<S, F, B>(
    kind: &'static str,
    x: &Tensor,
    forward: F,
    backward: B,
) -> candle_core::Result<Tensor>
where
    S: Send + Sync + 'static,
    F: FnOnce(&Tensor) -> candle_core::Result<(Tensor, S)>,
    B: Fn(&Tensor, &Tensor, &Tensor, &S) -> candle_core::Result<Tensor> + Send + Sync + 'static,
{
    if !x.track_op() {
        return profile::time(kind, Pass::Forward, x.device(), || {
            forward(x).map(|(out, _)| out)
        });
    }
    let (out, saved) = profile::time(kind, Pass::Forward, x.device(), || {
        let (out, saved) = forward(&x.detach())?;
        Ok((standalone(out)?, saved))
    })?;
    let op = InputGradOnly {
        output: Mutex::new(Some(out)),
        backward: Box::new(move |g, x, y| {
            profile::time(kind, Pass::Backward, g.device(), || {
                backward(g, x, y, &saved)
            })
        }),
    };
    x.apply_op1(op)
}
