//! The router config: the contract between the operator, which writes it into the ConfigMap
//! `<name>-router`, and `keelson router`, which reads it. A wire type and its constants only; it
//! must not depend on Kubernetes types, so that the router builds without them.

use serde::{Deserialize, Serialize};

/// Version of the router config format this operator writes.
pub const ROUTER_CONFIG_VERSION: u32 = 1;
/// Key of the router config in the ConfigMap `<name>-router`.
pub const ROUTER_CONFIG_KEY: &str = "config.json";
/// Where the router ConfigMap is mounted in the router pod.
pub const ROUTER_CONFIG_DIR: &str = "/etc/keelson-router";
/// Port the router listens on.
pub const ROUTER_PORT: i32 = 8080;
/// The router's admin port: `/healthz`, `/readyz` (a valid config is loaded) and `/metrics`. Kept
/// apart from the data port so that no path of the models' own API is shadowed.
pub const ROUTER_ADMIN_PORT: i32 = 9090;
/// Name of the router's admin port.
pub const ROUTER_ADMIN_PORT_NAME: &str = "admin";
/// Name of the router container.
pub const ROUTER_CONTAINER: &str = "router";
/// Name of the config volume in the router pod.
pub const ROUTER_CONFIG_VOLUME: &str = "config";
/// The user the router runs as (the distroless `nonroot` user), so that `runAsNonRoot` can be
/// checked by the kubelet whatever the image's USER says.
pub const ROUTER_UID: i64 = 65532;
/// Environment variable the router reads its sticky-hash key from (`--sticky-key`).
pub const ROUTER_STICKY_KEY_ENV: &str = "KEELSON_ROUTER_STICKY_KEY";
/// Key of the sticky-hash key in the Secret `<name>-router-key`.
pub const ROUTER_STICKY_KEY_KEY: &str = "sticky-key";
/// Default mirror percentage.
pub const DEFAULT_MIRROR_PERCENT: i32 = 100;

/// The built-in router's configuration, as JSON in the ConfigMap `<name>-router` under `config.json`.
///
/// ```json
/// {
///   "version": 1,
///   "variants": [
///     {"name": "champion", "weight": 90, "upstream": "fraud-champion.team-a.svc.cluster.local:80"},
///     {"name": "challenger", "weight": 10, "upstream": "fraud-challenger.team-a.svc.cluster.local:80"}
///   ],
///   "stickyHeader": "x-user-id",
///   "mirror": {"variant": "challenger", "percent": 100}
/// }
/// ```
///
/// Semantics for the router:
/// - `version` is the format version; a router refuses a version it does not know (and keeps serving
///   with its last good config). Fields added within a version are optional, so a router ignores
///   fields it does not know.
/// - `variants` are in spec order; `weight`s are integers that sum to 100. A request goes to one
///   variant chosen by weight; a variant with weight 0 gets no primary traffic (it may still be the
///   mirror target). `upstream` is `host:port` of the variant's Service, spoken to over plain
///   HTTP/1.1, or over HTTP/2 cleartext when `protocol` is `h2c` (gRPC).
/// - `stickyHeader` (lower case): when a request carries this header, the variant is chosen from a
///   hash of its value over the weight ranges, so one caller stays on one variant while the weights
///   stay the same; requests without it are split at random.
/// - `mirror`: a copy of `percent` percent of the requests is sent to the variant named `variant`
///   (one of `variants`); its responses are discarded and its failures never reach the caller.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RouterConfig {
    pub version: u32,
    pub variants: Vec<RouterVariant>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<RouterMirror>,
}

/// One variant the router sends traffic to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RouterVariant {
    pub name: String,
    /// Share of the requests, in percent.
    pub weight: u32,
    /// `host:port` of the variant's Service.
    pub upstream: String,
    /// How the router speaks to `upstream`: `http1` (the default, left out of the JSON) or `h2c`
    /// (HTTP/2 over cleartext, prior knowledge: gRPC servers).
    #[serde(default, skip_serializing_if = "RouterProtocol::is_http1")]
    pub protocol: RouterProtocol,
}

/// The protocol a variant's upstream speaks.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RouterProtocol {
    /// HTTP/1.1 with keep-alive.
    #[default]
    Http1,
    /// HTTP/2 over cleartext with prior knowledge, one stream per request: what gRPC servers speak.
    /// Trailers pass both ways.
    H2c,
}

impl RouterProtocol {
    /// Whether this is the default, HTTP/1.1.
    pub fn is_http1(&self) -> bool {
        *self == RouterProtocol::Http1
    }
}

/// Shadow traffic.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RouterMirror {
    /// Name of the variant (in `variants`) that receives the copies.
    pub variant: String,
    /// Percent of the requests copied, 0 to 100.
    pub percent: u32,
}

impl RouterConfig {
    /// Reads a config, refusing a format version this build does not know.
    pub fn parse(json: &str) -> Result<RouterConfig, serde_json::Error> {
        let c: RouterConfig = serde_json::from_str(json)?;
        if c.version != ROUTER_CONFIG_VERSION {
            return Err(<serde_json::Error as serde::de::Error>::custom(format!(
                "router config version {} is not supported (this router reads version {ROUTER_CONFIG_VERSION})",
                c.version
            )));
        }
        Ok(c)
    }

    /// The config as stored in the ConfigMap (pretty, so `kubectl get cm -o yaml` reads well).
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string_pretty(self)
    }

    /// The weight of a variant, if the config names it.
    pub fn weight(&self, variant: &str) -> Option<u32> {
        self.variants
            .iter()
            .find(|v| v.name == variant)
            .map(|v| v.weight)
    }
}
