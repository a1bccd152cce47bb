//! `/healthz` and `/readyz` for the manager's probes: a minimal HTTP/1.1 responder on one port.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The answer to one request line: status code and body.
pub fn respond(request: &str, ready: bool) -> (u16, &'static str) {
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    match path {
        "/healthz" | "/livez" => (200, "ok\n"),
        "/readyz" if ready => (200, "ok\n"),
        "/readyz" => (503, "not ready\n"),
        _ => (404, "not found\n"),
    }
}

/// Serves the probes on `listener` until the process ends. `ready` turns /readyz to 200.
pub async fn serve(listener: TcpListener, ready: Arc<AtomicBool>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let ready = ready.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n =
                match tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf))
                    .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
            let req = String::from_utf8_lossy(&buf[..n]);
            let (code, body) = respond(
                req.lines().next().unwrap_or(""),
                ready.load(Ordering::Relaxed),
            );
            let reason = match code {
                200 => "OK",
                503 => "Service Unavailable",
                _ => "Not Found",
            };
            let resp = format!(
                "HTTP/1.1 {code} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes() {
        assert_eq!(respond("GET /healthz HTTP/1.1", false).0, 200);
        assert_eq!(respond("GET /readyz HTTP/1.1", false).0, 503);
        assert_eq!(respond("GET /readyz HTTP/1.1", true).0, 200);
        assert_eq!(respond("GET /metrics HTTP/1.1", true).0, 404);
        assert_eq!(respond("", true).0, 404);
    }

    #[tokio::test]
    async fn serves_over_tcp() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let ready = Arc::new(AtomicBool::new(false));
        tokio::spawn(serve(l, ready.clone()));
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
    }
}
