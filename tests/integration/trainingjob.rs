//! TrainingJobs on the local cluster: GPU placement, env, phases, restarts, deadlines, clean-up,
//! TTL, suspend/resume, scale-down and the printer columns seen by the real kubectl.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};

use crate::support::*;
use keelson_api::conditions;
use keelson_api::trainingjob::{JobPhase, TrainingJob};

pub(crate) struct Job {
    pub(crate) ns: Ns,
    pub(crate) api: Api<TrainingJob>,
    pub(crate) pods: Api<Pod>,
    client: kube::Client,
}

impl Job {
    pub(crate) async fn new(prefix: &str) -> Job {
        operator();
        let ns = Ns::new(prefix);
        let client = client().await;
        Job {
            api: Api::namespaced(client.clone(), &ns.name),
            pods: Api::namespaced(client.clone(), &ns.name),
            ns,
            client,
        }
    }

    pub(crate) async fn phase(&self, name: &str, phase: JobPhase) -> TrainingJob {
        wait_for(&format!("{name} {phase:?}"), TIMEOUT, || async {
            let j = self.api.get(name).await.ok()?;
            let st = j.status.as_ref()?;
            (st.phase == Some(phase) && st.observed_generation == j.metadata.generation)
                .then_some(j.clone())
        })
        .await
    }

    pub(crate) async fn pods_of(&self, name: &str) -> BTreeMap<String, Pod> {
        let lp = ListParams::default().labels(&format!(
            "keelson.dev/owner-name={name},keelson.dev/owner-kind=TrainingJob"
        ));
        self.pods
            .list(&lp)
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|p| (p.metadata.name.clone().unwrap(), p))
            .collect()
    }

    pub(crate) async fn running_pods(&self, name: &str, n: usize) -> BTreeMap<String, Pod> {
        wait_for(&format!("{n} running pods of {name}"), TIMEOUT, || async {
            let pods = self.pods_of(name).await;
            let live: BTreeMap<_, _> = pods
                .into_iter()
                .filter(|(_, p)| {
                    p.metadata.deletion_timestamp.is_none()
                        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                })
                .collect();
            (live.len() == n).then_some(live)
        })
        .await
    }

    pub(crate) fn yaml(&self, name: &str, extra: &str) -> String {
        format!("apiVersion: keelson.dev/v1alpha1\nkind: TrainingJob\nmetadata: {{name: {name}}}\nspec:\n  image: trainer:1\n{extra}")
    }

    pub(crate) async fn merge(&self, name: &str, spec: serde_json::Value) {
        self.api
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": spec})),
            )
            .await
            .unwrap();
    }

    fn reason(job: &TrainingJob, cond: &str) -> String {
        conditions::find(&job.status.as_ref().unwrap().conditions, cond)
            .map(|c| c.reason.clone())
            .unwrap_or_default()
    }
}

fn env(pod: &Pod) -> BTreeMap<String, String> {
    pod.spec.as_ref().unwrap().containers[0]
        .env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect()
}

