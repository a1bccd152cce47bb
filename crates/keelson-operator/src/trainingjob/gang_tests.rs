use super::*;
use k8s_openapi::api::core::v1::{
    Container, PodCondition, PodSpec, PodStatus, ResourceRequirements,
};
use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Value};

use crate::trainingjob::build::build;

fn job(scheduling: Value) -> TrainingJob {
    serde_json::from_value(json!({
        "apiVersion": "keelson.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "bert", "namespace": "team-a", "uid": "u-1", "generation": 1},
        "spec": {
            "image": "trainer:1",
            "workers": 4,
            "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}},
            "gpus": {"count": 2},
            "scheduling": scheduling,
        },
    }))
    .unwrap()
}

fn owner(j: &TrainingJob) -> Owner {
    Owner::of(j).unwrap()
}

fn q(s: &str) -> Quantity {
    Quantity(s.into())
}

#[test]
fn the_scheduler_name_picks_the_pod_group_and_how_pods_join_it() {
    let cases = [
        (
            json!({"gang": {"minAvailable": 2}}),
            Some(Flavor::Coscheduling),
        ),
        (
            json!({"schedulerName": "scheduler-plugins-scheduler", "gang": {"minAvailable": 2}}),
            Some(Flavor::Coscheduling),
        ),
        (
            json!({"schedulerName": "volcano", "gang": {"minAvailable": 2}}),
            Some(Flavor::Volcano),
        ),
        (json!({"schedulerName": "volcano"}), None),
        (json!({}), None),
    ];
    for (scheduling, want) in cases {
        let j = job(scheduling.clone());
        let pods = build(&j, &owner(&j)).unwrap().pods;
        for p in &pods {
            let label = p.labels().get(LABEL_COSCHEDULING).cloned();
            let annotation = p.annotations().get(ANNOTATION_VOLCANO).cloned();
            match want {
                Some(Flavor::Coscheduling) => {
                    assert_eq!(label.as_deref(), Some("bert"), "{scheduling}");
                    assert_eq!(annotation, None, "{scheduling}");
                }
                Some(Flavor::Volcano) => {
                    assert_eq!(label, None, "{scheduling}");
                    assert_eq!(annotation.as_deref(), Some("bert"), "{scheduling}");
                }
                None => assert_eq!((label, annotation), (None, None), "{scheduling}"),
            }
        }
        if let Some(f) = want {
            assert_eq!(flavor_of(&j), f);
        }
    }
}

#[test]
fn without_gang_the_pods_are_what_they_were() {
    let plain = job(json!({"schedulerName": "volcano"}));
    let mut no_scheduling = plain.clone();
    no_scheduling.spec.scheduling = Some(keelson_api::trainingjob::Scheduling {
        scheduler_name: Some("volcano".into()),
        ..Default::default()
    });
    let a = build(&plain, &owner(&plain)).unwrap().pods;
    let b = build(&no_scheduling, &owner(&no_scheduling)).unwrap().pods;
    assert_eq!(a, b);
}

#[test]
fn min_resources_sum_the_first_min_available_pods() {
    let j = job(json!({"gang": {"minAvailable": 3}}));
    let worker = build(&j, &owner(&j)).unwrap().pods.remove(0);
    let r = min_resources(&worker, 3);
    assert_eq!(r["cpu"], q("1500m"));
    assert_eq!(r["memory"], q("3221225472"));
    assert_eq!(r["nvidia.com/gpu"], q("6"));

    // A limit stands for a missing request; an init container counts when it asks for more.
    let pod = Pod {
        spec: Some(PodSpec {
            containers: vec![
                Container {
                    name: "a".into(),
                    resources: Some(ResourceRequirements {
                        limits: Some([("cpu".to_string(), q("1"))].into()),
                        ..ResourceRequirements::default()
                    }),
                    ..Container::default()
                },
                Container {
                    name: "b".into(),
                    resources: Some(ResourceRequirements {
                        requests: Some([("cpu".to_string(), q("250m"))].into()),
                        ..ResourceRequirements::default()
                    }),
                    ..Container::default()
                },
            ],
            init_containers: Some(vec![Container {
                name: "init".into(),
                resources: Some(ResourceRequirements {
                    requests: Some([("memory".to_string(), q("64Mi"))].into()),
                    ..ResourceRequirements::default()
                }),
                ..Container::default()
            }]),
            ..PodSpec::default()
        }),
        ..Pod::default()
    };
    let r = min_resources(&pod, 2);
    assert_eq!(r["cpu"], q("2500m"));
    assert_eq!(r["memory"], q("134217728"));
}

