//! Progressive rollout: the decision. Pure: the previous rollout status, the readiness of the
//! rolling variant, what the router measured ([`Signal`], read by [`super::rollout_metrics`]) and
//! the time come in; the next rollout status, what to do with the analysis window and when to look
//! again come out.
//!
//! - A rollout is identified by the rolling variant and its revision, a hash of everything in the
//!   variant that reaches its pods, plus its `rollout`: a new revision starts again at step 1.
//!   Weight, replicas and autoscaling are left out, so scaling or re-weighting never restarts it.
//! - A step lasts at least its pause, counted from the moment it began. Without `analysis` it is
//!   promoted when the pause is over (and the variant has a ready pod). With `analysis` it is
//!   promoted at the close of the first window that ends after the pause and stays within bounds.
//! - A window closes when it is at least `windowSeconds` long and holds at least `minRequests`
//!   responses of the variant; with fewer it stays open (phase `Paused`, `TooFewRequests`, once
//!   the pause is over). A closed window that breaks a bound rolls the variant back at once, pause
//!   or not: weight 0 until the revision changes.
//! - No measurement at all (`MetricsUnavailable`): the step is held, never promoted blind.
//! - The last step passed: phase `Promoted`, the variant has its spec `weight`, and the rollout is
//!   complete.
//!
//! The timeline (`history`) gets an entry when the step, the phase or the reason of a hold
//! changes, never for a new measurement inside a phase, and keeps the last 32.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::gate::shares_of;
use crate::runtime::apply::fnv64;
use crate::runtime::driver::Note;
use keelson_api::modeldeployment::{ModelDeployment, Variant};
use keelson_api::rollout::{
    Analysis, Rollout, RolloutPhase, RolloutRecord, RolloutStatus, HISTORY_LIMIT,
};

/// How long a rollout held for want of measurements waits before it reads the router again.
pub const METRICS_RETRY: Duration = Duration::from_secs(30);

pub const REASON_PAUSING: &str = "Pausing";
pub const REASON_ANALYSING: &str = "Analysing";
pub const REASON_METRICS_UNAVAILABLE: &str = "MetricsUnavailable";
pub const REASON_TOO_FEW_REQUESTS: &str = "TooFewRequests";
pub const REASON_VARIANT_NOT_READY: &str = "VariantNotReady";
pub const REASON_STEP_PASSED: &str = "StepPassed";
pub const REASON_COMPLETE: &str = "RolloutComplete";
pub const REASON_ERROR_RATIO: &str = "ErrorRatioExceeded";
pub const REASON_LATENCY_RATIO: &str = "LatencyRatioExceeded";

/// What the router measured of the rolling variant over one window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Measurement {
    /// Length of the window.
    pub seconds: f64,
    /// Responses of the variant (every status, plus the router's own errors for it).
    pub requests: u64,
    /// Of those, 5xx answers and the router's own 502/503/504.
    pub failures: u64,
    /// p99 time to response headers of the variant, in seconds.
    pub p99: Option<f64>,
    /// p99 of the other variants together in the same window (none when they had no request).
    pub baseline_p99: Option<f64>,
}

impl Measurement {
    pub fn error_ratio(&self) -> f64 {
        if self.requests == 0 {
            return 0.0;
        }
        self.failures as f64 / self.requests as f64
    }

    /// The variant's p99 over the others', when both are known.
    pub fn latency_ratio(&self) -> Option<f64> {
        match (self.p99, self.baseline_p99) {
            (Some(p), Some(b)) if b > 0.0 => Some(p / b),
            _ => None,
        }
    }

    fn describe(&self) -> String {
        let latency = match (self.p99, self.baseline_p99, self.latency_ratio()) {
            (Some(p), Some(b), Some(r)) => format!(
                ", p99 {} vs {} for the others ({r:.2}x)",
                millis(p),
                millis(b)
            ),
            (Some(p), _, _) => format!(", p99 {} (the others had no request)", millis(p)),
            _ => String::new(),
        };
        format!(
            "{} responses in {:.0}s, {} failed ({:.2}%){latency}",
            self.requests,
            self.seconds,
            self.failures,
            self.error_ratio() * 100.0
        )
    }
}

fn millis(secs: f64) -> String {
    format!("{:.1}ms", secs * 1000.0)
}

/// What the analysis has to go on at this reconcile.
#[derive(Clone, Debug, PartialEq)]
pub enum Signal {
    /// The rollout has no analysis, or is over.
    Off,
    /// No router pod could be read.
    Unavailable(String),
    /// A window is open since this moment and is not due yet.
    Open(Timestamp),
    /// The open window is due: what it holds.
    Due(Measurement),
}

