//! The findings of a pod's report: each problem its explanation shows (labels, bindings,
//! assignments, exceptions, federation, Workload Identity, Secrets), with a concrete fix.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Pod;
use podid_api::{FEDERATED_SERVICE_ACCOUNT_ANNOTATION, POD_LABEL_KEY};
use podid_imds::IdentitySelector;
use podid_select::matching::CallerPod;
use podid_select::{Refusal, Selection};

use super::explainer::Explainer;
use super::report::{
    Finding, IdentityReport, Level, RejectedBinding, Served, TokenPath, WorkloadIdentityReport,
};
use super::snapshot::{
    SecretState, WI_CLIENT_ID_ANNOTATION, WI_TENANT_ID_ANNOTATION, WI_USE_LABEL,
};

impl<'a> Explainer<'a> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn findings(
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
