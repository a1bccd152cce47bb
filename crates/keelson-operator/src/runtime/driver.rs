//! The one reconcile of every kind: fetch -> (sense) -> build -> apply -> status -> next.
//!
//! A kind supplies its steps ([`Kind`]): what it reads from its caches, the pure build, the writes of
//! its children (with what it then observes), the pure status, the Events a status change records
//! and what comes next. The driver does the rest once, the same way for all three kinds:
//! - a parent being deleted: its per-object memory is dropped, nothing is written;
//! - the caches are listed before any decision;
//! - a spec that cannot be built: a status with the reason, a Warning Event, and no retry until the
//!   spec (or a child) changes;
//! - the status is written through `/status` only when it differs, and its Events are queued (never
//!   awaited);
//! - a failed write: the status still says what happened, and the reconcile is retried with backoff;
//! - one log line per reconcile, only when it changed something.
//!
//! It never decides anything about a kind: every rule is in the kind's steps.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::Controller;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use tracing::Instrument;

use super::apply::{self, Object};
use super::controller::{error_policy, key, timed, Shared, Synced, RESYNC};
use crate::error::{BuildError, Error, Result};
use keelson_api::meta::Owner;

/// One thing a reconcile changed, for its log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A child was created.
    Created { kind: String, name: String },
    /// A child was updated in place.
    Updated { kind: String, name: String },
    /// A child was deleted, and why.
    Deleted {
        kind: String,
        name: String,
        why: String,
    },
    /// The parent's own metadata was changed (a label).
    Labelled(String),
    /// The phase moved.
    Phase(String),
    /// The status was written.
    Status,
    /// The parent itself was deleted (its time to live had passed).
    ParentDeleted,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Created { kind, name } => write!(f, "created {kind} {name}"),
            Change::Updated { kind, name } => write!(f, "updated {kind} {name}"),
            Change::Deleted { kind, name, why } => write!(f, "deleted {kind} {name} ({why})"),
            Change::Labelled(what) => write!(f, "labelled {what}"),
            Change::Phase(p) => write!(f, "phase {p}"),
            Change::Status => f.write_str("status"),
            Change::ParentDeleted => f.write_str("deleted itself"),
        }
    }
}

impl Change {
    /// A change to the child `obj` of kind `K`.
    pub fn created<K: Resource<DynamicType = ()>>(obj: &K) -> Self {
        Change::Created {
            kind: K::kind(&()).into_owned(),
            name: obj.meta().name.clone().unwrap_or_default(),
        }
    }

    pub fn updated<K: Resource<DynamicType = ()>>(obj: &K) -> Self {
        Change::Updated {
            kind: K::kind(&()).into_owned(),
            name: obj.meta().name.clone().unwrap_or_default(),
        }
    }

    pub fn deleted<K: Resource<DynamicType = ()>>(obj: &K, why: impl fmt::Display) -> Self {
        Change::Deleted {
            kind: K::kind(&()).into_owned(),
            name: obj.meta().name.clone().unwrap_or_default(),
            why: why.to_string(),
        }
    }
}

/// What one reconcile changed, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes(Vec<Change>);

