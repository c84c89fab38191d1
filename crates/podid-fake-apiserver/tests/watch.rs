//! Watches, reflectors, dropped connections and 410 relists through kube's real runtime.

mod common;

use common::{pod, setup, wait_for};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

fn names(reader: &reflector::Store<Pod>) -> Vec<String> {
    let mut v: Vec<String> = reader
        .state()
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    v.sort();
    v
}

/// Runs a reflector over `api` with `config`; returns its reader and the task.
fn run_reflector(
    api: Api<Pod>,
    config: watcher::Config,
) -> (reflector::Store<Pod>, tokio::task::JoinHandle<()>) {
    let (reader, writer) = reflector::store();
    let task = tokio::spawn(async move {
        reflector(writer, watcher(api, config))
            .applied_objects()
            .for_each(|_| async {})
            .await;
    });
    (reader, task)
}

#[tokio::test]
async fn reflector_converges_and_follows_changes() {
    for streaming in [false, true] {
        let (server, client) = setup().await;
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        pods.create(&PostParams::default(), &pod("before", &[], None))
            .await
            .expect("create");
        let config = if streaming {
            watcher::Config::default().streaming_lists()
        } else {
            watcher::Config::default()
        };
        let (reader, task) = run_reflector(pods.clone(), config);
        tokio::time::timeout(WAIT, reader.wait_until_ready())
            .await
            .expect("ready in time")
            .expect("writer alive");
        assert_eq!(names(&reader), ["before"]);
        pods.create(&PostParams::default(), &pod("after", &[], None))
            .await
            .expect("create");
        pods.delete("before", &Default::default())
            .await
            .expect("delete");
        wait_for("reflector to see after and not before", WAIT, || async {
            names(&reader) == ["after"]
        })
        .await;
        if streaming {
            let q: Vec<_> = server
                .faults()
                .requests()
                .into_iter()
                .filter(|r| r.verb == "watch")
                .collect();
            assert!(q[0].query.contains("sendInitialEvents=true"), "{q:?}");
            assert_eq!(server.faults().count("list", "/pods"), 0);
        }
        task.abort();
    }
}

#[tokio::test]
async fn watcher_survives_dropped_watches() {
    let (server, client) = setup().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let (reader, task) = run_reflector(pods.clone(), watcher::Config::default());
    tokio::time::timeout(WAIT, reader.wait_until_ready())
        .await
        .expect("ready")
        .expect("writer");
    pods.create(&PostParams::default(), &pod("a", &[], None))
        .await
        .expect("create");
    wait_for("a", WAIT, || async { names(&reader) == ["a"] }).await;
    let watches_before = server.faults().count("watch", "/pods");
    server.faults().drop_watches();
    pods.create(&PostParams::default(), &pod("b", &[], None))
        .await
        .expect("create");
    wait_for("b after the drop", WAIT, || async {
        names(&reader) == ["a", "b"]
    })
    .await;
    wait_for("a new watch", WAIT, || async {
        server.faults().count("watch", "/pods") > watches_before
    })
    .await;
    // The resumed watch continued from a resourceVersion: no relist was needed.
    assert_eq!(server.faults().count("list", "/pods"), 1);
    task.abort();
}

#[tokio::test]
async fn watcher_relists_after_compaction_gives_410() {
    let (server, client) = setup().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    // No bookmarks: the watcher's resourceVersion stays at its last pod event.
    let (reader, task) =
        run_reflector(pods.clone(), watcher::Config::default().disable_bookmarks());
    tokio::time::timeout(WAIT, reader.wait_until_ready())
        .await
        .expect("ready")
        .expect("writer");
    pods.create(&PostParams::default(), &pod("a", &[], None))
        .await
        .expect("create");
    wait_for("a", WAIT, || async { names(&reader) == ["a"] }).await;
    assert_eq!(server.faults().count("list", "/pods"), 1);

    // Move the global version past the watcher's, forget history, cut the stream.
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "bump"}})).expect("cm");
    cms.create(&PostParams::default(), &cm).await.expect("bump");
    server.faults().compact();
    server.faults().drop_watches();

    wait_for("a relist after 410", WAIT, || async {
        server.faults().count("list", "/pods") >= 2
    })
    .await;
    pods.create(&PostParams::default(), &pod("b", &[], None))
        .await
        .expect("create");
    wait_for("b after the relist", WAIT, || async {
        names(&reader) == ["a", "b"]
    })
    .await;
    task.abort();
}

