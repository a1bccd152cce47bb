//! Observed children -> ModelDeployment status. Pure: the time is passed in.
//!
//! The weight of a variant in status is the weight in effect, read back from what routes the traffic:
//! the router config in the observed ConfigMap (`Builtin`), the observed HTTPRoute (`GatewayAPI`), or
//! the share of ready pods (`None`, where the entry Service spreads requests over the ready endpoints).

use gateway_api::grpcroutes::GrpcRoute;
use gateway_api::httproutes::HttpRoute;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::gate::{gate, ready_pods, shares, Gate, GateState};
use super::names::{protocol, replicas, router_kind, url, variant_name};
use super::rollout::weights as rollout_weights;
use super::routes::{grpc_route_spec, grpc_route_weights, route_spec, route_weights};
use super::traffic::{router_config, router_name};
use crate::error::BuildError;
use crate::runtime::apply::subset;
use keelson_api::conditions::{self, Cond, READY};
use keelson_api::modeldeployment::{
    ModelDeployment, ModelDeploymentStatus, Protocol, RouterKind, VariantStatus,
};
use keelson_api::rollout::{RolloutPhase, RolloutStatus};
use keelson_api::router_config::{RouterConfig, ROUTER_CONFIG_KEY};

pub const PROGRESSING: &str = "Progressing";
/// True while the weights in effect differ from the spec's because variants have no ready pod.
pub const TRAFFIC_DEGRADED: &str = "TrafficDegraded";

/// Message of the `GatewayAPIMissing` condition.
pub const GATEWAY_API_MISSING: &str = "spec.traffic.router is GatewayAPI but the Gateway API CRDs (HTTPRoute, gateway.networking.k8s.io/v1) are not installed in this cluster: install them (https://gateway-api.sigs.k8s.io/guides/#installing-gateway-api) or set spec.traffic.router to Builtin or None";
/// Message of the `GatewayAPIMissing` condition with `protocol: GRPC`.
pub const GRPC_ROUTE_MISSING: &str = "spec.traffic.router is GatewayAPI with spec.protocol GRPC but the GRPCRoute CRD (gateway.networking.k8s.io/v1, in the Gateway API standard channel since v1.1) is not installed in this cluster: install the Gateway API CRDs (https://gateway-api.sigs.k8s.io/guides/#installing-gateway-api) or set spec.traffic.router to Builtin or None";

/// What the cluster holds of a ModelDeployment's children.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// The Deployments of the ModelDeployment (model and router); looked up by name.
    pub deployments: Vec<Deployment>,
    /// The router ConfigMap `<name>-router`.
    pub config: Option<ConfigMap>,
    /// The HTTPRoute `<name>` as read back after applying it (`GatewayAPI` mode).
    pub route: Option<HttpRoute>,
    /// The GRPCRoute `<name>` as read back after applying it (`GatewayAPI` mode, `protocol: GRPC`).
    pub grpc_route: Option<GrpcRoute>,
    /// The API server does not serve the route's type (HTTPRoutes, or GRPCRoutes with GRPC).
    pub gateway_api_missing: bool,
    /// The rollout of the variant that carries one, as this reconcile decided it.
    pub rollout: Option<RolloutStatus>,
    /// When the rollout wants to be looked at again.
    pub rollout_requeue: Option<std::time::Duration>,
}

impl Observed {
    fn deployment(&self, name: &str) -> Option<&Deployment> {
        self.deployments
            .iter()
            .find(|d| d.metadata.name.as_deref() == Some(name))
    }

    /// The router config in effect, if the ConfigMap holds one this operator can read.
    pub fn router_config(&self) -> Option<RouterConfig> {
        let json = self
            .config
            .as_ref()?
            .data
            .as_ref()?
            .get(ROUTER_CONFIG_KEY)?;
        RouterConfig::parse(json).ok()
    }
}

/// Where one Deployment is in its rollout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rollout {
    /// Not created yet (or not in the cache yet).
    Missing,
    /// Under way, with what it is waiting for.
    InProgress(String),
    /// Stuck: needs a person. (reason, message)
    Failed(String, String),
    /// Every desired pod runs the current template and is available.
    Done,
}

