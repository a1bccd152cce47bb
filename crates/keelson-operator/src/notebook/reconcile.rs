//! The Notebook reconciler: fetch -> build -> apply -> observe -> status.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use rand::distr::{Alphanumeric, SampleString};

use super::build::{build, pod_name, token_secret_name, workspace_name, Children};
use super::status::{invalid, pod_action, status, Observed, PodAction};
use crate::error::{BuildError, Error, Result};
use crate::runtime::apply::{self, applied_hash, stamp, Outcome};
use crate::runtime::controller::{
    cached, child_cache, error_policy, key, owner_of, parent_controller, timed, ChildStore, Shared,
    Synced, RESYNC,
};
use keelson_api::meta::Owner;
use keelson_api::notebook::Notebook;

/// Length of a generated access token.
const TOKEN_LEN: usize = 48;

/// The Notebook controller's context: shared state plus its child caches.
pub struct Ctx {
    pub shared: Arc<Shared>,
    pub pods: ChildStore<Pod>,
    pub services: ChildStore<Service>,
    pub secrets: ChildStore<Secret>,
    pub pvcs: ChildStore<PersistentVolumeClaim>,
    /// Whether the child caches have been listed.
    pub synced: Synced,
}

/// Whether a token must be made: only when no token Secret exists. An existing token is never replaced.
pub fn needs_token(existing: Option<&Secret>) -> bool {
    existing.is_none()
}

fn new_token() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), TOKEN_LEN)
}

/// Runs the Notebook controller until `shutdown` resolves.
pub async fn run(
    shared: Arc<Shared>,
    concurrency: u16,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = shared.client.clone();
    let (pods, pod_events) = child_cache::<Pod>(&client, "Notebook");
    let (services, svc_events) = child_cache::<Service>(&client, "Notebook");
    let (secrets, secret_events) = child_cache::<Secret>(&client, "Notebook");
    let (pvcs, pvc_events) = child_cache::<PersistentVolumeClaim>(&client, "Notebook");
    let synced = {
        let (p, s, t, v) = (
            pods.clone(),
            services.clone(),
            secrets.clone(),
            pvcs.clone(),
        );
        Synced::spawn(async move {
            tokio::try_join!(
                p.wait_until_ready(),
                s.wait_until_ready(),
                t.wait_until_ready(),
                v.wait_until_ready()
            )
            .map(|_| ())
        })
    };
    shared.track(synced.clone());
    let metrics = shared.metrics.clone();
    let ctx = Arc::new(Ctx {
        shared: shared.clone(),
        pods,
        services,
        secrets,
        pvcs,
        synced,
    });
    parent_controller(Api::<Notebook>::all(client), concurrency)
        .watches_stream(pod_events, |c| owner_of::<Notebook, _>(&c))
        .watches_stream(svc_events, |c| owner_of::<Notebook, _>(&c))
        .watches_stream(secret_events, |c| owner_of::<Notebook, _>(&c))
        .watches_stream(pvc_events, |c| owner_of::<Notebook, _>(&c))
        .graceful_shutdown_on(shutdown)
        .run(
            move |o, c| timed(metrics.clone(), "Notebook", reconcile(o, c)),
            |nb, err, ctx| error_policy(nb.as_ref(), err, &ctx.shared),
            ctx,
        )
        .for_each(|r| shared.finished(r))
        .await;
}

fn now() -> Time {
    Time(Timestamp::now())
}

