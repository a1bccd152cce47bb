//! Progressive delivery of one ModelDeployment variant: the `rollout` of a variant and what status
//! reports of it. The operator walks the variant's traffic share through the steps, judging each
//! step by the Builtin router's own measurements of the variant.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Seconds a step lasts at least when `pauseSeconds` is absent.
pub const DEFAULT_PAUSE_SECONDS: i32 = 60;
/// Seconds of an analysis window when `windowSeconds` is absent.
pub const DEFAULT_WINDOW_SECONDS: i32 = 60;
/// Fewest requests a window must hold to be judged when `minRequests` is absent.
pub const DEFAULT_MIN_REQUESTS: i64 = 100;
/// Entries `status.rollout.history` keeps (the oldest go first).
pub const HISTORY_LIMIT: usize = 32;

/// Progressive delivery of a variant: its traffic share walks `steps`, each held for its pause and,
/// with `analysis`, promoted only while the router's measurements of the variant stay within
/// bounds; otherwise the variant is rolled back to weight 0. After the last step the variant has
/// its `weight` and the rollout is complete (phase `Promoted`). A change of the variant's pods (its
/// image, env, model, resources, template, ...) or of this `rollout` starts it again from the first
/// step; a change of `weight`, `replicas` or `autoscaling` does not.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    /// The shares the variant moves through, e.g. `[{weight: 10}, {weight: 25}, {weight: 50}]`:
    /// 1 to 20 steps whose weights strictly increase, each at most the variant's `weight`.
    #[schemars(length(min = 1, max = 20))]
    #[x_kube(
        validation = Rule::new("self.map(s, s.weight).isSorted() && self.all(s, self.exists_one(t, t.weight == s.weight))").message("rollout.steps[].weight must strictly increase from one step to the next")
    )]
    pub steps: Vec<RolloutStep>,

    /// Bounds on the router's measurements of the variant. Absent: the steps advance on their
    /// pauses alone. Needs `spec.traffic.router: Builtin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<Analysis>,
}

/// One step of a rollout.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStep {
    /// Traffic share of the variant during this step, in percent, 1 to 100. The rest goes to the
    /// other variants in proportion to their weights.
    #[schemars(range(min = 1, max = 100))]
    pub weight: i32,

    /// Seconds the step lasts at least, 0 to 86400, counted from the moment it began. Default 60.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86400))]
    pub pause_seconds: Option<i32>,
}

/// Bounds on what the Builtin router measures of the rolling variant, judged over windows.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.maxErrorRatio) || has(self.maxLatencyRatio)").message("rollout.analysis needs rollout.analysis.maxErrorRatio or rollout.analysis.maxLatencyRatio: with neither it judges nothing"))]
pub struct Analysis {
    /// Highest share of the variant's responses that may fail in a window, 0 to 1: 5xx answers of
    /// the model server plus the router's own 502/503/504 for it, e.g. `0.01`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_error_ratio: Option<f64>,

    /// Highest p99 latency of the variant over the p99 of the other variants together in the same
    /// window, 1 to 100, e.g. `1.5`. Latency is the time to the response headers, read from the
    /// router's histogram buckets; not judged in a window where the other variants had no request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.0, max = 100.0))]
    pub max_latency_ratio: Option<f64>,

    /// Seconds of one analysis window, 10 to 3600. Default 60.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 3600))]
    pub window_seconds: Option<i32>,

    /// Fewest responses of the variant a window must hold to be judged, 1 to 1000000000; with
    /// fewer the window stays open and the rollout waits. Default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000_000))]
    pub min_requests: Option<i64>,
}

impl RolloutStep {
    pub fn pause(&self) -> i32 {
        self.pause_seconds.unwrap_or(DEFAULT_PAUSE_SECONDS)
    }
}

impl Analysis {
    pub fn window(&self) -> i32 {
        self.window_seconds.unwrap_or(DEFAULT_WINDOW_SECONDS)
    }

    pub fn min(&self) -> i64 {
        self.min_requests.unwrap_or(DEFAULT_MIN_REQUESTS)
    }
}

/// Where a rollout is.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RolloutPhase {
    /// At a step: its pause runs and its windows are judged.
    #[default]
    Progressing,
    /// Held at a step: no measurement (`MetricsUnavailable`), too few requests
    /// (`TooFewRequests`) or no ready pod (`VariantNotReady`). Never promoted while held.
    Paused,
    /// The last step passed: the variant has its `weight`. The rollout is complete.
    Promoted,
    /// A window broke a bound: the variant has weight 0 until its pods or its rollout change.
    RolledBack,
}

/// One entry of the rollout's timeline: the step and phase it entered, when and why.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutRecord {
    /// Step, from 1.
    pub step: i32,
    /// Share the rollout gave the variant from then on, in percent.
    pub weight: i32,
    pub phase: RolloutPhase,
    /// When the rollout entered this step and phase.
    pub since: Time,
    /// CamelCase reason, e.g. `StepPassed`, `ErrorRatioExceeded`.
    pub reason: String,
    /// What was measured or waited for.
    pub message: String,
}

/// The rollout of the variant that carries one.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// The rolling variant.
    pub variant: String,
    /// Hash of the variant's pods and rollout that this rollout is for; a new one starts over.
    pub revision: String,
    /// Current step, from 1.
    pub step: i32,
    /// Number of steps.
    pub steps: i32,
    /// Share the rollout gives the variant, in percent (before readiness gating: `variants[].weight`
    /// is the one in effect).
    pub weight: i32,
    pub phase: RolloutPhase,
    /// When the current step began: its pause counts from then.
    pub since: Time,
    /// CamelCase reason of the phase, e.g. `Analysing`, `MetricsUnavailable`, `ErrorRatioExceeded`.
    pub reason: String,
    /// What the rollout waits for or what it measured.
    pub message: String,
    /// Variant, step and phase, e.g. `challenger 2/4 Progressing` (the ROLLOUT column).
    pub summary: String,
    /// Every step and phase the rollout entered, oldest first (at most 32).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<RolloutRecord>,
}
