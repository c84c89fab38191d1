//! Identity matching: which identity a pod may use, decided from plain values
//! (docs/upstream.md#exceptions, docs/upstream.md#identity-selection, docs/upstream.md#sync-cycle;
//! docs/ARCHITECTURE.md, docs/compatibility.md).
//!
//! [`MatchIndex`] is built once from snapshots of the four custom resources (as the watches
//! deliver them, `Arc`ed) and then answers per request without scanning: bindings are indexed
//! by `selector`, identities by namespace/name, assignments by pod namespace/name, exceptions by
//! namespace. It has no IO, no async and no clock; NMI rebuilds and swaps it when an object
//! changes, and MIC uses [`MatchIndex::pod_bindings`] for its desired set.
//!
//! # Decisions ([`MatchIndex::decide`])
//! 1. **Exception** — an `AzurePodIdentityException` in the pod's namespace has ANY one
//!    `podLabels` pair present on the pod with a value equal ignoring ASCII case. The token then
//!    comes from the node's own identity ([`NodeIdentity`]), honouring `client_id` and
//!    `msi_res_id`.
//! 2. **Standard mode** — the pod's `AzureAssignedIdentity` objects (`spec.pod`,
//!    `spec.podNamespace`) carry the identity copy NMI mints from. Usable states are `Assigned`
//!    and the legacy empty state; `Created` means the assignment is in progress
//!    ([`Decision::Pending`]).
//! 3. **Managed mode** — identities in the pod's namespace referenced by bindings in the pod's
//!    namespace whose `selector` equals the pod's `aadpodidbinding` label.
//!
//! # Differences from upstream (listed in docs/compatibility.md)
//! * `client_id` and resource ids are compared ignoring ASCII case in every step (upstream's
//!   final step was case-sensitive, so an upper-cased GUID got a 404 after 80 s).
//! * `object_id`/`principal_id` select nothing: no `AzureIdentity` records the principal's
//!   object id, so podid cannot match it honestly and answers
//!   [`NoMatch::UnsupportedSelector`] (400) instead of upstream's "first identity".
//! * Without a selector the first usable identity in a deterministic order (identity namespace,
//!   identity name, client id) is chosen; upstream used informer iteration order.
//! * A pod without any identity gets [`NoMatch`] at once (upstream polled for 80–100 s); the
//!   caller waits only on [`Decision::Pending`]: an assignment for this pod is `Created`, or a
//!   binding applies to the pod but MIC has not written its assignment yet.
//! * Standard mode also drops an assignment whose recorded binding no longer selects the pod
//!   (the pod's label changed) or, for namespaced identities, whose binding or identity lives in
//!   another namespace than the pod — upstream only checked the identity's namespace.
//! * A namespaced filter that empties the candidates is a [`NoMatch`] (404), not a panic (500).
//! * The exception path honours `msi_res_id` (upstream ignored it and returned the
//!   system-assigned token); there is no name-based "MIC pod" bypass.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use podid_api::{
    AssignedIdentityState, AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding,
    AzurePodIdentityException, OperationMode, POD_LABEL_KEY,
};
use podid_imds::{IdentitySelector, ImdsError};

/// Options of the matcher.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MatchOptions {
    /// Operation mode.
    pub mode: OperationMode,
    /// `--forceNamespaced` / `FORCENAMESPACED=true`: identity, binding and pod must share a
    /// namespace for every identity (the `Behavior: namespaced` annotation does it for one).
    pub force_namespaced: bool,
}

/// What the matcher needs to know about the calling pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallerPod {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `spec.serviceAccountName` (for audit records; empty when unknown).
    pub service_account: String,
    /// `metadata.labels` (including `aadpodidbinding`).
    pub labels: BTreeMap<String, String>,
    /// `metadata.annotations`.
    pub annotations: BTreeMap<String, String>,
}

impl CallerPod {
    /// The calling pod as nmi sees `pod`: its namespace, name, `spec.serviceAccountName` (empty
    /// when unset: [`crate::workload::service_account_name`] reads it as `default`), labels and
    /// annotations.
    pub fn of(pod: &Pod) -> Self {
        Self {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            service_account: pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_default(),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            annotations: pod.metadata.annotations.clone().unwrap_or_default(),
        }
    }

