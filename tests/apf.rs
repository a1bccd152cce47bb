//! The operator under the API server's Priority and Fairness (APF), with no client-side limit (the
//! default): a `FlowSchema` puts its ServiceAccount in a `PriorityLevelConfiguration` of the smallest
//! concurrency and no queue, so that much of a burst is answered 429. Every 429 is retried after
//! its `Retry-After` and counted; the burst still converges with every child, status and Event
//! written once, and the log holds no storm of errors. Its own binary: the starved flow must not slow
//! the other tests down.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use keelson_testkit as support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Event, Pod, Service};
use kube::api::{ListParams, PostParams};
use kube::Api;
use support::*;

use keelson_api::trainingjob::{JobPhase, TrainingJob};

const JOBS: usize = 50;
const WORKERS: i32 = 2;
const NAME: &str = "keelson-test-starved";

/// The priority level and the flow schema that starve the operator's ServiceAccount; removed when
/// dropped, also when the test fails.
struct Starved;

impl Starved {
    fn create() -> Starved {
        let yaml = format!(
            "apiVersion: flowcontrol.apiserver.k8s.io/v1
kind: PriorityLevelConfiguration
metadata: {{name: {NAME}}}
spec:
  type: Limited
  limited:
    nominalConcurrencyShares: 1
    lendablePercent: 0
    borrowingLimitPercent: 0
    limitResponse: {{type: Reject}}
---
apiVersion: flowcontrol.apiserver.k8s.io/v1
kind: FlowSchema
metadata: {{name: {NAME}}}
spec:
  priorityLevelConfiguration: {{name: {NAME}}}
  matchingPrecedence: 10
  distinguisherMethod: {{type: ByUser}}
  rules:
  - subjects:
    - kind: User
      user: {{name: \"{OPERATOR_USER}\"}}
    resourceRules:
    - {{verbs: [\"*\"], apiGroups: [\"*\"], resources: [\"*\"], namespaces: [\"*\"], clusterScope: true}}
    nonResourceRules:
    - {{verbs: [\"*\"], nonResourceURLs: [\"*\"]}}
"
        );
        kubectl_ok(&["apply", "-f", "-"], Some(&yaml));
        Starved
    }
}

impl Drop for Starved {
    fn drop(&mut self) {
        let _ = kubectl(
            &[
                "delete",
                "flowschema",
                NAME,
                "--ignore-not-found",
                "--wait=false",
            ],
            None,
        );
        let _ = kubectl(
            &[
                "delete",
                "prioritylevelconfiguration",
                NAME,
                "--ignore-not-found",
                "--wait=false",
            ],
            None,
        );
    }
}

/// A series of the API server's /metrics whose line contains every one of `labels`, summed.
fn apiserver_metric(name: &str, labels: &[&str]) -> f64 {
    kubectl_ok(&["get", "--raw", "/metrics"], None)
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A value of the operator's /metrics (summed over the label sets that contain `labels`).
fn metric(addr: &str, name: &str, labels: &str) -> f64 {
    let Some((200, text)) = http_get(addr, "/metrics") else {
        return f64::NAN;
    };
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn converged(j: &TrainingJob) -> bool {
    j.status.as_ref().is_some_and(|s| {
        s.phase == Some(JobPhase::Running)
            && s.observed_generation == j.metadata.generation
            && s.workers_ready.as_deref() == Some("2/2")
            && keelson_api::conditions::is_true(&s.conditions, "Ready")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starved_flow_is_retried_after_429_and_converges() {
    cluster();
    // The operator reconciles every namespace: one still being deleted would add its own errors.
    wait_for(
        "no namespace terminating",
        Duration::from_secs(180),
        || async {
            let out = kubectl_ok(&["get", "namespaces", "--no-headers"], None);
            (!out.contains("Terminating")).then_some(())
        },
    )
    .await;
    let ns = Ns::new("apf");
    let client = client().await;
    let _starved = Starved::create();
    // The API server applies a new FlowSchema within a second or so; wait until it classifies the
    // operator's identity into it (a request as the operator counts in the schema's metrics).
    let sa = operator_client().await;
    wait_for("the flow schema in force", Duration::from_secs(60), || {
        let sa = sa.clone();
        async move {
            let _ = sa.apiserver_version().await;
            (apiserver_metric(
                "apiserver_flowcontrol_dispatched_requests_total",
                &[&format!("flow_schema=\"{NAME}\"")],
            ) > 0.0)
                .then_some(())
        }
    })
    .await;

    let addr = format!("127.0.0.1:{}", free_port());
    let log = root().join(format!("target/apf-{}.log", ns.name));
    let op = KillOnDrop(spawn_operator(
        &kubeconfig(),
        &log,
        &["--health-addr", &addr, "--leader-elect", "false"],
        &[],
    ));
    let rejected_before = apiserver_metric(
        "apiserver_flowcontrol_rejected_requests_total",
        &[&format!("flow_schema=\"{NAME}\"")],
    );

    // The burst, as fast as the test can send it (the test's own admin identity is exempt).
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &ns.name);
    futures::stream::iter(0..JOBS)
        .map(|i| {
            let jobs = jobs.clone();
            async move {
                let job: TrainingJob = serde_json::from_value(serde_json::json!({
                    "apiVersion": "keelson.dev/v1alpha1", "kind": "TrainingJob",
                    "metadata": {"name": format!("job-{i:02}")},
                    "spec": {"image": "trainer:1", "framework": "PyTorch", "workers": WORKERS},
                }))
                .unwrap();
                jobs.create(&PostParams::default(), &job).await.unwrap();
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;

    let started = Instant::now();
    wait_for(
        "every job converged under the starved flow",
        Duration::from_secs(300),
        || async {
            let list = jobs.list(&ListParams::default()).await.ok()?;
            (list.items.len() == JOBS && list.items.iter().all(converged)).then_some(())
        },
    )
    .await;
    let took = started.elapsed();

    // The API server did turn the operator away, and the operator counted and retried each time.
    let rejected = apiserver_metric(
        "apiserver_flowcontrol_rejected_requests_total",
        &[&format!("flow_schema=\"{NAME}\"")],
    ) - rejected_before;
    let retried = metric(&addr, "keelson_api_retried_total", "code=\"429\"");
    println!(
        "{JOBS} jobs converged in {took:?}; the API server rejected {rejected} requests of the flow, the operator retried {retried} answers 429"
    );
    assert!(
        rejected > 0.0,
        "the flow was never starved: the test proves nothing"
    );
    assert!(retried > 0.0, "no 429 counted by the operator");
    assert_eq!(
        metric(&addr, "keelson_events_dropped_total", ""),
        0.0,
        "Events were dropped"
    );

    // No lost write: exactly the children, and each job's one Event.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let pod_list = pods.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(pod_list.len(), JOBS * WORKERS as usize);
    assert_eq!(
        svcs.list(&ListParams::default()).await.unwrap().items.len(),
        JOBS
    );
    // Events are recorded in the background: give the last ones a moment.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    let per_job = wait_for(
        "each job's PodCreated Event",
        Duration::from_secs(60),
        || async {
            let mut per_job: BTreeMap<String, usize> = BTreeMap::new();
            for e in events.list(&ListParams::default()).await.ok()?.items {
                if e.reporting_component.as_deref() == Some("keelson")
                    && e.reason.as_deref() == Some("PodCreated")
                {
                    *per_job
                        .entry(e.involved_object.name.clone().unwrap_or_default())
                        .or_default() += 1;
                }
            }
            (per_job.len() == JOBS).then_some(per_job)
        },
    )
    .await;
    assert!(per_job.values().all(|n| *n == 1), "{per_job:?}");

    // No error storm: what gave up after its retries is logged, and there is next to none of it.
    let _ = Command::new("kill")
        .args(["-TERM", &op.0.id().to_string()])
        .status();
    std::thread::sleep(Duration::from_secs(2));
    drop(op);
    let text = std::fs::read_to_string(&log).unwrap();
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("\"level\":\"ERROR\"") || l.contains("\"level\":\"WARN\""))
        .collect();
    println!(
        "{} warning or error lines in {}",
        errors.len(),
        log.display()
    );
    assert!(
        errors.len() <= 5,
        "{} warning or error lines (first: {:?}); log: {}",
        errors.len(),
        &errors[..errors.len().min(3)],
        log.display()
    );
}
