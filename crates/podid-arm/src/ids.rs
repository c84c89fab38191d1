//! Resource ids MIC works with: the VM or VMSS behind a node ([`ComputeId`], parsed from
//! `Node.spec.providerID`) and user-assigned identity resource ids ([`IdentityResourceId`],
//! validated and lower-cased as upstream compares them).

use std::fmt;
use std::hash::{Hash, Hasher};

/// Whether a node runs on a standalone VM or on an instance of a scale set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ComputeKind {
    /// `Microsoft.Compute/virtualMachines`.
    VirtualMachine,
    /// `Microsoft.Compute/virtualMachineScaleSets` (identities live on the scale set).
    VirtualMachineScaleSet,
}

impl ComputeKind {
    /// The ARM resource type segment (`virtualMachines` / `virtualMachineScaleSets`).
    pub fn arm_type(self) -> &'static str {
        match self {
            Self::VirtualMachine => "virtualMachines",
            Self::VirtualMachineScaleSet => "virtualMachineScaleSets",
        }
    }

    /// Upstream's word for it in messages (`vm` / `vmss`).
    pub fn short_name(self) -> &'static str {
        match self {
            Self::VirtualMachine => "vm",
            Self::VirtualMachineScaleSet => "vmss",
        }
    }
}

/// The ARM resource whose identities MIC changes for a node: a VM, or the scale set of a VMSS
/// instance. Names keep the case they were given; equality and hashing ignore case, as ARM does.
#[derive(Debug, Clone)]
pub struct ComputeId {
    kind: ComputeKind,
    subscription_id: String,
    resource_group: String,
    name: String,
}

/// A `Node.spec.providerID` that does not name an Azure VM or VMSS instance.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unparsable node providerID {provider_id:?}: {reason}")]
pub struct ProviderIdError {
    /// The providerID as found on the node.
    pub provider_id: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl ComputeId {
    /// A standalone VM.
    pub fn vm(subscription_id: &str, resource_group: &str, name: &str) -> Self {
        Self::new(
            ComputeKind::VirtualMachine,
            subscription_id,
            resource_group,
            name,
        )
    }

    /// A virtual machine scale set.
    pub fn vmss(subscription_id: &str, resource_group: &str, name: &str) -> Self {
        Self::new(
            ComputeKind::VirtualMachineScaleSet,
            subscription_id,
            resource_group,
            name,
        )
    }

    /// A VM or VMSS.
    pub fn new(kind: ComputeKind, subscription_id: &str, resource_group: &str, name: &str) -> Self {
        Self {
            kind,
            subscription_id: subscription_id.to_owned(),
            resource_group: resource_group.to_owned(),
            name: name.to_owned(),
        }
    }

    /// Parses `Node.spec.providerID`:
    /// `azure:///subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Compute/virtualMachines/<name>`
    /// names a VM; `.../virtualMachineScaleSets/<vmss>/virtualMachines/<instance>` names the
    /// scale set `<vmss>`. Scheme, literal segments and the provider are matched
    /// case-insensitively. Anything else is an error, never a panic.
    pub fn from_provider_id(provider_id: &str) -> Result<Self, ProviderIdError> {
        let err = |reason| ProviderIdError {
            provider_id: provider_id.to_owned(),
            reason,
        };
        let trimmed = provider_id.trim();
        if trimmed.is_empty() {
            return Err(err(
                "empty (the node is not initialised by a cloud provider yet)",
            ));
        }
        let Some((scheme, rest)) = trimmed.split_once("://") else {
            return Err(err("missing the azure:// scheme"));
        };
        if !scheme.eq_ignore_ascii_case("azure") {
            return Err(err("not an azure:// provider id"));
        }
        let path = rest.trim_start_matches('/');
        let segs: Vec<&str> = path.split('/').collect();
        if segs.iter().any(|s| s.is_empty()) {
            return Err(err("empty path segment"));
        }
        let lit = |i: usize, want: &str| segs.get(i).is_some_and(|s| s.eq_ignore_ascii_case(want));
        if !(lit(0, "subscriptions") && lit(2, "resourceGroups") && lit(4, "providers")) {
            return Err(err(
                "expected /subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Compute/...",
            ));
        }
        if segs.len() < 8 {
            return Err(err("too few path segments"));
        }
        if !lit(5, "Microsoft.Compute") {
            return Err(err("provider is not Microsoft.Compute"));
        }
        let (sub, rg, name) = (segs[1], segs[3], segs[7]);
        if lit(6, "virtualMachines") {
            if segs.len() != 8 {
                return Err(err("unexpected segments after the VM name"));
            }
            return Ok(Self::vm(sub, rg, name));
        }
        if lit(6, "virtualMachineScaleSets") {
            return match segs.len() {
                8 => Ok(Self::vmss(sub, rg, name)),
                10 if lit(8, "virtualMachines") => Ok(Self::vmss(sub, rg, name)),
                _ => Err(err(
                    "expected virtualMachineScaleSets/<vmss>/virtualMachines/<instance>",
                )),
            };
        }
        Err(err(
            "resource type is neither virtualMachines nor virtualMachineScaleSets",
        ))
    }

    /// The same resource in another resource group. Upstream looks every VM/VMSS up in the cloud
    /// config's `resourceGroup`, not in the one the providerID names
    /// (docs/upstream.md#cloud-configuration).
    pub fn with_resource_group(mut self, resource_group: &str) -> Self {
        resource_group.clone_into(&mut self.resource_group);
        self
    }

    /// VM or VMSS.
    pub fn kind(&self) -> ComputeKind {
        self.kind
    }

    /// Subscription id.
    pub fn subscription_id(&self) -> &str {
        &self.subscription_id
    }

    /// Resource group.
    pub fn resource_group(&self) -> &str {
        &self.resource_group
    }

    /// VM or VMSS name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// ARM resource id / URL path:
    /// `/subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.Compute/<type>/<name>`.
    pub fn resource_id(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/{}/{}",
            self.subscription_id,
            self.resource_group,
            self.kind.arm_type(),
            self.name
        )
    }

