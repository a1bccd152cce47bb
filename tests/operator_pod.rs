//! The operator installed as a pod on the real node (`keelson-node-0`), from `config/default` and from
//! the Helm chart, with the `keelson.dev/keelson:dev` image that `make image` builds and imports.
//!
//! `config_default_pod_reconciles_and_survives_a_killed_leader` proves:
//!
//! - `kubectl apply --server-side -k` of a kustomize overlay of `config/default` (made by the test: the
//!   image, `KEELSON_ROUTER_IMAGE`, the real node's toleration and node selector, nothing else)
//!   installs an operator pod that runs on keelson-node-0; its process (read on the host through the
//!   CRI) runs as uid/gid 65532 with a read-only root filesystem, and the pod becomes Ready through the
//!   kubelet's probes (`/readyz` also answers on the pod IP);
//! - it takes the Lease `keelson-system/keelson-leader` (holder = the pod's name) and reconciles a
//!   TrainingJob (status with observedGeneration and conditions, its Service and worker pods), which
//!   proves the RBAC of `config/rbac` from inside the cluster, with the pod's own token, through the
//!   `kubernetes` Service (kube-rs' in-cluster config: `KUBERNETES_SERVICE_HOST`, the ClusterIP of
//!   `kubernetes.default.svc`, routed by kube-proxy);
//! - with the operator crashed in the middle of a burst of 30 TrainingJobs (its process SIGKILLed,
//!   so the Lease is not released, and its pod force-deleted), the Deployment's new pod takes the
//!   Lease once it expires and converges every job: each has exactly its Service and its worker pods, owned
//!   by it, nothing else labelled as Keelson's exists, and every child that existed at the kill keeps
//!   its UID (nothing was created twice or replaced).
//!
//! `helm_chart_pod_reconciles_and_uninstalls` proves the same for `helm install` of `charts/keelson`
//! (release `keelson-helm` in namespace `keelson-helm`, which enforces the `restricted` Pod Security
//! Standard; the same overrides through `--set`): Ready on the real node, the Lease in the release
//! namespace, a TrainingJob reconciled; `helm uninstall` removes the operator and its RBAC and leaves
//! the CRDs.
//!
//! Other suites run an in-process operator against the same cluster, as the operator's ServiceAccount
//! (impersonated). In this test's namespaces an admission policy ([`ISOLATION`]) refuses every write of
//! that identity that does not carry a pod-bound service-account token, so only an operator running
//! in a pod acts there: what converges, the pod did. The operator pods live only while a test runs;
//! everything the tests create is removed at the end (the CRDs, and `keelson-system` with its
//! ServiceAccount and RBAC, which every suite installs, stay).
//!
//! Needs the real node (`REAL_NODE=1 make cluster`) and the image (`make image`); fails, not skips,
//! without them. Run with `cargo test --test operator_pod -- --test-threads=1`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use keelson_testkit as support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{ApiResource, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::Value;

use keelson_api::trainingjob::TrainingJob;

const IMAGE: &str = "keelson.dev/keelson:dev";
const KUSTOMIZE_NS: &str = "keelson-system";
const HELM_NS: &str = "keelson-helm";
const HELM_RELEASE: &str = "keelson-helm";
const LEASE: &str = "keelson-leader";
/// The operator pods of config/default and of the chart.
const OPERATOR_PODS: &str = "app.kubernetes.io/name=keelson,app.kubernetes.io/component=operator";
/// The label of this test's namespaces, selected by [`ISOLATION`].
const TEST_LABEL: &str = "keelson.dev/operator-pod-test";
/// The burst of part (b).
const JOBS: usize = 30;
/// Pod start, image present: seconds; generous for 2 busy cores.
const START: Duration = Duration::from_secs(180);
const CONVERGE: Duration = Duration::from_secs(180);

/// One operator at a time, even when the test harness runs tests in parallel.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// In a namespace of this test, a write by the operator's ServiceAccount is refused unless its token
/// is bound to a pod (the API server then puts the pod's name in the user's extra): the operator
/// pods act, the in-process operators of other suites (impersonating that ServiceAccount) do not.
const ISOLATION: &str = "apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata:
  name: keelson-operator-pod-test
