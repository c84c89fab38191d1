//! The simulated ARM: bearer checks, identity GET/PATCH semantics, limits, refusals,
//! long-running operations, throttling, and the effect of assignments on IMDS.

mod common;

use std::time::{Duration, Instant};

use podid_azure_sim::{
    ArmHandle, Cloud, ComputeRef, EntraHandle, ImdsHandle, ResourceIdentityType,
};
use serde_json::{Value, json};

struct Env {
    cloud: Cloud,
    arm: ArmHandle,
    vmss: ComputeRef,
    token: String,
}

fn env() -> Env {
    let cloud = Cloud::new().expect("cloud");
    let mic = cloud.add_service_principal("mic");
    let token = cloud
        .issue_access_token(&mic.client_id, "https://management.azure.com/")
        .expect("token");
    let vmss = cloud.add_vmss(
        cloud.subscription_id(),
        cloud.resource_group(),
        "aks-np-vmss",
    );
    let arm = ArmHandle::start(&cloud).expect("arm");
    Env {
        cloud,
        arm,
        vmss,
        token,
    }
}

fn url(arm: &ArmHandle, r: &ComputeRef) -> String {
    format!("{}{}?api-version=2019-12-01", arm.url(), r.resource_id())
}

async fn send(
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut r = common::client().request(method, url);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    if let Some(b) = body {
        r = r
            .header("Content-Type", "application/json; charset=utf-8")
            .body(b.to_string());
    }
    let resp = r.send().await.expect("send");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.expect("body");
    (
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(Value::Null),
    )
}

async fn get(e: &Env, r: &ComputeRef) -> (u16, Value) {
    let (s, _, b) = send(reqwest::Method::GET, &url(&e.arm, r), Some(&e.token), None).await;
    (s, b)
}

async fn patch(e: &Env, r: &ComputeRef, body: Value) -> (u16, reqwest::header::HeaderMap, Value) {
    send(
        reqwest::Method::PATCH,
        &url(&e.arm, r),
        Some(&e.token),
        Some(body),
    )
    .await
}

fn ua(ids: &[(&str, Value)]) -> Value {
    let map: serde_json::Map<String, Value> = ids
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    json!({"identity": {"type": "UserAssigned", "userAssignedIdentities": map}})
}

