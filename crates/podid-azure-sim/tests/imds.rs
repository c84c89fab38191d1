//! The simulated IMDS: only assigned identities, selectors, header and parameter checks,
//! throttling, counters and injected faults.

mod common;

use std::time::{Duration, Instant};

use podid_azure_sim::{Cloud, ComputeRef, ImdsHandle};
use serde_json::Value;

async fn get(url: &str, metadata: bool) -> (u16, Value) {
    let mut r = common::client().get(url);
    if metadata {
        r = r.header("Metadata", "true");
    }
    let r = r.send().await.expect("send");
    let status = r.status().as_u16();
    (status, r.json().await.expect("json"))
}

fn token_url(imds: &ImdsHandle, extra: &str) -> String {
    format!(
        "{}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net{extra}",
        imds.url()
    )
}

fn setup() -> (Cloud, ComputeRef) {
    let cloud = Cloud::new().expect("cloud");
    let vmss = cloud.add_vmss(
        cloud.subscription_id(),
        cloud.resource_group(),
        "aks-np-vmss",
    );
    (cloud, vmss)
}

#[tokio::test]
async fn serves_only_assigned_identities_with_real_imds_body() {
    let (cloud, vmss) = setup();
    let a = cloud.add_user_assigned_identity("a");
    let b = cloud.add_user_assigned_identity("b");
    cloud.assign_identity(&vmss, &a).expect("assign");
    let imds = ImdsHandle::start(&cloud, &vmss.instance("0")).expect("imds");

    // One user-assigned identity and no selector: that one.
    let (status, body) = get(&token_url(&imds, ""), true).await;
    assert_eq!(status, 200, "{body}");
    for k in [
        "access_token",
        "client_id",
        "expires_in",
        "expires_on",
        "ext_expires_in",
        "not_before",
        "resource",
        "token_type",
    ] {
        assert!(body[k].is_string(), "{k} must be a string: {body}");
    }
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["resource"], "https://vault.azure.net");
    assert_eq!(body["client_id"], a.client_id.as_str());
    assert_eq!(body["expires_in"], "86399");
    let claims = cloud
        .verify_access_token(body["access_token"].as_str().expect("token"))
        .expect("verifies");
    assert_eq!(claims.oid, a.principal_id);
    assert_eq!(claims.xms_mirid.as_deref(), Some(a.resource_id.as_str()));
    assert_eq!(claims.aud, "https://vault.azure.net");

    // b exists but is not assigned to this VMSS.
    let (status, body) = get(
        &token_url(&imds, &format!("&client_id={}", b.client_id)),
        true,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        serde_json::json!({"error": "invalid_request", "error_description": "Identity not found"})
    );

    // Every selector, case-insensitively.
    cloud.assign_identity(&vmss, &b).expect("assign");
    let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    for q in [
        format!("&client_id={}", b.client_id.to_uppercase()),
        format!("&object_id={}", b.principal_id),
        format!("&principal_id={}", b.principal_id),
        format!("&msi_res_id={}", enc(&b.resource_id.to_lowercase())),
        format!("&mi_res_id={}", enc(&b.resource_id)),
    ] {
        let (status, body) = get(&token_url(&imds, &q), true).await;
        assert_eq!(status, 200, "{q}: {body}");
        assert_eq!(body["client_id"], b.client_id.as_str(), "{q}");
    }

    // Two identities, no selector.
    let (status, body) = get(&token_url(&imds, ""), true).await;
    assert_eq!(status, 400);
    assert_eq!(
        body["error_description"],
        "Multiple user assigned identities exist, please specify the clientId / resourceId of the identity in the token request"
    );

    // Unassigned out of band: no longer served.
    cloud.unassign_identity(&vmss, &b).expect("unassign");
    let (status, _) = get(
        &token_url(&imds, &format!("&client_id={}", b.client_id)),
        true,
    )
    .await;
    assert_eq!(status, 400);

    let c = imds.counters();
    assert_eq!(c.tokens_issued, 6);
    assert_eq!(c.per_identity.get(&a.client_id.to_lowercase()), Some(&1));
    assert_eq!(c.per_identity.get(&b.client_id.to_lowercase()), Some(&5));
    assert_eq!(c.token_requests, 9);
}

