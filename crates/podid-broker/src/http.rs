//! What the HTTP token sources share: client construction, token body parsing and the mapping
//! of upstream answers to [`BrokerError`]. Nothing here formats a request body, a token or a
//! credential into an error.

use std::error::Error as _;
use std::time::{Duration, SystemTime};

use podid_imds::{parse_expires_on, unix_seconds};
use serde::Deserialize;

use super::error::{BrokerError, truncate};
use super::source::SourceKind;
use super::token::Token;

/// Building an HTTP token source failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceBuildError {
    /// The reqwest client could not be built.
    #[error("building the HTTP client for the {kind} token source")]
    Client {
        /// Which source.
        kind: SourceKind,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// A configured URL is not usable.
    #[error("invalid {what} URL {url:?}: {reason}")]
    Url {
        /// Which URL.
        what: &'static str,
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
}

/// Timeouts of an HTTP token source.
#[derive(Debug, Clone, Copy)]
pub struct HttpTimeouts {
    /// TCP connect timeout.
    pub connect: Duration,
    /// Timeout of the whole request, body included.
    pub total: Duration,
}

/// Install rustls' `ring` provider as the process default if none is installed: the workspace
/// builds reqwest without a provider, and building any `reqwest::Client` panics without one.
pub(crate) fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another installer is fine: some provider is installed either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// A client that never uses proxies (IMDS and token endpoints must be reached directly) and
/// has the given timeouts.
pub(crate) fn build_client(
    kind: SourceKind,
    timeouts: HttpTimeouts,
    extra_roots: &[reqwest::Certificate],
) -> Result<reqwest::Client, SourceBuildError> {
    ensure_crypto_provider();
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(timeouts.connect)
        .timeout(timeouts.total)
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("podid-nmi/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none());
    for root in extra_roots {
        builder = builder.add_root_certificate(root.clone());
    }
    builder
        .build()
        .map_err(|source| SourceBuildError::Client { kind, source })
}

/// A number that token endpoints send as a JSON string or a JSON number.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StrOrNum {
    Str(String),
    Num(serde_json::Number),
}

impl StrOrNum {
    fn as_text(&self) -> String {
        match self {
            Self::Str(s) => s.clone(),
            Self::Num(n) => n.to_string(),
        }
    }
}

/// A token body of IMDS or Entra's v1 endpoint (extra keys ignored).
#[derive(Deserialize)]
struct TokenBody {
    access_token: String,
    #[serde(default)]
    expires_on: Option<StrOrNum>,
    #[serde(default)]
    expires_in: Option<StrOrNum>,
    #[serde(default)]
    not_before: Option<StrOrNum>,
    #[serde(default)]
    resource: Option<String>,
    #[serde(default)]
    token_type: Option<String>,
}

/// An error body `{"error": …, "error_description": …}`.
#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
}

/// Context for mapping one upstream exchange.
pub(crate) struct Exchange<'a> {
    pub kind: SourceKind,
    pub client_id: &'a str,
    pub resource: &'a str,
}

impl Exchange<'_> {
    pub(crate) fn unavailable(&self, reason: String, retry_after: Option<Duration>) -> BrokerError {
        BrokerError::Unavailable {
            source_kind: self.kind,
            client_id: self.client_id.to_owned(),
            reason,
            retry_after,
        }
    }

    /// Map a transport error (no URL, no body in the message).
    pub(crate) fn transport(&self, error: &reqwest::Error) -> BrokerError {
        let what = if error.is_timeout() {
            "request timed out"
        } else if error.is_connect() {
            "connection failed"
        } else {
            "request failed"
        };
        let mut reason = what.to_owned();
        let mut cause = error.source();
        while let Some(inner) = cause {
            reason.push_str(": ");
            reason.push_str(&inner.to_string());
            cause = inner.source();
        }
        self.unavailable(truncate(&reason), None)
    }

    /// Map an answer: 2xx → token, 429/5xx → unavailable, other statuses → refused.
    pub(crate) fn answer(
        &self,
        status: u16,
        retry_after: Option<Duration>,
        body: &[u8],
        now: SystemTime,
    ) -> Result<Token, BrokerError> {
        if (200..300).contains(&status) {
            return self.parse_token(body, now);
        }
        let (error, description) = match serde_json::from_slice::<ErrorBody>(body) {
            Ok(parsed) => (
                parsed.error.unwrap_or_else(|| "unknown".to_owned()),
                parsed.error_description.unwrap_or_default(),
            ),
            Err(_) => (
                "unknown".to_owned(),
                String::from_utf8_lossy(body).trim().to_owned(),
            ),
        };
        let description = truncate(&description);
        if status == 429 || status >= 500 {
            let mut reason = format!("HTTP {status}");
            if error != "unknown" || !description.is_empty() {
                reason = format!("{reason}: {error}: {description}");
            }
            return Err(self.unavailable(reason, retry_after));
        }
        Err(BrokerError::Refused {
            source_kind: self.kind,
            client_id: self.client_id.to_owned(),
            status,
            error: truncate(&error),
            description,
        })
    }

    fn parse_token(&self, body: &[u8], now: SystemTime) -> Result<Token, BrokerError> {
        let parsed: TokenBody = serde_json::from_slice(body).map_err(|e| {
            // serde_json's message names the position and what was expected, not the input.
            self.unavailable(format!("unreadable token response: {e}"), None)
        })?;
        if parsed.access_token.is_empty() {
            return Err(self.unavailable("token response without access_token".to_owned(), None));
        }
        let expires_on = parsed
            .expires_on
            .as_ref()
            .and_then(|v| parse_expires_on(&v.as_text()))
            .or_else(|| {
                parsed
                    .expires_in
                    .as_ref()
                    .and_then(|v| v.as_text().parse::<u64>().ok())
                    .map(|secs| unix_seconds(now).saturating_add(secs))
            })
            .ok_or_else(|| {
                self.unavailable("token response without a usable expiry".to_owned(), None)
            })?;
        let mut token = Token::new(
            parsed.access_token,
            parsed
                .resource
                .filter(|r| !r.is_empty())
                .unwrap_or_else(|| self.resource.to_owned()),
            expires_on,
        );
        token.not_before = parsed
            .not_before
            .as_ref()
            .and_then(|v| v.as_text().parse::<u64>().ok());
        if let Some(token_type) = parsed.token_type.filter(|t| !t.is_empty()) {
            token.token_type = token_type;
        }
        Ok(token)
    }
}

