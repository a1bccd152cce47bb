//! TrainingJobs admitted by the real Kueue of the local cluster (hack/cluster/kueue.sh,
//! docs/kueue.md): one ClusterQueue of 8 GPUs per test, selecting only that test's namespace.
//! Quota, queueing behind a running job, the admitted flavor's placement, preemption by a higher
//! WorkloadPriorityClass without a restart, the Finished Workload, and the conditions of a queue
//! that does not exist and of a job that can never fit.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};

use crate::support::*;
use keelson_api::conditions;
use keelson_api::trainingjob::{JobPhase, TrainingJob};
use keelson_operator::trainingjob::kueue::{self as kq, Workload};

/// Cluster-scoped Kueue objects of one test: a ResourceFlavor, a ClusterQueue of `gpus` GPUs and
/// two WorkloadPriorityClasses (`<tag>-low` = 100, `<tag>-high` = 1000), deleted on drop.
pub struct Queue {
    pub tag: String,
}

/// The toleration the test flavor adds to the pods it admits.
const FLAVOR_TAINT: &str = "keelson.dev/kueue-test";

impl Queue {
    /// A ClusterQueue of `gpus` GPUs for namespace `ns`, and its LocalQueue `local` there.
    pub fn new(ns: &Ns, local: &str, gpus: u32) -> Queue {
        let tag = ns.name.clone();
        kubectl_ok(
            &["apply", "--server-side", "-f", "-"],
            Some(&format!(
                r#"apiVersion: kueue.x-k8s.io/v1beta2
kind: ResourceFlavor
metadata: {{name: {tag}}}
spec:
  nodeLabels: {{keelson.dev/sim-pool: gpu}}
  tolerations: [{{key: {FLAVOR_TAINT}, operator: Exists, effect: NoSchedule}}]
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: ClusterQueue
metadata: {{name: {tag}}}
spec:
  namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {ns}}}}}
  preemption: {{withinClusterQueue: LowerPriority}}
  resourceGroups:
  - coveredResources: [cpu, memory, nvidia.com/gpu]
    flavors:
    - name: {tag}
      resources:
      - {{name: cpu, nominalQuota: "1000"}}
      - {{name: memory, nominalQuota: 4Ti}}
      - {{name: nvidia.com/gpu, nominalQuota: {gpus}}}
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: WorkloadPriorityClass
metadata: {{name: {tag}-low}}
value: 100
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: WorkloadPriorityClass
metadata: {{name: {tag}-high}}
value: 1000
"#,
                ns = ns.name
            )),
        );
        ns.apply(&format!(
            "apiVersion: kueue.x-k8s.io/v1beta2\nkind: LocalQueue\nmetadata: {{name: {local}}}\nspec: {{clusterQueue: {tag}}}\n"
        ))
        .unwrap();
        Queue { tag }
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        let t = &self.tag;
        let _ = kubectl(
            &[
                "delete",
                "--wait=false",
                "--ignore-not-found",
                &format!("clusterqueues.kueue.x-k8s.io/{t}"),
                &format!("resourceflavors.kueue.x-k8s.io/{t}"),
                &format!("workloadpriorityclasses.kueue.x-k8s.io/{t}-low"),
                &format!("workloadpriorityclasses.kueue.x-k8s.io/{t}-high"),
            ],
            None,
        );
    }
}

struct Env {
    ns: Ns,
    jobs: Api<TrainingJob>,
    pods: Api<Pod>,
    workloads: Api<Workload>,
}

impl Env {
    async fn new(prefix: &str) -> Env {
        operator();
        let ns = Ns::new(prefix);
        let c = client().await;
        Env {
            jobs: Api::namespaced(c.clone(), &ns.name),
            pods: Api::namespaced(c.clone(), &ns.name),
            workloads: Api::namespaced(c, &ns.name),
            ns,
        }
    }

    /// A job of `workers` workers with 8 GPUs each in LocalQueue `queue`, with an optional label
    /// (`key: value`).
    fn job(&self, name: &str, workers: u32, queue: &str, label: &str, extra: &str) {
        let labels = if label.is_empty() {
            String::new()
        } else {
            format!(", labels: {{{label}}}")
        };
        self.ns
            .apply(&format!(
                "apiVersion: keelson.dev/v1alpha1\nkind: TrainingJob\nmetadata: {{name: {name}{labels}}}\nspec:\n  image: trainer:1\n  workers: {workers}\n  gpus: {{count: 8}}\n  scheduling: {{queue: {queue}{extra}}}\n"
            ))
            .unwrap();
    }

