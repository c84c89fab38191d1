//! [`ArmClient`]: GET and PATCH of the `identity` of VMs and VMSS (api-version 2019-12-01),
//! with long-running-operation polling, the per-subscription throttle gate and the
//! drop-and-retry of identities ARM refuses.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use reqwest::header::{CONTENT_TYPE, HeaderMap, LOCATION, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;

use podid_broker::{Clock, HttpTimeouts, SystemClock};

use super::error::{ArmError, ArmOperation, IdList};
use super::ids::{ComputeId, IdentityResourceId};
use super::plan::{IdentityState, MAX_IDS_PER_PATCH, PlannedPatch, changes, plan_patches};
use super::retry_after::parse_retry_after;
use super::token::ArmTokenProvider;

/// The compute API version upstream uses (docs/upstream.md#arm-calls).
pub const API_VERSION: &str = "2019-12-01";

/// Longest ARM error message kept in an [`ArmError`].
const MAX_MESSAGE: usize = 1024;

/// First poll of a long-running operation without `Retry-After`; later polls back off to
/// [`ArmConfig::poll_interval`].
const FIRST_POLL: Duration = Duration::from_millis(250);

/// How the [`ArmClient`] talks to ARM.
#[derive(Debug, Clone)]
pub struct ArmConfig {
    /// The resource manager endpoint (`https://management.azure.com`); tests point it at a
    /// simulator.
    pub base_url: String,
    /// `api-version` of every VM/VMSS request.
    pub api_version: String,
    /// `User-Agent` header.
    pub user_agent: String,
    /// Connect and per-request timeouts.
    pub timeouts: HttpTimeouts,
    /// Longest wait between polls of a long-running operation when ARM sends no
    /// `Retry-After` (autorest's fixed interval, 5 s); the first poll comes after 250 ms and the
    /// wait doubles up to this.
    pub poll_interval: Duration,
    /// Longest wait for one long-running operation (autorest's default, 15 min).
    pub operation_timeout: Duration,
    /// Gate after a 429 without `Retry-After`.
    pub default_throttle: Duration,
    /// Most identity entries in one PATCH (ARM's limit, 150).
    pub max_ids_per_patch: usize,
    /// Use `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` from the environment.
    pub proxy_from_env: bool,
    /// How many times an update ARM refused for some identities (`LinkedAuthorizationFailed`,
    /// `FailedIdentityOperation`) is retried without them (`--update-user-msi-max-retry`,
    /// upstream's default 2). 0: the refusal is returned as the error.
    pub refusal_retries: u32,
    /// Pause before each of those retries (`--update-user-msi-retry-interval`, default 1 s).
    pub refusal_retry_interval: Duration,
}

impl Default for ArmConfig {
    fn default() -> Self {
        Self {
            base_url: "https://management.azure.com".to_owned(),
            api_version: API_VERSION.to_owned(),
            user_agent: concat!("podid-mic/", env!("CARGO_PKG_VERSION")).to_owned(),
            timeouts: HttpTimeouts {
                connect: Duration::from_secs(10),
                total: Duration::from_secs(60),
            },
            poll_interval: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(15 * 60),
            default_throttle: Duration::from_secs(10),
            max_ids_per_patch: MAX_IDS_PER_PATCH,
            proxy_from_env: true,
            refusal_retries: 2,
            refusal_retry_interval: Duration::from_secs(1),
        }
    }
}

