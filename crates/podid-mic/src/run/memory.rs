//! What the loop carries from one pass to the next. Above all, what mic wrote until its caches
//! show it (read-your-writes): the next pass is usually woken by the watch events of the last
//! pass's own writes before the cache has them all, and must neither create, confirm nor delete
//! an assignment twice. Also: warnings already logged, the holds, the VM/VMSS jobs in flight and
//! the VMs/VMSS backing off after a failed job.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use podid_api::AzureAssignedIdentity;
use tracing::warn;

use super::apply::ArmView;
use super::job::JobOutcome;
use super::report::PassReport;
use super::{backoff, name_of, namespace_of};
use crate::desired::{ArmTarget, Plan, Warning};
use crate::hold::{Holds, Record};
use crate::preexisting::PREEXISTING_ANNOTATION;

/// One object a pass created or marked `Assigned`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Written {
    pub(super) namespace: String,
    pub(super) name: String,
    /// Created by the pass.
    pub(super) created: bool,
    /// A confirmation: the version it patched, and what the patch made of it.
    pub(super) confirmed: Option<Confirmed>,
    pub(super) at: std::time::Instant,
}

/// What a confirmation patched and wrote (the status and the pre-existing mark; nothing else
/// changes).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Confirmed {
    pub(super) stale_version: String,
    pub(super) version: Option<String>,
    pub(super) status: Option<podid_api::AzureAssignedIdentityStatus>,
    pub(super) preexisting: Option<String>,
}

impl Eq for Written {}

