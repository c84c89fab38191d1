//! The four `aadpodidentity.k8s.io/v1` kinds.
//!
//! JSON keys are upstream's exactly (`resourceID`, `clientID`, lowercase `nodename` …). Every
//! field is optional on input so that any object upstream accepted parses; absent fields stay
//! absent and explicit `null`s stay `null` when written back.
//!
//! Upstream has no status subresource: `status` is an ordinary part of the object, written with
//! the main resource (PUT or JSON patch of `/status/status`), never through `/status`.

use crate::constants::{AssignedIdentityState, BEHAVIOR_ANNOTATION, BEHAVIOR_NAMESPACED};
use crate::wire::{EmbeddedMeta, IdentityType, go_int, nullable};
use k8s_openapi::api::core::v1::SecretReference;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// An Azure identity pods may use: a user-assigned managed identity (type 0) or a service
/// principal (types 1 and 2).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "aadpodidentity.k8s.io",
    version = "v1",
    kind = "AzureIdentity",
    doc = "An Azure identity pods may use (aadpodidentity.k8s.io/v1 AzureIdentity).",
    plural = "azureidentities",
    singular = "azureidentity",
    namespaced,
    status = "AzureIdentityStatus",
    derive = "PartialEq",
    derive = "Default",
    printcolumn = r#"{"name":"Type","type":"string","jsonPath":".spec.type"}"#,
    printcolumn = r#"{"name":"ClientID","type":"string","jsonPath":".spec.clientID"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AzureIdentitySpec {
    /// Upstream's embedded Go `ObjectMeta`; unused, kept as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<EmbeddedMeta>,
    /// 0 user-assigned managed identity, 1 service principal (secret), 2 service principal
    /// (certificate). Absent means 0, as in Go (omitted zero value).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<IdentityType>,
    /// ARM resource id of the user-assigned identity (type 0).
    #[serde(
        default,
        rename = "resourceID",
        skip_serializing_if = "Option::is_none"
    )]
    pub resource_id: Option<String>,
    /// Client (application) id; used by every type.
    #[serde(default, rename = "clientID", skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Types 1 and 2: the Secret holding the client secret or the PKCS#12 certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_password: Option<SecretReference>,
    /// Types 1 and 2: primary tenant id.
    #[serde(default, rename = "tenantID", skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    /// Type 1: extra tenants for a multi-tenant token. May be `null`.
    #[serde(
        default,
        rename = "auxiliaryTenantIDs",
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    pub auxiliary_tenant_ids: Option<Option<Vec<String>>>,
    /// Declared upstream, never read.
    #[serde(
        default,
        rename = "adResourceID",
        skip_serializing_if = "Option::is_none"
    )]
    pub ad_resource_id: Option<String>,
    /// Types 1 and 2: authority base URL; empty means the public cloud.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ad_endpoint: Option<String>,
    /// Declared upstream, unused. May be `null`.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    pub replicas: Option<Option<i32>>,
}

/// Status of an AzureIdentity (unused upstream).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AzureIdentityStatus {
    /// Upstream's embedded Go `ObjectMeta`; unused, kept as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<EmbeddedMeta>,
    /// Unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_replicas: Option<i32>,
}

impl AzureIdentity {
    /// `true` when the annotation `aadpodidentity.k8s.io/Behavior` is exactly `namespaced`.
    pub fn is_namespaced(&self) -> bool {
        self.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(BEHAVIOR_ANNOTATION))
            .is_some_and(|v| v == BEHAVIOR_NAMESPACED)
    }

    /// The identity type; an absent `type` is 0 (user-assigned managed identity).
    pub fn identity_type(&self) -> IdentityType {
        self.spec.identity_type()
    }
}

impl AzureIdentitySpec {
    /// The identity type; an absent `type` is 0 (user-assigned managed identity).
    pub fn identity_type(&self) -> IdentityType {
        self.type_.unwrap_or_default()
    }

    /// `auxiliaryTenantIDs`, empty when absent or `null`.
    pub fn auxiliary_tenant_ids(&self) -> &[String] {
        match &self.auxiliary_tenant_ids {
            Some(Some(v)) => v,
            _ => &[],
        }
    }
}

/// Binds pods whose `aadpodidbinding` label equals `selector` to the `AzureIdentity` named
/// `azureIdentity` in the binding's own namespace.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "aadpodidentity.k8s.io",
    version = "v1",
    kind = "AzureIdentityBinding",
    doc = "Binds pods labelled aadpodidbinding=<selector> to an AzureIdentity.",
    plural = "azureidentitybindings",
    singular = "azureidentitybinding",
    namespaced,
    status = "AzureIdentityBindingStatus",
    derive = "PartialEq",
    derive = "Default",
    printcolumn = r#"{"name":"AzureIdentity","type":"string","jsonPath":".spec.azureIdentity"}"#,
    printcolumn = r#"{"name":"Selector","type":"string","jsonPath":".spec.selector"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AzureIdentityBindingSpec {
    /// Upstream's embedded Go `ObjectMeta`; unused, kept as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<EmbeddedMeta>,
    /// Name of an `AzureIdentity` in the binding's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure_identity: Option<String>,
    /// Compared for exact, case-sensitive equality with the pod label `aadpodidbinding`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Declared upstream, never read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "go_int")]
    pub weight: Option<i64>,
}

