//! The names a ModelDeployment's children share: container, label and port names, the names and
//! DNS addresses of the variant Services, and the traffic mode with its default. Pure, and
//! imported by the builder, the traffic module and the status alike; it imports none of them.

use std::collections::BTreeMap;

use keelson_api::meta::LABEL_OWNER_NAME;
use keelson_api::modeldeployment::{ModelDeployment, Protocol, RouterKind, Variant};

/// Name of the model server container.
pub const CONTAINER: &str = "model";
/// Name of the pod volume holding a `pvc://` model.
pub const MODEL_VOLUME: &str = "model";
/// Environment variable pointing at the model inside the container.
pub const MODEL_PATH_ENV: &str = "MODEL_PATH";
/// Label naming the variant of a model pod, Deployment and Service.
pub const LABEL_VARIANT: &str = "keelson.dev/variant";
/// Label telling model pods (`model`) from router pods (`router`).
pub const LABEL_ROLE: &str = "keelson.dev/role";
pub const ROLE_MODEL: &str = "model";
pub const ROLE_ROUTER: &str = "router";
/// Annotation on the entry Service recording the traffic mode it was built for. The reconciler
/// reads it back to know when an HTTPRoute may be left over from `router: GatewayAPI`.
pub const ANNOTATION_ROUTER: &str = "keelson.dev/router";
/// Annotation on a variant Deployment whose `replicas` the HorizontalPodAutoscaler owns. The
/// reconciler reads it back to know when the count must be handed over (see the reconciler).
pub const ANNOTATION_AUTOSCALED: &str = "keelson.dev/autoscaled";
/// Field manager that keeps `replicas` at its value while the operator gives the field up, until
/// the HorizontalPodAutoscaler writes it.
pub const HANDOVER_MANAGER: &str = "keelson-handover";
/// Seconds a model pod keeps serving after it is told to stop (`preStop` sleep), so that kube-proxy
/// and the routers stop sending to it first.
pub const PRESTOP_SECONDS: i64 = 10;
/// Seconds the model server has after SIGTERM, on top of the preStop pause.
pub const SHUTDOWN_SECONDS: i64 = 30;
/// CPU utilization an autoscaler aims for when `targetCPUUtilization` is absent.
pub const DEFAULT_TARGET_CPU: i32 = 80;
/// Port of every Service of a ModelDeployment.
pub const SERVICE_PORT: i32 = 80;
/// Name of the container port the Services target, and of the Services' port (`protocol: HTTP`).
pub const PORT_NAME: &str = "http";
/// Name of the model container's port and of the Services' port with `protocol: GRPC`.
pub const GRPC_PORT_NAME: &str = "grpc";
/// `appProtocol` of the Services' port with `protocol: GRPC`: HTTP/2 over cleartext (KEP-3726), so
/// that meshes and gateways speak h2c to the pods.
pub const APP_PROTOCOL_H2C: &str = "kubernetes.io/h2c";
/// Annotation on the entry Service recording the protocol it was built for (`GRPC` only). With the
/// router annotation, it tells the reconciler which kind of route may be left over.
pub const ANNOTATION_PROTOCOL: &str = "keelson.dev/protocol";
/// Prefix of a model URI on a PersistentVolumeClaim.
pub const PVC_SCHEME: &str = "pvc://";

/// Name of a variant's Deployment and Service.
pub fn variant_name(md_name: &str, variant: &str) -> String {
    format!("{md_name}-{variant}")
}

/// In-cluster DNS name and port of a variant's Service, as the router dials it.
pub fn variant_upstream(md_name: &str, namespace: &str, variant: &str) -> String {
    format!(
        "{}.{namespace}.svc.cluster.local:{SERVICE_PORT}",
        variant_name(md_name, variant)
    )
}

/// The in-cluster URL of the entry Service.
pub fn url(md_name: &str, namespace: &str) -> String {
    format!("http://{md_name}.{namespace}.svc.cluster.local/")
}

/// The traffic mode, with its default.
pub fn router_kind(md: &ModelDeployment) -> RouterKind {
    md.spec
        .traffic
        .as_ref()
        .and_then(|t| t.router)
        .unwrap_or_default()
}

/// What the model servers speak, with its default.
pub fn protocol(md: &ModelDeployment) -> Protocol {
    md.spec.protocol.unwrap_or_default()
}

/// The name of the model container's port and of the Services' port.
pub fn port_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Http => PORT_NAME,
        Protocol::Grpc => GRPC_PORT_NAME,
    }
}

/// Desired model pods of a variant (default 1); with autoscaling, its minReplicas (the
/// autoscaler's count is read from the Deployment).
pub fn replicas(v: &Variant) -> i32 {
    match &v.autoscaling {
        Some(a) => a.min_replicas.unwrap_or(1),
        None => v.replicas.unwrap_or(1),
    }
}

/// The string form of a traffic mode, as the CRD spells it.
pub fn router_kind_name(kind: RouterKind) -> &'static str {
    match kind {
        RouterKind::Builtin => "Builtin",
        RouterKind::GatewayApi => "GatewayAPI",
        RouterKind::None => "None",
    }
}

/// Labels selecting the model pods of one variant (the Deployment's selector, immutable).
pub fn variant_selector(md_name: &str, variant: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_OWNER_NAME.to_string(), md_name.to_string()),
        (LABEL_VARIANT.to_string(), variant.to_string()),
    ])
}

/// Labels selecting the pods of one role (`model` or `router`) of a ModelDeployment.
pub fn role_selector(md_name: &str, role: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_OWNER_NAME.to_string(), md_name.to_string()),
        (LABEL_ROLE.to_string(), role.to_string()),
    ])
}
