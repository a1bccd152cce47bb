//! TrainingJob spec -> children: the headless Service and one Pod per rank. Pure: no client, no clock,
//! no randomness.
//!
//! Every rank resolves as `<name>-worker-<rank>.<name>.<ns>.svc` (pod `hostname` + `subdomain` behind
//! the headless Service, which publishes not-ready addresses so that ranks find each other while they
//! start). The rendezvous environment of DESIGN §1.3 is injected into the main container `worker`
//! and wins over a user variable of the same name.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ContainerPort, EnvVar, Pod, PodSpec, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::error::BuildError;
use crate::pod::{env, pod_template, MainContainer};
use keelson_api::meta::Owner;
use keelson_api::trainingjob::{
    Framework, TrainingJob, JAX_PORT, MASTER_PORT, MAX_WORKERS, TF_PORT,
};

/// Name of the main container of every worker pod.
pub const CONTAINER: &str = "worker";
/// Label carrying a worker pod's rank.
pub const LABEL_RANK: &str = "keelson.dev/rank";
/// Label Kueue reads the queue of a workload from.
pub const LABEL_QUEUE: &str = "kueue.x-k8s.io/queue-name";
/// Longest job name whose rank hostnames (`<name>-worker-<rank>`) stay DNS labels of at most 63
/// characters for every rank below [`MAX_WORKERS`].
pub const MAX_NAME_LEN: usize = 51;

/// Port names on the Service and the main container (at most 15 characters each).
const PORT_RENDEZVOUS: &str = "rendezvous";
const PORT_TENSORFLOW: &str = "tensorflow";
const PORT_JAX: &str = "jax-coordinator";

/// Every child a TrainingJob wants.
#[derive(Clone, Debug, PartialEq)]
pub struct Children {
    /// The headless Service `<name>` that gives each rank its DNS name.
    pub service: Service,
    /// One pod per rank, index = rank. Which of them are created is decided by
    /// [`super::status::decide`]; pods are created once and never updated.
    pub pods: Vec<Pod>,
}

/// Name of the pod of `rank`.
pub fn pod_name(job_name: &str, rank: i32) -> String {
    format!("{job_name}-worker-{rank}")
}

/// The DNS name of `rank`: `<name>-worker-<rank>.<name>.<ns>.svc`.
pub fn host(owner: &Owner, rank: i32) -> String {
    format!(
        "{}.{}.{}.svc",
        pod_name(&owner.name, rank),
        owner.name,
        owner.namespace
    )
}

/// The rank a pod name stands for, when it is a worker pod name of `job_name`.
pub fn rank_of(job_name: &str, pod_name: &str) -> Option<i32> {
    let digits = pod_name.strip_prefix(job_name)?.strip_prefix("-worker-")?;
    // Canonical decimal only: `-worker-01` is not rank 1.
    let rank: i32 = digits.parse().ok()?;
    (rank >= 0 && rank.to_string() == digits).then_some(rank)
}

/// The framework with its default.
pub fn framework(job: &TrainingJob) -> Framework {
    job.spec.framework.unwrap_or_default()
}

/// The ports the framework listens on, as (name, port): the rendezvous always, plus the TensorFlow
/// worker port or the JAX coordinator port.
fn ports(fw: Framework) -> Vec<(&'static str, i32)> {
    let mut out = vec![(PORT_RENDEZVOUS, MASTER_PORT)];
    match fw {
        Framework::TensorFlow => out.push((PORT_TENSORFLOW, TF_PORT)),
        Framework::Jax => out.push((PORT_JAX, JAX_PORT)),
        Framework::PyTorch | Framework::Generic => {}
    }
    out
}

