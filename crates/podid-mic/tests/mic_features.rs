//! The controller loop with the real [`ArmAssigner`] against the fake API server and the
//! simulated Entra and ARM: identities found on a scale set before podid used them stay there
//! (across a MIC restart), upstream's events for removals on deleted nodes and for failed status
//! updates, and ARM refusals retried as `--update-user-msi-max-retry` says.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams};
use podid_api::{AssignedIdentityState, AzureAssignedIdentity};
use podid_arm::ArmConfig;
use podid_fake_apiserver::{FaultKind, FaultMatch};
use podid_mic::arm::ArmAssigner;
use podid_mic::assigner::{IdentityAssigner, NotApplied};
use podid_mic::desired::ArmTarget;
use podid_mic::preexisting::PREEXISTING_ANNOTATION;

mod common;

use common::{Azure, Cluster, HOUR, VMSS, node};

/// The shared ARM settings with refusals retried 10 ms apart (these suites count retries).
fn arm_config(azure: &Azure) -> ArmConfig {
    ArmConfig {
        refusal_retry_interval: Duration::from_millis(10),
        ..azure.arm_config()
    }
}

fn assigner(azure: &Azure) -> ArmAssigner {
    azure.assigner_with(arm_config(azure))
}
fn marked(object: &AzureAssignedIdentity) -> bool {
    object
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(PREEXISTING_ANNOTATION))
        .is_some_and(|v| v == "true")
}

#[tokio::test]
async fn identity_found_on_the_vmss_stays_after_its_last_pod_even_across_a_restart() {
    let azure = Azure::start();
    let kv = azure.cloud.add_user_assigned_identity("kv-id");
    let found = azure.cloud.add_user_assigned_identity("found-id");
    // Put there by someone else before MIC runs; an AzureIdentity then refers to it.
    azure
        .cloud
        .assign_identity(&azure.vmss, &found)
        .expect("pre-existing assignment");
    let mut cluster = Cluster::start(
        Arc::new(assigner(&azure)),
        &[],
        HOUR,
        &[node("n1", &azure.vmss, 0), node("n2", &azure.vmss, 1)],
    )
    .await;
    cluster.bind(&kv, "app").await;
    cluster.bind(&found, "app").await;
    cluster.add_pod("web-1", "n1", "app").await;
    let kv_1 = cluster
        .wait_state("web-1-default-kv-id", AssignedIdentityState::Assigned)
        .await;
    let found_1 = cluster
        .wait_state("web-1-default-found-id", AssignedIdentityState::Assigned)
        .await;
    assert!(!marked(&kv_1), "podid added kv-id: {:?}", kv_1.metadata);
    assert!(
        marked(&found_1),
        "found-id was there: {:?}",
        found_1.metadata
    );
    assert_eq!(
        azure.added(),
        vec![kv.resource_id.to_ascii_lowercase()],
        "only kv-id was added"
    );

    // A restart: the record is on the API server.
    cluster.stop_loop().await;
    cluster.start_loop();
    cluster.add_pod("web-2", "n2", "app").await;
    let kv_2 = cluster
        .wait_state("web-2-default-kv-id", AssignedIdentityState::Assigned)
        .await;
    let found_2 = cluster
        .wait_state("web-2-default-found-id", AssignedIdentityState::Assigned)
        .await;
    assert!(
        !marked(&kv_2),
        "kv-id is held by web-1's assignment as podid's"
    );
    assert!(marked(&found_2), "the mark is inherited on the scale set");

    cluster.delete_pod("web-1").await;
    cluster.wait_gone("web-1-default-kv-id").await;
    cluster.wait_gone("web-1-default-found-id").await;
    assert!(
        azure.has(&kv) && azure.has(&found),
        "web-2 still needs both"
    );
    cluster.delete_pod("web-2").await;
    cluster.wait_gone("web-2-default-kv-id").await;
    cluster.wait_gone("web-2-default-found-id").await;
    assert!(
        !azure.has(&kv),
        "podid's own identity leaves with its last pod"
    );
    assert!(azure.has(&found), "the identity found there stays");
    assert_eq!(
        azure.removed(),
        vec![kv.resource_id.to_ascii_lowercase()],
        "found-id was never asked to leave"
    );

    // Used again later: still found there, still kept.
    cluster.add_pod("web-3", "n1", "app").await;
    let found_3 = cluster
        .wait_state("web-3-default-found-id", AssignedIdentityState::Assigned)
        .await;
    assert!(marked(&found_3));
    cluster.stop_loop().await;
}

