//! A node is closed from its first second: the real `nmi` in a simulated node installs its
//! interception before anything that can fail, stays up and closed when `route_localnet` cannot
//! be set or its port is held, guards the `route_localnet` it sets (CVE-2020-8558) and undoes
//! only its own changes on uninstall, removes the start-up taint only once it is closed and
//! synced, and never proxies case variants of the token path. Needs root.

use std::sync::Arc;
use std::time::Duration;

use podid_api::AzureIdentity;
use podid_e2e::cluster::{Cluster, NODE, pod_get, sdk_for as sdk};
use podid_e2e::kube::{FaultKind, FaultMatch};
use podid_e2e::wait_for;
use serde_json::{Value, json};

const TOKEN_PATH: &str =
    "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net";
const ROUTE_LOCALNET: &str = "net.ipv4.conf.all.route_localnet";

/// A cluster with one pod `web-1` bound to a user-assigned identity on the node's scale set;
/// returns the pod's namespace and the identity's client id.
async fn with_bound_pod() -> anyhow::Result<(Cluster, Arc<podid_e2e::netns::SimPod>, String)> {
    let cluster = Cluster::start().await?;
    let pod = Arc::new(cluster.node.add_pod("web")?);
    let web = cluster.cloud.add_user_assigned_identity("web");
    cluster.cloud.assign_identity(&cluster.vmss, &web)?;
    let identity = AzureIdentity::user_assigned("default", "web", &web.resource_id, &web.client_id);
    cluster.add_pod("web-1", Some("web"), pod.ip())?;
    cluster.bind(&identity, "web", "web-1")?;
    Ok((cluster, pod, web.client_id))
}

/// Waits until `/readyz` answers 503 with a body containing `needle`; returns the body.
async fn wait_unready(cluster: &mut Cluster, needle: &str) -> anyhow::Result<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(nmi) = cluster.nmi.as_mut() {
            nmi.check_running()?;
        }
        if let Ok((503, body)) = cluster.probe("/readyz").await
            && body.contains(needle)
        {
            return Ok(body);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "/readyz never said {needle:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn filter(cluster: &Cluster, chain: &str) -> anyhow::Result<Vec<String>> {
    Ok(cluster
        .node
        .iptables(&["-t", "filter", "-S", chain])?
        .lines()
        .map(str::to_owned)
        .collect())
}

fn has_chain(cluster: &Cluster, table: &str, chain: &str) -> bool {
    cluster.node.iptables(&["-t", table, "-S", chain]).is_ok()
}

/// Item 5: on a node whose `/proc/sys` is read-only (an unprivileged container, a node without
/// kube-proxy), nmi stays up with the chain in place, a pod's request never reaches the VM's
/// IMDS, `/readyz` is 503 with the reason, the Node gets an event and the metric says so. Once
/// the sysctl is set on the node, nmi turns ready without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_localnet_that_cannot_be_set_keeps_nmi_up_and_the_node_closed() -> anyhow::Result<()>
{
    let (mut cluster, pod, client_id) = with_bound_pod().await?;
    assert_eq!(cluster.node.read_sysctl(ROUTE_LOCALNET)?.trim(), "0");
    cluster.spawn_nmi_read_only_proc_sys(&[])?;
    let body = wait_unready(&mut cluster, "route_localnet").await?;
    assert!(body.contains("Read-only file system"), "{body}");
    assert_eq!(cluster.chain()?.len(), 3, "the interception is installed");
    assert!(
        cluster
            .node
            .iptables(&["-t", "nat", "-S", "PREROUTING"])?
            .contains("-A PREROUTING -j aad-metadata"),
    );
    assert!(
        !has_chain(&cluster, "filter", "aad-metadata-localnet"),
        "nmi changed nothing, so it added no guard"
    );

    // Closed: the pod's request is DNAT-ed and dropped, it never reaches the VM's IMDS.
    let before = cluster.imds.counters().requests;
    let answer = pod_get(&pod, TOKEN_PATH, true).await;
    assert!(answer.is_err(), "the pod got an answer: {answer:?}");
    assert_eq!(cluster.imds.counters().requests, before);

    let events = wait_for("the Node event", Duration::from_secs(10), || async {
        cluster
            .node_events()
            .ok()
            .filter(|e| e.iter().any(|e| e["reason"] == "RouteLocalnetUnavailable"))
    })
    .await?;
    let event = events
        .iter()
        .find(|e| e["reason"] == "RouteLocalnetUnavailable")
        .expect("found above");
    assert_eq!(event["type"], "Warning");
    assert!(
        event["note"]
            .as_str()
            .is_some_and(|n| n.contains("route_localnet")),
        "{event}"
    );
    let metrics = cluster.metrics().await?;
    assert!(
        metrics.contains("podid_nmi_not_ready{reason=\"route_localnet\"} 1"),
        "{metrics}"
    );
    cluster.nmi.as_mut().expect("spawned").check_running()?;

    // The operator sets the sysctl on the node: the next reconcile pass (1 s) turns nmi ready.
    cluster.node.sysctl(ROUTE_LOCALNET, "1")?;
    cluster.wait_ready().await?;
    let token = sdk(&pod, &client_id).await?.token()?;
    assert_eq!(cluster.cloud.verify_access_token(&token)?.appid, client_id);
    assert!(
        cluster
            .metrics()
            .await?
            .contains("podid_nmi_not_ready{reason=\"route_localnet\"} 0")
    );
    Ok(())
}

