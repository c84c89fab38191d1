//! A table of selection cases with the answer each must get (feature `cases`, for tests).
//!
//! The same table runs through [`crate::select`] here, through nmi's request path (its pod
//! index, matcher, service-account store and IMDS mapping) and through podidctl's explainer, so
//! the three are shown to decide alike. Each case starts from Kubernetes objects, the pod
//! included, so each caller also builds the calling pod its own way.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus, ServiceAccount};
use podid_api::{
    AssignedIdentityState, AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding,
    AzurePodIdentityException, FEDERATED_SERVICE_ACCOUNT_ANNOTATION, OperationMode, POD_LABEL_KEY,
    TOKEN_SOURCE_ANNOTATION, WORKLOAD_IDENTITY_CLIENT_ID_ANNOTATION,
    WORKLOAD_IDENTITY_TENANT_ID_ANNOTATION, WORKLOAD_IDENTITY_USE_LABEL,
};
use podid_imds::IdentitySelector;

use crate::decision::{Refusal, Selection, Source};
use crate::matching::MatchOptions;

/// The node every case's pod runs on.
pub const NODE: &str = "node-a";
/// The calling pod's address (from a private test range).
pub const POD_IP: &str = "10.244.7.9";

/// What the request selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Query {
    /// No selector.
    None,
    /// `client_id`.
    ClientId(&'static str),
    /// `msi_res_id`.
    ResourceId(&'static str),
    /// `object_id`.
    ObjectId(&'static str),
}

impl Query {
    /// The selector the IMDS query parser would produce.
    pub fn selector(self) -> IdentitySelector<'static> {
        match self {
            Self::None => IdentitySelector::None,
            Self::ClientId(id) => IdentitySelector::ClientId(Cow::Borrowed(id)),
            Self::ResourceId(id) => IdentitySelector::ResourceId(Cow::Borrowed(id)),
            Self::ObjectId(id) => IdentitySelector::ObjectId(Cow::Borrowed(id)),
        }
    }
}

/// The answer a case must get, reduced to what every caller can observe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The node's own identity (excepted pod).
    Node,
    /// This identity (`<namespace>/<name>`), by its usual source or federated.
    Identity {
        /// `<namespace>/<name>`.
        identity: String,
        /// Switched to federation.
        federated: bool,
    },
    /// Served as a Workload Identity pod with this client id.
    Workload {
        /// The service account's client id.
        client_id: String,
    },
    /// Waits for an assignment in progress.
    Wait,
    /// Refused with this HTTP status (default error options: final refusals are 400).
    Refused {
        /// The status.
        status: u16,
    },
}

impl Outcome {
    /// The outcome of `selection`; `status` gives a refusal's HTTP status as the caller answers
    /// it.
    pub fn of(selection: &Selection, status: impl FnOnce(&Refusal) -> u16) -> Self {
        match selection {
            Selection::Node(_) => Self::Node,
            Selection::Identity { identity, source } => Self::Identity {
                identity: format!(
                    "{}/{}",
                    identity.metadata.namespace.as_deref().unwrap_or_default(),
                    identity.metadata.name.as_deref().unwrap_or_default()
                ),
                federated: matches!(source, Source::Federated(_)),
            },
            Selection::Workload(grant) => Self::Workload {
                client_id: grant.account.client_id.clone(),
            },
            Selection::Wait(_) => Self::Wait,
            Selection::Refused(refusal) => Self::Refused {
                status: status(refusal),
            },
        }
    }
}

/// One case: the switches, the objects, the pod and the request, and the expected answer.
#[derive(Debug, Clone)]
pub struct Case {
    /// What it shows.
    pub name: &'static str,
    /// Operation mode and `--forceNamespaced`.
    pub options: MatchOptions,
    /// `--serve-workload-identity-pods`.
    pub serve_workload_identity_pods: bool,
    /// `--federated-default-tenant-id` is set.
    pub federated_default_tenant: bool,
    /// `AzureIdentity` objects.
    pub identities: Vec<AzureIdentity>,
    /// `AzureIdentityBinding` objects.
    pub bindings: Vec<AzureIdentityBinding>,
    /// `AzureAssignedIdentity` objects.
    pub assignments: Vec<AzureAssignedIdentity>,
    /// `AzurePodIdentityException` objects.
    pub exceptions: Vec<AzurePodIdentityException>,
    /// Every service account of the cluster.
    pub service_accounts: Vec<ServiceAccount>,
    /// The calling pod.
    pub pod: Pod,
    /// The request's selector.
    pub query: Query,
    /// The answer.
    pub expected: Outcome,
}

const CLIENT_A: &str = "aaaaaaaa-0000-4000-8000-00000000000a";
const CLIENT_B: &str = "bbbbbbbb-0000-4000-8000-00000000000b";
const CLIENT_WI: &str = "cccccccc-0000-4000-8000-00000000000c";

