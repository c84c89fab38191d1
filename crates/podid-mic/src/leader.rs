//! Leader election on a `coordination.k8s.io/v1` Lease named by `--leader-election-namespace`
//! and `--leader-election-name`, and, while `--upstream-leader-lock` is on (the default), on
//! upstream's lock as well: the Endpoints object of the same namespace and name whose annotation
//! `control-plane.alpha.kubernetes.io/leader` holds the leader record the Go MIC reads and writes
//! (client-go's `LeaderElectionRecord` as JSON). Timings as upstream: lease
//! `--leader-election-duration` (15 s), renew deadline half of it, retry period a quarter.
//!
//! The two locks work as client-go's multi-lock did when it moved Endpoints locks to Leases: a
//! replica leads only when neither record is held by another unexpired holder, and while it
//! leads it renews both, so a Go MIC replica that starts (or restarts) during a rolling upgrade
//! sees a live holder on its Endpoints lock and stays a follower, and a Go leader still running
//! keeps podid's replicas followers until its record expires. Every write is a compare-and-swap
//! on the `resourceVersion` just read: a Go replica that wrote in between makes the attempt fail
//! instead of producing two leaders. With the flag off the Endpoints object is never read or
//! written (Lease only), for clusters where the Go MIC is gone.
//!
//! Expiry is judged by the local clock since this replica last saw a record change (as
//! client-go does), so clock skew between replicas does not matter.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Endpoints;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::{info, warn};

/// The annotation of upstream's Endpoints lock that holds the leader record.
pub const UPSTREAM_LEADER_ANNOTATION: &str = "control-plane.alpha.kubernetes.io/leader";

/// Where the lock lives and how long it lasts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderSettings {
    /// Lease namespace (and the upstream Endpoints lock's).
    pub namespace: String,
    /// Lease name (and the upstream Endpoints lock's).
    pub name: String,
    /// This replica's identity (`holderIdentity`).
    pub identity: String,
    /// How long a lease lasts without renewal.
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it gives up.
    pub renew_deadline: Duration,
    /// Pause between attempts.
    pub retry_period: Duration,
    /// Also honour and keep upstream's Endpoints lock (`--upstream-leader-lock`).
    pub upstream_lock: bool,
}

impl LeaderSettings {
    /// From the validated flags: renew deadline = duration / 2, retry period = duration / 4
    /// (upstream's 15 s / 7.5 s / 3.75 s).
    pub fn new(config: &crate::config::Config) -> Self {
        let duration = config.leader_election_duration;
        Self {
            namespace: config.leader_election_namespace.clone(),
            name: config.leader_election_name.clone(),
            identity: config.leader_election_instance.clone(),
            lease_duration: duration,
            renew_deadline: duration / 2,
            retry_period: duration / 4,
            upstream_lock: config.upstream_leader_lock,
        }
    }
}

/// client-go's `LeaderElectionRecord` as the Go MIC stores it in the Endpoints annotation.
/// Times are RFC 3339 with whole seconds (Go's `metav1.Time`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaderRecord {
    /// Who holds the lock; empty when released.
    #[serde(default)]
    pub holder_identity: String,
    /// How long the record is valid after a renewal, in seconds.
    #[serde(default)]
    pub lease_duration_seconds: i64,
    /// When the holder took the lock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acquire_time: Option<String>,
    /// When the holder last renewed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_time: Option<String>,
    /// How often the lock changed hands.
    #[serde(default)]
    pub leader_transitions: i64,
}

impl LeaderRecord {
    /// The record in `endpoints`' annotation; `None` when absent. A record that does not parse
    /// counts as absent, as client-go treats it (the next writer replaces it).
    pub fn of(endpoints: &Endpoints) -> Option<Self> {
        let raw = endpoints
            .metadata
            .annotations
            .as_ref()?
            .get(UPSTREAM_LEADER_ANNOTATION)?;
        serde_json::from_str(raw).ok()
    }
}

