//! Pooled HTTP/1.1 connections to the variants: one pool per upstream address, shared by every
//! config that names that address, so that a reload keeps the warm connections.
//!
//! A request takes the most recently returned idle connection (or opens one), writes its head and
//! body, and reads the response head, all in the task that serves the request: no task of the
//! connection's own stands between them. The messages are [`super::h1`]'s. The connection goes
//! back to the pool when its response body has been read to the end, if the response allows
//! another request after it; a connection whose response was not read to the end, or that failed,
//! is closed.
//!
//! An idle connection that the upstream has closed is seen at checkout (its socket has turned
//! readable while idle) and replaced, so that no request is sent over it. When the upstream closes
//! a reused connection just as a request goes out, and no byte of a response came back, the request
//! is sent once more over a new connection if that cannot repeat an effect: its method is
//! idempotent (RFC 9110 §9.2.2) and it has no body. Idle connections older than the idle timeout
//! (counted from the start of their last request) are closed by [`Pools::sweep`], which the router
//! runs every second; it also forgets the pools of addresses that the config no longer names.
//!
//! A request whose response head has not come within the request timeout fails with
//! [`UpstreamError::Timeout`], and its connection is closed. Each connection keeps that deadline
//! with one timer, made at its first wait and moved only when it fires: a request arms no timer of
//! its own.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::uri::Authority;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use super::h1::{self, Decoded, Decoder, ProtocolError, RequestFraming, ResponseHead};

/// Locks `m`. A poisoned lock only means that another task panicked while holding it; a pool's
/// data stays consistent between statements, so it is used as it is.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A request body sent upstream: the client's, streamed, or one read whole (for a mirrored request).
pub type ReqBody = Either<Incoming, Full<Bytes>>;

