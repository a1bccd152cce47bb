//! The router's metrics, in the Prometheus text format on the admin port's `/metrics`.
//!
//! Per variant (label `variant`): requests routed to it, responses by status class, errors the
//! router answered itself (upstream unreachable or too slow), the time to the upstream's response
//! headers as a histogram, and the mirror copies it received by outcome. Counters are plain atomics
//! updated on the request path; the per-variant set is created when a config first names the
//! variant and kept across reloads, so counters never go back.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds of the latency histogram buckets, in seconds.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Non-cumulative counts per bucket; the last slot is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_nanos
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }
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

/// The metrics of one variant.
#[derive(Debug, Default)]
pub struct VariantMetrics {
    pub requests: AtomicU64,
    /// Responses from the upstream by status class: 1xx, 2xx, 3xx, 4xx, 5xx.
    responses: [AtomicU64; 5],
    /// Requests the router answered itself with 502 or 504 (upstream down or too slow).
    pub errors: AtomicU64,
    pub latency: Histogram,
    mirrors: [AtomicU64; 4],
}

impl VariantMetrics {
    pub fn response(&self, status: u16) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.responses[class].fetch_add(1, Relaxed);
    }

    pub fn mirror(&self, outcome: MirrorOutcome) {
        self.mirrors[outcome as usize].fetch_add(1, Relaxed);
    }

    pub fn mirrored(&self, outcome: MirrorOutcome) -> u64 {
        self.mirrors[outcome as usize].load(Relaxed)
    }
}

/// Every metric of the router.
#[derive(Debug, Default)]
pub struct Metrics {
    variants: Mutex<BTreeMap<String, Arc<VariantMetrics>>>,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    /// Seconds since the Unix epoch of the last config that was loaded (0: none yet).
    pub config_loaded_at: AtomicU64,
}

impl Metrics {
    /// The metrics of `variant`, created on first use.
    pub fn variant(&self, variant: &str) -> Arc<VariantMetrics> {
        let mut map = self
            .variants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.entry(variant.to_string()).or_default().clone()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let variants: Vec<(String, Arc<VariantMetrics>)> = self
            .variants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (escape(k), v.clone()))
            .collect();
        let mut text = String::with_capacity(4096);
        add_family(
            &mut text,
            "keelson_router_requests_total",
            "counter",
            "Requests routed to a variant.",
        );
        for (v, m) in &variants {
            let _ = writeln!(
                text,
                "keelson_router_requests_total{{variant=\"{v}\"}} {}",
                m.requests.load(Relaxed)
            );
        }
        add_family(
            &mut text,
            "keelson_router_responses_total",
            "counter",
            "Responses from a variant's upstream, by status class.",
        );
        for (v, m) in &variants {
            for (i, c) in m.responses.iter().enumerate() {
                let _ = writeln!(
                    text,
                    "keelson_router_responses_total{{variant=\"{v}\",class=\"{}xx\"}} {}",
                    i + 1,
                    c.load(Relaxed)
                );
            }
        }
        add_family(
            &mut text,
            "keelson_router_errors_total",
            "counter",
            "Requests the router answered itself because the variant's upstream was unreachable (502) or too slow (504).",
        );
        for (v, m) in &variants {
            let _ = writeln!(
                text,
                "keelson_router_errors_total{{variant=\"{v}\"}} {}",
                m.errors.load(Relaxed)
            );
        }
        add_family(
            &mut text,
            "keelson_router_upstream_latency_seconds",
            "histogram",
            "Time from routing a request to the variant's response headers.",
        );
        for (v, m) in &variants {
            let h = &m.latency;
            let mut cumulative = 0;
            for (i, b) in h.buckets.iter().enumerate() {
                cumulative += b.load(Relaxed);
                let le = LATENCY_BUCKETS
                    .get(i)
                    .map_or_else(|| "+Inf".to_string(), |b| b.to_string());
                let _ = writeln!(
                    text,
                    "keelson_router_upstream_latency_seconds_bucket{{variant=\"{v}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                text,
                "keelson_router_upstream_latency_seconds_sum{{variant=\"{v}\"}} {}",
                h.sum_nanos.load(Relaxed) as f64 / 1e9
            );
            let _ = writeln!(
                text,
                "keelson_router_upstream_latency_seconds_count{{variant=\"{v}\"}} {}",
                h.count()
            );
        }
        add_family(
            &mut text,
            "keelson_router_mirror_requests_total",
            "counter",
            "Mirror copies for a variant by outcome: sent, failed, dropped (too many in flight), skipped (body too large or of unknown length).",
        );
        for (v, m) in &variants {
            for o in MirrorOutcome::ALL {
                let _ = writeln!(
                    text,
                    "keelson_router_mirror_requests_total{{variant=\"{v}\",outcome=\"{}\"}} {}",
                    o.label(),
                    m.mirrored(o)
                );
            }
        }
        add_family(
            &mut text,
            "keelson_router_config_reloads_total",
            "counter",
            "Config file loads by result (a failed load keeps the last good config).",
        );
        let _ = writeln!(
            text,
            "keelson_router_config_reloads_total{{result=\"ok\"}} {}\nkeelson_router_config_reloads_total{{result=\"error\"}} {}",
            self.reloads_ok.load(Relaxed),
            self.reloads_failed.load(Relaxed)
        );
        add_family(
            &mut text,
            "keelson_router_config_loaded_timestamp_seconds",
            "gauge",
            "When the config in effect was loaded (0: none yet).",
        );
        let _ = writeln!(
            text,
            "keelson_router_config_loaded_timestamp_seconds {}",
            self.config_loaded_at.load(Relaxed)
        );
        text
    }
}

fn add_family(text: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} {kind}");
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
        assert!(Arc::ptr_eq(&a, &m.variant("champion")));
        a.requests.fetch_add(3, Relaxed);
        a.response(200);
        a.response(503);
        a.errors.fetch_add(1, Relaxed);
        a.latency.observe(Duration::from_micros(300));
        a.latency.observe(Duration::from_millis(3));
        a.latency.observe(Duration::from_secs(60));
        m.variant("shadow").mirror(MirrorOutcome::Dropped);
        let t = m.render();
        for line in [
            "keelson_router_requests_total{variant=\"champion\"} 3",
            "keelson_router_responses_total{variant=\"champion\",class=\"2xx\"} 1",
            "keelson_router_responses_total{variant=\"champion\",class=\"5xx\"} 1",
            "keelson_router_errors_total{variant=\"champion\"} 1",
            "keelson_router_upstream_latency_seconds_bucket{variant=\"champion\",le=\"0.0005\"} 1",
            "keelson_router_upstream_latency_seconds_bucket{variant=\"champion\",le=\"0.005\"} 2",
            "keelson_router_upstream_latency_seconds_bucket{variant=\"champion\",le=\"10\"} 2",
            "keelson_router_upstream_latency_seconds_bucket{variant=\"champion\",le=\"+Inf\"} 3",
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
