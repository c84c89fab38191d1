//! nmi end to end: the real `nmi` binary inside a simulated node (network namespace) with real
//! iptables interception of 169.254.169.254:80, the fake API server holding the cluster's
//! objects, the Azure simulator behind it (the VM's IMDS inside the node, Entra on the host), and
//! the official SDKs (Python `azure-identity`, MSAL for Python, JavaScript `@azure/identity`,
//! Rust `azure_identity`) asking for tokens from inside network-namespace pods. Needs root.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use podid_api::{AzureAssignedIdentity, AzureIdentity, IdentityType};
use podid_e2e::cluster::{
    Cluster, LogFile, NODE, log_messages, pod_get, sdk_for as sdk, sdk_run_in,
};
use podid_e2e::{Sdk, SdkCredential, SdkOutcome, SdkRun, wait_for};
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

/// What each SDK is asked to do in a pod: its managed identity credential, and its
/// `DefaultAzureCredential` where it has one.
fn sdk_cases() -> Vec<(Sdk, SdkCredential)> {
    let mut cases = Vec::new();
    for sdk in Sdk::ALL {
        cases.push((sdk, SdkCredential::ManagedIdentity));
        if sdk.text_after_managed_identity().is_some() {
            cases.push((sdk, SdkCredential::DefaultChain));
        }
    }
    cases
}

/// `sdk` asking with `credential`, for the output.
fn case_name(sdk: Sdk, credential: SdkCredential) -> String {
    match credential {
        SdkCredential::ManagedIdentity if sdk == Sdk::PythonMsal => {
            format!("{} ManagedIdentityClient", sdk.name())
        }
        SdkCredential::ManagedIdentity => format!("{} ManagedIdentityCredential", sdk.name()),
        SdkCredential::DefaultChain => format!("{} DefaultAzureCredential", sdk.name()),
    }
}

/// Runs every case of [`sdk_cases`] in `pod`, each bounded by `cap`, and returns them in
/// order: at the same time when `together` (slow runs), else one after the other (fast runs
/// whose timings should not include the test's own other clients starting).
async fn run_all(
    pod: &Arc<podid_e2e::netns::SimPod>,
    client_id: Option<&str>,
    cap: Duration,
    together: bool,
) -> anyhow::Result<Vec<(Sdk, SdkCredential, SdkRun)>> {
    let mut runs = Vec::new();
    let mut done = Vec::new();
    for (sdk, credential) in sdk_cases() {
        let pod = Arc::clone(pod);
        let client_id = client_id.map(str::to_owned);
        let run = tokio::spawn(async move {
            sdk_run_in(&pod, sdk, client_id.as_deref(), credential, cap).await
        });
        if together {
            runs.push((sdk, credential, run));
        } else {
            done.push((sdk, credential, run.await??));
        }
    }
    for (sdk, credential, run) in runs {
        done.push((sdk, credential, run.await??));
    }
    Ok(done)
}

/// The seconds of a run for the output: `≥ cap` when it was still running at the cap.
fn shown(run: &SdkRun) -> String {
    match run.outcome {
        Some(_) => format!("{:.2} s", run.seconds),
        None => format!("≥ {:.0} s (cap)", run.seconds),
    }
}