/// What to do with the analysis window after the decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    /// Keep the window open (its baseline stays).
    Keep,
    /// Close it: the next window starts from the sample just read.
    Restart,
}

/// The outcome of one decision.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub status: RolloutStatus,
    pub window: Window,
    /// When to look again (a pause or a window ending, a retry); `None`: on the next change.
    pub requeue: Option<Duration>,
}

/// The variant that rolls out, with its rollout and revision.
#[derive(Clone, Debug)]
pub struct Rolling<'a> {
    pub index: usize,
    pub variant: &'a Variant,
    pub rollout: &'a Rollout,
    pub revision: String,
}

/// The revision of a variant: a hash of what reaches its pods, plus its rollout.
pub fn revision(v: &Variant) -> String {
    let mut pods = v.clone();
    pods.weight = 0;
    pods.replicas = None;
    pods.autoscaling = None;
    let bytes = serde_json::to_vec(&pods).unwrap_or_default();
    format!("{:016x}", fnv64(&bytes))
}

/// The variant of `md` that carries a rollout (the API server admits at most one).
pub fn rolling(md: &ModelDeployment) -> Option<Rolling<'_>> {
    md.spec.variants.iter().enumerate().find_map(|(index, v)| {
        v.rollout.as_ref().map(|rollout| Rolling {
            index,
            variant: v,
            rollout,
            revision: revision(v),
        })
    })
}

/// The weights the rollout asks for, in spec order: the rolling variant gets the share of its
/// step (0 when rolled back, its spec weight once promoted), and the others share the rest in
/// proportion to their spec weights (evenly when those are all 0). Without a rollout, the spec's.
pub fn weights(md: &ModelDeployment, rollout: Option<&RolloutStatus>) -> Vec<i32> {
    let spec: Vec<i32> = md.spec.variants.iter().map(|v| v.weight).collect();
    let Some(r) = rollout else {
        return spec;
    };
    let Some(i) = md.spec.variants.iter().position(|v| v.name == r.variant) else {
        return spec;
    };
    if r.weight == spec[i] || md.spec.variants.len() < 2 {
        return spec;
    }
    let rest = 100 - r.weight.clamp(0, 100);
    let mut others: Vec<i32> = spec
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != i)
        .map(|(_, w)| *w)
        .collect();
    if others.iter().all(|w| *w == 0) {
        others.fill(1);
    }
    let mut shared = shares_of(rest, &others).into_iter();
    (0..spec.len())
        .map(|j| {
            if j == i {
                r.weight.clamp(0, 100)
            } else {
                shared.next().unwrap_or(0)
            }
        })
        .collect()
}

fn seconds(d: i64) -> Duration {
    Duration::from_secs(u64::try_from(d).unwrap_or(0).max(1))
}

fn summary(variant: &str, step: i32, steps: i32, phase: RolloutPhase) -> String {
    format!("{variant} {step}/{steps} {phase:?}")
}

/// The current state of the rollout: `prev` when it is the same rollout, else a new one at step 1.
pub fn current(r: &Rolling<'_>, prev: Option<&RolloutStatus>, now: &Time) -> RolloutStatus {
    let steps = i32::try_from(r.rollout.steps.len()).unwrap_or(i32::MAX);
    match prev {
        Some(p)
            if p.variant == r.variant.name
                && p.revision == r.revision
                && p.step >= 1
                && p.step <= steps =>
        {
            p.clone()
        }
        _ => {
            let weight = r.rollout.steps.first().map_or(0, |s| s.weight);
            let message = format!("rollout of revision {} begins", r.revision);
            RolloutStatus {
                variant: r.variant.name.clone(),
                revision: r.revision.clone(),
                step: 1,
                steps,
                weight,
                phase: RolloutPhase::Progressing,
                since: now.clone(),
                reason: "RolloutStarted".into(),
                summary: summary(&r.variant.name, 1, steps, RolloutPhase::Progressing),
                history: vec![RolloutRecord {
                    step: 1,
                    weight,
                    phase: RolloutPhase::Progressing,
                    since: now.clone(),
                    reason: "RolloutStarted".into(),
                    message: message.clone(),
                }],
                message,
            }
        }
    }
}