/// A watcher that stops reading while the server moves on is closed, as kube-apiserver closes
/// an unresponsive watcher, never sent `410`: it resumes from the last version it saw, which
/// its kind's own window still holds however many changes other kinds made meanwhile.
#[tokio::test]
async fn a_watcher_that_falls_behind_is_closed_and_resumes_without_410() {
    let (server, client) = setup().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let a = pods
        .create(&PostParams::default(), &pod("a", &[], None))
        .await
        .expect("create");
    let from = a.metadata.resource_version.expect("rv");
    let mut stream = pods
        .watch(&WatchParams::default().disable_bookmarks(), &from)
        .await
        .expect("watch")
        .boxed();
    // More changes than the server's fan-out buffers while the watch is not read (this test's
    // runtime has one thread: the server's watch task does not run during the loop).
    for i in 0..20_000 {
        server
            .create_json(
                "/api/v1/namespaces/default/configmaps",
                json!({"metadata": {"name": format!("cm-{i}")}}),
            )
            .expect("configmap");
    }
    pods.create(&PostParams::default(), &pod("b", &[], None))
        .await
        .expect("create");
    loop {
        match tokio::time::timeout(WAIT, stream.try_next())
            .await
            .expect("the lagging watch ends in time")
            .expect("ok")
        {
            Some(WatchEvent::Error(status)) => panic!("lagging watcher got {status:?}"),
            Some(_) => {}
            None => break,
        }
    }
    let mut resumed = pods
        .watch(&WatchParams::default().disable_bookmarks(), &from)
        .await
        .expect("watch")
        .boxed();
    match tokio::time::timeout(WAIT, resumed.try_next())
        .await
        .expect("in time")
        .expect("ok")
    {
        Some(WatchEvent::Added(p)) => assert_eq!(p.metadata.name.as_deref(), Some("b")),
        other => panic!("expected b replayed, got {other:?}"),
    }
}

#[tokio::test]
async fn raw_watch_from_expired_version_gets_410_status() {
    let (server, client) = setup().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let p = pods
        .create(&PostParams::default(), &pod("a", &[], None))
        .await
        .expect("create");
    let old = p.metadata.resource_version.expect("rv");
    pods.create(&PostParams::default(), &pod("b", &[], None))
        .await
        .expect("create");
    server.faults().compact();
    let mut s = pods
        .watch(&WatchParams::default(), &old)
        .await
        .expect("watch")
        .boxed();
    let ev = tokio::time::timeout(WAIT, s.try_next())
        .await
        .expect("in time")
        .expect("ok")
        .expect("one event");
    match ev {
        WatchEvent::Error(st) => {
            assert_eq!((st.code, st.reason.as_str()), (410, "Expired"));
            assert!(
                st.message.starts_with("too old resource version"),
                "{}",
                st.message
            );
        }
        other => panic!("expected an error event, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(WAIT, s.try_next())
            .await
            .expect("in time")
            .expect("ok")
            .is_none(),
        "stream ends"
    );
}

#[tokio::test]
async fn watch_selectors_turn_moves_into_added_and_deleted() {
    let (_server, client) = setup().await;
    let pods: Api<Pod> = Api::all(client.clone());
    let in_ns: Api<Pod> = Api::namespaced(client.clone(), "app");
    let mut s = pods
        .watch(&WatchParams::default().fields("spec.nodeName=n1"), "0")
        .await
        .expect("watch")
        .boxed();
    in_ns
        .create(&PostParams::default(), &pod("p", &[], None))
        .await
        .expect("create unscheduled");
    let bind = |node: &str| Patch::Merge(json!({"spec": {"nodeName": node}}));
    in_ns
        .patch("p", &PatchParams::default(), &bind("n1"))
        .await
        .expect("schedule on n1");
    in_ns
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
        )
        .await
        .expect("label");
    in_ns
        .patch("p", &PatchParams::default(), &bind("n2"))
        .await
        .expect("move to n2");
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen.len() < 3 {
        assert!(tokio::time::Instant::now() < deadline, "events in time");
        let ev = tokio::time::timeout(WAIT, s.try_next())
            .await
            .expect("in time")
            .expect("ok")
            .expect("event");
        match ev {
            WatchEvent::Added(p) => seen.push(("ADDED", p.spec.and_then(|s| s.node_name))),
            WatchEvent::Modified(p) => seen.push(("MODIFIED", p.spec.and_then(|s| s.node_name))),
            WatchEvent::Deleted(p) => seen.push(("DELETED", p.spec.and_then(|s| s.node_name))),
            WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(e) => panic!("unexpected error {e:?}"),
        }
    }
    let n = |s: &str| Some(s.to_string());
    assert_eq!(
        seen,
        [
            ("ADDED", n("n1")),
            ("MODIFIED", n("n1")),
            ("DELETED", n("n2"))
        ]
    );
}

#[tokio::test]
async fn watch_ends_after_timeout_seconds_and_sends_bookmarks() {
    let (_server, client) = setup().await;
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let started = tokio::time::Instant::now();
    let mut s = pods
        .watch(&WatchParams::default().timeout(2), "0")
        .await
        .expect("watch")
        .boxed();
    let mut bookmarks = 0;
    while let Some(ev) = tokio::time::timeout(WAIT, s.try_next())
        .await
        .expect("ends in time")
        .expect("ok")
    {
        if let WatchEvent::Bookmark(b) = ev {
            assert!(b.metadata.resource_version.parse::<u64>().is_ok());
            bookmarks += 1;
        }
    }
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert!(bookmarks >= 1, "a bookmark within 2 s");
}
