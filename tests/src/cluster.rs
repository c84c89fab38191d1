//! A simulated cluster of one node running the real `nmi`: the node namespace with its VM's IMDS,
//! the fake API server and the simulated Entra reachable from inside the node, and helpers that
//! create the cluster's objects and speak HTTP from inside pods. Shared by the nmi suite and the
//! demo.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use podid_api::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzurePodIdentityException,
};
use serde_json::{Value, json};

use crate::{
    ChildGuard, Sdk, SdkCredential, SdkOutcome, SdkRun, SdkSelector, azure, binary, kube, netns,
    sdk_get_token, sdk_run,
};

/// The simulated node's Kubernetes name.
pub const NODE: &str = "aks-nodepool1-12345678-vmss000000";
/// The scope the SDK asks for.
pub const SCOPE: &str = "https://vault.azure.net/.default";
/// nmi's probe port in the suites.
pub const PROBE_PORT: u16 = 8085;

/// Which binary's `/metrics` to read.
#[derive(Debug, Clone, Copy)]
pub enum Component {
    /// mic, on the host.
    Mic,
    /// nmi, in the node.
    Nmi,
}

/// One simulated node running nmi, with everything around it.
pub struct Cluster {
    /// The node namespace.
    pub node: Arc<netns::SimNode>,
    /// The fake API server (reachable from the node).
    pub api: kube::FakeApiServer,
    /// The simulated Azure.
    pub cloud: azure::Cloud,
    /// The node VM's IMDS on 169.254.169.254:80 inside the node.
    pub imds: azure::ImdsHandle,
    /// The node's scale set.
    pub vmss: azure::ComputeRef,
    _entra: azure::EntraHandle,
    /// Entra's base URL (an identity's `adEndpoint`).
    pub entra_url: String,
    dir: PathBuf,
    /// The running nmi, if any.
    pub nmi: Option<ChildGuard>,
    /// The simulated ARM (on the host's loopback: mic runs outside the node, like a Deployment).
    pub arm: azure::ArmHandle,
    /// The running mic, if any.
    pub mic: Option<ChildGuard>,
    /// mic's `--http-probe-port` once spawned.
    mic_probe: Option<u16>,
    mic_metrics: Option<u16>,
    /// Where nmi's and mic's output goes; `None` (default) inherits the caller's stdout/stderr.
    pub child_log: Option<PathBuf>,
    /// nmi's `RUST_LOG` (default `info`), e.g. to see its debug lines in `child_log`.
    pub nmi_log_filter: Option<String>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.node.name())
            .field("api", &self.api.url())
            .field("entra", &self.entra_url)
            .finish_non_exhaustive()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut nmi) = self.nmi.take() {
            nmi.kill();
        }
        if let Some(mut mic) = self.mic.take() {
            mic.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Cluster {
    /// A node namespace with its IMDS, the fake API server and Entra on the host side of the
    /// node's veth, and the Node object.
    pub async fn start() -> anyhow::Result<Self> {
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
        let arm = azure::ArmHandle::start(&cloud)?;
        let cluster = Self {
            node,
            api,
            cloud,
            imds,
            vmss,
            _entra: entra,
            arm,
            mic: None,
            mic_probe: None,
            mic_metrics: None,
            child_log: None,
            nmi_log_filter: None,
            entra_url,
            dir,
            nmi: None,
        };
        Ok(cluster)
    }

    /// Creates an object under `path` on the fake API server.
    pub fn create(&self, path: &str, object: Value) -> anyhow::Result<()> {
        self.api
            .create_json(path, object)
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!("creating under {path}: {}", e.message))
    }

    /// A Running pod object on this node, labelled `aadpodidbinding=<label>` when given.
    pub fn add_pod(&self, name: &str, label: Option<&str>, ip: Ipv4Addr) -> anyhow::Result<()> {
        match label {
            Some(label) => self.add_pod_with_labels(name, &[("aadpodidbinding", label)], ip),
            None => self.add_pod_with_labels(name, &[], ip),
        }
    }

    /// A Running pod object on this node with exactly `labels`.
    pub fn add_pod_with_labels(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        ip: Ipv4Addr,
    ) -> anyhow::Result<()> {
        self.add_pod_in("default", name, labels, ip)
    }

    /// A Running pod object in `namespace` on this node with exactly `labels`, running as the
    /// namespace's `default` service account.
    pub fn add_pod_in(
        &self,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
        ip: Ipv4Addr,
    ) -> anyhow::Result<()> {
        let labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect();
        let uid = if namespace == "default" {
            format!("uid-{name}")
        } else {
            format!("uid-{namespace}-{name}")
        };
        self.create(
            &format!("/api/v1/namespaces/{namespace}/pods"),
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace, "labels": labels, "uid": uid},
                "spec": {"nodeName": NODE, "serviceAccountName": "default", "containers": [{"name": "app", "image": "app"}]},
                "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]}
            }),
        )
    }

    /// A namespace.
    pub fn create_namespace(&self, name: &str) -> anyhow::Result<()> {
        self.create(
            "/api/v1/namespaces",
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
        )
    }

    /// A ServiceAccount `namespace/name`.
    pub fn create_service_account(&self, namespace: &str, name: &str) -> anyhow::Result<()> {
        self.create(
            &format!("/api/v1/namespaces/{namespace}/serviceaccounts"),
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}}),
        )
    }

    /// A Secret in `default` holding `data` (base64-encoded here).
    pub fn create_secret(&self, name: &str, data: &[(&str, &[u8])]) -> anyhow::Result<()> {
        self.create_secret_in("default", name, data)
    }

    /// A Secret in `namespace` holding `data` (base64-encoded here).
    pub fn create_secret_in(
        &self,
        namespace: &str,
        name: &str,
        data: &[(&str, &[u8])],
    ) -> anyhow::Result<()> {
        use base64::Engine as _;
        let data: serde_json::Map<String, Value> = data
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_owned(),
                    json!(base64::engine::general_purpose::STANDARD.encode(v)),
                )
            })
            .collect();
        self.create(
            &format!("/api/v1/namespaces/{namespace}/secrets"),
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace}, "data": data}),
        )
    }

    /// An `AzurePodIdentityException` in `default` for pods carrying any one of `pod_labels`.
    pub fn add_exception(&self, name: &str, pod_labels: &[(&str, &str)]) -> anyhow::Result<()> {
        let exception = AzurePodIdentityException::for_pod_labels(
            "default",
            name,
            pod_labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        self.create(
            "/apis/aadpodidentity.k8s.io/v1/namespaces/default/azurepodidentityexceptions",
            serde_json::to_value(&exception)?,
        )
    }

    /// An identity, its binding for `selector`, and (standard mode, standing in for MIC) the
    /// `Assigned` AzureAssignedIdentity for `pod`.
    pub fn bind(&self, identity: &AzureIdentity, selector: &str, pod: &str) -> anyhow::Result<()> {
        self.bind_in(identity, selector, pod)
    }

    /// An identity and its binding `<name>-binding` for `selector`, both in the identity's
    /// namespace (what an application team applies; MIC or the test assigns it).
    pub fn add_identity_and_binding(
        &self,
        identity: &AzureIdentity,
        selector: &str,
    ) -> anyhow::Result<AzureIdentityBinding> {
        let name = identity.metadata.name.clone().unwrap_or_default();
        let namespace = identity
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned());
        self.create(
            &format!("/apis/aadpodidentity.k8s.io/v1/namespaces/{namespace}/azureidentities"),
            serde_json::to_value(identity)?,
        )?;
        let binding = AzureIdentityBinding::for_selector(
            &namespace,
            &format!("{name}-binding"),
            &name,
            selector,
        );
        self.create(
            &format!("/apis/aadpodidentity.k8s.io/v1/namespaces/{namespace}/azureidentitybindings"),
            serde_json::to_value(&binding)?,
        )?;
        Ok(binding)
    }

    /// [`Cluster::bind`] for an identity, binding and pod in the identity's namespace (the
    /// assignment lives in `default`, MIC's namespace).
    pub fn bind_in(
        &self,
        identity: &AzureIdentity,
        selector: &str,
        pod: &str,
    ) -> anyhow::Result<()> {
        let namespace = identity
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned());
        let binding = self.add_identity_and_binding(identity, selector)?;
        let assigned = AzureAssignedIdentity::for_pod(
            "default",
            pod,
            &namespace,
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

    fn redirect(&self, command: &mut std::process::Command) -> anyhow::Result<()> {
        if let Some(path) = &self.child_log {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            command.stdout(file.try_clone()?).stderr(file);
        }
        Ok(())
    }

    /// Writes the cloud config mic reads (`azure.json`: a service principal of the simulated
    /// cloud, its subscription and resource group, `vmType: vmss`) and returns its path.
    pub fn write_azure_json(&self) -> anyhow::Result<PathBuf> {
        let operator = self.cloud.add_service_principal("mic");
        let secret = self.cloud.add_client_secret(&operator.client_id)?;
        let azure_json = self.dir.join("azure.json");
        std::fs::write(
            &azure_json,
            self.cloud.azure_json(&operator.client_id, &secret),
        )?;
        Ok(azure_json)
    }

    /// Starts the real `mic` on the host (like its Deployment), logging in to the simulated ARM
    /// as a service principal through the simulated Entra.
    pub fn spawn_mic(&mut self) -> anyhow::Result<()> {
        let azure_json = self.write_azure_json()?;
        let kubeconfig = self.dir.join("kubeconfig");
        let args = [
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--cloudconfig={}", azure_json.display()),
        ];
        self.spawn_mic_with(&args, &kubeconfig, "default")
    }

    /// Starts the real `mic` on the host with `args` (for example a rendered Deployment's
    /// container args, node paths mapped into the test's directory) plus what only the test
    /// environment knows: the simulated cloud's ARM and Entra endpoints and free probe and
    /// metrics ports. It authenticates with `kubeconfig` (`KUBECONFIG`), as its pod would with
    /// its ServiceAccount, and runs in `namespace` (`MIC_POD_NAMESPACE`).
    pub fn spawn_mic_with(
        &mut self,
        args: &[String],
        kubeconfig: &Path,
        namespace: &str,
    ) -> anyhow::Result<()> {
        let [probe, metrics] = crate::free_ports()?;
        let mut command = std::process::Command::new(binary("mic")?);
        command
            .args(args)
            .arg(format!("--arm-endpoint={}", self.arm.url()))
            .arg(format!("--aad-authority={}", self.entra_url))
            .arg(format!("--http-probe-port={probe}"))
            .arg(format!("--prometheus-port={metrics}"))
            .env("KUBECONFIG", kubeconfig)
            .env("MIC_POD_NAMESPACE", namespace)
            .env("RUST_LOG", "info");
        self.redirect(&mut command)?;
        self.mic = Some(ChildGuard::spawn("mic", command)?);
        self.mic_probe = Some(probe);
        self.mic_metrics = Some(metrics);
        Ok(())
    }

    /// Starts the real `nmi` inside the node with exactly `args` (a rendered DaemonSet's
    /// container args, `$(NODE_NAME)` expanded), authenticated with `kubeconfig` as its pod
    /// would be with its ServiceAccount; `NODE_NAME` is this node.
    pub fn spawn_nmi_exactly(&mut self, args: &[String], kubeconfig: &Path) -> anyhow::Result<()> {
        let mut command = self.node.command(binary("nmi")?);
        command
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("NODE_NAME", NODE)
            .env("RUST_LOG", self.nmi_log_filter.as_deref().unwrap_or("info"));
        self.redirect(&mut command)?;
        self.nmi = Some(ChildGuard::spawn("nmi", command)?);
        Ok(())
    }

    /// A directory of this cluster's own, removed with it (kubeconfigs, rendered manifests).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The `/metrics` text of mic (`Component::Mic`, on the host) or nmi (in the node).
    pub async fn metrics_text(&self, component: Component) -> anyhow::Result<String> {
        let url = match component {
            Component::Mic => format!(
                "http://127.0.0.1:{}/metrics",
                self.mic_metrics.context("mic was not spawned")?
            ),
            Component::Nmi => format!("http://{}:9090/metrics", self.node.ip()),
        };
        let response = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()?
            .get(&url)
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "{url}: {}",
            response.status()
        );
        Ok(response.text().await?)
    }

    /// Waits until mic leads with its caches synced (`/healthz` says `Active`), failing if it
    /// exits or takes over 30 s.
    pub async fn wait_mic_active(&mut self) -> anyhow::Result<()> {
        let port = self.mic_probe.context("mic was not spawned")?;
        let url = format!("http://127.0.0.1:{port}/healthz");
        wait_probe(&url, self.mic.as_mut(), Some("Active")).await
    }

    /// Waits until nmi's `/readyz` answers 503 with a body containing `needle` (failing after
    /// 30 s or when nmi exits); returns the body.
    pub async fn wait_unready(&mut self, needle: &str) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(nmi) = self.nmi.as_mut() {
                nmi.check_running()?;
            }
            if let Ok((503, body)) = self.probe("/readyz").await
                && body.contains(needle)
            {
                return Ok(body);
            }
            anyhow::ensure!(Instant::now() < deadline, "/readyz never said {needle:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts a stand-in for the Go NMI on the node ([`UpstreamNmi`], SIGTERM grace `grace`) the
    /// way a node of an upstream release runs it: `route_localnet` set (the Go NMI relies on
    /// kube-proxy for it), and IMDS's throttling off (the stand-in asks IMDS once per pod
    /// request, so a pod asking in a loop must not trip it).
    pub fn start_go_nmi(&self, grace: Duration) -> anyhow::Result<UpstreamNmi> {
        self.imds.set_throttling(false);
        self.node.sysctl("net.ipv4.conf.all.route_localnet", "1")?;
        UpstreamNmi::start(&self.node, grace)
    }

    /// Requests from `pod`'s address that reached the VM's IMDS itself, past any interception.
    pub fn reached_imds(&self, pod: &netns::SimPod) -> u64 {
        self.imds
            .counters()
            .per_source
            .get(&std::net::IpAddr::V4(pod.ip()))
            .copied()
            .unwrap_or(0)
    }

    /// Starts the real `nmi` inside the node namespace. The simulated Entra is an authority
    /// over http on a test address, so nmi is told to allow it (`--allowed-authorities`, merged
    /// with any list in `extra`).
    pub fn spawn_nmi(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        let command = self.node.command(binary("nmi")?);
        self.spawn_nmi_command(command, extra)
    }

    /// Starts the real `nmi` inside the node namespace the way its image runs it: `entrypoint`
    /// inside the root filesystem `root`, as `user`, with a fresh `/proc` and this cluster's
    /// directory (kubeconfig, kubelet config) mounted read-only at the same path
    /// ([`crate::image::contained`]).
    pub fn spawn_nmi_contained(
        &mut self,
        root: &Path,
        user: &str,
        entrypoint: &str,
        extra: &[&str],
    ) -> anyhow::Result<()> {
        let node = Arc::clone(&self.node);
        let command = crate::image::contained(
            |program| node.command(program),
            root,
            user,
            &[self.dir.as_path()],
            entrypoint,
        );
        self.spawn_nmi_command(command, extra)
    }

    /// Starts the real `nmi` inside the node namespace with `flavour` (`iptables-legacy`) as the
    /// `iptables` it finds first on its `PATH`.
    pub fn spawn_nmi_with_iptables(&mut self, flavour: &str, extra: &[&str]) -> anyhow::Result<()> {
        let target = installed(flavour)?;
        self.spawn_nmi_with_iptables_script(
            &format!("{flavour}-bin"),
            &format!("#!/bin/sh\nexec {} \"$@\"\n", target.display()),
            extra,
        )
    }

    /// Starts the real `nmi` inside the node namespace with an `iptables` that fails (exit 1)
    /// while the returned file exists, and is the node's `iptables` otherwise.
    pub fn spawn_nmi_with_failing_iptables(&mut self, extra: &[&str]) -> anyhow::Result<PathBuf> {
        let flag = self.dir.join("iptables-fails");
        let target = installed("iptables")?;
        self.spawn_nmi_with_iptables_script(
            "failing-bin",
            &format!(
                "#!/bin/sh\n[ -e {} ] && exit 1\nexec {} \"$@\"\n",
                flag.display(),
                target.display()
            ),
            extra,
        )?;
        Ok(flag)
    }

    fn spawn_nmi_with_iptables_script(
        &mut self,
        dir: &str,
        script: &str,
        extra: &[&str],
    ) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        let bin = self.dir.join(dir);
        std::fs::create_dir_all(&bin)?;
        let wrapper = bin.join("iptables");
        std::fs::write(&wrapper, script)?;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![bin];
        paths.extend(std::env::split_paths(&path));
        let mut command = self.node.command(binary("nmi")?);
        command.env("PATH", std::env::join_paths(paths)?);
        self.spawn_nmi_command(command, extra)
    }

    /// Starts the real `nmi` inside the node namespace with `/proc/sys` read-only, in a mount
    /// namespace of its own, the way a container runtime mounts it for an unprivileged
    /// container: nmi can read `route_localnet` but not set it.
    pub fn spawn_nmi_read_only_proc_sys(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        let mut command = self.node.command("unshare");
        command.args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec \"$@\"",
            "nmi",
        ]);
        command.arg(binary("nmi")?);
        self.spawn_nmi_command(command, extra)
    }

    /// Runs `nmi uninstall-interception` inside the node and returns its stdout.
    pub fn uninstall_interception(&self) -> anyhow::Result<String> {
        self.uninstall_interception_with(&[])
    }

    /// `nmi uninstall-interception` followed by `args`, run in the node's namespace; its
    /// stdout.
    pub fn uninstall_interception_with(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = self
            .node
            .command(binary("nmi")?)
            .arg("uninstall-interception")
            .args(args)
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "nmi uninstall-interception failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn spawn_nmi_command(
        &mut self,
        mut command: std::process::Command,
        extra: &[&str],
    ) -> anyhow::Result<()> {
        const FLAG: &str = "--allowed-authorities=";
        let mut allowed = vec![self.entra_url.clone()];
        let mut extra: Vec<String> = extra
            .iter()
            .filter(|arg| match arg.strip_prefix(FLAG) {
                Some(list) => {
                    allowed.push(list.to_owned());
                    false
                }
                None => true,
            })
            .map(|arg| (*arg).to_owned())
            .collect();
        extra.push(format!("{FLAG}{}", allowed.join(",")));
        // A 1 s reconcile pass unless the test chose one.
        if !extra
            .iter()
            .any(|arg| arg.starts_with("--ipt-update-interval-sec"))
        {
            extra.push("--ipt-update-interval-sec=1".to_owned());
        }
        command
            .arg(format!("--node={NODE}"))
            .arg(format!("--http-probe-port={PROBE_PORT}"))
            .arg("--prometheus-port=9090")
            .arg(format!(
                "--kubelet-config={}",
                self.dir.join("kubelet").display()
            ))
            .args(&extra)
            .env("KUBECONFIG", self.dir.join("kubeconfig"))
            .env("RUST_LOG", self.nmi_log_filter.as_deref().unwrap_or("info"));
        self.redirect(&mut command)?;
        self.nmi = Some(ChildGuard::spawn("nmi", command)?);
        Ok(())
    }

    /// Waits until nmi's `/readyz` answers 200.
    pub async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let url = format!("http://{}:{PROBE_PORT}/readyz", self.node.ip());
        wait_probe(&url, self.nmi.as_mut(), None).await
    }

    /// nmi's probe `path` (`/readyz`, `/healthz`) from the host: (status, body).
    pub async fn probe(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let url = format!("http://{}:{PROBE_PORT}{path}", self.node.ip());
        let response = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .build()?
            .get(url)
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.text().await?))
    }

    /// nmi's `/metrics` exposition from the host.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let url = format!("http://{}:9090/metrics", self.node.ip());
        Ok(reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .build()?
            .get(url)
            .send()
            .await?
            .text()
            .await?)
    }

    /// The `events.k8s.io/v1` Events about the Node, as the API server holds them.
    pub fn node_events(&self) -> anyhow::Result<Vec<Value>> {
        let list = self
            .api
            .get_json("/apis/events.k8s.io/v1/namespaces/default/events")
            .map_err(|e| anyhow::anyhow!("listing events: {}", e.message))?;
        Ok(list["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e["regarding"]["kind"] == "Node" && e["regarding"]["name"] == NODE)
            .collect())
    }

    /// Waits (bounded by `within`) for an Event with `reason` on pod `namespace/pod` and
    /// returns it.
    pub async fn pod_event(
        &self,
        namespace: &str,
        pod: &str,
        reason: &str,
        within: Duration,
    ) -> anyhow::Result<Value> {
        crate::wait_for(
            &format!("a {reason} event on {namespace}/{pod}"),
            within,
            || async {
                let list = self
                    .api
                    .get_json(&format!(
                        "/apis/events.k8s.io/v1/namespaces/{namespace}/events"
                    ))
                    .ok()?;
                list["items"]
                    .as_array()?
                    .iter()
                    .find(|e| {
                        e["regarding"]["kind"] == "Pod"
                            && e["regarding"]["name"] == pod
                            && e["reason"] == reason
                    })
                    .cloned()
            },
        )
        .await
    }

    /// `iptables -t nat -S aad-metadata` inside the node.
    pub fn chain(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .node
            .iptables(&["-t", "nat", "-S", "aad-metadata"])?
            .lines()
            .map(str::to_owned)
            .collect())
    }
}

