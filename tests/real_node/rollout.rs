//! Progressive rollouts on the real node, under a steady load of about 200 requests/s through the
//! entry Service: the operator reads the real router pod's `/metrics` by pod IP.
//!
//! - A healthy canary walks 20 -> 50 -> 100 and is promoted; no request fails on the way.
//! - A canary that answers 30% of its requests with 500 (`FAILURE_RATE=0.3`) is rolled back at its
//!   first step (`ErrorRatioExceeded`, a Warning event), and once the router has its weight 0 no
//!   request fails any more.
//!
//! Each prints the rollout's timeline from status.

use super::*;

use keelson_api::rollout::{RolloutPhase, RolloutStatus};

/// A stable variant alone, or with a canary rolling out to weight 100 (`canary_env` adds to its
/// env, e.g. a failure rate). Both answer after 5 ms, so that their p99s are comparable.
fn rollout_yaml(canary: Option<&str>) -> String {
    let variant = |name: &str, weight: i32, env: &str, rollout: &str| {
        format!(
            r#"  - name: {name}
    image: {MODELSERVER}
    weight: {weight}
    env: [{{name: VARIANT, value: {name}}}, {{name: LATENCY, value: 5ms}}{env}]
{rollout}{placement}    template:
      spec:
        containers: [{{name: model, imagePullPolicy: Never}}]
"#,
            placement = placement(4)
        )
    };
    let variants = match canary {
        None => variant("stable", 100, "", ""),
        Some(env) => format!(
            "{}{}",
            variant("stable", 0, "", ""),
            variant(
                "canary",
                100,
                env,
                "    rollout:\n      steps: [{weight: 20, pauseSeconds: 120}, {weight: 50, pauseSeconds: 120}]\n      analysis: {maxErrorRatio: 0.02, maxLatencyRatio: 3, windowSeconds: 30, minRequests: 200}\n",
            )
        ),
    };
    format!(
        r#"apiVersion: keelson.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: fraud}}
spec:
  variants:
{variants}  traffic:
    router: Builtin
    routerPod:
{}"#,
        placement(6)
    )
}

/// A load of about 200 requests/s (4 callers, each one request per 20 ms), until stopped.
struct Load {
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    tasks: tokio::task::JoinSet<()>,
}

impl Load {
    fn start(http: &Http, url: &str) -> Load {
        let tally = Arc::new(Tally::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let (http, url, tally, stop) =
                (http.clone(), url.to_string(), tally.clone(), stop.clone());
            tasks.spawn(async move {
                while !stop.load(Relaxed) {
                    let next = Instant::now() + Duration::from_millis(20);
                    tally.record(call(&http, Method::GET, &url, &[], "").await, "canary");
                    tokio::time::sleep_until(next.into()).await;
                }
            });
        }
        Load { tally, stop, tasks }
    }

    async fn stop(mut self) -> Arc<Tally> {
        self.stop.store(true, Relaxed);
        while self.tasks.join_next().await.is_some() {}
        self.tally
    }
}

/// The stable variant alone, Ready and answering through the entry Service; its URL.
async fn stable_serving(ns: &Ns, mds: &Api<ModelDeployment>, services: &Api<Service>) -> String {
    ns.apply(&rollout_yaml(None)).unwrap();
    wait(
        ns,
        "fraud Ready with stable=100",
        Duration::from_secs(180),
        || async {
            let st = mds.get("fraud").await.ok()?.status?;
            let ready = condition(&st.conditions, "Ready").is_some_and(|c| c.status == "True");
            (ready && st.traffic.as_deref() == Some("stable=100")).then_some(())
        },
    )
    .await;
    let url = format!("http://{}/predict", service_ip(services, "fraud").await);
    answering(ns, &http(), &url, Duration::from_secs(60)).await;
    url
}

async fn rollout_in(
    ns: &Ns,
    mds: &Api<ModelDeployment>,
    what: &str,
    timeout: Duration,
    phase: RolloutPhase,
) -> RolloutStatus {
    wait(ns, what, timeout, || async {
        let r = mds.get("fraud").await.ok()?.status?.rollout?;
        (r.phase == phase).then_some(r)
    })
    .await
}

