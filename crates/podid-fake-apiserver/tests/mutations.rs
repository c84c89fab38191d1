//! Patches, status subresources, finalizers and raw error shapes.

mod common;

use common::{identity, pod, setup, status, wait_for};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{
    Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams, Preconditions, WatchEvent,
    WatchParams,
};
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn merge_json_strategic_and_apply_patches() {
    let (_server, client) = setup().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(&PostParams::default(), &pod("p", &[("a", "1")], None))
        .await
        .expect("create");

    let p = pods
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"b": "2", "a": null}}})),
        )
        .await
        .expect("merge");
    let labels = p.metadata.labels.clone().expect("labels");
    assert_eq!(labels.get("b").map(String::as_str), Some("2"));
    assert!(
        !labels.contains_key("a"),
        "null removes a key in a merge patch"
    );

    let ops: json_patch::Patch = serde_json::from_value(json!([
        {"op": "add", "path": "/metadata/annotations", "value": {"x": "y"}},
        {"op": "replace", "path": "/metadata/labels/b", "value": "3"}
    ]))
    .expect("ops");
    let p = pods
        .patch("p", &PatchParams::default(), &Patch::<()>::Json(ops))
        .await
        .expect("json patch");
    assert_eq!(
        p.metadata
            .annotations
            .expect("ann")
            .get("x")
            .map(String::as_str),
        Some("y")
    );
    assert_eq!(
        p.metadata
            .labels
            .expect("labels")
            .get("b")
            .map(String::as_str),
        Some("3")
    );

    let failing: json_patch::Patch = serde_json::from_value(
        json!([{"op": "test", "path": "/metadata/labels/b", "value": "nope"}]),
    )
    .expect("ops");
    let err = status(
        pods.patch("p", &PatchParams::default(), &Patch::<()>::Json(failing))
            .await
            .expect_err("test op fails"),
    );
    assert_eq!(err.code, 422);

    let p = pods
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Strategic(json!({"metadata": {"labels": {"c": "4"}}})),
        )
        .await
        .expect("strategic");
    assert_eq!(
        p.metadata
            .labels
            .expect("labels")
            .get("c")
            .map(String::as_str),
        Some("4")
    );

    // Server-side apply creates when missing, then merges.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
    let apply = PatchParams::apply("podid-test");
    let l = leases
        .patch("leader", &apply, &Patch::Apply(json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "leader"}, "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}})))
        .await
        .expect("apply creates");
    assert_eq!(
        l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()),
        Some("a")
    );
    let l = leases
        .patch(
            "leader",
            &apply,
            &Patch::Apply(
                json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "leader"}, "spec": {"holderIdentity": "b"}}),
            ),
        )
        .await
        .expect("apply merges");
    let spec = l.spec.expect("spec");
    assert_eq!(
        (spec.holder_identity.as_deref(), spec.lease_duration_seconds),
        (Some("b"), Some(15))
    );
}

#[tokio::test]
async fn patch_with_stale_resource_version_conflicts() {
    let (_server, client) = setup().await;
    let leases: Api<Lease> = Api::namespaced(client, "default");
    let l: Lease =
        serde_json::from_value(json!({"metadata": {"name": "l"}, "spec": {"holderIdentity": "a"}}))
            .expect("lease");
    let l = leases
        .create(&PostParams::default(), &l)
        .await
        .expect("create");
    let rv = l.metadata.resource_version.expect("rv");
    leases
        .patch(
            "l",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"resourceVersion": rv}, "spec": {"holderIdentity": "b"}}),
            ),
        )
        .await
        .expect("fresh rv ok");
    let err = status(
        leases
            .patch(
                "l",
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"metadata": {"resourceVersion": rv}, "spec": {"holderIdentity": "c"}}),
                ),
            )
            .await
            .expect_err("stale"),
    );
    assert_eq!((err.code, err.reason.as_str()), (409, "Conflict"));
}

#[tokio::test]
async fn pod_status_only_changes_through_the_subresource() {
    let (_server, client) = setup().await;
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let created = pods
        .create(&PostParams::default(), &pod("p", &[], Some("n1")))
        .await
        .expect("create");
    let gen1 = created.metadata.generation;

    let p = pods
        .patch_status("p", &PatchParams::default(), &Patch::Merge(json!({"status": {"phase": "Running", "podIP": "10.0.0.7"}, "metadata": {"labels": {"ignored": "yes"}}})))
        .await
        .expect("status patch");
    let st = p.status.clone().expect("status");
    assert_eq!(
        (st.phase.as_deref(), st.pod_ip.as_deref()),
        (Some("Running"), Some("10.0.0.7"))
    );
    assert!(
        p.metadata.labels.is_none_or(|l| !l.contains_key("ignored")),
        "/status ignores metadata"
    );
    assert_eq!(
        p.metadata.generation, gen1,
        "status does not bump generation"
    );

    // The main endpoint ignores status.
    let p = pods
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"phase": "Failed"}, "metadata": {"labels": {"l": "v"}}}),
            ),
        )
        .await
        .expect("main patch");
    assert_eq!(p.status.and_then(|s| s.phase).as_deref(), Some("Running"));
    assert_eq!(
        p.metadata
            .labels
            .expect("labels")
            .get("l")
            .map(String::as_str),
        Some("v")
    );

    let mut p = pods.get("p").await.expect("get");
    p.status.get_or_insert_default().phase = Some("Succeeded".into());
    let p = pods
        .replace_status("p", &PostParams::default(), &p)
        .await
        .expect("replace status");
    assert_eq!(p.status.and_then(|s| s.phase).as_deref(), Some("Succeeded"));
}

