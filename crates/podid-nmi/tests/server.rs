//! The IMDS server in-process on 127.0.0.1:0 with a fake token provider; the test is the pod
//! (its address 127.0.0.1 is indexed as pod `app/web`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use podid_api::{AssignedIdentityState, AzureIdentity, AzurePodIdentityException};
use podid_broker::{BrokerError, SourceKind};
use podid_nmi::health::Health;
use podid_nmi::metrics::Metrics;
use podid_nmi::server::{NmiState, serve};
use podid_nmi::state::Matcher;
use podid_select::matching::{MatchOptions, NodeIdentity};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn token_success_has_the_imds_body() {
    let nmi = start(&Objects::bound(
        "app",
        CLIENT_A,
        AssignedIdentityState::Assigned,
    ))
    .await;
    let reply = request(nmi.addr, TOKEN_PATH, META).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.headers["content-type"], "application/json");
    let body = reply.json();
    assert_eq!(body["access_token"], format!("token-for-{CLIENT_A}"));
    assert_eq!(body["resource"], "https://vault.azure.net");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["client_id"], CLIENT_A);
    let expires_in: u64 = body["expires_in"].as_str().unwrap().parse().unwrap();
    assert!((3590..=3600).contains(&expires_in), "{expires_in}");
    let expires_on: u64 = body["expires_on"].as_str().unwrap().parse().unwrap();
    assert!(expires_on >= now_secs() + 3590);
    assert_eq!(
        nmi.provider.asked(),
        vec![Asked::Identity(CLIENT_A.to_owned())]
    );
    // Rust SDK: lower-case header name.
    let reply = request(nmi.addr, TOKEN_PATH, &[("metadata", "true")]).await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn missing_or_wrong_metadata_header_is_400() {
    let nmi = start(&Objects::bound(
        "app",
        CLIENT_A,
        AssignedIdentityState::Assigned,
    ))
    .await;
    for headers in [&[][..], &[("Metadata", "True")][..]] {
        let reply = request(nmi.addr, TOKEN_PATH, headers).await;
        assert_eq!(reply.status, 400);
        assert_eq!(
            reply.json()["error_description"],
            "Required metadata header not specified"
        );
    }
    assert!(nmi.provider.asked().is_empty());
}

#[tokio::test]
async fn unknown_pod_is_500() {
    let nmi = start_with(
        &Objects::bound("app", CLIENT_A, AssignedIdentityState::Assigned),
        &[("aadpodidbinding", "kv")],
        |_| {},
        MatchOptions::default(),
    )
    .await;
    // Move the pod to another address: 127.0.0.1 now belongs to nobody.
    nmi.state
        .pods
        .apply(&pod("app", "web", "10.1.2.3", &[("aadpodidbinding", "kv")]));
    let reply = request(nmi.addr, TOKEN_PATH, META).await;
    assert_eq!(reply.status, 500);
    assert_eq!(reply.json()["error_description"], "pod list is empty");
    // Two pods on one address: ambiguous, fail closed.
    nmi.state
        .pods
        .apply(&pod("app", "a", "127.0.0.1", &[("aadpodidbinding", "kv")]));
    nmi.state
        .pods
        .apply(&pod("app", "b", "127.0.0.1", &[("aadpodidbinding", "kv")]));
    let reply = request(nmi.addr, TOKEN_PATH, META).await;
    assert_eq!(reply.status, 500);
    assert!(nmi.provider.asked().is_empty());
}

