//! [`BrokerError`]: why no token could be handed out, with the status NMI answers.
//!
//! Messages carry the identity's client id, the resource and upstream's error code and
//! description, never a token, a client secret, a certificate password or an assertion. The
//! type is `Clone` because one upstream failure is delivered to every request waiting on it.

use std::time::Duration;

use super::source::SourceKind;

/// Longest upstream error description kept (upstream bodies are not trusted to be short).
pub(crate) const MAX_DESCRIPTION: usize = 512;

/// Why the broker could not return a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// The token endpoint answered and said no (IMDS 4xx other than 429, Entra 4xx such as
    /// `invalid_client`). Upstream NMI answers these with **403** (a `TokenRefreshError`,
    /// docs/upstream.md#status-codes); retrying does not help.
    #[error(
        "{source_kind} token request for client {client_id} refused (HTTP {status}): {error}: {description}"
    )]
    Refused {
        /// Which source refused.
        source_kind: SourceKind,
        /// The identity's client id.
        client_id: String,
        /// Upstream's HTTP status.
        status: u16,
        /// Upstream's `error` code (e.g. `invalid_client`), or `unknown`.
        error: String,
        /// Upstream's `error_description`, truncated.
        description: String,
    },
    /// The token endpoint could not be reached or failed (transport error, timeout, 5xx, 429,
    /// or the node's IMDS budget was exhausted for too long). Upstream NMI answers **503**.
    #[error("{source_kind} token source unavailable for client {client_id}: {reason}")]
    Unavailable {
        /// Which source failed.
        source_kind: SourceKind,
        /// The identity's client id.
        client_id: String,
        /// What went wrong (no secrets).
        reason: String,
        /// How long upstream asked callers to wait (`Retry-After`), if it did.
        retry_after: Option<Duration>,
    },
    /// The identity cannot produce tokens as configured (unsupported type, missing secret,
    /// unreadable PKCS#12, bad authority URL). Upstream NMI answers **503**.
    #[error("identity {client_id} is misconfigured: {reason}")]
    Config {
        /// The identity's client id.
        client_id: String,
        /// What is wrong (no secrets).
        reason: String,
    },
}

impl BrokerError {
    /// The HTTP status NMI answers with, as upstream does: 403 for refusals by the token
    /// endpoint, 503 for everything else.
    pub fn status(&self) -> u16 {
        match self {
            Self::Refused { .. } => 403,
            Self::Unavailable { .. } | Self::Config { .. } => 503,
        }
    }

    /// `Retry-After` to send, if upstream gave one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The source that failed, if the failure came from a source.
    pub fn source_kind(&self) -> Option<SourceKind> {
        match self {
            Self::Refused { source_kind, .. } | Self::Unavailable { source_kind, .. } => {
                Some(*source_kind)
            }
            Self::Config { .. } => None,
        }
    }
}

/// Truncate an upstream-provided text to [`MAX_DESCRIPTION`] bytes on a char boundary.
pub(crate) fn truncate(text: &str) -> String {
    if text.len() <= MAX_DESCRIPTION {
        return text.to_owned();
    }
    let mut end = MAX_DESCRIPTION;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_upstream() {
        let refused = BrokerError::Refused {
            source_kind: SourceKind::Imds,
            client_id: "c".into(),
            status: 400,
            error: "invalid_request".into(),
            description: "Identity not found".into(),
        };
        assert_eq!(refused.status(), 403);
        let unavailable = BrokerError::Unavailable {
            source_kind: SourceKind::ClientSecret,
            client_id: "c".into(),
            reason: "timeout".into(),
            retry_after: Some(Duration::from_secs(3)),
        };
        assert_eq!(unavailable.status(), 503);
        assert_eq!(unavailable.retry_after(), Some(Duration::from_secs(3)));
        let config = BrokerError::Config {
            client_id: "c".into(),
            reason: "x".into(),
        };
        assert_eq!(config.status(), 503);
    }

    #[test]
    fn truncates_on_char_boundary() {
        let long = "é".repeat(600);
        let cut = truncate(&long);
        assert!(cut.len() <= MAX_DESCRIPTION + "…".len());
        assert!(cut.ends_with('…'));
        assert_eq!(truncate("short"), "short");
    }
}
