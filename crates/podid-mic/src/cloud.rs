//! Cloud configuration (docs/upstream.md#cloud-configuration): `azure.json` named by
//! `--cloudconfig`, or without it the environment variables the chart fills from its admin Secret;
//! and the Azure endpoints (Resource Manager, Entra authority, IMDS) it implies, with podid's
//! command-line overrides.
//!
//! The client secret is held in [`Secret`], whose `Debug` is redacted and which has no
//! `Display`: it never reaches a log line or an error message.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::EndpointOverrides;

/// A credential that must not be printed. `Debug` shows `Secret(<redacted>)`; read the value
/// with [`Secret::expose`] at the one place that sends it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a credential.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The credential itself, for the request that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `true` when no credential was given.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("Secret(<empty>)")
        } else {
            f.write_str("Secret(<redacted>)")
        }
    }
}

/// Where the cloud configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloudConfigSource {
    /// The azure.json file given with `--cloudconfig`.
    File(PathBuf),
    /// The environment variables (`CLOUD`, `TENANT_ID`, …), `--cloudconfig` being empty.
    Environment,
}

/// The values MIC uses from azure.json (keys case-sensitive, as upstream). Other keys of the
/// file are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CloudConfig {
    /// Where these values came from.
    pub source: Option<CloudConfigSource>,
    /// `cloud`: `AzurePublicCloud`, `AzureChinaCloud`, … (see [`AzureEnvironment::from_name`]).
    pub cloud: String,
    /// `tenantId`.
    pub tenant_id: String,
    /// `aadClientId` (AKS clusters using a managed identity write `msi`).
    pub client_id: String,
    /// `aadClientSecret`.
    pub client_secret: Secret,
    /// `subscriptionId`.
    pub subscription_id: String,
    /// `resourceGroup`: where every VM and VM scale set is looked up (the node resource group).
    pub resource_group: String,
    /// `vmType` (parsed, unused: VM or VMSS is decided per node from its providerID).
    pub vm_type: String,
    /// `securityGroupName` (parsed, unused).
    pub security_group_name: String,
    /// `useManagedIdentityExtension`: authenticate to ARM through IMDS.
    pub use_managed_identity: bool,
    /// `userAssignedIdentityID`: client id of that managed identity (empty = system-assigned);
    /// also never removed from a VM/VMSS (the cluster identity).
    pub user_assigned_identity_id: String,
}

/// Why the cloud configuration cannot be used. Messages name the file or variable and the
/// field, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// The file could not be read.
    #[error("failed to read cloud config {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid JSON/YAML or a field has the wrong type.
    #[error("failed to parse cloud config {path}: {detail}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong and where (field name, line, column).
        detail: String,
    },
    /// A value needed to talk to Azure is missing.
    #[error("cloud config ({source_name}): {field} is required{why}")]
    Missing {
        /// `the file <path>` or `environment`.
        source_name: String,
        /// The key (file) or variable (environment) that is empty.
        field: &'static str,
        /// Why it is needed.
        why: &'static str,
    },
    /// The `cloud` value names no known Azure environment (upstream's autorest message).
    #[error("autorest/azure: There is no cloud environment matching the name {0:?}")]
    UnknownCloud(String),
    /// `AzureStackCloud` needs the environment file named by `AZURE_ENVIRONMENT_FILEPATH`.
    #[error(
        "failed to read the Azure environment file {path} (AZURE_ENVIRONMENT_FILEPATH): {detail}"
    )]
    EnvironmentFile {
        /// The file, empty when the variable is unset.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
}

