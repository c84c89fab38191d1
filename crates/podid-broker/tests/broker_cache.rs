//! Cache, single-flight, refresh margin, stale-if-error, invalidation and eviction, against a
//! counting in-test token source and a manual clock (no sleeping for luck).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use podid_broker::{
    BrokerConfig, BrokerError, FetchRequest, IdentitySpec, IdentityType, ManualClock, Secret,
    SourceFuture, SourceKind, Sources, Token, TokenBroker, TokenSource,
};
use tokio::sync::Semaphore;

const T0: u64 = 1_700_000_000;

#[derive(Debug)]
struct FakeSource {
    clock: Arc<ManualClock>,
    lifetime: u64,
    calls: AtomicUsize,
    /// When set, each call waits for one permit.
    gate: Option<Semaphore>,
    fail: Mutex<Option<BrokerError>>,
    requests: Mutex<Vec<(String, String, Option<String>)>>,
}

impl FakeSource {
    fn new(clock: Arc<ManualClock>, lifetime: u64) -> Self {
        Self {
            clock,
            lifetime,
            calls: AtomicUsize::new(0),
            gate: None,
            fail: Mutex::new(None),
            requests: Mutex::new(Vec::new()),
        }
    }

    fn gated(mut self) -> Self {
        self.gate = Some(Semaphore::new(0));
        self
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn fail_with(&self, error: Option<BrokerError>) {
        *self.fail.lock().expect("lock") = error;
    }
}

impl TokenSource for FakeSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Imds
    }

    fn fetch<'a>(&'a self, request: &'a FetchRequest) -> SourceFuture<'a> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            self.requests.lock().expect("lock").push((
                request.identity.client_id.clone(),
                request.resource.clone(),
                request.tenant.clone(),
            ));
            if let Some(gate) = &self.gate {
                gate.acquire().await.expect("gate open").forget();
            }
            if let Some(error) = self.fail.lock().expect("lock").clone() {
                return Err(error);
            }
            let now = podid_imds::unix_seconds(podid_broker::Clock::now(&*self.clock));
            Ok(Token::new(
                format!("tok-{n}"),
                request.resource.clone(),
                now + self.lifetime,
            ))
        })
    }
}

fn setup(config: BrokerConfig, lifetime: u64) -> (TokenBroker, Arc<FakeSource>, Arc<ManualClock>) {
    setup_with(config, |clock| FakeSource::new(clock, lifetime))
}

fn setup_with(
    config: BrokerConfig,
    make: impl FnOnce(Arc<ManualClock>) -> FakeSource,
) -> (TokenBroker, Arc<FakeSource>, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::at_unix(T0));
    let source = Arc::new(make(clock.clone()));
    let broker = TokenBroker::new(config, Sources::all(source.clone()), clock.clone());
    (broker, source, clock)
}

fn managed(client_id: &str) -> Arc<IdentitySpec> {
    Arc::new(IdentitySpec::managed(
        client_id,
        format!("/subscriptions/s/rg/{client_id}"),
    ))
}

/// Wait (bounded) until `condition` holds.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn unavailable(reason: &str) -> BrokerError {
    BrokerError::Unavailable {
        source_kind: SourceKind::Imds,
        client_id: "c".into(),
        reason: reason.into(),
        retry_after: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_concurrent_misses_make_one_upstream_call() {
    let (broker, source, _clock) = setup_with(BrokerConfig::default(), |clock| {
        FakeSource::new(clock, 3600).gated()
    });
    let identity = managed("c1");
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let broker = broker.clone();
        let identity = identity.clone();
        tasks.push(tokio::spawn(async move {
            broker.token(&identity, "https://vault.azure.net").await
        }));
    }
    let stats = broker.stats().clone();
    // A miss is counted before the request joins the flight: wait until all 99 followers have
    // joined, or the last one could find the slot already filled once the gate opens.
    eventually("all 100 requests to miss and 99 to join the flight", || {
        stats.misses() == 100 && stats.coalesced() == 99
    })
    .await;
    assert_eq!(source.calls(), 1);
    source.gate.as_ref().expect("gated").add_permits(1);
    for task in tasks {
        let token = task.await.expect("task").expect("token");
        assert_eq!(token.access_token(), "tok-1");
    }
    assert_eq!(source.calls(), 1, "exactly one upstream call");
    assert_eq!(broker.stats().source(SourceKind::Imds).calls(), 1);
    assert_eq!(broker.stats().coalesced(), 99);
    // And the next request is a hit.
    let token = broker
        .token(&identity, "https://vault.azure.net")
        .await
        .expect("hit");
    assert_eq!(token.access_token(), "tok-1");
    assert_eq!(broker.stats().hits(), 1);
    assert_eq!(source.calls(), 1);
}

