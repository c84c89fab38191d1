//! Where a request goes: its path parsed into a [`Route`], and its Kubernetes verb.

use crate::store::Store;
use http::Method;
use std::collections::HashMap;

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    Version,
    Healthz,
    Api,
    Apis,
    Group(String),
    Resources { group: String, version: String },
    OpenidConfig,
    Jwks,
    OpenApiV3,
    OpenApiV3Doc { group: String, version: String },
    Resource(ResourcePath),
}

/// A path under a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResourcePath {
    pub kind: usize,
    /// Namespace from the path (`""` when none).
    pub namespace: String,
    /// Whether the path named a namespace (else: all namespaces / cluster-scoped).
    pub has_namespace: bool,
    pub name: Option<String>,
    pub sub: Option<String>,
    /// Old `/watch/` path prefix.
    pub watch_prefix: bool,
}

pub(crate) fn route(store: &Store, path: &str) -> Option<Route> {
    let segs: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => return Some(Route::Version),
        ["healthz" | "readyz" | "livez", ..] => return Some(Route::Healthz),
        [".well-known", "openid-configuration"] => return Some(Route::OpenidConfig),
        ["openid", "v1", "jwks"] => return Some(Route::Jwks),
        ["openapi", "v3"] => return Some(Route::OpenApiV3),
        ["openapi", "v3", "api", v] => {
            return Some(Route::OpenApiV3Doc {
                group: String::new(),
                version: (*v).to_string(),
            });
        }
        ["openapi", "v3", "apis", g, v] => {
            return Some(Route::OpenApiV3Doc {
                group: (*g).to_string(),
                version: (*v).to_string(),
            });
        }
        ["api"] => return Some(Route::Api),
        ["apis"] => return Some(Route::Apis),
        ["apis", g] => return Some(Route::Group((*g).to_string())),
        ["api", v] => {
            return Some(Route::Resources {
                group: String::new(),
                version: (*v).to_string(),
            });
        }
        ["apis", g, v] => {
            return Some(Route::Resources {
                group: (*g).to_string(),
                version: (*v).to_string(),
            });
        }
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let (watch_prefix, rest) = match rest {
        ["watch", r @ ..] => (true, r),
        r => (false, r),
    };
    let namespaced_kind = |plural: &str| {
        store
            .find(group, version, plural)
            .filter(|&k| store.kinds()[k].namespaced)
    };
    let (kind, namespace, has_namespace, tail) = match rest {
        ["namespaces", ns, plural, tail @ ..] if namespaced_kind(plural).is_some() => {
            (namespaced_kind(plural)?, (*ns).to_string(), true, tail)
        }
        [plural, tail @ ..] => (
            store.find(group, version, plural)?,
            String::new(),
            false,
            tail,
        ),
        [] => return None,
    };
    let (name, sub) = match tail {
        [] => (None, None),
        [n] => (Some((*n).to_string()), None),
        [n, s] => (Some((*n).to_string()), Some((*s).to_string())),
        _ => return None,
    };
    if has_namespace != store.kinds()[kind].namespaced && name.is_some() {
        return None;
    }
    Some(Route::Resource(ResourcePath {
        kind,
        namespace,
        has_namespace,
        name,
        sub,
        watch_prefix,
    }))
}

/// The Kubernetes verb of a request.
pub(crate) fn verb(
    method: &Method,
    route: Option<&Route>,
    query: &HashMap<String, String>,
) -> String {
    let Some(Route::Resource(p)) = route else {
        return method.as_str().to_ascii_lowercase();
    };
    let watch = p.watch_prefix || is_true(query.get("watch"));
    match (method, p.name.is_some()) {
        (&Method::GET, false) if watch => "watch",
        (&Method::GET, true) if watch => "watch",
        (&Method::GET, false) => "list",
        (&Method::GET, true) => "get",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, false) => "deletecollection",
        (&Method::DELETE, true) => "delete",
        _ => return method.as_str().to_ascii_lowercase(),
    }
    .to_string()
}

pub(super) fn is_true(v: Option<&String>) -> bool {
    v.is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

pub(crate) fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    url::form_urlencoded::parse(q.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds;

    fn store() -> Store {
        Store::new(kinds::builtin(), 10)
    }

    fn res(store: &Store, path: &str) -> ResourcePath {
        match route(store, path) {
            Some(Route::Resource(p)) => p,
            other => panic!("{path}: {other:?}"),
        }
    }

    #[test]
    fn routes_namespaced_cluster_and_all_namespace_paths() {
        let s = store();
        let pods = s.find("", "v1", "pods").expect("pods");
        let nss = s.find("", "v1", "namespaces").expect("namespaces");
        let p = res(&s, "/api/v1/namespaces/app/pods/web-1/status");
        assert_eq!(
            (p.kind, p.namespace.as_str(), p.has_namespace),
            (pods, "app", true)
        );
        assert_eq!(
            (p.name.as_deref(), p.sub.as_deref()),
            (Some("web-1"), Some("status"))
        );
        let p = res(&s, "/api/v1/pods");
        assert_eq!((p.kind, p.has_namespace, p.name), (pods, false, None));
        // A namespace called like a resource is still a namespace.
        let p = res(&s, "/api/v1/namespaces/pods");
        assert_eq!((p.kind, p.name.as_deref()), (nss, Some("pods")));
        let p = res(&s, "/api/v1/watch/namespaces/app/pods");
        assert!(p.watch_prefix && p.has_namespace);
        let p = res(
            &s,
            "/apis/aadpodidentity.k8s.io/v1/namespaces/default/azureidentitybindings/b",
        );
        assert_eq!(s.kinds()[p.kind].kind, "AzureIdentityBinding");
        // A namespaced object needs its namespace in the path.
        assert_eq!(route(&s, "/api/v1/pods/web-1"), None);
        assert_eq!(route(&s, "/apis/nope/v1/things"), None);
        assert_eq!(route(&s, "/api/v1/namespaces/a/pods/b/c/d"), None);
        assert_eq!(route(&s, "/version"), Some(Route::Version));
        assert_eq!(route(&s, "/openid/v1/jwks"), Some(Route::Jwks));
    }

    #[test]
    fn verbs_follow_method_and_watch_parameter() {
        let s = store();
        let q = |w: &str| parse_query(Some(w));
        let r = route(&s, "/api/v1/pods");
        assert_eq!(verb(&Method::GET, r.as_ref(), &q("")), "list");
        assert_eq!(verb(&Method::GET, r.as_ref(), &q("watch=true")), "watch");
        assert_eq!(verb(&Method::GET, r.as_ref(), &q("watch=1")), "watch");
        assert_eq!(verb(&Method::GET, r.as_ref(), &q("watch=false")), "list");
        assert_eq!(
            verb(&Method::DELETE, r.as_ref(), &q("")),
            "deletecollection"
        );
        let r = route(&s, "/api/v1/namespaces/a/pods/p");
        assert_eq!(verb(&Method::PATCH, r.as_ref(), &q("")), "patch");
        assert_eq!(
            verb(&Method::GET, route(&s, "/version").as_ref(), &q("")),
            "get"
        );
    }
}
