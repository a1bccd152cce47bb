//! Two replicas of the real binary, as the operator's ServiceAccount: one leader at a time, a
//! standby that takes over within 15 s of the leader's SIGKILL, and a Lease released on SIGTERM.
//! Leadership, readiness and metrics are read from each replica's own /metrics and /readyz.

use std::time::{Duration, Instant};

use crate::support::*;

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
