//! The ARM identity assigner MIC uses: which VM or VMSS backs a node ([`ComputeId`]), validated
//! user-assigned identity ids ([`IdentityResourceId`]), and [`ArmClient`], which reads and patches
//! the `identity` of VMs and VMSS through Azure Resource Manager exactly as upstream MIC does
//! (docs/upstream.md#arm-calls): only changed ids, `{}` to add and `null` to remove, at most 150
//! per PATCH, long-running operations followed, throttling honoured per subscription, refused
//! identities dropped and the rest retried (`--update-user-msi-max-retry` times,
//! `--update-user-msi-retry-interval` apart).
//!
//! This crate must not depend on kube, hyper servers or the test doubles; it talks to ARM only
//! through reqwest with a configurable base URL and gets tokens from an [`ArmTokenProvider`]
//! (usually `podid-broker`'s token broker). See `docs/arm.md`.

mod client;
mod error;
mod ids;
mod plan;
mod retry_after;
mod token;

pub use client::{API_VERSION, ArmBuildError, ArmClient, ArmConfig, UpdateOutcome};
pub use error::{ArmError, ArmOperation, IdList};
pub use ids::{
    ComputeId, ComputeKind, IdentityResourceId, InvalidResourceId, ProviderIdError,
    is_user_assigned_identity_id,
};
pub use plan::{
    IdentityState, MAX_IDS_PER_PATCH, PlannedPatch, ResourceIdentityType, changes, plan_patches,
};
pub use token::{ARM_RESOURCE, ArmTokenFuture, ArmTokenProvider, BrokerTokenProvider};
