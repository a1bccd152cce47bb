//! Observed pods -> what to do (pods to create and delete, the phase) and the status to report. Pure:
//! the time and the operator's memory of the pods it already deleted are passed in.
//!
//! Semantics, where DESIGN §1.3 leaves room:
//!
//! - Phases. `Pending` until every rank runs for the first time; `Running` while every rank runs or
//!   has already exited 0; `Restarting` from a retried failure (or any rank lost once the job ran)
//!   until every rank runs again; `Succeeded`/`Failed` are final; `Suspended` while `spec.suspend`.
//! - Success is checked first (work that is done is done), then `activeDeadlineSeconds`, then
//!   failures. A failed rank is retried per `runPolicy.restartPolicy`; each retried failed pod counts
//!   one restart, and a failure that would take `restarts` above `backoffLimit` fails the job instead.
//!   A pod that is deleted (by a person, a drain or the Eviction API) is re-created without counting:
//!   only pods the kubelet reports as Failed count.
//! - A finished job (status phase Succeeded or Failed) never gets a new pod, even if its pods are gone,
//!   and its `succeeded`/`failed` worker counts are frozen at the moment it finished (the pods may be
//!   cleaned up afterwards). `active`/`ready` keep following the pods that are left.
//! - Ready is True when every rank is running and ready (a rank that already exited 0 counts as
//!   ready), and on a Succeeded job, so `kubectl wait --for=condition=Ready` also returns when a
//!   job has completed. It is False on a Failed job with the failure reason.
//! - Suspending deletes every pod and clears `startTime`; resuming sets it again, so the deadline
//!   counts from the resume (what Kueue expects). Restarts are kept across a suspension.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use super::build::rank_of;
use crate::error::BuildError;
use crate::podstatus;
use keelson_api::conditions::{self, Cond, READY};
use keelson_api::meta::is_controlled_by;
use keelson_api::trainingjob::{
    CleanPodPolicy, JobPhase, RestartPolicy, RunPolicy, SuccessPolicy, TrainingJob,
    TrainingJobStatus, WorkerCounts, DEFAULT_BACKOFF_LIMIT,
};

pub const CREATED: &str = "Created";
pub const RUNNING: &str = "Running";
pub const RESTARTING: &str = "Restarting";
pub const SUCCEEDED: &str = "Succeeded";
pub const FAILED: &str = "Failed";
pub const SUSPENDED: &str = "Suspended";

/// What the cluster holds of a TrainingJob's pods, as the reconciler sees it.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// Every cached pod labelled as a child of the job, in any state.
    pub pods: Vec<Arc<Pod>>,
    /// UIDs of pods this process already deleted. A stale cache may still list them; they are
    /// treated as gone, so a failure is never counted twice.
    pub deleted: HashSet<String>,
}

/// Why a pod is deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteReason {
    /// The pod failed and is retried: it is re-created once it is gone. Counts one restart.
    Restart,
    /// The job finished; `cleanPodPolicy` says this pod goes.
    Cleanup,
    /// `spec.suspend` is true.
    Suspend,
    /// The pod's rank is not below `spec.workers` (the job was scaled down), or its name is not one
    /// the builder makes.
    Orphan,
}

/// One pod to delete.
#[derive(Clone, Debug, PartialEq)]
pub struct Deletion {
    pub pod: Arc<Pod>,
    pub reason: DeleteReason,
    /// What to tell a person (the Event note).
    pub message: String,
}

/// What one reconcile should do, and the parts of the status that are decided rather than observed.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub phase: JobPhase,
    /// Ranks that have no pod and get one now.
    pub create: Vec<i32>,
    /// Pods to delete (restarts first, in rank order).
    pub delete: Vec<Deletion>,
    /// Restarts after this decision: the previous count plus the `Restart` deletions.
    pub restarts: i32,
    pub start_time: Option<Time>,
    pub completion_time: Option<Time>,
    /// Why the job is Succeeded or Failed, as (reason, message).
    pub outcome: Option<(String, String)>,
    /// `ttlSecondsAfterFinished` ran out: delete the TrainingJob itself.
    pub delete_job: bool,
    /// Look again after this long (the next deadline or TTL instant), when there is one.
    pub requeue_after: Option<Duration>,
    /// The API server refused a pod write (set by the reconciler after the writes): Created and
    /// Ready say so while the job is not finished.
    pub refused: Option<BuildError>,
}

