//! Keelson: a Kubernetes operator for the machine-learning life cycle.
//!
//! Three kinds, each with a pure builder (spec -> children), a pure status function
//! (observed children -> status) and a reconciler that applies the difference:
//! [`notebook`], [`trainingjob`] and [`modeldeployment`].

pub mod api;
pub mod apply;
pub mod controller;
pub mod crd;
pub mod error;
pub mod events;
pub mod health;
pub mod metrics;
pub mod modeldeployment;
pub mod notebook;
pub mod operator;
#[cfg(test)]
mod proptests;
pub mod ratelimit;
pub mod router;
#[cfg(any(test, feature = "testgen"))]
pub mod schema_check;
pub mod telemetry;
#[cfg(any(test, feature = "testgen"))]
pub mod testgen;
pub mod trainingjob;
