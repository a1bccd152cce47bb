//! Kubernetes Events on each kind, as `kubectl events` shows them: a child created, a child deleted,
//! a failure (Warning) and the phase changes that are not a job's ordinary start.

use std::collections::BTreeSet;

use crate::support::*;

/// (type, reason) of the events regarding `kind/name` in `ns`.
fn events(ns: &Ns, kind: &str, name: &str) -> BTreeSet<(String, String)> {
    let out = ns.kubectl(&[
        "get",
        "events.events.k8s.io",
        "-o",
        "jsonpath={range .items[*]}{.regarding.kind}/{.regarding.name} {.type} {.reason}{\"\\n\"}{end}",
    ]);
    out.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let who = it.next()?;
            (who == format!("{kind}/{name}"))
                .then(|| Some((it.next()?.to_string(), it.next()?.to_string())))?
        })
        .collect()
}

async fn wait_events(ns: &Ns, kind: &str, name: &str, want: &[(&str, &str)]) {
    wait_for(
        &format!("events {want:?} on {kind}/{name}"),
        TIMEOUT,
        || async {
            let got = events(ns, kind, name);
            want.iter()
                .all(|(t, r)| got.contains(&(t.to_string(), r.to_string())))
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn every_kind_records_children_failures_and_phases() {
    operator();
    let ns = Ns::new("events");
    ns.volumes_for_examples();

    // Notebook: pod created, phase changes; suspend deletes the pod (Normal, reason Suspended).
    ns.apply(&example("notebook-cpu.yaml")).unwrap();
    wait_events(
        &ns,
        "Notebook",
        "scratch",
        &[("Normal", "PodCreated"), ("Normal", "PhaseChanged")],
    )
    .await;
    ns.kubectl(&[
        "patch",
        "notebook",
        "scratch",
        "--type=merge",
        "-p",
        r#"{"spec":{"suspend":true}}"#,
    ]);
    wait_events(&ns, "Notebook", "scratch", &[("Normal", "Suspended")]).await;
    // A spec the API server accepts but that cannot run: a Warning with the reason.
    ns.apply("apiVersion: keelson.dev/v1alpha1\nkind: Notebook\nmetadata: {name: clash}\nspec:\n  image: i\n  workspace: {size: 1Gi}\n  volumes:\n  - {name: home, mountPath: /home/jovyan, emptyDir: {}}\n").unwrap();
    wait_events(&ns, "Notebook", "clash", &[("Warning", "VolumeConflict")]).await;

    // TrainingJob: pods created (a job that starts has no Event but that one), and a failure past
    // backoffLimit as a Warning.
    ns.apply("apiVersion: keelson.dev/v1alpha1\nkind: TrainingJob\nmetadata: {name: once}\nspec:\n  image: trainer\n  framework: PyTorch\n  workers: 2\n  runPolicy: {backoffLimit: 0}\n").unwrap();
    wait_events(&ns, "TrainingJob", "once", &[("Normal", "PodCreated")]).await;
    wait_for("worker 0 running", TIMEOUT, || async {
        let phase = ns.kubectl(&[
            "get",
            "pod",
            "once-worker-0",
            "-o",
            "jsonpath={.status.phase}",
        ]);
        (phase == "Running").then_some(())
    })
    .await;
    exit_pod(&ns.name, "once-worker-0", 1);
    wait_for("a Warning event on the failed job", TIMEOUT, || async {
        events(&ns, "TrainingJob", "once")
            .iter()
            .any(|(t, _)| t == "Warning")
            .then_some(())
    })
    .await;

    // ModelDeployment: each child created; a removed variant's children deleted.
    ns.apply(&example("modeldeployment-ab.yaml")).unwrap();
    wait_events(&ns, "ModelDeployment", "fraud", &[("Normal", "Created")]).await;
    ns.kubectl(&[
        "patch",
        "modeldeployment",
        "fraud",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/spec/variants/1"},{"op":"replace","path":"/spec/variants/0/weight","value":100}]"#,
    ]);
    wait_events(&ns, "ModelDeployment", "fraud", &[("Normal", "Deleted")]).await;
}

/// The recorder folds a repeat into its Event's `series` (one merge patch the API server accepts),
/// keeps a different action apart, and starts a new Event when the series' Event is gone.
#[tokio::test]
async fn repeats_count_up_one_event_series() {
    use k8s_openapi::api::core::v1::ObjectReference;
    use k8s_openapi::api::events::v1::Event as K8sEvent;
    use keelson_operator::runtime::events::Recorder;
    use kube::api::{Api, DeleteParams, ListParams};
    use kube::runtime::events::{Event, EventType, Reporter};

    let ns = Ns::new("series");
    let client = client().await;
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "keelson".into(),
            instance: None,
        },
    );
    let regarding = ObjectReference {
        api_version: Some("keelson.dev/v1alpha1".into()),
        kind: Some("TrainingJob".into()),
        namespace: Some(ns.name.clone()),
        name: Some("job".into()),
        uid: Some("0f3c1c2e-0000-4000-8000-000000000001".into()),
        ..ObjectReference::default()
    };
    let ev = |action: &str| Event {
        type_: EventType::Normal,
        reason: "PhaseChanged".into(),
        note: Some(format!("phase is now {action}")),
        action: action.into(),
        secondary: None,
    };
    let api: Api<K8sEvent> = Api::namespaced(client, &ns.name);
    let listed = || async {
        let mut l: Vec<(String, String, Option<i32>)> = api
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|e| {
                (
                    e.metadata.name.unwrap_or_default(),
                    e.action.unwrap_or_default(),
                    e.series.map(|s| s.count),
                )
            })
            .collect();
        l.sort_by(|a, b| a.1.cmp(&b.1));
        l
    };

    for _ in 0..3 {
        recorder.publish(&ev("Running"), &regarding).await.unwrap();
    }
    recorder.publish(&ev("Pending"), &regarding).await.unwrap();
    let got = listed().await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!((got[0].1.as_str(), got[0].2), ("Pending", None), "{got:?}");
    assert_eq!(
        (got[1].1.as_str(), got[1].2),
        ("Running", Some(3)),
        "{got:?}"
    );

    // The Event deleted (as its TTL in etcd would): the next repeat makes a new one.
    api.delete(&got[1].0, &DeleteParams::default())
        .await
        .unwrap();
    recorder.publish(&ev("Running"), &regarding).await.unwrap();
    let again = listed().await;
    assert_eq!(again.len(), 2, "{again:?}");
    assert_ne!(again[1].0, got[1].0, "{again:?}");
    assert_eq!(again[1].2, None, "{again:?}");
}