    fn key(&self) -> (ComputeKind, String, String, String) {
        (
            self.kind,
            self.subscription_id.to_ascii_lowercase(),
            self.resource_group.to_ascii_lowercase(),
            self.name.to_ascii_lowercase(),
        )
    }
}

impl PartialEq for ComputeId {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind
            && self
                .subscription_id
                .eq_ignore_ascii_case(&other.subscription_id)
            && self
                .resource_group
                .eq_ignore_ascii_case(&other.resource_group)
            && self.name.eq_ignore_ascii_case(&other.name)
    }
}

impl Eq for ComputeId {}

impl Hash for ComputeId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

impl fmt::Display for ComputeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} in {}",
            self.kind.short_name(),
            self.name,
            self.resource_group
        )
    }
}

/// An identity `resourceID` that is not a user-assigned identity resource id. `Display` is
/// upstream's text (docs/upstream.md#sync-cycle); MIC logs
/// `ignoring azure identity <ns>/<name>, error: <this>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid resource id: {resource_id:?}, must match /subscriptions/<subid>/resourcegroups/<resourcegroup>/providers/Microsoft.ManagedIdentity/userAssignedIdentities/<name>"
)]
pub struct InvalidResourceId {
    /// The id as given.
    pub resource_id: String,
}

/// A validated user-assigned identity resource id, lower-cased (upstream compares and writes
/// ids lower-cased, docs/upstream.md#arm-calls).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityResourceId(String);

impl IdentityResourceId {
    /// Validates `/subscriptions/<sub>/resourcegroups/<rg>/providers/Microsoft.ManagedIdentity/userAssignedIdentities/<name>`
    /// (literal segments case-insensitive, no empty, blank or extra segments, no query) and
    /// lower-cases it.
    pub fn parse(resource_id: &str) -> Result<Self, InvalidResourceId> {
        if is_user_assigned_identity_id(resource_id) {
            Ok(Self(resource_id.to_ascii_lowercase()))
        } else {
            Err(InvalidResourceId {
                resource_id: resource_id.to_owned(),
            })
        }
    }