fn print_timeline(what: &str, r: &RolloutStatus) {
    eprintln!("{what}: rollout of {} ({})", r.variant, r.revision);
    for h in &r.history {
        eprintln!(
            "  {} step {}/{} weight {:>3} {:?} {}: {}",
            h.since.0, h.step, r.steps, h.weight, h.phase, h.reason, h.message
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_canary_is_promoted_under_load_without_a_failed_request() {
    setup();
    let ns = Ns::new("rn-promote");
    let client = support::client().await;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let url = stable_serving(&ns, &mds, &services).await;

    let load = Load::start(&http(), &url);
    ns.apply(&rollout_yaml(Some(""))).unwrap();
    // Each step is measured by the router (the kubelet brings it a new split within about a
    // minute): 2 steps of at least 2 minutes, then 100.
    let done = rollout_in(
        &ns,
        &mds,
        "the canary Promoted",
        Duration::from_secs(900),
        RolloutPhase::Promoted,
    )
    .await;
    print_timeline("promoted", &done);
    // Each step in order (holds and their ends in between), then the end.
    let mut steps: Vec<(i32, i32)> = done
        .history
        .iter()
        .filter(|h| h.phase != RolloutPhase::Paused)
        .map(|h| (h.step, h.weight))
        .collect();
    steps.dedup();
    assert_eq!(steps, [(1, 20), (2, 50), (2, 100)], "{:#?}", done.history);
    let passed = done
        .history
        .iter()
        .find(|h| h.reason == "StepPassed")
        .unwrap();
    assert!(
        passed.message.contains("within bounds"),
        "{}",
        passed.message
    );
    // The router takes the canary to 100.
    wait(
        &ns,
        "the router to send everything to the canary",
        Duration::from_secs(240),
        || {
            let tally = load.tally.clone();
            async move { tally.recent_share(2_000).filter(|s| *s >= 99.9).map(|_| ()) }
        },
    )
    .await;
    let tally = load.stop().await;
    let total: u64 = tally.by_variant.lock().unwrap().values().sum();
    eprintln!(
        "promotion under load: {total} answers {:?}, {} failures",
        tally.by_variant.lock().unwrap(),
        tally.failures.load(Relaxed)
    );
    assert_eq!(
        tally.failures.load(Relaxed),
        0,
        "requests failed during the promotion: {:?}",
        tally.first_failures.lock().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_is_rolled_back_under_load() {
    setup();
    let ns = Ns::new("rn-rollback");
    let client = support::client().await;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let url = stable_serving(&ns, &mds, &services).await;

    let load = Load::start(&http(), &url);
    ns.apply(&rollout_yaml(Some(
        ", {name: FAILURE_RATE, value: \"0.3\"}",
    )))
    .unwrap();
    let back = rollout_in(
        &ns,
        &mds,
        "the canary RolledBack",
        Duration::from_secs(600),
        RolloutPhase::RolledBack,
    )
    .await;
    print_timeline("rolled back", &back);
    assert_eq!(
        (back.step, back.weight, back.reason.as_str()),
        (1, 0, "ErrorRatioExceeded"),
        "{}",
        back.message
    );
    assert!(back.message.contains("maxErrorRatio"), "{}", back.message);
    let st = mds.get("fraud").await.unwrap().status.unwrap();
    assert_eq!(st.traffic.as_deref(), Some("stable=100,canary=0"));
    let warned = ns.kubectl(&["get", "events", "--field-selector", "type=Warning"]);
    assert!(warned.contains("RolledBack"), "{warned}");

    // Once the router has the canary at 0, nothing fails any more.
    wait(
        &ns,
        "the router to stop sending to the canary",
        Duration::from_secs(240),
        || {
            let tally = load.tally.clone();
            async move { tally.recent_share(2_000).filter(|s| *s == 0.0).map(|_| ()) }
        },
    )
    .await;
    let during = load.stop().await;
    eprintln!(
        "rollback under load: {:?} answered, {} failed (the canary's injected 500s until the rollback reached the router)",
        during.by_variant.lock().unwrap(),
        during.failures.load(Relaxed)
    );
    let after = Load::start(&http(), &url);
    tokio::time::sleep(Duration::from_secs(20)).await;
    let after = after.stop().await;
    assert_eq!(
        after.failures.load(Relaxed),
        0,
        "requests failed after the rollback: {:?}",
        after.first_failures.lock().unwrap()
    );
    assert!(after.share("canary") == 0.0, "{:?}", after.by_variant);
}
