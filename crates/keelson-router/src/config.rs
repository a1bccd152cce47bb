//! The router config file (format v1, [`RouterConfig`], written by the operator into the ConfigMap
//! `<name>-router`), checked and compiled into the [`Route`] the request path reads.

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};

use http::uri::Authority;
use http::HeaderName;

use super::h2c::H2Pool;
use super::metrics::{Metrics, VariantMetrics};
use super::pool::HostPool;
use super::split::Split;
pub use keelson_api::router_config::{RouterConfig, RouterProtocol};

/// Why a config was refused (the router then keeps the last good one).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("not a router config: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("no variants")]
    NoVariants,
    #[error("variant name {0:?} appears twice")]
    DuplicateVariant(String),
    #[error("variant {variant:?}: upstream {upstream:?} is not host:port")]
    BadUpstream { variant: String, upstream: String },
    #[error("the weights add up to 0: no variant would get traffic")]
    NoWeight,
    #[error("stickyHeader {0:?} is not an HTTP header name")]
    BadStickyHeader(String),
    #[error("mirror variant {0:?} is not one of the variants")]
    UnknownMirror(String),
    #[error("mirror percent {0} is above 100")]
    MirrorPercent(u32),
}

/// One variant as the request path sees it.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub weight: u32,
    pub authority: Authority,
    /// HTTP/1.1, or HTTP/2 cleartext (gRPC).
    pub protocol: RouterProtocol,
    pub metrics: Arc<VariantMetrics>,
    /// The HTTP/1.1 connection pool of `authority`, looked up on first use.
    pub pool: OnceLock<Arc<HostPool>>,
    /// The HTTP/2 connection pool of `authority` (`protocol: h2c`), looked up on first use.
    pub h2: OnceLock<Arc<H2Pool>>,
}

/// Shadow traffic: a copy of `percent` percent of the requests goes to `variants[index]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MirrorTarget {
    pub index: usize,
    pub percent: u32,
}

/// A checked config, ready for the request path.
#[derive(Debug)]
pub struct Route {
    pub variants: Vec<Upstream>,
    pub split: Split,
    pub sticky_header: Option<HeaderName>,
    pub mirror: Option<MirrorTarget>,
    /// The sticky hash's key when the router is given none: derived from the variants' names and
    /// upstream addresses, so that every replica agrees and clients (who see neither) cannot
    /// work it out from the values they send.
    pub sticky_seed: (u64, u64),
}

impl Route {
    /// Parses and checks a config file's content. Unknown fields are ignored; an unknown `version`
    /// is refused.
    pub fn parse(json: &str, metrics: &Metrics) -> Result<Route, ConfigError> {
        Route::compile(RouterConfig::parse(json)?, metrics)
    }