/// Where `name` (`iptables`, `iptables-legacy`) is installed.
fn installed(name: &str) -> anyhow::Result<PathBuf> {
    ["/usr/sbin", "/sbin", "/usr/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.exists())
        .with_context(|| format!("{name} is not installed"))
}

/// The stand-in for aad-pod-identity's Go NMI (`upstream-nmi`, tests/src/bin) running in a
/// node: upstream's chain and jump, the IMDS port held and served, both removed on SIGTERM, the
/// process gone after its grace period. Killed when dropped.
#[derive(Debug)]
pub struct UpstreamNmi {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl UpstreamNmi {
    /// Starts it in `node` with a SIGTERM grace period of `grace` (upstream: 10 s) and waits
    /// until its rules are in and the port is bound.
    pub fn start(node: &netns::SimNode, grace: Duration) -> anyhow::Result<Self> {
        let mut child = node
            .command(binary("upstream-nmi")?)
            .arg(format!("--grace-ms={}", grace.as_millis()))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("spawning upstream-nmi")?;
        let stdout = child.stdout.take().context("upstream-nmi stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut nmi = Self { child, lines };
        nmi.expect_line("ready")?;
        Ok(nmi)
    }

    fn expect_line(&mut self, want: &str) -> anyhow::Result<()> {
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(30))
            .with_context(|| format!("upstream-nmi never said {want:?}"))?;
        anyhow::ensure!(line == want, "upstream-nmi said {line:?}, not {want:?}");
        Ok(())
    }

    /// Sends SIGTERM (what the kubelet does when the DaemonSet replaces the pod) and waits until
    /// its clean-up removed the rules; the process lives on for its grace period.
    pub fn terminate(&mut self) -> anyhow::Result<()> {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM failed");
        self.expect_line("cleaned")
    }

    /// Waits (up to `within`) for the process to exit.
    pub async fn wait_exit(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        while self.child.try_wait()?.is_none() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "upstream-nmi still runs after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }
}

impl Drop for UpstreamNmi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls the probe at `url` until it answers 2xx (with exactly `body`, when given), failing
/// after 30 s or as soon as `child` has exited.
async fn wait_probe(
    url: &str,
    mut child: Option<&mut ChildGuard>,
    body: Option<&str>,
) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(1))
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(child) = child.as_deref_mut() {
            child.check_running()?;
        }
        if let Ok(response) = http.get(url).send().await
            && response.status().is_success()
            && match body {
                None => true,
                Some(expected) => response.text().await.is_ok_and(|b| b == expected),
            }
        {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{url} not ready within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A raw HTTP/1.1 GET to 169.254.169.254:80 from inside `pod`: (status, body, elapsed).
pub async fn pod_get(
    pod: &Arc<netns::SimPod>,
    path: &str,
    metadata_header: bool,
) -> anyhow::Result<(u16, String, Duration)> {
    pod_get_within(pod, path, metadata_header, Duration::from_secs(10)).await
}

/// [`pod_get`] giving up on an answer after `read_timeout` (a client that retries soon).
pub async fn pod_get_within(
    pod: &Arc<netns::SimPod>,
    path: &str,
    metadata_header: bool,
    read_timeout: Duration,
) -> anyhow::Result<(u16, String, Duration)> {
    let pod = Arc::clone(pod);
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        pod.run(move || -> anyhow::Result<(u16, String, Duration)> {
            let started = Instant::now();
            let addr = SocketAddr::from(([169, 254, 169, 254], 80));
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            stream.set_read_timeout(Some(read_timeout))?;
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

/// The SDK in `pod` asks for `client_id`'s token.
pub async fn sdk_for(pod: &Arc<netns::SimPod>, client_id: &str) -> anyhow::Result<SdkOutcome> {
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

/// `sdk`'s client in `pod` asks with `credential` for `client_id`'s token (IMDS picks without
/// one), waiting at most `cap` for the final answer ([`sdk_run`]).
pub async fn sdk_run_in(
    pod: &Arc<netns::SimPod>,
    sdk: Sdk,
    client_id: Option<&str>,
    credential: SdkCredential,
    cap: Duration,
) -> anyhow::Result<SdkRun> {
    let pod = Arc::clone(pod);
    let client_id = client_id.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        let selector = client_id
            .as_deref()
            .map_or(SdkSelector::None, SdkSelector::ClientId);
        sdk_run(sdk, &pod, SCOPE, selector, credential, cap)
    })
    .await?
}

/// A log file of nmi's and mic's output (`Cluster::child_log`), removed when dropped.
#[derive(Debug)]
pub struct LogFile(pub PathBuf);

impl LogFile {
    /// A fresh path for the test named `name` on `cluster`'s node.
    pub fn for_test(cluster: &Cluster, name: &str) -> Self {
        Self(std::env::temp_dir().join(format!(
            "podid-e2e-{name}-{}-{}.log",
            std::process::id(),
            cluster.node.slot()
        )))
    }
}

impl Drop for LogFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The `podid::audit` lines nmi wrote to `log` (JSON log format), as their `fields` objects.
pub fn audit_lines(log: &Path) -> Vec<Value> {
    log_lines(log)
        .filter(|v| v["target"] == "podid::audit")
        .map(|v| v["fields"].clone())
        .collect()
}

/// The lines nmi wrote to `log` (JSON log format) whose message is `message`, as their `fields`
/// objects (debug lines need [`Cluster::nmi_log_filter`]).
pub fn log_messages(log: &Path, message: &str) -> Vec<Value> {
    log_lines(log)
        .filter(|v| v["fields"]["message"] == message)
        .map(|v| v["fields"].clone())
        .collect()
}

fn log_lines(log: &Path) -> impl Iterator<Item = Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .collect::<Vec<_>>()
        .into_iter()
}
