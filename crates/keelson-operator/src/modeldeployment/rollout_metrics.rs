//! What the Builtin router measured of each variant, read for a rollout's analysis.
//!
//! The signal is the router's own `/metrics` (admin port 9090), read by pod IP from every running
//! router pod of the ModelDeployment and summed. The router sees every request of the split, with
//! the variant it chose, the status the variant answered and the time to its response headers, so
//! this needs no Prometheus, no service mesh and no extra permission beyond listing pods. Counters
//! are cumulative: a rollout keeps the sample taken when its window opened ([`Windows`]) and judges
//! the difference when the window is due. A router pod restarted in between (its counters went
//! back) counts from zero; a pod gone since the window opened is left out.
//!
//! Read per variant (label `variant`): `keelson_router_responses_total` by class (5xx are
//! failures), `keelson_router_errors_total` (the router's own 502/503/504, failures too), and the
//! buckets of `keelson_router_upstream_latency_seconds`, from which the p99 is estimated as
//! Prometheus' `histogram_quantile` does.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use futures::future::join_all;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};

use super::names::{role_selector, ROLE_ROUTER};
use super::rollout::{Decision, Measurement, Rolling, Signal, Window};
use crate::httpget;
use keelson_api::rollout::{RolloutPhase, RolloutStatus};
use keelson_api::router_config::ROUTER_ADMIN_PORT;

/// How long one read of a router pod's `/metrics` may take.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// The quantile judged against `maxLatencyRatio`.
const QUANTILE: f64 = 0.99;

/// Cumulative counts of one variant on one router pod.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters {
    /// Responses (every class) plus the router's own errors.
    pub responses: f64,
    /// 5xx responses plus the router's own errors.
    pub failures: f64,
    /// Latency buckets: upper bound in seconds (`+Inf` last) and cumulative count.
    pub buckets: Vec<(f64, f64)>,
}

impl Counters {
    /// `self - base`, or `self` when the counters went back (the pod restarted).
    fn since(&self, base: &Counters) -> Counters {
        if self.responses < base.responses {
            return self.clone();
        }
        let buckets = self
            .buckets
            .iter()
            .map(|(le, n)| {
                let before = base
                    .buckets
                    .iter()
                    .find(|(l, _)| l == le)
                    .map_or(0.0, |(_, b)| *b);
                (*le, (n - before).max(0.0))
            })
            .collect();
        Counters {
            responses: self.responses - base.responses,
            failures: (self.failures - base.failures).max(0.0),
            buckets,
        }
    }

    fn add(&mut self, other: &Counters) {
        self.responses += other.responses;
        self.failures += other.failures;
        for (le, n) in &other.buckets {
            match self.buckets.iter_mut().find(|(l, _)| l == le) {
                Some((_, m)) => *m += n,
                None => self.buckets.push((*le, *n)),
            }
        }
        self.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
}

/// Counters of each variant on one router pod.
pub type PodCounters = BTreeMap<String, Counters>;

/// One reading of the router pods: when, and each pod's counters (by pod UID).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    pub at: Timestamp,
    pub pods: BTreeMap<String, PodCounters>,
}

/// One line of the text exposition: name, labels, value. `None` for comments and what does not
/// parse.
fn parse_line(line: &str) -> Option<(&str, BTreeMap<String, String>, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, rest) = match line.find('{') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => {
            let (n, v) = line.split_once(' ')?;
            return Some((n, BTreeMap::new(), parse_value(v)?));
        }
    };
    let mut labels = BTreeMap::new();
    let mut chars = rest.char_indices().peekable();
    let end;
    loop {
        while chars.peek().is_some_and(|(_, c)| *c == ',' || *c == ' ') {
            chars.next();
        }
        match chars.peek() {
            Some((i, '}')) => {
                end = *i;
                break;
            }
            None => return None,
            _ => {}
        }
        let mut key = String::new();
        for (_, c) in chars.by_ref() {
            if c == '=' {
                break;
            }
            key.push(c);
        }
        if chars.next().map(|(_, c)| c) != Some('"') {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()?.1 {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        labels.insert(key.trim().to_string(), value);
    }
    let value = parse_value(rest[end + 1..].trim())?;
    Some((name, labels, value))
}

/// The value of a sample line (a timestamp after it is ignored).
fn parse_value(s: &str) -> Option<f64> {
    let v = s.split_whitespace().next()?;
    match v {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => v.parse().ok(),
    }
}

/// The per-variant counters in the router's `/metrics` text.
pub fn parse(text: &str) -> PodCounters {
    let mut out = PodCounters::new();
    for (name, labels, value) in text.lines().filter_map(parse_line) {
        let Some(variant) = labels.get("variant") else {
            continue;
        };
        let c = out.entry(variant.clone()).or_default();
        match name {
            "keelson_router_responses_total" => {
                c.responses += value;
                if labels.get("class").map(String::as_str) == Some("5xx") {
                    c.failures += value;
                }
            }
            "keelson_router_errors_total" => {
                c.responses += value;
                c.failures += value;
            }
            "keelson_router_upstream_latency_seconds_bucket" => {
                let le = labels.get("le").and_then(|l| parse_value(l));
                if let Some(le) = le {
                    c.buckets.push((le, value));
                }
            }
            _ => {}
        }
    }
    for c in out.values_mut() {
        c.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

/// The `q` quantile of cumulative `buckets`, as Prometheus' `histogram_quantile` estimates it
/// (linear within the bucket; the highest finite bound when it falls in `+Inf`). `None` without
/// observations.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (le, n) in buckets {
        if *n >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            if *n <= below {
                return Some(*le);
            }
            return Some(lower + (le - lower) * (rank - below) / (n - below));
        }
        (lower, below) = (*le, *n);
    }
    Some(lower)
}

