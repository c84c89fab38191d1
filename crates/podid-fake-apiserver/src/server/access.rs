//! Who sent a request (bearer token, then impersonation) and whether RBAC lets them do it.

use super::Shared;
use super::route::Route;
use crate::auth::{self, Attributes, Identity};
use crate::status::ApiError;
use crate::store::Store;
use http::header;
use std::collections::HashMap;

/// The paths a request without a token may read (as `system:anonymous`): health, version and
/// the issuer discovery documents, which real clusters leave public.
fn public(route: Option<&Route>) -> bool {
    matches!(
        route,
        Some(Route::Healthz | Route::Version | Route::OpenidConfig | Route::Jwks)
    )
}

/// Who sent the request (bearer token, then impersonation headers), and whether RBAC lets them
/// do it: `401` without a valid token (except on public paths), `403` when RBAC says no.
pub(super) fn authenticate_and_authorize(
    shared: &Shared,
    parts: &http::request::Parts,
    route: Option<&Route>,
    verb: &str,
    query: &HashMap<String, String>,
) -> Result<Identity, ApiError> {
    let token = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let store = shared.store();
    let who = match token {
        None if public(route) && verb == "get" => return Ok(Identity::anonymous()),
        None => return Err(auth::unauthorized()),
        Some(t) if constant_time_eq(t.as_bytes(), shared.admin_token.as_bytes()) => {
            Identity::admin()
        }
        Some(t) => auth::service_account_token(&store, &shared.key, &shared.issuer, t)
            .ok_or_else(auth::unauthorized)?,
    };
    let who = impersonate(&store, who, &parts.headers)?;
    let attrs = attributes(&store, route, verb, parts.uri.path(), query);
    match auth::authorize(&store, &who, &attrs) {
        Some(_) => Ok(who),
        None => Err(auth::forbidden(&who, &attrs)),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Applies `Impersonate-User` / `Impersonate-Group` when the caller may impersonate
/// (RBAC verb `impersonate` on `users`, `groups`, `serviceaccounts`).
fn impersonate(
    store: &Store,
    who: Identity,
    headers: &http::HeaderMap,
) -> Result<Identity, ApiError> {
    let Some(user) = headers
        .get("impersonate-user")
        .and_then(|v| v.to_str().ok())
    else {
        return Ok(who);
    };
    let groups: Vec<String> = headers
        .get_all("impersonate-group")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    let check = |resource: &str, ns: &str, name: &str| {
        let a = Attributes {
            resource_request: true,
            verb: "impersonate".into(),
            namespace: ns.into(),
            resource: resource.into(),
            name: name.into(),
            ..Attributes::default()
        };
        auth::authorize(store, &who, &a)
            .map(drop)
            .ok_or_else(|| auth::forbidden(&who, &a))
    };
    let target = match user
        .strip_prefix("system:serviceaccount:")
        .and_then(|r| r.split_once(':'))
    {
        Some((ns, name)) => {
            check("serviceaccounts", ns, name)?;
            let mut id = Identity::service_account(ns, name, None);
            id.groups.retain(|g| g != "system:authenticated");
            id
        }
        None => {
            check("users", "", user)?;
            Identity {
                user: user.to_string(),
                groups: Vec::new(),
                uid: None,
            }
        }
    };
    let mut target = target;
    for g in groups {
        check("groups", "", &g)?;
        if !target.groups.contains(&g) {
            target.groups.push(g);
        }
    }
    if target.user != "system:anonymous" {
        target.groups.push("system:authenticated".into());
    }
    Ok(target)
}

/// The RBAC attributes of a request.
fn attributes(
    store: &Store,
    route: Option<&Route>,
    verb: &str,
    path: &str,
    query: &HashMap<String, String>,
) -> Attributes {
    let Some(Route::Resource(p)) = route else {
        return Attributes {
            resource_request: false,
            verb: verb.to_string(),
            path: path.to_string(),
            ..Attributes::default()
        };
    };
    let spec = &store.kinds()[p.kind];
    let mut name = p.name.clone().unwrap_or_default();
    if name.is_empty() && (verb == "list" || verb == "watch") {
        // As the real server: a list or watch of one name (field selector) names it.
        if let Some(n) = query.get("fieldSelector").and_then(|f| {
            f.split(',')
                .find_map(|t| t.strip_prefix("metadata.name="))
                .filter(|_| !f.contains(','))
        }) {
            name = n.to_string();
        }
    }
    let namespace = if spec.group.is_empty() && spec.plural == "namespaces" {
        // A request for namespace `x` is in namespace `x`.
        name.clone()
    } else {
        p.namespace.clone()
    };
    Attributes {
        resource_request: true,
        verb: verb.to_string(),
        namespace,
        group: spec.group.clone(),
        resource: spec.plural.clone(),
        subresource: p.sub.clone().unwrap_or_default(),
        name,
        path: path.to_string(),
    }
}
