//! The write budget of a TrainingJob, counted by the API server itself (its request counters, and its
//! audit log for Events): from create to Running, a job
//! of 4 workers costs its 5 children, 2 status writes and 1 Event (8 writes), a spec change is
//! reported in `observedGeneration` at once, and a forced resync of the settled jobs writes nothing.
//! Its own binary, so that no other test writes to the cluster while the API server's counters are
//! read.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use keelson_testkit as support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::Api;
use support::*;

use keelson_api::trainingjob::{JobPhase, TrainingJob};

const JOBS: usize = 10;
const WORKERS: i32 = 4;
/// Children, status writes and Events per job, at most.
const BUDGET: f64 = 8.0;

/// A value of the operator's /metrics (summed over label sets that contain `labels`).
fn metric(addr: &str, name: &str, labels: &str) -> f64 {
    let Some((200, text)) = http_get(addr, "/metrics") else {
        return f64::NAN;
    };
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The operator binary with its probes and metrics on `addr`, no leader election.
fn start_operator(tag: &str, addr: &str) -> KillOnDrop {
    let log = root().join(format!("target/write-budget-{tag}.log"));
    let child = spawn_operator(
        &kubeconfig(),
        &log,
        &["--health-addr", addr, "--leader-elect", "false"],
        &[],
    );
    let op = KillOnDrop(child);
    wait_sync(Duration::from_secs(60), || {
        http_get(addr, "/readyz").is_some_and(|(code, _)| code == 200)
    });
    op
}

fn stop(mut op: KillOnDrop) {
    let _ = Command::new("kill")
        .args(["-TERM", &op.0.id().to_string()])
        .status();
    let t = Instant::now();
    while op.0.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(POLL);
    }
}

/// Writes of Events the operator made in `ns` (creates, and the patches that count a series up),
/// from the API server's audit log: its request counters hold the Events of every component in every
/// namespace together.
fn operator_events(ns: &str) -> f64 {
    let dir = root().join("target/cluster/logs");
    let mut n = 0.0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if !path
            .file_name()
            .is_some_and(|f| f.to_string_lossy().starts_with("audit"))
        {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap_or_default().lines() {
            if !line.contains(ns) || !line.contains("\"resource\":\"events\"") {
                continue;
            }
            let Ok(ev) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let who = ev["impersonatedUser"]["username"]
                .as_str()
                .or(ev["user"]["username"].as_str());
            let ok = ev["responseStatus"]["code"]
                .as_i64()
                .is_some_and(|c| c < 300);
            let write = matches!(ev["verb"].as_str(), Some("create" | "patch" | "update"));
            if who == Some(OPERATOR_USER) && ok && write && ev["objectRef"]["namespace"] == ns {
                n += 1.0;
            }
        }
    }
    n
}

/// The writes between two readings of the API server's counters to the children and the status of
/// TrainingJobs, less the test's own job creates, and the operator's `events` writes in `ns`.
fn operator_writes(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    job_creates: f64,
    events: f64,
) -> BTreeMap<String, f64> {
    let mut d: BTreeMap<String, f64> = after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(k, _)| {
            let res = k.split(' ').nth(1).unwrap_or("");
            matches!(
                res,
                "pods" | "services" | "trainingjobs" | "trainingjobs/status"
            )
        })
        .collect();
    if let Some(v) = d.get_mut("POST trainingjobs") {
        *v -= job_creates;
    }
    d.insert("events (audit log)".into(), events);
    d.retain(|_, v| *v != 0.0);
    d
}

fn sum_where(d: &BTreeMap<String, f64>, pred: impl Fn(&str) -> bool) -> f64 {
    d.iter().filter(|(k, _)| pred(k)).map(|(_, v)| v).sum()
}

