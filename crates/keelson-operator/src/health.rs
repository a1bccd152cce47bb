//! `/healthz`, `/readyz` and `/metrics` on one port: a minimal HTTP/1.1 responder for the
//! manager's probes and Prometheus.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// What the endpoints report.
pub struct Health {
    /// Whether `/readyz` answers 200.
    pub ready: Box<dyn Fn() -> bool + Send + Sync>,
    /// Served on `/metrics`.
    pub metrics: Arc<Metrics>,
}

/// The answer to one request line: status code, content type and body.
pub fn respond(request: &str, health: &Health) -> (u16, &'static str, String) {
    const TEXT: &str = "text/plain";
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    match path {
        "/healthz" | "/livez" => (200, TEXT, "ok\n".into()),
        "/readyz" if (health.ready)() => (200, TEXT, "ok\n".into()),
        "/readyz" => (503, TEXT, "not ready\n".into()),
        "/metrics" => (
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            health.metrics.encode(),
        ),
        _ => (404, TEXT, "not found\n".into()),
    }
}

/// Serves the endpoints on `listener` until the process ends.
pub async fn serve(listener: TcpListener, health: Arc<Health>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let health = health.clone();
        tokio::spawn(async move {
            // Read the request head (a request may arrive in several segments); closing with
            // unread input would reset the connection under the response.
            let mut buf = [0u8; 2048];
            let mut n = 0;
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
            while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                match tokio::time::timeout_at(deadline, sock.read(&mut buf[n..])).await {
                    Ok(Ok(0)) => break,
                    Ok(Ok(k)) => n += k,
                    _ => return,
                }
            }
            let req = String::from_utf8_lossy(&buf[..n]);
            let (code, content_type, body) = respond(req.lines().next().unwrap_or(""), &health);
            let reason = match code {
                200 => "OK",
                503 => "Service Unavailable",
                _ => "Not Found",
            };
            let resp = format!(
                "HTTP/1.1 {code} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        assert_eq!(respond("GET /healthz HTTP/1.1", &h).0, 200);
        assert_eq!(respond("GET /readyz HTTP/1.1", &h).0, 503);
        ready.store(true, Ordering::Relaxed);
        assert_eq!(respond("GET /readyz HTTP/1.1", &h).0, 200);
        let (code, _, body) = respond("GET /metrics HTTP/1.1", &h);
        assert_eq!(code, 200);
        assert!(body.contains("keelson_leader"), "{body}");
        assert_eq!(respond("GET /nope HTTP/1.1", &h).0, 404);
        assert_eq!(respond("", &h).0, 404);
    }

    #[tokio::test]
    async fn serves_over_tcp() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let ready = Arc::new(AtomicBool::new(false));
        tokio::spawn(serve(l, Arc::new(health(ready.clone()))));
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        ready.store(true, Ordering::Relaxed);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        let m = get("/metrics").await;
        assert!(m.contains("# TYPE keelson_leader gauge"), "{m}");
    }
}
