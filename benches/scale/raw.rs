//! The raw row: the physical limit of the work that Keelson does for N TrainingJobs. The bench
//! builds each job's children with Keelson's own `build` (the headless Service and one pod per
//! rank, the same objects but for the owner reference, which would point at no object and have
//! the garbage collector delete them) and creates them itself, `BENCH_RAW_CONCURRENCY` requests at
//! once, with no operator running. Every job counts as created when the burst starts, so a job's
//! create → children is the time from the start of the burst to its last child, seen by the same
//! watches as the operators' rows.

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use keelson_api::meta::{Owner, LABEL_OWNER_NAME};
use keelson_api::trainingjob::TrainingJob;
use keelson_operator::trainingjob::build::build;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;

use crate::support::*;
use crate::{delete_namespace, percentiles, time_to_all_children, watch_children};
use crate::{Figures, Target, Times};

/// Requests at once: enough to keep the API server busy on 2 cores (more only queue in APF).
const CONCURRENCY: usize = 64;

enum Child {
    Service(Box<Service>),
    Pod(Box<Pod>),
}

/// The job a raw child belongs to: the owner-name label of Keelson's build.
fn label_key(meta: &ObjectMeta) -> Option<String> {
    meta.labels.as_ref()?.get(LABEL_OWNER_NAME).cloned()
}

/// The children of job `i` in `ns`, as Keelson builds them, without the owner reference.
fn children(ns: &str, i: usize) -> Vec<Child> {
    let name = format!("job-{i:05}");
    let mut job: TrainingJob =
        serde_json::from_value(Target::Keelson.job(&name)).expect("TrainingJob manifest");
    job.metadata.namespace = Some(ns.to_string());
    job.metadata.uid = Some(format!("raw-{i}"));
    let owner = Owner::of(&job).expect("a job with a namespace and a uid");
    let built = build(&job, &owner).expect("the bench's job builds");
    let mut out = vec![Child::Service(Box::new(built.service))];
    out.extend(built.pods.into_iter().map(|p| Child::Pod(Box::new(p))));
    for c in &mut out {
        match c {
            Child::Service(s) => s.metadata.owner_references = None,
            Child::Pod(p) => p.metadata.owner_references = None,
        }
    }
    out
}

/// Creates one child; a 429 from the API server's Priority and Fairness is retried after a pause.
async fn create(pods: &Api<Pod>, services: &Api<Service>, child: &Child) -> Result<(), String> {
    let pp = PostParams::default();
    for attempt in 0u64.. {
        let r = match child {
            Child::Service(s) => services.create(&pp, s).await.map(drop),
            Child::Pod(p) => pods.create(&pp, p).await.map(drop),
        };
        match r {
            Err(kube::Error::Api(e)) if e.code == 429 && attempt < 100 => {
                tokio::time::sleep(Duration::from_millis(50 + 10 * attempt)).await;
            }
            r => return r.map_err(|e| e.to_string()),
        }
    }
    Ok(())
}

pub async fn run(client: &Client, n: usize) -> Figures {
    let ns = format!("bench-raw-{n}");
    delete_namespace(client, &ns).await;
    kubectl_ok(&["create", "namespace", &ns], None);
    let concurrency = std::env::var("BENCH_RAW_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|c| *c > 0)
        .unwrap_or(CONCURRENCY);
    let all: Vec<Child> = (0..n).flat_map(|i| children(&ns, i)).collect();
    let want = all.len() / n.max(1);

    let times: Times = Default::default();
    watch_children::<Pod>(client.clone(), &ns, times.clone(), want, label_key);
    watch_children::<Service>(client.clone(), &ns, times.clone(), want, label_key);
    tokio::time::sleep(Duration::from_secs(2)).await; // the watches have listed the empty namespace

    let started = Instant::now();
    {
        let mut t = times.lock().unwrap();
        for i in 0..n {
            t.entry(format!("job-{i:05}")).or_default().created = Some(started);
        }
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let failed: Vec<String> = futures::stream::iter(&all)
        .map(|c| create(&pods, &services, c))
        .buffer_unordered(concurrency)
        .filter_map(|r| async move { r.err() })
        .collect()
        .await;
    assert!(
        failed.is_empty(),
        "raw creates failed: {:?}",
        &failed[..failed.len().min(3)]
    );
    let sent = started.elapsed();

    let deadline = Duration::from_secs(120 + n as u64 / 10);
    loop {
        let done = times
            .lock()
            .unwrap()
            .values()
            .filter(|e| e.all_children.is_some())
            .count();
        if done >= n {
            break;
        }
        if started.elapsed() > deadline {
            eprintln!("[bench] {ns}: gave up after {deadline:?}: {done}/{n} with children");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ended = Instant::now();
    let mut f = Figures {
        raw: true,
        raw_concurrency: concurrency,
        running_ms: [f64::NAN; 3],
        ..Figures::default()
    };
    {
        let t = times.lock().unwrap();
        f.children_samples = t
            .values()
            .filter_map(|e| {
                let end = e.all_children.unwrap_or(ended);
                Some(end.saturating_duration_since(e.created?).as_secs_f64() * 1000.0)
            })
            .collect();
        f.children_ms = percentiles(f.children_samples.clone());
        f.all_children_ms = time_to_all_children(&t, ended);
        f.children_created = t.values().map(|e| e.children.len() as f64).sum();
        f.incomplete = t.values().filter(|e| e.all_children.is_none()).count();
    }
    eprintln!(
        "[bench] {ns}: {} creates answered in {:.0} ms",
        all.len(),
        sent.as_secs_f64() * 1000.0
    );
    delete_namespace(client, &ns).await;
    f
}
