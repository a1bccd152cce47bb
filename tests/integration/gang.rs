//! Gang scheduling (`spec.scheduling.gang`) against the PodGroup CRDs of the scheduler-plugins
//! coscheduling and of Volcano, installed from tests/fixtures/ (no gang scheduler runs on the
//! local cluster: the tests play its part, binding pods and writing the group's status). The CRDs
//! are cluster-wide, so the tests that install or need them absent hold one file lock.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Binding, ObjectReference, Pod};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::support::*;
use keelson_api::conditions;
use keelson_api::trainingjob::{JobPhase, TrainingJob};
use keelson_operator::trainingjob::gang::{ANNOTATION_VOLCANO, GANG_SCHEDULED, LABEL_COSCHEDULING};

const COSCHEDULING_CRD: &str = "podgroups.scheduling.x-k8s.io";
const VOLCANO_CRD: &str = "podgroups.scheduling.volcano.sh";

fn crd_installed(name: &str) -> bool {
    kubectl(&["get", "crd", name], None).status.success()
}

/// The lock of the PodGroup CRDs: one gang test at a time installs or removes them.
fn lock() -> std::fs::File {
    let f = std::fs::File::create(root().join("target/cluster/gang-crds.lock")).unwrap();
    f.lock().unwrap();
    f
}

/// A PodGroup CRD from tests/fixtures for the life of the guard; removed afterwards (and waited
/// for) when it was not there before.
struct Crd {
    name: &'static str,
    installed_here: bool,
}

impl Crd {
    fn install(name: &'static str) -> Crd {
        let before = crd_installed(name);
        let yaml =
            std::fs::read_to_string(root().join(format!("tests/fixtures/{name}.yaml"))).unwrap();
        kubectl_ok(
            &[
                "apply",
                "--server-side",
                "--field-manager=keelson-tests",
                "-f",
                "-",
            ],
            Some(&yaml),
        );
        wait_sync(Duration::from_secs(60), || {
            kubectl(
                &[
                    "get",
                    "crd",
                    name,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type=='Established')].status}",
                ],
                None,
            )
            .stdout
                == b"True"
        });
        Crd {
            name,
            installed_here: !before,
        }
    }
}

impl Drop for Crd {
    fn drop(&mut self) {
        if self.installed_here {
            let _ = kubectl(&["delete", "crd", self.name, "--timeout=60s"], None);
        }
    }
}

fn groups(client: &kube::Client, ns: &str, group: &str, version: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk(group, version, "PodGroup");
    Api::namespaced_with(
        client.clone(),
        ns,
        &ApiResource::from_gvk_with_plural(&gvk, "podgroups"),
    )
}

struct Env {
    ns: Ns,
    client: kube::Client,
    jobs: Api<TrainingJob>,
    pods: Api<Pod>,
}

impl Env {
    async fn new(prefix: &str) -> Env {
        operator();
        let ns = Ns::new(prefix);
        let client = client().await;
        Env {
            jobs: Api::namespaced(client.clone(), &ns.name),
            pods: Api::namespaced(client.clone(), &ns.name),
            client,
            ns,
        }
    }

    /// Waits for the job's GangScheduled condition of `reason` (for its current generation).
    async fn gang(&self, name: &str, status: &str, reason: &str) -> TrainingJob {
        wait_for(
            &format!("{name} GangScheduled={status} {reason}"),
            TIMEOUT,
            || async {
                let j = self.jobs.get(name).await.ok()?;
                let st = j.status.as_ref()?;
                let c = conditions::find(&st.conditions, GANG_SCHEDULED)?;
                (st.observed_generation == j.metadata.generation
                    && c.status == status
                    && c.reason == reason)
                    .then_some(j.clone())
            },
        )
        .await
    }

    async fn live_pods(&self, job: &str) -> Vec<Pod> {
        let mut pods: Vec<Pod> = self
            .pods
            .list(
                &kube::api::ListParams::default().labels(&format!("keelson.dev/owner-name={job}")),
            )
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        pods.sort_by_key(|p| p.name_any());
        pods
    }

