//! The real `keelson router` binary with gRPC variants (`protocol: h2c`), on loopback and without
//! a cluster: gRPC servers built on tonic's server side (`tonic::server::Grpc` with the prost
//! codec, served by hyper's HTTP/2 server) behind it, and tonic's own client (a `Channel`) in front.
//! Also the drain of an upstream that leaves the config, for HTTP/1.1 and h2c variants alike.
//!
//! The messages are prost structs written by hand, so no `protoc` and no build script:
//! ```proto
//! service Model {
//!   rpc Predict(PredictRequest) returns (PredictReply);
//!   rpc Stream(PredictRequest) returns (stream PredictReply);
//! }
//! ```
//!
//! No assertion is on time tighter than seconds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::http;
use hyper::http::uri::PathAndQuery;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_prost::ProstCodec;

/// The longest any case waits for something that must happen.
const PATIENCE: Duration = Duration::from_secs(30);

const PREDICT: &str = "/keelson.test.Model/Predict";
const STREAM: &str = "/keelson.test.Model/Stream";

#[derive(Clone, PartialEq, prost::Message)]
struct PredictRequest {
    /// `missing` makes the variant answer NOT_FOUND.
    #[prost(string, tag = "1")]
    model: String,
    /// The variant waits this long before it answers (each message, for `Stream`).
    #[prost(uint32, tag = "2")]
    sleep_ms: u32,
    /// Messages `Stream` sends.
    #[prost(uint32, tag = "3")]
    count: u32,
    /// `Stream` ends with NOT_FOUND after its messages.
    #[prost(bool, tag = "4")]
    fail_at_end: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PredictReply {
    /// The variant that answered.
    #[prost(string, tag = "1")]
    variant: String,
    #[prost(uint32, tag = "2")]
    seq: u32,
    /// The `grpc-timeout` the variant received, empty without one.
    #[prost(string, tag = "3")]
    grpc_timeout: String,
    /// The `x-user-id` the variant received.
    #[prost(string, tag = "4")]
    user: String,
}

/// The message of the NOT_FOUND status: non-ASCII and `%`, which gRPC percent-encodes.
const NOT_FOUND_MESSAGE: &str = "model \"missing\" not found: ünïcödé, 100% sure";

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type ReplyStream = Pin<Box<dyn futures::Stream<Item = Result<PredictReply, Status>> + Send>>;

/// What the variant saw of a request besides its message.
#[derive(Clone)]
struct Seen {
    variant: Arc<str>,
    grpc_timeout: String,
    user: String,
}

impl Seen {
    fn reply(&self, seq: u32) -> PredictReply {
        PredictReply {
            variant: self.variant.to_string(),
            seq,
            grpc_timeout: self.grpc_timeout.clone(),
            user: self.user.clone(),
        }
    }
}

struct Predict(Seen);

impl tonic::server::UnaryService<PredictRequest> for Predict {
    type Response = PredictReply;
    type Future = BoxFuture<Result<tonic::Response<PredictReply>, Status>>;

    fn call(&mut self, req: tonic::Request<PredictRequest>) -> Self::Future {
        let seen = self.0.clone();
        Box::pin(async move {
            let req = req.into_inner();
            if req.sleep_ms > 0 {
                tokio::time::sleep(Duration::from_millis(req.sleep_ms.into())).await;
            }
            if req.model == "missing" {
                return Err(Status::not_found(NOT_FOUND_MESSAGE));
            }
            Ok(tonic::Response::new(seen.reply(0)))
        })
    }
}

struct Stream(Seen);

impl tonic::server::ServerStreamingService<PredictRequest> for Stream {
    type Response = PredictReply;
    type ResponseStream = ReplyStream;
    type Future = BoxFuture<Result<tonic::Response<ReplyStream>, Status>>;

