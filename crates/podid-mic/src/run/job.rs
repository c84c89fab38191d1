//! One VM/VMSS's job: its ARM work, then the API writes that wait for it (confirmations,
//! creates in their final state, deletions whose identity left). Jobs run beside later passes.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use futures::future::BoxFuture;
use kube::Client;
use kube::runtime::events::Recorder;
use podid_api::{AssignedIdentityState, AzureAssignedIdentity};
use tracing::{debug, warn};

use super::apply::in_state;
use super::events::{
    applied_events, apply_error_event, status_error_event, unassign_error_event, write_error_event,
};
use super::memory::Written;
use super::report::{ConfirmResult, PassReport};
use super::writes::{create_assigned, delete_assigned, is_status, set_assigned, set_state};
use super::{bounded, lower_id, name_of, namespace_of};
use crate::assigner::{AssignError, IdentityAssigner, NotApplied};
use crate::desired::{ArmTarget, Deletion};

/// An assignment a [`TargetJob`] confirms, with the version its confirmation patches.
#[derive(Debug, Clone)]
pub(super) struct JobObject {
    pub(super) object: AzureAssignedIdentity,
    /// The resourceVersion the pass wrote, else the one the plan read.
    pub(super) stale_version: Option<String>,
    /// Created by the pass that made the job.
    pub(super) created: bool,
}

/// The ARM work of one VM/VMSS and the API writes that depend on it, owned so that it can run
/// while later passes go on.
#[derive(Debug, Clone)]
pub(super) struct TargetJob {
    pub(super) target: ArmTarget,
    pub(super) required: BTreeSet<String>,
    pub(super) release: BTreeSet<String>,
    pub(super) confirm: Vec<JobObject>,
    /// New assignments (built `Assigned`) created once the identity work is done: `Assigned`
    /// when ARM has their identity, else `Created` ([`crate::desired::TargetPlan::create_assigned`]).
    pub(super) create: Vec<AzureAssignedIdentity>,
    /// Deletions waiting for their identity to leave this VM/VMSS.
    pub(super) deletions: Vec<(AzureAssignedIdentity, Option<(ArmTarget, String)>)>,
    /// Required ids no assignment or hold claims (candidates for the pre-existing mark).
    pub(super) unowned: BTreeSet<String>,
}

impl JobObject {
    /// The record of its confirmation, which the API server answered with `after`.
    fn confirmation(&self, after: &AzureAssignedIdentity) -> Written {
        Written::confirmation(
            &self.object,
            self.created,
            self.stale_version.clone(),
            after,
        )
    }
}

impl TargetJob {
    /// The VM/VMSS.
    pub(super) fn target(&self) -> &ArmTarget {
        &self.target
    }

    /// The ids this job removes.
    pub(super) fn release(&self) -> &BTreeSet<String> {
        &self.release
    }

