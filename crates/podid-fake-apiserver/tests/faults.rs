//! Fault hooks and the request log.

mod common;

use common::{pod, setup, status, wait_for};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use podid_fake_apiserver::{FaultKind, FaultMatch};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn next_n_matching_requests_fail_with_429_then_500() {
    let (server, client) = setup().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let faults = server.faults();
    faults.fail_next(
        2,
        FaultKind::TooManyRequests {
            retry_after_secs: 1,
        },
        FaultMatch::path("/pods").with_verb("list"),
    );
    faults.fail_next(
        1,
        FaultKind::InternalError,
        FaultMatch::path("/pods").with_method("POST"),
    );

    // A get does not match the list rule.
    assert_eq!(status(pods.get("nope").await.expect_err("404")).code, 404);
    // kube's client retries 429 after Retry-After: the list succeeds, late.
    let t = Instant::now();
    pods.list(&ListParams::default())
        .await
        .expect("list succeeds after the throttled tries");
    assert!(
        t.elapsed() >= Duration::from_secs(1),
        "Retry-After honoured: {:?}",
        t.elapsed()
    );

    let e = status(
        pods.create(&PostParams::default(), &pod("a", &[], None))
            .await
            .expect_err("500"),
    );
    assert_eq!((e.code, e.reason.as_str()), (500, "InternalError"));
    pods.create(&PostParams::default(), &pod("a", &[], None))
        .await
        .expect("then create works");

    // The raw response carries Retry-After.
    faults.fail_next(
        1,
        FaultKind::TooManyRequests {
            retry_after_secs: 7,
        },
        FaultMatch::any(),
    );
    let r = reqwest::get(format!("{}/api/v1/namespaces/default/pods", server.url()))
        .await
        .expect("send");
    assert_eq!(r.status(), 429);
    assert_eq!(
        r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
        Some("7")
    );
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(
        (
            body["reason"].as_str(),
            body["details"]["retryAfterSeconds"].as_u64()
        ),
        (Some("TooManyRequests"), Some(7))
    );

    // The log has verb, path, query and code of every request, never a body.
    let log = faults.requests();
    let lists: Vec<_> = log
        .iter()
        .filter(|r| r.verb == "list" && r.path == "/api/v1/namespaces/default/pods")
        .map(|r| r.code)
        .collect();
    assert_eq!(lists, [429, 429, 200, 429]);
    assert_eq!(faults.count("create", "/pods"), 2);
    assert_eq!(faults.count("get", "/pods/nope"), 1);
    faults.clear_log();
    pods.list(&ListParams::default().labels("app=web"))
        .await
        .expect("list");
    let log = faults.requests();
    assert_eq!(log.len(), 1);
    assert!(
        log[0].query.contains("labelSelector=app%3Dweb"),
        "{:?}",
        log[0]
    );
}

#[tokio::test]
async fn delay_slows_every_response() {
    let (server, client) = setup().await;
    let pods: Api<Pod> = Api::namespaced(client, "default");
    pods.list(&ListParams::default())
        .await
        .expect("warm up the connection");
    server.faults().set_delay(Duration::from_millis(300));
    let t = Instant::now();
    pods.list(&ListParams::default()).await.expect("list");
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    server.faults().set_delay(Duration::ZERO);
}

#[tokio::test]
async fn watcher_recovers_from_failing_watches() {
    let (server, client) = setup().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let (reader, writer) = reflector::store::<Pod>();
    let api = pods.clone();
    let task = tokio::spawn(async move {
        reflector(
            writer,
            watcher(api, watcher::Config::default()).default_backoff(),
        )
        .applied_objects()
        .for_each(|_| async {})
        .await;
    });
    tokio::time::timeout(WAIT, reader.wait_until_ready())
        .await
        .expect("ready")
        .expect("writer");
    server.faults().fail_next(
        3,
        FaultKind::InternalError,
        FaultMatch::path("/pods").with_verb("watch"),
    );
    server.faults().drop_watches();
    pods.create(&PostParams::default(), &pod("late", &[], None))
        .await
        .expect("create");
    // kube's default backoff waits about 0.8 + 1.6 + 3.2 s after three failures, each up to
    // doubled by jitter: allow well over the worst case (11.2 s) instead of the usual WAIT.
    wait_for("the pod after failed watches", WAIT * 4, || async {
        reader
            .state()
            .iter()
            .any(|p| p.metadata.name.as_deref() == Some("late"))
    })
    .await;
    let failed = server
        .faults()
        .requests()
        .iter()
        .filter(|r| r.verb == "watch" && r.code == 500)
        .count();
    assert_eq!(failed, 3);
    task.abort();
}
