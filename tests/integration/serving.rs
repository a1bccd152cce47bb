//! Production serving on the local cluster: traffic gated on ready pods, zero-unavailable rollouts
//! with a preStop pause, and autoscaling through an owned HorizontalPodAutoscaler that takes
//! `replicas` over through server-side apply field ownership and hands it back.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;

use crate::support::*;
use keelson_api::conditions;
use keelson_api::modeldeployment::ModelDeployment;
use keelson_api::router_config::{RouterConfig, ROUTER_CONFIG_KEY};

fn md_yaml(name: &str, variants: &str) -> String {
    format!(
        "apiVersion: keelson.dev/v1alpha1\nkind: ModelDeployment\nmetadata: {{name: {name}}}\nspec:\n  variants:\n{variants}"
    )
}

/// `(name, weight)` of the router config in the ConfigMap `<md>-router`.
pub(crate) async fn config_weights(cms: &Api<ConfigMap>, md: &str) -> Option<Vec<(String, u32)>> {
    let cm = cms.get(&format!("{md}-router")).await.ok()?;
    let cfg = RouterConfig::parse(cm.data.as_ref()?.get(ROUTER_CONFIG_KEY)?).ok()?;
    Some(
        cfg.variants
            .into_iter()
            .map(|v| (v.name, v.weight))
            .collect(),
    )
}

fn weights(pairs: &[(&str, u32)]) -> Vec<(String, u32)> {
    pairs.iter().map(|(n, w)| (n.to_string(), *w)).collect()
}

/// The condition `type_` of a ModelDeployment of the current generation, as (status, reason).
fn cond(md: &ModelDeployment, type_: &str) -> Option<(String, String)> {
    let st = md.status.as_ref()?;
    if st.observed_generation != md.metadata.generation {
        return None;
    }
    conditions::find(&st.conditions, type_).map(|c| (c.status.clone(), c.reason.clone()))
}

#[tokio::test]
async fn a_variant_without_ready_pods_gets_no_traffic_until_it_is_ready() {
    operator();
    let ns = Ns::new("gate");
    let client = client().await;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    // The challenger's pods can never be scheduled: a valid spec that cannot run.
    let stuck = "    - {name: champion, image: i, weight: 90}\n    - {name: challenger, image: i, weight: 10, nodeSelector: {pool: nowhere}}\n";
    ns.apply(&md_yaml("fraud", stuck)).unwrap();

    wait_for(
        "the champion takes all the traffic",
        Duration::from_secs(90),
        || async {
            let w = config_weights(&cms, "fraud").await?;
            (w == weights(&[("champion", 100), ("challenger", 0)])).then_some(())
        },
    )
    .await;
    let md = wait_for(
        "TrafficDegraded=True VariantNotReady",
        Duration::from_secs(60),
        || async {
            let md = mds.get("fraud").await.ok()?;
            (cond(&md, "TrafficDegraded")? == ("True".into(), "VariantNotReady".into())
                && md.status.as_ref()?.traffic.as_deref() == Some("champion=100,challenger=0"))
            .then_some(md)
        },
    )
    .await;
    let st = md.status.clone().unwrap();
    let v: Vec<_> = st
        .variants
        .iter()
        .map(|v| (v.name.as_str(), v.desired_weight, v.weight))
        .collect();
    assert_eq!(v, [("champion", 90, 100), ("challenger", 10, 0)]);
    let c = conditions::find(&st.conditions, "TrafficDegraded").unwrap();
    assert!(c.message.contains("challenger"), "{}", c.message);

    // No hot loop: once the champion and the router run, the status and the router config stay as
    // they are while nothing changes.
    let md = wait_for(
        "champion and router ready",
        Duration::from_secs(60),
        || async {
            for d in ["fraud-champion", "fraud-router"] {
                let d = deps.get(d).await.ok()?;
                (d.status?.ready_replicas? == 1).then_some(())?;
            }
            // The status the operator wrote after that.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let md = mds.get("fraud").await.ok()?;
            (md.status.as_ref()?.ready.as_deref() == Some("1/2")).then_some(md)
        },
    )
    .await;
    let rv = |md: &ModelDeployment| md.metadata.resource_version.clone();
    let cm_rv = cms
        .get("fraud-router")
        .await
        .unwrap()
        .metadata
        .resource_version;
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(rv(&mds.get("fraud").await.unwrap()), rv(&md));
    assert_eq!(
        cms.get("fraud-router")
            .await
            .unwrap()
            .metadata
            .resource_version,
        cm_rv
    );

    // The rollout itself never drops capacity, and a pod drains before it stops.
    let d = deps.get("fraud-champion").await.unwrap();
    let spec = d.spec.unwrap();
    let ru = spec.strategy.unwrap().rolling_update.unwrap();
    assert_eq!(
        serde_json::to_value(&ru.max_unavailable).unwrap(),
        serde_json::json!(0)
    );
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.termination_grace_period_seconds, Some(40));
    let sleep = pod.containers[0]
        .lifecycle
        .clone()
        .unwrap()
        .pre_stop
        .unwrap()
        .sleep
        .unwrap();
    assert_eq!(sleep.seconds, 10);

    // Schedulable again: its share comes back.
    let fixed = "    - {name: champion, image: i, weight: 90}\n    - {name: challenger, image: i, weight: 10}\n";
    ns.apply(&md_yaml("fraud", fixed)).unwrap();
    wait_for(
        "the spec's split again",
        Duration::from_secs(90),
        || async {
            let w = config_weights(&cms, "fraud").await?;
            let md = mds.get("fraud").await.ok()?;
            (w == weights(&[("champion", 90), ("challenger", 10)])
                && cond(&md, "TrafficDegraded")? == ("False".into(), "AllVariantsServing".into()))
                .then_some(())
        },
    )
    .await;
    let events = ns.kubectl(&[
        "get",
        "events",
        "-o",
        "custom-columns=R:.reason",
        "--no-headers",
    ]);
    assert!(events.contains("VariantNotReady"), "{events}");
    assert!(events.contains("TrafficRestored"), "{events}");
}

