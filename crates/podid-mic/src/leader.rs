//! Leader election on a `coordination.k8s.io/v1` Lease named by `--leader-election-namespace`
//! and `--leader-election-name` (upstream used an Endpoints lock; docs/compatibility.md has the
//! upgrade path). Timings as upstream: lease `--leader-election-duration` (15 s), renew deadline
//! half of it, retry period a quarter.
//!
//! Expiry is judged by the local clock since this replica last saw the record change (as
//! client-go does), so clock skew between replicas does not matter.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::time::Instant;
use tracing::{info, warn};

/// Where the lock lives and how long it lasts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderSettings {
    /// Lease namespace.
    pub namespace: String,
    /// Lease name.
    pub name: String,
    /// This replica's identity (`holderIdentity`).
    pub identity: String,
    /// How long a lease lasts without renewal.
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it gives up.
    pub renew_deadline: Duration,
    /// Pause between attempts.
    pub retry_period: Duration,
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
        }
    }
}

/// Takes and keeps the lease.
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    settings: LeaderSettings,
    /// The record (resourceVersion) last seen and when it was first seen.
    observed: Option<(String, Instant)>,
}

impl Elector {
    /// An elector for `settings`; nothing is sent yet.
    pub fn new(client: Client, settings: LeaderSettings) -> Self {
        Self {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            observed: None,
        }
    }

    /// One attempt to take or renew the lease; `Ok(true)` when this replica holds it after.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let seen_at = Instant::now();
        let secs = i32::try_from(self.settings.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX);
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
                    self.observe(&created, seen_at, true);
                    Ok(true)
                }
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        self.observe(&current, seen_at, false);
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let mine = holder == self.settings.identity;
        if !mine && !holder.is_empty() {
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.settings.lease_duration, Duration::from_secs);
            let since = self.observed.as_ref().map_or(seen_at, |(_, at)| *at);
            if seen_at.duration_since(since) < duration {
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
                self.observe(&replaced, seen_at, true);
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn observe(&mut self, lease: &Lease, at: Instant, force: bool) {
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let changed = self.observed.as_ref().is_none_or(|(v, _)| *v != version);
        if force || changed {
            self.observed = Some((version, at));
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

    /// Gives the lease up at a clean shutdown so another replica takes over at once.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
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
