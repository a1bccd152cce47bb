//! Who may reach a notebook: its NetworkPolicy `<name>`, and its HTTPRoute `<name>` from a Gateway.
//! Pure.
//!
//! The NetworkPolicy selects the notebook's pod by its owner labels and allows ingress from:
//! - every pod of the notebook's own namespace;
//! - the namespaces and pod selectors of `spec.access.allowFrom`;
//! - the namespaces of the Gateways in `spec.access.gateway` (their data plane forwards the route);
//! - with `spec.idle`, the operator's namespace, on the notebook port only (it reads `/api/status`).
//!
//! Egress is not restricted unless `spec.access.egress` is set; then DNS (port 53, UDP and TCP, to
//! anywhere) and the listed namespaces and CIDRs only.

use std::collections::BTreeMap;

use gateway_api::httproutes::{
    HttpRoute, HttpRouteRules, HttpRouteRulesBackendRefs, HttpRouteSpec,
};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::gateway::http_parent_refs;
use keelson_api::meta::Owner;
use keelson_api::notebook::{Notebook, Scheme};

/// The label every namespace carries with its own name (set by the API server).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

fn namespace(name: &str) -> LabelSelector {
    LabelSelector {
        match_labels: Some(BTreeMap::from([(
            NAMESPACE_NAME_LABEL.to_string(),
            name.to_string(),
        )])),
        match_expressions: None,
    }
}

fn ns_peer(name: &str) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: Some(namespace(name)),
        ..NetworkPolicyPeer::default()
    }
}

/// The NetworkPolicy of `nb`. `operator_namespace` is where the operator runs (in a cluster), to
/// let its `/api/status` reads through when idle culling is on.
pub fn network_policy(
    nb: &Notebook,
    owner: &Owner,
    port: i32,
    operator_namespace: Option<&str>,
) -> NetworkPolicy {
    let access = nb.spec.access.as_ref();
    // Own namespace: a bare pod selector matches every pod of the policy's namespace.
    let mut from = vec![NetworkPolicyPeer {
        pod_selector: Some(LabelSelector::default()),
        ..NetworkPolicyPeer::default()
    }];
    if let Some(allow) = access.and_then(|a| a.allow_from.as_ref()) {
        for ns in allow.namespaces.iter().flatten() {
            from.push(ns_peer(ns));
        }
        for p in allow.pods.iter().flatten() {
            from.push(NetworkPolicyPeer {
                pod_selector: Some(LabelSelector {
                    match_labels: Some(p.match_labels.clone()),
                    match_expressions: None,
                }),
                namespace_selector: p.namespace.as_deref().map(namespace),
                ip_block: None,
            });
        }
    }
    if let Some(gw) = access.and_then(|a| a.gateway.as_ref()) {
        for p in &gw.attachment.parent_refs {
            let ns = p.namespace.as_deref().unwrap_or(&owner.namespace);
            if ns != owner.namespace {
                from.push(ns_peer(ns));
            }
        }
    }
    let mut ingress = vec![NetworkPolicyIngressRule {
        from: Some(dedup(from)),
        ports: None,
    }];
    if let Some(ns) =
        operator_namespace.filter(|ns| nb.spec.idle.is_some() && *ns != owner.namespace)
    {
        ingress.push(NetworkPolicyIngressRule {
            from: Some(vec![ns_peer(ns)]),
            ports: Some(vec![NetworkPolicyPort {
                port: Some(IntOrString::Int(port)),
                protocol: Some("TCP".into()),
                end_port: None,
            }]),
        });
    }

    let egress = access.and_then(|a| a.egress.as_ref()).map(|e| {
        let dns = NetworkPolicyEgressRule {
            to: None,
            ports: Some(
                ["UDP", "TCP"]
                    .into_iter()
                    .map(|proto| NetworkPolicyPort {
                        port: Some(IntOrString::Int(53)),
                        protocol: Some(proto.into()),
                        end_port: None,
                    })
                    .collect(),
            ),
        };
        let mut to: Vec<NetworkPolicyPeer> =
            e.namespaces.iter().flatten().map(|n| ns_peer(n)).collect();
        to.extend(e.cidrs.iter().flatten().map(|c| NetworkPolicyPeer {
            ip_block: Some(IPBlock {
                cidr: c.clone(),
                except: None,
            }),
            ..NetworkPolicyPeer::default()
        }));
        vec![
            dns,
            NetworkPolicyEgressRule {
                to: Some(dedup(to)),
                ports: None,
            },
        ]
    });
    let mut types = vec!["Ingress".to_string()];
    if egress.is_some() {
        types.push("Egress".into());
    }
    NetworkPolicy {
        metadata: owner.child_meta(&owner.name),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(owner.labels()),
                match_expressions: None,
            }),
            policy_types: Some(types),
            ingress: Some(ingress),
            egress,
        }),
    }
}

