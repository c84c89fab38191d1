//! The simulated Azure Resource Manager: GET and PATCH of VM and VMSS identities, with bearer
//! verification, ARM's merge semantics for `userAssignedIdentities`, the 150-per-request limit,
//! long-running operations, throttling and injected failures.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http::{HeaderValue, Method, StatusCode};
use serde_json::{Map, Value, json};

use crate::error::Error;
use crate::http::{Handler, Req, Resp, ServerHandle, json, loopback_listener, spawn_server};
use crate::util::{guid, now_secs, rfc3339};
use crate::world::{
    AssignedEntry, Cloud, Compute, ComputeKind, ComputeRef, PendingOp, ResourceIdentityType, State,
};

/// ARM's limit on user-assigned identities in one request.
pub const ARM_MAX_IDENTITIES_PER_REQUEST: usize = 150;

/// Audiences ARM accepts.
const ARM_AUDIENCES: [&str; 4] = [
    "https://management.core.windows.net/",
    "https://management.core.windows.net",
    "https://management.azure.com/",
    "https://management.azure.com",
];

/// One ARM request as logged: never a body, token or secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArmCall {
    /// HTTP method.
    pub method: String,
    /// Request path (no query).
    pub path: String,
    /// Status answered.
    pub status: u16,
    /// Identity resource ids the request asked to add (PATCH).
    pub added: Vec<String>,
    /// Identity resource ids the request asked to remove (PATCH).
    pub removed: Vec<String>,
}

#[derive(Debug, Clone)]
struct Injected {
    status: StatusCode,
    code: String,
    message: String,
    retry_after: Option<u64>,
}

#[derive(Debug)]
struct Config {
    reject_concurrent_updates: bool,
    operation_duration: Duration,
    linked_authorization_failed: HashSet<String>,
    inject: VecDeque<Injected>,
}

#[derive(Debug, Default)]
struct Counters {
    gets: HashMap<String, u64>,
    patches: HashMap<String, u64>,
    overlapping: HashMap<String, u64>,
}

#[derive(Debug)]
struct Shared {
    cloud: Cloud,
    config: Mutex<Config>,
    log: Mutex<Vec<ArmCall>>,
    counters: Mutex<Counters>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running simulated ARM.
#[derive(Debug)]
pub struct ArmHandle {
    server: ServerHandle,
    shared: Arc<Shared>,
}

/// Builds a simulated ARM with its behaviour set before the first request
/// ([`ArmHandle::builder`]).
#[derive(Debug, Clone, Default)]
pub struct ArmBuilder {
    operation_duration: Duration,
    reject_concurrent_updates: bool,
}

impl ArmBuilder {
    /// How long each PATCH's long-running operation stays `InProgress` (real ARM: tens of
    /// seconds for a scale set's identities). The PATCH answers at once, `200` with
    /// `provisioningState: Updating` and an `Azure-AsyncOperation` URL, as ARM does; the
    /// identities change when the operation completes.
    pub fn operation_duration(mut self, d: Duration) -> Self {
        self.operation_duration = d;
        self
    }

    /// See [`ArmHandle::set_reject_concurrent_updates`].
    pub fn reject_concurrent_updates(mut self, reject: bool) -> Self {
        self.reject_concurrent_updates = reject;
        self
    }

    /// Binds `127.0.0.1:0` and serves. Must be called inside a tokio runtime.
    pub fn start(self, cloud: &Cloud) -> Result<ArmHandle, Error> {
        self.serve(cloud, loopback_listener()?)
    }

    /// Serves on `listener`. Must be called inside a tokio runtime.
    pub fn serve(self, cloud: &Cloud, listener: std::net::TcpListener) -> Result<ArmHandle, Error> {
        let arm = serve_arm(cloud, listener)?;
        arm.set_operation_duration(self.operation_duration);
        arm.set_reject_concurrent_updates(self.reject_concurrent_updates);
        Ok(arm)
    }
}

impl ArmHandle {
    /// Binds `127.0.0.1:0` and serves. Must be called inside a tokio runtime.
    pub fn start(cloud: &Cloud) -> Result<Self, Error> {
        serve_arm(cloud, loopback_listener()?)
    }

