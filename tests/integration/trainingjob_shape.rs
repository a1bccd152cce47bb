//! A TrainingJob's pods follow its spec as a group: `status.gpus` counts the pods that exist, and an
//! edit made while suspended reaches every rank on resume, with no moment where two shapes mix.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;
use kube::ResourceExt;

use super::trainingjob::Job;
use crate::support::*;
use keelson_api::trainingjob::JobPhase;

/// What every pod of a group must share: WORLD_SIZE, the spec hash and the GPU count.
type Shape = (String, String, String);

fn shape(p: &Pod) -> Shape {
    let world = p
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.env.as_ref())
        .and_then(|e| e.iter().find(|v| v.name == "WORLD_SIZE"))
        .and_then(|v| v.value.clone())
        .unwrap_or_default();
    let label = |k: &str| p.labels().get(k).cloned().unwrap_or_default();
    (
        world,
        label("keelson.dev/spec-hash"),
        label("keelson.dev/gpus"),
    )
}

/// States seen with two shapes, and the shapes seen in order.
type Watched = (Arc<Mutex<Vec<String>>>, Arc<Mutex<Vec<Shape>>>);

/// Watches the pods of `job` and records every state (after each watch event) in which two pods,
/// terminating ones included, have different shapes. Returns the mixed states seen and the shapes
/// seen, in order.
fn watch_shapes(j: &Job, job: &str) -> Watched {
    let mixed: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen: Arc<Mutex<Vec<Shape>>> = Arc::default();
    let cfg = watcher::Config::default().labels(&format!(
        "keelson.dev/owner-name={job},keelson.dev/owner-kind=TrainingJob"
    ));
    let stream = watcher(j.pods.clone(), cfg);
    let (m, s) = (mixed.clone(), seen.clone());
    tokio::spawn(async move {
        let mut pods: BTreeMap<String, Shape> = BTreeMap::new();
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                    pods.insert(p.name_any(), shape(&p));
                }
                Ok(watcher::Event::Delete(p)) => {
                    pods.remove(&p.name_any());
                }
                Ok(watcher::Event::Init) => pods.clear(),
                _ => continue,
            }
            let shapes: Vec<&Shape> = pods.values().collect();
            if let Some(first) = shapes.first() {
                let mut seen = s.lock().unwrap();
                if seen.last() != Some(*first) {
                    seen.push((*first).clone());
                }
            }
            if shapes.windows(2).any(|w| w[0] != w[1]) {
                m.lock().unwrap().push(format!("{pods:?}"));
            }
        }
    });
    (mixed, seen)
}

async fn gpus_shown(j: &Job, name: &str, want: i32) {
    wait_for(&format!("{name} status.gpus {want}"), TIMEOUT, || async {
        let job = j.api.get(name).await.ok()?;
        let st = job.status?;
        (st.gpus == Some(want) && st.observed_generation == job.metadata.generation).then_some(())
    })
    .await;
}

#[tokio::test]
async fn gpus_follow_the_pods_and_edits_never_mix_two_shapes() {
    let j = Job::new("tj-shape").await;
    let name = "shape";
    let (mixed, seen) = watch_shapes(&j, name);
    j.ns.apply(&j.yaml(name, "  workers: 2\n  gpus: {count: 1}\n"))
        .unwrap();
    j.running_pods(name, 2).await;
    j.phase(name, JobPhase::Running).await;
    gpus_shown(&j, name, 2).await;
    let table = j.ns.kubectl(&["get", "tj", name, "--no-headers"]);
    let cols: Vec<&str> = table.split_whitespace().collect();
    assert_eq!(cols[3], "2", "GPUS column: {table}");

    // Suspended: no pods, nothing held.
    j.merge(name, serde_json::json!({"suspend": true})).await;
    j.phase(name, JobPhase::Suspended).await;
    gpus_shown(&j, name, 0).await;
    wait_for("the suspended job's pods gone", TIMEOUT, || async {
        j.pods_of(name).await.is_empty().then_some(())
    })
    .await;

    // Edited while suspended, resumed: the pods have the new values and the column shows them.
    j.merge(
        name,
        serde_json::json!({"workers": 3, "gpus": {"count": 2}}),
    )
    .await;
    j.merge(name, serde_json::json!({"suspend": false})).await;
    let pods = j.running_pods(name, 3).await;
    for p in pods.values() {
        assert_eq!(shape(p).0, "3");
        assert_eq!(shape(p).2, "2");
    }
    j.phase(name, JobPhase::Running).await;
    gpus_shown(&j, name, 6).await;

    // Suspend, edit and resume in three quick writes, faster than a reconcile observes: the pods of
    // the old shape are replaced as a group.
    let before: Vec<String> = pods.values().filter_map(|p| p.uid()).collect();
    j.merge(name, serde_json::json!({"suspend": true})).await;
    j.merge(
        name,
        serde_json::json!({"workers": 4, "gpus": {"count": 1}}),
    )
    .await;
    j.merge(name, serde_json::json!({"suspend": false})).await;
    let pods = j.running_pods(name, 4).await;
    for p in pods.values() {
        assert_eq!(shape(p).0, "4", "{}", p.name_any());
        assert!(!before.contains(&p.uid().unwrap()), "{} kept", p.name_any());
    }
    j.phase(name, JobPhase::Running).await;
    gpus_shown(&j, name, 4).await;

    let mixed = mixed.lock().unwrap().clone();
    assert!(mixed.is_empty(), "states with two shapes: {mixed:#?}");
    let seen = seen.lock().unwrap().clone();
    let worlds: Vec<&str> = seen.iter().map(|s| s.0.as_str()).collect();
    assert!(
        worlds.ends_with(&["4"]) && worlds.contains(&"3") && worlds.contains(&"2"),
        "every shape was watched: {seen:?}"
    );
}
