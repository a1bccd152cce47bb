//! Pooled HTTP/1.1 connections to the variants: one pool per upstream address, shared by every
//! config that names that address, so that a reload keeps the warm connections.
//!
//! A request takes the most recently returned idle connection (or opens one) and gives it back
//! when its response body has been read to the end; the connection is then ready for the next
//! request at once. A connection whose response was not read to the end, or that failed, is not
//! given back: hyper closes it. A request that a reused connection could not send (the upstream
//! closed it while it was idle) is sent once more over a new connection; nothing of it had been
//! written. Idle connections older than the idle timeout (counted from the start of their last
//! request) are closed by [`Pools::sweep`], which the router runs every second; it also forgets the
//! pools of addresses that the config no longer names.
//!
//! A connection whose request has waited longer than the request timeout for its response head is
//! closed, and the request fails with [`UpstreamError::Timeout`]. The connection's own task keeps
//! that deadline with one timer, armed when a request starts to wait and moved only when it fires:
//! a request costs two stores, not a timer of its own.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response};
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{Builder, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::controller::lock;

/// A request body sent upstream: the client's, streamed, or one read whole (for a mirrored request).
pub type ReqBody = Either<Incoming, Full<Bytes>>;

/// Why a request got no response from its upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("connect: no connection within {0:?}")]
    ConnectTimeout(Duration),
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// Limits of the pools.
#[derive(Clone, Copy, Debug)]
pub struct PoolLimits {
    pub connect_timeout: Duration,
    /// Time from sending a request to its response head.
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle_per_host: usize,
}

/// Every upstream address's pool.
pub struct Pools {
    hosts: Mutex<Vec<Arc<HostPool>>>,
    limits: PoolLimits,
}

impl Pools {
    pub fn new(limits: PoolLimits) -> Pools {
        Pools {
            hosts: Mutex::new(Vec::new()),
            limits,
        }
    }

    /// The pool of `authority`, made on first use. A config names a handful of variants, so the
    /// list is short and scanned.
    pub fn host(&self, authority: &Authority) -> Arc<HostPool> {
        let mut hosts = lock(&self.hosts);
        if let Some(h) = hosts.iter().find(|h| h.authority == *authority) {
            return h.clone();
        }
        let h = Arc::new(HostPool {
            authority: authority.clone(),
            idle: Mutex::new(Vec::new()),
            limits: self.limits,
        });
        hosts.push(h.clone());
        h
    }

    /// Closes the idle connections that have idled past the timeout, and forgets the pools of the
    /// addresses for which `named` is false (requests routed before still hold theirs).
    pub fn sweep(&self, now: Instant, named: impl Fn(&Authority) -> bool) {
        let mut hosts = lock(&self.hosts);
        hosts.retain(|h| named(&h.authority));
        for h in hosts.iter() {
            lock(&h.idle).retain(|c| {
                !c.conn.tx.is_closed()
                    && now.saturating_duration_since(c.since) < self.limits.idle_timeout
            });
        }
    }
}

/// The idle connections to one upstream address.
pub struct HostPool {
    authority: Authority,
    idle: Mutex<Vec<Idle>>,
    limits: PoolLimits,
}

impl std::fmt::Debug for HostPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostPool")
            .field("authority", &self.authority)
            .field("idle", &lock(&self.idle).len())
            .finish()
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// One upstream connection: its request sender and what its task watches.
struct Conn {
    tx: SendRequest<ReqBody>,
    exchange: Arc<Exchange>,
}

/// The times of this process, as nanoseconds since its first request (an `Instant` in an atomic).
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// The state of a connection's exchange that its task reads to keep the request timeout.
#[derive(Default)]
struct Exchange {
    /// A request waits for its response head.
    waiting: AtomicBool,
    /// When that request started (nanoseconds since [`EPOCH`]).
    started: AtomicU64,
    /// The connection was closed because the request waited too long.
    expired: AtomicBool,
}

impl Exchange {
    fn begin(&self, now: Instant) {
        let nanos = now.saturating_duration_since(*EPOCH).as_nanos();
        self.started
            .store(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.waiting.store(true, Ordering::Release);
    }

    fn end(&self) {
        self.waiting.store(false, Ordering::Relaxed);
    }

    /// The start of the request that waits, if one does.
    fn waiting_since(&self) -> Option<Instant> {
        self.waiting
            .load(Ordering::Acquire)
            .then(|| *EPOCH + Duration::from_nanos(self.started.load(Ordering::Relaxed)))
    }
}

/// Drives one connection until it ends, or until a request on it has waited `timeout` for its
/// response head: then the connection is dropped (closed), and that request fails.
async fn drive(
    conn: impl Future<Output = hyper::Result<()>>,
    exchange: Arc<Exchange>,
    timeout: Duration,
) -> hyper::Result<()> {
    let mut conn = std::pin::pin!(conn);
    // Made at the first wait and kept: a fired timer is moved to the next deadline, never rebuilt.
    let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    // The timer will wake this task: until it has fired, there is nothing to look at.
    let mut armed = false;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = conn.as_mut().poll(cx) {
            return Poll::Ready(r);
        }
        if armed && timer.as_ref().is_some_and(|t| !t.is_elapsed()) {
            return Poll::Pending;
        }
        armed = false;
        let Some(started) = exchange.waiting_since() else {
            return Poll::Pending;
        };
        let deadline = tokio::time::Instant::from_std(started + timeout);
        let t = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        loop {
            if t.as_mut().poll(cx).is_pending() {
                armed = true;
                return Poll::Pending;
            }
            // Fired: the waiting request's deadline, or that of an earlier request.
            if t.deadline() >= deadline {
                exchange.expired.store(true, Ordering::Relaxed);
                return Poll::Ready(Ok(()));
            }
            t.as_mut().reset(deadline);
        }
    })
    .await
}

