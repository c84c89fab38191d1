//! The crate's error type.

/// What can go wrong setting up or querying the simulator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Generating the simulator's signing key failed.
    #[error("generating the simulator's signing key")]
    Keys(#[source] podid_test_keys::Error),
    /// No app registration, service principal or managed identity has this client id.
    #[error("no application with client id {client_id}")]
    UnknownApp {
        /// The client id asked for.
        client_id: String,
    },
    /// No VM or VMSS with this resource id.
    #[error("no VM or VMSS {resource_id}")]
    UnknownCompute {
        /// The resource id asked for.
        resource_id: String,
    },
    /// No user-assigned identity with this resource id.
    #[error("no user-assigned identity {resource_id}")]
    UnknownIdentity {
        /// The resource id asked for.
        resource_id: String,
    },
    /// Entra allows at most 20 federated identity credentials per application or identity.
    #[error("application {client_id} already has the maximum of 20 federated credentials")]
    TooManyFederatedCredentials {
        /// The application's client id.
        client_id: String,
    },
    /// An access token did not verify (signature, issuer or lifetime).
    #[error("access token did not verify")]
    InvalidToken(#[source] jsonwebtoken::errors::Error),
    /// Setting up a listener failed.
    #[error("setting up a listener")]
    Listen(#[source] std::io::Error),
}
