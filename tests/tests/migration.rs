//! The migration bridge end to end (docs/migration.md): the real `mic` and `nmi`, a pod as a
//! network namespace behind real interception, the official Python SDK, the fake API server's
//! TokenRequest and the simulated Entra's federated identity credentials. An identity flips to
//! federated tokens and back while the pod keeps asking for tokens; nothing about the pod changes.
//! Needs root.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use podid_api::{AzureIdentity, AzureIdentityBinding, TOKEN_SOURCE_ANNOTATION};
use podid_e2e::azure::{FederatedCredential, GrantKind};
use podid_e2e::cluster::{Cluster, pod_get, sdk_for};
use podid_e2e::{netns, wait_for};
use serde_json::{Value, json};

const IDENTITIES: &str = "/apis/aadpodidentity.k8s.io/v1/namespaces/default/azureidentities";
const BINDINGS: &str = "/apis/aadpodidentity.k8s.io/v1/namespaces/default/azureidentitybindings";
const FLIP: Duration = Duration::from_secs(60);

fn token_path(client_id: &str) -> String {
    format!(
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net&client_id={client_id}"
    )
}

/// Sets (`Some`) or removes (`None`) an annotation of an object with a JSON merge patch.
fn annotate(cluster: &Cluster, path: &str, key: &str, value: Option<&str>) -> anyhow::Result<()> {
    cluster
        .api
        .merge_patch_json(path, json!({"metadata": {"annotations": {key: value}}}))
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("patching {path}: {}", e.message))
}

fn on_scale_set(cluster: &Cluster, resource_id: &str) -> anyhow::Result<bool> {
    Ok(cluster
        .cloud
        .assigned_identities(&cluster.vmss)?
        .iter()
        .any(|id| id.eq_ignore_ascii_case(resource_id)))
}

fn federated_grants(cluster: &Cluster, client_id: &str) -> usize {
    cluster
        .cloud
        .entra_calls()
        .iter()
        .filter(|c| {
            c.grant == GrantKind::Federated
                && c.status == 200
                && c.version == "v2"
                && c.client_id.eq_ignore_ascii_case(client_id)
        })
        .count()
}

fn imds_tokens(cluster: &Cluster, client_id: &str) -> u64 {
    cluster
        .imds
        .counters()
        .per_identity
        .get(&client_id.to_ascii_lowercase())
        .copied()
        .unwrap_or(0)
}

/// TokenRequests the fake API server answered for `namespace/name`.
fn token_requests(cluster: &Cluster, namespace: &str, name: &str) -> usize {
    let path = format!("/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token");
    cluster
        .api
        .faults()
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path == path)
        .count()
}

/// Starts nmi with the simulated tenant as the cluster's default federated tenant, plus `extra`
/// flags, and waits until it is ready.
async fn start_nmi(cluster: &mut Cluster, extra: &[&str]) -> anyhow::Result<()> {
    let tenant = format!(
        "--federated-default-tenant-id={}",
        cluster.cloud.tenant_id()
    );
    let mut flags = vec![tenant.as_str()];
    flags.extend_from_slice(extra);
    cluster.spawn_nmi(&flags)?;
    cluster.wait_ready().await
}

/// How many requests a loop made, and every failure (status and body).
type LoopOutcome = (usize, Vec<(u16, String)>);

