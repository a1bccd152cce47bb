//! Forwarding one request: choose the variant, copy to the mirror when asked, send upstream over a
//! pooled HTTP/1.1 connection ([`super::pool`]) or, for an `h2c` variant, as one stream of a pooled
//! HTTP/2 connection ([`super::h2c`]), stream the response back.
//!
//! Bodies stream in both directions; nothing is buffered on the main path except for the requests
//! that are mirrored. A mirror copy needs the body twice, so a request is mirrored only when its body
//! length is known (a `Content-Length`, or no body at all) and at most `mirror_body_limit` bytes:
//! such a body is read once (bounded by that limit) and sent to both. Larger or chunked bodies are
//! forwarded as a stream and their copy is skipped (counted as `skipped`). At most `mirror_slots`
//! copies are in flight; beyond that a copy is dropped (counted as `dropped`). A copy runs in its own
//! task with its own timeout, and its outcome never reaches the caller.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body as _, Incoming};
use tokio::sync::Semaphore;

use super::config::{MirrorTarget, Route, RouterProtocol, Upstream};
use super::h2c::{grpc_timeout, H2Limits, H2Pool, H2Pools};
use super::metrics::MirrorOutcome;
use super::pool::{HostPool, PoolLimits, Pools};
use super::reply::{
    client_error, grpc_error, is_grpc, text, Body, GRPC_DEADLINE_EXCEEDED, GRPC_TIMEOUT,
    GRPC_UNAVAILABLE,
};
use super::rewrite::{
    check_request, join_cookies, strip_hop_by_hop, to_h2_upstream, to_upstream, MIRROR_HEADER,
};
use super::split::{fast_random, sticky_hash};
use super::upstream::{ReqBody, UpstreamError};

/// Limits of the request path.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Time to connect to an upstream.
    pub connect_timeout: Duration,
    /// Time from sending a request upstream to its response headers.
    pub request_timeout: Duration,
    /// Time a mirror copy may take, response body included.
    pub mirror_timeout: Duration,
    /// Largest request body that is copied to the mirror.
    pub mirror_body_limit: u64,
    /// Mirror copies in flight at most.
    pub mirror_slots: usize,
    /// Idle pooled connections kept per upstream.
    pub pool_idle_per_host: usize,
    /// Connections open to one upstream address at most.
    pub max_conns_per_host: usize,
    /// Time a response body may go without a byte from the upstream.
    pub upstream_read_timeout: Duration,
    /// Time the client's request body may go without a piece coming, while the router waits for
    /// it (HTTP/1.1 variants, and bodies read whole for the mirror).
    pub client_body_timeout: Duration,
    /// The secret key of the sticky hash; `None`: a key derived from the config's upstreams.
    pub sticky_key: Option<(u64, u64)>,
    /// HTTP/2 connections kept open to one `h2c` upstream address.
    pub h2_conns_per_host: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(30),
            mirror_timeout: Duration::from_secs(10),
            mirror_body_limit: 64 * 1024,
            mirror_slots: 256,
            pool_idle_per_host: 1024,
            max_conns_per_host: 1024,
            upstream_read_timeout: Duration::from_secs(60),
            client_body_timeout: Duration::from_secs(60),
            sticky_key: None,
            h2_conns_per_host: 4,
        }
    }
}

/// The request path: the route in effect (swapped whole on reload) and the upstream connection pools
/// (kept across reloads, so that a reload drops no connection).
pub struct Proxy {
    pub route: ArcSwapOption<Route>,
    pools: Pools,
    h2: H2Pools,
    mirror_slots: Arc<Semaphore>,
    limits: Limits,
}

impl Proxy {
    pub fn new(limits: Limits) -> Proxy {
        Proxy {
            route: ArcSwapOption::empty(),
            pools: Pools::new(PoolLimits {
                connect_timeout: limits.connect_timeout,
                request_timeout: limits.request_timeout,
                idle_timeout: Duration::from_secs(60),
                max_idle_per_host: limits.pool_idle_per_host,
                max_conns_per_host: limits.max_conns_per_host.max(1),
                read_timeout: limits.upstream_read_timeout,
                body_timeout: limits.client_body_timeout,
            }),
            h2: H2Pools::new(H2Limits {
                connect_timeout: limits.connect_timeout,
                conns_per_host: limits.h2_conns_per_host.max(1),
                keep_alive: Duration::from_secs(20),
            }),
            mirror_slots: Arc::new(Semaphore::new(limits.mirror_slots)),
            limits,
        }
    }