    fn call(&mut self, req: tonic::Request<PredictRequest>) -> Self::Future {
        let seen = self.0.clone();
        Box::pin(async move {
            let req = req.into_inner();
            let sleep = Duration::from_millis(req.sleep_ms.into());
            let messages = futures::stream::iter(0..req.count).then(move |seq| {
                let seen = seen.clone();
                async move {
                    tokio::time::sleep(sleep).await;
                    Ok(seen.reply(seq))
                }
            });
            let end = futures::stream::iter(
                req.fail_at_end
                    .then(|| Err(Status::not_found(NOT_FOUND_MESSAGE))),
            );
            let stream: ReplyStream = Box::pin(messages.chain(end));
            Ok(tonic::Response::new(stream))
        })
    }
}

/// One gRPC variant: `Model` on hyper's HTTP/2 server, answering with its name. Deadlines are the
/// router's to keep here: this server ignores them.
async fn grpc_variant(name: &str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let name: Arc<str> = name.into();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let name = name.clone();
            let svc = service_fn(move |req: http::Request<Incoming>| {
                let header = |h: &str| {
                    req.headers()
                        .get(h)
                        .map(|v| v.to_str().unwrap().to_string())
                        .unwrap_or_default()
                };
                let seen = Seen {
                    variant: name.clone(),
                    grpc_timeout: header("grpc-timeout"),
                    user: header("x-user-id"),
                };
                async move {
                    let mut grpc = tonic::server::Grpc::new(ProstCodec::<
                        PredictReply,
                        PredictRequest,
                    >::default());
                    let resp = match req.uri().path() {
                        PREDICT => grpc.unary(Predict(seen), req).await,
                        STREAM => grpc.server_streaming(Stream(seen), req).await,
                        _ => Status::unimplemented("no such method").into_http(),
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc),
            );
        }
    });
    addr
}

// ---------------------------------------------------------------------------------------------
// The router under test.

