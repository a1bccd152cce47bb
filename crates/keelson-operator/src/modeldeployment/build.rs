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
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSpec;
    use keelson_api::modeldeployment::{
        Autoscaling, HttpReadiness, ModelDeploymentSpec, ModelSource, Readiness,
        Traffic as TrafficSpec,
    };
    use keelson_api::workload::{VolumeSpec, WorkloadSpec};

    /// The pod template's labels of a Deployment spec.
    pub(crate) fn template_labels(
        ds: &k8s_openapi::api::apps::v1::DeploymentSpec,
    ) -> &BTreeMap<String, String> {
        ds.template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap()
    }

    pub const IMAGE: &str = "ghcr.io/keelson/keelson:test";
    /// The router key the builder tests pass in.
    pub const TEST_KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// The children with no variant ready (so with the spec's weights).
    pub fn build(m: &ModelDeployment, owner: &Owner, image: &str) -> Result<Children, BuildError> {
        super::build(m, owner, image, None, &ReadyPods::new(), TEST_KEY)
    }

    pub fn variant(name: &str, weight: i32, replicas: Option<i32>) -> Variant {
        Variant {
            name: name.into(),
            replicas,
            weight,
            model: Some(ModelSource {
                uri: format!("pvc://models/fraud/{name}"),
            }),
            autoscaling: None,
            readiness: None,
            rollout: None,
            workload: WorkloadSpec {
                image: format!("ghcr.io/acme/fraud-server:{name}"),
                ..WorkloadSpec::default()
            },
        }
    }

    pub fn md(variants: Vec<Variant>, router: Option<RouterKind>) -> (ModelDeployment, Owner) {
        let mut md = ModelDeployment::new(
            "fraud",
            ModelDeploymentSpec {
                port: None,
                protocol: None,
                variants,
                traffic: router.map(|r| TrafficSpec {
                    router: Some(r),
                    ..TrafficSpec::default()
                }),
            },
        );
        md.metadata.namespace = Some("team-a".into());
        md.metadata.uid = Some("uid-md".into());
        md.metadata.generation = Some(4);
        let owner = Owner::of(&md).unwrap();
        (md, owner)
    }

    pub fn ab() -> Vec<Variant> {
        vec![
            variant("champion", 90, Some(2)),
            variant("challenger", 10, None),
        ]
    }

    fn pod_spec(d: &Deployment) -> &PodSpec {
        d.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    #[test]
    fn variant_deployment_and_service() {
        let (m, owner) = md(ab(), None);
        let c = build(&m, &owner, IMAGE).unwrap();
        assert_eq!(c.variants.len(), 2);
        let champ = &c.variants[0];
        let d = &champ.deployment;
        assert_eq!(d.metadata.name.as_deref(), Some("fraud-champion"));
        let ds = d.spec.as_ref().unwrap();
        assert_eq!(ds.replicas, Some(2));
        assert_eq!(
            c.variants[1].deployment.spec.as_ref().unwrap().replicas,
            Some(1)
        );
        let sel = ds.selector.match_labels.as_ref().unwrap();
        assert_eq!(sel.len(), 2);
        assert_eq!(sel["keelson.dev/owner-name"], "fraud");
        assert_eq!(sel["keelson.dev/variant"], "champion");
        let pl = template_labels(ds);
        assert!(sel.iter().all(|(k, v)| pl.get(k) == Some(v)));
        assert_eq!(pl["keelson.dev/role"], "model");
        assert_eq!(pl["app.kubernetes.io/managed-by"], "keelson");
        assert_eq!(pl["keelson.dev/owner-kind"], "ModelDeployment");

        let ps = pod_spec(d);
        let main = &ps.containers[0];
        assert_eq!(main.name, "model");
        assert_eq!(
            main.image.as_deref(),
            Some("ghcr.io/acme/fraud-server:champion")
        );
        let port = &main.ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.name.as_deref(), port.container_port),
            (Some("http"), 8080)
        );
        assert!(main.readiness_probe.as_ref().unwrap().tcp_socket.is_some());

        let svc = &champ.service;
        assert_eq!(svc.metadata.name.as_deref(), Some("fraud-champion"));
        let ss = svc.spec.as_ref().unwrap();
        assert_eq!(ss.selector.as_ref(), Some(sel));
        let sp = &ss.ports.as_ref().unwrap()[0];
        assert_eq!(sp.port, 80);
        assert_eq!(sp.target_port, Some(IntOrString::String("http".into())));

        for meta in [&d.metadata, &svc.metadata, &c.entry.metadata] {
            let r = &meta.owner_references.as_ref().unwrap()[0];
            assert_eq!((r.uid.as_str(), r.controller), ("uid-md", Some(true)));
            assert_eq!(
                meta.labels.as_ref().unwrap()["keelson.dev/owner-name"],
                "fraud"
            );
        }
    }

    #[test]
    fn port_is_configurable() {
        let (mut m, owner) = md(ab(), None);
        m.spec.port = Some(9000);
        let c = build(&m, &owner, IMAGE).unwrap();
        let main = &pod_spec(&c.variants[0].deployment).containers[0];
        assert_eq!(main.ports.as_ref().unwrap()[0].container_port, 9000);
    }

    #[test]
    fn pvc_model_is_mounted_read_only_with_model_path() {
        let (m, owner) = md(ab(), None);
        let c = build(&m, &owner, IMAGE).unwrap();
        let ps = pod_spec(&c.variants[1].deployment);
        let vol = ps
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "model")
            .unwrap();
        let pvc = vol.persistent_volume_claim.as_ref().unwrap();
        assert_eq!(
            (pvc.claim_name.as_str(), pvc.read_only),
            ("models", Some(true))
        );
        let main = &ps.containers[0];
        let mount = main
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == "model")
            .unwrap();
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            ("/mnt/models", Some(true))
        );
        let e = main
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == "MODEL_PATH")
            .unwrap();
        assert_eq!(e.value.as_deref(), Some("/mnt/models/fraud/challenger"));
    }

    #[test]
    fn no_model_means_no_mount() {
        let mut v = variant("only", 100, None);
        v.model = None;
        let (m, owner) = md(vec![v], None);
        let c = build(&m, &owner, IMAGE).unwrap();
        let ps = pod_spec(&c.variants[0].deployment);
        assert!(ps.volumes.is_none());
        assert!(ps.containers[0].env.is_none());
    }

    #[test]
    fn model_uris() {
        let ok = |u: &str| parse_model_uri(u).unwrap();
        assert_eq!(ok("pvc://models/fraud/v7").claim, "models");
        assert_eq!(
            ok("pvc://models/fraud/v7").model_path(),
            "/mnt/models/fraud/v7"
        );
        assert_eq!(ok("pvc://models").model_path(), "/mnt/models");
        assert_eq!(ok("pvc://models/").model_path(), "/mnt/models");
        assert_eq!(ok("pvc://my.claim//a//b/").path, "a/b");
        for bad in [
            "s3://bucket/x",
            "pvc://",
            "pvc:///path",
            "pvc://Models/x",
            "pvc://-x/y",
            "pvc://models/../etc",
            "pvc://models/a/./b",
        ] {
            assert!(parse_model_uri(bad).is_err(), "{bad}");
        }
        let mut vs = ab();
        vs[1].model = Some(ModelSource {
            uri: "pvc://models/../../etc".into(),
        });
        let (m, owner) = md(vs, None);
        let err = build(&m, &owner, IMAGE).unwrap_err();
        assert_eq!(err.reason, "InvalidModelUri");
        assert_eq!(err.field, "spec.variants[1].model.uri");
    }

    #[test]
    fn model_mount_conflict_is_a_spec_error() {
        let mut vs = ab();
        vs[0].workload.volumes = Some(vec![VolumeSpec {
            name: "scratch".into(),
            mount_path: "/mnt/models".into(),
            empty_dir: Some(Default::default()),
            ..VolumeSpec::default()
        }]);
        let (m, owner) = md(vs, None);
        let err = build(&m, &owner, IMAGE).unwrap_err();
        assert_eq!(err.reason, "VolumeConflict");
        assert_eq!(err.field, "spec.variants[0].volumes");
    }

    #[test]
    fn specs_the_schema_refuses_are_build_errors_too() {
        let cases: Vec<(Vec<Variant>, Option<RouterKind>, &str, &str)> = vec![
            (vec![], None, "NoVariants", "spec.variants"),
            (
                vec![variant("a", 50, None), variant("a", 50, None)],
                None,
                "DuplicateVariant",
                "spec.variants[1].name",
            ),
            (
                vec![variant("a", 50, None), variant("b", 40, None)],
                None,
                "InvalidWeights",
                "spec.variants",
            ),
            (
                vec![variant("router", 100, None)],
                None,
                "ReservedVariantName",
                "spec.variants[0].name",
            ),
        ];
        for (vs, router, reason, field) in cases {
            let (m, owner) = md(vs, router);
            let err = build(&m, &owner, IMAGE).unwrap_err();
            assert_eq!((err.reason, err.field.as_str()), (reason, field));
        }
        // "router" is only reserved when the built-in router runs.
        let (m, owner) = md(vec![variant("router", 100, None)], Some(RouterKind::None));
        assert!(build(&m, &owner, IMAGE).is_ok());
    }

    #[test]
    fn entry_service_selects_router_or_model_pods() {
        for (router, role) in [
            (None, "router"),
            (Some(RouterKind::Builtin), "router"),
            (Some(RouterKind::None), "model"),
        ] {
            let (m, owner) = md(ab(), router);
            let c = build(&m, &owner, IMAGE).unwrap();
            assert_eq!(c.entry.metadata.name.as_deref(), Some("fraud"));
            let s = c.entry.spec.as_ref().unwrap();
            let sel = s.selector.as_ref().unwrap();
            assert_eq!(sel["keelson.dev/role"], role, "{router:?}");
            assert_eq!(sel["keelson.dev/owner-name"], "fraud");
            assert_eq!(s.ports.as_ref().unwrap()[0].port, 80);
        }
        assert_eq!(
            url("fraud", "team-a"),
            "http://fraud.team-a.svc.cluster.local/"
        );
    }

    #[test]
    fn variants_roll_without_losing_capacity_and_drain_on_stop() {
        let (m, owner) = md(ab(), None);
        let c = build(&m, &owner, IMAGE).unwrap();
        let d = &c.variants[0].deployment;
        let strategy = d.spec.as_ref().unwrap().strategy.as_ref().unwrap();
        let ru = strategy.rolling_update.as_ref().unwrap();
        assert_eq!(ru.max_unavailable, Some(IntOrString::Int(0)));
        assert_eq!(ru.max_surge, Some(IntOrString::String("25%".into())));
        let ps = pod_spec(d);
        assert_eq!(ps.termination_grace_period_seconds, Some(40));
        let pre_stop = ps.containers[0]
            .lifecycle
            .as_ref()
            .unwrap()
            .pre_stop
            .as_ref()
            .unwrap();
        assert_eq!(pre_stop.sleep.as_ref().unwrap().seconds, 10);
        assert!(pre_stop.exec.is_none(), "no shell needed in the image");

        // A grace period in the template wins, and the pause fits in it.
        let mut vs = ab();
        vs[0].workload.template = Some(PodTemplateSpec {
            spec: Some(PodSpec {
                termination_grace_period_seconds: Some(6),
                ..PodSpec::default()
            }),
            ..PodTemplateSpec::default()
        });
        let (m, owner) = md(vs, None);
        let c = build(&m, &owner, IMAGE).unwrap();
        let ps = pod_spec(&c.variants[0].deployment);
        assert_eq!(ps.termination_grace_period_seconds, Some(6));
        let pre_stop = ps.containers[0]
            .lifecycle
            .as_ref()
            .unwrap()
            .pre_stop
            .as_ref();
        assert_eq!(pre_stop.unwrap().sleep.as_ref().unwrap().seconds, 3);
    }

    #[test]
    fn readiness_is_tcp_by_default_and_http_when_asked() {
        let mut vs = ab();
        vs[1].readiness = Some(Readiness {
            http_get: Some(HttpReadiness {
                path: "/v2/health/ready".into(),
                port: None,
            }),
            grpc: None,
        });
        let (m, owner) = md(vs.clone(), None);
        let c = build(&m, &owner, IMAGE).unwrap();
        let tcp = pod_spec(&c.variants[0].deployment).containers[0]
            .readiness_probe
            .clone()
            .unwrap();
        assert_eq!(
            tcp.tcp_socket.unwrap().port,
            IntOrString::String("http".into())
        );
        assert!(tcp.http_get.is_none());
        let http = pod_spec(&c.variants[1].deployment).containers[0]
            .readiness_probe
            .clone()
            .unwrap();
        assert!(http.tcp_socket.is_none());
        let get = http.http_get.unwrap();
        assert_eq!(get.path.as_deref(), Some("/v2/health/ready"));
        assert_eq!(get.port, IntOrString::String("http".into()));
        vs[1]
            .readiness
            .as_mut()
            .unwrap()
            .http_get
            .as_mut()
            .unwrap()
            .port = Some(9001);
        let (m, owner) = md(vs, None);
        let c = build(&m, &owner, IMAGE).unwrap();
        let probe = pod_spec(&c.variants[1].deployment).containers[0]
            .readiness_probe
            .clone()
            .unwrap();
        assert_eq!(probe.http_get.unwrap().port, IntOrString::Int(9001));
    }

    #[test]
    fn grpc_names_the_service_ports_grpc_with_h2c_and_probes_over_grpc() {
        use keelson_api::modeldeployment::GrpcReadiness;
        let mut vs = ab();
        vs[0].readiness = Some(Readiness {
            grpc: Some(GrpcReadiness {
                port: None,
                service: Some("fraud.v1.Scorer".into()),
            }),
            ..Readiness::default()
        });
        vs[1].readiness = Some(Readiness {
            grpc: Some(GrpcReadiness {
                port: Some(9001),
                service: None,
            }),
            ..Readiness::default()
        });
        for router in [RouterKind::Builtin, RouterKind::None] {
            let (mut m, owner) = md(vs.clone(), Some(router));
            m.spec.protocol = Some(Protocol::Grpc);
            m.spec.port = Some(9000);
            let c = build(&m, &owner, IMAGE).unwrap();
            for v in &c.variants {
                let sp = &v.service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
                assert_eq!(
                    (
                        sp.name.as_deref(),
                        sp.app_protocol.as_deref(),
                        sp.port,
                        sp.target_port.clone()
                    ),
                    (
                        Some("grpc"),
                        Some("kubernetes.io/h2c"),
                        80,
                        Some(IntOrString::String("grpc".into()))
                    )
                );
                let main = &pod_spec(&v.deployment).containers[0];
                let port = &main.ports.as_ref().unwrap()[0];
                assert_eq!(
                    (port.name.as_deref(), port.container_port),
                    (Some("grpc"), 9000)
                );
            }
            // The entry Service: to the router's data port (named http), or to the model pods.
            let entry = c.entry.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].clone();
            let target = if router == RouterKind::Builtin {
                "http"
            } else {
                "grpc"
            };
            assert_eq!(
                (
                    entry.name.as_deref(),
                    entry.app_protocol.as_deref(),
                    entry.target_port
                ),
                (
                    Some("grpc"),
                    Some("kubernetes.io/h2c"),
                    Some(IntOrString::String(target.into()))
                )
            );
            assert_eq!(
                c.entry.metadata.annotations.as_ref().unwrap()[ANNOTATION_PROTOCOL],
                "GRPC"
            );
            let probe = |i: usize| {
                pod_spec(&c.variants[i].deployment).containers[0]
                    .readiness_probe
                    .clone()
                    .unwrap()
            };
            let p0 = probe(0);
            assert!(p0.tcp_socket.is_none() && p0.http_get.is_none());
            let g = p0.grpc.unwrap();
            assert_eq!(
                (g.port, g.service.as_deref()),
                (9000, Some("fraud.v1.Scorer"))
            );
            let g = probe(1).grpc.unwrap();
            assert_eq!((g.port, g.service), (9001, None));
        }
        // Without a readiness check: TCP on the grpc port.
        let (mut m, owner) = md(ab(), None);
        m.spec.protocol = Some(Protocol::Grpc);
        let c = build(&m, &owner, IMAGE).unwrap();
        let p = pod_spec(&c.variants[0].deployment).containers[0]
            .readiness_probe
            .clone()
            .unwrap();
        assert_eq!(
            p.tcp_socket.unwrap().port,
            IntOrString::String("grpc".into())
        );
        assert!(p.grpc.is_none());
    }

    #[test]
    fn http_children_carry_no_grpc_marks() {
        let (m, owner) = md(ab(), None);
        let c = build(&m, &owner, IMAGE).unwrap();
        let mut http = m.clone();
        http.spec.protocol = Some(Protocol::Http);
        assert_eq!(build(&http, &owner, IMAGE).unwrap(), c);
        for s in c.variants.iter().map(|v| &v.service).chain([&c.entry]) {
            let sp = &s.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
            assert_eq!(
                (sp.name.as_deref(), sp.app_protocol.as_deref()),
                (Some("http"), None)
            );
        }
        assert!(!c
            .entry
            .metadata
            .annotations
            .as_ref()
            .unwrap()
            .contains_key(ANNOTATION_PROTOCOL));
    }

    #[test]
    fn readiness_that_does_not_fit_the_protocol_is_a_build_error_too() {
        use keelson_api::modeldeployment::GrpcReadiness;
        let http = || HttpReadiness {
            path: "/ready".into(),
            port: None,
        };
        let cases = [
            (
                Protocol::Grpc,
                Readiness {
                    http_get: Some(http()),
                    grpc: None,
                },
                "spec.variants[0].readiness.httpGet",
            ),
            (
                Protocol::Http,
                Readiness {
                    http_get: None,
                    grpc: Some(GrpcReadiness::default()),
                },
                "spec.variants[0].readiness.grpc",
            ),
            (
                Protocol::Grpc,
                Readiness {
                    http_get: Some(http()),
                    grpc: Some(GrpcReadiness::default()),
                },
                "spec.variants[0].readiness",
            ),
        ];
        for (protocol, readiness, field) in cases {
            let mut vs = ab();
            vs[0].readiness = Some(readiness);
            let (mut m, owner) = md(vs, None);
            m.spec.protocol = Some(protocol);
            let err = build(&m, &owner, IMAGE).unwrap_err();
            assert_eq!(
                (err.reason, err.field.as_str()),
                ("InvalidReadiness", field)
            );
        }
    }

    fn autoscaled(min: Option<i32>, max: i32) -> Variant {
        let mut v = variant("champion", 90, None);
        v.autoscaling = Some(Autoscaling {
            min_replicas: min,
            max_replicas: max,
            target_cpu_utilization: None,
        });
        v
    }

    #[test]
    fn autoscaling_makes_an_hpa_and_leaves_replicas_out() {
        let (m, owner) = md(
            vec![autoscaled(Some(2), 6), variant("challenger", 10, Some(3))],
            None,
        );
        let c = build(&m, &owner, IMAGE).unwrap();
        let d = &c.variants[0].deployment;
        assert_eq!(d.spec.as_ref().unwrap().replicas, None);
        assert_eq!(
            d.metadata.annotations.as_ref().unwrap()[ANNOTATION_AUTOSCALED],
            "true"
        );
        // Serialized without the field, so that server-side apply gives it up.
        let json = serde_json::to_value(d).unwrap();
        assert!(json["spec"].get("replicas").is_none());
        let hpa = c.variants[0].autoscaler.as_ref().unwrap();
        assert_eq!(hpa.metadata.name.as_deref(), Some("fraud-champion"));
        assert_eq!(
            hpa.metadata.owner_references.as_ref().unwrap()[0].uid,
            "uid-md"
        );
        let spec = hpa.spec.as_ref().unwrap();
        assert_eq!(
            (
                spec.scale_target_ref.kind.as_str(),
                spec.scale_target_ref.name.as_str(),
                spec.scale_target_ref.api_version.as_deref()
            ),
            ("Deployment", "fraud-champion", Some("apps/v1"))
        );
        assert_eq!((spec.min_replicas, spec.max_replicas), (Some(2), 6));
        let metric = &spec.metrics.as_ref().unwrap()[0];
        let res = metric.resource.as_ref().unwrap();
        assert_eq!(
            (metric.type_.as_str(), res.name.as_str()),
            ("Resource", "cpu")
        );
        assert_eq!(res.target.average_utilization, Some(80));
        // The other variant keeps its replicas and has no autoscaler.
        assert_eq!(c.variants[1].autoscaler, None);
        assert_eq!(
            c.variants[1].deployment.spec.as_ref().unwrap().replicas,
            Some(3)
        );
        assert!(c.variants[1].deployment.metadata.annotations.is_none());
        assert_eq!(
            c.autoscaler_names().into_iter().collect::<Vec<_>>(),
            ["fraud-champion"]
        );
    }

    #[test]
    fn autoscaling_the_schema_refuses_is_a_build_error_too() {
        let mut both = autoscaled(None, 3);
        both.replicas = Some(2);
        let cases = [
            (both, "ReplicasWithAutoscaling", "spec.variants[0].replicas"),
            (
                autoscaled(Some(5), 3),
                "InvalidAutoscaling",
                "spec.variants[0].autoscaling.minReplicas",
            ),
        ];
        for (v, reason, field) in cases {
            let (m, owner) = md(vec![v, variant("challenger", 10, None)], None);
            let err = build(&m, &owner, IMAGE).unwrap_err();
            assert_eq!((err.reason, err.field.as_str()), (reason, field));
        }
    }
}
