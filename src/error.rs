//! The engine's one error type.

use std::path::PathBuf;

/// Everything the engine can fail with. Messages name the file, the field and the reason.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed inside candle.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A model file or folder is not something the engine can load.
    #[error("{path}: {reason}")]
    Model { path: PathBuf, reason: String },

    /// A weight is missing or has the wrong shape.
    #[error("{path}: tensor '{key}': {reason}")]
    Weight {
        path: PathBuf,
        key: String,
        reason: String,
    },

    /// A configuration value is out of range or malformed: `field` names the option as
    /// the engine's structs call it (`max_steps`), which the fronts map to their own
    /// names (`--steps`, `params.max_steps`).
    #[error("{field}: {reason}")]
    Config { field: &'static str, reason: String },

    /// The device name is unknown, or this build or this machine lacks that device.
    #[error("device: {0}")]
    Device(String),

    /// A training image is unusable (its file, size, stride or pixels; the error names
    /// which image and field).
    #[error("training image: {0}")]
    Data(#[from] crate::train::data::TrainDataError),

    /// The learning rate does not parse, or does not fit the chosen curve.
    #[error("learning_rate: {0}")]
    LrSchedule(#[from] crate::train::lr_schedule::LrScheduleError),

    /// The model's scheduler configuration asks for what sdti does not implement.
    #[error("scheduler: {0}")]
    Scheduler(#[from] crate::model::scheduler::SchedulerError),

    /// A template file cannot be read or holds no usable template.
    #[error("templates: {0}")]
    Templates(#[from] crate::train::templates::PromptError),

    /// The CLIP tokenizer's built-in tables could not be prepared.
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),

    /// A saved random-generator state is not a valid one.
    #[error(transparent)]
    Rng(#[from] crate::rng::RngError),

    /// An image or other input could not be used.
    #[error("{what}: {reason}")]
    Input { what: String, reason: String },

    /// A training checkpoint is unreadable or does not match this run.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },

    /// A learned-embedding file could not be read, written or used.
    #[error(transparent)]
    Embedding(#[from] crate::embedding::EmbeddingError),

    /// A job needs more memory than it may use, found from the model's configuration
    /// before its weights were read ([`crate::train::check_fits`]).
    #[error("{0}")]
    Memory(String),

    /// Training was cancelled by the caller.
    #[error("cancelled")]
    Cancelled,
}

/// The engine's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Error::Config {
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn input(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Input {
            what: what.into(),
            reason: reason.into(),
        }
    }
}
