//! ModelDeployment: pure builder, traffic (router config and Deployment) and Gateway API routes,
//! pure status, and the reconciler (its apply step is `converge`).

pub mod build;
pub mod context;
pub mod converge;
pub mod gate;
pub mod names;
pub mod reconcile;
pub mod rollout;
pub mod rollout_metrics;
pub mod routes;
pub mod status;
pub mod traffic;

pub use keelson_api::modeldeployment::*;