#[tokio::test]
async fn header_and_parameter_checks() {
    let (cloud, vmss) = setup();
    let a = cloud.add_user_assigned_identity("a");
    cloud.assign_identity(&vmss, &a).expect("assign");
    let imds = ImdsHandle::start(&cloud, &vmss).expect("imds");

    let (status, body) = get(&token_url(&imds, ""), false).await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        serde_json::json!({"error": "invalid_request", "error_description": "Required metadata header not specified"})
    );
    // Header name is case-insensitive (Rust SDK sends `metadata`).
    let r = common::client()
        .get(token_url(&imds, ""))
        .header("metadata", "true")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 200);

    let (status, body) = get(
        &format!(
            "{}/metadata/identity/oauth2/token?resource=https://vault.azure.net",
            imds.url()
        ),
        true,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_request");
    assert!(
        body["error_description"]
            .as_str()
            .expect("desc")
            .contains("api-version")
    );

    let (status, body) = get(
        &format!(
            "{}/metadata/identity/oauth2/token?api-version=2019-08-01",
            imds.url()
        ),
        true,
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["error_description"]
            .as_str()
            .expect("desc")
            .contains("resource")
    );

    let (status, _) = get(&format!("{}/doesnotexist", imds.url()), true).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn system_assigned_identity_is_the_default() {
    let (cloud, vmss) = setup();
    let a = cloud.add_user_assigned_identity("a");
    let b = cloud.add_user_assigned_identity("b");
    cloud.assign_identity(&vmss, &a).expect("assign");
    cloud.assign_identity(&vmss, &b).expect("assign");
    let principal = cloud
        .set_system_assigned(&vmss, true)
        .expect("system")
        .expect("principal id");
    let imds = ImdsHandle::start(&cloud, &vmss).expect("imds");
    let (status, body) = get(&token_url(&imds, ""), true).await;
    assert_eq!(status, 200, "{body}");
    let claims = cloud
        .verify_access_token(body["access_token"].as_str().expect("token"))
        .expect("verifies");
    assert_eq!(claims.oid, principal);
    assert_eq!(claims.xms_mirid, Some(vmss.resource_id()));
}

#[tokio::test]
async fn thirty_quick_requests_are_throttled_at_twenty_per_second() {
    let (cloud, vmss) = setup();
    let a = cloud.add_user_assigned_identity("a");
    cloud.assign_identity(&vmss, &a).expect("assign");
    let imds = ImdsHandle::start(&cloud, &vmss).expect("imds");
    // Isolate the rate limit from the concurrency limit.
    imds.set_limits(20, 1000);
    let url = token_url(&imds, "");
    let started = Instant::now();
    let statuses: Vec<u16> =
        futures::future::join_all((0..30).map(|_| async { get(&url, true).await.0 })).await;
    let elapsed = started.elapsed();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let throttled = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(ok + throttled, 30, "{statuses:?}");
    assert!(throttled > 0, "{statuses:?}");
    if elapsed < Duration::from_secs(1) {
        assert_eq!(ok, 20, "{statuses:?}");
    }
    let c = imds.counters();
    assert_eq!(c.throttled as usize, throttled);
    assert_eq!(c.tokens_issued as usize, ok);
}

#[tokio::test]
async fn more_than_five_concurrent_requests_are_throttled() {
    let (cloud, vmss) = setup();
    let a = cloud.add_user_assigned_identity("a");
    cloud.assign_identity(&vmss, &a).expect("assign");
    let imds = ImdsHandle::start(&cloud, &vmss).expect("imds");
    // Hold admitted requests long enough that all ten are in flight together.
    imds.set_latency(Duration::from_secs(2));
    let url = token_url(&imds, "");
    let statuses: Vec<u16> =
        futures::future::join_all((0..10).map(|_| async { get(&url, true).await.0 })).await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let throttled = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((ok, throttled), (5, 5), "{statuses:?}");
    let c = imds.counters();
    assert!(c.max_concurrency >= 6, "{c:?}");
    assert_eq!(c.throttled, 5);
}

#[tokio::test]
async fn injected_failures_and_unreachability() {
    let (cloud, vmss) = setup();
    let a = cloud.add_user_assigned_identity("a");
    cloud.assign_identity(&vmss, &a).expect("assign");
    let imds = ImdsHandle::start(&cloud, &vmss).expect("imds");
    imds.fail_next(2, 503);
    let url = token_url(&imds, "");
    assert_eq!(get(&url, true).await.0, 503);
    assert_eq!(get(&url, true).await.0, 503);
    assert_eq!(get(&url, true).await.0, 200);
    assert_eq!(imds.counters().injected_failures, 2);

    imds.set_unreachable(true);
    let err = common::client()
        .get(&url)
        .header("Metadata", "true")
        .send()
        .await;
    assert!(err.is_err(), "unreachable IMDS must not answer");
    imds.set_unreachable(false);
    assert_eq!(get(&url, true).await.0, 200);
}

#[tokio::test]
async fn instance_metadata_names_the_vm_and_scale_set() {
    let (cloud, vmss) = setup();
    let imds = ImdsHandle::start(&cloud, &vmss.instance("3")).expect("imds");
    let (status, body) = get(
        &format!("{}/metadata/instance?api-version=2021-02-01", imds.url()),
        true,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["compute"]["name"], "aks-np-vmss_3");
    assert_eq!(body["compute"]["vmScaleSetName"], "aks-np-vmss");
    assert_eq!(body["compute"]["subscriptionId"], cloud.subscription_id());
    assert_eq!(body["compute"]["resourceGroupName"], cloud.resource_group());
    let (status, _) = get(&format!("{}/metadata/instance", imds.url()), true).await;
    assert_eq!(status, 400);
    let (status, _) = get(
        &format!("{}/metadata/instance?api-version=2021-02-01", imds.url()),
        false,
    )
    .await;
    assert_eq!(status, 400);

    let vm = cloud.add_vm(cloud.subscription_id(), cloud.resource_group(), "node-vm");
    let imds = ImdsHandle::start(&cloud, &vm).expect("imds");
    let (_, body) = get(
        &format!("{}/metadata/instance?api-version=2021-02-01", imds.url()),
        true,
    )
    .await;
    assert_eq!(body["compute"]["name"], "node-vm");
    assert_eq!(body["compute"]["vmScaleSetName"], "");
}

#[tokio::test]
async fn unknown_resource_is_refused_like_imds() {
    let (cloud, vmss) = setup();
    let a = cloud.add_user_assigned_identity("a");
    cloud.assign_identity(&vmss, &a).expect("assign");
    cloud.mark_resource_unknown("https://vault.azure.net");
    let imds = ImdsHandle::start(&cloud, &vmss).expect("imds");
    let (status, body) = get(&token_url(&imds, ""), true).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_resource");
    assert!(
        body["error_description"]
            .as_str()
            .expect("desc")
            .starts_with("AADSTS500011")
    );
    assert_eq!(imds.counters().tokens_issued, 0);
}
