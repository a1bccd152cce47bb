//! Tests of the ModelDeployment builder: children per variant, validation, readiness probes and autoscaling.

use super::*;
use k8s_openapi::api::core::v1::PodSpec;
use keelson_api::modeldeployment::{
    Autoscaling, HttpReadiness, ModelDeploymentSpec, ModelSource, Readiness, Traffic as TrafficSpec,
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