    /// A builder for a simulated ARM with non-default behaviour (long-running operations).
    pub fn builder() -> ArmBuilder {
        ArmBuilder::default()
    }

    /// The base URL (resource manager endpoint), `http://<addr>` without a trailing slash.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The server (address, unreachable switch).
    pub fn server(&self) -> &ServerHandle {
        &self.server
    }

    /// How long a PATCH's long-running operation stays `InProgress` (default zero: the first
    /// poll sees `Succeeded`). The assignment takes effect when the operation completes.
    pub fn set_operation_duration(&self, d: Duration) {
        lock(&self.shared.config).operation_duration = d;
    }

    /// Makes PATCHes that assign `identity_resource_id` fail with 403 LinkedAuthorizationFailed.
    pub fn deny_linked_authorization(&self, identity_resource_id: &str) {
        lock(&self.shared.config)
            .linked_authorization_failed
            .insert(identity_resource_id.to_ascii_lowercase());
    }

    /// Answers the next `n` VM/VMSS requests with 429 `TooManyRequests` and `Retry-After`.
    pub fn throttle_next(&self, n: usize, retry_after_secs: u64) {
        let inj = Injected {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: "TooManyRequests".to_owned(),
            message: "The request is being throttled as the limit has been reached for operation type - Write_1Min. For more information, see - https://aka.ms/VMSSThrottling".to_owned(),
            retry_after: Some(retry_after_secs),
        };
        lock(&self.shared.config)
            .inject
            .extend(std::iter::repeat_n(inj, n));
    }

    /// Answers the next `n` VM/VMSS requests with `status` (e.g. 500, 503) and an ARM error body.
    pub fn fail_next(&self, n: usize, status: u16) {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let inj = Injected {
            status,
            code: if status == StatusCode::SERVICE_UNAVAILABLE {
                "ServiceUnavailable"
            } else {
                "InternalServerError"
            }
            .to_owned(),
            message: "The server encountered an internal error. Please retry the request."
                .to_owned(),
            retry_after: None,
        };
        lock(&self.shared.config)
            .inject
            .extend(std::iter::repeat_n(inj, n));
    }

    /// When set, a PATCH that arrives while an earlier operation on the same VM/VMSS is still in
    /// progress gets 409 `Conflict` (as ARM may answer); by default it is accepted and applied
    /// after the earlier one.
    pub fn set_reject_concurrent_updates(&self, reject: bool) {
        lock(&self.shared.config).reject_concurrent_updates = reject;
    }

    /// PATCHes of this VM/VMSS that arrived while an earlier operation on it was in progress.
    pub fn overlapping_patch_count(&self, compute: &ComputeRef) -> u64 {
        let key = compute.resource_id().to_ascii_lowercase();
        lock(&self.shared.counters)
            .overlapping
            .get(&key)
            .copied()
            .unwrap_or(0)
    }

    /// Every request so far.
    pub fn calls(&self) -> Vec<ArmCall> {
        lock(&self.shared.log).clone()
    }

    /// GETs of this VM/VMSS so far.
    pub fn get_count(&self, compute: &ComputeRef) -> u64 {
        let key = compute.resource_id().to_ascii_lowercase();
        lock(&self.shared.counters)
            .gets
            .get(&key)
            .copied()
            .unwrap_or(0)
    }

