//! ModelDeployment spec -> children. Pure: no client, no clock; the router image is passed in.
//!
//! Per variant a Deployment and a Service `<name>-<variant>`, the entry Service `<name>`, and what the
//! traffic mode adds (see [`super::traffic`]).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricSpec,
    MetricTarget, ResourceMetricSource,
};
use k8s_openapi::api::core::v1::{
    ConfigMap, ContainerPort, GRPCAction, HTTPGetAction, Lifecycle, LifecycleHandler,
    PersistentVolumeClaimVolumeSource, PodTemplateSpec, Probe, Service, ServicePort, ServiceSpec,
    SleepAction, TCPSocketAction, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::gate::{gate, ReadyPods};
use super::names::*;
use super::rollout;
use super::traffic::{self, Traffic};
use crate::error::BuildError;
use crate::pod::{env, pod_template, MainContainer};
use keelson_api::meta::Owner;
use keelson_api::modeldeployment::{
    ModelDeployment, Protocol, RouterKind, Variant, DEFAULT_PORT, MODEL_MOUNT,
};
use keelson_api::rollout::RolloutStatus;

/// The children of one variant.
#[derive(Clone, Debug, PartialEq)]
pub struct VariantChildren {
    pub name: String,
    pub deployment: Deployment,
    pub service: Service,
    /// With `autoscaling`, the HorizontalPodAutoscaler `<name>-<variant>`.
    pub autoscaler: Option<HorizontalPodAutoscaler>,
}

/// Every child a ModelDeployment wants.
#[derive(Clone, Debug, PartialEq)]
pub struct Children {
    pub variants: Vec<VariantChildren>,
    /// The entry Service `<name>`.
    pub entry: Service,
    /// What the traffic mode adds.
    pub traffic: Traffic,
}

impl Children {
    /// Names of the Deployments that must exist; any other Deployment of the owner is an orphan.
    pub fn deployment_names(&self) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = self
            .variants
            .iter()
            .filter_map(|v| v.deployment.metadata.name.clone())
            .collect();
        if let Traffic::Builtin { router, .. } = &self.traffic {
            out.extend(router.metadata.name.clone());
        }
        out
    }

    /// Names of the Services that must exist.
    pub fn service_names(&self) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = self
            .variants
            .iter()
            .filter_map(|v| v.service.metadata.name.clone())
            .collect();
        out.extend(self.entry.metadata.name.clone());
        out
    }

    /// Names of the HorizontalPodAutoscalers that must exist.
    pub fn autoscaler_names(&self) -> BTreeSet<String> {
        self.variants
            .iter()
            .filter_map(|v| v.autoscaler.as_ref()?.metadata.name.clone())
            .collect()
    }

    /// Names of the ConfigMaps that must exist.
    pub fn config_map_names(&self) -> BTreeSet<String> {
        match &self.traffic {
            Traffic::Builtin { config, .. } => config.metadata.name.iter().cloned().collect(),
            _ => BTreeSet::new(),
        }
    }

    /// The router config ConfigMap, in `Builtin` mode.
    pub fn config_map(&self) -> Option<&ConfigMap> {
        match &self.traffic {
            Traffic::Builtin { config, .. } => Some(config.as_ref()),
            _ => None,
        }
    }
}

/// A `pvc://<claim>/<path>` URI, split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PvcUri {
    pub claim: String,
    /// Path inside the claim, without leading or trailing `/` (empty for the claim's root).
    pub path: String,
}

impl PvcUri {
    /// `MODEL_PATH` for this model: where it appears inside the container.
    pub fn model_path(&self) -> String {
        if self.path.is_empty() {
            MODEL_MOUNT.to_string()
        } else {
            format!("{MODEL_MOUNT}/{}", self.path)
        }
    }
}

/// Parses a model URI. The schema checks the prefix and the claim's characters; this also refuses
/// what the regex lets through (a claim too long, `..` in the path).
pub fn parse_model_uri(uri: &str) -> Result<PvcUri, String> {
    let rest = uri
        .strip_prefix(PVC_SCHEME)
        .ok_or_else(|| format!("{uri:?} is not a pvc://<claim>/<path> URI"))?;
    let (claim, path) = rest.split_once('/').unwrap_or((rest, ""));
    if !is_dns_subdomain(claim) {
        return Err(format!(
            "{claim:?} is not a PersistentVolumeClaim name (lower-case letters, digits, '-' and '.', at most 253 characters)"
        ));
    }
    let mut segments = Vec::new();
    for s in path.split('/').filter(|s| !s.is_empty()) {
        if s == "." || s == ".." {
            return Err(format!(
                "the path {path:?} may not contain '.' or '..' segments"
            ));
        }
        segments.push(s);
    }
    Ok(PvcUri {
        claim: claim.to_string(),
        path: segments.join("/"),
    })
}