/// Reads a Deployment the way `kubectl rollout status` does.
pub fn rollout(d: Option<&Deployment>) -> Rollout {
    let Some(d) = d else {
        return Rollout::Missing;
    };
    let Some(st) = d.status.as_ref() else {
        return Rollout::InProgress("waiting for the Deployment controller".into());
    };
    for c in st.conditions.iter().flatten() {
        let failed = (c.type_ == "Progressing"
            && c.status == "False"
            && c.reason.as_deref() == Some("ProgressDeadlineExceeded"))
            || (c.type_ == "ReplicaFailure" && c.status == "True");
        if failed {
            let reason = c
                .reason
                .clone()
                .filter(|r| !r.is_empty())
                .unwrap_or_else(|| c.type_.clone());
            return Rollout::Failed(reason, c.message.clone().unwrap_or_default());
        }
    }
    if st.observed_generation.unwrap_or(0) < d.metadata.generation.unwrap_or(0) {
        return Rollout::InProgress("waiting for the Deployment controller".into());
    }
    let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let updated = st.updated_replicas.unwrap_or(0);
    let total = st.replicas.unwrap_or(0);
    let available = st.available_replicas.unwrap_or(0);
    if updated < desired {
        Rollout::InProgress(format!("{updated} of {desired} pods updated"))
    } else if total > updated {
        Rollout::InProgress(format!("{} old pods terminating", total - updated))
    } else if available < updated {
        Rollout::InProgress(format!("{available} of {updated} updated pods available"))
    } else {
        Rollout::Done
    }
}

fn ready_replicas(d: Option<&Deployment>) -> i32 {
    d.and_then(|d| d.status.as_ref())
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0)
}

/// The weight in effect of every variant, in spec order.
fn effective_weights(md: &ModelDeployment, name: &str, observed: &Observed) -> Vec<i32> {
    let variants = &md.spec.variants;
    match router_kind(md) {
        RouterKind::Builtin => {
            let cfg = observed.router_config();
            variants
                .iter()
                .map(|v| {
                    cfg.as_ref()
                        .and_then(|c| c.weight(&v.name))
                        .map_or(0, |w| i32::try_from(w).unwrap_or(0))
                })
                .collect()
        }
        RouterKind::GatewayApi => {
            let weights = match protocol(md) {
                Protocol::Http => observed.route.as_ref().map(route_weights),
                Protocol::Grpc => observed.grpc_route.as_ref().map(grpc_route_weights),
            }
            .filter(|_| !observed.gateway_api_missing)
            .unwrap_or_default();
            variants
                .iter()
                .map(|v| {
                    weights
                        .get(&variant_name(name, &v.name))
                        .copied()
                        .unwrap_or(0)
                })
                .collect()
        }
        RouterKind::None => {
            let ready: Vec<i32> = variants
                .iter()
                .map(|v| ready_replicas(observed.deployment(&variant_name(name, &v.name))))
                .collect();
            shares(&ready)
        }
    }
}

/// Whether the router config or the HTTPRoute carries the gated weights.
fn routing_in_effect(
    md: &ModelDeployment,
    name: &str,
    ns: &str,
    observed: &Observed,
    weights: &[i32],
) -> bool {
    match router_kind(md) {
        RouterKind::Builtin => {
            observed.router_config() == Some(router_config(md, name, ns, weights))
        }
        RouterKind::GatewayApi => {
            let pair = match protocol(md) {
                Protocol::Http => observed.route.as_ref().map(|r| {
                    (
                        serde_json::to_value(route_spec(md, name, weights)),
                        serde_json::to_value(&r.spec),
                    )
                }),
                Protocol::Grpc => observed.grpc_route.as_ref().map(|r| {
                    (
                        serde_json::to_value(grpc_route_spec(md, name, weights)),
                        serde_json::to_value(&r.spec),
                    )
                }),
            };
            matches!(pair, Some((Ok(want), Ok(have))) if subset(&want, &have))
        }
        RouterKind::None => true,
    }
}