struct Router {
    addr: SocketAddr,
    config: PathBuf,
    _child: Child,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A router config over `(name, weight, upstream, protocol)`.
fn config(variants: &[(&str, u32, SocketAddr, &str)], sticky: Option<&str>) -> serde_json::Value {
    let variants: Vec<_> = variants
        .iter()
        .map(|(name, weight, up, protocol)| {
            serde_json::json!({"name": name, "weight": weight, "upstream": up.to_string(), "protocol": protocol})
        })
        .collect();
    let mut c = serde_json::json!({"version": 1, "variants": variants});
    if let Some(h) = sticky {
        c["stickyHeader"] = h.into();
    }
    c
}

impl Router {
    /// The router with `config`, reloading every 100 ms, once it is ready.
    async fn start(config: serde_json::Value, flags: &[&str]) -> Router {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "keelson-router-grpc-{}-{}",
            std::process::id(),
            N.fetch_add(1, Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config.json");
        std::fs::write(&file, config.to_string()).unwrap();
        for _ in 0..5 {
            let (addr, admin) = (free_port(), free_port());
            let mut child = Command::new(keelson_testkit::keelson_bin())
                .arg("router")
                .args(["--listen", &addr.to_string()])
                .args(["--admin-listen", &admin.to_string()])
                .args(["--config", file.to_str().unwrap()])
                .args(["--workers", "2", "--reload-interval-ms", "100"])
                .args(flags)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("keelson router starts");
            let ready = async {
                loop {
                    if child.try_wait().unwrap().is_some() {
                        return false;
                    }
                    if let Ok(mut s) = TcpStream::connect(admin).await {
                        let _ = s
                            .write_all(
                                b"GET /readyz HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
                            )
                            .await;
                        let mut out = Vec::new();
                        let _ = s.read_to_end(&mut out).await;
                        if out.starts_with(b"HTTP/1.1 200") {
                            return true;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            };
            if tokio::time::timeout(PATIENCE, ready)
                .await
                .expect("the router is ready")
            {
                return Router {
                    addr,
                    config: file,
                    _child: child,
                    _dir: TempDir(dir),
                };
            }
        }
        panic!("the router did not start on five pairs of free ports");
    }

    /// Replaces the config file atomically, as a ConfigMap volume does.
    fn write_config(&self, c: &serde_json::Value) {
        let next = self.config.with_extension("next");
        std::fs::write(&next, c.to_string()).unwrap();
        std::fs::rename(&next, &self.config).unwrap();
    }

    /// A tonic client over one HTTP/2 connection to the router.
    async fn client(&self) -> tonic::client::Grpc<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .expect("tonic connects to the router");
        tonic::client::Grpc::new(channel)
    }
}

async fn predict(
    client: &mut tonic::client::Grpc<Channel>,
    req: tonic::Request<PredictRequest>,
) -> Result<tonic::Response<PredictReply>, Status> {
    client.ready().await.unwrap();
    client
        .unary(
            req,
            PathAndQuery::from_static(PREDICT),
            ProstCodec::<PredictRequest, PredictReply>::default(),
        )
        .await
}

/// The replies of a `Stream` call, and the status it ended with.
async fn stream(
    client: &mut tonic::client::Grpc<Channel>,
    req: PredictRequest,
) -> (Vec<PredictReply>, Status) {
    client.ready().await.unwrap();
    let resp = client
        .server_streaming(
            tonic::Request::new(req),
            PathAndQuery::from_static(STREAM),
            ProstCodec::<PredictRequest, PredictReply>::default(),
        )
        .await;
    let mut stream = match resp {
        Ok(r) => r.into_inner(),
        Err(s) => return (Vec::new(), s),
    };
    let mut got = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(m)) => got.push(m),
            Ok(None) => return (got, Status::ok("")),
            Err(s) => return (got, s),
        }
    }
}

/// One gRPC call made by hand over a new HTTP/2 connection: the response head and trailers.
async fn raw_grpc(
    router: SocketAddr,
    path: &str,
    msg: &PredictRequest,
    headers: &[(&str, &str)],
) -> (http::response::Parts, Option<http::HeaderMap>) {
    use prost::Message;
    let s = TcpStream::connect(router).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(conn);
    let encoded = msg.encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&u32::try_from(encoded.len()).unwrap().to_be_bytes());
    body.extend_from_slice(&encoded);
    let mut req = http::Request::post(format!("http://{router}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = send
        .send_request(req.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let (head, body) = resp.into_parts();
    let got = body.collect().await.unwrap();
    (head, got.trailers().cloned())
}

fn request(model: &str) -> tonic::Request<PredictRequest> {
    tonic::Request::new(PredictRequest {
        model: model.into(),
        ..PredictRequest::default()
    })
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_split_by_weight_within_one_point() {
    let (a, b) = (
        grpc_variant("champion").await,
        grpc_variant("challenger").await,
    );
    let router = Router::start(
        config(
            &[("champion", 90, a, "h2c"), ("challenger", 10, b, "h2c")],
            None,
        ),
        &[],
    )
    .await;
    let client = router.client().await;
    let total = 10_000;
    let tasks = 32;
    let counts: Vec<BTreeMap<String, usize>> = futures::future::join_all((0..tasks).map(|_| {
        let mut client = client.clone();
        tokio::spawn(async move {
            let mut counts = BTreeMap::new();
            for _ in 0..total / tasks + 1 {
                let r = predict(&mut client, request("fraud")).await.unwrap();
                *counts.entry(r.into_inner().variant).or_insert(0) += 1;
            }
            counts
        })
    }))
    .await
    .into_iter()
    .map(Result::unwrap)
    .collect();
    let mut all = BTreeMap::new();
    for c in counts {
        for (k, v) in c {
            *all.entry(k).or_insert(0) += v;
        }
    }
    let n: usize = all.values().sum();
    let share = |v: &str| 100.0 * all.get(v).copied().unwrap_or(0) as f64 / n as f64;
    eprintln!("{n} RPCs: {all:?}");
    assert_eq!(all.len(), 2, "{all:?}");
    assert!((share("champion") - 90.0).abs() <= 1.0, "{all:?}");
    assert!((share("challenger") - 10.0).abs() <= 1.0, "{all:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_streams_and_deadlines_pass_through() {
    let a = grpc_variant("a").await;
    let router = Router::start(config(&[("a", 100, a, "h2c")], None), &[]).await;
    let mut client = router.client().await;

    // Unary: the reply, and `grpc-status: 0` in the trailers (tonic fails a call without it).
    let r = predict(&mut client, request("fraud")).await.unwrap();
    assert_eq!(r.get_ref().variant, "a");

    // An error status with its message, non-ASCII and `%` included.
    let e = predict(&mut client, request("missing")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_eq!(e.message(), NOT_FOUND_MESSAGE);

    // Server streaming: every message in order, then OK.
    let (got, end) = stream(
        &mut client,
        PredictRequest {
            count: 200,
            ..PredictRequest::default()
        },
    )
    .await;
    assert_eq!(end.code(), Code::Ok, "{end:?}");
    assert_eq!(
        got.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (0..200).collect::<Vec<_>>()
    );
    // A stream that ends in an error: the status comes in the trailers after the messages.
    let (got, end) = stream(
        &mut client,
        PredictRequest {
            count: 3,
            fail_at_end: true,
            ..PredictRequest::default()
        },
    )
    .await;
    assert_eq!(got.len(), 3);
    assert_eq!(end.code(), Code::NotFound, "{end:?}");
    assert_eq!(end.message(), NOT_FOUND_MESSAGE);

    // The deadline reaches the variant as the client sent it.
    let mut req = request("fraud");
    req.set_timeout(Duration::from_secs(7));
    let r = predict(&mut client, req).await.unwrap();
    let sent = r.get_ref().grpc_timeout.clone();
    let (digits, unit) = sent.split_at(sent.len().saturating_sub(1));
    let n: u64 = digits.parse().expect("a grpc-timeout reached the variant");
    let secs = n as f64
        * match unit {
            "H" => 3600.0,
            "M" => 60.0,
            "S" => 1.0,
            "m" => 1e-3,
            "u" => 1e-6,
            "n" => 1e-9,
            _ => panic!("grpc-timeout {sent:?}"),
        };
    assert!(secs > 6.0 && secs <= 7.0, "grpc-timeout {sent:?}");

    // A variant that does not answer within the deadline: DEADLINE_EXCEEDED from the router, at
    // the deadline and not when the variant would answer. (Sent with a bare HTTP/2 client: tonic's
    // channel keeps the deadline itself, and would cancel the call first.)
    let slow = PredictRequest {
        model: "fraud".into(),
        sleep_ms: 5_000,
        ..PredictRequest::default()
    };
    let start = Instant::now();
    let (head, trailers) = raw_grpc(router.addr, PREDICT, &slow, &[("grpc-timeout", "300m")]).await;
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(head.status, 200);
    // A trailers-only response: the status is in the one header block.
    assert!(trailers.is_none(), "{trailers:?}");
    assert_eq!(head.headers["content-type"], "application/grpc");
    assert_eq!(head.headers["grpc-status"], "4", "{head:?}");
    let message = head.headers["grpc-message"].to_str().unwrap();
    assert!(message.contains("keelson router"), "{message}");
    // The same through tonic: the call ends with the deadline, whoever ends it first.
    let mut req = tonic::Request::new(slow);
    req.set_timeout(Duration::from_millis(300));
    let start = Instant::now();
    let e = predict(&mut client, req).await.unwrap_err();
    assert!(
        matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{e:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );

    // The connection is still good after all that.
    let r = predict(&mut client, request("fraud")).await.unwrap();
    assert_eq!(r.get_ref().variant, "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_grpc_variant_is_unavailable() {
    let gone = free_port();
    let router = Router::start(config(&[("gone", 100, gone, "h2c")], None), &[]).await;
    let mut client = router.client().await;
    let e = predict(&mut client, request("fraud")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("keelson router"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_metadata_keeps_each_caller_on_one_variant() {
    let (a, b) = (grpc_variant("a").await, grpc_variant("b").await);
    let router = Router::start(
        config(
            &[("a", 50, a, "h2c"), ("b", 50, b, "h2c")],
            Some("x-user-id"),
        ),
        &[],
    )
    .await;
    let mut client = router.client().await;
    let mut by_variant: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for user in 0..200 {
        let user = format!("user-{user}");
        let mut seen = BTreeSet::new();
        for _ in 0..5 {
            let mut req = request("fraud");
            req.metadata_mut()
                .insert("x-user-id", user.parse().unwrap());
            let r = predict(&mut client, req).await.unwrap().into_inner();
            assert_eq!(r.user, user, "the metadata reaches the variant");
            seen.insert(r.variant);
        }
        assert_eq!(seen.len(), 1, "{user} went to {seen:?}");
        by_variant
            .entry(seen.into_iter().next().unwrap())
            .or_default()
            .insert(user);
    }
    let sizes: Vec<_> = by_variant.values().map(BTreeSet::len).collect();
    assert_eq!(sizes.len(), 2, "every caller on one variant: {sizes:?}");
    assert!(sizes.iter().all(|&n| n > 60), "{sizes:?}");
}

/// An HTTP/2 upstream (plain hyper) that reads the request whole and answers `200` with the
/// body `name`, and trailers: the request's trailers with `x-echo-` before their names, and
/// `x-from: name`.
async fn trailer_echo(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let svc = service_fn(move |req: http::Request<Incoming>| async move {
                let got = req.into_body().collect().await.unwrap();
                let mut trailers = http::HeaderMap::new();
                for (k, v) in got.trailers().into_iter().flatten() {
                    let name = http::HeaderName::try_from(format!("x-echo-{k}")).unwrap();
                    trailers.insert(name, v.clone());
                }
                trailers.insert("x-from", http::HeaderValue::from_static(name));
                let frames = vec![
                    Ok::<_, Infallible>(Frame::data(Bytes::from_static(name.as_bytes()))),
                    Ok(Frame::trailers(trailers)),
                ];
                Ok::<_, Infallible>(http::Response::new(StreamBody::new(futures::stream::iter(
                    frames,
                ))))
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc),
            );
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_response_trailers_pass_both_ways() {
    let up = trailer_echo("echo").await;
    let router = Router::start(config(&[("a", 100, up, "h2c")], None), &[]).await;
    // An HTTP/2 client whose request body ends with trailers.
    let s = TcpStream::connect(router.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-checksum", http::HeaderValue::from_static("abc"));
    let frames = vec![
        Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"payload"))),
        Ok(Frame::trailers(trailers)),
    ];
    let req = http::Request::post(format!("http://{}/echo", router.addr))
        .header("te", "trailers")
        .body(StreamBody::new(futures::stream::iter(frames)))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let got = resp.into_body().collect().await.unwrap();
    let t = got.trailers().cloned().expect("response trailers");
    assert_eq!(t["x-from"], "echo");
    assert_eq!(
        t["x-echo-x-checksum"], "abc",
        "the request's trailers reached the variant"
    );
    assert_eq!(got.to_bytes(), "echo");

    // An HTTP/1.1 client reaches the same h2c variant.
    let mut s = TcpStream::connect(router.addr).await.unwrap();
    s.write_all(b"GET /h1 HTTP/1.1\r\nhost: model.example\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("echo"), "{out}");
}

// ---------------------------------------------------------------------------------------------
// Drain: an upstream that leaves the config finishes its requests in flight.

/// An HTTP/1.1 upstream (hyper) that answers every request with `name` after `delay`.
async fn h1_variant(name: &'static str, delay: Duration) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let svc = service_fn(move |_req: http::Request<Incoming>| async move {
                tokio::time::sleep(delay).await;
                Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(
                    name.as_bytes(),
                ))))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc),
            );
        }
    });
    addr
}

/// One HTTP/1.1 GET through the router on a new connection: status line and body.
async fn get(router: SocketAddr) -> String {
    let mut s = TcpStream::connect(router).await.unwrap();
    s.write_all(b"GET /predict HTTP/1.1\r\nhost: m\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// Waits until new requests reach `want` (the config reload took effect).
async fn until_served_by<F, Fut>(want: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = String>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if probe().await.contains(want) {
            return;
        }
        assert!(Instant::now() < deadline, "requests never reached {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_upstream_that_leaves_the_config_finishes_its_requests() {
    let old = h1_variant("old", Duration::from_secs(3)).await;
    let new = h1_variant("new", Duration::ZERO).await;
    let router = Router::start(config(&[("old", 100, old, "http1")], None), &[]).await;
    let addr = router.addr;
    let slow = tokio::spawn(get(addr));
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The old variant leaves; new requests go to the new one, and the pool sweep runs meanwhile.
    router.write_config(&config(&[("new", 100, new, "http1")], None));
    until_served_by("new", || get(addr)).await;
    for _ in 0..20 {
        let r = get(addr).await;
        assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("new"), "{r}");
    }
    let r = slow.await.unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(
        r.ends_with("old"),
        "the request in flight finished on the old variant: {r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_upstream_that_leaves_the_config_finishes_its_calls() {
    let old = grpc_variant("old").await;
    let new = grpc_variant("new").await;
    let router = Router::start(config(&[("old", 100, old, "h2c")], None), &[]).await;
    let client = router.client().await;
    // A slow unary call and a stream of 10 messages 300 ms apart, both in flight at the reload.
    let mut c = client.clone();
    let unary = tokio::spawn(async move {
        let req = tonic::Request::new(PredictRequest {
            model: "fraud".into(),
            sleep_ms: 3_000,
            ..PredictRequest::default()
        });
        predict(&mut c, req).await
    });
    let mut c = client.clone();
    let streaming = tokio::spawn(async move {
        stream(
            &mut c,
            PredictRequest {
                count: 10,
                sleep_ms: 300,
                ..PredictRequest::default()
            },
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    router.write_config(&config(&[("new", 100, new, "h2c")], None));
    let mut c = client.clone();
    until_served_by("new", || {
        let mut c = c.clone();
        async move {
            predict(&mut c, request("fraud"))
                .await
                .map(|r| r.into_inner().variant)
                .unwrap_or_else(|e| e.to_string())
        }
    })
    .await;
    for _ in 0..20 {
        let r = predict(&mut c, request("fraud")).await.unwrap();
        assert_eq!(r.into_inner().variant, "new");
    }
    let r = unary.await.unwrap().expect("the call in flight finished");
    assert_eq!(r.into_inner().variant, "old");
    let (got, end) = streaming.await.unwrap();
    assert_eq!(end.code(), Code::Ok, "{end:?}");
    assert_eq!(got.len(), 10);
    assert!(got.iter().all(|m| m.variant == "old"));
}
