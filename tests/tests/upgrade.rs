//! The in-place upgrade from aad-pod-identity, and back, against the real `mic` (and, in the
//! whole-upgrade test, the real `nmi` in a simulated node): a stand-in for the Go MIC holds
//! upstream's Endpoints leader lock the way client-go does, and podid's mic must stay a
//! follower (no assignment write, no ARM call) until that record expires, then lead and keep
//! the record renewed so a Go replica starting later stays a follower. With
//! `--upstream-leader-lock=false` mic is Lease-only and never touches Endpoints.
//!
//! The stand-in reaches the fake API server in-process, so the server's request log holds
//! only what podid's programs sent: that log counts the assignment writes, the simulated ARM
//! counts the PATCHes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use podid_api::{AzureIdentity, AzureIdentityBinding};
use podid_e2e::upstream::{GoMic, LEADER_ANNOTATION};
use podid_e2e::{ChildGuard, azure, binary, kube, wait_for};
use serde_json::{Value, json};

/// `--leader-election-duration` of every replica (Go and podid): renew every second.
const LEASE: Duration = Duration::from_secs(4);
const WAIT: Duration = Duration::from_secs(60);
const LOCK_NAME: &str = "aad-pod-identity-mic";
const LOCK: &str = "/api/v1/namespaces/default/endpoints/aad-pod-identity-mic";
const AAI: &str = "azureassignedidentities";

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind(("0.0.0.0", 0))?;
    Ok(listener.local_addr()?.port())
}

/// One podid `mic` process and its probe port.
struct Mic {
    child: ChildGuard,
    probe: u16,
}

impl Mic {
    /// Starts mic with `args`, the simulated cloud's endpoints and its own probe and metrics
    /// ports, in `namespace`, authenticated with `kubeconfig`.
    fn spawn(
        name: &str,
        args: &[String],
        kubeconfig: &Path,
        namespace: &str,
        arm_url: &str,
        entra_url: &str,
    ) -> anyhow::Result<Self> {
        let probe = free_port()?;
        let mut command = std::process::Command::new(binary("mic")?);
        command
            .args(args)
            .arg(format!("--arm-endpoint={arm_url}"))
            .arg(format!("--aad-authority={entra_url}"))
            .arg(format!("--http-probe-port={probe}"))
            .arg(format!("--prometheus-port={}", free_port()?))
            .env("KUBECONFIG", kubeconfig)
            .env("MIC_POD_NAMESPACE", namespace)
            .env("RUST_LOG", "info")
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("http_proxy")
            .env_remove("https_proxy");
        Ok(Self {
            child: ChildGuard::spawn(name, command)?,
            probe,
        })
    }

    /// Whether `/healthz` says `Active` (this replica leads with a running loop).
    async fn active(&self, http: &reqwest::Client) -> bool {
        let Ok(answer) = http
            .get(format!("http://127.0.0.1:{}/healthz", self.probe))
            .send()
            .await
        else {
            return false;
        };
        answer.text().await.is_ok_and(|b| b == "Active")
    }
}

fn http() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()?)
}

/// Writes (create, update, patch, delete) podid's programs sent to AzureAssignedIdentities.
fn assignment_writes(api: &kube::FakeApiServer) -> Vec<String> {
    api.faults()
        .requests()
        .into_iter()
        .filter(|r| r.path.contains(AAI) && !matches!(r.verb.as_str(), "get" | "list" | "watch"))
        .map(|r| format!("{} {} -> {}", r.verb, r.path, r.code))
        .collect()
}

/// Requests podid's programs sent to any Endpoints object.
fn endpoints_requests(api: &kube::FakeApiServer) -> Vec<String> {
    api.faults()
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/endpoints"))
        .map(|r| format!("{} {}", r.verb, r.path))
        .collect()
}

/// The holder in upstream's Endpoints lock.
fn endpoints_holder(api: &kube::FakeApiServer) -> Option<String> {
    let lock = api.get_json(LOCK).ok()?;
    let record: Value =
        serde_json::from_str(lock["metadata"]["annotations"][LEADER_ANNOTATION].as_str()?).ok()?;
    record["holderIdentity"].as_str().map(str::to_owned)
}

fn assigned_state(api: &kube::FakeApiServer, namespace: &str, name: &str) -> Option<String> {
    let object = api
        .get_json(&format!(
            "/apis/aadpodidentity.k8s.io/v1/namespaces/{namespace}/{AAI}/{name}"
        ))
        .ok()?;
    object["status"]["status"].as_str().map(str::to_owned)
}

