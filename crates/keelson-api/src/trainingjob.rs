//! The TrainingJob kind: distributed training on GPUs, one pod per rank, data mounted in place.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::core::{Reason, Rule};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::workload::WorkloadSpec;

/// Port of the rendezvous on rank 0 (`MASTER_PORT`).
pub const MASTER_PORT: i32 = 29500;
/// Port of each TensorFlow worker in `TF_CONFIG`.
pub const TF_PORT: i32 = 2222;
/// Port of the JAX coordinator on rank 0.
pub const JAX_PORT: i32 = 1234;
/// Default job-level restarts before the job fails.
pub const DEFAULT_BACKOFF_LIMIT: i32 = 3;
/// Largest number of workers (ranks) a job may ask for.
pub const MAX_WORKERS: i32 = 1000;

/// Fields of the spec that shape the pods: they cannot change while the job runs (a CEL transition
/// rule refuses the edit), only while it is suspended or in the same edit that suspends it. The
/// pods of a running job share one `WORLD_SIZE`, one image and one resource shape; changing one
/// rank would leave the group inconsistent, and re-creating every rank behind the user's back
/// would silently lose the job's progress. Suspending makes that choice explicit.
pub const FROZEN_WHILE_RUNNING: [&str; 14] = [
    "workers",
    "framework",
    "image",
    "command",
    "args",
    "env",
    "resources",
    "gpus",
    "volumes",
    "nodeSelector",
    "tolerations",
    "serviceAccountName",
    "template",
    "scheduling",
];

/// The transition rule that keeps `spec.<field>` unchanged unless the job is, or becomes, suspended.
pub fn frozen_while_running(field: &str) -> Rule {
    Rule::new(format!(
        "(has(self.suspend) && self.suspend) || (has(oldSelf.suspend) && oldSelf.suspend) || (has(self.{field}) == has(oldSelf.{field}) && (!has(self.{field}) || self.{field} == oldSelf.{field}))"
    ))
    .message(
        format!(
            "spec.{field} cannot change while the job runs: suspend the job (spec.suspend: true) to change {field}; the change applies when it resumes"
        )
        .as_str(),
    )
    .field_path(format!(".{field}"))
    .reason(Reason::FieldValueForbidden)
}

/// Largest `scheduling.gang.minAvailable` (the largest number of workers).
pub const MAX_GANG: i32 = MAX_WORKERS;

/// The rule that keeps `scheduling.gang.minAvailable` within the job's workers: a group that needs
/// more pods than the job has could never be placed.
pub fn gang_fits_workers() -> Rule {
    Rule::new(
        "!has(self.scheduling) || !has(self.scheduling.gang) || self.scheduling.gang.minAvailable <= self.workers",
    )
    .message(
        "spec.scheduling.gang.minAvailable must not exceed spec.workers: the group needs that many of the job's pods placed together",
    )
    .field_path(".scheduling.gang.minAvailable")
    .reason(Reason::FieldValueInvalid)
}

/// A distributed training job: `workers` pods `<name>-worker-<rank>` behind the headless Service
/// `<name>`, with the rendezvous environment of the chosen framework injected.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "keelson.dev",
    version = "v1alpha1",
    kind = "TrainingJob",
    plural = "trainingjobs",
    shortname = "tj",
    category = "keelson",
    namespaced,
    status = "TrainingJobStatus",
    doc = "Distributed training on GPUs (PyTorch, TensorFlow, JAX), with compute kept apart from storage.",
    printcolumn = r#"{"name":"STATE","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"WORKERS","type":"string","jsonPath":".status.workersReady"}"#,
    printcolumn = r#"{"name":"GPUS","type":"integer","jsonPath":".status.gpus"}"#,
    printcolumn = r#"{"name":"RESTARTS","type":"integer","jsonPath":".status.restarts"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 51").message("metadata.name must be a DNS-1035 label of at most 51 characters (each rank's hostname is <name>-worker-<rank>)")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = frozen_while_running("workers"))]
#[x_kube(validation = frozen_while_running("framework"))]
#[x_kube(validation = frozen_while_running("command"))]
#[x_kube(validation = frozen_while_running("args"))]
#[x_kube(validation = frozen_while_running("resources"))]
#[x_kube(validation = frozen_while_running("serviceAccountName"))]
#[x_kube(validation = frozen_while_running("scheduling"))]
#[x_kube(validation = frozen_while_running("image"))]
#[x_kube(validation = frozen_while_running("gpus"))]
#[x_kube(validation = frozen_while_running("env"))]
#[x_kube(validation = frozen_while_running("volumes"))]
#[x_kube(validation = frozen_while_running("nodeSelector"))]
#[x_kube(validation = frozen_while_running("tolerations"))]
#[x_kube(validation = frozen_while_running("template"))]
#[x_kube(validation = gang_fits_workers())]
pub struct TrainingJobSpec {
    /// PyTorch, TensorFlow, JAX or Generic: which rendezvous environment is injected. Default Generic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub framework: Option<Framework>,

