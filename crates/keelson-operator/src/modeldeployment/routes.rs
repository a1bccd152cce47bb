//! The routes of `GatewayAPI` mode: the HTTPRoute and GRPCRoute specs a ModelDeployment asks for,
//! and the weights a route in the cluster holds. Pure; which route is written, and when, is the
//! builder's and the reconciler's call.

use std::collections::BTreeMap;

use gateway_api::grpcroutes::{
    GrpcRoute, GrpcRouteRules, GrpcRouteRulesBackendRefs, GrpcRouteRulesFilters,
    GrpcRouteRulesFiltersRequestMirror, GrpcRouteRulesFiltersRequestMirrorBackendRef,
    GrpcRouteRulesFiltersType, GrpcRouteSpec,
};
use gateway_api::httproutes::{
    HttpRoute, HttpRouteRules, HttpRouteRulesBackendRefs, HttpRouteRulesFilters,
    HttpRouteRulesFiltersRequestMirror, HttpRouteRulesFiltersRequestMirrorBackendRef,
    HttpRouteRulesFiltersType, HttpRouteSpec,
};
use keelson_api::modeldeployment::{ModelDeployment, ParentRef};
use keelson_api::router_config::DEFAULT_MIRROR_PERCENT;

use super::names::{variant_name, SERVICE_PORT};
use crate::gateway::{grpc_parent_refs, http_parent_refs};

/// What the HTTPRoute and the GRPCRoute of a ModelDeployment share, before it takes either's types.
struct Shape<'a> {
    /// The Gateways (or other parents) to attach to; `None` when the spec names none.
    parents: Option<&'a [ParentRef]>,
    /// Per variant in spec order, its Service and its weight (weight 0 included, so that the route
    /// lists every variant).
    backends: Vec<(String, i32)>,
    /// With a mirror, its Service and its `percent`: only when it is below 100 (absent means all
    /// requests).
    mirror: Option<(String, Option<i32>)>,
}

impl<'a> Shape<'a> {
    fn of(md: &'a ModelDeployment, name: &str, weights: &[i32]) -> Shape<'a> {
        let t = md.spec.traffic.as_ref();
        Shape {
            parents: t
                .and_then(|t| t.gateway.as_ref())
                .map(|g| g.parent_refs.as_slice())
                .filter(|p| !p.is_empty()),
            backends: md
                .spec
                .variants
                .iter()
                .zip(weights)
                .map(|(v, w)| (variant_name(name, &v.name), *w))
                .collect(),
            mirror: t.and_then(|t| t.mirror.as_ref()).map(|m| {
                let percent = m.percent.unwrap_or(DEFAULT_MIRROR_PERCENT);
                (
                    variant_name(name, &m.variant),
                    (percent < 100).then_some(percent),
                )
            }),
        }
    }
}

/// The HTTPRoute spec a ModelDeployment asks for: its parents, and one rule with a weighted backend
/// per variant (weight 0 included, so that the route lists every variant) and, with a mirror, a
/// `RequestMirror` filter (with `percent` only when it is below 100; absent means all requests).
/// `weights` are the weights in effect, in spec order.
pub fn route_spec(md: &ModelDeployment, name: &str, weights: &[i32]) -> HttpRouteSpec {
    let shape = Shape::of(md, name, weights);
    let backend_refs = shape
        .backends
        .into_iter()
        .map(|(name, weight)| HttpRouteRulesBackendRefs {
            name,
            port: Some(SERVICE_PORT),
            weight: Some(weight),
            ..HttpRouteRulesBackendRefs::default()
        })
        .collect();
    let filters = shape.mirror.map(|(name, percent)| {
        vec![HttpRouteRulesFilters {
            r#type: HttpRouteRulesFiltersType::RequestMirror,
            request_mirror: Some(HttpRouteRulesFiltersRequestMirror {
                backend_ref: HttpRouteRulesFiltersRequestMirrorBackendRef {
                    name,
                    port: Some(SERVICE_PORT),
                    ..HttpRouteRulesFiltersRequestMirrorBackendRef::default()
                },
                fraction: None,
                percent,
            }),
            ..HttpRouteRulesFilters::default()
        }]
    });
    HttpRouteSpec {
        parent_refs: shape.parents.map(http_parent_refs),
        rules: Some(vec![HttpRouteRules {
            backend_refs: Some(backend_refs),
            filters,
            ..HttpRouteRules::default()
        }]),
        ..HttpRouteSpec::default()
    }
}

/// The GRPCRoute spec of a ModelDeployment with `protocol: GRPC`: the same parents, weighted
/// backends and mirror as [`route_spec`], in the GRPCRoute's types.
pub fn grpc_route_spec(md: &ModelDeployment, name: &str, weights: &[i32]) -> GrpcRouteSpec {
    let shape = Shape::of(md, name, weights);
    let backend_refs = shape
        .backends
        .into_iter()
        .map(|(name, weight)| GrpcRouteRulesBackendRefs {
            name,
            port: Some(SERVICE_PORT),
            weight: Some(weight),
            ..GrpcRouteRulesBackendRefs::default()
        })
        .collect();
    let filters = shape.mirror.map(|(name, percent)| {
        vec![GrpcRouteRulesFilters {
            r#type: GrpcRouteRulesFiltersType::RequestMirror,
            request_mirror: Some(GrpcRouteRulesFiltersRequestMirror {
                backend_ref: GrpcRouteRulesFiltersRequestMirrorBackendRef {
                    name,
                    port: Some(SERVICE_PORT),
                    ..GrpcRouteRulesFiltersRequestMirrorBackendRef::default()
                },
                fraction: None,
                percent,
            }),
            ..GrpcRouteRulesFilters::default()
        }]
    });
    GrpcRouteSpec {
        parent_refs: shape.parents.map(grpc_parent_refs),
        rules: Some(vec![GrpcRouteRules {
            backend_refs: Some(backend_refs),
            filters,
            ..GrpcRouteRules::default()
        }]),
        ..GrpcRouteSpec::default()
    }
}

/// The weight each variant Service has in the backends of a route's first rule (as Keelson writes
/// it). A backendRef without a weight has the Gateway API default of 1.
fn weights<'a>(backends: impl Iterator<Item = (&'a String, Option<i32>)>) -> BTreeMap<String, i32> {
    backends
        .map(|(name, weight)| (name.clone(), weight.unwrap_or(1)))
        .collect()
}

/// The weight each variant Service has in an HTTPRoute.
pub fn route_weights(route: &HttpRoute) -> BTreeMap<String, i32> {
    let rule = route.spec.rules.as_deref().unwrap_or_default().first();
    let backends = rule
        .and_then(|r| r.backend_refs.as_deref())
        .unwrap_or_default();
    weights(backends.iter().map(|b| (&b.name, b.weight)))
}

/// The weight each variant Service has in a GRPCRoute.
pub fn grpc_route_weights(route: &GrpcRoute) -> BTreeMap<String, i32> {
    let rule = route.spec.rules.as_deref().unwrap_or_default().first();
    let backends = rule
        .and_then(|r| r.backend_refs.as_deref())
        .unwrap_or_default();
    weights(backends.iter().map(|b| (&b.name, b.weight)))
}
