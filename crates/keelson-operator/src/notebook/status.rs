//! Observed children -> Notebook status, and the pod decision. Pure: the time is passed in.

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::build::{pod_name, token_secret_name, url};
use crate::error::BuildError;
use crate::podstatus;
use crate::runtime::apply::applied_hash;
use keelson_api::conditions::{self, Cond, READY};
use keelson_api::meta::Owner;
use keelson_api::notebook::{Notebook, NotebookPhase, NotebookStatus, DEFAULT_PORT};

/// What the cluster holds of a Notebook's children.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    pub pod: Option<Pod>,
    pub workspace: Option<PersistentVolumeClaim>,
    pub token_exists: bool,
}

/// What to do with the notebook pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodAction {
    /// Leave it alone.
    Keep,
    /// No pod and one is wanted: create it.
    Create,
    /// Delete the pod (it is re-created on the next reconcile), with the reason.
    Delete(Replace),
}

/// Why a notebook pod is deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replace {
    /// `spec.suspend` is true.
    Suspended,
    /// The spec changed: the pod is replaced by one built from the new spec.
    SpecChanged,
    /// The pod ended (Failed or Succeeded): a notebook is meant to run.
    PodFinished,
}

impl Replace {
    /// The Event reason.
    pub fn reason(self) -> &'static str {
        match self {
            Replace::Suspended => "Suspended",
            Replace::SpecChanged => "SpecChanged",
            Replace::PodFinished => "PodFinished",
        }
    }

    /// Whether it is a failure a person should see (a Warning Event), rather than what was asked.
    pub fn is_failure(self) -> bool {
        self == Replace::PodFinished
    }
}

/// Decides the pod's fate. `desired_hash` is the stamped hash of the desired pod, `None` when suspended.
pub fn pod_action(desired_hash: Option<&str>, existing: Option<&Pod>) -> PodAction {
    match (desired_hash, existing) {
        (_, Some(p)) if podstatus::terminating(p) => PodAction::Keep,
        (None, Some(_)) => PodAction::Delete(Replace::Suspended),
        (None, None) => PodAction::Keep,
        (Some(_), None) => PodAction::Create,
        (Some(_), Some(p)) if matches!(podstatus::phase(p), "Failed" | "Succeeded") => {
            PodAction::Delete(Replace::PodFinished)
        }
        (Some(h), Some(p)) if applied_hash(p) != Some(h) => PodAction::Delete(Replace::SpecChanged),
        (Some(_), Some(_)) => PodAction::Keep,
    }
}

