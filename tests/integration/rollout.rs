//! Progressive rollouts on the local cluster: the rollouts that cannot work are refused at
//! `kubectl apply` naming the field; a rollout judged by the router's measurements holds at its
//! step while no router pod can be read (kwok pods serve nothing), with the step in status and in
//! `kubectl get`; and a rollout without analysis walks its steps by their pauses to the end, and
//! starts over when the variant's image changes.

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use kube::Api;
use serde_json::json;

use crate::serving::config_weights;
use crate::support::*;
use keelson_api::conditions;
use keelson_api::modeldeployment::ModelDeployment;
use keelson_api::rollout::{RolloutPhase, RolloutStatus};

fn md_yaml(name: &str, traffic: &str, variants: &str) -> String {
    format!(
        "apiVersion: keelson.dev/v1alpha1\nkind: ModelDeployment\nmetadata: {{name: {name}}}\nspec:\n{traffic}  variants:\n{variants}"
    )
}

/// A stable variant at weight 0 and a canary that rolls out to 100 with `rollout`.
fn canary(name: &str, rollout: &str) -> String {
    md_yaml(
        name,
        "",
        &format!(
            "    - {{name: stable, image: stable:1, weight: 0}}\n    - {{name: canary, image: canary:1, weight: 100, rollout: {rollout}}}\n"
        ),
    )
}

async fn rollout_of(mds: &Api<ModelDeployment>, name: &str) -> Option<RolloutStatus> {
    mds.get(name).await.ok()?.status?.rollout
}

#[test]
fn rollouts_that_cannot_work_are_refused_naming_the_field() {
    let ns = Ns::new("rollout-invalid");
    let two = |rollout: &str| {
        md_yaml(
            "md",
            "",
            &format!(
                "    - {{name: a, image: i, weight: 50}}\n    - {{name: b, image: i, weight: 50, rollout: {rollout}}}\n"
            ),
        )
    };
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            two("{steps: [{weight: 25}, {weight: 10}]}"),
            vec!["spec.variants[1].rollout.steps", "strictly increase"],
        ),
        (
            two("{steps: [{weight: 10}, {weight: 10}]}"),
            vec!["spec.variants[1].rollout.steps", "strictly increase"],
        ),
        (
            two("{steps: [{weight: 0}]}"),
            vec!["spec.variants[1].rollout.steps[0].weight"],
        ),
        (
            two("{steps: [{weight: 101}]}"),
            vec!["spec.variants[1].rollout.steps[0].weight"],
        ),
        (
            two("{steps: [{weight: 60}]}"),
            vec!["rollout.steps[].weight must not exceed variants[].weight"],
        ),
        (
            two("{steps: []}"),
            vec!["spec.variants[1].rollout.steps"],
        ),
        (
            two("{steps: [{weight: 10, pauseSeconds: -1}]}"),
            vec!["spec.variants[1].rollout.steps[0].pauseSeconds"],
        ),
        (
            two("{steps: [{weight: 10}], analysis: {maxErrorRatio: 1.5}}"),
            vec!["spec.variants[1].rollout.analysis.maxErrorRatio"],
        ),
        (
            two("{steps: [{weight: 10}], analysis: {maxErrorRatio: -0.1}}"),
            vec!["spec.variants[1].rollout.analysis.maxErrorRatio"],
        ),
        (
            two("{steps: [{weight: 10}], analysis: {maxLatencyRatio: 0.5}}"),
            vec!["spec.variants[1].rollout.analysis.maxLatencyRatio"],
        ),
        (
            two("{steps: [{weight: 10}], analysis: {maxErrorRatio: 0.1, windowSeconds: 1, minRequests: 0}}"),
            vec![
                "spec.variants[1].rollout.analysis.windowSeconds",
                "spec.variants[1].rollout.analysis.minRequests",
            ],
        ),
        (
            two("{steps: [{weight: 10}], analysis: {windowSeconds: 30}}"),
            vec!["rollout.analysis.maxErrorRatio or rollout.analysis.maxLatencyRatio"],
        ),
        (
            md_yaml(
                "md",
                "",
                "    - {name: a, image: i, weight: 50, rollout: {steps: [{weight: 10}]}}\n    - {name: b, image: i, weight: 50, rollout: {steps: [{weight: 10}]}}\n",
            ),
            vec!["spec.variants", "at most one variant may roll out at a time"],
        ),
        (
            md_yaml(
                "md",
                "",
                "    - {name: a, image: i, weight: 100, rollout: {steps: [{weight: 10}]}}\n",
            ),
            vec!["spec.variants", "needs a second variant"],
        ),
        (
            md_yaml(
                "md",
                "  traffic: {router: None}\n",
                "    - {name: a, image: i, weight: 50}\n    - {name: b, image: i, weight: 50, rollout: {steps: [{weight: 10}]}}\n",
            ),
            vec!["spec.variants[].rollout", "spec.traffic.router: None"],
        ),
        (
            md_yaml(
                "md",
                "  traffic: {router: GatewayAPI}\n",
                "    - {name: a, image: i, weight: 50}\n    - {name: b, image: i, weight: 50, rollout: {steps: [{weight: 10}], analysis: {maxErrorRatio: 0.01}}}\n",
            ),
            vec!["spec.variants[].rollout.analysis", "spec.traffic.router: Builtin"],
        ),
    ];
    for (yaml, needles) in cases {
        refused(&ns, &yaml, &needles);
    }
    // The valid forms are accepted: steps by pauses through an HTTPRoute, and an analysed rollout
    // with the Builtin router.
    ns.apply(&md_yaml(
        "by-pauses",
        "  traffic: {router: GatewayAPI}\n",
        "    - {name: a, image: i, weight: 50}\n    - {name: b, image: i, weight: 50, rollout: {steps: [{weight: 10}, {weight: 50, pauseSeconds: 0}]}}\n",
    ))
    .unwrap();
    ns.apply(&two(
        "{steps: [{weight: 10, pauseSeconds: 600}, {weight: 50}], analysis: {maxErrorRatio: 0, maxLatencyRatio: 1.5, windowSeconds: 120, minRequests: 500}}",
    ))
    .unwrap();
}