#[test]
fn the_pod_groups_are_owned_by_the_job_and_carry_the_gang() {
    let j = job(json!({
        "schedulerName": "volcano",
        "priorityClassName": "high",
        "gang": {"minAvailable": 2, "scheduleTimeoutSeconds": 60}
    }));
    let o = owner(&j);
    let worker = build(&j, &o).unwrap().pods.remove(0);
    let g = gang_of(&j).unwrap().clone();

    let v = serde_json::to_value(volcano(&j, &o, &g, &worker)).unwrap();
    assert_eq!(v["apiVersion"], "scheduling.volcano.sh/v1beta1");
    assert_eq!(v["kind"], "PodGroup");
    assert_eq!(v["metadata"]["name"], "bert");
    assert_eq!(v["metadata"]["namespace"], "team-a");
    let owner_ref = &v["metadata"]["ownerReferences"][0];
    assert_eq!(
        (
            &owner_ref["kind"],
            &owner_ref["uid"],
            &owner_ref["controller"]
        ),
        (&json!("TrainingJob"), &json!("u-1"), &json!(true))
    );
    assert_eq!(
        v["spec"],
        json!({
            "minMember": 2,
            "minResources": {"cpu": "1", "memory": "2147483648", "nvidia.com/gpu": "4"},
            "priorityClassName": "high"
        })
    );

    let v = serde_json::to_value(coscheduling(&o, &g, &worker)).unwrap();
    assert_eq!(v["apiVersion"], "scheduling.x-k8s.io/v1alpha1");
    assert_eq!(v["kind"], "PodGroup");
    assert_eq!(
        v["spec"],
        json!({
            "minMember": 2,
            "minResources": {"cpu": "1", "memory": "2147483648", "nvidia.com/gpu": "4"},
            "scheduleTimeoutSeconds": 60
        })
    );
    assert_eq!(v["metadata"]["ownerReferences"][0]["uid"], "u-1");
}

fn pod(name: &str, node: Option<&str>, unschedulable: Option<&str>) -> Arc<Pod> {
    let mut p = Pod::default();
    p.metadata.name = Some(name.into());
    p.spec = Some(PodSpec {
        node_name: node.map(String::from),
        ..PodSpec::default()
    });
    let mut conds = Vec::new();
    if let Some(m) = unschedulable {
        conds.push(PodCondition {
            type_: "PodScheduled".into(),
            status: "False".into(),
            reason: Some("Unschedulable".into()),
            message: Some(m.into()),
            ..PodCondition::default()
        });
    }
    p.status = Some(PodStatus {
        phase: Some("Pending".into()),
        conditions: Some(conds),
        ..PodStatus::default()
    });
    Arc::new(p)
}

fn group(phase: Option<&str>, unschedulable: Option<&str>) -> Read {
    Read::Present(GroupStatus {
        phase: phase.map(String::from),
        conditions: unschedulable
            .map(|m| {
                vec![GroupCondition {
                    type_: "Unschedulable".into(),
                    status: "True".into(),
                    reason: Some("NotEnoughResources".into()),
                    message: Some(m.into()),
                }]
            })
            .unwrap_or_default(),
    })
}