/// Why a request got no response from its upstream, or its response body broke off.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("connect: no connection within {0:?}")]
    ConnectTimeout(Duration),
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("upstream connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the upstream closed the connection before the end of the response")]
    Closed,
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("reading the request body: {0}")]
    RequestBody(Box<dyn std::error::Error + Send + Sync>),
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

    /// Closes the idle connections that have idled past the timeout or that their upstream closed,
    /// and forgets the pools of the addresses for which `named` is false (requests routed before
    /// still hold theirs).
    pub fn sweep(&self, now: Instant, named: impl Fn(&Authority) -> bool) {
        let mut hosts = lock(&self.hosts);
        hosts.retain(|h| named(&h.authority));
        for h in hosts.iter() {
            lock(&h.idle).retain_mut(|c| c.fresh(now, self.limits.idle_timeout));
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
    conn: Box<Conn>,
    since: Instant,
}

impl Idle {
    /// Whether the connection may carry a request at `now`: it has not idled past `timeout`, and
    /// its upstream has not closed it.
    fn fresh(&mut self, now: Instant, timeout: Duration) -> bool {
        now.saturating_duration_since(self.since) < timeout && self.conn.usable()
    }
}

/// Bytes read from a connection at a time, at first: enough for a usual response whole.
const READ_BUF: usize = 8 * 1024;
/// Bytes read at a time at most: reads that fill their room double it up to this, for large bodies.
const MAX_READ_BUF: usize = 256 * 1024;
/// Request body bytes gathered before they are written.
const WRITE_BATCH: usize = 16 * 1024;

/// One upstream connection.
struct Conn {
    stream: TcpStream,
    /// Bytes read and not yet taken: a response head, then its body.
    buf: BytesMut,
    /// The request head, and the small body pieces written with it.
    out: Vec<u8>,
    /// The request timeout's timer: made at the first wait, moved when it fires.
    timer: Option<Pin<Box<Sleep>>>,
    /// Bytes to make room for when the buffer runs low.
    read_size: usize,
}

/// A failed exchange, and whether the request may go again over a new connection: the upstream
/// closed the connection and no byte of a response came back.
struct Failed {
    error: UpstreamError,
    closed_before_response: bool,
}

impl From<UpstreamError> for Failed {
    fn from(error: UpstreamError) -> Failed {
        Failed {
            error,
            closed_before_response: false,
        }
    }
}

/// An I/O error on a connection before any response byte; one that says the upstream closed it
/// may be retried.
fn io_failed(e: std::io::Error) -> Failed {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
    Failed {
        closed_before_response: matches!(
            e.kind(),
            BrokenPipe | ConnectionAborted | ConnectionReset
        ),
        error: UpstreamError::Io(e),
    }
}

impl Conn {
    fn new(stream: TcpStream) -> Box<Conn> {
        Box::new(Conn {
            stream,
            buf: BytesMut::with_capacity(READ_BUF),
            out: Vec::with_capacity(1024),
            timer: None,
            read_size: READ_BUF,
        })
    }

    /// Whether an idle connection can carry a request: its socket has not turned readable (the
    /// upstream closed it, or sent something unasked). A readiness left from the last response is
    /// checked with one read.
    fn usable(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                self.buf.reserve(1);
                matches!(self.stream.try_read_buf(&mut self.buf),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Reads what has arrived into `buf`; `Ok(0)` at the end of the stream.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        // A read goes into the same buffer while a quarter of the read size is left in it.
        if self.buf.capacity() - self.buf.len() < self.read_size / 4 {
            // Reuses the same allocation when the bytes taken from it are no longer held.
            self.buf.reserve(self.read_size);
        }
        let room = self.buf.capacity() - self.buf.len();
        let read = std::pin::pin!(self.stream.read_buf(&mut self.buf)).poll(cx);
        if matches!(read, Poll::Ready(Ok(n)) if n == room) {
            self.read_size = (self.read_size * 2).min(MAX_READ_BUF);
        }
        read
    }

    /// Sends `req` and reads its response head, all within `timeout` of `started`.
    async fn exchange(
        &mut self,
        req: &mut Request<ReqBody>,
        started: Instant,
        timeout: Duration,
    ) -> Result<ResponseHead, Failed> {
        self.out.clear();
        let body = req.body();
        let (empty, exact) = (body.is_end_stream(), body.size_hint().exact());
        let framing = h1::encode_request(req, empty, exact, &mut self.out);
        let deadline = Deadline {
            at: tokio::time::Instant::from_std(started + timeout),
            timeout,
        };
        self.write_request(req.body_mut(), framing, deadline)
            .await?;
        let head_request = req.method() == Method::HEAD;
        let mut received = false;
        std::future::poll_fn(|cx| loop {
            match h1::parse_response(&mut self.buf, head_request) {
                Ok(Some(head)) => return Poll::Ready(Ok(head)),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Err(Failed::from(UpstreamError::from(e)))),
            }
            match self.poll_read(cx) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(Failed {
                        error: UpstreamError::Closed,
                        closed_before_response: !received,
                    }))
                }
                Poll::Ready(Ok(_)) => received = true,
                Poll::Ready(Err(e)) if !received => return Poll::Ready(Err(io_failed(e))),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Failed::from(UpstreamError::Io(e)))),
                Poll::Pending => return deadline.poll(&mut self.timer, cx).map(Err),
            }
        })
        .await
    }

    /// Writes the request head in `out` and the body after it. Body pieces that are ready go out
    /// with the head in one write; when the body has to be waited for, what is gathered goes first.
    ///
    /// The whole request body is written before the response is read: a response that the upstream
    /// sends before it has read the body is read after.
    async fn write_request(
        &mut self,
        body: &mut ReqBody,
        framing: RequestFraming,
        deadline: Deadline,
    ) -> Result<(), Failed> {
        if framing != RequestFraming::Empty {
            let chunked = framing == RequestFraming::Chunked;
            loop {
                let ready = std::future::poll_fn(|cx| {
                    Poll::Ready(match Pin::new(&mut *body).poll_frame(cx) {
                        Poll::Ready(frame) => Some(frame),
                        Poll::Pending => None,
                    })
                })
                .await;
                let frame = match ready {
                    Some(frame) => frame,
                    None => {
                        self.flush_out(deadline).await?;
                        let mut next = body.frame();
                        std::future::poll_fn(|cx| match Pin::new(&mut next).poll(cx) {
                            Poll::Ready(frame) => Poll::Ready(Ok(frame)),
                            Poll::Pending => deadline.poll(&mut self.timer, cx).map(Err),
                        })
                        .await?
                    }
                };
                let data = match frame {
                    None => break,
                    Some(Err(e)) => return Err(Failed::from(UpstreamError::RequestBody(e))),
                    // Trailers are not forwarded.
                    Some(Ok(f)) => match f.into_data() {
                        Ok(data) => data,
                        Err(_) => continue,
                    },
                };
                if data.len() >= WRITE_BATCH {
                    // Large pieces are written as they are, not copied.
                    if chunked {
                        h1::encode_chunk_size(data.len(), &mut self.out);
                    }
                    self.flush_out(deadline).await?;
                    write_all(&mut self.stream, &mut self.timer, &data, deadline).await?;
                    if chunked {
                        self.out.extend_from_slice(b"\r\n");
                    }
                    continue;
                }
                if chunked {
                    h1::encode_chunk(&data, &mut self.out);
                } else {
                    self.out.extend_from_slice(&data);
                }
                if self.out.len() >= WRITE_BATCH {
                    self.flush_out(deadline).await?;
                }
            }
            if chunked {
                self.out.extend_from_slice(h1::LAST_CHUNK);
            }
        }
        self.flush_out(deadline).await
    }

    async fn flush_out(&mut self, deadline: Deadline) -> Result<(), Failed> {
        if !self.out.is_empty() {
            write_all(&mut self.stream, &mut self.timer, &self.out, deadline).await?;
            self.out.clear();
        }
        Ok(())
    }
}

