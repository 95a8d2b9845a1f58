//! Training: data, prompts, schedules, the step and its optimizer.

pub mod loss;
