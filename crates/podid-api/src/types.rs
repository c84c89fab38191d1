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

fn object_meta(
    namespace: &str,
    name: &str,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(namespace.to_owned()),
        ..Default::default()
    }
}

impl AzureIdentity {
    /// A type-0 (user-assigned managed identity) object.
    pub fn user_assigned(namespace: &str, name: &str, resource_id: &str, client_id: &str) -> Self {
        Self {
            metadata: object_meta(namespace, name),
            spec: AzureIdentitySpec {
                type_: Some(IdentityType::UserAssignedMsi),
                resource_id: Some(resource_id.to_owned()),
                client_id: Some(client_id.to_owned()),
                ..Default::default()
            },
            status: None,
        }
    }

    /// A service-principal object (type 1 with a secret, type 2 with a certificate) whose
    /// credential is in the Secret `secret` of the identity's namespace.
    pub fn service_principal(
        namespace: &str,
        name: &str,
        type_: IdentityType,
        tenant_id: &str,
        client_id: &str,
        secret: &str,
    ) -> Self {
        Self {
            metadata: object_meta(namespace, name),
            spec: AzureIdentitySpec {
                type_: Some(type_),
                tenant_id: Some(tenant_id.to_owned()),
                client_id: Some(client_id.to_owned()),
                client_password: Some(SecretReference {
                    name: Some(secret.to_owned()),
                    namespace: Some(namespace.to_owned()),
                }),
                ..Default::default()
            },
            status: None,
        }
    }

    /// Adds the annotation `aadpodidentity.k8s.io/Behavior: namespaced`.
    pub fn namespaced(mut self) -> Self {
        self.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(
                BEHAVIOR_ANNOTATION.to_owned(),
                BEHAVIOR_NAMESPACED.to_owned(),
            );
        self
    }
}

impl AzureIdentityBinding {
    /// A binding of pods labelled `aadpodidbinding: <selector>` to the identity `identity` of
    /// the same namespace.
    pub fn for_selector(namespace: &str, name: &str, identity: &str, selector: &str) -> Self {
        Self {
            metadata: object_meta(namespace, name),
            spec: AzureIdentityBindingSpec {
                azure_identity: Some(identity.to_owned()),
                selector: Some(selector.to_owned()),
                ..Default::default()
            },
            status: None,
        }
    }
}

impl AzurePodIdentityException {
    /// An exception for pods carrying any one of `pod_labels`.
    pub fn for_pod_labels(
        namespace: &str,
        name: &str,
        pod_labels: impl IntoIterator<Item = (String, String)>,
    ) -> Self {
        Self {
            metadata: object_meta(namespace, name),
            spec: AzurePodIdentityExceptionSpec {
                metadata: None,
                pod_labels: Some(pod_labels.into_iter().collect()),
            },
            status: None,
        }
    }
}

/// Namespace of the `AzureAssignedIdentity` for `identity`: the identity's namespace when
/// namespaced matching applies (`force_namespaced` or the identity's annotation), otherwise
/// `default` (upstream `makeAssignedIDs`).
pub fn assigned_identity_namespace(identity: &AzureIdentity, force_namespaced: bool) -> String {
    if force_namespaced || identity.is_namespaced() {
        identity.metadata.namespace.clone().unwrap_or_default()
    } else {
        crate::constants::DEFAULT_ASSIGNED_IDENTITY_NAMESPACE.to_owned()
    }
}

impl AzureAssignedIdentity {
    /// The object MIC creates for `pod` (in `pod_namespace`, on `node`) using `identity` through
    /// `binding`: named `<pod>-<podNamespace>-<identity>`, in `namespace` (see
    /// [`assigned_identity_namespace`]), labelled `nodename: <node>`, with the finalizer, full
    /// copies of identity and binding, and status `Created` with `availableReplicas: 1`.
    pub fn for_pod(
        namespace: &str,
        pod: &str,
        pod_namespace: &str,
        node: &str,
        identity: AzureIdentity,
        binding: AzureIdentityBinding,
    ) -> Self {
        let identity_name = identity.metadata.name.clone().unwrap_or_default();
        let mut metadata = object_meta(
            namespace,
            &crate::constants::assigned_identity_name(pod, pod_namespace, &identity_name),
        );
        metadata.labels = Some(BTreeMap::from([(
            crate::constants::NODE_NAME_LABEL.to_owned(),
            node.to_owned(),
        )]));
        metadata.finalizers = Some(vec![
            crate::constants::ASSIGNED_IDENTITY_FINALIZER.to_owned(),
        ]);
        Self {
            metadata,
            spec: AzureAssignedIdentitySpec {
                metadata: None,
                azure_identity_ref: Some(Box::new(identity)),
                azure_binding_ref: Some(Box::new(binding)),
                pod: Some(pod.to_owned()),
                pod_namespace: Some(pod_namespace.to_owned()),
                node_name: Some(node.to_owned()),
                replicas: None,
            },
            status: Some(AzureAssignedIdentityStatus {
                metadata: None,
                status: Some(AssignedIdentityState::Created),
                available_replicas: Some(1),
            }),
        }
    }

    /// The node name from `spec.nodename`.
    pub fn node_name(&self) -> Option<&str> {
        self.spec.node_name.as_deref()
    }
}