impl HostPool {
    /// Sends `req` (origin-form URI, `Host` set) over a pooled or new connection. `now` is the time
    /// the request started, also kept as the time its connection went idle: the clock is read once
    /// per request.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<ReqBody>,
        now: Instant,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        // Connecting is boxed: its state would otherwise widen every request's future.
        let (mut conn, mut reused) = match self.checkout(now) {
            Some(c) => (c, true),
            None => (Box::pin(self.connect()).await?, false),
        };
        let mut req = req;
        loop {
            conn.exchange.begin(now);
            let sent = conn.tx.try_send_request(req).await;
            conn.exchange.end();
            match sent {
                Ok(resp) => {
                    let lease = Lease {
                        conn,
                        pool: self.clone(),
                        since: now,
                    };
                    return Ok(resp.map(|inner| UpstreamBody {
                        inner,
                        lease: Some(lease),
                    }));
                }
                Err(_) if conn.exchange.expired.load(Ordering::Relaxed) => {
                    return Err(UpstreamError::Timeout(self.limits.request_timeout))
                }
                Err(mut e) => match e.take_message() {
                    Some(r) if reused => {
                        req = r;
                        conn = Box::pin(self.connect()).await?;
                        reused = false;
                    }
                    _ => return Err(e.into_error().into()),
                },
            }
        }
    }

    /// Idle connections held now.
    pub fn idle(&self) -> usize {
        lock(&self.idle).len()
    }

    /// The most recently returned connection that is still open and has not idled too long.
    fn checkout(&self, now: Instant) -> Option<Conn> {
        let mut idle = lock(&self.idle);
        while let Some(c) = idle.pop() {
            if c.conn.tx.is_ready()
                && now.saturating_duration_since(c.since) < self.limits.idle_timeout
            {
                return Some(c.conn);
            }
        }
        None
    }

    async fn connect(&self) -> Result<Conn, UpstreamError> {
        let stream = match tokio::time::timeout(
            self.limits.connect_timeout,
            TcpStream::connect(self.authority.as_str()),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(UpstreamError::Connect(e)),
            Err(_) => return Err(UpstreamError::ConnectTimeout(self.limits.connect_timeout)),
        };
        let _ = stream.set_nodelay(true);
        let (tx, conn) = Builder::new().handshake(TokioIo::new(stream)).await?;
        let authority = self.authority.clone();
        let exchange = Arc::new(Exchange::default());
        let driven = drive(conn, exchange.clone(), self.limits.request_timeout);
        tokio::spawn(async move {
            if let Err(e) = driven.await {
                tracing::debug!(upstream = %authority, error = %e, "upstream connection ended with an error");
            }
        });
        Ok(Conn { tx, exchange })
    }

    /// Takes a connection back after its response was read to the end.
    fn put(self: &Arc<Self>, mut conn: Conn, since: Instant) {
        if conn.tx.is_ready() {
            self.push(conn, since);
            return;
        }
        if conn.tx.is_closed() {
            return;
        }
        // The connection is still finishing the exchange: pool it once it is done, if that is within
        // the time a new connection would be given.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let pool = self.clone();
        rt.spawn(async move {
            if let Ok(Ok(())) =
                tokio::time::timeout(pool.limits.connect_timeout, conn.tx.ready()).await
            {
                pool.push(conn, since);
            }
        });
    }

    fn push(&self, conn: Conn, since: Instant) {
        let mut idle = lock(&self.idle);
        if idle.len() < self.limits.max_idle_per_host {
            idle.push(Idle { conn, since });
        }
    }
}

