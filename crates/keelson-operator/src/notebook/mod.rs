//! Notebook: pure builder, pure status and reconciler.

pub mod build;
pub mod reconcile;
pub mod status;

pub use keelson_api::notebook::*;
