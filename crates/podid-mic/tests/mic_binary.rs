//! The real `mic` binary against the fake API server and the simulated Entra/ARM: it leads,
//! says `Active` on `/healthz`, assigns an identity to the scale set, counts its election on
//! `/metrics`, and stops cleanly on SIGTERM.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, NodeSpec, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use podid_api::{AssignedIdentityState, AzureAssignedIdentity};
use podid_azure_sim::{ArmHandle, Cloud, EntraHandle};
use podid_fake_apiserver::FakeApiServer;
use podid_mic::client::kube_client;

mod common;

use common::wait_within;

/// A child process starts slower than the in-process loop.
const WAIT: Duration = Duration::from_secs(60);

/// Kills the child if the test fails before it stops it.
struct Mic(Child);

impl Drop for Mic {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Two distinct free ports: both listeners are held until both are chosen, since the kernel
/// hands a port out again as soon as its listener closes.
fn two_free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let b = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = |l: &std::net::TcpListener| l.local_addr().expect("addr").port();
    (port(&a), port(&b))
}

async fn get(http: &reqwest::Client, url: &str) -> Option<String> {
    let answer = http.get(url).send().await.ok()?;
    (answer.status() == 200).then_some(())?;
    answer.text().await.ok()
}

#[tokio::test]
async fn mic_binary_assigns_an_identity_and_stops_on_sigterm() {
    podid_azure_sim::install_crypto_provider();
    let cloud = Cloud::new().expect("cloud");
    let sp = cloud.add_service_principal("mic");
    let secret = cloud.add_client_secret(&sp.client_id).expect("secret");
    let entra = EntraHandle::start(&cloud).expect("entra");
    let arm = ArmHandle::start(&cloud).expect("arm");
    let vmss = cloud.add_vmss(
        cloud.subscription_id(),
        cloud.resource_group(),
        "aks-pool-vmss",
    );
    let kv = cloud.add_user_assigned_identity("kv-id");

    let server = FakeApiServer::start().await.expect("server");
    let kubeconfig = common::kubeconfig(&server);
    let azure_json = kubeconfig.with_file_name("azure.json");
    std::fs::write(&azure_json, cloud.azure_json(&sp.client_id, &secret)).expect("azure.json");
    let client = kube_client(Some(&kubeconfig)).await.expect("client");
    let pp = PostParams::default();
    Api::<Node>::all(client.clone())
        .create(
            &pp,
            &Node {
                metadata: ObjectMeta {
                    name: Some("n1".to_owned()),
                    ..Default::default()
                },
                spec: Some(NodeSpec {
                    provider_id: Some(format!("azure://{}/virtualMachines/0", vmss.resource_id())),
                    ..Default::default()
                }),
                status: None,
            },
        )
        .await
        .expect("node");
    common::create_binding(
        &client,
        "kv-id",
        &kv.resource_id,
        &kv.client_id,
        "kv-binding",
        "kv",
    )
    .await;

    let (probe_port, metrics_port) = two_free_ports();
    let child = Command::new(env!("CARGO_BIN_EXE_mic"))
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .arg(format!("--cloudconfig={}", azure_json.display()))
        .arg(format!("--arm-endpoint={}", arm.url()))
        .arg(format!("--aad-authority={}", entra.url()))
        .arg(format!("--http-probe-port={probe_port}"))
        .arg(format!("--prometheus-port={metrics_port}"))
        .arg("--leader-election-instance=mic-bin")
        .arg("--log-format=json")
        .env("MIC_POD_NAMESPACE", "default")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn mic");
    let mut mic = Mic(child);
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("http client");

    let healthz = format!("http://127.0.0.1:{probe_port}/healthz");
    wait_within(WAIT, "/healthz Active", || async {
        (get(&http, &healthz).await.as_deref() == Some("Active")).then_some(())
    })
    .await;

    Api::<Pod>::namespaced(client.clone(), "default")
        .create(
            &pp,
            &Pod {
                metadata: ObjectMeta {
                    name: Some("web-1".to_owned()),
                    namespace: Some("default".to_owned()),
                    labels: Some(BTreeMap::from([(
                        "aadpodidbinding".to_owned(),
                        "kv".to_owned(),
                    )])),
                    ..Default::default()
                },
                spec: Some(PodSpec {
                    node_name: Some("n1".to_owned()),
                    containers: vec![],
                    ..Default::default()
                }),
                status: None,
            },
        )
        .await
        .expect("pod");
    let assigned: Api<AzureAssignedIdentity> = Api::namespaced(client.clone(), "default");
    wait_within(WAIT, "web-1-default-kv-id Assigned", || async {
        assigned
            .get_opt("web-1-default-kv-id")
            .await
            .expect("get")
            .filter(|o| o.state() == AssignedIdentityState::Assigned)
    })
    .await;
    let on_vmss: Vec<String> = cloud
        .assigned_identities(&vmss)
        .expect("vmss")
        .into_iter()
        .map(|id| id.to_ascii_lowercase())
        .collect();
    assert_eq!(on_vmss, vec![kv.resource_id.to_ascii_lowercase()]);

    let metrics = get(&http, &format!("http://127.0.0.1:{metrics_port}/metrics"))
        .await
        .expect("metrics");
    assert!(
        metrics.contains("aadpodidentity_mic_new_leader_election_count 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("aadpodidentity_assigned_identity_addition_count 1"),
        "{metrics}"
    );

    let status = Command::new("kill")
        .arg("-TERM")
        .arg(mic.0.id().to_string())
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = wait_within(WAIT, "mic exits", || {
        let exited = mic.0.try_wait().expect("try_wait");
        async move { exited }
    })
    .await;
    assert!(exit.success(), "clean stop on SIGTERM: {exit:?}");
}
