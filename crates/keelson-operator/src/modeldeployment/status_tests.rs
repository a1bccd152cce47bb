//! Tests of the ModelDeployment status: effective weights, readiness and conditions from observed children.

use super::*;
use crate::modeldeployment::build::tests::{ab, build, md, variant, IMAGE, TEST_KEY};
use crate::modeldeployment::build::Children;
use crate::modeldeployment::traffic::Traffic;
use gateway_api::httproutes::{
    HttpRouteStatus, HttpRouteStatusParents, HttpRouteStatusParentsParentRef,
};
use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use keelson_api::meta::Owner;
use keelson_api::modeldeployment::{GatewayAttachment, Mirror, ParentRef, Traffic as TrafficSpec};

fn now() -> Time {
    Time(Timestamp::from_second(1_700_000_000).unwrap())
}

/// A Deployment as the Deployment controller reports it: `ready` of `want` pods, all updated.
fn deploy(name: &str, want: i32, ready: i32) -> Deployment {
    let mut d = Deployment::default();
    d.metadata.name = Some(name.into());
    d.metadata.generation = Some(1);
    d.spec = Some(k8s_openapi::api::apps::v1::DeploymentSpec {
        replicas: Some(want),
        ..Default::default()
    });
    d.status = Some(DeploymentStatus {
        observed_generation: Some(1),
        replicas: Some(want),
        updated_replicas: Some(want),
        ready_replicas: Some(ready),
        available_replicas: Some(ready),
        ..DeploymentStatus::default()
    });
    d
}

fn stuck(name: &str) -> Deployment {
    let mut d = deploy(name, 1, 0);
    d.status.as_mut().unwrap().conditions = Some(vec![DeploymentCondition {
        type_: "Progressing".into(),
        status: "False".into(),
        reason: Some("ProgressDeadlineExceeded".into()),
        message: Some("ReplicaSet \"x\" has timed out progressing.".into()),
        ..DeploymentCondition::default()
    }]);
    d
}

fn children(m: &ModelDeployment, o: &Owner) -> Children {
    build(m, o, IMAGE).unwrap()
}

fn cm_with(m: &ModelDeployment, champion: u32) -> ConfigMap {
    let mut cfg = router_config(m, "fraud", "team-a", &[90, 10]);
    cfg.variants[0].weight = champion;
    cfg.variants[1].weight = 100 - champion;
    ConfigMap {
        data: Some([(ROUTER_CONFIG_KEY.to_string(), cfg.to_json().unwrap())].into()),
        ..ConfigMap::default()
    }
}

fn gateway(m: &mut ModelDeployment) {
    m.spec.traffic = Some(TrafficSpec {
        router: Some(RouterKind::GatewayApi),
        mirror: Some(Mirror {
            variant: "challenger".into(),
            percent: Some(50),
        }),
        gateway: Some(GatewayAttachment {
            parent_refs: vec![ParentRef {
                name: "public".into(),
                ..ParentRef::default()
            }],
        }),
        ..TrafficSpec::default()
    });
}

fn route_of(c: &Children) -> HttpRoute {
    match &c.traffic {
        Traffic::GatewayApi { route } => (**route).clone(),
        other => panic!("not GatewayAPI: {other:?}"),
    }
}

fn healthy() -> Vec<Deployment> {
    vec![
        deploy("fraud-champion", 2, 2),
        deploy("fraud-challenger", 1, 1),
        deploy("fraud-router", 1, 1),
    ]
}

