//! Cluster-wide configurations that weaken the namespace boundary, or that nmi refuses because
//! of it, found from plain values (`podidctl doctor` without a pod).
//!
//! A namespace is a trust boundary: whoever may write `AzureIdentity`, `AzureIdentityBinding`
//! or pods in one namespace must not obtain another namespace's credentials. Each finding here
//! names an object through which that could happen, or which nmi refuses for that reason, with
//! the fix. The authority rule is nmi's own ([`podid_broker::authority_allowed`]).

use std::collections::BTreeMap;

use podid_api::{
    AzureIdentity, AzurePodIdentityException, FEDERATED_SERVICE_ACCOUNT_ANNOTATION, IdentityType,
};
use podid_broker::{ALLOWED_AUTHORITIES_FLAG, authority_allowed};
use serde::Serialize;

use crate::explain::{Finding, Level, SecretState, Snapshot};

/// The label podid's own MIC pods carry and its shipped exception matches.
pub const MIC_EXCEPTION_LABEL: (&str, &str) = ("podid.io/component", "mic");

/// What nmi is configured to allow, as far as these checks need it.
#[derive(Debug, Clone, Default)]
pub struct RiskOptions {
    /// nmi's `--allow-cross-namespace-secrets`.
    pub allow_cross_namespace_secrets: bool,
    /// nmi's `--allowed-authorities` (and `--federated-authority-host`).
    pub allowed_authorities: Vec<url::Url>,
    /// The namespace podid is installed in; `None`: found from the shipped MIC exception.
    pub release_namespace: Option<String>,
}

/// The findings, most severe first, and the release namespace they were judged against.
#[derive(Debug, Clone, Serialize)]
pub struct RiskReport {
    /// The namespace podid is installed in (`None` when it could not be told).
    pub release_namespace: Option<String>,
    /// Every finding.
    pub findings: Vec<Finding>,
}

fn ns_name(namespace: Option<&str>, name: Option<&str>) -> String {
    format!(
        "{}/{}",
        namespace.unwrap_or_default(),
        name.unwrap_or_default()
    )
}

fn identity_ref(identity: &AzureIdentity) -> String {
    ns_name(
        identity.metadata.namespace.as_deref(),
        identity.metadata.name.as_deref(),
    )
}

/// The documented Secret keys of an identity type (nmi reads no other).
fn documented_keys(kind: IdentityType) -> &'static [&'static str] {
    match kind {
        IdentityType::ServicePrincipal => &["clientSecret"],
        IdentityType::ServicePrincipalCertificate => &["certificate", "password"],
        _ => &[],
    }
}

/// Every risky or refused configuration visible in `snapshot`.
pub fn risks(snapshot: &Snapshot, options: &RiskOptions) -> RiskReport {
    let mut findings = Vec::new();
    for identity in &snapshot.identities {
        secret_findings(identity, snapshot, options, &mut findings);
        authority_findings(identity, options, &mut findings);
        federated_findings(identity, &mut findings);
    }
    shared_client_ids(&snapshot.identities, &mut findings);
    let release_namespace = options
        .release_namespace
        .clone()
        .or_else(|| shipped_exception_namespace(&snapshot.exceptions));
    exception_findings(
        &snapshot.exceptions,
        release_namespace.as_deref(),
        &mut findings,
    );
    findings.sort_by(|a, b| {
        b.level
            .cmp(&a.level)
            .then_with(|| a.message.cmp(&b.message))
    });
    RiskReport {
        release_namespace,
        findings,
    }
}

