//! The ARM identity assigner against the simulated ARM and Entra (real HTTP): request shapes,
//! idempotence, chunking, long-running operations, refusals, throttling, VM vs VMSS, the
//! system-assigned identity, and authentication failures. PATCHes are counted by the simulator.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use podid_arm::{
    ARM_RESOURCE, ArmClient, ArmConfig, ArmError, ArmTokenFuture, ArmTokenProvider,
    BrokerTokenProvider, ComputeId, IdentityResourceId, ResourceIdentityType,
};
use podid_azure_sim::{
    ArmHandle, Cloud, ComputeKind as SimKind, ComputeRef, EntraHandle,
    ResourceIdentityType as SimType,
};
use podid_broker::{
    BrokerConfig, ClientSecretSource, EntraConfig, IdentitySpec, ManualClock, Secret, Sources,
    SystemClock, Token, TokenBroker,
};

/// A fixed token; counts invalidations.
#[derive(Debug)]
struct FixedToken {
    token: String,
    invalidated: AtomicUsize,
}

impl ArmTokenProvider for FixedToken {
    fn token(&self) -> ArmTokenFuture<'_> {
        let t = Token::new(self.token.clone(), ARM_RESOURCE, u64::MAX / 2);
        Box::pin(async move { Ok(Arc::new(t)) })
    }

    fn invalidate(&self) {
        self.invalidated.fetch_add(1, Ordering::SeqCst);
    }
}

struct Env {
    cloud: Cloud,
    arm: ArmHandle,
    /// Kept alive for the token source.
    _entra: EntraHandle,
    mic_client_id: String,
    vmss: ComputeRef,
    client: ArmClient,
}

fn config(arm: &ArmHandle) -> ArmConfig {
    ArmConfig {
        base_url: arm.url(),
        poll_interval: Duration::from_millis(10),
        operation_timeout: Duration::from_secs(10),
        proxy_from_env: false,
        ..ArmConfig::default()
    }
}

fn env() -> Env {
    let cloud = Cloud::new().expect("cloud");
    let mic = cloud.add_service_principal("mic");
    let secret = cloud.add_client_secret(&mic.client_id).expect("secret");
    let entra = EntraHandle::start(&cloud).expect("entra");
    let arm = ArmHandle::start(&cloud).expect("arm");
    let vmss = cloud.add_vmss(
        cloud.subscription_id(),
        cloud.resource_group(),
        "aks-np-vmss",
    );
    // MIC's ARM token comes from the product's own Entra client-secret source via the broker.
    let source = ClientSecretSource::new(
        EntraConfig {
            default_authority: format!("{}/", entra.url()),
            ..EntraConfig::default()
        },
        Arc::new(SystemClock),
    )
    .expect("entra source");
    let broker = Arc::new(TokenBroker::new(
        BrokerConfig::default(),
        Sources::all(Arc::new(source)),
        Arc::new(SystemClock),
    ));
    let identity = IdentitySpec::client_secret(
        mic.client_id.as_str(),
        cloud.tenant_id(),
        Secret::new(secret.as_str()),
    );
    let tokens = BrokerTokenProvider::new(broker, identity, ARM_RESOURCE);
    let client = ArmClient::new(config(&arm), Arc::new(tokens)).expect("arm client");
    Env {
        cloud,
        arm,
        _entra: entra,
        mic_client_id: mic.client_id,
        vmss,
        client,
    }
}

/// The node providerID of a sim VM, or of instance 0 of a sim scale set.
fn provider_id(r: &ComputeRef) -> String {
    match r.kind {
        SimKind::Vmss => format!("azure://{}/virtualMachines/0", r.resource_id()),
        SimKind::Vm => format!("azure://{}", r.resource_id()),
    }
}

fn compute(r: &ComputeRef) -> ComputeId {
    ComputeId::from_provider_id(&provider_id(r)).expect("provider id")
}

fn uai(cloud: &Cloud, name: &str) -> IdentityResourceId {
    let id = cloud.add_user_assigned_identity(name);
    IdentityResourceId::parse(&id.resource_id).expect("valid id")
}

fn assigned(cloud: &Cloud, r: &ComputeRef) -> Vec<String> {
    let mut ids: Vec<String> = cloud
        .assigned_identities(r)
        .expect("compute")
        .into_iter()
        .map(|s| s.to_ascii_lowercase())
        .collect();
    ids.sort();
    ids
}

fn strs(ids: &[&IdentityResourceId]) -> Vec<String> {
    let mut v: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    v.sort();
    v
}

