//! Which token source a matched identity uses for the calling pod: the node's IMDS or the
//! Secret as usual, or the federated exchange of the migration bridge (docs/migration.md).
//!
//! The switch is `podid.io/token-source: federated` on the `AzureIdentity` or the
//! `AzureIdentityBinding` (the binding's value wins), applied by
//! [`federated_credential`]. In standard mode NMI reads both
//! annotations from the copies recorded in the pod's `AzureAssignedIdentity`, not from the live
//! objects: MIC rewrites the assignment when either object changes, and turns it back to
//! `Created` while it puts an identity that leaves the federated path back on the scale set, so
//! NMI switches paths only when the new path can serve (no request reaches IMDS for an identity
//! that is not on the node yet). In managed mode (no assignments) the live binding counts.
//!
//! No IO here: plain values in, plain values out.

use std::collections::HashMap;
use std::sync::Arc;

use crate::federated::{FederatedCredential, PodSubject, confine_federated, federated_credential};
use crate::matching::{CallerPod, MatchIndex};
use podid_api::{AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding};

/// One assignment's identity and its recorded binding copy.
#[derive(Debug)]
struct Recorded {
    identity_namespace: String,
    identity_name: String,
    binding: Option<Arc<AzureIdentityBinding>>,
}

/// The binding copies recorded in the node's `AzureAssignedIdentity` objects, by pod and
/// identity. Rebuilt with the matcher after every burst of watch events. Looked up per token
/// request with borrowed names (pod namespace → pod name → the pod's few assignments).
#[derive(Debug, Default)]
pub struct AssignedBindings {
    by_pod: HashMap<String, HashMap<String, Vec<Recorded>>>,
}

impl AssignedBindings {
    /// Index the binding copies of `assignments` (assignments without pod or identity are
    /// skipped).
    pub fn new<'a>(assignments: impl IntoIterator<Item = &'a AzureAssignedIdentity>) -> Self {
        let mut by_pod: HashMap<String, HashMap<String, Vec<Recorded>>> = HashMap::new();
        for assignment in assignments {
            let spec = &assignment.spec;
            let (Some(pod_namespace), Some(pod), Some(identity)) = (
                spec.pod_namespace.as_ref(),
                spec.pod.as_ref(),
                spec.azure_identity_ref.as_deref(),
            ) else {
                continue;
            };
            let recorded = Recorded {
                identity_namespace: identity.metadata.namespace.clone().unwrap_or_default(),
                identity_name: identity.metadata.name.clone().unwrap_or_default(),
                binding: spec
                    .azure_binding_ref
                    .as_deref()
                    .map(|b| Arc::new(b.clone())),
            };
            let list = by_pod
                .entry(pod_namespace.clone())
                .or_default()
                .entry(pod.clone())
                .or_default();
            // A later assignment of the same identity to the pod replaces the earlier one.
            match list.iter_mut().find(|r| {
                r.identity_namespace == recorded.identity_namespace
                    && r.identity_name == recorded.identity_name
            }) {
                Some(existing) => *existing = recorded,
                None => list.push(recorded),
            }
        }
        Self { by_pod }
    }

    /// `Some(binding copy)` when an assignment of `identity` to `pod` exists (the inner
    /// `None`: the assignment records no binding).
    pub fn binding(
        &self,
        pod: &CallerPod,
        identity: &AzureIdentity,
    ) -> Option<Option<&AzureIdentityBinding>> {
        let namespace = identity.metadata.namespace.as_deref().unwrap_or_default();
        let name = identity.metadata.name.as_deref().unwrap_or_default();
        self.by_pod
            .get(&pod.namespace)?
            .get(&pod.name)?
            .iter()
            .find(|r| r.identity_namespace == namespace && r.identity_name == name)
            .map(|r| r.binding.as_deref())
    }
}

