//! A Notebook's children, pod re-creation, suspend/resume, the token, and garbage collection.

use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod, Secret, Service};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::Api;

use crate::support::*;
use keelson_api::notebook::Notebook;

async fn ready(api: &Api<Notebook>, name: &str) -> Notebook {
    wait_for(&format!("notebook {name} Ready"), TIMEOUT, || async {
        let nb = api.get(name).await.ok()?;
        let st = nb.status.as_ref()?;
        (st.observed_generation == nb.metadata.generation
            && keelson_api::conditions::is_true(&st.conditions, "Ready"))
        .then_some(nb.clone())
    })
    .await
}

#[tokio::test]
async fn notebook_lifecycle_with_gpu_data_fabric_and_retained_workspace() {
    operator();
    let ns = Ns::new("nb");
    let client = client().await;
    ns.pv_for("alice-workspace", "10Gi");
    ns.apply(&example("notebook-gpu-datafabric.yaml")).unwrap();

    let nbs: Api<Notebook> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns.name);
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns.name);

    let nb = ready(&nbs, "alice").await;
    let st = nb.status.clone().unwrap();
    assert_eq!(
        st.url.as_deref(),
        Some(format!("http://alice.{}.svc.cluster.local:8888/", ns.name).as_str())
    );
    assert_eq!(st.token_secret.as_deref(), Some("alice-token"));
    assert_eq!(st.pod_name.as_deref(), Some("alice-0"));

    // The pod: on a GPU node, GPU limits, the data-fabric hostPath mount, the workspace, the token by reference.
    let pod = pods.get("alice-0").await.unwrap();
    let spec = pod.spec.clone().unwrap();
    let node: Node = Api::all(client.clone())
        .get(spec.node_name.as_deref().unwrap())
        .await
        .unwrap();
    assert!(
        node.metadata
            .name
            .as_deref()
            .unwrap()
            .starts_with("kwok-gpu-"),
        "landed on {:?}",
        node.metadata.name
    );
    let c = &spec.containers[0];
    assert_eq!(c.name, "notebook");
    assert_eq!(
        c.resources.as_ref().unwrap().limits.as_ref().unwrap()["nvidia.com/gpu"].0,
        "1"
    );
    let mounts = c.volume_mounts.clone().unwrap();
    assert!(mounts.iter().any(|m| m.mount_path == "/mapr/projects"));
    assert!(mounts
        .iter()
        .any(|m| m.mount_path == "/home/jovyan" && m.name == "workspace"));
    let vols = spec.volumes.clone().unwrap();
    assert_eq!(
        vols.iter()
            .find(|v| v.name == "projects")
            .unwrap()
            .host_path
            .as_ref()
            .unwrap()
            .path,
        "/mapr/cluster1/projects"
    );
    assert_eq!(
        spec.node_selector.as_ref().unwrap()["nvidia.com/gpu.product"],
        "NVIDIA-A100-SXM4-80GB"
    );
    let token_env = c
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "JUPYTER_TOKEN")
        .unwrap();
    assert!(token_env.value.is_none());
    assert_eq!(
        token_env
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap()
            .name,
        "alice-token"
    );

    // Service, token Secret, workspace PVC (bound, no owner reference under Retain).
    let svc = svcs.get("alice").await.unwrap();
    assert_eq!(svc.spec.unwrap().ports.unwrap()[0].port, 8888);
    let token = secrets.get("alice-token").await.unwrap().data.unwrap()["token"]
        .0
        .clone();
    assert!(token.len() >= 32);
    let token_text = String::from_utf8(token.clone()).unwrap();
    let status_text = serde_json::to_string(&nb.status).unwrap();
    assert!(
        !status_text.contains(&token_text),
        "the token must never reach the status"
    );
    let pvc = pvcs.get("alice-workspace").await.unwrap();
    assert!(pvc.metadata.owner_references.is_none());
    assert_eq!(pvc.status.unwrap().phase.as_deref(), Some("Bound"));
    let owner_ref = &pod.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner_ref.kind.as_str(), owner_ref.controller),
        ("Notebook", Some(true))
    );

    // Deleting the pod re-creates it; the token stays.
    let uid = pod.metadata.uid.clone().unwrap();
    pods.delete("alice-0", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("alice-0 re-created", TIMEOUT, || async {
        let p = pods.get("alice-0").await.ok()?;
        (p.metadata.uid.as_deref() != Some(uid.as_str()) && p.metadata.deletion_timestamp.is_none())
            .then_some(())
    })
    .await;
    ready(&nbs, "alice").await;

    // A pod that fails (exit 1) is replaced as well.
    let uid = pods.get("alice-0").await.unwrap().metadata.uid.unwrap();
    exit_pod(&ns.name, "alice-0", 1);
    wait_for("failed alice-0 replaced", TIMEOUT, || async {
        let p = pods.get("alice-0").await.ok()?;
        (p.metadata.uid.as_deref() != Some(uid.as_str())).then_some(())
    })
    .await;
    ready(&nbs, "alice").await;

    // Suspend stops the pod and keeps the workspace; resume brings it back with the same token.
    let pp = PatchParams::apply("test-user").force();
    let suspend = |on: bool| serde_json::json!({"apiVersion": "keelson.dev/v1alpha1", "kind": "Notebook", "spec": {"suspend": on}});
    nbs.patch(
        "alice",
        &PatchParams::default(),
        &Patch::Merge(suspend(true)),
    )
    .await
    .unwrap();
    wait_for("suspended", TIMEOUT, || async {
        let nb = nbs.get("alice").await.ok()?;
        let gone = pods.get_opt("alice-0").await.ok()?.is_none();
        let phase = nb.status.as_ref()?.phase;
        (gone
            && phase == Some(keelson_api::notebook::NotebookPhase::Suspended)
            && nb.status.as_ref()?.observed_generation == nb.metadata.generation)
            .then_some(())
    })
    .await;
    assert!(pvcs.get_opt("alice-workspace").await.unwrap().is_some());
    nbs.patch(
        "alice",
        &PatchParams::default(),
        &Patch::Merge(suspend(false)),
    )
    .await
    .unwrap();
    ready(&nbs, "alice").await;
    assert_eq!(
        secrets.get("alice-token").await.unwrap().data.unwrap()["token"].0,
        token,
        "the token never changes"
    );
    let _ = pp;

    // Deleting the Notebook: the real GC removes pod, Service and Secret; the Retain workspace stays.
    nbs.delete("alice", &DeleteParams::default()).await.unwrap();
    wait_for(
        "children garbage-collected",
        Duration::from_secs(90),
        || async {
            let pod_gone = pods.get_opt("alice-0").await.ok()?.is_none();
            let svc_gone = svcs.get_opt("alice").await.ok()?.is_none();
            let secret_gone = secrets.get_opt("alice-token").await.ok()?.is_none();
            (pod_gone && svc_gone && secret_gone).then_some(())
        },
    )
    .await;
    assert!(
        pvcs.get_opt("alice-workspace").await.unwrap().is_some(),
        "a Retain workspace outlives its Notebook"
    );
}

