//! Observed children -> Notebook status, and the pod decision. Pure: the time is passed in.

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::access::external_url;
use super::build::{pod_name, token_secret_name, url};
use super::idle::Verdict;
use crate::error::BuildError;
use crate::podstatus;
use crate::runtime::apply::applied_hash;
use keelson_api::conditions::{self, Cond, READY};
use keelson_api::meta::Owner;
use keelson_api::notebook::{
    Notebook, NotebookPhase, NotebookStatus, ANNOTATION_CULLED_AT, ANNOTATION_IDLE_LAST_ACTIVITY,
    DEFAULT_PORT,
};

/// Condition of a Notebook with `spec.idle`: whether its activity is read (True) or cannot be
/// (False, and then it is never culled).
pub const IDLE_CULLING: &str = "IdleCulling";
/// Condition of a Notebook with `spec.access.gateway`: whether its HTTPRoute exists.
pub const EXPOSED: &str = "Exposed";

/// What the cluster holds of a Notebook's children.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    pub pod: Option<Pod>,
    pub workspace: Option<PersistentVolumeClaim>,
    pub token_exists: bool,
    /// What the idle culler concluded this time (`None`: it did not read, e.g. no ready pod).
    pub idle: Option<Verdict>,
    /// The culler suspended the notebook in this reconcile (the spec in hand is from before).
    pub culled: bool,
    /// `spec.access.gateway` is set but the API server does not serve HTTPRoutes.
    pub gateway_api_missing: bool,
}

/// Whether the notebook is suspended by the idle culler (rather than by a person).
pub fn culled_at(nb: &Notebook) -> Option<&str> {
    nb.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_CULLED_AT))
        .map(String::as_str)
}

/// What the culler recorded on the notebook when it suspended it: the time of the suspension and
/// the last activity the decision was taken on (`None` when the annotations are absent or garbled).
pub fn culled_record(nb: &Notebook) -> Option<(Timestamp, Timestamp)> {
    let annotations = nb.metadata.annotations.as_ref()?;
    let at = annotations.get(ANNOTATION_CULLED_AT)?.parse().ok()?;
    let last = annotations
        .get(ANNOTATION_IDLE_LAST_ACTIVITY)?
        .parse()
        .ok()?;
    Some((at, last))
}

