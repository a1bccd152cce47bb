use super::super::build::tests::{md, variant};
use super::*;
use keelson_api::rollout::{Analysis, RolloutStep};

const T0: i64 = 1_800_000_000;

fn t(secs: i64) -> Time {
    Time(Timestamp::from_second(T0 + secs).unwrap())
}

fn steps(pairs: &[(i32, i32)]) -> Vec<RolloutStep> {
    pairs
        .iter()
        .map(|(weight, pause)| RolloutStep {
            weight: *weight,
            pause_seconds: Some(*pause),
        })
        .collect()
}

fn analysis() -> Analysis {
    Analysis {
        max_error_ratio: Some(0.01),
        max_latency_ratio: Some(1.5),
        window_seconds: Some(60),
        min_requests: Some(100),
    }
}

/// A stable variant at weight 0 and a canary rolling up to 100 through 10, 50 (pause 300 s each).
fn canary(with_analysis: bool) -> ModelDeployment {
    let mut c = variant("canary", 100, None);
    c.rollout = Some(Rollout {
        steps: steps(&[(10, 300), (50, 300)]),
        analysis: with_analysis.then(analysis),
    });
    md(vec![variant("stable", 0, None), c], None).0
}

/// The rollout of `m` at `step` in `phase` since `since` (seconds after T0).
fn at_step(m: &ModelDeployment, step: i32, phase: RolloutPhase, since: i64) -> RolloutStatus {
    let r = rolling(m).unwrap();
    let mut st = current(&r, None, &t(since));
    st.step = step;
    st.weight = r.rollout.steps[usize::try_from(step - 1).unwrap()].weight;
    st.phase = phase;
    st
}

fn measured(requests: u64, failures: u64, p99: f64, baseline: Option<f64>) -> Signal {
    Signal::Due(Measurement {
        seconds: 60.0,
        requests,
        failures,
        p99: Some(p99),
        baseline_p99: baseline,
    })
}

