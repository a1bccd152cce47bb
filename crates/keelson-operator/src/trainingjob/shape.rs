//! The shape of a TrainingJob's pods: which spec a pod was built from, and how many GPUs it asks for.
//!
//! Every worker pod carries two labels:
//!
//! - `keelson.dev/spec-hash`: a hash of the fields of the spec that shape the pods (everything but
//!   `runPolicy`, `successPolicy` and `suspend`, the fields a running job takes). A pod whose hash
//!   differs from the current spec was built from an older spec: a suspend, edit and resume that
//!   went faster than a reconcile saw it leaves such pods behind. They are deleted, and no pod is
//!   created while a pod of another shape exists, so a group never mixes two `WORLD_SIZE`s.
//! - `keelson.dev/gpus`: the GPUs the pod asks for (`gpus.count`). `status.gpus` (the GPUS column)
//!   sums it over the pods that exist and have not finished, so that it shows what the job holds,
//!   not what its spec says.
//!
//! A pod without these labels (made by an older operator) is taken as built from the current spec,
//! with the spec's GPU count: upgrading the operator never restarts a running job.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use crate::runtime::apply::fnv64;
use keelson_api::trainingjob::{TrainingJob, TrainingJobSpec};

/// Label with the hash of the spec a worker pod was built from.
pub const LABEL_SPEC_HASH: &str = "keelson.dev/spec-hash";
/// Label with the GPUs a worker pod asks for.
pub const LABEL_GPUS: &str = "keelson.dev/gpus";

/// The hash of the fields of `spec` that shape the pods, as 16 hex digits.
pub fn spec_hash(spec: &TrainingJobSpec) -> String {
    let shaping = TrainingJobSpec {
        run_policy: None,
        success_policy: None,
        suspend: None,
        ..spec.clone()
    };
    // Serializing a spec (strings, numbers, maps with string keys) cannot fail; an empty body
    // would still give one stable hash.
    let bytes = serde_json::to_vec(&shaping).unwrap_or_default();
    format!("{:016x}", fnv64(&bytes))
}

/// Adds the shape labels of `job` to a worker pod's labels.
pub fn stamp(job: &TrainingJob, labels: &mut BTreeMap<String, String>) {
    labels.insert(LABEL_SPEC_HASH.into(), spec_hash(&job.spec));
    labels.insert(
        LABEL_GPUS.into(),
        job.spec.workload.gpu_count().max(0).to_string(),
    );
}

/// Whether `pod` was built from a spec other than `current` (the hash of [`spec_hash`]).
pub fn is_stale(pod: &Pod, current: &str) -> bool {
    pod.labels()
        .get(LABEL_SPEC_HASH)
        .is_some_and(|h| h != current)
}

/// The GPUs `pod` asks for: its label, or the spec's count for a pod without one.
pub fn gpus_of(job: &TrainingJob, pod: &Pod) -> i32 {
    pod.labels()
        .get(LABEL_GPUS)
        .and_then(|v| v.parse::<i32>().ok())
        .unwrap_or_else(|| job.spec.workload.gpu_count())
        .max(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use keelson_api::trainingjob::{RunPolicy, Scheduling, SuccessPolicy};
    use keelson_api::workload::{GpuSpec, WorkloadSpec};

    fn spec() -> TrainingJobSpec {
        TrainingJobSpec {
            workers: 2,
            workload: WorkloadSpec {
                image: "trainer:1".into(),
                ..WorkloadSpec::default()
            },
            ..TrainingJobSpec::default()
        }
    }

    #[test]
    fn the_hash_follows_the_fields_that_shape_the_pods_only() {
        let base = spec_hash(&spec());
        assert_eq!(base.len(), 16);
        assert_eq!(base, spec_hash(&spec()), "stable");
        let taken_while_running = TrainingJobSpec {
            run_policy: Some(RunPolicy {
                backoff_limit: Some(9),
                ..RunPolicy::default()
            }),
            success_policy: Some(SuccessPolicy::RankZero),
            suspend: Some(true),
            ..spec()
        };
        assert_eq!(spec_hash(&taken_while_running), base);
        let edits: [fn(&mut TrainingJobSpec); 4] = [
            |s| s.workers = 3,
            |s| s.workload.image = "trainer:2".into(),
            |s| {
                s.workload.gpus = Some(GpuSpec {
                    count: 1,
                    ..GpuSpec::default()
                })
            },
            |s| {
                s.scheduling = Some(Scheduling {
                    scheduler_name: Some("volcano".into()),
                    ..Scheduling::default()
                })
            },
        ];
        for edit in edits {
            let mut s = spec();
            edit(&mut s);
            assert_ne!(spec_hash(&s), base, "{s:?}");
        }
    }

    #[test]
    fn labels_say_the_shape_and_a_pod_without_them_is_current() {
        let mut s = spec();
        s.workload.gpus = Some(GpuSpec {
            count: 4,
            ..GpuSpec::default()
        });
        let job = TrainingJob::new("resnet", s.clone());
        let mut labels = BTreeMap::new();
        stamp(&job, &mut labels);
        let mut pod = Pod::default();
        pod.metadata.labels = Some(labels);
        assert_eq!(gpus_of(&job, &pod), 4);
        let current = spec_hash(&s);
        assert!(!is_stale(&pod, &current));
        s.workers = 5;
        assert!(is_stale(&pod, &spec_hash(&s)));

        let bare = Pod::default();
        assert!(!is_stale(&bare, &current));
        assert_eq!(gpus_of(&job, &bare), 4, "the spec's count");
        let mut odd = Pod::default();
        odd.metadata.labels = Some([(LABEL_GPUS.to_string(), "x".to_string())].into());
        assert_eq!(gpus_of(&job, &odd), 4);
    }
}
