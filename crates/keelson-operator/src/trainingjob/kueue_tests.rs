#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::jiff::Timestamp;
use keelson_api::conditions::Cond;

fn now() -> Time {
    Time(Timestamp::from_second(1_800_000_000).unwrap())
}

fn at(secs: i64) -> Time {
    Time(Timestamp::from_second(secs).unwrap())
}

fn job(spec: Value) -> TrainingJob {
    let mut spec = spec;
    spec["image"] = json!("trainer:1");
    if spec.get("workers").is_none() {
        spec["workers"] = json!(1);
    }
    let mut j: TrainingJob = serde_json::from_value(json!({
        "apiVersion": "keelson.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "bert", "namespace": "team-a", "uid": "u-1", "generation": 1},
        "spec": spec,
    }))
    .unwrap();
    j.metadata.uid = Some("u-1".into());
    j
}

fn owner(j: &TrainingJob) -> Owner {
    Owner::of(j).unwrap()
}

fn gpu_pod(gpus: &str) -> Pod {
    let q = BTreeMap::from([("nvidia.com/gpu".to_string(), Quantity(gpus.into()))]);
    Pod {
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "main".into(),
                image: Some("trainer:1".into()),
                env: Some(vec![]),
                resources: Some(ResourceRequirements {
                    limits: Some(q.clone()),
                    requests: Some(q),
                    ..ResourceRequirements::default()
                }),
                ..Container::default()
            }],
            hostname: Some("bert-worker-0".into()),
            tolerations: Some(vec![Toleration {
                key: Some("nvidia.com/gpu".into()),
                operator: Some("Exists".into()),
                effect: Some("NoSchedule".into()),
                ..Toleration::default()
            }]),
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

fn condition(type_: &str, status: &str, reason: &str, message: &str, t: Time) -> Condition {
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: Some(1),
        last_transition_time: t,
    }
}

fn workload(conds: Vec<Condition>, admitted: bool) -> Workload {
    let mut wl = Workload::new("trainingjob-bert-abcde", WorkloadSpec::default());
    wl.metadata.namespace = Some("team-a".into());
    wl.metadata.resource_version = Some("42".into());
    wl.metadata.generation = Some(1);
    wl.status = Some(WorkloadStatus {
        admission: admitted.then(|| Admission {
            cluster_queue: "gpus".into(),
            pod_set_assignments: vec![PodSetAssignment {
                name: POD_SET.into(),
                flavors: BTreeMap::from([
                    ("nvidia.com/gpu".into(), "a100".into()),
                    ("cpu".into(), "a100".into()),
                ]),
            }],
        }),
        conditions: conds,
        accumulated_past_execution_time_seconds: None,
    });
    wl
}

#[test]
fn the_workload_name_is_stable_and_short_enough() {
    let a = workload_name("bert", "u-1");
    assert_eq!(a, workload_name("bert", "u-1"));
    assert!(
        a.starts_with("trainingjob-bert-") && a.len() == "trainingjob-bert-".len() + 5,
        "{a}"
    );
    assert_ne!(
        a,
        workload_name("bert", "u-2"),
        "a re-created job gets a new Workload"
    );
    assert!(workload_name(&"x".repeat(300), "u").len() <= 253);
}

#[test]
fn the_gate_follows_the_workload() {
    let t = now();
    let missing = gate("team", None);
    assert!(
        matches!(&missing, Gate::Held { reason, .. } if reason == "WorkloadPending"),
        "{missing:?}"
    );

    let no_queue = workload(
        vec![condition(
            "QuotaReserved",
            "False",
            "Inadmissible",
            "LocalQueue team doesn't exist",
            t.clone(),
        )],
        false,
    );
    match gate("team", Some(&no_queue)) {
        Gate::Held { reason, message } => {
            assert_eq!(reason, "Inadmissible");
            assert!(
                message.contains("LocalQueue team doesn't exist"),
                "{message}"
            );
        }
        g => panic!("{g:?}"),
    }

    let admitted = workload(
        vec![
            condition("QuotaReserved", "True", "QuotaReserved", "", t.clone()),
            condition(
                "Admitted",
                "True",
                "Admitted",
                "The workload is admitted",
                t.clone(),
            ),
        ],
        true,
    );
    assert_eq!(
        gate("team", Some(&admitted)),
        Gate::Admitted {
            flavors: vec!["a100".into()]
        }
    );

    let mut evicted = admitted.clone();
    evicted.status.as_mut().unwrap().conditions.push(condition(
        "Evicted",
        "True",
        "Preempted",
        "Preempted to accommodate a workload (UID: x) due to prioritization in the ClusterQueue",
        t.clone(),
    ));
    assert!(
        matches!(gate("team", Some(&evicted)), Gate::Held { reason, .. } if reason == "Preempted")
    );

    let mut finished = admitted.clone();
    finished.status.as_mut().unwrap().conditions.push(condition(
        "Finished",
        "True",
        "Succeeded",
        "done",
        t,
    ));
    assert!(
        matches!(gate("team", Some(&finished)), Gate::Held { reason, .. } if reason == "Succeeded")
    );
}

