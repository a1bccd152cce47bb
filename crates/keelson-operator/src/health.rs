//! `/healthz`, `/readyz` and `/metrics` on one port, served by hyper (HTTP/1.1), for the manager's
//! probes and Prometheus. A probe must not wait on the API server or on a reconcile: it answers from
//! a flag and the metrics registry only.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// What the endpoints report.
pub struct Health {
    /// Whether `/readyz` answers 200.
    pub ready: Box<dyn Fn() -> bool + Send + Sync>,
    /// Served on `/metrics`.
    pub metrics: Arc<Metrics>,
}

/// The answer to a request for `path`: status code, content type and body.
pub fn respond(path: &str, health: &Health) -> (StatusCode, &'static str, String) {
    const TEXT: &str = "text/plain";
    match path {
        "/healthz" | "/livez" => (StatusCode::OK, TEXT, "ok\n".into()),
        "/readyz" if (health.ready)() => (StatusCode::OK, TEXT, "ok\n".into()),
        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, TEXT, "not ready\n".into()),
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            health.metrics.encode(),
        ),
        _ => (StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
    }
}

/// Serves the endpoints on `listener` until the process ends. A client gets 5 s to send each
/// request's headers; a kept-alive connection is closed after 5 s without one.
pub async fn serve(listener: TcpListener, health: Arc<Health>) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(5));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: wait a little instead of spinning.
                tracing::warn!(error = %e, "probe port accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let health = health.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            let (status, content_type, body) = respond(req.uri().path(), &health);
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            *resp.status_mut() = status;
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            async move { Ok::<_, Infallible>(resp) }
        });
        let conn = http.serve_connection(TokioIo::new(stream), svc);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "probe connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use std::sync::atomic::{AtomicBool, Ordering};

    fn health(ready: Arc<AtomicBool>) -> Health {
        Health {
            ready: Box::new(move || ready.load(Ordering::Relaxed)),
            metrics: Arc::new(Metrics::default()),
        }
    }

    #[test]
    fn probes() {
        let ready = Arc::new(AtomicBool::new(false));
        let h = health(ready.clone());
        assert_eq!(respond("/healthz", &h).0, 200);
        assert_eq!(respond("/readyz", &h).0, 503);
        ready.store(true, Ordering::Relaxed);
        assert_eq!(respond("/readyz", &h).0, 200);
        let (code, _, body) = respond("/metrics", &h);
        assert_eq!(code, 200);
        assert!(body.contains("keelson_leader"), "{body}");
        assert_eq!(respond("/nope", &h).0, 404);
        assert_eq!(respond("/", &h).0, 404);
    }

    #[tokio::test]
    async fn serves_the_endpoints_over_http() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let ready = Arc::new(AtomicBool::new(false));
        tokio::spawn(serve(l, Arc::new(health(ready.clone()))));
        // One kept-alive connection for every request, as Prometheus scrapes.
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut client, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut get = async |path: &str| {
            let req = Request::get(path)
                .header(header::HOST, "x")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let resp = client.send_request(req).await.unwrap();
            let status = resp.status();
            let content_type = resp.headers()[header::CONTENT_TYPE].clone();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (
                status,
                content_type,
                String::from_utf8(body.to_vec()).unwrap(),
            )
        };
        assert_eq!(get("/healthz").await.0, StatusCode::OK);
        assert_eq!(get("/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
        ready.store(true, Ordering::Relaxed);
        assert_eq!(get("/readyz").await.0, StatusCode::OK);
        assert_eq!(get("/nope").await.0, StatusCode::NOT_FOUND);
        let (status, content_type, m) = get("/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            content_type
                .to_str()
                .unwrap()
                .starts_with("application/openmetrics-text"),
            "{content_type:?}"
        );
        assert!(m.contains("# TYPE keelson_leader gauge"), "{m}");
        assert!(m.ends_with("# EOF\n"), "{m}");
    }
}
