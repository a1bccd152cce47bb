//! The CRDs offline: `crds/` is what the types generate, the schemas are structural, every CEL rule
//! names fields of its node, and every example passes the schema (checked as the API server does).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use keelson_api::crd::{all, to_yaml};

use keelson_testkit::schema_check::{documents, errors, schema_of};
use serde_json::{json, Value};

fn crd_for(kind: &str) -> CustomResourceDefinition {
    all()
        .into_iter()
        .map(|(_, c)| c)
        .find(|c| c.spec.names.kind == kind)
        .unwrap()
}

#[test]
fn crds_dir_is_what_the_types_generate() {
    for (file, crd) in all() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("crds")
            .join(file);
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == to_yaml(&crd).unwrap(),
            "{} is stale: run `make crds`",
            path.display()
        );
    }
}

#[test]
fn names_columns_and_subresources() {
    let expect = [
        (
            "Notebook",
            "notebooks",
            "nb",
            vec!["PHASE", "GPUS", "URL", "AGE"],
        ),
        (
            "TrainingJob",
            "trainingjobs",
            "tj",
            vec!["STATE", "WORKERS", "GPUS", "RESTARTS", "AGE"],
        ),
        (
            "ModelDeployment",
            "modeldeployments",
            "mdep",
            vec!["READY", "TRAFFIC", "ROLLOUT", "URL", "AGE"],
        ),
    ];
    for (kind, plural, short, cols) in expect {
        let c = crd_for(kind);
        assert_eq!(c.spec.group, "keelson.dev");
        assert_eq!(c.spec.scope, "Namespaced");
        assert_eq!(c.spec.names.plural, plural);
        assert_eq!(
            c.spec.names.short_names.as_deref(),
            Some(&[short.to_string()][..])
        );
        assert_eq!(
            c.spec.names.categories.as_deref(),
            Some(&["keelson".to_string()][..])
        );
        let v = &c.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(v.subresources.as_ref().unwrap().status.is_some());
        let names: Vec<_> = v
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(names, cols);
    }
}

/// Walks a schema node; `f` sees each node with its path.
fn walk(s: &Value, path: &str, f: &mut dyn FnMut(&Value, &str)) {
    f(s, path);
    if let Some(props) = s.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            walk(v, &format!("{path}.{k}"), f);
        }
    }
    if let Some(items) = s.get("items") {
        walk(items, &format!("{path}[]"), f);
    }
    if let Some(a) = s.get("additionalProperties").filter(|a| a.is_object()) {
        walk(a, &format!("{path}{{}}"), f);
    }
}

#[test]
fn schemas_are_structural() {
    for (_, crd) in all() {
        let schema = schema_of(&crd);
        walk(&schema, "", &mut |node, path| {
            for bad in ["anyOf", "oneOf", "allOf", "not", "$ref"] {
                assert!(
                    node.get(bad).is_none(),
                    "{path}: {bad} makes the schema non-structural (mixed enum?)"
                );
            }
            let typed = node.get("type").is_some()
                || node.get("x-kubernetes-int-or-string").is_some()
                || node.get("x-kubernetes-preserve-unknown-fields").is_some();
            assert!(typed, "{path}: no type");
            if let Some(e) = node.get("enum").and_then(Value::as_array) {
                // Optional enums list null, which `nullable: true` allows.
                assert!(
                    e.iter().all(|v| v.is_string() || v.is_null()),
                    "{path}: enum with non-string values"
                );
                assert_eq!(node["type"], "string", "{path}: enum must be a string enum");
            }
            if node.get("properties").is_some() {
                assert_eq!(node["type"], "object", "{path}");
            }
        });
    }
}

/// Resolves `self.a.b` (or `v.a` for a lambda over list items) to the schema node it names.
fn resolve<'a>(mut node: &'a Value, fields: &[&str]) -> Option<&'a Value> {
    for f in fields {
        node = node.get("properties")?.get(*f)?;
    }
    Some(node)
}

