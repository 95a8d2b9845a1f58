//! One layer above the engine: what a training application builds from it. The `sdti`
//! command uses these, and so can a host that wants the same run folders: a run folder
//! written as training goes ([`run_folder`]), preview pictures ([`preview`]), the loss plot
//! and PNG writing ([`plot`]), the fixed-noise evaluation the demo reports ([`eval`]), and
//! the timing of training steps that `sdti bench` and the benchmark share ([`bench`](mod@bench)).
//! The engine (`model`, `train`, `prompt`, `embedding`) never imports this module; the C
//! ABI (`ffi`) does, for its training previews (`sdti_trainer_preview`).

pub mod bench;
pub mod eval;
pub mod plot;
pub mod preview;
pub mod run_folder;
