//! Tests of the traffic modes: the router config, the router Deployment, HTTPRoutes and GRPCRoutes.

use super::*;
use crate::modeldeployment::routes::{grpc_route_weights, route_weights};

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
use keelson_api::modeldeployment::{GatewayAttachment, Mirror, ParentRef, Traffic as TrafficSpec};
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

/// Checks a route of `fraud` in GatewayAPI mode, as the tests below build it: its kind, owner,
/// parents, the weights of champion and challenger, and a mirror of 25% to the challenger.
fn assert_route(route: &impl serde::Serialize, kind: &str, weights: [i32; 2]) {
    let v = serde_json::to_value(route).unwrap();
    assert_eq!(v["apiVersion"], "gateway.networking.k8s.io/v1");
    assert_eq!(v["kind"], kind);
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
                {"name": "fraud-champion", "port": 80, "weight": weights[0]},
                {"name": "fraud-challenger", "port": 80, "weight": weights[1]}
            ],
            "filters": [{
                "type": "RequestMirror",
                "requestMirror": {"backendRef": {"name": "fraud-challenger", "port": 80}, "percent": 25}
            }]
        }])
    );
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
    assert_route(&*route, "HTTPRoute", [90, 10]);
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
    // The weights given (the gated ones), not the spec's.
    assert_route(&*route, "GRPCRoute", [100, 0]);
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
