//! The spec pieces shared by all three kinds: image, command, env, resources, GPUs, volumes mounted in
//! place, scheduling hints and the pod template escape hatch.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    CSIVolumeSource, ConfigMapVolumeSource, EmptyDirVolumeSource, EnvVar, HostPathVolumeSource,
    NFSVolumeSource, PersistentVolumeClaimVolumeSource, PodTemplateSpec, ResourceRequirements,
    SecretVolumeSource, Toleration,
};
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::BuildError;

/// Default extended resource name for GPUs.
pub const DEFAULT_GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Node label that carries the GPU product name (NVIDIA GPU feature discovery).
pub const GPU_PRODUCT_LABEL: &str = "nvidia.com/gpu.product";

/// The container, its data and its placement: the same YAML shape in every Keelson kind.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSpec {
    /// Container image to run, e.g. `ghcr.io/acme/trainer:1.4`. Required, at most 1024 characters.
    #[schemars(length(min = 1, max = 1024))]
    pub image: String,

    /// Entrypoint override (the image's ENTRYPOINT when absent), e.g. `["python"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,

    /// Arguments to the entrypoint (the image's CMD when absent), e.g. `["train.py", "--epochs=10"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,

    /// Environment variables of the main container (core/v1 EnvVar; `valueFrom` is allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<EnvVar>>,

    /// CPU and memory requests and limits of the main container (core/v1 ResourceRequirements).
    /// GPUs go in `gpus`, not here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// GPUs for the main container. Absent (or `count: 0`) means a CPU-only workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<GpuSpec>,

    /// Data mounted in place (PVC, NFS, hostPath for a node-level FUSE mount, CSI, ...), never copied.
    /// Names and mount paths are unique in the list (at most 32 volumes); server-side apply merges the
    /// list by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(
        merge_strategy = ListMerge::Map(vec!["name".into()]),
        validation = Rule::new("self.all(v, self.exists_one(w, w.mountPath == v.mountPath))").message("volumes[].mountPath must be unique")
    )]
    pub volumes: Option<Vec<VolumeSpec>>,

    /// Node labels the pods must match, e.g. `{topology.kubernetes.io/zone: eu-west-1a}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// Tolerations added to the pods (the GPU taint toleration is added for you).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,

    /// ServiceAccount the pods run as (the namespace's `default` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,

    /// A core/v1 PodTemplateSpec merged under the fields above: the escape hatch for anything not
    /// modelled (sidecars, securityContext, affinity, ...). Fields set above win over the template.
    /// The main container is the one named as the kind's main container (`notebook`, `worker` or
    /// `model`); other containers are kept as sidecars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<PodTemplateSpec>,
}

impl WorkloadSpec {
    /// GPUs per pod (0 when absent).
    pub fn gpu_count(&self) -> i32 {
        self.gpus.as_ref().map(|g| g.count).unwrap_or(0)
    }

    /// Checks what the schema cannot: that every quantity in `resources` is one. The CRD types them
    /// as int-or-string, as core/v1 does, and the API server refuses a pod or Deployment built from
    /// `cpu: x` (a Deployment's server-side apply with a 500). `field` is where this workload is in
    /// the spec: `spec`, or `spec.variants[1]`.
    pub fn check_resources(&self, field: &str) -> Result<(), BuildError> {
        match &self.resources {
            Some(r) => check_quantities(r, &format!("{field}.resources")),
            None => Ok(()),
        }
    }
}

