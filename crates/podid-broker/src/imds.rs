//! [`ImdsSource`]: type 0 tokens from the node's IMDS (docs/upstream.md#token-sources), within the
//! node's [`ImdsLimiter`] budget.
//!
//! `GET {endpoint}/metadata/identity/oauth2/token?api-version=2018-02-01&client_id=…&resource=…`
//! with `Metadata: true` (`msi_res_id=…` instead of `client_id` for an identity given only by
//! resource id, neither for the system-assigned identity). 4xx (other than 429) → [`BrokerError::Refused`] (NMI: 403); 429 →
//! [`BrokerError::Unavailable`] and the limiter pauses for `Retry-After`; 5xx, timeouts and
//! transport errors → [`BrokerError::Unavailable`] (NMI: 503) after a few jittered retries.

use std::sync::Arc;
use std::time::Duration;

use super::clock::Clock;
use super::error::BrokerError;
use super::http::{Exchange, HttpTimeouts, SourceBuildError, backoff, build_client, retry_after};
use super::limiter::ImdsLimiter;
use super::source::{FetchRequest, SourceFuture, SourceKind, TokenSource};
use super::token::Token;

/// `Retry-After` suggested when the node's IMDS budget had no turn in time.
pub const BUDGET_RETRY_AFTER: Duration = Duration::from_secs(1);

/// IMDS source settings.
#[derive(Debug, Clone)]
pub struct ImdsConfig {
    /// Base URL of IMDS, default `http://169.254.169.254:80` (NMI's `--metadata-ip` and
    /// `--metadata-port`). NMI's own calls leave the node through `OUTPUT` and are not
    /// intercepted.
    pub endpoint: String,
    /// `api-version` sent (upstream: `2018-02-01`).
    pub api_version: String,
    /// Connect and total timeouts (defaults 2 s and 10 s).
    pub timeouts: HttpTimeouts,
    /// Retries after a transport error or 5xx (default 2), each through the limiter.
    pub max_retries: u32,
    /// Base of the jittered exponential backoff between retries (default 200 ms).
    pub retry_base: Duration,
    /// Pause applied to the limiter on a 429 without `Retry-After` (default 1 s).
    pub throttle_pause: Duration,
}

impl Default for ImdsConfig {
    fn default() -> Self {
        Self {
            endpoint: "http://169.254.169.254:80".to_owned(),
            api_version: "2018-02-01".to_owned(),
            timeouts: HttpTimeouts {
                connect: Duration::from_secs(2),
                total: Duration::from_secs(10),
            },
            max_retries: 2,
            retry_base: Duration::from_millis(200),
            throttle_pause: Duration::from_secs(1),
        }
    }
}

/// Tokens from the node's IMDS for user-assigned identities (`client_id`).
#[derive(Debug)]
pub struct ImdsSource {
    client: reqwest::Client,
    url: reqwest::Url,
    config: ImdsConfig,
    limiter: Arc<ImdsLimiter>,
    clock: Arc<dyn Clock>,
}

impl ImdsSource {
    /// A source calling IMDS at `config.endpoint`, within `limiter`'s budget.
    pub fn new(
        config: ImdsConfig,
        limiter: Arc<ImdsLimiter>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, SourceBuildError> {
        let base = config.endpoint.trim_end_matches('/');
        let raw = format!("{base}/metadata/identity/oauth2/token");
        let url = reqwest::Url::parse(&raw).map_err(|e| SourceBuildError::Url {
            what: "IMDS",
            url: config.endpoint.clone(),
            reason: e.to_string(),
        })?;
        let client = build_client(SourceKind::Imds, config.timeouts, &[])?;
        Ok(Self {
            client,
            url,
            config,
            limiter,
            clock,
        })
    }

    /// The node-wide limiter this source uses.
    pub fn limiter(&self) -> &Arc<ImdsLimiter> {
        &self.limiter
    }

    async fn fetch_token(&self, request: &FetchRequest) -> Result<Token, BrokerError> {
        let exchange = Exchange {
            kind: SourceKind::Imds,
            client_id: &request.identity.client_id,
            resource: &request.resource,
        };
        let mut attempt = 0;
        loop {
            match self.attempt(&exchange, request).await {
                Err(error @ BrokerError::Unavailable { .. })
                    if attempt < self.config.max_retries && error.retry_after().is_none() =>
                {
                    attempt += 1;
                    tracing::warn!(client_id = %exchange.client_id, attempt, %error, "IMDS token request failed, retrying");
                    tokio::time::sleep(backoff(self.config.retry_base, attempt)).await;
                }
                other => return other,
            }
        }
    }

    async fn attempt(
        &self,
        exchange: &Exchange<'_>,
        request: &FetchRequest,
    ) -> Result<Token, BrokerError> {
        // Budget exhaustion is not retried here (that would only queue again): the caller gets
        // 503 with a short Retry-After.
        let _permit = self
            .limiter
            .acquire_for(request.requester.clone())
            .await
            .map_err(|timeout| {
                exchange.unavailable(timeout.to_string(), Some(BUDGET_RETRY_AFTER))
            })?;
        let mut query: Vec<(&str, &str)> = vec![("api-version", &self.config.api_version)];
        // Upstream always asks by the identity's client id; without one (the node's own
        // identity on the exception path) the resource id, else system-assigned.
        if !request.identity.client_id.is_empty() {
            query.push(("client_id", &request.identity.client_id));
        } else if !request.identity.resource_id.is_empty() {
            query.push(("msi_res_id", &request.identity.resource_id));
        }
        query.push(("resource", &request.resource));
        let response = self
            .client
            .get(self.url.clone())
            .query(&query)
            .header("Metadata", "true")
            .send()
            .await
            .map_err(|e| exchange.transport(&e))?;
        let status = response.status().as_u16();
        let wait = retry_after(response.headers());
        if status == 429 {
            self.limiter
                .pause_for(wait.unwrap_or(self.config.throttle_pause));
        }
        let body = response.bytes().await.map_err(|e| exchange.transport(&e))?;
        exchange.answer(
            status,
            wait.or((status == 429).then_some(self.config.throttle_pause)),
            &body,
            self.clock.now(),
        )
    }
}

impl TokenSource for ImdsSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Imds
    }

    fn fetch<'a>(&'a self, request: &'a FetchRequest) -> SourceFuture<'a> {
        Box::pin(self.fetch_token(request))
    }
}
