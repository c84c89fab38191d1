//! Types of the `aadpodidentity.k8s.io/v1` custom resources (`AzureIdentity`,
//! `AzureIdentityBinding`, `AzureAssignedIdentity`, `AzurePodIdentityException`), the label,
//! annotation, finalizer and state names shared by NMI and MIC, the operation mode, and CRD
//! generation.
//!
//! Wire format and names are upstream aad-pod-identity v1.8.17's exactly; objects written by the
//! Go components (with their odd embedded `metadata` in `spec`/`status`, explicit `null`s and
//! unknown identity types) parse and serialize back unchanged.
//!
//! Must not depend on a Kubernetes client, tokio, hyper or any IO (the `crdgen` binary does the
//! file IO). `kube` is used for its `CustomResource` derive only.

mod constants;
pub mod crd;
mod mode;
mod types;
mod wire;

pub use constants::{
    API_VERSION, ASSIGNED_IDENTITY_FINALIZER, AssignedIdentityState, BEHAVIOR_ANNOTATION,
    BEHAVIOR_NAMESPACED, DEFAULT_ASSIGNED_IDENTITY_NAMESPACE, EXCEPTION_LABEL_SEMANTICS,
    FEDERATED_SERVICE_ACCOUNT_ANNOTATION, GROUP, NODE_NAME_LABEL, POD_LABEL_KEY,
    TOKEN_SOURCE_ANNOTATION, VERSION, WORKLOAD_IDENTITY_CLIENT_ID_ANNOTATION,
    WORKLOAD_IDENTITY_TENANT_ID_ANNOTATION, WORKLOAD_IDENTITY_USE_LABEL, assigned_identity_name,
};
pub use mode::OperationMode;
pub use types::{
    AzureAssignedIdentity, AzureAssignedIdentitySpec, AzureAssignedIdentityStatus, AzureIdentity,
    AzureIdentityBinding, AzureIdentityBindingSpec, AzureIdentityBindingStatus, AzureIdentitySpec,
    AzureIdentityStatus, AzurePodIdentityException, AzurePodIdentityExceptionSpec,
    AzurePodIdentityExceptionStatus, assigned_identity_namespace,
};
pub use wire::{EmbeddedMeta, IdentityType};

/// Re-exported so users need not name k8s-openapi for the secret reference type.
pub use k8s_openapi::api::core::v1::SecretReference;
