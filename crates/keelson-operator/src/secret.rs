//! Secrets that hold a random value the operator makes once: a Notebook's access token
//! (`<name>-token`) and a ModelDeployment router's sticky key (`<name>-router-key`).
//!
//! Each step of the pipeline does its part. Fetch looks the Secret up in the child cache and makes a
//! value only when the Secret is absent ([`Once::fetch`]); the pure build puts that value in the
//! Secret ([`secret`]); apply creates the Secret only when it was absent ([`Once::create`]) and
//! never updates it. So a reconcile never rotates the value, and a resync that finds the Secret
//! cached writes nothing. A value never reaches a log line, an Event or a status: [`Once`]'s
//! `Debug` leaves it out, and [`Change`] names the Secret only.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use rand::distr::{Alphanumeric, SampleString};
use rand::RngCore;

use crate::error::Result;
use crate::runtime::apply::{self, Outcome};
use kube::runtime::reflector::Store;

use crate::runtime::controller::{cached, Shared};
use crate::runtime::driver::{Change, Changes};

/// A Secret made once: the cached Secret when it exists, else a new value for it.
pub struct Once {
    /// The Secret, if the cache holds it.
    pub existing: Option<Arc<Secret>>,
    /// A new value when the Secret does not exist yet; empty when it does.
    pub value: String,
}

impl std::fmt::Debug for Once {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Once")
            .field("exists", &self.existing.is_some())
            .finish_non_exhaustive()
    }
}

impl Once {
    /// Looks up the Secret `ns/name` in `cache`; when it is absent, `make` gives its value.
    pub fn fetch(
        cache: &Store<Secret>,
        ns: &str,
        name: &str,
        make: impl FnOnce() -> String,
    ) -> Once {
        let existing = cached(cache, ns, name);
        let value = if existing.is_none() {
            make()
        } else {
            String::new()
        };
        Once { existing, value }
    }

    /// Whether the Secret exists (then its value is never written again).
    pub fn exists(&self) -> bool {
        self.existing.is_some()
    }

    /// Creates `desired` when the Secret did not exist at fetch; an existing Secret, or one made in
    /// between (a `409`), is left as it is. What was created goes to `changes`.
    pub async fn create(
        &self,
        shared: &Shared,
        desired: Secret,
        changes: &mut Changes,
    ) -> Result<()> {
        if self.exists() {
            return Ok(());
        }
        let made = Change::created(&desired);
        if apply::create_once(&shared.client, &shared.writes, desired).await? == Outcome::Created {
            changes.push(made);
        }
        Ok(())
    }
}

/// An Opaque Secret with `value` under `key`. Pure.
pub fn secret(meta: ObjectMeta, key: &str, value: &str) -> Secret {
    Secret {
        metadata: meta,
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            key.to_string(),
            ByteString(value.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    }
}

/// The Secret name and key that an environment variable reads, if it reads one.
pub fn secret_ref(e: &k8s_openapi::api::core::v1::EnvVar) -> Option<(&str, &str)> {
    let r = e.value_from.as_ref()?.secret_key_ref.as_ref()?;
    Some((r.name.as_str(), r.key.as_str()))
}

/// `len` random letters and digits.
pub fn alphanumeric(len: usize) -> String {
    Alphanumeric.sample_string(&mut rand::rng(), len)
}

/// `bytes` random bytes as lower-case hex (twice as many characters).
pub fn hex(bytes: usize) -> String {
    let mut raw = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut raw);
    let mut out = String::with_capacity(bytes * 2);
    for b in raw {
        let _ = write!(out, "{b:02x}");
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn values_are_random_and_of_their_length() {
        let a = alphanumeric(48);
        assert_eq!(a.len(), 48);
        assert!(a.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(a, alphanumeric(48));
        let h = hex(32);
        assert_eq!(h.len(), 64);
        assert!(h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
        assert_ne!(h, hex(32));
    }

    #[test]
    fn a_value_is_made_only_for_a_missing_secret_and_never_shown() {
        let (store, mut writer) = kube::runtime::reflector::store::<Secret>();
        let mut s = secret(
            ObjectMeta {
                name: Some("a-token".into()),
                namespace: Some("ns".into()),
                ..ObjectMeta::default()
            },
            "token",
            "kept",
        );
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(s.clone()));
        let cache = store;
        let found = Once::fetch(&cache, "ns", "a-token", || {
            unreachable!("no value for an existing Secret")
        });
        assert!(found.exists());
        assert!(found.value.is_empty());
        s.metadata.name = Some("b-token".into());
        let missing = Once::fetch(&cache, "ns", "b-token", || "s3cret".into());
        assert!(!missing.exists());
        assert_eq!(missing.value, "s3cret");
        assert!(!format!("{missing:?}").contains("s3cret"));
        assert_eq!(s.data.unwrap()["token"].0, b"kept");
    }
}
