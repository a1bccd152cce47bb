//! Property tests: any spec the CRD schema accepts (OpenAPI and CEL, checked as the API server does)
//! builds without panicking, and its status functions do not panic either. The specs come from
//! `keelson_testkit::testgen`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use serde_json::Value;

use keelson_api::meta::Owner;
use keelson_testkit::schema_check::errors;
use keelson_testkit::testgen;

/// Runs `cases` generated objects of `kind` through the schema; every accepted one goes to `check`.
/// Both sides must be hit, so that the property is not vacuous.
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
fn notebook_specs_accepted_by_the_schema_build() {
    use keelson_operator::notebook::{
        build::{build, BuildCtx},
        status, Notebook,
    };
    accepted_objects("Notebook", 256, testgen::notebook(), |obj| {
        let nb: Notebook = serde_json::from_value(obj).expect("accepted spec deserializes");
        let owner = Owner::of(&nb).expect("owner");
        let ctx = BuildCtx {
            token: "token",
            operator_namespace: Some("keelson-system"),
        };
        let _ = build(&nb, &owner, &ctx);
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        );
        let _ = status::status(&nb, &owner, &status::Observed::default(), &now);
    });
}

#[test]
fn trainingjob_specs_accepted_by_the_schema_build() {
    use keelson_operator::trainingjob::{build::build, TrainingJob};
    accepted_objects("TrainingJob", 256, testgen::trainingjob(), |obj| {
        let job: TrainingJob = serde_json::from_value(obj).expect("accepted spec deserializes");
        let owner = Owner::of(&job).expect("owner");
        let _ = build(&job, &owner);
    });
}

#[test]
fn modeldeployment_specs_accepted_by_the_schema_build() {
    use keelson_operator::modeldeployment::{build::build, rollout, ModelDeployment};
    accepted_objects("ModelDeployment", 768, testgen::modeldeployment(), |obj| {
        let md: ModelDeployment = serde_json::from_value(obj).expect("accepted spec deserializes");
        let owner = Owner::of(&md).expect("owner");
        // With no variant ready, and with every variant ready (the traffic gate's two ends).
        let _ = build(
            &md,
            &owner,
            "keelson:test",
            None,
            &Default::default(),
            "key",
        );
        let all = md
            .spec
            .variants
            .iter()
            .map(|v| (v.name.clone(), 1))
            .collect();
        let _ = build(&md, &owner, "keelson:test", None, &all, "key");
        // A rollout at each of its ends: just begun, and rolled back.
        if let Some(r) = rollout::rolling(&md) {
            let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            );
            let failing = rollout::Signal::Due(rollout::Measurement {
                requests: 1000,
                failures: 1000,
                ..Default::default()
            });
            for signal in [rollout::Signal::Off, failing] {
                let d = rollout::decide(&r, None, true, &signal, &now);
                let weights = rollout::weights(&md, Some(&d.status));
                assert_eq!(weights.iter().sum::<i32>(), 100, "{weights:?}");
                let _ = build(&md, &owner, "keelson:test", Some(&d.status), &all, "key");
            }
        }
    });
}
