//! Authentication (bearer tokens) and RBAC authorization, as a real API server with anonymous
//! authentication limited to the public discovery paths.
//!
//! Trust boundary: every request over HTTP is authenticated here before it reaches the store.
//! The admin token (written into the kubeconfig the server writes) is `system:masters` and
//! bypasses RBAC; a ServiceAccount token from TokenRequest authenticates as
//! `system:serviceaccount:<ns>:<name>` only while it verifies against the server's key, is not
//! expired, carries the server's own audience (the issuer) and its ServiceAccount (and bound
//! object) still exist with the same uid. Everything else is `401`. The in-process helpers
//! (`create_json`, …) run as the admin without a token: they are the test's own hands.

use crate::status::ApiError;
use crate::store::{Filter, Store};
use serde::Deserialize;
use serde_json::{Value, json};

/// The admin user the kubeconfig's token authenticates as.
pub const ADMIN_USER: &str = "podid-test-admin";

/// The group that bypasses authorization, as on a real cluster.
pub const MASTERS_GROUP: &str = "system:masters";

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User name (`system:serviceaccount:ns:name` for a ServiceAccount).
    pub user: String,
    /// Groups, `system:authenticated` included.
    pub groups: Vec<String>,
    /// uid (the ServiceAccount's uid), if any.
    pub uid: Option<String>,
}

impl Identity {
    /// The admin (`system:masters`).
    pub fn admin() -> Self {
        Self {
            user: ADMIN_USER.to_string(),
            groups: vec![
                MASTERS_GROUP.to_string(),
                "system:authenticated".to_string(),
            ],
            uid: None,
        }
    }

    /// The unauthenticated user (only for the public paths).
    pub fn anonymous() -> Self {
        Self {
            user: "system:anonymous".to_string(),
            groups: vec!["system:unauthenticated".to_string()],
            uid: None,
        }
    }

    /// A ServiceAccount's identity with the groups the real authenticator adds.
    pub fn service_account(ns: &str, name: &str, uid: Option<String>) -> Self {
        Self {
            user: format!("system:serviceaccount:{ns}:{name}"),
            groups: vec![
                "system:serviceaccounts".to_string(),
                format!("system:serviceaccounts:{ns}"),
                "system:authenticated".to_string(),
            ],
            uid,
        }
    }

    fn is_master(&self) -> bool {
        self.groups.iter().any(|g| g == MASTERS_GROUP)
    }
}

/// `401 Unauthorized`, as the real server answers a missing or bad token.
pub fn unauthorized() -> ApiError {
    ApiError {
        code: 401,
        reason: "Unauthorized",
        message: "Unauthorized".to_string(),
        details: None,
        retry_after: None,
    }
}

#[derive(Debug, Deserialize)]
struct SaClaims {
    sub: String,
    #[serde(rename = "kubernetes.io")]
    k8s: Option<K8sClaims>,
}

#[derive(Debug, Deserialize)]
struct K8sClaims {
    namespace: String,
    serviceaccount: ObjRef,
    pod: Option<ObjRef>,
    secret: Option<ObjRef>,
}

#[derive(Debug, Deserialize)]
struct ObjRef {
    name: String,
    uid: String,
}

