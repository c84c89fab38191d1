//! `/openapi/v3`: what `kubectl apply` (validation) and `kubectl explain` read.
//!
//! Built-in kinds get their schemas from k8s-openapi's generated JSON schemas (the same
//! definitions a real server publishes, under the same names); custom resources get the
//! `openAPIV3Schema` of their stored CustomResourceDefinition, or, for the four aad-pod-identity
//! kinds a fresh server serves without one, of the CRDs under `deploy/crds`. Every operation
//! lists the `fieldValidation` query parameter, which tells kubectl to leave validation to the
//! server (as against a real server since 1.27).

use crate::kinds::KindSpec;
use crate::store::Store;
use schemars::generate::{SchemaGenerator, SchemaSettings};
use serde_json::{Map, Value, json};
use sha2::Digest as _;

/// The schema name and (with `g`) the definitions of a built-in kind.
fn builtin_schema(k: &KindSpec, g: &mut SchemaGenerator) -> Option<String> {
    use k8s_openapi::api::{authentication, authorization, coordination, core, events, rbac};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1 as ext;
    macro_rules! add {
        ($t:ty) => {{
            g.subschema_for::<$t>();
            <$t as schemars::JsonSchema>::schema_name().into_owned()
        }};
    }
    Some(match (k.group.as_str(), k.kind.as_str()) {
        ("", "Pod") => add!(core::v1::Pod),
        ("", "Node") => add!(core::v1::Node),
        ("", "Namespace") => add!(core::v1::Namespace),
        ("", "Secret") => add!(core::v1::Secret),
        ("", "ServiceAccount") => add!(core::v1::ServiceAccount),
        ("", "ConfigMap") => add!(core::v1::ConfigMap),
        ("", "Event") => add!(core::v1::Event),
        ("", "Endpoints") => add!(core::v1::Endpoints),
        ("events.k8s.io", "Event") => add!(events::v1::Event),
        ("coordination.k8s.io", "Lease") => add!(coordination::v1::Lease),
        ("rbac.authorization.k8s.io", "Role") => add!(rbac::v1::Role),
        ("rbac.authorization.k8s.io", "ClusterRole") => add!(rbac::v1::ClusterRole),
        ("rbac.authorization.k8s.io", "RoleBinding") => add!(rbac::v1::RoleBinding),
        ("rbac.authorization.k8s.io", "ClusterRoleBinding") => {
            add!(rbac::v1::ClusterRoleBinding)
        }
        ("authorization.k8s.io", "SelfSubjectAccessReview") => {
            add!(authorization::v1::SelfSubjectAccessReview)
        }
        ("authorization.k8s.io", "SubjectAccessReview") => {
            add!(authorization::v1::SubjectAccessReview)
        }
        ("authentication.k8s.io", "SelfSubjectReview") => {
            add!(authentication::v1::SelfSubjectReview)
        }
        ("apiextensions.k8s.io", "CustomResourceDefinition") => {
            add!(ext::CustomResourceDefinition)
        }
        _ => return None,
    })
}

/// `<reversed group>.<version>.<Kind>`, as a real server names CRD schemas.
fn crd_schema_name(k: &KindSpec) -> String {
    let mut parts: Vec<&str> = k.group.split('.').collect();
    parts.reverse();
    format!("{}.{}.{}", parts.join("."), k.version, k.kind)
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// The OpenAPI v3 document of one group/version, or `None` if the server serves no kind there.
pub fn group_version(store: &Store, group: &str, version: &str) -> Option<Value> {
    let kinds: Vec<&KindSpec> = store
        .kinds()
        .iter()
        .filter(|k| k.group == group && k.version == version)
        .collect();
    if kinds.is_empty() {
        return None;
    }
    let mut g = SchemaSettings::openapi3().into_generator();
    let mut schemas = Map::new();
    let mut paths = Map::new();
    let mut builtin = Vec::new();
    let base = format!("/{}", gv_path(group, version));
    for k in kinds {
        let gvk = json!([{"group": k.group, "version": k.version, "kind": k.kind}]);
        let name = if let Some(n) = builtin_schema(k, &mut g) {
            builtin.push((n.clone(), gvk.clone()));
            n
        } else if let Some(mut s) = crate::schema::crd_schema(store, k) {
            let n = crd_schema_name(k);
            s["x-kubernetes-group-version-kind"] = gvk.clone();
            schemas.insert(n.clone(), s);
            n
        } else {
            let n = crd_schema_name(k);
            schemas.insert(
                n.clone(),
                json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true,
                    "x-kubernetes-group-version-kind": gvk}),
            );
            n
        };
        let reference = json!({"$ref": format!("#/components/schemas/{name}")});
        let body = json!({"content": {"application/json": {"schema": reference}}});
        let params = json!([
            {"name": "dryRun", "in": "query", "schema": {"type": "string"}},
            {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
            {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
        ]);
        let op = |id: &str, with_body: bool| {
            let mut o = json!({
                "operationId": format!("{id}{}", k.kind),
                "x-kubernetes-action": id,
                "x-kubernetes-group-version-kind": {"group": k.group, "version": k.version, "kind": k.kind},
                "parameters": params,
                "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": reference}}}},
            });
            if with_body {
                o["requestBody"] = body.clone();
            }
            o
        };
        let collection = if k.namespaced {
            format!("{base}/namespaces/{{namespace}}/{}", k.plural)
        } else {
            format!("{base}/{}", k.plural)
        };
        paths.insert(
            collection.clone(),
            json!({"post": op("post", true), "get": op("list", false)}),
        );
        paths.insert(
            format!("{collection}/{{name}}"),
            json!({"get": op("get", false), "put": op("put", true),
                "patch": op("patch", true), "delete": op("delete", false)}),
        );
    }
    let defs = g.take_definitions(true);
    for (n, s) in defs {
        schemas.entry(n).or_insert(s);
    }
    // k8s-openapi's names already are the server's; add the GVK extension kubectl looks for.
    for (n, gvk) in builtin {
        if let Some(Value::Object(s)) = schemas.get_mut(&n) {
            s.insert("x-kubernetes-group-version-kind".into(), gvk);
        }
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.34.0-podid-fake"},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

/// `/openapi/v3`: one entry per group/version, with a hash of its document.
pub fn root(store: &Store) -> Value {
    let mut gvs: Vec<(String, String)> = store
        .kinds()
        .iter()
        .map(|k| (k.group.clone(), k.version.clone()))
        .collect();
    gvs.sort();
    gvs.dedup();
    let mut paths = Map::new();
    for (group, version) in gvs {
        let Some(doc) = group_version(store, &group, &version) else {
            continue;
        };
        let hash = sha2::Sha256::digest(doc.to_string().as_bytes());
        let hex: String = hash.iter().take(16).map(|b| format!("{b:02X}")).collect();
        let p = gv_path(&group, &version);
        paths.insert(
            p.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={hex}")}),
        );
    }
    json!({"paths": paths})
}
