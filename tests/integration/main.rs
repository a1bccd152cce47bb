//! Integration tests: the real operator against the real local API server (see tests/support).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

mod argocd;
mod crds;
mod events;
mod examples;
mod gitops;
mod leader;
mod modeldeployment;
mod notebook;
mod trainingjob;
