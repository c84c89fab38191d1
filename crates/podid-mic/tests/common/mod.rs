//! The harness shared by the controller-loop suites (`mic_arm`, `mic_features`, `run`,
//! `mic_binary`): the simulated Azure side (Entra, ARM, one scale set, MIC's service principal),
//! a Node of that scale set, the fake API server with MIC's loop on it ([`Cluster`]) and a
//! bounded wait. Each suite uses part of it.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, NodeSpec, Pod, PodSpec};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, PostParams};
use podid_api::{
    AssignedIdentityState, AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding,
};
use podid_arm::{ARM_RESOURCE, ArmConfig};
use podid_azure_sim::{ArmHandle, Cloud, ComputeRef, EntraHandle, UserAssignedIdentity};
use podid_fake_apiserver::FakeApiServer;
use podid_mic::arm::ArmAssigner;
use podid_mic::assigner::IdentityAssigner;
use podid_mic::client::kube_client;
use podid_mic::cloud::{CloudConfig, Endpoints};
use podid_mic::desired::Options;
use podid_mic::run::{Settings, run};

pub const WAIT: Duration = Duration::from_secs(30);
pub const HOUR: Duration = Duration::from_secs(3600);
pub const VMSS: &str = "aks-pool-vmss";

/// Polls `check` until it returns `Some` or `WAIT` passes.
pub async fn wait_for<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    wait_within(WAIT, what, check).await
}

/// Polls `check` every 50 ms until it returns `Some`; fails after `limit`.
pub async fn wait_within<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The simulated Azure side: Entra, ARM, one VM scale set, and MIC's service principal.
pub struct Azure {
    pub cloud: Cloud,
    pub arm: ArmHandle,
    pub entra: EntraHandle,
    pub vmss: ComputeRef,
    pub azure_json: String,
}

impl Azure {
    pub fn start() -> Self {
        let cloud = Cloud::new().expect("cloud");
        let mic = cloud.add_service_principal("mic");
        let secret = cloud.add_client_secret(&mic.client_id).expect("secret");
        let entra = EntraHandle::start(&cloud).expect("entra");
        let arm = ArmHandle::start(&cloud).expect("arm");
        let vmss = cloud.add_vmss(cloud.subscription_id(), cloud.resource_group(), VMSS);
        let azure_json = cloud.azure_json(&mic.client_id, &secret);
        Self {
            cloud,
            arm,
            entra,
            vmss,
            azure_json,
        }
    }

    pub fn cloud_config(&self) -> CloudConfig {
        CloudConfig::parse(&self.azure_json).expect("azure.json")
    }

    /// ARM client settings for the simulator: fast LRO polling, no proxy.
    pub fn arm_config(&self) -> ArmConfig {
        ArmConfig {
            base_url: self.arm.url(),
            poll_interval: Duration::from_millis(10),
            operation_timeout: Duration::from_secs(10),
            proxy_from_env: false,
            ..ArmConfig::default()
        }
    }

    /// MIC's assigner logged in to the simulated Entra, with `config`.
    pub fn assigner_with(&self, config: ArmConfig) -> ArmAssigner {
        let endpoints = Endpoints {
            arm: self.arm.url(),
            arm_resource: ARM_RESOURCE.to_owned(),
            aad_authority: self.entra.url(),
            imds: "http://127.0.0.1:1".to_owned(),
        };
        ArmAssigner::from_cloud_with(&self.cloud_config(), &endpoints, config)
            .expect("ARM assigner")
    }

    /// MIC's assigner with [`Azure::arm_config`].
    pub fn assigner(&self) -> ArmAssigner {
        self.assigner_with(self.arm_config())
    }

    /// Lower-cased resource ids on the scale set.
    pub fn on_vmss(&self) -> BTreeSet<String> {
        self.cloud
            .assigned_identities(&self.vmss)
            .expect("vmss")
            .into_iter()
            .map(|id| id.to_ascii_lowercase())
            .collect()
    }

    pub fn has(&self, identity: &UserAssignedIdentity) -> bool {
        self.on_vmss()
            .contains(&identity.resource_id.to_ascii_lowercase())
    }

    /// PATCHes the scale set received.
    pub fn patches(&self) -> u64 {
        self.arm.patch_count(&self.vmss)
    }

