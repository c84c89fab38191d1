//! The controller loop: reflectors over pods, nodes and the three CRDs feed one coalesced
//! reconcile that calls [`crate::desired::compute`], writes the difference to the API server
//! and hands each VM/VMSS's identity work to an [`IdentityAssigner`].
//!
//! A burst of watch events wakes one pass, not one pass per event. API-server writes are
//! bounded by `--createDeleteBatch`; VM/VMSS targets are worked on concurrently so one slow
//! scale set does not hold the others' status updates. A pass with failures is retried with
//! exponential backoff (1 s doubling to 5 min) instead of waiting for the next event.
//!
//! Writes per assignment: a new assignment is written once, in its final state, unless it is
//! the first of its identity on its VM/VMSS (created `Created`, patched `Assigned` once ARM
//! confirmed the identity: upstream's lifecycle); `binding applied` is one Normal event per
//! identity and VM/VMSS per pass or job, on the AzureIdentity.
//!
//! [`serve`] runs the one-time type upgrade ([`crate::upgrade`]) before the loop.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Client, Resource};
use podid_api::{
    ASSIGNED_IDENTITY_FINALIZER, AssignedIdentityState, AzureAssignedIdentity, AzureIdentity,
    AzureIdentityBinding,
};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::desired::{ArmTarget, Deletion, Inputs, Options, Plan, Warning, compute};
use crate::hold::{HoldSettings, Holds, Record};
use crate::preexisting::{Ownership, PREEXISTING_ANNOTATION};

/// The error an [`IdentityAssigner`] reports.
pub type AssignError = Box<dyn std::error::Error + Send + Sync>;

/// A boxed future returned by [`IdentityAssigner::apply`].
pub type AssignFuture<'a> = Pin<Box<dyn Future<Output = Result<(), AssignError>> + Send + 'a>>;

/// A boxed future returned by [`IdentityAssigner::apply_reporting`]: the outcome and the ids
/// found already present.
pub type ReportingFuture<'a> =
    Pin<Box<dyn Future<Output = (Result<(), AssignError>, BTreeSet<String>)> + Send + 'a>>;

/// Puts user-assigned identities on VMs and VM scale sets (the ARM client in production).
pub trait IdentityAssigner: Send + Sync {
    /// Makes every id of `required` present on `target` and every id of `release` absent
    /// (ids lower-cased). Resolves `Ok` once ARM has applied the change.
    fn apply<'a>(
        &'a self,
        target: &'a ArmTarget,
        required: &'a BTreeSet<String>,
        release: &'a BTreeSet<String>,
    ) -> AssignFuture<'a>;

    /// [`IdentityAssigner::apply`], also returning the ids of `required` that were already on
    /// `target` before the call (the assigner did not add them). The default knows none: every
    /// id counts as added by MIC, as upstream assumes.
    fn apply_reporting<'a>(
        &'a self,
        target: &'a ArmTarget,
        required: &'a BTreeSet<String>,
        release: &'a BTreeSet<String>,
    ) -> ReportingFuture<'a> {
        Box::pin(async move { (self.apply(target, required, release).await, BTreeSet::new()) })
    }

    /// How long the remote side asked to be left alone after `error` (ARM's `Retry-After`);
    /// the loop retries no sooner. Default: no such hint.
    fn retry_after(&self, error: &AssignError) -> Option<Duration> {
        let _ = error;
        None
    }
}

/// An [`IdentityAssigner`] error saying that everything was applied except `ids` (lower-cased
/// resource ids refused by ARM or unusable). Assignments of the other ids are confirmed;
/// these stay `Created` and the pass is retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("identities not applied {ids:?}: {reason}")]
pub struct NotApplied {
    /// The ids that were not added (or not removed).
    pub ids: BTreeSet<String>,
    /// Why (ARM's refusal).
    pub reason: String,
}

/// An assigner that changes nothing and always succeeds (clusters with service principals
/// only, and tests of the Kubernetes side).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoArm;

impl IdentityAssigner for NoArm {
    fn apply<'a>(
        &'a self,
        _: &'a ArmTarget,
        _: &'a BTreeSet<String>,
        _: &'a BTreeSet<String>,
    ) -> AssignFuture<'a> {
        Box::pin(async { Ok(()) })
    }
}

/// What the loop needs besides the client.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Desired-state switches.
    pub options: Options,
    /// Concurrent AzureAssignedIdentity API calls (`--createDeleteBatch`).
    pub batch: usize,
    /// Period of the full pass without events (`--syncRetryDuration`).
    pub resync: Duration,
    /// Period of the pass that hands every VM/VMSS its required ids again, so identities
    /// removed behind MIC's back come back (`--identity-assignment-reconcile-interval`).
    pub identity_reconcile: Duration,
    /// `reportingInstance` of the Kubernetes events (the leader-election identity).
    pub instance: String,
    /// Set active while the loop runs on synced caches (the `/healthz` answer).
    pub health: Arc<crate::probe::Health>,
    /// Holding identities after their last pod (`--identity-release-grace-period`,
    /// `--identity-limit-per-vm`).
    pub holds: HoldSettings,
    /// Where the holds are recorded; `None`: in memory only (a restart forgets them).
    pub hold_record: Option<HoldRecordLocation>,
}

/// The ConfigMap that records the holds ([`crate::hold::RECORD_KEY`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldRecordLocation {
    /// MIC's namespace (`MIC_POD_NAMESPACE`).
    pub namespace: String,
    /// `--config-map-name`.
    pub config_map: String,
}

impl Settings {
    /// Settings from the validated flags and the cloud configuration (whose cluster identity
    /// joins the immutable client ids).
    pub fn new(config: &crate::config::Config, cloud: &crate::cloud::CloudConfig) -> Self {
        let mut immutable = config.immutable_client_ids.clone();
        immutable.extend(cloud.cluster_identity());
        Self {
            options: Options {
                force_namespaced: config.namespaced,
                release_finished_pods: config.release_finished_pods,
                immutable_client_ids: immutable,
            },
            batch: config.create_delete_batch,
            resync: config.sync_retry_interval,
            identity_reconcile: config.identity_assignment_reconcile_interval,
            instance: config.leader_election_instance.clone(),
            health: Arc::default(),
            holds: HoldSettings {
                grace: config.identity_release_grace_period,
                limit: config.identity_limit_per_vm,
            },
            hold_record: Some(HoldRecordLocation {
                namespace: config.pod_namespace.clone(),
                config_map: config.config_map_name.clone(),
            }),
        }
    }
}