/// The federated credential for `pod` (uid `pod_uid`) using `identity`, or `None` when the
/// identity keeps its usual source. The binding is the one recorded in the pod's assignment of
/// that identity, else the live binding through which `index` gives the pod the identity.
/// `Some(Err(reason))` when the annotations name a service account the pod may not use
/// ([`confine_federated`]: only the pod's own or one in the identity's namespace).
pub fn credential_for(
    index: &MatchIndex,
    assigned: &AssignedBindings,
    pod: &CallerPod,
    pod_uid: &str,
    identity: &AzureIdentity,
) -> Option<Result<FederatedCredential, String>> {
    let binding = match assigned.binding(pod, identity) {
        Some(recorded) => recorded,
        None => index
            .pod_binding_refs(pod)
            .find(|(_, candidate)| {
                candidate.metadata.namespace == identity.metadata.namespace
                    && candidate.metadata.name == identity.metadata.name
            })
            .map(|(binding, _)| &**binding),
    };
    let identity_namespace = identity.metadata.namespace.as_deref().unwrap_or("default");
    let subject = PodSubject {
        namespace: &pod.namespace,
        name: &pod.name,
        uid: pod_uid,
        service_account: &pod.service_account,
    };
    let credential = federated_credential(
        identity.metadata.annotations.as_ref(),
        identity_namespace,
        binding.and_then(|b| b.metadata.annotations.as_ref()),
        subject,
    )?;
    Some(confine_federated(credential, identity_namespace, subject))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::federated::{BoundPod, FederatedSubject};
    use crate::matching::MatchOptions;
    use podid_api::OperationMode;
    use podid_api::TOKEN_SOURCE_ANNOTATION;

    fn identity(annotation: Option<&str>) -> AzureIdentity {
        let mut identity = AzureIdentity::user_assigned(
            "app",
            "kv-id",
            "/subscriptions/S/resourcegroups/RG/providers/Microsoft.ManagedIdentity/userAssignedIdentities/kv-id",
            "client-a",
        );
        if let Some(value) = annotation {
            identity.metadata.annotations =
                Some([(TOKEN_SOURCE_ANNOTATION.to_owned(), value.to_owned())].into());
        }
        identity
    }

    fn binding(annotation: Option<&str>) -> AzureIdentityBinding {
        let mut binding = AzureIdentityBinding::for_selector("app", "kv-binding", "kv-id", "kv");
        if let Some(value) = annotation {
            binding.metadata.annotations =
                Some([(TOKEN_SOURCE_ANNOTATION.to_owned(), value.to_owned())].into());
        }
        binding
    }

    fn pod() -> CallerPod {
        CallerPod {
            namespace: "app".into(),
            name: "web".into(),
            service_account: "web-sa".into(),
            labels: [("aadpodidbinding".to_owned(), "kv".to_owned())].into(),
            annotations: Default::default(),
        }
    }

    fn assignment(
        identity: &AzureIdentity,
        binding: &AzureIdentityBinding,
    ) -> AzureAssignedIdentity {
        AzureAssignedIdentity::for_pod(
            "default",
            "web",
            "app",
            "node-a",
            identity.clone(),
            binding.clone(),
        )
    }

    #[test]
    fn recorded_copies_decide_in_standard_mode() {
        // The live objects say IMDS; the assignment's copies say federated: the copies win.
        let live_identity = Arc::new(identity(None));
        let live_binding = Arc::new(binding(None));
        let index = MatchIndex::new(
            MatchOptions::default(),
            [Arc::clone(&live_identity)],
            [Arc::clone(&live_binding)],
            [],
            [],
        );
        let recorded = assignment(&identity(Some("federated")), &binding(None));
        let assigned = AssignedBindings::new([&recorded]);
        let copy = recorded.spec.azure_identity_ref.as_deref().expect("copy");
        let credential = credential_for(&index, &assigned, &pod(), "uid-1", copy).transpose();
        assert_eq!(
            credential,
            Ok(Some(FederatedCredential {
                subject: FederatedSubject::new("app", "web-sa"),
                bound_pod: Some(BoundPod {
                    name: "web".into(),
                    uid: "uid-1".into()
                }),
            }))
        );
        // The recorded binding opts out: IMDS path although the identity is switched.
        let opted_out = assignment(&identity(Some("federated")), &binding(Some("default")));
        let assigned = AssignedBindings::new([&opted_out]);
        let copy = opted_out.spec.azure_identity_ref.as_deref().expect("copy");
        assert_eq!(
            credential_for(&index, &assigned, &pod(), "uid-1", copy),
            None
        );
    }

    #[test]
    fn live_binding_counts_without_an_assignment() {
        let live_identity = Arc::new(identity(None));
        let index = MatchIndex::new(
            MatchOptions {
                mode: OperationMode::Managed,
                force_namespaced: true,
            },
            [Arc::clone(&live_identity)],
            [Arc::new(binding(Some("Federated")))],
            [],
            [],
        );
        let assigned = AssignedBindings::default();
        assert!(matches!(
            credential_for(&index, &assigned, &pod(), "u", &live_identity),
            Some(Ok(FederatedCredential { .. }))
        ));
        let index = MatchIndex::new(
            MatchOptions {
                mode: OperationMode::Managed,
                force_namespaced: true,
            },
            [Arc::clone(&live_identity)],
            [Arc::new(binding(None))],
            [],
            [],
        );
        assert_eq!(
            credential_for(&index, &assigned, &pod(), "u", &live_identity),
            None
        );
    }
}
