//! Where the ARM client gets its bearer tokens: [`ArmTokenProvider`], and
//! [`BrokerTokenProvider`] which asks a [`TokenBroker`] (so MIC authenticates to ARM with the
//! same sources NMI uses: Entra client secret, certificate, or the node's managed identity).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use podid_broker::{BrokerError, IdentitySpec, Token, TokenBroker};

/// The ARM token resource of Azure's public cloud (docs/upstream.md#cloud-configuration).
pub const ARM_RESOURCE: &str = "https://management.azure.com/";

/// The future an [`ArmTokenProvider`] returns.
pub type ArmTokenFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Arc<Token>, BrokerError>> + Send + 'a>>;

/// Hands out ARM bearer tokens. Implementations cache; the client asks before every request.
pub trait ArmTokenProvider: Send + Sync + fmt::Debug {
    /// A token for the resource manager.
    fn token(&self) -> ArmTokenFuture<'_>;

    /// ARM rejected the last token (401): drop any cached copy so the next call fetches anew.
    fn invalidate(&self) {}
}

/// An [`ArmTokenProvider`] backed by a [`TokenBroker`] (cache, single-flight, refresh).
#[derive(Debug, Clone)]
pub struct BrokerTokenProvider {
    broker: Arc<TokenBroker>,
    identity: Arc<IdentitySpec>,
    resource: String,
}

impl BrokerTokenProvider {
    /// Tokens for `resource` (the cloud's resource manager endpoint, usually [`ARM_RESOURCE`])
    /// as `identity`: a service principal from the cloud config, or a managed identity.
    pub fn new(broker: Arc<TokenBroker>, identity: IdentitySpec, resource: &str) -> Self {
        Self {
            broker,
            identity: Arc::new(identity),
            resource: resource.to_owned(),
        }
    }
}

impl ArmTokenProvider for BrokerTokenProvider {
    fn token(&self) -> ArmTokenFuture<'_> {
        Box::pin(self.broker.token(&self.identity, &self.resource))
    }

    fn invalidate(&self) {
        self.broker.invalidate_identity(&self.identity.key());
    }
}