/// Why the loop stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A watch ended for good before the caches were filled.
    #[error("the {0} watch stopped before its cache was filled")]
    CacheSync(&'static str),
    /// The kubeconfig file could not be read or used.
    #[error("failed to load kubeconfig {path}")]
    Kubeconfig {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No kubeconfig given and the in-cluster configuration is unusable.
    #[error("failed to load the in-cluster configuration (pass --kubeconfig outside a cluster)")]
    InCluster(#[source] kube::config::InClusterError),
    /// Another replica holds the leader lease now.
    #[error("lost leader lease")]
    LostLease,
    /// The client could not be built from the configuration.
    #[error("failed to build the Kubernetes client")]
    Client(#[source] kube::Error),
    /// The one-time type upgrade failed (upstream exits then).
    #[error("type upgrade failed with error")]
    TypeUpgrade(#[source] crate::upgrade::UpgradeError),
}

/// The client-side request rate of mic's Kubernetes client (`--clientQps`; upstream's burst is
/// `int(--clientQps)`). See [`crate::throttle`] for what is limited and what is exempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClientRate {
    /// Requests per second once the burst is spent.
    pub qps: f64,
    /// Requests that may go at once.
    pub burst: u32,
}

impl ClientRate {
    /// The rate of the validated flags.
    pub fn of(config: &crate::config::Config) -> Self {
        Self {
            qps: config.client_qps,
            burst: config.client_burst,
        }
    }
}

/// The Kubernetes client from `--kubeconfig`, or the in-cluster configuration without it; no
/// client-side rate limit (tests, tools). `mic` itself uses [`kube_client_with_rate`].
pub async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<Client, RunError> {
    kube_client_with_rate(kubeconfig, None).await
}

/// The most Kubernetes requests mic's loop has in flight at once (the leader election has a
/// client of its own).
pub const MAX_IN_FLIGHT: usize = 100;

/// [`kube_client`] whose requests (Leases excepted) take a token of a bucket of `rate`
/// ([`crate::throttle`]); `None`: unlimited.
pub async fn kube_client_with_rate(
    kubeconfig: Option<&std::path::Path>,
    rate: Option<ClientRate>,
) -> Result<Client, RunError> {
    let config = match kubeconfig {
        Some(path) => {
            let fail = |source: Box<dyn std::error::Error + Send + Sync>| RunError::Kubeconfig {
                path: path.to_owned(),
                source,
            };
            let file = kube::config::Kubeconfig::read_from(path).map_err(|e| fail(e.into()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| fail(e.into()))?
        }
        None => kube::Config::incluster().map_err(RunError::InCluster)?,
    };
    let Some(rate) = rate else {
        return Client::try_from(config).map_err(RunError::Client);
    };
    let bucket = std::sync::Arc::new(crate::throttle::TokenBucket::new(rate.qps, rate.burst));
    // The throttle delays a request inside its response future, so the service behind it must
    // be cloneable: kube's stack goes behind a buffer first. At most MAX_IN_FLIGHT requests
    // are sent at once (a watch counts until its response starts): every VM/VMSS job writing
    // `--createDeleteBatch` at a time would otherwise open thousands of connections on a
    // 50-scale-set cluster and swamp the API server.
    Ok(kube::client::ClientBuilder::try_from(config)
        .map_err(RunError::Client)?
        .with_layer(&tower::buffer::BufferLayer::<
            http::Request<kube::client::Body>,
        >::new(1024))
        .with_layer(&tower::limit::ConcurrencyLimitLayer::new(MAX_IN_FLIGHT))
        .with_layer(&crate::throttle::ThrottleLayer::new(bucket))
        .build())
}

/// What one pass achieved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Objects created.
    pub created: usize,
    /// Objects rewritten.
    pub updated: usize,
    /// Objects deleted.
    pub deleted: usize,
    /// Objects that turned `Assigned`: patched, or created in that state.
    pub assigned: usize,
    /// Of those, confirmed without an ARM call: their identity was known to be on the VM/VMSS
    /// (held after its last pod, or kept by another assignment).
    pub confirmed_without_arm: usize,
    /// Failed API or ARM calls (the pass is retried).
    pub failures: usize,
    /// The longest `Retry-After` an assigner reported: the retry waits at least this long.
    pub retry_after: Option<Duration>,
    /// Uids of the objects deleted (or found gone) by this pass. The loop keeps them out of
    /// later passes while its cache still shows them, so they are not deleted twice.
    pub removed: Vec<String>,
    /// What this pass created or marked `Assigned` (compact: names, versions, the new state).
    /// While the cache has not caught up, the loop waits for created objects to show up and
    /// reads confirmed ones with their new state, so a later pass neither creates nor confirms
    /// them again (with their events).
    pub written: Vec<Written>,
}

/// One object a pass created or marked `Assigned`.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    namespace: String,
    name: String,
    /// Created by the pass.
    created: bool,
    /// A confirmation: the version it patched, and what the patch made of it.
    confirmed: Option<Confirmed>,
    at: std::time::Instant,
}

/// What a confirmation patched and wrote (the status and the pre-existing mark; nothing else
/// changes).
#[derive(Debug, Clone, PartialEq)]
struct Confirmed {
    stale_version: String,
    version: Option<String>,
    status: Option<podid_api::AzureAssignedIdentityStatus>,
    preexisting: Option<String>,
}

impl Eq for Written {}

impl Confirmed {
    /// `cached` (the version the patch applied to) as the patch left it.
    fn apply(&self, cached: &AzureAssignedIdentity) -> AzureAssignedIdentity {
        let mut object = cached.clone();
        object.metadata.resource_version.clone_from(&self.version);
        object.status.clone_from(&self.status);
        if let Some(mark) = &self.preexisting {
            object
                .metadata
                .annotations
                .get_or_insert_default()
                .insert(PREEXISTING_ANNOTATION.to_owned(), mark.clone());
        }
        object
    }
}

/// How long a record of a created or confirmed object is kept while the cache does not show
/// the object: the watch delivers a create well within this, and an object deleted meanwhile
/// must not be waited for.
const WRITTEN_TTL: Duration = Duration::from_secs(60);

/// Longest wait, before a pass, for objects the previous pass created to reach the cache.
const CREATED_WAIT: Duration = Duration::from_secs(1);

impl PassReport {
    /// Adds what a [`TargetJob`] did.
    fn absorb(&mut self, other: PassReport) {
        self.created += other.created;
        self.assigned += other.assigned;
        self.deleted += other.deleted;
        self.failures += other.failures;
        self.retry_after = self.retry_after.max(other.retry_after);
        self.removed.extend(other.removed);
        self.written.extend(other.written);
    }

    /// Adds what [`create_after_arm`] did.
    fn absorb_created(&mut self, other: PassReport) {
        self.created += other.created;
        self.assigned += other.assigned;
        self.failures += other.failures;
        self.written.extend(other.written);
    }

    /// Counts confirmation results and keeps the record of each successful one (`None` when
    /// the object it confirmed is not known).
    fn confirmations(
        &mut self,
        results: impl IntoIterator<Item = Result<Option<Written>, kube::Error>>,
    ) {
        for result in results {
            match result {
                Ok(written) => {
                    self.assigned += 1;
                    self.written.extend(written);
                }
                Err(e) => {
                    warn!(error = %e, "AzureAssignedIdentity call failed");
                    self.failures += 1;
                }
            }
        }
    }

    /// Counts deletion results and records the uids of the objects now gone.
    fn deletions(&mut self, results: Vec<(&AzureAssignedIdentity, Result<(), kube::Error>)>) {
        for (object, result) in results {
            match result {
                Ok(()) => {
                    self.deleted += 1;
                    self.removed.extend(object.metadata.uid.clone());
                }
                Err(e) => {
                    warn!(name = name_of(object), error = %e, "failed to delete AzureAssignedIdentity");
                    self.failures += 1;
                }
            }
        }
    }
}

struct Stores {
    pods: Store<Pod>,
    nodes: Store<Node>,
    identities: Store<AzureIdentity>,
    bindings: Store<AzureIdentityBinding>,
    assigned: Store<AzureAssignedIdentity>,
}

/// A cache of `api` kept by its own task. Each object is reduced by `project` before it is
/// stored (what a pass reads, not the whole object: the caches of a 50,000-pod cluster stay
/// small). A watch whose resourceVersion the API server no longer has (`410 Gone`, after a
/// compaction or a long disconnect) is relisted by the watcher; the cache keeps its contents
/// until the new list is complete and is then replaced in one step, so a pass never sees a
/// half-listed cache and nothing is lost meanwhile.
fn reflect<K>(
    api: Api<K>,
    project: fn(&mut K),
    notify: Arc<Notify>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let (reader, task) =
        podid_runtime::reflect_projected(api, watcher::Config::default(), project, notify);
    tasks.push(tokio::spawn(task));
    reader
}

/// Drops what no pass reads from a cached object: its managed fields.
fn without_managed_fields<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// A pod as a pass reads it: namespace, name, labels, node and phase (its containers,
/// volumes, conditions and annotations are most of its size and never read).
fn pod_projection(pod: &mut Pod) {
    let metadata = &mut pod.metadata;
    metadata.managed_fields = None;
    metadata.annotations = None;
    metadata.owner_references = None;
    let node_name = pod.spec.as_mut().and_then(|s| s.node_name.take());
    pod.spec = node_name.map(|node_name| k8s_openapi::api::core::v1::PodSpec {
        node_name: Some(node_name),
        ..Default::default()
    });
    let phase = pod.status.as_mut().and_then(|s| s.phase.take());
    pod.status = phase.map(|phase| k8s_openapi::api::core::v1::PodStatus {
        phase: Some(phase),
        ..Default::default()
    });
}

/// A node as a pass reads it: name and providerID (its status, with the images it holds, is
/// tens of kilobytes on a real node).
fn node_projection(node: &mut Node) {
    let metadata = &mut node.metadata;
    metadata.managed_fields = None;
    metadata.annotations = None;
    metadata.labels = None;
    let provider_id = node.spec.as_mut().and_then(|s| s.provider_id.take());
    node.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
        provider_id,
        ..Default::default()
    });
    node.status = None;
}

/// The whole controller: Kubernetes client from `--kubeconfig` (or in-cluster) limited to
/// `--clientQps` (Lease requests exempt, see [`crate::throttle`]), leader election on the
/// Lease, then [`run`] while the lease is held. Returns `Ok` after `shutdown` (a pass in flight
/// finishes first; the lease is then released for a fast hand-over) and
/// [`RunError::LostLease`] as soon as the lease is lost (the pass in flight is cancelled), on
/// which upstream exits with status 1. `health` turns active while the loop runs.
pub async fn serve(
    config: &crate::config::Config,
    cloud: &crate::cloud::CloudConfig,
    assigner: Arc<dyn IdentityAssigner>,
    health: Arc<crate::probe::Health>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    crate::metrics::leader_election();
    let client =
        kube_client_with_rate(config.kubeconfig.as_deref(), Some(ClientRate::of(config))).await?;
    // The leader election has a client of its own (its own connections, no rate limit): its
    // renewals never queue behind the loop's requests.
    let mut elector = crate::leader::Elector::new(
        kube_client(config.kubeconfig.as_deref()).await?,
        crate::leader::LeaderSettings::new(config),
    );
    tokio::pin!(shutdown);
    tokio::select! {
        () = elector.acquire() => {}
        () = &mut shutdown => return Ok(()),
    }
    // Upstream runs the type upgrade first thing as leader; the lease is renewed meanwhile.
    let upgrade = config
        .type_upgrade
        .then(|| crate::upgrade::UpgradeSettings {
            namespace: config.pod_namespace.clone(),
            config_map: config.config_map_name.clone(),
            key: config.type_upgrade_status_key.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        });
    let mut settings = Settings::new(config, cloud);
    settings.health = health;
    let stopped = async {
        if let Some(upgrade) = &upgrade {
            crate::upgrade::run(&client, upgrade)
                .await
                .map_err(RunError::TypeUpgrade)?;
        }
        run(client.clone(), settings, assigner, &mut shutdown).await
    };
    // Renewals run on their own task: a pass busy with a large cluster (or a cache relisting
    // one) never delays them past the renew deadline.
    let mut holder = crate::leader::Holder::spawn(elector);
    tokio::select! {
        r = stopped => r?,
        // Dropping the loop's future cancels the pass in flight with its API and ARM requests
        // (and turns /healthz Not Active): another replica may lead from now on, so not one
        // more write. Upstream exits here.
        () = holder.lost() => return Err(RunError::LostLease),
    }
    let Some(mut elector) = holder.stop().await else {
        return Err(RunError::LostLease);
    };
    if let Err(e) = elector.release().await {
        warn!(error = %e, "failed to release the leader lease");
    }
    Ok(())
}

/// Aborts the reflector tasks however the loop ends (also when its future is dropped).
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Marks the replica inactive however the loop ends.
struct Inactive(Arc<crate::probe::Health>);

impl Drop for Inactive {
    fn drop(&mut self) {
        self.0.set_active(false);
    }
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    settings: Settings,
    assigner: Arc<dyn IdentityAssigner>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let notify = Arc::new(Notify::new());
    let mut tasks = Vec::new();
    let stores = Stores {
        pods: reflect(
            Api::all(client.clone()),
            pod_projection,
            notify.clone(),
            &mut tasks,
        ),
        nodes: reflect(
            Api::all(client.clone()),
            node_projection,
            notify.clone(),
            &mut tasks,
        ),
        // Identities and bindings are copied into the assignments mic writes: kept whole.
        identities: reflect(Api::all(client.clone()), |_| {}, notify.clone(), &mut tasks),
        bindings: reflect(Api::all(client.clone()), |_| {}, notify.clone(), &mut tasks),
        assigned: reflect(
            Api::all(client.clone()),
            without_managed_fields,
            notify.clone(),
            &mut tasks,
        ),
    };
    let events = Recorder::new(
        client.clone(),
        Reporter {
            controller: EVENT_SOURCE.to_owned(),
            instance: Some(settings.instance.clone()),
        },
    );
    let _tasks = AbortOnDrop(tasks);
    let _inactive = Inactive(settings.health.clone());
    run_loop(
        &client, &settings, &assigner, &events, &stores, &notify, shutdown,
    )
    .await
}

