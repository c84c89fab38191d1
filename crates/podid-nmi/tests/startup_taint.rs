//! `--startup-taint` against the fake API server: nmi's patch removes exactly its taint, and a
//! patch computed from a taint list that changed meanwhile is refused by the API server (the
//! `test` ops), so a concurrently added taint can never be dropped.
#![allow(clippy::unwrap_used)]

use k8s_openapi::api::core::v1::Taint;
use kube::config::{KubeConfigOptions, Kubeconfig};
use podid_fake_apiserver::FakeApiServer;
use podid_nmi::taint::{self, Removed};
use serde_json::{Value, json};

const NODE: &str = "node-a";
const KEY: &str = "podid.io/nmi-not-ready";

async fn client(api: &FakeApiServer) -> kube::Client {
    let kubeconfig = Kubeconfig::from_yaml(&api.kubeconfig_yaml()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

fn taints(api: &FakeApiServer) -> Value {
    api.get_json(&format!("/api/v1/nodes/{NODE}")).unwrap()["spec"]["taints"].clone()
}

fn node_with(api: &FakeApiServer, taints: Value) {
    api.create_json(
        "/api/v1/nodes",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
               "spec": {"taints": taints}}),
    )
    .unwrap();
}

#[tokio::test]
async fn only_the_startup_taint_goes_and_a_stale_patch_is_refused() {
    let api = FakeApiServer::start().await.unwrap();
    let original = json!([
        {"key": "a", "effect": "NoSchedule"},
        {"key": KEY, "effect": "NoSchedule"},
    ]);
    node_with(&api, original.clone());

    // A patch computed from the list nmi read, applied after someone inserted a taint in
    // front: the index now holds another taint, the test op fails and nothing changes.
    let read: Vec<Taint> = serde_json::from_value(original).unwrap();
    let stale = taint::removal_patch(&read, KEY).unwrap();
    let changed = json!([
        {"key": "added", "effect": "NoSchedule"},
        {"key": "a", "effect": "NoSchedule"},
        {"key": KEY, "effect": "NoSchedule"},
    ]);
    api.merge_patch_json(
        &format!("/api/v1/nodes/{NODE}"),
        json!({"spec": {"taints": changed}}),
    )
    .unwrap();
    let refused = api
        .request_json(
            http::Method::PATCH,
            &format!("/api/v1/nodes/{NODE}"),
            "application/json-patch+json",
            Some(&stale),
        )
        .expect_err("the test op guards the index");
    assert_eq!(refused.code, 422, "{}", refused.message);
    assert_eq!(taints(&api), changed);

    // nmi's removal reads the current list, so it removes exactly its own taint.
    let client = client(&api).await;
    assert_eq!(
        taint::remove(client.clone(), NODE, KEY).await,
        Removed::Removed
    );
    assert_eq!(
        taints(&api),
        json!([
            {"key": "added", "effect": "NoSchedule"},
            {"key": "a", "effect": "NoSchedule"},
        ])
    );
    assert_eq!(taint::remove(client, NODE, KEY).await, Removed::Absent);
}
