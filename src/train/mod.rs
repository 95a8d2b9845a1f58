//! Training: data, prompts, learning-rate schedules, the step and its optimizer.

pub mod config;
pub mod data;
pub mod fit;
pub mod loss;
pub mod lr_schedule;
pub mod optimizer;
pub mod state;
pub mod templates;
pub mod trainer;

pub use config::{Init, Templates, TrainConfig};
pub use fit::check_fits;
pub use optimizer::{AdamW, LossScale};
pub use trainer::{StepStats, Trainer};
