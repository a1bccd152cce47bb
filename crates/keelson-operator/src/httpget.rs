//! One plain HTTP/1.1 GET to an address in the cluster, with a deadline: how the operator reads the
//! servers it runs (a notebook's activity, the router's measurements). Errors name the URL and the
//! failure, never a request header (which may carry a token).

use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderName;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// The URL of `path` at `host:port` (an IPv6 address in brackets).
pub fn url(host: &str, port: i32, path: &str) -> String {
    format!("http://{}:{port}{path}", authority_host(host))
}

fn authority_host(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// GETs `path` from `host:port` with `headers` and returns the body of a 2xx answer; anything else
/// (no connection, no answer within `timeout`, another status) is an error naming the URL.
pub async fn get(
    host: &str,
    port: i32,
    path: &str,
    headers: &[(HeaderName, String)],
    timeout: Duration,
) -> Result<Bytes, String> {
    tokio::time::timeout(timeout, fetch(host, port, path, headers))
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "GET {}: no answer in {}s",
                url(host, port, path),
                timeout.as_secs()
            ))
        })
}

async fn fetch(
    host: &str,
    port: i32,
    path: &str,
    headers: &[(HeaderName, String)],
) -> Result<Bytes, String> {
    let url = url(host, port, path);
    let fail = |e: &dyn std::fmt::Display| format!("GET {url}: {e}");
    let stream = tokio::net::TcpStream::connect((host, u16::try_from(port).unwrap_or(0)))
        .await
        .map_err(|e| fail(&e))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| fail(&e))?;
    tokio::spawn(conn);
    let mut req = http::Request::get(path).header(
        http::header::HOST,
        format!("{}:{port}", authority_host(host)),
    );
    for (name, value) in headers {
        req = req.header(name, value);
    }
    let req = req.body(Empty::<Bytes>::new()).map_err(|e| fail(&e))?;
    let resp = send.send_request(req).await.map_err(|e| fail(&e))?;
    let code = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| fail(&e))?
        .to_bytes();
    if !code.is_success() {
        return Err(format!("GET {url}: HTTP {}", code.as_u16()));
    }
    Ok(body)
}

/// A local HTTP/1.1 server for the tests of the operator's readers: answers the first request of
/// each connection with `reply(request)` (the whole message as text), until the test ends. Returns
/// its port.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) async fn test_server(reply: impl Fn(&str) -> String + Send + 'static) -> i32 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = i32::from(l.local_addr().unwrap().port());
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap();
            let answer = reply(&String::from_utf8_lossy(&buf[..n]));
            s.write_all(answer.as_bytes()).await.unwrap();
        }
    });
    port
}
