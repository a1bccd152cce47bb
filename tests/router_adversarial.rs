//! The real `keelson router` binary against hostile clients and broken upstreams, on loopback and
//! without a cluster: each case writes its own router config, starts the router with low limits
//! as flags, speaks raw bytes to it (HTTP/1.1, and HTTP/2 frames written by hand), and stands a
//! raw TCP upstream behind it that misbehaves on command. Each case asserts what the client got
//! and what the upstream saw, byte for byte where the bytes are the point.
//!
//! No assertion is on time tighter than seconds: the timeouts under test are set to one second
//! and the checks wait up to tens of seconds for their effect.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

/// The longest any case waits for something that must happen.
const PATIENCE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// The upstream that misbehaves on command.

/// What the upstream does with one request, once it has read it whole.
#[derive(Clone)]
enum Act {
    /// Sends these bytes and waits for the next request.
    Reply(Vec<u8>),
    /// Sends these bytes and closes the connection.
    Close(Vec<u8>),
    /// Sends these bytes, then sends nothing more and waits for the router to close.
    Hold(Vec<u8>),
    /// Sends these bytes, then zeros until the router stops taking them and closes.
    Flood(Vec<u8>),
}

/// What the upstream saw on one connection.
#[derive(Default, Debug, Clone)]
struct Seen {
    /// Every byte received.
    raw: Vec<u8>,
    /// The router closed the connection (the upstream read its end, or a write failed).
    closed: bool,
}

/// A raw HTTP/1.1 upstream: for the n-th request overall it does `script(n)`.
struct Upstream {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    async fn start(script: impl Fn(usize) -> Act + Send + Sync + 'static) -> Upstream {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let script = Arc::new(script);
        let requests = Arc::new(AtomicUsize::new(0));
        let c = conns.clone();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                let index = {
                    let mut c = c.lock().unwrap();
                    c.push(Seen::default());
                    c.len() - 1
                };
                tokio::spawn(serve_upstream(
                    s,
                    index,
                    c.clone(),
                    script.clone(),
                    requests.clone(),
                ));
            }
        });
        Upstream { addr, conns }
    }

    /// What each connection saw so far.
    fn seen(&self) -> Vec<Seen> {
        self.conns.lock().unwrap().clone()
    }

    /// Every byte received, over all connections, as text.
    fn all(&self) -> String {
        self.seen()
            .iter()
            .map(|s| String::from_utf8_lossy(&s.raw).into_owned())
            .collect()
    }

    /// Waits until every connection opened so far has been closed by the router.
    async fn wait_all_closed(&self) {
        wait_until("the router closes its upstream connections", || {
            let seen = self.seen();
            !seen.is_empty() && seen.iter().all(|s| s.closed)
        })
        .await;
    }
}

async fn serve_upstream(
    mut s: TcpStream,
    index: usize,
    conns: Arc<Mutex<Vec<Seen>>>,
    script: Arc<dyn Fn(usize) -> Act + Send + Sync>,
    requests: Arc<AtomicUsize>,
) {
    let closed = |conns: &Arc<Mutex<Vec<Seen>>>| conns.lock().unwrap()[index].closed = true;
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Reads until one whole request is in `pending`.
        let end = loop {
            if let Some(end) = request_end(&pending) {
                break end;
            }
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return closed(&conns),
                Ok(n) => {
                    conns.lock().unwrap()[index]
                        .raw
                        .extend_from_slice(&buf[..n]);
                    pending.extend_from_slice(&buf[..n]);
                }
            }
        };
        pending.drain(..end);
        match script(requests.fetch_add(1, Relaxed)) {
            Act::Reply(bytes) => {
                if s.write_all(&bytes).await.is_err() {
                    return closed(&conns);
                }
            }
            Act::Close(bytes) => {
                let _ = s.write_all(&bytes).await;
                return;
            }
            Act::Hold(bytes) => {
                let _ = s.write_all(&bytes).await;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return closed(&conns),
                        Ok(n) => conns.lock().unwrap()[index]
                            .raw
                            .extend_from_slice(&buf[..n]),
                    }
                }
            }
            Act::Flood(head) => {
                if s.write_all(&head).await.is_ok() {
                    let zeros = vec![0u8; 64 * 1024];
                    while s.write_all(&zeros).await.is_ok() {}
                }
                return closed(&conns);
            }
        }
    }
}

