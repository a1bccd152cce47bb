//! Generators of random Notebook, TrainingJob and ModelDeployment objects (proptest strategies), some
//! of them invalid on purpose so that the schema has something to refuse.
//!
//! Compiled for the unit tests (`src/proptests.rs` checks every spec that the schema accepts against
//! the builders) and, through the `testgen` feature, for the integration tests
//! (`tests/random_specs.rs` applies them to the API server and runs the operator on what it accepts).
//! Not part of the operator.

use proptest::prelude::*;
use serde_json::{json, Value};

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a".to_string()),
        "[a-z][a-z0-9-]{0,8}[a-z0-9]",
        "[A-Za-z_ .]{1,5}"
    ]
}

fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("/data".to_string()),
        "/[a-z]{1,6}(/[a-z]{1,4})?",
        "[a-z]{1,4}"
    ]
}

fn quantity() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("1Gi".to_string()),
        "[0-9]{1,3}(m|Mi|Gi|k)?",
        Just("x".to_string())
    ]
}

fn volume() -> impl Strategy<Value = Value> {
    (name(), path(), any::<Option<bool>>(), 0usize..9, proptest::option::of("[a-z]{1,6}")).prop_map(|(n, p, ro, src, sub)| {
        let mut v = json!({"name": n, "mountPath": p});
        if let Some(ro) = ro {
            v["readOnly"] = json!(ro);
        }
        if let Some(s) = sub {
            v["subPath"] = json!(s);
        }
        match src {
            0 => v["persistentVolumeClaim"] = json!({"claimName": "data", "readOnly": true}),
            1 => v["nfs"] = json!({"server": "nfs.example.internal", "path": "/exports"}),
            2 => v["hostPath"] = json!({"path": "/mapr/cluster1", "type": "Directory"}),
            3 => v["csi"] = json!({"driver": "fabric.csi.example.com", "volumeAttributes": {"volume": "v1"}}),
            4 => v["emptyDir"] = json!({}),
            5 => v["configMap"] = json!({"name": "cfg"}),
            6 => v["secret"] = json!({"secretName": "s"}),
            7 => {
                v["emptyDir"] = json!({});
                v["nfs"] = json!({"server": "s", "path": "/p"});
            }
            _ => {}
        }
        v
    })
}

/// The shared workload pieces, sometimes invalid on purpose (the schema must refuse those).
pub fn workload() -> impl Strategy<Value = Value> {
    (
        prop_oneof![4 => Just("img:1".to_string()), 1 => Just(String::new()), 4 => "[a-z./:0-9]{1,20}"],
        proptest::option::of((-2i32..10, proptest::option::of(prop_oneof![Just("nvidia.com/gpu".to_string()), Just("amd.com/gpu".to_string())]), proptest::option::of("[A-Z0-9-]{1,12}"))),
        proptest::collection::vec(volume(), 0..3),
        proptest::collection::vec(("[A-Z_]{1,6}", "[a-z0-9]{0,6}"), 0..4),
        proptest::option::of((quantity(), quantity())),
        any::<bool>(),
    )
        .prop_map(|(image, gpus, volumes, env, res, template)| {
            let mut w = json!({"image": image});
            if let Some((count, resource, product)) = gpus {
                let mut g = json!({"count": count});
                if let Some(r) = resource {
                    g["resource"] = json!(r);
                }
                if let Some(p) = product {
                    g["product"] = json!(p);
                }
                w["gpus"] = g;
            }
            if !volumes.is_empty() {
                w["volumes"] = json!(volumes);
            }
            if !env.is_empty() {
                w["env"] = json!(env.into_iter().map(|(n, v)| json!({"name": n, "value": v})).collect::<Vec<_>>());
            }
            if let Some((cpu, mem)) = res {
                w["resources"] = json!({"requests": {"cpu": cpu, "memory": mem}, "limits": {"memory": mem}});
            }
            if template {
                w["template"] = json!({"metadata": {"labels": {"team": "a"}}, "spec": {"containers": [{"name": "sidecar", "image": "proxy"}], "securityContext": {"runAsNonRoot": true}}});
            }
            w
        })
}