async fn run_loop(
    client: &Client,
    settings: &Settings,
    assigner: &Arc<dyn IdentityAssigner>,
    events: &Recorder,
    stores: &Stores,
    notify: &Notify,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    tokio::pin!(shutdown);
    let ready = async {
        stores
            .pods
            .wait_until_ready()
            .await
            .map_err(|_| RunError::CacheSync("pod"))?;
        stores
            .nodes
            .wait_until_ready()
            .await
            .map_err(|_| RunError::CacheSync("node"))?;
        stores
            .identities
            .wait_until_ready()
            .await
            .map_err(|_| RunError::CacheSync("AzureIdentity"))?;
        stores
            .bindings
            .wait_until_ready()
            .await
            .map_err(|_| RunError::CacheSync("AzureIdentityBinding"))?;
        stores
            .assigned
            .wait_until_ready()
            .await
            .map_err(|_| RunError::CacheSync("AzureAssignedIdentity"))
    };
    tokio::select! {
        r = ready => r?,
        () = &mut shutdown => return Ok(()),
    }
    info!("caches synced; reconciling");
    settings.health.set_active(true);
    let mut failures_in_a_row: u32 = 0;
    let mut every_target = false;
    let mut memory = Memory::default();
    // Each VM/VMSS's ARM work runs as its own task, so that a long-running PATCH holds up
    // neither the passes nor the other VMs/VMSS. Dropping the set (lost lease) aborts them.
    let mut jobs: tokio::task::JoinSet<JobOutcome> = tokio::task::JoinSet::new();
    let mut next_reconcile = tokio::time::Instant::now() + settings.identity_reconcile;
    loop {
        // Objects the last pass created reach the cache within milliseconds; a pass that ran
        // before would create them again (and confirm them twice). Bounded wait.
        let deadline = tokio::time::Instant::now() + CREATED_WAIT;
        while memory.awaits_created(&stores.assigned.state())
            && tokio::time::Instant::now() < deadline
        {
            tokio::select! {
                () = notify.notified() => {}
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
        let started = std::time::Instant::now();
        let (report, new_jobs) =
            pass(client, settings, events, stores, every_target, &mut memory).await;
        memory.remember(&report);
        for job in new_jobs {
            memory
                .in_flight
                .insert(job.target().clone(), (job.release().clone(), job.objects()));
            jobs.spawn(run_job(
                job,
                client.clone(),
                assigner.clone(),
                Some(events.clone()),
                settings.batch.max(1),
            ));
        }
        crate::metrics::assignment_states(stores.assigned.state().iter().map(|a| {
            a.status
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .map_or("", |s| s.as_str())
        }));
        crate::metrics::identities_held(&memory.holds.counts());
        if report != PassReport::default() {
            crate::metrics::cycle(started.elapsed());
            info!(
                created = report.created,
                updated = report.updated,
                deleted = report.deleted,
                assigned = report.assigned,
                confirmed_without_arm = report.confirmed_without_arm,
                failures = report.failures,
                in_flight = memory.in_flight.len(),
                "pass done"
            );
        }
        let mut wait = if report.failures > 0 {
            failures_in_a_row = failures_in_a_row.saturating_add(1);
            backoff(failures_in_a_row, settings.resync).max(report.retry_after.unwrap_or_default())
        } else {
            failures_in_a_row = 0;
            settings.resync
        };
        // A VM/VMSS backing off is tried again when its time comes; a hold is released when
        // its period ends.
        let now = tokio::time::Instant::now();
        if let Some(first) = memory.backoff.values().map(|(_, at)| *at).min() {
            wait = wait.min(first.saturating_duration_since(now));
        }
        if let Some(due) = memory.next_hold_due() {
            wait = wait.min(due);
        }
        every_target = false;
        tokio::select! {
            () = notify.notified() => {}
            () = tokio::time::sleep(wait) => {}
            () = tokio::time::sleep_until(next_reconcile) => {
                every_target = true;
                next_reconcile = tokio::time::Instant::now() + settings.identity_reconcile;
            }
            Some(done) = jobs.join_next(), if !jobs.is_empty() => {
                memory.finished(done, settings.resync);
                // Finish every job that is done: their confirmations go in one pass.
                while let Some(done) = jobs.try_join_next() {
                    memory.finished(done, settings.resync);
                }
            }
            () = &mut shutdown => {
                // As a pass in flight, ARM work in flight finishes (its assignments confirmed)
                // before the loop returns.
                while let Some(done) = jobs.join_next().await {
                    memory.finished(done, settings.resync);
                }
                return Ok(());
            }
        }
    }
}

/// The retry delay after `failures` failed attempts in a row: 1 s doubling to 5 min, at most
/// `cap`.
fn backoff(failures: u32, cap: Duration) -> Duration {
    let secs = 1u64 << failures.saturating_sub(1).min(9);
    Duration::from_secs(secs.min(300)).min(cap)
}

/// (namespace, name) of an assignment.
type ObjectKey = (String, String);

/// What the loop carries from one pass to the next.
#[derive(Debug, Default)]
struct Memory {
    /// Warnings logged at `warn` while they last (repeats go to `debug`).
    warned: HashSet<Warning>,
    /// Uids of objects deleted by earlier passes that the cache may still show.
    removed: HashSet<String>,
    /// What earlier passes created or confirmed, by (namespace, name), while the cache may
    /// not show it yet.
    written: HashMap<(String, String), Written>,
    /// Identities held after their last pod.
    holds: Holds,
    /// The hold record was read (or found absent) since this replica leads.
    holds_loaded: bool,
    /// The hold record as last stored.
    stored: Option<Record>,
    /// VMs/VMSS with a job in flight: the ids it removes, the assignments it writes.
    in_flight: HashMap<ArmTarget, (BTreeSet<String>, HashSet<ObjectKey>)>,
    /// VMs/VMSS whose last job failed: failures in a row and when to try again.
    backoff: HashMap<ArmTarget, (u32, tokio::time::Instant)>,
}

impl Memory {
    /// Takes in a finished job (or a panicked one: its target is tried again).
    fn finished(&mut self, done: Result<JobOutcome, tokio::task::JoinError>, cap: Duration) {
        let outcome = match done {
            Ok(outcome) => outcome,
            Err(e) => {
                warn!(error = %e, "VM/VMSS job did not finish");
                // Which target is unknown: let every one be planned again.
                self.in_flight.clear();
                return;
            }
        };
        self.in_flight.remove(&outcome.target);
        self.remember(&outcome.report);
        self.holds.released(&outcome.target, &outcome.released);
        if outcome.failed {
            let failures = self
                .backoff
                .get(&outcome.target)
                .map_or(1, |(n, _)| n.saturating_add(1));
            let wait = backoff(failures, cap).max(outcome.report.retry_after.unwrap_or_default());
            self.backoff.insert(
                outcome.target,
                (failures, tokio::time::Instant::now() + wait),
            );
        } else {
            self.backoff.remove(&outcome.target);
        }
    }

    /// How long until the next hold's period ends (`None` without holds in their period).
    fn next_hold_due(&self) -> Option<Duration> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.holds
            .iter()
            .filter(|(_, _, h)| !h.releasing)
            .map(|(_, _, h)| Duration::from_secs(h.until.saturating_sub(now)))
            .min()
    }

    /// Takes in what a pass wrote.
    fn remember(&mut self, report: &PassReport) {
        self.removed.extend(report.removed.iter().cloned());
        for written in &report.written {
            let key = (written.namespace.clone(), written.name.clone());
            match self.written.get_mut(&key) {
                // A create and its confirmation in one pass.
                Some(known) if written.confirmed.is_some() => {
                    known.confirmed.clone_from(&written.confirmed);
                    known.at = written.at;
                }
                _ => {
                    self.written.insert(key, written.clone());
                }
            }
        }
    }

    /// Whether an object an earlier pass created is not in `cached` yet (recently enough to
    /// wait for it).
    fn awaits_created(&self, cached: &[Arc<AzureAssignedIdentity>]) -> bool {
        let shown: HashSet<(&str, &str)> = cached
            .iter()
            .map(|o| (namespace_of(o), name_of(o)))
            .collect();
        self.written.values().any(|w| {
            w.created
                && w.at.elapsed() < WRITTEN_TTL
                && !shown.contains(&(w.namespace.as_str(), w.name.as_str()))
        })
    }
}

/// One reconcile pass over the current caches.
async fn pass(
    client: &Client,
    settings: &Settings,
    events: &Recorder,
    stores: &Stores,
    every_target: bool,
    memory: &mut Memory,
) -> (PassReport, Vec<TargetJob>) {
    let Memory {
        warned,
        removed,
        written,
        holds,
        holds_loaded,
        stored,
        in_flight,
        backoff,
    } = memory;
    let pods = stores.pods.state();
    let nodes = stores.nodes.state();
    let identities = stores.identities.state();
    let bindings = stores.bindings.state();
    let existing = stores.assigned.state();
    // Objects an earlier pass deleted stay in the cache until their watch events arrive: they
    // are left out (not deleted again, their ids not released again) until the cache drops them.
    let cached: HashSet<&str> = existing
        .iter()
        .filter_map(|o| o.metadata.uid.as_deref())
        .collect();
    removed.retain(|uid| cached.contains(uid.as_str()));
    // What earlier passes marked `Assigned` is read with that state while the cache still
    // shows the version before the patch (else it would be confirmed again). A record goes
    // once the cache moved past it (a create's, once the cache shows the object), or when
    // its object is not shown in time.
    let cached_versions: HashMap<(&str, &str), Option<&str>> = existing
        .iter()
        .map(|o| {
            (
                (namespace_of(o), name_of(o)),
                o.metadata.resource_version.as_deref(),
            )
        })
        .collect();
    written.retain(|(namespace, name), record| {
        match cached_versions.get(&(namespace.as_str(), name.as_str())) {
            Some(version) => record
                .confirmed
                .as_ref()
                .is_some_and(|c| *version == Some(c.stale_version.as_str())),
            None => record.at.elapsed() < WRITTEN_TTL,
        }
    });
    let substituted: Vec<AzureAssignedIdentity> = if written.is_empty() {
        Vec::new()
    } else {
        existing
            .iter()
            .filter_map(|o| {
                let key = (namespace_of(o).to_owned(), name_of(o).to_owned());
                let confirmed = written.get(&key)?.confirmed.as_ref()?;
                Some(confirmed.apply(o))
            })
            .collect()
    };
    let replaced: HashSet<(&str, &str)> = substituted
        .iter()
        .map(|o| (namespace_of(o), name_of(o)))
        .collect();
    let existing: Vec<&AzureAssignedIdentity> = existing
        .iter()
        .map(AsRef::as_ref)
        .filter(|o| !replaced.contains(&(namespace_of(o), name_of(o))))
        .chain(substituted.iter())
        .filter(|o| {
            o.metadata
                .uid
                .as_ref()
                .is_none_or(|uid| !removed.contains(uid))
        })
        .collect();
    let inputs = Inputs {
        pods: pods.iter().map(AsRef::as_ref).collect(),
        nodes: nodes.iter().map(AsRef::as_ref).collect(),
        identities: identities.iter().map(AsRef::as_ref).collect(),
        bindings: bindings.iter().map(AsRef::as_ref).collect(),
        existing,
    };
    let (mut plan, ownership) =
        cpu_bound(|| (compute(&inputs, &settings.options), Ownership::of(&inputs)));
    ownership.keep_found(&mut plan);
    // Each warning once while it lasts, not once per pass.
    let current: HashSet<Warning> = plan.warnings.iter().cloned().collect();
    for warning in &plan.warnings {
        if warned.contains(warning) {
            debug!("{warning}");
        } else {
            warn!("{warning}");
        }
    }
    *warned = current;

    // Holds: releases become holds (recorded before their assignments go), holds whose
    // identity is needed again end, holds whose period is over are released.
    if let Some(location) = &settings.hold_record
        && !*holds_loaded
    {
        match read_hold_record(client, location).await {
            Ok(record) => {
                if let Some(record) = &record {
                    holds.restore(record);
                    info!(held = holds.len(), "holds restored from the record");
                }
                *stored = record;
                *holds_loaded = true;
            }
            Err(e) => {
                warn!(error = %e, "failed to read the hold record; releasing at once until it is read")
            }
        }
    }
    let hold_settings = if settings.hold_record.is_none() || *holds_loaded {
        settings.holds
    } else {
        HoldSettings {
            grace: Duration::ZERO,
            ..settings.holds
        }
    };
    let applied = holds.apply(&mut plan, std::time::SystemTime::now(), &hold_settings);
    crate::metrics::holds_reused(applied.reused.len());
    for (target, id) in &applied.taken {
        debug!(%target, id, "identity held after its last pod");
    }
    if let Some(location) = &settings.hold_record
        && *holds_loaded
    {
        let record = holds.to_record();
        // An absent record says what an empty one says: no write until something is held.
        let unchanged = match stored.as_ref() {
            Some(stored) => *stored == record,
            None => record.held.is_empty(),
        };
        if !unchanged {
            match write_hold_record(client, location, &record).await {
                Ok(()) => *stored = Some(record),
                Err(e) => {
                    warn!(error = %e, "failed to record the held identities; releasing the new ones at once");
                    holds.undo(&mut plan, &applied);
                }
            }
        }
    }

    let now = tokio::time::Instant::now();
    backoff.retain(|_, (_, at)| *at > now);
    let mut view = ArmView {
        busy: in_flight.keys().chain(backoff.keys()).cloned().collect(),
        backing_off: backoff
            .keys()
            .filter(|t| !in_flight.contains_key(*t))
            .cloned()
            .collect(),
        claimed: in_flight
            .values()
            .flat_map(|(_, objects)| objects.iter().cloned())
            .collect(),
        ..ArmView::default()
    };
    for (target, id, hold) in holds.iter() {
        if !hold.releasing {
            view.held.insert((target.clone(), id.to_owned()));
        }
    }
    // Holds this pass ended for a pod that needs the identity again: still on the VM/VMSS.
    view.held.extend(applied.reused.iter().cloned());
    for (target, work) in &plan.targets {
        let releasing = in_flight.get(target).map(|(ids, _)| ids);
        for id in work.kept.iter().chain(
            view.held
                .iter()
                .filter(|(t, _)| t == target)
                .map(|(_, id)| id),
        ) {
            if releasing.is_none_or(|ids| !ids.contains(id)) && !work.release.contains(id) {
                view.known.insert((target.clone(), id.clone()));
            }
        }
    }
    apply_plan_with(
        client,
        settings.batch.max(1),
        Some(events),
        &plan,
        every_target,
        Some(&ownership),
        &view,
    )
    .await
}

/// The hold record from MIC's ConfigMap; `None` when the ConfigMap or its key is absent.
async fn read_hold_record(
    client: &Client,
    location: &HoldRecordLocation,
) -> Result<Option<Record>, kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &location.namespace);
    let Some(map) = api.get_opt(&location.config_map).await? else {
        return Ok(None);
    };
    let Some(text) = map
        .data
        .as_ref()
        .and_then(|d| d.get(crate::hold::RECORD_KEY))
    else {
        return Ok(None);
    };
    match serde_json::from_str(text) {
        Ok(record) => Ok(Some(record)),
        Err(e) => {
            // Unreadable (edited by hand): nothing can be trusted in it; holds it named stay
            // on their VMs/VMSS (never a removal by mistake).
            warn!(error = %e, "ignoring an unreadable hold record");
            Ok(None)
        }
    }
}

