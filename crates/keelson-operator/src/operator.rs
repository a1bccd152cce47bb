//! `keelson run`: the three controllers in one process, stopped gracefully on SIGTERM or Ctrl-C.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kube::client::ClientBuilder;
use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;

use crate::health::Health;
use crate::metrics::Metrics;
use crate::runtime::controller::Shared;
use crate::runtime::ratelimit::RateLimitLayer;
use crate::runtime::retry::{Retried, RetryLayer};

/// Reconciles at once per kind, unless `--concurrency` says otherwise. A TrainingJob's reconcile is a
/// chain of dependent writes (the Service, the pods in slow-start batches, the status), so few
/// reconciles at once leave the API server idle between them. In bursts of jobs on the local cluster,
/// 32 instead of 8 brought the time to all children from 2.3 times the API server's own limit to 1.1
/// times for 100 jobs, to 1.3–2.2 times for 1,000, and from 3.0 to 1.4 times for 5,000
/// (docs/benchmarks.md). The API server's Priority and Fairness paces what goes beyond its share.
pub const DEFAULT_CONCURRENCY: u16 = 32;

/// Options of `keelson run`.
#[derive(Clone, Debug, clap::Args)]
pub struct RunOptions {
    /// Reconciles running at once, per kind.
    #[arg(long, env = "KEELSON_CONCURRENCY", default_value_t = DEFAULT_CONCURRENCY)]
    pub concurrency: u16,
    /// Address of the /healthz, /readyz and /metrics endpoints (empty: none).
    #[arg(long, env = "KEELSON_HEALTH_ADDR", default_value = "0.0.0.0:8080")]
    pub health_addr: String,
    /// Elect a leader over a Lease, so that only one replica reconciles.
    #[arg(long, env = "KEELSON_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Namespace of the leader Lease (default: the pod's namespace, else `default`).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, env = "KEELSON_LEASE_NAME", default_value = "keelson-leader")]
    pub lease_name: String,
    /// Seconds a leader's Lease lasts without renewal; a standby takes over after it.
    #[arg(long, env = "KEELSON_LEASE_SECONDS", default_value_t = 10)]
    pub lease_seconds: u64,
    /// Client-side limit of API requests per second (default 0: none; the API server's Priority and
    /// Fairness paces the operator, and a 429 is retried after its Retry-After).
    #[arg(long, env = "KEELSON_QPS", default_value_t = 0.0)]
    pub qps: f64,
    /// Seconds that in-flight reconciles get to finish after SIGTERM before the process stops anyway.
    #[arg(long, env = "KEELSON_SHUTDOWN_GRACE_SECONDS", default_value_t = 15)]
    pub shutdown_grace_seconds: u64,
    /// Requests allowed at once above the `--qps` rate (default: twice `--qps`).
    #[arg(long, env = "KEELSON_BURST")]
    pub burst: Option<u32>,
    /// Seconds between two reads of `/api/status` of a notebook with `spec.idle`.
    #[arg(long, env = "KEELSON_NOTEBOOK_IDLE_POLL_SECONDS", default_value_t = 60)]
    pub notebook_idle_poll_seconds: u64,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            concurrency: DEFAULT_CONCURRENCY,
            health_addr: String::new(),
            leader_elect: false,
            lease_namespace: "default".into(),
            lease_name: "keelson-leader".into(),
            lease_seconds: 10,
            qps: 0.0,
            burst: None,
            shutdown_grace_seconds: 15,
            notebook_idle_poll_seconds: 60,
        }
    }
}

