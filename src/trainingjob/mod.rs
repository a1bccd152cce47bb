//! TrainingJob: types, pure builder, pure status and reconciler.

pub mod build;
pub mod reconcile;
pub mod status;
pub mod types;

pub use types::*;
