//! The VMs and VM scale sets identities are assigned to, as a node's `providerID` names them,
//! and the resource ids of user-assigned identities.

use std::fmt;

/// A VM or VM scale set whose identity list MIC manages.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ArmTarget {
    /// A standalone VM; upstream uses the Kubernetes node name as the VM name.
    Vm(String),
    /// A VM scale set, by name, shared by all its nodes.
    Vmss(String),
}

impl ArmTarget {
    /// The VM or VMSS name.
    pub fn name(&self) -> &str {
        match self {
            Self::Vm(name) | Self::Vmss(name) => name,
        }
    }

    /// `true` for a VM scale set.
    pub(crate) fn is_vmss(&self) -> bool {
        matches!(self, Self::Vmss(_))
    }

    /// The target of a node: its providerID names a VM scale set, or else the VM named like the
    /// node (upstream ignores the resource group and VM name of the providerID).
    pub fn of_node(node_name: &str, provider_id: Option<&str>) -> (Self, bool) {
        match provider_id.and_then(parse_provider_id) {
            Some(Some(vmss)) => (Self::Vmss(vmss.to_owned()), true),
            Some(None) => (Self::Vm(node_name.to_owned()), true),
            None => (Self::Vm(node_name.to_owned()), false),
        }
    }
}

impl fmt::Display for ArmTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vm(name) => write!(f, "vm {name}"),
            Self::Vmss(name) => write!(f, "vmss {name}"),
        }
    }
}

/// Parses `azure:///subscriptions/<s>/resourceGroups/<rg>/providers/Microsoft.Compute/<type>/<name>[/…]`.
/// `Some(Some(vmss))` for a scale-set instance, `Some(None)` for a VM, `None` when unparsable.
fn parse_provider_id(provider_id: &str) -> Option<Option<&str>> {
    let path = provider_id.strip_prefix("azure://").unwrap_or(provider_id);
    let mut segments = path.split('/').filter(|s| !s.is_empty());
    if !segments
        .next()
        .is_some_and(|s| s.eq_ignore_ascii_case("subscriptions"))
    {
        return None;
    }
    let mut segments = segments.skip_while(|s| !s.eq_ignore_ascii_case("providers"));
    segments.next()?;
    let _provider = segments.next()?;
    let kind = segments.next()?;
    let name = segments.next()?;
    if kind.eq_ignore_ascii_case("virtualMachineScaleSets") {
        Some(Some(name))
    } else {
        Some(None)
    }
}

/// `true` when `id` has the shape upstream requires of a type-0 `resourceID`: it contains
/// (case-insensitively, anywhere) `/subscriptions/<x>/resourcegroups/<y>/providers/
/// Microsoft.ManagedIdentity/userAssignedIdentities/<z>` with non-empty parts on one line.
pub fn is_valid_resource_id(id: &str) -> bool {
    const SUB: &str = "/subscriptions/";
    const RG: &str = "/resourcegroups/";
    const PROVIDER: &str = "/providers/microsoft.managedidentity/userassignedidentities/";
    id.split('\n').any(|line| {
        let lower = line.to_ascii_lowercase();
        let Some(s) = lower.find(SUB) else {
            return false;
        };
        let after_sub = s + SUB.len() + 1;
        let Some(r) = lower.get(after_sub..).and_then(|t| t.find(RG)) else {
            return false;
        };
        let after_rg = after_sub + r + RG.len() + 1;
        let Some(p) = lower.get(after_rg..).and_then(|t| t.find(PROVIDER)) else {
            return false;
        };
        lower.len() > after_rg + p + PROVIDER.len()
    })
}
