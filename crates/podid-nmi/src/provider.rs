//! [`TokenProvider`]: how the server gets tokens once the identity is chosen. Implemented for
//! podid-broker's [`TokenBroker`] and by fakes in tests.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use podid_api::AzureIdentity;
use podid_broker::{
    BrokerError, BrokerStats, Credential, IdentitySpec, IdentityType, IdentityView, Requester,
    TokenBroker, Tokens,
};
use podid_select::matching::{CallerPod, NodeIdentity};

use crate::workload::WorkloadAccount;

/// Which identity a token is wanted for.
#[derive(Debug, Clone, Copy)]
pub enum TokenTarget<'a> {
    /// A matched `AzureIdentity` (standard mode: the copy recorded in the assignment).
    Identity(&'a AzureIdentity),
    /// An excepted pod: the node's own identity.
    Node(&'a NodeIdentity),
    /// A Workload Identity pod ([`crate::workload`]): the identity its service account names;
    /// always with a federated credential.
    Workload(&'a WorkloadAccount),
}

/// One token request after matching.
#[derive(Debug, Clone, Copy)]
pub struct TokenRequest<'a> {
    /// The identity.
    pub target: TokenTarget<'a>,
    /// The `resource` query parameter.
    pub resource: &'a str,
    /// The calling pod (e.g. for federated exchange or secrets).
    pub pod: &'a CallerPod,
    /// `Some` when the identity is switched to federated tokens for this pod
    /// ([`podid_select::assigned`]): the broker exchanges this credential's service-account token
    /// instead of asking IMDS or reading the identity's Secret.
    pub federated: Option<&'a Credential>,
}

/// The tokens obtained: one, or the primary tenant's first and one per auxiliary tenant.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Never empty on success.
    pub tokens: Tokens,
    /// Whether the answer came from a cache, when the provider knows.
    pub cache_hit: Option<bool>,
}

/// Future returned by [`TokenProvider::tokens`].
pub type TokenFuture<'a> = Pin<Box<dyn Future<Output = Result<Issued, BrokerError>> + Send + 'a>>;

/// Obtains tokens for matched identities.
pub trait TokenProvider: Send + Sync + fmt::Debug {
    /// The tokens for `request`.
    fn tokens<'a>(&'a self, request: TokenRequest<'a>) -> TokenFuture<'a>;

    /// The tokens for `request` when a cache holds them (what [`TokenProvider::tokens`] would
    /// answer at once), without the future: the server tries it first on every request. `None`
    /// means "ask [`TokenProvider::tokens`]", never a refusal.
    fn cached(&self, _request: &TokenRequest<'_>) -> Option<Issued> {
        None
    }

    /// Broker counters to expose as metrics, if any.
    fn stats(&self) -> Option<Arc<BrokerStats>> {
        None
    }
}

/// The broker's [`Requester`] for calls made for `pod` (`namespace/name`): its turn in the
/// node's IMDS budget and the owner of the cache entries it creates. Built only on a cache miss.
pub fn requester(pod: &CallerPod) -> Requester {
    Requester::new(&format!("{}/{}", pod.namespace, pod.name))
}

/// The broker's view of an `AzureIdentity` with the credential read from its Secret
/// ([`Credential::None`] for type 0). A Secret-held credential also needs its origin
/// ([`IdentitySpec::origin`], set by whoever read the Secret), or the broker refuses it.
pub fn identity_spec(identity: &AzureIdentity, credential: Credential) -> IdentitySpec {
    let spec = &identity.spec;
    IdentitySpec {
        identity_type: identity.identity_type(),
        client_id: spec.client_id.clone().unwrap_or_default(),
        resource_id: spec.resource_id.clone().unwrap_or_default(),
        tenant_id: spec.tenant_id.clone().unwrap_or_default(),
        auxiliary_tenant_ids: spec.auxiliary_tenant_ids().to_vec(),
        ad_endpoint: spec.ad_endpoint.clone().unwrap_or_default(),
        credential,
        origin: None,
    }
}