impl Written {
    /// The record of a confirmation of `object` (`created`: by the same pass or job) that
    /// patched `stale_version` (`None`: unknown, nothing to read in its place) and that the API
    /// server answered with `after`.
    pub(super) fn confirmation(
        object: &AzureAssignedIdentity,
        created: bool,
        stale_version: Option<String>,
        after: &AzureAssignedIdentity,
    ) -> Self {
        Self {
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
    }
}

impl Confirmed {
    /// `cached` (the version the patch applied to) as the patch left it.
    pub(super) fn apply(&self, cached: &AzureAssignedIdentity) -> AzureAssignedIdentity {
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
pub(super) const WRITTEN_TTL: Duration = Duration::from_secs(60);

/// Longest wait, before a pass, for objects the previous pass created to reach the cache.
pub(super) const CREATED_WAIT: Duration = Duration::from_secs(1);

/// (namespace, name) of an assignment.
pub(super) type ObjectKey = (String, String);

/// What the loop carries from one pass to the next.
#[derive(Debug, Default)]
pub(super) struct Memory {
    /// Warnings logged at `warn` while they last (repeats go to `debug`).
    pub(super) warned: HashSet<Warning>,
    /// Uids of objects deleted by earlier passes that the cache may still show.
    pub(super) removed: HashSet<String>,
    /// What earlier passes created or confirmed, by (namespace, name), while the cache may
    /// not show it yet.
    pub(super) written: HashMap<(String, String), Written>,
    /// Identities held after their last pod.
    pub(super) holds: Holds,
    /// The hold record was read (or found absent) since this replica leads.
    pub(super) holds_loaded: bool,
    /// The hold record as last stored.
    pub(super) stored: Option<Record>,
    /// VMs/VMSS with a job in flight: the ids it removes, the assignments it writes.
    pub(super) in_flight: HashMap<ArmTarget, (BTreeSet<String>, HashSet<ObjectKey>)>,
    /// VMs/VMSS whose last job failed: failures in a row and when to try again.
    pub(super) backoff: HashMap<ArmTarget, (u32, tokio::time::Instant)>,
}

impl Memory {
    /// Takes in a finished job (or a panicked one: its target is tried again).
    pub(super) fn finished(
        &mut self,
        done: Result<JobOutcome, tokio::task::JoinError>,
        cap: Duration,
    ) {
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
    pub(super) fn next_hold_due(&self) -> Option<Duration> {
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
    pub(super) fn remember(&mut self, report: &PassReport) {
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
    pub(super) fn awaits_created(&self, cached: &[Arc<AzureAssignedIdentity>]) -> bool {
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

    /// Forgets what the cache (`cached`, the assignments it shows) caught up with. Objects an
    /// earlier pass deleted stay in the cache until their watch events arrive: their uids are
    /// kept until the cache drops them. What earlier passes marked `Assigned` is kept while
    /// the cache still shows the version before the patch; a create's record once the cache
    /// shows the object; any record whose object is not shown in time goes too.
    pub(super) fn forget_shown(&mut self, cached: &[Arc<AzureAssignedIdentity>]) {
        let uids: HashSet<&str> = cached
            .iter()
            .filter_map(|o| o.metadata.uid.as_deref())
            .collect();
        self.removed.retain(|uid| uids.contains(uid.as_str()));
        let cached_versions: HashMap<(&str, &str), Option<&str>> = cached
            .iter()
            .map(|o| {
                (
                    (namespace_of(o), name_of(o)),
                    o.metadata.resource_version.as_deref(),
                )
            })
            .collect();
        self.written.retain(|(namespace, name), record| {
            match cached_versions.get(&(namespace.as_str(), name.as_str())) {
                Some(version) => record
                    .confirmed
                    .as_ref()
                    .is_some_and(|c| *version == Some(c.stale_version.as_str())),
                None => record.at.elapsed() < WRITTEN_TTL,
            }
        });
    }

    /// The cached assignments an earlier pass confirmed, as its patch left them (the cache
    /// still shows the version before).
    pub(super) fn substitutes(
        &self,
        cached: &[Arc<AzureAssignedIdentity>],
    ) -> Vec<AzureAssignedIdentity> {
        if self.written.is_empty() {
            return Vec::new();
        }
        cached
            .iter()
            .filter_map(|o| {
                let key = (namespace_of(o).to_owned(), name_of(o).to_owned());
                let confirmed = self.written.get(&key)?.confirmed.as_ref()?;
                Some(confirmed.apply(o))
            })
            .collect()
    }

    /// The existing assignments as mic wrote them: `cached` with its [`Memory::substitutes`]
    /// in place of the versions they replace, without the objects earlier passes deleted.
    pub(super) fn existing<'a>(
        &self,
        cached: &'a [Arc<AzureAssignedIdentity>],
        substituted: &'a [AzureAssignedIdentity],
    ) -> Vec<&'a AzureAssignedIdentity> {
        let replaced: HashSet<(&str, &str)> = substituted
            .iter()
            .map(|o| (namespace_of(o), name_of(o)))
            .collect();
        cached
            .iter()
            .map(AsRef::as_ref)
            .filter(|o| !replaced.contains(&(namespace_of(o), name_of(o))))
            .chain(substituted.iter())
            .filter(|o| {
                o.metadata
                    .uid
                    .as_ref()
                    .is_none_or(|uid| !self.removed.contains(uid))
            })
            .collect()
    }

    /// What the pass knows about the VMs and VM scale sets of `plan` beyond it: the targets
    /// with a job in flight or backing off (those whose backoff ended are forgotten), the
    /// assignments jobs in flight claim, the held ids (with the holds the pass `applied` ended
    /// for a pod that needs the identity again) and the ids known to be on each target.
    pub(super) fn arm_view(&mut self, plan: &Plan<'_>, applied: &crate::hold::Applied) -> ArmView {
        let now = tokio::time::Instant::now();
        self.backoff.retain(|_, (_, at)| *at > now);
        let mut view = ArmView {
            busy: self
                .in_flight
                .keys()
                .chain(self.backoff.keys())
                .cloned()
                .collect(),
            backing_off: self
                .backoff
                .keys()
                .filter(|t| !self.in_flight.contains_key(*t))
                .cloned()
                .collect(),
            claimed: self
                .in_flight
                .values()
                .flat_map(|(_, objects)| objects.iter().cloned())
                .collect(),
            ..ArmView::default()
        };
        for (target, id, hold) in self.holds.iter() {
            if !hold.releasing {
                view.held.insert((target.clone(), id.to_owned()));
            }
        }
        // Holds this pass ended for a pod that needs the identity again: still on the VM/VMSS.
        view.held.extend(applied.reused.iter().cloned());
        for (target, work) in &plan.targets {
            let releasing = self.in_flight.get(target).map(|(ids, _)| ids);
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
        view
    }
}
