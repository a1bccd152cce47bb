//! ModelDeployment: pure builder, traffic (router config, HTTPRoute), pure status and reconciler.

pub mod build;
pub mod gate;
pub mod names;
pub mod reconcile;
pub mod status;
pub mod traffic;

pub use keelson_api::modeldeployment::*;
