//! The steps of [`super::compute`], in the order it takes them: nodes to VM/VMSS targets,
//! usable identities, bindings resolved to their identities, pods to desired assignments
//! ([`Candidate`]s), their match against the existing objects, what becomes of each, and what
//! the removed objects release.

use std::collections::{HashMap, HashSet};

use k8s_openapi::api::core::v1::{Node, Pod};
use podid_api::{
    AssignedIdentityState, AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding,
    OperationMode, assigned_identity_name, assigned_identity_namespace,
};
use podid_select::matching::{
    MatchOptions, binding_label, binding_selector, confined_to_binding_namespace,
};

use super::{
    ArmTarget, Candidate, ContentKey, Deletion, MAX_NAME_LEN, Options, Plan, Warning, classify,
    existing_federated, existing_key, hashed_name, is_terminating, is_type0, is_valid_resource_id,
    lower_resource_id, meta_str, set_state, update_of,
};

/// Usable identities by (namespace, name).
pub(super) type Identities<'a> = HashMap<(&'a str, &'a str), &'a AzureIdentity>;

/// A binding and its identity (`None`: missing in the binding's namespace).
type Pair<'a> = (&'a AzureIdentityBinding, Option<&'a AzureIdentity>);

/// A pod that may get assignments: (namespace, name, node, `aadpodidbinding` label).
pub(super) type PodRow<'a> = (&'a str, &'a str, &'a str, &'a str);

/// Decides each node's VM or VM scale set (a warning for an unparsable providerID).
pub(super) fn node_targets<'a>(
    nodes: &[&'a Node],
    warnings: &mut Vec<Warning>,
) -> HashMap<&'a str, ArmTarget> {
    // Nodes → VM/VMSS.
    let mut node_targets: HashMap<&str, ArmTarget> = HashMap::with_capacity(nodes.len());
    for &node in nodes {
        let Some(name) = node.metadata.name.as_deref() else {
            continue;
        };
        let provider_id = node.spec.as_ref().and_then(|s| s.provider_id.as_deref());
        let (target, parsed) = ArmTarget::of_node(name, provider_id);
        if !parsed {
            warnings.push(Warning::UnparsableProviderId {
                node: name.to_owned(),
                provider_id: provider_id.unwrap_or_default().to_owned(),
            });
        }
        node_targets.insert(name, target);
    }
    node_targets
}

/// Decides which identities are usable: all but type-0 ones with a malformed resource id.
pub(super) fn usable_identities<'a>(
    all: &[&'a AzureIdentity],
    warnings: &mut Vec<Warning>,
) -> Identities<'a> {
    // Usable identities by (namespace, name).
    let mut identities: HashMap<(&str, &str), &AzureIdentity> = HashMap::with_capacity(all.len());
    for &identity in all {
        let namespace = meta_str(identity.metadata.namespace.as_deref());
        let name = meta_str(identity.metadata.name.as_deref());
        if identity.identity_type().is_user_assigned_msi() {
            let resource_id = identity.spec.resource_id.as_deref().unwrap_or_default();
            if !is_valid_resource_id(resource_id) {
                warnings.push(Warning::InvalidResourceId {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    resource_id: resource_id.to_owned(),
                });
                continue;
            }
        }
        identities.insert((namespace, name), identity);
    }
    identities
}

/// The bindings resolved to their identities, indexed by the pods they can apply to.
pub(super) struct ResolvedBindings<'a> {
    /// Unconfined pairs by selector: for pods of any namespace.
    global: HashMap<&'a str, Vec<Pair<'a>>>,
    /// Confined pairs by (binding namespace, selector): for pods of that namespace only.
    local: HashMap<(&'a str, &'a str), Vec<Pair<'a>>>,
}

