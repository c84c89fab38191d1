//! The desired `AzureAssignedIdentity` set and its difference from what exists
//! (docs/upstream.md#sync-cycle, docs/upstream.md#assignment-lifecycle,
//! docs/upstream.md#sync-cycle), as a pure function of the watched objects: [`compute`].
//!
//! What it decides, per sync pass:
//! - which (pod, identity) pairs need an `AzureAssignedIdentity`: pods with a non-empty
//!   `aadpodidbinding` label and a node, every binding whose `selector` equals that label, the
//!   binding's identity in the binding's namespace, namespaced rules (`--forceNamespaced` or the
//!   identity's `Behavior: namespaced` annotation: identity, binding and pod share a namespace);
//! - the objects' names: upstream's `<pod>-<podNamespace>-<identity>`, except where that name
//!   is taken by another desired object (a clash upstream resolves by dropping the later one) or
//!   is longer than 253 characters (upstream fails to create it): then a hash suffix;
//! - the diff against existing objects, matched by content (pod, pod namespace, identity), not by
//!   name, so objects written by the Go MIC are adopted rather than duplicated;
//! - per VM or VM scale set: the user-assigned identity resource ids its nodes need, and the ids
//!   that may leave it (no desired assignment on ANY node of that VM/VMSS needs them, and their
//!   client id is not immutable);
//! - the state a new object is created in: `Created` (confirmed through the VM/VMSS, then
//!   `Assigned`: upstream's lifecycle) only for the first of each identity and VM/VMSS that no
//!   other assignment vouches for; `Assigned` for the others ([`TargetPlan::create_assigned`],
//!   written once the identity is there) and for those that need no ARM work. One write per
//!   assignment instead of a create and a status patch.
//!
//! Federated identities (the migration bridge, docs/migration.md): a (pod, identity) pair whose
//! binding — or, when the binding does not say, identity — carries `podid.io/token-source:
//! federated` still gets its `AzureAssignedIdentity` (NMI's standard mode serves only assigned
//! identities, and reads the switch from the copies recorded in it), but it needs no ARM work: it
//! turns `Assigned` at once, its resource id is not required on the VM/VMSS, and an assignment
//! that switches to federated releases the id from the VM/VMSS unless another pod there still
//! needs it on the IMDS path. One that switches back is rewritten as `Created` and confirmed on
//! the VM/VMSS before NMI serves it from IMDS again.
//!
//! Exceptions (`AzurePodIdentityException`) do not change MIC's work: an excepted pod's token
//! requests go straight to the node's IMDS, which can only serve identities that are on the
//! node, so its assignments are kept as upstream keeps them.
//!
//! Cost: indexes built once per pass (bindings by selector, identities by namespace and name,
//! existing objects by content and by name); work is linear in pods + bindings + identities +
//! existing objects + the size of the result.

use std::collections::{BTreeSet, HashSet};

use k8s_openapi::api::core::v1::{Node, Pod};
use podid_api::{
    AssignedIdentityState, AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding,
    NODE_NAME_LABEL,
};
use podid_select::federated::is_federated;
use sha2::{Digest, Sha256};

mod plan;
mod steps;
mod target;
mod warning;

pub use plan::{Deletion, Plan, Stats, TargetPlan, Update};
pub use target::{ArmTarget, is_valid_resource_id};
pub use warning::Warning;

use steps::{Matching, Outcomes, ResolvedBindings};

/// Longest object name the API server accepts (a DNS subdomain).
pub const MAX_NAME_LEN: usize = 253;

/// The watched objects one pass works on, by reference (build it from slices of objects with
/// [`Inputs::from_slices`], or from reflector stores by collecting references).
#[derive(Debug, Clone, Default)]
pub struct Inputs<'a> {
    /// All pods (any namespace, any phase; unlabelled ones are skipped).
    pub pods: Vec<&'a Pod>,
    /// All nodes (their `spec.providerID` says which VM or VM scale set they are).
    pub nodes: Vec<&'a Node>,
    /// All AzureIdentities.
    pub identities: Vec<&'a AzureIdentity>,
    /// All AzureIdentityBindings.
    pub bindings: Vec<&'a AzureIdentityBinding>,
    /// All existing AzureAssignedIdentities (any namespace, any writer).
    pub existing: Vec<&'a AzureAssignedIdentity>,
}

impl<'a> Inputs<'a> {
    /// Inputs over slices of owned objects.
    pub fn from_slices(
        pods: &'a [Pod],
        nodes: &'a [Node],
        identities: &'a [AzureIdentity],
        bindings: &'a [AzureIdentityBinding],
        existing: &'a [AzureAssignedIdentity],
    ) -> Self {
        Self {
            pods: pods.iter().collect(),
            nodes: nodes.iter().collect(),
            identities: identities.iter().collect(),
            bindings: bindings.iter().collect(),
            existing: existing.iter().collect(),
        }
    }
}