#[tokio::test]
async fn adds_and_removes_on_a_vmss_with_lower_cased_ids() {
    let e = env();
    let c = compute(&e.vmss);
    let (a, b) = (uai(&e.cloud, "Web-ID"), uai(&e.cloud, "worker"));

    let out = e
        .client
        .update_identities(&c, &[a.clone(), b.clone()], &[])
        .await
        .expect("add");
    assert_eq!(out.patches, 1);
    assert_eq!(out.added.len(), 2);
    assert_eq!(assigned(&e.cloud, &e.vmss), strs(&[&a, &b]));
    assert_eq!(e.arm.patch_count(&e.vmss), 1);
    let patch = e
        .arm
        .calls()
        .into_iter()
        .find(|c| c.method == "PATCH")
        .expect("a PATCH");
    let mut sent = patch.added.clone();
    sent.sort();
    assert_eq!(sent, strs(&[&a, &b]), "ids are sent lower-cased");

    let out = e
        .client
        .update_identities(&c, &[], std::slice::from_ref(&a))
        .await
        .expect("remove");
    assert_eq!(out.removed, vec![a.clone()]);
    assert_eq!(assigned(&e.cloud, &e.vmss), strs(&[&b]));
    assert_eq!(
        e.cloud.identity_type(&e.vmss).expect("type"),
        SimType::UserAssigned
    );

    e.client
        .update_identities(&c, &[], std::slice::from_ref(&b))
        .await
        .expect("remove last");
    assert!(assigned(&e.cloud, &e.vmss).is_empty());
    assert_eq!(e.cloud.identity_type(&e.vmss).expect("type"), SimType::None);
    let state = e.client.get_identity(&c).await.expect("get");
    assert_eq!(state.identity_type, ResourceIdentityType::None);
    assert_eq!(e.arm.patch_count(&e.vmss), 3);
    // One ARM token for all of it: the broker caches.
    assert_eq!(e.cloud.entra_tokens_issued(&e.mic_client_id), 1);
}

#[tokio::test]
async fn second_identical_call_sends_no_patch() {
    let e = env();
    let c = compute(&e.vmss);
    let a = uai(&e.cloud, "a");
    let gone = uai(&e.cloud, "never-assigned");
    e.client
        .update_identities(&c, std::slice::from_ref(&a), &[])
        .await
        .expect("first");
    let gets = e.arm.get_count(&e.vmss);
    let out = e
        .client
        .update_identities(&c, std::slice::from_ref(&a), std::slice::from_ref(&gone))
        .await
        .expect("second");
    assert!(out.is_noop());
    assert_eq!(e.arm.patch_count(&e.vmss), 1);
    assert_eq!(e.arm.get_count(&e.vmss), gets + 1);

    // Nothing asked: no ARM call at all.
    let out = e
        .client
        .update_identities(&c, &[], &[])
        .await
        .expect("empty");
    assert!(out.is_noop());
    assert_eq!(e.arm.get_count(&e.vmss), gets + 1);
}

#[tokio::test]
async fn more_than_150_ids_are_chunked() {
    let e = env();
    let c = compute(&e.vmss);
    let ids: Vec<IdentityResourceId> = (0..320)
        .map(|i| uai(&e.cloud, &format!("id{i:03}")))
        .collect();
    let out = e
        .client
        .update_identities(&c, &ids, &[])
        .await
        .expect("add 320");
    assert_eq!(out.patches, 3);
    assert_eq!(e.arm.patch_count(&e.vmss), 3);
    assert_eq!(assigned(&e.cloud, &e.vmss).len(), 320);
    let sizes: Vec<usize> = e
        .arm
        .calls()
        .iter()
        .filter(|c| c.method == "PATCH")
        .map(|c| c.added.len() + c.removed.len())
        .collect();
    assert_eq!(sizes, vec![150, 150, 20]);
    assert!(e.arm.calls().iter().all(|c| c.status < 400));
}

#[tokio::test]
async fn waits_for_the_long_running_operation() {
    let e = env();
    let c = compute(&e.vmss);
    let a = uai(&e.cloud, "slow");
    e.arm.set_operation_duration(Duration::from_millis(300));
    e.client
        .update_identities(&c, std::slice::from_ref(&a), &[])
        .await
        .expect("add");
    // Returned only once the operation completed: the assignment is in effect now.
    assert_eq!(assigned(&e.cloud, &e.vmss), strs(&[&a]));
    assert_eq!(e.cloud.pending_operations(), 0);
    let polls = e
        .arm
        .calls()
        .iter()
        .filter(|c| c.path.contains("/operations/"))
        .count();
    assert!(polls >= 2, "polled until Succeeded, saw {polls} polls");
}

