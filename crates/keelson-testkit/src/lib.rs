//! Test support for Keelson, never linked into the operator: the integration-test harness (the local
//! cluster, started when it is not up; the CRDs; the real operator running its controllers in-process
//! against the real API server; one namespace per test; bounded polling helpers), the spec
//! generators ([`testgen`]), the offline schema check ([`schema_check`]), Flux's readiness rules
//! ([`kstatus`]) and a counting API proxy ([`proxy`]).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod kstatus;
pub mod proxy;
pub mod schema_check;
pub mod testgen;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

pub const POLL: Duration = Duration::from_millis(250);
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Specs the API server accepts but the builders refuse (conditions with a reason, never Ready):
/// a Notebook volume on the workspace's path, and a variant named like the Builtin router.
pub const UNRUNNABLE: &str =
    "# Accepted by the API server, refused by the builder: the workspace and a volume share a path.
apiVersion: keelson.dev/v1alpha1
kind: Notebook
metadata: {name: nb-bad}
spec:
  image: jupyter:1
  workspace: {size: 1Gi}
  volumes:
    - {name: home, mountPath: /home/jovyan, emptyDir: {}}
---
# Accepted by the API server, refused by the builder: `router` names the Builtin router.
apiVersion: keelson.dev/v1alpha1
kind: ModelDeployment
metadata: {name: md-bad}
spec:
  variants:
    - {name: router, image: srv:1, weight: 100}
";

/// The repository's root: the workspace that holds this crate under `crates/`.
pub fn root() -> PathBuf {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    crate_dir
        .ancestors()
        .nth(2)
        .unwrap_or(crate_dir)
        .to_path_buf()
}

/// The `keelson` binary of this build: next to the test executable's `deps/` directory, where
/// cargo puts the binaries that integration tests run.
pub fn keelson_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let dir = exe.parent().expect("deps/");
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("the profile directory")
    } else {
        dir
    };
    dir.join(format!("keelson{}", std::env::consts::EXE_SUFFIX))
}

pub fn kubeconfig() -> PathBuf {
    root().join("target/cluster/kubeconfig")
}

pub fn kubectl_bin() -> PathBuf {
    root().join("target/cluster/bin/kubectl")
}

static CLUSTER: OnceLock<()> = OnceLock::new();

