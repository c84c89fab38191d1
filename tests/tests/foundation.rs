//! Foundation end-to-end: the three test doubles compose the way the product suites need them.
//!
//! A simulated node (network namespace) carries the simulated VM's IMDS on 169.254.169.254:80;
//! a pod (network namespace behind it) runs the official Python `azure-identity` SDK, which must
//! be refused an identity until an operator assigns it to the scale set through the simulated
//! ARM, and then gets a token the simulated Entra authority vouches for. Needs root.

use std::net::SocketAddr;
use std::time::Duration;

use podid_e2e::{ArmClient, SdkOutcome, SdkSelector, azure, netns, sdk_get_token};

const SCOPE: &str = "https://vault.azure.net/.default";
const IMDS: &str = "169.254.169.254:80";
const SDK_TIMEOUT: Duration = Duration::from_secs(60);

async fn sdk(
    pod: &std::sync::Arc<netns::SimPod>,
    selector: SdkOwned,
) -> anyhow::Result<SdkOutcome> {
    let pod = pod.clone();
    tokio::task::spawn_blocking(move || {
        let selector = match &selector {
            SdkOwned::ClientId(id) => SdkSelector::ClientId(id),
            SdkOwned::ResourceId(id) => SdkSelector::ResourceId(id),
        };
        sdk_get_token(&pod, SCOPE, selector, SDK_TIMEOUT)
    })
    .await?
}

enum SdkOwned {
    ClientId(String),
    ResourceId(String),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_in_a_pod_gets_a_token_only_once_arm_assigned_the_identity() -> anyhow::Result<()> {
    let cloud = azure::Cloud::new()?;
    let web = cloud.add_user_assigned_identity("web");
    let other = cloud.add_user_assigned_identity("other");
    let vmss = cloud.add_vmss(
        cloud.subscription_id(),
        cloud.resource_group(),
        "aks-nodepool1-vmss",
    );
    let entra = azure::EntraHandle::start(&cloud)?;
    let arm = azure::ArmHandle::start(&cloud)?;
    let operator = cloud.add_service_principal("operator");
    let secret = cloud.add_client_secret(&operator.client_id)?;

    let node = netns::SimNode::create()?;
    node.add_local_address("169.254.169.254/32")?;
    let listener = node.bind_tcp(IMDS.parse::<SocketAddr>()?)?;
    let imds = azure::serve_imds(&cloud, &vmss.instance("0"), listener)?;
    let pod = std::sync::Arc::new(node.add_pod("web")?);

    // Not assigned yet: IMDS must refuse, and the SDK must say so.
    let refused = sdk(&pod, SdkOwned::ClientId(web.client_id.clone())).await?;
    let SdkOutcome::Error { message, .. } = &refused else {
        anyhow::bail!("an unassigned identity got a token: {refused:?}");
    };
    assert!(
        message.contains("Identity not found"),
        "the SDK should surface IMDS's reason: {message}"
    );
    let before = imds.counters();
    assert!(
        before.token_requests >= 1 && before.tokens_issued == 0,
        "the pod's request reached the simulated IMDS and got nothing: {before:?}"
    );

    // The operator assigns the identity to the scale set through ARM.
    let client = ArmClient::login(
        &entra.token_url_v1(),
        &operator.client_id,
        &secret,
        &arm.url(),
    )
    .await?;
    client
        .set_user_assigned(&vmss, &web.resource_id, true, Duration::from_secs(10))
        .await?;
    assert_eq!(
        arm.patch_count(&vmss),
        1,
        "exactly one PATCH for one identity"
    );
    let assigned = cloud.assigned_identities(&vmss)?;
    assert!(
        assigned
            .iter()
            .any(|id| id.eq_ignore_ascii_case(&web.resource_id)),
        "ARM state holds the identity: {assigned:?}"
    );

    // Now the SDK gets a token, by client id and by resource id, and it is web's.
    for selector in [
        SdkOwned::ClientId(web.client_id.clone()),
        SdkOwned::ResourceId(web.resource_id.clone()),
    ] {
        let token = sdk(&pod, selector).await?.token()?;
        let claims = cloud.verify_access_token(&token)?;
        assert_eq!(claims.appid, web.client_id);
        assert_eq!(claims.oid, web.principal_id);
        assert_eq!(claims.aud, "https://vault.azure.net");
        assert_eq!(
            claims.xms_mirid.as_deref().map(str::to_ascii_lowercase),
            Some(web.resource_id.to_ascii_lowercase())
        );
    }

    // An identity that was never assigned stays refused.
    let still_refused = sdk(&pod, SdkOwned::ClientId(other.client_id.clone())).await?;
    assert!(
        matches!(still_refused, SdkOutcome::Error { .. }),
        "{still_refused:?}"
    );

    // Removing it through ARM takes the token away again.
    client
        .set_user_assigned(&vmss, &web.resource_id, false, Duration::from_secs(10))
        .await?;
    let removed = sdk(&pod, SdkOwned::ClientId(web.client_id.clone())).await?;
    assert!(matches!(removed, SdkOutcome::Error { .. }), "{removed:?}");
    let after = imds.counters();
    assert_eq!(
        after.per_identity.get(&web.client_id.to_ascii_lowercase()),
        Some(&2),
        "web's two tokens were issued by the node's IMDS: {after:?}"
    );
    assert_eq!(after.tokens_issued, 2);
    Ok(())
}

/// The migration path's ground: a service-account token from the fake API server's TokenRequest
/// is exchanged at the simulated Entra (v2, federated assertion) for the identity's token; Entra
/// verifies it by fetching the API server's OIDC discovery and JWKS over HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_token_is_exchanged_for_an_identity_token() -> anyhow::Result<()> {
    use serde_json::{Value, json};

