//! Identity matching fed with objects built by small builders (docs/upstream.md, exceptions and
//! identity selection, docs/compatibility.md).
#![allow(clippy::unwrap_used)]

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use podid_api::{
    AssignedIdentityState, AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding,
    AzurePodIdentityException, OperationMode,
};
use podid_imds::{IdentitySelector, ImdsError};
use podid_select::matching::{
    CallerPod, Decision, MatchIndex, MatchOptions, NoMatch, NodeIdentity, PendingReason,
};

const NODE: &str = "node-a";

fn rid(name: &str) -> String {
    format!(
        "/subscriptions/S/resourcegroups/RG/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
    )
}

fn identity(ns: &str, name: &str, client_id: &str) -> AzureIdentity {
    AzureIdentity::user_assigned(ns, name, &rid(name), client_id)
}

fn pod(ns: &str, name: &str, label: Option<&str>) -> CallerPod {
    let mut labels = BTreeMap::new();
    if let Some(label) = label {
        labels.insert("aadpodidbinding".to_owned(), label.to_owned());
    }
    CallerPod {
        namespace: ns.to_owned(),
        name: name.to_owned(),
        service_account: "default".to_owned(),
        labels,
        annotations: BTreeMap::new(),
    }
}

fn assigned(
    pod: &CallerPod,
    identity: &AzureIdentity,
    binding: &AzureIdentityBinding,
    state: AssignedIdentityState,
) -> AzureAssignedIdentity {
    let mut a = AzureAssignedIdentity::for_pod(
        "default",
        &pod.name,
        &pod.namespace,
        NODE,
        identity.clone(),
        binding.clone(),
    );
    a.status.as_mut().unwrap().status = Some(state);
    a
}

#[derive(Default)]
struct World {
    options: MatchOptions,
    identities: Vec<AzureIdentity>,
    bindings: Vec<AzureIdentityBinding>,
    assignments: Vec<AzureAssignedIdentity>,
    exceptions: Vec<AzurePodIdentityException>,
}

impl World {
    fn index(&self) -> MatchIndex {
        MatchIndex::new(
            self.options,
            self.identities.iter().cloned().map(Arc::new),
            self.bindings.iter().cloned().map(Arc::new),
            self.assignments.iter().cloned().map(Arc::new),
            self.exceptions.iter().cloned().map(Arc::new),
        )
    }

    /// identity + binding (selector = label) + assignment in `state` for `pod`.
    fn bind(
        &mut self,
        pod: &CallerPod,
        id: AzureIdentity,
        label: &str,
        state: Option<AssignedIdentityState>,
    ) {
        let ns = id.metadata.namespace.clone().unwrap();
        let name = id.metadata.name.clone().unwrap();
        let binding = AzureIdentityBinding::for_selector(&ns, &format!("{name}-b"), &name, label);
        if let Some(state) = state {
            self.assignments.push(assigned(pod, &id, &binding, state));
        }
        self.identities.push(id);
        self.bindings.push(binding);
    }
}

fn client(id: &str) -> IdentitySelector<'_> {
    IdentitySelector::ClientId(Cow::Borrowed(id))
}

fn chosen_client_id(decision: &Decision) -> &str {
    match decision {
        Decision::Identity(identity) => identity.spec.client_id.as_deref().unwrap(),
        other => panic!("expected an identity, got {other:?}"),
    }
}

#[test]
fn assigned_identity_is_returned_and_client_id_ignores_case() {
    let p = pod("app", "web-1", Some("kv"));
    let mut w = World::default();
    w.bind(
        &p,
        identity("app", "kv-id", "aaaaaaaa-0000-0000-0000-00000000000a"),
        "kv",
        Some(AssignedIdentityState::Assigned),
    );
    let index = w.index();
    let d = index.decide(&p, &IdentitySelector::None);
    assert_eq!(chosen_client_id(&d), "aaaaaaaa-0000-0000-0000-00000000000a");
    let d = index.decide(&p, &client("AAAAAAAA-0000-0000-0000-00000000000A"));
    assert_eq!(chosen_client_id(&d), "aaaaaaaa-0000-0000-0000-00000000000a");
    let upper = rid("kv-id").replace("resourcegroups", "resourceGroups");
    let d = index.decide(&p, &IdentitySelector::ResourceId(Cow::Owned(upper)));
    assert_eq!(chosen_client_id(&d), "aaaaaaaa-0000-0000-0000-00000000000a");
}

