//! nmi end to end, identities beyond types 0 and 1: the real `nmi` in a simulated node with real
//! iptables interception, the official Python `azure-identity` SDK in network-namespace pods.
//!
//! * A type 2 identity (service principal with a PKCS#12 certificate in a Secret) gets its own
//!   token, signed for by a certificate assertion the simulated Entra verifies.
//! * A pod excepted by an `AzurePodIdentityException` (one label, value compared
//!   case-insensitively) gets the node's identity straight from the VM's IMDS, with no binding;
//!   the same request from a pod that is not excepted gets no token.
//! * Each issued token leaves one structured audit line naming the pod, namespace, service
//!   account, identity, resource and whether it came from nmi's cache — never the token.
//!
//! Needs root.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use podid_api::{AzureIdentity, IdentityType};
use podid_e2e::cluster::{Cluster, LogFile, audit_lines, pod_get, sdk_for as sdk};
use podid_e2e::{python, wait_for};
use serde_json::Value;

/// The certificate's PKCS#12 bundle (key + certificate, protected by `password`), built by the
/// `cryptography` package of the SDK's venv (independent of the PKCS#12 reader nmi uses).
fn pkcs12(cert: &podid_test_keys::Certificate, password: &str) -> anyhow::Result<Vec<u8>> {
    let dir = std::env::temp_dir().join(format!("podid-e2e-p12-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let key = dir.join("key.pem");
    let crt = dir.join("cert.pem");
    let out = dir.join("bundle.p12");
    std::fs::write(&key, cert.key().private_pem()?)?;
    std::fs::write(&crt, cert.pem())?;
    let script = "import sys\n\
from cryptography.hazmat.primitives import serialization as s\n\
from cryptography.hazmat.primitives.serialization import pkcs12\n\
from cryptography import x509\n\
key = s.load_pem_private_key(open(sys.argv[1], 'rb').read(), None)\n\
cert = x509.load_pem_x509_certificate(open(sys.argv[2], 'rb').read())\n\
enc = s.BestAvailableEncryption(sys.argv[4].encode())\n\
open(sys.argv[3], 'wb').write(pkcs12.serialize_key_and_certificates(b'podid', key, cert, None, enc))\n";
    let status = std::process::Command::new(python()?)
        .arg("-c")
        .arg(script)
        .arg(&key)
        .arg(&crt)
        .arg(&out)
        .arg(password)
        .status()
        .context("running Python to build the PKCS#12 bundle")?;
    anyhow::ensure!(status.success(), "building the PKCS#12 bundle failed");
    let bundle = std::fs::read(&out)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(bundle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_identity_exception_pod_and_audit_lines() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let log = LogFile::for_test(&cluster, "nmi-identities");
    cluster.child_log = Some(log.0.clone());
    let node = Arc::clone(&cluster.node);
    let cert_pod = Arc::new(node.add_pod("cert")?);
    let agent_pod = Arc::new(node.add_pod("agent")?);
    let plain_pod = Arc::new(node.add_pod("plain")?);

    // Type 2: the Secret holds the PKCS#12 bundle and its password; Entra knows the certificate.
    let sp = cluster.cloud.add_service_principal("cert-sp");
    let cert = podid_test_keys::Certificate::generate("podid-cert-sp")?;
    cluster.cloud.add_certificate(&sp.client_id, &cert)?;
    let password = "correct horse battery staple";
    let bundle = pkcs12(&cert, password)?;
    cluster.create_secret(
        "cert-sp-secret",
        &[("certificate", &bundle), ("password", password.as_bytes())],
    )?;
    let mut cert_identity = AzureIdentity::service_principal(
        "default",
        "cert-sp",
        IdentityType::ServicePrincipalCertificate,
        cluster.cloud.tenant_id(),
        &sp.client_id,
        "cert-sp-secret",
    );
    cert_identity.spec.ad_endpoint = Some(cluster.entra_url.clone());
    cluster.add_pod("cert-1", Some("cert"), cert_pod.ip())?;
    cluster.bind(&cert_identity, "cert", "cert-1")?;

    // The node's own identity, on the scale set, bound to nobody.
    let node_identity = cluster.cloud.add_user_assigned_identity("node-agent");
    cluster
        .cloud
        .assign_identity(&cluster.vmss, &node_identity)?;
    // Excepted by one label of the exception, its value in another case.
    cluster.add_exception("node-agents", &[("app", "node-agent"), ("tier", "system")])?;
    cluster.add_pod_with_labels(
        "agent-1",
        &[("app", "Node-Agent"), ("team", "infra")],
        agent_pod.ip(),
    )?;
    // Same labels but the excepted one: not excepted.
    cluster.add_pod_with_labels("plain-1", &[("team", "infra")], plain_pod.ip())?;

    cluster.spawn_nmi(&["--log-format=json"])?;
    cluster.wait_ready().await?;

    // The certificate identity's own token, obtained with a certificate assertion.
    let cert_token = sdk(&cert_pod, &sp.client_id).await?.token()?;
    let claims = cluster.cloud.verify_access_token(&cert_token)?;
    assert_eq!(
        claims.appid, sp.client_id,
        "type 2 token for the certificate SP"
    );

    // A pod that is not excepted asking for the node's identity gets no token, and IMDS is not
    // asked for it.
    let path = format!(
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net&client_id={}",
        node_identity.client_id
    );
    let (status, body, _) = pod_get(&plain_pod, &path, true).await?;
    assert!(status == 404 || status == 400, "{status} {body}");
    assert!(!body.contains("access_token"), "{body}");
    let issued_for_node = |cluster: &Cluster| {
        cluster
            .imds
            .counters()
            .per_identity
            .get(&node_identity.client_id.to_ascii_lowercase())
            .copied()
            .unwrap_or(0)
    };
    assert_eq!(issued_for_node(&cluster), 0);

    // The excepted pod gets the node's identity: the VM's IMDS issued it (its counter for that
    // identity moved), and it is that identity's token.
    let node_token = sdk(&agent_pod, &node_identity.client_id).await?.token()?;
    let claims = cluster.cloud.verify_access_token(&node_token)?;
    assert_eq!(claims.appid, node_identity.client_id);
    assert_eq!(
        issued_for_node(&cluster),
        1,
        "the exception pod's token must come from the VM's IMDS"
    );

    // A second request from the certificate pod is answered from nmi's cache.
    let token_again = sdk(&cert_pod, &sp.client_id).await?.token()?;
    assert_eq!(
        cluster.cloud.verify_access_token(&token_again)?.appid,
        sp.client_id
    );

    // One audit line per issued token: pod, namespace, service account, identity, resource,
    // cache hit or miss, and never the token.
    let lines = wait_for("three audit lines", Duration::from_secs(10), || {
        let lines = audit_lines(&log.0);
        async move { (lines.len() >= 3).then_some(lines) }
    })
    .await?;
    assert_eq!(lines.len(), 3, "{lines:#?}");
    let first = &lines[0];
    assert_eq!(first["pod"], "cert-1", "{first}");
    assert_eq!(first["namespace"], "default");
    assert_eq!(first["service_account"], "default");
    assert_eq!(first["client_id"], sp.client_id.as_str());
    assert_eq!(first["resource"], "https://vault.azure.net");
    assert_eq!(first["cache"], "miss", "{first}");
    assert_eq!(first["exception"], false);
    let exception = &lines[1];
    assert_eq!(exception["pod"], "agent-1", "{exception}");
    assert_eq!(exception["exception"], true);
    assert_eq!(exception["client_id"], node_identity.client_id.as_str());
    assert_eq!(exception["cache"], "miss");
    let again = &lines[2];
    assert_eq!(again["pod"], "cert-1", "{again}");
    assert_eq!(again["cache"], "hit", "{again}");
    let text = std::fs::read_to_string(&log.0)?;
    for token in [&cert_token, &node_token, &token_again] {
        assert!(!text.contains(token.as_str()), "a token reached nmi's log");
    }
    assert!(
        !text.contains(password),
        "the certificate password reached nmi's log"
    );
    Ok(())
}

/// The events nmi published on `pod` in `default` (events.k8s.io/v1), as stored.
fn pod_events(cluster: &Cluster, pod: &str) -> anyhow::Result<Vec<Value>> {
    let list = cluster
        .api
        .get_json("/apis/events.k8s.io/v1/namespaces/default/events")
        .map_err(|e| anyhow::anyhow!("listing events: {}", e.message))?;
    Ok(list["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e["regarding"]["kind"] == "Pod" && e["regarding"]["name"] == pod)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_the_owner_can_fix_become_one_event_per_pod_and_reason() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let node = Arc::clone(&cluster.node);
    let orphan_pod = Arc::new(node.add_pod("orphan")?);
    let nosecret_pod = Arc::new(node.add_pod("nosecret")?);
    let unlabelled_pod = Arc::new(node.add_pod("unlabelled")?);

    // Labelled, but no binding has that selector.
    cluster.add_pod("orphan-1", Some("nothing-binds-this"), orphan_pod.ip())?;
    // A type 1 identity whose Secret does not exist.
    let sp = cluster.cloud.add_service_principal("nosecret");
    let mut identity = AzureIdentity::service_principal(
        "default",
        "nosecret",
        IdentityType::ServicePrincipal,
        cluster.cloud.tenant_id(),
        &sp.client_id,
        "secret-that-does-not-exist",
    );
    identity.spec.ad_endpoint = Some(cluster.entra_url.clone());
    cluster.add_pod("nosecret-1", Some("nosecret"), nosecret_pod.ip())?;
    cluster.bind(&identity, "nosecret", "nosecret-1")?;
    // No label at all: SDKs probe IMDS on their own, nothing for an owner to fix.
    cluster.add_pod("unlabelled-1", None, unlabelled_pod.ip())?;

    cluster.spawn_nmi(&[])?;
    cluster.wait_ready().await?;

    // A flood of failing requests: every one answered at once, one event.
    let path =
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net";
    for _ in 0..100 {
        let (status, body, _) = pod_get(&orphan_pod, path, true).await?;
        assert_eq!(status, 400, "a final refusal: {body}");
    }
    for _ in 0..20 {
        let (status, body, _) = pod_get(&nosecret_pod, path, true).await?;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("secret-that-does-not-exist"), "{body}");
        let (status, _, _) = pod_get(&unlabelled_pod, path, true).await?;
        assert_eq!(status, 400);
    }

    let orphan = wait_for("the orphan pod's event", Duration::from_secs(15), || {
        let events = pod_events(&cluster, "orphan-1").unwrap_or_default();
        async move { (!events.is_empty()).then_some(events) }
    })
    .await?;
    let nosecret = wait_for("the nosecret pod's event", Duration::from_secs(15), || {
        let events = pod_events(&cluster, "nosecret-1").unwrap_or_default();
        async move { (!events.is_empty()).then_some(events) }
    })
    .await?;
    // Every report was decided (and rate-limited) while the requests were answered, so what is
    // stored now is all there will be within the minute.
    let orphan_now = pod_events(&cluster, "orphan-1")?;
    assert_eq!(
        orphan_now.len(),
        1,
        "100 failures, one event: {orphan_now:#?}"
    );
    assert_eq!(orphan.len(), 1);
    let event = &orphan[0];
    assert_eq!(event["reason"], "NoIdentityMatched", "{event}");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["action"], "GetToken");
    assert_eq!(event["reportingController"], "aadpodidentity.k8s.io/nmi");
    assert_eq!(event["regarding"]["namespace"], "default");
    let stored = cluster
        .api
        .get_json("/api/v1/namespaces/default/pods/orphan-1")
        .map_err(|e| anyhow::anyhow!("reading the pod: {}", e.message))?;
    assert_eq!(
        event["regarding"]["uid"], stored["metadata"]["uid"],
        "the event names the pod's uid, so kubectl describe pod finds it"
    );
    assert!(
        event["note"]
            .as_str()
            .unwrap_or_default()
            .contains("default/orphan-1"),
        "{event}"
    );
    assert_eq!(nosecret.len(), 1, "{nosecret:#?}");
    assert_eq!(nosecret[0]["reason"], "IdentityCredentialInvalid");
    assert!(
        nosecret[0]["note"]
            .as_str()
            .unwrap_or_default()
            .contains("secret-that-does-not-exist"),
        "{}",
        nosecret[0]
    );
    assert!(pod_events(&cluster, "unlabelled-1")?.is_empty());
    Ok(())
}
