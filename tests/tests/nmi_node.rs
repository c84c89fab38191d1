//! A node is closed from its first second: the real `nmi` in a simulated node installs its
//! interception before anything that can fail, stays up and closed when `route_localnet` cannot
//! be set or its port is held, guards the `route_localnet` it sets (CVE-2020-8558) and undoes
//! only its own changes on uninstall, removes the start-up taint only once it is closed and
//! synced, and never proxies case variants of the token path. Needs root.

use std::sync::Arc;
use std::time::{Duration, Instant};

use podid_api::AzureIdentity;
use podid_e2e::cluster::{Cluster, NODE, pod_get, pod_get_within, sdk_for as sdk};
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
    // An hour between full passes: readiness must follow the sysctl without one.
    cluster.spawn_nmi_read_only_proc_sys(&["--ipt-update-interval-sec=3600"])?;
    let body = cluster.wait_unready("route_localnet").await?;
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

    // The operator sets the sysctl on the node: nmi reads it within 250 ms and turns ready.
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
    // The documented command line with its address flags (nmi's defaults, as this nmi runs).
    cluster.uninstall_interception_with(&[
        "--metadata-ip=169.254.169.254",
        "--metadata-port=80",
        "--nmi-listen-address=127.0.0.1",
        "--nmi-port=2579",
    ])?;
    assert!(!has_chain(&cluster, "nat", "aad-metadata"));
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
    cluster.wait_unready("caches").await?;
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
    let body = cluster.wait_unready("imds_listener").await?;
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

/// The token path with the bound identity's client id (as the pod's SDK asks).
fn token_path(client_id: &str) -> String {
    format!("{TOKEN_PATH}&client_id={client_id}")
}

/// Requests from `web-1` to the IMDS address in a loop, each recorded with the time it ended.
struct TokenLoop {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Vec<(Instant, Option<u16>)>>,
}

impl TokenLoop {
    fn start(pod: &Arc<podid_e2e::netns::SimPod>, path: String) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pod = Arc::clone(pod);
        let stopped = Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let mut records = Vec::new();
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                // Like an SDK's IMDS client: give up after a second and ask again.
                let answer = pod_get_within(&pod, &path, true, Duration::from_secs(1)).await;
                let status = answer.ok().map(|(s, _, _)| s);
                records.push((Instant::now(), status));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            records
        });
        Self { stop, task }
    }

    async fn finish(self) -> anyhow::Result<Vec<(Instant, Option<u16>)>> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(self.task.await?)
    }
}

/// The longest time without a 200 answer from `from` on, and the number of requests that got
/// none.
fn longest_gap(records: &[(Instant, Option<u16>)], from: Instant) -> (Duration, usize) {
    let mut last_ok = from;
    let mut gap = Duration::ZERO;
    let mut failed = 0;
    for (at, status) in records.iter().filter(|(at, _)| *at >= from) {
        if *status == Some(200) {
            gap = gap.max(at.duration_since(last_ok));
            last_ok = *at;
        } else {
            failed += 1;
        }
    }
    (gap, failed)
}

/// Requests from `pod` that reached the VM's IMDS (the simulator counts by source address).
/// Asks for a token from `pod` until one is answered 200 (up to 30 s).
async fn wait_served(
    pod: &Arc<podid_e2e::netns::SimPod>,
    path: &str,
    what: &str,
) -> anyhow::Result<()> {
    wait_for(what, Duration::from_secs(30), || async {
        matches!(pod_get(pod, path, true).await, Ok((200, _, _))).then_some(())
    })
    .await
}