fn uid_of(store: &Store, plural: &str, ns: &str, name: &str) -> Option<String> {
    let k = store.find("", "v1", plural)?;
    store
        .get(k, ns, name)
        .ok()?
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// Authenticates a ServiceAccount token from TokenRequest.
pub fn service_account_token(
    store: &Store,
    key: &podid_test_keys::SigningKey,
    issuer: &str,
    token: &str,
) -> Option<Identity> {
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    v.set_issuer(&[issuer]);
    v.set_audience(&[issuer]);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    v.leeway = 0;
    let claims: SaClaims = key.verify(token, &v).ok()?;
    let k = claims.k8s?;
    if claims.sub
        != format!(
            "system:serviceaccount:{}:{}",
            k.namespace, k.serviceaccount.name
        )
    {
        return None;
    }
    // A deleted (or deleted and recreated) ServiceAccount or bound object invalidates the token.
    let alive = |plural: &str, r: &ObjRef| {
        uid_of(store, plural, &k.namespace, &r.name).is_some_and(|u| u == r.uid)
    };
    if !alive("serviceaccounts", &k.serviceaccount) {
        return None;
    }
    if let Some(p) = &k.pod
        && !alive("pods", p)
    {
        return None;
    }
    if let Some(s) = &k.secret
        && !alive("secrets", s)
    {
        return None;
    }
    Some(Identity::service_account(
        &k.namespace,
        &k.serviceaccount.name,
        Some(k.serviceaccount.uid.clone()),
    ))
}

/// What a request asks to do, in RBAC's terms.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Attributes {
    /// Whether this is a resource request (else a non-resource path).
    pub resource_request: bool,
    /// Verb (`get`, `list`, `watch`, `create`, …; lower-case HTTP method for paths).
    pub verb: String,
    /// Namespace (`""`: cluster scope or all namespaces).
    pub namespace: String,
    /// API group.
    pub group: String,
    /// Resource (plural).
    pub resource: String,
    /// Subresource (`status`, `token`), `""` if none.
    pub subresource: String,
    /// Object name, `""` if none.
    pub name: String,
    /// Path of a non-resource request.
    pub path: String,
}

impl Attributes {
    fn resource_with_sub(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }
}