#[tokio::test]
async fn unbound_pod_gets_a_final_400_at_once() {
    let nmi = start_with(&Objects::empty(), &[], |_| {}, MatchOptions::default()).await;
    let started = Instant::now();
    let reply = request(nmi.addr, TOKEN_PATH, META).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // The real IMDS's answer for an identity the VM lacks: SDKs stop at once instead of
    // retrying a 404 for 20-100 s.
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"], "invalid_request");
    assert_eq!(
        reply.json()["error_description"],
        "no azure identity is bound to pod app/web"
    );
    assert!(nmi.provider.asked().is_empty());

    // Waiting cannot change the answer, so --set-retry-after-header leaves it final.
    let nmi = start_with(
        &Objects::empty(),
        &[],
        |o| o.errors.set_retry_after_header = true,
        MatchOptions::default(),
    )
    .await;
    let reply = request(nmi.addr, TOKEN_PATH, META).await;
    assert_eq!(reply.status, 400);
    assert!(!reply.headers.contains_key("retry-after"));

    // --not-found-for-final-refusals restores upstream's statuses.
    let nmi = start_with(
        &Objects::empty(),
        &[],
        |o| o.errors.not_found_for_final_refusals = true,
        MatchOptions::default(),
    )
    .await;
    assert_eq!(request(nmi.addr, TOKEN_PATH, META).await.status, 404);
    let nmi = start_with(
        &Objects::empty(),
        &[],
        |o| {
            o.errors.not_found_for_final_refusals = true;
            o.errors.set_retry_after_header = true;
        },
        MatchOptions::default(),
    )
    .await;
    let reply = request(nmi.addr, TOKEN_PATH, META).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.headers["retry-after"], "20");
}

#[tokio::test]
async fn wrong_client_id_never_gets_another_identity() {
    let nmi = start(&Objects::bound(
        "app",
        CLIENT_A,
        AssignedIdentityState::Assigned,
    ))
    .await;
    let started = Instant::now();
    let reply = request(
        nmi.addr,
        &format!("{TOKEN_PATH}&client_id={CLIENT_B}"),
        META,
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(reply.status, 400, "a final refusal");
    assert!(!reply.body.contains("token-for"));
    let reply = request(
        nmi.addr,
        &format!("{TOKEN_PATH}&object_id={CLIENT_A}"),
        META,
    )
    .await;
    assert_eq!(reply.status, 400);
    assert!(nmi.provider.asked().is_empty(), "no token was fetched");
    // Upper-cased client id still matches.
    let upper = CLIENT_A.to_ascii_uppercase();
    let reply = request(nmi.addr, &format!("{TOKEN_PATH}&client_id={upper}"), META).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["client_id"], CLIENT_A);
}

#[tokio::test]
async fn exception_pod_gets_node_identity() {
    let mut objects = Objects::empty();
    objects
        .exceptions
        .push(AzurePodIdentityException::for_pod_labels(
            "app",
            "ex",
            [("app".to_owned(), "mic".to_owned())],
        ));
    let nmi = start_with(&objects, &[("app", "MIC")], |_| {}, MatchOptions::default()).await;
    let reply = request(nmi.addr, TOKEN_PATH, META).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let reply = request(
        nmi.addr,
        &format!("{TOKEN_PATH}&client_id={CLIENT_B}"),
        META,
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["client_id"], CLIENT_B);
    assert_eq!(
        nmi.provider.asked(),
        vec![
            Asked::Node(NodeIdentity::SystemAssigned),
            Asked::Node(NodeIdentity::ClientId(CLIENT_B.to_owned()))
        ]
    );
    // Exception-path failures are 403, as upstream.
    *nmi.provider.fail.lock().unwrap() = Some(BrokerError::Unavailable {
        source_kind: SourceKind::Imds,
        client_id: String::new(),
        reason: "down".into(),
        retry_after: None,
    });
    let reply = request(nmi.addr, TOKEN_PATH, META).await;
    assert_eq!(reply.status, 403);
    assert!(
        reply.json()["error_description"]
            .as_str()
            .unwrap()
            .starts_with("failed to get service principal token, error:")
    );
}

#[tokio::test]
async fn broker_errors_map_to_403_and_503() {
    let nmi = start(&Objects::bound(
        "app",
        CLIENT_A,
        AssignedIdentityState::Assigned,
    ))
    .await;
    *nmi.provider.fail.lock().unwrap() = Some(BrokerError::Refused {
        source_kind: SourceKind::Imds,
        client_id: CLIENT_A.into(),
        status: 400,
        error: "invalid_request".into(),
        description: "Identity not found".into(),
    });
    assert_eq!(request(nmi.addr, TOKEN_PATH, META).await.status, 403);
    *nmi.provider.fail.lock().unwrap() = Some(BrokerError::Unavailable {
        source_kind: SourceKind::Imds,
        client_id: CLIENT_A.into(),
        reason: "connection refused".into(),
        retry_after: None,
    });
    assert_eq!(request(nmi.addr, TOKEN_PATH, META).await.status, 503);
}

