//! The TrainingJob reconciler: fetch -> build -> apply the Service -> decide -> delete and create
//! pods -> status.
//!
//! # Writes, in order, and what a crash between them does
//!
//! 1. The `kueue.x-k8s.io/queue-name` label on the TrainingJob itself (once, when `scheduling.queue`
//!    is set and the label is missing), by server-side apply of metadata only, after the build: a
//!    spec that cannot run writes nothing but its status.
//! 2. The headless Service, by server-side apply when it differs from the cache; then the Kueue
//!    Workload, and the PodGroup of a gang job ([`super::gang`]): no pod is created until the
//!    group is stored.
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
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};

use super::admission;
use super::build::Children;
use super::build::{build, LABEL_QUEUE};
use super::decide::{decide, Decision, DeleteReason, Deletion, Observed};
use super::expectations::Expectations;
use super::gang::{self, Read};
use super::kueue::{self, Gate, Workload};
use super::status::{invalid, status};
use crate::cachedpod::CachedPod;
use crate::error::{BuildError, Error, Result, CHILD_REFUSED};
use crate::runtime::apply::{self, Outcome};
use crate::runtime::controller::{
    cached, child_cache, children_of, parent_controller, ChildStore, Shared, Synced, RESYNC,
};
use crate::runtime::driver::{self, Applied, Change, Changes, Kind, Next, Note};
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
    /// The jobs' Kueue Workloads; `None` when the API server does not serve them.
    pub workloads: Option<ChildStore<Workload>>,
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
    // of them (`CachedPod`, decoded without the spec and what else is never read).
    let (pods, pod_events) = child_cache::<CachedPod, TrainingJob>(&client);
    let (services, svc_events) = child_cache::<Service, TrainingJob>(&client);
    let (workloads, wl_events) = if kueue::served(&client).await {
        let (store, events) = child_cache::<Workload, TrainingJob>(&client);
        (Some(store), events.boxed())
    } else {
        (None, futures::stream::pending().boxed())
    };
    let controller = parent_controller(jobs, concurrency);
    let synced = {
        let (p, s, w) = (pods.clone(), services.clone(), workloads.clone());
        Synced::spawn(async move {
            let w = async {
                match w {
                    Some(w) => w.wait_until_ready().await,
                    None => Ok(()),
                }
            };
            tokio::try_join!(p.wait_until_ready(), s.wait_until_ready(), w).map(|_| ())
        })
    };
    shared.track(synced.clone());
    let ctx = Arc::new(Ctx {
        shared: shared.clone(),
        pods,
        services,
        workloads,
        synced,
        expectations: Expectations::new(controller.store()),
    });
    let controller = controller
        .reconcile_on(pod_events)
        .reconcile_on(svc_events)
        .reconcile_on(wl_events);
    driver::run_controller(controller, ctx, shared, shutdown).await;
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
) -> (Vec<Change>, Vec<(Deletion, Error)>) {
    let shared = &ctx.shared;
    let results: Vec<(Deletion, Result<bool>)> = futures::stream::iter(dels)
        .map(|d| async move {
            let r = apply::delete(&shared.client, &shared.writes, d.pod.as_ref()).await;
            if let Ok(true) = r {
                driver::record(shared, job, deletion_note(&d));
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
                    done.push(Change::deleted(d.pod.as_ref(), format!("{:?}", d.reason)));
                }
            }
            Err(e) => failed.push((d, e)),
        }
    }
    (done, failed)
}

