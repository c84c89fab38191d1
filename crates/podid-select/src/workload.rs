//! The Workload Identity decision (`--serve-workload-identity-pods`, docs/migration.md): whether a
//! pod that is set up for Azure Workload Identity but still calls IMDS is served by nmi, and with
//! which identity and federated credential.
//!
//! A pod qualifies when it carries `azure.workload.identity/use: "true"` and no
//! `AzureIdentityBinding` gives it an identity (a pod with both keeps its pod-identity binding).
//! Its service account's `azure.workload.identity/client-id` names the identity, and
//! `azure.workload.identity/tenant-id` (else nmi's `--federated-default-tenant-id`) the tenant; the
//! token comes from the federated exchange of a service-account token bound to the calling pod,
//! exactly what the Workload Identity SDK path would do.
//!
//! Unlike the sidecar, the request's selector is never ignored: `client_id` must be the service
//! account's (else 404, as for any identity the pod does not have), and `msi_res_id`/`object_id`
//! are refused with 400 because a client id cannot be checked against them. A missing service
//! account, annotation or tenant is a 403 naming what to set.
//!
//! The service accounts come from whoever holds them ([`WorkloadAccounts`]): nmi's watch-fed
//! index, or the snapshot podidctl read ([`AccountSnapshot`]).

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::ServiceAccount;
use podid_api::{
    WORKLOAD_IDENTITY_CLIENT_ID_ANNOTATION, WORKLOAD_IDENTITY_TENANT_ID_ANNOTATION,
    WORKLOAD_IDENTITY_USE_LABEL,
};
use podid_imds::{IdentitySelector, ImdsError};

use crate::federated::{BoundPod, FederatedCredential, FederatedSubject};
use crate::matching::CallerPod;

/// The Workload Identity set-up of one service account (its annotations, trimmed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadAccount {
    /// `azure.workload.identity/client-id`; never empty.
    pub client_id: String,
    /// `azure.workload.identity/tenant-id`; empty: the cluster default.
    pub tenant_id: String,
}

impl WorkloadAccount {
    /// The set-up `service_account` declares, or `None` without a client id annotation.
    pub fn of(service_account: &ServiceAccount) -> Option<Self> {
        let annotations = service_account.metadata.annotations.as_ref()?;
        let client_id = annotations
            .get(WORKLOAD_IDENTITY_CLIENT_ID_ANNOTATION)?
            .trim();
        if client_id.is_empty() {
            return None;
        }
        Some(Self {
            client_id: client_id.to_owned(),
            tenant_id: annotations
                .get(WORKLOAD_IDENTITY_TENANT_ID_ANNOTATION)
                .map(|t| t.trim().to_owned())
                .unwrap_or_default(),
        })
    }
}

/// Whether `pod` carries `azure.workload.identity/use: "true"` (exactly, like the webhook's
/// object selector).
pub fn is_workload_identity_pod(pod: &CallerPod) -> bool {
    pod.labels
        .get(WORKLOAD_IDENTITY_USE_LABEL)
        .is_some_and(|v| v == "true")
}

/// The service account a pod runs as: `spec.serviceAccountName`, `default` when empty.
pub fn service_account_name(pod: &CallerPod) -> &str {
    if pod.service_account.is_empty() {
        "default"
    } else {
        &pod.service_account
    }
}

/// What the index knows of one service account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountLookup {
    /// The initial list has not completed yet.
    NotSynced,
    /// No such service account.
    Missing,
    /// It exists without `azure.workload.identity/client-id`.
    NotAnnotated,
    /// Its set-up.
    Found(Arc<WorkloadAccount>),
}

/// Where the decision looks service accounts up.
pub trait WorkloadAccounts {
    /// The service account `namespace`/`name`.
    fn lookup(&self, namespace: &str, name: &str) -> AccountLookup;
}

/// Service accounts held as plain values (podidctl's snapshot, tests): complete, so an account
/// not held is [`AccountLookup::Missing`].
#[derive(Debug, Clone, Default)]
pub struct AccountSnapshot {
    by_namespace: HashMap<String, HashMap<String, Option<Arc<WorkloadAccount>>>>,
}

impl AccountSnapshot {
    /// The set-ups of `accounts`.
    pub fn new<'a>(accounts: impl IntoIterator<Item = &'a ServiceAccount>) -> Self {
        let mut snapshot = Self::default();
        for account in accounts {
            snapshot.insert(account);
        }
        snapshot
    }

    /// Add or replace `account`.
    pub fn insert(&mut self, account: &ServiceAccount) {
        let Some(name) = account.metadata.name.clone() else {
            return;
        };
        let namespace = account.metadata.namespace.clone().unwrap_or_default();
        self.by_namespace
            .entry(namespace)
            .or_default()
            .insert(name, WorkloadAccount::of(account).map(Arc::new));
    }
}