#[tokio::test]
async fn a_rollout_holds_at_its_step_while_the_router_cannot_be_read() {
    operator();
    let ns = Ns::new("rollout-hold");
    let client = client().await;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    ns.apply(&canary(
        "fraud",
        "{steps: [{weight: 10, pauseSeconds: 0}, {weight: 50, pauseSeconds: 0}], analysis: {maxErrorRatio: 0.01, windowSeconds: 10, minRequests: 1}}",
    ))
    .unwrap();

    // kwok pods run nothing: no router answers, so step 1 holds at weight 10 whatever its pause.
    let st = wait_for(
        "rollout Paused MetricsUnavailable at step 1",
        Duration::from_secs(90),
        || async {
            let r = rollout_of(&mds, "fraud").await?;
            (r.phase == RolloutPhase::Paused && r.reason == "MetricsUnavailable").then_some(r)
        },
    )
    .await;
    assert_eq!(
        (st.variant.as_str(), st.step, st.steps, st.weight),
        ("canary", 1, 2, 10)
    );
    assert_eq!(st.summary, "canary 1/2 Paused");
    assert!(st.message.contains("router"), "{}", st.message);
    wait_for(
        "the router config splits stable=90,canary=10",
        Duration::from_secs(60),
        || async {
            let w = config_weights(&cms, "fraud").await?;
            (w == [("stable".to_string(), 90), ("canary".to_string(), 10)]).then_some(())
        },
    )
    .await;

    let table = ns.kubectl(&["get", "mdep", "fraud"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "READY", "TRAFFIC", "ROLLOUT", "URL", "AGE"],
        "{table}"
    );
    assert!(table.contains("canary 1/2 Paused"), "{table}");

    // No hot loop and no blind promotion: the status stays as it is while nothing changes.
    let md = wait_for("the status settles", Duration::from_secs(60), || async {
        let a = mds.get("fraud").await.ok()?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let b = mds.get("fraud").await.ok()?;
        (a.metadata.resource_version == b.metadata.resource_version
            && b.status.as_ref()?.ready.as_deref() == Some("2/2"))
        .then_some(b)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    let later = mds.get("fraud").await.unwrap();
    assert_eq!(
        later.metadata.resource_version,
        md.metadata.resource_version
    );
    let st = later.status.unwrap();
    let r = st.rollout.as_ref().unwrap();
    assert_eq!((r.step, r.phase), (1, RolloutPhase::Paused));
    // The rollout keeps Progressing True; the model pods are all Ready.
    let progressing = conditions::find(&st.conditions, "Progressing").unwrap();
    assert_eq!(
        (progressing.status.as_str(), progressing.reason.as_str()),
        ("True", "RolloutStep"),
        "{}",
        progressing.message
    );
    assert!(
        progressing.message.contains("MetricsUnavailable"),
        "{}",
        progressing.message
    );
    assert_eq!(
        conditions::find(&st.conditions, "Ready").unwrap().status,
        "True"
    );
}

#[tokio::test]
async fn a_rollout_without_analysis_walks_its_steps_and_restarts_on_a_new_image() {
    operator();
    let ns = Ns::new("rollout-walk");
    let client = client().await;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    ns.apply(&canary(
        "fraud",
        "{steps: [{weight: 20, pauseSeconds: 2}, {weight: 60, pauseSeconds: 2}]}",
    ))
    .unwrap();

    let done = |mds: Api<ModelDeployment>| async move {
        wait_for("rollout Promoted", Duration::from_secs(120), || async {
            let r = rollout_of(&mds, "fraud").await?;
            (r.phase == RolloutPhase::Promoted).then_some(r)
        })
        .await
    };
    let st = done(mds.clone()).await;
    assert_eq!(
        (st.step, st.weight, st.reason.as_str()),
        (2, 100, "RolloutComplete")
    );
    // The timeline: each step entered in order, then the end (a hold for readiness in between).
    let mut steps: Vec<(i32, i32, RolloutPhase)> = st
        .history
        .iter()
        .filter(|h| h.phase != RolloutPhase::Paused)
        .map(|h| (h.step, h.weight, h.phase))
        .collect();
    steps.dedup();
    assert_eq!(
        steps,
        [
            (1, 20, RolloutPhase::Progressing),
            (2, 60, RolloutPhase::Progressing),
            (2, 100, RolloutPhase::Promoted)
        ],
        "{:#?}",
        st.history
    );
    assert!(st.history.windows(2).all(|w| w[0].since <= w[1].since));
    wait_for(
        "the router config gives the canary everything",
        Duration::from_secs(60),
        || async {
            let w = config_weights(&cms, "fraud").await?;
            (w == [("stable".to_string(), 0), ("canary".to_string(), 100)]).then_some(())
        },
    )
    .await;
    let md = mds.get("fraud").await.unwrap();
    let progressing = conditions::find(&md.status.unwrap().conditions, "Progressing").cloned();
    assert_eq!(
        progressing.map(|c| (c.status, c.reason)),
        Some(("False".to_string(), "WeightsApplied".to_string()))
    );
    let events = ns.kubectl(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=fraud",
    ]);
    for reason in ["RolloutStarted", "StepPromoted", "RolloutComplete"] {
        assert!(events.contains(reason), "no {reason} event in\n{events}");
    }

    // A new image: the rollout starts over at step 1 and walks to the end again.
    let first = st.revision.clone();
    mds.patch(
        "fraud",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"variants": [
            {"name": "stable", "image": "stable:1", "weight": 0},
            {"name": "canary", "image": "canary:2", "weight": 100, "rollout": {"steps": [
                {"weight": 20, "pauseSeconds": 2}, {"weight": 60, "pauseSeconds": 2}]}}
        ]}})),
    )
    .await
    .unwrap();
    let again = wait_for("a new rollout", Duration::from_secs(60), || async {
        let r = rollout_of(&mds, "fraud").await?;
        (r.revision != first).then_some(r)
    })
    .await;
    assert_eq!(again.history[0].reason, "RolloutStarted");
    assert_eq!((again.history[0].step, again.history[0].weight), (1, 20));
    let st = done(mds.clone()).await;
    assert_eq!((st.revision != first, st.weight), (true, 100));
}
