//! 1,000 random specs, applied as the API server accepts them: the operator never panics, and a
//! refused spec never reaches it.
//!
//! The objects come from the proptest generators of `keelson_testkit::testgen` (the ones the unit property
//! tests use) with a fixed seed, so a failure reproduces; a third of each kind. Each is named after
//! the offline schema check's verdict (`a-` accepted, `r-` refused: `a-tj-0001`), created through
//! the API server, and the API server's verdict must agree. The real `keelson` binary runs as its
//! ServiceAccount with a JSON log in `target/`. Then: the process is alive and has not panicked, no
//! refused name is in its log, every accepted object has `status.observedGeneration` equal to its
//! generation and a Ready condition (True, or False with a reason: `ChildRefused` when its
//! reconciles keep failing on a child the API server refuses), and once settled the operator
//! stops writing them and reconciles each at most twice in 10 s (no hot loop; a failing object's
//! retries back off). A ValidatingAdmissionPolicy keeps the other operators of a shared local
//! cluster out of this test's namespace, and this test's operator out of theirs (see [`isolate`]).
//!
//! `RANDOM_SPECS=N` runs N objects instead of 1,000.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use keelson_testkit as support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{ApiResource, DynamicObject, ListParams, PostParams};
use kube::Api;
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{json, Value};
use support::*;

use keelson_api::modeldeployment::ModelDeployment;
use keelson_api::notebook::Notebook;
use keelson_api::trainingjob::TrainingJob;
use keelson_testkit::schema_check;
use keelson_testkit::testgen;

/// Objects created at once.
const PARALLEL: usize = 8;
/// How long every accepted object may take to get its status.
const SETTLE: Duration = Duration::from_secs(120);
/// A quiet window: no reconcile of our objects for this long means the operator has settled.
const QUIET: Duration = Duration::from_secs(10);
/// How long to wait for such a window.
const QUIET_WITHIN: Duration = Duration::from_secs(120);

struct Kind {
    kind: &'static str,
    short: &'static str,
    resource: ApiResource,
}

fn kinds() -> [Kind; 3] {
    [
        Kind {
            kind: "Notebook",
            short: "nb",
            resource: ApiResource::erase::<Notebook>(&()),
        },
        Kind {
            kind: "TrainingJob",
            short: "tj",
            resource: ApiResource::erase::<TrainingJob>(&()),
        },
        Kind {
            kind: "ModelDeployment",
            short: "md",
            resource: ApiResource::erase::<ModelDeployment>(&()),
        },
    ]
}

/// One generated object and what became of it.
struct Case {
    kind: usize,
    name: String,
    body: Value,
    /// The offline schema check's errors (empty: accepted).
    predicted: Vec<String>,
    /// The API server's answer: Ok, or its message and the fields it named.
    verdict: Option<Result<(), Refusal>>,
}

#[derive(Debug, Clone)]
struct Refusal {
    message: String,
    /// (field, message) of each cause.
    causes: Vec<(String, String)>,
}

/// `n` objects, a third of each kind, from the deterministic generator.
fn generate(n: usize) -> Vec<Case> {
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let strategies = [
        testgen::notebook().boxed(),
        testgen::trainingjob().boxed(),
        testgen::modeldeployment().boxed(),
    ];
    let kinds = kinds();
    (0..n)
        .map(|i| {
            let kind = i % 3;
            let generated = strategies[kind]
                .new_tree(&mut runner)
                .expect("generate an object")
                .current();
            let predicted = schema_check::errors(kinds[kind].kind, &generated);
            let name = format!(
                "{}-{}-{i:04}",
                if predicted.is_empty() { "a" } else { "r" },
                kinds[kind].short
            );
            let mut body = generated;
            body["metadata"] = json!({"name": name});
            Case {
                kind,
                name,
                body,
                predicted,
                verdict: None,
            }
        })
        .collect()
}

/// A field path with list indexes folded (`spec.variants[1].image` -> `spec.variants[*].image`).
fn fold_indexes(s: &str) -> String {
    let re = regex::Regex::new(r"\[\d+\]").unwrap();
    re.replace_all(s, "[*]").into_owned()
}

