//! Idempotence, measured by the API server itself: once every kind is settled, a forced resync (a
//! fresh operator that lists and reconciles everything) makes zero writes. Its own binary, so that no
//! other test writes to the cluster while the API server's counters are read (cargo runs it before
//! the `integration` binary, on a cluster with no namespace being torn down).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mod.rs"]
mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use kube::api::ListParams;
use kube::Api;
use support::*;

use keelson::modeldeployment::ModelDeployment;
use keelson::notebook::Notebook;
use keelson::trainingjob::TrainingJob;

/// Resources Keelson reads or writes; writes to anything else (node heartbeats, leases) are not ours.
const OURS: &[&str] = &[
    "pods",
    "services",
    "secrets",
    "persistentvolumeclaims",
    "configmaps",
    "deployments",
    "events",
    "notebooks",
    "trainingjobs",
    "modeldeployments",
    "httproutes",
];

fn our_writes() -> std::collections::BTreeMap<String, f64> {
    apiserver_writes()
        .into_iter()
        .filter(|(k, _)| {
            let resource = k
                .split(' ')
                .nth(1)
                .unwrap_or("")
                .split('/')
                .next()
                .unwrap_or("");
            OURS.contains(&resource)
        })
        .collect()
}

fn ready(conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]) -> bool {
    keelson::api::conditions::is_true(conds, "Ready")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_resync_of_settled_resources_makes_no_write() {
    let op = operator();
    // Namespaces of earlier runs that are still being deleted hold objects whose children the
    // namespace controller is removing: that is not a settled world.
    wait_for(
        "no namespace terminating",
        Duration::from_secs(180),
        || async {
            let out = kubectl_ok(&["get", "namespaces", "--no-headers"], None);
            (!out.contains("Terminating")).then_some(())
        },
    )
    .await;
    let ns = Ns::new("noop");
    let client = client().await;
    ns.apply_examples();
    let nbs: Api<Notebook> = Api::namespaced(client.clone(), &ns.name);
    let tjs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    wait_for(
        "every example settled",
        Duration::from_secs(120),
        || async {
            let lp = ListParams::default();
            let nb_ok = nbs.list(&lp).await.ok()?.items.iter().all(|n| {
                n.status.as_ref().is_some_and(|s| {
                    ready(&s.conditions) && s.observed_generation == n.metadata.generation
                })
            });
            let md_ok = mds.list(&lp).await.ok()?.items.iter().all(|n| {
                n.status.as_ref().is_some_and(|s| {
                    ready(&s.conditions) && s.observed_generation == n.metadata.generation
                })
            });
            let tj_ok = tjs.list(&lp).await.ok()?.items.iter().all(|n| {
                n.status.as_ref().is_some_and(|s| {
                    s.observed_generation == n.metadata.generation
                        && (ready(&s.conditions) || n.spec.suspend == Some(true))
                })
            });
            (nb_ok && md_ok && tj_ok).then_some(())
        },
    )
    .await;

    // Settled: the running operator has stopped writing.
    let shared = op.shared.lock().unwrap().clone().unwrap();
    let mut last = shared.writes.total();
    wait_for(
        "the operator to stop writing",
        Duration::from_secs(60),
        || {
            let now = shared.writes.total();
            let quiet = now == last;
            last = now;
            async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                quiet.then_some(())
            }
        },
    )
    .await;

    let objects = nbs.list(&ListParams::default()).await.unwrap().items.len()
        + tjs.list(&ListParams::default()).await.unwrap().items.len()
        + mds.list(&ListParams::default()).await.unwrap().items.len();
    let before = our_writes();
    let own_before = shared.writes.total();

    // Forced resync: a second, fresh operator lists everything and reconciles every object.
    let fresh = Arc::new(keelson::controller::Shared::new(client.clone()));
    let (stop, shutdown) = keelson::operator::shutdown_channel();
    let f2 = fresh.clone();
    let handle = tokio::spawn(async move {
        keelson::operator::run_with(
            f2,
            &keelson::operator::RunOptions {
                concurrency: 4,
                health_addr: String::new(),
            },
            shutdown,
        )
        .await;
    });
    // Every object is reconciled at least once by the fresh operator.
    wait_for(
        "the fresh operator to reconcile every object",
        Duration::from_secs(120),
        || {
            let n = fresh.reconciled.load(Ordering::Relaxed) as usize;
            async move { (n >= objects).then_some(()) }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(30), handle).await;

    let after = our_writes();
    let delta: Vec<_> = after
        .iter()
        .filter(|(k, v)| **v != before.get(*k).copied().unwrap_or(0.0))
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .collect();
    assert_eq!(
        fresh.writes.total(),
        0,
        "the fresh operator wrote: apply {} create {} delete {} status {}",
        fresh.writes.apply.load(Ordering::Relaxed),
        fresh.writes.create.load(Ordering::Relaxed),
        fresh.writes.delete.load(Ordering::Relaxed),
        fresh.writes.status.load(Ordering::Relaxed)
    );
    assert_eq!(
        shared.writes.total(),
        own_before,
        "the running operator wrote during the resync"
    );
    assert!(
        delta.is_empty(),
        "the API server counted writes during a no-op resync: {delta:?}"
    );
    println!(
        "no-op resync of {objects} objects: 0 writes (API server counters on {} resources unchanged)",
        OURS.len()
    );
}