#[tokio::test]
async fn keys_separate_identity_resource_and_tenant() {
    let (broker, source, _clock) = setup(BrokerConfig::default(), 3600);
    let a = managed("a");
    let b = managed("b");
    broker.token(&a, "r1").await.expect("a r1");
    broker.token(&a, "r2").await.expect("a r2");
    broker.token(&b, "r1").await.expect("b r1");
    // Case of the client id does not matter.
    broker.token(&managed("A"), "r1").await.expect("A r1");
    assert_eq!(source.calls(), 3);

    let mut sp = IdentitySpec::client_secret("sp", "Tenant-1", Secret::new("s3cret"));
    sp.auxiliary_tenant_ids = vec!["aux-1".into(), "aux-2".into()];
    let sp = Arc::new(sp);
    let tokens = broker.tokens(&sp, "r1").await.expect("multi-tenant");
    assert_eq!(tokens.len(), 3);
    let requests = source.requests.lock().expect("lock").clone();
    let tenants: Vec<_> = requests[3..].iter().map(|r| r.2.clone()).collect();
    assert_eq!(
        tenants,
        vec![
            Some("tenant-1".to_owned()),
            Some("aux-1".to_owned()),
            Some("aux-2".to_owned())
        ]
    );
    broker.tokens(&sp, "r1").await.expect("cached");
    assert_eq!(source.calls(), 6);
}

#[tokio::test]
async fn serves_until_margin_then_refreshes_in_background() {
    let config = BrokerConfig {
        refresh_margin: Duration::from_secs(300),
        ..BrokerConfig::default()
    };
    let (broker, source, clock) = setup(config, 3600);
    let id = managed("c");
    assert_eq!(
        broker.token(&id, "r").await.expect("miss").access_token(),
        "tok-1"
    );

    clock.advance(Duration::from_secs(3600 - 301));
    assert_eq!(
        broker.token(&id, "r").await.expect("hit").access_token(),
        "tok-1"
    );
    assert_eq!(source.calls(), 1, "outside the margin: no upstream call");

    clock.advance(Duration::from_secs(2));
    // Inside the margin: the cached token is served at once and one refresh starts.
    assert_eq!(
        broker.token(&id, "r").await.expect("hit").access_token(),
        "tok-1"
    );
    eventually("background refresh", || source.calls() == 2).await;
    assert_eq!(broker.stats().background_refreshes(), 1);
    let mut latest = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while latest != "tok-2" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "refreshed token never cached"
        );
        latest = broker
            .token(&id, "r")
            .await
            .expect("hit")
            .access_token()
            .to_owned();
        tokio::task::yield_now().await;
    }
    assert_eq!(source.calls(), 2, "exactly one refresh");
    assert_eq!(broker.stats().misses(), 1);
}

#[tokio::test]
async fn short_lived_tokens_refresh_at_half_life() {
    let (broker, source, clock) = setup(BrokerConfig::default(), 120);
    let id = managed("c");
    broker.token(&id, "r").await.expect("miss");
    clock.advance(Duration::from_secs(59));
    broker.token(&id, "r").await.expect("hit");
    assert_eq!(
        source.calls(),
        1,
        "a 5 min margin must not make a 2 min token always stale"
    );
    clock.advance(Duration::from_secs(2));
    broker.token(&id, "r").await.expect("hit");
    eventually("refresh", || source.calls() == 2).await;
}

#[tokio::test]
async fn never_serves_an_expired_token() {
    let (broker, source, clock) = setup(BrokerConfig::default(), 3600);
    let id = managed("c");
    broker.token(&id, "r").await.expect("miss");
    source.fail_with(Some(unavailable("imds down")));
    clock.advance(Duration::from_secs(3600));
    let error = broker
        .token(&id, "r")
        .await
        .expect_err("expired and upstream down");
    assert_eq!(error.status(), 503);
    assert_eq!(source.calls(), 2);
    assert_eq!(broker.stats().source(SourceKind::Imds).errors(), 1);
    // A failed miss is not cached: the next request tries again.
    source.fail_with(None);
    assert_eq!(
        broker
            .token(&id, "r")
            .await
            .expect("recovered")
            .access_token(),
        "tok-3"
    );
}

