//! ImdsSource and the node-wide IMDS budget against a counting in-test IMDS.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{FakeUpstream, Reply, imds_body};
use podid_broker::{
    BrokerConfig, BrokerError, HttpTimeouts, IdentitySpec, ImdsConfig, ImdsLimiter, ImdsSource,
    LimiterConfig, SourceKind, Sources, SystemClock, TokenBroker,
};
use podid_imds::unix_seconds;

const CLIENT: &str = "00000000-0000-0000-0000-0000000000c1";
const VAULT: &str = "https://vault.azure.net";

fn far_expiry() -> u64 {
    unix_seconds(std::time::SystemTime::now()) + 3600
}

fn imds_config(upstream: &FakeUpstream) -> ImdsConfig {
    ImdsConfig {
        endpoint: upstream.base_url(),
        retry_base: Duration::from_millis(10),
        ..ImdsConfig::default()
    }
}

fn broker_with(config: ImdsConfig, limiter: LimiterConfig) -> TokenBroker {
    let limiter = Arc::new(ImdsLimiter::new(limiter));
    let source = ImdsSource::new(config, limiter, Arc::new(SystemClock)).expect("source");
    let source = Arc::new(source);
    TokenBroker::new(
        BrokerConfig::default(),
        Sources::all(source),
        Arc::new(SystemClock),
    )
}

fn managed(client_id: &str) -> Arc<IdentitySpec> {
    Arc::new(IdentitySpec::managed(client_id, ""))
}

