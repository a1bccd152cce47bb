//! Integration tests: the real operator against the real local API server (see tests/support).

#[path = "../support/mod.rs"]
mod support;

mod crds;
mod notebook;
