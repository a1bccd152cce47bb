//! What the HTTP/1.1 pools ([`super::pool`]) and the HTTP/2 pools ([`super::h2c`]) share: the
//! request body they send, how an exchange fails, the TCP connect, and the list of per-address
//! pools. No connection handling past the connect here, and no protocol.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tokio::net::TcpStream;

use super::h1::ProtocolError;

/// Locks `m`. A poisoned lock only means that another task panicked while holding it; a pool's
/// data stays consistent between statements, so it is used as it is.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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

/// A TCP connection to `authority` within `timeout`, with Nagle's algorithm off.
pub(crate) async fn connect(
    authority: &Authority,
    timeout: Duration,
) -> Result<TcpStream, UpstreamError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(authority.as_str())).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(UpstreamError::Connect(e)),
        Err(_) => return Err(UpstreamError::ConnectTimeout(timeout)),
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// The pools of every upstream address, each made on first use. A config names a handful of
/// variants, so the list is short and scanned.
pub(crate) struct Hosts<P> {
    list: Mutex<Vec<(Authority, Arc<P>)>>,
}

impl<P> Hosts<P> {
    pub(crate) fn new() -> Hosts<P> {
        Hosts {
            list: Mutex::new(Vec::new()),
        }
    }

    /// The pool of `authority`; `make` makes it when there is none yet.
    pub(crate) fn get(&self, authority: &Authority, make: impl FnOnce() -> P) -> Arc<P> {
        let mut hosts = lock(&self.list);
        if let Some((_, h)) = hosts.iter().find(|(a, _)| a == authority) {
            return h.clone();
        }
        let h = Arc::new(make());
        hosts.push((authority.clone(), h.clone()));
        h
    }

    /// Forgets the pools of the addresses for which `named` is false (requests routed before still
    /// hold theirs), then calls `each` on every pool kept, under the same lock.
    pub(crate) fn retain(&self, named: impl Fn(&Authority) -> bool, mut each: impl FnMut(&P)) {
        let mut hosts = lock(&self.list);
        hosts.retain(|(a, _)| named(a));
        for (_, h) in hosts.iter() {
            each(h);
        }
    }
}
