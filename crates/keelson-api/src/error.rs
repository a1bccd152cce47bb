//! The error of a spec that the schema accepts but that cannot be turned into children.

/// A spec that is valid for the schema but cannot be turned into children.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct BuildError {
    /// CamelCase reason for the condition, e.g. `InvalidModelUri`.
    pub reason: &'static str,
    /// The spec field at fault, e.g. `spec.variants[1].model.uri`.
    pub field: String,
    /// What is wrong and what to do about it.
    pub message: String,
}

impl BuildError {
    pub fn new(reason: &'static str, field: impl Into<String>, message: impl Into<String>) -> Self {
        BuildError {
            reason,
            field: field.into(),
            message: message.into(),
        }
    }
}