/// Starts the local cluster when it is not up (idempotent), and installs the CRDs. Once per test binary.
pub fn cluster() {
    CLUSTER.get_or_init(|| {
        let out = Command::new(root().join("hack/cluster/up.sh"))
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .status()
            .expect("run hack/cluster/up.sh");
        assert!(
            out.success(),
            "the local cluster did not start: see target/cluster/logs/"
        );
        let o = kubectl(
            &["apply", "--server-side", "--force-conflicts", "-f", "crds/"],
            None,
        );
        assert!(
            o.status.success(),
            "installing CRDs: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        // The operator's namespace, ServiceAccount and RBAC: tests run it as that ServiceAccount.
        let o = kubectl(
            &[
                "apply",
                "--server-side",
                "--force-conflicts",
                "-f",
                "config/manager/namespace.yaml",
            ],
            None,
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let o = kubectl(
            &[
                "apply",
                "--server-side",
                "--force-conflicts",
                "-k",
                "config/rbac",
            ],
            None,
        );
        assert!(
            o.status.success(),
            "installing RBAC: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        // Right after creation a CRD has no conditions yet, which `kubectl wait` reports as an
        // error rather than waiting: poll until every CRD is Established.
        wait_sync(Duration::from_secs(60), || {
            ["notebooks", "trainingjobs", "modeldeployments"]
                .iter()
                .all(|p| {
                    let o = kubectl(
                        &[
                            "get",
                            "crd",
                            &format!("{p}.keelson.dev"),
                            "-o",
                            "jsonpath={.status.conditions[?(@.type=='Established')].status}",
                        ],
                        None,
                    );
                    String::from_utf8_lossy(&o.stdout).trim() == "True"
                })
        });
    });
}

/// Runs the real kubectl against the local cluster.
pub fn kubectl(args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(kubectl_bin());
    cmd.arg("--kubeconfig")
        .arg(kubeconfig())
        .args(args)
        .current_dir(root());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn kubectl");
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    child.wait_with_output().expect("kubectl output")
}

/// kubectl that must succeed; returns stdout.
pub fn kubectl_ok(args: &[&str], stdin: Option<&str>) -> String {
    let o = kubectl(args, stdin);
    assert!(
        o.status.success(),
        "kubectl {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A client of the local cluster, on the current runtime.
pub async fn client() -> Client {
    cluster();
    let kc = Kubeconfig::read_from(kubeconfig()).expect("read kubeconfig");
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig");
    Client::try_from(cfg).expect("client")
}

/// The operator's own identity: its ServiceAccount from config/rbac.
pub const OPERATOR_USER: &str = "system:serviceaccount:keelson-system:keelson";

/// A client that acts as the operator's ServiceAccount (impersonated), so that the API server
/// checks every call of the operator against the RBAC of config/rbac.
pub async fn operator_client() -> Client {
    cluster();
    let kc = Kubeconfig::read_from(kubeconfig()).expect("read kubeconfig");
    let mut cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig");
    cfg.auth_info.impersonate = Some(OPERATOR_USER.into());
    cfg.auth_info.impersonate_groups = Some(vec![
        "system:serviceaccounts".into(),
        "system:serviceaccounts:keelson-system".into(),
        "system:authenticated".into(),
    ]);
    Client::try_from(cfg).expect("client")
}

/// The operator, running in-process on its own runtime for the whole test binary.
pub struct Operator {
    pub shared: Arc<Mutex<Option<Arc<keelson_operator::runtime::controller::Shared>>>>,
}

static OPERATOR: OnceLock<Operator> = OnceLock::new();

/// Starts the operator once per test binary (all three controllers against the local API server).
pub fn operator() -> &'static Operator {
    OPERATOR.get_or_init(|| {
        cluster();
        let slot: Arc<Mutex<Option<Arc<keelson_operator::runtime::controller::Shared>>>> =
            Arc::default();
        let s2 = slot.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let _ = tracing_subscriber::fmt()
                    .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
                    .with_test_writer()
                    .try_init();
                let client = operator_client().await;
                let opts = keelson_operator::operator::RunOptions::default();
                let (_stop, shutdown) = keelson_operator::operator::shutdown_channel();
                let shared = Arc::new(keelson_operator::runtime::controller::Shared::new(client));
                *s2.lock().unwrap() = Some(shared.clone());
                tx.send(()).unwrap();
                keelson_operator::operator::run_with(shared, &opts, shutdown).await;
            });
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("operator started");
        Operator { shared: slot }
    })
}

/// Asserts that the API server refuses `yaml` in `ns`, with every one of `needles` in the error.
pub fn refused(ns: &Ns, yaml: &str, needles: &[&str]) {
    let err = ns
        .apply(yaml)
        .expect_err(&format!("accepted but should be refused:\n{yaml}"));
    for n in needles {
        assert!(
            err.contains(n),
            "expected {n:?} in the error:\n{err}\nfor:\n{yaml}"
        );
    }
}

/// A namespace of one test, deleted when dropped.
pub struct Ns {
    pub name: String,
}

impl Ns {
    pub fn new(prefix: &str) -> Ns {
        cluster();
        let name = format!("{prefix}-{}", rand_suffix());
        kubectl_ok(&["create", "namespace", &name], None);
        // Pods need the namespace's default ServiceAccount, made by kube-controller-manager.
        wait_sync(Duration::from_secs(30), || {
            kubectl(&["-n", &name, "get", "serviceaccount", "default"], None)
                .status
                .success()
        });
        Ns { name }
    }

    /// `kubectl apply --server-side` of a YAML document in this namespace; Err(stderr) when refused.
    pub fn apply(&self, yaml: &str) -> Result<String, String> {
        let o = kubectl(
            &[
                "-n",
                &self.name,
                "apply",
                "--server-side",
                "--field-manager=test-user",
                "-f",
                "-",
            ],
            Some(yaml),
        );
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&o.stderr).into_owned())
        }
    }

    pub fn kubectl(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        kubectl_ok(&a, None)
    }

    /// Every manifest of examples/, with a volume for each claim they make.
    pub fn apply_examples(&self) {
        self.volumes_for_examples();
        for f in examples() {
            self.apply(&example(&f))
                .unwrap_or_else(|e| panic!("{f} refused: {e}"));
        }
    }

    /// A volume for each claim that examples/ makes (directly or through a Notebook workspace).
    pub fn volumes_for_examples(&self) {
        for (claim, size) in [
            ("shared-datasets", "100Gi"),
            ("models", "10Gi"),
            ("scorer-models", "5Gi"),
            ("alice-workspace", "10Gi"),
            ("scratch-workspace", "5Gi"),
        ] {
            self.pv_for(claim, size);
        }
    }

    /// A hostPath PersistentVolume pre-bound to claim `pvc` of this namespace.
    pub fn pv_for(&self, pvc: &str, size: &str) {
        let pv = format!("{}-{pvc}", self.name);
        let o = Command::new(root().join("hack/cluster/pv.sh"))
            .args([
                pv.as_str(),
                size,
                "--claim",
                &format!("{}/{pvc}", self.name),
            ])
            .output()
            .expect("pv.sh");
        assert!(
            o.status.success(),
            "pv.sh: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// The real node of the local cluster (`REAL_NODE=1 make cluster`, docs/real-node.md).
pub const REAL_NODE: &str = "keelson-node-0";

/// The YAML lines that put a workload on the real node: its label and its taint.
pub const REAL_NODE_PLACEMENT: &str = r#"nodeSelector: {keelson.dev/real-node: "true"}
tolerations: [{key: keelson.dev/real-node, operator: Exists, effect: NoSchedule}]"#;

/// Panics, with what to run, unless the real node is registered, Ready and has `images` (e.g.
/// `keelson.dev/trainer:dev`) in its containerd. Once per test binary.
pub fn real_node(images: &[&str]) {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        cluster();
        let o = kubectl(&["get", "node", REAL_NODE, "-o", "json"], None);
        assert!(
            o.status.success(),
            "no real node: node {REAL_NODE} is not in the cluster ({}); run REAL_NODE=1 make cluster",
            String::from_utf8_lossy(&o.stderr).trim()
        );
        let node: serde_json::Value = serde_json::from_slice(&o.stdout).expect("node JSON");
        let ready = node["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        assert!(
            ready,
            "the real node {REAL_NODE} is not Ready; run REAL_NODE=1 make cluster (it repairs a stopped node)"
        );
        // The kubelet lists the node's images in its status from a cache it refreshes every 30 s,
        // so an image imported just before the tests may be missing there for a while. What a
        // pod with `imagePullPolicy: Never` needs is the image in the node's containerd: ask it.
        let mut missing: Vec<&str> = images
            .iter()
            .copied()
            .filter(|want| !node_status_images(&node).iter().any(|h| h.ends_with(want)))
            .collect();
        if !missing.is_empty() {
            let in_containerd = containerd_images();
            missing.retain(|want| !in_containerd.iter().any(|h| h.ends_with(want)));
        }
        assert!(
            missing.is_empty(),
            "images {missing:?} are not on the real node {REAL_NODE} (neither in its status nor in its containerd); run make images (stand-ins) or make image (keelson)"
        );
    });
}

