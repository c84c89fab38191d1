//! The migration bridge in MIC's desired set: identities whose effective token source is
//! federated keep their AzureAssignedIdentity (Assigned without ARM work), stay off the scale
//! sets, are released from them when they switch, and are confirmed on them again when they
//! switch back.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use podid_api::{
    AssignedIdentityState, AzureIdentity, AzureIdentityBinding, TOKEN_SOURCE_ANNOTATION,
};
mod fixtures;

use fixtures::{World, options, rid, vmss_node};
use podid_mic::desired::ArmTarget;

fn lower_rid(name: &str) -> String {
    rid(name).to_ascii_lowercase()
}

fn identity(name: &str) -> AzureIdentity {
    fixtures::identity("ns", name, &format!("client-{name}"))
}

fn binding(name: &str, identity: &str, selector: &str) -> AzureIdentityBinding {
    fixtures::binding("ns", name, identity, selector)
}

fn pod(name: &str, node: &str, label: &str) -> Pod {
    fixtures::pod("ns", name, node, label)
}

fn annotate(meta: &mut ObjectMeta, value: Option<&str>, version: &str) {
    match value {
        Some(value) => {
            meta.annotations
                .get_or_insert_with(BTreeMap::new)
                .insert(TOKEN_SOURCE_ANNOTATION.to_owned(), value.to_owned());
        }
        None => {
            if let Some(a) = meta.annotations.as_mut() {
                a.remove(TOKEN_SOURCE_ANNOTATION);
            }
        }
    }
    meta.resource_version = Some(version.to_owned());
}

/// p1 on n1 and p2 on n2 (both in scale set ss), identity `id` through binding `b`.
fn scale_set_world() -> World {
    World {
        pods: vec![pod("p1", "n1", "sel"), pod("p2", "n2", "sel")],
        nodes: vec![vmss_node("n1", "ss"), vmss_node("n2", "ss")],
        identities: vec![identity("id")],
        bindings: vec![binding("b", "id", "sel")],
        existing: vec![],
    }
}

fn ss() -> ArmTarget {
    ArmTarget::Vmss("ss".to_owned())
}

#[test]
fn a_federated_identity_is_assigned_without_arm_and_kept_off_the_scale_set() {
    let mut world = scale_set_world();
    annotate(&mut world.identities[0].metadata, Some(" Federated "), "2");
    let plan = world.plan(&options());
    assert_eq!(
        plan.create.len(),
        2,
        "NMI's standard mode still needs the objects"
    );
    // Created in their final state: no ARM work, nothing to confirm.
    assert!(
        plan.create
            .iter()
            .all(|o| o.state() == AssignedIdentityState::Assigned)
    );
    assert!(plan.assign_without_arm.is_empty());
    assert!(
        plan.targets.values().all(|t| t.required.is_empty()),
        "no ARM work: {:?}",
        plan.targets
    );
}

#[test]
fn switching_releases_the_id_and_switching_back_confirms_it_again() {
    let mut world = scale_set_world();
    world.settle(&options());
    let id = lower_rid("id");

    // The identity switches: both assignments are rewritten with their state kept, and the id
    // leaves the scale set.
    annotate(&mut world.identities[0].metadata, Some("federated"), "2");
    let plan = world.plan(&options());
    assert_eq!(plan.update.len(), 2);
    assert!(plan.update.iter().all(|u| !u.reassign));
    assert!(
        plan.update
            .iter()
            .all(|u| u.desired.state() == AssignedIdentityState::Assigned)
    );
    assert_eq!(plan.targets[&ss()].release, BTreeSet::from([id.clone()]));
    assert!(plan.targets[&ss()].required.is_empty());
    assert!(plan.targets[&ss()].confirm.is_empty());
    world.settle(&options());
    assert!(
        world.plan(&options()).is_noop(),
        "a settled federated world is stable"
    );

    // Back to IMDS: both assignments go back to Created and wait for the id on the scale set.
    annotate(&mut world.identities[0].metadata, None, "3");
    let plan = world.plan(&options());
    assert_eq!(plan.update.len(), 2);
    assert!(plan.update.iter().all(|u| u.reassign));
    assert!(
        plan.update
            .iter()
            .all(|u| u.desired.state() == AssignedIdentityState::Created)
    );
    let target = &plan.targets[&ss()];
    assert_eq!(target.required, BTreeSet::from([id.clone()]));
    assert!(target.release.is_empty());
    assert_eq!(target.confirm.len(), 2);
    assert!(plan.assign_without_arm.is_empty());
}

#[test]
fn the_id_stays_while_any_binding_of_the_scale_set_uses_imds() {
    // p1 uses `id` through binding b (switched to federated on the binding), p2 through binding
    // b2 (not switched): the id must stay on ss.
    let mut world = scale_set_world();
    world.pods[1] = pod("p2", "n2", "other");
    world.bindings.push(binding("b2", "id", "other"));
    world.settle(&options());
    annotate(&mut world.bindings[0].metadata, Some("federated"), "2");
    let plan = world.plan(&options());
    let target = &plan.targets[&ss()];
    assert!(
        target.release.is_empty(),
        "p2 still needs it on the IMDS path"
    );
    assert_eq!(target.required, BTreeSet::from([lower_rid("id")]));

    // The binding opts out of its identity's switch: the binding wins.
    let mut world = scale_set_world();
    world.settle(&options());
    annotate(&mut world.identities[0].metadata, Some("federated"), "2");
    annotate(&mut world.bindings[0].metadata, Some("default"), "2");
    let plan = world.plan(&options());
    assert!(plan.targets[&ss()].release.is_empty());
    assert!(plan.update.iter().all(|u| !u.reassign));
}

#[test]
fn deleting_federated_pods_releases_nothing_others_need() {
    let mut world = scale_set_world();
    annotate(&mut world.identities[0].metadata, Some("federated"), "2");
    world.settle(&options());
    world.pods.clear();
    let plan = world.plan(&options());
    assert_eq!(plan.delete.len(), 2);
    // The id was never put on ss for these assignments; removing it is a no-op at ARM, and no
    // IMDS-path assignment needs it.
    assert!(
        plan.targets
            .get(&ss())
            .is_none_or(|t| t.required.is_empty())
    );
}
