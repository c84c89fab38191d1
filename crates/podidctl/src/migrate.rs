//! The migration plan of one identity: service-account annotations, federated identity
//! credentials (az CLI and ARM/Graph JSON), the annotation flip, verification and the later move
//! to the Workload Identity SDK — each step with its rollback. Pure: values in, text out.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use podid_api::{
    AzureIdentity, AzureIdentityBinding, FEDERATED_SERVICE_ACCOUNT_ANNOTATION, IdentityType,
    TOKEN_SOURCE_ANNOTATION,
};
use podid_select::federated::{
    FederatedCredential, PodSubject, confine_federated, federated_credential,
};
use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::explain::{WI_CLIENT_ID_ANNOTATION, WI_TENANT_ID_ANNOTATION};
use podid_select::matching::CallerPod;

/// Entra's limit of federated identity credentials per identity.
pub const MAX_FEDERATED_CREDENTIALS: usize = 20;
/// Audience of the exchanged service-account tokens.
pub const AUDIENCE: &str = "api://AzureADTokenExchange";
/// ARM api-version used for `federatedIdentityCredentials`.
pub const FIC_API_VERSION: &str = "2023-01-31";

/// What the plan is computed from.
#[derive(Debug)]
pub struct Input<'a> {
    /// The identity to migrate.
    pub identity: &'a AzureIdentity,
    /// Pods the identity applies to, each with the binding that selects it.
    pub users: Vec<(&'a Pod, Arc<AzureIdentityBinding>)>,
    /// Known service accounts (`None`: does not exist; absent: unknown).
    pub service_accounts: &'a BTreeMap<(String, String), Option<ServiceAccount>>,
    /// The cluster's service-account issuer.
    pub issuer: String,
    /// `--shared-service-account`: `<name>` or `<namespace>/<name>`.
    pub shared_service_account: Option<String>,
    /// `--tenant-id`, for identities without `spec.tenantID`.
    pub tenant_id: Option<String>,
}

/// One federated subject and the pods that present it.
#[derive(Debug, Clone, Serialize)]
pub struct Subject {
    /// The service account's namespace.
    pub namespace: String,
    /// The service account's name.
    pub service_account: String,
    /// `system:serviceaccount:<ns>:<name>`.
    pub subject: String,
    /// Name of its federated identity credential.
    pub credential_name: String,
    /// `<ns>/<pod>` of the pods using it.
    pub pods: Vec<String>,
}

/// One step: what to run and how to undo it.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// Title.
    pub title: String,
    /// Explanations.
    pub notes: Vec<String>,
    /// Commands (or documents) to apply, in order.
    pub apply: Vec<String>,
    /// Commands that undo the step, in order.
    pub rollback: Vec<String>,
}

/// The whole plan.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// `<ns>/<name>` of the identity.
    pub identity: String,
    /// Its client id.
    pub client_id: String,
    /// The issuer used.
    pub issuer: String,
    /// Subjects to register.
    pub subjects: Vec<Subject>,
    /// Pods whose binding keeps them on the old path, with why.
    pub opted_out: Vec<String>,
    /// Warnings to read before starting.
    pub warnings: Vec<String>,
    /// The steps, in order.
    pub steps: Vec<Step>,
}

/// Quotes `s` for a POSIX shell when needed.
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@,+%".contains(c));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A federated identity credential name for a subject: `podid-<ns>-<sa>`, restricted to
/// letters, digits, `-` and `_` and at most 120 characters (Entra's rules), with a hash suffix
/// when shortened.
pub fn credential_name(namespace: &str, service_account: &str) -> String {
    let raw = format!("podid-{namespace}-{service_account}");
    let clean: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if clean.len() <= 120 && clean == raw {
        return clean;
    }
    let digest = Sha256::digest(raw.as_bytes());
    let hash: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    let keep: String = clean.chars().take(120 - 9).collect();
    format!("{keep}-{hash}")
}

