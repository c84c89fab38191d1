//! Leader hand-over with two real `mic` processes sharing one fake API server and one simulated
//! ARM: exactly one leads (`/healthz` Active, the other Not Active) and assigns a pod's
//! identity; after `kill -9` of the leader the other takes the Lease over once it expires and
//! assigns a new pod's identity. Each replica reaches the API server and ARM through its own
//! counting proxy, so the test sees who wrote what: the follower never writes anything but its
//! Lease attempts until it leads, and ARM gets exactly one PATCH per needed change.
//!
//! Needs no root (no network namespaces): everything listens on the host's loopback.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use podid_api::{AzureIdentity, AzureIdentityBinding};
use podid_e2e::{ChildGuard, azure, binary, kube, wait_for};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// `--leader-election-duration` of both replicas (renew deadline 1.5 s, retry period 0.75 s).
const LEASE: Duration = Duration::from_secs(3);
const RETRY_PERIOD: Duration = Duration::from_millis(750);
const WAIT: Duration = Duration::from_secs(30);
const NODE: &str = "aks-pool-vmss000000";
const AAI: &str = "/apis/aadpodidentity.k8s.io/v1/namespaces/default/azureassignedidentities";

/// One HTTP request line a replica sent through its proxy, and when the proxy saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Request {
    method: String,
    path: String,
    at: Instant,
}

/// A TCP proxy to `upstream` that records the request lines of HTTP/1.1 traffic (keep-alive
/// included: bodies are JSON without CR LF, so every request line ends a CR LF-terminated line).
struct Proxy {
    url: String,
    log: Arc<Mutex<Vec<Request>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

/// The request in `line` if it is (or ends with) an HTTP/1.1 request line.
fn request_line(line: &str) -> Option<Request> {
    let target = line.strip_suffix(" HTTP/1.1")?;
    let (at, method) = METHODS
        .iter()
        .filter_map(|m| target.rfind(&format!("{m} /")).map(|at| (at, *m)))
        .max_by_key(|(at, _)| *at)?;
    let path = &target[at + method.len() + 1..];
    let path = path.split('?').next().unwrap_or_default();
    Some(Request {
        method: method.to_owned(),
        path: path.to_owned(),
        at: Instant::now(),
    })
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let log: Arc<Mutex<Vec<Request>>> = Arc::default();
        let task = tokio::spawn({
            let log = log.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let log = log.clone();
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        let (mut client_read, mut client_write) = client.into_split();
                        let (mut server_read, mut server_write) = server.into_split();
                        let up = async move {
                            let mut pending: Vec<u8> = Vec::new();
                            let mut chunk = vec![0u8; 16 * 1024];
                            loop {
                                let n = match client_read.read(&mut chunk).await {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => n,
                                };
                                pending.extend_from_slice(&chunk[..n]);
                                while let Some(end) = pending.windows(2).position(|w| w == b"\r\n")
                                {
                                    let line =
                                        String::from_utf8_lossy(&pending[..end]).into_owned();
                                    pending.drain(..end + 2);
                                    if let Some(request) = request_line(&line) {
                                        log.lock().expect("proxy log").push(request);
                                    }
                                }
                                if server_write.write_all(&chunk[..n]).await.is_err() {
                                    break;
                                }
                            }
                            let _ = server_write.shutdown().await;
                        };
                        let down = async move {
                            let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                            let _ = client_write.shutdown().await;
                        };
                        tokio::join!(up, down);
                    });
                }
            }
        });
        Ok(Self { url, log, task })
    }

    fn requests(&self) -> Vec<Request> {
        self.log.lock().expect("proxy log").clone()
    }

    /// Requests other than GET (watches and lists are GETs).
    fn writes(&self) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.method != "GET")
            .collect()
    }

    /// When the proxy saw each PUT of the leader Lease (renewals and takeovers).
    fn lease_writes(&self) -> Vec<Instant> {
        self.requests()
            .iter()
            .filter(|r| r.method == "PUT" && r.path.contains("/leases/"))
            .map(|r| r.at)
            .collect()
    }

    fn count(&self, method: &str, path_contains: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.method == method && r.path.contains(path_contains))
            .count()
    }
}

fn addr_of(url: &str) -> anyhow::Result<SocketAddr> {
    let host = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default();
    Ok(host.parse()?)
}

/// One `mic` process with its proxies and probe port.
struct Replica {
    name: String,
    api: Proxy,
    arm: Proxy,
    probe: u16,
    child: ChildGuard,
}

