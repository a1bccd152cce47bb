//! Retries of requests the API server asks to be retried: a tower layer on the kube client.
//!
//! Keelson sets no client-side rate limit by default and leaves fairness to the API server's Priority
//! and Fairness (APF): a flow over its share is answered `429 Too Many Requests` with `Retry-After`.
//! Such a request was not carried out, so it is sent again, unchanged, after the `Retry-After`
//! seconds plus a jittered exponential backoff (so that the requests turned away together do not
//! come back together), up to [`MAX_RETRIES`] times; only then does the caller see the 429 (a
//! reconcile retries it with its own backoff). `503` and `504` are retried the same way, as kube's
//! default retry does. Each such answer is counted in `keelson_api_retried_total{code}`.
//!
//! This replaces kube's built-in retry layer (which honours `Retry-After` but adds no jitter to it and
//! counts nothing); [`crate::operator::client`] turns that one off.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use kube::client::Body;
use prometheus_client::metrics::counter::Counter;
use tower::{BoxError, Layer, Service, ServiceExt};

/// Retries of one request at most; with [`MAX_BACKOFF`] that is several minutes of waiting.
pub const MAX_RETRIES: u32 = 12;
/// The first backoff; it doubles on every retry of the same request.
const BASE_BACKOFF: Duration = Duration::from_millis(200);
/// The backoff never grows past this.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A `Retry-After` longer than this is taken as this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// The counters of retried answers, by status code.
#[derive(Clone, Debug, Default)]
pub struct Retried {
    pub too_many_requests: Counter,
    pub unavailable: Counter,
    pub gateway_timeout: Counter,
}

impl Retried {
    fn counter(&self, code: StatusCode) -> Option<&Counter> {
        match code {
            StatusCode::TOO_MANY_REQUESTS => Some(&self.too_many_requests),
            StatusCode::SERVICE_UNAVAILABLE => Some(&self.unavailable),
            StatusCode::GATEWAY_TIMEOUT => Some(&self.gateway_timeout),
            _ => None,
        }
    }
}

/// The seconds of a `Retry-After` header (the API server sends whole seconds; an HTTP date is not
/// used by it and counts as absent).
pub fn retry_after<B>(res: &Response<B>) -> Option<Duration> {
    let secs: u64 = res
        .headers()
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

/// How long to wait before retry number `attempt` (0 for the first): the server's `Retry-After`, then
/// an equal-jitter exponential backoff (half fixed, half random, from `unit` in [0, 1)).
pub fn delay(server: Option<Duration>, attempt: u32, unit: f64) -> Duration {
    let exp = BASE_BACKOFF
        .saturating_mul(1u32 << attempt.min(16))
        .min(MAX_BACKOFF);
    let backoff = exp / 2 + (exp / 2).mul_f64(unit.clamp(0.0, 1.0));
    server.unwrap_or_default() + backoff
}

/// The layer (see the module docs). The service under it must be cheap to clone (a `Buffer`).
#[derive(Clone, Debug)]
pub struct RetryLayer {
    retried: Retried,
    max_retries: u32,
}

impl RetryLayer {
    pub fn new(retried: Retried) -> Self {
        RetryLayer {
            retried,
            max_retries: MAX_RETRIES,
        }
    }

    /// The same layer with another bound on retries.
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            retried: self.retried.clone(),
            max_retries: self.max_retries,
        }
    }
}

/// The service: each attempt waits for the inner service to be ready, so it is always ready itself.
#[derive(Clone, Debug)]
pub struct Retry<S> {
    inner: S,
    retried: Retried,
    max_retries: u32,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B> Service<Request<Body>> for Retry<S>
where
    S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<B>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let mut inner = self.inner.clone();
        let retried = self.retried.clone();
        let max_retries = self.max_retries;
        Box::pin(async move {
            let mut req = req;
            let mut attempt = 0;
            loop {
                let again = (attempt < max_retries)
                    .then(|| clone_request(&req))
                    .flatten();
                let res = inner
                    .ready()
                    .await
                    .map_err(Into::into)?
                    .call(req)
                    .await
                    .map_err(Into::into)?;
                let Some(counter) = retried.counter(res.status()) else {
                    return Ok(res);
                };
                counter.inc();
                let Some(next) = again else {
                    return Ok(res);
                };
                let wait = delay(retry_after(&res), attempt, rand::random::<f64>());
                tracing::debug!(
                    status = res.status().as_u16(),
                    ?wait,
                    attempt,
                    uri = %next.uri(),
                    "the API server asked for a retry"
                );
                drop(res);
                tokio::time::sleep(wait).await;
                req = next;
                attempt += 1;
            }
        })
    }
}

