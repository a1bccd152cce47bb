//! Argo CD health checks (config/argocd/health/*.lua) run by the real Lua 5.1 interpreter (Argo CD
//! runs gopher-lua, a Lua 5.1) on objects read from the local cluster, and the ConfigMap patch that
//! ships them checked against the scripts.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

const KINDS: [&str; 3] = ["Notebook", "TrainingJob", "ModelDeployment"];

fn script(kind: &str) -> String {
    let p = root().join(format!("config/argocd/health/keelson.dev_{kind}.lua"));
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A Lua string literal: printable ASCII as is, every other byte as a decimal escape.
fn lua_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for b in s.bytes() {
        match b {
            b'"' | b'\\' => {
                out.push('\\');
                out.push(b as char);
            }
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\{b}")),
        }
    }
    out.push('"');
    out
}

/// The Lua table Argo CD builds from an object: maps to string-keyed tables, arrays to tables indexed
/// from 1, numbers, booleans, strings, and null to nil.
fn lua_value(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => lua_string(s),
        Value::Array(a) => format!(
            "{{{}}}",
            a.iter().map(lua_value).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(m) => format!(
            "{{{}}}",
            m.iter()
                .map(|(k, v)| format!("[{}] = {}", lua_string(k), lua_value(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Runs the health script of `obj`'s kind with `lua5.1` the way Argo CD does: `obj` is a global, the
/// script is a chunk that returns `hs`, and only the base, table, string and math libraries are
/// there. Returns (hs.status, hs.message).
fn health(obj: &Value) -> (String, String) {
    let kind = obj["kind"].as_str().unwrap();
    let program = format!(
        "obj = {}\nlocal write = io.write\nio, os, require, dofile, loadfile, package, debug = nil, nil, nil, nil, nil, nil, nil\nlocal check = function()\n{}\nend\nlocal hs = check()\nwrite(tostring(hs.status), \"\\n\", tostring(hs.message))\n",
        lua_value(obj),
        script(kind)
    );
    let mut child = Command::new("lua5.1")
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("lua5.1 (Debian package lua5.1; .ci/run installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(program.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "lua5.1 failed on {kind}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8(o.stdout).unwrap();
    let (status, message) = out.split_once('\n').unwrap();
    assert!(
        ["Healthy", "Progressing", "Degraded", "Suspended"].contains(&status),
        "{kind}: hs.status {status:?} is not an Argo CD health status"
    );
    assert!(
        !message.is_empty() && message != "nil",
        "{kind}: no message"
    );
    (status.to_string(), message.to_string())
}

fn get(ns: &Ns, what: &str) -> Value {
    serde_json::from_str(&ns.kubectl(&["get", what, "-o", "json"])).unwrap()
}

/// Polls until the live object's health is `want`; returns the object.
async fn health_becomes(ns: &Ns, what: &str, want: &str) -> Value {
    wait_for(
        &format!("{what} {want} for Argo CD"),
        Duration::from_secs(90),
        || async {
            let o = get(ns, what);
            (health(&o).0 == want).then_some(o)
        },
    )
    .await
}

#[test]
fn argocd_cm_patch_embeds_exactly_the_lua_scripts() {
    let text = std::fs::read_to_string(root().join("config/argocd/argocd-cm-patch.yaml")).unwrap();
    let cm: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(cm["kind"].as_str(), Some("ConfigMap"));
    assert_eq!(cm["metadata"]["name"].as_str(), Some("argocd-cm"));
    let data: BTreeMap<String, String> = serde_yaml::from_value(cm["data"].clone()).unwrap();
    let mut files: Vec<String> = std::fs::read_dir(root().join("config/argocd/health"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".lua"))
        .collect();
    files.sort();
    let want: BTreeMap<String, String> = files
        .iter()
        .map(|f| {
            let key = format!(
                "resource.customizations.health.{}",
                f.trim_end_matches(".lua")
            );
            (
                key,
                std::fs::read_to_string(root().join("config/argocd/health").join(f)).unwrap(),
            )
        })
        .collect();
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        KINDS
            .iter()
            .map(|k| format!("resource.customizations.health.keelson.dev_{k}"))
            .collect::<std::collections::BTreeSet<_>>()
            .iter()
            .collect::<Vec<_>>(),
        "one script per kind"
    );
    for (k, v) in &want {
        assert!(
            data.get(k) == Some(v),
            "config/argocd/argocd-cm-patch.yaml differs from the script for {k}: run hack/argocd-cm-patch.sh"
        );
    }
    assert_eq!(
        data.len(),
        want.len(),
        "keys without a script: {:?}",
        data.keys()
    );
}

#[test]
fn lua_harness_sees_what_argocd_sees() {
    // No status: Progressing; the table conversion keeps nested arrays, numbers and odd strings.
    let o = serde_json::json!({
        "kind": "Notebook",
        "metadata": {"name": "n", "generation": 2, "annotations": {"q": "a \"quoted\" \\ line\n\u{e9}"}},
        "spec": {"image": "x", "suspend": false},
    });
    assert_eq!(health(&o).0, "Progressing");
    let o = serde_json::json!({
        "kind": "Notebook",
        "metadata": {"name": "n", "generation": 2},
        "spec": {"image": "x"},
        "status": {"observedGeneration": 2, "phase": "Running", "conditions": [
            {"type": "Ready", "status": "True", "reason": "PodReady", "message": "up \u{2713}"}]},
    });
    let (s, m) = health(&o);
    assert_eq!(s, "Healthy");
    assert_eq!(m, "PodReady: up \u{2713}");
}

#[tokio::test]
async fn argocd_health_of_live_objects() {
    operator();
    let ns = Ns::new("argocd");
    ns.pv_for("models", "10Gi");
    ns.apply(&example("modeldeployment-ab.yaml")).unwrap();
    ns.apply(&example("trainingjob-queued.yaml")).unwrap();
    ns.apply(
        "apiVersion: keelson.dev/v1alpha1
kind: Notebook
metadata: {name: nb}
spec: {image: jupyter:1}
---
apiVersion: keelson.dev/v1alpha1
kind: Notebook
metadata: {name: nb-off}
spec: {image: jupyter:1, suspend: true}
---
apiVersion: keelson.dev/v1alpha1
kind: TrainingJob
metadata: {name: tj}
spec: {image: trainer:1, workers: 2}
---
apiVersion: keelson.dev/v1alpha1
kind: TrainingJob
metadata: {name: doomed}
spec:
  image: trainer:1
  workers: 1
  runPolicy: {backoffLimit: 0, restartPolicy: OnFailure}
",
    )
    .unwrap();
    ns.apply(UNRUNNABLE).unwrap();

    // Settled: Healthy, for each kind.
    for what in ["notebook/nb", "trainingjob/tj", "modeldeployment/fraud"] {
        let o = health_becomes(&ns, what, "Healthy").await;
        assert_eq!(
            o["status"]["observedGeneration"], o["metadata"]["generation"],
            "{what}"
        );
    }

    // Suspended: a queued TrainingJob and a suspended Notebook.
    for what in ["trainingjob/bert-queued", "notebook/nb-off"] {
        let o = health_becomes(&ns, what, "Suspended").await;
        assert_eq!(o["status"]["phase"], "Suspended", "{what}");
    }

    // Degraded: a job whose only worker fails with no restart left, and two specs the operator
    // cannot build. The message carries the operator's reason.
    wait_for("doomed's worker running", TIMEOUT, || async {
        (ns.kubectl(&[
            "get",
            "pod",
            "doomed-worker-0",
            "--ignore-not-found",
            "-o",
            "jsonpath={.status.phase}",
        ]) == "Running")
            .then_some(())
    })
    .await;
    exit_pod(&ns.name, "doomed-worker-0", 1);
    let o = health_becomes(&ns, "trainingjob/doomed", "Degraded").await;
    assert_eq!(o["status"]["phase"], "Failed");
    assert!(
        health(&o).1.starts_with("BackoffLimitExceeded: "),
        "{}",
        health(&o).1
    );
    for (what, reason) in [
        ("notebook/nb-bad", "VolumeConflict"),
        ("modeldeployment/md-bad", "ReservedVariantName"),
    ] {
        let o = health_becomes(&ns, what, "Degraded").await;
        let (_, message) = health(&o);
        assert!(message.starts_with(reason), "{what}: {message}");
    }

    // Progressing: an object as the API server returns it on creation (no status yet), and each
    // settled object the moment its generation moves past the observed one (the PATCH response),
    // which turns Healthy again once the operator has caught up.
    let fresh = kubectl_ok(
        &["-n", &ns.name, "create", "-o", "json", "-f", "-"],
        Some("apiVersion: keelson.dev/v1alpha1\nkind: TrainingJob\nmetadata: {name: fresh}\nspec: {image: trainer:1, workers: 1}\n"),
    );
    let fresh: Value = serde_json::from_str(&fresh).unwrap();
    assert!(fresh.get("status").is_none(), "{fresh}");
    assert_eq!(health(&fresh).0, "Progressing");
    health_becomes(&ns, "trainingjob/fresh", "Healthy").await;

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
            "modeldeployment/fraud",
            r#"{"spec":{"traffic":{"stickyHeader":"x-session"}}}"#,
        ),
    ] {
        let before = get(&ns, what);
        let patched: Value = serde_json::from_str(
            &ns.kubectl(&["patch", what, "--type", "merge", "-p", patch, "-o", "json"]),
        )
        .unwrap();
        assert!(
            patched["metadata"]["generation"].as_i64() > before["metadata"]["generation"].as_i64(),
            "{what}: the edit did not change the spec"
        );
        let (status, message) = health(&patched);
        assert_eq!(status, "Progressing", "{what}: {message}");
        assert!(message.contains("observe generation"), "{what}: {message}");
        health_becomes(&ns, what, "Healthy").await;
    }
}
