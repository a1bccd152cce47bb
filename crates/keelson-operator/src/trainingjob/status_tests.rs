//! Tests of the TrainingJob lifecycle policy and status, with hand-made pods in every phase.

use super::*;
use crate::podstatus::fixtures::*;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::jiff::Timestamp;
use keelson_api::trainingjob::TrainingJobSpec;
use keelson_api::trainingjob::{CleanPodPolicy, RestartPolicy, RunPolicy, SuccessPolicy};
use keelson_api::workload::{GpuSpec, WorkloadSpec};
use std::sync::Arc;
use std::time::Duration;

const T0: i64 = 1_700_000_000;

fn at(secs: i64) -> Time {
    Time(Timestamp::from_second(secs).unwrap())
}

fn now() -> Time {
    at(T0)
}

fn tj(edit: impl FnOnce(&mut TrainingJobSpec)) -> TrainingJob {
    let mut spec = TrainingJobSpec {
        workers: 3,
        workload: WorkloadSpec {
            image: "trainer:1".into(),
            ..WorkloadSpec::default()
        },
        ..TrainingJobSpec::default()
    };
    edit(&mut spec);
    let mut j = TrainingJob::new("resnet", spec);
    j.metadata.namespace = Some("team-a".into());
    j.metadata.uid = Some("uid-tj".into());
    j.metadata.generation = Some(2);
    j
}

fn policy(edit: impl FnOnce(&mut RunPolicy)) -> impl FnOnce(&mut TrainingJobSpec) {
    move |s| {
        let mut rp = RunPolicy::default();
        edit(&mut rp);
        s.run_policy = Some(rp);
    }
}

/// Makes a fixture pod a child of the test job.
fn own(mut p: Pod) -> Pod {
    p.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "keelson.dev/v1alpha1".into(),
        kind: "TrainingJob".into(),
        name: "resnet".into(),
        uid: "uid-tj".into(),
        controller: Some(true),
        ..OwnerReference::default()
    }]);
    p
}

fn w(rank: i32) -> String {
    format!("resnet-worker-{rank}")
}

fn obs(pods: Vec<Pod>) -> Observed {
    Observed {
        pods: pods.into_iter().map(|p| Arc::new(own(p))).collect(),
        deleted: HashSet::new(),
    }
}

fn all_running() -> Vec<Pod> {
    (0..3).map(|r| running(&w(r), true)).collect()
}

fn was(phase: JobPhase) -> TrainingJobStatus {
    TrainingJobStatus {
        phase: Some(phase),
        start_time: Some(at(T0 - 100)),
        ..TrainingJobStatus::default()
    }
}

fn deleted(d: &Decision, reason: DeleteReason) -> Vec<String> {
    d.delete
        .iter()
        .filter(|x| x.reason == reason)
        .map(|x| x.pod.name_any())
        .collect()
}

fn cond<'a>(
    s: &'a TrainingJobStatus,
    t: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    conditions::find(&s.conditions, t).unwrap()
}

/// Decide, then the status that follows.
fn step(
    job: &TrainingJob,
    prev: &TrainingJobStatus,
    o: &Observed,
    t: &Time,
) -> (Decision, TrainingJobStatus) {
    let d = decide(job, prev, o, t);
    let s = status(job, prev, o, &d, t);
    (d, s)
}