/// Switches of one pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// `--forceNamespaced` / `FORCENAMESPACED=true`.
    pub force_namespaced: bool,
    /// Drop the assignments of Succeeded and Failed pods (podid default; upstream keeps them
    /// until the pod is deleted).
    pub release_finished_pods: bool,
    /// Client ids never removed from a VM/VMSS, lower-cased (`--immutable-user-msis` plus the
    /// cluster identity).
    pub immutable_client_ids: BTreeSet<String>,
}

/// What identifies an assignment regardless of its name.
type ContentKey<'a> = (&'a str, &'a str, &'a str, &'a str);

struct Candidate<'a> {
    pod_namespace: &'a str,
    pod: &'a str,
    node: &'a str,
    binding: &'a AzureIdentityBinding,
    identity: &'a AzureIdentity,
    namespace: String,
    upstream_name: String,
}

impl<'a> Candidate<'a> {
    fn key(&self) -> ContentKey<'a> {
        (
            self.pod_namespace,
            self.pod,
            meta_str(self.identity.metadata.namespace.as_deref()),
            meta_str(self.identity.metadata.name.as_deref()),
        )
    }

    /// Tokens by federated exchange: no ARM work.
    fn federated(&self) -> bool {
        is_federated(
            self.identity.metadata.annotations.as_ref(),
            self.binding.metadata.annotations.as_ref(),
        )
    }

    fn build(&self, name: &str) -> AzureAssignedIdentity {
        let mut object = AzureAssignedIdentity::for_pod(
            &self.namespace,
            self.pod,
            self.pod_namespace,
            self.node,
            self.identity.clone(),
            self.binding.clone(),
        );
        object.metadata.name = Some(name.to_owned());
        object
    }
}

fn meta_str(s: Option<&str>) -> &str {
    s.unwrap_or_default()
}

fn existing_key(object: &AzureAssignedIdentity) -> Option<ContentKey<'_>> {
    let spec = &object.spec;
    let identity = spec.azure_identity_ref.as_deref()?;
    Some((
        spec.pod_namespace.as_deref().filter(|s| !s.is_empty())?,
        spec.pod.as_deref().filter(|s| !s.is_empty())?,
        meta_str(identity.metadata.namespace.as_deref()),
        identity
            .metadata
            .name
            .as_deref()
            .filter(|s| !s.is_empty())?,
    ))
}

/// Whether the copies recorded in an existing assignment put it on the federated path.
fn existing_federated(object: &AzureAssignedIdentity) -> bool {
    let spec = &object.spec;
    is_federated(
        spec.azure_identity_ref
            .as_deref()
            .and_then(|i| i.metadata.annotations.as_ref()),
        spec.azure_binding_ref
            .as_deref()
            .and_then(|b| b.metadata.annotations.as_ref()),
    )
}

fn is_terminating(object: &AzureAssignedIdentity) -> bool {
    object.metadata.deletion_timestamp.is_some()
}

fn lower_resource_id(identity: &AzureIdentity) -> Option<String> {
    identity
        .spec
        .resource_id
        .as_deref()
        .filter(|id| !id.is_empty())
        .map(str::to_ascii_lowercase)
}

fn is_type0(identity: Option<&AzureIdentity>) -> bool {
    identity.is_some_and(|i| i.identity_type().is_user_assigned_msi())
}

/// A name for `upstream` that is ≤ 253 characters and differs from every name in `taken`:
/// upstream's name cut to fit, then `-` and a hash of the assignment's content.
fn hashed_name(upstream: &str, key: ContentKey<'_>, taken: &HashSet<String>) -> String {
    let mut hasher = Sha256::new();
    for part in [key.0, key.1, key.2, key.3] {
        hasher.update(part.as_bytes());
        hasher.update([0u8]);
    }
    let hex: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut fallback = String::new();
    for len in [10, 16, 32, 64] {
        let suffix = &hex[..len];
        let keep = MAX_NAME_LEN - len - 1;
        let mut cut = upstream.len().min(keep);
        while !upstream.is_char_boundary(cut) {
            cut -= 1;
        }
        let prefix = upstream[..cut].trim_end_matches(['-', '.']);
        let name = if prefix.is_empty() {
            suffix.to_owned()
        } else {
            format!("{prefix}-{suffix}")
        };
        if !taken.contains(&name) {
            return name;
        }
        fallback = name;
    }
    // 256 bits of hash collide only for the same content, which is deduplicated before.
    fallback
}