/// Subscription, resource group and name of a user-assigned identity's ARM id.
fn parse_resource_id(id: &str) -> Option<(String, String, String)> {
    let parts: Vec<&str> = id.trim_matches('/').split('/').collect();
    let find = |key: &str| {
        parts
            .iter()
            .position(|p| p.eq_ignore_ascii_case(key))
            .and_then(|i| parts.get(i + 1))
            .map(|s| (*s).to_owned())
    };
    Some((
        find("subscriptions")?,
        find("resourcegroups")?,
        find("userAssignedIdentities")?,
    ))
}

fn annotations_with_flip(
    identity: &AzureIdentity,
    shared: Option<&str>,
) -> BTreeMap<String, String> {
    let mut a = identity.metadata.annotations.clone().unwrap_or_default();
    a.insert(TOKEN_SOURCE_ANNOTATION.to_owned(), "federated".to_owned());
    if let Some(shared) = shared {
        a.insert(
            FEDERATED_SERVICE_ACCOUNT_ANNOTATION.to_owned(),
            shared.to_owned(),
        );
    }
    a
}

/// Computes the plan.
pub fn plan(input: &Input<'_>) -> Plan {
    let identity = input.identity;
    let ns = identity.metadata.namespace.clone().unwrap_or_default();
    let name = identity.metadata.name.clone().unwrap_or_default();
    let client_id = identity.spec.client_id.clone().unwrap_or_default();
    let tenant = identity
        .spec
        .tenant_id
        .clone()
        .filter(|t| !t.is_empty())
        .or_else(|| input.tenant_id.clone());
    let flipped = annotations_with_flip(identity, input.shared_service_account.as_deref());
    let mut warnings = Vec::new();
    let mut opted_out = Vec::new();

    let mut subjects: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    if let Some(shared) = &input.shared_service_account {
        let key = match shared.split_once('/') {
            Some((sns, sname)) => (sns.to_owned(), sname.to_owned()),
            None => (ns.clone(), shared.clone()),
        };
        // nmi refuses a shared subject outside the identity's namespace (except for pods whose
        // own service account it is), so the plan never asks Entra to trust one.
        if key.0 == ns {
            subjects.entry(key).or_default();
        } else {
            warnings.push(format!(
                "the shared service account {}/{} is not in the identity's namespace {ns}: nmi refuses the exchange for every pod but those running as it; use one in {ns}",
                key.0, key.1
            ));
        }
    }
    for (pod, binding) in &input.users {
        let caller = CallerPod::of(pod);
        let pod_ref = format!("{}/{}", caller.namespace, caller.name);
        let subject = PodSubject {
            namespace: &caller.namespace,
            name: &caller.name,
            uid: "",
            service_account: &caller.service_account,
        };
        let credential = federated_credential(
            Some(&flipped),
            &ns,
            binding.metadata.annotations.as_ref(),
            subject,
        )
        .map(|chosen| confine_federated(chosen, &ns, subject));
        match credential {
            Some(Err(reason)) => warnings.push(format!("{pod_ref}: nmi would refuse: {reason}")),
            Some(Ok(FederatedCredential { subject, .. })) => {
                subjects
                    .entry((subject.namespace.clone(), subject.service_account.clone()))
                    .or_default()
                    .insert(pod_ref);
            }
            _ => opted_out.push(format!(
                "{pod_ref}: binding {}/{} sets {TOKEN_SOURCE_ANNOTATION} to something other than federated, so it stays on the current path",
                binding.metadata.namespace.as_deref().unwrap_or_default(),
                binding.metadata.name.as_deref().unwrap_or_default()
            )),
        }
    }
    let subjects: Vec<Subject> = subjects
        .into_iter()
        .map(|((sns, sname), pods)| Subject {
            subject: format!("system:serviceaccount:{sns}:{sname}"),
            credential_name: credential_name(&sns, &sname),
            namespace: sns,
            service_account: sname,
            pods: pods.into_iter().collect(),
        })
        .collect();

    if input.users.is_empty() {
        warnings.push(format!(
            "no pod uses {ns}/{name} right now: the plan registers no per-pod subject; pass --shared-service-account to register one up front"
        ));
    }
    if subjects.len() > MAX_FEDERATED_CREDENTIALS {
        warnings.push(format!(
            "{} subjects need {} federated credentials, but Entra allows {MAX_FEDERATED_CREDENTIALS} per identity: rerun with --shared-service-account <name> so every pod presents one subject",
            subjects.len(),
            subjects.len()
        ));
    }
    if tenant.is_none() {
        warnings.push(format!(
            "{ns}/{name} has no spec.tenantID: nmi exchanges with the cluster's default tenant (nmi --federated-default-tenant-id, set it before the flip) and the service-account annotation below omits the tenant; pass --tenant-id to include it"
        ));
    }
    if identity.identity_type() == IdentityType::UserAssignedMsi
        && identity
            .spec
            .resource_id
            .as_deref()
            .and_then(parse_resource_id)
            .is_none()
    {
        warnings.push(format!(
            "spec.resourceID of {ns}/{name} is not a user-assigned identity id; fill in <resource-group> and <identity-name> below"
        ));
    }

    let steps = vec![
        sa_step(
            input,
            &subjects,
            &client_id,
            tenant.as_deref(),
            &mut warnings,
        ),
        fic_step(identity, &subjects, &input.issuer, &client_id),
        flip_step(identity, input.shared_service_account.as_deref()),
        verify_step(identity, &subjects),
        sdk_step(&subjects, &client_id),
    ];
    Plan {
        identity: format!("{ns}/{name}"),
        client_id,
        issuer: input.issuer.clone(),
        subjects,
        opted_out,
        warnings,
        steps,
    }
}