#[tokio::test]
async fn operation_timeout_names_the_ids() {
    let e = env();
    let a = uai(&e.cloud, "very-slow");
    e.arm.set_operation_duration(Duration::from_secs(30));
    let client = ArmClient::new(
        ArmConfig {
            operation_timeout: Duration::from_millis(200),
            ..config(&e.arm)
        },
        Arc::new(FixedToken {
            token: e
                .cloud
                .issue_access_token(&e.mic_client_id, ARM_RESOURCE)
                .expect("token"),
            invalidated: AtomicUsize::new(0),
        }),
    )
    .expect("client");
    let err = client
        .update_identities(&compute(&e.vmss), std::slice::from_ref(&a), &[])
        .await
        .expect_err("times out");
    assert!(matches!(err, ArmError::OperationTimeout { .. }), "{err:?}");
    assert!(err.to_string().contains(a.as_str()), "{err}");
    assert!(err.is_transient());
}

#[tokio::test]
async fn deleting_resource_is_refused_without_patch() {
    let e = env();
    let a = uai(&e.cloud, "a");
    e.cloud
        .set_provisioning_state(&e.vmss, "Deleting")
        .expect("state");
    let err = e
        .client
        .update_identities(&compute(&e.vmss), std::slice::from_ref(&a), &[])
        .await
        .expect_err("refused");
    assert!(matches!(err, ArmError::Deleting { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "failed to update identities for aks-np-vmss in {}, vmss is in Deleting provisioning state",
            e.cloud.resource_group()
        )
    );
    assert_eq!(e.arm.patch_count(&e.vmss), 0);

    let vm = e
        .cloud
        .add_vm(e.cloud.subscription_id(), e.cloud.resource_group(), "vm-0");
    e.cloud
        .set_provisioning_state(&vm, "Deleting")
        .expect("state");
    let err = e
        .client
        .update_identities(&compute(&vm), std::slice::from_ref(&a), &[])
        .await
        .expect_err("refused");
    assert!(
        err.to_string()
            .ends_with("vm is in 'Deleting' provisioning state"),
        "{err}"
    );
    assert_eq!(e.arm.patch_count(&vm), 0);
}

#[tokio::test]
async fn linked_authorization_failure_drops_only_the_named_id() {
    let e = env();
    let c = compute(&e.vmss);
    let (a, denied, b) = (
        uai(&e.cloud, "a"),
        uai(&e.cloud, "denied"),
        uai(&e.cloud, "b"),
    );
    e.arm.deny_linked_authorization(denied.as_str());
    let out = e
        .client
        .update_identities(&c, &[a.clone(), denied.clone(), b.clone()], &[])
        .await
        .expect("partial success");
    assert_eq!(out.dropped, vec![denied.clone()]);
    assert!(
        out.dropped_reason
            .as_deref()
            .is_some_and(|r| r.contains("LinkedAuthorizationFailed")),
        "{out:?}"
    );
    assert_eq!(assigned(&e.cloud, &e.vmss), strs(&[&a, &b]));
    assert_eq!(
        e.arm.patch_count(&e.vmss),
        2,
        "one refused PATCH, one retry"
    );
}

#[tokio::test]
async fn missing_identity_is_dropped_too() {
    let e = env();
    let c = compute(&e.vmss);
    let a = uai(&e.cloud, "a");
    let missing = IdentityResourceId::parse(&format!(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/does-not-exist",
        e.cloud.subscription_id(),
        e.cloud.resource_group()
    ))
    .expect("valid");
    let out = e
        .client
        .update_identities(&c, &[a.clone(), missing.clone()], &[])
        .await
        .expect("partial");
    assert_eq!(out.dropped, vec![missing]);
    assert_eq!(assigned(&e.cloud, &e.vmss), strs(&[&a]));
}

#[tokio::test]
async fn all_ids_refused_leaves_nothing_assigned() {
    let e = env();
    let c = compute(&e.vmss);
    let (x, y) = (uai(&e.cloud, "x"), uai(&e.cloud, "y"));
    e.arm.deny_linked_authorization(x.as_str());
    e.arm.deny_linked_authorization(y.as_str());
    let out = e
        .client
        .update_identities(&c, &[x.clone(), y.clone()], &[])
        .await
        .expect("all dropped, nothing left to do");
    let mut dropped = out.dropped.clone();
    dropped.sort();
    assert_eq!(dropped, vec![x, y]);
    assert!(assigned(&e.cloud, &e.vmss).is_empty());
    assert_eq!(e.arm.patch_count(&e.vmss), 1);
}

#[tokio::test]
async fn throttling_gates_the_subscription_until_retry_after() {
    let e = env();
    let clock = Arc::new(ManualClock::at_unix(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs(),
    ));
    let client = ArmClient::new(
        config(&e.arm),
        Arc::new(FixedToken {
            token: e
                .cloud
                .issue_access_token(&e.mic_client_id, ARM_RESOURCE)
                .expect("token"),
            invalidated: AtomicUsize::new(0),
        }),
    )
    .expect("client")
    .with_clock(clock.clone());
    let c = compute(&e.vmss);
    let a = uai(&e.cloud, "a");
    e.arm.throttle_next(1, 30);

    let err = client
        .update_identities(&c, std::slice::from_ref(&a), &[])
        .await
        .expect_err("throttled");
    assert_eq!(err.retry_after(), Some(Duration::from_secs(30)), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("VMSSGet client throttled, retry after: 30s"),
        "{err}"
    );
    let seen = e.arm.calls().len();

    // Gated locally: no request reaches ARM, for GET and update alike.
    clock.advance(Duration::from_secs(10));
    let err = client.get_identity(&c).await.expect_err("still gated");
    assert_eq!(err.retry_after(), Some(Duration::from_secs(20)));
    let err = client
        .update_identities(&c, std::slice::from_ref(&a), &[])
        .await
        .expect_err("still gated");
    assert!(matches!(err, ArmError::Throttled { .. }));
    assert_eq!(e.arm.calls().len(), seen, "no request while gated");
    assert!(client.throttled_until(e.cloud.subscription_id()).is_some());

    // Another subscription is not gated.
    let other_vm = e.cloud.add_vm("other-sub", "rg", "vm-1");
    client
        .get_identity(&compute(&other_vm))
        .await
        .expect("other subscription");

    // After Retry-After the calls go through again.
    clock.advance(Duration::from_secs(21));
    assert!(client.throttled_until(e.cloud.subscription_id()).is_none());
    client
        .update_identities(&c, std::slice::from_ref(&a), &[])
        .await
        .expect("after the gate");
    assert_eq!(assigned(&e.cloud, &e.vmss), strs(&[&a]));
}

#[tokio::test]
async fn throttled_patch_is_not_retried() {
    let e = env();
    let c = compute(&e.vmss);
    let a = uai(&e.cloud, "a");
    // Warm up the token so the only request of the update below is its GET.
    e.client.get_identity(&c).await.expect("get");
    let gets = e.arm.get_count(&e.vmss);
    e.arm.throttle_next(1, 5);
    let err = e
        .client
        .update_identities(&c, std::slice::from_ref(&a), &[])
        .await
        .expect_err("throttled");
    assert!(matches!(err, ArmError::Throttled { .. }));
    assert_eq!(
        e.arm.get_count(&e.vmss) + e.arm.patch_count(&e.vmss),
        gets + 1,
        "one request, no retry"
    );
}

#[tokio::test]
async fn vm_and_vmss_use_their_own_paths() {
    let e = env();
    let vm = e.cloud.add_vm(
        e.cloud.subscription_id(),
        e.cloud.resource_group(),
        "aks-node-0",
    );
    let a = uai(&e.cloud, "a");
    let c = compute(&vm);
    assert_eq!(c.kind(), podid_arm::ComputeKind::VirtualMachine);
    e.client
        .update_identities(&c, std::slice::from_ref(&a), &[])
        .await
        .expect("vm");
    assert_eq!(assigned(&e.cloud, &vm), strs(&[&a]));
    assert!(assigned(&e.cloud, &e.vmss).is_empty());
    assert_eq!(e.arm.patch_count(&vm), 1);
    assert_eq!(e.arm.patch_count(&e.vmss), 0);
    assert!(
        e.arm
            .calls()
            .iter()
            .filter(|c| c.method == "PATCH")
            .all(|c| c
                .path
                .ends_with("/providers/Microsoft.Compute/virtualMachines/aks-node-0"))
    );
}

#[tokio::test]
async fn system_assigned_identity_is_kept() {
    let e = env();
    let c = compute(&e.vmss);
    e.cloud.set_system_assigned(&e.vmss, true).expect("system");
    let a = uai(&e.cloud, "a");
    e.client
        .update_identities(&c, std::slice::from_ref(&a), &[])
        .await
        .expect("add");
    assert_eq!(
        e.cloud.identity_type(&e.vmss).expect("type"),
        SimType::SystemAssignedUserAssigned
    );
    e.client
        .update_identities(&c, &[], std::slice::from_ref(&a))
        .await
        .expect("remove");
    assert_eq!(
        e.cloud.identity_type(&e.vmss).expect("type"),
        SimType::SystemAssigned
    );
    assert!(assigned(&e.cloud, &e.vmss).is_empty());
}

#[tokio::test]
async fn identities_not_managed_here_are_untouched() {
    let e = env();
    let c = compute(&e.vmss);
    let kubelet = e.cloud.add_user_assigned_identity("kubelet");
    e.cloud.assign_identity(&e.vmss, &kubelet).expect("assign");
    let a = uai(&e.cloud, "a");
    e.client
        .update_identities(&c, std::slice::from_ref(&a), &[])
        .await
        .expect("add");
    e.client
        .update_identities(&c, &[], std::slice::from_ref(&a))
        .await
        .expect("remove");
    assert_eq!(
        assigned(&e.cloud, &e.vmss),
        vec![kubelet.resource_id.to_ascii_lowercase()]
    );
    assert_eq!(
        e.cloud.identity_type(&e.vmss).expect("type"),
        SimType::UserAssigned
    );
}

#[tokio::test]
async fn bad_token_is_an_auth_error_and_invalidates() {
    let e = env();
    let tokens = Arc::new(FixedToken {
        token: "eyJhbGciOiJub25lIn0.e30.c2VjcmV0LXNpZ25hdHVyZQ".to_owned(),
        invalidated: AtomicUsize::new(0),
    });
    let client = ArmClient::new(config(&e.arm), tokens.clone()).expect("client");
    let a = uai(&e.cloud, "a");
    let err = client
        .update_identities(&compute(&e.vmss), std::slice::from_ref(&a), &[])
        .await
        .expect_err("401");
    match &err {
        ArmError::Auth { status, code, .. } => {
            assert_eq!(*status, 401);
            assert_eq!(code, "InvalidAuthenticationToken");
        }
        other => panic!("expected Auth, got {other:?}"),
    }
    assert!(!err.is_transient());
    assert_eq!(tokens.invalidated.load(Ordering::SeqCst), 1);
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(
            !text.contains("c2VjcmV0LXNpZ25hdHVyZQ"),
            "token leaked: {text}"
        );
    }
    assert_eq!(e.arm.patch_count(&e.vmss), 0);
}