impl Decision {
    /// Takes back the restart of a pod whose deletion did not happen (an API error), so that the
    /// written count matches the restarts done. The failed pod is still there and is counted when it
    /// is retried on the next reconcile.
    pub fn undo_restart(&mut self, uid: &str) {
        let before = self.delete.len();
        self.delete.retain(|d| {
            !(d.reason == DeleteReason::Restart && d.pod.uid().as_deref() == Some(uid))
        });
        let undone = i32::try_from(before - self.delete.len()).unwrap_or(0);
        self.restarts -= undone;
    }
}

/// One rank as the cache shows it.
#[derive(Clone, Copy, Debug)]
enum Slot<'a> {
    /// No pod: create one.
    Missing,
    /// A pod is on its way out (being deleted, already deleted by us, or held by a previous job of
    /// the same name): wait until it is gone.
    Leaving,
    /// Pending, Running or Unknown.
    Live(&'a Arc<Pod>),
    Succeeded,
    Failed(&'a Arc<Pod>),
}

struct View<'a> {
    /// Index = rank, `spec.workers` long.
    slots: Vec<Slot<'a>>,
    /// Own pods, not leaving, that belong to no rank of the spec.
    orphans: Vec<&'a Arc<Pod>>,
    /// Every own pod that is not leaving (what suspend and cleanup act on).
    own: Vec<&'a Arc<Pod>>,
}

fn view<'a>(job: &TrainingJob, observed: &'a Observed) -> View<'a> {
    let name = job.name_any();
    let uid = job.uid().unwrap_or_default();
    let workers = usize::try_from(job.spec.workers).unwrap_or(0);
    let mut v = View {
        slots: vec![Slot::Missing; workers],
        orphans: Vec::new(),
        own: Vec::new(),
    };
    let mut pods: Vec<&Arc<Pod>> = observed.pods.iter().collect();
    pods.sort_by_key(|p| p.name_any());
    for p in pods {
        let slot = rank_of(&name, &p.name_any())
            .and_then(|r| usize::try_from(r).ok())
            .filter(|r| *r < workers);
        let own = is_controlled_by(&p.metadata, &uid);
        let leaving = !own
            || podstatus::terminating(p)
            || p.uid().is_some_and(|u| observed.deleted.contains(&u));
        if leaving {
            if let Some(r) = slot {
                v.slots[r] = Slot::Leaving;
            }
            continue;
        }
        v.own.push(p);
        match slot {
            Some(r) => {
                v.slots[r] = match podstatus::phase(p) {
                    "Succeeded" => Slot::Succeeded,
                    "Failed" => Slot::Failed(p),
                    _ => Slot::Live(p),
                }
            }
            None => v.orphans.push(p),
        }
    }
    v
}

fn is_running(p: &Pod) -> bool {
    podstatus::phase(p) == "Running"
}

/// The terminated reason of the container that exited non-zero (`OOMKilled`, `Error`, ...).
fn terminated_reason(p: &Pod) -> Option<String> {
    p.status
        .as_ref()?
        .container_statuses
        .iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref())
        .find(|t| t.exit_code != 0)
        .and_then(|t| t.reason.clone())
}

/// "worker 2 (pod resnet-worker-2) failed with exit code 137 (OOMKilled)", or "... was evicted: ...".
fn describe_failure(rank: usize, p: &Pod) -> String {
    let who = format!("worker {rank} (pod {})", p.name_any());
    let status = p.status.as_ref();
    match podstatus::exit_code(p) {
        Some(code) => match terminated_reason(p) {
            Some(r) => format!("{who} failed with exit code {code} ({r})"),
            None => format!("{who} failed with exit code {code}"),
        },
        None => {
            let reason = status
                .and_then(|s| s.reason.clone())
                .unwrap_or_else(|| "no exit code".into());
            match status.and_then(|s| s.message.as_deref()) {
                Some(m) => format!("{who} failed: {reason}: {m}"),
                None => format!("{who} failed: {reason}"),
            }
        }
    }
}

/// Whether a failure is retried; `Err` is the (reason, message) that fails the job.
fn retried(policy: RestartPolicy, rank: usize, p: &Pod) -> Result<(), (String, String)> {
    match policy {
        RestartPolicy::OnFailure => Ok(()),
        RestartPolicy::Never => Err((
            "WorkerFailed".into(),
            format!(
                "{}; runPolicy.restartPolicy is Never, so the job failed. Check the worker's logs, fix the cause and re-create the job",
                describe_failure(rank, p)
            ),
        )),
        RestartPolicy::ExitCode => match podstatus::exit_code(p) {
            Some(code) if (1..=127).contains(&code) => Err((
                "ExitCode".into(),
                format!(
                    "{}; restartPolicy ExitCode retries only exit codes 128 and above, so the job failed. Check the worker's logs, fix the cause and re-create the job",
                    describe_failure(rank, p)
                ),
            )),
            _ => Ok(()),
        },
    }
}