fn rid(name: &str) -> String {
    format!(
        "/subscriptions/S/resourcegroups/RG/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
    )
}

fn identity(namespace: &str, name: &str, client_id: &str) -> AzureIdentity {
    AzureIdentity::user_assigned(namespace, name, &rid(name), client_id)
}

fn binding(namespace: &str, identity: &str, selector: &str) -> AzureIdentityBinding {
    AzureIdentityBinding::for_selector(
        namespace,
        &format!("{identity}-binding"),
        identity,
        selector,
    )
}

fn annotated<T: kube_meta::HasMeta>(mut object: T, pairs: &[(&str, &str)]) -> T {
    let annotations = object
        .meta_mut()
        .annotations
        .get_or_insert_with(BTreeMap::new);
    for (key, value) in pairs {
        annotations.insert((*key).to_owned(), (*value).to_owned());
    }
    object
}

/// Objects with `metadata` (a local trait: the case builders need only this).
mod kube_meta {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    pub trait HasMeta {
        fn meta_mut(&mut self) -> &mut ObjectMeta;
    }

    macro_rules! has_meta {
        ($($t:ty),*) => {$(
            impl HasMeta for $t {
                fn meta_mut(&mut self) -> &mut ObjectMeta {
                    &mut self.metadata
                }
            }
        )*};
    }

    has_meta!(
        podid_api::AzureIdentity,
        podid_api::AzureIdentityBinding,
        k8s_openapi::api::core::v1::ServiceAccount
    );
}

fn assignment(
    pod: &str,
    pod_namespace: &str,
    identity: &AzureIdentity,
    binding: &AzureIdentityBinding,
    state: AssignedIdentityState,
) -> AzureAssignedIdentity {
    let mut object = AzureAssignedIdentity::for_pod(
        pod_namespace,
        pod,
        pod_namespace,
        NODE,
        identity.clone(),
        binding.clone(),
    );
    if let Some(status) = object.status.as_mut() {
        status.status = Some(state);
    }
    object
}

fn pod(namespace: &str, name: &str, service_account: &str, labels: &[(&str, &str)]) -> Pod {
    let mut pod = Pod::default();
    pod.metadata.namespace = Some(namespace.to_owned());
    pod.metadata.name = Some(name.to_owned());
    pod.metadata.uid = Some(format!("uid-{name}"));
    pod.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    );
    pod.spec = Some(PodSpec {
        node_name: Some(NODE.to_owned()),
        service_account_name: (!service_account.is_empty()).then(|| service_account.to_owned()),
        ..PodSpec::default()
    });
    pod.status = Some(PodStatus {
        phase: Some("Running".to_owned()),
        pod_ip: Some(POD_IP.to_owned()),
        ..PodStatus::default()
    });
    pod
}

fn service_account(namespace: &str, name: &str, annotations: &[(&str, &str)]) -> ServiceAccount {
    let mut account = ServiceAccount::default();
    account.metadata.namespace = Some(namespace.to_owned());
    account.metadata.name = Some(name.to_owned());
    annotated(account, annotations)
}

fn exception(namespace: &str, label: (&str, &str)) -> AzurePodIdentityException {
    AzurePodIdentityException::for_pod_labels(
        namespace,
        "node-identity",
        [(label.0.to_owned(), label.1.to_owned())],
    )
}

fn identity_outcome(identity: &str, federated: bool) -> Outcome {
    Outcome::Identity {
        identity: identity.to_owned(),
        federated,
    }
}

fn refused(status: u16) -> Outcome {
    Outcome::Refused { status }
}

fn workload(client_id: &str) -> Outcome {
    Outcome::Workload {
        client_id: client_id.to_owned(),
    }
}

/// A case with nothing in it: standard mode, no flags, pod `apps/web` with `labels`.
fn base(name: &'static str, labels: &[(&str, &str)], query: Query, expected: Outcome) -> Case {
    Case {
        name,
        options: MatchOptions::default(),
        serve_workload_identity_pods: false,
        federated_default_tenant: false,
        identities: Vec::new(),
        bindings: Vec::new(),
        assignments: Vec::new(),
        exceptions: Vec::new(),
        service_accounts: vec![service_account("apps", "web", &[])],
        pod: pod("apps", "web", "web", labels),
        query,
        expected,
    }
}

const LABEL: (&str, &str) = (POD_LABEL_KEY, "kv");
const WI: (&str, &str) = (WORKLOAD_IDENTITY_USE_LABEL, "true");