impl WorkloadAccounts for AccountSnapshot {
    fn lookup(&self, namespace: &str, name: &str) -> AccountLookup {
        match self.by_namespace.get(namespace).and_then(|n| n.get(name)) {
            None => AccountLookup::Missing,
            Some(None) => AccountLookup::NotAnnotated,
            Some(Some(account)) => AccountLookup::Found(Arc::clone(account)),
        }
    }
}

/// Why a Workload Identity pod gets no token; each carries the IMDS error to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not ready yet (503 with a short `Retry-After`).
    NotSynced(ImdsError),
    /// Something the pod's owner must fix (403 naming it, plus an Event).
    Misconfigured(ImdsError),
    /// The request asked for what the pod does not have or cannot be checked (404 / 400).
    Selector(ImdsError),
}

/// The Workload Identity pod's identity and federated credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadGrant {
    /// From the service account's annotations.
    pub account: Arc<WorkloadAccount>,
    /// The pod's own service account, the token bound to the pod.
    pub credential: FederatedCredential,
}

/// What `pod` (uid `pod_uid`, carrying the Workload Identity label) gets for `selector`.
/// `default_tenant`: whether nmi has `--federated-default-tenant-id`.
pub fn resolve(
    accounts: &(impl WorkloadAccounts + ?Sized),
    pod: &CallerPod,
    pod_uid: &str,
    selector: &IdentitySelector<'_>,
    default_tenant: bool,
) -> Result<WorkloadGrant, Refusal> {
    if let IdentitySelector::ResourceId(_) | IdentitySelector::ObjectId(_) = selector {
        let parameter = selector.parameter().unwrap_or("msi_res_id");
        return Err(Refusal::Selector(ImdsError::WorkloadIdentitySelector {
            parameter,
        }));
    }
    let service_account = service_account_name(pod);
    let misconfigured = |detail: String| Refusal::Misconfigured(ImdsError::TokenRefused { detail });
    let account = match accounts.lookup(&pod.namespace, service_account) {
        AccountLookup::NotSynced => {
            return Err(Refusal::NotSynced(ImdsError::TokenUnavailable {
                detail: "NMI has not finished syncing service accounts from the API server"
                    .to_owned(),
            }));
        }
        AccountLookup::Missing => {
            return Err(misconfigured(format!(
                "pod {}/{} is labelled {WORKLOAD_IDENTITY_USE_LABEL}=true but its service account {}/{service_account} does not exist; create it annotated {WORKLOAD_IDENTITY_CLIENT_ID_ANNOTATION}=<client id of the identity>",
                pod.namespace, pod.name, pod.namespace
            )));
        }
        AccountLookup::NotAnnotated => {
            return Err(misconfigured(format!(
                "pod {}/{} is labelled {WORKLOAD_IDENTITY_USE_LABEL}=true but its service account {}/{service_account} has no {WORKLOAD_IDENTITY_CLIENT_ID_ANNOTATION} annotation; annotate it with the client id of the identity the pod uses",
                pod.namespace, pod.name, pod.namespace
            )));
        }
        AccountLookup::Found(account) => account,
    };
    if account.tenant_id.is_empty() && !default_tenant {
        return Err(misconfigured(format!(
            "no tenant for the Workload Identity exchange of service account {}/{service_account}: annotate it {WORKLOAD_IDENTITY_TENANT_ID_ANNOTATION}=<tenant id> or start nmi with --federated-default-tenant-id",
            pod.namespace
        )));
    }
    if let IdentitySelector::ClientId(asked) = selector
        && !asked.trim().eq_ignore_ascii_case(&account.client_id)
    {
        return Err(Refusal::Selector(ImdsError::identity_not_found(Some(
            asked,
        ))));
    }
    Ok(WorkloadGrant {
        credential: FederatedCredential {
            subject: FederatedSubject::new(pod.namespace.as_str(), service_account),
            bound_pod: Some(BoundPod {
                name: pod.name.clone(),
                uid: pod_uid.to_owned(),
            }),
        },
        account,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    fn account(namespace: &str, name: &str, annotations: &[(&str, &str)]) -> ServiceAccount {
        let mut sa = ServiceAccount::default();
        sa.metadata.namespace = Some(namespace.to_owned());
        sa.metadata.name = Some(name.to_owned());
        if !annotations.is_empty() {
            sa.metadata.annotations = Some(
                annotations
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            );
        }
        sa
    }

    fn wi_pod(service_account: &str) -> CallerPod {
        CallerPod {
            namespace: "apps".into(),
            name: "web-1".into(),
            service_account: service_account.into(),
            labels: [(WORKLOAD_IDENTITY_USE_LABEL.to_owned(), "true".to_owned())].into(),
            annotations: Default::default(),
        }
    }

    const CLIENT: &str = "0b1c2d3e-0000-4000-8000-00000000000a";

    fn synced(accounts: &[ServiceAccount]) -> AccountSnapshot {
        AccountSnapshot::new(accounts)
    }

    #[test]
    fn the_label_must_be_exactly_true() {
        let mut pod = wi_pod("web");
        assert!(is_workload_identity_pod(&pod));
        for value in ["True", "yes", ""] {
            pod.labels
                .insert(WORKLOAD_IDENTITY_USE_LABEL.to_owned(), value.to_owned());
            assert!(!is_workload_identity_pod(&pod), "{value:?}");
        }
        pod.labels.clear();
        assert!(!is_workload_identity_pod(&pod));
    }

    #[test]
    fn annotated_account_gives_a_federated_credential_bound_to_the_pod() {
        let accounts = synced(&[account(
            "apps",
            "web",
            &[
                (
                    WORKLOAD_IDENTITY_CLIENT_ID_ANNOTATION,
                    &format!(" {CLIENT} "),
                ),
                (WORKLOAD_IDENTITY_TENANT_ID_ANNOTATION, "tenant-b"),
            ],
        )]);
        let grant = resolve(
            &accounts,
            &wi_pod("web"),
            "uid-7",
            &IdentitySelector::None,
            false,
        )
        .expect("served");
        assert_eq!(grant.account.client_id, CLIENT);
        assert_eq!(grant.account.tenant_id, "tenant-b");
        assert_eq!(
            grant.credential,
            FederatedCredential {
                subject: FederatedSubject::new("apps", "web"),
                bound_pod: Some(BoundPod {
                    name: "web-1".into(),
                    uid: "uid-7".into()
                }),
            }
        );
        // The same client id asked explicitly, in another case: served.
        let upper = CLIENT.to_ascii_uppercase();
        assert!(
            resolve(
                &accounts,
                &wi_pod("web"),
                "uid-7",
                &IdentitySelector::ClientId(Cow::Borrowed(&upper)),
                false
            )
            .is_ok()
        );
    }

    #[test]
    fn an_empty_service_account_name_means_default() {
        let accounts = synced(&[account(
            "apps",
            "default",
            &[(WORKLOAD_IDENTITY_CLIENT_ID_ANNOTATION, CLIENT)],
        )]);
        let grant =
            resolve(&accounts, &wi_pod(""), "u", &IdentitySelector::None, true).expect("served");
        assert_eq!(
            grant.credential.subject.subject(),
            "system:serviceaccount:apps:default"
        );
    }

    #[test]
    fn another_client_id_is_not_found_and_resource_ids_are_refused() {
        let accounts = synced(&[account(
            "apps",
            "web",
            &[(WORKLOAD_IDENTITY_CLIENT_ID_ANNOTATION, CLIENT)],
        )]);
        let other = resolve(
            &accounts,
            &wi_pod("web"),
            "u",
            &IdentitySelector::ClientId(Cow::Borrowed("11111111-2222-3333-4444-555555555555")),
            true,
        );
        let Err(Refusal::Selector(error @ ImdsError::IdentityNotFound { .. })) = other else {
            panic!("expected not found, got {other:?}");
        };
        assert!(error.is_final_refusal());
        assert_eq!(
            error.status(Default::default()),
            http::StatusCode::BAD_REQUEST
        );
        for selector in [
            IdentitySelector::ResourceId(Cow::Borrowed("/subscriptions/s/x")),
            IdentitySelector::ObjectId(Cow::Borrowed("oid")),
        ] {
            let refused = resolve(&accounts, &wi_pod("web"), "u", &selector, true);
            let Err(Refusal::Selector(error)) = refused else {
                panic!("expected a refusal, got {refused:?}");
            };
            assert_eq!(
                error.status(Default::default()),
                http::StatusCode::BAD_REQUEST
            );
            assert!(
                error
                    .to_string()
                    .contains(selector.parameter().expect("named"))
            );
        }
    }

    #[test]
    fn missing_account_annotation_or_tenant_is_a_403_naming_the_fix() {
        let accounts = synced(&[
            account("apps", "plain", &[]),
            account(
                "apps",
                "web",
                &[(WORKLOAD_IDENTITY_CLIENT_ID_ANNOTATION, CLIENT)],
            ),
        ]);
        let cases = [
            ("ghost", true, "does not exist"),
            ("plain", true, "has no azure.workload.identity/client-id"),
            ("web", false, "--federated-default-tenant-id"),
        ];
        for (service_account, default_tenant, says) in cases {
            let refused = resolve(
                &accounts,
                &wi_pod(service_account),
                "u",
                &IdentitySelector::None,
                default_tenant,
            );
            let Err(Refusal::Misconfigured(error)) = refused else {
                panic!("{service_account}: expected misconfigured, got {refused:?}");
            };
            assert_eq!(
                error.status(Default::default()),
                http::StatusCode::FORBIDDEN
            );
            let text = error.to_string();
            assert!(text.contains(says), "{service_account}: {text}");
            assert!(text.contains(&format!("apps/{service_account}")), "{text}");
        }
    }
}
