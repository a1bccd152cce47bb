//! Kubernetes Events (`events.k8s.io/v1`), folded into series as client-go's event recorder folds
//! them: the same type, reason and action on the same objects within [`SERIES_TTL`] only counts up
//! the first Event's `series` (one merge patch), instead of a new Event each time.
//!
//! The memory of open series is small and bounded: per series, the key and the Event's name, its
//! count and when it was last seen, at most [`SERIES_MAX`] of them (client-go's correlator keeps an
//! LRU of 4,096). Series older than [`SERIES_TTL`] are swept at most once a [`SWEEP_EVERY`], not on
//! every Event.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Reporter};
use kube::{Api, Client};

/// How long a series stays open after its last Event (kube-runtime's and client-go's: 6 minutes).
const SERIES_TTL: SignedDuration = SignedDuration::from_mins(6);
/// Open series remembered at most; past it the oldest is forgotten (its next Event starts anew).
const SERIES_MAX: usize = 4096;
/// How often closed series are swept out.
const SWEEP_EVERY: SignedDuration = SignedDuration::from_secs(60);

/// What makes two Events one series.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SeriesKey {
    warning: bool,
    reason: String,
    action: String,
    regarding: ObjectKey,
    related: Option<ObjectKey>,
}

/// An object as Events name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ObjectKey {
    kind: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
    uid: Option<String>,
}

impl From<&ObjectReference> for ObjectKey {
    fn from(r: &ObjectReference) -> Self {
        ObjectKey {
            kind: r.kind.clone(),
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            uid: r.uid.clone(),
        }
    }
}

/// One open series: the name of its Event, how many it counts and when it last counted.
#[derive(Clone, Debug)]
struct Series {
    name: String,
    count: i32,
    last: Timestamp,
}

#[derive(Debug, Default)]
struct Memory {
    open: HashMap<SeriesKey, Series>,
    swept: Option<Timestamp>,
}

impl Memory {
    /// The name and next count of the open series of `key`, if any.
    fn repeat(&mut self, key: &SeriesKey, now: Timestamp) -> Option<(String, i32)> {
        if self.swept.is_none_or(|t| t + SWEEP_EVERY <= now) {
            self.open.retain(|_, s| s.last + SERIES_TTL > now);
            self.swept = Some(now);
        }
        self.open
            .get(key)
            .filter(|s| s.last + SERIES_TTL > now)
            .map(|s| (s.name.clone(), s.count + 1))
    }

    fn record(&mut self, key: SeriesKey, series: Series) {
        if self.open.len() >= SERIES_MAX && !self.open.contains_key(&key) {
            let oldest = self
                .open
                .iter()
                .min_by_key(|(_, s)| s.last)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.open.remove(&k);
            }
        }
        self.open.insert(key, series);
    }
}

/// Records Events, folding repeats into series.
#[derive(Clone)]
pub struct Recorder {
    client: Client,
    reporter: Reporter,
    memory: Arc<Mutex<Memory>>,
}

impl Recorder {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Recorder {
            client,
            reporter,
            memory: Arc::default(),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Memory) -> T) -> T {
        f(&mut crate::runtime::lock(&self.memory))
    }

    /// Records `ev` about `regarding`: a new Event, or one more count of its open series.
    pub async fn publish(
        &self,
        ev: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let key = SeriesKey {
            warning: matches!(ev.type_, EventType::Warning),
            reason: ev.reason.clone(),
            action: ev.action.clone(),
            regarding: regarding.into(),
            related: ev.secondary.as_ref().map(ObjectKey::from),
        };
        let ns = regarding.namespace.as_deref().unwrap_or("default");
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), ns);
        if let Some((name, count)) = self.with(|m| m.repeat(&key, now)) {
            let patch = serde_json::json!({
                "series": {"count": count, "lastObservedTime": MicroTime(now)},
            });
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    let last = now;
                    self.with(|m| m.record(key, Series { name, count, last }));
                    return Ok(());
                }
                // The Event is gone (expired or deleted): the series starts again.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let event = self.event(ev, regarding, now);
        let name = event.metadata.name.clone().unwrap_or_default();
        api.create(&PostParams::default(), &event).await?;
        self.with(|m| {
            m.record(
                key,
                Series {
                    name,
                    count: 1,
                    last: now,
                },
            )
        });
        Ok(())
    }

    /// The first Event of a series.
    fn event(&self, ev: &Event, regarding: &ObjectReference, now: Timestamp) -> K8sEvent {
        let controller = &self.reporter.controller;
        K8sEvent {
            metadata: ObjectMeta {
                namespace: regarding.namespace.clone(),
                name: Some(format!(
                    "{}.{:x}",
                    regarding.name.as_deref().unwrap_or(controller),
                    now.as_nanosecond()
                )),
                ..ObjectMeta::default()
            },
            action: Some(ev.action.clone()),
            reason: Some(ev.reason.clone()),
            note: ev.note.clone(),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            related: ev.secondary.clone(),
            reporting_controller: Some(controller.clone()),
            reporting_instance: Some(
                self.reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| controller.clone()),
            ),
            type_: Some(
                match ev.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            ..K8sEvent::default()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn key(name: &str) -> SeriesKey {
        SeriesKey {
            warning: false,
            reason: "PodCreated".into(),
            action: "PodCreated".into(),
            regarding: ObjectKey {
                kind: Some("TrainingJob".into()),
                namespace: Some("ns".into()),
                name: Some(name.into()),
                uid: Some(format!("uid-{name}")),
            },
            related: None,
        }
    }

    fn series(name: &str, count: i32, last: Timestamp) -> Series {
        Series {
            name: name.into(),
            count,
            last,
        }
    }

    #[test]
    fn a_repeat_within_the_ttl_counts_up_the_open_series() {
        let mut m = Memory::default();
        let t0 = Timestamp::now();
        assert_eq!(m.repeat(&key("a"), t0), None);
        m.record(key("a"), series("a.1", 1, t0));
        let t1 = t0 + SignedDuration::from_mins(5);
        assert_eq!(m.repeat(&key("a"), t1), Some(("a.1".into(), 2)));
        m.record(key("a"), series("a.1", 2, t1));
        // Another object, or the same one after the TTL, is a new series.
        assert_eq!(m.repeat(&key("b"), t1), None);
        assert_eq!(m.repeat(&key("a"), t1 + SERIES_TTL), None);
    }

    #[test]
    fn closed_series_are_swept_and_the_memory_is_bounded() {
        let mut m = Memory::default();
        let t0 = Timestamp::now();
        for i in 0..SERIES_MAX + 10 {
            let at = t0 + SignedDuration::from_millis(i as i64);
            m.record(key(&i.to_string()), series("x", 1, at));
        }
        assert_eq!(m.open.len(), SERIES_MAX);
        // The oldest were forgotten, the newest kept.
        assert!(!m.open.contains_key(&key("0")));
        assert!(m.open.contains_key(&key(&(SERIES_MAX + 9).to_string())));
        // Past the TTL, the next lookup sweeps them all.
        let later = t0 + SERIES_TTL + SignedDuration::from_mins(1);
        assert_eq!(m.repeat(&key("new"), later), None);
        assert!(m.open.is_empty());
    }
}
