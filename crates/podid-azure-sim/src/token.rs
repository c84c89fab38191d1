//! The access tokens the cloud signs: their claims as Entra (v1 tokens) writes them, issuing
//! and verifying.

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::util::{guid, now_secs};
use crate::world::{App, Cloud};

/// Claims of an access token issued by the simulated Entra or IMDS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessTokenClaims {
    /// Audience: the resource the token is for.
    pub aud: String,
    /// `https://sts.windows.net/<tenant>/`.
    pub iss: String,
    /// Issued at.
    pub iat: u64,
    /// Not before.
    pub nbf: u64,
    /// Expiry.
    pub exp: u64,
    /// Tenant id.
    pub tid: String,
    /// Object id of the service principal (principal id for managed identities).
    pub oid: String,
    /// Subject (same as `oid` for app tokens).
    pub sub: String,
    /// Client id (v1 claim).
    pub appid: String,
    /// Client id (v2 claim).
    pub azp: String,
    /// How the client authenticated (`"1"` secret, `"2"` certificate / assertion).
    pub appidacr: String,
    /// Always `app`.
    pub idtyp: String,
    /// Resource id of the managed identity, for managed identities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xms_mirid: Option<String>,
    /// Unique token id.
    pub uti: String,
    /// Token version.
    pub ver: String,
}

impl Cloud {
    /// Issues an access token for an application (service principal or managed identity).
    pub(crate) fn issue_for_app(
        &self,
        app: &App,
        audience: &str,
        lifetime: u64,
        appidacr: &str,
    ) -> (String, AccessTokenClaims) {
        let now = now_secs();
        let claims = AccessTokenClaims {
            aud: audience.to_owned(),
            iss: format!("https://sts.windows.net/{}/", self.inner.tenant_id),
            iat: now,
            nbf: now,
            exp: now + lifetime,
            tid: self.inner.tenant_id.clone(),
            oid: app.object_id.clone(),
            sub: app.object_id.clone(),
            appid: app.client_id.clone(),
            azp: app.client_id.clone(),
            appidacr: appidacr.to_owned(),
            idtyp: "app".to_owned(),
            xms_mirid: app.mi_resource_id.clone(),
            uti: guid(),
            ver: "1.0".to_owned(),
        };
        (self.sign(&claims), claims)
    }

    fn sign(&self, claims: &AccessTokenClaims) -> String {
        self.inner
            .key
            .sign_with(claims, |h| {
                h.typ = Some("JWT".to_owned());
                h.x5t = Some(self.inner.key.kid().to_owned());
            })
            .expect("serialising plain claims and signing with an in-memory RSA key cannot fail")
    }

    /// Issues a token for a client id known to the world (for tests that need an ARM token
    /// without going through Entra).
    pub fn issue_access_token(&self, client_id: &str, audience: &str) -> Result<String, Error> {
        let (app, lifetime) = {
            let st = self.state();
            let app = st
                .apps
                .get(&client_id.to_ascii_lowercase())
                .cloned()
                .ok_or_else(|| Error::UnknownApp {
                    client_id: client_id.to_owned(),
                })?;
            (app, st.entra_token_lifetime)
        };
        Ok(self.issue_for_app(&app, audience, lifetime, "1").0)
    }

    /// Verifies signature, issuer and lifetime of a token this cloud issued; returns its claims
    /// so tests can check which identity and audience it is for.
    pub fn verify_access_token(&self, token: &str) -> Result<AccessTokenClaims, Error> {
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        v.validate_aud = false;
        v.set_issuer(&[format!("https://sts.windows.net/{}/", self.inner.tenant_id)]);
        v.leeway = 0;
        self.inner
            .key
            .verify::<AccessTokenClaims>(token, &v)
            .map_err(|e| match e {
                podid_test_keys::Error::Jwt(j) => Error::InvalidToken(j),
                other => Error::Keys(other),
            })
    }
}