    /// What the gang scheduler does once it has placed the group: binds each pod to a node.
    async fn bind(&self, pod: &str, node: &str) {
        let b = Binding {
            metadata: kube::api::ObjectMeta {
                name: Some(pod.into()),
                ..Default::default()
            },
            target: ObjectReference {
                kind: Some("Node".into()),
                name: Some(node.into()),
                api_version: Some("v1".into()),
                ..Default::default()
            },
        };
        self.pods
            .create_subresource::<Binding, serde_json::Value>(
                "binding",
                pod,
                &PostParams::default(),
                &b,
            )
            .await
            .unwrap();
    }

    /// What the scheduler writes when it cannot place a pod.
    async fn unschedulable(&self, pod: &str, message: &str) {
        self.pods
            .patch_status(
                pod,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"conditions": [{
                    "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                    "message": message, "lastTransitionTime": "2026-01-01T00:00:00Z"
                }]}})),
            )
            .await
            .unwrap();
    }

    fn show(&self, what: &str, j: &TrainingJob) {
        let lines: Vec<String> = j
            .status
            .iter()
            .flat_map(|s| &s.conditions)
            .filter(|c| matches!(c.type_.as_str(), "GangScheduled" | "Suspended" | "Ready"))
            .map(|c| format!("  {}={} {}: {}", c.type_, c.status, c.reason, c.message))
            .collect();
        eprintln!("[gang] {what}:\n{}", lines.join("\n"));
    }
}

fn gang_job(name: &str, workers: u32, scheduling: &str) -> String {
    format!(
        "apiVersion: keelson.dev/v1alpha1\nkind: TrainingJob\nmetadata: {{name: {name}}}\nspec:\n  image: trainer:1\n  workers: {workers}\n  resources: {{requests: {{cpu: 500m, memory: 1Gi}}}}\n  scheduling: {scheduling}\n"
    )
}

