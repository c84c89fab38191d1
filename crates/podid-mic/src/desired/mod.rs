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

use podid_api::OperationMode;
use std::collections::{BTreeSet, HashMap, HashSet};

use k8s_openapi::api::core::v1::{Node, Pod};
use podid_api::{
    AssignedIdentityState, AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding,
    NODE_NAME_LABEL, assigned_identity_name, assigned_identity_namespace,
};
use podid_select::federated::is_federated;
use podid_select::matching::{
    MatchOptions, binding_label, binding_selector, confined_to_binding_namespace,
};
use sha2::{Digest, Sha256};

mod plan;
mod target;
mod warning;

pub use plan::{Deletion, Plan, Stats, TargetPlan, Update};
pub use target::{ArmTarget, is_valid_resource_id};
pub use warning::Warning;

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

    // Nodes → VM/VMSS.
    let mut node_targets: HashMap<&str, ArmTarget> = HashMap::with_capacity(inputs.nodes.len());
    for &node in &inputs.nodes {
        let Some(name) = node.metadata.name.as_deref() else {
            continue;
        };
        let provider_id = node.spec.as_ref().and_then(|s| s.provider_id.as_deref());
        let (target, parsed) = ArmTarget::of_node(name, provider_id);
        if !parsed {
            plan.warnings.push(Warning::UnparsableProviderId {
                node: name.to_owned(),
                provider_id: provider_id.unwrap_or_default().to_owned(),
            });
        }
        node_targets.insert(name, target);
    }

    // Usable identities by (namespace, name).
    let mut identities: HashMap<(&str, &str), &AzureIdentity> =
        HashMap::with_capacity(inputs.identities.len());
    for &identity in &inputs.identities {
        let namespace = meta_str(identity.metadata.namespace.as_deref());
        let name = meta_str(identity.metadata.name.as_deref());
        if identity.identity_type().is_user_assigned_msi() {
            let resource_id = identity.spec.resource_id.as_deref().unwrap_or_default();
            if !is_valid_resource_id(resource_id) {
                plan.warnings.push(Warning::InvalidResourceId {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    resource_id: resource_id.to_owned(),
                });
                continue;
            }
        }
        identities.insert((namespace, name), identity);
    }
    plan.stats.identities = identities.len();
    plan.stats.bindings = inputs.bindings.len();

    // Bindings, in (namespace, name) order, resolved to their identity once, with nmi's
    // selection rules (podid_select::matching: selector, identity in the binding's namespace,
    // the namespace rule). Unconfined pairs apply to pods of any namespace (by selector);
    // confined ones only to pods of the binding's namespace (by namespace and selector). Missing
    // identities are remembered and reported when a pod hits them, as upstream does.
    let match_options = MatchOptions {
        mode: OperationMode::Standard,
        force_namespaced: options.force_namespaced,
    };
    let mut bindings: Vec<&AzureIdentityBinding> = inputs.bindings.clone();
    bindings.sort_by(|a, b| {
        (a.metadata.namespace.as_deref(), a.metadata.name.as_deref())
            .cmp(&(b.metadata.namespace.as_deref(), b.metadata.name.as_deref()))
    });
    type Pair<'a> = (&'a AzureIdentityBinding, Option<&'a AzureIdentity>);
    let mut global: HashMap<&str, Vec<Pair<'a>>> = HashMap::new();
    let mut local: HashMap<(&str, &str), Vec<Pair<'a>>> = HashMap::new();
    for binding in bindings {
        let Some(selector) = binding_selector(binding) else {
            continue;
        };
        let namespace = meta_str(binding.metadata.namespace.as_deref());
        let identity_name = binding.spec.azure_identity.as_deref().unwrap_or_default();
        let identity = identities.get(&(namespace, identity_name)).copied();
        if confined_to_binding_namespace(match_options, identity) {
            local
                .entry((namespace, selector))
                .or_default()
                .push((binding, identity));
        } else {
            global
                .entry(selector)
                .or_default()
                .push((binding, identity));
        }
    }

    // Candidates, pods in (namespace, name) order so "first" is stable.
    let mut pods: Vec<(&str, &str, &str, &str)> = Vec::new();
    for &pod in &inputs.pods {
        let Some(label) = pod.metadata.labels.as_ref().and_then(binding_label) else {
            continue;
        };
        let Some(node) = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .filter(|n| !n.is_empty())
        else {
            continue;
        };
        if options.release_finished_pods {
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            if matches!(phase, Some("Succeeded" | "Failed")) {
                continue;
            }
        }
        pods.push((
            meta_str(pod.metadata.namespace.as_deref()),
            meta_str(pod.metadata.name.as_deref()),
            node,
            label,
        ));
    }
    pods.sort_unstable();
    plan.stats.pods = pods.len();

    let mut candidates: Vec<Candidate<'a>> = Vec::new();
    let mut seen: HashMap<ContentKey<'a>, usize> = HashMap::new();
    let mut warned_missing: HashSet<(&str, &str)> = HashSet::new();
    let empty: Vec<Pair<'a>> = Vec::new();
    for &(pod_namespace, pod, node, label) in &pods {
        let g = global.get(label).unwrap_or(&empty);
        let l = local.get(&(pod_namespace, label)).unwrap_or(&empty);
        // Merge the two (namespace, name)-sorted lists.
        let (mut i, mut j) = (0, 0);
        while i < g.len() || j < l.len() {
            let take_global = match (g.get(i), l.get(j)) {
                (Some(a), Some(b)) => {
                    (
                        a.0.metadata.namespace.as_deref(),
                        a.0.metadata.name.as_deref(),
                    ) <= (
                        b.0.metadata.namespace.as_deref(),
                        b.0.metadata.name.as_deref(),
                    )
                }
                (Some(_), None) => true,
                _ => false,
            };
            let (binding, identity) = if take_global {
                i += 1;
                g[i - 1]
            } else {
                j += 1;
                l[j - 1]
            };
            let binding_namespace = meta_str(binding.metadata.namespace.as_deref());
            let binding_name = meta_str(binding.metadata.name.as_deref());
            let Some(identity) = identity else {
                if warned_missing.insert((binding_namespace, binding_name)) {
                    plan.warnings.push(Warning::IdentityNotFound {
                        identity: binding.spec.azure_identity.clone().unwrap_or_default(),
                        binding_namespace: binding_namespace.to_owned(),
                        binding: binding_name.to_owned(),
                    });
                }
                continue;
            };
            let identity_name = meta_str(identity.metadata.name.as_deref());
            let candidate = Candidate {
                pod_namespace,
                pod,
                node,
                binding,
                identity,
                namespace: assigned_identity_namespace(identity, options.force_namespaced),
                upstream_name: assigned_identity_name(pod, pod_namespace, identity_name),
            };
            let key = candidate.key();
            if let Some(&first) = seen.get(&key) {
                let kept: &Candidate<'_> = &candidates[first];
                plan.warnings.push(Warning::DuplicateBinding {
                    pod_namespace: pod_namespace.to_owned(),
                    pod: pod.to_owned(),
                    kept: format!(
                        "{}/{}",
                        meta_str(kept.binding.metadata.namespace.as_deref()),
                        meta_str(kept.binding.metadata.name.as_deref())
                    ),
                    ignored: format!("{binding_namespace}/{binding_name}"),
                });
                continue;
            }
            seen.insert(key, candidates.len());
            candidates.push(candidate);
        }
    }
    plan.stats.desired = candidates.len();

    // Existing objects by content and by (namespace, name).
    let mut by_key: HashMap<ContentKey<'a>, Vec<usize>> = HashMap::new();
    let mut by_name: HashMap<(&str, &str), usize> = HashMap::new();
    for (index, &object) in inputs.existing.iter().enumerate() {
        if let Some(key) = existing_key(object) {
            by_key.entry(key).or_default().push(index);
        }
        by_name.insert(
            (
                meta_str(object.metadata.namespace.as_deref()),
                meta_str(object.metadata.name.as_deref()),
            ),
            index,
        );
    }
    let mut claimed = vec![false; inputs.existing.len()];
    let mut taken: HashSet<String> = HashSet::with_capacity(candidates.len());

    // Pass 1: adopt existing objects with the same content (whoever wrote them, whatever their
    // name), keeping their names.
    let mut matched: Vec<Option<usize>> = vec![None; candidates.len()];
    for (c, candidate) in candidates.iter().enumerate() {
        let Some(indexes) = by_key.get(&candidate.key()) else {
            continue;
        };
        let best = indexes
            .iter()
            .copied()
            .filter(|&e| {
                let object = inputs.existing[e];
                !claimed[e]
                    && !is_terminating(object)
                    && meta_str(object.metadata.namespace.as_deref()) == candidate.namespace
            })
            .min_by_key(|&e| {
                let name = meta_str(inputs.existing[e].metadata.name.as_deref());
                (name != candidate.upstream_name, name)
            });
        if let Some(e) = best {
            let name = meta_str(inputs.existing[e].metadata.name.as_deref());
            if taken.insert(name.to_owned()) {
                claimed[e] = true;
                matched[c] = Some(e);
            }
        }
    }

    // Pass 2: name the others; upstream's name when free, else a hashed one. An unclaimed
    // existing object holding the name in the same namespace is updated in place (upstream's
    // "names in both lists").
    let mut named: Vec<Option<String>> = vec![None; candidates.len()];
    for (c, candidate) in candidates.iter().enumerate() {
        if matched[c].is_some() {
            continue;
        }
        let upstream = candidate.upstream_name.as_str();
        let too_long = upstream.len() > MAX_NAME_LEN;
        if !too_long && !taken.contains(upstream) {
            if let Some(&e) = by_name.get(&(candidate.namespace.as_str(), upstream))
                && !claimed[e]
            {
                claimed[e] = true;
                taken.insert(upstream.to_owned());
                if is_terminating(inputs.existing[e]) {
                    plan.warnings.push(Warning::Deferred {
                        namespace: candidate.namespace.clone(),
                        name: upstream.to_owned(),
                    });
                    claimed[e] = false;
                    continue;
                }
                matched[c] = Some(e);
                continue;
            }
            taken.insert(upstream.to_owned());
            named[c] = Some(upstream.to_owned());
            continue;
        }
        let name = hashed_name(upstream, candidate.key(), &taken);
        plan.warnings.push(Warning::Renamed {
            upstream: upstream.to_owned(),
            name: name.clone(),
            too_long,
        });
        taken.insert(name.clone());
        named[c] = Some(name);
    }

    // Outcome per candidate; per-target needs. New type-0 assignments wait in `fresh` until
    // every existing one has been seen: whether another assignment vouches for their identity
    // on their VM/VMSS decides how they are created.
    let mut reassigned: Vec<&'a AzureAssignedIdentity> = Vec::new();
    let mut to_federated: Vec<&'a AzureAssignedIdentity> = Vec::new();
    let mut anchored: HashSet<(ArmTarget, String)> = HashSet::new();
    let mut fresh: Vec<(ArmTarget, String, AzureAssignedIdentity)> = Vec::new();
    for (c, candidate) in candidates.iter().enumerate() {
        let no_arm = !is_type0(Some(candidate.identity)) || candidate.federated();
        let (name, pending) = if let Some(e) = matched[c] {
            let existing = inputs.existing[e];
            let name = meta_str(existing.metadata.name.as_deref()).to_owned();
            match classify(existing, candidate) {
                None => {
                    plan.unchanged.push(existing);
                    (name, existing.state() == AssignedIdentityState::Created)
                }
                Some(reassign) => {
                    plan.update
                        .push(update_of(existing, candidate, &name, reassign));
                    if reassign {
                        reassigned.push(existing);
                    } else if candidate.federated() && !existing_federated(existing) {
                        to_federated.push(existing);
                    }
                    (name, reassign)
                }
            }
        } else if let Some(name) = named[c].take() {
            let mut object = candidate.build(&name);
            match (
                no_arm,
                node_targets.get(candidate.node),
                lower_resource_id(candidate.identity),
            ) {
                // No ARM work: created in its final state.
                (true, _, _) => {
                    set_state(&mut object, AssignedIdentityState::Assigned);
                    plan.create.push(object);
                    continue;
                }
                (false, Some(target), Some(id)) => {
                    let entry = plan.targets.entry(target.clone()).or_default();
                    entry.nodes.insert(candidate.node.to_owned());
                    entry.required.insert(id.clone());
                    fresh.push((target.clone(), id, object));
                    continue;
                }
                // Unknown node (or no id): created `Created`, as upstream, and left pending.
                (false, _, _) => {
                    plan.create.push(object);
                    (name, true)
                }
            }
        } else {
            continue; // deferred
        };
        if no_arm {
            if pending {
                plan.assign_without_arm.push(name);
            }
            continue;
        }
        let Some(target) = node_targets.get(candidate.node) else {
            plan.missing_nodes.insert(candidate.node.to_owned());
            continue;
        };
        let entry = plan.targets.entry(target.clone()).or_default();
        entry.nodes.insert(candidate.node.to_owned());
        if let Some(id) = lower_resource_id(candidate.identity) {
            if !pending {
                entry.kept.insert(id.clone());
            }
            entry.required.insert(id.clone());
            // An existing assignment (Assigned, legacy, or confirmed by this pass) vouches
            // for the identity on this target.
            anchored.insert((target.clone(), id));
        }
        if pending {
            entry.confirm.push(name);
        }
    }
    // New type-0 assignments, in pod order: the first of each (target, identity) that no
    // existing assignment vouches for is created `Created` and confirmed (upstream's
    // `Created` → `Assigned`); the others are created `Assigned`
    // ([`TargetPlan::create_assigned`]).
    for (target, id, mut object) in fresh {
        let entry = plan.targets.entry(target.clone()).or_default();
        let name = meta_str(object.metadata.name.as_deref()).to_owned();
        if anchored.contains(&(target.clone(), id.clone())) {
            set_state(&mut object, AssignedIdentityState::Assigned);
            entry.create_assigned.push(name);
        } else {
            entry.confirm.push(name);
            anchored.insert((target, id));
        }
        plan.create.push(object);
    }

    // Removals: deleted objects and the old versions of reassigned ones. An id leaves a
    // VM/VMSS only when the old object was Assigned (or legacy), is type 0, its client id is
    // not immutable, and no desired assignment on any node of that target needs it.
    let release = |object: &AzureAssignedIdentity, plan: &mut Plan<'a>| {
        let identity = object.spec.azure_identity_ref.as_deref()?;
        if !object.state().is_assigned_or_legacy() || !is_type0(Some(identity)) {
            return None;
        }
        let id = lower_resource_id(identity)?;
        let client_id = identity
            .spec
            .client_id
            .as_deref()
            .unwrap_or_default()
            .to_ascii_lowercase();
        if options.immutable_client_ids.contains(&client_id) {
            return None;
        }
        let node = object.node_name()?;
        let target = node_targets.get(node)?;
        let entry = plan.targets.entry(target.clone()).or_default();
        if entry.required.contains(&id) {
            return None;
        }
        entry.nodes.insert(node.to_owned());
        entry.release.insert(id.clone());
        Some((target.clone(), id))
    };
    for object in reassigned.into_iter().chain(to_federated) {
        let _ = release(object, &mut plan);
    }
    for (e, &object) in inputs.existing.iter().enumerate() {
        if claimed[e] {
            continue;
        }
        let release = release(object, &mut plan);
        plan.delete.push(Deletion { object, release });
    }
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
