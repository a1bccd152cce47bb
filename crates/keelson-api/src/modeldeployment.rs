//! The ModelDeployment kind: models served as microservices, with A/B traffic splits between variants.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::rollout::{Rollout, RolloutStatus};
use crate::workload::WorkloadSpec;

/// Default port of the model server.
pub const DEFAULT_PORT: i32 = 8080;
/// Where a `pvc://` model is mounted in the model container.
pub const MODEL_MOUNT: &str = "/mnt/models";

/// Models served behind one entry Service `<name>`, split between variants by weight.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "keelson.dev",
    version = "v1alpha1",
    kind = "ModelDeployment",
    plural = "modeldeployments",
    shortname = "mdep",
    category = "keelson",
    namespaced,
    status = "ModelDeploymentStatus",
    doc = "Models served as microservices, with A/B traffic splits between variants.",
    printcolumn = r#"{"name":"READY","type":"string","jsonPath":".status.ready"}"#,
    printcolumn = r#"{"name":"TRAFFIC","type":"string","jsonPath":".status.traffic"}"#,
    printcolumn = r#"{"name":"ROLLOUT","type":"string","jsonPath":".status.rollout.summary"}"#,
    printcolumn = r#"{"name":"URL","type":"string","jsonPath":".status.url"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 40").message("metadata.name must be a DNS-1035 label of at most 40 characters (it prefixes every variant's Service)"),
    validation = Rule::new("!has(self.spec.traffic) || !has(self.spec.traffic.mirror) || self.spec.variants.exists(v, v.name == self.spec.traffic.mirror.variant)").message("spec.traffic.mirror.variant must name one of spec.variants"),
    validation = Rule::new("!has(self.spec.traffic) || !has(self.spec.traffic.gateway) || (has(self.spec.traffic.router) && self.spec.traffic.router == 'GatewayAPI')").message("spec.traffic.gateway is only used with spec.traffic.router: GatewayAPI"),
    validation = Rule::new("!has(self.spec.traffic) || !has(self.spec.traffic.routerPod) || !has(self.spec.traffic.router) || self.spec.traffic.router == 'Builtin'").message("spec.traffic.routerPod is only used with spec.traffic.router: Builtin"),
    validation = Rule::new("!has(self.spec.protocol) || self.spec.protocol != 'GRPC' || self.spec.variants.all(v, !has(v.readiness) || !has(v.readiness.httpGet))").message("spec.variants[].readiness.httpGet is an HTTP/1.1 check and cannot probe a server of spec.protocol: GRPC; use spec.variants[].readiness.grpc (the gRPC health checking protocol) or leave readiness out for a TCP check"),
    validation = Rule::new("(has(self.spec.protocol) && self.spec.protocol == 'GRPC') || self.spec.variants.all(v, !has(v.readiness) || !has(v.readiness.grpc))").message("spec.variants[].readiness.grpc needs spec.protocol: GRPC; set it, or use spec.variants[].readiness.httpGet for an HTTP server"),
    validation = Rule::new("!self.spec.variants.exists(v, has(v.rollout)) || !has(self.spec.traffic) || !has(self.spec.traffic.router) || self.spec.traffic.router != 'None'").message("spec.variants[].rollout moves traffic by weight, which spec.traffic.router: None does not use (the split follows replica counts); use router Builtin or GatewayAPI"),
    validation = Rule::new("!self.spec.variants.exists(v, has(v.rollout) && has(v.rollout.analysis)) || !has(self.spec.traffic) || !has(self.spec.traffic.router) || self.spec.traffic.router == 'Builtin'").message("spec.variants[].rollout.analysis reads the measurements of the Builtin router and needs spec.traffic.router: Builtin; remove the analysis to advance by pauses alone"),
    validation = Rule::new("!has(self.spec.protocol) || self.spec.protocol != 'GRPC' || !has(self.spec.traffic) || !has(self.spec.traffic.mirror) || (has(self.spec.traffic.router) && self.spec.traffic.router == 'GatewayAPI')").message("spec.traffic.mirror with spec.protocol: GRPC needs spec.traffic.router: GatewayAPI (a GRPCRoute RequestMirror filter): the Builtin router copies only requests of a known length, and gRPC calls are streams; remove spec.traffic.mirror")
)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentSpec {
    /// Port the model servers listen on. Default 8080.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,

    /// What the model servers speak, for the whole ModelDeployment (one entry Service and one
    /// router serve every variant): `HTTP` (default; HTTP/1.1, or HTTP/2 from the client to the
    /// router) or `GRPC` (HTTP/2 cleartext end to end, trailers kept). With `GRPC` the Services name
    /// their port `grpc` with `appProtocol: kubernetes.io/h2c`, the router speaks h2c to every
    /// variant, `router: GatewayAPI` writes a GRPCRoute instead of an HTTPRoute, and readiness is
    /// `readiness.grpc` or a TCP check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,

    /// 1 to 10 variants with unique names (server-side apply merges the list by name); their weights
    /// sum to 100.
    #[schemars(length(min = 1, max = 10))]
    #[x_kube(
        merge_strategy = ListMerge::Map(vec!["name".into()]),
        validation = Rule::new("self.map(v, v.weight).sum() == 100").message("variants[].weight must sum to 100"),
        validation = Rule::new("self.filter(v, has(v.rollout)).size() <= 1").message("variants[].rollout: at most one variant may roll out at a time (the others are its baseline); remove the rollout of the others"),
        validation = Rule::new("!self.exists(v, has(v.rollout)) || self.size() >= 2").message("variants[].rollout needs a second variant to take the traffic the rolling one does not")
    )]
    pub variants: Vec<Variant>,

    /// How traffic reaches the variants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<Traffic>,
}

