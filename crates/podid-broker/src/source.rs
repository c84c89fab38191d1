//! The [`TokenSource`] abstraction: one upstream that turns an identity, a resource and a tenant
//! into a token. The broker owns caching, single-flight and refresh; a source only makes calls.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::error::BrokerError;
use super::identity::{Credential, IdentitySpec, IdentityType};
use super::limiter::Requester;
use super::token::Token;

/// Kinds of token source, the only label of the upstream metrics (bounded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKind {
    /// The node's IMDS (type 0).
    Imds,
    /// Entra, client secret (type 1).
    ClientSecret,
    /// Entra, certificate assertion (type 2).
    Certificate,
    /// Entra, federated service-account token (any type with `podid.io/token-source: federated`).
    Federated,
}

impl SourceKind {
    /// Every kind, in [`SourceKind::index`] order.
    pub const ALL: [SourceKind; 4] = [
        Self::Imds,
        Self::ClientSecret,
        Self::Certificate,
        Self::Federated,
    ];

    /// A stable lower-case name for metric labels and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Imds => "imds",
            Self::ClientSecret => "client_secret",
            Self::Certificate => "certificate",
            Self::Federated => "federated",
        }
    }

    /// Position in [`SourceKind::ALL`].
    pub fn index(self) -> usize {
        match self {
            Self::Imds => 0,
            Self::ClientSecret => 1,
            Self::Certificate => 2,
            Self::Federated => 3,
        }
    }

    /// The source for an identity type, `None` for unsupported types.
    pub fn for_type(identity_type: IdentityType) -> Option<Self> {
        match identity_type {
            IdentityType::UserAssignedMsi => Some(Self::Imds),
            IdentityType::ServicePrincipal => Some(Self::ClientSecret),
            IdentityType::ServicePrincipalCertificate => Some(Self::Certificate),
            IdentityType::Other(_) => None,
        }
    }

    /// The source for an identity: [`SourceKind::Federated`] when its credential is federated
    /// (whatever its type), else by type.
    pub fn for_identity(identity: &IdentitySpec) -> Option<Self> {
        match identity.credential {
            Credential::Federated { .. } => Some(Self::Federated),
            _ => Self::for_type(identity.identity_type),
        }
    }
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One upstream token request.
#[derive(Debug, Clone)]
pub struct FetchRequest {
    /// The identity.
    pub identity: Arc<IdentitySpec>,
    /// The resource (audience) asked for.
    pub resource: String,
    /// The tenant (types 1 and 2; `None` for IMDS).
    pub tenant: Option<String>,
    /// The pod the call is made for (its turn in the node's IMDS budget).
    pub requester: Requester,
}

/// The future a [`TokenSource`] returns.
pub type SourceFuture<'a> = Pin<Box<dyn Future<Output = Result<Token, BrokerError>> + Send + 'a>>;

/// An upstream that issues tokens. Implementations map upstream failures to
/// [`BrokerError::Refused`] (the endpoint said no) or [`BrokerError::Unavailable`] (it could not
/// answer), and never put credentials or tokens into errors.
pub trait TokenSource: Send + Sync + fmt::Debug {
    /// Which kind of source this is (for metrics).
    fn kind(&self) -> SourceKind;

    /// Obtain a fresh token. Called by the broker at most once at a time per cache key.
    fn fetch<'a>(&'a self, request: &'a FetchRequest) -> SourceFuture<'a>;
}

/// The broker's sources, one per kind.
#[derive(Debug, Clone)]
pub struct Sources {
    /// Type 0.
    pub imds: Arc<dyn TokenSource>,
    /// Type 1.
    pub client_secret: Arc<dyn TokenSource>,
    /// Type 2.
    pub certificate: Arc<dyn TokenSource>,
    /// Federated exchange (identities with [`Credential::Federated`]).
    pub federated: Arc<dyn TokenSource>,
}

impl Sources {
    /// The same source for every kind (tests, or a single-purpose broker).
    pub fn all(source: Arc<dyn TokenSource>) -> Self {
        Self {
            imds: source.clone(),
            client_secret: source.clone(),
            certificate: source.clone(),
            federated: source,
        }
    }

    /// The source of `kind`.
    pub fn get(&self, kind: SourceKind) -> &Arc<dyn TokenSource> {
        match kind {
            SourceKind::Imds => &self.imds,
            SourceKind::ClientSecret => &self.client_secret,
            SourceKind::Certificate => &self.certificate,
            SourceKind::Federated => &self.federated,
        }
    }
}
