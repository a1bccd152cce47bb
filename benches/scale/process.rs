//! The operator under test as a process: Keelson started from the debug binary, or the anchor
//! through `hack/bench/anchor.sh`; its /metrics, peak RSS and CPU time.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;
use crate::Target;

/// A running operator process.
pub struct Proc {
    child: Option<Child>,
    pid: u32,
    metrics: String,
    target: Target,
}

impl Proc {
    pub fn start(target: Target, tag: &str) -> Proc {
        let dir = root().join("target/bench");
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join(format!("{}-{tag}.log", target.name()));
        match target {
            Target::Keelson => {
                let addr = format!("127.0.0.1:{}", free_port());
                let child = spawn_operator(
                    &kubeconfig(),
                    &log,
                    &["--health-addr", &addr, "--leader-elect", "false"],
                    &[],
                );
                let pid = child.id();
                let p = Proc {
                    child: Some(child),
                    pid,
                    metrics: format!("http://{addr}/metrics"),
                    target,
                };
                wait_sync(Duration::from_secs(60), || {
                    http_get(&addr, "/readyz").is_some_and(|(c, _)| c == 200)
                });
                p
            }
            Target::Anchor => {
                let out = Command::new(root().join("hack/bench/anchor.sh"))
                    .arg("start")
                    .arg(&log)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .output()
                    .unwrap();
                assert!(out.status.success(), "hack/bench/anchor.sh start failed");
                let pid: u32 = std::fs::read_to_string(dir.join("anchor.pid"))
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap();
                let metrics = std::fs::read_to_string(dir.join("anchor.env"))
                    .unwrap()
                    .lines()
                    .find_map(|l| l.strip_prefix("ANCHOR_METRICS_URL=").map(str::to_string))
                    .expect("ANCHOR_METRICS_URL in target/bench/anchor.env");
                Proc {
                    child: None,
                    pid,
                    metrics,
                    target,
                }
            }
        }
    }

    /// Peak resident set (MiB) and CPU seconds, from /proc.
    pub fn usage(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap();
        let hwm_kb: f64 = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap();
        // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<f64> = rest
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0.0))
            .collect();
        let ticks = f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0);
        (hwm_kb / 1024.0, ticks / clock_ticks())
    }

    pub fn reconciles(&self) -> f64 {
        let (name, label) = self.target.reconciles_metric();
        get_url(&self.metrics)
            .map(|(_, body)| {
                body.lines()
                    .filter(|l| l.starts_with(name) && l.contains(label))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum()
            })
            .unwrap_or(0.0)
    }

    pub fn stop(mut self) {
        match self.child.take() {
            Some(mut c) => {
                let _ = Command::new("kill")
                    .args(["-TERM", &c.id().to_string()])
                    .status();
                let t = Instant::now();
                while t.elapsed() < Duration::from_secs(30) {
                    if c.try_wait().ok().flatten().is_some() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
            None => {
                let _ = Command::new(root().join("hack/bench/anchor.sh"))
                    .arg("stop")
                    .status();
            }
        }
    }
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// A plain HTTP GET of `http://addr/path` on loopback: status and body.
fn get_url(url: &str) -> Option<(u16, String)> {
    let rest = url.strip_prefix("http://")?;
    let (addr, path) = rest.split_once('/').unwrap_or((rest, ""));
    http_get(addr, &format!("/{path}"))
}