    /// (namespace, name) of the assignments this job confirms, creates or deletes: no pass
    /// writes them while it runs.
    pub(super) fn objects(&self) -> HashSet<(String, String)> {
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
pub(super) struct JobOutcome {
    /// The VM/VMSS.
    pub(super) target: ArmTarget,
    /// Its API writes (and failures).
    pub(super) report: PassReport,
    /// Ids ARM confirmed removed.
    pub(super) released: BTreeSet<String>,
    /// The ARM call failed (as a whole or for some ids).
    pub(super) failed: bool,
}

/// Runs one VM/VMSS's ARM work, then confirms its assignments and deletes the assignments
/// whose identity left.
pub(super) async fn run_job(
    job: TargetJob,
    client: Client,
    assigner: Arc<dyn IdentityAssigner>,
    events: Recorder,
    batch: usize,
) -> JobOutcome {
    let client = &client;
    let events = &events;
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
            outcome.failed = true;
            match arm_failed(&job, assigner.as_ref(), events, &e, &mut report).await {
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
    // Status first, events after: a scale set's 500 `binding applied` events must not hold
    // up its assignments turning `Assigned` (nmi waits on that state).
    let confirmed = confirm_after_arm(client, &job, &present, &not_applied, batch).await;
    // Then the assignments that waited for this work, in their final state (`Created` for
    // those whose identity ARM did not take).
    let created = create_after_arm(client, events, &job, Some(&present), &not_applied, batch).await;
    let mut applied: Vec<(Option<&ArmTarget>, &AzureAssignedIdentity)> = Vec::new();
    for (c, result) in &confirmed {
        match result {
            Ok(_) => applied.push((Some(target), &c.object)),
            Err(e) => status_error_event(events, &c.object, e, recovered).await,
        }
    }
    applied.extend(created.applied.iter().map(|o| (Some(target), *o)));
    applied_events(events, &applied, recovered, batch).await;
    report.absorb_created(created.report);
    report.confirmations(confirmed.into_iter().map(|(_, result)| result));
    report.deletions(delete_released(client, events, &job, &not_applied, batch).await);
    outcome.report = report;
    outcome
}

/// Takes in a failed ARM call of `job`: logged, counted (with the assigner's `Retry-After`
/// unless only some ids failed), and upstream's Warning `binding apply error` on each
/// assignment waiting for an id that failed. Returns the ids ARM did not apply when the call
/// failed only for them ([`NotApplied`]), `None` when it failed as a whole.
async fn arm_failed(
    job: &TargetJob,
    assigner: &dyn IdentityAssigner,
    events: &Recorder,
    e: &AssignError,
    report: &mut PassReport,
) -> Option<BTreeSet<String>> {
    let target = &job.target;
    warn!(%target, error = %e, "failed to update the identities of the VM/VMSS");
    report.failures += 1;
    let partial = e.downcast_ref::<NotApplied>().map(|p| p.ids.clone());
    if partial.is_none() {
        report.retry_after = assigner.retry_after(e);
    }
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
        apply_error_event(events, object, e).await;
    }
    partial
}

/// Marks `job`'s assignments `Assigned` once ARM applied their identity (all but those of
/// `not_applied`); those whose identity ARM found `present` and no one owns also get the
/// pre-existing mark. Each answer is reduced to its record at once.
async fn confirm_after_arm<'j>(
    client: &Client,
    job: &'j TargetJob,
    present: &BTreeSet<String>,
    not_applied: &BTreeSet<String>,
    batch: usize,
) -> Vec<(&'j JobObject, ConfirmResult)> {
    let confirms: Vec<BoxFuture<'_, (&JobObject, ConfirmResult)>> = job
        .confirm
        .iter()
        .filter(|c| !not_applied.contains(&lower_id(&c.object)))
        .map(|c| {
            let id = lower_id(&c.object);
            let mark = present.contains(&id) && job.unowned.contains(&id);
            Box::pin(async move {
                let object = &c.object;
                let result =
                    set_assigned(client, namespace_of(object), name_of(object), mark).await;
                (c, result.map(|after| Some(c.confirmation(&after))))
            }) as BoxFuture<'_, _>
        })
        .collect();
    bounded(confirms, batch).await
}

/// Deletes `job`'s assignments whose identity left the VM/VMSS (all but those of
/// `not_applied`), each marked `Unassigned` first.
async fn delete_released<'j>(
    client: &Client,
    events: &Recorder,
    job: &'j TargetJob,
    not_applied: &BTreeSet<String>,
    batch: usize,
) -> Vec<(&'j AzureAssignedIdentity, Result<(), kube::Error>)> {
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
    bounded(releases, batch).await
}

/// What [`create_after_arm`] did.
#[derive(Default)]
pub(super) struct CreatedAfterArm<'a> {
    /// Creates, `Assigned` ones and failures counted; records of what was created.
    pub(super) report: PassReport,
    /// Created `Assigned` (for the `binding applied` events).
    pub(super) applied: Vec<&'a AzureAssignedIdentity>,
}

/// Creates a job's [`TargetJob::create`] once its identity work is done: `Assigned` (with the
/// [`crate::preexisting::PREEXISTING_ANNOTATION`] mark where a confirmation would carry it) when ARM confirmed the
/// identity; `Created` when it did not (`present` is `None`: the whole call failed; else the
/// ids in `not_applied`), to be confirmed on a later pass as upstream's objects are.
pub(super) async fn create_after_arm<'a>(
    client: &Client,
    events: &Recorder,
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
                write_error_event(events, object, true, &e).await;
            }
        }
    }
    done
}

/// Marks a deletion `Unassigned` once its identity left the VM/VMSS, then deletes it. A
/// failed status patch gets upstream's Warning `status update error` on the assignment.
pub(super) async fn release_and_delete(
    client: &Client,
    events: &Recorder,
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
            unassign_error_event(events, object, &e).await;
            return Err(e);
        }
        Ok(()) => {}
    }
    delete_assigned(client, object).await
}