/// The real node's containerd socket (hack/cluster/lib.sh `CONTAINERD_SOCK`).
pub const REAL_NODE_CONTAINERD_SOCK: &str = "/run/keelson-containerd/containerd.sock";

fn node_status_images(node: &serde_json::Value) -> Vec<String> {
    node["status"]["images"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|i| i["names"].as_array().into_iter().flatten())
        .filter_map(|n| n.as_str().map(str::to_string))
        .collect()
}

/// The image names in the real node's containerd (namespace `k8s.io`, the kubelet's); empty when
/// `ctr` cannot be run.
fn containerd_images() -> Vec<String> {
    Command::new("ctr")
        .args([
            "--address",
            REAL_NODE_CONTAINERD_SOCK,
            "-n",
            "k8s.io",
            "images",
            "ls",
            "-q",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// A `hostPath` PersistentVolume at `path` on one node (`nodeAffinity` to its hostname, so the pod
/// that mounts it lands there), pre-bound to claim `claim` of this namespace. Deleted when dropped.
pub struct NodePv {
    pub name: String,
}

impl Ns {
    /// A [`NodePv`] for claim `claim` of this namespace; `path` must be a directory on `node`.
    pub fn node_pv(&self, claim: &str, size: &str, path: &Path, node: &str) -> NodePv {
        let name = format!("{}-{claim}", self.name);
        let yaml = format!(
            r#"apiVersion: v1
kind: PersistentVolume
metadata:
  name: {name}
  labels: {{keelson.dev/test-volume: "true"}}
spec:
  capacity: {{storage: {size}}}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  volumeMode: Filesystem
  storageClassName: ""
  hostPath: {{path: "{path}", type: Directory}}
  claimRef: {{namespace: {ns}, name: {claim}}}
  nodeAffinity:
    required:
      nodeSelectorTerms:
      - matchExpressions:
        - {{key: kubernetes.io/hostname, operator: In, values: [{node}]}}
"#,
            path = path.display(),
            ns = self.name,
        );
        kubectl_ok(&["apply", "-f", "-"], Some(&yaml));
        NodePv { name }
    }
}

impl Drop for NodePv {
    fn drop(&mut self) {
        if std::env::var("KEEP_NAMESPACES").is_err() {
            let _ = kubectl(&["delete", "pv", &self.name, "--wait=false"], None);
        }
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        if std::env::var("KEEP_NAMESPACES").is_err() {
            let _ = kubectl(&["delete", "namespace", &self.name, "--wait=false"], None);
        }
    }
}

fn rand_suffix() -> String {
    use rand::Rng;
    let mut r = rand::rng();
    (0..5)
        .map(|_| (b'a' + r.random_range(0..26)) as char)
        .collect()
}

/// Polls `f` every [`POLL`] until it returns `Some`, or panics with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Blocking poll for setup code.
pub fn wait_sync(timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?}");
        std::thread::sleep(POLL);
    }
}

/// Makes a pod exit with `code` the way a kubelet reports it (kwok stage driven by an annotation,
/// see docs/cluster.md).
pub fn exit_pod(ns: &str, pod: &str, code: i32) {
    kubectl_ok(
        &[
            "-n",
            ns,
            "annotate",
            "--overwrite",
            "pod",
            pod,
            &format!("keelson.dev/sim-exit-code={code}"),
        ],
        None,
    );
}

/// Reads a manifest from examples/.
pub fn example(file: &str) -> String {
    std::fs::read_to_string(root().join("examples").join(file)).unwrap()
}

/// Every example file name.
pub fn examples() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    v.sort();
    v
}

