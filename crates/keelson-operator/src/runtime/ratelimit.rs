//! The opt-in client-side request rate limit for the Kubernetes client: a token bucket as a tower layer
//! (`--qps`, `--burst`; off by default, see [`super::retry`]). A watch counts once, when it is opened.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use tower::{Layer, Service};

/// Tokens refill at `rate` per second up to `burst`; one request takes one token.
#[derive(Clone, Debug)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub fn new(rate: f64, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Bucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes a token, or says how long until one is there.
    pub fn take(&mut self, now: Instant) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

/// The layer: `qps` of 0 disables the limit.
#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    qps: f64,
    burst: u32,
}

impl RateLimitLayer {
    pub fn new(qps: f64, burst: u32) -> Self {
        RateLimitLayer { qps, burst }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            bucket: (self.qps > 0.0).then(|| Bucket::new(self.qps, self.burst, Instant::now())),
            permit: false,
            sleep: None,
        }
    }
}

/// The service: `poll_ready` waits for a token, then for the inner service.
pub struct RateLimit<S> {
    inner: S,
    bucket: Option<Bucket>,
    permit: bool,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S, Req> Service<Req> for RateLimit<S>
where
    S: Service<Req>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if let Some(bucket) = self.bucket.as_mut() {
            while !self.permit {
                if let Some(s) = self.sleep.as_mut() {
                    ready!(s.as_mut().poll(cx));
                    self.sleep = None;
                }
                match bucket.take(Instant::now()) {
                    None => self.permit = true,
                    Some(wait) => self.sleep = Some(Box::pin(tokio::time::sleep(wait))),
                }
            }
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        self.permit = false;
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10.0, 3, t0);
        assert_eq!(b.take(t0), None);
        assert_eq!(b.take(t0), None);
        assert_eq!(b.take(t0), None);
        let wait = b.take(t0).unwrap();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        // 100 ms later one token is back, and only one.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(b.take(t1), None);
        assert!(b.take(t1).is_some());
        // Idle for long: never more than the burst.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(b.take(t2), None);
        }
        assert!(b.take(t2).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn the_service_spaces_requests_at_the_rate() {
        use tower::ServiceExt;
        let svc = tower::service_fn(|_: ()| async { Ok::<_, std::convert::Infallible>(()) });
        let mut svc = RateLimitLayer::new(20.0, 1).layer(svc);
        let start = tokio::time::Instant::now();
        for _ in 0..5 {
            svc.ready().await.unwrap().call(()).await.unwrap();
        }
        // One from the burst, then four at 50 ms each.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(195) && took < Duration::from_millis(260),
            "{took:?}"
        );
    }
}