#[tokio::test]
async fn gang_coscheduling_pod_group_comes_first_follows_the_scheduler_and_goes_with_the_job() {
    let _lock = lock();
    let _crd = Crd::install(COSCHEDULING_CRD);
    let e = Env::new("tj-gang-co").await;
    let pgs = groups(&e.client, &e.ns.name, "scheduling.x-k8s.io", "v1alpha1");

    // A scheduler name the default scheduler does not serve: the test places the pods.
    e.ns.apply(&gang_job(
        "co",
        2,
        "{schedulerName: coscheduler, gang: {minAvailable: 2, scheduleTimeoutSeconds: 60}}",
    ))
    .unwrap();
    let job = e.gang("co", "False", "GroupPending").await;
    e.show("co, group written, nothing placed", &job);
    let pg = pgs.get("co").await.unwrap();
    assert_eq!(
        pg.data["spec"],
        json!({"minMember": 2, "scheduleTimeoutSeconds": 60, "minResources": {"cpu": "1", "memory": "2147483648"}})
    );
    let owner = &pg.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
        ("TrainingJob", job.uid().unwrap().as_str(), Some(true))
    );
    let pods = wait_for("both workers", TIMEOUT, || async {
        let p = e.live_pods("co").await;
        (p.len() == 2).then_some(p)
    })
    .await;
    for p in &pods {
        assert_eq!(p.labels()[LABEL_COSCHEDULING], "co", "{}", p.name_any());
        assert_eq!(
            p.spec.as_ref().unwrap().scheduler_name.as_deref(),
            Some("coscheduler")
        );
    }

    // The scheduler cannot place the group: its reason reaches the job.
    let reason =
        "0/4 nodes are available: pod group co waits for 2 members at Permit (test scheduler)";
    e.unschedulable("co-worker-0", reason).await;
    let job = e.gang("co", "False", "Unschedulable").await;
    e.show("co, refused by the scheduler", &job);
    let c = conditions::find(&job.status.as_ref().unwrap().conditions, GANG_SCHEDULED).unwrap();
    assert!(c.message.contains(reason), "{}", c.message);

    // Placed together: bound, the group Scheduled, the job runs.
    pgs.patch_status(
        "co",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Scheduled", "scheduled": 2}})),
    )
    .await
    .unwrap();
    for p in ["co-worker-0", "co-worker-1"] {
        e.bind(p, "kwok-cpu-0").await;
    }
    let job = e.gang("co", "True", "GroupPlaced").await;
    e.show("co, placed", &job);
    wait_for("co Running", TIMEOUT, || async {
        let j = e.jobs.get("co").await.ok()?;
        (j.status?.phase == Some(JobPhase::Running)).then_some(())
    })
    .await;

    // The group is the job's: deleting the job removes it.
    e.jobs.delete("co", &Default::default()).await.unwrap();
    wait_for("the PodGroup garbage-collected", TIMEOUT, || async {
        pgs.get_opt("co").await.ok()?.is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn gang_volcano_waits_for_its_crd_without_pods_then_writes_the_group() {
    let _lock = lock();
    let e = Env::new("tj-gang-vc").await;
    let spec = "{schedulerName: volcano, gang: {minAvailable: 2}}";
    if crd_installed(VOLCANO_CRD) {
        eprintln!(
            "{VOLCANO_CRD} is installed on this cluster: the missing-CRD case is not checked"
        );
    } else {
        e.ns.apply(&gang_job("vc", 2, spec)).unwrap();
        let job = e.gang("vc", "False", "GangSchedulerMissing").await;
        e.show("vc, Volcano not installed", &job);
        let st = job.status.as_ref().unwrap();
        assert_eq!(st.phase, Some(JobPhase::Suspended));
        for t in ["Suspended", "Ready", GANG_SCHEDULED] {
            let c = conditions::find(&st.conditions, t).unwrap();
            assert_eq!(c.reason, "GangSchedulerMissing", "{t}");
            assert!(c.message.contains(VOLCANO_CRD), "{t}: {}", c.message);
        }
        // All or nothing: no pod, and no write while nothing changes.
        let before = e.jobs.get("vc").await.unwrap().resource_version();
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(
            e.live_pods("vc").await.is_empty(),
            "no worker without its group"
        );
        assert_eq!(
            e.jobs.get("vc").await.unwrap().resource_version(),
            before,
            "a job waiting for its gang scheduler is not rewritten"
        );
        let events: serde_json::Value =
            serde_json::from_str(&e.ns.kubectl(&["get", "events.events.k8s.io", "-o", "json"]))
                .unwrap();
        let missing: Vec<&serde_json::Value> = events["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|ev| ev["reason"] == "GangSchedulerMissing")
            .collect();
        assert_eq!(missing.len(), 1, "one Event: {missing:?}");
        assert!(missing[0]["series"].is_null(), "not repeated: {missing:?}");
    }

    let _crd = Crd::install(VOLCANO_CRD);
    if e.jobs.get_opt("vc").await.unwrap().is_some() {
        // The job looks again after 5 minutes by itself; any change wakes it now.
        e.jobs
            .patch(
                "vc",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {"test/poke": "1"}}})),
            )
            .await
            .unwrap();
    } else {
        e.ns.apply(&gang_job("vc", 2, spec)).unwrap();
    }
    let pgs = groups(&e.client, &e.ns.name, "scheduling.volcano.sh", "v1beta1");
    let job = e.gang("vc", "False", "GroupPending").await;
    e.show("vc, group written", &job);
    let pg = pgs.get("vc").await.unwrap();
    assert_eq!(
        pg.data["spec"],
        json!({
            "minMember": 2,
            "minResources": {"cpu": "1", "memory": "2147483648"},
            "queue": "default"
        })
    );
    assert_eq!(
        pg.metadata.owner_references.as_ref().unwrap()[0].uid,
        job.uid().unwrap()
    );
    let pods = wait_for("both workers", TIMEOUT, || async {
        let p = e.live_pods("vc").await;
        (p.len() == 2).then_some(p)
    })
    .await;
    for p in &pods {
        let a: &BTreeMap<String, String> = p.annotations();
        assert_eq!(a[ANNOTATION_VOLCANO], "vc", "{}", p.name_any());
        assert!(!p.labels().contains_key(LABEL_COSCHEDULING));
    }

    // Volcano says the group does not fit: the job says so, with Volcano's message.
    let message =
        "2/2 tasks in gang unschedulable: pod group is not ready, 2 Pending, 2 minAvailable";
    pgs.patch_status(
        "vc",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Pending", "conditions": [{
            "type": "Unschedulable", "status": "True", "reason": "NotEnoughResources",
            "message": message, "transitionID": "t1", "lastTransitionTime": "2026-01-01T00:00:00Z"
        }]}})),
    )
    .await
    .unwrap();
    let job = e.gang("vc", "False", "Unschedulable").await;
    e.show("vc, Volcano cannot place it", &job);
    let c = conditions::find(&job.status.as_ref().unwrap().conditions, GANG_SCHEDULED).unwrap();
    assert!(c.message.contains(message), "{}", c.message);

    // Inqueue with its pods bound: placed.
    pgs.patch_status(
        "vc",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Inqueue", "conditions": null}})),
    )
    .await
    .unwrap();
    for p in ["vc-worker-0", "vc-worker-1"] {
        e.bind(p, "kwok-cpu-1").await;
    }
    let job = e.gang("vc", "True", "GroupPlaced").await;
    e.show("vc, placed", &job);
}

