//! Kueue admission of TrainingJobs (docs/kueue.md), as Kueue's own job integrations do it (its
//! jobframework reconciler), for a job with `scheduling.queue`:
//!
//! - a `Workload` (kueue.x-k8s.io/v1beta2) owned by the job, named `trainingjob-<name>-<hash>`, with
//!   one pod set `workers` (count = `spec.workers`, the worker pod's containers and their requests,
//!   GPUs included, node selector, tolerations and affinity), written by server-side apply;
//! - the job creates no pod until the Workload is admitted: until then it is Suspended, and its
//!   Suspended and Ready conditions carry Kueue's reason and message (`Inadmissible`: "LocalQueue x
//!   doesn't exist", `Pending`: "couldn't assign flavors ... insufficient quota"). It is woken by the
//!   Workload's watch, so a queue that never admits costs nothing;
//! - once admitted, its pods get the node labels and tolerations of the ResourceFlavors named in
//!   `status.admission.podSetAssignments[].flavors`, and the label `kueue.x-k8s.io/podset`;
//! - on eviction (condition Evicted, e.g. preempted) the job's pods are deleted as for a suspension:
//!   no restart is counted. Once none is left, the quota reservation is cleared as the jobframework
//!   does (QuotaReserved False with reason `Pending`, Admitted False, Requeued), so Kueue can queue
//!   the Workload again;
//! - a finished job marks its Workload Finished (reason `Succeeded` or `Failed`);
//! - `spec.suspend: true` sets the Workload's `spec.active` to false, so a job its user stopped holds
//!   no quota; resuming drops the field again;
//! - a change of the pod set while quota is reserved (possible only while suspended) deletes the
//!   Workload; a new one is created and queued.
//!
//! The priority follows the jobframework: the label `kueue.x-k8s.io/priority-class` on the
//! TrainingJob names a WorkloadPriorityClass; otherwise `scheduling.priorityClassName` names a
//! PriorityClass. Its value is read when the Workload is created or the class changes.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, PodTemplateSpec, Toleration};
use k8s_openapi::api::scheduling::v1::PriorityClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::{Api, Client, CustomResource, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::Result;
use crate::runtime::apply::{fnv64, subset};
use keelson_api::conditions;
use keelson_api::meta::{Owner, FIELD_MANAGER};
use keelson_api::trainingjob::{JobPhase, TrainingJob, TrainingJobStatus};

use super::decide::SUSPENDED;

pub const GROUP: &str = "kueue.x-k8s.io";
pub const VERSION: &str = "v1beta2";
/// The one pod set of a TrainingJob's Workload.
pub const POD_SET: &str = "workers";
/// Label on the pods: the pod set they belong to (as Kueue's integrations set it).
pub const LABEL_PODSET: &str = "kueue.x-k8s.io/podset";
/// Label on the Workload: the uid of its job.
pub const LABEL_JOB_UID: &str = "kueue.x-k8s.io/job-uid";
/// Label on the TrainingJob naming a WorkloadPriorityClass.
pub const LABEL_PRIORITY_CLASS: &str = "kueue.x-k8s.io/priority-class";

const ADMITTED: &str = "Admitted";
const QUOTA_RESERVED: &str = "QuotaReserved";
const EVICTED: &str = "Evicted";
const FINISHED: &str = "Finished";
const REQUEUED: &str = "Requeued";
const PODS_READY: &str = "PodsReady";

/// A Kueue Workload: the fields Keelson writes and reads. Unknown fields are ignored on read.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "kueue.x-k8s.io",
    version = "v1beta2",
    kind = "Workload",
    namespaced,
    status = "WorkloadStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_name: Option<String>,
    #[serde(default)]
    pub pod_sets: Vec<PodSet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_ref: Option<PriorityClassRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
}

