//! The simulated cluster and Azure of one run: the fake API server, Entra and ARM filled with a
//! cluster of the [`Scale`] asked for; the `mic` it starts, and the convergence it waits for.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use podid_api::{AssignedIdentityState, AzureIdentity, AzureIdentityBinding};
use podid_azure_sim::{ArmHandle, Cloud, ComputeRef, EntraHandle};
use podid_fake_apiserver::FakeApiServer;
use serde_json::{Value, json};

use crate::Args;
use crate::mic::{MicProcess, cpu_seconds};
use crate::report::{Phase, writes};

/// Where identities and bindings live.
const NAMESPACE: &str = "default";
const CRD_PATH: &str = "/apis/aadpodidentity.k8s.io/v1";
/// How often the store is polled for convergence while few assignments are pending.
const POLL: Duration = Duration::from_millis(50);
/// Poll interval while many are pending: listing them clones them under the store's lock,
/// which would slow down the very server mic is talking to.
const POLL_BUSY: Duration = Duration::from_millis(500);
/// "Many" for [`POLL_BUSY`].
const BUSY_PENDING: usize = 200;

/// The shape of one simulated cluster.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scale {
    pub(crate) scale_sets: usize,
    nodes_per_set: usize,
    identities_per_set: usize,
    bindings_per_set: usize,
    pods_per_set: usize,
}

impl Scale {
    /// `scale_sets` sets shaped as `args` asks.
    pub(crate) fn with_sets(scale_sets: usize, args: &Args) -> Self {
        Self {
            scale_sets,
            nodes_per_set: args.nodes_per_set.max(1),
            identities_per_set: args.identities_per_set.max(1),
            bindings_per_set: args.bindings_per_set.max(1),
            pods_per_set: args.pods_per_set,
        }
    }

    pub(crate) fn pods(&self) -> usize {
        self.scale_sets * self.pods_per_set
    }

    pub(crate) fn describe(&self) -> String {
        format!(
            "{} scale sets, {} nodes, {} identities, {} bindings, {} pods",
            self.scale_sets,
            self.scale_sets * self.nodes_per_set,
            self.scale_sets * self.identities_per_set,
            self.scale_sets * self.bindings_per_set,
            self.pods()
        )
    }

    /// Binding `j` of a set uses identity `j % identities_per_set`.
    fn identity_of_binding(&self, j: usize) -> usize {
        j % self.identities_per_set
    }

    /// Pod `p` of a set carries the selector of binding `p % bindings_per_set`.
    fn binding_of_pod(&self, p: usize) -> usize {
        p % self.bindings_per_set
    }

    /// Phase 2 deletes every pod whose identity index is below this (10 % of the identities,
    /// hence 10 % of the pods).
    pub(crate) fn released_identities_per_set(&self) -> usize {
        self.identities_per_set / 10
    }
}