#[tokio::test]
async fn namespaced_identity_in_another_namespace_is_a_final_refusal() {
    let mut objects = Objects::empty();
    objects.add(
        AzureIdentity::user_assigned("other", "id", &rid("id"), CLIENT_A).namespaced(),
        AssignedIdentityState::Assigned,
    );
    let nmi = start(&objects).await;
    let reply = request(nmi.addr, TOKEN_PATH, META).await;
    assert_eq!(reply.status, 400);
    // force_namespaced does the same for an unannotated identity.
    let nmi = start_with(
        &Objects::bound("other", CLIENT_A, AssignedIdentityState::Assigned),
        &[("aadpodidbinding", "kv")],
        |_| {},
        MatchOptions {
            force_namespaced: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(request(nmi.addr, TOKEN_PATH, META).await.status, 400);
    assert!(nmi.provider.asked().is_empty());
}

#[tokio::test]
async fn created_assignment_waits_until_assigned() {
    let nmi = start(&Objects::bound(
        "app",
        CLIENT_A,
        AssignedIdentityState::Created,
    ))
    .await;
    let addr = nmi.addr;
    let pending = tokio::spawn(async move { request(addr, TOKEN_PATH, META).await });
    // Wait until the request is parked on the matcher, then complete the assignment.
    tokio::time::timeout(TIMEOUT, async {
        while nmi.state.matcher.waiting() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the request waits for the assignment");
    assert!(!pending.is_finished());
    nmi.state.matcher.replace(
        Objects::bound("app", CLIENT_A, AssignedIdentityState::Assigned)
            .index(MatchOptions::default()),
    );
    let reply = pending.await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["client_id"], CLIENT_A);
}

#[tokio::test]
async fn created_assignment_wait_is_bounded() {
    let nmi = start_with(
        &Objects::bound("app", CLIENT_A, AssignedIdentityState::Created),
        &[("aadpodidbinding", "kv")],
        |o| o.pending_wait = Duration::from_millis(300),
        MatchOptions::default(),
    )
    .await;
    let started = Instant::now();
    let reply = request(nmi.addr, TOKEN_PATH, META).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(reply.status, 404);
    assert!(
        reply.json()["error_description"]
            .as_str()
            .unwrap()
            .contains("still in progress")
    );
}

#[tokio::test]
async fn host_token_is_proxied_unless_enabled() {
    let mut nmi = start(&Objects::bound(
        "app",
        CLIENT_A,
        AssignedIdentityState::Assigned,
    ))
    .await;
    let host = [("podns", "app"), ("podname", "web"), ("Metadata", "true")];
    let reply = request(
        nmi.addr,
        "/host/token?resource=https%3A%2F%2Fvault.azure.net",
        &host,
    )
    .await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.headers["x-imds"], "fake");
    let head = nmi.imds.recv().await.unwrap();
    assert!(head.starts_with("GET /host/token?"), "{head}");
    assert!(nmi.provider.asked().is_empty());

    let nmi = start_with(
        &Objects::bound("app", CLIENT_A, AssignedIdentityState::Assigned),
        &[("aadpodidbinding", "kv")],
        |o| o.enable_host_token = true,
        MatchOptions::default(),
    )
    .await;
    let reply = request(
        nmi.addr,
        "/host/token?resource=https%3A%2F%2Fvault.azure.net",
        &host[..2],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let body = reply.json();
    assert_eq!(body["clientid"], CLIENT_A);
    assert!(body["token"]["expires_in"].is_number());
    let reply = request(nmi.addr, "/host/token?resource=r", &[]).await;
    assert_eq!(reply.status, 400);
}

#[tokio::test]
async fn instance_metadata_block_and_passthrough() {
    let mut nmi = start(&Objects::empty()).await;
    let reply = request(
        nmi.addr,
        "/metadata/instance?api-version=2021-02-01",
        &[("Metadata", "true"), ("X-Forwarded-For", "6.6.6.6")],
    )
    .await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.body, "not found");
    let head = nmi.imds.recv().await.unwrap();
    assert!(
        head.starts_with("GET /metadata/instance?api-version=2021-02-01 HTTP/1.1"),
        "{head}"
    );
    let lower = head.to_ascii_lowercase();
    assert!(!lower.contains("x-forwarded-for"), "{head}");
    assert!(lower.contains("metadata: true"), "{head}");
    // Without the header, passthrough is refused before IMDS sees anything.
    let reply = request(nmi.addr, "/doesnotexist", &[]).await;
    assert_eq!(reply.status, 400);

    let nmi = start_with(
        &Objects::empty(),
        &[],
        |o| o.block_instance_metadata = true,
        MatchOptions::default(),
    )
    .await;
    let reply = request(nmi.addr, "/metadata/instance/compute", &[]).await;
    assert_eq!(reply.status, 403);
    assert_eq!(
        reply.json()["error_description"],
        "Request blocked by AAD Pod Identity NMI"
    );
}

#[tokio::test]
async fn passthrough_without_imds_is_500() {
    let nmi = start(&Objects::empty()).await;
    // A port nobody listens on.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let mut options = nmi.state.options.clone();
    options.metadata = dead;
    let state = Arc::new(NmiState::new(
        options,
        nmi.state.pods.clone(),
        nmi.state.matcher.clone(),
        nmi.provider.clone(),
        Arc::new(Metrics::new()),
        Arc::new(Health::default()),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, state, std::future::pending()));
    let reply = request(addr, "/x", META).await;
    assert_eq!(reply.status, 500);
}

#[tokio::test]
async fn oversized_headers_are_rejected_and_the_server_survives() {
    let nmi = start(&Objects::bound(
        "app",
        CLIENT_A,
        AssignedIdentityState::Assigned,
    ))
    .await;
    let big = "x".repeat(64 * 1024);
    let reply = request(
        nmi.addr,
        TOKEN_PATH,
        &[("Metadata", "true"), ("X-Big", &big)],
    )
    .await;
    assert_eq!(reply.status, 431);
    let many: Vec<(String, String)> = (0..200)
        .map(|i| (format!("X-H{i}"), "v".to_owned()))
        .collect();
    let refs: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let reply = request(nmi.addr, TOKEN_PATH, &refs).await;
    assert!(
        reply.status == 431 || reply.status == 400,
        "{}",
        reply.status
    );
    let reply = request(nmi.addr, TOKEN_PATH, META).await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn redirect_and_invalid_token_path() {
    let nmi = start(&Objects::empty()).await;
    let reply = request(nmi.addr, "//metadata/identity/oauth2/token?resource=x", &[]).await;
    assert_eq!(reply.status, 301);
    assert_eq!(
        reply.headers["location"],
        "/metadata/identity/oauth2/token?resource=x"
    );
    let reply = request(nmi.addr, "/metadata/identity\\oauth2/token", META).await;
    assert_eq!(reply.status, 400);
}

#[tokio::test]
async fn metrics_and_probes() {
    let nmi = start(&Objects::bound(
        "app",
        CLIENT_A,
        AssignedIdentityState::Assigned,
    ))
    .await;
    assert_eq!(request(nmi.addr, TOKEN_PATH, META).await.status, 200);
    nmi.state.pods.apply(&pod("app", "web", "10.9.9.9", &[]));
    assert_eq!(request(nmi.addr, TOKEN_PATH, META).await.status, 500);
    let reply = request(nmi.metrics, "/metrics", &[]).await;
    assert_eq!(reply.status, 200);
    let text = reply.body;
    for needle in [
        "aadpodidentity_nmi_operations_duration_seconds_bucket{namespace=\"app\",operation_type=\"token\",resource=\"https://vault.azure.net\",status_code=\"200\"",
        "aadpodidentity_imds_operations_duration_seconds_bucket{operation_type=\"adal_token_msi_userassignedid\"",
        "aadpodidentity_kubernetes_api_operations_errors_count{operation_type=\"get_pod_list\"} 1",
        "podid_nmi_attribution_failures_total{reason=\"not_found\"} 1",
        "podid_nmi_token_cache_hits_total",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    assert!(!text.contains("token-for-"), "no token in metrics");

    let reply = request(nmi.probes, "/healthz", &[]).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "Not Active"));
    assert_eq!(request(nmi.probes, "/readyz", &[]).await.status, 503);
    nmi.state.health.set_interception_installed(true);
    let reply = request(nmi.probes, "/healthz", &[]).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "Active"));
    assert_eq!(request(nmi.probes, "/readyz", &[]).await.status, 200);
}