fn is_dns_subdomain(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !s.is_empty()
        && s.len() <= 253
        && s.chars().all(|c| alnum(c) || c == '-' || c == '.')
        && s.starts_with(alnum)
        && s.ends_with(alnum)
}

/// Checks what the schema checks too, so that a spec written before a CRD upgrade (or applied with
/// validation off) fails with a condition instead of producing clashing children.
fn validate(md: &ModelDeployment) -> Result<(), BuildError> {
    let variants = &md.spec.variants;
    if variants.is_empty() {
        return Err(BuildError::new(
            "NoVariants",
            "spec.variants",
            "at least one variant is needed",
        ));
    }
    let mut seen = BTreeSet::new();
    for (i, v) in variants.iter().enumerate() {
        if !seen.insert(v.name.as_str()) {
            return Err(BuildError::new(
                "DuplicateVariant",
                format!("spec.variants[{i}].name"),
                format!(
                    "variant name {:?} is used twice; variant names must be unique",
                    v.name
                ),
            ));
        }
        if router_kind(md) == RouterKind::Builtin && v.name == ROLE_ROUTER {
            return Err(BuildError::new(
                "ReservedVariantName",
                format!("spec.variants[{i}].name"),
                format!(
                    "with router: Builtin the name \"router\" is taken by the router Deployment {}; rename the variant",
                    variant_name(&md.metadata.name.clone().unwrap_or_default(), ROLE_ROUTER)
                ),
            ));
        }
        v.workload.check_resources(&format!("spec.variants[{i}]"))?;
        check_readiness(md, i, v)?;
        if let Some(a) = &v.autoscaling {
            let field = format!("spec.variants[{i}].autoscaling");
            if v.replicas.is_some() {
                return Err(BuildError::new(
                    "ReplicasWithAutoscaling",
                    format!("spec.variants[{i}].replicas"),
                    "replicas and autoscaling are exclusive: the autoscaler sets the count; remove replicas",
                ));
            }
            let min = a.min_replicas.unwrap_or(1);
            if min < 1 || a.max_replicas < min {
                return Err(BuildError::new(
                    "InvalidAutoscaling",
                    format!("{field}.minReplicas"),
                    format!(
                        "minReplicas {min} must be at least 1 and at most maxReplicas {}",
                        a.max_replicas
                    ),
                ));
            }
        }
        if !(0..=100).contains(&v.weight) {
            return Err(BuildError::new(
                "InvalidWeights",
                format!("spec.variants[{i}].weight"),
                "a weight is a percentage from 0 to 100",
            ));
        }
    }
    let sum: i32 = variants.iter().map(|v| v.weight).sum();
    if sum != 100 {
        return Err(BuildError::new(
            "InvalidWeights",
            "spec.variants",
            format!("the weights sum to {sum}; make them sum to 100"),
        ));
    }
    Ok(())
}

/// The readiness check must fit the protocol (the schema refuses the same).
fn check_readiness(md: &ModelDeployment, i: usize, v: &Variant) -> Result<(), BuildError> {
    let Some(r) = &v.readiness else {
        return Ok(());
    };
    let field = format!("spec.variants[{i}].readiness");
    match (protocol(md), r.http_get.is_some(), r.grpc.is_some()) {
        (_, true, true) => Err(BuildError::new(
            "InvalidReadiness",
            field,
            "readiness.httpGet and readiness.grpc are exclusive: keep the one the model server answers",
        )),
        (Protocol::Grpc, true, false) => Err(BuildError::new(
            "InvalidReadiness",
            format!("{field}.httpGet"),
            "an HTTP/1.1 check cannot probe a server of spec.protocol: GRPC; use readiness.grpc",
        )),
        (Protocol::Http, false, true) => Err(BuildError::new(
            "InvalidReadiness",
            format!("{field}.grpc"),
            "readiness.grpc needs spec.protocol: GRPC",
        )),
        _ => Ok(()),
    }
}

