//! The one-time type upgrade against the fake API server: objects stored with the capitalised
//! keys of releases before 1.6 are rewritten with the current ones, assignments get fresh
//! embedded copies, the marker is written, and a second run (or a marker left by the Go MIC)
//! skips everything.

use podid_fake_apiserver::FakeApiServer;
use podid_mic::upgrade::{Outcome, UpgradeSettings, run};
use serde_json::{Value, json};

mod common;

use common::client_for;

const GROUP: &str = "/apis/aadpodidentity.k8s.io/v1/namespaces/default";

fn settings() -> UpgradeSettings {
    UpgradeSettings {
        namespace: "kube-system".to_owned(),
        config_map: "aad-pod-identity-config".to_owned(),
        key: "type-upgrade-status".to_owned(),
        version: "9.9.9".to_owned(),
    }
}

fn get(server: &FakeApiServer, path: &str) -> Value {
    server.get_json(path).expect("get")
}

#[tokio::test]
async fn capitalised_objects_are_rewritten_once_and_the_marker_is_written() {
    let server = FakeApiServer::start().await.expect("server");
    let client = client_for(&server).await;
    // Written by the Go mic before the CRDs had structural schemas: stored as they are.
    let create = |path: &str, object: Value| {
        server.seed_legacy_json(path, object).expect("create");
    };
    let identity = json!({
        "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity",
        "metadata": {"name": "kv-id", "namespace": "default"},
        "spec": {"Type": 0, "ResourceID": "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/kv-id", "ClientID": "c1"}
    });
    let binding = json!({
        "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentityBinding",
        "metadata": {"name": "kv-binding", "namespace": "default"},
        "spec": {"AzureIdentity": "kv-id", "Selector": "kv"}
    });
    create(&format!("{GROUP}/azureidentities"), identity.clone());
    create(&format!("{GROUP}/azureidentitybindings"), binding.clone());
    create(
        &format!("{GROUP}/azurepodidentityexceptions"),
        json!({
            "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzurePodIdentityException",
            "metadata": {"name": "mic", "namespace": "default"},
            "spec": {"PodLabels": {"app": "mic"}}
        }),
    );
    create(
        &format!("{GROUP}/azureassignedidentities"),
        json!({
            "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureAssignedIdentity",
            "metadata": {"name": "web-1-default-kv-id", "namespace": "default",
                         "labels": {"nodename": "n1"}},
            "spec": {"AzureIdentityRef": identity, "AzureBindingRef": binding,
                     "Pod": "web-1", "PodNamespace": "default", "NodeName": "n1"},
            "status": {"Status": "Assigned"}
        }),
    );

    let outcome = run(&client, &settings()).await.expect("upgrade");
    assert_eq!(
        outcome,
        Outcome::Upgraded(vec![
            ("azureidentities", 1),
            ("azureidentitybindings", 1),
            ("azurepodidentityexceptions", 1),
            ("azureassignedidentities", 1),
        ])
    );
    let identity = get(&server, &format!("{GROUP}/azureidentities/kv-id"));
    assert_eq!(
        identity["spec"],
        json!({"type": 0, "resourceID": "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/kv-id", "clientID": "c1"})
    );
    let binding = get(
        &server,
        &format!("{GROUP}/azureidentitybindings/kv-binding"),
    );
    assert_eq!(
        binding["spec"],
        json!({"azureIdentity": "kv-id", "selector": "kv"})
    );
    let exception = get(&server, &format!("{GROUP}/azurepodidentityexceptions/mic"));
    assert_eq!(exception["spec"], json!({"podLabels": {"app": "mic"}}));
    let assigned = get(
        &server,
        &format!("{GROUP}/azureassignedidentities/web-1-default-kv-id"),
    );
    assert_eq!(assigned["spec"]["pod"], "web-1");
    // Upstream's key is lowercase `nodename` (the CRD has no `nodeName`: a real server would
    // prune it, losing the node).
    assert_eq!(assigned["spec"]["nodename"], "n1");
    assert_eq!(assigned["spec"].get("nodeName"), None);
    assert_eq!(assigned["status"]["status"], "Assigned");
    assert_eq!(
        assigned["spec"]["azureIdentityRef"]["metadata"]["resourceVersion"],
        identity["metadata"]["resourceVersion"],
        "the embedded identity is the freshly written one"
    );
    assert_eq!(
        assigned["spec"]["azureIdentityRef"]["spec"],
        identity["spec"]
    );
    assert_eq!(assigned["spec"]["azureBindingRef"]["spec"], binding["spec"]);
    let marker = get(
        &server,
        "/api/v1/namespaces/kube-system/configmaps/aad-pod-identity-config",
    );
    assert_eq!(marker["data"]["type-upgrade-status"], "9.9.9");

    // Once is enough.
    server.faults().clear_log();
    let again = run(&client, &settings()).await.expect("second run");
    assert_eq!(again, Outcome::Skipped("9.9.9".to_owned()));
    assert_eq!(server.faults().count("update", "aadpodidentity.k8s.io"), 0);
}

#[tokio::test]
async fn a_marker_left_by_the_go_mic_skips_the_upgrade() {
    let server = FakeApiServer::start().await.expect("server");
    let client = client_for(&server).await;
    server
        .create_json(
            "/api/v1/namespaces/kube-system/configmaps",
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "aad-pod-identity-config", "namespace": "kube-system"},
                   "data": {"type-upgrade-status": "1.8.17"}}),
        )
        .expect("marker");
    server
        .seed_legacy_json(
            &format!("{GROUP}/azureidentitybindings"),
            json!({"apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentityBinding",
                   "metadata": {"name": "b", "namespace": "default"},
                   "spec": {"Selector": "kv"}}),
        )
        .expect("binding");
    let outcome = run(&client, &settings()).await.expect("upgrade");
    assert_eq!(outcome, Outcome::Skipped("1.8.17".to_owned()));
    let binding = get(&server, &format!("{GROUP}/azureidentitybindings/b"));
    assert_eq!(binding["spec"], json!({"Selector": "kv"}), "left as it was");
}

