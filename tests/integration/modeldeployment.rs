//! ModelDeployments on the local cluster: per-variant Deployments and Services, status from the
//! Deployments, weight edits that restart nothing, router modes and their children.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::api::{ListParams, Patch, PatchParams};
use kube::Api;

use crate::support::*;
use keelson::api::conditions;
use keelson::modeldeployment::ModelDeployment;

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
        ["NAME", "READY", "TRAFFIC", "URL", "AGE"],
        "{table}"
    );
    assert!(table.contains("champion=90,challenger=10"), "{table}");

    // New weights: only routing changes. Same pods (model and router) before and after.
    let before = pod_uids(&pods, "fraud").await;
    assert_eq!(before.len(), 4, "{before:?}");
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

#[tokio::test]
async fn gateway_api_mode_without_its_crds_says_so() {
    operator();
    let ns = Ns::new("mdep-gw");
    let client = client().await;
    // Only meaningful where the Gateway API is not installed on the local cluster.
    if kubectl(
        &["get", "crd", "httproutes.gateway.networking.k8s.io"],
        None,
    )
    .status
    .success()
    {
        return;
    }
    ns.apply("apiVersion: keelson.dev/v1alpha1\nkind: ModelDeployment\nmetadata: {name: gw}\nspec:\n  variants: [{name: a, image: m:1, weight: 100}]\n  traffic:\n    router: GatewayAPI\n    gateway: {parentRefs: [{name: public}]}\n").unwrap();
    let mds: Api<ModelDeployment> = Api::namespaced(client, &ns.name);
    wait_for("GatewayAPIMissing", Duration::from_secs(60), || async {
        let md = mds.get("gw").await.ok()?;
        let c = conditions::find(&md.status.as_ref()?.conditions, "Ready")?.clone();
        (c.status == "False"
            && c.reason == "GatewayAPIMissing"
            && c.message.to_lowercase().contains("gateway api"))
        .then_some(())
    })
    .await;
}
