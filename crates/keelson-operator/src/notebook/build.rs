//! Notebook spec -> children. Pure: no client, no clock, no randomness (the token is passed in).

use std::collections::BTreeMap;

use gateway_api::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::{
    Capabilities, ContainerPort, EnvVar, EnvVarSource, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec,
    Probe, SeccompProfile, Secret, SecretKeySelector, SecurityContext, Service, ServicePort,
    ServiceSpec, TCPSocketAction, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::access;
use crate::error::BuildError;
use crate::pod::{pod_template, MainContainer};
use keelson_api::meta::Owner;
use keelson_api::notebook::{DeletePolicy, Notebook, DEFAULT_PORT, DEFAULT_WORKSPACE_MOUNT};

/// Name of the main container.
pub const CONTAINER: &str = "notebook";
/// Key of the token in the token Secret.
pub const TOKEN_KEY: &str = "token";
/// Environment variable the notebook server reads its token from (Jupyter Server's `JUPYTER_TOKEN`).
pub const TOKEN_ENV: &str = "JUPYTER_TOKEN";
/// Annotation on the notebook Service while the notebook is exposed through an HTTPRoute: an
/// HTTPRoute is swept only when the Service says there was one (no GET for every other notebook).
pub const ANNOTATION_EXPOSED: &str = "keelson.dev/exposed";
/// The group Jupyter images run their user in (`users`), the pod's default `fsGroup`.
pub const JUPYTER_GID: i64 = 100;
/// Volume name of the workspace.
pub const WORKSPACE_VOLUME: &str = "workspace";

/// Every child a Notebook wants.
#[derive(Clone, Debug, PartialEq)]
pub struct Children {
    pub service: Service,
    pub token: Secret,
    pub workspace: Option<PersistentVolumeClaim>,
    /// `None` while suspended.
    pub pod: Option<Pod>,
    /// Who may reach the notebook (DESIGN §1.2, `spec.access`).
    pub network_policy: NetworkPolicy,
    /// The HTTPRoute from outside, with `spec.access.gateway`.
    pub route: Option<HttpRoute>,
}

/// What the build needs besides the Notebook.
#[derive(Clone, Copy, Debug, Default)]
pub struct BuildCtx<'a> {
    /// The token for the Secret; used only when the Secret is made.
    pub token: &'a str,
    /// Namespace the operator runs in (in a cluster), let through the NetworkPolicy for idle reads.
    pub operator_namespace: Option<&'a str>,
}

pub fn pod_name(nb_name: &str) -> String {
    format!("{nb_name}-0")
}
pub fn token_secret_name(nb_name: &str) -> String {
    format!("{nb_name}-token")
}
pub fn workspace_name(nb_name: &str) -> String {
    format!("{nb_name}-workspace")
}

/// The in-cluster URL of a notebook.
pub fn url(owner: &Owner, port: i32) -> String {
    format!(
        "http://{}.{}.svc.cluster.local:{port}/",
        owner.name, owner.namespace
    )
}