#[test]
fn legacy_empty_state_is_usable_unassigned_is_not() {
    let p = pod("app", "web-1", Some("kv"));
    let mut w = World::default();
    w.bind(
        &p,
        identity("app", "legacy", "c-legacy"),
        "kv",
        Some(AssignedIdentityState::Other(String::new())),
    );
    let d = w.index().decide(&p, &IdentitySelector::None);
    assert_eq!(chosen_client_id(&d), "c-legacy");

    let mut w = World::default();
    w.bind(
        &p,
        identity("app", "gone", "c-gone"),
        "kv",
        Some(AssignedIdentityState::Unassigned),
    );
    // Unassigned is not usable; the binding still selects the pod, so MIC will recreate it.
    assert_eq!(
        w.index().decide(&p, &IdentitySelector::None),
        Decision::Pending(PendingReason::AwaitingAssignment)
    );
}

#[test]
fn wrong_client_id_never_returns_another_identity() {
    let p = pod("app", "web-1", Some("kv"));
    let mut w = World::default();
    w.bind(
        &p,
        identity("app", "kv-id", "c-1"),
        "kv",
        Some(AssignedIdentityState::Assigned),
    );
    let index = w.index();
    let d = index.decide(&p, &client("c-2"));
    assert_eq!(
        d,
        Decision::NoMatch(NoMatch::IdentityNotFound {
            client_id: Some("c-2".to_owned())
        })
    );
    let err = match d {
        Decision::NoMatch(n) => n.to_imds_error(&p),
        _ => unreachable!(),
    };
    // A final refusal: the real IMDS's 400 for an identity the VM lacks.
    assert!(err.is_final_refusal());
    assert_eq!(err.status(Default::default()).as_u16(), 400);
    let d = index.decide(&p, &IdentitySelector::ResourceId(Cow::Borrowed("/x")));
    assert_eq!(
        d,
        Decision::NoMatch(NoMatch::IdentityNotFound { client_id: None })
    );
}

#[test]
fn object_id_is_refused_not_mapped_to_first_identity() {
    let p = pod("app", "web-1", Some("kv"));
    let mut w = World::default();
    w.bind(
        &p,
        identity("app", "kv-id", "c-1"),
        "kv",
        Some(AssignedIdentityState::Assigned),
    );
    let d = w
        .index()
        .decide(&p, &IdentitySelector::ObjectId(Cow::Borrowed("c-1")));
    let Decision::NoMatch(no) = d else {
        panic!("object_id must not select: {d:?}")
    };
    assert!(matches!(
        no.to_imds_error(&p),
        ImdsError::UnsupportedIdentitySelector {
            parameter: "object_id"
        }
    ));
    assert_eq!(
        no.to_imds_error(&p).status(Default::default()).as_u16(),
        400
    );
}

#[test]
fn unbound_pod_is_no_match_at_once() {
    let p = pod("app", "web-1", None);
    let index = World::default().index();
    assert_eq!(
        index.decide(&p, &IdentitySelector::None),
        Decision::NoMatch(NoMatch::NoIdentityForPod)
    );
    let labelled = pod("app", "web-1", Some("nothing-binds-this"));
    assert_eq!(
        index.decide(&labelled, &client("c")),
        Decision::NoMatch(NoMatch::NoIdentityForPod)
    );
}

