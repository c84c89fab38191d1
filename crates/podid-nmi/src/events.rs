//! Kubernetes Events on the calling pod for token failures its owner can fix (no identity
//! matches the pod's label, the pod asks for an identity it is not bound to, the assignment is
//! not `Assigned` in time, the identity's credential Secret is missing or invalid, Entra refuses
//! the identity's credential, the federated exchange fails).
//!
//! Off the hot path: a request only calls [`EventSink::report`], which checks a per
//! pod × reason rate limit and `try_send`s into a bounded queue (dropping when full); it never
//! waits. One task ([`publish`]) drains the queue through kube's [`Recorder`]
//! (`events.k8s.io/v1`, create then patch of the series). Reason strings are stable and listed in
//! docs/operations.md. Notes carry the IMDS error text, which holds no token or secret.
//!
//! Node events ([`publish_node_event`]): a `Warning` on nmi's own Node when something keeps the
//! installed interception from serving ([`crate::health::Blocker`]); rare (once per transition),
//! so published directly.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use podid_broker::{BrokerError, SourceKind};
use tokio::sync::mpsc;

/// `reportingController` of nmi's events.
pub const EVENT_CONTROLLER: &str = "aadpodidentity.k8s.io/nmi";

/// Default: at most one event per pod and reason per minute.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);

/// Default queue length between requests and the publisher.
pub const DEFAULT_QUEUE: usize = 256;

/// Most pod × reason pairs remembered by the rate limit; beyond it new pairs are dropped until
/// old ones age out.
const MAX_REMEMBERED: usize = 16_384;

/// Longest note sent (the API server limits notes to 1 KiB).
const MAX_NOTE: usize = 1024;

/// Why a pod's token request failed, as far as the pod's owner can fix it. Each is the
/// `reason` of a `Warning` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PodEventReason {
    /// The pod carries an `aadpodidbinding` label but no identity applies to it (no binding
    /// with that selector, the binding names a missing AzureIdentity, or no assignment exists).
    NoIdentityMatched,
    /// The pod asked for a `client_id` / `msi_res_id` that is not one of its identities.
    IdentityNotBound,
    /// An identity is bound but its assignment did not become `Assigned` in the time nmi waits.
    AssignmentTimeout,
    /// The identity's credential cannot be used (Secret missing, keys missing or invalid,
    /// unsupported type, RBAC for the federated exchange).
    CredentialInvalid,
    /// Entra refused the identity's client secret or certificate.
    TokenRequestRefused,
    /// The federated exchange was refused (no federated credential, bad subject, …).
    FederatedTokenFailed,
}

impl PodEventReason {
    /// Every reason, for documentation tests.
    pub const ALL: [Self; 6] = [
        Self::NoIdentityMatched,
        Self::IdentityNotBound,
        Self::AssignmentTimeout,
        Self::CredentialInvalid,
        Self::TokenRequestRefused,
        Self::FederatedTokenFailed,
    ];

    /// The event's `reason` (PascalCase).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoIdentityMatched => "NoIdentityMatched",
            Self::IdentityNotBound => "IdentityNotBound",
            Self::AssignmentTimeout => "IdentityAssignmentTimeout",
            Self::CredentialInvalid => "IdentityCredentialInvalid",
            Self::TokenRequestRefused => "IdentityTokenRefused",
            Self::FederatedTokenFailed => "FederatedTokenFailed",
        }
    }

    /// The reason for a broker failure, if its owner can fix it: configuration errors and
    /// refusals by Entra. IMDS refusals (the identity is not on the VM: MIC's job) and
    /// transport failures are not the pod owner's to fix.
    pub fn for_broker_error(error: &BrokerError) -> Option<Self> {
        match error {
            BrokerError::Config { .. } => Some(Self::CredentialInvalid),
            BrokerError::Refused { source_kind, .. } => match source_kind {
                SourceKind::Federated => Some(Self::FederatedTokenFailed),
                SourceKind::ClientSecret | SourceKind::Certificate => {
                    Some(Self::TokenRequestRefused)
                }
                SourceKind::Imds => None,
            },
            BrokerError::Unavailable { .. } => None,
        }
    }
}

/// One event to publish on a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEvent {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The pod's uid, when known (lets `kubectl describe pod` find the event).
    pub uid: Option<String>,
    /// Why.
    pub reason: PodEventReason,
    /// Human-readable detail (no secrets), cut to 1 KiB.
    pub note: String,
}

/// The request side: rate limit and bounded queue. Share it as `Arc<EventSink>`.
#[derive(Debug)]
pub struct EventSink {
    queue: mpsc::Sender<PodEvent>,
    interval: Duration,
    last: Mutex<HashMap<(String, String, PodEventReason), Instant>>,
    dropped: AtomicU64,
    limited: AtomicU64,
}