#[tokio::test]
async fn deleted_node_removes_bindings_with_upstream_events() {
    let azure = Azure::start();
    let kv = azure.cloud.add_user_assigned_identity("kv-id");
    let mut cluster = Cluster::start(
        Arc::new(assigner(&azure)),
        &[],
        HOUR,
        &[node("n1", &azure.vmss, 0), node("n2", &azure.vmss, 1)],
    )
    .await;
    cluster.bind(&kv, "app").await;
    cluster.add_pod("web-1", "n1", "app").await;
    cluster.add_pod("web-2", "n2", "app").await;
    cluster
        .wait_state("web-1-default-kv-id", AssignedIdentityState::Assigned)
        .await;
    cluster
        .wait_state("web-2-default-kv-id", AssignedIdentityState::Assigned)
        .await;

    // n2 goes, then its pod (garbage-collected). The first delete of the assignment fails.
    cluster.server.faults().fail_next(
        1,
        FaultKind::InternalError,
        FaultMatch::path("azureassignedidentities/web-2-default-kv-id").with_method("DELETE"),
    );
    Api::<Node>::all(cluster.client.clone())
        .delete("n2", &DeleteParams::default())
        .await
        .expect("delete node");
    cluster.delete_pod("web-2").await;
    let error = cluster.event("binding remove error", "kv-id-binding").await;
    assert_eq!(error.type_.as_deref(), Some("Warning"));
    let note = error.note.unwrap_or_default();
    assert!(
        note.starts_with(
            "failed to remove AzureIdentityBinding default/kv-id-binding from node n2 for pod default/web-2, error: "
        ),
        "{note}"
    );
    cluster.wait_gone("web-2-default-kv-id").await;
    let removed = cluster.event("binding removed", "kv-id-binding").await;
    assert_eq!(removed.type_.as_deref(), Some("Normal"));
    assert_eq!(
        removed.note.as_deref(),
        Some("Binding kv-id-binding removed from node n2 for pod web-2")
    );
    assert!(
        azure.has(&kv),
        "no ARM call for a deleted node's assignments"
    );
    assert!(azure.removed().is_empty());
    cluster.stop_loop().await;
}

#[tokio::test]
async fn failed_status_update_is_reported_on_the_assignment_and_retried() {
    let azure = Azure::start();
    let kv = azure.cloud.add_user_assigned_identity("kv-id");
    let mut cluster = Cluster::start(
        Arc::new(assigner(&azure)),
        &[],
        HOUR,
        &[node("n1", &azure.vmss, 0)],
    )
    .await;
    cluster.server.faults().fail_next(
        1,
        FaultKind::InternalError,
        FaultMatch::path("azureassignedidentities/web-1-default-kv-id").with_method("PATCH"),
    );
    cluster.bind(&kv, "app").await;
    cluster.add_pod("web-1", "n1", "app").await;
    let event = cluster
        .event("status update error", "web-1-default-kv-id")
        .await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    let regarding = event.regarding.expect("regarding");
    assert_eq!(regarding.kind.as_deref(), Some("AzureAssignedIdentity"));
    let note = event.note.unwrap_or_default();
    assert!(
        note.starts_with(
            "failed to update AzureAssignedIdentity default/web-1-default-kv-id status to Assigned for pod web-1, error: "
        ),
        "{note}"
    );
    cluster
        .wait_state("web-1-default-kv-id", AssignedIdentityState::Assigned)
        .await;
    let applied = cluster.event("binding applied", "kv-id").await;
    let note = applied.note.unwrap_or_default();
    assert!(
        note.starts_with("Binding kv-id-binding applied on vmss ")
            && note.ends_with(" for 1 pod: default/web-1"),
        "{note}"
    );
    cluster.stop_loop().await;
}

