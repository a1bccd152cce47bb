//! Typed errors: a `BuildError` is the user's spec (set a condition, don't retry hot); everything
//! else is transient (requeue with backoff).

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

/// Errors of one reconcile.
#[derive(thiserror::Error, Debug)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("encoding: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid spec: {0}")]
    Build(#[from] BuildError),
    #[error("object {0} has no namespace or uid")]
    MissingMeta(String),
    #[error("a child cache closed: {0}")]
    CacheClosed(String),
}

impl Error {
    /// Short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Json(_) => "json",
            Error::Build(_) => "spec",
            Error::MissingMeta(_) => "meta",
            Error::CacheClosed(_) => "cache",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