impl EventSink {
    /// A sink allowing one event per pod × reason per `interval`, with a queue of `capacity`;
    /// the receiver goes to [`publish`].
    pub fn new(capacity: usize, interval: Duration) -> (Self, mpsc::Receiver<PodEvent>) {
        let (queue, receiver) = mpsc::channel(capacity.max(1));
        let sink = Self {
            queue,
            interval,
            last: Mutex::new(HashMap::new()),
            dropped: AtomicU64::new(0),
            limited: AtomicU64::new(0),
        };
        (sink, receiver)
    }

    /// Queue `event` unless one with the same pod and reason was queued less than the interval
    /// ago or the queue is full. Never waits. Returns whether it was queued.
    pub fn report(&self, event: PodEvent) -> bool {
        self.report_at(event, Instant::now())
    }

    /// [`EventSink::report`] at `now` (tests).
    pub fn report_at(&self, mut event: PodEvent, now: Instant) -> bool {
        let key = (event.namespace.clone(), event.pod.clone(), event.reason);
        {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(at) = last.get(&key)
                && now.saturating_duration_since(*at) < self.interval
            {
                self.limited.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            if last.len() >= MAX_REMEMBERED && !last.contains_key(&key) {
                let interval = self.interval;
                last.retain(|_, at| now.saturating_duration_since(*at) < interval);
                if last.len() >= MAX_REMEMBERED {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
            }
            last.insert(key, now);
        }
        truncate(&mut event.note);
        match self.queue.try_send(event) {
            Ok(()) => true,
            Err(_) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Events dropped because the queue (or the rate limit's memory) was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Reports suppressed by the per pod × reason rate limit.
    pub fn rate_limited(&self) -> u64 {
        self.limited.load(Ordering::Relaxed)
    }
}

fn truncate(note: &mut String) {
    if note.len() > MAX_NOTE {
        let mut end = MAX_NOTE - '…'.len_utf8();
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push('…');
    }
}

/// The reference to the pod an event is about.
pub fn pod_reference(event: &PodEvent) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".to_owned()),
        kind: Some("Pod".to_owned()),
        name: Some(event.pod.clone()),
        namespace: Some(event.namespace.clone()),
        uid: event.uid.clone().filter(|u| !u.is_empty()),
        ..ObjectReference::default()
    }
}

/// The `reason` of the Warning event on the Node for each [`Blocker`](crate::health::Blocker).
pub fn node_event_reason(blocker: crate::health::Blocker) -> &'static str {
    match blocker {
        crate::health::Blocker::RouteLocalnet => "RouteLocalnetUnavailable",
        crate::health::Blocker::ImdsListener => "ImdsPortUnavailable",
    }
}

/// The reference to a Node (cluster-scoped, so the event lands in `default`; no uid, so
/// `kubectl describe node` finds it as it finds the kubelet's).
pub fn node_reference(node: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".to_owned()),
        kind: Some("Node".to_owned()),
        name: Some(node.to_owned()),
        ..ObjectReference::default()
    }
}

/// Publish a `Warning` event with `reason` and `note` (no secrets; cut to 1 KiB) on the Node
/// `node`, reported by nmi on that node (action `Intercept`). A failure is logged and dropped.
pub async fn publish_node_event(
    client: kube::Client,
    node: String,
    reason: &str,
    mut note: String,
) {
    truncate(&mut note);
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: EVENT_CONTROLLER.to_owned(),
            instance: Some(node.clone()),
        },
    );
    let published = recorder
        .publish(
            &Event {
                type_: EventType::Warning,
                reason: reason.to_owned(),
                note: Some(note),
                action: "Intercept".to_owned(),
                secondary: None,
            },
            &node_reference(&node),
        )
        .await;
    match published {
        Ok(()) => tracing::info!(%node, reason, "published node event"),
        Err(error) => tracing::warn!(%node, reason, %error, "failed to publish node event"),
    }
}

