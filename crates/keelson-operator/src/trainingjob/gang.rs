//! Gang scheduling of a TrainingJob (`spec.scheduling.gang`): all-or-nothing placement of its
//! workers by a gang scheduler, through the scheduler's PodGroup.
//!
//! - `schedulerName: volcano`: Volcano's `PodGroup` (`scheduling.volcano.sh/v1beta1`) with
//!   `minMember`, `minResources` and the pods' PriorityClass; each pod carries the annotation
//!   `scheduling.k8s.io/group-name`.
//! - any other scheduler (or none): the scheduler-plugins coscheduling `PodGroup`
//!   (`scheduling.x-k8s.io/v1alpha1`) with `minMember`, `minResources` and
//!   `scheduleTimeoutSeconds`; each pod carries the label `scheduling.x-k8s.io/pod-group`.
//!
//! The group is named after the job, owned by it (garbage-collected with it) and written by
//! server-side apply before any pod exists: no pod is created until the API server has stored it.
//! It is read with a GET in each reconcile of a gang job (no watch: the operator needs no list or
//! watch on a type that may not be installed). A 404 for the type itself means that its CRD is
//! not installed: the job then creates no pod (all-or-nothing was asked for), says so in its
//! `GangScheduled` condition with reason `GangSchedulerMissing`, and looks again after
//! [`MISSING_RECHECK`].
//!
//! The `GangScheduled` condition is read from the group's `status.phase` and conditions and from
//! the pods: `GroupPlaced` (True) once `minAvailable` pods are bound to nodes; `Unschedulable`
//! when the scheduler says the group cannot be placed (a Volcano `Unschedulable` condition, or a
//! pod's `PodScheduled=False` with reason `Unschedulable`), with its message; `GroupPending`
//! otherwise.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Api, CustomResource, ResourceExt};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::runtime::apply::{self, type_missing, Object, Outcome};
use crate::runtime::controller::Shared;
use crate::runtime::driver::{Change, Changes};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use keelson_api::conditions::{self, Cond};
use keelson_api::meta::Owner;
use keelson_api::trainingjob::{Gang, JobPhase, TrainingJob, TrainingJobStatus};
use keelson_api::workload::parse_quantity;

use super::decide::SUSPENDED;

/// The job's condition about its group.
pub const GANG_SCHEDULED: &str = "GangScheduled";
/// Label that puts a pod into a coscheduling PodGroup.
pub const LABEL_COSCHEDULING: &str = "scheduling.x-k8s.io/pod-group";
/// Annotation that puts a pod into a Volcano PodGroup.
pub const ANNOTATION_VOLCANO: &str = "scheduling.k8s.io/group-name";
/// The `schedulerName` that selects Volcano's PodGroup.
pub const VOLCANO_SCHEDULER: &str = "volcano";
/// How long a job whose PodGroup type is not served waits before it looks again.
pub const MISSING_RECHECK: Duration = Duration::from_secs(300);
/// How long a job whose group is not placed yet waits before it reads the group again (the pods'
/// own changes wake it sooner).
pub const PENDING_RECHECK: Duration = Duration::from_secs(20);

/// Which gang scheduler's PodGroup a job gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// scheduler-plugins coscheduling, `scheduling.x-k8s.io/v1alpha1`.
    Coscheduling,
    /// Volcano, `scheduling.volcano.sh/v1beta1`.
    Volcano,
}

impl Flavor {
    pub fn api_version(self) -> &'static str {
        match self {
            Flavor::Coscheduling => "scheduling.x-k8s.io/v1alpha1",
            Flavor::Volcano => "scheduling.volcano.sh/v1beta1",
        }
    }

    /// The CRD that serves the group.
    pub fn crd(self) -> &'static str {
        match self {
            Flavor::Coscheduling => "podgroups.scheduling.x-k8s.io",
            Flavor::Volcano => "podgroups.scheduling.volcano.sh",
        }
    }

    fn scheduler(self) -> &'static str {
        match self {
            Flavor::Coscheduling => "the scheduler-plugins coscheduling scheduler",
            Flavor::Volcano => "Volcano",
        }
    }
}

/// The gang of a job, when it asks for one.
pub fn gang_of(job: &TrainingJob) -> Option<&Gang> {
    job.spec.scheduling.as_ref()?.gang.as_ref()
}

