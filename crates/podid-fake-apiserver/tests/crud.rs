//! CRUD, selectors, conflicts and error shapes through kube's real client.

mod common;

use common::{azure_identity, identity, pod, setup, status};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use serde_json::json;

#[tokio::test]
async fn pod_crud_round_trip_with_global_resource_versions() {
    let (server, client) = setup().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "app");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "app");

    let created = pods
        .create(
            &PostParams::default(),
            &pod("web-1", &[("app", "web")], Some("n1")),
        )
        .await
        .expect("create");
    let rv1: u64 = created
        .metadata
        .resource_version
        .as_deref()
        .expect("rv")
        .parse()
        .expect("numeric rv");
    assert!(created.metadata.uid.is_some());
    assert!(created.metadata.creation_timestamp.is_some());
    assert_eq!(created.metadata.namespace.as_deref(), Some("app"));

    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "c"}, "data": {"k": "v"}})).expect("cm");
    let cm = cms
        .create(&PostParams::default(), &cm)
        .await
        .expect("create cm");
    let rv2: u64 = cm
        .metadata
        .resource_version
        .as_deref()
        .expect("rv")
        .parse()
        .expect("numeric");
    assert!(
        rv2 > rv1,
        "resourceVersion is global across kinds: {rv1} then {rv2}"
    );

    let got = pods.get("web-1").await.expect("get");
    assert_eq!(got.metadata.uid, created.metadata.uid);

    let mut changed = got.clone();
    changed
        .metadata
        .labels
        .get_or_insert_default()
        .insert("tier".into(), "front".into());
    let replaced = pods
        .replace("web-1", &PostParams::default(), &changed)
        .await
        .expect("replace");
    assert_ne!(
        replaced.metadata.resource_version,
        got.metadata.resource_version
    );

    // Replacing with the old resourceVersion is a conflict.
    let err = status(
        pods.replace("web-1", &PostParams::default(), &changed)
            .await
            .expect_err("stale"),
    );
    assert_eq!((err.code, err.reason.as_str()), (409, "Conflict"));
    assert!(
        err.message.contains("the object has been modified"),
        "{}",
        err.message
    );

    let list = pods.list(&ListParams::default()).await.expect("list");
    assert_eq!(list.items.len(), 1);
    let list_rv: u64 = list
        .metadata
        .resource_version
        .as_deref()
        .expect("list rv")
        .parse()
        .expect("numeric");
    assert!(list_rv >= rv2);
    assert_eq!(server.resource_version(), list_rv);

    pods.delete("web-1", &DeleteParams::default())
        .await
        .expect("delete");
    let err = status(pods.get("web-1").await.expect_err("gone"));
    assert_eq!((err.code, err.reason.as_str()), (404, "NotFound"));
    assert_eq!(err.message, "pods \"web-1\" not found");
    let details = err.details.expect("details");
    assert_eq!(
        (details.name.as_str(), details.kind.as_str()),
        ("web-1", "pods")
    );
}

#[tokio::test]
async fn create_twice_is_already_exists_and_bad_names_are_invalid() {
    let (_server, client) = setup().await;
    let pods: Api<Pod> = Api::namespaced(client, "default");
    pods.create(&PostParams::default(), &pod("a", &[], None))
        .await
        .expect("create");
    let err = status(
        pods.create(&PostParams::default(), &pod("a", &[], None))
            .await
            .expect_err("dup"),
    );
    assert_eq!((err.code, err.reason.as_str()), (409, "AlreadyExists"));
    assert_eq!(err.message, "pods \"a\" already exists");
    let err = status(
        pods.create(&PostParams::default(), &pod("Not_Valid", &[], None))
            .await
            .expect_err("invalid"),
    );
    assert_eq!((err.code, err.reason.as_str()), (422, "Invalid"));
    let causes = err.details.expect("details").causes;
    assert_eq!(causes[0].field, "metadata.name");
}