/// azure.json as written by AKS and aks-engine; unknown keys are ignored.
#[derive(Deserialize, Default)]
#[serde(default)]
struct AzureJson {
    cloud: Option<String>,
    #[serde(rename = "tenantId")]
    tenant_id: Option<String>,
    #[serde(rename = "aadClientId")]
    aad_client_id: Option<String>,
    #[serde(rename = "aadClientSecret")]
    aad_client_secret: Option<String>,
    #[serde(rename = "subscriptionId")]
    subscription_id: Option<String>,
    #[serde(rename = "resourceGroup")]
    resource_group: Option<String>,
    #[serde(rename = "vmType")]
    vm_type: Option<String>,
    #[serde(rename = "securityGroupName")]
    security_group_name: Option<String>,
    #[serde(rename = "useManagedIdentityExtension")]
    use_managed_identity_extension: Option<bool>,
    #[serde(rename = "userAssignedIdentityID")]
    user_assigned_identity_id: Option<String>,
}

impl CloudConfig {
    /// Loads from `path` when given (`--cloudconfig`), otherwise from the environment.
    pub fn load(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, CloudError> {
        match path {
            Some(path) => Self::from_file(path),
            None => Ok(Self::from_env(env)),
        }
    }

    /// Reads and parses an azure.json file.
    pub fn from_file(path: &Path) -> Result<Self, CloudError> {
        let text = std::fs::read_to_string(path).map_err(|source| CloudError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text).map_err(|detail| CloudError::Parse {
            path: path.to_owned(),
            detail,
        })?;
        config.source = Some(CloudConfigSource::File(path.to_owned()));
        Ok(config)
    }

    /// Parses azure.json text (JSON, or YAML as upstream's parser also accepts). The error
    /// names the offending field and its position; it never quotes a value.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Err("the file is empty".to_owned());
        }
        let raw: AzureJson = serde_norway::from_str(text).map_err(|e| redact_parse_error(&e))?;
        Ok(Self {
            source: None,
            cloud: raw.cloud.unwrap_or_default(),
            tenant_id: raw.tenant_id.unwrap_or_default(),
            client_id: raw.aad_client_id.unwrap_or_default(),
            client_secret: Secret::new(raw.aad_client_secret.unwrap_or_default()),
            subscription_id: raw.subscription_id.unwrap_or_default(),
            resource_group: raw.resource_group.unwrap_or_default(),
            vm_type: raw.vm_type.unwrap_or_default(),
            security_group_name: raw.security_group_name.unwrap_or_default(),
            use_managed_identity: raw.use_managed_identity_extension.unwrap_or(false),
            user_assigned_identity_id: raw.user_assigned_identity_id.unwrap_or_default(),
        })
    }

    /// The environment fallback: `CLOUD`, `TENANT_ID`, `CLIENT_ID`, `CLIENT_SECRET`,
    /// `SUBSCRIPTION_ID`, `RESOURCE_GROUP`, `VM_TYPE`, `USE_MSI` (`true` in any case),
    /// `USER_ASSIGNED_MSI_CLIENT_ID`.
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Self {
        let get = |name: &str| env(name).unwrap_or_default().trim().to_owned();
        Self {
            source: Some(CloudConfigSource::Environment),
            cloud: get("CLOUD"),
            tenant_id: get("TENANT_ID"),
            client_id: get("CLIENT_ID"),
            client_secret: Secret::new(env("CLIENT_SECRET").unwrap_or_default()),
            subscription_id: get("SUBSCRIPTION_ID"),
            resource_group: get("RESOURCE_GROUP"),
            vm_type: get("VM_TYPE"),
            security_group_name: String::new(),
            use_managed_identity: get("USE_MSI").eq_ignore_ascii_case("true"),
            user_assigned_identity_id: get("USER_ASSIGNED_MSI_CLIENT_ID"),
        }
    }

    /// The cluster identity's client id (`userAssignedIdentityID`), never removed from a
    /// VM/VMSS; lower-cased, `None` when empty.
    pub fn cluster_identity(&self) -> Option<String> {
        let id = self.user_assigned_identity_id.trim();
        (!id.is_empty()).then(|| id.to_ascii_lowercase())
    }

    /// How MIC authenticates to Resource Manager, checking that the needed values are there.
    pub fn credential(&self) -> Result<ArmCredential, CloudError> {
        self.require(
            "subscriptionId",
            "SUBSCRIPTION_ID",
            &self.subscription_id,
            "",
        )?;
        self.require(
            "resourceGroup",
            "RESOURCE_GROUP",
            &self.resource_group,
            " (the resource group of the nodes' VMs and VM scale sets)",
        )?;
        if self.use_managed_identity {
            let id = self.user_assigned_identity_id.trim();
            return Ok(ArmCredential::ManagedIdentity {
                client_id: (!id.is_empty()).then(|| id.to_owned()),
            });
        }
        let why = " (useManagedIdentityExtension is false, so a service principal is used)";
        self.require("tenantId", "TENANT_ID", &self.tenant_id, why)?;
        self.require("aadClientId", "CLIENT_ID", &self.client_id, why)?;
        if self.client_secret.is_empty() {
            return Err(self.missing("aadClientSecret", "CLIENT_SECRET", why));
        }
        Ok(ArmCredential::ClientSecret {
            tenant_id: self.tenant_id.clone(),
            client_id: self.client_id.clone(),
            secret: self.client_secret.clone(),
        })
    }

    fn require(
        &self,
        key: &'static str,
        var: &'static str,
        value: &str,
        why: &'static str,
    ) -> Result<(), CloudError> {
        if value.trim().is_empty() {
            return Err(self.missing(key, var, why));
        }
        Ok(())
    }

    fn missing(&self, key: &'static str, var: &'static str, why: &'static str) -> CloudError {
        match &self.source {
            Some(CloudConfigSource::File(path)) => CloudError::Missing {
                source_name: format!("file {}", path.display()),
                field: key,
                why,
            },
            Some(CloudConfigSource::Environment) => CloudError::Missing {
                source_name: "environment".to_owned(),
                field: var,
                why,
            },
            None => CloudError::Missing {
                source_name: "azure.json".to_owned(),
                field: key,
                why,
            },
        }
    }
}

