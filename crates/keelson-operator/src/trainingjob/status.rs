//! Decision and observed pods -> the TrainingJob status to report: worker counts, the phase, and
//! the conditions (Created, Running, Restarting, Succeeded, Failed, Suspended, Ready). Pure: the
//! time is passed in. The lifecycle rules themselves are in [`super::decide`].

use std::collections::HashSet;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use crate::error::BuildError;
use crate::podstatus;
use keelson_api::conditions::{self, Cond, READY};
use keelson_api::trainingjob::{
    JobPhase, TrainingJob, TrainingJobStatus, WorkerCounts, DEFAULT_BACKOFF_LIMIT,
};

use super::decide::*;
use super::shape;

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
        DeleteReason::Stale,
    ]);
    let stays = |p: &Pod| !p.uid().is_some_and(|u| going.contains(&u));

    let mut counts = WorkerCounts::default();
    let mut gpus = 0i32;
    for s in &v.slots {
        match s {
            Slot::Live(p) if stays(p) => {
                counts.active += 1;
                gpus = gpus.saturating_add(shape::gpus_of(job, p));
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
        gpus: Some(gpus),
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
        observed_generation: generation,
        conditions: conditions::merge(&prev.conditions, &conds, generation, now),
        ..prev.clone()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
#[path = "status_tests.rs"]
mod tests;
