//! Reading pods as a kubelet reports them: readiness, failures, exit codes and the reasons a person
//! can act on. Shared by the status functions of every kind.

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};

/// Container waiting reasons that need a person (a wrong image, a crashing program, a bad config).
const STUCK_REASONS: &[&str] = &[
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// Pod phase as a string ("Pending" when unknown).
pub fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

/// Whether the pod is being deleted.
pub fn terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

/// Whether the pod has the condition Ready=True.
pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn container_statuses(pod: &Pod) -> impl Iterator<Item = &ContainerStatus> {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
}

/// The exit code of a finished pod: the first non-zero code of a terminated container, else 0 when
/// some container terminated, else `None` (evicted or never started).
pub fn exit_code(pod: &Pod) -> Option<i32> {
    let codes: Vec<i32> = container_statuses(pod)
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref().map(|t| t.exit_code))
        .collect();
    codes
        .iter()
        .copied()
        .find(|c| *c != 0)
        .or(codes.first().copied())
}

/// Why a pod is not making progress, as (reason, message), or `None` when it is fine or just starting.
pub fn problem(pod: &Pod) -> Option<(String, String)> {
    let name = pod.metadata.name.as_deref().unwrap_or("pod");
    for c in container_statuses(pod) {
        if let Some(w) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) {
            if let Some(r) = w.reason.as_deref().filter(|r| STUCK_REASONS.contains(r)) {
                let detail = w.message.clone().unwrap_or_default();
                let hint = match r {
                    "ImagePullBackOff" | "ErrImagePull" | "InvalidImageName" => {
                        "check the image name and the pull secret"
                    }
                    "CrashLoopBackOff" => "check the container logs",
                    _ => "check the container configuration",
                };
                return Some((
                    r.to_string(),
                    format!("{name}: container {} is {r}: {hint}. {detail}", c.name)
                        .trim()
                        .to_string(),
                ));
            }
        }
    }
    let status = pod.status.as_ref()?;
    if let Some(c) = status.conditions.iter().flatten().find(|c| {
        c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable")
    }) {
        return Some((
            "Unschedulable".into(),
            format!(
                "{name} cannot be scheduled: {}. Check the GPU count and product, the node selector and the volumes' claims",
                c.message.as_deref().unwrap_or("no node fits")
            ),
        ));
    }
    if status.phase.as_deref() == Some("Failed") {
        let reason = status.reason.clone().unwrap_or_else(|| "PodFailed".into());
        let msg = status.message.clone().unwrap_or_default();
        return Some((
            reason,
            format!("{name} failed (exit code {:?}). {msg}", exit_code(pod))
                .trim()
                .to_string(),
        ));
    }
    None
}

#[cfg(test)]
pub mod fixtures {
    //! Hand-made pods in every phase a kubelet reports.
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus, Pod,
        PodCondition, PodStatus,
    };

    pub fn pod(name: &str) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = Some(name.into());
        p.metadata.uid = Some(format!("uid-{name}"));
        p
    }

    pub fn pending(name: &str) -> Pod {
        let mut p = pod(name);
        p.status = Some(PodStatus {
            phase: Some("Pending".into()),
            ..PodStatus::default()
        });
        p
    }

    pub fn unschedulable(name: &str) -> Pod {
        let mut p = pending(name);
        p.status.as_mut().unwrap().conditions = Some(vec![PodCondition {
            type_: "PodScheduled".into(),
            status: "False".into(),
            reason: Some("Unschedulable".into()),
            message: Some("0/4 nodes are available: 4 Insufficient nvidia.com/gpu".into()),
            ..PodCondition::default()
        }]);
        p
    }

    pub fn waiting(name: &str, reason: &str) -> Pod {
        let mut p = pending(name);
        p.status.as_mut().unwrap().container_statuses = Some(vec![ContainerStatus {
            name: "main".into(),
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.into()),
                    message: Some("Back-off pulling image".into()),
                }),
                ..ContainerState::default()
            }),
            ..ContainerStatus::default()
        }]);
        p
    }

    pub fn running(name: &str, ready: bool) -> Pod {
        let mut p = pod(name);
        p.status = Some(PodStatus {
            phase: Some("Running".into()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..PodCondition::default()
            }]),
            ..PodStatus::default()
        });
        p
    }

    pub fn finished(name: &str, code: i32) -> Pod {
        let mut p = pod(name);
        p.status = Some(PodStatus {
            phase: Some(if code == 0 { "Succeeded" } else { "Failed" }.into()),
            container_statuses: Some(vec![ContainerStatus {
                name: "main".into(),
                state: Some(ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: code,
                        reason: Some(if code == 0 { "Completed" } else { "Error" }.into()),
                        ..ContainerStateTerminated::default()
                    }),
                    ..ContainerState::default()
                }),
                ..ContainerStatus::default()
            }]),
            ..PodStatus::default()
        });
        p
    }

    pub fn evicted(name: &str) -> Pod {
        let mut p = pod(name);
        p.status = Some(PodStatus {
            phase: Some("Failed".into()),
            reason: Some("Evicted".into()),
            message: Some("The node was low on resource: memory.".into()),
            ..PodStatus::default()
        });
        p
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    #[test]
    fn reads_pods_in_every_phase() {
        assert_eq!(problem(&pending("p")), None);
        assert_eq!(problem(&running("p", true)), None);
        assert!(is_ready(&running("p", true)));
        assert!(!is_ready(&running("p", false)));
        assert_eq!(
            problem(&waiting("p", "ImagePullBackOff")).unwrap().0,
            "ImagePullBackOff"
        );
        assert!(problem(&waiting("p", "ImagePullBackOff"))
            .unwrap()
            .1
            .contains("check the image"));
        assert_eq!(problem(&waiting("p", "ContainerCreating")), None);
        assert_eq!(problem(&unschedulable("p")).unwrap().0, "Unschedulable");
        assert_eq!(problem(&evicted("p")).unwrap().0, "Evicted");
        assert_eq!(exit_code(&evicted("p")), None);
        assert_eq!(exit_code(&finished("p", 137)), Some(137));
        assert_eq!(exit_code(&finished("p", 0)), Some(0));
        assert_eq!(problem(&finished("p", 1)).unwrap().0, "PodFailed");
    }
}
