//! [`CachedPod`]: what a pod cache keeps of a pod, read straight from the watch.
//!
//! Pods of a TrainingJob are created once and never compared with what is wanted: the reconciler
//! reads their identity, three labels and the parts of their status that [`crate::podstatus`]
//! reads. A `k8s_openapi` [`Pod`] is a fixed-size struct of about 2 KiB before any of its contents
//! (every optional field of the spec and status is inline), so this type deserializes the watch's
//! pods into the fields read and drops the rest as it decodes: the spec is never parsed, and the
//! labels are not kept in a `BTreeMap` (whose first node is 544 bytes, however few labels it
//! holds). At 20,000 pods, every 100 bytes kept per pod is 2 MiB of the operator's memory.

use std::borrow::Cow;

use k8s_openapi::api::core::v1::{ContainerState, ContainerStatus, Pod, PodCondition, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::{Deserialize, Serialize};

use crate::trainingjob::shape::{LABEL_GPUS, LABEL_SPEC_HASH};
use keelson_api::meta::LABEL_OWNER_NAME;

/// The labels read from a cached pod; the others are dropped.
const LABELS_READ: [&str; 3] = [LABEL_OWNER_NAME, LABEL_SPEC_HASH, LABEL_GPUS];

/// The pod conditions that are read (readiness, and whether and why a pod is not scheduled).
const CONDITIONS_READ: [&str; 2] = ["Ready", "PodScheduled"];

/// A pod as the pod cache keeps it: its identity (name, namespace, uid, resourceVersion,
/// timestamps and the controller's owner reference, without labels, annotations, other owner
/// references or managed fields), the labels read and the status fields read. It serializes as
/// the [`Pod`] of [`CachedPod::to_pod`].
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(from = "Decoded")]
pub struct CachedPod {
    pub metadata: ObjectMeta,
    /// The labels of [`LABELS_READ`] that the pod has.
    labels: Box<[(Box<str>, Box<str>)]>,
    pub status: Option<CachedPodStatus>,
}

/// A pod as decoded from the API server: the metadata and the status fields read.
#[derive(Deserialize)]
struct Decoded {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    status: Option<CachedPodStatus>,
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

impl From<Decoded> for CachedPod {
    fn from(d: Decoded) -> Self {
        let mut metadata = d.metadata;
        let labels = metadata
            .labels
            .take()
            .into_iter()
            .flatten()
            .filter(|(k, _)| LABELS_READ.contains(&k.as_str()))
            .map(|(k, v)| (k.into_boxed_str(), v.into_boxed_str()))
            .collect();
        // The controller's reference says whose pod it is (another owner's pod is not counted).
        let controller = metadata
            .owner_references
            .take()
            .into_iter()
            .flatten()
            .find(|r| r.controller == Some(true));
        let metadata = ObjectMeta {
            owner_references: controller.map(|r| vec![r]),
            name: metadata.name,
            namespace: metadata.namespace,
            uid: metadata.uid,
            resource_version: metadata.resource_version,
            generation: metadata.generation,
            creation_timestamp: metadata.creation_timestamp,
            deletion_timestamp: metadata.deletion_timestamp,
            deletion_grace_period_seconds: metadata.deletion_grace_period_seconds,
            ..ObjectMeta::default()
        };
        let mut status = d.status;
        if let Some(conds) = status.as_mut().and_then(|s| s.conditions.as_mut()) {
            conds.retain(|c| CONDITIONS_READ.contains(&c.type_.as_str()));
            conds.shrink_to_fit();
        }
        CachedPod {
            metadata,
            labels,
            status,
        }
    }
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

impl Serialize for CachedPod {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_pod().serialize(s)
    }
}

impl From<Pod> for CachedPod {
    fn from(p: Pod) -> Self {
        Decoded {
            metadata: p.metadata,
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
        .into()
    }
}

impl CachedPod {
    /// The value of label `key`, if it is one of the labels kept.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k.as_ref() == key)
            .map(|(_, v)| v.as_ref())
    }

    /// The pod with what the cache keeps (no spec), for code that reads pods.
    pub fn to_pod(&self) -> Pod {
        let labels = (!self.labels.is_empty()).then(|| {
            self.labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        });
        Pod {
            metadata: ObjectMeta {
                labels,
                ..self.metadata.clone()
            },
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
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

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
            pod.metadata.labels = Some(
                [
                    (LABEL_OWNER_NAME.to_string(), "job".to_string()),
                    (LABEL_GPUS.to_string(), "1".to_string()),
                ]
                .into(),
            );
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
            assert_eq!(cached.label(LABEL_OWNER_NAME), Some("job"));
            // The same from the Pod itself (a create's response), and as JSON.
            assert_eq!(CachedPod::from(pod.clone()), cached);
            assert_eq!(
                serde_json::to_value(&cached).unwrap(),
                serde_json::to_value(&pod).unwrap()
            );
        }
    }

    #[test]
    fn what_is_never_read_is_dropped_as_the_pod_is_decoded() {
        let mut pod = fixtures::running("w-0", true);
        let labels = [
            (LABEL_OWNER_NAME, "job"),
            (LABEL_SPEC_HASH, "abc"),
            ("app", "resnet"),
            ("keelson.dev/rank", "0"),
        ];
        pod.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        pod.metadata.annotations = Some([("a".to_string(), "b".to_string())].into());
        let controller = OwnerReference {
            name: "job".into(),
            uid: "job-uid".into(),
            controller: Some(true),
            ..OwnerReference::default()
        };
        let other = OwnerReference {
            name: "other".into(),
            ..OwnerReference::default()
        };
        pod.metadata.owner_references = Some(vec![other, controller.clone()]);
        pod.metadata.generate_name = Some("w-".into());
        let status = pod.status.as_mut().unwrap();
        let mut conds = status.conditions.clone().unwrap();
        for t in ["Initialized", "ContainersReady", "PodScheduled"] {
            conds.push(PodCondition {
                type_: t.into(),
                status: "True".into(),
                ..PodCondition::default()
            });
        }
        status.conditions = Some(conds);
        let json = serde_json::to_value(&pod).unwrap();
        let cached: CachedPod = serde_json::from_value(json).unwrap();
        let back = cached.to_pod();
        assert_eq!(back.metadata.name.as_deref(), Some("w-0"));
        assert_eq!(back.metadata.uid, pod.metadata.uid);
        assert_eq!(
            back.metadata
                .labels
                .as_ref()
                .unwrap()
                .keys()
                .collect::<Vec<_>>(),
            [LABEL_OWNER_NAME, LABEL_SPEC_HASH]
        );
        assert!(back.metadata.annotations.is_none());
        assert_eq!(back.metadata.owner_references, Some(vec![controller]));
        assert!(keelson_api::meta::is_controlled_by(
            &back.metadata,
            "job-uid"
        ));
        assert!(back.metadata.generate_name.is_none());
        let types: Vec<String> = back
            .status
            .unwrap()
            .conditions
            .unwrap()
            .into_iter()
            .map(|c| c.type_)
            .collect();
        assert_eq!(types, ["Ready", "PodScheduled"]);
        assert!(podstatus::is_ready(&cached.to_pod()));
        assert_eq!(cached.label(LABEL_SPEC_HASH), Some("abc"));
        assert_eq!(cached.label("app"), None);
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
