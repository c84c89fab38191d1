//! A token for an attributed pod: one decision by [`podid_select::select`] over the state the
//! watches filled, a bounded wait while the pod's assignment is in progress, then the tokens
//! from the provider.

use std::sync::Arc;
use std::time::Instant;

use podid_api::AzureIdentity;
use podid_broker::{BrokerError, Credential, Tokens};
use podid_imds::{IdentitySelector, ImdsError};
use podid_select::assigned::AssignedBindings;
use podid_select::federated::FederatedCredential;
use podid_select::matching::{CallerPod, MatchIndex, NodeIdentity, PendingReason};
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

/// What one selection read from the matcher: the index and the binding copies it decided over.
/// Both are swapped whole, never edited, so the same pointers mean nothing changed since.
struct Read {
    index: Arc<MatchIndex>,
    assigned: Arc<AssignedBindings>,
}

impl Read {
    /// What `matcher` holds now.
    fn now(matcher: &Matcher) -> Self {
        Self {
            index: matcher.current(),
            assigned: matcher.assigned(),
        }
    }

    /// Whether `matcher` still holds what was read.
    fn is_current(&self, matcher: &Matcher) -> bool {
        Arc::ptr_eq(&self.index, &matcher.current())
            && Arc::ptr_eq(&self.assigned, &matcher.assigned())
    }
}

/// The selection for `pod` over `read` ([`podid_select::select`] over the state the watches
/// filled): one decision, over what was read under short locks released before anything is
/// awaited.
fn select_now(
    state: &NmiState,
    read: &Read,
    pod: &CallerPod,
    selector: &IdentitySelector<'_>,
) -> Selection {
    select_over(
        read,
        state.workload.as_deref(),
        state.options.federated_default_tenant,
        pod,
        selector,
    )
}

/// [`select_now`] over its parts: the matcher, the service accounts (with
/// `--serve-workload-identity-pods`) and whether a default tenant is set.
#[cfg(test)]
pub(super) fn select_with(
    matcher: &Matcher,
    workload: Option<&ServiceAccounts>,
    federated_default_tenant: bool,
    pod: &CallerPod,
    selector: &IdentitySelector<'_>,
) -> Selection {
    select_over(
        &Read::now(matcher),
        workload,
        federated_default_tenant,
        pod,
        selector,
    )
}