    /// The value of the pod's `aadpodidbinding` label, if set and non-empty.
    pub fn binding_label(&self) -> Option<&str> {
        binding_label(&self.labels)
    }
}

/// The value of `aadpodidbinding` in a pod's `labels`, if set and non-empty: what bindings'
/// selectors are compared with.
pub fn binding_label(labels: &BTreeMap<String, String>) -> Option<&str> {
    labels
        .get(POD_LABEL_KEY)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// A binding's `spec.selector`, if non-empty (a binding without one selects no pod).
pub fn binding_selector(binding: &AzureIdentityBinding) -> Option<&str> {
    binding.spec.selector.as_deref().filter(|s| !s.is_empty())
}

/// The namespace rule: whether a binding gives `identity` (`None`: not known yet) only to pods
/// of the binding's own namespace — in managed mode, with `--forceNamespaced`, or when the
/// identity carries `aadpodidentity.k8s.io/Behavior: namespaced`. The identity itself is always
/// looked up in the binding's namespace. nmi's [`MatchIndex`] and mic's desired state both apply
/// it.
pub fn confined_to_binding_namespace(
    options: MatchOptions,
    identity: Option<&AzureIdentity>,
) -> bool {
    options.mode == OperationMode::Managed
        || options.force_namespaced
        || identity.is_some_and(AzureIdentity::is_namespaced)
}

/// The node identity an excepted pod gets a token for (the node's IMDS is asked directly).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeIdentity {
    /// No selector: the VM's system-assigned identity.
    SystemAssigned,
    /// `client_id`: a user-assigned identity on the VM, by client id.
    ClientId(String),
    /// `msi_res_id`: a user-assigned identity on the VM, by ARM resource id.
    ResourceId(String),
}

/// Why the caller may wait before getting an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingReason {
    /// An `AzureAssignedIdentity` for this pod and the requested identity is `Created`: MIC is
    /// assigning it to the node.
    AssignmentCreated,
    /// A binding selects the pod (standard mode) but MIC has not written the assignment yet.
    AwaitingAssignment,
}

/// Why no identity is handed out (answered at once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoMatch {
    /// No identity applies to the pod at all (no label, no binding, no assignment, or all
    /// filtered by the namespaced rules).
    NoIdentityForPod,
    /// The pod has identities, but none is the one requested.
    IdentityNotFound {
        /// The requested client id (unredacted; redact before showing). `None` when the caller
        /// selected by resource id.
        client_id: Option<String>,
    },
    /// The request selects by a parameter podid cannot match (`object_id`).
    UnsupportedSelector {
        /// The query parameter.
        parameter: &'static str,
    },
}

impl NoMatch {
    /// The IMDS error to answer with for `pod`.
    pub fn to_imds_error(&self, pod: &CallerPod) -> ImdsError {
        match self {
            Self::NoIdentityForPod => ImdsError::NoIdentityForPod {
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
            },
            Self::IdentityNotFound { client_id } => {
                ImdsError::identity_not_found(client_id.as_deref())
            }
            Self::UnsupportedSelector { parameter } => {
                ImdsError::UnsupportedIdentitySelector { parameter }
            }
        }
    }
}

/// The matcher's answer for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The pod is excepted: get a token for this node identity without identity checks.
    Exception(NodeIdentity),
    /// Use this identity (in standard mode the copy recorded in the assignment).
    Identity(Arc<AzureIdentity>),
    /// Nothing usable yet, but an assignment is in progress: the caller may wait (bounded) and
    /// ask again.
    Pending(PendingReason),
    /// No identity: answer at once.
    NoMatch(NoMatch),
}

/// One usable or pending candidate of a pod (managed mode builds a list of them).
#[derive(Debug, Clone)]
struct Candidate {
    identity: Arc<AzureIdentity>,
    state: CandidateState,
}

/// One assignment of a pod with its identity copy shared once at build time, so a request
/// hands out an `Arc` instead of cloning the recorded identity.
#[derive(Debug)]
struct Assigned {
    assignment: Arc<AzureAssignedIdentity>,
    /// `spec.azureIdentityRef`, `None` when the assignment records none (never a candidate).
    identity: Option<Arc<AzureIdentity>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CandidateState {
    Usable,
    Created,
}

/// namespace → name → value: looked up with two `&str` without building an owned key.
type ByNsName<V> = HashMap<String, HashMap<String, V>>;

fn get_ns_name<'a, V>(map: &'a ByNsName<V>, namespace: &str, name: &str) -> Option<&'a V> {
    map.get(namespace)?.get(name)
}

