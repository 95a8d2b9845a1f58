//! Training: data, prompts, schedules, the step and its optimizer.

pub mod data;
pub mod loss;
pub mod prompts;
pub mod schedule;
pub mod trainer;

pub use trainer::{Init, StepStats, Templates, TrainConfig, Trainer};