fn deletion(p: &Arc<Pod>, reason: DeleteReason, message: String) -> Deletion {
    Deletion {
        pod: Arc::clone(p),
        reason,
        message,
    }
}

fn seconds(t: &Time) -> i64 {
    t.0.as_second()
}

fn after(secs: i64) -> Duration {
    Duration::from_secs(u64::try_from(secs.max(1)).unwrap_or(1))
}

/// The (reason, message) a finished job ended with, as its previous status recorded it.
fn recorded_outcome(prev: &TrainingJobStatus, phase: JobPhase) -> (String, String) {
    let type_ = if phase == JobPhase::Succeeded {
        SUCCEEDED
    } else {
        FAILED
    };
    conditions::find(&prev.conditions, type_)
        .filter(|c| c.status == "True")
        .map(|c| (c.reason.clone(), c.message.clone()))
        .unwrap_or_else(|| (format!("Job{phase:?}"), String::new()))
}

/// Marks the job finished: cleanup per `cleanPodPolicy`, and the TTL.
fn finish(d: &mut Decision, rp: &RunPolicy, v: &View, now: &Time) {
    d.create.clear();
    d.requeue_after = None;
    let policy = rp.clean_pod_policy.unwrap_or_default();
    for p in &v.own {
        let done = matches!(podstatus::phase(p), "Succeeded" | "Failed");
        let goes = match policy {
            CleanPodPolicy::All => true,
            CleanPodPolicy::Running => !done,
            CleanPodPolicy::None => false,
        };
        if goes {
            d.delete.push(deletion(
                p,
                DeleteReason::Cleanup,
                format!(
                    "deleted pod {}: the job has finished (cleanPodPolicy {policy:?})",
                    p.name_any()
                ),
            ));
        }
    }
    if let Some(ttl) = rp.ttl_seconds_after_finished {
        let done_at = d.completion_time.as_ref().unwrap_or(now);
        let left = seconds(done_at) + ttl - seconds(now);
        if left <= 0 {
            d.delete_job = true;
        } else {
            d.requeue_after = Some(after(left));
        }
    }
}

