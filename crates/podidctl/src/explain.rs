//! What each pod gets and why, from plain values. The decision is nmi's own
//! ([`podid_select::select`], over the same matcher, recorded bindings, federated switch and
//! Workload Identity rules); this module only reports it and adds findings with fixes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use podid_api::{
    AssignedIdentityState, AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding,
    AzurePodIdentityException, FEDERATED_SERVICE_ACCOUNT_ANNOTATION, IdentityType, OperationMode,
    POD_LABEL_KEY,
};
use podid_imds::{ErrorOptions, IdentitySelector};
use podid_select::assigned::{AssignedBindings, credential_for};
use podid_select::federated::{
    FederatedCredential, PodSubject, confine_federated, federated_credential,
};
use podid_select::matching::{CallerPod, MatchIndex, MatchOptions, NoMatch, PendingReason};
use podid_select::workload::{AccountSnapshot, WorkloadAccounts, service_account_name};
use podid_select::{Refusal, Selection, Source};
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
    fn label(&self) -> String {
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

fn ns_name<K: kube::Resource>(obj: &K) -> (String, String) {
    let meta = obj.meta();
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

fn slash((ns, name): &(String, String)) -> String {
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

fn type_number(identity: &AzureIdentity) -> i64 {
    identity.identity_type().as_i64()
}

/// The token path of `identity` for `pod` through `binding`, using nmi's federated switch and
/// its trust boundary (the subject must be the pod's own service account or one in the
/// identity's namespace).
pub fn token_path(
    identity: &AzureIdentity,
    binding: Option<&AzureIdentityBinding>,
    pod: &CallerPod,
) -> TokenPath {
    let identity_ns = identity.metadata.namespace.as_deref().unwrap_or("default");
    let subject = PodSubject {
        namespace: &pod.namespace,
        name: &pod.name,
        uid: "",
        service_account: &pod.service_account,
    };
    let credential = federated_credential(
        identity.metadata.annotations.as_ref(),
        identity_ns,
        binding.and_then(|b| b.metadata.annotations.as_ref()),
        subject,
    )
    .map(|chosen| confine_federated(chosen, identity_ns, subject));
    path_of(identity, credential, pod)
}

/// The token path of `identity` for `pod` given the federated switch's answer for them.
fn path_of(
    identity: &AzureIdentity,
    credential: Option<Result<FederatedCredential, String>>,
    pod: &CallerPod,
) -> TokenPath {
    match credential {
        Some(Ok(FederatedCredential { subject, .. })) => {
            // Shared: the annotation chose the subject, not the pod's own service account.
            let own = subject.namespace == pod.namespace
                && (subject.service_account == pod.service_account
                    || (pod.service_account.is_empty() && subject.service_account == "default"));
            return TokenPath::Federated {
                subject: subject.subject(),
                service_account_namespace: subject.namespace.clone(),
                service_account: subject.service_account.clone(),
                shared: !own,
            };
        }
        Some(Err(reason)) => return TokenPath::Refused { reason },
        _ => {}
    }
    match identity.identity_type() {
        IdentityType::UserAssignedMsi => TokenPath::Imds,
        IdentityType::ServicePrincipal => TokenPath::EntraSecret,
        IdentityType::ServicePrincipalCertificate => TokenPath::EntraCertificate,
        _ => TokenPath::Unsupported {
            identity_type: type_number(identity),
        },
    }
}

/// The cluster's objects indexed once, answering per pod.
#[derive(Debug)]
pub struct Explainer<'a> {
    snapshot: &'a Snapshot,
    options: Options,
    index: MatchIndex,
    assigned: AssignedBindings,
    accounts: AccountSnapshot,
}

impl<'a> Explainer<'a> {
    /// Index `snapshot` as nmi would.
    pub fn new(snapshot: &'a Snapshot, options: Options) -> Self {
        let index = MatchIndex::new(
            options.matching,
            snapshot.identities.iter().cloned().map(Arc::new),
            snapshot.bindings.iter().cloned().map(Arc::new),
            snapshot.assignments.iter().cloned().map(Arc::new),
            snapshot.exceptions.iter().cloned().map(Arc::new),
        );
        Self {
            snapshot,
            options,
            index,
            assigned: AssignedBindings::new(&snapshot.assignments),
            // An account that could not be read counts as missing.
            accounts: AccountSnapshot::new(snapshot.service_accounts.values().flatten()),
        }
    }

    /// The matcher.
    pub fn index(&self) -> &MatchIndex {
        &self.index
    }

    /// What nmi decides for `pod` asking with `selector` ([`podid_select::select`]).
    pub fn selection(&self, pod: &CallerPod, selector: &IdentitySelector<'_>) -> Selection {
        let snapshot = podid_select::Snapshot {
            index: &self.index,
            assigned: &self.assigned,
            workload: self
                .options
                .serve_workload_identity_pods
                .then_some(&self.accounts as &dyn WorkloadAccounts),
            federated_default_tenant: self.options.federated_default_tenant,
        };
        podid_select::select(&snapshot, pod, selector)
    }

    fn standard(&self) -> bool {
        self.options.matching.mode == OperationMode::Standard
    }

    fn live_identity(&self, namespace: &str, name: &str) -> Option<&'a AzureIdentity> {
        self.snapshot.identities.iter().find(|i| {
            i.metadata.namespace.as_deref() == Some(namespace)
                && i.metadata.name.as_deref() == Some(name)
        })
    }

    fn live_binding(&self, namespace: &str, name: &str) -> Option<&'a AzureIdentityBinding> {
        self.snapshot.bindings.iter().find(|b| {
            b.metadata.namespace.as_deref() == Some(namespace)
                && b.metadata.name.as_deref() == Some(name)
        })
    }

    fn pod_assignments(&self, pod: &CallerPod) -> Vec<&'a AzureAssignedIdentity> {
        self.snapshot
            .assignments
            .iter()
            .filter(|a| {
                a.spec.pod.as_deref() == Some(pod.name.as_str())
                    && a.spec.pod_namespace.as_deref() == Some(pod.namespace.as_str())
            })
            .collect()
    }

    /// Pods (of the snapshot) that `identity` `<ns>/<name>` applies to through a binding, with
    /// that binding; excepted pods (they get the node's identities) are left out.
    pub fn pods_using(
        &self,
        namespace: &str,
        name: &str,
    ) -> Vec<(&'a Pod, Arc<AzureIdentityBinding>)> {
        let mut out = Vec::new();
        for pod in &self.snapshot.pods {
            let caller = CallerPod::of(pod);
            if self.index.is_excepted(&caller) {
                continue;
            }
            for (binding, identity) in self.index.pod_bindings(&caller) {
                if identity.metadata.namespace.as_deref() == Some(namespace)
                    && identity.metadata.name.as_deref() == Some(name)
                {
                    out.push((pod, binding));
                }
            }
        }
        out
    }

    fn served(&self, pod: &CallerPod, identity: &AzureIdentity) -> Served {
        let client_id = identity.spec.client_id.clone().unwrap_or_default();
        let selection = self.selection(pod, &IdentitySelector::ClientId(client_id.as_str().into()));
        match selection {
            Selection::Identity { identity: got, .. }
                if got.metadata.namespace == identity.metadata.namespace
                    && got.metadata.name == identity.metadata.name =>
            {
                Served::Yes
            }
            Selection::Identity { identity: got, .. } => Served::No {
                reason: format!(
                    "nmi answers client_id {client_id} with {}/{} (same client id)",
                    got.metadata.namespace.as_deref().unwrap_or_default(),
                    got.metadata.name.as_deref().unwrap_or_default()
                ),
            },
            Selection::Wait(PendingReason::AssignmentCreated) => Served::Pending {
                reason: "AzureAssignedIdentity is Created, MIC is assigning it".to_owned(),
            },
            Selection::Wait(PendingReason::AwaitingAssignment) => Served::Pending {
                reason: "no AzureAssignedIdentity yet, waiting for MIC".to_owned(),
            },
            Selection::Node(_) => Served::No {
                reason: "pod is excepted: nmi serves the node's identities instead".to_owned(),
            },
            Selection::Workload(_) => Served::No {
                reason: "nmi serves the pod as a Workload Identity pod instead".to_owned(),
            },
            Selection::Refused(Refusal::FederatedConfined { reason, .. }) => Served::No { reason },
            Selection::Refused(_) => Served::No {
                reason: "the assignment is not usable".to_owned(),
            },
        }
    }

    /// Explain `pod`.
    pub fn explain(&self, pod: &Pod) -> PodReport {
        let caller = CallerPod::of(pod);
        let service_account = service_account_name(&caller).to_owned();
        let mut findings = Vec::new();
        let label = caller.binding_label().map(str::to_owned);
        let exceptions: Vec<String> = self
            .snapshot
            .exceptions
            .iter()
            .filter(|e| {
                e.metadata.namespace.as_deref() == Some(caller.namespace.as_str())
                    && e.excepts(&caller.labels)
            })
            .map(|e| slash(&ns_name(e)))
            .collect();

        let bound = self.index.pod_bindings(&caller);
        let mut identities = Vec::new();
        let assignments = self.pod_assignments(&caller);
        let mut covered: BTreeSet<(String, String)> = BTreeSet::new();
        for (binding, identity) in &bound {
            let key = ns_name(&**identity);
            if !covered.insert(key.clone()) {
                continue;
            }
            identities.push(self.identity_report(
                &caller,
                identity,
                Some(&**binding),
                &assignments,
            ));
        }
        // Assignments whose identity no live binding gives the pod: nmi may still serve them
        // (standard mode reads the copies) until MIC deletes them.
        if self.standard() {
            for assignment in &assignments {
                let Some(identity) = assignment.spec.azure_identity_ref.as_deref() else {
                    continue;
                };
                let key = ns_name(identity);
                if !covered.insert(key.clone()) {
                    continue;
                }
                let binding = assignment.spec.azure_binding_ref.as_deref();
                let report = self.identity_report(&caller, identity, binding, &assignments);
                findings.push(Finding {
                    level: Level::Warning,
                    message: format!(
                        "AzureAssignedIdentity {} gives the pod {} although no current binding selects it ({})",
                        report
                            .assignment
                            .as_ref()
                            .map(|a| a.name.clone())
                            .unwrap_or_default(),
                        slash(&key),
                        report.served.label()
                    ),
                    fix: Some(
                        "MIC removes stale assignments on its next pass; check that mic is running and leading".to_owned(),
                    ),
                });
                identities.push(report);
            }
        }

        let rejected_bindings = self.rejected_bindings(&caller, &bound);
        let workload_identity = is_workload_identity_pod(pod).then(|| {
            let sa = self
                .snapshot
                .service_accounts
                .get(&(caller.namespace.clone(), service_account.clone()))
                .cloned()
                .flatten();
            let annotation = |key: &str| {
                sa.as_ref()
                    .and_then(|s| s.metadata.annotations.as_ref())
                    .and_then(|a| a.get(key))
                    .cloned()
            };
            let client_id = annotation(WI_CLIENT_ID_ANNOTATION)
                .map(|c| c.trim().to_owned())
                .filter(|c| !c.is_empty());
            WorkloadIdentityReport {
                service_account: service_account.clone(),
                served_by_nmi: matches!(
                    self.selection(&caller, &IdentitySelector::None),
                    Selection::Workload(_)
                ),
                client_id,
                tenant_id: annotation(WI_TENANT_ID_ANNOTATION),
            }
        });

        let default_answer = self.default_answer(&caller);

        self.findings(
            pod,
            &caller,
            &exceptions,
            &identities,
            &rejected_bindings,
            workload_identity.as_ref(),
            &mut findings,
        );
        findings.sort_by_key(|f| std::cmp::Reverse(f.level));
        PodReport {
            namespace: caller.namespace.clone(),
            name: caller.name.clone(),
            service_account,
            node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            binding_label: label,
            exceptions,
            identities,
            rejected_bindings,
            workload_identity,
            default_answer,
            findings,
        }
    }

    /// What nmi answers `caller` asking without `client_id`/`msi_res_id`.
    fn default_answer(&self, caller: &CallerPod) -> String {
        match self.selection(caller, &IdentitySelector::None) {
            Selection::Workload(grant) => format!(
                "client id {} by federated exchange for {} (Workload Identity pod)",
                grant.account.client_id,
                grant.credential.subject.subject()
            ),
            Selection::Node(_) => {
                "the node's own identity (excepted, no identity checks)".to_owned()
            }
            Selection::Identity { identity, source } => {
                let (ns, name) = ns_name(&*identity);
                let federated = match source {
                    Source::Usual => "",
                    Source::Federated(_) => ", by federated exchange",
                };
                format!(
                    "{ns}/{name} (client id {}{federated})",
                    identity.spec.client_id.as_deref().unwrap_or_default()
                )
            }
            Selection::Wait(PendingReason::AssignmentCreated) => {
                "waits: MIC is assigning the identity".to_owned()
            }
            Selection::Wait(PendingReason::AwaitingAssignment) => {
                "waits: MIC has not written the assignment yet".to_owned()
            }
            Selection::Refused(Refusal::NoMatch(NoMatch::NoIdentityForPod)) => {
                "404: no identity for this pod".to_owned()
            }
            Selection::Refused(Refusal::NoMatch(other)) => format!("no token ({other:?})"),
            Selection::Refused(refusal) => {
                let error = refusal.to_imds_error(caller);
                format!(
                    "{}: {error}",
                    error.status(ErrorOptions::default()).as_u16()
                )
            }
        }
    }

    fn identity_report(
        &self,
        caller: &CallerPod,
        identity: &AzureIdentity,
        binding: Option<&AzureIdentityBinding>,
        assignments: &[&AzureAssignedIdentity],
    ) -> IdentityReport {
        let (ns, name) = ns_name(identity);
        let recorded = assignments.iter().copied().find(|a| {
            a.spec
                .azure_identity_ref
                .as_deref()
                .is_some_and(|i| ns_name(i) == (ns.clone(), name.clone()))
        });
        let assignment = recorded.map(|a| AssignmentReport {
            name: slash(&ns_name(a)),
            state: a.state().as_str().to_owned(),
        });
        let live_identity = self.live_identity(&ns, &name).unwrap_or(identity);
        let live_binding = binding.map(|b| {
            let (bns, bname) = ns_name(b);
            self.live_binding(&bns, &bname).unwrap_or(b)
        });
        // The path nmi takes (in standard mode the copies recorded in the pod's assignment
        // decide, and mic rewrites them when the switch changes), and the one the live objects
        // ask for.
        let live_path = token_path(live_identity, live_binding, caller);
        let nmi_identity = match recorded.and_then(|a| a.spec.azure_identity_ref.as_deref()) {
            Some(copy) if self.standard() => copy,
            _ => identity,
        };
        let path = path_of(
            nmi_identity,
            credential_for(&self.index, &self.assigned, caller, "", nmi_identity),
            caller,
        );
        let pending_switch = (path != live_path).then(|| live_path.label());
        let served = match &path {
            TokenPath::Refused { reason } => Served::No {
                reason: reason.clone(),
            },
            _ => self.served(caller, identity),
        };
        IdentityReport {
            namespace: ns.clone(),
            name: name.clone(),
            identity_type: type_number(live_identity),
            client_id: live_identity.spec.client_id.clone().unwrap_or_default(),
            binding: live_binding.map(|b| slash(&ns_name(b))),
            assignment,
            path,
            pending_switch,
            served,
        }
    }

    fn rejected_bindings(
        &self,
        caller: &CallerPod,
        bound: &[(Arc<AzureIdentityBinding>, Arc<AzureIdentity>)],
    ) -> Vec<RejectedBinding> {
        let Some(label) = caller.binding_label() else {
            return Vec::new();
        };
        let managed = self.options.matching.mode == OperationMode::Managed;
        let mut out = Vec::new();
        for binding in &self.snapshot.bindings {
            if binding.spec.selector.as_deref() != Some(label) {
                continue;
            }
            let key = ns_name(binding);
            if bound.iter().any(|(b, _)| ns_name(&**b) == key) {
                continue;
            }
            let (bns, _) = &key;
            let reason = match binding.spec.azure_identity.as_deref() {
                None | Some("") => "spec.azureIdentity is empty".to_owned(),
                Some(identity_name) => match self.live_identity(bns, identity_name) {
                    None => format!("AzureIdentity {bns}/{identity_name} does not exist"),
                    Some(_) if managed => format!(
                        "managed mode: only bindings in the pod's namespace {} count",
                        caller.namespace
                    ),
                    Some(identity) if self.options.matching.force_namespaced => format!(
                        "--forceNamespaced: identity {}/{} and binding must be in the pod's namespace {}",
                        bns,
                        identity.metadata.name.as_deref().unwrap_or_default(),
                        caller.namespace
                    ),
                    Some(_) => format!(
                        "AzureIdentity {bns}/{identity_name} is namespaced (aadpodidentity.k8s.io/Behavior: namespaced): binding and identity must be in the pod's namespace {}",
                        caller.namespace
                    ),
                },
            };
            out.push(RejectedBinding {
                binding: slash(&key),
                reason,
            });
        }
        out
    }

    /// `<ns>/<name>` of an assignment of identity `namespace/name` (any pod) that is
    /// `Created`: mic is confirming that identity through ARM.
    fn confirming_assignment(&self, namespace: &str, name: &str) -> Option<String> {
        self.snapshot
            .assignments
            .iter()
            .find(|a| {
                a.state() == AssignedIdentityState::Created
                    && a.spec.azure_identity_ref.as_deref().is_some_and(|i| {
                        i.metadata.namespace.as_deref() == Some(namespace)
                            && i.metadata.name.as_deref() == Some(name)
                    })
            })
            .map(|a| {
                format!(
                    "{}/{}",
                    a.metadata.namespace.as_deref().unwrap_or_default(),
                    a.metadata.name.as_deref().unwrap_or_default()
                )
            })
    }

    #[allow(clippy::too_many_arguments)]
    fn findings(
        &self,
        pod: &Pod,
        caller: &CallerPod,
        exceptions: &[String],
        identities: &[IdentityReport],
        rejected: &[RejectedBinding],
        wi: Option<&WorkloadIdentityReport>,
        out: &mut Vec<Finding>,
    ) {
        let pod_ref = format!("{}/{}", caller.namespace, caller.name);
        let spec = pod.spec.as_ref();
        if spec.and_then(|s| s.host_network).unwrap_or(false) {
            out.push(Finding {
                level: Level::Error,
                message: "the pod uses hostNetwork: its requests carry the node's IP, so nmi cannot tell it apart and serves it nothing".to_owned(),
                fix: Some("run the pod without hostNetwork, or move it to Workload Identity (its SDK then talks to Entra directly)".to_owned()),
            });
        }
        if !exceptions.is_empty() {
            out.push(Finding {
                level: Level::Info,
                message: format!(
                    "excepted by {}: nmi serves the node's own identities to this pod without identity checks",
                    exceptions.join(", ")
                ),
                fix: Some("if the pod should use its bound identity instead, remove the label the exception matches".to_owned()),
            });
        }
        let label = caller.binding_label();
        if label.is_none() && wi.is_none() && exceptions.is_empty() {
            out.push(Finding {
                level: Level::Error,
                message: format!("the pod has no {POD_LABEL_KEY} label: no binding can select it"),
                fix: Some(format!(
                    "add the label to the pod template: {POD_LABEL_KEY}: <selector of an AzureIdentityBinding>"
                )),
            });
        }
        if let Some(label) = label
            && identities.is_empty()
            && exceptions.is_empty()
        {
            let fix = if rejected.is_empty() {
                format!(
                    "create an AzureIdentityBinding in namespace {} with spec.selector: {label} and spec.azureIdentity: <identity>",
                    caller.namespace
                )
            } else {
                "see the rejected bindings above: create the missing identity or move binding and identity into the pod's namespace".to_owned()
            };
            out.push(Finding {
                level: Level::Error,
                message: format!(
                    "no AzureIdentityBinding with selector {label:?} applies to the pod: nmi answers 404"
                ),
                fix: Some(fix),
            });
        }
        for r in rejected {
            out.push(Finding {
                level: Level::Warning,
                message: format!("binding {} does not apply: {}", r.binding, r.reason),
                fix: Some(
                    "create the identity it names, or a binding and identity in the pod's namespace"
                        .to_owned(),
                ),
            });
        }
        let distinct: BTreeSet<&str> = identities.iter().map(|i| i.client_id.as_str()).collect();
        if identities.len() > 1 {
            let first = identities
                .iter()
                .find(|i| i.served == Served::Yes)
                .map(|i| format!("{}/{}", i.namespace, i.name))
                .unwrap_or_else(|| "none yet".to_owned());
            out.push(Finding {
                level: Level::Warning,
                message: format!(
                    "{} identities apply ({} client ids); a request without client_id or msi_res_id gets the first usable one in namespace/name order ({first})",
                    identities.len(),
                    distinct.len()
                ),
                fix: Some("make the application name the identity it wants (client_id or msi_res_id), or remove the extra binding".to_owned()),
            });
        }
        for id in identities {
            let name = format!("{}/{}", id.namespace, id.name);
            if self.standard() && exceptions.is_empty() {
                let confirming = self.confirming_assignment(&id.namespace, &id.name);
                match (&id.assignment, &id.served) {
                    // mic confirms one assignment per identity and VM/VMSS through ARM and
                    // creates the others, `Assigned`, once ARM has the identity.
                    (None, Served::Pending { .. }) if confirming.is_some() => out.push(Finding {
                        level: Level::Warning,
                        message: format!(
                            "no AzureAssignedIdentity for {pod_ref} and {name} yet: MIC is assigning the identity (AzureAssignedIdentity {} is Created) and creates this pod's assignment once ARM confirms it",
                            confirming.unwrap_or_default()
                        ),
                        fix: Some("wait; if it stays Created, read mic's logs for the ARM error on the node's VM/VMSS".to_owned()),
                    }),
                    (None, Served::Pending { .. }) | (None, Served::No { .. }) => out.push(Finding {
                        level: Level::Error,
                        message: format!("no AzureAssignedIdentity for {pod_ref} and {name}: MIC has not assigned it"),
                        fix: Some("check that mic runs and holds the leader lease (kubectl logs -n <mic namespace> deploy/mic); the pod must be scheduled to a node".to_owned()),
                    }),
                    (Some(a), Served::Pending { .. }) => out.push(Finding {
                        level: Level::Warning,
                        message: format!("AzureAssignedIdentity {} is {}: MIC is still assigning {name} to the node", a.name, a.state),
                        fix: Some("wait; if it stays Created, read mic's logs for the ARM error on the node's VM/VMSS".to_owned()),
                    }),
                    (Some(a), Served::No { reason }) => out.push(Finding {
                        level: Level::Error,
                        message: format!("AzureAssignedIdentity {} ({}) is not usable: {reason}", a.name, a.state),
                        fix: Some("MIC recreates it on its next pass; check mic's logs".to_owned()),
                    }),
                    _ => {}
                }
            }
            if let Some(next) = &id.pending_switch {
                out.push(Finding {
                    level: Level::Warning,
                    message: format!(
                        "{name}: the live objects ask for {next}, but the pod's assignment still records {}; nmi follows the assignment",
                        id.path.label()
                    ),
                    fix: Some("mic rewrites the assignment on its next pass; check that mic runs and leads".to_owned()),
                });
            }
            match &id.path {
                TokenPath::EntraSecret | TokenPath::EntraCertificate => {
                    self.secret_findings(&name, id, out);
                }
                TokenPath::Federated {
                    subject,
                    service_account_namespace,
                    service_account,
                    shared,
                } => {
                    let key = (service_account_namespace.clone(), service_account.clone());
                    match self.snapshot.service_accounts.get(&key) {
                        Some(None) => out.push(Finding {
                            level: Level::Error,
                            message: format!("{name} is federated with subject {subject}, but service account {service_account_namespace}/{service_account} does not exist: nmi answers 403"),
                            fix: Some(format!("kubectl create serviceaccount -n {service_account_namespace} {service_account}")),
                        }),
                        _ => out.push(Finding {
                            level: Level::Info,
                            message: format!(
                                "{name} is federated: nmi exchanges a token of {subject}{} at Entra",
                                if *shared { " (shared subject)" } else { " (bound to this pod)" }
                            ),
                            fix: Some(format!(
                                "Entra must hold a federated credential on client id {} with that subject, audience api://AzureADTokenExchange and this cluster's issuer: podidctl migrate {} -n {} prints it",
                                id.client_id, id.name, id.namespace
                            )),
                        }),
                    }
                    let tenant = self
                        .live_identity(&id.namespace, &id.name)
                        .and_then(|i| i.spec.tenant_id.clone())
                        .filter(|t| !t.is_empty());
                    if tenant.is_none() {
                        out.push(Finding {
                            level: Level::Warning,
                            message: format!("{name} has no spec.tenantID: nmi uses the cluster's default tenant for the exchange, and answers 503 without one"),
                            fix: Some("set spec.tenantID on the identity, or start nmi with --federated-default-tenant-id <tenant>".to_owned()),
                        });
                    }
                }
                TokenPath::Refused { reason } => out.push(Finding {
                    level: Level::Error,
                    message: format!("{name}: nmi refuses the federated exchange and answers 503: {reason}"),
                    fix: Some(format!(
                        "remove {FEDERATED_SERVICE_ACCOUNT_ANNOTATION} to use the pod's own service account, or name one in namespace {}",
                        id.namespace
                    )),
                }),
                TokenPath::Unsupported { identity_type } => out.push(Finding {
                    level: Level::Error,
                    message: format!("{name} has type {identity_type}, which nmi does not serve"),
                    fix: Some(
                        "set spec.type to 0 (managed identity), 1 (secret) or 2 (certificate)"
                            .to_owned(),
                    ),
                }),
                TokenPath::Imds => {}
            }
        }
        if let Some(wi) = wi {
            match &wi.client_id {
                None => out.push(Finding {
                    level: Level::Error,
                    message: format!("the pod is labelled {WI_USE_LABEL}: \"true\" but service account {}/{} has no {WI_CLIENT_ID_ANNOTATION} annotation", caller.namespace, wi.service_account),
                    fix: Some(format!("kubectl annotate serviceaccount -n {} {} {WI_CLIENT_ID_ANNOTATION}=<client id>", caller.namespace, wi.service_account)),
                }),
                Some(client_id) => out.push(Finding {
                    level: Level::Info,
                    message: format!("Workload Identity: the pod's SDK exchanges its projected token of system:serviceaccount:{}:{} for client id {client_id}", caller.namespace, wi.service_account),
                    fix: None,
                }),
            }
            if wi.served_by_nmi {
                out.push(Finding {
                    level: Level::Info,
                    message: "nmi (--serve-workload-identity-pods) serves the pod's IMDS calls with the same identity by federated exchange; a client_id other than the service account's gets 404, msi_res_id/object_id get 400".to_owned(),
                    fix: None,
                });
            } else if let Selection::Refused(refusal @ Refusal::Workload(_)) =
                self.selection(caller, &IdentitySelector::None)
            {
                out.push(Finding {
                    level: Level::Error,
                    message: format!(
                        "nmi (--serve-workload-identity-pods) refuses the pod's IMDS calls: {}",
                        refusal.to_imds_error(caller)
                    ),
                    fix: Some(format!(
                        "annotate service account {}/{} with {WI_CLIENT_ID_ANNOTATION} (and {WI_TENANT_ID_ANNOTATION}, or start nmi with --federated-default-tenant-id)",
                        caller.namespace, wi.service_account
                    )),
                });
            } else if self.options.serve_workload_identity_pods && wi.client_id.is_some() {
                out.push(Finding {
                    level: Level::Info,
                    message: "a binding gives the pod an identity, so nmi serves its IMDS calls through the binding, not as a Workload Identity pod".to_owned(),
                    fix: Some(format!("remove the {POD_LABEL_KEY} label once the application uses the Workload Identity SDK path")),
                });
            }
        }
    }

    fn secret_findings(&self, name: &str, id: &IdentityReport, out: &mut Vec<Finding>) {
        let Some(identity) = self.live_identity(&id.namespace, &id.name) else {
            return;
        };
        let Some(reference) = identity.spec.client_password.as_ref() else {
            out.push(Finding {
                level: Level::Error,
                message: format!("{name} (type {}) has no spec.clientPassword", id.identity_type),
                fix: Some("set spec.clientPassword.name and .namespace to the Secret holding the credential".to_owned()),
            });
            return;
        };
        let sns = reference
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| id.namespace.clone());
        let sname = reference.name.clone().unwrap_or_default();
        let create = if id.path == TokenPath::EntraCertificate {
            format!(
                "kubectl create secret generic -n {sns} {sname} --from-file=certificate=<identity.pfx> --from-literal=password=<pfx password>"
            )
        } else {
            format!(
                "kubectl create secret generic -n {sns} {sname} --from-literal=clientsecret=<client secret>"
            )
        };
        match self.snapshot.secrets.get(&(sns.clone(), sname.clone())) {
            Some(SecretState::Missing) => out.push(Finding {
                level: Level::Error,
                message: format!(
                    "{name}: Secret {sns}/{sname} does not exist: nmi cannot get a token"
                ),
                fix: Some(create),
            }),
            Some(SecretState::Present { keys }) => {
                let missing: Vec<&str> = if id.path == TokenPath::EntraCertificate {
                    ["certificate"]
                        .into_iter()
                        .filter(|k| !keys.iter().any(|h| h == k))
                        .collect()
                } else if keys.is_empty() {
                    vec!["<client secret>"]
                } else {
                    Vec::new()
                };
                if missing.is_empty() {
                    out.push(Finding {
                        level: Level::Info,
                        message: format!(
                            "{name}: Secret {sns}/{sname} is present (keys: {})",
                            keys.join(", ")
                        ),
                        fix: None,
                    });
                } else {
                    out.push(Finding {
                        level: Level::Error,
                        message: format!(
                            "{name}: Secret {sns}/{sname} lacks {}",
                            missing.join(", ")
                        ),
                        fix: Some(create),
                    });
                }
            }
            Some(SecretState::Unknown { reason }) => out.push(Finding {
                level: Level::Warning,
                message: format!("{name}: Secret {sns}/{sname} could not be read ({reason})"),
                fix: Some(
                    "run podidctl with permission to get Secrets in that namespace to check it"
                        .to_owned(),
                ),
            }),
            None => {}
        }
    }
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

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::PodSpec;

    use super::*;

    const CLIENT: &str = "cccccccc-0000-4000-8000-00000000000c";

    fn wi_pod() -> Pod {
        let mut pod = Pod::default();
        pod.metadata.namespace = Some("apps".into());
        pod.metadata.name = Some("web".into());
        pod.metadata.labels = Some([(WI_USE_LABEL.to_owned(), "true".to_owned())].into());
        pod.spec = Some(PodSpec {
            service_account_name: Some("web".into()),
            ..PodSpec::default()
        });
        pod
    }

    fn account(annotations: &[(&str, &str)]) -> Option<ServiceAccount> {
        let mut account = ServiceAccount::default();
        account.metadata.namespace = Some("apps".into());
        account.metadata.name = Some("web".into());
        account.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        );
        Some(account)
    }

    fn explain_wi(account: Option<ServiceAccount>) -> PodReport {
        let snapshot = Snapshot {
            pods: vec![wi_pod()],
            service_accounts: [(("apps".to_owned(), "web".to_owned()), account)].into(),
            ..Snapshot::default()
        };
        let options = Options {
            serve_workload_identity_pods: true,
            ..Options::default()
        };
        Explainer::new(&snapshot, options).explain(&snapshot.pods[0])
    }

    /// nmi refuses (403) a Workload Identity pod whose service account names no tenant when it
    /// runs without `--federated-default-tenant-id`; podidctl used to say it was served.
    #[test]
    fn a_workload_identity_account_without_a_tenant_is_refused_as_nmi_refuses_it() {
        let report = explain_wi(account(&[(WI_CLIENT_ID_ANNOTATION, CLIENT)]));
        assert!(
            report.default_answer.starts_with("403"),
            "{}",
            report.default_answer
        );
        assert!(
            report
                .default_answer
                .contains("--federated-default-tenant-id"),
            "{}",
            report.default_answer
        );
        let wi = report.workload_identity.expect("labelled");
        assert!(!wi.served_by_nmi);
        // With a tenant on the account nmi serves it.
        let report = explain_wi(account(&[
            (WI_CLIENT_ID_ANNOTATION, CLIENT),
            (WI_TENANT_ID_ANNOTATION, "tenant-a"),
        ]));
        assert!(
            report.default_answer.contains(CLIENT),
            "{}",
            report.default_answer
        );
        assert!(report.workload_identity.expect("labelled").served_by_nmi);
    }

    /// The shared selection cases through podidctl's own path (its snapshot, `CallerPod::of`,
    /// the explainer's selection): the same answers as nmi's request path
    /// (`podid_nmi::server` tests) and `podid_select::select`.
    #[test]
    fn podidctl_decides_every_shared_selection_case_as_nmi() {
        use podid_select::cases::{Outcome, cases};

        for case in cases() {
            let snapshot = Snapshot {
                pods: vec![case.pod.clone()],
                identities: case.identities.clone(),
                bindings: case.bindings.clone(),
                assignments: case.assignments.clone(),
                exceptions: case.exceptions.clone(),
                service_accounts: case
                    .service_accounts
                    .iter()
                    .map(|a| (ns_name(a), Some(a.clone())))
                    .collect(),
                secrets: BTreeMap::new(),
            };
            let options = Options {
                matching: case.options,
                serve_workload_identity_pods: case.serve_workload_identity_pods,
                federated_default_tenant: case.federated_default_tenant,
            };
            let explainer = Explainer::new(&snapshot, options);
            let caller = CallerPod::of(&snapshot.pods[0]);
            let selection = explainer.selection(&caller, &case.query.selector());
            let outcome = Outcome::of(&selection, |refusal| {
                refusal
                    .to_imds_error(&caller)
                    .status(ErrorOptions::default())
                    .as_u16()
            });
            assert_eq!(outcome, case.expected, "{}: {selection:?}", case.name);
            // The report agrees with the selection it is built from.
            let report = explainer.explain(&snapshot.pods[0]);
            if case.query == podid_select::cases::Query::None {
                let served_by_nmi = report.workload_identity.is_some_and(|w| w.served_by_nmi);
                assert_eq!(
                    served_by_nmi,
                    matches!(outcome, Outcome::Workload { .. }),
                    "{}",
                    case.name
                );
            }
        }
    }

    /// nmi says a missing service account does not exist; podidctl used to call it
    /// unannotated.
    #[test]
    fn a_missing_workload_identity_account_is_reported_as_nmi_reports_it() {
        let report = explain_wi(None);
        assert!(
            report.default_answer.starts_with("403")
                && report.default_answer.contains("does not exist"),
            "{}",
            report.default_answer
        );
    }
}