/// Checks that every quantity of `r` is one; `field` is where `r` is in the spec, e.g.
/// `spec.traffic.routerPod.resources`.
pub fn check_quantities(r: &ResourceRequirements, field: &str) -> Result<(), BuildError> {
    for (which, map) in [("limits", &r.limits), ("requests", &r.requests)] {
        for (name, q) in map.iter().flatten() {
            if parse_quantity(&q.0).is_none() {
                return Err(BuildError::new(
                    "InvalidQuantity",
                    format!("{field}.{which}.{name}"),
                    format!(
                        "{:?} is not a quantity; write one such as 500m, 2 or 8Gi",
                        q.0
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// GPUs asked for declaratively.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GpuSpec {
    /// Number of GPUs per pod, an integer >= 0 (0 = none). Set on both limits and requests.
    #[schemars(range(min = 0))]
    pub count: i32,

    /// Extended resource name of the GPU. Default `nvidia.com/gpu`; e.g. `amd.com/gpu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub resource: Option<String>,

    /// GPU product the pods must land on, e.g. `NVIDIA-A100-SXM4-80GB`; becomes a node selector on
    /// `nvidia.com/gpu.product`, so it is a label value: at most 63 letters, digits, '-', '_' and
    /// '.', starting and ending with a letter or digit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 63),
        regex(pattern = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
    )]
    pub product: Option<String>,
}

impl GpuSpec {
    /// The extended resource name, with its default.
    pub fn resource_name(&self) -> &str {
        self.resource.as_deref().unwrap_or(DEFAULT_GPU_RESOURCE)
    }
}

/// One volume mounted in place into the main container. Exactly one source is set, with the same
/// field names as a core/v1 Volume.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "[has(self.persistentVolumeClaim), has(self.nfs), has(self.hostPath), has(self.csi), has(self.emptyDir), has(self.configMap), has(self.secret)].filter(x, x).size() == 1"
).message("volumes[] must set exactly one source: persistentVolumeClaim, nfs, hostPath, csi, emptyDir, configMap or secret"))]
pub struct VolumeSpec {
    /// Volume name, a DNS-1123 label (lower-case letters, digits and '-'), unique in the list.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,

    /// Absolute path where the volume appears in the container, e.g. `/data`; unique in the list.
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("volumes[].mountPath must be an absolute path"))]
    pub mount_path: String,

    /// Mount read-only. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,

    /// Sub-path inside the volume to mount instead of its root, e.g. `imagenet`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_path: Option<String>,

    /// An existing PersistentVolumeClaim in the same namespace, e.g. `{claimName: shared-datasets}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<PersistentVolumeClaimVolumeSource>,

    /// An NFS export, e.g. `{server: nfs.example.internal, path: /exports/data}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nfs: Option<NFSVolumeSource>,

    /// A directory on the node, e.g. the node-level FUSE mount of a data fabric
    /// (`{path: /mapr/cluster1/projects, type: Directory}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPathVolumeSource>,

    /// A CSI volume (ephemeral inline), e.g. a data-fabric or object-store CSI driver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csi: Option<CSIVolumeSource>,

    /// Scratch space that lives as long as the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_dir: Option<EmptyDirVolumeSource>,

    /// A ConfigMap's keys as files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapVolumeSource>,

    /// A Secret's keys as files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretVolumeSource>,
}

/// Parses a Kubernetes quantity to a float; `None` for anything that is not one.
pub fn parse_quantity(s: &str) -> Option<f64> {
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    if num.is_empty() {
        return None;
    }
    let n: f64 = num.parse().ok()?;
    let mult = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0_f64.powi(2),
        "Gi" => 1024.0_f64.powi(3),
        "Ti" => 1024.0_f64.powi(4),
        "Pi" => 1024.0_f64.powi(5),
        "Ei" => 1024.0_f64.powi(6),
        s if s.starts_with(['e', 'E']) => 10f64.powi(s[1..].parse().ok()?),
        _ => return None,
    };
    Some(n * mult)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn with(requests: &[(&str, &str)], limits: &[(&str, &str)]) -> WorkloadSpec {
        let map = |kv: &[(&str, &str)]| {
            Some(
                kv.iter()
                    .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
                    .collect(),
            )
        };
        WorkloadSpec {
            image: "img:1".into(),
            resources: Some(ResourceRequirements {
                requests: map(requests),
                limits: map(limits),
                ..ResourceRequirements::default()
            }),
            ..WorkloadSpec::default()
        }
    }

    #[test]
    fn a_resource_that_is_not_a_quantity_names_its_field() {
        let ok = with(&[("cpu", "500m"), ("memory", "8Gi")], &[("memory", "1e3")]);
        assert_eq!(ok.check_resources("spec"), Ok(()));
        assert_eq!(WorkloadSpec::default().check_resources("spec"), Ok(()));
        let bad = with(&[("cpu", "2")], &[("memory", "x")]);
        let e = bad.check_resources("spec.variants[1]").unwrap_err();
        assert_eq!(e.reason, "InvalidQuantity");
        assert_eq!(e.field, "spec.variants[1].resources.limits.memory");
        assert!(e.message.contains("\"x\""), "{e}");
    }
}
