//! Kubernetes Events on each kind, as `kubectl events` shows them: a child created, a child deleted,
//! a failure (Warning) and each phase change.

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

    // TrainingJob: pods created, phase changes, and a failure past backoffLimit as a Warning.
    ns.apply("apiVersion: keelson.dev/v1alpha1\nkind: TrainingJob\nmetadata: {name: once}\nspec:\n  image: trainer\n  framework: PyTorch\n  workers: 2\n  runPolicy: {backoffLimit: 0}\n").unwrap();
    wait_events(
        &ns,
        "TrainingJob",
        "once",
        &[("Normal", "PodCreated"), ("Normal", "PhaseChanged")],
    )
    .await;
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
