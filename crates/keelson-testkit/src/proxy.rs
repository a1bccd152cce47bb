//! A small HTTP proxy between the operator and the API server, for crash tests.
//!
//! The operator process is given a kubeconfig whose server is `http://127.0.0.1:<port>` with no
//! credentials ([`Proxy::write_kubeconfig`]). Every request is forwarded with a [`kube::Client`] built
//! from the admin kubeconfig, which adds TLS and the admin's client certificate; the request's own
//! headers are kept, so the operator's `Impersonate-User`/`Impersonate-Group` still make the API
//! server authorize each call as the operator's ServiceAccount. Responses stream back (watches).
//!
//! Two things are particular to a test on a shared cluster:
//!
//! - **Scope.** A list or watch across all namespaces of a namespaced resource is rewritten to the
//!   namespace under test, so the operator behind the proxy sees (and writes) only that namespace:
//!   neither other tests' objects nor another proxied operator's. Every impersonated request also
//!   carries the extra [`MARK`] (`Impersonate-Extra-keelson-crash-proxy: <namespace>`), by which an
//!   admission policy can tell this operator from any other one that watches the whole cluster.
//! - **Counting.** Mutating requests (POST, PUT, PATCH, DELETE) in the namespace under test are
//!   counted when the API server's response comes back, i.e. once it has applied them. Armed with
//!   `k`, the proxy SIGKILLs the operator process as soon as the response of the k-th counted write
//!   has come back from the API server, *before* relaying it: the write is applied, the operator
//!   never learns it. Requests still arriving on the dead process's connections are refused
//!   (`503`) rather than forwarded, so nothing the killed process had not already sent reaches the
//!   API server after the kill. A request the proxy has received is forwarded in full even if its
//!   sender dies meanwhile (it was on the wire); those are reported as in flight at the kill.
//!
//! `KEELSON_PROXY_TRACE=1` prints every request with the API server's answer.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// The user extra that marks the requests of the operator behind a proxy, valued with the namespace
/// under test (set by impersonation, so the API server vouches for it).
pub const MARK: &str = "keelson-crash-proxy";

/// A write the proxy saw in the namespace under test.
#[derive(Clone, Debug)]
pub struct Write {
    /// 1-based position among the counted writes of this proxy's current run.
    pub n: usize,
    pub method: String,
    /// Path and query as the operator sent them.
    pub path: String,
    /// The API server's answer.
    pub status: u16,
    /// The process generation that sent it ([`Proxy::epoch`] at the time its connection opened).
    pub epoch: u64,
    pub at: Instant,
}

impl Write {
    /// `POST pods`, `PATCH services/x/status`: the method and the path after the namespace.
    pub fn short(&self) -> String {
        let path = self.path.split('?').next().unwrap_or_default();
        let tail = path
            .split_once("/namespaces/")
            .and_then(|(_, rest)| rest.split_once('/'))
            .map_or(path, |(_, tail)| tail);
        let ssa = self.path.contains("fieldManager") && self.method == "PATCH";
        format!(
            "{} {tail}{}",
            self.method,
            if ssa && !tail.ends_with("/status") {
                " (apply)"
            } else {
                ""
            }
        )
    }
}

/// What the proxy did with the armed kill.
#[derive(Clone, Debug)]
pub struct Kill {
    /// The write after whose response the process was killed.
    pub write: Write,
    pub at: Instant,
}

#[derive(Default)]
struct State {
    /// Namespace under test: scope of lists and watches, and of counting.
    namespace: String,
    /// Kill the victim after this many counted writes (None: never).
    armed: Option<usize>,
    victim: Option<Arc<Mutex<Child>>>,
    /// Bumped at every kill; a connection opened under an older epoch is dead.
    epoch: u64,
    writes: Vec<Write>,
    /// Writes answered after the kill that the dead process had already sent.
    in_flight_at_kill: Vec<Write>,
}

struct Shared {
    upstream: kube::Client,
    state: Mutex<State>,
    killed: watch::Sender<Option<Kill>>,
}

/// The proxy; it serves until dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Resources the operator lists or watches across namespaces, all namespaced.
const NAMESPACED: &[&str] = &[
    "pods",
    "services",
    "secrets",
    "configmaps",
    "persistentvolumeclaims",
    "deployments",
    "replicasets",
    "events",
    "notebooks",
    "trainingjobs",
    "modeldeployments",
    "httproutes",
];

/// `/api/v1/pods` -> `/api/v1/namespaces/<ns>/pods` (also `/apis/<group>/<version>/<resource>`);
/// anything else unchanged.
pub fn scope(path_and_query: &str, ns: &str) -> String {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let prefix_len = match segs.first() {
        Some(&"api") => 2,
        Some(&"apis") => 3,
        _ => return path_and_query.to_string(),
    };
    if ns.is_empty() || segs.len() != prefix_len + 1 || !NAMESPACED.contains(&segs[prefix_len]) {
        return path_and_query.to_string();
    }
    let scoped = format!(
        "/{}/namespaces/{ns}/{}",
        segs[..prefix_len].join("/"),
        segs[prefix_len]
    );
    match query {
        Some(q) => format!("{scoped}?{q}"),
        None => scoped,
    }
}

fn is_write(m: &Method) -> bool {
    matches!(
        *m,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    )
}

/// Headers that belong to one hop, not to the request.
const HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "host",
    "content-length",
];

