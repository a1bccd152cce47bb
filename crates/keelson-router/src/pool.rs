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
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response};
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::conn::Conn;
use super::h1::{Decoded, Decoder, ResponseHead};
use super::upstream::{connect, lock, Hosts, ReqBody, UpstreamError};

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
    hosts: Hosts<HostPool>,
    limits: PoolLimits,
}

impl Pools {
    pub fn new(limits: PoolLimits) -> Pools {
        Pools {
            hosts: Hosts::new(),
            limits,
        }
    }

    /// The pool of `authority`, made on first use.
    pub fn host(&self, authority: &Authority) -> Arc<HostPool> {
        self.hosts.get(authority, || HostPool {
            authority: authority.clone(),
            idle: Mutex::new(Vec::new()),
            limits: self.limits,
            conns: Arc::new(Semaphore::new(self.limits.max_conns_per_host)),
            returned: Notify::new(),
        })
    }

    /// Closes the idle connections that have idled past the timeout or that their upstream closed,
    /// and forgets the pools of the addresses for which `named` is false (requests routed before
    /// still hold theirs).
    pub fn sweep(&self, now: Instant, named: impl Fn(&Authority) -> bool) {
        self.hosts.retain(named, |h| {
            lock(&h.idle).retain_mut(|c| c.fresh(now, self.limits.idle_timeout));
        });
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
        let stream = connect(&self.authority, self.limits.connect_timeout).await?;
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