/// Where the first whole request in `b` ends: its head, and its body by Content-Length or
/// chunked framing.
fn request_end(b: &[u8]) -> Option<usize> {
    let head = find(b, b"\r\n\r\n")? + 4;
    let text = String::from_utf8_lossy(&b[..head]).to_ascii_lowercase();
    if text.contains("\r\ntransfer-encoding: chunked\r\n") {
        return find(&b[head..], b"\r\n0\r\n\r\n")
            .map(|i| head + i + 7)
            .or_else(|| b[head..].starts_with(b"0\r\n\r\n").then_some(head + 5));
    }
    let len = text
        .split("\r\n")
        .find_map(|l| l.strip_prefix("content-length: "))
        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
    (b.len() >= head + len).then_some(head + len)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A response of `body` with its Content-Length.
fn ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

// ---------------------------------------------------------------------------------------------
// The router under test.

struct Router {
    addr: SocketAddr,
    admin: SocketAddr,
    _child: Child,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

impl Router {
    /// The router with `config` (JSON) and `flags`, once it is ready.
    async fn start(config: serde_json::Value, flags: &[&str]) -> Router {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "keelson-router-adversarial-{}-{}",
            std::process::id(),
            N.fetch_add(1, Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config.json");
        std::fs::write(&file, config.to_string()).unwrap();
        // A port found free may be taken again before the router binds it: then the router
        // exits, and starts again on other ports.
        for _ in 0..5 {
            let (addr, admin) = (free_port(), free_port());
            let mut child = Command::new(keelson_testkit::keelson_bin())
                .arg("router")
                .args(["--listen", &addr.to_string()])
                .args(["--admin-listen", &admin.to_string()])
                .args(["--config", file.to_str().unwrap()])
                .args(["--workers", "2"])
                .args(flags)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("keelson router starts");
            let ready = async {
                loop {
                    if child.try_wait().unwrap().is_some() {
                        return false;
                    }
                    if let Ok(mut s) = TcpStream::connect(admin).await {
                        let _ = s
                            .write_all(
                                b"GET /readyz HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
                            )
                            .await;
                        let mut out = Vec::new();
                        let _ = s.read_to_end(&mut out).await;
                        if out.starts_with(b"HTTP/1.1 200") {
                            return true;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            };
            let ready = tokio::time::timeout(PATIENCE, ready)
                .await
                .expect("the router is ready");
            if ready {
                return Router {
                    addr,
                    admin,
                    _child: child,
                    _dir: TempDir(dir),
                };
            }
        }
        panic!("the router did not start on five pairs of free ports");
    }

    /// The router in front of one variant `a` at `up`.
    async fn one(up: &Upstream, flags: &[&str]) -> Router {
        let config = serde_json::json!({"version": 1, "variants": [
            {"name": "a", "weight": 100, "upstream": up.addr.to_string()}]});
        Router::start(config, flags).await
    }

    /// The value of `keelson_router_errors_total{variant="a"}`.
    async fn errors(&self) -> u64 {
        let mut s = TcpStream::connect(self.admin).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out.lines()
            .find_map(|l| l.strip_prefix("keelson_router_errors_total{variant=\"a\"} "))
            .expect("the errors counter")
            .trim()
            .parse()
            .unwrap()
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.addr).await.unwrap()
    }

    /// Sends `raw` on a new connection and reads one response.
    async fn exchange(&self, raw: &[u8]) -> Resp {
        let mut s = self.connect().await;
        s.write_all(raw).await.unwrap();
        read_response(&mut s).await
    }
}

// ---------------------------------------------------------------------------------------------
// A raw HTTP/1.1 client.

/// A response as the client read it.
#[derive(Debug)]
struct Resp {
    status: u16,
    /// The head, lower-cased.
    head: String,
    body: Vec<u8>,
    /// The body was complete by its framing (not cut by the connection's end).
    complete: bool,
}

impl Resp {
    fn body(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// How many header lines start with `name: `.
    fn count(&self, name: &str) -> usize {
        self.head
            .split("\r\n")
            .filter(|l| l.starts_with(&format!("{name}: ")))
            .count()
    }
}

/// Reads one response from `s` (by its Content-Length, chunks, or to the connection's end);
/// fails the test past the patience.
async fn read_response(s: &mut TcpStream) -> Resp {
    tokio::time::timeout(PATIENCE, read_response_inner(s))
        .await
        .expect("a response within the patience")
}

/// Reads more of `s` onto `got`; false at the connection's end.
async fn more(s: &mut TcpStream, got: &mut Vec<u8>, buf: &mut [u8]) -> bool {
    match s.read(buf).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            got.extend_from_slice(&buf[..n]);
            true
        }
    }
}

async fn read_response_inner(s: &mut TcpStream) -> Resp {
    match try_read_response(s).await {
        Ok(r) => r,
        Err(got) => panic!(
            "the connection closed before a response head: {:?}",
            String::from_utf8_lossy(&got)
        ),
    }
}

/// One response, or what came before the connection closed without a whole head.
async fn try_read_response(s: &mut TcpStream) -> Result<Resp, Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let head_end = loop {
        if let Some(i) = find(&got, b"\r\n\r\n") {
            break i + 4;
        }
        if !more(s, &mut got, &mut buf).await {
            return Err(got);
        }
    };
    let head = String::from_utf8_lossy(&got[..head_end]).to_ascii_lowercase();
    let status = head[9..12].parse().unwrap();
    let mut rest = got[head_end..].to_vec();
    let length = head
        .split("\r\n")
        .find_map(|l| l.strip_prefix("content-length: "))
        .map(|v| v.trim().parse::<usize>().unwrap());
    let chunked = head.contains("\r\ntransfer-encoding: chunked\r\n");
    let (body, complete) = if let Some(n) = length {
        while rest.len() < n && more(s, &mut rest, &mut buf).await {}
        let complete = rest.len() >= n;
        rest.truncate(n);
        (rest, complete)
    } else if chunked {
        let mut body = Vec::new();
        let mut at = 0;
        loop {
            let Some(line) = find(&rest[at..], b"\r\n") else {
                if more(s, &mut rest, &mut buf).await {
                    continue;
                }
                break (body, false);
            };
            let size = usize::from_str_radix(
                std::str::from_utf8(&rest[at..at + line]).unwrap().trim(),
                16,
            )
            .unwrap();
            if size == 0 {
                break (body, true);
            }
            let start = at + line + 2;
            while rest.len() < start + size + 2 {
                if !more(s, &mut rest, &mut buf).await {
                    break;
                }
            }
            if rest.len() < start + size + 2 {
                body.extend_from_slice(&rest[start.min(rest.len())..]);
                break (body, false);
            }
            body.extend_from_slice(&rest[start..start + size]);
            at = start + size + 2;
        }
    } else if status == 204 || status == 304 || status < 200 {
        (Vec::new(), true)
    } else {
        while more(s, &mut rest, &mut buf).await {}
        (rest, true)
    };
    Ok(Resp {
        status,
        head,
        body,
        complete,
    })
}

/// Whether the peer has closed `s` (reads its end, discarding what comes before), within the
/// patience.
async fn closed_by_peer(s: &mut TcpStream) -> bool {
    let mut buf = vec![0u8; 64 * 1024];
    let closed = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(PATIENCE, closed).await.is_ok()
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !check() {
        assert!(start.elapsed() < PATIENCE, "waited too long until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 frames by hand (HPACK literals without indexing or Huffman).

mod h2 {
    use super::*;

    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub const DATA: u8 = 0;
    pub const HEADERS: u8 = 1;
    pub const RST_STREAM: u8 = 3;
    pub const SETTINGS: u8 = 4;
    pub const GOAWAY: u8 = 7;
    pub const END_STREAM: u8 = 1;
    pub const END_HEADERS: u8 = 4;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn int7(n: usize, out: &mut Vec<u8>) {
        if n < 127 {
            out.push(n as u8);
            return;
        }
        out.push(127);
        let mut n = n - 127;
        while n >= 128 {
            out.push((n % 128 + 128) as u8);
            n /= 128;
        }
        out.push(n as u8);
    }

    /// A header block of literal fields.
    pub fn block(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in fields {
            out.push(0);
            int7(name.len(), &mut out);
            out.extend_from_slice(name.as_bytes());
            int7(value.len(), &mut out);
            out.extend_from_slice(value.as_bytes());
        }
        out
    }

    /// A connection with the preface and these settings sent.
    pub async fn connect(addr: SocketAddr, settings: &[(u16, u32)]) -> TcpStream {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut payload = Vec::new();
        for (id, v) in settings {
            payload.extend_from_slice(&id.to_be_bytes());
            payload.extend_from_slice(&v.to_be_bytes());
        }
        let mut out = PREFACE.to_vec();
        out.extend(frame(SETTINGS, 0, 0, &payload));
        s.write_all(&out).await.unwrap();
        s
    }

    /// A GET with these extra fields on `stream`, ended.
    pub fn get(stream: u32, extra: &[(&str, &str)]) -> Vec<u8> {
        let mut fields = vec![
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/h2"),
            (":authority", "h2.example"),
        ];
        fields.extend_from_slice(extra);
        frame(HEADERS, END_HEADERS | END_STREAM, stream, &block(&fields))
    }

    /// The next frame: (type, flags, stream, payload); `None` at the connection's end.
    pub async fn read_frame(s: &mut TcpStream) -> Option<(u8, u8, u32, Vec<u8>)> {
        let mut head = [0u8; 9];
        s.read_exact(&mut head).await.ok()?;
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).await.ok()?;
        Some((head[3], head[4], stream, payload))
    }

    /// Reads frames (acknowledging the server's settings) until `stream` gets HEADERS or
    /// RST_STREAM, or the connection ends; returns that frame's type and first payload byte.
    pub async fn answer(s: &mut TcpStream, stream: u32) -> Option<(u8, u8)> {
        let read = async {
            loop {
                let (kind, flags, id, payload) = read_frame(s).await?;
                if kind == SETTINGS && flags & 1 == 0 {
                    s.write_all(&frame(SETTINGS, 1, 0, &[])).await.ok()?;
                }
                if kind == GOAWAY {
                    return Some((GOAWAY, 0));
                }
                if id == stream && (kind == HEADERS || kind == RST_STREAM) {
                    return Some((kind, payload.first().copied().unwrap_or(0)));
                }
            }
        };
        tokio::time::timeout(PATIENCE, read).await.ok().flatten()
    }
}

// The HPACK static table entry of `:status: 200`, which hyper's encoder indexes.
const H2_STATUS_200: u8 = 0x88;

// ---------------------------------------------------------------------------------------------
// Finding 1: nothing timed out once a response had started.

/// A client that never reads a large response has its connection closed after the send timeout,
/// and the upstream connection with it.
#[tokio::test]
async fn a_client_that_never_reads_is_cut_off() {
    let up = Upstream::start(|_| {
        Act::Flood(b"HTTP/1.1 200 OK\r\ncontent-length: 100000000000\r\n\r\n".to_vec())
    })
    .await;
    let r = Router::one(&up, &["--send-timeout-ms", "1000"]).await;
    let mut s = r.connect().await;
    s.write_all(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    // The client reads nothing; the upstream's writes stall, then its connection is closed.
    up.wait_all_closed().await;
    assert_eq!(up.seen().len(), 1);
}

/// An upstream that promises 100 bytes, sends 10 and stalls: the client gets the 10 bytes and
/// the connection's end, and the upstream connection is closed.
#[tokio::test]
async fn an_upstream_that_stalls_mid_body_is_cut_off() {
    let up = Upstream::start(|_| {
        Act::Hold(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789".to_vec())
    })
    .await;
    let r = Router::one(&up, &["--upstream-read-timeout-ms", "1000"]).await;
    let resp = r
        .exchange(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body(), "0123456789");
    assert!(!resp.complete, "the body cannot be complete");
    up.wait_all_closed().await;
}

/// HTTP/2 with INITIAL_WINDOW_SIZE=0 and several streams: the router advertises its stream limit,
/// and closes the connection whose responses cannot move, with every upstream connection.
#[tokio::test]
async fn an_h2_client_without_a_window_is_cut_off() {
    let body = "x".repeat(256 * 1024);
    let up = Upstream::start(move |_| Act::Hold(ok(&body))).await;
    let r = Router::one(
        &up,
        &["--send-timeout-ms", "1000", "--max-concurrent-streams", "7"],
    )
    .await;
    let mut s = h2::connect(r.addr, &[(0x4, 0)]).await;
    // The server's SETTINGS carry MAX_CONCURRENT_STREAMS = 7.
    let (kind, _, _, payload) = h2::read_frame(&mut s).await.unwrap();
    assert_eq!(kind, h2::SETTINGS);
    let settings: Vec<(u16, u32)> = payload
        .chunks(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect();
    assert!(settings.contains(&(0x3, 7)), "{settings:?}");
    s.write_all(&h2::frame(h2::SETTINGS, 1, 0, &[]))
        .await
        .unwrap();
    let mut out = Vec::new();
    for id in [1u32, 3, 5, 7, 9] {
        out.extend(h2::get(id, &[]));
    }
    s.write_all(&out).await.unwrap();
    wait_until("the upstream has every request", || up.seen().len() == 5).await;
    assert!(closed_by_peer(&mut s).await, "the connection stays open");
    up.wait_all_closed().await;
}

/// At most --max-upstream-conns connections to an address: past it, a request waits for one up
/// to the connect timeout, then gets a 503, and the upstream never sees a second connection.
#[tokio::test]
async fn upstream_connections_are_capped() {
    let up = Upstream::start(|n| {
        if n == 0 {
            Act::Hold(Vec::new())
        } else {
            Act::Reply(ok("late"))
        }
    })
    .await;
    let r = Router::one(
        &up,
        &["--max-upstream-conns", "1", "--connect-timeout-ms", "1000"],
    )
    .await;
    let mut first = r.connect().await;
    first
        .write_all(b"GET /held HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    wait_until("the first request is upstream", || up.seen().len() == 1).await;
    let resp = r
        .exchange(b"GET /second HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await;
    assert_eq!(resp.status, 503, "{}", resp.body());
    assert_eq!(up.seen().len(), 1);
    assert!(!up.all().contains("/second"));
}

// ---------------------------------------------------------------------------------------------
// Finding 2: client connections and request heads.

/// Past --max-connections, a connection waits until another closes, then is served.
#[tokio::test]
async fn client_connections_are_capped() {
    let up = Upstream::start(|_| Act::Reply(ok("hi"))).await;
    let r = Router::one(&up, &["--max-connections", "2"]).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = r.connect().await;
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_response(&mut s).await.status, 200);
        held.push(s);
    }
    let mut third = r.connect().await;
    third
        .write_all(b"GET /third HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_secs(2), third.peek(&mut byte)).await;
    assert!(early.is_err(), "the third connection was served at once");
    drop(held.pop());
    let resp = read_response(&mut third).await;
    assert_eq!((resp.status, resp.body().as_str()), (200, "hi"));
}

/// A request head larger than --max-header-bytes gets a 431 and never reaches the upstream.
#[tokio::test]
async fn an_oversized_request_head_is_refused() {
    let up = Upstream::start(|_| Act::Reply(ok("hi"))).await;
    let r = Router::one(&up, &[]).await;
    let mut raw = b"GET / HTTP/1.1\r\nhost: x\r\nx-big: ".to_vec();
    raw.extend(std::iter::repeat_n(b'a', 100 * 1024));
    raw.extend_from_slice(b"\r\nconnection: close\r\n\r\n");
    let mut s = r.connect().await;
    // The router may answer and close before it has taken every byte.
    let _ = s.write_all(&raw).await;
    let resp = read_response(&mut s).await;
    assert_eq!(resp.status, 431);
    // The same over HTTP/2: refused, not forwarded.
    let mut s = h2::connect(r.addr, &[]).await;
    let big = "a".repeat(100 * 1024);
    let fields = [
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/h2big"),
        (":authority", "x"),
        ("x-big", big.as_str()),
    ];
    let _ = s
        .write_all(&h2::frame(
            h2::HEADERS,
            h2::END_HEADERS | h2::END_STREAM,
            1,
            &h2::block(&fields),
        ))
        .await;
    let answer = h2::answer(&mut s, 1).await;
    assert_ne!(answer, Some((h2::HEADERS, H2_STATUS_200)));
    assert!(up.seen().is_empty(), "{}", up.all());
}

// ---------------------------------------------------------------------------------------------
// Findings 3, 8, 9 and 10: headers a client must not control.

/// A client's x-keelson-mirror, hop-by-hop headers named by a non-ASCII Connection value, and a
/// Connection that names Host never reach the upstream as sent.
#[tokio::test]
async fn forged_and_hop_by_hop_headers_are_removed() {
    let up = Upstream::start(|_| Act::Reply(ok("hi"))).await;
    let r = Router::one(&up, &[]).await;
    let mut raw = b"GET /p HTTP/1.1\r\nhost: public.example\r\nx-keelson-mirror: 1\r\nx-secret: s\r\nconnection: x-secret, caf"
        .to_vec();
    raw.push(0xe9);
    raw.extend_from_slice(b", host\r\nx-kept: k\r\n\r\n");
    let resp = r.exchange(&raw).await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        up.all(),
        "GET /p HTTP/1.1\r\nhost: public.example\r\nx-kept: k\r\n\r\n"
    );
}

/// Two Host headers, an HTTP/1.1 request without one, and CONNECT get a 400; an absolute-form
/// target's authority becomes the Host.
#[tokio::test]
async fn host_and_target_are_checked() {
    let up = Upstream::start(|_| Act::Reply(ok("hi"))).await;
    let r = Router::one(&up, &[]).await;
    for raw in [
        &b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\nconnection: close\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n",
        b"CONNECT internal:22 HTTP/1.1\r\nhost: internal:22\r\nconnection: close\r\n\r\n",
    ] {
        let resp = r.exchange(raw).await;
        assert_eq!(resp.status, 400, "{}", String::from_utf8_lossy(raw));
    }
    assert!(up.seen().is_empty(), "{}", up.all());
    let resp = r
        .exchange(
            b"GET http://public.example/p?q HTTP/1.1\r\nhost: other\r\nconnection: close\r\n\r\n",
        )
        .await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        up.all(),
        "GET /p?q HTTP/1.1\r\nhost: public.example\r\n\r\n"
    );
}

/// HTTP/2: cookie fields are joined, the authority is the Host, content-length sent twice reaches
/// the upstream once (from the body), and connection-specific fields are refused.
#[tokio::test]
async fn h2_requests_become_one_clean_http1_request() {
    let up = Upstream::start(|_| Act::Reply(ok("hi"))).await;
    let r = Router::one(&up, &[]).await;
    let mut s = h2::connect(r.addr, &[]).await;
    s.write_all(&h2::get(1, &[("cookie", "a=1"), ("cookie", "b=2")]))
        .await
        .unwrap();
    assert_eq!(
        h2::answer(&mut s, 1).await,
        Some((h2::HEADERS, H2_STATUS_200))
    );
    assert_eq!(
        up.all(),
        "GET /h2 HTTP/1.1\r\ncookie: a=1; b=2\r\nhost: h2.example\r\n\r\n"
    );
    let fields = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/post"),
        (":authority", "h2.example"),
        ("content-length", "5"),
        ("content-length", "5"),
    ];
    let mut out = h2::frame(h2::HEADERS, h2::END_HEADERS, 3, &h2::block(&fields));
    out.extend(h2::frame(h2::DATA, h2::END_STREAM, 3, b"hello"));
    s.write_all(&out).await.unwrap();
    let answer = h2::answer(&mut s, 3).await;
    let sent = up.all();
    let post = &sent[sent.find("POST").unwrap_or(sent.len())..];
    assert_eq!(answer, Some((h2::HEADERS, H2_STATUS_200)));
    assert_eq!(
        post,
        "POST /post HTTP/1.1\r\nhost: h2.example\r\ncontent-length: 5\r\n\r\nhello"
    );
    // Connection-specific fields are a malformed request (RFC 9113 §8.2.2).
    let mut s = h2::connect(r.addr, &[]).await;
    s.write_all(&h2::get(
        1,
        &[("connection", "x-secret"), ("x-secret", "1")],
    ))
    .await
    .unwrap();
    let answer = h2::answer(&mut s, 1).await;
    assert!(
        matches!(answer, Some((h2::RST_STREAM | h2::GOAWAY, _)) | None),
        "{answer:?}"
    );
    assert!(!up.all().contains("x-secret"));
}

/// The sticky header twice is a 400; the sticky choice depends on the router's key.
#[tokio::test]
async fn sticky_routing_is_keyed_and_refuses_duplicates() {
    let a = Upstream::start(|_| Act::Reply(ok("a"))).await;
    let b = Upstream::start(|_| Act::Reply(ok("b"))).await;
    let config = serde_json::json!({"version": 1, "stickyHeader": "x-user", "variants": [
        {"name": "a", "weight": 50, "upstream": a.addr.to_string()},
        {"name": "b", "weight": 50, "upstream": b.addr.to_string()}]});
    let choices = |r: Router| async move {
        let mut s = r.connect().await;
        let mut out = String::new();
        for key in 0..64 {
            s.write_all(format!("GET / HTTP/1.1\r\nhost: x\r\nx-user: u{key}\r\n\r\n").as_bytes())
                .await
                .unwrap();
            out.push_str(&read_response(&mut s).await.body());
        }
        (r, out)
    };
    let (r1, first) = choices(Router::start(config.clone(), &["--sticky-key", "one"]).await).await;
    let (_, again) = choices(Router::start(config.clone(), &["--sticky-key", "one"]).await).await;
    let (_, other) = choices(Router::start(config.clone(), &["--sticky-key", "two"]).await).await;
    assert_eq!(first, again, "the same key, the same choices");
    assert_ne!(first, other, "another key, other choices");
    // The unkeyed hash of the values would give these choices.
    let split = keelson_router::split::Split::new([("a", 50), ("b", 50)]).unwrap();
    let unkeyed: String = (0..64)
        .map(|k| ["a", "b"][split.sticky(format!("u{k}").as_bytes())])
        .collect();
    assert_ne!(first, unkeyed);
    let before = a.all().len() + b.all().len();
    let resp = r1
        .exchange(
            b"GET / HTTP/1.1\r\nhost: x\r\nx-user: u1\r\nx-user: u2\r\nconnection: close\r\n\r\n",
        )
        .await;
    assert_eq!(resp.status, 400);
    assert_eq!(before, a.all().len() + b.all().len());
}

// ---------------------------------------------------------------------------------------------
// Findings 4 and 7: request framing, and client mistakes that are not the variant's.

/// Whatever framing the client sends, the upstream gets exactly one framing header, written from
/// the body; requests that cannot be framed get a 400 and reach no upstream.
#[tokio::test]
async fn request_framing_reaches_the_upstream_once() {
    let up = Upstream::start(|_| Act::Reply(ok("hi"))).await;
    let r = Router::one(&up, &[]).await;
    let mut s = r.connect().await;
    // CL and TE: TE frames the body (hyper drops the length), and the request goes on chunked.
    s.write_all(b"POST /te HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        .await
        .unwrap();
    let resp = read_response(&mut s).await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        up.all(),
        "POST /te HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    // The same length twice: one.
    let resp = r
        .exchange(b"POST /cl HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        .await;
    assert_eq!(resp.status, 200);
    let all = up.all();
    assert!(
        all.ends_with("POST /cl HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nok"),
        "{all}"
    );
    // Bare LF line ends are read (as hyper does) and sent on with CRLF.
    let resp = r
        .exchange(b"GET /lf HTTP/1.1\nhost: x\nconnection: close\n\n")
        .await;
    assert_eq!(resp.status, 200);
    assert!(up.all().ends_with("GET /lf HTTP/1.1\r\nhost: x\r\n\r\n"));
    let forwarded = up.all().len();
    for raw in [
        // Two different lengths.
        &b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok"[..],
        // A coding after chunked.
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        // obs-fold.
        b"GET / HTTP/1.1\r\nhost: x\r\nx-a: 1\r\n folded\r\n\r\n",
        // A bare CR in a value.
        b"GET / HTTP/1.1\r\nhost: x\r\nx-a: 1\r2\r\n\r\n",
        // A space before the colon.
        b"GET / HTTP/1.1\r\nhost : x\r\n\r\n",
    ] {
        let resp = r.exchange(raw).await;
        assert_eq!(resp.status, 400, "{}", String::from_utf8_lossy(raw));
    }
    assert_eq!(up.all().len(), forwarded, "{}", up.all());
}

/// A bad chunk in the request body gets a 400 and a body that stalls a 408; neither counts as
/// the variant's error.
#[tokio::test]
async fn client_body_mistakes_are_the_clients() {
    let up = Upstream::start(|_| Act::Reply(ok("hi"))).await;
    let r = Router::one(&up, &["--request-timeout-ms", "1000"]).await;
    let resp = r
        .exchange(b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")
        .await;
    assert_eq!(resp.status, 400, "{}", resp.body());
    let mut s = r.connect().await;
    s.write_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nab")
        .await
        .unwrap();
    let resp = read_response(&mut s).await;
    assert_eq!(resp.status, 408, "{}", resp.body());
    assert_eq!(r.errors().await, 0);
}

/// A body timeout of one second, and a request timeout far past the patience: a 408 seen within
/// the patience is the body timeout's.
const BODY_TIMEOUT: &[&str] = &[
    "--client-body-timeout-ms",
    "1000",
    "--request-timeout-ms",
    "120000",
];

/// Sends a request to `path` that promises 10 body bytes and sends 2, then nothing; its response.
async fn stall_body(r: &Router, path: &str) -> Resp {
    let mut s = r.connect().await;
    let head = format!("POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nab");
    s.write_all(head.as_bytes()).await.unwrap();
    read_response(&mut s).await
}

/// A request body that stops mid-way gets a 408 after the body timeout, long before the request
/// timeout (past the patience): the upstream saw the head and the first bytes, then its connection
/// closed, and the variant's error count stays at 0. A body sent slowly, with each gap under the
/// body timeout and the whole taking several timeouts, goes through.
#[tokio::test]
async fn a_request_body_that_stalls_is_cut_after_the_body_timeout() {
    let up = Upstream::start(|_| Act::Reply(ok("hi"))).await;
    let r = Router::one(&up, BODY_TIMEOUT).await;
    let resp = stall_body(&r, "/stall").await;
    assert_eq!(resp.status, 408, "{}", resp.body());
    assert!(resp.body().contains("request body"), "{}", resp.body());
    up.wait_all_closed().await;
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    let raw = String::from_utf8_lossy(&seen[0].raw).into_owned();
    assert!(raw.starts_with("POST /stall HTTP/1.1\r\n"), "{raw}");
    assert!(raw.ends_with("\r\n\r\nab"), "{raw}");
    assert_eq!(r.errors().await, 0);

    // Slow but steady: 12 pieces 300 ms apart, 3.3 s in all.
    let mut s = r.connect().await;
    s.write_all(b"POST /steady HTTP/1.1\r\nhost: x\r\ncontent-length: 12\r\n\r\n")
        .await
        .unwrap();
    for b in b"0123456789ab" {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.write_all(&[*b]).await.unwrap();
    }
    let resp = read_response(&mut s).await;
    assert_eq!(resp.status, 200, "{}", resp.body());
    assert_eq!(resp.body(), "hi");
    assert!(up.all().contains("\r\n\r\n0123456789ab"), "{}", up.all());
    assert_eq!(r.errors().await, 0);
}

/// A mirrored request's body, read whole before it goes on, is held to the same body timeout.
#[tokio::test]
async fn a_mirrored_request_body_that_stalls_is_cut_after_the_body_timeout() {
    let up = Upstream::start(|_| Act::Reply(ok("hi"))).await;
    let config = serde_json::json!({"version": 1,
        "variants": [{"name": "a", "weight": 100, "upstream": up.addr.to_string()}],
        "mirror": {"variant": "a", "percent": 100}});
    let r = Router::start(config, BODY_TIMEOUT).await;
    let resp = stall_body(&r, "/").await;
    assert_eq!(resp.status, 408, "{}", resp.body());
    // Nothing went upstream: the body was never whole.
    assert_eq!(up.all(), "");
    assert_eq!(r.errors().await, 0);
}

// ---------------------------------------------------------------------------------------------
// Findings 5 and 6, and what already held: broken upstream responses.

/// Responses framed two ways, with a coding other than chunked, with an oversized head, with
/// obs-fold or a bad status line get a 502; each counts as the variant's error.
#[tokio::test]
async fn ambiguous_or_broken_responses_are_502() {
    let mut big = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 70 * 1024));
    big.extend_from_slice(b"\r\ncontent-length: 2\r\n\r\nok");
    let cases: Vec<Vec<u8>> = vec![
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".to_vec(),
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n3\r\nabc\r\n0\r\n\r\n".to_vec(),
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nabc".to_vec(),
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc".to_vec(),
        b"HTTP/1.1 200 OK\r\nx-a: 1\r\n folded\r\ncontent-length: 2\r\n\r\nok".to_vec(),
        b"HTTP/1.1 2000 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
        big,
    ];
    let n = cases.len();
    let script = cases.clone();
    let up = Upstream::start(move |i| Act::Close(script[i % script.len()].clone())).await;
    let r = Router::one(&up, &[]).await;
    for (i, case) in cases.iter().enumerate() {
        let resp = r
            .exchange(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await;
        assert_eq!(
            resp.status,
            502,
            "case {i}: {:?}",
            String::from_utf8_lossy(&case[..case.len().min(120)])
        );
    }
    assert_eq!(r.errors().await, n as u64);
}

/// One length sent twice is passed on once; a bad chunk size mid-body cuts the response (the
/// client never sees a last chunk); a close before the response is a 502.
#[tokio::test]
async fn response_bodies_keep_their_framing() {
    let up = Upstream::start(|i| match i {
        0 => Act::Reply(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\nok".to_vec(),
        ),
        1 => Act::Close(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\n".to_vec(),
        ),
        2 => Act::Close(Vec::new()),
        _ => Act::Close(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc".to_vec()),
    })
    .await;
    let r = Router::one(&up, &[]).await;
    let get = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    let resp = r.exchange(get).await;
    assert_eq!((resp.status, resp.body().as_str()), (200, "ok"));
    assert_eq!(resp.count("content-length"), 1, "{}", resp.head);
    // A bad chunk size mid-body.
    cut_short(&r, get, "ok").await;
    let resp = r.exchange(get).await;
    assert_eq!(resp.status, 502);
    // A close mid-body.
    cut_short(&r, get, "abc").await;
}

/// Sends `raw` and asserts that the response breaks off: the client gets no response at all (the
/// body broke before hyper sent the head), or a 200 whose body is `start` and not complete.
async fn cut_short(r: &Router, raw: &[u8], start: &str) {
    let mut s = r.connect().await;
    s.write_all(raw).await.unwrap();
    match tokio::time::timeout(PATIENCE, try_read_response(&mut s))
        .await
        .unwrap()
    {
        Ok(resp) => {
            assert_eq!(resp.status, 200);
            assert!(!resp.complete, "a broken body looks complete");
            assert!(start.starts_with(&resp.body()), "{}", resp.body());
        }
        Err(got) => assert_eq!(got, b""),
    }
}

/// Bytes after a response are not the next response: the router drops that upstream connection,
/// and the client's second request on its connection gets its own answer.
#[tokio::test]
async fn extra_bytes_after_a_response_do_not_desync() {
    let up = Upstream::start(|i| {
        if i == 0 {
            let mut r = ok("first");
            r.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nsmuggled");
            Act::Reply(r)
        } else {
            Act::Reply(ok("second"))
        }
    })
    .await;
    let r = Router::one(&up, &[]).await;
    let mut s = r.connect().await;
    s.write_all(b"GET /1 HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut s).await.body(), "first");
    s.write_all(b"GET /2 HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let resp = read_response(&mut s).await;
    assert_eq!(resp.body(), "second");
    // The second request went on a new connection.
    let seen = up.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        String::from_utf8_lossy(&seen[1].raw),
        "GET /2 HTTP/1.1\r\nhost: x\r\n\r\n"
    );
}
