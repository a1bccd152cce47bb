//! Wiring shared by the three controllers: the context, the child caches, events and the error policy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};

use crate::error::Error;
use crate::metrics::Metrics;
use crate::runtime::apply::{Object, WriteCounter};
use crate::runtime::events::Recorder;
use crate::runtime::lock;
use keelson_api::meta::{kind_selector, LABEL_OWNER_NAME};

/// Longest wait between retries of a failing reconcile.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Periodic resync of a settled object (a fallback: watches normally carry every change).
pub const RESYNC: Duration = Duration::from_secs(3600);

/// Events waiting to be recorded at most. Past it an Event is dropped and counted
/// (`keelson_events_dropped_total`), as client-go's event broadcaster drops past its queue of 1,000:
/// a burst of reconciles never piles up memory behind the API client's rate limit.
const EVENT_QUEUE: usize = 1000;
/// Events recorded at once.
const EVENT_WORKERS: usize = 4;

type QueuedEvent = (Event, ObjectReference);

/// State shared by every reconcile of every kind.
pub struct Shared {
    pub client: Client,
    pub recorder: Recorder,
    pub writes: WriteCounter,
    /// Prometheus metrics of this process.
    pub metrics: Arc<Metrics>,
    /// Readiness of every controller's child caches, and how many controllers there will be.
    synced: Mutex<(usize, Vec<Synced>)>,
    /// Reconciles finished (successfully or not), all kinds together.
    pub reconciled: std::sync::atomic::AtomicU64,
    /// Consecutive failures of each object that failed last, and when it last failed.
    failures: Mutex<HashMap<String, (u32, std::time::Instant)>>,
    /// The queue of Events to record, drained by a task started with the first Event.
    events: std::sync::OnceLock<tokio::sync::mpsc::Sender<QueuedEvent>>,
}

impl Shared {
    pub fn new(client: Client) -> Self {
        Self::with_metrics(client, Arc::new(Metrics::default()))
    }

    /// Shared state that records into `metrics` (which the client's retry layer may count into too).
    pub fn with_metrics(client: Client, metrics: Arc<Metrics>) -> Self {
        let reporter = Reporter {
            controller: "keelson".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Shared {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            writes: WriteCounter::registered(&metrics),
            metrics,
            synced: Mutex::new((0, Vec::new())),
            reconciled: std::sync::atomic::AtomicU64::new(0),
            failures: Mutex::new(HashMap::new()),
            events: std::sync::OnceLock::new(),
        }
    }

    /// A Normal Event on `obj` about one of its children, `related` (the Event's `related`
    /// object). Events fold into a series by reason, action and objects, so without the child the
    /// creation of a second Deployment would only count up the first one's Event. Queued like every
    /// Event: never awaited.
    pub fn child_event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        reason: &str,
        action: &str,
        note: String,
        related: ObjectReference,
    ) {
        self.queue_event(obj, EventType::Normal, reason, action, note, Some(related));
    }

