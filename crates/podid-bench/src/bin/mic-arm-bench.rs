//! `mic-arm-bench`: what pods wait for when Azure Resource Manager takes as long as it does on a
//! real scale set (docs/performance.md "mic with ARM latency").
//!
//! The real `mic` binary runs against the in-process fake API server and the simulated Entra
//! and ARM, whose PATCHes stay in progress for `--arm-seconds` (default 30 s; `3` for a quick
//! look). The cluster: 2 scale sets of 10 nodes. Every scenario runs twice on a fresh world,
//! with mic's default grace period (`--grace`) and with `0` (upstream's immediate release):
//!
//! - `rolling`: a 100-pod Deployment, 5 pods per node, all `Assigned`; then a rolling update
//!   with maxUnavailable 50 %: the old pods of one scale set go, their replacements land on the
//!   same nodes 1 s later, and when they are all `Assigned` the other scale set follows;
//! - `scale-up`: 100 pods created over 2 s across the 20 nodes, their identity on neither scale
//!   set;
//! - `node-churn`: besides the Deployment, a 5-pod workload with its own identity runs on one
//!   node; that node is drained (its pods deleted; 1 s later the node deleted), a new node of
//!   the same scale set joins and the drained pods are recreated there;
//! - `in-flight`: a pod needing identity x arrives on scale set 0 (a PATCH starts); a third of
//!   a round trip later a pod needing y arrives on scale set 0 and one needing w on scale set 1.
//!
//! Per scenario: p50/p99/max of the time from a pod's creation (created `Running`) to its
//! `AzureAssignedIdentity` being `Assigned`, polled every 50 ms (this is not the first token
//! through nmi: nmi serves the token as soon as it sees `Assigned`, on its watch), the ARM
//! PATCHes sent, and the identity-seconds an identity stayed on a scale set without a pod there
//! using it (sampled every 100 ms until the scenario's pods are all `Assigned`, plus 1 s).
//!
//! One ARM round trip, as mic sees it, is the operation time plus the lag of its client's
//! polling (first poll after 250 ms, doubling to 5 s): the bench prints it.
//!
//! Built only with the `bench` feature.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use podid_api::{AssignedIdentityState, AzureIdentity, AzureIdentityBinding};
use podid_azure_sim::{ArmHandle, Cloud, ComputeRef, EntraHandle};
use podid_fake_apiserver::FakeApiServer;
use serde_json::{Value, json};

const NAMESPACE: &str = "default";
const CRD_PATH: &str = "/apis/aadpodidentity.k8s.io/v1";
const SETS: usize = 2;
const NODES_PER_SET: usize = 10;
const PODS: usize = 100;

/// Run `mic` with a slow ARM and report what pods wait.
#[derive(Debug, Parser)]
struct Args {
    /// How long each simulated ARM PATCH stays in progress, in seconds.
    #[arg(long, default_value_t = 30.0)]
    arm_seconds: f64,
    /// mic's `--identity-release-grace-period` for the runs with a grace period.
    #[arg(long, default_value = "5m")]
    grace: String,
    /// Scenarios to run (default: all).
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// The `mic` binary (default: `mic` next to this executable).
    #[arg(long)]
    mic: Option<PathBuf>,
}

const ALL: [&str; 4] = ["rolling", "scale-up", "node-churn", "in-flight"];

/// The `mic` child, killed on drop.
struct Mic(Child);

