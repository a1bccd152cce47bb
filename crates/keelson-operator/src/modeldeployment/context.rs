//! The ModelDeployment controller's context: the shared state and the child caches that every
//! step of its reconcile reads. Data only: no reconcile logic here.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};

use super::rollout_metrics::Windows;
use crate::runtime::controller::{ChildStore, Shared, Synced};

/// The ModelDeployment controller's context: shared state plus its child caches.
pub struct Ctx {
    pub shared: Arc<Shared>,
    pub deployments: ChildStore<Deployment>,
    pub services: ChildStore<Service>,
    pub config_maps: ChildStore<ConfigMap>,
    pub autoscalers: ChildStore<HorizontalPodAutoscaler>,
    /// The router key Secrets, without their data.
    pub secrets: ChildStore<Secret>,
    /// Whether the child caches have been listed.
    pub synced: Synced,
    pub router_image: String,
    /// The open analysis window of each rollout.
    pub windows: Windows,
}