/// Raw token requests from `pod` one after another until `stop`; returns every failure
/// (status and body) and the number of requests made.
fn request_loop(
    pod: Arc<netns::SimPod>,
    client_id: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<anyhow::Result<LoopOutcome>> {
    tokio::spawn(async move {
        let mut failures = Vec::new();
        let mut count = 0;
        while !stop.load(Ordering::Acquire) {
            let (status, body, _) = pod_get(&pod, &token_path(&client_id), true).await?;
            count += 1;
            if status != 200 {
                failures.push((status, body));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok((count, failures))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipping_an_identity_to_federated_and_back_serves_every_request() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    // Short IMDS tokens, so the IMDS path is visibly used again after flipping back.
    cluster.cloud.set_imds_token_lifetime(8);
    let web = cluster.cloud.add_user_assigned_identity("web");
    let subject = "system:serviceaccount:default:default";
    cluster.cloud.add_federated_credential(
        &web.client_id,
        FederatedCredential::new("web-default", cluster.api.issuer(), subject),
    )?;
    // ServiceAccount `default` exists with its namespace, as on a cluster.
    let mut identity =
        AzureIdentity::user_assigned("default", "web", &web.resource_id, &web.client_id);
    identity.spec.ad_endpoint = Some(cluster.entra_url.clone());
    cluster.create(IDENTITIES, serde_json::to_value(&identity)?)?;
    let binding = AzureIdentityBinding::for_selector("default", "web-binding", "web", "web");
    cluster.create(BINDINGS, serde_json::to_value(&binding)?)?;

    cluster.spawn_mic()?;
    start_nmi(&mut cluster, &[]).await?;
    let pod = Arc::new(cluster.node.add_pod("web")?);
    cluster.add_pod("web-1", Some("web"), pod.ip())?;

    // IMDS path: mic puts the identity on the scale set, the SDK gets its token.
    let token = sdk_for(&pod, &web.client_id).await?.token()?;
    assert_eq!(
        cluster.cloud.verify_access_token(&token)?.appid,
        web.client_id
    );
    assert!(on_scale_set(&cluster, &web.resource_id)?);
    assert_eq!(federated_grants(&cluster, &web.client_id), 0);

    let stop = Arc::new(AtomicBool::new(false));
    let requests = request_loop(Arc::clone(&pod), web.client_id.clone(), Arc::clone(&stop));
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Flip to federated: nmi exchanges the pod's service-account token at Entra, mic takes the
    // identity off the scale set.
    let identity_path = format!("{IDENTITIES}/web");
    annotate(
        &cluster,
        &identity_path,
        TOKEN_SOURCE_ANNOTATION,
        Some("federated"),
    )?;
    wait_for("a federated exchange for web", FLIP, || async {
        (federated_grants(&cluster, &web.client_id) > 0).then_some(())
    })
    .await?;
    assert!(
        token_requests(&cluster, "default", "default") > 0,
        "the pod's own service account token was requested"
    );
    wait_for("mic to remove web from the scale set", FLIP, || async {
        (!on_scale_set(&cluster, &web.resource_id).ok()?).then_some(())
    })
    .await?;
    let token = sdk_for(&pod, &web.client_id).await?.token()?;
    assert_eq!(
        cluster.cloud.verify_access_token(&token)?.appid,
        web.client_id,
        "the SDK gets web's token from the federated path"
    );
    let imds_while_federated = imds_tokens(&cluster, &web.client_id);
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(
        imds_tokens(&cluster, &web.client_id),
        imds_while_federated,
        "no IMDS token for web while it is federated"
    );

    // Flip back: mic puts the identity on the scale set again, nmi goes back to IMDS.
    annotate(&cluster, &identity_path, TOKEN_SOURCE_ANNOTATION, None)?;
    wait_for("mic to put web back on the scale set", FLIP, || async {
        on_scale_set(&cluster, &web.resource_id).ok()?.then_some(())
    })
    .await?;
    wait_for(
        "an IMDS token for web after flipping back",
        FLIP,
        || async { (imds_tokens(&cluster, &web.client_id) > imds_while_federated).then_some(()) },
    )
    .await?;
    let token = sdk_for(&pod, &web.client_id).await?.token()?;
    assert_eq!(
        cluster.cloud.verify_access_token(&token)?.appid,
        web.client_id
    );

    stop.store(true, Ordering::Release);
    let (count, failures) = requests.await??;
    assert!(count > 20, "the pod kept asking: {count} requests");
    assert!(
        failures.is_empty(),
        "{} of {count} requests failed: {failures:?}",
        failures.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_federated_setup_is_a_403_naming_what_to_create() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    // No federated credential registered for this identity.
    let lonely = cluster.cloud.add_user_assigned_identity("lonely");
    // A federated credential exists, but the shared service account does not.
    let shared = cluster.cloud.add_user_assigned_identity("shared");
    cluster.cloud.add_federated_credential(
        &shared.client_id,
        FederatedCredential::new(
            "shared",
            cluster.api.issuer(),
            "system:serviceaccount:default:podid-shared",
        ),
    )?;
    // ServiceAccount `default` exists with its namespace, as on a cluster.
    for (id, selector) in [(&lonely, "lonely"), (&shared, "shared")] {
        let name = selector;
        let mut identity =
            AzureIdentity::user_assigned("default", name, &id.resource_id, &id.client_id);
        identity.spec.ad_endpoint = Some(cluster.entra_url.clone());
        let mut annotations = std::collections::BTreeMap::from([(
            TOKEN_SOURCE_ANNOTATION.to_owned(),
            "federated".to_owned(),
        )]);
        if name == "shared" {
            annotations.insert(
                podid_api::FEDERATED_SERVICE_ACCOUNT_ANNOTATION.to_owned(),
                "podid-shared".to_owned(),
            );
        }
        identity.metadata.annotations = Some(annotations);
        cluster.create(IDENTITIES, serde_json::to_value(&identity)?)?;
        let binding = AzureIdentityBinding::for_selector(
            "default",
            &format!("{name}-binding"),
            name,
            selector,
        );
        cluster.create(BINDINGS, serde_json::to_value(&binding)?)?;
    }
    cluster.spawn_mic()?;
    start_nmi(&mut cluster, &[]).await?;
    let lonely_pod = Arc::new(cluster.node.add_pod("lonely")?);
    cluster.add_pod("lonely-1", Some("lonely"), lonely_pod.ip())?;
    let shared_pod = Arc::new(cluster.node.add_pod("shared")?);
    cluster.add_pod("shared-1", Some("shared"), shared_pod.ip())?;

    let (status, body, _) = pod_get(&lonely_pod, &token_path(&lonely.client_id), true).await?;
    assert_eq!(status, 403, "{body}");
    let body: Value = serde_json::from_str(&body)?;
    let description = body["error_description"].as_str().unwrap_or_default();
    assert!(
        description.contains("system:serviceaccount:default:default")
            && description.contains(cluster.api.issuer())
            && description.contains("api://AzureADTokenExchange"),
        "names the federated credential to register: {description}"
    );

    let (status, body, _) = pod_get(&shared_pod, &token_path(&shared.client_id), true).await?;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("podid-shared") && body.contains("create ServiceAccount"),
        "names the service account to create: {body}"
    );

    // nmi's Event on the pod names the failure (rate-limited, published off the request path).
    let event = cluster
        .pod_event("default", "lonely-1", "FederatedTokenFailed", FLIP)
        .await?;
    assert_eq!(event["type"], "Warning");
    assert!(
        event["note"]
            .as_str()
            .is_some_and(|n| n.contains("system:serviceaccount:default:default")),
        "{event}"
    );

    // Never another identity, never the node's IMDS.
    assert_eq!(cluster.imds.counters().tokens_issued, 0);
    assert!(cluster.cloud.assigned_identities(&cluster.vmss)?.is_empty());

    // The SDK sees the 403 at once as a final answer.
    let outcome = sdk_for(&lonely_pod, &lonely.client_id).await?;
    assert!(
        matches!(&outcome, podid_e2e::SdkOutcome::Error { message, .. } if message.contains("federated")),
        "{outcome:?}"
    );
    Ok(())
}

/// `nmi --serve-workload-identity-pods`: a pod set up for Workload Identity (label, annotated
/// service account, no binding, no mic) that still calls IMDS gets its token through the real
/// interception, by the federated exchange of its own service account's token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_identity_labelled_pod_gets_its_token_through_imds() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let app = cluster.cloud.add_user_assigned_identity("wi-app");
    cluster.cloud.add_federated_credential(
        &app.client_id,
        FederatedCredential::new(
            "wi-app",
            cluster.api.issuer(),
            "system:serviceaccount:default:default",
        ),
    )?;
    // The namespace's `default` ServiceAccount exists; annotate it.
    annotate(
        &cluster,
        "/api/v1/namespaces/default/serviceaccounts/default",
        podid_api::WORKLOAD_IDENTITY_CLIENT_ID_ANNOTATION,
        Some(&app.client_id),
    )?;
    let authority = format!("--federated-authority-host={}", cluster.entra_url);
    start_nmi(
        &mut cluster,
        &[&authority, "--serve-workload-identity-pods"],
    )
    .await?;
    let pod = Arc::new(cluster.node.add_pod("wi")?);
    cluster.add_pod_with_labels(
        "wi-1",
        &[(podid_api::WORKLOAD_IDENTITY_USE_LABEL, "true")],
        pod.ip(),
    )?;

    // The official SDK, without a client id (the app relies on the default identity) and with it.
    let sdk_pod = Arc::clone(&pod);
    let outcome = tokio::task::spawn_blocking(move || {
        podid_e2e::sdk_get_token(
            &sdk_pod,
            "https://vault.azure.net/.default",
            podid_e2e::SdkSelector::None,
            Duration::from_secs(90),
        )
    })
    .await??;
    let token = outcome.token()?;
    assert_eq!(
        cluster.cloud.verify_access_token(&token)?.appid,
        app.client_id
    );
    let token = sdk_for(&pod, &app.client_id).await?.token()?;
    assert_eq!(
        cluster.cloud.verify_access_token(&token)?.appid,
        app.client_id
    );
    assert!(federated_grants(&cluster, &app.client_id) > 0);
    assert!(token_requests(&cluster, "default", "default") > 0);
    assert_eq!(
        cluster.imds.counters().tokens_issued,
        0,
        "the node's IMDS is never asked"
    );

    // A resource id cannot be checked against a client id: refused, not ignored.
    let by_resource = format!(
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net&msi_res_id={}",
        app.resource_id
    );
    let (status, body, _) = pod_get(&pod, &by_resource, true).await?;
    assert_eq!(status, 400, "{body}");
    // Another client id is not this pod's identity.
    let other = cluster.cloud.add_user_assigned_identity("other");
    let (status, body, _) = pod_get(&pod, &token_path(&other.client_id), true).await?;
    assert_eq!(status, 400, "a final refusal: {body}");

    // The annotation removed: nmi's watch follows, the pod gets a 403 naming it, and an Event.
    annotate(
        &cluster,
        "/api/v1/namespaces/default/serviceaccounts/default",
        podid_api::WORKLOAD_IDENTITY_CLIENT_ID_ANNOTATION,
        None,
    )?;
    let body = wait_for("a 403 once the annotation is gone", FLIP, || async {
        let (status, body, _) = pod_get(&pod, &token_path(&app.client_id), true)
            .await
            .ok()?;
        (status == 403).then_some(body)
    })
    .await?;
    assert!(
        body.contains(podid_api::WORKLOAD_IDENTITY_CLIENT_ID_ANNOTATION)
            && body.contains("default/default"),
        "{body}"
    );
    let event = cluster
        .pod_event("default", "wi-1", "FederatedTokenFailed", FLIP)
        .await?;
    assert!(
        event["note"]
            .as_str()
            .is_some_and(|n| n.contains(podid_api::WORKLOAD_IDENTITY_CLIENT_ID_ANNOTATION)),
        "{event}"
    );
    Ok(())
}