fn select_over(
    read: &Read,
    workload: Option<&ServiceAccounts>,
    federated_default_tenant: bool,
    pod: &CallerPod,
    selector: &IdentitySelector<'_>,
) -> Selection {
    #[cfg(test)]
    tests::SELECTIONS.with(|n| n.set(n.get() + 1));
    let snapshot = Snapshot {
        index: &read.index,
        assigned: &read.assigned,
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
    let selection = {
        let read = Read::now(&state.matcher);
        match select_now(state, &read, pod, selector) {
            // Fast path: no subscription (a shared counter every request would touch), no
            // deadline. Boxed, like the other slow paths: keeps the per-request future small.
            Selection::Wait(reason) => {
                Box::pin(wait_while_pending(state, pod, selector, reason, read)).await
            }
            other => other,
        }
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
/// once it is not, or the last [`Selection::Wait`] when the wait runs out. `reason` is the first
/// selection's answer and `read` what it decided over: the pod is selected again only once the
/// matcher has changed.
async fn wait_while_pending(
    state: &NmiState,
    pod: &CallerPod,
    selector: &IdentitySelector<'_>,
    mut reason: PendingReason,
    read: Read,
) -> Selection {
    let deadline = tokio::time::Instant::now() + state.options.pending_wait;
    let mut changes = state.matcher.subscribe();
    // A change between the first selection and the subscription is not signalled to it, but
    // the matcher then no longer holds what the first selection read.
    let mut changed = !read.is_current(&state.matcher);
    drop(read);
    loop {
        if changed {
            changes.borrow_and_update();
            let read = Read::now(&state.matcher);
            match select_now(state, &read, pod, selector) {
                Selection::Wait(again) => reason = again,
                other => return other,
            }
        }
        tracing::debug!(pod = %pod.name, namespace = %pod.namespace, ?reason, "identity assignment pending, waiting");
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => changed = true,
            Ok(Err(_)) | Err(_) => return Selection::Wait(reason),
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

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::net::{Ipv4Addr, SocketAddr};
    use std::time::Duration;

    use podid_imds::ErrorOptions;
    use podid_select::cases::{Case, cases};

    use super::*;
    use crate::events::PodEventReason;
    use crate::health::Health;
    use crate::metrics::Metrics;
    use crate::pods::PodIndex;
    use crate::provider::{TokenFuture, TokenProvider};
    use crate::server::{Limits, ServerOptions};

    thread_local! {
        /// Selections made on this thread (the tests' runtimes run on their own thread).
        pub(super) static SELECTIONS: Cell<usize> = const { Cell::new(0) };
    }

    /// A token source the pending requests below never reach.
    #[derive(Debug)]
    struct NoTokens;

    impl TokenProvider for NoTokens {
        fn tokens<'a>(&'a self, _request: TokenRequest<'a>) -> TokenFuture<'a> {
            Box::pin(async {
                Err(BrokerError::Config {
                    client_id: String::new(),
                    reason: "no tokens in this test".to_owned(),
                })
            })
        }
    }

    fn case(name: &str) -> Case {
        cases()
            .into_iter()
            .find(|case| case.name == name)
            .unwrap_or_else(|| panic!("no shared case {name:?}"))
    }

    /// The matcher's index and binding copies for `case`, as the watches install them.
    fn install(matcher: &Matcher, case: &Case) {
        matcher.replace_with_assigned(
            MatchIndex::new(
                case.options,
                case.identities.iter().cloned().map(Arc::new),
                case.bindings.iter().cloned().map(Arc::new),
                case.assignments.iter().cloned().map(Arc::new),
                case.exceptions.iter().cloned().map(Arc::new),
            ),
            AssignedBindings::new(&case.assignments),
        );
    }

    /// nmi's state with `case` installed and synced, waiting at most `pending_wait`.
    fn state_for(case: &Case, pending_wait: Duration) -> NmiState {
        let matcher = Matcher::new(case.options);
        install(&matcher, case);
        matcher.mark_synced();
        let options = ServerOptions {
            metadata: SocketAddr::from((Ipv4Addr::LOCALHOST, 1)),
            metadata_header_required: true,
            block_instance_metadata: false,
            enable_host_token: false,
            errors: ErrorOptions::default(),
            pod_wait: Duration::ZERO,
            pending_wait,
            limits: Limits::default(),
            federated_default_tenant: case.federated_default_tenant,
        };
        NmiState::new(
            options,
            Arc::new(PodIndex::new()),
            Arc::new(matcher),
            Arc::new(NoTokens),
            Arc::new(Metrics::new()),
            Arc::new(Health::default()),
        )
    }

    fn selections() -> usize {
        SELECTIONS.with(Cell::get)
    }

    /// While nothing changes, a request held for its assignment is decided once, not again
    /// when it starts waiting.
    #[tokio::test(start_paused = true)]
    async fn a_held_request_is_decided_once_while_nothing_changes() {
        let waiting = case("a Created assignment waits");
        let state = state_for(&waiting, Duration::from_secs(5));
        let pod = CallerPod::of(&waiting.pod);
        let before = selections();
        let result = grant(
            &state,
            &pod,
            &waiting.query.selector(),
            "https://vault.azure.net",
        )
        .await;
        let Err(denied) = result else {
            panic!("a Created assignment was served");
        };
        assert_eq!(denied.event, Some(PodEventReason::AssignmentTimeout));
        assert_eq!(selections() - before, 1);
    }

    /// A held request is decided again when the matcher changes, and served once the assignment
    /// lands.
    #[tokio::test(start_paused = true)]
    async fn a_held_request_is_decided_again_when_its_assignment_lands() {
        let waiting = case("a Created assignment waits");
        let landed = case("assigned identity, no selector");
        let state = state_for(&waiting, Duration::from_secs(5));
        let pod = CallerPod::of(&waiting.pod);
        let selector = waiting.query.selector();
        let read = Read::now(&state.matcher);
        let Selection::Wait(reason) = select_now(&state, &read, &pod, &selector) else {
            panic!("a Created assignment is not waited for");
        };
        let before = selections();
        let (selection, ()) = tokio::join!(
            wait_while_pending(&state, &pod, &selector, reason, read),
            async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                install(&state.matcher, &landed);
            },
        );
        assert!(
            matches!(selection, Selection::Identity { .. }),
            "{selection:?}"
        );
        assert_eq!(selections() - before, 1);
    }

    /// The assignment landing between the first decision and the start of the wait is not
    /// missed: the request is decided again at once instead of waiting out its budget.
    #[tokio::test(start_paused = true)]
    async fn a_change_before_the_wait_begins_is_not_missed() {
        let waiting = case("a Created assignment waits");
        let landed = case("assigned identity, no selector");
        let state = state_for(&waiting, Duration::from_secs(5));
        let pod = CallerPod::of(&waiting.pod);
        let selector = waiting.query.selector();
        let read = Read::now(&state.matcher);
        let Selection::Wait(reason) = select_now(&state, &read, &pod, &selector) else {
            panic!("a Created assignment is not waited for");
        };
        install(&state.matcher, &landed);
        let started = tokio::time::Instant::now();
        let selection = wait_while_pending(&state, &pod, &selector, reason, read).await;
        assert!(
            matches!(selection, Selection::Identity { .. }),
            "{selection:?}"
        );
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
