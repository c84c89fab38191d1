//! The federated switch (docs/migration.md): whether an identity used through a binding gets its
//! tokens by federated exchange of a service-account token, whose service account, and the
//! trust boundary that confines that choice. Plain values in, plain values out; the broker's
//! federated source performs the exchange.

use std::collections::BTreeMap;
use std::fmt;

use podid_api::{FEDERATED_SERVICE_ACCOUNT_ANNOTATION, TOKEN_SOURCE_ANNOTATION};

/// The value of [`TOKEN_SOURCE_ANNOTATION`] that switches an identity to federation (compared
/// ignoring ASCII case and surrounding spaces).
pub const TOKEN_SOURCE_FEDERATED: &str = "federated";

/// The Kubernetes subject whose service-account token a federated exchange presents
/// (`system:serviceaccount:<namespace>:<name>`). Part of the cache key: pods with different
/// subjects never share a token, pods with the same subject do.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FederatedSubject {
    /// The service account's namespace.
    pub namespace: String,
    /// The service account's name.
    pub service_account: String,
}

impl FederatedSubject {
    /// The subject of `service_account` in `namespace`.
    pub fn new(namespace: impl Into<String>, service_account: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    /// The `sub` claim of its tokens: `system:serviceaccount:<namespace>:<name>`.
    pub fn subject(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }
}

impl fmt::Display for FederatedSubject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)
    }
}

/// The pod a service-account token is bound to (`boundObjectRef`), so the token dies with it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BoundPod {
    /// The pod's name (in the subject's namespace).
    pub name: String,
    /// The pod's uid.
    pub uid: String,
}

/// A federated credential: whose service-account token is exchanged, and the pod it is bound
/// to (the broker's `Credential::Federated`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FederatedCredential {
    /// Whose service-account token is exchanged.
    pub subject: FederatedSubject,
    /// The calling pod when the subject is its own service account; `None` for a shared one.
    pub bound_pod: Option<BoundPod>,
}

/// The calling pod, as far as the federated switch needs it.
#[derive(Debug, Clone, Copy)]
pub struct PodSubject<'a> {
    /// The pod's namespace.
    pub namespace: &'a str,
    /// The pod's name.
    pub name: &'a str,
    /// The pod's uid.
    pub uid: &'a str,
    /// `spec.serviceAccountName` (empty means `default`).
    pub service_account: &'a str,
}

/// Whether an identity used through a binding gets its tokens by federated exchange: the
/// binding's [`TOKEN_SOURCE_ANNOTATION`] when it has one, else the identity's, equal to
/// [`TOKEN_SOURCE_FEDERATED`] ignoring ASCII case and surrounding spaces. The rule
/// [`federated_credential`] applies, without a pod (MIC uses it to keep federated identities off
/// the scale sets).
pub fn is_federated(
    identity_annotations: Option<&BTreeMap<String, String>>,
    binding_annotations: Option<&BTreeMap<String, String>>,
) -> bool {
    binding_annotations
        .and_then(|a| a.get(TOKEN_SOURCE_ANNOTATION))
        .or_else(|| identity_annotations.and_then(|a| a.get(TOKEN_SOURCE_ANNOTATION)))
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(TOKEN_SOURCE_FEDERATED))
}

