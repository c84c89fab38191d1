//! nmi end to end: the real `nmi` binary inside a simulated node (network namespace) with real
//! iptables interception of 169.254.169.254:80, the fake API server holding the cluster's
//! objects, the Azure simulator behind it (the VM's IMDS inside the node, Entra on the host), and
//! the official Python `azure-identity` SDK asking for tokens from inside network-namespace pods.
//! Needs root.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use podid_api::{AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, IdentityType};
use podid_e2e::{
    ChildGuard, SdkOutcome, SdkSelector, azure, binary, kube, netns, sdk_get_token, wait_for,
};
use serde_json::{Value, json};

const NODE: &str = "aks-nodepool1-12345678-vmss000000";
const SCOPE: &str = "https://vault.azure.net/.default";
const PROBE_PORT: u16 = 8085;

/// One simulated node running nmi, with everything around it.
struct Cluster {
    node: Arc<netns::SimNode>,
    api: kube::FakeApiServer,
    cloud: azure::Cloud,
    imds: azure::ImdsHandle,
    vmss: azure::ComputeRef,
    _entra: azure::EntraHandle,
    entra_url: String,
    dir: PathBuf,
    nmi: Option<ChildGuard>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut nmi) = self.nmi.take() {
            nmi.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Cluster {
    async fn start() -> anyhow::Result<Self> {
        azure::install_crypto_provider();
        let node = Arc::new(netns::SimNode::create()?);
        // Reachable from inside the node namespace through its veth: nmi's kube client and the
        // Entra calls leave the node like they would leave a real VM.
        let api = kube::FakeApiServer::start_on(SocketAddr::from((node.host_ip(), 0))).await?;
        let cloud = azure::Cloud::new()?;
        let entra_listener = std::net::TcpListener::bind(SocketAddr::from((node.host_ip(), 0)))?;
        let entra = azure::serve_entra(&cloud, entra_listener)?;
        let entra_url = format!("{}/", entra.url().trim_end_matches('/'));
        let vmss = cloud.add_vmss(
            cloud.subscription_id(),
            cloud.resource_group(),
            "aks-nodepool1-vmss",
        );
        node.add_local_address("169.254.169.254/32")?;
        let imds_listener = node.bind_tcp("169.254.169.254:80".parse()?)?;
        let imds = azure::serve_imds(&cloud, &vmss.instance("0"), imds_listener)?;
        let provider_id = format!("azure://{}/virtualMachines/0", vmss.resource_id());
        let dir = std::env::temp_dir().join(format!(
            "podid-e2e-nmi-{}-{}",
            std::process::id(),
            node.slot()
        ));
        std::fs::create_dir_all(&dir)?;
        api.write_kubeconfig(dir.join("kubeconfig"))?;
        std::fs::write(dir.join("kubelet"), "KUBELET_FLAGS=--network-plugin=cni\n")?;
        api.create_json(
            "/api/v1/nodes",
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
                   "spec": {"providerID": provider_id}}),
        )
        .map_err(|e| anyhow::anyhow!("creating the node: {}", e.message))?;
        let cluster = Self {
            node,
            api,
            cloud,
            imds,
            vmss,
            _entra: entra,
            entra_url,
            dir,
            nmi: None,
        };
        Ok(cluster)
    }

    fn create(&self, path: &str, object: Value) -> anyhow::Result<()> {
        self.api
            .create_json(path, object)
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!("creating under {path}: {}", e.message))
    }

    fn add_pod(&self, name: &str, label: Option<&str>, ip: Ipv4Addr) -> anyhow::Result<()> {
        let mut labels = serde_json::Map::new();
        if let Some(label) = label {
            labels.insert("aadpodidbinding".into(), json!(label));
        }
        self.create(
            "/api/v1/namespaces/default/pods",
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "default", "labels": labels, "uid": format!("uid-{name}")},
                "spec": {"nodeName": NODE, "serviceAccountName": "default", "containers": [{"name": "app", "image": "app"}]},
                "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]}
            }),
        )
    }

    /// An identity, its binding for `selector`, and (standard mode, standing in for MIC) the
    /// `Assigned` AzureAssignedIdentity for `pod`.
    fn bind(&self, identity: &AzureIdentity, selector: &str, pod: &str) -> anyhow::Result<()> {
        let name = identity.metadata.name.clone().unwrap_or_default();
        self.create(
            "/apis/aadpodidentity.k8s.io/v1/namespaces/default/azureidentities",
            serde_json::to_value(identity)?,
        )?;
        let binding = AzureIdentityBinding::for_selector(
            "default",
            &format!("{name}-binding"),
            &name,
            selector,
        );
        self.create(
            "/apis/aadpodidentity.k8s.io/v1/namespaces/default/azureidentitybindings",
            serde_json::to_value(&binding)?,
        )?;
        let assigned = AzureAssignedIdentity::for_pod(
            "default",
            pod,
            "default",
            NODE,
            identity.clone(),
            binding,
        );
        let mut value = serde_json::to_value(&assigned)?;
        value["status"]["status"] = json!("Assigned");
        self.create(
            "/apis/aadpodidentity.k8s.io/v1/namespaces/default/azureassignedidentities",
            value,
        )
    }

    fn spawn_nmi(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        let mut command = self.node.command(binary("nmi")?);
        command
            .arg(format!("--node={NODE}"))
            .arg(format!("--http-probe-port={PROBE_PORT}"))
            .arg("--prometheus-port=9090")
            .arg("--ipt-update-interval-sec=1")
            .arg(format!(
                "--kubelet-config={}",
                self.dir.join("kubelet").display()
            ))
            .args(extra)
            .env("KUBECONFIG", self.dir.join("kubeconfig"))
            .env("RUST_LOG", "info");
        self.nmi = Some(ChildGuard::spawn("nmi", command)?);
        Ok(())
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let url = format!("http://{}:{PROBE_PORT}/readyz", self.node.ip());
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(1))
            .build()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(nmi) = self.nmi.as_mut() {
                nmi.check_running()?;
            }
            if let Ok(response) = http.get(&url).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "nmi not ready within 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn chain(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .node
            .iptables(&["-t", "nat", "-S", "aad-metadata"])?
            .lines()
            .map(str::to_owned)
            .collect())
    }
}