/// Writes all of `bytes`, failing at the deadline.
async fn write_all(
    stream: &mut TcpStream,
    timer: &mut Option<Pin<Box<Sleep>>>,
    bytes: &[u8],
    deadline: Deadline,
) -> Result<(), Failed> {
    let mut written = 0;
    std::future::poll_fn(|cx| {
        while written < bytes.len() {
            match Pin::new(&mut *stream).poll_write(cx, &bytes[written..]) {
                Poll::Ready(Ok(0)) => {
                    let e = std::io::Error::from(std::io::ErrorKind::WriteZero);
                    return Poll::Ready(Err(io_failed(e)));
                }
                Poll::Ready(Ok(n)) => written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(io_failed(e))),
                Poll::Pending => return deadline.poll(timer, cx).map(Err),
            }
        }
        Poll::Ready(Ok(()))
    })
    .await
}

/// When a request must have its response head.
#[derive(Clone, Copy)]
struct Deadline {
    at: tokio::time::Instant,
    timeout: Duration,
}

impl Deadline {
    /// Ready, with the timeout's failure, once the connection's timer has passed the deadline.
    /// The timer is made at the connection's first wait and only moved on when it fires: a request
    /// arms no timer of its own.
    fn poll(&self, timer: &mut Option<Pin<Box<Sleep>>>, cx: &mut Context<'_>) -> Poll<Failed> {
        let t = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(self.at)));
        loop {
            if t.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // Fired: this request's deadline, or an earlier request's.
            if t.deadline() >= self.at {
                return Poll::Ready(Failed::from(UpstreamError::Timeout(self.timeout)));
            }
            t.as_mut().reset(self.at);
        }
    }
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
        let repeatable = req.method().is_idempotent() && req.body().is_end_stream();
        loop {
            match conn
                .exchange(&mut req, now, self.limits.request_timeout)
                .await
            {
                Ok(head) => return Ok(self.response(conn, head, now)),
                Err(f) if f.closed_before_response && reused && repeatable => {
                    conn = Box::pin(self.connect()).await?;
                    reused = false;
                }
                Err(f) => return Err(f.error),
            }
        }
    }

    fn response(
        self: &Arc<Self>,
        conn: Box<Conn>,
        head: ResponseHead,
        since: Instant,
    ) -> Response<UpstreamBody> {
        let mut body = UpstreamBody {
            conn: Some(conn),
            pool: self.clone(),
            since,
            decoder: head.body,
            keep_alive: head.keep_alive,
        };
        if body.decoder.is_done() {
            body.release();
        }
        let mut resp = Response::new(body);
        *resp.status_mut() = head.status;
        *resp.headers_mut() = head.headers;
        resp
    }

    /// Idle connections held now.
    pub fn idle(&self) -> usize {
        lock(&self.idle).len()
    }

    /// The most recently returned connection that is still open and has not idled too long.
    fn checkout(&self, now: Instant) -> Option<Box<Conn>> {
        loop {
            let mut c = lock(&self.idle).pop()?;
            if c.fresh(now, self.limits.idle_timeout) {
                return Some(c.conn);
            }
        }
    }

    async fn connect(&self) -> Result<Box<Conn>, UpstreamError> {
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
        Ok(Conn::new(stream))
    }

    fn push(&self, conn: Box<Conn>, since: Instant) {
        let mut idle = lock(&self.idle);
        if idle.len() < self.limits.max_idle_per_host {
            idle.push(Idle { conn, since });
        }
    }
}