#[tokio::test]
async fn crd_status_is_written_through_the_main_endpoint() {
    let (_server, client) = setup().await;
    let ar = kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("aadpodidentity.k8s.io", "v1", "AzureAssignedIdentity"),
        "azureassignedidentities",
    );
    let aais: Api<DynamicObject> = Api::namespaced_with(client, "default", &ar);
    let mut o = DynamicObject::new("web-1-default-id1", &ar);
    o.data = json!({"spec": {"pod": "web-1", "nodename": "n1"}, "status": {"status": "Created"}});
    aais.create(&PostParams::default(), &o)
        .await
        .expect("create");
    let o = aais
        .patch(
            "web-1-default-id1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"status": "Assigned"}})),
        )
        .await
        .expect("patch");
    assert_eq!(o.data["status"]["status"], "Assigned");
    assert_eq!(o.data["spec"]["pod"], "web-1");
}

#[tokio::test]
async fn finalizers_delay_deletion_until_removed() {
    let (_server, client) = setup().await;
    let ids: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "default", &common::azure_identity());
    let mut o = identity("id1", "c1");
    o.metadata.finalizers = Some(vec!["podid.test/keep".into()]);
    let created = ids
        .create(&PostParams::default(), &o)
        .await
        .expect("create");
    let mut events = ids
        .watch(
            &WatchParams::default(),
            created.metadata.resource_version.as_deref().expect("rv"),
        )
        .await
        .expect("watch")
        .boxed();

    ids.delete("id1", &DeleteParams::default())
        .await
        .expect("delete");
    let still = ids.get("id1").await.expect("still there");
    assert!(still.metadata.deletion_timestamp.is_some());

    // A stale-uid precondition is refused.
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some("other".into()),
            resource_version: None,
        }),
        ..Default::default()
    };
    assert_eq!(
        status(ids.delete("id1", &dp).await.expect_err("precondition")).code,
        409
    );

    ids.patch(
        "id1",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .expect("drop finalizers");
    wait_for("removal", WAIT, || async {
        ids.get_opt("id1").await.expect("get").is_none()
    })
    .await;

    let mut kinds = Vec::new();
    // Removing the last finalizer deletes at once: one DELETED, no MODIFIED in between.
    let deadline = tokio::time::Instant::now() + WAIT;
    while kinds.len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "events in time");
        match tokio::time::timeout(WAIT, events.try_next())
            .await
            .expect("in time")
            .expect("ok")
            .expect("event")
        {
            WatchEvent::Modified(o) => {
                kinds.push(("MODIFIED", o.metadata.deletion_timestamp.is_some()))
            }
            WatchEvent::Deleted(o) => {
                kinds.push(("DELETED", o.metadata.deletion_timestamp.is_some()))
            }
            WatchEvent::Bookmark(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(kinds, [("MODIFIED", true), ("DELETED", true)]);
}

#[tokio::test]
async fn raw_errors_are_status_objects() {
    let (server, _client) = setup().await;
    let http = common::admin_http(&server);
    let url = |p: &str| format!("{}{p}", server.url());

    let r = http
        .put(url("/api/v1/namespaces/default/pods"))
        .body("{}")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 405);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(
        (
            v["kind"].as_str(),
            v["status"].as_str(),
            v["reason"].as_str(),
            v["code"].as_u64()
        ),
        (
            Some("Status"),
            Some("Failure"),
            Some("MethodNotAllowed"),
            Some(405)
        )
    );

    let r = http
        .post(url("/api/v1/namespaces/default/pods"))
        .body("not json")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<serde_json::Value>().await.expect("json")["reason"],
        "BadRequest"
    );

    let r = http
        .get(url("/apis/nope.example/v1/things"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<serde_json::Value>().await.expect("json")["reason"],
        "NotFound"
    );

    server
        .create_json(
            "/api/v1/namespaces/default/configmaps",
            json!({"metadata": {"name": "c"}}),
        )
        .expect("create");
    let r = http
        .patch(url("/api/v1/namespaces/default/configmaps/c"))
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 415);

    let r = http
        .post(url("/api/v1/namespaces/default/pods"))
        .json(&json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", "namespace": "other"}}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400, "namespace in body must match the path");
}

#[tokio::test]
async fn server_side_apply_conflicts_between_field_managers() {
    let (_server, client) = setup().await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let lease = |holder: &str| {
        Patch::Apply(
            json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "l"}, "spec": {"holderIdentity": holder}}),
        )
    };
    leases
        .patch("l", &PatchParams::apply("a"), &lease("a"))
        .await
        .expect("a creates");
    // The same value from another manager is shared, not a conflict.
    leases
        .patch("l", &PatchParams::apply("b"), &lease("a"))
        .await
        .expect("same value");
    let e = status(
        leases
            .patch("l", &PatchParams::apply("c"), &lease("c"))
            .await
            .expect_err("conflict"),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    assert!(
        e.message
            .starts_with("Apply failed with 1 conflict: conflict with \"")
            && e.message.ends_with(".spec.holderIdentity"),
        "{}",
        e.message
    );
    let l = leases
        .patch("l", &PatchParams::apply("c").force(), &lease("c"))
        .await
        .expect("forced");
    assert_eq!(l.spec.and_then(|s| s.holder_identity).as_deref(), Some("c"));
    // Ownership moved: now a's apply conflicts.
    let e = status(
        leases
            .patch("l", &PatchParams::apply("a"), &lease("a"))
            .await
            .expect_err("a lost it"),
    );
    assert!(e.message.contains("conflict with \"c\""), "{}", e.message);
    // Plain patches and updates take no ownership and never conflict.
    leases
        .patch(
            "l",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"holderIdentity": "m"}})),
        )
        .await
        .expect("merge patch");
}
