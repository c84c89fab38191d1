//! [`FederatedSource`]: tokens by Workload Identity federation, the migration bridge of
//! docs/migration.md. For an identity switched to federation (`podid.io/token-source: federated`,
//! see `podid_select::federated`) the source asks the Kubernetes API for a service-account token of
//! the subject (TokenRequest, audience `api://AzureADTokenExchange`, bound to the calling pod when
//! the subject is the pod's own service account) and exchanges it at Entra's v2 endpoint `POST
//! {authority}{tenant}/oauth2/v2.0/token` with `client_assertion_type=…jwt-bearer`.
//!
//! The broker caches the Entra token per identity × resource × tenant × subject; the
//! service-account token is used once and dropped. Neither the service-account token nor the
//! assertion ever reaches an error, a log line or `Debug` output.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};

use super::clock::Clock;
use super::entra::{CLIENT_ASSERTION_TYPE, EntraClient, EntraConfig, config_error};
use super::error::{BrokerError, truncate};
use super::http::SourceBuildError;
use super::identity::{BoundPod, Credential, FederatedSubject, IdentitySpec};
use super::source::{FetchRequest, SourceFuture, SourceKind, TokenSource};
use super::token::Token;

/// Audience of the service-account tokens exchanged at Entra (what federated identity
/// credentials accept by default).
pub const TOKEN_EXCHANGE_AUDIENCE: &str = "api://AzureADTokenExchange";

/// Lifetime asked for the service-account token: the API server's minimum (600 s). The token
/// is presented once, right away, so anything longer only widens the window in which a copy of
/// it is useful to whoever obtains one.
pub const SERVICE_ACCOUNT_TOKEN_SECONDS: i64 = 600;

/// Federated source settings.
#[derive(Debug, Clone)]
pub struct FederatedConfig {
    /// Authority, timeouts and retries of the Entra side (as for the client-secret source).
    pub entra: EntraConfig,
    /// Tenant for identities without `tenantID` (type 0, user-assigned managed identities):
    /// the cluster's default tenant. Without it such identities fail with
    /// [`BrokerError::Config`].
    pub default_tenant: Option<String>,
    /// Audience asked for in the TokenRequest (default [`TOKEN_EXCHANGE_AUDIENCE`]).
    pub audience: String,
    /// `expirationSeconds` of the TokenRequest (default [`SERVICE_ACCOUNT_TOKEN_SECONDS`]).
    pub token_expiration_seconds: i64,
    /// Timeout of one TokenRequest call (default 10 s).
    pub token_request_timeout: Duration,
}

impl Default for FederatedConfig {
    fn default() -> Self {
        Self {
            entra: EntraConfig::default(),
            default_tenant: None,
            audience: TOKEN_EXCHANGE_AUDIENCE.to_owned(),
            token_expiration_seconds: SERVICE_ACCOUNT_TOKEN_SECONDS,
            token_request_timeout: Duration::from_secs(10),
        }
    }
}

/// Federated exchange: TokenRequest for the subject, then Entra's v2 client-credentials grant
/// with the service-account token as client assertion.
pub struct FederatedSource {
    kube: kube::Client,
    entra: EntraClient,
    default_tenant: Option<String>,
    audience: String,
    expiration_seconds: i64,
    token_request_timeout: Duration,
}

impl std::fmt::Debug for FederatedSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FederatedSource")
            .field("entra", &self.entra)
            .field("default_tenant", &self.default_tenant)
            .field("audience", &self.audience)
            .field("expiration_seconds", &self.expiration_seconds)
            .finish_non_exhaustive()
    }
}

