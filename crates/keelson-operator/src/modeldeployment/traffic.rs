//! How traffic reaches the variants. Pure.
//!
//! - `Builtin`: Keelson's router, a Deployment `<name>-router` reading [`RouterConfig`] from the
//!   ConfigMap `<name>-router`, and the key of its sticky hash from the Secret `<name>-router-key`
//!   (64 hex characters, made once, see [`crate::secret`]; every replica has the same key, and
//!   clients can neither predict nor steer the sticky split). The ConfigMap is mounted as a directory (never with `subPath`), so the
//!   kubelet refreshes the file in place when the weights change and the router picks it up without
//!   a restart; the router's pod template does not depend on the weights or the variants at all.
//! - `GatewayAPI`: an HTTPRoute `<name>` with one rule, weighted backendRefs to the variant Services
//!   and a `RequestMirror` filter; with `protocol: GRPC`, a GRPCRoute `<name>` of the same shape.
//!   No router pods.
//! - `None`: nothing beyond the entry Service.

use std::collections::BTreeMap;

use gateway_api::grpcroutes::{
    GrpcRoute, GrpcRouteParentRefs, GrpcRouteRules, GrpcRouteRulesBackendRefs,
    GrpcRouteRulesFilters, GrpcRouteRulesFiltersRequestMirror,
    GrpcRouteRulesFiltersRequestMirrorBackendRef, GrpcRouteRulesFiltersType, GrpcRouteSpec,
};
use gateway_api::httproutes::{
    HttpRoute, HttpRouteParentRefs, HttpRouteRules, HttpRouteRulesBackendRefs,
    HttpRouteRulesFilters, HttpRouteRulesFiltersRequestMirror,
    HttpRouteRulesFiltersRequestMirrorBackendRef, HttpRouteRulesFiltersType, HttpRouteSpec,
};
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
    protocol, role_selector, router_kind, variant_name, variant_upstream, LABEL_ROLE, PORT_NAME,
    ROLE_ROUTER, SERVICE_PORT,
};
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

/// The HTTPRoute spec a ModelDeployment asks for: its parents, and one rule with a weighted backend
/// per variant (weight 0 included, so that the route lists every variant) and, with a mirror, a
/// `RequestMirror` filter (with `percent` only when it is below 100; absent means all requests).
/// `weights` are the weights in effect, in spec order.
pub fn route_spec(md: &ModelDeployment, name: &str, weights: &[i32]) -> HttpRouteSpec {
    let t = md.spec.traffic.as_ref();
    let parent_refs = t
        .and_then(|t| t.gateway.as_ref())
        .map(|g| {
            g.parent_refs
                .iter()
                .map(|p| HttpRouteParentRefs {
                    group: p.group.clone(),
                    kind: p.kind.clone(),
                    name: p.name.clone(),
                    namespace: p.namespace.clone(),
                    section_name: p.section_name.clone(),
                    port: None,
                })
                .collect::<Vec<_>>()
        })
        .filter(|p| !p.is_empty());
    let backend_refs = md
        .spec
        .variants
        .iter()
        .zip(weights)
        .map(|(v, w)| HttpRouteRulesBackendRefs {
            name: variant_name(name, &v.name),
            port: Some(SERVICE_PORT),
            weight: Some(*w),
            ..HttpRouteRulesBackendRefs::default()
        })
        .collect();
    let filters = t.and_then(|t| t.mirror.as_ref()).map(|m| {
        let percent = m.percent.unwrap_or(DEFAULT_MIRROR_PERCENT);
        vec![HttpRouteRulesFilters {
            r#type: HttpRouteRulesFiltersType::RequestMirror,
            request_mirror: Some(HttpRouteRulesFiltersRequestMirror {
                backend_ref: HttpRouteRulesFiltersRequestMirrorBackendRef {
                    name: variant_name(name, &m.variant),
                    port: Some(SERVICE_PORT),
                    ..HttpRouteRulesFiltersRequestMirrorBackendRef::default()
                },
                fraction: None,
                percent: (percent < 100).then_some(percent),
            }),
            ..HttpRouteRulesFilters::default()
        }]
    });
    HttpRouteSpec {
        parent_refs,
        rules: Some(vec![HttpRouteRules {
            backend_refs: Some(backend_refs),
            filters,
            ..HttpRouteRules::default()
        }]),
        ..HttpRouteSpec::default()
    }
}

