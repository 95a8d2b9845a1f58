//! The one custom op every layer goes through: a precomputed output carried into
//! candle's graph with a backward closure that yields the input gradient only.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, Layout, MetalStorage, Shape, Storage,
    Tensor,
};

use crate::model::profile::{self, Level, Pass};

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

/// The forward methods of a custom op whose output was computed before it entered the
/// graph (its `output` slot), one per backend, for one, two or three inputs (named by the
/// call, unused).
macro_rules! precomputed_forward {
    ($($s:ident $l:ident),+) => {
        fn cpu_fwd(
            &self,
            $($s: &CpuStorage, $l: &Layout),+
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            cpu_result(take_output(&self.output)?)
        }

        fn cuda_fwd(
            &self,
            $($s: &CudaStorage, $l: &Layout),+
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            cuda_result(take_output(&self.output)?)
        }

        fn metal_fwd(
            &self,
            $($s: &MetalStorage, $l: &Layout),+
        ) -> candle_core::Result<(MetalStorage, Shape)> {
            metal_result(take_output(&self.output)?)
        }
    };
}

impl CustomOp1 for InputGradOnly {
    fn name(&self) -> &'static str {
        "sdti-input-grad-only"
    }

    precomputed_forward!(_s1 _l1);

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
    let level = Level::of(x);
    if !x.track_op() {
        return profile::time_at(kind, level, Pass::Forward, x.device(), || forward(x));
    }
    let out = profile::time_at(kind, level, Pass::Forward, x.device(), || {
        standalone(forward(&x.detach())?)
    })?;
    let op = InputGradOnly {
        output: Mutex::new(Some(out)),
        backward: Box::new(move |g, _, _| {
            profile::time_at(kind, level, Pass::Backward, g.device(), || backward(g))
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
    let level = Level::of(x);
    if !x.track_op() {
        return profile::time_at(kind, level, Pass::Forward, x.device(), || {
            forward(x).map(|(out, _)| out)
        });
    }
    let (out, saved) = profile::time_at(kind, level, Pass::Forward, x.device(), || {
        let (out, saved) = forward(&x.detach())?;
        Ok((standalone(out)?, saved))
    })?;
    let op = InputGradOnly {
        output: Mutex::new(Some(out)),
        backward: Box::new(move |g, x, y| {
            profile::time_at(kind, level, Pass::Backward, g.device(), || {
                backward(g, x, y, &saved)
            })
        }),
    };
    x.apply_op1(op)
}

/// A block's input gradients from its output gradient; consumed when the backward pass
/// reaches the block, so what it captured (the block's saved activations) is freed there
/// and peak memory falls during the backward pass. `G` is what it yields: [`Grads`] for
/// `[x, context]`, [`JoinedGrads`] for a joined input's two parts and the context.
type BlockBackward<G> = Box<dyn FnOnce(&Tensor) -> candle_core::Result<G> + Send + Sync>;

/// The gradients of a block's input and context.
type Grads = (Option<Tensor>, Option<Tensor>);

/// The gradients of the two parts of a joined input ([`apply_block_joined`]) and of the
/// context.
type JoinedGrads = ([Option<Tensor>; 2], Option<Tensor>);

/// One graph node for a whole block (a resnet, a spatial transformer, a CLIP layer):
/// the block's output, computed off the graph, and its hand-written backward pass.
struct BlockOp<G> {
    kind: &'static str,
    level: Option<Level>,
    output: Mutex<Option<Tensor>>,
    backward: Mutex<Option<BlockBackward<G>>>,
}

impl<G> BlockOp<G> {
    fn new(
        kind: &'static str,
        level: Option<Level>,
        output: Tensor,
        backward: BlockBackward<G>,
    ) -> Self {
        Self {
            kind,
            level,
            output: Mutex::new(Some(output)),
            backward: Mutex::new(Some(backward)),
        }
    }

    fn run_backward(&self, g: &Tensor) -> candle_core::Result<G> {
        let backward = self
            .backward
            .lock()
            .map_err(|_| candle_core::Error::Msg("block backward lock poisoned".into()))?
            .take()
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "{}: the backward pass ran twice over one forward pass",
                    self.kind
                ))
            })?;
        profile::time_at(self.kind, self.level, Pass::Backward, g.device(), || {
            backward(g)
        })
    }
}

impl CustomOp1 for BlockOp<Grads> {
    fn name(&self) -> &'static str {
        "sdti-block"
    }

    precomputed_forward!(_s1 _l1);

    fn bwd(&self, _: &Tensor, _: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(self.run_backward(g)?.0)
    }
}