/// Final refusals (400 `invalid_request`, nmi's default) end every official SDK's managed
/// identity attempt at once: its managed identity credential in a pod without identity, and
/// when asking for a client id that is not the pod's, fails with nmi's reason; its
/// `DefaultAzureCredential` moves on past managed identity to its next credentials (the issue's
/// target: in under 1 s). Prints the time each took to its final answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_refusals_end_every_sdks_managed_identity_attempt_at_once() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let web = cluster.cloud.add_user_assigned_identity("web");
    cluster.cloud.assign_identity(&cluster.vmss, &web)?;
    let other = cluster.cloud.add_user_assigned_identity("other");
    cluster.cloud.assign_identity(&cluster.vmss, &other)?;
    let web_pod = Arc::new(cluster.node.add_pod("web")?);
    let lonely_pod = Arc::new(cluster.node.add_pod("lonely")?);
    let identity = AzureIdentity::user_assigned("default", "web", &web.resource_id, &web.client_id);
    cluster.add_pod("web-1", Some("web"), web_pod.ip())?;
    cluster.bind(&identity, "web", "web-1")?;
    cluster.add_pod("lonely-1", None, lonely_pod.ip())?;
    cluster.spawn_nmi(&[])?;
    cluster.wait_ready().await?;
    // Generous: a final answer takes well under a second; this only bounds a broken run.
    let cap = Duration::from_secs(60);

    // A pod without identity; then the bound pod asking for an identity on the node that is
    // not its own (the node's IMDS would give it).
    let lonely = run_all(&lonely_pod, None, cap, false).await?;
    let foreign = run_all(&web_pod, Some(&other.client_id), cap, false).await?;
    for (what, runs, reason) in [
        (
            "no identity",
            &lonely,
            "no azure identity is bound to pod default/lonely-1",
        ),
        (
            "another identity",
            &foreign,
            "no azure identity found for request clientID",
        ),
    ] {
        for (sdk, credential, run) in runs {
            let case = case_name(*sdk, *credential);
            println!(
                "final refusal ({what}): {case}: final answer after {}",
                shown(run)
            );
            let Some(SdkOutcome::Error { class, message }) = &run.outcome else {
                panic!("{case} ({what}): no final error: {:?}", run.outcome);
            };
            // nmi's refusal reached the caller: the SDK failed on it, not on a timeout or an
            // unreachable endpoint.
            assert!(
                message.contains(sdk.refusal_text(reason)),
                "{case} ({what}) did not fail on nmi's refusal: {class}: {message}"
            );
            if *credential == SdkCredential::DefaultChain {
                let next = sdk.text_after_managed_identity().unwrap_or_default();
                assert!(
                    message.contains("ManagedIdentityCredential") && message.contains(next),
                    "{case} ({what}) did not move on past managed identity ({next}): {message}"
                );
                // The target. The client times the get_token call only (not the
                // interpreter's start), and the cases run one at a time: a final refusal
                // takes a few tenths of a second of it, a retried one at least the SDK's
                // first back-off (0.8 s, then 1.6 s more).
                assert!(
                    run.seconds < 1.0,
                    "{case} ({what}) took {:.2} s to reach its next credential",
                    run.seconds
                );
            }
        }
    }
    assert_eq!(
        cluster.imds.counters().tokens_issued,
        0,
        "no refused pod got a token from the node's IMDS"
    );
    Ok(())
}

/// How long a run under upstream's 404 may go on before it is killed and reported as
/// `≥ cap`: `PODID_SDK_404_CAP_SECS` seconds, default 10 (the suite stays fast; set it above
/// the SDKs' retry schedules, e.g. 200, to measure them whole).
fn upstream_cap() -> Duration {
    let seconds = std::env::var("PODID_SDK_404_CAP_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(10);
    Duration::from_secs(seconds)
}

/// `--not-found-for-final-refusals` restores upstream's 404 for a pod without identity, and
/// every SDK's time to a final answer under it is measured (bounded: see [`upstream_cap`]).
/// The SDKs treat 404 as "identity still being assigned" and retry; the figures are the
/// "before" column of docs/compatibility.md's final-refusals table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_not_found_for_final_refusals_measured_with_every_sdk() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let lonely_pod = Arc::new(cluster.node.add_pod("lonely")?);
    cluster.add_pod("lonely-1", None, lonely_pod.ip())?;
    cluster.spawn_nmi(&["--not-found-for-final-refusals"])?;
    cluster.wait_ready().await?;
    let path =
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net";
    let (status, body, _) = pod_get(&lonely_pod, path, true).await?;
    assert_eq!(status, 404, "upstream's status for a final refusal: {body}");

    let cap = upstream_cap();
    for (sdk, credential, run) in run_all(&lonely_pod, None, cap, true).await? {
        let case = case_name(sdk, credential);
        println!(
            "upstream 404 (no identity): {case}: final answer after {}",
            shown(&run)
        );
        assert!(
            !matches!(run.outcome, Some(SdkOutcome::Token { .. })),
            "{case}: a pod without identity got a token"
        );
    }
    assert_eq!(cluster.imds.counters().tokens_issued, 0);
    Ok(())
}

