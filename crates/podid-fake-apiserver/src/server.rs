//! HTTP routing and handlers.

use crate::auth::{self, Attributes, Identity};
use crate::faults::{FaultCell, RequestRecord};
use crate::kinds::KindSpec;
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::ApiError;
use crate::store::{Change, Filter, Op, Preconditions, Store, Target};
use crate::token;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use podid_test_keys::SigningKey;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, watch};

/// Largest request body accepted (the real server's limit).
const MAX_BODY: usize = 3 * 1024 * 1024;

/// How often a watch that allows bookmarks gets one.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

/// Response body type.
pub(crate) type Body = BoxBody<Bytes, Infallible>;

/// State shared by all connections.
#[derive(Debug)]
pub struct Shared {
    store: Mutex<Store>,
    pub(crate) faults: Arc<FaultCell>,
    pub(crate) key: SigningKey,
    pub(crate) issuer: String,
    pub(crate) host: String,
    /// The bearer token of the admin identity (`system:masters`).
    pub(crate) admin_token: String,
    drop_tx: watch::Sender<u64>,
}

impl Shared {
    pub(crate) fn new(store: Store, key: SigningKey, issuer: String, host: String) -> Self {
        Self {
            store: Mutex::new(store),
            faults: Arc::default(),
            key,
            issuer,
            host,
            admin_token: format!("podid-admin-{}", crate::meta::new_uid()),
            drop_tx: watch::channel(0).0,
        }
    }

    pub(crate) fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn drop_watches(&self) {
        self.drop_tx.send_modify(|g| *g += 1);
    }
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    Version,
    Healthz,
    Api,
    Apis,
    Group(String),
    Resources { group: String, version: String },
    OpenidConfig,
    Jwks,
    OpenApiV3,
    OpenApiV3Doc { group: String, version: String },
    Resource(ResourcePath),
}

/// A path under a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResourcePath {
    pub kind: usize,
    /// Namespace from the path (`""` when none).
    pub namespace: String,
    /// Whether the path named a namespace (else: all namespaces / cluster-scoped).
    pub has_namespace: bool,
    pub name: Option<String>,
    pub sub: Option<String>,
    /// Old `/watch/` path prefix.
    pub watch_prefix: bool,
}

pub(crate) fn route(store: &Store, path: &str) -> Option<Route> {
    let segs: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => return Some(Route::Version),
        ["healthz" | "readyz" | "livez", ..] => return Some(Route::Healthz),
        [".well-known", "openid-configuration"] => return Some(Route::OpenidConfig),
        ["openid", "v1", "jwks"] => return Some(Route::Jwks),
        ["openapi", "v3"] => return Some(Route::OpenApiV3),
        ["openapi", "v3", "api", v] => {
            return Some(Route::OpenApiV3Doc {
                group: String::new(),
                version: (*v).to_string(),
            });
        }
        ["openapi", "v3", "apis", g, v] => {
            return Some(Route::OpenApiV3Doc {
                group: (*g).to_string(),
                version: (*v).to_string(),
            });
        }
        ["api"] => return Some(Route::Api),
        ["apis"] => return Some(Route::Apis),
        ["apis", g] => return Some(Route::Group((*g).to_string())),
        ["api", v] => {
            return Some(Route::Resources {
                group: String::new(),
                version: (*v).to_string(),
            });
        }
        ["apis", g, v] => {
            return Some(Route::Resources {
                group: (*g).to_string(),
                version: (*v).to_string(),
            });
        }
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let (watch_prefix, rest) = match rest {
        ["watch", r @ ..] => (true, r),
        r => (false, r),
    };
    let namespaced_kind = |plural: &str| {
        store
            .find(group, version, plural)
            .filter(|&k| store.kinds()[k].namespaced)
    };
    let (kind, namespace, has_namespace, tail) = match rest {
        ["namespaces", ns, plural, tail @ ..] if namespaced_kind(plural).is_some() => {
            (namespaced_kind(plural)?, (*ns).to_string(), true, tail)
        }
        [plural, tail @ ..] => (
            store.find(group, version, plural)?,
            String::new(),
            false,
            tail,
        ),
        [] => return None,
    };
    let (name, sub) = match tail {
        [] => (None, None),
        [n] => (Some((*n).to_string()), None),
        [n, s] => (Some((*n).to_string()), Some((*s).to_string())),
        _ => return None,
    };
    if has_namespace != store.kinds()[kind].namespaced && name.is_some() {
        return None;
    }
    Some(Route::Resource(ResourcePath {
        kind,
        namespace,
        has_namespace,
        name,
        sub,
        watch_prefix,
    }))
}

