//! Labels, owner references and the metadata every child carries.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

/// `app.kubernetes.io/managed-by` value on every child.
pub const MANAGER: &str = "keelson";
/// The field manager used for every server-side apply and create.
pub const FIELD_MANAGER: &str = "keelson";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_OWNER_KIND: &str = "keelson.dev/owner-kind";
pub const LABEL_OWNER_NAME: &str = "keelson.dev/owner-name";
/// Annotation holding the hash of what the operator last applied to a child.
pub const ANNOTATION_APPLIED_HASH: &str = "keelson.dev/applied-hash";

/// The identity of a parent, taken once from the resource and used to stamp its children.
#[derive(Clone, Debug, PartialEq)]
pub struct Owner {
    pub kind: String,
    pub name: String,
    pub namespace: String,
    pub owner_ref: OwnerReference,
}

impl Owner {
    /// Takes the parent's identity. `None` when the parent has no uid or namespace yet, which never
    /// happens for an object read from the API server.
    pub fn of<K>(parent: &K) -> Option<Self>
    where
        K: Resource<DynamicType = ()>,
    {
        Some(Owner {
            kind: K::kind(&()).into_owned(),
            name: parent.name_any(),
            namespace: parent.namespace()?,
            owner_ref: parent.controller_owner_ref(&())?,
        })
    }

    /// The labels that tie a child to this owner; also the selector of the orphan sweep.
    pub fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_MANAGED_BY.to_string(), MANAGER.to_string()),
            (LABEL_OWNER_KIND.to_string(), self.kind.clone()),
            (LABEL_OWNER_NAME.to_string(), self.name.clone()),
        ])
    }

    /// Label selector string matching every child of this owner.
    pub fn selector(&self) -> String {
        format!(
            "{LABEL_MANAGED_BY}={MANAGER},{LABEL_OWNER_KIND}={},{LABEL_OWNER_NAME}={}",
            self.kind, self.name
        )
    }

    /// Metadata of a child: name, namespace, the owner labels and a controller owner reference.
    pub fn child_meta(&self, name: impl Into<String>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some(self.namespace.clone()),
            labels: Some(self.labels()),
            owner_references: Some(vec![self.owner_ref.clone()]),
            ..ObjectMeta::default()
        }
    }

    /// Metadata of a child that must outlive its owner (a retained workspace): labels, no owner reference.
    pub fn unowned_child_meta(&self, name: impl Into<String>) -> ObjectMeta {
        ObjectMeta {
            owner_references: None,
            ..self.child_meta(name)
        }
    }
}

/// Selector string for every child of a kind, used by the controllers' watches.
pub fn kind_selector(kind: &str) -> String {
    format!("{LABEL_MANAGED_BY}={MANAGER},{LABEL_OWNER_KIND}={kind}")
}

/// Whether `meta` names `owner_uid` as its controller.
pub fn is_controlled_by(meta: &ObjectMeta, owner_uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|r| r.controller == Some(true) && r.uid == owner_uid)
}