    /// The connection pool of a variant's upstream.
    fn pool<'a>(&self, up: &'a Upstream) -> &'a Arc<HostPool> {
        up.pool.get_or_init(|| self.pools.host(&up.authority))
    }

    /// The HTTP/2 connection pool of an `h2c` variant's upstream.
    fn h2_pool<'a>(&self, up: &'a Upstream) -> &'a Arc<H2Pool> {
        up.h2.get_or_init(|| self.h2.host(&up.authority))
    }

    /// Closes idle upstream connections past their timeout and forgets the pools of addresses the
    /// config in effect does not name. Requests in flight hold their pool and connection, so an
    /// upstream that left the config is drained: its requests finish, and new ones go elsewhere.
    pub fn sweep(&self) {
        let route = self.route.load();
        let named = |protocol: RouterProtocol| {
            let route = &route;
            move |a: &http::uri::Authority| {
                route.as_ref().is_some_and(|r| {
                    r.variants
                        .iter()
                        .any(|v| v.authority == *a && v.protocol == protocol)
                })
            }
        };
        self.pools
            .sweep(Instant::now(), named(RouterProtocol::Http1));
        self.h2.sweep(named(RouterProtocol::H2c));
    }

    /// Whether a config has been loaded.
    pub fn ready(&self) -> bool {
        self.route.load().is_some()
    }

    /// Routes one request and returns the response (the upstream's, or the router's own error).
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let Some(route) = self.route.load_full() else {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "keelson router: no config loaded yet\n",
            );
        };
        if let Some(reason) = check_request(&req, route.sticky_header.as_ref()) {
            return text(StatusCode::BAD_REQUEST, reason);
        }
        let index = match route
            .sticky_header
            .as_ref()
            .and_then(|h| req.headers().get(h))
        {
            Some(key) => route.split.sticky_hash(sticky_hash(
                self.limits.sticky_key.unwrap_or(route.sticky_seed),
                key.as_bytes(),
            )),
            None => route.split.random(),
        };
        // The request is changed in place: taking it apart and back together copies it.
        let mut req = req;
        let up = &route.variants[index];
        let h2 = up.protocol == RouterProtocol::H2c;
        // `TE: trailers` is the one `TE` HTTP/2 allows, and gRPC servers look for it.
        let te_trailers = h2
            && req
                .headers()
                .get(header::TE)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
        if !h2
            && req.version() == Version::HTTP_2
            && req.headers().len() != req.headers().keys_len()
        {
            join_cookies(req.headers_mut());
        }
        // Also removes a client's `x-keelson-mirror`: only the router marks mirror copies.
        strip_hop_by_hop(req.headers_mut());
        if te_trailers {
            req.headers_mut()
                .insert(header::TE, HeaderValue::from_static("trailers"));
        }
        let req = match route.mirror.filter(|m| sampled(m.percent)) {
            None => req.map(Either::Left),
            // Boxed: the mirror's state would otherwise widen every request's future.
            Some(m) => {
                let (parts, body) = req.into_parts();
                match Box::pin(self.mirror(&route, m, &parts, body)).await {
                    Ok(b) => Request::from_parts(parts, b),
                    Err(resp) => return resp,
                }
            }
        };
        if h2 {
            return Box::pin(self.forward_h2(up, req)).await;
        }
        self.forward(up, req).await
    }

    async fn forward(&self, up: &Upstream, mut req: Request<ReqBody>) -> Response<Body> {
        let m = &up.metrics;
        m.requests.inc();
        to_upstream(up, &mut req);
        *req.version_mut() = Version::HTTP_11;
        let start = Instant::now();
        // The pool keeps the connect and request timeouts: no timer per request.
        match self.pool(up).send(req, start).await {
            Ok(resp) => {
                m.latency(start.elapsed());
                m.response(resp.status().as_u16());
                let mut resp = resp.map(|b| Either::Left(Either::Left(b)));
                strip_hop_by_hop(resp.headers_mut());
                resp
            }
            Err(e) if e.is_client_error() => {
                // The client's request body broke off or stalled: not the variant's failure.
                tracing::debug!(variant = %up.name, error = %e, "request body failed");
                client_error(&e)
            }
            Err(UpstreamError::Busy(n)) => {
                m.errors.inc();
                tracing::debug!(variant = %up.name, upstream = %up.authority, conns = n, "upstream connections busy");
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "keelson router: every connection to the variant's upstream is busy\n",
                )
            }
            Err(UpstreamError::Timeout(_)) => {
                m.errors.inc();
                tracing::debug!(variant = %up.name, upstream = %up.authority, "upstream request timed out");
                text(
                    StatusCode::GATEWAY_TIMEOUT,
                    "keelson router: the variant's upstream did not answer in time\n",
                )
            }
            Err(e) => {
                m.errors.inc();
                tracing::debug!(variant = %up.name, upstream = %up.authority, error = %e, "upstream request failed");
                text(
                    StatusCode::BAD_GATEWAY,
                    "keelson router: the variant's upstream is unreachable\n",
                )
            }
        }
    }

    /// Forwards a request to an `h2c` variant as one HTTP/2 stream. The response head must come
    /// within the request timeout, or within the request's own `grpc-timeout` when that is
    /// shorter; the body then streams with its trailers. The router's own errors for a gRPC
    /// request (`content-type: application/grpc...`) are gRPC statuses in a trailers-only
    /// response: `UNAVAILABLE` for an upstream that cannot be reached, `DEADLINE_EXCEEDED` when
    /// no response came in time; a gRPC client would read an HTTP `504` as `UNAVAILABLE`.
    async fn forward_h2(&self, up: &Upstream, mut req: Request<ReqBody>) -> Response<Body> {
        let m = &up.metrics;
        m.requests.inc();
        let grpc = is_grpc(req.headers());
        let deadline = req
            .headers()
            .get(GRPC_TIMEOUT)
            .and_then(|v| grpc_timeout(v.as_bytes()))
            .map_or(self.limits.request_timeout, |t| {
                t.min(self.limits.request_timeout)
            });
        to_h2_upstream(up, &mut req);
        let start = Instant::now();
        let sent = tokio::time::timeout(deadline, self.h2_pool(up).send(req)).await;
        match sent {
            Ok(Ok(resp)) => {
                m.latency(start.elapsed());
                m.response(resp.status().as_u16());
                let mut resp = resp.map(|b| Either::Left(Either::Right(b)));
                *resp.version_mut() = Version::HTTP_11;
                resp
            }
            Err(_) => {
                m.errors.inc();
                tracing::debug!(variant = %up.name, upstream = %up.authority, ?deadline, "HTTP/2 upstream request timed out");
                if grpc {
                    return grpc_error(
                        GRPC_DEADLINE_EXCEEDED,
                        "keelson router: the variant did not answer within the deadline",
                    );
                }
                text(
                    StatusCode::GATEWAY_TIMEOUT,
                    "keelson router: the variant's upstream did not answer in time\n",
                )
            }
            Ok(Err(e)) => {
                m.errors.inc();
                tracing::debug!(variant = %up.name, upstream = %up.authority, error = %e, "HTTP/2 upstream request failed");
                if grpc {
                    return grpc_error(
                        GRPC_UNAVAILABLE,
                        "keelson router: the variant's upstream is unreachable",
                    );
                }
                text(
                    StatusCode::BAD_GATEWAY,
                    "keelson router: the variant's upstream is unreachable\n",
                )
            }
        }
    }

    /// Starts a mirror copy of the request when its body allows and a slot is free, and returns the
    /// body for the main request.
    async fn mirror(
        &self,
        route: &Route,
        m: MirrorTarget,
        parts: &Parts,
        body: Incoming,
    ) -> Result<ReqBody, Response<Body>> {
        let target = &route.variants[m.index];
        let metrics = target.metrics.clone();
        let Some(len) = body
            .size_hint()
            .exact()
            .filter(|&n| n <= self.limits.mirror_body_limit)
        else {
            metrics.mirror(MirrorOutcome::Skipped);
            return Ok(Either::Left(body));
        };
        let Ok(permit) = self.mirror_slots.clone().try_acquire_owned() else {
            metrics.mirror(MirrorOutcome::Dropped);
            return Ok(Either::Left(body));
        };
        let (main, copy) = if len == 0 {
            (Either::Left(body), Bytes::new())
        } else {
            match read_body(body, len, &self.limits).await {
                Ok(b) => (Either::Right(Full::new(b.clone())), b),
                Err(e) => return Err(client_error(&e)),
            }
        };
        let mut req = Request::new(Either::Right(Full::new(copy)));
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = parts.uri.clone();
        *req.headers_mut() = parts.headers.clone();
        let pool = match target.protocol {
            RouterProtocol::Http1 => {
                to_upstream(target, &mut req);
                Either::Left(self.pool(target).clone())
            }
            RouterProtocol::H2c => {
                to_h2_upstream(target, &mut req);
                Either::Right(self.h2_pool(target).clone())
            }
        };
        req.headers_mut().insert(
            HeaderName::from_static(MIRROR_HEADER),
            HeaderValue::from_static("1"),
        );
        let timeout = self.limits.mirror_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let run = async {
                // Read the body to its end so that the connection goes back to the pool.
                match pool {
                    Either::Left(pool) => {
                        let mut b = pool.send(req, Instant::now()).await.ok()?.into_body();
                        while let Some(frame) = b.frame().await {
                            frame.ok()?;
                        }
                    }
                    Either::Right(pool) => {
                        let mut b = pool.send(req).await.ok()?.into_body();
                        while let Some(frame) = b.frame().await {
                            frame.ok()?;
                        }
                    }
                }
                Some(())
            };
            let outcome = match tokio::time::timeout(timeout, run).await {
                Ok(Some(())) => MirrorOutcome::Sent,
                _ => MirrorOutcome::Failed,
            };
            metrics.mirror(outcome);
        });
        Ok(main)
    }
}

