//! The explanations' input: the cluster's objects as plain values (read by [`crate::cluster`]),
//! nmi's options as the CLI was told, and the predicates and references the reading needs (which
//! pods to list, which Secrets to look at).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use podid_api::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzurePodIdentityException,
    IdentityType, POD_LABEL_KEY,
};
use podid_select::matching::MatchOptions;
use serde::Serialize;

/// Pod label that opts a pod into Azure Workload Identity.
pub const WI_USE_LABEL: &str = podid_api::WORKLOAD_IDENTITY_USE_LABEL;
/// ServiceAccount annotation naming the Workload Identity client id.
pub const WI_CLIENT_ID_ANNOTATION: &str = podid_api::WORKLOAD_IDENTITY_CLIENT_ID_ANNOTATION;
/// ServiceAccount annotation naming the Workload Identity tenant id.
pub const WI_TENANT_ID_ANNOTATION: &str = podid_api::WORKLOAD_IDENTITY_TENANT_ID_ANNOTATION;

/// What a Secret referenced by an identity looks like (never its content).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum SecretState {
    /// It exists with these data keys.
    Present {
        /// Names of the keys in `data`.
        keys: Vec<String>,
    },
    /// The API server says it does not exist.
    Missing,
    /// It could not be read (for example no RBAC to read Secrets).
    Unknown {
        /// Why.
        reason: String,
    },
}

/// Every object the explanations need, as read from the cluster.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Pods in scope.
    pub pods: Vec<Pod>,
    /// All `AzureIdentity` objects.
    pub identities: Vec<AzureIdentity>,
    /// All `AzureIdentityBinding` objects.
    pub bindings: Vec<AzureIdentityBinding>,
    /// All `AzureAssignedIdentity` objects.
    pub assignments: Vec<AzureAssignedIdentity>,
    /// All `AzurePodIdentityException` objects.
    pub exceptions: Vec<AzurePodIdentityException>,
    /// Service accounts by (namespace, name); absent from the map means not read, `None` means
    /// it does not exist.
    pub service_accounts: BTreeMap<(String, String), Option<ServiceAccount>>,
    /// Secrets referenced by identities of type 1 and 2, by (namespace, name).
    pub secrets: BTreeMap<(String, String), SecretState>,
}

/// nmi's matching options as the CLI was told.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Matching mode and `--forceNamespaced`.
    pub matching: MatchOptions,
    /// nmi's `--serve-workload-identity-pods`.
    pub serve_workload_identity_pods: bool,
    /// nmi runs with `--federated-default-tenant-id` (Workload Identity service accounts
    /// without a tenant annotation can be served).
    pub federated_default_tenant: bool,
}

pub(super) fn ns_name<K: kube::Resource>(obj: &K) -> (String, String) {
    let meta = obj.meta();
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

pub(super) fn slash((ns, name): &(String, String)) -> String {
    format!("{ns}/{name}")
}

/// Whether the pod carries `azure.workload.identity/use: "true"`.
pub fn is_workload_identity_pod(pod: &Pod) -> bool {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(WI_USE_LABEL))
        .is_some_and(|v| v == "true")
}

/// Whether `status` should list the pod: it has an `aadpodidbinding` label or the Workload
/// Identity label.
pub fn is_identity_pod(pod: &Pod) -> bool {
    pod.metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(POD_LABEL_KEY))
        || is_workload_identity_pod(pod)
}

/// The Secrets (namespace, name) referenced by identities of type 1 and 2.
pub fn referenced_secrets(identities: &[AzureIdentity]) -> BTreeSet<(String, String)> {
    identities
        .iter()
        .filter(|i| {
            matches!(
                i.identity_type(),
                IdentityType::ServicePrincipal | IdentityType::ServicePrincipalCertificate
            )
        })
        .filter_map(|i| {
            let r = i.spec.client_password.as_ref()?;
            let name = r.name.clone().filter(|n| !n.is_empty())?;
            let ns = r
                .namespace
                .clone()
                .filter(|n| !n.is_empty())
                .or_else(|| i.metadata.namespace.clone())?;
            Some((ns, name))
        })
        .collect()
}
