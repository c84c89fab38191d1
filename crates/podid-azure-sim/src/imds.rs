//! The simulated Instance Metadata Service of one VM (or VMSS instance): the managed-identity
//! token endpoint and the instance document, with IMDS's throttling, counters and injected
//! faults. It only serves identities the ARM state currently assigns to its VM/VMSS.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::json;

use crate::error::Error;
use crate::http::{
    Answer, Handler, Req, Resp, ServerHandle, json, loopback_listener, spawn_server,
};
use crate::world::{App, Cloud, ComputeKind, ComputeRef};

/// IMDS's published limit on identity requests per second per VM.
pub const IMDS_RATE_LIMIT: usize = 20;
/// IMDS's published limit on concurrent identity requests per VM.
pub const IMDS_CONCURRENCY_LIMIT: usize = 5;

/// Counters of one IMDS server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImdsCounters {
    /// Every request received, whatever its path (tests prove a request never reached IMDS).
    pub requests: u64,
    /// Every request received, by the connection's source address (tests tell a pod's request
    /// from the node's own).
    pub per_source: BTreeMap<std::net::IpAddr, u64>,
    /// Requests to the identity token endpoint (every outcome).
    pub token_requests: u64,
    /// Tokens issued.
    pub tokens_issued: u64,
    /// Tokens issued per identity client id (lower-case).
    pub per_identity: BTreeMap<String, u64>,
    /// Highest number of token requests in flight at once.
    pub max_concurrency: usize,
    /// Requests answered 429.
    pub throttled: u64,
    /// Requests answered with an injected 5xx.
    pub injected_failures: u64,
    /// Requests to `/metadata/instance`.
    pub instance_requests: u64,
}

#[derive(Debug)]
struct Faults {
    latency: Duration,
    fail_next: VecDeque<StatusCode>,
    throttling: bool,
    rate_limit: usize,
    concurrency_limit: usize,
}

#[derive(Debug)]
struct Shared {
    cloud: Cloud,
    compute: ComputeRef,
    counters: Mutex<ImdsCounters>,
    faults: Mutex<Faults>,
    window: Mutex<VecDeque<Instant>>,
    inflight: AtomicUsize,
}

