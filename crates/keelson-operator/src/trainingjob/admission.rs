//! The writes of Kueue admission in a TrainingJob reconcile ([`super::kueue`] has the rules):
//! before the pods, the Workload (create, update, or delete when its pod set can no longer
//! change) and the release of an evicted Workload's quota; after the decision, the Finished
//! condition and the placement of new pods on the admitted flavors.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use super::kueue::{self, Gate, Workload};
use crate::error::Result;
use crate::runtime::apply::{self, Outcome};
use crate::runtime::controller::{cached, ChildStore, Shared};
use crate::runtime::driver::{Change, Changes};
use keelson_api::meta::Owner;
use keelson_api::trainingjob::{JobPhase, TrainingJob, TrainingJobStatus};

/// Why a job waits without its Workload being the reason.
fn held(reason: &str, message: impl Into<String>) -> Gate {
    Gate::Held {
        reason: reason.into(),
        message: message.into(),
    }
}

/// The Workload of a job, from the cache.
pub fn workload_of(
    store: Option<&ChildStore<Workload>>,
    job: &TrainingJob,
    owner: &Owner,
) -> Option<Arc<Workload>> {
    let name = kueue::workload_name(&owner.name, &job.uid().unwrap_or_default());
    cached(store?, &owner.namespace, &name)
}

/// One TrainingJob in a reconcile, with what its admission reads and writes through.
pub struct Queued<'a> {
    pub shared: &'a Shared,
    /// The Workload cache; `None` when the API server does not serve Workloads.
    pub store: Option<&'a ChildStore<Workload>>,
    pub job: &'a TrainingJob,
    pub owner: &'a Owner,
}

/// Brings the Workload of a queued, unfinished job to what the spec asks, and returns where the
/// job stands. `None`: the job has no queue (or has finished), Kueue is not involved.
pub async fn before_pods(
    q: &Queued<'_>,
    prev: &TrainingJobStatus,
    pods: &[Arc<Pod>],
    worker: Option<&Pod>,
    now: &Time,
    changes: &mut Changes,
) -> Result<Option<Gate>> {
    let (shared, store, job, owner) = (q.shared, q.store, q.job, q.owner);
    let Some(queue) = kueue::queue_of(job) else {
        // Out of its queue: the job is no longer Kueue's to admit, and its Workload goes.
        if let Some(wl) = workload_of(store, job, owner) {
            if apply::delete(&shared.client, &shared.writes, wl.as_ref()).await? {
                changes.push(Change::deleted(wl.as_ref(), "the job has no queue"));
            }
        }
        return Ok(None);
    };
    if prev.phase.is_some_and(JobPhase::is_finished) {
        return Ok(None);
    }
    let Some(store) = store else {
        return Ok(Some(held(
            "KueueNotInstalled",
            format!("the API server does not serve Kueue's Workloads ({}/{}): install Kueue (docs/kueue.md) and restart the operator, or remove scheduling.queue", kueue::GROUP, kueue::VERSION),
        )));
    };
    let Some(worker) = worker else {
        return Ok(None);
    };
    let wl = workload_of(Some(store), job, owner);

    let priority = match kueue::wanted_priority(job) {
        None => None,
        Some(class) => {
            let known = wl
                .as_ref()
                .filter(|w| w.spec.priority_class_ref.as_ref() == Some(&class))
                .and_then(|w| w.spec.priority);
            let value = match known {
                Some(v) => Some(v),
                None => kueue::priority_value(&shared.client, &class).await?,
            };
            match value {
                Some(v) => Some((class, v)),
                None => {
                    return Ok(Some(held(
                        "PriorityClassNotFound",
                        format!(
                            "{} {} does not exist: create it, or name another in {}",
                            class.kind,
                            class.name,
                            if class.kind == "PriorityClass" {
                                "spec.scheduling.priorityClassName".to_string()
                            } else {
                                format!("the label {}", kueue::LABEL_PRIORITY_CLASS)
                            }
                        ),
                    )))
                }
            }
        }
    };
    let want = kueue::desired(job, owner, queue, worker, priority);

    if let Some(have) = wl.as_deref() {
        if kueue::has_reservation(have) && kueue::pod_sets_differ(&want, have) {
            // Admitted pod sets are immutable: the Workload is queued again as a new one.
            if apply::delete(&shared.client, &shared.writes, have).await? {
                changes.push(Change::deleted(have, "its pod set changed"));
            }
            return Ok(Some(held(
                "WorkloadChanged",
                "the job's pods changed while Kueue held quota for the old ones: its Workload is queued again",
            )));
        }
    }
    let made = Change::created(&want);
    let updated = Change::updated(&want);
    match apply::apply(&shared.client, &shared.writes, want, wl.as_deref()).await? {
        Outcome::Unchanged => {}
        Outcome::Created => changes.push(made),
        Outcome::Updated => changes.push(updated),
    }

    if let Some(have) = wl.as_deref() {
        let mut patch = None;
        if kueue::active_pods(pods) == 0 {
            patch = kueue::clear_reservation(have, now);
        }
        // One status write per reconcile: the next one (woken by the Workload's watch) reads
        // the resourceVersion this one made.
        if patch.is_none() {
            patch = kueue::pods_ready(have, kueue::all_pods_ready(pods, job.spec.workers), now);
        }
        if let Some(patch) = patch {
            shared.writes.status.inc();
            kueue::patch_workload_status(&shared.client, have, &patch).await?;
            changes.push(Change::updated(have));
        }
    }
    Ok(Some(kueue::gate(queue, wl.as_deref())))
}

/// Marks the Workload of a job that has just finished (or had finished) Finished.
pub async fn after_finish(
    q: &Queued<'_>,
    phase: JobPhase,
    message: &str,
    now: &Time,
    changes: &mut Changes,
) -> Result<()> {
    let (shared, store, job, owner) = (q.shared, q.store, q.job, q.owner);
    let Some(wl) = workload_of(store, job, owner) else {
        return Ok(());
    };
    if !phase.is_finished() {
        return Ok(());
    }
    let reason = if phase == JobPhase::Succeeded {
        "Succeeded"
    } else {
        "Failed"
    };
    if let Some(patch) = kueue::finish(&wl, reason, message, now) {
        shared.writes.status.inc();
        kueue::patch_workload_status(&shared.client, &wl, &patch).await?;
        changes.push(Change::updated(wl.as_ref()));
    }
    Ok(())
}

/// Places new pods on the admitted flavors. A flavor that conflicts with the pods' own node
/// selector finishes the Workload with reason `FailedToStart`, as the jobframework does, and no
/// pod is created.
pub async fn place(
    q: &Queued<'_>,
    flavors: &[String],
    pods: &mut [(i32, Pod)],
    now: &Time,
) -> Result<bool> {
    let (shared, store, job, owner) = (q.shared, q.store, q.job, q.owner);
    let placed = kueue::flavors(&shared.client, flavors).await?;
    for (_, pod) in pods.iter_mut() {
        if let Err(message) = kueue::place(pod, &placed) {
            if let Some(wl) = workload_of(store, job, owner) {
                if let Some(patch) = kueue::finish(&wl, "FailedToStart", &message, now) {
                    shared.writes.status.inc();
                    kueue::patch_workload_status(&shared.client, &wl, &patch).await?;
                }
            }
            return Ok(false);
        }
    }
    Ok(true)
}
