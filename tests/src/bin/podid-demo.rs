//! `make demo`: the local demo, narrated. Azure (Entra, ARM, the VM's IMDS) is simulated, the
//! node and the pod are network namespaces, and the client is the official Python
//! `azure-identity` SDK. Needs root. Leaves nothing behind.
//!
//! Today it shows the ground the product stands on: a pod asks the instance metadata address
//! for a token, is refused while the identity is not on its scale set, and gets one once the
//! identity is assigned through ARM. The `nmi` interception joins it with issue 3.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use podid_e2e::{ArmClient, SdkOutcome, SdkSelector, azure, netns, sdk_get_token};

const SCOPE: &str = "https://vault.azure.net/.default";

fn step(text: &str) {
    println!("\n==> {text}");
}

async fn ask(pod: &Arc<netns::SimPod>, client_id: &str) -> anyhow::Result<SdkOutcome> {
    let pod = pod.clone();
    let client_id = client_id.to_owned();
    tokio::task::spawn_blocking(move || {
        sdk_get_token(
            &pod,
            SCOPE,
            SdkSelector::ClientId(&client_id),
            Duration::from_secs(60),
        )
    })
    .await?
}

async fn run() -> anyhow::Result<()> {
    step("Simulated Azure: a tenant, a scale set, a user-assigned identity 'web'");
    let cloud = azure::Cloud::new()?;
    let web = cloud.add_user_assigned_identity("web");
    let vmss = cloud.add_vmss(
        cloud.subscription_id(),
        cloud.resource_group(),
        "aks-nodepool1-vmss",
    );
    let entra = azure::EntraHandle::start(&cloud)?;
    let arm = azure::ArmHandle::start(&cloud)?;
    let operator = cloud.add_service_principal("operator");
    let secret = cloud.add_client_secret(&operator.client_id)?;
    println!("    tenant      {}", cloud.tenant_id());
    println!(
        "    identity    {} (client id {})",
        web.resource_id, web.client_id
    );
    println!("    Entra       {}", entra.url());
    println!("    ARM         {}", arm.url());

    step(
        "A node (network namespace) with the VM's IMDS on 169.254.169.254:80, and a pod behind it",
    );
    let node = netns::SimNode::create()?;
    node.add_local_address("169.254.169.254/32")?;
    let listener = node.bind_tcp("169.254.169.254:80".parse::<SocketAddr>()?)?;
    let imds = azure::serve_imds(&cloud, &vmss.instance("0"), listener)?;
    let pod = Arc::new(node.add_pod("web")?);
    println!(
        "    node {} ({}), pod {} ({})",
        node.name(),
        node.ip(),
        pod.name(),
        pod.ip()
    );

    step("The pod runs azure-identity's ManagedIdentityCredential for 'web' (not assigned yet)");
    match ask(&pod, &web.client_id).await? {
        SdkOutcome::Error { class, message } => {
            println!(
                "    refused, as it must be: {class}: {}",
                first_line(&message)
            );
        }
        SdkOutcome::Token { .. } => anyhow::bail!("an unassigned identity got a token"),
    }

    step(
        "The operator assigns 'web' to the scale set through ARM (PATCH + long-running operation)",
    );
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
    println!(
        "    ARM PATCHes on the scale set: {}",
        arm.patch_count(&vmss)
    );

    step("The pod asks again");
    let started = Instant::now();
    let token = ask(&pod, &web.client_id).await?.token()?;
    let claims = cloud.verify_access_token(&token)?;
    println!(
        "    token in {} ms: aud={} appid={} oid={} (signature verified by the simulated Entra; token not shown)",
        started.elapsed().as_millis(),
        claims.aud,
        claims.appid,
        claims.oid
    );
    anyhow::ensure!(
        claims.appid == web.client_id,
        "token for the wrong identity"
    );
    let counters = imds.counters();
    println!(
        "    IMDS: {} token requests, {} tokens issued, {} throttled",
        counters.token_requests, counters.tokens_issued, counters.throttled
    );

    step("Done; dropping the namespaces");
    drop(pod);
    drop(node);
    Ok(())
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

fn main() -> ExitCode {
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