/// serde's messages may quote the offending value (`invalid type: string "s3cr3t"`); keep the
/// field path and position, drop quoted values.
fn redact_parse_error(e: &serde_norway::Error) -> String {
    let text = e.to_string();
    let mut out = String::with_capacity(text.len());
    let mut in_quote: Option<char> = None;
    for c in text.chars() {
        match in_quote {
            Some(q) if c == q => {
                in_quote = None;
                out.push('…');
                out.push(c);
            }
            Some(_) => {}
            None if c == '"' || c == '`' => {
                in_quote = Some(c);
                out.push(c);
            }
            None => out.push(c),
        }
    }
    if in_quote.is_some() {
        out.push('…');
    }
    out
}

/// How MIC authenticates to Azure Resource Manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArmCredential {
    /// A managed identity through IMDS; `None` is the system-assigned identity.
    ManagedIdentity {
        /// Client id of the user-assigned identity.
        client_id: Option<String>,
    },
    /// A service principal with a client secret.
    ClientSecret {
        /// Tenant.
        tenant_id: String,
        /// Client id.
        client_id: String,
        /// The secret (redacted in `Debug`).
        secret: Secret,
    },
}

/// The endpoints of one Azure cloud that MIC uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AzureEnvironment {
    /// Canonical name (`AzurePublicCloud`, …).
    pub name: String,
    /// Resource Manager base URL, also the token resource for ARM.
    pub resource_manager_endpoint: String,
    /// Entra authority base URL.
    pub active_directory_endpoint: String,
}