impl Shared {
    fn counters(&self) -> MutexGuard<'_, ImdsCounters> {
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn faults(&self) -> MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running simulated IMDS for one VM or VMSS instance.
#[derive(Debug)]
pub struct ImdsHandle {
    server: ServerHandle,
    shared: Arc<Shared>,
}

impl ImdsHandle {
    /// Binds `127.0.0.1:0` and serves IMDS for `compute`. Must be called inside a tokio runtime.
    pub fn start(cloud: &Cloud, compute: &ComputeRef) -> Result<Self, Error> {
        serve_imds(cloud, compute, loopback_listener()?)
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The server (address, unreachable switch).
    pub fn server(&self) -> &ServerHandle {
        &self.server
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> ImdsCounters {
        self.shared.counters().clone()
    }

    /// Delay every token answer by `latency` (while counted as in flight).
    pub fn set_latency(&self, latency: Duration) {
        self.shared.faults().latency = latency;
    }

    /// Answer the next `n` token requests with `status` (e.g. 500 or 503).
    pub fn fail_next(&self, n: usize, status: u16) {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        self.shared
            .faults()
            .fail_next
            .extend(std::iter::repeat_n(status, n));
    }

    /// Turns IMDS's throttling (20 requests/s, 5 concurrent) on (default) or off.
    pub fn set_throttling(&self, enabled: bool) {
        self.shared.faults().throttling = enabled;
    }

    /// Overrides the throttling limits (requests per rolling second, concurrent requests).
    pub fn set_limits(&self, per_second: usize, concurrent: usize) {
        let mut f = self.shared.faults();
        f.rate_limit = per_second;
        f.concurrency_limit = concurrent;
    }

    /// While set, connections are closed without an answer.
    pub fn set_unreachable(&self, unreachable: bool) {
        self.server.set_unreachable(unreachable);
    }
}

/// Serves IMDS for `compute` on `listener` (which may have been bound inside a network
/// namespace). Must be called inside a tokio runtime.
pub fn serve_imds(
    cloud: &Cloud,
    compute: &ComputeRef,
    listener: std::net::TcpListener,
) -> Result<ImdsHandle, Error> {
    let shared = Arc::new(Shared {
        cloud: cloud.clone(),
        compute: compute.clone(),
        counters: Mutex::new(ImdsCounters::default()),
        faults: Mutex::new(Faults {
            latency: Duration::ZERO,
            fail_next: VecDeque::new(),
            throttling: true,
            rate_limit: IMDS_RATE_LIMIT,
            concurrency_limit: IMDS_CONCURRENCY_LIMIT,
        }),
        window: Mutex::new(VecDeque::new()),
        inflight: AtomicUsize::new(0),
    });
    let s = shared.clone();
    let handler: Handler = Arc::new(move |req| {
        let s = s.clone();
        Box::pin(async move { route(&s, req).await })
    });
    Ok(ImdsHandle {
        server: spawn_server(listener, handler)?,
        shared,
    })
}

fn imds_error(status: StatusCode, error: &str, description: &str) -> Resp {
    json(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

fn has_metadata_header(req: &Req) -> bool {
    req.headers
        .get_all("metadata")
        .iter()
        .any(|v| v.to_str().is_ok_and(|s| s.eq_ignore_ascii_case("true")))
}

async fn route(s: &Arc<Shared>, req: Req) -> Answer {
    {
        let mut counters = s.counters();
        counters.requests += 1;
        *counters.per_source.entry(req.peer.ip()).or_default() += 1;
    }
    let path = req.uri.path().trim_end_matches('/');
    match path {
        "/metadata/identity/oauth2/token" => Some(token(s, &req).await),
        "/metadata/instance" | "/metadata/instance/compute" => Some(instance(s, &req, path)),
        _ => Some(json(StatusCode::NOT_FOUND, &json!({"error": "Not found"}))),
    }
}

/// Decrements the in-flight count when dropped.
struct InflightGuard<'a>(&'a AtomicUsize);

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn token(s: &Arc<Shared>, req: &Req) -> Resp {
    s.counters().token_requests += 1;
    if !has_metadata_header(req) {
        return imds_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Required metadata header not specified",
        );
    }
    if req.method != Method::GET && req.method != Method::POST {
        return imds_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "Method not allowed",
        );
    }
    let now_inflight = s.inflight.fetch_add(1, Ordering::SeqCst) + 1;
    let _guard = InflightGuard(&s.inflight);
    {
        let mut c = s.counters();
        c.max_concurrency = c.max_concurrency.max(now_inflight);
    }
    let (latency, fail, throttling, rate, conc) = {
        let mut f = s.faults();
        (
            f.latency,
            f.fail_next.pop_front(),
            f.throttling,
            f.rate_limit,
            f.concurrency_limit,
        )
    };
    if throttling {
        let over_rate = {
            let mut w = s.window.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            while w
                .front()
                .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
            {
                w.pop_front();
            }
            if w.len() >= rate {
                true
            } else {
                w.push_back(now);
                false
            }
        };
        if over_rate || now_inflight > conc {
            s.counters().throttled += 1;
            return imds_error(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                "Too many requests. Please retry after some time.",
            );
        }
    }
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if let Some(status) = fail {
        s.counters().injected_failures += 1;
        return imds_error(status, "internal_error", "IMDS is temporarily unavailable");
    }
    let q = req.query();
    let get = |k: &str| {
        q.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    if get("api-version").is_none() {
        return imds_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Required query variable 'api-version' is missing",
        );
    }
    let Some(resource) = get("resource") else {
        return imds_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Required query variable 'resource' is missing",
        );
    };
    let selector = [
        ("client_id", Selector::Client),
        ("object_id", Selector::Principal),
        ("principal_id", Selector::Principal),
        ("msi_res_id", Selector::Resource),
        ("mi_res_id", Selector::Resource),
    ]
    .into_iter()
    .find_map(|(k, sel)| get(k).map(|v| (sel, v.to_owned())));
    let (app, lifetime) = match select(s, selector) {
        Ok(x) => x,
        Err(msg) => {
            tracing::debug!(compute = %s.compute.name, reason = msg, "IMDS refused a token");
            return imds_error(StatusCode::BAD_REQUEST, "invalid_request", msg);
        }
    };
    if s.cloud.is_resource_unknown(resource) {
        let desc = format!(
            "AADSTS500011: {}",
            crate::world::unknown_resource_message(resource, s.cloud.tenant_id())
        );
        return imds_error(StatusCode::BAD_REQUEST, "invalid_resource", &desc);
    }
    tracing::debug!(compute = %s.compute.name, client_id = %app.client_id, resource, "IMDS issued a token");
    let (token, claims) = s.cloud.issue_for_app(&app, resource, lifetime, "2");
    {
        let mut c = s.counters();
        c.tokens_issued += 1;
        *c.per_identity
            .entry(app.client_id.to_ascii_lowercase())
            .or_default() += 1;
    }
    let expires_in = (claims.exp - claims.iat).to_string();
    json(
        StatusCode::OK,
        &json!({
            "access_token": token,
            "client_id": app.client_id,
            "expires_in": expires_in,
            "expires_on": claims.exp.to_string(),
            "ext_expires_in": expires_in,
            "not_before": claims.nbf.to_string(),
            "resource": resource,
            "token_type": "Bearer",
        }),
    )
}

#[derive(Debug, Clone, Copy)]
enum Selector {
    Client,
    Principal,
    Resource,
}

/// The identity to issue for, from the current (settled) ARM state of the VM/VMSS.
fn select(s: &Shared, selector: Option<(Selector, String)>) -> Result<(App, u64), &'static str> {
    const NOT_FOUND: &str = "Identity not found";
    let st = s.cloud.state();
    let key = s.compute.resource_id().to_ascii_lowercase();
    let compute = st.computes.get(&key).ok_or(NOT_FOUND)?;
    let mut candidates: Vec<App> = Vec::new();
    if let Some((principal, client)) = compute.system_ids.as_ref().filter(|_| compute.system) {
        candidates.push(App {
            client_id: client.clone(),
            object_id: principal.clone(),
            mi_resource_id: Some(s.compute.resource_id()),
            secrets: Vec::new(),
            certs: Vec::new(),
            federated: Vec::new(),
        });
    }
    let system_count = candidates.len();
    let mut user_entries = 0;
    for (entry_key, entry) in &compute.user {
        user_entries += 1;
        if let Some(id) = st.resolve(entry_key, entry) {
            candidates.push(App {
                client_id: id.client_id.clone(),
                object_id: id.principal_id.clone(),
                mi_resource_id: Some(id.resource_id.clone()),
                secrets: Vec::new(),
                certs: Vec::new(),
                federated: Vec::new(),
            });
        }
    }
    let lifetime = st.imds_token_lifetime;
    let chosen = match selector {
        Some((sel, value)) => candidates.into_iter().find(|a| match sel {
            Selector::Client => a.client_id.eq_ignore_ascii_case(&value),
            Selector::Principal => a.object_id.eq_ignore_ascii_case(&value),
            Selector::Resource => a
                .mi_resource_id
                .as_deref()
                .is_some_and(|r| r.eq_ignore_ascii_case(&value)),
        }),
        None if system_count == 1 => candidates.into_iter().next(),
        None if user_entries > 1 => {
            return Err(
                "Multiple user assigned identities exist, please specify the clientId / resourceId of the identity in the token request",
            );
        }
        None => candidates.into_iter().next(),
    };
    chosen.map(|a| (a, lifetime)).ok_or(NOT_FOUND)
}

