//! Test support: validates an object against a generated CRD the way the API server does, with the
//! OpenAPI checks (types, required fields, unknown fields, enums, bounds, lengths, patterns) and the
//! CEL rules (evaluated by kube's CEL interpreter). Used by the example and property tests; the
//! integration tests check the same manifests against the real API server. Test support, compiled
//! for the unit tests and with the `testgen` feature; it panics on a malformed CRD.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::OnceLock;

use kube::core::cel::CompiledSchema;

fn pattern(p: &str) -> regex::Regex {
    thread_local! {
        static CACHE: RefCell<HashMap<String, regex::Regex>> = RefCell::new(HashMap::new());
    }
    CACHE.with(|c| {
        c.borrow_mut()
            .entry(p.to_string())
            .or_insert_with(|| regex::Regex::new(p).unwrap())
            .clone()
    })
}

/// The openAPIV3Schema of a CRD as JSON.
pub fn schema_of(crd: &CustomResourceDefinition) -> Value {
    let s = crd.spec.versions[0]
        .schema
        .as_ref()
        .unwrap()
        .open_api_v3_schema
        .as_ref()
        .unwrap();
    serde_json::to_value(s).unwrap()
}

/// The generated CRD of a kind, made once per test binary.
pub fn crd(kind: &str) -> &'static CustomResourceDefinition {
    static CRDS: OnceLock<Vec<CustomResourceDefinition>> = OnceLock::new();
    CRDS.get_or_init(|| {
        keelson_api::crd::all()
            .into_iter()
            .map(|(_, c)| c)
            .collect()
    })
    .iter()
    .find(|c| c.spec.names.kind == kind)
    .unwrap_or_else(|| panic!("no CRD for {kind}"))
}

thread_local! {
    static COMPILED: RefCell<HashMap<String, Rc<(Value, CompiledSchema)>>> = RefCell::new(HashMap::new());
}

fn compiled(kind: &str) -> Rc<(Value, CompiledSchema)> {
    COMPILED.with(|c| {
        c.borrow_mut()
            .entry(kind.to_string())
            .or_insert_with(|| {
                let schema = schema_of(crd(kind));
                let compiled = kube::core::cel::compile_schema(&schema);
                Rc::new((schema, compiled))
            })
            .clone()
    })
}

/// All errors of `obj` against the CRD of `kind`, as `path: message` strings (empty when valid).
pub fn errors(kind: &str, obj: &Value) -> Vec<String> {
    let c = compiled(kind);
    let (schema, compiled) = (&c.0, &c.1);
    let mut out = Vec::new();
    // metadata is validated by the API server's own rules, not the CRD schema.
    let mut body = obj.clone();
    if let Some(m) = body.as_object_mut() {
        m.remove("metadata");
        m.remove("apiVersion");
        m.remove("kind");
    }
    openapi(schema, &body, "", &mut out);
    if out.is_empty() {
        if let Err(errs) = kube::core::cel::validate_compiled(compiled, obj, None) {
            out.extend(errs.into_vec().into_iter().map(|e| e.to_string()));
        }
    }
    out
}

fn openapi(schema: &Value, v: &Value, path: &str, out: &mut Vec<String>) {
    if v.is_null() {
        if schema.get("nullable") != Some(&Value::Bool(true)) {
            out.push(format!("{path}: null is not allowed"));
        }
        return;
    }
    if schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        if !(v.is_i64() || v.is_u64() || v.is_string()) {
            out.push(format!("{path}: must be an integer or a string"));
        }
        return;
    }
    let ty = schema.get("type").and_then(Value::as_str);
    let ok = match ty {
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        _ => true,
    };
    if !ok {
        out.push(format!("{path}: must be of type {}", ty.unwrap_or("?")));
        return;
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            out.push(format!("{path}: Unsupported value {v}"));
        }
    }
    if let Some(n) = v.as_f64() {
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
            if n < min {
                out.push(format!("{path}: should be greater than or equal to {min}"));
            }
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
            if n > max {
                out.push(format!("{path}: should be less than or equal to {max}"));
            }
        }
    }
    if let Some(s) = v.as_str() {
        let len = s.chars().count() as u64;
        if schema
            .get("minLength")
            .and_then(Value::as_u64)
            .is_some_and(|m| len < m)
        {
            out.push(format!(
                "{path}: should be at least {} chars long",
                schema["minLength"]
            ));
        }
        if schema
            .get("maxLength")
            .and_then(Value::as_u64)
            .is_some_and(|m| len > m)
        {
            out.push(format!(
                "{path}: may not be more than {} characters",
                schema["maxLength"]
            ));
        }
        if let Some(p) = schema.get("pattern").and_then(Value::as_str) {
            if !pattern(p).is_match(s) {
                out.push(format!("{path}: should match '{p}'"));
            }
        }
    }
    if let Some(items) = v.as_array() {
        let n = items.len() as u64;
        if schema
            .get("minItems")
            .and_then(Value::as_u64)
            .is_some_and(|m| n < m)
        {
            out.push(format!(
                "{path}: should have at least {} items",
                schema["minItems"]
            ));
        }
        if schema
            .get("maxItems")
            .and_then(Value::as_u64)
            .is_some_and(|m| n > m)
        {
            out.push(format!(
                "{path}: must have at most {} items",
                schema["maxItems"]
            ));
        }
        if let Some(keys) = schema
            .get("x-kubernetes-list-map-keys")
            .and_then(Value::as_array)
        {
            let mut seen = Vec::new();
            for (i, it) in items.iter().enumerate() {
                let key: Vec<&Value> = keys.iter().map(|k| &it[k.as_str().unwrap()]).collect();
                if seen.contains(&key) {
                    out.push(format!("{path}[{i}]: Duplicate value"));
                }
                seen.push(key);
            }
        }
        if let Some(is) = schema.get("items") {
            for (i, it) in items.iter().enumerate() {
                openapi(is, it, &format!("{path}[{i}]"), out);
            }
        }
    }
    if let Some(obj) = v.as_object() {
        for r in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let r = r.as_str().unwrap();
            if !obj.contains_key(r) {
                out.push(format!("{path}.{r}: Required value"));
            }
        }
        let preserve =
            schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
        let props = schema.get("properties").and_then(Value::as_object);
        let additional = schema.get("additionalProperties");
        for (k, child) in obj {
            let p = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            match (props.and_then(|ps| ps.get(k)), additional) {
                (Some(s), _) => openapi(s, child, &p, out),
                (None, Some(a)) if a.is_object() => openapi(a, child, &p, out),
                (None, Some(Value::Bool(true))) => {}
                (None, _) if preserve => {}
                (None, _) => out.push(format!("{p}: field not declared in schema")),
            }
        }
    }
}

/// Every YAML document of a file as JSON.
pub fn documents(yaml: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde_json::to_value(serde_yaml::Value::deserialize(d).unwrap()).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}