    /// PATCHes of this VM/VMSS so far (every outcome).
    pub fn patch_count(&self, compute: &ComputeRef) -> u64 {
        let key = compute.resource_id().to_ascii_lowercase();
        lock(&self.shared.counters)
            .patches
            .get(&key)
            .copied()
            .unwrap_or(0)
    }
}

/// Serves the simulated ARM on `listener`. Must be called inside a tokio runtime.
pub fn serve_arm(cloud: &Cloud, listener: std::net::TcpListener) -> Result<ArmHandle, Error> {
    let shared = Arc::new(Shared {
        cloud: cloud.clone(),
        config: Mutex::new(Config {
            reject_concurrent_updates: false,
            operation_duration: Duration::ZERO,
            linked_authorization_failed: HashSet::new(),
            inject: VecDeque::new(),
        }),
        log: Mutex::new(Vec::new()),
        counters: Mutex::new(Counters::default()),
    });
    let s = shared.clone();
    let handler: Handler = Arc::new(move |req| {
        let s = s.clone();
        Box::pin(async move { Some(handle(&s, req)) })
    });
    Ok(ArmHandle {
        server: spawn_server(listener, handler)?,
        shared,
    })
}

fn arm_error(status: StatusCode, code: &str, message: &str) -> Resp {
    json(
        status,
        &json!({"error": {"code": code, "message": message}}),
    )
}

/// What a handler decided, plus what goes into the call log.
struct Outcome {
    resp: Resp,
    added: Vec<String>,
    removed: Vec<String>,
}

impl From<Resp> for Outcome {
    fn from(resp: Resp) -> Self {
        Outcome {
            resp,
            added: Vec::new(),
            removed: Vec::new(),
        }
    }
}

fn handle(s: &Shared, req: Req) -> Resp {
    let path = req.uri.path().to_owned();
    let out = dispatch(s, &req, &path);
    tracing::debug!(method = %req.method, path, status = out.resp.status().as_u16(), "ARM request");
    lock(&s.log).push(ArmCall {
        method: req.method.to_string(),
        path,
        status: out.resp.status().as_u16(),
        added: out.added,
        removed: out.removed,
    });
    out.resp
}

fn dispatch(s: &Shared, req: &Req, path: &str) -> Outcome {
    if let Err(r) = authenticate(s, req) {
        return (*r).into();
    }
    let api_version = req.query().into_iter().find(|(k, _)| k == "api-version");
    if api_version.is_none() {
        return arm_error(
            StatusCode::BAD_REQUEST,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        )
        .into();
    }
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let lower: Vec<String> = segs.iter().map(|s| s.to_ascii_lowercase()).collect();
    let l: Vec<&str> = lower.iter().map(String::as_str).collect();
    match l.as_slice() {
        [
            "subscriptions",
            _,
            "resourcegroups",
            _,
            "providers",
            "microsoft.compute",
            kind,
            _,
        ] if *kind == "virtualmachinescalesets" || *kind == "virtualmachines" => {
            let r = ComputeRef {
                kind: if *kind == "virtualmachines" {
                    ComputeKind::Vm
                } else {
                    ComputeKind::Vmss
                },
                subscription_id: segs[1].to_owned(),
                resource_group: segs[3].to_owned(),
                name: segs[7].to_owned(),
                instance_id: None,
            };
            compute_request(s, req, &r, api_version.map(|(_, v)| v).unwrap_or_default())
        }
        [
            "subscriptions",
            _,
            "providers",
            "microsoft.compute",
            "locations",
            _,
            "operations",
            _,
        ] if req.method == Method::GET => operation_status(s, segs[7]).into(),
        _ => arm_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("The requested path '{path}' was not found."),
        )
        .into(),
    }
}

