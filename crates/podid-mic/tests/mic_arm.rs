//! The controller loop with the real [`ArmAssigner`] against the fake API server and the
//! simulated Entra and ARM (real HTTP everywhere): assignments reach the simulated VMSS and its
//! IMDS, identities leave it only when no pod on it needs them, and ARM's failures are retried
//! as ARM asks.

use std::sync::Arc;
use std::time::Duration;

use podid_api::AssignedIdentityState;
use podid_arm::{ARM_RESOURCE, ArmConfig};
use podid_azure_sim::{ImdsHandle, UserAssignedIdentity};
use podid_mic::arm::ArmAssigner;
use podid_mic::cloud::{CloudConfig, Endpoints};

mod common;

use common::{Azure, Cluster, HOUR, node, wait_for};

#[tokio::test]
async fn pod_with_binding_gets_its_identity_on_the_vmss_and_in_imds() {
    let azure = Azure::start();
    let kv = azure.cloud.add_user_assigned_identity("kv-id");
    let cluster = Cluster::start(
        Arc::new(azure.assigner()),
        &[],
        HOUR,
        &[node("n1", &azure.vmss, 0)],
    )
    .await;
    cluster.bind(&kv, "kv").await;
    cluster.add_pod("web-1", "n1", "kv").await;

    let object = cluster
        .wait_state("web-1-default-kv-id", AssignedIdentityState::Assigned)
        .await;
    assert_eq!(object.spec.node_name.as_deref(), Some("n1"));
    assert!(
        azure.has(&kv),
        "kv-id on the scale set: {:?}",
        azure.on_vmss()
    );
    assert_eq!(azure.patches(), 1, "one PATCH for one identity");

    // The node's IMDS now issues tokens for that identity.
    let imds = ImdsHandle::start(&azure.cloud, &azure.vmss.instance("0")).expect("imds");
    let answer = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("http client")
        .get(format!("{}/metadata/identity/oauth2/token", imds.url()))
        .query(&[
            ("api-version", "2018-02-01"),
            ("client_id", kv.client_id.as_str()),
            ("resource", "https://vault.azure.net"),
        ])
        .header("Metadata", "true")
        .send()
        .await
        .expect("IMDS answers");
    assert_eq!(answer.status(), 200, "IMDS token for the assigned identity");

    cluster.stop().await;
}

#[tokio::test]
async fn identity_leaves_the_vmss_only_with_its_last_pod() {
    let azure = Azure::start();
    let kv = azure.cloud.add_user_assigned_identity("kv-id");
    // Two nodes of the same scale set.
    let cluster = Cluster::start(
        Arc::new(azure.assigner()),
        &[],
        HOUR,
        &[node("n1", &azure.vmss, 0), node("n2", &azure.vmss, 1)],
    )
    .await;
    cluster.bind(&kv, "kv").await;
    cluster.add_pod("web-1", "n1", "kv").await;
    cluster.add_pod("web-2", "n2", "kv").await;
    cluster
        .wait_state("web-1-default-kv-id", AssignedIdentityState::Assigned)
        .await;
    cluster
        .wait_state("web-2-default-kv-id", AssignedIdentityState::Assigned)
        .await;
    assert!(azure.has(&kv));

    // web-2 on the other node of the scale set still needs it.
    cluster.delete_pod("web-1").await;
    cluster.wait_gone("web-1-default-kv-id").await;
    assert!(azure.has(&kv), "kv-id stays while web-2 uses it");
    let patches = azure.patches();

    cluster.delete_pod("web-2").await;
    cluster.wait_gone("web-2-default-kv-id").await;
    assert!(!azure.has(&kv), "kv-id removed with its last pod");
    assert_eq!(azure.patches(), patches + 1, "one PATCH removes it");

    cluster.stop().await;
}

/// An identity the simulated cloud does not know (well-formed id, ARM refuses it).
fn ghost(azure: &Azure) -> UserAssignedIdentity {
    UserAssignedIdentity {
        name: "ghost-id".to_owned(),
        subscription_id: azure.cloud.subscription_id().to_owned(),
        resource_group: azure.cloud.resource_group().to_owned(),
        resource_id: format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/ghost-id",
            azure.cloud.subscription_id(),
            azure.cloud.resource_group()
        ),
        client_id: "00000000-0000-0000-0000-00000000dead".to_owned(),
        principal_id: "00000000-0000-0000-0000-00000000beef".to_owned(),
    }
}

