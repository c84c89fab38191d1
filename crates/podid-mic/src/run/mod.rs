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
//! [`crate::serve::serve`] runs the one-time type upgrade ([`crate::upgrade`]) before the loop.
//!
//! This module holds the loop and the pass; its parts:
//! - `stores`: the reflectors, each object reduced to what a pass reads;
//! - `memory`: what the loop carries from pass to pass, above all what mic wrote until the
//!   caches show it (read-your-writes), and the jobs in flight and backing off;
//! - `apply`: the plan applier, a pass's API writes in five named steps, and the jobs for the
//!   rest;
//! - `job`: one VM/VMSS's ARM work and the writes that wait for it;
//! - `writes`: the Kubernetes API writes (assignments, the hold record);
//! - `events`: the Kubernetes events and their texts;
//! - `report`: what a pass or job achieved.

mod apply;
mod events;
mod job;
mod memory;
mod report;
mod stores;
mod writes;

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{StreamExt, stream};
use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use podid_api::AzureAssignedIdentity;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::assigner::IdentityAssigner;
use crate::desired::{Inputs, Options, Plan, Warning, compute};
use crate::hold::HoldSettings;
use crate::preexisting::Ownership;
use apply::apply_plan;
use events::EVENT_SOURCE;
use job::{JobOutcome, TargetJob, run_job};
use memory::{CREATED_WAIT, Memory};
use report::PassReport;
use stores::Stores;
use writes::{read_hold_record, write_hold_record};

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
    let stores = Stores::new(&client, &notify, &mut tasks);
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
    let ready = stores.ready();
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
                events.clone(),
                settings.batch.max(1),
            ));
        }
        crate::metrics::assignment_states(
            stores
                .assigned
                .state()
                .iter()
                .map(|a| a.status.as_ref().and_then(|s| s.status.as_ref())),
        );
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

/// One reconcile pass over the current caches.
async fn pass(
    client: &Client,
    settings: &Settings,
    events: &Recorder,
    stores: &Stores,
    every_target: bool,
    memory: &mut Memory,
) -> (PassReport, Vec<TargetJob>) {
    let pods = stores.pods.state();
    let nodes = stores.nodes.state();
    let identities = stores.identities.state();
    let bindings = stores.bindings.state();
    let cached = stores.assigned.state();
    memory.forget_shown(&cached);
    let substituted = memory.substitutes(&cached);
    let inputs = Inputs {
        pods: pods.iter().map(AsRef::as_ref).collect(),
        nodes: nodes.iter().map(AsRef::as_ref).collect(),
        identities: identities.iter().map(AsRef::as_ref).collect(),
        bindings: bindings.iter().map(AsRef::as_ref).collect(),
        existing: memory.existing(&cached, &substituted),
    };
    let (mut plan, ownership) =
        cpu_bound(|| (compute(&inputs, &settings.options), Ownership::of(&inputs)));
    ownership.keep_found(&mut plan);
    // Each warning once while it lasts, not once per pass.
    let current: HashSet<Warning> = plan.warnings.iter().cloned().collect();
    for warning in &plan.warnings {
        if memory.warned.contains(warning) {
            debug!("{warning}");
        } else {
            warn!("{warning}");
        }
    }
    memory.warned = current;
    let applied = hold(client, settings, memory, &mut plan).await;
    let view = memory.arm_view(&plan, &applied);
    apply_plan(
        client,
        settings.batch.max(1),
        events,
        &plan,
        every_target,
        &ownership,
        &view,
    )
    .await
}

/// Holds: releases of `plan` become holds (recorded before their assignments go), holds whose
/// identity is needed again end, holds whose period is over are released. Reads the hold
/// record first once this replica leads; until it is read, releases are not held.
async fn hold(
    client: &Client,
    settings: &Settings,
    memory: &mut Memory,
    plan: &mut Plan<'_>,
) -> crate::hold::Applied {
    let Memory {
        holds,
        holds_loaded,
        stored,
        ..
    } = memory;
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
    let applied = holds.apply(plan, std::time::SystemTime::now(), &hold_settings);
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
                    holds.undo(plan, &applied);
                }
            }
        }
    }
    applied
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
