//! The local cluster: started once per test binary (with the CRDs and the operator's RBAC),
//! kubectl and API clients against it, and the API server's own write counters. It creates no
//! test objects; namespaces and operators are [`crate::Ns`]'s and [`crate::operator`]'s.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::wait::wait_sync;

/// The repository's root: the workspace that holds this crate under `crates/`.
pub fn root() -> PathBuf {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    crate_dir
        .ancestors()
        .nth(2)
        .unwrap_or(crate_dir)
        .to_path_buf()
}

/// The `keelson` binary of this build: next to the test executable's `deps/` directory, where
/// cargo puts the binaries that integration tests run.
pub fn keelson_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let dir = exe.parent().expect("deps/");
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("the profile directory")
    } else {
        dir
    };
    dir.join(format!("keelson{}", std::env::consts::EXE_SUFFIX))
}

pub fn kubeconfig() -> PathBuf {
    root().join("target/cluster/kubeconfig")
}

pub fn kubectl_bin() -> PathBuf {
    root().join("target/cluster/bin/kubectl")
}

static CLUSTER: OnceLock<()> = OnceLock::new();

/// Starts the local cluster when it is not up (idempotent), and installs the CRDs. Once per test binary.
pub fn cluster() {
    CLUSTER.get_or_init(|| {
        let out = Command::new(root().join("hack/cluster/up.sh"))
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .status()
            .expect("run hack/cluster/up.sh");
        assert!(
            out.success(),
            "the local cluster did not start: see target/cluster/logs/"
        );
        let o = kubectl(
            &["apply", "--server-side", "--force-conflicts", "-f", "crds/"],
            None,
        );
        assert!(
            o.status.success(),
            "installing CRDs: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        // The operator's namespace, ServiceAccount and RBAC: tests run it as that ServiceAccount.
        let o = kubectl(
            &[
                "apply",
                "--server-side",
                "--force-conflicts",
                "-f",
                "config/manager/namespace.yaml",
            ],
            None,
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let o = kubectl(
            &[
                "apply",
                "--server-side",
                "--force-conflicts",
                "-k",
                "config/rbac",
            ],
            None,
        );
        assert!(
            o.status.success(),
            "installing RBAC: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        // Right after creation a CRD has no conditions yet, which `kubectl wait` reports as an
        // error rather than waiting: poll until every CRD is Established.
        wait_sync(Duration::from_secs(60), || {
            ["notebooks", "trainingjobs", "modeldeployments"]
                .iter()
                .all(|p| {
                    let o = kubectl(
                        &[
                            "get",
                            "crd",
                            &format!("{p}.keelson.dev"),
                            "-o",
                            "jsonpath={.status.conditions[?(@.type=='Established')].status}",
                        ],
                        None,
                    );
                    String::from_utf8_lossy(&o.stdout).trim() == "True"
                })
        });
    });
}

/// Runs the real kubectl against the local cluster.
pub fn kubectl(args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(kubectl_bin());
    cmd.arg("--kubeconfig")
        .arg(kubeconfig())
        .args(args)
        .current_dir(root());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn kubectl");
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    child.wait_with_output().expect("kubectl output")
}

/// kubectl that must succeed; returns stdout.
pub fn kubectl_ok(args: &[&str], stdin: Option<&str>) -> String {
    let o = kubectl(args, stdin);
    assert!(
        o.status.success(),
        "kubectl {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A client of the local cluster, on the current runtime.
pub async fn client() -> Client {
    cluster();
    let kc = Kubeconfig::read_from(kubeconfig()).expect("read kubeconfig");
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig");
    Client::try_from(cfg).expect("client")
}

/// The operator's own identity: its ServiceAccount from config/rbac.
pub const OPERATOR_USER: &str = "system:serviceaccount:keelson-system:keelson";

/// A client that acts as the operator's ServiceAccount (impersonated), so that the API server
/// checks every call of the operator against the RBAC of config/rbac.
pub async fn operator_client() -> Client {
    cluster();
    let kc = Kubeconfig::read_from(kubeconfig()).expect("read kubeconfig");
    let mut cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig");
    cfg.auth_info.impersonate = Some(OPERATOR_USER.into());
    cfg.auth_info.impersonate_groups = Some(vec![
        "system:serviceaccounts".into(),
        "system:serviceaccounts:keelson-system".into(),
        "system:authenticated".into(),
    ]);
    Client::try_from(cfg).expect("client")
}

/// The API server's write requests (POST, PUT, PATCH, DELETE) per resource, from its own /metrics.
pub fn apiserver_writes() -> std::collections::BTreeMap<String, f64> {
    let text = kubectl_ok(&["get", "--raw", "/metrics"], None);
    let mut out = std::collections::BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let label = |k: &str| -> String {
            line.split(&format!("{k}=\""))
                .nth(1)
                .and_then(|s| s.split('"').next())
                .unwrap_or("")
                .to_string()
        };
        let verb = label("verb");
        if !matches!(
            verb.as_str(),
            "POST" | "PUT" | "PATCH" | "DELETE" | "APPLY" | "CREATE" | "UPDATE"
        ) {
            continue;
        }
        let sub = label("subresource");
        let key = format!(
            "{verb} {}{}",
            label("resource"),
            if sub.is_empty() {
                String::new()
            } else {
                format!("/{sub}")
            }
        );
        let v: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.0);
        *out.entry(key).or_insert(0.0) += v;
    }
    out
}

pub fn path_exists(p: &Path) -> bool {
    p.exists()
}