/// Decides what to do about the job's pods and which phase it is in. `prev` is the latest status
/// (the reconciler passes the one it wrote last when the cache has not caught up yet).
pub fn decide(
    job: &TrainingJob,
    prev: &TrainingJobStatus,
    observed: &Observed,
    now: &Time,
) -> Decision {
    let rp = job.spec.run_policy.clone().unwrap_or_default();
    let v = view(job, observed);
    let mut d = Decision {
        phase: JobPhase::Pending,
        create: Vec::new(),
        delete: Vec::new(),
        restarts: prev.restarts,
        start_time: prev.start_time.clone(),
        completion_time: prev.completion_time.clone(),
        outcome: None,
        delete_job: false,
        requeue_after: None,
        refused: None,
    };

    // Finished: stays finished. Only cleanup and the TTL are left to do.
    if let Some(phase) = prev.phase.filter(|p| p.is_finished()) {
        d.phase = phase;
        d.outcome = Some(recorded_outcome(prev, phase));
        d.completion_time = Some(prev.completion_time.clone().unwrap_or_else(|| now.clone()));
        finish(&mut d, &rp, &v, now);
        return d;
    }

    if job.spec.suspend.unwrap_or(false) {
        d.phase = JobPhase::Suspended;
        d.start_time = None;
        d.completion_time = None;
        d.delete = v
            .own
            .iter()
            .map(|p| {
                deletion(
                    p,
                    DeleteReason::Suspend,
                    format!("deleted pod {}: the job is suspended", p.name_any()),
                )
            })
            .collect();
        return d;
    }

    let start = prev.start_time.clone().unwrap_or_else(|| now.clone());
    d.start_time = Some(start.clone());

    let succeeded = |s: &Slot| matches!(s, Slot::Succeeded);
    let success = match job.spec.success_policy.unwrap_or_default() {
        SuccessPolicy::AllWorkers => (!v.slots.is_empty() && v.slots.iter().all(succeeded))
            .then_some((
                "AllWorkersSucceeded",
                format!("all {} workers exited 0", v.slots.len()),
            )),
        SuccessPolicy::RankZero => v
            .slots
            .first()
            .filter(|s| succeeded(s))
            .map(|_| ("RankZeroSucceeded", "worker 0 exited 0".to_string())),
    };
    if let Some((reason, message)) = success {
        d.phase = JobPhase::Succeeded;
        d.outcome = Some((reason.into(), message));
        d.completion_time = Some(now.clone());
        finish(&mut d, &rp, &v, now);
        return d;
    }

    let fail = |d: &mut Decision, reason: String, message: String| {
        d.phase = JobPhase::Failed;
        d.outcome = Some((reason, message));
        d.completion_time = Some(now.clone());
        finish(d, &rp, &v, now);
    };

    if let Some(limit) = rp.active_deadline_seconds {
        let left = seconds(&start) + limit - seconds(now);
        if left <= 0 {
            fail(
                &mut d,
                "DeadlineExceeded".into(),
                format!("the job ran longer than runPolicy.activeDeadlineSeconds ({limit}s) and was stopped; raise the deadline or make the job faster, then re-create it"),
            );
            return d;
        }
        d.requeue_after = Some(after(left));
    }

    let policy = rp.restart_policy.unwrap_or_default();
    let mut retry: Vec<(usize, &Arc<Pod>)> = Vec::new();
    for (rank, slot) in v.slots.iter().enumerate() {
        if let Slot::Failed(p) = slot {
            if let Err((reason, message)) = retried(policy, rank, p) {
                fail(&mut d, reason, message);
                return d;
            }
            retry.push((rank, p));
        }
    }
    let limit = rp.backoff_limit.unwrap_or(DEFAULT_BACKOFF_LIMIT);
    if let Some((rank, p)) = retry.first() {
        let wanted = prev
            .restarts
            .saturating_add(i32::try_from(retry.len()).unwrap_or(i32::MAX));
        if wanted > limit {
            fail(
                &mut d,
                "BackoffLimitExceeded".into(),
                format!(
                    "{} after {} restarts; runPolicy.backoffLimit is {limit}. Check the worker's logs, fix the cause and re-create the job",
                    describe_failure(*rank, p),
                    prev.restarts
                ),
            );
            return d;
        }
        d.restarts = wanted;
    }
    for (i, (rank, p)) in retry.iter().enumerate() {
        let n = prev.restarts.saturating_add(i32::try_from(i).unwrap_or(0)) + 1;
        d.delete.push(deletion(
            p,
            DeleteReason::Restart,
            format!(
                "{}: re-creating it (restart {n} of {limit})",
                describe_failure(*rank, p)
            ),
        ));
    }

    let workers = v.slots.len();
    for p in &v.orphans {
        d.delete.push(deletion(
            p,
            DeleteReason::Orphan,
            format!(
                "deleted pod {}: it is not one of the job's {workers} workers (spec.workers changed)",
                p.name_any()
            ),
        ));
    }

    d.create = v
        .slots
        .iter()
        .enumerate()
        .filter(|(_, s)| matches!(s, Slot::Missing))
        .filter_map(|(r, _)| i32::try_from(r).ok())
        .collect();

    let all_running = v.slots.iter().all(|s| match s {
        Slot::Succeeded => true,
        Slot::Live(p) => is_running(p),
        _ => false,
    });
    d.phase = if !retry.is_empty() {
        JobPhase::Restarting
    } else if all_running {
        JobPhase::Running
    } else if matches!(prev.phase, Some(JobPhase::Running | JobPhase::Restarting)) {
        JobPhase::Restarting
    } else {
        JobPhase::Pending
    };
    d
}

/// The Ready condition of a job that is neither finished nor suspended.
fn ready_while_active(d: &Decision, v: &View, restarting: &HashSet<String>) -> Cond {
    let n = v.slots.len();
    let live = |p: &Pod| !p.uid().is_some_and(|u| restarting.contains(&u));
    let all_ready = v.slots.iter().all(|s| match s {
        Slot::Succeeded => true,
        Slot::Live(p) => is_running(p) && podstatus::is_ready(p),
        _ => false,
    });
    if d.phase == JobPhase::Running && all_ready {
        return Cond::new(
            READY,
            true,
            "WorkersReady",
            format!("all {n} workers are running"),
        );
    }
    if let Some((reason, message)) = v.slots.iter().find_map(|s| match s {
        Slot::Live(p) if live(p) => podstatus::problem(p),
        _ => None,
    }) {
        return Cond::new(READY, false, reason, message);
    }
    if d.phase == JobPhase::Restarting {
        return Cond::new(
            READY,
            false,
            "Restarting",
            "a worker is being re-created; the job continues when every rank runs again",
        );
    }
    let exist = v
        .slots
        .iter()
        .filter(|s| !matches!(s, Slot::Missing | Slot::Leaving))
        .count();
    if exist < n {
        return Cond::new(
            READY,
            false,
            "PodsCreating",
            format!("{exist} of {n} worker pods exist; the others are being created"),
        );
    }
    let ready = v
        .slots
        .iter()
        .filter(|s| matches!(s, Slot::Live(p) if is_running(p) && podstatus::is_ready(p)))
        .count();
    Cond::new(
        READY,
        false,
        "WorkersStarting",
        format!("{ready} of {n} workers are ready; the others are starting"),
    )
}