#[test]
fn an_evicted_workload_loses_its_reservation_once_and_counts_its_time() {
    let admitted_at = at(1_800_000_000 - 90);
    let mut wl = workload(
        vec![
            condition(
                "QuotaReserved",
                "True",
                "QuotaReserved",
                "Quota reserved",
                admitted_at.clone(),
            ),
            condition(
                "Admitted",
                "True",
                "Admitted",
                "The workload is admitted",
                admitted_at.clone(),
            ),
            condition(
                "Evicted",
                "True",
                "Preempted",
                "preempted by a higher priority",
                now(),
            ),
        ],
        true,
    );
    let patch = clear_reservation(&wl, &now()).unwrap();
    assert_eq!(patch["metadata"]["resourceVersion"], "42");
    assert!(patch["status"]["admission"].is_null());
    assert_eq!(patch["status"]["accumulatedPastExecutionTimeSeconds"], 90);
    let conds: Vec<Condition> =
        serde_json::from_value(patch["status"]["conditions"].clone()).unwrap();
    let get = |t: &str| conds.iter().find(|c| c.type_ == t).unwrap().clone();
    let qr = get("QuotaReserved");
    assert_eq!(
        (qr.status.as_str(), qr.reason.as_str()),
        ("False", "Pending")
    );
    assert_eq!(qr.message, "preempted by a higher priority");
    assert_eq!(qr.last_transition_time, now());
    assert_eq!(get("Admitted").reason, "NoReservation");
    let rq = get("Requeued");
    assert_eq!(
        (rq.status.as_str(), rq.reason.as_str()),
        ("True", "Preempted")
    );
    assert_eq!(
        get("Evicted").status,
        "True",
        "Kueue's own condition is kept"
    );

    // Cleared (or never reserved), or not evicted: nothing to write.
    wl.status.as_mut().unwrap().admission = None;
    assert!(clear_reservation(&wl, &now()).is_none());
    let running = workload(
        vec![condition("Admitted", "True", "Admitted", "", now())],
        true,
    );
    assert!(clear_reservation(&running, &now()).is_none());
}

#[test]
fn a_finished_job_finishes_its_workload_once() {
    let wl = workload(
        vec![condition("Admitted", "True", "Admitted", "", now())],
        true,
    );
    let patch = finish(&wl, "Succeeded", "all 2 workers exited 0", &now()).unwrap();
    let conds: Vec<Condition> =
        serde_json::from_value(patch["status"]["conditions"].clone()).unwrap();
    let f = conds.iter().find(|c| c.type_ == "Finished").unwrap();
    assert_eq!(
        (f.status.as_str(), f.reason.as_str(), f.message.as_str()),
        ("True", "Succeeded", "all 2 workers exited 0")
    );
    assert_eq!(conds.len(), 2);
    let mut done = wl.clone();
    done.status.as_mut().unwrap().conditions = conds;
    assert!(finish(&done, "Succeeded", "", &now()).is_none());
}

#[test]
fn the_workload_has_one_pod_set_with_the_workers_requests() {
    let j = job(json!({"workers": 3, "scheduling": {"queue": "team"}}));
    let wl = desired(&j, &owner(&j), "team", &gpu_pod("8"), None);
    assert_eq!(
        wl.metadata.name.as_deref(),
        Some(workload_name("bert", "u-1").as_str())
    );
    assert_eq!(wl.spec.queue_name.as_deref(), Some("team"));
    assert_eq!(wl.spec.active, None);
    let ps = &wl.spec.pod_sets[0];
    assert_eq!((ps.name.as_str(), ps.count), (POD_SET, 3));
    let spec = ps.template.spec.as_ref().unwrap();
    let c = &spec.containers[0];
    assert_eq!(c.name, "main");
    assert_eq!(
        c.image, None,
        "only what Kueue counts: a new image is not a new pod set"
    );
    assert_eq!(
        c.resources.as_ref().unwrap().requests.as_ref().unwrap()["nvidia.com/gpu"],
        Quantity("8".into())
    );
    assert_eq!(spec.tolerations.as_ref().unwrap().len(), 1);
    assert_eq!(spec.hostname, None);
    let refs = wl.metadata.owner_references.as_ref().unwrap();
    assert_eq!(
        (refs[0].kind.as_str(), refs[0].controller),
        ("TrainingJob", Some(true))
    );
    let labels = wl.metadata.labels.as_ref().unwrap();
    assert_eq!(labels[LABEL_JOB_UID], "u-1");
    assert_eq!(labels["keelson.dev/owner-name"], "bert");

    let suspended = job(json!({"workers": 3, "suspend": true, "scheduling": {"queue": "team"}}));
    let wl2 = desired(&suspended, &owner(&suspended), "team", &gpu_pod("8"), None);
    assert_eq!(
        wl2.spec.active,
        Some(false),
        "a job its user suspended holds no quota"
    );
    assert!(!pod_sets_differ(&wl2, &wl));
    let bigger = desired(&j, &owner(&j), "team", &gpu_pod("4"), None);
    assert!(pod_sets_differ(&bigger, &wl));
}