    /// Queues an Event on `obj`, about `related` if given: recorded in the background by the
    /// Event workers, never awaited (a failure to record is logged, never fatal). Past
    /// [`EVENT_QUEUE`] waiting, it is dropped and counted. Events of one object that share type,
    /// reason and action are one series (a repeat only counts up, its note is not kept): a phase
    /// change names the new phase as its action, so that "now Running" is not folded into "Pending".
    pub fn queue_event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
        related: Option<ObjectReference>,
    ) {
        let reference: ObjectReference = obj.object_ref(&());
        let ev = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: action.to_string(),
            secondary: related,
        };
        if let Err(e) = self.event_queue().try_send((ev, reference)) {
            self.metrics.events_dropped.inc();
            let (ev, r) = match e {
                tokio::sync::mpsc::error::TrySendError::Full(x)
                | tokio::sync::mpsc::error::TrySendError::Closed(x) => x,
            };
            tracing::debug!(
                reason = ev.reason,
                name = r.name.unwrap_or_default(),
                "event queue full: event dropped"
            );
        }
    }

    fn event_queue(&self) -> &tokio::sync::mpsc::Sender<QueuedEvent> {
        self.events.get_or_init(|| {
            let (tx, rx) = tokio::sync::mpsc::channel::<QueuedEvent>(EVENT_QUEUE);
            let recorder = self.recorder.clone();
            let queue =
                futures::stream::unfold(
                    rx,
                    |mut rx| async move { rx.recv().await.map(|ev| (ev, rx)) },
                );
            tokio::spawn(queue.for_each_concurrent(EVENT_WORKERS, move |(ev, reference)| {
                let recorder = recorder.clone();
                async move {
                    if let Err(e) = recorder.publish(&ev, &reference).await {
                        tracing::warn!(error = %e, reason = ev.reason, "could not record event");
                    }
                }
            }));
            tx
        })
    }

    /// Counts one finished reconcile; the controllers' result streams end in this.
    pub fn finished<K, E: std::fmt::Debug>(
        &self,
        result: Result<(ObjectRef<K>, Action), E>,
    ) -> std::future::Ready<()>
    where
        K: Resource<DynamicType = ()>,
    {
        tracing::trace!(?result, "reconcile result");
        self.reconciled
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok((obj, _)) = &result {
            tracing::debug!(
                kind = %K::kind(&()),
                namespace = obj.namespace.as_deref().unwrap_or_default(),
                name = %obj.name,
                "reconcile finished"
            );
        }
        std::future::ready(())
    }

    /// Says how many controllers will register their caches (see [`Shared::caches_synced`]).
    pub fn expect_controllers(&self, n: usize) {
        if let Ok(mut s) = self.synced.lock() {
            s.0 = n;
        }
    }

    /// Registers the cache readiness of one controller.
    pub fn track(&self, synced: Synced) {
        if let Ok(mut s) = self.synced.lock() {
            s.1.push(synced);
        }
    }

    /// Whether every expected controller has registered its caches and all have been listed.
    pub fn caches_synced(&self) -> bool {
        self.synced
            .lock()
            .map(|s| s.1.len() >= s.0.max(1) && s.1.iter().all(Synced::is_ready))
            .unwrap_or(false)
    }

    /// Forgets the failures of `key` after a successful reconcile.
    pub fn succeeded(&self, key: &str) {
        if let Ok(mut f) = self.failures.lock() {
            f.remove(key);
        }
    }

    /// The next retry delay of `key`: 1 s doubling up to 5 min.
    ///
    /// The memory of an object that was deleted after a failure (and so never succeeds) is dropped
    /// here: a failing object is retried within [`MAX_BACKOFF`], so an entry that has not failed
    /// again for twice as long belongs to an object that is gone.
    pub fn backoff(&self, key: &str) -> Duration {
        let now = std::time::Instant::now();
        let n = match self.failures.lock() {
            Ok(mut f) => {
                f.retain(|_, (_, at)| now.saturating_duration_since(*at) < 2 * MAX_BACKOFF);
                let e = f.entry(key.to_string()).or_insert((0, now));
                e.0 = e.0.saturating_add(1);
                e.1 = now;
                e.0
            }
            Err(_) => 1,
        };
        backoff_delay(n)
    }

    /// How many objects have a failure remembered.
    pub fn failing(&self) -> usize {
        self.failures.lock().map(|f| f.len()).unwrap_or(0)
    }
}

/// Wraps one reconcile of `kind` to record its duration and outcome in `metrics`.
pub async fn timed<T, E>(
    metrics: Arc<Metrics>,
    kind: &'static str,
    reconcile: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let start = std::time::Instant::now();
    let r = reconcile.await;
    metrics.reconciled(kind, start.elapsed(), r.is_err());
    r
}

/// Exponential backoff: 1 s, 2 s, 4 s, ... capped at [`MAX_BACKOFF`].
pub fn backoff_delay(failures: u32) -> Duration {
    let secs = 1u64
        .checked_shl(failures.saturating_sub(1))
        .unwrap_or(u64::MAX);
    Duration::from_secs(secs).min(MAX_BACKOFF)
}

/// The key used for per-object backoff.
pub fn key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.namespace().unwrap_or_default(),
        obj.name_any()
    )
}

