//! A token for an attributed pod: one decision by [`podid_select::select`] over the state the
//! watches filled, a bounded wait while the pod's assignment is in progress, then the tokens
//! from the provider.

use std::sync::Arc;
use std::time::Instant;

use podid_api::AzureIdentity;
use podid_controller::broker::{BrokerError, Credential, Tokens};
use podid_imds::{IdentitySelector, ImdsError};
use podid_select::federated::FederatedCredential;
use podid_select::matching::{CallerPod, NodeIdentity};
use podid_select::workload::{WorkloadAccounts, WorkloadGrant};
use podid_select::{Refusal, Selection, Snapshot, Source};

use crate::metrics::imds_operation;
use crate::provider::{TokenRequest, TokenTarget};
use crate::workload::ServiceAccounts;

use super::NmiState;
use super::answer::{Denied, NOT_READY_RETRY_AFTER, broker_denial, refusal_denied};
use crate::state::Matcher;

/// Tokens for a request after attribution: match, wait while pending, fetch.
pub(super) struct Granted {
    pub(super) tokens: Tokens,
    pub(super) client_id: ClientId,
    pub(super) cache_hit: Option<bool>,
    pub(super) exception: bool,
    /// Served as a Workload Identity pod ([`crate::workload`]).
    pub(super) workload_identity: bool,
    /// An identity switched to federated tokens.
    pub(super) federated: bool,
}

impl Granted {
    /// `identity_type` of `podid_nmi_tokens_issued_total`: how the token was obtained.
    pub(super) fn source_label(&self) -> &'static str {
        if self.exception {
            return "node_identity";
        }
        if self.workload_identity {
            return "workload_identity";
        }
        if self.federated {
            return "federated";
        }
        match &self.client_id {
            ClientId::Identity(identity) => match identity.identity_type() {
                podid_api::IdentityType::UserAssignedMsi => "user_assigned_msi",
                podid_api::IdentityType::ServicePrincipal => "service_principal",
                podid_api::IdentityType::ServicePrincipalCertificate => {
                    "service_principal_certificate"
                }
                _ => "other",
            },
            _ => "other",
        }
    }
}

/// The `client_id` a grant answers with: the matched identity's (read from it, not copied per
/// request), another one, or none.
pub(super) enum ClientId {
    None,
    Identity(Arc<AzureIdentity>),
    Other(String),
}

impl ClientId {
    pub(super) fn as_deref(&self) -> Option<&str> {
        match self {
            Self::None => None,
            Self::Identity(identity) => identity.spec.client_id.as_deref(),
            Self::Other(id) => Some(id),
        }
    }
}

/// The selection for `pod` now ([`podid_select::select`] over the state the watches filled):
/// one decision, read under short locks that are released before anything is awaited.
fn select_now(state: &NmiState, pod: &CallerPod, selector: &IdentitySelector<'_>) -> Selection {
    select_with(
        &state.matcher,
        state.workload.as_deref(),
        state.options.federated_default_tenant,
        pod,
        selector,
    )
}

/// [`select_now`] over its parts: the matcher, the service accounts (with
/// `--serve-workload-identity-pods`) and whether a default tenant is set.
pub(super) fn select_with(
    matcher: &Matcher,
    workload: Option<&ServiceAccounts>,
    federated_default_tenant: bool,
    pod: &CallerPod,
    selector: &IdentitySelector<'_>,
) -> Selection {
    let index = matcher.current();
    let assigned = matcher.assigned();
    let snapshot = Snapshot {
        index: &index,
        assigned: &assigned,
        workload: workload.map(|accounts| accounts as &dyn WorkloadAccounts),
        federated_default_tenant,
    };
    podid_select::select(&snapshot, pod, selector)
}