#[tokio::test]
async fn unsynced_matcher_fails_closed() {
    let nmi = start(&Objects::bound(
        "app",
        CLIENT_A,
        AssignedIdentityState::Assigned,
    ))
    .await;
    let fresh = Matcher::new(MatchOptions::default());
    fresh.replace(
        Objects::bound("app", CLIENT_A, AssignedIdentityState::Assigned)
            .index(MatchOptions::default()),
    );
    let state = Arc::new(NmiState::new(
        nmi.state.options.clone(),
        nmi.state.pods.clone(),
        Arc::new(fresh),
        nmi.provider.clone(),
        Arc::new(Metrics::new()),
        Arc::new(Health::default()),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, state, std::future::pending()));
    assert_eq!(request(addr, TOKEN_PATH, META).await.status, 503);
    assert!(nmi.provider.asked().is_empty());
}

#[tokio::test]
async fn shutdown_stops_accepting_and_returns() {
    let mut nmi = start(&Objects::empty()).await;
    nmi.stop.take().unwrap().send(()).unwrap();
    tokio::time::timeout(TIMEOUT, nmi.done.take().unwrap())
        .await
        .expect("serve returns after shutdown")
        .unwrap();
    assert!(TcpStream::connect(nmi.addr).await.is_err());
}

/// Read until the server closes the connection; panics if it is still open after [`TIMEOUT`].
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt as _;
    let mut buf = Vec::new();
    tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut buf))
        .await
        .expect("the server closes the connection")
        .expect("read");
    buf
}

