//! The `/healthz` and `/metrics` servers over real HTTP.

use std::sync::Arc;

use podid_mic::probe::{self, Endpoint, Health};
use tokio::net::TcpListener;

async fn start(endpoint: Endpoint) -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(probe::serve(listener, endpoint, async {
        let _ = stopped.await;
    }));
    (url, stop)
}

async fn get(url: &str) -> (u16, String) {
    podid_azure_sim::install_crypto_provider();
    let answer = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
        .get(url)
        .send()
        .await
        .expect("answer");
    let status = answer.status().as_u16();
    (status, answer.text().await.expect("body"))
}

#[tokio::test]
async fn healthz_says_active_only_while_active_and_always_200() {
    let health = Arc::new(Health::default());
    let (url, stop) = start(Endpoint::Health(health.clone())).await;
    let healthz = format!("{url}/healthz");
    assert_eq!(get(&healthz).await, (200, "Not Active".to_owned()));
    health.set_active(true);
    assert_eq!(get(&healthz).await, (200, "Active".to_owned()));
    health.set_active(false);
    assert_eq!(get(&healthz).await, (200, "Not Active".to_owned()));
    assert_eq!(get(&format!("{url}/metrics")).await.0, 404);
    let _ = stop.send(());
}

#[tokio::test]
async fn metrics_use_upstreams_names() {
    podid_mic::metrics::leader_election();
    let (url, stop) = start(Endpoint::Metrics).await;
    let (status, body) = get(&format!("{url}/metrics")).await;
    assert_eq!(status, 200);
    for name in [
        "aadpodidentity_mic_new_leader_election_count ",
        "aadpodidentity_cloud_provider_operations_errors_count{operation_type=\"vmss_update\"} 0",
        "aadpodidentity_kubernetes_api_operations_errors_count{operation_type=\"update_azure_assigned_identity_status\"} 0",
        "# TYPE aadpodidentity_mic_cycle_duration_seconds histogram",
        "# TYPE aadpodidentity_assigned_identity_addition_count counter",
    ] {
        assert!(body.contains(name), "{name} missing from:\n{body}");
    }
    assert!(
        !body.contains("aadpodidentity_mic_new_leader_election_count 0"),
        "the election was counted"
    );
    assert_eq!(get(&format!("{url}/healthz")).await.0, 404);
    let _ = stop.send(());
}