impl FederatedSource {
    /// A source asking `kube` for service-account tokens and posting to Entra as configured.
    pub fn new(
        kube: kube::Client,
        config: FederatedConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, SourceBuildError> {
        Ok(Self {
            kube,
            entra: EntraClient::new(SourceKind::Federated, config.entra, clock)?,
            default_tenant: config
                .default_tenant
                .filter(|t| !t.trim().is_empty())
                .map(|t| t.trim().to_ascii_lowercase()),
            audience: config.audience,
            expiration_seconds: config.token_expiration_seconds,
            token_request_timeout: config.token_request_timeout,
        })
    }

    async fn fetch_token(&self, request: &FetchRequest) -> Result<Token, BrokerError> {
        let identity = &*request.identity;
        let Credential::Federated { subject, bound_pod } = &identity.credential else {
            return Err(config_error(
                identity,
                "the identity is not switched to federated tokens",
            ));
        };
        let Some(tenant) = request
            .tenant
            .clone()
            .filter(|t| !t.is_empty())
            .or_else(|| self.default_tenant.clone())
        else {
            return Err(config_error(
                identity,
                "no tenant for the federated exchange: set spec.tenantID or the cluster's default tenant (nmi --federated-default-tenant-id)",
            ));
        };
        if identity.client_id.is_empty() {
            return Err(config_error(
                identity,
                "a federated identity needs spec.clientID",
            ));
        }
        let url = self
            .entra
            .endpoint(identity, &tenant, "oauth2/v2.0/token")?;
        let assertion = self
            .service_account_token(identity, subject, bound_pod.as_ref())
            .await?;
        let scope = scope_for(&request.resource);
        let form = [
            ("client_assertion", assertion.as_str()),
            ("client_assertion_type", CLIENT_ASSERTION_TYPE),
            ("client_id", identity.client_id.as_str()),
            ("grant_type", "client_credentials"),
            ("scope", scope.as_str()),
        ];
        match self.entra.post(request, &url, &form).await {
            Err(BrokerError::Refused {
                source_kind,
                client_id,
                status,
                error,
                description,
            }) => {
                let hint = refusal_hint(&description, &assertion, subject, &tenant, &client_id);
                Err(BrokerError::Refused {
                    source_kind,
                    client_id,
                    status,
                    error,
                    description: match hint {
                        Some(hint) => truncate(&format!("{hint}; Entra said: {description}")),
                        None => description,
                    },
                })
            }
            other => other,
        }
    }

    /// A service-account token of `subject` for the exchange audience.
    async fn service_account_token(
        &self,
        identity: &IdentitySpec,
        subject: &FederatedSubject,
        bound_pod: Option<&BoundPod>,
    ) -> Result<String, BrokerError> {
        let body = token_request(&self.audience, self.expiration_seconds, bound_pod);
        let api: Api<ServiceAccount> = Api::namespaced(self.kube.clone(), &subject.namespace);
        let params = PostParams::default();
        let call = api.create_token_request(&subject.service_account, &params, &body);
        let answer = match tokio::time::timeout(self.token_request_timeout, call).await {
            Ok(answer) => answer,
            Err(_) => {
                return Err(self.unavailable(
                    identity,
                    format!("TokenRequest for service account {subject} timed out"),
                ));
            }
        };
        let answer = answer.map_err(|e| self.token_request_error(identity, subject, &e))?;
        answer
            .status
            .and_then(|s| s.token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                self.unavailable(
                    identity,
                    format!("TokenRequest for service account {subject} returned no token"),
                )
            })
    }

    fn unavailable(&self, identity: &IdentitySpec, reason: String) -> BrokerError {
        BrokerError::Unavailable {
            source_kind: SourceKind::Federated,
            client_id: identity.client_id.clone(),
            reason,
            retry_after: None,
        }
    }

    /// Map a failed TokenRequest. The API server's messages name objects, never tokens.
    fn token_request_error(
        &self,
        identity: &IdentitySpec,
        subject: &FederatedSubject,
        error: &kube::Error,
    ) -> BrokerError {
        let kube::Error::Api(status) = error else {
            return self.unavailable(
                identity,
                truncate(&format!(
                    "TokenRequest for service account {subject} failed: {error}"
                )),
            );
        };
        let code = status.code;
        let kind = status
            .details
            .as_ref()
            .map(|d| d.kind.as_str())
            .unwrap_or("");
        let refused = |error: &str, description: String| BrokerError::Refused {
            source_kind: SourceKind::Federated,
            client_id: identity.client_id.clone(),
            status: code,
            error: error.to_owned(),
            description: truncate(&description),
        };
        match code {
            404 if kind == "pods" => refused(
                "pod_not_found",
                format!(
                    "the calling pod in namespace {} no longer exists, no service-account token can be bound to it",
                    subject.namespace
                ),
            ),
            404 => refused(
                "service_account_not_found",
                format!(
                    "service account {} not found in namespace {}: create ServiceAccount {:?} in namespace {:?} for the federated exchange",
                    subject.service_account,
                    subject.namespace,
                    subject.service_account,
                    subject.namespace
                ),
            ),
            401 | 403 => BrokerError::Config {
                client_id: identity.client_id.clone(),
                reason: truncate(&format!(
                    "NMI may not create tokens for service account {subject} (HTTP {code}): grant it `create` on `serviceaccounts/token`: {}",
                    status.message
                )),
            },
            409 => refused(
                "pod_replaced",
                format!(
                    "the calling pod was replaced while binding a token of service account {subject}: {}",
                    status.message
                ),
            ),
            429 | 500.. => self.unavailable(
                identity,
                truncate(&format!(
                    "TokenRequest for service account {subject}: HTTP {code}: {}",
                    status.message
                )),
            ),
            _ => refused(
                "token_request_refused",
                format!(
                    "TokenRequest for service account {subject} refused: {}",
                    status.message
                ),
            ),
        }
    }
}