    azure::install_crypto_provider();
    let api = podid_e2e::kube::FakeApiServer::start().await?;
    let cloud = azure::Cloud::new()?;
    let entra = azure::EntraHandle::start(&cloud)?;
    let web = cloud.add_user_assigned_identity("web");
    cloud.add_federated_credential(
        &web.client_id,
        azure::FederatedCredential::new(
            "podid-default-workload",
            api.issuer(),
            "system:serviceaccount:default:workload",
        ),
    )?;
    let http = reqwest::Client::builder().no_proxy().build()?;

    let service_account_token = |name: &'static str| {
        let http = http.clone();
        let base = api.url().to_owned();
        let admin = api.admin_token().to_owned();
        async move {
            http.post(format!("{base}/api/v1/namespaces/default/serviceaccounts"))
                .bearer_auth(&admin)
                .json(&json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}}))
                .send()
                .await?
                .error_for_status()?;
            let response: Value = http
                .post(format!(
                    "{base}/api/v1/namespaces/default/serviceaccounts/{name}/token"
                ))
                .bearer_auth(&admin)
                .json(&json!({
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenRequest",
                    "spec": {"audiences": ["api://AzureADTokenExchange"], "expirationSeconds": 3600}
                }))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            response
                .pointer("/status/token")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| anyhow::anyhow!("TokenRequest without status.token"))
        }
    };
    let exchange = |assertion: String| {
        let http = http.clone();
        let url = entra.token_url_v2();
        let client_id = web.client_id.clone();
        async move {
            let response = http
                .post(url)
                .form(&[
                    ("grant_type", "client_credentials"),
                    ("client_id", client_id.as_str()),
                    ("scope", "https://vault.azure.net/.default"),
                    (
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    ),
                    ("client_assertion", assertion.as_str()),
                ])
                .send()
                .await?;
            let status = response.status();
            let body: Value = response.json().await?;
            anyhow::Ok((status, body))
        }
    };

    let assertion = service_account_token("workload").await?;
    let (status, body) = exchange(assertion).await?;
    assert!(
        status.is_success(),
        "{status}: {}",
        body["error_description"]
    );
    let token = body["access_token"].as_str().unwrap_or_default();
    let claims = cloud.verify_access_token(token)?;
    assert_eq!(claims.appid, web.client_id);
    assert_eq!(claims.aud, "https://vault.azure.net");

    // Another service account has no federated credential: Entra refuses with AADSTS70021.
    let stranger = service_account_token("stranger").await?;
    let (status, body) = exchange(stranger).await?;
    assert_eq!(status.as_u16(), 400, "{body}");
    assert!(
        body["error_codes"]
            .as_array()
            .is_some_and(|codes| codes.iter().any(|c| c == 70021)),
        "{body}"
    );
    Ok(())
}