#[test]
fn every_cel_rule_names_fields_of_its_node() {
    let chain =
        regex::Regex::new(r"\b(self|oldSelf|[a-z])((?:\.[A-Za-z_][A-Za-z0-9_]*)+)").unwrap();
    let lambda = regex::Regex::new(r"(self(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\.(?:all|exists|exists_one|map|filter)\(\s*([a-z])\s*,").unwrap();
    let builtins = [
        "size",
        "startsWith",
        "matches",
        "sum",
        "all",
        "exists",
        "exists_one",
        "map",
        "filter",
        "endsWith",
        "contains",
    ];
    let mut rules = 0;
    for (_, crd) in all() {
        let schema = schema_of(&crd);
        walk(&schema, "", &mut |node, path| {
            for r in node
                .get("x-kubernetes-validations")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                rules += 1;
                let rule = r["rule"].as_str().unwrap();
                assert!(
                    r.get("message").is_some(),
                    "{path}: rule {rule} has no message"
                );
                // Each lambda variable stands for the items of the list it iterates.
                let vars: Vec<(String, Vec<String>)> = lambda
                    .captures_iter(rule)
                    .map(|c| {
                        (
                            c[2].to_string(),
                            c[1].split('.').skip(1).map(str::to_string).collect(),
                        )
                    })
                    .collect();
                for c in chain.captures_iter(rule) {
                    let root = &c[1];
                    let fields: Vec<&str> = c[2]
                        .trim_start_matches('.')
                        .split('.')
                        .filter(|f| !builtins.contains(f))
                        .collect();
                    let base = match root {
                        "self" | "oldSelf" => node,
                        v => match vars.iter().find(|(x, _)| x == v) {
                            Some((_, receiver)) => {
                                let r: Vec<&str> = receiver.iter().map(String::as_str).collect();
                                let list = resolve(node, &r).unwrap_or_else(|| {
                                    panic!("{path}: {rule:?} iterates a missing field")
                                });
                                list.get("items").unwrap_or_else(|| {
                                    panic!("{path}: {rule:?} iterates a non-list")
                                })
                            }
                            None => continue,
                        },
                    };
                    // metadata.name is checked by the API server itself.
                    if fields.first() == Some(&"metadata") {
                        continue;
                    }
                    assert!(
                        resolve(base, &fields).is_some(),
                        "{path}: rule {rule:?} names {root}.{} which is not a field there",
                        fields.join(".")
                    );
                }
            }
        });
    }
    assert!(rules >= 10, "only {rules} CEL rules found");
}

fn example_files() -> Vec<(String, Vec<Value>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| {
            (
                p.display().to_string(),
                documents(&std::fs::read_to_string(&p).unwrap()),
            )
        })
        .collect()
}

#[test]
fn every_example_passes_the_schema_and_says_what_it_shows() {
    let mut kinds = std::collections::BTreeSet::new();
    for (file, docs) in example_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            text.starts_with("# "),
            "{file}: start with a comment saying what it shows"
        );
        for d in docs {
            let kind = d["kind"].as_str().unwrap().to_string();
            if d["apiVersion"] != "keelson.dev/v1alpha1" {
                continue;
            }
            let errs = errors(&kind, &d);
            assert!(errs.is_empty(), "{file}: {errs:?}");
            // And the operator can read it.
            match kind.as_str() {
                "Notebook" => {
                    drop(serde_json::from_value::<keelson_api::notebook::Notebook>(d).unwrap())
                }
                "TrainingJob" => drop(
                    serde_json::from_value::<keelson_api::trainingjob::TrainingJob>(d).unwrap(),
                ),
                "ModelDeployment" => drop(
                    serde_json::from_value::<keelson_api::modeldeployment::ModelDeployment>(d)
                        .unwrap(),
                ),
                k => panic!("{file}: unknown kind {k}"),
            }
            kinds.insert(kind);
        }
    }
    assert_eq!(kinds.len(), 3, "an example per kind");
}

