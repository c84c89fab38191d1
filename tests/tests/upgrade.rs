//! The in-place upgrade from aad-pod-identity, and back, against the real `mic` (and, in the
//! whole-upgrade test, the real `nmi` replacing a Go NMI stand-in in a simulated node): a stand-in
//! for the Go MIC holds upstream's Endpoints leader lock the way client-go does, and podid's mic
//! must stay a follower (no assignment write, no ARM call) until that record expires, then lead and
//! keep the record renewed so a Go replica starting later stays a follower. With
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
        let [probe, metrics] = podid_e2e::free_ports()?;
        let mut command = std::process::Command::new(binary("mic")?);
        command
            .args(args)
            .arg(format!("--arm-endpoint={arm_url}"))
            .arg(format!("--aad-authority={entra_url}"))
            .arg(format!("--http-probe-port={probe}"))
            .arg(format!("--prometheus-port={metrics}"))
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
    _cloud: azure::Cloud,
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
            _cloud: cloud,
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

/// One token request from the pod during the upgrade: when it finished and whether it got a
/// token.
type Sample = (Instant, bool);

/// The leaders seen at each sampling instant: podid replicas answering `Active` plus Go
/// stand-ins holding the lock.
async fn count_leaders(http: &reqwest::Client, probes: &[u16], gos: &[Arc<GoMic>]) -> usize {
    let mut leaders = gos.iter().filter(|g| g.leading()).count();
    for probe in probes {
        if let Ok(answer) = http
            .get(format!("http://127.0.0.1:{probe}/healthz"))
            .send()
            .await
            && answer.text().await.is_ok_and(|b| b == "Active")
        {
            leaders += 1;
        }
    }
    leaders
}

