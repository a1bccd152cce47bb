//! Typed errors: a `BuildError` is the user's spec (set a condition, don't retry hot); everything
//! else is transient (requeue with backoff).

pub use keelson_api::error::BuildError;

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

    /// A child write that the API server refused for what the child holds, or that admission
    /// forbade, as a [`BuildError`] (reason [`CHILD_REFUSED`]) for the status: 400 and 422 (the
    /// schema accepted the spec but the child built from it is invalid, e.g. a resource quantity
    /// that is not one) and 403 (e.g. no PriorityClass of that name, a quota exceeded). The
    /// reconcile is still retried with backoff: the cluster may change as well as the spec.
    pub fn refusal(&self) -> Option<BuildError> {
        match self {
            _ if self.namespace_terminating() => None,
            Error::Kube(kube::Error::Api(s)) if matches!(s.code, 400 | 403 | 422) => {
                Some(BuildError::new(
                    CHILD_REFUSED,
                    "spec",
                    format!(
                        "the API server refused a child built from it: {}; fix the spec (or the cluster) and it is retried",
                        s.message
                    ),
                ))
            }
            _ => None,
        }
    }

    /// The API server refused a create because the namespace is being deleted (403 with the cause
    /// `NamespaceTerminating`). Nothing is wrong with the spec and a retry cannot succeed: the
    /// namespace's deletion removes the parent too.
    pub fn namespace_terminating(&self) -> bool {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 403 => s
                .details
                .as_ref()
                .is_some_and(|d| d.causes.iter().any(|c| c.reason == NAMESPACE_TERMINATING)),
            _ => false,
        }
    }
}

/// The cause the API server gives for a create refused in a namespace that is being deleted.
const NAMESPACE_TERMINATING: &str = "NamespaceTerminating";

/// Reason of the conditions set when the API server refuses a child (see [`Error::refusal`]).
pub const CHILD_REFUSED: &str = "ChildRefused";

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn api(code: u16, message: &str) -> Error {
        Error::Kube(kube::Error::Api(Box::new(kube::core::Status {
            code,
            message: message.into(),
            ..kube::core::Status::default()
        })))
    }

    #[test]
    fn a_refused_child_is_a_condition_a_transient_error_is_not() {
        let e = api(
            400,
            "Pod in version \"v1\" cannot be handled as a Pod: quantities must match the regular expression",
        )
        .refusal()
        .expect("a refusal");
        assert_eq!(e.reason, CHILD_REFUSED);
        assert!(e.to_string().contains("quantities must match"), "{e}");
        for code in [403, 422] {
            assert!(api(code, "forbidden").refusal().is_some(), "{code}");
        }
        for code in [404, 409, 429, 500, 503] {
            assert!(api(code, "try again").refusal().is_none(), "{code}");
        }
        assert!(Error::MissingMeta("x".into()).refusal().is_none());
    }

    #[test]
    fn a_create_in_a_terminating_namespace_is_neither_a_refusal_nor_a_failure_to_report() {
        // As the API server answers a create in a namespace being deleted.
        let e = Error::Kube(kube::Error::Api(Box::new(kube::core::Status {
            code: 403,
            reason: "Forbidden".into(),
            message: "services \"m-champion\" is forbidden: unable to create new content in namespace t because it is being terminated".into(),
            details: Some(kube::core::response::StatusDetails {
                name: "m-champion".into(),
                group: String::new(),
                kind: "services".into(),
                uid: String::new(),
                retry_after_seconds: 0,
                causes: vec![kube::core::response::StatusCause {
                    reason: "NamespaceTerminating".into(),
                    message: "namespace t is being terminated".into(),
                    field: "metadata.namespace".into(),
                }],
            }),
            ..kube::core::Status::default()
        })));
        assert!(e.namespace_terminating());
        assert!(e.refusal().is_none());
        let forbidden = api(403, "forbidden");
        assert!(!forbidden.namespace_terminating());
        assert!(!api(500, "x").namespace_terminating());
    }
}
