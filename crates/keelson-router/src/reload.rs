//! Config reload: the config file is read every `interval` and, when its content changed, checked
//! and swapped in whole. A Kubernetes ConfigMap volume updates by swapping a `..data` symlink, so
//! the file's content is compared rather than its inode or mtime. Connections are untouched by a
//! reload, and the upstream pools of the addresses still named are kept; requests already routed
//! finish on the route they started with. The same tick sweeps the pools ([`Proxy::sweep`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::config::Route;
use super::metrics::Metrics;
use super::proxy::Proxy;

/// Watches one config file.
pub struct Reloader {
    path: PathBuf,
    proxy: Arc<Proxy>,
    metrics: Arc<Metrics>,
    /// The content last read (good or bad), so that each content is checked and logged once.
    last: Option<Vec<u8>>,
    /// The last read error, logged once until it changes.
    read_error: Option<String>,
}

/// What one check found.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    Unchanged,
    Loaded,
    Refused,
    Unreadable,
}

impl Reloader {
    pub fn new(path: PathBuf, proxy: Arc<Proxy>, metrics: Arc<Metrics>) -> Reloader {
        Reloader {
            path,
            proxy,
            metrics,
            last: None,
            read_error: None,
        }
    }

    /// Reads the file once and loads it when it changed and is valid.
    pub async fn check(&mut self) -> Reload {
        let bytes = match tokio::fs::read(&self.path).await {
            Ok(b) => b,
            Err(e) => {
                let e = e.to_string();
                if self.read_error.as_ref() != Some(&e) {
                    tracing::warn!(path = %self.path.display(), error = %e, loaded = self.proxy.ready(), "cannot read the router config; keeping the config in effect");
                    self.read_error = Some(e);
                }
                return Reload::Unreadable;
            }
        };
        self.read_error = None;
        if self.last.as_ref() == Some(&bytes) {
            return Reload::Unchanged;
        }
        let parsed = std::str::from_utf8(&bytes)
            .map_err(|e| e.to_string())
            .and_then(|s| Route::parse(s, &self.metrics).map_err(|e| e.to_string()));
        self.last = Some(bytes);
        match parsed {
            Ok(route) => {
                tracing::info!(path = %self.path.display(), split = %route.summary(), "router config loaded");
                self.proxy.route.store(Some(Arc::new(route)));
                self.metrics.reloads_ok.inc();
                self.metrics.config_loaded(SystemTime::now());
                Reload::Loaded
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, loaded = self.proxy.ready(), "router config refused; keeping the last good one");
                self.metrics.reloads_failed.inc();
                Reload::Refused
            }
        }
    }

    /// Checks the file and sweeps the upstream pools every `interval`, forever.
    pub async fn run(mut self, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.check().await;
            self.proxy.sweep();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::proxy::Limits;

    fn config(w: u32) -> String {
        serde_json::json!({"version": 1, "variants": [
            {"name": "a", "weight": w, "upstream": "127.0.0.1:1"},
            {"name": "b", "weight": 100 - w, "upstream": "127.0.0.1:2"}
        ]})
        .to_string()
    }

    #[tokio::test]
    async fn a_bad_config_keeps_the_last_good_one() {
        let dir = std::env::temp_dir().join(format!("keelson-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        let _ = std::fs::remove_file(&path);
        let proxy = Arc::new(Proxy::new(Limits::default()));
        let metrics = Arc::new(Metrics::default());
        let mut r = Reloader::new(path.clone(), proxy.clone(), metrics.clone());
        let weight = || proxy.route.load().as_ref().map(|r| r.variants[0].weight);

        assert_eq!(r.check().await, Reload::Unreadable);
        assert!(!proxy.ready());
        std::fs::write(&path, config(90)).unwrap();
        assert_eq!(r.check().await, Reload::Loaded);
        assert_eq!(weight(), Some(90));
        assert_eq!(r.check().await, Reload::Unchanged);
        // Atomic replacement, as a ConfigMap volume (or `mv`) does it.
        std::fs::write(dir.join("next"), config(50)).unwrap();
        std::fs::rename(dir.join("next"), &path).unwrap();
        assert_eq!(r.check().await, Reload::Loaded);
        assert_eq!(weight(), Some(50));
        for bad in [
            "{\"version\": 2, \"variants\": []}".to_string(),
            "garbage".into(),
            config(50).replace("127.0.0.1:2", "nope"),
        ] {
            std::fs::write(&path, bad).unwrap();
            assert_eq!(r.check().await, Reload::Refused);
            assert_eq!(r.check().await, Reload::Unchanged);
            assert_eq!(weight(), Some(50));
        }
        std::fs::remove_file(&path).unwrap();
        assert_eq!(r.check().await, Reload::Unreadable);
        assert_eq!(weight(), Some(50));
        std::fs::write(&path, config(10)).unwrap();
        assert_eq!(r.check().await, Reload::Loaded);
        assert_eq!(weight(), Some(10));
        assert_eq!(metrics.reloads_ok.get(), 3);
        assert_eq!(metrics.reloads_failed.get(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
