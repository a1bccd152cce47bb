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