/// Builds the children of `nb`. `token` is used only for the Secret, which is created once and
/// never rewritten, so the token stays the same for the life of the Notebook.
pub fn build(nb: &Notebook, owner: &Owner, ctx: &BuildCtx) -> Result<Children, BuildError> {
    let token = ctx.token;
    let spec = &nb.spec;
    let port = spec.port.unwrap_or(DEFAULT_PORT);
    let labels = owner.labels();
    spec.workload.check_resources("spec")?;

    if let Some(ws) = &spec.workspace {
        let mount = ws.mount_path.as_deref().unwrap_or(DEFAULT_WORKSPACE_MOUNT);
        if spec
            .workload
            .volumes
            .iter()
            .flatten()
            .any(|v| v.mount_path == mount || v.name == WORKSPACE_VOLUME)
        {
            return Err(BuildError::new(
                "VolumeConflict",
                "spec.workspace.mountPath",
                format!("a volume already uses the name {WORKSPACE_VOLUME:?} or the path {mount}; rename the volume or set spec.workspace.mountPath"),
            ));
        }
    }

    let route = access::route(nb, owner, port);
    let mut service_meta = owner.child_meta(&owner.name);
    if route.is_some() {
        service_meta.annotations = Some(BTreeMap::from([(
            ANNOTATION_EXPOSED.to_string(),
            "HTTPRoute".to_string(),
        )]));
    }
    let service = Service {
        metadata: service_meta,
        spec: Some(ServiceSpec {
            selector: Some(labels.clone()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port,
                target_port: Some(IntOrString::Int(port)),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };

    let secret_name = token_secret_name(&owner.name);
    let token = crate::secret::secret(owner.child_meta(&secret_name), TOKEN_KEY, token);

    let workspace = spec.workspace.as_ref().map(|ws| {
        let meta = match ws.delete_policy.unwrap_or_default() {
            DeletePolicy::Retain => owner.unowned_child_meta(workspace_name(&owner.name)),
            DeletePolicy::Delete => owner.child_meta(workspace_name(&owner.name)),
        };
        PersistentVolumeClaim {
            metadata: meta,
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                storage_class_name: ws.storage_class_name.clone(),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".to_string(),
                        Quantity(ws.size.clone()),
                    )])),
                    ..VolumeResourceRequirements::default()
                }),
                ..PersistentVolumeClaimSpec::default()
            }),
            ..PersistentVolumeClaim::default()
        }
    });

    let pod = (!spec.suspend.unwrap_or(false)).then(|| {
        let mut main = MainContainer {
            name: CONTAINER,
            env: vec![EnvVar {
                name: TOKEN_ENV.into(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: secret_name.clone(),
                        key: TOKEN_KEY.into(),
                        optional: Some(false),
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            }],
            ports: vec![ContainerPort {
                name: Some("http".into()),
                container_port: port,
                ..ContainerPort::default()
            }],
            readiness_probe: Some(Probe {
                tcp_socket: Some(TCPSocketAction {
                    port: IntOrString::Int(port),
                    host: None,
                }),
                period_seconds: Some(5),
                ..Probe::default()
            }),
            ..MainContainer::default()
        };
        if let Some(ws) = &spec.workspace {
            main.volumes.push(Volume {
                name: WORKSPACE_VOLUME.into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: workspace_name(&owner.name),
                    read_only: None,
                }),
                ..Volume::default()
            });
            main.mounts.push(VolumeMount {
                name: WORKSPACE_VOLUME.into(),
                mount_path: ws
                    .mount_path
                    .clone()
                    .unwrap_or_else(|| DEFAULT_WORKSPACE_MOUNT.to_string()),
                ..VolumeMount::default()
            });
        }
        let template = pod_template(&spec.workload, main, labels.clone());
        let mut meta = owner.child_meta(pod_name(&owner.name));
        let tmeta = template.metadata.unwrap_or_default();
        meta.labels = tmeta.labels;
        meta.annotations = tmeta.annotations;
        let mut pod_spec = template.spec.unwrap_or_default();
        pod_spec.restart_policy = Some("Always".into());
        pod_spec.hostname = Some(pod_name(&owner.name));
        harden(&mut pod_spec, spec.workload.service_account_name.is_some());
        Pod {
            metadata: meta,
            spec: Some(PodSpec { ..pod_spec }),
            ..Pod::default()
        }
    });

    Ok(Children {
        service,
        token,
        workspace,
        pod,
        network_policy: access::network_policy(nb, owner, port, ctx.operator_namespace),
        route,
    })
}