fn secret_findings(
    identity: &AzureIdentity,
    snapshot: &Snapshot,
    options: &RiskOptions,
    out: &mut Vec<Finding>,
) {
    let kind = identity.identity_type();
    let keys = documented_keys(kind);
    if keys.is_empty() {
        return;
    }
    let Some(reference) = identity.spec.client_password.as_ref() else {
        return;
    };
    let own = identity.metadata.namespace.clone().unwrap_or_default();
    let secret_ns = reference
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| own.clone());
    let secret_name = reference.name.clone().unwrap_or_default();
    let secret = format!("{secret_ns}/{secret_name}");
    if secret_ns != own {
        out.push(if options.allow_cross_namespace_secrets {
            Finding {
                level: Level::Warning,
                message: format!(
                    "AzureIdentity {} reads Secret {secret} of another namespace (allowed by --allow-cross-namespace-secrets): whoever may write AzureIdentity objects in {own} can have nmi send that Secret's value to the identity's authority",
                    identity_ref(identity)
                ),
                fix: Some(format!(
                    "move the Secret into {own} and point clientPassword at it, then drop --allow-cross-namespace-secrets"
                )),
            }
        } else {
            Finding {
                level: Level::Error,
                message: format!(
                    "AzureIdentity {} names Secret {secret} of another namespace: nmi refuses it (Secrets are read only from the identity's own namespace)",
                    identity_ref(identity)
                ),
                fix: Some(format!(
                    "create the Secret in {own} and set clientPassword.namespace to {own} (or leave it empty)"
                )),
            }
        });
    }
    if let Some(SecretState::Present { keys: present }) = snapshot
        .secrets
        .get(&(secret_ns.clone(), secret_name.clone()))
    {
        let missing: Vec<&str> = keys
            .iter()
            .copied()
            .filter(|k| !present.iter().any(|p| p == k))
            .collect();
        if !missing.is_empty() {
            out.push(Finding {
                level: Level::Error,
                message: format!(
                    "Secret {secret} of AzureIdentity {} lacks {}: nmi reads only the documented keys of a type {} identity ({})",
                    identity_ref(identity),
                    missing.join(", "),
                    kind.as_i64(),
                    keys.join(", ")
                ),
                fix: Some(format!("store the credential under {}", keys.join(" and "))),
            });
        }
    }
}

fn authority_findings(identity: &AzureIdentity, options: &RiskOptions, out: &mut Vec<Finding>) {
    let Some(endpoint) = identity
        .spec
        .ad_endpoint
        .as_deref()
        .map(str::trim)
        .filter(|e| !e.is_empty())
    else {
        return;
    };
    let allowed = url::Url::parse(endpoint)
        .is_ok_and(|url| authority_allowed(&url, &options.allowed_authorities));
    if !allowed {
        out.push(Finding {
            level: Level::Error,
            message: format!(
                "AzureIdentity {} sends its credential to adEndpoint {endpoint:?}, which is not an Entra authority of the Azure clouds nor listed by the operator: nmi refuses it",
                identity_ref(identity)
            ),
            fix: Some(format!(
                "remove adEndpoint (public cloud) or set a cloud's authority; if this server is yours, list it with nmi's {ALLOWED_AUTHORITIES_FLAG}"
            )),
        });
    }
}

fn federated_findings(identity: &AzureIdentity, out: &mut Vec<Finding>) {
    let Some(subject) = identity
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(FEDERATED_SERVICE_ACCOUNT_ANNOTATION))
    else {
        return;
    };
    let own = identity.metadata.namespace.as_deref().unwrap_or_default();
    if let Some((namespace, _)) = subject.split_once('/')
        && namespace != own
    {
        out.push(Finding {
            level: Level::Error,
            message: format!(
                "AzureIdentity {} names service account {subject} of another namespace in {FEDERATED_SERVICE_ACCOUNT_ANNOTATION}: nmi refuses to mint its tokens (the service account must be the pod's own or one in {own})",
                identity_ref(identity)
            ),
            fix: Some(format!(
                "use a service account in {own}, and register its subject as the identity's federated credential"
            )),
        });
    }
}

