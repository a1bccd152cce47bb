//! The ModelDeployment reconciler: the steps of the [`driver`] pipeline for a ModelDeployment.
//! Build is [`super::build`]; apply writes the variants, then what routes traffic to them, then the
//! entry Service, sweeps the orphans and observes; status is [`super::status`].
//!
//! The router's sticky-hash key is a Secret `<name>-router-key` made once ([`crate::secret`]): in
//! `Builtin` mode it is created before the router when the cache does not hold it, and never
//! updated, so every reconcile after the first writes nothing for it. It is not swept when the mode
//! changes (the operator may not delete Secrets): it goes with the ModelDeployment, and a return to
//! `Builtin` keeps the same sticky split.
//!
//! Deployments, Services, ConfigMaps, HorizontalPodAutoscalers and Secrets are watched and cached
//! (the Secrets without their data: only their existence is read). The ready
//! pods of each variant are read from the cached Deployments in `fetch` and gate the traffic
//! (see [`super::gate`]): a Deployment's status change wakes its ModelDeployment.
//!
//! `replicas` and autoscaling: with `autoscaling`, the variant Deployment is applied without
//! `replicas`, so that server-side apply leaves the field to the HorizontalPodAutoscaler. Giving up
//! a field that no other manager owns would reset it to its default (1 pod), so before that first
//! apply the current count is applied once by the field manager `keelson-handover`, which keeps it
//! until the autoscaler writes it. When `autoscaling` is removed, the autoscaler is deleted first
//! and the Deployment is applied with `replicas` again: `keelson` owns the field again.
//!
//! The HTTPRoute (or, with `protocol: GRPC`, the GRPCRoute) is not watched: its CRD may be absent,
//! and a watch on a missing resource type would fail forever. In `GatewayAPI` mode it is read with a
//! GET, applied, and read back; the ModelDeployment is then requeued every few minutes so that a hand
//! edit of the route or a Gateway's verdict on it is seen without a watch. The entry Service's
//! annotations record the mode and protocol it was built for, so that a route of the other kind (or
//! any route, after leaving `GatewayAPI`) is looked for and deleted only when one may be left.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use gateway_api::grpcroutes::GrpcRoute;
use gateway_api::httproutes::HttpRoute;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::core::Status;
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource, ResourceExt};

use super::build::{build, Children};
use super::gate::{ready_pods, ReadyPods};
use super::names::{
    protocol, router_kind, router_kind_name, ANNOTATION_AUTOSCALED, ANNOTATION_PROTOCOL,
    ANNOTATION_ROUTER, HANDOVER_MANAGER,
};
use super::rollout::{self, Decision};
use super::rollout_metrics::Windows;
use super::status::{invalid, status, Observed, TRAFFIC_DEGRADED};
use super::traffic::{router_key_name, Traffic, ROUTER_KEY_BYTES};
use crate::error::{BuildError, Error, Result};
use crate::runtime::apply::{self, Object, Outcome};
use crate::runtime::controller::{
    cached, child_cache, child_cache_trimmed, children_of, error_policy, owner_of,
    parent_controller, timed, ChildStore, Shared, Synced, RESYNC,
};
use crate::runtime::driver::{self, Applied, Change, Changes, Kind, Next, Note};
use crate::secret::{self, Once};
use keelson_api::conditions::{self, READY};
use keelson_api::meta::{is_controlled_by, Owner};
use keelson_api::modeldeployment::{ModelDeployment, ModelDeploymentStatus, Protocol, RouterKind};

/// Environment variable naming the image of the built-in router.
pub const ROUTER_IMAGE_ENV: &str = "KEELSON_ROUTER_IMAGE";
/// Resync of a ModelDeployment whose HTTPRoute is not watched (`GatewayAPI` mode, including when the
/// Gateway API CRDs are missing: slow, never hot).
pub const ROUTE_RESYNC: Duration = Duration::from_secs(300);
/// Ready reasons that need a person, recorded as Warning events when they appear.
const FAILURE_REASONS: &[&str] = &[
    "GatewayAPIMissing",
    "ProgressDeadlineExceeded",
    "ReplicaFailure",
    "RouteNotAccepted",
    "RouteRefsNotResolved",
];