/// Status of an AzureIdentityBinding (unused upstream).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AzureIdentityBindingStatus {
    /// Upstream's embedded Go `ObjectMeta`; unused, kept as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<EmbeddedMeta>,
    /// Unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_replicas: Option<i32>,
}

/// One identity assigned for one pod on one node; written only by MIC.
///
/// Named `<pod>-<podNamespace>-<identity>`, labelled `nodename: <node>`, carrying the finalizer
/// `azureassignedidentity.finalizers.aadpodidentity.k8s.io`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "aadpodidentity.k8s.io",
    version = "v1",
    kind = "AzureAssignedIdentity",
    doc = "One identity assigned for one pod on one node, written by MIC.",
    plural = "azureassignedidentities",
    singular = "azureassignedidentity",
    namespaced,
    status = "AzureAssignedIdentityStatus",
    derive = "PartialEq",
    derive = "Default"
)]
#[serde(rename_all = "camelCase")]
pub struct AzureAssignedIdentitySpec {
    /// Upstream's embedded Go `ObjectMeta`; unused, kept as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<EmbeddedMeta>,
    /// Full copy of the `AzureIdentity` at assignment time (with `apiVersion`, `kind`, full
    /// `metadata` incl. `resourceVersion`). NMI mints tokens from this copy.
    #[serde(
        default,
        rename = "azureIdentityRef",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(extend("x-kubernetes-embedded-resource" = true))]
    pub azure_identity_ref: Option<Box<AzureIdentity>>,
    /// Full copy of the `AzureIdentityBinding` at assignment time.
    #[serde(
        default,
        rename = "azureBindingRef",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(extend("x-kubernetes-embedded-resource" = true))]
    pub azure_binding_ref: Option<Box<AzureIdentityBinding>>,
    /// Pod name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Pod namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    /// Node name (lowercase key `nodename`, unlike the other keys).
    #[serde(default, rename = "nodename", skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Unused. May be `null`.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Option::is_none"
    )]
    pub replicas: Option<Option<i32>>,
}

/// Status of an AzureAssignedIdentity.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AzureAssignedIdentityStatus {
    /// Upstream's embedded Go `ObjectMeta`; unused, kept as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<EmbeddedMeta>,
    /// `Created`, `Assigned`, `Unassigned`, or `""` on objects from pre-states MIC versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<AssignedIdentityState>,
    /// MIC always writes `1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_replicas: Option<i32>,
}

impl AzureAssignedIdentity {
    /// The assignment state; an absent status or state reads as the legacy empty state.
    pub fn state(&self) -> AssignedIdentityState {
        self.status
            .as_ref()
            .and_then(|s| s.status.clone())
            .unwrap_or_else(|| AssignedIdentityState::Other(String::new()))
    }
}

/// Pods matched by `podLabels` get tokens from NMI without identity checks.
///
/// Only exceptions in the pod's namespace count; any single pair whose key is among the pod's
/// labels with a value equal ignoring case excepts the pod.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "aadpodidentity.k8s.io",
    version = "v1",
    kind = "AzurePodIdentityException",
    doc = "Pods whose labels match podLabels get tokens from NMI without identity checks.",
    plural = "azurepodidentityexceptions",
    singular = "azurepodidentityexception",
    namespaced,
    status = "AzurePodIdentityExceptionStatus",
    derive = "PartialEq",
    derive = "Default"
)]
#[serde(rename_all = "camelCase")]
pub struct AzurePodIdentityExceptionSpec {
    /// Upstream's embedded Go `ObjectMeta`; unused, kept as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<EmbeddedMeta>,
    /// Label pairs; any single matching pair excepts a pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_labels: Option<BTreeMap<String, String>>,
}

/// Status of an AzurePodIdentityException (unused upstream).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AzurePodIdentityExceptionStatus {
    /// Upstream's embedded Go `ObjectMeta`; unused, kept as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<EmbeddedMeta>,
    /// Unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

impl AzurePodIdentityException {
    /// `true` when any single `podLabels` pair has the same key among `pod_labels` with a value
    /// equal ignoring ASCII case (upstream `IsPodExcepted`). The caller must only pass exceptions
    /// from the pod's own namespace.
    pub fn excepts(&self, pod_labels: &BTreeMap<String, String>) -> bool {
        self.spec.pod_labels.as_ref().is_some_and(|wanted| {
            wanted.iter().any(|(k, v)| {
                pod_labels
                    .get(k)
                    .is_some_and(|have| have.eq_ignore_ascii_case(v))
            })
        })
    }
}