    /// Number of worker pods (the world size in nodes), from 1 to 1000.
    #[schemars(range(min = 1, max = 1000))]
    pub workers: i32,

    #[serde(flatten)]
    pub workload: WorkloadSpec,

    /// Restarts, deadlines and clean-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_policy: Option<RunPolicy>,

    /// AllWorkers (default): the job succeeds when every worker succeeded. RankZero: when rank 0 did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_policy: Option<SuccessPolicy>,

    /// `true`: no pods (running ones are deleted, the job stays resumable); `false` again resumes.
    /// Queue systems such as Kueue flip this field. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,

    /// Scheduler, priority and queue of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduling: Option<Scheduling>,
}

/// Framework whose rendezvous environment is injected.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Framework {
    PyTorch,
    TensorFlow,
    #[serde(rename = "JAX")]
    Jax,
    #[default]
    Generic,
}

/// How failures, deadlines and the end of a job are handled.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunPolicy {
    /// Worker restarts allowed before the job is Failed. Default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub backoff_limit: Option<i32>,

    /// OnFailure (default): a failed worker is re-created. Never: the first failure fails the job.
    /// ExitCode: exit codes 128 and above (signals, OOM kills, evictions) are retried, 1-127 fail fast.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_policy: Option<RestartPolicy>,

    /// Seconds from the start after which a job still running is Failed (reason DeadlineExceeded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,

    /// Seconds after the job finished after which the TrainingJob itself is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i64>,

    /// Which pods are deleted when the job ends: Running (default, the ones still running), All, or None.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clean_pod_policy: Option<CleanPodPolicy>,
}

/// Which worker failures are retried.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RestartPolicy {
    #[default]
    OnFailure,
    Never,
    ExitCode,
}

/// Which pods are deleted when the job ends.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CleanPodPolicy {
    #[default]
    Running,
    All,
    None,
}

/// When the job counts as succeeded.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SuccessPolicy {
    #[default]
    AllWorkers,
    RankZero,
}

/// Scheduler, priority and queue.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Scheduling {
    /// Scheduler of the pods, e.g. `volcano` (the default scheduler when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler_name: Option<String>,
    /// PriorityClass of the pods, e.g. `high`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Kueue LocalQueue, e.g. `team-a`: the operator creates a Kueue Workload for the job in this
    /// queue and creates the workers only once Kueue admits it, on the admitted flavor's nodes; an
    /// eviction suspends the job again without counting a restart. Also copied to the
    /// `kueue.x-k8s.io/queue-name` label of the TrainingJob and of its pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// All-or-nothing placement: the operator writes a PodGroup for `schedulerName` (Volcano's
    /// `scheduling.volcano.sh/v1beta1` for `volcano`, the scheduler-plugins coscheduling
    /// `scheduling.x-k8s.io/v1alpha1` otherwise) before it creates any worker, and the pods join it.
    /// Absent: pods are placed one by one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gang: Option<Gang>,
}

/// All-or-nothing placement of a job's workers.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Gang {
    /// Workers that must be placed together before any of them starts (the PodGroup's
    /// `minMember`), from 1 to `spec.workers`.
    #[schemars(range(min = 1, max = 1000))]
    pub min_available: i32,
    /// Seconds the coscheduling plugin waits for the whole group before it gives the placed pods
    /// back (the PodGroup's `scheduleTimeoutSeconds`). Volcano has no such field and ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub schedule_timeout_seconds: Option<i32>,
}

/// Phase of a TrainingJob.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum JobPhase {
    #[default]
    Pending,
    Running,
    Restarting,
    Succeeded,
    Failed,
    Suspended,
}

impl JobPhase {
    /// Succeeded or Failed: the job never runs again.
    pub fn is_finished(self) -> bool {
        matches!(self, JobPhase::Succeeded | JobPhase::Failed)
    }
}

/// Counts of the job's worker pods.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerCounts {
    /// Pods that exist and have not finished.
    pub active: i32,
    /// Pods running and ready.
    pub ready: i32,
    /// Pods that exited 0.
    pub succeeded: i32,
    /// Pods that failed.
    pub failed: i32,
}

/// Observed state of a TrainingJob.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrainingJobStatus {
    /// Pending, Running, Restarting, Succeeded, Failed or Suspended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<JobPhase>,
    /// Worker pod counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<WorkerCounts>,
    /// Ready workers over total, e.g. `3/4` (the WORKERS column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers_ready: Option<String>,
    /// GPUs the job's pods ask for (the GPUS column): the sum over the worker pods that exist and
    /// have not finished, each with the count it was created with. 0 while the job is suspended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<i32>,
    /// Worker restarts so far: each failed worker pod that was re-created counts one (counted
    /// against backoffLimit, kept across a suspension).
    #[serde(default)]
    pub restarts: i32,
    /// When the job's pods were first created. Cleared while the job is suspended and set again when
    /// it resumes, so that activeDeadlineSeconds counts from the resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the job succeeded or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Created, Running, Restarting, Succeeded, Failed, Suspended and Ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