/// `iptables -w <args>` inside the node with the `iptables` flavour nmi runs (`iptables` or
/// `iptables-legacy`).
fn ipt(node: &podid_e2e::netns::SimNode, flavour: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = node.command(flavour).arg("-w").args(args).output()?;
    anyhow::ensure!(
        output.status.success(),
        "{flavour} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Every piece nmi installs, as nmi installs it: the chain, its jump, the guard and its jumps,
/// `route_localnet`.
fn intact(cluster: &Cluster, flavour: &str) -> bool {
    let nat = ipt(&cluster.node, flavour, &["-t", "nat", "-S"]).unwrap_or_default();
    let filter = ipt(&cluster.node, flavour, &["-t", "filter", "-S"]).unwrap_or_default();
    nat.contains("-A aad-metadata ! -s 127.0.0.1/32 -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 127.0.0.1:2579\n-A aad-metadata -j RETURN")
        && nat.contains("-A PREROUTING -j aad-metadata")
        && filter.contains("-A aad-metadata-guard -d 169.254.169.254/32 ! -i lo -p tcp -m tcp --dport 80 -j REJECT --reject-with tcp-reset")
        && filter.contains("-A INPUT -j aad-metadata-guard")
        && filter.contains("-A FORWARD -j aad-metadata-guard")
        && cluster
            .node
            .read_sysctl(ROUTE_LOCALNET)
            .is_ok_and(|v| v.trim() == "1")
}

fn repairs(metrics: &str, part: &str) -> u64 {
    let series = format!("podid_nmi_interception_repairs_total{{part=\"{part}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// What the Go NMI's SIGTERM clean-up does.
fn go_clean_up(cluster: &Cluster, flavour: &str) -> anyhow::Result<()> {
    let node = &cluster.node;
    ipt(
        node,
        flavour,
        &["-t", "nat", "-D", "PREROUTING", "-j", "aad-metadata"],
    )?;
    ipt(node, flavour, &["-t", "nat", "-F", "aad-metadata"])?;
    // The chain may be back already (nmi repaired it in between): then it is referenced.
    let _ = ipt(node, flavour, &["-t", "nat", "-X", "aad-metadata"]);
    Ok(())
}

/// A deleted or flushed chain, a removed jump, a flushed guard, a removed guard jump and a reset
/// `route_localnet` are each put back long before the next reconcile pass (an hour here), and
/// counted; while nmi cannot repair (frozen with SIGSTOP) after the Go NMI's clean-up, a pod's
/// request is reset by the guard and never reaches the VM's IMDS. Prints each repair's latency.
/// With nftables-based `iptables` the repair follows the kernel's change notification.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_or_altered_interception_is_repaired_within_a_second() -> anyhow::Result<()> {
    repaired_within_a_second("iptables").await
}

/// The same with legacy `iptables` (no notifications: nmi looks every second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_legacy_iptables_the_interception_is_repaired_within_a_second() -> anyhow::Result<()> {
    repaired_within_a_second("iptables-legacy").await
}

async fn repaired_within_a_second(flavour: &'static str) -> anyhow::Result<()> {
    let (mut cluster, pod, client_id) = with_bound_pod().await?;
    if flavour == "iptables" {
        cluster.spawn_nmi(&["--ipt-update-interval-sec=3600"])?;
    } else {
        cluster.spawn_nmi_with_iptables(flavour, &["--ipt-update-interval-sec=3600"])?;
    }
    cluster.wait_ready().await?;
    assert!(intact(&cluster, flavour));
    let node = Arc::clone(&cluster.node);
    type Tamper = Box<dyn Fn() -> anyhow::Result<()>>;
    let tamper_with = |args: &'static [&'static str]| -> Tamper {
        let node = Arc::clone(&node);
        Box::new(move || ipt(&node, flavour, args).map(drop))
    };
    let cases: Vec<(&str, &str, Tamper)> = vec![
        (
            "flushed chain",
            "chain",
            tamper_with(&["-t", "nat", "-F", "aad-metadata"]),
        ),
        (
            "removed jump",
            "jump",
            tamper_with(&["-t", "nat", "-D", "PREROUTING", "-j", "aad-metadata"]),
        ),
        (
            "flushed guard",
            "guard",
            tamper_with(&["-t", "filter", "-F", "aad-metadata-guard"]),
        ),
        (
            "removed FORWARD guard jump",
            "guard",
            tamper_with(&["-t", "filter", "-D", "FORWARD", "-j", "aad-metadata-guard"]),
        ),
        ("route_localnet reset", "route_localnet", {
            let node = Arc::clone(&node);
            Box::new(move || node.sysctl(ROUTE_LOCALNET, "0").map_err(Into::into))
        }),
    ];
    for (name, part, tamper) in &cases {
        let before = repairs(&cluster.metrics().await?, part);
        let started = Instant::now();
        tamper()?;
        wait_for(name, Duration::from_secs(10), || async {
            intact(&cluster, flavour).then_some(())
        })
        .await?;
        let latency = started.elapsed();
        wait_for("the repair counted", Duration::from_secs(5), || async {
            let metrics = cluster.metrics().await.ok()?;
            (repairs(&metrics, part) > before).then_some(())
        })
        .await?;
        println!(
            "{flavour}: repair latency, {name}: {latency:?} (polled with iptables -S, so an upper bound)"
        );
    }
    // The Go NMI's clean-up, all of it, while nmi is running.
    let started = Instant::now();
    go_clean_up(&cluster, flavour)?;
    wait_for("the clean-up repaired", Duration::from_secs(10), || async {
        intact(&cluster, flavour).then_some(())
    })
    .await?;
    println!(
        "{flavour}: repair latency, the Go NMI's clean-up: {:?}",
        started.elapsed()
    );

    // nmi frozen: the clean-up stays, and the guard alone keeps the pod from the VM's IMDS.
    let pid = cluster.nmi.as_ref().and_then(|n| n.id()).expect("spawned");
    let signal = |sig: &str| {
        std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
    };
    anyhow::ensure!(signal("-STOP")?.success());
    let frozen = async {
        go_clean_up(&cluster, flavour)?;
        assert!(
            ipt(&cluster.node, flavour, &["-t", "nat", "-S", "aad-metadata"]).is_err(),
            "frozen nmi repaired"
        );
        let answer = pod_get(&pod, &token_path(&client_id), true).await;
        let error = answer.expect_err("the guard resets the connection");
        assert!(
            error
                .chain()
                .any(|e| e.to_string().contains("Connection refused")),
            "{error:#}"
        );
        anyhow::Ok(())
    }
    .await;
    anyhow::ensure!(signal("-CONT")?.success());
    frozen?;
    assert_eq!(
        cluster.reached_imds(&pod),
        0,
        "no pod request reached the VM's IMDS"
    );
    wait_for(
        "the repair after the thaw",
        Duration::from_secs(10),
        || async { intact(&cluster, flavour).then_some(()) },
    )
    .await?;
    cluster.wait_ready().await?;
    let (status, body, _) = pod_get(&pod, &token_path(&client_id), true).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(cluster.reached_imds(&pod), 0);
    Ok(())
}

/// A repair that fails (iptables itself failing) turns `/readyz` 503 with the interception
/// reason and `podid_nmi_not_ready{reason="interception"}`, while the guard keeps the pod from
/// the VM's IMDS; once iptables works again the next pass (within a second) restores the chain
/// and readiness.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_repair_keeps_the_node_closed_and_nmi_unready() -> anyhow::Result<()> {
    let (mut cluster, pod, client_id) = with_bound_pod().await?;
    let fails = cluster.spawn_nmi_with_failing_iptables(&["--ipt-update-interval-sec=3600"])?;
    cluster.wait_ready().await?;
    std::fs::write(&fails, "")?;
    go_clean_up(&cluster, "iptables")?;
    let body = cluster.wait_unready("interception").await?;
    assert!(body.contains("aad-metadata"), "{body}");
    assert!(
        cluster
            .metrics()
            .await?
            .contains("podid_nmi_not_ready{reason=\"interception\"} 1")
    );
    let answer = pod_get(&pod, &token_path(&client_id), true).await;
    assert!(answer.is_err(), "the guard resets it: {answer:?}");
    assert_eq!(cluster.reached_imds(&pod), 0);
    std::fs::remove_file(&fails)?;
    cluster.wait_ready().await?;
    assert!(intact(&cluster, "iptables"));
    let (status, body, _) = pod_get(&pod, &token_path(&client_id), true).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(cluster.reached_imds(&pod), 0);
    Ok(())
}

