//! Test support for Keelson, never linked into the operator: the integration-test harness (the local
//! cluster, started when it is not up, with the CRDs; the real operator running its controllers
//! in-process against the real API server, or as processes; one namespace per test; the real node;
//! bounded polling helpers), the spec generators ([`testgen`]), the offline schema check
//! ([`schema_check`]), Flux's readiness rules ([`kstatus`]) and a counting API proxy ([`proxy`]).
//! The harness's modules are private and their items re-exported here, so tests name them at the
//! crate's root.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod kstatus;
pub mod proxy;
pub mod schema_check;
pub mod testgen;

mod cluster;
mod namespace;
mod operators;
mod real_node;
mod wait;

pub use cluster::*;
pub use namespace::*;
pub use operators::*;
pub use real_node::*;
pub use wait::*;
