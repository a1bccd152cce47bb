//! Idle culling: read the notebook server's `/api/status` and decide whether the notebook has been
//! idle past its `spec.idle.timeout`.
//!
//! The decision ([`decide`]) is pure and takes the time. The read ([`read_status`]) is one GET of
//! `http://<service cluster IP>:<port>/api/status` with `Authorization: token <t>`; the token is
//! never logged and never in a status (errors carry no header).
//!
//! Only `last_activity` decides, as in Kubeflow's culler and Jupyter Server's own: Jupyter moves it
//! on every API request (but not on `GET /api/status`) and on kernel activity. The kernel and
//! connection counts are reported in the Event.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use serde::Deserialize;

use crate::httpget::{get, url};

/// How often an idle-culled notebook's activity is read, unless the operator is told otherwise.
pub const DEFAULT_POLL: Duration = Duration::from_secs(60);
/// How long one read of `/api/status` may take.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What `/api/status` answers (Jupyter Server's `APIStatusHandler`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ApiStatus {
    pub last_activity: String,
    #[serde(default)]
    pub kernels: i64,
    #[serde(default)]
    pub connections: i64,
}

/// The result of one read: the status, or why it could not be read (no secret in it).
pub type Reading = Result<ApiStatus, String>;

/// What the culler concludes.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Active: look again after `recheck` (the earlier of the poll period and the moment it would
    /// become idle).
    Active { last: Timestamp, recheck: Duration },
    /// Idle for at least the timeout: suspend it.
    Idle { last: Timestamp, idle_for: Duration },
    /// The activity cannot be known: never culled. The reason says why.
    Unknown(String),
}

/// Parses a duration as Go and Kubernetes CEL write it: `2h`, `90m`, `1h30m`, `1.5h`, `300s`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += n * secs;
    }
    Duration::try_from_secs_f64(total).ok()
}

/// Parses Jupyter's `last_activity` (ISO 8601 in UTC, e.g. `2024-05-01T10:00:00.123456Z`, or with
/// an offset such as `+00:00`).
pub fn parse_time(s: &str) -> Option<Timestamp> {
    s.parse::<Timestamp>().ok()
}

/// The verdict for a notebook with `timeout`, given the `reading` and the time `now`.
pub fn decide(timeout: Duration, poll: Duration, reading: &Reading, now: Timestamp) -> Verdict {
    let st = match reading {
        Ok(st) => st,
        Err(why) => return Verdict::Unknown(why.clone()),
    };
    let Some(last) = parse_time(&st.last_activity) else {
        return Verdict::Unknown(format!(
            "/api/status answered a last_activity that is not a time: {:?}",
            st.last_activity.chars().take(64).collect::<String>()
        ));
    };
    // A last activity in the future (clocks apart) counts as now.
    let idle_for = now
        .duration_since(last)
        .try_into()
        .unwrap_or(Duration::ZERO);
    if idle_for >= timeout {
        Verdict::Idle { last, idle_for }
    } else {
        Verdict::Active {
            last,
            recheck: poll.min(timeout - idle_for).max(Duration::from_secs(1)),
        }
    }
}

/// Reads `/api/status` at `host:port` with the token.
pub async fn read_status(host: &str, port: i32, token: &str) -> Reading {
    let headers = [
        (http::header::AUTHORIZATION, format!("token {token}")),
        (http::header::ACCEPT, "application/json".to_string()),
    ];
    let body = get(host, port, "/api/status", &headers, READ_TIMEOUT).await?;
    serde_json::from_slice::<ApiStatus>(&body).map_err(|e| {
        format!(
            "GET {}: not Jupyter's status JSON: {e}",
            url(host, port, "/api/status")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn status(last: &str) -> Reading {
        Ok(ApiStatus {
            last_activity: last.into(),
            kernels: 1,
            connections: 0,
        })
    }

    #[test]
    fn durations() {
        for (s, secs) in [
            ("2h", 7200.0),
            ("90m", 5400.0),
            ("1h30m", 5400.0),
            ("1.5h", 5400.0),
            ("300s", 300.0),
            ("5m0s", 300.0),
        ] {
            assert_eq!(
                parse_duration(s),
                Some(Duration::from_secs_f64(secs)),
                "{s}"
            );
        }
        for bad in ["", "5", "m", "5d", "1h-5m", "x5m"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn decision_over_a_clock() {
        let timeout = Duration::from_secs(2 * 3600);
        let poll = Duration::from_secs(60);
        let last = "2026-01-01T10:00:00.000000Z";
        // Walk the clock past the timeout: active, active near the end (recheck shrinks), idle.
        let cases = [
            ("2026-01-01T10:00:00Z", Some(60)),
            ("2026-01-01T11:00:00Z", Some(60)),
            ("2026-01-01T11:59:30Z", Some(30)),
            ("2026-01-01T12:00:00Z", None),
            ("2026-01-02T00:00:00Z", None),
            // A last activity ahead of the operator's clock is now.
            ("2026-01-01T09:00:00Z", Some(60)),
        ];
        for (now, recheck) in cases {
            let v = decide(timeout, poll, &status(last), at(now));
            match (recheck, v) {
                (Some(r), Verdict::Active { last: l, recheck }) => {
                    assert_eq!(recheck, Duration::from_secs(r), "{now}");
                    assert_eq!(l, at(last));
                }
                (None, Verdict::Idle { last: l, idle_for }) => {
                    assert_eq!(l, at(last));
                    assert!(idle_for >= timeout, "{now}");
                }
                (want, got) => panic!("{now}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn unreadable_or_garbled_status_is_never_idle() {
        let now = at("2030-01-01T00:00:00Z");
        let t = Duration::from_secs(300);
        let p = Duration::from_secs(60);
        assert_eq!(
            decide(t, p, &Err("GET x: connection refused".into()), now),
            Verdict::Unknown("GET x: connection refused".into())
        );
        assert!(matches!(
            decide(t, p, &status("yesterday"), now),
            Verdict::Unknown(m) if m.contains("not a time")
        ));
        // Jupyter's other spellings of the time parse.
        assert!(matches!(
            decide(t, p, &status("2020-01-01T00:00:00.123456+00:00"), now),
            Verdict::Idle { .. }
        ));
    }

    #[tokio::test]
    async fn reads_a_server_with_the_token_and_reports_refusals_without_it() {
        let port = crate::httpget::test_server(|req| {
            if req.to_lowercase().contains("authorization: token s3cret") {
                let body = r#"{"started":"x","last_activity":"2026-01-01T10:00:00.000000Z","kernels":2,"connections":1}"#;
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n".to_string()
            }
        })
        .await;
        let st = read_status("127.0.0.1", port, "s3cret").await.unwrap();
        assert_eq!((st.kernels, st.connections), (2, 1));
        let err = read_status("127.0.0.1", port, "wrong").await.unwrap_err();
        assert!(err.contains("HTTP 403"), "{err}");
        assert!(!err.contains("wrong"), "{err}");
    }
}