/// Indexes over snapshots of the four custom resources; see the module docs.
#[derive(Debug, Default)]
pub struct MatchIndex {
    options: MatchOptions,
    /// selector → bindings with that selector, sorted by (namespace, name).
    bindings_by_selector: HashMap<String, Vec<Arc<AzureIdentityBinding>>>,
    /// namespace → name → identity.
    identities: ByNsName<Arc<AzureIdentity>>,
    /// pod namespace → pod name → the pod's assignments (identity copy, binding copy, state),
    /// sorted by their identity copy in [`identity_order`] (without a copy: last).
    assignments: ByNsName<Vec<Assigned>>,
    /// namespace → exceptions of that namespace.
    exceptions: HashMap<String, Vec<Arc<AzurePodIdentityException>>>,
}

/// `(namespace, name)` of an object's metadata.
macro_rules! ns_name {
    ($object:expr) => {
        (
            $object.metadata.namespace.clone().unwrap_or_default(),
            $object.metadata.name.clone().unwrap_or_default(),
        )
    };
}

fn eq_ci(a: Option<&str>, b: &str) -> bool {
    a.is_some_and(|a| a.eq_ignore_ascii_case(b))
}

fn identity_order(a: &AzureIdentity, b: &AzureIdentity) -> std::cmp::Ordering {
    (&a.metadata.namespace, &a.metadata.name, &a.spec.client_id).cmp(&(
        &b.metadata.namespace,
        &b.metadata.name,
        &b.spec.client_id,
    ))
}

impl MatchIndex {
    /// Build the indexes. Each argument is every object of one kind the watch currently holds
    /// (for NMI in standard mode: the node's assignments; bindings and identities may be empty).
    pub fn new(
        options: MatchOptions,
        identities: impl IntoIterator<Item = Arc<AzureIdentity>>,
        bindings: impl IntoIterator<Item = Arc<AzureIdentityBinding>>,
        assignments: impl IntoIterator<Item = Arc<AzureAssignedIdentity>>,
        exceptions: impl IntoIterator<Item = Arc<AzurePodIdentityException>>,
    ) -> Self {
        let mut bindings_by_selector: HashMap<String, Vec<Arc<AzureIdentityBinding>>> =
            HashMap::new();
        for binding in bindings {
            if let Some(selector) = binding_selector(&binding).map(str::to_owned) {
                bindings_by_selector
                    .entry(selector)
                    .or_default()
                    .push(binding);
            }
        }
        for list in bindings_by_selector.values_mut() {
            list.sort_by(|a, b| ns_name!(a).cmp(&ns_name!(b)));
        }
        let mut by_ns_name: ByNsName<Arc<AzureIdentity>> = HashMap::new();
        for identity in identities {
            let (namespace, name) = ns_name!(identity);
            by_ns_name
                .entry(namespace)
                .or_default()
                .insert(name, identity);
        }
        let mut by_pod: ByNsName<Vec<Assigned>> = HashMap::new();
        for assignment in assignments {
            let (Some(pod), Some(namespace)) = (
                assignment.spec.pod.clone(),
                assignment.spec.pod_namespace.clone(),
            ) else {
                continue;
            };
            let identity = assignment
                .spec
                .azure_identity_ref
                .as_deref()
                .map(|identity| Arc::new(identity.clone()));
            by_pod
                .entry(namespace)
                .or_default()
                .entry(pod)
                .or_default()
                .push(Assigned {
                    assignment,
                    identity,
                });
        }
        // Stable: equal identities keep the watch's order, as sorting per request did.
        for list in by_pod.values_mut().flat_map(HashMap::values_mut) {
            list.sort_by(|a, b| match (&a.identity, &b.identity) {
                (Some(a), Some(b)) => identity_order(a, b),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            });
        }
        let mut by_namespace: HashMap<String, Vec<Arc<AzurePodIdentityException>>> = HashMap::new();
        for exception in exceptions {
            let namespace = exception.metadata.namespace.clone().unwrap_or_default();
            by_namespace.entry(namespace).or_default().push(exception);
        }
        Self {
            options,
            bindings_by_selector,
            identities: by_ns_name,
            assignments: by_pod,
            exceptions: by_namespace,
        }
    }

