//! Entra token sources for service principals (docs/upstream.md#token-sources):
//! [`ClientSecretSource`] (type 1) and [`CertificateSource`] (type 2), both on the v1 endpoint
//! `POST {authority}{tenant}/oauth2/token?api-version=1.0` with `grant_type=client_credentials` and
//! `resource`, as upstream's adal did.
//!
//! The token URL is the tenant path resolved against the authority as a relative URL (upstream:
//! `spec.adEndpoint`, default `https://login.microsoftonline.com/`), so an authority's trailing
//! `/` matters exactly as it did upstream. Errors keep Entra's `error` and `error_description`;
//! no error, log line or `Debug` output contains the secret, the certificate password, the key
//! or the client assertion.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use p12_keystore::{KeyStore, Pkcs12ImportPolicy};
use podid_imds::unix_seconds;
use rsa::RsaPrivateKey;
use rsa::pkcs1v15::SigningKey;
use rsa::pkcs8::DecodePrivateKey;
use rsa::signature::{SignatureEncoding, Signer};
use sha1::Digest as _;
use sha2::Sha256;

use super::clock::Clock;
use super::error::BrokerError;
use super::http::{Exchange, HttpTimeouts, SourceBuildError, backoff, build_client, retry_after};
use super::identity::{Credential, IdentitySpec};
use super::source::{FetchRequest, SourceFuture, SourceKind, TokenSource};
use super::token::Token;

/// Public cloud authority, used when `spec.adEndpoint` is empty.
pub const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com/";

/// The Entra authorities of the Azure clouds (public, US Government, China under both its
/// names): where an identity's `adEndpoint` may point without the operator listing it. Over
/// https on the default port only.
pub const CLOUD_AUTHORITIES: [&str; 4] = [
    "https://login.microsoftonline.com/",
    "https://login.microsoftonline.us/",
    "https://login.chinacloudapi.cn/",
    "https://login.partner.microsoftonline.cn/",
];

/// The nmi flag that lists further authorities, named in refusals.
pub const ALLOWED_AUTHORITIES_FLAG: &str = "--allowed-authorities";

/// `client_assertion_type` of a JWT client assertion.
pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Entra source settings.
#[derive(Debug, Clone)]
pub struct EntraConfig {
    /// Authority for identities without `adEndpoint` (default [`DEFAULT_AUTHORITY`]).
    pub default_authority: String,
    /// Connect and total timeouts (defaults 5 s and 20 s).
    pub timeouts: HttpTimeouts,
    /// Retries after a transport error or 5xx (default 1; upstream's adal did none).
    pub max_retries: u32,
    /// Base of the jittered exponential backoff between retries (default 500 ms).
    pub retry_base: Duration,
    /// Lifetime of certificate client assertions (default 10 min; adal used 24 h).
    pub assertion_lifetime: Duration,
    /// Extra trusted roots for the token endpoint (tests, private clouds).
    pub extra_roots: Vec<reqwest::Certificate>,
    /// Authorities an identity's `adEndpoint` may name besides [`CLOUD_AUTHORITIES`] (operator
    /// configuration: nmi's `--allowed-authorities`; http only when listed with http). Compared
    /// by scheme, host and port.
    pub extra_authorities: Vec<reqwest::Url>,
}

impl Default for EntraConfig {
    fn default() -> Self {
        Self {
            default_authority: DEFAULT_AUTHORITY.to_owned(),
            timeouts: HttpTimeouts {
                connect: Duration::from_secs(5),
                total: Duration::from_secs(20),
            },
            max_retries: 1,
            retry_base: Duration::from_millis(500),
            assertion_lifetime: Duration::from_secs(600),
            extra_roots: Vec::new(),
            extra_authorities: Vec::new(),
        }
    }
}

/// The HTTP side shared by the Entra sources (client secret, certificate, federated).
#[derive(Debug)]
pub(super) struct EntraClient {
    kind: SourceKind,
    client: reqwest::Client,
    pub(super) config: EntraConfig,
    pub(super) clock: Arc<dyn Clock>,
}

pub(super) fn config_error(identity: &IdentitySpec, reason: impl Into<String>) -> BrokerError {
    BrokerError::Config {
        client_id: identity.client_id.clone(),
        reason: reason.into(),
    }
}

