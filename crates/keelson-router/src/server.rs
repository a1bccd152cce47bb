//! The listeners: the data port (HTTP/1.1 with keep-alive, and HTTP/2 over cleartext with prior
//! knowledge, told apart by the connection preface) and the admin port (`/healthz`, `/readyz`,
//! `/metrics`).
//!
//! A client connection that has had no request in progress for the idle timeout is closed: an idle
//! keep-alive connection, and one whose request headers come too slowly (a request is in progress
//! from its complete headers to the end of its response). One whose responses have started and
//! none of which has moved for the send timeout is closed too: a client that stops reading, or an
//! HTTP/2 client that grants no flow-control window. A watch task per connection checks four
//! times per the shorter timeout, so a connection goes between 1 and 1.25 timeouts after it went
//! quiet; requests themselves arm no timer.
//!
//! At most `max_connections` client connections are served at once; beyond that the listener's
//! backlog holds the next ones until one closes. HTTP/1.1 request heads are bounded by
//! `max_header_bytes` (hyper answers `431` past it), HTTP/2 header lists too, and an HTTP/2
//! connection carries `max_concurrent_streams` requests at once.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::metrics::Metrics;
use super::proxy::Proxy;
use super::reply::{text, Body};

/// Limits of the client side.
#[derive(Clone, Copy, Debug)]
pub struct ClientLimits {
    /// A connection without a request in progress for this long is closed.
    pub idle_timeout: Duration,
    /// A connection whose started responses have not moved for this long is closed.
    pub send_timeout: Duration,
    /// Client connections served at once.
    pub max_connections: usize,
    /// Bytes of an HTTP/1.1 request head (hyper's read buffer), and of an HTTP/2 header list.
    pub max_header_bytes: usize,
    /// Requests at once on one HTTP/2 connection.
    pub max_concurrent_streams: u32,
}

impl Default for ClientLimits {
    fn default() -> ClientLimits {
        ClientLimits {
            idle_timeout: Duration::from_secs(30),
            send_timeout: Duration::from_secs(60),
            max_connections: 4096,
            max_header_bytes: 32 * 1024,
            max_concurrent_streams: 128,
        }
    }
}

/// Serves the data port until `shutdown` resolves, then lets open connections finish their
/// requests for up to `grace`.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    limits: ClientLimits,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The idle watch below bounds the time to send request headers: hyper's own header timeout
    // would arm a timer per request.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(limits.max_concurrent_streams)
        .keep_alive_interval(Duration::from_secs(30));
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        // A free slot first: past the cap, connections wait in the listener's backlog.
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s,
            () = &mut shutdown => break,
        };
        let Ok(slot) = slot else { break };
        let stream = tokio::select! {
            s = accept(&listener, "data") => s,
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let p = proxy.clone();
        let activity = Arc::new(Activity::default());
        let a = activity.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            let p = p.clone();
            let in_progress = InProgress::start(&a);
            async move {
                let resp = p.handle(req).await;
                in_progress.0.responding.fetch_add(1, Relaxed);
                Ok::<_, Infallible>(resp.map(|body| Tracked { body, in_progress }))
            }
        });
        let conn = graceful.watch(
            builder
                .serve_connection(TokioIo::new(stream), svc)
                .into_owned(),
        );
        // The slot goes with the connection's task: when it ends, or is aborted.
        let task = tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
        tokio::spawn(close_when_idle(task, activity, limits));
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "connections still open after the grace period; closing them"
        );
    }
}

/// Requests in progress on one client connection, responses finished on it, responses started
/// (their body handed to hyper) and not finished, and the body frames hyper has taken.
#[derive(Default)]
struct Activity {
    in_progress: AtomicU32,
    finished: AtomicU64,
    responding: AtomicU32,
    frames: AtomicU64,
}

/// One request in progress, from its complete headers until its response body is dropped (hyper
/// drops it once written, or with the connection).
struct InProgress(Arc<Activity>);

impl InProgress {
    fn start(a: &Arc<Activity>) -> InProgress {
        a.in_progress.fetch_add(1, Relaxed);
        InProgress(a.clone())
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Relaxed);
        self.0.in_progress.fetch_sub(1, Relaxed);
    }
}

