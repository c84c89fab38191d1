//! Identities kept on a VM or VM scale set for a grace period after their last pod left
//! (`--identity-release-grace-period`).
//!
//! Upstream removes a user-assigned identity from a VM/VMSS in the pass that sees its last
//! assignment there go. Assigning it again is a long-running ARM PATCH (tens of seconds on a
//! scale set), which is what the next pod of a rolling update, or a pod rescheduled after a
//! node drain, then waits for. podid defers only that ARM release: the assignment objects are
//! deleted as upstream deletes them (nmi and users see upstream's lifecycle), while the
//! identity stays on the VM/VMSS as a *hold* until the grace period ends. A pod that needs it
//! within the period finds it there: its assignment is confirmed without an ARM call.
//!
//! Priorities, in order:
//! - immutable identities (`--immutable-user-msis`, the cluster identity) and identities found
//!   on the VM/VMSS before podid assigned them ([`crate::preexisting`]) are never released, so
//!   they are never held either;
//! - identities pods use are never held back: with `--identity-limit-per-vm` identities in use
//!   or held on one VM/VMSS, the oldest holds there are released first;
//! - then the grace period.
//!
//! The holds are recorded on the API server (`Holds::to_record`, stored by the controller
//! loop in a ConfigMap) before the assignments that held the identity are deleted, so a
//! restarted or new leader still knows that podid put these identities there and releases them
//! when their period ends. Without the record, a held identity would stay on the VM/VMSS for
//! good: MIC removes only what an assignment says it assigned.
//!
//! Pure: values in, values out; the clock is a parameter.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::desired::{ArmTarget, Plan};

/// Key of the hold record in MIC's ConfigMap (`--config-map-name`).
pub const RECORD_KEY: &str = "podid-held-identities";

/// Why an identity without a pod is still on a VM/VMSS (`podid_mic_identities_held{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum HoldReason {
    /// Its last pod left less than the grace period ago.
    GracePeriod,
    /// The period is over (or the limit needs the room); the release PATCH is queued, in
    /// flight, or being retried.
    Releasing,
}

impl HoldReason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::GracePeriod => "grace_period",
            Self::Releasing => "releasing",
        }
    }

    /// Every value, for the metric's zeros.
    pub const ALL: [Self; 2] = [Self::GracePeriod, Self::Releasing];
}

/// How holding behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldSettings {
    /// How long an identity stays after its last pod (`--identity-release-grace-period`);
    /// zero: released at once, as upstream.
    pub grace: Duration,
    /// Most identities MIC keeps in use or held on one VM/VMSS before releasing holds early
    /// (`--identity-limit-per-vm`).
    pub limit: usize,
}

impl Default for HoldSettings {
    /// Upstream's behaviour: no grace period.
    fn default() -> Self {
        Self {
            grace: Duration::ZERO,
            limit: DEFAULT_LIMIT,
        }
    }
}

/// Default of `--identity-limit-per-vm`.
pub(crate) const DEFAULT_LIMIT: usize = 100;

/// One held identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    /// When its last pod went (seconds since the epoch).
    pub since: u64,
    /// When it is released (seconds since the epoch).
    pub until: u64,
    /// The release was asked for (period over or room needed).
    pub releasing: bool,
}

/// What [`Holds::apply`] did to a plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Applied {
    /// Holds taken in this pass: their releases were taken out of the plan.
    pub taken: Vec<(ArmTarget, String)>,
    /// Holds ended because a pod needs the identity again (no ARM call needed).
    pub reused: Vec<(ArmTarget, String)>,
    /// Holds whose release was added to the plan (period over, or room needed).
    pub releasing: Vec<(ArmTarget, String)>,
    /// Deletions (indexes into the plan's `delete`) whose release was taken out because their
    /// identity is now held.
    pub deferred: Vec<(usize, (ArmTarget, String))>,
}

/// The holds the loop knows of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Holds {
    held: BTreeMap<(ArmTarget, String), Hold>,
}

/// The record stored on the API server (JSON under [`RECORD_KEY`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    /// Every hold.
    pub held: Vec<RecordEntry>,
}