impl Changes {
    pub fn push(&mut self, c: Change) {
        self.0.push(c);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a child of kind `K` named `name` was created.
    pub fn created<K: Resource<DynamicType = ()>>(&self, name: &str) -> bool {
        self.0.iter().any(|c| {
            matches!(c, Change::Created { kind, name: n } if kind == K::kind(&()).as_ref() && n == name)
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = &Change> {
        self.0.iter()
    }
}

impl fmt::Display for Changes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, c) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

/// An Event for the driver (or a step) to record on the parent.
#[derive(Clone, Debug, PartialEq)]
pub struct Note {
    pub type_: EventType,
    /// CamelCase reason, e.g. `PodCreated`.
    pub reason: String,
    /// What was done; Events of one object with the same type, reason and action fold into a series.
    pub action: String,
    pub note: String,
    /// The child the Event is about, if any.
    pub related: Option<ObjectReference>,
}

impl Note {
    pub fn normal(reason: impl Into<String>, note: impl Into<String>) -> Self {
        let reason = reason.into();
        Note {
            type_: EventType::Normal,
            action: reason.clone(),
            reason,
            note: note.into(),
            related: None,
        }
    }

    pub fn warning(reason: impl Into<String>, note: impl Into<String>) -> Self {
        Note {
            type_: EventType::Warning,
            ..Note::normal(reason, note)
        }
    }

    /// The same Event with its own action.
    pub fn action(mut self, action: impl Into<String>) -> Self {
        self.action = action.into();
        self
    }

    /// The same Event about the child `related`.
    pub fn about(mut self, related: ObjectReference) -> Self {
        self.related = Some(related);
        self
    }
}

/// What the writes of children left: what the cluster now holds, and the first write that failed.
pub struct Applied<O> {
    pub observed: O,
    pub error: Option<Error>,
}

/// What comes after the status.
#[derive(Clone, Debug, PartialEq)]
pub enum Next {
    /// Look again after this long (a resync, or a deadline the status depends on).
    Requeue(Duration),
    /// Delete the parent itself (a finished job past its time to live), with this Event.
    DeleteParent(Box<Note>),
}

/// One kind's steps.
pub trait Kind: Send + Sync + 'static {
    type Parent: Object;
    /// What the caches hold that the build and the status need, read once per reconcile.
    type Fetched: Send + Sync;
    type Children: Send;
    type Observed: Send + Sync;
    type Status: Clone + PartialEq + Serialize + Send + Sync;

    /// The kind's name, for logs and metrics.
    const KIND: &'static str;

    /// The shared state, and whether the kind's child caches have been listed.
    fn context(&self) -> (&Shared, &Synced);

    fn shared(&self) -> &Shared {
        self.context().0
    }

    /// Drops what the kind remembers of a parent that is going.
    fn forget(&self, _parent: &Self::Parent) {}

    /// Reads what the build and the status need from the caches. No writes.
    fn fetch(&self, parent: &Self::Parent, owner: &Owner) -> Self::Fetched;

    /// The status this reconcile starts from (the cached one, unless the kind knows better).
    fn previous(&self, parent: &Self::Parent, fetched: &Self::Fetched) -> Option<Self::Status>;

    /// Reads what the build needs from outside the caches (a measurement the kind's own pods
    /// serve), into `fetched`, after [`Kind::fetch`] and before the build. It writes nothing.
    /// Default: nothing to read.
    fn sense<'a>(
        &'a self,
        _parent: &'a Self::Parent,
        _owner: &'a Owner,
        _prev: Option<&'a Self::Status>,
        _fetched: &'a mut Self::Fetched,
        _now: &'a Time,
    ) -> impl Future<Output = ()> + Send + 'a {
        async {}
    }

    /// Spec -> children. Pure.
    fn build(
        &self,
        parent: &Self::Parent,
        owner: &Owner,
        fetched: &Self::Fetched,
    ) -> Result<Self::Children, BuildError>;

    /// The status of a parent whose spec cannot be built. Pure.
    fn invalid(
        &self,
        parent: &Self::Parent,
        fetched: &Self::Fetched,
        err: &BuildError,
        now: &Time,
    ) -> Self::Status;

    /// Brings the children to `children`, and observes what the cluster then holds. The only step
    /// that writes children.
    fn apply<'a>(
        &'a self,
        parent: &'a Self::Parent,
        owner: &'a Owner,
        fetched: &'a Self::Fetched,
        children: Self::Children,
        changes: &'a mut Changes,
    ) -> impl Future<Output = Applied<Self::Observed>> + Send + 'a;

    /// Observed children -> status. Pure. `refused` is set when the API server refused a child
    /// built from the spec; `None` means that no status is written this time (a transient failure
    /// the kind does not report).
    fn status(
        &self,
        parent: &Self::Parent,
        fetched: &Self::Fetched,
        observed: &Self::Observed,
        failed: Option<&Error>,
        now: &Time,
    ) -> Option<Self::Status>;

    /// The Events (and log entries) of a status that moved from `prev` to `new`. Pure.
    fn transition(
        &self,
        parent: &Self::Parent,
        prev: Option<&Self::Status>,
        new: &Self::Status,
        observed: &Self::Observed,
    ) -> (Vec<Note>, Vec<Change>);

    /// How long to hold a status write back, if at all (a change that need not be written before it
    /// has lasted); the parent is reconciled again after that long.
    fn hold(
        &self,
        _parent: &Self::Parent,
        _prev: Option<&Self::Status>,
        _new: &Self::Status,
    ) -> Option<Duration> {
        None
    }

    /// Called after this process wrote `status`.
    fn written(&self, _parent: &Self::Parent, _status: &Self::Status) {}

    /// What comes after a reconcile that went through.
    fn next(&self, _parent: &Self::Parent, _observed: &Self::Observed) -> Next {
        Next::Requeue(RESYNC)
    }
}

fn now() -> Time {
    Time(Timestamp::now())
}

/// Queues `note` on `obj`: recorded in the background, never awaited.
pub fn record<K: Resource<DynamicType = ()>>(shared: &Shared, obj: &K, note: Note) {
    shared.queue_event(
        obj,
        note.type_,
        &note.reason,
        &note.action,
        note.note,
        note.related,
    );
}

