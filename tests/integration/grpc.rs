//! ModelDeployments with `protocol: GRPC` on the local cluster: the settings that cannot work are
//! refused at `kubectl apply` naming the field; the children speak h2c (Service ports, router
//! config, gRPC readiness probe); and GatewayAPI mode writes a GRPCRoute, or says that its CRD is
//! missing.

use std::collections::BTreeMap;
use std::time::Duration;

use gateway_api::grpcroutes::GrpcRoute;
use gateway_api::httproutes::HttpRoute;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::{Patch, PatchParams};
use kube::{Api, CustomResourceExt};
use serde_json::{json, Value};

use crate::modeldeployment::{http_route_crd_installed, GatewayApiCrds};
use crate::support::*;
use keelson_api::conditions;
use keelson_api::modeldeployment::ModelDeployment;
use keelson_api::router_config::{RouterConfig, RouterProtocol, ROUTER_CONFIG_KEY};

fn grpc_md(name: &str, traffic: &str, variants: &str) -> String {
    format!(
        "apiVersion: keelson.dev/v1alpha1\nkind: ModelDeployment\nmetadata: {{name: {name}}}\nspec:\n  port: 9000\n  protocol: GRPC\n  variants:\n{variants}{traffic}"
    )
}

#[test]
fn grpc_settings_that_cannot_work_are_refused_naming_the_field() {
    let ns = Ns::new("grpc-invalid");
    let http_md = |variants: &str| {
        format!(
            "apiVersion: keelson.dev/v1alpha1\nkind: ModelDeployment\nmetadata: {{name: md}}\nspec:\n  variants:\n{variants}"
        )
    };
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            grpc_md(
                "md",
                "",
                "    - {name: a, image: i, weight: 100, readiness: {httpGet: {path: /ready}}}\n",
            ),
            vec![
                "spec.variants[].readiness.httpGet",
                "spec.protocol: GRPC",
                "readiness.grpc",
            ],
        ),
        (
            http_md("    - {name: a, image: i, weight: 100, readiness: {grpc: {service: s}}}\n"),
            vec!["spec.variants[].readiness.grpc needs spec.protocol: GRPC"],
        ),
        (
            grpc_md(
                "md",
                "",
                "    - {name: a, image: i, weight: 100, readiness: {grpc: {}, httpGet: {path: /r}}}\n",
            ),
            vec!["spec.variants[0].readiness", "readiness.httpGet and readiness.grpc are exclusive"],
        ),
        (
            grpc_md(
                "md",
                "  traffic: {mirror: {variant: a}}\n",
                "    - {name: a, image: i, weight: 100}\n",
            ),
            vec!["spec.traffic.mirror", "spec.protocol: GRPC", "GatewayAPI"],
        ),
        (
            grpc_md(
                "md",
                "  traffic: {router: None, mirror: {variant: a}}\n",
                "    - {name: a, image: i, weight: 100}\n",
            ),
            vec!["spec.traffic.mirror", "spec.protocol: GRPC"],
        ),
        (
            grpc_md(
                "md",
                "",
                "    - {name: a, image: i, weight: 100, readiness: {grpc: {port: 70000}}}\n",
            ),
            vec!["spec.variants[0].readiness.grpc.port"],
        ),
        (
            http_md("    - {name: a, image: i, weight: 100}\n")
                .replace("spec:\n", "spec:\n  protocol: gRPC\n"),
            vec!["spec.protocol", "\"HTTP\"", "\"GRPC\""],
        ),
    ];
    for (yaml, needles) in cases {
        refused(&ns, &yaml, &needles);
    }
    // The valid forms are accepted: a gRPC check, a mirror through a GRPCRoute, an HTTP check on
    // an HTTP ModelDeployment.
    ns.apply(&grpc_md(
        "ok",
        "  traffic: {router: GatewayAPI, mirror: {variant: a, percent: 5}, gateway: {parentRefs: [{name: public}]}}\n",
        "    - {name: a, image: i, weight: 100, readiness: {grpc: {port: 9001, service: fraud.v1.Scorer}}}\n",
    ))
    .unwrap();
    ns.apply(&http_md(
        "    - {name: a, image: i, weight: 100, readiness: {httpGet: {path: /ready}}}\n",
    ))
    .unwrap();
}

