//! ServiceAccount TokenRequest and the OIDC issuer documents.

use crate::meta;
use crate::status::ApiError;
use crate::store::Store;
use podid_test_keys::SigningKey;
use serde_json::{Value, json};

/// Default `expirationSeconds` when the request gives none (as the real server).
pub const DEFAULT_EXPIRATION_SECONDS: i64 = 3600;

/// The smallest `expirationSeconds` the real server accepts.
pub const MIN_EXPIRATION_SECONDS: i64 = 600;

fn lookup(store: &Store, plural: &str, ns: &str, name: &str) -> Result<Value, ApiError> {
    let kind = store
        .find("", "v1", plural)
        .ok_or_else(|| ApiError::internal(format!("{plural} not registered")))?;
    store.get(kind, ns, name)
}

fn uid_of(obj: &Value) -> String {
    obj.pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

/// Handles `POST /api/v1/namespaces/{ns}/serviceaccounts/{sa}/token`: returns the
/// `TokenRequest` with `status.token` (an RS256 JWT) and `status.expirationTimestamp`.
pub fn token_request(
    store: &Store,
    key: &SigningKey,
    issuer: &str,
    ns: &str,
    sa_name: &str,
    mut body: Value,
    now: u64,
) -> Result<Value, ApiError> {
    let sa = lookup(store, "serviceaccounts", ns, sa_name)?;
    let invalid = |field: &str, detail: &str| {
        ApiError::invalid(
            "TokenRequest",
            "authentication.k8s.io",
            sa_name,
            field,
            detail,
        )
    };
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a TokenRequest object",
        ));
    }
    let spec = body.get("spec").cloned().unwrap_or_else(|| json!({}));
    let audiences: Vec<String> = match spec.get("audiences") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| invalid("spec.audiences", "Invalid value: must be strings"))?,
        Some(_) => return Err(invalid("spec.audiences", "Invalid value: must be a list")),
    };
    let audiences = if audiences.is_empty() {
        vec![issuer.to_string()]
    } else {
        audiences
    };
    let expiration = match spec.get("expirationSeconds") {
        None | Some(Value::Null) => DEFAULT_EXPIRATION_SECONDS,
        Some(v) => v.as_i64().ok_or_else(|| {
            invalid(
                "spec.expirationSeconds",
                "Invalid value: must be an integer",
            )
        })?,
    };
    if expiration < MIN_EXPIRATION_SECONDS {
        return Err(invalid(
            "spec.expirationSeconds",
            "Invalid value: may not specify a duration less than 10 minutes",
        ));
    }
    if expiration > (1_i64 << 32) {
        return Err(invalid(
            "spec.expirationSeconds",
            "Invalid value: may not specify a duration larger than 2^32 seconds",
        ));
    }

    let mut k8s = json!({
        "namespace": ns,
        "serviceaccount": {"name": sa_name, "uid": uid_of(&sa)},
    });
    if let Some(bound) = spec.get("boundObjectRef").filter(|b| !b.is_null()) {
        let kind = bound.get("kind").and_then(Value::as_str).unwrap_or("");
        let name = bound.get("name").and_then(Value::as_str).unwrap_or("");
        let (plural, claim) = match kind {
            "Pod" => ("pods", "pod"),
            "Secret" => ("secrets", "secret"),
            other => {
                return Err(ApiError::bad_request(format!(
                    "cannot bind token for serviceaccount \"{sa_name}\" to object of type {other}"
                )));
            }
        };
        let obj = lookup(store, plural, ns, name)?;
        let uid = uid_of(&obj);
        if let Some(want) = bound
            .get("uid")
            .and_then(Value::as_str)
            .filter(|u| !u.is_empty())
            && want != uid
        {
            return Err(ApiError::conflict(
                plural,
                "",
                name,
                &format!(
                    "the UID in the bound object reference ({want}) does not match the UID in record. The object might have been deleted and then recreated"
                ),
            ));
        }
        k8s[claim] = json!({"name": name, "uid": uid});
        if kind == "Pod"
            && let Some(node) = obj.pointer("/spec/nodeName").and_then(Value::as_str)
            && let Ok(n) = lookup(store, "nodes", "", node)
        {
            k8s["node"] = json!({"name": node, "uid": uid_of(&n)});
        }
    }

    let exp = now.saturating_add(u64::try_from(expiration).unwrap_or(0));
    let claims = json!({
        "aud": audiences,
        "exp": exp,
        "iat": now,
        "nbf": now,
        "iss": issuer,
        "jti": meta::new_uid(),
        "sub": format!("system:serviceaccount:{ns}:{sa_name}"),
        "kubernetes.io": k8s,
    });
    let token = key
        .sign(&claims)
        .map_err(|e| ApiError::internal(format!("signing the token: {e}")))?;

    body["apiVersion"] = json!("authentication.k8s.io/v1");
    body["kind"] = json!("TokenRequest");
    body["metadata"] = json!({"name": sa_name, "namespace": ns, "creationTimestamp": null});
    let mut spec = spec;
    spec["audiences"] = json!(audiences);
    spec["expirationSeconds"] = json!(expiration);
    body["spec"] = spec;
    body["status"] = json!({"token": token, "expirationTimestamp": meta::rfc3339(exp)});
    Ok(body)
}

/// `/.well-known/openid-configuration` for `issuer`.
pub fn openid_configuration(issuer: &str) -> Value {
    json!({
        "issuer": issuer,
        "jwks_uri": format!("{}/openid/v1/jwks", issuer.trim_end_matches('/')),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    })
}
