//! The CRDs are accepted by the API server, which refuses invalid manifests with a message naming
//! the field (every CEL rule and the OpenAPI bounds).

use crate::support::*;

#[test]
fn crds_are_established_with_columns_and_short_names() {
    cluster();
    for short in ["nb", "tj", "mdep"] {
        kubectl_ok(&["get", short, "-A"], None);
    }
    let out = kubectl_ok(
        &["api-resources", "--api-group=keelson.dev", "-o", "wide"],
        None,
    );
    for kind in ["Notebook", "TrainingJob", "ModelDeployment"] {
        assert!(out.contains(kind), "{out}");
    }
    let cats = kubectl_ok(&["get", "keelson", "-A"], None);
    let _ = cats;
    let explain = kubectl_ok(
        &["explain", "trainingjobs.spec.runPolicy.restartPolicy"],
        None,
    );
    assert!(explain.contains("ExitCode"), "{explain}");
}

#[test]
fn invalid_manifests_are_refused_naming_the_field() {
    let ns = Ns::new("invalid");
    let nb = |spec: &str| {
        format!("apiVersion: keelson.dev/v1alpha1\nkind: Notebook\nmetadata: {{name: nb}}\nspec:\n{spec}")
    };
    let tj = |spec: &str| {
        format!("apiVersion: keelson.dev/v1alpha1\nkind: TrainingJob\nmetadata: {{name: tj}}\nspec:\n{spec}")
    };
    let md = |spec: &str| {
        format!("apiVersion: keelson.dev/v1alpha1\nkind: ModelDeployment\nmetadata: {{name: md}}\nspec:\n{spec}")
    };
    let cases: Vec<(String, Vec<&str>)> = vec![
        // required image
        (nb("  port: 8888\n"), vec!["spec.image", "Required value"]),
        (tj("  workers: 1\n  image: \"\"\n"), vec!["spec.image"]),
        // workers >= 1
        (tj("  workers: 0\n  image: i\n"), vec!["spec.workers", "greater than or equal to 1"]),
        // gpus.count >= 0
        (tj("  workers: 1\n  image: i\n  gpus: {count: -1}\n"), vec!["spec.gpus.count", "greater than or equal to 0"]),
        // enums
        (tj("  workers: 1\n  image: i\n  framework: Torch\n"), vec!["spec.framework", "Unsupported value"]),
        (tj("  workers: 1\n  image: i\n  runPolicy: {restartPolicy: Always}\n"), vec!["spec.runPolicy.restartPolicy", "Unsupported value"]),
        (tj("  workers: 1\n  image: i\n  runPolicy: {cleanPodPolicy: Some}\n"), vec!["spec.runPolicy.cleanPodPolicy", "Unsupported value"]),
        (md("  variants: [{name: a, image: i, weight: 100}]\n  traffic: {router: Istio}\n"), vec!["spec.traffic.router", "Unsupported value"]),
        // volume names DNS-1123 and unique, mountPaths absolute and unique, one source
        (nb("  image: i\n  volumes: [{name: Bad_Name, mountPath: /d, emptyDir: {}}]\n"), vec!["spec.volumes[0].name"]),
        (nb("  image: i\n  volumes: [{name: a, mountPath: /d, emptyDir: {}}, {name: a, mountPath: /e, emptyDir: {}}]\n"), vec![".spec.volumes", "duplicate entries for key [name=\"a\"]"]),
        (nb("  image: i\n  volumes: [{name: a, mountPath: data, emptyDir: {}}]\n"), vec!["spec.volumes[0].mountPath", "absolute path"]),
        (nb("  image: i\n  volumes: [{name: a, mountPath: /d, emptyDir: {}}, {name: b, mountPath: /d, emptyDir: {}}]\n"), vec!["spec.volumes", "volumes[].mountPath must be unique"]),
        (nb("  image: i\n  volumes: [{name: a, mountPath: /d}]\n"), vec!["spec.volumes[0]", "exactly one source"]),
        (nb("  image: i\n  volumes: [{name: a, mountPath: /d, emptyDir: {}, nfs: {server: s, path: /p}}]\n"), vec!["spec.volumes[0]", "exactly one source"]),
        // 1 to 10 variants with unique names
        (md("  variants: []\n"), vec!["spec.variants", "at least 1"]),
        (
            md(&format!(
                "  variants: [{}]\n",
                (0..11).map(|i| format!("{{name: v{i}, image: i, weight: {}}}", if i == 0 { 100 } else { 0 })).collect::<Vec<_>>().join(", ")
            )),
            vec!["spec.variants", "10 items"],
        ),
        (md("  variants: [{name: a, image: i, weight: 50}, {name: a, image: i, weight: 50}]\n"), vec![".spec.variants", "duplicate entries for key [name=\"a\"]"]),
        // weights 0..100 summing to 100
        (md("  variants: [{name: a, image: i, weight: 90}]\n"), vec!["spec.variants", "weight must sum to 100"]),
        (md("  variants: [{name: a, image: i, weight: 101}]\n"), vec!["spec.variants[0].weight", "less than or equal to 100"]),
        // the mirror variant exists
        (md("  variants: [{name: a, image: i, weight: 100}]\n  traffic: {mirror: {variant: b}}\n"), vec!["mirror.variant must name one of spec.variants"]),
        // model.uri starts with pvc://
        (md("  variants: [{name: a, image: i, weight: 100, model: {uri: \"s3://bucket/m\"}}]\n"), vec!["spec.variants[0].model.uri", "pvc://"]),
        // names that cannot name the children
        (nb("  image: i\n").replace("name: nb", "name: Nb.x"), vec!["metadata.name"]),
    ];
    for (yaml, needles) in cases {
        refused(&ns, &yaml, &needles);
    }
    // And a valid one of each is accepted, so the refusals above are not an accident of the harness.
    ns.apply(&nb("  image: i\n  suspend: true\n")).unwrap();
    ns.apply(&tj("  workers: 1\n  image: i\n  suspend: true\n"))
        .unwrap();
    ns.apply(&md(
        "  variants: [{name: a, image: i, weight: 100, replicas: 0}]\n  traffic: {router: None}\n",
    ))
    .unwrap();
}

/// `kubectl apply -k config/default` input renders, with the CRDs, least-privilege RBAC and a
/// hardened manager; and the API server accepts all of it (server-side dry run).
#[test]
fn kustomize_config_renders_and_is_accepted() {
    cluster();
    let out = kubectl_ok(&["kustomize", "config/default"], None);
    for kind in [
        "kind: CustomResourceDefinition",
        "kind: ClusterRole",
        "kind: ClusterRoleBinding",
        "kind: ServiceAccount",
        "kind: Deployment",
        "kind: Namespace",
    ] {
        assert!(out.contains(kind), "config/default lacks {kind}");
    }
    assert!(out.contains("readOnlyRootFilesystem: true") && out.contains("runAsNonRoot: true"));
    assert!(
        !out.contains("\"*\"") && !out.contains("- '*'"),
        "no wildcard in the RBAC"
    );
    // A server-side dry run needs the namespace to exist for the namespaced objects.
    let ns = kubectl_ok(
        &[
            "create",
            "namespace",
            "keelson-system",
            "--dry-run=client",
            "-o",
            "yaml",
        ],
        None,
    );
    kubectl_ok(&["apply", "-f", "-"], Some(&ns));
    kubectl_ok(
        &[
            "apply",
            "--server-side",
            "--dry-run=server",
            "--force-conflicts",
            "-f",
            "-",
        ],
        Some(&out),
    );
}
