//! podid's MIC (managed identity controller): turns pods × bindings × identities into
//! `AzureAssignedIdentity` objects and works out which user-assigned identities each VM or VM
//! scale set must carry.
//!
//! The `mic` binary runs [`serve::serve`]:
//!
//! - [`config`]: the `mic` command line, upstream's flags byte-for-byte, validated into a typed
//!   [`config::Config`].
//! - [`cloud`]: the cloud configuration (`azure.json` or its environment fallback) and the
//!   Azure endpoints it implies.
//! - [`serve`]: the whole controller: the Kubernetes clients, leader election, the one-time type
//!   upgrade on becoming leader, then the loop for as long as the lease is held.
//! - [`client`]: the Kubernetes client, limited to `--clientQps` and to 100 requests in flight;
//!   [`throttle`]: the `--clientQps` token bucket around it (Leases exempt).
//! - [`leader`]: leader election on a Lease, renewed on its own task and client.
//! - [`upgrade`]: the one-time type upgrade (capitalised CRD keys) on becoming leader.
//! - [`run`]: the controller loop: caches of the watched kinds, coalesced passes, the plan's
//!   API writes and one job per VM/VMSS for its identity work (its private modules: the caches,
//!   the memory of mic's own writes until the caches show them, the plan applier, the VM/VMSS
//!   jobs, the Kubernetes writes, the event texts).
//! - [`desired`]: the pure desired-state computation and its diff against the existing
//!   `AzureAssignedIdentity` objects ([`desired::Plan`]), per VM/VMSS
//!   ([`desired::ArmTarget`]).
//! - [`hold`]: identities kept on a VM/VMSS for a grace period after their last pod.
//! - [`preexisting`]: identities found on a VM/VMSS before podid assigned them stay there.
//! - [`assigner`]: the [`assigner::IdentityAssigner`] seam between the loop and ARM;
//!   [`arm`]: the production one, Azure Resource Manager through `podid_arm` with
//!   tokens from the token broker.
//! - [`metrics`]: upstream's MIC metrics and their `/metrics` rendering; [`probe`]: the
//!   `/healthz` and `/metrics` HTTP servers.
//!
//! [`config`], [`cloud`], [`desired`], [`hold`] and [`preexisting`] take values and return
//! values: no tokio, no HTTP, no Kubernetes client. [`run`], [`leader`] and [`upgrade`] talk to
//! the API server, [`arm`] to ARM.
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