/// The PodGroup flavor of a job: Volcano's for `schedulerName: volcano`, coscheduling otherwise.
pub fn flavor_of(job: &TrainingJob) -> Flavor {
    let scheduler = job
        .spec
        .scheduling
        .as_ref()
        .and_then(|s| s.scheduler_name.as_deref());
    if scheduler == Some(VOLCANO_SCHEDULER) {
        Flavor::Volcano
    } else {
        Flavor::Coscheduling
    }
}

/// Puts a worker pod of a gang job into its group (`group` = the job's name).
pub fn mark(job: &TrainingJob, group: &str, meta: &mut ObjectMeta) {
    if gang_of(job).is_none() {
        return;
    }
    match flavor_of(job) {
        Flavor::Coscheduling => {
            meta.labels
                .get_or_insert_with(BTreeMap::new)
                .insert(LABEL_COSCHEDULING.into(), group.into());
        }
        Flavor::Volcano => {
            meta.annotations
                .get_or_insert_with(BTreeMap::new)
                .insert(ANNOTATION_VOLCANO.into(), group.into());
        }
    }
}

/// A scheduler-plugins coscheduling PodGroup: the fields Keelson writes and reads.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "scheduling.x-k8s.io",
    version = "v1alpha1",
    kind = "PodGroup",
    root = "CoschedulingPodGroup",
    namespaced,
    status = "GroupStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct CoschedulingSpec {
    pub min_member: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_resources: Option<BTreeMap<String, Quantity>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_timeout_seconds: Option<i32>,
}

/// A Volcano PodGroup: the fields Keelson writes and reads.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "scheduling.volcano.sh",
    version = "v1beta1",
    kind = "PodGroup",
    root = "VolcanoPodGroup",
    namespaced,
    status = "GroupStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct VolcanoSpec {
    pub min_member: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_resources: Option<BTreeMap<String, Quantity>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
}

/// The status of either PodGroup, as far as Keelson reads it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GroupStatus {
    /// Coscheduling: Pending, PreScheduling, Scheduling, Scheduled, Running, Finished, Failed.
    /// Volcano: Pending, Inqueue, Running, Unknown, Completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Volcano's conditions (`Unschedulable`, `Scheduled`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<GroupCondition>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GroupCondition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The resources of `n` pods shaped like `pod`: per resource, the sum over its containers (a
/// limit stands for a missing request, as the API server defaults it), or the largest init
/// container's when that is more, times `n`.
pub fn min_resources(pod: &Pod, n: i32) -> BTreeMap<String, Quantity> {
    let Some(spec) = pod.spec.as_ref() else {
        return BTreeMap::new();
    };
    let requests = |c: &k8s_openapi::api::core::v1::Container| -> BTreeMap<String, f64> {
        let r = c.resources.clone().unwrap_or_default();
        let mut out: BTreeMap<String, f64> = BTreeMap::new();
        for (k, v) in r.limits.iter().flatten() {
            out.insert(k.clone(), parse_quantity(&v.0).unwrap_or(0.0));
        }
        for (k, v) in r.requests.iter().flatten() {
            out.insert(k.clone(), parse_quantity(&v.0).unwrap_or(0.0));
        }
        out
    };
    let mut sum: BTreeMap<String, f64> = BTreeMap::new();
    for c in &spec.containers {
        for (k, v) in requests(c) {
            *sum.entry(k).or_insert(0.0) += v;
        }
    }
    for c in spec.init_containers.iter().flatten() {
        for (k, v) in requests(c) {
            let e = sum.entry(k).or_insert(0.0);
            *e = e.max(v);
        }
    }
    sum.into_iter()
        .filter(|(_, v)| *v > 0.0)
        .map(|(k, v)| (k, Quantity(format_quantity(v * f64::from(n)))))
        .collect()
}

/// A quantity as the API server would print it: whole numbers as they are, fractions in milli
/// units (`1.5` -> `1500m`).
fn format_quantity(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else {
        format!("{}m", (v * 1000.0).round() as i64)
    }
}