    /// Every identity object the index knows: the `AzureIdentity` objects and the copies
    /// recorded in assignments (for cache revocation when one disappears).
    pub fn identity_objects(&self) -> impl Iterator<Item = &AzureIdentity> {
        self.identities
            .values()
            .flat_map(HashMap::values)
            .map(|i| &**i)
            .chain(
                self.assignments
                    .values()
                    .flat_map(HashMap::values)
                    .flatten()
                    .filter_map(|a| a.identity.as_deref()),
            )
    }

    /// The options the index was built with.
    pub fn options(&self) -> MatchOptions {
        self.options
    }

    fn namespaced(&self, identity: &AzureIdentity) -> bool {
        confined_to_binding_namespace(self.options, Some(identity))
    }

    /// Whether an exception in the pod's namespace excepts it (any single label pair, value
    /// equal ignoring case).
    pub fn is_excepted(&self, pod: &CallerPod) -> bool {
        self.exceptions
            .get(&pod.namespace)
            .is_some_and(|list| list.iter().any(|e| e.excepts(&pod.labels)))
    }

    /// Every (binding, identity) pair that applies to `pod` by its `aadpodidbinding` label, in
    /// (binding namespace, binding name) order: bindings whose `selector` equals the label,
    /// identity `<binding namespace>/<spec.azureIdentity>`, and for namespaced identities (or
    /// with `force_namespaced`) identity, binding and pod in one namespace. In managed mode only
    /// bindings of the pod's namespace count. Missing identities are skipped.
    pub fn pod_bindings(
        &self,
        pod: &CallerPod,
    ) -> Vec<(Arc<AzureIdentityBinding>, Arc<AzureIdentity>)> {
        self.pod_binding_refs(pod)
            .map(|(binding, identity)| (Arc::clone(binding), Arc::clone(identity)))
            .collect()
    }