impl TokenSource for FederatedSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Federated
    }

    fn fetch<'a>(&'a self, request: &'a FetchRequest) -> SourceFuture<'a> {
        Box::pin(self.fetch_token(request))
    }
}

/// The TokenRequest body: one audience, the lifetime, and the pod binding if any.
fn token_request(
    audience: &str,
    expiration_seconds: i64,
    bound_pod: Option<&BoundPod>,
) -> TokenRequest {
    let spec = TokenRequestSpec {
        audiences: Some(vec![audience.to_owned()]),
        expiration_seconds: Some(expiration_seconds),
        bound_object_ref: bound_pod.map(|pod| BoundObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Pod".to_owned()),
            name: Some(pod.name.clone()),
            uid: Some(pod.uid.clone()).filter(|u| !u.is_empty()),
        }),
        ..TokenRequestSpec::default()
    };
    TokenRequest {
        spec: Some(spec),
        ..TokenRequest::default()
    }
}

/// The v2 scope for a v1-style resource: `<resource>/.default` (one trailing `/` dropped, as
/// the SDKs do; a resource that already is a `.default` scope is kept).
fn scope_for(resource: &str) -> String {
    if resource.ends_with("/.default") {
        return resource.to_owned();
    }
    format!(
        "{}/.default",
        resource.strip_suffix('/').unwrap_or(resource)
    )
}

/// What to do about an Entra refusal of the exchange, for the codes that have a fix.
fn refusal_hint(
    description: &str,
    assertion: &str,
    subject: &FederatedSubject,
    tenant: &str,
    client_id: &str,
) -> Option<String> {
    let code = |c: &str| description.contains(&format!("AADSTS{c}:"));
    if code("70021") || code("700211") {
        let issuer = unverified_issuer(assertion).unwrap_or_else(|| "<unknown>".to_owned());
        return Some(format!(
            "no federated identity credential of client {client_id} matches the service account token: register one with issuer {issuer:?}, subject {:?}, audience {TOKEN_EXCHANGE_AUDIENCE:?}",
            subject.subject()
        ));
    }
    if code("90002") || code("700016") {
        return Some(format!(
            "tenant {tenant} does not hold client {client_id}: check spec.tenantID or the cluster's default tenant"
        ));
    }
    None
}

/// The `iss` claim of a JWT, read without verification (only to name the issuer to register).
/// Nothing else of the token is kept.
fn unverified_issuer(jwt: &str) -> Option<String> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims
        .get("iss")
        .and_then(serde_json::Value::as_str)
        .map(truncate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_request_body_has_audience_lifetime_and_binding() {
        let pod = BoundPod {
            name: "web-0".into(),
            uid: "uid-1".into(),
        };
        let body = serde_json::to_value(token_request(
            TOKEN_EXCHANGE_AUDIENCE,
            SERVICE_ACCOUNT_TOKEN_SECONDS,
            Some(&pod),
        ))
        .expect("json");
        assert_eq!(
            body["spec"],
            serde_json::json!({
                "audiences": ["api://AzureADTokenExchange"],
                "expirationSeconds": 600,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": "web-0", "uid": "uid-1"},
            })
        );
        let shared =
            serde_json::to_value(token_request(TOKEN_EXCHANGE_AUDIENCE, 3600, None)).expect("json");
        assert!(shared["spec"].get("boundObjectRef").is_none());
    }

    #[test]
    fn scopes_follow_the_sdks() {
        assert_eq!(
            scope_for("https://vault.azure.net"),
            "https://vault.azure.net/.default"
        );
        assert_eq!(
            scope_for("https://management.azure.com/"),
            "https://management.azure.com/.default"
        );
        assert_eq!(scope_for("api://x/.default"), "api://x/.default");
    }

    #[test]
    fn issuer_is_read_without_keeping_the_token() {
        let payload = URL_SAFE_NO_PAD.encode(br#"{"iss":"https://issuer.example","sub":"s"}"#);
        let jwt = format!("e30.{payload}.c2ln");
        assert_eq!(
            unverified_issuer(&jwt).as_deref(),
            Some("https://issuer.example")
        );
        assert_eq!(unverified_issuer("garbage"), None);
        let hint = refusal_hint(
            "AADSTS70021: No matching federated identity record found",
            &jwt,
            &FederatedSubject::new("apps", "web"),
            "tid",
            "cid",
        )
        .expect("hint");
        assert!(hint.contains("https://issuer.example"));
        assert!(hint.contains("system:serviceaccount:apps:web"));
        assert!(!hint.contains(&jwt));
    }
}