#[tokio::test]
async fn generate_name_and_cluster_scoped_kinds() {
    let (_server, client) = setup().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut p = pod("", &[], None);
    p.metadata.name = None;
    p.metadata.generate_name = Some("worker-".into());
    let created = pods
        .create(&PostParams::default(), &p)
        .await
        .expect("create");
    let name = created.metadata.name.expect("name");
    assert!(
        name.starts_with("worker-") && name.len() == "worker-".len() + 5,
        "{name}"
    );

    let nodes: Api<Node> = Api::all(client.clone());
    let n: Node = serde_json::from_value(json!({"metadata": {"name": "n1"}})).expect("node");
    nodes
        .create(&PostParams::default(), &n)
        .await
        .expect("create node");
    assert_eq!(nodes.get("n1").await.expect("get").metadata.namespace, None);
    let nss: Api<Namespace> = Api::all(client);
    let names: Vec<_> = nss
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    assert!(
        names.contains(&"default".to_string()) && names.contains(&"kube-system".to_string()),
        "{names:?}"
    );
}

#[tokio::test]
async fn label_and_field_selectors_filter_lists_across_namespaces() {
    let (_server, client) = setup().await;
    for (ns, name, app, node) in [
        ("a", "p1", "web", "n1"),
        ("a", "p2", "db", "n1"),
        ("b", "p3", "web", "n2"),
    ] {
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        pods.create(
            &PostParams::default(),
            &pod(name, &[("app", app)], Some(node)),
        )
        .await
        .expect("create");
    }
    let all: Api<Pod> = Api::all(client.clone());
    let names = |l: kube::core::ObjectList<Pod>| {
        let mut v: Vec<String> = l
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        names(all.list(&ListParams::default()).await.expect("all")),
        ["p1", "p2", "p3"]
    );
    assert_eq!(
        names(
            all.list(&ListParams::default().labels("app=web"))
                .await
                .expect("l")
        ),
        ["p1", "p3"]
    );
    assert_eq!(
        names(
            all.list(&ListParams::default().labels("app in (db,x)"))
                .await
                .expect("l")
        ),
        ["p2"]
    );
    assert_eq!(
        names(
            all.list(&ListParams::default().labels("app!=web"))
                .await
                .expect("l")
        ),
        ["p2"]
    );
    assert_eq!(
        names(
            all.list(&ListParams::default().labels("!app"))
                .await
                .expect("l")
        ),
        Vec::<String>::new()
    );
    assert_eq!(
        names(
            all.list(&ListParams::default().fields("spec.nodeName=n1"))
                .await
                .expect("f")
        ),
        ["p1", "p2"]
    );
    assert_eq!(
        names(
            all.list(&ListParams::default().fields("spec.nodeName=n1,metadata.name!=p1"))
                .await
                .expect("f")
        ),
        ["p2"]
    );
    assert_eq!(
        names(
            all.list(&ListParams::default().fields("metadata.namespace=b"))
                .await
                .expect("f")
        ),
        ["p3"]
    );
    let in_a: Api<Pod> = Api::namespaced(client.clone(), "a");
    assert_eq!(
        names(
            in_a.list(&ListParams::default().labels("app=web"))
                .await
                .expect("l")
        ),
        ["p1"]
    );
    // Paging parameters are accepted (and everything comes in one page).
    assert_eq!(
        names(
            all.list(&ListParams::default().limit(1))
                .await
                .expect("limit")
        )
        .len(),
        3
    );

    let err = status(
        all.list(&ListParams::default().labels("app in web"))
            .await
            .expect_err("bad selector"),
    );
    assert_eq!((err.code, err.reason.as_str()), (400, "BadRequest"));
}

