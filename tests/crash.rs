//! Crash at every write. The real `keelson` binary runs, as the operator's ServiceAccount, behind a
//! proxy ([`support::proxy`]) that counts its writes in the namespace under test. For each kind, a
//! clean run (never killed) gives `W`, the writes of a full reconcile from create to Running (Events
//! included), and the world it ends in: the children controlled by the object, the pods (and
//! ReplicaSets) under them, and the status. Then for every `k` in `1..=W`, in a fresh namespace, the
//! proxy SIGKILLs the operator once the API server has answered its k-th write (before the answer is
//! relayed), the operator is restarted through the proxy, and the world must converge to exactly the
//! clean run's:
//!
//! - the same children by kind and name, the same number of pods under each, one ReplicaSet per
//!   Deployment; no pod outside the object's tree, no object labelled `managed-by: keelson` that the
//!   object does not control, nothing left terminating;
//! - the Notebook token the one seen right after the crash, unchanged once converged;
//! - the same status (timestamps aside): Ready True at the current generation, the same phase;
//! - nothing that existed at the crash replaced (same uids), and the restarted operator quiet.
//!
//! The number of status writes depends on which pod phases the operator happens to see, so a run may
//! settle with fewer than `k` writes: it is made again (up to [`ATTEMPTS`] runs), and a `k` that no
//! run reaches is reported as not reached, not as a failure.
//!
//! The three kinds run at once, each with its own proxy and operator. The proxy scopes its operator
//! to its namespace, and an admission policy ([`ISOLATION`]) keeps every other operator that may run
//! against the shared cluster (as the same ServiceAccount) from writing there.
//!
//! `KEELSON_CRASH_KINDS=Notebook,TrainingJob` runs only some kinds; `KEELSON_PROXY_TRACE=1` prints
//! every proxied request. Logs of the operator runs that failed stay in `target/crash/`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use keelson_testkit as support;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::Value;

use keelson_api::modeldeployment::ModelDeployment;
use keelson_api::notebook::Notebook;
use keelson_api::trainingjob::TrainingJob;
use support::proxy::{Proxy, Write};
use support::*;

/// How long one operator run may take to reach its k-th write, or to converge after a restart.
const STEP: Duration = Duration::from_secs(90);
/// No write for this long means the operator has settled.
const QUIET: Duration = Duration::from_secs(2);

/// The label of the namespaces of this test, selected by [`ISOLATION`].
const ISOLATION_LABEL: &str = "keelson.dev/crash-test";

/// Other operators may be running against the shared cluster (other tests' in-process operators,
/// each watching every namespace as the operator's ServiceAccount). In a namespace of this test, a
/// write by that ServiceAccount is refused unless it carries the mark of the proxy of that very
/// namespace: only the operator under test acts there, and it acts nowhere else (the proxy scopes it).
const ISOLATION: &str = "apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata:
  name: keelson-crash-test-isolation
spec:
  failurePolicy: Fail
  matchConstraints:
    namespaceSelector:
      matchExpressions:
        - {key: keelson.dev/crash-test, operator: Exists}
    resourceRules:
      - apiGroups: ['*']
        apiVersions: ['*']
        resources: ['*/*']
        operations: [CREATE, UPDATE, DELETE]
  matchConditions:
    - name: the-operator
      expression: request.userInfo.username == 'system:serviceaccount:keelson-system:keelson'
  validations:
    - expression: >-
        has(request.userInfo.extra) && 'keelson-crash-proxy' in request.userInfo.extra &&
        request.namespace in request.userInfo.extra['keelson-crash-proxy']
      message: this namespace belongs to a crash test; only the operator behind its proxy writes here
      reason: Forbidden
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata:
  name: keelson-crash-test-isolation
spec:
  policyName: keelson-crash-test-isolation
  validationActions: [Deny]
";

