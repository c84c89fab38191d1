//! The simulated Entra ID (login.microsoftonline.com): token endpoints v1 and v2 with the
//! client-credentials grant (client secret, certificate assertion, federated assertion),
//! OpenID discovery documents, signing keys and MSAL's instance discovery. The checks of client
//! assertions are in [`assertion`].

mod assertion;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::error::Error;
use crate::http::{Handler, Req, Resp, ServerHandle, json, loopback_listener, spawn_server};
use crate::util::{entra_timestamp, guid, now_secs};
use crate::world::Cloud;
use assertion::{peek_claims, verify_certificate_assertion, verify_federated_assertion};

/// `client_assertion_type` for JWT assertions.
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How the client authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantKind {
    /// `client_secret`.
    Secret,
    /// Certificate-signed client assertion.
    Certificate,
    /// External token matched by a federated identity credential.
    Federated,
    /// Could not tell (request rejected before that).
    Unknown,
}

/// One request to the token endpoint. Holds no secret, token or assertion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntraCall {
    /// `v1` (`/oauth2/token`) or `v2` (`/oauth2/v2.0/token`).
    pub version: &'static str,
    /// The `client_id` parameter as sent.
    pub client_id: String,
    /// How the client authenticated.
    pub grant: GrantKind,
    /// The resource (v1) or the resource derived from the scope (v2).
    pub resource: String,
    /// HTTP status answered.
    pub status: u16,
    /// AADSTS code for failures.
    pub error_code: Option<u32>,
}

/// Injected faults of one Entra server.
#[derive(Debug, Default)]
struct Faults {
    latency: Duration,
    fail_next: VecDeque<StatusCode>,
}

/// A running simulated Entra.
#[derive(Debug)]
pub struct EntraHandle {
    server: ServerHandle,
    cloud: Cloud,
    faults: Arc<Mutex<Faults>>,
}

impl EntraHandle {
    /// Binds `127.0.0.1:0` and serves. Must be called inside a tokio runtime.
    pub fn start(cloud: &Cloud) -> Result<Self, Error> {
        serve_entra(cloud, loopback_listener()?)
    }

    /// The authority host, e.g. `http://127.0.0.1:1234` (no trailing slash); the token
    /// endpoint is `<url>/<tenant>/oauth2/token`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// `<url>/<tenant>/oauth2/token`.
    pub fn token_url_v1(&self) -> String {
        format!("{}/{}/oauth2/token", self.url(), self.cloud.tenant_id())
    }

    /// `<url>/<tenant>/oauth2/v2.0/token`.
    pub fn token_url_v2(&self) -> String {
        format!(
            "{}/{}/oauth2/v2.0/token",
            self.url(),
            self.cloud.tenant_id()
        )
    }

    /// The server (address, unreachable switch).
    pub fn server(&self) -> &ServerHandle {
        &self.server
    }

    /// Every token request so far (all Entra servers of this cloud).
    pub fn calls(&self) -> Vec<EntraCall> {
        self.cloud.entra_calls()
    }

    /// Delays every token answer by `latency`.
    pub fn set_latency(&self, latency: Duration) {
        lock(&self.faults).latency = latency;
    }

    /// Answers the next `n` token requests with `status` (e.g. 500, 503) and an AADSTS body.
    pub fn fail_next(&self, n: usize, status: u16) {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        lock(&self.faults)
            .fail_next
            .extend(std::iter::repeat_n(status, n));
    }

