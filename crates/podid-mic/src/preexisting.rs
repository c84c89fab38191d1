//! Identities that were on a VM or VM scale set before podid put them there stay there.
//!
//! Upstream MIC removes a user-assigned identity from a VM/VMSS when the last pod using it
//! goes, even when the identity was there before MIC ever assigned it (a kubelet or
//! operator-assigned identity that a pod then also uses through an AzureIdentity); only
//! `--immutable-user-msis` and the cluster identity protect such identities. podid keeps them
//! without any flag.
//!
//! The record lives on the API server, so it survives restarts and leader changes: when a
//! type-0 assignment is confirmed (`Created` → `Assigned`) and ARM reports its identity was
//! already on the VM/VMSS, and no other `Assigned` assignment on that VM/VMSS holds the identity
//! as one podid added, the assignment gets the annotation [`PREEXISTING_ANNOTATION`]`: "true"`.
//! Later assignments of the same identity on that VM/VMSS inherit the mark the same way. An
//! identity leaves a VM/VMSS only when no assignment on it (desired or being deleted) carries
//! the mark; the assignments themselves are deleted as usual.
//!
//! Objects written by the Go MIC carry no mark and keep upstream's behaviour. If MIC dies
//! between ARM's answer and the status patch, the next confirmation sees the identity present
//! with no holder and marks it: the identity then stays on the VM/VMSS (a leak to clean up by
//! hand, never a removal by mistake).
//!
//! Pure: values in, values out; no Kubernetes client, no ARM.

use std::collections::{HashMap, HashSet};

use podid_api::AzureAssignedIdentity;

use crate::desired::{ArmTarget, Inputs, Plan};

/// Annotation on an AzureAssignedIdentity: its identity was already on the VM/VMSS when the
/// assignment was confirmed, and podid must not remove it.
pub const PREEXISTING_ANNOTATION: &str = "podid.io/preexisting-identity";

/// Whether `object` carries the [`PREEXISTING_ANNOTATION`] mark.
pub(crate) fn is_marked(object: &AzureAssignedIdentity) -> bool {
    object
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(PREEXISTING_ANNOTATION))
        .is_some_and(|v| v == "true")
}

/// What the existing assignments say about each (VM/VMSS, identity) pair, and which nodes exist.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ownership {
    /// (target, lower-cased id) pairs some assignment marks as found there.
    found: HashSet<(ArmTarget, String)>,
    /// (target, lower-cased id) pairs held by an unmarked `Assigned` (or legacy) assignment:
    /// podid (or the Go MIC) added them.
    owned: HashSet<(ArmTarget, String)>,
    /// Node name → its VM/VMSS.
    nodes: HashMap<String, ArmTarget>,
}

impl Ownership {
    /// Reads the marks of `inputs.existing` and the nodes of `inputs.nodes`.
    pub fn of(inputs: &Inputs<'_>) -> Self {
        let mut ownership = Self::default();
        for node in &inputs.nodes {
            let Some(name) = node.metadata.name.as_deref() else {
                continue;
            };
            let provider_id = node.spec.as_ref().and_then(|s| s.provider_id.as_deref());
            let (target, _) = ArmTarget::of_node(name, provider_id);
            ownership.nodes.insert(name.to_owned(), target);
        }
        for &object in &inputs.existing {
            let Some(key) = ownership.key(object) else {
                continue;
            };
            if is_marked(object) {
                ownership.found.insert(key);
            } else if object.state().is_assigned_or_legacy() {
                ownership.owned.insert(key);
            }
        }
        ownership
    }

    /// Whether the node exists.
    pub(crate) fn node_exists(&self, node: &str) -> bool {
        self.nodes.contains_key(node)
    }

    /// (target, lower-cased id) of a type-0 assignment on a known node.
    fn key(&self, object: &AzureAssignedIdentity) -> Option<(ArmTarget, String)> {
        let identity = object.spec.azure_identity_ref.as_deref()?;
        if !identity.identity_type().is_user_assigned_msi() {
            return None;
        }
        let id = identity
            .spec
            .resource_id
            .as_deref()
            .filter(|id| !id.is_empty())?
            .to_ascii_lowercase();
        let target = self.nodes.get(object.node_name()?)?;
        Some((target.clone(), id))
    }

    /// Whether an unmarked `Assigned` (or legacy) assignment holds `id` on `target`: podid (or
    /// the Go MIC) added it.
    pub(crate) fn owns(&self, target: &ArmTarget, id: &str) -> bool {
        self.owned.contains(&(target.clone(), id.to_owned()))
    }

    /// Whether `id` (lower-cased) on `target` is marked as found there.
    pub(crate) fn is_found(&self, target: &ArmTarget, id: &str) -> bool {
        self.found.contains(&(target.clone(), id.to_owned()))
    }

    /// Takes marked identities out of `plan`'s releases (their assignments are deleted without
    /// ARM work) and drops the mark from assignments that must be confirmed again (another
    /// node, identity or state: the mark is recomputed at confirmation).
    pub(crate) fn keep_found(&self, plan: &mut Plan<'_>) {
        for (target, work) in &mut plan.targets {
            work.release.retain(|id| !self.is_found(target, id));
        }
        for deletion in &mut plan.delete {
            if deletion
                .release
                .as_ref()
                .is_some_and(|(target, id)| self.is_found(target, id))
            {
                deletion.release = None;
            }
        }
        for update in &mut plan.update {
            if update.reassign
                && let Some(annotations) = update.desired.metadata.annotations.as_mut()
            {
                annotations.remove(PREEXISTING_ANNOTATION);
            }
        }
    }
}