/// Installs [`ISOLATION`] and waits until the API server enforces it: an unmarked write by the
/// operator's ServiceAccount in a labelled namespace is refused.
async fn isolate() {
    tokio::task::spawn_blocking(|| {
        kubectl_ok(&["apply", "--server-side", "-f", "-"], Some(ISOLATION));
    })
    .await
    .expect("install the isolation policy");
    let ns = tokio::task::spawn_blocking(|| {
        let ns = Ns::new("crash-probe");
        kubectl_ok(
            &[
                "label",
                "namespace",
                &ns.name,
                &format!("{ISOLATION_LABEL}=true"),
            ],
            None,
        );
        ns
    })
    .await
    .expect("probe namespace");
    let api: Api<ConfigMap> = Api::namespaced(operator_client().await, &ns.name);
    let probe: ConfigMap =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "probe"}}))
            .expect("probe ConfigMap");
    wait_for("the isolation policy to be enforced", TIMEOUT, || async {
        match api.create(&kube::api::PostParams::default(), &probe).await {
            Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains("crash test") => {
                Some(())
            }
            Ok(_) => {
                let _ = api.delete("probe", &Default::default()).await;
                None
            }
            Err(_) => None,
        }
    })
    .await;
    tokio::task::spawn_blocking(move || drop(ns))
        .await
        .expect("drop the probe namespace");
}

/// One kind under test: a small object in the style of examples/. The model pods ask for a GPU: the
/// shared cluster's two CPU nodes (110 pods each) are sometimes filled by other tests.
struct Case {
    kind: &'static str,
    name: &'static str,
    api: ApiResource,
    yaml: &'static str,
    /// Claims to pre-bind a PersistentVolume to (the cluster has no provisioner).
    claims: &'static [(&'static str, &'static str)],
    /// `status.phase` when settled (ModelDeployment has none).
    phase: Option<&'static str>,
    /// Name of the token Secret (Notebook).
    token_secret: Option<&'static str>,
    /// The `Ready` condition's status when settled (False for a suspended Notebook).
    ready: bool,
    /// `Kind/name` of children the settled world must hold, and kinds it must not.
    must_hold: &'static [&'static str],
    must_not_hold: &'static [&'static str],
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            kind: "Notebook",
            name: "nb",
            api: ApiResource::erase::<Notebook>(&()),
            yaml: "apiVersion: keelson.dev/v1alpha1
kind: Notebook
metadata: {name: nb}
spec:
  image: quay.io/jupyter/pytorch-notebook:cuda12-2024-12-09
  gpus: {count: 1}
  workspace: {size: 1Gi, deletePolicy: Delete}
",
            claims: &[("nb-workspace", "1Gi")],
            phase: Some("Running"),
            token_secret: Some("nb-token"),
            ready: true,
            must_hold: &["NetworkPolicy/nb", "Secret/nb-token", "PersistentVolumeClaim/nb-workspace"],
            must_not_hold: &[],
        },
        // The culling path, as the idle culler leaves a notebook: spec.suspend true and the
        // culled-at annotation (kwok pods serve no /api/status, so the culler's own patch is not
        // among the writes here). At no crash point may the workspace or the token go, and no
        // pod may start.
        Case {
            kind: "Notebook",
            name: "nbc",
            api: ApiResource::erase::<Notebook>(&()),
            yaml: "apiVersion: keelson.dev/v1alpha1
kind: Notebook
metadata:
  name: nbc
  annotations: {keelson.dev/idle-culled-at: '2026-01-01T00:00:00Z'}
spec:
  image: quay.io/jupyter/pytorch-notebook:cuda12-2024-12-09
  idle: {timeout: 5m}
  suspend: true
  workspace: {size: 1Gi, deletePolicy: Delete}
",
            claims: &[("nbc-workspace", "1Gi")],
            phase: Some("Suspended"),
            token_secret: Some("nbc-token"),
            ready: false,
            must_hold: &["NetworkPolicy/nbc", "Secret/nbc-token", "PersistentVolumeClaim/nbc-workspace"],
            must_not_hold: &["Pod/"],
        },
        Case {
            kind: "TrainingJob",
            name: "tj",
            api: ApiResource::erase::<TrainingJob>(&()),
            yaml: "apiVersion: keelson.dev/v1alpha1
kind: TrainingJob
metadata: {name: tj}
spec:
  framework: PyTorch
  workers: 4
  image: ghcr.io/acme/trainer:1.4
  args: [train.py]
  gpus: {count: 1}
  volumes:
    - {name: scratch, mountPath: /scratch, emptyDir: {}}
",
            claims: &[],
            phase: Some("Running"),
            token_secret: None,
            ready: true,
            must_hold: &[],
            must_not_hold: &[],
        },
        Case {
            kind: "ModelDeployment",
            name: "md",
            api: ApiResource::erase::<ModelDeployment>(&()),
            yaml: "apiVersion: keelson.dev/v1alpha1
kind: ModelDeployment
metadata: {name: md}
spec:
  variants:
    - {name: champion, image: ghcr.io/acme/fraud-server:2.3, replicas: 2, weight: 90, gpus: {count: 1}}
    - {name: challenger, image: ghcr.io/acme/fraud-server:2.4, weight: 10, gpus: {count: 1}}
  traffic: {router: Builtin}
",
            claims: &[],
            phase: None,
            token_secret: None,
            ready: true,
            must_hold: &["Deployment/md-router", "ConfigMap/md-router", "Secret/md-router-key"],
            must_not_hold: &[],
        },
    ]
}

