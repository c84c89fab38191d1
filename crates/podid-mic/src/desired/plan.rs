//! The result of [`super::compute`]: the assignments to create, update, keep and delete, and
//! the identity work of each VM/VMSS.

use std::collections::{BTreeMap, BTreeSet};

use podid_api::AzureAssignedIdentity;

use super::{ArmTarget, Warning};

/// An existing object that stays, with a new spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Update<'a> {
    /// The object as it is.
    pub existing: &'a AzureAssignedIdentity,
    /// The object to PUT: the existing metadata (uid, resourceVersion, finalizers) with new
    /// labels, spec and status.
    pub desired: AzureAssignedIdentity,
    /// The identity must be (re)confirmed on the node's VM/VMSS: the new status is `Created`.
    /// `false` when only the embedded copies changed (the state is kept).
    pub reassign: bool,
}

/// An existing object to delete.
#[derive(Debug, Clone, PartialEq)]
pub struct Deletion<'a> {
    /// The object.
    pub object: &'a AzureAssignedIdentity,
    /// `Some`: remove this (lower-cased) resource id from this VM/VMSS first, then patch
    /// `Unassigned` and delete. `None`: delete at once (not `Assigned`, not type 0, immutable,
    /// still needed on that VM/VMSS, or its node is gone).
    pub release: Option<(ArmTarget, String)>,
}

/// The identity work of one VM or VM scale set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetPlan {
    /// Nodes of this VM/VMSS that have pods with assignments or are losing some.
    pub nodes: BTreeSet<String>,
    /// Lower-cased resource ids the desired assignments on these nodes need.
    pub required: BTreeSet<String>,
    /// Lower-cased resource ids to remove (if present): held by removed `Assigned`
    /// assignments, needed by no desired one on ANY node of this target, not immutable.
    pub release: BTreeSet<String>,
    /// Names of type-0 assignments on this target whose state will be `Created` and that turn
    /// `Assigned` once `required` is confirmed on the VM/VMSS.
    pub confirm: Vec<String>,
    /// Lower-cased resource ids that desired assignments staying `Assigned` (or legacy) on
    /// this target hold: MIC confirmed them on the VM/VMSS already.
    pub kept: BTreeSet<String>,
    /// Names of new type-0 assignments on this target (in [`Plan::create`], built with state
    /// `Assigned`) whose identity another assignment vouches for: one of the same identity on
    /// this target is `Assigned` (or legacy), or is confirmed by this pass (`confirm`). They
    /// are created in their final state (one write instead of a create and a status patch):
    /// at once when the identity is known to be on the VM/VMSS, else once this target's
    /// identity work succeeded; if that work fails for their identity they are created
    /// `Created`, as upstream would have written them, and confirmed on a later pass.
    pub create_assigned: Vec<String>,
}

/// Counts of one pass (upstream logs `Found <n> pods, <n> ids, <n> bindings`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Pods with an `aadpodidbinding` label and a node that were considered.
    pub pods: usize,
    /// Identities that are usable.
    pub identities: usize,
    /// Bindings.
    pub bindings: usize,
    /// Desired assignments.
    pub desired: usize,
}

/// The outcome of one pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan<'a> {
    /// Objects to POST: `Created` when their identity must be confirmed on a VM/VMSS (they
    /// are in a target's `confirm`); `Assigned` when they need no ARM work (other identity
    /// types, federated identities); `Assigned` when another assignment vouches for their
    /// identity on their VM/VMSS (named in [`TargetPlan::create_assigned`]).
    pub create: Vec<AzureAssignedIdentity>,
    /// Objects to PUT.
    pub update: Vec<Update<'a>>,
    /// Existing objects that are desired as they are.
    pub unchanged: Vec<&'a AzureAssignedIdentity>,
    /// Existing objects that are not desired.
    pub delete: Vec<Deletion<'a>>,
    /// Work per VM/VMSS.
    pub targets: BTreeMap<ArmTarget, TargetPlan>,
    /// Names of assignments of other identity types in state `Created`: no ARM work, patch
    /// `Assigned` right away.
    pub assign_without_arm: Vec<String>,
    /// Nodes named by desired assignments that are not in the node list.
    pub missing_nodes: BTreeSet<String>,
    /// What was skipped or renamed.
    pub warnings: Vec<Warning>,
    /// Counts.
    pub stats: Stats,
}

impl Plan<'_> {
    /// `true` when nothing has to be written to the API server.
    pub fn is_noop(&self) -> bool {
        self.create.is_empty() && self.update.is_empty() && self.delete.is_empty()
    }
}