#[tokio::test]
async fn bearer_token_is_verified() {
    let e = env();
    let u = url(&e.arm, &e.vmss);
    let (s, h, b) = send(reqwest::Method::GET, &u, None, None).await;
    assert_eq!(s, 401);
    assert_eq!(b["error"]["code"], "AuthenticationFailed");
    assert!(h.contains_key("www-authenticate"));

    let (s, _, b) = send(reqwest::Method::GET, &u, Some("not.a.token"), None).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (401, Some("InvalidAuthenticationToken"))
    );

    let other = Cloud::new().expect("cloud");
    let stranger = other.add_service_principal("x");
    let foreign = other
        .issue_access_token(&stranger.client_id, "https://management.azure.com/")
        .expect("token");
    let (s, _, b) = send(reqwest::Method::GET, &u, Some(&foreign), None).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (401, Some("InvalidAuthenticationToken"))
    );

    let sp = e.cloud.add_service_principal("vault-user");
    let vault = e
        .cloud
        .issue_access_token(&sp.client_id, "https://vault.azure.net")
        .expect("token");
    let (s, _, b) = send(reqwest::Method::GET, &u, Some(&vault), None).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (401, Some("InvalidAuthenticationTokenAudience"))
    );

    // A token from the simulated Entra (v2 scope form) is accepted.
    let secret = e.cloud.add_client_secret(&sp.client_id).expect("secret");
    let entra = EntraHandle::start(&e.cloud).expect("entra");
    let (status, body) = common::post_form(
        &entra.token_url_v2(),
        &[
            ("grant_type", "client_credentials"),
            ("client_id", &sp.client_id),
            ("client_secret", &secret),
            ("scope", "https://management.azure.com/.default"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    let (s, _, b) = send(
        reqwest::Method::GET,
        &u,
        body["access_token"].as_str(),
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert!(e.arm.calls().iter().filter(|c| c.status == 401).count() == 4);
}

#[tokio::test]
async fn get_shapes_and_not_found() {
    let e = env();
    let a = e.cloud.add_user_assigned_identity("a");
    e.cloud.assign_identity(&e.vmss, &a).expect("assign");
    let (s, b) = get(&e, &e.vmss).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["identity"]["type"], "UserAssigned");
    assert_eq!(
        b["identity"]["userAssignedIdentities"][&a.resource_id],
        json!({"principalId": a.principal_id, "clientId": a.client_id})
    );
    assert_eq!(b["properties"]["provisioningState"], "Succeeded");

    let missing = e
        .cloud
        .add_vm(e.cloud.subscription_id(), "other-rg", "ghost");
    let mut ghost = missing.clone();
    ghost.name = "ghost2".to_owned();
    let (s, b) = get(&e, &ghost).await;
    assert_eq!(s, 404);
    assert_eq!(b["error"]["code"], "ResourceNotFound");
    assert!(
        b["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("ghost2")
    );
    assert_eq!(e.arm.get_count(&e.vmss), 1);
}

#[tokio::test]
async fn patch_merges_user_assigned_identities_and_type() {
    let e = env();
    let a = e.cloud.add_user_assigned_identity("a");
    let b = e.cloud.add_user_assigned_identity("b");
    let kubelet = e.cloud.add_user_assigned_identity("kubelet");
    e.cloud.assign_identity(&e.vmss, &kubelet).expect("assign");

    // MIC sends lower-cased ids; `{}` adds.
    let (s, h, body) = patch(
        &e,
        &e.vmss,
        ua(&[(&a.resource_id.to_lowercase(), json!({}))]),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert!(h.contains_key("azure-asyncoperation"));
    assert!(
        e.cloud
            .wait_operations_settled(Duration::from_secs(5))
            .await
    );
    let ids = e.cloud.assigned_identities(&e.vmss).expect("ids");
    assert_eq!(ids.len(), 2, "{ids:?}");

    let (s, _, _) = patch(&e, &e.vmss, ua(&[(&b.resource_id, json!({}))])).await;
    assert_eq!(s, 200);
    // `null` removes, whatever the case of the key.
    let (s, _, _) = patch(
        &e,
        &e.vmss,
        ua(&[(&a.resource_id.to_uppercase(), Value::Null)]),
    )
    .await;
    assert_eq!(s, 200);
    assert!(
        e.cloud
            .wait_operations_settled(Duration::from_secs(5))
            .await
    );
    let mut ids = e.cloud.assigned_identities(&e.vmss).expect("ids");
    ids.sort();
    let mut want = vec![b.resource_id.clone(), kubelet.resource_id.clone()];
    want.sort();
    assert_eq!(ids, want, "kubelet identity untouched, a removed");

    // Enable system-assigned alongside.
    let (s, _, body) = patch(
        &e,
        &e.vmss,
        json!({"identity": {"type": "SystemAssigned, UserAssigned"}}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let (_, got) = get(&e, &e.vmss).await;
    assert_eq!(got["identity"]["type"], "SystemAssigned, UserAssigned");
    assert!(got["identity"]["principalId"].is_string());

    // Type SystemAssigned drops every user-assigned identity.
    let (s, _, _) = patch(&e, &e.vmss, json!({"identity": {"type": "SystemAssigned"}})).await;
    assert_eq!(s, 200);
    assert_eq!(
        e.cloud.identity_type(&e.vmss).expect("type"),
        ResourceIdentityType::SystemAssigned
    );
    assert!(
        e.cloud
            .assigned_identities(&e.vmss)
            .expect("ids")
            .is_empty()
    );

    // None removes the identity block altogether.
    let (s, _, _) = patch(&e, &e.vmss, json!({"identity": {"type": "None"}})).await;
    assert_eq!(s, 200);
    let (_, got) = get(&e, &e.vmss).await;
    assert!(got.get("identity").is_none(), "{got}");

    let calls = e.arm.calls();
    let patches: Vec<_> = calls.iter().filter(|c| c.method == "PATCH").collect();
    assert_eq!(patches.len(), 6);
    assert_eq!(patches[0].added, vec![a.resource_id.to_lowercase()]);
    assert_eq!(patches[2].removed, vec![a.resource_id.to_uppercase()]);
    assert_eq!(e.arm.patch_count(&e.vmss), 6);
}

#[tokio::test]
async fn at_most_150_identities_per_request() {
    let e = env();
    let ids: Vec<_> = (0..151)
        .map(|i| e.cloud.add_user_assigned_identity(&format!("id{i}")))
        .collect();
    let all: Vec<(&str, Value)> = ids
        .iter()
        .map(|i| (i.resource_id.as_str(), json!({})))
        .collect();
    let (s, _, body) = patch(&e, &e.vmss, ua(&all)).await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(
        body["error"]["message"],
        "User Assigned Identities Number '151' Assign exceed limit '150' in one request."
    );
    assert!(
        e.cloud
            .assigned_identities(&e.vmss)
            .expect("ids")
            .is_empty()
    );
    let (s, _, body) = patch(&e, &e.vmss, ua(&all[..150])).await;
    assert_eq!(s, 200, "{body}");
    assert!(
        e.cloud
            .wait_operations_settled(Duration::from_secs(5))
            .await
    );
    assert_eq!(
        e.cloud.assigned_identities(&e.vmss).expect("ids").len(),
        150
    );
}

#[tokio::test]
async fn refusals_name_the_offending_identities() {
    let e = env();
    let ok = e.cloud.add_user_assigned_identity("ok");
    let denied = e.cloud.add_user_assigned_identity("denied");
    let gone = format!(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/gone",
        e.cloud.subscription_id(),
        e.cloud.resource_group()
    );

    let (s, _, body) = patch(
        &e,
        &e.vmss,
        ua(&[(&ok.resource_id, json!({})), (&gone, json!({}))]),
    )
    .await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["error"]["code"], "FailedIdentityOperation");
    let msg = body["error"]["message"].as_str().expect("msg");
    assert!(msg.contains(&format!("'{gone}'")), "{msg}");

    e.arm.deny_linked_authorization(&denied.resource_id);
    let (s, _, body) = patch(&e, &e.vmss, ua(&[(&denied.resource_id, json!({}))])).await;
    assert_eq!(s, 403, "{body}");
    assert_eq!(body["error"]["code"], "LinkedAuthorizationFailed");
    let msg = body["error"]["message"].as_str().expect("msg");
    assert!(
        msg.contains(&format!("linked scope(s) '{}'", denied.resource_id)),
        "{msg}"
    );
    assert!(
        e.cloud
            .assigned_identities(&e.vmss)
            .expect("ids")
            .is_empty()
    );

    e.cloud
        .set_provisioning_state(&e.vmss, "Deleting")
        .expect("state");
    let (s, _, body) = patch(&e, &e.vmss, ua(&[(&ok.resource_id, json!({}))])).await;
    assert_eq!(s, 409, "{body}");
    assert!(
        e.cloud
            .assigned_identities(&e.vmss)
            .expect("ids")
            .is_empty()
    );

    let calls = e.arm.calls();
    assert_eq!(calls[1].status, 403);
    assert_eq!(calls[1].added, vec![denied.resource_id.clone()]);
}

#[tokio::test]
async fn throttling_answers_429_with_retry_after() {
    let e = env();
    e.arm.throttle_next(1, 17);
    let (s, h, body) = send(
        reqwest::Method::GET,
        &url(&e.arm, &e.vmss),
        Some(&e.token),
        None,
    )
    .await;
    assert_eq!(s, 429, "{body}");
    assert_eq!(
        h.get("retry-after").and_then(|v| v.to_str().ok()),
        Some("17")
    );
    assert_eq!(body["error"]["code"], "TooManyRequests");
    e.arm.fail_next(1, 503);
    assert_eq!(get(&e, &e.vmss).await.0, 503);
    assert_eq!(get(&e, &e.vmss).await.0, 200);
}

#[tokio::test]
async fn assignment_takes_effect_when_the_operation_completes_then_imds_serves_it() {
    let e = env();
    let a = e.cloud.add_user_assigned_identity("a");
    let imds = ImdsHandle::start(&e.cloud, &e.vmss.instance("0")).expect("imds");
    let token_url = format!(
        "{}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net&client_id={}",
        imds.url(),
        a.client_id
    );
    let imds_status = || async {
        common::client()
            .get(&token_url)
            .header("Metadata", "true")
            .send()
            .await
            .expect("send")
            .status()
            .as_u16()
    };
    assert_eq!(imds_status().await, 400);

    e.arm.set_operation_duration(Duration::from_secs(3));
    let (s, h, body) = patch(&e, &e.vmss, ua(&[(&a.resource_id, json!({}))])).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["properties"]["provisioningState"], "Updating");
    let op = h
        .get("azure-asyncoperation")
        .and_then(|v| v.to_str().ok())
        .expect("Azure-AsyncOperation")
        .to_owned();
    assert!(
        op.contains("/providers/Microsoft.Compute/locations/"),
        "{op}"
    );

    let (s, _, status) = send(reqwest::Method::GET, &op, Some(&e.token), None).await;
    assert_eq!(s, 200);
    assert_eq!(status["status"], "InProgress");
    // Not yet in effect: ARM shows the old identities and IMDS refuses.
    assert!(
        e.cloud
            .assigned_identities(&e.vmss)
            .expect("ids")
            .is_empty()
    );
    assert_eq!(
        get(&e, &e.vmss).await.1["properties"]["provisioningState"],
        "Updating"
    );
    assert_eq!(imds_status().await, 400);

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, _, status) = send(reqwest::Method::GET, &op, Some(&e.token), None).await;
        if status["status"] == "Succeeded" {
            break;
        }
        assert_eq!(status["status"], "InProgress");
        assert!(Instant::now() < deadline, "operation never completed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, got) = get(&e, &e.vmss).await;
    assert_eq!(got["properties"]["provisioningState"], "Succeeded");
    assert!(
        got["identity"]["userAssignedIdentities"]
            .get(&a.resource_id)
            .is_some()
    );
    assert_eq!(imds_status().await, 200);
}

#[tokio::test]
async fn deleted_and_recreated_identity_stays_stale_on_the_vmss() {
    let e = env();
    let a = e.cloud.add_user_assigned_identity("a");
    let (s, _, _) = patch(&e, &e.vmss, ua(&[(&a.resource_id, json!({}))])).await;
    assert_eq!(s, 200);
    e.cloud.delete_user_assigned_identity(&a);
    let again = e.cloud.add_user_assigned_identity("a");
    assert_eq!(again.resource_id, a.resource_id);
    assert_ne!(again.client_id, a.client_id);
    let (_, got) = get(&e, &e.vmss).await;
    assert_eq!(
        got["identity"]["userAssignedIdentities"][&a.resource_id],
        json!({"principalId": null, "clientId": null})
    );
    let imds = ImdsHandle::start(&e.cloud, &e.vmss).expect("imds");
    let r = common::client()
        .get(format!(
            "{}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net&client_id={}",
            imds.url(),
            again.client_id
        ))
        .header("Metadata", "true")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 400);
    // Removing the stale entry and adding it again fixes it.
    let (s, _, _) = patch(
        &e,
        &e.vmss,
        ua(&[(&a.resource_id, Value::Null), ("/x", Value::Null)]),
    )
    .await;
    assert_eq!(s, 400, "type UserAssigned with nothing left is refused");
    let (s, _, _) = patch(&e, &e.vmss, json!({"identity": {"type": "None"}})).await;
    assert_eq!(s, 200);
    let (s, _, _) = patch(&e, &e.vmss, ua(&[(&a.resource_id, json!({}))])).await;
    assert_eq!(s, 200);
    let (_, got) = get(&e, &e.vmss).await;
    assert_eq!(
        got["identity"]["userAssignedIdentities"][&a.resource_id]["clientId"],
        again.client_id.as_str()
    );
}

#[tokio::test]
async fn overlapping_patches_are_counted_and_can_be_refused() {
    let e = env();
    let a = e.cloud.add_user_assigned_identity("a");
    let b = e.cloud.add_user_assigned_identity("b");
    e.arm.set_operation_duration(Duration::from_secs(30));
    assert_eq!(
        patch(&e, &e.vmss, ua(&[(&a.resource_id, json!({}))]))
            .await
            .0,
        200
    );
    assert_eq!(
        patch(&e, &e.vmss, ua(&[(&b.resource_id, json!({}))]))
            .await
            .0,
        200
    );
    assert_eq!(e.arm.overlapping_patch_count(&e.vmss), 1);
    e.arm.set_reject_concurrent_updates(true);
    let (s, _, body) = patch(&e, &e.vmss, ua(&[(&b.resource_id, Value::Null)])).await;
    assert_eq!(s, 409, "{body}");
    assert_eq!(body["error"]["code"], "Conflict");
    assert_eq!(e.arm.overlapping_patch_count(&e.vmss), 2);
    assert_eq!(e.cloud.pending_operations(), 2);
}

#[tokio::test]
async fn a_built_arm_keeps_each_patch_in_progress_for_its_operation_duration() {
    let mut e = env();
    e.arm = ArmHandle::builder()
        .operation_duration(Duration::from_millis(600))
        .start(&e.cloud)
        .expect("arm");
    let a = e.cloud.add_user_assigned_identity("a");
    let started = Instant::now();
    let (s, h, body) = patch(&e, &e.vmss, ua(&[(&a.resource_id, json!({}))])).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["properties"]["provisioningState"], "Updating");
    let op = h
        .get("azure-asyncoperation")
        .and_then(|v| v.to_str().ok())
        .expect("Azure-AsyncOperation")
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // The scale set is read before the operation: an operation still in progress after the
        // read was in progress during it too (reading it afterwards raced the completion).
        let in_effect = !e
            .cloud
            .assigned_identities(&e.vmss)
            .expect("ids")
            .is_empty();
        let (_, _, status) = send(reqwest::Method::GET, &op, Some(&e.token), None).await;
        if status["status"] == "Succeeded" {
            break;
        }
        assert_eq!(status["status"], "InProgress");
        assert!(!in_effect, "not in effect before the operation completes");
        assert!(Instant::now() < deadline, "operation never completed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "completed after {:?}",
        started.elapsed()
    );
    assert_eq!(e.cloud.assigned_identities(&e.vmss).expect("ids").len(), 1);
}