/// The weight each variant Service has in an HTTPRoute (the first rule, as Keelson writes it).
/// A backendRef without a weight has the Gateway API default of 1.
pub fn route_weights(route: &HttpRoute) -> BTreeMap<String, i32> {
    route
        .spec
        .rules
        .iter()
        .flatten()
        .next()
        .and_then(|r| r.backend_refs.as_ref())
        .into_iter()
        .flatten()
        .map(|b| (b.name.clone(), b.weight.unwrap_or(1)))
        .collect()
}

/// The GRPCRoute spec of a ModelDeployment with `protocol: GRPC`: the same parents, weighted
/// backends and mirror as [`route_spec`], in the GRPCRoute's types.
pub fn grpc_route_spec(md: &ModelDeployment, name: &str, weights: &[i32]) -> GrpcRouteSpec {
    let t = md.spec.traffic.as_ref();
    let parent_refs = t
        .and_then(|t| t.gateway.as_ref())
        .map(|g| {
            g.parent_refs
                .iter()
                .map(|p| GrpcRouteParentRefs {
                    group: p.group.clone(),
                    kind: p.kind.clone(),
                    name: p.name.clone(),
                    namespace: p.namespace.clone(),
                    section_name: p.section_name.clone(),
                    port: None,
                })
                .collect::<Vec<_>>()
        })
        .filter(|p| !p.is_empty());
    let backend_refs = md
        .spec
        .variants
        .iter()
        .zip(weights)
        .map(|(v, w)| GrpcRouteRulesBackendRefs {
            name: variant_name(name, &v.name),
            port: Some(SERVICE_PORT),
            weight: Some(*w),
            ..GrpcRouteRulesBackendRefs::default()
        })
        .collect();
    let filters = t.and_then(|t| t.mirror.as_ref()).map(|m| {
        let percent = m.percent.unwrap_or(DEFAULT_MIRROR_PERCENT);
        vec![GrpcRouteRulesFilters {
            r#type: GrpcRouteRulesFiltersType::RequestMirror,
            request_mirror: Some(GrpcRouteRulesFiltersRequestMirror {
                backend_ref: GrpcRouteRulesFiltersRequestMirrorBackendRef {
                    name: variant_name(name, &m.variant),
                    port: Some(SERVICE_PORT),
                    ..GrpcRouteRulesFiltersRequestMirrorBackendRef::default()
                },
                fraction: None,
                percent: (percent < 100).then_some(percent),
            }),
            ..GrpcRouteRulesFilters::default()
        }]
    });
    GrpcRouteSpec {
        parent_refs,
        rules: Some(vec![GrpcRouteRules {
            backend_refs: Some(backend_refs),
            filters,
            ..GrpcRouteRules::default()
        }]),
        ..GrpcRouteSpec::default()
    }
}