/// The Workload's nested wire types: camelCase JSON, compared by value.
macro_rules! wire_types {
    ($($(#[$meta:meta])* pub struct $name:ident { $($body:tt)* })*) => {
        $(
            $(#[$meta])*
            #[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
            #[serde(rename_all = "camelCase")]
            pub struct $name { $($body)* }
        )*
    };
}

wire_types! {
    pub struct PodSet {
        pub name: String,
        pub count: i32,
        pub template: PodTemplateSpec,
    }

    pub struct PriorityClassRef {
        pub group: String,
        pub kind: String,
        pub name: String,
    }

    pub struct WorkloadStatus {
        #[serde(default)]
        pub conditions: Vec<Condition>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub admission: Option<Admission>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub accumulated_past_execution_time_seconds: Option<i32>,
    }

    pub struct Admission {
        pub cluster_queue: String,
        #[serde(default)]
        pub pod_set_assignments: Vec<PodSetAssignment>,
    }

    pub struct PodSetAssignment {
        pub name: String,
        /// Resource name -> ResourceFlavor name.
        #[serde(default)]
        pub flavors: BTreeMap<String, String>,
    }
}

/// Where a queued job stands, read from its Workload.
#[derive(Clone, Debug, PartialEq)]
pub enum Gate {
    /// The Workload is admitted: run, on these ResourceFlavors.
    Admitted { flavors: Vec<String> },
    /// Not admitted (or evicted): no pods, with Kueue's reason and message.
    Held { reason: String, message: String },
}

fn cond<'a>(wl: &'a Workload, type_: &str) -> Option<&'a Condition> {
    wl.status
        .as_ref()
        .and_then(|s| conditions::find(&s.conditions, type_))
}

/// A copy of the Workload's conditions, to edit into a status patch.
fn conditions_of(wl: &Workload) -> Vec<Condition> {
    wl.status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default()
}

fn is_true(wl: &Workload, type_: &str) -> bool {
    cond(wl, type_).is_some_and(|c| c.status == "True")
}

/// Whether Kueue holds quota for the Workload (`status.admission` is set).
pub fn has_reservation(wl: &Workload) -> bool {
    wl.status.as_ref().is_some_and(|s| s.admission.is_some())
}

pub fn is_finished(wl: &Workload) -> bool {
    is_true(wl, FINISHED)
}

/// The Workload's name: `trainingjob-<job>-<5 hex digits of the job's uid>`, in the shape of the
/// names Kueue gives the Workloads of its own integrations.
pub fn workload_name(job: &str, uid: &str) -> String {
    let hash = format!("{:016x}", fnv64(format!("{job}\n{uid}").as_bytes()));
    let prefix: String = format!("trainingjob-{job}").chars().take(253 - 6).collect();
    format!("{prefix}-{}", &hash[hash.len() - 5..])
}

/// The queue of a job, when it has one.
pub fn queue_of(job: &TrainingJob) -> Option<&str> {
    job.spec
        .scheduling
        .as_ref()
        .and_then(|s| s.queue.as_deref())
        .filter(|q| !q.is_empty())
}

/// The gate of a queued job from its Workload (`None`: not created yet).
pub fn gate(queue: &str, wl: Option<&Workload>) -> Gate {
    let held = |reason: &str, message: String| Gate::Held {
        reason: reason.to_string(),
        message,
    };
    let Some(wl) = wl else {
        return held(
            "WorkloadPending",
            format!("waiting for Kueue to admit the job's Workload in LocalQueue {queue}"),
        );
    };
    let name = wl.name_any();
    if let Some(c) = cond(wl, FINISHED).filter(|c| c.status == "True") {
        return held(
            &c.reason,
            format!("Workload {name} is finished: {}", c.message),
        );
    }
    if let Some(c) = cond(wl, EVICTED).filter(|c| c.status == "True") {
        return held(
            &c.reason,
            format!("Workload {name} was evicted: {}", c.message),
        );
    }
    if is_true(wl, ADMITTED) {
        if let Some(a) = wl.status.as_ref().and_then(|s| s.admission.as_ref()) {
            let mut flavors: Vec<String> = a
                .pod_set_assignments
                .iter()
                .flat_map(|p| p.flavors.values().cloned())
                .collect();
            flavors.sort();
            flavors.dedup();
            return Gate::Admitted { flavors };
        }
    }
    match cond(wl, QUOTA_RESERVED).filter(|c| c.status == "False") {
        Some(c) => held(
            &c.reason,
            format!("Workload {name} in LocalQueue {queue}: {}", c.message),
        ),
        None if has_reservation(wl) => held(
            "QuotaReserved",
            format!("Workload {name} has quota reserved and waits for its admission checks"),
        ),
        None => held(
            "WorkloadPending",
            format!("waiting for Kueue to admit Workload {name} in LocalQueue {queue}"),
        ),
    }
}

fn strip_container(c: &Container) -> Container {
    Container {
        name: c.name.clone(),
        resources: c.resources.clone(),
        ..Container::default()
    }
}

/// The Workload's pod set from the worker pod (rank 0): what Kueue counts and matches flavors with.
fn pod_set(job: &TrainingJob, worker: &Pod) -> PodSet {
    let spec = worker.spec.clone().unwrap_or_default();
    let template = PodTemplateSpec {
        metadata: None,
        spec: Some(PodSpec {
            containers: spec.containers.iter().map(strip_container).collect(),
            init_containers: spec
                .init_containers
                .as_ref()
                .map(|cs| cs.iter().map(strip_container).collect()),
            node_selector: spec.node_selector.clone(),
            tolerations: spec.tolerations.clone(),
            affinity: spec.affinity.clone(),
            priority_class_name: spec.priority_class_name.clone(),
            runtime_class_name: spec.runtime_class_name.clone(),
            overhead: spec.overhead.clone(),
            restart_policy: Some("Never".into()),
            ..PodSpec::default()
        }),
    };
    PodSet {
        name: POD_SET.into(),
        count: job.spec.workers,
        template,
    }
}

/// The Workload to apply: what Keelson owns of it. `priority` is the resolved class and value.
pub fn desired(
    job: &TrainingJob,
    owner: &Owner,
    queue: &str,
    worker: &Pod,
    priority: Option<(PriorityClassRef, i32)>,
) -> Workload {
    let uid = job.uid().unwrap_or_default();
    let mut meta: ObjectMeta = owner.child_meta(workload_name(&owner.name, &uid));
    if !uid.is_empty() && uid.len() <= 63 {
        meta.labels
            .get_or_insert_with(BTreeMap::new)
            .insert(LABEL_JOB_UID.into(), uid);
    }
    let (priority_class_ref, priority) = match priority {
        Some((r, v)) => (Some(r), Some(v)),
        None => (None, None),
    };
    Workload {
        metadata: meta,
        spec: WorkloadSpec {
            queue_name: Some(queue.to_string()),
            pod_sets: vec![pod_set(job, worker)],
            priority_class_ref,
            priority,
            active: job.spec.suspend.unwrap_or(false).then_some(false),
        },
        status: None,
    }
}

/// The priority class a job asks for (not yet resolved to a value).
pub fn wanted_priority(job: &TrainingJob) -> Option<PriorityClassRef> {
    if let Some(name) = job.labels().get(LABEL_PRIORITY_CLASS) {
        return Some(PriorityClassRef {
            group: GROUP.into(),
            kind: "WorkloadPriorityClass".into(),
            name: name.clone(),
        });
    }
    let name = job.spec.scheduling.as_ref()?.priority_class_name.clone()?;
    Some(PriorityClassRef {
        group: "scheduling.k8s.io".into(),
        kind: "PriorityClass".into(),
        name,
    })
}

/// Whether the pod sets of `want` differ from those of `have` (server defaults aside).
pub fn pod_sets_differ(want: &Workload, have: &Workload) -> bool {
    match (
        serde_json::to_value(&want.spec.pod_sets),
        serde_json::to_value(&have.spec.pod_sets),
    ) {
        (Ok(w), Ok(h)) => !subset(&w, &h),
        _ => true,
    }
}

/// The status merge patch that clears an evicted Workload's quota reservation, as the
/// jobframework does once the job's pods are gone: `admission` removed, QuotaReserved False
/// (`Pending`, the eviction's message), Admitted False (`NoReservation`), Requeued (True after a
/// preemption or a node failure). `None` when there is nothing to clear. The resourceVersion makes
/// it fail on a Workload changed since it was read.
pub fn clear_reservation(wl: &Workload, now: &Time) -> Option<Value> {
    let evicted = cond(wl, EVICTED).filter(|c| c.status == "True")?;
    if !has_reservation(wl) {
        return None;
    }
    let st = wl.status.as_ref()?;
    let gen = wl.metadata.generation;
    let requeued = matches!(evicted.reason.as_str(), "Preempted" | "NodeFailures");
    let mut conds = st.conditions.clone();
    set_condition(
        &mut conds,
        QUOTA_RESERVED,
        false,
        "Pending",
        &evicted.message,
        gen,
        now,
    );
    set_condition(
        &mut conds,
        ADMITTED,
        false,
        "NoReservation",
        "The workload has no reservation",
        gen,
        now,
    );
    set_condition(
        &mut conds,
        REQUEUED,
        requeued,
        &evicted.reason,
        &evicted.message,
        gen,
        now,
    );
    let mut status = json!({"admission": null, "conditions": conds});
    // Time admitted so far, as Kueue accumulates it when the Admitted condition turns False.
    if let Some(admitted) = cond(wl, ADMITTED).filter(|c| c.status == "True") {
        let ran = now.0.as_second() - admitted.last_transition_time.0.as_second();
        let before = st.accumulated_past_execution_time_seconds.unwrap_or(0);
        let total = i64::from(before) + ran.max(0);
        status["accumulatedPastExecutionTimeSeconds"] =
            json!(i32::try_from(total).unwrap_or(i32::MAX));
    }
    Some(json!({
        "metadata": {"resourceVersion": wl.resource_version()},
        "status": status,
    }))
}

/// The status merge patch that marks the Workload Finished with `reason` (`Succeeded`, `Failed`,
/// `FailedToStart`), or `None` when it already is.
pub fn finish(wl: &Workload, reason: &str, message: &str, now: &Time) -> Option<Value> {
    if is_finished(wl) {
        return None;
    }
    let mut conds = conditions_of(wl);
    let message = if message.is_empty() {
        format!("the TrainingJob finished: {reason}")
    } else {
        message.to_string()
    };
    set_condition(
        &mut conds,
        FINISHED,
        true,
        reason,
        &message,
        wl.metadata.generation,
        now,
    );
    Some(json!({
        "metadata": {"resourceVersion": wl.resource_version()},
        "status": {"conditions": conds},
    }))
}

/// Sets a condition as `apimeta.SetStatusCondition` does: the transition time moves only with
/// the status. Messages are cut to the 32 KiB a condition may hold.
fn set_condition(
    conds: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) {
    let status = if status { "True" } else { "False" }.to_string();
    let message: String = message.chars().take(32 * 1024).collect();
    let reason = if reason.is_empty() { "Unknown" } else { reason };
    match conds.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = now.clone();
            }
            c.status = status;
            c.reason = reason.to_string();
            c.message = message;
            c.observed_generation = generation;
        }
        None => conds.push(Condition {
            type_: type_.to_string(),
            status,
            reason: reason.to_string(),
            message,
            observed_generation: generation,
            last_transition_time: now.clone(),
        }),
    }
}

