//! `make demo`: the local demo. Azure (Entra, the VM's IMDS) is simulated, the cluster is the fake
//! API server, the node and its three pods are network namespaces with real iptables, `nmi` is
//! the real binary, and each pod asks for a token with the official Python `azure-identity` SDK.
//! Needs root. Leaves nothing behind (namespaces, links and rules die with the node namespace).
//!
//! `mic` (the real binary, on the host like its Deployment) assigns the user-assigned identity to
//! the node's scale set through the simulated ARM and writes the AzureAssignedIdentity objects.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use podid_api::{AzureIdentity, AzureIdentityBinding, IdentityType};
use podid_e2e::cluster::{Cluster, pod_get, sdk_for};
use podid_e2e::{SdkOutcome, netns};
use serde_json::json;

fn step(text: &str) {
    println!("\n==> {text}");
}

struct Row {
    pod: String,
    asked: String,
    result: String,
}

async fn ask(
    cluster: &Cluster,
    pod: &Arc<netns::SimPod>,
    name: &str,
    client_id: &str,
    label: &str,
) -> anyhow::Result<Row> {
    let started = Instant::now();
    let result = match sdk_for(pod, client_id).await? {
        SdkOutcome::Token { token, expires_on } => {
            let claims = cluster.cloud.verify_access_token(&token)?;
            format!(
                "token for client {} (expires_on {expires_on}) in {} ms",
                claims.appid,
                started.elapsed().as_millis()
            )
        }
        SdkOutcome::Error { class, message } => {
            format!(
                "refused: {class}: {}",
                message.lines().next().unwrap_or_default()
            )
        }
    };
    Ok(Row {
        pod: name.to_owned(),
        asked: label.to_owned(),
        result,
    })
}

async fn run() -> anyhow::Result<()> {
    step(
        "Simulated cluster and Azure: one node (network namespace), the fake API server, Entra, the VM's IMDS",
    );
    let mut cluster = Cluster::start().await?;
    let log = podid_e2e::workspace_root().join("target/podid-demo.log");
    let _ = std::fs::remove_file(&log);
    cluster.child_log = Some(log.clone());
    println!("    nmi and mic log to {}", log.display());
    let node = Arc::clone(&cluster.node);
    println!(
        "    node {} ({}), API server {}, Entra {}",
        node.name(),
        node.ip(),
        cluster.api.url(),
        cluster.entra_url
    );

    step(
        "Three pods: 'web' (user-assigned identity), 'sp' (service principal), 'lonely' (no binding)",
    );
    let web_pod = Arc::new(node.add_pod("web")?);
    let sp_pod = Arc::new(node.add_pod("sp")?);
    let lonely_pod = Arc::new(node.add_pod("lonely")?);

    let web = cluster.cloud.add_user_assigned_identity("web");
    let web_identity =
        AzureIdentity::user_assigned("default", "web", &web.resource_id, &web.client_id);
    cluster.add_pod("web-1", Some("web"), web_pod.ip())?;
    define(&cluster, &web_identity, "web")?;

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
    define(&cluster, &sp_identity, "sp")?;
    cluster.add_pod("lonely-1", None, lonely_pod.ip())?;
    for (pod, sim) in [
        ("web-1", &web_pod),
        ("sp-1", &sp_pod),
        ("lonely-1", &lonely_pod),
    ] {
        println!("    {pod:<9} {}", sim.ip());
    }

    step(
        "Start the real mic (host) and nmi (inside the node; it installs the aad-metadata interception)",
    );
    cluster.spawn_mic()?;
    cluster.spawn_nmi(&[])?;
    cluster.wait_ready().await?;
    for line in cluster.chain()? {
        println!("    {line}");
    }

    step("Each pod runs azure-identity's ManagedIdentityCredential against 169.254.169.254");
    let rows = vec![
        ask(&cluster, &web_pod, "web-1", &web.client_id, "web (type 0)").await?,
        ask(&cluster, &sp_pod, "sp-1", &sp.client_id, "sp (type 1)").await?,
        ask(
            &cluster,
            &web_pod,
            "web-1",
            &sp.client_id,
            "sp (not its own)",
        )
        .await?,
    ];
    println!();
    println!("    {:<9} {:<18} result", "pod", "identity asked");
    for row in &rows {
        println!("    {:<9} {:<18} {}", row.pod, row.asked, row.result);
    }
    let path =
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net";
    let (status, body, elapsed) = pod_get(&lonely_pod, path, true).await?;
    println!(
        "    {:<9} {:<18} HTTP {status} in {:.1} ms: {}",
        "lonely-1",
        "(none)",
        elapsed.as_secs_f64() * 1000.0,
        body.trim()
    );
    println!(
        "\n    ARM: {} PATCH(es) on the scale set by mic; identities on it now: {}",
        cluster.arm.patch_count(&cluster.vmss),
        cluster.cloud.assigned_identities(&cluster.vmss)?.len()
    );
    let counters = cluster.imds.counters();
    println!(
        "\n    the VM's IMDS saw {} token requests ({} throttled)",
        counters.token_requests, counters.throttled
    );
    anyhow::ensure!(
        rows[0].result.starts_with("token") && rows[1].result.starts_with("token"),
        "a pod did not get its own identity"
    );
    anyhow::ensure!(
        rows[2].result.starts_with("refused"),
        "a pod got another pod's identity"
    );

    step("Done; stopping mic and nmi and removing the namespaces");
    for child in [cluster.nmi.take(), cluster.mic.take()]
        .into_iter()
        .flatten()
    {
        let mut child = child;
        child.kill();
    }
    drop(cluster);
    Ok(())
}

/// An identity and its binding, as a user applies them; mic does the rest.
fn define(cluster: &Cluster, identity: &AzureIdentity, selector: &str) -> anyhow::Result<()> {
    let name = identity.metadata.name.clone().unwrap_or_default();
    cluster.create(
        "/apis/aadpodidentity.k8s.io/v1/namespaces/default/azureidentities",
        serde_json::to_value(identity)?,
    )?;
    let binding =
        AzureIdentityBinding::for_selector("default", &format!("{name}-binding"), &name, selector);
    cluster.create(
        "/apis/aadpodidentity.k8s.io/v1/namespaces/default/azureidentitybindings",
        serde_json::to_value(&binding)?,
    )
}

fn main() -> ExitCode {
    if !nix_is_root() {
        eprintln!(
            "podid-demo: needs root (network namespaces and iptables): run `sudo tests/scripts/run.sh demo`"
        );
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("podid-demo: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => {
            println!("\npodid-demo: OK");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\npodid-demo: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}