/// What happened to the counters of each variant between two samples, summed over the pods.
fn window(base: &Sample, now: &Sample) -> PodCounters {
    let mut out = PodCounters::new();
    for (pod, counters) in &now.pods {
        for (variant, c) in counters {
            let d = match base.pods.get(pod).and_then(|p| p.get(variant)) {
                Some(b) => c.since(b),
                None => c.clone(),
            };
            out.entry(variant.clone()).or_default().add(&d);
        }
    }
    out
}

/// The measurement of `variant` between two samples; the baseline p99 is that of every other
/// variant together.
pub fn measure(base: &Sample, now: &Sample, variant: &str) -> Measurement {
    let w = window(base, now);
    let mine = w.get(variant).cloned().unwrap_or_default();
    let mut others = Counters::default();
    for (_, c) in w.iter().filter(|(name, _)| name.as_str() != variant) {
        others.add(c);
    }
    let ms = now.at.as_millisecond() - base.at.as_millisecond();
    Measurement {
        seconds: ms as f64 / 1000.0,
        requests: mine.responses.max(0.0) as u64,
        failures: mine.failures.max(0.0) as u64,
        p99: quantile(QUANTILE, &mine.buckets),
        baseline_p99: quantile(QUANTILE, &others.buckets),
    }
}

/// Reads `/metrics` from every running router pod of the ModelDeployment `name`. An error when
/// no pod could be read, saying why (the status shows it, so it names no address).
pub async fn read(client: &Client, ns: &str, name: &str, at: Timestamp) -> Result<Sample, String> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let selector = role_selector(name, ROLE_ROUTER)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods = api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|e| format!("the router pods could not be listed: {e}"))?;
    let running: Vec<(String, String)> = pods
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .filter_map(|p| {
            let ip = p.status.as_ref()?.pod_ip.clone()?;
            Some((p.uid().unwrap_or_else(|| p.name_any()), ip))
        })
        .collect();
    if running.is_empty() {
        return Err(format!(
            "no running router pod {name}-router has an IP to read /metrics from"
        ));
    }
    read_pods(&running, ROUTER_ADMIN_PORT, at).await
}

/// Reads `/metrics` at `port` of each `(uid, ip)` in parallel; an error when none answered.
pub async fn read_pods(
    pods: &[(String, String)],
    port: i32,
    at: Timestamp,
) -> Result<Sample, String> {
    let reads = join_all(
        pods.iter()
            .map(|(_, ip)| httpget::get(ip, port, "/metrics", &[], READ_TIMEOUT)),
    )
    .await;
    let mut sample = Sample {
        at,
        pods: BTreeMap::new(),
    };
    for ((uid, _), body) in pods.iter().zip(reads) {
        match body {
            Ok(b) => {
                sample
                    .pods
                    .insert(uid.clone(), parse(&String::from_utf8_lossy(&b)));
            }
            Err(e) => tracing::debug!(error = %e, "router /metrics not read"),
        }
    }
    if sample.pods.is_empty() {
        return Err(format!(
            "no router pod answered GET /metrics on port {port} within {}s ({} running)",
            READ_TIMEOUT.as_secs(),
            pods.len()
        ));
    }
    Ok(sample)
}

/// An analysis window that is open: the rollout, step and the sample it opened with.
#[derive(Clone, Debug)]
struct Open {
    revision: String,
    step: i32,
    baseline: Sample,
}