/// The operator binary, as its ServiceAccount, through the proxy.
struct Operator {
    child: Arc<Mutex<Child>>,
}

impl Operator {
    fn start(kubeconfig: &Path, log: &Path) -> Operator {
        let child = spawn_operator(
            kubeconfig,
            log,
            &["--health-addr", "", "--leader-elect", "false"],
            &[("RUST_LOG", &test_log("keelson=debug"))],
        );
        Operator {
            child: Arc::new(Mutex::new(child)),
        }
    }

    /// SIGKILL (if still running) and reap.
    fn stop(&self) {
        let mut c = self.child.lock().expect("operator process");
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Whether the process has exited, and how.
    fn exited(&self) -> Option<std::process::ExitStatus> {
        self.child
            .lock()
            .expect("operator process")
            .try_wait()
            .ok()
            .flatten()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What the test compares between the clean run and each crash run.
#[derive(Clone, Debug, PartialEq)]
struct World {
    /// `Kind/name` of every object whose controller is the object under test.
    children: BTreeSet<String>,
    /// Live pods per owner (`Notebook/nb`, `Deployment/md-champion`).
    pods: BTreeMap<String, usize>,
    /// ReplicaSets per Deployment (a second one would mean the template changed).
    replica_sets: BTreeMap<String, usize>,
    /// `status` without timestamps.
    status: Value,
}

/// One observation of a namespace.
struct Seen {
    world: World,
    /// Ready True, observedGeneration == generation, and the settled phase.
    settled: bool,
    token: Option<String>,
    /// Orphans, labelled objects without the owner, pods without an owner, objects terminating.
    problems: Vec<String>,
    /// uid of every object in the object's tree (children, their ReplicaSets and pods).
    uids: BTreeMap<String, String>,
}

fn controller(meta: &ObjectMeta) -> Option<(&str, &str, &str)> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true))
        .map(|r| (r.kind.as_str(), r.name.as_str(), r.uid.as_str()))
}

async fn list<K>(client: &Client, ns: &str) -> Result<Vec<K>, String>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default())
        .await
        .map(|l| l.items)
        .map_err(|e| format!("list {}: {e}", K::plural(&())))
}

/// Owned children of `uid` among `objs`, and the problems they show.
fn sort_children<K: Resource<DynamicType = ()>>(
    objs: &[K],
    uid: &str,
    children: &mut BTreeSet<String>,
    problems: &mut Vec<String>,
    uids: &mut BTreeMap<String, String>,
) {
    let kind = K::kind(&());
    for o in objs {
        let meta = o.meta();
        let name = o.name_any();
        let owned = controller(meta).is_some_and(|(_, _, u)| u == uid);
        let labelled = o
            .labels()
            .get("app.kubernetes.io/managed-by")
            .is_some_and(|v| v == "keelson");
        if owned {
            children.insert(format!("{kind}/{name}"));
            uids.insert(format!("{kind}/{name}"), o.uid().unwrap_or_default());
            if meta.deletion_timestamp.is_some() {
                problems.push(format!("{kind}/{name} is terminating"));
            }
        } else if labelled && !matches!(controller(meta), Some(("ReplicaSet", _, _))) {
            // (Pods of the object's Deployments are checked through their ReplicaSets.)
            problems.push(format!(
                "{kind}/{name} is labelled managed-by=keelson but not controlled by the object (owner {:?})",
                controller(meta)
            ));
        }
    }
}

/// The status without timestamps, and with the namespace's (random) name replaced by `<ns>`.
fn normalise_status(status: Option<&Value>, ns: &str) -> Value {
    let text = status
        .map(Value::to_string)
        .unwrap_or_else(|| "null".into());
    let mut s: Value = serde_json::from_str(&text.replace(ns, "<ns>")).unwrap_or(Value::Null);
    if let Some(m) = s.as_object_mut() {
        m.remove("startTime");
        m.remove("completionTime");
        if let Some(conds) = m.get_mut("conditions").and_then(Value::as_array_mut) {
            for c in conds {
                if let Some(c) = c.as_object_mut() {
                    c.remove("lastTransitionTime");
                }
            }
        }
    }
    s
}

