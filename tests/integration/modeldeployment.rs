//! ModelDeployments on the local cluster: per-variant Deployments and Services, status from the
//! Deployments, weight edits that restart nothing, router modes and their children.

use std::collections::BTreeMap;
use std::time::Duration;

use gateway_api::httproutes::HttpRoute;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, CustomResourceExt};
use serde_json::json;

use crate::support::*;
use keelson_api::conditions;
use keelson_api::modeldeployment::ModelDeployment;

async fn ready(api: &Api<ModelDeployment>, name: &str) -> ModelDeployment {
    wait_for(
        &format!("{name} Ready"),
        Duration::from_secs(90),
        || async {
            let md = api.get(name).await.ok()?;
            let st = md.status.as_ref()?;
            (st.observed_generation == md.metadata.generation
                && conditions::is_true(&st.conditions, "Ready"))
            .then_some(md.clone())
        },
    )
    .await
}

async fn pod_uids(pods: &Api<Pod>, md: &str) -> BTreeMap<String, String> {
    let lp = ListParams::default().labels(&format!("keelson.dev/owner-name={md}"));
    pods.list(&lp)
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| (p.metadata.name.unwrap(), p.metadata.uid.unwrap()))
        .collect()
}

#[tokio::test]
async fn ab_split_variants_status_and_weight_edits_restart_nothing() {
    operator();
    let ns = Ns::new("mdep");
    let client = client().await;
    ns.pv_for("models", "10Gi");
    ns.apply(&example("modeldeployment-ab.yaml")).unwrap();
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);

    let md = ready(&mds, "fraud").await;
    let st = md.status.clone().unwrap();
    assert_eq!(
        st.url.as_deref(),
        Some(format!("http://fraud.{}.svc.cluster.local/", ns.name).as_str())
    );
    let v: BTreeMap<_, _> = st
        .variants
        .iter()
        .map(|v| (v.name.as_str(), (v.replicas, v.ready_replicas, v.weight)))
        .collect();
    assert_eq!(v["champion"], (2, 2, 90));
    assert_eq!(v["challenger"], (1, 1, 10));
    assert_eq!(st.traffic.as_deref(), Some("champion=90,challenger=10"));

    // Per variant: a Deployment and a Service; the model mounted read-only with MODEL_PATH.
    for (variant, path) in [("champion", "fraud/v7"), ("challenger", "fraud/v8")] {
        let d = deps.get(&format!("fraud-{variant}")).await.unwrap();
        let c = &d
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0];
        let model_path = c
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "MODEL_PATH")
            .unwrap()
            .value
            .clone()
            .unwrap();
        assert!(model_path.ends_with(path), "{model_path}");
        assert!(c
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.read_only == Some(true)));
        svcs.get(&format!("fraud-{variant}")).await.unwrap();
    }
    svcs.get("fraud").await.unwrap();
    let cfg = cms.get("fraud-router").await.unwrap();
    assert!(cfg.data.unwrap().values().any(|c| c.contains("x-user-id")));
    deps.get("fraud-router").await.unwrap();

    // The READY and TRAFFIC columns, from the real kubectl.
    let table = ns.kubectl(&["get", "mdep", "fraud"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "READY", "TRAFFIC", "ROLLOUT", "URL", "AGE"],
        "{table}"
    );
    assert!(table.contains("champion=90,challenger=10"), "{table}");

    // New weights: only routing changes. Same pods (model and router) before and after.
    let before = pod_uids(&pods, "fraud").await;
    assert_eq!(before.len(), 4, "{before:?}");
    // The model Deployments' generations (the router Deployment's independence from the weights is
    // a unit test of the builder: on this shared cluster an operator of another build may write it).
    let generations = |d: Vec<Deployment>| -> BTreeMap<String, Option<i64>> {
        d.into_iter()
            .map(|d| (d.metadata.name.unwrap(), d.metadata.generation))
            .collect()
    };
    let lp = ListParams::default().labels("keelson.dev/owner-name=fraud,keelson.dev/role=model");
    let generations_before = generations(deps.list(&lp).await.unwrap().items);
    assert_eq!(generations_before.len(), 2, "{generations_before:?}");
    let patch = serde_json::json!({"spec": {"variants": [{"name": "champion", "weight": 50}, {"name": "challenger", "weight": 50}]}});
    mds.patch("fraud", &PatchParams::apply("test-user").force(), &Patch::Apply(&serde_json::json!({
        "apiVersion": "keelson.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "fraud"},
        "spec": {"port": 8080, "traffic": {"router": "Builtin", "stickyHeader": "x-user-id"}, "variants": [
            {"name": "champion", "image": "ghcr.io/acme/fraud-server:2.3", "replicas": 2, "weight": 50, "model": {"uri": "pvc://models/fraud/v7"}, "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}},
            {"name": "challenger", "image": "ghcr.io/acme/fraud-server:2.4", "weight": 50, "model": {"uri": "pvc://models/fraud/v8"}}
        ]}
    }))).await.unwrap_or_else(|_| panic!("{patch}"));
    let md = wait_for(
        "weights 50/50 in effect",
        Duration::from_secs(60),
        || async {
            let md = mds.get("fraud").await.ok()?;
            let st = md.status.as_ref()?;
            (st.observed_generation == md.metadata.generation
                && st.traffic.as_deref() == Some("champion=50,challenger=50"))
            .then_some(md.clone())
        },
    )
    .await;
    assert!(conditions::is_true(&md.status.unwrap().conditions, "Ready"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        pod_uids(&pods, "fraud").await,
        before,
        "a weight change restarted a pod"
    );
    // The change went to the router's config, and to no model Deployment.
    let config: serde_json::Value =
        serde_json::from_str(&cms.get("fraud-router").await.unwrap().data.unwrap()["config.json"])
            .unwrap();
    let weights: Vec<_> = config["variants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["weight"].as_u64().unwrap())
        .collect();
    assert_eq!(weights, [50, 50], "{config}");
    assert_eq!(
        generations(deps.list(&lp).await.unwrap().items),
        generations_before,
        "a weight change rewrote a Deployment"
    );

    // Router mode None: the router's children go, the entry Service selects every variant's pods.
    mds.patch(
        "fraud",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"traffic": {"router": "None"}}})),
    )
    .await
    .unwrap();
    wait_for(
        "router children removed",
        Duration::from_secs(60),
        || async {
            let d = deps.get_opt("fraud-router").await.ok()?;
            let c = cms.get_opt("fraud-router").await.ok()?;
            (d.is_none() && c.is_none()).then_some(())
        },
    )
    .await;
    let sel = svcs
        .get("fraud")
        .await
        .unwrap()
        .spec
        .unwrap()
        .selector
        .unwrap();
    assert!(!sel.values().any(|v| v == "router"), "{sel:?}");
    ready(&mds, "fraud").await;

    // Removing a variant removes its Deployment and Service.
    mds.patch("fraud", &PatchParams::default(), &Patch::Merge(serde_json::json!({"spec": {"variants": [
        {"name": "champion", "image": "ghcr.io/acme/fraud-server:2.3", "replicas": 2, "weight": 100, "model": {"uri": "pvc://models/fraud/v7"}}
    ]}}))).await.unwrap();
    wait_for("challenger swept", Duration::from_secs(60), || async {
        let d = deps.get_opt("fraud-challenger").await.ok()?;
        let s = svcs.get_opt("fraud-challenger").await.ok()?;
        (d.is_none() && s.is_none()).then_some(())
    })
    .await;
}