/// Error policy of every controller: spec errors never reach here (they become conditions); API
/// errors retry with exponential backoff per object.
pub fn error_policy<K: Resource<DynamicType = ()>>(
    obj: &K,
    err: &Error,
    shared: &Shared,
) -> Action {
    let delay = shared.backoff(&key(obj));
    tracing::warn!(error = %err, kind = %K::kind(&()), namespace = obj.namespace().unwrap_or_default(), name = %obj.name_any(), retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// A kind of child: an object that names its owner by the label `keelson.dev/owner-name` (which,
/// unlike an owner reference, a retained workspace also carries).
pub trait Child: Object {
    /// The name of the owner, in the child's namespace.
    fn owner_name(&self) -> Option<&str> {
        self.labels().get(LABEL_OWNER_NAME).map(String::as_str)
    }
}

impl Child for k8s_openapi::api::core::v1::Pod {}
impl Child for k8s_openapi::api::core::v1::Service {}
impl Child for k8s_openapi::api::core::v1::Secret {}
impl Child for k8s_openapi::api::core::v1::ConfigMap {}
impl Child for k8s_openapi::api::core::v1::PersistentVolumeClaim {}
impl Child for k8s_openapi::api::apps::v1::Deployment {}
impl Child for k8s_openapi::api::networking::v1::NetworkPolicy {}
impl Child for k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler {}
impl Child for crate::trainingjob::kueue::Workload {}

impl Child for crate::cachedpod::CachedPod {
    fn owner_name(&self) -> Option<&str> {
        self.label(LABEL_OWNER_NAME)
    }
}

/// A cache of one child kind `C`, limited to the children of the parent kind `P` (by label), and
/// the stream of the parents that its changes wake. The cache is filled by its own task, not by the
/// controller's polling, so a reconcile that waits for the cache to be listed can never hold up
/// that listing.
pub fn child_cache<C: Child, P: Resource<DynamicType = ()> + 'static>(
    client: &Client,
) -> (
    ChildStore<C>,
    impl Stream<Item = ObjectRef<P>> + Send + 'static,
) {
    child_cache_trimmed::<C, P>(client, |_: &mut C| {})
}

/// [`child_cache`] whose objects are trimmed by `trim` before they are cached: the caches hold
/// what the reconciler reads and no more.
///
/// Only the owner's reference leaves the cache's task: each watched object is dropped once the
/// store has its copy. A burst of pod updates (four or five per pod while 20,000 pods start) would
/// otherwise hold a second copy of each pod in flight to the controller.
pub fn child_cache_trimmed<C: Child, P: Resource<DynamicType = ()> + 'static>(
    client: &Client,
    trim: impl Fn(&mut C) + Send + Sync + 'static,
) -> (
    ChildStore<C>,
    impl Stream<Item = ObjectRef<P>> + Send + 'static,
) {
    let api: Api<C> = Api::all(client.clone());
    let cfg = watcher::Config::default().labels(&kind_selector(&P::kind(&())));
    let (reader, writer) = reflector::store();
    // managedFields are never read from the cache and are most of a small object's size.
    let watch = watcher(api, cfg).modify(move |c: &mut C| {
        c.meta_mut().managed_fields = None;
        trim(c);
    });
    let index = OwnerIndex::default();
    let indexer = index.clone();
    // The index takes each event before the store: once the store says it is listed, the index is
    // complete too, so that a reconcile that waited for the caches never finds a job's pods missing
    // (it would take the job for one that lost its pods).
    let watch = watch.inspect_ok(move |ev| indexer.apply(ev));
    let events = woken(
        reflector::reflector(writer, watch).backoff(WatchBackoff::default()),
        reader.clone(),
        Gone::Wake,
    );
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<ObjectRef<P>>();
    tokio::spawn(async move {
        futures::pin_mut!(events);
        while let Some(ev) = events.next().await {
            // A failed watch is retried here, after this cache's own backoff (a watch that
            // expired, 410 Gone, relists). It is not passed on: the controller would hold back
            // every trigger for its own backoff.
            let child = match ev {
                Ok(child) => child,
                Err(e) => {
                    tracing::warn!(kind = %C::kind(&()), error = %e, "watch failed; retrying");
                    continue;
                }
            };
            let Some(owner) = owner_of::<P, C>(&child) else {
                continue;
            };
            if tx.send(owner).is_err() {
                break; // the controller stopped
            }
        }
    });
    let stream = futures::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|ev| (ev, rx)) },
    );
    (
        ChildStore {
            store: reader,
            index,
        },
        stream,
    )
}

/// Whether [`woken`] passes on the objects that were deleted.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Gone {
    /// Children: their owner must learn that they are gone.
    Wake,
    /// Parents: a deleted parent has nothing left to reconcile.
    Skip,
}