/// The router's sticky key: a Secret `<name>-router-key` of 64 hex characters, owned by the
/// ModelDeployment, that the router Deployment reads through a `secretKeyRef` (never inline), made
/// once and kept as it is through later reconciles (a weight change, a touched annotation).
#[tokio::test]
async fn the_router_gets_a_sticky_key_made_once() {
    operator();
    let ns = Ns::new("stickykey");
    let client = client().await;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let ab = |a: u32, b: u32| {
        format!("    - {{name: champion, image: i, weight: {a}}}\n    - {{name: challenger, image: i, weight: {b}}}\n")
    };
    ns.apply(&md_yaml("fraud", &ab(90, 10))).unwrap();
    let key = wait_for("the router key Secret", Duration::from_secs(60), || async {
        secrets.get("fraud-router-key").await.ok()
    })
    .await;
    let value = |s: &Secret| s.data.as_ref().unwrap()["sticky-key"].0.clone();
    let v = value(&key);
    assert_eq!(v.len(), 64, "{}", String::from_utf8_lossy(&v));
    assert!(
        v.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "not lower-case hex"
    );
    assert_eq!(key.data.as_ref().unwrap().len(), 1);
    let md = mds.get("fraud").await.unwrap();
    let refs = key.metadata.owner_references.clone().unwrap();
    assert_eq!(refs.len(), 1);
    assert_eq!(refs[0].uid, md.metadata.uid.clone().unwrap());
    assert_eq!(refs[0].controller, Some(true));
    let labels = key.metadata.labels.clone().unwrap();
    assert_eq!(labels["app.kubernetes.io/managed-by"], "keelson");
    assert_eq!(labels["keelson.dev/owner-kind"], "ModelDeployment");
    assert_eq!(labels["keelson.dev/owner-name"], "fraud");

    let router = wait_for("the router Deployment", Duration::from_secs(60), || async {
        deps.get("fraud-router").await.ok()
    })
    .await;
    let pod = router.spec.unwrap().template.spec.unwrap();
    let env = pod.containers[0].env.clone().unwrap();
    let e = env
        .iter()
        .find(|e| e.name == "KEELSON_ROUTER_STICKY_KEY")
        .expect("the sticky key env");
    assert_eq!(e.value, None);
    let r = e.value_from.clone().unwrap().secret_key_ref.unwrap();
    assert_eq!(
        (r.name.as_str(), r.key.as_str()),
        ("fraud-router-key", "sticky-key")
    );
    // The key is nowhere in the router's Deployment, the ConfigMap or the status.
    let text = String::from_utf8(v.clone()).unwrap();
    let router = deps.get("fraud-router").await.unwrap();
    assert!(!serde_json::to_string(&router).unwrap().contains(&text));
    let cm = cms.get("fraud-router").await.unwrap();
    assert!(!serde_json::to_string(&cm).unwrap().contains(&text));

    // Later reconciles (a weight change, a touched annotation) keep the Secret as it is.
    ns.apply(&md_yaml("fraud", &ab(50, 50))).unwrap();
    ns.kubectl(&["annotate", "modeldeployment", "fraud", "touched=1"]);
    wait_for(
        "the new split in the router config",
        Duration::from_secs(60),
        || async {
            let w = config_weights(&cms, "fraud").await?;
            (w == weights(&[("champion", 50), ("challenger", 50)])).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let again = secrets.get("fraud-router-key").await.unwrap();
    assert_eq!(
        again.metadata.resource_version,
        key.metadata.resource_version
    );
    assert_eq!(value(&again), v);
    let md = mds.get("fraud").await.unwrap();
    assert!(!serde_json::to_string(&md).unwrap().contains(&text));
}

/// Which field managers own `spec.replicas` of a Deployment.
fn replicas_owners(d: &Deployment) -> Vec<String> {
    d.metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .and_then(|f| f.0.get("f:spec"))
                .and_then(|s| s.get("f:replicas"))
                .is_some()
        })
        .filter_map(|m| m.manager.clone())
        .collect()
}

