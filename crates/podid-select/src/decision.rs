//! The decision for one token request: [`select`].
//!
//! Inputs are plain values: the calling pod, the request's identity selector, and a
//! [`Snapshot`] of what the watches hold (the [`MatchIndex`] with its operation mode and
//! namespaced rules, the binding copies recorded in the pod's assignments, and — with
//! `--serve-workload-identity-pods` — the service accounts). The output is a [`Selection`]: the
//! identity and the credential source to use, a wait, or a refusal with its reason.
//!
//! The order (each step only when the previous one handed out nothing):
//! 1. [`MatchIndex::decide`]: an exception gives the node's own identity; a matched identity is
//!    used; an assignment in progress is a [`Selection::Wait`];
//! 2. a matched identity switched to federation ([`crate::federated`]) gets its federated
//!    credential, or is refused when the switch names a service account the pod may not use;
//! 3. a pod without any identity that carries `azure.workload.identity/use: "true"` is served as
//!    a Workload Identity pod ([`crate::workload`]) when the flag is on;
//! 4. anything else is refused ([`Refusal`]).
//!
//! Federated credentials come back with an empty pod uid: the caller fills
//! [`BoundPod::uid`](crate::federated::BoundPod) when it needs one (nmi looks it up only then).

use std::sync::Arc;

use podid_api::AzureIdentity;
use podid_imds::{IdentitySelector, ImdsError};

use crate::assigned::{AssignedBindings, credential_for};
use crate::federated::FederatedCredential;
use crate::matching::{CallerPod, Decision, MatchIndex, NoMatch, NodeIdentity, PendingReason};
use crate::workload::{self, WorkloadAccounts, WorkloadGrant, is_workload_identity_pod};

/// What the decision reads besides the pod and the request.
#[derive(Clone, Copy)]
pub struct Snapshot<'a> {
    /// Identities, bindings, assignments and exceptions, with the operation mode and the
    /// namespaced rules.
    pub index: &'a MatchIndex,
    /// The binding copies recorded in the pod's assignments (standard mode's federated switch).
    pub assigned: &'a AssignedBindings,
    /// `--serve-workload-identity-pods`: the service accounts (`None`: the flag is off, Workload
    /// Identity pods are not served through IMDS).
    pub workload: Option<&'a dyn WorkloadAccounts>,
    /// `--federated-default-tenant-id` is set (a Workload Identity service account naming no
    /// tenant can be served).
    pub federated_default_tenant: bool,
}

impl std::fmt::Debug for Snapshot<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("options", &self.index.options())
            .field("workload", &self.workload.is_some())
            .field("federated_default_tenant", &self.federated_default_tenant)
            .finish_non_exhaustive()
    }
}

/// Where the token for a matched identity comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The identity's own type: the node's IMDS (type 0) or Entra with the identity's Secret
    /// (types 1 and 2).
    Usual,
    /// Switched to federation: this service account's token is exchanged at Entra.
    Federated(FederatedCredential),
}

/// Why a request gets no token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No identity matches (see [`NoMatch`]).
    NoMatch(NoMatch),
    /// The matched identity is switched to federation with a service account the pod may not
    /// use ([`crate::federated::confine_federated`]): no token is made for it.
    FederatedConfined {
        /// The identity's client id.
        client_id: String,
        /// Why, naming the service account.
        reason: String,
    },
    /// A Workload Identity pod that cannot be served (see [`workload::Refusal`]).
    Workload(workload::Refusal),
    /// The wait for an assignment in progress ran out.
    PendingTimeout,
}

impl Refusal {
    /// The IMDS error answering it for `pod`. The federated refusal is a 503 naming the reason.
    pub fn to_imds_error(&self, pod: &CallerPod) -> ImdsError {
        match self {
            Self::NoMatch(no_match) => no_match.to_imds_error(pod),
            Self::FederatedConfined { client_id, reason } => ImdsError::TokenUnavailable {
                detail: format!("identity {client_id} is misconfigured: {reason}"),
            },
            Self::Workload(
                workload::Refusal::NotSynced(error)
                | workload::Refusal::Misconfigured(error)
                | workload::Refusal::Selector(error),
            ) => error.clone(),
            Self::PendingTimeout => ImdsError::AssignmentPending {
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
            },
        }
    }

    /// Final: asking again the same way gets the same answer until an object changes (400
    /// `invalid_request`, and the 403s naming what to fix); not final: the answer may change
    /// soon without anyone acting (404 while nothing is bound, 503 while syncing or assigning).
    pub fn is_final(&self, pod: &CallerPod) -> bool {
        self.to_imds_error(pod).is_final_refusal()
    }
}

/// The decision for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Selection {
    /// The pod is excepted: a token of the node's own identity, without identity checks.
    Node(NodeIdentity),
    /// A matched identity (in standard mode the copy recorded in the assignment) and its source.
    Identity {
        /// The identity.
        identity: Arc<AzureIdentity>,
        /// Its token source for this pod.
        source: Source,
    },
    /// A Workload Identity pod: its service account's identity by federated exchange.
    Workload(WorkloadGrant),
    /// Nothing usable yet, but an assignment is in progress: wait (bounded) and select again.
    Wait(PendingReason),
    /// No token.
    Refused(Refusal),
}