/// The broker's cache-key view of `request`'s identity, for a hit without building an
/// [`IdentitySpec`] (`None` for a Workload Identity target without its federated credential,
/// which the full path refuses).
fn cache_view<'a>(request: &TokenRequest<'a>) -> Option<IdentityView<'a>> {
    const NONE: &Credential = &Credential::None;
    let credential = request.federated.unwrap_or(NONE);
    let view = match request.target {
        TokenTarget::Identity(identity) => {
            let spec = &identity.spec;
            IdentityView::new(
                identity.identity_type(),
                spec.client_id.as_deref().unwrap_or_default(),
                spec.resource_id.as_deref().unwrap_or_default(),
                spec.tenant_id.as_deref().unwrap_or_default(),
                spec.auxiliary_tenant_ids(),
                credential,
            )
            .with_authority(spec.ad_endpoint.as_deref().unwrap_or_default())
        }
        TokenTarget::Node(NodeIdentity::SystemAssigned) => {
            IdentityView::new(IdentityType::UserAssignedMsi, "", "", "", &[], NONE)
        }
        TokenTarget::Node(NodeIdentity::ClientId(id)) => {
            IdentityView::new(IdentityType::UserAssignedMsi, id, "", "", &[], NONE)
        }
        TokenTarget::Node(NodeIdentity::ResourceId(id)) => {
            IdentityView::new(IdentityType::UserAssignedMsi, "", id, "", &[], NONE)
        }
        TokenTarget::Workload(account) => IdentityView::new(
            IdentityType::UserAssignedMsi,
            &account.client_id,
            "",
            &account.tenant_id,
            &[],
            request.federated?,
        ),
    };
    Some(view)
}

/// The broker serves type-0 identities and the exception path by client id, resource id
/// (`msi_res_id`) or the system-assigned identity. Types 1 and 2 need their Secret: wrap the
/// broker in a provider that reads it and calls [`identity_spec`] with the credential
/// (`agent::CredentialedBroker`).
impl TokenProvider for TokenBroker {
    fn tokens<'a>(&'a self, request: TokenRequest<'a>) -> TokenFuture<'a> {
        Box::pin(async move {
            if let Some(hit) = TokenProvider::cached(self, &request) {
                return Ok(hit);
            }
            let spec = match request.target {
                TokenTarget::Identity(identity) => identity_spec(
                    identity,
                    request.federated.cloned().unwrap_or(Credential::None),
                ),
                TokenTarget::Node(NodeIdentity::SystemAssigned) => IdentitySpec::managed("", ""),
                TokenTarget::Node(NodeIdentity::ClientId(id)) => IdentitySpec::managed(id, ""),
                TokenTarget::Node(NodeIdentity::ResourceId(id)) => IdentitySpec::managed("", id),
                TokenTarget::Workload(account) => {
                    let Some(credential) = request.federated.cloned() else {
                        return Err(BrokerError::Config {
                            client_id: account.client_id.clone(),
                            reason: "a Workload Identity pod is served by federated exchange only"
                                .to_owned(),
                        });
                    };
                    IdentitySpec {
                        tenant_id: account.tenant_id.clone(),
                        credential,
                        ..IdentitySpec::managed(account.client_id.as_str(), "")
                    }
                }
            };
            let spec = Arc::new(spec);
            let issued = requester(request.pod)
                .scope(self.issue(&spec, request.resource))
                .await?;
            Ok(Issued {
                tokens: issued.tokens,
                cache_hit: Some(issued.cached),
            })
        })
    }

    fn cached(&self, request: &TokenRequest<'_>) -> Option<Issued> {
        let issued = TokenBroker::cached(self, cache_view(request)?, request.resource)?;
        Some(Issued {
            tokens: issued.tokens,
            cache_hit: Some(true),
        })
    }

    fn stats(&self) -> Option<Arc<BrokerStats>> {
        Some(Arc::clone(TokenBroker::stats(self)))
    }
}