fn sa_step(
    input: &Input<'_>,
    subjects: &[Subject],
    client_id: &str,
    tenant: Option<&str>,
    warnings: &mut Vec<String>,
) -> Step {
    let mut apply = Vec::new();
    let mut rollback = Vec::new();
    let mut notes = vec![
        "Annotate each subject's service account for Workload Identity. nmi does not need these annotations; the SDKs do once an application moves to Workload Identity (step 5), and they document which identity the account stands for.".to_owned(),
    ];
    for s in subjects {
        let key = (s.namespace.clone(), s.service_account.clone());
        let sa_ref = format!(
            "-n {} {}",
            shell_quote(&s.namespace),
            shell_quote(&s.service_account)
        );
        let existing = input.service_accounts.get(&key);
        match existing {
            Some(None) => {
                apply.push(format!("kubectl create serviceaccount {sa_ref}"));
                rollback.push(format!("kubectl delete serviceaccount {sa_ref}"));
            }
            None => notes.push(format!(
                "service account {}/{} could not be read; create it if it does not exist",
                s.namespace, s.service_account
            )),
            Some(Some(_)) => {}
        }
        let current = existing
            .and_then(|sa| sa.as_ref())
            .and_then(|sa| sa.metadata.annotations.as_ref())
            .and_then(|a| a.get(WI_CLIENT_ID_ANNOTATION));
        if let Some(current) = current
            && !current.eq_ignore_ascii_case(client_id)
        {
            warnings.push(format!(
                "service account {}/{} already names client id {current} in {WI_CLIENT_ID_ANNOTATION}; annotating it with {client_id} changes what Workload Identity SDKs in its pods use",
                s.namespace, s.service_account
            ));
        }
        let mut set = format!(
            "kubectl annotate serviceaccount {sa_ref} --overwrite {WI_CLIENT_ID_ANNOTATION}={}",
            shell_quote(client_id)
        );
        let mut unset =
            format!("kubectl annotate serviceaccount {sa_ref} {WI_CLIENT_ID_ANNOTATION}-");
        if let Some(tenant) = tenant {
            let _ = write!(set, " {WI_TENANT_ID_ANNOTATION}={}", shell_quote(tenant));
            let _ = write!(unset, " {WI_TENANT_ID_ANNOTATION}-");
        }
        apply.push(set);
        match current {
            Some(previous) => rollback.push(format!(
                "kubectl annotate serviceaccount {sa_ref} --overwrite {WI_CLIENT_ID_ANNOTATION}={}",
                shell_quote(previous)
            )),
            None => {
                if !matches!(existing, Some(None)) {
                    rollback.push(unset);
                }
            }
        }
    }
    rollback.reverse();
    Step {
        title: "Service accounts".to_owned(),
        notes,
        apply,
        rollback,
    }
}