/// Stores the hold record in MIC's ConfigMap (created when absent; other keys kept). A GET
/// and an update (the verbs MIC's role has on ConfigMaps); a conflict fails the write, which
/// the next pass repeats.
async fn write_hold_record(
    client: &Client,
    location: &HoldRecordLocation,
    record: &Record,
) -> Result<(), kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &location.namespace);
    let text = serde_json::to_string(record).unwrap_or_default();
    match api.get_opt(&location.config_map).await? {
        Some(mut map) => {
            map.data
                .get_or_insert_default()
                .insert(crate::hold::RECORD_KEY.to_owned(), text);
            api.replace(&location.config_map, &PostParams::default(), &map)
                .await
                .map(drop)
        }
        None => {
            let map = ConfigMap {
                metadata: kube::api::ObjectMeta {
                    name: Some(location.config_map.clone()),
                    namespace: Some(location.namespace.clone()),
                    ..Default::default()
                },
                data: Some([(crate::hold::RECORD_KEY.to_owned(), text)].into()),
                ..Default::default()
            };
            api.create(&PostParams::default(), &map).await.map(drop)
        }
    }
}

/// Writes `plan` to the API server and runs each target's identity work: targets with
/// assignments to confirm or ids to release, and with `every_target` also all the others that
/// need some id (the periodic identity-assignment reconcile).
/// With `events`, upstream's Kubernetes events are published on the bindings. The target jobs
/// run after the API writes, concurrently, before this returns.
pub async fn apply_plan(
    client: &Client,
    batch: usize,
    assigner: &Arc<dyn IdentityAssigner>,
    events: Option<&Recorder>,
    plan: &Plan<'_>,
    every_target: bool,
) -> PassReport {
    let (mut report, jobs) = apply_plan_with(
        client,
        batch,
        events,
        plan,
        every_target,
        None,
        &ArmView::default(),
    )
    .await;
    let outcomes = futures::future::join_all(jobs.into_iter().map(|job| {
        run_job(
            job,
            client.clone(),
            assigner.clone(),
            events.cloned(),
            batch,
        )
    }))
    .await;
    for outcome in outcomes {
        report.absorb(outcome.report);
    }
    report
}