/// Every case.
#[allow(clippy::too_many_lines)]
pub fn cases() -> Vec<Case> {
    let kv = identity("apps", "kv", CLIENT_A);
    let kv_binding = binding("apps", "kv", "kv");
    let other = identity("apps", "other", CLIENT_B);
    let other_binding = binding("apps", "other", "kv");
    let assigned = |state| assignment("web", "apps", &kv, &kv_binding, state);
    let mut out = Vec::new();

    // Standard mode: the assignment decides.
    let mut case = base(
        "assigned identity, no selector",
        &[LABEL],
        Query::None,
        identity_outcome("apps/kv", false),
    );
    case.identities = vec![kv.clone()];
    case.bindings = vec![kv_binding.clone()];
    case.assignments = vec![assigned(AssignedIdentityState::Assigned)];
    out.push(case.clone());
    out.push(Case {
        name: "assigned identity by its client id in upper case",
        query: Query::ClientId("AAAAAAAA-0000-4000-8000-00000000000A"),
        ..case.clone()
    });
    out.push(Case {
        name: "assigned identity by its resource id",
        query: Query::ResourceId(
            "/subscriptions/S/resourcegroups/RG/providers/Microsoft.ManagedIdentity/userAssignedIdentities/kv",
        ),
        ..case.clone()
    });
    out.push(Case {
        name: "another client id is a final refusal",
        query: Query::ClientId(CLIENT_B),
        expected: refused(400),
        ..case.clone()
    });
    out.push(Case {
        name: "object_id cannot be matched",
        query: Query::ObjectId("00000000-0000-0000-0000-000000000001"),
        expected: refused(400),
        ..case.clone()
    });
    out.push(Case {
        name: "a Created assignment waits",
        assignments: vec![assigned(AssignedIdentityState::Created)],
        expected: Outcome::Wait,
        ..case.clone()
    });
    out.push(Case {
        name: "a binding without an assignment waits for MIC",
        assignments: Vec::new(),
        expected: Outcome::Wait,
        ..case.clone()
    });
    out.push(Case {
        name: "an assignment for a label the pod no longer has is not used",
        pod: pod("apps", "web", "web", &[(POD_LABEL_KEY, "other")]),
        expected: refused(400),
        ..case.clone()
    });
    out.push(base(
        "a pod without the label and without identities",
        &[],
        Query::None,
        refused(400),
    ));

    // Exceptions: the node's own identity, whatever is bound.
    out.push(Case {
        name: "an excepted pod gets the node's identity",
        exceptions: vec![exception("apps", ("app", "NODE-TOOLS"))],
        pod: pod("apps", "web", "web", &[LABEL, ("app", "node-tools")]),
        expected: Outcome::Node,
        ..case.clone()
    });
    out.push(Case {
        name: "an exception in another namespace does not apply",
        exceptions: vec![exception("kube-system", ("app", "node-tools"))],
        pod: pod("apps", "web", "web", &[LABEL, ("app", "node-tools")]),
        ..case.clone()
    });

    // Namespace boundary.
    let foreign = identity("evil", "kv", CLIENT_B).namespaced();
    let foreign_binding = binding("evil", "kv", "kv");
    let mut cross = base(
        "a namespaced identity bound from another namespace is not used",
        &[LABEL],
        Query::None,
        refused(400),
    );
    cross.identities = vec![foreign.clone()];
    cross.bindings = vec![foreign_binding.clone()];
    cross.assignments = vec![assignment(
        "web",
        "apps",
        &foreign,
        &foreign_binding,
        AssignedIdentityState::Assigned,
    )];
    out.push(cross.clone());
    let plain_foreign = identity("evil", "kv", CLIENT_B);
    out.push(Case {
        name: "--forceNamespaced refuses every identity of another namespace",
        options: MatchOptions {
            force_namespaced: true,
            ..MatchOptions::default()
        },
        identities: vec![plain_foreign.clone()],
        assignments: vec![assignment(
            "web",
            "apps",
            &plain_foreign,
            &foreign_binding,
            AssignedIdentityState::Assigned,
        )],
        ..cross.clone()
    });
    out.push(Case {
        name: "managed mode: a binding of another namespace does not apply",
        options: MatchOptions {
            mode: OperationMode::Managed,
            force_namespaced: false,
        },
        identities: vec![plain_foreign],
        assignments: Vec::new(),
        ..cross.clone()
    });
    out.push(Case {
        name: "managed mode: binding and identity of the pod's namespace",
        options: MatchOptions {
            mode: OperationMode::Managed,
            force_namespaced: false,
        },
        assignments: Vec::new(),
        ..case.clone()
    });

    // Several identities: no selector picks the first by namespace/name.
    let mut two = case.clone();
    two.name = "two identities, no selector: the first by name";
    two.identities.push(other.clone());
    two.bindings.push(other_binding.clone());
    two.assignments.push(assignment(
        "web",
        "apps",
        &other,
        &other_binding,
        AssignedIdentityState::Assigned,
    ));
    out.push(two.clone());
    out.push(Case {
        name: "two identities, the second by client id",
        query: Query::ClientId(CLIENT_B),
        expected: identity_outcome("apps/other", false),
        ..two
    });

    // The federated switch, read from the assignment's copies in standard mode.
    let switched = annotated(kv.clone(), &[(TOKEN_SOURCE_ANNOTATION, "federated")]);
    out.push(Case {
        name: "an identity switched to federation",
        identities: vec![switched.clone()],
        assignments: vec![assignment(
            "web",
            "apps",
            &switched,
            &kv_binding,
            AssignedIdentityState::Assigned,
        )],
        expected: identity_outcome("apps/kv", true),
        ..case.clone()
    });
    out.push(Case {
        name: "the live switch does not count until the assignment records it",
        identities: vec![switched.clone()],
        ..case.clone()
    });
    let stolen = annotated(
        switched.clone(),
        &[(FEDERATED_SERVICE_ACCOUNT_ANNOTATION, "kube-system/admin")],
    );
    out.push(Case {
        name: "a federated switch naming another namespace's service account is refused",
        identities: vec![stolen.clone()],
        assignments: vec![assignment(
            "web",
            "apps",
            &stolen,
            &kv_binding,
            AssignedIdentityState::Assigned,
        )],
        expected: refused(503),
        ..case.clone()
    });

    // Workload Identity pods.
    let wi_account = service_account(
        "apps",
        "web",
        &[
            (WORKLOAD_IDENTITY_CLIENT_ID_ANNOTATION, CLIENT_WI),
            (WORKLOAD_IDENTITY_TENANT_ID_ANNOTATION, "tenant-a"),
        ],
    );
    let wi = Case {
        serve_workload_identity_pods: true,
        service_accounts: vec![wi_account.clone()],
        ..base(
            "a Workload Identity pod is served with its service account's identity",
            &[WI],
            Query::None,
            workload(CLIENT_WI),
        )
    };
    out.push(wi.clone());
    out.push(Case {
        name: "a Workload Identity pod asking for its client id",
        query: Query::ClientId(CLIENT_WI),
        ..wi.clone()
    });
    out.push(Case {
        name: "a Workload Identity pod asking for another client id",
        query: Query::ClientId(CLIENT_A),
        expected: refused(400),
        ..wi.clone()
    });
    out.push(Case {
        name: "a Workload Identity pod asking by resource id",
        query: Query::ResourceId("/subscriptions/S/x"),
        expected: refused(400),
        ..wi.clone()
    });
    out.push(Case {
        name: "a Workload Identity pod asking by object id",
        query: Query::ObjectId("00000000-0000-0000-0000-000000000001"),
        expected: refused(400),
        ..wi.clone()
    });
    out.push(Case {
        name: "without the flag a Workload Identity pod is not served",
        serve_workload_identity_pods: false,
        expected: refused(400),
        ..wi.clone()
    });
    out.push(Case {
        name: "the label must be exactly true",
        pod: pod(
            "apps",
            "web",
            "web",
            &[(WORKLOAD_IDENTITY_USE_LABEL, "True")],
        ),
        expected: refused(400),
        ..wi.clone()
    });
    out.push(Case {
        name: "a Workload Identity pod whose service account does not exist",
        service_accounts: Vec::new(),
        expected: refused(403),
        ..wi.clone()
    });
    out.push(Case {
        name: "a Workload Identity pod whose service account names no client id",
        service_accounts: vec![service_account("apps", "web", &[])],
        expected: refused(403),
        ..wi.clone()
    });
    let no_tenant = service_account(
        "apps",
        "web",
        &[(WORKLOAD_IDENTITY_CLIENT_ID_ANNOTATION, CLIENT_WI)],
    );
    out.push(Case {
        name: "a Workload Identity service account without a tenant and no default tenant",
        service_accounts: vec![no_tenant.clone()],
        expected: refused(403),
        ..wi.clone()
    });
    out.push(Case {
        name: "a Workload Identity service account without a tenant, with a default tenant",
        service_accounts: vec![no_tenant],
        federated_default_tenant: true,
        ..wi.clone()
    });
    out.push(Case {
        name: "a Workload Identity pod without serviceAccountName runs as default",
        pod: pod("apps", "web", "", &[WI]),
        service_accounts: vec![service_account(
            "apps",
            "default",
            &[
                (WORKLOAD_IDENTITY_CLIENT_ID_ANNOTATION, CLIENT_WI),
                (WORKLOAD_IDENTITY_TENANT_ID_ANNOTATION, "tenant-a"),
            ],
        )],
        ..wi.clone()
    });
    out.push(Case {
        name: "a Workload Identity pod with a binding keeps its binding",
        pod: pod("apps", "web", "web", &[WI, LABEL]),
        identities: case.identities.clone(),
        bindings: case.bindings.clone(),
        assignments: case.assignments.clone(),
        expected: identity_outcome("apps/kv", false),
        ..wi.clone()
    });
    out
}