fn fic_step(identity: &AzureIdentity, subjects: &[Subject], issuer: &str, client_id: &str) -> Step {
    let mut apply = Vec::new();
    let mut rollback = Vec::new();
    let mut notes = vec![format!(
        "Register one federated identity credential per subject (issuer {issuer}, audience {AUDIENCE}). Entra takes a few seconds, sometimes minutes, to honour a new credential: wait before step 3."
    )];
    let audiences = json!([AUDIENCE]);
    if identity.identity_type() == IdentityType::UserAssignedMsi {
        let (sub, rg, uami) = identity
            .spec
            .resource_id
            .as_deref()
            .and_then(parse_resource_id)
            .unwrap_or_else(|| {
                (
                    "<subscription>".to_owned(),
                    "<resource-group>".to_owned(),
                    "<identity-name>".to_owned(),
                )
            });
        let target = format!(
            "--identity-name {} --resource-group {} --subscription {}",
            shell_quote(&uami),
            shell_quote(&rg),
            shell_quote(&sub)
        );
        let mut resources = Vec::new();
        let mut previous: Option<String> = None;
        for s in subjects {
            apply.push(format!(
                "az identity federated-credential create --name {} {target} --issuer {} --subject {} --audiences {AUDIENCE}",
                s.credential_name,
                shell_quote(issuer),
                shell_quote(&s.subject)
            ));
            rollback.push(format!(
                "az identity federated-credential delete --name {} {target} --yes",
                s.credential_name
            ));
            let mut resource = json!({
                "type": "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials",
                "apiVersion": FIC_API_VERSION,
                "name": format!("{uami}/{}", s.credential_name),
                "properties": {"issuer": issuer, "subject": s.subject, "audiences": audiences},
            });
            // ARM refuses concurrent credential writes on one identity: chain them.
            if let Some(prev) = &previous {
                resource["dependsOn"] = json!([format!(
                    "[resourceId('Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials', '{uami}', '{prev}')]"
                )]);
            }
            previous = Some(s.credential_name.clone());
            resources.push(resource);
        }
        let template = json!({
            "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
            "contentVersion": "1.0.0.0",
            "resources": resources,
        });
        apply.push(format!(
            "# Or deploy this ARM template to resource group {rg} (the credentials depend on each other because ARM refuses concurrent writes on one identity):"
        ));
        apply.push(serde_json::to_string_pretty(&template).unwrap_or_default());
    } else {
        notes.push(format!(
            "Type {} identities are app registrations: their federated credentials live in Microsoft Graph, not ARM (POST https://graph.microsoft.com/v1.0/applications(appId='{client_id}')/federatedIdentityCredentials with the JSON below).",
            identity.identity_type().as_i64()
        ));
        for s in subjects {
            let body = json!({
                "name": s.credential_name,
                "issuer": issuer,
                "subject": s.subject,
                "audiences": audiences,
            });
            apply.push(format!(
                "az ad app federated-credential create --id {} --parameters {}",
                shell_quote(client_id),
                shell_quote(&body.to_string())
            ));
            rollback.push(format!(
                "az ad app federated-credential delete --id {} --federated-credential-id {}",
                shell_quote(client_id),
                s.credential_name
            ));
        }
    }
    rollback.reverse();
    Step {
        title: "Federated identity credentials".to_owned(),
        notes,
        apply,
        rollback,
    }
}