    /// Lower-cased ids the simulated ARM was asked to remove, in call order.
    pub fn removed(&self) -> Vec<String> {
        self.arm
            .calls()
            .into_iter()
            .flat_map(|c| c.removed)
            .map(|id| id.to_ascii_lowercase())
            .collect()
    }

    /// Lower-cased ids successful ARM calls added, in call order.
    pub fn added(&self) -> Vec<String> {
        self.arm
            .calls()
            .into_iter()
            .filter(|c| c.status < 300)
            .flat_map(|c| c.added)
            .map(|id| id.to_ascii_lowercase())
            .collect()
    }
}

/// A Node of `vmss` (instance `instance`), as AKS names its providerID.
pub fn node(name: &str, vmss: &ComputeRef, instance: usize) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            provider_id: Some(format!(
                "azure://{}/virtualMachines/{instance}",
                vmss.resource_id()
            )),
            ..Default::default()
        }),
        status: None,
    }
}

/// A pod in `default` on `node` with the binding selector `selector`.
pub fn pod(name: &str, node: &str, selector: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some("default".to_owned()),
            labels: Some(BTreeMap::from([(
                "aadpodidbinding".to_owned(),
                selector.to_owned(),
            )])),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.to_owned()),
            containers: vec![],
            ..Default::default()
        }),
        status: None,
    }
}

/// An AzureIdentity `identity` (type 0: `resource_id`, `client_id`) and an
/// AzureIdentityBinding `binding` of it with selector `selector`, in `default`.
pub async fn create_binding(
    client: &kube::Client,
    identity: &str,
    resource_id: &str,
    client_id: &str,
    binding: &str,
    selector: &str,
) {
    let pp = PostParams::default();
    Api::<AzureIdentity>::namespaced(client.clone(), "default")
        .create(
            &pp,
            &AzureIdentity::user_assigned("default", identity, resource_id, client_id),
        )
        .await
        .expect("identity");
    Api::<AzureIdentityBinding>::namespaced(client.clone(), "default")
        .create(
            &pp,
            &AzureIdentityBinding::for_selector("default", binding, identity, selector),
        )
        .await
        .expect("binding");
}

/// A kubeconfig for `server`, written in a directory of its own (the server's port).
pub fn kubeconfig(server: &FakeApiServer) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("podid-mic-test-{}", server.addr().port()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("kubeconfig");
    server.write_kubeconfig(&path).expect("write kubeconfig");
    path
}

/// The holder of MIC's leader Lease (`default/aad-pod-identity-mic`), if any.
pub async fn lease_holder(client: &kube::Client) -> Option<String> {
    Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), "default")
        .get_opt("aad-pod-identity-mic")
        .await
        .expect("get lease")
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

/// A client of `server` through [`kubeconfig`].
pub async fn client_for(server: &FakeApiServer) -> kube::Client {
    kube_client(Some(&kubeconfig(server)))
        .await
        .expect("client")
}

