//! One layer above the engine: what a training application builds from it. The `sdti`
//! command uses these, and so can a host that wants the same run folders: a run folder
//! written as training goes ([`run_folder`]), preview pictures ([`preview`]), the loss plot
//! and PNG writing ([`plot`]), and the fixed-noise evaluation the demo reports ([`eval`]).
//! The engine (`model`, `train`, `prompt`, `embedding`, `ffi`) never imports this module.

pub mod eval;
pub mod plot;
pub mod preview;
pub mod run_folder;