/// Decide what `pod` gets for a request selecting `selector`. See the module docs.
pub fn select(
    snapshot: &Snapshot<'_>,
    pod: &CallerPod,
    selector: &IdentitySelector<'_>,
) -> Selection {
    match snapshot.index.decide(pod, selector) {
        Decision::Exception(node) => Selection::Node(node),
        Decision::Pending(reason) => Selection::Wait(reason),
        Decision::Identity(identity) => {
            match credential_for(snapshot.index, snapshot.assigned, pod, "", &identity) {
                None => Selection::Identity {
                    identity,
                    source: Source::Usual,
                },
                Some(Ok(credential)) => Selection::Identity {
                    identity,
                    source: Source::Federated(credential),
                },
                Some(Err(reason)) => Selection::Refused(Refusal::FederatedConfined {
                    client_id: identity.spec.client_id.clone().unwrap_or_default(),
                    reason,
                }),
            }
        }
        Decision::NoMatch(no_match) => match snapshot.workload {
            Some(accounts) if serves_as_workload_pod(snapshot.index, pod, &no_match) => {
                match workload::resolve(
                    accounts,
                    pod,
                    "",
                    selector,
                    snapshot.federated_default_tenant,
                ) {
                    Ok(grant) => Selection::Workload(grant),
                    Err(refusal) => Selection::Refused(Refusal::Workload(refusal)),
                }
            }
            _ => Selection::Refused(Refusal::NoMatch(no_match)),
        },
    }
}

/// Whether `pod`, which `no_match` says has no identity for the request, is served as a
/// Workload Identity pod: it has the label and no binding gives it any identity (an unsupported
/// selector is re-checked without it, so the Workload Identity path answers it with its own
/// message).
fn serves_as_workload_pod(index: &MatchIndex, pod: &CallerPod, no_match: &NoMatch) -> bool {
    if !is_workload_identity_pod(pod) {
        return false;
    }
    match no_match {
        NoMatch::NoIdentityForPod => true,
        NoMatch::UnsupportedSelector { .. } => matches!(
            index.decide(pod, &IdentitySelector::None),
            Decision::NoMatch(NoMatch::NoIdentityForPod)
        ),
        NoMatch::IdentityNotFound { .. } => false,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use podid_imds::ErrorOptions;

    use super::*;
    use crate::cases::{Case, Outcome, cases};
    use crate::federated::{BoundPod, FederatedSubject};
    use crate::workload::AccountSnapshot;

    struct Built {
        index: MatchIndex,
        assigned: AssignedBindings,
        accounts: AccountSnapshot,
        pod: CallerPod,
    }

    fn build(case: &Case) -> Built {
        Built {
            index: MatchIndex::new(
                case.options,
                case.identities.iter().cloned().map(Arc::new),
                case.bindings.iter().cloned().map(Arc::new),
                case.assignments.iter().cloned().map(Arc::new),
                case.exceptions.iter().cloned().map(Arc::new),
            ),
            assigned: AssignedBindings::new(&case.assignments),
            accounts: AccountSnapshot::new(&case.service_accounts),
            pod: CallerPod::of(&case.pod),
        }
    }

    fn select_case(case: &Case, built: &Built) -> Selection {
        let snapshot = Snapshot {
            index: &built.index,
            assigned: &built.assigned,
            workload: case
                .serve_workload_identity_pods
                .then_some(&built.accounts as &dyn WorkloadAccounts),
            federated_default_tenant: case.federated_default_tenant,
        };
        select(&snapshot, &built.pod, &case.query.selector())
    }

    #[test]
    fn every_shared_case_gets_its_answer() {
        for case in cases() {
            let built = build(&case);
            let selection = select_case(&case, &built);
            let outcome = Outcome::of(&selection, |refusal| {
                refusal
                    .to_imds_error(&built.pod)
                    .status(ErrorOptions::default())
                    .as_u16()
            });
            assert_eq!(outcome, case.expected, "{}: {selection:?}", case.name);
        }
    }

    fn case(name: &str) -> Case {
        cases()
            .into_iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no case {name:?}"))
    }

    #[test]
    fn federated_credentials_name_the_pods_own_account_and_leave_the_uid_to_the_caller() {
        for name in [
            "an identity switched to federation",
            "a Workload Identity pod is served with its service account's identity",
        ] {
            let case = case(name);
            let built = build(&case);
            let credential = match select_case(&case, &built) {
                Selection::Identity {
                    source: Source::Federated(credential),
                    ..
                } => credential,
                Selection::Workload(grant) => grant.credential,
                other => panic!("{name}: {other:?}"),
            };
            assert_eq!(
                credential,
                FederatedCredential {
                    subject: FederatedSubject::new("apps", "web"),
                    bound_pod: Some(BoundPod {
                        name: "web".into(),
                        uid: String::new()
                    }),
                },
                "{name}"
            );
        }
    }

    #[test]
    fn refusals_say_whether_asking_again_can_help() {
        let pod = CallerPod {
            namespace: "apps".into(),
            name: "web".into(),
            ..CallerPod::default()
        };
        let final_ = [
            Refusal::NoMatch(NoMatch::NoIdentityForPod),
            Refusal::NoMatch(NoMatch::IdentityNotFound { client_id: None }),
        ];
        for refusal in final_ {
            assert!(refusal.is_final(&pod), "{refusal:?}");
        }
        // The wait ran out: upstream's 404; the others 503.
        let not_final = [
            (Refusal::PendingTimeout, 404),
            (
                Refusal::FederatedConfined {
                    client_id: "c".into(),
                    reason: "r".into(),
                },
                503,
            ),
            (
                Refusal::Workload(workload::Refusal::NotSynced(ImdsError::TokenUnavailable {
                    detail: "syncing".into(),
                })),
                503,
            ),
        ];
        for (refusal, status) in not_final {
            assert!(!refusal.is_final(&pod), "{refusal:?}");
            assert_eq!(
                refusal
                    .to_imds_error(&pod)
                    .status(ErrorOptions::default())
                    .as_u16(),
                status,
                "{refusal:?}"
            );
        }
    }
}
