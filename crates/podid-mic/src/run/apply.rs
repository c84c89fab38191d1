//! The plan applier: a pass's API writes (creates and updates, deletions and confirmations
//! that need no ARM work) and the VM/VMSS jobs for the rest.

use std::collections::{BTreeSet, HashMap, HashSet};

use futures::future::BoxFuture;
use kube::Client;
use kube::runtime::events::Recorder;
use podid_api::{AssignedIdentityState, AzureAssignedIdentity};
use tracing::warn;

use super::events::{applied_events, removal_event, status_error_event, write_error_event};
use super::job::{JobObject, TargetJob};
use super::memory::Written;
use super::report::{ConfirmResult, PassReport};
use super::writes::{create_assigned, delete_assigned, replace_assigned, set_assigned, set_state};
use super::{bounded, lower_id, name_of, namespace_of};
use crate::desired::{ArmTarget, Plan, TargetPlan};
use crate::preexisting::{Ownership, PREEXISTING_ANNOTATION};

/// The API writes of `plan` (creates, updates, deletions without ARM work, confirmations
/// without ARM work, including those of identities `view` knows are on their VM/VMSS), and
/// each VM/VMSS's remaining work as a [`TargetJob`] for the caller to run with
/// [`super::job::run_job`]
/// (none for `view.busy` targets). Knowing the existing assignments' [`Ownership`],
/// confirmations of identities ARM found already present carry the [`PREEXISTING_ANNOTATION`]
/// mark (apply [`Ownership::keep_found`] to `plan` first), and deletions whose node is gone get
/// upstream's `binding removed` / `binding remove error` events.
pub(super) async fn apply_plan(
    client: &Client,
    batch: usize,
    events: &Recorder,
    plan: &Plan<'_>,
    every_target: bool,
    ownership: &Ownership,
    view: &ArmView,
) -> (PassReport, Vec<TargetJob>) {
    let applier = Applier::new(client, batch, events, plan, ownership, view);
    let mut report = PassReport::default();
    // Assignments this pass turned `Assigned`, with their VM/VMSS (`None`: no ARM work), for
    // the `binding applied` events.
    let mut applied: Vec<(Option<&ArmTarget>, &AzureAssignedIdentity)> = Vec::new();
    let writes = applier.create_and_update(&mut report, &mut applied).await;
    report.deletions(applier.delete_without_arm().await);
    applier
        .confirm_without_arm(&writes, &mut report, &mut applied)
        .await;
    let known = applier
        .confirm_known(&writes, &mut report, &mut applied)
        .await;
    // One `binding applied` event per identity and VM/VMSS for what this pass made `Assigned`.
    applied_events(events, &applied, false, batch).await;
    let jobs = applier.target_jobs(&writes, &known, every_target);
    (report, jobs)
}

/// What the steps of one [`apply_plan`] share: its arguments, the plan's assignments by
/// name, the [`Creation`] of the new ones and the copies of those created in another state.
struct Applier<'p> {
    client: &'p Client,
    batch: usize,
    events: &'p Recorder,
    plan: &'p Plan<'p>,
    ownership: &'p Ownership,
    view: &'p ArmView,
    /// The assignments the plan creates, updates or keeps, by name.
    objects: HashMap<&'p str, &'p AzureAssignedIdentity>,
    creations: HashMap<&'p str, Creation<'p>>,
    /// New assignments created in the state their [`Creation`] says, by name.
    adjusted: HashMap<&'p str, AzureAssignedIdentity>,
}

/// What step 1 ([`Applier::create_and_update`]) left for the later steps.
#[derive(Default)]
struct FirstWrites<'a> {
    /// Names whose create or update failed: not confirmed by this pass.
    failed: HashSet<&'a str>,
    /// resourceVersions as this pass wrote them, and whether by a create (a later
    /// confirmation patches that version).
    versions: HashMap<&'a str, (String, bool)>,
}

