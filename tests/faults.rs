//! Faults the operator must ride out on its own: children deleted or edited by hand are restored,
//! another field manager's apply to the status is refused with a 409 conflict, and a forced one is
//! overwritten once, without a fight.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use keelson_testkit as support;

use support::*;

fn get(ns: &Ns, args: &[&str]) -> String {
    let mut a = vec!["get"];
    a.extend_from_slice(args);
    let o = kubectl(&[&["-n", ns.name.as_str()][..], &a].concat(), None);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_edits_and_foreign_status_writes_are_undone() {
    operator();
    let ns = Ns::new("faults");
    ns.apply("apiVersion: keelson.dev/v1alpha1\nkind: TrainingJob\nmetadata: {name: tj}\nspec:\n  image: trainer\n  framework: PyTorch\n  workers: 2\n").unwrap();
    wait_for("the job's pods", TIMEOUT, || async {
        let out = get(&ns, &["pods", "-o", "name"]);
        (out.lines().count() == 2).then_some(())
    })
    .await;

    // A child deleted by hand comes back: the headless Service and a worker pod.
    ns.kubectl(&["delete", "service", "tj", "--wait=false"]);
    ns.kubectl(&["delete", "pod", "tj-worker-1", "--wait=false"]);
    wait_for("the Service and the pod restored", TIMEOUT, || async {
        let svc = get(
            &ns,
            &[
                "service",
                "tj",
                "-o",
                "jsonpath={.metadata.deletionTimestamp}|{.spec.clusterIP}",
            ],
        );
        let pod = get(
            &ns,
            &[
                "pod",
                "tj-worker-1",
                "-o",
                "jsonpath={.metadata.deletionTimestamp}|{.metadata.name}",
            ],
        );
        (svc == "|None" && pod == "|tj-worker-1").then_some(())
    })
    .await;

    // A child edited by hand (a field the operator owns) is set back.
    ns.kubectl(&[
        "patch",
        "service",
        "tj",
        "--type=merge",
        "-p",
        r#"{"spec":{"publishNotReadyAddresses":false}}"#,
    ]);
    wait_for("the Service's spec restored", TIMEOUT, || async {
        let v = get(
            &ns,
            &[
                "service",
                "tj",
                "-o",
                "jsonpath={.spec.publishNotReadyAddresses}",
            ],
        );
        (v == "true").then_some(())
    })
    .await;

    // Another field manager takes the status's Ready condition (a forced apply on /status): the
    // operator writes the truth back, once, and then stays quiet.
    wait_for("the job Running", TIMEOUT, || async {
        (get(
            &ns,
            &["trainingjob", "tj", "-o", "jsonpath={.status.phase}"],
        ) == "Running")
            .then_some(())
    })
    .await;
    let intruder = r#"{"apiVersion":"keelson.dev/v1alpha1","kind":"TrainingJob","metadata":{"name":"tj"},"status":{"conditions":[{"type":"Ready","status":"False","reason":"Intruder","message":"written by another manager","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}"#;
    // Without force, the other manager's apply is refused: 409, the field is the operator's.
    let o = kubectl(
        &[
            "-n",
            &ns.name,
            "apply",
            "--server-side",
            "--field-manager=intruder",
            "--subresource=status",
            "-f",
            "-",
        ],
        Some(intruder),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("conflict") && err.contains("\"keelson\""),
        "a status apply without force is not refused with a conflict naming keelson: {err}"
    );
    let o = kubectl(
        &[
            "-n",
            &ns.name,
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=intruder",
            "--subresource=status",
            "-f",
            "-",
        ],
        Some(intruder),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_for("the Ready condition written back", TIMEOUT, || async {
        let r = get(
            &ns,
            &[
                "trainingjob",
                "tj",
                "-o",
                "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
            ],
        );
        (r == "True").then_some(())
    })
    .await;
    let rv = || {
        get(
            &ns,
            &[
                "trainingjob",
                "tj",
                "-o",
                "jsonpath={.metadata.resourceVersion}",
            ],
        )
    };
    let settled = rv();
    for _ in 0..12 {
        tokio::time::sleep(POLL).await;
        assert_eq!(
            rv(),
            settled,
            "the status keeps changing: a fight between managers"
        );
    }
}