/// A parent that refused the HTTPRoute, as (reason, message).
fn route_problem(route: &HttpRoute) -> Option<(String, String)> {
    let parents = route.status.as_ref()?.parents.iter();
    parents_problem(
        "HTTPRoute",
        route.metadata.name.as_deref().unwrap_or_default(),
        parents.map(|p| (p.parent_ref.name.as_str(), p.conditions.as_slice())),
    )
}

/// A parent that refused the GRPCRoute, as (reason, message).
fn grpc_route_problem(route: &GrpcRoute) -> Option<(String, String)> {
    let parents = route.status.as_ref()?.parents.iter();
    parents_problem(
        "GRPCRoute",
        route.metadata.name.as_deref().unwrap_or_default(),
        parents.map(|p| (p.parent_ref.name.as_str(), p.conditions.as_slice())),
    )
}

/// The first `Accepted` or `ResolvedRefs` condition that is False among a route's parents (name,
/// conditions), as (reason, message).
fn parents_problem<'a>(
    kind: &str,
    route: &str,
    parents: impl Iterator<
        Item = (
            &'a str,
            &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
        ),
    >,
) -> Option<(String, String)> {
    for (parent, conditions) in parents {
        for c in conditions {
            let reason = match c.type_.as_str() {
                "Accepted" => "RouteNotAccepted",
                "ResolvedRefs" => "RouteRefsNotResolved",
                _ => continue,
            };
            if c.status == "False" {
                return Some((
                    reason.to_string(),
                    format!(
                        "{kind} {route}: parent {parent} reports {}={} ({}): {}; check spec.traffic.gateway.parentRefs and the Gateway's allowedRoutes",
                        c.type_,
                        c.status,
                        c.reason,
                        c.message
                    ),
                ));
            }
        }
    }
    None
}

/// Spec fields the chosen mode does not implement, as a note for the user.
fn ignored_fields(md: &ModelDeployment) -> Option<&'static str> {
    let t = md.spec.traffic.as_ref()?;
    match (router_kind(md), t.sticky_header.is_some(), t.mirror.is_some()) {
        (RouterKind::GatewayApi, true, _) => Some(
            "spec.traffic.stickyHeader is not supported with router: GatewayAPI and is ignored",
        ),
        (RouterKind::None, true, _) | (RouterKind::None, _, true) => Some(
            "spec.traffic.stickyHeader and spec.traffic.mirror need router: Builtin or GatewayAPI and are ignored",
        ),
        _ => None,
    }
}

