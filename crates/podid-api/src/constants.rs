//! Names shared by every component: API group, labels, annotations, finalizer, states.
//!
//! All values are byte-for-byte those of upstream aad-pod-identity v1.8.17; changing one breaks
//! compatibility with existing clusters and manifests.

use std::fmt;

/// API group of all four kinds.
pub const GROUP: &str = "aadpodidentity.k8s.io";
/// The only served and stored version.
pub const VERSION: &str = "v1";
/// `apiVersion` value of every object: `aadpodidentity.k8s.io/v1`.
pub const API_VERSION: &str = "aadpodidentity.k8s.io/v1";

/// Pod label whose value selects bindings: a binding applies to a pod when
/// `binding.spec.selector` equals this label's value exactly (case-sensitive string equality;
/// it is not a Kubernetes label selector).
pub const POD_LABEL_KEY: &str = "aadpodidbinding";

/// Annotation on an `AzureIdentity` that turns on namespaced matching for that identity alone
/// (capital `B`, exactly as upstream).
pub const BEHAVIOR_ANNOTATION: &str = "aadpodidentity.k8s.io/Behavior";
/// The only value of [`BEHAVIOR_ANNOTATION`] that has an effect (case-sensitive).
pub const BEHAVIOR_NAMESPACED: &str = "namespaced";

/// podid extension, on an `AzureIdentity` (or an `AzureIdentityBinding`, whose value wins):
/// `federated` makes NMI obtain the identity's tokens by exchanging a Kubernetes service-account
/// token at Entra (Workload Identity federation) instead of from the node's IMDS or the Secret.
pub const TOKEN_SOURCE_ANNOTATION: &str = "podid.io/token-source";
/// podid extension, with [`TOKEN_SOURCE_ANNOTATION`]: exchange the token of this one service
/// account (`<name>` in the identity's namespace, or `<namespace>/<name>`) for every pod, instead of
/// each pod's own, so one federated credential covers all of them (Entra allows 20 per identity).
pub const FEDERATED_SERVICE_ACCOUNT_ANNOTATION: &str = "podid.io/federated-service-account";

/// Azure Workload Identity's pod label: pods with the value `"true"` are set up for Workload
/// Identity (the webhook's object selector). With `--serve-workload-identity-pods`, NMI serves
/// such pods' IMDS calls through the federated exchange when no binding gives them an identity.
pub const WORKLOAD_IDENTITY_USE_LABEL: &str = "azure.workload.identity/use";
/// Azure Workload Identity's ServiceAccount annotation: the client id of the identity its pods
/// use.
pub const WORKLOAD_IDENTITY_CLIENT_ID_ANNOTATION: &str = "azure.workload.identity/client-id";
/// Azure Workload Identity's ServiceAccount annotation: the identity's tenant (without it, the
/// cluster's default tenant).
pub const WORKLOAD_IDENTITY_TENANT_ID_ANNOTATION: &str = "azure.workload.identity/tenant-id";

/// Finalizer MIC puts on every `AzureAssignedIdentity` it creates.
pub const ASSIGNED_IDENTITY_FINALIZER: &str =
    "azureassignedidentity.finalizers.aadpodidentity.k8s.io";
/// The single label MIC puts on an `AzureAssignedIdentity`: the node name (lowercase key). NMI
/// watches its node's assignments with the label selector `nodename=<node>`.
pub const NODE_NAME_LABEL: &str = "nodename";
/// Namespace of `AzureAssignedIdentity` objects unless namespaced mode applies (then the
/// identity's namespace is used).
pub const DEFAULT_ASSIGNED_IDENTITY_NAMESPACE: &str = "default";

/// How `AzurePodIdentityException.spec.podLabels` is evaluated (upstream `IsPodExcepted`):
/// only exceptions in the pod's own namespace count; the pod is excepted as soon as ANY single
/// `(key, value)` pair of ANY such exception has the same key among the pod's labels with a value
/// equal ignoring ASCII case. It is an OR over pairs, not an all-of label selector.
pub const EXCEPTION_LABEL_SEMANTICS: &str = "any single podLabels pair, same key, value equal ignoring case, exceptions in the pod's namespace only";

/// Value of `AzureAssignedIdentity.status.status`.
///
/// Unknown strings (including the empty string that pre-states MIC versions wrote) are kept in
/// [`AssignedIdentityState::Other`] and written back unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum AssignedIdentityState {
    /// Written at creation time, before the identity is on the node.
    Created,
    /// The identity is confirmed on the node's VM/VMSS (or needs no ARM work).
    Assigned,
    /// Removed from the node; written just before the object is deleted.
    Unassigned,
    /// Any other value, kept verbatim. `Other("")` is a legacy object: NMI treats it as usable,
    /// MIC treats it like `Assigned` for removal.
    Other(String),
}

impl AssignedIdentityState {
    /// The wire string.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Created => "Created",
            Self::Assigned => "Assigned",
            Self::Unassigned => "Unassigned",
            Self::Other(s) => s,
        }
    }

    /// Parses a wire string; never fails (unknown strings become [`Self::Other`]). Exact,
    /// case-sensitive match as upstream.
    pub fn parse(s: &str) -> Self {
        match s {
            "Created" => Self::Created,
            "Assigned" => Self::Assigned,
            "Unassigned" => Self::Unassigned,
            other => Self::Other(other.to_owned()),
        }
    }

    /// `true` for `Assigned` and for the legacy empty state, the states in which upstream NMI
    /// hands out tokens.
    pub fn is_assigned_or_legacy(&self) -> bool {
        match self {
            Self::Assigned => true,
            Self::Other(s) => s.is_empty(),
            _ => false,
        }
    }
}

impl fmt::Display for AssignedIdentityState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for AssignedIdentityState {
    fn from(s: &str) -> Self {
        Self::parse(s)
    }
}

impl serde::Serialize for AssignedIdentityState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for AssignedIdentityState {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
        Ok(Self::parse(&s))
    }
}

impl schemars::JsonSchema for AssignedIdentityState {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "AssignedIdentityState".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string" })
    }

    fn inline_schema() -> bool {
        true
    }
}

/// Name MIC gives the `AzureAssignedIdentity` of one pod and one identity:
/// `<podName>-<podNamespace>-<azureIdentityName>`, plain concatenation, no hashing or truncation
/// (so names can collide and can exceed 253 characters, exactly as upstream).
pub fn assigned_identity_name(pod: &str, pod_namespace: &str, identity: &str) -> String {
    format!("{pod}-{pod_namespace}-{identity}")
}