#[test]
fn builtin_status_table() {
    let (m, o) = md(ab(), None);
    let cm = children(&m, &o).config_map().cloned();
    let mut rolling = deploy("fraud-champion", 2, 2);
    rolling.status.as_mut().unwrap().updated_replicas = Some(1);
    struct Case {
        name: &'static str,
        deployments: Vec<Deployment>,
        config: Option<ConfigMap>,
        ready: (bool, &'static str),
        progressing: (bool, &'static str),
        weights: [i32; 2],
        ready_col: &'static str,
    }
    let cases = vec![
        Case {
            name: "nothing yet",
            deployments: vec![],
            config: None,
            ready: (false, "VariantsNotReady"),
            progressing: (true, "RolloutInProgress"),
            weights: [0, 0],
            ready_col: "0/3",
        },
        Case {
            name: "models ready, router not",
            deployments: vec![
                deploy("fraud-champion", 2, 2),
                deploy("fraud-challenger", 1, 1),
                deploy("fraud-router", 1, 0),
            ],
            config: cm.clone(),
            ready: (false, "RouterNotReady"),
            progressing: (true, "RolloutInProgress"),
            weights: [90, 10],
            ready_col: "3/3",
        },
        Case {
            name: "all ready, weights applied",
            deployments: healthy(),
            config: cm.clone(),
            ready: (true, "VariantsReady"),
            progressing: (false, "WeightsApplied"),
            weights: [90, 10],
            ready_col: "3/3",
        },
        Case {
            name: "old weights still in the ConfigMap",
            deployments: healthy(),
            config: Some(cm_with(&m, 50)),
            ready: (true, "VariantsReady"),
            progressing: (true, "WeightsPending"),
            weights: [50, 50],
            ready_col: "3/3",
        },
        Case {
            name: "a variant is rolling out",
            deployments: vec![
                rolling,
                deploy("fraud-challenger", 1, 1),
                deploy("fraud-router", 1, 1),
            ],
            config: cm.clone(),
            ready: (true, "VariantsReady"),
            progressing: (true, "RolloutInProgress"),
            weights: [90, 10],
            ready_col: "3/3",
        },
        Case {
            name: "a variant is stuck",
            deployments: vec![
                deploy("fraud-champion", 2, 2),
                stuck("fraud-challenger"),
                deploy("fraud-router", 1, 1),
            ],
            config: cm.clone(),
            ready: (false, "ProgressDeadlineExceeded"),
            progressing: (false, "ProgressDeadlineExceeded"),
            weights: [90, 10],
            ready_col: "2/3",
        },
    ];
    for c in cases {
        let obs = Observed {
            deployments: c.deployments,
            config: c.config,
            ..Observed::default()
        };
        let s = status(&m, &obs, &now());
        let r = conditions::find(&s.conditions, READY).unwrap();
        let p = conditions::find(&s.conditions, PROGRESSING).unwrap();
        assert_eq!(
            (r.status == "True", r.reason.as_str()),
            c.ready,
            "{}",
            c.name
        );
        assert_eq!(
            (p.status == "True", p.reason.as_str()),
            c.progressing,
            "{}",
            c.name
        );
        let w: Vec<i32> = s.variants.iter().map(|v| v.weight).collect();
        assert_eq!(w, c.weights, "{}", c.name);
        assert_eq!(s.ready.as_deref(), Some(c.ready_col), "{}", c.name);
        assert_eq!(
            s.traffic,
            Some(format!(
                "champion={},challenger={}",
                c.weights[0], c.weights[1]
            )),
            "{}",
            c.name
        );
        assert_eq!(s.observed_generation, Some(4));
        assert_eq!(
            s.url.as_deref(),
            Some("http://fraud.team-a.svc.cluster.local/")
        );
        assert_eq!(r.observed_generation, Some(4));
    }
}

#[test]
fn variant_status_reports_replicas_and_ready_replicas() {
    let (m, o) = md(ab(), None);
    let obs = Observed {
        deployments: vec![
            deploy("fraud-champion", 2, 1),
            deploy("fraud-challenger", 1, 0),
            deploy("fraud-router", 1, 1),
        ],
        config: children(&m, &o).config_map().cloned(),
        ..Observed::default()
    };
    let s = status(&m, &obs, &now());
    assert_eq!(
        s.variants,
        vec![
            VariantStatus {
                name: "champion".into(),
                replicas: 2,
                ready_replicas: 1,
                desired_weight: 90,
                weight: 90
            },
            VariantStatus {
                name: "challenger".into(),
                replicas: 1,
                ready_replicas: 0,
                desired_weight: 10,
                weight: 10
            },
        ]
    );
    let r = conditions::find(&s.conditions, READY).unwrap();
    assert_eq!(r.reason, "VariantsNotReady");
    assert!(r.message.contains("champion: 1/2 ready"), "{}", r.message);
    assert!(r.message.contains("challenger: 0/1 ready"), "{}", r.message);
    assert_eq!(s.ready.as_deref(), Some("1/3"));
}

#[test]
fn gateway_api_weights_come_from_the_route() {
    let (mut m, o) = md(ab(), None);
    gateway(&mut m);
    let route = route_of(&children(&m, &o));
    let models = || {
        vec![
            deploy("fraud-champion", 2, 2),
            deploy("fraud-challenger", 1, 1),
        ]
    };

    let s = status(
        &m,
        &Observed {
            deployments: models(),
            route: Some(route.clone()),
            ..Observed::default()
        },
        &now(),
    );
    assert_eq!(s.traffic.as_deref(), Some("champion=90,challenger=10"));
    assert!(conditions::is_true(&s.conditions, READY));
    let p = conditions::find(&s.conditions, PROGRESSING).unwrap();
    assert_eq!(
        (p.status.as_str(), p.reason.as_str()),
        ("False", "WeightsApplied")
    );

    // A route with other weights (someone edited it, or it is not read back yet).
    let mut old = route.clone();
    for b in old.spec.rules.as_mut().unwrap()[0]
        .backend_refs
        .as_mut()
        .unwrap()
    {
        b.weight = Some(50);
    }
    let s = status(
        &m,
        &Observed {
            deployments: models(),
            route: Some(old),
            ..Observed::default()
        },
        &now(),
    );
    assert_eq!(s.traffic.as_deref(), Some("champion=50,challenger=50"));
    assert_eq!(
        conditions::find(&s.conditions, PROGRESSING).unwrap().reason,
        "WeightsPending"
    );

    // Server defaults on the route do not count as a difference.
    let mut defaulted = route.clone();
    for b in defaulted.spec.rules.as_mut().unwrap()[0]
        .backend_refs
        .as_mut()
        .unwrap()
    {
        b.kind = Some("Service".into());
        b.group = Some(String::new());
    }
    let s = status(
        &m,
        &Observed {
            deployments: models(),
            route: Some(defaulted),
            ..Observed::default()
        },
        &now(),
    );
    assert_eq!(
        conditions::find(&s.conditions, PROGRESSING).unwrap().reason,
        "WeightsApplied"
    );

    // A Gateway refusing the route.
    let mut refused = route;
    refused.status = Some(HttpRouteStatus {
        parents: vec![HttpRouteStatusParents {
            conditions: vec![Condition {
                type_: "Accepted".into(),
                status: "False".into(),
                reason: "NotAllowedByListeners".into(),
                message: "namespace not allowed".into(),
                last_transition_time: now(),
                observed_generation: None,
            }],
            controller_name: "example.com/gateway".into(),
            parent_ref: HttpRouteStatusParentsParentRef {
                name: "public".into(),
                ..Default::default()
            },
        }],
    });
    let s = status(
        &m,
        &Observed {
            deployments: models(),
            route: Some(refused),
            ..Observed::default()
        },
        &now(),
    );
    let r = conditions::find(&s.conditions, READY).unwrap();
    assert_eq!(
        (r.status.as_str(), r.reason.as_str()),
        ("False", "RouteNotAccepted")
    );
    assert!(r.message.contains("NotAllowedByListeners"));
}

#[test]
fn gateway_api_missing_is_reported_not_retried_hot() {
    let (mut m, _) = md(ab(), None);
    gateway(&mut m);
    let s = status(
        &m,
        &Observed {
            deployments: vec![
                deploy("fraud-champion", 2, 2),
                deploy("fraud-challenger", 1, 1),
            ],
            gateway_api_missing: true,
            ..Observed::default()
        },
        &now(),
    );
    for t in [READY, PROGRESSING] {
        let c = conditions::find(&s.conditions, t).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "GatewayAPIMissing")
        );
        assert!(c.message.contains("install") && c.message.contains("Builtin or None"));
    }
    assert_eq!(s.traffic.as_deref(), Some("champion=0,challenger=0"));
}

