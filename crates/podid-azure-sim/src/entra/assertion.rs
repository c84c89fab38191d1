//! Client assertions: a certificate assertion checked against the application's registered
//! certificates, a federated assertion against its federated credentials and the issuer's keys
//! (found by OIDC discovery, cached per issuer).

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use super::AadError;
use crate::util::now_secs;
use crate::world::{App, Cloud};

/// Clock skew tolerated on assertions (Entra allows a few minutes).
const LEEWAY_SECS: u64 = 300;

/// Claims of an assertion read before its signature is checked.
#[derive(Debug, serde::Deserialize)]
pub(super) struct PeekClaims {
    pub(super) iss: Option<String>,
    sub: Option<String>,
    #[serde(default)]
    aud: Option<Value>,
    exp: Option<u64>,
    nbf: Option<u64>,
}

impl PeekClaims {
    fn audiences(&self) -> Vec<String> {
        match &self.aud {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        }
    }
}

fn malformed() -> AadError {
    AadError::invalid_request(50_027, "JWT token is invalid or malformed.")
}

pub(super) fn peek_claims(assertion: &str) -> Result<PeekClaims, AadError> {
    use base64::Engine as _;
    let payload = assertion.split('.').nth(1).ok_or_else(malformed)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| malformed())?;
    serde_json::from_slice(&bytes).map_err(|_| malformed())
}

fn check_times(claims: &PeekClaims) -> Result<(), AadError> {
    let now = now_secs();
    let expired = AadError::invalid_client(
        700_024,
        "Client assertion is not within its valid time range.",
    );
    match claims.exp {
        Some(exp) if exp + LEEWAY_SECS >= now => {}
        _ => return Err(expired),
    }
    if claims.nbf.is_some_and(|nbf| nbf > now + LEEWAY_SECS) {
        return Err(expired);
    }
    Ok(())
}

fn signature_validation() -> Validation {
    let mut v = Validation::new(Algorithm::RS256);
    v.validate_aud = false;
    v.validate_exp = false;
    v.required_spec_claims.clear();
    v
}

/// Whether `aud` names this tenant's token endpoint (v1 or v2, any host, any query).
fn audience_is_token_endpoint(aud: &str, tenant: &str) -> bool {
    let Ok(u) = url::Url::parse(aud) else {
        return false;
    };
    let segs: Vec<&str> = u.path().trim_matches('/').split('/').collect();
    match segs.as_slice() {
        [t, "oauth2", "token"] | [t, "oauth2", "v2.0", "token"] | [t, "v2.0"] => {
            t.eq_ignore_ascii_case(tenant)
        }
        _ => false,
    }
}

pub(super) fn verify_certificate_assertion(
    app: &App,
    tenant: &str,
    assertion: &str,
) -> Result<(), AadError> {
    let header = jsonwebtoken::decode_header(assertion).map_err(|_| malformed())?;
    let claims = peek_claims(assertion)?;
    if claims.sub.as_deref().map(str::to_ascii_lowercase)
        != Some(app.client_id.to_ascii_lowercase())
    {
        return Err(AadError::invalid_client(
            700_021,
            "Client assertion application identifier doesn't match 'client_id' parameter. Review the documentation at https://learn.microsoft.com/entra/identity-platform/certificate-credentials .",
        ));
    }
    if !claims
        .audiences()
        .iter()
        .any(|a| audience_is_token_endpoint(a, tenant))
    {
        return Err(AadError::invalid_client(
            700_027,
            "Client assertion failed signature validation. The audience of the assertion is not this tenant's token endpoint.",
        ));
    }
    check_times(&claims)?;
    if header.alg != Algorithm::RS256 && header.alg != Algorithm::PS256 {
        return Err(malformed());
    }
    let cert = app.certs.iter().find(|c| {
        header.x5t.as_deref() == Some(c.x5t.as_str())
            || header.x5t_s256.as_deref() == Some(c.x5t_s256.as_str())
    });
    let Some(cert) = cert else {
        let thumb = header
            .x5t_s256
            .clone()
            .or_else(|| header.x5t.clone())
            .unwrap_or_default();
        return Err(AadError::invalid_client(
            700_027,
            format!(
                "The certificate with identifier used to sign the client assertion is not registered on application. [Reason - The key was not found., Thumbprint of key used by client: '{thumb}']"
            ),
        ));
    };
    let mut v = signature_validation();
    v.algorithms = vec![header.alg];
    jsonwebtoken::decode::<Value>(assertion, &cert.key, &v).map_err(|_| {
        AadError::invalid_client(700_027, "Client assertion failed signature validation.")
    })?;
    Ok(())
}

