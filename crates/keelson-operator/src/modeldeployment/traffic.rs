//! How traffic reaches the variants. Pure.
//!
//! - `Builtin`: Keelson's router, a Deployment `<name>-router` reading [`RouterConfig`] from the
//!   ConfigMap `<name>-router`, and the key of its sticky hash from the Secret `<name>-router-key`
//!   (64 hex characters, made once, see [`crate::secret`]; every replica has the same key, and
//!   clients can neither predict nor steer the sticky split). The ConfigMap is mounted as a directory (never with `subPath`), so the
//!   kubelet refreshes the file in place when the weights change and the router picks it up without
//!   a restart; the router's pod template does not depend on the weights or the variants at all.
//! - `GatewayAPI`: an HTTPRoute `<name>` with one rule, weighted backendRefs to the variant Services
//!   and a `RequestMirror` filter; with `protocol: GRPC`, a GRPCRoute `<name>` of the same shape
//!   (their specs are [`super::routes`]'s). No router pods.
//! - `None`: nothing beyond the entry Service.

use std::collections::BTreeMap;

use gateway_api::grpcroutes::GrpcRoute;
use gateway_api::httproutes::HttpRoute;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
    SeccompProfile, Secret, SecretKeySelector, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use keelson_api::router_config::RouterProtocol;
use keelson_api::router_config::{
    RouterConfig, RouterMirror, RouterVariant, DEFAULT_MIRROR_PERCENT, ROUTER_ADMIN_PORT,
    ROUTER_ADMIN_PORT_NAME, ROUTER_CONFIG_DIR, ROUTER_CONFIG_KEY, ROUTER_CONFIG_VERSION,
    ROUTER_CONFIG_VOLUME, ROUTER_CONTAINER, ROUTER_PORT, ROUTER_STICKY_KEY_ENV,
    ROUTER_STICKY_KEY_KEY, ROUTER_UID,
};

use super::names::{
    protocol, role_selector, router_kind, variant_upstream, LABEL_ROLE, PORT_NAME, ROLE_ROUTER,
};
use super::routes::{grpc_route_spec, route_spec};
use crate::error::BuildError;
use crate::pod::DEFAULT_CONTAINER_ANNOTATION;
use crate::secret::secret;
use keelson_api::meta::Owner;
use keelson_api::modeldeployment::{ModelDeployment, Protocol, RouterKind, RouterPod};
use keelson_api::workload::check_quantities;

/// What a traffic mode adds to the variants and the entry Service.
#[derive(Clone, Debug, PartialEq)]
pub enum Traffic {
    Builtin {
        config: Box<ConfigMap>,
        router: Box<Deployment>,
        /// The Secret `<name>-router-key`, written only when it does not exist yet.
        key: Box<Secret>,
    },
    GatewayApi {
        route: Box<HttpRoute>,
    },
    /// `GatewayAPI` mode with `protocol: GRPC`.
    GatewayApiGrpc {
        route: Box<GrpcRoute>,
    },
    None,
}

/// Name of the router Deployment and ConfigMap.
pub fn router_name(md_name: &str) -> String {
    format!("{md_name}-{ROLE_ROUTER}")
}

/// Name of the Secret holding the router's sticky-hash key.
pub fn router_key_name(md_name: &str) -> String {
    format!("{md_name}-{ROLE_ROUTER}-key")
}

/// Random bytes of a router's sticky-hash key (64 hex characters in the Secret).
pub const ROUTER_KEY_BYTES: usize = 32;

fn to_u32(n: i32) -> u32 {
    u32::try_from(n).unwrap_or(0)
}

/// The header name as HTTP/2 and hyper spell it, or `None` when it is not a valid header name.
fn header_name(h: &str) -> Option<String> {
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    (!h.is_empty() && h.chars().all(tchar)).then(|| h.to_ascii_lowercase())
}