/// The coscheduling PodGroup of a gang job; `worker` is one of its pods (rank 0).
pub fn coscheduling(owner: &Owner, gang: &Gang, worker: &Pod) -> CoschedulingPodGroup {
    CoschedulingPodGroup {
        metadata: owner.child_meta(&owner.name),
        spec: CoschedulingSpec {
            min_member: gang.min_available,
            min_resources: Some(min_resources(worker, gang.min_available)),
            schedule_timeout_seconds: gang.schedule_timeout_seconds,
        },
        status: None,
    }
}

/// The Volcano PodGroup of a gang job; `worker` is one of its pods (rank 0).
pub fn volcano(job: &TrainingJob, owner: &Owner, gang: &Gang, worker: &Pod) -> VolcanoPodGroup {
    VolcanoPodGroup {
        metadata: owner.child_meta(&owner.name),
        spec: VolcanoSpec {
            min_member: gang.min_available,
            min_resources: Some(min_resources(worker, gang.min_available)),
            priority_class_name: job
                .spec
                .scheduling
                .as_ref()
                .and_then(|s| s.priority_class_name.clone()),
        },
        status: None,
    }
}

/// What a GET of the job's PodGroup found.
#[derive(Clone, Debug, PartialEq)]
pub enum Read {
    /// The API server does not serve the PodGroup type: its CRD is not installed.
    TypeMissing,
    /// The group exists (or was just created) with this status.
    Present(GroupStatus),
}

/// The object types of both PodGroups, with their status.
pub trait Group: Object {
    fn group_status(&self) -> GroupStatus;
}

impl Group for CoschedulingPodGroup {
    fn group_status(&self) -> GroupStatus {
        self.status.clone().unwrap_or_default()
    }
}

impl Group for VolcanoPodGroup {
    fn group_status(&self) -> GroupStatus {
        self.status.clone().unwrap_or_default()
    }
}

/// Reads the group, and applies `desired` when it is absent or differs. Created or updated, the
/// group is read back as the API server stored it.
async fn ensure_group<K: Group>(
    shared: &Shared,
    desired: K,
    changes: &mut Changes,
) -> Result<Read> {
    let name = desired.name_any();
    let ns = desired.namespace().unwrap_or_default();
    let api: Api<K> = Api::namespaced(shared.client.clone(), &ns);
    let existing = match api.get(&name).await {
        Ok(g) => Some(g),
        Err(kube::Error::Api(s)) if type_missing(&s, &name) => return Ok(Read::TypeMissing),
        Err(kube::Error::Api(s)) if s.code == 404 => None,
        Err(e) => return Err(e.into()),
    };
    let (made, updated) = (Change::created(&desired), Change::updated(&desired));
    match apply::apply(&shared.client, &shared.writes, desired, existing.as_ref()).await {
        Ok(Outcome::Unchanged) => {}
        Ok(Outcome::Created) => changes.push(made),
        Ok(Outcome::Updated) => changes.push(updated),
        // A server-side apply creates what is absent: a 404 means the type itself is not served.
        Err(Error::Kube(kube::Error::Api(s))) if s.code == 404 => return Ok(Read::TypeMissing),
        Err(e) => return Err(e),
    }
    Ok(Read::Present(
        existing.map(|g| g.group_status()).unwrap_or_default(),
    ))
}

/// Writes the PodGroup of a gang job (`worker`: its rank-0 pod as built) and reads it.
pub async fn before_pods(
    shared: &Shared,
    job: &TrainingJob,
    owner: &Owner,
    gang: &Gang,
    worker: &Pod,
    changes: &mut Changes,
) -> Result<Read> {
    match flavor_of(job) {
        Flavor::Coscheduling => {
            ensure_group(shared, coscheduling(owner, gang, worker), changes).await
        }
        Flavor::Volcano => ensure_group(shared, volcano(job, owner, gang, worker), changes).await,
    }
}

/// Whether a pod is bound to a node.
fn is_scheduled(p: &Pod) -> bool {
    p.spec.as_ref().is_some_and(|s| s.node_name.is_some())
        || p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.type_ == "PodScheduled" && c.status == "True")
            })
}

/// The message of the first pod the scheduler could not place, as "pod: message".
fn unschedulable_pod(pods: &[Arc<Pod>]) -> Option<String> {
    pods.iter().find_map(|p| {
        let c = p.status.as_ref()?.conditions.as_ref()?.iter().find(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
        })?;
        Some(format!(
            "{}: {}",
            p.name_any(),
            c.message.as_deref().unwrap_or("unschedulable")
        ))
    })
}

