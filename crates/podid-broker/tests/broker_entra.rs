//! ClientSecretSource and CertificateSource against a counting in-test Entra v1 endpoint.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{FakeUpstream, Recorded, Reply};
use p12_keystore::{Certificate, KeyStore, KeyStoreEntry, PrivateKey, PrivateKeyChain};
use podid_broker::{
    BrokerConfig, BrokerError, CLIENT_ASSERTION_TYPE, CertificateSource, ClientSecretSource,
    EntraConfig, IdentitySpec, Secret, SourceKind, Sources, SystemClock, TokenBroker,
};
use podid_imds::unix_seconds;
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey};

const CLIENT: &str = "11111111-2222-3333-4444-555555555555";
const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const SECRET: &str = "Sup3r~Secret.Value_that-must-never-leak";
const VAULT: &str = "https://vault.azure.net";

fn entra_body(token: &str, resource: &str) -> String {
    let now = unix_seconds(std::time::SystemTime::now());
    format!(
        r#"{{"token_type":"Bearer","expires_in":"3599","ext_expires_in":"3599","expires_on":"{}","not_before":"{}","resource":"{resource}","access_token":"{token}"}}"#,
        now + 3599,
        now - 300
    )
}

/// A fake Entra: 200 with a token named after the tenant path segment.
async fn entra_ok() -> FakeUpstream {
    FakeUpstream::start(|req: &Recorded| {
        let tenant = req.path.split('/').nth(1).unwrap_or("").to_owned();
        let resource = req.form("resource").unwrap_or_default();
        Reply::json(200, entra_body(&format!("tok-{tenant}"), &resource))
    })
    .await
}

fn config(upstream: &FakeUpstream) -> EntraConfig {
    EntraConfig {
        default_authority: format!("{}/", upstream.base_url()),
        retry_base: Duration::from_millis(10),
        ..EntraConfig::default()
    }
}

fn make_broker(secret: ClientSecretSource, cert: CertificateSource) -> TokenBroker {
    // Type 0 is not exercised here; any source fills its slot.
    let secret: Arc<ClientSecretSource> = Arc::new(secret);
    let sources = Sources {
        imds: secret.clone(),
        federated: secret.clone(),
        client_secret: secret,
        certificate: Arc::new(cert),
    };
    TokenBroker::new(BrokerConfig::default(), sources, Arc::new(SystemClock))
}

fn broker_for(upstream: &FakeUpstream) -> TokenBroker {
    make_broker(
        ClientSecretSource::new(config(upstream), Arc::new(SystemClock)).expect("secret source"),
        CertificateSource::new(config(upstream), Arc::new(SystemClock)).expect("cert source"),
    )
}

fn sp() -> Arc<IdentitySpec> {
    Arc::new(IdentitySpec::client_secret(
        CLIENT,
        TENANT,
        Secret::new(SECRET),
    ))
}

fn assert_no_secret(error: &BrokerError) {
    let text = format!("{error} {error:?}");
    assert!(!text.contains(SECRET), "secret leaked: {text}");
}

