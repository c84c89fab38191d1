//! Small wire types that keep upstream's odd JSON shapes intact on a round trip.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::borrow::Cow;

/// The `metadata` object that upstream's Go types embed inside every `spec` and `status`
/// (a Go `ObjectMeta` with tag `metadata,omitempty`).
///
/// The Go MIC writes it as `{"creationTimestamp":null}`, an API server with upstream's CRD prunes
/// it to `{}`. Nothing reads it; podid accepts any object here and writes it back unchanged.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EmbeddedMeta(pub serde_json::Map<String, serde_json::Value>);

impl schemars::JsonSchema for EmbeddedMeta {
    fn schema_name() -> Cow<'static, str> {
        "EmbeddedMeta".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true,
        })
    }

    fn inline_schema() -> bool {
        true
    }
}

/// `AzureIdentity.spec.type`: a plain integer on the wire.
///
/// Values other than 0, 1 and 2 are kept in [`IdentityType::Other`] and written back unchanged:
/// MIC treats them as "not a user-assigned identity", NMI answers `unsupported identity type <n>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum IdentityType {
    /// `0`: user-assigned managed identity, tokens from the node's IMDS.
    #[default]
    UserAssignedMsi,
    /// `1`: service principal with a client secret.
    ServicePrincipal,
    /// `2`: service principal with a PKCS#12 certificate.
    ServicePrincipalCertificate,
    /// Any other integer.
    Other(i64),
}

impl IdentityType {
    /// The wire integer.
    pub fn as_i64(self) -> i64 {
        match self {
            Self::UserAssignedMsi => 0,
            Self::ServicePrincipal => 1,
            Self::ServicePrincipalCertificate => 2,
            Self::Other(n) => n,
        }
    }

    /// `true` for type 0, the only type MIC assigns to VMs/VMSS through ARM.
    pub fn is_user_assigned_msi(self) -> bool {
        self == Self::UserAssignedMsi
    }

    /// `true` for types 1 and 2, the service principals whose credential (client secret or
    /// PKCS#12 certificate) is read from the Secret that `spec.clientPassword` names.
    pub fn has_secret_credential(self) -> bool {
        matches!(
            self,
            Self::ServicePrincipal | Self::ServicePrincipalCertificate
        )
    }

    /// Maps a wire integer; never fails.
    pub fn from_i64(n: i64) -> Self {
        match n {
            0 => Self::UserAssignedMsi,
            1 => Self::ServicePrincipal,
            2 => Self::ServicePrincipalCertificate,
            n => Self::Other(n),
        }
    }
}

impl From<i64> for IdentityType {
    fn from(n: i64) -> Self {
        Self::from_i64(n)
    }
}

impl Serialize for IdentityType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(self.as_i64())
    }
}

impl<'de> Deserialize<'de> for IdentityType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        i64::deserialize(d).map(Self::from_i64)
    }
}

impl schemars::JsonSchema for IdentityType {
    fn schema_name() -> Cow<'static, str> {
        "IdentityType".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "integer" })
    }

    fn inline_schema() -> bool {
        true
    }
}

/// Deserializes a field that may be absent (`None`), explicitly `null` (`Some(None)`) or set
/// (`Some(Some(v))`), so that the Go MIC's `"replicas": null` survives a round trip.
/// Use with `#[serde(default, deserialize_with = "nullable")]`.
pub(crate) fn nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// Schema of a Go `int` (upstream: `type: integer` without a format).
pub(crate) fn go_int(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "type": "integer" })
}