/// Whether every worker of the job is running and ready, or has succeeded: Kueue's `PodsReady`
/// of a job (for a batch Job: ready + succeeded >= parallelism).
pub fn all_pods_ready(pods: &[Arc<Pod>], workers: i32) -> bool {
    let ready = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(
            |p| match p.status.as_ref().and_then(|s| s.phase.as_deref()) {
                Some("Succeeded") => true,
                Some("Running") => crate::podstatus::is_ready(p),
                _ => false,
            },
        )
        .count();
    workers > 0 && i32::try_from(ready).unwrap_or(i32::MAX) >= workers
}

/// The status merge patch that sets the Workload's `PodsReady` condition as Kueue's jobframework
/// does for its own integrations (what `waitForPodsReady` times out on), or `None` when it is
/// already so (or the Workload was never admitted): False `WaitForStart` until every pod of the
/// admitted Workload is ready; True
/// `Started` (`Recovered` after a recovery) once they are; False `WaitForRecovery` when a pod is
/// lost after that.
pub fn pods_ready(wl: &Workload, ready: bool, now: &Time) -> Option<Value> {
    const NOT_READY: &str = "Not all pods are ready or succeeded";
    const RECOVERY: &str = "At least one pod has failed, waiting for recovery";
    const READY: &str = "All pods reached readiness and the workload is running";
    let have = cond(wl, PODS_READY);
    if have.is_none() && !is_true(wl, ADMITTED) {
        // Kueue counts the timeout from the admission: nothing to say before it.
        return None;
    }
    let (status, reason, message) = if !is_true(wl, ADMITTED) {
        (false, "WaitForStart", NOT_READY)
    } else if ready {
        let recovered =
            have.is_some_and(|c| matches!(c.reason.as_str(), "WaitForRecovery" | "Recovered"));
        (true, if recovered { "Recovered" } else { "Started" }, READY)
    } else {
        match have {
            Some(c) if c.status == "True" || c.reason == "WaitForRecovery" => {
                (false, "WaitForRecovery", RECOVERY)
            }
            _ => (false, "WaitForStart", NOT_READY),
        }
    };
    let want = if status { "True" } else { "False" };
    if have.is_some_and(|c| c.status == want && c.reason == reason && c.message == message) {
        return None;
    }
    let mut conds = conditions_of(wl);
    set_condition(
        &mut conds,
        PODS_READY,
        status,
        reason,
        message,
        wl.metadata.generation,
        now,
    );
    Some(json!({
        "metadata": {"resourceVersion": wl.resource_version()},
        "status": {"conditions": conds},
    }))
}