#[test]
fn created_is_pending_and_binding_without_assignment_is_awaiting() {
    let p = pod("app", "web-1", Some("kv"));
    let mut w = World::default();
    w.bind(
        &p,
        identity("app", "kv-id", "c-1"),
        "kv",
        Some(AssignedIdentityState::Created),
    );
    assert_eq!(
        w.index().decide(&p, &client("c-1")),
        Decision::Pending(PendingReason::AssignmentCreated)
    );
    // Asking for an identity that is not bound is a no at once, even while another is Created.
    assert_eq!(
        w.index().decide(&p, &client("other")),
        Decision::NoMatch(NoMatch::IdentityNotFound {
            client_id: Some("other".to_owned())
        })
    );

    let mut w = World::default();
    w.bind(&p, identity("app", "kv-id", "c-1"), "kv", None);
    assert_eq!(
        w.index().decide(&p, &IdentitySelector::None),
        Decision::Pending(PendingReason::AwaitingAssignment)
    );
}

#[test]
fn no_selector_picks_deterministically_and_prefers_usable() {
    let p = pod("app", "web-1", Some("kv"));
    let mut w = World::default();
    w.bind(
        &p,
        identity("app", "zeta", "c-z"),
        "kv",
        Some(AssignedIdentityState::Assigned),
    );
    w.bind(
        &p,
        identity("app", "alpha", "c-a"),
        "kv",
        Some(AssignedIdentityState::Assigned),
    );
    w.bind(
        &p,
        identity("app", "aaa", "c-aaa"),
        "kv",
        Some(AssignedIdentityState::Created),
    );
    let d = w.index().decide(&p, &IdentitySelector::None);
    assert_eq!(chosen_client_id(&d), "c-a");
    // Reversed input order, same answer.
    w.assignments.reverse();
    let d = w.index().decide(&p, &IdentitySelector::None);
    assert_eq!(chosen_client_id(&d), "c-a");
}

#[test]
fn namespaced_identity_requires_same_namespace() {
    let p = pod("app", "web-1", Some("kv"));
    let mut w = World::default();
    // Identity and binding in another namespace, annotated namespaced.
    w.bind(
        &p,
        identity("other", "kv-id", "c-1").namespaced(),
        "kv",
        Some(AssignedIdentityState::Assigned),
    );
    assert_eq!(
        w.index().decide(&p, &IdentitySelector::None),
        Decision::NoMatch(NoMatch::NoIdentityForPod)
    );
    // Without the annotation the cross-namespace binding works (upstream default).
    let mut w = World::default();
    w.bind(
        &p,
        identity("other", "kv-id", "c-1"),
        "kv",
        Some(AssignedIdentityState::Assigned),
    );
    assert_eq!(
        chosen_client_id(&w.index().decide(&p, &IdentitySelector::None)),
        "c-1"
    );
    // ... unless force_namespaced is on.
    w.options.force_namespaced = true;
    assert_eq!(
        w.index().decide(&p, &IdentitySelector::None),
        Decision::NoMatch(NoMatch::NoIdentityForPod)
    );
    // Same namespace under force_namespaced is fine.
    let mut w = World {
        options: MatchOptions {
            force_namespaced: true,
            ..Default::default()
        },
        ..Default::default()
    };
    w.bind(
        &p,
        identity("app", "kv-id", "c-1"),
        "kv",
        Some(AssignedIdentityState::Assigned),
    );
    assert_eq!(
        chosen_client_id(&w.index().decide(&p, &IdentitySelector::None)),
        "c-1"
    );
}

#[test]
fn assignment_for_a_changed_label_is_not_used() {
    let p = pod("app", "web-1", Some("kv"));
    let mut w = World::default();
    w.bind(
        &p,
        identity("app", "kv-id", "c-1"),
        "kv",
        Some(AssignedIdentityState::Assigned),
    );
    let relabelled = pod("app", "web-1", Some("other"));
    assert_eq!(
        w.index().decide(&relabelled, &IdentitySelector::None),
        Decision::NoMatch(NoMatch::NoIdentityForPod)
    );
    // Another pod with the same label does not get web-1's assignment.
    let other = pod("app", "web-2", Some("kv"));
    assert_eq!(
        w.index().decide(&other, &IdentitySelector::None),
        Decision::Pending(PendingReason::AwaitingAssignment)
    );
}