#[tokio::test]
async fn client_secret_posts_v1_client_credentials() {
    let upstream = entra_ok().await;
    let broker = broker_for(&upstream);
    let token = broker.token(&sp(), VAULT).await.expect("token");
    assert_eq!(token.access_token(), format!("tok-{TENANT}"));
    assert_eq!(token.resource, VAULT);

    let requests = upstream.requests();
    assert_eq!(requests.len(), 1);
    let req = &requests[0];
    assert_eq!(req.method, "POST");
    assert_eq!(req.path, format!("/{TENANT}/oauth2/token"));
    assert_eq!(req.query, "api-version=1.0");
    assert_eq!(
        req.headers.get("content-type").map(|v| v.as_bytes()),
        Some(&b"application/x-www-form-urlencoded"[..])
    );
    let form: Vec<(String, String)> = req.form_pairs();
    let expected: Vec<(String, String)> = [
        ("client_id", CLIENT),
        ("client_secret", SECRET),
        ("grant_type", "client_credentials"),
        ("resource", VAULT),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    assert_eq!(form, expected);

    // Cached afterwards.
    broker.token(&sp(), VAULT).await.expect("hit");
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test]
async fn ad_endpoint_overrides_the_authority_only_when_allowed() {
    let upstream = entra_ok().await;
    let unused = EntraConfig {
        default_authority: "http://127.0.0.1:9/".to_owned(),
        ..EntraConfig::default()
    };
    let mut spec = IdentitySpec::client_secret(CLIENT, TENANT, Secret::new(SECRET));
    spec.ad_endpoint = format!("{}/", upstream.base_url());
    let spec = Arc::new(spec);

    // Not listed by the operator: refused before anything is sent, naming the flag.
    let unlisted = make_broker(
        ClientSecretSource::new(unused.clone(), Arc::new(SystemClock)).expect("source"),
        CertificateSource::new(unused.clone(), Arc::new(SystemClock)).expect("source"),
    );
    let error = unlisted.token(&spec, VAULT).await.expect_err("unlisted");
    assert!(
        error.to_string().contains("--allowed-authorities"),
        "{error}"
    );
    assert_no_secret(&error);
    assert_eq!(upstream.calls(), 0, "the secret never left for it");

    let listed = EntraConfig {
        extra_authorities: vec![upstream.base_url().parse().expect("url")],
        ..unused
    };
    let broker = make_broker(
        ClientSecretSource::new(listed.clone(), Arc::new(SystemClock)).expect("source"),
        CertificateSource::new(listed, Arc::new(SystemClock)).expect("source"),
    );
    broker
        .token(&spec, VAULT)
        .await
        .expect("token via adEndpoint");
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test]
async fn refusal_keeps_entra_error_and_never_the_secret() {
    let upstream = FakeUpstream::start(|_| {
        Reply::json(
            401,
            r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.","error_codes":[7000215]}"#,
        )
    })
    .await;
    let broker = broker_for(&upstream);
    let error = broker.token(&sp(), VAULT).await.expect_err("refused");
    assert_eq!(error.status(), 403);
    match &error {
        BrokerError::Refused {
            source_kind,
            status,
            error,
            description,
            ..
        } => {
            assert_eq!(*source_kind, SourceKind::ClientSecret);
            assert_eq!(*status, 401);
            assert_eq!(error, "invalid_client");
            assert!(description.starts_with("AADSTS7000215"));
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    assert_no_secret(&error);
    assert_eq!(upstream.calls(), 1, "refusals are not retried");
}

#[tokio::test]
async fn server_errors_and_transport_errors_are_unavailable() {
    let upstream = FakeUpstream::start(|_| Reply::json(503, "")).await;
    let broker = broker_for(&upstream);
    let error = broker.token(&sp(), VAULT).await.expect_err("503");
    assert_eq!(error.status(), 503);
    assert!(matches!(error, BrokerError::Unavailable { .. }));
    assert_no_secret(&error);
    assert_eq!(upstream.calls(), 2, "one retry");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let down = EntraConfig {
        default_authority: format!("http://127.0.0.1:{port}/"),
        max_retries: 0,
        ..EntraConfig::default()
    };
    let broker = make_broker(
        ClientSecretSource::new(down.clone(), Arc::new(SystemClock)).expect("source"),
        CertificateSource::new(down, Arc::new(SystemClock)).expect("source"),
    );
    let error = broker.token(&sp(), VAULT).await.expect_err("down");
    assert_eq!(error.status(), 503);
    assert_no_secret(&error);
}

#[tokio::test]
async fn auxiliary_tenants_get_one_token_each() {
    let upstream = entra_ok().await;
    let broker = broker_for(&upstream);
    let mut spec = IdentitySpec::client_secret(CLIENT, TENANT, Secret::new(SECRET));
    spec.auxiliary_tenant_ids = vec!["aux-one".into(), "aux-two".into()];
    let tokens = broker
        .tokens(&Arc::new(spec.clone()), VAULT)
        .await
        .expect("tokens");
    let names: Vec<_> = tokens.iter().map(|t| t.access_token().to_owned()).collect();
    assert_eq!(
        names,
        vec![
            format!("tok-{TENANT}"),
            "tok-aux-one".into(),
            "tok-aux-two".into()
        ]
    );
    spec.auxiliary_tenant_ids = vec!["a".into(), "b".into(), "c".into(), "d".into()];
    let error = broker
        .tokens(&Arc::new(spec), VAULT)
        .await
        .expect_err("four");
    assert!(error.to_string().contains("one to three"), "{error}");
}

#[tokio::test]
async fn missing_or_empty_secret_is_a_config_error() {
    let upstream = entra_ok().await;
    let broker = broker_for(&upstream);
    let empty = Arc::new(IdentitySpec::client_secret(CLIENT, TENANT, Secret::new("")));
    let error = broker.token(&empty, VAULT).await.expect_err("empty");
    assert!(matches!(error, BrokerError::Config { .. }), "{error:?}");
    assert_eq!(upstream.calls(), 0);
}

struct TestPfx {
    cert: podid_test_keys::Certificate,
    pkcs12: Vec<u8>,
}

fn test_pfx(password: &str) -> TestPfx {
    let cert = podid_test_keys::Certificate::generate("podid-sp").expect("certificate");
    let pem = cert.key().private_pem().expect("pem");
    let der = rsa::RsaPrivateKey::from_pkcs8_pem(&pem)
        .expect("pkcs8")
        .to_pkcs8_der()
        .expect("der");
    let key = PrivateKey::from_der(der.as_bytes()).expect("p12 key");
    let leaf = Certificate::from_der(cert.der()).expect("p12 cert");
    let chain = PrivateKeyChain::new(vec![1u8, 2, 3, 4], key, [leaf]);
    let mut store = KeyStore::new();
    store.add_entry("podid-sp", KeyStoreEntry::PrivateKeyChain(chain));
    let pkcs12 = store.writer(password).write().expect("pkcs12");
    TestPfx { cert, pkcs12 }
}

#[derive(Debug, serde::Deserialize)]
struct AssertionClaims {
    aud: String,
    iss: String,
    sub: String,
    jti: String,
    nbf: u64,
    exp: u64,
}

#[tokio::test]
async fn certificate_assertion_is_signed_by_the_pfx_key_with_its_thumbprint() {
    let pfx = test_pfx("pfx-pass");
    let upstream = entra_ok().await;
    let broker = broker_for(&upstream);
    let spec = Arc::new(IdentitySpec::certificate(
        CLIENT,
        TENANT,
        pfx.pkcs12.clone(),
        Secret::new("pfx-pass"),
    ));
    let token = broker.token(&spec, VAULT).await.expect("token");
    assert_eq!(token.access_token(), format!("tok-{TENANT}"));

    let requests = upstream.requests();
    assert_eq!(requests.len(), 1);
    let req = &requests[0];
    assert_eq!(req.path, format!("/{TENANT}/oauth2/token"));
    let keys: Vec<String> = req.form_pairs().into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        keys,
        vec![
            "client_assertion",
            "client_assertion_type",
            "client_id",
            "grant_type",
            "resource"
        ]
    );
    assert_eq!(
        req.form("client_assertion_type").as_deref(),
        Some(CLIENT_ASSERTION_TYPE)
    );
    assert_eq!(
        req.form("grant_type").as_deref(),
        Some("client_credentials")
    );
    assert_eq!(req.form("client_id").as_deref(), Some(CLIENT));
    let assertion = req.form("client_assertion").expect("assertion");

    let header = jsonwebtoken::decode_header(&assertion).expect("header");
    assert_eq!(header.alg, jsonwebtoken::Algorithm::RS256);
    assert_eq!(header.x5t.as_deref(), Some(pfx.cert.x5t().as_str()));
    assert_eq!(header.x5c, Some(vec![pfx.cert.x5c()]));

    let audience = format!(
        "{}/{TENANT}/oauth2/token?api-version=1.0",
        upstream.base_url()
    );
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[audience.as_str()]);
    validation.set_issuer(&[CLIENT]);
    validation.validate_nbf = true;
    let claims: AssertionClaims = pfx
        .cert
        .key()
        .verify(&assertion, &validation)
        .expect("assertion verifies with the certificate's public key");
    assert_eq!(claims.aud, audience);
    assert_eq!(claims.iss, CLIENT);
    assert_eq!(claims.sub, CLIENT);
    assert_eq!(claims.jti.len(), 36);
    assert_eq!(claims.exp - claims.nbf, 600, "short-lived assertion");

    // A different key must not verify it.
    let other = podid_test_keys::SigningKey::generate().expect("key");
    assert!(
        other
            .verify::<AssertionClaims>(&assertion, &validation)
            .is_err()
    );

    // Each upstream call signs a fresh assertion (new jti).
    broker.invalidate_identity(&spec.key());
    broker.token(&spec, VAULT).await.expect("again");
    let second = upstream.requests()[1]
        .form("client_assertion")
        .expect("assertion");
    let again: AssertionClaims = pfx
        .cert
        .key()
        .verify(&second, &validation)
        .expect("verifies");
    assert_ne!(again.jti, claims.jti);
}

#[tokio::test]
async fn unreadable_certificate_is_a_config_error_without_the_password() {
    let pfx = test_pfx("right-password");
    let upstream = entra_ok().await;
    let broker = broker_for(&upstream);
    let wrong = Arc::new(IdentitySpec::certificate(
        CLIENT,
        TENANT,
        pfx.pkcs12.clone(),
        Secret::new("wrong-password-xyz"),
    ));
    let error = broker
        .token(&wrong, VAULT)
        .await
        .expect_err("wrong password");
    assert!(matches!(error, BrokerError::Config { .. }), "{error:?}");
    assert_eq!(error.status(), 503);
    let text = format!("{error} {error:?}");
    assert!(!text.contains("wrong-password-xyz") && !text.contains("right-password"));

    let garbage = Arc::new(IdentitySpec::certificate(
        CLIENT,
        TENANT,
        b"not a pfx".to_vec(),
        Secret::new(""),
    ));
    let error = broker.token(&garbage, VAULT).await.expect_err("garbage");
    assert!(matches!(error, BrokerError::Config { .. }), "{error:?}");
    assert_eq!(upstream.calls(), 0);
}