#[test]
fn none_mode_weights_follow_ready_pods() {
    let (m, _) = md(ab(), Some(RouterKind::None));
    for (ready, weights, reason, progressing) in [
        ([2, 1], [67, 33], "VariantsReady", "RolloutComplete"),
        ([1, 1], [50, 50], "VariantsNotReady", "RolloutInProgress"),
        ([0, 0], [0, 0], "VariantsNotReady", "RolloutInProgress"),
    ] {
        let s = status(
            &m,
            &Observed {
                deployments: vec![
                    deploy("fraud-champion", 2, ready[0]),
                    deploy("fraud-challenger", 1, ready[1]),
                ],
                ..Observed::default()
            },
            &now(),
        );
        let w: Vec<i32> = s.variants.iter().map(|v| v.weight).collect();
        assert_eq!(w, weights);
        assert_eq!(
            conditions::find(&s.conditions, READY).unwrap().reason,
            reason
        );
        assert_eq!(
            conditions::find(&s.conditions, PROGRESSING).unwrap().reason,
            progressing
        );
    }
}

#[test]
fn rollouts() {
    assert_eq!(rollout(None), Rollout::Missing);
    assert_eq!(rollout(Some(&deploy("d", 2, 2))), Rollout::Done);
    let mut d = deploy("d", 2, 2);
    d.metadata.generation = Some(2);
    assert!(matches!(rollout(Some(&d)), Rollout::InProgress(_)));
    let mut d = deploy("d", 2, 2);
    d.status.as_mut().unwrap().replicas = Some(3);
    assert_eq!(
        rollout(Some(&d)),
        Rollout::InProgress("1 old pods terminating".into())
    );
    let mut d = deploy("d", 2, 1);
    d.status.as_mut().unwrap().available_replicas = Some(1);
    assert!(matches!(rollout(Some(&d)), Rollout::InProgress(_)));
    assert!(
        matches!(rollout(Some(&stuck("d"))), Rollout::Failed(r, _) if r == "ProgressDeadlineExceeded")
    );
}

