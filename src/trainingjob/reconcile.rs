//! Placeholder until the reconciler lands.
use std::sync::Arc;

use crate::controller::Shared;

pub async fn run(
    _shared: Arc<Shared>,
    _concurrency: u16,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    shutdown.await;
}
