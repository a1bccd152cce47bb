//! The ModelDeployment reconciler: the steps of the [`driver`] pipeline for a ModelDeployment.
//! Build is [`super::build`]; apply ([`super::converge`]) writes the variants, then what routes
//! traffic to them, then the entry Service, sweeps the orphans and observes; status is
//! [`super::status`].
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

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Api;

use super::build::{build, Children};
pub use super::context::Ctx;
use super::converge::converge;
use super::gate::{ready_pods, ReadyPods};
use super::names::router_kind;
use super::rollout::{self, Decision};
use super::rollout_metrics::Windows;
use super::status::{invalid, status, Observed, TRAFFIC_DEGRADED};
use super::traffic::{router_key_name, ROUTER_KEY_BYTES};
use crate::error::{BuildError, Error};
use crate::runtime::controller::{
    cached, child_cache, child_cache_trimmed, parent_controller, Shared, Synced, RESYNC,
};
use crate::runtime::driver::{self, Applied, Change, Changes, Kind, Next, Note};
use crate::secret::{self, Once};
use keelson_api::conditions::{self, READY};
use keelson_api::meta::Owner;
use keelson_api::modeldeployment::{ModelDeployment, ModelDeploymentStatus, RouterKind};

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

/// Runs the ModelDeployment controller until `shutdown` resolves.
pub async fn run(
    shared: Arc<Shared>,
    concurrency: u16,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = shared.client.clone();
    let (deployments, deploy_events) = child_cache::<Deployment, ModelDeployment>(&client);
    let (services, svc_events) = child_cache::<Service, ModelDeployment>(&client);
    let (config_maps, cm_events) = child_cache::<ConfigMap, ModelDeployment>(&client);
    let (autoscalers, hpa_events) =
        child_cache::<HorizontalPodAutoscaler, ModelDeployment>(&client);
    // The key itself is never read back: the cache keeps no data.
    let (secrets, secret_events) =
        child_cache_trimmed::<Secret, ModelDeployment>(&client, |s: &mut Secret| {
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
    let controller = parent_controller(Api::<ModelDeployment>::all(client), concurrency)
        .reconcile_on(deploy_events)
        .reconcile_on(svc_events)
        .reconcile_on(cm_events)
        .reconcile_on(hpa_events)
        .reconcile_on(secret_events);
    driver::run_controller(controller, ctx, shared, shutdown).await;
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
                if !e.namespace_terminating() {
                    driver::record(
                        &self.shared,
                        md,
                        Note::warning("ReconcileFailed", e.to_string()),
                    );
                }
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
#[path = "reconcile_tests.rs"]
mod tests;
