//! Every object shape upstream produced or documented parses, and serializes back to the same
//! JSON (so podid never silently drops or rewrites a field it does not use).

use podid_api::{
    AssignedIdentityState, AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding,
    AzurePodIdentityException, IdentityType,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// parse → serialize must give back the input; parse again must give the same value.
fn round_trip<T>(input: &Value) -> T
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    let parsed: T = serde_json::from_value(input.clone()).expect("input parses");
    let written = serde_json::to_value(&parsed).expect("serializes");
    assert_eq!(&written, input, "serialized form differs from input");
    let reparsed: T = serde_json::from_value(written).expect("output parses");
    assert_eq!(reparsed, parsed);
    parsed
}

fn user_assigned_identity() -> Value {
    json!({
        "apiVersion": "aadpodidentity.k8s.io/v1",
        "kind": "AzureIdentity",
        "metadata": {
            "name": "kv-id",
            "namespace": "app",
            "annotations": {"aadpodidentity.k8s.io/Behavior": "namespaced"}
        },
        "spec": {
            "type": 0,
            "resourceID": "/subscriptions/S/resourcegroups/RG/providers/Microsoft.ManagedIdentity/userAssignedIdentities/kv-id",
            "clientID": "00000000-0000-0000-0000-000000000001"
        }
    })
}

fn binding() -> Value {
    json!({
        "apiVersion": "aadpodidentity.k8s.io/v1",
        "kind": "AzureIdentityBinding",
        "metadata": {"name": "kv-id-binding", "namespace": "app"},
        "spec": {"azureIdentity": "kv-id", "selector": "kv"}
    })
}

#[test]
fn user_assigned_identity_round_trips_and_exposes_fields() {
    let id: AzureIdentity = round_trip(&user_assigned_identity());
    assert_eq!(id.identity_type(), IdentityType::UserAssignedMsi);
    assert!(id.is_namespaced());
    assert_eq!(
        id.spec.client_id.as_deref(),
        Some("00000000-0000-0000-0000-000000000001")
    );
    assert!(
        id.spec
            .resource_id
            .as_deref()
            .is_some_and(|r| r.ends_with("/kv-id"))
    );
}

#[test]
fn binding_round_trips() {
    let b: AzureIdentityBinding = round_trip(&binding());
    assert_eq!(b.spec.azure_identity.as_deref(), Some("kv-id"));
    assert_eq!(b.spec.selector.as_deref(), Some("kv"));
    assert_eq!(b.spec.weight, None);
}

#[test]
fn binding_with_weight_and_embedded_metadata_round_trips() {
    let v = json!({
        "apiVersion": "aadpodidentity.k8s.io/v1",
        "kind": "AzureIdentityBinding",
        "metadata": {"name": "b", "namespace": "default", "resourceVersion": "17", "uid": "u-1"},
        "spec": {"metadata": {"creationTimestamp": null}, "azureIdentity": "id", "selector": "sel", "weight": 3},
        "status": {"metadata": {"creationTimestamp": null}, "availableReplicas": 0}
    });
    let b: AzureIdentityBinding = round_trip(&v);
    assert_eq!(b.spec.weight, Some(3));
    assert_eq!(
        b.spec.metadata.as_ref().map(|m| m.0.len()),
        Some(1),
        "embedded metadata kept"
    );
}

#[test]
fn service_principal_identities_round_trip() {
    let secret = json!({
        "apiVersion": "aadpodidentity.k8s.io/v1",
        "kind": "AzureIdentity",
        "metadata": {"name": "sp", "namespace": "default"},
        "spec": {
            "type": 1,
            "tenantID": "11111111-1111-1111-1111-111111111111",
            "clientID": "22222222-2222-2222-2222-222222222222",
            "clientPassword": {"name": "sp-secret", "namespace": "default"},
            "auxiliaryTenantIDs": ["33333333-3333-3333-3333-333333333333"],
            "adEndpoint": "https://login.microsoftonline.us/",
            "adResourceID": "unused"
        }
    });
    let id: AzureIdentity = round_trip(&secret);
    assert_eq!(id.identity_type(), IdentityType::ServicePrincipal);
    assert_eq!(id.spec.auxiliary_tenant_ids().len(), 1);
    let pw = id.spec.client_password.expect("secret ref");
    assert_eq!(pw.name.as_deref(), Some("sp-secret"));
    assert_eq!(pw.namespace.as_deref(), Some("default"));

    let cert = json!({
        "apiVersion": "aadpodidentity.k8s.io/v1",
        "kind": "AzureIdentity",
        "metadata": {"name": "sp-cert", "namespace": "default"},
        "spec": {
            "type": 2,
            "tenantID": "t",
            "clientID": "c",
            "clientPassword": {"name": "cert-secret", "namespace": "default"}
        }
    });
    let id: AzureIdentity = round_trip(&cert);
    assert_eq!(
        id.identity_type(),
        IdentityType::ServicePrincipalCertificate
    );
    assert!(id.spec.auxiliary_tenant_ids().is_empty());
}