struct Lease {
    conn: Conn,
    pool: Arc<HostPool>,
    since: Instant,
}

/// An upstream's response body, streamed. Its connection goes back to the pool when the body has
/// been read to the end.
pub struct UpstreamBody {
    inner: Incoming,
    lease: Option<Lease>,
}

impl UpstreamBody {
    fn release(&mut self) {
        if let Some(l) = self.lease.take() {
            l.pool.put(l.conn, l.since);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(),
            // A broken response: the connection is not reused.
            Poll::Ready(Some(Err(_))) => this.lease = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn limits() -> PoolLimits {
        PoolLimits {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_idle_per_host: 8,
        }
    }

    fn get(path: &str) -> Request<ReqBody> {
        Request::builder()
            .uri(path)
            .header(http::header::HOST, "upstream")
            .body(Either::Right(Full::new(Bytes::new())))
            .unwrap()
    }

    /// A keep-alive HTTP/1.1 server that answers each request with its connection's number and
    /// closes a connection after `per_conn` responses (0: never). `GET /slow` is never answered.
    async fn upstream(per_conn: usize) -> (String, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let conns = Arc::new(AtomicUsize::new(0));
        let c = conns.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut served = 0;
                    let mut chunk = [0u8; 1024];
                    loop {
                        let Ok(r) = s.read(&mut chunk).await else {
                            return;
                        };
                        if r == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..r]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head: Vec<u8> = buf.drain(..end + 4).collect();
                            if head.starts_with(b"GET /slow ") {
                                continue;
                            }
                            let body = format!("conn{n}");
                            let resp = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            if s.write_all(resp.as_bytes()).await.is_err() {
                                return;
                            }
                            served += 1;
                            if per_conn > 0 && served == per_conn {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, conns)
    }

    async fn body(r: Response<UpstreamBody>) -> String {
        let b = r.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_request_without_a_response_head_in_time_fails_and_its_connection_closes() {
        let (addr, conns) = upstream(0).await;
        let timeout = Duration::from_millis(300);
        let pools = Pools::new(PoolLimits {
            request_timeout: timeout,
            ..limits()
        });
        let pool = pools.host(&addr.parse().unwrap());
        // Answered requests spread over more than the timeout: the connection's timer fires
        // between them and is moved on, and the connection stays.
        for _ in 0..4 {
            let r = pool.send(get("/"), Instant::now()).await.unwrap();
            assert_eq!(body(r).await, "conn1");
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        let start = Instant::now();
        let Err(e) = pool.send(get("/slow"), start).await else {
            panic!("/slow was answered");
        };
        let took = start.elapsed();
        assert!(
            matches!(e, UpstreamError::Timeout(t) if t == timeout),
            "{e}"
        );
        assert!(took >= timeout && took < timeout * 4, "{took:?}");
        // That connection is closed; the next request gets a new one.
        assert_eq!(pool.idle(), 0);
        let r = pool.send(get("/"), Instant::now()).await.unwrap();
        assert_eq!(body(r).await, "conn2");
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_response_is_read() {
        let (addr, conns) = upstream(0).await;
        let pools = Pools::new(limits());
        let pool = pools.host(&addr.parse().unwrap());
        for _ in 0..5 {
            let r = pool.send(get("/"), Instant::now()).await.unwrap();
            assert_eq!(body(r).await, "conn1");
            assert_eq!(pool.idle(), 1);
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1);
        // Two at once need two connections; both are pooled afterwards.
        let (a, b) = tokio::join!(
            pool.send(get("/"), Instant::now()),
            pool.send(get("/"), Instant::now())
        );
        let (a, b) = (body(a.unwrap()).await, body(b.unwrap()).await);
        assert_ne!(a, b);
        assert_eq!(pool.idle(), 2);
        // The same address gives the same pool.
        assert!(Arc::ptr_eq(&pool, &pools.host(&addr.parse().unwrap())));
    }

    #[tokio::test]
    async fn an_unread_response_does_not_go_back_to_the_pool() {
        let (addr, _) = upstream(0).await;
        let pool = Pools::new(limits()).host(&addr.parse().unwrap());
        let r = pool.send(get("/"), Instant::now()).await.unwrap();
        drop(r);
        assert_eq!(pool.idle(), 0);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_replaced() {
        // The upstream closes every connection after one response: each request finds its pooled
        // connection closed (or closing) and goes over a new one, without an error.
        let (addr, conns) = upstream(1).await;
        let pool = Pools::new(limits()).host(&addr.parse().unwrap());
        for i in 1..=4 {
            let r = pool.send(get("/"), Instant::now()).await.unwrap();
            assert_eq!(body(r).await, format!("conn{i}"));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(conns.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn idle_connections_past_the_timeout_are_not_used() {
        let (addr, conns) = upstream(0).await;
        let pool = Pools::new(PoolLimits {
            idle_timeout: Duration::from_millis(50),
            ..limits()
        })
        .host(&addr.parse().unwrap());
        body(pool.send(get("/"), Instant::now()).await.unwrap()).await;
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(
            body(pool.send(get("/"), Instant::now()).await.unwrap()).await,
            "conn2"
        );
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn the_sweep_closes_stale_connections_and_forgets_unnamed_addresses() {
        let (addr, conns) = upstream(0).await;
        let authority: Authority = addr.parse().unwrap();
        let pools = Pools::new(PoolLimits {
            idle_timeout: Duration::from_millis(50),
            ..limits()
        });
        let pool = pools.host(&authority);
        body(pool.send(get("/"), Instant::now()).await.unwrap()).await;
        // Fresh and named: kept.
        pools.sweep(Instant::now(), |_| true);
        assert_eq!(pool.idle(), 1);
        // Past the idle timeout: closed, without any request coming.
        pools.sweep(Instant::now() + Duration::from_millis(60), |_| true);
        assert_eq!(pool.idle(), 0);
        // No longer named by the config: the address gets a new pool next time.
        pools.sweep(Instant::now(), |a| *a != authority);
        assert!(!Arc::ptr_eq(&pool, &pools.host(&authority)));
        assert_eq!(conns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_address_nobody_listens_on_fails_at_once() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let pool = Pools::new(limits()).host(&addr.parse().unwrap());
        let Err(e) = pool.send(get("/"), Instant::now()).await else {
            panic!("a response from an address nobody listens on")
        };
        assert!(matches!(e, UpstreamError::Connect(_)), "{e}");
    }
}
