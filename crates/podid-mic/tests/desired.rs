//! The desired AzureAssignedIdentity set, its diff against existing objects, and the per-VM/VMSS
//! identity work, fed with plain objects.

use podid_api::OperationMode;
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Node, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use podid_api::{
    ASSIGNED_IDENTITY_FINALIZER, AssignedIdentityState, AzureAssignedIdentity, AzureIdentity,
    AzureIdentityBinding, IdentityType, NODE_NAME_LABEL,
};
mod fixtures;

use fixtures::{World, binding, identity, node, options, pod, rid, vm_node, vmss_node, with_phase};
use podid_mic::desired::{ArmTarget, MAX_NAME_LEN, Options, Plan, Warning, is_valid_resource_id};

const GO_MIC_CREATED: &str =
    include_str!("../../podid-api/tests/fixtures/assigned-go-mic-created.json");

fn names(objects: &[AzureAssignedIdentity]) -> Vec<&str> {
    objects
        .iter()
        .map(|o| o.metadata.name.as_deref().unwrap_or_default())
        .collect()
}

/// The created objects of `plan`, marked `Assigned`, as the next pass sees them.
fn assigned(plan: &Plan<'_>) -> Vec<AzureAssignedIdentity> {
    plan.create
        .iter()
        .cloned()
        .map(|mut o| {
            if let Some(status) = o.status.as_mut() {
                status.status = Some(AssignedIdentityState::Assigned);
            }
            o
        })
        .collect()
}

/// docs/upstream.md#assignment-lifecycle: the namespaced kv-id identity, its binding and pod
/// app/web-1.
fn reference_world() -> World {
    let mut kv = AzureIdentity::user_assigned(
        "app",
        "kv-id",
        "/subscriptions/S/resourcegroups/RG/providers/Microsoft.ManagedIdentity/userAssignedIdentities/kv-id",
        "00000000-0000-0000-0000-000000000001",
    )
    .namespaced();
    kv.metadata.resource_version = Some("123".to_owned());
    kv.metadata.uid = Some("aaaaaaaa-0000-0000-0000-000000000001".to_owned());
    let mut b = AzureIdentityBinding::for_selector("app", "kv-id-binding", "kv-id", "kv");
    b.metadata.resource_version = Some("124".to_owned());
    World {
        pods: vec![pod("app", "web-1", "aks-np-0000", "kv")],
        nodes: vec![vmss_node("aks-np-0000", "aks-np")],
        identities: vec![kv],
        bindings: vec![b],
        existing: vec![],
    }
}

#[test]
fn reference_objects_give_the_reference_assignment() {
    let world = reference_world();
    let plan = world.plan(&options());
    assert_eq!(plan.warnings, vec![]);
    assert_eq!(names(&plan.create), ["web-1-app-kv-id"]);
    let a = &plan.create[0];
    assert_eq!(a.metadata.namespace.as_deref(), Some("app"));
    assert_eq!(
        a.metadata.labels,
        Some(BTreeMap::from([(
            NODE_NAME_LABEL.to_owned(),
            "aks-np-0000".to_owned()
        )]))
    );
    assert_eq!(
        a.metadata.finalizers,
        Some(vec![ASSIGNED_IDENTITY_FINALIZER.to_owned()])
    );
    assert_eq!(a.spec.pod.as_deref(), Some("web-1"));
    assert_eq!(a.spec.pod_namespace.as_deref(), Some("app"));
    assert_eq!(a.spec.node_name.as_deref(), Some("aks-np-0000"));
    assert_eq!(
        a.spec.azure_identity_ref.as_deref(),
        Some(&world.identities[0])
    );
    assert_eq!(
        a.spec.azure_binding_ref.as_deref(),
        Some(&world.bindings[0])
    );
    assert_eq!(a.state(), AssignedIdentityState::Created);
    assert!(plan.update.is_empty() && plan.delete.is_empty() && plan.unchanged.is_empty());

    let target = &plan.targets[&ArmTarget::Vmss("aks-np".to_owned())];
    assert_eq!(
        target.required,
        BTreeSet::from([rid("kv-id").to_ascii_lowercase()])
    );
    assert_eq!(target.confirm, ["web-1-app-kv-id"]);
    assert!(target.release.is_empty());
    assert_eq!(plan.stats.pods, 1);
    assert_eq!(plan.stats.desired, 1);

    // The JSON MIC would POST has upstream's shape.
    let json = serde_json::to_value(a).expect("serializes");
    assert_eq!(json["spec"]["azureIdentityRef"]["kind"], "AzureIdentity");
    assert_eq!(json["spec"]["nodename"], "aks-np-0000");
    assert_eq!(json["status"]["status"], "Created");
}

