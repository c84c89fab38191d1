//! Authentication and RBAC: the fake refuses what a real API server refuses.

mod common;

use common::{admin_http, setup, status};
use k8s_openapi::api::authorization::v1::SelfSubjectAccessReview;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use podid_fake_apiserver::FakeApiServer;
use serde_json::{Value, json};

async fn client_with(server: &FakeApiServer, yaml: &str) -> kube::Client {
    let kc = Kubeconfig::from_yaml(yaml).expect("kubeconfig");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config");
    let _ = server;
    kube::Client::try_from(cfg).expect("client")
}

fn create(server: &FakeApiServer, path: &str, obj: Value) {
    server
        .create_json(path, obj)
        .unwrap_or_else(|e| panic!("{path}: {}", e.message));
}

/// ServiceAccount `app/web` and a client authenticating with its TokenRequest token.
async fn service_account_client(server: &FakeApiServer) -> kube::Client {
    create(
        server,
        "/api/v1/namespaces/app/serviceaccounts",
        json!({"metadata": {"name": "web"}}),
    );
    let token = server
        .service_account_token("app", "web", 3600)
        .expect("token");
    client_with(server, &server.kubeconfig_with_token(&token)).await
}

fn secret(name: &str) -> Value {
    json!({"metadata": {"name": name}, "data": {"k": "dg=="}})
}