#[test]
fn the_priority_class_comes_from_the_label_then_the_pods() {
    let mut j = job(json!({"scheduling": {"queue": "team", "priorityClassName": "high"}}));
    let pc = wanted_priority(&j).unwrap();
    assert_eq!(
        (pc.group.as_str(), pc.kind.as_str(), pc.name.as_str()),
        ("scheduling.k8s.io", "PriorityClass", "high")
    );
    j.labels_mut()
        .insert(LABEL_PRIORITY_CLASS.into(), "urgent".into());
    let wpc = wanted_priority(&j).unwrap();
    assert_eq!(
        (wpc.group.as_str(), wpc.kind.as_str(), wpc.name.as_str()),
        (GROUP, "WorkloadPriorityClass", "urgent")
    );
    let wl = desired(&j, &owner(&j), "team", &gpu_pod("1"), Some((wpc, 1000)));
    assert_eq!(wl.spec.priority, Some(1000));
    assert_eq!(
        wanted_priority(&job(json!({"scheduling": {"queue": "team"}}))),
        None
    );
}

#[test]
fn admitted_pods_get_the_flavors_placement() {
    let flavor = Flavor {
        name: "a100".into(),
        node_labels: BTreeMap::from([("keelson.dev/sim-pool".into(), "gpu".into())]),
        tolerations: vec![Toleration {
            key: Some("team".into()),
            operator: Some("Exists".into()),
            ..Toleration::default()
        }],
    };
    let mut pod = gpu_pod("8");
    place(&mut pod, std::slice::from_ref(&flavor)).unwrap();
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(
        spec.node_selector.as_ref().unwrap()["keelson.dev/sim-pool"],
        "gpu"
    );
    assert_eq!(spec.tolerations.as_ref().unwrap().len(), 2);
    assert_eq!(pod.labels()[LABEL_PODSET], POD_SET);
    // Placing twice adds nothing.
    place(&mut pod, std::slice::from_ref(&flavor)).unwrap();
    assert_eq!(
        pod.spec
            .as_ref()
            .unwrap()
            .tolerations
            .as_ref()
            .unwrap()
            .len(),
        2
    );

    let mut other = gpu_pod("8");
    other.spec.as_mut().unwrap().node_selector = Some(BTreeMap::from([(
        "keelson.dev/sim-pool".into(),
        "cpu".into(),
    )]));
    let err = place(&mut other, &[flavor]).unwrap_err();
    assert!(
        err.contains("keelson.dev/sim-pool=gpu") && err.contains("a100"),
        "{err}"
    );
}

#[test]
fn a_held_job_says_why_in_kueues_words() {
    let mut st = TrainingJobStatus {
        phase: Some(JobPhase::Suspended),
        conditions: conditions::merge(
            &[],
            &[
                Cond::new(SUSPENDED, true, "JobSuspended", "spec.suspend is true"),
                Cond::new(
                    conditions::READY,
                    false,
                    "Suspended",
                    "spec.suspend is true",
                ),
                Cond::new("Running", false, "JobSuspended", "the job is suspended"),
            ],
            Some(1),
            &now(),
        ),
        ..TrainingJobStatus::default()
    };
    held_status(
        &mut st,
        "Pending",
        "couldn't assign flavors to pod set workers: insufficient quota",
    );
    let s = conditions::find(&st.conditions, SUSPENDED).unwrap();
    assert_eq!((s.status.as_str(), s.reason.as_str()), ("True", "Pending"));
    assert!(
        s.message.starts_with("couldn't assign flavors"),
        "{}",
        s.message
    );
    assert_eq!(
        conditions::find(&st.conditions, "Ready").unwrap().reason,
        "Pending"
    );
    assert_eq!(
        conditions::find(&st.conditions, "Running").unwrap().reason,
        "JobSuspended"
    );

    let mut running = TrainingJobStatus {
        phase: Some(JobPhase::Running),
        ..st.clone()
    };
    let before = running.clone();
    held_status(&mut running, "Pending", "x");
    assert_eq!(running, before);
    assert_eq!(as_suspended(&job(json!({}))).spec.suspend, Some(true));
}