impl CustomOp2 for BlockOp<Grads> {
    fn name(&self) -> &'static str {
        "sdti-block"
    }

    precomputed_forward!(_s1 _l1, _s2 _l2);

    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor, g: &Tensor) -> candle_core::Result<Grads> {
        self.run_backward(g)
    }
}

/// A block of layers with a hand-written backward pass: a forward pass off the graph
/// that can keep what the backward pass reads, and that backward pass.
///
/// Implementors are cheap to clone (their weights are shared tensors): the backward pass
/// owns a clone.
pub(crate) trait Block: Clone + Send + Sync + 'static {
    /// What the forward pass keeps for the backward pass.
    type Saved: Send + Sync + 'static;
    /// The block's name in profiles.
    const KIND: &'static str;

    /// The block's output for `x` (and the `context` the block attends to, if any);
    /// unless `keep` is [`Keep::Nothing`], also what [`Block::backward`] reads.
    fn run(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        keep: Keep,
    ) -> candle_core::Result<(Tensor, Option<Self::Saved>)>;

    /// The gradients of `x` and of the context (each when `need` says so) from the output
    /// gradient `g`.
    fn backward(
        &self,
        saved: Self::Saved,
        x: &Tensor,
        context: Option<&Tensor>,
        g: &Tensor,
        need: [bool; 2],
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)>;
}

/// What a block's forward pass keeps for its backward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Keep {
    /// Nothing: no gradient passes through the block.
    Nothing,
    /// The state waits for the backward pass through the rest of the step: a block may
    /// leave out what it can rebuild cheaply from what it keeps (a narrow transformer
    /// block's projections, `transformer::REBUILD_WIDTH`) and rebuild it there.
    Lean,
    /// The backward pass follows at once (a block rerun by [`Recompute`]): everything it
    /// reads.
    All,
}

impl Keep {
    /// Whether the forward pass keeps anything.
    pub(crate) fn any(self) -> bool {
        self != Keep::Nothing
    }
}

/// Whether a block keeps its activations for the backward pass or recomputes them there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Keep what each block's backward pass reads (fastest).
    #[default]
    Off,
    /// Keep only each block's inputs and rerun its forward pass inside the backward pass:
    /// about one more forward pass per step, for a fraction of the activation memory.
    On,
    /// Rerun only the UNet's spatial transformers whose bit is set (bit `i`: the `i`-th
    /// in the order the forward pass runs them, down path, mid block, up path) and keep
    /// every other block's state: what `auto` chooses when a step without recompute does
    /// not fit but rerunning some transformers is enough (they hold most of a step's
    /// state; [`crate::model::memory::recompute_order`] ranks them).
    Transformers(u32),
}

impl Recompute {
    /// Whether the UNet's `i`-th spatial transformer reruns under this choice.
    pub(crate) fn reruns_transformer(self, i: usize) -> bool {
        match self {
            Recompute::Off => false,
            Recompute::On => true,
            Recompute::Transformers(mask) => i < 32 && (mask >> i) & 1 == 1,
        }
    }

    /// What the UNet's `i`-th spatial transformer does under this choice.
    pub(crate) fn transformer(self, i: usize) -> Recompute {
        if self.reruns_transformer(i) {
            Recompute::On
        } else {
            Recompute::Off
        }
    }

    /// What a block other than a spatial transformer (a resnet) does: it recomputes only
    /// when every block does.
    pub(crate) fn other(self) -> Recompute {
        match self {
            Recompute::Transformers(_) => Recompute::Off,
            r => r,
        }
    }

    /// What a block's forward pass keeps under this choice, which [`Self::transformer`]
    /// or [`Self::other`] made for it: lean state for a backward pass that waits,
    /// nothing when the backward pass reruns the block.
    fn keep(self) -> Keep {
        match self {
            Recompute::Off => Keep::Lean,
            _ => Keep::Nothing,
        }
    }
}

/// What a block's backward pass reads: what its forward pass kept, or (recompute) its
/// forward pass rerun on the same input, keeping everything.
fn saved_or_rerun<B: Block>(
    block: &B,
    saved: Option<B::Saved>,
    x: &Tensor,
    context: Option<&Tensor>,
) -> candle_core::Result<B::Saved> {
    match saved {
        Some(s) => Ok(s),
        None => block.run(x, context, Keep::All)?.1.ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: the forward pass saved nothing", B::KIND))
        }),
    }
}

