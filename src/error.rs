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

    /// A configuration value is out of range or malformed.
    #[error("{field}: {reason}")]
    Config { field: String, reason: String },

    /// An image or other input could not be used.
    #[error("{what}: {reason}")]
    Input { what: String, reason: String },

    /// A training checkpoint is unreadable or does not match this run.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },

    /// A learned-embedding file could not be read, written or used.
    #[error(transparent)]
    Embedding(#[from] crate::embedding::EmbeddingError),

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

    pub(crate) fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
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
