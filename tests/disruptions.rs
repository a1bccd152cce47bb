//! Disruptions of the operator's world, each with only the operator under test running (its own
//! test binary, one test at a time): the API server restarted under load with the watch expiry
//! (410 Gone) that follows, and the leader killed in the middle of a burst of creates.
//!
//! API server restart: the operator (the real binary) talks to a second kube-apiserver on the same
//! etcd, started with the flags of the cluster's own. Mid-burst that API server is killed (SIGKILL);
//! while it is down the world moves on through the first one (new jobs, a pod deleted by hand, a
//! spec edited), etcd's history is compacted, and it is started again. The operator's watches resume
//! from revisions that no longer exist: 410 Gone, and a relist. Every job must then converge.
//!
//! Leader killed mid-burst: two replicas with leader election; 40 jobs of 4 workers are created at
//! once and the leader is killed (SIGKILL) once the first pods exist. The standby takes over and
//! finishes: every pod is created exactly once (in the API server's audit log, no pod name has two
//! successful creates and every pod has one, or the killed leader's create in flight), no pod made
//! before the kill is replaced, and the takeover time is printed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use keelson_testkit as support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use keelson_api::trainingjob::TrainingJob;
use kube::api::{Api, ListParams};
use support::*;

/// One disruption at a time: each test's operator watches every namespace.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A second kube-apiserver of the local cluster, on its own port.
struct SecondApiserver {
    args: Vec<String>,
    port: u16,
    child: Option<Child>,
    log: PathBuf,
}