#[tokio::test]
async fn delete_policy_workspace_is_collected_and_bad_image_is_reported() {
    operator();
    let ns = Ns::new("nb2");
    let client = client().await;
    ns.pv_for("scratch-workspace", "5Gi");
    ns.apply(&example("notebook-cpu.yaml")).unwrap();
    let nbs: Api<Notebook> = Api::namespaced(client.clone(), &ns.name);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns.name);
    ready(&nbs, "scratch").await;
    let pvc = pvcs.get("scratch-workspace").await.unwrap();
    assert_eq!(pvc.metadata.owner_references.unwrap()[0].kind, "Notebook");

    // A workspace whose claim cannot bind: a condition with a reason, not a crash.
    ns.apply("apiVersion: keelson.dev/v1alpha1\nkind: Notebook\nmetadata: {name: nopv}\nspec:\n  image: i\n  workspace: {size: 1Gi}\n").unwrap();
    wait_for("WorkspacePending", TIMEOUT, || async {
        let nb = nbs.get("nopv").await.ok()?;
        let c = keelson_api::conditions::find(&nb.status.as_ref()?.conditions, "Ready")?.clone();
        (c.reason == "WorkspacePending" && c.message.contains("nopv-workspace")).then_some(())
    })
    .await;

    // Changing deletePolicy moves only the workspace's owner reference; the claim stays.
    let owned = |p: &PersistentVolumeClaim| {
        p.metadata
            .owner_references
            .as_ref()
            .is_some_and(|o| !o.is_empty())
    };
    // The default policy is Retain: no owner reference.
    assert!(!owned(&pvcs.get("nopv-workspace").await.unwrap()));
    let uid = pvcs.get("nopv-workspace").await.unwrap().metadata.uid;
    for (policy, want_owned) in [("Delete", true), ("Retain", false)] {
        ns.kubectl(&[
            "patch",
            "notebook",
            "nopv",
            "--type=merge",
            "-p",
            &format!("{{\"spec\":{{\"workspace\":{{\"deletePolicy\":\"{policy}\"}}}}}}"),
        ]);
        wait_for(
            &format!("workspace owner reference under {policy}"),
            TIMEOUT,
            || async {
                let p = pvcs.get("nopv-workspace").await.ok()?;
                (owned(&p) == want_owned && p.metadata.uid == uid).then_some(())
            },
        )
        .await;
    }

    nbs.delete("scratch", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "Delete workspace collected",
        Duration::from_secs(90),
        || async {
            let p = pvcs.get_opt("scratch-workspace").await.ok()?;
            (p.is_none() || p.unwrap().metadata.deletion_timestamp.is_some()).then_some(())
        },
    )
    .await;
}

