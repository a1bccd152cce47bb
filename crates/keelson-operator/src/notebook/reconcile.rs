//! The Notebook reconciler: the steps of the [`driver`] pipeline for a Notebook. Fetch reads the
//! token Secret (a token is made only when none exists); build is [`super::build`]; apply writes
//! the token Secret, the workspace PVC, the NetworkPolicy (before any pod, so that the pod is never
//! unprotected), the Service, the HTTPRoute and the pod, in that order, then reads the server's
//! activity when idle culling is on ([`super::idle`]); status is [`super::status`].
//!
//! Idle culling suspends a notebook the way a person does: a merge patch of `spec.suspend: true`
//! (field manager `keelson-idle-culler`, with the resourceVersion the decision was taken on), with
//! the annotation `keelson.dev/idle-culled-at`, the counterpart of Kubeflow's
//! `kubeflow-resource-stopped`, and `keelson.dev/idle-last-activity`, the activity the decision was
//! taken on (the status of a culled notebook is rebuilt from it). The pod then goes as for any
//! suspension; the workspace PVC and the token Secret are never touched. Resuming is
//! `spec.suspend: false`; the operator then removes the annotations.

use std::sync::Arc;
use std::time::Duration;

use gateway_api::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};

use super::build::{
    build, pod_name, token_secret_name, workspace_name, BuildCtx, Children, ANNOTATION_EXPOSED,
    TOKEN_KEY,
};
use super::idle::{self, decide, parse_duration, read_status, Verdict};
use super::status::{culled_at, invalid, pod_action, status, Observed, PodAction};
use crate::error::{BuildError, Error, Result, CHILD_REFUSED};
use crate::runtime::apply::{self, applied_hash, stamp, Outcome};
use crate::runtime::controller::RESYNC;
use crate::runtime::controller::{
    cached, child_cache, parent_controller, ChildStore, Shared, Synced,
};
use crate::runtime::driver::{self, Applied, Change, Changes, Kind, Next, Note};
use crate::secret::{self, Once};
use keelson_api::conditions::{self, READY};
use keelson_api::meta::{is_controlled_by, Owner};
use keelson_api::notebook::{
    Notebook, NotebookStatus, ANNOTATION_CULLED_AT, ANNOTATION_IDLE_LAST_ACTIVITY,
    CULLER_FIELD_MANAGER, DEFAULT_PORT,
};

/// Length of a generated access token.
const TOKEN_LEN: usize = 48;

/// The Notebook controller's context: shared state plus its child caches.
pub struct Ctx {
    pub shared: Arc<Shared>,
    pub pods: ChildStore<Pod>,
    pub services: ChildStore<Service>,
    pub secrets: ChildStore<Secret>,
    pub pvcs: ChildStore<PersistentVolumeClaim>,
    pub netpols: ChildStore<NetworkPolicy>,
    /// Whether the child caches have been listed.
    pub synced: Synced,
    pub opts: Options,
}

/// Settings of the Notebook controller.
#[derive(Clone, Debug)]
pub struct Options {
    /// How often the activity of a notebook with `spec.idle` is read.
    pub idle_poll: Duration,
    /// Namespace the operator runs in, when in a cluster (`POD_NAMESPACE`): the NetworkPolicy lets
    /// it read `/api/status`.
    pub operator_namespace: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            idle_poll: idle::DEFAULT_POLL,
            operator_namespace: std::env::var("POD_NAMESPACE")
                .ok()
                .filter(|s| !s.is_empty()),
        }
    }
}

/// What a Notebook reconcile reads from the caches before it builds.
pub struct Fetched {
    owner: Owner,
    /// The token Secret, or a new token when there is none yet (an existing token is never
    /// replaced).
    token: Once,
}