/// Wraps a spec into an object as the API server returns it.
pub fn object(kind: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "keelson.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": "ns", "uid": "uid-1", "generation": 1},
        "spec": spec,
    })
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

/// Notebook objects (named `alice`).
pub fn notebook() -> impl Strategy<Value = Value> {
    (
        workload(),
        proptest::option::of(0i32..70000),
        proptest::option::of((quantity(), proptest::option::of(path()))),
        any::<Option<bool>>(),
    )
        .prop_map(|(w, port, ws, suspend)| {
            let mut extra = json!({});
            if let Some(p) = port {
                extra["port"] = json!(p);
            }
            if let Some((size, mount)) = ws {
                extra["workspace"] = json!({"size": size});
                if let Some(m) = mount {
                    extra["workspace"]["mountPath"] = json!(m);
                }
            }
            if let Some(s) = suspend {
                extra["suspend"] = json!(s);
            }
            object("Notebook", "alice", merge(w, extra))
        })
}

/// TrainingJob objects (named `job`).
pub fn trainingjob() -> impl Strategy<Value = Value> {
    let framework = prop_oneof![
        Just("PyTorch"),
        Just("TensorFlow"),
        Just("JAX"),
        Just("Generic"),
        Just("Torch")
    ];
    let policy = prop_oneof![
        Just("OnFailure"),
        Just("Never"),
        Just("ExitCode"),
        Just("Always")
    ];
    let clean = prop_oneof![Just("Running"), Just("All"), Just("None")];
    (workload(), -1i32..12, framework, policy, clean, proptest::option::of(-1i64..100), any::<Option<bool>>(), proptest::option::of("[a-z]{1,8}"))
        .prop_map(|(w, workers, fw, rp, cp, deadline, suspend, queue)| {
            let mut extra = json!({"workers": workers, "framework": fw, "runPolicy": {"restartPolicy": rp, "cleanPodPolicy": cp}});
            if let Some(d) = deadline {
                extra["runPolicy"]["activeDeadlineSeconds"] = json!(d);
            }
            if let Some(s) = suspend {
                extra["suspend"] = json!(s);
            }
            if let Some(q) = queue {
                extra["scheduling"] = json!({"queue": q, "priorityClassName": "high"});
            }
            object("TrainingJob", "job", merge(w, extra))
        })
}