/// The router image: `KEELSON_ROUTER_IMAGE` when set, else the operator's own image at this version.
pub fn router_image(from_env: Option<String>) -> String {
    from_env
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("ghcr.io/keelson/keelson:{}", env!("CARGO_PKG_VERSION")))
}

/// The ModelDeployment controller's context: shared state plus its child caches.
pub struct Ctx {
    pub shared: Arc<Shared>,
    pub deployments: ChildStore<Deployment>,
    pub services: ChildStore<Service>,
    pub config_maps: ChildStore<ConfigMap>,
    pub autoscalers: ChildStore<HorizontalPodAutoscaler>,
    /// The router key Secrets, without their data.
    pub secrets: ChildStore<Secret>,
    /// Whether the child caches have been listed.
    pub synced: Synced,
    pub router_image: String,
    /// The open analysis window of each rollout.
    pub windows: Windows,
}

/// Runs the ModelDeployment controller until `shutdown` resolves.
pub async fn run(
    shared: Arc<Shared>,
    concurrency: u16,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = shared.client.clone();
    let (deployments, deploy_events) = child_cache::<Deployment>(&client, "ModelDeployment");
    let (services, svc_events) = child_cache::<Service>(&client, "ModelDeployment");
    let (config_maps, cm_events) = child_cache::<ConfigMap>(&client, "ModelDeployment");
    let (autoscalers, hpa_events) =
        child_cache::<HorizontalPodAutoscaler>(&client, "ModelDeployment");
    // The key itself is never read back: the cache keeps no data.
    let (secrets, secret_events) =
        child_cache_trimmed::<Secret>(&client, "ModelDeployment", |s: &mut Secret| {
            s.data = None;
            s.string_data = None;
        });
    let synced = {
        let (d, s, c, h, k) = (
            deployments.clone(),
            services.clone(),
            config_maps.clone(),
            autoscalers.clone(),
            secrets.clone(),
        );
        Synced::spawn(async move {
            tokio::try_join!(
                d.wait_until_ready(),
                s.wait_until_ready(),
                c.wait_until_ready(),
                h.wait_until_ready(),
                k.wait_until_ready()
            )
            .map(|_| ())
        })
    };
    shared.track(synced.clone());
    let metrics = shared.metrics.clone();
    let ctx = Arc::new(Ctx {
        shared: shared.clone(),
        deployments,
        services,
        config_maps,
        autoscalers,
        secrets,
        synced,
        router_image: router_image(std::env::var(ROUTER_IMAGE_ENV).ok()),
        windows: Windows::default(),
    });
    parent_controller(Api::<ModelDeployment>::all(client), concurrency)
        .watches_stream(deploy_events, |c| owner_of::<ModelDeployment, _>(&c))
        .watches_stream(svc_events, |c| owner_of::<ModelDeployment, _>(&c))
        .watches_stream(cm_events, |c| owner_of::<ModelDeployment, _>(&c))
        .watches_stream(hpa_events, |c| owner_of::<ModelDeployment, _>(&c))
        .watches_stream(secret_events, |c| owner_of::<ModelDeployment, _>(&c))
        .graceful_shutdown_on(shutdown)
        .run(
            move |o, c| timed(metrics.clone(), "ModelDeployment", driver::reconcile(o, c)),
            |md, err, ctx| error_policy(md.as_ref(), err, &ctx.shared),
            ctx,
        )
        .for_each(|r| shared.finished(r))
        .await;
}

/// Whether a 404 from a request for `name` means that the resource type is not served (its CRD is
/// missing) rather than that the object does not exist. The API server names the object in the
/// details of an object's NotFound; a missing type gets a bare 404.
pub fn type_missing(s: &Status, name: &str) -> bool {
    s.code == 404 && s.details.as_ref().is_none_or(|d| d.name != name)
}

impl Kind for Ctx {
    type Parent = ModelDeployment;
    type Fetched = Fetched;
    type Children = Children;
    type Observed = Observed;
    type Status = ModelDeploymentStatus;