#[test]
fn the_decision_table() {
    use RolloutPhase::*;
    let ok = || measured(1000, 2, 0.012, Some(0.010));
    struct Case {
        what: &'static str,
        analysis: bool,
        step: i32,
        /// Seconds since the step began.
        age: i64,
        ready: bool,
        signal: Signal,
        want: (i32, i32, RolloutPhase, &'static str),
        window: Window,
        requeue: Option<u64>,
    }
    let cases = vec![
        Case {
            what: "no analysis, inside the pause: wait for its end",
            analysis: false,
            step: 1,
            age: 100,
            ready: true,
            signal: Signal::Off,
            want: (1, 10, Progressing, REASON_PAUSING),
            window: Window::Keep,
            requeue: Some(200),
        },
        Case {
            what: "no analysis, pause over: next step",
            analysis: false,
            step: 1,
            age: 300,
            ready: true,
            signal: Signal::Off,
            want: (2, 50, Progressing, REASON_STEP_PASSED),
            window: Window::Keep,
            requeue: Some(300),
        },
        Case {
            what: "no analysis, last step over: promoted to the spec weight",
            analysis: false,
            step: 2,
            age: 301,
            ready: true,
            signal: Signal::Off,
            want: (2, 100, Promoted, REASON_COMPLETE),
            window: Window::Keep,
            requeue: None,
        },
        Case {
            what: "within bounds after the pause: promote",
            analysis: true,
            step: 1,
            age: 300,
            ready: true,
            signal: ok(),
            want: (2, 50, Progressing, REASON_STEP_PASSED),
            window: Window::Restart,
            requeue: Some(60),
        },
        Case {
            what: "within bounds inside the pause: next window",
            analysis: true,
            step: 1,
            age: 120,
            ready: true,
            signal: ok(),
            want: (1, 10, Progressing, REASON_ANALYSING),
            window: Window::Restart,
            requeue: Some(60),
        },
        Case {
            what: "within bounds at the last step: complete",
            analysis: true,
            step: 2,
            age: 400,
            ready: true,
            signal: ok(),
            want: (2, 100, Promoted, REASON_COMPLETE),
            window: Window::Restart,
            requeue: None,
        },
        Case {
            what: "5xx over the bound: rolled back, pause or not",
            analysis: true,
            step: 1,
            age: 60,
            ready: true,
            signal: measured(1000, 11, 0.010, Some(0.010)),
            want: (1, 0, RolledBack, REASON_ERROR_RATIO),
            window: Window::Keep,
            requeue: None,
        },
        Case {
            what: "p99 ratio over the bound: rolled back",
            analysis: true,
            step: 2,
            age: 400,
            ready: true,
            signal: measured(1000, 0, 0.016, Some(0.010)),
            want: (2, 0, RolledBack, REASON_LATENCY_RATIO),
            window: Window::Keep,
            requeue: None,
        },
        Case {
            what: "no baseline traffic: the latency is not judged",
            analysis: true,
            step: 1,
            age: 300,
            ready: true,
            signal: measured(1000, 0, 5.0, None),
            want: (2, 50, Progressing, REASON_STEP_PASSED),
            window: Window::Restart,
            requeue: Some(60),
        },
        Case {
            what: "too few requests after the pause: hold, window open",
            analysis: true,
            step: 1,
            age: 600,
            ready: true,
            signal: measured(99, 0, 0.010, Some(0.010)),
            want: (1, 10, Paused, REASON_TOO_FEW_REQUESTS),
            window: Window::Keep,
            requeue: Some(60),
        },
        Case {
            what: "too few requests inside the pause: keep measuring",
            analysis: true,
            step: 1,
            age: 60,
            ready: true,
            signal: measured(5, 5, 0.010, Some(0.010)),
            want: (1, 10, Progressing, REASON_ANALYSING),
            window: Window::Keep,
            requeue: Some(60),
        },
        Case {
            what: "metrics unavailable: hold, never promote blind",
            analysis: true,
            step: 1,
            age: 10_000,
            ready: true,
            signal: Signal::Unavailable("no router pod answered".into()),
            want: (1, 10, Paused, REASON_METRICS_UNAVAILABLE),
            window: Window::Keep,
            requeue: Some(METRICS_RETRY.as_secs()),
        },
        Case {
            what: "a window open: judged when it is due",
            analysis: true,
            step: 1,
            age: 20,
            ready: true,
            signal: Signal::Open(t(10).0),
            want: (1, 10, Progressing, REASON_ANALYSING),
            window: Window::Keep,
            requeue: Some(50),
        },
        Case {
            what: "no ready pod: hold",
            analysis: true,
            step: 1,
            age: 10_000,
            ready: false,
            signal: ok(),
            want: (1, 10, Paused, REASON_VARIANT_NOT_READY),
            window: Window::Keep,
            requeue: None,
        },
    ];
    for c in cases {
        let m = canary(c.analysis);
        let r = rolling(&m).unwrap();
        let prev = at_step(&m, c.step, Progressing, 0);
        let d = decide(&r, Some(&prev), c.ready, &c.signal, &t(c.age));
        let st = &d.status;
        assert_eq!(
            (st.step, st.weight, st.phase, st.reason.as_str()),
            c.want,
            "{}: {}",
            c.what,
            st.message
        );
        assert_eq!(d.window, c.window, "{}", c.what);
        assert_eq!(d.requeue.map(|r| r.as_secs()), c.requeue, "{}", c.what);
        assert_eq!(
            st.summary,
            format!("canary {}/2 {:?}", c.want.0, c.want.2),
            "{}",
            c.what
        );
        // The same world decided again writes nothing new.
        if matches!(st.phase, Paused | RolledBack | Promoted) || st.reason == REASON_PAUSING {
            let again = decide(&r, Some(st), c.ready, &c.signal, &t(c.age));
            assert_eq!(&again.status, st, "{}: not stable", c.what);
        }
    }
}

#[test]
fn a_rollout_is_judged_by_bounds_that_name_the_field() {
    let m = canary(true);
    let r = rolling(&m).unwrap();
    let prev = at_step(&m, 1, RolloutPhase::Progressing, 0);
    let d = decide(
        &r,
        Some(&prev),
        true,
        &measured(200, 10, 0.01, Some(0.01)),
        &t(60),
    );
    assert!(
        d.status.message.contains("maxErrorRatio 0.01")
            && d.status.message.contains("200 responses"),
        "{}",
        d.status.message
    );
    let last = d.status.history.last().unwrap();
    assert_eq!(
        (last.phase, last.weight, last.reason.as_str()),
        (RolloutPhase::RolledBack, 0, REASON_ERROR_RATIO)
    );
    let notes = notes(Some(&prev), Some(&d.status));
    assert_eq!(notes.len(), 1);
    assert_eq!(notes[0].type_, kube::runtime::events::EventType::Warning);
    assert_eq!(notes[0].reason, "RolledBack");
}

#[test]
fn a_rollback_holds_until_the_revision_changes() {
    let m = canary(true);
    let r = rolling(&m).unwrap();
    let mut back = at_step(&m, 2, RolloutPhase::RolledBack, 0);
    back.weight = 0;
    let d = decide(
        &r,
        Some(&back),
        true,
        &measured(1000, 0, 0.01, Some(0.01)),
        &t(9999),
    );
    assert_eq!(d.status, back);
    assert_eq!(weights(&m, Some(&d.status)), [100, 0]);
    // A new image: a new rollout from step 1.
    let mut m2 = m.clone();
    m2.spec.variants[1].workload.image = "ghcr.io/acme/fraud-server:fixed".into();
    let r2 = rolling(&m2).unwrap();
    assert_ne!(r2.revision, r.revision);
    let d = decide(&r2, Some(&back), true, &Signal::Open(t(5).0), &t(5));
    assert_eq!((d.status.step, d.status.weight), (1, 10));
    assert_eq!(d.status.history[0].reason, "RolloutStarted");
    assert_eq!(
        notes(Some(&back), Some(&d.status))[0].reason,
        "RolloutStarted"
    );
}

#[test]
fn the_revision_follows_the_pods_and_the_rollout_only() {
    let m = canary(false);
    let base = revision(&m.spec.variants[1]);
    let mut v = m.spec.variants[1].clone();
    v.weight = 60;
    v.replicas = Some(5);
    assert_eq!(revision(&v), base, "weight and replicas do not restart");
    v.workload.env = Some(vec![k8s_openapi::api::core::v1::EnvVar {
        name: "X".into(),
        value: Some("1".into()),
        ..Default::default()
    }]);
    assert_ne!(revision(&v), base);
    let mut v = m.spec.variants[1].clone();
    v.rollout.as_mut().unwrap().steps[0].pause_seconds = Some(1);
    assert_ne!(revision(&v), base, "an edited rollout starts over");
}

#[test]
fn the_other_variants_share_what_the_step_leaves() {
    let m = canary(false);
    let at = |weight: i32, phase| RolloutStatus {
        weight,
        phase,
        ..at_step(&m, 1, phase, 0)
    };
    assert_eq!(weights(&m, None), [0, 100]);
    assert_eq!(
        weights(&m, Some(&at(10, RolloutPhase::Progressing))),
        [90, 10]
    );
    assert_eq!(
        weights(&m, Some(&at(0, RolloutPhase::RolledBack))),
        [100, 0]
    );
    assert_eq!(
        weights(&m, Some(&at(100, RolloutPhase::Promoted))),
        [0, 100]
    );
    // Three variants: the others by their spec weights (30:10).
    let mut c = variant("c", 60, None);
    c.rollout = Some(Rollout {
        steps: steps(&[(20, 0)]),
        analysis: None,
    });
    let three = md(
        vec![variant("a", 30, None), variant("b", 10, None), c],
        None,
    )
    .0;
    let st = RolloutStatus {
        weight: 20,
        ..at_step(&three, 1, RolloutPhase::Progressing, 0)
    };
    assert_eq!(weights(&three, Some(&st)), [60, 20, 20]);
}

#[test]
fn a_whole_rollout_leaves_a_timeline() {
    let m = canary(true);
    let r = rolling(&m).unwrap();
    let ok = measured(1000, 0, 0.01, Some(0.01));
    let mut st: Option<RolloutStatus> = None;
    let mut clock = 0;
    for signal in [
        Signal::Unavailable("none".into()),
        Signal::Open(t(30).0),
        ok.clone(),
        ok.clone(),
        ok.clone(),
        ok.clone(),
        ok.clone(),
        Signal::Open(t(400).0),
        ok.clone(),
        ok.clone(),
        ok.clone(),
        ok.clone(),
        ok.clone(),
    ] {
        let d = decide(&r, st.as_ref(), true, &signal, &t(clock));
        st = Some(d.status);
        clock += 70;
    }
    let st = st.unwrap();
    let timeline: Vec<_> = st
        .history
        .iter()
        .map(|h| (h.step, h.weight, h.phase, h.reason.as_str()))
        .collect();
    use RolloutPhase::*;
    assert_eq!(
        timeline,
        [
            (1, 10, Progressing, "RolloutStarted"),
            (1, 10, Paused, REASON_METRICS_UNAVAILABLE),
            (1, 10, Progressing, REASON_ANALYSING),
            (2, 50, Progressing, REASON_STEP_PASSED),
            (2, 100, Promoted, REASON_COMPLETE),
        ]
    );
    assert!(st.since.0 > t(0).0);
}