/// Publish queued events through `client` until the sink is dropped. `instance` is the
/// `reportingInstance` (nmi's node name). A failed publish is logged at debug and dropped.
pub async fn publish(client: kube::Client, instance: String, mut events: mpsc::Receiver<PodEvent>) {
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: EVENT_CONTROLLER.to_owned(),
            instance: Some(instance),
        },
    );
    while let Some(event) = events.recv().await {
        let reference = pod_reference(&event);
        let published = recorder
            .publish(
                &Event {
                    type_: EventType::Warning,
                    reason: event.reason.as_str().to_owned(),
                    note: Some(event.note.clone()),
                    action: "GetToken".to_owned(),
                    secondary: None,
                },
                &reference,
            )
            .await;
        match published {
            Ok(()) => tracing::debug!(
                namespace = %event.namespace,
                pod = %event.pod,
                reason = event.reason.as_str(),
                "published event"
            ),
            Err(error) => tracing::debug!(
                namespace = %event.namespace,
                pod = %event.pod,
                reason = event.reason.as_str(),
                %error,
                "failed to publish event"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(pod: &str, reason: PodEventReason) -> PodEvent {
        PodEvent {
            namespace: "ns".into(),
            pod: pod.into(),
            uid: Some(format!("uid-{pod}")),
            reason,
            note: "n".into(),
        }
    }

    #[tokio::test]
    async fn one_event_per_pod_and_reason_per_interval() {
        let (sink, mut rx) = EventSink::new(16, Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(sink.report_at(event("a", PodEventReason::NoIdentityMatched), t0));
        for i in 1..100 {
            let at = t0 + Duration::from_millis(i * 100);
            assert!(!sink.report_at(event("a", PodEventReason::NoIdentityMatched), at));
        }
        assert_eq!(sink.rate_limited(), 99);
        // Another reason or another pod is its own budget.
        assert!(sink.report_at(event("a", PodEventReason::AssignmentTimeout), t0));
        assert!(sink.report_at(event("b", PodEventReason::NoIdentityMatched), t0));
        // After the interval, again one.
        let later = t0 + Duration::from_secs(61);
        assert!(sink.report_at(event("a", PodEventReason::NoIdentityMatched), later));
        let mut got = Vec::new();
        while let Ok(e) = rx.try_recv() {
            got.push((e.pod, e.reason));
        }
        assert_eq!(
            got,
            vec![
                ("a".to_owned(), PodEventReason::NoIdentityMatched),
                ("a".to_owned(), PodEventReason::AssignmentTimeout),
                ("b".to_owned(), PodEventReason::NoIdentityMatched),
                ("a".to_owned(), PodEventReason::NoIdentityMatched),
            ]
        );
    }

    #[tokio::test]
    async fn a_full_queue_drops_instead_of_waiting() {
        let (sink, mut rx) = EventSink::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        let queued = (0..10)
            .filter(|i| {
                sink.report_at(
                    event(&format!("p{i}"), PodEventReason::IdentityNotBound),
                    t0,
                )
            })
            .count();
        assert_eq!(queued, 2);
        assert_eq!(sink.dropped(), 8);
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn notes_are_cut_to_one_kib_on_a_char_boundary() {
        let (sink, mut rx) = EventSink::new(1, Duration::from_secs(60));
        let mut e = event("a", PodEventReason::CredentialInvalid);
        e.note = "é".repeat(1000);
        assert!(sink.report(e));
        let note = rx.try_recv().expect("queued").note;
        assert!(note.len() <= MAX_NOTE, "{}", note.len());
        assert!(note.ends_with('…'));
    }

    #[test]
    fn broker_errors_the_owner_can_fix_have_a_reason() {
        let refused = |source_kind| BrokerError::Refused {
            source_kind,
            client_id: "c".into(),
            status: 400,
            error: "invalid_client".into(),
            description: "d".into(),
        };
        assert_eq!(
            PodEventReason::for_broker_error(&refused(SourceKind::ClientSecret)),
            Some(PodEventReason::TokenRequestRefused)
        );
        assert_eq!(
            PodEventReason::for_broker_error(&refused(SourceKind::Certificate)),
            Some(PodEventReason::TokenRequestRefused)
        );
        assert_eq!(
            PodEventReason::for_broker_error(&refused(SourceKind::Federated)),
            Some(PodEventReason::FederatedTokenFailed)
        );
        assert_eq!(
            PodEventReason::for_broker_error(&refused(SourceKind::Imds)),
            None
        );
        let config = BrokerError::Config {
            client_id: "c".into(),
            reason: "Secret ns/s has no certificate key".into(),
        };
        assert_eq!(
            PodEventReason::for_broker_error(&config),
            Some(PodEventReason::CredentialInvalid)
        );
        let unavailable = BrokerError::Unavailable {
            source_kind: SourceKind::ClientSecret,
            client_id: "c".into(),
            reason: "timeout".into(),
            retry_after: None,
        };
        assert_eq!(PodEventReason::for_broker_error(&unavailable), None);
    }

    #[test]
    fn the_reference_names_the_pod() {
        let reference = pod_reference(&event("web", PodEventReason::NoIdentityMatched));
        assert_eq!(reference.kind.as_deref(), Some("Pod"));
        assert_eq!(reference.api_version.as_deref(), Some("v1"));
        assert_eq!(reference.name.as_deref(), Some("web"));
        assert_eq!(reference.namespace.as_deref(), Some("ns"));
        assert_eq!(reference.uid.as_deref(), Some("uid-web"));
    }
}