/// The environment injected into the main container of `rank` (DESIGN §1.3).
pub fn rendezvous_env(job: &TrainingJob, owner: &Owner, rank: i32) -> Vec<EnvVar> {
    let workers = job.spec.workers;
    let master = host(owner, 0);
    let mut out = vec![
        env("KEELSON_JOB_NAME", owner.name.clone()),
        env("WORLD_SIZE", workers.to_string()),
        env("RANK", rank.to_string()),
        env("NODE_RANK", rank.to_string()),
        env("MASTER_ADDR", master.clone()),
        env("MASTER_PORT", MASTER_PORT.to_string()),
    ];
    match framework(job) {
        Framework::PyTorch => {
            let nproc = job.spec.workload.gpu_count().max(1);
            out.extend([
                env("PET_NNODES", workers.to_string()),
                env("PET_NODE_RANK", rank.to_string()),
                env("PET_NPROC_PER_NODE", nproc.to_string()),
                env("PET_MASTER_ADDR", master),
                env("PET_MASTER_PORT", MASTER_PORT.to_string()),
            ]);
        }
        Framework::TensorFlow => {
            let cluster: Vec<String> = (0..workers)
                .map(|r| format!("{}:{TF_PORT}", host(owner, r)))
                .collect();
            let tf_config = serde_json::json!({
                "cluster": {"worker": cluster},
                "task": {"type": "worker", "index": rank},
            });
            out.push(env("TF_CONFIG", tf_config.to_string()));
        }
        Framework::Jax => {
            out.extend([
                env("JAX_COORDINATOR_ADDRESS", format!("{master}:{JAX_PORT}")),
                env("JAX_NUM_PROCESSES", workers.to_string()),
                env("JAX_PROCESS_ID", rank.to_string()),
            ]);
        }
        Framework::Generic => {}
    }
    out
}

/// Checks what the schema cannot express for every way the object may reach us (a CRD installed
/// without its validation, an old API server).
fn validate(job: &TrainingJob, owner: &Owner) -> Result<(), BuildError> {
    let workers = job.spec.workers;
    if !(1..=MAX_WORKERS).contains(&workers) {
        return Err(BuildError::new(
            "InvalidWorkers",
            "spec.workers",
            format!("must be between 1 and {MAX_WORKERS}, got {workers}"),
        ));
    }
    job.spec.workload.check_resources("spec")?;
    if owner.name.len() > MAX_NAME_LEN {
        return Err(BuildError::new(
            "NameTooLong",
            "metadata.name",
            format!(
                "must be at most {MAX_NAME_LEN} characters so that every rank's hostname <name>-worker-<rank> is a DNS label; re-create the job with a shorter name"
            ),
        ));
    }
    Ok(())
}

