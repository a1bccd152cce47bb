//! ModelDeployment: types, pure builder, pure status and reconciler.

pub mod reconcile;
pub mod types;

pub use types::*;
