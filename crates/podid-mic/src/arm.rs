//! The production [`IdentityAssigner`]: puts user-assigned identities on VMs and VM scale sets
//! through Azure Resource Manager with [`podid_arm::ArmClient`].
//!
//! Every VM/VMSS is looked up in the cloud configuration's `resourceGroup` and subscription, as
//! upstream does (docs/upstream.md#cloud-configuration, docs/upstream.md#sync-cycle step 5). ARM
//! tokens come from the token broker: a client secret against Entra when azure.json names a service
//! principal, the node's managed identity through IMDS otherwise.
//!
//! Failures are returned to the controller loop, which retries the pass with backoff and no
//! sooner than ARM's `Retry-After` ([`IdentityAssigner::retry_after`]). When ARM refuses only
//! some identities, the others are assigned and the refused ones are reported as
//! [`NotApplied`], so one bad identity does not hold back the rest of its VM/VMSS.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use podid_arm::{
    ArmBuildError, ArmClient, ArmConfig, ArmError, BrokerTokenProvider, ComputeId, ComputeKind,
    IdentityResourceId,
};
use podid_broker::{
    BrokerConfig, ClientSecretSource, EntraConfig, IdentitySpec, ImdsConfig, ImdsLimiter,
    ImdsSource, LimiterConfig, Secret, SourceBuildError, Sources, SystemClock, TokenBroker,
};
use tracing::{info, warn};

use crate::assigner::{AssignError, AssignFuture, IdentityAssigner, NotApplied, ReportingFuture};
use crate::cloud::{ArmCredential, CloudConfig, CloudError, Endpoints};
use crate::desired::ArmTarget;

