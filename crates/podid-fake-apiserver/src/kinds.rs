//! The kinds the fake server stores, and how their paths and discovery documents look.

/// Describes one resource type the server stores as raw JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindSpec {
    /// API group (`""` for core).
    pub group: String,
    /// API version (`v1`).
    pub version: String,
    /// `kind` (`Pod`).
    pub kind: String,
    /// Plural resource name used in paths (`pods`).
    pub plural: String,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
    /// Whether the kind has a `/status` subresource (status changes through the main endpoint
    /// are then ignored, and `/status` changes only status).
    pub status_subresource: bool,
    /// Whether the kind is a custom resource (defined by a CRD): strategic-merge patches are
    /// refused with `415`, as on a real server.
    pub custom: bool,
    /// Whether the kind is a review that is only ever created and never stored
    /// (`SelfSubjectAccessReview`, …).
    pub review: bool,
}

impl KindSpec {
    /// A namespaced kind without a status subresource.
    pub fn namespaced(group: &str, version: &str, kind: &str, plural: &str) -> Self {
        Self {
            group: group.to_string(),
            version: version.to_string(),
            kind: kind.to_string(),
            plural: plural.to_string(),
            namespaced: true,
            status_subresource: false,
            custom: false,
            review: false,
        }
    }

    /// A cluster-scoped kind without a status subresource.
    pub fn cluster(group: &str, version: &str, kind: &str, plural: &str) -> Self {
        Self {
            namespaced: false,
            ..Self::namespaced(group, version, kind, plural)
        }
    }

    /// The same kind with a `/status` subresource.
    pub fn with_status(mut self) -> Self {
        self.status_subresource = true;
        self
    }

    /// The same kind, marked as a custom resource.
    pub fn custom(mut self) -> Self {
        self.custom = true;
        self
    }

    fn review(mut self) -> Self {
        self.review = true;
        self
    }

    /// `apiVersion` of objects of this kind (`v1`, `coordination.k8s.io/v1`).
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Singular resource name (lower-case kind).
    pub fn singular(&self) -> String {
        self.kind.to_ascii_lowercase()
    }
}

/// The group of the aad-pod-identity CRDs.
pub const AADPODIDENTITY_GROUP: &str = "aadpodidentity.k8s.io";

/// Kinds registered on every server.
pub fn builtin() -> Vec<KindSpec> {
    let aad = |kind: &str, plural: &str| {
        KindSpec::namespaced(AADPODIDENTITY_GROUP, "v1", kind, plural).custom()
    };
    let rbac = "rbac.authorization.k8s.io";
    vec![
        KindSpec::namespaced("", "v1", "Pod", "pods").with_status(),
        KindSpec::cluster("", "v1", "Node", "nodes").with_status(),
        KindSpec::cluster("", "v1", "Namespace", "namespaces"),
        KindSpec::namespaced("", "v1", "Secret", "secrets"),
        KindSpec::namespaced("", "v1", "ServiceAccount", "serviceaccounts"),
        KindSpec::namespaced("", "v1", "ConfigMap", "configmaps"),
        KindSpec::namespaced("", "v1", "Event", "events"),
        KindSpec::namespaced("", "v1", "Endpoints", "endpoints"),
        KindSpec::namespaced("events.k8s.io", "v1", "Event", "events"),
        KindSpec::namespaced("coordination.k8s.io", "v1", "Lease", "leases"),
        KindSpec::namespaced(rbac, "v1", "Role", "roles"),
        KindSpec::cluster(rbac, "v1", "ClusterRole", "clusterroles"),
        KindSpec::namespaced(rbac, "v1", "RoleBinding", "rolebindings"),
        KindSpec::cluster(rbac, "v1", "ClusterRoleBinding", "clusterrolebindings"),
        KindSpec::cluster(
            "authorization.k8s.io",
            "v1",
            "SelfSubjectAccessReview",
            "selfsubjectaccessreviews",
        )
        .review(),
        KindSpec::cluster(
            "authorization.k8s.io",
            "v1",
            "SubjectAccessReview",
            "subjectaccessreviews",
        )
        .review(),
        KindSpec::cluster(
            "authentication.k8s.io",
            "v1",
            "SelfSubjectReview",
            "selfsubjectreviews",
        )
        .review(),
        aad("AzureIdentity", "azureidentities"),
        aad("AzureIdentityBinding", "azureidentitybindings"),
        aad("AzureAssignedIdentity", "azureassignedidentities"),
        aad("AzurePodIdentityException", "azurepodidentityexceptions"),
    ]
}
