//! The TrainingJob reconciler: fetch -> build -> apply the Service -> decide -> delete and create
//! pods -> status.
//!
//! # Writes, in order, and what a crash between them does
//!
//! 1. The `kueue.x-k8s.io/queue-name` label on the TrainingJob itself (once, when `scheduling.queue`
//!    is set and the label is missing), by server-side apply of metadata only.
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
//! The pod cache may still show a pod this process deleted, may not show yet a pod it created, and
//! the job cache may still show the status from before this process's last write. [`Ctx`] keeps all
//! three in memory per job: the uids of deleted pods (treated as gone, so a failure is never counted
//! twice), the pods created (as the API server returned them, counted as there until the cache lists
//! them or [`CREATED_TTL`] passes, so a reconcile in between neither creates them again nor writes a
//! status that misses them), and the last status written (used as the previous status until the
//! cache shows it, so a restart count never goes back and a finished job never looks unfinished). The memory is dropped when the cache catches up or the job
//! is gone; after a restart of the operator the caches are freshly listed, so nothing is lost.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Resource, ResourceExt};

use super::build::{build, LABEL_QUEUE};
use super::decide::{decide, DeleteReason, Deletion, Observed};
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

/// Progress within a phase (worker counts, a condition's message) is written at most this often
/// per job, as the Job controller batches pod events (`syncJobBatchPeriod`): the pods of a job that
/// start together make one status write, not one each. A phase change is written at once.
const STATUS_BATCH: Duration = Duration::from_secs(1);

/// How long a pod this process created counts as there while the pod cache does not list it (the
/// Job controller's expectations wait 5 minutes): past it, a pod deleted before the cache ever saw it
/// is created again.
const CREATED_TTL: Duration = Duration::from_secs(60);

/// What the reconciler remembers about one job between reconciles (see the module docs).
#[derive(Debug, Default)]
struct Memory {
    uid: String,
    /// Pods deleted by this process that the cache may still list.
    deleted: HashSet<String>,
    /// Pods created by this process (as the cache keeps them) that the cache may not list yet.
    created: Vec<(Arc<CachedPod>, Instant)>,
    /// The last status written, until the job cache shows it.
    written: Option<TrainingJobStatus>,
    /// The resourceVersion of the job that status was written over. A cache that shows another
    /// version has seen that write, or a later one (perhaps another manager's): it is the truth.
    written_over: Option<String>,
    /// When this process last wrote the job's status.
    written_at: Option<Instant>,
}

/// The TrainingJob controller's context: shared state, the child caches and the memory of writes
/// the caches may not show yet.
pub struct Ctx {
    pub shared: Arc<Shared>,
    pub pods: ChildStore<CachedPod>,
    pub services: ChildStore<Service>,
    /// Whether the child caches have been listed.
    pub synced: Synced,
    memory: Memories,
}

/// The per-job [`Memory`], pruned against the job cache.
struct Memories {
    jobs: Store<TrainingJob>,
    map: Mutex<HashMap<ObjectRef<TrainingJob>, Memory>>,
    recalls: std::sync::atomic::AtomicUsize,
}

impl Memories {
    fn new(jobs: Store<TrainingJob>) -> Self {
        Memories {
            jobs,
            map: Mutex::new(HashMap::new()),
            recalls: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<ObjectRef<TrainingJob>, Memory>) -> T) -> T {
        f(&mut crate::runtime::lock(&self.map))
    }

    /// The status to decide from, the pods already deleted, and the pods created that the cache does
    /// not list yet. Also drops the memory of jobs that are gone, of deleted pods the cache no longer
    /// lists, and of created pods it lists (or that outlived [`CREATED_TTL`]).
    fn recall(
        &self,
        job: &TrainingJob,
        pods: &[Arc<CachedPod>],
        now: Instant,
    ) -> (TrainingJobStatus, HashSet<String>, Vec<Arc<CachedPod>>) {
        let uid = job.uid().unwrap_or_default();
        let from_cache = job.status.clone().unwrap_or_default();
        let jobs = &self.jobs;
        // The sweep of memories of jobs that are gone runs once every len() recalls: constant
        // work per reconcile on average, where a sweep on every recall made a burst of N jobs N².
        let due = self
            .recalls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        self.with(|mem| {
            if due >= mem.len() {
                self.recalls.store(0, std::sync::atomic::Ordering::Relaxed);
                mem.retain(|r, m| {
                    jobs.get(r)
                        .is_some_and(|j| j.uid().as_deref() == Some(&m.uid))
                });
            }
            let here = ObjectRef::from_obj(job);
            if mem.get(&here).is_some_and(|m| m.uid != uid) {
                mem.remove(&here);
            }
            let Some(m) = mem.get_mut(&here) else {
                return (from_cache, HashSet::new(), Vec::new());
            };
            let listed: HashSet<String> = pods.iter().filter_map(|p| p.uid()).collect();
            m.deleted.retain(|u| listed.contains(u));
            if !m.created.is_empty() {
                // Listed under its name (the pod, or a pod made in its place): the cache knows.
                let names: HashSet<&str> = pods
                    .iter()
                    .filter_map(|p| p.metadata.name.as_deref())
                    .collect();
                m.created.retain(|(p, at)| {
                    now.saturating_duration_since(*at) < CREATED_TTL
                        && !p
                            .metadata
                            .name
                            .as_deref()
                            .is_some_and(|n| names.contains(n))
                });
            }
            let created = m.created.iter().map(|(p, _)| p.clone()).collect();
            if m.written.as_ref() == Some(&from_cache) || job.resource_version() != m.written_over {
                m.written = None;
            }
            let prev = m.written.clone().unwrap_or(from_cache);
            (prev, m.deleted.clone(), created)
        })
    }