/// The objects of a reflector's events that must wake a controller: each applied (and, with
/// [`Gone::Wake`], deleted) object as it comes, and at the end of a relist, once `store` holds the
/// new list, those it found new, changed or gone. Watch errors pass through.
///
/// A relist (after 410 Gone) swaps the new list into the store only at its end, and sends no
/// Delete for what was deleted while the watch was down. Woken by each listed object as it came, a
/// reconcile would read the store from before the relist, and the owner of a pod deleted during
/// an API server restart would never learn of it.
pub fn woken<K: Resource<DynamicType = ()> + Clone>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    store: Store<K>,
    gone: Gone,
) -> impl Stream<Item = Result<K, watcher::Error>> {
    // The store as it was when a relist began.
    let mut before: Option<Vec<Arc<K>>> = None;
    events
        .map(move |ev| {
            let out: Vec<Result<K, watcher::Error>> = match ev {
                Err(e) => vec![Err(e)],
                Ok(watcher::Event::Apply(k)) => vec![Ok(k)],
                Ok(watcher::Event::Delete(k)) if gone == Gone::Wake => vec![Ok(k)],
                Ok(watcher::Event::Delete(_) | watcher::Event::InitApply(_)) => Vec::new(),
                Ok(watcher::Event::Init) => {
                    before = Some(store.state());
                    Vec::new()
                }
                Ok(watcher::Event::InitDone) => {
                    let (changed, deleted) =
                        relist_changes(&before.take().unwrap_or_default(), &store.state());
                    let deleted = deleted.into_iter().filter(|_| gone == Gone::Wake);
                    changed.into_iter().chain(deleted).map(Ok).collect()
                }
            };
            futures::stream::iter(out)
        })
        .flatten()
}

/// What a relist changed: the objects it found new or changed, and those that are gone. An
/// unchanged object (same resourceVersion) is in neither.
fn relist_changes<K: Resource<DynamicType = ()> + Clone>(
    before: &[Arc<K>],
    after: &[Arc<K>],
) -> (Vec<K>, Vec<K>) {
    let mut gone: HashMap<ObjectRef<K>, &Arc<K>> = before
        .iter()
        .map(|k| (ObjectRef::from_obj(k.as_ref()), k))
        .collect();
    let mut changed = Vec::new();
    for k in after {
        let same = gone
            .remove(&ObjectRef::from_obj(k.as_ref()))
            .is_some_and(|b| {
                b.resource_version().is_some() && b.resource_version() == k.resource_version()
            });
        if !same {
            changed.push(k.as_ref().clone());
        }
    }
    let gone = gone.into_values().map(|k| k.as_ref().clone()).collect();
    (changed, gone)
}

/// The controller of a parent kind, running at most `concurrency` reconciles at once, over its
/// own cache (without managedFields, which no reconcile reads), woken as [`woken`] says. A failed
/// watch retries after [`WatchBackoff`].
pub fn parent_controller<K: Object>(api: Api<K>, concurrency: u16) -> kube::runtime::Controller<K> {
    let (store, writer) = reflector::store();
    let watch = watcher(api, watcher::Config::default())
        .modify(|k: &mut K| k.meta_mut().managed_fields = None);
    let events = woken(
        reflector::reflector(writer, watch),
        store.clone(),
        Gone::Skip,
    );
    kube::runtime::Controller::for_stream(events, store)
        .with_config(kube::runtime::controller::Config::default().concurrency(concurrency))
        .trigger_backoff(WatchBackoff::default())
}

/// A child cache with an index of its objects by owner, so that finding one parent's children
/// costs the number of children, not the size of the cache (which made a burst of N jobs cost N²).
#[derive(Clone)]
pub struct ChildStore<C: Object> {
    pub store: Store<C>,
    index: OwnerIndex,
}

impl<C: Object> std::ops::Deref for ChildStore<C> {
    type Target = Store<C>;

    fn deref(&self) -> &Store<C> {
        &self.store
    }
}

impl<C: Object> ChildStore<C> {
    /// Resolves once the store and the owner index have both been listed: a reconcile that waited
    /// for this never finds a parent's children missing from the index while the store has them
    /// (it would take a running job for one that lost its pods).
    pub async fn wait_until_ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.store.wait_until_ready().await?;
        let mut listed = self.index.listed.subscribe();
        // The sender lives in `self.index`: it cannot be dropped while this waits.
        let _ = listed.wait_for(|l| *l).await;
        Ok(())
    }
}

type OwnerKey = (String, String);