/// Puts the queue's reason and message on a held job's Suspended and Ready conditions (the status
/// functions say why a job is suspended only for `spec.suspend`).
pub fn held_status(st: &mut TrainingJobStatus, reason: &str, message: &str) {
    if st.phase != Some(JobPhase::Suspended) {
        return;
    }
    for c in &mut st.conditions {
        if c.type_ == SUSPENDED || c.type_ == conditions::READY {
            c.reason = reason.to_string();
            c.message = format!("{message}; the job runs once Kueue admits it");
        }
    }
}

/// A copy of the job that the lifecycle policy sees as suspended: a held job has no pods.
pub fn as_suspended(job: &TrainingJob) -> TrainingJob {
    let mut held = job.clone();
    held.spec.suspend = Some(true);
    held
}

/// Merges the admitted flavors' node labels and tolerations into a pod, and labels it with its
/// pod set. A node label the pod already selects with another value is an error (Kueue's
/// `podset.Merge` refuses the same conflict).
pub fn place(pod: &mut Pod, flavors: &[Flavor]) -> std::result::Result<(), String> {
    pod.labels_mut()
        .insert(LABEL_PODSET.to_string(), POD_SET.to_string());
    let spec = pod.spec.get_or_insert_with(PodSpec::default);
    for f in flavors {
        let selector = spec.node_selector.get_or_insert_with(BTreeMap::new);
        for (k, v) in &f.node_labels {
            match selector.get(k) {
                Some(have) if have != v => {
                    return Err(format!(
                        "ResourceFlavor {} sets node label {k}={v}, but the pods select {k}={have}",
                        f.name
                    ))
                }
                _ => {
                    selector.insert(k.clone(), v.clone());
                }
            }
        }
        let tolerations = spec.tolerations.get_or_insert_with(Vec::new);
        for t in &f.tolerations {
            if !tolerations.contains(t) {
                tolerations.push(t.clone());
            }
        }
    }
    Ok(())
}