use std::time::Duration;

fn lab(spec: &str) -> String {
    format!("apiVersion: keelson.dev/v1alpha1\nkind: Notebook\nmetadata: {{name: lab}}\nspec:\n  image: i\n{spec}")
}

async fn condition_of(
    nbs: &Api<Notebook>,
    name: &str,
    type_: &str,
) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    let nb = nbs.get(name).await.ok()?;
    let st = nb.status.as_ref()?;
    (st.observed_generation == nb.metadata.generation).then_some(())?;
    keelson_api::conditions::find(&st.conditions, type_).cloned()
}

/// The NetworkPolicy child: own namespace only by default, widened and narrowed by `spec.access`,
/// owned and collected with the Notebook. Bad timeouts and access rules naming nothing are refused.
/// A notebook whose activity cannot be read (kwok pods serve nothing) is never culled and says why;
/// a resumed culled notebook loses the culler's annotation.
#[tokio::test]
async fn notebook_network_policy_access_rules_and_idle_culling_refusals() {
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use serde_json::json;
    operator();
    let ns = Ns::new("nb-iso");
    let client = client().await;
    let nbs: Api<Notebook> = Api::namespaced(client.clone(), &ns.name);
    let nps: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);

    for (spec, needles) in [
        (
            "  idle: {timeout: 1m}\n",
            vec!["spec.idle.timeout", "at least 5m"],
        ),
        (
            "  idle: {timeout: 4m59s}\n",
            vec!["spec.idle.timeout", "at least 5m"],
        ),
        ("  idle: {timeout: soon}\n", vec!["spec.idle.timeout"]),
        (
            "  access: {allowFrom: {}}\n",
            vec!["spec.access.allowFrom", "must name at least one"],
        ),
        (
            "  access: {allowFrom: {namespaces: []}}\n",
            vec!["spec.access.allowFrom", "must name at least one"],
        ),
        (
            "  access: {allowFrom: {pods: [{matchLabels: {}}]}}\n",
            vec!["spec.access.allowFrom.pods[0].matchLabels"],
        ),
        (
            "  access: {egress: {}}\n",
            vec!["spec.access.egress", "must name at least one"],
        ),
        (
            "  access: {egress: {cidrs: [10.0.0.0]}}\n",
            vec!["spec.access.egress.cidrs", "CIDR"],
        ),
        (
            "  access: {gateway: {parentRefs: []}}\n",
            vec!["spec.access.gateway.parentRefs"],
        ),
    ] {
        refused(&ns, &lab(spec), &needles);
    }

    // Default: ingress from the own namespace only, egress open; owned by the Notebook.
    ns.apply(&lab("  idle: {timeout: 5m}\n")).unwrap();
    let np = wait_for("NetworkPolicy lab", TIMEOUT, || async {
        nps.get_opt("lab").await.ok()?
    })
    .await;
    let nb = nbs.get("lab").await.unwrap();
    let v = serde_json::to_value(&np).unwrap();
    assert_eq!(
        v["metadata"]["ownerReferences"][0]["uid"],
        json!(nb.metadata.uid)
    );
    assert_eq!(v["metadata"]["ownerReferences"][0]["controller"], true);
    assert_eq!(
        v["spec"]["podSelector"]["matchLabels"]["keelson.dev/owner-name"],
        "lab"
    );
    assert_eq!(v["spec"]["policyTypes"], json!(["Ingress"]));
    assert_eq!(
        v["spec"]["ingress"],
        json!([{"from": [{"podSelector": {}}]}])
    );
    // The pod the policy guards carries the labels it selects.
    let pod = wait_for("pod lab-0", TIMEOUT, || async {
        pods.get_opt("lab-0").await.ok()?
    })
    .await;
    let labels = pod.metadata.labels.unwrap();
    for (k, val) in v["spec"]["podSelector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(labels.get(k).map(String::as_str), val.as_str(), "{k}");
    }

    // Its activity cannot be read here (a kwok pod serves nothing): never culled, and the
    // condition says why.
    let c = wait_for(
        "IdleCulling ActivityUnknown",
        Duration::from_secs(60),
        || async {
            condition_of(&nbs, "lab", "IdleCulling")
                .await
                .filter(|c| c.reason == "ActivityUnknown")
        },
    )
    .await;
    assert_eq!(c.status, "False");
    assert!(
        c.message.contains("/api/status") && c.message.contains("not culled"),
        "{}",
        c.message
    );
    let nb = nbs.get("lab").await.unwrap();
    assert_eq!(
        nb.spec.suspend, None,
        "an unreadable notebook was suspended"
    );
    assert!(nb.status.as_ref().unwrap().last_activity.is_none());
    let token = String::from_utf8(
        Api::<Secret>::namespaced(client.clone(), &ns.name)
            .get("lab-token")
            .await
            .unwrap()
            .data
            .unwrap()["token"]
            .0
            .clone(),
    )
    .unwrap();
    assert!(!serde_json::to_string(&nb.status).unwrap().contains(&token));

    // Named namespaces, pods and a restricted egress.
    ns.apply(&lab(
        "  idle: {timeout: 5m}\n  access:\n    allowFrom:\n      namespaces: [ml-platform]\n      pods: [{matchLabels: {app: dash}, namespace: infra}, {matchLabels: {role: tester}}]\n    egress: {cidrs: [10.20.0.0/16], namespaces: [data]}\n",
    ))
    .unwrap();
    let sel = |n: &str| json!({"matchLabels": {"kubernetes.io/metadata.name": n}});
    let want_from = json!([
        {"podSelector": {}},
        {"namespaceSelector": sel("ml-platform")},
        {"podSelector": {"matchLabels": {"app": "dash"}}, "namespaceSelector": sel("infra")},
        {"podSelector": {"matchLabels": {"role": "tester"}}},
    ]);
    let v = wait_for("the widened policy", TIMEOUT, || async {
        let v = serde_json::to_value(nps.get("lab").await.ok()?).ok()?;
        (v["spec"]["ingress"][0]["from"] == want_from).then_some(v)
    })
    .await;
    assert_eq!(v["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    assert_eq!(
        v["spec"]["egress"],
        json!([
            {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]},
            {"to": [{"namespaceSelector": sel("data")}, {"ipBlock": {"cidr": "10.20.0.0/16"}}]},
        ])
    );
    // Back to the default: narrowed again.
    ns.apply(&lab("  idle: {timeout: 5m}\n")).unwrap();
    wait_for("the narrowed policy", TIMEOUT, || async {
        let v = serde_json::to_value(nps.get("lab").await.ok()?).ok()?;
        (v["spec"]["ingress"] == json!([{"from": [{"podSelector": {}}]}])
            && v["spec"].get("egress").is_none())
        .then_some(())
    })
    .await;

    // A notebook the culler suspended (its annotation with spec.suspend) says so; resumed with
    // suspend: false, the operator drops the annotation.
    nbs.patch(
        "lab",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {keelson_api::notebook::ANNOTATION_CULLED_AT: "2026-01-01T00:00:00Z"}}, "spec": {"suspend": true}})),
    )
    .await
    .unwrap();
    let c = wait_for("Ready IdleCulled", TIMEOUT, || async {
        condition_of(&nbs, "lab", "Ready")
            .await
            .filter(|c| c.reason == "IdleCulled")
    })
    .await;
    assert!(c.message.contains("spec.suspend to false"), "{}", c.message);
    wait_for("pod gone", TIMEOUT, || async {
        pods.get_opt("lab-0").await.ok()?.is_none().then_some(())
    })
    .await;
    nbs.patch(
        "lab",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"suspend": false}})),
    )
    .await
    .unwrap();
    wait_for("annotation removed on resume", TIMEOUT, || async {
        let nb = nbs.get("lab").await.ok()?;
        let gone = !nb
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key(keelson_api::notebook::ANNOTATION_CULLED_AT);
        (gone && pods.get_opt("lab-0").await.ok()?.is_some()).then_some(())
    })
    .await;

    // Deleting the Notebook collects its NetworkPolicy.
    nbs.delete("lab", &DeleteParams::default()).await.unwrap();
    wait_for(
        "NetworkPolicy collected",
        Duration::from_secs(90),
        || async { nps.get_opt("lab").await.ok()?.is_none().then_some(()) },
    )
    .await;
}

