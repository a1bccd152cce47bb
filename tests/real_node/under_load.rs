//! Serving changes under a steady load on the real node: about 200 requests/s through the entry
//! Service's ClusterIP (kube-proxy, the router pod, the variant Services, the model pods) while the
//! ModelDeployment `fraud` is changed five ways, one after another:
//!
//! 1. a weight edit (90/10 -> 50/50);
//! 2. the champion's image replaced (a new tag: its Deployment rolls, `maxUnavailable: 0` and the
//!    `preStop` pause);
//! 3. the champion scaled by its HorizontalPodAutoscaler, 1 -> 3 -> 1 (the HPA controller of
//!    kube-controller-manager moves `replicas` to the bounds it is given);
//! 4. a new revision of the challenger promoted by a progressive rollout to 100;
//! 5. a new revision of the champion, answering 30% of its requests with an injected 500
//!    (`FAILURE_RATE=0.3`), rolled back by the analysis of the router's own measurements.
//!
//! Each change runs under its own window of load (at least 60 s). A failure is a transport error or a
//! non-2xx answer that the model server did not choose to give: none is allowed in any window. The
//! stand-in's injected 500s (its body says so) are counted apart: they are what the rollback is for,
//! and once the router has the rolled-back revision at weight 0 none reaches a client any more.
//! The results are printed as a table, with the two rollouts' timelines from status.

use super::*;

use keelson_api::rollout::{RolloutPhase, RolloutStatus};

/// The image the champion is replaced with: the model server's image under a second tag, as a
/// registry push of a new version would give (tagged in the node's containerd by the test).
const MODELSERVER_V2: &str = "keelson.dev/modelserver:v2";

/// Each change is measured over at least this much load.
const WINDOW: Duration = Duration::from_secs(60);

/// A rollout of one step that the analysis judges over 20 s windows of at least 100 answers.
const ROLLOUT: &str = "    rollout:\n      steps: [{weight: 20, pauseSeconds: 60}]\n      analysis: {maxErrorRatio: 0.02, maxLatencyRatio: 5, windowSeconds: 20, minRequests: 100}\n";

/// What the two variants look like at one point of the test.
struct Spec<'a> {
    champion: i32,
    challenger: i32,
    champion_image: &'a str,
    /// `{minReplicas, maxReplicas}` of the champion's autoscaler.
    hpa: (i32, i32),
    /// Extra env of the champion / challenger (`, {name: .., value: ..}`), which makes a revision.
    champion_env: &'a str,
    challenger_env: &'a str,
    /// Which variant carries [`ROLLOUT`], if any.
    rollout_on: Option<&'a str>,
}

impl Default for Spec<'_> {
    fn default() -> Self {
        Spec {
            champion: 90,
            challenger: 10,
            champion_image: MODELSERVER,
            hpa: (1, 3),
            champion_env: "",
            challenger_env: "",
            rollout_on: None,
        }
    }
}

impl Spec<'_> {
    fn yaml(&self) -> String {
        let variant = |name: &str, weight: i32, image: &str, env: &str, extra: &str| {
            let rollout = if self.rollout_on == Some(name) {
                ROLLOUT
            } else {
                ""
            };
            format!(
                r#"  - name: {name}
    image: {image}
    weight: {weight}
    env: [{{name: VARIANT, value: {name}}}, {{name: LATENCY, value: 5ms}}{env}]
    resources: {{requests: {{cpu: 10m, memory: 32Mi}}}}
{extra}{rollout}{placement}    template:
      spec:
        containers: [{{name: model, imagePullPolicy: Never}}]
"#,
                placement = placement(4)
            )
        };
        let (min, max) = self.hpa;
        format!(
            r#"apiVersion: keelson.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: fraud}}
spec:
  variants:
{}{}  traffic:
    router: Builtin
    routerPod:
{}"#,
            variant(
                "champion",
                self.champion,
                self.champion_image,
                self.champion_env,
                &format!("    autoscaling: {{minReplicas: {min}, maxReplicas: {max}}}\n"),
            ),
            variant(
                "challenger",
                self.challenger,
                MODELSERVER,
                self.challenger_env,
                ""
            ),
            placement(6)
        )
    }
}

