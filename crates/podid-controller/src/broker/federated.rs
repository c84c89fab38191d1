//! [`FederatedSource`]: tokens by Workload Identity federation, the migration bridge of
//! docs/migration.md. For an identity switched to federation (`podid.io/token-source: federated`,
//! see [`federated_credential`]) the source asks the Kubernetes API for a service-account token of
//! the subject (TokenRequest, audience `api://AzureADTokenExchange`, bound to the calling pod when
//! the subject is the pod's own service account) and exchanges it at Entra's v2 endpoint `POST
//! {authority}{tenant}/oauth2/v2.0/token` with `client_assertion_type=…jwt-bearer`.
//!
//! The broker caches the Entra token per identity × resource × tenant × subject; the
//! service-account token is used once and dropped. Neither the service-account token nor the
//! assertion ever reaches an error, a log line or `Debug` output.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use podid_api::{FEDERATED_SERVICE_ACCOUNT_ANNOTATION, TOKEN_SOURCE_ANNOTATION};

use super::clock::Clock;
use super::entra::{CLIENT_ASSERTION_TYPE, EntraClient, EntraConfig, config_error};
use super::error::{BrokerError, truncate};
use super::http::SourceBuildError;
use super::identity::{BoundPod, Credential, FederatedSubject, IdentitySpec};
use super::source::{FetchRequest, SourceFuture, SourceKind, TokenSource};
use super::token::Token;

/// The value of [`TOKEN_SOURCE_ANNOTATION`] that switches an identity to federation (compared
/// ignoring ASCII case and surrounding spaces).
pub const TOKEN_SOURCE_FEDERATED: &str = "federated";

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

/// The calling pod, as far as the federated switch needs it.
#[derive(Debug, Clone, Copy)]
pub struct PodSubject<'a> {
    /// The pod's namespace.
    pub namespace: &'a str,
    /// The pod's name.
    pub name: &'a str,
    /// The pod's uid.
    pub uid: &'a str,
    /// `spec.serviceAccountName` (empty means `default`).
    pub service_account: &'a str,
}

/// Whether an identity used through a binding gets its tokens by federated exchange: the
/// binding's [`TOKEN_SOURCE_ANNOTATION`] when it has one, else the identity's, equal to
/// [`TOKEN_SOURCE_FEDERATED`] ignoring ASCII case and surrounding spaces. The rule
/// [`federated_credential`] applies, without a pod (MIC uses it to keep federated identities off
/// the scale sets).
pub fn is_federated(
    identity_annotations: Option<&BTreeMap<String, String>>,
    binding_annotations: Option<&BTreeMap<String, String>>,
) -> bool {
    binding_annotations
        .and_then(|a| a.get(TOKEN_SOURCE_ANNOTATION))
        .or_else(|| identity_annotations.and_then(|a| a.get(TOKEN_SOURCE_ANNOTATION)))
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(TOKEN_SOURCE_FEDERATED))
}

/// The [`Credential::Federated`] for a pod's request to an identity, or `None` when the
/// identity is not switched to federation.
///
/// The switch is [`TOKEN_SOURCE_ANNOTATION`] = [`TOKEN_SOURCE_FEDERATED`]: the binding's value
/// wins when the binding carries the annotation (so a binding can opt in alone, or opt out with
/// any other value such as `default`), else the identity's. The subject is the pod's own
/// service account, and the token is bound to the pod; with
/// [`FEDERATED_SERVICE_ACCOUNT_ANNOTATION`] (binding first, then identity) it is that one
/// shared service account (`<name>` in `identity_namespace`, or `<namespace>/<name>`), unbound.
pub fn federated_credential(
    identity_annotations: Option<&BTreeMap<String, String>>,
    identity_namespace: &str,
    binding_annotations: Option<&BTreeMap<String, String>>,
    pod: PodSubject<'_>,
) -> Option<Credential> {
    let lookup = |key: &str| {
        binding_annotations
            .and_then(|a| a.get(key))
            .or_else(|| identity_annotations.and_then(|a| a.get(key)))
            .map(|v| v.trim())
    };
    if !is_federated(identity_annotations, binding_annotations) {
        return None;
    }
    let shared = lookup(FEDERATED_SERVICE_ACCOUNT_ANNOTATION).filter(|v| !v.is_empty());
    Some(match shared {
        Some(value) => {
            let subject = match value.split_once('/') {
                Some((namespace, name)) => FederatedSubject::new(namespace, name),
                None => FederatedSubject::new(identity_namespace, value),
            };
            Credential::Federated {
                subject,
                bound_pod: None,
            }
        }
        None => {
            let service_account = if pod.service_account.is_empty() {
                "default"
            } else {
                pod.service_account
            };
            Credential::Federated {
                subject: FederatedSubject::new(pod.namespace, service_account),
                bound_pod: Some(BoundPod {
                    name: pod.name.to_owned(),
                    uid: pod.uid.to_owned(),
                }),
            }
        }
    })
}

