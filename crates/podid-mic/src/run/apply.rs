//! The plan applier: a pass's API writes (creates and updates, deletions and confirmations
//! that need no ARM work) and the VM/VMSS jobs for the rest.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use futures::future::BoxFuture;
use kube::Client;
use kube::runtime::events::Recorder;
use podid_api::{AssignedIdentityState, AzureAssignedIdentity};
use tracing::warn;

use super::events::{applied_events, removal_event, status_error_event, write_error_event};
use super::job::{JobObject, TargetJob, run_job};
use super::memory::{Confirmed, Written};
use super::report::{ConfirmResult, PassReport};
use super::writes::{create_assigned, delete_assigned, replace_assigned, set_assigned, set_state};
use super::{bounded, lower_id, name_of, namespace_of};
use crate::assigner::IdentityAssigner;
use crate::desired::{ArmTarget, Plan};
use crate::preexisting::{Ownership, PREEXISTING_ANNOTATION};

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
    pub(super) fn claims(&self, object: &AzureAssignedIdentity) -> bool {
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

/// How a pass creates a new assignment that is not simply written as planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Creation<'p> {
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
pub(super) fn creations<'p>(
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
pub(super) fn in_state(
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

/// A create or update: the name, whether it was a create, and the resourceVersion written.
pub(super) type WriteOutcome<'a> = (&'a str, bool, Result<Option<String>, kube::Error>);