#[tokio::test]
async fn unknown_resource_is_not_found() {
    let e = env();
    let missing = ComputeId::vm(
        e.cloud.subscription_id(),
        e.cloud.resource_group(),
        "no-such-vm",
    );
    let err = e.client.get_identity(&missing).await.expect_err("404");
    assert!(matches!(err, ArmError::NotFound { .. }), "{err:?}");
    assert_eq!(err.compute(), &missing);
}

#[tokio::test]
async fn server_errors_are_transient_status_errors() {
    let e = env();
    let c = compute(&e.vmss);
    e.client.get_identity(&c).await.expect("warm token");
    e.arm.fail_next(1, 500);
    let err = e.client.get_identity(&c).await.expect_err("500");
    assert!(
        matches!(err, ArmError::Status { status: 500, .. }),
        "{err:?}"
    );
    assert!(err.is_transient());
    // 503 without Retry-After is not throttling: no gate.
    e.arm.fail_next(1, 503);
    e.client.get_identity(&c).await.expect_err("503");
    assert!(
        e.client
            .throttled_until(e.cloud.subscription_id())
            .is_none()
    );
    e.client
        .get_identity(&c)
        .await
        .expect("next call goes through");
}

#[tokio::test]
async fn concurrent_updates_of_one_resource_do_not_overlap() {
    let e = env();
    e.arm.set_reject_concurrent_updates(true);
    e.arm.set_operation_duration(Duration::from_millis(200));
    let c = compute(&e.vmss);
    let (a, b) = (uai(&e.cloud, "a"), uai(&e.cloud, "b"));
    let (ra, rb) = tokio::join!(
        e.client
            .update_identities(&c, std::slice::from_ref(&a), &[]),
        e.client
            .update_identities(&c, std::slice::from_ref(&b), &[]),
    );
    ra.expect("first");
    rb.expect("second");
    assert_eq!(assigned(&e.cloud, &e.vmss), strs(&[&a, &b]));
    assert_eq!(e.arm.overlapping_patch_count(&e.vmss), 0);
    assert_eq!(e.arm.patch_count(&e.vmss), 2);
}
