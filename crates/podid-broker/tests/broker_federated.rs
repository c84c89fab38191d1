//! FederatedSource behind the broker, against the fake API server (its TokenRequest issues the
//! service-account tokens; its URL is the OIDC issuer) and the simulated Entra (federated
//! identity credentials, v2 token endpoint).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kube::config::{KubeConfigOptions, Kubeconfig};
use podid_azure_sim::{Cloud, EntraHandle, FederatedCredential, GrantKind, UserAssignedIdentity};
use podid_broker::{
    BoundPod, BrokerConfig, BrokerError, Clock, EntraConfig, FederatedConfig, FederatedSource,
    FederatedSubject, IdentitySpec, ManualClock, SourceKind, Sources, SystemClock, TokenBroker,
};
use podid_fake_apiserver::FakeApiServer;
use podid_imds::unix_seconds;
use serde_json::{Value, json};

const VAULT: &str = "https://vault.azure.net";
const TOKEN_PATH: &str = "/serviceaccounts/";

struct World {
    api: FakeApiServer,
    cloud: Cloud,
    entra: EntraHandle,
    broker: TokenBroker,
    identity: UserAssignedIdentity,
}

async fn kube_client(api: &FakeApiServer) -> kube::Client {
    let kubeconfig = Kubeconfig::from_yaml(&api.kubeconfig_yaml()).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube config");
    kube::Client::try_from(config).expect("kube client")
}

fn federated_config(entra: &EntraHandle, cloud: &Cloud) -> FederatedConfig {
    FederatedConfig {
        entra: EntraConfig {
            default_authority: format!("{}/", entra.url()),
            retry_base: Duration::from_millis(10),
            timeouts: podid_broker::HttpTimeouts {
                connect: Duration::from_secs(2),
                total: Duration::from_secs(5),
            },
            ..EntraConfig::default()
        },
        default_tenant: Some(cloud.tenant_id().to_owned()),
        ..FederatedConfig::default()
    }
}

async fn world() -> World {
    podid_azure_sim::install_crypto_provider();
    let api = FakeApiServer::start().await.expect("fake API server");
    let cloud = Cloud::new().expect("cloud");
    let entra = EntraHandle::start(&cloud).expect("entra");
    let identity = cloud.add_user_assigned_identity("web");
    let source = FederatedSource::new(
        kube_client(&api).await,
        federated_config(&entra, &cloud),
        Arc::new(SystemClock),
    )
    .expect("federated source");
    let broker = TokenBroker::new(
        BrokerConfig::default(),
        Sources::all(Arc::new(source)),
        Arc::new(SystemClock),
    );
    World {
        api,
        cloud,
        entra,
        broker,
        identity,
    }
}

impl World {
    fn service_account(&self, namespace: &str, name: &str) {
        self.api
            .create_json(
                &format!("/api/v1/namespaces/{namespace}/serviceaccounts"),
                json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}}),
            )
            .expect("create service account");
    }

    /// A pod; returns its uid.
    fn pod(&self, namespace: &str, name: &str, service_account: &str) -> String {
        let pod = self
            .api
            .create_json(
                &format!("/api/v1/namespaces/{namespace}/pods"),
                json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                       "spec": {"serviceAccountName": service_account, "containers": [{"name": "app", "image": "app"}]}}),
            )
            .expect("create pod");
        pod.pointer("/metadata/uid")
            .and_then(Value::as_str)
            .expect("uid")
            .to_owned()
    }

    fn trust(&self, subject: &FederatedSubject) {
        self.cloud
            .add_federated_credential(
                &self.identity.client_id,
                FederatedCredential::new(
                    &format!("{}-{}", subject.namespace, subject.service_account),
                    self.api.issuer(),
                    &subject.subject(),
                ),
            )
            .expect("federated credential");
    }

    /// The identity, federated for `subject` bound to the pod `(name, uid)` if given.
    fn spec(&self, subject: &FederatedSubject, pod: Option<(&str, &str)>) -> Arc<IdentitySpec> {
        let spec = IdentitySpec::managed(&self.identity.client_id, &self.identity.resource_id)
            .federated(
                subject.clone(),
                pod.map(|(name, uid)| BoundPod {
                    name: name.to_owned(),
                    uid: uid.to_owned(),
                }),
            );
        Arc::new(spec)
    }

    fn token_requests(&self) -> usize {
        self.api
            .faults()
            .requests()
            .iter()
            .filter(|r| {
                r.method == "POST" && r.path.contains(TOKEN_PATH) && r.path.ends_with("/token")
            })
            .count()
    }
}