/// The `GangScheduled` condition of a gang job from what the GET read and the job's pods.
pub fn condition(job: &TrainingJob, gang: &Gang, read: &Read, pods: &[Arc<Pod>]) -> Cond {
    let flavor = flavor_of(job);
    let group = format!("PodGroup {} ({})", job.name_any(), flavor.api_version());
    let status = match read {
        Read::TypeMissing => {
            return Cond::new(
                GANG_SCHEDULED,
                false,
                "GangSchedulerMissing",
                format!(
                    "the API server does not serve {}: install {} (CRD {}) or remove spec.scheduling.gang; no worker is created until the group can be written, as all-or-nothing placement was asked for",
                    flavor.api_version(),
                    flavor.scheduler(),
                    flavor.crd()
                ),
            )
        }
        Read::Present(s) => s,
    };
    let live: Vec<Arc<Pod>> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Failed")
            )
        })
        .cloned()
        .collect();
    let placed = live.iter().filter(|p| is_scheduled(p)).count();
    let min = usize::try_from(gang.min_available).unwrap_or(0);
    let phase = status.phase.as_deref().unwrap_or("unknown");
    if placed >= min && min > 0 {
        return Cond::new(
            GANG_SCHEDULED,
            true,
            "GroupPlaced",
            format!(
                "{placed} of {} workers are placed, at least spec.scheduling.gang.minAvailable {min} together; {group} is {phase}",
                job.spec.workers
            ),
        );
    }
    let said = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Unschedulable" && c.status == "True");
    if let Some(c) = said {
        return Cond::new(
            GANG_SCHEDULED,
            false,
            "Unschedulable",
            format!(
                "{group} cannot be placed: {}",
                c.message
                    .as_deref()
                    .or(c.reason.as_deref())
                    .unwrap_or("the scheduler gave no reason")
            ),
        );
    }
    if let Some(m) = unschedulable_pod(&live) {
        return Cond::new(
            GANG_SCHEDULED,
            false,
            "Unschedulable",
            format!("{placed} of at least {min} workers are placed; {group} cannot be placed: {m}"),
        );
    }
    Cond::new(
        GANG_SCHEDULED,
        false,
        "GroupPending",
        format!(
            "waiting for {} to place at least {min} of {} workers together; {placed} placed, {group} is {phase}",
            flavor.scheduler(),
            job.spec.workers
        ),
    )
}

/// The condition of a gang job whose group was not looked at in this reconcile: suspended (or
/// held by its queue), or finished. `None` keeps the previous one.
pub fn idle_condition(st: &TrainingJobStatus) -> Option<Cond> {
    (st.phase == Some(JobPhase::Suspended)).then(|| {
        Cond::new(
            GANG_SCHEDULED,
            false,
            "JobSuspended",
            "the job has no pods while it is suspended (or waits for its queue); its group is placed when it runs",
        )
    })
}

/// Adds the GangScheduled condition of a gang job to its status, after the others: `fresh` from
/// this reconcile's read of its group; when the group was not looked at, from the phase
/// (suspended) or as it was (finished). A job held for a missing PodGroup type (`missing`) says
/// so in Suspended and Ready too.
pub fn status(
    st: &mut TrainingJobStatus,
    prev: &TrainingJobStatus,
    fresh: Option<Cond>,
    missing: bool,
    generation: Option<i64>,
    now: &Time,
) {
    match fresh.or_else(|| idle_condition(st)) {
        Some(c) => {
            if missing {
                held_status(st, &c);
            }
            st.conditions
                .extend(conditions::merge(&prev.conditions, &[c], generation, now));
        }
        None => st
            .conditions
            .extend(conditions::find(&prev.conditions, GANG_SCHEDULED).cloned()),
    }
}

/// Puts the missing scheduler on the Suspended and Ready conditions of a job held for it.
pub fn held_status(st: &mut TrainingJobStatus, c: &Cond) {
    if st.phase != Some(JobPhase::Suspended) {
        return;
    }
    for x in &mut st.conditions {
        if x.type_ == SUSPENDED || x.type_ == conditions::READY {
            x.reason = c.reason.clone();
            x.message = c.message.clone();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
#[path = "gang_tests.rs"]
mod tests;