#[tokio::test]
async fn immutable_and_foreign_identities_are_never_removed() {
    let azure = Azure::start();
    let kv = azure.cloud.add_user_assigned_identity("kv-id");
    let cluster_id = azure.cloud.add_user_assigned_identity("cluster-id");
    let manual = azure.cloud.add_user_assigned_identity("manual-id");
    // Put there before MIC runs; no AzureIdentity refers to `manual`.
    azure
        .cloud
        .assign_identity(&azure.vmss, &manual)
        .expect("manual assignment");
    let cluster = Cluster::start(
        Arc::new(azure.assigner()),
        &[cluster_id.client_id.as_str()],
        HOUR,
        &[node("n1", &azure.vmss, 0)],
    )
    .await;
    cluster.bind(&kv, "kv").await;
    cluster.bind(&cluster_id, "kv").await;
    cluster.add_pod("web-1", "n1", "kv").await;
    cluster
        .wait_state("web-1-default-kv-id", AssignedIdentityState::Assigned)
        .await;
    cluster
        .wait_state("web-1-default-cluster-id", AssignedIdentityState::Assigned)
        .await;
    assert!(azure.has(&kv) && azure.has(&cluster_id) && azure.has(&manual));

    cluster.delete_pod("web-1").await;
    cluster.wait_gone("web-1-default-kv-id").await;
    cluster.wait_gone("web-1-default-cluster-id").await;
    assert!(!azure.has(&kv), "the mutable identity is released");
    assert!(azure.has(&cluster_id), "immutable identity kept");
    assert!(azure.has(&manual), "identity MIC never assigned kept");
    let removed: Vec<String> = azure
        .arm
        .calls()
        .into_iter()
        .flat_map(|c| c.removed)
        .map(|id| id.to_ascii_lowercase())
        .collect();
    assert_eq!(
        removed,
        vec![kv.resource_id.to_ascii_lowercase()],
        "only kv-id was ever asked to leave"
    );
    cluster.stop().await;
}

#[tokio::test]
async fn throttled_arm_is_not_called_again_before_retry_after() {
    let azure = Azure::start();
    let kv = azure.cloud.add_user_assigned_identity("kv-id");
    azure.arm.throttle_next(1, 3);
    let cluster = Cluster::start(
        Arc::new(azure.assigner()),
        &[],
        HOUR,
        &[node("n1", &azure.vmss, 0)],
    )
    .await;
    cluster.bind(&kv, "kv").await;
    cluster.add_pod("web-1", "n1", "kv").await;
    let throttled_by = wait_for("the throttled GET", || async {
        azure
            .arm
            .calls()
            .iter()
            .any(|c| c.status == 429)
            .then(std::time::Instant::now)
    })
    .await;
    cluster
        .wait_state("web-1-default-kv-id", AssignedIdentityState::Assigned)
        .await;
    assert!(
        throttled_by.elapsed() >= Duration::from_millis(2500),
        "assigned {:?} after the 429 that asked for 3 s",
        throttled_by.elapsed()
    );
    let calls = azure.arm.calls();
    let after: Vec<(String, u16)> = calls
        .iter()
        .skip_while(|c| c.status != 429)
        .skip(1)
        .map(|c| (c.method.clone(), c.status))
        .collect();
    assert_eq!(
        after.first(),
        Some(&("GET".to_owned(), 200)),
        "after the 429 the next request is the retried GET: {calls:?}"
    );
    assert_eq!(
        calls.iter().filter(|c| c.status == 429).count(),
        1,
        "no request hit ARM while it was throttling"
    );
    assert!(azure.has(&kv));
    cluster.stop().await;
}

