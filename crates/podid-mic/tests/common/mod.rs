//! The harness shared by the controller-loop suites (`mic_arm`, `mic_features`): the simulated
//! Azure side (Entra, ARM, one scale set, MIC's service principal), a Node of that scale set and
//! a bounded wait. Each suite uses part of it.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, NodeSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use podid_azure_sim::{ArmHandle, Cloud, ComputeRef, EntraHandle, UserAssignedIdentity};
use podid_controller::arm::{ARM_RESOURCE, ArmConfig};
use podid_mic::arm::ArmAssigner;
use podid_mic::cloud::{CloudConfig, Endpoints};

pub const WAIT: Duration = Duration::from_secs(30);
pub const VMSS: &str = "aks-pool-vmss";

/// Polls `check` until it returns `Some` or `WAIT` passes.
pub async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
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
        let azure_json = serde_json::json!({
            "cloud": "AzurePublicCloud",
            "tenantId": cloud.tenant_id(),
            "aadClientId": mic.client_id,
            "aadClientSecret": secret,
            "subscriptionId": cloud.subscription_id(),
            "resourceGroup": cloud.resource_group(),
            "vmType": "vmss",
        })
        .to_string();
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