/// The API writes of `plan` (creates, updates, deletions without ARM work, confirmations
/// without ARM work, including those of identities `view` knows are on their VM/VMSS), and
/// each VM/VMSS's remaining work as a [`TargetJob`] for the caller to run with [`run_job`]
/// (none for `view.busy` targets). Knowing the existing assignments' [`Ownership`],
/// confirmations of identities ARM found already present carry the [`PREEXISTING_ANNOTATION`]
/// mark (apply [`Ownership::keep_found`] to `plan` first), and deletions whose node is gone get
/// upstream's `binding removed` / `binding remove error` events.
pub async fn apply_plan_with(
    client: &Client,
    batch: usize,
    events: Option<&Recorder>,
    plan: &Plan<'_>,
    every_target: bool,
    ownership: Option<&Ownership>,
    view: &ArmView,
) -> (PassReport, Vec<TargetJob>) {
    let mut report = PassReport::default();
    let mut objects: HashMap<&str, &AzureAssignedIdentity> = HashMap::new();
    for object in plan
        .create
        .iter()
        .chain(plan.update.iter().map(|u| &u.desired))
        .chain(plan.unchanged.iter().copied())
    {
        objects.insert(name_of(object), object);
    }
    let namespaces: HashMap<&str, &str> = objects
        .iter()
        .map(|(name, object)| (*name, namespace_of(object)))
        .collect();

    // 1. Creates and updates (state Created unless an update keeps the state; creates in the
    //    state their `Creation` says). Creates a job makes once its VM/VMSS's identity work is
    //    done, or that a job in flight makes, wait.
    let creations = creations(plan, view, ownership);
    let adjusted: HashMap<&str, AzureAssignedIdentity> = plan
        .create
        .iter()
        .filter_map(|object| {
            let (state, mark) = match creations.get(name_of(object))? {
                Creation::Known { mark, .. } => (AssignedIdentityState::Assigned, *mark),
                Creation::Waiting => (AssignedIdentityState::Created, false),
                Creation::AfterArm(_) | Creation::Later => return None,
            };
            Some((name_of(object), in_state(object, state, mark)))
        })
        .collect();
    let writes: Vec<BoxFuture<'_, WriteOutcome<'_>>> = plan
        .create
        .iter()
        .filter(|o| {
            !view.claims(o)
                && !matches!(
                    creations.get(name_of(o)),
                    Some(Creation::AfterArm(_) | Creation::Later)
                )
        })
        .map(|o| (adjusted.get(name_of(o)).unwrap_or(o), true))
        .chain(plan.update.iter().map(|u| (&u.desired, false)))
        .map(|(object, create)| {
            Box::pin(async move {
                let result = if create {
                    create_assigned(client, object).await
                } else {
                    replace_assigned(client, object).await
                };
                (name_of(object), create, result)
            }) as BoxFuture<'_, _>
        })
        .collect();
    let mut failed: HashSet<&str> = HashSet::new();
    // Assignments this pass turned `Assigned`, with their VM/VMSS (`None`: no ARM work), for
    // the `binding applied` events.
    let mut applied: Vec<(Option<&ArmTarget>, &AzureAssignedIdentity)> = Vec::new();
    // resourceVersions as this pass wrote them (a later confirmation patches that version).
    let mut versions: HashMap<&str, (String, bool)> = HashMap::new();
    for (name, create, result) in bounded(writes, batch).await {
        if let Ok(Some(version)) = &result {
            versions.insert(name, (version.clone(), create));
            if create {
                report.written.push(Written {
                    namespace: namespaces
                        .get(name)
                        .copied()
                        .unwrap_or("default")
                        .to_owned(),
                    name: name.to_owned(),
                    created: true,
                    confirmed: None,
                    at: std::time::Instant::now(),
                });
            }
        }
        match result {
            Ok(version) if create => {
                report.created += 1;
                // Created in its final state: applied now (a 409 means an earlier pass did).
                let object = adjusted.get(name).or_else(|| objects.get(name).copied());
                if let (Some(_), Some(object)) = (version, object)
                    && object.state() == AssignedIdentityState::Assigned
                {
                    report.assigned += 1;
                    match creations.get(name) {
                        Some(Creation::Known { target, .. }) => {
                            report.confirmed_without_arm += 1;
                            applied.push((Some(target), object));
                        }
                        _ => applied.push((None, object)),
                    }
                }
            }
            Ok(_) => report.updated += 1,
            Err(e) => {
                warn!(name, error = %e, "failed to write AzureAssignedIdentity");
                report.failures += 1;
                failed.insert(name);
                if let (Some(events), Some(object)) = (events, objects.get(name)) {
                    write_error_event(events, object, create, &e).await;
                }
            }
        }
    }
    let failed = &failed;
    let namespace = |name: &str| namespaces.get(name).copied().unwrap_or("default");
    // The record of a confirmation of `object`: the version it patched (the one this pass
    // wrote, else the one the plan read) and what the API server answered.
    let versions = &versions;
    let confirmation = move |object: &AzureAssignedIdentity, after: &AzureAssignedIdentity| {
        let (stale_version, created) = match versions.get(name_of(object)) {
            Some((version, created)) => (Some(version.clone()), *created),
            None => (object.metadata.resource_version.clone(), false),
        };
        Written {
            namespace: namespace_of(object).to_owned(),
            name: name_of(object).to_owned(),
            created,
            confirmed: stale_version.map(|stale_version| Confirmed {
                stale_version,
                version: after.metadata.resource_version.clone(),
                status: after.status.clone(),
                preexisting: after
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(PREEXISTING_ANNOTATION))
                    .cloned(),
            }),
            at: std::time::Instant::now(),
        }
    };

    // 2. Deletions that need no ARM work. Those whose node is gone get upstream's
    //    `binding removed` / `binding remove error` events (its node-deleted path).
    let deletions: Vec<BoxFuture<'_, (&AzureAssignedIdentity, Result<(), kube::Error>)>> = plan
        .delete
        .iter()
        .filter(|d| d.release.is_none() && !view.claims(d.object))
        .map(|d| {
            let node_gone = ownership.is_some_and(|o| {
                d.object
                    .node_name()
                    .is_some_and(|node| !o.node_exists(node))
            });
            Box::pin(async move {
                let result = delete_assigned(client, d.object).await;
                if let (Some(events), true) = (events, node_gone) {
                    removal_event(events, d.object, result.as_ref().err()).await;
                }
                (d.object, result)
            }) as BoxFuture<'_, _>
        })
        .collect();
    report.deletions(bounded(deletions, batch).await);

    // 3. Identities that need no ARM work.
    // Each answer is reduced to its record at once: thousands of whole objects must not wait
    // for the batch to finish.
    let confirms: Vec<BoxFuture<'_, (Option<&AzureAssignedIdentity>, ConfirmResult)>> = plan
        .assign_without_arm
        .iter()
        .filter(|name| !failed.contains(name.as_str()))
        .filter(|name| {
            objects
                .get(name.as_str())
                .is_none_or(|object| !view.claims(object))
        })
        .map(|name| {
            let object = objects.get(name.as_str()).copied();
            Box::pin(async move {
                let result = set_state(
                    client,
                    namespace(name),
                    name,
                    AssignedIdentityState::Assigned,
                )
                .await;
                if let (Some(events), Some(object), Err(e)) = (events, object, result.as_ref()) {
                    status_error_event(events, object, e, false).await;
                }
                let record = result.map(|after| object.map(|object| confirmation(object, &after)));
                (object, record)
            }) as BoxFuture<'_, _>
        })
        .collect();
    let confirmed = bounded(confirms, batch).await;
    applied.extend(
        confirmed
            .iter()
            .filter(|(_, result)| result.is_ok())
            .filter_map(|(object, _)| object.map(|o| (None, o))),
    );
    report.confirmations(confirmed.into_iter().map(|(_, result)| result));

    // 4. Confirmations of identities known to be on their VM/VMSS: no ARM call (an identity
    //    held after its last pod, or one an `Assigned` assignment there keeps). New ones were
    //    created `Assigned` in step 1.
    let known: Vec<(&ArmTarget, &AzureAssignedIdentity, bool)> = plan
        .targets
        .iter()
        .flat_map(|(target, work)| work.confirm.iter().map(move |name| (target, name)))
        .filter(|(_, name)| {
            !failed.contains(name.as_str()) && !creations.contains_key(name.as_str())
        })
        .filter_map(|(target, name)| {
            let object = objects.get(name.as_str()).copied()?;
            if view.claims(object) {
                return None;
            }
            let id = lower_id(object);
            view.is_known(target, &id).then(|| {
                (
                    target,
                    object,
                    ownership.is_some_and(|o| o.is_found(target, &id)),
                )
            })
        })
        .collect();
    let known_names: HashSet<&str> = known.iter().map(|(_, o, _)| name_of(o)).collect();
    let confirms: Vec<BoxFuture<'_, (&ArmTarget, &AzureAssignedIdentity, ConfirmResult)>> = known
        .iter()
        .map(|&(target, object, mark)| {
            Box::pin(async move {
                let result =
                    set_assigned(client, namespace_of(object), name_of(object), mark).await;
                if let (Some(events), Err(e)) = (events, result.as_ref()) {
                    status_error_event(events, object, e, false).await;
                }
                let record = result.map(|after| Some(confirmation(object, &after)));
                (target, object, record)
            }) as BoxFuture<'_, _>
        })
        .collect();
    let confirmed = bounded(confirms, batch).await;
    for (target, object, result) in &confirmed {
        if result.is_ok() {
            report.confirmed_without_arm += 1;
            applied.push((Some(*target), *object));
        }
    }
    report.confirmations(confirmed.into_iter().map(|(_, _, result)| result));
    // One `binding applied` event per identity and VM/VMSS for what this pass made `Assigned`.
    if let Some(events) = events {
        applied_events(events, &applied, false, batch).await;
    }

    // 5. The rest of each VM/VMSS's work becomes a job the caller runs concurrently with
    //    later passes (a long-running PATCH holds up no one else). Busy targets (a job in
    //    flight, or backing off) are left for a later pass.
    let jobs = plan
        .targets
        .iter()
        .filter(|(target, _)| !view.busy.contains(*target))
        .filter_map(|(target, work)| {
            let confirm: Vec<JobObject> = work
                .confirm
                .iter()
                .filter(|name| {
                    !failed.contains(name.as_str())
                        && !known_names.contains(name.as_str())
                        && !creations.contains_key(name.as_str())
                })
                .filter_map(|name| objects.get(name.as_str()).copied())
                .map(|object| {
                    let (stale_version, created) = match versions.get(name_of(object)) {
                        Some((version, created)) => (Some(version.clone()), *created),
                        None => (object.metadata.resource_version.clone(), false),
                    };
                    JobObject {
                        object: object.clone(),
                        stale_version,
                        created,
                    }
                })
                .collect();
            let create: Vec<AzureAssignedIdentity> = work
                .create_assigned
                .iter()
                .filter(|name| matches!(creations.get(name.as_str()), Some(Creation::AfterArm(_))))
                .filter_map(|name| objects.get(name.as_str()).map(|o| (*o).clone()))
                .collect();
            let reconcile = every_target && !work.required.is_empty();
            if confirm.is_empty() && create.is_empty() && work.release.is_empty() && !reconcile {
                return None;
            }
            let deletions: Vec<(AzureAssignedIdentity, Option<(ArmTarget, String)>)> = plan
                .delete
                .iter()
                .filter(|d| d.release.as_ref().is_some_and(|(t, _)| t == target))
                .map(|d| (d.object.clone(), d.release.clone()))
                .collect();
            // Ids whose confirmation may carry the pre-existing mark if ARM finds them there:
            // no unmarked `Assigned` assignment and no hold says podid put them there.
            let unowned: BTreeSet<String> = match ownership {
                Some(o) => work
                    .required
                    .iter()
                    .filter(|id| {
                        !o.owns(target, id) && !view.held.contains(&(target.clone(), (*id).clone()))
                    })
                    .cloned()
                    .collect(),
                None => BTreeSet::new(),
            };
            Some(TargetJob {
                target: target.clone(),
                required: work.required.clone(),
                release: work.release.clone(),
                confirm,
                create,
                deletions,
                unowned,
            })
        })
        .collect();
    (report, jobs)
}

/// An assignment a [`TargetJob`] confirms, with the version its confirmation patches.
#[derive(Debug, Clone)]
struct JobObject {
    object: AzureAssignedIdentity,
    /// The resourceVersion the pass wrote, else the one the plan read.
    stale_version: Option<String>,
    /// Created by the pass that made the job.
    created: bool,
}

/// The ARM work of one VM/VMSS and the API writes that depend on it, owned so that it can run
/// while later passes go on.
#[derive(Debug, Clone)]
pub struct TargetJob {
    target: ArmTarget,
    required: BTreeSet<String>,
    release: BTreeSet<String>,
    confirm: Vec<JobObject>,
    /// New assignments (built `Assigned`) created once the identity work is done: `Assigned`
    /// when ARM has their identity, else `Created` ([`crate::desired::TargetPlan::create_assigned`]).
    create: Vec<AzureAssignedIdentity>,
    /// Deletions waiting for their identity to leave this VM/VMSS.
    deletions: Vec<(AzureAssignedIdentity, Option<(ArmTarget, String)>)>,
    /// Required ids no assignment or hold claims (candidates for the pre-existing mark).
    unowned: BTreeSet<String>,
}

