//! The Kubernetes events mic publishes: upstream's reasons and notes, on the binding, the
//! AzureIdentity or the assignment; notes cut to what the API server accepts.

use std::collections::{BTreeMap, BTreeSet};

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};
use podid_api::{AzureAssignedIdentity, AzureIdentity};
use tracing::debug;

use super::{bounded, name_of, namespace_of};
use crate::assigner::AssignError;
use crate::desired::ArmTarget;

/// Upstream's Warning `status update error` on an assignment whose `Assigned` patch failed.
/// `recovered`: ARM failed for other ids of the VM/VMSS (upstream's error-recovery path,
/// whose message differs slightly).
pub(super) async fn status_error_event(
    events: &Recorder,
    object: &AzureAssignedIdentity,
    error: &kube::Error,
    recovered: bool,
) {
    let spec = &object.spec;
    let pod = spec.pod.as_deref().unwrap_or_default();
    let pod_namespace = spec.pod_namespace.as_deref().unwrap_or_default();
    let for_pod = if recovered {
        format!("{pod_namespace}/{pod}")
    } else {
        pod.to_owned()
    };
    let note = format!(
        "failed to update AzureAssignedIdentity {}/{} status to Assigned for pod {for_pod}, error: {error}",
        namespace_of(object),
        name_of(object),
    );
    publish_on_assigned(events, object, "status update error", note).await;
}

/// Upstream's Warning `binding apply error` on the binding for a create or update that failed.
pub(super) async fn write_error_event(
    events: &Recorder,
    object: &AzureAssignedIdentity,
    create: bool,
    error: &kube::Error,
) {
    let spec = &object.spec;
    let name = name_of(object);
    let note = if create {
        format!(
            "failed to create AzureAssignedIdentity {name}/{} for pod {}/{}, error: {error}",
            namespace_of(object),
            spec.pod_namespace.as_deref().unwrap_or_default(),
            spec.pod.as_deref().unwrap_or_default(),
        )
    } else {
        format!(
            "failed to update AzureAssignedIdentity {}/{name} for pod {}/{}, error: {error}",
            namespace_of(object),
            spec.pod.as_deref().unwrap_or_default(),
            spec.pod_namespace.as_deref().unwrap_or_default(),
        )
    };
    publish(
        events,
        object,
        EventType::Warning,
        "binding apply error",
        note,
    )
    .await;
}

/// Upstream's Warning `binding apply error` on the binding of an assignment whose identity
/// ARM did not put on its VM/VMSS.
pub(super) async fn apply_error_event(
    events: &Recorder,
    object: &AzureAssignedIdentity,
    error: &AssignError,
) {
    let spec = &object.spec;
    let note = format!(
        "failed to apply binding {} node {} for pod {}/{}, error: {error}",
        binding_key(object),
        spec.node_name.as_deref().unwrap_or_default(),
        spec.pod_namespace.as_deref().unwrap_or_default(),
        spec.pod.as_deref().unwrap_or_default(),
    );
    publish(
        events,
        object,
        EventType::Warning,
        "binding apply error",
        note,
    )
    .await;
}

/// Upstream's Warning `status update error` on an assignment whose `Unassigned` patch failed
/// (before its deletion).
pub(super) async fn unassign_error_event(
    events: &Recorder,
    object: &AzureAssignedIdentity,
    error: &kube::Error,
) {
    let note = format!(
        "failed to update AzureAssignedIdentity {}/{} status to Unassigned for pod {}/{}, error: {error}",
        namespace_of(object),
        name_of(object),
        object.spec.pod_namespace.as_deref().unwrap_or_default(),
        object.spec.pod.as_deref().unwrap_or_default(),
    );
    publish_on_assigned(events, object, "status update error", note).await;
}

/// Pods named in an aggregated `binding applied` note; the rest are counted.
pub(super) const APPLIED_PODS_NAMED: usize = 5;

