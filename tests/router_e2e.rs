//! End to end on loopback: the operator writes the router ConfigMap of a ModelDeployment on the
//! local cluster; the config is read back from the API server, its upstreams pointed at small HTTP
//! servers standing in for the variants (each answers with its variant's name), and the real
//! `keelson router` binary serves it. Then: the split over 100,000 requests, sticky keys, the mirror's
//! share, the same keys over HTTP/2 (h2c), a weight change and a bad config mid-run without a failed
//! request, and a dead variant answered with 502 at once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use keelson_testkit as support;

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use serde_json::{json, Value};
use support::*;
use tokio::task::JoinSet;

/// Requests in the split measurement.
const REQUESTS: u64 = 100_000;
/// Concurrent keep-alive clients.
const CLIENTS: usize = 16;

/// A variant's stand-in: answers every request with the variant's name, counting the requests and
/// the mirror copies among them. Stopping it closes its listener and every open connection.
struct StandIn {
    addr: SocketAddr,
    hits: Arc<AtomicU64>,
    mirrored: Arc<AtomicU64>,
    server: tokio::task::JoinHandle<()>,
}

impl StandIn {
    async fn start(name: &'static str) -> StandIn {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let mirrored = Arc::new(AtomicU64::new(0));
        let (h, m) = (hits.clone(), mirrored.clone());
        let server = tokio::spawn(async move {
            // Dropped with the task: aborts every connection.
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (h, m) = (h.clone(), m.clone());
                let svc = service_fn(move |req: Request<Incoming>| {
                    h.fetch_add(1, Relaxed);
                    if req.headers().contains_key("x-keelson-mirror") {
                        m.fetch_add(1, Relaxed);
                    }
                    let mut resp = Response::new(Full::new(Bytes::from_static(name.as_bytes())));
                    if let Some(host) = req.headers().get(hyper::header::HOST) {
                        resp.headers_mut().insert("x-seen-host", host.clone());
                    }
                    async move { Ok::<_, Infallible>(resp) }
                });
                conns.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        StandIn {
            addr,
            hits,
            mirrored,
            server,
        }
    }

    async fn stop(&mut self) {
        self.server.abort();
        let _ = (&mut self.server).await;
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Writes `content` to `path` atomically (a new file renamed over the old one).
fn replace_file(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    status: StatusCode,
    body: String,
    took: Duration,
}

async fn get(client: &HttpClient, port: u16, sticky: Option<&str>) -> Answer {
    let mut req = Request::get(format!("http://127.0.0.1:{port}/v1/predict"));
    if let Some(k) = sticky {
        req = req.header("x-user-id", k);
    }
    let start = Instant::now();
    let run = async {
        let resp = client.request(req.body(Empty::new()).unwrap()).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
    };
    match tokio::time::timeout(Duration::from_secs(10), run).await {
        Ok(Ok((status, body))) => Answer {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
            took: start.elapsed(),
        },
        Ok(Err(e)) => panic!("request to the router failed: {e}"),
        Err(_) => panic!("request to the router took more than 10 s"),
    }
}

/// Sends `n` requests over `CLIENTS` concurrent keep-alive connections; `key(i)` is the sticky
/// header of request `i`. Returns every answer with its key; `done` counts progress.
async fn load(
    client: &HttpClient,
    port: u16,
    n: u64,
    key: impl Fn(u64) -> Option<String> + Send + Sync + 'static,
    done: Arc<AtomicU64>,
) -> Vec<(Option<String>, Answer)> {
    let key = Arc::new(key);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..CLIENTS {
        let (client, key, next, done) = (client.clone(), key.clone(), next.clone(), done.clone());
        tasks.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Relaxed);
                if i >= n {
                    return out;
                }
                let k = key(i);
                let a = get(&client, port, k.as_deref()).await;
                done.fetch_add(1, Relaxed);
                out.push((k, a));
            }
        });
    }
    let mut all = Vec::with_capacity(usize::try_from(n).unwrap());
    while let Some(r) = tasks.join_next().await {
        all.extend(r.unwrap());
    }
    all
}

/// Percent of the answers per body; panics on any non-200 answer.
fn shares(answers: &[(Option<String>, Answer)]) -> BTreeMap<String, f64> {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for (_, a) in answers {
        assert_eq!(a.status, StatusCode::OK, "a failed request: {a:?}");
        *counts.entry(a.body.clone()).or_default() += 1;
    }
    counts
        .into_iter()
        .map(|(k, v)| (k, v as f64 * 100.0 / answers.len() as f64))
        .collect()
}