#[tokio::test]
async fn pod_service_account_token_is_exchanged_and_cached_per_subject() {
    let w = world().await;
    w.service_account("apps", "web");
    let uid = w.pod("apps", "web-0", "web");
    let subject = FederatedSubject::new("apps", "web");
    w.trust(&subject);

    let spec = w.spec(&subject, Some(("web-0", &uid)));
    let token = w.broker.token(&spec, VAULT).await.expect("federated token");
    let claims = w
        .cloud
        .verify_access_token(token.access_token())
        .expect("a token of the simulated cloud");
    assert_eq!(claims.appid, w.identity.client_id);
    assert_eq!(claims.oid, w.identity.principal_id);
    assert_eq!(claims.aud, VAULT);
    assert_eq!(claims.appidacr, "2", "authenticated by assertion");
    assert_eq!(token.resource, VAULT);

    let calls = w.entra.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].version, "v2");
    assert_eq!(calls[0].grant, GrantKind::Federated);
    assert_eq!(calls[0].status, 200);
    assert_eq!(w.token_requests(), 1);

    // A second pod with the same service account shares the entry: no new upstream calls.
    let uid1 = w.pod("apps", "web-1", "web");
    let again = w
        .broker
        .token(&w.spec(&subject, Some(("web-1", &uid1))), VAULT)
        .await
        .expect("cached");
    assert_eq!(again.access_token(), token.access_token());
    assert_eq!(w.token_requests(), 1, "one TokenRequest");
    assert_eq!(w.entra.calls().len(), 1, "one Entra call");
    assert_eq!(w.broker.stats().hits(), 1);
    assert_eq!(w.broker.stats().source(SourceKind::Federated).calls(), 1);

    // Another service account in the same namespace: its own entry and exchange.
    w.service_account("apps", "batch");
    let uid2 = w.pod("apps", "batch-0", "batch");
    let other = FederatedSubject::new("apps", "batch");
    w.trust(&other);
    let token2 = w
        .broker
        .token(&w.spec(&other, Some(("batch-0", &uid2))), VAULT)
        .await
        .expect("second subject");
    assert_ne!(token2.access_token(), token.access_token());
    assert_eq!(w.token_requests(), 2);
    assert_eq!(w.entra.calls().len(), 2);
    assert_eq!(w.broker.len(), 2, "one entry per subject");
}

#[tokio::test]
async fn missing_service_account_is_refused_with_its_name() {
    let w = world().await;
    let uid = w.pod("apps", "web-0", "ghost");
    let subject = FederatedSubject::new("apps", "ghost");
    w.trust(&subject);
    let error = w
        .broker
        .token(&w.spec(&subject, Some(("web-0", &uid))), VAULT)
        .await
        .expect_err("no service account");
    let BrokerError::Refused {
        source_kind,
        status,
        error: code,
        description,
        ..
    } = &error
    else {
        panic!("expected Refused, got {error:?}");
    };
    assert_eq!(*source_kind, SourceKind::Federated);
    assert_eq!(*status, 404);
    assert_eq!(code, "service_account_not_found");
    assert!(description.contains("\"ghost\""), "{description}");
    assert!(description.contains("\"apps\""), "{description}");
    assert_eq!(error.status(), 403);
    assert!(
        w.entra.calls().is_empty(),
        "Entra is not asked without a token"
    );
}

#[tokio::test]
async fn unregistered_subject_is_refused_naming_issuer_and_subject() {
    let w = world().await;
    w.service_account("apps", "web");
    let uid = w.pod("apps", "web-0", "web");
    // A credential for another subject only: the issuer is known, the subject is not.
    w.trust(&FederatedSubject::new("apps", "other"));
    let error = w
        .broker
        .token(
            &w.spec(&FederatedSubject::new("apps", "web"), Some(("web-0", &uid))),
            VAULT,
        )
        .await
        .expect_err("no matching credential");
    let BrokerError::Refused { description, .. } = &error else {
        panic!("expected Refused, got {error:?}");
    };
    assert!(description.contains("AADSTS70021"), "{description}");
    assert!(
        description.contains(&format!("issuer {:?}", w.api.issuer())),
        "{description}"
    );
    assert!(
        description.contains("subject \"system:serviceaccount:apps:web\""),
        "{description}"
    );
    assert_eq!(w.entra.calls()[0].error_code, Some(70_021));
}

/// No error may carry a JWT (the service-account token or the assertion start with `eyJ`).
fn assert_no_token(error: &BrokerError) {
    let text = format!("{error} {error:?}");
    assert!(!text.contains("eyJ"), "a token leaked into {text}");
}

