//! The decision per pod: the snapshot indexed once as nmi indexes it, nmi's answer for each pod
//! ([`podid_select::select`]) and the token path of each identity, turned into a [`PodReport`].

use std::collections::BTreeSet;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use podid_api::{
    AssignedIdentityState, AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding,
    IdentityType, OperationMode,
};
use podid_imds::{ErrorOptions, IdentitySelector};
use podid_select::assigned::{AssignedBindings, credential_for};
use podid_select::federated::{
    FederatedCredential, PodSubject, confine_federated, federated_credential,
};
use podid_select::matching::{CallerPod, MatchIndex, NoMatch, PendingReason};
use podid_select::workload::{AccountSnapshot, WorkloadAccounts, service_account_name};
use podid_select::{Refusal, Selection, Source};

use super::report::{
    AssignmentReport, Finding, IdentityReport, Level, PodReport, RejectedBinding, Served,
    TokenPath, WorkloadIdentityReport,
};
use super::snapshot::{
    Options, Snapshot, WI_CLIENT_ID_ANNOTATION, WI_TENANT_ID_ANNOTATION, is_workload_identity_pod,
    ns_name, slash,
};

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
    pub(super) snapshot: &'a Snapshot,
    pub(super) options: Options,
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

    pub(super) fn standard(&self) -> bool {
        self.options.matching.mode == OperationMode::Standard
    }

    pub(super) fn live_identity(&self, namespace: &str, name: &str) -> Option<&'a AzureIdentity> {
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
    pub(super) fn confirming_assignment(&self, namespace: &str, name: &str) -> Option<String> {
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
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::{PodSpec, ServiceAccount};

    use super::*;
    use crate::explain::snapshot::WI_USE_LABEL;

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
    /// (`podid_nmi::server::answer` tests) and `podid_select::select`.
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
