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
    assert_eq!(claims.appidacr, "1");
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

fn cert_assertion(
    cert: &podid_test_keys::Certificate,
    client_id: &str,
    aud: &str,
    exp: u64,
) -> String {
    let now = common::now();
    cert.key()
        .sign_with(
            &serde_json::json!({
                "aud": aud, "iss": client_id, "sub": client_id,
                "jti": uuidish(), "nbf": now, "exp": exp,
            }),
            |h| {
                h.x5t = Some(cert.x5t());
                h.x5c = Some(vec![cert.x5c()]);
            },
        )
        .expect("sign")
}

fn uuidish() -> String {
    format!("{:032x}", rand::random::<u128>())
}

const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

#[tokio::test]
async fn certificate_assertion_grant_and_its_failures() {
    let cloud = Cloud::new().expect("cloud");
    let sp = cloud.add_service_principal("cert-app");
    let cert = podid_test_keys::Certificate::generate("cert-app").expect("cert");
    let other = podid_test_keys::Certificate::generate("other").expect("cert");
    cloud
        .add_certificate(&sp.client_id, &cert)
        .expect("add cert");
    let entra = EntraHandle::start(&cloud).expect("entra");
    // adal puts the full token URL, query included, in `aud`.
    let aud = format!("{}?api-version=1.0", entra.token_url_v1());
    let far = common::now() + 600;
    let send = |assertion: String| {
        let url = entra.token_url_v1();
        let client_id = sp.client_id.clone();
        async move {
            post_form(
                &url,
                &[
                    ("grant_type", "client_credentials"),
                    ("client_id", &client_id),
                    ("client_assertion_type", JWT_BEARER),
                    ("client_assertion", &assertion),
                    ("resource", "https://vault.azure.net"),
                ],
            )
            .await
        }
    };

    let (status, body) = send(cert_assertion(&cert, &sp.client_id, &aud, far)).await;
    assert_eq!(status, 200, "{body}");
    let claims = cloud
        .verify_access_token(body["access_token"].as_str().expect("token"))
        .expect("verifies");
    assert_eq!(claims.appid, sp.client_id);
    assert_eq!(claims.appidacr, "2");

    // v2 endpoint, v2 audience.
    let assertion = cert_assertion(&cert, &sp.client_id, &entra.token_url_v2(), far);
    let (status, body) = post_form(
        &entra.token_url_v2(),
        &[
            ("grant_type", "client_credentials"),
            ("client_id", &sp.client_id),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", &assertion),
            ("scope", "https://vault.azure.net/.default"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // Unregistered certificate.
    let (status, body) = send(cert_assertion(&other, &sp.client_id, &aud, far)).await;
    assert_eq!((status, aadsts(&body)), (401, 700_027), "{body}");
    // Registered thumbprint but signed by another key.
    let forged = other
        .key()
        .sign_with(
            &serde_json::json!({"aud": aud, "iss": sp.client_id, "sub": sp.client_id, "exp": far, "nbf": common::now(), "jti": uuidish()}),
            |h| h.x5t = Some(cert.x5t()),
        )
        .expect("sign");
    let (status, body) = send(forged).await;
    assert_eq!((status, aadsts(&body)), (401, 700_027), "{body}");
    // Expired.
    let (status, body) = send(cert_assertion(
        &cert,
        &sp.client_id,
        &aud,
        common::now() - 3600,
    ))
    .await;
    assert_eq!((status, aadsts(&body)), (401, 700_024), "{body}");
    // Wrong audience.
    let (status, body) = send(cert_assertion(
        &cert,
        &sp.client_id,
        "https://example.com/token",
        far,
    ))
    .await;
    assert_eq!((status, aadsts(&body)), (401, 700_027), "{body}");
    // Garbage.
    let (status, body) = send("not-a-jwt".to_owned()).await;
    assert_eq!((status, aadsts(&body)), (400, 50_027), "{body}");

    let calls = entra.calls();
    assert_eq!(
        calls
            .iter()
            .filter(|c| c.grant == GrantKind::Certificate)
            .count(),
        6
    );
}

#[tokio::test]
async fn federated_assertion_grant_checks_credential_and_issuer_keys() {
    let cloud = Cloud::new().expect("cloud");
    let issuer = common::Issuer::start().await;
    // Federated credentials work on app registrations and on user-assigned identities.
    let sp = cloud.add_service_principal("wi-app");
    let uami = cloud.add_user_assigned_identity("wi-mi");
    let subject = "system:serviceaccount:default:workload";
    let fic = podid_azure_sim::FederatedCredential::new("k8s", &issuer.url, subject);
    cloud
        .add_federated_credential(&sp.client_id, fic.clone())
        .expect("fic");
    cloud
        .add_federated_credential(&uami.client_id, fic)
        .expect("fic");
    let entra = EntraHandle::start(&cloud).expect("entra");
    let far = common::now() + 600;
    let exchange = |client_id: String, assertion: String| {
        let url = entra.token_url_v2();
        async move {
            post_form(
                &url,
                &[
                    ("grant_type", "client_credentials"),
                    ("client_id", &client_id),
                    ("client_assertion_type", JWT_BEARER),
                    ("client_assertion", &assertion),
                    ("scope", "https://vault.azure.net/.default"),
                ],
            )
            .await
        }
    };
    let good = issuer.token(subject, "api://AzureADTokenExchange", far);
    let (status, body) = exchange(sp.client_id.clone(), good.clone()).await;
    assert_eq!(status, 200, "{body}");
    let claims = cloud
        .verify_access_token(body["access_token"].as_str().expect("token"))
        .expect("verifies");
    assert_eq!(claims.appid, sp.client_id);

    let (status, body) = exchange(uami.client_id.clone(), good).await;
    assert_eq!(status, 200, "{body}");
    let claims = cloud
        .verify_access_token(body["access_token"].as_str().expect("token"))
        .expect("verifies");
    assert_eq!(claims.oid, uami.principal_id);
    assert_eq!(claims.xms_mirid.as_deref(), Some(uami.resource_id.as_str()));
    // JWKS fetched once per issuer, then cached.
    assert_eq!(issuer.fetches.load(std::sync::atomic::Ordering::SeqCst), 1);

    let wrong_sub = issuer.token(
        "system:serviceaccount:default:other",
        "api://AzureADTokenExchange",
        far,
    );
    let (status, body) = exchange(sp.client_id.clone(), wrong_sub).await;
    assert_eq!((status, aadsts(&body)), (400, 70_021), "{body}");
    let wrong_aud = issuer.token(subject, "https://kubernetes.default.svc", far);
    let (status, body) = exchange(sp.client_id.clone(), wrong_aud).await;
    assert_eq!((status, aadsts(&body)), (400, 70_021), "{body}");
    let expired = issuer.token(subject, "api://AzureADTokenExchange", common::now() - 3600);
    let (status, body) = exchange(sp.client_id.clone(), expired).await;
    assert_eq!((status, aadsts(&body)), (401, 700_024), "{body}");

    // Same claims, signed by a key the issuer does not publish.
    let rogue = podid_test_keys::SigningKey::generate().expect("key");
    let forged = rogue
        .sign(&serde_json::json!({"iss": issuer.url, "sub": subject, "aud": "api://AzureADTokenExchange", "exp": far}))
        .expect("sign");
    let (status, body) = exchange(sp.client_id.clone(), forged).await;
    assert_eq!((status, aadsts(&body)), (401, 700_027), "{body}");

    // An issuer no credential names.
    let stranger = rogue
        .sign(&serde_json::json!({"iss": "https://elsewhere.example", "sub": subject, "aud": "api://AzureADTokenExchange", "exp": far}))
        .expect("sign");
    let (status, body) = exchange(sp.client_id.clone(), stranger).await;
    assert_eq!((status, aadsts(&body)), (400, 700_211), "{body}");
    assert!(
        entra
            .calls()
            .iter()
            .all(|c| c.grant == GrantKind::Federated)
    );
}

#[tokio::test]
async fn at_most_twenty_federated_credentials() {
    let cloud = Cloud::new().expect("cloud");
    let sp = cloud.add_service_principal("many");
    for i in 0..podid_azure_sim::MAX_FEDERATED_CREDENTIALS {
        let fic = podid_azure_sim::FederatedCredential::new(
            &format!("f{i}"),
            "https://i",
            &format!("s{i}"),
        );
        cloud
            .add_federated_credential(&sp.client_id, fic)
            .expect("within limit");
    }
    let fic = podid_azure_sim::FederatedCredential::new("f20", "https://i", "s20");
    assert!(matches!(
        cloud.add_federated_credential(&sp.client_id, fic),
        Err(podid_azure_sim::Error::TooManyFederatedCredentials { .. })
    ));
}

#[tokio::test]
async fn injected_failures_latency_and_unreachability() {
    let cloud = Cloud::new().expect("cloud");
    let sp = cloud.add_service_principal("app");
    let secret = cloud.add_client_secret(&sp.client_id).expect("secret");
    let entra = EntraHandle::start(&cloud).expect("entra");
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", sp.client_id.as_str()),
        ("client_secret", secret.as_str()),
        ("resource", "https://vault.azure.net"),
    ];
    entra.fail_next(1, 503);
    let (status, body) = post_form(&entra.token_url_v1(), &form).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "temporarily_unavailable");

    entra.set_latency(std::time::Duration::from_millis(300));
    let started = std::time::Instant::now();
    let (status, _) = post_form(&entra.token_url_v1(), &form).await;
    assert_eq!(status, 200);
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    entra.set_latency(std::time::Duration::ZERO);

    entra.set_unreachable(true);
    let r = common::client()
        .post(entra.token_url_v1())
        .form(&form)
        .send()
        .await;
    assert!(r.is_err());
    entra.set_unreachable(false);
    assert_eq!(post_form(&entra.token_url_v1(), &form).await.0, 200);
    assert_eq!(cloud.entra_tokens_issued(&sp.client_id), 2);
}

#[tokio::test]
async fn issuer_discovery_can_be_served_elsewhere() {
    let cloud = Cloud::new().expect("cloud");
    let served = common::Issuer::start().await;
    // Tokens name an issuer URL that serves nothing; its documents live at `served.url`.
    let issuer = "https://kubernetes.default.svc.cluster.local";
    let sp = cloud.add_service_principal("wi");
    let subject = "system:serviceaccount:ns:sa";
    cloud
        .add_federated_credential(
            &sp.client_id,
            podid_azure_sim::FederatedCredential::new("k8s", issuer, subject),
        )
        .expect("fic");
    cloud.set_issuer_discovery_url(issuer, &served.url);
    let entra = EntraHandle::start(&cloud).expect("entra");
    let now = common::now();
    let assertion = served
        .key
        .sign(&serde_json::json!({
            "iss": issuer, "sub": subject, "aud": ["api://AzureADTokenExchange"],
            "exp": now + 600, "iat": now, "nbf": now,
        }))
        .expect("sign");
    let (status, body) = post_form(
        &entra.token_url_v1(),
        &[
            ("grant_type", "client_credentials"),
            ("client_id", &sp.client_id),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", &assertion),
            ("resource", "https://vault.azure.net"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn unknown_resource_is_refused_after_authentication() {
    let cloud = Cloud::new().expect("cloud");
    let sp = cloud.add_service_principal("app");
    let secret = cloud.add_client_secret(&sp.client_id).expect("secret");
    cloud.mark_resource_unknown("https://nothing.example/");
    let entra = EntraHandle::start(&cloud).expect("entra");
    let mut form = vec![
        ("grant_type", "client_credentials"),
        ("client_id", sp.client_id.as_str()),
        ("client_secret", secret.as_str()),
        ("resource", "https://nothing.example"),
    ];
    let (status, body) = post_form(&entra.token_url_v1(), &form).await;
    assert_eq!((status, aadsts(&body)), (400, 500_011), "{body}");
    assert_eq!(body["error"], "invalid_resource");
    form[2].1 = "wrong";
    let (status, body) = post_form(&entra.token_url_v1(), &form).await;
    assert_eq!((status, aadsts(&body)), (401, 7_000_215), "{body}");
}

#[tokio::test]
async fn client_secret_basic_authentication() {
    use base64::Engine as _;
    let cloud = Cloud::new().expect("cloud");
    let sp = cloud.add_service_principal("app");
    let secret = cloud.add_client_secret(&sp.client_id).expect("secret");
    let entra = EntraHandle::start(&cloud).expect("entra");
    let basic = |s: &str| {
        let enc = |v: &str| url::form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>();
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!(
                "{}:{}",
                enc(&sp.client_id),
                enc(s)
            ))
        )
    };
    for (cred, want) in [(secret.as_str(), 200u16), ("wrong", 401)] {
        let r = common::client()
            .post(entra.token_url_v2())
            .header("Authorization", basic(cred))
            .form(&[
                ("grant_type", "client_credentials"),
                ("scope", "https://vault.azure.net/.default"),
            ])
            .send()
            .await
            .expect("send");
        assert_eq!(r.status().as_u16(), want);
    }
}