/// An upstream's response body, streamed from its connection. The connection goes back to the pool
/// when the body has been read to the end and the response allows another request; otherwise it is
/// closed with the body.
pub struct UpstreamBody {
    conn: Option<Box<Conn>>,
    pool: Arc<HostPool>,
    since: Instant,
    decoder: Decoder,
    keep_alive: bool,
}

impl UpstreamBody {
    fn release(&mut self) {
        if let Some(c) = self.conn.take() {
            // Bytes after the body were not asked for: the connection is not in step.
            if self.keep_alive && c.buf.is_empty() {
                self.pool.push(c, self.since);
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.decoder.decode(&mut conn.buf) {
                Ok(Decoded::Data(data)) => {
                    if this.decoder.is_done() {
                        this.release();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::End) => {
                    this.release();
                    return Poll::Ready(None);
                }
                Ok(Decoded::More) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
            match conn.poll_read(cx) {
                Poll::Ready(Ok(0)) => {
                    this.conn = None;
                    if this.decoder == Decoder::Close {
                        this.decoder = Decoder::Done;
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(UpstreamError::Closed)));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder {
            Decoder::Length(n) => SizeHint::with_exact(n),
            Decoder::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
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

    /// A listener on a free loopback port, and its address.
    async fn listen() -> (TcpListener, String) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        (l, addr)
    }

    /// A keep-alive HTTP/1.1 server that answers each request with its connection's number and
    /// closes a connection after `per_conn` responses (0: never). `GET /slow` is never answered.
    async fn upstream(per_conn: usize) -> (String, Arc<AtomicUsize>) {
        let (l, addr) = listen().await;
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
        // connection closed and goes over a new one, without an error. A POST is never sent twice,
        // so it too must find the closed connection at checkout, not by failing on it.
        for method in [Method::GET, Method::POST] {
            let (addr, conns) = upstream(1).await;
            let pool = Pools::new(limits()).host(&addr.parse().unwrap());
            for i in 1..=4 {
                let mut req = get("/");
                *req.method_mut() = method.clone();
                let r = pool.send(req, Instant::now()).await.unwrap();
                assert_eq!(body(r).await, format!("conn{i}"));
                assert_eq!(pool.idle(), 1);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(conns.load(Ordering::SeqCst), 4);
        }
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

    /// A body of the given pieces with no length known ahead: hyper sends it chunked.
    struct Pieces(std::collections::VecDeque<Bytes>);

    impl Body for Pieces {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.get_mut().0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    fn pieces(parts: &[&'static [u8]]) -> Pieces {
        Pieces(parts.iter().map(|p| Bytes::from_static(p)).collect())
    }

    /// An upstream served by hyper. It answers `<method> <framing> <body>` (the framing is
    /// `chunked` or the Content-Length), except:
    /// - `/pieces`: a chunked body of many pieces, 100 KiB in all;
    /// - `/until-close`: a body without a length, ended by closing the connection;
    /// - `/close`: a short body with `Connection: close`.
    async fn hyper_upstream() -> (String, Arc<AtomicUsize>) {
        let (l, addr) = listen().await;
        let conns = Arc::new(AtomicUsize::new(0));
        let c = conns.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                c.fetch_add(1, Ordering::SeqCst);
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let framing = match req.headers().get(http::header::CONTENT_LENGTH) {
                        Some(n) => n.to_str().unwrap().to_string(),
                        None if req.headers().contains_key(http::header::TRANSFER_ENCODING) => {
                            "chunked".to_string()
                        }
                        None => "none".to_string(),
                    };
                    let method = req.method().clone();
                    let path = req.uri().path().to_string();
                    let got = req.into_body().collect().await.unwrap().to_bytes();
                    let resp = match path.as_str() {
                        "/pieces" => {
                            let piece: &'static [u8] = &[b'x'; 1024];
                            Response::new(Either::Left(pieces(&[piece; 100])))
                        }
                        "/close" => Response::builder()
                            .header(http::header::CONNECTION, "close")
                            .body(Either::Right(Full::new(Bytes::from_static(b"bye"))))
                            .unwrap(),
                        _ => {
                            let mut text = format!("{method} {framing} ").into_bytes();
                            text.extend_from_slice(&got);
                            Response::new(Either::Right(Full::new(Bytes::from(text))))
                        }
                    };
                    Ok::<_, std::convert::Infallible>(resp)
                });
                tokio::spawn(async move {
                    let mut s = s;
                    // `/until-close` is answered by hand: hyper frames every body it sends.
                    let mut peek = [0u8; 32];
                    let n = s.peek(&mut peek).await.unwrap_or(0);
                    if peek[..n].starts_with(b"GET /until-close ") {
                        let _ = s.read(&mut [0u8; 4096]).await;
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\n\r\nall of it, until the end")
                            .await;
                        return;
                    }
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        (addr, conns)
    }

    /// A front server like the router's: each request, its body as hyper gives it, goes to `pool`.
    async fn front(pool: Arc<HostPool>) -> String {
        let (l, addr) = listen().await;
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                let pool = pool.clone();
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let pool = pool.clone();
                    async move {
                        let mut req = req.map(Either::Left);
                        req.headers_mut().remove(http::header::TRANSFER_ENCODING);
                        pool.send(req, Instant::now()).await
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc),
                );
            }
        });
        addr
    }

    /// Sends one request to `addr` over a new connection and returns the status and body.
    async fn call<B>(addr: &str, req: Request<B>) -> (u16, Bytes)
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let s = TcpStream::connect(addr).await.unwrap();
        let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        let resp = tx.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    }

    #[tokio::test]
    async fn request_bodies_go_with_their_framing_and_responses_of_every_framing_come_back() {
        let (addr, conns) = hyper_upstream().await;
        let pool = Pools::new(limits()).host(&addr.parse().unwrap());
        let front = front(pool.clone()).await;
        let req = |method: Method, uri: &str| {
            Request::builder()
                .method(method)
                .uri(uri)
                .header(http::header::HOST, "up")
        };
        let bodiless = |method: Method, uri: &str| {
            let r = req(method, uri).body(http_body_util::Empty::<Bytes>::new());
            call(&front, r.unwrap())
        };
        let with = |b: Bytes| req(Method::POST, "/").body(Full::new(b)).unwrap();

        // A body with a length, one with none (chunked on both sides), and none at all.
        let (_, b) = call(&front, with(Bytes::from_static(b"abc"))).await;
        assert_eq!(b, "POST 3 abc");
        let streamed = pieces(&[b"one ", b"two ", b"three"]);
        let (_, b) = call(&front, req(Method::POST, "/").body(streamed).unwrap()).await;
        assert_eq!(b, "POST chunked one two three");
        assert_eq!(bodiless(Method::POST, "/").await.1, "POST 0 ");
        assert_eq!(bodiless(Method::GET, "/").await.1, "GET none ");
        // A large body, over many writes and reads.
        let big = Bytes::from(vec![b'y'; 300 * 1024]);
        let (_, b) = call(&front, with(big.clone())).await;
        assert_eq!(b.len(), "POST 307200 ".len() + big.len());
        // A large streamed body: its big pieces are written as they are, in chunks.
        let big_pieces =
            Pieces(vec![Bytes::from(vec![b'z'; 40_000]), Bytes::from_static(b"end")].into());
        let (_, b) = call(&front, req(Method::POST, "/").body(big_pieces).unwrap()).await;
        assert_eq!(b.len(), "POST chunked ".len() + 40_003);
        assert!(b.ends_with(b"zzzend"));
        assert_eq!(
            conns.load(Ordering::SeqCst),
            1,
            "one connection carried them all"
        );

        // A chunked response of 100 pieces, streamed; the connection is reused after it.
        let (status, b) = bodiless(Method::GET, "/pieces").await;
        assert_eq!((status, b.len()), (200, 100 * 1024));
        assert!(b.iter().all(|&c| c == b'x'));
        assert_eq!(pool.idle(), 1);
        // HEAD: no body, whatever the length says.
        assert_eq!(bodiless(Method::HEAD, "/").await, (200, Bytes::new()));
        assert_eq!(conns.load(Ordering::SeqCst), 1);

        // `Connection: close` and a body ended by closing: read whole, and not pooled.
        assert_eq!(bodiless(Method::GET, "/close").await.1, "bye");
        assert_eq!(pool.idle(), 0);
        let (_, b) = bodiless(Method::GET, "/until-close").await;
        assert_eq!(b, "all of it, until the end");
        assert_eq!(pool.idle(), 0);
    }

    /// An upstream that reads a little of each request and writes `answer` then closes, or with
    /// `None` reads nothing and holds the connection for a minute.
    async fn raw_upstream(answer: Option<&'static [u8]>) -> String {
        let (l, addr) = listen().await;
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    match answer {
                        Some(answer) => {
                            let _ = s.read(&mut [0u8; 4096]).await;
                            let _ = s.write_all(answer).await;
                        }
                        None => tokio::time::sleep(Duration::from_secs(60)).await,
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_response_that_breaks_off_is_an_error_and_its_connection_is_not_reused() {
        let addr = raw_upstream(Some(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort")).await;
        let pool = Pools::new(limits()).host(&addr.parse().unwrap());
        let r = pool.send(get("/"), Instant::now()).await.unwrap();
        let e = r.into_body().collect().await.unwrap_err();
        assert!(matches!(e, UpstreamError::Closed), "{e}");
        assert_eq!(pool.idle(), 0);
    }

    #[tokio::test]
    async fn an_upstream_that_does_not_read_the_request_body_times_out() {
        let addr = raw_upstream(None).await;
        let timeout = Duration::from_millis(300);
        let pool = Pools::new(PoolLimits {
            request_timeout: timeout,
            ..limits()
        })
        .host(&addr.parse().unwrap());
        // More than the sockets' buffers hold.
        let body = Bytes::from(vec![0u8; 64 << 20]);
        let mut req = get("/");
        *req.method_mut() = Method::POST;
        req.headers_mut()
            .insert(http::header::CONTENT_LENGTH, body.len().into());
        *req.body_mut() = Either::Right(Full::new(body));
        let start = Instant::now();
        let Err(e) = pool.send(req, start).await else {
            panic!("a response from an upstream that reads nothing");
        };
        assert!(matches!(e, UpstreamError::Timeout(_)), "{e}");
        assert!(start.elapsed() < timeout * 4, "{:?}", start.elapsed());
        assert_eq!(pool.idle(), 0);
    }
}