/// The Normal `binding applied` events of the assignments that turned `Assigned` in one pass
/// or job, each with its VM/VMSS (`None`: no ARM work): **one per identity and VM/VMSS**
/// instead of upstream's one per assignment, on the AzureIdentity. The note names the
/// bindings, the VM/VMSS, how many pods and the first [`APPLIED_PODS_NAMED`] of them
/// (`<podNamespace>/<pod>`, sorted): `Binding kv-binding applied on vmss pool0 for 12 pods:
/// team/a, team/b, team/c, team/d, team/e and 7 more`. `recovered`: other identities of the
/// VM/VMSS failed (lower-case `binding`, as upstream's recovery path).
pub(super) async fn applied_events(
    events: &Recorder,
    applied: &[(Option<&ArmTarget>, &AzureAssignedIdentity)],
    recovered: bool,
    batch: usize,
) {
    type Group<'a> = (&'a AzureIdentity, BTreeSet<&'a str>, BTreeSet<String>);
    let mut groups: BTreeMap<(Option<&ArmTarget>, &str, &str), Group<'_>> = BTreeMap::new();
    for &(target, object) in applied {
        let Some(identity) = object.spec.azure_identity_ref.as_deref() else {
            continue;
        };
        let key = (
            target,
            identity.metadata.namespace.as_deref().unwrap_or_default(),
            identity.metadata.name.as_deref().unwrap_or_default(),
        );
        let group = groups
            .entry(key)
            .or_insert_with(|| (identity, BTreeSet::new(), BTreeSet::new()));
        if let Some(binding) = object
            .spec
            .azure_binding_ref
            .as_deref()
            .and_then(|b| b.metadata.name.as_deref())
        {
            group.1.insert(binding);
        }
        group.2.insert(format!(
            "{}/{}",
            object.spec.pod_namespace.as_deref().unwrap_or_default(),
            object.spec.pod.as_deref().unwrap_or_default()
        ));
    }
    let publishing: Vec<BoxFuture<'_, ()>> = groups
        .into_iter()
        .map(|((target, _, _), (identity, bindings, pods))| {
            let note = applied_note(target, &bindings, &pods, recovered);
            Box::pin(publish_on_identity(
                events,
                identity,
                "binding applied",
                note,
            )) as BoxFuture<'_, ()>
        })
        .collect();
    bounded(publishing, batch).await;
}

/// The note of an aggregated `binding applied` event (see [`applied_events`]).
pub(super) fn applied_note(
    target: Option<&ArmTarget>,
    bindings: &BTreeSet<&str>,
    pods: &BTreeSet<String>,
    recovered: bool,
) -> String {
    let word = match (recovered, bindings.len() > 1) {
        (false, false) => "Binding",
        (false, true) => "Bindings",
        (true, false) => "binding",
        (true, true) => "bindings",
    };
    let on = target.map(|t| format!(" on {t}")).unwrap_or_default();
    let count = pods.len();
    let mut list = pods
        .iter()
        .take(APPLIED_PODS_NAMED)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    let more = count.saturating_sub(APPLIED_PODS_NAMED);
    if more > 0 {
        list.push_str(&format!(" and {more} more"));
    }
    let pods_word = if count == 1 { "pod" } else { "pods" };
    format!(
        "{word} {} applied{on} for {count} {pods_word}: {list}",
        bindings.iter().copied().collect::<Vec<_>>().join(", ")
    )
}

/// Upstream's events for an assignment deleted because its node is gone.
pub(super) async fn removal_event(
    events: &Recorder,
    object: &AzureAssignedIdentity,
    error: Option<&kube::Error>,
) {
    let spec = &object.spec;
    let binding = spec.azure_binding_ref.as_deref();
    let binding_name = binding
        .and_then(|b| b.metadata.name.as_deref())
        .unwrap_or_default();
    let node = spec.node_name.as_deref().unwrap_or_default();
    let pod = spec.pod.as_deref().unwrap_or_default();
    match error {
        None => {
            let note = format!("Binding {binding_name} removed from node {node} for pod {pod}");
            publish(events, object, EventType::Normal, "binding removed", note).await;
        }
        Some(e) => {
            let note = format!(
                "failed to remove AzureIdentityBinding {} from node {node} for pod {}/{pod}, error: {e}",
                binding_key(object),
                spec.pod_namespace.as_deref().unwrap_or_default(),
            );
            publish(
                events,
                object,
                EventType::Warning,
                "binding remove error",
                note,
            )
            .await;
        }
    }
}

/// Source component of MIC's events, as upstream.
pub(super) const EVENT_SOURCE: &str = "aadpodidentity.k8s.io";