/// The status a Notebook should show, given its children.
pub fn status(nb: &Notebook, owner: &Owner, observed: &Observed, now: &Time) -> NotebookStatus {
    let prev = nb.status.clone().unwrap_or_default();
    let suspended = nb.spec.suspend.unwrap_or(false);
    let (phase, ready) = if suspended {
        (NotebookPhase::Suspended, Cond::new(READY, false, "Suspended", "spec.suspend is true: set it to false to start the notebook again"))
    } else if let Some((reason, message)) = observed
        .workspace
        .as_ref()
        .filter(|w| w.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Bound"))
        .map(|w| {
            (
                "WorkspacePending".to_string(),
                format!(
                    "PVC {} is not bound yet: check that its storage class can provision {} (or that a matching PersistentVolume exists)",
                    w.metadata.name.as_deref().unwrap_or_default(),
                    nb.spec.workspace.as_ref().map(|w| w.size.as_str()).unwrap_or_default()
                ),
            )
        })
        .filter(|_| observed.pod.as_ref().is_none_or(|p| podstatus::phase(p) == "Pending"))
    {
        (NotebookPhase::Pending, Cond::new(READY, false, reason, message))
    } else {
        match observed.pod.as_ref() {
            None => (NotebookPhase::Pending, Cond::new(READY, false, "PodCreating", "the notebook pod is being created")),
            Some(p) if podstatus::is_ready(p) && !podstatus::terminating(p) => {
                (NotebookPhase::Running, Cond::new(READY, true, "PodReady", "the notebook is up: open the URL with the token from the token Secret"))
            }
            Some(p) => match podstatus::problem(p) {
                Some((reason, message)) => (NotebookPhase::Pending, Cond::new(READY, false, reason, message)),
                None if podstatus::phase(p) == "Running" => {
                    (NotebookPhase::Running, Cond::new(READY, false, "PodNotReady", "the notebook server is starting"))
                }
                None => (NotebookPhase::Pending, Cond::new(READY, false, "PodPending", "the notebook pod is starting")),
            },
        }
    };
    let generation = nb.metadata.generation;
    NotebookStatus {
        phase: Some(phase),
        url: Some(url(owner, nb.spec.port.unwrap_or(DEFAULT_PORT))),
        token_secret: observed
            .token_exists
            .then(|| token_secret_name(&owner.name)),
        pod_name: observed.pod.as_ref().map(|_| pod_name(&owner.name)),
        observed_generation: generation,
        conditions: conditions::merge(&prev.conditions, &[ready], generation, now),
    }
}

/// The status of a Notebook whose spec cannot be built.
pub fn invalid(nb: &Notebook, err: &BuildError, now: &Time) -> NotebookStatus {
    let prev = nb.status.clone().unwrap_or_default();
    let generation = nb.metadata.generation;
    NotebookStatus {
        phase: Some(NotebookPhase::Failed),
        observed_generation: generation,
        conditions: conditions::merge(
            &prev.conditions,
            &[Cond::new(READY, false, err.reason, err.to_string())],
            generation,
            now,
        ),
        ..prev
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::podstatus::fixtures::*;
    use k8s_openapi::api::core::v1::PersistentVolumeClaimStatus;
    use k8s_openapi::jiff::Timestamp;
    use keelson_api::notebook::{NotebookSpec, WorkspaceSpec};

    fn now() -> Time {
        Time(Timestamp::from_second(1_700_000_000).unwrap())
    }

    fn nb(suspend: bool, workspace: bool) -> (Notebook, Owner) {
        let mut nb = Notebook::new(
            "alice",
            NotebookSpec {
                suspend: Some(suspend),
                workspace: workspace.then(|| WorkspaceSpec {
                    size: "1Gi".into(),
                    ..WorkspaceSpec::default()
                }),
                ..NotebookSpec::default()
            },
        );
        nb.metadata.namespace = Some("team-a".into());
        nb.metadata.uid = Some("u".into());
        nb.metadata.generation = Some(3);
        let o = Owner::of(&nb).unwrap();
        (nb, o)
    }

    fn pvc(bound: bool) -> PersistentVolumeClaim {
        let mut p = PersistentVolumeClaim::default();
        p.metadata.name = Some("alice-workspace".into());
        p.status = Some(PersistentVolumeClaimStatus {
            phase: Some(if bound { "Bound" } else { "Pending" }.into()),
            ..PersistentVolumeClaimStatus::default()
        });
        p
    }

    #[test]
    fn status_table() {
        struct Case {
            name: &'static str,
            suspend: bool,
            pod: Option<Pod>,
            workspace: Option<PersistentVolumeClaim>,
            phase: NotebookPhase,
            ready: bool,
            reason: &'static str,
        }
        let cases = vec![
            Case {
                name: "no pod yet",
                suspend: false,
                pod: None,
                workspace: None,
                phase: NotebookPhase::Pending,
                ready: false,
                reason: "PodCreating",
            },
            Case {
                name: "pending",
                suspend: false,
                pod: Some(pending("alice-0")),
                workspace: None,
                phase: NotebookPhase::Pending,
                ready: false,
                reason: "PodPending",
            },
            Case {
                name: "image pull",
                suspend: false,
                pod: Some(waiting("alice-0", "ImagePullBackOff")),
                workspace: None,
                phase: NotebookPhase::Pending,
                ready: false,
                reason: "ImagePullBackOff",
            },
            Case {
                name: "unschedulable",
                suspend: false,
                pod: Some(unschedulable("alice-0")),
                workspace: None,
                phase: NotebookPhase::Pending,
                ready: false,
                reason: "Unschedulable",
            },
            Case {
                name: "workspace unbound",
                suspend: false,
                pod: Some(pending("alice-0")),
                workspace: Some(pvc(false)),
                phase: NotebookPhase::Pending,
                ready: false,
                reason: "WorkspacePending",
            },
            Case {
                name: "running not ready",
                suspend: false,
                pod: Some(running("alice-0", false)),
                workspace: Some(pvc(true)),
                phase: NotebookPhase::Running,
                ready: false,
                reason: "PodNotReady",
            },
            Case {
                name: "ready",
                suspend: false,
                pod: Some(running("alice-0", true)),
                workspace: Some(pvc(true)),
                phase: NotebookPhase::Running,
                ready: true,
                reason: "PodReady",
            },
            Case {
                name: "evicted",
                suspend: false,
                pod: Some(evicted("alice-0")),
                workspace: None,
                phase: NotebookPhase::Pending,
                ready: false,
                reason: "Evicted",
            },
            Case {
                name: "suspended",
                suspend: true,
                pod: None,
                workspace: Some(pvc(true)),
                phase: NotebookPhase::Suspended,
                ready: false,
                reason: "Suspended",
            },
        ];
        for c in cases {
            let (n, o) = nb(c.suspend, c.workspace.is_some());
            let obs = Observed {
                pod: c.pod,
                workspace: c.workspace,
                token_exists: true,
            };
            let s = status(&n, &o, &obs, &now());
            assert_eq!(s.phase, Some(c.phase), "{}", c.name);
            let r = conditions::find(&s.conditions, READY).unwrap();
            assert_eq!(r.status == "True", c.ready, "{}", c.name);
            assert_eq!(r.reason, c.reason, "{}", c.name);
            assert_eq!(s.observed_generation, Some(3));
            assert_eq!(
                s.url.as_deref(),
                Some("http://alice.team-a.svc.cluster.local:8888/")
            );
            assert_eq!(s.token_secret.as_deref(), Some("alice-token"));
        }
    }

    #[test]
    fn status_is_stable_when_nothing_changes() {
        let (mut n, o) = nb(false, false);
        let obs = Observed {
            pod: Some(running("alice-0", true)),
            workspace: None,
            token_exists: true,
        };
        let first = status(&n, &o, &obs, &now());
        n.status = Some(first.clone());
        let later = Time(Timestamp::from_second(1_800_000_000).unwrap());
        assert_eq!(status(&n, &o, &obs, &later), first);
    }

    #[test]
    fn pod_decisions() {
        let mut p = running("alice-0", true);
        p.metadata.annotations =
            Some([("keelson.dev/applied-hash".to_string(), "h1".to_string())].into());
        assert_eq!(pod_action(Some("h1"), None), PodAction::Create);
        assert_eq!(pod_action(Some("h1"), Some(&p)), PodAction::Keep);
        assert_eq!(
            pod_action(Some("h2"), Some(&p)),
            PodAction::Delete(Replace::SpecChanged)
        );
        assert_eq!(
            pod_action(None, Some(&p)),
            PodAction::Delete(Replace::Suspended)
        );
        assert_eq!(pod_action(None, None), PodAction::Keep);
        assert_eq!(
            pod_action(Some("h1"), Some(&evicted("alice-0"))),
            PodAction::Delete(Replace::PodFinished)
        );
        assert_eq!(
            pod_action(Some("h1"), Some(&finished("alice-0", 1))),
            PodAction::Delete(Replace::PodFinished)
        );
        let mut gone = p.clone();
        gone.metadata.deletion_timestamp = Some(now());
        assert_eq!(pod_action(Some("h2"), Some(&gone)), PodAction::Keep);
    }
}