fn authenticate(s: &Shared, req: &Req) -> Result<(), Box<Resp>> {
    let unauthorized = |code: &str, message: &str| -> Box<Resp> {
        let mut r = arm_error(StatusCode::UNAUTHORIZED, code, message);
        let challenge = format!(
            "Bearer authorization_uri=\"https://login.windows.net/{}\", error=\"invalid_token\", error_description=\"{}\"",
            s.cloud.tenant_id(),
            message.replace('"', "'")
        );
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            r.headers_mut().insert(http::header::WWW_AUTHENTICATE, v);
        }
        Box::new(r)
    };
    let Some(auth) = req.header("authorization") else {
        return Err(unauthorized(
            "AuthenticationFailed",
            "Authentication failed. The 'Authorization' header is missing.",
        ));
    };
    let Some(token) = auth
        .strip_prefix("Bearer ")
        .or_else(|| auth.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
    else {
        return Err(unauthorized(
            "AuthenticationFailed",
            "Authentication failed. The 'Authorization' header is provided in an invalid format.",
        ));
    };
    let claims = match s.cloud.verify_access_token(token) {
        Ok(c) => c,
        Err(Error::InvalidToken(e))
            if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature) =>
        {
            return Err(unauthorized(
                "ExpiredAuthenticationToken",
                "The access token expiry UTC time is earlier than current UTC time.",
            ));
        }
        Err(_) => {
            return Err(unauthorized(
                "InvalidAuthenticationToken",
                "The access token is invalid.",
            ));
        }
    };
    if !ARM_AUDIENCES.contains(&claims.aud.as_str()) {
        return Err(unauthorized(
            "InvalidAuthenticationTokenAudience",
            &format!(
                "The access token has been obtained for wrong audience or resource '{}'. It should exactly match with one of the allowed audiences '{}'.",
                claims.aud,
                ARM_AUDIENCES.join("','")
            ),
        ));
    }
    Ok(())
}