/// `spec.access.gateway`: a condition without the Gateway API; with its CRDs, an HTTPRoute to the
/// notebook's Service, the external URL in status, the Gateway's namespace let in; removed again
/// with the field.
#[tokio::test]
async fn notebook_gateway_access_writes_an_http_route_and_the_external_url() {
    use crate::modeldeployment::{http_route_crd_installed, GatewayApiCrds};
    use gateway_api::httproutes::HttpRoute;
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use serde_json::json;
    operator();
    let lock = GatewayApiCrds::lock();
    let ns = Ns::new("nb-gw");
    let client = client().await;
    let nbs: Api<Notebook> = Api::namespaced(client.clone(), &ns.name);
    let routes: Api<HttpRoute> = Api::namespaced(client.clone(), &ns.name);
    let nps: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns.name);
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let exposed = lab("  access:\n    gateway: {parentRefs: [{name: public, namespace: infra}], hostname: lab.example.com}\n");

    let installed_before = http_route_crd_installed();
    ns.apply(&exposed).unwrap();
    if installed_before {
        eprintln!(
            "the HTTPRoute CRD is installed on this cluster: the missing-CRD case is not checked"
        );
    } else {
        let c = wait_for("Exposed GatewayAPIMissing", TIMEOUT, || async {
            condition_of(&nbs, "lab", "Exposed")
                .await
                .filter(|c| c.reason == "GatewayAPIMissing")
        })
        .await;
        assert_eq!(c.status, "False");
        let nb = nbs.get("lab").await.unwrap();
        assert_eq!(
            nb.status.unwrap().url.unwrap(),
            format!("http://lab.{}.svc.cluster.local:8888/", ns.name)
        );
    }

    let _crds = GatewayApiCrds::install(lock, installed_before);
    nbs.patch(
        "lab",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"test/poke": "1"}}})),
    )
    .await
    .unwrap();
    let route = wait_for("the HTTPRoute", Duration::from_secs(60), || async {
        routes.get_opt("lab").await.ok()?
    })
    .await;
    let v = serde_json::to_value(&route).unwrap();
    let nb = nbs.get("lab").await.unwrap();
    assert_eq!(
        v["metadata"]["ownerReferences"][0]["uid"],
        json!(nb.metadata.uid)
    );
    assert_eq!(
        v["spec"]["parentRefs"],
        json!([{"name": "public", "namespace": "infra"}])
    );
    assert_eq!(v["spec"]["hostnames"], json!(["lab.example.com"]));
    assert_eq!(
        v["spec"]["rules"],
        json!([{"backendRefs": [{"name": "lab", "port": 8888}]}])
    );
    wait_for("external URL and Exposed", TIMEOUT, || async {
        let c = condition_of(&nbs, "lab", "Exposed").await?;
        let url = nbs.get("lab").await.ok()?.status?.url?;
        (c.status == "True" && url == "https://lab.example.com/").then_some(())
    })
    .await;
    // The Gateway's namespace may reach the notebook; the token is still what opens it (the pod
    // still reads JUPYTER_TOKEN from the Secret).
    let np = serde_json::to_value(nps.get("lab").await.unwrap()).unwrap();
    assert!(
        np["spec"]["ingress"][0]["from"]
            .as_array()
            .unwrap()
            .contains(&json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "infra"}}})),
        "{np}"
    );

    // Without spec.access.gateway: the route goes, the URL is the in-cluster one again.
    ns.apply(&lab("")).unwrap();
    wait_for("route removed", Duration::from_secs(60), || async {
        routes.get_opt("lab").await.ok()?.is_none().then_some(())
    })
    .await;
    wait_for("in-cluster URL", TIMEOUT, || async {
        let nb = nbs.get("lab").await.ok()?;
        let st = nb.status.as_ref()?;
        (st.observed_generation == nb.metadata.generation
            && st.url.as_deref()
                == Some(format!("http://lab.{}.svc.cluster.local:8888/", ns.name).as_str())
            && keelson_api::conditions::find(&st.conditions, "Exposed").is_none())
        .then_some(())
    })
    .await;
    let svc = svcs.get("lab").await.unwrap();
    assert!(!svc
        .metadata
        .annotations
        .unwrap_or_default()
        .contains_key("keelson.dev/exposed"));
}