/// The Event of one pod deletion, about that pod. Events of one object fold into a series by type,
/// reason, action and related object, and a series shows its first note only: about the pod, the
/// failures of two ranks (or of one rank's two attempts) are two Events that each say which pod
/// failed and how, instead of one Event that counts two and names the first.
fn deletion_note(d: &Deletion) -> Note {
    let note = match d.reason {
        DeleteReason::Restart => Note::warning("WorkerFailed", d.message.clone()),
        _ => Note::normal("PodDeleted", d.message.clone()),
    };
    note.about(d.pod.object_ref(&()))
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
        driver::record(
            shared,
            job,
            Note::normal("PodCreated", created_note(&created)),
        );
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

/// The Event of a phase change.
fn phase_note(st: &TrainingJobStatus, outcome: Option<&(String, String)>) -> Option<Note> {
    let phase = st.phase?;
    Some(match (phase, outcome) {
        (JobPhase::Failed, Some((reason, message))) => {
            Note::warning(reason.clone(), message.clone())
        }
        (JobPhase::Succeeded, Some((reason, message))) => {
            Note::normal(reason.clone(), message.clone())
        }
        _ => {
            let p = format!("{phase:?}");
            Note::normal("PhaseChanged", format!("phase is now {p}")).action(p)
        }
    })
}

/// Whether a phase change is the ordinary course of a job, which gets no Event of its own: Pending
/// (PodCreated says it), and Running after Pending (the Running condition's `lastTransitionTime`
/// says when). A job that starts costs one Event; a restart, a suspension and the outcome get theirs.
fn ordinary_course(prev: Option<JobPhase>, new: Option<JobPhase>) -> bool {
    match new {
        Some(JobPhase::Pending) => true,
        Some(JobPhase::Running) => matches!(prev, None | Some(JobPhase::Pending)),
        _ => false,
    }
}

/// Whether `new` differs from `prev` only within the phase (worker counts, a condition that moves
/// while the phase stays), so that it can wait until it has lasted (see [`super::expectations::SETTLE`]).
/// A new phase, generation, restart count, start or completion time is written at once.
fn within_phase(prev: &TrainingJobStatus, new: &TrainingJobStatus) -> bool {
    prev.phase.is_some()
        && prev.phase == new.phase
        && prev.observed_generation == new.observed_generation
        && prev.restarts == new.restarts
        && prev.start_time == new.start_time
        && prev.completion_time == new.completion_time
        && prev.gpus == new.gpus
}

/// What a TrainingJob reconcile reads before it builds: the status to decide from and the pods,
/// both as the caches show them corrected by the [`Expectations`].
pub struct Recalled {
    prev: TrainingJobStatus,
    observed: Observed,
    /// The time the decision and the status are taken at.
    now: Time,
}

/// What the writes left: the pods that now exist, and the decision that was carried out (none
/// when a write before it failed).
pub struct Done {
    observed: Observed,
    decision: Option<Decision>,
    /// Kueue holds the job (reason, message): no pods until its Workload is admitted.
    held: Option<(String, String)>,
    /// The GangScheduled condition of a gang job whose group was read in this reconcile.
    gang: Option<conditions::Cond>,
    /// The job waits for its gang scheduler's PodGroup type to be installed: no pods.
    gang_missing: bool,
}

fn refused_now(s: &TrainingJobStatus) -> Option<&Condition> {
    conditions::find(&s.conditions, READY).filter(|c| c.reason == CHILD_REFUSED)
}

impl Kind for Ctx {
    type Parent = TrainingJob;
    type Fetched = Recalled;
    type Children = Children;
    type Observed = Done;
    type Status = TrainingJobStatus;

    const KIND: &'static str = "TrainingJob";

    fn context(&self) -> (&Shared, &Synced) {
        (&self.shared, &self.synced)
    }

    fn forget(&self, job: &TrainingJob) {
        self.expectations.forget(job);
    }

    fn fetch(&self, job: &TrainingJob, owner: &Owner) -> Recalled {
        let listed = children_of(&self.pods, &owner.namespace, &owner.name);
        let (prev, deleted, created) = self.expectations.recall(job, &listed, Instant::now());
        let pods = listed
            .iter()
            .chain(&created)
            .map(|p| Arc::new(p.to_pod()))
            .collect();
        Recalled {
            prev,
            observed: Observed { pods, deleted },
            now: now(),
        }
    }

    fn previous(&self, _job: &TrainingJob, f: &Recalled) -> Option<TrainingJobStatus> {
        Some(f.prev.clone())
    }

    fn build(
        &self,
        job: &TrainingJob,
        owner: &Owner,
        _: &Recalled,
    ) -> Result<Children, BuildError> {
        build(job, owner)
    }

    fn invalid(
        &self,
        job: &TrainingJob,
        f: &Recalled,
        err: &BuildError,
        now: &Time,
    ) -> TrainingJobStatus {
        invalid(job, &f.prev, err, now)
    }

    async fn apply(
        &self,
        job: &TrainingJob,
        owner: &Owner,
        f: &Recalled,
        children: Children,
        changes: &mut Changes,
    ) -> Applied<Done> {
        let mut done = Done {
            observed: f.observed.clone(),
            decision: None,
            held: None,
            gang: None,
            gang_missing: false,
        };
        let error = converge(self, job, owner, f, children, changes, &mut done)
            .await
            .err();
        Applied {
            observed: done,
            error,
        }
    }

    fn status(
        &self,
        job: &TrainingJob,
        f: &Recalled,
        done: &Done,
        failed: Option<&Error>,
        _now: &Time,
    ) -> Option<TrainingJobStatus> {
        // No decision was carried out (a write before the pods failed): nothing new to report.
        let mut d = done.decision.clone()?;
        d.refused = failed.and_then(Error::refusal);
        let mut st = status(job, &f.prev, &done.observed, &d, &f.now);
        if let Some((reason, message)) = &done.held {
            kueue::held_status(&mut st, reason, message);
        }
        if gang::gang_of(job).is_some() {
            let fresh = done.gang.clone();
            gang::status(
                &mut st,
                &f.prev,
                fresh,
                done.gang_missing,
                job.metadata.generation,
                &f.now,
            );
        }
        // A change held back until it lasted keeps the time it was first seen.
        Some(self.expectations.as_held(job, st))
    }

    fn transition(
        &self,
        _job: &TrainingJob,
        prev: Option<&TrainingJobStatus>,
        new: &TrainingJobStatus,
        done: &Done,
    ) -> (Vec<Note>, Vec<Change>) {
        let (mut notes, mut moved) = (Vec::new(), Vec::new());
        let prev_phase = prev.and_then(|p| p.phase);
        if prev_phase != new.phase {
            if !ordinary_course(prev_phase, new.phase) {
                let outcome = done.decision.as_ref().and_then(|d| d.outcome.as_ref());
                notes.extend(phase_note(new, outcome));
            }
            moved.push(Change::Phase(format!(
                "{:?}",
                new.phase.unwrap_or_default()
            )));
        }
        if let (Some(c), None) = (refused_now(new), prev.and_then(refused_now)) {
            notes.push(Note::warning(c.reason.clone(), c.message.clone()));
        }
        if let (Some(c), None) = (gang_missing(new), prev.and_then(gang_missing)) {
            notes.push(Note::warning(c.reason.clone(), c.message.clone()));
        }
        (notes, moved)
    }

    fn hold(
        &self,
        job: &TrainingJob,
        prev: Option<&TrainingJobStatus>,
        new: &TrainingJobStatus,
    ) -> Option<Duration> {
        let prev = prev?;
        if new == prev {
            self.expectations.release(job);
            return None;
        }
        if !within_phase(prev, new) {
            return None;
        }
        self.expectations.settle_wait(job, new, Instant::now())
    }

    fn written(&self, job: &TrainingJob, st: &TrainingJobStatus) {
        self.expectations.remember_written(job, st.clone());
    }

    fn next(&self, _job: &TrainingJob, done: &Done) -> Next {
        if done.gang_missing {
            return Next::Requeue(gang::MISSING_RECHECK);
        }
        let gang_waits = done.gang.as_ref().is_some_and(|c| !c.status);
        match &done.decision {
            Some(d) if gang_waits && !d.delete_job => Next::Requeue(
                d.requeue_after
                    .map_or(gang::PENDING_RECHECK, |r| r.min(gang::PENDING_RECHECK)),
            ),
            Some(d) if d.delete_job => Next::DeleteParent(Box::new(Note::normal(
                "TTLExpired",
                "runPolicy.ttlSecondsAfterFinished has passed since the job finished: deleting it",
            ))),
            Some(d) => Next::Requeue(d.requeue_after.map_or(RESYNC, |r| r.min(RESYNC))),
            None => Next::Requeue(RESYNC),
        }
    }
}

/// The writes of one reconcile, in the order of the module docs: the queue label, the Service,
/// the pod deletions, the pod creations. `done` follows what they did, also when one fails.
async fn converge(
    ctx: &Ctx,
    job: &TrainingJob,
    owner: &Owner,
    f: &Recalled,
    children: Children,
    changes: &mut Changes,
    done: &mut Done,
) -> Result<()> {
    let shared = &ctx.shared;
    let ns = owner.namespace.as_str();
    if let Some(queue) = job
        .spec
        .scheduling
        .as_ref()
        .and_then(|s| s.queue.as_deref())
    {
        if !job.labels().contains_key(LABEL_QUEUE) {
            label_queue(shared, job, ns, queue).await?;
            changes.push(Change::Labelled(format!("{LABEL_QUEUE}={queue}")));
        }
    }

    let existing_svc = cached(&ctx.services, ns, &owner.name);
    let (made, updated) = (
        Change::created(&children.service),
        Change::updated(&children.service),
    );
    match apply::apply(
        &shared.client,
        &shared.writes,
        children.service,
        existing_svc.as_deref(),
    )
    .await?
    {
        Outcome::Unchanged => {}
        Outcome::Created => changes.push(made),
        Outcome::Updated => changes.push(updated),
    }

    let queued = admission::Queued {
        shared,
        store: ctx.workloads.as_ref(),
        job,
        owner,
    };
    let gate = admission::before_pods(
        &queued,
        &f.prev,
        &done.observed.pods,
        children.pods.first(),
        &f.now,
        changes,
    )
    .await?;
    let mut hold = false;
    if let Some(Gate::Held { reason, message }) = &gate {
        hold = true;
        if !job.spec.suspend.unwrap_or(false) {
            done.held = Some((reason.clone(), message.clone()));
        }
    }
    let group = match (gang::gang_of(job), children.pods.first()) {
        (Some(g), Some(worker))
            if !hold
                && !job.spec.suspend.unwrap_or(false)
                && !f.prev.phase.is_some_and(JobPhase::is_finished) =>
        {
            let read = gang::before_pods(shared, job, owner, g, worker, changes).await?;
            // All-or-nothing was asked for: without its group, a job that has no pods gets none.
            if read == Read::TypeMissing && kueue::active_pods(&done.observed.pods) == 0 {
                hold = true;
                done.gang_missing = true;
            }
            Some((g, read))
        }
        _ => None,
    };
    let held_job = hold.then(|| kueue::as_suspended(job));
    let decide_job = held_job.as_ref().unwrap_or(job);
    let decision = done
        .decision
        .insert(decide(decide_job, &f.prev, &done.observed, &f.now));

    // Deletions first, then the status that counts them (see the module docs).
    let (deleted, failed) = delete_pods(ctx, job, decision.delete.clone()).await;
    for c in deleted {
        changes.push(c);
    }
    let mut first_err: Option<Error> = None;
    for (d, e) in failed {
        if let Some(uid) = d.pod.uid() {
            decision.undo_restart(&uid);
        }
        first_err.get_or_insert(e);
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    if decision.phase.is_finished() {
        let message = decision.outcome.as_ref().map_or("", |o| o.1.as_str());
        admission::after_finish(&queued, decision.phase, message, &f.now, changes).await?;
    }

    if !decision.create.is_empty() {
        let wanted: HashSet<i32> = decision.create.iter().copied().collect();
        let mut to_create: Vec<(i32, Pod)> = children
            .pods
            .into_iter()
            .zip(0..)
            .filter(|(_, rank)| wanted.contains(rank))
            .map(|(p, rank)| (rank, p))
            .collect();
        if let Some(Gate::Admitted { flavors }) = &gate {
            let placed = admission::place(&queued, flavors, &mut to_create, &f.now).await?;
            if !placed {
                to_create.clear();
            }
        }
        if matches!(group, Some((_, Read::TypeMissing))) {
            to_create.clear();
        }
        let (created, err) = create_pods(shared, job, to_create).await;
        for p in &created {
            changes.push(Change::created(p.as_ref()));
        }
        if !created.is_empty() {
            // The status counts them, and the next reconciles too until the cache lists them.
            ctx.expectations
                .remember_created(job, &created, Instant::now());
            done.observed
                .pods
                .extend(created.iter().map(|p| Arc::new(p.to_pod())));
        }
        if let Some(e) = err {
            return Err(e);
        }
    }
    if let Some((g, read)) = &group {
        done.gang = Some(gang::condition(job, g, read, &done.observed.pods));
    }
    Ok(())
}

fn gang_missing(s: &TrainingJobStatus) -> Option<&Condition> {
    conditions::find(&s.conditions, gang::GANG_SCHEDULED)
        .filter(|c| c.reason == "GangSchedulerMissing")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
#[path = "reconcile_tests.rs"]
mod tests;