#[tokio::test]
async fn shared_service_account_is_the_subject_for_every_pod() {
    let w = world().await;
    w.service_account("identities", "podid-web");
    let shared = FederatedSubject::new("identities", "podid-web");
    w.trust(&shared);
    // Pods of other service accounts (no credential registered for them); the shared token
    // is not bound to a pod, so none needs to exist.
    let spec = w.spec(&shared, None);
    let first = w.broker.token(&spec, VAULT).await.expect("shared subject");
    let claims = w
        .cloud
        .verify_access_token(first.access_token())
        .expect("cloud token");
    assert_eq!(claims.appid, w.identity.client_id);
    let second = w
        .broker
        .token(&w.spec(&shared, None), VAULT)
        .await
        .expect("shared again");
    assert_eq!(second.access_token(), first.access_token());
    assert_eq!(w.token_requests(), 1);
    let calls = w.entra.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].grant, GrantKind::Federated);
    assert_eq!(
        w.api.faults().count(
            "create",
            "/namespaces/identities/serviceaccounts/podid-web/token"
        ),
        1,
        "the token is asked for the shared account in its own namespace"
    );
}

#[tokio::test]
async fn token_is_bound_to_the_calling_pod() {
    let w = world().await;
    w.service_account("apps", "web");
    let subject = FederatedSubject::new("apps", "web");
    w.trust(&subject);
    // The pod is gone: the API server refuses to bind a token to it.
    let error = w
        .broker
        .token(&w.spec(&subject, Some(("web-0", "uid-gone"))), VAULT)
        .await
        .expect_err("pod does not exist");
    assert!(
        matches!(&error, BrokerError::Refused { status: 404, error, .. } if error == "pod_not_found"),
        "{error:?}"
    );
    // The name was reused by a new pod: the uid no longer matches.
    let uid = w.pod("apps", "web-0", "web");
    assert_ne!(uid, "uid-gone");
    let error = w
        .broker
        .token(&w.spec(&subject, Some(("web-0", "uid-gone"))), VAULT)
        .await
        .expect_err("uid mismatch");
    assert!(
        matches!(&error, BrokerError::Refused { status: 409, .. }),
        "{error:?}"
    );
    assert!(w.entra.calls().is_empty());
    let ok = w
        .broker
        .token(&w.spec(&subject, Some(("web-0", &uid))), VAULT)
        .await;
    assert!(ok.is_ok(), "{ok:?}");
}

