//! The migration bridge in MIC's desired set: identities whose effective token source is
//! federated keep their AzureAssignedIdentity (Assigned without ARM work), stay off the scale
//! sets, are released from them when they switch, and are confirmed on them again when they
//! switch back.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Node, NodeSpec, Pod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use podid_api::{
    AssignedIdentityState, AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding,
    TOKEN_SOURCE_ANNOTATION,
};
use podid_mic::desired::{ArmTarget, Inputs, Options, Plan, compute};

fn rid(name: &str) -> String {
    format!(
        "/subscriptions/S/resourcegroups/RG/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
    )
}

fn lower_rid(name: &str) -> String {
    rid(name).to_ascii_lowercase()
}

fn identity(name: &str) -> AzureIdentity {
    let mut i = AzureIdentity::user_assigned("ns", name, &rid(name), &format!("client-{name}"));
    i.metadata.resource_version = Some("1".to_owned());
    i
}

fn binding(name: &str, identity: &str, selector: &str) -> AzureIdentityBinding {
    let mut b = AzureIdentityBinding::for_selector("ns", name, identity, selector);
    b.metadata.resource_version = Some("1".to_owned());
    b
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

fn pod(name: &str, node: &str, label: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some("ns".to_owned()),
            labels: Some(BTreeMap::from([(
                "aadpodidbinding".to_owned(),
                label.to_owned(),
            )])),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.to_owned()),
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".to_owned()),
            ..Default::default()
        }),
    }
}

fn vmss_node(name: &str, vmss: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            provider_id: Some(format!(
                "azure:///subscriptions/S/resourceGroups/MC_rg/providers/Microsoft.Compute/virtualMachineScaleSets/{vmss}/virtualMachines/0"
            )),
            ..Default::default()
        }),
        status: None,
    }
}

fn options() -> Options {
    Options {
        force_namespaced: false,
        release_finished_pods: true,
        immutable_client_ids: BTreeSet::new(),
    }
}

struct World {
    pods: Vec<Pod>,
    nodes: Vec<Node>,
    identities: Vec<AzureIdentity>,
    bindings: Vec<AzureIdentityBinding>,
    existing: Vec<AzureAssignedIdentity>,
}

impl World {
    /// p1 on n1 and p2 on n2 (both in scale set ss), identity `id` through binding `b`.
    fn new() -> Self {
        Self {
            pods: vec![pod("p1", "n1", "sel"), pod("p2", "n2", "sel")],
            nodes: vec![vmss_node("n1", "ss"), vmss_node("n2", "ss")],
            identities: vec![identity("id")],
            bindings: vec![binding("b", "id", "sel")],
            existing: vec![],
        }
    }

    fn plan(&self) -> Plan<'_> {
        compute(
            &Inputs::from_slices(
                &self.pods,
                &self.nodes,
                &self.identities,
                &self.bindings,
                &self.existing,
            ),
            &options(),
        )
    }

    /// Apply `plan` as the loop would when every write and ARM call succeeds.
    fn settle(&mut self) {
        let plan = self.plan();
        let mut next: Vec<AzureAssignedIdentity> = plan
            .create
            .iter()
            .cloned()
            .chain(plan.update.iter().map(|u| u.desired.clone()))
            .chain(plan.unchanged.iter().map(|o| (*o).clone()))
            .collect();
        for object in &mut next {
            if let Some(status) = object.status.as_mut() {
                status.status = Some(AssignedIdentityState::Assigned);
            }
        }
        self.existing = next;
    }
}

fn ss() -> ArmTarget {
    ArmTarget::Vmss("ss".to_owned())
}

#[test]
fn a_federated_identity_is_assigned_without_arm_and_kept_off_the_scale_set() {
    let mut world = World::new();
    annotate(&mut world.identities[0].metadata, Some(" Federated "), "2");
    let plan = world.plan();
    assert_eq!(
        plan.create.len(),
        2,
        "NMI's standard mode still needs the objects"
    );
    assert_eq!(plan.assign_without_arm.len(), 2);
    assert!(
        plan.targets.values().all(|t| t.required.is_empty()),
        "no ARM work: {:?}",
        plan.targets
    );
}

#[test]
fn switching_releases_the_id_and_switching_back_confirms_it_again() {
    let mut world = World::new();
    world.settle();
    let id = lower_rid("id");

    // The identity switches: both assignments are rewritten with their state kept, and the id
    // leaves the scale set.
    annotate(&mut world.identities[0].metadata, Some("federated"), "2");
    let plan = world.plan();
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
    world.settle();
    assert!(
        world.plan().is_noop(),
        "a settled federated world is stable"
    );

    // Back to IMDS: both assignments go back to Created and wait for the id on the scale set.
    annotate(&mut world.identities[0].metadata, None, "3");
    let plan = world.plan();
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
    let mut world = World::new();
    world.pods[1] = pod("p2", "n2", "other");
    world.bindings.push(binding("b2", "id", "other"));
    world.settle();
    annotate(&mut world.bindings[0].metadata, Some("federated"), "2");
    let plan = world.plan();
    let target = &plan.targets[&ss()];
    assert!(
        target.release.is_empty(),
        "p2 still needs it on the IMDS path"
    );
    assert_eq!(target.required, BTreeSet::from([lower_rid("id")]));

    // The binding opts out of its identity's switch: the binding wins.
    let mut world = World::new();
    world.settle();
    annotate(&mut world.identities[0].metadata, Some("federated"), "2");
    annotate(&mut world.bindings[0].metadata, Some("default"), "2");
    let plan = world.plan();
    assert!(plan.targets[&ss()].release.is_empty());
    assert!(plan.update.iter().all(|u| !u.reassign));
}

#[test]
fn deleting_federated_pods_releases_nothing_others_need() {
    let mut world = World::new();
    annotate(&mut world.identities[0].metadata, Some("federated"), "2");
    world.settle();
    world.pods.clear();
    let plan = world.plan();
    assert_eq!(plan.delete.len(), 2);
    // The id was never put on ss for these assignments; removing it is a no-op at ARM, and no
    // IMDS-path assignment needs it.
    assert!(
        plan.targets
            .get(&ss())
            .is_none_or(|t| t.required.is_empty())
    );
}