fn settled(j: &TrainingJob) -> bool {
    j.status.as_ref().is_some_and(|s| {
        s.phase == Some(JobPhase::Running)
            && s.observed_generation == j.metadata.generation
            && s.workers_ready.as_deref() == Some("4/4")
            && keelson_api::conditions::is_true(&s.conditions, "Ready")
            && keelson_api::conditions::is_true(&s.conditions, "Running")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_costs_its_children_two_status_writes_and_one_event() {
    cluster();
    // Namespaces being deleted have their children removed meanwhile: not a quiet cluster.
    wait_for(
        "no namespace terminating",
        Duration::from_secs(180),
        || async {
            let out = kubectl_ok(&["get", "namespaces", "--no-headers"], None);
            (!out.contains("Terminating")).then_some(())
        },
    )
    .await;
    let ns = Ns::new("budget");
    let client = client().await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let addr = format!("127.0.0.1:{}", free_port());
    let op = start_operator(&ns.name, &addr);

    let before = apiserver_writes();
    for i in 0..JOBS {
        let job: TrainingJob = serde_json::from_value(serde_json::json!({
            "apiVersion": "keelson.dev/v1alpha1", "kind": "TrainingJob",
            "metadata": {"name": format!("job-{i}")},
            "spec": {"image": "trainer:1", "framework": "PyTorch", "workers": WORKERS},
        }))
        .unwrap();
        jobs.create(&PostParams::default(), &job).await.unwrap();
    }
    wait_for(
        "every job Running with 4/4 workers ready",
        Duration::from_secs(120),
        || async {
            let list = jobs.list(&ListParams::default()).await.ok()?;
            (list.items.len() == JOBS && list.items.iter().all(settled)).then_some(())
        },
    )
    .await;
    // Past the settle period of the last change, so that a held write would have landed.
    let mut last = metric(&addr, "keelson_writes_total", "");
    wait_for(
        "the operator to stop writing",
        Duration::from_secs(60),
        || {
            let now = metric(&addr, "keelson_writes_total", "");
            let quiet = now == last;
            last = now;
            async move {
                tokio::time::sleep(Duration::from_secs(7)).await;
                quiet.then_some(())
            }
        },
    )
    .await;
    let after = apiserver_writes();
    let writes = operator_writes(&before, &after, JOBS as f64, operator_events(&ns.name));
    let n = JOBS as f64;
    let total: f64 = writes.values().sum();
    let status = sum_where(&writes, |k| k.ends_with("trainingjobs/status"));
    let events = sum_where(&writes, |k| k.starts_with("events"));
    let children = sum_where(&writes, |k| {
        k.ends_with(" pods") || k.ends_with(" services")
    });
    println!(
        "{JOBS} jobs of {WORKERS} workers: {:.2} writes per job ({:.2} children, {:.2} status, {:.2} Events): {writes:?}",
        total / n,
        children / n,
        status / n,
        events / n
    );
    assert_eq!(
        children,
        n * 5.0,
        "one Service and 4 pods per job: {writes:?}"
    );
    assert!(
        status <= 2.0 * n,
        "at most 2 status writes per job: {writes:?}"
    );
    assert!(events <= n, "at most 1 Event per job: {writes:?}");
    assert!(
        total <= BUDGET * n,
        "more than {BUDGET} writes per job: {writes:?}"
    );

    // Nothing the status says was lost: every job shows what its pods are.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    assert_eq!(
        pods.list(&ListParams::default()).await.unwrap().items.len(),
        JOBS * 4
    );
    assert_eq!(
        svcs.list(&ListParams::default()).await.unwrap().items.len(),
        JOBS
    );
    for j in jobs.list(&ListParams::default()).await.unwrap().items {
        let st = j.status.as_ref().unwrap();
        let w = st.workers.as_ref().unwrap();
        assert_eq!((w.active, w.ready), (4, 4), "{st:?}");
        assert!(st.start_time.is_some(), "{st:?}");
    }

    // A spec change is reported at once (well within the settle period of progress).
    let patched = jobs
        .patch(
            "job-0",
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"spec": {"runPolicy": {"activeDeadlineSeconds": 86400}}}),
            ),
        )
        .await
        .unwrap();
    let generation = patched.metadata.generation;
    let t = Instant::now();
    wait_for(
        "observedGeneration of the edited job",
        Duration::from_secs(30),
        || async {
            let j = jobs.get("job-0").await.ok()?;
            (j.status?.observed_generation == generation).then_some(())
        },
    )
    .await;
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "observedGeneration took {:?}",
        t.elapsed()
    );
    stop(op);

    // A forced resync: a fresh operator lists and reconciles every settled job, and writes nothing.
    let events_before = operator_events(&ns.name);
    let before = apiserver_writes();
    let addr = format!("127.0.0.1:{}", free_port());
    let fresh = start_operator(&format!("{}-resync", ns.name), &addr);
    wait_for(
        "the fresh operator to reconcile every job",
        Duration::from_secs(60),
        || async { (metric(&addr, "keelson_reconciles_total", "TrainingJob") >= n).then_some(()) },
    )
    .await;
    // Longer than the settle period: a held change would be written by now.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let own = metric(&addr, "keelson_writes_total", "");
    let after = apiserver_writes();
    stop(fresh);
    let events = operator_events(&ns.name) - events_before;
    let resync = operator_writes(&before, &after, 0.0, events);
    assert_eq!(own, 0.0, "the fresh operator counted its own writes");
    assert!(
        resync.is_empty(),
        "writes during a no-op resync: {resync:?}"
    );
}
