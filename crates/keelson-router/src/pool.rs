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
//! its own. The same timer bounds each wait for the client's request body: the body fails with
//! [`UpstreamError::RequestBodyTimeout`] when no piece of it comes within the body timeout (or the
//! request deadline passes first), and the connection, which carries part of a request, is closed.

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
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
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
    #[error("the client sent no request body bytes within {0:?}")]
    RequestBodyTimeout(Duration),
    #[error("no response body bytes within {0:?}")]
    ReadTimeout(Duration),
    #[error("{0} connections to the upstream are busy")]
    Busy(usize),
    #[error("HTTP/2 upstream: {0}")]
    H2(hyper::Error),
}

impl UpstreamError {
    /// Whether the client caused it (its request body broke off or stalled): not the variant's
    /// failure.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            UpstreamError::RequestBody(_) | UpstreamError::RequestBodyTimeout(_)
        )
    }
}

/// Limits of the pools.
#[derive(Clone, Copy, Debug)]
pub struct PoolLimits {
    pub connect_timeout: Duration,
    /// Time from sending a request to its response head.
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle_per_host: usize,
    /// Connections open to one address at most, idle ones included; a request that finds them all
    /// busy waits up to `connect_timeout` for one, then fails with [`UpstreamError::Busy`].
    pub max_conns_per_host: usize,
    /// Time a response body may go without a byte from the upstream.
    pub read_timeout: Duration,
    /// Time the client's request body may go without a piece coming, while the router waits for it.
    pub body_timeout: Duration,
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
            conns: Arc::new(Semaphore::new(self.limits.max_conns_per_host)),
            returned: Notify::new(),
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
    /// One permit per open connection, held by the connection.
    conns: Arc<Semaphore>,
    /// Told when a connection goes back to the idle list, for a request waiting for one.
    returned: Notify,
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
    /// The pool's permit for this connection, given back when it closes.
    permit: OwnedSemaphorePermit,
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
    fn new(stream: TcpStream, permit: OwnedSemaphorePermit) -> Box<Conn> {
        Box::new(Conn {
            stream,
            buf: BytesMut::with_capacity(READ_BUF),
            out: Vec::with_capacity(1024),
            timer: None,
            read_size: READ_BUF,
            permit,
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

    /// Sends `req` and reads its response head, all within `timeout` of `started`; each wait for
    /// the request body fails after `body_timeout`.
    async fn exchange(
        &mut self,
        req: &mut Request<ReqBody>,
        started: Instant,
        timeout: Duration,
        body_timeout: Duration,
    ) -> Result<ResponseHead, Failed> {
        self.out.clear();
        let body = req.body();
        let (empty, exact) = (body.is_end_stream(), body.size_hint().exact());
        let framing = h1::encode_request(req, empty, exact, &mut self.out);
        let deadline = Deadline {
            at: tokio::time::Instant::from_std(started + timeout),
            timeout,
            body_timeout,
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
                        // Waiting for the client: past the body timeout or the request deadline,
                        // the client's fault. Only a wait reads the clock and moves the timer.
                        let (at, timeout) = deadline.body_wait();
                        std::future::poll_fn(|cx| match Pin::new(&mut next).poll(cx) {
                            Poll::Ready(frame) => Poll::Ready(Ok(frame)),
                            Poll::Pending => poll_timer_at(&mut self.timer, at, cx).map(|()| {
                                Err(Failed::from(UpstreamError::RequestBodyTimeout(timeout)))
                            }),
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

/// When a request must have its response head, and how long a wait for its body may last.
#[derive(Clone, Copy)]
struct Deadline {
    at: tokio::time::Instant,
    timeout: Duration,
    body_timeout: Duration,
}

impl Deadline {
    /// When a wait for the client's request body that starts now fails, and the timeout that
    /// failure reports: the body timeout from now, or the request deadline when that comes first.
    fn body_wait(&self) -> (tokio::time::Instant, Duration) {
        let idle = tokio::time::Instant::now() + self.body_timeout;
        if idle < self.at {
            (idle, self.body_timeout)
        } else {
            (self.at, self.timeout)
        }
    }

    /// Ready, with the timeout's failure, once the connection's timer has passed the deadline.
    /// The timer is made at the connection's first wait and only moved on when it fires (or
    /// brought forward by a wait for the request body, see [`poll_timer_at`]): a request arms no
    /// timer of its own.
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

/// Ready once the connection's timer, set to `at` (moved there if it was set elsewhere), fires.
/// `at` is never past the request deadline, so [`Deadline::poll`] finds the timer before it.
fn poll_timer_at(
    timer: &mut Option<Pin<Box<Sleep>>>,
    at: tokio::time::Instant,
    cx: &mut Context<'_>,
) -> Poll<()> {
    let t = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
    if t.deadline() != at {
        t.as_mut().reset(at);
    }
    t.as_mut().poll(cx)
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
            None => Box::pin(self.checkout_or_connect(now)).await?,
        };
        let mut req = req;
        let repeatable = req.method().is_idempotent() && req.body().is_end_stream();
        loop {
            match conn
                .exchange(
                    &mut req,
                    now,
                    self.limits.request_timeout,
                    self.limits.body_timeout,
                )
                .await
            {
                Ok(head) => return Ok(self.response(conn, head, now)),
                Err(f) if f.closed_before_response && reused && repeatable => {
                    // The closed connection's permit is the new one's.
                    let permit = conn.permit;
                    conn = Box::pin(self.connect(permit)).await?;
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
            reads: 0,
            watched: None,
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

    /// A new connection when the cap allows one; otherwise the first connection given back to the
    /// idle list or the first free permit, within the connect timeout. `bool`: a reused connection.
    async fn checkout_or_connect(&self, now: Instant) -> Result<(Box<Conn>, bool), UpstreamError> {
        if let Ok(p) = self.conns.clone().try_acquire_owned() {
            return Ok((self.connect(p).await?, false));
        }
        let wait = async {
            loop {
                let returned = self.returned.notified();
                tokio::pin!(returned);
                returned.as_mut().enable();
                if let Some(c) = self.checkout(now) {
                    return Ok((c, true));
                }
                tokio::select! {
                    p = self.conns.clone().acquire_owned() => {
                        let Ok(p) = p else { return Err(UpstreamError::Busy(0)) };
                        return Ok((self.connect(p).await?, false));
                    }
                    () = &mut returned => {}
                }
            }
        };
        match tokio::time::timeout(self.limits.connect_timeout, wait).await {
            Ok(r) => r,
            Err(_) => Err(UpstreamError::Busy(self.limits.max_conns_per_host)),
        }
    }

    async fn connect(&self, permit: OwnedSemaphorePermit) -> Result<Box<Conn>, UpstreamError> {
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
        Ok(Conn::new(stream, permit))
    }

    fn push(&self, conn: Box<Conn>, since: Instant) {
        let mut idle = lock(&self.idle);
        if idle.len() < self.limits.max_idle_per_host {
            idle.push(Idle { conn, since });
            drop(idle);
            // Stores no permit when nobody waits: only requests at the cap ask.
            if self.conns.available_permits() == 0 {
                self.returned.notify_one();
            }
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
    /// Reads that brought bytes, and their count when the read timer last fired (`None`: the
    /// timer is not armed for the body yet).
    reads: u64,
    watched: Option<u64>,
}

impl UpstreamBody {
    /// Ready with [`UpstreamError::ReadTimeout`] once a whole read timeout has passed with no
    /// byte read. The connection's timer is armed when the body first waits and moved on each
    /// time it fires after bytes came, so no byte for between one and two timeouts ends the
    /// body; a body that never waits arms nothing.
    fn poll_read_timer(&mut self, cx: &mut Context<'_>) -> Poll<UpstreamError> {
        let timeout = self.pool.limits.read_timeout;
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Pending;
        };
        if self.watched.is_none() {
            self.watched = Some(self.reads);
            let at = tokio::time::Instant::now() + timeout;
            match conn.timer.as_mut() {
                Some(t) => t.as_mut().reset(at),
                None => conn.timer = Some(Box::pin(tokio::time::sleep_until(at))),
            }
        }
        let Some(t) = conn.timer.as_mut() else {
            return Poll::Pending;
        };
        while t.as_mut().poll(cx).is_ready() {
            if self.watched == Some(self.reads) {
                return Poll::Ready(UpstreamError::ReadTimeout(timeout));
            }
            self.watched = Some(self.reads);
            t.as_mut().reset(tokio::time::Instant::now() + timeout);
        }
        Poll::Pending
    }

    fn release(&mut self) {
        if let Some(mut c) = self.conn.take() {
            if self.watched.is_some() {
                // The timer was moved for the body: the next request's deadline makes its own.
                c.timer = None;
            }
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
                Poll::Ready(Ok(_)) => this.reads += 1,
                Poll::Ready(Err(e)) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Pending => {
                    return match this.poll_read_timer(cx) {
                        Poll::Ready(e) => {
                            this.conn = None;
                            Poll::Ready(Some(Err(e)))
                        }
                        Poll::Pending => Poll::Pending,
                    }
                }
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
#[path = "pool_tests.rs"]
mod tests;