    const KIND: &'static str = "ModelDeployment";

    fn context(&self) -> (&Shared, &Synced) {
        (&self.shared, &self.synced)
    }

    fn fetch(&self, md: &ModelDeployment, owner: &Owner) -> Fetched {
        let ready = ready_pods(md, |name| {
            cached(&self.deployments, &owner.namespace, name)
                .and_then(|d| d.status.as_ref()?.ready_replicas)
        });
        // A key is made only for a router that has none yet.
        let builtin = router_kind(md) == RouterKind::Builtin;
        let router_key = Once::fetch(
            &self.secrets,
            &owner.namespace,
            &router_key_name(&owner.name),
            || {
                if builtin {
                    secret::hex(ROUTER_KEY_BYTES)
                } else {
                    String::new()
                }
            },
        );
        Fetched {
            ready,
            router_key,
            rollout: None,
        }
    }

    fn previous(&self, md: &ModelDeployment, _: &Fetched) -> Option<ModelDeploymentStatus> {
        md.status.clone()
    }

    fn forget(&self, md: &ModelDeployment) {
        self.windows.forget(&window_key(md));
    }

    /// The rollout's decision, with what the router measured when its analysis window opens or
    /// is due.
    async fn sense(
        &self,
        md: &ModelDeployment,
        owner: &Owner,
        prev: Option<&ModelDeploymentStatus>,
        f: &mut Fetched,
        now: &Time,
    ) {
        let key = window_key(md);
        let Some(r) = rollout::rolling(md) else {
            self.windows.forget(&key);
            return;
        };
        let prev = prev.and_then(|s| s.rollout.as_ref());
        let state = rollout::current(&r, prev, now);
        let sensed = self
            .windows
            .sense(
                &self.shared.client,
                &key,
                (&owner.namespace, &owner.name),
                &r,
                &state,
                now.0,
            )
            .await;
        let ready = f.ready.get(&r.variant.name).copied().unwrap_or(0) > 0;
        let decision = rollout::decide(&r, prev, ready, &sensed.signal, now);
        self.windows.settle(&key, &decision, sensed);
        f.rollout = Some(decision);
    }

    fn build(
        &self,
        md: &ModelDeployment,
        owner: &Owner,
        f: &Fetched,
    ) -> Result<Children, BuildError> {
        let rollout = f.rollout.as_ref().map(|d| &d.status);
        build(
            md,
            owner,
            &self.router_image,
            rollout,
            &f.ready,
            &f.router_key.value,
        )
    }

    fn invalid(
        &self,
        md: &ModelDeployment,
        _: &Fetched,
        err: &BuildError,
        now: &Time,
    ) -> ModelDeploymentStatus {
        invalid(md, err, now)
    }

    async fn apply(
        &self,
        md: &ModelDeployment,
        owner: &Owner,
        f: &Fetched,
        children: Children,
        changes: &mut Changes,
    ) -> Applied<Observed> {
        match converge(md, owner, self, &f.router_key, children, changes).await {
            Ok(mut observed) => {
                if let Some(d) = &f.rollout {
                    observed.rollout = Some(d.status.clone());
                    observed.rollout_requeue = d.requeue;
                }
                Applied {
                    observed,
                    error: None,
                }
            }
            Err(e) => {
                driver::record(
                    &self.shared,
                    md,
                    Note::warning("ReconcileFailed", e.to_string()),
                );
                Applied {
                    observed: Observed::default(),
                    error: Some(e),
                }
            }
        }
    }

    fn status(
        &self,
        md: &ModelDeployment,
        _: &Fetched,
        observed: &Observed,
        failed: Option<&Error>,
        now: &Time,
    ) -> Option<ModelDeploymentStatus> {
        match failed {
            None => Some(status(md, observed, now)),
            // A child the API server refuses: the status says so (reason ChildRefused), and the
            // reconcile is retried with backoff. Any other failure is only retried.
            Some(e) => e.refusal().map(|r| invalid(md, &r, now)),
        }
    }