/// The status a ModelDeployment should show, given its children.
pub fn status(md: &ModelDeployment, observed: &Observed, now: &Time) -> ModelDeploymentStatus {
    let prev = md.status.clone().unwrap_or_default();
    let name = md.metadata.name.clone().unwrap_or_default();
    let ns = md.metadata.namespace.clone().unwrap_or_default();
    let kind = router_kind(md);

    let weights = effective_weights(md, &name, observed);
    let desired = rollout_weights(md, observed.rollout.as_ref());
    let gated = gate(
        md,
        &desired,
        &ready_pods(md, |d| {
            observed.deployment(d).map(|d| ready_replicas(Some(d)))
        }),
    );
    let mut variants = Vec::with_capacity(md.spec.variants.len());
    let mut not_ready = Vec::new();
    let mut rolling = Vec::new();
    let mut failed = None;
    let (mut ready_pods, mut desired_pods) = (0, 0);
    for (v, weight) in md.spec.variants.iter().zip(&weights) {
        let dname = variant_name(&name, &v.name);
        let d = observed.deployment(&dname);
        // With autoscaling, the count the autoscaler set on the Deployment.
        let want = match (&v.autoscaling, d.and_then(|d| d.spec.as_ref()?.replicas)) {
            (Some(_), Some(n)) => n,
            _ => replicas(v),
        };
        let ready = ready_replicas(d);
        ready_pods += ready;
        desired_pods += want;
        if d.is_none() || ready < want {
            not_ready.push(format!("{}: {ready}/{want} ready", v.name));
        }
        match rollout(d) {
            Rollout::Done => {}
            Rollout::Missing => rolling.push(format!("{}: creating", v.name)),
            Rollout::InProgress(m) => rolling.push(format!("{}: {m}", v.name)),
            Rollout::Failed(reason, message) => {
                failed.get_or_insert((
                    reason,
                    format!(
                        "variant {}: {message}; check its pods: kubectl get pods -n {ns} -l keelson.dev/owner-name={name},keelson.dev/variant={}",
                        v.name, v.name
                    ),
                ));
            }
        }
        variants.push(VariantStatus {
            name: v.name.clone(),
            replicas: want,
            ready_replicas: ready,
            desired_weight: v.weight,
            weight: *weight,
        });
    }

    let mut router_ready = true;
    if kind == RouterKind::Builtin {
        let rname = router_name(&name);
        let d = observed.deployment(&rname);
        router_ready = d.is_some() && ready_replicas(d) >= 1;
        match rollout(d) {
            Rollout::Done => {}
            Rollout::Missing => rolling.push(format!("router {rname}: creating")),
            Rollout::InProgress(m) => rolling.push(format!("router {rname}: {m}")),
            Rollout::Failed(reason, message) => {
                failed.get_or_insert((
                    reason,
                    format!("router {rname}: {message}; check its pod: kubectl describe pods -n {ns} -l keelson.dev/owner-name={name},keelson.dev/role=router"),
                ));
            }
        }
    }

    let traffic = md
        .spec
        .variants
        .iter()
        .zip(&weights)
        .map(|(v, w)| format!("{}={w}", v.name))
        .collect::<Vec<_>>()
        .join(",");
    let in_effect = routing_in_effect(md, &name, &ns, observed, &gated.weights);
    let degraded = traffic_degraded(md, &desired, &gated, &ns, &name);
    let route_problem = match protocol(md) {
        Protocol::Http => observed.route.as_ref().and_then(route_problem),
        Protocol::Grpc => observed.grpc_route.as_ref().and_then(grpc_route_problem),
    };
    let missing_message = match protocol(md) {
        Protocol::Http => GATEWAY_API_MISSING,
        Protocol::Grpc => GRPC_ROUTE_MISSING,
    };

    let ready = if observed.gateway_api_missing {
        Cond::new(READY, false, "GatewayAPIMissing", missing_message)
    } else if let Some((reason, message)) = failed.clone() {
        Cond::new(READY, false, reason, message)
    } else if let Some((reason, message)) = route_problem {
        Cond::new(READY, false, reason, message)
    } else if !not_ready.is_empty() {
        Cond::new(
            READY,
            false,
            "VariantsNotReady",
            format!("waiting for model pods: {}", not_ready.join(", ")),
        )
    } else if !router_ready {
        Cond::new(
            READY,
            false,
            "RouterNotReady",
            format!("waiting for the router {}", router_name(&name)),
        )
    } else {
        Cond::new(
            READY,
            true,
            "VariantsReady",
            format!(
                "{} variants ready ({ready_pods} model pods); traffic {traffic}",
                variants.len()
            ),
        )
    };

    let progressing = if observed.gateway_api_missing {
        Cond::new(PROGRESSING, false, "GatewayAPIMissing", missing_message)
    } else if let Some((reason, message)) = failed {
        Cond::new(PROGRESSING, false, reason, message)
    } else if !rolling.is_empty() {
        Cond::new(PROGRESSING, true, "RolloutInProgress", rolling.join(", "))
    } else if !in_effect {
        let what = match (kind, protocol(md)) {
            (RouterKind::GatewayApi, Protocol::Http) => "the HTTPRoute",
            (RouterKind::GatewayApi, Protocol::Grpc) => "the GRPCRoute",
            _ => "the router config",
        };
        Cond::new(
            PROGRESSING,
            true,
            "WeightsPending",
            format!("waiting for {what} to carry the traffic split"),
        )
    } else if let Some(r) = observed
        .rollout
        .as_ref()
        .filter(|r| matches!(r.phase, RolloutPhase::Progressing | RolloutPhase::Paused))
    {
        Cond::new(
            PROGRESSING,
            true,
            "RolloutStep",
            format!("{}: {}: {}", r.summary, r.reason, r.message),
        )
    } else if let Some(r) = observed
        .rollout
        .as_ref()
        .filter(|r| r.phase == RolloutPhase::RolledBack)
    {
        Cond::new(
            PROGRESSING,
            false,
            "RolledBack",
            format!(
                "{}: {}; a new image (or any change of the variant's pods or rollout) starts it again",
                r.summary, r.message
            ),
        )
    } else {
        let (reason, message) = match kind {
            RouterKind::None => (
                "RolloutComplete",
                "router: None: the entry Service spreads requests over the ready pods of every variant; variants[].weight is not used".to_string(),
            ),
            _ => ("WeightsApplied", format!("traffic {traffic} is in effect")),
        };
        let message = match ignored_fields(md) {
            Some(note) => format!("{message}; {note}"),
            None => message,
        };
        Cond::new(PROGRESSING, false, reason, message)
    };

    let generation = md.metadata.generation;
    ModelDeploymentStatus {
        url: Some(url(&name, &ns)),
        variants,
        ready: Some(format!("{ready_pods}/{desired_pods}")),
        traffic: Some(traffic),
        rollout: observed.rollout.clone(),
        observed_generation: generation,
        conditions: conditions::merge(
            &prev.conditions,
            &[ready, progressing, degraded],
            generation,
            now,
        ),
    }
}

