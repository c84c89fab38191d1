//! Requests on a resource path: get, list, create, replace, patch, delete and deletecollection,
//! with dry runs, the review kinds, ServiceAccount TokenRequest and CRD registration.

use super::Shared;
use super::patch::{Apply, patch};
use super::route::{ResourcePath, is_true};
use crate::auth::{self, Identity};
use crate::kinds::KindSpec;
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::ApiError;
use crate::store::{Filter, Preconditions, Store, Target};
use crate::token;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use std::collections::HashMap;

/// A create or replace body: JSON, YAML, or protobuf for the built-in kinds kubectl sends that
/// way (see [`crate::protobuf`]); anything else is `415`.
fn parse_body(content_type: &str, body: &[u8]) -> Result<Value, ApiError> {
    let ct = content_type.split(';').next().unwrap_or("").trim();
    match ct {
        "" | "application/json" | "*/*" => parse_json(body),
        "application/yaml" => serde_norway::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid YAML: {e}"))),
        ct if crate::protobuf::is_protobuf(ct) => crate::protobuf::decode(body)
            .map_err(|e| ApiError::bad_request(format!("the protobuf request body: {e}")))?
            .ok_or_else(|| ApiError::unsupported_body(ct)),
        other => Err(ApiError::unsupported_body(other)),
    }
}

pub(super) fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

pub(super) fn filter_from(
    p: &ResourcePath,
    query: &HashMap<String, String>,
) -> Result<Filter, ApiError> {
    let labels = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let fields = FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str))
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let mut fields = fields;
    if let Some(name) = &p.name {
        // A watch on one object is a watch with metadata.name.
        fields = FieldSelector::parse(&format!(
            "metadata.name={name}{}{}",
            if query.get("fieldSelector").is_some_and(|f| !f.is_empty()) {
                ","
            } else {
                ""
            },
            query.get("fieldSelector").map_or("", String::as_str)
        ))
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    Ok(Filter {
        namespace: p.has_namespace.then(|| p.namespace.clone()),
        labels,
        fields,
    })
}

fn list_object(spec: &KindSpec, items: Vec<Value>, rv: u64) -> Value {
    json!({
        "kind": format!("{}List", spec.kind),
        "apiVersion": spec.api_version(),
        "metadata": {"resourceVersion": rv.to_string()},
        "items": items,
    })
}

pub(super) fn resource(
    shared: &Shared,
    method: &Method,
    p: &ResourcePath,
    query: &HashMap<String, String>,
    content_type: &str,
    body: &[u8],
    who: &Identity,
) -> Result<(StatusCode, Value), ApiError> {
    let dry_run = match query.get("dryRun").map(String::as_str) {
        None | Some("") => false,
        Some("All") => true,
        Some(v) => {
            return Err(ApiError::bad_request(format!(
                "dryRun: Unsupported value: \"{v}\": supported values: \"All\""
            )));
        }
    };
    // A delete carries its DeleteOptions (dryRun included) in the body.
    let dry_run = dry_run
        || (*method == Method::DELETE
            && serde_json::from_slice::<Value>(body).is_ok_and(|v| {
                v.get("dryRun")
                    .and_then(Value::as_array)
                    .is_some_and(|a| a.iter().any(|d| d == "All"))
            }));
    let mut store = shared.store();
    store.dry_run = dry_run;
    let r = resource_in(
        shared,
        &mut store,
        method,
        p,
        query,
        content_type,
        body,
        who,
    );
    store.dry_run = false;
    r
}

