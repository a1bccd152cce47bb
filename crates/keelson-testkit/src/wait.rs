//! Bounded polling: every wait of a test ends, with a panic that names what it waited for. No
//! cluster knowledge here.

use std::time::{Duration, Instant};

pub const POLL: Duration = Duration::from_millis(250);
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Polls `f` every [`POLL`] until it returns `Some`, or panics with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    wait_explained(what, timeout, POLL, String::new, f).await
}

/// Polls `f` every `poll` until it returns `Some`; after `timeout`, panics with `what` and what
/// `explain` says (for example the state of the objects the test waited on).
pub async fn wait_explained<T, F, Fut>(
    what: &str,
    timeout: Duration,
    poll: Duration,
    explain: impl FnOnce() -> String,
    mut f: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() >= timeout {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                explain()
            );
        }
        tokio::time::sleep(poll).await;
    }
}

/// Blocking poll for setup code.
pub fn wait_sync(timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?}");
        std::thread::sleep(POLL);
    }
}