/// `t` as Go's `metav1.Time` marshals it: RFC 3339, whole seconds, UTC.
fn go_time(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// When this replica first saw a record in its current version.
#[derive(Debug, Default)]
struct Observed(Option<(String, Instant)>);

impl Observed {
    /// Notes `version` seen at `at`; the time moves only when the version changed (or `force`,
    /// for our own writes).
    fn note(&mut self, version: Option<&String>, at: Instant, force: bool) {
        let version = version.cloned().unwrap_or_default();
        let changed = self.0.as_ref().is_none_or(|(v, _)| *v != version);
        if force || changed {
            self.0 = Some((version, at));
        }
    }

    /// Whether a record seen unchanged since its observation is still valid at `now`.
    fn unexpired(&self, now: Instant, duration: Duration) -> bool {
        let since = self.0.as_ref().map_or(now, |(_, at)| *at);
        now.duration_since(since) < duration
    }
}

/// What a look at upstream's Endpoints lock found.
enum Upstream {
    /// Another holder, unexpired: this replica must not lead.
    HeldByOther(String),
    /// Free, expired, or ours: this replica may write it (the object read, if it exists).
    Free(Option<Box<Endpoints>>),
}

/// Takes and keeps the lease (and, with [`LeaderSettings::upstream_lock`], upstream's
/// Endpoints lock).
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    endpoints: Api<Endpoints>,
    settings: LeaderSettings,
    /// The Lease version last seen and when it was first seen.
    observed: Observed,
    /// The Endpoints lock version last seen and when it was first seen.
    observed_upstream: Observed,
}

impl Elector {
    /// An elector for `settings`; nothing is sent yet.
    pub fn new(client: Client, settings: LeaderSettings) -> Self {
        Self {
            api: Api::namespaced(client.clone(), &settings.namespace),
            endpoints: Api::namespaced(client, &settings.namespace),
            settings,
            observed: Observed::default(),
            observed_upstream: Observed::default(),
        }
    }

