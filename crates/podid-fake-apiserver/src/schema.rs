//! Structural-schema validation and pruning of custom resources, as a real server does with a
//! CRD's `openAPIV3Schema`: types, `required`, `enum`, `properties`, `items`,
//! `additionalProperties`, `nullable`, `x-kubernetes-preserve-unknown-fields`,
//! `x-kubernetes-int-or-string` and `x-kubernetes-embedded-resource`. Unknown fields are pruned;
//! a `null` in a field that is not `nullable` is dropped; anything else that does not fit is
//! `422 Invalid` with the field path.

use crate::kinds::KindSpec;
use crate::store::{Filter, Store};
use serde_json::{Map, Value};
use std::sync::OnceLock;

/// The CRDs of the aad-pod-identity kinds, as generated into `deploy/crds`: the schemas of the
/// kinds a fresh server serves before any CRD is stored.
const AAD_CRDS: [&str; 4] = [
    include_str!("../../../deploy/crds/aadpodidentity.k8s.io_azureassignedidentities.yaml"),
    include_str!("../../../deploy/crds/aadpodidentity.k8s.io_azureidentities.yaml"),
    include_str!("../../../deploy/crds/aadpodidentity.k8s.io_azureidentitybindings.yaml"),
    include_str!("../../../deploy/crds/aadpodidentity.k8s.io_azurepodidentityexceptions.yaml"),
];

fn shipped_crds() -> &'static [Value] {
    static CRDS: OnceLock<Vec<Value>> = OnceLock::new();
    CRDS.get_or_init(|| {
        AAD_CRDS
            .iter()
            .filter_map(|y| serde_norway::from_str::<Value>(y).ok())
            .collect()
    })
}

/// The `openAPIV3Schema` of a custom kind: from its stored CRD, else (aad-pod-identity kinds)
/// from the CRDs under `deploy/crds`.
pub fn crd_schema(store: &Store, k: &KindSpec) -> Option<Value> {
    let from = |crd: &Value| -> Option<Value> {
        if crd.pointer("/spec/group")?.as_str()? != k.group
            || crd.pointer("/spec/names/kind")?.as_str()? != k.kind
        {
            return None;
        }
        crd.pointer("/spec/versions")?
            .as_array()?
            .iter()
            .find(|v| v.get("name").and_then(Value::as_str) == Some(&k.version))?
            .pointer("/schema/openAPIV3Schema")
            .cloned()
    };
    if let Some(crds) = store.find("apiextensions.k8s.io", "v1", "customresourcedefinitions")
        && let Some(s) = store.list(crds, &Filter::default()).0.iter().find_map(from)
    {
        return Some(s);
    }
    shipped_crds().iter().find_map(from)
}

/// One violation: the field path and the message.
pub type Violation = (String, String);

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn flag(schema: &Value, name: &str) -> bool {
    schema.get(name).and_then(Value::as_bool) == Some(true)
}

/// Validates and prunes `v` (at `path`) against `schema`, collecting violations.
pub fn check(schema: &Value, v: &mut Value, path: &str, out: &mut Vec<Violation>) {
    if flag(schema, "x-kubernetes-int-or-string") {
        if !matches!(type_name(v), "integer" | "string") {
            out.push((
                path.into(),
                format!(
                    "Invalid value: \"{}\": {path} in body must be of type integer,string: \"{}\"",
                    type_name(v),
                    type_name(v)
                ),
            ));
        }
        return;
    }
    let want = schema.get("type").and_then(Value::as_str).unwrap_or("");
    let got = type_name(v);
    let fits = want.is_empty() || want == got || (want == "number" && got == "integer");
    if !fits {
        out.push((
            path.into(),
            format!("Invalid value: \"{got}\": {path} in body must be of type {want}: \"{got}\""),
        ));
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(v)
    {
        let list: Vec<String> = allowed.iter().map(Value::to_string).collect();
        out.push((
            path.into(),
            format!(
                "Unsupported value: {v}: supported values: {}",
                list.join(", ")
            ),
        ));
    }
    match v {
        Value::Object(m) => object(schema, m, path, out),
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    check(item_schema, item, &format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

fn object(schema: &Value, m: &mut Map<String, Value>, path: &str, out: &mut Vec<Violation>) {
    let props = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties");
    let preserve = flag(schema, "x-kubernetes-preserve-unknown-fields");
    let embedded = flag(schema, "x-kubernetes-embedded-resource") || path.is_empty();
    let keys: Vec<String> = m.keys().cloned().collect();
    for key in keys {
        if embedded && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        let sub = props
            .and_then(|p| p.get(&key))
            .or_else(|| additional.filter(|a| a.is_object()));
        match sub {
            Some(sub) => {
                if m.get(&key).is_some_and(Value::is_null) {
                    if !flag(sub, "nullable") {
                        m.remove(&key);
                    }
                    continue;
                }
                if let Some(child) = m.get_mut(&key) {
                    check(sub, child, &join(path, &key), out);
                }
            }
            None if preserve || additional.and_then(Value::as_bool) == Some(true) => {}
            None => {
                m.remove(&key);
            }
        }
    }
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for r in required.iter().filter_map(Value::as_str) {
            if !m.contains_key(r) {
                out.push((join(path, r), "Required value".into()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn types_are_checked_unknown_fields_pruned_and_required_enforced() {
        let schema = json!({"type": "object", "properties": {
        "spec": {"type": "object", "required": ["type"], "properties": {
            "type": {"type": "integer"},
            "mode": {"type": "string", "enum": ["a", "b"]},
            "port": {"x-kubernetes-int-or-string": true},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
            "list": {"type": "array", "items": {"type": "boolean"}},
            "opt": {"type": "string", "nullable": true},
            "gone": {"type": "string"}
        }}}});
        let mut obj = json!({"apiVersion": "x/v1", "kind": "K", "metadata": {"name": "n"},
            "spec": {"type": 1, "mode": "a", "port": "http", "labels": {"k": "v"},
                "free": {"anything": [1]}, "list": [true], "opt": null, "gone": null,
                "extra": 1}, "top": 2});
        let mut errs = Vec::new();
        check(&schema, &mut obj, "", &mut errs);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(obj.get("top"), None);
        assert_eq!(obj["spec"].get("extra"), None);
        assert_eq!(obj["spec"].get("gone"), None);
        assert_eq!(obj["spec"]["opt"], Value::Null);
        assert_eq!(obj["spec"]["free"], json!({"anything": [1]}));
        assert_eq!(obj["metadata"]["name"], "n");

        let mut bad = json!({"spec": {"type": "zero", "mode": "c", "port": 1.5,
            "labels": {"k": 1}, "list": ["x"]}});
        let mut errs = Vec::new();
        check(&schema, &mut bad, "", &mut errs);
        let fields: Vec<&str> = errs.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.labels.k",
                "spec.list[0]",
                "spec.mode",
                "spec.port",
                "spec.type"
            ]
        );
        assert!(errs[4].1.contains("must be of type integer"), "{errs:?}");
        let mut missing = json!({"spec": {}});
        let mut errs = Vec::new();
        check(&schema, &mut missing, "", &mut errs);
        assert_eq!(
            errs,
            [("spec.type".to_string(), "Required value".to_string())]
        );
    }
}
