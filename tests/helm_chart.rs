//! The Helm chart `charts/keelson` installs what `config/default` installs, offline (no cluster).
//!
//! helm comes from `hack/helm/build.sh` (helm.sh/helm/v4 built from its Go module, cached per user).
//! The tests prove:
//!
//! - the chart's `crds/` are symlinks to the generated CRDs (helm follows them), and the packaged chart
//!   carries them byte for byte;
//! - `helm lint charts/keelson` passes, and so does `helm lint --strict`;
//! - `helm template --include-crds` with the default values renders the same objects as
//!   `kubectl kustomize config/default`: the same kinds and names, and each object equal field by field
//!   (RBAC rules, container args and env, security contexts, probes, resources, ...) once only Helm's
//!   standard labels and the namespace are normalised. The kustomize Namespace object is the one
//!   exception: the chart installs into the release namespace, as Helm users expect, and every
//!   namespaced object and every ServiceAccount subject must be in it;
//! - every rendered object carries Helm's standard labels, and the values (`image.*`, `routerImage`,
//!   `replicas`, `resources`, `nodeSelector`, `tolerations`, `affinity`, `leaderElection`, `logFormat`,
//!   `extraArgs`) reach the Deployment and nothing else changes;
//! - `values.schema.json` refuses a misspelt or mistyped value.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use keelson_testkit as support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::{json, Value};

/// The release namespace `helm template` renders into: not config/default's, so that a chart that
/// hard-codes `keelson-system` fails.
const RELEASE_NS: &str = "keelson-helm-test";
const KUSTOMIZE_NS: &str = "keelson-system";
/// The release name: with it the chart's objects have config/default's names.
const RELEASE: &str = "keelson";

/// Labels that Helm charts put on every object; the selector labels are a subset.
const HELM_LABELS: [&str; 5] = [
    "helm.sh/chart",
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
];

fn chart() -> PathBuf {
    support::root().join("charts/keelson")
}

/// helm, built once per user by hack/helm/build.sh (which prints its path).
fn helm_bin() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| {
        let o = Command::new(support::root().join("hack/helm/build.sh"))
            .output()
            .expect("run hack/helm/build.sh");
        assert!(
            o.status.success(),
            "hack/helm/build.sh failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let path = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        assert!(
            path.is_file(),
            "hack/helm/build.sh printed {path:?}, not a file"
        );
        path
    })
}

