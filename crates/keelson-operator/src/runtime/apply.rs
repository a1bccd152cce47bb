//! The only place that writes children. Server-side apply with field manager `keelson`, after a
//! comparison with what the cache holds, so that an unchanged world costs zero writes.

use prometheus_client::metrics::counter::Counter;
use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};
use keelson_api::meta::{ANNOTATION_APPLIED_HASH, FIELD_MANAGER};
use keelson_api::workload::parse_quantity;

/// Counts the writes this process made, by verb.
#[derive(Debug, Default)]
pub struct WriteCounter {
    pub apply: Counter,
    pub create: Counter,
    pub delete: Counter,
    pub status: Counter,
}

impl WriteCounter {
    /// Counters that are also the `keelson_writes_total` series of `metrics`.
    pub fn registered(metrics: &crate::metrics::Metrics) -> Self {
        WriteCounter {
            apply: metrics.write_counter("apply"),
            create: metrics.write_counter("create"),
            delete: metrics.write_counter("delete"),
            status: metrics.write_counter("status"),
        }
    }

    pub fn total(&self) -> u64 {
        self.apply.get() + self.create.get() + self.delete.get() + self.status.get()
    }
}

/// What a write step did, for events and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Unchanged,
    Created,
    Updated,
}

/// A trait alias for the objects Keelson writes: namespaced, with no dynamic type, and [`Data`].
pub trait Object: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Data {}
impl<K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Data> Object for K {}

/// What an [`Object`] is besides a resource: cloned, printed, (de)serialized and shared by tasks.
pub trait Data: Clone + Debug + Serialize + DeserializeOwned + Send + Sync + 'static {}
impl<T: Clone + Debug + Serialize + DeserializeOwned + Send + Sync + 'static> Data for T {}

/// 64-bit FNV-1a: stable across builds and Rust versions, unlike `DefaultHasher`.
pub fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Stamps `desired` with the hash of its own content (annotation `keelson.dev/applied-hash`).
pub fn stamp<K: Object>(desired: &mut K) -> Result<String> {
    desired.annotations_mut().remove(ANNOTATION_APPLIED_HASH);
    let hash = format!("{:016x}", fnv64(&serde_json::to_vec(desired)?));
    desired
        .annotations_mut()
        .insert(ANNOTATION_APPLIED_HASH.to_string(), hash.clone());
    Ok(hash)
}

/// The hash a child was last applied with.
pub fn applied_hash<K: Resource>(obj: &K) -> Option<&str> {
    obj.meta()
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_APPLIED_HASH))
        .map(String::as_str)
}

/// Whether `desired` (already stamped) must be applied over `existing`: it must when the hash differs
/// (the spec changed, which also covers removed fields) or when a field the operator owns was edited by
/// someone else (drift).
pub fn needs_apply<K: Object>(desired: &K, existing: &K) -> Result<bool> {
    if applied_hash(desired) != applied_hash(existing) {
        return Ok(true);
    }
    let d = serde_json::to_value(desired)?;
    let e = serde_json::to_value(existing)?;
    Ok(!subset(&d, &e))
}

/// Whether every field of `want` is in `have` with an equal value. Objects may have extra fields in
/// `have` (server defaults); lists must have the same length; quantities compare by value.
pub fn subset(want: &Value, have: &Value) -> bool {
    match (want, have) {
        (Value::Object(w), Value::Object(h)) => w
            .iter()
            .all(|(k, wv)| wv.is_null() || h.get(k).is_some_and(|hv| subset(wv, hv))),
        (Value::Array(w), Value::Array(h)) => {
            w.len() == h.len() && w.iter().zip(h).all(|(a, b)| subset(a, b))
        }
        (Value::String(w), Value::String(h)) => w == h || quantity_eq(w, h),
        (Value::Number(w), Value::Number(h)) => w.as_f64() == h.as_f64(),
        _ => want == have,
    }
}

/// Compares two strings as Kubernetes quantities ("1000m" == "1", "1Gi" == "1024Mi").
fn quantity_eq(a: &str, b: &str) -> bool {
    match (parse_quantity(a), parse_quantity(b)) {
        (Some(x), Some(y)) => (x - y).abs() <= f64::EPSILON * x.abs().max(1.0),
        _ => false,
    }
}

/// Whether a 404 from a request for `name` means that the resource type is not served (its CRD is
/// missing) rather than that the object does not exist. The API server names the object in the
/// details of an object's NotFound; a missing type gets a bare 404.
pub fn type_missing(s: &kube::core::Status, name: &str) -> bool {
    s.code == 404 && s.details.as_ref().is_none_or(|d| d.name != name)
}

fn api_for<K: Object>(client: &Client, obj: &K) -> Result<Api<K>> {
    let ns = obj
        .namespace()
        .ok_or_else(|| Error::MissingMeta(obj.name_any()))?;
    Ok(Api::namespaced(client.clone(), &ns))
}