/// Runs the Notebook controller until `shutdown` resolves.
pub async fn run(
    shared: Arc<Shared>,
    concurrency: u16,
    opts: Options,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = shared.client.clone();
    let (pods, pod_events) = child_cache::<Pod, Notebook>(&client);
    let (services, svc_events) = child_cache::<Service, Notebook>(&client);
    let (secrets, secret_events) = child_cache::<Secret, Notebook>(&client);
    let (pvcs, pvc_events) = child_cache::<PersistentVolumeClaim, Notebook>(&client);
    let (netpols, netpol_events) = child_cache::<NetworkPolicy, Notebook>(&client);
    let synced = {
        let (p, s, t, v, n) = (
            pods.clone(),
            services.clone(),
            secrets.clone(),
            pvcs.clone(),
            netpols.clone(),
        );
        Synced::spawn(async move {
            tokio::try_join!(
                p.wait_until_ready(),
                s.wait_until_ready(),
                t.wait_until_ready(),
                v.wait_until_ready(),
                n.wait_until_ready()
            )
            .map(|_| ())
        })
    };
    shared.track(synced.clone());
    let ctx = Arc::new(Ctx {
        shared: shared.clone(),
        pods,
        services,
        secrets,
        pvcs,
        netpols,
        synced,
        opts,
    });
    let controller = parent_controller(Api::<Notebook>::all(client), concurrency)
        .reconcile_on(pod_events)
        .reconcile_on(svc_events)
        .reconcile_on(secret_events)
        .reconcile_on(pvc_events)
        .reconcile_on(netpol_events);
    driver::run_controller(controller, ctx, shared, shutdown).await;
}

impl Kind for Ctx {
    type Parent = Notebook;
    type Fetched = Fetched;
    type Children = Children;
    type Observed = Observed;
    type Status = NotebookStatus;

    const KIND: &'static str = "Notebook";

    fn context(&self) -> (&Shared, &Synced) {
        (&self.shared, &self.synced)
    }

    fn fetch(&self, _nb: &Notebook, owner: &Owner) -> Fetched {
        let token = Once::fetch(
            &self.secrets,
            &owner.namespace,
            &token_secret_name(&owner.name),
            || secret::alphanumeric(TOKEN_LEN),
        );
        Fetched {
            owner: owner.clone(),
            token,
        }
    }

    fn previous(&self, nb: &Notebook, _: &Fetched) -> Option<NotebookStatus> {
        nb.status.clone()
    }

    fn build(&self, nb: &Notebook, owner: &Owner, f: &Fetched) -> Result<Children, BuildError> {
        build(
            nb,
            owner,
            &BuildCtx {
                token: &f.token.value,
                operator_namespace: self.opts.operator_namespace.as_deref(),
            },
        )
    }

    fn invalid(&self, nb: &Notebook, _: &Fetched, err: &BuildError, now: &Time) -> NotebookStatus {
        invalid(nb, err, now)
    }

    async fn apply(
        &self,
        nb: &Notebook,
        owner: &Owner,
        f: &Fetched,
        children: Children,
        changes: &mut Changes,
    ) -> Applied<Observed> {
        let mut gateway_api_missing = false;
        let mut written = write_children(
            nb,
            self,
            owner,
            &f.token,
            children,
            changes,
            &mut gateway_api_missing,
        )
        .await;
        let ns = owner.namespace.as_str();
        let pod = cached(&self.pods, ns, &pod_name(&owner.name)).map(|p| (*p).clone());
        let (mut idle, mut culled) = (None, false);
        if written.is_ok() {
            match cull_step(nb, self, owner, f, pod.as_ref(), changes).await {
                Ok((v, c)) => (idle, culled) = (v, c),
                Err(e) => written = Err(e),
            }
        }
        let observed = Observed {
            pod,
            workspace: cached(&self.pvcs, ns, &workspace_name(&owner.name)).map(|p| (*p).clone()),
            token_exists: f.token.exists()
                || changes.created::<Secret>(&token_secret_name(&owner.name)),
            idle,
            culled,
            gateway_api_missing,
        };
        Applied {
            observed,
            error: written.err(),
        }
    }

    fn status(
        &self,
        nb: &Notebook,
        f: &Fetched,
        observed: &Observed,
        failed: Option<&Error>,
        now: &Time,
    ) -> Option<NotebookStatus> {
        match failed {
            None => Some(status(nb, &f.owner, observed, now)),
            // A child the API server refuses: the status says so (reason ChildRefused), and the
            // reconcile is retried with backoff. Any other failure is only retried.
            Some(e) => e.refusal().map(|r| invalid(nb, &r, now)),
        }
    }