fn port_of(svc: &Service) -> Value {
    serde_json::to_value(&svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0]).unwrap()
}

#[tokio::test]
async fn grpc_children_speak_h2c_and_probe_over_grpc() {
    operator();
    let ns = Ns::new("grpc-children");
    let client = client().await;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let variants = "    - {name: champion, image: 'm:1', weight: 80, readiness: {grpc: {service: fraud.v1.Scorer}}}\n    - {name: challenger, image: 'm:2', weight: 20}\n";
    ns.apply(&grpc_md(
        "scorer",
        "  traffic: {stickyHeader: x-user-id}\n",
        variants,
    ))
    .unwrap();

    // The router config: every variant h2c, the sticky metadata kept, the gated weights once ready.
    let cfg = wait_for(
        "the router config at 80/20",
        Duration::from_secs(90),
        || async {
            let cm = cms.get_opt("scorer-router").await.ok()??;
            let cfg = RouterConfig::parse(cm.data.as_ref()?.get(ROUTER_CONFIG_KEY)?).ok()?;
            (cfg.weight("champion") == Some(80) && cfg.weight("challenger") == Some(20))
                .then_some(cfg)
        },
    )
    .await;
    assert!(
        cfg.variants
            .iter()
            .all(|v| v.protocol == RouterProtocol::H2c),
        "{cfg:?}"
    );
    assert_eq!(cfg.sticky_header.as_deref(), Some("x-user-id"));

    // Services: port grpc, appProtocol h2c; the entry Service to the router's data port.
    for (name, target) in [
        ("scorer", "http"),
        ("scorer-champion", "grpc"),
        ("scorer-challenger", "grpc"),
    ] {
        // The entry Service is applied after the router's config: wait for it.
        let svc = wait_for(name, Duration::from_secs(60), || async {
            svcs.get_opt(name).await.ok()?
        })
        .await;
        let p = port_of(&svc);
        assert_eq!(
            (&p["name"], &p["appProtocol"], &p["port"], &p["targetPort"]),
            (
                &json!("grpc"),
                &json!("kubernetes.io/h2c"),
                &json!(80),
                &json!(target)
            ),
            "{name}: {p}"
        );
    }

    // The model pods: port grpc, the gRPC probe where asked (the port defaults to spec.port), TCP
    // elsewhere.
    let container = |d: &Deployment| {
        serde_json::to_value(
            &d.spec
                .as_ref()
                .unwrap()
                .template
                .spec
                .as_ref()
                .unwrap()
                .containers[0],
        )
        .unwrap()
    };
    let champion = container(&deps.get("scorer-champion").await.unwrap());
    assert_eq!(
        champion["ports"],
        json!([{"name": "grpc", "containerPort": 9000, "protocol": "TCP"}])
    );
    assert_eq!(
        champion["readinessProbe"]["grpc"],
        json!({"port": 9000, "service": "fraud.v1.Scorer"})
    );
    assert!(champion["readinessProbe"].get("tcpSocket").is_none());
    let challenger = container(&deps.get("scorer-challenger").await.unwrap());
    assert_eq!(challenger["readinessProbe"]["tcpSocket"]["port"], "grpc");
    assert!(challenger["readinessProbe"].get("grpc").is_none());

    wait_for("scorer Ready", Duration::from_secs(90), || async {
        let md = mds.get("scorer").await.ok()?;
        let st = md.status.as_ref()?;
        (st.observed_generation == md.metadata.generation
            && conditions::is_true(&st.conditions, "Ready")
            && st.traffic.as_deref() == Some("champion=80,challenger=20"))
        .then_some(())
    })
    .await;

    // router: None: the entry Service goes to the model pods' grpc port.
    ns.apply(&grpc_md("scorer", "  traffic: {router: None}\n", variants))
        .unwrap();
    wait_for(
        "entry Service to the model pods",
        Duration::from_secs(60),
        || async {
            let svc = svcs.get("scorer").await.ok()?;
            let p = port_of(&svc);
            let sel = svc.spec.as_ref()?.selector.clone()?;
            (p["targetPort"] == "grpc"
                && p["appProtocol"] == "kubernetes.io/h2c"
                && sel.get("keelson.dev/role").map(String::as_str) == Some("model"))
            .then_some(())
        },
    )
    .await;
}

