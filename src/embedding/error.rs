//! The one error type of every embedding reader and writer.

use super::{Family, Format};

#[derive(Debug, thiserror::Error)]
pub enum EmbeddingError {
    #[error("{file}: {op}: {source}")]
    Io {
        file: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The destination exists and replacing it was not asked for.
    #[error("{file}: {reason}")]
    Exists { file: String, reason: String },
    #[error("{file}: {field}: {reason}")]
    Invalid {
        file: String,
        field: String,
        reason: String,
    },
    #[error("{file}: {field}: global '{global}' is not allowed in a learned-embedding file (only tensor-rebuilding globals are; nothing in the file is ever executed)")]
    ForbiddenGlobal {
        file: String,
        field: String,
        global: String,
    },
    #[error("{file}: {field}: file has multiple terms in it ({}); an embedding file must hold exactly one learned word", terms.join(", "))]
    MultipleTerms {
        file: String,
        field: String,
        terms: Vec<String>,
    },
    #[error("{file}: {field}: no vectors: an embedding needs at least one")]
    Empty { file: String, field: String },
    #[error("{file}: {field}: vector {vector}, column {column} is {value}; a non-finite value would poison every prompt using this word")]
    NonFinite {
        file: String,
        field: String,
        vector: usize,
        column: usize,
        value: f32,
    },
    #[error("{file}: {field}: too many vectors: {vectors}; at most {max} fit in one 75-token CLIP prompt chunk")]
    TooManyVectors {
        file: String,
        field: String,
        vectors: usize,
        max: usize,
    },
    #[error("{file}: {field}: width {found} does not fit {family}, which needs {expected}")]
    WidthMismatch {
        file: String,
        field: String,
        family: Family,
        found: String,
        expected: &'static str,
    },
    #[error("{file}: {field}: truncated: {reason}")]
    Truncated {
        file: String,
        field: String,
        reason: String,
    },
    #[error("{file}: {field}: needs {needed} bytes, over the {limit}-byte limit ({reason})")]
    TooLarge {
        file: String,
        field: String,
        needed: u64,
        limit: u64,
        reason: &'static str,
    },
    #[error("{file}: unrecognised learned-embedding file: {reason}")]
    UnknownFormat { file: String, reason: String },
    #[error("{file}: cannot write as {format}: {reason}")]
    Unsupported {
        file: String,
        format: Format,
        reason: String,
    },
    #[error("unknown name '{name}' (known: {known})")]
    UnknownFormatName { name: String, known: String },
}