impl AzureEnvironment {
    /// The environment named by azure.json's `cloud` (case-insensitive, as autorest):
    /// `AzurePublicCloud`/`AzureCloud`, `AzureChinaCloud`, `AzureGermanCloud`,
    /// `AzureUSGovernmentCloud`/`AzureUSGovernment`, or `AzureStackCloud`, whose endpoints come
    /// from the JSON file named by env `AZURE_ENVIRONMENT_FILEPATH`.
    pub fn from_name(name: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self, CloudError> {
        let known = |name: &str, arm: &str, aad: &str| Self {
            name: name.to_owned(),
            resource_manager_endpoint: arm.to_owned(),
            active_directory_endpoint: aad.to_owned(),
        };
        match name.trim().to_ascii_uppercase().as_str() {
            "AZURECLOUD" | "AZUREPUBLICCLOUD" => Ok(known(
                "AzurePublicCloud",
                "https://management.azure.com/",
                "https://login.microsoftonline.com/",
            )),
            "AZURECHINACLOUD" => Ok(known(
                "AzureChinaCloud",
                "https://management.chinacloudapi.cn/",
                "https://login.chinacloudapi.cn/",
            )),
            "AZUREGERMANCLOUD" => Ok(known(
                "AzureGermanCloud",
                "https://management.microsoftazure.de/",
                "https://login.microsoftonline.de/",
            )),
            "AZUREUSGOVERNMENT" | "AZUREUSGOVERNMENTCLOUD" => Ok(known(
                "AzureUSGovernmentCloud",
                "https://management.usgovcloudapi.net/",
                "https://login.microsoftonline.us/",
            )),
            "AZURESTACKCLOUD" => {
                let path = PathBuf::from(env("AZURE_ENVIRONMENT_FILEPATH").unwrap_or_default());
                Self::from_file(&path)
            }
            _ => Err(CloudError::UnknownCloud(name.to_owned())),
        }
    }

    /// Reads an autorest environment file (keys `name`, `resourceManagerEndpoint`,
    /// `activeDirectoryEndpoint`).
    pub fn from_file(path: &Path) -> Result<Self, CloudError> {
        let fail = |detail: String| CloudError::EnvironmentFile {
            path: path.to_owned(),
            detail,
        };
        if path.as_os_str().is_empty() {
            return Err(fail("the variable is not set".to_owned()));
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct File {
            #[serde(default)]
            name: String,
            resource_manager_endpoint: String,
            active_directory_endpoint: String,
        }
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        let file: File = serde_json::from_str(&text).map_err(|e| fail(e.to_string()))?;
        Ok(Self {
            name: file.name,
            resource_manager_endpoint: file.resource_manager_endpoint,
            active_directory_endpoint: file.active_directory_endpoint,
        })
    }
}

/// The endpoints MIC talks to, after the command-line overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// Resource Manager base URL, without a trailing `/`.
    pub arm: String,
    /// Token resource (audience) for Resource Manager: the cloud's Resource Manager endpoint
    /// (with its trailing `/`), even when `arm` is overridden.
    pub arm_resource: String,
    /// Entra authority base URL, without a trailing `/`.
    pub aad_authority: String,
    /// IMDS base URL, without a trailing `/`.
    pub imds: String,
}

impl Endpoints {
    /// Resolves the cloud's endpoints and applies the overrides. When both `--arm-endpoint` and
    /// `--aad-authority` are given, `cloud` may be empty (the token resource is then the public
    /// cloud's).
    pub fn resolve(
        cloud: &CloudConfig,
        overrides: &EndpointOverrides,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, CloudError> {
        let environment = match AzureEnvironment::from_name(&cloud.cloud, env) {
            Ok(environment) => environment,
            Err(CloudError::UnknownCloud(name))
                if name.trim().is_empty()
                    && overrides.arm.is_some()
                    && overrides.aad_authority.is_some() =>
            {
                AzureEnvironment::from_name("AzurePublicCloud", |_| None)?
            }
            Err(e) => return Err(e),
        };
        let trim = |s: &str| s.trim_end_matches('/').to_owned();
        Ok(Self {
            arm: trim(
                overrides
                    .arm
                    .as_deref()
                    .unwrap_or(&environment.resource_manager_endpoint),
            ),
            arm_resource: environment.resource_manager_endpoint.clone(),
            aad_authority: trim(
                overrides
                    .aad_authority
                    .as_deref()
                    .unwrap_or(&environment.active_directory_endpoint),
            ),
            imds: trim(&overrides.imds),
        })
    }
}