#[test]
fn only_pods_still_running_keep_an_evicted_workload_reserved() {
    let mut gone = gpu_pod("1");
    gone.status = Some(k8s_openapi::api::core::v1::PodStatus {
        phase: Some("Succeeded".into()),
        ..Default::default()
    });
    let mut leaving = gpu_pod("1");
    leaving.metadata.deletion_timestamp = Some(now());
    assert_eq!(active_pods(&[Arc::new(gone), Arc::new(leaving)]), 0);
    assert_eq!(active_pods(&[Arc::new(gpu_pod("1"))]), 1);
}

fn worker(phase: &str, ready: bool) -> Arc<Pod> {
    Arc::new(Pod {
        status: Some(k8s_openapi::api::core::v1::PodStatus {
            phase: Some(phase.into()),
            conditions: Some(vec![k8s_openapi::api::core::v1::PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Pod::default()
    })
}

#[test]
fn pods_ready_counts_ready_and_succeeded_workers() {
    assert!(all_pods_ready(
        &[worker("Running", true), worker("Succeeded", false)],
        2
    ));
    assert!(!all_pods_ready(
        &[worker("Running", true), worker("Running", false)],
        2
    ));
    assert!(!all_pods_ready(&[worker("Running", true)], 2));
    assert!(!all_pods_ready(&[worker("Pending", true)], 1));
    assert!(!all_pods_ready(&[], 0));
}

#[test]
fn the_pods_ready_condition_follows_kueues_jobframework() {
    let admitted = || {
        condition(
            "Admitted",
            "True",
            "Admitted",
            "admitted",
            at(1_799_999_000),
        )
    };
    let have =
        |status: &str, reason: &str| condition("PodsReady", status, reason, "m", at(1_799_999_500));
    let read = |patch: Option<Value>| -> Option<(String, String, String)> {
        let conds: Vec<Condition> =
            serde_json::from_value(patch?["status"]["conditions"].clone()).unwrap();
        let c = conds.iter().find(|c| c.type_ == "PodsReady").unwrap();
        Some((c.status.clone(), c.reason.clone(), c.message.clone()))
    };
    let not_ready = "Not all pods are ready or succeeded";
    type Case<'a> = (
        &'a str,
        Vec<Condition>,
        bool,
        Option<(&'a str, &'a str, &'a str)>,
    );
    let cases: Vec<Case> = vec![
        ("never admitted: nothing to say", vec![], false, None),
        (
            "admitted, pods starting",
            vec![admitted()],
            false,
            Some(("False", "WaitForStart", not_ready)),
        ),
        (
            "admitted, every pod ready",
            vec![admitted(), have("False", "WaitForStart")],
            true,
            Some((
                "True",
                "Started",
                "All pods reached readiness and the workload is running",
            )),
        ),
        (
            "a pod lost after the start",
            vec![admitted(), have("True", "Started")],
            false,
            Some((
                "False",
                "WaitForRecovery",
                "At least one pod has failed, waiting for recovery",
            )),
        ),
        (
            "recovered",
            vec![admitted(), have("False", "WaitForRecovery")],
            true,
            Some((
                "True",
                "Recovered",
                "All pods reached readiness and the workload is running",
            )),
        ),
        (
            "evicted: admission gone",
            vec![
                condition("Admitted", "False", "NoReservation", "", now()),
                have("True", "Started"),
            ],
            false,
            Some(("False", "WaitForStart", not_ready)),
        ),
    ];
    for (what, conds, ready, want) in cases {
        let wl = workload(conds, true);
        let got = read(pods_ready(&wl, ready, &now()));
        let want = want.map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()));
        assert_eq!(got, want, "{what}");
    }
    // Already so: no write.
    let wl = workload(
        vec![
            admitted(),
            condition("PodsReady", "False", "WaitForStart", not_ready, now()),
        ],
        true,
    );
    assert_eq!(pods_ready(&wl, false, &now()), None);
    let patch = pods_ready(&workload(vec![admitted()], true), false, &now()).unwrap();
    assert_eq!(patch["metadata"]["resourceVersion"], "42");
}