/// [`resource`] under the store's lock (with `dry_run` set for a dry run).
#[allow(clippy::too_many_arguments)]
fn resource_in(
    shared: &Shared,
    store: &mut Store,
    method: &Method,
    p: &ResourcePath,
    query: &HashMap<String, String>,
    content_type: &str,
    body: &[u8],
    who: &Identity,
) -> Result<(StatusCode, Value), ApiError> {
    let spec = store.kinds()[p.kind].clone();
    let ns = p.namespace.as_str();
    if spec.review {
        if *method != Method::POST || p.name.is_some() {
            return Err(ApiError::method_not_allowed());
        }
        let v = match spec.kind.as_str() {
            "SelfSubjectReview" => auth::self_subject_review(who),
            kind => auth::access_review(store, who, parse_body(content_type, body)?, kind)?,
        };
        return Ok((StatusCode::CREATED, v));
    }
    let target = match p.sub.as_deref() {
        None => Target::Main,
        Some("status") if spec.status_subresource => Target::Status,
        Some("token") if spec.group.is_empty() && spec.plural == "serviceaccounts" => {
            if *method != Method::POST {
                return Err(ApiError::method_not_allowed());
            }
            let name = p.name.as_deref().unwrap_or("");
            let v = token::token_request(
                store,
                &shared.key,
                &shared.issuer,
                ns,
                name,
                parse_body(content_type, body)?,
                crate::meta::unix_now(),
            )?;
            return Ok((StatusCode::CREATED, v));
        }
        Some(_) => return Err(ApiError::no_route()),
    };
    match (method, p.name.as_deref()) {
        (&Method::GET, None) => {
            let filter = filter_from(p, query)?;
            let (items, rv) = store.list(p.kind, &filter);
            Ok((StatusCode::OK, list_object(&spec, items, rv)))
        }
        (&Method::GET, Some(name)) => Ok((StatusCode::OK, store.get(p.kind, ns, name)?)),
        (&Method::POST, None) => {
            if spec.namespaced && !p.has_namespace {
                return Err(ApiError::method_not_allowed());
            }
            let created = store.create(p.kind, ns, parse_body(content_type, body)?)?;
            if spec.group == "apiextensions.k8s.io"
                && spec.plural == "customresourcedefinitions"
                && !store.dry_run
            {
                for k in crd_kinds(&created) {
                    store.register(k);
                }
            }
            Ok((StatusCode::CREATED, created))
        }
        (&Method::PUT, Some(name)) => Ok((
            StatusCode::OK,
            store.update(p.kind, ns, name, parse_body(content_type, body)?, target)?,
        )),
        (&Method::PATCH, Some(name)) => {
            let apply = Apply {
                manager: query.get("fieldManager").cloned().unwrap_or_default(),
                force: is_true(query.get("force")),
            };
            patch(store, p.kind, ns, name, target, content_type, body, &apply)
        }
        (&Method::DELETE, Some(name)) => {
            let pre = preconditions(body)?;
            Ok((StatusCode::OK, store.delete(p.kind, ns, name, &pre)?))
        }
        (&Method::DELETE, None) => {
            let filter = filter_from(p, query)?;
            let (items, _) = store.list(p.kind, &filter);
            let mut deleted = Vec::new();
            for item in items {
                let n = item
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let ins = item
                    .pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                deleted.push(store.delete(p.kind, ins, n, &Preconditions::default())?);
            }
            let rv = store.resource_version();
            Ok((StatusCode::OK, list_object(&spec, deleted, rv)))
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

fn preconditions(body: &[u8]) -> Result<Preconditions, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Preconditions::default());
    }
    let v = parse_json(body)?;
    let s = |f: &str| {
        v.pointer(&format!("/preconditions/{f}"))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    Ok(Preconditions {
        uid: s("uid"),
        resource_version: s("resourceVersion"),
    })
}

/// The kinds a CustomResourceDefinition object describes.
fn crd_kinds(crd: &Value) -> Vec<KindSpec> {
    let s = |p: &str| {
        crd.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let group = s("/spec/group");
    let kind = s("/spec/names/kind");
    let plural = s("/spec/names/plural");
    let namespaced = s("/spec/scope") != "Cluster";
    let versions = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    versions
        .iter()
        .filter_map(|v| {
            let version = v.get("name")?.as_str()?;
            let mut k = if namespaced {
                KindSpec::namespaced(&group, version, &kind, &plural)
            } else {
                KindSpec::cluster(&group, version, &kind, &plural)
            };
            k.status_subresource = v.pointer("/subresources/status").is_some();
            Some(k.custom())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crd_objects_describe_their_kinds() {
        let crd = json!({"spec": {"group": "g.io", "scope": "Cluster", "names": {"kind": "W", "plural": "ws"},
            "versions": [{"name": "v1", "subresources": {"status": {}}}, {"name": "v2"}]}});
        let ks = crd_kinds(&crd);
        assert_eq!(ks.len(), 2);
        assert!(!ks[0].namespaced && ks[0].status_subresource);
        assert_eq!(
            (ks[1].version.as_str(), ks[1].status_subresource),
            ("v2", false)
        );
    }
}
