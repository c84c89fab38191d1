//! podid's MIC (managed identity controller): turns pods × bindings × identities into
//! `AzureAssignedIdentity` objects and works out which user-assigned identities each VM or VM
//! scale set must carry.
//!
//! - [`config`]: the `mic` command line, upstream's flags byte-for-byte, validated into a typed
//!   [`config::Config`].
//! - [`cloud`]: the cloud configuration (`azure.json` or its environment fallback) and the
//!   Azure endpoints it implies.
//! - [`desired`]: the pure desired-state computation and its diff against the existing
//!   `AzureAssignedIdentity` objects.
//! - [`leader`]: leader election on a Lease.
//! - [`run`]: the controller loop (reflectors, coalesced passes, API writes, per-VM/VMSS work
//!   through an [`assigner::IdentityAssigner`]).
//!
//! - [`arm`]: the production [`assigner::IdentityAssigner`], Azure Resource Manager through
//!   `podid_controller::arm` with tokens from the token broker.
//! - [`metrics`]: upstream's MIC metrics and their `/metrics` rendering.
//! - [`probe`]: the `/healthz` and `/metrics` HTTP servers.
//! - [`preexisting`]: identities found on a VM/VMSS before podid assigned them stay there.
//! - [`hold`]: identities kept on a VM/VMSS for a grace period after their last pod.
//! - [`upgrade`]: the one-time type upgrade (capitalised CRD keys) on becoming leader.
//! - [`throttle`]: the `--clientQps` token bucket around the Kubernetes client (Leases exempt).
//!
//! [`config`], [`cloud`], [`desired`], [`hold`] and [`preexisting`] take values and return values: no
//! tokio, no HTTP, no Kubernetes client; only [`run`] and [`upgrade`] talk to the API server.
//! Must not depend on the testkit or on `podid-nmi`.

pub mod arm;
pub mod assigner;
pub mod client;
pub mod cloud;
pub mod config;
pub mod desired;
pub mod hold;
pub mod leader;
pub mod metrics;
pub mod preexisting;
pub mod probe;
pub mod run;
pub mod serve;
pub mod throttle;
pub mod upgrade;