    fn transition(
        &self,
        _nb: &Notebook,
        prev: Option<&NotebookStatus>,
        new: &NotebookStatus,
        _observed: &Observed,
    ) -> (Vec<Note>, Vec<Change>) {
        if let Some(c) =
            conditions::find(&new.conditions, READY).filter(|c| c.reason == CHILD_REFUSED)
        {
            return (
                vec![Note::warning(CHILD_REFUSED, c.message.clone())],
                Vec::new(),
            );
        }
        let prev_phase = prev.and_then(|s| s.phase);
        let mut notes = Vec::new();
        if let Some(c) = conditions::find(&new.conditions, super::status::IDLE_CULLING)
            .filter(|c| c.reason == "ActivityUnknown")
        {
            let was = prev
                .and_then(|p| conditions::find(&p.conditions, super::status::IDLE_CULLING))
                .is_some_and(|p| p.reason == "ActivityUnknown");
            if !was {
                notes.push(Note::warning("ActivityUnknown", c.message.clone()));
            }
        }
        match new.phase.filter(|p| Some(*p) != prev_phase) {
            Some(p) => {
                let p = format!("{p:?}");
                let note = Note::normal("PhaseChanged", format!("phase is now {p}")).action(&p);
                notes.push(note);
                (notes, vec![Change::Phase(p)])
            }
            None => (notes, Vec::new()),
        }
    }

    fn next(&self, nb: &Notebook, observed: &Observed) -> Next {
        // Activity is read on a schedule: at the poll period, or sooner when the notebook would
        // become idle before the next poll.
        Next::Requeue(match &observed.idle {
            Some(Verdict::Active { recheck, .. }) => *recheck,
            Some(Verdict::Unknown(_)) => self.opts.idle_poll,
            _ if nb.spec.idle.is_some() && !observed.culled => self.opts.idle_poll,
            _ => RESYNC,
        })
    }
}