/// What the model servers of a ModelDeployment speak.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 (clients may also speak HTTP/2 cleartext to the router).
    #[default]
    #[serde(rename = "HTTP")]
    Http,
    /// gRPC: HTTP/2 cleartext (prior knowledge) from the client to the model server, trailers kept.
    #[serde(rename = "GRPC")]
    Grpc,
}

/// One model server variant: a Deployment and a Service `<name>-<variant>`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.autoscaling) || !has(self.replicas)").message("variants[].replicas and variants[].autoscaling are exclusive: with autoscaling the HorizontalPodAutoscaler sets the replica count between minReplicas and maxReplicas; remove replicas"))]
#[x_kube(validation = Rule::new("!has(self.autoscaling) || (has(self.resources) && ((has(self.resources.requests) && 'cpu' in self.resources.requests) || (has(self.resources.limits) && 'cpu' in self.resources.limits)))").message("variants[].autoscaling scales on CPU utilization, a share of the CPU request: set variants[].resources.requests.cpu"))]
#[x_kube(validation = Rule::new("!has(self.rollout) || self.rollout.steps.all(s, s.weight <= self.weight)").message("variants[].rollout.steps[].weight must not exceed variants[].weight, the share the rollout ends at"))]
pub struct Variant {
    /// Variant name, a DNS-1123 label of at most 22 characters, unique among the variants.
    #[schemars(
        length(min = 1, max = 22),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,

    /// Model server pods of this variant. Default 1. Not with `autoscaling`, which sets the count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: Option<i32>,

    /// A HorizontalPodAutoscaler `<name>-<variant>` that sets the replica count on CPU
    /// utilization, e.g. `{minReplicas: 2, maxReplicas: 10, targetCPUUtilization: 70}`. The operator
    /// then leaves `replicas` of the variant's Deployment to it. Needs `resources.requests.cpu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,

    /// How the model server tells that it can take requests. Default: a TCP connection to `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<Readiness>,

    /// Share of the traffic in percent, 0 to 100; the weights of all variants sum to 100.
    #[schemars(range(min = 0, max = 100))]
    pub weight: i32,

    /// The model this variant serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelSource>,

    /// Progressive delivery: the variant's share walks `steps` up to `weight`, each step held for
    /// its pause and, with `analysis`, judged by the router's measurements, e.g.
    /// `{steps: [{weight: 10}, {weight: 50}], analysis: {maxErrorRatio: 0.01}}`. At most one variant
    /// rolls out at a time. See the rollout's own fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,

    #[serde(flatten)]
    pub workload: WorkloadSpec,
}

/// Replica count set by a HorizontalPodAutoscaler (`autoscaling/v2`) on CPU utilization.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.minReplicas) || self.minReplicas <= self.maxReplicas").message("autoscaling.minReplicas must not exceed autoscaling.maxReplicas"))]
pub struct Autoscaling {
    /// Fewest pods, 1 to 1000. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: Option<i32>,

    /// Most pods, 1 to 1000, at least `minReplicas`.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,

    /// Average CPU use the autoscaler aims for, in percent of the CPU request, 1 to 1000 (above 100
    /// when the limit is above the request). Default 80.
    #[serde(
        default,
        rename = "targetCPUUtilization",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 1, max = 1000))]
    pub target_cpu_utilization: Option<i32>,
}

/// Readiness of a model server pod: only ready pods get traffic. At most one of `httpGet` and
/// `grpc`; without either, a TCP connection to the serving port.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.httpGet) || !has(self.grpc)").message("readiness.httpGet and readiness.grpc are exclusive: keep the one the model server answers"))]
pub struct Readiness {
    /// An HTTP GET that must answer 200..399, e.g. `{path: /v2/health/ready}`. Without it, a TCP
    /// connection to the serving port. Only with `spec.protocol: HTTP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpReadiness>,

