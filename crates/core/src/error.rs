//! The error every rule of this crate reports about its input: the field and why. Its own module so
//! that the rules (requirements, validation, registrations) depend on it, not on each other.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A rejected input: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// Dot path of the offending field (`requirements.hardware.gpu_memory_gb`, `priority`, …).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl ValidationError {
    /// An error about `field`.
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        Self { field: field.to_owned(), message: message.into() }
    }

    /// The same error inside `parent` (`[3]` + `service` → `[3].service`): the one place a field
    /// path is prefixed.
    pub fn within(mut self, parent: &str) -> Self {
        self.field = format!("{parent}.{}", self.field);
        self
    }
}