fn strs(v: Option<&Value>) -> Vec<&str> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Whether one PolicyRule allows the request (Kubernetes' matching rules).
pub fn rule_allows(rule: &Value, a: &Attributes) -> bool {
    let verbs = strs(rule.get("verbs"));
    if !verbs.iter().any(|v| *v == "*" || *v == a.verb) {
        return false;
    }
    if !a.resource_request {
        return strs(rule.get("nonResourceURLs")).iter().any(|u| {
            *u == "*" || *u == a.path || u.strip_suffix('*').is_some_and(|p| a.path.starts_with(p))
        });
    }
    let groups = strs(rule.get("apiGroups"));
    if !groups.iter().any(|g| *g == "*" || *g == a.group) {
        return false;
    }
    let combined = a.resource_with_sub();
    let resources = strs(rule.get("resources"));
    let resource_ok = resources.iter().any(|r| {
        *r == "*"
            || *r == combined
            || (!a.subresource.is_empty()
                && (*r == format!("*/{}", a.subresource) || *r == format!("{}/*", a.resource)))
    });
    if !resource_ok {
        return false;
    }
    let names = strs(rule.get("resourceNames"));
    names.is_empty() || names.contains(&a.name.as_str())
}

fn subject_matches(subject: &Value, binding_ns: &str, who: &Identity) -> bool {
    let s = |f: &str| subject.get(f).and_then(Value::as_str).unwrap_or("");
    match s("kind") {
        "User" => s("name") == who.user,
        "Group" => who.groups.iter().any(|g| g == s("name")),
        "ServiceAccount" => {
            let ns = if s("namespace").is_empty() {
                binding_ns
            } else {
                s("namespace")
            };
            who.user == format!("system:serviceaccount:{ns}:{}", s("name"))
        }
        _ => false,
    }
}

fn subject_label(subject: &Value) -> String {
    let s = |f: &str| subject.get(f).and_then(Value::as_str).unwrap_or("");
    match s("kind") {
        "ServiceAccount" => format!("ServiceAccount \"{}/{}\"", s("namespace"), s("name")),
        k => format!("{k} \"{}\"", s("name")),
    }
}

fn objects(store: &Store, plural: &str, ns: Option<&str>) -> Vec<Value> {
    let Some(k) = store.find("rbac.authorization.k8s.io", "v1", plural) else {
        return Vec::new();
    };
    let filter = Filter {
        namespace: ns.map(str::to_string),
        ..Filter::default()
    };
    store.list(k, &filter).0
}

fn role_rules(store: &Store, kind: &str, ns: &str, name: &str) -> Vec<Value> {
    let (plural, ns) = match kind {
        "ClusterRole" => ("clusterroles", ""),
        "Role" => ("roles", ns),
        _ => return Vec::new(),
    };
    let Some(k) = store.find("rbac.authorization.k8s.io", "v1", plural) else {
        return Vec::new();
    };
    store
        .get(k, ns, name)
        .ok()
        .and_then(|r| r.get("rules").and_then(Value::as_array).cloned())
        .unwrap_or_default()
}

/// The RBAC decision: `Some(reason)` if allowed, `None` if not.
pub fn authorize(store: &Store, who: &Identity, a: &Attributes) -> Option<String> {
    if who.is_master() {
        return Some(String::new());
    }
    let check =
        |binding: &Value, binding_kind: &str, scope_ns: &str| -> Option<String> {
            let subjects = binding.get("subjects").and_then(Value::as_array)?;
            let subject = subjects
                .iter()
                .find(|s| subject_matches(s, scope_ns, who))?;
            let role_kind = binding.pointer("/roleRef/kind").and_then(Value::as_str)?;
            let role_name = binding.pointer("/roleRef/name").and_then(Value::as_str)?;
            let rules = role_rules(store, role_kind, scope_ns, role_name);
            rules.iter().any(|r| rule_allows(r, a)).then(|| {
            let bname = binding.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
            let bref = if scope_ns.is_empty() {
                bname.to_string()
            } else {
                format!("{bname}/{scope_ns}")
            };
            format!(
                "RBAC: allowed by {binding_kind} \"{bref}\" of {role_kind} \"{role_name}\" to {}",
                subject_label(subject)
            )
        })
        };
    for b in objects(store, "clusterrolebindings", None) {
        if let Some(reason) = check(&b, "ClusterRoleBinding", "") {
            return Some(reason);
        }
    }
    // RoleBindings apply only to resource requests inside their namespace.
    if a.resource_request && !a.namespace.is_empty() {
        for b in objects(store, "rolebindings", Some(&a.namespace)) {
            if let Some(reason) = check(&b, "RoleBinding", &a.namespace) {
                return Some(reason);
            }
        }
    }
    None
}

/// The `403 Forbidden` the real server answers, message included.
pub fn forbidden(who: &Identity, a: &Attributes) -> ApiError {
    if !a.resource_request {
        return ApiError {
            code: 403,
            reason: "Forbidden",
            message: format!(
                "forbidden: User \"{}\" cannot {} path \"{}\"",
                who.user, a.verb, a.path
            ),
            details: Some(json!({})),
            retry_after: None,
        };
    }
    let qualified = if a.group.is_empty() {
        a.resource.clone()
    } else {
        format!("{}.{}", a.resource, a.group)
    };
    let subject = if a.name.is_empty() {
        qualified
    } else {
        format!("{qualified} \"{}\"", a.name)
    };
    let scope = if a.namespace.is_empty() {
        "at the cluster scope".to_string()
    } else {
        format!("in the namespace \"{}\"", a.namespace)
    };
    let mut details = json!({"kind": a.resource});
    if !a.name.is_empty() {
        details["name"] = json!(a.name);
    }
    if !a.group.is_empty() {
        details["group"] = json!(a.group);
    }
    ApiError {
        code: 403,
        reason: "Forbidden",
        message: format!(
            "{subject} is forbidden: User \"{}\" cannot {} resource \"{}\" in API group \"{}\" {scope}",
            who.user,
            a.verb,
            a.resource_with_sub(),
            a.group
        ),
        details: Some(details),
        retry_after: None,
    }
}

/// Answers a `SelfSubjectAccessReview` (or, with `subject`, a `SubjectAccessReview`) body.
pub fn access_review(
    store: &Store,
    who: &Identity,
    mut body: Value,
    kind: &str,
) -> Result<Value, ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad_request("the request body must be an object"));
    }
    let spec = body.get("spec").cloned().unwrap_or_else(|| json!({}));
    let s = |p: &str| {
        spec.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let a = if spec.get("resourceAttributes").is_some_and(|v| !v.is_null()) {
        Attributes {
            resource_request: true,
            verb: s("/resourceAttributes/verb"),
            namespace: s("/resourceAttributes/namespace"),
            group: s("/resourceAttributes/group"),
            resource: s("/resourceAttributes/resource"),
            subresource: s("/resourceAttributes/subresource"),
            name: s("/resourceAttributes/name"),
            path: String::new(),
        }
    } else if spec
        .get("nonResourceAttributes")
        .is_some_and(|v| !v.is_null())
    {
        Attributes {
            resource_request: false,
            verb: s("/nonResourceAttributes/verb"),
            path: s("/nonResourceAttributes/path"),
            ..Attributes::default()
        }
    } else {
        return Err(ApiError::invalid(
            kind,
            "authorization.k8s.io",
            "",
            "spec.resourceAttributes",
            "Required value: exactly one of nonResourceAttributes or resourceAttributes must be specified",
        ));
    };
    let subject = if kind == "SubjectAccessReview" {
        Identity {
            user: s("/user"),
            groups: strs(spec.get("groups"))
                .into_iter()
                .map(str::to_string)
                .collect(),
            uid: None,
        }
    } else {
        who.clone()
    };
    let status = match authorize(store, &subject, &a) {
        Some(reason) => json!({"allowed": true, "reason": reason}),
        None => json!({"allowed": false}),
    };
    body["apiVersion"] = json!("authorization.k8s.io/v1");
    body["kind"] = json!(kind);
    body["metadata"] = json!({"creationTimestamp": null});
    body["status"] = status;
    Ok(body)
}