#[tokio::test]
async fn requests_like_adal_and_parses_real_imds_body() {
    let upstream = FakeUpstream::start(|req| {
        let client_id = req
            .query_pairs()
            .into_iter()
            .find(|(k, _)| k == "client_id")
            .map(|(_, v)| v)
            .unwrap_or_default();
        Reply::json(200, imds_body("tok-imds", &client_id, VAULT, 1_900_000_000))
    })
    .await;
    let broker = broker_with(imds_config(&upstream), LimiterConfig::default());
    let token = broker.token(&managed(CLIENT), VAULT).await.expect("token");
    assert_eq!(token.access_token(), "tok-imds");
    assert_eq!(token.expires_on, 1_900_000_000);
    assert_eq!(token.resource, VAULT);
    assert!(
        !format!("{token:?}").contains("tok-imds"),
        "Debug must redact the token"
    );

    let requests = upstream.requests();
    assert_eq!(requests.len(), 1);
    let req = &requests[0];
    assert_eq!(req.method, "GET");
    assert_eq!(req.path, "/metadata/identity/oauth2/token");
    assert_eq!(
        req.query_pairs(),
        vec![
            ("api-version".to_owned(), "2018-02-01".to_owned()),
            ("client_id".to_owned(), CLIENT.to_owned()),
            ("resource".to_owned(), VAULT.to_owned()),
        ]
    );
    assert_eq!(
        req.headers.get("metadata").map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
}

#[tokio::test]
async fn node_identity_by_resource_id_or_system_assigned() {
    let upstream =
        FakeUpstream::start(|_| Reply::json(200, imds_body("tok", "", VAULT, 1_900_000_000))).await;
    let broker = broker_with(imds_config(&upstream), LimiterConfig::default());
    let by_resource = Arc::new(IdentitySpec::managed("", "/subscriptions/s/id"));
    broker
        .token(&by_resource, VAULT)
        .await
        .expect("by resource id");
    broker
        .token(&managed(""), VAULT)
        .await
        .expect("system-assigned");
    let queries: Vec<_> = upstream
        .requests()
        .iter()
        .map(|r| r.query_pairs())
        .collect();
    let pair = |k: &str, v: &str| (k.to_owned(), v.to_owned());
    assert_eq!(
        queries,
        vec![
            vec![
                pair("api-version", "2018-02-01"),
                pair("msi_res_id", "/subscriptions/s/id"),
                pair("resource", VAULT)
            ],
            vec![pair("api-version", "2018-02-01"), pair("resource", VAULT)],
        ]
    );
}

#[tokio::test]
async fn client_errors_are_refused_with_imds_message() {
    let upstream = FakeUpstream::start(|_| {
        Reply::json(
            400,
            r#"{"error":"invalid_request","error_description":"Identity not found"}"#,
        )
    })
    .await;
    let broker = broker_with(imds_config(&upstream), LimiterConfig::default());
    let error = broker
        .token(&managed(CLIENT), VAULT)
        .await
        .expect_err("400");
    assert_eq!(error.status(), 403);
    match &error {
        BrokerError::Refused {
            source_kind,
            status,
            error,
            description,
            ..
        } => {
            assert_eq!(*source_kind, SourceKind::Imds);
            assert_eq!(*status, 400);
            assert_eq!(error, "invalid_request");
            assert_eq!(description, "Identity not found");
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    assert_eq!(upstream.calls(), 1, "4xx is not retried");
    assert_eq!(broker.stats().source(SourceKind::Imds).errors(), 1);
}

#[tokio::test]
async fn server_errors_are_retried_then_unavailable() {
    let upstream = FakeUpstream::start(|_| Reply::json(500, "{}")).await;
    let broker = broker_with(imds_config(&upstream), LimiterConfig::default());
    let error = broker
        .token(&managed(CLIENT), VAULT)
        .await
        .expect_err("500");
    assert_eq!(error.status(), 503);
    assert!(
        matches!(error, BrokerError::Unavailable { .. }),
        "{error:?}"
    );
    assert_eq!(upstream.calls(), 3, "one call plus two retries");
}

#[tokio::test]
async fn transient_failure_recovers_within_retries() {
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    let upstream = FakeUpstream::start(move |_| {
        if seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            Reply::json(503, "")
        } else {
            Reply::json(200, imds_body("tok-2", CLIENT, VAULT, far_expiry()))
        }
    })
    .await;
    let broker = broker_with(imds_config(&upstream), LimiterConfig::default());
    let token = broker
        .token(&managed(CLIENT), VAULT)
        .await
        .expect("second try");
    assert_eq!(token.access_token(), "tok-2");
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test]
async fn timeouts_are_unavailable() {
    let upstream = FakeUpstream::start(|_| {
        Reply::json(200, imds_body("late", CLIENT, VAULT, far_expiry()))
            .delayed(Duration::from_secs(5))
    })
    .await;
    let config = ImdsConfig {
        timeouts: HttpTimeouts {
            connect: Duration::from_millis(500),
            total: Duration::from_millis(200),
        },
        max_retries: 0,
        ..imds_config(&upstream)
    };
    let broker = broker_with(config, LimiterConfig::default());
    let started = tokio::time::Instant::now();
    let error = broker
        .token(&managed(CLIENT), VAULT)
        .await
        .expect_err("timeout");
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(error.status(), 503);
    assert!(error.to_string().contains("timed out"), "{error}");
}

#[tokio::test]
async fn connection_refused_is_unavailable() {
    // Bind and drop to find a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let config = ImdsConfig {
        endpoint: format!("http://127.0.0.1:{port}"),
        max_retries: 0,
        ..ImdsConfig::default()
    };
    let broker = broker_with(config, LimiterConfig::default());
    let error = broker
        .token(&managed(CLIENT), VAULT)
        .await
        .expect_err("refused");
    assert_eq!(error.status(), 503);
    assert!(error.to_string().contains("connection failed"), "{error}");
}

#[tokio::test]
async fn throttling_pauses_the_node_budget() {
    let upstream = FakeUpstream::start(|_| {
        Reply::json(429, r#"{"error":"too_many_requests"}"#).header("retry-after", "30")
    })
    .await;
    let limiter = LimiterConfig {
        max_wait: Duration::from_millis(300),
        ..LimiterConfig::default()
    };
    let broker = broker_with(imds_config(&upstream), limiter);
    let error = broker.token(&managed("a"), VAULT).await.expect_err("429");
    assert_eq!(error.status(), 503);
    assert_eq!(error.retry_after(), Some(Duration::from_secs(30)));
    assert_eq!(upstream.calls(), 1, "429 is not retried inside the source");
    // Every other identity now waits for the pause, which exceeds max_wait: fail fast, no call.
    let started = tokio::time::Instant::now();
    let error = broker
        .token(&managed("b"), VAULT)
        .await
        .expect_err("paused");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(error.to_string().contains("budget"), "{error}");
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flood_of_distinct_keys_stays_within_imds_budget() {
    let upstream = FakeUpstream::start(|req| {
        let resource = req
            .query_pairs()
            .into_iter()
            .find(|(k, _)| k == "resource")
            .map(|(_, v)| v)
            .unwrap_or_default();
        Reply::json(200, imds_body("t", CLIENT, &resource, far_expiry()))
            .delayed(Duration::from_millis(120))
    })
    .await;
    let limiter = LimiterConfig {
        max_wait: Duration::from_secs(20),
        ..LimiterConfig::default()
    };
    let broker = broker_with(imds_config(&upstream), limiter);
    let mut tasks = Vec::new();
    for i in 0..50 {
        let broker = broker.clone();
        tasks.push(tokio::spawn(async move {
            let identity = managed(&format!("client-{}", i % 10));
            broker
                .token(&identity, &format!("https://r{i}.example"))
                .await
        }));
    }
    for task in tasks {
        task.await.expect("task").expect("token within budget");
    }
    assert_eq!(upstream.calls(), 50);
    assert!(
        upstream.max_inflight() <= 5,
        "in flight: {}",
        upstream.max_inflight()
    );
    assert_eq!(
        upstream.max_inflight(),
        5,
        "the flood must reach the concurrency limit"
    );
    let per_second = upstream.max_in_window(Duration::from_secs(1));
    assert!(per_second <= 20, "{per_second} calls within one second");
    assert!(
        per_second >= 15,
        "the limiter must not be needlessly slow: {per_second}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn budget_waiters_fail_instead_of_hanging() {
    let upstream = FakeUpstream::start(|_| {
        Reply::json(200, imds_body("t", CLIENT, VAULT, far_expiry()))
            .delayed(Duration::from_secs(2))
    })
    .await;
    let limiter = LimiterConfig {
        max_wait: Duration::from_millis(300),
        ..LimiterConfig::default()
    };
    let broker = broker_with(imds_config(&upstream), limiter);
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..12 {
        let broker = broker.clone();
        tasks.push(tokio::spawn(async move {
            let failed_at = tokio::time::Instant::now();
            let result = broker.token(&managed(&format!("c{i}")), VAULT).await;
            (result, failed_at.elapsed())
        }));
    }
    let mut ok = 0;
    let mut budget_errors = 0;
    for task in tasks {
        let (result, elapsed) = task.await.expect("task");
        match result {
            Ok(_) => ok += 1,
            Err(error) => {
                assert_eq!(error.status(), 503);
                assert!(error.to_string().contains("budget"), "{error}");
                assert!(elapsed < Duration::from_millis(1000), "waited {elapsed:?}");
                assert_eq!(error.retry_after(), Some(Duration::from_secs(1)));
                budget_errors += 1;
            }
        }
    }
    assert_eq!(ok, 5, "five calls fit the concurrency budget");
    assert_eq!(budget_errors, 7);
    assert!(upstream.max_inflight() <= 5);
    assert!(started.elapsed() < Duration::from_secs(10));
}
