//! The ARM identity assigner MIC uses: which VM or VMSS backs a node ([`ComputeId`]),
//! validated user-assigned identity ids ([`IdentityResourceId`]), and (next) the client that
//! reads and patches the `identity` of VMs and VMSS through Azure Resource Manager.
//!
//! This module must not depend on kube, hyper servers or the test doubles; it talks to ARM only
//! through reqwest with a configurable base URL. See `docs/arm.md`.

mod ids;

pub use ids::{
    ComputeId, ComputeKind, IdentityResourceId, InvalidResourceId, ProviderIdError,
    is_user_assigned_identity_id,
};
