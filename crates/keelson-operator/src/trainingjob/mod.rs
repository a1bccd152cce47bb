//! TrainingJob: pure builder, pure status and reconciler.

pub mod admission;
pub mod build;
pub mod decide;
pub mod expectations;
pub mod gang;
pub mod kueue;
pub mod reconcile;
pub mod shape;
pub mod status;

pub use keelson_api::trainingjob::*;
