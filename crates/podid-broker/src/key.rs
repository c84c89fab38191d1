//! The cache key: what a token is cached under ([`CacheKey`]), and the borrowed views a cache
//! hit looks its slot up with ([`KeyView`], [`Lookup`]) without building a key. Authorities are
//! compared case-insensitively, everything else exactly.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use super::identity::{
    Credential, CredentialOrigin, FederatedSubject, IdentityKey, IdentitySpec, IdentityType,
};
use super::source::SourceKind;

/// What a token is cached under: everything that decides which credential produced it —
/// identity (type, client id, resource id) × resource × tenant × authority × credential origin
/// (the Secret and a digest of its content for types 1 and 2, the service account for a
/// federated exchange). Two requests share an entry only when they would send the same
/// credential to the same authority; an identity elsewhere that merely claims another's client
/// id and tenant never reads, fills or refreshes its entries (docs/security.md).
///
/// The resource is kept as given (audiences are compared exactly by Entra); the tenant is
/// lower-cased. A cache hit finds its slot without building one (see `KeyParts`).
#[derive(Debug, Clone)]
pub struct CacheKey {
    /// The identity.
    pub identity: IdentityKey,
    /// The resource (audience).
    pub resource: String,
    /// The tenant, `None` for managed identities.
    pub tenant: Option<String>,
    /// The service account whose token was exchanged (federated identities only).
    pub subject: Option<FederatedSubject>,
    /// The authority the credential goes to (see `key_authority`), lower-cased; empty for
    /// IMDS and for the source's default authority.
    pub authority: String,
    /// Where a Secret-held credential came from (types 1 and 2 only).
    pub origin: Option<Arc<CredentialOrigin>>,
}

impl CacheKey {
    /// The owned key of `lookup` (client id, resource id, tenant and authority lower-cased).
    pub(crate) fn of(lookup: &Lookup<'_>) -> Self {
        Self {
            identity: lookup.identity.key(),
            resource: lookup.resource.to_owned(),
            tenant: lookup.tenant.map(str::to_ascii_lowercase),
            subject: lookup.identity.federated_subject().cloned(),
            authority: key_authority(lookup.identity).to_ascii_lowercase(),
            origin: lookup.identity.origin.clone(),
        }
    }
}

/// The authority part of an identity's key: `adEndpoint` as written (trimmed, as the URL parser
/// does), compared ignoring ASCII case; empty when the identity has none (the source's default
/// authority, fixed per source) and for IMDS identities (no authority is involved). Two
/// spellings of one authority are two keys: less sharing, never a wrong token.
fn key_authority(identity: &IdentitySpec) -> &str {
    match SourceKind::for_identity(identity) {
        Some(SourceKind::Imds) | None => "",
        Some(_) => identity.ad_endpoint.trim(),
    }
}

/// A cache key's fields, borrowed. Equality and hashing go through it for both the owned
/// [`CacheKey`] and a request's [`Lookup`], so a hit looks its slot up without allocating.
/// Client id, resource id and tenant compare ignoring ASCII case (GUIDs and ARM ids are
/// case-insensitive; a `CacheKey` holds them lower-cased); the resource compares exactly.
#[derive(Debug, Clone, Copy)]
pub struct KeyView<'a> {
    pub(crate) identity_type: IdentityType,
    pub(crate) client_id: &'a str,
    pub(crate) resource_id: &'a str,
    pub(crate) resource: &'a str,
    pub(crate) tenant: Option<&'a str>,
    pub(crate) subject: Option<&'a FederatedSubject>,
    pub(crate) authority: &'a str,
    pub(crate) origin: Option<&'a CredentialOrigin>,
}

impl KeyView<'_> {
    fn same(&self, other: &KeyView<'_>) -> bool {
        self.identity_type == other.identity_type
            && self.client_id.eq_ignore_ascii_case(other.client_id)
            && self.resource == other.resource
            && match (self.tenant, other.tenant) {
                (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
                (None, None) => true,
                _ => false,
            }
            && self.subject == other.subject
            && match (self.origin, other.origin) {
                (Some(a), Some(b)) => std::ptr::eq(a, b) || a == b,
                (None, None) => true,
                _ => false,
            }
            && self.resource_id.eq_ignore_ascii_case(other.resource_id)
            && self.authority.eq_ignore_ascii_case(other.authority)
    }

    /// Hashes what [`KeyView::same`] compares (the resource id and the authority only through
    /// equality: they rarely differ between keys with one client id, and leaving them out
    /// keeps a hit cheap; of the origin, the first bytes of its digest).
    fn hash_into<H: Hasher>(&self, state: &mut H) {
        self.identity_type.hash(state);
        hash_ascii_lowercase(self.client_id, state);
        self.resource.hash(state);
        match self.tenant {
            None => state.write_u8(0),
            Some(tenant) => {
                state.write_u8(1);
                hash_ascii_lowercase(tenant, state);
            }
        }
        self.subject.hash(state);
        match self.origin {
            None => state.write_u8(0),
            Some(origin) => state.write(&origin.digest()[..8]),
        }
    }
}