/// The open analysis window of each rolling ModelDeployment, by `namespace/name`. Lost when the
/// operator restarts: the rollout then opens a new window (and judges nothing before it closes).
#[derive(Debug, Default)]
pub struct Windows(Mutex<HashMap<String, Open>>);

/// What [`Windows::sense`] found: the signal, and the sample it read, if any.
#[derive(Clone, Debug)]
pub struct Sensed {
    pub signal: Signal,
    sample: Option<Sample>,
}

impl Windows {
    fn open(&self, key: &str) -> Option<Open> {
        self.0.lock().ok()?.get(key).cloned()
    }

    /// The signal for the rollout `r` starting from `state`: the router is read when a window must
    /// open (none for this step yet) or is due; otherwise nothing is read.
    pub async fn sense(
        &self,
        client: &Client,
        key: &str,
        (ns, name): (&str, &str),
        r: &Rolling<'_>,
        state: &RolloutStatus,
        now: Timestamp,
    ) -> Sensed {
        let off = Sensed {
            signal: Signal::Off,
            sample: None,
        };
        let Some(analysis) = r.rollout.analysis.as_ref() else {
            return off;
        };
        if matches!(
            state.phase,
            RolloutPhase::Promoted | RolloutPhase::RolledBack
        ) {
            return off;
        }
        let open = self
            .open(key)
            .filter(|o| o.revision == state.revision && o.step == state.step);
        if let Some(o) = &open {
            let due = o.baseline.at.as_second() + i64::from(analysis.window());
            if now.as_second() < due {
                return Sensed {
                    signal: Signal::Open(o.baseline.at),
                    sample: None,
                };
            }
        }
        match read(client, ns, name, now).await {
            Err(why) => Sensed {
                signal: Signal::Unavailable(why),
                sample: None,
            },
            Ok(sample) => match open {
                Some(o) => Sensed {
                    signal: Signal::Due(measure(&o.baseline, &sample, &r.variant.name)),
                    sample: Some(sample),
                },
                None => {
                    if let Ok(mut m) = self.0.lock() {
                        m.insert(
                            key.to_string(),
                            Open {
                                revision: state.revision.clone(),
                                step: state.step,
                                baseline: sample.clone(),
                            },
                        );
                    }
                    Sensed {
                        signal: Signal::Open(sample.at),
                        sample: None,
                    }
                }
            },
        }
    }

    /// Applies the decision to the window: a closed window restarts from the sample just read,
    /// under the step the rollout is now at; a finished rollout drops it.
    pub fn settle(&self, key: &str, decision: &Decision, sensed: Sensed) {
        let Ok(mut m) = self.0.lock() else {
            return;
        };
        let st = &decision.status;
        if matches!(st.phase, RolloutPhase::Promoted | RolloutPhase::RolledBack) {
            m.remove(key);
            return;
        }
        if let (Window::Restart, Some(sample)) = (decision.window, sensed.sample) {
            m.insert(
                key.to_string(),
                Open {
                    revision: st.revision.clone(),
                    step: st.step,
                    baseline: sample,
                },
            );
        }
    }

    /// Drops the window of a ModelDeployment that is gone or no longer rolls out.
    pub fn forget(&self, key: &str) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(key);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use keelson_router::metrics::Metrics;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    #[test]
    fn parses_what_the_router_writes() {
        let m = Metrics::default();
        let a = m.variant("champion");
        let b = m.variant("chal\"lenger");
        for _ in 0..3 {
            a.requests.inc();
            a.response(200);
            a.latency(Duration::from_millis(3));
        }
        a.response(503);
        a.latency(Duration::from_millis(30));
        a.errors.inc();
        b.response(404);
        b.latency(Duration::from_secs(60));
        let c = parse(&m.encode());
        let champ = &c["champion"];
        // 4 answers from the upstream plus one of the router's own.
        assert_eq!((champ.responses, champ.failures), (5.0, 2.0));
        assert_eq!(champ.buckets.len(), 15);
        assert_eq!(champ.buckets.last().unwrap(), &(f64::INFINITY, 4.0));
        assert!(champ.buckets.contains(&(0.005, 3.0)));
        assert!(champ.buckets.windows(2).all(|w| w[0].0 < w[1].0));
        // Label values are unescaped.
        let chal = &c["chal\"lenger"];
        assert_eq!((chal.responses, chal.failures), (1.0, 0.0));
        assert_eq!(quantile(0.99, &chal.buckets), Some(10.0));
    }

    /// Serves `body` as `/metrics` on a local port until the test ends.
    async fn serve(body: String) -> i32 {
        crate::httpget::test_server(move |_| {
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/openmetrics-text\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
        })
        .await
    }

