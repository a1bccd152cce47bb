use super::*;
use kube::runtime::events::EventType;

#[test]
fn each_deleted_pod_is_its_own_event_series() {
    let pod = |name: &str, uid: &str| {
        let mut p = Pod::default();
        p.metadata.name = Some(name.into());
        p.metadata.namespace = Some("team-a".into());
        p.metadata.uid = Some(uid.into());
        Arc::new(p)
    };
    let del = |p: Arc<Pod>, reason| Deletion {
        pod: p,
        reason,
        message: "worker failed with exit code 137".into(),
    };
    let (a, b) = (
        deletion_note(&del(pod("j-worker-0", "u0"), DeleteReason::Restart)),
        deletion_note(&del(pod("j-worker-1", "u1"), DeleteReason::Restart)),
    );
    assert_eq!(
        (a.reason.as_str(), a.type_),
        ("WorkerFailed", EventType::Warning)
    );
    let related = a.related.as_ref().expect("about the pod");
    assert_eq!(
        (
            related.kind.as_deref(),
            related.name.as_deref(),
            related.uid.as_deref()
        ),
        (Some("Pod"), Some("j-worker-0"), Some("u0"))
    );
    // Same type, reason and action: only the related pod keeps them apart.
    assert_eq!((&a.reason, &a.action), (&b.reason, &b.action));
    assert_ne!(a.related, b.related);
    // A second attempt of the same rank is a new pod: a new series too.
    let again = deletion_note(&del(pod("j-worker-0", "u2"), DeleteReason::Restart));
    assert_ne!(a.related, again.related);
    let cleanup = deletion_note(&del(pod("j-worker-0", "u0"), DeleteReason::Cleanup));
    assert_eq!(cleanup.reason, "PodDeleted");
    assert!(cleanup.related.is_some());
}

#[test]
fn a_job_that_starts_gets_no_phase_event_but_restarts_and_outcomes_do() {
    use JobPhase::*;
    assert!(ordinary_course(None, Some(Pending)));
    assert!(ordinary_course(Some(Pending), Some(Running)));
    assert!(ordinary_course(None, Some(Running)));
    assert!(ordinary_course(Some(Suspended), Some(Pending)));
    assert!(!ordinary_course(Some(Restarting), Some(Running)));
    assert!(!ordinary_course(Some(Running), Some(Restarting)));
    assert!(!ordinary_course(Some(Pending), Some(Suspended)));
    assert!(!ordinary_course(Some(Running), Some(Succeeded)));
    assert!(!ordinary_course(Some(Running), Some(Failed)));
}

#[test]
fn only_a_change_within_the_phase_may_wait() {
    let pending = TrainingJobStatus {
        phase: Some(JobPhase::Pending),
        observed_generation: Some(1),
        workers_ready: Some("0/4".into()),
        ..TrainingJobStatus::default()
    };
    let progress = TrainingJobStatus {
        workers_ready: Some("2/4".into()),
        ..pending.clone()
    };
    assert!(within_phase(&pending, &progress));
    let running = TrainingJobStatus {
        phase: Some(JobPhase::Running),
        ..progress.clone()
    };
    assert!(!within_phase(&pending, &running));
    let edited = TrainingJobStatus {
        observed_generation: Some(2),
        ..progress.clone()
    };
    assert!(
        !within_phase(&pending, &edited),
        "observedGeneration is written at once"
    );
    let restarted = TrainingJobStatus {
        restarts: 1,
        ..progress.clone()
    };
    assert!(!within_phase(&pending, &restarted));
    // A first status is never held.
    assert!(!within_phase(&TrainingJobStatus::default(), &pending));
}

#[test]
fn one_created_event_names_every_pod_within_the_note_limit() {
    let few: Vec<String> = (0..4).map(|r| format!("j-worker-{r} (rank {r})")).collect();
    assert_eq!(
        created_note(&few),
        "created pods j-worker-0 (rank 0), j-worker-1 (rank 1), j-worker-2 (rank 2), j-worker-3 (rank 3)"
    );
    assert_eq!(created_note(&few[..1]), "created pod j-worker-0 (rank 0)");
    let many: Vec<String> = (0..500)
        .map(|r| format!("a-long-job-name-worker-{r} (rank {r})"))
        .collect();
    let note = created_note(&many);
    assert!(note.len() <= 1024, "{}", note.len());
    assert!(note.ends_with(" more"), "{note}");
}
