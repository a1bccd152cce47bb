//! kstatus, the library behind Flux's health checks (kustomize-controller waits for every applied
//! object to be `Current`), re-implemented for the tests: its generic rules only, which are all that
//! apply to a custom resource. Upstream: kubernetes-sigs/cli-utils,
//! `pkg/kstatus/status/status.go` (`Compute`, `checkReadyCondition`) and
//! `pkg/kstatus/status/generic.go` (`checkGenericProperties`, `checkGeneration`).
//!
//! In upstream order:
//! 1. `metadata.deletionTimestamp` set: `Terminating`.
//! 2. `metadata.generation` and `status.observedGeneration` both present and different: `InProgress`
//!    (reason `LatestGenerationNotObserved`). A missing observedGeneration skips the check.
//! 3. A `Reconciling` condition True: `InProgress`; a `Stalled` condition True: `Failed`.
//! 4. (Type-specific rules of built-in kinds: none matches a keelson.dev kind.)
//! 5. A `Ready` condition: True is `Current`, False or Unknown is `InProgress` with its reason.
//! 6. Otherwise `Current` (an object without any known condition is assumed reconciled; this is why
//!    an object that has no status yet reads as Current, a caveat the kstatus README states).

use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    InProgress,
    Failed,
    Current,
    Terminating,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub status: Status,
    /// The reason kstatus attaches (the Reconciling/Stalled condition it would add), if any.
    pub reason: String,
    pub message: String,
}

fn outcome(status: Status, reason: &str, message: impl Into<String>) -> Outcome {
    Outcome {
        status,
        reason: reason.to_string(),
        message: message.into(),
    }
}

fn conditions(obj: &Value) -> impl Iterator<Item = &Value> {
    obj.pointer("/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

fn field<'a>(c: &'a Value, k: &str) -> &'a str {
    c.get(k).and_then(Value::as_str).unwrap_or("")
}

/// kstatus' `Compute` for an object of a kind with no type-specific rule.
pub fn compute(obj: &Value) -> Outcome {
    if obj
        .pointer("/metadata/deletionTimestamp")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty())
    {
        return outcome(Status::Terminating, "", "Resource scheduled for deletion");
    }
    if let (Some(generation), Some(observed)) = (
        obj.pointer("/metadata/generation").and_then(Value::as_i64),
        obj.pointer("/status/observedGeneration")
            .and_then(Value::as_i64),
    ) {
        if generation != observed {
            let kind = field(obj, "kind");
            return outcome(
                Status::InProgress,
                "LatestGenerationNotObserved",
                format!("{kind} generation is {generation}, but latest observed generation is {observed}"),
            );
        }
    }
    for c in conditions(obj) {
        let is_true = field(c, "status") == "True";
        match field(c, "type") {
            "Reconciling" if is_true => {
                return outcome(Status::InProgress, field(c, "reason"), field(c, "message"))
            }
            "Stalled" if is_true => {
                return outcome(Status::Failed, field(c, "reason"), field(c, "message"))
            }
            _ => {}
        }
    }
    for c in conditions(obj).filter(|c| field(c, "type") == "Ready") {
        match field(c, "status") {
            "True" => return outcome(Status::Current, "", "Resource is Ready"),
            "False" | "Unknown" => {
                return outcome(Status::InProgress, field(c, "reason"), field(c, "message"))
            }
            _ => {}
        }
    }
    outcome(Status::Current, "", "Resource is current")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(generation: i64, status: Value) -> Value {
        json!({"kind": "TrainingJob", "metadata": {"name": "j", "generation": generation}, "status": status})
    }

    #[test]
    fn generic_rules_in_upstream_order() {
        let ready =
            |s: &str, r: &str| json!({"type": "Ready", "status": s, "reason": r, "message": "m"});
        let cases = [
            (
                "no status at all",
                json!({"kind": "X", "metadata": {"generation": 1}}),
                Status::Current,
                "",
            ),
            (
                "generation not observed",
                obj(
                    2,
                    json!({"observedGeneration": 1, "conditions": [ready("True", "Ok")]}),
                ),
                Status::InProgress,
                "LatestGenerationNotObserved",
            ),
            (
                "ready",
                obj(
                    2,
                    json!({"observedGeneration": 2, "conditions": [ready("True", "Ok")]}),
                ),
                Status::Current,
                "",
            ),
            (
                "not ready",
                obj(
                    2,
                    json!({"observedGeneration": 2, "conditions": [ready("False", "PodsCreating")]}),
                ),
                Status::InProgress,
                "PodsCreating",
            ),
            (
                "ready unknown",
                obj(
                    2,
                    json!({"observedGeneration": 2, "conditions": [ready("Unknown", "Waiting")]}),
                ),
                Status::InProgress,
                "Waiting",
            ),
            (
                "stalled wins over ready",
                obj(
                    1,
                    json!({"observedGeneration": 1, "conditions": [ready("True", "Ok"), {"type": "Stalled", "status": "True", "reason": "Stuck"}]}),
                ),
                Status::Failed,
                "Stuck",
            ),
            (
                "reconciling",
                obj(
                    1,
                    json!({"observedGeneration": 1, "conditions": [{"type": "Reconciling", "status": "True", "reason": "Working"}]}),
                ),
                Status::InProgress,
                "Working",
            ),
            (
                "no observedGeneration: the generation check is skipped",
                obj(3, json!({"conditions": [ready("True", "Ok")]})),
                Status::Current,
                "",
            ),
            (
                "other conditions only",
                obj(
                    1,
                    json!({"observedGeneration": 1, "conditions": [{"type": "Running", "status": "False"}]}),
                ),
                Status::Current,
                "",
            ),
        ];
        for (name, o, want, reason) in cases {
            let got = compute(&o);
            assert_eq!((got.status, got.reason.as_str()), (want, reason), "{name}");
        }
        let mut deleting = obj(1, json!({"observedGeneration": 1}));
        deleting["metadata"]["deletionTimestamp"] = json!("2024-01-01T00:00:00Z");
        assert_eq!(compute(&deleting).status, Status::Terminating);
    }
}
