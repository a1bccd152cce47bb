//! The TrainingJob controller's expectations, as client-go's Job controller names them: what this
//! process wrote that the caches may not show yet. The pod cache may still list a pod it deleted and
//! may not list yet a pod it created; the job cache may still show the status from before its last
//! write. Per job it keeps the uids of pods deleted (treated as gone, so a failure is never counted
//! twice), the pods created (counted as there until the cache lists them or [`CREATED_TTL`] passes)
//! and the last status written (used as the previous status until the cache shows it, so a restart
//! count never goes back and a finished job never looks unfinished). It also keeps a status change
//! within a phase that has not lasted [`SETTLE`] yet, and when it was first seen.
//!
//! It is dropped when the cache catches up or the job is gone; after a restart of the operator the
//! caches are freshly listed, so nothing is lost. It only remembers: it never reads or writes the
//! API server.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::runtime::reflector::{ObjectRef, Store};
use kube::ResourceExt;

use crate::cachedpod::CachedPod;
use keelson_api::trainingjob::{TrainingJob, TrainingJobStatus};

/// How long a pod this process created counts as there while the pod cache does not list it (the
/// Job controller's expectations wait 5 minutes): past it, a pod deleted before the cache ever saw it
/// is created again.
const CREATED_TTL: Duration = Duration::from_secs(60);

/// A status change within a phase (worker counts, a condition that moves while the phase stays) is
/// written once it has lasted this long unchanged: the pods of a job that start together make no
/// write of their own between the write at their creation and the one of the phase they reach, while
/// a state that lasts (a worker that cannot be scheduled, three of four workers ready) is written
/// this long after it began, with that time as its `lastTransitionTime`. A change of phase,
/// generation or restart count is written at once.
pub const SETTLE: Duration = Duration::from_secs(5);

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
    /// A status change within the phase not written yet, and when it was first computed.
    held: Option<(TrainingJobStatus, Instant)>,
}

impl Memory {
    /// Whether it remembers nothing (its entry can go: a settled job costs no memory here).
    fn is_empty(&self) -> bool {
        self.deleted.is_empty()
            && self.created.is_empty()
            && self.written.is_none()
            && self.held.is_none()
    }
}

/// Whether two statuses are the same but for the conditions' `lastTransitionTime`.
pub fn same_status(a: &TrainingJobStatus, b: &TrainingJobStatus) -> bool {
    let bare = |s: &TrainingJobStatus| TrainingJobStatus {
        conditions: Vec::new(),
        ..s.clone()
    };
    bare(a) == bare(b) && keelson_api::conditions::same(&a.conditions, &b.conditions)
}

/// The per-job [`Memory`], pruned against the job cache. A memory is boxed (it holds two statuses
/// inline, and the table's slots are as large as its values), and dropped once it holds nothing.
pub struct Expectations {
    jobs: Store<TrainingJob>,
    map: Mutex<HashMap<ObjectRef<TrainingJob>, Box<Memory>>>,
    recalls: std::sync::atomic::AtomicUsize,
}

impl Expectations {
    pub fn new(jobs: Store<TrainingJob>) -> Self {
        Expectations {
            jobs,
            map: Mutex::new(HashMap::new()),
            recalls: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<ObjectRef<TrainingJob>, Box<Memory>>) -> T) -> T {
        f(&mut crate::runtime::lock(&self.map))
    }

