//! `keelson router`: the A/B router of a ModelDeployment with `traffic.router: Builtin`.
//!
//! It reads the [`RouterConfig`](keelson_api::router_config::RouterConfig) that the operator
//! writes into the ConfigMap `<name>-router` (mounted at `/etc/keelson-router`), splits requests
//! over the variants by weight or by a sticky header, copies a share to a mirror variant, and
//! re-reads the file every second without dropping a connection. No Kubernetes client on this path.
//!
//! - [`config`]: the file format, checked and compiled into a [`config::Route`];
//! - [`split`]: the weighted random split and the sticky (rendezvous-hash) choice;
//! - [`proxy`]: forwarding one request and mirroring; [`rewrite`]: the request head checks and
//!   rewrites; [`reply`]: the router's own responses;
//! - [`pool`]: the HTTP/1.1 upstream pools, [`conn`]: one connection of theirs, and [`h1`]: the
//!   HTTP/1.1 messages on it; [`h2c`]: HTTP/2 upstreams (gRPC); [`upstream`]: what both share;
//! - [`server`]: the data and admin listeners; [`reload`]: the config file watch;
//! - [`metrics`]: per-variant counters and latency histograms.

pub mod config;
pub mod conn;
pub mod h1;
pub mod h2c;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod reload;
pub mod reply;
pub mod rewrite;
pub mod server;
pub mod split;
pub mod upstream;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use keelson_api::router_config::{
    ROUTER_ADMIN_PORT, ROUTER_CONFIG_DIR, ROUTER_CONFIG_KEY, ROUTER_PORT, ROUTER_STICKY_KEY_ENV,
};
use metrics::Metrics;
use proxy::{Limits, Proxy};
use reload::Reloader;

/// Flags of `keelson router`.
#[derive(clap::Args, Debug, Clone)]
pub struct RouterOptions {
    /// Address of the data port (HTTP/1.1 and h2c).
    #[arg(long, default_value_t = format!("0.0.0.0:{ROUTER_PORT}"))]
    pub listen: String,
    /// Address of the admin port: /healthz, /readyz, /metrics. Empty to disable.
    #[arg(long, default_value_t = format!("0.0.0.0:{ROUTER_ADMIN_PORT}"))]
    pub admin_listen: String,
    /// The router config file (JSON, format version 1), re-read every --reload-interval.
    #[arg(long, default_value_t = format!("{ROUTER_CONFIG_DIR}/{ROUTER_CONFIG_KEY}"))]
    pub config: String,
    /// Worker threads serving requests (default: one per CPU). With 1, everything runs on one thread.
    #[arg(long, env = "KEELSON_ROUTER_WORKERS")]
    pub workers: Option<usize>,
    /// How often the config file is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub reload_interval_ms: u64,
    /// Time to connect to a variant, in milliseconds; past it the request gets a 502.
    #[arg(long, default_value_t = 2000)]
    pub connect_timeout_ms: u64,
    /// Time for a variant to send its response headers, in milliseconds; past it the request gets a 504.
    #[arg(long, default_value_t = 30_000)]
    pub request_timeout_ms: u64,
    /// Time a client connection may go without a request in progress, in milliseconds: an idle
    /// keep-alive connection, or one sending its request headers too slowly, is then closed.
    #[arg(long, default_value_t = 30_000)]
    pub idle_timeout_ms: u64,
    /// Time a started response may go without moving towards the client, in milliseconds: a client
    /// that stops reading (or an HTTP/2 client that grants no window) has its connection closed.
    #[arg(long, default_value_t = 60_000)]
    pub send_timeout_ms: u64,
    /// Time a response body may go without a byte from the variant, in milliseconds; past it the
    /// response is cut and the upstream connection closed.
    #[arg(long, default_value_t = 60_000)]
    pub upstream_read_timeout_ms: u64,
    /// Time the client's request body may go without a byte while the router waits for it, in
    /// milliseconds (between two reads, as nginx's `client_body_timeout`); past it the request gets
    /// a 408 and the upstream connection is closed. Requests to `h2c` variants stream their body
    /// over HTTP/2 and are not bounded by it.
    #[arg(long, default_value_t = 60_000)]
    pub client_body_timeout_ms: u64,
    /// Connections open to one variant address at most, idle ones included; past it a request
    /// waits up to --connect-timeout-ms for one, then gets a 503.
    #[arg(long, default_value_t = 1024)]
    pub max_upstream_conns: usize,
    /// HTTP/2 connections kept open to one `h2c` (gRPC) variant address; requests take them in
    /// turn, so behind a Service they spread over several pods.
    #[arg(long, default_value_t = 4)]
    pub h2_upstream_conns: usize,
    /// Client connections served at once; further ones wait in the listen backlog.
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
    /// Bytes of a request head (HTTP/1.1, at least 8192; a larger head gets a 431) and of an
    /// HTTP/2 header list (nginx reads heads up to 4 buffers of 8 KiB).
    #[arg(long, default_value_t = 32 * 1024)]
    pub max_header_bytes: usize,
    /// Requests at once on one HTTP/2 connection.
    #[arg(long, default_value_t = 128)]
    pub max_concurrent_streams: u32,
    /// Secret key of the sticky hash (any string). Without it the key derives from the config's
    /// variant names and upstreams: the same on every replica, but not secret from whoever can
    /// read the config.
    #[arg(long, env = ROUTER_STICKY_KEY_ENV, hide_env_values = true)]
    pub sticky_key: Option<String>,
    /// Mirror copies in flight at most; further copies are dropped and counted.
    #[arg(long, default_value_t = 256)]
    pub mirror_max_in_flight: usize,
    /// Largest request body copied to the mirror, in bytes; larger or chunked bodies are not copied.
    #[arg(long, default_value_t = 64 * 1024)]
    pub mirror_max_body: u64,
    /// On SIGTERM, time given to open connections to finish, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,
}

