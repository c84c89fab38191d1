//! What the broker needs to know about an identity: [`IdentitySpec`], the input NMI builds from
//! an `AzureIdentity` (docs/crds.md) and the credential read from its Secret.

use std::fmt;
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

/// `AzureIdentity.spec.type` (docs/crds.md): the CRD crate's type, so the broker, NMI and MIC
/// name identity types the same way. Types other than 0, 1 and 2 ([`IdentityType::Other`]) have
/// no token source (upstream: `unsupported identity type <n>`, 503).
pub use podid_api::IdentityType;

/// A secret string (client secret, certificate password). No `Display`; `Debug` is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wrap a secret.
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Self(value.into())
    }

    /// The secret itself. Never log or format it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

use podid_select::federated::FederatedCredential;
pub use podid_select::federated::{BoundPod, FederatedSubject};

/// The credential an identity's Secret holds (docs/upstream.md#token-sources).
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Credential {
    /// None needed (type 0) or not read.
    #[default]
    None,
    /// Type 1: the client secret (upstream: the first key of `secret.data`).
    ClientSecret(Secret),
    /// Type 2: PKCS#12 bytes (`certificate`) and their `password`.
    Certificate {
        /// The PKCS#12 (PFX) file.
        pkcs12: Arc<[u8]>,
        /// Its password (may be empty).
        password: Secret,
    },
    /// Any type, switched to federation (`podid.io/token-source: federated`): a token of this
    /// subject's service account, from the TokenRequest API, is exchanged at Entra.
    Federated {
        /// Whose service-account token is exchanged.
        subject: FederatedSubject,
        /// The calling pod when the subject is its own service account; `None` for a shared one.
        bound_pod: Option<BoundPod>,
    },
}

impl From<FederatedCredential> for Credential {
    fn from(chosen: FederatedCredential) -> Self {
        Self::Federated {
            subject: chosen.subject,
            bound_pod: chosen.bound_pod,
        }
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::ClientSecret(_) => f.write_str("ClientSecret(<redacted>)"),
            Self::Certificate { pkcs12, .. } => {
                write!(f, "Certificate(<{} bytes redacted>)", pkcs12.len())
            }
            Self::Federated { subject, bound_pod } => f
                .debug_struct("Federated")
                .field("subject", subject)
                .field("bound_pod", bound_pod)
                .finish(),
        }
    }
}

/// Where a Secret-held credential (types 1 and 2) came from: the Secret's namespace and name and
/// a SHA-256 digest of the credential bytes read from it. Part of the cache key, so a token is
/// only ever served to a request whose credential is the same Secret with the same content: an
/// identity elsewhere that merely names the same client id and tenant never shares an entry with
/// it, whatever its own Secret holds. Built when the Secret is read (nmi re-reads it on a TTL),
/// never per request. `Debug` shows the Secret's name, never the digest.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CredentialOrigin {
    namespace: String,
    name: String,
    digest: [u8; 32],
}

impl CredentialOrigin {
    /// The origin of `credential`, read from Secret `namespace/name`.
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        credential: &Credential,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            digest: credential.digest(),
        }
    }

    /// The Secret's namespace (empty for a credential that came from no Secret).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The Secret's name (empty for a credential that came from no Secret).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The digest of the credential bytes.
    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }
}

impl fmt::Debug for CredentialOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CredentialOrigin({}/{})", self.namespace, self.name)
    }
}

impl Credential {
    /// SHA-256 over the credential's bytes (length-prefixed, with the variant), for
    /// [`CredentialOrigin`]. Federated and empty credentials digest their variant only (their
    /// origin is the service account, a key field of its own).
    pub fn digest(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        let mut part = |bytes: &[u8]| {
            hasher.update((bytes.len() as u64).to_be_bytes());
            hasher.update(bytes);
        };
        match self {
            Self::None => part(b"none"),
            Self::ClientSecret(secret) => {
                part(b"client-secret");
                part(secret.expose().as_bytes());
            }
            Self::Certificate { pkcs12, password } => {
                part(b"certificate");
                part(pkcs12);
                part(password.expose().as_bytes());
            }
            Self::Federated { .. } => part(b"federated"),
        }
        hasher.finalize().into()
    }
}

/// Everything the broker needs to obtain tokens for one identity. NMI builds it from the
/// `AzureIdentity` (the copy in the `AzureAssignedIdentity`) and, for types 1 and 2, the
/// referenced Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentitySpec {
    /// `spec.type`.
    pub identity_type: IdentityType,
    /// `spec.clientID`.
    pub client_id: String,
    /// `spec.resourceID` (type 0; may be empty otherwise).
    pub resource_id: String,
    /// `spec.tenantID` (types 1 and 2).
    pub tenant_id: String,
    /// `spec.auxiliaryTenantIDs` (type 1): extra tenants, each gets its own token.
    pub auxiliary_tenant_ids: Vec<String>,
    /// `spec.adEndpoint`; empty means the source's default authority.
    pub ad_endpoint: String,
    /// The credential from the Secret.
    pub credential: Credential,
    /// Where the credential came from (types 1 and 2; see [`CredentialOrigin`]). The broker
    /// refuses a Secret-held credential without one rather than cache it under a key that
    /// does not say whose it is.
    pub origin: Option<Arc<CredentialOrigin>>,
}