/// The idle culler's part of a reconcile: with `spec.idle` and a ready pod, read the activity and
/// suspend the notebook when it has been idle too long. Also drops the culled annotation of a
/// resumed notebook. Returns the verdict (`None`: nothing read) and whether it suspended.
async fn cull_step(
    nb: &Notebook,
    ctx: &Ctx,
    owner: &Owner,
    f: &Fetched,
    pod: Option<&Pod>,
    changes: &mut Changes,
) -> Result<(Option<Verdict>, bool)> {
    let shared = &ctx.shared;
    let suspended = nb.spec.suspend.unwrap_or(false);
    let api: Api<Notebook> = Api::namespaced(shared.client.clone(), &owner.namespace);
    if !suspended && culled_at(nb).is_some() {
        // Resumed: the annotation no longer describes the notebook.
        let body = serde_json::json!({"metadata": {"annotations": {
            ANNOTATION_CULLED_AT: null,
            ANNOTATION_IDLE_LAST_ACTIVITY: null,
        }}});
        let pp = PatchParams {
            field_manager: Some(CULLER_FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        shared.writes.apply.inc();
        api.patch(&owner.name, &pp, &Patch::Merge(&body)).await?;
        changes.push(Change::Labelled(format!(
            "annotations {ANNOTATION_CULLED_AT}, {ANNOTATION_IDLE_LAST_ACTIVITY} removed (resumed)"
        )));
    }
    let Some(spec_idle) = nb.spec.idle.as_ref() else {
        return Ok((None, false));
    };
    let Some(pod) = pod.filter(|p| {
        !suspended && crate::podstatus::is_ready(p) && !crate::podstatus::terminating(p)
    }) else {
        return Ok((None, false));
    };
    let Some(timeout) = parse_duration(&spec_idle.timeout) else {
        let why = format!(
            "spec.idle.timeout {:?} is not a duration",
            spec_idle.timeout
        );
        return Ok((Some(Verdict::Unknown(why)), false));
    };
    let ns = owner.namespace.as_str();
    let token = f
        .token
        .existing
        .as_deref()
        .and_then(|s| s.data.as_ref())
        .and_then(|d| d.get(TOKEN_KEY))
        .and_then(|t| String::from_utf8(t.0.clone()).ok());
    let ip = cached(&ctx.services, ns, &owner.name)
        .and_then(|s| s.spec.as_ref().and_then(|s| s.cluster_ip.clone()))
        .filter(|ip| !ip.is_empty() && ip != "None");
    let port = nb.spec.port.unwrap_or(DEFAULT_PORT);
    let reading = match (token, ip) {
        (None, _) => Err(format!(
            "the token Secret {} is not readable yet",
            token_secret_name(&owner.name)
        )),
        (_, None) => Err(format!("Service {} has no cluster IP yet", owner.name)),
        (Some(token), Some(ip)) => read_status(&ip, port, &token).await,
    };
    let verdict = decide(timeout, ctx.opts.idle_poll, &reading, Timestamp::now());
    let Verdict::Idle { last, idle_for } = &verdict else {
        return Ok((Some(verdict), false));
    };
    // Suspend, on the version the decision was taken on: a concurrent edit (a resume) wins.
    let now = Timestamp::now();
    let body = serde_json::json!({
        "metadata": {
            "resourceVersion": nb.resource_version(),
            "annotations": {
                ANNOTATION_CULLED_AT: now.to_string(),
                ANNOTATION_IDLE_LAST_ACTIVITY: last.to_string(),
            },
        },
        "spec": {"suspend": true},
    });
    let pp = PatchParams {
        field_manager: Some(CULLER_FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    shared.writes.apply.inc();
    api.patch(&owner.name, &pp, &Patch::Merge(&body)).await?;
    let (kernels, connections) = reading
        .as_ref()
        .map(|s| (s.kernels, s.connections))
        .unwrap_or_default();
    driver::record(
        shared,
        nb,
        Note::normal(
            "IdleCulled",
            format!(
                "no activity since {last} ({}s, spec.idle.timeout {}; {kernels} kernels, {connections} connections): suspended; pod {} stops, the workspace and the token are kept",
                idle_for.as_secs(),
                spec_idle.timeout,
                pod.name_any()
            ),
        ),
    );
    changes.push(Change::Labelled("spec.suspend true (idle)".into()));
    tracing::info!(last_activity = %last, "idle past spec.idle.timeout: suspended");
    Ok((Some(verdict), true))
}

/// Writes the children of `nb`: the token Secret (when there was none), the workspace PVC, the
/// Service and the pod. What it changed goes to `changed`, also when a write fails.
async fn write_children(
    nb: &Notebook,
    ctx: &Ctx,
    owner: &Owner,
    token: &Once,
    children: Children,
    changes: &mut Changes,
    gateway_api_missing: &mut bool,
) -> Result<()> {
    let Children {
        service,
        token: secret,
        workspace,
        pod,
        network_policy,
        route,
    } = children;
    let shared = &ctx.shared;
    let client = &shared.client;
    let ns = owner.namespace.as_str();

    token.create(shared, secret, changes).await?;

    let existing_pvc = cached(&ctx.pvcs, ns, &workspace_name(&owner.name));
    if let Some(pvc) = workspace {
        match existing_pvc.as_deref() {
            None => {
                let made = Change::created(&pvc);
                if apply::create_once(client, &shared.writes, pvc).await? == Outcome::Created {
                    changes.push(made);
                }
            }
            Some(e) if e.metadata.owner_references != pvc.metadata.owner_references => {
                // deletePolicy changed: only the owner reference moves; the data is never touched.
                let body = serde_json::json!({"metadata": {"ownerReferences": pvc.metadata.owner_references}});
                let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
                shared.writes.apply.inc();
                api.patch(&e.name_any(), &PatchParams::default(), &Patch::Merge(&body))
                    .await?;
                changes.push(Change::updated(e));
            }
            Some(_) => {}
        }
    }

    // The NetworkPolicy before any pod: a notebook pod never runs unprotected.
    let existing_np = cached(&ctx.netpols, ns, &owner.name);
    let (made, updated) = (
        Change::created(&network_policy),
        Change::updated(&network_policy),
    );
    match apply::apply(
        client,
        &shared.writes,
        network_policy,
        existing_np.as_deref(),
    )
    .await?
    {
        Outcome::Unchanged => {}
        Outcome::Created => changes.push(made),
        Outcome::Updated => changes.push(updated),
    }

    let existing_svc = cached(&ctx.services, ns, &owner.name);
    let routes: Api<HttpRoute> = Api::namespaced(client.clone(), ns);
    match route {
        Some(r) => *gateway_api_missing = !apply_route(ctx, nb, &routes, r, changes).await?,
        None => {
            // A route is left from spec.access.gateway only if the Service says there was one.
            let was = existing_svc
                .as_deref()
                .is_some_and(|s| s.annotations().contains_key(ANNOTATION_EXPOSED));
            if was {
                sweep_route(ctx, owner, &routes, changes).await?;
            }
        }
    }

    let (made, updated) = (Change::created(&service), Change::updated(&service));
    match apply::apply(client, &shared.writes, service, existing_svc.as_deref()).await? {
        Outcome::Unchanged => {}
        Outcome::Created => changes.push(made),
        Outcome::Updated => changes.push(updated),
    }

    let existing_pod = cached(&ctx.pods, ns, &pod_name(&owner.name));
    let desired_pod = match pod {
        Some(mut p) => {
            stamp(&mut p)?;
            Some(p)
        }
        None => None,
    };
    let desired_hash = desired_pod
        .as_ref()
        .and_then(|p| applied_hash(p).map(str::to_string));
    match pod_action(desired_hash.as_deref(), existing_pod.as_deref()) {
        PodAction::Keep => {}
        PodAction::Create => {
            if let Some(p) = desired_pod {
                let made = Change::created(&p);
                if apply::create_once(client, &shared.writes, p).await? == Outcome::Created {
                    driver::record(
                        shared,
                        nb,
                        Note::normal(
                            "PodCreated",
                            format!("created pod {}", pod_name(&owner.name)),
                        ),
                    );
                    changes.push(made);
                }
            }
        }
        PodAction::Delete(reason) => {
            if let Some(p) = existing_pod.as_deref() {
                if apply::delete(client, &shared.writes, p).await? {
                    let note = format!("deleted pod {}", p.name_any());
                    let note = if reason.is_failure() {
                        Note::warning(reason.reason(), note)
                    } else {
                        Note::normal(reason.reason(), note)
                    };
                    driver::record(shared, nb, note);
                    changes.push(Change::deleted(p, reason.reason()));
                }
            }
        }
    }

    Ok(())
}

/// Applies the notebook's HTTPRoute. `false`: the API server does not serve HTTPRoutes.
async fn apply_route(
    ctx: &Ctx,
    nb: &Notebook,
    api: &Api<HttpRoute>,
    desired: HttpRoute,
    changes: &mut Changes,
) -> Result<bool> {
    let name = desired.name_any();
    let existing = match api.get(&name).await {
        Ok(r) => Some(r),
        Err(kube::Error::Api(s))
            if s.code == 404 && s.details.as_ref().is_none_or(|d| d.name != name) =>
        {
            return Ok(false)
        }
        Err(kube::Error::Api(s)) if s.code == 404 => None,
        Err(e) => return Err(e.into()),
    };
    let child = desired.object_ref(&());
    match apply::apply(
        &ctx.shared.client,
        &ctx.shared.writes,
        desired,
        existing.as_ref(),
    )
    .await
    {
        Ok(Outcome::Unchanged) => Ok(true),
        Ok(outcome) => {
            let (change, verb) = if outcome == Outcome::Created {
                (
                    Change::Created {
                        kind: "HTTPRoute".into(),
                        name: name.clone(),
                    },
                    "created",
                )
            } else {
                (
                    Change::Updated {
                        kind: "HTTPRoute".into(),
                        name: name.clone(),
                    },
                    "updated",
                )
            };
            ctx.shared.child_event(
                nb,
                "RouteApplied",
                "ApplyRoute",
                format!("{verb} HTTPRoute {name}: the notebook is reachable through its Gateway, with the token"),
                child,
            );
            changes.push(change);
            Ok(true)
        }
        // A server-side apply creates what is absent: a 404 means the type itself is not served.
        Err(Error::Kube(kube::Error::Api(s))) if s.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Deletes the notebook's HTTPRoute left from a removed `spec.access.gateway`.
async fn sweep_route(
    ctx: &Ctx,
    owner: &Owner,
    api: &Api<HttpRoute>,
    changes: &mut Changes,
) -> Result<()> {
    let route = match api.get(&owner.name).await {
        Ok(r) => r,
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if is_controlled_by(&route.metadata, &owner.owner_ref.uid)
        && route.metadata.deletion_timestamp.is_none()
        && apply::delete(&ctx.shared.client, &ctx.shared.writes, &route).await?
    {
        changes.push(Change::deleted(&route, "spec.access.gateway removed"));
    }
    Ok(())
}
