//! Pods built from an older spec and the GPUs counted from the pods, with hand-made pods.

use super::*;
use crate::trainingjob::shape::{spec_hash, LABEL_GPUS, LABEL_SPEC_HASH};

/// Labels a fixture pod as built from `spec` with `gpus` GPUs.
fn shaped(mut p: Pod, spec: &TrainingJobSpec, gpus: i32) -> Pod {
    p.metadata.labels = Some(
        [
            (LABEL_SPEC_HASH.to_string(), spec_hash(spec)),
            (LABEL_GPUS.to_string(), gpus.to_string()),
        ]
        .into(),
    );
    p
}

fn with_gpus(count: i32) -> impl FnOnce(&mut TrainingJobSpec) {
    move |s| {
        s.workload.gpus = Some(GpuSpec {
            count,
            ..GpuSpec::default()
        })
    }
}

#[test]
fn gpus_are_summed_over_the_pods_that_have_not_finished() {
    // The spec now asks for 4 per worker, the pods were made with 2: the column shows the pods.
    let job = tj(with_gpus(4));
    let spec = job.spec.clone();
    let pods = vec![
        shaped(running(&w(0), true), &spec, 2),
        shaped(pending(&w(1)), &spec, 2),
        shaped(finished(&w(2), 0), &spec, 2),
    ];
    let (_, s) = step(&job, &was(JobPhase::Running), &obs(pods), &now());
    assert_eq!(s.gpus, Some(4));

    // Suspended: the pods are being deleted, nothing is held.
    let suspended = tj(|s| {
        with_gpus(4)(s);
        s.suspend = Some(true);
    });
    let pods = (0..3)
        .map(|r| shaped(running(&w(r), true), &spec, 4))
        .collect();
    let (d, s) = step(&suspended, &was(JobPhase::Running), &obs(pods), &now());
    assert_eq!(d.phase, JobPhase::Suspended);
    assert_eq!(s.gpus, Some(0));
    let (_, s) = step(&suspended, &was(JobPhase::Suspended), &obs(vec![]), &now());
    assert_eq!(s.gpus, Some(0));

    // A failed pod that is retried holds nothing; the others still do.
    let job = tj(with_gpus(1));
    let spec = job.spec.clone();
    let pods = vec![
        shaped(running(&w(0), true), &spec, 1),
        shaped(finished(&w(1), 137), &spec, 1),
        shaped(running(&w(2), true), &spec, 1),
    ];
    let (d, s) = step(&job, &was(JobPhase::Running), &obs(pods), &now());
    assert_eq!(d.phase, JobPhase::Restarting);
    assert_eq!(s.gpus, Some(2));
}

#[test]
fn pods_of_an_older_spec_are_replaced_and_never_mixed_with_new_ones() {
    // Suspended, edited from 3 to 4 workers and resumed before a reconcile saw it: the three pods
    // of the old shape are still there.
    let old = tj(|_| {});
    let job = tj(|s| s.workers = 4);
    let pods: Vec<Pod> = (0..3)
        .map(|r| shaped(running(&w(r), true), &old.spec, 0))
        .collect();
    let (d, s) = step(&job, &was(JobPhase::Running), &obs(pods), &now());
    assert_eq!(
        deleted(&d, DeleteReason::Stale),
        vec![w(0), w(1), w(2)],
        "every pod of the old shape goes"
    );
    assert!(d.create.is_empty(), "rank 3 waits: {:?}", d.create);
    assert_eq!(d.restarts, 0, "not a restart");
    assert_eq!(d.phase, JobPhase::Restarting);
    let c = s.workers.unwrap();
    assert_eq!((c.active, c.ready), (0, 0));
    assert_eq!(s.workers_ready.as_deref(), Some("0/4"));

    // The old pods are terminating: still nothing is created.
    let terminating: Vec<Pod> = (0..3)
        .map(|r| {
            let mut p = shaped(running(&w(r), true), &old.spec, 0);
            p.metadata.deletion_timestamp = Some(now());
            p
        })
        .collect();
    let (d, _) = step(&job, &was(JobPhase::Restarting), &obs(terminating), &now());
    assert!(d.create.is_empty() && d.delete.is_empty(), "{d:?}");

    // Deleted by us but still listed by a stale cache: the same.
    let mut o = obs((0..3)
        .map(|r| shaped(running(&w(r), true), &old.spec, 0))
        .collect());
    o.deleted = o.pods.iter().filter_map(|p| p.uid()).collect();
    let (d, _) = step(&job, &was(JobPhase::Restarting), &o, &now());
    assert!(d.create.is_empty() && d.delete.is_empty(), "{d:?}");

    // Gone: every rank is created from the new spec.
    let (d, _) = step(&job, &was(JobPhase::Restarting), &obs(vec![]), &now());
    assert_eq!(d.create, vec![0, 1, 2, 3]);

    // Pods of the current shape, and pods without the label (an older operator), stay.
    let mut current: Vec<Pod> = (0..3)
        .map(|r| shaped(running(&w(r), true), &job.spec, 0))
        .collect();
    current.push(running(&w(3), true));
    let (d, s) = step(&job, &was(JobPhase::Running), &obs(current), &now());
    assert!(d.delete.is_empty() && d.create.is_empty(), "{d:?}");
    assert_eq!(d.phase, JobPhase::Running);
    assert_eq!(cond(&s, READY).status, "True");
}

#[test]
fn a_suspended_job_deletes_pods_of_any_shape_as_a_suspension() {
    let old = tj(|_| {});
    let job = tj(|s| {
        s.workers = 2;
        s.suspend = Some(true);
    });
    let pods = (0..3)
        .map(|r| shaped(running(&w(r), true), &old.spec, 0))
        .collect();
    let (d, _) = step(&job, &was(JobPhase::Running), &obs(pods), &now());
    assert_eq!(deleted(&d, DeleteReason::Suspend), vec![w(0), w(1), w(2)]);
    assert!(deleted(&d, DeleteReason::Stale).is_empty());
}