fn flip_step(identity: &AzureIdentity, shared: Option<&str>) -> Step {
    let ns = identity.metadata.namespace.clone().unwrap_or_default();
    let name = identity.metadata.name.clone().unwrap_or_default();
    let target = format!(
        "kubectl annotate azureidentity -n {} {}",
        shell_quote(&ns),
        shell_quote(&name)
    );
    let before = identity.metadata.annotations.clone().unwrap_or_default();
    let mut set = format!("{target} --overwrite {TOKEN_SOURCE_ANNOTATION}=federated");
    if let Some(shared) = shared {
        let _ = write!(
            set,
            " {FEDERATED_SERVICE_ACCOUNT_ANNOTATION}={}",
            shell_quote(shared)
        );
    }
    let mut restore = Vec::new();
    let mut keys = vec![TOKEN_SOURCE_ANNOTATION];
    if shared.is_some() {
        keys.push(FEDERATED_SERVICE_ACCOUNT_ANNOTATION);
    }
    let already = before
        .get(TOKEN_SOURCE_ANNOTATION)
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("federated"));
    let mut notes = Vec::new();
    if already {
        // Going back means leaving federation, whatever the annotations said before.
        notes.push(format!(
            "{ns}/{name} is already switched ({TOKEN_SOURCE_ANNOTATION}: federated); the rollback below takes it back to its {} path.",
            if identity.identity_type() == IdentityType::UserAssignedMsi { "IMDS" } else { "Secret" }
        ));
        restore.push(format!("{TOKEN_SOURCE_ANNOTATION}-"));
        keys.clear();
    }
    for key in keys {
        match before.get(key) {
            Some(value) => restore.push(format!("--overwrite {key}={}", shell_quote(value))),
            None => restore.push(format!("{key}-")),
        }
    }
    let type_note = if identity.identity_type() == IdentityType::UserAssignedMsi {
        "MIC then stops assigning the identity to the nodes' VMSS/VMs and removes it once no pod needs it on the IMDS path; after a rollback MIC assigns it again, and pods wait (bounded) for that assignment."
    } else {
        "The Secret stays in place and unused, so a rollback takes effect at once."
    };
    notes.insert(0, format!("nmi switches {ns}/{name} to the federated exchange at once: no pod restarts, pods keep calling IMDS. {type_note}"));
    Step {
        title: "Flip the token source".to_owned(),
        notes,
        apply: vec![set],
        rollback: vec![format!("{target} {}", restore.join(" "))],
    }
}

fn verify_step(identity: &AzureIdentity, subjects: &[Subject]) -> Step {
    let ns = identity.metadata.namespace.clone().unwrap_or_default();
    let mut apply = Vec::new();
    let pods: Vec<&String> = subjects.iter().flat_map(|s| &s.pods).collect();
    for pod in pods.iter().take(10) {
        apply.push(format!("podidctl doctor {pod}"));
    }
    let mut notes = vec![
        "Each pod should show path `federated` with the subject registered in step 2 and `served: yes`; a pod's next token request proves it (a missing credential gives it an IMDS-shaped 403 naming the issuer and subject, and an Event on the pod).".to_owned(),
    ];
    if pods.len() > 10 {
        notes.push(format!(
            "{} more pods: podidctl status -A lists them all.",
            pods.len() - 10
        ));
    }
    apply.push(format!("podidctl status -n {}", shell_quote(&ns)));
    if let Some(pod) = pods.first()
        && let Some((pns, pname)) = pod.split_once('/')
    {
        apply.push(format!(
            "kubectl get events -n {} --field-selector involvedObject.name={}",
            shell_quote(pns),
            shell_quote(pname)
        ));
    }
    Step {
        title: "Verify".to_owned(),
        notes,
        apply,
        rollback: vec!["(read-only; nothing to undo)".to_owned()],
    }
}