fn fmt_duration(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, 0, _) => format!("{h}h"),
        (h, m, _) => format!("{h}h{m}m"),
    }
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
    let suspended = nb.spec.suspend.unwrap_or(false) || observed.culled;
    let timeout = nb
        .spec
        .idle
        .as_ref()
        .map(|i| i.timeout.as_str())
        .unwrap_or_default();
    let by_culler = observed.culled || (suspended && culled_at(nb).is_some());
    let (phase, ready) = if by_culler {
        let last = match (&observed.idle, culled_record(nb).as_ref(), &prev.last_activity) {
            (Some(Verdict::Idle { last, .. }), _, _) | (_, Some((_, last)), _) => last.to_string(),
            (_, _, Some(t)) => t.0.to_string(),
            _ => "unknown".into(),
        };
        (NotebookPhase::Suspended, Cond::new(READY, false, "IdleCulled", format!("suspended by the idle culler: no activity since {last}, longer than spec.idle.timeout {timeout}; set spec.suspend to false to start the notebook again (the workspace and the token are kept)")))
    } else if suspended {
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
    let mut conds = vec![ready];
    if nb.spec.idle.is_some() {
        let c = match &observed.idle {
            Some(Verdict::Unknown(why)) => Some(Cond::new(IDLE_CULLING, false, "ActivityUnknown", format!("{why}: the notebook is not culled while its activity cannot be read"))),
            Some(Verdict::Active { .. }) => Some(Cond::new(IDLE_CULLING, true, "Watching", format!("activity is read from /api/status; the notebook is suspended after {timeout} without activity"))),
            Some(Verdict::Idle { idle_for, .. }) => Some(Cond::new(IDLE_CULLING, true, "Culled", format!("suspended after {} without activity (spec.idle.timeout {timeout})", fmt_duration(*idle_for)))),
            // Suspended by the culler, not read this time: what it recorded on the notebook, in
            // the same write as the suspension.
            None if by_culler => culled_record(nb).map(|(at, last)| {
                let idle_for = at.duration_since(last).try_into().unwrap_or_default();
                Cond::new(IDLE_CULLING, true, "Culled", format!("suspended after {} without activity (spec.idle.timeout {timeout})", fmt_duration(idle_for)))
            }),
            None => None,
        };
        // Without a read this time (no ready pod, or suspended): the last verdict stands.
        let kept = conditions::find(&prev.conditions, IDLE_CULLING).map(|p| {
            Cond::new(
                IDLE_CULLING,
                p.status == "True",
                p.reason.clone(),
                p.message.clone(),
            )
        });
        conds.extend(c.or(kept).or_else(|| {
            Some(Cond::new(
                IDLE_CULLING,
                false,
                "NotRead",
                "activity is read once the notebook server is ready",
            ))
        }));
    }
    let exposed = nb
        .spec
        .access
        .as_ref()
        .and_then(|a| a.gateway.as_ref())
        .is_some();
    if exposed {
        conds.push(if observed.gateway_api_missing {
            Cond::new(EXPOSED, false, "GatewayAPIMissing", "spec.access.gateway needs the Gateway API: install its CRDs (gateway.networking.k8s.io) and a Gateway controller, or remove spec.access.gateway")
        } else {
            Cond::new(EXPOSED, true, "RouteApplied", "HTTPRoute applied: the notebook is reachable through its Gateway, with the token")
        });
    }
    let last_activity = match (
        &observed.idle,
        culled_record(nb).filter(|_| by_culler).as_ref(),
    ) {
        (Some(Verdict::Active { last, .. } | Verdict::Idle { last, .. }), _)
        | (_, Some((_, last))) => Some(Time(*last)),
        _ => prev.last_activity.clone(),
    }
    .filter(|_| nb.spec.idle.is_some());
    let in_cluster = url(owner, nb.spec.port.unwrap_or(DEFAULT_PORT));
    let url = external_url(nb)
        .filter(|_| !observed.gateway_api_missing)
        .unwrap_or(in_cluster);
    let generation = nb.metadata.generation;
    NotebookStatus {
        phase: Some(phase),
        url: Some(url),
        last_activity,
        token_secret: observed
            .token_exists
            .then(|| token_secret_name(&owner.name)),
        pod_name: observed.pod.as_ref().map(|_| pod_name(&owner.name)),
        observed_generation: generation,
        conditions: conditions::merge(&prev.conditions, &conds, generation, now),
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
                ..Observed::default()
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
            ..Observed::default()
        };
        let first = status(&n, &o, &obs, &now());
        n.status = Some(first.clone());
        let later = Time(Timestamp::from_second(1_800_000_000).unwrap());
        assert_eq!(status(&n, &o, &obs, &later), first);
    }

    #[test]
    fn idle_culling_status() {
        use keelson_api::notebook::IdleSpec;
        let (mut n, o) = nb(false, false);
        n.spec.idle = Some(IdleSpec {
            timeout: "2h".into(),
        });
        let last: Timestamp = "2026-01-01T10:00:00Z".parse().unwrap();
        let ready_pod = || Some(running("alice-0", true));
        // Active: lastActivity shown, the condition says it is watched.
        let obs = Observed {
            pod: ready_pod(),
            token_exists: true,
            idle: Some(Verdict::Active {
                last,
                recheck: std::time::Duration::from_secs(60),
            }),
            ..Observed::default()
        };
        let s = status(&n, &o, &obs, &now());
        assert_eq!(s.last_activity, Some(Time(last)));
        let c = conditions::find(&s.conditions, IDLE_CULLING).unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Watching"));
        assert_eq!(s.phase, Some(NotebookPhase::Running));

        // Unreadable: never culled, the condition says why; the last known activity stays.
        n.status = Some(s);
        let obs = Observed {
            idle: Some(Verdict::Unknown(
                "GET http://10.0.0.1:8888/api/status: HTTP 403".into(),
            )),
            ..obs
        };
        let s = status(&n, &o, &obs, &now());
        let c = conditions::find(&s.conditions, IDLE_CULLING).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "ActivityUnknown")
        );
        assert!(
            c.message.contains("HTTP 403") && c.message.contains("not culled"),
            "{}",
            c.message
        );
        assert_eq!(s.last_activity, Some(Time(last)));
        assert_eq!(s.phase, Some(NotebookPhase::Running));

        // Culled in this reconcile: Suspended with the reason, before the spec in hand says so.
        let obs = Observed {
            idle: Some(Verdict::Idle {
                last,
                idle_for: std::time::Duration::from_secs(7260),
            }),
            culled: true,
            ..obs
        };
        let s = status(&n, &o, &obs, &now());
        assert_eq!(s.phase, Some(NotebookPhase::Suspended));
        let r = conditions::find(&s.conditions, READY).unwrap();
        assert_eq!(r.reason, "IdleCulled");
        assert!(r.message.contains("2026-01-01T10:00:00Z"), "{}", r.message);
        let c = conditions::find(&s.conditions, IDLE_CULLING).unwrap();
        assert_eq!(c.reason, "Culled");
        assert!(c.message.contains("2h1m"), "{}", c.message);

        // Next reconcile: suspended by the culler (annotation), no read; the reason stays.
        n.status = Some(s.clone());
        n.spec.suspend = Some(true);
        n.metadata.annotations = Some(
            [(
                ANNOTATION_CULLED_AT.to_string(),
                "2026-01-01T12:01:00Z".to_string(),
            )]
            .into(),
        );
        let obs = Observed {
            token_exists: true,
            ..Observed::default()
        };
        let s2 = status(&n, &o, &obs, &now());
        assert_eq!(s2.conditions, s.conditions);
        assert_eq!(s2.last_activity, Some(Time(last)));
        // The same reconcile from a status that missed the culler's write (a status written from
        // an older copy raced with the suspension): rebuilt from the annotations the culler set in
        // the same write as spec.suspend.
        let mut raced = n.clone();
        raced.status = Some(NotebookStatus {
            last_activity: None,
            conditions: Vec::new(),
            ..s.clone()
        });
        raced.metadata.annotations = Some(
            [
                (
                    ANNOTATION_CULLED_AT.to_string(),
                    "2026-01-01T12:01:00Z".to_string(),
                ),
                (ANNOTATION_IDLE_LAST_ACTIVITY.to_string(), last.to_string()),
            ]
            .into(),
        );
        let s4 = status(&raced, &o, &obs, &now());
        assert_eq!(s4.last_activity, Some(Time(last)));
        assert_eq!(s4.phase, Some(NotebookPhase::Suspended));
        let r = conditions::find(&s4.conditions, READY).unwrap();
        assert_eq!(r.reason, "IdleCulled");
        assert!(r.message.contains("2026-01-01T10:00:00Z"), "{}", r.message);
        let c = conditions::find(&s4.conditions, IDLE_CULLING).unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Culled"));
        assert!(c.message.contains("2h1m"), "{}", c.message);
        // Suspended by a person: plain Suspended.
        n.metadata.annotations = None;
        let s3 = status(&n, &o, &obs, &now());
        assert_eq!(
            conditions::find(&s3.conditions, READY).unwrap().reason,
            "Suspended"
        );
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