fn autoscaled_yaml(auto: &str) -> String {
    md_yaml(
        "scaled",
        &format!("    - name: champion\n      image: i\n      weight: 100\n      resources: {{requests: {{cpu: 100m}}}}\n{auto}"),
    )
}

#[tokio::test]
async fn autoscaling_takes_replicas_over_and_hands_them_back() {
    operator();
    let ns = Ns::new("hpa");
    let client = client().await;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns.name);
    let ready = |want: i32| {
        let mds = mds.clone();
        async move {
            wait_for(
                &format!("Ready with {want} pods"),
                Duration::from_secs(120),
                || async {
                    let md = mds.get("scaled").await.ok()?;
                    let st = md.status.as_ref()?;
                    (cond(&md, "Ready")?.0 == "True"
                        && st.variants.first()?.replicas == want
                        && st.variants.first()?.ready_replicas == want)
                        .then_some(md)
                },
            )
            .await
        }
    };

    ns.apply(&autoscaled_yaml("      replicas: 2\n")).unwrap();
    ready(2).await;
    let d = deps.get("scaled-champion").await.unwrap();
    assert_eq!(replicas_owners(&d), ["keelson"]);

    // The lowest count the Deployment asks for while autoscaling takes over: handing the field over
    // must never reset it to the default of 1.
    let lowest = std::sync::Arc::new(std::sync::atomic::AtomicI32::new(i32::MAX));
    let watcher = {
        let (deps, lowest) = (deps.clone(), lowest.clone());
        tokio::spawn(async move {
            loop {
                if let Some(n) = deps
                    .get("scaled-champion")
                    .await
                    .ok()
                    .and_then(|d| d.spec?.replicas)
                {
                    lowest.fetch_min(n, std::sync::atomic::Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // Autoscaling on, with minReplicas above the current count: the autoscaler (the
    // kube-controller-manager's HPA controller, which clamps to minReplicas without any metrics)
    // scales the variant up, and the operator leaves the count alone.
    ns.apply(&autoscaled_yaml(
        "      autoscaling: {minReplicas: 3, maxReplicas: 5, targetCPUUtilization: 60}\n",
    ))
    .unwrap();
    let hpa = wait_for("the HPA", Duration::from_secs(60), || async {
        hpas.get("scaled-champion").await.ok()
    })
    .await;
    let spec = hpa.spec.clone().unwrap();
    assert_eq!(
        (
            spec.scale_target_ref.name.as_str(),
            spec.min_replicas,
            spec.max_replicas
        ),
        ("scaled-champion", Some(3), 5)
    );
    let metric = &spec.metrics.unwrap()[0];
    assert_eq!(
        metric.resource.as_ref().unwrap().target.average_utilization,
        Some(60)
    );
    let owner = &hpa.metadata.owner_references.clone().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("ModelDeployment", Some(true))
    );
    let md = ready(3).await;
    watcher.abort();
    assert_eq!(
        lowest.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "spec.replicas dropped while the autoscaler took it over"
    );
    let d = deps.get("scaled-champion").await.unwrap();
    let owners = replicas_owners(&d);
    assert!(
        !owners.contains(&"keelson".to_string()) && !owners.is_empty(),
        "spec.replicas must be owned by others than keelson now: {owners:?}"
    );
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(3));

    // A forced resync (a fresh operator that reconciles everything) writes nothing here.
    let (gen, hpa_rv) = (
        d.metadata.generation,
        hpas.get("scaled-champion")
            .await
            .unwrap()
            .metadata
            .resource_version,
    );
    let log = root().join(format!("target/serving-resync-{}.log", ns.name));
    let mut fresh = spawn_operator(
        &kubeconfig(),
        &log,
        &[
            "--health-addr",
            "",
            "--lease-namespace",
            LEASE_NS,
            "--lease-name",
            &format!("resync-{}", ns.name),
        ],
        &[("RUST_LOG", &test_log("keelson=debug"))],
    );
    let lines = wait_for(
        "the fresh operator reconciles the ModelDeployment",
        Duration::from_secs(120),
        || async {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let ours: Vec<serde_json::Value> = text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| v["namespace"].as_str() == Some(ns.name.as_str()))
                .collect();
            ours.iter()
                .any(|v| v["message"] == "reconcile finished")
                .then_some(ours)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = fresh.kill();
    let _ = fresh.wait();
    let writes: Vec<_> = lines
        .iter()
        .filter(|v| v.get("changes").is_some())
        .collect();
    assert!(writes.is_empty(), "the fresh operator wrote: {writes:#?}");
    let d = deps.get("scaled-champion").await.unwrap();
    assert_eq!(d.metadata.generation, gen);
    assert_eq!(
        hpas.get("scaled-champion")
            .await
            .unwrap()
            .metadata
            .resource_version,
        hpa_rv
    );
    assert_eq!(
        mds.get("scaled").await.unwrap().metadata.resource_version,
        md.metadata.resource_version
    );

    // Autoscaling off again: the autoscaler goes, and `replicas` is the operator's again.
    ns.apply(&autoscaled_yaml("      replicas: 2\n")).unwrap();
    ready(2).await;
    wait_for("the HPA deleted", Duration::from_secs(60), || async {
        match hpas.get("scaled-champion").await {
            Err(kube::Error::Api(s)) if s.code == 404 => Some(()),
            _ => None,
        }
    })
    .await;
    let d = deps.get("scaled-champion").await.unwrap();
    assert!(
        replicas_owners(&d).contains(&"keelson".to_string()),
        "{:?}",
        replicas_owners(&d)
    );
    assert_eq!(d.spec.unwrap().replicas, Some(2));
}

#[test]
fn serving_settings_that_cannot_work_are_refused_naming_the_field() {
    let ns = Ns::new("serving-invalid");
    let one = |extra: &str| {
        md_yaml(
            "md",
            &format!("    - {{name: a, image: i, weight: 100, resources: {{requests: {{cpu: 100m}}}}{extra}}}\n"),
        )
    };
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            one(", autoscaling: {minReplicas: 4, maxReplicas: 2}"),
            vec![
                "spec.variants[0].autoscaling",
                "minReplicas must not exceed",
            ],
        ),
        (
            one(", autoscaling: {maxReplicas: 0}"),
            vec!["spec.variants[0].autoscaling.maxReplicas"],
        ),
        (
            one(", replicas: 2, autoscaling: {maxReplicas: 3}"),
            vec![
                "spec.variants[0]",
                "replicas and variants[].autoscaling are exclusive",
            ],
        ),
        (
            md_yaml(
                "md",
                "    - {name: a, image: i, weight: 100, autoscaling: {maxReplicas: 3}}\n",
            ),
            vec!["spec.variants[0]", "resources.requests.cpu"],
        ),
        (
            one(", autoscaling: {maxReplicas: 3, targetCPUUtilization: 0}"),
            vec!["spec.variants[0].autoscaling.targetCPUUtilization"],
        ),
        (
            one(", readiness: {httpGet: {path: health}}"),
            vec!["spec.variants[0].readiness.httpGet.path", "absolute path"],
        ),
        (
            one(", readiness: {httpGet: {path: /health, port: 70000}}"),
            vec!["spec.variants[0].readiness.httpGet.port"],
        ),
    ];
    for (yaml, needles) in cases {
        refused(&ns, &yaml, &needles);
    }
    // The valid forms are accepted.
    ns.apply(&one(
        ", autoscaling: {minReplicas: 2, maxReplicas: 2}, readiness: {httpGet: {path: /v2/health/ready, port: 8081}}",
    ))
    .unwrap();
}