/// The Kubernetes verb of a request.
pub(crate) fn verb(
    method: &Method,
    route: Option<&Route>,
    query: &HashMap<String, String>,
) -> String {
    let Some(Route::Resource(p)) = route else {
        return method.as_str().to_ascii_lowercase();
    };
    let watch = p.watch_prefix || is_true(query.get("watch"));
    match (method, p.name.is_some()) {
        (&Method::GET, false) if watch => "watch",
        (&Method::GET, true) if watch => "watch",
        (&Method::GET, false) => "list",
        (&Method::GET, true) => "get",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, false) => "deletecollection",
        (&Method::DELETE, true) => "delete",
        _ => return method.as_str().to_ascii_lowercase(),
    }
    .to_string()
}

fn is_true(v: Option<&String>) -> bool {
    v.is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

pub(crate) fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    url::form_urlencoded::parse(q.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error_response(e: &ApiError) -> Response<Body> {
    let code = StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = json_response(code, &e.to_status());
    if let Some(s) = e.retry_after
        && let Ok(v) = header::HeaderValue::from_str(&s.to_string())
    {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

/// Entry point for one HTTP request.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let raw_query = parts.uri.query().unwrap_or("").to_string();
    let query = parse_query(parts.uri.query());
    let route = route(&shared.store(), &path);
    let verb = verb(&parts.method, route.as_ref(), &query);
    let (fault, delay) = {
        let mut f = shared.faults.lock();
        (f.take(parts.method.as_str(), &verb, &path), f.delay())
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let response = match fault {
        Some(e) => error_response(&e),
        None => match authenticate_and_authorize(&shared, &parts, route.as_ref(), &verb, &query) {
            Err(e) => error_response(&e),
            Ok(who) => {
                let content_type = parts
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                match collect_body(body).await {
                    Err(e) => error_response(&e),
                    Ok(body) => dispatch_http(
                        &shared,
                        &parts.method,
                        route,
                        &query,
                        &content_type,
                        body,
                        &verb,
                        &who,
                    ),
                }
            }
        },
    };
    shared.faults.lock().record(RequestRecord {
        method: parts.method.to_string(),
        verb,
        path,
        query: raw_query,
        code: response.status().as_u16(),
    });
    Ok(response)
}

async fn collect_body(body: hyper::body::Incoming) -> Result<Bytes, ApiError> {
    let limited = http_body_util::Limited::new(body, MAX_BODY);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::too_large()),
        Err(e) => Err(ApiError::bad_request(format!(
            "reading the request body: {e}"
        ))),
    }
}

#[allow(clippy::too_many_arguments)]
fn dispatch_http(
    shared: &Arc<Shared>,
    method: &Method,
    route: Option<Route>,
    query: &HashMap<String, String>,
    content_type: &str,
    body: Bytes,
    verb: &str,
    who: &Identity,
) -> Response<Body> {
    match route {
        Some(Route::Healthz) => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"ok")).boxed());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain"),
            );
            r
        }
        Some(Route::Resource(p)) if verb == "watch" => match start_watch(shared, &p, query) {
            Ok(r) => r,
            Err(e) => error_response(&e),
        },
        route => match dispatch(shared, method, route, query, content_type, &body, who) {
            Ok((code, v)) => json_response(code, &v),
            Err(e) => error_response(&e),
        },
    }
}