/// An identity ARM refuses as `LinkedAuthorizationFailed` and one it does not know
/// (`FailedIdentityOperation`), besides a good one: two refusals in a row, so two retries are
/// needed. Returns the three ids (lower-cased) and the two refused ones.
fn two_refusals(azure: &Azure) -> (BTreeSet<String>, BTreeSet<String>) {
    let ok = azure.cloud.add_user_assigned_identity("ok-id");
    let denied = azure.cloud.add_user_assigned_identity("denied-id");
    azure.arm.deny_linked_authorization(&denied.resource_id);
    let ghost = format!(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/ghost-id",
        azure.cloud.subscription_id(),
        azure.cloud.resource_group()
    );
    let refused: BTreeSet<String> = [denied.resource_id.as_str(), ghost.as_str()]
        .iter()
        .map(|id| id.to_ascii_lowercase())
        .collect();
    let mut all = refused.clone();
    all.insert(ok.resource_id.to_ascii_lowercase());
    (all, refused)
}

#[tokio::test]
async fn refusals_are_retried_update_user_msi_max_retry_times_interval_apart() {
    let target = ArmTarget::Vmss(VMSS.to_owned());
    let none = BTreeSet::new();

    // Two retries (upstream's default): both refused ids dropped, the third PATCH succeeds.
    let azure = Azure::start();
    let (all, refused) = two_refusals(&azure);
    let interval = Duration::from_millis(300);
    let assigner = azure.assigner_with(ArmConfig {
        refusal_retries: 2,
        refusal_retry_interval: interval,
        ..arm_config(&azure)
    });
    let started = Instant::now();
    let error = assigner
        .apply(&target, &all, &none)
        .await
        .expect_err("the refused ids are reported");
    assert!(
        started.elapsed() >= interval * 2,
        "two pauses of {interval:?}: {:?}",
        started.elapsed()
    );
    let not_applied = error.downcast_ref::<NotApplied>().expect("partial success");
    assert_eq!(not_applied.ids, refused);
    assert_eq!(azure.arm.patch_count(&azure.vmss), 3);
    assert_eq!(
        azure
            .cloud
            .assigned_identities(&azure.vmss)
            .expect("vmss")
            .len(),
        1
    );

    // One retry: the second refusal is the error, nothing assigned.
    let azure = Azure::start();
    let (all, _) = two_refusals(&azure);
    let assigner = azure.assigner_with(ArmConfig {
        refusal_retries: 1,
        ..arm_config(&azure)
    });
    let error = assigner
        .apply(&target, &all, &none)
        .await
        .expect_err("second refusal returned");
    assert!(error.downcast_ref::<NotApplied>().is_none(), "{error}");
    assert!(
        error.to_string().contains("FailedIdentityOperation"),
        "{error}"
    );
    assert_eq!(azure.arm.patch_count(&azure.vmss), 2);
    assert!(
        azure
            .cloud
            .assigned_identities(&azure.vmss)
            .expect("vmss")
            .is_empty()
    );

    // No retry: the first refusal is the error.
    let azure = Azure::start();
    let (all, _) = two_refusals(&azure);
    let assigner = azure.assigner_with(ArmConfig {
        refusal_retries: 0,
        ..arm_config(&azure)
    });
    let error = assigner
        .apply(&target, &all, &none)
        .await
        .expect_err("first refusal returned");
    assert!(
        error.to_string().contains("LinkedAuthorizationFailed"),
        "{error}"
    );
    assert_eq!(azure.arm.patch_count(&azure.vmss), 1);
}
