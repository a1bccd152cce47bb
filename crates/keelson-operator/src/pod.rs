//! From the shared workload pieces to a pod template: mounts in place, GPUs, env, placement and the
//! user's template merged underneath. Written once and used by all three kinds.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
    Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::DeepMerge;

use keelson_api::workload::{VolumeSpec, WorkloadSpec, GPU_PRODUCT_LABEL};

/// Annotation that makes `kubectl logs` and `kubectl exec` pick the main container.
pub const DEFAULT_CONTAINER_ANNOTATION: &str = "kubectl.kubernetes.io/default-container";

/// What a kind adds to the main container on top of the user's workload.
#[derive(Clone, Debug, Default)]
pub struct MainContainer {
    /// Container name (`notebook`, `worker`, `model`).
    pub name: &'static str,
    /// Injected environment; wins over a user variable of the same name.
    pub env: Vec<EnvVar>,
    pub ports: Vec<ContainerPort>,
    /// Extra pod volumes and their mounts (the workspace, the model).
    pub volumes: Vec<Volume>,
    pub mounts: Vec<VolumeMount>,
    pub readiness_probe: Option<Probe>,
}

/// The pod volume and the main container's mount for one in-place data volume.
pub fn volume_and_mount(v: &VolumeSpec) -> (Volume, VolumeMount) {
    let volume = Volume {
        name: v.name.clone(),
        persistent_volume_claim: v.persistent_volume_claim.clone(),
        nfs: v.nfs.clone(),
        host_path: v.host_path.clone(),
        csi: v.csi.clone(),
        empty_dir: v.empty_dir.clone(),
        config_map: v.config_map.clone(),
        secret: v.secret.clone(),
        ..Volume::default()
    };
    let mount = VolumeMount {
        name: v.name.clone(),
        mount_path: v.mount_path.clone(),
        read_only: v.read_only,
        sub_path: v.sub_path.clone(),
        ..VolumeMount::default()
    };
    (volume, mount)
}

/// The main container's resources: the user's requests and limits, plus `count` GPUs on both.
pub fn resources(w: &WorkloadSpec) -> Option<ResourceRequirements> {
    let mut res = w.resources.clone();
    if let Some(g) = w.gpus.as_ref().filter(|g| g.count > 0) {
        let r = res.get_or_insert_with(ResourceRequirements::default);
        let q = Quantity(g.count.to_string());
        r.limits
            .get_or_insert_with(BTreeMap::new)
            .insert(g.resource_name().to_string(), q.clone());
        // Extended resources need requests equal to limits.
        r.requests
            .get_or_insert_with(BTreeMap::new)
            .insert(g.resource_name().to_string(), q);
    }
    res
}