/// The simulated cluster and Azure of one run.
pub(crate) struct World {
    scale: Scale,
    cloud: Cloud,
    arm: ArmHandle,
    entra: EntraHandle,
    api: FakeApiServer,
    sets: Vec<ComputeRef>,
    /// Lower-cased identity resource ids per set, by identity index.
    identity_ids: Vec<Vec<String>>,
    dir: PathBuf,
    azure_json: PathBuf,
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn create(api: &FakeApiServer, path: &str, object: Value) -> anyhow::Result<()> {
    api.create_json(path, object)
        .map(drop)
        .map_err(|e| anyhow::anyhow!("creating under {path}: {}", e.message))
}

fn pod_name(s: usize, p: usize) -> String {
    format!("app-{s}-{p}")
}

fn pod_namespace(s: usize) -> String {
    format!("team-{s}")
}

fn node_name(s: usize, n: usize) -> String {
    format!("aks-pool{s}-12345678-vmss{n:06}")
}

impl World {
    pub(crate) async fn build(scale: Scale) -> anyhow::Result<Self> {
        let cloud = Cloud::new().context("simulated cloud")?;
        let operator = cloud.add_service_principal("mic");
        let secret = cloud
            .add_client_secret(&operator.client_id)
            .context("mic's client secret")?;
        let entra = EntraHandle::start(&cloud).context("simulated Entra")?;
        let arm = ArmHandle::start(&cloud).context("simulated ARM")?;
        let api = FakeApiServer::start().await.context("fake API server")?;
        let dir = std::env::temp_dir().join(format!(
            "podid-mic-bench-{}-{}",
            std::process::id(),
            api.addr().port()
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        api.write_kubeconfig(dir.join("kubeconfig"))
            .context("kubeconfig")?;
        let azure_json = dir.join("azure.json");
        std::fs::write(&azure_json, cloud.azure_json(&operator.client_id, &secret))
            .context("writing azure.json")?;

        let mut sets = Vec::new();
        let mut identity_ids = Vec::new();
        let identities_path = format!("{CRD_PATH}/namespaces/{NAMESPACE}/azureidentities");
        let bindings_path = format!("{CRD_PATH}/namespaces/{NAMESPACE}/azureidentitybindings");
        for s in 0..scale.scale_sets {
            let vmss = cloud.add_vmss(
                cloud.subscription_id(),
                cloud.resource_group(),
                &format!("aks-pool{s}-12345678-vmss"),
            );
            create(
                &api,
                "/api/v1/namespaces",
                json!({"apiVersion": "v1", "kind": "Namespace",
                       "metadata": {"name": pod_namespace(s)}}),
            )?;
            for n in 0..scale.nodes_per_set {
                create(
                    &api,
                    "/api/v1/nodes",
                    json!({"apiVersion": "v1", "kind": "Node",
                           "metadata": {"name": node_name(s, n)},
                           "spec": {"providerID": format!("azure://{}/virtualMachines/{n}", vmss.resource_id())}}),
                )?;
            }
            let mut ids = Vec::new();
            for k in 0..scale.identities_per_set {
                let name = format!("id-{s}-{k}");
                let uami = cloud.add_user_assigned_identity(&name);
                let identity = AzureIdentity::user_assigned(
                    NAMESPACE,
                    &name,
                    &uami.resource_id,
                    &uami.client_id,
                );
                create(&api, &identities_path, serde_json::to_value(&identity)?)?;
                ids.push(uami.resource_id.to_ascii_lowercase());
            }
            for j in 0..scale.bindings_per_set {
                let binding = AzureIdentityBinding::for_selector(
                    NAMESPACE,
                    &format!("binding-{s}-{j}"),
                    &format!("id-{s}-{}", scale.identity_of_binding(j)),
                    &format!("sel-{s}-{j}"),
                );
                create(&api, &bindings_path, serde_json::to_value(&binding)?)?;
            }
            let pods_path = format!("/api/v1/namespaces/{}/pods", pod_namespace(s));
            for p in 0..scale.pods_per_set {
                let name = pod_name(s, p);
                create(
                    &api,
                    &pods_path,
                    json!({
                        "apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": name, "namespace": pod_namespace(s), "uid": format!("uid-{s}-{p}"),
                                     "labels": {"app": format!("app-{s}"), "aadpodidbinding": format!("sel-{s}-{}", scale.binding_of_pod(p))}},
                        "spec": {"nodeName": node_name(s, p % scale.nodes_per_set), "serviceAccountName": "default",
                                 "containers": [{"name": "app", "image": "app:1"}]},
                        "status": {"phase": "Running", "podIP": format!("10.{}.{}.{}", s % 250, p / 250 % 250, p % 250 + 1)}
                    }),
                )?;
            }
            sets.push(vmss);
            identity_ids.push(ids);
        }
        Ok(Self {
            scale,
            cloud,
            arm,
            entra,
            api,
            sets,
            identity_ids,
            dir,
            azure_json,
        })
    }

    pub(crate) fn spawn_mic(
        &self,
        mic: &Path,
        client_qps: f64,
        grace: &str,
        log_file: Option<&Path>,
    ) -> anyhow::Result<MicProcess> {
        let free_port = || -> anyhow::Result<u16> {
            Ok(std::net::TcpListener::bind("0.0.0.0:0")?
                .local_addr()?
                .port())
        };
        let mut command = Command::new(mic);
        command
            .arg(format!(
                "--kubeconfig={}",
                self.dir.join("kubeconfig").display()
            ))
            .arg(format!("--cloudconfig={}", self.azure_json.display()))
            .arg(format!("--arm-endpoint={}", self.arm.url()))
            .arg(format!("--aad-authority={}", self.entra.url()))
            .arg(format!("--http-probe-port={}", free_port()?))
            .arg(format!("--prometheus-port={}", free_port()?))
            .arg("--leader-election-instance=mic-bench")
            .arg(format!("--clientQps={client_qps}"))
            .arg(format!("--identity-release-grace-period={grace}"))
            .arg("--log-format=json")
            .env("MIC_POD_NAMESPACE", "default")
            .env("RUST_LOG", "info")
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("http_proxy")
            .env_remove("https_proxy");
        MicProcess::spawn(command, log_file)
    }

    /// The identities each set must carry after phase 1 (`released = 0`) or phase 2.
    pub(crate) fn expected_on_sets(&self, released: usize) -> Vec<BTreeSet<String>> {
        self.identity_ids
            .iter()
            .map(|ids| ids.iter().skip(released).cloned().collect())
            .collect()
    }

    /// `Ok(None)` when converged, `Ok(Some((what is missing, pending objects)))` otherwise.
    fn check(
        &self,
        expected_count: usize,
        expected: &[BTreeSet<String>],
    ) -> anyhow::Result<Option<(String, usize)>> {
        let all = format!("{CRD_PATH}/azureassignedidentities");
        let assigned_state = AssignedIdentityState::Assigned.as_str();
        let pending = self
            .api
            .get_json(&format!(
                "{all}?fieldSelector=status.status%21%3D{assigned_state}"
            ))
            .map_err(|e| anyhow::anyhow!("listing pending assignments: {}", e.message))?;
        let pending = pending["items"].as_array().map_or(0, Vec::len);
        if pending > 0 {
            return Ok(Some((
                format!("{pending} assignments not Assigned"),
                pending,
            )));
        }
        let assigned = self
            .api
            .get_json(&format!(
                "{all}?fieldSelector=status.status%3D{assigned_state}"
            ))
            .map_err(|e| anyhow::anyhow!("listing assignments: {}", e.message))?;
        let assigned = assigned["items"].as_array().map_or(0, Vec::len);
        if assigned != expected_count {
            return Ok(Some((
                format!("{assigned} assignments Assigned, {expected_count} expected"),
                0,
            )));
        }
        for (set, want) in self.sets.iter().zip(expected) {
            let on: BTreeSet<String> = self
                .cloud
                .assigned_identities(set)
                .context("identities on the scale set")?
                .into_iter()
                .map(|id| id.to_ascii_lowercase())
                .collect();
            if &on != want {
                return Ok(Some((
                    format!(
                        "{} carries {} identities, {} expected",
                        set.name,
                        on.len(),
                        want.len()
                    ),
                    0,
                )));
            }
        }
        Ok(None)
    }

    fn arm_counts(&self) -> (Vec<u64>, Vec<u64>) {
        (
            self.sets.iter().map(|s| self.arm.get_count(s)).collect(),
            self.sets.iter().map(|s| self.arm.patch_count(s)).collect(),
        )
    }

    fn api_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for request in self.api.faults().requests() {
            // The resource is the segment after the version, or after `namespaces/<ns>`.
            let segments: Vec<&str> = request.path.split('/').filter(|s| !s.is_empty()).collect();
            let start = if segments.first() == Some(&"api") {
                2
            } else {
                3
            };
            let mut resource = segments.get(start).copied().unwrap_or("other");
            if resource == "namespaces" && segments.len() > start + 2 {
                resource = segments[start + 2];
            }
            *counts
                .entry(format!("{} {resource}", request.verb))
                .or_default() += 1;
        }
        counts
    }