/// The whole upgrade in the simulated cluster, and back. A release as the Go components leave it:
/// upstream's CRDs, an identity and binding and the assignment of a running pod as the Go MIC wrote
/// them (finalizer, Go's `metadata` blocks pruned to `{}` by upstream's schema, embedded copies),
/// the type-upgrade ConfigMap, the identity on the scale set, two Go MIC replicas on the Endpoints
/// lock, and a stand-in for the Go NMI serving the pod. Then `helm upgrade` with the podid chart
/// rendered by real Helm from values a user keeps, applied over it; mic's Deployment rolls (surge
/// one, then the Go pods are deleted one by one) and nmi's DaemonSet pod is replaced with surge
/// (podid's nmi first, then SIGTERM to the Go NMI), each podid program running with the rendered
/// args under its own ServiceAccount. The pod asks for its token every 100 ms throughout.
///
/// Counted: assignment writes for the existing pod (0), ARM PATCHes (0), pod requests that reached
/// the VM's IMDS past the interception while the Go NMI stand-in was replaced with surge (0),
/// leaders at any sampled instant (≤ 1), and the longest gap between two tokens (reported). Then a
/// new pod is assigned by podid (its AzureAssignedIdentity written under upstream's CRD), and the
/// rollback: podid's pods deleted, a Go replica leads again once podid's record expires, upstream's
/// CRDs applied again, and every AzureAssignedIdentity is one upstream's schema takes as it is
/// (nothing rejected or pruned) with the fields the Go programs read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_upgrade_from_the_go_release_in_place_and_back() -> anyhow::Result<()> {
    use podid_e2e::cluster::{Cluster, NODE, pod_get};
    use podid_e2e::install::{
        apply_over, container_args, kubeconfig_for, nmi_args, node_files, render_release,
        service_account, workload,
    };
    use podid_e2e::upstream;

    const CRDS: &str = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions";
    const GROUP: &str = "/apis/aadpodidentity.k8s.io/v1/namespaces/default";
    let mut cluster = Cluster::start().await?;
    let http = http()?;

    // The Go release.
    for crd in upstream::crds()? {
        cluster.create(CRDS, crd)?;
    }
    let web = cluster.cloud.add_user_assigned_identity("web");
    cluster.cloud.assign_identity(&cluster.vmss, &web)?;
    let go_meta = json!({"creationTimestamp": null});
    cluster.create(
        &format!("{GROUP}/azureidentities"),
        json!({"apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity",
               "metadata": {"name": "web", "namespace": "default"},
               "spec": {"metadata": go_meta, "type": 0, "resourceID": web.resource_id,
                        "clientID": web.client_id, "clientPassword": {},
                        "auxiliaryTenantIDs": null, "replicas": null},
               "status": {"metadata": go_meta}}),
    )?;
    cluster.create(
        &format!("{GROUP}/azureidentitybindings"),
        json!({"apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentityBinding",
               "metadata": {"name": "web-binding", "namespace": "default"},
               "spec": {"metadata": go_meta, "azureIdentity": "web", "selector": "web"},
               "status": {"metadata": go_meta, "availableReplicas": 0}}),
    )?;
    let handle = cluster.api.handle();
    let get = |path: &str| {
        handle
            .get_json(path)
            .map_err(|e| anyhow::anyhow!("reading {path}: {}", e.message))
    };
    let pod = Arc::new(cluster.node.add_pod("web")?);
    cluster.add_pod("web-1", Some("web"), pod.ip())?;
    cluster.create(
        &format!("{GROUP}/{AAI}"),
        json!({"apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureAssignedIdentity",
               "metadata": {"name": "web-1-default-web", "namespace": "default",
                            "labels": {"nodename": NODE},
                            "finalizers": [podid_api::ASSIGNED_IDENTITY_FINALIZER]},
               "spec": {"metadata": go_meta,
                        "azureIdentityRef": get(&format!("{GROUP}/azureidentities/web"))?,
                        "azureBindingRef": get(&format!("{GROUP}/azureidentitybindings/web-binding"))?,
                        "pod": "web-1", "podNamespace": "default", "nodename": NODE,
                        "replicas": null},
               "status": {"metadata": go_meta, "status": "Assigned", "availableReplicas": 1}}),
    )?;
    let go_written = get(&format!("{GROUP}/{AAI}/web-1-default-web"))?;
    assert_eq!(
        go_written["spec"]["metadata"],
        json!({}),
        "upstream's schema prunes Go's creationTimestamp: null"
    );
    cluster.create(
        "/api/v1/namespaces/kube-system/configmaps",
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "aad-pod-identity-config", "namespace": "kube-system"},
               "data": {"type-upgrade-status": "1.8.17"}}),
    )?;
    let go_mic = |name: &str| {
        Arc::new(GoMic::start(
            handle.clone(),
            "default",
            LOCK_NAME,
            name,
            LEASE,
        ))
    };
    let go_a = go_mic("aad-pod-identity-mic-6d8f9-go-a");
    wait_for("the Go MIC to lead", WAIT, || async {
        go_a.leading().then_some(())
    })
    .await?;
    let go_b = go_mic("aad-pod-identity-mic-6d8f9-go-b");
    // The Go release's node agent: a stand-in for the Go NMI that installs upstream's rules,
    // holds the port, relays pods' requests to the VM's IMDS, and on SIGTERM deletes its chain
    // and exits 10 s later.
    let mut go_nmi = cluster.start_go_nmi(Duration::from_secs(10))?;

    // The pod asks for its token every 100 ms from now on; leaders are sampled every 100 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let token_path = format!(
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net&client_id={}",
        web.client_id
    );
    let tokens = tokio::spawn({
        let (pod, stop, token_path) = (pod.clone(), stop.clone(), token_path.clone());
        async move {
            let mut samples: Vec<Sample> = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let ok = matches!(pod_get(&pod, &token_path, true).await, Ok((200, _, _)));
                samples.push((Instant::now(), ok));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            samples
        }
    });
    let probes: Arc<std::sync::Mutex<Vec<u16>>> = Arc::default();
    let max_leaders = Arc::new(AtomicUsize::new(0));
    let sampler = tokio::spawn({
        let (stop, probes, max_leaders, http) = (
            stop.clone(),
            probes.clone(),
            max_leaders.clone(),
            http.clone(),
        );
        let gos = vec![go_a.clone(), go_b.clone()];
        async move {
            let mut samples = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let ports = probes.lock().expect("probes").clone();
                let leaders = count_leaders(&http, &ports, &gos).await;
                max_leaders.fetch_max(leaders, Ordering::SeqCst);
                samples += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            samples
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;

    // helm upgrade: the chart rendered by real Helm with the values a user keeps from
    // upstream (no image keys), applied over the release (CRDs left alone, as Helm does).
    cluster.api.faults().clear_log();
    let patches_before = cluster.arm.patch_count(&cluster.vmss);
    let kept = json!({
        "forceNamespaced": "false",
        "installMICException": "true",
        "mic": {"replicas": 2, "leaderElection": {"duration": format!("{}s", LEASE.as_secs())}},
        "nmi": {"probePort": "8085", "metadataHeaderRequired": true},
    });
    let objects = render_release("aad-pod-identity", "kube-system", &kept, false)?;
    let replaced = apply_over(&cluster, &objects)?;
    println!("helm upgrade replaced {replaced:?}");
    let mic_workload = workload(&objects, "Deployment")?;
    let nmi_workload = workload(&objects, "DaemonSet")?;
    let mic_account = service_account(mic_workload)?;
    let azure_json = cluster.write_azure_json()?;
    let mic_kubeconfig = kubeconfig_for(&cluster, &mic_account)?;
    let mut mic_args = node_files(
        &cluster,
        container_args(mic_workload, "mic")?,
        &[("/etc/kubernetes/azure.json", &azure_json)],
    );
    mic_args.push(format!("--kubeconfig={}", mic_kubeconfig.display()));
    assert!(
        !mic_args
            .iter()
            .any(|a| a.starts_with("--upstream-leader-lock")),
        "the compatibility lock is on by default: {mic_args:?}"
    );
    let spawn = |pod_name: &str| -> anyhow::Result<Mic> {
        // In a pod the instance defaults to the host name, the pod's name.
        let mut args = mic_args.clone();
        args.push(format!("--leader-election-instance={pod_name}"));
        let mic = Mic::spawn(
            pod_name,
            &args,
            &mic_kubeconfig,
            &mic_account.0,
            &cluster.arm.url(),
            &cluster.entra_url,
        )?;
        probes.lock().expect("probes").push(mic.probe);
        Ok(mic)
    };
    // The Deployment's rolling update (2 replicas: surge 1, unavailable 0).
    let mut mic_a = spawn("aad-pod-identity-mic-7c4b5-p1")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    go_b.stop();
    let mut mic_b = spawn("aad-pod-identity-mic-7c4b5-p2")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    go_a.stop();
    // The DaemonSet's pod on the node is replaced with the chart's surge: podid's nmi starts
    // while the Go NMI still holds the port, then the Go NMI gets SIGTERM (its clean-up deletes
    // the chain) and exits after its grace period.
    let nmi_kubeconfig = kubeconfig_for(&cluster, &service_account(nmi_workload)?)?;
    let nmi = nmi_args(&cluster, nmi_workload)?;
    cluster.spawn_nmi_exactly(&nmi, &nmi_kubeconfig)?;
    cluster.wait_unready("imds_listener").await?;
    go_nmi.terminate()?;
    go_nmi.wait_exit(Duration::from_secs(30)).await?;
    cluster.wait_ready().await?;
    wait_for("a podid mic to lead", WAIT, || async {
        (mic_a.active(&http).await || mic_b.active(&http).await).then_some(())
    })
    .await?;

    // A new pod: podid assigns it (its object written under upstream's CRD). By the time it is
    // Assigned, mic's passes have covered the Go-written assignment too.
    let pod2 = Arc::new(cluster.node.add_pod("web2")?);
    cluster.add_pod("web-2", Some("web"), pod2.ip())?;
    wait_for("web-2's assignment Assigned", WAIT, || async {
        (assigned_state(&cluster.api, "default", "web-2-default-web").as_deref()
            == Some("Assigned"))
        .then_some(())
    })
    .await?;
    // Two more lease durations of steady state.
    tokio::time::sleep(LEASE * 2).await;
    mic_a.child.check_running()?;
    mic_b.child.check_running()?;
    stop.store(true, Ordering::SeqCst);
    let samples = tokens.await?;
    let sampled = sampler.await?;

    // Every write but web-2's: its create (to the collection) and its status patch.
    let all_writes = assignment_writes(&cluster.api);
    let creates = all_writes
        .iter()
        .filter(|w| w.starts_with("create "))
        .count();
    assert_eq!(
        creates, 1,
        "only web-2's assignment is created: {all_writes:?}"
    );
    let writes: Vec<String> = all_writes
        .into_iter()
        .filter(|w| !w.contains("web-2-default-web") && !w.starts_with("create "))
        .collect();
    let patches = cluster.arm.patch_count(&cluster.vmss) - patches_before;
    let reached_imds = cluster.reached_imds(&pod) + cluster.reached_imds(&pod2);
    let leaders = max_leaders.load(Ordering::SeqCst);
    let served = samples.iter().filter(|(_, ok)| *ok).count();
    let mut longest = Duration::ZERO;
    let mut last_ok = samples.first().map(|(at, _)| *at);
    for (at, ok) in &samples {
        if *ok {
            if let Some(last) = last_ok {
                longest = longest.max(at.saturating_duration_since(last));
            }
            last_ok = Some(*at);
        }
    }
    println!(
        "upgrade: assignment writes for existing pods {}, ARM PATCHes {patches}, pod requests that \
         reached the VM's IMDS {reached_imds}, max leaders {leaders} over {sampled} samples, tokens \
         {served}/{} requests, longest gap between tokens {} ms",
        writes.len(),
        samples.len(),
        longest.as_millis()
    );
    assert_eq!(
        writes,
        Vec::<String>::new(),
        "the Go-written assignment was rewritten"
    );
    assert_eq!(patches, 0, "ARM PATCH during the upgrade");
    assert_eq!(
        reached_imds, 0,
        "a pod reached the VM's IMDS during the node swap"
    );
    assert!(leaders <= 1, "{leaders} leaders at once");
    assert!(sampled >= 20, "only {sampled} leader samples");
    assert!(served > 10, "the pod got {served} tokens");
    assert!(
        samples.last().is_some_and(|(_, ok)| *ok),
        "the pod's last request failed"
    );
    let refused: Vec<_> = podid_e2e::install::refused(&cluster);
    assert!(refused.is_empty(), "RBAC refused: {refused:#?}");
    assert!(
        !endpoints_requests(&cluster.api).is_empty(),
        "mic kept upstream's lock under the chart's RBAC"
    );

    // Rollback: podid's pods deleted (no clean release), upstream's objects applied again, a
    // Go replica leads once podid's record expired.
    let podid_holder = endpoints_holder(&cluster.api).context("podid's record")?;
    assert!(
        podid_holder.starts_with("aad-pod-identity-mic-7c4b5-"),
        "{podid_holder}"
    );
    mic_a.child.kill();
    mic_b.child.kill();
    let rolled_back = Instant::now();
    let go_c = go_mic("aad-pod-identity-mic-6d8f9-go-c");
    wait_for("the Go MIC to lead again", WAIT, || async {
        go_c.leading().then_some(())
    })
    .await?;
    println!(
        "rollback: a Go replica led {} ms after podid's pods were deleted",
        rolled_back.elapsed().as_millis()
    );
    assert!(rolled_back.elapsed() + LEASE / 4 >= LEASE);
    apply_over(&cluster, &upstream::crds()?)?;
    let list = get(&format!("{GROUP}/{AAI}"))?;
    let items = list["items"].as_array().context("items")?;
    assert_eq!(items.len(), 2, "{items:#?}");
    for item in items {
        let name = item["metadata"]["name"].as_str().unwrap_or_default();
        assert_eq!(upstream::problems(item), Vec::<String>::new(), "{name}");
        assert_eq!(item["status"]["status"], "Assigned", "{name}");
        assert_eq!(item["spec"]["nodename"], NODE, "{name}");
        assert_eq!(item["metadata"]["labels"]["nodename"], NODE, "{name}");
        assert_eq!(
            item["metadata"]["finalizers"],
            json!([podid_api::ASSIGNED_IDENTITY_FINALIZER]),
            "{name}"
        );
        assert_eq!(
            item["spec"]["azureIdentityRef"]["spec"]["clientID"], web.client_id,
            "{name}"
        );
        assert_eq!(
            item["spec"]["azureBindingRef"]["spec"]["selector"], "web",
            "{name}"
        );
        let annotations: Vec<&String> = item["metadata"]["annotations"]
            .as_object()
            .map(|a| a.keys().collect())
            .unwrap_or_default();
        println!("{name}: annotations {annotations:?}");
    }
    assert_eq!(
        get(&format!("{GROUP}/{AAI}/web-1-default-web"))?,
        go_written,
        "the Go-written assignment is byte for byte as the Go MIC left it"
    );
    for path in [
        format!("{GROUP}/azureidentities/web"),
        format!("{GROUP}/azureidentitybindings/web-binding"),
    ] {
        assert_eq!(
            upstream::problems(&get(&path)?),
            Vec::<String>::new(),
            "{path}"
        );
    }
    assert!(
        cluster
            .cloud
            .assigned_identities(&cluster.vmss)?
            .iter()
            .any(|id| id.eq_ignore_ascii_case(&web.resource_id)),
        "the identity stays on the scale set"
    );
    Ok(())
}