    /// Waits for the job in `phase` (for its current generation) with `cond` True of `reason`.
    async fn until(&self, name: &str, phase: JobPhase, cond: &str, reason: &str) -> TrainingJob {
        wait_for(
            &format!("{name} {phase:?} ({cond} {reason})"),
            TIMEOUT,
            || async {
                let j = self.jobs.get(name).await.ok()?;
                let st = j.status.as_ref()?;
                let c = conditions::find(&st.conditions, cond)?;
                (st.phase == Some(phase)
                    && st.observed_generation == j.metadata.generation
                    && c.status == "True"
                    && c.reason == reason)
                    .then_some(j.clone())
            },
        )
        .await
    }

    async fn workload(&self, job: &TrainingJob) -> Workload {
        let name = kq::workload_name(&job.name_any(), &job.uid().unwrap());
        self.workloads.get(&name).await.unwrap()
    }

    async fn live_pods(&self, job: &str) -> Vec<Pod> {
        self.pods
            .list(
                &kube::api::ListParams::default().labels(&format!("keelson.dev/owner-name={job}")),
            )
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect()
    }
}

fn cond<'a>(conds: &'a [Condition], type_: &str) -> &'a Condition {
    conditions::find(conds, type_).unwrap_or_else(|| panic!("no {type_} in {conds:?}"))
}

/// What the test log records of a job's conditions: type=status/reason: message.
fn show(what: &str, conds: &[Condition]) {
    let lines: Vec<String> = conds
        .iter()
        .map(|c| format!("  {}={} {}: {}", c.type_, c.status, c.reason, c.message))
        .collect();
    eprintln!("[kueue] {what}:\n{}", lines.join("\n"));
}

#[tokio::test]
async fn kueue_admits_one_8_gpu_job_queues_the_next_and_preempts_for_higher_priority() {
    let e = Env::new("tj-kueue").await;
    let q = Queue::new(&e.ns, "team", 8);
    let (low, high) = (
        format!("kueue.x-k8s.io/priority-class: {}-low", q.tag),
        format!("kueue.x-k8s.io/priority-class: {}-high", q.tag),
    );

    // First job: admitted, runs on the flavor's nodes with its toleration.
    e.job("first", 1, "team", &low, "");
    let first = e
        .until("first", JobPhase::Running, "Running", "WorkersRunning")
        .await;
    let wl = e.workload(&first).await;
    show("first, running", &wl.status.as_ref().unwrap().conditions);
    assert_eq!(
        cond(&wl.status.as_ref().unwrap().conditions, "Admitted").status,
        "True"
    );
    assert_eq!(wl.spec.priority, Some(100));
    let owner = &wl.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("TrainingJob", "first", Some(true))
    );
    let ps = &wl.spec.pod_sets[0];
    assert_eq!((ps.name.as_str(), ps.count), ("workers", 1));
    let requests = ps.template.spec.as_ref().unwrap().containers[0]
        .resources
        .as_ref()
        .unwrap()
        .requests
        .clone()
        .unwrap();
    assert_eq!(requests["nvidia.com/gpu"].0, "8");
    let pod = &e.live_pods("first").await[0];
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(
        spec.node_selector.as_ref().unwrap()["keelson.dev/sim-pool"],
        "gpu"
    );
    assert!(spec
        .tolerations
        .iter()
        .flatten()
        .any(|t| t.key.as_deref() == Some(FLAVOR_TAINT)));
    assert_eq!(pod.labels()[kq::LABEL_PODSET], "workers");

    // Second job: no quota left. Suspended with Kueue's reason, and no pod.
    e.job("second", 1, "team", &low, "");
    let second = e
        .until("second", JobPhase::Suspended, "Suspended", "Pending")
        .await;
    let st = second.status.as_ref().unwrap();
    show("second, queued behind first", &st.conditions);
    let msg = &cond(&st.conditions, "Suspended").message;
    assert!(
        msg.contains("insufficient unused quota") && msg.contains("nvidia.com/gpu"),
        "{msg}"
    );
    assert_eq!(cond(&st.conditions, "Ready").reason, "Pending");
    assert!(e.live_pods("second").await.is_empty());

    // The first ends: its Workload is Finished, and the second is admitted and runs.
    exit_pod(&e.ns.name, "first-worker-0", 0);
    let first = e
        .until(
            "first",
            JobPhase::Succeeded,
            "Succeeded",
            "AllWorkersSucceeded",
        )
        .await;
    wait_for("first's Workload Finished", TIMEOUT, || async {
        let wl = e.workload(&first).await;
        let c = conditions::find(&wl.status.as_ref()?.conditions, "Finished")?;
        (c.status == "True" && c.reason == "Succeeded").then_some(())
    })
    .await;
    show(
        "first, finished",
        &e.workload(&first).await.status.unwrap().conditions,
    );
    let second = e
        .until("second", JobPhase::Running, "Running", "WorkersRunning")
        .await;
    assert_eq!(second.status.as_ref().unwrap().restarts, 0);

    // A higher-priority job preempts the second: it suspends without a restart, its quota is
    // released, and the new job runs.
    e.job("urgent", 1, "team", &high, "");
    let second = e
        .until("second", JobPhase::Suspended, "Suspended", "Preempted")
        .await;
    let st = second.status.as_ref().unwrap();
    show("second, preempted", &st.conditions);
    assert_eq!(st.restarts, 0, "a preemption is not a restart");
    let wl = wait_for("second's reservation released", TIMEOUT, || async {
        let wl = e.workload(&second).await;
        (!kq::has_reservation(&wl)).then_some(wl)
    })
    .await;
    let wconds = &wl.status.as_ref().unwrap().conditions;
    show("second's Workload, preempted", wconds);
    assert_eq!(cond(wconds, "Evicted").reason, "Preempted");
    assert_eq!(
        (
            cond(wconds, "QuotaReserved").status.as_str(),
            cond(wconds, "Requeued").status.as_str()
        ),
        ("False", "True")
    );
    e.until("urgent", JobPhase::Running, "Running", "WorkersRunning")
        .await;
    wait_for("second's pods gone", TIMEOUT, || async {
        e.live_pods("second").await.is_empty().then_some(())
    })
    .await;

    // The urgent job ends; the preempted one is admitted again and resumes, still without a restart.
    exit_pod(&e.ns.name, "urgent-worker-0", 0);
    let second = e
        .until("second", JobPhase::Running, "Running", "WorkersRunning")
        .await;
    show(
        "second, resumed",
        &second.status.as_ref().unwrap().conditions,
    );
    assert_eq!(second.status.as_ref().unwrap().restarts, 0);
    drop(q);
}