impl Replica {
    async fn spawn(
        name: &str,
        dir: &Path,
        api: &kube::FakeApiServer,
        arm: &azure::ArmHandle,
        entra: &azure::EntraHandle,
        azure_json: &Path,
    ) -> anyhow::Result<Self> {
        let api_proxy = Proxy::start(api.addr()).await?;
        let arm_proxy = Proxy::start(addr_of(&arm.url())?).await?;
        let kubeconfig = dir.join(format!("{name}.kubeconfig"));
        std::fs::write(
            &kubeconfig,
            api.kubeconfig_yaml().replace(api.url(), &api_proxy.url),
        )?;
        let [probe, metrics] = podid_e2e::free_ports()?;
        let mut command = std::process::Command::new(binary("mic")?);
        command
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--cloudconfig={}", azure_json.display()))
            .arg(format!("--arm-endpoint={}", arm_proxy.url))
            .arg(format!("--aad-authority={}", entra.url()))
            .arg(format!("--http-probe-port={probe}"))
            .arg(format!("--prometheus-port={metrics}"))
            .arg(format!("--leader-election-instance={name}"))
            .arg(format!("--leader-election-duration={}s", LEASE.as_secs()))
            .env("MIC_POD_NAMESPACE", "default")
            .env("RUST_LOG", "info")
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("http_proxy")
            .env_remove("https_proxy");
        Ok(Self {
            name: name.to_owned(),
            api: api_proxy,
            arm: arm_proxy,
            probe,
            child: ChildGuard::spawn(name, command)?,
        })
    }

    /// `/healthz`'s body, if it answers.
    async fn health(&self, http: &reqwest::Client) -> Option<String> {
        let answer = http
            .get(format!("http://127.0.0.1:{}/healthz", self.probe))
            .send()
            .await
            .ok()?;
        answer.text().await.ok()
    }
}

fn assigned_state(api: &kube::FakeApiServer, name: &str) -> Option<String> {
    let object = api.get_json(&format!("{AAI}/{name}")).ok()?;
    object["status"]["status"].as_str().map(str::to_owned)
}

/// Lower-cased and sorted.
fn lower(ids: Vec<String>) -> Vec<String> {
    let mut ids: Vec<String> = ids.into_iter().map(|id| id.to_ascii_lowercase()).collect();
    ids.sort();
    ids
}