spec:
  failurePolicy: Fail
  matchConstraints:
    namespaceSelector:
      matchExpressions:
        - {key: keelson.dev/operator-pod-test, operator: Exists}
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
        has(request.userInfo.extra) &&
        'authentication.kubernetes.io/pod-name' in request.userInfo.extra
      message: this namespace belongs to the operator-pod test; only an operator pod writes here
      reason: Forbidden
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata:
  name: keelson-operator-pod-test
spec:
  policyName: keelson-operator-pod-test
  validationActions: [Deny]
";

// --- helpers ---------------------------------------------------------------------------------

fn kubectl(args: &[&str]) -> (bool, String) {
    let o = support::kubectl(args, None);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

fn kubectl_in(args: &[&str], stdin: &str) -> String {
    let o = support::kubectl(args, Some(stdin));
    assert!(
        o.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Fails (never skips) unless keelson-node-0 is Ready and has the operator's image.
fn require_real_node() {
    support::real_node(&[IMAGE]);
}

/// Polls `f` until it returns Some; on timeout, panics with `what` and the operator's state in `ns`.
async fn wait<T, F, Fut>(what: &str, ns: &str, timeout: Duration, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let poll = Duration::from_millis(100);
    support::wait_explained(what, timeout, poll, || operator_state(ns), f).await
}

/// `kubectl describe` and the logs of the operator pods in `ns`, for a failure message.
fn operator_state(ns: &str) -> String {
    let (_, describe) = kubectl(&["-n", ns, "describe", "pods", "-l", OPERATOR_PODS]);
    let (_, logs) = kubectl(&[
        "-n",
        ns,
        "logs",
        "-l",
        OPERATOR_PODS,
        "--tail=40",
        "--all-containers",
        "--prefix",
    ]);
    format!("--- operator pods in {ns}:\n{describe}\n--- logs:\n{logs}")
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The one operator pod of `ns` that is Ready and not being deleted, other than `not`.
async fn ready_operator(client: &Client, ns: &str, not: Option<&str>) -> Pod {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let what = format!("a Ready operator pod in {ns}");
    wait(&what, ns, START, || {
        let pods = pods.clone();
        async move {
            let list = pods
                .list(&ListParams::default().labels(OPERATOR_PODS))
                .await
                .ok()?;
            list.items.into_iter().find(|p| {
                p.metadata.deletion_timestamp.is_none()
                    && Some(p.name_any().as_str()) != not
                    && is_ready(p)
            })
        }
    })
    .await
}

fn lease_holder(ns: &str) -> String {
    let (_, out) = kubectl(&[
        "-n",
        ns,
        "get",
        "lease",
        LEASE,
        "-o",
        "jsonpath={.spec.holderIdentity}",
        "--ignore-not-found",
    ]);
    out.trim().to_string()
}

async fn wait_lease(ns: &str, pod: &str) {
    let what = format!("Lease {ns}/{LEASE} held by {pod}");
    wait(&what, ns, Duration::from_secs(60), move || async move {
        (lease_holder(ns) == pod).then_some(())
    })
    .await;
}

/// The host pid of the running operator container of pod `ns/name`, through the CRI.
fn container_pid(ns: &str, name: &str) -> u64 {
    let crictl = support::root().join("target/cluster/bin/crictl");
    let cri = |args: &[&str]| -> String {
        let o = Command::new(&crictl)
            .args([
                "--runtime-endpoint",
                "unix:///run/keelson-containerd/containerd.sock",
                "--timeout",
                "30s",
            ])
            .args(args)
            .output()
            .expect("run crictl");
        assert!(
            o.status.success(),
            "crictl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let ps: Value = serde_json::from_str(&cri(&[
        "ps",
        "--state",
        "running",
        "--label",
        &format!("io.kubernetes.pod.name={name}"),
        "--label",
        &format!("io.kubernetes.pod.namespace={ns}"),
        "-o",
        "json",
    ]))
    .expect("crictl ps JSON");
    let id = ps["containers"][0]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no running container of {ns}/{name} in containerd: {ps}"));
    let inspect: Value = serde_json::from_str(&cri(&["inspect", id])).expect("crictl inspect");
    inspect["info"]["pid"]
        .as_u64()
        .expect("the container's pid")
}

/// The pod runs on the real node, and its process (found through the CRI) runs as 65532 with a
/// read-only root filesystem; the kubelet's probes made it Ready and `/readyz` answers on its IP.
fn assert_runs_hardened(pod: &Pod) {
    let name = pod.name_any();
    let ns = pod.namespace().unwrap_or_default();
    let spec = pod.spec.as_ref().expect("pod spec");
    assert_eq!(
        spec.node_name.as_deref(),
        Some(support::REAL_NODE),
        "{ns}/{name} is not on the real node"
    );
    let c = &spec.containers[0];
    assert!(
        c.readiness_probe.is_some() && c.liveness_probe.is_some(),
        "probes"
    );

    let pid = container_pid(&ns, &name);
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
    for field in ["Uid:", "Gid:"] {
        let ids: Vec<&str> = status
            .lines()
            .find(|l| l.starts_with(field))
            .expect("Uid/Gid line")
            .split_whitespace()
            .skip(1)
            .collect();
        assert_eq!(
            ids, ["65532"; 4],
            "{field} of the operator process {pid} ({ns}/{name})"
        );
    }
    let mountinfo =
        std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("/proc/<pid>/mountinfo");
    let root = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .expect("the process's root mount");
    let opts = root.split_whitespace().nth(5).unwrap_or_default();
    assert!(
        opts.split(',').any(|o| o == "ro"),
        "the root filesystem of {ns}/{name} is not read-only: {root}"
    );

    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("pod IP");
    let ready = support::http_get(&format!("{ip}:8080"), "/readyz");
    assert_eq!(ready.map(|(c, _)| c), Some(200), "/readyz on {ip}:8080");
}

/// A namespace of this test, isolated by [`ISOLATION`].
fn test_ns(prefix: &str) -> support::Ns {
    let ns = support::Ns::new(prefix);
    ns.kubectl(&[
        "label",
        "namespace",
        &ns.name,
        &format!("{TEST_LABEL}=true"),
    ]);
    ns
}

/// Installs [`ISOLATION`] and waits until the API server enforces it.
struct Isolation;

impl Isolation {
    fn install() -> Isolation {
        kubectl_in(&["apply", "--server-side", "-f", "-"], ISOLATION);
        let probe = test_ns("oppod-isolation");
        support::wait_sync(Duration::from_secs(30), || {
            let (ok, out) = kubectl(&[
                "-n",
                &probe.name,
                "create",
                "configmap",
                "probe",
                "--as",
                support::OPERATOR_USER,
                "--as-group",
                "system:serviceaccounts",
            ]);
            !ok && out.contains("only an operator pod writes here")
        });
        Isolation
    }
}

impl Drop for Isolation {
    fn drop(&mut self) {
        let _ = kubectl(&[
            "delete",
            "validatingadmissionpolicybinding,validatingadmissionpolicy",
            "keelson-operator-pod-test",
            "--ignore-not-found",
        ]);
    }
}

fn trainingjob(name: &str, workers: usize) -> String {
    format!(
        "apiVersion: keelson.dev/v1alpha1
kind: TrainingJob
metadata: {{name: {name}}}
spec:
  framework: PyTorch
  workers: {workers}
  image: keelson.dev/trainer:dev
"
    )
}

fn jobs_api(client: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &ApiResource::erase::<TrainingJob>(&()))
}

/// A job's status describes its current generation and has conditions.
fn converged(job: &DynamicObject) -> bool {
    let status = &job.data["status"];
    status["observedGeneration"].as_i64().is_some()
        && status["observedGeneration"].as_i64() == job.metadata.generation
        && status["conditions"]
            .as_array()
            .is_some_and(|c| !c.is_empty())
}

/// Children of TrainingJobs in `ns` by (kind, name): (uid, controller owner's uid, owner-name label).
async fn children(
    client: &Client,
    ns: &str,
) -> BTreeMap<(String, String), (String, String, String)> {
    let lp = ListParams::default().labels("app.kubernetes.io/managed-by=keelson");
    let mut out = BTreeMap::new();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let svcs: Api<Service> = Api::namespaced(client.clone(), ns);
    let mut metas = Vec::new();
    for p in pods.list(&lp).await.expect("list pods").items {
        metas.push(("Pod", p.metadata));
    }
    for s in svcs.list(&lp).await.expect("list services").items {
        metas.push(("Service", s.metadata));
    }
    for (kind, m) in metas {
        let owner = m
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true))
            .map(|o| o.uid.clone())
            .unwrap_or_default();
        let owner_name = m
            .labels
            .as_ref()
            .and_then(|l| l.get("keelson.dev/owner-name").cloned())
            .unwrap_or_default();
        out.insert(
            (kind.to_string(), m.name.unwrap_or_default()),
            (m.uid.unwrap_or_default(), owner, owner_name),
        );
    }
    out
}

