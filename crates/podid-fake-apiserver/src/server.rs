//! HTTP handling: one request's way from routing, faults and authentication to the handler
//! that answers it.
//!
//! - [`route`](mod@route): the path parsed into a route, and the request's Kubernetes verb;
//! - [`access`]: authentication (bearer token, impersonation) and the RBAC check;
//! - [`discovery`]: the API group, version and resource lists;
//! - [`resource`](mod@resource): the verbs on a resource path (CRUD, dry runs, reviews,
//!   TokenRequest);
//! - [`patch`]: the four patch types, server-side apply included;
//! - [`watches`]: watch streams.

mod access;
mod discovery;
mod patch;
mod resource;
mod route;
mod watches;

pub(crate) use route::{Route, parse_query, route};

use access::authenticate_and_authorize;
use discovery::{api_group, group_versions, resource_list};
use resource::resource;
use route::verb;
use watches::start_watch;

use crate::auth::Identity;
use crate::faults::{FaultCell, RequestRecord};
use crate::status::ApiError;
use crate::store::Store;
use crate::token;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use podid_test_keys::SigningKey;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;

/// Largest request body accepted (the real server's limit).
const MAX_BODY: usize = 3 * 1024 * 1024;

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