/// The Gateway API HTTPRoute CRD, generated from the `gateway-api` crate's types.
fn http_route_crd_yaml() -> String {
    let mut crd = HttpRoute::crd();
    // The API server refuses a CRD in a *.k8s.io group without this annotation (the upstream
    // manifests carry the same).
    crd.metadata.annotations = Some(BTreeMap::from([(
        "api-approved.kubernetes.io".to_string(),
        "https://github.com/kubernetes-sigs/gateway-api/pull/3328".to_string(),
    )]));
    serde_yaml::to_string(&crd).unwrap()
}

const HTTP_ROUTE_CRD: &str = "httproutes.gateway.networking.k8s.io";

pub(crate) fn http_route_crd_installed() -> bool {
    kubectl(&["get", "crd", HTTP_ROUTE_CRD], None)
        .status
        .success()
}

/// Installs the HTTPRoute CRD for the life of the guard, and removes it afterwards when it was not
/// there before, so that the next run sees a cluster without the Gateway API again. A file lock
/// next to the cluster's kubeconfig keeps concurrent test runs on this shared cluster from
/// installing and removing it under each other.
pub(crate) struct GatewayApiCrds {
    _lock: std::fs::File,
    installed_here: bool,
}

impl GatewayApiCrds {
    pub(crate) fn lock() -> std::fs::File {
        let f = std::fs::File::create(root().join("target/cluster/gateway-api-crds.lock")).unwrap();
        f.lock().unwrap();
        f
    }

    pub(crate) fn install(lock: std::fs::File, installed_before: bool) -> GatewayApiCrds {
        kubectl_ok(
            &[
                "apply",
                "--server-side",
                "--field-manager=keelson-tests",
                "-f",
                "-",
            ],
            Some(&http_route_crd_yaml()),
        );
        wait_sync(Duration::from_secs(60), || {
            kubectl(
                &[
                    "get",
                    "crd",
                    HTTP_ROUTE_CRD,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type=='Established')].status}",
                ],
                None,
            )
            .stdout
                == b"True"
        });
        GatewayApiCrds {
            _lock: lock,
            installed_here: !installed_before,
        }
    }
}

impl Drop for GatewayApiCrds {
    fn drop(&mut self) {
        if self.installed_here {
            let _ = kubectl(&["delete", "crd", HTTP_ROUTE_CRD, "--wait=false"], None);
        }
    }
}