fn compute_request(s: &Shared, req: &Req, r: &ComputeRef, api_version: String) -> Outcome {
    let key = r.resource_id().to_ascii_lowercase();
    {
        let mut c = lock(&s.counters);
        let map = if req.method == Method::PATCH {
            &mut c.patches
        } else {
            &mut c.gets
        };
        *map.entry(key.clone()).or_default() += 1;
    }
    if req.method != Method::GET && req.method != Method::PATCH {
        return arm_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "The requested method is not supported by this simulator.",
        )
        .into();
    }
    let injected = lock(&s.config).inject.pop_front();
    if let Some(inj) = injected {
        let mut resp = arm_error(inj.status, &inj.code, &inj.message);
        if let Some(secs) = inj.retry_after {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        return resp.into();
    }
    let cloud = &s.cloud;
    let mut st = cloud.state();
    let Some(compute) = st.computes.get(&key).cloned() else {
        let ty = match r.kind {
            ComputeKind::Vm => "Microsoft.Compute/virtualMachines",
            ComputeKind::Vmss => "Microsoft.Compute/virtualMachineScaleSets",
        };
        return arm_error(
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
            &format!(
                "The Resource '{ty}/{}' under resource group '{}' was not found. For more details please go to https://aka.ms/ARMResourceNotFoundFix",
                r.name, r.resource_group
            ),
        )
        .into();
    };
    if req.method == Method::GET {
        return json(StatusCode::OK, &resource_body(&st, cloud, &compute)).into();
    }
    if compute.provisioning_state.eq_ignore_ascii_case("Deleting") {
        let what = match r.kind {
            ComputeKind::Vm => "VM",
            ComputeKind::Vmss => "VM scale set",
        };
        return arm_error(
            StatusCode::CONFLICT,
            "OperationNotAllowed",
            &format!(
                "Operation 'Update' is not allowed on {what} '{}' since it is marked for deletion. You can only retry the Delete operation (or wait for an ongoing one to complete).",
                compute.r.name
            ),
        )
        .into();
    }
    if st.ops.iter().any(|o| !o.done && o.compute_key == key) {
        *lock(&s.counters)
            .overlapping
            .entry(key.clone())
            .or_default() += 1;
        if lock(&s.config).reject_concurrent_updates {
            return arm_error(
                StatusCode::CONFLICT,
                "Conflict",
                "The request failed due to conflict with a concurrent request. To resolve it, please refer to https://aka.ms/activitylog to get more details on the conflicting requests.",
            )
            .into();
        }
    }
    let body: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => {
            return arm_error(
                StatusCode::BAD_REQUEST,
                "InvalidRequestContent",
                &format!("The request content was invalid and could not be deserialized: '{e}'."),
            )
            .into();
        }
    };
    // Start from the state the last pending operation will leave, so PATCHes compose.
    let (mut system, mut user) = st
        .ops
        .iter()
        .rev()
        .find(|o| !o.done && o.compute_key == key)
        .map(|o| (o.new_system, o.new_user.clone()))
        .unwrap_or((compute.system, compute.user.clone()));
    let mut added = Vec::new();
    let mut removed = Vec::new();
    if let Some(identity) = body.get("identity").filter(|v| !v.is_null()) {
        let requested_type = match identity.get("type").and_then(Value::as_str) {
            Some(t) => match ResourceIdentityType::parse(t) {
                Some(t) => Some(t),
                None => {
                    return arm_error(
                        StatusCode::BAD_REQUEST,
                        "InvalidParameter",
                        &format!("The value '{t}' of parameter 'identity.type' is not valid."),
                    )
                    .into();
                }
            },
            None => None,
        };
        let map = identity
            .get("userAssignedIdentities")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        if map.len() > ARM_MAX_IDENTITIES_PER_REQUEST {
            return arm_error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!(
                    "User Assigned Identities Number '{}' Assign exceed limit '{ARM_MAX_IDENTITIES_PER_REQUEST}' in one request.",
                    map.len()
                ),
            )
            .into();
        }
        for (id, v) in &map {
            if v.is_null() {
                removed.push(id.clone());
            } else {
                added.push(id.clone());
            }
        }
        let denied: Vec<&String> = {
            let cfg = lock(&s.config);
            added
                .iter()
                .filter(|id| {
                    cfg.linked_authorization_failed
                        .contains(&id.to_ascii_lowercase())
                })
                .collect()
        };
        if !denied.is_empty() {
            let list: Vec<&str> = denied.iter().map(|s| s.as_str()).collect();
            return Outcome {
                resp: arm_error(
                    StatusCode::FORBIDDEN,
                    "LinkedAuthorizationFailed",
                    &format!(
                        "The client '{caller}' with object id '{caller}' has permission to perform action 'Microsoft.Compute/{}/write' on scope '{}'; however, it does not have permission to perform action 'Microsoft.ManagedIdentity/userAssignedIdentities/assign/action' on the linked scope(s) '{}' or the linked scope(s) are invalid.",
                        compute.r.kind.arm_type(),
                        compute.r.resource_id(),
                        list.join(","),
                        caller = guid(),
                    ),
                ),
                added,
                removed,
            };
        }
        let missing: Vec<&str> = added
            .iter()
            .filter(|id| !st.identities.contains_key(&id.to_ascii_lowercase()))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            let resp = arm_error(
                StatusCode::BAD_REQUEST,
                "FailedIdentityOperation",
                &format!(
                    "Identity (principal id) operation for resource '{}' failed with error 'Failed to perform resource identity operation. Status: 'NotFound'. Response: '{{\"error\":{{\"code\":\"NotFound\",\"message\":\"Resource '{}' does not exist.\"}}}}'.'.",
                    compute.r.name,
                    missing.join(",")
                ),
            );
            return Outcome {
                resp,
                added,
                removed,
            };
        }
        let wants_user = requested_type.is_none_or(ResourceIdentityType::has_user);
        if let Some(t) = requested_type {
            system = t.has_system();
        }
        if wants_user {
            merge(&st, &mut user, &map);
            if requested_type.is_some() && user.is_empty() {
                return Outcome {
                    resp: arm_error(
                        StatusCode::BAD_REQUEST,
                        "InvalidParameter",
                        "Parameter 'identity.userAssignedIdentities' cannot be empty when the identity type includes 'UserAssigned'.",
                    ),
                    added,
                    removed,
                };
            }
        } else {
            user.clear();
        }
    }
    let duration = lock(&s.config).operation_duration;
    let op_id = guid();
    st.ops.push(PendingOp {
        id: op_id.clone(),
        compute_key: key.clone(),
        completes_at: Instant::now() + duration,
        started_secs: now_secs(),
        new_system: system,
        new_user: user.clone(),
        done: false,
    });
    if let Some(c) = st.computes.get_mut(&key) {
        c.provisioning_state = "Updating".to_owned();
    }
    let mut preview = compute.clone();
    preview.system = system;
    preview.user = user;
    preview.provisioning_state = "Updating".to_owned();
    let body = resource_body(&st, cloud, &preview);
    drop(st);
    let mut resp = json(StatusCode::OK, &body);
    let op_url = format!(
        "{}/subscriptions/{}/providers/Microsoft.Compute/locations/{}/operations/{op_id}?api-version={}",
        req.base_url(),
        r.subscription_id,
        cloud.location(),
        api_version
    );
    if let Ok(v) = HeaderValue::from_str(&op_url) {
        resp.headers_mut().insert("azure-asyncoperation", v);
    }
    Outcome {
        resp,
        added,
        removed,
    }
}

