//! The TrainingJob reconciler: fetch -> build -> apply the Service -> decide -> delete and create
//! pods -> status.
//!
//! # Writes, in order, and what a crash between them does
//!
//! 1. The `kueue.x-k8s.io/queue-name` label on the TrainingJob itself (once, when `scheduling.queue`
//!    is set and the label is missing), by server-side apply of metadata only, after the build: a
//!    spec that cannot run writes nothing but its status.
//! 2. The headless Service, by server-side apply when it differs from the cache.
//! 3. Pod deletions (restarts, cleanup, suspend, orphans), each with a uid precondition.
//! 4. Pod creations (`create_once`: a pod is never updated, so a spec edit never re-creates a
//!    running worker).
//! 5. The status, through `/status`, only when it differs.
//!
//! A retried failure is a deletion (3) followed by the restart count in the status (5). Deleting first
//! means a crash (or a failed status write) between the two loses that one increment: the failed pod
//! is gone, so nothing counts it again, and the job gets at most one more retry than
//! `backoffLimit`. The other order would count the restart twice after the crash (the failed pod is
//! still there) and could fail a job that had retries left. Everything else converges on the next
//! reconcile: pods and the Service are recomputed from the spec, and the phase of a finished job is
//! read back from its status.
//!
//! # Stale caches
//!
//! What this process wrote that the caches may not show yet is kept in [`super::expectations`].

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};

use super::build::{build, LABEL_QUEUE};
use super::decide::{decide, DeleteReason, Deletion, Observed};
use super::expectations::Expectations;
use super::status::{invalid, status};
use crate::cachedpod::CachedPod;
use crate::error::{Error, Result, CHILD_REFUSED};
use crate::runtime::apply::{self, Outcome};
use crate::runtime::controller::{
    cached, child_cache, child_cache_trimmed, children_of, error_policy, key, owner_of,
    parent_controller, timed, ChildStore, Shared, Synced, RESYNC,
};
use keelson_api::conditions::{self, READY};
use keelson_api::meta::{Owner, FIELD_MANAGER};
use keelson_api::trainingjob::{JobPhase, TrainingJob, TrainingJobStatus};

/// Most pod writes in flight at once for one job. Creations start with one and double up to this
/// (slow start, as the Job controller does), so a quota or admission error costs one call, not
/// one per rank.
const MAX_BATCH: usize = 16;

/// The TrainingJob controller's context: shared state, the child caches and the expectations (writes
/// the caches may not show yet).
pub struct Ctx {
    pub shared: Arc<Shared>,
    pub pods: ChildStore<CachedPod>,
    pub services: ChildStore<Service>,
    /// Whether the child caches have been listed.
    pub synced: Synced,
    expectations: Expectations,
}

/// Runs the TrainingJob controller until `shutdown` resolves.
pub async fn run(
    shared: Arc<Shared>,
    concurrency: u16,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let jobs = Api::<TrainingJob>::all(shared.client.clone());
    run_with_api(shared, jobs, concurrency, shutdown).await;
}

/// Runs the TrainingJob controller over the jobs of `jobs` (e.g. one namespace, for a test that
/// shares a cluster) until `shutdown` resolves.
pub async fn run_with_api(
    shared: Arc<Shared>,
    jobs: Api<TrainingJob>,
    concurrency: u16,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = shared.client.clone();
    // Pods are created once and never compared with what is wanted: the cache keeps what is read
    // of them (`CachedPod`: no spec), and no annotations.
    let (pods, pod_events) = child_cache_trimmed(&client, "TrainingJob", |p: &mut CachedPod| {
        p.metadata.annotations = None;
    });
    let (services, svc_events) = child_cache::<Service>(&client, "TrainingJob");
    let controller = parent_controller(jobs, concurrency);
    let synced = {
        let (p, s) = (pods.clone(), services.clone());
        Synced::spawn(async move {
            tokio::try_join!(p.wait_until_ready(), s.wait_until_ready()).map(|_| ())
        })
    };
    shared.track(synced.clone());
    let metrics = shared.metrics.clone();
    let ctx = Arc::new(Ctx {
        shared: shared.clone(),
        pods,
        services,
        synced,
        expectations: Expectations::new(controller.store()),
    });
    controller
        .watches_stream(pod_events, |c| owner_of::<TrainingJob, _>(&c))
        .watches_stream(svc_events, |c| owner_of::<TrainingJob, _>(&c))
        .graceful_shutdown_on(shutdown)
        .run(
            move |o, c| timed(metrics.clone(), "TrainingJob", reconcile(o, c)),
            |job, err, ctx| error_policy(job.as_ref(), err, &ctx.shared),
            ctx,
        )
        .for_each(|r| shared.finished(r))
        .await;
}

