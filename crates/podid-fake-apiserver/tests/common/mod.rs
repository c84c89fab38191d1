//! Helpers shared by the integration tests: a kube client built from the kubeconfig the server
//! writes, the AzureIdentity CRD as a dynamic resource, and condition waits with timeouts.
#![allow(dead_code)]

use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::config::{KubeConfigOptions, Kubeconfig};
use podid_fake_apiserver::FakeApiServer;
use std::future::Future;
use std::time::Duration;

/// A server and a kube client talking to it through its kubeconfig.
pub async fn setup() -> (FakeApiServer, kube::Client) {
    let server = FakeApiServer::builder()
        .signing_key(shared_key())
        .start()
        .await
        .expect("server starts");
    // The namespaces the tests use, created as a cluster's admin would (objects in a namespace
    // that does not exist are refused, as on a real server).
    for ns in TEST_NAMESPACES {
        server
            .create_json(
                "/api/v1/namespaces",
                serde_json::json!({"metadata": {"name": ns}}),
            )
            .expect("create namespace");
    }
    let client = client_for(&server).await;
    (server, client)
}

/// Namespaces [`setup`] creates besides the default ones.
pub const TEST_NAMESPACES: [&str; 3] = ["app", "a", "b"];

/// A reqwest client that authenticates as the server's admin.
pub fn admin_http(server: &FakeApiServer) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {}", server.admin_token())
            .parse()
            .expect("header"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("client")
}

/// One signing key for every test in a binary (RSA generation is slow).
pub fn shared_key() -> podid_test_keys::SigningKey {
    static KEY: std::sync::OnceLock<podid_test_keys::SigningKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| podid_test_keys::SigningKey::generate().expect("key"))
        .clone()
}

/// A kube client built the way an operator would: from a kubeconfig file.
pub async fn client_for(server: &FakeApiServer) -> kube::Client {
    let dir = std::env::temp_dir().join(format!("podid-fake-apiserver-{}", server.addr().port()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("kubeconfig");
    server.write_kubeconfig(&path).expect("write kubeconfig");
    let kc = Kubeconfig::read_from(&path).expect("kubeconfig parses");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config");
    kube::Client::try_from(cfg).expect("client")
}

/// `aadpodidentity.k8s.io/v1 AzureIdentity` as a dynamic resource.
pub fn azure_identity() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("aadpodidentity.k8s.io", "v1", "AzureIdentity"),
        "azureidentities",
    )
}

/// A dynamic AzureIdentity object.
pub fn identity(name: &str, client_id: &str) -> DynamicObject {
    let mut o = DynamicObject::new(name, &azure_identity());
    o.data = serde_json::json!({"spec": {"type": 0, "clientID": client_id, "resourceID": "/subscriptions/s/x"}});
    o
}

/// A minimal pod.
pub fn pod(
    name: &str,
    labels: &[(&str, &str)],
    node: Option<&str>,
) -> k8s_openapi::api::core::v1::Pod {
    let labels: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .map(|(k, v)| ((*k).to_string(), serde_json::json!(v)))
        .collect();
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "busybox"}], "nodeName": node},
    }))
    .expect("pod json")
}

/// Waits until `check` returns true, polling; panics with `what` after `timeout`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `Status` of a kube API error.
pub fn status(e: kube::Error) -> Box<kube::core::Status> {
    match e {
        kube::Error::Api(s) => s,
        other => panic!("expected an API error, got {other:?}"),
    }
}