impl FirstWrites<'_> {
    /// The version a confirmation of `object` patches (the one this pass wrote, else the one
    /// the plan read) and whether this pass created it.
    fn stale_version(&self, object: &AzureAssignedIdentity) -> (Option<String>, bool) {
        match self.versions.get(name_of(object)) {
            Some((version, created)) => (Some(version.clone()), *created),
            None => (object.metadata.resource_version.clone(), false),
        }
    }

    /// The record of a confirmation of `object`: the version it patched and what the API
    /// server answered (`after`).
    fn confirmation(
        &self,
        object: &AzureAssignedIdentity,
        after: &AzureAssignedIdentity,
    ) -> Written {
        let (stale_version, created) = self.stale_version(object);
        Written::confirmation(object, created, stale_version, after)
    }
}

impl<'p> Applier<'p> {
    fn new(
        client: &'p Client,
        batch: usize,
        events: &'p Recorder,
        plan: &'p Plan<'p>,
        ownership: &'p Ownership,
        view: &'p ArmView,
    ) -> Self {
        let mut objects: HashMap<&str, &AzureAssignedIdentity> = HashMap::new();
        for object in plan
            .create
            .iter()
            .chain(plan.update.iter().map(|u| &u.desired))
            .chain(plan.unchanged.iter().copied())
        {
            objects.insert(name_of(object), object);
        }
        let creations = creations(plan, view, ownership);
        let adjusted = plan
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
        Self {
            client,
            batch,
            events,
            plan,
            ownership,
            view,
            objects,
            creations,
            adjusted,
        }
    }

