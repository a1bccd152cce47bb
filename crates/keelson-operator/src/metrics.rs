//! The operator's metrics in one prometheus-client registry, served as OpenMetrics text on
//! `/metrics` next to the probes (see [`crate::health`]). Recording must not block a reconcile or
//! write anywhere but the registry: no I/O, no locks held across an await.
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `keelson_reconciles_total` | `kind` | reconciles finished |
//! | `keelson_reconcile_errors_total` | `kind` | reconciles that failed (retried with backoff) |
//! | `keelson_reconcile_duration_seconds` | `kind` | time of one reconcile |
//! | `keelson_writes_total` | `op` (`apply`, `create`, `delete`, `status`) | API writes made for children and status |
//! | `keelson_leader` | | 1 while this replica holds the lease |
//! | `keelson_events_dropped_total` | | Events not recorded because their queue was full |
//! | `keelson_api_retried_total` | `code` (`429`, `503`, `504`) | API answers that asked for a retry (APF's 429 above all), each retried after its `Retry-After` ([`crate::runtime::retry`]) |

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of the per-kind metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

/// Labels of the retried answers.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: String,
}

/// Labels of the write counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    pub op: String,
}

type HistogramFamily = Family<KindLabels, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 1 ms .. ~33 s
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Every metric of one operator process.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<KindLabels, Counter>,
    errors: Family<KindLabels, Counter>,
    duration: HistogramFamily,
    writes: Family<WriteLabels, Counter>,
    retried: Family<CodeLabels, Counter>,
    /// 1 while this replica is the leader.
    pub leader: Gauge,
    /// Events dropped because the queue of Events waiting to be recorded was full.
    pub events_dropped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("keelson");
        let reconciles = Family::<KindLabels, Counter>::default();
        let errors = Family::<KindLabels, Counter>::default();
        let duration: HistogramFamily = Family::new_with_constructor(duration_histogram);
        let writes = Family::<WriteLabels, Counter>::default();
        let retried = Family::<CodeLabels, Counter>::default();
        let leader = Gauge::default();
        let events_dropped = Counter::default();
        registry.register("reconciles", "Reconciles finished", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed and will be retried",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one reconcile",
            duration.clone(),
        );
        registry.register(
            "writes",
            "API writes made for children and status, by operation",
            writes.clone(),
        );
        registry.register(
            "api_retried",
            "API answers that asked for a retry (429 Too Many Requests, 503, 504), by status code",
            retried.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        registry.register(
            "events_dropped",
            "Events not recorded because the queue of Events waiting to be recorded was full",
            events_dropped.clone(),
        );
        Metrics {
            registry,
            reconciles,
            errors,
            duration,
            writes,
            retried,
            leader,
            events_dropped,
        }
    }
}

impl Metrics {
    /// Records one finished reconcile of `kind`.
    pub fn reconciled(&self, kind: &str, took: Duration, failed: bool) {
        let labels = KindLabels { kind: kind.into() };
        self.reconciles.get_or_create(&labels).inc();
        if failed {
            self.errors.get_or_create(&labels).inc();
        }
        self.duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// The counter of one write operation (shared with [`crate::runtime::apply::WriteCounter`]).
    pub fn write_counter(&self, op: &str) -> Counter {
        self.writes
            .get_or_create(&WriteLabels { op: op.into() })
            .clone()
    }

    /// The counters of the client's retry layer (shared with [`crate::runtime::retry::Retried`]).
    pub fn retried(&self) -> crate::runtime::retry::Retried {
        let code = |c: &str| {
            self.retried
                .get_or_create(&CodeLabels { code: c.into() })
                .clone()
        };
        crate::runtime::retry::Retried {
            too_many_requests: code("429"),
            unavailable: code("503"),
            gateway_timeout: code("504"),
        }
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_metric() {
        let m = Metrics::default();
        m.reconciled("Notebook", Duration::from_millis(3), false);
        m.reconciled("Notebook", Duration::from_millis(5), true);
        m.write_counter("apply").inc();
        m.leader.set(1);
        m.retried().too_many_requests.inc();
        let text = m.encode();
        for line in [
            "keelson_reconciles_total{kind=\"Notebook\"} 2",
            "keelson_reconcile_errors_total{kind=\"Notebook\"} 1",
            "keelson_reconcile_duration_seconds_count{kind=\"Notebook\"} 2",
            "keelson_writes_total{op=\"apply\"} 1",
            "keelson_leader 1",
            "keelson_events_dropped_total 0",
            "keelson_api_retried_total{code=\"429\"} 1",
            "keelson_api_retried_total{code=\"503\"} 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