/// Building an [`ArmClient`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ArmBuildError {
    /// `base_url` is not an absolute http(s) URL.
    #[error("invalid ARM base URL {url:?}: {reason}")]
    BaseUrl {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The HTTP client could not be built.
    #[error("building the ARM HTTP client")]
    Client(#[source] reqwest::Error),
}

/// What [`ArmClient::update_identities`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpdateOutcome {
    /// Ids added by a PATCH whose operation succeeded.
    pub added: Vec<IdentityResourceId>,
    /// Ids removed by a PATCH whose operation succeeded.
    pub removed: Vec<IdentityResourceId>,
    /// Ids ARM refused (`LinkedAuthorizationFailed`, `FailedIdentityOperation`) and that were
    /// left out of the retry: they are not assigned (or not removed).
    pub dropped: Vec<IdentityResourceId>,
    /// ARM's refusal that caused `dropped`, as text (for events and logs).
    pub dropped_reason: Option<String>,
    /// PATCH requests sent (refused ones included).
    pub patches: usize,
}

impl UpdateOutcome {
    /// Whether nothing had to change (no PATCH was sent).
    pub fn is_noop(&self) -> bool {
        self.patches == 0
    }
}

/// The ARM client MIC assigns identities with. Cheap to share (`Arc` it); every method takes
/// `&self`.
#[derive(Debug)]
pub struct ArmClient {
    http: reqwest::Client,
    base: Url,
    config: ArmConfig,
    tokens: Arc<dyn ArmTokenProvider>,
    clock: Arc<dyn Clock>,
    /// Lower-cased subscription id → no calls before this time.
    gate: Mutex<HashMap<String, SystemTime>>,
    /// One update at a time per VM/VMSS: ARM answers 409 to a PATCH while another one's
    /// operation is still running on the same resource.
    updates: Mutex<HashMap<ComputeId, Arc<tokio::sync::Mutex<()>>>>,
}