    /// The status to decide from, the pods already deleted, and the pods created that the cache does
    /// not list yet. Also drops the memory of jobs that are gone, of deleted pods the cache no longer
    /// lists, and of created pods it lists (or that outlived [`CREATED_TTL`]).
    pub fn recall(
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
            let out = (prev, m.deleted.clone(), created);
            if m.is_empty() {
                mem.remove(&here);
            }
            out
        })
    }

    fn entry<T>(&self, job: &TrainingJob, f: impl FnOnce(&mut Memory) -> T) -> T {
        let uid = job.uid().unwrap_or_default();
        self.with(|mem| {
            let m = mem.entry(ObjectRef::from_obj(job)).or_default();
            if m.uid != uid {
                **m = Memory {
                    uid,
                    ..Memory::default()
                };
            }
            f(m)
        })
    }

    pub fn remember_deleted(&self, job: &TrainingJob, pod_uid: String) {
        self.entry(job, |m| m.deleted.insert(pod_uid));
    }

    pub fn remember_created(&self, job: &TrainingJob, pods: &[Arc<CachedPod>], at: Instant) {
        self.entry(job, |m| {
            m.created.extend(pods.iter().map(|p| (p.clone(), at)));
        });
    }

    pub fn remember_written(&self, job: &TrainingJob, st: TrainingJobStatus) {
        let over = job.resource_version();
        self.entry(job, |m| {
            m.written = Some(st);
            m.written_over = over;
            m.held = None;
        });
    }

    /// How long the change `new` must still wait before it is written (`None`: write it now): until it
    /// has lasted [`SETTLE`], counted from the first reconcile that computed it. Another change starts
    /// the wait again.
    pub fn settle_wait(
        &self,
        job: &TrainingJob,
        new: &TrainingJobStatus,
        now: Instant,
    ) -> Option<Duration> {
        self.entry(job, |m| match &m.held {
            Some((held, since)) if same_status(held, new) => SETTLE
                .checked_sub(now.saturating_duration_since(*since))
                .filter(|d| !d.is_zero()),
            _ => {
                m.held = Some((new.clone(), now));
                Some(SETTLE)
            }
        })
    }

    /// `new`, or the change held back if it is the same but for timestamps: its conditions keep the
    /// time the change was first seen.
    pub fn as_held(&self, job: &TrainingJob, new: TrainingJobStatus) -> TrainingJobStatus {
        let uid = job.uid().unwrap_or_default();
        self.with(|mem| {
            mem.get(&ObjectRef::from_obj(job))
                .filter(|m| m.uid == uid)
                .and_then(|m| m.held.as_ref())
                .filter(|(held, _)| same_status(held, &new))
                .map(|(held, _)| held.clone())
        })
        .unwrap_or(new)
    }

    /// Drops a change held back (the status went back to what is written).
    pub fn release(&self, job: &TrainingJob) {
        let uid = job.uid().unwrap_or_default();
        self.with(|mem| {
            if let Some(m) = mem
                .get_mut(&ObjectRef::from_obj(job))
                .filter(|m| m.uid == uid)
            {
                m.held = None;
            }
        });
    }

    pub fn forget(&self, job: &TrainingJob) {
        self.with(|mem| mem.remove(&ObjectRef::from_obj(job)));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.with(|mem| mem.len())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::podstatus::fixtures;
    use keelson_api::trainingjob::{JobPhase, TrainingJobSpec};
    use kube::runtime::{reflector, watcher};

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
    fn a_change_is_written_once_it_has_lasted() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
        use k8s_openapi::jiff::Timestamp;
        let (store, mut writer) = reflector::store::<TrainingJob>();
        let mem = Expectations::new(store);
        let j = job("u1", None);
        writer.apply_watcher_event(&watcher::Event::Apply(j.clone()));
        let ready = |n: &str, at: i64| TrainingJobStatus {
            workers_ready: Some(format!("{n}/4")),
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "False".into(),
                reason: "WorkersStarting".into(),
                message: format!("{n} of 4 workers are ready"),
                observed_generation: Some(1),
                last_transition_time: Time(Timestamp::from_second(at).unwrap()),
            }],
            ..restarts(0)
        };
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // First seen: it waits the whole period.
        assert_eq!(mem.settle_wait(&j, &ready("1", 100), t0), Some(SETTLE));
        // The same change later (another timestamp): the rest of the period.
        assert_eq!(
            mem.settle_wait(&j, &ready("1", 101), t0 + ms(1500)),
            Some(SETTLE - ms(1500))
        );
        // It keeps the time it was first seen.
        assert_eq!(mem.as_held(&j, ready("1", 103)), ready("1", 100));
        assert_eq!(mem.as_held(&j, ready("2", 103)), ready("2", 103));
        // Another change before the end: the wait starts again.
        assert_eq!(
            mem.settle_wait(&j, &ready("2", 104), t0 + ms(2000)),
            Some(SETTLE)
        );
        // Lasted: written now.
        assert_eq!(
            mem.settle_wait(&j, &ready("2", 105), t0 + ms(2000) + SETTLE),
            None
        );
        // Once written, nothing is held.
        mem.remember_written(&j, ready("2", 104));
        assert_eq!(mem.as_held(&j, ready("2", 109)), ready("2", 109));
        assert_eq!(
            mem.settle_wait(&j, &ready("3", 110), t0 + ms(9000)),
            Some(SETTLE)
        );
        mem.release(&j);
        assert_eq!(mem.as_held(&j, ready("3", 111)), ready("3", 111));
    }

    #[test]
    fn memory_covers_a_stale_cache_until_it_catches_up() {
        let (store, mut writer) = reflector::store::<TrainingJob>();
        let mem = Expectations::new(store);
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
        mem.remember_written(&stale, restarts(2));
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
        let mem = Expectations::new(store);
        let mut seen = job("u1", Some(restarts(1)));
        seen.metadata.resource_version = Some("10".into());
        writer.apply_watcher_event(&watcher::Event::Apply(seen.clone()));
        mem.remember_written(&seen, restarts(2));
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
        let mem = Expectations::new(store);
        let old = job("u1", None);
        writer.apply_watcher_event(&watcher::Event::Apply(old.clone()));
        mem.remember_written(&old, restarts(3));
        assert_eq!(mem.len(), 1);

        // Re-created under the same name: the old job's status is not carried over.
        let new = job("u2", None);
        writer.apply_watcher_event(&watcher::Event::Apply(new.clone()));
        assert_eq!(
            mem.recall(&new, &[], Instant::now()).0,
            TrainingJobStatus::default()
        );
        assert_eq!(mem.len(), 0);

        mem.remember_written(&new, restarts(1));
        writer.apply_watcher_event(&watcher::Event::Delete(new.clone()));
        let other = job("u3", None);
        let mut other = other;
        other.metadata.name = Some("other".into());
        writer.apply_watcher_event(&watcher::Event::Apply(other.clone()));
        mem.recall(&other, &[], Instant::now());
        assert_eq!(mem.len(), 0);
        mem.remember_written(&other, restarts(1));
        mem.forget(&other);
        assert_eq!(mem.len(), 0);
    }

    #[test]
    fn created_pods_count_until_the_cache_lists_them() {
        let (store, mut writer) = reflector::store::<TrainingJob>();
        let mem = Expectations::new(store);
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