fn shared_client_ids(identities: &[AzureIdentity], out: &mut Vec<Finding>) {
    let mut by_client: BTreeMap<String, Vec<&AzureIdentity>> = BTreeMap::new();
    for identity in identities {
        if let Some(client_id) = identity.spec.client_id.as_deref().filter(|c| !c.is_empty()) {
            by_client
                .entry(client_id.to_ascii_lowercase())
                .or_default()
                .push(identity);
        }
    }
    for (client_id, list) in by_client {
        let mut namespaces: Vec<&str> = list
            .iter()
            .filter_map(|i| i.metadata.namespace.as_deref())
            .collect();
        namespaces.sort_unstable();
        namespaces.dedup();
        if namespaces.len() < 2 {
            continue;
        }
        let names: Vec<String> = list.iter().map(|i| identity_ref(i)).collect();
        out.push(Finding {
            level: Level::Warning,
            message: format!(
                "client id {client_id} is claimed by identities in {} namespaces ({}): pods of each can use that Azure identity wherever a binding selects them (tokens are never shared between them unless they resolve to the same credential)",
                namespaces.len(),
                names.join(", ")
            ),
            fix: Some(
                "keep one identity per Azure identity, in the namespace that owns it; restrict who may create AzureIdentity objects".to_owned(),
            ),
        });
    }
}

/// The namespace of the exception that matches podid's MIC label, when exactly one does.
pub(crate) fn shipped_exception_namespace(
    exceptions: &[AzurePodIdentityException],
) -> Option<String> {
    let mut namespaces: Vec<&str> = exceptions
        .iter()
        .filter(|e| {
            e.spec.pod_labels.as_ref().is_some_and(|labels| {
                labels.get(MIC_EXCEPTION_LABEL.0).map(String::as_str) == Some(MIC_EXCEPTION_LABEL.1)
            })
        })
        .filter_map(|e| e.metadata.namespace.as_deref())
        .collect();
    namespaces.sort_unstable();
    namespaces.dedup();
    match namespaces.as_slice() {
        [one] => Some((*one).to_owned()),
        _ => None,
    }
}