/// One answer, read fully.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl ArmClient {
    /// A client for `config.base_url` with tokens from `tokens`.
    pub fn new(
        config: ArmConfig,
        tokens: Arc<dyn ArmTokenProvider>,
    ) -> Result<Self, ArmBuildError> {
        let base = Url::parse(&config.base_url).map_err(|e| ArmBuildError::BaseUrl {
            url: config.base_url.clone(),
            reason: e.to_string(),
        })?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(ArmBuildError::BaseUrl {
                url: config.base_url.clone(),
                reason: "not an http(s) URL".to_owned(),
            });
        }
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            // Losing a race with another installer is fine: a provider is installed either way.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(config.timeouts.connect)
            .timeout(config.timeouts.total)
            .user_agent(config.user_agent.clone())
            .redirect(reqwest::redirect::Policy::none());
        if !config.proxy_from_env {
            builder = builder.no_proxy();
        }
        let http = builder.build().map_err(ArmBuildError::Client)?;
        Ok(Self {
            http,
            base,
            config,
            tokens,
            clock: Arc::new(SystemClock),
            gate: Mutex::new(HashMap::new()),
            updates: Mutex::new(HashMap::new()),
        })
    }

    /// Use `clock` for the throttle gate (tests).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Until when calls to `subscription_id` fail locally with [`ArmError::Throttled`], if they do.
    pub fn throttled_until(&self, subscription_id: &str) -> Option<SystemTime> {
        let now = self.clock.now();
        self.gate
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&subscription_id.to_ascii_lowercase())
            .copied()
            .filter(|until| *until > now)
    }

    /// The identity of `compute` (one GET).
    pub async fn get_identity(&self, compute: &ComputeId) -> Result<IdentityState, ArmError> {
        let operation = ArmOperation::get(compute.kind());
        let answer = self
            .call(compute, operation, Method::GET, None, &[])
            .await?;
        IdentityState::from_resource(&answer.body).map_err(|reason| ArmError::InvalidResponse {
            compute: compute.clone(),
            operation,
            reason,
        })
    }

    /// Makes `add` assigned and `remove` unassigned on `compute` (docs/upstream.md#arm-calls): one
    /// GET, then PATCHes of only the real changes in chunks of at most 150, each followed by its
    /// long-running operation. Nothing to change → no PATCH. A resource in `Deleting` is refused
    /// before any PATCH. If ARM refuses some identities (`LinkedAuthorizationFailed`,
    /// `FailedIdentityOperation`), the ids named in its message are dropped and the rest is tried
    /// again after [`ArmConfig::refusal_retry_interval`], at most [`ArmConfig::refusal_retries`]
    /// times; the outcome lists the dropped ids. Concurrent calls for the same resource run one
    /// after the other.
    pub async fn update_identities(
        &self,
        compute: &ComputeId,
        add: &[IdentityResourceId],
        remove: &[IdentityResourceId],
    ) -> Result<UpdateOutcome, ArmError> {
        let mut outcome = UpdateOutcome::default();
        if add.is_empty() && remove.is_empty() {
            tracing::debug!(%compute, "No identities to assign or un-assign");
            return Ok(outcome);
        }
        let serial = self
            .updates
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(compute.clone())
            .or_default()
            .clone();
        let _one_at_a_time = serial.lock().await;
        let mut add = add.to_vec();
        let mut remove = remove.to_vec();
        let mut retries_left = self.config.refusal_retries;
        loop {
            let state = self.get_identity(compute).await?;
            let (to_add, to_remove) = changes(&state, &add, &remove);
            if to_add.is_empty() && to_remove.is_empty() {
                return Ok(outcome);
            }
            if state.is_deleting() {
                return Err(ArmError::Deleting {
                    compute: compute.clone(),
                    add: IdList(to_add),
                    remove: IdList(to_remove),
                });
            }
            let plan = plan_patches(&state, &to_add, &to_remove, self.config.max_ids_per_patch);
            let mut failure = None;
            for patch in plan {
                outcome.patches += 1;
                match self.apply(compute, &patch).await {
                    Ok(()) => {
                        tracing::info!(
                            %compute,
                            added = patch.add.len(),
                            removed = patch.remove.len(),
                            identity_type = patch.identity_type.as_arm_str(),
                            "identities updated"
                        );
                        outcome.added.extend(patch.add);
                        outcome.removed.extend(patch.remove);
                    }
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            let Some(error) = failure else {
                return Ok(outcome);
            };
            let refused = match &error {
                ArmError::IdentitiesRefused { ids, .. } if retries_left > 0 => ids
                    .0
                    .iter()
                    .filter(|id| add.contains(id) || remove.contains(id))
                    .cloned()
                    .collect::<Vec<_>>(),
                _ => Vec::new(),
            };
            if refused.is_empty() {
                return Err(error);
            }
            retries_left -= 1;
            tracing::warn!(%compute, dropped = %IdList(refused.clone()), error = %error,
                "ARM refused identities; retrying without them");
            add.retain(|id| !refused.contains(id));
            remove.retain(|id| !refused.contains(id));
            outcome.dropped_reason = Some(error.to_string());
            outcome.dropped.extend(refused);
            if add.is_empty() && remove.is_empty() {
                return Ok(outcome);
            }
            tokio::time::sleep(self.config.refusal_retry_interval).await;
        }
    }

    /// One PATCH and its long-running operation.
    async fn apply(&self, compute: &ComputeId, patch: &PlannedPatch) -> Result<(), ArmError> {
        let operation = ArmOperation::update(compute.kind());
        let ids = patch.ids();
        let answer = self
            .call(compute, operation, Method::PATCH, Some(patch.body()), &ids)
            .await?;
        self.wait_for_operation(compute, operation, &ids, &answer)
            .await
    }

    /// Follows `Azure-AsyncOperation` (or `Location` on 202) until the operation ends.
    async fn wait_for_operation(
        &self,
        compute: &ComputeId,
        operation: ArmOperation,
        ids: &[IdentityResourceId],
        answer: &Answer,
    ) -> Result<(), ArmError> {
        let (url, async_op) = if let Some(u) = header(&answer.headers, "azure-asyncoperation") {
            (u, true)
        } else if answer.status == StatusCode::ACCEPTED
            && let Some(u) = header(&answer.headers, LOCATION.as_str())
        {
            (u, false)
        } else {
            return Ok(());
        };
        let invalid = |reason: String| ArmError::InvalidResponse {
            compute: compute.clone(),
            operation,
            reason,
        };
        let url = self
            .base
            .join(&url)
            .map_err(|e| invalid(format!("unreadable operation URL: {e}")))?;
        if url.origin() != self.base.origin() {
            return Err(invalid(format!(
                "operation URL on another origin ({}); not sending the token there",
                url.origin().ascii_serialization()
            )));
        }
        let started = tokio::time::Instant::now();
        let deadline = started + self.config.operation_timeout;
        // Without ARM's Retry-After, poll soon and back off to `poll_interval`: most identity
        // updates finish in seconds, and a fixed 5 s first wait is pure latency for the pod.
        let mut backoff = FIRST_POLL.min(self.config.poll_interval);
        let mut next_wait = |headers: &HeaderMap| {
            self.retry_after(headers).unwrap_or_else(|| {
                let wait = backoff;
                backoff = (backoff * 2).min(self.config.poll_interval);
                wait
            })
        };
        let mut wait = next_wait(&answer.headers);
        loop {
            let now = tokio::time::Instant::now();
            if now + wait > deadline {
                if now < deadline {
                    tokio::time::sleep_until(deadline).await;
                }
                return Err(ArmError::OperationTimeout {
                    compute: compute.clone(),
                    operation,
                    ids: IdList(ids.to_vec()),
                    waited: started.elapsed(),
                });
            }
            tokio::time::sleep(wait).await;
            let poll = self
                .send(compute, operation, Method::GET, url.clone(), None, ids)
                .await?;
            wait = next_wait(&poll.headers);
            if poll.status == StatusCode::TOO_MANY_REQUESTS
                || (poll.status == StatusCode::SERVICE_UNAVAILABLE
                    && poll.headers.contains_key(RETRY_AFTER))
            {
                continue;
            }
            if !async_op {
                match poll.status {
                    StatusCode::ACCEPTED => continue,
                    s if s.is_success() => return Ok(()),
                    _ => return Err(self.classify(compute, operation, ids, &poll)),
                }
            }
            if !poll.status.is_success() {
                return Err(self.classify(compute, operation, ids, &poll));
            }
            let status = poll
                .body
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("");
            if status.eq_ignore_ascii_case("Succeeded") {
                return Ok(());
            }
            if status.eq_ignore_ascii_case("Failed") || status.eq_ignore_ascii_case("Canceled") {
                let (code, message) = error_parts(&poll.body);
                if is_identity_refusal(&code, &message) {
                    return Err(ArmError::IdentitiesRefused {
                        compute: compute.clone(),
                        operation,
                        ids: IdList(ids_in_message(&message)),
                        status: poll.status.as_u16(),
                        code,
                        message,
                    });
                }
                return Err(ArmError::OperationFailed {
                    compute: compute.clone(),
                    operation,
                    ids: IdList(ids.to_vec()),
                    status: status.to_owned(),
                    code,
                    message,
                });
            }
            if status.is_empty() {
                return Err(invalid("operation status without `status`".to_owned()));
            }
        }
    }

    /// A GET or PATCH of the compute resource, gated, answered 2xx or mapped to an error.
    async fn call(
        &self,
        compute: &ComputeId,
        operation: ArmOperation,
        method: Method,
        body: Option<Value>,
        ids: &[IdentityResourceId],
    ) -> Result<Answer, ArmError> {
        let key = compute.subscription_id().to_ascii_lowercase();
        if let Some(until) = self.throttled_until(&key) {
            let retry_after = until
                .duration_since(self.clock.now())
                .unwrap_or(Duration::ZERO);
            return Err(ArmError::Throttled {
                compute: compute.clone(),
                operation,
                retry_after,
            });
        }
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| ArmError::InvalidResponse {
                compute: compute.clone(),
                operation,
                reason: "base URL cannot take a path".to_owned(),
            })?
            .pop_if_empty()
            .extend([
                "subscriptions",
                compute.subscription_id(),
                "resourceGroups",
                compute.resource_group(),
                "providers",
                "Microsoft.Compute",
                compute.kind().arm_type(),
                compute.name(),
            ]);
        url.query_pairs_mut()
            .append_pair("api-version", &self.config.api_version);
        let answer = self
            .send(compute, operation, method, url, body, ids)
            .await?;
        if answer.status.is_success() {
            return Ok(answer);
        }
        Err(self.classify(compute, operation, ids, &answer))
    }

    /// Sends one request with a bearer token and reads the answer.
    async fn send(
        &self,
        compute: &ComputeId,
        operation: ArmOperation,
        method: Method,
        url: Url,
        body: Option<Value>,
        ids: &[IdentityResourceId],
    ) -> Result<Answer, ArmError> {
        let token = self
            .tokens
            .token()
            .await
            .map_err(|source| ArmError::Token {
                compute: compute.clone(),
                operation,
                source,
            })?;
        tracing::debug!(%compute, %operation, %method, path = url.path(), "ARM request");
        let mut request = self
            .http
            .request(method, url)
            .bearer_auth(token.access_token());
        if let Some(body) = body {
            request = request
                .header(CONTENT_TYPE, "application/json; charset=utf-8")
                .body(body.to_string());
        }
        let transport = |source: reqwest::Error| ArmError::Transport {
            compute: compute.clone(),
            operation,
            ids: IdList(ids.to_vec()),
            source: source.without_url(),
        };
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.map_err(transport)?;
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    fn retry_after(&self, headers: &HeaderMap) -> Option<Duration> {
        header(headers, RETRY_AFTER.as_str()).and_then(|v| parse_retry_after(&v, self.clock.now()))
    }

    /// Maps an unsuccessful answer; throttling also closes the subscription's gate and a 401
    /// drops the cached token.
    fn classify(
        &self,
        compute: &ComputeId,
        operation: ArmOperation,
        ids: &[IdentityResourceId],
        answer: &Answer,
    ) -> ArmError {
        let retry_after = self.retry_after(&answer.headers);
        let status = answer.status;
        if status == StatusCode::TOO_MANY_REQUESTS
            || (status == StatusCode::SERVICE_UNAVAILABLE && retry_after.is_some())
        {
            let retry_after = retry_after.unwrap_or(self.config.default_throttle);
            let until = self.clock.now() + retry_after;
            let mut gate = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
            let entry = gate
                .entry(compute.subscription_id().to_ascii_lowercase())
                .or_insert(until);
            *entry = (*entry).max(until);
            drop(gate);
            tracing::warn!(%compute, %operation, ?retry_after, "ARM throttled");
            return ArmError::Throttled {
                compute: compute.clone(),
                operation,
                retry_after,
            };
        }
        let (code, message) = error_parts(&answer.body);
        if is_identity_refusal(&code, &message) {
            return ArmError::IdentitiesRefused {
                compute: compute.clone(),
                operation,
                ids: IdList(ids_in_message(&message)),
                status: status.as_u16(),
                code,
                message,
            };
        }
        match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                if status == StatusCode::UNAUTHORIZED {
                    self.tokens.invalidate();
                }
                ArmError::Auth {
                    compute: compute.clone(),
                    operation,
                    status: status.as_u16(),
                    code,
                    message,
                }
            }
            StatusCode::NOT_FOUND => ArmError::NotFound {
                compute: compute.clone(),
                operation,
                code,
                message,
            },
            _ => ArmError::Status {
                compute: compute.clone(),
                operation,
                ids: IdList(ids.to_vec()),
                status: status.as_u16(),
                code,
                message,
            },
        }
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// `error.code` and `error.message` of an ARM error body (`unknown` / empty when absent).
fn error_parts(body: &Value) -> (String, String) {
    let error = body.get("error").unwrap_or(&Value::Null);
    let code = error
        .get("code")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_owned();
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or_default();
    (code, truncate(message, MAX_MESSAGE))
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Upstream's retry trigger (docs/upstream.md#arm-calls).
fn is_identity_refusal(code: &str, message: &str) -> bool {
    ["LinkedAuthorizationFailed", "FailedIdentityOperation"]
        .iter()
        .any(|k| code.eq_ignore_ascii_case(k) || message.contains(k))
}

/// Every user-assigned identity resource id in an ARM error message (lower-cased, deduplicated,
/// in order of appearance).
pub(crate) fn ids_in_message(message: &str) -> Vec<IdentityResourceId> {
    let lower = message.to_ascii_lowercase();
    let mut ids: Vec<IdentityResourceId> = Vec::new();
    let mut from = 0;
    while let Some(pos) = lower[from..].find("/subscriptions/") {
        let start = from + pos;
        let end = lower[start..]
            .find(|c: char| {
                c.is_whitespace() || matches!(c, '\'' | '"' | ',' | ';' | ')' | ']' | '}')
            })
            .map_or(lower.len(), |e| start + e);
        let candidate = lower[start..end].trim_end_matches('.');
        if let Ok(id) = IdentityResourceId::parse(candidate)
            && !ids.contains(&id)
        {
            ids.push(id);
        }
        from = end.max(start + 1);
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_from_linked_authorization_message() {
        let msg = "The client 'c' with object id 'c' has permission to perform action 'Microsoft.Compute/virtualMachineScaleSets/write' on scope '/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/v'; however, it does not have permission to perform action 'Microsoft.ManagedIdentity/userAssignedIdentities/assign/action' on the linked scope(s) '/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/ID1,/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id2' or the linked scope(s) are invalid.";
        let ids: Vec<String> = ids_in_message(msg)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            ids,
            vec![
                "/subscriptions/s/resourcegroups/rg/providers/microsoft.managedidentity/userassignedidentities/id1",
                "/subscriptions/s/resourcegroups/rg/providers/microsoft.managedidentity/userassignedidentities/id2",
            ]
        );
        assert!(is_identity_refusal("LinkedAuthorizationFailed", ""));
        assert!(is_identity_refusal(
            "BadRequest",
            "… FailedIdentityOperation …"
        ));
        assert!(!is_identity_refusal("AuthorizationFailed", "nope"));
    }

    #[test]
    fn ids_from_failed_identity_operation_message() {
        let msg = "Identity (principal id) operation for resource 'vmss' failed with error 'Failed to perform resource identity operation. Status: 'NotFound'. Response: '{\"error\":{\"code\":\"NotFound\",\"message\":\"Resource '/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/gone' does not exist.\"}}'.'.";
        let ids = ids_in_message(msg);
        assert_eq!(ids.len(), 1);
        assert!(ids[0].as_str().ends_with("/userassignedidentities/gone"));
    }

    #[test]
    fn truncates_on_char_boundary() {
        assert_eq!(truncate("ééé", 3), "é…");
        assert_eq!(truncate("abc", 3), "abc");
    }

    #[test]
    fn bad_base_urls_rejected() {
        #[derive(Debug)]
        struct NoTokens;
        impl ArmTokenProvider for NoTokens {
            fn token(&self) -> super::super::token::ArmTokenFuture<'_> {
                Box::pin(async {
                    Err(podid_broker::BrokerError::Config {
                        client_id: "x".to_owned(),
                        reason: "none".to_owned(),
                    })
                })
            }
        }
        for url in ["not a url", "ftp://example.com", "mailto:a@b"] {
            let config = ArmConfig {
                base_url: url.to_owned(),
                ..ArmConfig::default()
            };
            assert!(matches!(
                ArmClient::new(config, Arc::new(NoTokens)),
                Err(ArmBuildError::BaseUrl { .. })
            ));
        }
    }
}
