//! One namespace per test, deleted when dropped, and what tests put in it: manifests applied
//! server-side, the examples, and hostPath volumes for their claims. It starts no operator and
//! waits for no workload.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::cluster::{cluster, kubectl, kubectl_ok, root};
use crate::wait::wait_sync;

/// Specs the API server accepts but the builders refuse (conditions with a reason, never Ready):
/// a Notebook volume on the workspace's path, and a variant named like the Builtin router.
pub const UNRUNNABLE: &str =
    "# Accepted by the API server, refused by the builder: the workspace and a volume share a path.
apiVersion: keelson.dev/v1alpha1
kind: Notebook
metadata: {name: nb-bad}
spec:
  image: jupyter:1
  workspace: {size: 1Gi}
  volumes:
    - {name: home, mountPath: /home/jovyan, emptyDir: {}}
---
# Accepted by the API server, refused by the builder: `router` names the Builtin router.
apiVersion: keelson.dev/v1alpha1
kind: ModelDeployment
metadata: {name: md-bad}
spec:
  variants:
    - {name: router, image: srv:1, weight: 100}
";

/// Asserts that the API server refuses `yaml` in `ns`, with every one of `needles` in the error.
pub fn refused(ns: &Ns, yaml: &str, needles: &[&str]) {
    let err = ns
        .apply(yaml)
        .expect_err(&format!("accepted but should be refused:\n{yaml}"));
    for n in needles {
        assert!(
            err.contains(n),
            "expected {n:?} in the error:\n{err}\nfor:\n{yaml}"
        );
    }
}

/// A namespace of one test, deleted when dropped.
pub struct Ns {
    pub name: String,
}

impl Ns {
    pub fn new(prefix: &str) -> Ns {
        cluster();
        let name = format!("{prefix}-{}", rand_suffix());
        kubectl_ok(&["create", "namespace", &name], None);
        // Pods need the namespace's default ServiceAccount, made by kube-controller-manager.
        wait_sync(Duration::from_secs(30), || {
            kubectl(&["-n", &name, "get", "serviceaccount", "default"], None)
                .status
                .success()
        });
        Ns { name }
    }

    /// `kubectl apply --server-side` of a YAML document in this namespace; Err(stderr) when refused.
    pub fn apply(&self, yaml: &str) -> Result<String, String> {
        let o = kubectl(
            &[
                "-n",
                &self.name,
                "apply",
                "--server-side",
                "--field-manager=test-user",
                "-f",
                "-",
            ],
            Some(yaml),
        );
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&o.stderr).into_owned())
        }
    }

    pub fn kubectl(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        kubectl_ok(&a, None)
    }

    /// Every manifest of examples/, with a volume for each claim they make.
    pub fn apply_examples(&self) {
        self.volumes_for_examples();
        for f in examples() {
            self.apply(&example(&f))
                .unwrap_or_else(|e| panic!("{f} refused: {e}"));
        }
    }

    /// A volume for each claim that examples/ makes (directly or through a Notebook workspace).
    pub fn volumes_for_examples(&self) {
        for (claim, size) in [
            ("shared-datasets", "100Gi"),
            ("models", "10Gi"),
            ("scorer-models", "5Gi"),
            ("alice-workspace", "10Gi"),
            ("scratch-workspace", "5Gi"),
        ] {
            self.pv_for(claim, size);
        }
    }

    /// A hostPath PersistentVolume pre-bound to claim `pvc` of this namespace.
    pub fn pv_for(&self, pvc: &str, size: &str) {
        let pv = format!("{}-{pvc}", self.name);
        let o = Command::new(root().join("hack/cluster/pv.sh"))
            .args([
                pv.as_str(),
                size,
                "--claim",
                &format!("{}/{pvc}", self.name),
            ])
            .output()
            .expect("pv.sh");
        assert!(
            o.status.success(),
            "pv.sh: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// A `hostPath` PersistentVolume at `path` on one node (`nodeAffinity` to its hostname, so the pod
/// that mounts it lands there), pre-bound to claim `claim` of this namespace. Deleted when dropped.
pub struct NodePv {
    pub name: String,
}

impl Ns {
    /// A [`NodePv`] for claim `claim` of this namespace; `path` must be a directory on `node`.
    pub fn node_pv(&self, claim: &str, size: &str, path: &Path, node: &str) -> NodePv {
        let name = format!("{}-{claim}", self.name);
        let yaml = format!(
            r#"apiVersion: v1
kind: PersistentVolume
metadata:
  name: {name}
  labels: {{keelson.dev/test-volume: "true"}}
spec:
  capacity: {{storage: {size}}}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  volumeMode: Filesystem
  storageClassName: ""
  hostPath: {{path: "{path}", type: Directory}}
  claimRef: {{namespace: {ns}, name: {claim}}}
  nodeAffinity:
    required:
      nodeSelectorTerms:
      - matchExpressions:
        - {{key: kubernetes.io/hostname, operator: In, values: [{node}]}}
"#,
            path = path.display(),
            ns = self.name,
        );
        kubectl_ok(&["apply", "-f", "-"], Some(&yaml));
        NodePv { name }
    }
}

impl Drop for NodePv {
    fn drop(&mut self) {
        if std::env::var("KEEP_NAMESPACES").is_err() {
            let _ = kubectl(&["delete", "pv", &self.name, "--wait=false"], None);
        }
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        if std::env::var("KEEP_NAMESPACES").is_err() {
            let _ = kubectl(&["delete", "namespace", &self.name, "--wait=false"], None);
        }
    }
}

fn rand_suffix() -> String {
    use rand::Rng;
    let mut r = rand::rng();
    (0..5)
        .map(|_| (b'a' + r.random_range(0..26)) as char)
        .collect()
}

/// Makes a pod exit with `code` the way a kubelet reports it (kwok stage driven by an annotation,
/// see docs/cluster.md).
pub fn exit_pod(ns: &str, pod: &str, code: i32) {
    kubectl_ok(
        &[
            "-n",
            ns,
            "annotate",
            "--overwrite",
            "pod",
            pod,
            &format!("keelson.dev/sim-exit-code={code}"),
        ],
        None,
    );
}

/// Reads a manifest from examples/.
pub fn example(file: &str) -> String {
    std::fs::read_to_string(root().join("examples").join(file)).unwrap()
}

/// Every example file name.
pub fn examples() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    v.sort();
    v
}