/// Writes `status` when it differs from `prev`; then records its Events and tells the kind.
async fn write_status<K: Kind>(
    kind: &K,
    parent: &K::Parent,
    prev: Option<&K::Status>,
    status: K::Status,
    notes: Vec<Note>,
) -> Result<bool> {
    let shared = kind.shared();
    if !apply::patch_status(&shared.client, &shared.writes, parent, prev, &status).await? {
        return Ok(false);
    }
    for n in notes {
        record(shared, parent, n);
    }
    kind.written(parent, &status);
    Ok(true)
}

/// Runs a kind's `controller` until `shutdown` resolves: each reconcile is [`reconcile`], timed in the
/// metrics, a failure is backed off by [`error_policy`], and every result is counted by
/// [`Shared::finished`].
pub async fn run_controller<K: Kind>(
    controller: Controller<K::Parent>,
    kind: Arc<K>,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let metrics = shared.metrics.clone();
    let policy = shared.clone();
    controller
        .graceful_shutdown_on(shutdown)
        .run(
            move |parent, kind| timed(metrics.clone(), K::KIND, reconcile(parent, kind)),
            move |parent, err, _| error_policy(parent.as_ref(), err, &policy),
            kind,
        )
        .for_each(|r| shared.finished(r))
        .await;
}

/// One reconcile of one parent of kind `K`, in a span naming it.
pub async fn reconcile<K: Kind>(parent: Arc<K::Parent>, kind: Arc<K>) -> Result<Action> {
    let span = tracing::info_span!(
        "reconcile",
        kind = K::KIND,
        namespace = parent.namespace().unwrap_or_default(),
        name = parent.name_any()
    );
    run(parent.as_ref(), kind.as_ref()).instrument(span).await
}

async fn run<K: Kind>(parent: &K::Parent, kind: &K) -> Result<Action> {
    let shared = kind.shared();
    if parent.meta().deletion_timestamp.is_some() {
        kind.forget(parent);
        shared.succeeded(&key(parent));
        return Ok(Action::await_change());
    }
    let owner = Owner::of(parent).ok_or_else(|| Error::MissingMeta(parent.name_any()))?;
    // Decisions are taken from the child caches: never from caches that have not listed yet (an
    // empty cache would turn every child into a create and hide every orphan).
    kind.context().1.wait().await?;
    let now = now();
    let mut fetched = kind.fetch(parent, &owner);
    let prev = kind.previous(parent, &fetched);
    kind.sense(parent, &owner, prev.as_ref(), &mut fetched, &now)
        .await;

    let children = match kind.build(parent, &owner, &fetched) {
        Ok(c) => c,
        Err(e) => {
            let st = kind.invalid(parent, &fetched, &e, &now);
            let note = Note::warning(e.reason, e.to_string());
            if write_status(kind, parent, prev.as_ref(), st, vec![note]).await? {
                tracing::info!(reason = e.reason, error = %e, "spec cannot be reconciled");
            }
            shared.succeeded(&key(parent));
            return Ok(Action::await_change());
        }
    };

    let mut changes = Changes::default();
    let Applied { observed, error } = kind
        .apply(parent, &owner, &fetched, children, &mut changes)
        .await;
    if error.as_ref().is_some_and(Error::namespace_terminating) {
        // No retry and no status: the namespace's deletion removes the parent as well.
        tracing::debug!("the namespace is being deleted: no child is created");
        shared.succeeded(&key(parent));
        return Ok(Action::await_change());
    }

    if let Some(st) = kind.status(parent, &fetched, &observed, error.as_ref(), &now) {
        let hold = error
            .is_none()
            .then(|| kind.hold(parent, prev.as_ref(), &st))
            .flatten();
        if let Some(wait) = hold {
            if !changes.is_empty() {
                tracing::info!(changes = %changes, "reconciled");
            }
            tracing::debug!(?wait, "status change held back until it lasts");
            shared.succeeded(&key(parent));
            return Ok(Action::requeue(wait));
        }
        let (notes, moved) = kind.transition(parent, prev.as_ref(), &st, &observed);
        if write_status(kind, parent, prev.as_ref(), st, notes).await? {
            for c in moved {
                changes.push(c);
            }
            changes.push(Change::Status);
        }
    }
    if let Some(e) = error {
        if !changes.is_empty() {
            tracing::info!(changes = %changes, "reconciled in part");
        }
        return Err(e);
    }

    let action = match kind.next(parent, &observed) {
        Next::Requeue(d) => Action::requeue(d.min(RESYNC)),
        Next::DeleteParent(note) => {
            record(shared, parent, *note);
            if apply::delete(&shared.client, &shared.writes, parent).await? {
                changes.push(Change::ParentDeleted);
            }
            kind.forget(parent);
            Action::await_change()
        }
    };
    if !changes.is_empty() {
        tracing::info!(changes = %changes, "reconciled");
    }
    shared.succeeded(&key(parent));
    Ok(action)
}