impl<'a> ResolvedBindings<'a> {
    /// Decides each binding's identity and which pods' namespaces it applies to.
    pub(super) fn resolve(
        all: &[&'a AzureIdentityBinding],
        identities: &Identities<'a>,
        options: &Options,
    ) -> Self {
        // Bindings, in (namespace, name) order, resolved to their identity once, with nmi's
        // selection rules (podid_select::matching: selector, identity in the binding's namespace,
        // the namespace rule). Unconfined pairs apply to pods of any namespace (by selector);
        // confined ones only to pods of the binding's namespace (by namespace and selector).
        // Missing identities are remembered and reported when a pod hits them, as upstream does.
        let match_options = MatchOptions {
            mode: OperationMode::Standard,
            force_namespaced: options.force_namespaced,
        };
        let mut bindings: Vec<&AzureIdentityBinding> = all.to_vec();
        bindings.sort_by(|a, b| {
            (a.metadata.namespace.as_deref(), a.metadata.name.as_deref())
                .cmp(&(b.metadata.namespace.as_deref(), b.metadata.name.as_deref()))
        });
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
        Self { global, local }
    }
}

/// Decides which pods may get assignments (labelled, scheduled, not finished when those are
/// released), in (namespace, name) order.
pub(super) fn pods_to_match<'a>(all: &[&'a Pod], options: &Options) -> Vec<PodRow<'a>> {
    // Candidates, pods in (namespace, name) order so "first" is stable.
    let mut pods: Vec<(&str, &str, &str, &str)> = Vec::new();
    for &pod in all {
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
    pods
}