/// One pass: the desired set, its diff against `inputs.existing`, and the per-VM/VMSS work.
pub fn compute<'a>(inputs: &Inputs<'a>, options: &Options) -> Plan<'a> {
    let mut plan = Plan::default();

    // What the cluster holds: the nodes' VMs/VMSSs, the usable identities, the bindings
    // resolved to them.
    let node_targets = steps::node_targets(&inputs.nodes, &mut plan.warnings);
    let identities = steps::usable_identities(&inputs.identities, &mut plan.warnings);
    plan.stats.identities = identities.len();
    plan.stats.bindings = inputs.bindings.len();
    let bindings = ResolvedBindings::resolve(&inputs.bindings, &identities, options);

    // What is desired: a candidate per pod and identity its bindings give it.
    let pods = steps::pods_to_match(&inputs.pods, options);
    plan.stats.pods = pods.len();
    let candidates = steps::candidates(&pods, &bindings, options, &mut plan.warnings);
    plan.stats.desired = candidates.len();

    // Against what exists: adopted by content, else by name; the others named.
    let mut matching = Matching::new(&inputs.existing, candidates.len());
    matching.adopt_same_content(&candidates);
    matching.name_the_rest(&candidates, &mut plan.warnings);

    // The writes and each VM/VMSS's work.
    let Outcomes {
        reassigned,
        to_federated,
        anchored,
        fresh,
    } = steps::outcomes(&candidates, &mut matching, &node_targets, &mut plan);
    steps::create_fresh(fresh, anchored, &mut plan);
    steps::removals(
        reassigned,
        to_federated,
        &matching,
        &node_targets,
        options,
        &mut plan,
    );
    plan
}

/// Sets the state of an object about to be created.
fn set_state(object: &mut AzureAssignedIdentity, state: AssignedIdentityState) {
    object.status.get_or_insert_default().status = Some(state);
}

/// `None`: the existing object is what is desired. `Some(reassign)`: it must be rewritten;
/// `reassign` when the identity must be confirmed on the VM/VMSS again (other node, other
/// identity resource or type, or a state other than `Assigned`/legacy).
fn classify(existing: &AzureAssignedIdentity, candidate: &Candidate<'_>) -> Option<bool> {
    let spec = &existing.spec;
    let same_node = spec.node_name.as_deref() == Some(candidate.node)
        && existing
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(NODE_NAME_LABEL))
            .map(String::as_str)
            == Some(candidate.node);
    let same_binding = spec.azure_binding_ref.as_deref().is_some_and(|b| {
        b.metadata.namespace == candidate.binding.metadata.namespace
            && b.metadata.name == candidate.binding.metadata.name
            && b.metadata.resource_version == candidate.binding.metadata.resource_version
    });
    let old_identity = spec.azure_identity_ref.as_deref();
    let same_identity = old_identity.is_some_and(|i| {
        i.metadata.resource_version == candidate.identity.metadata.resource_version
    });
    let same_content = existing_key(existing) == Some(candidate.key());
    // Leaving the federated path: the id must be on the VM/VMSS again before NMI uses IMDS.
    let leaves_federation = existing_federated(existing) && !candidate.federated();
    let state_ok = existing.state().is_assigned_or_legacy();
    let state_created = existing.state() == AssignedIdentityState::Created;
    if same_content && same_node && same_binding && same_identity && (state_ok || state_created) {
        return None;
    }
    let same_resource = old_identity.is_some_and(|i| {
        i.identity_type() == candidate.identity.identity_type()
            && lower_resource_id(i) == lower_resource_id(candidate.identity)
    });
    Some(!(same_content && same_node && same_resource && state_ok && !leaves_federation))
}

fn update_of<'a>(
    existing: &'a AzureAssignedIdentity,
    candidate: &Candidate<'_>,
    name: &str,
    reassign: bool,
) -> Update<'a> {
    let mut desired = candidate.build(name);
    let mut metadata = existing.metadata.clone();
    metadata.labels = desired.metadata.labels.take();
    let finalizers = metadata.finalizers.get_or_insert_with(Vec::new);
    if !finalizers
        .iter()
        .any(|f| f == podid_api::ASSIGNED_IDENTITY_FINALIZER)
    {
        finalizers.push(podid_api::ASSIGNED_IDENTITY_FINALIZER.to_owned());
    }
    desired.metadata = metadata;
    if !reassign {
        desired.status = existing.status.clone();
    }
    Update {
        existing,
        desired,
        reassign,
    }
}