/// Builds the children of `md`. `router_image` runs the built-in router (`router: Builtin`);
/// `rollout` is the state of the variant that rolls out, whose step sets the weights asked for (see
/// [`super::rollout`]); `ready` holds the ready pods of each variant, which gate its traffic (see
/// [`super::gate`]); `router_key` is the router's sticky-hash key, used only when its Secret is made.
pub fn build(
    md: &ModelDeployment,
    owner: &Owner,
    router_image: &str,
    rollout: Option<&RolloutStatus>,
    ready: &ReadyPods,
    router_key: &str,
) -> Result<Children, BuildError> {
    validate(md)?;
    let variants = md
        .spec
        .variants
        .iter()
        .enumerate()
        .map(|(i, v)| build_variant(md, owner, i, v))
        .collect::<Result<Vec<_>, _>>()?;
    let kind = router_kind(md);
    let traffic = traffic::build(
        md,
        owner,
        router_image,
        &gate(md, &rollout::weights(md, rollout), ready).weights,
        router_key,
    )?;
    let proto = protocol(md);
    // The router's data port is named `http` whatever it speaks; the model pods' port is named by
    // the protocol.
    let (role, target) = if kind == RouterKind::Builtin {
        (ROLE_ROUTER, PORT_NAME)
    } else {
        (ROLE_MODEL, port_name(proto))
    };
    let mut entry = service(
        owner,
        &owner.name,
        role_selector(&owner.name, role),
        proto,
        target,
    );
    let mut annotations = BTreeMap::from([(
        ANNOTATION_ROUTER.to_string(),
        router_kind_name(kind).to_string(),
    )]);
    if proto == Protocol::Grpc {
        annotations.insert(ANNOTATION_PROTOCOL.to_string(), "GRPC".to_string());
    }
    entry.metadata.annotations = Some(annotations);
    Ok(Children {
        variants,
        entry,
        traffic,
    })
}