/// Why the ARM assigner could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ArmSetupError {
    /// The cloud configuration lacks what ARM authentication needs.
    #[error("invalid cloud configuration")]
    Cloud(#[from] CloudError),
    /// The token source could not be built (bad authority or IMDS URL).
    #[error("failed to build the ARM token source")]
    Source(#[from] SourceBuildError),
    /// The ARM client could not be built (bad endpoint).
    #[error("failed to build the ARM client")]
    Client(#[from] ArmBuildError),
}

/// Assigns identities with ARM; see the module docs.
#[derive(Debug, Clone)]
pub struct ArmAssigner {
    client: Arc<ArmClient>,
    subscription_id: String,
    resource_group: String,
}

impl ArmAssigner {
    /// An assigner that looks every VM/VMSS up in `subscription_id`/`resource_group`.
    pub fn new(client: Arc<ArmClient>, subscription_id: &str, resource_group: &str) -> Self {
        Self {
            client,
            subscription_id: subscription_id.to_owned(),
            resource_group: resource_group.to_owned(),
        }
    }

    /// The production assigner: ARM at `arm.base_url` (used as given), tokens for
    /// `endpoints.arm_resource` from the credential of `cloud` (client secret at
    /// `endpoints.aad_authority`, or managed identity at `endpoints.imds`). The binary passes
    /// `endpoints.arm` and its user agent in `arm`; and the `--updateUserMSI*` retries in `arm`; tests also shorten the operation polling.
    pub fn from_cloud_with(
        cloud: &CloudConfig,
        endpoints: &Endpoints,
        arm: ArmConfig,
    ) -> Result<Self, ArmSetupError> {
        let clock = Arc::new(SystemClock);
        let (identity, sources) = match cloud.credential()? {
            ArmCredential::ClientSecret {
                tenant_id,
                client_id,
                secret,
            } => {
                let source = ClientSecretSource::new(
                    EntraConfig {
                        default_authority: format!("{}/", endpoints.aad_authority),
                        ..EntraConfig::default()
                    },
                    clock.clone(),
                )?;
                (
                    IdentitySpec::client_secret(client_id, tenant_id, Secret::new(secret.expose())),
                    Sources::all(Arc::new(source)),
                )
            }
            ArmCredential::ManagedIdentity { client_id } => {
                let source = ImdsSource::new(
                    ImdsConfig {
                        endpoint: endpoints.imds.clone(),
                        ..ImdsConfig::default()
                    },
                    Arc::new(ImdsLimiter::new(LimiterConfig::default())),
                    clock.clone(),
                )?;
                (
                    IdentitySpec::managed(client_id.unwrap_or_default(), ""),
                    Sources::all(Arc::new(source)),
                )
            }
        };
        let broker = Arc::new(TokenBroker::new(BrokerConfig::default(), sources, clock));
        let tokens = BrokerTokenProvider::new(broker, identity, &endpoints.arm_resource);
        let client = ArmClient::new(arm, Arc::new(tokens))?;
        Ok(Self::new(
            Arc::new(client),
            &cloud.subscription_id,
            &cloud.resource_group,
        ))
    }

    /// The ARM resource of `target`: the VM named like the node, or the scale set, in the
    /// configured subscription and resource group.
    pub(crate) fn compute_id(&self, target: &ArmTarget) -> ComputeId {
        let kind = if target.is_vmss() {
            ComputeKind::VirtualMachineScaleSet
        } else {
            ComputeKind::VirtualMachine
        };
        ComputeId::new(
            kind,
            &self.subscription_id,
            &self.resource_group,
            target.name(),
        )
    }

    /// The update and the ids of `required` that were already on `target` (neither added nor
    /// refused by this call; empty when the update failed as a whole).
    async fn update(
        &self,
        target: &ArmTarget,
        required: &BTreeSet<String>,
        release: &BTreeSet<String>,
    ) -> (Result<(), AssignError>, BTreeSet<String>) {
        let compute = self.compute_id(target);
        let mut invalid = BTreeSet::new();
        let mut parse = |ids: &BTreeSet<String>| -> Vec<IdentityResourceId> {
            ids.iter()
                .filter_map(|id| match IdentityResourceId::parse(id) {
                    Ok(parsed) => Some(parsed),
                    Err(e) => {
                        warn!(%compute, error = %e, "skipping identity");
                        invalid.insert(id.to_ascii_lowercase());
                        None
                    }
                })
                .collect()
        };
        let add = parse(required);
        let remove = parse(release);
        let started = Instant::now();
        let result = self.client.update_identities(&compute, &add, &remove).await;
        crate::metrics::cloud_operation(compute.kind(), started.elapsed(), result.as_ref().err());
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(e) => return (Err(e.into()), BTreeSet::new()),
        };
        if !outcome.is_noop() {
            info!(
                %compute,
                added = outcome.added.len(),
                removed = outcome.removed.len(),
                refused = outcome.dropped.len(),
                "identities of the VM/VMSS updated"
            );
        }
        let mut not_applied = invalid;
        not_applied.extend(outcome.dropped.iter().map(|id| id.as_str().to_owned()));
        let present: BTreeSet<String> = add
            .iter()
            .map(|id| id.as_str().to_owned())
            .filter(|id| {
                !not_applied.contains(id) && !outcome.added.iter().any(|a| a.as_str() == id)
            })
            .collect();
        if not_applied.is_empty() {
            return (Ok(()), present);
        }
        let reason = outcome
            .dropped_reason
            .unwrap_or_else(|| "invalid identity resource id".to_owned());
        (
            Err(Box::new(NotApplied {
                ids: not_applied,
                reason,
            })),
            present,
        )
    }
}

impl IdentityAssigner for ArmAssigner {
    fn apply<'a>(
        &'a self,
        target: &'a ArmTarget,
        required: &'a BTreeSet<String>,
        release: &'a BTreeSet<String>,
    ) -> AssignFuture<'a> {
        Box::pin(async move { self.update(target, required, release).await.0 })
    }

    fn apply_reporting<'a>(
        &'a self,
        target: &'a ArmTarget,
        required: &'a BTreeSet<String>,
        release: &'a BTreeSet<String>,
    ) -> ReportingFuture<'a> {
        Box::pin(self.update(target, required, release))
    }

    fn retry_after(&self, error: &AssignError) -> Option<Duration> {
        error
            .downcast_ref::<ArmError>()
            .and_then(ArmError::retry_after)
    }
}