/// The node swap with surge (the chart's default): podid's nmi starts while the Go NMI still
/// holds the port, then the Go NMI gets SIGTERM, deletes its chain and exits after its grace
/// period. A pod asking for tokens in a loop throughout never reaches the VM's IMDS and is
/// served again after the swap; the longest gap in service is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_swap_from_the_go_nmi_with_surge_never_opens_the_node() -> anyhow::Result<()> {
    let (mut cluster, pod, client_id) = with_bound_pod().await?;
    let path = token_path(&client_id);
    let mut old = cluster.start_go_nmi(Duration::from_secs(10))?;
    wait_served(&pod, &path, "the Go NMI serving").await?;
    let tokens = TokenLoop::start(&pod, path.clone());

    // The surge pod: podid's nmi with the default reconcile interval, the port still held.
    cluster.spawn_nmi(&["--ipt-update-interval-sec=60"])?;
    cluster.wait_unready("imds_listener").await?;
    let swap = Instant::now();
    old.terminate()?;
    let cleaned = swap.elapsed();
    old.wait_exit(Duration::from_secs(30)).await?;
    let exited = swap.elapsed();
    cluster.wait_ready().await?;
    wait_served(&pod, &path, "podid's nmi serving").await?;
    let served = swap.elapsed();
    let records = tokens.finish().await?;

    assert_eq!(
        cluster.reached_imds(&pod),
        0,
        "no pod request reached the VM's IMDS during the swap"
    );
    assert_eq!(cluster.chain()?.len(), 3, "podid's chain stands");
    let metrics = cluster.metrics().await?;
    assert!(repairs(&metrics, "chain") >= 1, "{metrics}");
    let (gap, failed) = longest_gap(&records, swap);
    println!(
        "swap with surge: Go NMI clean-up done after {cleaned:?}, exited after {exited:?}, podid's nmi serving after {served:?}; {} requests, {failed} without a token, longest gap in service {gap:?}",
        records.iter().filter(|(at, _)| *at >= swap).count()
    );
    Ok(())
}