/// The [`FederatedCredential`] for a pod's request to an identity, or `None` when the
/// identity is not switched to federation.
///
/// The switch is [`TOKEN_SOURCE_ANNOTATION`] = [`TOKEN_SOURCE_FEDERATED`]: the binding's value
/// wins when the binding carries the annotation (so a binding can opt in alone, or opt out with
/// any other value such as `default`), else the identity's. The subject is the pod's own
/// service account, and the token is bound to the pod; with
/// [`FEDERATED_SERVICE_ACCOUNT_ANNOTATION`] (binding first, then identity) it is that one
/// shared service account (`<name>` in `identity_namespace`, or `<namespace>/<name>`), unbound.
pub fn federated_credential(
    identity_annotations: Option<&BTreeMap<String, String>>,
    identity_namespace: &str,
    binding_annotations: Option<&BTreeMap<String, String>>,
    pod: PodSubject<'_>,
) -> Option<FederatedCredential> {
    let lookup = |key: &str| {
        binding_annotations
            .and_then(|a| a.get(key))
            .or_else(|| identity_annotations.and_then(|a| a.get(key)))
            .map(|v| v.trim())
    };
    if !is_federated(identity_annotations, binding_annotations) {
        return None;
    }
    let shared = lookup(FEDERATED_SERVICE_ACCOUNT_ANNOTATION).filter(|v| !v.is_empty());
    Some(match shared {
        Some(value) => {
            let subject = match value.split_once('/') {
                Some((namespace, name)) => FederatedSubject::new(namespace, name),
                None => FederatedSubject::new(identity_namespace, value),
            };
            FederatedCredential {
                subject,
                bound_pod: None,
            }
        }
        None => {
            let service_account = if pod.service_account.is_empty() {
                "default"
            } else {
                pod.service_account
            };
            FederatedCredential {
                subject: FederatedSubject::new(pod.namespace, service_account),
                bound_pod: Some(BoundPod {
                    name: pod.name.to_owned(),
                    uid: pod.uid.to_owned(),
                }),
            }
        }
    })
}

