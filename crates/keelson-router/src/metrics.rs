//! The router's metrics: one prometheus-client registry, encoded as OpenMetrics text on the admin
//! port's `/metrics`. The request path must not look up a label or take a registry lock: it uses
//! the per-variant handles that [`Metrics::variant`] resolves once per config.
//!
//! Per variant (label `variant`): requests routed to it, responses by status class, errors the
//! router answered itself (upstream unreachable or too slow), the time to the upstream's response
//! headers as a histogram, and the mirror copies it received by outcome. A variant's series are
//! created when a config first names it and kept across reloads, so counters never go back.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Upper bounds of the latency histogram buckets, in seconds.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// What happened to a mirror copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MirrorOutcome {
    /// Sent, and the mirror answered (any status).
    Sent,
    /// Sent, and the mirror failed or timed out.
    Failed,
    /// Not sent: too many copies in flight.
    Dropped,
    /// Not sent: the request body is too large or of unknown length to copy.
    Skipped,
}

impl MirrorOutcome {
    const ALL: [MirrorOutcome; 4] = [
        MirrorOutcome::Sent,
        MirrorOutcome::Failed,
        MirrorOutcome::Dropped,
        MirrorOutcome::Skipped,
    ];

    fn label(self) -> &'static str {
        match self {
            MirrorOutcome::Sent => "sent",
            MirrorOutcome::Failed => "failed",
            MirrorOutcome::Dropped => "dropped",
            MirrorOutcome::Skipped => "skipped",
        }
    }
}

/// Status classes of the responses counter, by `status / 100 - 1`.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Label values are escaped once, when a config names the variant: the encoder writes them as given.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VariantLabels {
    variant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    variant: String,
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    variant: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// The metrics of one variant: handles on its series in the registry, resolved once per config.
#[derive(Clone, Debug)]
pub struct VariantMetrics {
    pub requests: Counter,
    /// Responses from the upstream by status class: 1xx, 2xx, 3xx, 4xx, 5xx.
    responses: [Counter; 5],
    /// Requests the router answered itself with 502 or 504 (upstream down or too slow).
    pub errors: Counter,
    latency: Histogram,
    mirrors: [Counter; 4],
}

impl VariantMetrics {
    pub fn response(&self, status: u16) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.responses[class].inc();
    }

    /// Records the time from routing a request to the upstream's response headers.
    pub fn latency(&self, d: Duration) {
        self.latency.observe(d.as_secs_f64());
    }

    pub fn mirror(&self, outcome: MirrorOutcome) {
        self.mirrors[outcome as usize].inc();
    }
}

/// Every metric of the router.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<VariantLabels, Counter>,
    responses: Family<ClassLabels, Counter>,
    errors: Family<VariantLabels, Counter>,
    latency: Family<VariantLabels, Histogram, fn() -> Histogram>,
    mirrors: Family<OutcomeLabels, Counter>,
    pub reloads_ok: Counter,
    pub reloads_failed: Counter,
    /// Seconds since the Unix epoch of the last config that was loaded (0: none yet).
    config_loaded_at: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("keelson_router");
        let requests = Family::<VariantLabels, Counter>::default();
        let responses = Family::<ClassLabels, Counter>::default();
        let errors = Family::<VariantLabels, Counter>::default();
        let latency: Family<VariantLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        let mirrors = Family::<OutcomeLabels, Counter>::default();
        let reloads = Family::<ResultLabels, Counter>::default();
        let config_loaded_at = Gauge::default();
        registry.register("requests", "Requests routed to a variant", requests.clone());
        registry.register(
            "responses",
            "Responses from a variant's upstream, by status class",
            responses.clone(),
        );
        registry.register(
            "errors",
            "Requests the router answered itself because the variant's upstream was unreachable (502) or too slow (504)",
            errors.clone(),
        );
        registry.register(
            "upstream_latency_seconds",
            "Time from routing a request to the variant's response headers",
            latency.clone(),
        );
        registry.register(
            "mirror_requests",
            "Mirror copies for a variant by outcome: sent, failed, dropped (too many in flight), skipped (body too large or of unknown length)",
            mirrors.clone(),
        );
        registry.register(
            "config_reloads",
            "Config file loads by result (a failed load keeps the last good config)",
            reloads.clone(),
        );
        registry.register(
            "config_loaded_timestamp_seconds",
            "When the config in effect was loaded (0: none yet)",
            config_loaded_at.clone(),
        );
        Metrics {
            registry,
            requests,
            responses,
            errors,
            latency,
            mirrors,
            reloads_ok: reloads.get_or_create_owned(&ResultLabels { result: "ok" }),
            reloads_failed: reloads.get_or_create_owned(&ResultLabels { result: "error" }),
            config_loaded_at,
        }
    }
}