/// The `TrafficDegraded` condition: whether the gate moved traffic off variants with no ready pod.
fn traffic_degraded(
    md: &ModelDeployment,
    desired: &[i32],
    gated: &Gate,
    ns: &str,
    name: &str,
) -> Cond {
    let split = |weights: &[i32]| {
        md.spec
            .variants
            .iter()
            .zip(weights)
            .map(|(v, w)| format!("{}={w}", v.name))
            .collect::<Vec<_>>()
            .join(",")
    };
    let pods = |variants: &[String]| {
        format!(
            "kubectl get pods -n {ns} -l keelson.dev/owner-name={name},keelson.dev/variant in ({})",
            variants.join(",")
        )
    };
    match (router_kind(md), &gated.state) {
        (RouterKind::None, _) => Cond::new(
            TRAFFIC_DEGRADED,
            false,
            "WeightsNotUsed",
            "router: None: the entry Service spreads requests over the ready pods of every variant",
        ),
        (_, GateState::AsDesired) => Cond::new(
            TRAFFIC_DEGRADED,
            false,
            "AllVariantsServing",
            format!(
                "every variant with a weight has ready pods; traffic {}",
                split(&gated.weights)
            ),
        ),
        (_, GateState::Shifted(unready)) => Cond::new(
            TRAFFIC_DEGRADED,
            true,
            "VariantNotReady",
            format!(
                "no ready pod in {}: traffic {} instead of {} until they are ready; check their pods: {}",
                unready.join(", "),
                split(&gated.weights),
                split(desired),
                pods(unready)
            ),
        ),
        (_, GateState::NoneReady) => {
            let weighted: Vec<String> = md
                .spec
                .variants
                .iter()
                .zip(desired)
                .filter(|(_, w)| **w > 0)
                .map(|(v, _)| v.name.clone())
                .collect();
            Cond::new(
                TRAFFIC_DEGRADED,
                true,
                "NoVariantReady",
                format!(
                    "no variant with a weight has a ready pod, so the spec's weights stay and requests fail until one is ready; check the pods: {}",
                    pods(&weighted)
                ),
            )
        }
    }
}

/// The status of a ModelDeployment whose spec cannot be built: the reason on both conditions, the
/// rest of the last status kept.
pub fn invalid(md: &ModelDeployment, err: &BuildError, now: &Time) -> ModelDeploymentStatus {
    let prev = md.status.clone().unwrap_or_default();
    let generation = md.metadata.generation;
    let message = err.to_string();
    ModelDeploymentStatus {
        observed_generation: generation,
        conditions: conditions::merge(
            &prev.conditions,
            &[
                Cond::new(READY, false, err.reason, message.clone()),
                Cond::new(PROGRESSING, false, err.reason, message),
            ],
            generation,
            now,
        ),
        ..prev
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
#[path = "status_tests.rs"]
mod tests;