/// The trust boundary of the federated switch, applied to what [`federated_credential`] chose
/// for `pod` and an identity in `identity_namespace`.
///
/// nmi may create tokens for every service account of the cluster, and the annotations are
/// written by whoever may create the identity or the binding. So the subject must be the pod's
/// own service account, or one in the identity's own namespace (the shared-service-account
/// annotation cannot name another namespace's); anything else is refused with the reason.
/// Whenever the pod lives in the subject's namespace the token is bound to it (a TokenRequest
/// can only bind objects of its own namespace), so it dies with the pod.
pub fn confine_federated(
    credential: FederatedCredential,
    identity_namespace: &str,
    pod: PodSubject<'_>,
) -> Result<FederatedCredential, String> {
    let FederatedCredential { subject, bound_pod } = credential;
    let pods_own = subject.namespace == pod.namespace
        && (subject.service_account == pod.service_account
            || (pod.service_account.is_empty() && subject.service_account == "default"));
    if !pods_own && subject.namespace != identity_namespace {
        return Err(format!(
            "the federated exchange may use the pod's own service account or one in the identity's namespace {identity_namespace:?}, not service account {subject} ({FEDERATED_SERVICE_ACCOUNT_ANNOTATION})"
        ));
    }
    let bound_pod = bound_pod.or_else(|| {
        (subject.namespace == pod.namespace).then(|| BoundPod {
            name: pod.name.to_owned(),
            uid: pod.uid.to_owned(),
        })
    });
    Ok(FederatedCredential { subject, bound_pod })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    const POD: PodSubject<'static> = PodSubject {
        namespace: "apps",
        name: "web-0",
        uid: "uid-1",
        service_account: "web",
    };

    #[test]
    fn switch_follows_identity_then_binding() {
        let on = annotations(&[(TOKEN_SOURCE_ANNOTATION, " Federated ")]);
        let off = annotations(&[(TOKEN_SOURCE_ANNOTATION, "default")]);
        assert!(federated_credential(None, "ids", None, POD).is_none());
        assert!(federated_credential(Some(&off), "ids", None, POD).is_none());
        let Some(FederatedCredential { subject, bound_pod }) =
            federated_credential(Some(&on), "ids", None, POD)
        else {
            panic!("identity annotation switches to federation");
        };
        assert_eq!(subject, FederatedSubject::new("apps", "web"));
        assert_eq!(
            bound_pod,
            Some(BoundPod {
                name: "web-0".into(),
                uid: "uid-1".into()
            })
        );
        assert!(
            federated_credential(Some(&on), "ids", Some(&off), POD).is_none(),
            "the binding's value wins"
        );
        assert!(federated_credential(Some(&off), "ids", Some(&on), POD).is_some());
        assert!(is_federated(Some(&on), None));
        assert!(!is_federated(Some(&on), Some(&off)));
        assert!(is_federated(None, Some(&on)));
        assert!(!is_federated(None, None));
    }

    #[test]
    fn shared_service_account_and_default_account() {
        let shared = annotations(&[
            (TOKEN_SOURCE_ANNOTATION, "federated"),
            (FEDERATED_SERVICE_ACCOUNT_ANNOTATION, "podid-web"),
        ]);
        let Some(FederatedCredential { subject, bound_pod }) =
            federated_credential(Some(&shared), "ids", None, POD)
        else {
            panic!("switched");
        };
        assert_eq!(subject, FederatedSubject::new("ids", "podid-web"));
        assert_eq!(bound_pod, None, "a shared token is not bound to one pod");
        let elsewhere = annotations(&[(FEDERATED_SERVICE_ACCOUNT_ANNOTATION, "infra/shared")]);
        let Some(FederatedCredential { subject, .. }) =
            federated_credential(Some(&shared), "ids", Some(&elsewhere), POD)
        else {
            panic!("switched");
        };
        assert_eq!(subject, FederatedSubject::new("infra", "shared"));
        let on = annotations(&[(TOKEN_SOURCE_ANNOTATION, "federated")]);
        let pod = PodSubject {
            service_account: "",
            ..POD
        };
        assert_eq!(
            federated_credential(Some(&on), "ids", None, pod)
                .as_ref()
                .map(|c| c.subject.service_account.clone()),
            Some("default".to_owned())
        );
    }

    /// Item 4 of the trust-boundary issue: the shared-service-account annotation cannot name
    /// another namespace's service account (nmi could mint its tokens), and a token of a service
    /// account in the pod's namespace is bound to the pod.
    #[test]
    fn the_subject_is_the_pods_own_or_in_the_identitys_namespace_and_bound_when_possible() {
        let credential = |value: &str| {
            let shared = annotations(&[
                (TOKEN_SOURCE_ANNOTATION, "federated"),
                (FEDERATED_SERVICE_ACCOUNT_ANNOTATION, value),
            ]);
            federated_credential(Some(&shared), "apps", None, POD).expect("switched")
        };
        for stolen in ["kube-system/default", "infra/shared", "default/admin"] {
            let error = confine_federated(credential(stolen), "apps", POD).expect_err(stolen);
            assert!(error.contains(stolen), "{error}");
        }
        // In the identity's (and here the pod's) namespace: allowed, and bound to the pod.
        for allowed in ["podid-web", "apps/podid-web"] {
            let Ok(FederatedCredential { subject, bound_pod }) =
                confine_federated(credential(allowed), "apps", POD)
            else {
                panic!("{allowed} is in the identity's namespace");
            };
            assert_eq!(subject, FederatedSubject::new("apps", "podid-web"));
            assert_eq!(bound_pod.map(|p| p.uid), Some("uid-1".to_owned()));
        }
        // The identity's namespace, the pod elsewhere: allowed, unbound (cannot bind across).
        let other_pod = PodSubject {
            namespace: "web",
            ..POD
        };
        let shared = annotations(&[
            (TOKEN_SOURCE_ANNOTATION, "federated"),
            (FEDERATED_SERVICE_ACCOUNT_ANNOTATION, "podid-web"),
        ]);
        let chosen = federated_credential(Some(&shared), "apps", None, other_pod).expect("on");
        assert!(matches!(
            confine_federated(chosen, "apps", other_pod),
            Ok(FederatedCredential {
                bound_pod: None,
                ..
            })
        ));
        // The pod's own service account, whatever the identity's namespace: allowed, bound.
        let on = annotations(&[(TOKEN_SOURCE_ANNOTATION, "federated")]);
        let own = federated_credential(Some(&on), "ids", None, POD).expect("on");
        assert!(matches!(
            confine_federated(own, "ids", POD),
            Ok(FederatedCredential {
                bound_pod: Some(_),
                ..
            })
        ));
    }
}
