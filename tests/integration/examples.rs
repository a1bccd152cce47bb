//! Every manifest in examples/ is accepted by the API server and reaches Ready (a queued job:
//! Suspended), checked with the real `kubectl wait`.

use crate::support::*;

#[test]
fn every_example_is_accepted_and_becomes_ready() {
    operator();
    let ns = Ns::new("examples");
    ns.apply_examples();
    for kind in ["notebooks", "modeldeployments"] {
        ns.kubectl(&[
            "wait",
            "--for=condition=Ready",
            "--timeout=90s",
            kind,
            "--all",
        ]);
    }
    for tj in ["resnet50", "mnist-tf", "gemma-jax"] {
        ns.kubectl(&[
            "wait",
            "--for=condition=Ready",
            "--timeout=90s",
            &format!("trainingjob/{tj}"),
        ]);
        ns.kubectl(&[
            "wait",
            "--for=jsonpath={.status.phase}=Running",
            "--timeout=30s",
            &format!("trainingjob/{tj}"),
        ]);
    }
    ns.kubectl(&[
        "wait",
        "--for=jsonpath={.status.phase}=Suspended",
        "--timeout=60s",
        "trainingjob/bert-queued",
    ]);
    let all = ns.kubectl(&["get", "keelson"]);
    for name in [
        "alice",
        "scratch",
        "resnet50",
        "mnist-tf",
        "gemma-jax",
        "bert-queued",
        "fraud",
        "scorer",
        "ranker",
    ] {
        assert!(all.contains(name), "{all}");
    }
    // On kwok nodes no router answers: the canary holds at its first step.
    ns.kubectl(&[
        "wait",
        "--for=jsonpath={.status.rollout.reason}=MetricsUnavailable",
        "--timeout=60s",
        "modeldeployment/ranker",
    ]);
    let ranker = ns.kubectl(&["get", "mdep", "ranker"]);
    assert!(ranker.contains("canary 1/3 Paused"), "{ranker}");
}