/// A shutdown signal that can be awaited by many tasks.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Resolves once shutdown has been asked for.
    pub async fn wait(mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

/// Returns a trigger and the signal it drives.
pub fn shutdown_channel() -> (watch::Sender<bool>, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (tx, Shutdown(rx))
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs every controller against `client` until `shutdown` fires; in-flight reconciles finish first.
pub async fn run_controllers(client: Client, opts: &RunOptions, shutdown: Shutdown) -> Arc<Shared> {
    let shared = Arc::new(Shared::new(client));
    run_with(shared.clone(), opts, shutdown).await;
    shared
}

/// Runs every controller with the given shared state until `shutdown` fires.
pub async fn run_with(shared: Arc<Shared>, opts: &RunOptions, shutdown: Shutdown) {
    shared.expect_controllers(3);
    tokio::join!(
        crate::notebook::reconcile::run(
            shared.clone(),
            opts.concurrency,
            crate::notebook::reconcile::Options {
                idle_poll: std::time::Duration::from_secs(opts.notebook_idle_poll_seconds.max(1)),
                ..Default::default()
            },
            shutdown.clone().wait()
        ),
        crate::trainingjob::reconcile::run(
            shared.clone(),
            opts.concurrency,
            shutdown.clone().wait()
        ),
        crate::modeldeployment::reconcile::run(
            shared.clone(),
            opts.concurrency,
            shutdown.clone().wait()
        ),
    );
}

/// A client from the kubeconfig or the in-cluster service account that retries what the API server
/// turns away (counted in `retried`), and, with `qps` above 0, is limited to `qps` requests per second
/// with bursts of `burst` (default twice `qps`).
pub async fn client(qps: f64, burst: Option<u32>, retried: Retried) -> Result<Client, String> {
    let config = kube::Config::infer().await.map_err(|e| e.to_string())?;
    client_from(config, qps, burst, retried)
}

/// [`client`] from a given config.
pub fn client_from(
    mut config: kube::Config,
    qps: f64,
    burst: Option<u32>,
    retried: Retried,
) -> Result<Client, String> {
    // kube's own retry would take the 429s first: ours replaces it.
    config.default_retry = false;
    let burst = burst.unwrap_or_else(|| (qps * 2.0).ceil().clamp(1.0, f64::from(u32::MAX)) as u32);
    let builder = ClientBuilder::try_from(config).map_err(|e| e.to_string())?;
    Ok(builder
        .with_layer(&RateLimitLayer::new(qps, burst))
        // The retry layer sends a request again through a clone of the service under it.
        .with_layer(&tower::buffer::BufferLayer::new(1024))
        .with_layer(&RetryLayer::new(retried))
        .build())
}

/// This replica's identity in the Lease: the pod name, else host name and pid.
fn identity() -> String {
    std::env::var("POD_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "keelson".into());
            format!("{host}-{}", std::process::id())
        })
}

/// The controllers until `shutdown`, then at most `--shutdown-grace-seconds` for the reconciles in
/// flight (as controller-runtime's graceful shutdown timeout): a reconcile stuck on a slow API
/// server must not keep a replica from stopping and releasing its Lease.
async fn run_bounded(shared: Arc<Shared>, opts: &RunOptions, shutdown: Shutdown) {
    let grace = Duration::from_secs(opts.shutdown_grace_seconds);
    let deadline = {
        let s = shutdown.clone();
        async move {
            s.wait().await;
            tokio::time::sleep(grace).await;
        }
    };
    tokio::select! {
        _ = run_with(shared, opts, shutdown) => {}
        _ = deadline => {
            tracing::warn!(grace = ?grace, "reconciles still running after the shutdown grace period: stopping without them");
        }
    }
}

/// How `keelson run` ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// SIGTERM or Ctrl-C: in-flight reconciles finished and the Lease was released.
    Stopped,
    /// The Lease was lost to another replica: the process exits so that it restarts as a standby.
    LostLease,
}