#[tokio::test]
async fn gang_min_available_above_the_workers_is_refused_naming_the_field() {
    operator();
    let ns = Ns::new("tj-gang-cel");
    let jobs: Api<TrainingJob> = Api::namespaced(client().await, &ns.name);
    let job = |workers: u32, scheduling: &str, suspend: bool| {
        format!(
            "apiVersion: keelson.dev/v1alpha1\nkind: TrainingJob\nmetadata: {{name: cel}}\nspec:\n  image: trainer:1\n  workers: {workers}\n  suspend: {suspend}\n  scheduling: {scheduling}\n"
        )
    };
    refused(
        &ns,
        &job(2, "{gang: {minAvailable: 3}}", true),
        &[
            "spec.scheduling.gang.minAvailable",
            "must not exceed spec.workers",
        ],
    );
    refused(
        &ns,
        &job(2, "{gang: {minAvailable: 0}}", true),
        &["spec.scheduling.gang.minAvailable"],
    );
    refused(
        &ns,
        &job(
            2,
            "{gang: {minAvailable: 1, scheduleTimeoutSeconds: 0}}",
            true,
        ),
        &["spec.scheduling.gang.scheduleTimeoutSeconds"],
    );

    // A suspended job with a gang of 2; an edit to a gang larger than the job is refused and
    // changes nothing.
    ns.apply(&job(2, "{gang: {minAvailable: 2}}", true))
        .unwrap();
    let live = jobs.get("cel").await.unwrap();
    refused(
        &ns,
        &job(2, "{gang: {minAvailable: 5}}", true),
        &["spec.scheduling.gang.minAvailable"],
    );
    refused(
        &ns,
        &job(1, "{gang: {minAvailable: 2}}", true),
        &["spec.scheduling.gang.minAvailable"],
    );
    let after = jobs.get("cel").await.unwrap();
    assert_eq!(after.metadata.generation, live.metadata.generation);
    assert_eq!(after.spec, live.spec);

    // Running, the gang is part of scheduling, which is frozen: suspend to change it.
    ns.apply(&job(2, "{}", false)).unwrap();
    refused(
        &ns,
        &job(2, "{gang: {minAvailable: 1}}", false),
        &["spec.scheduling cannot change while the job runs"],
    );
    assert!(jobs
        .get("cel")
        .await
        .unwrap()
        .spec
        .scheduling
        .and_then(|s| s.gang)
        .is_none());
}

