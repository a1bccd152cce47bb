//! Tests of the upstream pool: reuse, freshness, retries of idempotent requests, timeouts and framing errors.

use super::*;
use http::Method;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::net::TcpStream;

fn limits() -> PoolLimits {
    PoolLimits {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(60),
        max_idle_per_host: 8,
        max_conns_per_host: 64,
        read_timeout: Duration::from_secs(60),
        body_timeout: Duration::from_secs(60),
    }
}

fn get(path: &str) -> Request<ReqBody> {
    Request::builder()
        .uri(path)
        .header(http::header::HOST, "upstream")
        .body(Either::Right(Full::new(Bytes::new())))
        .unwrap()
}

/// A listener on a free loopback port, and its address.
async fn listen() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    (l, addr)
}

/// A keep-alive HTTP/1.1 server that answers each request with its connection's number and
/// closes a connection after `per_conn` responses (0: never). `GET /slow` is never answered.
async fn upstream(per_conn: usize) -> (String, Arc<AtomicUsize>) {
    let (l, addr) = listen().await;
    let conns = Arc::new(AtomicUsize::new(0));
    let c = conns.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut served = 0;
                let mut chunk = [0u8; 1024];
                loop {
                    let Ok(r) = s.read(&mut chunk).await else {
                        return;
                    };
                    if r == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..r]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head: Vec<u8> = buf.drain(..end + 4).collect();
                        if head.starts_with(b"GET /slow ") {
                            continue;
                        }
                        let body = format!("conn{n}");
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if s.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                        served += 1;
                        if per_conn > 0 && served == per_conn {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, conns)
}

async fn body(r: Response<UpstreamBody>) -> String {
    let b = r.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(b.to_vec()).unwrap()
}