fn exception_findings(
    exceptions: &[AzurePodIdentityException],
    release_namespace: Option<&str>,
    out: &mut Vec<Finding>,
) {
    for exception in exceptions {
        let namespace = exception.metadata.namespace.as_deref().unwrap_or_default();
        if release_namespace == Some(namespace) {
            continue;
        }
        let labels: Vec<String> = exception
            .spec
            .pod_labels
            .iter()
            .flatten()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let aks_addon = exception.metadata.name.as_deref() == Some("aks-addon-exception")
            && namespace == "kube-system";
        out.push(Finding {
            level: if aks_addon { Level::Info } else { Level::Warning },
            message: format!(
                "AzurePodIdentityException {} outside the release namespace{}: any pod in {namespace} labelled {} reaches the node's own identities, bypassing bindings",
                ns_name(Some(namespace), exception.metadata.name.as_deref()),
                release_namespace
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_else(|| " (unknown: pass --release-namespace)".to_owned()),
                labels.join(" or ")
            ),
            fix: Some(format!(
                "delete it unless {namespace} is meant to hold node-level agents, and allow only operators to create pods there"
            )),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::SecretReference;

    fn snapshot(identities: Vec<AzureIdentity>) -> Snapshot {
        Snapshot {
            identities,
            ..Snapshot::default()
        }
    }

    fn sp(namespace: &str, name: &str, client_id: &str, secret_ns: Option<&str>) -> AzureIdentity {
        let mut identity = AzureIdentity::service_principal(
            namespace,
            name,
            IdentityType::ServicePrincipal,
            "tenant",
            client_id,
            "creds",
        );
        identity.spec.client_password = Some(SecretReference {
            name: Some("creds".into()),
            namespace: secret_ns.map(str::to_owned),
        });
        identity
    }

    fn levels(report: &RiskReport) -> Vec<(Level, String)> {
        report
            .findings
            .iter()
            .map(|f| (f.level, f.message.clone()))
            .collect()
    }

    #[test]
    fn a_secret_of_another_namespace_is_an_error_or_with_the_flag_a_warning() {
        let s = snapshot(vec![sp("evil", "steal", "c1", Some("default"))]);
        let report = risks(&s, &RiskOptions::default());
        let found = levels(&report);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, Level::Error);
        assert!(found[0].1.contains("default/creds"), "{found:?}");
        let report = risks(
            &s,
            &RiskOptions {
                allow_cross_namespace_secrets: true,
                ..RiskOptions::default()
            },
        );
        assert_eq!(levels(&report)[0].0, Level::Warning);
        // Its own namespace: nothing to say.
        let s = snapshot(vec![sp("team", "ok", "c1", Some("team"))]);
        assert!(risks(&s, &RiskOptions::default()).findings.is_empty());
    }

    #[test]
    fn undocumented_secret_keys_are_named() {
        let mut s = snapshot(vec![sp("team", "sp", "c1", None)]);
        s.secrets.insert(
            ("team".into(), "creds".into()),
            SecretState::Present {
                keys: vec![".dockerconfigjson".into()],
            },
        );
        let found = levels(&risks(&s, &RiskOptions::default()));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].1.contains("lacks clientSecret"), "{found:?}");
    }

    #[test]
    fn authorities_outside_the_clouds_and_the_list_are_errors() {
        let mut attacker = sp("evil", "a", "c1", None);
        attacker.spec.ad_endpoint = Some("https://attacker.example/".into());
        let mut cloud = sp("team", "b", "c2", None);
        cloud.spec.ad_endpoint = Some("https://login.microsoftonline.us/".into());
        let mut listed = sp("team", "c", "c3", None);
        listed.spec.ad_endpoint = Some("https://entra.internal.example/".into());
        let s = snapshot(vec![attacker, cloud, listed]);
        let found = levels(&risks(&s, &RiskOptions::default()));
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found.iter().all(|(l, _)| *l == Level::Error));
        let options = RiskOptions {
            allowed_authorities: vec![
                url::Url::parse("https://entra.internal.example/").expect("url"),
            ],
            ..RiskOptions::default()
        };
        let found = levels(&risks(&s, &options));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].1.contains("attacker.example"));
    }

    #[test]
    fn one_client_id_in_two_namespaces_is_a_warning() {
        let s = snapshot(vec![
            sp("team-a", "x", "AAAA-1", None),
            sp("team-b", "y", "aaaa-1", None),
            sp("team-a", "z", "bbbb-2", None),
            sp("team-a", "w", "bbbb-2", None),
        ]);
        let found = levels(&risks(&s, &RiskOptions::default()));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].1.contains("team-a/x") && found[0].1.contains("team-b/y"));
    }

    #[test]
    fn federated_service_accounts_of_other_namespaces_are_errors() {
        let mut identity = sp("evil", "f", "c1", None);
        identity
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(
                FEDERATED_SERVICE_ACCOUNT_ANNOTATION.into(),
                "kube-system/admin".into(),
            );
        let found = levels(&risks(&snapshot(vec![identity]), &RiskOptions::default()));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].1.contains("kube-system/admin"));
    }

    #[test]
    fn exceptions_outside_the_release_namespace_are_reported() {
        let mic = AzurePodIdentityException::for_pod_labels(
            "identity",
            "mic",
            [(
                MIC_EXCEPTION_LABEL.0.to_owned(),
                MIC_EXCEPTION_LABEL.1.to_owned(),
            )],
        );
        let stray = AzurePodIdentityException::for_pod_labels(
            "team-a",
            "bypass",
            [("app".to_owned(), "web".to_owned())],
        );
        let aks = AzurePodIdentityException::for_pod_labels(
            "kube-system",
            "aks-addon-exception",
            [(
                "kubernetes.azure.com/managedby".to_owned(),
                "aks".to_owned(),
            )],
        );
        let s = Snapshot {
            exceptions: vec![mic, stray, aks],
            ..Snapshot::default()
        };
        let report = risks(&s, &RiskOptions::default());
        assert_eq!(report.release_namespace.as_deref(), Some("identity"));
        let found = levels(&report);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].0, Level::Warning);
        assert!(found[0].1.contains("team-a/bypass"));
        assert_eq!(found[1].0, Level::Info);
        // Told the release namespace is kube-system, the AKS exception is at home.
        let report = risks(
            &s,
            &RiskOptions {
                release_namespace: Some("kube-system".into()),
                ..RiskOptions::default()
            },
        );
        let found = levels(&report);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found.iter().any(|(_, m)| m.contains("identity/mic")));
    }
}