    /// While set, connections are closed without an answer.
    pub fn set_unreachable(&self, unreachable: bool) {
        self.server.set_unreachable(unreachable);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Cloud {
    /// Every token request the simulated Entra answered so far (all servers of this cloud).
    pub fn entra_calls(&self) -> Vec<EntraCall> {
        self.inner
            .entra_log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Successful token requests for `client_id`.
    pub fn entra_tokens_issued(&self, client_id: &str) -> usize {
        self.entra_calls()
            .iter()
            .filter(|c| c.status == 200 && c.client_id.eq_ignore_ascii_case(client_id))
            .count()
    }

    fn log_entra(&self, call: EntraCall) {
        self.inner
            .entra_log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(call);
    }
}

/// Serves the simulated Entra on `listener`. Must be called inside a tokio runtime.
pub fn serve_entra(cloud: &Cloud, listener: std::net::TcpListener) -> Result<EntraHandle, Error> {
    let c = cloud.clone();
    let faults = Arc::new(Mutex::new(Faults::default()));
    let f = faults.clone();
    let handler: Handler = Arc::new(move |req| {
        let c = c.clone();
        let f = f.clone();
        Box::pin(async move { Some(route(&c, &f, req).await) })
    });
    Ok(EntraHandle {
        server: spawn_server(listener, handler)?,
        cloud: cloud.clone(),
        faults,
    })
}

async fn route(cloud: &Cloud, faults: &Mutex<Faults>, req: Req) -> Resp {
    let path = req.uri.path().to_owned();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let base = req.base_url();
    match (req.method.clone(), segs.as_slice()) {
        (Method::POST, [tenant, "oauth2", "token"]) => {
            token(cloud, faults, &req, tenant, false).await
        }
        (Method::POST, [tenant, "oauth2", "v2.0", "token"]) => {
            token(cloud, faults, &req, tenant, true).await
        }
        (Method::GET, [tenant, "v2.0", ".well-known", "openid-configuration"]) => {
            match resolve_tenant(cloud, tenant) {
                Ok(t) => json(StatusCode::OK, &openid_configuration(&base, &t, true)),
                Err(e) => e.response(),
            }
        }
        (Method::GET, [tenant, ".well-known", "openid-configuration"]) => {
            match resolve_tenant(cloud, tenant) {
                Ok(t) => json(StatusCode::OK, &openid_configuration(&base, &t, false)),
                Err(e) => e.response(),
            }
        }
        (Method::GET, [_, "discovery", "v2.0", "keys"])
        | (Method::GET, [_, "discovery", "keys"]) => json(StatusCode::OK, &cloud.jwks()),
        (Method::GET, [_, "discovery", "instance"]) => {
            let host = base.trim_start_matches("http://").to_owned();
            json(
                StatusCode::OK,
                &json!({
                    "tenant_discovery_endpoint":
                        format!("{base}/{}/v2.0/.well-known/openid-configuration", cloud.tenant_id()),
                    "api-version": "1.1",
                    "metadata": [{
                        "preferred_network": host,
                        "preferred_cache": host,
                        "aliases": [host],
                    }],
                }),
            )
        }
        _ => json(
            StatusCode::NOT_FOUND,
            &json!({"error": "not_found", "error_description": format!("no route for {path}")}),
        ),
    }
}

fn openid_configuration(base: &str, tenant: &str, v2: bool) -> Value {
    if v2 {
        json!({
            "token_endpoint": format!("{base}/{tenant}/oauth2/v2.0/token"),
            "token_endpoint_auth_methods_supported":
                ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "jwks_uri": format!("{base}/{tenant}/discovery/v2.0/keys"),
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": format!("{base}/{tenant}/v2.0"),
            "request_uri_parameter_supported": false,
            "authorization_endpoint": format!("{base}/{tenant}/oauth2/v2.0/authorize"),
            "device_authorization_endpoint": format!("{base}/{tenant}/oauth2/v2.0/devicecode"),
            "end_session_endpoint": format!("{base}/{tenant}/oauth2/v2.0/logout"),
            "tenant_region_scope": "EU",
            "cloud_instance_name": "microsoftonline.com",
        })
    } else {
        json!({
            "token_endpoint": format!("{base}/{tenant}/oauth2/token"),
            "token_endpoint_auth_methods_supported":
                ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "jwks_uri": format!("{base}/common/discovery/keys"),
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "issuer": format!("https://sts.windows.net/{tenant}/"),
            "authorization_endpoint": format!("{base}/{tenant}/oauth2/authorize"),
            "tenant_region_scope": "EU",
            "cloud_instance_name": "microsoftonline.com",
        })
    }
}

/// An AADSTS error as Entra writes it.
#[derive(Debug, Clone)]
pub(crate) struct AadError {
    status: StatusCode,
    error: &'static str,
    code: u32,
    message: String,
}

impl AadError {
    fn new(status: StatusCode, error: &'static str, code: u32, message: impl Into<String>) -> Self {
        Self {
            status,
            error,
            code,
            message: message.into(),
        }
    }

    fn invalid_request(code: u32, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", code, message)
    }

    fn invalid_client(code: u32, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_client", code, message)
    }

    fn missing(param: &str) -> Self {
        Self::invalid_request(
            900_144,
            format!("The request body must contain the following parameter: '{param}'."),
        )
    }

    fn response(&self) -> Resp {
        let trace = guid();
        let corr = guid();
        let ts = entra_timestamp(now_secs());
        json(
            self.status,
            &json!({
                "error": self.error,
                "error_description": format!(
                    "AADSTS{}: {} Trace ID: {trace} Correlation ID: {corr} Timestamp: {ts}",
                    self.code, self.message
                ),
                "error_codes": [self.code],
                "timestamp": ts,
                "trace_id": trace,
                "correlation_id": corr,
                "error_uri": format!("https://login.microsoftonline.com/error?code={}", self.code),
            }),
        )
    }
}

fn resolve_tenant(cloud: &Cloud, tenant: &str) -> Result<String, AadError> {
    if tenant.eq_ignore_ascii_case(cloud.tenant_id()) {
        Ok(cloud.tenant_id().to_owned())
    } else {
        Err(AadError::invalid_request(
            90_002,
            format!(
                "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."
            ),
        ))
    }
}

/// The parsed form of a token request.
struct TokenForm {
    params: Vec<(String, String)>,
}

impl TokenForm {
    fn get(&self, k: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }
}

async fn token(cloud: &Cloud, faults: &Mutex<Faults>, req: &Req, tenant: &str, v2: bool) -> Resp {
    let (latency, fail) = {
        let mut f = lock(faults);
        (f.latency, f.fail_next.pop_front())
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let mut form = TokenForm {
        params: url::form_urlencoded::parse(&req.body)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect(),
    };
    // client_secret_basic: credentials in `Authorization: Basic` (RFC 6749 §2.3.1).
    if let Some((id, secret)) = req.header("authorization").and_then(basic_credentials) {
        if form.get("client_id").is_none() {
            form.params.push(("client_id".to_owned(), id));
        }
        if form.get("client_secret").is_none() {
            form.params.push(("client_secret".to_owned(), secret));
        }
    }
    let mut call = EntraCall {
        version: if v2 { "v2" } else { "v1" },
        client_id: form.get("client_id").unwrap_or_default().to_owned(),
        grant: GrantKind::Unknown,
        resource: String::new(),
        status: 200,
        error_code: None,
    };
    let result = match fail {
        Some(status) => Err(AadError::new(
            status,
            "temporarily_unavailable",
            if status == StatusCode::SERVICE_UNAVAILABLE {
                90_033
            } else {
                90_100
            },
            "The service is temporarily unavailable. Please try again later.",
        )),
        None => grant(cloud, &form, tenant, v2, &mut call).await,
    };
    let resp = match result {
        Ok(body) => json(StatusCode::OK, &body),
        Err(e) => {
            call.status = e.status.as_u16();
            call.error_code = Some(e.code);
            tracing::debug!(client_id = %call.client_id, code = e.code, "token request refused");
            e.response()
        }
    };
    cloud.log_entra(call);
    resp
}

async fn grant(
    cloud: &Cloud,
    form: &TokenForm,
    tenant: &str,
    v2: bool,
    call: &mut EntraCall,
) -> Result<Value, AadError> {
    let tenant = resolve_tenant(cloud, tenant)?;
    let grant_type = form
        .get("grant_type")
        .ok_or_else(|| AadError::missing("grant_type"))?;
    if grant_type != "client_credentials" {
        return Err(AadError::new(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70_003,
            "The app requested an unsupported grant type.",
        ));
    }
    let resource = if v2 {
        let scope = form
            .get("scope")
            .ok_or_else(|| AadError::missing("scope"))?;
        let Some(res) = scope.trim().strip_suffix("/.default") else {
            return Err(AadError::new(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                1_002_012,
                format!(
                    "The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."
                ),
            ));
        };
        if res.is_empty() || res.contains(' ') {
            return Err(AadError::new(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                70_011,
                format!(
                    "The provided value for the input parameter 'scope' is not valid. The scope {scope} is not valid."
                ),
            ));
        }
        res.to_owned()
    } else {
        form.get("resource")
            .ok_or_else(|| AadError::missing("resource"))?
            .to_owned()
    };
    call.resource = resource.clone();
    // Authentication comes first; an unknown resource is reported after it (below).
    let unknown_resource = cloud.is_resource_unknown(&resource);
    let client_id = form
        .get("client_id")
        .ok_or_else(|| AadError::missing("client_id"))?;
    let Some(app) = cloud.app(client_id) else {
        return Err(AadError::new(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700_016,
            format!(
                "Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant."
            ),
        ));
    };
    if let Some(secret) = form.get("client_secret") {
        call.grant = GrantKind::Secret;
        if !app.secrets.iter().any(|s| s.0 == secret) {
            return Err(AadError::invalid_client(
                7_000_215,
                "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'."
                    .replace("{client_id}", &app.client_id),
            ));
        }
    } else if let Some(assertion) = form.get("client_assertion") {
        match form.get("client_assertion_type") {
            Some(JWT_BEARER) => {}
            Some(other) => {
                return Err(AadError::invalid_request(
                    50_027,
                    format!("Invalid client_assertion_type '{other}'."),
                ));
            }
            None => return Err(AadError::missing("client_assertion_type")),
        }
        let claims = peek_claims(assertion)?;
        if claims.iss.as_deref() == Some(app.client_id.as_str())
            || claims
                .iss
                .as_deref()
                .is_some_and(|i| i.eq_ignore_ascii_case(&app.client_id))
        {
            call.grant = GrantKind::Certificate;
            verify_certificate_assertion(&app, &tenant, assertion)?;
        } else {
            call.grant = GrantKind::Federated;
            verify_federated_assertion(cloud, &app, assertion, &claims).await?;
        }
    } else {
        return Err(AadError::invalid_client(
            7_000_218,
            "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
        ));
    }
    if unknown_resource {
        return Err(AadError::new(
            StatusCode::BAD_REQUEST,
            "invalid_resource",
            500_011,
            crate::world::unknown_resource_message(&resource, &tenant),
        ));
    }
    let lifetime = cloud.state().entra_token_lifetime;
    // `appidacr`: 1 = client secret, 2 = certificate or assertion.
    let acr = if call.grant == GrantKind::Secret {
        "1"
    } else {
        "2"
    };
    let (token, claims) = cloud.issue_for_app(&app, &resource, lifetime, acr);
    let expires_in = claims.exp - claims.iat;
    Ok(if v2 {
        json!({
            "token_type": "Bearer",
            "expires_in": expires_in,
            "ext_expires_in": expires_in,
            "access_token": token,
        })
    } else {
        json!({
            "token_type": "Bearer",
            "expires_in": expires_in.to_string(),
            "ext_expires_in": expires_in.to_string(),
            "expires_on": claims.exp.to_string(),
            "not_before": claims.nbf.to_string(),
            "resource": resource,
            "access_token": token,
        })
    })
}

/// `(client_id, client_secret)` from an `Authorization: Basic` header (form-urlencoded parts).
fn basic_credentials(header: &str) -> Option<(String, String)> {
    use base64::Engine as _;
    let b64 = header
        .strip_prefix("Basic ")
        .or_else(|| header.strip_prefix("basic "))?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (id, secret) = text.split_once(':')?;
    let decode = |s: &str| {
        url::form_urlencoded::parse(format!("v={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
    };
    Some((decode(id)?, decode(secret)?))
}
