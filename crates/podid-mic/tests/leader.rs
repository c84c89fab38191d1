//! Lease leader election between two replicas against the fake API server.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use podid_fake_apiserver::FakeApiServer;
use podid_mic::leader::{Elector, LeaderSettings};

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
    }
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