/// Runs helm with its own (empty) config, cache and data directories; returns (success, stdout, stderr).
fn helm(args: &[&str]) -> (bool, String, String) {
    let home = support::root().join("target/helm-home");
    let o = Command::new(helm_bin())
        .args(args)
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env("KUBECONFIG", "/dev/null")
        .current_dir(support::root())
        .output()
        .expect("run helm");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn helm_ok(args: &[&str]) -> String {
    let (ok, out, err) = helm(args);
    assert!(ok, "helm {args:?} failed:\n{err}\n{out}");
    out
}

/// `helm template` of the chart in [`RELEASE_NS`], CRDs included, with more flags.
fn template(extra: &[&str]) -> Vec<Value> {
    let chart = chart();
    let mut args = vec![
        "template",
        RELEASE,
        chart.to_str().expect("utf-8 path"),
        "--namespace",
        RELEASE_NS,
        "--include-crds",
    ];
    args.extend_from_slice(extra);
    docs(&helm_ok(&args))
}

fn kustomize_default() -> Vec<Value> {
    let kubectl = support::kubectl_bin();
    assert!(
        kubectl.exists(),
        "no {} (make cluster-bins builds it)",
        kubectl.display()
    );
    let o = Command::new(&kubectl)
        .args(["kustomize", "config/default"])
        .current_dir(support::root())
        .output()
        .expect("run kubectl kustomize");
    assert!(
        o.status.success(),
        "kubectl kustomize config/default: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    docs(&String::from_utf8_lossy(&o.stdout))
}

/// The non-empty documents of a YAML stream.
fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(d).expect("a YAML document");
            serde_json::to_value(v).expect("YAML as JSON")
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn kind_name(v: &Value) -> (String, String) {
    (
        v["kind"].as_str().unwrap_or_default().to_string(),
        v["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

fn by_kind_name(objs: Vec<Value>) -> BTreeMap<(String, String), Value> {
    let mut m = BTreeMap::new();
    for o in objs {
        let k = kind_name(&o);
        assert!(m.insert(k.clone(), o).is_none(), "{k:?} rendered twice");
    }
    m
}

fn remove_labels(labels: &mut Value, keys: &[&str]) {
    if let Some(map) = labels.as_object_mut() {
        for k in keys {
            map.remove(*k);
        }
    }
}

/// Numbers as f64: kustomize writes `0.0` from crds/ as `0`.
fn numbers(v: Value) -> Value {
    match v {
        Value::Number(n) => json!(n.as_f64()),
        Value::Array(a) => Value::Array(a.into_iter().map(numbers).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, numbers(v))).collect()),
        v => v,
    }
}

/// Drops Helm's standard labels (the selector keeps `app.kubernetes.io/name`, which config/default
/// selects on too) and writes `<ns>` for either namespace.
fn normalise(v: Value) -> Value {
    let mut v = numbers(v);
    let meta = &mut v["metadata"];
    if meta.get("labels").is_some() {
        remove_labels(&mut meta["labels"], &HELM_LABELS);
        if meta["labels"].as_object().is_some_and(|m| m.is_empty()) {
            meta.as_object_mut().map(|m| m.remove("labels"));
        }
    }
    if let Some(ns) = meta.get_mut("namespace") {
        if ns == RELEASE_NS || ns == KUSTOMIZE_NS {
            *ns = json!("<ns>");
        }
    }
    if v["kind"] == "Deployment" {
        remove_labels(
            &mut v["spec"]["selector"]["matchLabels"],
            &["app.kubernetes.io/instance"],
        );
        remove_labels(
            &mut v["spec"]["template"]["metadata"]["labels"],
            &["app.kubernetes.io/instance"],
        );
    }
    if let Some(subjects) = v.get_mut("subjects").and_then(Value::as_array_mut) {
        for s in subjects {
            if s["namespace"] == RELEASE_NS || s["namespace"] == KUSTOMIZE_NS {
                s["namespace"] = json!("<ns>");
            }
        }
    }
    v
}

/// Every path where `a` and `b` differ, with both values.
fn diff(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for k in x.keys().chain(y.keys().filter(|k| !x.contains_key(*k))) {
                let p = format!("{path}.{k}");
                diff(
                    &p,
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (xa, yb)) in x.iter().zip(y).enumerate() {
                diff(&format!("{path}[{i}]"), xa, yb, out);
            }
        }
        _ if a != b => out.push(format!("{path}: config/default {a} | chart {b}")),
        _ => {}
    }
}

fn deployment(objs: &[Value]) -> Value {
    let d: Vec<&Value> = objs.iter().filter(|o| o["kind"] == "Deployment").collect();
    assert_eq!(d.len(), 1, "one Deployment");
    d[0].clone()
}

fn container(objs: &[Value]) -> Value {
    deployment(objs)["spec"]["template"]["spec"]["containers"][0].clone()
}

fn env(c: &Value, name: &str) -> Value {
    c["env"]
        .as_array()
        .and_then(|e| e.iter().find(|v| v["name"] == name))
        .cloned()
        .unwrap_or(Value::Null)
}

#[test]
fn chart_crds_are_the_generated_crds() {
    let yaml_files = |dir: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("dir entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        v.sort();
        v
    };
    let generated = yaml_files(&support::root().join("crds"));
    let in_chart = yaml_files(&chart().join("crds"));
    assert_eq!(generated.len(), 3, "crds/ has the three kinds");
    let names = |v: &[PathBuf]| -> Vec<String> {
        v.iter()
            .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(
        names(&generated),
        names(&in_chart),
        "charts/keelson/crds/ must link every file of crds/"
    );
    for (g, c) in generated.iter().zip(&in_chart) {
        // A relative symlink into crds/ (helm follows it, and `helm package` stores the content).
        let link = std::fs::read_link(c)
            .unwrap_or_else(|e| panic!("{} is not a symlink to crds/: {e}", c.display()));
        assert_eq!(
            link,
            Path::new("../../../crds").join(g.file_name().expect("name")),
            "{}",
            c.display()
        );
        let bytes = std::fs::read(g).expect("read CRD");
        assert!(
            std::fs::read(c).expect("read the chart's CRD") == bytes,
            "{} differs from {}",
            c.display(),
            g.display()
        );
    }

    // The packaged chart (what a chart repository serves) carries the same bytes.
    let out = support::root().join("target/helm-package");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).expect("package dir");
    let chart = chart();
    helm_ok(&[
        "package",
        chart.to_str().expect("utf-8 path"),
        "--destination",
        out.to_str().expect("utf-8 path"),
    ]);
    let tgz = out.join("keelson-0.1.0.tgz");
    let shown = helm_ok(&["show", "crds", tgz.to_str().expect("utf-8 path")]);
    for g in &generated {
        let text = std::fs::read_to_string(g).expect("read CRD");
        assert!(
            shown.contains(text.trim_start_matches("---\n")),
            "the packaged chart does not carry {} byte for byte",
            g.display()
        );
    }
}

#[test]
fn helm_lint_passes() {
    let chart = chart();
    let chart = chart.to_str().expect("utf-8 path");
    let out = helm_ok(&["lint", chart]);
    assert!(out.contains("0 chart(s) failed"), "{out}");
    let out = helm_ok(&["lint", "--strict", chart]);
    assert!(out.contains("0 chart(s) failed"), "{out}");
}

#[test]
fn default_values_render_config_default() {
    let kustomize = kustomize_default();
    let helm = template(&[]);

    // The chart never creates a namespace: Helm installs into the release namespace.
    assert!(
        helm.iter().all(|o| o["kind"] != "Namespace"),
        "the chart renders a Namespace; Helm users pass --namespace (and --create-namespace)"
    );
    let ns: Vec<&Value> = kustomize
        .iter()
        .filter(|o| o["kind"] == "Namespace")
        .collect();
    assert_eq!(ns.len(), 1, "config/default has its Namespace");
    assert_eq!(ns[0]["metadata"]["name"], KUSTOMIZE_NS);

    // Everything namespaced is in the release namespace; ServiceAccount subjects point there too.
    for o in &helm {
        let (kind, name) = kind_name(o);
        let cluster_scoped = matches!(
            kind.as_str(),
            "CustomResourceDefinition" | "ClusterRole" | "ClusterRoleBinding"
        );
        if cluster_scoped {
            assert!(
                o["metadata"].get("namespace").is_none(),
                "{kind}/{name} has a namespace"
            );
        } else {
            assert_eq!(o["metadata"]["namespace"], RELEASE_NS, "{kind}/{name}");
        }
        for s in o["subjects"].as_array().into_iter().flatten() {
            assert_eq!(s["namespace"], RELEASE_NS, "{kind}/{name} subject {s}");
        }
        // Helm's standard labels on every templated object (the CRDs are copied, not templated).
        if kind != "CustomResourceDefinition" {
            let labels = &o["metadata"]["labels"];
            for l in HELM_LABELS {
                assert!(
                    labels.get(l).is_some(),
                    "{kind}/{name} has no label {l}: {labels}"
                );
            }
            assert_eq!(
                labels["app.kubernetes.io/managed-by"], "Helm",
                "{kind}/{name}"
            );
            assert_eq!(
                labels["app.kubernetes.io/instance"], RELEASE,
                "{kind}/{name}"
            );
        }
    }

    let want = by_kind_name(
        kustomize
            .into_iter()
            .filter(|o| o["kind"] != "Namespace")
            .map(normalise)
            .collect(),
    );
    let got = by_kind_name(helm.into_iter().map(normalise).collect());
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>(),
        "kinds and names: config/default (left) vs the chart (right)"
    );
    for kinds in [
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
    ] {
        assert!(
            want.keys().any(|(k, _)| k == kinds),
            "config/default has no {kinds}"
        );
    }
    let mut diffs = Vec::new();
    for (k, w) in &want {
        diff(&format!("{}/{}", k.0, k.1), w, &got[k], &mut diffs);
    }
    assert!(
        diffs.is_empty(),
        "the chart's default rendering differs from config/default:\n{}",
        diffs.join("\n")
    );
}

#[test]
fn values_reach_the_deployment() {
    let defaults = template(&[]);
    let objs = template(&[
        "--set",
        "image.repository=keelson.dev/keelson,image.tag=dev,image.pullPolicy=Never",
        "--set",
        "routerImage=registry.example/router:1",
        "--set",
        "replicas=2",
        "--set",
        "resources.requests.cpu=250m,resources.limits.memory=1Gi",
        "--set-string",
        "nodeSelector.keelson\\.dev/real-node=true",
        "--set",
        "tolerations[0].key=keelson.dev/real-node,tolerations[0].operator=Exists,tolerations[0].effect=NoSchedule",
        "--set",
        "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].key=kubernetes.io/os",
        "--set",
        "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].operator=In",
        "--set",
        "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].values[0]=linux",
        "--set",
        "logFormat=human",
        "--set",
        "extraArgs={--concurrency,16}",
    ]);
    let d = deployment(&objs);
    let pod = &d["spec"]["template"]["spec"];
    let c = container(&objs);
    assert_eq!(d["spec"]["replicas"], 2);
    assert_eq!(c["image"], "keelson.dev/keelson:dev");
    assert_eq!(c["imagePullPolicy"], "Never");
    assert_eq!(
        env(&c, "KEELSON_ROUTER_IMAGE")["value"],
        "registry.example/router:1"
    );
    assert_eq!(
        c["args"],
        json!(["run", "--log-format", "human", "--concurrency", "16"])
    );
    assert_eq!(c["resources"]["requests"]["cpu"], "250m");
    assert_eq!(c["resources"]["requests"]["memory"], "64Mi");
    assert_eq!(c["resources"]["limits"]["memory"], "1Gi");
    assert_eq!(
        pod["nodeSelector"],
        json!({"keelson.dev/real-node": "true"})
    );
    assert_eq!(
        pod["tolerations"],
        json!([{"key": "keelson.dev/real-node", "operator": "Exists", "effect": "NoSchedule"}])
    );
    assert_eq!(
        pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"][0]["matchExpressions"][0]["values"],
        json!(["linux"])
    );
    assert_eq!(
        d["metadata"]["labels"]["app.kubernetes.io/version"], "dev",
        "the version label follows the image tag"
    );

    // Defaults: the router runs the operator's image; no pull policy, placement or extra flags.
    let c = container(&defaults);
    assert_eq!(c["image"], "ghcr.io/keelson/keelson:0.1.0");
    assert_eq!(env(&c, "KEELSON_ROUTER_IMAGE")["value"], c["image"]);
    assert!(c.get("imagePullPolicy").is_none());
    let pod = &deployment(&defaults)["spec"]["template"]["spec"];
    for f in ["nodeSelector", "tolerations", "affinity"] {
        assert!(pod.get(f).is_none(), "{f} rendered by default");
    }

    // Only the Deployment changes with these values (the labels aside: the version follows the tag).
    let strip = |objs: Vec<Value>| {
        by_kind_name(
            objs.into_iter()
                .filter(|o| o["kind"] != "Deployment")
                .map(normalise)
                .collect(),
        )
    };
    assert_eq!(strip(defaults.clone()), strip(objs));

    // Leader election off: the flag, and no Role for the Lease.
    let objs = template(&["--set", "leaderElection.enabled=false"]);
    assert_eq!(
        container(&objs)["args"],
        json!(["run", "--log-format", "json", "--leader-elect=false"])
    );
    assert!(objs
        .iter()
        .all(|o| o["kind"] != "Role" && o["kind"] != "RoleBinding"));
    // ... which a second replica would need.
    let chart = chart();
    let (ok, _, err) = helm(&[
        "template",
        RELEASE,
        chart.to_str().expect("utf-8 path"),
        "--set",
        "leaderElection.enabled=false,replicas=2",
    ]);
    assert!(!ok, "replicas=2 without leader election rendered");
    assert!(err.contains("leaderElection.enabled"), "{err}");

    // Another release name: every name and reference follows it.
    let objs = docs(&helm_ok(&[
        "template",
        "ml",
        chart.to_str().expect("utf-8 path"),
        "--namespace",
        RELEASE_NS,
    ]));
    for o in &objs {
        let (kind, name) = kind_name(o);
        assert!(name.starts_with("ml-keelson"), "{kind}/{name}");
    }
    let d = deployment(&objs);
    assert_eq!(
        d["spec"]["template"]["spec"]["serviceAccountName"],
        "ml-keelson"
    );
    assert_eq!(
        d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"],
        "ml"
    );
}

#[test]
fn values_schema_refuses_mistakes() {
    let chart = chart();
    let chart = chart.to_str().expect("utf-8 path");
    for (set, why) in [
        (
            "replicaCount=2",
            "additional properties 'replicaCount' not allowed",
        ),
        ("logFormat=xml", "/logFormat"),
        ("nodeSelector.zone=true", "/nodeSelector/zone"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("leaderElection.enabled=yes", "/leaderElection/enabled"),
    ] {
        let (ok, _, err) = helm(&["template", RELEASE, chart, "--set", set]);
        assert!(!ok, "--set {set} rendered");
        assert!(err.contains(why), "--set {set}: {err}");
    }
}
