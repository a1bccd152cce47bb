//! End to end on the real node (`REAL_NODE=1 make cluster`, docs/real-node.md): the operator runs
//! in-process, its workloads run as real containers on `keelson-node-0` (kubelet, containerd, the
//! CNI bridge, kube-proxy and CoreDNS), and every assertion is on what really ran: pod exit codes and
//! logs, bytes on disk, and HTTP answers through Service ClusterIPs from the host.
//!
//! - TrainingJob, PyTorch, 2 ranks of the trainer stand-in: each rank resolves `MASTER_ADDR` (rank 0's
//!   name behind the operator's headless Service) through CoreDNS, joins rank 0 over TCP, and both
//!   read one file from a read-only `hostPath` "data fabric" mount; the checksums both log equal the
//!   file's sha256, both pods exit 0, and the job is Succeeded from the kubelet's statuses.
//! - TrainingJob `restartPolicy: ExitCode`: ranks killed with SIGKILL (exit 137, as the OOM killer
//!   does) are re-created and the job then Succeeds with 2 restarts; a job whose ranks exit 1 fails at
//!   once (reason `ExitCode`, no restart, no new pod).
//! - TrainingJob `suspend: true` while the ranks run: the real pods are stopped and gone, the job is
//!   Suspended with no restart counted; `suspend: false` starts a new group that meets and Succeeds.
//! - Notebook: runs hardened as containerd shows it (non-root, no capability, no new privileges,
//!   seccomp, no service-account token); 403 without or with a wrong token, 200 with the token of
//!   `<name>-token`, through the Service ClusterIP; a file written through the contents API lands on
//!   the workspace's PersistentVolume and survives a `resources` edit (a new pod), `suspend: true`
//!   then `false`, the pod deleted by hand, and deleting and re-creating the Notebook with
//!   `deletePolicy: Retain`.
//! - Notebook idle culling: the stand-in started idle for 10 minutes (`NOTEBOOK_IDLE_SINCE`), with
//!   `idle.timeout: 5m`, is suspended by the operator's read of `/api/status` through its Service:
//!   status `IdleCulled` with `lastActivity`, an `IdleCulled` Event, the pod gone, the workspace and
//!   the token kept; `suspend: false` brings it back with the same token, and a fresh server is
//!   watched, not culled.
//! - Notebook NetworkPolicy, enforced by kube-router on the node: a client pod of the notebook's
//!   namespace and one of the namespace `spec.access.allowFrom` names get `/api/status` through the
//!   Service's ClusterIP; a client of a third namespace, whose network works, cannot connect until
//!   the spec names its namespace too.
//! - ModelDeployment, Builtin router (the `keelson.dev/keelson:dev` image) placed by
//!   `traffic.routerPod`: 10,000 requests host -> ClusterIP -> router pod -> variant Services -> model
//!   pods split 90/10 within 2 points; a sticky header keeps each user on one variant; a weight edit
//!   under steady load fails no request and moves the split to 30/70 without restarting a pod. The
//!   router container runs as containerd shows it: non-root, no capability, read-only root, seccomp,
//!   no service-account token.
//! - ModelDeployment changes under a steady load ([`under_load`]): a weight edit, an image replaced,
//!   an HPA scaling the champion, a revision promoted by a progressive rollout and one rolled back
//!   by the analysis of the real router's `/metrics`; no request fails, and the results are printed
//!   as a table.
//!
//! Without a real node every test fails with what to run. `KEEP_NAMESPACES=1` keeps the namespaces.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use keelson_testkit as support;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret, Service};
use keelson_api::modeldeployment::ModelDeployment;
use keelson_api::notebook::Notebook;
use keelson_api::trainingjob::{JobPhase, TrainingJob};
use kube::api::{Api, ListParams};
use kube::ResourceExt;
use support::{Ns, REAL_NODE, REAL_NODE_PLACEMENT};

const TRAINER: &str = "keelson.dev/trainer:dev";
const NOTEBOOK: &str = "keelson.dev/notebook:dev";
const MODELSERVER: &str = "keelson.dev/modelserver:dev";
const ROUTER: &str = "keelson.dev/keelson:dev";
/// The real node's containerd (hack/cluster/lib.sh `CONTAINERD_SOCK`).
const CONTAINERD_SOCK: &str = "unix:///run/keelson-containerd/containerd.sock";

/// The real node is up with the images, and the operator runs with the router image of the node.
fn setup() {
    support::real_node(&[TRAINER, NOTEBOOK, MODELSERVER, ROUTER]);
    static ENV: Once = Once::new();
    ENV.call_once(|| std::env::set_var("KEELSON_ROUTER_IMAGE", ROUTER));
    support::operator();
    // A second operator in the cluster (one deployed into keelson-system, e.g. by another suite)
    // reconciles these objects as well: an older build undoes fields it does not know.
    let other = support::kubectl(
        &["get", "deploy", "-n", "keelson-system", "-o", "name"],
        None,
    );
    let other = String::from_utf8_lossy(&other.stdout);
    if !other.trim().is_empty() {
        eprintln!(
            "warning: another operator runs in keelson-system ({}); it reconciles these tests' objects too",
            other.trim()
        );
    }
}

/// `REAL_NODE_PLACEMENT` indented by `n` spaces, for a YAML block at that depth.
fn placement(n: usize) -> String {
    let pad = " ".repeat(n);
    REAL_NODE_PLACEMENT
        .lines()
        .map(|l| format!("{pad}{l}\n"))
        .collect()
}

/// A fresh directory on the node, `target/real-node/<test>/<namespace>/<sub>`, writable by the
/// images' non-root user; the namespace's directory is removed when dropped (kept with
/// `KEEP_NAMESPACES`).
struct HostDir {
    ns_dir: PathBuf,
    path: PathBuf,
}

impl HostDir {
    fn new(test: &str, ns: &Ns, sub: &str) -> HostDir {
        let ns_dir = support::root()
            .join("target/real-node")
            .join(test)
            .join(&ns.name);
        let path = ns_dir.join(sub);
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        HostDir { ns_dir, path }
    }
}

impl Drop for HostDir {
    fn drop(&mut self) {
        if std::env::var("KEEP_NAMESPACES").is_err() {
            let _ = std::fs::remove_dir_all(&self.ns_dir);
        }
    }
}