/// Server-side applies `desired` unless `existing` (from the cache) already matches it.
pub async fn apply<K: Object>(
    client: &Client,
    counter: &WriteCounter,
    mut desired: K,
    existing: Option<&K>,
) -> Result<Outcome> {
    stamp(&mut desired)?;
    if let Some(e) = existing {
        if !needs_apply(&desired, e)? {
            return Ok(Outcome::Unchanged);
        }
    }
    let api = api_for(client, &desired)?;
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    counter.apply.inc();
    api.patch(&desired.name_any(), &pp, &Patch::Apply(&desired))
        .await?;
    Ok(if existing.is_some() {
        Outcome::Updated
    } else {
        Outcome::Created
    })
}

/// Creates an object that is never updated afterwards (a pod, the token Secret, a workspace PVC).
/// `AlreadyExists` means a stale cache, not an error: the object there is kept as it is.
pub async fn create_once<K: Object>(
    client: &Client,
    counter: &WriteCounter,
    desired: K,
) -> Result<Outcome> {
    Ok(match create_returning(client, counter, desired).await? {
        Some(_) => Outcome::Created,
        None => Outcome::Unchanged,
    })
}

/// [`create_once`] that returns the object as the API server stored it (`None`: it already existed).
pub async fn create_returning<K: Object>(
    client: &Client,
    counter: &WriteCounter,
    mut desired: K,
) -> Result<Option<K>> {
    stamp(&mut desired)?;
    let api = api_for(client, &desired)?;
    let pp = PostParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PostParams::default()
    };
    counter.create.inc();
    match api.create(&pp, &desired).await {
        Ok(made) => Ok(Some(made)),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Deletes an object, only if it is still the one with `uid` (so that a stale cache never deletes its
/// replacement). A missing object or a changed uid is not an error.
pub async fn delete<K: Object>(client: &Client, counter: &WriteCounter, obj: &K) -> Result<bool> {
    let api = api_for(client, obj)?;
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: obj.uid(),
            resource_version: None,
        }),
        propagation_policy: Some(kube::api::PropagationPolicy::Background),
        ..DeleteParams::default()
    };
    counter.delete.inc();
    match api.delete(&obj.name_any(), &dp).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Writes `status` through the `/status` subresource when it differs from the current one.
pub async fn patch_status<K, S>(
    client: &Client,
    counter: &WriteCounter,
    obj: &K,
    current: Option<&S>,
    status: &S,
) -> Result<bool>
where
    K: Object,
    S: Serialize + PartialEq,
{
    if current == Some(status) {
        return Ok(false);
    }
    let api = api_for(client, obj)?;
    // Server-side apply of the whole status: a field the operator set before and leaves out now
    // (a cleared startTime, a condition that no longer applies) is removed, unlike with a merge patch.
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": { "name": obj.name_any() },
        "status": status,
    });
    counter.status.inc();
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn subset_ignores_server_defaults_but_not_drift() {
        let want =
            json!({"spec": {"ports": [{"port": 80, "name": "http"}], "selector": {"a": "b"}}});
        let have = json!({"spec": {"ports": [{"port": 80, "name": "http", "protocol": "TCP"}], "selector": {"a": "b"}, "clusterIP": "10.0.0.1"}});
        assert!(subset(&want, &have));
        let drifted = json!({"spec": {"ports": [{"port": 81, "name": "http", "protocol": "TCP"}], "selector": {"a": "b"}}});
        assert!(!subset(&want, &drifted));
        let extra_item = json!({"spec": {"ports": [{"port": 80, "name": "http"}, {"port": 9, "name": "x"}], "selector": {"a": "b"}}});
        assert!(!subset(&want, &extra_item));
    }

    #[test]
    fn quantities_compare_by_value() {
        assert!(subset(&json!({"cpu": "1000m"}), &json!({"cpu": "1"})));
        assert!(subset(
            &json!({"memory": "1Gi"}),
            &json!({"memory": "1024Mi"})
        ));
        assert!(!subset(&json!({"memory": "1Gi"}), &json!({"memory": "1G"})));
        assert!(!subset(&json!({"image": "a"}), &json!({"image": "b"})));
        assert_eq!(parse_quantity("1.5"), Some(1.5));
        assert_eq!(parse_quantity("12e3"), Some(12000.0));
        assert_eq!(parse_quantity("abc"), None);
    }

    #[test]
    fn hash_is_stable_and_excludes_itself() {
        use k8s_openapi::api::core::v1::ConfigMap;
        let mut a = ConfigMap::default();
        a.metadata.name = Some("x".into());
        let mut b = a.clone();
        let h1 = stamp(&mut a).unwrap();
        let h2 = stamp(&mut b).unwrap();
        assert_eq!(h1, h2);
        // Stamping twice gives the same hash.
        assert_eq!(stamp(&mut a).unwrap(), h1);
        assert!(!needs_apply(&a, &b).unwrap());
        b.data = Some([("k".to_string(), "v".to_string())].into());
        stamp(&mut b).unwrap();
        assert!(needs_apply(&a, &b).unwrap());
        assert_eq!(fnv64(b""), 0xcbf29ce484222325);
    }
}