/// Tolerations: the template's, the user's, and the GPU pool taint `<resource>:NoSchedule` when GPUs are asked.
fn tolerations(w: &WorkloadSpec, template: Option<&PodSpec>) -> Option<Vec<Toleration>> {
    let mut out: Vec<Toleration> = template
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default();
    for t in w.tolerations.iter().flatten() {
        if !out.contains(t) {
            out.push(t.clone());
        }
    }
    if let Some(g) = w.gpus.as_ref().filter(|g| g.count > 0) {
        let gpu = Toleration {
            key: Some(g.resource_name().to_string()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Toleration::default()
        };
        if !out.contains(&gpu) {
            out.push(gpu);
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Node selector: the template's, the user's, and the GPU product label.
fn node_selector(w: &WorkloadSpec, template: Option<&PodSpec>) -> Option<BTreeMap<String, String>> {
    let mut out = template
        .and_then(|s| s.node_selector.clone())
        .unwrap_or_default();
    out.extend(w.node_selector.clone().unwrap_or_default());
    if let Some(p) = w
        .gpus
        .as_ref()
        .filter(|g| g.count > 0)
        .and_then(|g| g.product.clone())
    {
        out.insert(GPU_PRODUCT_LABEL.to_string(), p);
    }
    (!out.is_empty()).then_some(out)
}

/// Builds the pod template of a workload. Precedence, lowest first: the user's `template`, the
/// workload fields, then what the kind injects (`main`). `labels` are added to the template's labels.
pub fn pod_template(
    w: &WorkloadSpec,
    main: MainContainer,
    labels: BTreeMap<String, String>,
) -> PodTemplateSpec {
    let base = w.template.clone().unwrap_or_default();
    let base_spec = base.spec.clone().unwrap_or_default();

    let (mut volumes, mut mounts): (Vec<Volume>, Vec<VolumeMount>) =
        w.volumes.iter().flatten().map(volume_and_mount).unzip();
    volumes.extend(main.volumes);
    mounts.extend(main.mounts);

    let mut env = w.env.clone().unwrap_or_default();
    for e in main.env {
        env.retain(|x| x.name != e.name);
        env.push(e);
    }

    let container = Container {
        name: main.name.to_string(),
        image: Some(w.image.clone()),
        command: w.command.clone(),
        args: w.args.clone(),
        env: (!env.is_empty()).then_some(env),
        resources: resources(w),
        ports: (!main.ports.is_empty()).then_some(main.ports),
        volume_mounts: (!mounts.is_empty()).then_some(mounts),
        readiness_probe: main.readiness_probe,
        ..Container::default()
    };

    let ours = PodSpec {
        containers: vec![container],
        volumes: (!volumes.is_empty()).then_some(volumes),
        service_account_name: w.service_account_name.clone(),
        ..PodSpec::default()
    };
    let node_selector = node_selector(w, Some(&base_spec));
    let tolerations = tolerations(w, Some(&base_spec));

    let mut spec = base_spec;
    spec.merge_from(ours);
    spec.node_selector = node_selector;
    spec.tolerations = tolerations;
    // The main container first, so tools that take the first container find it.
    if let Some(i) = spec.containers.iter().position(|c| c.name == main.name) {
        let c = spec.containers.remove(i);
        spec.containers.insert(0, c);
    }

    let mut meta = base.metadata.unwrap_or_default();
    let mut all_labels = meta.labels.take().unwrap_or_default();
    all_labels.extend(labels);
    let mut annotations = meta.annotations.take().unwrap_or_default();
    annotations.insert(
        DEFAULT_CONTAINER_ANNOTATION.to_string(),
        main.name.to_string(),
    );
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(all_labels),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        }),
        spec: Some(spec),
    }
}

/// Shorthand for a plain `name=value` environment variable.
pub fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::SecurityContext;
    use keelson_api::workload::GpuSpec;

    fn workload() -> WorkloadSpec {
        WorkloadSpec {
            image: "img:1".into(),
            ..WorkloadSpec::default()
        }
    }

    fn main() -> MainContainer {
        MainContainer {
            name: "worker",
            ..MainContainer::default()
        }
    }

    fn spec_of(t: &PodTemplateSpec) -> &PodSpec {
        t.spec.as_ref().unwrap()
    }

    #[test]
    fn cpu_only_gets_no_gpu_resources_toleration_or_selector() {
        let t = pod_template(&workload(), main(), BTreeMap::new());
        let s = spec_of(&t);
        assert!(s.tolerations.is_none());
        assert!(s.node_selector.is_none());
        assert!(s.containers[0].resources.is_none());
        // count 0 is the same as absent.
        let mut w = workload();
        w.gpus = Some(GpuSpec {
            count: 0,
            ..GpuSpec::default()
        });
        let t = pod_template(&w, main(), BTreeMap::new());
        assert!(spec_of(&t).tolerations.is_none());
    }

    #[test]
    fn gpus_set_limits_requests_toleration_and_product_selector() {
        struct Case {
            gpus: GpuSpec,
            resource: &'static str,
            selector: Option<&'static str>,
        }
        let cases = [
            Case {
                gpus: GpuSpec {
                    count: 2,
                    ..GpuSpec::default()
                },
                resource: "nvidia.com/gpu",
                selector: None,
            },
            Case {
                gpus: GpuSpec {
                    count: 1,
                    resource: Some("amd.com/gpu".into()),
                    product: Some("MI300X".into()),
                },
                resource: "amd.com/gpu",
                selector: Some("MI300X"),
            },
        ];
        for c in cases {
            let mut w = workload();
            let n = c.gpus.count.to_string();
            w.gpus = Some(c.gpus);
            let t = pod_template(&w, main(), BTreeMap::new());
            let s = spec_of(&t);
            let r = s.containers[0].resources.as_ref().unwrap();
            assert_eq!(r.limits.as_ref().unwrap()[c.resource], Quantity(n.clone()));
            assert_eq!(r.requests.as_ref().unwrap()[c.resource], Quantity(n));
            let tol = &s.tolerations.as_ref().unwrap()[0];
            assert_eq!(tol.key.as_deref(), Some(c.resource));
            assert_eq!(tol.effect.as_deref(), Some("NoSchedule"));
            assert_eq!(tol.operator.as_deref(), Some("Exists"));
            assert_eq!(
                s.node_selector
                    .as_ref()
                    .and_then(|m| m.get(GPU_PRODUCT_LABEL))
                    .map(String::as_str),
                c.selector
            );
        }
    }

    #[test]
    fn volumes_are_mounted_in_place_with_their_source() {
        let mut w = workload();
        w.volumes = Some(vec![
            fixtures::datasets(),
            fixtures::fabric("/mapr/cluster1"),
        ]);
        let t = pod_template(&w, main(), BTreeMap::new());
        let s = spec_of(&t);
        let vols = s.volumes.as_ref().unwrap();
        assert_eq!(
            vols[0].persistent_volume_claim.as_ref().unwrap().claim_name,
            "shared-datasets"
        );
        assert_eq!(vols[1].host_path.as_ref().unwrap().path, "/mapr/cluster1");
        let m = s.containers[0].volume_mounts.as_ref().unwrap();
        assert_eq!(m[0].mount_path, "/data");
        assert_eq!(m[0].read_only, Some(true));
        assert_eq!(m[0].sub_path.as_deref(), Some("imagenet"));
        assert_eq!(m[1].mount_path, "/mapr");
        assert_eq!(m[1].read_only, None);
    }

    #[test]
    fn template_is_merged_under_and_injected_env_wins() {
        let mut w = workload();
        w.env = Some(vec![env("LR", "0.01"), env("RANK", "user")]);
        w.node_selector = Some(BTreeMap::from([("zone".to_string(), "a".to_string())]));
        w.template = Some(PodTemplateSpec {
            metadata: Some(ObjectMeta {
                labels: Some(BTreeMap::from([("team".to_string(), "a".to_string())])),
                ..ObjectMeta::default()
            }),
            spec: Some(PodSpec {
                containers: vec![
                    Container {
                        name: "sidecar".into(),
                        image: Some("proxy".into()),
                        ..Container::default()
                    },
                    Container {
                        name: "worker".into(),
                        image: Some("ignored".into()),
                        security_context: Some(SecurityContext {
                            run_as_non_root: Some(true),
                            ..SecurityContext::default()
                        }),
                        ..Container::default()
                    },
                ],
                node_selector: Some(BTreeMap::from([("pool".to_string(), "x".to_string())])),
                ..PodSpec::default()
            }),
        });
        let mut m = main();
        m.env = vec![env("RANK", "0")];
        let t = pod_template(
            &w,
            m,
            BTreeMap::from([("keelson.dev/rank".to_string(), "0".to_string())]),
        );
        let s = spec_of(&t);
        assert_eq!(s.containers.len(), 2);
        let c = &s.containers[0];
        assert_eq!(c.name, "worker");
        assert_eq!(c.image.as_deref(), Some("img:1"));
        assert_eq!(
            c.security_context.as_ref().unwrap().run_as_non_root,
            Some(true)
        );
        let env = c.env.as_ref().unwrap();
        assert_eq!(env.iter().filter(|e| e.name == "RANK").count(), 1);
        assert_eq!(
            env.iter()
                .find(|e| e.name == "RANK")
                .unwrap()
                .value
                .as_deref(),
            Some("0")
        );
        assert_eq!(s.containers[1].name, "sidecar");
        let ns = s.node_selector.as_ref().unwrap();
        assert_eq!(ns["zone"], "a");
        assert_eq!(ns["pool"], "x");
        let meta = t.metadata.as_ref().unwrap();
        assert_eq!(meta.labels.as_ref().unwrap()["team"], "a");
        assert_eq!(meta.labels.as_ref().unwrap()["keelson.dev/rank"], "0");
        assert_eq!(
            meta.annotations.as_ref().unwrap()[DEFAULT_CONTAINER_ANNOTATION],
            "worker"
        );
    }
}

/// Volumes the kinds' builder tests share: a dataset claim mounted read-only at a sub-path, and a
/// data-fabric directory on the node.
#[cfg(test)]
pub(crate) mod fixtures {
    use k8s_openapi::api::core::v1::{HostPathVolumeSource, PersistentVolumeClaimVolumeSource};
    use keelson_api::workload::VolumeSpec;

    pub fn datasets() -> VolumeSpec {
        VolumeSpec {
            name: "datasets".into(),
            mount_path: "/data".into(),
            read_only: Some(true),
            sub_path: Some("imagenet".into()),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: "shared-datasets".into(),
                read_only: None,
            }),
            ..VolumeSpec::default()
        }
    }

    pub fn fabric(path: &str) -> VolumeSpec {
        VolumeSpec {
            name: "fabric".into(),
            mount_path: "/mapr".into(),
            host_path: Some(HostPathVolumeSource {
                path: path.into(),
                type_: Some("Directory".into()),
            }),
            ..VolumeSpec::default()
        }
    }
}