async fn observe(client: &Client, case: &Case, ns: &str) -> Result<Seen, String> {
    let parents: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &case.api);
    let parent = parents
        .get(case.name)
        .await
        .map_err(|e| format!("get {} {}: {e}", case.kind, case.name))?;
    let uid = parent.uid().unwrap_or_default();
    let status = parent.data.get("status");
    let ready_true = status
        .and_then(|s| s.get("conditions"))
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.get("type").and_then(Value::as_str) == Some("Ready")
                    && c.get("status").and_then(Value::as_str) == Some("True")
            })
        });
    let observed = status
        .and_then(|s| s.get("observedGeneration"))
        .and_then(Value::as_i64);
    let phase = status.and_then(|s| s.get("phase")).and_then(Value::as_str);
    let ready_false = status
        .and_then(|s| s.get("conditions"))
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.get("type").and_then(Value::as_str) == Some("Ready")
                    && c.get("status").and_then(Value::as_str) == Some("False")
            })
        });
    let settled = (if case.ready { ready_true } else { ready_false })
        && observed.is_some()
        && observed == parent.metadata.generation
        && (case.phase.is_none() || phase == case.phase);

    let mut children = BTreeSet::new();
    let mut problems = Vec::new();
    let mut uids = BTreeMap::new();
    let pods: Vec<Pod> = list(client, ns).await?;
    let replica_sets: Vec<ReplicaSet> = list(client, ns).await?;
    let deployments: Vec<Deployment> = list(client, ns).await?;
    let secrets: Vec<Secret> = list(client, ns).await?;
    sort_children(&pods, &uid, &mut children, &mut problems, &mut uids);
    sort_children(
        &list::<Service>(client, ns).await?,
        &uid,
        &mut children,
        &mut problems,
        &mut uids,
    );
    sort_children(&secrets, &uid, &mut children, &mut problems, &mut uids);
    sort_children(
        &list::<ConfigMap>(client, ns).await?,
        &uid,
        &mut children,
        &mut problems,
        &mut uids,
    );
    sort_children(
        &list::<PersistentVolumeClaim>(client, ns).await?,
        &uid,
        &mut children,
        &mut problems,
        &mut uids,
    );
    sort_children(&deployments, &uid, &mut children, &mut problems, &mut uids);
    sort_children(
        &list::<NetworkPolicy>(client, ns).await?,
        &uid,
        &mut children,
        &mut problems,
        &mut uids,
    );
    for want in case.must_hold {
        if !children.contains(*want) {
            problems.push(format!("{want} is missing"));
        }
    }
    for kind in case.must_not_hold {
        if let Some(c) = children.iter().find(|c| c.starts_with(kind)) {
            problems.push(format!("{c} must not exist"));
        }
    }

    // ReplicaSets belong to the object's Deployments; pods to the object or to those ReplicaSets.
    let mut rs_owner: BTreeMap<String, String> = BTreeMap::new();
    let mut rs_count: BTreeMap<String, usize> = BTreeMap::new();
    for rs in &replica_sets {
        match controller(&rs.metadata) {
            Some(("Deployment", d, _)) if children.contains(&format!("Deployment/{d}")) => {
                rs_owner.insert(rs.uid().unwrap_or_default(), format!("Deployment/{d}"));
                uids.insert(
                    format!("ReplicaSet/{}", rs.name_any()),
                    rs.uid().unwrap_or_default(),
                );
                *rs_count.entry(format!("Deployment/{d}")).or_default() += 1;
            }
            other => problems.push(format!(
                "ReplicaSet/{} not under a Deployment of the object (owner {other:?})",
                rs.name_any()
            )),
        }
    }
    let mut pod_count: BTreeMap<String, usize> = BTreeMap::new();
    for p in &pods {
        let owner = match controller(&p.metadata) {
            Some((_, _, u)) if u == uid => Some(format!("{}/{}", case.kind, case.name)),
            Some(("ReplicaSet", _, u)) => rs_owner.get(u).cloned(),
            _ => None,
        };
        match owner {
            None => problems.push(format!(
                "Pod/{} has no owner in the object's tree (owner {:?})",
                p.name_any(),
                controller(&p.metadata)
            )),
            Some(_) if p.metadata.deletion_timestamp.is_some() => {
                problems.push(format!("Pod/{} is terminating", p.name_any()));
            }
            Some(o) => {
                *pod_count.entry(o).or_default() += 1;
                uids.insert(format!("Pod/{}", p.name_any()), p.uid().unwrap_or_default());
            }
        }
    }
    let token = case.token_secret.and_then(|name| {
        let s = secrets.iter().find(|s| s.name_any() == name)?;
        let t = s.data.as_ref()?.get("token")?;
        Some(String::from_utf8_lossy(&t.0).into_owned())
    });
    Ok(Seen {
        world: World {
            children,
            pods: pod_count,
            replica_sets: rs_count,
            status: normalise_status(status, ns),
        },
        settled,
        token,
        problems,
        uids,
    })
}