impl Drop for Mic {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct World {
    cloud: Cloud,
    arm: ArmHandle,
    entra: EntraHandle,
    api: FakeApiServer,
    sets: Vec<ComputeRef>,
    /// identity name → lower-cased resource id.
    ids: HashMap<String, String>,
    /// pod name → (scale set, identity name) of the pods that exist.
    pods: BTreeMap<String, (usize, String)>,
    dir: PathBuf,
    azure_json: PathBuf,
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn node_name(s: usize, n: usize) -> String {
    format!("aks-pool{s}-vmss{n:06}")
}

fn api_err(e: podid_fake_apiserver::ApiError) -> anyhow::Error {
    anyhow::anyhow!("{}", e.message)
}

impl World {
    async fn build(arm_time: Duration) -> anyhow::Result<Self> {
        let cloud = Cloud::new().context("simulated cloud")?;
        let operator = cloud.add_service_principal("mic");
        let secret = cloud.add_client_secret(&operator.client_id)?;
        let entra = EntraHandle::start(&cloud)?;
        let arm = ArmHandle::builder()
            .operation_duration(arm_time)
            .start(&cloud)?;
        let api = FakeApiServer::start().await?;
        let dir = std::env::temp_dir().join(format!(
            "podid-mic-arm-bench-{}-{}",
            std::process::id(),
            api.addr().port()
        ));
        std::fs::create_dir_all(&dir)?;
        api.write_kubeconfig(dir.join("kubeconfig"))?;
        let azure_json = dir.join("azure.json");
        std::fs::write(&azure_json, cloud.azure_json(&operator.client_id, &secret))?;
        let mut world = Self {
            sets: Vec::new(),
            ids: HashMap::new(),
            pods: BTreeMap::new(),
            cloud,
            arm,
            entra,
            api,
            dir,
            azure_json,
        };
        for s in 0..SETS {
            let vmss = world.cloud.add_vmss(
                world.cloud.subscription_id(),
                world.cloud.resource_group(),
                &format!("aks-pool{s}-vmss"),
            );
            world.sets.push(vmss);
            for n in 0..NODES_PER_SET {
                world.add_node(s, n)?;
            }
        }
        for name in ["app", "solo", "x", "y", "w"] {
            let uami = world.cloud.add_user_assigned_identity(name);
            let identity =
                AzureIdentity::user_assigned(NAMESPACE, name, &uami.resource_id, &uami.client_id);
            world.create(
                &format!("{CRD_PATH}/namespaces/{NAMESPACE}/azureidentities"),
                serde_json::to_value(&identity)?,
            )?;
            let binding = AzureIdentityBinding::for_selector(NAMESPACE, name, name, name);
            world.create(
                &format!("{CRD_PATH}/namespaces/{NAMESPACE}/azureidentitybindings"),
                serde_json::to_value(&binding)?,
            )?;
            world
                .ids
                .insert(name.to_owned(), uami.resource_id.to_ascii_lowercase());
        }
        Ok(world)
    }

    fn create(&self, path: &str, object: Value) -> anyhow::Result<()> {
        self.api
            .create_json(path, object)
            .map(drop)
            .map_err(api_err)
    }

    fn add_node(&self, s: usize, n: usize) -> anyhow::Result<()> {
        self.create(
            "/api/v1/nodes",
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node_name(s, n)},
                   "spec": {"providerID": format!("azure://{}/virtualMachines/{n}", self.sets[s].resource_id())}}),
        )
    }

    fn delete_node(&self, s: usize, n: usize) -> anyhow::Result<()> {
        self.api
            .delete_json(&format!("/api/v1/nodes/{}", node_name(s, n)))
            .map(drop)
            .map_err(api_err)
    }

    /// Creates a `Running` pod; returns when.
    fn add_pod(
        &mut self,
        name: &str,
        s: usize,
        n: usize,
        identity: &str,
    ) -> anyhow::Result<Instant> {
        self.create(
            &format!("/api/v1/namespaces/{NAMESPACE}/pods"),
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": name, "namespace": NAMESPACE, "uid": format!("uid-{name}"),
                                "labels": {"aadpodidbinding": identity}},
                   "spec": {"nodeName": node_name(s, n), "containers": [{"name": "c", "image": "c"}]},
                   "status": {"phase": "Running", "podIP": "10.0.0.1"}}),
        )?;
        self.pods.insert(name.to_owned(), (s, identity.to_owned()));
        Ok(Instant::now())
    }

    fn delete_pod(&mut self, name: &str) -> anyhow::Result<()> {
        self.pods.remove(name);
        self.api
            .delete_json(&format!("/api/v1/namespaces/{NAMESPACE}/pods/{name}"))
            .map(drop)
            .map_err(api_err)
    }

    fn spawn_mic(&self, mic: &Path, grace: &str) -> anyhow::Result<Mic> {
        let port = || -> anyhow::Result<u16> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port())
        };
        let child = Command::new(mic)
            .arg(format!(
                "--kubeconfig={}",
                self.dir.join("kubeconfig").display()
            ))
            .arg(format!("--cloudconfig={}", self.azure_json.display()))
            .arg(format!("--arm-endpoint={}", self.arm.url()))
            .arg(format!("--aad-authority={}", self.entra.url()))
            .arg(format!("--http-probe-port={}", port()?))
            .arg(format!("--prometheus-port={}", port()?))
            .arg("--leader-election-instance=mic-arm-bench")
            .arg("--clientQps=10000")
            .arg(format!("--identity-release-grace-period={grace}"))
            .arg("--log-format=json")
            .env("MIC_POD_NAMESPACE", NAMESPACE)
            .env("RUST_LOG", "warn")
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting mic")?;
        Ok(Mic(child))
    }

    /// Pods whose assignment is `Assigned`.
    fn assigned(&self) -> anyhow::Result<BTreeSet<String>> {
        let list = self
            .api
            .get_json(&format!(
                "{CRD_PATH}/azureassignedidentities?fieldSelector=status.status%3D{}",
                AssignedIdentityState::Assigned.as_str()
            ))
            .map_err(api_err)?;
        Ok(list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| o.pointer("/spec/Pod").or_else(|| o.pointer("/spec/pod")))
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect())
    }

    /// Identities on a scale set that no pod there uses.
    fn unused(&self) -> anyhow::Result<usize> {
        let mut used: Vec<BTreeSet<&str>> = vec![BTreeSet::new(); SETS];
        for (s, identity) in self.pods.values() {
            if let Some(id) = self.ids.get(identity) {
                used[*s].insert(id);
            }
        }
        let mut unused = 0;
        for (s, set) in self.sets.iter().enumerate() {
            for id in self.cloud.assigned_identities(set)? {
                if !used[s].contains(id.to_ascii_lowercase().as_str()) {
                    unused += 1;
                }
            }
        }
        Ok(unused)
    }

    fn patches(&self) -> u64 {
        self.sets.iter().map(|s| self.arm.patch_count(s)).sum()
    }
}