/// The weight each variant Service has in a GRPCRoute (the first rule, as Keelson writes it).
pub fn grpc_route_weights(route: &GrpcRoute) -> BTreeMap<String, i32> {
    route
        .spec
        .rules
        .iter()
        .flatten()
        .next()
        .and_then(|r| r.backend_refs.as_ref())
        .into_iter()
        .flatten()
        .map(|b| (b.name.clone(), b.weight.unwrap_or(1)))
        .collect()
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
mod tests {
    use super::*;

    fn spec_weights(m: &ModelDeployment) -> Vec<i32> {
        m.spec.variants.iter().map(|v| v.weight).collect()
    }

    /// The traffic children with the spec's weights.
    fn build(m: &ModelDeployment, owner: &Owner, image: &str) -> Result<Traffic, BuildError> {
        super::build(m, owner, image, &spec_weights(m), TEST_KEY)
    }

    /// Every child, with no variant ready (so with the spec's weights).
    fn build_all(
        m: &ModelDeployment,
        owner: &Owner,
        image: &str,
    ) -> Result<crate::modeldeployment::build::Children, BuildError> {
        crate::modeldeployment::build::build(m, owner, image, None, &Default::default(), TEST_KEY)
    }
    use crate::modeldeployment::build::tests::{ab, md, variant, IMAGE, TEST_KEY};
    use crate::modeldeployment::names::ANNOTATION_ROUTER;
    use keelson_api::modeldeployment::{
        GatewayAttachment, Mirror, ParentRef, Traffic as TrafficSpec,
    };
    use serde_json::json;

    fn traffic(
        router: RouterKind,
        sticky: Option<&str>,
        mirror: Option<(&str, Option<i32>)>,
    ) -> TrafficSpec {
        TrafficSpec {
            router: Some(router),
            sticky_header: sticky.map(str::to_string),
            mirror: mirror.map(|(v, p)| Mirror {
                variant: v.into(),
                percent: p,
            }),
            router_pod: None,
            gateway: (router == RouterKind::GatewayApi).then(|| GatewayAttachment {
                parent_refs: vec![ParentRef {
                    name: "public".into(),
                    namespace: Some("infra".into()),
                    section_name: Some("https".into()),
                    ..ParentRef::default()
                }],
            }),
        }
    }

    fn config_of(t: &Traffic) -> RouterConfig {
        match t {
            Traffic::Builtin { config, .. } => {
                RouterConfig::parse(&config.data.as_ref().unwrap()[ROUTER_CONFIG_KEY]).unwrap()
            }
            other => panic!("not Builtin: {other:?}"),
        }
    }

    #[test]
    fn router_config_for_a_90_10_split_with_sticky_header_and_mirror() {
        let (mut m, owner) = md(ab(), None);
        m.spec.traffic = Some(traffic(
            RouterKind::Builtin,
            Some("X-User-Id"),
            Some(("challenger", None)),
        ));
        let t = build(&m, &owner, IMAGE).unwrap();
        let Traffic::Builtin { config, .. } = &t else {
            panic!("not Builtin")
        };
        assert_eq!(config.metadata.name.as_deref(), Some("fraud-router"));
        assert_eq!(
            config.metadata.labels.as_ref().unwrap()["keelson.dev/owner-name"],
            "fraud"
        );
        let raw: serde_json::Value =
            serde_json::from_str(&config.data.as_ref().unwrap()["config.json"]).unwrap();
        assert_eq!(
            raw,
            json!({
                "version": 1,
                "variants": [
                    {"name": "champion", "weight": 90, "upstream": "fraud-champion.team-a.svc.cluster.local:80"},
                    {"name": "challenger", "weight": 10, "upstream": "fraud-challenger.team-a.svc.cluster.local:80"}
                ],
                "stickyHeader": "x-user-id",
                "mirror": {"variant": "challenger", "percent": 100}
            })
        );
        let c = config_of(&t);
        assert_eq!(c.weight("champion"), Some(90));
        assert_eq!(c.weight("nope"), None);
    }

    #[test]
    fn router_config_without_options_and_unknown_versions() {
        let (m, owner) = md(vec![variant("only", 100, None)], None);
        let c = config_of(&build(&m, &owner, IMAGE).unwrap());
        assert_eq!(c.sticky_header, None);
        assert_eq!(c.mirror, None);
        let json = c.to_json().unwrap();
        assert!(!json.contains("stickyHeader") && !json.contains("mirror"));
        assert!(RouterConfig::parse(&json.replace("\"version\": 1", "\"version\": 2")).is_err());
        // Fields a later version adds are ignored by this one.
        let extra = json.replacen('{', "{\"future\": true,", 1);
        assert_eq!(RouterConfig::parse(&extra).unwrap(), c);
    }

    #[test]
    fn router_deployment_does_not_depend_on_weights() {
        let (mut a, owner) = md(ab(), None);
        a.spec.traffic = Some(traffic(RouterKind::Builtin, None, None));
        let mut b = a.clone();
        b.spec.variants[0].weight = 20;
        b.spec.variants[1].weight = 80;
        b.spec.variants.push(variant("third", 0, None));
        b.spec.traffic = Some(traffic(
            RouterKind::Builtin,
            Some("x-user"),
            Some(("third", Some(5))),
        ));
        let (ta, tb) = (
            build(&a, &owner, IMAGE).unwrap(),
            build(&b, &owner, IMAGE).unwrap(),
        );
        let (
            Traffic::Builtin {
                router: ra,
                config: ca,
                ..
            },
            Traffic::Builtin {
                router: rb,
                config: cb,
                ..
            },
        ) = (&ta, &tb)
        else {
            panic!("not Builtin")
        };
        assert_eq!(ra, rb);
        assert_ne!(ca, cb);
        // Nor do the model Deployments and the entry Service.
        let (fa, fb) = (
            build_all(&a, &owner, IMAGE).unwrap(),
            build_all(&b, &owner, IMAGE).unwrap(),
        );
        assert_eq!(fa.variants[0].deployment, fb.variants[0].deployment);
        assert_eq!(fa.variants[1].deployment, fb.variants[1].deployment);
        assert_eq!(fa.entry, fb.entry);
    }

    #[test]
    fn the_router_reads_its_sticky_key_from_its_own_secret() {
        let (m, owner) = md(ab(), None);
        let Traffic::Builtin { router, key, .. } = build(&m, &owner, IMAGE).unwrap() else {
            panic!("not Builtin")
        };
        assert_eq!(key.metadata.name.as_deref(), Some("fraud-router-key"));
        let data = key.data.as_ref().unwrap();
        assert_eq!(data.len(), 1);
        assert_eq!(data["sticky-key"].0, TEST_KEY.as_bytes());
        let refs = key.metadata.owner_references.as_ref().unwrap();
        assert_eq!(refs.len(), 1);
        assert_eq!(refs[0].kind, "ModelDeployment");
        assert_eq!(refs[0].controller, Some(true));
        let ps = router.spec.as_ref().unwrap().template.spec.clone().unwrap();
        let env = ps.containers[0].env.as_ref().unwrap();
        assert_eq!(env.len(), 1);
        assert_eq!(env[0].name, "KEELSON_ROUTER_STICKY_KEY");
        assert_eq!(
            env[0].value, None,
            "the key is never inline in the pod spec"
        );
        assert_eq!(
            crate::secret::secret_ref(&env[0]),
            Some(("fraud-router-key", "sticky-key"))
        );
        // The key is nowhere in the Deployment; a different key builds the same Deployment.
        assert!(!serde_json::to_string(&router).unwrap().contains(TEST_KEY));
        let Traffic::Builtin { router: other, .. } =
            super::build(&m, &owner, IMAGE, &spec_weights(&m), "").unwrap()
        else {
            panic!("not Builtin")
        };
        assert_eq!(other, router);
    }

    #[test]
    fn router_deployment_is_locked_down_and_mounts_the_config_directory() {
        let (m, owner) = md(ab(), None);
        let Traffic::Builtin { router, .. } = build(&m, &owner, "img:9").unwrap() else {
            panic!("not Builtin")
        };
        assert_eq!(router.metadata.name.as_deref(), Some("fraud-router"));
        let spec = router.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(1));
        let labels = super::super::build::tests::template_labels(spec);
        assert_eq!(labels["keelson.dev/role"], "router");
        assert_eq!(labels["keelson.dev/owner-kind"], "ModelDeployment");
        let sel = spec.selector.match_labels.as_ref().unwrap();
        assert!(sel.iter().all(|(k, v)| labels.get(k) == Some(v)));
        let ps = spec.template.spec.as_ref().unwrap();
        let c = &ps.containers[0];
        assert_eq!(c.image.as_deref(), Some("img:9"));
        assert_eq!(
            c.args.as_deref().unwrap(),
            ["router", "--config", "/etc/keelson-router/config.json"]
        );
        let ports: Vec<_> = c
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.as_deref().unwrap(), p.container_port))
            .collect();
        assert_eq!(ports, [("http", 8080), ("admin", 9090)]);
        // The probes ask the router's admin port, where `keelson router` serves them.
        for (probe, path) in [
            (c.readiness_probe.as_ref().unwrap(), "/readyz"),
            (c.liveness_probe.as_ref().unwrap(), "/healthz"),
        ] {
            let get = probe.http_get.as_ref().unwrap();
            assert_eq!(get.path.as_deref(), Some(path));
            assert_eq!(get.port, IntOrString::String("admin".into()));
        }
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref().unwrap(),
            ["ALL"]
        );
        let mount = &c.volume_mounts.as_ref().unwrap()[0];
        assert_eq!(mount.mount_path, "/etc/keelson-router");
        assert_eq!(
            mount.sub_path, None,
            "a subPath mount would never see config updates"
        );
        let vol = &ps.volumes.as_ref().unwrap()[0];
        assert_eq!(vol.name, mount.name);
        assert_eq!(vol.config_map.as_ref().unwrap().name, "fraud-router");
    }

    #[test]
    fn http_route_weights_mirror_and_parent_refs() {
        let (mut m, owner) = md(ab(), None);
        m.spec.traffic = Some(traffic(
            RouterKind::GatewayApi,
            None,
            Some(("challenger", Some(25))),
        ));
        let Traffic::GatewayApi { route } = build(&m, &owner, IMAGE).unwrap() else {
            panic!("not GatewayAPI")
        };
        let v = serde_json::to_value(&*route).unwrap();
        assert_eq!(v["apiVersion"], "gateway.networking.k8s.io/v1");
        assert_eq!(v["kind"], "HTTPRoute");
        assert_eq!(v["metadata"]["name"], "fraud");
        assert_eq!(v["metadata"]["ownerReferences"][0]["uid"], "uid-md");
        assert!(v.get("status").is_none());
        assert_eq!(
            v["spec"]["parentRefs"],
            json!([{"name": "public", "namespace": "infra", "sectionName": "https"}])
        );
        assert_eq!(
            v["spec"]["rules"],
            json!([{
                "backendRefs": [
                    {"name": "fraud-champion", "port": 80, "weight": 90},
                    {"name": "fraud-challenger", "port": 80, "weight": 10}
                ],
                "filters": [{
                    "type": "RequestMirror",
                    "requestMirror": {"backendRef": {"name": "fraud-challenger", "port": 80}, "percent": 25}
                }]
            }])
        );
        assert_eq!(
            route_weights(&route),
            BTreeMap::from([
                ("fraud-champion".to_string(), 90),
                ("fraud-challenger".to_string(), 10)
            ])
        );
        // A full mirror carries no percent (the Gateway API default is all requests); no mirror, no filter.
        m.spec.traffic = Some(traffic(
            RouterKind::GatewayApi,
            None,
            Some(("challenger", Some(100))),
        ));
        let spec = route_spec(&m, "fraud", &spec_weights(&m));
        let f = &spec.rules.as_ref().unwrap()[0].filters.as_ref().unwrap()[0];
        assert_eq!(f.request_mirror.as_ref().unwrap().percent, None);
        m.spec.traffic = Some(traffic(RouterKind::GatewayApi, None, None));
        assert!(route_spec(&m, "fraud", &spec_weights(&m)).rules.unwrap()[0]
            .filters
            .is_none());
    }

    #[test]
    fn grpc_marks_every_variant_h2c_in_the_router_config() {
        let (mut m, owner) = md(ab(), None);
        m.spec.protocol = Some(Protocol::Grpc);
        m.spec.traffic = Some(traffic(RouterKind::Builtin, Some("x-user-id"), None));
        let t = build(&m, &owner, IMAGE).unwrap();
        let Traffic::Builtin { config, router, .. } = &t else {
            panic!("not Builtin")
        };
        let raw: serde_json::Value =
            serde_json::from_str(&config.data.as_ref().unwrap()["config.json"]).unwrap();
        assert_eq!(
            raw["variants"],
            json!([
                {"name": "champion", "weight": 90, "upstream": "fraud-champion.team-a.svc.cluster.local:80", "protocol": "h2c"},
                {"name": "challenger", "weight": 10, "upstream": "fraud-challenger.team-a.svc.cluster.local:80", "protocol": "h2c"}
            ])
        );
        assert_eq!(raw["stickyHeader"], "x-user-id");
        // The router itself does not change with the protocol: it speaks both on one port.
        let mut http = m.clone();
        http.spec.protocol = None;
        let Traffic::Builtin { router: r2, .. } = build(&http, &owner, IMAGE).unwrap() else {
            panic!("not Builtin")
        };
        assert_eq!(router, &r2);
    }

    #[test]
    fn grpc_in_gateway_mode_writes_a_grpc_route_with_weights_and_mirror() {
        let (mut m, owner) = md(ab(), None);
        m.spec.protocol = Some(Protocol::Grpc);
        m.spec.traffic = Some(traffic(
            RouterKind::GatewayApi,
            None,
            Some(("challenger", Some(25))),
        ));
        let Traffic::GatewayApiGrpc { route } =
            super::build(&m, &owner, IMAGE, &[100, 0], TEST_KEY).unwrap()
        else {
            panic!("not a GRPCRoute")
        };
        let v = serde_json::to_value(&*route).unwrap();
        assert_eq!(v["apiVersion"], "gateway.networking.k8s.io/v1");
        assert_eq!(v["kind"], "GRPCRoute");
        assert_eq!(v["metadata"]["name"], "fraud");
        assert_eq!(v["metadata"]["ownerReferences"][0]["uid"], "uid-md");
        assert!(v.get("status").is_none());
        assert_eq!(
            v["spec"]["parentRefs"],
            json!([{"name": "public", "namespace": "infra", "sectionName": "https"}])
        );
        // The weights given (the gated ones), not the spec's.
        assert_eq!(
            v["spec"]["rules"],
            json!([{
                "backendRefs": [
                    {"name": "fraud-champion", "port": 80, "weight": 100},
                    {"name": "fraud-challenger", "port": 80, "weight": 0}
                ],
                "filters": [{
                    "type": "RequestMirror",
                    "requestMirror": {"backendRef": {"name": "fraud-challenger", "port": 80}, "percent": 25}
                }]
            }])
        );
        assert_eq!(
            grpc_route_weights(&route),
            BTreeMap::from([
                ("fraud-champion".to_string(), 100),
                ("fraud-challenger".to_string(), 0)
            ])
        );
        // Outside GatewayAPI mode a gRPC mirror is refused (the schema refuses it too).
        for router in [RouterKind::Builtin, RouterKind::None] {
            let mut b = m.clone();
            b.spec.traffic.as_mut().unwrap().router = Some(router);
            let err = build(&b, &owner, IMAGE).unwrap_err();
            assert_eq!(
                (err.reason, err.field.as_str()),
                ("MirrorNotSupported", "spec.traffic.mirror")
            );
        }
        // The same missing parents refusal as for an HTTPRoute.
        m.spec.traffic.as_mut().unwrap().gateway = None;
        assert_eq!(
            build(&m, &owner, IMAGE).unwrap_err().reason,
            "MissingParentRefs"
        );
    }

    #[test]
    fn gateway_mode_needs_parent_refs() {
        let (mut m, owner) = md(ab(), Some(RouterKind::GatewayApi));
        let err = build(&m, &owner, IMAGE).unwrap_err();
        assert_eq!(
            (err.reason, err.field.as_str()),
            ("MissingParentRefs", "spec.traffic.gateway.parentRefs")
        );
        m.spec.traffic = Some(traffic(RouterKind::GatewayApi, None, None));
        assert!(build(&m, &owner, IMAGE).is_ok());
    }

    #[test]
    fn bad_mirror_or_sticky_header_is_a_spec_error() {
        let (mut m, owner) = md(ab(), None);
        m.spec.traffic = Some(traffic(RouterKind::Builtin, None, Some(("ghost", None))));
        assert_eq!(
            build(&m, &owner, IMAGE).unwrap_err().field,
            "spec.traffic.mirror.variant"
        );
        m.spec.traffic = Some(traffic(RouterKind::Builtin, Some("x user"), None));
        assert_eq!(
            build(&m, &owner, IMAGE).unwrap_err().reason,
            "InvalidStickyHeader"
        );
    }

    #[test]
    fn each_mode_has_its_own_child_set() {
        struct Case {
            traffic: TrafficSpec,
            deployments: &'static [&'static str],
            services: &'static [&'static str],
            config_maps: &'static [&'static str],
            route: bool,
            entry_role: &'static str,
            annotation: &'static str,
        }
        let cases = [
            Case {
                traffic: traffic(RouterKind::Builtin, None, None),
                deployments: &["fraud-challenger", "fraud-champion", "fraud-router"],
                services: &["fraud", "fraud-challenger", "fraud-champion"],
                config_maps: &["fraud-router"],
                route: false,
                entry_role: "router",
                annotation: "Builtin",
            },
            Case {
                traffic: traffic(RouterKind::GatewayApi, None, None),
                deployments: &["fraud-challenger", "fraud-champion"],
                services: &["fraud", "fraud-challenger", "fraud-champion"],
                config_maps: &[],
                route: true,
                entry_role: "model",
                annotation: "GatewayAPI",
            },
            Case {
                traffic: traffic(RouterKind::None, None, None),
                deployments: &["fraud-challenger", "fraud-champion"],
                services: &["fraud", "fraud-challenger", "fraud-champion"],
                config_maps: &[],
                route: false,
                entry_role: "model",
                annotation: "None",
            },
        ];
        for c in cases {
            let (mut m, owner) = md(ab(), None);
            m.spec.traffic = Some(c.traffic);
            let ch = build_all(&m, &owner, IMAGE).unwrap();
            let names = |s: std::collections::BTreeSet<String>| s.into_iter().collect::<Vec<_>>();
            assert_eq!(names(ch.deployment_names()), c.deployments);
            assert_eq!(names(ch.service_names()), c.services);
            assert_eq!(names(ch.config_map_names()), c.config_maps);
            assert_eq!(matches!(ch.traffic, Traffic::GatewayApi { .. }), c.route);
            assert_eq!(ch.config_map().is_some(), !c.config_maps.is_empty());
            let entry = &ch.entry;
            assert_eq!(
                entry.spec.as_ref().unwrap().selector.as_ref().unwrap()["keelson.dev/role"],
                c.entry_role
            );
            assert_eq!(
                entry.metadata.annotations.as_ref().unwrap()[ANNOTATION_ROUTER],
                c.annotation
            );
        }
    }

    fn router_pod_spec(t: &Traffic) -> PodSpec {
        let Traffic::Builtin { router, .. } = t else {
            panic!("not Builtin: {t:?}")
        };
        router.spec.as_ref().unwrap().template.spec.clone().unwrap()
    }

    #[test]
    fn router_pod_places_and_sizes_the_router() {
        use k8s_openapi::api::core::v1::Toleration;
        let (mut m, owner) = md(ab(), None);
        // Absent: no placement, the default resources.
        let ps = router_pod_spec(&build(&m, &owner, IMAGE).unwrap());
        assert_eq!(ps.node_selector, None);
        assert_eq!(ps.tolerations, None);
        assert_eq!(ps.containers[0].resources, Some(default_router_resources()));

        let toleration = Toleration {
            key: Some("keelson.dev/real-node".into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Toleration::default()
        };
        let resources = ResourceRequirements {
            requests: Some(BTreeMap::from([(
                "cpu".to_string(),
                Quantity("200m".into()),
            )])),
            ..ResourceRequirements::default()
        };
        let mut t = traffic(RouterKind::Builtin, None, None);
        t.router_pod = Some(RouterPod {
            node_selector: Some(BTreeMap::from([(
                "keelson.dev/real-node".to_string(),
                "true".to_string(),
            )])),
            tolerations: Some(vec![toleration.clone()]),
            resources: Some(resources.clone()),
        });
        m.spec.traffic = Some(t);
        let built = build(&m, &owner, IMAGE).unwrap();
        let ps = router_pod_spec(&built);
        assert_eq!(ps.node_selector.unwrap()["keelson.dev/real-node"], "true");
        assert_eq!(ps.tolerations.unwrap(), [toleration]);
        assert_eq!(ps.containers[0].resources, Some(resources));
        // The same spec builds the same Deployment (no write on an unchanged world), and weights
        // still do not touch it.
        assert_eq!(build(&m, &owner, IMAGE).unwrap(), built);
        let mut w = m.clone();
        w.spec.variants[0].weight = 30;
        w.spec.variants[1].weight = 70;
        let (Traffic::Builtin { router: a, .. }, Traffic::Builtin { router: b, .. }) =
            (&built, &build(&w, &owner, IMAGE).unwrap())
        else {
            panic!("not Builtin")
        };
        assert_eq!(a, b);

        // Empty lists and maps are the same as none.
        let mut e = m.clone();
        e.spec.traffic.as_mut().unwrap().router_pod = Some(RouterPod {
            node_selector: Some(BTreeMap::new()),
            tolerations: Some(vec![]),
            resources: None,
        });
        let ps = router_pod_spec(&build(&e, &owner, IMAGE).unwrap());
        assert_eq!((ps.node_selector, ps.tolerations), (None, None));
    }

    #[test]
    fn router_pod_resources_that_are_not_quantities_are_a_spec_error() {
        let (mut m, owner) = md(ab(), None);
        let mut t = traffic(RouterKind::Builtin, None, None);
        t.router_pod = Some(RouterPod {
            resources: Some(ResourceRequirements {
                limits: Some(BTreeMap::from([(
                    "memory".to_string(),
                    Quantity("lots".into()),
                )])),
                ..ResourceRequirements::default()
            }),
            ..RouterPod::default()
        });
        m.spec.traffic = Some(t);
        let err = build(&m, &owner, IMAGE).unwrap_err();
        assert_eq!(
            (err.reason, err.field.as_str()),
            (
                "InvalidQuantity",
                "spec.traffic.routerPod.resources.limits.memory"
            )
        );
    }
}