#[tokio::test]
async fn crd_objects_are_stored_generically() {
    let (server, client) = setup().await;
    let ids: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "default", &azure_identity());
    let created = ids
        .create(
            &PostParams::default(),
            &identity("id1", "00000000-0000-0000-0000-000000000001"),
        )
        .await
        .expect("create");
    assert_eq!(
        created.data["spec"]["clientID"],
        "00000000-0000-0000-0000-000000000001"
    );
    let got = ids.get("id1").await.expect("get");
    assert_eq!(got.types.as_ref().expect("types").kind, "AzureIdentity");
    // Status is written through the main endpoint (upstream CRDs have no status subresource).
    let mut with_status = got.clone();
    with_status.data["status"] = json!({"availableReplicas": 1});
    let replaced = ids
        .replace("id1", &PostParams::default(), &with_status)
        .await
        .expect("replace");
    assert_eq!(replaced.data["status"]["availableReplicas"], 1);
    let err = status(ids.get("nope").await.expect_err("missing"));
    assert_eq!(
        err.message,
        "azureidentities.aadpodidentity.k8s.io \"nope\" not found"
    );
    assert_eq!(err.details.expect("details").group, "aadpodidentity.k8s.io");

    // The same object through the typed-free helpers.
    let v = server
        .get_json("/apis/aadpodidentity.k8s.io/v1/namespaces/default/azureidentities/id1")
        .expect("get_json");
    assert_eq!(
        v["spec"]["clientID"],
        "00000000-0000-0000-0000-000000000001"
    );
}

#[tokio::test]
async fn kinds_register_at_runtime_and_through_crds() {
    let (server, client) = setup().await;
    server.register_kind(podid_fake_apiserver::KindSpec::cluster(
        "example.com",
        "v1",
        "Widget",
        "widgets",
    ));
    let ar = kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("example.com", "v1", "Widget"),
        "widgets",
    );
    let widgets: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    widgets
        .create(&PostParams::default(), &DynamicObject::new("w", &ar))
        .await
        .expect("create widget");

    server
        .create_json(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            json!({"metadata": {"name": "gadgets.example.org"}, "spec": {"group": "example.org", "scope": "Namespaced",
                "names": {"kind": "Gadget", "plural": "gadgets"}, "versions": [{"name": "v1", "served": true, "storage": true}]}}),
        )
        .expect("create crd");
    let ar = kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("example.org", "v1", "Gadget"),
        "gadgets",
    );
    let gadgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
    gadgets
        .create(&PostParams::default(), &DynamicObject::new("g", &ar))
        .await
        .expect("create gadget");
    assert_eq!(
        gadgets
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        1
    );
}

#[tokio::test]
async fn discovery_and_version_serve_kube() {
    let (_server, client) = setup().await;
    let v = client.apiserver_version().await.expect("version");
    assert_eq!(v.major, "1");
    let core = client.list_core_api_versions().await.expect("/api");
    assert_eq!(core.versions, ["v1"]);
    let groups = client.list_api_groups().await.expect("/apis");
    assert!(
        groups
            .groups
            .iter()
            .any(|g| g.name == "aadpodidentity.k8s.io")
    );
    assert!(
        groups
            .groups
            .iter()
            .any(|g| g.name == "coordination.k8s.io")
    );
    let res = client
        .list_api_group_resources("aadpodidentity.k8s.io/v1")
        .await
        .expect("resources");
    let mut names: Vec<_> = res.resources.iter().map(|r| r.name.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "azureassignedidentities",
            "azureidentities",
            "azureidentitybindings",
            "azurepodidentityexceptions"
        ]
    );
    let core = client
        .list_core_api_resources("v1")
        .await
        .expect("core resources");
    assert!(core.resources.iter().any(|r| r.name == "pods/status"));
    assert!(
        core.resources
            .iter()
            .any(|r| r.name == "serviceaccounts/token")
    );
    let d = kube::Discovery::new(client)
        .run()
        .await
        .expect("kube discovery");
    assert!(d.has_group("aadpodidentity.k8s.io"));
}
