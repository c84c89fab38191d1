//! `mic-bench`: the real `mic` binary at cluster scale against the fake API server and the
//! simulated Entra and ARM (`make bench`, docs/performance.md "mic").
//!
//! One run measures two clusters, each with a fresh fake API server, simulated Azure and `mic`
//! process: a baseline of one scale set (10 nodes, 50 identities, 100 bindings, 500 pods) and
//! the full cluster of ten such scale sets (100 nodes, 500 identities, 1,000 bindings, 5,000
//! pods). Identities are partitioned by scale set: the pods of scale set `s` only use the 50
//! identities of partition `s`, so no scale set needs more than 50 identities (ARM allows 150
//! per request). For each cluster it reports:
//!
//! - phase 1: from the `mic` process start to every expected `AzureAssignedIdentity` being
//!   `Assigned` and every scale set carrying exactly its identities;
//! - phase 2: 10 % of the pods deleted (every pod of 5 identities per scale set, so those
//!   identities must leave their scale set) until the survivors are all `Assigned`, the rest
//!   gone and the scale sets carry only what is still used;
//! - ARM GETs and PATCHes per scale set, controller passes (mic's `pass done` log lines),
//!   API-server requests by verb, and `mic`'s `VmRSS` / `VmHWM` from `/proc/<pid>/status`.
//!
//! mic runs with `--clientQps` 10000 (`--client-qps`): at mic's default of 5 (upstream's), a
//! first convergence is bound by the client-side rate, not by mic. For each cluster the bench
//! also prints what the measured phase-1 requests would take at the default rate.
//!
//! The fake API server and the simulators run in this process; `mic` runs as a child process
//! on 127.0.0.1, killed on every way out (a drop guard, and Ctrl-C).
//!
//! It lives in the `podid-bench` crate, so the test doubles are never dependencies of the
//! shipped `mic`; `mic` is found next to this executable (build both:
//! `cargo build --release -p podid-mic -p podid-bench --bins`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use podid_api::{AzureIdentity, AzureIdentityBinding};
use podid_azure_sim::{ArmHandle, Cloud, ComputeRef, EntraHandle};
use podid_fake_apiserver::FakeApiServer;
use serde_json::{Value, json};

const MIB: f64 = 1024.0;
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

/// Run `mic` at scale against the fake API server and the simulated ARM.
#[derive(Debug, Parser)]
struct Args {
    /// Scale sets of the full cluster (10 nodes, 50 identities, 100 bindings and 500 pods
    /// each); the baseline has one.
    #[arg(long, default_value_t = 10)]
    scale_sets: usize,
    /// Seconds to wait for a phase to converge before reporting it as not converged.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// The `mic` binary (default: `mic` next to this executable).
    #[arg(long)]
    mic: Option<PathBuf>,
    /// Also run the baseline (one scale set) for the ratio.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    baseline: bool,
    /// Append mic's JSON log lines to this file (for profiling; default: kept in memory only).
    #[arg(long)]
    mic_log: Option<PathBuf>,
    /// `--clientQps` given to mic: high, so that the figures measure mic rather than its
    /// client-side rate limit (mic's default, as upstream's, is 5).
    #[arg(long, default_value_t = 10_000.0)]
    client_qps: f64,
    /// Nodes per scale set.
    #[arg(long, default_value_t = 10)]
    nodes_per_set: usize,
    /// Identities per scale set (the pods of a set use only its own; at most 150, ARM's limit
    /// per request, so that a set needs one PATCH).
    #[arg(long, default_value_t = 50)]
    identities_per_set: usize,
    /// Bindings per scale set (binding `j` uses identity `j % identities`).
    #[arg(long, default_value_t = 100)]
    bindings_per_set: usize,
    /// Pods per scale set (pod `p` uses binding `p % bindings`, on node `p % nodes`).
    #[arg(long, default_value_t = 500)]
    pods_per_set: usize,
    /// The convergence target printed for the full cluster, in seconds (both phases).
    #[arg(long, default_value_t = 5.0)]
    target_seconds: f64,
    /// The peak-RSS target printed for the full cluster, in MiB.
    #[arg(long, default_value_t = 150.0)]
    target_rss_mib: f64,
    /// `--identity-release-grace-period` given to mic: none by default, so that phase 2
    /// measures mic's release path rather than the grace period (mic's default is 5m).
    #[arg(long, default_value = "0s")]
    release_grace_period: String,
}

