//! Readiness-gated traffic. Pure: the ready pods of each variant come in, the weights the router
//! config or the HTTPRoute carries come out.
//!
//! The signal is the variant Deployment's `status.readyReplicas`: the Deployments are already
//! watched and cached, so the gate costs no extra watch and no extra permission, and a pod counts
//! as ready there exactly when its readiness probe passes, which is also when the EndpointSlice
//! controller lists it as a ready endpoint of the variant Service.
//!
//! - Every variant with a weight above 0 has a ready pod: the spec's weights.
//! - Some have none: those get 0 and their share goes to the others in proportion to their weights.
//! - None of the variants with a weight has a ready pod (a new ModelDeployment, or every image
//!   broken): the spec's weights are kept. Moving traffic onto a variant the user gave weight 0
//!   would be a surprise; with the spec's weights requests fail visibly (the router answers 502/503)
//!   and traffic flows the moment pods get ready, without waiting for a config change.

use std::collections::BTreeMap;

use super::names::{router_kind, variant_name};
use keelson_api::modeldeployment::{ModelDeployment, RouterKind};

/// Ready pods of each variant, by variant name.
pub type ReadyPods = BTreeMap<String, i32>;

/// Whether traffic follows the spec's weights.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GateState {
    /// Every variant with a weight has a ready pod (or the mode does not use weights).
    AsDesired,
    /// These variants (with a weight above 0) have no ready pod; their share went to the others.
    Shifted(Vec<String>),
    /// No variant with a weight has a ready pod: the spec's weights are kept.
    NoneReady,
}

/// The weights in effect, in spec order, and why they are what they are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gate {
    pub weights: Vec<i32>,
    pub state: GateState,
}

/// Integer percentages proportional to `counts` that sum to 100 (largest remainder, ties to the
/// earlier entry); all zero when every count is zero.
pub fn shares(counts: &[i32]) -> Vec<i32> {
    shares_of(100, counts)
}

/// Integers proportional to `counts` that sum to `whole` (largest remainder, ties to the earlier
/// entry); all zero when every count is zero.
pub fn shares_of(whole: i32, counts: &[i32]) -> Vec<i32> {
    let whole = i64::from(whole.max(0));
    let counts: Vec<i64> = counts.iter().map(|c| i64::from((*c).max(0))).collect();
    let total: i64 = counts.iter().sum();
    if total == 0 {
        return vec![0; counts.len()];
    }
    let mut out: Vec<i64> = counts.iter().map(|c| c * whole / total).collect();
    let mut order: Vec<usize> = (0..counts.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(counts[i] * whole % total));
    let missing = whole - out.iter().sum::<i64>();
    for &i in order.iter().take(usize::try_from(missing).unwrap_or(0)) {
        out[i] += 1;
    }
    out.into_iter()
        .map(|x| i32::try_from(x).unwrap_or(0))
        .collect()
}

/// Ready pods of each variant of `md`, read from its Deployments by a lookup function (the cache).
pub fn ready_pods<'a>(
    md: &ModelDeployment,
    ready_of: impl Fn(&str) -> Option<i32> + 'a,
) -> ReadyPods {
    let name = md.metadata.name.clone().unwrap_or_default();
    md.spec
        .variants
        .iter()
        .map(|v| {
            let n = ready_of(&variant_name(&name, &v.name)).unwrap_or(0);
            (v.name.clone(), n)
        })
        .collect()
}