/// A load of about 200 requests/s (4 callers, each one request per 20 ms), until stopped; the
/// share of `challenger` among the latest answers is what the waits read.
pub(super) struct Load {
    pub(super) tally: Arc<Tally>,
    started: Instant,
    stop: Arc<AtomicBool>,
    tasks: tokio::task::JoinSet<()>,
}

impl Load {
    pub(super) fn start(http: &Http, url: &str, challenger: &'static str) -> Load {
        let tally = Arc::new(Tally::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let (http, url, tally, stop) =
                (http.clone(), url.to_string(), tally.clone(), stop.clone());
            tasks.spawn(async move {
                while !stop.load(Relaxed) {
                    let t = Instant::now();
                    let next = t + Duration::from_millis(20);
                    let r = call(&http, Method::GET, &url, &[], "").await;
                    tally.latency(t.elapsed());
                    tally.record(r, challenger);
                    tokio::time::sleep_until(next.into()).await;
                }
            });
        }
        Load {
            tally,
            started: Instant::now(),
            stop,
            tasks,
        }
    }

    /// Runs on until the window is at least [`WINDOW`] long, then stops.
    async fn finish(mut self) -> (Arc<Tally>, Duration) {
        let left = WINDOW.saturating_sub(self.started.elapsed());
        tokio::time::sleep(left).await;
        self.stop.store(true, Relaxed);
        while self.tasks.join_next().await.is_some() {}
        (self.tally, self.started.elapsed())
    }

    /// Waits until the challenger's share of the last 2,000 answers satisfies `ok`.
    async fn share_until(&self, ns: &Ns, what: &str, ok: impl Fn(f64) -> bool) {
        wait(ns, what, Duration::from_secs(300), || {
            let hit = self.tally.recent_share(2_000).filter(|s| ok(*s));
            async move { hit.map(|_| ()) }
        })
        .await;
    }
}

/// One row of the table.
struct Row {
    change: &'static str,
    took: Duration,
    tally: Arc<Tally>,
    outcome: String,
}

