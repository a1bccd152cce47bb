//! The Notebook kind: an isolated, token-protected notebook server with a persistent workspace.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::workload::WorkloadSpec;

/// Default port of the notebook server.
pub const DEFAULT_PORT: i32 = 8888;
/// Default mount path of the workspace.
pub const DEFAULT_WORKSPACE_MOUNT: &str = "/home/jovyan";

/// A notebook environment: one pod behind a Service, opened only with the token kept in the Secret
/// `<name>-token`, with an optional persistent workspace PVC `<name>-workspace`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "keelson.dev",
    version = "v1alpha1",
    kind = "Notebook",
    plural = "notebooks",
    shortname = "nb",
    category = "keelson",
    namespaced,
    status = "NotebookStatus",
    doc = "An isolated, token-protected notebook environment with a persistent workspace.",
    printcolumn = r#"{"name":"PHASE","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"GPUS","type":"integer","jsonPath":".spec.gpus.count"}"#,
    printcolumn = r#"{"name":"URL","type":"string","jsonPath":".status.url"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 53").message("metadata.name must be a DNS-1035 label of at most 53 characters (it names the Service and the pod)")
)]
#[serde(rename_all = "camelCase")]
pub struct NotebookSpec {
    #[serde(flatten)]
    pub workload: WorkloadSpec,

    /// Port the notebook server listens on. Default 8888.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,

    /// Persistent home directory. Absent: the notebook keeps no files across pod restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<WorkspaceSpec>,

    /// `true` stops the pod and keeps the workspace and the token; `false` starts it again. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,
}

/// The persistent workspace volume of a notebook.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkspaceSpec {
    /// Size of the workspace PVC, e.g. `10Gi`.
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(\\\\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$')").message("workspace.size must be a quantity such as 10Gi"))]
    pub size: String,

    /// StorageClass of the workspace PVC (the cluster's default class when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,

    /// Where the workspace is mounted. Default `/home/jovyan`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("workspace.mountPath must be an absolute path"))]
    pub mount_path: Option<String>,

    /// `Retain` (default): the PVC has no owner reference and survives the Notebook's deletion.
    /// `Delete`: the PVC is garbage-collected with the Notebook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_policy: Option<DeletePolicy>,
}

/// What happens to the workspace when its Notebook is deleted.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeletePolicy {
    #[default]
    Retain,
    Delete,
}

/// Phase of a Notebook.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NotebookPhase {
    #[default]
    Pending,
    Running,
    Suspended,
    Failed,
}

/// Observed state of a Notebook.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NotebookStatus {
    /// Pending, Running, Suspended or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<NotebookPhase>,
    /// In-cluster URL of the notebook server (open it with the token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Name of the Secret whose `token` key holds the access token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<String>,
    /// Name of the notebook pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, plus PodScheduled-style detail in reasons and messages.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