#[tokio::test]
async fn entra_down_is_unavailable_and_tokens_never_leak() {
    let w = world().await;
    w.service_account("apps", "web");
    let uid = w.pod("apps", "web-0", "web");
    let subject = FederatedSubject::new("apps", "web");
    w.trust(&subject);
    let spec = w.spec(&subject, Some(("web-0", &uid)));

    w.entra.set_unreachable(true);
    let error = w.broker.token(&spec, VAULT).await.expect_err("Entra down");
    assert!(
        matches!(
            &error,
            BrokerError::Unavailable {
                source_kind: SourceKind::Federated,
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(error.status(), 503);
    assert_no_token(&error);
    w.entra.set_unreachable(false);

    w.entra.fail_next(2, 503);
    let error = w.broker.token(&spec, VAULT).await.expect_err("Entra 503");
    assert!(
        matches!(&error, BrokerError::Unavailable { .. }),
        "{error:?}"
    );
    assert_no_token(&error);

    let token = w.broker.token(&spec, VAULT).await.expect("Entra back");
    assert!(w.cloud.verify_access_token(token.access_token()).is_ok());
}

#[tokio::test]
async fn api_server_failure_is_unavailable() {
    let w = world().await;
    w.service_account("apps", "web");
    let uid = w.pod("apps", "web-0", "web");
    let subject = FederatedSubject::new("apps", "web");
    w.trust(&subject);
    w.api.faults().fail_next(
        1,
        podid_fake_apiserver::FaultKind::InternalError,
        podid_fake_apiserver::FaultMatch::path("/token"),
    );
    let error = w
        .broker
        .token(&w.spec(&subject, Some(("web-0", &uid))), VAULT)
        .await
        .expect_err("API server 503");
    assert!(
        matches!(&error, BrokerError::Unavailable { reason, .. } if reason.contains("apps/web")),
        "{error:?}"
    );
    assert!(w.entra.calls().is_empty());
}

#[tokio::test]
async fn wrong_tenant_is_refused_and_missing_tenant_is_a_config_error() {
    let w = world().await;
    w.service_account("apps", "web");
    let uid = w.pod("apps", "web-0", "web");
    let subject = FederatedSubject::new("apps", "web");
    w.trust(&subject);
    let mut spec = IdentitySpec::managed(&w.identity.client_id, "");
    spec.identity_type = podid_broker::IdentityType::ServicePrincipal;
    spec.tenant_id = "00000000-0000-0000-0000-000000000000".to_owned();
    let spec = Arc::new(spec.federated(
        subject.clone(),
        Some(BoundPod {
            name: "web-0".to_owned(),
            uid: uid.clone(),
        }),
    ));
    let error = w
        .broker
        .token(&spec, VAULT)
        .await
        .expect_err("wrong tenant");
    let BrokerError::Refused { description, .. } = &error else {
        panic!("expected Refused, got {error:?}");
    };
    assert!(
        description.contains("tenant 00000000-0000-0000-0000-000000000000"),
        "{description}"
    );
    assert!(description.contains("AADSTS90002"), "{description}");
    assert_no_token(&error);

    // A type-0 identity and no cluster default tenant: nothing to exchange against.
    let source = FederatedSource::new(
        kube_client(&w.api).await,
        FederatedConfig {
            default_tenant: None,
            ..federated_config(&w.entra, &w.cloud)
        },
        Arc::new(SystemClock),
    )
    .expect("source");
    let broker = TokenBroker::new(
        BrokerConfig::default(),
        Sources::all(Arc::new(source)),
        Arc::new(SystemClock),
    );
    let error = broker
        .token(&w.spec(&subject, Some(("web-0", &uid))), VAULT)
        .await
        .expect_err("no tenant");
    assert!(matches!(&error, BrokerError::Config { .. }), "{error:?}");
    assert_eq!(error.status(), 503);
}

#[tokio::test]
async fn concurrent_pods_of_one_account_make_one_exchange() {
    let w = world().await;
    w.service_account("apps", "web");
    let subject = FederatedSubject::new("apps", "web");
    w.trust(&subject);
    let uids: Vec<String> = (0..8)
        .map(|i| w.pod("apps", &format!("web-{i}"), "web"))
        .collect();
    w.entra.set_latency(Duration::from_millis(200));
    let requests = uids.iter().enumerate().map(|(i, uid)| {
        let spec = w.spec(&subject, Some((&format!("web-{i}"), uid)));
        let broker = w.broker.clone();
        async move { broker.token(&spec, VAULT).await }
    });
    let tokens = futures_join(requests).await;
    let first = tokens[0].as_ref().expect("token").access_token().to_owned();
    for token in &tokens {
        assert_eq!(token.as_ref().expect("token").access_token(), first);
    }
    assert_eq!(w.token_requests(), 1);
    assert_eq!(w.entra.calls().len(), 1);
}

/// Join futures without an extra dependency: spawn each, await in order.
async fn futures_join<F, T>(futures: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.expect("task"));
    }
    out
}

#[tokio::test]
async fn refresh_binds_to_the_pod_that_is_asking_now() {
    let w = world().await;
    let clock = Arc::new(ManualClock::at_unix(unix_seconds(SystemTime::now())));
    let source = FederatedSource::new(
        kube_client(&w.api).await,
        federated_config(&w.entra, &w.cloud),
        clock.clone(),
    )
    .expect("source");
    let broker = TokenBroker::new(
        BrokerConfig::default(),
        Sources::all(Arc::new(source)),
        clock.clone(),
    );
    w.service_account("apps", "web");
    let subject = FederatedSubject::new("apps", "web");
    w.trust(&subject);
    let uid0 = w.pod("apps", "web-0", "web");
    let first = broker
        .token(&w.spec(&subject, Some(("web-0", &uid0))), VAULT)
        .await
        .expect("first");
    // The first pod goes away; a second pod of the same account asks inside the refresh margin.
    w.api
        .delete_json("/api/v1/namespaces/apps/pods/web-0")
        .expect("delete pod");
    let uid1 = w.pod("apps", "web-1", "web");
    let lifetime = first.expires_on - unix_seconds(clock.now());
    clock.advance(Duration::from_secs(lifetime - 60));
    let spec1 = w.spec(&subject, Some(("web-1", &uid1)));
    let stale = broker.token(&spec1, VAULT).await.expect("still valid");
    assert_eq!(stale.access_token(), first.access_token());
    // The background refresh binds its token to web-1 (web-0 no longer exists), so it succeeds.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while w.entra.calls().len() < 2 {
        assert!(std::time::Instant::now() < deadline, "no refresh happened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let calls = w.entra.calls();
    assert_eq!(calls[1].status, 200, "refresh exchange succeeded");
    assert_eq!(w.token_requests(), 2);
    assert_eq!(broker.stats().background_refreshes(), 1);
    assert_eq!(broker.stats().source(SourceKind::Federated).errors(), 0);
}