impl RouterOptions {
    fn limits(&self) -> Limits {
        Limits {
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            mirror_body_limit: self.mirror_max_body,
            mirror_slots: self.mirror_max_in_flight,
            max_conns_per_host: self.max_upstream_conns,
            upstream_read_timeout: Duration::from_millis(self.upstream_read_timeout_ms.max(1)),
            client_body_timeout: Duration::from_millis(self.client_body_timeout_ms.max(1)),
            h2_conns_per_host: self.h2_upstream_conns.max(1),
            sticky_key: self.sticky_key.as_deref().map(|k| {
                (
                    split::sticky_hash((1, 0), k.as_bytes()),
                    split::sticky_hash((2, 0), k.as_bytes()),
                )
            }),
            ..Limits::default()
        }
    }

    fn client_limits(&self) -> server::ClientLimits {
        server::ClientLimits {
            idle_timeout: Duration::from_millis(self.idle_timeout_ms.max(1)),
            send_timeout: Duration::from_millis(self.send_timeout_ms.max(1)),
            max_connections: self.max_connections,
            max_header_bytes: self.max_header_bytes,
            max_concurrent_streams: self.max_concurrent_streams,
        }
    }
}

/// Runs the router until SIGTERM or Ctrl-C.
pub fn run(opts: RouterOptions) -> ExitCode {
    let workers = opts.workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let rt = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    };
    match rt {
        Ok(rt) => rt.block_on(run_async(opts)),
        Err(e) => {
            eprintln!("keelson router: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_async(opts: RouterOptions) -> ExitCode {
    let metrics = Arc::new(Metrics::default());
    let proxy = Arc::new(Proxy::new(opts.limits()));
    let mut reloader = Reloader::new(PathBuf::from(&opts.config), proxy.clone(), metrics.clone());
    // The first load before listening: a valid file serves from the first request.
    reloader.check().await;

    let listener = match TcpListener::bind(&opts.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(addr = %opts.listen, error = %e, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    let (stop, stopped) = watch::channel(false);
    let wait = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    if !opts.admin_listen.is_empty() {
        match TcpListener::bind(&opts.admin_listen).await {
            Ok(l) => {
                tokio::spawn(server::serve_admin(
                    l,
                    proxy.clone(),
                    metrics.clone(),
                    wait(stopped.clone()),
                ));
            }
            Err(e) => {
                tracing::error!(addr = %opts.admin_listen, error = %e, "cannot listen on the admin port");
                return ExitCode::FAILURE;
            }
        }
    }
    let reload = tokio::spawn(reloader.run(Duration::from_millis(opts.reload_interval_ms.max(10))));
    tracing::info!(listen = %opts.listen, admin = %opts.admin_listen, config = %opts.config, "keelson router listening");
    tokio::spawn(async move {
        termination().await;
        tracing::info!("shutting down: finishing open requests");
        let _ = stop.send(true);
    });
    server::serve(
        listener,
        proxy,
        wait(stopped),
        Duration::from_millis(opts.shutdown_grace_ms),
        opts.client_limits(),
    )
    .await;
    reload.abort();
    tracing::info!("keelson router stopped");
    ExitCode::SUCCESS
}

/// Resolves on SIGTERM (what the kubelet sends) or Ctrl-C.
async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
