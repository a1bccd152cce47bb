//! [`CachedPod`]: what a pod cache keeps of a pod, read straight from the watch.
//!
//! Pods of a TrainingJob are created once and never compared with what is wanted: the reconciler
//! reads their metadata and the parts of their status that [`crate::podstatus`] reads. A
//! `k8s_openapi` [`Pod`] is a fixed-size struct of about 2 KiB before any of its contents (every
//! optional field of the spec and status is inline), so a cache of `Pod`s with the spec dropped
//! still costs that much per pod. This type deserializes the watch's pods into the fields read and
//! ignores the rest: the spec is never parsed. A cached pod is still about 3 KiB of heap (its
//! labels, owner references and status conditions; `make bench-scale`, docs/benchmarks.md).

use std::borrow::Cow;

use k8s_openapi::api::core::v1::{ContainerState, ContainerStatus, Pod, PodCondition, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::{Deserialize, Serialize};

/// A pod as the pod cache keeps it: metadata and the status fields the reconcilers read.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CachedPod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<CachedPodStatus>,
}

/// The status fields read from a cached pod.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedPodStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<PodCondition>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_statuses: Option<Vec<CachedContainerStatus>>,
}

/// A container's name and state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CachedContainerStatus {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<ContainerState>,
}

impl Resource for CachedPod {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        Pod::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        Pod::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        Pod::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        Pod::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl From<Pod> for CachedPod {
    fn from(p: Pod) -> Self {
        CachedPod {
            metadata: ObjectMeta {
                managed_fields: None,
                ..p.metadata
            },
            status: p.status.map(|s| CachedPodStatus {
                phase: s.phase,
                reason: s.reason,
                message: s.message,
                conditions: s.conditions,
                container_statuses: s.container_statuses.map(|cs| {
                    cs.into_iter()
                        .map(|c| CachedContainerStatus {
                            name: c.name,
                            state: c.state,
                        })
                        .collect()
                }),
            }),
        }
    }
}

impl CachedPod {
    /// The pod with what the cache keeps (no spec), for code that reads pods.
    pub fn to_pod(&self) -> Pod {
        Pod {
            metadata: self.metadata.clone(),
            spec: None,
            status: self.status.as_ref().map(|s| PodStatus {
                phase: s.phase.clone(),
                reason: s.reason.clone(),
                message: s.message.clone(),
                conditions: s.conditions.clone(),
                container_statuses: s.container_statuses.as_ref().map(|cs| {
                    cs.iter()
                        .map(|c| ContainerStatus {
                            name: c.name.clone(),
                            state: c.state.clone(),
                            ..ContainerStatus::default()
                        })
                        .collect()
                }),
                ..PodStatus::default()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::podstatus::{self, fixtures};

    #[test]
    fn a_pod_read_from_json_keeps_what_podstatus_reads() {
        use fixtures::*;
        let pods = [
            pending("a"),
            unschedulable("b"),
            waiting("c", "ImagePullBackOff"),
            running("d", true),
            running("e", false),
            finished("f", 0),
            finished("g", 137),
            evicted("h"),
        ];
        for mut pod in pods {
            pod.metadata.labels = Some([("a".to_string(), "b".to_string())].into());
            let mut json = serde_json::to_value(&pod).unwrap();
            // What the API server sends too, and the cache does not keep.
            json["spec"] = serde_json::json!({"containers": [{"name": "main", "image": "x"}]});
            json["status"]["podIP"] = "10.0.0.1".into();
            let cached: CachedPod = serde_json::from_value(json).unwrap();
            // The fixtures set only what the cache keeps: the pod comes back whole.
            assert_eq!(cached.to_pod(), pod);
            assert_eq!(
                podstatus::problem(&cached.to_pod()),
                podstatus::problem(&pod)
            );
            // The same from the Pod itself (a create's response).
            assert_eq!(CachedPod::from(pod), cached);
        }
    }

    #[test]
    fn a_cached_pod_is_a_pod_to_the_api() {
        assert_eq!(CachedPod::kind(&()), "Pod");
        assert_eq!(CachedPod::api_version(&()), "v1");
        assert_eq!(
            CachedPod::url_path(&(), Some("ns")),
            "/api/v1/namespaces/ns/pods"
        );
        // Much smaller than a Pod before any contents: what the cache saves per pod.
        assert!(std::mem::size_of::<CachedPod>() * 2 < std::mem::size_of::<Pod>());
    }
}