fn assert_share(s: &BTreeMap<String, f64>, variant: &str, want: f64, tolerance: f64) {
    let got = s.get(variant).copied().unwrap_or(0.0);
    assert!(
        (got - want).abs() <= tolerance,
        "{variant}: {got:.2}% of the requests, wanted {want}% ± {tolerance} (all: {s:?})"
    );
}

/// Variant per sticky key; panics when one key saw two variants.
fn sticky_map(answers: &[(Option<String>, Answer)]) -> BTreeMap<String, String> {
    let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (k, a) in answers {
        assert_eq!(a.status, StatusCode::OK, "{a:?}");
        seen.entry(k.clone().unwrap())
            .or_default()
            .insert(a.body.clone());
    }
    seen.into_iter()
        .map(|(k, v)| {
            assert_eq!(v.len(), 1, "sticky key {k} went to {v:?}");
            (k, v.into_iter().next().unwrap())
        })
        .collect()
}

/// One sample of the router's /metrics.
async fn metric(client: &HttpClient, admin: u16, series: &str) -> f64 {
    let resp = client
        .request(
            Request::get(format!("http://127.0.0.1:{admin}/metrics"))
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// The router config the operator wrote for `name`, read back from the API server.
async fn operator_config(cms: &Api<ConfigMap>, name: &str) -> Value {
    let raw = wait_for("the router ConfigMap", Duration::from_secs(60), || async {
        cms.get_opt(&format!("{name}-router"))
            .await
            .ok()??
            .data?
            .get("config.json")
            .cloned()
    })
    .await;
    serde_json::from_str(&raw).unwrap()
}

fn with_upstreams(mut config: Value, upstreams: &BTreeMap<&str, SocketAddr>) -> Value {
    for v in config["variants"].as_array_mut().unwrap() {
        let name = v["name"].as_str().unwrap().to_string();
        v["upstream"] = json!(upstreams[name.as_str()].to_string());
    }
    config
}

struct Router {
    child: tokio::process::Child,
    port: u16,
    admin: u16,
    log: PathBuf,
}

impl Router {
    async fn start(config: &Path, dir: &Path, client: &HttpClient) -> Router {
        let (port, admin) = (free_port(), free_port());
        let log = dir.join("router.log");
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_keelson"))
            .args([
                "router",
                "--workers",
                "2",
                "--reload-interval-ms",
                "200",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--admin-listen",
                &format!("127.0.0.1:{admin}"),
                "--config",
            ])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(std::fs::File::create(dir.join("router.out")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let r = Router {
            child,
            port,
            admin,
            log,
        };
        wait_for("the router ready", Duration::from_secs(20), || async {
            let req = Request::get(format!("http://127.0.0.1:{admin}/readyz"))
                .body(Empty::new())
                .unwrap();
            let resp = client.request(req).await.ok()?;
            (resp.status() == StatusCode::OK).then_some(())
        })
        .await;
        r
    }

    /// What the router wrote (its log lines go to stdout, panics to stderr).
    fn log(&self) -> String {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        read(&self.log.with_file_name("router.out")) + &read(&self.log)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_binary_serves_the_operators_config() {
    operator();
    let ns = Ns::new("router-e2e");
    let kube = client().await;
    ns.apply(
        "apiVersion: keelson.dev/v1alpha1
kind: ModelDeployment
metadata: {name: fraud}
spec:
  variants:
    - {name: champion, image: 'ghcr.io/acme/fraud-server:2.3', weight: 80}
    - {name: challenger, image: 'ghcr.io/acme/fraud-server:2.4', weight: 20}
    - {name: shadow, image: 'ghcr.io/acme/fraud-server:2.5', weight: 0}
  traffic:
    router: Builtin
    stickyHeader: X-User-Id
    mirror: {variant: shadow, percent: 25}
",
    )
    .unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(kube, &ns.name);
    let written = operator_config(&cms, "fraud").await;
    assert_eq!(written["version"], 1);
    assert_eq!(written["stickyHeader"], "x-user-id");
    assert_eq!(
        written["mirror"],
        json!({"variant": "shadow", "percent": 25})
    );
    let weights: Vec<(String, u64)> = written["variants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            assert_eq!(
                v["upstream"],
                format!(
                    "fraud-{}.{}.svc.cluster.local:80",
                    v["name"].as_str().unwrap(),
                    ns.name
                )
            );
            (
                v["name"].as_str().unwrap().to_string(),
                v["weight"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        weights,
        [
            ("champion".to_string(), 80),
            ("challenger".to_string(), 20),
            ("shadow".to_string(), 0)
        ]
    );

    let champion = StandIn::start("champion").await;
    let mut challenger = StandIn::start("challenger").await;
    let shadow = StandIn::start("shadow").await;
    let upstreams = BTreeMap::from([
        ("champion", champion.addr),
        ("challenger", challenger.addr),
        ("shadow", shadow.addr),
    ]);
    let dir = std::env::temp_dir().join(format!("keelson-router-e2e-{}", ns.name));
    std::fs::create_dir_all(&dir).unwrap();
    let config_path = dir.join("config.json");
    let config = with_upstreams(written, &upstreams);
    replace_file(&config_path, &config.to_string());

    let http: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build_http();
    let mut router = Router::start(&config_path, &dir, &http).await;
    let port = router.port;
    let admin = router.admin;

    // 1. The split: 100,000 requests without a sticky header follow the weights within ±1 point.
    let started = Instant::now();
    let answers = load(&http, port, REQUESTS, |_| None, Arc::default()).await;
    let took = started.elapsed();
    let s = shares(&answers);
    assert_share(&s, "champion", 80.0, 1.0);
    assert_share(&s, "challenger", 20.0, 1.0);
    assert_share(&s, "shadow", 0.0, 0.0);
    eprintln!(
        "{REQUESTS} requests in {took:?} ({:.0}/s): {s:?}",
        REQUESTS as f64 / took.as_secs_f64()
    );

    // 2. The mirror: a quarter of the requests is copied to the shadow variant, which gets nothing
    // else. Copies are asynchronous: wait until they stop arriving. The count is binomial
    // (n = 100,000, p = 0.25, standard deviation 0.14 points), so ±1 point is over 7 deviations;
    // copies dropped at the in-flight bound would also count against it.
    let mut last = u64::MAX;
    wait_for("mirror copies settled", Duration::from_secs(20), || {
        let now = shadow.hits.load(Relaxed);
        let settled = now == last;
        last = now;
        async move { settled.then_some(()) }
    })
    .await;
    let copies = shadow.mirrored.load(Relaxed);
    assert_eq!(
        copies,
        shadow.hits.load(Relaxed),
        "the shadow variant got non-mirror traffic"
    );
    assert_eq!(
        champion.mirrored.load(Relaxed) + challenger.mirrored.load(Relaxed),
        0
    );
    let dropped = metric(
        &http,
        admin,
        "keelson_router_mirror_requests_total{variant=\"shadow\",outcome=\"dropped\"}",
    )
    .await;
    let pct = copies as f64 * 100.0 / REQUESTS as f64;
    assert!(
        (pct - 25.0).abs() <= 1.0,
        "the mirror got {pct:.2}% of the requests ({copies}), wanted 25% ± 1 ({dropped} dropped)"
    );

    // 3. Sticky: 2,000 keys, ten requests each, interleaved over the concurrent clients: every key
    // always reaches the same variant, and the keys spread by weight.
    let keys = 2_000;
    let answers = load(
        &http,
        port,
        keys * 10,
        move |i| Some(format!("user-{}", i % keys)),
        Arc::default(),
    )
    .await;
    let before = sticky_map(&answers);
    assert_eq!(before.len() as u64, keys);
    let on_challenger = before.values().filter(|v| *v == "challenger").count() as f64;
    let pct = on_challenger * 100.0 / keys as f64;
    assert!(
        (pct - 20.0).abs() <= 3.0,
        "{pct:.1}% of the keys on challenger"
    );

    // 3b. HTTP/2 over cleartext (prior knowledge): 200 streams multiplexed on one connection reach
    // the same variants as the same keys over HTTP/1.1, and the variant sees the request's authority
    // as its Host.
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut streams = JoinSet::new();
    for i in 0..200u64 {
        let key = format!("user-{}", i % keys);
        let req = Request::get("http://fraud.example/v1/predict")
            .header("x-user-id", &key)
            .body(Empty::<Bytes>::new())
            .unwrap();
        let mut h2 = h2.clone();
        streams.spawn(async move {
            let resp = h2.send_request(req).await.unwrap();
            assert_eq!(resp.version(), hyper::Version::HTTP_2);
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(resp.headers()["x-seen-host"], "fraud.example");
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (key, String::from_utf8_lossy(&body).into_owned())
        });
    }
    while let Some(r) = streams.join_next().await {
        let (key, variant) = r.unwrap();
        assert_eq!(variant, before[&key], "{key} over HTTP/2");
    }

    // 4. A bad config, then a weight change, both mid-run: not a single failed request.
    let done = Arc::new(AtomicU64::new(0));
    let run = {
        let (http, done) = (http.clone(), done.clone());
        tokio::spawn(async move { load(&http, port, 60_000, |_| None, done).await })
    };
    let reloads_ok = metric(
        &http,
        admin,
        "keelson_router_config_reloads_total{result=\"ok\"}",
    )
    .await;
    wait_for("a fifth of the run", Duration::from_secs(60), || {
        let d = done.load(Relaxed);
        async move { (d >= 12_000).then_some(()) }
    })
    .await;
    replace_file(&config_path, "{\"version\": 1, \"variants\": [");
    wait_for("the bad config seen", Duration::from_secs(10), || async {
        let n = metric(
            &http,
            admin,
            "keelson_router_config_reloads_total{result=\"error\"}",
        )
        .await;
        (n >= 1.0).then_some(())
    })
    .await;
    wait_for("two fifths of the run", Duration::from_secs(60), || {
        let d = done.load(Relaxed);
        async move { (d >= 24_000).then_some(()) }
    })
    .await;
    let mut next = config.clone();
    next["variants"][0]["weight"] = json!(50);
    next["variants"][1]["weight"] = json!(50);
    replace_file(&config_path, &next.to_string());
    wait_for(
        "the new weights loaded",
        Duration::from_secs(10),
        || async {
            let n = metric(
                &http,
                admin,
                "keelson_router_config_reloads_total{result=\"ok\"}",
            )
            .await;
            (n > reloads_ok).then_some(())
        },
    )
    .await;
    let during = run.await.unwrap();
    assert_eq!(during.len(), 60_000);
    let failed: Vec<_> = during
        .iter()
        .filter(|(_, a)| a.status != StatusCode::OK)
        .take(5)
        .collect();
    assert!(
        failed.is_empty(),
        "requests failed during reloads: {failed:?}"
    );
    assert!(
        router.log().contains("router config refused"),
        "{}",
        router.log()
    );
    // The new weights are in effect.
    let answers = load(&http, port, 20_000, |_| None, Arc::default()).await;
    let s = shares(&answers);
    assert_share(&s, "champion", 50.0, 1.5);
    assert_share(&s, "challenger", 50.0, 1.5);
    // Sticky keys after 80/20 -> 50/50: the keys that move are close to the minimum (30%), and
    // they only move to the variant that gained weight.
    let answers = load(
        &http,
        port,
        keys,
        move |i| Some(format!("user-{i}")),
        Arc::default(),
    )
    .await;
    let after = sticky_map(&answers);
    let moved: Vec<_> = before
        .iter()
        .filter(|(k, v)| after[*k] != **v)
        .map(|(k, v)| (v.as_str(), after[k].as_str()))
        .collect();
    assert!(moved.iter().all(|m| *m == ("champion", "challenger")));
    let pct = moved.len() as f64 * 100.0 / keys as f64;
    assert!((pct - 30.0).abs() <= 4.0, "{pct:.1}% of the keys moved");

    // 5. A dead variant: its requests get a 502 with a short body at once; the others still work.
    challenger.stop().await;
    let answers = load(&http, port, 2_000, |_| None, Arc::default()).await;
    let mut by_status: BTreeMap<u16, u64> = BTreeMap::new();
    for (_, a) in &answers {
        *by_status.entry(a.status.as_u16()).or_default() += 1;
        match a.status {
            StatusCode::OK => assert_eq!(a.body, "champion"),
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE => {
                assert!(
                    a.body.len() < 200 && a.body.contains("keelson router"),
                    "{a:?}"
                )
            }
            _ => panic!("unexpected answer with a dead variant: {a:?}"),
        }
        assert!(
            a.took < Duration::from_secs(2),
            "an answer took {:?}",
            a.took
        );
    }
    let bad = by_status.get(&502).copied().unwrap_or(0) as f64 / 20.0;
    assert!((bad - 50.0).abs() <= 6.0, "{by_status:?}");
    let sticky_dead = after.iter().find(|(_, v)| *v == "challenger").unwrap().0;
    let a = get(&http, port, Some(sticky_dead)).await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{a:?}");
    assert!(
        metric(
            &http,
            admin,
            "keelson_router_errors_total{variant=\"challenger\"}"
        )
        .await
            >= 1.0
    );

    router.child.kill().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