/// What one scenario run measured.
#[derive(Debug, Default, Clone)]
struct Measured {
    /// Per pod: creation → `Assigned`, by group (`None`: not assigned in time).
    waits: BTreeMap<&'static str, Vec<Option<Duration>>>,
    patches: u64,
    unused_identity_seconds: f64,
}

/// Watches `pending` (pod → creation time, group) until all are `Assigned` (or `timeout`),
/// sampling unused identities.
struct Watch {
    pending: HashMap<String, (Instant, &'static str)>,
    measured: Measured,
    last_sample: Instant,
}

impl Watch {
    fn new() -> Self {
        Self {
            pending: HashMap::new(),
            measured: Measured::default(),
            last_sample: Instant::now(),
        }
    }

    fn track(&mut self, pod: &str, at: Instant, group: &'static str) {
        self.pending.insert(pod.to_owned(), (at, group));
    }

    /// One look: records newly `Assigned` pods and the unused identities since the last look.
    fn poll(&mut self, world: &World) -> anyhow::Result<()> {
        let now = Instant::now();
        let unused = world.unused()?;
        self.measured.unused_identity_seconds +=
            unused as f64 * now.duration_since(self.last_sample).as_secs_f64();
        self.last_sample = now;
        let assigned = world.assigned()?;
        let done: Vec<String> = self
            .pending
            .keys()
            .filter(|p| assigned.contains(*p))
            .cloned()
            .collect();
        for pod in done {
            if let Some((at, group)) = self.pending.remove(&pod) {
                self.measured
                    .waits
                    .entry(group)
                    .or_default()
                    .push(Some(now.duration_since(at)));
            }
        }
        Ok(())
    }

    async fn until_done(&mut self, world: &World, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.pending.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.poll(world)?;
        }
        for (_, (_, group)) in self.pending.drain() {
            self.measured.waits.entry(group).or_default().push(None);
        }
        Ok(())
    }

    /// Keeps sampling for `d`.
    async fn sample_for(&mut self, world: &World, d: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + d;
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(100)).await;
            self.poll(world)?;
        }
        Ok(())
    }
}

