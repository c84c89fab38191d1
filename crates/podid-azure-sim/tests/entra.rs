//! The simulated Entra token endpoint: each grant and each refusal.

mod common;

use common::{aadsts, post_form};
use podid_azure_sim::{Cloud, EntraHandle, GrantKind};

#[tokio::test]
async fn secret_grant_v1_returns_entra_body_with_string_numbers() {
    let cloud = Cloud::new().expect("cloud");
    let sp = cloud.add_service_principal("app");
    let secret = cloud.add_client_secret(&sp.client_id).expect("secret");
    let entra = EntraHandle::start(&cloud).expect("entra");
    let (status, body) = post_form(
        &format!("{}?api-version=1.0", entra.token_url_v1()),
        &[
            ("grant_type", "client_credentials"),
            ("client_id", &sp.client_id),
            ("client_secret", &secret),
            ("resource", "https://vault.azure.net"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for k in ["expires_in", "ext_expires_in", "expires_on", "not_before"] {
        let v = body[k]
            .as_str()
            .unwrap_or_else(|| panic!("{k} is a string"));
        assert!(v.parse::<u64>().is_ok(), "{k}={v}");
    }
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["resource"], "https://vault.azure.net");
    let claims = cloud
        .verify_access_token(body["access_token"].as_str().expect("token"))
        .expect("verifies");
    assert_eq!(claims.aud, "https://vault.azure.net");
    assert_eq!(claims.appid, sp.client_id);
    assert_eq!(claims.oid, sp.object_id);
    assert_eq!(claims.tid, cloud.tenant_id());
    assert_eq!(
        claims.iss,
        format!("https://sts.windows.net/{}/", cloud.tenant_id())
    );
    assert_eq!(claims.xms_mirid, None);
    let calls = entra.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].grant, GrantKind::Secret);
    assert_eq!(calls[0].status, 200);
}

#[tokio::test]
async fn secret_grant_v2_uses_scope_and_numeric_expiry() {
    let cloud = Cloud::new().expect("cloud");
    let sp = cloud.add_service_principal("app");
    let secret = cloud.add_client_secret(&sp.client_id).expect("secret");
    let entra = EntraHandle::start(&cloud).expect("entra");
    let (status, body) = post_form(
        &entra.token_url_v2(),
        &[
            ("grant_type", "client_credentials"),
            ("client_id", &sp.client_id),
            ("client_secret", &secret),
            ("scope", "https://management.azure.com//.default"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["expires_in"].is_u64());
    assert!(body.get("resource").is_none());
    let claims = cloud
        .verify_access_token(body["access_token"].as_str().expect("token"))
        .expect("verifies");
    assert_eq!(claims.aud, "https://management.azure.com/");

    let (status, body) = post_form(
        &entra.token_url_v2(),
        &[
            ("grant_type", "client_credentials"),
            ("client_id", &sp.client_id),
            ("client_secret", &secret),
            ("scope", "https://management.azure.com/user_impersonation"),
        ],
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_scope");
    assert_eq!(aadsts(&body), 1_002_012);
}

#[tokio::test]
async fn secret_grant_failures_carry_real_aadsts_codes() {
    let cloud = Cloud::new().expect("cloud");
    let sp = cloud.add_service_principal("app");
    let secret = cloud.add_client_secret(&sp.client_id).expect("secret");
    let entra = EntraHandle::start(&cloud).expect("entra");
    let url = entra.token_url_v1();
    let base = [
        ("grant_type", "client_credentials"),
        ("resource", "https://vault.azure.net"),
    ];

    let mut wrong = base.to_vec();
    wrong.extend([
        ("client_id", sp.client_id.as_str()),
        ("client_secret", "nope"),
    ]);
    let (status, body) = post_form(&url, &wrong).await;
    assert_eq!((status, aadsts(&body)), (401, 7_000_215));
    assert_eq!(body["error"], "invalid_client");
    let desc = body["error_description"].as_str().expect("description");
    assert!(
        desc.starts_with("AADSTS7000215: Invalid client secret provided."),
        "{desc}"
    );
    assert!(!desc.contains(&secret));
    for k in ["timestamp", "trace_id", "correlation_id"] {
        assert!(body[k].is_string(), "{k}");
    }

    let mut unknown = base.to_vec();
    unknown.extend([
        ("client_id", "00000000-0000-0000-0000-000000000001"),
        ("client_secret", secret.as_str()),
    ]);
    let (status, body) = post_form(&url, &unknown).await;
    assert_eq!((status, aadsts(&body)), (400, 700_016));
    assert_eq!(body["error"], "unauthorized_client");

    let mut no_cred = base.to_vec();
    no_cred.push(("client_id", sp.client_id.as_str()));
    let (status, body) = post_form(&url, &no_cred).await;
    assert_eq!((status, aadsts(&body)), (401, 7_000_218));

    let no_resource = [
        ("grant_type", "client_credentials"),
        ("client_id", sp.client_id.as_str()),
        ("client_secret", secret.as_str()),
    ];
    let (status, body) = post_form(&url, &no_resource).await;
    assert_eq!((status, aadsts(&body)), (400, 900_144));
    assert_eq!(body["error"], "invalid_request");

    let mut ok = base.to_vec();
    ok.extend([
        ("client_id", sp.client_id.as_str()),
        ("client_secret", secret.as_str()),
    ]);
    let other_tenant = url.replace(cloud.tenant_id(), "11111111-2222-3333-4444-555555555555");
    let (status, body) = post_form(&other_tenant, &ok).await;
    assert_eq!((status, aadsts(&body)), (400, 90_002));

    let calls = entra.calls();
    assert_eq!(calls.len(), 5);
    assert!(calls.iter().all(|c| c.status != 200));
    assert_eq!(cloud.entra_tokens_issued(&sp.client_id), 0);
    assert!(!format!("{calls:?}").contains(&secret));
}

#[tokio::test]
async fn discovery_documents_point_back_at_the_simulator() {
    let cloud = Cloud::new().expect("cloud");
    let entra = EntraHandle::start(&cloud).expect("entra");
    let c = common::client();
    let doc: serde_json::Value = c
        .get(format!(
            "{}/{}/v2.0/.well-known/openid-configuration",
            entra.url(),
            cloud.tenant_id()
        ))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(doc["token_endpoint"], entra.token_url_v2());
    let jwks: serde_json::Value = c
        .get(doc["jwks_uri"].as_str().expect("jwks_uri"))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(jwks, cloud.jwks());
    let inst: serde_json::Value = c
        .get(format!(
            "{}/common/discovery/instance?api-version=1.1&authorization_endpoint={}/{}/oauth2/v2.0/authorize",
            entra.url(),
            entra.url(),
            cloud.tenant_id()
        ))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(
        inst["tenant_discovery_endpoint"],
        format!(
            "{}/{}/v2.0/.well-known/openid-configuration",
            entra.url(),
            cloud.tenant_id()
        )
    );
}
