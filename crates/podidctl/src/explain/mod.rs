//! What each pod gets and why, from plain values. The decision is nmi's own
//! ([`podid_select::select`], over the same matcher, recorded bindings, federated switch and
//! Workload Identity rules); this module only reports it and adds findings with fixes.
//!
//! The parts: the input, the cluster's objects as read (`snapshot`); the decision per pod
//! (`explainer`); the findings with their fixes (`findings`); and the output, the report
//! rendered and serialized by [`crate::render`] (`report`).

mod explainer;
mod findings;
mod report;
mod snapshot;

pub use explainer::{Explainer, token_path};
pub use report::{
    AssignmentReport, Finding, IdentityReport, Level, PodReport, RejectedBinding, Served,
    TokenPath, WorkloadIdentityReport,
};
pub use snapshot::{
    Options, SecretState, Snapshot, WI_CLIENT_ID_ANNOTATION, WI_TENANT_ID_ANNOTATION, WI_USE_LABEL,
    is_identity_pod, is_workload_identity_pod, referenced_secrets,
};