fn text(code: StatusCode, msg: &str) -> Response<ProxyBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(msg.to_string()))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = code;
    r
}

impl Proxy {
    /// Starts a proxy to the API server that `upstream` talks to (an admin client).
    pub async fn start(upstream: kube::Client) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (killed, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            upstream,
            state: Mutex::new(State::default()),
            killed,
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let epoch = s.state.lock().expect("proxy state").epoch;
                let s = s.clone();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req| {
                            let s = s.clone();
                            // Its own task: a request the proxy has received goes on to the API
                            // server (and into the log) even when the process that sent it dies.
                            let task = tokio::spawn(async move { forward(&s, epoch, req).await });
                            async move {
                                Ok::<_, std::convert::Infallible>(task.await.unwrap_or_else(|e| {
                                    text(StatusCode::BAD_GATEWAY, &e.to_string())
                                }))
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Proxy { addr, shared, task }
    }

    fn state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.shared.state.lock().expect("proxy state"))
    }

    /// Starts a new run: `namespace` under test, counting from zero, armed to kill `victim`
    /// after the `kill_after`-th write (None: never kill).
    pub fn reset(&self, namespace: &str, kill_after: Option<usize>) {
        self.state(|s| {
            s.namespace = namespace.to_string();
            s.armed = kill_after;
            s.victim = None;
            s.writes.clear();
            s.in_flight_at_kill.clear();
        });
        self.shared.killed.send_replace(None);
    }

    /// The process to kill when the armed write comes back.
    pub fn set_victim(&self, victim: Arc<Mutex<Child>>) {
        self.state(|s| s.victim = Some(victim));
    }

    /// Stops counting towards a kill (the writes are still logged).
    pub fn disarm(&self) {
        self.state(|s| s.armed = None);
    }

    /// Counted writes of the current run.
    pub fn writes(&self) -> Vec<Write> {
        self.state(|s| s.writes.clone())
    }

    /// Writes the killed process had sent that the API server answered after the kill.
    pub fn in_flight_at_kill(&self) -> Vec<Write> {
        self.state(|s| s.in_flight_at_kill.clone())
    }

    /// Waits for the armed kill.
    pub fn killed(&self) -> watch::Receiver<Option<Kill>> {
        self.shared.killed.subscribe()
    }

    /// A kubeconfig that points at this proxy, with no credentials.
    pub fn write_kubeconfig(&self, path: &Path) {
        let yaml = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: proxy
  cluster: {{server: \"http://{}\"}}
users:
- name: operator
  user: {{}}
contexts:
- name: proxy
  context: {{cluster: proxy, user: operator}}
current-context: proxy
",
            self.addr
        );
        std::fs::write(path, yaml).expect("write the proxy kubeconfig");
    }
}

async fn forward(s: &Shared, epoch: u64, req: Request<Incoming>) -> Response<ProxyBody> {
    let (ns, current) = {
        let st = s.state.lock().expect("proxy state");
        (st.namespace.clone(), st.epoch)
    };
    if epoch != current {
        // The process that opened this connection has been killed.
        return text(StatusCode::SERVICE_UNAVAILABLE, "killed");
    }
    let (parts, body) = req.into_parts();
    let original = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let method = parts.method.clone();
    let path = if method == Method::GET {
        scope(&original, &ns)
    } else {
        original.clone()
    };
    let counted =
        is_write(&method) && !ns.is_empty() && original.contains(&format!("/namespaces/{ns}/"));
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return text(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let mut builder = Request::builder().method(method.clone()).uri(path.as_str());
    for (k, v) in &parts.headers {
        if !HOP.contains(&k.as_str()) {
            builder = builder.header(k, v);
        }
    }
    if parts.headers.contains_key("impersonate-user") && !ns.is_empty() {
        builder = builder.header(format!("impersonate-extra-{MARK}"), ns.as_str());
    }
    let up = match builder.body(kube::client::Body::from(body.to_vec())) {
        Ok(r) => r,
        Err(e) => return text(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let resp = match s.upstream.send(up).await {
        Ok(r) => r,
        Err(e) => return text(StatusCode::BAD_GATEWAY, &e.to_string()),
    };
    if std::env::var("KEELSON_PROXY_TRACE").is_ok() {
        eprintln!(
            "proxy: {method} {path} -> {} counted={counted}",
            resp.status()
        );
    }
    if counted {
        let mut st = s.state.lock().expect("proxy state");
        let mut w = Write {
            n: 0,
            method: method.to_string(),
            path: original,
            status: resp.status().as_u16(),
            epoch,
            at: Instant::now(),
        };
        if epoch != st.epoch {
            // Sent by the killed process before it died; applied all the same.
            st.in_flight_at_kill.push(w);
        } else {
            w.n = st.writes.len() + 1;
            st.writes.push(w.clone());
            if st.armed == Some(w.n) {
                if let Some(v) = st.victim.take() {
                    let _ = v.lock().expect("operator process").kill();
                }
                st.armed = None;
                st.epoch += 1;
                let at = Instant::now();
                s.killed.send_replace(Some(Kill { write: w, at }));
                // Never relayed: the process is gone.
                return text(StatusCode::SERVICE_UNAVAILABLE, "killed");
            }
        }
    }
    let (mut parts, body) = resp.into_parts();
    for h in ["connection", "keep-alive", "transfer-encoding", "upgrade"] {
        parts.headers.remove(h);
    }
    Response::from_parts(parts, body.map_err(BoxError::from).boxed_unsync())
}
