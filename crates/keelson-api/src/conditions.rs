//! `metav1.Condition` helpers: conditions are computed fresh by the status functions, then merged with
//! the previous ones so that `lastTransitionTime` moves only when `status` moves.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

pub const READY: &str = "Ready";

/// A condition as a status function decides it, before timestamps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl Cond {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Cond {
            type_,
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

fn status_str(b: bool) -> &'static str {
    if b {
        "True"
    } else {
        "False"
    }
}

/// Turns freshly computed conditions into `metav1.Condition`s. A condition whose status did not change
/// keeps its previous `lastTransitionTime`; a new or flipped one gets `now`.
pub fn merge(
    prev: &[Condition],
    next: &[Cond],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    next.iter()
        .map(|c| {
            let status = status_str(c.status);
            let last = prev
                .iter()
                .find(|p| p.type_ == c.type_ && p.status == status)
                .map(|p| p.last_transition_time.clone())
                .unwrap_or_else(|| now.clone());
            Condition {
                type_: c.type_.to_string(),
                status: status.to_string(),
                reason: c.reason.clone(),
                message: c.message.clone(),
                observed_generation: generation,
                last_transition_time: last,
            }
        })
        .collect()
}

/// Equality without timestamps: what decides whether a status write is needed.
pub fn same(a: &[Condition], b: &[Condition]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.type_ == y.type_
                && x.status == y.status
                && x.reason == y.reason
                && x.message == y.message
                && x.observed_generation == y.observed_generation
        })
}

/// Finds a condition by type.
pub fn find<'a>(conds: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conds.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of `type_` is True.
pub fn is_true(conds: &[Condition], type_: &str) -> bool {
    find(conds, type_).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_moves_only_with_status() {
        let first = merge(
            &[],
            &[Cond::new(READY, false, "PodPending", "waiting")],
            Some(1),
            &t(10),
        );
        assert_eq!(first[0].last_transition_time, t(10));
        // Same status, new reason and generation: time kept.
        let second = merge(
            &first,
            &[Cond::new(READY, false, "ImagePullBackOff", "fix the image")],
            Some(2),
            &t(20),
        );
        assert_eq!(second[0].last_transition_time, t(10));
        assert_eq!(second[0].observed_generation, Some(2));
        // Flip: time moves.
        let third = merge(
            &second,
            &[Cond::new(READY, true, "PodRunning", "")],
            Some(2),
            &t(30),
        );
        assert_eq!(third[0].last_transition_time, t(30));
        assert_eq!(third[0].status, "True");
    }

    #[test]
    fn same_ignores_only_timestamps() {
        let a = merge(&[], &[Cond::new(READY, true, "R", "m")], Some(1), &t(1));
        let b = merge(&[], &[Cond::new(READY, true, "R", "m")], Some(1), &t(99));
        assert!(same(&a, &b));
        let c = merge(&[], &[Cond::new(READY, true, "R", "other")], Some(1), &t(1));
        assert!(!same(&a, &c));
        assert!(is_true(&a, READY));
    }
}