/// One hold as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RecordEntry {
    /// `vmss` or `vm`.
    pub kind: String,
    /// The VM or VM scale set name.
    pub name: String,
    /// The identity's lower-cased resource id.
    pub id: String,
    /// When its last pod went (seconds since the epoch).
    pub since: u64,
    /// When it is released (seconds since the epoch).
    pub until: u64,
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Holds {
    /// Number of holds.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// `true` without holds.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Whether `id` is held on `target`.
    #[cfg(test)]
    pub fn contains(&self, target: &ArmTarget, id: &str) -> bool {
        self.held.contains_key(&(target.clone(), id.to_owned()))
    }

    /// Every hold.
    pub fn iter(&self) -> impl Iterator<Item = (&ArmTarget, &str, &Hold)> {
        self.held.iter().map(|((t, id), h)| (t, id.as_str(), h))
    }

    /// Holds by reason.
    pub fn counts(&self) -> BTreeMap<HoldReason, usize> {
        let mut counts: BTreeMap<HoldReason, usize> =
            HoldReason::ALL.iter().map(|r| (*r, 0)).collect();
        for hold in self.held.values() {
            let reason = if hold.releasing {
                HoldReason::Releasing
            } else {
                HoldReason::GracePeriod
            };
            *counts.entry(reason).or_default() += 1;
        }
        counts
    }

    /// Adds the holds of a stored record (a new leader, or a restart), keeping holds already
    /// known. Entries of an unknown kind are skipped.
    pub(crate) fn restore(&mut self, record: &Record) {
        for entry in &record.held {
            let target = match entry.kind.as_str() {
                "vmss" => ArmTarget::Vmss(entry.name.clone()),
                "vm" => ArmTarget::Vm(entry.name.clone()),
                _ => continue,
            };
            self.held
                .entry((target, entry.id.to_ascii_lowercase()))
                .or_insert(Hold {
                    since: entry.since,
                    until: entry.until,
                    releasing: false,
                });
        }
    }

    /// The record to store.
    pub(crate) fn to_record(&self) -> Record {
        Record {
            held: self
                .held
                .iter()
                .map(|((target, id), hold)| RecordEntry {
                    kind: if target.is_vmss() { "vmss" } else { "vm" }.to_owned(),
                    name: target.name().to_owned(),
                    id: id.clone(),
                    since: hold.since,
                    until: hold.until,
                })
                .collect(),
        }
    }

    /// Forgets holds whose release ARM confirmed.
    pub fn released(&mut self, target: &ArmTarget, ids: &BTreeSet<String>) {
        for id in ids {
            self.held.remove(&(target.clone(), id.clone()));
        }
    }

    /// Forgets the holds `applied` took in `plan` when their record could not be stored, and
    /// puts their releases back (upstream's immediate release: a hold nobody recorded would
    /// outlive a restart as a leak).
    pub(crate) fn undo(&mut self, plan: &mut Plan<'_>, applied: &Applied) {
        for key in &applied.taken {
            self.held.remove(key);
            plan.targets
                .entry(key.0.clone())
                .or_default()
                .release
                .insert(key.1.clone());
        }
        for (index, release) in &applied.deferred {
            if let Some(deletion) = plan.delete.get_mut(*index) {
                deletion.release = Some(release.clone());
            }
        }
    }

    /// Turns `plan`'s releases into holds, ends holds whose identity is needed again, and adds
    /// the releases of holds whose period is over or whose room is needed. Call after
    /// [`crate::preexisting::Ownership::keep_found`] (identities found on the VM/VMSS are
    /// never released, so never held). `settings.grace` zero takes no new holds; holds already
    /// known (restored) are still released when due.
    pub fn apply(
        &mut self,
        plan: &mut Plan<'_>,
        now: SystemTime,
        settings: &HoldSettings,
    ) -> Applied {
        let mut applied = Applied::default();
        let now_secs = secs(now);
        // Needed again: the hold ends, the identity stays.
        for (target, work) in &plan.targets {
            for id in &work.required {
                let key = (target.clone(), id.clone());
                if self.held.remove(&key).is_some() {
                    applied.reused.push(key);
                }
            }
        }
        // Releases because the last pod went (a deleted assignment) become holds. Others (an
        // identity switched to federated tokens, an AzureIdentity pointed at another resource)
        // are not needed again: released at once.
        if !settings.grace.is_zero() {
            let until = now_secs.saturating_add(settings.grace.as_secs().max(1));
            let last_pod_gone: BTreeSet<(ArmTarget, String)> = plan
                .delete
                .iter()
                .filter_map(|d| d.release.clone())
                .collect();
            for (target, work) in &mut plan.targets {
                let ids = std::mem::take(&mut work.release);
                for id in ids {
                    let key = (target.clone(), id);
                    if let Some(hold) = self.held.get(&key) {
                        if hold.releasing {
                            work.release.insert(key.1);
                        }
                        continue;
                    }
                    if !last_pod_gone.contains(&key) {
                        work.release.insert(key.1);
                        continue;
                    }
                    self.held.insert(
                        key.clone(),
                        Hold {
                            since: now_secs,
                            until,
                            releasing: false,
                        },
                    );
                    applied.taken.push(key);
                }
            }
            for (index, deletion) in plan.delete.iter_mut().enumerate() {
                if deletion.release.as_ref().is_some_and(|(target, id)| {
                    self.held
                        .get(&(target.clone(), id.clone()))
                        .is_some_and(|h| !h.releasing)
                }) && let Some(release) = deletion.release.take()
                {
                    applied.deferred.push((index, release));
                }
            }
        }
        // Room: identities in use plus holds above the limit release the oldest holds.
        let mut per_target: BTreeMap<&ArmTarget, Vec<(u64, &String)>> = BTreeMap::new();
        for ((target, id), hold) in &self.held {
            if !hold.releasing && hold.until > now_secs {
                per_target.entry(target).or_default().push((hold.since, id));
            }
        }
        let mut early: Vec<(ArmTarget, String)> = Vec::new();
        for (target, mut holds) in per_target {
            let in_use = plan.targets.get(target).map_or(0, |w| w.required.len());
            let excess = (in_use + holds.len()).saturating_sub(settings.limit);
            holds.sort();
            early.extend(
                holds
                    .into_iter()
                    .take(excess)
                    .map(|(_, id)| (target.clone(), id.clone())),
            );
        }
        // Due (or room needed): release, and keep the hold until ARM confirms.
        for ((target, id), hold) in &mut self.held {
            let due = hold.releasing
                || hold.until <= now_secs
                || early.iter().any(|(t, i)| t == target && i == id);
            if !due {
                continue;
            }
            if !hold.releasing {
                hold.releasing = true;
                applied.releasing.push((target.clone(), id.clone()));
            }
            plan.targets
                .entry(target.clone())
                .or_default()
                .release
                .insert(id.clone());
        }
        applied
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::TargetPlan;

    fn vmss(name: &str) -> ArmTarget {
        ArmTarget::Vmss(name.to_owned())
    }

    /// A plan needing `required` on `target` and releasing `release` there, each release
    /// because its last assignment is deleted.
    fn plan_with(target: &ArmTarget, required: &[&str], release: &[&str]) -> Plan<'static> {
        let object: &'static podid_api::AzureAssignedIdentity = Box::leak(Box::default());
        let mut plan = Plan::default();
        for id in release {
            plan.delete.push(crate::desired::Deletion {
                object,
                release: Some((target.clone(), (*id).to_owned())),
            });
        }
        plan.targets.insert(
            target.clone(),
            TargetPlan {
                required: required.iter().map(|s| (*s).to_owned()).collect(),
                release: release.iter().map(|s| (*s).to_owned()).collect(),
                ..TargetPlan::default()
            },
        );
        plan
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    const GRACE: HoldSettings = HoldSettings {
        grace: Duration::from_secs(300),
        limit: 100,
    };

    #[test]
    fn a_release_becomes_a_hold_and_is_released_when_the_period_ends() {
        let a = vmss("a");
        let mut holds = Holds::default();
        let mut plan = plan_with(&a, &[], &["x"]);
        let applied = holds.apply(&mut plan, at(1000), &GRACE);
        assert_eq!(applied.taken, vec![(a.clone(), "x".to_owned())]);
        assert!(plan.targets[&a].release.is_empty(), "not released yet");
        assert!(holds.contains(&a, "x"));

        let mut plan = Plan::default();
        holds.apply(&mut plan, at(1299), &GRACE);
        assert!(plan.targets.is_empty(), "still within the period");

        let mut plan = Plan::default();
        let applied = holds.apply(&mut plan, at(1300), &GRACE);
        assert_eq!(applied.releasing, vec![(a.clone(), "x".to_owned())]);
        assert!(plan.targets[&a].release.contains("x"), "released when due");
        assert_eq!(holds.counts()[&HoldReason::Releasing], 1);
        // Until ARM confirms, every pass asks again.
        let mut plan = Plan::default();
        holds.apply(&mut plan, at(1301), &GRACE);
        assert!(plan.targets[&a].release.contains("x"));
        holds.released(&a, &BTreeSet::from(["x".to_owned()]));
        assert!(holds.is_empty());
    }

    #[test]
    fn a_release_without_a_deleted_assignment_is_not_held() {
        // An identity switched to federated tokens: not needed on the VM/VMSS again.
        let a = vmss("a");
        let mut plan = plan_with(&a, &[], &[]);
        plan.targets
            .get_mut(&a)
            .expect("target")
            .release
            .insert("x".to_owned());
        let mut holds = Holds::default();
        let applied = holds.apply(&mut plan, at(1000), &GRACE);
        assert!(applied.taken.is_empty());
        assert!(plan.targets[&a].release.contains("x"));
        assert!(holds.is_empty());
    }

    #[test]
    fn zero_grace_keeps_upstreams_immediate_release() {
        let a = vmss("a");
        let mut holds = Holds::default();
        let mut plan = plan_with(&a, &[], &["x"]);
        let applied = holds.apply(&mut plan, at(1000), &HoldSettings::default());
        assert!(applied.taken.is_empty());
        assert!(plan.targets[&a].release.contains("x"));
        assert!(holds.is_empty());
    }

    #[test]
    fn a_needed_identity_ends_its_hold_without_a_release() {
        let a = vmss("a");
        let mut holds = Holds::default();
        holds.apply(&mut plan_with(&a, &[], &["x"]), at(1000), &GRACE);
        let mut plan = plan_with(&a, &["x"], &[]);
        let applied = holds.apply(&mut plan, at(1100), &GRACE);
        assert_eq!(applied.reused, vec![(a.clone(), "x".to_owned())]);
        assert!(plan.targets[&a].release.is_empty());
        assert!(holds.is_empty());
        // Even past the period: in use means in use.
        let mut plan = Plan::default();
        holds.apply(&mut plan, at(5000), &GRACE);
        assert!(plan.targets.is_empty());
    }

    #[test]
    fn holds_give_way_oldest_first_when_the_limit_is_reached() {
        let a = vmss("a");
        let b = vmss("b");
        let settings = HoldSettings {
            grace: Duration::from_secs(300),
            limit: 3,
        };
        let mut holds = Holds::default();
        holds.apply(&mut plan_with(&a, &[], &["old"]), at(1000), &settings);
        holds.apply(&mut plan_with(&a, &[], &["new"]), at(1010), &settings);
        holds.apply(&mut plan_with(&b, &[], &["other"]), at(1010), &settings);
        // Two identities in use plus two holds: one hold too many on a; b is not affected.
        let mut plan = plan_with(&a, &["p", "q"], &[]);
        let applied = holds.apply(&mut plan, at(1020), &settings);
        assert_eq!(applied.releasing, vec![(a.clone(), "old".to_owned())]);
        assert_eq!(plan.targets[&a].release, BTreeSet::from(["old".to_owned()]));
        assert!(!plan.targets.contains_key(&b));
        assert!(holds.contains(&a, "new"));
    }

    #[test]
    fn the_record_round_trips_and_restored_holds_are_released_when_due_even_with_zero_grace() {
        let a = vmss("a");
        let vm = ArmTarget::Vm("node-1".to_owned());
        let mut holds = Holds::default();
        holds.apply(&mut plan_with(&a, &[], &["x"]), at(1000), &GRACE);
        holds.apply(&mut plan_with(&vm, &[], &["y"]), at(1000), &GRACE);
        let text = serde_json::to_string(&holds.to_record()).expect("json");
        let record: Record = serde_json::from_str(&text).expect("parses");
        let mut restored = Holds::default();
        restored.restore(&record);
        assert_eq!(restored, holds);

        let mut plan = Plan::default();
        restored.apply(&mut plan, at(1200), &HoldSettings::default());
        assert!(plan.targets.is_empty(), "restored holds keep their period");
        let mut plan = Plan::default();
        restored.apply(&mut plan, at(1300), &HoldSettings::default());
        assert!(plan.targets[&a].release.contains("x"));
        assert!(plan.targets[&vm].release.contains("y"));
    }

    #[test]
    fn a_held_identitys_deletions_need_no_arm_work() {
        use crate::desired::Deletion;
        let a = vmss("a");
        let object = podid_api::AzureAssignedIdentity::default();
        let mut plan = plan_with(&a, &[], &[]);
        plan.targets
            .get_mut(&a)
            .expect("target")
            .release
            .insert("x".to_owned());
        plan.delete.push(Deletion {
            object: &object,
            release: Some((a.clone(), "x".to_owned())),
        });
        let mut holds = Holds::default();
        holds.apply(&mut plan, at(1000), &GRACE);
        assert_eq!(plan.delete[0].release, None);
        // Not recorded: back to an immediate release, deletion included.
        let mut plan = plan_with(&a, &[], &[]);
        plan.targets
            .get_mut(&a)
            .expect("target")
            .release
            .insert("x".to_owned());
        plan.delete.push(Deletion {
            object: &object,
            release: Some((a.clone(), "x".to_owned())),
        });
        let mut undo = Holds::default();
        let applied = undo.apply(&mut plan, at(1000), &GRACE);
        undo.undo(&mut plan, &applied);
        assert!(undo.is_empty());
        assert!(plan.targets[&a].release.contains("x"));
        assert_eq!(plan.delete[0].release, Some((a.clone(), "x".to_owned())));
    }
}