    /// [`MatchIndex::pod_bindings`] borrowed, without collecting (for the token path).
    pub fn pod_binding_refs<'a>(
        &'a self,
        pod: &'a CallerPod,
    ) -> impl Iterator<Item = (&'a Arc<AzureIdentityBinding>, &'a Arc<AzureIdentity>)> + 'a {
        let bindings = pod
            .binding_label()
            .and_then(|label| self.bindings_by_selector.get(label))
            .map_or(&[][..], Vec::as_slice);
        // Confined whatever the identity says (managed mode, --forceNamespaced): checked before
        // the identity is looked up.
        let always_confined = confined_to_binding_namespace(self.options, None);
        bindings.iter().filter_map(move |binding| {
            let binding_ns = binding.metadata.namespace.as_deref().unwrap_or_default();
            if always_confined && binding_ns != pod.namespace {
                return None;
            }
            let name = binding.spec.azure_identity.as_deref()?;
            let identity = get_ns_name(&self.identities, binding_ns, name)?;
            if self.namespaced(identity) && binding_ns != pod.namespace {
                return None;
            }
            Some((binding, identity))
        })
    }

    /// Standard mode: the pod's assignments that pass the label and namespace rules, in
    /// [`identity_order`] (the index keeps them sorted; nothing is allocated).
    fn assigned_candidates<'a>(
        &'a self,
        pod: &'a CallerPod,
    ) -> impl Iterator<Item = (&'a Arc<AzureIdentity>, CandidateState)> + 'a {
        let assignments = get_ns_name(&self.assignments, &pod.namespace, &pod.name)
            .map_or(&[][..], Vec::as_slice);
        let label = pod.binding_label();
        assignments.iter().filter_map(move |assigned| {
            let assignment = &assigned.assignment;
            let state = match assignment.state() {
                AssignedIdentityState::Created => CandidateState::Created,
                s if s.is_assigned_or_legacy() => CandidateState::Usable,
                _ => return None,
            };
            let identity = assigned.identity.as_ref()?;
            if let Some(binding) = assignment.spec.azure_binding_ref.as_deref() {
                if binding.spec.selector.as_deref() != label || label.is_none() {
                    return None;
                }
                if self.namespaced(identity)
                    && binding.metadata.namespace.as_deref() != Some(pod.namespace.as_str())
                {
                    return None;
                }
            }
            if self.namespaced(identity)
                && identity.metadata.namespace.as_deref() != Some(pod.namespace.as_str())
            {
                return None;
            }
            Some((identity, state))
        })
    }

    fn managed_candidates(&self, pod: &CallerPod) -> Vec<Candidate> {
        let mut out: Vec<Candidate> = self
            .pod_bindings(pod)
            .into_iter()
            .map(|(_, identity)| Candidate {
                identity,
                state: CandidateState::Usable,
            })
            .collect();
        out.sort_by(|a, b| identity_order(&a.identity, &b.identity));
        out.dedup_by(|a, b| Arc::ptr_eq(&a.identity, &b.identity));
        out
    }

    /// Decide what `pod` gets for a request selecting `selector`. See the module docs.
    pub fn decide(&self, pod: &CallerPod, selector: &IdentitySelector<'_>) -> Decision {
        if self.is_excepted(pod) {
            return match selector {
                IdentitySelector::None => Decision::Exception(NodeIdentity::SystemAssigned),
                IdentitySelector::ClientId(id) => {
                    Decision::Exception(NodeIdentity::ClientId(id.to_string()))
                }
                IdentitySelector::ResourceId(id) => {
                    Decision::Exception(NodeIdentity::ResourceId(id.to_string()))
                }
                IdentitySelector::ObjectId(_) => Decision::NoMatch(NoMatch::UnsupportedSelector {
                    parameter: "object_id",
                }),
            };
        }
        let matches = |identity: &AzureIdentity| match selector {
            IdentitySelector::None => true,
            IdentitySelector::ClientId(id) => eq_ci(identity.spec.client_id.as_deref(), id),
            IdentitySelector::ResourceId(id) => eq_ci(identity.spec.resource_id.as_deref(), id),
            IdentitySelector::ObjectId(_) => false,
        };
        if let IdentitySelector::ObjectId(_) = selector {
            return Decision::NoMatch(NoMatch::UnsupportedSelector {
                parameter: "object_id",
            });
        }
        match self.options.mode {
            OperationMode::Standard => {
                self.decide_among(pod, selector, matches, || self.assigned_candidates(pod))
            }
            OperationMode::Managed => {
                let managed = self.managed_candidates(pod);
                self.decide_among(pod, selector, matches, || {
                    managed.iter().map(|c| (&c.identity, c.state))
                })
            }
        }
    }

    /// The decision among `candidates` (in [`identity_order`]; called again only on the paths
    /// that answer without a token).
    fn decide_among<'a, I>(
        &self,
        pod: &CallerPod,
        selector: &IdentitySelector<'_>,
        matches: impl Fn(&AzureIdentity) -> bool,
        candidates: impl Fn() -> I,
    ) -> Decision
    where
        I: Iterator<Item = (&'a Arc<AzureIdentity>, CandidateState)>,
    {
        let mut created = false;
        let mut any = false;
        for (identity, state) in candidates() {
            any = true;
            if !matches(identity) {
                continue;
            }
            match state {
                CandidateState::Usable => return Decision::Identity(Arc::clone(identity)),
                CandidateState::Created => created = true,
            }
        }
        if created {
            return Decision::Pending(PendingReason::AssignmentCreated);
        }
        if self.options.mode == OperationMode::Standard {
            // A binding selects the pod for a wanted identity that has no assignment at all yet:
            // MIC has not caught up with the pod.
            let awaiting = self.pod_binding_refs(pod).any(|(_, identity)| {
                matches(identity)
                    && !candidates().any(|(candidate, _)| same_identity(candidate, identity))
            });
            if awaiting {
                return Decision::Pending(PendingReason::AwaitingAssignment);
            }
        }
        if !any {
            return Decision::NoMatch(NoMatch::NoIdentityForPod);
        }
        Decision::NoMatch(match selector {
            IdentitySelector::ClientId(id) => NoMatch::IdentityNotFound {
                client_id: Some(id.to_string()),
            },
            _ => NoMatch::IdentityNotFound { client_id: None },
        })
    }
}

/// Whether two identity objects are the same object (namespace and name).
fn same_identity(a: &AzureIdentity, b: &AzureIdentity) -> bool {
    a.metadata.namespace == b.metadata.namespace && a.metadata.name == b.metadata.name
}