/// ModelDeployment objects (named `md`); the variants' weights sum to 100 most of the time, so
/// that many of them reach the builder.
pub fn modeldeployment() -> impl Strategy<Value = Value> {
    let variant = (
        workload(),
        prop_oneof![
            Just("champion".to_string()),
            Just("router".to_string()),
            "[a-z]{1,6}"
        ],
        0i32..=101,
        proptest::option::of(-1i32..4),
        proptest::option::of(prop_oneof![
            Just("pvc://models/fraud/v7".to_string()),
            Just("pvc://models/../x".to_string()),
            Just("s3://bucket/m".to_string()),
            "pvc://[a-z]{1,5}(/[a-z0-9]{1,4}){0,2}"
        ]),
        // Readiness: none, httpGet, grpc, or both (refused).
        prop_oneof![4 => Just(0u8), 2 => Just(1u8), 2 => Just(2u8), 1 => Just(3u8)],
    )
        .prop_map(|(w, name, weight, replicas, uri, readiness)| {
            let mut extra = json!({"name": name, "weight": weight});
            if readiness & 1 != 0 {
                extra["readiness"]["httpGet"] = json!({"path": "/v2/health/ready"});
            }
            if readiness & 2 != 0 {
                extra["readiness"]["grpc"] = json!({"service": "fraud.v1.Scorer"});
            }
            if let Some(r) = replicas {
                extra["replicas"] = json!(r);
            }
            if let Some(u) = uri {
                extra["model"] = json!({"uri": u});
            }
            merge(w, extra)
        });
    let router = prop_oneof![3 => Just("Builtin"), 3 => Just("GatewayAPI"), 3 => Just("None"), 1 => Just("Istio")];
    let protocol = prop_oneof![6 => Just(None), 3 => Just(Some("HTTP")), 5 => Just(Some("GRPC")), 1 => Just(Some("gRPC"))];
    (
        proptest::collection::vec(variant, 1..3),
        router,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        protocol,
        // Most specs keep readiness checks and the mirror within what the protocol allows, so that
        // the refusals of mismatches do not crowd out the specs that reach the builder.
        prop_oneof![9 => Just(true), 1 => Just(false)],
        // A rollout on the last variant: none, by pauses, analysed, steps that do not increase,
        // thresholds out of range, or one on every variant.
        prop_oneof![4 => Just(0u8), 3 => Just(1u8), 3 => Just(2u8), 1 => Just(3u8), 1 => Just(4u8), 1 => Just(5u8)],
    )
        .prop_map(
            |(mut vs, router, sticky, mirror, gateway, protocol, coherent, rollout)| {
                let grpc = protocol == Some("GRPC");
                if coherent {
                    for v in vs.iter_mut() {
                        if let Some(r) = v.get_mut("readiness").and_then(Value::as_object_mut) {
                            let check = if grpc {
                                ("grpc", json!({"service": "fraud.v1.Scorer"}))
                            } else {
                                ("httpGet", json!({"path": "/v2/health/ready"}))
                            };
                            r.clear();
                            r.insert(check.0.to_string(), check.1);
                        }
                    }
                }
                let mirror = mirror && !(coherent && grpc && router != "GatewayAPI");
                if !sticky {
                    let n = vs.len() as i64;
                    for (i, v) in vs.iter_mut().enumerate() {
                        v["weight"] = json!(if i == 0 {
                            100 - (n - 1) * (100 / n)
                        } else {
                            100 / n
                        });
                        if i > 0 {
                            v["name"] = json!(format!("v{i}"));
                        }
                    }
                }
                let n = vs.len();
                // The valid rollouts only where they can work, so that they reach the builder.
                let rollout = match rollout {
                    1 if coherent && (n < 2 || !["Builtin", "GatewayAPI"].contains(&router)) => 0,
                    2 if coherent && (n < 2 || router != "Builtin") => 0,
                    r => r,
                };
                for (i, v) in vs.iter_mut().enumerate() {
                    let step = v["weight"].as_i64().unwrap_or(1).clamp(1, 100);
                    let steps = if step > 1 {
                        json!([{"weight": 1, "pauseSeconds": 30}, {"weight": step}])
                    } else {
                        json!([{"weight": 1}])
                    };
                    v["rollout"] = match (rollout, i + 1 == n) {
                        (1, true) | (5, _) => json!({"steps": steps}),
                        (2, true) => json!({
                            "steps": steps,
                            "analysis": {"maxErrorRatio": 0.01, "maxLatencyRatio": 2, "windowSeconds": 30, "minRequests": 10}
                        }),
                        (3, true) => json!({"steps": [{"weight": step}, {"weight": step}]}),
                        (4, true) => json!({
                            "steps": [{"weight": step}],
                            "analysis": {"maxErrorRatio": 1.5, "maxLatencyRatio": 0.5}
                        }),
                        _ => continue,
                    };
                }
                let first = vs[0]["name"].clone();
                let mut traffic = json!({"router": router});
                if sticky {
                    traffic["stickyHeader"] = json!("x-user-id");
                }
                if mirror {
                    traffic["mirror"] = json!({"variant": first, "percent": 10});
                }
                if gateway {
                    traffic["gateway"] =
                        json!({"parentRefs": [{"name": "public", "namespace": "infra"}]});
                }
                let mut spec = json!({"variants": vs, "traffic": traffic});
                if let Some(p) = protocol {
                    spec["protocol"] = json!(p);
                }
                object("ModelDeployment", "md", spec)
            },
        )
}
