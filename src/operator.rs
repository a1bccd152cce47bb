//! `keelson run`: the three controllers in one process, stopped gracefully on SIGTERM or Ctrl-C.

use std::sync::Arc;

use kube::Client;
use tokio::sync::watch;

use crate::controller::Shared;

/// Options of `keelson run`.
#[derive(Clone, Debug, clap::Args)]
pub struct RunOptions {
    /// Reconciles running at once, per kind.
    #[arg(long, env = "KEELSON_CONCURRENCY", default_value_t = 8)]
    pub concurrency: u16,
    /// Address of the /healthz and /readyz endpoints (empty: none).
    #[arg(long, env = "KEELSON_HEALTH_ADDR", default_value = "0.0.0.0:8080")]
    pub health_addr: String,
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
    tokio::join!(
        crate::notebook::reconcile::run(shared.clone(), opts.concurrency, shutdown.clone().wait()),
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
