//! Forwarding one request: choose the variant, copy to the mirror when asked, send upstream over a
//! pooled HTTP/1.1 connection, stream the response back.
//!
//! Bodies stream in both directions; nothing is buffered on the main path except for the requests
//! that are mirrored. A mirror copy needs the body twice, so a request is mirrored only when its body
//! length is known (a `Content-Length`, or no body at all) and at most `mirror_body_limit` bytes:
//! such a body is read once (bounded by that limit) and sent to both. Larger or chunked bodies are
//! forwarded as a stream and their copy is skipped (counted as `skipped`). At most `mirror_slots`
//! copies are in flight; beyond that a copy is dropped (counted as `dropped`). A copy runs in its own
//! task with its own timeout, and its outcome never reaches the caller.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{self, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body as _, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::Semaphore;

use super::config::{MirrorTarget, Route, Upstream};
use super::metrics::MirrorOutcome;
use super::split::fast_random;

/// A request or response body: streamed from the other side, or made by the router.
pub type Body = Either<Incoming, Full<Bytes>>;

/// The header that marks a mirror copy, so that a model server can tell shadow traffic apart.
pub const MIRROR_HEADER: &str = "x-keelson-mirror";

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
        }
    }
}

/// The request path: the route in effect (swapped whole on reload) and the upstream connection pool
/// (kept across reloads, so that a reload drops no connection).
pub struct Proxy {
    pub route: ArcSwapOption<Route>,
    client: Client<HttpConnector, Body>,
    mirror_slots: Arc<Semaphore>,
    limits: Limits,
}

impl Proxy {
    pub fn new(limits: Limits) -> Proxy {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(limits.connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(limits.pool_idle_per_host)
            .build(connector);
        Proxy {
            route: ArcSwapOption::empty(),
            client,
            mirror_slots: Arc::new(Semaphore::new(limits.mirror_slots)),
            limits,
        }
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
        let index = match route
            .sticky_header
            .as_ref()
            .and_then(|h| req.headers().get(h))
        {
            Some(key) => route.split.sticky(key.as_bytes()),
            None => route.split.random(),
        };
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let body = match route.mirror.filter(|m| sampled(m.percent)) {
            None => Either::Left(body),
            Some(m) => match self.mirror(&route, m, &parts, body).await {
                Ok(b) => b,
                Err(resp) => return resp,
            },
        };
        self.forward(&route.variants[index], parts, body).await
    }

    async fn forward(&self, up: &Upstream, mut parts: Parts, body: Body) -> Response<Body> {
        let m = &up.metrics;
        m.requests.fetch_add(1, Relaxed);
        let Some(uri) = upstream_uri(up, &parts.uri) else {
            return text(StatusCode::BAD_REQUEST, "keelson router: bad request URI\n");
        };
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        let start = Instant::now();
        let sent = self.client.request(Request::from_parts(parts, body));
        match tokio::time::timeout(self.limits.request_timeout, sent).await {
            Ok(Ok(resp)) => {
                m.latency.observe(start.elapsed());
                m.response(resp.status().as_u16());
                let (mut p, b) = resp.into_parts();
                strip_hop_by_hop(&mut p.headers);
                Response::from_parts(p, Either::Left(b))
            }
            Ok(Err(e)) => {
                m.errors.fetch_add(1, Relaxed);
                tracing::debug!(variant = %up.name, upstream = %up.authority, error = %e, "upstream request failed");
                text(
                    StatusCode::BAD_GATEWAY,
                    "keelson router: the variant's upstream is unreachable\n",
                )
            }
            Err(_) => {
                m.errors.fetch_add(1, Relaxed);
                tracing::debug!(variant = %up.name, upstream = %up.authority, "upstream request timed out");
                text(
                    StatusCode::GATEWAY_TIMEOUT,
                    "keelson router: the variant's upstream did not answer in time\n",
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
    ) -> Result<Body, Response<Body>> {
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
        let Some(uri) = upstream_uri(target, &parts.uri) else {
            return Ok(Either::Left(body));
        };
        let (main, copy) = if len == 0 {
            (Either::Left(body), Bytes::new())
        } else {
            match tokio::time::timeout(self.limits.request_timeout, body.collect()).await {
                Ok(Ok(c)) => {
                    let b = c.to_bytes();
                    (Either::Right(Full::new(b.clone())), b)
                }
                _ => {
                    return Err(text(
                        StatusCode::BAD_REQUEST,
                        "keelson router: could not read the request body\n",
                    ))
                }
            }
        };
        let mut req = Request::new(Either::Right(Full::new(copy)));
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = parts.headers.clone();
        req.headers_mut().insert(
            HeaderName::from_static(MIRROR_HEADER),
            HeaderValue::from_static("1"),
        );
        let client = self.client.clone();
        let timeout = self.limits.mirror_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let run = async {
                let resp = client.request(req).await.ok()?;
                // Read the body to its end so that the connection goes back to the pool.
                let mut b = resp.into_body();
                while let Some(frame) = b.frame().await {
                    frame.ok()?;
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

/// `http://<upstream><path and query of the request>`.
fn upstream_uri(up: &Upstream, from: &Uri) -> Option<Uri> {
    let mut p = uri::Parts::default();
    p.scheme = Some(Scheme::HTTP);
    p.authority = Some(up.authority.clone());
    p.path_and_query = Some(
        from.path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    Uri::from_parts(p).ok()
}

/// Removes the headers that belong to one connection (RFC 9110 §7.6.1), including those that
/// `Connection` names.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most messages carry none: one pass over the few names present is cheaper than the removals.
    if !h.keys().any(is_hop_by_hop) {
        return;
    }
    if let Some(c) = h.remove(header::CONNECTION) {
        if let Ok(list) = c.to_str() {
            for name in list.split(',') {
                let name = name.trim();
                if !name.is_empty() {
                    h.remove(name);
                }
            }
        }
    }
    for name in [
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
    ] {
        h.remove(name);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::PROXY_AUTHORIZATION
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// A short plain-text response made by the router.
pub fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from_static(
        body.as_bytes(),
    ))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("x-user-id", "42"),
            ("content-length", "3"),
        ] {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["content-length", "x-user-id"]);
        // A header that `Connection` names is removed even when nothing else is hop-by-hop.
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("x-a"));
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("x-b", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-b"]);
    }

    #[test]
    fn upstream_uri_keeps_path_and_query() {
        let up = Upstream {
            name: "a".into(),
            weight: 1,
            authority: "10.0.0.1:8080".parse().unwrap(),
            metrics: Arc::default(),
        };
        let u = upstream_uri(&up, &"/v1/models/fraud:predict?x=1".parse().unwrap()).unwrap();
        assert_eq!(
            u.to_string(),
            "http://10.0.0.1:8080/v1/models/fraud:predict?x=1"
        );
        let u = upstream_uri(&up, &"http://public.example/p".parse().unwrap()).unwrap();
        assert_eq!(u.to_string(), "http://10.0.0.1:8080/p");
        let u = upstream_uri(&up, &"*".parse().unwrap()).unwrap();
        assert_eq!(u.authority().unwrap().as_str(), "10.0.0.1:8080");
    }

    #[test]
    fn sampling_follows_the_percentage() {
        assert!((0..1000).all(|_| sampled(100)));
        assert!((0..1000).all(|_| !sampled(0)));
        let n = (0..100_000).filter(|_| sampled(25)).count();
        assert!((24_000..26_000).contains(&n), "{n}");
    }
}
