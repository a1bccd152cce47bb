//! The apply step of a ModelDeployment reconcile: writes the children in order (autoscalers
//! swept, variants, traffic, entry Service, routes), sweeps the orphans and reads back what the
//! cluster holds. It builds nothing and decides no status.

use std::collections::BTreeSet;

use gateway_api::grpcroutes::GrpcRoute;
use gateway_api::httproutes::HttpRoute;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource, ResourceExt};

use super::build::Children;
use super::context::Ctx;
use super::names::{
    protocol, router_kind, router_kind_name, ANNOTATION_AUTOSCALED, ANNOTATION_PROTOCOL,
    ANNOTATION_ROUTER, HANDOVER_MANAGER,
};
use super::status::Observed;
use super::traffic::Traffic;
use crate::error::{Error, Result};
use crate::runtime::apply::{self, Object, Outcome};
use crate::runtime::controller::{cached, children_of, Child, ChildStore};
use crate::runtime::driver::{Change, Changes};
use crate::secret::Once;
use keelson_api::meta::{is_controlled_by, Owner};
use keelson_api::modeldeployment::{ModelDeployment, Protocol, RouterKind};

pub use crate::runtime::apply::type_missing;

/// Brings the children to `children` and returns what the cluster holds afterwards.
pub(crate) async fn converge(
    md: &ModelDeployment,
    owner: &Owner,
    ctx: &Ctx,
    router_key: &Once,
    children: Children,
    changes: &mut Changes,
) -> Result<Observed> {
    let ns = owner.namespace.as_str();
    let kind = router_kind(md);
    let desired_deployments = children.deployment_names();
    let desired_services = children.service_names();
    let desired_config_maps = children.config_map_names();
    let desired_autoscalers = children.autoscaler_names();
    let Children {
        variants,
        entry,
        traffic,
    } = children;

    // An autoscaler whose variant lost `autoscaling` goes before the Deployment gets `replicas`
    // back, so that it cannot scale the variant once more in between.
    sweep(
        ctx,
        md,
        owner,
        &ctx.autoscalers,
        &desired_autoscalers,
        changes,
    )
    .await?;

    // Variants first, so that whatever routes to them finds their Services.
    for v in variants {
        if v.autoscaler.is_some() {
            hand_over_replicas(ctx, &v.deployment, changes).await?;
        }
        apply_child(ctx, md, &ctx.deployments, v.deployment, changes).await?;
        apply_child(ctx, md, &ctx.services, v.service, changes).await?;
        if let Some(hpa) = v.autoscaler {
            apply_child(ctx, md, &ctx.autoscalers, hpa, changes).await?;
        }
    }

    let mut route_desired = None;
    let mut grpc_route_desired = None;
    match traffic {
        Traffic::Builtin {
            config,
            router,
            key,
        } => {
            // The key and the config before the router: the router pod reads both.
            router_key.create(&ctx.shared, *key, changes).await?;
            let cm = config.object_ref(&());
            if apply_child(ctx, md, &ctx.config_maps, *config, changes).await? == Outcome::Updated {
                let note = format!(
                    "router config {} now splits traffic {}",
                    cm.name.clone().unwrap_or_default(),
                    spec_split(md)
                );
                ctx.shared
                    .child_event(md, "TrafficUpdated", "UpdateTraffic", note, cm);
            }
            apply_child(ctx, md, &ctx.deployments, *router, changes).await?;
        }
        Traffic::GatewayApi { route } => route_desired = Some(route),
        Traffic::GatewayApiGrpc { route } => grpc_route_desired = Some(route),
        Traffic::None => {}
    }

    // A route left from GatewayAPI mode (or of the other protocol) goes before the entry Service
    // stops saying so, so that a crash in between leaves the marker that makes the next reconcile
    // look again.
    let (http_left, grpc_left) = leftover_routes(ctx, md, owner);
    let proto = protocol(md);
    if http_left && !(kind == RouterKind::GatewayApi && proto == Protocol::Http) {
        sweep_route::<HttpRoute>(ctx, md, owner, changes).await?;
    }
    if grpc_left && !(kind == RouterKind::GatewayApi && proto == Protocol::Grpc) {
        sweep_route::<GrpcRoute>(ctx, md, owner, changes).await?;
    }
    apply_child(ctx, md, &ctx.services, entry, changes).await?;

    let mut observed = Observed::default();
    if let Some(route) = route_desired {
        match apply_route(ctx, md, *route, changes).await? {
            RouteRead::Present(r) => observed.route = Some(*r),
            RouteRead::Absent => {}
            RouteRead::TypeMissing => observed.gateway_api_missing = true,
        }
    }
    if let Some(route) = grpc_route_desired {
        match apply_route(ctx, md, *route, changes).await? {
            RouteRead::Present(r) => observed.grpc_route = Some(*r),
            RouteRead::Absent => {}
            RouteRead::TypeMissing => observed.gateway_api_missing = true,
        }
    }

    // Orphans: a removed variant, or the previous mode's router. Traffic has moved off them above.
    sweep(
        ctx,
        md,
        owner,
        &ctx.deployments,
        &desired_deployments,
        changes,
    )
    .await?;
    sweep(ctx, md, owner, &ctx.services, &desired_services, changes).await?;
    sweep(
        ctx,
        md,
        owner,
        &ctx.config_maps,
        &desired_config_maps,
        changes,
    )
    .await?;

    observed.deployments = children_of(&ctx.deployments, ns, &owner.name)
        .into_iter()
        .filter(|d| desired_deployments.contains(&d.name_any()))
        .map(|d| (*d).clone())
        .collect();
    if kind == RouterKind::Builtin {
        observed.config = desired_config_maps
            .iter()
            .next()
            .and_then(|n| cached(&ctx.config_maps, ns, n))
            .map(|c| (*c).clone());
    }
    Ok(observed)
}