fn print_table(rows: &[Row]) {
    eprintln!(
        "\n| change | window | requests | answered 2xx | injected 500 | failed | p99 |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    for r in rows {
        let t = &r.tally;
        let ok: u64 = t.by_variant.lock().unwrap().values().sum();
        let injected = t.injected.load(Relaxed);
        let failed = t.failures.load(Relaxed);
        eprintln!(
            "| {} ({}) | {:.0} s | {} | {ok} | {injected} | {failed} | {:.1} ms |",
            r.change,
            r.outcome,
            r.took.as_secs_f64(),
            ok + injected + failed,
            t.p99().as_secs_f64() * 1e3,
        );
    }
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

async fn rollout_in(
    ns: &Ns,
    mds: &Api<ModelDeployment>,
    what: &str,
    phase: RolloutPhase,
) -> RolloutStatus {
    wait(ns, what, Duration::from_secs(600), || async {
        let r = mds.get("fraud").await.ok()?.status?.rollout?;
        (r.phase == phase).then_some(r)
    })
    .await
}

/// The Deployment has rolled out its current template to `replicas` ready pods, and no older pod
/// is left, terminating ones included.
async fn rolled_out(ns: &Ns, deploys: &Api<Deployment>, pods: &Api<Pod>, name: &str, want: i32) {
    wait(
        ns,
        &format!("deploy/{name} rolled out with {want} ready pods and no other"),
        Duration::from_secs(300),
        || async {
            let d = deploys.get(name).await.ok()?;
            let st = d.status.as_ref()?;
            let settled = st.observed_generation == d.metadata.generation
                && st.replicas == Some(want)
                && st.updated_replicas == Some(want)
                && st.ready_replicas == Some(want);
            let selector = format!("keelson.dev/owner-name=fraud,keelson.dev/variant={}", {
                name.trim_start_matches("fraud-")
            });
            let n = pods
                .list(&ListParams::default().labels(&selector))
                .await
                .ok()?
                .items
                .len();
            (settled && n == want as usize).then_some(())
        },
    )
    .await;
}

fn no_failure(r: &Row) {
    assert_eq!(
        r.tally.failures.load(Relaxed),
        0,
        "{}: requests failed: {:?}",
        r.change,
        r.tally.first_failures.lock().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_changes_under_a_steady_load_fail_no_request() {
    let t0 = Instant::now();
    setup();
    let tag = Command::new("ctr")
        .args([
            "--address",
            support::REAL_NODE_CONTAINERD_SOCK,
            "-n",
            "k8s.io",
            "images",
            "tag",
            "--force",
            MODELSERVER,
            MODELSERVER_V2,
        ])
        .output()
        .unwrap();
    assert!(
        tag.status.success(),
        "ctr images tag: {}",
        String::from_utf8_lossy(&tag.stderr)
    );
    let ns = Ns::new("rn-load");
    let client = support::client().await;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let traffic_is = |traffic: &'static str| {
        let mds = mds.clone();
        move || {
            let mds = mds.clone();
            async move {
                let st = mds.get("fraud").await.ok()?.status?;
                let ready = condition(&st.conditions, "Ready").is_some_and(|c| c.status == "True");
                (ready && st.traffic.as_deref() == Some(traffic)).then_some(())
            }
        }
    };

    let mut spec = Spec::default();
    ns.apply(&spec.yaml()).unwrap();
    wait(
        &ns,
        "fraud Ready with champion=90,challenger=10",
        Duration::from_secs(180),
        traffic_is("champion=90,challenger=10"),
    )
    .await;
    let http = http();
    let url = format!("http://{}/predict", service_ip(&services, "fraud").await);
    answering(&ns, &http, &url, Duration::from_secs(60)).await;
    // The router routes to the challenger once the kubelet brought it the split that gives the
    // challenger its weight (it was 0 while the challenger had no ready pod).
    let warm = Load::start(&http, &url, "challenger");
    warm.share_until(&ns, "the router to split 90/10", |s| {
        (s - 10.0).abs() <= 3.0
    })
    .await;
    warm.finish().await;
    let mut rows = Vec::new();

    // 1. A weight edit.
    let load = Load::start(&http, &url, "challenger");
    (spec.champion, spec.challenger) = (50, 50);
    ns.apply(&spec.yaml()).unwrap();
    load.share_until(&ns, "the router to split 50/50", |s| {
        (s - 50.0).abs() <= 3.0
    })
    .await;
    let (tally, took) = load.finish().await;
    rows.push(Row {
        change: "weight edit 90/10 -> 50/50",
        took,
        tally,
        outcome: "split 50/50".into(),
    });
    no_failure(&rows[0]);

    // 2. The champion's image replaced.
    let load = Load::start(&http, &url, "challenger");
    spec.champion_image = MODELSERVER_V2;
    ns.apply(&spec.yaml()).unwrap();
    rolled_out(&ns, &deploys, &pods, "fraud-champion", 1).await;
    let (tally, took) = load.finish().await;
    let images: BTreeSet<String> = pods
        .list(&ListParams::default().labels("keelson.dev/variant=champion"))
        .await
        .unwrap()
        .items
        .iter()
        .filter_map(|p| p.spec.as_ref()?.containers.first()?.image.clone())
        .collect();
    assert_eq!(
        images.into_iter().collect::<Vec<_>>(),
        [MODELSERVER_V2],
        "champion pods after the image change"
    );
    rows.push(Row {
        change: "champion image replaced",
        took,
        tally,
        outcome: "pod replaced".into(),
    });
    no_failure(&rows[1]);

    // 3. The champion scaled by its HorizontalPodAutoscaler, up to 3 and back to 1.
    let load = Load::start(&http, &url, "challenger");
    spec.hpa = (3, 3);
    ns.apply(&spec.yaml()).unwrap();
    rolled_out(&ns, &deploys, &pods, "fraud-champion", 3).await;
    spec.hpa = (1, 1);
    ns.apply(&spec.yaml()).unwrap();
    rolled_out(&ns, &deploys, &pods, "fraud-champion", 1).await;
    let (tally, took) = load.finish().await;
    let managers: Vec<String> = deploys
        .get("fraud-champion")
        .await
        .unwrap()
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.to_string().contains("f:replicas"))
        })
        .filter_map(|m| m.manager)
        .collect();
    assert!(
        managers.iter().all(|m| !m.starts_with("keelson")),
        "with autoscaling the operator owns no replicas: {managers:?}"
    );
    rows.push(Row {
        change: "champion scaled by its HPA 1 -> 3 -> 1",
        took,
        tally,
        outcome: "3 then 1 ready".into(),
    });
    no_failure(&rows[2]);

    // 4. A new revision of the challenger promoted to 100.
    let load = Load::start(&http, &url, "challenger");
    (spec.champion, spec.challenger) = (0, 100);
    spec.challenger_env = ", {name: MODEL_VERSION, value: \"2\"}";
    spec.rollout_on = Some("challenger");
    ns.apply(&spec.yaml()).unwrap();
    let promoted = rollout_in(&ns, &mds, "the challenger Promoted", RolloutPhase::Promoted).await;
    let mut steps: Vec<(i32, i32)> = promoted
        .history
        .iter()
        .filter(|h| h.phase != RolloutPhase::Paused)
        .map(|h| (h.step, h.weight))
        .collect();
    steps.dedup();
    assert_eq!(steps, [(1, 20), (1, 100)], "{:#?}", promoted.history);
    load.share_until(
        &ns,
        "the router to send everything to the challenger",
        |s| s >= 99.9,
    )
    .await;
    let (tally, took) = load.finish().await;
    rows.push(Row {
        change: "challenger revision promoted 20 -> 100",
        took,
        tally,
        outcome: format!("{:?} {}", promoted.phase, promoted.reason),
    });
    no_failure(&rows[3]);

    // 5. A failing revision of the champion rolled back.
    let load = Load::start(&http, &url, "challenger");
    (spec.champion, spec.challenger) = (100, 0);
    spec.champion_env = ", {name: FAILURE_RATE, value: \"0.3\"}";
    spec.rollout_on = Some("champion");
    ns.apply(&spec.yaml()).unwrap();
    let back = rollout_in(
        &ns,
        &mds,
        "the champion RolledBack",
        RolloutPhase::RolledBack,
    )
    .await;
    assert_eq!(
        (back.step, back.weight, back.reason.as_str()),
        (1, 0, "ErrorRatioExceeded"),
        "{}",
        back.message
    );
    assert!(back.message.contains("maxErrorRatio"), "{}", back.message);
    wait(
        &ns,
        "traffic champion=0,challenger=100",
        Duration::from_secs(60),
        traffic_is("champion=0,challenger=100"),
    )
    .await;
    let warned = ns.kubectl(&["get", "events", "--field-selector", "type=Warning"]);
    assert!(warned.contains("RolledBack"), "{warned}");
    load.share_until(&ns, "the router to stop sending to the champion", |s| {
        s >= 99.9
    })
    .await;
    let (tally, took) = load.finish().await;
    rows.push(Row {
        change: "champion revision with 30% injected 500s rolled back",
        took,
        tally,
        outcome: format!("{:?} {}", back.phase, back.reason),
    });
    no_failure(&rows[4]);
    // The rolled-back revision reaches no client any more.
    let after = Load::start(&http, &url, "challenger");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (after, took) = after.finish().await;
    rows.push(Row {
        change: "after the rollback",
        took,
        tally: after,
        outcome: "challenger=100".into(),
    });

    print_timeline("promoted", &promoted);
    print_timeline("rolled back", &back);
    print_table(&rows);
    let after = &rows[5].tally;
    assert_eq!(
        (after.failures.load(Relaxed), after.injected.load(Relaxed)),
        (0, 0),
        "after the rollback: {:?}",
        after.first_failures.lock().unwrap()
    );
    assert!(
        rows[4].tally.injected.load(Relaxed) > 0,
        "no injected 500 was seen: the rollback judged nothing"
    );
    eprintln!(
        "serving_changes_under_a_steady_load_fail_no_request: {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}
