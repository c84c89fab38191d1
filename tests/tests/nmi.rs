//! nmi end to end: the real `nmi` binary inside a simulated node (network namespace) with real
//! iptables interception of 169.254.169.254:80, the fake API server holding the cluster's
//! objects, the Azure simulator behind it (the VM's IMDS inside the node, Entra on the host), and
//! the official Python `azure-identity` SDK asking for tokens from inside network-namespace pods.
//! Needs root.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use podid_api::{AzureIdentity, IdentityType};
use podid_e2e::cluster::{Cluster, pod_get, sdk_for as sdk};
use podid_e2e::wait_for;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_get_their_own_identity_through_real_interception() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let node = Arc::clone(&cluster.node);
    let web_pod = Arc::new(node.add_pod("web")?);
    let sp_pod = Arc::new(node.add_pod("sp")?);
    let lonely_pod = Arc::new(node.add_pod("lonely")?);

    // Type 0: a user-assigned identity on the node's scale set.
    let web = cluster.cloud.add_user_assigned_identity("web");
    cluster.cloud.assign_identity(&cluster.vmss, &web)?;
    let web_identity =
        AzureIdentity::user_assigned("default", "web", &web.resource_id, &web.client_id);
    cluster.add_pod("web-1", Some("web"), web_pod.ip())?;
    cluster.bind(&web_identity, "web", "web-1")?;

    // Type 1: a service principal whose secret lives in a Kubernetes Secret.
    let sp = cluster.cloud.add_service_principal("sp");
    let secret = cluster.cloud.add_client_secret(&sp.client_id)?;
    cluster.create(
        "/api/v1/namespaces/default/secrets",
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "sp-secret"},
               "data": {"clientSecret": STANDARD.encode(&secret)}}),
    )?;
    let mut sp_identity = AzureIdentity::service_principal(
        "default",
        "sp",
        IdentityType::ServicePrincipal,
        cluster.cloud.tenant_id(),
        &sp.client_id,
        "sp-secret",
    );
    sp_identity.spec.ad_endpoint = Some(cluster.entra_url.clone());
    cluster.add_pod("sp-1", Some("sp"), sp_pod.ip())?;
    cluster.bind(&sp_identity, "sp", "sp-1")?;

    // A pod nothing binds.
    cluster.add_pod("lonely-1", None, lonely_pod.ip())?;

    cluster.spawn_nmi(&[])?;
    cluster.wait_ready().await?;
    let chain = cluster.chain()?;
    assert_eq!(chain.len(), 3, "{chain:?}");
    assert!(
        chain[1].contains("--to-destination 127.0.0.1:2579"),
        "{chain:?}"
    );

    // The SDK in each pod gets its own identity's token.
    let token = sdk(&web_pod, &web.client_id).await?.token()?;
    let claims = cluster.cloud.verify_access_token(&token)?;
    assert_eq!(claims.appid, web.client_id, "type 0 token for web");
    let token = sdk(&sp_pod, &sp.client_id).await?.token()?;
    let claims = cluster.cloud.verify_access_token(&token)?;
    assert_eq!(
        claims.appid, sp.client_id,
        "type 1 token for the service principal"
    );

    // A pod naming another pod's identity gets none.
    let path = format!(
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net&client_id={}",
        sp.client_id
    );
    let (status, body, _) = pod_get(&web_pod, &path, true).await?;
    assert_eq!(status, 400, "a final refusal: {body}");
    assert!(!body.contains("access_token"), "{body}");

    // A pod with no binding gets a final 400 (the real IMDS's "no such identity") at once.
    let path =
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net";
    let (status, body, elapsed) = pod_get(&lonely_pod, path, true).await?;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body)?["error"],
        "invalid_request"
    );
    println!("unbound pod answered 400 in {elapsed:?}");
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");

    // The real SDK's DefaultAzureCredential in that pod takes the 400 as final and moves on to
    // its next credential (a 404 made it retry IMDS for ~24 s first).
    let pod = Arc::clone(&lonely_pod);
    let (outcome, seconds) = tokio::task::spawn_blocking(move || {
        podid_e2e::sdk_default_credential(&pod, podid_e2e::cluster::SCOPE, Duration::from_secs(90))
    })
    .await??;
    println!("DefaultAzureCredential in the unbound pod gave up on IMDS after {seconds:.2} s");
    let podid_e2e::SdkOutcome::Error { message, .. } = outcome else {
        panic!("an unbound pod got a token");
    };
    assert!(
        message.contains("ManagedIdentityCredential"),
        "the chain did not try managed identity: {message}"
    );
    assert!(
        message.contains("AzureCliCredential"),
        "the chain did not move on past managed identity: {message}"
    );
    assert!(
        seconds < 10.0,
        "DefaultAzureCredential retried IMDS for {seconds:.1} s: the refusal was not final"
    );

    // A missing Metadata header gets IMDS's own 400.
    let (status, body, _) = pod_get(&web_pod, path, false).await?;
    assert_eq!(status, 400);
    let body: Value = serde_json::from_str(&body)?;
    assert_eq!(body["error"], "invalid_request");
    assert_eq!(
        body["error_description"],
        "Required metadata header not specified"
    );

    // Instance metadata passes through to the VM's IMDS without the block flag.
    let (status, body, _) =
        pod_get(&web_pod, "/metadata/instance?api-version=2021-02-01", true).await?;
    assert_eq!(status, 200, "{body}");
    assert!(cluster.imds.counters().instance_requests >= 1);

    // A flushed chain is repaired within the reconcile interval (1 s here).
    node.iptables(&["-t", "nat", "-F", "aad-metadata"])?;
    wait_for(
        "the aad-metadata chain to be repaired",
        Duration::from_secs(10),
        || async { cluster.chain().ok().filter(|c| c.len() == 3) },
    )
    .await?;

    // nmi stops: the rules stay and pods cannot reach the real IMDS (fail closed).
    if let Some(mut nmi) = cluster.nmi.take() {
        nmi.kill();
    }
    assert_eq!(cluster.chain()?.len(), 3, "rules survive nmi");
    let issued_before = cluster.imds.counters().tokens_issued;
    let blocked = pod_get(&web_pod, path, true).await;
    assert!(
        blocked.is_err(),
        "with nmi down a pod must not reach IMDS: {blocked:?}"
    );
    assert_eq!(cluster.imds.counters().tokens_issued, issued_before);

    // A new nmi serves again.
    cluster.spawn_nmi(&[])?;
    cluster.wait_ready().await?;
    let token = sdk(&web_pod, &web.client_id).await?.token()?;
    assert_eq!(
        cluster.cloud.verify_access_token(&token)?.appid,
        web.client_id
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_metadata_is_blocked_with_the_flag() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let pod = Arc::new(cluster.node.add_pod("web")?);
    cluster.add_pod("web-1", Some("web"), pod.ip())?;
    cluster.spawn_nmi(&["--block-instance-metadata"])?;
    cluster.wait_ready().await?;
    let (status, body, _) =
        pod_get(&pod, "/metadata/instance?api-version=2021-02-01", true).await?;
    assert_eq!(status, 403, "{body}");
    assert_eq!(cluster.imds.counters().instance_requests, 0);
    Ok(())
}