#[tokio::test]
async fn stale_if_error_serves_valid_token_and_backs_off() {
    let config = BrokerConfig {
        refresh_margin: Duration::from_secs(300),
        refresh_retry: Duration::from_secs(10),
        ..BrokerConfig::default()
    };
    let (broker, source, clock) = setup(config, 3600);
    let id = managed("c");
    broker.token(&id, "r").await.expect("miss");
    source.fail_with(Some(BrokerError::Refused {
        source_kind: SourceKind::Imds,
        client_id: "c".into(),
        status: 400,
        error: "invalid_request".into(),
        description: "Identity not found".into(),
    }));
    clock.advance(Duration::from_secs(3600 - 100));
    assert_eq!(
        broker
            .token(&id, "r")
            .await
            .expect("stale hit")
            .access_token(),
        "tok-1"
    );
    let stats = broker.stats().clone();
    eventually("failed refresh", || {
        stats.source(SourceKind::Imds).errors() == 1
    })
    .await;
    // Upstream down, token still valid: keep serving it, without hammering upstream.
    for _ in 0..20 {
        assert_eq!(
            broker.token(&id, "r").await.expect("stale").access_token(),
            "tok-1"
        );
    }
    assert_eq!(source.calls(), 2);
    assert!(broker.stats().stale_served() >= 20);
    // After the retry interval the next hit tries again, and recovers.
    source.fail_with(None);
    clock.advance(Duration::from_secs(11));
    assert_eq!(
        broker.token(&id, "r").await.expect("stale").access_token(),
        "tok-1"
    );
    eventually("second refresh", || source.calls() == 3).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let token = broker.token(&id, "r").await.expect("hit");
        if token.access_token() == "tok-3" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "refreshed token never cached"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn invalidate_identity_drops_all_its_entries() {
    let (broker, source, _clock) = setup(BrokerConfig::default(), 3600);
    let a = managed("a");
    let b = managed("b");
    broker.token(&a, "r1").await.expect("a r1");
    broker.token(&a, "r2").await.expect("a r2");
    broker.token(&b, "r1").await.expect("b r1");
    assert_eq!(broker.len(), 3);
    broker.invalidate_identity(&IdentitySpec::managed("A", "/subscriptions/s/rg/a").key());
    assert_eq!(broker.len(), 1);
    broker.token(&b, "r1").await.expect("b still cached");
    assert_eq!(source.calls(), 3);
    broker.token(&a, "r1").await.expect("a refetched");
    broker.token(&a, "r2").await.expect("a refetched");
    assert_eq!(source.calls(), 5);
}

#[tokio::test]
async fn invalidation_during_fetch_is_not_undone() {
    let (broker, source, _clock) = setup_with(BrokerConfig::default(), |clock| {
        FakeSource::new(clock, 3600).gated()
    });
    let a = managed("a");
    let waiter = {
        let broker = broker.clone();
        let a = a.clone();
        tokio::spawn(async move { broker.token(&a, "r").await })
    };
    eventually("fetch started", || source.calls() == 1).await;
    broker.invalidate_identity(&a.key());
    source.gate.as_ref().expect("gated").add_permits(1);
    // The waiter that asked before the revocation gets its answer ...
    waiter.await.expect("task").expect("token");
    // ... but it is not cached.
    assert!(broker.is_empty());
    source.gate.as_ref().expect("gated").add_permits(1);
    broker.token(&a, "r").await.expect("refetch");
    assert_eq!(source.calls(), 2);
}

#[tokio::test]
async fn unsupported_type_is_a_config_error() {
    let (broker, source, _clock) = setup(BrokerConfig::default(), 3600);
    let mut spec = IdentitySpec::managed("c", "");
    spec.identity_type = IdentityType::from_i64(5);
    let error = broker
        .token(&Arc::new(spec), "r")
        .await
        .expect_err("type 5");
    assert_eq!(error.status(), 503);
    assert!(
        error.to_string().contains("unsupported identity type 5"),
        "{error}"
    );
    assert_eq!(source.calls(), 0);
}

#[tokio::test]
async fn cache_is_bounded_evicting_expired_then_lru() {
    let config = BrokerConfig {
        max_entries: 3,
        ..BrokerConfig::default()
    };
    let (broker, source, clock) = setup(config, 3600);
    for id in ["a", "b", "c"] {
        broker.token(&managed(id), "r").await.expect("fill");
        clock.advance(Duration::from_secs(1));
    }
    // Touch "a" so "b" is least recently used.
    broker.token(&managed("a"), "r").await.expect("hit a");
    broker.token(&managed("d"), "r").await.expect("d");
    assert_eq!(broker.len(), 3);
    assert_eq!(broker.stats().evictions(), 1);
    let calls = source.calls();
    broker.token(&managed("a"), "r").await.expect("a kept");
    assert_eq!(source.calls(), calls);
    broker.token(&managed("b"), "r").await.expect("b evicted");
    assert_eq!(source.calls(), calls + 1);

    // Expired entries go first.
    clock.advance(Duration::from_secs(7200));
    broker.purge_expired();
    assert!(broker.is_empty());
}

#[tokio::test]
async fn upstream_errors_reach_every_waiter() {
    let (broker, source, _clock) = setup_with(BrokerConfig::default(), |clock| {
        FakeSource::new(clock, 3600).gated()
    });
    source.fail_with(Some(unavailable("connection refused")));
    let id = managed("c");
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let broker = broker.clone();
        let id = id.clone();
        tasks.push(tokio::spawn(async move { broker.token(&id, "r").await }));
    }
    let stats = broker.stats().clone();
    eventually("all misses", || stats.misses() == 10).await;
    source.gate.as_ref().expect("gated").add_permits(1);
    for task in tasks {
        let error = task.await.expect("task").expect_err("down");
        assert!(error.to_string().contains("connection refused"));
    }
    assert_eq!(source.calls(), 1);
}