    fn duration_secs(&self) -> i32 {
        i32::try_from(self.settings.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// One attempt to take or renew the lock; `Ok(true)` when this replica holds it after.
    /// With the upstream lock on: upstream's record first (held by another unexpired holder:
    /// `Ok(false)`, nothing written), then the Lease, then upstream's record is written with
    /// the `resourceVersion` read, so a Go replica that took it meanwhile wins (`Ok(false)`).
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let seen_at = Instant::now();
        let upstream = if self.settings.upstream_lock {
            match self.read_upstream(seen_at).await? {
                Upstream::HeldByOther(holder) => {
                    tracing::debug!(%holder, "upstream leader lock held by another replica");
                    // Keep watching the Lease too: its expiry is counted from when it was last
                    // seen to change, so a Lease first looked at only once the upstream record
                    // expired would keep this replica waiting a second lease duration.
                    if let Some(lease) = self.api.get_opt(&self.settings.name).await? {
                        self.observed.note(
                            lease.metadata.resource_version.as_ref(),
                            seen_at,
                            false,
                        );
                    }
                    return Ok(false);
                }
                Upstream::Free(endpoints) => Some(endpoints),
            }
        } else {
            None
        };
        if !self.acquire_lease(now, seen_at).await? {
            return Ok(false);
        }
        match upstream {
            Some(endpoints) => self.write_upstream(endpoints, now, seen_at).await,
            None => Ok(true),
        }
    }

    async fn read_upstream(&mut self, seen_at: Instant) -> Result<Upstream, kube::Error> {
        let Some(current) = self.endpoints.get_opt(&self.settings.name).await? else {
            return Ok(Upstream::Free(None));
        };
        self.observed_upstream
            .note(current.metadata.resource_version.as_ref(), seen_at, false);
        let record = LeaderRecord::of(&current).unwrap_or_default();
        let holder = record.holder_identity.clone();
        if holder.is_empty() || holder == self.settings.identity {
            return Ok(Upstream::Free(Some(Box::new(current))));
        }
        // The longer of the record's duration and ours: a Go replica judges by its own
        // configured duration, which the record of a replica with a shorter one understates.
        let duration = u64::try_from(record.lease_duration_seconds)
            .ok()
            .map(Duration::from_secs)
            .unwrap_or_default()
            .max(self.settings.lease_duration);
        if self.observed_upstream.unexpired(seen_at, duration) {
            return Ok(Upstream::HeldByOther(holder));
        }
        info!(previous = %holder, "upstream leader lock (Endpoints) expired; taking it over");
        Ok(Upstream::Free(Some(Box::new(current))))
    }

    /// Writes this replica's record into upstream's Endpoints lock (create, or update of the
    /// version read). `Ok(false)` when another writer got there first.
    async fn write_upstream(
        &mut self,
        current: Option<Box<Endpoints>>,
        now: Timestamp,
        seen_at: Instant,
    ) -> Result<bool, kube::Error> {
        let previous = current.as_deref().and_then(LeaderRecord::of);
        let mine = previous
            .as_ref()
            .is_some_and(|r| r.holder_identity == self.settings.identity);
        let record = LeaderRecord {
            holder_identity: self.settings.identity.clone(),
            lease_duration_seconds: i64::from(self.duration_secs()),
            acquire_time: if mine {
                previous.as_ref().and_then(|r| r.acquire_time.clone())
            } else {
                Some(go_time(now))
            },
            renew_time: Some(go_time(now)),
            leader_transitions: previous.as_ref().map_or(0, |r| {
                r.leader_transitions + i64::from(!mine && !r.holder_identity.is_empty())
            }),
        };
        let raw = serde_json::to_string(&record).unwrap_or_default();
        let written = match current {
            None => {
                let endpoints = Endpoints {
                    metadata: ObjectMeta {
                        name: Some(self.settings.name.clone()),
                        namespace: Some(self.settings.namespace.clone()),
                        annotations: Some(BTreeMap::from([(
                            UPSTREAM_LEADER_ANNOTATION.to_owned(),
                            raw,
                        )])),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                self.endpoints
                    .create(&PostParams::default(), &endpoints)
                    .await
            }
            Some(mut endpoints) => {
                endpoints
                    .metadata
                    .annotations
                    .get_or_insert_with(BTreeMap::new)
                    .insert(UPSTREAM_LEADER_ANNOTATION.to_owned(), raw);
                self.endpoints
                    .replace(&self.settings.name, &PostParams::default(), &endpoints)
                    .await
            }
        };
        match written {
            Ok(written) => {
                self.observed_upstream.note(
                    written.metadata.resource_version.as_ref(),
                    seen_at,
                    true,
                );
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                warn!("upstream leader lock (Endpoints) changed while taking it; not leading");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Takes or renews the Lease; `Ok(false)` when another holder has it unexpired or won
    /// the write.
    async fn acquire_lease(
        &mut self,
        now: Timestamp,
        seen_at: Instant,
    ) -> Result<bool, kube::Error> {
        let secs = self.duration_secs();
        let Some(current) = self.api.get_opt(&self.settings.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.settings.name.clone()),
                    namespace: Some(self.settings.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.settings.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observed
                        .note(created.metadata.resource_version.as_ref(), seen_at, true);
                    Ok(true)
                }
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        self.observed
            .note(current.metadata.resource_version.as_ref(), seen_at, false);
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let mine = holder == self.settings.identity;
        if !mine && !holder.is_empty() {
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.settings.lease_duration, Duration::from_secs);
            if self.observed.unexpired(seen_at, duration) {
                return Ok(false);
            }
            info!(previous = %holder, "leader lease expired; taking it over");
        }
        let mut lease = current;
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(self.settings.identity.clone()),
            lease_duration_seconds: Some(secs),
            acquire_time: if mine {
                spec.acquire_time.clone()
            } else {
                Some(MicroTime(now))
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + i32::from(!mine)),
            ..spec
        });
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(replaced) => {
                self.observed
                    .note(replaced.metadata.resource_version.as_ref(), seen_at, true);
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica holds the lease, trying every retry period.
    pub async fn acquire(&mut self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    info!(identity = %self.settings.identity, "became leader");
                    return;
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "leader election attempt failed"),
            }
            tokio::time::sleep(self.settings.retry_period).await;
        }
    }

    /// Keeps renewing every retry period; returns when the lease is lost: another holder, or
    /// no successful renewal within the renew deadline of a renewal round (as client-go: the
    /// round starts one retry period after the last renewal, and an attempt still in flight at
    /// the deadline counts as failed). A round thus ends at most retry period + renew deadline
    /// after the last renewal, before any other replica can see the lease expire. Upstream
    /// exits the process then.
    pub async fn hold(&mut self) {
        loop {
            tokio::time::sleep(self.settings.retry_period).await;
            let deadline = Instant::now() + self.settings.renew_deadline;
            loop {
                match tokio::time::timeout_at(deadline, self.try_acquire_or_renew()).await {
                    Ok(Ok(true)) => break,
                    Ok(Ok(false)) => {
                        warn!("lost leader lease: another replica holds it");
                        return;
                    }
                    Ok(Err(e)) => warn!(error = %e, "leader lease renewal failed"),
                    Err(_) => {}
                }
                let next = Instant::now() + self.settings.retry_period;
                if next >= deadline {
                    warn!(
                        deadline_ms = self.settings.renew_deadline.as_millis(),
                        "lost leader lease: not renewed within the renew deadline"
                    );
                    return;
                }
                tokio::time::sleep_until(next).await;
            }
        }
    }

    /// Gives the lock up at a clean shutdown so another replica (podid's or, through upstream's
    /// Endpoints lock, a Go one) takes over at once. Each record is cleared only if it is ours.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        if self.settings.upstream_lock
            && let Some(mut endpoints) = self.endpoints.get_opt(&self.settings.name).await?
            && let Some(record) = LeaderRecord::of(&endpoints)
            && record.holder_identity == self.settings.identity
        {
            let now = go_time(Timestamp::now());
            let released = LeaderRecord {
                holder_identity: String::new(),
                lease_duration_seconds: 1,
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                leader_transitions: record.leader_transitions,
            };
            endpoints
                .metadata
                .annotations
                .get_or_insert_with(BTreeMap::new)
                .insert(
                    UPSTREAM_LEADER_ANNOTATION.to_owned(),
                    serde_json::to_string(&released).unwrap_or_default(),
                );
            self.endpoints
                .replace(&self.settings.name, &PostParams::default(), &endpoints)
                .await?;
        }
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        self.api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
            .map(drop)
    }
}

/// An [`Elector`] renewing its lease on a task of its own ([`Elector::hold`]), so that no
/// other work of the process (a long pass, a relisting cache) delays a renewal. Dropping the
/// holder stops the renewals.
#[derive(Debug)]
pub(crate) struct Holder {
    task: Option<tokio::task::JoinHandle<Option<Elector>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Holder {
    /// Starts renewing `elector`'s lease (held already) on its own task.
    pub(crate) fn spawn(mut elector: Elector) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            tokio::select! {
                () = elector.hold() => None,
                _ = stopped => Some(elector),
            }
        });
        Self {
            task: Some(task),
            stop: Some(stop),
        }
    }

    /// Resolves once the lease is lost (see [`Elector::hold`]); pending while it is held.
    pub async fn lost(&mut self) {
        if let Some(task) = self.task.as_mut() {
            // The task ends only when the lease is lost ([`Holder::stop`] consumes the holder),
            // or if it panicked: either way nothing renews any more.
            let _ = task.await;
            self.task = None;
        }
    }

    /// Stops the renewals and returns the elector (to release the lease); `None` when the
    /// lease was lost meanwhile.
    pub async fn stop(mut self) -> Option<Elector> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take()?.await.ok().flatten()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}
