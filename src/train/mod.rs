//! Training: data, prompts, learning-rate schedules, the step and its optimizer.

pub mod data;
pub mod loss;
pub mod lr_schedule;
pub mod templates;
pub mod trainer;

pub use trainer::{Init, StepStats, Templates, TrainConfig, Trainer};
