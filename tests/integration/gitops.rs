//! GitOps fidelity on the local cluster: examples applied server-side the way Argo CD does, then
//! applied again, change nothing and show no `kubectl diff`; Flux's reading of status (kstatus, see
//! crates/keelson-testkit/src/kstatus.rs) follows observedGeneration and Ready; and the real `kubectl wait
//! --for=condition=Ready` returns for every kind.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::support::kstatus::{self, Status};
use crate::support::*;

/// The field manager Argo CD applies with when `ServerSideApply=true`.
const MANAGER: &str = "argocd-controller";
const KEELSON: &str = "notebooks.keelson.dev,trainingjobs.keelson.dev,modeldeployments.keelson.dev";

/// Every Keelson object of the namespace, by `Kind/name`.
fn keelson_objects(ns: &Ns) -> BTreeMap<String, Value> {
    let list: Value =
        serde_json::from_str(&ns.kubectl(&["get", KEELSON, "--show-managed-fields", "-o", "json"]))
            .unwrap();
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                format!(
                    "{}/{}",
                    o["kind"].as_str().unwrap(),
                    o["metadata"]["name"].as_str().unwrap()
                ),
                o.clone(),
            )
        })
        .collect()
}

fn ready(o: &Value) -> bool {
    o["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// Reconciled: the current generation observed, and Ready (a suspended TrainingJob: Suspended).
fn settled(o: &Value) -> bool {
    let observed = o["status"]["observedGeneration"].as_i64().is_some()
        && o["status"]["observedGeneration"] == o["metadata"]["generation"];
    let suspended_job = o["kind"] == "TrainingJob" && o["status"]["phase"] == "Suspended";
    observed && (ready(o) || suspended_job)
}

/// (generation, resourceVersion) of every Keelson object.
fn versions(objs: &BTreeMap<String, Value>) -> BTreeMap<String, (i64, String)> {
    objs.iter()
        .map(|(k, o)| {
            (
                k.clone(),
                (
                    o["metadata"]["generation"].as_i64().unwrap(),
                    o["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                ),
            )
        })
        .collect()
}

/// Polls until `versions` stay the same for `quiet` in a row; returns them.
async fn quiet_versions(ns: &Ns, quiet: Duration) -> BTreeMap<String, (i64, String)> {
    let mut last = versions(&keelson_objects(ns));
    let mut since = std::time::Instant::now();
    let start = std::time::Instant::now();
    loop {
        tokio::time::sleep(POLL).await;
        let now = versions(&keelson_objects(ns));
        if now != last {
            last = now;
            since = std::time::Instant::now();
        } else if since.elapsed() >= quiet {
            return last;
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "Keelson objects kept changing: {last:?}"
        );
    }
}

/// The documents of an example file, as JSON.
fn documents(file: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(&example(file))
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .map(|v| serde_json::to_value(v).unwrap())
        .collect()
}

/// Managers other than `MANAGER` that own a field under `spec`.
fn spec_owners(o: &Value) -> Vec<String> {
    o["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["manager"] != MANAGER && m["fieldsV1"].get("f:spec").is_some())
        .map(|m| format!("{} ({})", m["manager"], m["operation"]))
        .collect()
}

fn apply_file(ns: &Ns, file: &str) -> String {
    kubectl_ok(
        &[
            "-n",
            &ns.name,
            "apply",
            "--server-side",
            &format!("--field-manager={MANAGER}"),
            "-f",
            &format!("examples/{file}"),
        ],
        None,
    )
}

#[tokio::test]
async fn examples_applied_twice_server_side_change_nothing_and_diff_empty() {
    operator();
    let ns = Ns::new("gitops");
    ns.volumes_for_examples();
    for f in examples() {
        apply_file(&ns, &f);
    }
    let want: BTreeMap<String, Value> = examples()
        .iter()
        .flat_map(|f| documents(f))
        .filter(|d| {
            d["apiVersion"]
                .as_str()
                .unwrap()
                .starts_with("keelson.dev/")
        })
        .map(|d| {
            (
                format!(
                    "{}/{}",
                    d["kind"].as_str().unwrap(),
                    d["metadata"]["name"].as_str().unwrap()
                ),
                d,
            )
        })
        .collect();
    assert_eq!(want.len(), 9, "{:?}", want.keys());

    let objs = wait_for(
        "every example settled",
        Duration::from_secs(120),
        || async {
            let objs = keelson_objects(&ns);
            (objs.len() == want.len() && objs.values().all(settled)).then_some(objs)
        },
    )
    .await;

    for (k, o) in &objs {
        // The spec is the manifest's, field for field: nothing was defaulted or normalised into it,
        // and no manager but the applier owns any of it.
        assert_eq!(
            o["spec"], want[k]["spec"],
            "{k}: the live spec differs from the manifest"
        );
        assert!(
            spec_owners(o).is_empty(),
            "{k}: spec fields owned by {:?}",
            spec_owners(o)
        );
        assert!(
            o["metadata"]["managedFields"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|m| m["manager"] == MANAGER && m["fieldsV1"].get("f:spec").is_some()),
            "{k}: the applier owns no spec field (managedFields not read?)"
        );
        // Flux's reading: every settled example is Current, except a job held by its queue, which
        // kstatus reads from Ready=False as still in progress (see README, Argo CD and Flux).
        let ks = kstatus::compute(o);
        if k == "TrainingJob/bert-queued" {
            assert_eq!(
                (ks.status, ks.reason.as_str()),
                (Status::InProgress, "Suspended"),
                "{k}"
            );
        } else {
            assert_eq!(ks.status, Status::Current, "{k}: {ks:?}");
        }
    }

    // Applied again: no object changes, not even its resourceVersion, and it stays that way.
    let before = quiet_versions(&ns, Duration::from_secs(2)).await;
    for f in examples() {
        let out = apply_file(&ns, &f);
        assert!(out.contains("serverside-applied"), "{f}: {out}");
    }
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        assert_eq!(
            versions(&keelson_objects(&ns)),
            before,
            "applying the same manifests again changed a Keelson object"
        );
        tokio::time::sleep(POLL).await;
    }

    // And `kubectl diff --server-side` (what Argo CD's server-side diff asks the API server) shows
    // nothing: exit code 0, no output.
    for f in examples() {
        let o = kubectl(
            &[
                "-n",
                &ns.name,
                "diff",
                "--server-side",
                &format!("--field-manager={MANAGER}"),
                "-f",
                &format!("examples/{f}"),
            ],
            None,
        );
        assert_eq!(
            (o.status.code(), String::from_utf8_lossy(&o.stdout).as_ref()),
            (Some(0), ""),
            "kubectl diff {f}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    // The checks above see a default written into a spec: a controller that set spec.port would be
    // caught by both the spec comparison and the ownership check.
    kubectl_ok(
        &[
            "-n",
            &ns.name,
            "patch",
            "notebook",
            "scratch",
            "--type",
            "merge",
            "--field-manager=defaulter",
            "-p",
            r#"{"spec":{"port":8888}}"#,
        ],
        None,
    );
    let o = &keelson_objects(&ns)["Notebook/scratch"];
    assert_ne!(o["spec"], want["Notebook/scratch"]["spec"]);
    assert_eq!(
        spec_owners(o),
        vec![r#""defaulter" ("Update")"#.to_string()]
    );
}

fn get(ns: &Ns, what: &str) -> Value {
    serde_json::from_str(&ns.kubectl(&["get", what, "-o", "json"])).unwrap()
}

async fn kstatus_becomes(ns: &Ns, what: &str, want: Status) -> Value {
    wait_for(
        &format!("{what} {want:?} for kstatus"),
        Duration::from_secs(90),
        || async {
            let o = get(ns, what);
            // An object the operator has not seen yet has no status, which kstatus reads as
            // Current: wait for the operator's first status too.
            let seen = o.pointer("/status/observedGeneration").is_some();
            (seen && kstatus::compute(&o).status == want).then_some(o)
        },
    )
    .await
}

const SMALL: &str = "apiVersion: keelson.dev/v1alpha1
kind: Notebook
metadata: {name: nb}
spec: {image: jupyter:1}
---
apiVersion: keelson.dev/v1alpha1
kind: TrainingJob
metadata: {name: tj}
spec: {image: trainer:1, workers: 1}
---
apiVersion: keelson.dev/v1alpha1
kind: ModelDeployment
metadata: {name: md}
spec:
  variants:
    - {name: main, image: srv:1, weight: 100}
";

#[tokio::test]
async fn flux_kstatus_follows_observed_generation_and_ready() {
    operator();
    let ns = Ns::new("kstatus");
    ns.apply(SMALL).unwrap();
    ns.apply(UNRUNNABLE).unwrap();

    // Current once settled, InProgress the moment the generation moves past the observed one (the
    // object as the PATCH returns it, before any controller saw it), Current again after.
    for (what, patch) in [
        (
            "notebook/nb",
            r#"{"spec":{"env":[{"name":"THEME","value":"dark"}]}}"#,
        ),
        (
            "trainingjob/tj",
            r#"{"spec":{"runPolicy":{"backoffLimit":5}}}"#,
        ),
        (
            "modeldeployment/md",
            r#"{"spec":{"traffic":{"stickyHeader":"x-user"}}}"#,
        ),
    ] {
        let o = kstatus_becomes(&ns, what, Status::Current).await;
        assert!(ready(&o), "{what}: Current without Ready=True");
        assert_eq!(
            o["status"]["observedGeneration"], o["metadata"]["generation"],
            "{what}"
        );

        let patched: Value = serde_json::from_str(
            &ns.kubectl(&["patch", what, "--type", "merge", "-p", patch, "-o", "json"]),
        )
        .unwrap();
        assert_eq!(
            patched["metadata"]["generation"].as_i64(),
            o["metadata"]["generation"].as_i64().map(|g| g + 1),
            "{what}: the edit did not change the spec"
        );
        let ks = kstatus::compute(&patched);
        assert_eq!(
            (ks.status, ks.reason.as_str()),
            (Status::InProgress, "LatestGenerationNotObserved"),
            "{what}: {ks:?}"
        );
        let o = kstatus_becomes(&ns, what, Status::Current).await;
        assert_eq!(
            o["status"]["observedGeneration"], patched["metadata"]["generation"],
            "{what}"
        );
    }

    // A spec the operator cannot build: observed, Ready=False with the reason, never Current.
    for (what, reason) in [
        ("notebook/nb-bad", "VolumeConflict"),
        ("modeldeployment/md-bad", "ReservedVariantName"),
    ] {
        let o = wait_for(&format!("{what} observed"), TIMEOUT, || async {
            let o = get(&ns, what);
            (o["status"]["observedGeneration"] == o["metadata"]["generation"]).then_some(o)
        })
        .await;
        let ks = kstatus::compute(&o);
        assert_eq!(
            (ks.status, ks.reason.as_str()),
            (Status::InProgress, reason),
            "{what}: {ks:?}"
        );
        assert!(
            ks.message.contains("spec."),
            "{what}: the message names the field: {ks:?}"
        );
    }
}

#[test]
fn kubectl_wait_for_ready_returns_on_every_kind() {
    operator();
    let ns = Ns::new("kwait");
    ns.apply(SMALL).unwrap();
    for what in ["notebook/nb", "trainingjob/tj", "modeldeployment/md"] {
        let o = kubectl(
            &[
                "-n",
                &ns.name,
                "wait",
                "--for=condition=Ready",
                "--timeout=60s",
                what,
            ],
            None,
        );
        assert!(
            o.status.success(),
            "kubectl wait {what}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("condition met"), "{what}: {out}");
    }
}