/// Feed `text` lower-cased (ASCII) to `state` without allocating, then a terminator.
fn hash_ascii_lowercase<H: Hasher>(text: &str, state: &mut H) {
    let mut buf = [0u8; 64];
    for chunk in text.as_bytes().chunks(buf.len()) {
        let lower = &mut buf[..chunk.len()];
        lower.copy_from_slice(chunk);
        lower.make_ascii_lowercase();
        state.write(lower);
    }
    state.write_u8(0xff);
}

/// Something a cache slot can be looked up with: the owned [`CacheKey`] or a borrowed
/// [`Lookup`]. Private to the broker (the module is not public).
pub trait KeyParts {
    /// The key's fields.
    fn parts(&self) -> KeyView<'_>;
}

impl KeyParts for CacheKey {
    fn parts(&self) -> KeyView<'_> {
        KeyView {
            identity_type: self.identity.identity_type(),
            client_id: self.identity.client_id(),
            resource_id: self.identity.resource_id(),
            resource: &self.resource,
            tenant: self.tenant.as_deref(),
            subject: self.subject.as_ref(),
            authority: &self.authority,
            origin: self.origin.as_deref(),
        }
    }
}

impl KeyParts for KeyView<'_> {
    fn parts(&self) -> KeyView<'_> {
        *self
    }
}

/// An identity's cache-key fields, borrowed from wherever the caller keeps them (e.g. the
/// `AzureIdentity` itself), for [`TokenBroker::cached`](crate::TokenBroker::cached): a cache hit without building an
/// [`IdentitySpec`]. A view carries no [`CredentialOrigin`], so it never finds the entries of
/// Secret-held credentials (types 1 and 2): those go through [`TokenBroker::issue`](crate::TokenBroker::issue) with the
/// credential read from their Secret.
#[derive(Debug, Clone, Copy)]
pub struct IdentityView<'a> {
    pub(crate) identity_type: IdentityType,
    pub(crate) client_id: &'a str,
    pub(crate) resource_id: &'a str,
    pub(crate) tenant: Option<&'a str>,
    pub(crate) single_tenant: bool,
    pub(crate) subject: Option<&'a FederatedSubject>,
    pub(crate) authority: &'a str,
}

impl<'a> IdentityView<'a> {
    /// The view of the identity an [`IdentitySpec`] with these fields would describe
    /// (`credential`: only whether it is federated, and its subject, matter).
    pub fn new(
        identity_type: IdentityType,
        client_id: &'a str,
        resource_id: &'a str,
        tenant_id: &'a str,
        auxiliary_tenant_ids: &[String],
        credential: &'a Credential,
    ) -> Self {
        let subject = match credential {
            Credential::Federated { subject, .. } => Some(subject),
            _ => None,
        };
        // As IdentitySpec::primary_tenant_as_given.
        let tenant = if subject.is_some() {
            Some(tenant_id.trim()).filter(|t| !t.is_empty())
        } else {
            match identity_type {
                IdentityType::UserAssignedMsi | IdentityType::Other(_) => None,
                _ => Some(tenant_id),
            }
        };
        Self {
            identity_type,
            client_id,
            resource_id,
            tenant,
            single_tenant: tenant.is_none() || auxiliary_tenant_ids.is_empty(),
            subject,
            authority: "",
        }
    }

    /// This view with the identity's `adEndpoint` (as [`IdentitySpec::ad_endpoint`]; ignored
    /// for IMDS identities, which involve no authority).
    pub fn with_authority(mut self, ad_endpoint: &'a str) -> Self {
        let imds = self.subject.is_none()
            && matches!(
                self.identity_type,
                IdentityType::UserAssignedMsi | IdentityType::Other(_)
            );
        self.authority = if imds { "" } else { ad_endpoint.trim() };
        self
    }
}

/// The key of a request, borrowed from the identity and the query.
#[derive(Debug, Clone, Copy)]
pub struct Lookup<'a> {
    pub(crate) identity: &'a IdentitySpec,
    pub(crate) resource: &'a str,
    /// As configured (not lower-cased).
    pub(crate) tenant: Option<&'a str>,
}

impl KeyParts for Lookup<'_> {
    fn parts(&self) -> KeyView<'_> {
        KeyView {
            identity_type: self.identity.identity_type,
            client_id: &self.identity.client_id,
            resource_id: &self.identity.resource_id,
            resource: self.resource,
            tenant: self.tenant,
            subject: self.identity.federated_subject(),
            authority: key_authority(self.identity),
            origin: self.identity.origin.as_deref(),
        }
    }
}

impl PartialEq for dyn KeyParts + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts().same(&other.parts())
    }
}

impl Eq for dyn KeyParts + '_ {}

impl Hash for dyn KeyParts + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.parts().hash_into(state);
    }
}

impl PartialEq for CacheKey {
    fn eq(&self, other: &Self) -> bool {
        self.parts().same(&other.parts())
    }
}

impl Eq for CacheKey {}

impl Hash for CacheKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.parts().hash_into(state);
    }
}

impl<'a> Borrow<dyn KeyParts + 'a> for CacheKey {
    fn borrow(&self) -> &(dyn KeyParts + 'a) {
        self
    }
}