/// `SelfSubjectReview` (`kubectl auth whoami`).
pub fn self_subject_review(who: &Identity) -> Value {
    let mut info = json!({"username": who.user, "groups": who.groups});
    if let Some(uid) = &who.uid {
        info["uid"] = json!(uid);
    }
    json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "SelfSubjectReview",
        "metadata": {"creationTimestamp": null},
        "status": {"userInfo": info},
    })
}

/// The cluster roles and bindings every real cluster bootstraps that matter here: discovery
/// and self-reviews for every authenticated user, and `cluster-admin` for `system:masters`.
pub fn bootstrap_objects() -> Vec<(&'static str, Value)> {
    let role = |name: &str, rules: Value| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
            "rules": rules})
    };
    let binding = |name: &str, group: &str| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": group}]})
    };
    vec![
        (
            "clusterroles",
            role(
                "cluster-admin",
                json!([
                    {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                    {"nonResourceURLs": ["*"], "verbs": ["*"]}
                ]),
            ),
        ),
        (
            "clusterroles",
            role(
                "system:discovery",
                json!([{"nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*", "/healthz",
                    "/livez", "/openapi", "/openapi/*", "/readyz", "/version", "/version/"],
                    "verbs": ["get"]}]),
            ),
        ),
        (
            "clusterroles",
            role(
                "system:basic-user",
                json!([
                    {"apiGroups": ["authorization.k8s.io"],
                     "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"], "verbs": ["create"]},
                    {"apiGroups": ["authentication.k8s.io"], "resources": ["selfsubjectreviews"], "verbs": ["create"]}
                ]),
            ),
        ),
        (
            "clusterroles",
            role(
                "system:public-info-viewer",
                json!([{"nonResourceURLs": ["/healthz", "/livez", "/readyz", "/version", "/version/"],
                    "verbs": ["get"]}]),
            ),
        ),
        (
            "clusterroles",
            role(
                "system:service-account-issuer-discovery",
                json!([{"nonResourceURLs": ["/.well-known/openid-configuration", "/openid/v1/jwks"],
                    "verbs": ["get"]}]),
            ),
        ),
        (
            "clusterrolebindings",
            binding("cluster-admin", MASTERS_GROUP),
        ),
        (
            "clusterrolebindings",
            binding("system:discovery", "system:authenticated"),
        ),
        (
            "clusterrolebindings",
            binding("system:basic-user", "system:authenticated"),
        ),
        (
            "clusterrolebindings",
            binding("system:public-info-viewer", "system:authenticated"),
        ),
        (
            "clusterrolebindings",
            binding(
                "system:service-account-issuer-discovery",
                "system:serviceaccounts",
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(verb: &str, ns: &str, group: &str, resource: &str, sub: &str, name: &str) -> Attributes {
        Attributes {
            resource_request: true,
            verb: verb.into(),
            namespace: ns.into(),
            group: group.into(),
            resource: resource.into(),
            subresource: sub.into(),
            name: name.into(),
            path: String::new(),
        }
    }

    #[test]
    fn rules_match_verbs_groups_resources_subresources_and_names() {
        let r = json!({"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]});
        assert!(rule_allows(&r, &res("get", "a", "", "pods", "", "p")));
        assert!(rule_allows(&r, &res("list", "a", "", "pods", "", "")));
        assert!(!rule_allows(&r, &res("watch", "a", "", "pods", "", "")));
        assert!(!rule_allows(&r, &res("get", "a", "apps", "pods", "", "p")));
        // A resource does not grant its subresources.
        assert!(!rule_allows(
            &r,
            &res("get", "a", "", "pods", "status", "p")
        ));
        let r = json!({"apiGroups": [""], "resources": ["pods/status"], "verbs": ["*"]});
        assert!(rule_allows(
            &r,
            &res("patch", "a", "", "pods", "status", "p")
        ));
        assert!(!rule_allows(&r, &res("patch", "a", "", "pods", "", "p")));
        let r = json!({"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["get"]});
        assert!(rule_allows(
            &r,
            &res("get", "a", "x.io", "ws", "status", "w")
        ));
        assert!(!rule_allows(&r, &res("get", "a", "x.io", "ws", "", "w")));
        let r = json!({"apiGroups": [""], "resources": ["serviceaccounts/*"], "verbs": ["create"]});
        assert!(rule_allows(
            &r,
            &res("create", "a", "", "serviceaccounts", "token", "sa")
        ));
        // resourceNames: only requests naming one of them (a list or a create names none).
        let r = json!({"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["s1"], "verbs": ["get", "list", "create"]});
        assert!(rule_allows(&r, &res("get", "a", "", "secrets", "", "s1")));
        assert!(!rule_allows(&r, &res("get", "a", "", "secrets", "", "s2")));
        assert!(!rule_allows(&r, &res("list", "a", "", "secrets", "", "")));
        assert!(!rule_allows(&r, &res("create", "a", "", "secrets", "", "")));
        let r = json!({"nonResourceURLs": ["/healthz", "/apis/*"], "verbs": ["get"]});
        let path = |p: &str, v: &str| Attributes {
            verb: v.into(),
            path: p.into(),
            ..Attributes::default()
        };
        assert!(rule_allows(&r, &path("/healthz", "get")));
        assert!(rule_allows(&r, &path("/apis/x/v1", "get")));
        assert!(!rule_allows(&r, &path("/healthz", "post")));
        assert!(!rule_allows(&r, &path("/api", "get")));
        // Resource rules never grant paths, nor path rules resources.
        assert!(!rule_allows(&r, &res("get", "", "", "healthz", "", "")));
    }

    #[test]
    fn forbidden_messages_read_like_the_real_ones() {
        let who = Identity::service_account("app", "web", None);
        let e = forbidden(&who, &res("list", "default", "", "pods", "", ""));
        assert_eq!(
            e.message,
            "pods is forbidden: User \"system:serviceaccount:app:web\" cannot list resource \"pods\" in API group \"\" in the namespace \"default\""
        );
        let e = forbidden(
            &who,
            &res(
                "get",
                "",
                "aadpodidentity.k8s.io",
                "azureidentities",
                "",
                "",
            ),
        );
        assert_eq!(
            e.message,
            "azureidentities.aadpodidentity.k8s.io is forbidden: User \"system:serviceaccount:app:web\" cannot get resource \"azureidentities\" in API group \"aadpodidentity.k8s.io\" at the cluster scope"
        );
        let e = forbidden(
            &who,
            &res("create", "app", "", "serviceaccounts", "token", "x"),
        );
        assert!(e.message.starts_with("serviceaccounts \"x\" is forbidden"));
        assert!(e.message.contains("resource \"serviceaccounts/token\""));
        assert_eq!((e.code, e.reason), (403, "Forbidden"));
    }
}