/// mic's (and upstream's) default `--clientQps`; the burst is the same integer.
const DEFAULT_QPS: f64 = 5.0;

/// The shape of one simulated cluster.
#[derive(Debug, Clone, Copy)]
struct Scale {
    scale_sets: usize,
    nodes_per_set: usize,
    identities_per_set: usize,
    bindings_per_set: usize,
    pods_per_set: usize,
}

impl Scale {
    /// `scale_sets` sets shaped as `args` asks.
    fn with_sets(scale_sets: usize, args: &Args) -> Self {
        Self {
            scale_sets,
            nodes_per_set: args.nodes_per_set.max(1),
            identities_per_set: args.identities_per_set.max(1),
            bindings_per_set: args.bindings_per_set.max(1),
            pods_per_set: args.pods_per_set,
        }
    }

    fn pods(&self) -> usize {
        self.scale_sets * self.pods_per_set
    }

    fn describe(&self) -> String {
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
    fn released_identities_per_set(&self) -> usize {
        self.identities_per_set / 10
    }
}

/// What one phase cost.
#[derive(Debug, Clone, Default)]
struct Phase {
    /// Time to convergence (`None`: not converged within the timeout).
    converged: Option<Duration>,
    /// ARM GETs per scale set during the phase.
    gets: Vec<u64>,
    /// ARM PATCHes per scale set during the phase.
    patches: Vec<u64>,
    /// mic passes that did something (its `pass done` log lines) during the phase.
    passes: usize,
    /// API-server requests by verb and resource during the phase.
    api: BTreeMap<String, usize>,
    /// CPU seconds used by mic during the phase.
    mic_cpu: f64,
    /// CPU seconds used by this process (fake API server, simulators, polling) in the phase.
    bench_cpu: f64,
    /// mic's VmRSS at the end of the phase (KiB).
    rss_kib: u64,
    /// mic's VmHWM at the end of the phase (KiB).
    hwm_kib: u64,
    /// What was still missing when the phase timed out.
    missing: String,
}

/// What one cluster run measured.
#[derive(Debug, Clone)]
struct Figures {
    scale: Scale,
    /// mic start → its caches synced (its `caches synced` log line).
    synced: Option<Duration>,
    create: Phase,
    delete: Phase,
}

/// The `mic` child: killed and reaped on drop, whichever way the bench ends.
struct MicProcess {
    child: Child,
    log: Arc<Mutex<MicLog>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Drop for MicProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// What the bench keeps of mic's JSON log.
#[derive(Debug, Default)]
struct MicLog {
    synced: Option<Instant>,
    passes: usize,
    warnings: usize,
    /// The last lines, shown if mic dies.
    tail: Vec<String>,
}

/// User + system CPU seconds of a process, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: &str) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("parsing {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        fields
            .get(i)
            .with_context(|| format!("{path} has no field {}", i + 3))?
            .parse::<f64>()
            .with_context(|| format!("parsing field {} of {path}", i + 3))
    };
    // Linux reports in USER_HZ, 100 on every architecture podid targets.
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

impl MicProcess {
    fn spawn(mut command: Command, log_file: Option<&Path>) -> anyhow::Result<Self> {
        let mut file = match log_file {
            Some(path) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening {}", path.display()))?,
            ),
            None => None,
        };
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting mic")?;
        let stderr = child.stderr.take().context("mic's stderr pipe")?;
        let log = Arc::new(Mutex::new(MicLog::default()));
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(file) = file.as_mut() {
                    use std::io::Write as _;
                    let _ = writeln!(file, "{line}");
                }
                let message = serde_json::from_str::<Value>(&line).ok();
                let text = message
                    .as_ref()
                    .and_then(|v| v.pointer("/fields/message"))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                let level = message
                    .as_ref()
                    .and_then(|v| v.get("level"))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                let mut log = sink.lock().unwrap_or_else(|p| p.into_inner());
                match text.as_str() {
                    "pass done" => log.passes += 1,
                    "caches synced; reconciling" => log.synced = Some(Instant::now()),
                    _ => {}
                }
                if level == "WARN" || level == "ERROR" {
                    log.warnings += 1;
                }
                log.tail.push(line);
                if log.tail.len() > 20 {
                    log.tail.remove(0);
                }
            }
        });
        Ok(Self {
            child,
            log,
            reader: Some(reader),
        })
    }

    fn log(&self) -> std::sync::MutexGuard<'_, MicLog> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fails with mic's last log lines if it exited.
    fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait().context("polling mic")? {
            let tail = self.log().tail.join("\n");
            bail!("mic exited with {status}; its last log lines:\n{tail}");
        }
        Ok(())
    }

    /// (VmRSS, VmHWM) in KiB.
    fn memory(&self) -> anyhow::Result<(u64, u64)> {
        let path = format!("/proc/{}/status", self.child.id());
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            let line = status
                .lines()
                .find(|l| l.starts_with(name))
                .with_context(|| format!("{name} missing from {path}"))?;
            line.trim_start_matches(name)
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .with_context(|| format!("parsing {line:?}"))
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }
}

