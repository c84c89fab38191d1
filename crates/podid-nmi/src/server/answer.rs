//! How a refusal or a failure becomes an IMDS answer: a selection refusal
//! ([`podid_select::Refusal`]) or a broker error ([`BrokerError`]) mapped to its IMDS error, its
//! `Retry-After` when waiting helps, and the Kubernetes Event the pod gets when its owner can
//! fix it. Every status code and body comes from `podid-imds`.

use bytes::Bytes;
use http::Response;
use http::header::{self, HeaderValue};
use http_body_util::Full;
use podid_broker::BrokerError;
use podid_imds::{ErrorOptions, ImdsError, WireResponse};
use podid_select::Refusal;
use podid_select::matching::{CallerPod, NoMatch};
use podid_select::workload::Refusal as WorkloadRefusal;

use crate::events::{PodEvent, PodEventReason};

use super::{Body, NmiState};

pub(super) fn to_response(wire: WireResponse) -> Response<Body> {
    let (status, headers, body) = wire.into_parts();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

pub(super) fn error_response(error: &ImdsError, options: ErrorOptions) -> Response<Body> {
    to_response(error.response(options))
}

/// The answer for a refused grant, with its `Retry-After` when it has one.
pub(super) fn denied_response(denied: &Denied, options: ErrorOptions) -> WireResponse {
    let mut response = denied.error.response(options);
    if let Some(seconds) = denied.retry_after {
        response
            .headers
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// Why [`grant`] gave no token: the IMDS error, and how long the caller should wait before
/// asking again when waiting helps.
#[derive(Debug)]
pub(super) struct Denied {
    pub(super) error: ImdsError,
    /// Seconds for `Retry-After` (503 answers only).
    pub(super) retry_after: Option<u64>,
    /// The Kubernetes Event the pod gets, when its owner can fix the failure.
    pub(super) event: Option<PodEventReason>,
}

impl From<ImdsError> for Denied {
    fn from(error: ImdsError) -> Self {
        Self {
            error,
            retry_after: None,
            event: None,
        }
    }
}

impl Denied {
    fn with_event(mut self, reason: PodEventReason) -> Self {
        self.event = Some(reason);
        self
    }
}

/// Queue the Event `denied` asks for on `pod` (never waits; rate-limited and bounded by the sink).
pub(super) fn report_event(state: &NmiState, pod: &CallerPod, denied: &Denied) {
    let (Some(sink), Some(reason)) = (&state.events, denied.event) else {
        return;
    };
    sink.report(PodEvent {
        namespace: pod.namespace.clone(),
        pod: pod.name.clone(),
        uid: pod_uid(state, pod),
        reason,
        note: denied.error.to_string(),
    });
}

/// The pod's uid, for the Event's reference (`kubectl describe pod` matches on it).
fn pod_uid(state: &NmiState, pod: &CallerPod) -> Option<String> {
    state
        .pods
        .uid(&pod.namespace, &pod.name)
        .filter(|uid| !uid.is_empty())
}

/// `Retry-After` sent while nmi's own state is not ready (caches syncing): a short, honest wait.
pub(super) const NOT_READY_RETRY_AFTER: u64 = 1;

/// Longest `Retry-After` passed on from upstream (IMDS or Entra said to wait).
const MAX_UPSTREAM_RETRY_AFTER: u64 = 60;

/// The answer for a refusal: its IMDS error, `Retry-After` when waiting helps, and the Event
/// the pod gets when its owner can fix it. The one place a selection refusal becomes an answer.
pub(super) fn refusal_denied(pod: &CallerPod, refusal: &Refusal) -> Denied {
    let denied = Denied::from(refusal.to_imds_error(pod));
    match refusal {
        // A pod without the label asks IMDS on its own (SDK probes): nothing to fix.
        Refusal::NoMatch(NoMatch::NoIdentityForPod) if pod.binding_label().is_some() => {
            denied.with_event(PodEventReason::NoIdentityMatched)
        }
        Refusal::NoMatch(NoMatch::IdentityNotFound { .. }) => {
            denied.with_event(PodEventReason::IdentityNotBound)
        }
        Refusal::NoMatch(_) | Refusal::Workload(WorkloadRefusal::Selector(_)) => denied,
        Refusal::FederatedConfined { .. } => denied.with_event(PodEventReason::CredentialInvalid),
        Refusal::Workload(WorkloadRefusal::NotSynced(_)) => Denied {
            retry_after: Some(NOT_READY_RETRY_AFTER),
            ..denied
        },
        Refusal::Workload(WorkloadRefusal::Misconfigured(_)) => {
            denied.with_event(PodEventReason::FederatedTokenFailed)
        }
        Refusal::PendingTimeout => denied.with_event(PodEventReason::AssignmentTimeout),
    }
}

/// The answer for a broker failure. A 503 carries `Retry-After` when waiting helps: always
/// when the wait is known (the node's IMDS budget had no turn in time, or upstream sent
/// `Retry-After`, capped at [`MAX_UPSTREAM_RETRY_AFTER`]); for other transport failures only
/// with `--set-retry-after-header`, then upstream's 20 s.
pub(super) fn broker_denial(error: &BrokerError, set_retry_after_header: bool) -> Denied {
    let retry_after = match error {
        BrokerError::Unavailable {
            retry_after: Some(wait),
            ..
        } => Some(
            (wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
                .clamp(1, MAX_UPSTREAM_RETRY_AFTER),
        ),
        BrokerError::Unavailable {
            retry_after: None, ..
        } if set_retry_after_header => Some(u64::from(podid_imds::RETRY_AFTER_SECONDS)),
        _ => None,
    };
    Denied {
        error: broker_error(error),
        retry_after,
        event: PodEventReason::for_broker_error(error),
    }
}

fn broker_error(error: &BrokerError) -> ImdsError {
    if error.status() == 403 {
        ImdsError::TokenRefused {
            detail: error.to_string(),
        }
    } else {
        ImdsError::TokenUnavailable {
            detail: error.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use std::net::IpAddr;
    use std::sync::Arc;

    use podid_broker::SourceKind;
    use podid_select::assigned::AssignedBindings;
    use podid_select::matching::MatchIndex;

    use super::super::grant::select_with;
    use super::*;
    use crate::pods::PodIndex;
    use crate::state::Matcher;
    use crate::workload::ServiceAccounts;

    fn unavailable(retry_after: Option<Duration>) -> BrokerError {
        BrokerError::Unavailable {
            source_kind: SourceKind::Imds,
            client_id: "c".into(),
            reason: "no turn in the node's IMDS budget".into(),
            retry_after,
        }
    }

    fn retry_after_of(denied: &Denied, options: ErrorOptions) -> (u16, Option<String>) {
        let response = denied_response(denied, options);
        let header = response
            .headers
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap_or_default().to_owned());
        (response.status.as_u16(), header)
    }

    /// The shared selection cases through nmi's own path: the pod attributed by its address in
    /// the pod index, the matcher and service-account store the watches fill, and the mapping of
    /// refusals to IMDS answers. podidctl runs the same table (`podidctl::explain` tests).
    #[test]
    fn nmi_answers_every_shared_selection_case() {
        use podid_select::cases::{Outcome, POD_IP, cases};

        for case in cases() {
            let pods = PodIndex::new();
            pods.replace_all([&case.pod]);
            pods.mark_synced();
            let ip: IpAddr = POD_IP.parse().expect("address");
            let pod = pods.lookup(ip).expect("attributed");
            let matcher = Matcher::new(case.options);
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
            matcher.mark_synced();
            let accounts = ServiceAccounts::default();
            accounts.replace_all(&case.service_accounts);
            accounts.mark_synced();
            let workload = case.serve_workload_identity_pods.then_some(&accounts);
            let selection = select_with(
                &matcher,
                workload,
                case.federated_default_tenant,
                &pod,
                &case.query.selector(),
            );
            let outcome = Outcome::of(&selection, |refusal| {
                denied_response(&refusal_denied(&pod, refusal), ErrorOptions::default())
                    .status
                    .as_u16()
            });
            assert_eq!(outcome, case.expected, "{}: {selection:?}", case.name);
        }
    }

    #[test]
    fn budget_saturation_always_answers_503_with_a_short_retry_after() {
        let error = unavailable(Some(podid_broker::BUDGET_RETRY_AFTER));
        for flag in [false, true] {
            let denied = broker_denial(&error, flag);
            assert_eq!(denied.retry_after, Some(1));
            let (status, header) = retry_after_of(&denied, ErrorOptions::default());
            assert_eq!(status, 503);
            assert_eq!(header.as_deref(), Some("1"));
        }
    }

    #[test]
    fn upstream_retry_after_is_rounded_up_and_capped() {
        let denied = broker_denial(&unavailable(Some(Duration::from_millis(2500))), false);
        assert_eq!(denied.retry_after, Some(3));
        let denied = broker_denial(&unavailable(Some(Duration::from_secs(3600))), false);
        assert_eq!(denied.retry_after, Some(MAX_UPSTREAM_RETRY_AFTER));
        let denied = broker_denial(&unavailable(Some(Duration::ZERO)), false);
        assert_eq!(denied.retry_after, Some(1));
    }

    #[test]
    fn unreachable_upstream_gets_retry_after_only_with_the_flag() {
        let error = unavailable(None);
        let denied = broker_denial(&error, false);
        let (status, header) = retry_after_of(&denied, ErrorOptions::default());
        assert_eq!((status, header), (503, None));
        let denied = broker_denial(&error, true);
        let (status, header) = retry_after_of(&denied, ErrorOptions::default());
        assert_eq!(status, 503);
        assert_eq!(header.as_deref(), Some("20"));
    }

    #[test]
    fn refusals_and_config_errors_never_get_retry_after() {
        let refused = BrokerError::Refused {
            source_kind: SourceKind::ClientSecret,
            client_id: "c".into(),
            status: 401,
            error: "invalid_client".into(),
            description: "bad secret".into(),
        };
        let config = BrokerError::Config {
            client_id: "c".into(),
            reason: "Secret ns/s has no certificate key".into(),
        };
        for flag in [false, true] {
            let (status, header) =
                retry_after_of(&broker_denial(&refused, flag), ErrorOptions::default());
            assert_eq!((status, header), (403, None));
            let (status, header) =
                retry_after_of(&broker_denial(&config, flag), ErrorOptions::default());
            assert_eq!((status, header), (503, None));
        }
    }
}
