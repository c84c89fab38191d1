//! Azure simulator for tests: the simulated Entra ID token endpoint (client secret, certificate
//! assertion and federated assertion grants), a per-VM Instance Metadata Service (IMDS) that only
//! serves identities currently assigned to its VM or VMSS, and the Azure Resource Manager (ARM)
//! VM/VMSS identity API with long-running operations, throttling and injected faults.
//!
//! All servers share one [`Cloud`] (the world model) and speak the real services' wire formats
//! over plain HTTP (hyper 1). Counters and call logs let tests assert what happened; secrets,
//! tokens and assertions never appear in them, in logs or in `Debug` output.
//!
//! Test-only: must not be a dependency of shipped crates, and must not depend on product crates
//! (the bodies written here are the real services' bodies, not podid's).

mod arm;
pub mod cli;
mod entra;
mod error;
mod http;
mod imds;
mod rogue;
mod token;
mod util;
mod world;

pub use arm::{ARM_MAX_IDENTITIES_PER_REQUEST, ArmBuilder, ArmCall, ArmHandle, serve_arm};
pub use entra::{EntraCall, EntraHandle, GrantKind, serve_entra};
pub use error::Error;
pub use http::ServerHandle;
pub use imds::{IMDS_CONCURRENCY_LIMIT, IMDS_RATE_LIMIT, ImdsCounters, ImdsHandle, serve_imds};
pub use rogue::{RogueHandle, RogueRequest, rogue_token, serve_rogue};
pub use token::AccessTokenClaims;
pub use world::{
    Cloud, ComputeKind, ComputeRef, FederatedCredential, MAX_FEDERATED_CREDENTIALS,
    ResourceIdentityType, ServicePrincipal, UserAssignedIdentity,
};

/// Installs rustls' `ring` crypto provider as the process default if none is installed yet.
/// The workspace builds reqwest without a default provider; building a `reqwest::Client`
/// panics until one is installed, even for plain-HTTP use. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