/// What a ResourceFlavor puts on the pods it admits.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Flavor {
    pub name: String,
    pub node_labels: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
}

fn cluster_api(client: &Client, kind: &str, plural: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk(GROUP, VERSION, kind);
    Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(&gvk, plural),
    )
}

/// Reads the ResourceFlavors an admission names. A flavor that is gone is an error: the pods are
/// not created without their placement.
pub async fn flavors(client: &Client, names: &[String]) -> Result<Vec<Flavor>> {
    let api = cluster_api(client, "ResourceFlavor", "resourceflavors");
    let mut out = Vec::new();
    for name in names {
        let rf = api.get(name).await?;
        let spec = rf.data.get("spec").cloned().unwrap_or(Value::Null);
        out.push(Flavor {
            name: name.clone(),
            node_labels: serde_json::from_value(spec["nodeLabels"].clone()).unwrap_or_default(),
            tolerations: serde_json::from_value(spec["tolerations"].clone()).unwrap_or_default(),
        });
    }
    Ok(out)
}

/// Resolves a priority class to its value: `Ok(None)` when the class does not exist.
pub async fn priority_value(client: &Client, class: &PriorityClassRef) -> Result<Option<i32>> {
    if class.kind == "WorkloadPriorityClass" {
        let api = cluster_api(client, "WorkloadPriorityClass", "workloadpriorityclasses");
        Ok(api
            .get_opt(&class.name)
            .await?
            .and_then(|o| o.data.get("value").and_then(Value::as_i64))
            .and_then(|v| i32::try_from(v).ok()))
    } else {
        let api: Api<PriorityClass> = Api::all(client.clone());
        Ok(api.get_opt(&class.name).await?.map(|p| p.value))
    }
}

/// Writes a status merge patch to a Workload (`/status`, field manager `keelson`).
pub async fn patch_workload_status(client: &Client, wl: &Workload, patch: &Value) -> Result<()> {
    let api: Api<Workload> = Api::namespaced(client.clone(), &wl.namespace().unwrap_or_default());
    api.patch_status(
        &wl.name_any(),
        &PatchParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..PatchParams::default()
        },
        &Patch::Merge(patch),
    )
    .await?;
    Ok(())
}

/// Whether the API server serves Kueue's Workloads (kueue.x-k8s.io/v1beta2).
pub async fn served(client: &Client) -> bool {
    match client
        .list_api_group_resources(&format!("{GROUP}/{VERSION}"))
        .await
    {
        Ok(list) => list.resources.iter().any(|r| r.name == "workloads"),
        Err(e) => {
            tracing::info!(error = %e, "Kueue's API ({GROUP}/{VERSION}) is not served: TrainingJobs with scheduling.queue wait for it");
            false
        }
    }
}

/// The pods of a job that are still there and not on their way out.
pub fn active_pods(pods: &[Arc<Pod>]) -> usize {
    pods.iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        })
        .count()
}

#[cfg(test)]
#[path = "kueue_tests.rs"]
mod tests;
