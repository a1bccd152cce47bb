//! Tests of the ModelDeployment reconciler.

use super::*;
use crate::modeldeployment::converge::type_missing;
use kube::core::response::StatusDetails;
use kube::core::Status;

#[test]
fn router_image_defaults_to_the_operator_image() {
    assert_eq!(
        router_image(None),
        format!("ghcr.io/keelson/keelson:{}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(router_image(Some("  ".into())), router_image(None));
    assert_eq!(
        router_image(Some("reg/keelson:dev".into())),
        "reg/keelson:dev"
    );
}

fn details(json: serde_json::Value) -> StatusDetails {
    serde_json::from_value(json).unwrap()
}

#[test]
fn a_missing_type_is_told_from_a_missing_object() {
    let object_missing = Status::failure("httproutes \"fraud\" not found", "NotFound")
        .with_code(404)
        .with_details(details(serde_json::json!({
            "name": "fraud", "group": "gateway.networking.k8s.io", "kind": "httproutes"
        })));
    assert!(!type_missing(&object_missing, "fraud"));
    let group_missing =
        Status::failure("404 page not found", "Failed to parse error data").with_code(404);
    assert!(type_missing(&group_missing, "fraud"));
    let resource_missing = Status::failure(
        "the server could not find the requested resource",
        "NotFound",
    )
    .with_code(404)
    .with_details(details(serde_json::json!({})));
    assert!(type_missing(&resource_missing, "fraud"));
    assert!(!type_missing(
        &Status::failure("forbidden", "Forbidden").with_code(403),
        "fraud"
    ));
}
