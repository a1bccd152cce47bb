//! Keelson's API: the three kinds' types (Notebook, TrainingJob, ModelDeployment), the spec pieces
//! they share, the CRDs generated from them, the label and annotation names every child carries, and
//! the router config, which is the contract between the operator and `keelson router`.
//!
//! Types and names only: no client, no reconcile logic. With `default-features = false` only
//! [`router_config`] is built, with no Kubernetes dependency, for the router.

pub mod router_config;

#[cfg(feature = "kinds")]
pub mod conditions;
#[cfg(feature = "kinds")]
pub mod crd;
#[cfg(feature = "kinds")]
pub mod error;
#[cfg(feature = "kinds")]
pub mod meta;
#[cfg(feature = "kinds")]
pub mod modeldeployment;
#[cfg(feature = "kinds")]
pub mod notebook;
#[cfg(feature = "kinds")]
pub mod rollout;
#[cfg(feature = "kinds")]
pub mod trainingjob;
#[cfg(feature = "kinds")]
pub mod workload;

#[cfg(feature = "kinds")]
pub use workload::{GpuSpec, VolumeSpec, WorkloadSpec};