/// Decides the desired assignments: each pod with each binding that applies to it, the first
/// binding of each (pod, identity) pair kept.
pub(super) fn candidates<'a>(
    pods: &[PodRow<'a>],
    bindings: &ResolvedBindings<'a>,
    options: &Options,
    warnings: &mut Vec<Warning>,
) -> Vec<Candidate<'a>> {
    let ResolvedBindings { global, local } = bindings;
    let mut candidates: Vec<Candidate<'a>> = Vec::new();
    let mut seen: HashMap<ContentKey<'a>, usize> = HashMap::new();
    let mut warned_missing: HashSet<(&str, &str)> = HashSet::new();
    let empty: Vec<Pair<'a>> = Vec::new();
    for &(pod_namespace, pod, node, label) in pods {
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
                    warnings.push(Warning::IdentityNotFound {
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
                warnings.push(Warning::DuplicateBinding {
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
    candidates
}

/// The candidates against the existing objects: which object each keeps, the names of the new
/// ones, and which existing objects no candidate keeps.
pub(super) struct Matching<'i, 'a> {
    /// All existing objects.
    existing: &'i [&'a AzureAssignedIdentity],
    /// Existing objects by content.
    by_key: HashMap<ContentKey<'a>, Vec<usize>>,
    /// Existing objects by (namespace, name).
    by_name: HashMap<(&'a str, &'a str), usize>,
    /// Per existing object: a candidate keeps it (the others are deleted).
    claimed: Vec<bool>,
    /// Names in use by the desired set.
    taken: HashSet<String>,
    /// Per candidate: the existing object it keeps.
    matched: Vec<Option<usize>>,
    /// Per candidate: the name of its new object (`None` when matched, or deferred).
    named: Vec<Option<String>>,
}

impl<'i, 'a> Matching<'i, 'a> {
    /// Indexes the existing objects; nothing matched yet.
    pub(super) fn new(existing: &'i [&'a AzureAssignedIdentity], candidates: usize) -> Self {
        // Existing objects by content and by (namespace, name).
        let mut by_key: HashMap<ContentKey<'a>, Vec<usize>> = HashMap::new();
        let mut by_name: HashMap<(&str, &str), usize> = HashMap::new();
        for (index, &object) in existing.iter().enumerate() {
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
        let claimed = vec![false; existing.len()];
        let taken: HashSet<String> = HashSet::with_capacity(candidates);
        Self {
            existing,
            by_key,
            by_name,
            claimed,
            taken,
            matched: vec![None; candidates],
            named: vec![None; candidates],
        }
    }

    /// Decides which candidates keep an existing object of the same content, and which.
    pub(super) fn adopt_same_content(&mut self, candidates: &[Candidate<'a>]) {
        let Self {
            existing,
            by_key,
            claimed,
            taken,
            matched,
            ..
        } = self;
        // Pass 1: adopt existing objects with the same content (whoever wrote them, whatever their
        // name), keeping their names.
        for (c, candidate) in candidates.iter().enumerate() {
            let Some(indexes) = by_key.get(&candidate.key()) else {
                continue;
            };
            let best = indexes
                .iter()
                .copied()
                .filter(|&e| {
                    let object = existing[e];
                    !claimed[e]
                        && !is_terminating(object)
                        && meta_str(object.metadata.namespace.as_deref()) == candidate.namespace
                })
                .min_by_key(|&e| {
                    let name = meta_str(existing[e].metadata.name.as_deref());
                    (name != candidate.upstream_name, name)
                });
            if let Some(e) = best {
                let name = meta_str(existing[e].metadata.name.as_deref());
                if taken.insert(name.to_owned()) {
                    claimed[e] = true;
                    matched[c] = Some(e);
                }
            }
        }
    }

    /// Decides the names of the other candidates, and which take over an existing object that
    /// holds their name.
    pub(super) fn name_the_rest(
        &mut self,
        candidates: &[Candidate<'a>],
        warnings: &mut Vec<Warning>,
    ) {
        let Self {
            existing,
            by_name,
            claimed,
            taken,
            matched,
            named,
            ..
        } = self;
        // Pass 2: name the others; upstream's name when free, else a hashed one. An unclaimed
        // existing object holding the name in the same namespace is updated in place (upstream's
        // "names in both lists").
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
                    if is_terminating(existing[e]) {
                        warnings.push(Warning::Deferred {
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
            let name = hashed_name(upstream, candidate.key(), taken);
            warnings.push(Warning::Renamed {
                upstream: upstream.to_owned(),
                name: name.clone(),
                too_long,
            });
            taken.insert(name.clone());
            named[c] = Some(name);
        }
    }
}

/// What [`outcomes`] leaves for the steps after it.
pub(super) struct Outcomes<'a> {
    /// Existing objects rewritten to be confirmed on their VM/VMSS again.
    pub(super) reassigned: Vec<&'a AzureAssignedIdentity>,
    /// Existing objects rewritten onto the federated path.
    pub(super) to_federated: Vec<&'a AzureAssignedIdentity>,
    /// (target, resource id) pairs an existing assignment vouches for.
    pub(super) anchored: HashSet<(ArmTarget, String)>,
    /// New type-0 assignments on a known target, in pod order, with their resource id.
    pub(super) fresh: Vec<(ArmTarget, String, AzureAssignedIdentity)>,
}

/// Decides what becomes of each candidate (kept, updated, created or deferred) and what its
/// VM/VMSS needs for it.
pub(super) fn outcomes<'a>(
    candidates: &[Candidate<'a>],
    matching: &mut Matching<'_, 'a>,
    node_targets: &HashMap<&str, ArmTarget>,
    plan: &mut Plan<'a>,
) -> Outcomes<'a> {
    // Outcome per candidate; per-target needs. New type-0 assignments wait in `fresh` until
    // every existing one has been seen: whether another assignment vouches for their identity
    // on their VM/VMSS decides how they are created.
    let mut reassigned: Vec<&'a AzureAssignedIdentity> = Vec::new();
    let mut to_federated: Vec<&'a AzureAssignedIdentity> = Vec::new();
    let mut anchored: HashSet<(ArmTarget, String)> = HashSet::new();
    let mut fresh: Vec<(ArmTarget, String, AzureAssignedIdentity)> = Vec::new();
    for (c, candidate) in candidates.iter().enumerate() {
        let no_arm = !is_type0(Some(candidate.identity)) || candidate.federated();
        let (name, pending) = if let Some(e) = matching.matched[c] {
            let existing = matching.existing[e];
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
        } else if let Some(name) = matching.named[c].take() {
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
    Outcomes {
        reassigned,
        to_federated,
        anchored,
        fresh,
    }
}

/// Decides the state new type-0 assignments are created in: `Created` and confirmed, or
/// `Assigned` when another assignment vouches for their identity on their VM/VMSS.
pub(super) fn create_fresh(
    fresh: Vec<(ArmTarget, String, AzureAssignedIdentity)>,
    mut anchored: HashSet<(ArmTarget, String)>,
    plan: &mut Plan<'_>,
) {
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
}

/// Decides the deletions, and which resource ids the removed objects (deleted, or the old
/// versions of rewritten ones) release from their VM/VMSS.
pub(super) fn removals<'a>(
    reassigned: Vec<&'a AzureAssignedIdentity>,
    to_federated: Vec<&'a AzureAssignedIdentity>,
    matching: &Matching<'_, 'a>,
    node_targets: &HashMap<&str, ArmTarget>,
    options: &Options,
    plan: &mut Plan<'a>,
) {
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
        let _ = release(object, plan);
    }
    for (e, &object) in matching.existing.iter().enumerate() {
        if matching.claimed[e] {
            continue;
        }
        let release = release(object, plan);
        plan.delete.push(Deletion { object, release });
    }
}