/// The trust boundary of the federated switch, applied to what [`federated_credential`] chose
/// for `pod` and an identity in `identity_namespace`.
///
/// nmi may create tokens for every service account of the cluster, and the annotations are
/// written by whoever may create the identity or the binding. So the subject must be the pod's
/// own service account, or one in the identity's own namespace (the shared-service-account
/// annotation cannot name another namespace's); anything else is refused with the reason.
/// Whenever the pod lives in the subject's namespace the token is bound to it (a TokenRequest
/// can only bind objects of its own namespace), so it dies with the pod.
pub fn confine_federated(
    credential: Credential,
    identity_namespace: &str,
    pod: PodSubject<'_>,
) -> Result<Credential, String> {
    let Credential::Federated { subject, bound_pod } = credential else {
        return Ok(credential);
    };
    let pods_own = subject.namespace == pod.namespace
        && (subject.service_account == pod.service_account
            || (pod.service_account.is_empty() && subject.service_account == "default"));
    if !pods_own && subject.namespace != identity_namespace {
        return Err(format!(
            "the federated exchange may use the pod's own service account or one in the identity's namespace {identity_namespace:?}, not service account {subject} ({FEDERATED_SERVICE_ACCOUNT_ANNOTATION})"
        ));
    }
    let bound_pod = bound_pod.or_else(|| {
        (subject.namespace == pod.namespace).then(|| BoundPod {
            name: pod.name.to_owned(),
            uid: pod.uid.to_owned(),
        })
    });
    Ok(Credential::Federated { subject, bound_pod })
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

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    const POD: PodSubject<'static> = PodSubject {
        namespace: "apps",
        name: "web-0",
        uid: "uid-1",
        service_account: "web",
    };

    #[test]
    fn switch_follows_identity_then_binding() {
        let on = annotations(&[(TOKEN_SOURCE_ANNOTATION, " Federated ")]);
        let off = annotations(&[(TOKEN_SOURCE_ANNOTATION, "default")]);
        assert!(federated_credential(None, "ids", None, POD).is_none());
        assert!(federated_credential(Some(&off), "ids", None, POD).is_none());
        let Some(Credential::Federated { subject, bound_pod }) =
            federated_credential(Some(&on), "ids", None, POD)
        else {
            panic!("identity annotation switches to federation");
        };
        assert_eq!(subject, FederatedSubject::new("apps", "web"));
        assert_eq!(
            bound_pod,
            Some(BoundPod {
                name: "web-0".into(),
                uid: "uid-1".into()
            })
        );
        assert!(
            federated_credential(Some(&on), "ids", Some(&off), POD).is_none(),
            "the binding's value wins"
        );
        assert!(federated_credential(Some(&off), "ids", Some(&on), POD).is_some());
        assert!(is_federated(Some(&on), None));
        assert!(!is_federated(Some(&on), Some(&off)));
        assert!(is_federated(None, Some(&on)));
        assert!(!is_federated(None, None));
    }

    #[test]
    fn shared_service_account_and_default_account() {
        let shared = annotations(&[
            (TOKEN_SOURCE_ANNOTATION, "federated"),
            (FEDERATED_SERVICE_ACCOUNT_ANNOTATION, "podid-web"),
        ]);
        let Some(Credential::Federated { subject, bound_pod }) =
            federated_credential(Some(&shared), "ids", None, POD)
        else {
            panic!("switched");
        };
        assert_eq!(subject, FederatedSubject::new("ids", "podid-web"));
        assert_eq!(bound_pod, None, "a shared token is not bound to one pod");
        let elsewhere = annotations(&[(FEDERATED_SERVICE_ACCOUNT_ANNOTATION, "infra/shared")]);
        let Some(Credential::Federated { subject, .. }) =
            federated_credential(Some(&shared), "ids", Some(&elsewhere), POD)
        else {
            panic!("switched");
        };
        assert_eq!(subject, FederatedSubject::new("infra", "shared"));
        let on = annotations(&[(TOKEN_SOURCE_ANNOTATION, "federated")]);
        let pod = PodSubject {
            service_account: "",
            ..POD
        };
        assert_eq!(
            federated_credential(Some(&on), "ids", None, pod)
                .as_ref()
                .and_then(|c| match c {
                    Credential::Federated { subject, .. } => Some(subject.service_account.clone()),
                    _ => None,
                }),
            Some("default".to_owned())
        );
    }

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

    /// Item 4 of the trust-boundary issue: the shared-service-account annotation cannot name
    /// another namespace's service account (nmi could mint its tokens), and a token of a service
    /// account in the pod's namespace is bound to the pod.
    #[test]
    fn the_subject_is_the_pods_own_or_in_the_identitys_namespace_and_bound_when_possible() {
        let credential = |value: &str| {
            let shared = annotations(&[
                (TOKEN_SOURCE_ANNOTATION, "federated"),
                (FEDERATED_SERVICE_ACCOUNT_ANNOTATION, value),
            ]);
            federated_credential(Some(&shared), "apps", None, POD).expect("switched")
        };
        for stolen in ["kube-system/default", "infra/shared", "default/admin"] {
            let error = confine_federated(credential(stolen), "apps", POD).expect_err(stolen);
            assert!(error.contains(stolen), "{error}");
        }
        // In the identity's (and here the pod's) namespace: allowed, and bound to the pod.
        for allowed in ["podid-web", "apps/podid-web"] {
            let Ok(Credential::Federated { subject, bound_pod }) =
                confine_federated(credential(allowed), "apps", POD)
            else {
                panic!("{allowed} is in the identity's namespace");
            };
            assert_eq!(subject, FederatedSubject::new("apps", "podid-web"));
            assert_eq!(bound_pod.map(|p| p.uid), Some("uid-1".to_owned()));
        }
        // The identity's namespace, the pod elsewhere: allowed, unbound (cannot bind across).
        let other_pod = PodSubject {
            namespace: "web",
            ..POD
        };
        let shared = annotations(&[
            (TOKEN_SOURCE_ANNOTATION, "federated"),
            (FEDERATED_SERVICE_ACCOUNT_ANNOTATION, "podid-web"),
        ]);
        let chosen = federated_credential(Some(&shared), "apps", None, other_pod).expect("on");
        assert!(matches!(
            confine_federated(chosen, "apps", other_pod),
            Ok(Credential::Federated {
                bound_pod: None,
                ..
            })
        ));
        // The pod's own service account, whatever the identity's namespace: allowed, bound.
        let on = annotations(&[(TOKEN_SOURCE_ANNOTATION, "federated")]);
        let own = federated_credential(Some(&on), "ids", None, POD).expect("on");
        assert!(matches!(
            confine_federated(own, "ids", POD),
            Ok(Credential::Federated {
                bound_pod: Some(_),
                ..
            })
        ));
        // Not federated: untouched.
        assert_eq!(
            confine_federated(Credential::None, "apps", POD),
            Ok(Credential::None)
        );
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
