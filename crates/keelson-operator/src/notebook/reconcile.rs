//! The Notebook reconciler: the steps of the [`driver`] pipeline for a Notebook. Fetch reads the
//! token Secret (a token is made only when none exists); build is [`super::build`]; apply writes
//! the token Secret, the workspace PVC, the Service and the pod, in that order; status is
//! [`super::status`].

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use rand::distr::{Alphanumeric, SampleString};

use super::build::{build, pod_name, token_secret_name, workspace_name, Children};
use super::status::{invalid, pod_action, status, Observed, PodAction};
use crate::error::{BuildError, Error, Result, CHILD_REFUSED};
use crate::runtime::apply::{self, applied_hash, stamp, Outcome};
use crate::runtime::controller::{
    cached, child_cache, error_policy, owner_of, parent_controller, timed, ChildStore, Shared,
    Synced,
};
use crate::runtime::driver::{self, Applied, Change, Changes, Kind, Note};
use keelson_api::conditions::{self, READY};
use keelson_api::meta::Owner;
use keelson_api::notebook::{Notebook, NotebookStatus};

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

/// What a Notebook reconcile reads from the caches before it builds.
pub struct Fetched {
    owner: Owner,
    /// The token Secret, if it exists.
    token_secret: Option<Arc<Secret>>,
    /// A new token, when there is no token Secret yet (else empty).
    token: String,
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
            move |o, c| timed(metrics.clone(), "Notebook", driver::reconcile(o, c)),
            |nb, err, ctx| error_policy(nb.as_ref(), err, &ctx.shared),
            ctx,
        )
        .for_each(|r| shared.finished(r))
        .await;
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
        let token_secret = cached(
            &self.secrets,
            &owner.namespace,
            &token_secret_name(&owner.name),
        );
        let token = if needs_token(token_secret.as_deref()) {
            new_token()
        } else {
            String::new()
        };
        Fetched {
            owner: owner.clone(),
            token_secret,
            token,
        }
    }

    fn previous(&self, nb: &Notebook, _: &Fetched) -> Option<NotebookStatus> {
        nb.status.clone()
    }

    fn build(&self, nb: &Notebook, owner: &Owner, f: &Fetched) -> Result<Children, BuildError> {
        build(nb, owner, &f.token)
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
        let written =
            write_children(nb, self, owner, f.token_secret.is_none(), children, changes).await;
        let ns = owner.namespace.as_str();
        let observed = Observed {
            pod: cached(&self.pods, ns, &pod_name(&owner.name)).map(|p| (*p).clone()),
            workspace: cached(&self.pvcs, ns, &workspace_name(&owner.name)).map(|p| (*p).clone()),
            token_exists: f.token_secret.is_some()
                || changes.created::<Secret>(&token_secret_name(&owner.name)),
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
        match new.phase.filter(|p| Some(*p) != prev_phase) {
            Some(p) => {
                let p = format!("{p:?}");
                let note = Note::normal("PhaseChanged", format!("phase is now {p}")).action(&p);
                (vec![note], vec![Change::Phase(p)])
            }
            None => (Vec::new(), Vec::new()),
        }
    }
}

/// Writes the children of `nb`: the token Secret (when `make_token`), the workspace PVC, the
/// Service and the pod. What it changed goes to `changed`, also when a write fails.
async fn write_children(
    nb: &Notebook,
    ctx: &Ctx,
    owner: &Owner,
    make_token: bool,
    children: Children,
    changes: &mut Changes,
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

    if make_token {
        let made = Change::created(&secret);
        if apply::create_once(client, &shared.writes, secret).await? == Outcome::Created {
            changes.push(made);
        }
    }

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

    let existing_svc = cached(&ctx.services, ns, &owner.name);
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