/// Runs `block` on `x` (and `context`) as one graph node: when either input is on a
/// gradient path, the output carries the block's backward pass; otherwise the block runs
/// with no graph and keeps nothing.
pub(crate) fn apply_block<B: Block>(
    block: &B,
    x: &Tensor,
    context: Option<&Tensor>,
    recompute: Recompute,
) -> candle_core::Result<Tensor> {
    let need = [x.track_op(), context.is_some_and(Tensor::track_op)];
    let level = Level::of(x);
    if !need[0] && !need[1] {
        return profile::time_at(B::KIND, level, Pass::Forward, x.device(), || {
            Ok(block.run(x, context, Keep::Nothing)?.0)
        });
    }
    let (xd, cd) = (x.detach(), context.map(Tensor::detach));
    let keep = recompute.keep();
    let (out, saved) = profile::time_at(B::KIND, level, Pass::Forward, x.device(), || {
        let (out, saved) = block.run(&xd, cd.as_ref(), keep)?;
        Ok((standalone(out)?, saved))
    })?;
    let b = block.clone();
    let backward: BlockBackward<Grads> = Box::new(move |g: &Tensor| {
        let saved = saved_or_rerun(&b, saved, &xd, cd.as_ref())?;
        b.backward(saved, &xd, cd.as_ref(), g, need)
    });
    let op = BlockOp::new(B::KIND, level, out, backward);
    match context {
        Some(c) => x.apply_op2(c, op),
        None => x.apply_op1(op),
    }
}

impl CustomOp2 for BlockOp<JoinedGrads> {
    fn name(&self) -> &'static str {
        "sdti-joined-block"
    }

    precomputed_forward!(_s1 _l1, _s2 _l2);

    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor, g: &Tensor) -> candle_core::Result<Grads> {
        let ([da, db], _) = self.run_backward(g)?;
        Ok((da, db))
    }
}

impl CustomOp3 for BlockOp<JoinedGrads> {
    fn name(&self) -> &'static str {
        "sdti-joined-block"
    }

    precomputed_forward!(_s1 _l1, _s2 _l2, _s3 _l3);

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let ([da, db], dc) = self.run_backward(g)?;
        Ok((da, db, dc))
    }
}

/// [`apply_block`] for a block whose input is `parts` joined along the channels (dim 1):
/// the UNet's up path, the previous block's output and a skip connection. The join is
/// not a graph node: candle's graph would hold it, a copy of two tensors it holds anyway,
/// until the backward pass ends (about 60 MiB at SD 1.5's 512 px). The forward pass joins
/// the parts for the block and frees the join; the backward pass joins them again (one
/// copy, freed with the block's state) and splits the input gradient between them.
pub(crate) fn apply_block_joined<B: Block>(
    block: &B,
    parts: [&Tensor; 2],
    context: Option<&Tensor>,
    recompute: Recompute,
) -> candle_core::Result<Tensor> {
    let [a, b] = parts;
    let need_parts = [a.track_op(), b.track_op()];
    let need_context = context.is_some_and(Tensor::track_op);
    let join = |a: &Tensor, b: &Tensor| Tensor::cat(&[a, b], 1);
    let level = Level::of(a).map(|l| Level {
        channels: l.channels + b.dims().get(1).copied().unwrap_or(0),
        ..l
    });
    if !need_parts[0] && !need_parts[1] && !need_context {
        return profile::time_at(B::KIND, level, Pass::Forward, a.device(), || {
            Ok(block.run(&join(a, b)?, context, Keep::Nothing)?.0)
        });
    }
    let (ad, bd, cd) = (a.detach(), b.detach(), context.map(Tensor::detach));
    let keep = recompute.keep();
    let (out, saved) = profile::time_at(B::KIND, level, Pass::Forward, a.device(), || {
        let (out, saved) = block.run(&join(&ad, &bd)?, cd.as_ref(), keep)?;
        Ok((standalone(out)?, saved))
    })?;
    let split = ad.dim(1)?;
    let blk = block.clone();
    let backward: BlockBackward<JoinedGrads> = Box::new(move |g: &Tensor| {
        let x = join(&ad, &bd)?;
        let saved = saved_or_rerun(&blk, saved, &x, cd.as_ref())?;
        let need = [need_parts[0] || need_parts[1], need_context];
        let (dx, dc) = blk.backward(saved, &x, cd.as_ref(), g, need)?;
        drop(x);
        let part = |i: usize, from: usize, len: usize| -> candle_core::Result<Option<Tensor>> {
            match &dx {
                Some(dx) if need_parts[i] => Ok(Some(dx.narrow(1, from, len)?)),
                _ => Ok(None),
            }
        };
        let total = dx.as_ref().map_or(Ok(split), |d| d.dim(1))?;
        Ok(([part(0, 0, split)?, part(1, split, total - split)?], dc))
    });
    let op = BlockOp::new(B::KIND, level, out, backward);
    match context {
        Some(c) => a.apply_op3(b, c, op),
        None => a.apply_op2(b, op),
    }
}