/// Names of cached children by (namespace, owner name), kept from the watch events. A relist builds
/// a new index and swaps it in when the list is complete, as the store does; `listed` turns true
/// at the first complete list.
#[derive(Clone)]
struct OwnerIndex {
    state: Arc<Mutex<IndexState>>,
    listed: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Default for OwnerIndex {
    fn default() -> Self {
        OwnerIndex {
            state: Arc::default(),
            listed: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }
}

#[derive(Default)]
struct IndexState {
    live: HashMap<OwnerKey, std::collections::BTreeSet<String>>,
    relist: Option<HashMap<OwnerKey, std::collections::BTreeSet<String>>>,
}

impl OwnerIndex {
    fn key<C: Child>(c: &C) -> Option<(OwnerKey, String)> {
        let owner = c.owner_name()?.to_string();
        Some(((c.namespace()?, owner), c.name_any()))
    }

    fn apply<C: Child>(&self, ev: &watcher::Event<C>) {
        let mut st = lock(&self.state);
        match ev {
            watcher::Event::Apply(c) => {
                if let Some((k, n)) = Self::key(c) {
                    st.live.entry(k).or_default().insert(n);
                }
            }
            watcher::Event::Delete(c) => {
                if let Some((k, n)) = Self::key(c) {
                    if let Some(names) = st.live.get_mut(&k) {
                        names.remove(&n);
                        if names.is_empty() {
                            st.live.remove(&k);
                        }
                    }
                }
            }
            watcher::Event::Init => st.relist = Some(HashMap::new()),
            watcher::Event::InitApply(c) => {
                if let (Some((k, n)), Some(r)) = (Self::key(c), st.relist.as_mut()) {
                    r.entry(k).or_default().insert(n);
                }
            }
            watcher::Event::InitDone => {
                if let Some(r) = st.relist.take() {
                    st.live = r;
                }
                self.listed.send_replace(true);
            }
        }
    }

    fn names(&self, ns: &str, owner: &str) -> Vec<String> {
        let st = lock(&self.state);
        st.live
            .get(&(ns.to_string(), owner.to_string()))
            .map(|n| n.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// The backoff of every watch: 250 ms, doubling up to 5 s, with jitter; reset by any event.
///
/// kube-runtime's default climbs to 30 s: a watch that kept failing while the API server restarted
/// then waited up to 30 s after it was back, and a 410 Gone in that state waited as long to relist.
#[derive(Debug, Clone)]
pub struct WatchBackoff {
    next: Duration,
}

impl WatchBackoff {
    const FIRST: Duration = Duration::from_millis(250);
    const MAX: Duration = Duration::from_secs(5);
}

impl Default for WatchBackoff {
    fn default() -> Self {
        WatchBackoff { next: Self::FIRST }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let d = self.next;
        self.next = (d * 2).min(Self::MAX);
        // Up to a quarter less, so that many watches failing together do not retry together.
        Some(d.mul_f64(1.0 - rand::random::<f64>() / 4.0))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Whether a controller's child caches have all been listed, awaitable by any number of tasks.
///
/// kube-runtime's `Store::wait_until_ready` wakes only the last of several tasks waiting on the
/// same store (it polls one oneshot receiver from every waiter), so reconciles that start together
/// must not each wait on the stores: one task does, and publishes the result here.
#[derive(Clone)]
pub struct Synced(tokio::sync::watch::Receiver<Option<Result<(), String>>>);

impl Synced {
    /// Spawns the one task that awaits `ready` (e.g. a join of `wait_until_ready` of each store).
    pub fn spawn<E: std::fmt::Display>(
        ready: impl std::future::Future<Output = Result<(), E>> + Send + 'static,
    ) -> Self {
        let (tx, rx) = tokio::sync::watch::channel(None);
        tokio::spawn(async move {
            let r = ready.await.map_err(|e| e.to_string());
            let _ = tx.send(Some(r));
        });
        Synced(rx)
    }

    /// Resolves once every cache has been listed; fails if a cache was closed first.
    pub async fn wait(&self) -> Result<(), Error> {
        let mut rx = self.0.clone();
        let r = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|e| Error::CacheClosed(e.to_string()))?
            .clone();
        match r {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(Error::CacheClosed(e)),
            None => Err(Error::CacheClosed("cache readiness unknown".into())),
        }
    }

    /// Whether every cache has been listed.
    pub fn is_ready(&self) -> bool {
        matches!(*self.0.borrow(), Some(Ok(())))
    }
}

/// Maps a child to its parent by the owner label.
pub fn owner_of<P: Resource<DynamicType = ()>, C: Child>(child: &C) -> Option<ObjectRef<P>> {
    let name = child.owner_name()?;
    Some(ObjectRef::new(name).within(&child.namespace()?))
}

/// Looks up a child by name in a cache.
pub fn cached<C: Object>(store: &Store<C>, ns: &str, name: &str) -> Option<Arc<C>> {
    store.get(&ObjectRef::new(name).within(ns))
}

/// Every cached child of one parent (for the orphan sweep), from the owner index.
pub fn children_of<C: Child>(cache: &ChildStore<C>, ns: &str, owner: &str) -> Vec<Arc<C>> {
    cache
        .index
        .names(ns, owner)
        .into_iter()
        .filter_map(|n| cached(&cache.store, ns, &n))
        .filter(|c| c.owner_name() == Some(owner))
        .collect()
}

#[cfg(test)]
#[path = "controller_tests.rs"]
mod tests;