const GRPC_ROUTE_CRD: &str = "grpcroutes.gateway.networking.k8s.io";

fn grpc_route_crd_installed() -> bool {
    kubectl(&["get", "crd", GRPC_ROUTE_CRD], None)
        .status
        .success()
}

/// The GRPCRoute CRD (from the gateway-api crate's types) for the life of the guard; removed
/// afterwards when it was not there before. Taken while holding the Gateway API CRD lock.
struct GrpcRouteCrd {
    installed_here: bool,
}

impl GrpcRouteCrd {
    fn install(installed_before: bool) -> GrpcRouteCrd {
        let mut crd = GrpcRoute::crd();
        crd.metadata.annotations = Some(BTreeMap::from([(
            "api-approved.kubernetes.io".to_string(),
            "https://github.com/kubernetes-sigs/gateway-api/pull/3328".to_string(),
        )]));
        kubectl_ok(
            &[
                "apply",
                "--server-side",
                "--field-manager=keelson-tests",
                "-f",
                "-",
            ],
            Some(&serde_yaml::to_string(&crd).unwrap()),
        );
        wait_sync(Duration::from_secs(60), || {
            kubectl(
                &[
                    "get",
                    "crd",
                    GRPC_ROUTE_CRD,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type=='Established')].status}",
                ],
                None,
            )
            .stdout
                == b"True"
        });
        GrpcRouteCrd {
            installed_here: !installed_before,
        }
    }
}

impl Drop for GrpcRouteCrd {
    fn drop(&mut self) {
        if self.installed_here {
            let _ = kubectl(&["delete", "crd", GRPC_ROUTE_CRD, "--wait=false"], None);
        }
    }
}

fn gateway_grpc_md(weights: (i32, i32), protocol: &str) -> String {
    format!(
        "apiVersion: keelson.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: gw}}
spec:
  protocol: {protocol}
  variants:
    - {{name: champion, image: 'm:1', weight: {}}}
    - {{name: challenger, image: 'm:2', weight: {}}}
  traffic:
    router: GatewayAPI
    mirror: {{variant: challenger, percent: 20}}
    gateway: {{parentRefs: [{{name: public, namespace: infra, sectionName: grpc}}]}}
",
        weights.0, weights.1
    )
}

