//! Property tests: any spec the CRD schema accepts (OpenAPI and CEL, checked as the API server does)
//! builds without panicking, and its status functions do not panic either.

use proptest::prelude::*;
use serde_json::{json, Value};

use crate::api::meta::Owner;
use crate::schema_check::errors;

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

/// Accepted specs seen by the Notebook property; asserted non-trivial so the property is not vacuous.
#[test]
fn notebook_specs_accepted_by_the_schema_build() {
    use crate::notebook::{build::build, status, Notebook};
    let accepted = std::cell::Cell::new(0u32);
    let refused = std::cell::Cell::new(0u32);
    let strategy = (
        workload(),
        proptest::option::of(0i32..70000),
        proptest::option::of((quantity(), proptest::option::of(path()))),
        any::<Option<bool>>(),
    );
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    });
    runner
        .run(&strategy, |(w, port, ws, suspend)| {
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
            let obj = object("Notebook", "alice", merge(w, extra));
            if !errors("Notebook", &obj).is_empty() {
                refused.set(refused.get() + 1);
                return Ok(());
            }
            accepted.set(accepted.get() + 1);
            let nb: Notebook = serde_json::from_value(obj).expect("accepted spec deserializes");
            let owner = Owner::of(&nb).expect("owner");
            let _ = build(&nb, &owner, "token");
            let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            );
            let _ = status::status(&nb, &owner, &status::Observed::default(), &now);
            Ok(())
        })
        .unwrap();
    let (accepted, refused) = (accepted.get(), refused.get());
    assert!(
        accepted > 20 && refused > 20,
        "accepted {accepted}, refused {refused}: the generator must hit both sides"
    );
}

/// Runs `cases` generated objects of `kind` through the schema; every accepted one goes to `check`.
fn accepted_objects(
    kind: &str,
    cases: u32,
    strategy: impl Strategy<Value = Value>,
    check: impl Fn(Value),
) {
    let accepted = std::cell::Cell::new(0u32);
    let refused = std::cell::Cell::new(0u32);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        ..ProptestConfig::default()
    });
    runner
        .run(&strategy, |obj| {
            let errs = errors(kind, &obj);
            if std::env::var("PROPTEST_SHOW").is_ok() && !errs.is_empty() {
                eprintln!("refused: {errs:?}");
            }
            if errs.is_empty() {
                accepted.set(accepted.get() + 1);
                check(obj);
            } else {
                refused.set(refused.get() + 1);
            }
            Ok(())
        })
        .unwrap();
    let (accepted, refused) = (accepted.get(), refused.get());
    assert!(
        accepted > 20 && refused > 20,
        "{kind}: accepted {accepted}, refused {refused}: the generator must hit both sides"
    );
}

#[test]
fn trainingjob_specs_accepted_by_the_schema_build() {
    use crate::trainingjob::{build::build, TrainingJob};
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
    let strategy = (workload(), -1i32..12, framework, policy, clean, proptest::option::of(-1i64..100), any::<Option<bool>>(), proptest::option::of("[a-z]{1,8}"))
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
        });
    accepted_objects("TrainingJob", 256, strategy, |obj| {
        let job: TrainingJob = serde_json::from_value(obj).expect("accepted spec deserializes");
        let owner = Owner::of(&job).expect("owner");
        let _ = build(&job, &owner);
    });
}

#[test]
fn modeldeployment_specs_accepted_by_the_schema_build() {
    use crate::modeldeployment::{build::build, ModelDeployment};
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
    )
        .prop_map(|(w, name, weight, replicas, uri)| {
            let mut extra = json!({"name": name, "weight": weight});
            if let Some(r) = replicas {
                extra["replicas"] = json!(r);
            }
            if let Some(u) = uri {
                extra["model"] = json!({"uri": u});
            }
            merge(w, extra)
        });
    let router = prop_oneof![3 => Just("Builtin"), 3 => Just("GatewayAPI"), 3 => Just("None"), 1 => Just("Istio")];
    let strategy = (
        proptest::collection::vec(variant, 1..3),
        router,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(mut vs, router, sticky, mirror, gateway)| {
            // Make the weights sum to 100 most of the time, so the generator reaches the builder.
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
            object(
                "ModelDeployment",
                "md",
                json!({"variants": vs, "traffic": traffic}),
            )
        });
    accepted_objects("ModelDeployment", 768, strategy, |obj| {
        let md: ModelDeployment = serde_json::from_value(obj).expect("accepted spec deserializes");
        let owner = Owner::of(&md).expect("owner");
        let _ = build(&md, &owner, "keelson:test");
    });
}