/// One reconcile of one Notebook.
#[tracing::instrument(skip_all, fields(kind = "Notebook", namespace = nb.namespace().unwrap_or_default(), name = nb.name_any()))]
pub async fn reconcile(nb: Arc<Notebook>, ctx: Arc<Ctx>) -> Result<Action> {
    if nb.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let owner = Owner::of(nb.as_ref()).ok_or_else(|| Error::MissingMeta(nb.name_any()))?;
    // Decisions are taken from the child caches: never from caches that have not listed yet.
    ctx.synced.wait().await?;
    let shared = &ctx.shared;
    let client = &shared.client;
    let ns = owner.namespace.as_str();

    let token_secret = cached(&ctx.secrets, ns, &token_secret_name(&owner.name));
    let token = if needs_token(token_secret.as_deref()) {
        new_token()
    } else {
        String::new()
    };
    let children = match build(&nb, &owner, &token) {
        Ok(c) => c,
        Err(e) => {
            set_invalid(&nb, shared, &e).await?;
            shared.succeeded(&key(nb.as_ref()));
            return Ok(Action::await_change());
        }
    };
    let mut changed = Vec::new();
    let written = write_children(
        &nb,
        &ctx,
        &owner,
        token_secret.is_none(),
        children,
        &mut changed,
    )
    .await;
    if let Err(e) = written {
        // A child the API server refuses: the status says so (reason ChildRefused), and the
        // reconcile is retried with backoff.
        if let Some(refused) = e.refusal() {
            set_invalid(&nb, shared, &refused).await?;
        }
        if !changed.is_empty() {
            tracing::info!(changes = ?changed, "reconciled in part");
        }
        return Err(e);
    }

    let observed = Observed {
        pod: cached(&ctx.pods, ns, &pod_name(&owner.name)).map(|p| (*p).clone()),
        workspace: cached(&ctx.pvcs, ns, &workspace_name(&owner.name)).map(|p| (*p).clone()),
        token_exists: token_secret.is_some() || changed.iter().any(|c| c.contains("token")),
    };
    let st = status(&nb, &owner, &observed, &now());
    let prev_phase = nb.status.as_ref().and_then(|s| s.phase);
    if apply::patch_status(client, &shared.writes, nb.as_ref(), nb.status.as_ref(), &st).await? {
        if prev_phase != st.phase {
            if let Some(p) = st.phase.map(|p| format!("{p:?}")) {
                shared
                    .event_as(
                        nb.as_ref(),
                        false,
                        "PhaseChanged",
                        &p,
                        format!("phase is now {p}"),
                    )
                    .await;
            }
        }
        changed.push("status".to_string());
    }
    if !changed.is_empty() {
        tracing::info!(changes = ?changed, "reconciled");
    }
    shared.succeeded(&key(nb.as_ref()));
    Ok(Action::requeue(RESYNC))
}

/// Writes the status of a Notebook that cannot run as specified (phase Failed, Ready False with the
/// reason), with a Warning Event when it changes.
async fn set_invalid(nb: &Notebook, shared: &Shared, e: &BuildError) -> Result<()> {
    let st = invalid(nb, e, &now());
    if apply::patch_status(&shared.client, &shared.writes, nb, nb.status.as_ref(), &st).await? {
        shared.event(nb, true, e.reason, e.to_string()).await;
    }
    Ok(())
}

/// Writes the children of `nb`: the token Secret (when `make_token`), the workspace PVC, the
/// Service and the pod. What it changed goes to `changed`, also when a write fails.
async fn write_children(
    nb: &Notebook,
    ctx: &Ctx,
    owner: &Owner,
    make_token: bool,
    children: Children,
    changed: &mut Vec<String>,
) -> Result<()> {
    let Children {
        service,
        token: secret,
        workspace,
        pod,
    } = children;
    let shared = &ctx.shared;
    let client = &shared.client;
    let ns = owner.namespace.as_str();

    if make_token && apply::create_once(client, &shared.writes, secret).await? == Outcome::Created {
        changed.push("created token Secret".to_string());
    }

    let existing_pvc = cached(&ctx.pvcs, ns, &workspace_name(&owner.name));
    if let Some(pvc) = workspace {
        match existing_pvc.as_deref() {
            None => {
                if apply::create_once(client, &shared.writes, pvc).await? == Outcome::Created {
                    changed.push("created workspace PVC".to_string());
                }
            }
            Some(e) if e.metadata.owner_references != pvc.metadata.owner_references => {
                // deletePolicy changed: only the owner reference moves; the data is never touched.
                let body = serde_json::json!({"metadata": {"ownerReferences": pvc.metadata.owner_references}});
                let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
                shared.writes.apply.inc();
                api.patch(&e.name_any(), &PatchParams::default(), &Patch::Merge(&body))
                    .await?;
                changed.push("updated workspace deletePolicy".to_string());
            }
            Some(_) => {}
        }
    }

    let existing_svc = cached(&ctx.services, ns, &owner.name);
    if apply::apply(client, &shared.writes, service, existing_svc.as_deref()).await?
        != Outcome::Unchanged
    {
        changed.push("applied Service".to_string());
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
                if apply::create_once(client, &shared.writes, p).await? == Outcome::Created {
                    shared
                        .event(
                            nb,
                            false,
                            "PodCreated",
                            format!("created pod {}", pod_name(&owner.name)),
                        )
                        .await;
                    changed.push("created pod".to_string());
                }
            }
        }
        PodAction::Delete(reason) => {
            if let Some(p) = existing_pod.as_deref() {
                if apply::delete(client, &shared.writes, p).await? {
                    shared
                        .event(
                            nb,
                            reason != "Suspended" && reason != "SpecChanged",
                            reason,
                            format!("deleted pod {}", p.name_any()),
                        )
                        .await;
                    changed.push(format!("deleted pod ({reason})"));
                }
            }
        }
    }

    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_made_once() {
        assert!(needs_token(None));
        assert!(!needs_token(Some(&Secret::default())));
        let a = new_token();
        assert_eq!(a.len(), TOKEN_LEN);
        assert_ne!(a, new_token());
    }
}