#[test]
fn objects_written_by_the_go_mic_are_adopted() {
    let go: AzureAssignedIdentity = serde_json::from_str(GO_MIC_CREATED).expect("fixture");
    let mut world = reference_world();
    world.existing = vec![go.clone()];
    // Same content, state Created: nothing to write, but the assignment still needs ARM.
    let plan = world.plan(&options());
    assert!(plan.create.is_empty(), "{:?}", names(&plan.create));
    assert!(plan.update.is_empty() && plan.delete.is_empty());
    assert_eq!(plan.unchanged, [&world.existing[0]]);
    assert_eq!(
        plan.targets[&ArmTarget::Vmss("aks-np".to_owned())].confirm,
        ["web-1-app-kv-id"]
    );

    // Assigned: nothing to do at all.
    let mut assigned_go = go.clone();
    assigned_go.status.as_mut().expect("status").status = Some(AssignedIdentityState::Assigned);
    world.existing = vec![assigned_go.clone()];
    let plan = world.plan(&options());
    assert!(plan.is_noop());
    assert!(
        plan.targets[&ArmTarget::Vmss("aks-np".to_owned())]
            .confirm
            .is_empty()
    );

    // Under another name (any writer): adopted by content, its name kept.
    let mut renamed = assigned_go.clone();
    renamed.metadata.name = Some("written-elsewhere".to_owned());
    world.existing = vec![renamed];
    let plan = world.plan(&options());
    assert!(plan.is_noop(), "create {:?}", names(&plan.create));

    // A binding edit rewrites the embedded copy but keeps the state (same identity, node).
    world.existing = vec![assigned_go];
    world.bindings[0].metadata.resource_version = Some("999".to_owned());
    let plan = world.plan(&options());
    assert_eq!(plan.update.len(), 1);
    let update = &plan.update[0];
    assert!(!update.reassign);
    assert_eq!(
        update.desired.metadata.name.as_deref(),
        Some("web-1-app-kv-id")
    );
    assert_eq!(update.desired.state(), AssignedIdentityState::Assigned);
    assert_eq!(
        update
            .desired
            .spec
            .azure_binding_ref
            .as_ref()
            .and_then(|b| b.metadata.resource_version.as_deref()),
        Some("999")
    );
    assert!(plan.create.is_empty() && plan.delete.is_empty());
}

#[test]
fn identity_resource_change_reassigns_and_releases_the_old_id() {
    let mut world = reference_world();
    let first = world.plan(&options());
    world.existing = assigned(&first);
    world.identities[0].spec.resource_id = Some(rid("other"));
    world.identities[0].metadata.resource_version = Some("200".to_owned());
    let plan = world.plan(&options());
    assert_eq!(plan.update.len(), 1);
    assert!(plan.update[0].reassign);
    assert_eq!(
        plan.update[0].desired.state(),
        AssignedIdentityState::Created
    );
    let target = &plan.targets[&ArmTarget::Vmss("aks-np".to_owned())];
    assert_eq!(
        target.required,
        BTreeSet::from([rid("other").to_ascii_lowercase()])
    );
    assert_eq!(
        target.release,
        BTreeSet::from([rid("kv-id").to_ascii_lowercase()])
    );
}

#[test]
fn a_second_pass_over_its_own_result_is_a_noop() {
    let world = reference_world();
    let first = world.plan(&options());
    let world = World {
        existing: assigned(&first),
        ..world
    };
    let plan = world.plan(&options());
    assert!(plan.is_noop());
    assert_eq!(plan.unchanged.len(), 1);
}