    fn transition(
        &self,
        _md: &ModelDeployment,
        prev: Option<&ModelDeploymentStatus>,
        new: &ModelDeploymentStatus,
        _observed: &Observed,
    ) -> (Vec<Note>, Vec<Change>) {
        let prev_ready = prev.and_then(|s| conditions::find(&s.conditions, READY));
        let Some(r) = conditions::find(&new.conditions, READY) else {
            return (Vec::new(), Vec::new());
        };
        let moved = prev_ready.is_none_or(|p| p.status != r.status || p.reason != r.reason);
        let mut notes = if moved && r.status == "True" {
            vec![Note::normal(r.reason.clone(), r.message.clone())]
        } else if moved && FAILURE_REASONS.contains(&r.reason.as_str()) {
            vec![Note::warning(r.reason.clone(), r.message.clone())]
        } else {
            Vec::new()
        };
        // Traffic moved off a variant, or back onto it (not at creation, when nothing is ready yet).
        let prev_degraded = prev.and_then(|s| conditions::find(&s.conditions, TRAFFIC_DEGRADED));
        if let (Some(p), Some(d)) = (
            prev_degraded,
            conditions::find(&new.conditions, TRAFFIC_DEGRADED),
        ) {
            if d.reason == "VariantNotReady" && (p.status != d.status || p.reason != d.reason) {
                notes.push(Note::warning(d.reason.clone(), d.message.clone()));
            } else if p.status == "True" && d.status == "False" {
                notes.push(Note::normal("TrafficRestored", d.message.clone()));
            }
        }
        notes.extend(rollout::notes(
            prev.and_then(|s| s.rollout.as_ref()),
            new.rollout.as_ref(),
        ));
        (notes, Vec::new())
    }

    fn next(&self, md: &ModelDeployment, observed: &Observed) -> Next {
        let resync = if router_kind(md) == RouterKind::GatewayApi {
            ROUTE_RESYNC
        } else {
            RESYNC
        };
        Next::Requeue(observed.rollout_requeue.map_or(resync, |r| r.min(resync)))
    }
}

/// The key of a ModelDeployment's analysis window.
fn window_key(md: &ModelDeployment) -> String {
    format!(
        "{}/{}",
        md.metadata.namespace.as_deref().unwrap_or_default(),
        md.metadata.name.as_deref().unwrap_or_default()
    )
}

/// What a ModelDeployment reconcile reads from the caches before it builds.
pub struct Fetched {
    /// Ready pods of each variant, from the cached Deployments: the input of the traffic gate.
    ready: ReadyPods,
    /// The router key Secret, or a new key when there is none yet.
    router_key: Once,
    /// The rollout's decision for this reconcile, when a variant rolls out.
    rollout: Option<Decision>,
}

/// Brings the children to `children` and returns what the cluster holds afterwards.
async fn converge(
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
async fn sweep<K: Object>(
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use kube::core::response::StatusDetails;

    #[test]
    fn router_image_defaults_to_the_operator_image() {
        assert_eq!(
            router_image(None),
            format!("ghcr.io/keelson/keelson:{}", env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(router_image(Some("  ".into())), router_image(None));
        assert_eq!(
            router_image(Some("reg/keelson:dev".into())),
            "reg/keelson:dev"
        );
    }

    fn details(json: serde_json::Value) -> StatusDetails {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_missing_type_is_told_from_a_missing_object() {
        let object_missing = Status::failure("httproutes \"fraud\" not found", "NotFound")
            .with_code(404)
            .with_details(details(serde_json::json!({
                "name": "fraud", "group": "gateway.networking.k8s.io", "kind": "httproutes"
            })));
        assert!(!type_missing(&object_missing, "fraud"));
        let group_missing =
            Status::failure("404 page not found", "Failed to parse error data").with_code(404);
        assert!(type_missing(&group_missing, "fraud"));
        let resource_missing = Status::failure(
            "the server could not find the requested resource",
            "NotFound",
        )
        .with_code(404)
        .with_details(details(serde_json::json!({})));
        assert!(type_missing(&resource_missing, "fraud"));
        assert!(!type_missing(
            &Status::failure("forbidden", "Forbidden").with_code(403),
            "fraud"
        ));
    }
}