pub(super) async fn verify_federated_assertion(
    cloud: &Cloud,
    app: &App,
    assertion: &str,
    claims: &PeekClaims,
) -> Result<(), AadError> {
    let iss = claims.iss.clone().ok_or_else(malformed)?;
    let sub = claims.sub.clone().unwrap_or_default();
    let auds = claims.audiences();
    let by_issuer: Vec<_> = app.federated.iter().filter(|f| f.issuer == iss).collect();
    if by_issuer.is_empty() {
        return Err(AadError::invalid_request(
            700_211,
            format!(
                "No matching federated identity record found for presented assertion issuer '{iss}'. Please check your federated identity credential Subject, Audience and Issuer against the presented assertion."
            ),
        ));
    }
    if !by_issuer
        .iter()
        .any(|f| f.subject == sub && f.audiences.iter().any(|a| auds.contains(a)))
    {
        return Err(AadError::invalid_request(
            70_021,
            format!(
                "No matching federated identity record found for presented assertion. Assertion Issuer: '{iss}'. Assertion Subject: '{sub}'. Assertion Audience: '{}'.",
                auds.join(",")
            ),
        ));
    }
    check_times(claims)?;
    let header = jsonwebtoken::decode_header(assertion).map_err(|_| malformed())?;
    let kid = header.kid.clone().unwrap_or_default();
    let key = issuer_key(cloud, &iss, &kid).await?;
    let mut v = signature_validation();
    v.algorithms = vec![Algorithm::RS256];
    jsonwebtoken::decode::<Value>(assertion, &key, &v).map_err(|_| {
        AadError::invalid_client(700_027, "Client assertion failed signature validation.")
    })?;
    Ok(())
}

/// The issuer's key `kid`, from the JWKS cache or by discovery; refetches once on a miss
/// (key rotation).
async fn issuer_key(cloud: &Cloud, iss: &str, kid: &str) -> Result<DecodingKey, AadError> {
    let cached = cloud
        .inner
        .jwks_cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(iss)
        .cloned();
    if let Some(set) = cached
        && let Some(k) = find_key(&set, kid)
    {
        return Ok(k);
    }
    let set = fetch_jwks(cloud, iss).await.map_err(|e| {
        tracing::debug!(issuer = iss, error = %e, "OIDC discovery failed");
        AadError::invalid_request(
            50_166,
            format!("Request to External OIDC endpoint failed. Issuer: '{iss}'"),
        )
    })?;
    cloud
        .inner
        .jwks_cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(iss.to_owned(), set.clone());
    find_key(&set, kid).ok_or_else(|| {
        AadError::invalid_client(
            700_027,
            format!("Client assertion failed signature validation. Key '{kid}' was not found in the issuer's keys."),
        )
    })
}

fn find_key(set: &JwkSet, kid: &str) -> Option<DecodingKey> {
    let jwk = if kid.is_empty() && set.keys.len() == 1 {
        set.keys.first()
    } else {
        set.find(kid)
    }?;
    DecodingKey::from_jwk(jwk).ok()
}

pub(crate) fn http_client(cloud: &Cloud) -> Result<reqwest::Client, reqwest::Error> {
    let mut slot = cloud.inner.http.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = slot.as_ref() {
        return Ok(c.clone());
    }
    crate::install_crypto_provider();
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(10))
        .build()?;
    *slot = Some(client.clone());
    Ok(client)
}

async fn fetch_jwks(cloud: &Cloud, iss: &str) -> Result<JwkSet, anyhow::Error> {
    use anyhow::Context as _;
    let client = http_client(cloud)?;
    let base = cloud
        .inner
        .discovery_overrides
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(iss)
        .cloned()
        .unwrap_or_else(|| iss.to_owned());
    let discovery = format!(
        "{}/.well-known/openid-configuration",
        base.trim_end_matches('/')
    );
    let doc: Value = client
        .get(&discovery)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .context("fetching OIDC discovery")?
        .json()
        .await
        .context("decoding OIDC discovery")?;
    let jwks_uri = doc
        .get("jwks_uri")
        .and_then(Value::as_str)
        .context("discovery document without jwks_uri")?;
    let set: JwkSet = client
        .get(jwks_uri)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .context("fetching JWKS")?
        .json()
        .await
        .context("decoding JWKS")?;
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_endpoint_audiences() {
        let t = "72f988bf-86f1-41af-91ab-2d7cd011db47";
        assert!(audience_is_token_endpoint(
            &format!("https://login.microsoftonline.com/{t}/oauth2/token?api-version=1.0"),
            t
        ));
        assert!(audience_is_token_endpoint(
            &format!("http://127.0.0.1:9/{t}/oauth2/v2.0/token"),
            t
        ));
        assert!(!audience_is_token_endpoint(
            "https://login.microsoftonline.com/other/oauth2/token",
            t
        ));
        assert!(!audience_is_token_endpoint("api://AzureADTokenExchange", t));
    }
}