/// One TrainingJob reconciled by the operator pod: status, Service and worker pods.
async fn assert_reconciles(client: &Client, ns: &str, operator_ns: &str) {
    kubectl_in(
        &["-n", ns, "apply", "--server-side", "-f", "-"],
        &trainingjob("probe", 2),
    );
    let jobs = jobs_api(client, ns);
    let job = wait(
        "TrainingJob probe reconciled",
        operator_ns,
        CONVERGE,
        || {
            let jobs = jobs.clone();
            async move { jobs.get("probe").await.ok().filter(converged) }
        },
    )
    .await;
    let conditions: BTreeSet<String> = job.data["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["type"].as_str().map(str::to_string))
        .collect();
    assert!(conditions.contains("Created"), "conditions {conditions:?}");
    let want: BTreeSet<(String, String)> = [
        ("Service", "probe"),
        ("Pod", "probe-worker-0"),
        ("Pod", "probe-worker-1"),
    ]
    .iter()
    .map(|(k, n)| (k.to_string(), n.to_string()))
    .collect();
    let want = &want;
    let got = wait(
        "the probe job's children",
        operator_ns,
        CONVERGE,
        move || async move {
            let c = children(client, ns).await;
            (c.keys().cloned().collect::<BTreeSet<_>>() == *want).then_some(c)
        },
    )
    .await;
    let uid = job.uid().expect("job uid");
    for (k, (_, owner, _)) in &got {
        assert_eq!(owner, &uid, "{k:?} is not controlled by the job");
    }
}

// --- the kustomize install -------------------------------------------------------------------

/// The overlay of config/default that the test applies, in a directory under target/ (kustomize
/// takes only relative paths to a base).
struct Overlay {
    dir: PathBuf,
}

impl Overlay {
    fn write() -> Overlay {
        let dir = support::root().join(format!("target/operator-pod-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("overlay dir");
        let kustomization = format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
# config/default with the image built by `make image`, on the real node.
resources:
  - ../../config/default
images:
  - name: ghcr.io/keelson/keelson
    newName: keelson.dev/keelson
    newTag: dev
patches:
  - target: {{group: apps, version: v1, kind: Deployment, name: keelson}}
    patch: |-
      apiVersion: apps/v1
      kind: Deployment
      metadata: {{name: keelson, namespace: {KUSTOMIZE_NS}}}
      spec:
        template:
          spec:
            nodeSelector: {{keelson.dev/real-node: \"true\"}}
            tolerations: [{{key: keelson.dev/real-node, operator: Exists, effect: NoSchedule}}]
            containers:
              - name: keelson
                imagePullPolicy: Never
                env:
                  - {{name: KEELSON_ROUTER_IMAGE, value: {IMAGE}}}
"
        );
        std::fs::write(dir.join("kustomization.yaml"), kustomization).expect("write overlay");
        Overlay { dir }
    }

    fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        uninstall_kustomize();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Removes the operator that the overlay installed: its Deployment (pods gone) and its Lease. The
/// CRDs and keelson-system's ServiceAccount and RBAC stay: every suite installs and uses them.
fn uninstall_kustomize() {
    let _ = kubectl(&[
        "-n",
        KUSTOMIZE_NS,
        "delete",
        "deployment",
        "keelson",
        "--ignore-not-found",
        "--wait=true",
        "--timeout=90s",
    ]);
    support::wait_sync(Duration::from_secs(90), || {
        let (ok, out) = kubectl(&[
            "-n",
            KUSTOMIZE_NS,
            "get",
            "pods",
            "-l",
            OPERATOR_PODS,
            "-o",
            "name",
        ]);
        ok && out.trim().is_empty()
    });
    let _ = kubectl(&[
        "-n",
        KUSTOMIZE_NS,
        "delete",
        "lease",
        LEASE,
        "--ignore-not-found",
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_default_pod_reconciles_and_survives_a_killed_leader() {
    let _serial = SERIAL.lock().await;
    require_real_node();
    let client = support::client().await;
    // A previous run that was killed may have left its operator.
    uninstall_kustomize();
    let _isolation = Isolation::install();

    // (a) Install, run hardened on the real node, take the Lease, reconcile.
    let overlay = Overlay::write();
    let dir = overlay.path().to_str().expect("utf-8 path").to_string();
    // --force-conflicts: the test harness applies the same CRDs and RBAC with other field managers.
    let (ok, out) = kubectl(&["apply", "--server-side", "--force-conflicts", "-k", &dir]);
    assert!(ok, "kubectl apply --server-side -k {dir}: {out}");
    let pod = ready_operator(&client, KUSTOMIZE_NS, None).await;
    let first = pod.name_any();
    assert_runs_hardened(&pod);
    wait_lease(KUSTOMIZE_NS, &first).await;

    let ns = test_ns("oppod");
    assert_reconciles(&client, &ns.name, KUSTOMIZE_NS).await;

    // (b) A burst of TrainingJobs; the leader crashes in the middle of it.
    let burst = test_ns("oppod-burst");
    let workers = |i: usize| 1 + i % 3;
    let expected: usize = (0..JOBS).map(|i| workers(i) + 1).sum();
    let manifests: Vec<String> = (0..JOBS)
        .map(|i| trainingjob(&format!("job-{i:02}"), workers(i)))
        .collect();
    // The jobs arrive one every 50 ms; the leader is killed once a third of them exist.
    let jobs = jobs_api(&client, &burst.name);
    let created = Arc::new(AtomicUsize::new(0));
    let creator = {
        let (jobs, created) = (jobs.clone(), created.clone());
        tokio::spawn(async move {
            for m in manifests {
                let obj: DynamicObject = serde_yaml::from_str(&m).expect("job manifest");
                jobs.create(&PostParams::default(), &obj)
                    .await
                    .expect("create a TrainingJob");
                created.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let start = Instant::now();
    while created.load(Ordering::SeqCst) < JOBS / 3 {
        assert!(start.elapsed() < CONVERGE, "the burst was not created");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A crash: SIGKILL to the process (no Lease release, no graceful stop), then the pod object is
    // force-deleted (kubectl delete pod --grace-period=0 --force) so that the Deployment makes a new one.
    let pid = container_pid(KUSTOMIZE_NS, &first);
    let before = children(&client, &burst.name).await;
    let jobs_at_kill = created.load(Ordering::SeqCst);
    let killed = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success(), "kill -KILL {pid} (the operator process)");
    let killed_at = Instant::now();
    assert_eq!(
        lease_holder(KUSTOMIZE_NS),
        first,
        "a SIGKILLed leader cannot release its Lease"
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), KUSTOMIZE_NS);
    pods.delete(&first, &DeleteParams::default().grace_period(0))
        .await
        .expect("force-delete the operator pod");
    eprintln!(
        "killed {first} (pid {pid}) with {jobs_at_kill} of {JOBS} jobs created and {} of {expected} children",
        before.len()
    );
    assert!(
        jobs_at_kill < JOBS && before.len() < expected,
        "the burst was over before the kill"
    );
    creator.await.expect("the burst's creator task");

    let second = ready_operator(&client, KUSTOMIZE_NS, Some(&first)).await;
    assert_runs_hardened(&second);
    let second = second.name_any();
    wait_lease(KUSTOMIZE_NS, &second).await;
    eprintln!(
        "{second} holds the Lease {:.1}s after the kill",
        killed_at.elapsed().as_secs_f64()
    );

    let want: BTreeMap<(String, String), String> = (0..JOBS)
        .flat_map(|i| {
            let job = format!("job-{i:02}");
            let mut v = vec![(("Service".to_string(), job.clone()), job.clone())];
            for r in 0..workers(i) {
                v.push((
                    ("Pod".to_string(), format!("{job}-worker-{r}")),
                    job.clone(),
                ));
            }
            v
        })
        .collect();
    let (c, bns, jobs_ref, want_ref) = (&client, burst.name.as_str(), &jobs, &want);
    let all = wait(
        "every job of the burst converged",
        KUSTOMIZE_NS,
        CONVERGE,
        move || async move {
            let list = jobs_ref.list(&ListParams::default()).await.ok()?;
            if list.items.len() != JOBS || !list.items.iter().all(converged) {
                return None;
            }
            let c = children(c, bns).await;
            let names: BTreeSet<_> = c.keys().cloned().collect();
            (names == want_ref.keys().cloned().collect()).then_some((list.items, c))
        },
    )
    .await;
    let (list, after) = all;
    let uids: BTreeMap<String, String> = list
        .iter()
        .map(|j| (j.name_any(), j.uid().unwrap_or_default()))
        .collect();
    for (k, (uid, owner, owner_name)) in &after {
        assert_eq!(owner_name, &want[k], "{k:?} labelled for another job");
        assert_eq!(owner, &uids[&want[k]], "{k:?} not controlled by its job");
        assert!(!uid.is_empty());
    }
    for (k, (uid, _, _)) in &before {
        assert_eq!(
            after.get(k).map(|a| &a.0),
            Some(uid),
            "{k:?} existed at the kill and was replaced"
        );
    }
    // Settled: a moment later the same children, none being deleted.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = children(&client, &burst.name).await;
    assert_eq!(later, after, "the children changed after convergence");
    let pods_now: Api<Pod> = Api::namespaced(client.clone(), &burst.name);
    let terminating: Vec<String> = pods_now
        .list(&ListParams::default())
        .await
        .expect("list pods")
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_some())
        .map(|p| p.name_any())
        .collect();
    assert!(
        terminating.is_empty(),
        "pods being deleted: {terminating:?}"
    );

    drop(overlay);
    let (_, left) = kubectl(&[
        "-n",
        KUSTOMIZE_NS,
        "get",
        "pods",
        "-l",
        OPERATOR_PODS,
        "-o",
        "name",
    ]);
    assert!(left.trim().is_empty(), "operator pods left: {left}");
}

// --- the Helm install ------------------------------------------------------------------------

fn helm(args: &[&str]) -> (bool, String) {
    let o = Command::new(support::root().join("hack/helm/build.sh"))
        .output()
        .expect("run hack/helm/build.sh");
    assert!(
        o.status.success(),
        "hack/helm/build.sh: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let bin = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let home = support::root().join("target/helm-home");
    let o = Command::new(bin)
        .args(args)
        .arg("--kubeconfig")
        .arg(support::kubeconfig())
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"))
        .current_dir(support::root())
        .output()
        .expect("run helm");
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// The release and its namespace, removed when dropped.
struct Release;

impl Release {
    fn uninstall() {
        let _ = helm(&[
            "uninstall",
            HELM_RELEASE,
            "--namespace",
            HELM_NS,
            "--ignore-not-found",
            "--wait",
            "--timeout",
            "90s",
        ]);
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        Release::uninstall();
        let _ = kubectl(&[
            "delete",
            "namespace",
            HELM_NS,
            "--ignore-not-found",
            "--wait=true",
            "--timeout=90s",
        ]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_chart_pod_reconciles_and_uninstalls() {
    let _serial = SERIAL.lock().await;
    require_real_node();
    let client = support::client().await;
    // The kustomize install is gone first: one operator at a time.
    uninstall_kustomize();
    // A previous run that was killed may have left its release.
    drop(Release);
    let _isolation = Isolation::install();

    // The release namespace enforces the restricted Pod Security Standard, as config/default's does.
    kubectl_in(
        &["apply", "--server-side", "-f", "-"],
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {HELM_NS}\n  labels:\n    pod-security.kubernetes.io/enforce: restricted\n"
        ),
    );
    let release = Release;
    let chart = support::root().join("charts/keelson");
    let (ok, out) = helm(&[
        "install",
        HELM_RELEASE,
        chart.to_str().expect("utf-8 path"),
        "--namespace",
        HELM_NS,
        "--set",
        "image.repository=keelson.dev/keelson,image.tag=dev,image.pullPolicy=Never",
        "--set",
        &format!("routerImage={IMAGE}"),
        "--set-string",
        "nodeSelector.keelson\\.dev/real-node=true",
        "--set",
        "tolerations[0].key=keelson.dev/real-node,tolerations[0].operator=Exists,tolerations[0].effect=NoSchedule",
        "--wait",
        "--timeout",
        "180s",
    ]);
    assert!(ok, "helm install: {out}\n{}", operator_state(HELM_NS));

    let pod = ready_operator(&client, HELM_NS, None).await;
    assert_runs_hardened(&pod);
    wait_lease(HELM_NS, &pod.name_any()).await;
    let spec = pod.spec.as_ref().expect("pod spec");
    assert_eq!(spec.service_account_name.as_deref(), Some(HELM_RELEASE));

    let ns = test_ns("oppod-helm");
    assert_reconciles(&client, &ns.name, HELM_NS).await;

    let (ok, out) = helm(&[
        "uninstall",
        HELM_RELEASE,
        "--namespace",
        HELM_NS,
        "--wait",
        "--timeout",
        "90s",
    ]);
    assert!(ok, "helm uninstall: {out}");
    support::wait_sync(Duration::from_secs(90), || {
        let (ok, out) = kubectl(&[
            "-n",
            HELM_NS,
            "get",
            "pods",
            "-l",
            OPERATOR_PODS,
            "-o",
            "name",
        ]);
        ok && out.trim().is_empty()
    });
    for (kind, name, namespaced) in [
        ("deployment", HELM_RELEASE.to_string(), true),
        ("serviceaccount", HELM_RELEASE.to_string(), true),
        ("role", format!("{HELM_RELEASE}-leader-election"), true),
        (
            "rolebinding",
            format!("{HELM_RELEASE}-leader-election"),
            true,
        ),
        ("clusterrole", HELM_RELEASE.to_string(), false),
        ("clusterrolebinding", HELM_RELEASE.to_string(), false),
    ] {
        let mut args = vec![
            "get",
            kind,
            name.as_str(),
            "--ignore-not-found",
            "-o",
            "name",
        ];
        if namespaced {
            args.extend(["-n", HELM_NS]);
        }
        let (ok, out) = kubectl(&args);
        assert!(
            ok && out.trim().is_empty(),
            "{kind}/{name} left after helm uninstall: {out}"
        );
    }
    // Helm never deletes the CRDs of crds/: the users' resources stay.
    let (ok, out) = kubectl(&["get", "crd", "trainingjobs.keelson.dev", "-o", "name"]);
    assert!(
        ok && !out.trim().is_empty(),
        "the CRD went with the release: {out}"
    );
    drop(release);
}
