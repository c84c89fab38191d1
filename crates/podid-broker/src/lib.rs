//! The token broker `nmi` serves tokens from (and `mic` gets its ARM token from, through
//! `podid-arm`): [`TokenBroker`] in front of one [`TokenSource`] per [`SourceKind`] — node
//! IMDS, Entra client secret, Entra certificate assertion and federated exchange — with a
//! bounded cache, single-flight upstream calls, proactive background refresh, stale-if-error,
//! revocation, and a node-wide IMDS budget (5 concurrent, 20 per second).
//!
//! A request names an identity ([`IdentitySpec`]), a resource and optionally a tenant. The broker
//! answers from its cache while the token is outside the refresh margin, makes exactly one
//! upstream call per key when several requests miss at once, refreshes hot keys in the
//! background, keeps serving a still-valid token when a refresh fails, and drops every entry of an
//! identity on [`TokenBroker::invalidate_identity`].
//!
//! Which identity a pod gets is decided in `podid-select`, before the broker is asked. This crate
//! must not depend on hyper servers, iptables, prometheus or the test doubles; it talks to Azure
//! only through reqwest clients whose URLs are configuration, and reads time only through an
//! injected [`Clock`]. nmi turns broker results into IMDS bodies with `podid-imds` and maps
//! [`BrokerStats`] to its metrics. See `docs/token-broker.md` for the cache key, refresh margin,
//! single-flight, budget and error mapping.

mod cache;
mod clock;
mod entra;
mod error;
mod evict;
mod federated;
mod http;
mod identity;
mod imds;
mod key;
mod limiter;
mod source;
mod stats;
mod token;

pub use cache::{BrokerConfig, Issued, TokenBroker, Tokens};
pub use clock::{Clock, ManualClock, SystemClock};
pub use entra::{
    ALLOWED_AUTHORITIES_FLAG, CLIENT_ASSERTION_TYPE, CLOUD_AUTHORITIES, CertificateSource,
    ClientSecretSource, DEFAULT_AUTHORITY, EntraConfig, authority_allowed,
};
pub use error::BrokerError;
pub use federated::{
    FederatedConfig, FederatedSource, SERVICE_ACCOUNT_TOKEN_SECONDS, TOKEN_EXCHANGE_AUDIENCE,
};
pub use http::{HttpTimeouts, SourceBuildError};
pub use identity::{
    BoundPod, Credential, CredentialOrigin, FederatedSubject, IdentityKey, IdentitySpec,
    IdentityType, Secret,
};
pub use imds::{BUDGET_RETRY_AFTER, ImdsConfig, ImdsSource};
pub use key::{CacheKey, IdentityView};
pub use limiter::{FairQueue, ImdsLimiter, ImdsPermit, LimiterConfig, LimiterTimeout, Requester};
pub use source::{FetchRequest, SourceFuture, SourceKind, Sources, TokenSource};
pub use stats::{BrokerStats, SourceCounters};
pub use token::Token;
