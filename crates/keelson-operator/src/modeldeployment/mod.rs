//! ModelDeployment: pure builder, traffic (router config, HTTPRoute), pure status and reconciler.

pub mod build;
pub mod gate;
pub mod names;
pub mod reconcile;
pub mod rollout;
pub mod rollout_metrics;
pub mod status;
pub mod traffic;

pub use keelson_api::modeldeployment::*;