/// Polls `f` every [`POLL`] until it returns `Ok(Some)`; an `Err` from `f` ends the wait; after
/// `timeout`, `Err` with `what` and the last reason `f` gave (its `Ok(None)` carries none, so `f`
/// records it in `last`).
async fn until<T, F, Fut>(
    what: &str,
    timeout: Duration,
    last: &Mutex<String>,
    mut f: F,
) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>, String>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            return Err(format!(
                "timed out after {timeout:?} waiting for {what}: {}",
                last.lock().expect("last").as_str()
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until the proxy has counted no write for [`QUIET`]; returns the number of writes.
async fn settle(proxy: &Proxy) -> Result<usize, String> {
    let last = Mutex::new(String::new());
    let mut n = proxy.writes().len();
    let mut since = Instant::now();
    until("the operator to stop writing", STEP, &last, || {
        let now = proxy.writes().len();
        if now != n {
            n = now;
            since = Instant::now();
        }
        *last.lock().expect("last") = format!("{now} writes so far");
        let quiet = since.elapsed() >= QUIET;
        async move { Ok(quiet.then_some(now)) }
    })
    .await
}

fn diff(want: &World, seen: &Seen) -> String {
    let mut out = String::new();
    let w = &seen.world;
    if w.children != want.children {
        let _ = write!(
            out,
            "children missing {:?}, extra {:?}; ",
            want.children.difference(&w.children).collect::<Vec<_>>(),
            w.children.difference(&want.children).collect::<Vec<_>>()
        );
    }
    if w.pods != want.pods {
        let _ = write!(out, "pods {:?}, want {:?}; ", w.pods, want.pods);
    }
    if w.replica_sets != want.replica_sets {
        let _ = write!(
            out,
            "ReplicaSets {:?}, want {:?}; ",
            w.replica_sets, want.replica_sets
        );
    }
    if w.status != want.status {
        let _ = write!(out, "status {}, want {}; ", w.status, want.status);
    }
    if !seen.problems.is_empty() {
        let _ = write!(out, "problems {:?}; ", seen.problems);
    }
    if !seen.settled {
        out.push_str("not settled (Ready True at the current generation, phase); ");
    }
    out
}

/// A namespace of one run, with the volumes its claims need.
struct RunNs {
    ns: Option<Ns>,
    pvs: Vec<String>,
}

impl RunNs {
    async fn new(case: &Case) -> RunNs {
        let prefix = format!("crash-{}", case.name);
        let claims = case.claims;
        tokio::task::spawn_blocking(move || {
            let ns = Ns::new(&prefix);
            kubectl_ok(
                &[
                    "label",
                    "namespace",
                    &ns.name,
                    &format!("{ISOLATION_LABEL}=true"),
                ],
                None,
            );
            let pvs = claims
                .iter()
                .map(|(claim, size)| {
                    ns.pv_for(claim, size);
                    format!("{}-{claim}", ns.name)
                })
                .collect();
            RunNs { ns: Some(ns), pvs }
        })
        .await
        .expect("namespace")
    }

    fn name(&self) -> String {
        self.ns.as_ref().map(|n| n.name.clone()).unwrap_or_default()
    }

    /// Deletes the namespace and the volumes (without waiting).
    async fn delete(mut self) {
        let ns = self.ns.take();
        let pvs = std::mem::take(&mut self.pvs);
        tokio::task::spawn_blocking(move || {
            drop(ns);
            if std::env::var("KEEP_NAMESPACES").is_err() {
                for pv in pvs {
                    let _ = kubectl(&["delete", "pv", &pv, "--wait=false"], None);
                }
            }
        })
        .await
        .expect("cleanup");
    }
}

async fn create(client: &Client, case: &Case, ns: &str) -> Result<(), String> {
    let obj: Value = serde_yaml::from_str(case.yaml).map_err(|e| e.to_string())?;
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &case.api);
    api.patch(
        case.name,
        &PatchParams::apply("test-user"),
        &Patch::Apply(&obj),
    )
    .await
    .map(|_| ())
    .map_err(|e| format!("apply {} {}: {e}", case.kind, case.name))
}

fn logs_dir() -> PathBuf {
    let d = root().join("target/crash");
    std::fs::create_dir_all(&d).expect("target/crash");
    d
}

/// The clean run's result.
struct Clean {
    writes: Vec<Write>,
    /// Writes made when Ready was first seen (the rest came after).
    at_ready: usize,
    world: World,
    took: Duration,
}

async fn clean_run(
    client: &Client,
    case: &Case,
    proxy: &Proxy,
    kc: &Path,
) -> Result<Clean, String> {
    let ns = RunNs::new(case).await;
    let name = ns.name();
    proxy.reset(&name, None);
    let log = logs_dir().join(format!("{}-clean.log", case.name));
    let op = Operator::start(kc, &log);
    let r = async {
        let start = Instant::now();
        create(client, case, &name).await?;
        let last = Mutex::new(String::new());
        until(
            &format!("{} {} settled in the clean run", case.kind, name),
            STEP,
            &last,
            || async {
                let seen = observe(client, case, &name).await?;
                *last.lock().expect("last") = format!("{:?} {:?}", seen.world, seen.problems);
                Ok((seen.settled && seen.problems.is_empty()).then_some(()))
            },
        )
        .await?;
        let took = start.elapsed();
        let at_ready = proxy.writes().len();
        let w = settle(proxy).await?;
        let seen = observe(client, case, &name).await?;
        if !seen.settled || !seen.problems.is_empty() {
            return Err(format!(
                "the clean run did not stay settled: {:?}",
                seen.problems
            ));
        }
        if case.token_secret.is_some() && seen.token.as_deref().is_none_or(str::is_empty) {
            return Err("the clean run has no token".into());
        }
        let writes = proxy.writes();
        if writes.len() != w {
            return Err(format!(
                "the operator wrote again after settling: {writes:?}"
            ));
        }
        Ok(Clean {
            writes,
            at_ready,
            world: seen.world,
            took,
        })
    }
    .await;
    let exited = op.exited();
    drop(op);
    ns.delete().await;
    match exited {
        Some(status) => Err(format!(
            "the operator exited ({status}); log {}",
            log.display()
        )),
        None => r,
    }
}

/// One crash run's outcome.
struct Row {
    k: usize,
    write: String,
    in_flight: Vec<String>,
    token_at_crash: bool,
    converged: Option<Duration>,
    /// Runs that settled with fewer than k writes before one reached the k-th (the number of
    /// status writes depends on when the pods' phases are seen), and how many writes each made.
    short_runs: Vec<usize>,
    result: Result<(), String>,
}

/// Runs made for one k when earlier ones settle with fewer than k writes.
const ATTEMPTS: usize = 3;

async fn crash_run(
    client: &Client,
    case: &Case,
    proxy: &Proxy,
    kc: &Path,
    clean: &World,
    k: usize,
) -> Row {
    let mut row = Row {
        k,
        write: String::from("-"),
        in_flight: Vec::new(),
        token_at_crash: false,
        converged: None,
        short_runs: Vec::new(),
        result: Ok(()),
    };
    for _ in 0..ATTEMPTS {
        match attempt(client, case, proxy, kc, clean, &mut row).await {
            Ok(None) => return row,
            Ok(Some(writes)) => row.short_runs.push(writes),
            Err(e) => {
                row.result = Err(e);
                return row;
            }
        }
    }
    row
}

/// One run for `row.k`, in a fresh namespace. `Ok(Some(n))` when the run settled after `n < k`
/// writes, so that there was nothing to crash after.
async fn attempt(
    client: &Client,
    case: &Case,
    proxy: &Proxy,
    kc: &Path,
    clean: &World,
    row: &mut Row,
) -> Result<Option<usize>, String> {
    let k = row.k;
    let ns = RunNs::new(case).await;
    let name = ns.name();
    let logs = logs_dir();
    let first_log = logs.join(format!("{}-k{k}-killed.log", case.name));
    let second_log = logs.join(format!("{}-k{k}-restarted.log", case.name));
    let r = async {
        proxy.reset(&name, Some(k));
        let first = Operator::start(kc, &first_log);
        proxy.set_victim(first.child.clone());
        create(client, case, &name).await?;

        // The kill, or a run that settles short of k writes.
        let mut killed = proxy.killed();
        let start = Instant::now();
        let (mut count, mut since) = (0, Instant::now());
        let kill = loop {
            if let Some(kill) = killed.borrow_and_update().clone() {
                break kill;
            }
            let now = proxy.writes().len();
            if now != count {
                (count, since) = (now, Instant::now());
            }
            if since.elapsed() >= QUIET {
                let seen = observe(client, case, &name).await?;
                if seen.settled && seen.problems.is_empty() && proxy.writes().len() == count {
                    return Ok(Some(count));
                }
            }
            if start.elapsed() > STEP {
                return Err(format!(
                    "neither the kill nor a settled world within {STEP:?}: the run made {} writes ({:?}); log {}",
                    count,
                    proxy.writes().iter().map(Write::short).collect::<Vec<_>>(),
                    first_log.display()
                ));
            }
            tokio::select! {
                _ = killed.changed() => {}
                _ = tokio::time::sleep(POLL) => {}
            }
        };
        first.stop();
        drop(first);
        row.write = format!("{} -> {}", kill.write.short(), kill.write.status);
        let at_crash = observe(client, case, &name).await?;
        let token_at_crash = at_crash.token.clone();
        row.token_at_crash = token_at_crash.is_some();

        proxy.disarm();
        let restarted = Instant::now();
        let second = Operator::start(kc, &second_log);
        let last = Mutex::new(String::new());
        let seen_token = until(
            &format!("{} {name} to converge after the restart", case.kind),
            STEP,
            &last,
            || async {
                let seen = observe(client, case, &name).await?;
                if let (Some(a), Some(b)) = (&token_at_crash, &seen.token) {
                    if a != b {
                        return Err(format!("the token changed after the crash: {a:?} -> {b:?}"));
                    }
                }
                *last.lock().expect("last") = diff(clean, &seen);
                let ok = seen.settled
                    && seen.problems.is_empty()
                    && &seen.world == clean
                    && (case.token_secret.is_none() || seen.token.is_some());
                Ok(ok.then_some(seen.token))
            },
        )
        .await?;
        row.converged = Some(restarted.elapsed());
        // Settled: no more writes, and the world stays as it is.
        settle(proxy).await?;
        let seen = observe(client, case, &name).await?;
        if &seen.world != clean || !seen.problems.is_empty() || !seen.settled {
            return Err(format!(
                "the world moved after converging: {}",
                diff(clean, &seen)
            ));
        }
        if seen.token != seen_token {
            return Err(format!(
                "the token changed after converging: {seen_token:?} -> {:?}",
                seen.token
            ));
        }
        // Nothing that was there at the crash was replaced (a pod re-created for nothing is a
        // restarted notebook or training worker).
        let replaced: Vec<&String> = at_crash
            .uids
            .iter()
            .filter(|(key, uid)| seen.uids.get(*key) != Some(uid))
            .map(|(key, _)| key)
            .collect();
        if !replaced.is_empty() {
            return Err(format!(
                "replaced or deleted after the restart: {replaced:?}"
            ));
        }
        if let Some(s) = second.exited() {
            return Err(format!(
                "the restarted operator exited ({s}); log {}",
                second_log.display()
            ));
        }
        drop(second);
        Ok(None)
    }
    .await;
    row.in_flight = proxy.in_flight_at_kill().iter().map(Write::short).collect();
    if r.is_ok() {
        let _ = std::fs::remove_file(&first_log);
        let _ = std::fs::remove_file(&second_log);
    }
    ns.delete().await;
    r
}

/// Everything about one kind, for the report.
struct Report {
    kind: &'static str,
    clean: Result<Clean, String>,
    rows: Vec<Row>,
}

async fn crash_kind(client: Client, case: Case) -> Report {
    let proxy = Proxy::start(client.clone()).await;
    let kc = logs_dir().join(format!("{}-kubeconfig", case.name));
    proxy.write_kubeconfig(&kc);
    let clean = clean_run(&client, &case, &proxy, &kc).await;
    let mut rows = Vec::new();
    if let Ok(c) = &clean {
        for k in 1..=c.writes.len() {
            let row = crash_run(&client, &case, &proxy, &kc, &c.world, k).await;
            eprintln!("{} k={k}: {} {}", case.kind, row.write, outcome(&row));
            rows.push(row);
        }
    }
    Report {
        kind: case.kind,
        clean,
        rows,
    }
}

/// `ok`, `not reached` (every run settled with fewer than k writes) or `FAIL: why`.
fn outcome(r: &Row) -> String {
    let short = if r.short_runs.is_empty() {
        String::new()
    } else {
        format!(
            " ({} run(s) settled after {:?} writes first)",
            r.short_runs.len(),
            r.short_runs
        )
    };
    match (&r.result, r.converged) {
        (Err(e), _) => format!("FAIL: {e}"),
        (Ok(()), Some(_)) => format!("ok{short}"),
        (Ok(()), None) => format!(
            "not reached: {ATTEMPTS} runs settled after {:?} writes",
            r.short_runs
        ),
    }
}

fn print(report: &Report) -> bool {
    let mut ok = true;
    let mut out = String::new();
    match &report.clean {
        Err(e) => {
            let _ = writeln!(out, "{}: the clean run failed: {e}", report.kind);
            ok = false;
        }
        Ok(c) => {
            let _ = writeln!(
                out,
                "{}: W = {} writes from create to settled (clean run: Ready after {:.1} s)",
                report.kind,
                c.writes.len(),
                c.took.as_secs_f64()
            );
            for w in &c.writes {
                let _ = writeln!(
                    out,
                    "  {:>2}. {} -> {}{}",
                    w.n,
                    w.short(),
                    w.status,
                    if w.n == c.at_ready + 1 {
                        "   (Ready seen before this write)"
                    } else {
                        ""
                    }
                );
            }
            let _ = writeln!(
                out,
                "  {:>2}  {:<52} {:<8} {:>9}  result",
                "k", "k-th write (killed after its answer)", "token", "converged"
            );
            for r in &report.rows {
                let _ = writeln!(
                    out,
                    "  {:>2}  {:<52} {:<8} {:>9}  {}{}",
                    r.k,
                    r.write,
                    if r.token_at_crash { "existed" } else { "-" },
                    r.converged
                        .map(|d| format!("{:.1} s", d.as_secs_f64()))
                        .unwrap_or_else(|| "-".into()),
                    outcome(r),
                    if r.in_flight.is_empty() {
                        String::new()
                    } else {
                        format!(" (in flight at the kill: {})", r.in_flight.join(", "))
                    }
                );
                ok &= r.result.is_ok();
            }
        }
    }
    println!("{out}");
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_after_any_write_converges_to_the_clean_world() {
    let start = Instant::now();
    tokio::task::spawn_blocking(cluster).await.expect("cluster");
    isolate().await;
    let client = client().await;
    let only = std::env::var("KEELSON_CRASH_KINDS").ok();
    let tasks: Vec<_> = cases()
        .into_iter()
        .filter(|c| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|k| k == c.kind))
        })
        .map(|c| tokio::spawn(crash_kind(client.clone(), c)))
        .collect();
    let mut ok = true;
    for t in tasks {
        let report = t.await.expect("a kind's task panicked");
        ok &= print(&report);
    }
    println!("crash suite: {:.0} s in all", start.elapsed().as_secs_f64());
    assert!(
        ok,
        "a crash did not converge to the clean world (see the tables above)"
    );
}

#[test]
fn cluster_wide_lists_are_scoped_to_the_namespace() {
    use support::proxy::scope;
    assert_eq!(
        scope("/api/v1/pods?watch=true&labelSelector=a%3Db", "t"),
        "/api/v1/namespaces/t/pods?watch=true&labelSelector=a%3Db"
    );
    assert_eq!(
        scope("/apis/keelson.dev/v1alpha1/notebooks", "t"),
        "/apis/keelson.dev/v1alpha1/namespaces/t/notebooks"
    );
    assert_eq!(scope("/api/v1/nodes", "t"), "/api/v1/nodes");
    assert_eq!(scope("/version", "t"), "/version");
    assert_eq!(
        scope("/api/v1/namespaces/o/pods", "t"),
        "/api/v1/namespaces/o/pods"
    );
}