/// Whether this request is among `percent` percent.
fn sampled(percent: u32) -> bool {
    percent >= 100 || fast_random() % 100 < u64::from(percent)
}

/// Reads a request body of `len` bytes whole (a mirrored request's), within the request timeout
/// and with no wait for a piece of it longer than the body timeout. One timer, moved at each wait.
async fn read_body(mut body: Incoming, len: u64, limits: &Limits) -> Result<Bytes, UpstreamError> {
    use std::future::Future as _;
    use std::task::Poll;
    let end = tokio::time::Instant::now() + limits.request_timeout;
    let timer = tokio::time::sleep_until(end);
    let mut timer = std::pin::pin!(timer);
    let mut out = bytes::BytesMut::with_capacity(usize::try_from(len).unwrap_or(0));
    loop {
        let mut next = body.frame();
        let mut waiting = false;
        let frame = std::future::poll_fn(|cx| {
            if let Poll::Ready(frame) = std::pin::Pin::new(&mut next).poll(cx) {
                return Poll::Ready(Some(frame));
            }
            if !waiting {
                waiting = true;
                timer
                    .as_mut()
                    .reset(end.min(tokio::time::Instant::now() + limits.client_body_timeout));
            }
            timer.as_mut().poll(cx).map(|()| None)
        })
        .await;
        match frame {
            Some(None) => return Ok(out.freeze()),
            Some(Some(Ok(f))) => {
                if let Ok(data) = f.into_data() {
                    out.extend_from_slice(&data);
                }
            }
            Some(Some(Err(e))) => return Err(UpstreamError::RequestBody(e.into())),
            None => {
                let timeout = if timer.deadline() < end {
                    limits.client_body_timeout
                } else {
                    limits.request_timeout
                };
                return Err(UpstreamError::RequestBodyTimeout(timeout));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_follows_the_percentage() {
        assert!((0..1000).all(|_| sampled(100)));
        assert!((0..1000).all(|_| !sampled(0)));
        let n = (0..100_000).filter(|_| sampled(25)).count();
        assert!((24_000..26_000).contains(&n), "{n}");
    }
}
