//! `make bench-scale`: N TrainingJobs of 4 workers created at once on the local cluster, against
//! Keelson and against the Kubeflow training-operator (PyTorchJob, 1 master + 3 workers) built from
//! its Go module by `hack/bench/anchor.sh`. Prints tables; asserts nothing.
//!
//! Per target and N it measures, from the bench's own watches: create → every child (pods and
//! Services) exists, and create → Running (p50, p99, max); from the API server's
//! `apiserver_request_total`: the writes the operator made per child, and the writes of a forced
//! no-op resync (a fresh operator process over the settled jobs); from /proc: the operator's peak RSS
//! and CPU seconds.
//!
//! The `raw` row is the physical limit of the work: the bench creates the children of Keelson's
//! build itself (`scale/raw.rs`), with many requests at once, and no operator runs.
//!
//! Environment: `BENCH_N` (default `100,1000`; `BENCH_FULL=1` adds 5000), `BENCH_ANCHOR_MAX` (the
//! largest N the anchor runs at, default 1000), `BENCH_TARGETS` (default
//! `keelson,anchor,raw`), `BENCH_NODE_PODS` (pods and GPUs per simulated bench node, default 100),
//! `BENCH_RAW_CONCURRENCY` (requests at once in the raw row, default 64). The figures also go to
//! `target/bench/scale.tsv`, which `make bench-plot` draws.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use keelson_testkit as support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use process::Proc;
use support::*;

#[path = "scale/process.rs"]
mod process;
#[path = "scale/raw.rs"]
mod raw;
#[path = "scale/report.rs"]
mod report;

/// One operator under test.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Keelson,
    Anchor,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Keelson => "keelson",
            Target::Anchor => "anchor",
        }
    }

    fn resource(self) -> ApiResource {
        match self {
            Target::Keelson => ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk("keelson.dev", "v1alpha1", "TrainingJob"),
                "trainingjobs",
            ),
            Target::Anchor => ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk("kubeflow.org", "v1", "PyTorchJob"),
                "pytorchjobs",
            ),
        }
    }

    /// The job: 4 ranks with one GPU each, the same container on both operators.
    fn job(self, name: &str) -> serde_json::Value {
        let container = serde_json::json!({
            "name": "pytorch",
            "image": "ghcr.io/acme/trainer:1.4",
            "command": ["torchrun", "train.py"],
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                          "limits": {"nvidia.com/gpu": 1}},
        });
        match self {
            Target::Keelson => serde_json::json!({
                "apiVersion": "keelson.dev/v1alpha1", "kind": "TrainingJob",
                "metadata": {"name": name},
                "spec": {
                    "framework": "PyTorch", "workers": 4, "image": "ghcr.io/acme/trainer:1.4",
                    "command": ["torchrun", "train.py"],
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                    "gpus": {"count": 1},
                },
            }),
            Target::Anchor => {
                let template = serde_json::json!({"spec": {
                    "containers": [container],
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                }});
                serde_json::json!({
                    "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
                    "metadata": {"name": name},
                    "spec": {"pytorchReplicaSpecs": {
                        "Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": template},
                        "Worker": {"replicas": 3, "restartPolicy": "OnFailure", "template": template},
                    }},
                })
            }
        }
    }

    fn is_running(self, job: &DynamicObject) -> bool {
        let status = &job.data["status"];
        match self {
            Target::Keelson => status["phase"] == "Running",
            Target::Anchor => status["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Running" && c["status"] == "True")
            }),
        }
    }

    /// Pods and Services per job.
    fn children(self) -> usize {
        match self {
            Target::Keelson => 4 + 1, // one Pod per rank and the headless Service
            Target::Anchor => 4 + 4,  // one Pod and one Service per replica
        }
    }

    /// A deadline per job (in tenths of a second) for a burst to be Running, from the operator's
    /// client rate limit and its writes per job: Keelson's 100 QPS, the anchor's 20 QPS (as shipped).
    fn deciseconds_per_job(self) -> u64 {
        match self {
            Target::Keelson => 5,
            Target::Anchor => 20,
        }
    }

    /// The job kind's reconcile counter on the operator's /metrics.
    fn reconciles_metric(self) -> (&'static str, &'static str) {
        match self {
            Target::Keelson => ("keelson_reconciles_total", "kind=\"TrainingJob\""),
            Target::Anchor => (
                "controller_runtime_reconcile_total",
                "controller=\"pytorchjob-controller\"",
            ),
        }
    }
}