/// A pod whose identity is still being assigned (its AzureAssignedIdentity is `Created`) is
/// not refused for good: nmi holds the request, and every SDK gets the pod's token once the
/// assignment lands (`Assigned`), with its managed identity credential and with its
/// `DefaultAzureCredential`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sdk_gets_its_token_once_the_assignment_lands() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let log = LogFile::for_test(&cluster, "nmi-sdk-pending");
    cluster.child_log = Some(log.0.clone());
    // nmi's debug line for a held request tells the test when each SDK is waiting.
    cluster.nmi_log_filter = Some("info,podid_nmi::server=debug".to_owned());
    let web = cluster.cloud.add_user_assigned_identity("web");
    cluster.cloud.assign_identity(&cluster.vmss, &web)?;
    let identity = AzureIdentity::user_assigned("default", "web", &web.resource_id, &web.client_id);
    let binding = cluster.add_identity_and_binding(&identity, "web")?;
    cluster.spawn_nmi(&["--log-format=json"])?;
    cluster.wait_ready().await?;

    // One pod per case, each with its assignment in progress (what MIC writes first).
    let mut waiting = Vec::new();
    for (index, (sdk, credential)) in sdk_cases().into_iter().enumerate() {
        let name = format!("web-{index}");
        let pod = Arc::new(cluster.node.add_pod(&name)?);
        cluster.add_pod(&name, Some("web"), pod.ip())?;
        let assigned = AzureAssignedIdentity::for_pod(
            "default",
            &name,
            "default",
            NODE,
            identity.clone(),
            binding.clone(),
        );
        let object = serde_json::to_value(&assigned)?;
        let object_name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        cluster.create(
            "/apis/aadpodidentity.k8s.io/v1/namespaces/default/azureassignedidentities",
            object,
        )?;
        let client_id = web.client_id.clone();
        let sdk_pod = Arc::clone(&pod);
        let run = tokio::spawn(async move {
            sdk_run_in(
                &sdk_pod,
                sdk,
                Some(&client_id),
                credential,
                Duration::from_secs(90),
            )
            .await
        });
        waiting.push((sdk, credential, name, object_name, run));
    }

    // Every SDK's request is held by nmi while the assignment is Created...
    for (sdk, credential, name, _, _) in &waiting {
        wait_for(
            &format!("nmi to hold {}'s request", case_name(*sdk, *credential)),
            Duration::from_secs(60),
            || async {
                log_messages(&log.0, "identity assignment pending, waiting")
                    .iter()
                    .any(|fields| fields["pod"] == name.as_str())
                    .then_some(())
            },
        )
        .await?;
    }
    // ...and the assignment lands.
    for (_, _, _, object_name, _) in &waiting {
        cluster
            .api
            .merge_patch_json(
                &format!(
                    "/apis/aadpodidentity.k8s.io/v1/namespaces/default/azureassignedidentities/{object_name}"
                ),
                json!({"status": {"status": "Assigned"}}),
            )
            .map_err(|e| anyhow::anyhow!("marking {object_name} Assigned: {}", e.message))?;
    }
    for (sdk, credential, _, _, run) in waiting {
        let case = case_name(sdk, credential);
        let run = run.await??;
        println!(
            "assignment in progress: {case}: token after {:.2} s",
            run.seconds
        );
        let token = run
            .outcome
            .with_context(|| format!("{case}: no answer"))?
            .token()
            .with_context(|| format!("{case} got no token once the assignment landed"))?;
        assert_eq!(
            cluster.cloud.verify_access_token(&token)?.appid,
            web.client_id,
            "{case}: the pod's identity"
        );
    }
    Ok(())
}