/// The router config a ModelDeployment asks for. `name` and `namespace` are the ModelDeployment's;
/// `weights` are the weights in effect, in spec order (see [`super::gate`]).
pub fn router_config(
    md: &ModelDeployment,
    name: &str,
    namespace: &str,
    weights: &[i32],
) -> RouterConfig {
    let t = md.spec.traffic.as_ref();
    let upstream_protocol = match protocol(md) {
        Protocol::Http => RouterProtocol::Http1,
        Protocol::Grpc => RouterProtocol::H2c,
    };
    RouterConfig {
        version: ROUTER_CONFIG_VERSION,
        variants: md
            .spec
            .variants
            .iter()
            .zip(weights)
            .map(|(v, w)| RouterVariant {
                name: v.name.clone(),
                weight: to_u32(*w),
                upstream: variant_upstream(name, namespace, &v.name),
                protocol: upstream_protocol,
            })
            .collect(),
        sticky_header: t
            .and_then(|t| t.sticky_header.as_deref())
            .and_then(header_name),
        mirror: t.and_then(|t| t.mirror.as_ref()).map(|m| RouterMirror {
            variant: m.variant.clone(),
            percent: to_u32(m.percent.unwrap_or(DEFAULT_MIRROR_PERCENT)),
        }),
    }
}

/// The children of the traffic mode, routing by `weights` (in spec order). `router_key` goes into
/// the router key Secret, which is written only when it does not exist (else it is empty).
pub fn build(
    md: &ModelDeployment,
    owner: &Owner,
    router_image: &str,
    weights: &[i32],
    router_key: &str,
) -> Result<Traffic, BuildError> {
    let t = md.spec.traffic.as_ref();
    if let Some(m) = t.and_then(|t| t.mirror.as_ref()) {
        if !md.spec.variants.iter().any(|v| v.name == m.variant) {
            return Err(BuildError::new(
                "UnknownMirrorVariant",
                "spec.traffic.mirror.variant",
                format!("{:?} is not one of spec.variants[].name", m.variant),
            ));
        }
    }
    if protocol(md) == Protocol::Grpc
        && router_kind(md) != RouterKind::GatewayApi
        && t.is_some_and(|t| t.mirror.is_some())
    {
        // The schema refuses it too: gRPC calls are streams of unknown length, which the router
        // never copies.
        return Err(BuildError::new(
            "MirrorNotSupported",
            "spec.traffic.mirror",
            "with spec.protocol: GRPC a mirror needs spec.traffic.router: GatewayAPI (a GRPCRoute RequestMirror filter); remove spec.traffic.mirror",
        ));
    }
    match router_kind(md) {
        RouterKind::Builtin => {
            if let Some(h) = t.and_then(|t| t.sticky_header.as_deref()) {
                if header_name(h).is_none() {
                    return Err(BuildError::new(
                        "InvalidStickyHeader",
                        "spec.traffic.stickyHeader",
                        format!("{h:?} is not an HTTP header name (letters, digits and !#$%&'*+-.^_`|~)"),
                    ));
                }
            }
            let placement = t.and_then(|t| t.router_pod.as_ref());
            if let Some(r) = placement.and_then(|p| p.resources.as_ref()) {
                check_quantities(r, "spec.traffic.routerPod.resources")?;
            }
            let config = router_config(md, &owner.name, &owner.namespace, weights);
            let json = config
                .to_json()
                .map_err(|e| BuildError::new("InvalidTraffic", "spec.traffic", e.to_string()))?;
            let mut cm = ConfigMap {
                metadata: owner.child_meta(router_name(&owner.name)),
                data: Some(BTreeMap::from([(ROUTER_CONFIG_KEY.to_string(), json)])),
                ..ConfigMap::default()
            };
            add_role_label(&mut cm.metadata, ROLE_ROUTER);
            let mut key = secret(
                owner.child_meta(router_key_name(&owner.name)),
                ROUTER_STICKY_KEY_KEY,
                router_key,
            );
            add_role_label(&mut key.metadata, ROLE_ROUTER);
            Ok(Traffic::Builtin {
                config: Box::new(cm),
                router: Box::new(router_deployment(owner, router_image, placement)),
                key: Box::new(key),
            })
        }
        RouterKind::GatewayApi => {
            if t.and_then(|t| t.gateway.as_ref())
                .is_none_or(|g| g.parent_refs.is_empty())
            {
                return Err(BuildError::new(
                    "MissingParentRefs",
                    "spec.traffic.gateway.parentRefs",
                    "router: GatewayAPI needs the Gateway to attach the route to, e.g. spec.traffic.gateway.parentRefs: [{name: public, namespace: infra}]",
                ));
            }
            Ok(match protocol(md) {
                Protocol::Http => {
                    let mut route =
                        HttpRoute::new(&owner.name, route_spec(md, &owner.name, weights));
                    route.metadata = owner.child_meta(&owner.name);
                    Traffic::GatewayApi {
                        route: Box::new(route),
                    }
                }
                Protocol::Grpc => {
                    let mut route =
                        GrpcRoute::new(&owner.name, grpc_route_spec(md, &owner.name, weights));
                    route.metadata = owner.child_meta(&owner.name);
                    Traffic::GatewayApiGrpc {
                        route: Box::new(route),
                    }
                }
            })
        }
        RouterKind::None => Ok(Traffic::None),
    }
}

