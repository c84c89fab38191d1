//! Discovery documents: the API groups, their versions and the resources each serves.

use crate::kinds::KindSpec;
use crate::status::ApiError;
use serde_json::{Value, json};

pub(super) fn group_versions(kinds: &[KindSpec]) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for k in kinds {
        match out.iter_mut().find(|(g, _)| *g == k.group) {
            Some((_, vs)) => {
                if !vs.contains(&k.version) {
                    vs.push(k.version.clone());
                }
            }
            None => out.push((k.group.clone(), vec![k.version.clone()])),
        }
    }
    out
}

pub(super) fn api_group(g: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
        .collect();
    json!({"name": g, "versions": vs, "preferredVersion": vs.first().cloned().unwrap_or(Value::Null)})
}

/// The short names kubectl knows built-in kinds by (`ns`, `sa`, …).
fn short_names(k: &KindSpec) -> Option<&'static [&'static str]> {
    Some(match (k.group.as_str(), k.plural.as_str()) {
        ("", "pods") => &["po"],
        ("", "nodes") => &["no"],
        ("", "namespaces") => &["ns"],
        ("", "serviceaccounts") => &["sa"],
        ("", "configmaps") => &["cm"],
        ("", "events") | ("events.k8s.io", "events") => &["ev"],
        ("", "endpoints") => &["ep"],
        ("apps", "deployments") => &["deploy"],
        ("apps", "daemonsets") => &["ds"],
        ("apiextensions.k8s.io", "customresourcedefinitions") => &["crd", "crds"],
        _ => return None,
    })
}

pub(super) fn resource_list(
    kinds: &[KindSpec],
    group: &str,
    version: &str,
) -> Result<Value, ApiError> {
    let verbs = json!([
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch"
    ]);
    let mut resources = Vec::new();
    for k in kinds
        .iter()
        .filter(|k| k.group == group && k.version == version)
    {
        let verbs = if k.review {
            json!(["create"])
        } else {
            verbs.clone()
        };
        let mut r = json!({
            "name": k.plural, "singularName": k.singular(), "namespaced": k.namespaced,
            "kind": k.kind, "verbs": verbs,
        });
        if let Some(short) = short_names(k) {
            r["shortNames"] = json!(short);
        }
        resources.push(r);
        if k.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", k.plural), "singularName": "", "namespaced": k.namespaced,
                "kind": k.kind, "verbs": ["get", "patch", "update"],
            }));
        }
        if k.group.is_empty() && k.plural == "serviceaccounts" {
            resources.push(json!({
                "name": "serviceaccounts/token", "singularName": "", "namespaced": true,
                "group": "authentication.k8s.io", "version": "v1",
                "kind": "TokenRequest", "verbs": ["create"],
            }));
        }
    }
    if resources.is_empty() {
        return Err(ApiError::no_route());
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Ok(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}
