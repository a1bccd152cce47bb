//! Upstreams that speak HTTP/2 over cleartext (`protocol: h2c` in the config): gRPC servers.
//!
//! Each request is one HTTP/2 stream, sent with hyper's HTTP/2 client; bodies stream both ways
//! (full duplex, so client, server and bidirectional streaming RPCs work) and trailers pass both
//! ways (`grpc-status`, `grpc-message`). One pool per upstream address holds up to
//! `conns_per_host` connections, taken in turn by the requests: behind a Kubernetes Service each
//! connection goes to the pod kube-proxy picked for it, so several connections spread the RPCs of
//! one router over several pods. A connection that closed (the upstream went away or sent `GOAWAY`)
//! is replaced on the next request that picks its slot, and a request that a closed connection
//! never took is sent once more over a new one.
//!
//! Unlike the HTTP/1.1 path, a response body has no read timeout: a server-streaming RPC may be
//! quiet for long on purpose. Dead connections are found by HTTP/2 pings instead.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::upstream::{connect, lock, Hosts, ReqBody, UpstreamError};

/// Limits of the HTTP/2 upstream pools.
#[derive(Clone, Copy, Debug)]
pub struct H2Limits {
    pub connect_timeout: Duration,
    /// Connections kept open to one address.
    pub conns_per_host: usize,
    /// A ping goes out on a connection this long without a frame; one not answered within it
    /// closes the connection.
    pub keep_alive: Duration,
}

/// Every HTTP/2 upstream address's pool.
pub struct H2Pools {
    hosts: Hosts<H2Pool>,
    limits: H2Limits,
}

impl H2Pools {
    pub fn new(limits: H2Limits) -> H2Pools {
        H2Pools {
            hosts: Hosts::new(),
            limits,
        }
    }

    /// The pool of `authority`, made on first use.
    pub fn host(&self, authority: &Authority) -> Arc<H2Pool> {
        self.hosts.get(authority, || H2Pool {
            authority: authority.clone(),
            slots: Mutex::new(vec![None; self.limits.conns_per_host.max(1)]),
            next: AtomicUsize::new(0),
            limits: self.limits,
        })
    }

    /// Forgets the pools of the addresses for which `named` is false. Their connections close
    /// once the requests in flight on them (which hold the pool) have finished: an upstream that
    /// leaves the config is drained, not reset.
    pub fn sweep(&self, named: impl Fn(&Authority) -> bool) {
        self.hosts.retain(named, |_| {});
    }
}

/// The connections to one HTTP/2 upstream address.
pub struct H2Pool {
    authority: Authority,
    /// One sender per connection slot; `None` until the slot's first request.
    slots: Mutex<Vec<Option<SendRequest<ReqBody>>>>,
    /// The slot of the next request.
    next: AtomicUsize,
    limits: H2Limits,
}

impl std::fmt::Debug for H2Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Pool")
            .field("authority", &self.authority)
            .finish()
    }
}

impl H2Pool {
    /// Sends `req` (its URI absolute, `http://<authority><path>`) on a connection of the pool and
    /// waits for the response head. The caller bounds the wait.
    pub async fn send(&self, req: Request<ReqBody>) -> Result<Response<Incoming>, UpstreamError> {
        let slot = self.next.fetch_add(1, Relaxed) % self.limits.conns_per_host.max(1);
        let mut req = req;
        // A connection that closed before it took the request gives it back: the request then
        // goes once more, over a new connection.
        for fresh in [false, true] {
            let mut sender = match self.sender(slot, fresh) {
                Some(s) => s,
                None => self.connect(slot).await?,
            };
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    Some(back) if !fresh => req = back,
                    _ => return Err(UpstreamError::H2(e.into_error())),
                },
            }
        }
        Err(UpstreamError::Closed)
    }

    /// The open connection in `slot`, unless `fresh` asks for a new one.
    fn sender(&self, slot: usize, fresh: bool) -> Option<SendRequest<ReqBody>> {
        if fresh {
            return None;
        }
        let slots = lock(&self.slots);
        slots
            .get(slot)
            .and_then(Option::as_ref)
            .filter(|s| !s.is_closed())
            .cloned()
    }

    /// Opens a connection for `slot`. Two requests that find the slot empty at once may both
    /// connect; the last one stays in the slot and the other closes after its request.
    async fn connect(&self, slot: usize) -> Result<SendRequest<ReqBody>, UpstreamError> {
        let stream = connect(&self.authority, self.limits.connect_timeout).await?;
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .keep_alive_interval(self.limits.keep_alive)
            .keep_alive_timeout(self.limits.keep_alive)
            .adaptive_window(true);
        let (sender, conn) = match tokio::time::timeout(
            self.limits.connect_timeout,
            builder.handshake(TokioIo::new(stream)),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(UpstreamError::H2(e)),
            Err(_) => return Err(UpstreamError::ConnectTimeout(self.limits.connect_timeout)),
        };
        let authority = self.authority.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(upstream = %authority, error = %e, "HTTP/2 upstream connection ended");
            }
        });
        if let Some(s) = lock(&self.slots).get_mut(slot) {
            *s = Some(sender.clone());
        }
        Ok(sender)
    }
}

/// A gRPC deadline, from a `grpc-timeout` value: up to 8 digits and a unit (`H`, `M`, `S`, `m`,
/// `u`, `n`).
pub fn grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = std::str::from_utf8(digits).ok()?.parse::<u64>().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_and_bad_ones_are_ignored() {
        assert_eq!(grpc_timeout(b"1S"), Some(Duration::from_secs(1)));
        assert_eq!(grpc_timeout(b"250m"), Some(Duration::from_millis(250)));
        assert_eq!(grpc_timeout(b"2H"), Some(Duration::from_secs(7200)));
        assert_eq!(grpc_timeout(b"3M"), Some(Duration::from_secs(180)));
        assert_eq!(
            grpc_timeout(b"99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(grpc_timeout(b"5n"), Some(Duration::from_nanos(5)));
        for bad in [
            &b""[..],
            b"S",
            b"123456789S",
            b"1s",
            b"-1S",
            b"1.5S",
            b" 1S",
        ] {
            assert_eq!(
                grpc_timeout(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