/// The 100-pod Deployment, 5 pods per node, until all are `Assigned` (setup, not measured).
async fn deployment(world: &mut World, prefix: &str, timeout: Duration) -> anyhow::Result<()> {
    let mut watch = Watch::new();
    for p in 0..PODS {
        let s = p % SETS;
        let n = (p / SETS) % NODES_PER_SET;
        let name = format!("{prefix}-{p}");
        let at = world.add_pod(&name, s, n, "app")?;
        watch.track(&name, at, "setup");
    }
    watch.until_done(world, timeout).await?;
    if watch.measured.waits["setup"].iter().any(Option::is_none) {
        bail!("the Deployment never got its identity");
    }
    Ok(())
}

async fn run_scenario(
    scenario: &str,
    mic: &Path,
    grace: &str,
    arm_time: Duration,
    round_trip: Duration,
) -> anyhow::Result<Measured> {
    let mut world = World::build(arm_time).await?;
    let _mic = world.spawn_mic(mic, grace)?;
    let timeout = round_trip * 4 + Duration::from_secs(30);
    let mut watch = Watch::new();
    match scenario {
        "rolling" => {
            deployment(&mut world, "old", timeout).await?;
            let patches = world.patches();
            watch = Watch::new();
            let mut next = 0;
            for s in 0..SETS {
                let old: Vec<String> = world
                    .pods
                    .iter()
                    .filter(|(name, (set, _))| *set == s && name.starts_with("old-"))
                    .map(|(name, _)| name.clone())
                    .collect();
                for pod in &old {
                    world.delete_pod(pod)?;
                }
                watch.sample_for(&world, Duration::from_secs(1)).await?;
                for i in 0..old.len() {
                    let name = format!("new-{next}");
                    next += 1;
                    let at = world.add_pod(&name, s, i % NODES_PER_SET, "app")?;
                    watch.track(&name, at, "replacement pods");
                }
                watch.until_done(&world, timeout).await?;
            }
            watch.sample_for(&world, Duration::from_secs(1)).await?;
            watch.measured.patches = world.patches() - patches;
        }
        "scale-up" => {
            for p in 0..PODS {
                let name = format!("up-{p}");
                let at = world.add_pod(&name, p % SETS, (p / SETS) % NODES_PER_SET, "app")?;
                watch.track(&name, at, "new pods");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            watch.until_done(&world, timeout).await?;
            watch.sample_for(&world, Duration::from_secs(1)).await?;
            watch.measured.patches = world.patches();
        }
        "node-churn" => {
            deployment(&mut world, "app", timeout).await?;
            let mut setup = Watch::new();
            for i in 0..5 {
                let name = format!("solo-{i}");
                let at = world.add_pod(&name, 0, 0, "solo")?;
                setup.track(&name, at, "setup");
            }
            setup.until_done(&world, timeout).await?;
            let patches = world.patches();
            watch = Watch::new();
            let drained: Vec<String> = world
                .pods
                .keys()
                .filter(|name| {
                    name.starts_with("solo-")
                        || name
                            .strip_prefix("app-")
                            .and_then(|p| p.parse::<usize>().ok())
                            .is_some_and(|p| {
                                p.is_multiple_of(SETS) && (p / SETS).is_multiple_of(NODES_PER_SET)
                            })
                })
                .cloned()
                .collect();
            for pod in &drained {
                world.delete_pod(pod)?;
            }
            watch.sample_for(&world, Duration::from_secs(1)).await?;
            world.delete_node(0, 0)?;
            world.add_node(0, NODES_PER_SET)?;
            for (i, pod) in drained.iter().enumerate() {
                let identity = if pod.starts_with("solo-") {
                    "solo"
                } else {
                    "app"
                };
                let name = format!("moved-{i}");
                let at = world.add_pod(&name, 0, NODES_PER_SET, identity)?;
                watch.track(
                    &name,
                    at,
                    if identity == "solo" {
                        "rescheduled, own identity"
                    } else {
                        "rescheduled, Deployment"
                    },
                );
            }
            watch.until_done(&world, timeout).await?;
            watch.sample_for(&world, Duration::from_secs(1)).await?;
            watch.measured.patches = world.patches() - patches;
        }
        "in-flight" => {
            let at = world.add_pod("px", 0, 0, "x")?;
            watch.track("px", at, "first pod (x on set 0)");
            let third = round_trip / 3;
            let until = Instant::now() + third;
            while Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(50)).await;
                watch.poll(&world)?;
            }
            let at = world.add_pod("py", 0, 1, "y")?;
            watch.track("py", at, "arrives in flight (y on set 0)");
            let at = world.add_pod("pw", 1, 0, "w")?;
            watch.track("pw", at, "other scale set (w on set 1)");
            watch.until_done(&world, timeout).await?;
            watch.sample_for(&world, Duration::from_secs(1)).await?;
            watch.measured.patches = world.patches();
        }
        other => bail!("unknown scenario {other}"),
    }
    Ok(watch.measured)
}

