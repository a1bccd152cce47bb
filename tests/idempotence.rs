//! Idempotence, measured by the API server itself: once every kind is settled, a forced resync (a
//! fresh operator that lists and reconciles everything) makes zero writes. Its own binary, so that no
//! other test writes to the cluster while the API server's counters are read (cargo runs it before
//! the `integration` binary, on a cluster with no namespace being torn down).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use keelson_testkit as support;

use std::collections::BTreeSet;
use std::time::Duration;

use kube::api::ListParams;
use kube::Api;
use support::*;

use keelson_api::modeldeployment::ModelDeployment;
use keelson_api::notebook::Notebook;
use keelson_api::trainingjob::TrainingJob;

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
    "grpcroutes",
    "horizontalpodautoscalers",
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
    keelson_api::conditions::is_true(conds, "Ready")
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

    let mut keys = std::collections::BTreeSet::new();
    for n in nbs.list(&ListParams::default()).await.unwrap().items {
        keys.insert(format!("Notebook/{}/{}", ns.name, n.metadata.name.unwrap()));
    }
    for n in tjs.list(&ListParams::default()).await.unwrap().items {
        keys.insert(format!(
            "TrainingJob/{}/{}",
            ns.name,
            n.metadata.name.unwrap()
        ));
    }
    for n in mds.list(&ListParams::default()).await.unwrap().items {
        keys.insert(format!(
            "ModelDeployment/{}/{}",
            ns.name,
            n.metadata.name.unwrap()
        ));
    }
    let objects = keys.len();
    let before = our_writes();
    let own_before = shared.writes.total();

    // Forced resync: a second, fresh operator (the real binary, in its own process) lists
    // everything and reconciles every object. Its JSON log says which objects it has reconciled.
    let log_path = root().join(format!("target/idempotence-{}.log", ns.name));
    // As the operator's ServiceAccount, so that RBAC is checked here too.
    let mut fresh = spawn_operator(
        &kubeconfig(),
        &log_path,
        &["--health-addr", "", "--lease-namespace", "keelson-system"],
        &[("RUST_LOG", &test_log("keelson=debug"))],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let (fresh_writes, reconciles) = loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let mut seen = BTreeSet::new();
        let mut writes = Vec::new();
        let mut reconciles = 0;
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let field = |f: &str| {
                v.get(f)
                    .and_then(|x| x.as_str())
                    .unwrap_or_default()
                    .to_string()
            };
            if field("message") == "reconcile finished" {
                reconciles += 1;
                seen.insert(format!(
                    "{}/{}/{}",
                    field("kind"),
                    field("namespace"),
                    field("name")
                ));
            }
            // Every reconcile that writes logs what it changed.
            if v.get("changes").is_some() {
                writes.push(line.to_string());
            }
        }
        let missing: Vec<&String> = keys.iter().filter(|k| !seen.contains(*k)).collect();
        if missing.is_empty() {
            break (writes, reconciles);
        }
        if std::time::Instant::now() > deadline {
            let _ = fresh.kill();
            panic!(
                "the fresh operator has not reconciled {missing:?} after 120s ({reconciles} reconciles); its log: {}",
                log_path.display()
            );
        }
        tokio::time::sleep(POLL).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    // SIGTERM: the graceful path.
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &fresh.id().to_string()])
        .status();
    let stopped = std::time::Instant::now();
    while fresh.try_wait().ok().flatten().is_none() {
        if stopped.elapsed() > Duration::from_secs(30) {
            let _ = fresh.kill();
            panic!("the fresh operator did not stop within 30s of SIGTERM");
        }
        tokio::time::sleep(POLL).await;
    }

    let after = our_writes();
    let delta: Vec<_> = after
        .iter()
        .filter(|(k, v)| **v != before.get(*k).copied().unwrap_or(0.0))
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .collect();
    assert!(
        fresh_writes.is_empty(),
        "the fresh operator wrote ({reconciles} reconciles): {fresh_writes:#?}"
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