/// `Retry-After` in seconds (the HTTP-date form is ignored), capped at five minutes.
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    let secs: u64 = value.trim().parse().ok()?;
    Some(Duration::from_secs(secs.min(300)))
}

/// Jittered exponential backoff before retry `attempt` (1-based): a random duration in
/// `[base·2^(attempt-1) / 2, base·2^(attempt-1)]`.
pub(crate) fn backoff(base: Duration, attempt: u32) -> Duration {
    let full = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(10));
    let half = full / 2;
    let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
    half + Duration::from_millis(rand::random_range(0..=jitter_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn exchange() -> Exchange<'static> {
        Exchange {
            kind: SourceKind::Imds,
            client_id: "cid",
            resource: "https://vault.azure.net",
        }
    }

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    #[test]
    fn parses_imds_string_body() {
        let body = br#"{"access_token":"eyJ0","client_id":"cid","expires_in":"86399","expires_on":"1700086399","ext_expires_in":"86399","not_before":"1699999999","resource":"https://vault.azure.net","token_type":"Bearer"}"#;
        let token = exchange().answer(200, None, body, now()).expect("token");
        assert_eq!(token.access_token(), "eyJ0");
        assert_eq!(token.expires_on, 1_700_086_399);
        assert_eq!(token.not_before, Some(1_699_999_999));
        assert_eq!(token.resource, "https://vault.azure.net");
    }

    #[test]
    fn parses_numeric_and_expires_in_only_bodies() {
        let body = br#"{"access_token":"a","expires_on":1700000100,"token_type":"Bearer"}"#;
        let token = exchange().answer(200, None, body, now()).expect("token");
        assert_eq!(token.expires_on, 1_700_000_100);
        assert_eq!(
            token.resource, "https://vault.azure.net",
            "resource falls back to the request"
        );
        let body = br#"{"access_token":"a","expires_in":3599,"token_type":"Bearer"}"#;
        let token = exchange().answer(200, None, body, now()).expect("token");
        assert_eq!(token.expires_on, 1_700_003_599);
    }

    #[test]
    fn bad_bodies_are_unavailable_without_echoing_the_token() {
        let body = br#"{"access_token":"SECRET-TOKEN","token_type":"Bearer"}"#;
        let error = exchange()
            .answer(200, None, body, now())
            .expect_err("no expiry");
        assert_eq!(error.status(), 503);
        assert!(!format!("{error} {error:?}").contains("SECRET-TOKEN"));
        let error = exchange()
            .answer(200, None, b"<html>", now())
            .expect_err("not json");
        assert_eq!(error.status(), 503);
    }

    #[test]
    fn statuses_map_to_refused_or_unavailable() {
        let body = br#"{"error":"invalid_request","error_description":"Identity not found"}"#;
        let error = exchange().answer(400, None, body, now()).expect_err("400");
        assert!(
            matches!(&error, BrokerError::Refused { status: 400, error, description, .. }
            if error == "invalid_request" && description == "Identity not found")
        );
        assert_eq!(error.status(), 403);
        let error = exchange()
            .answer(
                429,
                Some(Duration::from_secs(7)),
                b"Too many requests",
                now(),
            )
            .expect_err("429");
        assert_eq!(error.status(), 503);
        assert_eq!(error.retry_after(), Some(Duration::from_secs(7)));
        let error = exchange().answer(502, None, b"", now()).expect_err("502");
        assert!(matches!(error, BrokerError::Unavailable { .. }));
    }

    #[test]
    fn backoff_is_jittered_and_grows() {
        let base = Duration::from_millis(100);
        for _ in 0..50 {
            let first = backoff(base, 1);
            assert!(first >= Duration::from_millis(50) && first <= base);
            let third = backoff(base, 3);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
        }
    }
}