/// Item 5: when nmi turns `route_localnet` on itself it first installs the CVE-2020-8558 guard
/// (unless an equivalent rule exists, then it adds none), and `nmi uninstall-interception`
/// removes only what nmi added and restores the sysctl only if nmi changed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nmi_guards_the_route_localnet_it_sets_and_uninstall_restores_it() -> anyhow::Result<()> {
    let (mut cluster, _pod, _) = with_bound_pod().await?;
    let guard_of = |rules: &[String]| {
        rules
            .iter()
            .filter(|r| {
                r.contains("! -s 127.0.0.0/8 -d 127.0.0.0/8")
                    && r.contains("! --ctstate RELATED,ESTABLISHED,DNAT -j DROP")
            })
            .count()
    };

    // 1. route_localnet 0, no guard on the node: nmi adds its guard, then sets the sysctl.
    assert_eq!(cluster.node.read_sysctl(ROUTE_LOCALNET)?.trim(), "0");
    cluster.spawn_nmi(&[])?;
    cluster.wait_ready().await?;
    assert_eq!(cluster.node.read_sysctl(ROUTE_LOCALNET)?.trim(), "1");
    let input = filter(&cluster, "INPUT")?;
    assert_eq!(
        input.get(1).map(String::as_str),
        Some("-A INPUT -j aad-metadata-localnet"),
        "{input:?}"
    );
    let ours = filter(&cluster, "aad-metadata-localnet")?;
    assert_eq!(guard_of(&ours), 1, "{ours:?}");
    if let Some(mut nmi) = cluster.nmi.take() {
        nmi.kill();
    }
    // A restart finds the sysctl at 1 and still knows nmi set it: nothing is duplicated.
    cluster.spawn_nmi(&[])?;
    cluster.wait_ready().await?;
    assert_eq!(filter(&cluster, "aad-metadata-localnet")?, ours);
    assert_eq!(filter(&cluster, "INPUT")?, input);
    if let Some(mut nmi) = cluster.nmi.take() {
        nmi.kill();
    }
    let out = cluster.uninstall_interception()?;
    assert!(
        out.contains("restored net.ipv4.conf.all.route_localnet=0"),
        "{out}"
    );
    assert_eq!(cluster.node.read_sysctl(ROUTE_LOCALNET)?.trim(), "0");
    assert!(!has_chain(&cluster, "nat", "aad-metadata"));
    assert!(!has_chain(&cluster, "filter", "aad-metadata-localnet"));
    assert_eq!(
        filter(&cluster, "INPUT")?,
        vec!["-P INPUT ACCEPT".to_owned()]
    );

    // 2. An equivalent guard already exists (kube-proxy's KUBE-FIREWALL): nmi adds none, and
    // uninstall leaves kube-proxy's rule alone.
    let node = &cluster.node;
    node.iptables(&["-t", "filter", "-N", "KUBE-FIREWALL"])?;
    node.iptables(&[
        "-t",
        "filter",
        "-A",
        "KUBE-FIREWALL",
        "!",
        "-s",
        "127.0.0.0/8",
        "-d",
        "127.0.0.0/8",
        "-m",
        "comment",
        "--comment",
        "block incoming localnet connections",
        "-m",
        "conntrack",
        "!",
        "--ctstate",
        "RELATED,ESTABLISHED,DNAT",
        "-j",
        "DROP",
    ])?;
    node.iptables(&["-t", "filter", "-A", "INPUT", "-j", "KUBE-FIREWALL"])?;
    let kube_proxy = filter(&cluster, "KUBE-FIREWALL")?;
    cluster.spawn_nmi(&[])?;
    cluster.wait_ready().await?;
    assert_eq!(cluster.node.read_sysctl(ROUTE_LOCALNET)?.trim(), "1");
    let ours = filter(&cluster, "aad-metadata-localnet")?;
    assert_eq!(guard_of(&ours), 0, "not duplicated: {ours:?}");
    if let Some(mut nmi) = cluster.nmi.take() {
        nmi.kill();
    }
    cluster.uninstall_interception()?;
    assert_eq!(cluster.node.read_sysctl(ROUTE_LOCALNET)?.trim(), "0");
    assert_eq!(filter(&cluster, "KUBE-FIREWALL")?, kube_proxy);
    assert_eq!(
        filter(&cluster, "INPUT")?,
        vec![
            "-P INPUT ACCEPT".to_owned(),
            "-A INPUT -j KUBE-FIREWALL".to_owned()
        ]
    );

    // 3. The sysctl was already 1 (kube-proxy set it): nmi adds nothing and uninstall keeps it.
    cluster.node.sysctl(ROUTE_LOCALNET, "1")?;
    cluster.spawn_nmi(&[])?;
    cluster.wait_ready().await?;
    assert!(!has_chain(&cluster, "filter", "aad-metadata-localnet"));
    if let Some(mut nmi) = cluster.nmi.take() {
        nmi.kill();
    }
    let out = cluster.uninstall_interception()?;
    assert!(!out.contains("restored"), "{out}");
    assert_eq!(cluster.node.read_sysctl(ROUTE_LOCALNET)?.trim(), "1");
    Ok(())
}