/// Every condition of the job but Created and Ready, from its phase.
fn phase_conditions(
    phase: JobPhase,
    outcome: Option<&(String, String)>,
    restarts: i32,
    limit: i32,
) -> Vec<Cond> {
    let (out_reason, out_message) = outcome
        .cloned()
        .unwrap_or_else(|| (format!("Job{phase:?}"), String::new()));
    let running = match phase {
        JobPhase::Running => Cond::new(RUNNING, true, "WorkersRunning", "every worker is running"),
        JobPhase::Pending => Cond::new(
            RUNNING,
            false,
            "WorkersPending",
            "the workers are starting; see the Ready condition",
        ),
        JobPhase::Restarting => Cond::new(
            RUNNING,
            false,
            "WorkerRestarting",
            "a worker is being re-created; see the Restarting condition",
        ),
        JobPhase::Succeeded => Cond::new(RUNNING, false, "JobSucceeded", "the job has finished"),
        JobPhase::Failed => Cond::new(RUNNING, false, "JobFailed", "the job has finished"),
        JobPhase::Suspended => Cond::new(RUNNING, false, "JobSuspended", "the job is suspended"),
    };
    let restarting = if phase == JobPhase::Restarting {
        Cond::new(
            RESTARTING,
            true,
            "WorkerRestarting",
            format!("workers are being re-created; {restarts} of runPolicy.backoffLimit {limit} restarts used"),
        )
    } else {
        Cond::new(RESTARTING, false, "NotRestarting", "")
    };
    let succeeded = match phase {
        JobPhase::Succeeded => Cond::new(SUCCEEDED, true, out_reason.clone(), out_message.clone()),
        JobPhase::Failed => Cond::new(SUCCEEDED, false, "JobFailed", ""),
        _ => Cond::new(SUCCEEDED, false, "NotFinished", ""),
    };
    let failed = match phase {
        JobPhase::Failed => Cond::new(FAILED, true, out_reason, out_message),
        JobPhase::Succeeded => Cond::new(FAILED, false, "JobSucceeded", ""),
        _ => Cond::new(FAILED, false, "NotFinished", ""),
    };
    let suspended = if phase == JobPhase::Suspended {
        Cond::new(
            SUSPENDED,
            true,
            "JobSuspended",
            "spec.suspend is true: set it to false (or let the job's queue admit it) to run the workers",
        )
    } else {
        Cond::new(SUSPENDED, false, "NotSuspended", "")
    };
    vec![running, restarting, succeeded, failed, suspended]
}

fn created_ok() -> Cond {
    Cond::new(
        CREATED,
        true,
        "JobCreated",
        "the job's Service and worker pods are managed by keelson",
    )
}

fn backoff_limit(job: &TrainingJob) -> i32 {
    job.spec
        .run_policy
        .as_ref()
        .and_then(|r| r.backoff_limit)
        .unwrap_or(DEFAULT_BACKOFF_LIMIT)
}

fn gpus(job: &TrainingJob) -> i32 {
    job.spec
        .workers
        .saturating_mul(job.spec.workload.gpu_count())
}