/// Before a variant Deployment is first applied without `replicas` (autoscaling was just turned
/// on), applies its current count under [`HANDOVER_MANAGER`], so that the field keeps its value
/// when `keelson` stops owning it. Nothing to do for a new Deployment (the autoscaler sets the count
/// from the default of 1) or one already applied for autoscaling (the annotation says so).
async fn hand_over_replicas(ctx: &Ctx, desired: &Deployment, changes: &mut Changes) -> Result<()> {
    let name = desired.name_any();
    let ns = desired.namespace().unwrap_or_default();
    let Some(existing) = cached(&ctx.deployments, &ns, &name) else {
        return Ok(());
    };
    if existing.annotations().contains_key(ANNOTATION_AUTOSCALED) {
        return Ok(());
    }
    let Some(current) = existing.spec.as_ref().and_then(|s| s.replicas) else {
        return Ok(());
    };
    let patch = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"replicas": current},
    });
    let api: Api<Deployment> = Api::namespaced(ctx.shared.client.clone(), &ns);
    ctx.shared.writes.apply.inc();
    api.patch(
        &name,
        &PatchParams::apply(HANDOVER_MANAGER),
        &Patch::Apply(&patch),
    )
    .await?;
    changes.push(Change::updated(desired));
    Ok(())
}

/// Applies one cached child, recording an event when it is created.
async fn apply_child<K: Object>(
    ctx: &Ctx,
    md: &ModelDeployment,
    store: &Store<K>,
    desired: K,
    changes: &mut Changes,
) -> Result<Outcome> {
    let shared = &ctx.shared;
    let name = desired.name_any();
    let ns = desired.namespace().unwrap_or_default();
    let child = desired.object_ref(&());
    let existing = cached(store, &ns, &name);
    let (made, updated) = (Change::created(&desired), Change::updated(&desired));
    let outcome =
        apply::apply(&shared.client, &shared.writes, desired, existing.as_deref()).await?;
    match outcome {
        Outcome::Unchanged => {}
        Outcome::Created => {
            let note = format!("created {} {name}", K::kind(&()));
            shared.child_event(md, "Created", "Create", note, child);
            changes.push(made);
        }
        Outcome::Updated => changes.push(updated),
    }
    Ok(outcome)
}

/// The split the spec asks for, e.g. `champion=90,challenger=10`.
fn spec_split(md: &ModelDeployment) -> String {
    md.spec
        .variants
        .iter()
        .map(|v| format!("{}={}", v.name, v.weight))
        .collect::<Vec<_>>()
        .join(",")
}

/// Deletes the cached children of `owner` that the build no longer produces.
async fn sweep<K: Child>(
    ctx: &Ctx,
    md: &ModelDeployment,
    owner: &Owner,
    store: &ChildStore<K>,
    desired: &BTreeSet<String>,
    changes: &mut Changes,
) -> Result<()> {
    let uid = owner.owner_ref.uid.as_str();
    for child in children_of(store, &owner.namespace, &owner.name) {
        let name = child.name_any();
        if desired.contains(&name)
            || !is_controlled_by(child.meta(), uid)
            || child.meta().deletion_timestamp.is_some()
        {
            continue;
        }
        delete_child(ctx, md, child.as_ref(), changes).await?;
    }
    Ok(())
}

