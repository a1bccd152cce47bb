//! Spec pieces and helpers shared by all three kinds.

pub mod cachedpod;
pub mod conditions;
pub mod meta;
pub mod pod;
pub mod podstatus;
pub mod workload;

pub use workload::{GpuSpec, VolumeSpec, WorkloadSpec};