/// The swap without surge (`maxUnavailable: 1`: upstream's order, or a cluster before 1.22 with the plain
/// manifests): the Go NMI is terminated first and podid's nmi starts only once it has exited.
/// Between the Go NMI's clean-up and podid's first rule the node is open (the Go NMI's doing,
/// which podid cannot prevent before it runs); the window and the requests that reached the
/// VM's IMDS are printed, and once podid's nmi runs no further request reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_swap_from_the_go_nmi_without_surge_is_open_until_podid_starts() -> anyhow::Result<()> {
    let (mut cluster, pod, client_id) = with_bound_pod().await?;
    let path = token_path(&client_id);
    let mut old = cluster.start_go_nmi(Duration::from_secs(10))?;
    wait_served(&pod, &path, "the Go NMI serving").await?;
    let tokens = TokenLoop::start(&pod, path.clone());
    let swap = Instant::now();
    old.terminate()?;
    old.wait_exit(Duration::from_secs(30)).await?;
    let exited = swap.elapsed();
    // The replacement starts at once (a real cluster adds scheduling and image pull).
    cluster.spawn_nmi(&["--ipt-update-interval-sec=60"])?;
    wait_for("podid's chain", Duration::from_secs(30), || async {
        cluster.chain().is_ok_and(|c| c.len() == 3).then_some(())
    })
    .await?;
    let closed = swap.elapsed();
    let reached = cluster.reached_imds(&pod);
    cluster.wait_ready().await?;
    wait_served(&pod, &path, "podid's nmi serving").await?;
    let served = swap.elapsed();
    let after = cluster.reached_imds(&pod);
    let records = tokens.finish().await?;
    // Some more requests once podid serves: none of them reaches the VM's IMDS.
    for _ in 0..5 {
        let (status, body, _) = pod_get(&pod, &path, true).await?;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(cluster.reached_imds(&pod), after, "closed once podid runs");
    let (gap, failed) = longest_gap(&records, swap);
    println!(
        "swap without surge: Go NMI exited after {exited:?}; the node was open for {closed:?} (until podid's chain), {reached} pod requests reached the VM's IMDS; podid's nmi serving after {served:?}; {failed} requests without a token, longest gap in service {gap:?}"
    );
    Ok(())
}

/// CPU nmi's whole process tree (its own threads and the `iptables` commands it ran and reaped)
/// used so far, from `/proc/<pid>/stat` (utime, stime, cutime, cstime), in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| -> u64 { fields.get(i).and_then(|v| v.parse().ok()).unwrap_or(0) };
    // utime is field 14, i.e. index 11 after the state (field 3 = index 0).
    Ok(tick(11) + tick(12) + tick(13) + tick(14))
}

/// Benchmark, not a check: the CPU an idle nmi spends keeping its interception in place, with
/// nftables-based `iptables` (change notifications) and with legacy `iptables` (a pass every
/// second), over 30 s each. Run with
/// `cargo nextest run -p podid-e2e --profile ci -E 'test(idle_cpu)' --run-ignored only --no-capture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: prints figures"]
async fn idle_cpu_of_the_repair_loop() -> anyhow::Result<()> {
    const SPAN: Duration = Duration::from_secs(30);
    for flavour in ["iptables", "iptables-legacy"] {
        let (mut cluster, _pod, _) = with_bound_pod().await?;
        cluster.spawn_nmi_with_iptables(flavour, &["--ipt-update-interval-sec=60"])?;
        cluster.wait_ready().await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        // `ip netns exec` execs nmi: the child's pid is nmi's.
        let nmi_pid = cluster.nmi.as_ref().and_then(|n| n.id()).expect("spawned");
        let before = cpu_ticks(nmi_pid)?;
        tokio::time::sleep(SPAN).await;
        let used = cpu_ticks(nmi_pid)? - before;
        // Clock ticks are 10 ms on Linux (USER_HZ 100).
        let per_hour = used as f64 * 0.01 * 3600.0 / SPAN.as_secs_f64();
        println!(
            "{flavour}: idle nmi used {} ms of CPU in {SPAN:?}: {per_hour:.1} s an hour ({:.2} % of a core)",
            used * 10,
            per_hour / 36.0
        );
    }
    Ok(())
}