    fn entry<T>(&self, job: &TrainingJob, f: impl FnOnce(&mut Memory) -> T) -> T {
        let uid = job.uid().unwrap_or_default();
        self.with(|mem| {
            let m = mem.entry(ObjectRef::from_obj(job)).or_default();
            if m.uid != uid {
                *m = Memory {
                    uid,
                    ..Memory::default()
                };
            }
            f(m)
        })
    }

    fn remember_deleted(&self, job: &TrainingJob, pod_uid: String) {
        self.entry(job, |m| m.deleted.insert(pod_uid));
    }

    fn remember_created(&self, job: &TrainingJob, pods: &[Arc<CachedPod>], at: Instant) {
        self.entry(job, |m| {
            m.created.extend(pods.iter().map(|p| (p.clone(), at)));
        });
    }

    fn remember_written(&self, job: &TrainingJob, st: TrainingJobStatus, at: Instant) {
        let over = job.resource_version();
        self.entry(job, |m| {
            m.written = Some(st);
            m.written_over = over;
            m.written_at = Some(at);
        });
    }

    /// How long a progress write must wait to keep to one per [`STATUS_BATCH`], if at all.
    fn batch_wait(&self, job: &TrainingJob, now: Instant) -> Option<Duration> {
        let last = self.entry(job, |m| m.written_at)?;
        STATUS_BATCH
            .checked_sub(now.saturating_duration_since(last))
            .filter(|d| !d.is_zero())
    }

    fn forget(&self, job: &TrainingJob) {
        self.with(|mem| mem.remove(&ObjectRef::from_obj(job)));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.with(|mem| mem.len())
    }
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
        memory: Memories::new(controller.store()),
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
                    ctx.memory.remember_deleted(job, uid);
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
        ctx.memory.forget(&job);
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

