//! Attribution when pod addresses are reused, end to end: the real `nmi` binary in a simulated
//! node with real iptables interception, pods as network namespaces whose address is handed to
//! the next pod (a new sandbox: new namespace, new veth with a new interface index), and the
//! fake API server behind a node-side firewall rule for the outage. The judge is the identity
//! inside each token the simulated cloud issued (docs/security.md, "Stale attribution"). Needs
//! root.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use podid_api::AzureIdentity;
use podid_e2e::cluster::{Cluster, pod_get};
use podid_e2e::{netns, wait_for};
use serde_json::{Value, json};

const PATH: &str =
    "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net";

/// A user-assigned identity on the node's scale set and its `AzureIdentity`.
fn identity(cluster: &Cluster, name: &str) -> anyhow::Result<(String, AzureIdentity)> {
    let msi = cluster.cloud.add_user_assigned_identity(name);
    cluster.cloud.assign_identity(&cluster.vmss, &msi)?;
    let identity = AzureIdentity::user_assigned("default", name, &msi.resource_id, &msi.client_id);
    Ok((msi.client_id, identity))
}

/// A pod labelled for `label`; `ip` `None` is a pod just scheduled (Pending, no address yet).
/// The finalizer keeps a deleted pod visible as terminating, as the kubelet does until its
/// containers are gone.
fn create_pod(
    cluster: &Cluster,
    name: &str,
    label: &str,
    ip: Option<std::net::Ipv4Addr>,
) -> anyhow::Result<()> {
    let status = match ip {
        Some(ip) => {
            json!({"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]})
        }
        None => json!({"phase": "Pending"}),
    };
    cluster.create(
        "/api/v1/namespaces/default/pods",
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                         "labels": {"aadpodidbinding": label}, "finalizers": ["podid.test/keep"]},
            "spec": {"nodeName": podid_e2e::cluster::NODE, "serviceAccountName": "default",
                     "containers": [{"name": "app", "image": "app"}]},
            "status": status
        }),
    )
}