/// Moves `st` to `step` and `phase` (a new history entry when either changes) with this reason.
fn enter(
    st: &mut RolloutStatus,
    step: i32,
    weight: i32,
    phase: RolloutPhase,
    reason: &str,
    message: String,
    now: &Time,
) {
    // A new hold reason is a new entry too: the timeline says what the rollout waited for.
    let moved = st.step != step
        || st.phase != phase
        || (phase == RolloutPhase::Paused && st.reason != reason);
    if st.step != step {
        st.since = now.clone();
    }
    st.step = step;
    st.weight = weight;
    st.phase = phase;
    st.reason = reason.to_string();
    st.summary = summary(&st.variant, step, st.steps, phase);
    if moved {
        st.history.push(RolloutRecord {
            step,
            weight,
            phase,
            since: now.clone(),
            reason: reason.to_string(),
            message: message.clone(),
        });
        let extra = st.history.len().saturating_sub(HISTORY_LIMIT);
        st.history.drain(..extra);
    }
    st.message = message;
}

/// A bound the measurement breaks, as (reason, message).
fn broken(a: &Analysis, m: &Measurement) -> Option<(&'static str, String)> {
    if let Some(max) = a.max_error_ratio {
        if m.error_ratio() > max {
            return Some((
                REASON_ERROR_RATIO,
                format!(
                    "{}: error ratio {:.4} is above rollout.analysis.maxErrorRatio {max}",
                    m.describe(),
                    m.error_ratio()
                ),
            ));
        }
    }
    if let (Some(max), Some(ratio)) = (a.max_latency_ratio, m.latency_ratio()) {
        if ratio > max {
            return Some((
                REASON_LATENCY_RATIO,
                format!(
                    "{}: p99 ratio {ratio:.2} is above rollout.analysis.maxLatencyRatio {max}",
                    m.describe()
                ),
            ));
        }
    }
    None
}