#[tokio::test]
async fn a_missing_queue_or_a_job_that_never_fits_is_a_condition_not_a_loop() {
    let e = Env::new("tj-kueue-bad").await;
    let q = Queue::new(&e.ns, "team", 8);
    kubectl_ok(
        &["apply", "--server-side", "-f", "-"],
        Some(&format!(
            "apiVersion: scheduling.k8s.io/v1\nkind: PriorityClass\nmetadata: {{name: {}}}\nvalue: 50\n",
            q.tag
        )),
    );

    // A LocalQueue that does not exist.
    e.job("lost", 1, "nowhere", "", "");
    let lost = e
        .until("lost", JobPhase::Suspended, "Suspended", "Inadmissible")
        .await;
    let st = lost.status.as_ref().unwrap();
    show("lost, queue missing", &st.conditions);
    assert!(cond(&st.conditions, "Suspended")
        .message
        .contains("LocalQueue nowhere doesn't exist"));

    // 16 GPUs in a queue of 8: never fits. The pods' PriorityClass gives the Workload's priority.
    e.job(
        "huge",
        2,
        "team",
        "",
        &format!(", priorityClassName: {}", q.tag),
    );
    let huge = e
        .until("huge", JobPhase::Suspended, "Suspended", "Pending")
        .await;
    let st = huge.status.as_ref().unwrap();
    show("huge, never fits", &st.conditions);
    assert!(cond(&st.conditions, "Suspended")
        .message
        .contains("nvidia.com/gpu"));
    assert_eq!(e.workload(&huge).await.spec.priority, Some(50));

    // Held jobs stay quiet: no status write while nothing changes.
    let before = (
        e.jobs.get("lost").await.unwrap().resource_version(),
        e.jobs.get("huge").await.unwrap().resource_version(),
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = (
        e.jobs.get("lost").await.unwrap().resource_version(),
        e.jobs.get("huge").await.unwrap().resource_version(),
    );
    assert_eq!(before, after, "a held job is not rewritten");

    // Out of its queue (an edit made while suspended, as every scheduling edit), the job loses its
    // Workload, and once resumed runs without Kueue.
    let wl_name = kq::workload_name("lost", &lost.uid().unwrap());
    let edit = |suspend: bool| {
        serde_json::json!({
            "apiVersion": "keelson.dev/v1alpha1",
            "kind": "TrainingJob",
            "metadata": {"name": "lost"},
            "spec": {"image": "trainer:1", "workers": 1, "gpus": {"count": 8}, "suspend": suspend},
        })
    };
    let pp = PatchParams::apply("test-user").force();
    e.jobs
        .patch("lost", &pp, &Patch::Apply(edit(true)))
        .await
        .unwrap();
    wait_for("lost's Workload deleted", TIMEOUT, || async {
        e.workloads
            .get_opt(&wl_name)
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    e.jobs
        .patch("lost", &pp, &Patch::Apply(edit(false)))
        .await
        .unwrap();
    e.until("lost", JobPhase::Running, "Running", "WorkersRunning")
        .await;
    let _ = kubectl(
        &["delete", "priorityclass", &q.tag, "--ignore-not-found"],
        None,
    );
    drop(q);
}

/// The `waitForPodsReady.timeout` of the cluster's Kueue (target/cluster/kueue/config.yaml), when on.
fn pods_ready_timeout() -> Option<Duration> {
    let text = std::fs::read_to_string(root().join("target/cluster/kueue/config.yaml")).ok()?;
    let v: serde_json::Value = serde_yaml::from_str(&text).ok()?;
    let t = v["waitForPodsReady"]["timeout"].as_str()?;
    t.strip_suffix('s')?.parse().ok().map(Duration::from_secs)
}

#[tokio::test]
async fn kueue_evicts_a_job_whose_pods_never_get_ready_and_sees_a_healthy_one_ready() {
    let Some(timeout) = pods_ready_timeout() else {
        eprintln!("the cluster's Kueue runs without waitForPodsReady: not checked");
        return;
    };
    let e = Env::new("tj-kueue-ready").await;
    let q = Queue::new(&e.ns, "team", 8);

    // A healthy job: once its worker is ready, its Workload says PodsReady=True, as Kueue's own
    // integrations do.
    e.job("healthy", 1, "team", "", "");
    let healthy = e
        .until("healthy", JobPhase::Running, "Running", "WorkersRunning")
        .await;
    let wl = wait_for("healthy's Workload PodsReady", TIMEOUT, || async {
        let wl = e.workload(&healthy).await;
        let c = conditions::find(&wl.status.as_ref()?.conditions, "PodsReady")?;
        (c.status == "True").then_some(wl)
    })
    .await;
    let wconds = &wl.status.as_ref().unwrap().conditions;
    show("healthy's Workload", wconds);
    let c = cond(wconds, "PodsReady");
    assert_eq!(
        (c.reason.as_str(), c.message.as_str()),
        (
            "Started",
            "All pods reached readiness and the workload is running"
        )
    );
    exit_pod(&e.ns.name, "healthy-worker-0", 0);
    e.until(
        "healthy",
        JobPhase::Succeeded,
        "Succeeded",
        "AllWorkersSucceeded",
    )
    .await;

    // A job whose worker is never scheduled (no scheduler serves its name): admitted, never
    // ready, evicted by Kueue after the timeout. The job is Suspended with Kueue's reason, its
    // pod deleted, no restart counted.
    e.job("stuck", 1, "team", "", ", schedulerName: nobody");
    let stuck = wait_for("stuck admitted, its pod created", TIMEOUT, || async {
        let j = e.jobs.get("stuck").await.ok()?;
        (!e.live_pods("stuck").await.is_empty()).then_some(j)
    })
    .await;
    let wl = e.workload(&stuck).await;
    let c = cond(&wl.status.as_ref().unwrap().conditions, "PodsReady");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "WaitForStart")
    );
    let stuck = wait_for(
        "stuck Suspended (PodsReadyTimeout)",
        timeout + TIMEOUT,
        || async {
            let j = e.jobs.get("stuck").await.ok()?;
            let st = j.status.as_ref()?;
            let c = conditions::find(&st.conditions, "Suspended")?;
            (st.phase == Some(JobPhase::Suspended) && c.reason == "PodsReadyTimeout")
                .then_some(j.clone())
        },
    )
    .await;
    let st = stuck.status.as_ref().unwrap();
    show("stuck, evicted", &st.conditions);
    assert_eq!(st.restarts, 0, "an eviction is not a restart");
    let msg = &cond(&st.conditions, "Suspended").message;
    assert!(msg.contains("PodsReady"), "{msg}");
    let wl = e.workload(&stuck).await;
    let wconds = &wl.status.as_ref().unwrap().conditions;
    show("stuck's Workload, evicted", wconds);
    assert_eq!(cond(wconds, "Evicted").reason, "PodsReadyTimeout");
    wait_for("stuck's pod gone", TIMEOUT, || async {
        e.live_pods("stuck").await.is_empty().then_some(())
    })
    .await;
    eprintln!("[kueue] waitForPodsReady timeout {timeout:?}");
    drop(q);
}
