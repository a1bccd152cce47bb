//! Two replicas of the real binary, as the operator's ServiceAccount: one leader at a time, a
//! standby that takes over within 15 s of the leader's SIGKILL, and a Lease released on SIGTERM.
//! Leadership, readiness and metrics are read from each replica's own /metrics and /readyz.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

const LEASE_NS: &str = "keelson-system";

struct Replica {
    child: Child,
    addr: String,
}

impl Replica {
    fn start(lease: &str, port: u16) -> Replica {
        let addr = format!("127.0.0.1:{port}");
        let log = std::fs::File::create(root().join(format!("target/{lease}-{port}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_keelson"))
            .args(["--log-format", "json", "run", "--health-addr", &addr])
            .args(["--lease-namespace", LEASE_NS, "--lease-name", lease])
            .env("KUBECONFIG", kubeconfig())
            .env("POD_NAME", format!("replica-{port}"))
            .env("RUST_LOG", "keelson=info")
            .env("KUBE_RS_DEBUG_IMPERSONATE_USER", OPERATOR_USER)
            .env(
                "KUBE_RS_DEBUG_IMPERSONATE_GROUP",
                "system:serviceaccounts,system:serviceaccounts:keelson-system,system:authenticated",
            )
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Replica { child, addr }
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(&self.addr, path)
    }

    fn is_leader(&self) -> bool {
        self.get("/metrics")
            .is_some_and(|(_, m)| m.lines().any(|l| l == "keelson_leader 1"))
    }

    fn is_standby(&self) -> bool {
        self.get("/metrics")
            .is_some_and(|(_, m)| m.lines().any(|l| l == "keelson_leader 0"))
    }

    fn ready(&self) -> bool {
        self.get("/readyz").is_some_and(|(c, _)| c == 200)
    }

    fn signal(&self, sig: &str) {
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

fn holder(lease: &str) -> String {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_a_standby_takes_over_and_sigterm_releases_the_lease() {
    cluster();
    let lease = format!("leader-test-{}", std::process::id());
    let a = Replica::start(&lease, free_port());
    wait_for("replica A to lead", TIMEOUT, || async {
        (a.is_leader() && a.ready()).then_some(())
    })
    .await;
    assert_eq!(
        holder(&lease),
        "replica-".to_string() + a.addr.rsplit(':').next().unwrap()
    );
    // The leader reconciles, and says so in its metrics.
    let ns = Ns::new("leader");
    ns.pv_for("scratch-workspace", "5Gi");
    ns.apply(&example("notebook-cpu.yaml")).unwrap();
    wait_for("the leader's reconcile metrics", TIMEOUT, || async {
        let m = a.get("/metrics")?.1;
        (m.contains("keelson_reconciles_total{kind=\"Notebook\"}")
            && m.contains("keelson_reconcile_duration_seconds_bucket{")
            && m.contains("keelson_writes_total{op="))
        .then_some(())
    })
    .await;

    let mut b = Replica::start(&lease, free_port());
    wait_for("replica B to stand by, ready", TIMEOUT, || async {
        (b.is_standby() && b.ready()).then_some(())
    })
    .await;
    // Two replicas never lead at once: B stays a standby while A renews.
    for _ in 0..8 {
        assert!(
            a.is_leader() && b.is_standby(),
            "not exactly one leader: A {:?} B {:?}",
            a.get("/metrics"),
            b.get("/metrics")
        );
        tokio::time::sleep(POLL).await;
    }

    // The leader dies without releasing: B takes over once the Lease expires.
    a.signal("-KILL");
    let killed = Instant::now();
    wait_for(
        "replica B to take over",
        Duration::from_secs(30),
        || async { b.is_leader().then_some(()) },
    )
    .await;
    let takeover = killed.elapsed();
    println!("takeover after the leader's SIGKILL: {takeover:.1?}");
    assert!(
        takeover < Duration::from_secs(15),
        "takeover took {takeover:?}"
    );
    assert!(holder(&lease).ends_with(b.addr.rsplit(':').next().unwrap()));
    wait_for("replica B ready as leader", TIMEOUT, || async {
        b.ready().then_some(())
    })
    .await;

    // SIGTERM: B stops cleanly and releases the Lease for the next replica at once.
    b.signal("-TERM");
    let status = wait_for("replica B to exit", Duration::from_secs(30), || {
        let s = b.child.try_wait().unwrap();
        async move { s }
    })
    .await;
    assert!(status.success(), "exit status {status:?}");
    let h = holder(&lease);
    assert!(h.is_empty(), "the Lease is still held by {h:?}");
}