/// Handles every non-watch request; also used by the in-process helpers.
pub(crate) fn dispatch(
    shared: &Shared,
    method: &Method,
    route: Option<Route>,
    query: &HashMap<String, String>,
    content_type: &str,
    body: &[u8],
    who: &Identity,
) -> Result<(StatusCode, Value), ApiError> {
    let ok = |v| Ok((StatusCode::OK, v));
    let route = route.ok_or_else(ApiError::no_route)?;
    if *method != Method::GET && !matches!(route, Route::Resource(_)) {
        return Err(ApiError::method_not_allowed());
    }
    match route {
        Route::Version => ok(json!({
            "major": "1", "minor": "34", "gitVersion": "v1.34.0-podid-fake",
            "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
            "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24.0", "compiler": "gc",
            "platform": "linux/amd64"
        })),
        Route::Healthz => ok(json!("ok")),
        Route::OpenidConfig => ok(token::openid_configuration(&shared.issuer)),
        Route::Jwks => ok(podid_test_keys::jwks([&shared.key])),
        Route::OpenApiV3 => ok(crate::openapi::root(&shared.store())),
        Route::OpenApiV3Doc { group, version } => {
            crate::openapi::group_version(&shared.store(), &group, &version)
                .map(|v| (StatusCode::OK, v))
                .ok_or_else(ApiError::no_route)
        }
        Route::Api => ok(json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": shared.host}]
        })),
        Route::Apis => {
            let store = shared.store();
            let groups: Vec<Value> = group_versions(store.kinds())
                .into_iter()
                .filter(|(g, _)| !g.is_empty())
                .map(|(g, vs)| api_group(&g, &vs))
                .collect();
            ok(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
        }
        Route::Group(g) => {
            let store = shared.store();
            let gv = group_versions(store.kinds());
            let (_, vs) = gv
                .into_iter()
                .find(|(name, _)| *name == g)
                .ok_or_else(ApiError::no_route)?;
            let mut v = api_group(&g, &vs);
            v["kind"] = json!("APIGroup");
            v["apiVersion"] = json!("v1");
            ok(v)
        }
        Route::Resources { group, version } => {
            let store = shared.store();
            resource_list(store.kinds(), &group, &version).map(|v| (StatusCode::OK, v))
        }
        Route::Resource(p) => resource(shared, method, &p, query, content_type, body, who),
    }
}

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
fn authenticate_and_authorize(
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

fn group_versions(kinds: &[KindSpec]) -> Vec<(String, Vec<String>)> {
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

fn api_group(g: &str, versions: &[String]) -> Value {
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

fn resource_list(kinds: &[KindSpec], group: &str, version: &str) -> Result<Value, ApiError> {
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

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

fn filter_from(p: &ResourcePath, query: &HashMap<String, String>) -> Result<Filter, ApiError> {
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

fn resource(
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

/// Server-side apply's parameters.
struct Apply {
    manager: String,
    force: bool,
}

#[allow(clippy::too_many_arguments)]
fn patch(
    store: &mut Store,
    kind: usize,
    ns: &str,
    name: &str,
    target: Target,
    content_type: &str,
    body: &[u8],
    apply: &Apply,
) -> Result<(StatusCode, Value), ApiError> {
    let ct = content_type.split(';').next().unwrap_or("").trim();
    if ct == "application/strategic-merge-patch+json" && store.kinds()[kind].custom {
        // Custom resources have no patch strategy: the real server refuses.
        return Err(ApiError::unsupported_media(ct));
    }
    let existing = store.get(kind, ns, name);
    let patched = match ct {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            let mut doc = existing?;
            json_patch::merge(&mut doc, &parse_json(body)?);
            doc
        }
        "application/json-patch+json" => {
            let mut doc = existing?;
            let ops: json_patch::Patch = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            json_patch::patch(&mut doc, &ops).map_err(|e| ApiError {
                code: 422,
                reason: "Invalid",
                message: format!("the JSON patch could not be applied: {e}"),
                details: None,
                retry_after: None,
            })?;
            doc
        }
        "application/apply-patch+yaml" => {
            let applied: Value = serde_norway::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("invalid apply patch: {e}")))?;
            if apply.manager.is_empty() {
                return Err(ApiError::bad_request(
                    "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                ));
            }
            match existing {
                Ok(mut doc) => {
                    store.apply_ownership(
                        kind,
                        ns,
                        name,
                        &doc,
                        &applied,
                        &apply.manager,
                        apply.force,
                    )?;
                    json_patch::merge(&mut doc, &applied);
                    doc
                }
                Err(e) if e.code == 404 && target == Target::Main => {
                    let mut obj = applied.clone();
                    if obj.is_object() {
                        obj["metadata"]["name"] = json!(name);
                    }
                    let created = store.create(kind, ns, obj)?;
                    store.apply_ownership(
                        kind,
                        ns,
                        name,
                        &created,
                        &applied,
                        &apply.manager,
                        true,
                    )?;
                    return Ok((StatusCode::CREATED, created));
                }
                Err(e) => return Err(e),
            }
        }
        other => return Err(ApiError::unsupported_media(other)),
    };
    Ok((
        StatusCode::OK,
        store.update(kind, ns, name, patched, target)?,
    ))
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

/// What a watch sends for one change, given its filter (selector transitions included).
fn watch_event(change: &Change, filter: &Filter) -> Option<Value> {
    let ns = change.namespace.as_str();
    let new_match = filter.matches(ns, &change.new);
    let old_match = change.old.as_ref().is_some_and(|o| filter.matches(ns, o));
    let ty = match change.op {
        Op::Added if new_match => "ADDED",
        Op::Modified if old_match && new_match => "MODIFIED",
        Op::Modified if new_match => "ADDED",
        Op::Modified if old_match => "DELETED",
        Op::Deleted if new_match || old_match => "DELETED",
        _ => return None,
    };
    Some(json!({"type": ty, "object": change.new}))
}

fn line(v: &Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

fn start_watch(
    shared: &Arc<Shared>,
    p: &ResourcePath,
    query: &HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    let filter = filter_from(p, query)?;
    let send_initial = is_true(query.get("sendInitialEvents"));
    let bookmarks = is_true(query.get("allowWatchBookmarks"));
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|t| *t > 0)
        .map(Duration::from_secs);
    let from = match query.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(_) if send_initial => None,
        Some(rv) => Some(rv.parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!("resource version is not well formed: {rv}"))
        })?),
    };
    let (spec, start) = {
        let store = shared.store();
        let spec = store.kinds()[p.kind].clone();
        (spec, store.watch(p.kind, &filter, from))
    };
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let mut drop_rx = shared.drop_tx.subscribe();
    drop_rx.mark_unchanged();
    match start {
        Err(e) => {
            // As the real server: 200, one ERROR event, end of stream.
            let ev = json!({"type": "ERROR", "object": e.to_status()});
            let _ = tx.try_send(line(&ev));
            drop(tx);
        }
        Ok(start) => {
            let kind = p.kind;
            tokio::spawn(async move {
                let bookmark = |rv: u64, end: bool| {
                    let mut md = json!({"resourceVersion": rv.to_string()});
                    if end {
                        md["annotations"] = json!({"k8s.io/initial-events-end": "true"});
                    }
                    line(&json!({"type": "BOOKMARK", "object": {
                        "kind": spec.kind, "apiVersion": spec.api_version(), "metadata": md}}))
                };
                let mut last = start.rv.max(from.unwrap_or(0));
                for c in &start.initial {
                    if let Some(ev) = watch_event(c, &filter)
                        && tx.send(line(&ev)).await.is_err()
                    {
                        return;
                    }
                }
                if send_initial && tx.send(bookmark(last, true)).await.is_err() {
                    return;
                }
                let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
                let mut live = start.rx;
                let mut tick = tokio::time::interval(BOOKMARK_INTERVAL);
                tick.tick().await;
                loop {
                    let until_deadline = async {
                        match deadline {
                            Some(d) => tokio::time::sleep_until(d).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = until_deadline => return,
                        _ = drop_rx.changed() => return,
                        _ = tx.closed() => return,
                        _ = tick.tick(), if bookmarks => {
                            if tx.send(bookmark(last, false)).await.is_err() {
                                return;
                            }
                        }
                        msg = live.recv() => match msg {
                            Ok(c) => {
                                last = last.max(c.rv);
                                if c.kind == kind
                                    && let Some(ev) = watch_event(&c, &filter)
                                    && tx.send(line(&ev)).await.is_err()
                                {
                                    return;
                                }
                            }
                            // A watcher too slow to keep up is closed, as kube-apiserver
                            // closes an unresponsive watcher: its client resumes from the last
                            // version it saw, replayed from the history window (410 only if
                            // that version left the window meanwhile).
                            Err(broadcast::error::RecvError::Lagged(_)) => return,
                            Err(broadcast::error::RecvError::Closed) => return,
                        },
                    }
                }
            });
        }
    }
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(hyper::body::Frame::data(b)), rx))
    });
    let mut r = Response::new(StreamBody::new(stream).boxed());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds;
    use std::sync::Arc;

    fn store() -> Store {
        Store::new(kinds::builtin(), 10)
    }

    fn res(store: &Store, path: &str) -> ResourcePath {
        match route(store, path) {
            Some(Route::Resource(p)) => p,
            other => panic!("{path}: {other:?}"),
        }
    }

    #[test]
    fn routes_namespaced_cluster_and_all_namespace_paths() {
        let s = store();
        let pods = s.find("", "v1", "pods").expect("pods");
        let nss = s.find("", "v1", "namespaces").expect("namespaces");
        let p = res(&s, "/api/v1/namespaces/app/pods/web-1/status");
        assert_eq!(
            (p.kind, p.namespace.as_str(), p.has_namespace),
            (pods, "app", true)
        );
        assert_eq!(
            (p.name.as_deref(), p.sub.as_deref()),
            (Some("web-1"), Some("status"))
        );
        let p = res(&s, "/api/v1/pods");
        assert_eq!((p.kind, p.has_namespace, p.name), (pods, false, None));
        // A namespace called like a resource is still a namespace.
        let p = res(&s, "/api/v1/namespaces/pods");
        assert_eq!((p.kind, p.name.as_deref()), (nss, Some("pods")));
        let p = res(&s, "/api/v1/watch/namespaces/app/pods");
        assert!(p.watch_prefix && p.has_namespace);
        let p = res(
            &s,
            "/apis/aadpodidentity.k8s.io/v1/namespaces/default/azureidentitybindings/b",
        );
        assert_eq!(s.kinds()[p.kind].kind, "AzureIdentityBinding");
        // A namespaced object needs its namespace in the path.
        assert_eq!(route(&s, "/api/v1/pods/web-1"), None);
        assert_eq!(route(&s, "/apis/nope/v1/things"), None);
        assert_eq!(route(&s, "/api/v1/namespaces/a/pods/b/c/d"), None);
        assert_eq!(route(&s, "/version"), Some(Route::Version));
        assert_eq!(route(&s, "/openid/v1/jwks"), Some(Route::Jwks));
    }

    #[test]
    fn verbs_follow_method_and_watch_parameter() {
        let s = store();
        let q = |w: &str| parse_query(Some(w));
        let r = route(&s, "/api/v1/pods");
        assert_eq!(verb(&Method::GET, r.as_ref(), &q("")), "list");
        assert_eq!(verb(&Method::GET, r.as_ref(), &q("watch=true")), "watch");
        assert_eq!(verb(&Method::GET, r.as_ref(), &q("watch=1")), "watch");
        assert_eq!(verb(&Method::GET, r.as_ref(), &q("watch=false")), "list");
        assert_eq!(
            verb(&Method::DELETE, r.as_ref(), &q("")),
            "deletecollection"
        );
        let r = route(&s, "/api/v1/namespaces/a/pods/p");
        assert_eq!(verb(&Method::PATCH, r.as_ref(), &q("")), "patch");
        assert_eq!(
            verb(&Method::GET, route(&s, "/version").as_ref(), &q("")),
            "get"
        );
    }

    #[test]
    fn watch_events_follow_selector_transitions() {
        let filter = Filter {
            namespace: None,
            labels: LabelSelector::default(),
            fields: FieldSelector::parse("spec.nodeName=n1").expect("selector"),
        };
        let on = |n: &str| json!({"metadata": {"name": "p"}, "spec": {"nodeName": n}});
        let change = |op, old: Option<Value>, new: Value| Change {
            rv: 1,
            kind: 0,
            namespace: "a".into(),
            op,
            old,
            new,
        };
        let ty = |c: Change| watch_event(&Arc::new(c), &filter).map(|e| e["type"].clone());
        assert_eq!(ty(change(Op::Added, None, on("n1"))), Some(json!("ADDED")));
        assert_eq!(ty(change(Op::Added, None, on("n2"))), None);
        assert_eq!(
            ty(change(Op::Modified, Some(on("n2")), on("n1"))),
            Some(json!("ADDED"))
        );
        assert_eq!(
            ty(change(Op::Modified, Some(on("n1")), on("n1"))),
            Some(json!("MODIFIED"))
        );
        assert_eq!(
            ty(change(Op::Modified, Some(on("n1")), on("n2"))),
            Some(json!("DELETED"))
        );
        assert_eq!(ty(change(Op::Modified, Some(on("n2")), on("n3"))), None);
        assert_eq!(
            ty(change(Op::Deleted, Some(on("n1")), on("n1"))),
            Some(json!("DELETED"))
        );
        assert_eq!(ty(change(Op::Deleted, Some(on("n2")), on("n2"))), None);
    }

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
