//! The grace period after an identity's last pod, and ARM work that never waits behind a
//! long-running PATCH, with the real [`podid_mic::arm::ArmAssigner`] against the fake API server
//! and the simulated ARM.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use podid_api::AssignedIdentityState;
use podid_mic::hold::{HoldSettings, RECORD_KEY};
use podid_mic::run::HoldRecordLocation;

mod common;

use common::{Azure, Cluster, HOUR, node, wait_for};

fn grace(secs: u64) -> HoldSettings {
    HoldSettings {
        grace: Duration::from_secs(secs),
        ..HoldSettings::default()
    }
}

#[tokio::test]
async fn a_pod_replaced_within_the_grace_period_gets_its_identity_without_an_arm_call() {
    let azure = Azure::start();
    let kv = azure.cloud.add_user_assigned_identity("kv-id");
    let cluster = Cluster::start_with(
        Arc::new(azure.assigner()),
        &[],
        HOUR,
        &[node("n1", &azure.vmss, 0), node("n2", &azure.vmss, 1)],
        |s| s.holds = grace(4),
    )
    .await;
    cluster.bind(&kv, "kv").await;
    cluster.add_pod("web-1", "n1", "kv").await;
    cluster
        .wait_state("web-1-default-kv-id", AssignedIdentityState::Assigned)
        .await;
    assert_eq!(azure.patches(), 1);

    // The last pod goes: its assignment goes as upstream's, the identity stays (held).
    cluster.delete_pod("web-1").await;
    cluster.wait_gone("web-1-default-kv-id").await;
    let calls = azure.arm.calls().len();
    assert!(
        azure.has(&kv),
        "held on the scale set: {:?}",
        azure.on_vmss()
    );

    // Its replacement, on another node of the scale set, is served from the hold.
    cluster.add_pod("web-2", "n2", "kv").await;
    cluster
        .wait_state("web-2-default-kv-id", AssignedIdentityState::Assigned)
        .await;
    assert_eq!(
        azure.arm.calls().len(),
        calls,
        "no ARM call for a held identity: {:?}",
        &azure.arm.calls()[calls..]
    );
    assert_eq!(azure.patches(), 1, "never removed, never added again");

    // When the last pod goes for good, the identity leaves once the period is over.
    cluster.delete_pod("web-2").await;
    cluster.wait_gone("web-2-default-kv-id").await;
    wait_for("kv-id released after the grace period", || async {
        (!azure.has(&kv)).then_some(())
    })
    .await;
    assert_eq!(azure.patches(), 2, "one PATCH removes it");
    cluster.stop().await;
}

#[tokio::test]
async fn a_hold_survives_a_restart_through_its_record_and_is_released_by_the_new_loop() {
    let azure = Azure::start();
    let kv = azure.cloud.add_user_assigned_identity("kv-id");
    let mut cluster = Cluster::start_with(
        Arc::new(azure.assigner()),
        &[],
        HOUR,
        &[node("n1", &azure.vmss, 0)],
        |s| {
            s.holds = grace(3);
            s.hold_record = Some(HoldRecordLocation {
                namespace: "default".to_owned(),
                config_map: "aad-pod-identity-config".to_owned(),
            });
        },
    )
    .await;
    cluster.bind(&kv, "kv").await;
    cluster.add_pod("web-1", "n1", "kv").await;
    cluster
        .wait_state("web-1-default-kv-id", AssignedIdentityState::Assigned)
        .await;
    cluster.delete_pod("web-1").await;
    cluster.wait_gone("web-1-default-kv-id").await;
    let record = Api::<ConfigMap>::namespaced(cluster.client.clone(), "default")
        .get("aad-pod-identity-config")
        .await
        .expect("the record's ConfigMap")
        .data
        .and_then(|d| d.get(RECORD_KEY).cloned())
        .expect("the record");
    assert!(
        record.contains(&kv.resource_id.to_ascii_lowercase()),
        "{record}"
    );

    // A new leader (the same loop restarted) knows nothing but the record. No assignment says
    // podid put kv-id there, yet it leaves when the period ends.
    cluster.stop_loop().await;
    assert!(azure.has(&kv), "held across the restart");
    cluster.start_loop();
    wait_for("kv-id released by the restarted loop", || async {
        (!azure.has(&kv)).then_some(())
    })
    .await;
    cluster.stop().await;
}

#[tokio::test]
async fn a_long_patch_delays_neither_other_scale_sets_nor_the_next_patch_of_its_own() {
    let azure = Azure::start();
    azure.arm.set_operation_duration(Duration::from_secs(3));
    let other = azure.cloud.add_vmss(
        azure.cloud.subscription_id(),
        azure.cloud.resource_group(),
        "aks-other-vmss",
    );
    let first = azure.cloud.add_user_assigned_identity("first-id");
    let second = azure.cloud.add_user_assigned_identity("second-id");
    let third = azure.cloud.add_user_assigned_identity("third-id");
    let elsewhere = azure.cloud.add_user_assigned_identity("elsewhere-id");
    let cluster = Cluster::start(
        Arc::new(azure.assigner()),
        &[],
        HOUR,
        &[node("n1", &azure.vmss, 0), node("o1", &other, 0)],
    )
    .await;
    for (identity, selector) in [
        (&first, "first"),
        (&second, "second"),
        (&third, "third"),
        (&elsewhere, "elsewhere"),
    ] {
        cluster.bind(identity, selector).await;
    }
    cluster.add_pod("a-1", "n1", "first").await;
    wait_for("the first PATCH in flight", || async {
        (azure.patches() == 1).then_some(())
    })
    .await;
    // While it runs: a pod on the other scale set, and two pods needing other identities on
    // this one.
    cluster.add_pod("b-1", "o1", "elsewhere").await;
    cluster.add_pod("a-2", "n1", "second").await;
    cluster.add_pod("a-3", "n1", "third").await;
    wait_for("the other scale set's PATCH", || async {
        (azure.arm.patch_count(&other) == 1).then_some(())
    })
    .await;
    assert_eq!(
        cluster
            .assigned("a-1-default-first-id")
            .await
            .map(|o| o.state()),
        Some(AssignedIdentityState::Created),
        "the other scale set's PATCH went out while this one's was still running"
    );
    for name in [
        "a-1-default-first-id",
        "a-2-default-second-id",
        "a-3-default-third-id",
    ] {
        cluster
            .wait_state(name, AssignedIdentityState::Assigned)
            .await;
    }
    assert_eq!(
        azure.patches(),
        2,
        "the pods that came during the first PATCH share the next one"
    );
    assert_eq!(
        azure.arm.overlapping_patch_count(&azure.vmss),
        0,
        "never two PATCHes at once on one scale set"
    );
    cluster.stop().await;
}