/// A response body that keeps its request in progress while hyper holds it.
pub struct Tracked {
    body: Body,
    in_progress: InProgress,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.in_progress.0.responding.fetch_sub(1, Relaxed);
    }
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = <Body as hyper::body::Body>::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        if frame.is_ready() {
            this.in_progress.0.frames.fetch_add(1, Relaxed);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Aborts the connection `task` (closing its socket) once it has had no request in progress and
/// finished none for the idle timeout, or once it has responses started and none of them has
/// moved (no body frame taken, no response finished) for the send timeout; checked every quarter
/// of the shorter one. Returns when the task ends.
async fn close_when_idle(
    task: tokio::task::JoinHandle<()>,
    activity: Arc<Activity>,
    limits: ClientLimits,
) {
    let idle_timeout = limits.idle_timeout.max(Duration::from_millis(1));
    let send_timeout = limits.send_timeout.max(Duration::from_millis(1));
    let tick = (idle_timeout.min(send_timeout) / 4).max(Duration::from_millis(1));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = (
        activity.finished.load(Relaxed),
        activity.frames.load(Relaxed),
    );
    let (mut idle, mut stalled) = (Duration::ZERO, Duration::ZERO);
    loop {
        ticks.tick().await;
        if task.is_finished() {
            return;
        }
        let now = (
            activity.finished.load(Relaxed),
            activity.frames.load(Relaxed),
        );
        let moved = now != last;
        last = now;
        if activity.in_progress.load(Relaxed) == 0 && !moved {
            idle += tick;
        } else {
            idle = Duration::ZERO;
        }
        if activity.responding.load(Relaxed) > 0 && !moved {
            stalled += tick;
        } else {
            stalled = Duration::ZERO;
        }
        if idle >= idle_timeout {
            tracing::debug!(timeout = ?idle_timeout, "closing an idle connection");
            task.abort();
            return;
        }
        if stalled >= send_timeout {
            tracing::debug!(timeout = ?send_timeout, "closing a connection whose responses do not move");
            task.abort();
            return;
        }
    }
}

/// The next connection of `listener`. A failed accept (out of file descriptors and the like) is
/// logged and retried a little later instead of spinning. Cancel-safe.
async fn accept(listener: &TcpListener, port: &str) -> tokio::net::TcpStream {
    loop {
        match listener.accept().await {
            Ok((s, _)) => return s,
            Err(e) => {
                tracing::warn!(error = %e, port, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves `/healthz` (the process runs), `/readyz` (a valid config is loaded) and `/metrics`.
pub async fn serve_admin(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let builder = auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            s = accept(&listener, "admin") => s,
            () = &mut shutdown => return,
        };
        let (p, m) = (proxy.clone(), metrics.clone());
        let svc = service_fn(move |req: Request<Incoming>| {
            let resp = admin(&req, &p, &m);
            async move { Ok::<_, Infallible>(resp) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

/// The admin endpoints.
pub fn admin(req: &Request<Incoming>, proxy: &Proxy, metrics: &Metrics) -> Response<Body> {
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if proxy.ready() => text(StatusCode::OK, "ok\n"),
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "no valid router config loaded yet\n",
        ),
        "/metrics" => {
            let mut r = Response::new(Either::Right(Full::new(Bytes::from(metrics.encode()))));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: the admin port serves /healthz, /readyz and /metrics\n",
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::config::Route;
    use crate::proxy::Limits;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// The router on a free port with `idle_timeout`, in front of a variant that answers each
    /// request after `delay`.
    async fn router(idle_timeout: Duration, delay: Duration) -> String {
        let variant = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = variant.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = variant.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        tokio::time::sleep(delay).await;
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let proxy = Arc::new(Proxy::new(Limits::default()));
        let json = format!(
            r#"{{"version": 1, "variants": [{{"name": "a", "weight": 1, "upstream": "{upstream}"}}]}}"#
        );
        let route = Route::parse(&json, &Metrics::default()).unwrap();
        proxy.route.store(Some(Arc::new(route)));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let never = std::future::pending::<()>();
        let limits = ClientLimits {
            idle_timeout,
            ..ClientLimits::default()
        };
        tokio::spawn(serve(l, proxy, never, Duration::from_secs(1), limits));
        addr
    }

    /// Sends one request on `s` and reads its response whole.
    async fn get(s: &mut TcpStream) -> String {
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"ok") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed mid-response: {:?}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(got).unwrap()
    }

    /// Time until the router closes `s` (at most 5 s).
    async fn closed_after(s: &mut TcpStream) -> Duration {
        let start = Instant::now();
        let mut buf = [0u8; 64];
        let closed = async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return start.elapsed(),
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), closed)
            .await
            .expect("the connection is still open after 5 s")
    }

    #[tokio::test]
    async fn idle_and_slow_header_connections_close_and_busy_ones_stay() {
        let t = Duration::from_millis(400);
        let addr = router(t, Duration::from_millis(600)).await;
        // Headers that never complete: closed after the timeout.
        let mut slow = TcpStream::connect(&addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        // A response that takes longer than the timeout is not cut, and the connection then
        // idles for the timeout before it is closed.
        let mut busy = TcpStream::connect(&addr).await.unwrap();
        let (slow_closed, resp) = tokio::join!(closed_after(&mut slow), get(&mut busy));
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert!(
            slow_closed >= t * 3 / 4 && slow_closed < t * 3,
            "the slow client was closed after {slow_closed:?}"
        );
        let idle_closed = closed_after(&mut busy).await;
        assert!(
            idle_closed >= t * 3 / 4 && idle_closed < t * 3,
            "the idle connection was closed after {idle_closed:?}"
        );
    }
}