/// The first poll of mic's ARM client at or after `op` (first after 250 ms, doubling to 5 s).
fn observed_round_trip(op: Duration) -> Duration {
    let mut at = Duration::ZERO;
    let mut wait = Duration::from_millis(250);
    loop {
        at += wait;
        if at >= op {
            return at;
        }
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mic-arm-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bench(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mic-arm-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn bench(args: Args) -> anyhow::Result<()> {
    podid_azure_sim::install_crypto_provider();
    let mic = match &args.mic {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("mic"),
    };
    if !mic.is_file() {
        bail!(
            "{} not found: build it first with `cargo build -p podid-mic -p podid-bench --bins`, or pass --mic",
            mic.display()
        );
    }
    let arm_time = Duration::from_secs_f64(args.arm_seconds);
    let round_trip = observed_round_trip(arm_time);
    let scenarios: Vec<String> = if args.scenarios.is_empty() {
        ALL.iter().map(|s| (*s).to_owned()).collect()
    } else {
        args.scenarios.clone()
    };
    println!(
        "mic with a slow ARM: PATCH in progress {:.1} s; one round trip as mic sees it {:.2} s (its polling); {SETS} scale sets x {NODES_PER_SET} nodes; wait = pod created Running -> AzureAssignedIdentity Assigned (polled every 50 ms)",
        arm_time.as_secs_f64(),
        round_trip.as_secs_f64()
    );
    let mut results: Vec<(String, String, Measured)> = Vec::new();
    for scenario in &scenarios {
        for grace in [args.grace.as_str(), "0"] {
            eprintln!("running {scenario} with grace period {grace}");
            let measured = run_scenario(scenario, &mic, grace, arm_time, round_trip).await?;
            results.push((scenario.clone(), grace.to_owned(), measured));
        }
    }
    println!(
        "{:<11} {:<6} {:<32} {:>5} {:>8} {:>8} {:>8} {:>8} {:>12}",
        "scenario", "grace", "pods", "n", "p50 s", "p99 s", "max s", "PATCHes", "unused id·s"
    );
    let rt = round_trip.as_secs_f64();
    let mut verdicts = Vec::new();
    for (scenario, grace, measured) in &results {
        for (group, waits) in &measured.waits {
            let lost = waits.iter().filter(|w| w.is_none()).count();
            let mut done: Vec<Duration> = waits.iter().flatten().copied().collect();
            done.sort();
            let (p50, p99, max) = (
                quantile(&done, 0.5).as_secs_f64(),
                quantile(&done, 0.99).as_secs_f64(),
                done.last().copied().unwrap_or_default().as_secs_f64(),
            );
            println!(
                "{scenario:<11} {grace:<6} {group:<32} {:>5} {p50:>8.2} {p99:>8.2} {max:>8.2} {:>8} {:>12.1}{}",
                waits.len(),
                measured.patches,
                measured.unused_identity_seconds,
                if lost > 0 {
                    format!("  ({lost} never Assigned)")
                } else {
                    String::new()
                }
            );
            let with_grace = grace != "0";
            let target = match (scenario.as_str(), *group, with_grace) {
                ("rolling", _, true) => Some(("p99 <= 1 s", lost == 0 && p99 <= 1.0)),
                ("scale-up", _, _) => {
                    Some(("max <= 1 round trip + 2 s", lost == 0 && max <= rt + 2.0))
                }
                ("in-flight", g, _) if g.starts_with("arrives") => Some((
                    "max <= 2 round trips + 2 s",
                    lost == 0 && max <= 2.0 * rt + 2.0,
                )),
                _ => None,
            };
            if let Some((what, ok)) = target {
                verdicts.push(format!(
                    "  {scenario} (grace {grace}), {group}: {what}: {}",
                    if ok { "ok" } else { "MISSED" }
                ));
            }
        }
    }
    println!("targets");
    for v in verdicts {
        println!("{v}");
    }
    Ok(())
}
