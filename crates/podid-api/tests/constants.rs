//! The names other components and existing clusters depend on, pinned byte for byte.

use kube::Resource;
use podid_api::*;

#[test]
fn names_are_upstreams() {
    assert_eq!(GROUP, "aadpodidentity.k8s.io");
    assert_eq!(VERSION, "v1");
    assert_eq!(API_VERSION, format!("{GROUP}/{VERSION}"));
    assert_eq!(POD_LABEL_KEY, "aadpodidbinding");
    assert_eq!(BEHAVIOR_ANNOTATION, "aadpodidentity.k8s.io/Behavior");
    assert_eq!(BEHAVIOR_NAMESPACED, "namespaced");
    assert_eq!(
        ASSIGNED_IDENTITY_FINALIZER,
        "azureassignedidentity.finalizers.aadpodidentity.k8s.io"
    );
    assert_eq!(NODE_NAME_LABEL, "nodename");
    assert_eq!(DEFAULT_ASSIGNED_IDENTITY_NAMESPACE, "default");
}

#[test]
fn resource_metadata_matches_upstream() {
    assert_eq!(AzureIdentity::plural(&()), "azureidentities");
    assert_eq!(AzureIdentityBinding::plural(&()), "azureidentitybindings");
    assert_eq!(
        AzureAssignedIdentity::plural(&()),
        "azureassignedidentities"
    );
    assert_eq!(
        AzurePodIdentityException::plural(&()),
        "azurepodidentityexceptions"
    );
    assert_eq!(AzureIdentity::api_version(&()), API_VERSION);
    assert_eq!(AzureAssignedIdentity::kind(&()), "AzureAssignedIdentity");
}

#[test]
fn assigned_identity_name_is_plain_concatenation() {
    assert_eq!(
        assigned_identity_name("web-1", "app", "kv-id"),
        "web-1-app-kv-id"
    );
    // Upstream's collision is reproduced, not hidden.
    assert_eq!(
        assigned_identity_name("a", "b-c", "d"),
        assigned_identity_name("a-b", "c", "d")
    );
}

#[test]
fn namespaced_annotation_is_exact() {
    let mut id = AzureIdentity::new("x", AzureIdentitySpec::default());
    assert!(!id.is_namespaced());
    for (value, expected) in [("namespaced", true), ("Namespaced", false), ("", false)] {
        id.metadata.annotations = Some([(BEHAVIOR_ANNOTATION.to_owned(), value.to_owned())].into());
        assert_eq!(id.is_namespaced(), expected, "{value:?}");
    }
    id.metadata.annotations = Some(
        [(
            "aadpodidentity.k8s.io/behavior".to_owned(),
            "namespaced".to_owned(),
        )]
        .into(),
    );
    assert!(!id.is_namespaced(), "key is case-sensitive");
}

#[test]
fn identity_type_integers() {
    for (n, t) in [
        (0, IdentityType::UserAssignedMsi),
        (1, IdentityType::ServicePrincipal),
        (2, IdentityType::ServicePrincipalCertificate),
        (3, IdentityType::Other(3)),
    ] {
        assert_eq!(IdentityType::from_i64(n), t);
        assert_eq!(t.as_i64(), n);
        assert_eq!(serde_json::to_value(t).expect("json"), serde_json::json!(n));
    }
    assert_eq!(
        AzureIdentitySpec::default().identity_type(),
        IdentityType::UserAssignedMsi
    );
}

#[test]
fn new_objects_serialize_with_type_meta_and_nothing_else() {
    let b = AzureIdentityBinding::new(
        "b",
        AzureIdentityBindingSpec {
            azure_identity: Some("id".into()),
            selector: Some("sel".into()),
            ..Default::default()
        },
    );
    assert_eq!(
        serde_json::to_value(&b).expect("json"),
        serde_json::json!({
            "apiVersion": "aadpodidentity.k8s.io/v1",
            "kind": "AzureIdentityBinding",
            "metadata": {"name": "b"},
            "spec": {"azureIdentity": "id", "selector": "sel"}
        })
    );
}

#[test]
fn builders_produce_what_mic_writes() {
    let id = AzureIdentity::user_assigned("app", "kv-id", "/subscriptions/S/x", "cid").namespaced();
    assert!(id.is_namespaced());
    assert!(id.identity_type().is_user_assigned_msi());
    let b = AzureIdentityBinding::for_selector("app", "kv-id-binding", "kv-id", "kv");
    assert_eq!(assigned_identity_namespace(&id, false), "app");
    let plain = AzureIdentity::user_assigned("app", "other", "/x", "c");
    assert_eq!(assigned_identity_namespace(&plain, false), "default");
    assert_eq!(assigned_identity_namespace(&plain, true), "app");

    let a = AzureAssignedIdentity::for_pod("app", "web-1", "app", "aks-np-0000", id, b);
    let v = serde_json::to_value(&a).expect("json");
    assert_eq!(v["metadata"]["name"], "web-1-app-kv-id");
    assert_eq!(v["metadata"]["namespace"], "app");
    assert_eq!(
        v["metadata"]["labels"],
        serde_json::json!({"nodename": "aks-np-0000"})
    );
    assert_eq!(
        v["metadata"]["finalizers"],
        serde_json::json!(["azureassignedidentity.finalizers.aadpodidentity.k8s.io"])
    );
    assert_eq!(v["spec"]["azureIdentityRef"]["kind"], "AzureIdentity");
    assert_eq!(
        v["spec"]["azureIdentityRef"]["apiVersion"],
        "aadpodidentity.k8s.io/v1"
    );
    assert_eq!(
        v["spec"]["azureIdentityRef"]["metadata"]["annotations"]["aadpodidentity.k8s.io/Behavior"],
        "namespaced"
    );
    assert_eq!(v["spec"]["azureBindingRef"]["spec"]["selector"], "kv");
    assert_eq!(v["spec"]["nodename"], "aks-np-0000");
    assert_eq!(v["spec"]["podNamespace"], "app");
    assert_eq!(
        v["status"],
        serde_json::json!({"status": "Created", "availableReplicas": 1})
    );
    assert_eq!(a.node_name(), Some("aks-np-0000"));

    let sp = AzureIdentity::service_principal(
        "ns",
        "sp",
        IdentityType::ServicePrincipalCertificate,
        "tid",
        "cid",
        "cert",
    );
    let v = serde_json::to_value(&sp).expect("json");
    assert_eq!(v["spec"]["type"], 2);
    assert_eq!(
        v["spec"]["clientPassword"],
        serde_json::json!({"name": "cert", "namespace": "ns"})
    );

    let e =
        AzurePodIdentityException::for_pod_labels("default", "mic", [("app".into(), "mic".into())]);
    assert!(e.excepts(&[("app".to_owned(), "MIC".to_owned())].into()));
}