/// What one row of the decision table expects: the phase, Ready's status and reason, and (empty
/// or 0 unless set) the ranks created, the pods deleted to restart, the pods cleaned up and the
/// restart count.
struct Expect {
    phase: JobPhase,
    ready: (bool, &'static str),
    create: Vec<i32>,
    restart: Vec<String>,
    cleanup: Vec<String>,
    restarts: i32,
}

fn expect(phase: JobPhase, ready: bool, reason: &'static str) -> Expect {
    Expect {
        phase,
        ready: (ready, reason),
        create: vec![],
        restart: vec![],
        cleanup: vec![],
        restarts: 0,
    }
}

impl Expect {
    fn create(self, create: Vec<i32>) -> Self {
        Self { create, ..self }
    }
    fn restart(self, restart: Vec<String>) -> Self {
        Self { restart, ..self }
    }
    fn cleanup(self, cleanup: Vec<String>) -> Self {
        Self { cleanup, ..self }
    }
    fn restarts(self, restarts: i32) -> Self {
        Self { restarts, ..self }
    }
}

#[test]
fn decision_table() {
    struct Case {
        name: &'static str,
        job: TrainingJob,
        prev: TrainingJobStatus,
        pods: Vec<Pod>,
        expect: Expect,
    }
    let mut failed1 = all_running();
    failed1[1] = finished(&w(1), 1);
    let mut oom = all_running();
    oom[2] = finished(&w(2), 137);
    let mut evict = all_running();
    evict[0] = evicted(&w(0));
    let mut two_failed = all_running();
    two_failed[0] = finished(&w(0), 1);
    two_failed[2] = finished(&w(2), 1);
    let mut pull = all_running();
    pull[2] = waiting(&w(2), "ImagePullBackOff");
    let mut unsched = vec![pending(&w(0)), pending(&w(1))];
    unsched.push(unschedulable(&w(2)));
    let mut some_done = all_running();
    some_done[0] = finished(&w(0), 0);
    some_done[1] = finished(&w(1), 0);
    let restarts = |n| TrainingJobStatus {
        restarts: n,
        ..was(JobPhase::Running)
    };

    let cases = vec![
        Case {
            name: "new job: every rank is created",
            job: tj(|_| {}),
            prev: TrainingJobStatus::default(),
            pods: vec![],
            expect: expect(JobPhase::Pending, false, "PodsCreating").create(vec![0, 1, 2]),
        },
        Case {
            name: "some ranks exist: only the missing are created",
            job: tj(|_| {}),
            prev: was(JobPhase::Pending),
            pods: vec![pending(&w(0)), pending(&w(2))],
            expect: expect(JobPhase::Pending, false, "PodsCreating").create(vec![1]),
        },
        Case {
            name: "unschedulable worker",
            job: tj(|_| {}),
            prev: was(JobPhase::Pending),
            pods: unsched,
            expect: expect(JobPhase::Pending, false, "Unschedulable"),
        },
        Case {
            name: "image pull back-off",
            job: tj(|_| {}),
            prev: was(JobPhase::Pending),
            pods: pull,
            expect: expect(JobPhase::Pending, false, "ImagePullBackOff"),
        },
        Case {
            name: "running, not ready yet",
            job: tj(|_| {}),
            prev: was(JobPhase::Pending),
            pods: (0..3).map(|r| running(&w(r), r != 1)).collect(),
            expect: expect(JobPhase::Running, false, "WorkersStarting"),
        },
        Case {
            name: "all running and ready",
            job: tj(|_| {}),
            prev: was(JobPhase::Pending),
            pods: all_running(),
            expect: expect(JobPhase::Running, true, "WorkersReady"),
        },
        Case {
            name: "AllWorkers: finished ranks count as ready while others run",
            job: tj(|_| {}),
            prev: was(JobPhase::Running),
            pods: some_done.clone(),
            expect: expect(JobPhase::Running, true, "WorkersReady"),
        },
        Case {
            name: "AllWorkers: every rank exited 0",
            job: tj(|_| {}),
            prev: was(JobPhase::Running),
            pods: (0..3).map(|r| finished(&w(r), 0)).collect(),
            expect: expect(JobPhase::Succeeded, true, "JobSucceeded"),
        },
        Case {
            name: "RankZero: rank 0 exited 0, the running ranks are cleaned up",
            job: tj(|s| s.success_policy = Some(SuccessPolicy::RankZero)),
            prev: was(JobPhase::Running),
            pods: some_done,
            expect: expect(JobPhase::Succeeded, true, "JobSucceeded").cleanup(vec![w(2)]),
        },
        Case {
            name: "OnFailure: a failed rank is restarted",
            job: tj(|_| {}),
            prev: restarts(1),
            pods: failed1.clone(),
            expect: expect(JobPhase::Restarting, false, "Restarting")
                .restart(vec![w(1)])
                .restarts(2),
        },
        Case {
            name: "OnFailure: past backoffLimit the job fails",
            job: tj(|_| {}),
            prev: restarts(3),
            pods: failed1.clone(),
            expect: expect(JobPhase::Failed, false, "BackoffLimitExceeded")
                .cleanup(vec![w(0), w(2)])
                .restarts(3),
        },
        Case {
            name: "each failed pod counts: 2 + 2 > 3",
            job: tj(|_| {}),
            prev: restarts(2),
            pods: two_failed.clone(),
            expect: expect(JobPhase::Failed, false, "BackoffLimitExceeded")
                .cleanup(vec![w(1)])
                .restarts(2),
        },
        Case {
            name: "backoffLimit 5 leaves room for both",
            job: tj(policy(|p| p.backoff_limit = Some(5))),
            prev: restarts(2),
            pods: two_failed,
            expect: expect(JobPhase::Restarting, false, "Restarting")
                .restart(vec![w(0), w(2)])
                .restarts(4),
        },
        Case {
            name: "backoffLimit 0: the first failure fails the job",
            job: tj(policy(|p| p.backoff_limit = Some(0))),
            prev: restarts(0),
            pods: oom.clone(),
            expect: expect(JobPhase::Failed, false, "BackoffLimitExceeded")
                .cleanup(vec![w(0), w(1)]),
        },
        Case {
            name: "Never: the first failure fails the job",
            job: tj(policy(|p| p.restart_policy = Some(RestartPolicy::Never))),
            prev: restarts(0),
            pods: oom.clone(),
            expect: expect(JobPhase::Failed, false, "WorkerFailed").cleanup(vec![w(0), w(1)]),
        },
        Case {
            name: "ExitCode: 1-127 fails fast",
            job: tj(policy(|p| p.restart_policy = Some(RestartPolicy::ExitCode))),
            prev: restarts(0),
            pods: failed1,
            expect: expect(JobPhase::Failed, false, "ExitCode").cleanup(vec![w(0), w(2)]),
        },
        Case {
            name: "ExitCode: 137 (OOM kill, SIGKILL) is retried",
            job: tj(policy(|p| p.restart_policy = Some(RestartPolicy::ExitCode))),
            prev: restarts(0),
            pods: oom,
            expect: expect(JobPhase::Restarting, false, "Restarting")
                .restart(vec![w(2)])
                .restarts(1),
        },
        Case {
            name: "ExitCode: an eviction (no exit code) is retried",
            job: tj(policy(|p| p.restart_policy = Some(RestartPolicy::ExitCode))),
            prev: restarts(0),
            pods: evict,
            expect: expect(JobPhase::Restarting, false, "Restarting")
                .restart(vec![w(0)])
                .restarts(1),
        },
        Case {
            name: "a pod deleted under a running job is re-created without counting",
            job: tj(|_| {}),
            prev: restarts(1),
            pods: vec![running(&w(0), true), running(&w(2), true)],
            expect: expect(JobPhase::Restarting, false, "Restarting")
                .create(vec![1])
                .restarts(1),
        },
        Case {
            name: "restarting until every rank runs again",
            job: tj(|_| {}),
            prev: TrainingJobStatus {
                restarts: 1,
                ..was(JobPhase::Restarting)
            },
            pods: vec![running(&w(0), true), pending(&w(1)), running(&w(2), true)],
            expect: expect(JobPhase::Restarting, false, "Restarting").restarts(1),
        },
        Case {
            name: "back to running",
            job: tj(|_| {}),
            prev: TrainingJobStatus {
                restarts: 1,
                ..was(JobPhase::Restarting)
            },
            pods: all_running(),
            expect: expect(JobPhase::Running, true, "WorkersReady").restarts(1),
        },
    ];
    for Case {
        name,
        job,
        prev,
        pods,
        expect: e,
    } in cases
    {
        let o = obs(pods);
        let (d, s) = step(&job, &prev, &o, &now());
        assert_eq!(d.phase, e.phase, "{}", name);
        assert_eq!(d.create, e.create, "{}", name);
        assert_eq!(deleted(&d, DeleteReason::Restart), e.restart, "{}", name);
        assert_eq!(deleted(&d, DeleteReason::Cleanup), e.cleanup, "{}", name);
        assert_eq!(d.restarts, e.restarts, "{}", name);
        assert!(!d.delete_job, "{}", name);
        assert_eq!(s.phase, Some(e.phase), "{}", name);
        assert_eq!(s.restarts, e.restarts, "{}", name);
        let ready = cond(&s, READY);
        assert_eq!(
            (ready.status == "True", ready.reason.as_str()),
            e.ready,
            "{}: {}",
            name,
            ready.message
        );
        // Every condition is there, True exactly when the phase says so.
        for (t, on) in [
            (CREATED, true),
            (RUNNING, e.phase == JobPhase::Running),
            (RESTARTING, e.phase == JobPhase::Restarting),
            (SUCCEEDED, e.phase == JobPhase::Succeeded),
            (FAILED, e.phase == JobPhase::Failed),
            (SUSPENDED, false),
        ] {
            let x = cond(&s, t);
            assert_eq!(x.status == "True", on, "{}: {t}", name);
            assert!(
                !x.reason.is_empty() && x.reason.chars().all(|ch| ch.is_ascii_alphanumeric()),
                "{}: {t} reason {:?}",
                name,
                x.reason
            );
            assert_eq!(x.observed_generation, Some(2));
        }
        assert_eq!(s.observed_generation, Some(2));
        assert_eq!(
            s.completion_time.is_some(),
            e.phase.is_finished(),
            "{}",
            name
        );
        assert!(s.start_time.is_some(), "{}", name);
    }
}

#[test]
fn failure_messages_name_the_worker_and_the_exit_code() {
    let mut pods = all_running();
    pods[1] = finished(&w(1), 3);
    let job = tj(policy(|p| p.restart_policy = Some(RestartPolicy::ExitCode)));
    let (d, s) = step(&job, &was(JobPhase::Running), &obs(pods), &now());
    let (reason, message) = d.outcome.unwrap();
    assert_eq!(reason, "ExitCode");
    assert!(
        message.contains("worker 1 (pod resnet-worker-1)"),
        "{message}"
    );
    assert!(message.contains("exit code 3"), "{message}");
    assert_eq!(cond(&s, FAILED).message, message);
    assert_eq!(s.workers.unwrap().failed, 1);

    let mut pods = all_running();
    pods[2] = finished(&w(2), 137);
    let (d, _) = step(&tj(|_| {}), &was(JobPhase::Running), &obs(pods), &now());
    assert!(d.delete[0].message.contains("exit code 137"));
    assert!(d.delete[0].message.contains("restart 1 of 3"));
}

#[test]
fn deadline_counts_from_start_time() {
    let job = tj(policy(|p| p.active_deadline_seconds = Some(600)));
    let prev = TrainingJobStatus {
        start_time: Some(at(T0 - 500)),
        ..was(JobPhase::Running)
    };
    let o = obs(all_running());
    let d = decide(&job, &prev, &o, &now());
    assert_eq!(d.phase, JobPhase::Running);
    assert_eq!(d.requeue_after, Some(Duration::from_secs(100)));

    let (d, s) = step(&job, &prev, &o, &at(T0 + 100));
    assert_eq!(d.phase, JobPhase::Failed);
    assert_eq!(d.outcome.as_ref().unwrap().0, "DeadlineExceeded");
    assert_eq!(deleted(&d, DeleteReason::Cleanup).len(), 3);
    assert_eq!(cond(&s, READY).reason, "DeadlineExceeded");
    assert_eq!(s.completion_time, Some(at(T0 + 100)));
    // A job that never started gets its start time now, and the full deadline.
    let d = decide(&job, &TrainingJobStatus::default(), &obs(vec![]), &now());
    assert_eq!(d.start_time, Some(now()));
    assert_eq!(d.requeue_after, Some(Duration::from_secs(600)));
}

#[test]
fn clean_pod_policy_on_finish() {
    let mut pods = all_running();
    pods[0] = finished(&w(0), 1);
    pods[1] = pending(&w(1));
    for (policy_, cleaned) in [
        (None, vec![w(1), w(2)]),
        (Some(CleanPodPolicy::Running), vec![w(1), w(2)]),
        (Some(CleanPodPolicy::All), vec![w(0), w(1), w(2)]),
        (Some(CleanPodPolicy::None), vec![]),
    ] {
        let job = tj(policy(|p| {
            p.clean_pod_policy = policy_;
            p.restart_policy = Some(RestartPolicy::Never);
        }));
        let d = decide(&job, &was(JobPhase::Running), &obs(pods.clone()), &now());
        assert_eq!(d.phase, JobPhase::Failed);
        assert_eq!(deleted(&d, DeleteReason::Cleanup), cleaned, "{policy_:?}");
        assert_eq!(d.delete.len(), cleaned.len());
    }
}

#[test]
fn a_finished_job_never_gets_pods_again() {
    let job = tj(|_| {});
    let (_, done) = step(
        &job,
        &was(JobPhase::Running),
        &obs((0..3).map(|r| finished(&w(r), 0)).collect()),
        &now(),
    );
    assert_eq!(done.phase, Some(JobPhase::Succeeded));
    // Every pod gone, and even a failed pod showing up: nothing is created or restarted.
    for pods in [vec![], vec![finished(&w(1), 1)]] {
        let later = at(T0 + 50);
        let (d, s) = step(&job, &done, &obs(pods), &later);
        assert_eq!(d.phase, JobPhase::Succeeded);
        assert!(d.create.is_empty());
        assert!(deleted(&d, DeleteReason::Restart).is_empty());
        assert_eq!(d.restarts, 0);
        // The counts are those at completion, the outcome and the times are kept.
        let counts = s.workers.clone().unwrap();
        assert_eq!((counts.succeeded, counts.failed, counts.active), (3, 0, 0));
        assert_eq!(s.completion_time, Some(now()));
        assert_eq!(cond(&s, SUCCEEDED).reason, "AllWorkersSucceeded");
        assert_eq!(s.conditions, done.conditions);
    }
    // Failed stays Failed with its reason, also when suspended or scaled afterwards.
    let failed = TrainingJobStatus {
        phase: Some(JobPhase::Failed),
        completion_time: Some(now()),
        conditions: conditions::merge(
            &[],
            &[Cond::new(FAILED, true, "BackoffLimitExceeded", "m")],
            Some(1),
            &now(),
        ),
        ..was(JobPhase::Failed)
    };
    let job = tj(|s| {
        s.suspend = Some(true);
        s.workers = 5;
    });
    let (d, s) = step(&job, &failed, &obs(vec![]), &now());
    assert_eq!(d.phase, JobPhase::Failed);
    assert!(d.create.is_empty() && d.delete.is_empty());
    assert_eq!(cond(&s, FAILED).reason, "BackoffLimitExceeded");
    assert_eq!(cond(&s, READY).reason, "BackoffLimitExceeded");
    assert_eq!(cond(&s, READY).status, "False");
}

#[test]
fn ttl_deletes_the_job_after_completion() {
    let job = tj(policy(|p| p.ttl_seconds_after_finished = Some(3600)));
    let done = TrainingJobStatus {
        phase: Some(JobPhase::Succeeded),
        completion_time: Some(at(T0 - 600)),
        ..TrainingJobStatus::default()
    };
    let d = decide(&job, &done, &obs(vec![]), &now());
    assert!(!d.delete_job);
    assert_eq!(d.requeue_after, Some(Duration::from_secs(3000)));
    let d = decide(&job, &done, &obs(vec![]), &at(T0 + 3000));
    assert!(d.delete_job);
    // Finishing now with a TTL of 0 deletes at once; without a TTL, never.
    let job0 = tj(policy(|p| p.ttl_seconds_after_finished = Some(0)));
    let pods: Vec<Pod> = (0..3).map(|r| finished(&w(r), 0)).collect();
    assert!(decide(&job0, &was(JobPhase::Running), &obs(pods.clone()), &now()).delete_job);
    let d = decide(&tj(|_| {}), &was(JobPhase::Running), &obs(pods), &now());
    assert!(!d.delete_job);
    assert_eq!(d.requeue_after, None);
}

#[test]
fn suspend_deletes_every_pod_and_resume_restarts_the_clock() {
    let job = tj(|s| {
        s.suspend = Some(true);
        s.run_policy = Some(RunPolicy {
            active_deadline_seconds: Some(60),
            ..RunPolicy::default()
        });
    });
    let mut pods = all_running();
    pods[1] = finished(&w(1), 1);
    pods.push(running(&w(7), true));
    let prev = TrainingJobStatus {
        restarts: 2,
        ..was(JobPhase::Running)
    };
    let (d, s) = step(&job, &prev, &obs(pods), &now());
    assert_eq!(d.phase, JobPhase::Suspended);
    assert_eq!(
        deleted(&d, DeleteReason::Suspend),
        vec![w(0), w(1), w(2), w(7)]
    );
    assert!(d.create.is_empty());
    assert_eq!(d.requeue_after, None);
    assert_eq!(s.start_time, None);
    assert_eq!(s.restarts, 2);
    assert_eq!(s.workers.as_ref().unwrap().active, 0);
    assert_eq!(cond(&s, SUSPENDED).status, "True");
    assert_eq!(cond(&s, READY).reason, "Suspended");

    // Resumed long after the deadline would have passed: the clock starts again.
    let resumed = tj(|s| {
        s.run_policy = Some(RunPolicy {
            active_deadline_seconds: Some(60),
            ..RunPolicy::default()
        });
    });
    let later = at(T0 + 1000);
    let (d, s2) = step(&resumed, &s, &obs(vec![]), &later);
    assert_eq!(d.phase, JobPhase::Pending);
    assert_eq!(d.create, vec![0, 1, 2]);
    assert_eq!(s2.start_time, Some(later.clone()));
    assert_eq!(d.requeue_after, Some(Duration::from_secs(60)));
    assert_eq!(s2.restarts, 2);
    assert_eq!(cond(&s2, SUSPENDED).status, "False");
    assert_eq!(cond(&s2, SUSPENDED).last_transition_time, later);
}

#[test]
fn scaled_down_ranks_are_orphans() {
    let job = tj(|s| s.workers = 2);
    let mut pods = all_running();
    // Not a name the builder makes: also swept.
    pods.push(running("resnet-worker-01", true));
    let (d, s) = step(&job, &was(JobPhase::Running), &obs(pods), &now());
    assert_eq!(
        deleted(&d, DeleteReason::Orphan),
        vec!["resnet-worker-01".to_string(), w(2)]
    );
    assert_eq!(d.phase, JobPhase::Running);
    assert_eq!(s.workers_ready.as_deref(), Some("2/2"));
}

#[test]
fn a_stale_cache_never_counts_a_failure_twice() {
    let job = tj(|_| {});
    let mut pods = all_running();
    pods[1] = finished(&w(1), 1);
    let mut o = obs(pods);
    let (d, s) = step(&job, &was(JobPhase::Running), &o, &now());
    assert_eq!(d.restarts, 1);
    assert_eq!(deleted(&d, DeleteReason::Restart), vec![w(1)]);
    // The reconciler deleted the pod and remembers it; the cache still shows it failed.
    o.deleted.insert("uid-resnet-worker-1".into());
    let (d2, s2) = step(&job, &s, &o, &at(T0 + 5));
    assert_eq!(d2.restarts, 1);
    assert!(d2.delete.is_empty());
    assert!(d2.create.is_empty(), "wait until the old pod is gone");
    assert_eq!(d2.phase, JobPhase::Restarting);
    assert_eq!(s2, s);
    // Gone from the cache: re-created, still one restart.
    let o3 = obs(vec![running(&w(0), true), running(&w(2), true)]);
    let (d3, _) = step(&job, &s, &o3, &at(T0 + 6));
    assert_eq!(d3.create, vec![1]);
    assert_eq!(d3.restarts, 1);
}

#[test]
fn pods_on_their_way_out_are_waited_for() {
    let job = tj(|_| {});
    let mut leaving = running(&w(1), true);
    leaving.metadata.deletion_timestamp = Some(now());
    let mut foreign = running(&w(2), true);
    foreign.metadata.owner_references = None;
    let mut o = obs(vec![running(&w(0), true), leaving]);
    o.pods.push(Arc::new(foreign));
    let d = decide(&job, &was(JobPhase::Running), &o, &now());
    assert!(d.create.is_empty());
    assert!(d.delete.is_empty(), "another owner's pod is never touched");
    assert_eq!(d.phase, JobPhase::Restarting);
}

#[test]
fn undo_restart_takes_back_the_count() {
    let job = tj(policy(|p| p.backoff_limit = Some(5)));
    let pods: Vec<Pod> = (0..3).map(|r| finished(&w(r), 137)).collect();
    let mut d = decide(&job, &was(JobPhase::Running), &obs(pods), &now());
    assert_eq!(d.restarts, 3);
    d.undo_restart("uid-resnet-worker-1");
    assert_eq!(d.restarts, 2);
    assert_eq!(deleted(&d, DeleteReason::Restart), vec![w(0), w(2)]);
    d.undo_restart("not-there");
    assert_eq!(d.restarts, 2);
}

#[test]
fn counts_and_printer_columns() {
    let job = tj(|s| {
        s.workers = 4;
        s.workload.gpus = Some(GpuSpec {
            count: 8,
            ..GpuSpec::default()
        });
    });
    let pods = vec![
        running(&w(0), true),
        running(&w(1), false),
        pending(&w(2)),
        finished(&w(3), 0),
    ];
    let (_, s) = step(&job, &was(JobPhase::Pending), &obs(pods), &now());
    let c = s.workers.unwrap();
    assert_eq!((c.active, c.ready, c.succeeded, c.failed), (3, 1, 1, 0));
    assert_eq!(s.workers_ready.as_deref(), Some("1/4"));
    // The three pods that have not finished, with the spec's count (they carry no GPU label).
    assert_eq!(s.gpus, Some(24));
    // CPU-only
    let (_, s) = step(&tj(|_| {}), &was(JobPhase::Pending), &obs(vec![]), &now());
    assert_eq!(s.gpus, Some(0));
    assert_eq!(s.workers_ready.as_deref(), Some("0/3"));
}

#[test]
fn status_is_stable_when_nothing_changes() {
    let mut restarting = all_running();
    restarting[1] = pending(&w(1));
    let worlds: Vec<(TrainingJob, Vec<Pod>)> = vec![
        (tj(|_| {}), vec![]),
        (tj(|_| {}), vec![pending(&w(0)), unschedulable(&w(1))]),
        (tj(|_| {}), all_running()),
        (tj(|_| {}), restarting),
        (tj(|s| s.suspend = Some(true)), vec![]),
        (tj(|_| {}), (0..3).map(|r| finished(&w(r), 0)).collect()),
        (
            tj(policy(|p| p.restart_policy = Some(RestartPolicy::Never))),
            vec![finished(&w(0), 2)],
        ),
    ];
    for (job, pods) in worlds {
        let o = obs(pods);
        let (_, first) = step(&job, &TrainingJobStatus::default(), &o, &now());
        let (d, again) = step(&job, &first, &o, &at(T0 + 3600));
        assert_eq!(again, first, "{:?}", first.phase);
        assert!(d.create.is_empty() || first.phase == Some(JobPhase::Pending));
    }
}

#[test]
fn transition_time_moves_only_when_a_condition_flips() {
    let job = tj(|_| {});
    let (_, s1) = step(&job, &was(JobPhase::Pending), &obs(vec![]), &now());
    let t1 = at(T0 + 10);
    let (_, s2) = step(&job, &s1, &obs(vec![pending(&w(0))]), &t1);
    assert_eq!(cond(&s2, READY).last_transition_time, now());
    let t2 = at(T0 + 20);
    let (_, s3) = step(&job, &s2, &obs(all_running()), &t2);
    assert_eq!(cond(&s3, READY).last_transition_time, t2);
    assert_eq!(cond(&s3, RUNNING).last_transition_time, t2);
    assert_eq!(cond(&s3, CREATED).last_transition_time, now());
}

#[test]
fn invalid_spec_sets_a_condition_and_keeps_the_rest() {
    let job = tj(|_| {});
    let (_, running_status) = step(&job, &was(JobPhase::Pending), &obs(all_running()), &now());
    let err = BuildError::new(
        "InvalidWorkers",
        "spec.workers",
        "must be between 1 and 1000",
    );
    let s = invalid(&job, &running_status, &err, &at(T0 + 5));
    assert_eq!(s.phase, Some(JobPhase::Running));
    assert_eq!(s.workers, running_status.workers);
    for t in [CREATED, READY] {
        let c = cond(&s, t);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "InvalidWorkers")
        );
        assert!(c.message.contains("spec.workers"));
    }
    assert_eq!(cond(&s, RUNNING).status, "True");
    // Stable as well.
    assert_eq!(invalid(&job, &s, &err, &at(T0 + 99)), s);
    // A brand-new job with a bad spec is Pending.
    let s = invalid(&job, &TrainingJobStatus::default(), &err, &now());
    assert_eq!(s.phase, Some(JobPhase::Pending));
}