    #[tokio::test]
    async fn reads_the_router_over_http_and_judges_a_window() {
        let m = Metrics::default();
        let (canary, stable) = (m.variant("canary"), m.variant("stable"));
        let port = serve(m.encode()).await;
        let pod = [("uid-1".to_string(), "127.0.0.1".to_string())];
        let base = read_pods(&pod, port, at(0)).await.unwrap();
        assert_eq!(base.pods["uid-1"]["canary"].responses, 0.0);
        for i in 0..100 {
            canary.response(if i < 7 { 500 } else { 200 });
            canary.latency(Duration::from_millis(40));
            stable.response(200);
            stable.latency(Duration::from_millis(4));
        }
        let port = serve(m.encode()).await;
        let now = read_pods(&pod, port, at(60)).await.unwrap();
        let w = measure(&base, &now, "canary");
        assert_eq!((w.requests, w.failures, w.seconds), (100, 7, 60.0));
        assert!(w.latency_ratio().unwrap() > 5.0, "{w:?}");
        // Nothing listens: an error that says so, with no address in it.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = i32::from(closed.local_addr().unwrap().port());
        drop(closed);
        let err = read_pods(&pod, dead, at(0)).await.unwrap_err();
        assert!(
            err.starts_with("no router pod answered GET /metrics"),
            "{err}"
        );
        assert!(!err.contains("127.0.0.1"), "{err}");
    }

    #[test]
    fn lines_that_are_not_samples_are_skipped() {
        let text = "# HELP x\n# TYPE x counter\nkeelson_router_errors_total{variant=\"a\"} 2 1700000000\ngarbage{variant=\"b\n# EOF\nup 1\n";
        let c = parse(text);
        assert_eq!(c.len(), 1);
        assert_eq!((c["a"].responses, c["a"].failures), (2.0, 2.0));
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let b = [(0.01, 50.0), (0.1, 100.0), (f64::INFINITY, 100.0)];
        assert_eq!(quantile(0.5, &b), Some(0.01));
        let p99 = quantile(0.99, &b).unwrap();
        assert!((p99 - 0.0982).abs() < 1e-9, "{p99}");
        assert_eq!(quantile(0.99, &[(0.01, 0.0), (f64::INFINITY, 0.0)]), None);
        // In +Inf: the highest finite bound.
        assert_eq!(
            quantile(0.99, &[(0.01, 1.0), (f64::INFINITY, 10.0)]),
            Some(0.01)
        );
    }

    fn counters(responses: f64, failures: f64, fast: f64, slow: f64) -> Counters {
        Counters {
            responses,
            failures,
            buckets: vec![
                (0.01, fast),
                (1.0, fast + slow),
                (f64::INFINITY, fast + slow),
            ],
        }
    }

    #[test]
    fn a_window_sums_pods_and_survives_a_restart() {
        let pod = |canary: Counters, stable: Counters| {
            BTreeMap::from([
                ("canary".to_string(), canary),
                ("stable".to_string(), stable),
            ])
        };
        let base = Sample {
            at: at(1000),
            pods: BTreeMap::from([
                (
                    "p1".into(),
                    pod(
                        counters(100.0, 1.0, 100.0, 0.0),
                        counters(900.0, 0.0, 900.0, 0.0),
                    ),
                ),
                (
                    "p2".into(),
                    pod(
                        counters(50.0, 0.0, 50.0, 0.0),
                        counters(500.0, 0.0, 500.0, 0.0),
                    ),
                ),
            ]),
        };
        let now = Sample {
            at: at(1060),
            pods: BTreeMap::from([
                // +100 canary (10 failed, all slow), +900 stable (fast).
                (
                    "p1".into(),
                    pod(
                        counters(200.0, 11.0, 100.0, 100.0),
                        counters(1800.0, 0.0, 1800.0, 0.0),
                    ),
                ),
                // Restarted: counts from zero.
                (
                    "p2".into(),
                    pod(
                        counters(20.0, 0.0, 0.0, 20.0),
                        counters(80.0, 0.0, 80.0, 0.0),
                    ),
                ),
                // New since the window opened.
                (
                    "p3".into(),
                    pod(counters(5.0, 0.0, 5.0, 0.0), counters(0.0, 0.0, 0.0, 0.0)),
                ),
            ]),
        };
        let m = measure(&base, &now, "canary");
        assert_eq!(m.seconds, 60.0);
        assert_eq!((m.requests, m.failures), (125, 10));
        // 5 fast of 125: the p99 is among the slow ones.
        assert!(m.p99.unwrap() > 0.9, "{m:?}");
        assert!(m.baseline_p99.unwrap() <= 0.01, "{m:?}");
        assert!(m.latency_ratio().unwrap() > 90.0);
    }
}