#[test]
fn unknown_identity_type_is_kept() {
    let mut v = user_assigned_identity();
    v["spec"]["type"] = json!(7);
    let id: AzureIdentity = round_trip(&v);
    assert_eq!(id.identity_type(), IdentityType::Other(7));
    assert_eq!(id.identity_type().as_i64(), 7);
    v["spec"]["type"] = json!(-1);
    let id: AzureIdentity = round_trip(&v);
    assert_eq!(id.identity_type(), IdentityType::Other(-1));
}

#[test]
fn missing_optional_fields_parse_and_stay_absent() {
    let v = json!({
        "apiVersion": "aadpodidentity.k8s.io/v1",
        "kind": "AzureIdentity",
        "metadata": {"name": "bare"},
        "spec": {}
    });
    let id: AzureIdentity = round_trip(&v);
    // Go omits the zero value: an absent type is a user-assigned identity.
    assert_eq!(id.identity_type(), IdentityType::UserAssignedMsi);
    assert!(!id.is_namespaced());
    assert!(id.status.is_none());

    for (kind, plural_check) in [
        ("AzureIdentityBinding", 0),
        ("AzureAssignedIdentity", 1),
        ("AzurePodIdentityException", 2),
    ] {
        let v = json!({
            "apiVersion": "aadpodidentity.k8s.io/v1",
            "kind": kind,
            "metadata": {"name": "bare"},
            "spec": {}
        });
        match plural_check {
            0 => {
                round_trip::<AzureIdentityBinding>(&v);
            }
            1 => {
                let a: AzureAssignedIdentity = round_trip(&v);
                assert_eq!(a.state(), AssignedIdentityState::Other(String::new()));
            }
            _ => {
                let e: AzurePodIdentityException = round_trip(&v);
                assert!(!e.excepts(&[("app".to_owned(), "mic".to_owned())].into()));
            }
        }
    }
}

#[test]
fn explicit_nulls_are_kept() {
    let v = json!({
        "apiVersion": "aadpodidentity.k8s.io/v1",
        "kind": "AzureIdentity",
        "metadata": {"name": "n", "namespace": "default"},
        "spec": {"clientID": "c", "replicas": null, "auxiliaryTenantIDs": null}
    });
    let id: AzureIdentity = round_trip(&v);
    assert_eq!(id.spec.replicas, Some(None));
    assert_eq!(id.spec.auxiliary_tenant_ids, Some(None));
    assert!(id.spec.auxiliary_tenant_ids().is_empty());
}