#[test]
fn a_refused_pod_is_in_created_and_ready_until_the_job_finishes() {
    let job = tj(|_| {});
    let refused = BuildError::new(
        crate::error::CHILD_REFUSED,
        "spec",
        "the API server refused a child built from it: pods \"j-worker-0\" is forbidden: no PriorityClass with name high was found",
    );
    let prev = TrainingJobStatus::default();
    let mut d = decide(&job, &prev, &obs(vec![]), &now());
    assert_eq!(d.create, vec![0, 1, 2]);
    d.refused = Some(refused.clone());
    let s = status(&job, &prev, &obs(vec![]), &d, &now());
    assert_eq!(s.phase, Some(JobPhase::Pending));
    assert_eq!(s.observed_generation, job.metadata.generation);
    for t in [CREATED, READY] {
        let c = cond(&s, t);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", crate::error::CHILD_REFUSED)
        );
        assert!(c.message.contains("no PriorityClass"), "{}", c.message);
    }
    // A finished job creates no pods: its own conditions stand.
    let mut d = decide(&job, &was(JobPhase::Failed), &obs(vec![]), &now());
    d.refused = Some(refused);
    let s = status(&job, &was(JobPhase::Failed), &obs(vec![]), &d, &now());
    assert_eq!(cond(&s, CREATED).status, "True");
    assert_ne!(cond(&s, READY).reason, crate::error::CHILD_REFUSED);
}

#[path = "shape_tests.rs"]
mod shape_tests;