/// Builds the children of `job`.
pub fn build(job: &TrainingJob, owner: &Owner) -> Result<Children, BuildError> {
    validate(job, owner)?;
    let spec = &job.spec;
    let fw = framework(job);
    let labels = owner.labels();

    let service = Service {
        metadata: owner.child_meta(&owner.name),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(labels.clone()),
            ports: Some(
                ports(fw)
                    .into_iter()
                    .map(|(name, port)| ServicePort {
                        name: Some(name.into()),
                        port,
                        target_port: Some(IntOrString::Int(port)),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };

    let scheduling = spec.scheduling.clone().unwrap_or_default();
    let pods = (0..spec.workers)
        .map(|rank| {
            let name = pod_name(&owner.name, rank);
            let mut pod_labels: BTreeMap<String, String> = labels.clone();
            pod_labels.insert(LABEL_RANK.into(), rank.to_string());
            super::shape::stamp(job, &mut pod_labels);
            if let Some(q) = &scheduling.queue {
                pod_labels.insert(LABEL_QUEUE.into(), q.clone());
            }
            let main = MainContainer {
                name: CONTAINER,
                env: rendezvous_env(job, owner, rank),
                ports: ports(fw)
                    .into_iter()
                    .map(|(name, port)| ContainerPort {
                        name: Some(name.into()),
                        container_port: port,
                        ..ContainerPort::default()
                    })
                    .collect(),
                ..MainContainer::default()
            };
            let template = pod_template(&spec.workload, main, pod_labels);
            let tmeta = template.metadata.unwrap_or_default();
            let mut meta = owner.child_meta(&name);
            meta.labels = tmeta.labels;
            meta.annotations = tmeta.annotations;
            super::gang::mark(job, &owner.name, &mut meta);
            let mut pod_spec: PodSpec = template.spec.unwrap_or_default();
            // The operator owns restarts: it counts them against backoffLimit and applies
            // restartPolicy ExitCode, so the kubelet never restarts a worker in place.
            pod_spec.restart_policy = Some("Never".into());
            pod_spec.hostname = Some(name);
            pod_spec.subdomain = Some(owner.name.clone());
            if let Some(s) = &scheduling.scheduler_name {
                pod_spec.scheduler_name = Some(s.clone());
            }
            if let Some(p) = &scheduling.priority_class_name {
                pod_spec.priority_class_name = Some(p.clone());
            }
            Pod {
                metadata: meta,
                spec: Some(pod_spec),
                ..Pod::default()
            }
        })
        .collect();

    Ok(Children { service, pods })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::pod::DEFAULT_CONTAINER_ANNOTATION;
    use k8s_openapi::api::core::v1::{Container, PodTemplateSpec};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use keelson_api::trainingjob::{Scheduling, TrainingJobSpec};
    use keelson_api::workload::{GpuSpec, WorkloadSpec, GPU_PRODUCT_LABEL};
    use serde_json::Value;

    pub(crate) fn job(spec: TrainingJobSpec) -> (TrainingJob, Owner) {
        let mut j = TrainingJob::new("resnet", spec);
        j.metadata.namespace = Some("team-a".into());
        j.metadata.uid = Some("uid-tj".into());
        j.metadata.generation = Some(1);
        let owner = Owner::of(&j).unwrap();
        (j, owner)
    }

    fn spec(framework: Framework, workers: i32) -> TrainingJobSpec {
        TrainingJobSpec {
            framework: Some(framework),
            workers,
            workload: WorkloadSpec {
                image: "ghcr.io/acme/trainer:1.4".into(),
                ..WorkloadSpec::default()
            },
            ..TrainingJobSpec::default()
        }
    }

    fn env_of(pod: &Pod) -> BTreeMap<String, String> {
        pod.spec.as_ref().unwrap().containers[0]
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
            .collect()
    }

    #[test]
    fn names_and_ranks_round_trip() {
        assert_eq!(pod_name("resnet", 3), "resnet-worker-3");
        assert_eq!(rank_of("resnet", "resnet-worker-3"), Some(3));
        assert_eq!(rank_of("resnet", "resnet-worker-03"), None);
        assert_eq!(rank_of("resnet", "resnet-worker--1"), None);
        assert_eq!(rank_of("resnet", "resnet-worker-"), None);
        assert_eq!(rank_of("resnet", "resnet2-worker-1"), None);
        assert_eq!(rank_of("resnet", "other-worker-1"), None);
    }

    #[test]
    fn service_is_headless_and_publishes_not_ready_ranks() {
        struct Case {
            fw: Framework,
            ports: &'static [(&'static str, i32)],
        }
        let cases = [
            Case {
                fw: Framework::Generic,
                ports: &[("rendezvous", 29500)],
            },
            Case {
                fw: Framework::PyTorch,
                ports: &[("rendezvous", 29500)],
            },
            Case {
                fw: Framework::TensorFlow,
                ports: &[("rendezvous", 29500), ("tensorflow", 2222)],
            },
            Case {
                fw: Framework::Jax,
                ports: &[("rendezvous", 29500), ("jax-coordinator", 1234)],
            },
        ];
        for c in cases {
            let (j, owner) = job(spec(c.fw, 2));
            let children = build(&j, &owner).unwrap();
            let svc = &children.service;
            assert_eq!(svc.metadata.name.as_deref(), Some("resnet"));
            let s = svc.spec.as_ref().unwrap();
            assert_eq!(s.cluster_ip.as_deref(), Some("None"), "{:?}", c.fw);
            assert_eq!(s.publish_not_ready_addresses, Some(true));
            assert_eq!(s.selector.as_ref(), Some(&owner.labels()));
            let got: Vec<(String, i32)> = s
                .ports
                .iter()
                .flatten()
                .map(|p| (p.name.clone().unwrap(), p.port))
                .collect();
            let want: Vec<(String, i32)> =
                c.ports.iter().map(|(n, p)| (n.to_string(), *p)).collect();
            assert_eq!(got, want, "{:?}", c.fw);
            // The container exposes the same ports, and every pod is selected by the Service.
            for pod in &children.pods {
                let cports: Vec<i32> = pod.spec.as_ref().unwrap().containers[0]
                    .ports
                    .iter()
                    .flatten()
                    .map(|p| p.container_port)
                    .collect();
                assert_eq!(cports, c.ports.iter().map(|p| p.1).collect::<Vec<_>>());
                let pl = pod.metadata.labels.as_ref().unwrap();
                assert!(s
                    .selector
                    .as_ref()
                    .unwrap()
                    .iter()
                    .all(|(k, v)| pl.get(k) == Some(v)));
            }
        }
    }

    #[test]
    fn one_pod_per_rank_with_dns_identity_labels_and_owner() {
        let (j, owner) = job(spec(Framework::Generic, 3));
        let children = build(&j, &owner).unwrap();
        assert_eq!(children.pods.len(), 3);
        for (rank, pod) in children.pods.iter().enumerate() {
            let name = format!("resnet-worker-{rank}");
            assert_eq!(pod.metadata.name.as_deref(), Some(name.as_str()));
            assert_eq!(pod.metadata.namespace.as_deref(), Some("team-a"));
            let ps = pod.spec.as_ref().unwrap();
            assert_eq!(ps.hostname.as_deref(), Some(name.as_str()));
            assert_eq!(ps.subdomain.as_deref(), Some("resnet"));
            assert_eq!(ps.restart_policy.as_deref(), Some("Never"));
            assert_eq!(ps.containers[0].name, CONTAINER);
            assert_eq!(
                ps.containers[0].image.as_deref(),
                Some("ghcr.io/acme/trainer:1.4")
            );
            let l = pod.metadata.labels.as_ref().unwrap();
            assert_eq!(l["app.kubernetes.io/managed-by"], "keelson");
            assert_eq!(l["keelson.dev/owner-kind"], "TrainingJob");
            assert_eq!(l["keelson.dev/owner-name"], "resnet");
            assert_eq!(l[LABEL_RANK], rank.to_string());
            assert!(!l.contains_key(LABEL_QUEUE));
            assert_eq!(
                pod.metadata.annotations.as_ref().unwrap()[DEFAULT_CONTAINER_ANNOTATION],
                CONTAINER
            );
            let r = &pod.metadata.owner_references.as_ref().unwrap()[0];
            assert_eq!(
                (r.kind.as_str(), r.name.as_str(), r.uid.as_str()),
                ("TrainingJob", "resnet", "uid-tj")
            );
            assert_eq!(r.controller, Some(true));
            assert!(ps.scheduler_name.is_none());
            assert!(ps.priority_class_name.is_none());
            assert!(ps.tolerations.is_none());
            assert!(ps.node_selector.is_none());
        }
        let r = &children.service.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(r.uid, "uid-tj");
    }

    #[test]
    fn env_per_framework() {
        const MASTER: &str = "resnet-worker-0.resnet.team-a.svc";
        let master = MASTER;
        struct Case {
            fw: Framework,
            gpus: i32,
            present: &'static [(&'static str, &'static str)],
            absent: &'static [&'static str],
        }
        let cases = [
            Case {
                fw: Framework::Generic,
                gpus: 0,
                present: &[],
                absent: &["PET_NNODES", "TF_CONFIG", "JAX_COORDINATOR_ADDRESS"],
            },
            Case {
                fw: Framework::PyTorch,
                gpus: 8,
                present: &[
                    ("PET_NNODES", "3"),
                    ("PET_NODE_RANK", "2"),
                    ("PET_NPROC_PER_NODE", "8"),
                    ("PET_MASTER_ADDR", MASTER),
                    ("PET_MASTER_PORT", "29500"),
                ],
                absent: &["TF_CONFIG", "JAX_COORDINATOR_ADDRESS"],
            },
            Case {
                fw: Framework::PyTorch,
                gpus: 0,
                present: &[("PET_NPROC_PER_NODE", "1")],
                absent: &[],
            },
            Case {
                fw: Framework::Jax,
                gpus: 1,
                present: &[
                    (
                        "JAX_COORDINATOR_ADDRESS",
                        "resnet-worker-0.resnet.team-a.svc:1234",
                    ),
                    ("JAX_NUM_PROCESSES", "3"),
                    ("JAX_PROCESS_ID", "2"),
                ],
                absent: &["PET_NNODES", "TF_CONFIG"],
            },
            Case {
                fw: Framework::TensorFlow,
                gpus: 1,
                present: &[],
                absent: &["PET_NNODES", "JAX_COORDINATOR_ADDRESS"],
            },
        ];
        for c in cases {
            let mut s = spec(c.fw, 3);
            s.workload.gpus = Some(GpuSpec {
                count: c.gpus,
                ..GpuSpec::default()
            });
            let (j, owner) = job(s);
            let pod = &build(&j, &owner).unwrap().pods[2];
            let e = env_of(pod);
            for (k, v) in [
                ("KEELSON_JOB_NAME", "resnet"),
                ("WORLD_SIZE", "3"),
                ("RANK", "2"),
                ("NODE_RANK", "2"),
                ("MASTER_ADDR", master),
                ("MASTER_PORT", "29500"),
            ]
            .iter()
            .chain(c.present)
            {
                assert_eq!(e.get(*k).map(String::as_str), Some(*v), "{:?} {k}", c.fw);
            }
            for k in c.absent {
                assert!(!e.contains_key(*k), "{:?} must not set {k}", c.fw);
            }
        }
    }

    #[test]
    fn tf_config_lists_every_rank_and_names_the_task() {
        let (j, owner) = job(spec(Framework::TensorFlow, 3));
        let pods = build(&j, &owner).unwrap().pods;
        for (rank, pod) in pods.iter().enumerate() {
            let tf: Value = serde_json::from_str(&env_of(pod)["TF_CONFIG"]).unwrap();
            assert_eq!(
                tf["cluster"]["worker"],
                serde_json::json!([
                    "resnet-worker-0.resnet.team-a.svc:2222",
                    "resnet-worker-1.resnet.team-a.svc:2222",
                    "resnet-worker-2.resnet.team-a.svc:2222",
                ])
            );
            assert_eq!(tf["task"]["type"], "worker");
            assert_eq!(tf["task"]["index"], rank);
            assert_eq!(tf.as_object().unwrap().len(), 2);
        }
    }

    #[test]
    fn injected_env_wins_over_the_users() {
        let mut s = spec(Framework::PyTorch, 2);
        s.workload.env = Some(vec![env("RANK", "7"), env("LR", "0.01")]);
        let (j, owner) = job(s);
        let pod = &build(&j, &owner).unwrap().pods[1];
        let vars = pod.spec.as_ref().unwrap().containers[0]
            .env
            .as_ref()
            .unwrap();
        assert_eq!(vars.iter().filter(|e| e.name == "RANK").count(), 1);
        let e = env_of(pod);
        assert_eq!(e["RANK"], "1");
        assert_eq!(e["LR"], "0.01");
    }

    #[test]
    fn data_in_place_gpus_and_placement() {
        let mut s = spec(Framework::PyTorch, 2);
        s.workload.gpus = Some(GpuSpec {
            count: 4,
            product: Some("NVIDIA-A100-SXM4-80GB".into()),
            ..GpuSpec::default()
        });
        s.workload.node_selector = Some([("pool".to_string(), "train".to_string())].into());
        s.workload.volumes = Some(vec![
            crate::pod::fixtures::datasets(),
            crate::pod::fixtures::fabric("/mapr/cluster1/projects"),
        ]);
        let (j, owner) = job(s);
        for pod in build(&j, &owner).unwrap().pods {
            let ps = pod.spec.unwrap();
            let c = &ps.containers[0];
            let res = c.resources.as_ref().unwrap();
            assert_eq!(
                res.limits.as_ref().unwrap()["nvidia.com/gpu"],
                Quantity("4".into())
            );
            assert_eq!(
                res.requests.as_ref().unwrap()["nvidia.com/gpu"],
                Quantity("4".into())
            );
            let tol = ps.tolerations.as_ref().unwrap();
            assert!(tol
                .iter()
                .any(|t| t.key.as_deref() == Some("nvidia.com/gpu")
                    && t.effect.as_deref() == Some("NoSchedule")
                    && t.operator.as_deref() == Some("Exists")));
            let sel = ps.node_selector.as_ref().unwrap();
            assert_eq!(sel[GPU_PRODUCT_LABEL], "NVIDIA-A100-SXM4-80GB");
            assert_eq!(sel["pool"], "train");

            let vols = ps.volumes.as_ref().unwrap();
            let data = vols.iter().find(|v| v.name == "datasets").unwrap();
            assert_eq!(
                data.persistent_volume_claim.as_ref().unwrap().claim_name,
                "shared-datasets"
            );
            let fabric = vols.iter().find(|v| v.name == "fabric").unwrap();
            assert_eq!(
                fabric.host_path.as_ref().unwrap().path,
                "/mapr/cluster1/projects"
            );
            let mounts = c.volume_mounts.as_ref().unwrap();
            let m = mounts.iter().find(|m| m.name == "datasets").unwrap();
            assert_eq!(m.mount_path, "/data");
            assert_eq!(m.read_only, Some(true));
            assert_eq!(m.sub_path.as_deref(), Some("imagenet"));
            let m = mounts.iter().find(|m| m.name == "fabric").unwrap();
            assert_eq!(m.mount_path, "/mapr");
            assert_eq!(m.read_only, None);
        }
    }

    #[test]
    fn scheduling_sets_queue_label_scheduler_and_priority() {
        struct Case {
            scheduling: Option<Scheduling>,
            queue: Option<&'static str>,
            scheduler: Option<&'static str>,
            priority: Option<&'static str>,
        }
        let cases = [
            Case {
                scheduling: None,
                queue: None,
                scheduler: None,
                priority: None,
            },
            Case {
                scheduling: Some(Scheduling {
                    scheduler_name: Some("volcano".into()),
                    priority_class_name: Some("high".into()),
                    queue: Some("team-a".into()),
                    gang: None,
                }),
                queue: Some("team-a"),
                scheduler: Some("volcano"),
                priority: Some("high"),
            },
            Case {
                scheduling: Some(Scheduling {
                    queue: Some("batch".into()),
                    ..Scheduling::default()
                }),
                queue: Some("batch"),
                scheduler: None,
                priority: None,
            },
        ];
        for c in cases {
            let mut s = spec(Framework::Generic, 2);
            s.scheduling = c.scheduling;
            let (j, owner) = job(s);
            for pod in build(&j, &owner).unwrap().pods {
                let l = pod.metadata.labels.as_ref().unwrap();
                assert_eq!(l.get(LABEL_QUEUE).map(String::as_str), c.queue);
                let ps = pod.spec.as_ref().unwrap();
                assert_eq!(ps.scheduler_name.as_deref(), c.scheduler);
                assert_eq!(ps.priority_class_name.as_deref(), c.priority);
            }
        }
    }

    #[test]
    fn template_is_kept_under_the_operator_fields() {
        let mut s = spec(Framework::Generic, 1);
        s.workload.template = Some(PodTemplateSpec {
            metadata: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                labels: Some([("team".to_string(), "vision".to_string())].into()),
                ..Default::default()
            }),
            spec: Some(PodSpec {
                restart_policy: Some("Always".into()),
                hostname: Some("mine".into()),
                scheduler_name: Some("from-template".into()),
                containers: vec![Container {
                    name: "sidecar".into(),
                    image: Some("busybox".into()),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
        });
        let (j, owner) = job(s);
        let pod = &build(&j, &owner).unwrap().pods[0];
        let ps = pod.spec.as_ref().unwrap();
        assert_eq!(ps.restart_policy.as_deref(), Some("Never"));
        assert_eq!(ps.hostname.as_deref(), Some("resnet-worker-0"));
        // Not set by scheduling: the template's value stays.
        assert_eq!(ps.scheduler_name.as_deref(), Some("from-template"));
        assert_eq!(ps.containers[0].name, CONTAINER);
        assert_eq!(ps.containers[1].name, "sidecar");
        let l = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(l["team"], "vision");
        assert_eq!(l[LABEL_RANK], "0");
    }

    #[test]
    fn specs_the_schema_should_have_refused_are_build_errors() {
        let (j, owner) = job(spec(Framework::Generic, 0));
        assert_eq!(build(&j, &owner).unwrap_err().reason, "InvalidWorkers");
        let (j, owner) = job(spec(Framework::Generic, MAX_WORKERS + 1));
        assert_eq!(build(&j, &owner).unwrap_err().field, "spec.workers");
        let (mut j, _) = job(spec(Framework::Generic, 1));
        j.metadata.name = Some("a".repeat(MAX_NAME_LEN + 1));
        let owner = Owner::of(&j).unwrap();
        assert_eq!(build(&j, &owner).unwrap_err().reason, "NameTooLong");
        // The longest allowed name still gives DNS-label hostnames for the highest rank.
        j.metadata.name = Some("a".repeat(MAX_NAME_LEN));
        let owner = Owner::of(&j).unwrap();
        assert!(build(&j, &owner).is_ok());
        assert!(pod_name(&owner.name, MAX_WORKERS - 1).len() <= 63);
    }
}
