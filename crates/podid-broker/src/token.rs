//! [`Token`]: an access token as the broker caches it.

use std::fmt;
use std::time::SystemTime;

use podid_imds::{AccessToken, TokenResponse, unix_seconds};

/// An access token with its expiry. `Debug` never shows the token.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// Checked once for JSON escaping ([`AccessToken`]).
    access_token: AccessToken,
    /// Expiry, Unix seconds.
    pub expires_on: u64,
    /// `not_before`, Unix seconds, if the source gave one.
    pub not_before: Option<u64>,
    /// The resource the token is for, as the source reported it.
    pub resource: String,
    /// `token_type`, usually `Bearer`.
    pub token_type: String,
}

impl Token {
    /// A `Bearer` token for `resource` expiring at `expires_on` (Unix seconds).
    pub fn new(
        access_token: impl Into<String>,
        resource: impl Into<String>,
        expires_on: u64,
    ) -> Self {
        Self {
            access_token: AccessToken::new(access_token),
            expires_on,
            not_before: None,
            resource: resource.into(),
            token_type: "Bearer".to_owned(),
        }
    }

    /// The access token. Never log or format it.
    pub fn access_token(&self) -> &str {
        self.access_token.as_str()
    }

    /// Whether the token is still valid at `now`.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        unix_seconds(now) < self.expires_on
    }

    /// The IMDS-shaped answer at `now` (`expires_in` recomputed from `expires_on`), with real
    /// IMDS's `client_id` key when given.
    pub fn response<'a>(
        &'a self,
        client_id: Option<&'a str>,
        now: SystemTime,
    ) -> TokenResponse<'a> {
        let mut response = TokenResponse::from_access_token(
            &self.access_token,
            &self.resource,
            self.expires_on,
            now,
        )
        .with_token_type(&self.token_type);
        if let Some(not_before) = self.not_before {
            response = response.with_not_before(not_before);
        }
        if let Some(client_id) = client_id {
            response = response.with_client_id(client_id);
        }
        response
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("access_token", &"<redacted>")
            .field("expires_on", &self.expires_on)
            .field("not_before", &self.not_before)
            .field("resource", &self.resource)
            .field("token_type", &self.token_type)
            .finish()
    }
}
