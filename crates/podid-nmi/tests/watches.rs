//! The watches against the fake API server: pods of this node into the pod index, custom
//! resources into the matcher, synced flags, live updates.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, PodIP, PodSpec, PodStatus};
use kube::config::{KubeConfigOptions, Kubeconfig};
use podid_api::{
    AssignedIdentityState, AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding,
};
use podid_broker::IdentityKey;
use podid_fake_apiserver::FakeApiServer;
use podid_imds::IdentitySelector;
use podid_nmi::pods::PodIndex;
use podid_nmi::run::{WatchConfig, spawn_watches};
use podid_nmi::state::Matcher;
use podid_select::matching::{Decision, MatchOptions, PendingReason};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(20);
const CRD: &str = "/apis/aadpodidentity.k8s.io/v1/namespaces";

async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    tokio::time::timeout(TIMEOUT, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

fn pod(name: &str, node: &str, ip: &str) -> Pod {
    let mut p = Pod::default();
    p.metadata.namespace = Some("app".into());
    p.metadata.name = Some(name.into());
    p.metadata.labels = Some([("aadpodidbinding".to_owned(), "kv".to_owned())].into());
    p.spec = Some(PodSpec {
        node_name: Some(node.into()),
        containers: vec![Default::default()],
        ..Default::default()
    });
    p.status = Some(PodStatus {
        phase: Some("Running".into()),
        pod_ip: Some(ip.into()),
        pod_ips: Some(vec![PodIP { ip: ip.into() }]),
        ..Default::default()
    });
    p
}

fn create_pod(api: &FakeApiServer, pod: &Pod) {
    let name = pod.metadata.name.clone().unwrap();
    let value = serde_json::to_value(pod).unwrap();
    api.create_json("/api/v1/namespaces/app/pods", value.clone())
        .unwrap();
    // Pods have a status subresource: the status is written there, as the kubelet does.
    let mut current = api
        .get_json(&format!("/api/v1/namespaces/app/pods/{name}"))
        .unwrap();
    current["status"] = value["status"].clone();
    api.request_json(
        http::Method::PUT,
        &format!("/api/v1/namespaces/app/pods/{name}/status"),
        "application/json",
        Some(&current),
    )
    .unwrap();
}

#[tokio::test]
async fn watches_feed_pod_index_and_matcher() {
    let api = FakeApiServer::start().await.unwrap();
    create_pod(&api, &pod("web", "node-a", "10.0.0.5"));
    create_pod(&api, &pod("elsewhere", "node-b", "10.0.0.6"));

    let identity = AzureIdentity::user_assigned(
        "app",
        "kv-id",
        "/subscriptions/S/resourcegroups/RG/providers/Microsoft.ManagedIdentity/userAssignedIdentities/kv-id",
        "client-a",
    );
    let binding = AzureIdentityBinding::for_selector("app", "kv-binding", "kv-id", "kv");
    let assigned = AzureAssignedIdentity::for_pod(
        "default",
        "web",
        "app",
        "node-a",
        identity.clone(),
        binding.clone(),
    );
    let mut other_node = AzureAssignedIdentity::for_pod(
        "default",
        "web",
        "app",
        "node-b",
        identity.clone(),
        binding.clone(),
    );
    other_node.metadata.name = Some("other-node".into());
    other_node.status.as_mut().unwrap().status = Some(AssignedIdentityState::Assigned);
    api.create_json(
        &format!("{CRD}/app/azureidentities"),
        serde_json::to_value(&identity).unwrap(),
    )
    .unwrap();
    api.create_json(
        &format!("{CRD}/app/azureidentitybindings"),
        serde_json::to_value(&binding).unwrap(),
    )
    .unwrap();
    api.create_json(
        &format!("{CRD}/default/azureassignedidentities"),
        serde_json::to_value(&assigned).unwrap(),
    )
    .unwrap();
    api.create_json(
        &format!("{CRD}/default/azureassignedidentities"),
        serde_json::to_value(&other_node).unwrap(),
    )
    .unwrap();

    let kubeconfig = Kubeconfig::from_yaml(&api.kubeconfig_yaml()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let (revoked_tx, mut revoked) = tokio::sync::mpsc::unbounded_channel::<String>();
    let pods = Arc::new(PodIndex::new());
    let matcher = Arc::new(Matcher::new(MatchOptions::default()));
    let _watches = spawn_watches(
        client,
        &WatchConfig {
            node_name: "node-a".into(),
            match_options: MatchOptions::default(),
            scale_features: true,
        },
        pods.clone(),
        matcher.clone(),
        Some(Arc::new(move |key: &IdentityKey| {
            revoked_tx.send(key.client_id().to_owned()).unwrap();
        })),
    );
    until("caches synced", || pods.is_synced() && matcher.is_synced()).await;

    let web = pods.lookup("10.0.0.5".parse().unwrap()).unwrap();
    assert_eq!(web.name, "web");
    assert!(
        pods.lookup("10.0.0.6".parse().unwrap()).is_err(),
        "pods of other nodes are not indexed"
    );
    // Only node-a's assignment is watched: the Assigned one of node-b must not count.
    assert_eq!(
        matcher.current().decide(&web, &IdentitySelector::None),
        Decision::Pending(PendingReason::AssignmentCreated)
    );

    // MIC marks the assignment Assigned: the matcher follows.
    api.merge_patch_json(
        "/apis/aadpodidentity.k8s.io/v1/namespaces/default/azureassignedidentities/web-app-kv-id",
        json!({"status": {"status": "Assigned"}}),
    )
    .unwrap();
    until("assignment seen as Assigned", || {
        matches!(
            matcher
                .current()
                .decide(&web, &IdentitySelector::ClientId(Cow::Borrowed("CLIENT-A"))),
            Decision::Identity(_)
        )
    })
    .await;

    // A new pod appears, then the first one goes away.
    create_pod(&api, &pod("late", "node-a", "10.0.0.7"));
    until("new pod indexed", || {
        pods.lookup("10.0.0.7".parse().unwrap()).is_ok()
    })
    .await;
    api.delete_json("/api/v1/namespaces/app/pods/web").unwrap();
    until("deleted pod dropped", || {
        pods.lookup("10.0.0.5".parse().unwrap()).is_err()
    })
    .await;

    // Identity, binding and both assignments deleted: the identity's cached tokens are revoked.
    assert!(revoked.try_recv().is_err(), "nothing revoked yet");
    for path in [
        format!("{CRD}/app/azureidentities/kv-id"),
        format!("{CRD}/app/azureidentitybindings/kv-binding"),
        format!("{CRD}/default/azureassignedidentities/web-app-kv-id"),
    ] {
        api.delete_json(&path).unwrap();
    }
    // The assignment carries a finalizer: remove it as MIC does so the object goes.
    let _ = api.merge_patch_json(
        &format!("{CRD}/default/azureassignedidentities/web-app-kv-id"),
        json!({"metadata": {"finalizers": null}}),
    );
    let gone = tokio::time::timeout(TIMEOUT, revoked.recv())
        .await
        .expect("revocation after the last reference went")
        .unwrap();
    assert_eq!(gone, "client-a");
}