    /// The namespace of the plan's assignment `name` (`default` when unknown).
    fn namespace(&self, name: &str) -> &'p str {
        self.objects
            .get(name)
            .map_or("default", |object| namespace_of(object))
    }

    /// Step 1: creates and updates (state Created unless an update keeps the state; creates in
    /// the state their [`Creation`] says). Creates a job makes once its VM/VMSS's identity work
    /// is done, or that a job in flight makes, wait. Creates in their final state go to
    /// `applied`.
    async fn create_and_update<'a>(
        &'a self,
        report: &mut PassReport,
        applied: &mut Vec<(Option<&'a ArmTarget>, &'a AzureAssignedIdentity)>,
    ) -> FirstWrites<'a> {
        let (client, view, creations) = (self.client, self.view, &self.creations);
        let writes: Vec<BoxFuture<'_, WriteOutcome<'_>>> = self
            .plan
            .create
            .iter()
            .filter(|o| {
                !view.claims(o)
                    && !matches!(
                        creations.get(name_of(o)),
                        Some(Creation::AfterArm(_) | Creation::Later)
                    )
            })
            .map(|o| (self.adjusted.get(name_of(o)).unwrap_or(o), true))
            .chain(self.plan.update.iter().map(|u| (&u.desired, false)))
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
        let mut first = FirstWrites::default();
        for (name, create, result) in bounded(writes, self.batch).await {
            if let Ok(Some(version)) = &result {
                first.versions.insert(name, (version.clone(), create));
                if create {
                    report.written.push(Written {
                        namespace: self.namespace(name).to_owned(),
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
                    // Created in its final state: applied now (a 409 means an earlier pass
                    // did).
                    let object = self
                        .adjusted
                        .get(name)
                        .or_else(|| self.objects.get(name).copied());
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
                    first.failed.insert(name);
                    if let Some(object) = self.objects.get(name) {
                        write_error_event(self.events, object, create, &e).await;
                    }
                }
            }
        }
        first
    }

    /// Step 2: deletions that need no ARM work. Those whose node is gone get upstream's
    /// `binding removed` / `binding remove error` events (its node-deleted path).
    async fn delete_without_arm(
        &self,
    ) -> Vec<(&'p AzureAssignedIdentity, Result<(), kube::Error>)> {
        let (client, events) = (self.client, self.events);
        let deletions: Vec<BoxFuture<'_, (&AzureAssignedIdentity, Result<(), kube::Error>)>> = self
            .plan
            .delete
            .iter()
            .filter(|d| d.release.is_none() && !self.view.claims(d.object))
            .map(|d| {
                let node_gone = d
                    .object
                    .node_name()
                    .is_some_and(|node| !self.ownership.node_exists(node));
                Box::pin(async move {
                    let result = delete_assigned(client, d.object).await;
                    if node_gone {
                        removal_event(events, d.object, result.as_ref().err()).await;
                    }
                    (d.object, result)
                }) as BoxFuture<'_, _>
            })
            .collect();
        bounded(deletions, self.batch).await
    }

    /// Step 3: the plan's confirmations that need no ARM work. Each answer is reduced to its
    /// record at once: thousands of whole objects must not wait for the batch to finish.
    async fn confirm_without_arm<'a>(
        &'a self,
        first: &FirstWrites<'_>,
        report: &mut PassReport,
        applied: &mut Vec<(Option<&'a ArmTarget>, &'a AzureAssignedIdentity)>,
    ) {
        let (client, events) = (self.client, self.events);
        let confirms: Vec<BoxFuture<'_, (Option<&AzureAssignedIdentity>, ConfirmResult)>> = self
            .plan
            .assign_without_arm
            .iter()
            .filter(|name| !first.failed.contains(name.as_str()))
            .filter(|name| {
                self.objects
                    .get(name.as_str())
                    .is_none_or(|object| !self.view.claims(object))
            })
            .map(|name| {
                let object = self.objects.get(name.as_str()).copied();
                Box::pin(async move {
                    let result = set_state(
                        client,
                        self.namespace(name),
                        name,
                        AssignedIdentityState::Assigned,
                    )
                    .await;
                    if let (Some(object), Err(e)) = (object, result.as_ref()) {
                        status_error_event(events, object, e, false).await;
                    }
                    let record =
                        result.map(|after| object.map(|object| first.confirmation(object, &after)));
                    (object, record)
                }) as BoxFuture<'_, _>
            })
            .collect();
        let confirmed = bounded(confirms, self.batch).await;
        applied.extend(
            confirmed
                .iter()
                .filter(|(_, result)| result.is_ok())
                .filter_map(|(object, _)| object.map(|o| (None, o))),
        );
        report.confirmations(confirmed.into_iter().map(|(_, result)| result));
    }

    /// Step 4: confirmations of identities known to be on their VM/VMSS: no ARM call (an
    /// identity held after its last pod, or one an `Assigned` assignment there keeps). New ones
    /// were created `Assigned` in step 1. Returns the names confirmed (or tried).
    async fn confirm_known<'a>(
        &'a self,
        first: &FirstWrites<'_>,
        report: &mut PassReport,
        applied: &mut Vec<(Option<&'a ArmTarget>, &'a AzureAssignedIdentity)>,
    ) -> HashSet<&'a str> {
        let (client, events, view) = (self.client, self.events, self.view);
        let known: Vec<(&ArmTarget, &AzureAssignedIdentity, bool)> = self
            .plan
            .targets
            .iter()
            .flat_map(|(target, work)| work.confirm.iter().map(move |name| (target, name)))
            .filter(|(_, name)| {
                !first.failed.contains(name.as_str()) && !self.creations.contains_key(name.as_str())
            })
            .filter_map(|(target, name)| {
                let object = self.objects.get(name.as_str()).copied()?;
                if view.claims(object) {
                    return None;
                }
                let id = lower_id(object);
                view.is_known(target, &id)
                    .then(|| (target, object, self.ownership.is_found(target, &id)))
            })
            .collect();
        let known_names: HashSet<&str> = known.iter().map(|(_, o, _)| name_of(o)).collect();
        let confirms: Vec<BoxFuture<'_, (&ArmTarget, &AzureAssignedIdentity, ConfirmResult)>> =
            known
                .iter()
                .map(|&(target, object, mark)| {
                    Box::pin(async move {
                        let result =
                            set_assigned(client, namespace_of(object), name_of(object), mark).await;
                        if let Err(e) = result.as_ref() {
                            status_error_event(events, object, e, false).await;
                        }
                        let record = result.map(|after| Some(first.confirmation(object, &after)));
                        (target, object, record)
                    }) as BoxFuture<'_, _>
                })
                .collect();
        let confirmed = bounded(confirms, self.batch).await;
        for (target, object, result) in &confirmed {
            if result.is_ok() {
                report.confirmed_without_arm += 1;
                applied.push((Some(*target), *object));
            }
        }
        report.confirmations(confirmed.into_iter().map(|(_, _, result)| result));
        known_names
    }

    /// Step 5: the rest of each VM/VMSS's work becomes a job the caller runs concurrently with
    /// later passes (a long-running PATCH holds up no one else). Busy targets (a job in
    /// flight, or backing off) are left for a later pass; `known`: confirmed by step 4.
    fn target_jobs(
        &self,
        first: &FirstWrites<'_>,
        known: &HashSet<&str>,
        every_target: bool,
    ) -> Vec<TargetJob> {
        self.plan
            .targets
            .iter()
            .filter(|(target, _)| !self.view.busy.contains(*target))
            .filter_map(|(target, work)| self.target_job(target, work, first, known, every_target))
            .collect()
    }

    /// The job of `target` (see [`Applier::target_jobs`]); `None` when it has nothing to do.
    fn target_job(
        &self,
        target: &ArmTarget,
        work: &TargetPlan,
        first: &FirstWrites<'_>,
        known: &HashSet<&str>,
        every_target: bool,
    ) -> Option<TargetJob> {
        let confirm: Vec<JobObject> = work
            .confirm
            .iter()
            .filter(|name| {
                !first.failed.contains(name.as_str())
                    && !known.contains(name.as_str())
                    && !self.creations.contains_key(name.as_str())
            })
            .filter_map(|name| self.objects.get(name.as_str()).copied())
            .map(|object| {
                let (stale_version, created) = first.stale_version(object);
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
            .filter(|name| {
                matches!(
                    self.creations.get(name.as_str()),
                    Some(Creation::AfterArm(_))
                )
            })
            .filter_map(|name| self.objects.get(name.as_str()).map(|o| (*o).clone()))
            .collect();
        let reconcile = every_target && !work.required.is_empty();
        if confirm.is_empty() && create.is_empty() && work.release.is_empty() && !reconcile {
            return None;
        }
        let deletions: Vec<(AzureAssignedIdentity, Option<(ArmTarget, String)>)> = self
            .plan
            .delete
            .iter()
            .filter(|d| d.release.as_ref().is_some_and(|(t, _)| t == target))
            .map(|d| (d.object.clone(), d.release.clone()))
            .collect();
        // Ids whose confirmation may carry the pre-existing mark if ARM finds them there:
        // no unmarked `Assigned` assignment and no hold says podid put them there.
        let unowned: BTreeSet<String> = work
            .required
            .iter()
            .filter(|id| {
                !self.ownership.owns(target, id)
                    && !self.view.held.contains(&(target.clone(), (*id).clone()))
            })
            .cloned()
            .collect();
        Some(TargetJob {
            target: target.clone(),
            required: work.required.clone(),
            release: work.release.clone(),
            confirm,
            create,
            deletions,
            unowned,
        })
    }
}

/// What a pass knows about the VMs and VM scale sets beyond the plan.
#[derive(Debug, Clone, Default)]
pub(super) struct ArmView {
    /// Targets whose ARM work waits: a job in flight, or backing off after a failure.
    pub(super) busy: HashSet<ArmTarget>,
    /// Of `busy`, those backing off after a failure (no job in flight).
    pub(super) backing_off: HashSet<ArmTarget>,
    /// (target, id) on the VM/VMSS for sure: an `Assigned` assignment that stays keeps it, or
    /// podid holds it; minus ids a job in flight is removing.
    pub(super) known: HashSet<(ArmTarget, String)>,
    /// (target, id) podid holds after their last pod.
    pub(super) held: HashSet<(ArmTarget, String)>,
    /// (namespace, name) of assignments a job in flight confirms or deletes: left alone.
    pub(super) claimed: HashSet<(String, String)>,
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
    pub(super) fn is_known(&self, target: &ArmTarget, id: &str) -> bool {
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
    ownership: &Ownership,
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
                mark: ownership.is_found(target, &id),
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