fn gateway_md(weights: (i32, i32), mirror_percent: i32) -> String {
    format!(
        "apiVersion: keelson.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: gw}}
spec:
  variants:
    - {{name: champion, image: 'm:1', weight: {}}}
    - {{name: challenger, image: 'm:2', weight: {}}}
  traffic:
    router: GatewayAPI
    mirror: {{variant: challenger, percent: {mirror_percent}}}
    gateway: {{parentRefs: [{{name: public, namespace: infra, sectionName: http}}]}}
",
        weights.0, weights.1
    )
}

#[tokio::test]
async fn gateway_api_mode_says_when_its_crds_are_missing_and_writes_the_http_route_when_present() {
    operator();
    let lock = GatewayApiCrds::lock();
    let ns = Ns::new("mdep-gw");
    let client = client().await;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let routes: Api<HttpRoute> = Api::namespaced(client.clone(), &ns.name);
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);

    // Without the Gateway API CRDs: a clear condition that names them and the alternatives.
    let installed_before = http_route_crd_installed();
    ns.apply(&gateway_md((70, 30), 20)).unwrap();
    if installed_before {
        eprintln!(
            "{HTTP_ROUTE_CRD} is installed on this cluster: the missing-CRD case is not checked"
        );
    } else {
        wait_for("GatewayAPIMissing", Duration::from_secs(60), || async {
            let md = mds.get("gw").await.ok()?;
            let c = conditions::find(&md.status.as_ref()?.conditions, "Ready")?.clone();
            (c.status == "False"
                && c.reason == "GatewayAPIMissing"
                && c.message.to_lowercase().contains("gateway api")
                && c.message.contains("Builtin"))
            .then_some(())
        })
        .await;
    }

    // With the CRD (generated from the gateway-api crate's types) installed, a change of the
    // ModelDeployment writes the HTTPRoute.
    let _crds = GatewayApiCrds::install(lock, installed_before);
    mds.patch(
        "gw",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"test/poke": "1"}}})),
    )
    .await
    .unwrap();
    let route_json = |r: &HttpRoute| serde_json::to_value(r).unwrap();
    let expected_rules = |a: i32, b: i32| {
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
    // Traffic is gated on ready pods: the route carries 70/30 once both variants have one.
    let route = wait_for(
        "the HTTPRoute at 70/30",
        Duration::from_secs(60),
        || async {
            let r = routes.get_opt("gw").await.ok()??;
            (route_json(&r)["spec"]["rules"] == expected_rules(70, 30)).then_some(r)
        },
    )
    .await;
    let v = route_json(&route);
    assert_eq!(v["apiVersion"], "gateway.networking.k8s.io/v1");
    assert_eq!(
        v["spec"]["parentRefs"],
        json!([{"name": "public", "namespace": "infra", "sectionName": "http"}])
    );
    assert_eq!(v["spec"]["rules"], expected_rules(70, 30), "{v}");
    let md = mds.get("gw").await.unwrap();
    assert_eq!(
        v["metadata"]["ownerReferences"][0]["uid"],
        json!(md.metadata.uid)
    );
    // Status: the weights in effect, read back from the route; no GatewayAPIMissing any more.
    wait_for("status from the route", Duration::from_secs(60), || async {
        let md = mds.get("gw").await.ok()?;
        let st = md.status.as_ref()?;
        let c = conditions::find(&st.conditions, "Ready")?;
        (c.reason != "GatewayAPIMissing"
            && st.traffic.as_deref() == Some("champion=70,challenger=30"))
        .then_some(())
    })
    .await;
    // GatewayAPI mode runs no router: no router Deployment, no ConfigMap.
    assert!(deps.get_opt("gw-router").await.unwrap().is_none());
    assert!(cms.get_opt("gw-router").await.unwrap().is_none());

    // A weight change rewrites the route only: the model pods stay.
    let before = pod_uids(&pods, "gw").await;
    ns.apply(&gateway_md((40, 60), 20)).unwrap();
    wait_for("the route at 40/60", Duration::from_secs(60), || async {
        let r = routes.get_opt("gw").await.ok()??;
        (route_json(&r)["spec"]["rules"] == expected_rules(40, 60)).then_some(())
    })
    .await;
    wait_for("status at 40/60", Duration::from_secs(60), || async {
        let md = mds.get("gw").await.ok()?;
        (md.status?.traffic.as_deref() == Some("champion=40,challenger=60")).then_some(())
    })
    .await;
    assert_eq!(
        pod_uids(&pods, "gw").await,
        before,
        "a weight change restarted a pod"
    );

    // Switching to Builtin removes the route and brings the router's children.
    mds.patch(
        "gw",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"traffic": {"router": "Builtin", "gateway": null}}})),
    )
    .await
    .unwrap();
    wait_for(
        "route gone, router there",
        Duration::from_secs(60),
        || async {
            let r = routes.get_opt("gw").await.ok()?;
            let d = deps.get_opt("gw-router").await.ok()?;
            let c = cms.get_opt("gw-router").await.ok()?;
            (r.is_none() && d.is_some() && c.is_some()).then_some(())
        },
    )
    .await;
}
