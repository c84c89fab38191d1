//! Trust boundaries end to end: the real `nmi` in a simulated node with
//! real iptables interception, pods as network namespaces, identities in an attacker's
//! namespace `evil` trying to steal, poison or read what belongs to `default`, and a rogue
//! token endpoint (the attacker's server) recording everything it receives.
//!
//! Needs root.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use podid_api::{
    AzureIdentity, FEDERATED_SERVICE_ACCOUNT_ANNOTATION, IdentityType, TOKEN_SOURCE_ANNOTATION,
};
use podid_e2e::azure::{RogueHandle, serve_rogue};
use podid_e2e::cluster::{Cluster, LogFile, audit_lines, pod_get};
use podid_e2e::wait_for;
use serde_json::Value;

/// How long nmi may take to publish an Event (it batches them).
const EVENT_WAIT: Duration = Duration::from_secs(20);

const TOKEN_PATH: &str =
    "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net";

/// A rogue token endpoint reachable from inside the node.
fn rogue(cluster: &Cluster) -> anyhow::Result<RogueHandle> {
    let listener = std::net::TcpListener::bind(SocketAddr::from((cluster.node.host_ip(), 0)))?;
    Ok(serve_rogue(listener)?)
}

/// A type 1 identity `namespace/name` for `client_id`, its Secret reference and authority.
fn service_principal(
    cluster: &Cluster,
    namespace: &str,
    name: &str,
    client_id: &str,
    secret: (&str, &str),
    authority: &str,
) -> AzureIdentity {
    let mut identity = AzureIdentity::service_principal(
        namespace,
        name,
        IdentityType::ServicePrincipal,
        cluster.cloud.tenant_id(),
        client_id,
        secret.1,
    );
    if let Some(reference) = identity.spec.client_password.as_mut() {
        reference.namespace = Some(secret.0.to_owned());
    }
    identity.spec.ad_endpoint = Some(authority.to_owned());
    identity
}

/// The access token of a 200 answer.
fn access_token(status: u16, body: &str) -> anyhow::Result<String> {
    anyhow::ensure!(status == 200, "{status} {body}");
    let value: Value = serde_json::from_str(body)?;
    value["access_token"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("no access_token in {body}"))
}

/// Item 1: an identity in `evil` claiming the victim's client id and tenant neither reads the
/// victim's cached token (wrong secret: Entra refuses it, no cache hit), nor fills or refreshes
/// it from the attacker's own authority — even one the operator allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_cannot_steal_or_poison_anothers_cached_token() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let log = LogFile::for_test(&cluster, "trust-cache");
    cluster.child_log = Some(log.0.clone());
    let rogue = rogue(&cluster)?;
    let node = Arc::clone(&cluster.node);
    let victim_pod = Arc::new(node.add_pod("victim")?);
    let thief_pod = Arc::new(node.add_pod("thief")?);
    let poison_pod = Arc::new(node.add_pod("poison")?);

    let sp = cluster.cloud.add_service_principal("victim-sp");
    let secret = cluster.cloud.add_client_secret(&sp.client_id)?;
    cluster.create_secret("victim-secret", &[("clientSecret", secret.as_bytes())])?;
    let victim = service_principal(
        &cluster,
        "default",
        "victim",
        &sp.client_id,
        ("default", "victim-secret"),
        &cluster.entra_url,
    );
    cluster.add_pod("victim-1", Some("victim"), victim_pod.ip())?;
    cluster.bind(&victim, "victim", "victim-1")?;

    cluster.create_namespace("evil")?;
    cluster.create_secret_in("evil", "stolen", &[("clientSecret", b"wrong-secret")])?;
    // Theft: the victim's ids, the victim's authority, a wrong secret.
    let thief = service_principal(
        &cluster,
        "evil",
        "thief",
        &sp.client_id,
        ("evil", "stolen"),
        &cluster.entra_url,
    );
    cluster.add_pod_in(
        "evil",
        "thief-1",
        &[("aadpodidbinding", "thief")],
        thief_pod.ip(),
    )?;
    cluster.bind_in(&thief, "thief", "thief-1")?;
    // Poisoning: the victim's ids, the attacker's own authority.
    let poisoner = service_principal(
        &cluster,
        "evil",
        "poisoner",
        &sp.client_id,
        ("evil", "stolen"),
        &rogue.url(),
    );
    cluster.add_pod_in(
        "evil",
        "poison-1",
        &[("aadpodidbinding", "poisoner")],
        poison_pod.ip(),
    )?;
    cluster.bind_in(&poisoner, "poisoner", "poison-1")?;

    // The operator allowed the rogue authority too: only the cache key stands in the way.
    let allow = format!("--allowed-authorities={}", rogue.url());
    cluster.spawn_nmi(&["--log-format=json", &allow])?;
    cluster.wait_ready().await?;

    let (status, body, _) = pod_get(&victim_pod, TOKEN_PATH, true).await?;
    let genuine = access_token(status, &body)?;
    assert_eq!(
        cluster.cloud.verify_access_token(&genuine)?.appid,
        sp.client_id
    );

    // Theft: refused by Entra, and never the victim's token.
    let (status, body, _) = pod_get(&thief_pod, TOKEN_PATH, true).await?;
    assert_eq!(status, 403, "{body}");
    assert!(!body.contains(&genuine), "the thief got the victim's token");

    // Poisoning: the attacker gets what its own server minted, and nothing else changes.
    let (status, body, _) = pod_get(&poison_pod, TOKEN_PATH, true).await?;
    let minted = access_token(status, &body)?;
    assert!(minted.starts_with("rogue-"), "{minted}");
    assert!(
        !rogue.saw(&secret),
        "the victim's secret reached the attacker's server"
    );
    for _ in 0..3 {
        let (status, body, _) = pod_get(&victim_pod, TOKEN_PATH, true).await?;
        let token = access_token(status, &body)?;
        assert_eq!(token, genuine, "the victim's entry was replaced");
    }

    let lines = wait_for("six audit lines", Duration::from_secs(10), || {
        let lines = audit_lines(&log.0);
        async move { (lines.len() >= 5).then_some(lines) }
    })
    .await?;
    for line in &lines {
        if line["namespace"] == "evil" {
            assert_eq!(line["cache"], "miss", "{line}");
        }
    }
    assert!(
        lines
            .iter()
            .any(|l| l["pod"] == "victim-1" && l["cache"] == "hit"),
        "{lines:#?}"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l["pod"] == "thief-1" && l["cache"] == "hit"),
        "{lines:#?}"
    );
    Ok(())
}