/// `keelson run`: probes and metrics, leader election, then the controllers until SIGTERM (or
/// until the Lease is lost).
pub async fn serve(opts: RunOptions) -> Result<Exit, String> {
    let metrics = Arc::new(Metrics::default());
    let client = client(opts.qps, opts.burst, metrics.retried())
        .await
        .map_err(|e| format!("cannot reach the Kubernetes API (check KUBECONFIG or the in-cluster service account): {e}"))?;
    let shared = Arc::new(Shared::with_metrics(client.clone(), metrics));
    let (stop, shutdown) = shutdown_channel();
    let term = Arc::new(AtomicBool::new(false));
    {
        let (stop, term) = (stop.clone(), term.clone());
        tokio::spawn(async move {
            termination().await;
            tracing::info!("shutting down: finishing in-flight reconciles");
            term.store(true, Ordering::Relaxed);
            let _ = stop.send(true);
        });
    }
    // Ready once the API answers; then a leader is ready once its caches are listed, and a
    // standby stays ready (it is healthy, waiting for the Lease).
    let api_ok = Arc::new(AtomicBool::new(false));
    if !opts.health_addr.is_empty() {
        let listener = tokio::net::TcpListener::bind(&opts.health_addr)
            .await
            .map_err(|e| format!("cannot listen on {} for probes: {e}", opts.health_addr))?;
        let (s, ok) = (shared.clone(), api_ok.clone());
        let health = Health {
            ready: Box::new(move || {
                ok.load(Ordering::Relaxed) && (s.metrics.leader.get() == 0 || s.caches_synced())
            }),
            metrics: shared.metrics.clone(),
        };
        tokio::spawn(crate::health::serve(listener, Arc::new(health)));
    }
    let version = client
        .apiserver_version()
        .await
        .map_err(|e| format!("the Kubernetes API does not answer: {e}"))?;
    tracing::info!(server = %version.git_version, "keelson operator starting");
    api_ok.store(true, Ordering::Relaxed);

    if !opts.leader_elect {
        shared.metrics.leader.set(1);
        run_bounded(shared.clone(), &opts, shutdown).await;
        shared.metrics.leader.set(0);
        return Ok(Exit::Stopped);
    }

    let id = identity();
    let manager = LeaseManagerBuilder::new(client, &opts.lease_name)
        .with_namespace(&opts.lease_namespace)
        .with_identity(&id)
        .with_duration(opts.lease_seconds.max(2))
        .with_grace((opts.lease_seconds / 5).max(1))
        .with_field_manager(keelson_api::meta::FIELD_MANAGER)
        .build()
        .await
        .map_err(|e| format!("leader election: {e}"))?;
    let (mut leader, task) = manager.watch().await;
    tracing::info!(identity = %id, lease = %format!("{}/{}", opts.lease_namespace, opts.lease_name), "waiting for the leader lease");
    let mut stopping = shutdown.clone();
    let got = tokio::select! {
        r = leader.wait_for(|l| *l) => r.is_ok(),
        _ = stopping.0.wait_for(|s| *s) => false,
    };
    if !got {
        drop(leader);
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        return Ok(Exit::Stopped);
    }
    tracing::info!(identity = %id, "acquired the leader lease: reconciling");
    shared.metrics.leader.set(1);

    // Losing the Lease stops the controllers as SIGTERM does.
    let lost = Arc::new(AtomicBool::new(false));
    let watch_lease = {
        let (mut leader, stop, lost) = (leader.clone(), stop.clone(), lost.clone());
        tokio::spawn(async move {
            if leader.wait_for(|l| !*l).await.is_ok() || leader.has_changed().is_err() {
                lost.store(true, Ordering::Relaxed);
                let _ = stop.send(true);
            }
        })
    };
    run_bounded(shared.clone(), &opts, shutdown).await;
    watch_lease.abort();
    shared.metrics.leader.set(0);
    // Closing the channel makes the manager release the Lease.
    drop(leader);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    if lost.load(Ordering::Relaxed) && !term.load(Ordering::Relaxed) {
        tracing::error!(identity = %id, "lost the leader lease: exiting");
        return Ok(Exit::LostLease);
    }
    tracing::info!(identity = %id, "released the leader lease");
    Ok(Exit::Stopped)
}
