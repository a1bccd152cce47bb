//! Notebook: pure builder, pure status and reconciler.

pub mod access;
pub mod build;
pub mod idle;
pub mod reconcile;
pub mod status;

pub use keelson_api::notebook::*;