/// The scheduler-plugins kube-scheduler that `make cluster` builds (hack/cluster/build.sh).
fn scheduler_plugins_bin() -> std::path::PathBuf {
    root().join("target/cluster/bin/scheduler-plugins")
}

/// A scheduler-plugins kube-scheduler with one profile, `scheduler-plugins-scheduler`, that runs
/// the Coscheduling plugin; stopped when dropped.
struct Coscheduler(std::process::Child);

impl Coscheduler {
    fn start(bin: &std::path::Path) -> Coscheduler {
        let dir = root().join("target/cluster");
        let config = dir.join("scheduler-plugins.yaml");
        std::fs::write(
            &config,
            format!(
                "apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
leaderElection: {{leaderElect: false}}
clientConnection: {{kubeconfig: {}}}
profiles:
  - schedulerName: scheduler-plugins-scheduler
    plugins:
      multiPoint: {{enabled: [{{name: Coscheduling}}]}}
      queueSort: {{enabled: [{{name: Coscheduling}}], disabled: [{{name: '*'}}]}}
    pluginConfig:
      - name: Coscheduling
        args: {{permitWaitingTimeSeconds: 10}}
",
                kubeconfig().display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("logs/scheduler-plugins.log")).unwrap();
        let child = std::process::Command::new(bin)
            .arg(format!("--config={}", config.display()))
            .arg("--secure-port=0")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Coscheduler(child)
    }
}

impl Drop for Coscheduler {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// With the real coscheduling scheduler: a group that fits is placed whole; a group of which only
/// part fits gets no node at all.
#[tokio::test]
async fn gang_with_the_real_coscheduling_scheduler_places_all_or_nothing() {
    let bin = scheduler_plugins_bin();
    assert!(
        bin.exists(),
        "no scheduler-plugins kube-scheduler at {}: `make cluster` builds it",
        bin.display()
    );
    let _lock = lock();
    let _crd = Crd::install(COSCHEDULING_CRD);
    let _scheduler = Coscheduler::start(&bin);
    let e = Env::new("tj-gang-real").await;
    // 17 CPUs a worker: one per CPU node (32 each); the GPU nodes are tainted.
    let job = |name: &str, workers: u32| {
        format!(
            "apiVersion: keelson.dev/v1alpha1\nkind: TrainingJob\nmetadata: {{name: {name}}}\nspec:\n  image: trainer:1\n  workers: {workers}\n  resources: {{requests: {{cpu: \"17\"}}}}\n  scheduling: {{schedulerName: scheduler-plugins-scheduler, gang: {{minAvailable: {workers}, scheduleTimeoutSeconds: 10}}}}\n"
        )
    };
    let bound = |pods: &[Pod]| {
        pods.iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some())
            .count()
    };

    e.ns.apply(&job("two", 2)).unwrap();
    let two = e.gang("two", "True", "GroupPlaced").await;
    e.show("two, placed by the coscheduling scheduler", &two);
    assert_eq!(bound(&e.live_pods("two").await), 2);
    e.jobs.delete("two", &Default::default()).await.unwrap();
    wait_for("two's pods gone", TIMEOUT, || async {
        e.live_pods("two").await.is_empty().then_some(())
    })
    .await;

    // Three workers, two CPU nodes: two would fit one by one, the group does not.
    e.ns.apply(&job("three", 3)).unwrap();
    let three = e.gang("three", "False", "Unschedulable").await;
    tokio::time::sleep(Duration::from_secs(25)).await;
    let pods = e.live_pods("three").await;
    assert_eq!(pods.len(), 3);
    assert_eq!(
        bound(&pods),
        0,
        "no worker of a group that does not fit is bound"
    );
    e.show("three, refused whole by the coscheduling scheduler", &three);
    let now = e.jobs.get("three").await.unwrap();
    let c = conditions::find(&now.status.as_ref().unwrap().conditions, GANG_SCHEDULED).unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "Unschedulable"),
        "{}",
        c.message
    );
}