#[tokio::test]
async fn stalled_request_heads_and_idle_keep_alive_connections_are_closed() {
    use tokio::io::AsyncWriteExt as _;
    let deadline = Duration::from_millis(200);
    let nmi = start_with(
        &Objects::bound("app", CLIENT_A, AssignedIdentityState::Assigned),
        &[("aadpodidbinding", "kv")],
        |o| o.limits.header_read_timeout = deadline,
        MatchOptions::default(),
    )
    .await;

    // Half a request head, then nothing: closed without an answer.
    let mut stalled = TcpStream::connect(nmi.addr).await.unwrap();
    let started = Instant::now();
    stalled
        .write_all(
            b"GET /metadata/identity/oauth2/token?api-version=2018-02-01 HTTP/1.1\r\nHost: x\r\n",
        )
        .await
        .unwrap();
    assert!(read_until_closed(&mut stalled).await.is_empty());
    assert!(started.elapsed() >= deadline, "{:?}", started.elapsed());

    // A keep-alive request is answered, then the idle connection is closed.
    let mut idle = TcpStream::connect(nmi.addr).await.unwrap();
    idle.write_all(
        format!("GET {TOKEN_PATH} HTTP/1.1\r\nHost: x\r\nMetadata: true\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let started = Instant::now();
    let reply = parse_reply(&read_until_closed(&mut idle).await);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["client_id"], CLIENT_A);
    assert!(started.elapsed() >= deadline, "{:?}", started.elapsed());
}

#[tokio::test]
async fn an_answer_slower_than_the_idle_deadline_is_not_cut() {
    // The request waits for its assignment (700 ms) much longer than a connection may idle.
    let nmi = start_with(
        &Objects::bound("app", CLIENT_A, AssignedIdentityState::Created),
        &[("aadpodidbinding", "kv")],
        |o| {
            o.limits.header_read_timeout = Duration::from_millis(100);
            o.pending_wait = Duration::from_millis(700);
        },
        MatchOptions::default(),
    )
    .await;
    let started = Instant::now();
    let reply = request(nmi.addr, TOKEN_PATH, META).await;
    assert!(started.elapsed() >= Duration::from_millis(700));
    assert_eq!(reply.status, 404, "{}", reply.body);
    assert!(
        reply.json()["error_description"]
            .as_str()
            .unwrap()
            .contains("still in progress")
    );
}
