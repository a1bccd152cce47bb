//! Least privilege, read from the API server's audit log: every (API group, resource, verb) that
//! config/rbac grants was used by the operator's ServiceAccount during the test suite, and the
//! operator used nothing else. Its own binary, run by `make test` after `idempotence` and
//! `integration` (cargo runs test binaries in name order), which drive the operator as that
//! ServiceAccount through every code path that writes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use keelson_testkit as support;

use std::collections::BTreeSet;

use serde::Deserialize;
use support::*;

type Grant = (String, String, String);

/// (group, resource, verb) of every rule in the ClusterRole and the Roles of config/rbac.
fn granted() -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for file in [
        "config/rbac/role.yaml",
        "config/rbac/leader_election_role.yaml",
    ] {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = serde_json::to_value(serde_yaml::Value::deserialize(doc).unwrap()).unwrap();
            if !matches!(v["kind"].as_str(), Some("ClusterRole" | "Role")) {
                continue;
            }
            for rule in v["rules"].as_array().unwrap() {
                let list = |k: &str| -> Vec<String> {
                    rule[k]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_str().unwrap().to_string())
                        .collect()
                };
                for g in list("apiGroups") {
                    for r in list("resources") {
                        for verb in list("verbs") {
                            out.insert((g.clone(), r.clone(), verb));
                        }
                    }
                }
            }
        }
    }
    out
}

/// (group, resource, verb) of every request the operator's ServiceAccount made, from the audit log.
fn used() -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    let dir = root().join("target/cluster/logs");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !name.starts_with("audit") {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap_or_default().lines() {
            let Ok(ev) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let who = ev["impersonatedUser"]["username"]
                .as_str()
                .or(ev["user"]["username"].as_str());
            if who != Some(OPERATOR_USER) {
                continue;
            }
            let obj = &ev["objectRef"];
            let Some(resource) = obj["resource"].as_str() else {
                continue;
            };
            let resource = match obj["subresource"].as_str() {
                Some(sub) => format!("{resource}/{sub}"),
                None => resource.to_string(),
            };
            let group = obj["apiGroup"].as_str().unwrap_or("").to_string();
            let verb = ev["verb"].as_str().unwrap().to_string();
            // A server-side apply that creates the object answers 201, and the API server
            // authorizes it as a create as well as a patch.
            if verb == "patch" && ev["responseStatus"]["code"].as_i64() == Some(201) {
                out.insert((group.clone(), resource.clone(), "create".into()));
            }
            out.insert((group, resource, verb));
        }
    }
    out
}

#[test]
fn the_rbac_grants_exactly_what_the_operator_used() {
    cluster();
    let granted = granted();
    let used = used();
    assert!(
        !used.is_empty(),
        "no request by {OPERATOR_USER} in the audit log: run it after the integration tests (make test)"
    );
    let unused: Vec<_> = granted.difference(&used).collect();
    let ungranted: Vec<_> = used.difference(&granted).collect();
    println!(
        "the operator used {} of {} grants",
        used.len(),
        granted.len()
    );
    assert!(
        unused.is_empty(),
        "granted but never used by the operator during the suite: {unused:?}"
    );
    assert!(
        ungranted.is_empty(),
        "used but not granted (these calls were refused): {ungranted:?}"
    );
}