fn instance(s: &Shared, req: &Req, path: &str) -> Resp {
    s.counters().instance_requests += 1;
    if !has_metadata_header(req) {
        return imds_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Required metadata header not specified",
        );
    }
    if !req
        .query()
        .iter()
        .any(|(k, v)| k == "api-version" && !v.is_empty())
    {
        return json(
            StatusCode::BAD_REQUEST,
            &json!({
                "error": "Bad request. api-version was not specified in the request. For more information refer to aka.ms/azureimds",
                "newest-versions": ["2023-07-01", "2023-05-04", "2021-12-13"],
            }),
        );
    }
    let c = &s.compute;
    let (name, vmss, resource_id) = match (c.kind, &c.instance_id) {
        (ComputeKind::Vmss, Some(i)) => (
            format!("{}_{i}", c.name),
            c.name.clone(),
            format!("{}/virtualMachines/{i}", c.resource_id()),
        ),
        (ComputeKind::Vmss, None) => (format!("{}_0", c.name), c.name.clone(), c.resource_id()),
        (ComputeKind::Vm, _) => (c.name.clone(), String::new(), c.resource_id()),
    };
    let compute = json!({
        "azEnvironment": "AzurePublicCloud",
        "location": s.cloud.location(),
        "name": name,
        "osType": "Linux",
        "provider": "Microsoft.Compute",
        "resourceGroupName": c.resource_group,
        "resourceId": resource_id,
        "subscriptionId": c.subscription_id,
        "vmScaleSetName": vmss,
        "vmId": stable_vm_id(&resource_id),
        "vmSize": "Standard_D2s_v3",
    });
    if path.ends_with("/compute") {
        return json(StatusCode::OK, &compute);
    }
    json(
        StatusCode::OK,
        &json!({
            "compute": compute,
            "network": {"interface": []},
        }),
    )
}

/// A GUID-shaped id derived from the resource id (stable across requests).
fn stable_vm_id(resource_id: &str) -> String {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(resource_id.to_ascii_lowercase().as_bytes());
    let h: String = d.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}
