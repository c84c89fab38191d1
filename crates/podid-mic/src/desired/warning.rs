//! What a pass could not do with the watched objects, for the log.

use std::fmt;

/// Something a pass skipped or changed; `Display` gives upstream's log line where upstream has
/// one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Warning {
    /// A type-0 identity whose `resourceID` does not have the ARM shape; it is ignored.
    InvalidResourceId {
        /// Identity namespace.
        namespace: String,
        /// Identity name.
        name: String,
        /// The rejected id.
        resource_id: String,
    },
    /// A binding names an identity that does not exist (or was ignored) in its namespace.
    IdentityNotFound {
        /// The identity name the binding asks for.
        identity: String,
        /// Binding namespace.
        binding_namespace: String,
        /// Binding name.
        binding: String,
    },
    /// Two bindings give the same pod the same identity; the first (by binding namespace and
    /// name) is used.
    DuplicateBinding {
        /// Pod namespace.
        pod_namespace: String,
        /// Pod name.
        pod: String,
        /// The binding kept, `namespace/name`.
        kept: String,
        /// The binding ignored, `namespace/name`.
        ignored: String,
    },
    /// Upstream's name was taken or too long; podid used a hashed one.
    Renamed {
        /// Upstream's name.
        upstream: String,
        /// The name used.
        name: String,
        /// `true`: longer than 253; `false`: clash.
        too_long: bool,
    },
    /// The name is held by an object being deleted; the assignment waits for the next pass.
    Deferred {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// A node's providerID is not an Azure one; it is treated as the VM named like the node.
    UnparsableProviderId {
        /// Node name.
        node: String,
        /// The providerID, possibly empty.
        provider_id: String,
    },
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidResourceId {
                namespace,
                name,
                resource_id,
            } => write!(
                f,
                "ignoring azure identity {namespace}/{name}, error: invalid resource id: {resource_id:?}, must match /subscriptions/<subid>/resourcegroups/<resourcegroup>/providers/Microsoft.ManagedIdentity/userAssignedIdentities/<name>"
            ),
            Self::IdentityNotFound {
                identity,
                binding_namespace,
                binding,
            } => write!(
                f,
                "{identity} identity not found when using {binding_namespace}/{binding} binding"
            ),
            Self::DuplicateBinding {
                pod_namespace,
                pod,
                kept,
                ignored,
            } => write!(
                f,
                "pod {pod_namespace}/{pod} gets the same identity through bindings {kept} and {ignored}; using {kept}"
            ),
            Self::Renamed {
                upstream,
                name,
                too_long,
            } => {
                let why = if *too_long {
                    "is longer than 253 characters"
                } else {
                    "is already used by another assignment"
                };
                write!(
                    f,
                    "AzureAssignedIdentity name {upstream} {why}; using {name}"
                )
            }
            Self::Deferred { namespace, name } => write!(
                f,
                "AzureAssignedIdentity {namespace}/{name} is being deleted; its replacement waits for the next pass"
            ),
            Self::UnparsableProviderId { node, provider_id } => write!(
                f,
                "node {node} has providerID {provider_id:?}, not an Azure VM or VMSS; assuming the VM named {node}"
            ),
        }
    }
}