/// Items 2 and 3: an identity in `evil` cannot make nmi read a Secret of `default` or
/// `kube-system`, nor use a Secret key other than the documented one, nor send its own
/// credential to an authority the operator did not allow; each refusal names its flag and
/// becomes an Event on the pod, and the attacker's server receives nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_cannot_read_another_namespaces_secret_or_pick_its_authority()
-> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let listed = rogue(&cluster)?;
    let unlisted = rogue(&cluster)?;
    let node = Arc::clone(&cluster.node);
    let sp = cluster.cloud.add_service_principal("default-sp");
    let secret = cluster.cloud.add_client_secret(&sp.client_id)?;
    cluster.create_secret("sp-secret", &[("clientSecret", secret.as_bytes())])?;
    cluster.create_secret_in(
        "kube-system",
        "registry-pull",
        &[(
            ".dockerconfigjson",
            b"{\"auths\":{\"r\":{\"auth\":\"cHVsbC1zZWNyZXQ=\"}}}",
        )],
    )?;
    cluster.create_namespace("evil")?;
    cluster.create_secret_in("evil", "own", &[("clientSecret", b"evil-own-secret")])?;
    cluster.create_secret_in("evil", "odd-key", &[("token", b"evil-odd-secret")])?;

    let cases = [
        ("exfil", ("default", "sp-secret"), listed.url()),
        ("pull", ("kube-system", "registry-pull"), listed.url()),
        ("oddkey", ("evil", "odd-key"), listed.url()),
        ("elsewhere", ("evil", "own"), unlisted.url()),
    ];
    let mut pods = Vec::new();
    for (name, secret_ref, authority) in &cases {
        let identity = service_principal(
            &cluster,
            "evil",
            name,
            &sp.client_id,
            *secret_ref,
            authority,
        );
        let pod = Arc::new(node.add_pod(name)?);
        let pod_name = format!("{name}-1");
        cluster.add_pod_in("evil", &pod_name, &[("aadpodidbinding", name)], pod.ip())?;
        cluster.bind_in(&identity, name, &pod_name)?;
        pods.push((pod_name, pod));
    }
    let allow = format!("--allowed-authorities={}", listed.url());
    cluster.spawn_nmi(&[&allow])?;
    cluster.wait_ready().await?;

    let expected = [
        "--allow-cross-namespace-secrets",
        "--allow-cross-namespace-secrets",
        "no clientSecret key",
        "--allowed-authorities",
    ];
    for ((pod_name, pod), needle) in pods.iter().zip(expected) {
        let (status, body, _) = pod_get(pod, TOKEN_PATH, true).await?;
        assert_eq!(status, 503, "{pod_name}: {body}");
        assert!(body.contains(needle), "{pod_name}: {body}");
        assert!(!body.contains("access_token"), "{pod_name}: {body}");
        let event = cluster
            .pod_event("evil", pod_name, "IdentityCredentialInvalid", EVENT_WAIT)
            .await?;
        assert!(
            event["note"].as_str().unwrap_or_default().contains(needle),
            "{pod_name}: {event}"
        );
    }
    assert!(
        listed.received().is_empty() && unlisted.received().is_empty(),
        "the attacker's servers received {:?} and {:?}",
        listed.received(),
        unlisted.received()
    );
    // The Secrets of other namespaces were not even read.
    let reads = cluster.api.faults().requests();
    assert!(
        !reads.iter().any(|r| r.method == "GET"
            && (r.path.contains("/namespaces/default/secrets")
                || r.path.contains("/namespaces/kube-system/secrets"))),
        "nmi read another namespace's Secret"
    );
    Ok(())
}