#[test]
fn unchanged_world_gives_identical_status() {
    let (mut m, o) = md(ab(), None);
    let obs = Observed {
        deployments: healthy(),
        config: children(&m, &o).config_map().cloned(),
        ..Observed::default()
    };
    let first = status(&m, &obs, &now());
    m.status = Some(first.clone());
    let later = Time(Timestamp::from_second(1_800_000_000).unwrap());
    assert_eq!(status(&m, &obs, &later), first);
    // A flip moves only the flipped condition's transition time.
    let obs2 = Observed {
        config: Some(cm_with(&m, 50)),
        ..obs
    };
    let second = status(&m, &obs2, &later);
    let p = conditions::find(&second.conditions, PROGRESSING).unwrap();
    assert_eq!(
        (p.status.as_str(), p.last_transition_time.clone()),
        ("True", later)
    );
    let r = conditions::find(&second.conditions, READY).unwrap();
    assert_eq!(
        (r.status.as_str(), r.last_transition_time.clone()),
        ("True", now())
    );
}

#[test]
fn invalid_spec_keeps_the_rest_of_the_status() {
    let (mut m, o) = md(ab(), None);
    let obs = Observed {
        deployments: healthy(),
        config: children(&m, &o).config_map().cloned(),
        ..Observed::default()
    };
    m.status = Some(status(&m, &obs, &now()));
    m.metadata.generation = Some(5);
    let err = BuildError::new("InvalidModelUri", "spec.variants[0].model.uri", "bad");
    let s = invalid(&m, &err, &now());
    assert_eq!(s.observed_generation, Some(5));
    assert_eq!(s.traffic.as_deref(), Some("champion=90,challenger=10"));
    let r = conditions::find(&s.conditions, READY).unwrap();
    assert_eq!(
        (r.status.as_str(), r.reason.as_str()),
        ("False", "InvalidModelUri")
    );
    assert!(r.message.contains("spec.variants[0].model.uri"));
}

/// The children as the reconciler builds them, with the ready pods the observed Deployments report.
fn gated_children(m: &ModelDeployment, o: &Owner, deployments: &[Deployment]) -> Children {
    let ready = crate::modeldeployment::gate::ready_pods(m, |n| {
        deployments
            .iter()
            .find(|d| d.metadata.name.as_deref() == Some(n))
            .and_then(|d| d.status.as_ref()?.ready_replicas)
    });
    crate::modeldeployment::build::build(m, o, IMAGE, None, &ready, TEST_KEY).unwrap()
}

