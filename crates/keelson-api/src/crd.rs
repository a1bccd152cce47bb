//! The CRDs, generated from the Rust types. `keelson crds` prints them; `crds/` is that output.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps,
};
use kube::CustomResourceExt;

use crate::modeldeployment::ModelDeployment;
use crate::notebook::Notebook;
use crate::trainingjob::TrainingJob;

/// Every CRD with the file name it is kept under in `crds/`, in file-name order.
pub fn all() -> Vec<(&'static str, CustomResourceDefinition)> {
    vec![
        ("modeldeployments.yaml", slim(ModelDeployment::crd())),
        ("notebooks.yaml", slim(Notebook::crd())),
        ("trainingjobs.yaml", slim(TrainingJob::crd())),
    ]
}

/// One CRD as the YAML document kept in `crds/<file>`.
pub fn to_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_yaml::Error> {
    Ok(format!("---\n{}", serde_yaml::to_string(crd)?))
}

/// All CRDs as one multi-document YAML stream: the concatenation of the files in `crds/`.
pub fn all_yaml() -> Result<String, serde_yaml::Error> {
    all().iter().map(|(_, c)| to_yaml(c)).collect()
}

/// Drops the upstream descriptions inside embedded `template` pod templates: they are the bulk of the
/// schema (the core/v1 documentation is `kubectl explain pod.spec`), and a smaller CRD is cheaper for
/// the API server, for clients and for GitOps tools. Keelson's own fields keep their descriptions.
fn slim(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
    for v in &mut crd.spec.versions {
        if let Some(s) = v
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            visit(s, &mut |name, p| {
                if name == "template" {
                    if let Some(props) = p.properties.as_mut() {
                        for child in props.values_mut() {
                            strip_descriptions(child);
                        }
                    }
                }
            });
        }
    }
    crd
}

/// Calls `f` with each named property below `s`, depth first.
pub fn visit(s: &mut JSONSchemaProps, f: &mut dyn FnMut(&str, &mut JSONSchemaProps)) {
    if let Some(props) = s.properties.as_mut() {
        for (name, p) in props.iter_mut() {
            f(name, p);
            visit(p, f);
        }
    }
    if let Some(k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(items)) =
        s.items.as_mut()
    {
        visit(items, f);
    }
    if let Some(k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrBool::Schema(a)) =
        s.additional_properties.as_mut()
    {
        visit(a, f);
    }
}

fn strip_descriptions(s: &mut JSONSchemaProps) {
    s.description = None;
    visit(s, &mut |_, p| p.description = None);
}