/// Item 4: the federated switch cannot mint a token of another namespace's service account,
/// and the token it does mint (the pod's own service account) is short-lived, bound to the
/// pod and for the exchange audience only — which is all an allowed authority ever sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_federated_switch_cannot_mint_tokens_for_other_namespaces() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let rogue = rogue(&cluster)?;
    let node = Arc::clone(&cluster.node);
    cluster.create_service_account("kube-system", "cluster-admin-sa")?;
    // A namespace comes with its service account `default`, as on a real cluster.
    cluster.create_namespace("evil")?;
    let uami = cluster.cloud.add_user_assigned_identity("evil-uami");

    let federated = |name: &str, shared: Option<&str>| {
        let mut identity =
            AzureIdentity::user_assigned("evil", name, &uami.resource_id, &uami.client_id);
        identity.spec.tenant_id = Some(cluster.cloud.tenant_id().to_owned());
        identity.spec.ad_endpoint = Some(rogue.url());
        let mut annotations = std::collections::BTreeMap::from([(
            TOKEN_SOURCE_ANNOTATION.to_owned(),
            "federated".to_owned(),
        )]);
        if let Some(shared) = shared {
            annotations.insert(
                FEDERATED_SERVICE_ACCOUNT_ANNOTATION.to_owned(),
                shared.to_owned(),
            );
        }
        identity.metadata.annotations = Some(annotations);
        identity
    };
    let steal = Arc::new(node.add_pod("steal")?);
    cluster.add_pod_in(
        "evil",
        "steal-1",
        &[("aadpodidbinding", "steal")],
        steal.ip(),
    )?;
    cluster.bind_in(
        &federated("steal", Some("kube-system/cluster-admin-sa")),
        "steal",
        "steal-1",
    )?;
    let own = Arc::new(node.add_pod("own")?);
    cluster.add_pod_in("evil", "own-1", &[("aadpodidbinding", "own")], own.ip())?;
    cluster.bind_in(&federated("own", None), "own", "own-1")?;

    // The operator allowed the attacker's authority: the subject rules stand alone.
    let allow = format!("--allowed-authorities={}", rogue.url());
    cluster.spawn_nmi(&[&allow])?;
    cluster.wait_ready().await?;

    let (status, body, _) = pod_get(&steal, TOKEN_PATH, true).await?;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("kube-system/cluster-admin-sa"), "{body}");
    let minted_for_kube_system = cluster.api.faults().requests().iter().any(|r| {
        r.method == "POST"
            && r.path == "/api/v1/namespaces/kube-system/serviceaccounts/cluster-admin-sa/token"
    });
    assert!(!minted_for_kube_system, "nmi minted a kube-system token");
    assert!(rogue.received().is_empty(), "{:?}", rogue.received());
    cluster
        .pod_event("evil", "steal-1", "IdentityCredentialInvalid", EVENT_WAIT)
        .await?;

    // The pod's own service account: allowed. What the (allowed) authority receives is a
    // token of evil/default, bound to own-1, for the exchange audience, living 10 minutes.
    let (status, body, _) = pod_get(&own, TOKEN_PATH, true).await?;
    let minted = access_token(status, &body)?;
    assert!(minted.starts_with("rogue-"), "{minted}");
    let received = rogue.received();
    assert_eq!(received.len(), 1, "{received:?}");
    let assertion = received[0]
        .form
        .get("client_assertion")
        .cloned()
        .unwrap_or_default();
    let payload = assertion.split('.').nth(1).unwrap_or_default();
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('='))?,
    )?;
    assert_eq!(claims["sub"], "system:serviceaccount:evil:default");
    assert_eq!(
        claims["aud"],
        serde_json::json!(["api://AzureADTokenExchange"])
    );
    assert_eq!(claims["kubernetes.io"]["pod"]["name"], "own-1", "{claims}");
    let lifetime = claims["exp"].as_u64().unwrap_or(u64::MAX) - claims["iat"].as_u64().unwrap_or(0);
    assert!(lifetime <= 600, "a {lifetime} s service-account token");
    Ok(())
}
