//! Access-token claims as Entra (v1 tokens) writes them.

use serde::{Deserialize, Serialize};

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