/// A cluster without nodes' network: the fake API server, the simulated Entra and ARM, one
/// scale set with one Node, one identity, its binding and a pod using it.
struct Control {
    api: kube::FakeApiServer,
    cloud: azure::Cloud,
    arm: azure::ArmHandle,
    entra: azure::EntraHandle,
    vmss: azure::ComputeRef,
    identity: azure::UserAssignedIdentity,
    dir: PathBuf,
    azure_json: PathBuf,
    kubeconfig: PathBuf,
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Control {
    async fn start() -> anyhow::Result<Self> {
        azure::install_crypto_provider();
        let cloud = azure::Cloud::new()?;
        let operator = cloud.add_service_principal("mic");
        let secret = cloud.add_client_secret(&operator.client_id)?;
        let entra = azure::EntraHandle::start(&cloud)?;
        let arm = azure::ArmHandle::start(&cloud)?;
        let vmss = cloud.add_vmss(cloud.subscription_id(), cloud.resource_group(), "pool");
        let identity = cloud.add_user_assigned_identity("web");
        let api = kube::FakeApiServer::start().await?;
        let dir = std::env::temp_dir().join(format!("podid-e2e-upgrade-{}", api.addr().port()));
        std::fs::create_dir_all(&dir)?;
        let azure_json = dir.join("azure.json");
        std::fs::write(
            &azure_json,
            json!({
                "cloud": "AzurePublicCloud", "tenantId": cloud.tenant_id(),
                "aadClientId": operator.client_id, "aadClientSecret": secret,
                "subscriptionId": cloud.subscription_id(), "resourceGroup": cloud.resource_group(),
            })
            .to_string(),
        )?;
        let kubeconfig = dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig)?;
        let control = Self {
            api,
            cloud,
            arm,
            entra,
            vmss,
            identity,
            dir,
            azure_json,
            kubeconfig,
        };
        control.create(
            "/api/v1/nodes",
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "pool-0"},
                   "spec": {"providerID": format!("azure://{}/virtualMachines/0", control.vmss.resource_id())}}),
        )?;
        control.create(
            "/apis/aadpodidentity.k8s.io/v1/namespaces/default/azureidentities",
            serde_json::to_value(AzureIdentity::user_assigned(
                "default",
                "web",
                &control.identity.resource_id,
                &control.identity.client_id,
            ))?,
        )?;
        control.create(
            "/apis/aadpodidentity.k8s.io/v1/namespaces/default/azureidentitybindings",
            serde_json::to_value(AzureIdentityBinding::for_selector(
                "default",
                "web-binding",
                "web",
                "web",
            ))?,
        )?;
        control.create(
            "/api/v1/namespaces/default/pods",
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": "web-1", "namespace": "default", "labels": {"aadpodidbinding": "web"}},
                   "spec": {"nodeName": "pool-0", "containers": [{"name": "app", "image": "app"}]},
                   "status": {"phase": "Running"}}),
        )?;
        Ok(control)
    }

    fn create(&self, path: &str, object: Value) -> anyhow::Result<()> {
        self.api
            .create_json(path, object)
            .map(drop)
            .map_err(|e| anyhow::anyhow!("creating under {path}: {}", e.message))
    }

    fn mic(&self, name: &str, extra: &[&str]) -> anyhow::Result<Mic> {
        let mut args = vec![
            format!("--kubeconfig={}", self.kubeconfig.display()),
            format!("--cloudconfig={}", self.azure_json.display()),
            format!("--leader-election-instance={name}"),
            format!("--leader-election-duration={}s", LEASE.as_secs()),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        Mic::spawn(
            name,
            &args,
            &self.kubeconfig,
            "default",
            &self.arm.url(),
            &self.entra.url(),
        )
    }

    fn go_mic(&self, identity: &str) -> GoMic {
        GoMic::start(self.api.handle(), "default", LOCK_NAME, identity, LEASE)
    }
}