impl SecondApiserver {
    /// The first API server's command line, on another port and without its audit log.
    fn new() -> SecondApiserver {
        let pid = std::fs::read_to_string(root().join("target/cluster/pids/kube-apiserver.pid"))
            .expect("the local cluster's kube-apiserver pid");
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim()))
            .expect("the kube-apiserver command line");
        let port = free_port();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .skip(1)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .filter(|a| !a.starts_with("--audit-"))
            .map(|a| {
                if a.starts_with("--secure-port=") {
                    format!("--secure-port={port}")
                } else {
                    a
                }
            })
            .collect();
        SecondApiserver {
            args,
            port,
            child: None,
            log: root().join("target/restart-apiserver.log"),
        }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn ready(&self) -> bool {
        let certs = root().join("target/cluster/certs");
        Command::new("curl")
            .args(["-fsS", "--max-time", "2", "--cacert"])
            .arg(certs.join("ca.crt"))
            .arg("--cert")
            .arg(certs.join("admin.crt"))
            .arg("--key")
            .arg(certs.join("admin.key"))
            .arg(format!("{}/readyz", self.url()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(
            Command::new(root().join("target/cluster/bin/kube-apiserver"))
                .args(&self.args)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_sync(Duration::from_secs(90), || self.ready());
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A kubeconfig of the local cluster that points at this API server.
    fn kubeconfig(&self) -> PathBuf {
        let text = std::fs::read_to_string(kubeconfig()).unwrap();
        let main = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("server: "))
            .expect("server in the kubeconfig")
            .to_string();
        let path = root().join("target/restart-kubeconfig");
        std::fs::write(&path, text.replace(&main, &self.url())).unwrap();
        path
    }
}

impl Drop for SecondApiserver {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Compacts the local etcd's history up to its current revision (etcd's JSON gateway).
fn compact_etcd() {
    // The port as hack/cluster/lib.sh picks it: the environment, else versions.env.
    let port = std::env::var("ETCD_CLIENT_PORT").ok().unwrap_or_else(|| {
        std::fs::read_to_string(root().join("hack/cluster/versions.env"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("ETCD_CLIENT_PORT=").map(str::to_string))
            .unwrap_or_else(|| "12379".into())
    });
    let etcd = format!("http://127.0.0.1:{port}/v3/kv");
    let out = Command::new("curl")
        .args([
            "-fsS",
            "-X",
            "POST",
            &format!("{etcd}/range"),
            "-d",
            "{\"key\":\"YQ==\"}",
        ])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("etcd range answer");
    let rev = v["header"]["revision"]
        .as_str()
        .expect("etcd revision")
        .to_string();
    let ok = Command::new("curl")
        .args(["-fsS", "-X", "POST", &format!("{etcd}/compaction"), "-d"])
        .arg(format!("{{\"revision\":\"{rev}\",\"physical\":true}}"))
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success(), "etcd compaction at {rev} failed");
}

fn job(name: &str) -> String {
    job_of(name, 2)
}

fn job_of(name: &str, workers: u32) -> String {
    format!(
        "apiVersion: keelson.dev/v1alpha1\nkind: TrainingJob\nmetadata: {{name: {name}}}\nspec:\n  image: trainer:1\n  framework: PyTorch\n  workers: {workers}\n  resources: {{requests: {{cpu: 100m}}}}\n"
    )
}

/// Jobs not yet settled: a settled job has every worker pod and a status for its generation.
/// (Scheduling the pods is the scheduler's business, and the local cluster's nodes may be busy.)
async fn unsettled(api: &Api<TrainingJob>, pods: &Api<Pod>, names: &[String]) -> Vec<String> {
    let jobs = api
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    let pods = pod_uids(pods).await;
    names
        .iter()
        .filter(|n| {
            let Some(j) = jobs.iter().find(|j| j.metadata.name.as_deref() == Some(n)) else {
                return true;
            };
            let current =
                j.status.as_ref().and_then(|s| s.observed_generation) == j.metadata.generation;
            let have = (0..j.spec.workers)
                .filter(|r| pods.contains_key(&format!("{n}-worker-{r}")))
                .count();
            !(current && have == j.spec.workers as usize)
        })
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_restarted_under_load_and_the_watch_expiry_are_recovered() {
    let _one = ONE_AT_A_TIME.lock().await;
    cluster();
    let mut second = SecondApiserver::new();
    second.start();
    let ns = Ns::new("restart");
    let log = root().join(format!("target/restart-{}.log", ns.name));
    let mut op = KillOnDrop(spawn_operator(
        &second.kubeconfig(),
        &log,
        &["--health-addr", "", "--leader-elect", "false"],
        &[],
    ));

    // A burst of jobs; the API server goes down while they are still starting.
    let mut names: Vec<String> = (0..30).map(|i| format!("burst-{i:02}")).collect();
    let all: String = names
        .iter()
        .map(|n| job(n))
        .collect::<Vec<_>>()
        .join("---\n");
    ns.apply(&all).unwrap();
    let client = client().await;
    let api: Api<TrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    wait_for("a few jobs settled", Duration::from_secs(90), || async {
        let left = unsettled(&api, &pods, &names).await.len();
        (left <= names.len() - 3).then_some(())
    })
    .await;
    let left_at_kill = unsettled(&api, &pods, &names).await.len();
    second.kill();

    // The world moves on while the operator's API server is down.
    let late: Vec<String> = (0..10).map(|i| format!("late-{i:02}")).collect();
    ns.apply(
        &late
            .iter()
            .map(|n| job(n))
            .collect::<Vec<_>>()
            .join("---\n"),
    )
    .unwrap();
    names.extend(late);
    let running = names
        .iter()
        .find(|n| {
            !kubectl(
                &["-n", &ns.name, "get", "pod", &format!("{n}-worker-0")],
                None,
            )
            .stdout
            .is_empty()
        })
        .cloned()
        .expect("a job with a pod");
    ns.kubectl(&[
        "delete",
        "pod",
        &format!("{running}-worker-0"),
        "--wait=false",
    ]);
    ns.kubectl(&[
        "patch",
        "trainingjob",
        "burst-00",
        "--type=merge",
        "-p",
        "{\"spec\":{\"runPolicy\":{\"backoffLimit\":5}}}",
    ]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    // What the API server would do on its own every 5 minutes: compact etcd's history, here up to
    // now, so that no watch can resume from a revision the operator saw before the restart.
    compact_etcd();

    // Restarted without its watch cache, every resumed watch goes to etcd, whose history is now
    // compacted: each of the operator's watches gets 410 Gone for certain and must relist. (With
    // the cache, a resumed watch gets 410 or not depending on when the cache was filled.)
    second.args.push("--watch-cache=false".into());
    let restarted = Instant::now();
    second.start();
    let up = restarted.elapsed();
    let recovered = loop {
        let left = unsettled(&api, &pods, &names).await;
        if left.is_empty() {
            break restarted.elapsed();
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(120),
            "{left:?} not settled 120 s after the restart; the operator's log: {}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        op.0.try_wait().unwrap().is_none(),
        "the operator exited; its log: {}",
        log.display()
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let expired = text
        .lines()
        .filter(|l| l.contains("watch failed") && (l.contains("410") || l.contains("too old")))
        .count();
    drop(op);
    println!(
        "API server down for 5 s with {left_at_kill} of 30 jobs still starting: back up in {:.1} s, \
         every one of {} jobs settled {:.1} s after the restart; {expired} watch expiries (410) relisted",
        up.as_secs_f64(),
        names.len(),
        recovered.as_secs_f64()
    );
    assert!(
        recovered < Duration::from_secs(60),
        "recovery took {recovered:?}; the operator's log: {}",
        log.display()
    );
    assert!(
        expired > 0,
        "no watch of the operator expired (410) across the restart; its log: {}",
        log.display()
    );
}

/// The response codes of the operator's pod creates in `ns`, by pod name, from the API server's
/// audit log.
fn pod_creates(ns: &str) -> std::collections::BTreeMap<String, Vec<i64>> {
    let text =
        std::fs::read_to_string(root().join("target/cluster/logs/audit.log")).unwrap_or_default();
    let mut out = std::collections::BTreeMap::new();
    for line in text.lines().filter(|l| l.contains(ns)) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let r = &v["objectRef"];
        let create =
            v["verb"] == "create" || (v["verb"] == "patch" && v["responseStatus"]["code"] == 201);
        if r["resource"] == "pods"
            && r["subresource"].is_null()
            && r["namespace"] == ns
            && create
            && (v["impersonatedUser"]["username"] == OPERATOR_USER
                || v["user"]["username"] == OPERATOR_USER)
        {
            let code = v["responseStatus"]["code"].as_i64().unwrap_or(0);
            let name = r["name"].as_str().unwrap_or_default().to_string();
            out.entry(name).or_insert_with(Vec::new).push(code);
        }
    }
    out
}

/// The uid of every pod in `ns`, by name.
async fn pod_uids(pods: &Api<Pod>) -> std::collections::BTreeMap<String, String> {
    pods.list(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .map(|p| {
                    (
                        p.metadata.name.unwrap_or_default(),
                        p.metadata.uid.unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_mid_burst_hands_over_without_a_double_create() {
    let _one = ONE_AT_A_TIME.lock().await;
    cluster();
    let lease = format!("takeover-{}", std::process::id());
    // At 20 requests a second the burst takes the leader several seconds: time to kill it midway.
    let slow = ["--qps", "20", "--burst", "20"];
    let a = Replica::start_with(&lease, free_port(), &slow);
    wait_for("replica A to lead", TIMEOUT, || async {
        (a.is_leader() && a.ready()).then_some(())
    })
    .await;
    let b = Replica::start_with(&lease, free_port(), &slow);
    wait_for("replica B to stand by", TIMEOUT, || async {
        (b.is_standby() && b.ready()).then_some(())
    })
    .await;

    let ns = Ns::new("takeover");
    let names: Vec<String> = (0..40).map(|i| format!("job-{i:02}")).collect();
    ns.apply(
        &names
            .iter()
            .map(|n| job_of(n, 4))
            .collect::<Vec<_>>()
            .join("---\n"),
    )
    .unwrap();
    let client = client().await;
    let api: Api<TrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let total = names.len() * 4;
    let before = wait_for("the first pods", Duration::from_secs(60), || async {
        let uids = pod_uids(&pods).await;
        (uids.len() >= total / 8).then_some(uids)
    })
    .await;
    a.signal("-KILL");
    let killed = Instant::now();
    wait_for(
        "replica B to take over",
        Duration::from_secs(30),
        || async { b.is_leader().then_some(()) },
    )
    .await;
    let takeover = killed.elapsed();
    let settled_at = wait_for("every job settled", Duration::from_secs(120), || async {
        unsettled(&api, &pods, &names)
            .await
            .is_empty()
            .then(|| killed.elapsed())
    })
    .await;

    let after = pod_uids(&pods).await;
    let replaced: Vec<&String> = before
        .iter()
        .filter(|(n, uid)| after.get(*n) != Some(uid))
        .map(|(n, _)| n)
        .collect();
    let creates = pod_creates(&ns.name);
    let mut codes = std::collections::BTreeMap::new();
    for c in creates.values().flatten() {
        *codes.entry(*c).or_insert(0) += 1;
    }
    println!(
        "leader killed with {} of {total} pods made: standby leading after {:.1} s, all {} jobs \
         made with a current status {:.1} s after the kill; pod creates by response code: {codes:?}",
        before.len(),
        takeover.as_secs_f64(),
        names.len(),
        settled_at.as_secs_f64()
    );
    assert_eq!(after.len(), total, "pods: {:?}", after.keys());
    assert!(
        replaced.is_empty(),
        "pods replaced after the takeover: {replaced:?}"
    );
    // Created once: no pod name was created twice, and every pod has a create. The killed leader's
    // create in flight is logged as 504 ("context canceled") while the API server still writes the
    // pod; the new leader then finds it and does not create it again.
    let twice: Vec<_> = creates
        .iter()
        .filter(|(_, c)| c.iter().filter(|&&c| c == 201).count() > 1)
        .collect();
    assert!(twice.is_empty(), "pods created twice: {twice:?}");
    let uncreated: Vec<_> = after
        .keys()
        .filter(|n| {
            !creates
                .get(*n)
                .is_some_and(|c| c.iter().any(|&c| c == 201 || c == 504))
        })
        .collect();
    assert!(
        uncreated.is_empty(),
        "pods without a create by the operator: {uncreated:?}; creates by code: {codes:?}"
    );
    assert!(
        takeover < Duration::from_secs(20),
        "takeover took {takeover:?}"
    );
}