#[tokio::test]
async fn gateway_api_mode_with_grpc_writes_a_grpc_route_or_says_its_crd_is_missing() {
    operator();
    let lock = GatewayApiCrds::lock();
    let ns = Ns::new("grpc-gw");
    let client = client().await;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let routes: Api<GrpcRoute> = Api::namespaced(client.clone(), &ns.name);
    let http_routes: Api<HttpRoute> = Api::namespaced(client.clone(), &ns.name);
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);

    let grpc_before = grpc_route_crd_installed();
    ns.apply(&gateway_grpc_md((70, 30), "GRPC")).unwrap();
    if grpc_before {
        eprintln!(
            "{GRPC_ROUTE_CRD} is installed on this cluster: the missing-CRD case is not checked"
        );
    } else {
        wait_for("GatewayAPIMissing", Duration::from_secs(60), || async {
            let md = mds.get("gw").await.ok()?;
            let c = conditions::find(&md.status.as_ref()?.conditions, "Ready")?.clone();
            (c.status == "False"
                && c.reason == "GatewayAPIMissing"
                && c.message.contains("GRPCRoute")
                && c.message.contains("Builtin"))
            .then_some(())
        })
        .await;
    }

    let _grpc = GrpcRouteCrd::install(grpc_before);
    let _http = GatewayApiCrds::install(lock, http_route_crd_installed());
    mds.patch(
        "gw",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"test/poke": "1"}}})),
    )
    .await
    .unwrap();
    let rules = |a: i32, b: i32| {
        json!([{
            "backendRefs": [
                {"name": "gw-champion", "port": 80, "weight": a},
                {"name": "gw-challenger", "port": 80, "weight": b}
            ],
            "filters": [{
                "type": "RequestMirror",
                "requestMirror": {"backendRef": {"name": "gw-challenger", "port": 80}, "percent": 20}
            }]
        }])
    };
    let as_json = |r: &GrpcRoute| serde_json::to_value(r).unwrap();
    // Gated on ready pods, as the HTTPRoute is: 70/30 once both variants have one.
    let route = wait_for(
        "the GRPCRoute at 70/30",
        Duration::from_secs(90),
        || async {
            let r = routes.get_opt("gw").await.ok()??;
            (as_json(&r)["spec"]["rules"] == rules(70, 30)).then_some(r)
        },
    )
    .await;
    let v = as_json(&route);
    assert_eq!(
        (&v["apiVersion"], &v["kind"]),
        (&json!("gateway.networking.k8s.io/v1"), &json!("GRPCRoute"))
    );
    assert_eq!(
        v["spec"]["parentRefs"],
        json!([{"name": "public", "namespace": "infra", "sectionName": "grpc"}])
    );
    let md = mds.get("gw").await.unwrap();
    assert_eq!(
        v["metadata"]["ownerReferences"][0]["uid"],
        json!(md.metadata.uid)
    );
    assert!(http_routes.get_opt("gw").await.unwrap().is_none());
    assert!(deps.get_opt("gw-router").await.unwrap().is_none());
    wait_for(
        "status from the GRPCRoute",
        Duration::from_secs(60),
        || async {
            let md = mds.get("gw").await.ok()?;
            let st = md.status.as_ref()?;
            let c = conditions::find(&st.conditions, "Ready")?;
            (c.reason != "GatewayAPIMissing"
                && st.traffic.as_deref() == Some("champion=70,challenger=30"))
            .then_some(())
        },
    )
    .await;

    // A weight change rewrites the route.
    ns.apply(&gateway_grpc_md((40, 60), "GRPC")).unwrap();
    wait_for(
        "the GRPCRoute at 40/60",
        Duration::from_secs(60),
        || async {
            let r = routes.get_opt("gw").await.ok()??;
            (as_json(&r)["spec"]["rules"] == rules(40, 60)).then_some(())
        },
    )
    .await;

    // Settled: a reconcile of the unchanged world leaves the GRPCRoute alone (server defaults such
    // as backendRefs' kind and group are no difference).
    let settled = routes.get("gw").await.unwrap().metadata.resource_version;
    mds.patch(
        "gw",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"test/poke": "2"}}})),
    )
    .await
    .unwrap();
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        assert_eq!(
            routes.get("gw").await.unwrap().metadata.resource_version,
            settled,
            "a reconcile of an unchanged ModelDeployment rewrote its GRPCRoute"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Back to HTTP: the GRPCRoute goes, an HTTPRoute comes.
    ns.apply(&gateway_grpc_md((40, 60), "HTTP")).unwrap();
    wait_for(
        "GRPCRoute gone, HTTPRoute there",
        Duration::from_secs(60),
        || async {
            let g = routes.get_opt("gw").await.ok()?;
            let h = http_routes.get_opt("gw").await.ok()?;
            (g.is_none() && h.is_some()).then_some(())
        },
    )
    .await;

    // And GRPC again, then Builtin: each time the route of the other kind is swept.
    ns.apply(&gateway_grpc_md((40, 60), "GRPC")).unwrap();
    wait_for(
        "HTTPRoute gone, GRPCRoute there",
        Duration::from_secs(60),
        || async {
            let g = routes.get_opt("gw").await.ok()?;
            let h = http_routes.get_opt("gw").await.ok()?;
            (g.is_some() && h.is_none()).then_some(())
        },
    )
    .await;
    mds.patch(
        "gw",
        &PatchParams::default(),
        &Patch::Merge(
            json!({"spec": {"traffic": {"router": "Builtin", "gateway": null, "mirror": null}}}),
        ),
    )
    .await
    .unwrap();
    wait_for(
        "GRPCRoute gone, router there",
        Duration::from_secs(60),
        || async {
            let g = routes.get_opt("gw").await.ok()?;
            let d = deps.get_opt("gw-router").await.ok()?;
            (g.is_none() && d.is_some()).then_some(())
        },
    )
    .await;
}
