//! One HTTP/1.1 connection to an upstream: writing a request (head and streamed body) and reading
//! its response head, within the request's deadline. It knows nothing of pooling or reuse: the
//! pool ([`super::pool`]) decides when a connection is taken, given back or closed.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use http::{Method, Request};
use http_body_util::BodyExt;
use hyper::body::Body;
use tokio::io::{AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Sleep;

use super::h1::{self, RequestFraming, ResponseHead};
use super::upstream::{ReqBody, UpstreamError};

/// Bytes read from a connection at a time, at first: enough for a usual response whole.
const READ_BUF: usize = 8 * 1024;
/// Bytes read at a time at most: reads that fill their room double it up to this, for large bodies.
const MAX_READ_BUF: usize = 256 * 1024;
/// Request body bytes gathered before they are written.
const WRITE_BATCH: usize = 16 * 1024;

/// One upstream connection.
pub(crate) struct Conn {
    stream: TcpStream,
    /// Bytes read and not yet taken: a response head, then its body.
    pub(crate) buf: BytesMut,
    /// The request head, and the small body pieces written with it.
    out: Vec<u8>,
    /// The request timeout's timer: made at the first wait, moved when it fires.
    pub(crate) timer: Option<Pin<Box<Sleep>>>,
    /// Bytes to make room for when the buffer runs low.
    read_size: usize,
    /// The pool's permit for this connection, given back when it closes.
    pub(crate) permit: OwnedSemaphorePermit,
}

/// A failed exchange, and whether the request may go again over a new connection: the upstream
/// closed the connection and no byte of a response came back.
pub(crate) struct Failed {
    pub(crate) error: UpstreamError,
    pub(crate) closed_before_response: bool,
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
    pub(crate) fn new(stream: TcpStream, permit: OwnedSemaphorePermit) -> Box<Conn> {
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
    pub(crate) fn usable(&mut self) -> bool {
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
    pub(crate) fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
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
    pub(crate) async fn exchange(
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