#[tokio::test]
async fn a_refused_identity_does_not_block_the_others_of_its_vmss() {
    let azure = Azure::start();
    let kv = azure.cloud.add_user_assigned_identity("kv-id");
    let ghost = ghost(&azure);
    let cluster = Cluster::start(
        Arc::new(azure.assigner()),
        &[],
        HOUR,
        &[node("n1", &azure.vmss, 0)],
    )
    .await;
    cluster.bind(&kv, "kv").await;
    cluster.bind(&ghost, "kv").await;
    cluster.add_pod("web-1", "n1", "kv").await;
    cluster
        .wait_state("web-1-default-kv-id", AssignedIdentityState::Assigned)
        .await;
    assert!(azure.has(&kv));
    assert!(!azure.has(&ghost));
    let event = cluster
        .event("binding apply error", "ghost-id-binding")
        .await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    let ghost_object = cluster
        .assigned("web-1-default-ghost-id")
        .await
        .expect("ghost assignment exists");
    assert_eq!(
        ghost_object.state(),
        AssignedIdentityState::Created,
        "the refused identity stays Created"
    );
    cluster.stop().await;
}

#[tokio::test]
async fn periodic_reconcile_repairs_a_manual_unassign() {
    let azure = Azure::start();
    let kv = azure.cloud.add_user_assigned_identity("kv-id");
    let cluster = Cluster::start(
        Arc::new(azure.assigner()),
        &[],
        Duration::from_secs(1),
        &[node("n1", &azure.vmss, 0)],
    )
    .await;
    cluster.bind(&kv, "kv").await;
    cluster.add_pod("web-1", "n1", "kv").await;
    cluster
        .wait_state("web-1-default-kv-id", AssignedIdentityState::Assigned)
        .await;
    azure
        .cloud
        .unassign_identity(&azure.vmss, &kv)
        .expect("manual unassign");
    assert!(!azure.has(&kv));
    wait_for("kv-id back on the scale set", || async {
        azure.has(&kv).then_some(())
    })
    .await;
    cluster.stop().await;
}

#[tokio::test]
async fn managed_identity_login_through_imds_and_the_cluster_identity_stays() {
    let azure = Azure::start();
    let kv = azure.cloud.add_user_assigned_identity("kv-id");
    // The kubelet/cluster identity MIC logs in with, already on the scale set.
    let kubelet = azure.cloud.add_user_assigned_identity("kubelet-id");
    azure
        .cloud
        .assign_identity(&azure.vmss, &kubelet)
        .expect("kubelet identity");
    let imds = ImdsHandle::start(&azure.cloud, &azure.vmss.instance("0")).expect("imds");
    let cloud = CloudConfig::parse(
        &serde_json::json!({
            "cloud": "AzurePublicCloud",
            "subscriptionId": azure.cloud.subscription_id(),
            "resourceGroup": azure.cloud.resource_group(),
            "useManagedIdentityExtension": true,
            "userAssignedIdentityID": kubelet.client_id,
        })
        .to_string(),
    )
    .expect("azure.json");
    let endpoints = Endpoints {
        arm: azure.arm.url(),
        arm_resource: ARM_RESOURCE.to_owned(),
        // Unreachable: the managed identity must not need Entra.
        aad_authority: "http://127.0.0.1:1".to_owned(),
        imds: imds.url(),
    };
    let config = ArmConfig {
        base_url: azure.arm.url(),
        poll_interval: Duration::from_millis(10),
        proxy_from_env: false,
        ..ArmConfig::default()
    };
    let assigner = ArmAssigner::from_cloud_with(&cloud, &endpoints, config).expect("assigner");
    // Settings::new would add the cluster identity to the immutable ids; do the same here.
    let immutable = cloud.cluster_identity().expect("cluster identity");
    let cluster = Cluster::start(
        Arc::new(assigner),
        &[immutable.as_str()],
        HOUR,
        &[node("n1", &azure.vmss, 0)],
    )
    .await;
    cluster.bind(&kv, "kv").await;
    cluster.bind(&kubelet, "kv").await;
    cluster.add_pod("web-1", "n1", "kv").await;
    cluster
        .wait_state("web-1-default-kv-id", AssignedIdentityState::Assigned)
        .await;
    assert!(azure.has(&kv));
    let issued = imds.counters().per_identity;
    assert!(
        issued.get(&kubelet.client_id.to_ascii_lowercase()).copied() > Some(0),
        "the ARM token came from IMDS for the kubelet identity: {issued:?}"
    );

    cluster.delete_pod("web-1").await;
    cluster.wait_gone("web-1-default-kv-id").await;
    cluster.wait_gone("web-1-default-kubelet-id").await;
    assert!(!azure.has(&kv));
    assert!(azure.has(&kubelet), "the cluster identity is never removed");
    cluster.stop().await;
}