#[test]
fn a_variant_without_ready_pods_gets_no_traffic_and_the_status_says_so() {
    // Scaled to 0: no ready pod, and no rollout under way either.
    let mut vs = ab();
    vs[1].replicas = Some(0);
    let (m, o) = md(vs, None);
    let deployments = vec![
        deploy("fraud-champion", 2, 2),
        deploy("fraud-challenger", 0, 0),
        deploy("fraud-router", 1, 1),
    ];
    let c = gated_children(&m, &o, &deployments);
    let cfg = c.config_map().cloned();
    let obs = Observed {
        deployments,
        config: cfg,
        ..Observed::default()
    };
    let s = status(&m, &obs, &now());
    let w: Vec<_> = s
        .variants
        .iter()
        .map(|v| (v.desired_weight, v.weight))
        .collect();
    assert_eq!(w, [(90, 100), (10, 0)]);
    assert_eq!(s.traffic.as_deref(), Some("champion=100,challenger=0"));
    let d = conditions::find(&s.conditions, TRAFFIC_DEGRADED).unwrap();
    assert_eq!(
        (d.status.as_str(), d.reason.as_str()),
        ("True", "VariantNotReady")
    );
    assert!(
        d.message.contains("no ready pod in challenger"),
        "{}",
        d.message
    );
    assert!(
        d.message.contains("instead of champion=90,challenger=10"),
        "{}",
        d.message
    );
    // The router config carries the gated split: the weights are in effect, nothing pending.
    let p = conditions::find(&s.conditions, PROGRESSING).unwrap();
    assert_eq!(p.reason, "WeightsApplied");

    // A config that still carries the spec's split is not in effect yet.
    let stale = Observed {
        config: children(&m, &o).config_map().cloned(),
        ..obs.clone()
    };
    let s = status(&m, &stale, &now());
    assert_eq!(
        conditions::find(&s.conditions, PROGRESSING).unwrap().reason,
        "WeightsPending"
    );

    // Ready again: the spec's weights, and the condition clears.
    let (m, o) = md(ab(), None);
    let obs = Observed {
        deployments: healthy(),
        config: children(&m, &o).config_map().cloned(),
        ..Observed::default()
    };
    let s = status(&m, &obs, &now());
    let d = conditions::find(&s.conditions, TRAFFIC_DEGRADED).unwrap();
    assert_eq!(
        (d.status.as_str(), d.reason.as_str()),
        ("False", "AllVariantsServing")
    );
    assert_eq!(s.traffic.as_deref(), Some("champion=90,challenger=10"));
}

#[test]
fn no_ready_variant_keeps_the_spec_weights() {
    let (m, o) = md(ab(), None);
    let deployments = vec![
        stuck("fraud-champion"),
        deploy("fraud-challenger", 1, 0),
        deploy("fraud-router", 1, 1),
    ];
    let c = gated_children(&m, &o, &deployments);
    let obs = Observed {
        config: c.config_map().cloned(),
        deployments,
        ..Observed::default()
    };
    let s = status(&m, &obs, &now());
    assert_eq!(s.traffic.as_deref(), Some("champion=90,challenger=10"));
    let d = conditions::find(&s.conditions, TRAFFIC_DEGRADED).unwrap();
    assert_eq!(
        (d.status.as_str(), d.reason.as_str()),
        ("True", "NoVariantReady")
    );
    let r = conditions::find(&s.conditions, READY).unwrap();
    assert_eq!(r.reason, "ProgressDeadlineExceeded");
}

#[test]
fn the_http_route_is_gated_too() {
    let (mut m, o) = md(
        vec![
            variant("champion", 60, None),
            variant("challenger", 10, Some(0)),
            variant("third", 30, None),
        ],
        None,
    );
    gateway(&mut m);
    let deployments = vec![
        deploy("fraud-champion", 1, 1),
        deploy("fraud-challenger", 0, 0),
        deploy("fraud-third", 1, 1),
    ];
    let route = route_of(&gated_children(&m, &o, &deployments));
    let obs = Observed {
        deployments,
        route: Some(route),
        ..Observed::default()
    };
    let s = status(&m, &obs, &now());
    assert_eq!(
        s.traffic.as_deref(),
        Some("champion=67,challenger=0,third=33")
    );
    assert_eq!(
        conditions::find(&s.conditions, TRAFFIC_DEGRADED)
            .unwrap()
            .reason,
        "VariantNotReady"
    );
    assert_eq!(
        conditions::find(&s.conditions, PROGRESSING).unwrap().reason,
        "WeightsApplied"
    );
}