fn now() -> Time {
    Time(Timestamp::now())
}

/// Adds the queue label to the TrainingJob itself, so that Kueue finds the job. Server-side apply
/// of that one label: the operator owns it and nothing else of the object's metadata.
async fn label_queue(shared: &Shared, job: &TrainingJob, ns: &str, queue: &str) -> Result<()> {
    let api: Api<TrainingJob> = Api::namespaced(shared.client.clone(), ns);
    let body = serde_json::json!({
        "apiVersion": TrainingJob::api_version(&()),
        "kind": TrainingJob::kind(&()),
        "metadata": {"name": job.name_any(), "labels": {LABEL_QUEUE: queue}},
    });
    shared.writes.apply.inc();
    api.patch(
        &job.name_any(),
        &PatchParams::apply(FIELD_MANAGER),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

/// Deletes the pods of `dels`, a few at a time, with an Event each. Returns the names of the pods
/// deleted now, and the deletions that failed with their error. A pod found already gone (or
/// replaced) counts as done: its uid is remembered either way.
async fn delete_pods(
    ctx: &Ctx,
    job: &TrainingJob,
    dels: Vec<Deletion>,
) -> (Vec<String>, Vec<(Deletion, Error)>) {
    let shared = &ctx.shared;
    let results: Vec<(Deletion, Result<bool>)> = futures::stream::iter(dels)
        .map(|d| async move {
            let r = apply::delete(&shared.client, &shared.writes, d.pod.as_ref()).await;
            if let Ok(true) = r {
                let (warning, reason) = match d.reason {
                    DeleteReason::Restart => (true, "WorkerFailed"),
                    _ => (false, "PodDeleted"),
                };
                shared.event(job, warning, reason, d.message.clone()).await;
            }
            (d, r)
        })
        .buffer_unordered(MAX_BATCH)
        .collect()
        .await;
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for (d, r) in results {
        match r {
            Ok(now_deleted) => {
                if let Some(uid) = d.pod.uid() {
                    ctx.expectations.remember_deleted(job, uid);
                }
                if now_deleted {
                    done.push(format!("deleted pod {} ({:?})", d.pod.name_any(), d.reason));
                }
            }
            Err(e) => failed.push((d, e)),
        }
    }
    (done, failed)
}

/// Creates `pods` (rank, pod) with slow start, and records one Event that names every pod created.
/// Returns the pods created, as the API server stored them (as the cache keeps them), and the
/// first error.
async fn create_pods(
    shared: &Shared,
    job: &TrainingJob,
    pods: Vec<(i32, Pod)>,
) -> (Vec<Arc<CachedPod>>, Option<Error>) {
    let mut created: Vec<String> = Vec::new();
    let mut made: Vec<Arc<CachedPod>> = Vec::new();
    let mut first_err = None;
    let mut batch = 1;
    let mut rest = pods.into_iter();
    loop {
        let chunk: Vec<(i32, Pod)> = rest.by_ref().take(batch).collect();
        if chunk.is_empty() {
            break;
        }
        let results = futures::future::join_all(chunk.into_iter().map(|(rank, pod)| async move {
            let name = pod.name_any();
            let r = apply::create_returning(&shared.client, &shared.writes, pod).await;
            (format!("{name} (rank {rank})"), r)
        }))
        .await;
        for (what, r) in results {
            match r {
                Ok(Some(pod)) => {
                    made.push(Arc::new(CachedPod::from(pod)));
                    created.push(what);
                }
                Ok(None) => {}
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if first_err.is_some() {
            break;
        }
        batch = (batch * 2).min(MAX_BATCH);
    }
    if !created.is_empty() {
        shared
            .event(job, false, "PodCreated", created_note(&created))
            .await;
    }
    (made, first_err)
}

/// The note of a PodCreated Event, within the 1 kB an Event's note may hold.
fn created_note(created: &[String]) -> String {
    const MAX: usize = 900;
    let mut note = format!("created pod{}", if created.len() == 1 { "" } else { "s" });
    for (i, what) in created.iter().enumerate() {
        if note.len() + what.len() + 2 > MAX {
            note.push_str(&format!(" and {} more", created.len() - i));
            break;
        }
        note.push_str(if i == 0 { " " } else { ", " });
        note.push_str(what);
    }
    note
}

/// Records the Event of a phase change.
async fn phase_event(
    shared: &Shared,
    job: &TrainingJob,
    st: &TrainingJobStatus,
    d_outcome: Option<&(String, String)>,
) {
    let Some(phase) = st.phase else { return };
    match (phase, d_outcome) {
        (JobPhase::Failed, Some((reason, message))) => {
            shared.event(job, true, reason, message.clone()).await;
        }
        (JobPhase::Succeeded, Some((reason, message))) => {
            shared.event(job, false, reason, message.clone()).await;
        }
        _ => {
            let p = format!("{phase:?}");
            shared
                .event_as(job, false, "PhaseChanged", &p, format!("phase is now {p}"))
                .await;
        }
    }
}

/// One reconcile of one TrainingJob.
#[tracing::instrument(skip_all, fields(kind = "TrainingJob", namespace = job.namespace().unwrap_or_default(), name = job.name_any()))]
pub async fn reconcile(job: Arc<TrainingJob>, ctx: Arc<Ctx>) -> Result<Action> {
    if job.metadata.deletion_timestamp.is_some() {
        ctx.expectations.forget(&job);
        return Ok(Action::await_change());
    }
    let owner = Owner::of(job.as_ref()).ok_or_else(|| Error::MissingMeta(job.name_any()))?;
    // Decisions are taken from the child caches: never from caches that have not listed yet.
    ctx.synced.wait().await?;
    let shared = &ctx.shared;
    let client = &shared.client;
    let ns = owner.namespace.as_str();
    let now = now();
    let mut changed: Vec<String> = Vec::new();

    let listed = children_of(&ctx.pods, ns, &owner.name);
    let (prev, deleted, created) = ctx.expectations.recall(&job, &listed, Instant::now());
    let pods: Vec<Arc<Pod>> = listed
        .iter()
        .chain(&created)
        .map(|p| Arc::new(p.to_pod()))
        .collect();

    let children = match build(&job, &owner) {
        Ok(c) => c,
        Err(e) => {
            let st = invalid(&job, &prev, &e, &now);
            if apply::patch_status(client, &shared.writes, job.as_ref(), Some(&prev), &st).await? {
                ctx.expectations.remember_written(&job, st, Instant::now());
                shared
                    .event(job.as_ref(), true, e.reason, e.to_string())
                    .await;
                tracing::info!(reason = e.reason, error = %e, "spec cannot be reconciled");
            }
            shared.succeeded(&key(job.as_ref()));
            return Ok(Action::await_change());
        }
    };

    if let Some(queue) = job
        .spec
        .scheduling
        .as_ref()
        .and_then(|s| s.queue.as_deref())
    {
        if !job.labels().contains_key(LABEL_QUEUE) {
            label_queue(shared, &job, ns, queue).await?;
            changed.push(format!("labelled with queue {queue}"));
        }
    }

    let existing_svc = cached(&ctx.services, ns, &owner.name);
    if apply::apply(
        client,
        &shared.writes,
        children.service,
        existing_svc.as_deref(),
    )
    .await?
        != Outcome::Unchanged
    {
        changed.push("applied Service".into());
    }

    let mut observed = Observed { pods, deleted };
    let mut decision = decide(&job, &prev, &observed, &now);

    // Deletions first, then the status that counts them (see the module docs).
    let (done, failed) = delete_pods(&ctx, &job, decision.delete.clone()).await;
    let mut first_err: Option<Error> = None;
    for (d, e) in failed {
        if let Some(uid) = d.pod.uid() {
            decision.undo_restart(&uid);
        }
        first_err.get_or_insert(e);
    }
    changed.extend(done);

    if first_err.is_none() && !decision.create.is_empty() {
        let wanted: HashSet<i32> = decision.create.iter().copied().collect();
        let to_create: Vec<(i32, Pod)> = children
            .pods
            .into_iter()
            .zip(0..)
            .filter(|(_, rank)| wanted.contains(rank))
            .map(|(p, rank)| (rank, p))
            .collect();
        let (created, err) = create_pods(shared, &job, to_create).await;
        if !created.is_empty() {
            changed.push(format!("created {} pod(s)", created.len()));
            // The status below counts them, and the next reconciles too until the cache lists them.
            ctx.expectations
                .remember_created(&job, &created, Instant::now());
            observed
                .pods
                .extend(created.iter().map(|p| Arc::new(p.to_pod())));
        }
        if let Some(e) = err {
            first_err.get_or_insert(e);
        }
    }

    decision.refused = first_err.as_ref().and_then(Error::refusal);
    let st = status(&job, &prev, &observed, &decision, &now);
    if st != prev && st.phase == prev.phase && first_err.is_none() {
        if let Some(wait) = ctx.expectations.batch_wait(&job, Instant::now()) {
            if !changed.is_empty() {
                tracing::info!(changes = ?changed, "reconciled");
            }
            tracing::debug!(?wait, "progress written within the last second: batched");
            shared.succeeded(&key(job.as_ref()));
            return Ok(Action::requeue(wait));
        }
    }
    if apply::patch_status(client, &shared.writes, job.as_ref(), Some(&prev), &st).await? {
        if prev.phase != st.phase {
            // A new job's first phase, Pending, needs no Event of its own: PodCreated says it.
            if prev.phase.is_some() || st.phase != Some(JobPhase::Pending) {
                phase_event(shared, &job, &st, decision.outcome.as_ref()).await;
            }
            changed.push(format!("phase {:?}", st.phase.unwrap_or_default()));
        }
        let refused_now = |s: &TrainingJobStatus| {
            conditions::find(&s.conditions, READY).is_some_and(|c| c.reason == CHILD_REFUSED)
        };
        if let (Some(e), false) = (&decision.refused, refused_now(&prev)) {
            if refused_now(&st) {
                shared
                    .event(job.as_ref(), true, e.reason, e.to_string())
                    .await;
            }
        }
        ctx.expectations.remember_written(&job, st, Instant::now());
        changed.push("status".into());
    }
    if let Some(e) = first_err {
        if !changed.is_empty() {
            tracing::info!(changes = ?changed, "reconciled in part");
        }
        return Err(e);
    }

    if decision.delete_job {
        shared
            .event(
                job.as_ref(),
                false,
                "TTLExpired",
                "runPolicy.ttlSecondsAfterFinished has passed since the job finished: deleting it"
                    .into(),
            )
            .await;
        if apply::delete(client, &shared.writes, job.as_ref()).await? {
            changed.push("deleted the finished job (ttlSecondsAfterFinished)".into());
        }
        ctx.expectations.forget(&job);
        tracing::info!(changes = ?changed, "reconciled");
        shared.succeeded(&key(job.as_ref()));
        return Ok(Action::await_change());
    }

    if !changed.is_empty() {
        tracing::info!(changes = ?changed, "reconciled");
    }
    shared.succeeded(&key(job.as_ref()));
    Ok(Action::requeue(
        decision.requeue_after.map_or(RESYNC, |d| d.min(RESYNC)),
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn one_created_event_names_every_pod_within_the_note_limit() {
        let few: Vec<String> = (0..4).map(|r| format!("j-worker-{r} (rank {r})")).collect();
        assert_eq!(
            created_note(&few),
            "created pods j-worker-0 (rank 0), j-worker-1 (rank 1), j-worker-2 (rank 2), j-worker-3 (rank 3)"
        );
        assert_eq!(created_note(&few[..1]), "created pod j-worker-0 (rank 0)");
        let many: Vec<String> = (0..500)
            .map(|r| format!("a-long-job-name-worker-{r} (rank {r})"))
            .collect();
        let note = created_note(&many);
        assert!(note.len() <= 1024, "{}", note.len());
        assert!(note.ends_with(" more"), "{note}");
    }
}