    /// Checks a config: at least one variant, unique names, `host:port` upstreams, a positive total
    /// weight (weights are shares of their sum; the operator writes them summing to 100), a valid
    /// sticky header, and a mirror that names a variant.
    pub fn compile(c: RouterConfig, metrics: &Metrics) -> Result<Route, ConfigError> {
        if c.variants.is_empty() {
            return Err(ConfigError::NoVariants);
        }
        let mut seen = BTreeSet::new();
        let mut variants = Vec::with_capacity(c.variants.len());
        for v in &c.variants {
            if !seen.insert(v.name.as_str()) {
                return Err(ConfigError::DuplicateVariant(v.name.clone()));
            }
            let authority = v
                .upstream
                .parse::<Authority>()
                .ok()
                .filter(|a| a.port_u16().is_some() && !a.host().is_empty())
                .filter(|a| !a.as_str().contains('@'))
                .ok_or_else(|| ConfigError::BadUpstream {
                    variant: v.name.clone(),
                    upstream: v.upstream.clone(),
                })?;
            variants.push(Upstream {
                name: v.name.clone(),
                weight: v.weight,
                authority,
                protocol: v.protocol,
                metrics: metrics.variant(&v.name),
                pool: OnceLock::new(),
                h2: OnceLock::new(),
            });
        }
        let split = Split::new(c.variants.iter().map(|v| (v.name.as_str(), v.weight)))
            .ok_or(ConfigError::NoWeight)?;
        let sticky_header = c
            .sticky_header
            .map(|h| {
                HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes())
                    .map_err(|_| ConfigError::BadStickyHeader(h))
            })
            .transpose()?;
        let mirror = c
            .mirror
            .map(|m| {
                if m.percent > 100 {
                    return Err(ConfigError::MirrorPercent(m.percent));
                }
                let index = c
                    .variants
                    .iter()
                    .position(|v| v.name == m.variant)
                    .ok_or_else(|| ConfigError::UnknownMirror(m.variant.clone()))?;
                Ok(MirrorTarget {
                    index,
                    percent: m.percent,
                })
            })
            .transpose()?
            .filter(|m| m.percent > 0);
        let mut seed = Vec::new();
        for v in &variants {
            seed.extend_from_slice(v.name.as_bytes());
            seed.push(0);
            seed.extend_from_slice(v.authority.as_str().as_bytes());
            seed.push(0);
        }
        let sticky_seed = (
            crate::split::sticky_hash((0x6b65_656c, 1), &seed),
            crate::split::sticky_hash((0x6b65_656c, 2), &seed),
        );
        Ok(Route {
            variants,
            split,
            sticky_header,
            mirror,
            sticky_seed,
        })
    }

    /// `name=weight,...`, for log lines.
    pub fn summary(&self) -> String {
        let mut s = self
            .variants
            .iter()
            .map(|v| match v.protocol {
                RouterProtocol::Http1 => format!("{}={}", v.name, v.weight),
                RouterProtocol::H2c => format!("{}={}(h2c)", v.name, v.weight),
            })
            .collect::<Vec<_>>()
            .join(",");
        if let Some(h) = &self.sticky_header {
            s.push_str(&format!(" sticky={h}"));
        }
        if let Some(m) = self.mirror {
            s.push_str(&format!(
                " mirror={}@{}%",
                self.variants[m.index].name, m.percent
            ));
        }
        s
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: serde_json::Value) -> Result<Route, ConfigError> {
        Route::parse(&v.to_string(), &Metrics::default())
    }

    fn good() -> serde_json::Value {
        json!({
            "version": 1,
            "variants": [
                {"name": "champion", "weight": 90, "upstream": "fraud-champion.team-a.svc.cluster.local:80"},
                {"name": "challenger", "weight": 10, "upstream": "127.0.0.1:9001"}
            ],
            "stickyHeader": "X-User-Id",
            "mirror": {"variant": "challenger", "percent": 25}
        })
    }

    #[test]
    fn a_full_config_compiles() {
        let r = parse(good()).unwrap();
        assert_eq!(r.variants.len(), 2);
        assert_eq!(
            r.variants[0].authority.as_str(),
            "fraud-champion.team-a.svc.cluster.local:80"
        );
        assert_eq!(r.variants[1].authority.port_u16(), Some(9001));
        assert_eq!(r.sticky_header.as_ref().unwrap().as_str(), "x-user-id");
        assert_eq!(
            r.mirror,
            Some(MirrorTarget {
                index: 1,
                percent: 25
            })
        );
        assert_eq!(
            r.summary(),
            "champion=90,challenger=10 sticky=x-user-id mirror=challenger@25%"
        );
    }

    #[test]
    fn the_operators_own_output_compiles() {
        use keelson_api::router_config::{RouterMirror, RouterVariant};
        let c = RouterConfig {
            version: 1,
            variants: vec![RouterVariant {
                name: "only".into(),
                weight: 100,
                upstream: "m-only.ns.svc.cluster.local:80".into(),
                protocol: RouterProtocol::Http1,
            }],
            sticky_header: None,
            mirror: Some(RouterMirror {
                variant: "only".into(),
                percent: 0,
            }),
        };
        let r = Route::parse(&c.to_json().unwrap(), &Metrics::default()).unwrap();
        assert_eq!(r.mirror, None, "a 0% mirror sends nothing");
        assert_eq!(r.sticky_header, None);
    }

    #[test]
    fn unknown_fields_are_ignored_and_unknown_versions_refused() {
        let mut v = good();
        v["future"] = json!({"anything": [1, 2]});
        v["variants"][0]["zone"] = json!("eu");
        v["mirror"]["timeoutMs"] = json!(10);
        assert!(parse(v).is_ok());
        let mut v = good();
        v["version"] = json!(2);
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("version 2 is not supported"), "{e}");
        let mut v = good();
        v.as_object_mut().unwrap().remove("version");
        assert!(matches!(parse(v), Err(ConfigError::Parse(_))));
    }

    #[test]
    fn a_variant_speaks_http1_unless_it_says_h2c() {
        let mut v = good();
        v["variants"][1]["protocol"] = json!("h2c");
        let r = parse(v).unwrap();
        assert_eq!(r.variants[0].protocol, RouterProtocol::Http1);
        assert_eq!(r.variants[1].protocol, RouterProtocol::H2c);
        assert!(r.summary().starts_with("champion=90,challenger=10(h2c)"));
        let mut v = good();
        v["variants"][0]["protocol"] = json!("http1");
        assert_eq!(
            parse(v).unwrap().variants[0].protocol,
            RouterProtocol::Http1
        );
        // An HTTP/1.1 variant's JSON stays as the operator writes it today.
        let c = RouterConfig::parse(&good().to_string()).unwrap();
        assert!(!c.to_json().unwrap().contains("protocol"));
        let mut v = good();
        v["variants"][1]["protocol"] = json!("h2c");
        let c = RouterConfig::parse(&v.to_string()).unwrap();
        assert!(c.to_json().unwrap().contains("\"protocol\": \"h2c\""));
    }

    #[test]
    fn bad_configs_are_refused_with_the_reason() {
        type Edit = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|v| v["variants"] = json!([])), "no variants"),
            (
                Box::new(|v| v["variants"][1]["name"] = json!("champion")),
                "appears twice",
            ),
            (
                Box::new(|v| v["variants"][1]["upstream"] = json!("no-port")),
                "is not host:port",
            ),
            (
                Box::new(|v| v["variants"][1]["upstream"] = json!("http://x:1/")),
                "is not host:port",
            ),
            (
                Box::new(|v| v["variants"][1]["upstream"] = json!("user@x:1")),
                "is not host:port",
            ),
            (
                Box::new(|v| {
                    v["variants"][0]["weight"] = json!(0);
                    v["variants"][1]["weight"] = json!(0);
                }),
                "add up to 0",
            ),
            (
                Box::new(|v| v["stickyHeader"] = json!("x user")),
                "not an HTTP header name",
            ),
            (
                Box::new(|v| v["mirror"]["variant"] = json!("ghost")),
                "not one of the variants",
            ),
            (
                Box::new(|v| v["mirror"]["percent"] = json!(101)),
                "above 100",
            ),
            (
                Box::new(|v| v["variants"][0]["weight"] = json!(-1)),
                "not a router config",
            ),
            (
                Box::new(|v| v["variants"][0]["protocol"] = json!("h3")),
                "not a router config",
            ),
            (Box::new(|v| *v = json!("{")), "not a router config"),
        ];
        for (edit, want) in cases {
            let mut v = good();
            edit(&mut v);
            let e = parse(v.clone()).unwrap_err().to_string();
            assert!(e.contains(want), "{v}: {e} (wanted {want:?})");
        }
        assert!(Route::parse("not json", &Metrics::default()).is_err());
        assert!(Route::parse("", &Metrics::default()).is_err());
    }

    #[test]
    fn weights_are_shares_of_their_sum() {
        let mut v = good();
        v["variants"][0]["weight"] = json!(3);
        v["variants"][1]["weight"] = json!(1);
        let r = parse(v).unwrap();
        let n = 40_000;
        let first = (0..n).filter(|_| r.split.random() == 0).count();
        assert!((first as f64 / n as f64 - 0.75).abs() < 0.01, "{first}");
    }

    #[test]
    fn metrics_survive_a_reload() {
        let m = Metrics::default();
        let a = Route::parse(&good().to_string(), &m).unwrap();
        let b = Route::parse(&good().to_string(), &m).unwrap();
        a.variants[0].metrics.requests.inc();
        assert_eq!(b.variants[0].metrics.requests.get(), 1);
    }
}