/// Simulated GPU nodes for the bench: `count` nodes with `per` pods and `per` GPUs each.
fn ensure_nodes(count: usize, per: usize) {
    let mut yaml = String::new();
    for i in 0..count {
        yaml.push_str(&format!(
            "---
apiVersion: v1
kind: Node
metadata:
  name: bench-gpu-{i}
  annotations: {{kwok.x-k8s.io/node: fake, node.alpha.kubernetes.io/ttl: \"0\"}}
  labels: {{type: kwok, kubernetes.io/hostname: bench-gpu-{i}, keelson.dev/sim-pool: bench, nvidia.com/gpu.present: \"true\"}}
spec:
  taints: [{{key: nvidia.com/gpu, effect: NoSchedule}}]
status:
  allocatable: {{cpu: \"1000\", memory: 4Ti, pods: \"{per}\", nvidia.com/gpu: \"{per}\"}}
  capacity: {{cpu: \"1000\", memory: 4Ti, pods: \"{per}\", nvidia.com/gpu: \"{per}\"}}
"
        ));
    }
    kubectl_ok(&["apply", "-f", "-"], Some(&yaml));
    wait_sync(Duration::from_secs(180), || {
        let out = kubectl_ok(
            &[
                "get", "nodes", "-l", "keelson.dev/sim-pool=bench", "-o",
                "jsonpath={range .items[*]}{.status.conditions[?(@.type=='Ready')].status}{\"\\n\"}{end}",
            ],
            None,
        );
        out.lines().filter(|l| *l == "True").count() >= count
    });
}

/// Write requests the operator made: the API server's write counters between two readings, minus
/// what others write (the bench's own job creates, the scheduler's bindings, kwok's pod and node
/// status, leases, the EndpointSlice controller). The counters hold the Events of the whole
/// cluster (the node controller's for new nodes, the scheduler's, kwok's), so Events are counted
/// from the Event objects the operator recorded in the bench namespace instead (`events`).
fn operator_writes(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    job_plural: &str,
    bench_creates: f64,
    events: EventWrites,
) -> BTreeMap<String, f64> {
    let mut d: BTreeMap<String, f64> = after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect();
    d.retain(|k, _| {
        let res = k.split(' ').nth(1).unwrap_or("");
        !(res.starts_with("nodes")
            || res.starts_with("leases")
            || res.starts_with("endpoints")
            || res.starts_with("endpointslices")
            || res.starts_with("namespaces")
            || res.starts_with("events")
            || res == "pods/binding"
            || res == "pods/status")
    });
    if let Some(v) = d.get_mut(&format!("POST {job_plural}")) {
        *v -= bench_creates;
    }
    d.insert("POST events".into(), events.creates);
    d.insert("PATCH events".into(), events.repeats);
    d.retain(|_, v| *v > 0.0);
    d
}

/// Event writes: Event objects created, and repeats counted on them (each a patch).
#[derive(Clone, Copy, Debug, Default)]
struct EventWrites {
    creates: f64,
    repeats: f64,
}

impl std::ops::Sub for EventWrites {
    type Output = EventWrites;

    fn sub(self, o: EventWrites) -> EventWrites {
        EventWrites {
            creates: self.creates - o.creates,
            repeats: self.repeats - o.repeats,
        }
    }
}

/// Events in `ns` recorded by the operator under test: all but the scheduler's and kwok's (one
/// each per pod).
async fn operator_events(client: &Client, ns: &str) -> EventWrites {
    use k8s_openapi::api::core::v1::Event;
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    let list = api.list(&Default::default()).await.expect("list events");
    let own: Vec<&Event> = list
        .items
        .iter()
        .filter(|e| {
            let by = e
                .reporting_component
                .clone()
                .filter(|c| !c.is_empty())
                .or_else(|| e.source.as_ref().and_then(|s| s.component.clone()))
                .unwrap_or_default();
            !matches!(by.as_str(), "default-scheduler" | "kwok_controller")
        })
        .collect();
    EventWrites {
        creates: own.len() as f64,
        repeats: own
            .iter()
            .map(|e| {
                let n = e
                    .series
                    .as_ref()
                    .and_then(|s| s.count)
                    .max(e.count)
                    .unwrap_or(1);
                f64::from((n - 1).max(0))
            })
            .sum(),
    }
}

#[derive(Default)]
struct JobTimes {
    created: Option<Instant>,
    children: HashSet<String>,
    all_children: Option<Instant>,
    running: Option<Instant>,
}

type Times = Arc<Mutex<HashMap<String, JobTimes>>>;

fn owner(meta: &kube::api::ObjectMeta) -> Option<String> {
    meta.owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| o.name.clone())
}

/// The job a child belongs to: its controller owner's name.
fn owner_key(meta: &kube::api::ObjectMeta) -> Option<String> {
    owner(meta)
}

fn watch_children<K>(
    client: Client,
    ns: &str,
    times: Times,
    want: usize,
    job_of: fn(&kube::api::ObjectMeta) -> Option<String>,
) where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + 'static,
{
    let api: Api<K> = Api::namespaced(client, ns);
    let kind = K::kind(&()).to_string();
    tokio::spawn(async move {
        let s = watcher(api, watcher::Config::default())
            .default_backoff()
            .applied_objects();
        futures::pin_mut!(s);
        while let Ok(Some(o)) = s.try_next().await {
            let Some(job) = job_of(o.meta()) else {
                continue;
            };
            let mut t = times.lock().unwrap();
            let e = t.entry(job).or_default();
            e.children.insert(format!("{kind}/{}", o.name_any()));
            if e.children.len() >= want && e.all_children.is_none() {
                e.all_children = Some(Instant::now());
            }
        }
    });
}

fn watch_jobs(client: Client, ns: &str, target: Target, times: Times) {
    let api: Api<DynamicObject> = Api::namespaced_with(client, ns, &target.resource());
    tokio::spawn(async move {
        let s = watcher(api, watcher::Config::default())
            .default_backoff()
            .applied_objects();
        futures::pin_mut!(s);
        while let Ok(Some(o)) = s.try_next().await {
            if target.is_running(&o) {
                let mut t = times.lock().unwrap();
                let e = t.entry(o.name_any()).or_default();
                e.running.get_or_insert_with(Instant::now);
            }
        }
    });
}

/// From the first create to the last job's last child (the deadline for a job that has none).
fn time_to_all_children(t: &HashMap<String, JobTimes>, ended: Instant) -> f64 {
    let first = t.values().filter_map(|e| e.created).min();
    let last = t.values().map(|e| e.all_children.unwrap_or(ended)).max();
    match (first, last) {
        (Some(a), Some(b)) => b.saturating_duration_since(a).as_secs_f64() * 1000.0,
        _ => f64::NAN,
    }
}

fn percentiles(mut v: Vec<f64>) -> [f64; 3] {
    if v.is_empty() {
        return [f64::NAN; 3];
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    [at(0.5), at(0.99), v[v.len() - 1]]
}

/// One row of figures for one target and N.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    children_ms: [f64; 3],
    /// Each job's create → children, ms.
    children_samples: Vec<f64>,
    /// From the first create to the last job with all its children, ms.
    all_children_ms: f64,
    /// The raw row: children created by the bench, no operator.
    raw: bool,
    raw_concurrency: usize,
    running_ms: [f64; 3],
    writes: BTreeMap<String, f64>,
    children_created: f64,
    resync_writes: f64,
    resync_breakdown: BTreeMap<String, f64>,
    rss_mib: f64,
    cpu_s: f64,
    incomplete: usize,
}

impl Figures {
    fn writes_total(&self) -> f64 {
        // + 0.0: an empty f64 sum is -0.0, which prints as "-0".
        self.writes.values().sum::<f64>() + 0.0
    }
    fn writes_per_child(&self) -> f64 {
        self.writes_total() / self.children_created.max(1.0)
    }
}

async fn delete_namespace(client: &Client, ns: &str) {
    // The bench's pods run on simulated nodes: each is deleted with grace period 0, many at once.
    // Deleted gracefully by the namespace controller, each would wait for kwok to confirm it, which
    // at 20,000 pods keeps the namespace for tens of minutes.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    if let Ok(list) = pods.list_metadata(&ListParams::default()).await {
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        };
        futures::stream::iter(list.items.into_iter().filter_map(|p| p.metadata.name))
            .map(|name| {
                let (pods, dp) = (pods.clone(), dp.clone());
                async move { pods.delete(&name, &dp).await.map(drop) }
            })
            .buffer_unordered(32)
            .for_each(|_| async {})
            .await;
    }
    let _ = kubectl(
        &[
            "delete",
            "namespace",
            ns,
            "--ignore-not-found",
            "--wait=false",
        ],
        None,
    );
    // A namespace still there after that is reported, not fatal: the figures are already taken.
    let limit = Duration::from_secs(1800);
    let started = Instant::now();
    while kubectl(&["get", "namespace", ns], None).status.success() {
        if started.elapsed() > limit {
            eprintln!("[bench] namespace {ns} is still being deleted after {limit:?}; going on");
            return;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn run_one(client: &Client, target: Target, n: usize) -> Figures {
    let ns = format!("bench-{}-{n}", target.name());
    delete_namespace(client, &ns).await;
    kubectl_ok(&["create", "namespace", &ns], None);
    let op = Proc::start(target, &format!("{n}"));
    let times: Times = Arc::default();
    let want = target.children();
    watch_children::<Pod>(client.clone(), &ns, times.clone(), want, owner_key);
    watch_children::<Service>(client.clone(), &ns, times.clone(), want, owner_key);
    watch_jobs(client.clone(), &ns, target, times.clone());
    tokio::time::sleep(Duration::from_secs(2)).await; // the watches have listed the empty namespace
    let before = apiserver_writes();

    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &target.resource());
    let created = futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            let times = times.clone();
            async move {
                let name = format!("job-{i:05}");
                let obj: DynamicObject =
                    serde_json::from_value(target.job(&name)).expect("job manifest");
                let t0 = Instant::now();
                times
                    .lock()
                    .unwrap()
                    .entry(name.clone())
                    .or_default()
                    .created = Some(t0);
                api.create(&PostParams::default(), &obj)
                    .await
                    .map_err(|e| format!("{name}: {e}"))
            }
        })
        .buffer_unordered(32)
        .filter_map(|r| async move { r.err() })
        .collect::<Vec<_>>()
        .await;
    assert!(
        created.is_empty(),
        "creates failed: {:?}",
        &created[..created.len().min(3)]
    );

    let started = Instant::now();
    let deadline = Duration::from_secs(120 + n as u64 * target.deciseconds_per_job() / 10);
    let mut last = Instant::now();
    loop {
        let (children, running) = {
            let t = times.lock().unwrap();
            (
                t.values().filter(|e| e.all_children.is_some()).count(),
                t.values().filter(|e| e.running.is_some()).count(),
            )
        };
        if running >= n && children >= n {
            break;
        }
        if started.elapsed() > deadline {
            eprintln!("[bench] {ns}: gave up after {deadline:?}: {children}/{n} with children, {running}/{n} running");
            break;
        }
        if last.elapsed() > Duration::from_secs(15) {
            eprintln!("[bench] {ns}: {children}/{n} with children, {running}/{n} running");
            last = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ended = Instant::now();
    // Let trailing status writes land before reading the counters.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = apiserver_writes();
    let (rss_mib, cpu_s) = op.usage();

    let mut f = Figures {
        rss_mib,
        cpu_s,
        ..Figures::default()
    };
    {
        let t = times.lock().unwrap();
        let ms = |a: Option<Instant>, b: Option<Instant>| {
            Some(b?.saturating_duration_since(a?).as_secs_f64() * 1000.0)
        };
        // A job not there at the deadline counts as the time waited (a lower bound), not as absent.
        f.children_samples = t
            .values()
            .filter_map(|e| ms(e.created, e.all_children.or(Some(ended))))
            .collect();
        f.children_ms = percentiles(f.children_samples.clone());
        f.all_children_ms = time_to_all_children(&t, ended);
        f.running_ms = percentiles(
            t.values()
                .filter_map(|e| ms(e.created, e.running.or(Some(ended))))
                .collect(),
        );
        f.children_created = t.values().map(|e| e.children.len() as f64).sum();
        f.incomplete = t
            .values()
            .filter(|e| e.all_children.is_none() || e.running.is_none())
            .count();
    }
    let events = operator_events(client, &ns).await;
    f.writes = operator_writes(
        &before,
        &after,
        target.resource().plural.as_str(),
        n as f64,
        events,
    );
    op.stop();

    // A forced no-op resync: a fresh operator lists and reconciles every settled job.
    let events_before = operator_events(client, &ns).await;
    let before = apiserver_writes();
    let op = Proc::start(target, &format!("{n}-resync"));
    let t = Instant::now();
    while op.reconciles() < n as f64 && t.elapsed() < Duration::from_secs(120 + n as u64 / 10) {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = apiserver_writes();
    let events = operator_events(client, &ns).await - events_before;
    f.resync_breakdown = operator_writes(
        &before,
        &after,
        target.resource().plural.as_str(),
        0.0,
        events,
    );
    f.resync_writes = f.resync_breakdown.values().sum::<f64>() + 0.0;
    op.stop();
    delete_namespace(client, &ns).await;
    f
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    cluster();
    let mut ns: Vec<usize> = std::env::var("BENCH_N")
        .unwrap_or_else(|_| "100,1000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    if std::env::var("BENCH_FULL").is_ok_and(|v| v == "1") && !ns.contains(&5000) {
        ns.push(5000);
    }
    // `None` stands for the raw row.
    let targets: Vec<Option<Target>> = std::env::var("BENCH_TARGETS")
        .unwrap_or_else(|_| "keelson,anchor,raw".into())
        .split(',')
        .filter_map(|s| match s.trim() {
            "keelson" => Some(Some(Target::Keelson)),
            "anchor" => Some(Some(Target::Anchor)),
            "raw" => Some(None),
            _ => None,
        })
        .collect();
    if targets.contains(&Some(Target::Anchor)) {
        let ok = Command::new(root().join("hack/bench/anchor.sh"))
            .arg("crds")
            .status()
            .unwrap();
        assert!(ok.success(), "hack/bench/anchor.sh crds failed");
    }
    let per: usize = std::env::var("BENCH_NODE_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let most = ns.iter().copied().max().unwrap_or(100);
    let nodes = (most * 4).div_ceil(per).max(50);
    ensure_nodes(nodes, per);
    println!(
        "machine: {} CPUs, {}; {nodes} simulated GPU nodes with {per} pods and GPUs each",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(
                |s| s.lines().find(|l| l.starts_with("model name")).map(|l| l
                    .split(':')
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_string())
            )
            .unwrap_or_default()
    );
    let client = client().await;
    // Namespaces left by an interrupted run would be reconciled by the operator under test.
    let left = kubectl_ok(&["get", "namespaces", "-o", "name"], None);
    for ns in left.lines().filter_map(|l| l.strip_prefix("namespace/")) {
        if ns.starts_with("bench-") {
            delete_namespace(&client, ns).await;
        }
    }
    let anchor_max: usize = std::env::var("BENCH_ANCHOR_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let mut all = report::All::new();
    let tsv = root().join("target/bench/scale.tsv");
    for &n in &ns {
        let mut rows = Vec::new();
        for &t in &targets {
            let name = t.map_or("raw", Target::name);
            if t == Some(Target::Anchor) && n > anchor_max {
                println!(
                    "\nthe anchor is not run at N = {n}: it runs up to BENCH_ANCHOR_MAX = {anchor_max}"
                );
                continue;
            }
            eprintln!("[bench] {name} N={n}");
            let f = match t {
                Some(t) => run_one(&client, t, n).await,
                None => raw::run(&client, n).await,
            };
            all.insert((n, name), f.clone());
            rows.push((name, f));
            std::fs::write(&tsv, report::tsv(&all)).unwrap();
        }
        report::print_table(n, &rows);
    }
    for w in ns.windows(2) {
        report::print_growth(w[0], w[1], &all);
    }
    println!("\nfigures written to {}", tsv.display());
    // The bench's nodes go, so that later tests schedule on the cluster's own.
    kubectl_ok(
        &[
            "delete",
            "nodes",
            "-l",
            "keelson.dev/sim-pool=bench",
            "--wait=false",
        ],
        None,
    );
}