/// The weights to route by, given the weights asked for (`desired`, in spec order: the spec's, or
/// a rollout's, see [`super::rollout::weights`]) and the ready pods of each variant. `None` mode does
/// not route by weight: the desired weights.
pub fn gate(md: &ModelDeployment, desired: &[i32], ready: &ReadyPods) -> Gate {
    let desired: Vec<i32> = desired.to_vec();
    if router_kind(md) == RouterKind::None {
        return Gate {
            weights: desired,
            state: GateState::AsDesired,
        };
    }
    let serving = |name: &str| ready.get(name).copied().unwrap_or(0) > 0;
    let unready: Vec<String> = md
        .spec
        .variants
        .iter()
        .zip(&desired)
        .filter(|(v, w)| **w > 0 && !serving(&v.name))
        .map(|(v, _)| v.name.clone())
        .collect();
    if unready.is_empty() {
        return Gate {
            weights: desired,
            state: GateState::AsDesired,
        };
    }
    let kept: Vec<i32> = md
        .spec
        .variants
        .iter()
        .zip(&desired)
        .map(|(v, w)| if serving(&v.name) { *w } else { 0 })
        .collect();
    if kept.iter().all(|w| *w == 0) {
        return Gate {
            weights: desired,
            state: GateState::NoneReady,
        };
    }
    Gate {
        weights: shares(&kept),
        state: GateState::Shifted(unready),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::super::build::tests::{ab, md, variant};
    use super::*;

    fn spec(m: &ModelDeployment) -> Vec<i32> {
        m.spec.variants.iter().map(|v| v.weight).collect()
    }

    fn ready(pairs: &[(&str, i32)]) -> ReadyPods {
        pairs.iter().map(|(n, c)| (n.to_string(), *c)).collect()
    }

    #[test]
    fn shares_sum_to_100() {
        assert_eq!(shares(&[1, 1, 1]), [34, 33, 33]);
        assert_eq!(shares(&[3]), [100]);
        assert_eq!(shares(&[0, 0]), [0, 0]);
        assert_eq!(shares(&[]), Vec::<i32>::new());
        assert_eq!(shares(&[60, 0, 30]), [67, 0, 33]);
        assert_eq!(shares_of(90, &[1, 1]), [45, 45]);
        assert_eq!(shares_of(75, &[2, 1]), [50, 25]);
        assert_eq!(shares_of(0, &[2, 1]), [0, 0]);
    }

    #[test]
    fn weights_follow_ready_variants() {
        let three = || {
            vec![
                variant("a", 60, None),
                variant("b", 10, None),
                variant("c", 30, None),
            ]
        };
        type Case<'a> = (Vec<(&'a str, i32)>, Vec<i32>, GateState);
        let cases: Vec<Case> = vec![
            (
                vec![("a", 2), ("b", 1), ("c", 1)],
                vec![60, 10, 30],
                GateState::AsDesired,
            ),
            // b's 10 goes to a and c by 60:30.
            (
                vec![("a", 2), ("b", 0), ("c", 1)],
                vec![67, 0, 33],
                GateState::Shifted(vec!["b".into()]),
            ),
            // An absent Deployment counts as no ready pod.
            (
                vec![("a", 1)],
                vec![100, 0, 0],
                GateState::Shifted(vec!["b".into(), "c".into()]),
            ),
            (
                vec![("a", 0), ("b", 0), ("c", 0)],
                vec![60, 10, 30],
                GateState::NoneReady,
            ),
        ];
        for (r, weights, state) in cases {
            let (m, _) = md(three(), None);
            let g = gate(&m, &spec(&m), &ready(&r));
            assert_eq!((g.weights, g.state), (weights, state), "{r:?}");
        }
    }

    #[test]
    fn a_weight_zero_variant_neither_degrades_nor_takes_traffic() {
        let (m, _) = md(
            vec![variant("a", 100, None), variant("shadow", 0, None)],
            None,
        );
        let g = gate(&m, &spec(&m), &ready(&[("a", 1), ("shadow", 0)]));
        assert_eq!((g.weights, g.state), (vec![100, 0], GateState::AsDesired));
        // The weighted variant down and only the weight-0 one ready: the spec's weights stay.
        let g = gate(&m, &spec(&m), &ready(&[("a", 0), ("shadow", 3)]));
        assert_eq!((g.weights, g.state), (vec![100, 0], GateState::NoneReady));
    }

    #[test]
    fn router_none_is_not_gated() {
        let (m, _) = md(ab(), Some(RouterKind::None));
        let g = gate(&m, &spec(&m), &ready(&[]));
        assert_eq!((g.weights, g.state), (vec![90, 10], GateState::AsDesired));
    }

    #[test]
    fn ready_pods_are_looked_up_by_deployment_name() {
        let (m, _) = md(ab(), None);
        let r = ready_pods(&m, |d| (d == "fraud-champion").then_some(2));
        assert_eq!(r, ready(&[("champion", 2), ("challenger", 0)]));
    }
}