/// A raw HTTP/1.1 GET to 169.254.169.254:80 from inside `pod`: (status, body, elapsed).
async fn pod_get(
    pod: &Arc<netns::SimPod>,
    path: &str,
    metadata_header: bool,
) -> anyhow::Result<(u16, String, Duration)> {
    let pod = Arc::clone(pod);
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        pod.run(move || -> anyhow::Result<(u16, String, Duration)> {
            let started = Instant::now();
            let addr = SocketAddr::from(([169, 254, 169, 254], 80));
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            let header = if metadata_header {
                "Metadata: true\r\n"
            } else {
                ""
            };
            write!(
                stream,
                "GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{header}Connection: close\r\n\r\n"
            )?;
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw)?;
            let elapsed = started.elapsed();
            let text = String::from_utf8_lossy(&raw).into_owned();
            let status = text
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .context("no HTTP status line")?;
            let body = text
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_owned())
                .unwrap_or_default();
            Ok((status, body, elapsed))
        })?
    })
    .await?
}

async fn sdk(pod: &Arc<netns::SimPod>, client_id: &str) -> anyhow::Result<SdkOutcome> {
    let pod = Arc::clone(pod);
    let client_id = client_id.to_owned();
    tokio::task::spawn_blocking(move || {
        sdk_get_token(
            &pod,
            SCOPE,
            SdkSelector::ClientId(&client_id),
            Duration::from_secs(90),
        )
    })
    .await?
}

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
    assert!(
        status == 404 || status == 400 || status == 403,
        "{status} {body}"
    );
    assert!(!body.contains("access_token"), "{body}");

    // A pod with no binding gets 404 at once.
    let path =
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net";
    let (status, body, elapsed) = pod_get(&lonely_pod, path, true).await?;
    assert_eq!(status, 404, "{body}");
    println!("unbound pod answered 404 in {elapsed:?}");
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