#[tokio::test]
async fn a_request_without_a_response_head_in_time_fails_and_its_connection_closes() {
    let (addr, conns) = upstream(0).await;
    let timeout = Duration::from_millis(300);
    let pools = Pools::new(PoolLimits {
        request_timeout: timeout,
        ..limits()
    });
    let pool = pools.host(&addr.parse().unwrap());
    // Answered requests spread over more than the timeout: the connection's timer fires
    // between them and is moved on, and the connection stays.
    for _ in 0..4 {
        let r = pool.send(get("/"), Instant::now()).await.unwrap();
        assert_eq!(body(r).await, "conn1");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let start = Instant::now();
    let Err(e) = pool.send(get("/slow"), start).await else {
        panic!("/slow was answered");
    };
    let took = start.elapsed();
    assert!(
        matches!(e, UpstreamError::Timeout(t) if t == timeout),
        "{e}"
    );
    assert!(took >= timeout && took < timeout * 4, "{took:?}");
    // That connection is closed; the next request gets a new one.
    assert_eq!(pool.idle(), 0);
    let r = pool.send(get("/"), Instant::now()).await.unwrap();
    assert_eq!(body(r).await, "conn2");
    assert_eq!(conns.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_connection_is_reused_once_its_response_is_read() {
    let (addr, conns) = upstream(0).await;
    let pools = Pools::new(limits());
    let pool = pools.host(&addr.parse().unwrap());
    for _ in 0..5 {
        let r = pool.send(get("/"), Instant::now()).await.unwrap();
        assert_eq!(body(r).await, "conn1");
        assert_eq!(pool.idle(), 1);
    }
    assert_eq!(conns.load(Ordering::SeqCst), 1);
    // Two at once need two connections; both are pooled afterwards.
    let (a, b) = tokio::join!(
        pool.send(get("/"), Instant::now()),
        pool.send(get("/"), Instant::now())
    );
    let (a, b) = (body(a.unwrap()).await, body(b.unwrap()).await);
    assert_ne!(a, b);
    assert_eq!(pool.idle(), 2);
    // The same address gives the same pool.
    assert!(Arc::ptr_eq(&pool, &pools.host(&addr.parse().unwrap())));
}

#[tokio::test]
async fn an_unread_response_does_not_go_back_to_the_pool() {
    let (addr, _) = upstream(0).await;
    let pool = Pools::new(limits()).host(&addr.parse().unwrap());
    let r = pool.send(get("/"), Instant::now()).await.unwrap();
    drop(r);
    assert_eq!(pool.idle(), 0);
}

#[tokio::test]
async fn a_connection_the_upstream_closed_is_replaced() {
    // The upstream closes every connection after one response: each request finds its pooled
    // connection closed and goes over a new one, without an error. A POST is never sent twice,
    // so it too must find the closed connection at checkout, not by failing on it.
    for method in [Method::GET, Method::POST] {
        let (addr, conns) = upstream(1).await;
        let pool = Pools::new(limits()).host(&addr.parse().unwrap());
        for i in 1..=4 {
            let mut req = get("/");
            *req.method_mut() = method.clone();
            let r = pool.send(req, Instant::now()).await.unwrap();
            assert_eq!(body(r).await, format!("conn{i}"));
            assert_eq!(pool.idle(), 1);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(conns.load(Ordering::SeqCst), 4);
    }
}

#[tokio::test]
async fn idle_connections_past_the_timeout_are_not_used() {
    let (addr, conns) = upstream(0).await;
    let pool = Pools::new(PoolLimits {
        idle_timeout: Duration::from_millis(50),
        ..limits()
    })
    .host(&addr.parse().unwrap());
    body(pool.send(get("/"), Instant::now()).await.unwrap()).await;
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert_eq!(
        body(pool.send(get("/"), Instant::now()).await.unwrap()).await,
        "conn2"
    );
    assert_eq!(conns.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn the_sweep_closes_stale_connections_and_forgets_unnamed_addresses() {
    let (addr, conns) = upstream(0).await;
    let authority: Authority = addr.parse().unwrap();
    let pools = Pools::new(PoolLimits {
        idle_timeout: Duration::from_millis(50),
        ..limits()
    });
    let pool = pools.host(&authority);
    body(pool.send(get("/"), Instant::now()).await.unwrap()).await;
    // Fresh and named: kept.
    pools.sweep(Instant::now(), |_| true);
    assert_eq!(pool.idle(), 1);
    // Past the idle timeout: closed, without any request coming.
    pools.sweep(Instant::now() + Duration::from_millis(60), |_| true);
    assert_eq!(pool.idle(), 0);
    // No longer named by the config: the address gets a new pool next time.
    pools.sweep(Instant::now(), |a| *a != authority);
    assert!(!Arc::ptr_eq(&pool, &pools.host(&authority)));
    assert_eq!(conns.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_address_nobody_listens_on_fails_at_once() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    let pool = Pools::new(limits()).host(&addr.parse().unwrap());
    let Err(e) = pool.send(get("/"), Instant::now()).await else {
        panic!("a response from an address nobody listens on")
    };
    assert!(matches!(e, UpstreamError::Connect(_)), "{e}");
}

/// A body of the given pieces with no length known ahead: hyper sends it chunked.
struct Pieces(std::collections::VecDeque<Bytes>);

impl Body for Pieces {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.get_mut().0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

fn pieces(parts: &[&'static [u8]]) -> Pieces {
    Pieces(parts.iter().map(|p| Bytes::from_static(p)).collect())
}

/// An upstream served by hyper. It answers `<method> <framing> <body>` (the framing is
/// `chunked` or the Content-Length), except:
/// - `/pieces`: a chunked body of many pieces, 100 KiB in all;
/// - `/until-close`: a body without a length, ended by closing the connection;
/// - `/close`: a short body with `Connection: close`.
async fn hyper_upstream() -> (String, Arc<AtomicUsize>) {
    let (l, addr) = listen().await;
    let conns = Arc::new(AtomicUsize::new(0));
    let c = conns.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            c.fetch_add(1, Ordering::SeqCst);
            let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let framing = match req.headers().get(http::header::CONTENT_LENGTH) {
                    Some(n) => n.to_str().unwrap().to_string(),
                    None if req.headers().contains_key(http::header::TRANSFER_ENCODING) => {
                        "chunked".to_string()
                    }
                    None => "none".to_string(),
                };
                let method = req.method().clone();
                let path = req.uri().path().to_string();
                let got = req.into_body().collect().await.unwrap().to_bytes();
                let resp = match path.as_str() {
                    "/pieces" => {
                        let piece: &'static [u8] = &[b'x'; 1024];
                        Response::new(Either::Left(pieces(&[piece; 100])))
                    }
                    "/close" => Response::builder()
                        .header(http::header::CONNECTION, "close")
                        .body(Either::Right(Full::new(Bytes::from_static(b"bye"))))
                        .unwrap(),
                    _ => {
                        let mut text = format!("{method} {framing} ").into_bytes();
                        text.extend_from_slice(&got);
                        Response::new(Either::Right(Full::new(Bytes::from(text))))
                    }
                };
                Ok::<_, std::convert::Infallible>(resp)
            });
            tokio::spawn(async move {
                let mut s = s;
                // `/until-close` is answered by hand: hyper frames every body it sends.
                let mut peek = [0u8; 32];
                let n = s.peek(&mut peek).await.unwrap_or(0);
                if peek[..n].starts_with(b"GET /until-close ") {
                    let _ = s.read(&mut [0u8; 4096]).await;
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\n\r\nall of it, until the end")
                        .await;
                    return;
                }
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, conns)
}

/// A front server like the router's: each request, its body as hyper gives it, goes to `pool`.
async fn front(pool: Arc<HostPool>) -> String {
    let (l, addr) = listen().await;
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let pool = pool.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let pool = pool.clone();
                async move {
                    let mut req = req.map(Either::Left);
                    req.headers_mut().remove(http::header::TRANSFER_ENCODING);
                    pool.send(req, Instant::now()).await
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc),
            );
        }
    });
    addr
}

/// Sends one request to `addr` over a new connection and returns the status and body.
async fn call<B>(addr: &str, req: Request<B>) -> (u16, Bytes)
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = tx.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

#[tokio::test]
async fn request_bodies_go_with_their_framing_and_responses_of_every_framing_come_back() {
    let (addr, conns) = hyper_upstream().await;
    let pool = Pools::new(limits()).host(&addr.parse().unwrap());
    let front = front(pool.clone()).await;
    let req = |method: Method, uri: &str| {
        Request::builder()
            .method(method)
            .uri(uri)
            .header(http::header::HOST, "up")
    };
    let bodiless = |method: Method, uri: &str| {
        let r = req(method, uri).body(http_body_util::Empty::<Bytes>::new());
        call(&front, r.unwrap())
    };
    let with = |b: Bytes| req(Method::POST, "/").body(Full::new(b)).unwrap();

    // A body with a length, one with none (chunked on both sides), and none at all.
    let (_, b) = call(&front, with(Bytes::from_static(b"abc"))).await;
    assert_eq!(b, "POST 3 abc");
    let streamed = pieces(&[b"one ", b"two ", b"three"]);
    let (_, b) = call(&front, req(Method::POST, "/").body(streamed).unwrap()).await;
    assert_eq!(b, "POST chunked one two three");
    assert_eq!(bodiless(Method::POST, "/").await.1, "POST 0 ");
    assert_eq!(bodiless(Method::GET, "/").await.1, "GET none ");
    // A large body, over many writes and reads.
    let big = Bytes::from(vec![b'y'; 300 * 1024]);
    let (_, b) = call(&front, with(big.clone())).await;
    assert_eq!(b.len(), "POST 307200 ".len() + big.len());
    // A large streamed body: its big pieces are written as they are, in chunks.
    let big_pieces =
        Pieces(vec![Bytes::from(vec![b'z'; 40_000]), Bytes::from_static(b"end")].into());
    let (_, b) = call(&front, req(Method::POST, "/").body(big_pieces).unwrap()).await;
    assert_eq!(b.len(), "POST chunked ".len() + 40_003);
    assert!(b.ends_with(b"zzzend"));
    assert_eq!(
        conns.load(Ordering::SeqCst),
        1,
        "one connection carried them all"
    );

    // A chunked response of 100 pieces, streamed; the connection is reused after it.
    let (status, b) = bodiless(Method::GET, "/pieces").await;
    assert_eq!((status, b.len()), (200, 100 * 1024));
    assert!(b.iter().all(|&c| c == b'x'));
    assert_eq!(pool.idle(), 1);
    // HEAD: no body, whatever the length says.
    assert_eq!(bodiless(Method::HEAD, "/").await, (200, Bytes::new()));
    assert_eq!(conns.load(Ordering::SeqCst), 1);

    // `Connection: close` and a body ended by closing: read whole, and not pooled.
    assert_eq!(bodiless(Method::GET, "/close").await.1, "bye");
    assert_eq!(pool.idle(), 0);
    let (_, b) = bodiless(Method::GET, "/until-close").await;
    assert_eq!(b, "all of it, until the end");
    assert_eq!(pool.idle(), 0);
}

/// An upstream that reads a little of each request and writes `answer` then closes, or with
/// `None` reads nothing and holds the connection for a minute.
async fn raw_upstream(answer: Option<&'static [u8]>) -> String {
    let (l, addr) = listen().await;
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                match answer {
                    Some(answer) => {
                        let _ = s.read(&mut [0u8; 4096]).await;
                        let _ = s.write_all(answer).await;
                    }
                    None => tokio::time::sleep(Duration::from_secs(60)).await,
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_response_that_breaks_off_is_an_error_and_its_connection_is_not_reused() {
    let addr = raw_upstream(Some(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort")).await;
    let pool = Pools::new(limits()).host(&addr.parse().unwrap());
    let r = pool.send(get("/"), Instant::now()).await.unwrap();
    let e = r.into_body().collect().await.unwrap_err();
    assert!(matches!(e, UpstreamError::Closed), "{e}");
    assert_eq!(pool.idle(), 0);
}

#[tokio::test]
async fn an_upstream_that_does_not_read_the_request_body_times_out() {
    let addr = raw_upstream(None).await;
    let timeout = Duration::from_millis(300);
    let pool = Pools::new(PoolLimits {
        request_timeout: timeout,
        ..limits()
    })
    .host(&addr.parse().unwrap());
    // More than the sockets' buffers hold.
    let body = Bytes::from(vec![0u8; 64 << 20]);
    let mut req = get("/");
    *req.method_mut() = Method::POST;
    req.headers_mut()
        .insert(http::header::CONTENT_LENGTH, body.len().into());
    *req.body_mut() = Either::Right(Full::new(body));
    let start = Instant::now();
    let Err(e) = pool.send(req, start).await else {
        panic!("a response from an upstream that reads nothing");
    };
    assert!(matches!(e, UpstreamError::Timeout(_)), "{e}");
    assert!(start.elapsed() < timeout * 4, "{:?}", start.elapsed());
    assert_eq!(pool.idle(), 0);
}
