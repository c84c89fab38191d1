//! The explanations' output: what a pod gets, by which path and why, and the findings with their
//! fixes, as `status` and `doctor` print them and serialize them to JSON ([`crate::render`]).

use serde::Serialize;

/// How a token is obtained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TokenPath {
    /// Type 0: from the node's IMDS; the identity must be assigned to the VM/VMSS.
    Imds,
    /// Type 1: client secret at Entra.
    EntraSecret,
    /// Type 2: certificate assertion at Entra.
    EntraCertificate,
    /// Switched to federation: a service-account token exchanged at Entra.
    Federated {
        /// `system:serviceaccount:<ns>:<name>`.
        subject: String,
        /// The service account's namespace.
        service_account_namespace: String,
        /// The service account's name.
        service_account: String,
        /// A shared subject (`podid.io/federated-service-account`) rather than the pod's own.
        shared: bool,
    },
    /// Switched to federation with a service account the pod may not use: nmi refuses the
    /// exchange (503) instead of creating that service account's token.
    Refused {
        /// Why, in nmi's words.
        reason: String,
    },
    /// An identity type nmi does not serve.
    Unsupported {
        /// The type number.
        identity_type: i64,
    },
}

impl TokenPath {
    /// Short label for tables.
    pub fn label(&self) -> String {
        match self {
            Self::Imds => "IMDS (VMSS)".to_owned(),
            Self::EntraSecret => "Entra secret".to_owned(),
            Self::EntraCertificate => "Entra certificate".to_owned(),
            Self::Federated { shared: false, .. } => "federated (own SA)".to_owned(),
            Self::Federated { shared: true, .. } => "federated (shared SA)".to_owned(),
            Self::Refused { .. } => "federated (refused)".to_owned(),
            Self::Unsupported { identity_type } => format!("unsupported type {identity_type}"),
        }
    }
}

/// Whether nmi would hand the identity out now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Served {
    /// nmi serves it.
    Yes,
    /// nmi would wait: MIC is assigning it.
    Pending {
        /// Why.
        reason: String,
    },
    /// nmi refuses it.
    No {
        /// Why.
        reason: String,
    },
}

impl Served {
    pub(super) fn label(&self) -> String {
        match self {
            Self::Yes => "served".to_owned(),
            Self::Pending { reason } => format!("pending: {reason}"),
            Self::No { reason } => format!("no: {reason}"),
        }
    }
}

/// One identity a pod is bound to.
#[derive(Debug, Clone, Serialize)]
pub struct IdentityReport {
    /// Identity namespace.
    pub namespace: String,
    /// Identity name.
    pub name: String,
    /// `spec.type` (0, 1, 2).
    pub identity_type: i64,
    /// `spec.clientID`.
    pub client_id: String,
    /// The binding that selects the pod, `<ns>/<name>`.
    pub binding: Option<String>,
    /// `<ns>/<name>` and state of the pod's AzureAssignedIdentity (standard mode).
    pub assignment: Option<AssignmentReport>,
    /// How the token would be obtained (standard mode: as recorded in the assignment).
    pub path: TokenPath,
    /// The path the live identity and binding ask for, when mic has not rewritten the
    /// assignment yet.
    pub pending_switch: Option<String>,
    /// Whether nmi would hand it out now.
    pub served: Served,
}

/// The pod's AzureAssignedIdentity for one identity.
#[derive(Debug, Clone, Serialize)]
pub struct AssignmentReport {
    /// `<ns>/<name>`.
    pub name: String,
    /// `status.status` (empty for legacy objects).
    pub state: String,
}

/// A binding whose selector equals the pod's label but that does not apply.
#[derive(Debug, Clone, Serialize)]
pub struct RejectedBinding {
    /// `<ns>/<name>`.
    pub binding: String,
    /// Why it does not apply.
    pub reason: String,
}

/// The pod's Workload Identity set-up (label and service-account annotation).
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadIdentityReport {
    /// The pod's service account.
    pub service_account: String,
    /// `azure.workload.identity/client-id` of the service account.
    pub client_id: Option<String>,
    /// `azure.workload.identity/tenant-id` of the service account.
    pub tenant_id: Option<String>,
    /// nmi serves the pod's IMDS calls with this identity by federated exchange
    /// (`--serve-workload-identity-pods`, no binding gives the pod an identity, the service
    /// account names a client id).
    pub served_by_nmi: bool,
}

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Worth knowing.
    Info,
    /// Works now, may break or surprise.
    Warning,
    /// The pod does not get a token it is meant to get.
    Error,
}

/// One finding with a concrete fix.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// Severity.
    pub level: Level,
    /// What is the case.
    pub message: String,
    /// What to do about it.
    pub fix: Option<String>,
}

/// Everything about one pod.
#[derive(Debug, Clone, Serialize)]
pub struct PodReport {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `spec.serviceAccountName` (`default` when empty).
    pub service_account: String,
    /// `spec.nodeName`.
    pub node: Option<String>,
    /// `aadpodidbinding` label.
    pub binding_label: Option<String>,
    /// Exceptions that except the pod (`<ns>/<name>`): it gets the node's own identity.
    pub exceptions: Vec<String>,
    /// Identities by bindings (and assignments without a live binding).
    pub identities: Vec<IdentityReport>,
    /// Bindings with the pod's selector that do not apply, and why.
    pub rejected_bindings: Vec<RejectedBinding>,
    /// Workload Identity set-up, when the pod carries `azure.workload.identity/use: "true"`.
    pub workload_identity: Option<WorkloadIdentityReport>,
    /// What nmi answers a request without `client_id`/`msi_res_id`.
    pub default_answer: String,
    /// Findings, most serious first.
    pub findings: Vec<Finding>,
}