/// An AzureAssignedIdentity as the Go MIC writes it: embedded `metadata` with a null
/// `creationTimestamp` in spec, status and the embedded refs' spec/status, explicit `null`
/// replicas, full copies of the identity and binding with server-set metadata.
fn go_mic_assigned_identity(state: &str) -> Value {
    json!({
        "apiVersion": "aadpodidentity.k8s.io/v1",
        "kind": "AzureAssignedIdentity",
        "metadata": {
            "name": "web-1-app-kv-id",
            "namespace": "app",
            "labels": {"nodename": "aks-np-0000"},
            "finalizers": ["azureassignedidentity.finalizers.aadpodidentity.k8s.io"],
            "resourceVersion": "200",
            "uid": "aaaaaaaa-0000-0000-0000-000000000003",
            "creationTimestamp": "2023-05-06T07:08:09Z",
            "generation": 1
        },
        "spec": {
            "metadata": {"creationTimestamp": null},
            "azureIdentityRef": {
                "apiVersion": "aadpodidentity.k8s.io/v1",
                "kind": "AzureIdentity",
                "metadata": {
                    "name": "kv-id",
                    "namespace": "app",
                    "resourceVersion": "123",
                    "uid": "aaaaaaaa-0000-0000-0000-000000000001",
                    "generation": 1,
                    "creationTimestamp": "2023-05-06T07:00:00Z",
                    "annotations": {
                        "aadpodidentity.k8s.io/Behavior": "namespaced",
                        "kubectl.kubernetes.io/last-applied-configuration": "{}\n"
                    },
                    "managedFields": [{
                        "apiVersion": "aadpodidentity.k8s.io/v1",
                        "fieldsType": "FieldsV1",
                        "fieldsV1": {"f:spec": {".": {}, "f:clientID": {}}},
                        "manager": "kubectl-client-side-apply",
                        "operation": "Update",
                        "time": "2023-05-06T07:00:00Z"
                    }]
                },
                "spec": {
                    "metadata": {"creationTimestamp": null},
                    "type": 0,
                    "resourceID": "/subscriptions/S/resourcegroups/RG/providers/Microsoft.ManagedIdentity/userAssignedIdentities/kv-id",
                    "clientID": "00000000-0000-0000-0000-000000000001",
                    "clientPassword": {},
                    "replicas": null
                },
                "status": {"metadata": {"creationTimestamp": null}}
            },
            "azureBindingRef": {
                "apiVersion": "aadpodidentity.k8s.io/v1",
                "kind": "AzureIdentityBinding",
                "metadata": {
                    "name": "kv-id-binding",
                    "namespace": "app",
                    "resourceVersion": "124",
                    "uid": "aaaaaaaa-0000-0000-0000-000000000002",
                    "generation": 1,
                    "creationTimestamp": "2023-05-06T07:00:01Z"
                },
                "spec": {
                    "metadata": {"creationTimestamp": null},
                    "azureIdentity": "kv-id",
                    "selector": "kv"
                },
                "status": {"metadata": {"creationTimestamp": null}}
            },
            "pod": "web-1",
            "podNamespace": "app",
            "nodename": "aks-np-0000",
            "replicas": null
        },
        "status": {
            "metadata": {"creationTimestamp": null},
            "status": state,
            "availableReplicas": 1
        }
    })
}

#[test]
fn go_mic_assigned_identity_round_trips() {
    let a: AzureAssignedIdentity = round_trip(&go_mic_assigned_identity("Assigned"));
    assert_eq!(a.state(), AssignedIdentityState::Assigned);
    assert!(a.state().is_assigned_or_legacy());
    assert_eq!(a.spec.node_name.as_deref(), Some("aks-np-0000"));
    assert_eq!(a.spec.pod.as_deref(), Some("web-1"));
    assert_eq!(a.spec.pod_namespace.as_deref(), Some("app"));
    let id = a.spec.azure_identity_ref.as_ref().expect("identity ref");
    assert!(
        id.is_namespaced(),
        "NMI reads the annotation from the embedded copy"
    );
    assert_eq!(id.metadata.resource_version.as_deref(), Some("123"));
    let b = a.spec.azure_binding_ref.as_ref().expect("binding ref");
    assert_eq!(b.spec.selector.as_deref(), Some("kv"));
    assert_eq!(
        podid_api::assigned_identity_name(
            a.spec.pod.as_deref().unwrap_or_default(),
            a.spec.pod_namespace.as_deref().unwrap_or_default(),
            id.metadata.name.as_deref().unwrap_or_default()
        ),
        a.metadata.name.clone().unwrap_or_default()
    );
}

#[test]
fn every_assigned_identity_state_round_trips() {
    for (wire, state) in [
        ("Created", AssignedIdentityState::Created),
        ("Assigned", AssignedIdentityState::Assigned),
        ("Unassigned", AssignedIdentityState::Unassigned),
        ("", AssignedIdentityState::Other(String::new())),
        ("assigned", AssignedIdentityState::Other("assigned".into())),
        ("Pending", AssignedIdentityState::Other("Pending".into())),
    ] {
        let a: AzureAssignedIdentity = round_trip(&go_mic_assigned_identity(wire));
        assert_eq!(a.state(), state, "{wire:?}");
        assert_eq!(a.state().as_str(), wire);
        assert_eq!(AssignedIdentityState::parse(wire), state);
        assert_eq!(
            a.state().is_assigned_or_legacy(),
            wire == "Assigned" || wire.is_empty(),
            "{wire:?}"
        );
    }
}

