//! The real node of the local cluster (`REAL_NODE=1 make cluster`, docs/real-node.md): its name,
//! the placement that puts a workload on it, and the check that it is Ready with the images a
//! suite needs. It never starts or changes the node.

use std::process::Command;
use std::sync::OnceLock;

use crate::cluster::{cluster, kubectl};

/// The real node of the local cluster (`REAL_NODE=1 make cluster`, docs/real-node.md).
pub const REAL_NODE: &str = "keelson-node-0";

/// The YAML lines that put a workload on the real node: its label and its taint.
pub const REAL_NODE_PLACEMENT: &str = r#"nodeSelector: {keelson.dev/real-node: "true"}
tolerations: [{key: keelson.dev/real-node, operator: Exists, effect: NoSchedule}]"#;

/// Panics, with what to run, unless the real node is registered, Ready and has `images` (e.g.
/// `keelson.dev/trainer:dev`) in its containerd. Once per test binary.
pub fn real_node(images: &[&str]) {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        cluster();
        let o = kubectl(&["get", "node", REAL_NODE, "-o", "json"], None);
        assert!(
            o.status.success(),
            "no real node: node {REAL_NODE} is not in the cluster ({}); run REAL_NODE=1 make cluster",
            String::from_utf8_lossy(&o.stderr).trim()
        );
        let node: serde_json::Value = serde_json::from_slice(&o.stdout).expect("node JSON");
        let ready = node["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        assert!(
            ready,
            "the real node {REAL_NODE} is not Ready; run REAL_NODE=1 make cluster (it repairs a stopped node)"
        );
        // The kubelet lists the node's images in its status from a cache it refreshes every 30 s,
        // so an image imported just before the tests may be missing there for a while. What a
        // pod with `imagePullPolicy: Never` needs is the image in the node's containerd: ask it.
        let mut missing: Vec<&str> = images
            .iter()
            .copied()
            .filter(|want| !node_status_images(&node).iter().any(|h| h.ends_with(want)))
            .collect();
        if !missing.is_empty() {
            let in_containerd = containerd_images();
            missing.retain(|want| !in_containerd.iter().any(|h| h.ends_with(want)));
        }
        assert!(
            missing.is_empty(),
            "images {missing:?} are not on the real node {REAL_NODE} (neither in its status nor in its containerd); run make images (stand-ins) or make image (keelson)"
        );
    });
}

/// The real node's containerd socket (hack/cluster/lib.sh `CONTAINERD_SOCK`).
pub const REAL_NODE_CONTAINERD_SOCK: &str = "/run/keelson-containerd/containerd.sock";

fn node_status_images(node: &serde_json::Value) -> Vec<String> {
    node["status"]["images"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|i| i["names"].as_array().into_iter().flatten())
        .filter_map(|n| n.as_str().map(str::to_string))
        .collect()
}

/// The image names in the real node's containerd (namespace `k8s.io`, the kubelet's); empty when
/// `ctr` cannot be run.
fn containerd_images() -> Vec<String> {
    Command::new("ctr")
        .args([
            "--address",
            REAL_NODE_CONTAINERD_SOCK,
            "-n",
            "k8s.io",
            "images",
            "ls",
            "-q",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}
