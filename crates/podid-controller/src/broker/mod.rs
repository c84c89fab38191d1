//! The token broker: [`TokenBroker`] in front of one [`TokenSource`] per [`SourceKind`].
//!
//! A request names an identity ([`IdentitySpec`]), a resource and optionally a tenant. The broker
//! answers from its cache while the token is outside the refresh margin, makes exactly one
//! upstream call per key when several requests miss at once, refreshes hot keys in the
//! background, keeps serving a still-valid token when a refresh fails, and drops every entry of an
//! identity on [`TokenBroker::invalidate_identity`].

mod cache;
mod clock;
mod entra;
mod error;
mod evict;
mod federated;
mod http;
mod identity;
mod imds;
mod limiter;
mod source;
mod stats;
mod token;

pub use cache::{BrokerConfig, CacheKey, IdentityView, Issued, TokenBroker, Tokens};
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
pub use limiter::{FairQueue, ImdsLimiter, ImdsPermit, LimiterConfig, LimiterTimeout, Requester};
pub use source::{FetchRequest, SourceFuture, SourceKind, Sources, TokenSource};
pub use stats::{BrokerStats, SourceCounters};
pub use token::Token;