impl TargetJob {
    /// The VM/VMSS.
    pub fn target(&self) -> &ArmTarget {
        &self.target
    }

    /// The ids this job removes.
    pub fn release(&self) -> &BTreeSet<String> {
        &self.release
    }

    /// (namespace, name) of the assignments this job confirms, creates or deletes: no pass
    /// writes them while it runs.
    pub fn objects(&self) -> HashSet<(String, String)> {
        self.confirm
            .iter()
            .map(|c| &c.object)
            .chain(&self.create)
            .chain(self.deletions.iter().map(|(o, _)| o))
            .map(|o| (namespace_of(o).to_owned(), name_of(o).to_owned()))
            .collect()
    }
}

/// What a [`TargetJob`] achieved.
#[derive(Debug, Clone)]
pub struct JobOutcome {
    /// The VM/VMSS.
    pub target: ArmTarget,
    /// Its API writes (and failures).
    pub report: PassReport,
    /// Ids ARM confirmed removed.
    pub released: BTreeSet<String>,
    /// The ARM call failed (as a whole or for some ids).
    pub failed: bool,
}

/// Runs one VM/VMSS's ARM work, then confirms its assignments and deletes the assignments
/// whose identity left.
pub async fn run_job(
    job: TargetJob,
    client: Client,
    assigner: Arc<dyn IdentityAssigner>,
    events: Option<Recorder>,
    batch: usize,
) -> JobOutcome {
    let client = &client;
    let events = events.as_ref();
    let target = &job.target;
    let mut report = PassReport::default();
    let (result, present) = assigner
        .apply_reporting(target, &job.required, &job.release)
        .await;
    let mut outcome = JobOutcome {
        target: target.clone(),
        report: PassReport::default(),
        released: BTreeSet::new(),
        failed: false,
    };
    let not_applied = match result {
        Ok(()) => None,
        Err(e) => {
            warn!(%target, error = %e, "failed to update the identities of the VM/VMSS");
            report.failures += 1;
            outcome.failed = true;
            let partial = e.downcast_ref::<NotApplied>().map(|p| p.ids.clone());
            if partial.is_none() {
                report.retry_after = assigner.retry_after(&e);
            }
            if let Some(events) = events {
                for object in job
                    .confirm
                    .iter()
                    .map(|c| &c.object)
                    .chain(&job.create)
                    .filter(|o| {
                        partial
                            .as_ref()
                            .is_none_or(|ids| ids.contains(&lower_id(o)))
                    })
                {
                    let spec = &object.spec;
                    let note = format!(
                        "failed to apply binding {} node {} for pod {}/{}, error: {e}",
                        binding_key(object),
                        spec.node_name.as_deref().unwrap_or_default(),
                        spec.pod_namespace.as_deref().unwrap_or_default(),
                        spec.pod.as_deref().unwrap_or_default(),
                    );
                    publish(
                        events,
                        object,
                        EventType::Warning,
                        "binding apply error",
                        note,
                    )
                    .await;
                }
            }
            match partial {
                Some(ids) => Some(ids),
                None => {
                    // Nothing confirmed: the assignments waiting for this work are created
                    // `Created`, as upstream would have written them, and confirmed on a
                    // later pass.
                    let created =
                        create_after_arm(client, events, &job, None, &BTreeSet::new(), batch).await;
                    report.absorb_created(created.report);
                    outcome.report = report;
                    return outcome;
                }
            }
        }
    };
    debug!(%target, "identities applied");
    let recovered = not_applied.is_some();
    let not_applied = not_applied.unwrap_or_default();
    outcome.released = job
        .release
        .iter()
        .filter(|id| !not_applied.contains(*id))
        .cloned()
        .collect();
    let present = &present;
    let unowned = &job.unowned;
    // Status first, events after: a scale set's 500 `binding applied` events must not hold
    // up its assignments turning `Assigned` (nmi waits on that state).
    let confirms: Vec<BoxFuture<'_, (&JobObject, ConfirmResult)>> = job
        .confirm
        .iter()
        .filter(|c| !not_applied.contains(&lower_id(&c.object)))
        .map(|c| {
            let id = lower_id(&c.object);
            let mark = present.contains(&id) && unowned.contains(&id);
            Box::pin(async move {
                let object = &c.object;
                let result =
                    set_assigned(client, namespace_of(object), name_of(object), mark).await;
                let record = result.map(|after| {
                    Some(Written {
                        namespace: namespace_of(object).to_owned(),
                        name: name_of(object).to_owned(),
                        created: c.created,
                        confirmed: c.stale_version.clone().map(|stale_version| Confirmed {
                            stale_version,
                            version: after.metadata.resource_version.clone(),
                            status: after.status.clone(),
                            preexisting: after
                                .metadata
                                .annotations
                                .as_ref()
                                .and_then(|a| a.get(PREEXISTING_ANNOTATION))
                                .cloned(),
                        }),
                        at: std::time::Instant::now(),
                    })
                });
                (c, record)
            }) as BoxFuture<'_, _>
        })
        .collect();
    let confirmed = bounded(confirms, batch).await;
    // Then the assignments that waited for this work, in their final state (`Created` for
    // those whose identity ARM did not take).
    let created = create_after_arm(client, events, &job, Some(present), &not_applied, batch).await;
    if let Some(events) = events {
        let mut applied: Vec<(Option<&ArmTarget>, &AzureAssignedIdentity)> = Vec::new();
        for (c, result) in &confirmed {
            match result {
                Ok(_) => applied.push((Some(target), &c.object)),
                Err(e) => status_error_event(events, &c.object, e, recovered).await,
            }
        }
        applied.extend(created.applied.iter().map(|o| (Some(target), *o)));
        applied_events(events, &applied, recovered, batch).await;
    }
    report.absorb_created(created.report);
    let deletions: Vec<Deletion<'_>> = job
        .deletions
        .iter()
        .filter(|(_, release)| {
            release
                .as_ref()
                .is_none_or(|(_, id)| !not_applied.contains(id))
        })
        .map(|(object, release)| Deletion {
            object,
            release: release.clone(),
        })
        .collect();
    let releases: Vec<BoxFuture<'_, (&AzureAssignedIdentity, Result<(), kube::Error>)>> = deletions
        .iter()
        .map(|d| {
            Box::pin(async move { (d.object, release_and_delete(client, events, d).await) })
                as BoxFuture<'_, _>
        })
        .collect();
    report.confirmations(confirmed.into_iter().map(|(_, result)| result));
    report.deletions(bounded(releases, batch).await);
    outcome.report = report;
    outcome
}

/// What a pass knows about the VMs and VM scale sets beyond the plan.
#[derive(Debug, Clone, Default)]
pub struct ArmView {
    /// Targets whose ARM work waits: a job in flight, or backing off after a failure.
    pub busy: HashSet<ArmTarget>,
    /// Of `busy`, those backing off after a failure (no job in flight).
    pub backing_off: HashSet<ArmTarget>,
    /// (target, id) on the VM/VMSS for sure: an `Assigned` assignment that stays keeps it, or
    /// podid holds it; minus ids a job in flight is removing.
    pub known: HashSet<(ArmTarget, String)>,
    /// (target, id) podid holds after their last pod.
    pub held: HashSet<(ArmTarget, String)>,
    /// (namespace, name) of assignments a job in flight confirms or deletes: left alone.
    pub claimed: HashSet<(String, String)>,
}

impl ArmView {
    fn claims(&self, object: &AzureAssignedIdentity) -> bool {
        !self.claimed.is_empty()
            && self
                .claimed
                .contains(&(namespace_of(object).to_owned(), name_of(object).to_owned()))
    }
}

impl ArmView {
    /// Whether `id` is known to be on `target`.
    pub fn is_known(&self, target: &ArmTarget, id: &str) -> bool {
        !id.is_empty() && self.known.contains(&(target.clone(), id.to_owned()))
    }
}

/// Upstream's Warning `status update error` on an assignment whose `Assigned` patch failed.
/// `recovered`: ARM failed for other ids of the VM/VMSS (upstream's error-recovery path,
/// whose message differs slightly).
async fn status_error_event(
    events: &Recorder,
    object: &AzureAssignedIdentity,
    error: &kube::Error,
    recovered: bool,
) {
    let spec = &object.spec;
    let pod = spec.pod.as_deref().unwrap_or_default();
    let pod_namespace = spec.pod_namespace.as_deref().unwrap_or_default();
    let for_pod = if recovered {
        format!("{pod_namespace}/{pod}")
    } else {
        pod.to_owned()
    };
    let note = format!(
        "failed to update AzureAssignedIdentity {}/{} status to Assigned for pod {for_pod}, error: {error}",
        namespace_of(object),
        name_of(object),
    );
    publish_on_assigned(events, object, "status update error", note).await;
}

/// Upstream's Warning `binding apply error` on the binding for a create or update that failed.
async fn write_error_event(
    events: &Recorder,
    object: &AzureAssignedIdentity,
    create: bool,
    error: &kube::Error,
) {
    let spec = &object.spec;
    let name = name_of(object);
    let note = if create {
        format!(
            "failed to create AzureAssignedIdentity {name}/{} for pod {}/{}, error: {error}",
            namespace_of(object),
            spec.pod_namespace.as_deref().unwrap_or_default(),
            spec.pod.as_deref().unwrap_or_default(),
        )
    } else {
        format!(
            "failed to update AzureAssignedIdentity {}/{name} for pod {}/{}, error: {error}",
            namespace_of(object),
            spec.pod.as_deref().unwrap_or_default(),
            spec.pod_namespace.as_deref().unwrap_or_default(),
        )
    };
    publish(
        events,
        object,
        EventType::Warning,
        "binding apply error",
        note,
    )
    .await;
}

/// Pods named in an aggregated `binding applied` note; the rest are counted.
const APPLIED_PODS_NAMED: usize = 5;