#[tokio::test]
async fn requests_without_a_valid_token_are_unauthorized() {
    let (server, _client) = setup().await;
    let http = reqwest::Client::new();
    let url = |p: &str| format!("{}{p}", server.url());
    let r = http
        .get(url("/api/v1/namespaces/default/secrets"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.expect("json");
    assert_eq!(
        (v["kind"].as_str(), v["reason"].as_str()),
        (Some("Status"), Some("Unauthorized"))
    );
    for bad in [
        "nope",
        "podid-admin-x",
        &format!("{}x", server.admin_token()),
    ] {
        let r = http
            .get(url("/api/v1/namespaces/default/secrets"))
            .bearer_auth(bad)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 401, "{bad}");
    }
    // Health, version and the issuer documents stay public, as on a cluster.
    for p in ["/healthz", "/version", "/openid/v1/jwks"] {
        let r = http.get(url(p)).send().await.expect("send");
        assert_eq!(r.status(), 200, "{p}");
    }
    let r = admin_http(&server)
        .get(url("/api/v1/namespaces/default/secrets"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn service_account_tokens_authenticate_and_stop_when_the_account_goes() {
    let (server, client) = setup().await;
    let sa_client = service_account_client(&server).await;
    let review = sa_client
        .request::<Value>(
            http::Request::post("/apis/authentication.k8s.io/v1/selfsubjectreviews")
                .header("content-type", "application/json")
                .body(
                    serde_json::to_vec(&json!({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}))
                        .expect("body"),
                )
                .expect("request"),
        )
        .await
        .expect("whoami");
    assert_eq!(
        review["status"]["userInfo"]["username"],
        "system:serviceaccount:app:web"
    );
    assert_eq!(
        review["status"]["userInfo"]["groups"],
        json!([
            "system:serviceaccounts",
            "system:serviceaccounts:app",
            "system:authenticated"
        ])
    );

    // A token for another audience is not an API credential.
    let tr = server
        .create_json(
            "/api/v1/namespaces/app/serviceaccounts/web/token",
            json!({"spec": {"audiences": ["api://AzureADTokenExchange"]}}),
        )
        .expect("token");
    let foreign = tr["status"]["token"].as_str().expect("token").to_string();
    let foreign = client_with(&server, &server.kubeconfig_with_token(&foreign)).await;
    let pods: Api<Pod> = Api::namespaced(foreign, "app");
    assert_eq!(
        status(pods.list(&ListParams::default()).await.expect_err("401")).code,
        401
    );

    // Deleting the ServiceAccount invalidates its tokens, even if it is recreated.
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "app");
    sas.delete("web", &DeleteParams::default())
        .await
        .expect("delete");
    create(
        &server,
        "/api/v1/namespaces/app/serviceaccounts",
        json!({"metadata": {"name": "web"}}),
    );
    let pods: Api<Pod> = Api::namespaced(sa_client, "app");
    assert_eq!(
        status(pods.list(&ListParams::default()).await.expect_err("401")).code,
        401
    );
}

#[tokio::test]
async fn a_role_grants_exactly_what_it_says() {
    let (server, client) = setup().await;
    let sa_client = service_account_client(&server).await;
    for name in ["s1", "s2"] {
        create(&server, "/api/v1/namespaces/app/secrets", secret(name));
        create(&server, "/api/v1/namespaces/default/secrets", secret(name));
    }
    create(
        &server,
        "/apis/rbac.authorization.k8s.io/v1/namespaces/app/roles",
        json!({"metadata": {"name": "r"}, "rules": [
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["s1"], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
            {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["patch"]},
        ]}),
    );
    let secrets: Api<Secret> = Api::namespaced(sa_client.clone(), "app");
    // Before the binding, nothing.
    let e = status(secrets.get("s1").await.expect_err("unbound"));
    assert_eq!((e.code, e.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        e.message,
        "secrets \"s1\" is forbidden: User \"system:serviceaccount:app:web\" cannot get resource \"secrets\" in API group \"\" in the namespace \"app\""
    );
    create(
        &server,
        "/apis/rbac.authorization.k8s.io/v1/namespaces/app/rolebindings",
        json!({"metadata": {"name": "rb"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "r"},
            "subjects": [{"kind": "ServiceAccount", "name": "web"}]}),
    );
    secrets.get("s1").await.expect("named secret");
    assert_eq!(
        status(secrets.get("s2").await.expect_err("other name")).code,
        403
    );
    let e = status(
        secrets
            .list(&ListParams::default())
            .await
            .expect_err("list"),
    );
    assert_eq!(
        e.message,
        "secrets is forbidden: User \"system:serviceaccount:app:web\" cannot list resource \"secrets\" in API group \"\" in the namespace \"app\""
    );
    let other_ns: Api<Secret> = Api::namespaced(sa_client.clone(), "default");
    assert_eq!(
        status(other_ns.get("s1").await.expect_err("other ns")).code,
        403
    );

    let pods: Api<Pod> = Api::namespaced(sa_client.clone(), "app");
    pods.list(&ListParams::default()).await.expect("list pods");
    let e = status(
        pods.create(&PostParams::default(), &common::pod("p", &[], None))
            .await
            .expect_err("create"),
    );
    assert_eq!(e.code, 403);
    let all: Api<Pod> = Api::all(sa_client.clone());
    let e = status(
        all.list(&ListParams::default())
            .await
            .expect_err("all namespaces"),
    );
    assert!(e.message.ends_with("at the cluster scope"), "{}", e.message);
    // pods/status is not pods.
    Api::<Pod>::namespaced(client.clone(), "app")
        .create(&PostParams::default(), &common::pod("p", &[], None))
        .await
        .expect("admin creates");
    let merge = Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}}));
    assert_eq!(
        status(
            pods.patch("p", &PatchParams::default(), &merge)
                .await
                .expect_err("main")
        )
        .code,
        403
    );
    pods.patch_status("p", &PatchParams::default(), &merge)
        .await
        .expect("status");

    // A ClusterRole bound by a RoleBinding applies in that namespace only; by a
    // ClusterRoleBinding (to a group) everywhere.
    create(
        &server,
        "/apis/rbac.authorization.k8s.io/v1/clusterroles",
        json!({"metadata": {"name": "ns-reader"}, "rules": [
            {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list"]},
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]}]}),
    );
    create(
        &server,
        "/apis/rbac.authorization.k8s.io/v1/namespaces/app/rolebindings",
        json!({"metadata": {"name": "ns-reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "ns-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "web", "namespace": "app"}]}),
    );
    secrets
        .list(&ListParams::default())
        .await
        .expect("list in app");
    assert_eq!(
        status(
            other_ns
                .list(&ListParams::default())
                .await
                .expect_err("default")
        )
        .code,
        403
    );
    let nss: Api<Namespace> = Api::all(sa_client.clone());
    nss.get("app").await.expect("its own namespace");
    assert_eq!(
        status(nss.get("default").await.expect_err("other")).code,
        403
    );
    assert_eq!(
        status(nss.list(&ListParams::default()).await.expect_err("list")).code,
        403
    );
    create(
        &server,
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        json!({"metadata": {"name": "ns-reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "ns-reader"},
            "subjects": [{"kind": "Group", "name": "system:serviceaccounts:app"}]}),
    );
    nss.list(&ListParams::default())
        .await
        .expect("cluster-wide");
    other_ns
        .list(&ListParams::default())
        .await
        .expect("everywhere");
}

async fn can_i(client: &kube::Client, attrs: Value) -> bool {
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let r: SelfSubjectAccessReview = serde_json::from_value(
        json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview", "spec": attrs}),
    )
    .expect("review");
    reviews
        .create(&PostParams::default(), &r)
        .await
        .expect("review answered")
        .status
        .expect("status")
        .allowed
}

