//! The TrainingJob lifecycle policy: observed pods -> what to do (pods to create and delete, the
//! phase, a restart, the end of the job). Pure: the time and the operator's memory of the pods it
//! already deleted are passed in. It decides and writes nothing; [`super::status`] reports.
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
use super::shape;
use crate::error::BuildError;
use crate::podstatus;
use keelson_api::conditions::{self};
use keelson_api::meta::is_controlled_by;
use keelson_api::trainingjob::{
    CleanPodPolicy, JobPhase, RestartPolicy, RunPolicy, SuccessPolicy, TrainingJob,
    TrainingJobStatus, DEFAULT_BACKOFF_LIMIT,
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
    /// The pod was built from an older spec (see [`super::shape`]).
    Stale,
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
pub(super) enum Slot<'a> {
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

pub(super) struct View<'a> {
    /// Index = rank, `spec.workers` long.
    pub(super) slots: Vec<Slot<'a>>,
    /// Own pods, not leaving, that belong to no rank of the spec.
    pub(super) orphans: Vec<&'a Arc<Pod>>,
    /// Every own pod that is not leaving (what suspend and cleanup act on).
    pub(super) own: Vec<&'a Arc<Pod>>,
    /// Own pods, not leaving, built from an older spec: their rank counts as leaving.
    pub(super) stale: Vec<&'a Arc<Pod>>,
    /// A pod of another shape than the spec's exists (own or not, leaving or not): no pod is
    /// created until it is gone, so that the group never mixes two shapes.
    pub(super) mixed: bool,
}

pub(super) fn view<'a>(job: &TrainingJob, observed: &'a Observed) -> View<'a> {
    let name = job.name_any();
    let uid = job.uid().unwrap_or_default();
    let workers = usize::try_from(job.spec.workers).unwrap_or(0);
    let mut v = View {
        slots: vec![Slot::Missing; workers],
        orphans: Vec::new(),
        own: Vec::new(),
        stale: Vec::new(),
        mixed: false,
    };
    let current = shape::spec_hash(&job.spec);
    let mut pods: Vec<&Arc<Pod>> = observed.pods.iter().collect();
    pods.sort_by_key(|p| p.name_any());
    for p in pods {
        let slot = rank_of(&name, &p.name_any())
            .and_then(|r| usize::try_from(r).ok())
            .filter(|r| *r < workers);
        let own = is_controlled_by(&p.metadata, &uid);
        let stale = shape::is_stale(p, &current);
        v.mixed |= stale;
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
        if stale {
            v.stale.push(p);
            if let Some(r) = slot {
                v.slots[r] = Slot::Leaving;
            }
            continue;
        }
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

pub(super) fn is_running(p: &Pod) -> bool {
    podstatus::phase(p) == "Running"
}

/// The terminated reason of the container that exited non-zero (`OOMKilled`, `Error`, ...).
pub(super) fn terminated_reason(p: &Pod) -> Option<String> {
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
pub(super) fn describe_failure(rank: usize, p: &Pod) -> String {
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
pub(super) fn retried(policy: RestartPolicy, rank: usize, p: &Pod) -> Result<(), (String, String)> {
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

pub(super) fn deletion(p: &Arc<Pod>, reason: DeleteReason, message: String) -> Deletion {
    Deletion {
        pod: Arc::clone(p),
        reason,
        message,
    }
}

pub(super) fn seconds(t: &Time) -> i64 {
    t.0.as_second()
}

pub(super) fn after(secs: i64) -> Duration {
    Duration::from_secs(u64::try_from(secs.max(1)).unwrap_or(1))
}

/// The (reason, message) a finished job ended with, as its previous status recorded it.
pub(super) fn recorded_outcome(prev: &TrainingJobStatus, phase: JobPhase) -> (String, String) {
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
pub(super) fn finish(d: &mut Decision, rp: &RunPolicy, v: &View, now: &Time) {
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

    for p in &v.stale {
        d.delete.push(deletion(
            p,
            DeleteReason::Stale,
            format!(
                "deleted pod {}: it was built from an earlier spec; every rank is re-created from the current one",
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
        .filter(|_| !v.mixed)
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