    let listed = children_of(&ctx.pods, ns, &owner.name);
    let (prev, deleted, created) = ctx.memory.recall(&job, &listed, Instant::now());
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
                ctx.memory.remember_written(&job, st, Instant::now());
                shared
                    .event(job.as_ref(), true, e.reason, e.to_string())
                    .await;
                tracing::info!(reason = e.reason, error = %e, "spec cannot be reconciled");
            }
            shared.succeeded(&key(job.as_ref()));
            return Ok(Action::await_change());
        }
    };

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
            ctx.memory.remember_created(&job, &created, Instant::now());
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
        if let Some(wait) = ctx.memory.batch_wait(&job, Instant::now()) {
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
        ctx.memory.remember_written(&job, st, Instant::now());
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
        ctx.memory.forget(&job);
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
    use crate::podstatus::fixtures;
    use keelson_api::trainingjob::TrainingJobSpec;
    use kube::runtime::{reflector, watcher};

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

    fn job(uid: &str, st: Option<TrainingJobStatus>) -> TrainingJob {
        let mut j = TrainingJob::new("resnet", TrainingJobSpec::default());
        j.metadata.namespace = Some("team-a".into());
        j.metadata.uid = Some(uid.into());
        j.status = st;
        j
    }

    fn restarts(n: i32) -> TrainingJobStatus {
        TrainingJobStatus {
            phase: Some(JobPhase::Restarting),
            restarts: n,
            ..TrainingJobStatus::default()
        }
    }

    #[test]
    fn progress_is_written_at_most_once_per_batch_period() {
        let (store, mut writer) = reflector::store::<TrainingJob>();
        let mem = Memories::new(store);
        let j = job("u1", None);
        writer.apply_watcher_event(&watcher::Event::Apply(j.clone()));
        let t0 = Instant::now();
        assert_eq!(mem.batch_wait(&j, t0), None, "nothing written yet");
        mem.remember_written(&j, restarts(0), t0);
        let wait = mem.batch_wait(&j, t0 + Duration::from_millis(300));
        assert_eq!(wait, Some(Duration::from_millis(700)));
        assert_eq!(mem.batch_wait(&j, t0 + STATUS_BATCH), None);
    }

    #[test]
    fn memory_covers_a_stale_cache_until_it_catches_up() {
        let (store, mut writer) = reflector::store::<TrainingJob>();
        let mem = Memories::new(store);
        let stale = job("u1", Some(restarts(1)));
        writer.apply_watcher_event(&watcher::Event::Apply(stale.clone()));
        let failed = Arc::new(CachedPod::from(fixtures::finished("resnet-worker-0", 1)));
        let pods = vec![failed.clone()];

        // Nothing remembered: the cache is the truth.
        assert_eq!(
            mem.recall(&stale, &pods, Instant::now()),
            (restarts(1), HashSet::new(), Vec::new())
        );

        // This process deleted the failed pod and wrote restarts 2; the caches lag behind.
        mem.remember_deleted(&stale, "uid-resnet-worker-0".into());
        mem.remember_written(&stale, restarts(2), Instant::now());
        let (prev, deleted, _) = mem.recall(&stale, &pods, Instant::now());
        assert_eq!(prev, restarts(2));
        assert!(deleted.contains("uid-resnet-worker-0"));

        // The pod is gone from the cache and the job cache shows the write: nothing left to remember.
        let fresh = job("u1", Some(restarts(2)));
        writer.apply_watcher_event(&watcher::Event::Apply(fresh.clone()));
        let (prev, deleted, _) = mem.recall(&fresh, &[], Instant::now());
        assert_eq!(prev, restarts(2));
        assert!(deleted.is_empty());
        assert!(mem.with(|m| m
            .values()
            .all(|x| x.written.is_none() && x.deleted.is_empty())));
    }

    #[test]
    fn a_cache_past_the_write_is_the_truth_even_when_another_manager_wrote() {
        let (store, mut writer) = reflector::store::<TrainingJob>();
        let mem = Memories::new(store);
        let mut seen = job("u1", Some(restarts(1)));
        seen.metadata.resource_version = Some("10".into());
        writer.apply_watcher_event(&watcher::Event::Apply(seen.clone()));
        mem.remember_written(&seen, restarts(2), Instant::now());
        // Still version 10: the cache has not seen the write.
        assert_eq!(mem.recall(&seen, &[], Instant::now()).0, restarts(2));
        // Version 12 with another manager's status: that is what the next decision starts from.
        let mut other = job("u1", Some(restarts(7)));
        other.metadata.resource_version = Some("12".into());
        writer.apply_watcher_event(&watcher::Event::Apply(other.clone()));
        assert_eq!(mem.recall(&other, &[], Instant::now()).0, restarts(7));
    }

    #[test]
    fn memory_of_a_deleted_or_replaced_job_is_dropped() {
        let (store, mut writer) = reflector::store::<TrainingJob>();
        let mem = Memories::new(store);
        let old = job("u1", None);
        writer.apply_watcher_event(&watcher::Event::Apply(old.clone()));
        mem.remember_written(&old, restarts(3), Instant::now());
        assert_eq!(mem.len(), 1);

        // Re-created under the same name: the old job's status is not carried over.
        let new = job("u2", None);
        writer.apply_watcher_event(&watcher::Event::Apply(new.clone()));
        assert_eq!(
            mem.recall(&new, &[], Instant::now()).0,
            TrainingJobStatus::default()
        );
        assert_eq!(mem.len(), 0);

        mem.remember_written(&new, restarts(1), Instant::now());
        writer.apply_watcher_event(&watcher::Event::Delete(new.clone()));
        let other = job("u3", None);
        let mut other = other;
        other.metadata.name = Some("other".into());
        writer.apply_watcher_event(&watcher::Event::Apply(other.clone()));
        mem.recall(&other, &[], Instant::now());
        assert_eq!(mem.len(), 0);
        mem.remember_written(&other, restarts(1), Instant::now());
        mem.forget(&other);
        assert_eq!(mem.len(), 0);
    }

    #[test]
    fn created_pods_count_until_the_cache_lists_them() {
        let (store, mut writer) = reflector::store::<TrainingJob>();
        let mem = Memories::new(store);
        let j = job("u1", None);
        writer.apply_watcher_event(&watcher::Event::Apply(j.clone()));
        let made = Arc::new(CachedPod::from(fixtures::finished("resnet-worker-0", 0)));
        let t0 = Instant::now();
        mem.remember_created(&j, std::slice::from_ref(&made), t0);

        // The cache does not list it yet: it counts as there.
        let (_, _, created) = mem.recall(&j, &[], t0 + Duration::from_secs(1));
        assert_eq!(created.len(), 1);
        // Listed (under its name): the cache is the truth again.
        let (_, _, created) =
            mem.recall(&j, std::slice::from_ref(&made), t0 + Duration::from_secs(2));
        assert!(created.is_empty());

        // Never listed: forgotten after CREATED_TTL, so that a pod deleted unseen is made again.
        mem.remember_created(&j, std::slice::from_ref(&made), t0);
        let (_, _, created) = mem.recall(&j, &[], t0 + CREATED_TTL - Duration::from_secs(1));
        assert_eq!(created.len(), 1);
        let (_, _, created) = mem.recall(&j, &[], t0 + CREATED_TTL);
        assert!(created.is_empty());
    }
}