fn pod(name: &str, selector: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default",
                     "labels": {"aadpodidbinding": selector}},
        "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running"}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_hands_over_without_duplicate_writes() -> anyhow::Result<()> {
    azure::install_crypto_provider();
    let cloud = azure::Cloud::new()?;
    let operator = cloud.add_service_principal("mic");
    let secret = cloud.add_client_secret(&operator.client_id)?;
    let entra = azure::EntraHandle::start(&cloud)?;
    let arm = azure::ArmHandle::start(&cloud)?;
    let vmss = cloud.add_vmss(
        cloud.subscription_id(),
        cloud.resource_group(),
        "aks-pool-vmss",
    );
    let first = cloud.add_user_assigned_identity("first-id");
    let second = cloud.add_user_assigned_identity("second-id");

    let api = kube::FakeApiServer::start().await?;
    let dir = std::env::temp_dir().join(format!("podid-e2e-mic-leader-{}", api.addr().port()));
    std::fs::create_dir_all(&dir)?;
    let azure_json = dir.join("azure.json");
    std::fs::write(&azure_json, cloud.azure_json(&operator.client_id, &secret))?;
    let create = |path: &str, object: Value| {
        api.create_json(path, object)
            .map(drop)
            .map_err(|e| anyhow::anyhow!("creating under {path}: {}", e.message))
    };
    create(
        "/api/v1/nodes",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
               "spec": {"providerID": format!("azure://{}/virtualMachines/0", vmss.resource_id())}}),
    )?;
    for (identity, selector) in [(&first, "first"), (&second, "second")] {
        create(
            "/apis/aadpodidentity.k8s.io/v1/namespaces/default/azureidentities",
            serde_json::to_value(AzureIdentity::user_assigned(
                "default",
                &identity.name,
                &identity.resource_id,
                &identity.client_id,
            ))?,
        )?;
        create(
            "/apis/aadpodidentity.k8s.io/v1/namespaces/default/azureidentitybindings",
            serde_json::to_value(AzureIdentityBinding::for_selector(
                "default",
                &format!("{selector}-binding"),
                &identity.name,
                selector,
            ))?,
        )?;
    }

    let mut replicas = vec![
        Replica::spawn("mic-a", &dir, &api, &arm, &entra, &azure_json).await?,
        Replica::spawn("mic-b", &dir, &api, &arm, &entra, &azure_json).await?,
    ];
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()?;

    // Exactly one leads.
    let leader = wait_for("one Active and one Not Active replica", WAIT, || async {
        let a = replicas[0].health(&http).await?;
        let b = replicas[1].health(&http).await?;
        match (a.as_str(), b.as_str()) {
            ("Active", "Not Active") => Some(0),
            ("Not Active", "Active") => Some(1),
            _ => None,
        }
    })
    .await?;
    let follower = 1 - leader;
    println!(
        "leader {}, follower {}",
        replicas[leader].name, replicas[follower].name
    );

    // The leader assigns the first pod's identity.
    create("/api/v1/namespaces/default/pods", pod("web-1", "first"))?;
    wait_for("web-1's assignment Assigned", WAIT, || async {
        (assigned_state(&api, "web-1-default-first-id").as_deref() == Some("Assigned"))
            .then_some(())
    })
    .await?;
    assert_eq!(
        lower(cloud.assigned_identities(&vmss)?),
        lower(vec![first.resource_id.clone()])
    );
    for replica in &mut replicas {
        replica.child.check_running()?;
    }

    // Until now the follower only read, apart from its Lease attempts, and never called ARM.
    let follower_writes: Vec<Request> = replicas[follower]
        .api
        .writes()
        .into_iter()
        .filter(|r| !r.path.contains("/leases"))
        .collect();
    assert_eq!(
        follower_writes,
        vec![],
        "the follower wrote to the API server"
    );
    assert_eq!(
        replicas[follower].arm.requests(),
        vec![],
        "the follower called ARM"
    );
    assert_eq!(
        replicas[leader]
            .arm
            .count("PATCH", "virtualMachineScaleSets"),
        1
    );

    // kill -9 the leader: no lease release, the follower must wait for the lease to expire.
    replicas[leader].child.kill();
    let killed = Instant::now();
    wait_for("the follower to become Active", WAIT, || async {
        (replicas[follower].health(&http).await.as_deref() == Some("Active")).then_some(())
    })
    .await?;
    let active = killed.elapsed();
    // The hand-over as the API server saw it: from the dead leader's last renewal to the
    // follower's takeover write (its first Lease PUT), both timed by the proxies, so neither
    // process start-up nor cache sync nor this test's polling counts.
    let last_renewal = replicas[leader]
        .api
        .lease_writes()
        .last()
        .copied()
        .ok_or_else(|| anyhow::anyhow!("the leader never renewed its lease"))?;
    let takeover = replicas[follower]
        .api
        .lease_writes()
        .first()
        .copied()
        .ok_or_else(|| anyhow::anyhow!("the follower never wrote the lease"))?;
    let handover = takeover.saturating_duration_since(last_renewal);
    println!(
        "hand-over {} ms from the last renewal to the takeover write, Active {} ms after kill -9 \
         (lease {} s, retry period {} ms)",
        handover.as_millis(),
        active.as_millis(),
        LEASE.as_secs(),
        RETRY_PERIOD.as_millis()
    );
    // Not before the lease expired: the follower counts the lease duration from when it saw
    // the last renewal (its read may start up to its request latency, far below a retry
    // period, before the renewal arrived).
    assert!(
        handover + RETRY_PERIOD >= LEASE,
        "the follower took over {handover:?} after the last renewal, before the lease expired"
    );
    // And within the lease duration after expiry: the follower sees the last renewal at its
    // next attempt and takes over at the first attempt after expiry, each a retry period
    // apart; one more second of slack for request latency on a loaded machine.
    assert!(
        handover <= LEASE + RETRY_PERIOD * 2 + Duration::from_secs(1),
        "hand-over took {handover:?}"
    );
    let lease = api
        .get_json("/apis/coordination.k8s.io/v1/namespaces/default/leases/aad-pod-identity-mic")
        .map_err(|e| anyhow::anyhow!("reading the lease: {}", e.message))?;
    assert_eq!(
        lease["spec"]["holderIdentity"],
        replicas[follower].name.as_str()
    );

    // The new leader assigns a new pod's identity, and does not redo the first one.
    create("/api/v1/namespaces/default/pods", pod("web-2", "second"))?;
    wait_for("web-2's assignment Assigned", WAIT, || async {
        (assigned_state(&api, "web-2-default-second-id").as_deref() == Some("Assigned"))
            .then_some(())
    })
    .await?;
    replicas[follower].child.check_running()?;
    assert_eq!(
        lower(cloud.assigned_identities(&vmss)?),
        lower(vec![first.resource_id.clone(), second.resource_id.clone()])
    );

    assert_eq!(arm.patch_count(&vmss), 2, "one PATCH per identity added");
    assert_eq!(
        replicas[follower]
            .arm
            .count("PATCH", "virtualMachineScaleSets"),
        1,
        "the new leader patched only the new identity"
    );
    assert_eq!(
        arm.calls()
            .iter()
            .filter(|c| c.method == "PATCH")
            .flat_map(|c| c.added.iter().map(|id| id.to_ascii_lowercase()))
            .collect::<Vec<_>>(),
        vec![
            first.resource_id.to_ascii_lowercase(),
            second.resource_id.to_ascii_lowercase()
        ],
        "each identity added once"
    );
    let items = api
        .get_json(AAI)
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let names: Vec<&str> = items["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|o| o["metadata"]["name"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        names.len(),
        2,
        "no duplicate AzureAssignedIdentity: {names:?}"
    );
    for (replica, pod) in [(leader, "web-1"), (follower, "web-2")] {
        assert_eq!(
            replicas[replica]
                .api
                .count("POST", "azureassignedidentities"),
            1,
            "{} created {pod}'s assignment and nothing else",
            replicas[replica].name
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