pub(super) fn binding_key(object: &AzureAssignedIdentity) -> String {
    let binding = object.spec.azure_binding_ref.as_deref();
    format!(
        "{}/{}",
        binding
            .and_then(|b| b.metadata.namespace.as_deref())
            .unwrap_or_default(),
        binding
            .and_then(|b| b.metadata.name.as_deref())
            .unwrap_or_default()
    )
}

/// The longest event note the API server accepts, in bytes (events.k8s.io/v1 refuses longer
/// notes with 422, and the event would be lost).
pub(super) const MAX_NOTE: usize = 1024;

/// `note` cut to at most [`MAX_NOTE`] bytes at a character boundary, ending in `…` when cut.
/// Notes carry ARM error messages, whose length mic does not control.
pub(super) fn cut_note(mut note: String) -> String {
    if note.len() > MAX_NOTE {
        let mut end = MAX_NOTE - '…'.len_utf8();
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push('…');
    }
    note
}

/// A reference to one of podid's custom resources (kind `kind` of `podid_api::API_VERSION`)
/// as an event's involved object.
fn involved(
    kind: &str,
    metadata: &kube::api::ObjectMeta,
    namespace: Option<String>,
    resource_version: Option<String>,
) -> ObjectReference {
    ObjectReference {
        api_version: Some(podid_api::API_VERSION.to_owned()),
        kind: Some(kind.to_owned()),
        name: metadata.name.clone(),
        namespace,
        uid: metadata.uid.clone(),
        resource_version,
        field_path: None,
    }
}

/// Publishes one event (note cut to the API's limit) on `reference`; failures are logged,
/// never fatal.
async fn publish_event(
    events: &Recorder,
    reference: &ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(cut_note(note)),
        action: "Assign".to_owned(),
        secondary: None,
    };
    if let Err(e) = events.publish(&event, reference).await {
        debug!(error = %e, reason, "failed to publish event");
    }
}

/// Publishes an event on the binding behind `object` (upstream's involved object).
pub(super) async fn publish(
    events: &Recorder,
    object: &AzureAssignedIdentity,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let Some(binding) = object.spec.azure_binding_ref.as_deref() else {
        return;
    };
    let reference = involved(
        "AzureIdentityBinding",
        &binding.metadata,
        binding.metadata.namespace.clone(),
        binding.metadata.resource_version.clone(),
    );
    publish_event(events, &reference, type_, reason, note).await;
}

/// Publishes a Normal event on an AzureIdentity (from the copy embedded in an assignment).
pub(super) async fn publish_on_identity(
    events: &Recorder,
    identity: &AzureIdentity,
    reason: &str,
    note: String,
) {
    let reference = involved(
        "AzureIdentity",
        &identity.metadata,
        identity.metadata.namespace.clone(),
        identity.metadata.resource_version.clone(),
    );
    publish_event(events, &reference, EventType::Normal, reason, note).await;
}

/// Publishes a Warning event on the AzureAssignedIdentity itself (upstream's `status update
/// error`).
pub(super) async fn publish_on_assigned(
    events: &Recorder,
    object: &AzureAssignedIdentity,
    reason: &str,
    note: String,
) {
    let reference = involved(
        "AzureAssignedIdentity",
        &object.metadata,
        Some(namespace_of(object).to_owned()),
        None,
    );
    publish_event(events, &reference, EventType::Warning, reason, note).await;
}

#[cfg(test)]
mod note_tests {
    use super::{MAX_NOTE, cut_note};

    #[test]
    fn long_notes_are_cut_at_a_char_boundary_to_the_api_limit() {
        // Multi-byte characters straddle the limit: a byte cut would split one and panic.
        for (c, n) in [("é", 600), ("a", 2000), ("€", 400), ("x", MAX_NOTE)] {
            let note = cut_note(c.repeat(n));
            assert!(note.len() <= MAX_NOTE, "{c}: {}", note.len());
            if c.len() * n > MAX_NOTE {
                assert!(note.ends_with('…'), "{c}");
                assert!(note.len() > MAX_NOTE - 8, "{c}: cut too short");
            } else {
                assert_eq!(note, c.repeat(n));
            }
        }
        assert_eq!(cut_note("short".into()), "short");
    }
}