/// What a person looks at when a wait times out: the namespace's objects and Events.
fn dump(ns: &Ns) -> String {
    let run = |args: &[&str]| {
        let mut a = vec!["-n", ns.name.as_str()];
        a.extend_from_slice(args);
        let o = support::kubectl(&a, None);
        format!(
            "$ kubectl {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let events = run(&["get", "events", "--sort-by=.lastTimestamp"]);
    let tail: Vec<&str> = events.lines().rev().take(30).collect();
    format!(
        "{}\n{}\n{}",
        run(&["get", "keelson,pods,svc,pvc", "-o", "wide"]),
        run(&[
            "get",
            "keelson",
            "-o",
            "jsonpath={range .items[*]}{.kind}/{.metadata.name}: {.status}{\"\\n\"}{end}"
        ]),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}

/// Polls `f` every 500 ms until it returns `Some`; after `timeout`, panics with `what` and [`dump`].
async fn wait<T, F, Fut>(ns: &Ns, what: &str, timeout: Duration, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let poll = Duration::from_millis(500);
    support::wait_explained(what, timeout, poll, || dump(ns), f).await
}

fn logs(ns: &Ns, pod: &str) -> String {
    let o = support::kubectl(&["-n", &ns.name, "logs", pod], None);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn sha256_of(path: &Path) -> String {
    let o = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(o.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// The main container's exit code, once it has terminated.
fn exit_code(p: &Pod) -> Option<i32> {
    p.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .terminated
        .as_ref()
        .map(|t| t.exit_code)
}

fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

fn node_of(p: &Pod) -> &str {
    p.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .unwrap_or("")
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// What containerd runs for the pod's main container: `crictl inspect` (its `info` holds the pid
/// and the OCI runtime spec).
fn inspect(p: &Pod) -> serde_json::Value {
    let id = p
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.container_id.as_deref())
        .and_then(|id| id.strip_prefix("containerd://"))
        .unwrap_or_else(|| panic!("pod {} has no running container", p.name_any()))
        .to_string();
    let o = Command::new(support::root().join("target/cluster/bin/crictl"))
        .args(["--runtime-endpoint", CONTAINERD_SOCK, "inspect", &id])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "crictl inspect {id}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// SIGKILLs the main container's process from the host, as the kernel's OOM killer would: the
/// kubelet then reports exit code 137.
fn sigkill(p: &Pod) {
    let info = inspect(p);
    let pid = info["info"]["pid"].as_u64().unwrap_or(0).to_string();
    assert!(
        pid.parse::<u32>().is_ok_and(|p| p > 1),
        "no pid in crictl inspect of {}: {info}",
        p.name_any()
    );
    let st = Command::new("kill").args(["-KILL", &pid]).status().unwrap();
    assert!(st.success(), "kill -KILL {pid}");
}

/// The Events' messages in the namespace.
fn event_messages(ns: &Ns) -> Vec<String> {
    let out = ns.kubectl(&["get", "events", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["message"].as_str().map(str::to_string))
        .collect()
}

/// The IPv4 addresses the real node's CoreDNS (10.87.0.1:53, the kubelet's `clusterDNS`) answers
/// for `name`: one A query over UDP, as a pod's resolver sends it.
fn dns_a(name: &str) -> Vec<String> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut q = vec![0x4b, 0x4e, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.trim_end_matches('.').split('.') {
        q.push(u8::try_from(label.len()).unwrap());
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    if sock.send_to(&q, "10.87.0.1:53").is_err() {
        return Vec::new();
    }
    let mut buf = [0u8; 1500];
    let Ok(n) = sock.recv(&mut buf) else {
        return Vec::new();
    };
    let r = &buf[..n];
    if r.len() < 12 {
        return Vec::new();
    }
    let answers = usize::from(u16::from_be_bytes([r[6], r[7]]));
    // Skips a name, compressed or not.
    let skip_name = |mut i: usize| -> usize {
        while i < r.len() {
            match r[i] {
                0 => return i + 1,
                l if l & 0xc0 == 0xc0 => return i + 2,
                l => i += usize::from(l) + 1,
            }
        }
        i
    };
    let mut i = skip_name(12) + 4;
    let mut out = Vec::new();
    for _ in 0..answers {
        i = skip_name(i);
        if i + 10 > r.len() {
            break;
        }
        let type_ = u16::from_be_bytes([r[i], r[i + 1]]);
        let len = usize::from(u16::from_be_bytes([r[i + 8], r[i + 9]]));
        let data = i + 10;
        if type_ == 1 && len == 4 && data + 4 <= r.len() {
            out.push(format!(
                "{}.{}.{}.{}",
                r[data],
                r[data + 1],
                r[data + 2],
                r[data + 3]
            ));
        }
        i = data + len;
    }
    out
}

// --- TrainingJob --------------------------------------------------------------------------------

fn job_yaml(name: &str, env: &str, run_policy: &str, data: Option<&Path>) -> String {
    let volumes = data
        .map(|d| {
            format!(
                "  volumes:\n  - {{name: fabric, mountPath: /data, readOnly: true, hostPath: {{path: \"{}\", type: Directory}}}}\n",
                d.display()
            )
        })
        .unwrap_or_default();
    format!(
        r#"apiVersion: keelson.dev/v1alpha1
kind: TrainingJob
metadata: {{name: {name}}}
spec:
  framework: PyTorch
  workers: 2
  image: {TRAINER}
  env:
  - {{name: TIMEOUT, value: 120s}}
{env}  runPolicy: {run_policy}
{volumes}{placement}  template:
    spec:
      containers: [{{name: worker, imagePullPolicy: Never}}]
"#,
        placement = placement(2),
    )
}

async fn job_finished(api: &Api<TrainingJob>, name: &str) -> Option<TrainingJob> {
    let j = api.get(name).await.ok()?;
    let done = j
        .status
        .as_ref()
        .and_then(|s| s.phase)
        .is_some_and(|p| p.is_finished());
    done.then_some(j)
}

fn condition<'a>(
    conds: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    conds.iter().find(|c| c.type_ == type_)
}

/// The rank pods of a job, by name.
async fn rank_pods(pods: &Api<Pod>, job: &str) -> BTreeMap<String, Pod> {
    pods.list(&ListParams::default().labels(&format!("keelson.dev/owner-name={job}")))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| (p.name_any(), p))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trainingjob_ranks_meet_by_dns_and_read_the_same_data() {
    let t0 = Instant::now();
    setup();
    let ns = Ns::new("rn-tj");
    let client = support::client().await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);

    // The data fabric: one file on the node, 3 MiB of bytes only this run has.
    let dir = HostDir::new("trainingjob-data", &ns, "fabric");
    let fabric = dir.path.clone();
    let shard = fabric.join("shard.bin");
    let seed = ns.name.bytes().fold(0x9e37_79b9_u64, |h, b| {
        h.wrapping_mul(31).wrapping_add(u64::from(b))
    });
    let mut x = seed;
    let data: Vec<u8> = (0..3 * 1024 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    std::fs::write(&shard, &data).unwrap();
    let want = sha256_of(&shard);

    let name = "ddp";
    let env = "  - {name: DATA_FILE, value: /data/shard.bin}\n";
    ns.apply(&job_yaml(
        name,
        env,
        "{restartPolicy: Never, cleanPodPolicy: None}",
        Some(&fabric),
    ))
    .unwrap();

    let job = wait(
        &ns,
        "TrainingJob ddp to finish",
        Duration::from_secs(180),
        || {
            let jobs = jobs.clone();
            async move { job_finished(&jobs, name).await }
        },
    )
    .await;
    let status = job.status.clone().unwrap();
    assert_eq!(
        status.phase,
        Some(JobPhase::Succeeded),
        "job: {status:?}\nrank 0: {}\nrank 1: {}\n{}",
        logs(&ns, "ddp-worker-0"),
        logs(&ns, "ddp-worker-1"),
        dump(&ns)
    );
    let succeeded = condition(&status.conditions, "Succeeded").expect("a Succeeded condition");
    assert_eq!(
        (succeeded.status.as_str(), succeeded.reason.as_str()),
        ("True", "AllWorkersSucceeded")
    );
    let ready = condition(&status.conditions, "Ready").expect("a Ready condition");
    assert_eq!(ready.status, "True");
    assert_eq!(status.workers.as_ref().map(|w| w.succeeded), Some(2));
    assert_eq!(status.restarts, 0);
    assert!(status.completion_time.is_some());
    assert_eq!(status.observed_generation, job.metadata.generation);

    // The kubelet's own account of the two ranks: on the real node, exited 0, the data mounted
    // read-only.
    let got = rank_pods(&pods, name).await;
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        ["ddp-worker-0", "ddp-worker-1"]
    );
    for p in got.values() {
        assert_eq!(node_of(p), REAL_NODE);
        assert_eq!(phase(p), "Succeeded", "{}", p.name_any());
        assert_eq!(exit_code(p), Some(0), "{}", p.name_any());
        let mount = p.spec.as_ref().unwrap().containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == "/data")
            .expect("the data mount");
        assert_eq!(mount.read_only, Some(true));
    }
    let rank0_ip = got["ddp-worker-0"]
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("rank 0's pod IP");

    // What the ranks printed: the same checksum as the file on the host, rank 0's name resolved to
    // rank 0's pod by CoreDNS through the headless Service, and the exchange over TCP.
    let master = format!("ddp-worker-0.ddp.{}.svc", ns.name);
    let (log0, log1) = (logs(&ns, "ddp-worker-0"), logs(&ns, "ddp-worker-1"));
    let line = format!(
        "data file /data/shard.bin: {} bytes sha256={want}",
        data.len()
    );
    for (rank, log) in [(0, &log0), (1, &log1)] {
        assert!(
            log.contains(&line),
            "rank {rank} log lacks {line:?}:\n{log}"
        );
        assert!(
            log.contains(&format!(
                "trainer rank={rank} world=2 master={master}:29500"
            )),
            "rank {rank} was not given MASTER_ADDR {master}:\n{log}"
        );
        assert!(
            log.contains(&format!("MASTER_ADDR {master} resolves to {rank0_ip}")),
            "rank {rank} did not resolve {master} to rank 0's pod {rank0_ip}:\n{log}"
        );
    }
    assert!(
        log0.contains("all 1 peers joined with the same data"),
        "{log0}"
    );
    assert!(
        log1.contains(&format!("joined rank 0 at {master}:29500; same data")),
        "{log1}"
    );
    eprintln!(
        "trainingjob_ranks_meet_by_dns_and_read_the_same_data: {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trainingjob_exit_code_policy_retries_kills_and_fails_fast_on_errors() {
    let t0 = Instant::now();
    setup();
    let ns = Ns::new("rn-tjx");
    let client = support::client().await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);

    // `retry`: the ranks meet, then hold for as long as the ConfigMap says (read by the kubelet when
    // it starts a container), so the test can kill them while they run and let the next attempt end.
    ns.apply("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: knobs}\ndata: {HOLD: 600s}\n")
        .unwrap();
    let hold = "  - {name: HOLD, valueFrom: {configMapKeyRef: {name: knobs, key: HOLD}}}\n";
    ns.apply(&job_yaml(
        "retry",
        hold,
        "{restartPolicy: ExitCode, backoffLimit: 3, cleanPodPolicy: None}",
        None,
    ))
    .unwrap();
    // `fail`: the ranks meet and exit 1, a bug in the training code: no retry.
    ns.apply(&job_yaml(
        "fail",
        "  - {name: EXIT_CODE, value: \"1\"}\n",
        "{restartPolicy: ExitCode, backoffLimit: 3, cleanPodPolicy: None}",
        None,
    ))
    .unwrap();

    // Every pod UID `fail` ever had, while it runs.
    let fail_uids: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let failed = {
        let (jobs, pods, uids) = (jobs.clone(), pods.clone(), fail_uids.clone());
        wait(
            &ns,
            "TrainingJob fail to finish",
            Duration::from_secs(180),
            move || {
                let (jobs, pods, uids) = (jobs.clone(), pods.clone(), uids.clone());
                async move {
                    let seen = rank_pods(&pods, "fail").await;
                    uids.lock()
                        .unwrap()
                        .extend(seen.values().filter_map(|p| p.uid()));
                    job_finished(&jobs, "fail").await
                }
            },
        )
        .await
    };
    let st = failed.status.clone().unwrap();
    assert_eq!(st.phase, Some(JobPhase::Failed), "{st:?}");
    let c = condition(&st.conditions, "Failed").expect("a Failed condition");
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "ExitCode"));
    assert!(c.message.contains("exit code 1"), "{}", c.message);
    assert_eq!(st.restarts, 0, "exit code 1 must not be retried");
    // Still the first pods, nothing re-created afterwards.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let left = rank_pods(&pods, "fail").await;
    let uids: BTreeSet<String> = left.values().filter_map(|p| p.uid()).collect();
    assert_eq!(
        *fail_uids.lock().unwrap(),
        uids,
        "a pod of the failed job was re-created"
    );
    assert!(
        left.values().any(|p| exit_code(p) == Some(1)),
        "no rank of `fail` exited 1: {left:?}"
    );

    // `retry`: both ranks met and hold.
    let first = wait(
        &ns,
        "both ranks of retry running after the rendezvous",
        Duration::from_secs(180),
        || {
            let pods = pods.clone();
            let ns = &ns;
            async move {
                let p = rank_pods(&pods, "retry").await;
                let running = p.len() == 2 && p.values().all(|p| phase(p) == "Running");
                (running && logs(ns, "retry-worker-0").contains("all 1 peers joined")).then_some(p)
            }
        },
    )
    .await;
    // The next attempts end at once. SIGKILL rank 0 first: its new pod listens for the peers under
    // a new IP. Once CoreDNS answers rank 0's name with that IP, SIGKILL rank 1, whose new pod
    // resolves the name and joins. (The other order races the answer CoreDNS caches for 5 s: a new
    // rank 1 could dial the dead rank 0's IP.)
    ns.apply("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: knobs}\ndata: {HOLD: 0s}\n")
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let uid = |m: &BTreeMap<String, Pod>, n: &str| m.get(n).and_then(|p| p.uid());
    sigkill(&first["retry-worker-0"]);
    let rank0_ip = wait(
        &ns,
        "rank 0 of retry re-created after exit 137, with an IP",
        Duration::from_secs(60),
        || {
            let pods = pods.clone();
            let old = uid(&first, "retry-worker-0");
            async move {
                let p = rank_pods(&pods, "retry").await;
                let new = p.get("retry-worker-0").filter(|p| p.uid() != old)?;
                new.status.as_ref()?.pod_ip.clone()
            }
        },
    )
    .await;
    let rank0_name = format!("retry-worker-0.retry.{}.svc.cluster.local", ns.name);
    wait(
        &ns,
        &format!("CoreDNS to answer {rank0_name} with {rank0_ip}"),
        Duration::from_secs(30),
        || {
            let (name, ip) = (rank0_name.clone(), rank0_ip.clone());
            async move {
                tokio::task::spawn_blocking(move || dns_a(&name).contains(&ip))
                    .await
                    .unwrap()
                    .then_some(())
            }
        },
    )
    .await;
    sigkill(&first["retry-worker-1"]);

    let done = wait(
        &ns,
        "TrainingJob retry to finish",
        Duration::from_secs(180),
        || {
            let jobs = jobs.clone();
            async move { job_finished(&jobs, "retry").await }
        },
    )
    .await;
    let st = done.status.clone().unwrap();
    assert_eq!(
        st.phase,
        Some(JobPhase::Succeeded),
        "{st:?}\nrank 0: {}\nrank 1: {}",
        logs(&ns, "retry-worker-0"),
        logs(&ns, "retry-worker-1")
    );
    assert_eq!(st.restarts, 2, "each SIGKILLed rank counts one restart");
    let now = rank_pods(&pods, "retry").await;
    for (n, p) in &now {
        assert_ne!(p.uid(), uid(&first, n), "{n} was not re-created");
        assert_eq!(exit_code(p), Some(0), "{n}");
        assert_eq!(node_of(p), REAL_NODE);
    }
    assert!(
        logs(&ns, "retry-worker-0").contains("all 1 peers joined with the same data"),
        "the new ranks did not meet"
    );
    // One Warning per failed pod, each naming its rank and exit code.
    let events = event_messages(&ns);
    for rank in [0, 1] {
        let want = format!("worker {rank} (pod retry-worker-{rank}) failed with exit code 137");
        assert!(
            events.iter().any(|e| e.contains(&want)),
            "no Event says {want:?}: {events:#?}"
        );
    }
    eprintln!(
        "trainingjob_exit_code_policy_retries_kills_and_fails_fast_on_errors: {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trainingjob_suspend_stops_real_pods_and_resume_starts_a_new_group() {
    let t0 = Instant::now();
    setup();
    let ns = Ns::new("rn-tjs");
    let client = support::client().await;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);

    // The ranks meet and hold; `restartPolicy: Never`, so a pod the suspension kills that were
    // counted as a failure would fail the job.
    ns.apply("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: knobs}\ndata: {HOLD: 600s}\n")
        .unwrap();
    let hold = "  - {name: HOLD, valueFrom: {configMapKeyRef: {name: knobs, key: HOLD}}}\n";
    ns.apply(&job_yaml(
        "susp",
        hold,
        "{restartPolicy: Never, cleanPodPolicy: None}",
        None,
    ))
    .unwrap();
    let first = wait(
        &ns,
        "both ranks of susp running after the rendezvous",
        Duration::from_secs(120),
        || {
            let pods = pods.clone();
            let ns = &ns;
            async move {
                let p = rank_pods(&pods, "susp").await;
                let running = p.len() == 2 && p.values().all(|p| phase(p) == "Running");
                (running && logs(ns, "susp-worker-0").contains("all 1 peers joined")).then_some(p)
            }
        },
    )
    .await;
    let running = jobs.get("susp").await.unwrap().status.unwrap();
    assert_eq!(running.phase, Some(JobPhase::Running), "{running:?}");
    assert!(running.start_time.is_some());

    ns.apply("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: knobs}\ndata: {HOLD: 0s}\n")
        .unwrap();
    ns.kubectl(&[
        "patch",
        "trainingjob",
        "susp",
        "--type=merge",
        "-p",
        r#"{"spec":{"suspend":true}}"#,
    ]);
    let suspended = wait(
        &ns,
        "TrainingJob susp Suspended with no pod left",
        Duration::from_secs(90),
        || {
            let (jobs, pods) = (jobs.clone(), pods.clone());
            async move {
                let st = jobs.get("susp").await.ok()?.status?;
                let all_gone = pods
                    .list(&ListParams::default().labels("keelson.dev/owner-name=susp"))
                    .await
                    .ok()?
                    .items
                    .is_empty();
                (st.phase == Some(JobPhase::Suspended) && all_gone).then_some(st)
            }
        },
    )
    .await;
    assert_eq!(suspended.start_time, None, "{suspended:?}");
    assert_eq!(suspended.restarts, 0, "deleted pods are not failures");

    ns.kubectl(&[
        "patch",
        "trainingjob",
        "susp",
        "--type=merge",
        "-p",
        r#"{"spec":{"suspend":false}}"#,
    ]);
    let done = wait(
        &ns,
        "TrainingJob susp to finish after the resume",
        Duration::from_secs(180),
        || {
            let jobs = jobs.clone();
            async move { job_finished(&jobs, "susp").await }
        },
    )
    .await;
    let st = done.status.unwrap();
    assert_eq!(
        st.phase,
        Some(JobPhase::Succeeded),
        "{st:?}\nrank 0: {}\nrank 1: {}",
        logs(&ns, "susp-worker-0"),
        logs(&ns, "susp-worker-1")
    );
    assert_eq!(st.restarts, 0);
    let now = rank_pods(&pods, "susp").await;
    assert_eq!(now.len(), 2);
    for (n, p) in &now {
        assert_ne!(p.uid(), first[n].uid(), "{n} is not from the new group");
        assert_eq!(exit_code(p), Some(0), "{n}");
    }
    assert!(logs(&ns, "susp-worker-0").contains("all 1 peers joined with the same data"));
    eprintln!(
        "trainingjob_suspend_stops_real_pods_and_resume_starts_a_new_group: {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}

// --- HTTP from the host -----------------------------------------------------------------------------

type Http = Client<HttpConnector, Full<Bytes>>;

fn http() -> Http {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http()
}

#[derive(Debug)]
struct Reply {
    status: u16,
    variant: Option<String>,
    body: String,
}

async fn call(
    http: &Http,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<Reply, String> {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let run = async {
        let resp = http.request(req).await.map_err(|e| format!("{e:?}"))?;
        let status = resp.status().as_u16();
        let variant = resp
            .headers()
            .get("x-variant")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Reply {
            status,
            variant,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    };
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .map_err(|_| format!("{url}: no answer in 10 s"))?
}

/// Waits until `url` answers 200 from the host.
async fn answering(ns: &Ns, http: &Http, url: &str, timeout: Duration) {
    wait(
        ns,
        &format!("{url} to answer from the host"),
        timeout,
        || {
            let url = url.to_string();
            async move {
                call(http, Method::GET, &url, &[], "")
                    .await
                    .ok()
                    .filter(|r| r.status == 200)
            }
        },
    )
    .await;
}

async fn service_ip(services: &Api<Service>, name: &str) -> String {
    services
        .get(name)
        .await
        .unwrap()
        .spec
        .and_then(|s| s.cluster_ip)
        .unwrap()
}

// --- Notebook -------------------------------------------------------------------------------------

fn notebook_yaml(cpu: &str) -> String {
    format!(
        r#"apiVersion: keelson.dev/v1alpha1
kind: Notebook
metadata: {{name: lab}}
spec:
  image: {NOTEBOOK}
  workspace: {{size: 1Gi, deletePolicy: Retain}}
  resources: {{requests: {{cpu: {cpu}, memory: 32Mi}}}}
{placement}  template:
    spec:
      containers: [{{name: notebook, imagePullPolicy: Never}}]
"#,
        placement = placement(2),
    )
}

/// The Notebook's pod once it runs and is ready, and the Notebook says so.
async fn notebook_running(ns: &Ns, what: &str, not_uid: Option<String>) -> Pod {
    let client = support::client().await;
    let nbs: Api<Notebook> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client, &ns.name);
    wait(ns, what, Duration::from_secs(120), || {
        let (nbs, pods, not_uid) = (nbs.clone(), pods.clone(), not_uid.clone());
        async move {
            let nb = nbs.get("lab").await.ok()?;
            let st = nb.status.as_ref()?;
            let ready = condition(&st.conditions, "Ready").is_some_and(|c| c.status == "True");
            let running = format!("{:?}", st.phase?) == "Running";
            let pod = pods.get("lab-0").await.ok()?;
            let fresh = not_uid.is_none() || pod.uid() != not_uid;
            let current = st.observed_generation == nb.metadata.generation;
            (ready && running && current && fresh && ready_pod(&pod)).then_some(pod)
        }
    })
    .await
}

fn ready_pod(p: &Pod) -> bool {
    phase(p) == "Running" && ready(p) && p.metadata.deletion_timestamp.is_none()
}

async fn token(secrets: &Api<Secret>) -> String {
    let s = secrets.get("lab-token").await.unwrap();
    String::from_utf8(s.data.unwrap()["token"].0.clone()).unwrap()
}

/// GET of a workspace file through the Service, retried while kube-proxy catches up with a new pod.
async fn read_file(ns: &Ns, http: &Http, base: &str, tok: &str, path: &str) -> String {
    let url = format!("{base}/api/contents/{path}");
    let auth = format!("token {tok}");
    let r = wait(
        ns,
        &format!("GET {url} to answer"),
        Duration::from_secs(30),
        || {
            let (url, auth) = (url.clone(), auth.clone());
            async move {
                call(http, Method::GET, &url, &[("authorization", &auth)], "")
                    .await
                    .ok()
            }
        },
    )
    .await;
    assert_eq!(r.status, 200, "{url}: {}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    v["content"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notebook_token_and_workspace_survive_pod_replacement_and_recreation() {
    let t0 = Instant::now();
    setup();
    let ns = Ns::new("rn-nb");
    let client = support::client().await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let http = http();

    let dir = HostDir::new("notebook", &ns, "workspace");
    let disk = dir.path.clone();
    let _pv = ns.node_pv("lab-workspace", "1Gi", &disk, REAL_NODE);
    ns.apply(&notebook_yaml("50m")).unwrap();
    let pod = notebook_running(&ns, "Notebook lab Running and Ready", None).await;
    assert_eq!(node_of(&pod), REAL_NODE);
    // Hardened as containerd runs it: the image's non-root user, no privilege escalation, no
    // capability, seccomp, and no service-account token.
    let spec = &inspect(&pod)["info"]["runtimeSpec"];
    assert_eq!(spec["process"]["user"]["uid"], 65532, "{spec}");
    assert_eq!(spec["process"]["noNewPrivileges"], true, "{spec}");
    assert!(spec["process"]["capabilities"].is_object(), "{spec}");
    for set in ["bounding", "effective", "permitted"] {
        let caps = &spec["process"]["capabilities"][set];
        assert!(
            caps.as_array().is_none_or(Vec::is_empty),
            "{set} capabilities: {caps}"
        );
    }
    assert!(spec["linux"]["seccomp"].is_object(), "{spec}");
    let mounts: Vec<&str> = spec["mounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["destination"].as_str())
        .collect();
    assert!(mounts.contains(&"/home/jovyan"), "{mounts:?}");
    assert!(
        !mounts.iter().any(|m| m.contains("serviceaccount")),
        "the notebook has a service-account token: {mounts:?}"
    );

    // The token: none or a wrong one is refused by the server, the Secret's one is let in.
    let tok = token(&secrets).await;
    assert!(tok.len() >= 16, "a short token: {} characters", tok.len());
    let base = format!("http://{}:8888", service_ip(&services, "lab").await);
    let status_url = format!("{base}/api/status");
    let first = wait(
        &ns,
        "the notebook Service to answer from the host",
        Duration::from_secs(30),
        || {
            let (http, url) = (&http, status_url.clone());
            async move { call(http, Method::GET, &url, &[], "").await.ok() }
        },
    )
    .await;
    assert_eq!(first.status, 403, "no token: {}", first.body);
    let wrong = call(
        &http,
        Method::GET,
        &status_url,
        &[("authorization", "token not-the-token")],
        "",
    )
    .await
    .unwrap();
    assert_eq!(wrong.status, 403, "wrong token: {}", wrong.body);
    let wrong_q = call(
        &http,
        Method::GET,
        &format!("{status_url}?token=x{tok}"),
        &[],
        "",
    )
    .await
    .unwrap();
    assert_eq!(wrong_q.status, 403, "wrong ?token=: {}", wrong_q.body);
    let auth = format!("token {tok}");
    let ok = call(
        &http,
        Method::GET,
        &status_url,
        &[("authorization", &auth)],
        "",
    )
    .await
    .unwrap();
    assert_eq!(ok.status, 200, "{}", ok.body);
    let st: serde_json::Value = serde_json::from_str(&ok.body).unwrap();
    assert!(st["started"].is_string() && st["kernels"] == 0, "{st}");

    // A file written through the contents API lands on the PersistentVolume's directory.
    let content = format!(
        "written in {} at {:?}",
        ns.name,
        std::time::SystemTime::now()
    );
    let put = call(
        &http,
        Method::PUT,
        &format!("{base}/api/contents/notes/run.txt"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        &serde_json::json!({"type": "file", "format": "text", "content": content}).to_string(),
    )
    .await
    .unwrap();
    assert_eq!(put.status, 201, "{}", put.body);
    assert_eq!(
        std::fs::read_to_string(disk.join("notes/run.txt")).unwrap(),
        content,
        "the file is not on the workspace volume's directory"
    );
    let pvc_uid = pvcs.get("lab-workspace").await.unwrap().uid();

    // A resources edit builds another pod: the operator replaces it, and the file is still there.
    ns.apply(&notebook_yaml("60m")).unwrap();
    let pod2 = notebook_running(&ns, "a new pod lab-0 after the resources edit", pod.uid()).await;
    let cpu = pod2.spec.as_ref().unwrap().containers[0]
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .map(|r| r["cpu"].0.clone());
    assert_eq!(cpu.as_deref(), Some("60m"));
    assert_eq!(token(&secrets).await, tok, "the token changed with the pod");
    assert_eq!(
        read_file(&ns, &http, &base, &tok, "notes/run.txt").await,
        content
    );

    // Suspended: the pod really stops (the server shuts down on SIGTERM), the claim stays; resumed:
    // a new pod serves the same file.
    ns.kubectl(&[
        "patch",
        "notebook",
        "lab",
        "--type=merge",
        "-p",
        r#"{"spec":{"suspend":true}}"#,
    ]);
    let nbs: Api<Notebook> = Api::namespaced(client.clone(), &ns.name);
    wait(
        &ns,
        "Notebook lab Suspended with its pod gone",
        Duration::from_secs(90),
        || {
            let (nbs, pods) = (nbs.clone(), pods.clone());
            async move {
                let nb = nbs.get("lab").await.ok()?;
                let suspended = nb
                    .status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .is_some_and(|p| format!("{p:?}") == "Suspended");
                let gone = pods.get_opt("lab-0").await.ok()?.is_none();
                (suspended && gone).then_some(())
            }
        },
    )
    .await;
    assert_eq!(pvcs.get("lab-workspace").await.unwrap().uid(), pvc_uid);
    ns.kubectl(&[
        "patch",
        "notebook",
        "lab",
        "--type=merge",
        "-p",
        r#"{"spec":{"suspend":false}}"#,
    ]);
    let pod3 = notebook_running(&ns, "Notebook lab resumed", pod2.uid()).await;
    assert_eq!(
        read_file(&ns, &http, &base, &tok, "notes/run.txt").await,
        content
    );

    // A pod deleted by hand (a drain, a person) is re-created, and serves the file again.
    ns.kubectl(&["delete", "pod", "lab-0", "--wait=false"]);
    notebook_running(&ns, "lab-0 re-created after it was deleted", pod3.uid()).await;
    assert_eq!(
        read_file(&ns, &http, &base, &tok, "notes/run.txt").await,
        content
    );

    // Deleting the Notebook removes its pod, Service and token, and keeps the workspace.
    ns.kubectl(&["delete", "notebook", "lab", "--wait=true", "--timeout=60s"]);
    wait(
        &ns,
        "the Notebook's pod, Service and Secret garbage-collected",
        Duration::from_secs(90),
        || {
            let (pods, services, secrets) = (pods.clone(), services.clone(), secrets.clone());
            async move {
                let gone = pods.get_opt("lab-0").await.ok()?.is_none()
                    && services.get_opt("lab").await.ok()?.is_none()
                    && secrets.get_opt("lab-token").await.ok()?.is_none();
                gone.then_some(())
            }
        },
    )
    .await;
    let kept = pvcs
        .get("lab-workspace")
        .await
        .expect("the retained workspace PVC");
    assert_eq!(kept.uid(), pvc_uid);
    assert!(kept.metadata.deletion_timestamp.is_none());
    assert!(
        kept.metadata
            .owner_references
            .unwrap_or_default()
            .is_empty(),
        "a retained workspace has no owner"
    );
    assert_eq!(kept.status.and_then(|s| s.phase).as_deref(), Some("Bound"));

    // Re-created: the same claim, a new token, the file.
    ns.apply(&notebook_yaml("60m")).unwrap();
    notebook_running(&ns, "the re-created Notebook lab Running and Ready", None).await;
    assert_eq!(pvcs.get("lab-workspace").await.unwrap().uid(), pvc_uid);
    let tok2 = token(&secrets).await;
    let base = format!("http://{}:8888", service_ip(&services, "lab").await);
    assert_eq!(
        read_file(&ns, &http, &base, &tok2, "notes/run.txt").await,
        content
    );
    eprintln!(
        "notebook_token_and_workspace_survive_pod_replacement_and_recreation: {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}

// --- ModelDeployment --------------------------------------------------------------------------------

fn idle_notebook_yaml(idle_since: Option<&str>, suspend: bool) -> String {
    let env = idle_since
        .map(|d| format!("  env: [{{name: NOTEBOOK_IDLE_SINCE, value: '{d}'}}]\n"))
        .unwrap_or_default();
    format!(
        r#"apiVersion: keelson.dev/v1alpha1
kind: Notebook
metadata: {{name: lab}}
spec:
  image: {NOTEBOOK}
  suspend: {suspend}
  idle: {{timeout: 5m}}
  workspace: {{size: 1Gi, deletePolicy: Retain}}
  resources: {{requests: {{cpu: 50m, memory: 32Mi}}}}
{env}{placement}  template:
    spec:
      containers: [{{name: notebook, imagePullPolicy: Never}}]
"#,
        placement = placement(2),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notebook_idle_past_its_timeout_is_suspended_keeping_workspace_and_token() {
    use keelson_api::notebook::ANNOTATION_CULLED_AT;
    let t0 = Instant::now();
    setup();
    let ns = Ns::new("rn-idle");
    let client = support::client().await;
    let nbs: Api<Notebook> = Api::namespaced(client.clone(), &ns.name);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let dir = HostDir::new("notebook-idle", &ns, "workspace");
    let _pv = ns.node_pv("lab-workspace", "1Gi", &dir.path, REAL_NODE);

    // Idle for 10 minutes when it starts, timeout 5m: culled at the operator's first read.
    ns.apply(&idle_notebook_yaml(Some("10m"), false)).unwrap();
    let nb = wait(
        &ns,
        "Notebook lab culled (Ready IdleCulled)",
        Duration::from_secs(180),
        || {
            let nbs = nbs.clone();
            async move {
                let nb = nbs.get("lab").await.ok()?;
                let st = nb.status.as_ref()?;
                let c = condition(&st.conditions, "Ready")?;
                (c.reason == "IdleCulled" && st.observed_generation == nb.metadata.generation)
                    .then_some(nb.clone())
            }
        },
    )
    .await;
    let st = nb.status.clone().unwrap();
    eprintln!("culled: {}", serde_json::to_string_pretty(&st).unwrap());
    assert_eq!(nb.spec.suspend, Some(true));
    assert!(nb.annotations().contains_key(ANNOTATION_CULLED_AT));
    assert_eq!(format!("{:?}", st.phase.unwrap()), "Suspended");
    let last = st.last_activity.clone().expect("status.lastActivity").0;
    let ago = k8s_openapi::jiff::Timestamp::now()
        .duration_since(last)
        .as_secs();
    assert!(
        (540..900).contains(&ago),
        "lastActivity {last} is {ago}s ago, want about 10m"
    );
    let c = condition(&st.conditions, "IdleCulling").unwrap();
    assert_eq!(c.reason, "Culled", "{}", c.message);
    wait(&ns, "pod lab-0 gone", Duration::from_secs(60), || {
        let pods = pods.clone();
        async move { pods.get_opt("lab-0").await.ok()?.is_none().then_some(()) }
    })
    .await;
    let tok = token(&secrets).await;
    assert!(pvcs.get_opt("lab-workspace").await.unwrap().is_some());
    let events = event_messages(&ns);
    eprintln!("events: {events:#?}");
    assert!(
        events
            .iter()
            .any(|m| m.contains("no activity since") && m.contains("suspended")),
        "{events:?}"
    );
    assert!(
        !events.iter().any(|m| m.contains(&tok)),
        "the token reached an Event"
    );
    assert!(!serde_json::to_string(&st).unwrap().contains(&tok));

    // Resumed, the way a person does (`kubectl patch --type=merge`, or `kubectl edit`), and a
    // server that was just used: not culled, watched. A server-side apply of `suspend: false` by
    // the manager that applied the Notebook conflicts with the culler, which owns `spec.suspend`
    // since it set it; it would need --force-conflicts.
    nbs.patch(
        "lab",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(serde_json::json!({"spec": {"suspend": false, "env": null}})),
    )
    .await
    .unwrap();
    let pod = notebook_running(&ns, "Notebook lab resumed", None).await;
    assert_eq!(node_of(&pod), REAL_NODE);
    assert_eq!(token(&secrets).await, tok, "the token survived the cull");
    let nb = wait(
        &ns,
        "IdleCulling Watching with a fresh lastActivity",
        Duration::from_secs(90),
        || {
            let nbs = nbs.clone();
            async move {
                let nb = nbs.get("lab").await.ok()?;
                let st = nb.status.as_ref()?;
                let c = condition(&st.conditions, "IdleCulling")?;
                let fresh = st.last_activity.as_ref().is_some_and(|t| {
                    k8s_openapi::jiff::Timestamp::now()
                        .duration_since(t.0)
                        .as_secs()
                        < 120
                });
                (c.reason == "Watching" && fresh).then_some(nb.clone())
            }
        },
    )
    .await;
    assert!(
        !nb.annotations().contains_key(ANNOTATION_CULLED_AT),
        "annotation kept after resume"
    );
    assert_eq!(nb.spec.suspend, Some(false));
    eprintln!(
        "notebook_idle_past_its_timeout_is_suspended_keeping_workspace_and_token: {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}

fn model_yaml(champion: i32, challenger: i32) -> String {
    let variant = |name: &str, weight: i32| {
        format!(
            r#"  - name: {name}
    image: {MODELSERVER}
    weight: {weight}
    env: [{{name: VARIANT, value: {name}}}]
{placement}    template:
      spec:
        containers: [{{name: model, imagePullPolicy: Never}}]
"#,
            placement = placement(4)
        )
    };
    format!(
        r#"apiVersion: keelson.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: fraud}}
spec:
  variants:
{}{}  traffic:
    router: Builtin
    stickyHeader: x-user-id
    routerPod:
{}"#,
        variant("champion", champion),
        variant("challenger", challenger),
        placement(6)
    )
}

struct Tally {
    start: Instant,
    by_variant: Mutex<BTreeMap<String, u64>>,
    /// Non-2xx answers and transport errors, with the first few for the message; the model
    /// server's own injected 500s (`FAILURE_RATE`) are counted apart, in `injected`.
    failures: AtomicU64,
    first_failures: Mutex<Vec<String>>,
    injected: AtomicU64,
    /// Time to each answer, in microseconds, where the caller measures it.
    latencies_us: Mutex<Vec<u32>>,
    /// The variant of each answer in order, for the share of the latest ones.
    recent: Mutex<Vec<bool>>,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            start: Instant::now(),
            by_variant: Mutex::default(),
            failures: AtomicU64::default(),
            first_failures: Mutex::default(),
            injected: AtomicU64::default(),
            latencies_us: Mutex::default(),
            recent: Mutex::default(),
        }
    }
}

impl Tally {
    fn record(&self, r: Result<Reply, String>, challenger: &str) {
        match r {
            Ok(r) if (200..300).contains(&r.status) => {
                let v = r.variant.unwrap_or_else(|| "<none>".into());
                self.recent.lock().unwrap().push(v == challenger);
                *self.by_variant.lock().unwrap().entry(v).or_default() += 1;
            }
            Ok(r) if r.status == 500 && r.body.contains("injected failure") => {
                self.injected.fetch_add(1, Relaxed);
            }
            other => {
                self.failures.fetch_add(1, Relaxed);
                let mut f = self.first_failures.lock().unwrap();
                if f.len() < 5 {
                    let at = self.start.elapsed().as_secs_f64();
                    f.push(format!("at {at:.3}s after the first request: {other:?}"));
                }
            }
        }
    }

    fn latency(&self, d: Duration) {
        let us = u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        self.latencies_us.lock().unwrap().push(us);
    }

    /// The 99th percentile of the measured latencies (zero when none was measured).
    fn p99(&self) -> Duration {
        let mut l = self.latencies_us.lock().unwrap().clone();
        l.sort_unstable();
        let i = (l.len() * 99).div_ceil(100).saturating_sub(1);
        Duration::from_micros(l.get(i).copied().unwrap_or(0).into())
    }

    fn share(&self, variant: &str) -> f64 {
        let m = self.by_variant.lock().unwrap();
        let total: u64 = m.values().sum();
        m.get(variant).copied().unwrap_or(0) as f64 * 100.0 / total.max(1) as f64
    }

    /// The challenger's share of the last `n` answers, once there are that many.
    fn recent_share(&self, n: usize) -> Option<f64> {
        let r = self.recent.lock().unwrap();
        (r.len() >= n)
            .then(|| r[r.len() - n..].iter().filter(|c| **c).count() as f64 * 100.0 / n as f64)
    }
}

/// `n` GETs of `url` over `conns` concurrent keep-alive connections, counted by variant.
async fn burst(http: &Http, url: &str, n: u64, conns: usize, tally: &Arc<Tally>) {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..conns {
        let (http, url, next, tally) = (http.clone(), url.to_string(), next.clone(), tally.clone());
        tasks.spawn(async move {
            while next.fetch_add(1, Relaxed) < n {
                tally.record(call(&http, Method::GET, &url, &[], "").await, "challenger");
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

fn assert_split(t: &Tally, champion: f64, what: &str) {
    let total: u64 = t.by_variant.lock().unwrap().values().sum();
    let (a, b) = (t.share("champion"), t.share("challenger"));
    eprintln!("{what}: {total} answers, champion {a:.2}%, challenger {b:.2}%");
    assert_eq!(
        t.failures.load(Relaxed),
        0,
        "{what}: failed requests: {:?}",
        t.first_failures.lock().unwrap()
    );
    assert!(
        (a - champion).abs() <= 2.0 && (b - (100.0 - champion)).abs() <= 2.0,
        "{what}: champion {a:.2}%, challenger {b:.2}%, want {champion}/{} within 2 points: {:?}",
        100.0 - champion,
        t.by_variant.lock().unwrap()
    );
}

/// The router's own count of the requests it answered itself, per variant, from its admin port.
async fn router_errors(http: &Http, pod_ip: &str) -> String {
    match call(
        http,
        Method::GET,
        &format!("http://{pod_ip}:9090/metrics"),
        &[],
        "",
    )
    .await
    {
        Ok(r) => r
            .body
            .lines()
            .filter(|l| !l.starts_with('#') && (l.contains("error") || l.contains("upstream")))
            .collect::<Vec<_>>()
            .join("\n"),
        Err(e) => format!("router metrics: {e}"),
    }
}

/// The UIDs of the ModelDeployment's pods, by name.
async fn md_pods(pods: &Api<Pod>) -> BTreeMap<String, String> {
    pods.list(&ListParams::default().labels("keelson.dev/owner-name=fraud"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| (p.name_any(), p.uid().unwrap_or_default()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modeldeployment_router_splits_pins_and_reweights_real_traffic() {
    let t0 = Instant::now();
    setup();
    let ns = Ns::new("rn-md");
    let client = support::client().await;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);

    ns.apply(&model_yaml(90, 10)).unwrap();
    let ready_with = |traffic: &'static str| {
        let mds = mds.clone();
        move || {
            let mds = mds.clone();
            async move {
                let md = mds.get("fraud").await.ok()?;
                let st = md.status.as_ref()?;
                let ready = condition(&st.conditions, "Ready").is_some_and(|c| c.status == "True");
                (ready && st.traffic.as_deref() == Some(traffic)).then_some(())
            }
        }
    };
    wait(
        &ns,
        "ModelDeployment fraud Ready with champion=90,challenger=10",
        Duration::from_secs(180),
        ready_with("champion=90,challenger=10"),
    )
    .await;

    // The router runs the operator's image on the real node, placed by traffic.routerPod.
    let router_pods = pods
        .list(&ListParams::default().labels("keelson.dev/owner-name=fraud,keelson.dev/role=router"))
        .await
        .unwrap()
        .items;
    assert_eq!(router_pods.len(), 1, "{router_pods:?}");
    let rp = &router_pods[0];
    assert_eq!(node_of(rp), REAL_NODE);
    assert!(ready_pod(rp));
    assert_eq!(
        rp.spec.as_ref().unwrap().containers[0].image.as_deref(),
        Some(ROUTER)
    );
    // Locked down as containerd really runs it: the image's non-root user, no privilege
    // escalation, no capability, a read-only root, seccomp, and no service-account token.
    let spec = &inspect(rp)["info"]["runtimeSpec"];
    assert_eq!(spec["process"]["user"]["uid"], 65532, "{spec}");
    assert_eq!(spec["process"]["noNewPrivileges"], true, "{spec}");
    assert_eq!(
        spec["process"]["capabilities"]["bounding"]
            .as_array()
            .map_or(0, Vec::len),
        0,
        "{spec}"
    );
    assert_eq!(spec["root"]["readonly"], true, "{spec}");
    assert!(spec["linux"]["seccomp"].is_object(), "{spec}");
    let mounts: Vec<&str> = spec["mounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["destination"].as_str())
        .collect();
    assert!(mounts.contains(&"/etc/keelson-router"), "{mounts:?}");
    assert!(
        !mounts.iter().any(|m| m.contains("serviceaccount")),
        "the router has a service-account token: {mounts:?}"
    );
    let router_deploy = deploys.get("fraud-router").await.unwrap();
    assert_eq!(router_deploy.status.and_then(|s| s.ready_replicas), Some(1));

    let http = http();
    let url = format!("http://{}/predict", service_ip(&services, "fraud").await);
    answering(&ns, &http, &url, Duration::from_secs(30)).await;

    // Status shows the effective weights as soon as the operator wrote them, but the router reads
    // them only once the kubelet refreshes its mounted ConfigMap (the challenger became ready after
    // the router's first config, which gave it weight 0). Wait for the router to route to it.
    wait(
        &ns,
        "the router to send requests to the challenger",
        Duration::from_secs(240),
        || {
            let (http, url) = (&http, url.clone());
            async move {
                for _ in 0..100 {
                    let r = call(http, Method::GET, &url, &[], "").await.ok()?;
                    if r.status == 200 && r.variant.as_deref() == Some("challenger") {
                        return Some(());
                    }
                }
                None
            }
        },
    )
    .await;

    // 10,000 requests, split 90/10.
    let t = Arc::new(Tally::default());
    let t1 = Instant::now();
    burst(&http, &url, 10_000, 8, &t).await;
    eprintln!("10,000 requests in {:.1}s", t1.elapsed().as_secs_f64());
    let router_ip = rp.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap();
    if t.failures.load(Relaxed) > 0 {
        eprintln!("{}", router_errors(&http, &router_ip).await);
    }
    assert_split(&t, 90.0, "90/10");
    let before = md_pods(&pods).await;
    assert_eq!(before.len(), 3, "{before:?}");

    // Sticky: 200 users, 10 requests each, every user always on the same variant.
    let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for round in 0..10 {
        for u in 0..200 {
            let user = format!("user-{u}");
            let r = call(&http, Method::GET, &url, &[("x-user-id", &user)], "")
                .await
                .unwrap_or_else(|e| panic!("sticky round {round} {user}: {e}"));
            assert_eq!(r.status, 200, "{}", r.body);
            seen.entry(user)
                .or_default()
                .insert(r.variant.unwrap_or_default());
        }
    }
    let moved: Vec<_> = seen.iter().filter(|(_, v)| v.len() != 1).collect();
    assert!(moved.is_empty(), "users seen on two variants: {moved:?}");
    let per_variant: BTreeSet<&String> = seen.values().flatten().collect();
    assert_eq!(
        per_variant.into_iter().collect::<Vec<_>>(),
        ["challenger", "champion"],
        "200 users should land on both variants"
    );

    // A weight edit under steady load: no failed request, and then the 30/70 split.
    let load = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    const LOAD_CAP: u64 = 300_000;
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (http, url, load, stop, sent) = (
            http.clone(),
            url.clone(),
            load.clone(),
            stop.clone(),
            sent.clone(),
        );
        tasks.spawn(async move {
            while !stop.load(Relaxed) && sent.fetch_add(1, Relaxed) < LOAD_CAP {
                load.record(call(&http, Method::GET, &url, &[], "").await, "challenger");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
    }
    wait(&ns, "load to run", Duration::from_secs(30), || {
        let load = load.clone();
        async move { load.recent_share(2_000).map(|_| ()) }
    })
    .await;
    let edit = Instant::now();
    ns.apply(&model_yaml(30, 70)).unwrap();
    wait(
        &ns,
        "status champion=30,challenger=70",
        Duration::from_secs(60),
        ready_with("champion=30,challenger=70"),
    )
    .await;
    // The router reads the new weights once the kubelet refreshes the mounted ConfigMap.
    wait(
        &ns,
        "the router to split 30/70 over the last 2,000 answers",
        Duration::from_secs(240),
        || {
            let (load, sent) = (load.clone(), sent.clone());
            async move {
                assert!(
                    sent.load(Relaxed) < LOAD_CAP,
                    "the load reached its cap of {LOAD_CAP} requests before the split moved"
                );
                load.recent_share(2_000)
                    .filter(|s| (s - 70.0).abs() <= 2.0)
                    .map(|_| ())
            }
        },
    )
    .await;
    let switched = edit.elapsed();
    stop.store(true, Relaxed);
    while tasks.join_next().await.is_some() {}
    let total: u64 = load.by_variant.lock().unwrap().values().sum();
    eprintln!(
        "weight edit: {total} answers under load, the router split 30/70 {:.1}s after the apply, {} failures",
        switched.as_secs_f64(),
        load.failures.load(Relaxed)
    );
    assert_eq!(
        load.failures.load(Relaxed),
        0,
        "requests failed during the weight edit: {:?}",
        load.first_failures.lock().unwrap()
    );

    // The new split, measured clean; and no pod was replaced (weights live in the router's config).
    let t = Arc::new(Tally::default());
    burst(&http, &url, 10_000, 8, &t).await;
    assert_split(&t, 30.0, "30/70");
    assert_eq!(
        md_pods(&pods).await,
        before,
        "a weight edit replaced a model or router pod"
    );
    eprintln!(
        "modeldeployment_router_splits_pins_and_reweights_real_traffic: {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}

// --- NetworkPolicy enforcement (kube-router, firewall only) -------------------------------------

/// A long-running client on the real node (the modelserver stand-in, which also has `fetch`).
fn client_pod_yaml() -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: client, labels: {{app: client}}}}
spec:
{placement}  automountServiceAccountToken: false
  containers:
  - name: client
    image: {MODELSERVER}
    imagePullPolicy: Never
    env: [{{name: VARIANT, value: client}}]
    readinessProbe: {{httpGet: {{path: /ready, port: 8080}}, periodSeconds: 1}}
"#,
        placement = placement(2),
    )
}

/// `modelserver fetch url` run in the `client` pod of `ns`: what it printed (`<url>: <status>` and
/// the body, or `<url>: error: ...` when it could not connect).
fn fetch_in(ns: &Ns, url: &str) -> String {
    let o = support::kubectl(
        &[
            "-n",
            &ns.name,
            "exec",
            "client",
            "--",
            "/usr/local/bin/modelserver",
            "fetch",
            url,
        ],
        None,
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Polls `fetch_in` until the answer is an HTTP status (a connection was made); returns it.
async fn reaches(ns: &Ns, what: &str, url: &str) -> String {
    wait(ns, what, Duration::from_secs(60), || {
        let out = fetch_in(ns, url);
        async move { (!out.contains(": error:") && out.contains(": 200")).then_some(out) }
    })
    .await
}

fn netpol_notebook_yaml(allow: &[&str]) -> String {
    format!(
        r#"apiVersion: keelson.dev/v1alpha1
kind: Notebook
metadata: {{name: lab}}
spec:
  image: {NOTEBOOK}
  access: {{allowFrom: {{namespaces: [{allow}]}}}}
  resources: {{requests: {{cpu: 50m, memory: 32Mi}}}}
{placement}  template:
    spec:
      containers: [{{name: notebook, imagePullPolicy: Never}}]
"#,
        allow = allow.join(", "),
        placement = placement(2),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notebook_network_policy_is_enforced_on_the_real_node() {
    let t0 = Instant::now();
    setup();
    let ns = Ns::new("rn-np");
    let allowed = Ns::new("rn-np-allowed");
    let other = Ns::new("rn-np-other");
    let client = support::client().await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);

    ns.apply(&netpol_notebook_yaml(&[&allowed.name])).unwrap();
    for n in [&ns, &allowed, &other] {
        n.apply(&client_pod_yaml()).unwrap();
    }
    let pod = notebook_running(&ns, "Notebook lab Running", None).await;
    assert_eq!(node_of(&pod), REAL_NODE);
    let np = support::kubectl_ok(
        &["-n", &ns.name, "get", "networkpolicy", "lab", "-o", "json"],
        None,
    );
    eprintln!("NetworkPolicy lab: {np}");
    for n in [&ns, &allowed, &other] {
        support::kubectl_ok(
            &[
                "-n",
                &n.name,
                "wait",
                "pod/client",
                "--for=condition=Ready",
                "--timeout=90s",
            ],
            None,
        );
    }
    let tok = token(&secrets).await;
    let ip = service_ip(&services, "lab").await;
    let url = format!("http://{ip}:8888/api/status?token={tok}");
    let shown = |s: &str| s.replace(&tok, "<token>");

    // Its own namespace and the namespace spec.access.allowFrom names get through.
    let same = reaches(&ns, "a pod of the notebook's namespace to reach it", &url).await;
    eprintln!("same namespace: {}", shown(&same));
    let ok = reaches(&allowed, "a pod of the allowed namespace to reach it", &url).await;
    eprintln!("allowed namespace: {}", shown(&ok));

    // Another namespace: its network works (it reaches the client of the notebook's namespace,
    // which no policy selects), the notebook refuses it.
    let peer = support::kubectl_ok(
        &[
            "-n",
            &ns.name,
            "get",
            "pod",
            "client",
            "-o",
            "jsonpath={.status.podIP}",
        ],
        None,
    );
    let control = fetch_in(&other, &format!("http://{peer}:8080/ready"));
    assert!(control.contains(": 200"), "control fetch failed: {control}");
    for _ in 0..2 {
        let refused = fetch_in(&other, &url);
        eprintln!("other namespace: {}", shown(&refused));
        assert!(
            refused.contains(": error:"),
            "a pod of another namespace reached the notebook; is kube-router running \
             (make cluster-down; REAL_NODE=1 make cluster)?\n{}",
            shown(&refused)
        );
    }

    // Allowing that namespace in the spec lets it through: the refusal was the policy's.
    ns.apply(&netpol_notebook_yaml(&[&allowed.name, &other.name]))
        .unwrap();
    let now_ok = reaches(
        &other,
        "the other namespace to get through once spec.access.allowFrom names it",
        &url,
    )
    .await;
    eprintln!("other namespace, allowed by the spec: {}", shown(&now_ok));
    eprintln!(
        "notebook_network_policy_is_enforced_on_the_real_node: {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}

#[path = "real_node/under_load.rs"]
mod under_load;