impl IdentitySpec {
    /// A user-assigned managed identity (type 0).
    pub fn managed(client_id: impl Into<String>, resource_id: impl Into<String>) -> Self {
        Self {
            identity_type: IdentityType::UserAssignedMsi,
            client_id: client_id.into(),
            resource_id: resource_id.into(),
            tenant_id: String::new(),
            auxiliary_tenant_ids: Vec::new(),
            ad_endpoint: String::new(),
            credential: Credential::None,
            origin: None,
        }
    }

    /// A service principal with a client secret (type 1).
    pub fn client_secret(
        client_id: impl Into<String>,
        tenant_id: impl Into<String>,
        secret: Secret,
    ) -> Self {
        Self {
            identity_type: IdentityType::ServicePrincipal,
            client_id: client_id.into(),
            resource_id: String::new(),
            tenant_id: tenant_id.into(),
            auxiliary_tenant_ids: Vec::new(),
            ad_endpoint: String::new(),
            credential: Credential::ClientSecret(secret),
            origin: None,
        }
        .with_origin_in("", "")
    }

    /// A service principal with a PKCS#12 certificate (type 2).
    pub fn certificate(
        client_id: impl Into<String>,
        tenant_id: impl Into<String>,
        pkcs12: impl Into<Arc<[u8]>>,
        password: Secret,
    ) -> Self {
        Self {
            identity_type: IdentityType::ServicePrincipalCertificate,
            client_id: client_id.into(),
            resource_id: String::new(),
            tenant_id: tenant_id.into(),
            auxiliary_tenant_ids: Vec::new(),
            ad_endpoint: String::new(),
            credential: Credential::Certificate {
                pkcs12: pkcs12.into(),
                password,
            },
            origin: None,
        }
        .with_origin_in("", "")
    }

    /// This identity with its credential's origin set to Secret `namespace/name` (the
    /// constructors above use an unnamed origin: the digest alone then tells credentials apart).
    pub fn with_origin_in(mut self, namespace: &str, name: &str) -> Self {
        self.origin = Some(Arc::new(CredentialOrigin::new(
            namespace,
            name,
            &self.credential,
        )));
        self
    }

    /// This identity, its tokens obtained by federated exchange for `subject` (see
    /// [`Credential::Federated`]); any credential from a Secret is dropped.
    pub fn federated(mut self, subject: FederatedSubject, bound_pod: Option<BoundPod>) -> Self {
        self.credential = Credential::Federated { subject, bound_pod };
        self.origin = None;
        self
    }

    /// The federated subject, for identities switched to federation.
    pub fn federated_subject(&self) -> Option<&FederatedSubject> {
        match &self.credential {
            Credential::Federated { subject, .. } => Some(subject),
            _ => None,
        }
    }

    /// The cache identity of this spec (see [`IdentityKey`]).
    pub fn key(&self) -> IdentityKey {
        IdentityKey::new(self.identity_type, &self.client_id, &self.resource_id)
    }

    /// The tenant the primary token is for: `None` for managed identities (the node's tenant),
    /// the `tenantID` otherwise. A federated identity's `tenantID` (trimmed) counts whatever its
    /// type; without one the federated source uses the cluster's default tenant (`None`).
    /// Returned as configured, not lower-cased: the cache compares tenants ignoring case (and
    /// lower-cases them in its keys), so a hit needs no copy.
    pub(crate) fn primary_tenant_as_given(&self) -> Option<&str> {
        if matches!(self.credential, Credential::Federated { .. }) {
            return Some(self.tenant_id.trim()).filter(|t| !t.is_empty());
        }
        match self.identity_type {
            IdentityType::UserAssignedMsi | IdentityType::Other(_) => None,
            _ => Some(self.tenant_id.as_str()),
        }
    }
}

/// The identity part of a cache key: type, client id and resource id, compared case-insensitively
/// (GUIDs and ARM ids are case-insensitive, docs/compatibility.md). Two `AzureIdentity` objects
/// naming the same principal share cache entries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdentityKey {
    identity_type: IdentityType,
    client_id: String,
    resource_id: String,
}

impl IdentityKey {
    /// The key for an identity of `identity_type` with these ids (case is ignored).
    pub fn new(identity_type: IdentityType, client_id: &str, resource_id: &str) -> Self {
        Self {
            identity_type,
            client_id: client_id.to_ascii_lowercase(),
            resource_id: resource_id.to_ascii_lowercase(),
        }
    }

    /// The identity type.
    pub fn identity_type(&self) -> IdentityType {
        self.identity_type
    }

    /// The lower-cased client id.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The lower-cased resource id.
    pub fn resource_id(&self) -> &str {
        &self.resource_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ignores_case() {
        let a = IdentitySpec::managed("ABC-def", "/subscriptions/S/x");
        let b = IdentitySpec::managed("abc-DEF", "/SUBSCRIPTIONS/s/X");
        assert_eq!(a.key(), b.key());
        let c = IdentitySpec::client_secret("abc-def", "t", Secret::new("s"));
        assert_ne!(a.key(), c.key(), "type is part of the key");
    }

    #[test]
    fn debug_redacts_credentials() {
        let spec = IdentitySpec::client_secret("cid", "tid", Secret::new("hunter2-very-secret"));
        assert!(!format!("{spec:?}").contains("hunter2"));
        let cert = IdentitySpec::certificate("cid", "tid", vec![1u8, 2, 3], Secret::new("pw-xyz"));
        assert!(!format!("{cert:?}").contains("pw-xyz"));
    }
}