#[test]
fn an_autoscaled_variant_reports_the_autoscalers_count() {
    let mut vs = ab();
    vs[0].replicas = None;
    vs[0].autoscaling = Some(keelson_api::modeldeployment::Autoscaling {
        min_replicas: Some(2),
        max_replicas: 5,
        target_cpu_utilization: None,
    });
    let (m, o) = md(vs, None);
    let obs = Observed {
        deployments: vec![
            deploy("fraud-champion", 4, 4),
            deploy("fraud-challenger", 1, 1),
            deploy("fraud-router", 1, 1),
        ],
        config: children(&m, &o).config_map().cloned(),
        ..Observed::default()
    };
    let s = status(&m, &obs, &now());
    assert_eq!(
        (s.variants[0].replicas, s.variants[0].ready_replicas),
        (4, 4)
    );
    assert_eq!(s.ready.as_deref(), Some("5/5"));
    assert!(conditions::is_true(&s.conditions, READY));
}

#[test]
fn grpc_gateway_weights_problems_and_missing_crd_come_from_the_grpc_route() {
    use gateway_api::grpcroutes::{
        GrpcRouteStatus, GrpcRouteStatusParents, GrpcRouteStatusParentsParentRef,
    };
    use keelson_api::modeldeployment::Protocol;
    let (mut m, o) = md(ab(), None);
    gateway(&mut m);
    m.spec.protocol = Some(Protocol::Grpc);
    let route = match children(&m, &o).traffic {
        Traffic::GatewayApiGrpc { route } => *route,
        other => panic!("not a GRPCRoute: {other:?}"),
    };
    let models = || {
        vec![
            deploy("fraud-champion", 2, 2),
            deploy("fraud-challenger", 1, 1),
        ]
    };
    let observed = |route: Option<GrpcRoute>, missing: bool| Observed {
        deployments: models(),
        grpc_route: route,
        gateway_api_missing: missing,
        ..Observed::default()
    };
    let s = status(&m, &observed(Some(route.clone()), false), &now());
    assert_eq!(s.traffic.as_deref(), Some("champion=90,challenger=10"));
    assert!(conditions::is_true(&s.conditions, READY));
    assert_eq!(
        conditions::find(&s.conditions, PROGRESSING).unwrap().reason,
        "WeightsApplied"
    );

    // An HTTPRoute of the same name says nothing about a GRPC ModelDeployment.
    let s = status(
        &m,
        &Observed {
            deployments: models(),
            route: Some(HttpRoute::new("fraud", Default::default())),
            ..Observed::default()
        },
        &now(),
    );
    let p = conditions::find(&s.conditions, PROGRESSING).unwrap();
    assert_eq!(p.reason, "WeightsPending");
    assert!(p.message.contains("GRPCRoute"), "{}", p.message);

    let mut refused = route;
    refused.status = Some(GrpcRouteStatus {
        parents: vec![GrpcRouteStatusParents {
            conditions: vec![Condition {
                type_: "ResolvedRefs".into(),
                status: "False".into(),
                reason: "BackendNotFound".into(),
                message: "no such Service".into(),
                last_transition_time: now(),
                observed_generation: None,
            }],
            controller_name: "example.com/gateway".into(),
            parent_ref: GrpcRouteStatusParentsParentRef {
                name: "public".into(),
                ..Default::default()
            },
        }],
    });
    let s = status(&m, &observed(Some(refused), false), &now());
    let r = conditions::find(&s.conditions, READY).unwrap();
    assert_eq!(
        (r.status.as_str(), r.reason.as_str()),
        ("False", "RouteRefsNotResolved")
    );
    assert!(
        r.message.starts_with("GRPCRoute fraud: parent public"),
        "{}",
        r.message
    );

    let s = status(&m, &observed(None, true), &now());
    for t in [READY, PROGRESSING] {
        let c = conditions::find(&s.conditions, t).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "GatewayAPIMissing")
        );
        assert!(c.message.contains("GRPCRoute") && c.message.contains("Builtin or None"));
    }
}