    /// Waits for convergence, then records the phase's figures as deltas since `before`.
    pub(crate) async fn phase(
        &self,
        mic: &mut MicProcess,
        started: Instant,
        expected_count: usize,
        expected: &[BTreeSet<String>],
        timeout: Duration,
    ) -> anyhow::Result<Phase> {
        let (gets0, patches0) = self.arm_counts();
        let api0 = self.api_counts();
        let passes0 = mic.log().passes;
        let mic_pid = mic.child.id().to_string();
        let mic_cpu0 = cpu_seconds(&mic_pid)?;
        let bench_cpu0 = cpu_seconds("self")?;
        let deadline = started + timeout;
        let mut last_rv = None;
        let mut missing = String::new();
        let mut pending = 0;
        let converged = loop {
            mic.check_running()?;
            let rv = self.api.resource_version();
            // Nothing written since the last look: the verdict cannot have changed, unless it
            // was about the scale sets (ARM changes no resourceVersion).
            if last_rv != Some(rv) || missing.contains("carries") {
                match self.check(expected_count, expected)? {
                    None => break Some(started.elapsed()),
                    Some((m, p)) => (missing, pending) = (m, p),
                }
                last_rv = Some(rv);
            }
            if Instant::now() >= deadline {
                break None;
            }
            // Each look lists every assignment under the fake server's one lock: on large
            // clusters look less often (10 ms per 1,000 assignments, 40 ms while busy), so
            // that the poll does not starve the server mic talks to (its Lease renewals too).
            let per_thousand = u32::try_from(expected_count / 1000).unwrap_or(u32::MAX);
            let interval = if pending > BUSY_PENDING {
                POLL_BUSY.max(Duration::from_millis(40) * per_thousand)
            } else {
                POLL.max(Duration::from_millis(10) * per_thousand)
            };
            tokio::time::sleep(interval).await;
        };
        // The pass that converged logs `pass done` only once its events are published, after
        // the states the poll saw: wait for that line (bounded), then let the passes that
        // follow the last write finish (their own echo) before counting.
        let logged_by = Instant::now() + Duration::from_secs(30);
        while converged.is_some() && mic.log().passes == passes0 && Instant::now() < logged_by {
            tokio::time::sleep(POLL).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        // A VM/VMSS's job (ARM call, then the writes that wait for it, then its events) runs
        // beside the passes and may still be writing after the poll saw every state: wait
        // until mic writes nothing but its leader election for 2 s (bounded), so that the
        // phase's writes are counted in it.
        let settle_by = Instant::now() + Duration::from_secs(120);
        let mut last = writes(&self.api_counts());
        let mut quiet_since = Instant::now();
        while converged.is_some() && Instant::now() < settle_by {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let now = writes(&self.api_counts());
            if now != last {
                (last, quiet_since) = (now, Instant::now());
            } else if quiet_since.elapsed() >= Duration::from_secs(2) {
                break;
            }
        }
        let (gets, patches) = self.arm_counts();
        let mut api = self.api_counts();
        for (verb, n) in api0 {
            if let Some(count) = api.get_mut(&verb) {
                *count -= n.min(*count);
            }
        }
        api.retain(|_, n| *n > 0);
        let (rss_kib, hwm_kib) = mic.memory()?;
        let mic_cpu = cpu_seconds(&mic_pid)? - mic_cpu0;
        let bench_cpu = cpu_seconds("self")? - bench_cpu0;
        Ok(Phase {
            mic_cpu,
            bench_cpu,
            converged,
            gets: gets.iter().zip(&gets0).map(|(a, b)| a - b).collect(),
            patches: patches.iter().zip(&patches0).map(|(a, b)| a - b).collect(),
            passes: mic.log().passes - passes0,
            api,
            rss_kib,
            hwm_kib,
            missing: if converged.is_some() {
                String::new()
            } else {
                missing
            },
        })
    }

    /// Deletes every pod of the first `released` identities of each set; returns how many.
    pub(crate) fn delete_pods(&self, released: usize) -> anyhow::Result<usize> {
        let scale = &self.scale;
        let mut deleted = 0;
        for s in 0..scale.scale_sets {
            for p in 0..scale.pods_per_set {
                if scale.identity_of_binding(scale.binding_of_pod(p)) < released {
                    let path = format!(
                        "/api/v1/namespaces/{}/pods/{}",
                        pod_namespace(s),
                        pod_name(s, p)
                    );
                    self.api
                        .delete_json(&path)
                        .map_err(|e| anyhow::anyhow!("deleting {path}: {}", e.message))?;
                    deleted += 1;
                }
            }
        }
        Ok(deleted)
    }
}
