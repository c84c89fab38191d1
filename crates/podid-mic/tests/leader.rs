//! Leader election against the fake API server: the Lease between two podid replicas, and the
//! multi-lock with upstream's Endpoints lock (`--upstream-leader-lock`) against a Go MIC's
//! record written the way client-go writes it.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use podid_fake_apiserver::FakeApiServer;
use podid_mic::leader::{Elector, LeaderRecord, LeaderSettings, UPSTREAM_LEADER_ANNOTATION};
use serde_json::{Value, json};

mod common;

use common::{client_for, lease_holder};

const WAIT: Duration = Duration::from_secs(20);

fn settings(identity: &str) -> LeaderSettings {
    LeaderSettings {
        namespace: "default".to_owned(),
        name: "aad-pod-identity-mic".to_owned(),
        identity: identity.to_owned(),
        lease_duration: Duration::from_millis(1200),
        renew_deadline: Duration::from_millis(600),
        retry_period: Duration::from_millis(100),
        upstream_lock: true,
    }
}

const ENDPOINTS: &str = "/api/v1/namespaces/default/endpoints";
const LOCK: &str = "/api/v1/namespaces/default/endpoints/aad-pod-identity-mic";

/// The Go MIC's record as client-go writes it (whole-second RFC 3339 times).
fn go_record(holder: &str, duration_secs: i64, renew: &str, transitions: i64) -> String {
    json!({
        "holderIdentity": holder,
        "leaseDurationSeconds": duration_secs,
        "acquireTime": "2026-01-01T00:00:00Z",
        "renewTime": renew,
        "leaderTransitions": transitions,
    })
    .to_string()
}

/// Upstream's Endpoints lock as the Go MIC creates it: no subsets, the record in the annotation.
fn seed_go_lock(server: &FakeApiServer, record: &str) {
    server
        .create_json(
            ENDPOINTS,
            json!({"apiVersion": "v1", "kind": "Endpoints",
                   "metadata": {"name": "aad-pod-identity-mic", "namespace": "default",
                                "annotations": {UPSTREAM_LEADER_ANNOTATION: record}}}),
        )
        .expect("seed the Go MIC's lock");
}

/// A Go renewal: the record rewritten with a new `renewTime` (a new version of the object).
fn go_renew(server: &FakeApiServer, n: usize) {
    let mut lock = server.get_json(LOCK).expect("lock");
    lock["metadata"]["annotations"][UPSTREAM_LEADER_ANNOTATION] = json!(go_record(
        "go-mic-0",
        1,
        &format!("2026-01-01T00:00:{:02}Z", n % 60),
        3
    ));
    server.replace_json(LOCK, lock).expect("renew");
}

fn upstream_record(server: &FakeApiServer) -> Option<LeaderRecord> {
    let lock = server.get_json(LOCK).ok()?;
    let raw = lock["metadata"]["annotations"][UPSTREAM_LEADER_ANNOTATION].as_str()?;
    Some(serde_json::from_str(raw).expect("a client-go record"))
}

/// HTTP requests the elector sent to Endpoints (the seeding above is in-process, not logged).
fn endpoints_requests(server: &FakeApiServer) -> Vec<String> {
    server
        .faults()
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/endpoints"))
        .map(|r| format!("{} {}", r.verb, r.path))
        .collect()
}