    /// A gRPC health check (the kubelet calls `grpc.health.v1.Health/Check`, which must answer
    /// `SERVING`), e.g. `{service: fraud.v1.Scorer}`. Only with `spec.protocol: GRPC`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcReadiness>,
}

/// A gRPC readiness check, the core/v1 `grpc` probe.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GrpcReadiness {
    /// Port of the health service, 1 to 65535. Default: the serving port (`spec.port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,

    /// Service name sent in the `HealthCheckRequest`, e.g. `fraud.v1.Scorer`. Default: empty, the
    /// server's overall health.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub service: Option<String>,
}

/// An HTTP readiness check.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpReadiness {
    /// Absolute path of the check, e.g. `/v2/health/ready`.
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("readiness.httpGet.path must be an absolute path such as /v2/health/ready"))]
    pub path: String,

    /// Port of the check, 1 to 65535. Default: the serving port (`spec.port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
}

/// Where the model files are.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelSource {
    /// `pvc://<claim>/<path>`: the claim is mounted read-only at /mnt/models and `MODEL_PATH` points at
    /// the path inside it, e.g. `pvc://models/fraud/v7`.
    #[schemars(length(min = 1, max = 512))]
    #[x_kube(validation = Rule::new("self.matches('^pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?(/.*)?$')").message("model.uri must start with pvc://<claim>"))]
    pub uri: String,
}

/// How traffic reaches the variants.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Traffic {
    /// Builtin (default): Keelson's own router `<name>-router`. GatewayAPI: an HTTPRoute `<name>`.
    /// None: the Service `<name>` selects every variant's pods (the split follows replica counts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<RouterKind>,

    /// Request header whose value pins a caller to one variant, e.g. `x-user-id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub sticky_header: Option<String>,

    /// Shadow traffic: a copy of requests goes to a variant and its responses are discarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,

    /// Gateway API attachment, for `router: GatewayAPI`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayAttachment>,

    /// Placement and size of the Builtin router's pods (`<name>-router`), for `router: Builtin`:
    /// e.g. the node pool and taints the model servers use. Default: no node selector, no
    /// toleration, and the router's default resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_pod: Option<RouterPod>,
}

/// Where the Builtin router's pods run and what they ask for.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouterPod {
    /// Node labels the router pods must match, e.g. `{node-pool: serving}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// Tolerations of the router pods (core/v1 Toleration), e.g. for the taint of a dedicated
    /// serving node pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,

    /// CPU and memory of the router container (core/v1 ResourceRequirements). Replaces the default
    /// of requests `cpu: 50m, memory: 64Mi` and limits `memory: 256Mi` when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

/// How the entry point splits traffic.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RouterKind {
    #[default]
    Builtin,
    #[serde(rename = "GatewayAPI")]
    GatewayApi,
    None,
}

/// Shadow traffic to one variant.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Mirror {
    /// Variant that receives the copies; one of `variants[].name`.
    pub variant: String,
    /// Percent of requests copied, 0 to 100. Default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub percent: Option<i32>,
}

/// Gateways the HTTPRoute attaches to.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayAttachment {
    /// Gateways (or other parents) of the HTTPRoute, e.g. `[{name: public, namespace: infra}]`.
    #[schemars(length(min = 1, max = 32))]
    pub parent_refs: Vec<ParentRef>,
}

/// A Gateway API parent reference.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    /// Name of the parent, e.g. the Gateway `public`.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Namespace of the parent (the ModelDeployment's when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Listener section of the parent, e.g. `https`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    /// Group of the parent. Default `gateway.networking.k8s.io`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Kind of the parent. Default `Gateway`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// Observed state of one variant.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VariantStatus {
    /// Variant name.
    pub name: String,
    /// Desired model server pods (with autoscaling, the count the autoscaler set).
    pub replicas: i32,
    /// Model server pods ready.
    pub ready_replicas: i32,
    /// Traffic share the spec asks for, in percent.
    #[serde(default)]
    pub desired_weight: i32,
    /// Traffic share in effect, in percent: 0 while the variant has no ready pod, its share then
    /// going to the others in proportion to their weights.
    pub weight: i32,
}

/// Observed state of a ModelDeployment.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentStatus {
    /// In-cluster URL of the entry Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Per-variant replicas and the weight in effect.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub variants: Vec<VariantStatus>,
    /// Ready model pods over desired, e.g. `3/3` (the READY column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// Traffic split in effect, e.g. `champion=90,challenger=10` (the TRAFFIC column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<String>,
    /// The rollout of the variant that carries one: its step, phase, reason and timeline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing and TrafficDegraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