/// The status a TrainingJob should show after `d` was carried out. For an unchanged world it is equal
/// to `prev`, so no status write happens.
pub fn status(
    job: &TrainingJob,
    prev: &TrainingJobStatus,
    observed: &Observed,
    d: &Decision,
    now: &Time,
) -> TrainingJobStatus {
    let v = view(job, observed);
    let uid_in = |reasons: &[DeleteReason]| -> HashSet<String> {
        d.delete
            .iter()
            .filter(|x| reasons.contains(&x.reason))
            .filter_map(|x| x.pod.uid())
            .collect()
    };
    let restarting = uid_in(&[DeleteReason::Restart]);
    let going = uid_in(&[
        DeleteReason::Restart,
        DeleteReason::Cleanup,
        DeleteReason::Suspend,
    ]);
    let stays = |p: &Pod| !p.uid().is_some_and(|u| going.contains(&u));

    let mut counts = WorkerCounts::default();
    for s in &v.slots {
        match s {
            Slot::Live(p) if stays(p) => {
                counts.active += 1;
                if is_running(p) && podstatus::is_ready(p) {
                    counts.ready += 1;
                }
            }
            Slot::Succeeded => counts.succeeded += 1,
            Slot::Failed(p) if !p.uid().is_some_and(|u| restarting.contains(&u)) => {
                counts.failed += 1
            }
            _ => {}
        }
    }
    if prev.phase.is_some_and(JobPhase::is_finished) {
        let frozen = prev.workers.clone().unwrap_or_default();
        counts.succeeded = frozen.succeeded;
        counts.failed = frozen.failed;
    }

    let ready = match d.phase {
        JobPhase::Succeeded => Cond::new(
            READY,
            true,
            "JobSucceeded",
            d.outcome
                .as_ref()
                .map(|o| o.1.clone())
                .unwrap_or_else(|| "the job succeeded".into()),
        ),
        JobPhase::Failed => {
            let (reason, message) = d
                .outcome
                .clone()
                .unwrap_or_else(|| ("JobFailed".into(), String::new()));
            Cond::new(READY, false, reason, message)
        }
        JobPhase::Suspended => Cond::new(
            READY,
            false,
            "Suspended",
            "spec.suspend is true: set it to false (or let the job's queue admit it) to run the workers",
        ),
        _ => ready_while_active(d, &v, &restarting),
    };

    let refused = d.refused.as_ref().filter(|_| !d.phase.is_finished());
    let mut conds = vec![match refused {
        Some(e) => Cond::new(CREATED, false, e.reason, e.to_string()),
        None => created_ok(),
    }];
    conds.extend(phase_conditions(
        d.phase,
        d.outcome.as_ref(),
        d.restarts,
        backoff_limit(job),
    ));
    conds.push(match refused {
        Some(e) => Cond::new(READY, false, e.reason, e.to_string()),
        None => ready,
    });

    let generation = job.metadata.generation;
    TrainingJobStatus {
        phase: Some(d.phase),
        workers_ready: Some(format!("{}/{}", counts.ready, job.spec.workers)),
        workers: Some(counts),
        gpus: Some(gpus(job)),
        restarts: d.restarts,
        start_time: d.start_time.clone(),
        completion_time: d.completion_time.clone(),
        observed_generation: generation,
        conditions: conditions::merge(&prev.conditions, &conds, generation, now),
    }
}

