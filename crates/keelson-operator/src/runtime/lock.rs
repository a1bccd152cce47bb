//! One poison-tolerant lock helper for the plumbing's small in-memory maps.

use std::sync::Mutex;

/// Locks `m`. A poisoned lock only means that another task panicked while holding it; the data of
/// every lock here stays consistent between statements, so it is used as it is.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}