#[tokio::test]
async fn a_live_go_holder_keeps_mic_a_follower_and_an_expired_one_is_taken_over_in_both_locks() {
    let server = FakeApiServer::start().await.expect("server");
    let client = client_for(&server).await;
    seed_go_lock(
        &server,
        &go_record("go-mic-0", 1, "2026-01-01T00:00:00Z", 3),
    );
    let mut a = Elector::new(client.clone(), settings("mic-a"));

    // The Go MIC renews every 200 ms for 1.5 s (longer than its 1 s record): mic-a stays a
    // follower and writes nothing, not even the Lease.
    let started = tokio::time::Instant::now();
    let mut n = 0;
    let mut last_renewal = started;
    while started.elapsed() < Duration::from_millis(1500) {
        n += 1;
        go_renew(&server, n);
        last_renewal = tokio::time::Instant::now();
        assert!(!a.try_acquire_or_renew().await.expect("a tries"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(lease_holder(&client).await, None, "no Lease while Go leads");
    let writes: Vec<String> = server
        .faults()
        .requests()
        .into_iter()
        .filter(|r| r.verb != "get")
        .map(|r| format!("{} {}", r.verb, r.path))
        .collect();
    assert_eq!(writes, Vec::<String>::new(), "mic-a wrote while Go led");

    // The Go MIC stops renewing: once its record has been unchanged for its 1 s, mic-a takes
    // both locks.
    tokio::time::timeout(WAIT, a.acquire())
        .await
        .expect("a becomes leader");
    assert!(
        last_renewal.elapsed() >= Duration::from_secs(1),
        "took over {:?} after the last Go renewal, before the record expired",
        last_renewal.elapsed()
    );
    assert_eq!(lease_holder(&client).await.as_deref(), Some("mic-a"));
    let record = upstream_record(&server).expect("record");
    assert_eq!(record.holder_identity, "mic-a");
    assert_eq!(record.lease_duration_seconds, 1);
    assert_eq!(record.leader_transitions, 4, "one more transition");
    let renew = record.renew_time.expect("renewTime");
    assert!(
        renew.len() == 20 && renew.ends_with('Z') && !renew.contains('.'),
        "Go's metav1.Time shape: {renew}"
    );
    assert_eq!(record.acquire_time.as_deref(), Some(renew.as_str()));
}

#[tokio::test]
async fn a_lease_held_by_another_replica_keeps_mic_a_follower_and_off_the_endpoints() {
    let server = FakeApiServer::start().await.expect("server");
    let client = client_for(&server).await;
    let mut b = Elector::new(client.clone(), settings("mic-b"));
    assert!(b.try_acquire_or_renew().await.expect("b leads"));
    assert_eq!(
        upstream_record(&server)
            .map(|r| r.holder_identity)
            .as_deref(),
        Some("mic-b"),
        "the leader keeps upstream's record too"
    );
    // Upstream's record released (as at a Go MIC's clean exit) while b's Lease is live: the
    // free Endpoints lock does not let a lead.
    let mut lock = server.get_json(LOCK).expect("lock");
    lock["metadata"]["annotations"][UPSTREAM_LEADER_ANNOTATION] =
        json!(go_record("", 1, "2026-01-01T00:00:00Z", 1));
    server.replace_json(LOCK, lock).expect("release");
    server.faults().clear_log();
    let mut a = Elector::new(client.clone(), settings("mic-a"));
    for _ in 0..5 {
        assert!(!a.try_acquire_or_renew().await.expect("a tries"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(lease_holder(&client).await.as_deref(), Some("mic-b"));
    assert_eq!(
        upstream_record(&server)
            .map(|r| r.holder_identity)
            .as_deref(),
        Some(""),
        "a follower never writes upstream's record"
    );
    let writes: Vec<String> = endpoints_requests(&server)
        .into_iter()
        .filter(|r| !r.starts_with("get "))
        .collect();
    assert_eq!(writes, Vec::<String>::new());
}

#[tokio::test]
async fn a_leading_mic_keeps_the_endpoints_record_live_and_releases_it() {
    let server = FakeApiServer::start().await.expect("server");
    let client = client_for(&server).await;
    // A Go replica takes over when the record's bytes stay unchanged for its lease
    // duration. The record's times are whole seconds, so even a replica renewing every
    // retry period changes the bytes only once a second (plus up to one retry period): the
    // lease here is 2 s, as any real one is longer than a second plus a retry period.
    let lease = Duration::from_secs(2);
    let mut a = Elector::new(
        client.clone(),
        LeaderSettings {
            lease_duration: lease,
            ..settings("mic-a")
        },
    );
    assert!(a.try_acquire_or_renew().await.expect("a leads"));
    let hold = tokio::spawn(async move {
        (
            tokio::time::timeout(Duration::from_millis(4500), a.hold()).await,
            a,
        )
    });
    // Sampled for longer than the lease, so a record that stopped changing fails the test;
    // the holder is always mic-a.
    let mut last: Option<(Value, tokio::time::Instant)> = None;
    let mut longest = Duration::ZERO;
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_millis(4400) {
        let lock = server.get_json(LOCK).expect("lock");
        let raw = lock["metadata"]["annotations"][UPSTREAM_LEADER_ANNOTATION].clone();
        let record: LeaderRecord =
            serde_json::from_str(raw.as_str().expect("annotation")).expect("record");
        assert_eq!(record.holder_identity, "mic-a");
        let now = tokio::time::Instant::now();
        match &last {
            Some((seen, at)) if *seen == raw => longest = longest.max(now - *at),
            _ => last = Some((raw, now)),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        longest < lease,
        "upstream's record went {longest:?} unchanged: a Go replica would take over"
    );
    let (held, mut a) = hold.await.expect("no panic");
    assert!(held.is_err(), "a kept leading");
    // A Go replica starting now sees a live holder: a podid elector with another identity
    // (same rule as client-go for the Endpoints record) stays a follower.
    let mut go_like = Elector::new(client.clone(), settings("go-mic-1"));
    assert!(!go_like.try_acquire_or_renew().await.expect("tries"));

    a.release().await.expect("release");
    assert_eq!(
        upstream_record(&server)
            .map(|r| r.holder_identity)
            .as_deref(),
        Some(""),
        "released for a Go replica too"
    );
    assert_eq!(lease_holder(&client).await, None);
}

#[tokio::test]
async fn with_the_upstream_lock_off_mic_uses_the_lease_only_and_never_touches_endpoints() {
    let server = FakeApiServer::start().await.expect("server");
    let client = client_for(&server).await;
    // Even a live record in upstream's lock is not looked at.
    seed_go_lock(
        &server,
        &go_record("go-mic-0", 3600, "2026-01-01T00:00:00Z", 0),
    );
    let lease_only = || LeaderSettings {
        upstream_lock: false,
        ..settings("mic-a")
    };
    let mut a = Elector::new(client.clone(), lease_only());
    assert!(
        a.try_acquire_or_renew()
            .await
            .expect("a leads on the Lease alone")
    );
    assert!(a.try_acquire_or_renew().await.expect("a renews"));
    a.release().await.expect("release");
    assert_eq!(
        upstream_record(&server)
            .map(|r| r.holder_identity)
            .as_deref(),
        Some("go-mic-0")
    );
    assert_eq!(endpoints_requests(&server), Vec::<String>::new());
    assert!(
        server.faults().count("update", "/leases/") >= 2,
        "the Lease was used"
    );
}

#[tokio::test]
async fn one_leader_at_a_time_and_takeover_after_expiry() {
    let server = FakeApiServer::start().await.expect("server");
    let client = client_for(&server).await;
    let mut a = Elector::new(client.clone(), settings("mic-a"));
    let mut b = Elector::new(client.clone(), settings("mic-b"));

    assert!(a.try_acquire_or_renew().await.expect("a tries"));
    assert_eq!(lease_holder(&client).await.as_deref(), Some("mic-a"));
    assert!(!b.try_acquire_or_renew().await.expect("b tries"));
    assert!(a.try_acquire_or_renew().await.expect("a renews"));

    // While a renews, b never gets it.
    let hold =
        tokio::spawn(
            async move { tokio::time::timeout(Duration::from_millis(1500), a.hold()).await },
        );
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        assert!(!b.try_acquire_or_renew().await.expect("b tries"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(hold.await.expect("no panic").is_err(), "a kept the lease");

    // a stopped renewing: b takes over once the lease expired.
    tokio::time::timeout(WAIT, b.acquire())
        .await
        .expect("b becomes leader");
    assert_eq!(lease_holder(&client).await.as_deref(), Some("mic-b"));
    let lease = Api::<Lease>::namespaced(client.clone(), "default")
        .get("aad-pod-identity-mic")
        .await
        .expect("lease");
    let spec = lease.spec.expect("spec");
    assert_eq!(spec.lease_transitions, Some(1));
    assert_eq!(spec.lease_duration_seconds, Some(1));
}

#[tokio::test]
async fn release_hands_over_at_once_and_a_lost_lease_ends_hold() {
    let server = FakeApiServer::start().await.expect("server");
    let client = client_for(&server).await;
    let mut a = Elector::new(client.clone(), settings("mic-a"));
    let mut b = Elector::new(client.clone(), settings("mic-b"));
    assert!(a.try_acquire_or_renew().await.expect("a"));
    a.release().await.expect("release");
    assert_eq!(lease_holder(&client).await, None);
    assert!(
        b.try_acquire_or_renew()
            .await
            .expect("b takes the released lease")
    );
    // a, still thinking it may lead, sees another holder and stops holding.
    tokio::time::timeout(WAIT, a.hold())
        .await
        .expect("hold returns when the lease belongs to someone else");
}

#[tokio::test]
async fn a_renewal_stuck_past_the_renew_deadline_ends_hold() {
    let server = FakeApiServer::start().await.expect("server");
    let client = client_for(&server).await;
    let mut a = Elector::new(client.clone(), settings("mic-a"));
    assert!(a.try_acquire_or_renew().await.expect("a"));
    // The API server now answers after a minute: every renewal is still in flight at the
    // deadline. hold must give up on its own, long before another replica could take over
    // (lease 1.2 s), not wait for the answer.
    server.faults().set_delay(Duration::from_secs(60));
    tokio::time::timeout(WAIT, a.hold())
        .await
        .expect("hold returns while its renewal hangs");
    server.faults().set_delay(Duration::ZERO);
}

/// A follower held off by the leader's upstream record keeps watching the Lease too: once the
/// leader stops, it takes over one lease duration after the last renewal, not two (the Lease
/// first looked at only after the upstream record expired would start its own count then).
#[tokio::test]
async fn a_follower_takes_over_one_lease_duration_after_the_last_renewal_of_both_locks() {
    let server = FakeApiServer::start().await.expect("server");
    let client = client_for(&server).await;
    let mut a = Elector::new(client.clone(), settings("mic-a"));
    let mut b = Elector::new(client.clone(), settings("mic-b"));
    assert!(a.try_acquire_or_renew().await.expect("a leads"));
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        assert!(a.try_acquire_or_renew().await.expect("a renews"));
        assert!(!b.try_acquire_or_renew().await.expect("b tries"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last_renewal = tokio::time::Instant::now();
    assert!(
        a.try_acquire_or_renew()
            .await
            .expect("a renews a last time")
    );
    tokio::time::timeout(WAIT, b.acquire())
        .await
        .expect("b becomes leader");
    // The records say 1 s (whole seconds of the 1.2 s setting).
    let lease = Duration::from_secs(1);
    let took = last_renewal.elapsed();
    assert!(took >= lease, "b took over after {took:?}, before expiry");
    assert!(
        took < lease * 2,
        "b took over {took:?} after the last renewal: it counted a second lease duration"
    );
    assert_eq!(lease_holder(&client).await.as_deref(), Some("mic-b"));
}