/// An HTTP probe on the router's admin port.
fn admin_probe(path: &str, period_seconds: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(ROUTER_ADMIN_PORT_NAME.into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period_seconds),
        failure_threshold: Some(failure_threshold),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

fn add_role_label(meta: &mut ObjectMeta, role: &str) {
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .insert(LABEL_ROLE.into(), role.into());
}

/// The router's resources when `routerPod.resources` is absent.
fn default_router_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity("50m".into())),
            ("memory".to_string(), Quantity("64Mi".into())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_string(),
            Quantity("256Mi".into()),
        )])),
        ..ResourceRequirements::default()
    }
}

/// The router Deployment. It depends only on the owner, the image and `traffic.routerPod`
/// (placement and resources): weights, variants, the sticky header and the mirror live in the
/// ConfigMap, so changing them never restarts the router.
pub fn router_deployment(owner: &Owner, image: &str, placement: Option<&RouterPod>) -> Deployment {
    let name = router_name(&owner.name);
    let mut labels = owner.labels();
    labels.insert(LABEL_ROLE.into(), ROLE_ROUTER.into());
    let container = Container {
        name: ROUTER_CONTAINER.into(),
        image: Some(image.to_string()),
        args: Some(vec![
            "router".into(),
            "--config".into(),
            format!("{ROUTER_CONFIG_DIR}/{ROUTER_CONFIG_KEY}"),
        ]),
        ports: Some(vec![
            ContainerPort {
                name: Some(PORT_NAME.into()),
                container_port: ROUTER_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some(ROUTER_ADMIN_PORT_NAME.into()),
                container_port: ROUTER_ADMIN_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
        ]),
        // The sticky-hash key, the same for every replica; never inline in the pod spec.
        env: Some(vec![EnvVar {
            name: ROUTER_STICKY_KEY_ENV.into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: router_key_name(&owner.name),
                    key: ROUTER_STICKY_KEY_KEY.into(),
                    optional: None,
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        }]),
        // Ready once a valid config is loaded; alive while the process answers.
        readiness_probe: Some(admin_probe("/readyz", 5, 1)),
        liveness_probe: Some(admin_probe("/healthz", 10, 3)),
        resources: Some(
            placement
                .and_then(|p| p.resources.clone())
                .unwrap_or_else(default_router_resources),
        ),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: ROUTER_CONFIG_VOLUME.into(),
            mount_path: ROUTER_CONFIG_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    };
    let pod = PodSpec {
        containers: vec![container],
        volumes: Some(vec![Volume {
            name: ROUTER_CONFIG_VOLUME.into(),
            config_map: Some(ConfigMapVolumeSource {
                name: name.clone(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        }]),
        node_selector: placement
            .and_then(|p| p.node_selector.clone())
            .filter(|m| !m.is_empty()),
        tolerations: placement
            .and_then(|p| p.tolerations.clone())
            .filter(|t| !t.is_empty()),
        // The router talks to the variant Services only, never to the Kubernetes API.
        automount_service_account_token: Some(false),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(ROUTER_UID),
            run_as_group: Some(ROUTER_UID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..PodSecurityContext::default()
        }),
        ..PodSpec::default()
    };
    let mut meta = owner.child_meta(&name);
    meta.labels = Some(labels.clone());
    Deployment {
        metadata: meta,
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(role_selector(&owner.name, ROLE_ROUTER)),
                match_expressions: None,
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(BTreeMap::from([(
                        DEFAULT_CONTAINER_ANNOTATION.to_string(),
                        ROUTER_CONTAINER.to_string(),
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
#[path = "traffic_tests.rs"]
mod tests;