#[tokio::test]
async fn pytorch_job_on_gpus_runs_and_succeeds() {
    let j = Job::new("tj-torch").await;
    j.ns.pv_for("shared-datasets", "100Gi");
    j.ns.apply(&example("trainingjob-pytorch.yaml")).unwrap();
    let job = j.phase("resnet50", JobPhase::Running).await;
    assert!(conditions::is_true(
        &job.status.as_ref().unwrap().conditions,
        "Ready"
    ));
    let pods = j.running_pods("resnet50", 4).await;
    let ns = &j.ns.name;
    for rank in 0..4 {
        let name = format!("resnet50-worker-{rank}");
        let pod = &pods[&name];
        let spec = pod.spec.as_ref().unwrap();
        let node: Node = Api::all(j.client.clone())
            .get(spec.node_name.as_deref().unwrap())
            .await
            .unwrap();
        assert_eq!(
            node.labels()
                .get("nvidia.com/gpu.present")
                .map(String::as_str),
            Some("true"),
            "{name} on {:?}, not a GPU node",
            node.metadata.name
        );
        assert_eq!(spec.hostname.as_deref(), Some(name.as_str()));
        assert_eq!(spec.subdomain.as_deref(), Some("resnet50"));
        let c = &spec.containers[0];
        let res = c.resources.as_ref().unwrap();
        assert_eq!(res.limits.as_ref().unwrap()["nvidia.com/gpu"].0, "2");
        assert_eq!(res.requests.as_ref().unwrap()["nvidia.com/gpu"].0, "2");
        let e = env(pod);
        assert_eq!(e["WORLD_SIZE"], "4");
        assert_eq!(e["RANK"], rank.to_string());
        assert_eq!(e["PET_NNODES"], "4");
        assert_eq!(e["PET_NODE_RANK"], rank.to_string());
        assert_eq!(e["PET_NPROC_PER_NODE"], "2");
        assert_eq!(
            e["MASTER_ADDR"],
            format!("resnet50-worker-0.resnet50.{ns}.svc")
        );
        assert_eq!(e["MASTER_PORT"], "29500");
        assert_eq!(e["LR"], "0.01");
        let m = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == "datasets")
            .unwrap();
        assert_eq!((m.mount_path.as_str(), m.read_only), ("/data", Some(true)));
        let v = spec
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "datasets")
            .unwrap();
        assert_eq!(
            v.persistent_volume_claim.as_ref().unwrap().claim_name,
            "shared-datasets"
        );
        assert_eq!(
            pod.metadata.labels.as_ref().unwrap()["keelson.dev/rank"],
            rank.to_string()
        );
        let r = &pod.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((r.kind.as_str(), r.controller), ("TrainingJob", Some(true)));
    }

    // The printer columns, as the real kubectl prints them.
    let table = j.ns.kubectl(&["get", "trainingjobs"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "STATE", "WORKERS", "GPUS", "RESTARTS", "AGE"],
        "{table}"
    );
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        &row[..5],
        ["resnet50", "Running", "4/4", "8", "0"],
        "{table}"
    );

    // An edit of a field a running job may change (runPolicy) does not re-create running pods,
    // and the status catches up with the generation.
    let uids: Vec<_> = pods.values().map(|p| p.metadata.uid.clone()).collect();
    j.merge(
        "resnet50",
        serde_json::json!({"runPolicy": {"backoffLimit": 5}}),
    )
    .await;
    j.phase("resnet50", JobPhase::Running).await;
    let after: Vec<_> = j
        .pods_of("resnet50")
        .await
        .values()
        .map(|p| p.metadata.uid.clone())
        .collect();
    assert_eq!(uids, after);

    for rank in 0..4 {
        exit_pod(ns, &format!("resnet50-worker-{rank}"), 0);
    }
    let done = j.phase("resnet50", JobPhase::Succeeded).await;
    let st = done.status.as_ref().unwrap();
    assert!(st.completion_time.is_some() && st.start_time.is_some());
    assert!(conditions::is_true(&st.conditions, "Succeeded"));
    let table = j.ns.kubectl(&["get", "tj", "resnet50", "--no-headers"]);
    assert!(table.contains("Succeeded"), "{table}");
}