/// The kubelet reports `name` running at `ip`.
fn report_address(cluster: &Cluster, name: &str, ip: std::net::Ipv4Addr) -> anyhow::Result<()> {
    cluster
        .api
        .merge_patch_json(
            &format!("/api/v1/namespaces/default/pods/{name}/status"),
            json!({"status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]}}),
        )
        .map(drop)
        .map_err(|e| anyhow::anyhow!("reporting {name}'s address: {}", e.message))
}

/// What a token request from `pod` got: `Ok(appid)` of the token, or `Err(status)`.
async fn ask(cluster: &Cluster, pod: &Arc<netns::SimPod>) -> anyhow::Result<Result<String, u16>> {
    let (status, body, _) = pod_get(pod, PATH, true).await?;
    if status != 200 {
        anyhow::ensure!(
            !body.contains("access_token"),
            "a refusal carried a token: {body}"
        );
        return Ok(Err(status));
    }
    let body: Value = serde_json::from_str(&body)?;
    let token = body["access_token"].as_str().context("no access_token")?;
    Ok(Ok(cluster.cloud.verify_access_token(token)?.appid))
}

/// Give the pod's address to a new sandbox.
fn reuse(pod: Arc<netns::SimPod>, label: &str) -> anyhow::Result<Arc<netns::SimPod>> {
    let pod = Arc::try_unwrap(pod).map_err(|_| anyhow::anyhow!("pod still shared"))?;
    Ok(Arc::new(pod.reuse_address(label)?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_address_never_gets_the_previous_pods_identity() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let (first_id, first) = identity(&cluster, "first")?;
    let (second_id, second) = identity(&cluster, "second")?;
    let (third_id, third) = identity(&cluster, "third")?;
    let pod = Arc::new(cluster.node.add_pod("first")?);
    let ip = pod.ip();
    create_pod(&cluster, "first-1", "first", Some(ip))?;
    cluster.bind(&first, "first", "first-1")?;
    cluster.spawn_nmi(&[])?;
    cluster.wait_ready().await?;
    assert_eq!(ask(&cluster, &pod).await?, Ok(first_id.clone()));

    // 1. The first pod is deleted (its deletion deadline passes at once on this API server)
    //    and its sandbox is rebuilt for the second pod, which is scheduled here and has no
    //    address in the API yet. Its requests never get the first pod's identity.
    cluster
        .api
        .delete_json("/api/v1/namespaces/default/pods/first-1")
        .map_err(|e| anyhow::anyhow!("deleting: {}", e.message))?;
    create_pod(&cluster, "second-1", "second", None)?;
    cluster.bind(&second, "second", "second-1")?;
    let pod = reuse(pod, "second")?;
    assert_eq!(pod.ip(), ip);
    let early = ask(&cluster, &pod).await?;
    assert_ne!(
        early,
        Ok(first_id.clone()),
        "the second pod got the first's identity"
    );
    assert_eq!(early, Err(500), "an address no live pod holds is refused");
    report_address(&cluster, "second-1", ip)?;
    let got = wait_for(
        "the second pod's token",
        Duration::from_secs(20),
        || async {
            match ask(&cluster, &pod).await {
                Ok(Ok(appid)) => Some(Ok(appid)),
                Ok(Err(_)) => None,
                Err(e) => Some(Err(e)),
            }
        },
    )
    .await??;
    assert_eq!(got, second_id);

    // 2. The second pod's containers all terminate (the kubelet's report, no deletion yet) and
    //    the address goes to a third pod.
    cluster
        .api
        .merge_patch_json(
            "/api/v1/namespaces/default/pods/second-1/status",
            json!({"status": {"containerStatuses": [{"name": "app", "image": "app", "imageID": "",
                "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]}}),
        )
        .map_err(|e| anyhow::anyhow!("reporting terminated: {}", e.message))?;
    create_pod(&cluster, "third-1", "third", None)?;
    cluster.bind(&third, "third", "third-1")?;
    let pod = reuse(pod, "third")?;
    let early = ask(&cluster, &pod).await?;
    assert_ne!(
        early,
        Ok(second_id.clone()),
        "the third pod got the second's identity"
    );
    assert_eq!(early, Err(500));
    report_address(&cluster, "third-1", ip)?;
    let got = wait_for("the third pod's token", Duration::from_secs(20), || async {
        match ask(&cluster, &pod).await {
            Ok(Ok(appid)) => Some(Ok(appid)),
            Ok(Err(_)) => None,
            Err(e) => Some(Err(e)),
        }
    })
    .await??;
    assert_eq!(got, third_id);
    let metrics = metrics(&cluster).await?;
    assert!(
        metrics.contains("podid_nmi_attribution_failures_total{reason=\"not_found\"}"),
        "{metrics}"
    );
    Ok(())
}

async fn metrics(cluster: &Cluster) -> anyhow::Result<String> {
    let url = format!("http://{}:9090/metrics", cluster.node.ip());
    Ok(reqwest::get(&url).await?.text().await?)
}

async fn readyz(cluster: &Cluster) -> anyhow::Result<(u16, String)> {
    let url = format!(
        "http://{}:{}/readyz",
        cluster.node.ip(),
        podid_e2e::cluster::PROBE_PORT
    );
    let response = reqwest::get(&url).await?;
    let status = response.status().as_u16();
    Ok((status, response.text().await?))
}

/// The value of the unlabelled gauge `name` in a metrics exposition.
fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_outage_keeps_known_pods_served_but_never_a_reused_address() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let (stay_id, stay) = identity(&cluster, "stay")?;
    let (gone_id, gone) = identity(&cluster, "gone")?;
    let stay_pod = Arc::new(cluster.node.add_pod("stay")?);
    let gone_pod = Arc::new(cluster.node.add_pod("gone")?);
    create_pod(&cluster, "stay-1", "stay", Some(stay_pod.ip()))?;
    cluster.bind(&stay, "stay", "stay-1")?;
    create_pod(&cluster, "gone-1", "gone", Some(gone_pod.ip()))?;
    cluster.bind(&gone, "gone", "gone-1")?;
    cluster.spawn_nmi(&[])?;
    cluster.wait_ready().await?;
    assert_eq!(ask(&cluster, &gone_pod).await?, Ok(gone_id.clone()));
    let (status, body) = readyz(&cluster).await?;
    assert_eq!((status, body.as_str()), (200, "ok\npod watch: streaming\n"));

    // The API server becomes unreachable from the node: new connections are reset, and the
    // open watch is reset as soon as it carries anything (a pod change nmi sees last).
    let port = cluster.api.addr().port().to_string();
    let host = cluster.node.host_ip().to_string();
    let rule = [
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        &host,
        "--dport",
        &port,
        "-j",
        "REJECT",
        "--reject-with",
        "tcp-reset",
    ];
    let mut insert = vec!["-I"];
    insert.extend(rule);
    cluster.node.iptables(&insert)?;
    let mut trigger = 0;
    let text = wait_for(
        "nmi to see its pod watch fail",
        Duration::from_secs(60),
        || {
            trigger += 1;
            let name = format!("trigger-{trigger}");
            let cluster = &cluster;
            async move {
                let _ = create_pod(cluster, &name, "none", None);
                let text = metrics(cluster).await.ok()?;
                gauge(&text, "podid_nmi_pod_watch_blind_seconds")
                    .filter(|v| *v > 0.0)
                    .map(|_| text)
            }
        },
    )
    .await?;
    println!(
        "blind for {:?} s",
        gauge(&text, "podid_nmi_pod_watch_blind_seconds")
    );
    let (status, body) = readyz(&cluster).await?;
    assert_eq!(status, 200, "a blind watch keeps nmi ready: {body}");
    assert!(body.contains("pod watch: blind for "), "{body}");

    // Static stability: a known pod on its own route is still served, also for a resource
    // it never asked for (a new IMDS call).
    assert_eq!(ask(&cluster, &stay_pod).await?, Ok(stay_id.clone()));
    let (status, body, _) = pod_get(
        &stay_pod,
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://storage.azure.com/",
        true,
    )
    .await?;
    assert_eq!(status, 200, "{body}");

    // The gone pod's sandbox is rebuilt for a pod nmi cannot hear about: its address now
    // routes through another interface, and the gone pod's identity is never served there.
    let reused = reuse(gone_pod, "newcomer")?;
    for _ in 0..3 {
        let answer = ask(&cluster, &reused).await?;
        assert_ne!(
            answer,
            Ok(gone_id.clone()),
            "served the previous pod's identity"
        );
        assert_eq!(answer, Err(500));
    }
    let text = metrics(&cluster).await?;
    assert!(
        text.contains("podid_nmi_attribution_failures_total{reason=\"untrusted_route\"} 3"),
        "{text}"
    );

    // The API server comes back: the watch lists again and is current.
    let mut delete = vec!["-D"];
    delete.extend(rule);
    cluster.node.iptables(&delete)?;
    wait_for(
        "the pod watch to list again",
        Duration::from_secs(60),
        || async {
            let (_, body) = readyz(&cluster).await.ok()?;
            body.contains("pod watch: streaming").then_some(())
        },
    )
    .await?;
    assert_eq!(ask(&cluster, &stay_pod).await?, Ok(stay_id));
    Ok(())
}