/// Objects already in the current shape are not written back (upstream PUTs every object,
/// a rate-limited write each); an assignment is rewritten only when its embedded copy is of an
/// object the upgrade changed.
#[tokio::test]
async fn objects_already_current_are_not_rewritten() {
    let server = FakeApiServer::start().await.expect("server");
    let client = client_for(&server).await;
    let identity = |name: &str| {
        json!({
            "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"type": 0, "resourceID": format!("/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"), "clientID": name}
        })
    };
    server
        .create_json(&format!("{GROUP}/azureidentities"), identity("new-id"))
        .expect("current identity");
    server
        .seed_legacy_json(
            &format!("{GROUP}/azureidentities"),
            json!({
                "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity",
                "metadata": {"name": "old-id", "namespace": "default"},
                "spec": {"Type": 0, "ResourceID": "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/old-id", "ClientID": "old-id"}
            }),
        )
        .expect("legacy identity");
    server
        .create_json(
            &format!("{GROUP}/azureidentitybindings"),
            json!({"apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentityBinding",
                   "metadata": {"name": "b", "namespace": "default"},
                   "spec": {"azureIdentity": "new-id", "selector": "kv"}}),
        )
        .expect("binding");
    let new_id = get(&server, &format!("{GROUP}/azureidentities/new-id"));
    let old_id = get(&server, &format!("{GROUP}/azureidentities/old-id"));
    let binding = get(&server, &format!("{GROUP}/azureidentitybindings/b"));
    for (name, embedded) in [("web-new", &new_id), ("web-old", &old_id)] {
        server
            .create_json(
                &format!("{GROUP}/azureassignedidentities"),
                json!({
                    "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureAssignedIdentity",
                    "metadata": {"name": name, "namespace": "default", "labels": {"nodename": "n1"}},
                    "spec": {"azureIdentityRef": embedded, "azureBindingRef": binding,
                             "pod": name, "podNamespace": "default", "nodename": "n1"},
                    "status": {"status": "Assigned"}
                }),
            )
            .expect("assignment");
    }
    let untouched = get(&server, &format!("{GROUP}/azureassignedidentities/web-new"));
    server.faults().clear_log();

    let outcome = run(&client, &settings()).await.expect("upgrade");
    assert_eq!(
        outcome,
        Outcome::Upgraded(vec![
            ("azureidentities", 1),
            ("azureidentitybindings", 0),
            ("azurepodidentityexceptions", 0),
            ("azureassignedidentities", 1),
        ])
    );
    assert_eq!(
        server.faults().count("update", "aadpodidentity.k8s.io"),
        2,
        "only the legacy identity and the assignment embedding it are written"
    );
    assert_eq!(
        get(&server, &format!("{GROUP}/azureassignedidentities/web-new")),
        untouched
    );
    let upgraded = get(&server, &format!("{GROUP}/azureidentities/old-id"));
    assert_eq!(upgraded["spec"]["resourceID"], old_id["spec"]["ResourceID"]);
    let rewritten = get(&server, &format!("{GROUP}/azureassignedidentities/web-old"));
    assert_eq!(
        rewritten["spec"]["azureIdentityRef"]["metadata"]["resourceVersion"],
        upgraded["metadata"]["resourceVersion"]
    );
    let marker = get(
        &server,
        "/api/v1/namespaces/kube-system/configmaps/aad-pod-identity-config",
    );
    assert_eq!(marker["data"]["type-upgrade-status"], "9.9.9");
}

/// On a cluster without the ConfigMap the marker costs one write, the ConfigMap's creation with
/// the key in it (no empty ConfigMap first). One that exists without the key (the hold record
/// may have created it) keeps its other keys and gets one update.
#[tokio::test]
async fn the_marker_is_one_write_and_keeps_other_keys() {
    let cm_path = "/api/v1/namespaces/kube-system/configmaps";
    let server = FakeApiServer::start().await.expect("server");
    let client = client_for(&server).await;
    server.faults().clear_log();
    let outcome = run(&client, &settings()).await.expect("upgrade");
    assert!(matches!(outcome, Outcome::Upgraded(_)), "{outcome:?}");
    let writes = ["create", "update", "patch"].map(|verb| server.faults().count(verb, cm_path));
    assert_eq!(writes, [1, 0, 0], "creates, updates, patches of ConfigMaps");
    let marker = get(&server, &format!("{cm_path}/aad-pod-identity-config"));
    assert_eq!(marker["data"]["type-upgrade-status"], "9.9.9");

    let server = FakeApiServer::start().await.expect("server");
    let client = client_for(&server).await;
    server
        .create_json(
            cm_path,
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "aad-pod-identity-config", "namespace": "kube-system"},
                   "data": {"other": "kept"}}),
        )
        .expect("config map");
    server.faults().clear_log();
    run(&client, &settings()).await.expect("upgrade");
    let writes = ["create", "update", "patch"].map(|verb| server.faults().count(verb, cm_path));
    assert_eq!(writes, [0, 1, 0], "creates, updates, patches of ConfigMaps");
    let marker = get(&server, &format!("{cm_path}/aad-pod-identity-config"));
    assert_eq!(marker["data"]["type-upgrade-status"], "9.9.9");
    assert_eq!(marker["data"]["other"], "kept");
}