/// `cached` answers from a borrowed view only what `issue` would answer from the cache without
/// any upstream work: nothing before the first fetch, the same token after it, nothing once the
/// token is due for refresh (so `issue` starts the refresh), and it keeps identities, resources,
/// tenants and federated subjects apart like `issue`.
#[tokio::test]
async fn cached_view_hits_only_what_the_cache_alone_can_answer() {
    use podid_broker::{BoundPod, Credential, FederatedSubject, IdentityView};
    let (broker, source, clock) = setup(
        BrokerConfig {
            refresh_margin: Duration::from_secs(300),
            ..BrokerConfig::default()
        },
        3600,
    );
    let identity = managed("c1");
    let none = Credential::None;
    let view = |client_id: &'static str, resource_id: &'static str| {
        IdentityView::new(
            IdentityType::UserAssignedMsi,
            client_id,
            resource_id,
            "",
            &[],
            &none,
        )
    };
    let resource_id = "/subscriptions/s/rg/c1";
    let vault = "https://vault.azure.net";
    assert!(broker.cached(view("c1", resource_id), vault).is_none());
    assert_eq!(
        broker.stats().hits(),
        0,
        "a miss of cached() counts nothing"
    );
    let issued = broker.issue(&identity, vault).await.expect("token");
    let hit = broker
        .cached(view("C1", resource_id), vault)
        .expect("client id compared ignoring case");
    assert!(hit.cached);
    assert_eq!(hit.tokens.len(), 1);
    assert!(Arc::ptr_eq(&hit.tokens[0], &issued.tokens[0]));
    assert_eq!(broker.stats().hits(), 1);
    assert!(broker.cached(view("c2", resource_id), vault).is_none());
    assert!(broker.cached(view("c1", "/other"), vault).is_none());
    assert!(
        broker
            .cached(view("c1", resource_id), "https://storage.azure.com")
            .is_none()
    );
    // A federated view of the same client is another cache entry.
    let federated = Credential::Federated {
        subject: FederatedSubject::new("apps", "web"),
        bound_pod: Some(BoundPod {
            name: "web-1".into(),
            uid: "u".into(),
        }),
    };
    let federated_view = IdentityView::new(
        IdentityType::UserAssignedMsi,
        "c1",
        resource_id,
        "tenant",
        &[],
        &federated,
    );
    assert!(broker.cached(federated_view, vault).is_none());
    // Due for refresh: left to issue(), which refreshes in the background.
    clock.advance(Duration::from_secs(3600 - 299));
    assert!(broker.cached(view("c1", resource_id), vault).is_none());
    assert_eq!(source.calls(), 1);
    broker
        .issue(&identity, vault)
        .await
        .expect("stale but valid");
    eventually("the background refresh", || source.calls() == 2).await;
}