/// The notebook pod's defaults (DESIGN §1.2): non-root, seccomp `RuntimeDefault`, no privilege
/// escalation, every capability dropped, and no service-account token unless a ServiceAccount is
/// named. Each is only a default: a value the user's `template` set (it is merged into `pod`
/// already) is kept.
fn harden(pod: &mut PodSpec, service_account: bool) {
    let psc = pod
        .security_context
        .get_or_insert_with(PodSecurityContext::default);
    psc.run_as_non_root.get_or_insert(true);
    // Jupyter images' `users` group: the workspace volume is made group-writable for it.
    psc.fs_group.get_or_insert(JUPYTER_GID);
    psc.fs_group_change_policy
        .get_or_insert_with(|| "OnRootMismatch".into());
    psc.seccomp_profile.get_or_insert_with(|| SeccompProfile {
        type_: "RuntimeDefault".into(),
        localhost_profile: None,
    });
    if !service_account {
        pod.automount_service_account_token.get_or_insert(false);
    }
    if let Some(c) = pod.containers.iter_mut().find(|c| c.name == CONTAINER) {
        let sc = c
            .security_context
            .get_or_insert_with(SecurityContext::default);
        sc.allow_privilege_escalation.get_or_insert(false);
        sc.capabilities.get_or_insert_with(|| Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keelson_api::notebook::{NotebookSpec, WorkspaceSpec};
    use keelson_api::workload::{GpuSpec, VolumeSpec, WorkloadSpec};

    pub(crate) fn notebook(spec: NotebookSpec) -> (Notebook, Owner) {
        let mut nb = Notebook::new("alice", spec);
        nb.metadata.namespace = Some("team-a".into());
        nb.metadata.uid = Some("uid-1".into());
        nb.metadata.generation = Some(1);
        let owner = Owner::of(&nb).unwrap();
        (nb, owner)
    }

    fn tok(token: &str) -> BuildCtx<'_> {
        BuildCtx {
            token,
            operator_namespace: None,
        }
    }

    fn spec() -> NotebookSpec {
        NotebookSpec {
            workload: WorkloadSpec {
                image: "jupyter:1".into(),
                ..WorkloadSpec::default()
            },
            ..NotebookSpec::default()
        }
    }

    #[test]
    fn children_are_named_labelled_and_owned() {
        let (nb, owner) = notebook(spec());
        let c = build(&nb, &owner, &tok("t0k3n")).unwrap();
        let pod = c.pod.as_ref().unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("alice-0"));
        assert_eq!(c.service.metadata.name.as_deref(), Some("alice"));
        assert_eq!(c.token.metadata.name.as_deref(), Some("alice-token"));
        for meta in [&pod.metadata, &c.service.metadata, &c.token.metadata] {
            let l = meta.labels.as_ref().unwrap();
            assert_eq!(l["app.kubernetes.io/managed-by"], "keelson");
            assert_eq!(l["keelson.dev/owner-kind"], "Notebook");
            assert_eq!(l["keelson.dev/owner-name"], "alice");
            let r = &meta.owner_references.as_ref().unwrap()[0];
            assert_eq!(r.uid, "uid-1");
            assert_eq!(r.kind, "Notebook");
            assert_eq!(r.controller, Some(true));
        }
        // The Service selects the pod.
        let sel = c.service.spec.as_ref().unwrap().selector.as_ref().unwrap();
        let pl = pod.metadata.labels.as_ref().unwrap();
        assert!(sel.iter().all(|(k, v)| pl.get(k) == Some(v)));
        assert_eq!(
            c.service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port,
            8888
        );
    }

    #[test]
    fn token_comes_from_the_secret_never_inline() {
        let (nb, owner) = notebook(spec());
        let c = build(&nb, &owner, &tok("s3cret")).unwrap();
        assert_eq!(c.token.data.as_ref().unwrap()[TOKEN_KEY].0, b"s3cret");
        let pod = c.pod.unwrap();
        let main = &pod.spec.as_ref().unwrap().containers[0];
        let env = main
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == TOKEN_ENV)
            .unwrap();
        assert!(env.value.is_none());
        assert_eq!(
            crate::secret::secret_ref(env),
            Some(("alice-token", TOKEN_KEY))
        );
        // The token appears nowhere in the pod.
        assert!(!serde_json::to_string(&pod).unwrap().contains("s3cret"));
    }

    #[test]
    fn workspace_pvc_ownership_follows_delete_policy() {
        for (policy, owned) in [
            (None, false),
            (Some(DeletePolicy::Retain), false),
            (Some(DeletePolicy::Delete), true),
        ] {
            let mut s = spec();
            s.workspace = Some(WorkspaceSpec {
                size: "10Gi".into(),
                storage_class_name: Some("standard".into()),
                delete_policy: policy,
                ..WorkspaceSpec::default()
            });
            let (nb, owner) = notebook(s);
            let c = build(&nb, &owner, &tok("t")).unwrap();
            let pvc = c.workspace.unwrap();
            assert_eq!(pvc.metadata.name.as_deref(), Some("alice-workspace"));
            assert_eq!(pvc.metadata.owner_references.is_some(), owned, "{policy:?}");
            assert_eq!(
                pvc.metadata.labels.as_ref().unwrap()["keelson.dev/owner-name"],
                "alice"
            );
            let ps = pvc.spec.unwrap();
            assert_eq!(
                ps.resources.unwrap().requests.unwrap()["storage"],
                Quantity("10Gi".into())
            );
            assert_eq!(ps.storage_class_name.as_deref(), Some("standard"));
            let pod = c.pod.unwrap();
            let mount = pod.spec.as_ref().unwrap().containers[0]
                .volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .find(|m| m.name == WORKSPACE_VOLUME)
                .unwrap()
                .clone();
            assert_eq!(mount.mount_path, "/home/jovyan");
            let vol = pod
                .spec
                .unwrap()
                .volumes
                .unwrap()
                .into_iter()
                .find(|v| v.name == WORKSPACE_VOLUME)
                .unwrap();
            assert_eq!(
                vol.persistent_volume_claim.unwrap().claim_name,
                "alice-workspace"
            );
        }
    }

    #[test]
    fn pod_is_hardened_by_default_and_the_template_overrides_each_default() {
        let (nb, owner) = notebook(spec());
        let pod = build(&nb, &owner, &tok("t")).unwrap().pod.unwrap();
        let ps = pod.spec.as_ref().unwrap();
        let psc = ps.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.fs_group, Some(100));
        assert_eq!(
            psc.fs_group_change_policy.as_deref(),
            Some("OnRootMismatch")
        );
        assert_eq!(psc.run_as_user, None, "the image's own non-root user");
        assert_eq!(
            psc.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        assert_eq!(ps.automount_service_account_token, Some(false));
        let sc = ps.containers[0].security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref().unwrap(),
            ["ALL"]
        );

        // The template's values win, one by one; what it leaves out keeps the default.
        let mut s = spec();
        s.workload.template = Some(
            serde_json::from_value(serde_json::json!({"spec": {
                "securityContext": {"runAsNonRoot": false, "runAsUser": 0, "fsGroup": 0},
                "automountServiceAccountToken": true,
                "containers": [{"name": "notebook", "securityContext": {
                    "capabilities": {"add": ["SYS_PTRACE"]}
                }}]
            }}))
            .unwrap(),
        );
        let (nb, owner) = notebook(s);
        let pod = build(&nb, &owner, &tok("t")).unwrap().pod.unwrap();
        let ps = pod.spec.as_ref().unwrap();
        let psc = ps.security_context.as_ref().unwrap();
        assert_eq!(
            (psc.run_as_non_root, psc.run_as_user, psc.fs_group),
            (Some(false), Some(0), Some(0))
        );
        assert!(psc.seccomp_profile.is_some());
        assert_eq!(ps.automount_service_account_token, Some(true));
        let sc = ps.containers[0].security_context.as_ref().unwrap();
        assert_eq!(
            sc.capabilities.as_ref().unwrap().add.as_deref().unwrap(),
            ["SYS_PTRACE"]
        );
        assert_eq!(sc.allow_privilege_escalation, Some(false));

        // A named ServiceAccount asks for its token.
        let mut s = spec();
        s.workload.service_account_name = Some("explorer".into());
        let (nb, owner) = notebook(s);
        let pod = build(&nb, &owner, &tok("t")).unwrap().pod.unwrap();
        assert_eq!(pod.spec.unwrap().automount_service_account_token, None);
    }

    #[test]
    fn suspend_drops_only_the_pod() {
        let mut s = spec();
        s.suspend = Some(true);
        s.workspace = Some(WorkspaceSpec {
            size: "1Gi".into(),
            ..WorkspaceSpec::default()
        });
        let (nb, owner) = notebook(s);
        let c = build(&nb, &owner, &tok("t")).unwrap();
        assert!(c.pod.is_none());
        assert!(c.workspace.is_some());
    }

    #[test]
    fn gpu_and_data_fabric_mount() {
        let mut s = spec();
        s.port = Some(9999);
        s.workload.gpus = Some(GpuSpec {
            count: 1,
            product: Some("NVIDIA-A100-SXM4-80GB".into()),
            ..GpuSpec::default()
        });
        s.workload.volumes = Some(vec![crate::pod::fixtures::fabric(
            "/mapr/cluster1/projects",
        )]);
        let (nb, owner) = notebook(s);
        let pod = build(&nb, &owner, &tok("t")).unwrap().pod.unwrap();
        let ps = pod.spec.unwrap();
        let c = &ps.containers[0];
        assert_eq!(
            c.resources.as_ref().unwrap().limits.as_ref().unwrap()["nvidia.com/gpu"],
            Quantity("1".into())
        );
        assert_eq!(c.ports.as_ref().unwrap()[0].container_port, 9999);
        assert_eq!(
            ps.node_selector.unwrap()["nvidia.com/gpu.product"],
            "NVIDIA-A100-SXM4-80GB"
        );
        assert_eq!(
            ps.volumes.unwrap()[0].host_path.as_ref().unwrap().path,
            "/mapr/cluster1/projects"
        );
        assert_eq!(
            url(&owner, 9999),
            "http://alice.team-a.svc.cluster.local:9999/"
        );
    }

    #[test]
    fn workspace_path_conflict_is_a_spec_error() {
        let mut s = spec();
        s.workspace = Some(WorkspaceSpec {
            size: "1Gi".into(),
            ..WorkspaceSpec::default()
        });
        s.workload.volumes = Some(vec![VolumeSpec {
            name: "home".into(),
            mount_path: "/home/jovyan".into(),
            empty_dir: Some(Default::default()),
            ..VolumeSpec::default()
        }]);
        let (nb, owner) = notebook(s);
        let err = build(&nb, &owner, &tok("t")).unwrap_err();
        assert_eq!(err.reason, "VolumeConflict");
        assert_eq!(err.field, "spec.workspace.mountPath");
    }
}