/// The simulated cluster and Azure of one run.
struct World {
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
    async fn build(scale: Scale) -> anyhow::Result<Self> {
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
        std::fs::write(
            &azure_json,
            json!({
                "cloud": "AzurePublicCloud",
                "tenantId": cloud.tenant_id(),
                "aadClientId": operator.client_id,
                "aadClientSecret": secret,
                "subscriptionId": cloud.subscription_id(),
                "resourceGroup": cloud.resource_group(),
                "vmType": "vmss",
            })
            .to_string(),
        )
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

    fn spawn_mic(
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
    fn expected_on_sets(&self, released: usize) -> Vec<BTreeSet<String>> {
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
        let pending = self
            .api
            .get_json(&format!("{all}?fieldSelector=status.status%21%3DAssigned"))
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
            .get_json(&format!("{all}?fieldSelector=status.status%3DAssigned"))
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
    async fn phase(
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
    fn delete_pods(&self, released: usize) -> anyhow::Result<usize> {
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

async fn run_cluster(
    scale: Scale,
    mic_path: &Path,
    args: &Args,
    timeout: Duration,
) -> anyhow::Result<Figures> {
    let world = World::build(scale).await?;
    let mut mic = world.spawn_mic(
        mic_path,
        args.client_qps,
        &args.release_grace_period,
        args.mic_log.as_deref(),
    )?;
    let started = Instant::now();
    let create = world
        .phase(
            &mut mic,
            started,
            scale.pods(),
            &world.expected_on_sets(0),
            timeout,
        )
        .await?;
    let synced = mic.log().synced.map(|t| t.duration_since(started));

    let released = scale.released_identities_per_set();
    // The clock starts before the first deletion: mic sees the first events at once.
    let started = Instant::now();
    let deleted = world.delete_pods(released)?;
    let delete = world
        .phase(
            &mut mic,
            started,
            scale.pods() - deleted,
            &world.expected_on_sets(released),
            timeout,
        )
        .await?;
    if mic.log().warnings > 0 {
        eprintln!(
            "note: mic logged {} warnings/errors; last lines:\n{}",
            mic.log().warnings,
            mic.log().tail.join("\n")
        );
    }
    drop(mic);
    Ok(Figures {
        scale,
        synced,
        create,
        delete,
    })
}

fn mic_binary(args: &Args) -> anyhow::Result<PathBuf> {
    let path = match &args.mic {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .context("locating this executable")?
            .with_file_name("mic"),
    };
    if !path.is_file() {
        bail!(
            "{} not found: build it first with `cargo build --release -p podid-mic -p podid-bench --bins`, or pass --mic",
            path.display()
        );
    }
    Ok(path)
}

fn secs(d: Option<Duration>) -> String {
    d.map_or_else(
        || "timeout".to_owned(),
        |d| format!("{:.2} s", d.as_secs_f64()),
    )
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISSED" }
}

fn print_phase(name: &str, phase: &Phase, scale: &Scale, released: usize) {
    let total_gets: u64 = phase.gets.iter().sum();
    let total_patches: u64 = phase.patches.iter().sum();
    let max_patches = phase.patches.iter().copied().max().unwrap_or(0);
    let max_gets = phase.gets.iter().copied().max().unwrap_or(0);
    let api: Vec<String> = phase.api.iter().map(|(v, n)| format!("{v} {n}")).collect();
    println!(
        "  {name:<28} {}{}",
        secs(phase.converged),
        if phase.missing.is_empty() {
            String::new()
        } else {
            format!("  (still: {})", phase.missing)
        }
    );
    println!(
        "  {:<28} {total_patches} PATCH, {total_gets} GET; per scale set PATCH max {max_patches}, GET max {max_gets} ({} scale sets{})",
        "  ARM calls",
        scale.scale_sets,
        if released > 0 {
            format!(", {released} identities to release on each")
        } else {
            String::new()
        }
    );
    println!("  {:<28} PATCH {:?}", "  ARM per scale set", phase.patches);
    println!("  {:<28} GET   {:?}", "", phase.gets);
    println!("  {:<28} {}", "  mic passes (pass done)", phase.passes);
    println!("  {:<28} {}", "  API requests", api.join(", "));
    println!(
        "  {:<28} mic {:.2} s, bench process {:.2} s (fake API server, simulators, polling)",
        "  CPU time", phase.mic_cpu, phase.bench_cpu
    );
    println!(
        "  {:<28} VmRSS {:.1} MiB, VmHWM {:.1} MiB",
        "  mic memory at the end",
        phase.rss_kib as f64 / MIB,
        phase.hwm_kib as f64 / MIB
    );
}

fn print_cluster(name: &str, figures: &Figures) {
    println!("{name}: {}", figures.scale.describe());
    println!(
        "  {:<28} {}",
        "mic start -> caches synced",
        secs(figures.synced)
    );
    print_phase(
        "mic start -> all Assigned",
        &figures.create,
        &figures.scale,
        0,
    );
    let deleted = figures.scale.pods() / 10;
    print_phase(
        &format!("delete {deleted} pods -> converged"),
        &figures.delete,
        &figures.scale,
        figures.scale.released_identities_per_set(),
    );
    let limited = rate_limited(&figures.create.api);
    println!(
        "  {:<28} phase 1 sent {limited} rate-limited requests: at least {:.0} s at the default rate (burst {DEFAULT_QPS}, then {DEFAULT_QPS}/s)",
        format!("at --clientQps {DEFAULT_QPS}"),
        at_default_rate(limited).as_secs_f64()
    );
    let writes = writes(&figures.create.api);
    println!(
        "  {:<28} phase 1 wrote {writes} times for {} assignments: {:.3} writes per assignment (creates, updates, patches, deletes of any kind, events included; leader election's Lease and Endpoints excluded)",
        "writes per assignment",
        figures.scale.pods(),
        writes as f64 / figures.scale.pods().max(1) as f64
    );
}

/// Whether a request (`<verb> <resource>`) is leader election's: the Lease, or upstream's
/// Endpoints lock (`--upstream-leader-lock`). Both are exempt from `--clientQps`.
fn leader_election(verb: &str) -> bool {
    verb.ends_with(" leases") || verb.ends_with(" endpoints")
}

/// Write requests of a phase (create, update, patch, delete of any resource, events
/// included), leader election's excluded.
fn writes(api: &BTreeMap<String, usize>) -> usize {
    api.iter()
        .filter(|(verb, _)| !leader_election(verb))
        .filter(|(verb, _)| {
            ["create ", "update ", "patch ", "delete "]
                .iter()
                .any(|w| verb.starts_with(w))
        })
        .map(|(_, n)| n)
        .sum()
}

/// Requests of a phase that `--clientQps` governs: all but leader election's and watches.
fn rate_limited(api: &BTreeMap<String, usize>) -> usize {
    api.iter()
        .filter(|(verb, _)| !leader_election(verb) && !verb.starts_with("watch "))
        .map(|(_, n)| n)
        .sum()
}

/// The least time `requests` take through a token bucket of burst and rate [`DEFAULT_QPS`].
fn at_default_rate(requests: usize) -> Duration {
    Duration::from_secs_f64((requests as f64 - DEFAULT_QPS).max(0.0) / DEFAULT_QPS)
}

/// Prints the figures; missed targets are reported, not turned into a failure (as nmi-bench).
fn report(full: &Figures, baseline: Option<&Figures>, args: &Args) {
    let target = Duration::from_secs_f64(args.target_seconds);
    let target_rss = args.target_rss_mib;
    println!();
    if let Some(baseline) = baseline {
        print_cluster("baseline", baseline);
        println!();
    }
    print_cluster("full", full);
    println!();
    let create_patch_max = full.create.patches.iter().copied().max().unwrap_or(0);
    let delete_patch_max = full.delete.patches.iter().copied().max().unwrap_or(0);
    let rss = full.create.hwm_kib.max(full.delete.hwm_kib) as f64 / MIB;
    let converge_ok = full.create.converged.is_some_and(|d| d < target);
    let reconverge_ok = full.delete.converged.is_some_and(|d| d < target);
    let patch_ok = full.create.passes > 0 && create_patch_max <= 1 && delete_patch_max <= 1;
    let rss_ok = rss < target_rss;
    let secs_target = args.target_seconds;
    println!("targets (full cluster)");
    println!(
        "  {:<40} {}   target < {secs_target} s   {}",
        "convergence after mic start",
        secs(full.create.converged),
        verdict(converge_ok)
    );
    println!(
        "  {:<40} {}   target < {secs_target} s   {}",
        "convergence after deleting 10 % of pods",
        secs(full.delete.converged),
        verdict(reconverge_ok)
    );
    println!(
        "  {:<40} {create_patch_max} / {delete_patch_max}   target <= 1   {}",
        "PATCHes per scale set (phase 1 / phase 2)",
        verdict(patch_ok)
    );
    println!(
        "  {:<40} {rss:.1} MiB   target < {target_rss} MiB   {}",
        "mic peak RSS (VmHWM)",
        verdict(rss_ok)
    );
    let writes = writes(&full.create.api) as f64 / full.scale.pods().max(1) as f64;
    println!(
        "  {:<40} {writes:.3}   target <= 1.2   {}",
        "writes per assignment (phase 1)",
        verdict(writes <= 1.2)
    );
    if let Some(baseline) = baseline {
        let ratio = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
            (Some(a), Some(b)) if !b.is_zero() => {
                format!("{:.2}", a.as_secs_f64() / b.as_secs_f64())
            }
            _ => "n/a".to_owned(),
        };
        println!(
            "ratios full / baseline ({}x the objects)",
            full.scale.scale_sets / baseline.scale.scale_sets.max(1)
        );
        println!(
            "  {:<40} {}",
            "convergence after mic start",
            ratio(full.create.converged, baseline.create.converged)
        );
        println!(
            "  {:<40} {}",
            "convergence after deleting 10 % of pods",
            ratio(full.delete.converged, baseline.delete.converged)
        );
        println!(
            "  {:<40} {:.2}",
            "mic peak RSS",
            full.create.hwm_kib.max(full.delete.hwm_kib) as f64
                / baseline.create.hwm_kib.max(baseline.delete.hwm_kib).max(1) as f64
        );
    }
}

async fn bench(args: Args) -> anyhow::Result<()> {
    podid_azure_sim::install_crypto_provider();
    let mic = mic_binary(&args)?;
    let timeout = Duration::from_secs(args.timeout);
    println!(
        "mic scale benchmark: real mic ({}) against the in-process fake API server and simulated Entra/ARM (zero latency), {} CPUs",
        mic.display(),
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    println!(
        "mic runs with --clientQps {} (its default, as upstream's, is {DEFAULT_QPS}: a first convergence would be bound by that rate; see \"at --clientQps {DEFAULT_QPS}\")",
        args.client_qps
    );
    let baseline = if args.baseline {
        let scale = Scale::with_sets(1, &args);
        eprintln!("running the baseline: {}", scale.describe());
        Some(run_cluster(scale, &mic, &args, timeout).await?)
    } else {
        None
    };
    let scale = Scale::with_sets(args.scale_sets, &args);
    eprintln!("running the full cluster: {}", scale.describe());
    let full = run_cluster(scale, &mic, &args, timeout).await?;
    report(&full, baseline.as_ref(), &args);
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("mic-bench: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        tokio::select! {
            r = bench(args) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mic-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