/// Item 5: with `--startup-taint`, the taint goes only once the interception is installed and
/// the caches are synced, with a patch that leaves every other taint in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_taint_is_removed_only_once_the_node_is_closed_and_synced() -> anyhow::Result<()> {
    const KEY: &str = "podid.io/nmi-not-ready";
    let (mut cluster, pod, client_id) = with_bound_pod().await?;
    let node_path = format!("/api/v1/nodes/{NODE}");
    let taints = json!([
        {"key": "example.com/dedicated", "value": "gpu", "effect": "NoSchedule"},
        {"key": KEY, "effect": "NoSchedule"},
        {"key": KEY, "effect": "NoExecute"},
    ]);
    cluster
        .api
        .merge_patch_json(&node_path, json!({"spec": {"taints": taints}}))
        .map_err(|e| anyhow::anyhow!("tainting the node: {}", e.message))?;
    let taints_now = |cluster: &Cluster| -> anyhow::Result<Value> {
        let node = cluster
            .api
            .get_json(&node_path)
            .map_err(|e| anyhow::anyhow!("reading the node: {}", e.message))?;
        Ok(node["spec"]["taints"].clone())
    };

    // Hold the identity caches unsynced: every list of bindings fails for now.
    let faults = cluster.api.faults();
    let bindings = FaultMatch::path("azureidentitybindings").with_verb("list");
    faults.fail_next(usize::MAX, FaultKind::InternalError, bindings);
    cluster.spawn_nmi(&[&format!("--startup-taint={KEY}")])?;
    wait_unready(&mut cluster, "caches").await?;
    wait_for(
        "nmi to fail listing bindings twice",
        Duration::from_secs(20),
        || async { (faults.count("list", "azureidentitybindings") >= 2).then_some(()) },
    )
    .await?;
    assert_eq!(cluster.chain()?.len(), 3, "closed before anything else");
    assert_eq!(taints_now(&cluster)?, taints, "unsynced: the taint stays");

    // A taint added meanwhile by someone else must survive nmi's patch.
    let mut with_added = taints.as_array().cloned().unwrap_or_default();
    with_added.insert(
        0,
        json!({"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}),
    );
    cluster
        .api
        .merge_patch_json(&node_path, json!({"spec": {"taints": with_added}}))
        .map_err(|e| anyhow::anyhow!("adding a taint: {}", e.message))?;

    faults.clear_failures();
    let remaining = wait_for(
        "the start-up taint to go",
        Duration::from_secs(30),
        || async {
            taints_now(&cluster).ok().filter(|t| {
                !t.as_array().is_some_and(|t| {
                    t.iter()
                        .any(|t| t["key"] == KEY && t["effect"] == "NoSchedule")
                })
            })
        },
    )
    .await?;
    let (status, body) = cluster.probe("/readyz").await?;
    assert_eq!(status, 200, "{body}");
    let mut expected = with_added;
    expected.retain(|t| !(t["key"] == KEY && t["effect"] == "NoSchedule"));
    assert_eq!(
        remaining,
        Value::Array(expected),
        "only that one taint went"
    );
    let token = sdk(&pod, &client_id).await?.token()?;
    assert_eq!(cluster.cloud.verify_access_token(&token)?.appid, client_id);
    Ok(())
}

/// The first step of an in-place upgrade: a held IMDS port keeps the chain installed (pods'
/// requests never reach the VM's IMDS), `/readyz` says why, and nmi takes the port once free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_imds_port_keeps_the_node_closed_until_nmi_can_bind_it() -> anyhow::Result<()> {
    let (mut cluster, pod, client_id) = with_bound_pod().await?;
    let squatter = cluster.node.bind_tcp("127.0.0.1:2579".parse()?)?;
    cluster.spawn_nmi(&[])?;
    let body = wait_unready(&mut cluster, "imds_listener").await?;
    assert!(body.contains("127.0.0.1:2579"), "{body}");
    assert_eq!(cluster.chain()?.len(), 3);
    assert!(
        cluster
            .metrics()
            .await?
            .contains("podid_nmi_not_ready{reason=\"imds_listener\"} 1")
    );
    let before = cluster.imds.counters().requests;
    let answer = pod_get(&pod, TOKEN_PATH, true).await;
    assert!(answer.is_err(), "the squatter never answers: {answer:?}");
    assert_eq!(cluster.imds.counters().requests, before, "closed meanwhile");
    drop(squatter);
    cluster.wait_ready().await?;
    let token = sdk(&pod, &client_id).await?.token()?;
    assert_eq!(cluster.cloud.verify_access_token(&token)?.appid, client_id);
    assert_eq!(
        cluster.imds.counters().requests,
        before + 1,
        "one IMDS call: nmi's own for the token"
    );
    Ok(())
}

