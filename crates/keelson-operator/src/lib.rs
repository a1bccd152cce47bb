//! Keelson's operator: the Notebook, TrainingJob and ModelDeployment controllers, each a pure builder
//! (spec -> children), a pure status function (observed children -> status) and a reconciler that
//! applies the difference ([`notebook`], [`trainingjob`], [`modeldeployment`]), and the plumbing they
//! share: child caches and the owner index ([`controller`]), writes ([`apply`]), Events ([`events`]),
//! the client rate limit ([`ratelimit`]), Secrets made once ([`secret`]), Gateway API parent
//! references ([`gateway`]), probes and metrics ([`health`], [`metrics`]) and the
//! process itself ([`operator`]).
//!
//! The kinds' types come from `keelson-api`; this crate never defines API fields.

pub mod cachedpod;
pub mod error;
pub mod gateway;
pub mod health;
pub mod httpget;
pub mod metrics;
pub mod modeldeployment;
pub mod notebook;
pub mod operator;
pub mod pod;
pub mod podstatus;
pub mod runtime;
pub mod secret;
pub mod trainingjob;