/// ARM's merge of `userAssignedIdentities`: `{}` adds, `null` removes, keys case-insensitive.
fn merge(st: &State, user: &mut BTreeMap<String, AssignedEntry>, map: &Map<String, Value>) {
    for (id, v) in map {
        let k = id.to_ascii_lowercase();
        if v.is_null() {
            user.remove(&k);
        } else {
            // An existing (possibly stale) entry is kept as it is.
            user.entry(k).or_insert_with(|| st.new_entry(id));
        }
    }
}

fn resource_body(st: &State, cloud: &Cloud, c: &Compute) -> Value {
    let ty = c.identity_type();
    let mut identity = json!({"type": ty.as_arm_str()});
    if let Some((principal, _)) = c.system_ids.as_ref().filter(|_| c.system) {
        identity["principalId"] = json!(principal);
        identity["tenantId"] = json!(cloud.tenant_id());
    } else if c.system {
        identity["tenantId"] = json!(cloud.tenant_id());
    }
    if !c.user.is_empty() {
        let mut m = Map::new();
        for (k, e) in &c.user {
            let v = match st.resolve(k, e) {
                Some(id) => json!({"principalId": id.principal_id, "clientId": id.client_id}),
                None => json!({"principalId": null, "clientId": null}),
            };
            m.insert(e.resource_id.clone(), v);
        }
        identity["userAssignedIdentities"] = Value::Object(m);
    }
    let arm_type = format!("Microsoft.Compute/{}", c.r.kind.arm_type());
    let mut body = json!({
        "name": c.r.name,
        "id": c.r.resource_id(),
        "type": arm_type,
        "location": cloud.location(),
        "properties": {"provisioningState": c.provisioning_state},
    });
    if ty != ResourceIdentityType::None {
        body["identity"] = identity;
    }
    if c.r.kind == ComputeKind::Vmss {
        body["sku"] = json!({"name": "Standard_D2s_v3", "tier": "Standard", "capacity": 1});
    }
    body
}

fn operation_status(s: &Shared, id: &str) -> Resp {
    let st = s.cloud.state();
    let Some(op) = st.ops.iter().find(|o| o.id.eq_ignore_ascii_case(id)) else {
        return arm_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("The operation '{id}' was not found."),
        );
    };
    let mut body = json!({
        "startTime": rfc3339(op.started_secs),
        "status": if op.done { "Succeeded" } else { "InProgress" },
        "name": op.id,
    });
    if op.done {
        body["endTime"] = json!(rfc3339(now_secs()));
    }
    json(StatusCode::OK, &body)
}
