//! The operator under test: in-process on its own runtime for a whole test binary, or as processes
//! of the real binary (replicas with leader election, killed when dropped), and plain HTTP to
//! their health port. It creates no test objects.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::cluster::{
    cluster, keelson_bin, kubeconfig, kubectl_ok, operator_client, root, OPERATOR_USER,
};

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
