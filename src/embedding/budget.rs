//! The read budget: every reader charges what it allocates from file content
//! before allocating it, so a read of `n` bytes stays under `2 * n + 64 MiB`.

use std::cell::Cell;

use super::EmbeddingError;

/// Largest file any reader accepts. Real embeddings are kilobytes (75 x 2048
/// f32 is 600 KiB); A1111 preview PNGs a few MiB.
pub const MAX_FILE_BYTES: u64 = 64 << 20;
/// Fixed slack of the allocation bound, on top of twice the input size.
pub const ALLOC_SLACK_BYTES: u64 = 64 << 20;

/// Allocation accounting for one read: every reader charges what it allocates
/// from file content here before allocating it.
#[derive(Debug)]
pub(crate) struct Budget {
    limit: u64,
    used: Cell<u64>,
}

impl Budget {
    /// `2 * input + 64 MiB`.
    pub(crate) fn for_input(len: usize) -> Budget {
        Budget {
            limit: (len as u64)
                .saturating_mul(2)
                .saturating_add(ALLOC_SLACK_BYTES),
            used: Cell::new(0),
        }
    }
    pub(crate) fn used(&self) -> u64 {
        self.used.get()
    }
    pub(crate) fn limit(&self) -> u64 {
        self.limit
    }
}

/// What every reader needs: the file's display name (for messages) and the budget.
pub(crate) struct Ctx {
    pub(crate) file: String,
    pub(crate) budget: Budget,
}

impl Ctx {
    pub(crate) fn new(file: &str, len: usize) -> Ctx {
        Ctx {
            file: file.to_string(),
            budget: Budget::for_input(len),
        }
    }

    pub(crate) fn charge(&self, bytes: u64, field: &str) -> Result<(), EmbeddingError> {
        let used = self.budget.used.get().saturating_add(bytes);
        if used > self.budget.limit {
            return Err(EmbeddingError::TooLarge {
                file: self.file.clone(),
                field: field.to_string(),
                needed: used,
                limit: self.budget.limit,
                reason: "reading never allocates more than 2 x file size + 64 MiB",
            });
        }
        self.budget.used.set(used);
        Ok(())
    }

    pub(crate) fn invalid(
        &self,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> EmbeddingError {
        EmbeddingError::Invalid {
            file: self.file.clone(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn truncated(
        &self,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> EmbeddingError {
        EmbeddingError::Truncated {
            file: self.file.clone(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}