/// A copy of `req` to send again, if its body can be copied (every request of the kube client but
/// a streamed one).
fn clone_request(req: &Request<Body>) -> Option<Request<Body>> {
    let body = req.body().try_clone()?;
    let mut out = Request::new(body);
    *out.method_mut() = req.method().clone();
    *out.uri_mut() = req.uri().clone();
    *out.version_mut() = req.version();
    *out.headers_mut() = req.headers().clone();
    *out.extensions_mut() = req.extensions().clone();
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    #[test]
    fn the_delay_is_retry_after_plus_a_jittered_growing_backoff() {
        let ra = Some(Duration::from_secs(1));
        assert_eq!(delay(ra, 0, 0.0), Duration::from_millis(1100));
        assert_eq!(delay(ra, 0, 0.999_999).as_millis(), 1199);
        assert_eq!(delay(None, 1, 0.0), Duration::from_millis(200));
        assert_eq!(delay(None, 3, 1.0), Duration::from_millis(1600));
        // Capped, also for absurd attempts.
        assert_eq!(delay(None, 40, 1.0), MAX_BACKOFF);
        assert_eq!(
            delay(Some(Duration::from_secs(3)), 40, 0.0),
            Duration::from_secs(18)
        );
    }

    #[test]
    fn retry_after_reads_whole_seconds_and_caps_them() {
        let res = |v: &str| {
            Response::builder()
                .status(429)
                .header("Retry-After", v)
                .body(())
                .unwrap()
        };
        assert_eq!(retry_after(&res("2")), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(&res("86400")), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after(&res("Wed, 21 Oct 2015 07:28:00 GMT")), None);
        let none = Response::builder().status(429).body(()).unwrap();
        assert_eq!(retry_after(&none), None);
    }

    /// A stand-in API server that answers the first `refuse` requests with 429 and `Retry-After: 1`,
    /// and records every body it received.
    #[derive(Clone)]
    struct Flaky {
        refuse: usize,
        seen: Arc<AtomicUsize>,
        bodies: Arc<Mutex<Vec<Vec<u8>>>>,
    }

    impl Service<Request<Body>> for Flaky {
        type Response = Response<()>;
        type Error = BoxError;
        type Future = BoxFuture<Result<Response<()>, BoxError>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, req: Request<Body>) -> Self::Future {
            let n = self.seen.fetch_add(1, Ordering::SeqCst);
            let refuse = n < self.refuse;
            let bodies = self.bodies.clone();
            Box::pin(async move {
                let body = req.into_body().collect_bytes().await?;
                bodies.lock().unwrap().push(body.to_vec());
                let status = if refuse { 429 } else { 201 };
                Ok(Response::builder()
                    .status(status)
                    .header("Retry-After", "1")
                    .body(())
                    .unwrap())
            })
        }
    }

    fn flaky(refuse: usize) -> Flaky {
        Flaky {
            refuse,
            seen: Arc::default(),
            bodies: Arc::default(),
        }
    }

    fn post() -> Request<Body> {
        Request::post("/api/v1/namespaces/a/pods")
            .body(Body::from(b"{\"kind\":\"Pod\"}".to_vec()))
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_is_sent_again_after_retry_after_and_counted() {
        let server = flaky(3);
        let retried = Retried::default();
        let mut svc = RetryLayer::new(retried.clone()).layer(server.clone());
        let start = tokio::time::Instant::now();
        let res = svc.ready().await.unwrap().call(post()).await.unwrap();
        assert_eq!(res.status(), 201);
        assert_eq!(retried.too_many_requests.get(), 3);
        assert_eq!(server.seen.load(Ordering::SeqCst), 4);
        // The same write every time: nothing lost, nothing changed.
        let bodies = server.bodies.lock().unwrap().clone();
        assert!(
            bodies.iter().all(|b| b == b"{\"kind\":\"Pod\"}"),
            "{bodies:?}"
        );
        // Three waits of Retry-After (1 s) plus a backoff of 100-200, 200-400 and 400-800 ms.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(3700) && took <= Duration::from_millis(4400),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_bound_the_caller_gets_the_429() {
        let server = flaky(usize::MAX);
        let retried = Retried::default();
        let mut svc = RetryLayer::new(retried.clone())
            .max_retries(2)
            .layer(server.clone());
        let res = svc.ready().await.unwrap().call(post()).await.unwrap();
        assert_eq!(res.status(), 429);
        assert_eq!(server.seen.load(Ordering::SeqCst), 3);
        assert_eq!(retried.too_many_requests.get(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn other_answers_are_passed_on_at_once() {
        let server = flaky(0);
        let retried = Retried::default();
        let mut svc = RetryLayer::new(retried.clone()).layer(server.clone());
        let res = svc.ready().await.unwrap().call(post()).await.unwrap();
        assert_eq!(res.status(), 201);
        assert_eq!(server.seen.load(Ordering::SeqCst), 1);
        assert_eq!(retried.too_many_requests.get(), 0);
    }
}