/// Each invalid manifest is refused, with a message naming the field.
#[test]
fn invalid_manifests_are_refused_naming_the_field() {
    let nb = |spec: Value| json!({"apiVersion": "keelson.dev/v1alpha1", "kind": "Notebook", "metadata": {"name": "x"}, "spec": spec});
    let tj = |spec: Value| json!({"apiVersion": "keelson.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "x"}, "spec": spec});
    let md = |spec: Value| json!({"apiVersion": "keelson.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "x"}, "spec": spec});
    let v = |w: i64| json!({"name": "a", "image": "i", "weight": w});
    let cases: Vec<(&str, Value, &str)> = vec![
        ("Notebook", nb(json!({})), "image"),
        ("Notebook", nb(json!({"image": ""})), "image"),
        (
            "TrainingJob",
            tj(json!({"image": "i", "workers": 0})),
            "workers",
        ),
        (
            "TrainingJob",
            tj(json!({"image": "i", "workers": 1, "gpus": {"count": -1}})),
            "gpus.count",
        ),
        (
            "TrainingJob",
            tj(json!({"image": "i", "workers": 1, "framework": "Torch"})),
            "framework",
        ),
        (
            "TrainingJob",
            tj(json!({"image": "i", "workers": 1, "runPolicy": {"restartPolicy": "Always"}})),
            "restartPolicy",
        ),
        (
            "TrainingJob",
            tj(json!({"image": "i", "workers": 1, "runPolicy": {"cleanPodPolicy": "Some"}})),
            "cleanPodPolicy",
        ),
        (
            "Notebook",
            nb(
                json!({"image": "i", "volumes": [{"name": "Bad_Name", "mountPath": "/d", "emptyDir": {}}]}),
            ),
            "volumes[0].name",
        ),
        (
            "Notebook",
            nb(
                json!({"image": "i", "volumes": [{"name": "a", "mountPath": "/d", "emptyDir": {}}, {"name": "a", "mountPath": "/e", "emptyDir": {}}]}),
            ),
            "volumes[1]: Duplicate value",
        ),
        (
            "Notebook",
            nb(json!({"image": "i", "volumes": [{"name": "a", "mountPath": "d", "emptyDir": {}}]})),
            "mountPath must be an absolute path",
        ),
        (
            "Notebook",
            nb(
                json!({"image": "i", "volumes": [{"name": "a", "mountPath": "/d", "emptyDir": {}}, {"name": "b", "mountPath": "/d", "emptyDir": {}}]}),
            ),
            "volumes[].mountPath must be unique",
        ),
        (
            "Notebook",
            nb(json!({"image": "i", "volumes": [{"name": "a", "mountPath": "/d"}]})),
            "exactly one source",
        ),
        (
            "Notebook",
            nb(
                json!({"image": "i", "volumes": [{"name": "a", "mountPath": "/d", "emptyDir": {}, "nfs": {"server": "s", "path": "/p"}}]}),
            ),
            "exactly one source",
        ),
        (
            "ModelDeployment",
            md(json!({"variants": [], "traffic": {}})),
            "variants",
        ),
        (
            "ModelDeployment",
            md(
                json!({"variants": (0..11).map(|i| json!({"name": format!("v{i}"), "image": "i", "weight": if i == 0 { 100 } else { 0 }})).collect::<Vec<_>>()}),
            ),
            "variants",
        ),
        (
            "ModelDeployment",
            md(json!({"variants": [v(50), v(50)]})),
            "variants[1]: Duplicate value",
        ),
        (
            "ModelDeployment",
            md(json!({"variants": [v(90)]})),
            "weight must sum to 100",
        ),
        (
            "ModelDeployment",
            md(json!({"variants": [v(101)]})),
            "weight",
        ),
        (
            "ModelDeployment",
            md(json!({"variants": [v(100)], "traffic": {"router": "Istio"}})),
            "router",
        ),
        (
            "ModelDeployment",
            md(json!({"variants": [v(100)], "traffic": {"mirror": {"variant": "b"}}})),
            "mirror.variant must name one of spec.variants",
        ),
        (
            "ModelDeployment",
            md(
                json!({"variants": [{"name": "a", "image": "i", "weight": 100, "model": {"uri": "s3://b/k"}}]}),
            ),
            "model.uri must start with pvc://",
        ),
        (
            "ModelDeployment",
            md(json!({"variants": [v(100)], "protocol": "gRPC"})),
            "protocol",
        ),
        (
            "ModelDeployment",
            md(
                json!({"protocol": "GRPC", "variants": [{"name": "a", "image": "i", "weight": 100, "readiness": {"httpGet": {"path": "/ready"}}}]}),
            ),
            "spec.variants[].readiness.httpGet is an HTTP/1.1 check",
        ),
        (
            "ModelDeployment",
            md(
                json!({"variants": [{"name": "a", "image": "i", "weight": 100, "readiness": {"grpc": {}}}]}),
            ),
            "spec.variants[].readiness.grpc needs spec.protocol: GRPC",
        ),
        (
            "ModelDeployment",
            md(
                json!({"protocol": "GRPC", "variants": [{"name": "a", "image": "i", "weight": 100, "readiness": {"grpc": {}, "httpGet": {"path": "/r"}}}]}),
            ),
            "readiness.httpGet and readiness.grpc are exclusive",
        ),
        (
            "ModelDeployment",
            md(
                json!({"protocol": "GRPC", "variants": [v(100)], "traffic": {"mirror": {"variant": "a"}}}),
            ),
            "spec.traffic.mirror with spec.protocol: GRPC needs spec.traffic.router: GatewayAPI",
        ),
        (
            "ModelDeployment",
            md(
                json!({"protocol": "GRPC", "variants": [{"name": "a", "image": "i", "weight": 100, "readiness": {"grpc": {"port": 0}}}]}),
            ),
            "readiness.grpc.port",
        ),
    ];
    for (kind, obj, needle) in cases {
        let errs = errors(kind, &obj);
        assert!(
            errs.iter().any(|e| e.contains(needle)),
            "{kind} {obj}: expected an error naming {needle:?}, got {errs:?}"
        );
    }
}