fn dedup(peers: Vec<NetworkPolicyPeer>) -> Vec<NetworkPolicyPeer> {
    let mut out: Vec<NetworkPolicyPeer> = Vec::with_capacity(peers.len());
    for p in peers {
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// The HTTPRoute of `nb` when `spec.access.gateway` is set: every request to the notebook's
/// Service. The notebook server still asks for its token.
pub fn route(nb: &Notebook, owner: &Owner, port: i32) -> Option<HttpRoute> {
    let gw = nb.spec.access.as_ref()?.gateway.as_ref()?;
    let parent_refs = http_parent_refs(&gw.attachment.parent_refs);
    let mut route = HttpRoute::new(
        &owner.name,
        HttpRouteSpec {
            parent_refs: Some(parent_refs),
            hostnames: gw.hostname.clone().map(|h| vec![h]),
            rules: Some(vec![HttpRouteRules {
                backend_refs: Some(vec![HttpRouteRulesBackendRefs {
                    name: owner.name.clone(),
                    port: Some(port),
                    ..HttpRouteRulesBackendRefs::default()
                }]),
                ..HttpRouteRules::default()
            }]),
        },
    );
    route.metadata = owner.child_meta(&owner.name);
    Some(route)
}

/// The external URL of a notebook exposed through a Gateway with a host name.
pub fn external_url(nb: &Notebook) -> Option<String> {
    let gw = nb.spec.access.as_ref()?.gateway.as_ref()?;
    let host = gw.hostname.as_deref()?;
    let scheme = match gw.scheme.unwrap_or_default() {
        Scheme::Https => "https",
        Scheme::Http => "http",
    };
    Some(format!("{scheme}://{host}/"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use keelson_api::modeldeployment::{GatewayAttachment, ParentRef};
    use keelson_api::notebook::{
        AccessSpec, AllowFrom, EgressSpec, IdleSpec, NotebookGateway, NotebookSpec, PodPeer,
    };

    fn nb(access: Option<AccessSpec>, idle: bool) -> (Notebook, Owner) {
        let mut nb = Notebook::new(
            "alice",
            NotebookSpec {
                access,
                idle: idle.then(|| IdleSpec {
                    timeout: "2h".into(),
                }),
                ..NotebookSpec::default()
            },
        );
        nb.metadata.namespace = Some("team-a".into());
        nb.metadata.uid = Some("u".into());
        let o = Owner::of(&nb).unwrap();
        (nb, o)
    }

    fn yaml(np: &NetworkPolicy) -> serde_json::Value {
        serde_json::to_value(np).unwrap()
    }

    #[test]
    fn default_policy_admits_only_the_own_namespace_and_leaves_egress_open() {
        let (n, o) = nb(None, false);
        let np = network_policy(&n, &o, 8888, Some("keelson-system"));
        let v = yaml(&np);
        assert_eq!(v["metadata"]["name"], "alice");
        assert_eq!(v["metadata"]["ownerReferences"][0]["uid"], "u");
        assert_eq!(
            v["spec"]["podSelector"]["matchLabels"]["keelson.dev/owner-name"],
            "alice"
        );
        assert_eq!(v["spec"]["policyTypes"], serde_json::json!(["Ingress"]));
        assert_eq!(
            v["spec"]["ingress"],
            serde_json::json!([{"from": [{"podSelector": {}}]}])
        );
        assert!(v["spec"].get("egress").is_none());
    }

    #[test]
    fn allow_from_gateway_idle_and_egress() {
        let access = AccessSpec {
            allow_from: Some(AllowFrom {
                namespaces: Some(vec!["ml-platform".into()]),
                pods: Some(vec![PodPeer {
                    match_labels: BTreeMap::from([("app".into(), "dash".into())]),
                    namespace: Some("infra".into()),
                }]),
            }),
            egress: Some(EgressSpec {
                namespaces: None,
                cidrs: Some(vec!["10.20.0.0/16".into()]),
            }),
            gateway: Some(NotebookGateway {
                attachment: GatewayAttachment {
                    parent_refs: vec![
                        ParentRef {
                            name: "public".into(),
                            namespace: Some("gw".into()),
                            ..ParentRef::default()
                        },
                        ParentRef {
                            name: "local".into(),
                            ..ParentRef::default()
                        },
                    ],
                },
                hostname: Some("alice.example.com".into()),
                scheme: None,
            }),
        };
        let (n, o) = nb(Some(access), true);
        let v = yaml(&network_policy(&n, &o, 8888, Some("keelson-system")));
        let ns = |n: &str| serde_json::json!({"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: n}}});
        assert_eq!(
            v["spec"]["ingress"][0]["from"],
            serde_json::json!([
                {"podSelector": {}},
                ns("ml-platform"),
                {"podSelector": {"matchLabels": {"app": "dash"}}, "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: "infra"}}},
                ns("gw"),
            ])
        );
        // The operator reads /api/status on the notebook port.
        assert_eq!(
            v["spec"]["ingress"][1],
            serde_json::json!({"from": [ns("keelson-system")], "ports": [{"port": 8888, "protocol": "TCP"}]})
        );
        assert_eq!(
            v["spec"]["policyTypes"],
            serde_json::json!(["Ingress", "Egress"])
        );
        assert_eq!(v["spec"]["egress"][0]["ports"][0]["port"], 53);
        assert_eq!(
            v["spec"]["egress"][1]["to"],
            serde_json::json!([{"ipBlock": {"cidr": "10.20.0.0/16"}}])
        );

        let r = serde_json::to_value(route(&n, &o, 8888).unwrap()).unwrap();
        assert_eq!(r["kind"], "HTTPRoute");
        assert_eq!(r["metadata"]["name"], "alice");
        assert_eq!(r["metadata"]["ownerReferences"][0]["uid"], "u");
        assert_eq!(
            r["spec"]["hostnames"],
            serde_json::json!(["alice.example.com"])
        );
        assert_eq!(
            r["spec"]["rules"][0]["backendRefs"],
            serde_json::json!([{"name": "alice", "port": 8888}])
        );
        assert_eq!(r["spec"]["parentRefs"][0]["namespace"], "gw");
        assert_eq!(
            external_url(&n).as_deref(),
            Some("https://alice.example.com/")
        );
    }

    #[test]
    fn no_operator_rule_without_idle_or_outside_a_cluster() {
        for (idle, op) in [
            (false, Some("keelson-system")),
            (true, None),
            (true, Some("team-a")),
        ] {
            let (n, o) = nb(None, idle);
            let v = yaml(&network_policy(&n, &o, 8888, op));
            assert_eq!(
                v["spec"]["ingress"].as_array().unwrap().len(),
                1,
                "{idle} {op:?}"
            );
        }
        let (n, o) = nb(None, false);
        assert!(route(&n, &o, 8888).is_none());
        assert!(external_url(&n).is_none());
    }
}