impl EntraClient {
    pub(super) fn new(
        kind: SourceKind,
        config: EntraConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, SourceBuildError> {
        reqwest::Url::parse(&config.default_authority).map_err(|e| SourceBuildError::Url {
            what: "Entra authority",
            url: config.default_authority.clone(),
            reason: e.to_string(),
        })?;
        let client = build_client(kind, config.timeouts, &config.extra_roots)?;
        Ok(Self {
            kind,
            client,
            config,
            clock,
        })
    }

    /// `{authority}{tenant}/oauth2/token?api-version=1.0`, resolved like upstream.
    fn token_url(&self, request: &FetchRequest) -> Result<reqwest::Url, BrokerError> {
        self.endpoint(
            &request.identity,
            request.tenant.as_deref().unwrap_or(""),
            "oauth2/token?api-version=1.0",
        )
    }

    /// `{authority}{tenant}/{path}`, the authority from `adEndpoint` or the default.
    ///
    /// Trust boundary: `adEndpoint` is written by whoever may create an `AzureIdentity`, and
    /// the credential (secret, certificate assertion, service-account token) goes where it
    /// points. So it must be an allowed authority ([`authority_allowed`]); the default
    /// authority is the operator's and needs no check.
    pub(super) fn endpoint(
        &self,
        identity: &IdentitySpec,
        tenant: &str,
        path: &str,
    ) -> Result<reqwest::Url, BrokerError> {
        let tenant_ok = !tenant.is_empty()
            && tenant
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
        if !tenant_ok {
            return Err(config_error(
                identity,
                format!("invalid tenant id {tenant:?}"),
            ));
        }
        let authority = if identity.ad_endpoint.is_empty() {
            self.config.default_authority.as_str()
        } else {
            identity.ad_endpoint.as_str()
        };
        let base = reqwest::Url::parse(authority).map_err(|e| {
            config_error(identity, format!("invalid adEndpoint {authority:?}: {e}"))
        })?;
        if !matches!(base.scheme(), "https" | "http") {
            return Err(config_error(
                identity,
                format!("adEndpoint {authority:?} is not an http(s) URL"),
            ));
        }
        if !identity.ad_endpoint.is_empty()
            && !authority_allowed(&base, &self.config.extra_authorities)
        {
            return Err(config_error(
                identity,
                format!(
                    "adEndpoint {authority:?} is not an allowed authority: credentials are sent only over https to the Azure clouds' Entra authorities ({}) and to authorities the operator lists with nmi's {ALLOWED_AUTHORITIES_FLAG}",
                    CLOUD_AUTHORITIES
                        .iter()
                        .map(|a| a.trim_start_matches("https://").trim_end_matches('/'))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        base.join(&format!("{tenant}/{path}"))
            .map_err(|e| config_error(identity, format!("invalid token URL: {e}")))
    }

    /// POST the form, with retries for transport errors and 5xx.
    pub(super) async fn post(
        &self,
        request: &FetchRequest,
        url: &reqwest::Url,
        form: &[(&str, &str)],
    ) -> Result<Token, BrokerError> {
        let exchange = Exchange {
            kind: self.kind,
            client_id: &request.identity.client_id,
            resource: &request.resource,
        };
        let mut attempt = 0;
        loop {
            let result = self.post_once(&exchange, url, form).await;
            match result {
                Err(error @ BrokerError::Unavailable { .. })
                    if attempt < self.config.max_retries && error.retry_after().is_none() =>
                {
                    attempt += 1;
                    tracing::warn!(client_id = %exchange.client_id, source = %self.kind, attempt, %error, "Entra token request failed, retrying");
                    tokio::time::sleep(backoff(self.config.retry_base, attempt)).await;
                }
                other => return other,
            }
        }
    }

    async fn post_once(
        &self,
        exchange: &Exchange<'_>,
        url: &reqwest::Url,
        form: &[(&str, &str)],
    ) -> Result<Token, BrokerError> {
        let response = self
            .client
            .post(url.clone())
            .form(form)
            .send()
            .await
            .map_err(|e| exchange.transport(&e))?;
        let status = response.status().as_u16();
        let wait = retry_after(response.headers());
        let body = response.bytes().await.map_err(|e| exchange.transport(&e))?;
        exchange.answer(status, wait, &body, self.clock.now())
    }
}

/// Whether an identity may send its credential to `authority`: no user info, and the same
/// scheme, host and port as one of [`CLOUD_AUTHORITIES`] or of `extra`.
pub fn authority_allowed(authority: &reqwest::Url, extra: &[reqwest::Url]) -> bool {
    if !authority.username().is_empty() || authority.password().is_some() {
        return false;
    }
    let same = |allowed: &reqwest::Url| {
        allowed.scheme() == authority.scheme()
            && allowed.host_str().is_some()
            && allowed.host_str() == authority.host_str()
            && allowed.port_or_known_default() == authority.port_or_known_default()
    };
    CLOUD_AUTHORITIES
        .iter()
        .filter_map(|a| reqwest::Url::parse(a).ok())
        .any(|a| same(&a))
        || extra.iter().any(same)
}

/// Type 1: client credentials with the client secret.
#[derive(Debug)]
pub struct ClientSecretSource {
    entra: EntraClient,
}

impl ClientSecretSource {
    /// A source posting to Entra as configured.
    pub fn new(config: EntraConfig, clock: Arc<dyn Clock>) -> Result<Self, SourceBuildError> {
        Ok(Self {
            entra: EntraClient::new(SourceKind::ClientSecret, config, clock)?,
        })
    }

    async fn fetch_token(&self, request: &FetchRequest) -> Result<Token, BrokerError> {
        let identity = &*request.identity;
        let Credential::ClientSecret(secret) = &identity.credential else {
            return Err(config_error(
                identity,
                "no client secret in the identity's Secret",
            ));
        };
        if secret.expose().is_empty() {
            return Err(config_error(identity, "the client secret is empty"));
        }
        let url = self.entra.token_url(request)?;
        let form = [
            ("client_id", identity.client_id.as_str()),
            ("client_secret", secret.expose()),
            ("grant_type", "client_credentials"),
            ("resource", request.resource.as_str()),
        ];
        self.entra.post(request, &url, &form).await
    }
}

impl TokenSource for ClientSecretSource {
    fn kind(&self) -> SourceKind {
        SourceKind::ClientSecret
    }

    fn fetch<'a>(&'a self, request: &'a FetchRequest) -> SourceFuture<'a> {
        Box::pin(self.fetch_token(request))
    }
}

/// The signing material decoded from a PKCS#12 file.
struct CertKey {
    signer: SigningKey<Sha256>,
    x5t: String,
    x5c: String,
}

impl fmt::Debug for CertKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertKey")
            .field("x5t", &self.x5t)
            .finish_non_exhaustive()
    }
}

/// Decoded PKCS#12 files kept per source (decoding runs a slow key derivation).
const MAX_DECODED: usize = 256;

/// Type 2: client credentials with an RS256 client assertion signed by the PKCS#12 key.
#[derive(Debug)]
pub struct CertificateSource {
    entra: EntraClient,
    decoded: Mutex<HashMap<[u8; 32], Arc<CertKey>>>,
}

impl CertificateSource {
    /// A source posting to Entra as configured.
    pub fn new(config: EntraConfig, clock: Arc<dyn Clock>) -> Result<Self, SourceBuildError> {
        Ok(Self {
            entra: EntraClient::new(SourceKind::Certificate, config, clock)?,
            decoded: Mutex::new(HashMap::new()),
        })
    }

    fn cert_key(&self, identity: &IdentitySpec) -> Result<Arc<CertKey>, BrokerError> {
        let Credential::Certificate { pkcs12, password } = &identity.credential else {
            return Err(config_error(
                identity,
                "no certificate in the identity's Secret",
            ));
        };
        let mut hasher = Sha256::new();
        hasher.update((pkcs12.len() as u64).to_be_bytes());
        hasher.update(pkcs12);
        hasher.update(password.expose().as_bytes());
        let id: [u8; 32] = hasher.finalize().into();
        if let Some(found) = self.lock().get(&id) {
            return Ok(found.clone());
        }
        let decoded = Arc::new(decode_pkcs12(identity, pkcs12, password.expose())?);
        let mut cache = self.lock();
        if cache.len() >= MAX_DECODED {
            cache.clear();
        }
        cache.insert(id, decoded.clone());
        Ok(decoded)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Arc<CertKey>>> {
        self.decoded.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn fetch_token(&self, request: &FetchRequest) -> Result<Token, BrokerError> {
        let identity = &*request.identity;
        let key = self.cert_key(identity)?;
        let url = self.entra.token_url(request)?;
        let now = unix_seconds(self.entra.clock.now());
        let assertion = client_assertion(
            &key,
            &identity.client_id,
            url.as_str(),
            now,
            self.entra.config.assertion_lifetime,
        )
        .map_err(|reason| config_error(identity, reason))?;
        let form = [
            ("client_assertion", assertion.as_str()),
            ("client_assertion_type", CLIENT_ASSERTION_TYPE),
            ("client_id", identity.client_id.as_str()),
            ("grant_type", "client_credentials"),
            ("resource", request.resource.as_str()),
        ];
        self.entra.post(request, &url, &form).await
    }
}

impl TokenSource for CertificateSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Certificate
    }

    fn fetch<'a>(&'a self, request: &'a FetchRequest) -> SourceFuture<'a> {
        Box::pin(self.fetch_token(request))
    }
}

/// PKCS#12 → RSA signing key and the leaf certificate's `x5t`/`x5c`.
fn decode_pkcs12(
    identity: &IdentitySpec,
    pkcs12: &[u8],
    password: &str,
) -> Result<CertKey, BrokerError> {
    // p12-keystore's errors describe the structure, never the password or key bytes.
    let store =
        KeyStore::from_pkcs12(pkcs12, password, Pkcs12ImportPolicy::Strict).map_err(|e| {
            config_error(
                identity,
                format!("cannot read the PKCS#12 certificate: {e}"),
            )
        })?;
    let Some((_, chain)) = store.private_key_chain() else {
        return Err(config_error(
            identity,
            "the PKCS#12 certificate holds no private key with its certificate",
        ));
    };
    let Some(leaf) = chain.certs().first() else {
        return Err(config_error(identity, "the PKCS#12 key has no certificate"));
    };
    let private = RsaPrivateKey::from_pkcs8_der(chain.key().as_der())
        .map_err(|_| config_error(identity, "the PKCS#12 private key is not an RSA key"))?;
    let der = leaf.as_der();
    Ok(CertKey {
        signer: SigningKey::<Sha256>::new(private),
        x5t: URL_SAFE_NO_PAD.encode(sha1::Sha1::digest(der)),
        x5c: STANDARD.encode(der),
    })
}

/// The RS256 client assertion: header `alg`, `typ`, `x5t`, `x5c`; claims `aud` (the token
/// URL), `iss` = `sub` = client id, random `jti`, `iat` = `nbf` = now, `exp` = now + lifetime.
fn client_assertion(
    key: &CertKey,
    client_id: &str,
    audience: &str,
    now: u64,
    lifetime: Duration,
) -> Result<String, String> {
    let header = serde_json::json!({
        "alg": "RS256",
        "typ": "JWT",
        "x5t": key.x5t,
        "x5c": [key.x5c],
    });
    let jti: [u8; 16] = rand::random();
    let claims = serde_json::json!({
        "aud": audience,
        "iss": client_id,
        "sub": client_id,
        "jti": format_uuid(jti),
        "iat": now,
        "nbf": now,
        "exp": now.saturating_add(lifetime.as_secs()),
    });
    let header = serde_json::to_vec(&header).map_err(|e| format!("encoding assertion: {e}"))?;
    let claims = serde_json::to_vec(&claims).map_err(|e| format!("encoding assertion: {e}"))?;
    let mut jwt = URL_SAFE_NO_PAD.encode(header);
    jwt.push('.');
    jwt.push_str(&URL_SAFE_NO_PAD.encode(claims));
    let signature = key
        .signer
        .try_sign(jwt.as_bytes())
        .map_err(|_| "signing the client assertion failed".to_owned())?;
    jwt.push('.');
    jwt.push_str(&URL_SAFE_NO_PAD.encode(signature.to_bytes()));
    Ok(jwt)
}

/// A random (v4) UUID string from 16 random bytes.
fn format_uuid(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IdentitySpec, Secret, SystemClock};

    fn request(ad_endpoint: &str, tenant: &str) -> FetchRequest {
        let mut spec = IdentitySpec::client_secret("cid", tenant, Secret::new("s"));
        spec.ad_endpoint = ad_endpoint.to_owned();
        FetchRequest {
            identity: Arc::new(spec),
            resource: "https://vault.azure.net".to_owned(),
            tenant: Some(tenant.to_owned()),
            requester: Default::default(),
        }
    }

    fn client() -> EntraClient {
        EntraClient::new(
            SourceKind::ClientSecret,
            EntraConfig {
                extra_authorities: vec![
                    reqwest::Url::parse("http://127.0.0.1:8080/").expect("url"),
                ],
                ..EntraConfig::default()
            },
            Arc::new(SystemClock),
        )
        .expect("client")
    }

    /// Item 3 of the trust-boundary issue: an identity author cannot point its credential at a
    /// server of its choosing. Only https to the clouds' Entra hosts, plus what the operator
    /// lists (by scheme, host and port); the refusal names the flag.
    #[test]
    fn authorities_outside_the_clouds_and_the_operators_list_are_refused() {
        let c = client();
        let url = |ad: &str| c.token_url(&request(ad, "tid")).map(|u| u.to_string());
        for cloud in CLOUD_AUTHORITIES {
            assert!(url(cloud).is_ok(), "{cloud}");
        }
        assert!(
            url("https://LOGIN.microsoftonline.us/").is_ok(),
            "host case"
        );
        assert!(
            url("http://127.0.0.1:8080/base/").is_ok(),
            "listed by the operator"
        );
        for refused in [
            "https://attacker.example/",
            "http://login.microsoftonline.com/",
            "https://login.microsoftonline.com:8443/",
            "https://login.microsoftonline.com.attacker.example/",
            "https://user:pw@login.microsoftonline.com/",
            "http://127.0.0.1:8081/",
            "https://127.0.0.1:8080/",
        ] {
            let error = url(refused).expect_err(refused).to_string();
            assert!(
                error.contains(ALLOWED_AUTHORITIES_FLAG),
                "{refused}: {error}"
            );
        }
        // The operator's default authority needs no listing.
        let own = EntraClient::new(
            SourceKind::ClientSecret,
            EntraConfig {
                default_authority: "http://10.0.0.1:9/".to_owned(),
                ..EntraConfig::default()
            },
            Arc::new(SystemClock),
        )
        .expect("client");
        assert!(own.token_url(&request("", "tid")).is_ok());
        assert!(
            own.token_url(&request("http://10.0.0.1:9/", "tid"))
                .is_err()
        );
    }

    #[test]
    fn token_url_resolves_like_upstream() {
        let c = client();
        let url = |ad: &str, t: &str| c.token_url(&request(ad, t)).map(|u| u.to_string());
        assert_eq!(
            url("", "tid").expect("default"),
            "https://login.microsoftonline.com/tid/oauth2/token?api-version=1.0"
        );
        assert_eq!(
            url("https://login.chinacloudapi.cn/", "tid").expect("sovereign"),
            "https://login.chinacloudapi.cn/tid/oauth2/token?api-version=1.0"
        );
        // Relative resolution: without the trailing slash the last segment is replaced.
        assert_eq!(
            url("http://127.0.0.1:8080/base", "tid").expect("no slash"),
            "http://127.0.0.1:8080/tid/oauth2/token?api-version=1.0"
        );
        assert_eq!(
            url("http://127.0.0.1:8080/base/", "tid").expect("slash"),
            "http://127.0.0.1:8080/base/tid/oauth2/token?api-version=1.0"
        );
        for bad in ["", "../x", "t/../../y", "t?x", "t#"] {
            assert!(url("", bad).is_err(), "tenant {bad:?} must be rejected");
        }
        assert!(url("ftp://host/", "tid").is_err());
        assert!(url("not a url", "tid").is_err());
    }

    #[test]
    fn uuids_are_v4() {
        let id = format_uuid([0xff; 16]);
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert_eq!(&id[19..20], "b");
    }
}