#[test]
fn exception_any_single_label_case_insensitive_and_honours_selectors() {
    let mut p = pod("kube-system", "addon", None);
    p.labels.insert("app".into(), "MIC".into());
    p.labels.insert("component".into(), "other".into());
    let mut w = World::default();
    w.exceptions.push(AzurePodIdentityException::for_pod_labels(
        "kube-system",
        "ex",
        [
            ("app".to_owned(), "mic".to_owned()),
            ("component".to_owned(), "mic".to_owned()),
        ],
    ));
    let index = w.index();
    assert!(index.is_excepted(&p));
    assert_eq!(
        index.decide(&p, &IdentitySelector::None),
        Decision::Exception(NodeIdentity::SystemAssigned)
    );
    assert_eq!(
        index.decide(&p, &client("c-9")),
        Decision::Exception(NodeIdentity::ClientId("c-9".into()))
    );
    assert_eq!(
        index.decide(&p, &IdentitySelector::ResourceId(Cow::Borrowed("/r"))),
        Decision::Exception(NodeIdentity::ResourceId("/r".into()))
    );
    // Exceptions only count in the pod's own namespace.
    let mut elsewhere = p.clone();
    elsewhere.namespace = "app".into();
    assert!(!index.is_excepted(&elsewhere));
    assert_eq!(
        index.decide(&elsewhere, &IdentitySelector::None),
        Decision::NoMatch(NoMatch::NoIdentityForPod)
    );
    // A pod whose labels match no pair is not excepted.
    let mut plain = p.clone();
    plain.labels.clear();
    assert!(!index.is_excepted(&plain));
}

#[test]
fn managed_mode_uses_bindings_in_the_pod_namespace() {
    let p = pod("app", "web-1", Some("kv"));
    let mut w = World {
        options: MatchOptions {
            mode: OperationMode::Managed,
            force_namespaced: true,
        },
        ..Default::default()
    };
    w.bind(&p, identity("app", "b-id", "c-b"), "kv", None);
    w.bind(&p, identity("app", "a-id", "c-a"), "kv", None);
    w.bind(&p, identity("other", "x-id", "c-x"), "kv", None);
    let index = w.index();
    assert_eq!(
        chosen_client_id(&index.decide(&p, &IdentitySelector::None)),
        "c-a"
    );
    assert_eq!(chosen_client_id(&index.decide(&p, &client("C-B"))), "c-b");
    assert_eq!(
        index.decide(&p, &client("c-x")),
        Decision::NoMatch(NoMatch::IdentityNotFound {
            client_id: Some("c-x".into())
        })
    );
    assert_eq!(index.pod_bindings(&p).len(), 2);
    assert_eq!(
        index.decide(&pod("app", "web-1", None), &IdentitySelector::None),
        Decision::NoMatch(NoMatch::NoIdentityForPod)
    );
}

#[test]
fn pod_bindings_follow_upstream_desired_set_rules() {
    let p = pod("app", "web-1", Some("kv"));
    let mut w = World::default();
    w.bind(&p, identity("z-ns", "id1", "c-1"), "kv", None);
    w.bind(&p, identity("a-ns", "id2", "c-2"), "kv", None);
    w.bind(&p, identity("app", "id3", "c-3").namespaced(), "kv", None);
    w.bind(&p, identity("b-ns", "id4", "c-4").namespaced(), "kv", None);
    // A binding whose identity does not exist is skipped.
    w.bindings.push(AzureIdentityBinding::for_selector(
        "app", "dangling", "missing", "kv",
    ));
    let index = w.index();
    let got: Vec<_> = index
        .pod_bindings(&p)
        .iter()
        .map(|(b, i)| {
            (
                b.metadata.namespace.clone().unwrap(),
                i.spec.client_id.clone().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("a-ns".to_owned(), "c-2".to_owned()),
            ("app".to_owned(), "c-3".to_owned()),
            ("z-ns".to_owned(), "c-1".to_owned()),
        ]
    );
}