/// The fake API server, and MIC's loop on it (restartable).
pub struct Cluster {
    pub server: FakeApiServer,
    pub client: kube::Client,
    assigner: Arc<dyn IdentityAssigner>,
    settings: Settings,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Cluster {
    /// The server with `nodes`, and the loop running with `assigner`, `immutable` client ids
    /// and the identity-assignment reconcile every `identity_reconcile`.
    pub async fn start(
        assigner: Arc<dyn IdentityAssigner>,
        immutable: &[&str],
        identity_reconcile: Duration,
        nodes: &[Node],
    ) -> Self {
        Self::start_with(assigner, immutable, identity_reconcile, nodes, |_| {}).await
    }

    /// [`Cluster::start`] with `adjust` applied to the loop's settings.
    pub async fn start_with(
        assigner: Arc<dyn IdentityAssigner>,
        immutable: &[&str],
        identity_reconcile: Duration,
        nodes: &[Node],
        adjust: impl FnOnce(&mut Settings),
    ) -> Self {
        let server = FakeApiServer::start().await.expect("server");
        let client = client_for(&server).await;
        for n in nodes {
            Api::<Node>::all(client.clone())
                .create(&PostParams::default(), n)
                .await
                .expect("node");
        }
        let settings = Settings {
            options: Options {
                force_namespaced: false,
                release_finished_pods: true,
                immutable_client_ids: immutable.iter().map(|s| s.to_ascii_lowercase()).collect(),
            },
            batch: 4,
            resync: HOUR,
            identity_reconcile,
            instance: "mic-test".to_owned(),
            health: Default::default(),
            holds: Default::default(),
            hold_record: None,
        };
        let mut settings = settings;
        adjust(&mut settings);
        let mut cluster = Self {
            server,
            client,
            assigner,
            settings,
            stop: None,
            task: None,
        };
        cluster.start_loop();
        cluster
    }

    /// Starts MIC's loop (again).
    pub fn start_loop(&mut self) {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let client = self.client.clone();
        let assigner = self.assigner.clone();
        let settings = self.settings.clone();
        self.task = Some(tokio::spawn(async move {
            run(client, settings, assigner, async {
                let _ = stopped.await;
            })
            .await
            .expect("loop ends cleanly");
        }));
        self.stop = Some(stop);
    }

    /// Stops the loop and waits for it (a pass in flight finishes first).
    pub async fn stop_loop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("stops in time")
                .expect("no panic");
        }
    }

    /// Stops the loop for good.
    pub async fn stop(mut self) {
        self.stop_loop().await;
    }

    /// An AzureIdentity for `identity` and a binding with selector `selector`, both named after it.
    pub async fn bind(&self, identity: &UserAssignedIdentity, selector: &str) {
        create_binding(
            &self.client,
            &identity.name,
            &identity.resource_id,
            &identity.client_id,
            &format!("{}-binding", identity.name),
            selector,
        )
        .await;
    }

    pub async fn add_pod(&self, name: &str, node: &str, selector: &str) {
        Api::<Pod>::namespaced(self.client.clone(), "default")
            .create(&PostParams::default(), &pod(name, node, selector))
            .await
            .expect("pod");
    }

    pub async fn delete_pod(&self, name: &str) {
        Api::<Pod>::namespaced(self.client.clone(), "default")
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete pod");
    }

    /// The AzureAssignedIdentity objects in `default`.
    pub fn assignments(&self) -> Api<AzureAssignedIdentity> {
        Api::namespaced(self.client.clone(), "default")
    }

    /// Every `AzureAssignedIdentity` of the namespace.
    pub async fn assignment_list(&self) -> Vec<AzureAssignedIdentity> {
        self.assignments()
            .list(&Default::default())
            .await
            .expect("list")
            .items
    }

    pub async fn assigned(&self, name: &str) -> Option<AzureAssignedIdentity> {
        self.assignments().get_opt(name).await.expect("get")
    }

    pub async fn wait_state(
        &self,
        name: &str,
        state: AssignedIdentityState,
    ) -> AzureAssignedIdentity {
        wait_for(&format!("{name} {state:?}"), || async {
            self.assigned(name).await.filter(|o| o.state() == state)
        })
        .await
    }

    pub async fn wait_gone(&self, name: &str) {
        wait_for(&format!("{name} deleted"), || async {
            self.assigned(name).await.is_none().then_some(())
        })
        .await;
    }

    /// The first event with `reason` about the object named `regarding`.
    pub async fn event(&self, reason: &str, regarding: &str) -> Event {
        wait_for(&format!("event {reason:?} on {regarding}"), || async {
            Api::<Event>::namespaced(self.client.clone(), "default")
                .list(&Default::default())
                .await
                .expect("list events")
                .items
                .into_iter()
                .find(|e| {
                    e.reason.as_deref() == Some(reason)
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(regarding)
                })
        })
        .await
    }
}

/// mic's configuration as its flags give it, against `kubeconfig`, with `flags` after the
/// kubeconfig flag and `MIC_POD_NAMESPACE=default`.
pub fn mic_config(kubeconfig: &std::path::Path, flags: &[&str]) -> podid_mic::config::Config {
    let args = [
        "mic".to_owned(),
        format!("--kubeconfig={}", kubeconfig.display()),
    ]
    .into_iter()
    .chain(flags.iter().map(|flag| (*flag).to_owned()));
    podid_mic::config::Flags::parse_go(args)
        .expect("flags")
        .into_config_with_env(
            |name| (name == "MIC_POD_NAMESPACE").then(|| "default".to_owned()),
            "host",
        )
        .expect("config")
}