#[test]
fn namespaced_rules() {
    let identities = vec![
        identity("id-ns", "plain", "c1"),
        identity("id-ns", "annotated", "c2").namespaced(),
    ];
    let bindings = vec![
        binding("id-ns", "b-plain", "plain", "sel"),
        binding("id-ns", "b-annotated", "annotated", "sel"),
    ];
    let world = World {
        pods: vec![
            pod("other", "p", "n1", "sel"),
            pod("id-ns", "q", "n1", "sel"),
        ],
        nodes: vec![vm_node("n1")],
        identities,
        bindings,
        existing: vec![],
    };
    // Default: the plain identity matches pods of any namespace (object in `default`); the
    // annotated one only pods of its own namespace (object in that namespace).
    let plan = world.plan(&options());
    let got: BTreeSet<(String, String)> = plan
        .create
        .iter()
        .map(|o| {
            (
                o.metadata.namespace.clone().unwrap_or_default(),
                o.metadata.name.clone().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        got,
        BTreeSet::from([
            ("default".to_owned(), "p-other-plain".to_owned()),
            ("default".to_owned(), "q-id-ns-plain".to_owned()),
            ("id-ns".to_owned(), "q-id-ns-annotated".to_owned()),
        ])
    );
    // --forceNamespaced: only same-namespace pods, objects in the identity's namespace.
    let plan = world.plan(&Options {
        force_namespaced: true,
        ..options()
    });
    let got: BTreeSet<(String, String)> = plan
        .create
        .iter()
        .map(|o| {
            (
                o.metadata.namespace.clone().unwrap_or_default(),
                o.metadata.name.clone().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        got,
        BTreeSet::from([
            ("id-ns".to_owned(), "q-id-ns-plain".to_owned()),
            ("id-ns".to_owned(), "q-id-ns-annotated".to_owned()),
        ])
    );
}

#[test]
fn selectors_are_exact_and_unlabelled_or_unscheduled_pods_skipped() {
    let mut unscheduled = pod("ns", "pending", "", "sel");
    unscheduled.spec = Some(PodSpec::default());
    let world = World {
        pods: vec![
            pod("ns", "upper", "n1", "SEL"),
            pod("ns", "empty", "n1", ""),
            unscheduled,
            pod("ns", "ok", "n1", "sel"),
        ],
        nodes: vec![vm_node("n1")],
        identities: vec![identity("ns", "id", "c")],
        bindings: vec![binding("ns", "b", "id", "sel")],
        existing: vec![],
    };
    let plan = world.plan(&options());
    assert_eq!(names(&plan.create), ["ok-ns-id"]);
}

#[test]
fn excepted_pods_keep_their_assignments() {
    // An AzurePodIdentityException does not change MIC's work (see the module docs): the pod's
    // requests reach the node's IMDS, which serves only identities on the node.
    let mut p = pod("default", "mic-1", "n1", "sel");
    if let Some(labels) = p.metadata.labels.as_mut() {
        labels.insert("app".to_owned(), "mic".to_owned());
    }
    let world = World {
        pods: vec![p],
        nodes: vec![vm_node("n1")],
        identities: vec![identity("default", "id", "c")],
        bindings: vec![binding("default", "b", "id", "sel")],
        existing: vec![],
    };
    assert_eq!(names(&world.plan(&options()).create), ["mic-1-default-id"]);
}

#[test]
fn succeeded_and_failed_pods_release_their_identities() {
    let mut world = World {
        pods: vec![pod("ns", "job", "n1", "sel")],
        nodes: vec![vm_node("n1")],
        identities: vec![identity("ns", "id", "c")],
        bindings: vec![binding("ns", "b", "id", "sel")],
        existing: vec![],
    };
    let running = world.plan(&options());
    world.existing = assigned(&running);
    for phase in ["Succeeded", "Failed"] {
        world.pods = vec![with_phase(pod("ns", "job", "n1", "sel"), phase)];
        let plan = world.plan(&options());
        assert!(plan.create.is_empty());
        assert_eq!(plan.delete.len(), 1, "{phase}");
        let id = rid("id").to_ascii_lowercase();
        assert_eq!(
            plan.delete[0].release,
            Some((ArmTarget::Vm("n1".to_owned()), id.clone()))
        );
        assert_eq!(
            plan.targets[&ArmTarget::Vm("n1".to_owned())].release,
            BTreeSet::from([id])
        );
        // Upstream behaviour on request: kept until the pod is deleted.
        let upstream = world.plan(&Options {
            release_finished_pods: false,
            ..options()
        });
        assert!(upstream.is_noop(), "{phase}");
    }
    // Pending pods keep theirs.
    world.pods = vec![with_phase(pod("ns", "job", "n1", "sel"), "Pending")];
    assert!(world.plan(&options()).is_noop());
}

#[test]
fn clashing_names_get_a_hash_suffix_first_one_keeps_upstreams() {
    // Pod `a` in `b-c` and pod `a-b` in `c`, identity `d`: upstream's name is `a-b-c-d` twice.
    let world = World {
        pods: vec![pod("c", "a-b", "n1", "sel"), pod("b-c", "a", "n1", "sel")],
        nodes: vec![vm_node("n1")],
        identities: vec![identity("default", "d", "c")],
        bindings: vec![binding("default", "bd", "d", "sel")],
        existing: vec![],
    };
    let plan = world.plan(&options());
    let got = names(&plan.create);
    assert_eq!(got.len(), 2);
    // Pods are ordered by (namespace, name): b-c/a first.
    let first = plan
        .create
        .iter()
        .find(|o| o.spec.pod_namespace.as_deref() == Some("b-c"))
        .expect("b-c/a");
    let second = plan
        .create
        .iter()
        .find(|o| o.spec.pod_namespace.as_deref() == Some("c"))
        .expect("c/a-b");
    assert_eq!(first.metadata.name.as_deref(), Some("a-b-c-d"));
    let hashed = second.metadata.name.clone().expect("name");
    assert!(
        hashed.starts_with("a-b-c-d-") && hashed.len() == "a-b-c-d-".len() + 10,
        "{hashed}"
    );
    assert!(plan.warnings.contains(&Warning::Renamed {
        upstream: "a-b-c-d".to_owned(),
        name: hashed.clone(),
        too_long: false,
    }));
    // Stable across passes.
    assert_eq!(world.plan(&options()).create, plan.create);

    // If the Go MIC already wrote `a-b-c-d` for c/a-b, that object is adopted and b-c/a is the
    // one renamed.
    let go_written = {
        let mut o = second.clone();
        o.metadata.name = Some("a-b-c-d".to_owned());
        o
    };
    let world = World {
        existing: vec![go_written],
        ..world
    };
    let plan = world.plan(&options());
    assert_eq!(plan.unchanged.len(), 1);
    assert_eq!(plan.create.len(), 1);
    assert_eq!(plan.create[0].spec.pod_namespace.as_deref(), Some("b-c"));
    assert_ne!(plan.create[0].metadata.name.as_deref(), Some("a-b-c-d"));
}

#[test]
fn same_identity_name_from_two_namespaces_gets_both_assignments() {
    // Upstream keeps the first and drops the second (#1065); podid renames the second.
    let world = World {
        pods: vec![pod("p", "web", "n1", "sel")],
        nodes: vec![vm_node("n1")],
        identities: vec![identity("n1s", "x", "c1"), identity("n2s", "x", "c2")],
        bindings: vec![
            binding("n2s", "b", "x", "sel"),
            binding("n1s", "b", "x", "sel"),
        ],
        existing: vec![],
    };
    let plan = world.plan(&options());
    assert_eq!(plan.create.len(), 2);
    let plain = plan
        .create
        .iter()
        .find(|o| o.metadata.name.as_deref() == Some("web-p-x"))
        .expect("first keeps upstream's name");
    assert_eq!(
        plain
            .spec
            .azure_identity_ref
            .as_ref()
            .and_then(|i| i.metadata.namespace.as_deref()),
        Some("n1s"),
        "bindings are processed in (namespace, name) order"
    );
}

#[test]
fn duplicate_bindings_to_one_identity_give_one_assignment() {
    let world = World {
        pods: vec![pod("ns", "web", "n1", "sel")],
        nodes: vec![vm_node("n1")],
        identities: vec![identity("ns", "id", "c")],
        bindings: vec![
            binding("ns", "b2", "id", "sel"),
            binding("ns", "b1", "id", "sel"),
        ],
        existing: vec![],
    };
    let plan = world.plan(&options());
    assert_eq!(names(&plan.create), ["web-ns-id"]);
    assert_eq!(
        plan.create[0]
            .spec
            .azure_binding_ref
            .as_ref()
            .and_then(|b| b.metadata.name.as_deref()),
        Some("b1")
    );
    assert!(plan.warnings.contains(&Warning::DuplicateBinding {
        pod_namespace: "ns".to_owned(),
        pod: "web".to_owned(),
        kept: "ns/b1".to_owned(),
        ignored: "ns/b2".to_owned(),
    }));
}

#[test]
fn long_names_are_cut_to_253_with_a_hash() {
    let pod_name = format!("{}-", "p".repeat(200)); // ends with '-' at the cut
    let pod_name = pod_name.trim_end_matches('-').to_owned() + "-x";
    let ns = "n".repeat(63);
    let id_name = "i".repeat(60);
    let world = World {
        pods: vec![
            pod(&ns, &pod_name, "n1", "sel"),
            pod(&ns, &format!("{pod_name}y"), "n1", "sel"),
        ],
        nodes: vec![vm_node("n1")],
        identities: vec![identity(&ns, &id_name, "c")],
        bindings: vec![binding(&ns, "b", &id_name, "sel")],
        existing: vec![],
    };
    let plan = world.plan(&options());
    let got = names(&plan.create);
    assert_eq!(got.len(), 2);
    for name in &got {
        assert!(name.len() <= MAX_NAME_LEN, "{} chars", name.len());
        assert!(!name.contains("--") && !name.ends_with('-'), "{name}");
        assert!(name.starts_with(&pod_name[..100]));
    }
    assert_ne!(got[0], got[1]);
    assert!(
        plan.warnings
            .iter()
            .any(|w| matches!(w, Warning::Renamed { too_long: true, .. }))
    );
    // A name of exactly 253 characters is kept as upstream's.
    let exact_pod = "q".repeat(MAX_NAME_LEN - 2 - 2 - 2);
    let world = World {
        pods: vec![pod("ns", &exact_pod, "n1", "sel")],
        nodes: vec![vm_node("n1")],
        identities: vec![identity("ns", "id", "c")],
        bindings: vec![binding("ns", "b", "id", "sel")],
        existing: vec![],
    };
    let plan = world.plan(&options());
    assert_eq!(
        plan.create[0].metadata.name.as_deref().map(str::len),
        Some(MAX_NAME_LEN)
    );
    assert_eq!(
        plan.create[0].metadata.name.as_deref(),
        Some(format!("{exact_pod}-ns-id").as_str())
    );
}

#[test]
fn vmss_ids_stay_while_any_node_of_the_set_needs_them() {
    // p1 on n1 and p2 on n2, both in scale set ss, same identity; p3 on standalone vm n3.
    let mut world = World {
        pods: vec![
            pod("ns", "p1", "n1", "sel"),
            pod("ns", "p2", "n2", "sel"),
            pod("ns", "p3", "n3", "sel"),
        ],
        nodes: vec![vmss_node("n1", "ss"), vmss_node("n2", "ss"), vm_node("n3")],
        identities: vec![identity("ns", "id", "c")],
        bindings: vec![binding("ns", "b", "id", "sel")],
        existing: vec![],
    };
    let first = world.plan(&options());
    assert_eq!(first.targets.len(), 2);
    let ss = ArmTarget::Vmss("ss".to_owned());
    assert_eq!(
        first.targets[&ss].nodes,
        BTreeSet::from(["n1".to_owned(), "n2".to_owned()])
    );
    // One assignment per (scale set, identity) is confirmed through ARM; the other is created
    // `Assigned` once that confirmation succeeded.
    assert_eq!(first.targets[&ss].confirm, ["p1-ns-id"]);
    assert_eq!(first.targets[&ss].create_assigned, ["p2-ns-id"]);
    world.existing = assigned(&first);

    // p1 and p3 go away: the id stays on ss (p2 on n2 needs it), leaves vm n3.
    world.pods = vec![pod("ns", "p2", "n2", "sel")];
    let plan = world.plan(&options());
    let id = rid("id").to_ascii_lowercase();
    let releases: BTreeMap<&str, Option<(ArmTarget, String)>> = plan
        .delete
        .iter()
        .map(|d| {
            (
                d.object.spec.pod.as_deref().unwrap_or_default(),
                d.release.clone(),
            )
        })
        .collect();
    assert_eq!(releases["p1"], None);
    assert_eq!(
        releases["p3"],
        Some((ArmTarget::Vm("n3".to_owned()), id.clone()))
    );
    assert!(plan.targets[&ss].release.is_empty());
    assert!(plan.targets[&ss].required.contains(&id));

    // p2 goes too: now the id leaves ss.
    world.pods = vec![];
    let plan = world.plan(&options());
    assert_eq!(plan.delete.len(), 3);
    assert_eq!(plan.targets[&ss].release, BTreeSet::from([id.clone()]));
    assert_eq!(
        plan.delete
            .iter()
            .filter(|d| d.release == Some((ss.clone(), id.clone())))
            .count(),
        2
    );
}

#[test]
fn immutable_identities_are_never_released() {
    let mut world = World {
        pods: vec![pod("ns", "p", "n1", "sel")],
        nodes: vec![vm_node("n1")],
        identities: vec![identity("ns", "id", "Cluster-Client-ID")],
        bindings: vec![binding("ns", "b", "id", "sel")],
        existing: vec![],
    };
    let first = world.plan(&options());
    world.existing = assigned(&first);
    world.pods = vec![];
    let immutable = Options {
        immutable_client_ids: BTreeSet::from(["cluster-client-id".to_owned()]),
        ..options()
    };
    let plan = world.plan(&immutable);
    assert_eq!(plan.delete.len(), 1);
    assert_eq!(plan.delete[0].release, None);
    assert!(plan.targets.values().all(|t| t.release.is_empty()));
    // Without the immutable entry it would be released.
    assert!(world.plan(&options()).delete[0].release.is_some());
}

#[test]
fn created_or_orphaned_objects_are_deleted_without_arm() {
    let mut world = World {
        pods: vec![pod("ns", "p", "n1", "sel"), pod("ns", "q", "gone", "sel")],
        nodes: vec![vm_node("n1")],
        identities: vec![identity("ns", "id", "c")],
        bindings: vec![binding("ns", "b", "id", "sel")],
        existing: vec![],
    };
    let first = world.plan(&options());
    assert_eq!(first.missing_nodes, BTreeSet::from(["gone".to_owned()]));
    // p's object stays Created (ARM never confirmed); q's node is gone.
    world.existing = first.create.clone();
    if let Some(q) = world
        .existing
        .iter_mut()
        .find(|o| o.spec.pod.as_deref() == Some("q"))
    {
        q.status.as_mut().expect("status").status = Some(AssignedIdentityState::Assigned);
    }
    world.pods = vec![];
    let plan = world.plan(&options());
    assert_eq!(plan.delete.len(), 2);
    assert!(plan.delete.iter().all(|d| d.release.is_none()));
}

#[test]
fn invalid_resource_ids_are_skipped_with_upstreams_line() {
    let mut bad = identity("ns", "bad", "c");
    bad.spec.resource_id = Some("/subscriptions/S/kv-id".to_owned());
    let world = World {
        pods: vec![pod("ns", "p", "n1", "sel")],
        nodes: vec![vm_node("n1")],
        identities: vec![bad, identity("ns", "good", "c2")],
        bindings: vec![
            binding("ns", "b1", "bad", "sel"),
            binding("ns", "b2", "good", "sel"),
        ],
        existing: vec![],
    };
    let plan = world.plan(&options());
    assert_eq!(names(&plan.create), ["p-ns-good"]);
    let lines: Vec<String> = plan.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        [
            "ignoring azure identity ns/bad, error: invalid resource id: \"/subscriptions/S/kv-id\", must match /subscriptions/<subid>/resourcegroups/<resourcegroup>/providers/Microsoft.ManagedIdentity/userAssignedIdentities/<name>",
            "bad identity not found when using ns/b1 binding",
        ]
    );
    assert_eq!(plan.stats.identities, 1);
}

#[test]
fn resource_id_shape_as_upstreams_regex() {
    for ok in [
        rid("x"),
        rid("x").to_ascii_uppercase(),
        format!("prefix{}", rid("x")),
        "/subscriptions/a/b/resourceGroups/c/d/providers/Microsoft.ManagedIdentity/userAssignedIdentities/e/f".to_owned(),
    ] {
        assert!(is_valid_resource_id(&ok), "{ok}");
    }
    for bad in [
        "",
        "/subscriptions//resourcegroups/RG/providers/Microsoft.ManagedIdentity/userAssignedIdentities/x",
        "/subscriptions/S/resourcegroups//providers/Microsoft.ManagedIdentity/userAssignedIdentities/x",
        "/subscriptions/S/resourcegroups/RG/providers/Microsoft.ManagedIdentity/userAssignedIdentities/",
        "/subscriptions/S/resourcegroups/RG/providers/Microsoft.Compute/virtualMachines/x",
        "/subscriptions/S\n/resourcegroups/RG/providers/Microsoft.ManagedIdentity/userAssignedIdentities/x",
    ] {
        assert!(!is_valid_resource_id(bad), "{bad}");
    }
}

#[test]
fn service_principals_need_no_arm_work() {
    let sp = AzureIdentity::service_principal(
        "ns",
        "sp",
        IdentityType::ServicePrincipal,
        "tenant",
        "client",
        "secret",
    );
    let world = World {
        pods: vec![pod("ns", "p", "n1", "sel")],
        nodes: vec![vm_node("n1")],
        identities: vec![sp],
        bindings: vec![binding("ns", "b", "sp", "sel")],
        existing: vec![],
    };
    let plan = world.plan(&options());
    assert_eq!(names(&plan.create), ["p-ns-sp"]);
    // No ARM work: created in its final state (upstream created it `Created` and patched it
    // `Assigned` at once; this test pinned that until the creation wrote the final state).
    assert_eq!(plan.create[0].state(), AssignedIdentityState::Assigned);
    assert!(plan.assign_without_arm.is_empty());
    assert!(plan.targets.is_empty());
}

#[test]
fn provider_ids() {
    assert_eq!(
        ArmTarget::of_node(
            "n",
            Some(
                "azure:///subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/pool/virtualMachines/3"
            )
        ),
        (ArmTarget::Vmss("pool".to_owned()), true)
    );
    assert_eq!(
        ArmTarget::of_node(
            "node-0",
            Some(
                "azure:///subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/VM-0"
            )
        ),
        (ArmTarget::Vm("node-0".to_owned()), true)
    );
    assert_eq!(
        ArmTarget::of_node("kind-1", Some("kind://docker/kind/kind-1")),
        (ArmTarget::Vm("kind-1".to_owned()), false)
    );
    let world = World {
        pods: vec![],
        nodes: vec![node("kind-1", "")],
        identities: vec![],
        bindings: vec![],
        existing: vec![],
    };
    assert_eq!(
        world.plan(&options()).warnings,
        [Warning::UnparsableProviderId {
            node: "kind-1".to_owned(),
            provider_id: String::new()
        }]
    );
}

#[test]
fn terminating_holder_defers_the_replacement() {
    let mut world = reference_world();
    let first = world.plan(&options());
    let mut old = assigned(&first).remove(0);
    // Same name, other content (a pod of the same name on another node), being deleted.
    old.spec.node_name = Some("elsewhere".to_owned());
    old.spec.pod = Some("web-1".to_owned());
    old.metadata.deletion_timestamp = Some(Time(Default::default()));
    if let Some(i) = old.spec.azure_identity_ref.as_mut() {
        i.metadata.name = Some("something-else".to_owned());
    }
    world.existing = vec![old];
    let plan = world.plan(&options());
    assert!(plan.create.is_empty());
    assert_eq!(plan.delete.len(), 1);
    assert!(plan.warnings.contains(&Warning::Deferred {
        namespace: "app".to_owned(),
        name: "web-1-app-kv-id".to_owned()
    }));
}

#[test]
fn benchmark_sized_world_is_consistent() {
    // 5,000 pods, 1,000 bindings, 500 identities over 100 nodes in 5 scale sets.
    let identities: Vec<AzureIdentity> = (0..500)
        .map(|i| {
            identity(
                &format!("ns{}", i % 50),
                &format!("id{i}"),
                &format!("c{i}"),
            )
        })
        .collect();
    let bindings: Vec<AzureIdentityBinding> = (0..1000)
        .map(|b| {
            let i = b % 500;
            binding(
                &format!("ns{}", i % 50),
                &format!("b{b}"),
                &format!("id{i}"),
                &format!("sel{}", b % 700),
            )
        })
        .collect();
    let nodes: Vec<Node> = (0..100)
        .map(|n| vmss_node(&format!("node{n}"), &format!("ss{}", n % 5)))
        .collect();
    let pods: Vec<Pod> = (0..5000)
        .map(|p| {
            pod(
                &format!("app{}", p % 40),
                &format!("pod{p}"),
                &format!("node{}", p % 100),
                &format!("sel{}", p % 700),
            )
        })
        .collect();
    let mut world = World {
        pods,
        nodes,
        identities,
        bindings,
        existing: vec![],
    };
    let started = std::time::Instant::now();
    let plan = world.plan(&options());
    let elapsed = started.elapsed();
    // Selectors 0..299 have two bindings (b and b+700), 300..699 one.
    let expected: usize = (0..5000).map(|p| if p % 700 < 300 { 2 } else { 1 }).sum();
    assert_eq!(plan.create.len(), expected);
    assert_eq!(plan.stats.desired, expected);
    assert_eq!(plan.targets.len(), 5);
    let unique: BTreeSet<&str> = names(&plan.create).into_iter().collect();
    assert_eq!(unique.len(), expected);
    world.existing = assigned(&plan);
    let second = world.plan(&options());
    assert!(second.is_noop());
    assert_eq!(second.unchanged.len(), expected);
    eprintln!("first pass over the benchmark world: {elapsed:?}");
}

#[test]
fn a_name_held_by_other_content_is_rewritten_and_reassigned() {
    let mut world = reference_world();
    let first = world.plan(&options());
    let mut other = assigned(&first).remove(0);
    // Same name and resourceVersions, but written for another pod (upstream's name clash).
    other.spec.pod = Some("web".to_owned());
    other.spec.pod_namespace = Some("1-app".to_owned());
    world.existing = vec![other];
    let plan = world.plan(&options());
    assert!(plan.unchanged.is_empty());
    assert_eq!(plan.update.len(), 1);
    assert!(plan.update[0].reassign);
    assert_eq!(plan.update[0].desired.spec.pod.as_deref(), Some("web-1"));
    assert_eq!(
        plan.update[0].desired.state(),
        AssignedIdentityState::Created
    );
}

/// mic desires an assignment for exactly the (pod, identity) pairs nmi's matcher gives each pod
/// through a binding (`MatchIndex::pod_bindings`): both apply podid-select's selector and
/// namespace rules, so a pod never waits for an assignment mic will not make, and mic never
/// assigns an identity nmi would not hand out.
#[test]
fn mic_desires_exactly_the_pairs_nmi_matches() {
    use std::sync::Arc;

    use podid_select::matching::{CallerPod, MatchIndex, MatchOptions};

    let world = World {
        pods: vec![
            pod("apps", "web", "n1", "kv"),
            pod("evil", "thief", "n1", "kv"),
            pod("ids", "owner", "n1", "kv"),
            pod("apps", "other", "n1", "db"),
            pod("apps", "missing", "n1", "ghost"),
        ],
        nodes: vec![vm_node("n1")],
        identities: vec![
            identity("ids", "shared", "c1"),
            identity("ids", "private", "c2").namespaced(),
            identity("apps", "db", "c3"),
            identity("evil", "kv", "c4").namespaced(),
        ],
        bindings: vec![
            binding("ids", "b-shared", "shared", "kv"),
            binding("ids", "b-private", "private", "kv"),
            binding("apps", "b-db", "db", "db"),
            binding("evil", "b-kv", "kv", "kv"),
            binding("apps", "b-ghost", "no-such-identity", "ghost"),
            binding("apps", "b-empty", "db", ""),
        ],
        existing: vec![],
    };
    for force_namespaced in [false, true] {
        let plan = world.plan(&Options {
            force_namespaced,
            ..options()
        });
        let mic: BTreeSet<(String, String, String)> = plan
            .create
            .iter()
            .map(|o| {
                let identity = o.spec.azure_identity_ref.as_deref().expect("identity copy");
                (
                    o.spec.pod_namespace.clone().unwrap_or_default(),
                    o.spec.pod.clone().unwrap_or_default(),
                    format!(
                        "{}/{}",
                        identity.metadata.namespace.as_deref().unwrap_or_default(),
                        identity.metadata.name.as_deref().unwrap_or_default()
                    ),
                )
            })
            .collect();
        let index = MatchIndex::new(
            MatchOptions {
                mode: OperationMode::Standard,
                force_namespaced,
            },
            world.identities.iter().cloned().map(Arc::new),
            world.bindings.iter().cloned().map(Arc::new),
            [],
            [],
        );
        let nmi: BTreeSet<(String, String, String)> = world
            .pods
            .iter()
            .map(CallerPod::of)
            .flat_map(|pod| {
                index
                    .pod_bindings(&pod)
                    .into_iter()
                    .map(move |(_, identity)| {
                        (
                            pod.namespace.clone(),
                            pod.name.clone(),
                            format!(
                                "{}/{}",
                                identity.metadata.namespace.as_deref().unwrap_or_default(),
                                identity.metadata.name.as_deref().unwrap_or_default()
                            ),
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        assert!(!mic.is_empty());
        assert_eq!(mic, nmi, "force_namespaced {force_namespaced}");
    }
}

/// A new type-0 assignment is confirmed through ARM (`Created`, then `Assigned`) only when no
/// other assignment vouches for its identity on its VM/VMSS; the others wait for that
/// confirmation and are created `Assigned` (one write instead of two).
#[test]
fn one_assignment_per_identity_and_scale_set_is_confirmed_the_others_are_created_assigned() {
    let mut world = World {
        pods: vec![
            pod("ns", "p1", "n1", "sa"),
            pod("ns", "p2", "n2", "sa"),
            pod("ns", "p3", "n3", "sa"),
            pod("ns", "q1", "n1", "sb"),
        ],
        nodes: vec![
            vmss_node("n1", "ss1"),
            vmss_node("n2", "ss1"),
            vmss_node("n3", "ss2"),
        ],
        identities: vec![identity("ns", "a", "ca"), identity("ns", "b", "cb")],
        bindings: vec![
            binding("ns", "ba", "a", "sa"),
            binding("ns", "bb", "b", "sb"),
        ],
        existing: vec![],
    };
    let (ss1, ss2) = (
        ArmTarget::Vmss("ss1".to_owned()),
        ArmTarget::Vmss("ss2".to_owned()),
    );
    let first = world.plan(&options());
    assert_eq!(first.targets[&ss1].confirm, ["p1-ns-a", "q1-ns-b"]);
    assert_eq!(first.targets[&ss1].create_assigned, ["p2-ns-a"]);
    assert_eq!(first.targets[&ss2].confirm, ["p3-ns-a"]);
    assert!(first.targets[&ss2].create_assigned.is_empty());
    let states: BTreeMap<&str, AssignedIdentityState> = first
        .create
        .iter()
        .map(|o| (o.metadata.name.as_deref().unwrap_or_default(), o.state()))
        .collect();
    assert_eq!(
        states,
        BTreeMap::from([
            ("p1-ns-a", AssignedIdentityState::Created),
            ("p2-ns-a", AssignedIdentityState::Assigned),
            ("p3-ns-a", AssignedIdentityState::Created),
            ("q1-ns-b", AssignedIdentityState::Created),
        ])
    );

    // Once they exist, a new pod of `a` on ss1 is created `Assigned` behind them (ss1's
    // identity work still runs and confirms `a` first); a new pod of `b` on ss2, where no
    // assignment holds `b`, is confirmed through ARM.
    world.existing = assigned(&first);
    world.pods.push(pod("ns", "p4", "n2", "sa"));
    world.pods.push(pod("ns", "q2", "n3", "sb"));
    let next = world.plan(&options());
    assert_eq!(names(&next.create), ["p4-ns-a", "q2-ns-b"]);
    assert!(next.targets[&ss1].confirm.is_empty());
    assert_eq!(next.targets[&ss1].create_assigned, ["p4-ns-a"]);
    assert!(
        next.targets[&ss1]
            .required
            .contains(&rid("a").to_ascii_lowercase())
    );
    assert_eq!(next.targets[&ss2].confirm, ["q2-ns-b"]);
    assert!(next.targets[&ss2].create_assigned.is_empty());
}