/// A ClusterIP Service on port 80 to the pods' port named `target`. The port is named by the
/// protocol (`http`, or `grpc` with `appProtocol: kubernetes.io/h2c`).
pub(crate) fn service(
    owner: &Owner,
    name: &str,
    selector: BTreeMap<String, String>,
    proto: Protocol,
    target: &str,
) -> Service {
    Service {
        metadata: owner.child_meta(name),
        spec: Some(ServiceSpec {
            selector: Some(selector),
            ports: Some(vec![ServicePort {
                name: Some(port_name(proto).into()),
                port: SERVICE_PORT,
                target_port: Some(IntOrString::String(target.into())),
                protocol: Some("TCP".into()),
                app_protocol: (proto == Protocol::Grpc).then(|| APP_PROTOCOL_H2C.into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn build_variant(
    md: &ModelDeployment,
    owner: &Owner,
    i: usize,
    v: &Variant,
) -> Result<VariantChildren, BuildError> {
    let port = md.spec.port.unwrap_or(DEFAULT_PORT);
    let name = variant_name(&owner.name, &v.name);
    let proto = protocol(md);
    let pname = port_name(proto);

    let mut main = MainContainer {
        name: CONTAINER,
        ports: vec![ContainerPort {
            name: Some(pname.into()),
            container_port: port,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }],
        readiness_probe: Some(readiness_probe(v, pname, port)),
        ..MainContainer::default()
    };
    if let Some(model) = &v.model {
        let field = format!("spec.variants[{i}].model.uri");
        let uri = parse_model_uri(&model.uri)
            .map_err(|m| BuildError::new("InvalidModelUri", field.clone(), m))?;
        if v.workload
            .volumes
            .iter()
            .flatten()
            .any(|vol| vol.name == MODEL_VOLUME || vol.mount_path == MODEL_MOUNT)
        {
            return Err(BuildError::new(
                "VolumeConflict",
                format!("spec.variants[{i}].volumes"),
                format!("a volume already uses the name {MODEL_VOLUME:?} or the path {MODEL_MOUNT}, where the model is mounted; rename or move that volume"),
            ));
        }
        main.env.push(env(MODEL_PATH_ENV, uri.model_path()));
        main.volumes.push(Volume {
            name: MODEL_VOLUME.into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: uri.claim,
                read_only: Some(true),
            }),
            ..Volume::default()
        });
        main.mounts.push(VolumeMount {
            name: MODEL_VOLUME.into(),
            mount_path: MODEL_MOUNT.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }

    let selector = variant_selector(&owner.name, &v.name);
    let mut labels = owner.labels();
    labels.insert(LABEL_VARIANT.into(), v.name.clone());
    labels.insert(LABEL_ROLE.into(), ROLE_MODEL.into());
    let mut template = pod_template(&v.workload, main, labels.clone());
    drain_on_stop(&mut template);

    let mut meta = owner.child_meta(&name);
    meta.labels = Some(labels.clone());
    if v.autoscaling.is_some() {
        meta.annotations = Some(BTreeMap::from([(
            ANNOTATION_AUTOSCALED.to_string(),
            "true".to_string(),
        )]));
    }
    let deployment = Deployment {
        metadata: meta,
        spec: Some(DeploymentSpec {
            // With autoscaling the field is left out, so that server-side apply leaves it to the
            // autoscaler (the reconciler hands the current count over first).
            replicas: v.autoscaling.is_none().then(|| replicas(v)),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                match_expressions: None,
            },
            template,
            // A new pod is ready before an old one goes: a rollout never drops capacity.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::String("25%".into())),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    };
    let autoscaler = v.autoscaling.as_ref().map(|a| {
        let mut meta = owner.child_meta(&name);
        meta.labels = Some(labels);
        HorizontalPodAutoscaler {
            metadata: meta,
            spec: Some(HorizontalPodAutoscalerSpec {
                scale_target_ref: CrossVersionObjectReference {
                    api_version: Some("apps/v1".into()),
                    kind: "Deployment".into(),
                    name: name.clone(),
                },
                min_replicas: Some(a.min_replicas.unwrap_or(1)),
                max_replicas: a.max_replicas,
                metrics: Some(vec![MetricSpec {
                    type_: "Resource".into(),
                    resource: Some(ResourceMetricSource {
                        name: "cpu".into(),
                        target: MetricTarget {
                            type_: "Utilization".into(),
                            average_utilization: Some(
                                a.target_cpu_utilization.unwrap_or(DEFAULT_TARGET_CPU),
                            ),
                            ..MetricTarget::default()
                        },
                    }),
                    ..MetricSpec::default()
                }]),
                behavior: None,
            }),
            status: None,
        }
    });
    let mut svc = service(owner, &name, selector, proto, pname);
    if let Some(l) = svc.metadata.labels.as_mut() {
        l.insert(LABEL_VARIANT.into(), v.name.clone());
    }
    Ok(VariantChildren {
        name: v.name.clone(),
        deployment,
        service: svc,
        autoscaler,
    })
}

/// The readiness probe of the model container: the variant's HTTP or gRPC check, or a TCP
/// connection to the serving port (named `port_name`, number `port`: a gRPC probe takes a number).
fn readiness_probe(v: &Variant, port_name: &str, port: i32) -> Probe {
    let http = v.readiness.as_ref().and_then(|r| r.http_get.as_ref());
    let grpc = v.readiness.as_ref().and_then(|r| r.grpc.as_ref());
    Probe {
        http_get: http.map(|h| HTTPGetAction {
            path: Some(h.path.clone()),
            port: h
                .port
                .map_or_else(|| IntOrString::String(port_name.into()), IntOrString::Int),
            ..HTTPGetAction::default()
        }),
        grpc: grpc.map(|g| GRPCAction {
            port: g.port.unwrap_or(port),
            service: g.service.clone().filter(|s| !s.is_empty()),
        }),
        tcp_socket: (http.is_none() && grpc.is_none()).then(|| TCPSocketAction {
            port: IntOrString::String(port_name.into()),
            host: None,
        }),
        period_seconds: Some(5),
        ..Probe::default()
    }
}

/// A pod that is told to stop keeps serving for [`PRESTOP_SECONDS`] (a `preStop` sleep, run by the
/// kubelet, so the image needs no shell) while its endpoint leaves the Services, then has
/// [`SHUTDOWN_SECONDS`] to finish in-flight requests. A `lifecycle` or a grace period in the user's
/// `template` wins; a shorter grace period shortens the pause to half of it.
fn drain_on_stop(template: &mut PodTemplateSpec) {
    let Some(spec) = template.spec.as_mut() else {
        return;
    };
    let grace = *spec
        .termination_grace_period_seconds
        .get_or_insert(PRESTOP_SECONDS + SHUTDOWN_SECONDS);
    let pause = PRESTOP_SECONDS.min(grace / 2);
    let Some(main) = spec.containers.first_mut() else {
        return;
    };
    if main.lifecycle.is_none() && pause > 0 {
        main.lifecycle = Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction { seconds: pause }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
#[path = "build_tests.rs"]
pub(crate) mod tests;