/// Item 9: case variants of the token path are answered 400 by nmi and never reach the VM's
/// IMDS (the simulator counts every request it receives).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_path_case_variants_never_reach_the_vm_imds() -> anyhow::Result<()> {
    let (mut cluster, pod, _) = with_bound_pod().await?;
    cluster.spawn_nmi(&[])?;
    cluster.wait_ready().await?;
    let before = cluster.imds.counters().requests;
    for path in [
        "/metadata/Identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net",
        "/metadata/identity/OAUTH2/token?api-version=2018-02-01&resource=https://vault.azure.net",
        "/metadata/identity/oauth2/TOKEN?resource=https://vault.azure.net",
        "/METADATA/IDENTITY/OAUTH2/TOKEN/",
    ] {
        for header in [true, false] {
            let (status, body, _) = pod_get(&pod, path, header).await?;
            assert_eq!(status, 400, "{path}: {body}");
            let body: Value = serde_json::from_str(&body)?;
            assert_eq!(body["error"], "invalid_request", "{path}");
        }
    }
    assert_eq!(
        cluster.imds.counters().requests,
        before,
        "no case variant reached the VM's IMDS"
    );
    // The counter does see what nmi proxies.
    let (status, _, _) = pod_get(&pod, "/metadata/instance?api-version=2021-02-01", true).await?;
    assert_eq!(status, 200);
    assert_eq!(cluster.imds.counters().requests, before + 1);
    Ok(())
}

/// Item 5: whatever fails after start (here: the kubelet config cannot be read, so the kubenet
/// check fails, and no API server is configured), nmi has installed its interception first,
/// so the failed start leaves the node closed instead of open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_leaves_the_node_closed() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let pod = Arc::new(cluster.node.add_pod("web")?);
    let output = cluster
        .node
        .command(podid_e2e::binary("nmi")?)
        .args(["--node=n", "--kubelet-config=/nonexistent/kubelet"])
        .env_remove("KUBECONFIG")
        .env("HOME", "/nonexistent")
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("failed to check if CNI plugin is kubenet"),
        "{stderr}"
    );
    assert_eq!(cluster.chain()?.len(), 3, "the interception went in first");
    let before = cluster.imds.counters().requests;
    let answer = pod_get(&pod, TOKEN_PATH, true).await;
    assert!(
        answer.is_err(),
        "nothing answers, nothing reaches IMDS: {answer:?}"
    );
    assert_eq!(cluster.imds.counters().requests, before);
    Ok(())
}