/// Select for the pod (waiting, bounded, while its assignment is in progress) and fetch its
/// tokens.
pub(super) async fn grant(
    state: &NmiState,
    pod: &CallerPod,
    selector: &IdentitySelector<'_>,
    resource: &str,
) -> Result<Granted, Denied> {
    if !state.matcher.is_synced() {
        return Err(Denied {
            error: ImdsError::TokenUnavailable {
                detail: "NMI has not finished syncing identities from the API server".to_owned(),
            },
            retry_after: Some(NOT_READY_RETRY_AFTER),
            event: None,
        });
    }
    let selection = match select_now(state, pod, selector) {
        // Fast path: no subscription (a shared counter every request would touch), no deadline.
        // Boxed, like the other slow paths: keeps the per-request future small.
        Selection::Wait(_) => Box::pin(wait_while_pending(state, pod, selector)).await,
        other => other,
    };
    match selection {
        Selection::Refused(refusal) => Err(refusal_denied(pod, &refusal)),
        Selection::Wait(_) => Err(refusal_denied(pod, &Refusal::PendingTimeout)),
        Selection::Identity { identity, source } => {
            let operation = match &source {
                Source::Federated(_) => imds_operation::FEDERATED,
                Source::Usual if identity.identity_type().is_user_assigned_msi() => {
                    imds_operation::MSI_USER_ASSIGNED
                }
                Source::Usual => imds_operation::SERVICE_PRINCIPAL,
            };
            let federated = match source {
                Source::Usual => None,
                Source::Federated(credential) => Some(bind_to_pod(state, pod, credential)),
            };
            let request = TokenRequest {
                target: TokenTarget::Identity(&identity),
                resource,
                pod,
                federated: federated.as_ref(),
            };
            let issued = fetch(state, request, operation)
                .await
                .map_err(|e| broker_denial(&e, state.options.errors.set_retry_after_header))?;
            Ok(Granted {
                tokens: issued.tokens,
                client_id: ClientId::Identity(identity),
                cache_hit: issued.cache_hit,
                exception: false,
                workload_identity: false,
                federated: federated.is_some(),
            })
        }
        Selection::Node(node) => {
            let operation = match node {
                NodeIdentity::SystemAssigned => imds_operation::MSI,
                _ => imds_operation::MSI_USER_ASSIGNED,
            };
            let request = TokenRequest {
                target: TokenTarget::Node(&node),
                resource,
                pod,
                federated: None,
            };
            // Upstream answers every exception-path failure with 403.
            let issued =
                fetch(state, request, operation)
                    .await
                    .map_err(|e| ImdsError::TokenRefused {
                        detail: format!("failed to get service principal token, error: {e}"),
                    })?;
            Ok(Granted {
                tokens: issued.tokens,
                client_id: match node {
                    NodeIdentity::ClientId(id) => ClientId::Other(id),
                    _ => ClientId::None,
                },
                cache_hit: issued.cache_hit,
                exception: true,
                workload_identity: false,
                federated: false,
            })
        }
        Selection::Workload(grant) => {
            // Boxed, like the other slow paths: keeps the per-request future small.
            Box::pin(workload_grant(state, pod, grant, resource)).await
        }
    }
}

/// The broker's credential for `chosen`, with the pod's uid filled in when the token is bound to
/// the pod (looked up only then).
fn bind_to_pod(state: &NmiState, pod: &CallerPod, mut chosen: FederatedCredential) -> Credential {
    if let Some(bound) = chosen.bound_pod.as_mut() {
        bound.uid = state
            .pods
            .uid(&pod.namespace, &pod.name)
            .unwrap_or_default();
    }
    Credential::from(chosen)
}

/// Wait (bounded by the pending wait) while the pod's assignment is in progress; the selection
/// once it is not, or the last [`Selection::Wait`] when the wait runs out.
async fn wait_while_pending(
    state: &NmiState,
    pod: &CallerPod,
    selector: &IdentitySelector<'_>,
) -> Selection {
    let deadline = tokio::time::Instant::now() + state.options.pending_wait;
    let mut changes = state.matcher.subscribe();
    loop {
        changes.borrow_and_update();
        match select_now(state, pod, selector) {
            Selection::Wait(reason) => {
                tracing::debug!(pod = %pod.name, namespace = %pod.namespace, ?reason, "identity assignment pending, waiting");
                match tokio::time::timeout_at(deadline, changes.changed()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) | Err(_) => return Selection::Wait(reason),
                }
            }
            other => return other,
        }
    }
}

/// Tokens for a pod served as a Workload Identity pod: its service account's identity, by
/// federated exchange ([`podid_select::workload`]).
async fn workload_grant(
    state: &NmiState,
    pod: &CallerPod,
    grant: WorkloadGrant,
    resource: &str,
) -> Result<Granted, Denied> {
    let credential = bind_to_pod(state, pod, grant.credential);
    let request = TokenRequest {
        target: TokenTarget::Workload(&grant.account),
        resource,
        pod,
        federated: Some(&credential),
    };
    let issued = fetch(state, request, imds_operation::FEDERATED)
        .await
        .map_err(|e| broker_denial(&e, state.options.errors.set_retry_after_header))?;
    Ok(Granted {
        tokens: issued.tokens,
        client_id: ClientId::Other(grant.account.client_id.clone()),
        cache_hit: issued.cache_hit,
        exception: false,
        workload_identity: true,
        federated: true,
    })
}

async fn fetch(
    state: &NmiState,
    request: TokenRequest<'_>,
    operation: &'static str,
) -> Result<crate::provider::Issued, BrokerError> {
    let started = Instant::now();
    let result = match state.tokens.cached(&request) {
        Some(hit) => Ok(hit),
        None => state.tokens.tokens(request).await,
    };
    state
        .metrics
        .observe_imds_operation(operation, started.elapsed().as_secs_f64());
    match &result {
        Ok(issued) if issued.tokens.is_empty() => {
            state
                .metrics
                .imds_operations_errors
                .with_label_values(&[operation])
                .inc();
            return Err(BrokerError::Config {
                client_id: String::new(),
                reason: "the token source returned no token".to_owned(),
            });
        }
        Ok(_) => {}
        Err(_) => state
            .metrics
            .imds_operations_errors
            .with_label_values(&[operation])
            .inc(),
    }
    result
}