/// The Normal `binding applied` events of the assignments that turned `Assigned` in one pass
/// or job, each with its VM/VMSS (`None`: no ARM work): **one per identity and VM/VMSS**
/// instead of upstream's one per assignment, on the AzureIdentity. The note names the
/// bindings, the VM/VMSS, how many pods and the first [`APPLIED_PODS_NAMED`] of them
/// (`<podNamespace>/<pod>`, sorted): `Binding kv-binding applied on vmss pool0 for 12 pods:
/// team/a, team/b, team/c, team/d, team/e and 7 more`. `recovered`: other identities of the
/// VM/VMSS failed (lower-case `binding`, as upstream's recovery path).
async fn applied_events(
    events: &Recorder,
    applied: &[(Option<&ArmTarget>, &AzureAssignedIdentity)],
    recovered: bool,
    batch: usize,
) {
    type Group<'a> = (&'a AzureIdentity, BTreeSet<&'a str>, BTreeSet<String>);
    let mut groups: BTreeMap<(Option<&ArmTarget>, &str, &str), Group<'_>> = BTreeMap::new();
    for &(target, object) in applied {
        let Some(identity) = object.spec.azure_identity_ref.as_deref() else {
            continue;
        };
        let key = (
            target,
            identity.metadata.namespace.as_deref().unwrap_or_default(),
            identity.metadata.name.as_deref().unwrap_or_default(),
        );
        let group = groups
            .entry(key)
            .or_insert_with(|| (identity, BTreeSet::new(), BTreeSet::new()));
        if let Some(binding) = object
            .spec
            .azure_binding_ref
            .as_deref()
            .and_then(|b| b.metadata.name.as_deref())
        {
            group.1.insert(binding);
        }
        group.2.insert(format!(
            "{}/{}",
            object.spec.pod_namespace.as_deref().unwrap_or_default(),
            object.spec.pod.as_deref().unwrap_or_default()
        ));
    }
    let publishing: Vec<BoxFuture<'_, ()>> = groups
        .into_iter()
        .map(|((target, _, _), (identity, bindings, pods))| {
            let note = applied_note(target, &bindings, &pods, recovered);
            Box::pin(publish_on_identity(
                events,
                identity,
                "binding applied",
                note,
            )) as BoxFuture<'_, ()>
        })
        .collect();
    bounded(publishing, batch).await;
}

/// The note of an aggregated `binding applied` event (see [`applied_events`]).
fn applied_note(
    target: Option<&ArmTarget>,
    bindings: &BTreeSet<&str>,
    pods: &BTreeSet<String>,
    recovered: bool,
) -> String {
    let word = match (recovered, bindings.len() > 1) {
        (false, false) => "Binding",
        (false, true) => "Bindings",
        (true, false) => "binding",
        (true, true) => "bindings",
    };
    let on = target.map(|t| format!(" on {t}")).unwrap_or_default();
    let count = pods.len();
    let mut list = pods
        .iter()
        .take(APPLIED_PODS_NAMED)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    let more = count.saturating_sub(APPLIED_PODS_NAMED);
    if more > 0 {
        list.push_str(&format!(" and {more} more"));
    }
    let pods_word = if count == 1 { "pod" } else { "pods" };
    format!(
        "{word} {} applied{on} for {count} {pods_word}: {list}",
        bindings.iter().copied().collect::<Vec<_>>().join(", ")
    )
}

/// How a pass creates a new assignment that is not simply written as planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Creation<'p> {
    /// `Assigned` at once: its identity is known to be on the VM/VMSS (no ARM call). `mark`:
    /// with the [`PREEXISTING_ANNOTATION`] a confirmation would carry.
    Known { target: &'p ArmTarget, mark: bool },
    /// By the VM/VMSS's [`TargetJob`], once its identity work is done.
    AfterArm(&'p ArmTarget),
    /// `Created` at once, as upstream writes it, to be confirmed on a later pass: its VM/VMSS
    /// backs off after an ARM failure.
    Waiting,
    /// Not by this pass: a job in flight on its VM/VMSS confirms the identity (or makes the
    /// object); the pass after it creates it.
    Later,
}

/// The [`Creation`] of each new type-0 assignment of `plan` that is not simply written as
/// planned, by name: those in a target's `confirm` whose identity `view` knows, and every
/// [`crate::desired::TargetPlan::create_assigned`].
fn creations<'p>(
    plan: &'p Plan<'_>,
    view: &ArmView,
    ownership: Option<&Ownership>,
) -> HashMap<&'p str, Creation<'p>> {
    let created: HashMap<&str, &AzureAssignedIdentity> =
        plan.create.iter().map(|o| (name_of(o), o)).collect();
    let mut out = HashMap::new();
    if created.is_empty() {
        return out;
    }
    for (target, work) in &plan.targets {
        let known = |object: &AzureAssignedIdentity| {
            let id = lower_id(object);
            view.is_known(target, &id).then(|| Creation::Known {
                target,
                mark: ownership.is_some_and(|o| o.is_found(target, &id)),
            })
        };
        for name in &work.confirm {
            if let Some(object) = created.get(name.as_str())
                && let Some(creation) = known(object)
            {
                out.insert(name.as_str(), creation);
            }
        }
        for name in &work.create_assigned {
            let Some(object) = created.get(name.as_str()) else {
                continue;
            };
            let creation = match known(object) {
                Some(known) => known,
                None if !view.busy.contains(target) => Creation::AfterArm(target),
                None if view.backing_off.contains(target) => Creation::Waiting,
                None => Creation::Later,
            };
            out.insert(name.as_str(), creation);
        }
    }
    out
}

/// A copy of `object` in `state`, with the [`PREEXISTING_ANNOTATION`] mark when `mark`.
fn in_state(
    object: &AzureAssignedIdentity,
    state: AssignedIdentityState,
    mark: bool,
) -> AzureAssignedIdentity {
    let mut object = object.clone();
    object.status.get_or_insert_default().status = Some(state);
    if mark {
        object
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(PREEXISTING_ANNOTATION.to_owned(), "true".to_owned());
    }
    object
}

/// What [`create_after_arm`] did.
#[derive(Default)]
struct CreatedAfterArm<'a> {
    /// Creates, `Assigned` ones and failures counted; records of what was created.
    report: PassReport,
    /// Created `Assigned` (for the `binding applied` events).
    applied: Vec<&'a AzureAssignedIdentity>,
}

/// Creates a job's [`TargetJob::create`] once its identity work is done: `Assigned` (with the
/// [`PREEXISTING_ANNOTATION`] mark where a confirmation would carry it) when ARM confirmed the
/// identity; `Created` when it did not (`present` is `None`: the whole call failed; else the
/// ids in `not_applied`), to be confirmed on a later pass as upstream's objects are.
async fn create_after_arm<'a>(
    client: &Client,
    events: Option<&Recorder>,
    job: &'a TargetJob,
    present: Option<&BTreeSet<String>>,
    not_applied: &BTreeSet<String>,
    batch: usize,
) -> CreatedAfterArm<'a> {
    type Outcome<'a> = (
        &'a AzureAssignedIdentity,
        bool,
        Result<Option<String>, kube::Error>,
    );
    let creating: Vec<BoxFuture<'_, Outcome<'a>>> = job
        .create
        .iter()
        .map(|object| {
            let id = lower_id(object);
            let confirmed = present.is_some() && !not_applied.contains(&id);
            let mark = present.is_some_and(|p| p.contains(&id)) && job.unowned.contains(&id);
            Box::pin(async move {
                let result = if confirmed && !mark {
                    create_assigned(client, object).await
                } else {
                    let state = if confirmed {
                        AssignedIdentityState::Assigned
                    } else {
                        AssignedIdentityState::Created
                    };
                    create_assigned(client, &in_state(object, state, mark && confirmed)).await
                };
                (object, confirmed, result)
            }) as BoxFuture<'_, _>
        })
        .collect();
    let mut done = CreatedAfterArm::default();
    for (object, confirmed, result) in bounded(creating, batch).await {
        match result {
            // A 409: the cache lags a write of ours; the next pass sees the object.
            Ok(None) => {}
            Ok(Some(_)) => {
                done.report.created += 1;
                done.report.written.push(Written {
                    namespace: namespace_of(object).to_owned(),
                    name: name_of(object).to_owned(),
                    created: true,
                    confirmed: None,
                    at: std::time::Instant::now(),
                });
                if confirmed {
                    done.report.assigned += 1;
                    done.applied.push(object);
                }
            }
            Err(e) => {
                warn!(name = name_of(object), error = %e, "failed to write AzureAssignedIdentity");
                done.report.failures += 1;
                if let Some(events) = events {
                    write_error_event(events, object, true, &e).await;
                }
            }
        }
    }
    done
}

/// Upstream's events for an assignment deleted because its node is gone.
async fn removal_event(
    events: &Recorder,
    object: &AzureAssignedIdentity,
    error: Option<&kube::Error>,
) {
    let spec = &object.spec;
    let binding = spec.azure_binding_ref.as_deref();
    let binding_name = binding
        .and_then(|b| b.metadata.name.as_deref())
        .unwrap_or_default();
    let node = spec.node_name.as_deref().unwrap_or_default();
    let pod = spec.pod.as_deref().unwrap_or_default();
    match error {
        None => {
            let note = format!("Binding {binding_name} removed from node {node} for pod {pod}");
            publish(events, object, EventType::Normal, "binding removed", note).await;
        }
        Some(e) => {
            let note = format!(
                "failed to remove AzureIdentityBinding {} from node {node} for pod {}/{pod}, error: {e}",
                binding_key(object),
                spec.pod_namespace.as_deref().unwrap_or_default(),
            );
            publish(
                events,
                object,
                EventType::Warning,
                "binding remove error",
                note,
            )
            .await;
        }
    }
}

/// A confirmation's outcome: its record (`None` when the object it confirmed is not known).
type ConfirmResult = Result<Option<Written>, kube::Error>;

/// A create or update: the name, whether it was a create, and the resourceVersion written.
type WriteOutcome<'a> = (&'a str, bool, Result<Option<String>, kube::Error>);

/// Source component of MIC's events, as upstream.
pub const EVENT_SOURCE: &str = "aadpodidentity.k8s.io";

fn binding_key(object: &AzureAssignedIdentity) -> String {
    let binding = object.spec.azure_binding_ref.as_deref();
    format!(
        "{}/{}",
        binding
            .and_then(|b| b.metadata.namespace.as_deref())
            .unwrap_or_default(),
        binding
            .and_then(|b| b.metadata.name.as_deref())
            .unwrap_or_default()
    )
}

/// The longest event note the API server accepts, in bytes (events.k8s.io/v1 refuses longer
/// notes with 422, and the event would be lost).
const MAX_NOTE: usize = 1024;