    /// The lower-cased id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IdentityResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for IdentityResourceId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Whether `resource_id` is a user-assigned identity resource id (see
/// [`IdentityResourceId::parse`]).
pub fn is_user_assigned_identity_id(resource_id: &str) -> bool {
    let Some(path) = resource_id.strip_prefix('/') else {
        return false;
    };
    let segs: Vec<&str> = path.split('/').collect();
    if segs.len() != 8 {
        return false;
    }
    let valid_name = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| !c.is_whitespace() && !c.is_control() && !matches!(c, '?' | '#' | '\''))
    };
    segs[0].eq_ignore_ascii_case("subscriptions")
        && valid_name(segs[1])
        && segs[2].eq_ignore_ascii_case("resourceGroups")
        && valid_name(segs[3])
        && segs[4].eq_ignore_ascii_case("providers")
        && segs[5].eq_ignore_ascii_case("Microsoft.ManagedIdentity")
        && segs[6].eq_ignore_ascii_case("userAssignedIdentities")
        && valid_name(segs[7])
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUB: &str = "8b1f4e6c-0000-4000-8000-000000000001";

    #[test]
    fn vm_provider_id() {
        let id = ComputeId::from_provider_id(&format!(
            "azure:///subscriptions/{SUB}/resourceGroups/MC_rg_aks_westeurope/providers/Microsoft.Compute/virtualMachines/aks-nodepool1-0"
        ))
        .expect("parses");
        assert_eq!(id.kind(), ComputeKind::VirtualMachine);
        assert_eq!(id.subscription_id(), SUB);
        assert_eq!(id.resource_group(), "MC_rg_aks_westeurope");
        assert_eq!(id.name(), "aks-nodepool1-0");
        assert_eq!(
            id.resource_id(),
            format!(
                "/subscriptions/{SUB}/resourceGroups/MC_rg_aks_westeurope/providers/Microsoft.Compute/virtualMachines/aks-nodepool1-0"
            )
        );
    }

    #[test]
    fn vmss_instance_names_the_scale_set() {
        let id = ComputeId::from_provider_id(&format!(
            "azure:///subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/aks-np-vmss/virtualMachines/3"
        ))
        .expect("parses");
        assert_eq!(id, ComputeId::vmss(SUB, "rg", "aks-np-vmss"));
        assert_eq!(id.kind(), ComputeKind::VirtualMachineScaleSet);
        assert_eq!(id.to_string(), "vmss aks-np-vmss in rg");
    }

    #[test]
    fn case_insensitive_parse_and_equality() {
        let id = ComputeId::from_provider_id(&format!(
            "AZURE:///SUBSCRIPTIONS/{SUB}/RESOURCEGROUPS/RG/PROVIDERS/microsoft.compute/VIRTUALMACHINESCALESETS/VMSS/VIRTUALMACHINES/0"
        ))
        .expect("parses");
        assert_eq!(id, ComputeId::vmss(SUB, "rg", "vmss"));
        assert_eq!(id.name(), "VMSS", "case kept for display and URLs");
        let mut set = std::collections::HashSet::new();
        set.insert(id);
        assert!(set.contains(&ComputeId::vmss(&SUB.to_uppercase(), "Rg", "vmss")));
        assert_ne!(
            ComputeId::vm(SUB, "rg", "vmss"),
            ComputeId::vmss(SUB, "rg", "vmss")
        );
    }

    #[test]
    fn with_resource_group_overrides() {
        let id = ComputeId::vm(SUB, "from-node", "n").with_resource_group("from-config");
        assert_eq!(id.resource_group(), "from-config");
    }

    #[test]
    fn bad_provider_ids_are_errors() {
        let cases = [
            "",
            "   ",
            "aks-nodepool1-0",
            "gce://project/zone/name",
            "azure://",
            "azure:///subscriptions/s/resourceGroups/rg",
            "azure:///subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/virtualMachines/n",
            "azure:///subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/disks/n",
            "azure:///subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/n/extra",
            "azure:///subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/v/instances/0",
            "azure:///subscriptions//resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/n",
            "azure:///subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/",
            "azure:///resourceGroups/rg/subscriptions/s/providers/Microsoft.Compute/virtualMachines/n",
            "azure:///subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/n/",
        ];
        for case in cases {
            let err = ComputeId::from_provider_id(case).expect_err(case);
            assert_eq!(err.provider_id, case);
            assert!(
                err.to_string().starts_with("unparsable node providerID"),
                "{err}"
            );
        }
    }

    #[test]
    fn identity_ids_validated_and_lowercased() {
        let raw = format!(
            "/subscriptions/{SUB}/resourceGroups/My-RG/providers/Microsoft.ManagedIdentity/userAssignedIdentities/Web_ID-1"
        );
        let id = IdentityResourceId::parse(&raw).expect("valid");
        assert_eq!(id.as_str(), raw.to_ascii_lowercase());
        assert_eq!(
            IdentityResourceId::parse(&raw.to_ascii_uppercase()).expect("valid"),
            id
        );
    }

    #[test]
    fn invalid_identity_ids_carry_upstream_message() {
        let cases = [
            "",
            "id1",
            "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/",
            "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a/b",
            "subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a",
            "/subscriptions/s/resourcegroups/rg/providers/Microsoft.Compute/virtualMachines/a",
            "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a b",
            "/subscriptions//resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a",
        ];
        for case in cases {
            let err = IdentityResourceId::parse(case).expect_err(case);
            assert_eq!(
                err.to_string(),
                format!(
                    "invalid resource id: {case:?}, must match /subscriptions/<subid>/resourcegroups/<resourcegroup>/providers/Microsoft.ManagedIdentity/userAssignedIdentities/<name>"
                )
            );
        }
    }
}
