//! The library shared by the `nmi` and `mic` binaries (and `podidctl`). It holds two things:
//!
//! - [`broker`], the **token broker**, the hot path of NMI: token sources for every
//!   `AzureIdentity` type (node IMDS, Entra client secret, Entra certificate assertion, federated
//!   exchange), a bounded cache, single-flight upstream calls, proactive background refresh,
//!   stale-if-error, revocation, and a node-wide IMDS budget (5 concurrent, 20 per second);
//! - [`arm`], the client that assigns identities to VMs and scale sets for MIC.
//!
//! Which identity a pod gets (matching, the federated switch, the Workload Identity decision) is
//! decided in `podid-select`; MIC's desired-assignment diff lives in `podid-mic`.
//!
//! This crate must not depend on hyper servers, iptables, prometheus or the test doubles; it
//! talks to Azure only through reqwest clients whose URLs are configuration, and reads time only
//! through an injected [`broker::Clock`]. NMI turns broker results into IMDS bodies with
//! `podid-imds` and maps [`broker::BrokerStats`] to its metrics.
//!
//! See `docs/token-broker.md` for the cache key, refresh margin, single-flight, budget and error
//! mapping.

pub mod arm;
pub mod broker;