/// `note` cut to at most [`MAX_NOTE`] bytes at a character boundary, ending in `…` when cut.
/// Notes carry ARM error messages, whose length mic does not control.
fn cut_note(mut note: String) -> String {
    if note.len() > MAX_NOTE {
        let mut end = MAX_NOTE - '…'.len_utf8();
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push('…');
    }
    note
}

/// Publishes an event on the binding behind `object` (upstream's involved object); failures
/// are logged, never fatal.
async fn publish(
    events: &Recorder,
    object: &AzureAssignedIdentity,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let Some(binding) = object.spec.azure_binding_ref.as_deref() else {
        return;
    };
    let reference = ObjectReference {
        api_version: Some(podid_api::API_VERSION.to_owned()),
        kind: Some("AzureIdentityBinding".to_owned()),
        name: binding.metadata.name.clone(),
        namespace: binding.metadata.namespace.clone(),
        uid: binding.metadata.uid.clone(),
        resource_version: binding.metadata.resource_version.clone(),
        field_path: None,
    };
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(cut_note(note)),
        action: "Assign".to_owned(),
        secondary: None,
    };
    if let Err(e) = events.publish(&event, &reference).await {
        debug!(error = %e, reason, "failed to publish event");
    }
}

/// Publishes a Normal event on an AzureIdentity (from the copy embedded in an assignment).
async fn publish_on_identity(
    events: &Recorder,
    identity: &AzureIdentity,
    reason: &str,
    note: String,
) {
    let reference = ObjectReference {
        api_version: Some(podid_api::API_VERSION.to_owned()),
        kind: Some("AzureIdentity".to_owned()),
        name: identity.metadata.name.clone(),
        namespace: identity.metadata.namespace.clone(),
        uid: identity.metadata.uid.clone(),
        resource_version: identity.metadata.resource_version.clone(),
        field_path: None,
    };
    let event = Event {
        type_: EventType::Normal,
        reason: reason.to_owned(),
        note: Some(cut_note(note)),
        action: "Assign".to_owned(),
        secondary: None,
    };
    if let Err(e) = events.publish(&event, &reference).await {
        debug!(error = %e, reason, "failed to publish event");
    }
}

/// Publishes an event on the AzureAssignedIdentity itself (upstream's `status update error`).
async fn publish_on_assigned(
    events: &Recorder,
    object: &AzureAssignedIdentity,
    reason: &str,
    note: String,
) {
    let reference = ObjectReference {
        api_version: Some(podid_api::API_VERSION.to_owned()),
        kind: Some("AzureAssignedIdentity".to_owned()),
        name: object.metadata.name.clone(),
        namespace: Some(namespace_of(object).to_owned()),
        uid: object.metadata.uid.clone(),
        resource_version: None,
        field_path: None,
    };
    let event = Event {
        type_: EventType::Warning,
        reason: reason.to_owned(),
        note: Some(cut_note(note)),
        action: "Assign".to_owned(),
        secondary: None,
    };
    if let Err(e) = events.publish(&event, &reference).await {
        debug!(error = %e, reason, "failed to publish event");
    }
}

/// Runs `work`, CPU-bound work of a whole pass (a 50,000-pod cluster takes a while), without
/// holding up the runtime's other tasks (watches, the leader's renewals, ARM jobs): on the
/// multi-threaded runtime its worker is handed over to them meanwhile.
fn cpu_bound<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

/// Runs `futures` at most `limit` at a time.
async fn bounded<T>(futures: Vec<BoxFuture<'_, T>>, limit: usize) -> Vec<T> {
    stream::iter(futures)
        .buffer_unordered(limit.max(1))
        .collect()
        .await
}

/// Marks a deletion `Unassigned` once its identity left the VM/VMSS, then deletes it. A
/// failed status patch gets upstream's Warning `status update error` on the assignment.
async fn release_and_delete(
    client: &Client,
    events: Option<&Recorder>,
    deletion: &Deletion<'_>,
) -> Result<(), kube::Error> {
    let object = deletion.object;
    match set_state(
        client,
        namespace_of(object),
        name_of(object),
        AssignedIdentityState::Unassigned,
    )
    .await
    .map(drop)
    {
        Err(e) if is_status(&e, 404) => return Ok(()),
        Err(e) => {
            if let Some(events) = events {
                let note = format!(
                    "failed to update AzureAssignedIdentity {}/{} status to Unassigned for pod {}/{}, error: {e}",
                    namespace_of(object),
                    name_of(object),
                    object.spec.pod_namespace.as_deref().unwrap_or_default(),
                    object.spec.pod.as_deref().unwrap_or_default(),
                );
                publish_on_assigned(events, object, "status update error", note).await;
            }
            return Err(e);
        }
        Ok(()) => {}
    }
    delete_assigned(client, object).await
}

/// The lower-cased resource id of the identity behind `object` (empty when it has none).
fn lower_id(object: &AzureAssignedIdentity) -> String {
    object
        .spec
        .azure_identity_ref
        .as_deref()
        .and_then(|i| i.spec.resource_id.as_deref())
        .unwrap_or_default()
        .to_ascii_lowercase()
}

fn name_of(object: &AzureAssignedIdentity) -> &str {
    object.metadata.name.as_deref().unwrap_or_default()
}

fn namespace_of(object: &AzureAssignedIdentity) -> &str {
    object.metadata.namespace.as_deref().unwrap_or("default")
}

fn api(client: &Client, namespace: &str) -> Api<AzureAssignedIdentity> {
    Api::namespaced(client.clone(), namespace)
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// Creates `object`; the resourceVersion created (`None` when it already existed).
async fn create_assigned(
    client: &Client,
    object: &AzureAssignedIdentity,
) -> Result<Option<String>, kube::Error> {
    let started = std::time::Instant::now();
    match api(client, namespace_of(object))
        .create(&PostParams::default(), object)
        .await
    {
        Ok(created) => {
            crate::metrics::addition(started.elapsed());
            Ok(created.metadata.resource_version)
        }
        // The cache lags our own writes; the next pass sees the object.
        Err(e) if is_status(&e, 409) => Ok(None),
        Err(e) => {
            crate::metrics::kube_error(crate::metrics::OP_ADDITION);
            Err(e)
        }
    }
}

/// Rewrites `object`; the resourceVersion written.
async fn replace_assigned(
    client: &Client,
    object: &AzureAssignedIdentity,
) -> Result<Option<String>, kube::Error> {
    let started = std::time::Instant::now();
    let result = api(client, namespace_of(object))
        .replace(name_of(object), &PostParams::default(), object)
        .await;
    match result {
        Ok(written) => {
            crate::metrics::update(started.elapsed());
            Ok(written.metadata.resource_version)
        }
        Err(e) => {
            crate::metrics::kube_error(crate::metrics::OP_UPDATE);
            Err(e)
        }
    }
}

/// Patches the state; the object as the API server returned it.
async fn set_state(
    client: &Client,
    namespace: &str,
    name: &str,
    state: AssignedIdentityState,
) -> Result<AzureAssignedIdentity, kube::Error> {
    api(client, namespace)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"status": state}})),
        )
        .await
        .inspect_err(|_| crate::metrics::kube_error(crate::metrics::OP_STATUS))
}

/// Marks a confirmed assignment `Assigned`; with `mark`, also records that its identity was
/// found on the VM/VMSS ([`PREEXISTING_ANNOTATION`]), in the same patch.
async fn set_assigned(
    client: &Client,
    namespace: &str,
    name: &str,
    mark: bool,
) -> Result<AzureAssignedIdentity, kube::Error> {
    if !mark {
        return set_state(client, namespace, name, AssignedIdentityState::Assigned).await;
    }
    api(client, namespace)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({
                "metadata": {"annotations": {PREEXISTING_ANNOTATION: "true"}},
                "status": {"status": AssignedIdentityState::Assigned},
            })),
        )
        .await
        .inspect_err(|_| crate::metrics::kube_error(crate::metrics::OP_STATUS))
}

/// Deletes and, when the API server keeps the object for our finalizer, removes it (upstream
/// `RemoveAssignedIdentity`). A 404 counts as done.
async fn delete_assigned(
    client: &Client,
    object: &AzureAssignedIdentity,
) -> Result<(), kube::Error> {
    let started = std::time::Instant::now();
    let result = delete_and_unfinalize(client, object).await;
    match &result {
        Ok(()) => crate::metrics::deletion(started.elapsed()),
        Err(_) => crate::metrics::kube_error(crate::metrics::OP_DELETION),
    }
    result
}

async fn delete_and_unfinalize(
    client: &Client,
    object: &AzureAssignedIdentity,
) -> Result<(), kube::Error> {
    let api = api(client, namespace_of(object));
    let name = name_of(object);
    // Already being deleted (by someone else): only our finalizer is left to remove.
    let remaining = if object.metadata.deletion_timestamp.is_some() {
        Some(object.clone())
    } else {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(either) => either.left(),
            Err(e) if is_status(&e, 404) => return Ok(()),
            Err(e) => return Err(e),
        }
    };
    let Some(remaining) = remaining else {
        return Ok(());
    };
    let finalizers = remaining.metadata.finalizers.unwrap_or_default();
    if !finalizers.iter().any(|f| f == ASSIGNED_IDENTITY_FINALIZER) {
        return Ok(());
    }
    let kept: Vec<String> = finalizers
        .into_iter()
        .filter(|f| f != ASSIGNED_IDENTITY_FINALIZER)
        .collect();
    match api
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": kept}})),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_status(&e, 404) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod note_tests {
    use super::{MAX_NOTE, cut_note};

    #[test]
    fn long_notes_are_cut_at_a_char_boundary_to_the_api_limit() {
        // Multi-byte characters straddle the limit: a byte cut would split one and panic.
        for (c, n) in [("é", 600), ("a", 2000), ("€", 400), ("x", MAX_NOTE)] {
            let note = cut_note(c.repeat(n));
            assert!(note.len() <= MAX_NOTE, "{c}: {}", note.len());
            if c.len() * n > MAX_NOTE {
                assert!(note.ends_with('…'), "{c}");
                assert!(note.len() > MAX_NOTE - 8, "{c}: cut too short");
            } else {
                assert_eq!(note, c.repeat(n));
            }
        }
        assert_eq!(cut_note("short".into()), "short");
    }
}