#[test]
fn the_gang_scheduled_condition_follows_the_group_and_the_pods() {
    let cosched = job(json!({"gang": {"minAvailable": 2}}));
    let volc = job(json!({"schedulerName": "volcano", "gang": {"minAvailable": 2}}));
    type Case<'a> = (
        &'a str,
        &'a TrainingJob,
        Read,
        Vec<Arc<Pod>>,
        bool,
        &'a str,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "CRD missing",
            &cosched,
            Read::TypeMissing,
            vec![],
            false,
            "GangSchedulerMissing",
            "CRD podgroups.scheduling.x-k8s.io",
        ),
        (
            "volcano CRD missing",
            &volc,
            Read::TypeMissing,
            vec![],
            false,
            "GangSchedulerMissing",
            "install Volcano (CRD podgroups.scheduling.volcano.sh)",
        ),
        (
            "just created",
            &cosched,
            group(None, None),
            vec![pod("bert-worker-0", None, None), pod("bert-worker-1", None, None)],
            false,
            "GroupPending",
            "0 placed, PodGroup bert (scheduling.x-k8s.io/v1alpha1) is unknown",
        ),
        (
            "scheduling, one bound",
            &cosched,
            group(Some("Scheduling"), None),
            vec![pod("bert-worker-0", Some("n1"), None), pod("bert-worker-1", None, None)],
            false,
            "GroupPending",
            "1 placed, PodGroup bert (scheduling.x-k8s.io/v1alpha1) is Scheduling",
        ),
        (
            "a pod the scheduler refused",
            &cosched,
            group(Some("Scheduling"), None),
            vec![
                pod("bert-worker-0", None, Some("0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")),
                pod("bert-worker-1", None, None),
            ],
            false,
            "Unschedulable",
            "bert-worker-0: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
        ),
        (
            "volcano says unschedulable",
            &volc,
            group(Some("Pending"), Some("2/4 tasks in gang unschedulable: pod group is not ready")),
            vec![pod("bert-worker-0", None, None)],
            false,
            "Unschedulable",
            "cannot be placed: 2/4 tasks in gang unschedulable: pod group is not ready",
        ),
        (
            "scheduled",
            &cosched,
            group(Some("Scheduled"), None),
            vec![pod("bert-worker-0", Some("n1"), None), pod("bert-worker-1", Some("n2"), None)],
            true,
            "GroupPlaced",
            "2 of 4 workers are placed, at least spec.scheduling.gang.minAvailable 2 together; PodGroup bert (scheduling.x-k8s.io/v1alpha1) is Scheduled",
        ),
        (
            "volcano inqueue with pods bound",
            &volc,
            group(Some("Inqueue"), None),
            vec![pod("bert-worker-0", Some("n1"), None), pod("bert-worker-1", Some("n2"), None)],
            true,
            "GroupPlaced",
            "is Inqueue",
        ),
        (
            "placed wins over an old unschedulable condition",
            &volc,
            group(Some("Running"), Some("earlier")),
            vec![pod("bert-worker-0", Some("n1"), None), pod("bert-worker-1", Some("n2"), None)],
            true,
            "GroupPlaced",
            "is Running",
        ),
    ];
    for (what, j, read, pods, status, reason, needle) in cases {
        let g = gang_of(j).unwrap();
        let c = condition(j, g, &read, &pods);
        assert_eq!(c.type_, GANG_SCHEDULED, "{what}");
        assert_eq!(
            (c.status, c.reason.as_str()),
            (status, reason),
            "{what}: {}",
            c.message
        );
        assert!(c.message.contains(needle), "{what}: {}", c.message);
    }
}

#[test]
fn a_job_held_for_its_scheduler_says_so_and_a_suspended_one_has_no_group() {
    let now = Time(Timestamp::from_second(1_800_000_000).unwrap());
    let base = |phase| TrainingJobStatus {
        phase: Some(phase),
        conditions: conditions::merge(
            &[],
            &[
                Cond::new(SUSPENDED, true, "JobSuspended", "x"),
                Cond::new(conditions::READY, false, "Suspended", "x"),
            ],
            Some(1),
            &now,
        ),
        ..TrainingJobStatus::default()
    };
    let j = job(json!({"gang": {"minAvailable": 2}}));
    let missing = condition(&j, gang_of(&j).unwrap(), &Read::TypeMissing, &[]);
    let mut st = base(JobPhase::Suspended);
    status(
        &mut st,
        &TrainingJobStatus::default(),
        Some(missing),
        true,
        Some(1),
        &now,
    );
    for t in [SUSPENDED, conditions::READY, GANG_SCHEDULED] {
        let c = conditions::find(&st.conditions, t).unwrap();
        assert_eq!(c.reason, "GangSchedulerMissing", "{t}");
    }

    let mut st = base(JobPhase::Suspended);
    status(
        &mut st,
        &TrainingJobStatus::default(),
        None,
        false,
        Some(1),
        &now,
    );
    let c = conditions::find(&st.conditions, GANG_SCHEDULED).unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "JobSuspended")
    );
    assert_eq!(
        conditions::find(&st.conditions, SUSPENDED).unwrap().reason,
        "JobSuspended"
    );

    // A finished job keeps what its group last said.
    let mut prev = base(JobPhase::Running);
    prev.conditions.extend(conditions::merge(
        &[],
        &[Cond::new(GANG_SCHEDULED, true, "GroupPlaced", "placed")],
        Some(1),
        &now,
    ));
    let mut st = base(JobPhase::Succeeded);
    status(&mut st, &prev, None, false, Some(1), &now);
    assert_eq!(
        conditions::find(&st.conditions, GANG_SCHEDULED)
            .unwrap()
            .reason,
        "GroupPlaced"
    );
}