#[test]
fn api_server_pruned_assigned_identity_round_trips() {
    // The same object after an API server with upstream's CRD pruned the embedded metadata.
    let mut v = go_mic_assigned_identity("Created");
    v["spec"]["metadata"] = json!({});
    v["status"]["metadata"] = json!({});
    let a: AzureAssignedIdentity = round_trip(&v);
    assert_eq!(a.state(), AssignedIdentityState::Created);
}

#[test]
fn exception_round_trips_and_matches_any_single_pair() {
    let v = json!({
        "apiVersion": "aadpodidentity.k8s.io/v1",
        "kind": "AzurePodIdentityException",
        "metadata": {"name": "mic-exception", "namespace": "default"},
        "spec": {"podLabels": {"app": "mic", "component": "mic"}},
        "status": {"status": ""}
    });
    let e: AzurePodIdentityException = round_trip(&v);
    let labels = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    assert!(e.excepts(&labels(&[("app", "mic")])), "one pair is enough");
    assert!(
        e.excepts(&labels(&[("component", "MIC")])),
        "value ignores case"
    );
    assert!(
        !e.excepts(&labels(&[("App", "mic")])),
        "key is case-sensitive"
    );
    assert!(!e.excepts(&labels(&[("app", "nmi"), ("tier", "mic")])));
    assert!(!e.excepts(&labels(&[])));
}

#[test]
fn reference_yaml_objects_parse() {
    // The illustrative objects of the reference, as YAML the way users keep them in git.
    let docs = r#"
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentity
metadata: {name: kv-id, namespace: app, annotations: {aadpodidentity.k8s.io/Behavior: namespaced}}
spec: {type: 0, resourceID: /subscriptions/S/resourcegroups/RG/providers/Microsoft.ManagedIdentity/userAssignedIdentities/kv-id, clientID: 00000000-0000-0000-0000-000000000001}
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentityBinding
metadata: {name: kv-id-binding, namespace: app}
spec: {azureIdentity: kv-id, selector: kv}
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzurePodIdentityException
metadata: {name: mic-exception, namespace: default}
spec: {podLabels: {app: mic, component: mic}}
"#;
    let mut it = serde_norway::Deserializer::from_str(docs);
    let id: AzureIdentity =
        serde::Deserialize::deserialize(it.next().expect("doc 1")).expect("identity");
    let b: AzureIdentityBinding =
        serde::Deserialize::deserialize(it.next().expect("doc 2")).expect("binding");
    let e: AzurePodIdentityException =
        serde::Deserialize::deserialize(it.next().expect("doc 3")).expect("exception");
    assert!(it.next().is_none());
    assert_eq!(
        serde_json::to_value(&id).expect("json"),
        user_assigned_identity()
    );
    assert_eq!(serde_json::to_value(&b).expect("json"), binding());
    assert_eq!(e.spec.pod_labels.map(|l| l.len()), Some(2));
}

#[test]
fn capitalised_pre_1_6_keys_are_ignored_like_upstream() {
    // Upstream decodes case-sensitively: `ResourceID` / `ClientPassword.Name` read as empty.
    let v = json!({
        "apiVersion": "aadpodidentity.k8s.io/v1",
        "kind": "AzureIdentity",
        "metadata": {"name": "old"},
        "spec": {"type": 2, "ResourceID": "/x", "ClientID": "c", "clientPassword": {"Name": "s", "Namespace": "n"}}
    });
    let id: AzureIdentity = serde_json::from_value(v).expect("parses");
    assert_eq!(id.spec.resource_id, None);
    assert_eq!(id.spec.client_id, None);
    let pw = id.spec.client_password.expect("object present");
    assert_eq!((pw.name, pw.namespace), (None, None));
}

#[test]
fn wrong_value_types_are_rejected() {
    let mut v = user_assigned_identity();
    v["spec"]["type"] = json!("0");
    assert!(serde_json::from_value::<AzureIdentity>(v).is_err());
    let mut v = binding();
    v["spec"]["selector"] = json!(5);
    assert!(serde_json::from_value::<AzureIdentityBinding>(v).is_err());
}