async fn delete_child<K: Object>(
    ctx: &Ctx,
    md: &ModelDeployment,
    child: &K,
    changes: &mut Changes,
) -> Result<()> {
    let shared = &ctx.shared;
    if apply::delete(&shared.client, &shared.writes, child).await? {
        let note = format!("deleted {} {}", K::kind(&()), child.name_any());
        shared.child_event(md, "Deleted", "Delete", note, child.object_ref(&()));
        changes.push(Change::deleted(child, "orphan"));
    }
    Ok(())
}

/// Whether an HTTPRoute and whether a GRPCRoute of this ModelDeployment may exist, from the
/// annotations of the cached entry Service (the mode and protocol it was last built for). Without
/// the entry Service, both may for a ModelDeployment reconciled before: a new one has no route, and
/// the GET would cost every creation a request (a 404 without Gateway API).
fn leftover_routes(ctx: &Ctx, md: &ModelDeployment, owner: &Owner) -> (bool, bool) {
    match cached(&ctx.services, &owner.namespace, &owner.name) {
        Some(s) => {
            let a = s.annotations();
            let gateway = a.get(ANNOTATION_ROUTER).map(String::as_str)
                == Some(router_kind_name(RouterKind::GatewayApi));
            let grpc = a.get(ANNOTATION_PROTOCOL).map(String::as_str) == Some("GRPC");
            (gateway && !grpc, gateway && grpc)
        }
        None => (md.status.is_some(), md.status.is_some()),
    }
}

/// A route as a GET finds it.
enum RouteRead<K> {
    /// The API server does not serve this route type (its Gateway API CRD is not installed).
    TypeMissing,
    Absent,
    Present(Box<K>),
}

async fn get_route<K: Object>(api: &Api<K>, name: &str) -> Result<RouteRead<K>> {
    match api.get(name).await {
        Ok(r) => Ok(RouteRead::Present(Box::new(r))),
        Err(kube::Error::Api(s)) if type_missing(&s, name) => Ok(RouteRead::TypeMissing),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(RouteRead::Absent),
        Err(e) => Err(e.into()),
    }
}

/// Deletes the route `<name>` of type `K` if it exists and is this ModelDeployment's (GET first: no
/// watch).
async fn sweep_route<K: Object>(
    ctx: &Ctx,
    md: &ModelDeployment,
    owner: &Owner,
    changes: &mut Changes,
) -> Result<()> {
    let api: Api<K> = Api::namespaced(ctx.shared.client.clone(), &owner.namespace);
    if let RouteRead::Present(route) = get_route(&api, &owner.name).await? {
        if is_controlled_by(route.meta(), &owner.owner_ref.uid)
            && route.meta().deletion_timestamp.is_none()
        {
            delete_child(ctx, md, route.as_ref(), changes).await?;
        }
    }
    Ok(())
}

/// Applies the route (an HTTPRoute or a GRPCRoute) and reads it back (`TypeMissing` when its CRD
/// is absent).
async fn apply_route<K: Object>(
    ctx: &Ctx,
    md: &ModelDeployment,
    desired: K,
    changes: &mut Changes,
) -> Result<RouteRead<K>> {
    let client: &Client = &ctx.shared.client;
    let name = desired.name_any();
    let ns = desired.namespace().unwrap_or_default();
    let child = desired.object_ref(&());
    let kind = K::kind(&()).to_string();
    let api: Api<K> = Api::namespaced(client.clone(), &ns);
    let existing = match get_route(&api, &name).await? {
        RouteRead::TypeMissing => return Ok(RouteRead::TypeMissing),
        RouteRead::Absent => None,
        RouteRead::Present(r) => Some(r),
    };
    match apply::apply(client, &ctx.shared.writes, desired, existing.as_deref()).await {
        Ok(Outcome::Unchanged) => Ok(existing.map_or(RouteRead::Absent, RouteRead::Present)),
        Ok(outcome) => {
            let change = if outcome == Outcome::Created {
                Change::Created {
                    kind: kind.clone(),
                    name: name.clone(),
                }
            } else {
                Change::Updated {
                    kind: kind.clone(),
                    name: name.clone(),
                }
            };
            let (reason, action, note) = if outcome == Outcome::Created {
                ("Created", "Create", format!("created {kind} {name}"))
            } else {
                (
                    "TrafficUpdated",
                    "UpdateTraffic",
                    format!("{kind} {name} now splits traffic {}", spec_split(md)),
                )
            };
            ctx.shared.child_event(md, reason, action, note, child);
            changes.push(change);
            get_route(&api, &name).await
        }
        // A server-side apply creates what is absent: a 404 means the type itself is not served.
        Err(Error::Kube(kube::Error::Api(s))) if s.code == 404 => Ok(RouteRead::TypeMissing),
        Err(e) => Err(e),
    }
}