#[tokio::test]
async fn self_subject_access_reviews_answer_for_the_caller() {
    let (server, client) = setup().await;
    let sa_client = service_account_client(&server).await;
    create(
        &server,
        "/apis/rbac.authorization.k8s.io/v1/namespaces/app/roles",
        json!({"metadata": {"name": "r"}, "rules": [
            {"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]}]}),
    );
    create(
        &server,
        "/apis/rbac.authorization.k8s.io/v1/namespaces/app/rolebindings",
        json!({"metadata": {"name": "rb"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "r"},
            "subjects": [{"kind": "User", "name": "system:serviceaccount:app:web"}]}),
    );
    let token = json!({"resourceAttributes": {"namespace": "app", "verb": "create",
        "resource": "serviceaccounts", "subresource": "token", "name": "web"}});
    assert!(can_i(&sa_client, token.clone()).await);
    assert!(
        !can_i(
            &sa_client,
            json!({"resourceAttributes": {"namespace": "app", "verb": "create", "resource": "serviceaccounts"}})
        )
        .await
    );
    assert!(
        can_i(
            &client,
            json!({"resourceAttributes": {"verb": "delete", "resource": "nodes"}})
        )
        .await
    );
    assert!(
        can_i(
            &sa_client,
            json!({"nonResourceAttributes": {"path": "/api", "verb": "get"}})
        )
        .await
    );
    assert!(
        !can_i(
            &sa_client,
            json!({"nonResourceAttributes": {"path": "/metrics", "verb": "get"}})
        )
        .await
    );

    // The admin may impersonate; the ServiceAccount may not.
    let http = admin_http(&server);
    let url = format!("{}/api/v1/namespaces/app/secrets", server.url());
    let r = http
        .get(&url)
        .header("Impersonate-User", "system:serviceaccount:app:web")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.expect("json");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("User \"system:serviceaccount:app:web\" cannot list")),
        "{v}"
    );
    let sa_token = server
        .service_account_token("app", "web", 3600)
        .expect("token");
    let r = reqwest::Client::new()
        .get(&url)
        .bearer_auth(sa_token)
        .header("Impersonate-User", "someone")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 403);
}

#[tokio::test]
async fn dry_run_and_patch_types_refused_as_a_real_server() {
    let (server, client) = setup().await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "app");
    let s: Secret = serde_json::from_value(secret("dry")).expect("secret");
    let pp = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    secrets.create(&pp, &s).await.expect("dry create");
    assert_eq!(
        status(secrets.get("dry").await.expect_err("not stored")).code,
        404
    );
    secrets
        .create(&PostParams::default(), &s)
        .await
        .expect("create");
    let rv = server.resource_version();
    let dp = DeleteParams {
        dry_run: true,
        ..DeleteParams::default()
    };
    secrets.delete("dry", &dp).await.expect("dry delete");
    let patch = Patch::Merge(json!({"data": {"k": null}}));
    let pp = PatchParams {
        dry_run: true,
        ..PatchParams::default()
    };
    let patched = secrets.patch("dry", &pp, &patch).await.expect("dry patch");
    assert!(patched.data.is_none_or(|d| d.is_empty()));
    assert!(
        secrets
            .get("dry")
            .await
            .expect("still there")
            .data
            .is_some()
    );
    assert_eq!(server.resource_version(), rv);

    // Strategic-merge patches on custom resources are 415, JSON merge patches fine.
    let ids: Api<kube::api::DynamicObject> =
        Api::namespaced_with(client.clone(), "app", &common::azure_identity());
    ids.create(&PostParams::default(), &common::identity("id", "c"))
        .await
        .expect("create");
    let e = status(
        ids.patch(
            "id",
            &PatchParams::default(),
            &Patch::Strategic(json!({"metadata": {"labels": {"a": "b"}}})),
        )
        .await
        .expect_err("smp"),
    );
    assert_eq!((e.code, e.reason.as_str()), (415, "UnsupportedMediaType"));
    ids.patch(
        "id",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})),
    )
    .await
    .expect("merge");
}

#[tokio::test]
async fn custom_resources_are_validated_and_pruned_against_their_schema() {
    let (_server, client) = setup().await;
    let ids: Api<kube::api::DynamicObject> =
        Api::namespaced_with(client.clone(), "app", &common::azure_identity());
    let mut bad = common::identity("bad", "c");
    bad.data["spec"]["type"] = json!("zero");
    let e = status(
        ids.create(&PostParams::default(), &bad)
            .await
            .expect_err("wrong type"),
    );
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    assert!(
        e.message.contains(
            "spec.type: Invalid value: \"string\": spec.type in body must be of type integer"
        ),
        "{}",
        e.message
    );
    let mut extra = common::identity("extra", "c");
    extra.data["spec"]["notAField"] = json!("x");
    extra.data["unknownTop"] = json!(1);
    let stored = ids
        .create(&PostParams::default(), &extra)
        .await
        .expect("create");
    assert_eq!(stored.data["spec"].get("notAField"), None);
    assert_eq!(stored.data.get("unknownTop"), None);
    assert_eq!(stored.data["spec"]["clientID"], "c");
}