/// A Go MIC leads on upstream's Endpoints lock while podid's mic starts: mic stays a follower
/// (not Active, no assignment write, no Lease, no ARM call) as long as the Go record is
/// renewed; once the Go replica stops (its pod deleted) and the record expires, mic leads,
/// assigns, and keeps the Endpoints record renewed, so a Go replica started afterwards stays
/// a follower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_mic_holding_the_endpoints_lock_keeps_mic_a_follower_until_the_record_expires()
-> anyhow::Result<()> {
    let control = Control::start().await?;
    let http = http()?;
    let go = control.go_mic("aad-pod-identity-mic-go-0");
    wait_for("the Go MIC to lead", WAIT, || async {
        go.leading().then_some(())
    })
    .await?;
    control.api.faults().clear_log();
    let mut mic = control.mic("mic-podid-0", &[])?;

    // Two lease durations of Go renewals: mic reads, and that is all.
    let until = Instant::now() + LEASE * 2;
    while Instant::now() < until {
        mic.child.check_running()?;
        assert!(!mic.active(&http).await, "mic leads beside a live Go MIC");
        assert!(go.leading(), "the Go MIC lost its lock to podid's mic");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(assignment_writes(&control.api), Vec::<String>::new());
    assert_eq!(control.api.faults().count("create", "/leases"), 0);
    assert_eq!(control.api.faults().count("update", "/leases"), 0);
    assert_eq!(control.arm.patch_count(&control.vmss), 0);
    assert!(
        control.api.faults().count("get", LOCK) >= 2,
        "mic looked at upstream's lock"
    );
    assert_eq!(
        endpoints_holder(&control.api).as_deref(),
        Some("aad-pod-identity-mic-go-0")
    );

    // The Go MIC's pod is deleted: mic takes over once the record expired.
    let last_renewals = go.renewals();
    go.stop();
    let stopped = Instant::now();
    wait_for("mic to lead", WAIT, || async {
        mic.active(&http).await.then_some(())
    })
    .await?;
    let takeover = stopped.elapsed();
    println!(
        "mic led {} ms after the Go MIC stopped renewing (lease {} s, {last_renewals} Go renewals)",
        takeover.as_millis(),
        LEASE.as_secs()
    );
    // The last Go renewal was at most a retry period (lease / 4) before the stop.
    assert!(
        takeover + LEASE / 4 >= LEASE,
        "mic led {takeover:?} after the stop, before the Go record expired"
    );
    wait_for("web-1's assignment Assigned", WAIT, || async {
        (assigned_state(&control.api, "default", "web-1-default-web").as_deref()
            == Some("Assigned"))
        .then_some(())
    })
    .await?;
    assert_eq!(control.arm.patch_count(&control.vmss), 1);
    assert_eq!(
        endpoints_holder(&control.api).as_deref(),
        Some("mic-podid-0")
    );

    // A Go replica starting now sees a live holder for two lease durations and stays a
    // follower, while mic keeps leading.
    let late = control.go_mic("aad-pod-identity-mic-go-1");
    let until = Instant::now() + LEASE * 2;
    while Instant::now() < until {
        assert!(
            !late.leading(),
            "a Go replica took the lock from a leading mic"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(late.deferred() >= 4, "the Go replica kept trying");
    assert_eq!(late.renewals(), 0);
    assert!(mic.active(&http).await);
    assert_eq!(
        endpoints_holder(&control.api).as_deref(),
        Some("mic-podid-0")
    );
    mic.child.check_running()?;
    Ok(())
}

/// `--upstream-leader-lock=false` (the Go MIC gone): mic leads on the Lease alone, even with a
/// live record in upstream's Endpoints lock, and never reads or writes any Endpoints object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_upstream_leader_lock_mic_is_lease_only_and_never_touches_endpoints()
-> anyhow::Result<()> {
    let control = Control::start().await?;
    let http = http()?;
    let go = control.go_mic("aad-pod-identity-mic-go-0");
    wait_for("the record to exist", WAIT, || async {
        go.leading().then_some(())
    })
    .await?;
    go.stop();
    // A record that stays live for an hour: a mic that looked at it would never lead.
    let mut lock = control
        .api
        .get_json(LOCK)
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    lock["metadata"]["annotations"][LEADER_ANNOTATION] = json!(
        json!({
        "holderIdentity": "aad-pod-identity-mic-go-0", "leaseDurationSeconds": 3600,
        "acquireTime": "2026-01-01T00:00:00Z", "renewTime": "2026-01-01T00:00:00Z",
        "leaderTransitions": 0})
        .to_string()
    );
    control
        .api
        .replace_json(LOCK, lock)
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    control.api.faults().clear_log();
    let mut mic = control.mic("mic-podid-0", &["--upstream-leader-lock=false"])?;
    wait_for("mic to lead", WAIT, || async {
        mic.active(&http).await.then_some(())
    })
    .await?;
    wait_for("web-1's assignment Assigned", WAIT, || async {
        (assigned_state(&control.api, "default", "web-1-default-web").as_deref()
            == Some("Assigned"))
        .then_some(())
    })
    .await?;
    mic.child.check_running()?;
    assert_eq!(endpoints_requests(&control.api), Vec::<String>::new());
    assert!(
        control.api.faults().count("update", "/leases")
            + control.api.faults().count("create", "/leases")
            >= 1
    );
    assert_eq!(
        endpoints_holder(&control.api).as_deref(),
        Some("aad-pod-identity-mic-go-0"),
        "upstream's record untouched"
    );
    Ok(())
}