/// The status of a job whose spec cannot be built: Created and Ready False with the reason, the rest
/// as it was. The pods are left alone until the spec is fixed.
pub fn invalid(
    job: &TrainingJob,
    prev: &TrainingJobStatus,
    err: &BuildError,
    now: &Time,
) -> TrainingJobStatus {
    let phase = prev.phase.unwrap_or_default();
    let outcome = phase.is_finished().then(|| recorded_outcome(prev, phase));
    let message = format!("{err}; fix the spec, the job is reconciled again when it changes");
    let mut conds = vec![Cond::new(CREATED, false, err.reason, message.clone())];
    conds.extend(phase_conditions(
        phase,
        outcome.as_ref(),
        prev.restarts,
        backoff_limit(job),
    ));
    conds.push(Cond::new(READY, false, err.reason, message));
    let generation = job.metadata.generation;
    TrainingJobStatus {
        phase: Some(phase),
        gpus: Some(gpus(job)),
        observed_generation: generation,
        conditions: conditions::merge(&prev.conditions, &conds, generation, now),
        ..prev.clone()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::podstatus::fixtures::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    use k8s_openapi::jiff::Timestamp;
    use keelson_api::trainingjob::TrainingJobSpec;
    use keelson_api::workload::{GpuSpec, WorkloadSpec};

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

    #[test]
    fn decision_table() {
        struct Case {
            name: &'static str,
            job: TrainingJob,
            prev: TrainingJobStatus,
            pods: Vec<Pod>,
            phase: JobPhase,
            create: Vec<i32>,
            restart: Vec<String>,
            cleanup: Vec<String>,
            restarts: i32,
            /// Reason of Ready.
            ready: (bool, &'static str),
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
                phase: JobPhase::Pending,
                create: vec![0, 1, 2],
                restart: vec![],
                cleanup: vec![],
                restarts: 0,
                ready: (false, "PodsCreating"),
            },
            Case {
                name: "some ranks exist: only the missing are created",
                job: tj(|_| {}),
                prev: was(JobPhase::Pending),
                pods: vec![pending(&w(0)), pending(&w(2))],
                phase: JobPhase::Pending,
                create: vec![1],
                restart: vec![],
                cleanup: vec![],
                restarts: 0,
                ready: (false, "PodsCreating"),
            },
            Case {
                name: "unschedulable worker",
                job: tj(|_| {}),
                prev: was(JobPhase::Pending),
                pods: unsched,
                phase: JobPhase::Pending,
                create: vec![],
                restart: vec![],
                cleanup: vec![],
                restarts: 0,
                ready: (false, "Unschedulable"),
            },
            Case {
                name: "image pull back-off",
                job: tj(|_| {}),
                prev: was(JobPhase::Pending),
                pods: pull,
                phase: JobPhase::Pending,
                create: vec![],
                restart: vec![],
                cleanup: vec![],
                restarts: 0,
                ready: (false, "ImagePullBackOff"),
            },
            Case {
                name: "running, not ready yet",
                job: tj(|_| {}),
                prev: was(JobPhase::Pending),
                pods: (0..3).map(|r| running(&w(r), r != 1)).collect(),
                phase: JobPhase::Running,
                create: vec![],
                restart: vec![],
                cleanup: vec![],
                restarts: 0,
                ready: (false, "WorkersStarting"),
            },
            Case {
                name: "all running and ready",
                job: tj(|_| {}),
                prev: was(JobPhase::Pending),
                pods: all_running(),
                phase: JobPhase::Running,
                create: vec![],
                restart: vec![],
                cleanup: vec![],
                restarts: 0,
                ready: (true, "WorkersReady"),
            },
            Case {
                name: "AllWorkers: finished ranks count as ready while others run",
                job: tj(|_| {}),
                prev: was(JobPhase::Running),
                pods: some_done.clone(),
                phase: JobPhase::Running,
                create: vec![],
                restart: vec![],
                cleanup: vec![],
                restarts: 0,
                ready: (true, "WorkersReady"),
            },
            Case {
                name: "AllWorkers: every rank exited 0",
                job: tj(|_| {}),
                prev: was(JobPhase::Running),
                pods: (0..3).map(|r| finished(&w(r), 0)).collect(),
                phase: JobPhase::Succeeded,
                create: vec![],
                restart: vec![],
                cleanup: vec![],
                restarts: 0,
                ready: (true, "JobSucceeded"),
            },
            Case {
                name: "RankZero: rank 0 exited 0, the running ranks are cleaned up",
                job: tj(|s| s.success_policy = Some(SuccessPolicy::RankZero)),
                prev: was(JobPhase::Running),
                pods: some_done,
                phase: JobPhase::Succeeded,
                create: vec![],
                restart: vec![],
                cleanup: vec![w(2)],
                restarts: 0,
                ready: (true, "JobSucceeded"),
            },
            Case {
                name: "OnFailure: a failed rank is restarted",
                job: tj(|_| {}),
                prev: restarts(1),
                pods: failed1.clone(),
                phase: JobPhase::Restarting,
                create: vec![],
                restart: vec![w(1)],
                cleanup: vec![],
                restarts: 2,
                ready: (false, "Restarting"),
            },
            Case {
                name: "OnFailure: past backoffLimit the job fails",
                job: tj(|_| {}),
                prev: restarts(3),
                pods: failed1.clone(),
                phase: JobPhase::Failed,
                create: vec![],
                restart: vec![],
                cleanup: vec![w(0), w(2)],
                restarts: 3,
                ready: (false, "BackoffLimitExceeded"),
            },
            Case {
                name: "each failed pod counts: 2 + 2 > 3",
                job: tj(|_| {}),
                prev: restarts(2),
                pods: two_failed.clone(),
                phase: JobPhase::Failed,
                create: vec![],
                restart: vec![],
                cleanup: vec![w(1)],
                restarts: 2,
                ready: (false, "BackoffLimitExceeded"),
            },
            Case {
                name: "backoffLimit 5 leaves room for both",
                job: tj(policy(|p| p.backoff_limit = Some(5))),
                prev: restarts(2),
                pods: two_failed,
                phase: JobPhase::Restarting,
                create: vec![],
                restart: vec![w(0), w(2)],
                cleanup: vec![],
                restarts: 4,
                ready: (false, "Restarting"),
            },
            Case {
                name: "backoffLimit 0: the first failure fails the job",
                job: tj(policy(|p| p.backoff_limit = Some(0))),
                prev: restarts(0),
                pods: oom.clone(),
                phase: JobPhase::Failed,
                create: vec![],
                restart: vec![],
                cleanup: vec![w(0), w(1)],
                restarts: 0,
                ready: (false, "BackoffLimitExceeded"),
            },
            Case {
                name: "Never: the first failure fails the job",
                job: tj(policy(|p| p.restart_policy = Some(RestartPolicy::Never))),
                prev: restarts(0),
                pods: oom.clone(),
                phase: JobPhase::Failed,
                create: vec![],
                restart: vec![],
                cleanup: vec![w(0), w(1)],
                restarts: 0,
                ready: (false, "WorkerFailed"),
            },
            Case {
                name: "ExitCode: 1-127 fails fast",
                job: tj(policy(|p| p.restart_policy = Some(RestartPolicy::ExitCode))),
                prev: restarts(0),
                pods: failed1,
                phase: JobPhase::Failed,
                create: vec![],
                restart: vec![],
                cleanup: vec![w(0), w(2)],
                restarts: 0,
                ready: (false, "ExitCode"),
            },
            Case {
                name: "ExitCode: 137 (OOM kill, SIGKILL) is retried",
                job: tj(policy(|p| p.restart_policy = Some(RestartPolicy::ExitCode))),
                prev: restarts(0),
                pods: oom,
                phase: JobPhase::Restarting,
                create: vec![],
                restart: vec![w(2)],
                cleanup: vec![],
                restarts: 1,
                ready: (false, "Restarting"),
            },
            Case {
                name: "ExitCode: an eviction (no exit code) is retried",
                job: tj(policy(|p| p.restart_policy = Some(RestartPolicy::ExitCode))),
                prev: restarts(0),
                pods: evict,
                phase: JobPhase::Restarting,
                create: vec![],
                restart: vec![w(0)],
                cleanup: vec![],
                restarts: 1,
                ready: (false, "Restarting"),
            },
            Case {
                name: "a pod deleted under a running job is re-created without counting",
                job: tj(|_| {}),
                prev: restarts(1),
                pods: vec![running(&w(0), true), running(&w(2), true)],
                phase: JobPhase::Restarting,
                create: vec![1],
                restart: vec![],
                cleanup: vec![],
                restarts: 1,
                ready: (false, "Restarting"),
            },
            Case {
                name: "restarting until every rank runs again",
                job: tj(|_| {}),
                prev: TrainingJobStatus {
                    restarts: 1,
                    ..was(JobPhase::Restarting)
                },
                pods: vec![running(&w(0), true), pending(&w(1)), running(&w(2), true)],
                phase: JobPhase::Restarting,
                create: vec![],
                restart: vec![],
                cleanup: vec![],
                restarts: 1,
                ready: (false, "Restarting"),
            },
            Case {
                name: "back to running",
                job: tj(|_| {}),
                prev: TrainingJobStatus {
                    restarts: 1,
                    ..was(JobPhase::Restarting)
                },
                pods: all_running(),
                phase: JobPhase::Running,
                create: vec![],
                restart: vec![],
                cleanup: vec![],
                restarts: 1,
                ready: (true, "WorkersReady"),
            },
        ];
        for c in cases {
            let o = obs(c.pods);
            let (d, s) = step(&c.job, &c.prev, &o, &now());
            assert_eq!(d.phase, c.phase, "{}", c.name);
            assert_eq!(d.create, c.create, "{}", c.name);
            assert_eq!(deleted(&d, DeleteReason::Restart), c.restart, "{}", c.name);
            assert_eq!(deleted(&d, DeleteReason::Cleanup), c.cleanup, "{}", c.name);
            assert_eq!(d.restarts, c.restarts, "{}", c.name);
            assert!(!d.delete_job, "{}", c.name);
            assert_eq!(s.phase, Some(c.phase), "{}", c.name);
            assert_eq!(s.restarts, c.restarts, "{}", c.name);
            let ready = cond(&s, READY);
            assert_eq!(
                (ready.status == "True", ready.reason.as_str()),
                c.ready,
                "{}: {}",
                c.name,
                ready.message
            );
            // Every condition is there, True exactly when the phase says so.
            for (t, on) in [
                (CREATED, true),
                (RUNNING, c.phase == JobPhase::Running),
                (RESTARTING, c.phase == JobPhase::Restarting),
                (SUCCEEDED, c.phase == JobPhase::Succeeded),
                (FAILED, c.phase == JobPhase::Failed),
                (SUSPENDED, false),
            ] {
                let x = cond(&s, t);
                assert_eq!(x.status == "True", on, "{}: {t}", c.name);
                assert!(
                    !x.reason.is_empty() && x.reason.chars().all(|ch| ch.is_ascii_alphanumeric()),
                    "{}: {t} reason {:?}",
                    c.name,
                    x.reason
                );
                assert_eq!(x.observed_generation, Some(2));
            }
            assert_eq!(s.observed_generation, Some(2));
            assert_eq!(
                s.completion_time.is_some(),
                c.phase.is_finished(),
                "{}",
                c.name
            );
            assert!(s.start_time.is_some(), "{}", c.name);
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
        assert_eq!(s.gpus, Some(32));
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
}