/// A cause's message without the offending value, so that like refusals count together.
fn fold_value(msg: &str) -> String {
    let re = regex::Regex::new(r#"^Invalid value: (".*?"|[^:]*): "#).unwrap();
    let msg = re.replace(msg, "");
    let re = regex::Regex::new(r#"Unsupported value: "[^"]*""#).unwrap();
    fold_indexes(&re.replace(&msg, "Unsupported value"))
}

fn refusal(e: kube::Error) -> Refusal {
    match e {
        kube::Error::Api(s) => Refusal {
            causes: s
                .details
                .as_ref()
                .map(|d| {
                    d.causes
                        .iter()
                        .map(|c| (c.field.clone(), c.message.clone()))
                        .collect()
                })
                .unwrap_or_default(),
            message: s.message,
        },
        other => panic!("not an answer of the API server: {other}"),
    }
}

/// Label of this test's namespaces, and prefix of the group its operator is impersonated with.
const ISOLATION: &str = "keelson.dev/random-specs";

/// Other checkouts run their own operators on the shared local cluster, all as the same
/// ServiceAccount and over every namespace: one built from other code would fight this test's over
/// the status of its objects, and this test's would write into their namespaces. A
/// ValidatingAdmissionPolicy keeps them apart: in a namespace labelled [`ISOLATION`] the operator's
/// ServiceAccount may write only with the group `<ISOLATION>:<namespace>` (this test's operator),
/// and with such a group only there. Applied once, idempotent; it touches nothing else.
fn isolate(ns: &Ns) {
    let policy = format!(
        r#"apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {{name: keelson-random-specs-isolation}}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
      - {{apiGroups: ["*"], apiVersions: ["*"], operations: [CREATE, UPDATE, DELETE], resources: ["*/*"], scope: "*"}}
  matchConditions:
    - {{name: the-operator, expression: "request.userInfo.username == '{OPERATOR_USER}'"}}
  variables:
    - {{name: groups, expression: "has(request.userInfo.groups) ? request.userInfo.groups : []"}}
    - {{name: labelled, expression: "namespaceObject != null && has(namespaceObject.metadata.labels) && '{ISOLATION}' in namespaceObject.metadata.labels"}}
  validations:
    - expression: "variables.labelled ? ('{ISOLATION}:' + request.namespace) in variables.groups : !variables.groups.exists(g, g.startsWith('{ISOLATION}:'))"
      reason: Forbidden
      message: "a random-specs test namespace: only that test's operator writes there, and it writes nowhere else"
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {{name: keelson-random-specs-isolation}}
spec:
  policyName: keelson-random-specs-isolation
  validationActions: [Deny]
"#
    );
    kubectl_ok(
        &["apply", "--server-side", "--force-conflicts", "-f", "-"],
        Some(&policy),
    );
    kubectl_ok(
        &["label", "namespace", &ns.name, &format!("{ISOLATION}=true")],
        None,
    );
    // In force once an operator without the group is refused here.
    wait_sync(Duration::from_secs(30), || {
        let o = kubectl(
            &[
                "-n",
                &ns.name,
                "create",
                "configmap",
                "isolation-probe",
                "--dry-run=server",
                "--as",
                OPERATOR_USER,
                "--as-group",
                "system:serviceaccounts",
                "--as-group",
                "system:authenticated",
            ],
            None,
        );
        String::from_utf8_lossy(&o.stderr).contains("random-specs test namespace")
    });
}

/// The operator process, killed if the test ends before it is stopped.
struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The operator binary as its ServiceAccount (with the group that lets it write in `ns`, see
/// [`isolate`]), logging JSON to `log`, probes on `addr`.
fn start_operator(log: &std::path::Path, addr: &str, ns: &str) -> Operator {
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_keelson"))
        .args(["--log-format", "json", "run", "--health-addr", addr])
        .args(["--leader-elect", "false"])
        .env("KUBECONFIG", kubeconfig())
        .env("KUBE_RS_DEBUG_IMPERSONATE_USER", OPERATOR_USER)
        .env(
            "KUBE_RS_DEBUG_IMPERSONATE_GROUP",
            format!("system:serviceaccounts,system:serviceaccounts:keelson-system,system:authenticated,{ISOLATION}:{ns}"),
        )
        // Debug: every finished reconcile is logged with its object's name.
        .env("RUST_LOG", "keelson=debug")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    Operator(child)
}

/// Sum of a counter family in the operator's /metrics (NaN when it does not answer).
fn metric(addr: &str, name: &str) -> f64 {
    let Some((_, body)) = http_get(addr, "/metrics") else {
        return f64::NAN;
    };
    body.lines()
        .filter(|l| l.starts_with(name) && (l[name.len()..].starts_with([' ', '{'])))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What the operator did about one object, from its log.
#[derive(Debug, Default)]
struct Activity {
    /// Reconciles finished or failed.
    reconciles: u32,
    /// Reconciles that wrote something (their log line lists the changes).
    writes: u32,
    /// The error of the last reconcile, when it failed.
    last_error: Option<String>,
}

/// The operator's activity per object (`Kind/name`) of namespace `ns` in a stretch of its JSON log.
fn activity(log: &str, ns: &str) -> BTreeMap<String, Activity> {
    // A reconcile's span: its object is in the text (the span's own `name` field repeats the key).
    let span =
        regex::Regex::new(r#""span":\{"kind":"(\w+)","name":"([^"]+)","namespace":"([^"]+)""#)
            .unwrap();
    let mut out: BTreeMap<String, Activity> = BTreeMap::new();
    for line in log.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let field = |f: &str| v[f].as_str().unwrap_or_default().to_string();
        let message = field("message");
        if message == "reconcile finished" || message == "reconcile failed" {
            if field("namespace") != ns {
                continue;
            }
            let a = out
                .entry(format!("{}/{}", field("kind"), field("name")))
                .or_default();
            a.reconciles += 1;
            a.last_error = (message == "reconcile failed").then(|| field("error"));
        } else if v.get("changes").is_some() {
            if let Some(c) = span.captures(line).filter(|c| &c[3] == ns) {
                out.entry(format!("{}/{}", &c[1], &c[2]))
                    .or_default()
                    .writes += 1;
            }
        }
    }
    out
}

/// Whether a stretch of activity is settled: no writes, and no object reconciled more than twice
/// (a failing object's retries back off: 1 s, 2 s, 4 s, ... 5 min).
fn settled(window: &BTreeMap<String, Activity>) -> bool {
    window.values().all(|a| a.writes == 0 && a.reconciles <= 2)
}

/// The Ready condition's status and reason.
fn ready_of(obj: &DynamicObject) -> Option<(String, String)> {
    obj.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_string(),
                c["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
}

/// What is missing from an object's status: None when it has `observedGeneration` equal to its
/// generation and a Ready condition that is True, or not True with a reason.
fn status_problem(obj: &DynamicObject) -> Option<String> {
    let status = &obj.data["status"];
    let generation = obj.metadata.generation;
    if status["observedGeneration"].as_i64() != generation {
        return Some(format!(
            "observedGeneration {} of generation {generation:?}",
            status["observedGeneration"]
        ));
    }
    let ready = status["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Ready");
    match ready {
        None => Some("no Ready condition".into()),
        Some(c) if c["status"] == "True" => None,
        Some(c) if c["reason"].as_str().is_some_and(|r| !r.is_empty()) => None,
        Some(c) => Some(format!("Ready {} without a reason", c["status"])),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_specs_as_the_api_server_accepts_them() {
    let started = Instant::now();
    let n: usize = std::env::var("RANDOM_SPECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let mut cases = generate(n);
    let kinds = kinds();

    cluster();
    let ns = Ns::new("random-specs");
    isolate(&ns);
    let client = client().await;
    let log_path = root().join(format!("target/random-specs-{}.log", ns.name));
    let addr = format!("127.0.0.1:{}", free_port());
    let mut op = start_operator(&log_path, &addr, &ns.name);
    let operator = &mut op.0;
    wait_for("the operator ready", Duration::from_secs(60), || async {
        (http_get(&addr, "/readyz").map(|(c, _)| c) == Some(200)).then_some(())
    })
    .await;
    println!(
        "operator ready; log {}; generated {n} objects in {:?}",
        log_path.display(),
        started.elapsed()
    );

    // Create every object through the API server, PARALLEL at a time.
    let apis: Vec<Api<DynamicObject>> = kinds
        .iter()
        .map(|k| Api::namespaced_with(client.clone(), &ns.name, &k.resource))
        .collect();
    let pp = PostParams {
        field_manager: Some("random-specs".into()),
        ..PostParams::default()
    };
    let applying = Instant::now();
    let verdicts: Vec<(usize, Result<(), Refusal>)> =
        futures::stream::iter(cases.iter().enumerate().map(|(i, c)| {
            let api = apis[c.kind].clone();
            let obj: DynamicObject = serde_json::from_value(c.body.clone()).unwrap();
            let pp = pp.clone();
            async move { (i, api.create(&pp, &obj).await.map(|_| ()).map_err(refusal)) }
        }))
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    for (i, v) in verdicts {
        cases[i].verdict = Some(v);
    }
    println!("created in {:?}", applying.elapsed());

    // Counts per kind, and the refusals by message.
    let mut table: BTreeMap<String, usize> = BTreeMap::new();
    let mut unnamed = Vec::new();
    let mut disagree = Vec::new();
    for (k, kind) in kinds.iter().enumerate() {
        let of: Vec<&Case> = cases.iter().filter(|c| c.kind == k).collect();
        let accepted = of
            .iter()
            .filter(|c| matches!(c.verdict, Some(Ok(()))))
            .count();
        println!(
            "{:<16} {:>4} objects: {:>4} accepted, {:>4} refused",
            kind.kind,
            of.len(),
            accepted,
            of.len() - accepted
        );
    }
    for c in &cases {
        match c.verdict.as_ref().unwrap() {
            Ok(()) => {
                if !c.predicted.is_empty() {
                    disagree.push(format!(
                        "{}: accepted by the API server, refused offline: {:?}",
                        c.name, c.predicted
                    ));
                }
            }
            Err(r) => {
                if c.predicted.is_empty() {
                    disagree.push(format!(
                        "{}: refused by the API server ({}), accepted offline",
                        c.name, r.message
                    ));
                }
                if !r.message.contains("spec.") {
                    unnamed.push(format!("{}: {}", c.name, r.message));
                }
                // The API server adds this cause to any refusal that stopped before the CEL rules.
                let aux = "some validation rules were not checked";
                let mut keys: BTreeSet<String> = r
                    .causes
                    .iter()
                    .filter(|(_, m)| !m.contains(aux))
                    .map(|(f, m)| match f.as_str() {
                        // A rule on an object names its fields in its message.
                        "" | "<nil>" => fold_value(m),
                        f => format!("{}: {}", fold_indexes(f), fold_value(m)),
                    })
                    .collect();
                if keys.is_empty() {
                    keys.insert(r.message.clone());
                }
                for key in keys {
                    *table.entry(key).or_default() += 1;
                }
            }
        }
    }
    let mut rows: Vec<(&String, &usize)> = table.iter().collect();
    rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    println!("refusals by message (an object counts once per distinct message):");
    for (msg, count) in rows {
        println!("{count:>5}  {msg}");
    }
    assert!(
        unnamed.is_empty(),
        "refusals that name no spec field: {unnamed:#?}"
    );
    assert!(
        disagree.is_empty(),
        "the offline schema check and the API server disagree: {disagree:#?}"
    );

    // Every accepted object gets its status.
    let accepted: BTreeSet<String> = cases
        .iter()
        .filter(|c| matches!(c.verdict, Some(Ok(()))))
        .map(|c| format!("{}/{}", kinds[c.kind].kind, c.name))
        .collect();
    let settling = Instant::now();
    let mut problems: BTreeMap<String, String> = BTreeMap::new();
    let mut readies: BTreeMap<String, (String, String)> = BTreeMap::new();
    loop {
        problems.clear();
        readies.clear();
        for (k, api) in kinds.iter().zip(&apis) {
            let Ok(list) = api.list(&ListParams::default()).await else {
                problems.insert(k.kind.into(), "list failed".into());
                continue;
            };
            for o in &list.items {
                let key = format!("{}/{}", k.kind, o.metadata.name.clone().unwrap_or_default());
                if let Some(p) = status_problem(o) {
                    problems.insert(key.clone(), p);
                }
                if let Some(r) = ready_of(o) {
                    readies.insert(key, r);
                }
            }
        }
        for a in &accepted {
            if !readies.contains_key(a) && !problems.contains_key(a) {
                problems.insert(a.clone(), "not found".into());
            }
        }
        if problems.is_empty()
            || settling.elapsed() > SETTLE
            || operator.try_wait().unwrap().is_some()
        {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    println!(
        "{} of {} accepted objects with a status after {:?}",
        accepted.len() - problems.len(),
        accepted.len(),
        settling.elapsed()
    );

    // Settled: a QUIET window without writes or repeated reconciles of our objects, within
    // QUIET_WITHIN (jobs reach their activeDeadlineSeconds, pods start, Deployments roll out).
    let quieting = Instant::now();
    let mut window = BTreeMap::new();
    let mut quiet = false;
    while problems.is_empty() && quieting.elapsed() < QUIET_WITHIN {
        let from = std::fs::metadata(&log_path).unwrap().len() as usize;
        let writes_before = apiserver_writes();
        let metric_before = metric(&addr, "keelson_reconciles_total");
        tokio::time::sleep(QUIET).await;
        let text = std::fs::read(&log_path).unwrap();
        window = activity(&String::from_utf8_lossy(&text[from..]), &ns.name);
        let metric_after = metric(&addr, "keelson_reconciles_total");
        let writes: f64 = apiserver_writes()
            .iter()
            .filter(|(k, _)| {
                ["notebooks", "trainingjobs", "modeldeployments"]
                    .iter()
                    .any(|r| k.contains(r))
            })
            .map(|(k, v)| v - writes_before.get(k).copied().unwrap_or(0.0))
            .sum();
        println!(
            "over {QUIET:?}: {} reconciles of {} of our objects, {} of them writing; keelson_reconciles_total +{} (all namespaces); API server writes to keelson.dev resources +{writes} (cluster-wide)",
            window.values().map(|a| a.reconciles).sum::<u32>(),
            window.len(),
            window.values().map(|a| a.writes).sum::<u32>(),
            metric_after - metric_before
        );
        if settled(&window) {
            quiet = true;
            break;
        }
    }
    println!(
        "operator: {} reconciles, {} failed (all namespaces)",
        metric(&addr, "keelson_reconciles_total"),
        metric(&addr, "keelson_reconcile_errors_total")
    );

    // The process is alive and never panicked; a refused name never reached it.
    let alive = operator.try_wait().unwrap().is_none();
    let log = std::fs::read_to_string(&log_path).unwrap();
    let panics: Vec<&str> = log.lines().filter(|l| l.contains("panicked")).collect();
    let refused_seen: Vec<&String> = cases
        .iter()
        .filter(|c| matches!(c.verdict, Some(Err(_))))
        .map(|c| &c.name)
        .filter(|name| log.contains(name.as_str()))
        .collect();
    let all = activity(&log, &ns.name);
    let accepted_unseen: Vec<&String> = accepted
        .iter()
        .filter(|a| all.get(*a).is_none_or(|x| x.reconciles == 0))
        .collect();
    // An object whose last reconcile failed says why in its status.
    let failing_silently: Vec<String> = all
        .iter()
        .filter_map(|(k, a)| Some((k, a.last_error.as_ref()?)))
        .filter(|(k, _)| {
            readies
                .get(*k)
                .is_none_or(|(status, reason)| status == "True" || reason != "ChildRefused")
        })
        .map(|(k, e)| format!("{k}: Ready {:?}; last error: {e}", readies.get(k)))
        .collect();
    let mut reasons: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (k, (status, reason)) in &readies {
        let kind = k.split('/').next().unwrap_or_default().to_string();
        *reasons
            .entry((kind, format!("{status} {reason}")))
            .or_default() += 1;
    }
    println!("Ready conditions of the accepted objects:");
    for ((kind, ready), count) in &reasons {
        println!("{count:>5}  {kind:<16} {ready}");
    }

    // SIGTERM: the graceful path.
    if alive {
        let _ = Command::new("kill")
            .args(["-TERM", &operator.id().to_string()])
            .status();
        let stopping = Instant::now();
        while operator.try_wait().unwrap().is_none() && stopping.elapsed() < Duration::from_secs(30)
        {
            tokio::time::sleep(POLL).await;
        }
    }
    let _ = operator.kill();
    let exit = operator.wait().unwrap();
    println!(
        "operator {exit} after SIGTERM; total {:?}",
        started.elapsed()
    );

    assert!(alive, "the operator exited: see {}", log_path.display());
    assert!(panics.is_empty(), "the operator panicked: {panics:#?}");
    assert!(
        refused_seen.is_empty(),
        "refused objects in the operator's log: {refused_seen:?}"
    );
    assert!(
        accepted_unseen.is_empty(),
        "accepted objects never reconciled: {accepted_unseen:?}"
    );
    assert!(
        problems.is_empty(),
        "accepted objects without a status after {SETTLE:?} ({} of {}): {problems:#?}",
        problems.len(),
        accepted.len()
    );
    assert!(
        failing_silently.is_empty(),
        "objects whose reconciles fail without a ChildRefused condition: {failing_silently:#?}"
    );
    assert!(
        quiet,
        "the operator kept writing or reconciling settled objects: last {QUIET:?} window {:#?}",
        window
            .iter()
            .filter(|(_, a)| a.writes > 0 || a.reconciles > 2)
            .collect::<Vec<_>>()
    );
    assert!(exit.success(), "the operator's exit after SIGTERM: {exit}");
}