fn sdk_step(subjects: &[Subject], client_id: &str) -> Step {
    Step {
        title: "Later, per application: move to the Workload Identity SDK".to_owned(),
        notes: vec![
            format!("At each application's own pace: install the Workload Identity webhook, label the pod template azure.workload.identity/use: \"true\", run it as the annotated service account (client id {client_id}), deploy, then remove its {} label. When no pod uses the binding any more, delete the AzureIdentityBinding and the AzureIdentity.", podid_api::POD_LABEL_KEY),
            format!(
                "Service accounts involved: {}",
                subjects
                    .iter()
                    .map(|s| format!("{}/{}", s.namespace, s.service_account))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ],
        apply: vec![
            "kubectl patch deployment -n <ns> <app> --type merge -p '{\"spec\":{\"template\":{\"metadata\":{\"labels\":{\"azure.workload.identity/use\":\"true\"}}}}}'".to_owned(),
        ],
        rollback: vec![
            "kubectl rollout undo deployment -n <ns> <app>   (the pod keeps its aadpodidbinding label until you remove it, so nmi serves it again at once)".to_owned(),
        ],
    }
}

/// The plan as text.
pub fn render(plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Migration of AzureIdentity {} (client id {}) to federated tokens",
        plan.identity, plan.client_id
    );
    let _ = writeln!(out, "Issuer: {}", plan.issuer);
    let _ = writeln!(out, "\nSubjects ({}):", plan.subjects.len());
    for s in &plan.subjects {
        let pods = if s.pods.is_empty() {
            "no pod yet".to_owned()
        } else {
            s.pods.join(", ")
        };
        let _ = writeln!(out, "  {}  ({pods})", s.subject);
    }
    for o in &plan.opted_out {
        let _ = writeln!(out, "  stays: {o}");
    }
    if !plan.warnings.is_empty() {
        let _ = writeln!(out);
        for w in &plan.warnings {
            let _ = writeln!(out, "WARNING: {w}");
        }
    }
    for (i, step) in plan.steps.iter().enumerate() {
        let _ = writeln!(out, "\n## Step {}: {}", i + 1, step.title);
        for n in &step.notes {
            let _ = writeln!(out, "# {n}");
        }
        for a in &step.apply {
            let _ = writeln!(out, "{a}");
        }
        let _ = writeln!(out, "# Rollback of step {}:", i + 1);
        for r in &step.rollback {
            let _ = writeln!(out, "#   {r}");
        }
    }
    let _ = writeln!(out, "\n## Full rollback, newest step first");
    // Step 5 is per application and undone there; the others are undone newest first.
    for (i, step) in plan.steps.iter().enumerate().rev().skip(1) {
        for r in step.rollback.iter().filter(|r| !r.starts_with('(')) {
            let _ = writeln!(out, "# step {}: {r}", i + 1);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_names_follow_entra_rules() {
        assert_eq!(credential_name("apps", "web"), "podid-apps-web");
        let dotted = credential_name("apps", "web.v2");
        assert!(dotted.starts_with("podid-apps-web-v2-"), "{dotted}");
        let long = credential_name("apps", &"a".repeat(200));
        assert_eq!(long.len(), 120);
        assert!(long.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        assert_ne!(long, credential_name("apps", &"a".repeat(201)));
    }

    #[test]
    fn resource_ids_parse_ignoring_case() {
        let id = "/subscriptions/s1/resourceGroups/rg1/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id1";
        assert_eq!(
            parse_resource_id(id),
            Some(("s1".into(), "rg1".into(), "id1".into()))
        );
        assert_eq!(parse_resource_id("/subscriptions/s1"), None);
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("https://x/y"), "https://x/y");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