impl Metrics {
    /// Handles on the series of `variant`, created (at zero) on first use; a later call for the
    /// same name returns handles on the same series.
    pub fn variant(&self, variant: &str) -> Arc<VariantMetrics> {
        let variant = escape(variant);
        let labels = VariantLabels {
            variant: variant.clone(),
        };
        Arc::new(VariantMetrics {
            requests: self.requests.get_or_create_owned(&labels),
            responses: CLASSES.map(|class| {
                self.responses.get_or_create_owned(&ClassLabels {
                    variant: variant.clone(),
                    class,
                })
            }),
            errors: self.errors.get_or_create_owned(&labels),
            latency: self.latency.get_or_create_owned(&labels),
            mirrors: MirrorOutcome::ALL.map(|o| {
                self.mirrors.get_or_create_owned(&OutcomeLabels {
                    variant: variant.clone(),
                    outcome: o.label(),
                })
            }),
        })
    }

    /// Records that the config in effect was loaded at `at`.
    pub fn config_loaded(&self, at: SystemTime) {
        let secs = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.config_loaded_at
            .set(i64::try_from(secs).unwrap_or(i64::MAX));
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// A label value escaped for the text format.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn render_has_per_variant_series_and_cumulative_buckets() {
        let m = Metrics::default();
        let a = m.variant("champion");
        a.requests.inc_by(3);
        assert_eq!(m.variant("champion").requests.get(), 3);
        a.response(200);
        a.response(503);
        a.errors.inc();
        a.latency(Duration::from_micros(300));
        a.latency(Duration::from_millis(3));
        a.latency(Duration::from_secs(60));
        m.variant("shadow").mirror(MirrorOutcome::Dropped);
        let t = m.encode();
        for line in [
            "keelson_router_requests_total{variant=\"champion\"} 3",
            "keelson_router_responses_total{variant=\"champion\",class=\"2xx\"} 1",
            "keelson_router_responses_total{variant=\"champion\",class=\"5xx\"} 1",
            "keelson_router_errors_total{variant=\"champion\"} 1",
            "keelson_router_upstream_latency_seconds_bucket{le=\"0.0005\",variant=\"champion\"} 1",
            "keelson_router_upstream_latency_seconds_bucket{le=\"0.005\",variant=\"champion\"} 2",
            "keelson_router_upstream_latency_seconds_bucket{le=\"10.0\",variant=\"champion\"} 2",
            "keelson_router_upstream_latency_seconds_bucket{le=\"+Inf\",variant=\"champion\"} 3",
            "keelson_router_upstream_latency_seconds_count{variant=\"champion\"} 3",
            "keelson_router_mirror_requests_total{variant=\"shadow\",outcome=\"dropped\"} 1",
            "keelson_router_requests_total{variant=\"shadow\"} 0",
            "# TYPE keelson_router_upstream_latency_seconds histogram",
        ] {
            assert!(t.lines().any(|l| l == line), "missing {line:?} in\n{t}");
        }
        assert_eq!(escape("a\"b\\c"), "a\\\"b\\\\c");
    }
}