#[tokio::test]
async fn exit_code_policy_retries_signals_and_fails_fast_on_errors() {
    let j = Job::new("tj-exit").await;
    let ns = j.ns.name.clone();
    j.ns.apply(&j.yaml("retry", "  framework: TensorFlow\n  workers: 2\n  runPolicy: {restartPolicy: ExitCode, backoffLimit: 1}\n")).unwrap();
    let pods = j.running_pods("retry", 2).await;
    // TF_CONFIG names every worker and this task.
    let tf: serde_json::Value =
        serde_json::from_str(&env(&pods["retry-worker-1"])["TF_CONFIG"]).unwrap();
    assert_eq!(
        tf["cluster"]["worker"][0],
        format!("retry-worker-0.retry.{ns}.svc:2222")
    );
    assert_eq!(tf["task"]["type"], "worker");
    assert_eq!(tf["task"]["index"], 1);

    // 137 (a signal) is retried: the pod is re-created and one restart is counted.
    let uid = pods["retry-worker-1"].metadata.uid.clone();
    exit_pod(&ns, "retry-worker-1", 137);
    wait_for("worker-1 re-created", TIMEOUT, || async {
        let p = j.pods_of("retry").await.remove("retry-worker-1")?;
        (p.metadata.uid != uid && p.status.as_ref()?.phase.as_deref() == Some("Running"))
            .then_some(())
    })
    .await;
    let job = wait_for("restarts = 1", TIMEOUT, || async {
        let job = j.api.get("retry").await.ok()?;
        (job.status.as_ref()?.restarts == 1).then_some(job)
    })
    .await;
    assert_eq!(job.status.unwrap().restarts, 1);
    // A second retryable failure exceeds backoffLimit 1.
    exit_pod(&ns, "retry-worker-1", 137);
    let failed = j.phase("retry", JobPhase::Failed).await;
    assert_eq!(Job::reason(&failed, "Failed"), "BackoffLimitExceeded");
    // cleanPodPolicy Running (default): the worker still running is deleted.
    wait_for("running worker cleaned", TIMEOUT, || async {
        let p = j.pods_of("retry").await;
        (!p.contains_key("retry-worker-0")
            || p["retry-worker-0"].metadata.deletion_timestamp.is_some())
        .then_some(())
    })
    .await;

    // Exit 1 fails fast under ExitCode, whatever the backoff limit; cleanPodPolicy None keeps the other pod.
    j.ns.apply(&j.yaml("fast", "  workers: 2\n  runPolicy: {restartPolicy: ExitCode, backoffLimit: 5, cleanPodPolicy: None}\n")).unwrap();
    j.running_pods("fast", 2).await;
    exit_pod(&ns, "fast-worker-0", 1);
    let failed = j.phase("fast", JobPhase::Failed).await;
    assert_eq!(Job::reason(&failed, "Failed"), "ExitCode");
    assert_eq!(failed.status.as_ref().unwrap().restarts, 0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let left = j.pods_of("fast").await;
    assert!(
        left["fast-worker-1"].metadata.deletion_timestamp.is_none(),
        "cleanPodPolicy None keeps pods"
    );

    // Never: the first failure fails the job, and a finished job is never restarted.
    j.ns.apply(&j.yaml(
        "never",
        "  workers: 1\n  runPolicy: {restartPolicy: Never}\n",
    ))
    .unwrap();
    j.running_pods("never", 1).await;
    exit_pod(&ns, "never-worker-0", 137);
    j.phase("never", JobPhase::Failed).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pods = j.pods_of("never").await;
    assert!(
        pods.values()
            .all(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Running")),
        "a finished job got a new pod"
    );
}

#[tokio::test]
async fn deadline_ttl_and_rank_zero_success() {
    let j = Job::new("tj-time").await;
    let ns = j.ns.name.clone();
    j.ns.apply(&j.yaml(
        "slow",
        "  workers: 2\n  runPolicy: {activeDeadlineSeconds: 3, cleanPodPolicy: All}\n",
    ))
    .unwrap();
    let failed = wait_for("slow DeadlineExceeded", Duration::from_secs(60), || async {
        let job = j.api.get("slow").await.ok()?;
        (job.status.as_ref()?.phase == Some(JobPhase::Failed)).then_some(job)
    })
    .await;
    assert_eq!(Job::reason(&failed, "Failed"), "DeadlineExceeded");
    wait_for("all pods cleaned", TIMEOUT, || async {
        j.pods_of("slow")
            .await
            .values()
            .all(|p| p.metadata.deletion_timestamp.is_some())
            .then_some(())
    })
    .await;

    // RankZero: rank 0 succeeding is enough; TTL then deletes the job itself.
    j.ns.apply(&j.yaml("r0", "  framework: JAX\n  workers: 3\n  successPolicy: RankZero\n  runPolicy: {ttlSecondsAfterFinished: 2}\n")).unwrap();
    let pods = j.running_pods("r0", 3).await;
    let e = env(&pods["r0-worker-2"]);
    assert_eq!(
        e["JAX_COORDINATOR_ADDRESS"],
        format!("r0-worker-0.r0.{ns}.svc:1234")
    );
    assert_eq!(
        (
            e["JAX_NUM_PROCESSES"].as_str(),
            e["JAX_PROCESS_ID"].as_str()
        ),
        ("3", "2")
    );
    exit_pod(&ns, "r0-worker-0", 0);
    j.phase("r0", JobPhase::Succeeded).await;
    wait_for("r0 deleted by its TTL", Duration::from_secs(60), || async {
        j.api.get_opt("r0").await.ok()?.is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn queued_job_suspends_resumes_and_scales_down() {
    let j = Job::new("tj-queue").await;
    // The example's LocalQueue, backed by the real Kueue (tests/integration/kueue.rs).
    let _queue = crate::kueue::Queue::new(&j.ns, "team-a", 8);
    j.ns.apply(&example("trainingjob-queued.yaml")).unwrap();
    let job = j.phase("bert-queued", JobPhase::Suspended).await;
    assert!(
        j.pods_of("bert-queued").await.is_empty(),
        "a suspended job has no pods"
    );
    let labels = wait_for("queue label", TIMEOUT, || async {
        let job = j.api.get("bert-queued").await.ok()?;
        job.metadata
            .labels
            .clone()
            .filter(|l| l.contains_key("kueue.x-k8s.io/queue-name"))
    })
    .await;
    assert_eq!(labels["kueue.x-k8s.io/queue-name"], "team-a");
    assert!(!conditions::is_true(
        &job.status.as_ref().unwrap().conditions,
        "Ready"
    ));

    // Admitted: pods start, carrying the queue label.
    j.merge("bert-queued", serde_json::json!({"suspend": false}))
        .await;
    let pods = j.running_pods("bert-queued", 2).await;
    assert_eq!(
        pods["bert-queued-worker-0"]
            .metadata
            .labels
            .as_ref()
            .unwrap()["kueue.x-k8s.io/queue-name"],
        "team-a"
    );
    j.phase("bert-queued", JobPhase::Running).await;

    // Preempted: pods go, the job stays resumable.
    j.merge("bert-queued", serde_json::json!({"suspend": true}))
        .await;
    let job = j.phase("bert-queued", JobPhase::Suspended).await;
    let st = job.status.as_ref().unwrap();
    assert!(
        st.start_time.is_none(),
        "a suspended job has no startTime, so its deadline counts from the next admission"
    );
    assert_eq!(st.restarts, 0, "a preemption is not a restart");
    assert_eq!(
        job.metadata.labels.as_ref().unwrap()["kueue.x-k8s.io/queue-name"],
        "team-a"
    );
    wait_for("pods deleted", TIMEOUT, || async {
        j.pods_of("bert-queued").await.is_empty().then_some(())
    })
    .await;
    j.merge("bert-queued", serde_json::json!({"suspend": false}))
        .await;
    j.running_pods("bert-queued", 2).await;
    j.phase("bert-queued", JobPhase::Running).await;

    // Fewer workers. A running job refuses the edit (its ranks share one WORLD_SIZE), naming the
    // field and what to do, and the live object is unchanged.
    j.ns.apply(&j.yaml("shrink", "  workers: 4\n")).unwrap();
    j.running_pods("shrink", 4).await;
    let before = j.api.get("shrink").await.unwrap();
    let refused = j
        .api
        .patch(
            "shrink",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"workers": 2}})),
        )
        .await
        .expect_err("a workers edit of a running job is refused");
    let msg = refused.to_string();
    assert!(
        msg.contains("spec.workers") && msg.contains("suspend the job"),
        "{msg}"
    );
    let after = j.api.get("shrink").await.unwrap();
    assert_eq!(after.spec, before.spec);
    assert_eq!(after.metadata.generation, before.metadata.generation);
    let refused =
        j.ns.apply(&j.yaml("shrink", "  workers: 4\n  image: trainer:2\n"));
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("spec.image")),
        "{refused:?}"
    );

    // Suspended, the same edit is taken, and the resumed job has only pods of the new shape.
    j.merge("shrink", serde_json::json!({"suspend": true, "workers": 2}))
        .await;
    wait_for("the suspended job's pods gone", TIMEOUT, || async {
        j.pods_of("shrink").await.is_empty().then_some(())
    })
    .await;
    j.merge("shrink", serde_json::json!({"suspend": false}))
        .await;
    let left = j.running_pods("shrink", 2).await;
    assert!(left.contains_key("shrink-worker-0") && left.contains_key("shrink-worker-1"));
    for (name, p) in &j.pods_of("shrink").await {
        let env = p.spec.as_ref().unwrap().containers[0]
            .env
            .clone()
            .unwrap_or_default();
        let world = env.iter().find(|e| e.name == "WORLD_SIZE");
        assert_eq!(world.and_then(|e| e.value.as_deref()), Some("2"), "{name}");
    }
    let job = j.phase("shrink", JobPhase::Running).await;
    assert_eq!(job.status.unwrap().workers_ready.as_deref(), Some("2/2"));
}