/// The next state of the rollout of `r`.
pub fn decide(
    r: &Rolling<'_>,
    prev: Option<&RolloutStatus>,
    ready: bool,
    signal: &Signal,
    now: &Time,
) -> Decision {
    let mut st = current(r, prev, now);
    let spec_weight = r.variant.weight;
    let hold = |st: RolloutStatus, window, requeue| Decision {
        status: st,
        window,
        requeue,
    };
    match st.phase {
        RolloutPhase::Promoted => {
            // A weight edit after the rollout moves the variant at once.
            st.weight = spec_weight;
            return hold(st, Window::Keep, None);
        }
        RolloutPhase::RolledBack => return hold(st, Window::Keep, None),
        RolloutPhase::Progressing | RolloutPhase::Paused => {}
    }
    let steps = &r.rollout.steps;
    let idx = usize::try_from(st.step - 1).unwrap_or(0);
    let Some(step) = steps.get(idx) else {
        return hold(st, Window::Keep, None);
    };
    let (n, weight) = (st.step, step.weight);
    let pause_end = st.since.0.as_second() + i64::from(step.pause());
    let left = pause_end - now.0.as_second();
    let pause_over = left <= 0;

    // Promotes the step: the next one, or the end of the rollout.
    let advance = |mut st: RolloutStatus, message: String, window: Window| {
        if idx + 1 >= steps.len() {
            let message = format!("{message}; the variant has its weight {spec_weight}");
            enter(
                &mut st,
                n,
                spec_weight,
                RolloutPhase::Promoted,
                REASON_COMPLETE,
                message,
                now,
            );
            return Decision {
                status: st,
                window,
                requeue: None,
            };
        }
        let next = &steps[idx + 1];
        let message = format!("{message}; step {} of {} begins", n + 1, st.steps);
        enter(
            &mut st,
            n + 1,
            next.weight,
            RolloutPhase::Progressing,
            REASON_STEP_PASSED,
            message,
            now,
        );
        let requeue = match &r.rollout.analysis {
            Some(a) => seconds(i64::from(a.window())),
            None => seconds(i64::from(next.pause())),
        };
        Decision {
            status: st,
            window,
            requeue: Some(requeue),
        }
    };

    if !ready {
        let message = format!(
            "variant {} has no ready pod: step {n} is held until it has",
            r.variant.name
        );
        enter(
            &mut st,
            n,
            weight,
            RolloutPhase::Paused,
            REASON_VARIANT_NOT_READY,
            message,
            now,
        );
        return hold(st, Window::Keep, None);
    }

    let Some(analysis) = r.rollout.analysis.as_ref() else {
        if pause_over {
            let message = format!("step {n} held weight {weight} for {}s", step.pause());
            return advance(st, message, Window::Keep);
        }
        let message = format!(
            "step {n} holds weight {weight} for {}s, until {}",
            step.pause(),
            Timestamp::from_second(pause_end).map_or_else(|_| String::new(), |t| t.to_string())
        );
        enter(
            &mut st,
            n,
            weight,
            RolloutPhase::Progressing,
            REASON_PAUSING,
            message,
            now,
        );
        return hold(st, Window::Keep, Some(seconds(left)));
    };

    let window = i64::from(analysis.window());
    match signal {
        // A rollout with analysis always has a signal; treated as no measurement.
        Signal::Off | Signal::Unavailable(_) => {
            let why = match signal {
                Signal::Unavailable(why) => why.clone(),
                _ => "no measurement".to_string(),
            };
            let message =
                format!("{why}; step {n} is held at weight {weight} until the router can be read");
            enter(
                &mut st,
                n,
                weight,
                RolloutPhase::Paused,
                REASON_METRICS_UNAVAILABLE,
                message,
                now,
            );
            hold(st, Window::Keep, Some(METRICS_RETRY))
        }
        Signal::Open(opened) => {
            let due = opened.as_second() + window;
            // Inside Progressing, the last window's message stays until the next one closes.
            if st.phase != RolloutPhase::Progressing || st.reason != REASON_ANALYSING {
                let message =
                    format!("step {n} at weight {weight}: measuring the window opened at {opened}");
                enter(
                    &mut st,
                    n,
                    weight,
                    RolloutPhase::Progressing,
                    REASON_ANALYSING,
                    message,
                    now,
                );
            }
            hold(st, Window::Keep, Some(seconds(due - now.0.as_second())))
        }
        Signal::Due(m) => {
            // Too few responses to judge, whatever they say: wait for more.
            if i64::try_from(m.requests).unwrap_or(i64::MAX) < analysis.min() {
                let message = format!(
                    "{}: fewer than rollout.analysis.minRequests {}; the window stays open",
                    m.describe(),
                    analysis.min()
                );
                let (phase, reason) = if pause_over {
                    (RolloutPhase::Paused, REASON_TOO_FEW_REQUESTS)
                } else {
                    (RolloutPhase::Progressing, REASON_ANALYSING)
                };
                enter(&mut st, n, weight, phase, reason, message, now);
                return hold(st, Window::Keep, Some(seconds(window)));
            }
            if let Some((reason, message)) = broken(analysis, m) {
                enter(
                    &mut st,
                    n,
                    0,
                    RolloutPhase::RolledBack,
                    reason,
                    format!("rolled back at step {n}: {message}"),
                    now,
                );
                return hold(st, Window::Keep, None);
            }
            let within = format!("window within bounds: {}", m.describe());
            if pause_over {
                return advance(st, within, Window::Restart);
            }
            enter(
                &mut st,
                n,
                weight,
                RolloutPhase::Progressing,
                REASON_ANALYSING,
                format!("{within}; step {n} is held for its pause"),
                now,
            );
            hold(st, Window::Restart, Some(seconds(left.min(window))))
        }
    }
}

/// The Events of a rollout that moved from `prev` to `new`: a new rollout, a promoted step, a hold,
/// the end (Normal), and a rollback or a hold for want of measurements (Warning).
pub fn notes(prev: Option<&RolloutStatus>, new: Option<&RolloutStatus>) -> Vec<Note> {
    let Some(new) = new else {
        return Vec::new();
    };
    let same = |p: &RolloutStatus| p.variant == new.variant && p.revision == new.revision;
    let moved = |p: &RolloutStatus| p.step != new.step || p.phase != new.phase;
    let what = format!(
        "variant {} step {}/{} (weight {}): {}",
        new.variant, new.step, new.steps, new.weight, new.message
    );
    match prev {
        Some(p) if same(p) && !moved(p) => Vec::new(),
        Some(p) if same(p) => vec![match new.phase {
            RolloutPhase::RolledBack => Note::warning("RolledBack", what),
            RolloutPhase::Promoted => Note::normal(REASON_COMPLETE, what),
            RolloutPhase::Paused if new.reason == REASON_METRICS_UNAVAILABLE => {
                Note::warning(REASON_METRICS_UNAVAILABLE, what)
            }
            RolloutPhase::Paused => Note::normal(new.reason.clone(), what),
            RolloutPhase::Progressing if p.step != new.step => Note::normal("StepPromoted", what),
            RolloutPhase::Progressing => Note::normal("RolloutResumed", what),
        }],
        _ => vec![Note::normal("RolloutStarted", what)],
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
#[path = "rollout_tests.rs"]
mod tests;