/// The API server's write requests (POST, PUT, PATCH, DELETE) per resource, from its own /metrics.
pub fn apiserver_writes() -> std::collections::BTreeMap<String, f64> {
    let text = kubectl_ok(&["get", "--raw", "/metrics"], None);
    let mut out = std::collections::BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let label = |k: &str| -> String {
            line.split(&format!("{k}=\""))
                .nth(1)
                .and_then(|s| s.split('"').next())
                .unwrap_or("")
                .to_string()
        };
        let verb = label("verb");
        if !matches!(
            verb.as_str(),
            "POST" | "PUT" | "PATCH" | "DELETE" | "APPLY" | "CREATE" | "UPDATE"
        ) {
            continue;
        }
        let sub = label("subresource");
        let key = format!(
            "{verb} {}{}",
            label("resource"),
            if sub.is_empty() {
                String::new()
            } else {
                format!("/{sub}")
            }
        );
        let v: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.0);
        *out.entry(key).or_insert(0.0) += v;
    }
    out
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP/1.1 GET of `path` from `addr` (`127.0.0.1:8080`): status and body.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

pub fn path_exists(p: &Path) -> bool {
    p.exists()
}

/// A child process killed (SIGKILL) when dropped, so that a failing test leaves nothing running.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The operator's log filter: `KEELSON_TEST_LOG`, else `default`.
pub fn test_log(default: &str) -> String {
    std::env::var("KEELSON_TEST_LOG").unwrap_or_else(|_| default.into())
}

/// The real operator binary (`keelson run` with `args`) as its ServiceAccount (impersonated), its
/// log (JSON lines) in `log`. `kubeconfig` picks the API server it talks to.
pub fn spawn_operator(
    kubeconfig: &Path,
    log: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> std::process::Child {
    let out = std::fs::File::create(log).expect("operator log file");
    Command::new(keelson_bin())
        .args(["--log-format", "json", "run"])
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("KUBE_RS_DEBUG_IMPERSONATE_USER", OPERATOR_USER)
        .env(
            "KUBE_RS_DEBUG_IMPERSONATE_GROUP",
            "system:serviceaccounts,system:serviceaccounts:keelson-system,system:authenticated",
        )
        .env("RUST_LOG", test_log("keelson=info"))
        // Last, so that a caller's RUST_LOG wins.
        .envs(env.iter().copied())
        .stdout(out.try_clone().expect("log file"))
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn the keelson binary")
}

/// Replicas of the real binary with leader election on a Lease of their own.
pub const LEASE_NS: &str = "keelson-system";

pub struct Replica {
    pub child: std::process::Child,
    pub addr: String,
}

impl Replica {
    pub fn start(lease: &str, port: u16) -> Replica {
        Replica::start_with(lease, port, &[])
    }

    /// A replica with more `keelson run` flags.
    pub fn start_with(lease: &str, port: u16, flags: &[&str]) -> Replica {
        let addr = format!("127.0.0.1:{port}");
        let log = root().join(format!("target/{lease}-{port}.log"));
        let pod = format!("replica-{port}");
        let mut args = vec![
            "--health-addr",
            &addr,
            "--lease-namespace",
            LEASE_NS,
            "--lease-name",
            lease,
        ];
        args.extend_from_slice(flags);
        let child = spawn_operator(&kubeconfig(), &log, &args, &[("POD_NAME", pod.as_str())]);
        Replica { child, addr }
    }

    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(&self.addr, path)
    }

    pub fn is_leader(&self) -> bool {
        self.get("/metrics")
            .is_some_and(|(_, m)| m.lines().any(|l| l == "keelson_leader 1"))
    }

    pub fn is_standby(&self) -> bool {
        self.get("/metrics")
            .is_some_and(|(_, m)| m.lines().any(|l| l == "keelson_leader 0"))
    }

    pub fn ready(&self) -> bool {
        self.get("/readyz").is_some_and(|(c, _)| c == 200)
    }

    pub fn signal(&self, sig: &str) {
        Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn holder(lease: &str) -> String {
    kubectl_ok(
        &[
            "-n",
            LEASE_NS,
            "get",
            "lease",
            lease,
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ],
        None,
    )
}
