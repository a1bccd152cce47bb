//! The Notebook kind: an isolated, token-protected notebook server with a persistent workspace.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::modeldeployment::GatewayAttachment;
use crate::workload::WorkloadSpec;

/// Default port of the notebook server.
pub const DEFAULT_PORT: i32 = 8888;
/// The smallest idle timeout a Notebook may ask for (the CRD refuses less).
pub const MIN_IDLE_TIMEOUT: &str = "5m";
/// Annotation the operator sets, with `spec.suspend: true`, when it suspends an idle notebook. Its
/// value is the time of the suspension (RFC 3339). It is removed when the notebook is resumed.
pub const ANNOTATION_CULLED_AT: &str = "keelson.dev/idle-culled-at";
/// Annotation the operator sets in the same write as [`ANNOTATION_CULLED_AT`]: the last activity
/// (RFC 3339) that the culling decision was taken on, as Jupyter's `/api/status` reported it. The
/// status (`lastActivity`, the `IdleCulling` condition) of a culled notebook is rebuilt from it, so
/// a status write that raced with the suspension cannot lose it. Removed when the notebook is resumed.
pub const ANNOTATION_IDLE_LAST_ACTIVITY: &str = "keelson.dev/idle-last-activity";
/// Field manager of the operator's write of `spec.suspend` when it suspends an idle notebook.
pub const CULLER_FIELD_MANAGER: &str = "keelson-idle-culler";
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

    /// Idle culling: the operator reads the server's `/api/status` and suspends the notebook
    /// (`spec.suspend: true`) after `timeout` without activity. Absent: never culled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<IdleSpec>,

    /// Who may reach the notebook, and its way in from outside the cluster. Absent: only pods of
    /// the notebook's own namespace may connect; egress is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<AccessSpec>,
}

/// Idle culling of a notebook.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IdleSpec {
    /// Time without activity (Jupyter's `last_activity`) after which the notebook is suspended, as a
    /// duration such as `2h` or `90m`. At least `5m`.
    #[schemars(length(min = 2, max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(\\\\.[0-9]+)?(ns|us|ms|s|m|h))+$') && duration(self) >= duration('5m')").message("idle.timeout must be a duration of at least 5m, such as 2h or 90m"))]
    pub timeout: String,
}

/// Access to a notebook: the NetworkPolicy `<name>` and, optionally, an HTTPRoute from a Gateway.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AccessSpec {
    /// Who else may connect to the notebook (pods of its own namespace always may).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_from: Option<AllowFrom>,

    /// Where the notebook may connect to. Absent: anywhere. Present: DNS (port 53) and the listed
    /// destinations only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressSpec>,

    /// Exposes the notebook outside the cluster through the Gateway API: an HTTPRoute `<name>` to
    /// the notebook's Service, attached to these Gateways. The token is still required. Ingress from
    /// the Gateways' namespaces is allowed by the NetworkPolicy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<NotebookGateway>,
}

/// Sources allowed to reach a notebook besides its own namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.namespaces) && size(self.namespaces) > 0) || (has(self.pods) && size(self.pods) > 0)").message("access.allowFrom must name at least one namespace or pod selector"))]
pub struct AllowFrom {
    /// Namespaces whose pods may connect, by name, e.g. `[ml-platform]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 63)))]
    pub namespaces: Option<Vec<String>>,

    /// Pods that may connect, by labels, in the notebook's namespace or a named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub pods: Option<Vec<PodPeer>>,
}

/// Pods selected by labels.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodPeer {
    /// Labels the pods carry, e.g. `{app: dashboard}`. At least one.
    #[x_kube(validation = Rule::new("size(self) > 0").message("access.allowFrom.pods[].matchLabels must name at least one label"))]
    pub match_labels: BTreeMap<String, String>,

    /// Namespace of the pods. Default: the notebook's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Destinations a notebook may reach when egress is restricted.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.namespaces) && size(self.namespaces) > 0) || (has(self.cidrs) && size(self.cidrs) > 0)").message("access.egress must name at least one namespace or CIDR"))]
pub struct EgressSpec {
    /// Namespaces (by name) whose pods the notebook may reach, e.g. its own and `data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 63)))]
    pub namespaces: Option<Vec<String>>,

    /// IP ranges the notebook may reach, e.g. `10.20.0.0/16` (an object store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), inner(length(max = 64)))]
    #[x_kube(validation = Rule::new("self.all(c, isCIDR(c))").message("access.egress.cidrs must be CIDRs such as 10.0.0.0/8"))]
    pub cidrs: Option<Vec<String>>,
}

/// The notebook's HTTPRoute.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NotebookGateway {
    /// Gateways the HTTPRoute attaches to, e.g. `[{name: public, namespace: infra}]`.
    #[serde(flatten)]
    pub attachment: GatewayAttachment,

    /// Host name the route answers for, e.g. `alice.notebooks.example.com`. Set it to have the
    /// external URL in `status.url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub hostname: Option<String>,

    /// Scheme of the external URL: `https` (default) or `http`, as the Gateway's listener serves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<Scheme>,
}

/// Scheme of an external URL.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    #[default]
    Https,
    Http,
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
    /// Last activity the notebook server reported (`last_activity` of `/api/status`), when idle
    /// culling is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activity: Option<Time>,
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
