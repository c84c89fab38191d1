//! The world model: tenant, applications (service principals and managed identities) with their
//! credentials, user-assigned identities, VMs and VMSS with their identity assignments.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use jsonwebtoken::DecodingKey;
use podid_test_keys::{Certificate, SigningKey};

use crate::error::Error;
use crate::util::{guid, secret_value};

/// Entra's limit on federated identity credentials per application or managed identity.
pub const MAX_FEDERATED_CREDENTIALS: usize = 20;

/// A user-assigned managed identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserAssignedIdentity {
    /// Resource name.
    pub name: String,
    /// Subscription holding it.
    pub subscription_id: String,
    /// Resource group holding it.
    pub resource_group: String,
    /// `/subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.ManagedIdentity/userAssignedIdentities/<name>`.
    pub resource_id: String,
    /// Application (client) id.
    pub client_id: String,
    /// Principal (object) id of its service principal.
    pub principal_id: String,
}

/// An app registration with its service principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePrincipal {
    /// Display name.
    pub display_name: String,
    /// Application (client) id.
    pub client_id: String,
    /// Object id of the service principal (the `oid` of its tokens).
    pub object_id: String,
}

/// A federated identity credential: which external tokens may be exchanged for the app's tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederatedCredential {
    /// Credential name.
    pub name: String,
    /// Exact `iss` of accepted assertions.
    pub issuer: String,
    /// Exact `sub` of accepted assertions.
    pub subject: String,
    /// Accepted `aud` values (usually `api://AzureADTokenExchange`).
    pub audiences: Vec<String>,
}

impl FederatedCredential {
    /// A credential with the usual audience `api://AzureADTokenExchange`.
    pub fn new(name: &str, issuer: &str, subject: &str) -> Self {
        Self {
            name: name.to_owned(),
            issuer: issuer.to_owned(),
            subject: subject.to_owned(),
            audiences: vec!["api://AzureADTokenExchange".to_owned()],
        }
    }
}

/// Virtual machine or virtual machine scale set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ComputeKind {
    /// `Microsoft.Compute/virtualMachines`.
    Vm,
    /// `Microsoft.Compute/virtualMachineScaleSets`.
    Vmss,
}

impl ComputeKind {
    pub(crate) fn arm_type(self) -> &'static str {
        match self {
            ComputeKind::Vm => "virtualMachines",
            ComputeKind::Vmss => "virtualMachineScaleSets",
        }
    }
}

/// Names a VM, a VMSS, or one instance of a VMSS (whose IMDS serves the VMSS's identities).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ComputeRef {
    /// VM or VMSS.
    pub kind: ComputeKind,
    /// Subscription id.
    pub subscription_id: String,
    /// Resource group.
    pub resource_group: String,
    /// VM or VMSS name.
    pub name: String,
    /// VMSS instance id, for an instance of a scale set.
    pub instance_id: Option<String>,
}

impl ComputeRef {
    /// ARM resource id of the VM or VMSS (not of the instance).
    pub fn resource_id(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/{}/{}",
            self.subscription_id,
            self.resource_group,
            self.kind.arm_type(),
            self.name
        )
    }

    /// The instance `instance_id` of this scale set.
    pub fn instance(&self, instance_id: &str) -> ComputeRef {
        ComputeRef {
            instance_id: Some(instance_id.to_owned()),
            ..self.clone()
        }
    }

    fn key(&self) -> String {
        self.resource_id().to_ascii_lowercase()
    }
}

/// The `identity.type` of a VM or VMSS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceIdentityType {
    /// No managed identity.
    None,
    /// Only the system-assigned identity.
    SystemAssigned,
    /// Only user-assigned identities.
    UserAssigned,
    /// Both.
    SystemAssignedUserAssigned,
}

impl ResourceIdentityType {
    /// ARM's spelling (`"SystemAssigned, UserAssigned"` for both).
    pub fn as_arm_str(self) -> &'static str {
        match self {
            ResourceIdentityType::None => "None",
            ResourceIdentityType::SystemAssigned => "SystemAssigned",
            ResourceIdentityType::UserAssigned => "UserAssigned",
            ResourceIdentityType::SystemAssignedUserAssigned => "SystemAssigned, UserAssigned",
        }
    }

    /// Parses ARM's spelling, case-insensitively and ignoring spaces.
    pub fn parse(s: &str) -> Option<Self> {
        let norm: String = s
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect::<String>()
            .to_ascii_lowercase();
        match norm.as_str() {
            "" | "none" => Some(ResourceIdentityType::None),
            "systemassigned" => Some(ResourceIdentityType::SystemAssigned),
            "userassigned" => Some(ResourceIdentityType::UserAssigned),
            "systemassigned,userassigned" | "userassigned,systemassigned" => {
                Some(ResourceIdentityType::SystemAssignedUserAssigned)
            }
            _ => None,
        }
    }

    /// Whether the system-assigned identity is enabled.
    pub fn has_system(self) -> bool {
        matches!(
            self,
            ResourceIdentityType::SystemAssigned | ResourceIdentityType::SystemAssignedUserAssigned
        )
    }

    /// Whether user-assigned identities are enabled.
    pub fn has_user(self) -> bool {
        matches!(
            self,
            ResourceIdentityType::UserAssigned | ResourceIdentityType::SystemAssignedUserAssigned
        )
    }

    pub(crate) fn from_flags(system: bool, user: bool) -> Self {
        match (system, user) {
            (false, false) => ResourceIdentityType::None,
            (true, false) => ResourceIdentityType::SystemAssigned,
            (false, true) => ResourceIdentityType::UserAssigned,
            (true, true) => ResourceIdentityType::SystemAssignedUserAssigned,
        }
    }
}

/// A client secret; never printed.
#[derive(Clone)]
pub(crate) struct Secret(pub(crate) String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A registered certificate credential: thumbprints and the public key.
#[derive(Clone)]
pub(crate) struct CertCredential {
    pub(crate) x5t: String,
    pub(crate) x5t_s256: String,
    pub(crate) key: DecodingKey,
}

impl std::fmt::Debug for CertCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertCredential")
            .field("x5t", &self.x5t)
            .finish_non_exhaustive()
    }
}

/// An application as the token endpoint sees it: service principal or managed identity.
#[derive(Debug, Clone)]
pub(crate) struct App {
    pub(crate) client_id: String,
    pub(crate) object_id: String,
    /// Resource id for managed identities (the `xms_mirid` claim).
    pub(crate) mi_resource_id: Option<String>,
    pub(crate) secrets: Vec<Secret>,
    pub(crate) certs: Vec<CertCredential>,
    pub(crate) federated: Vec<FederatedCredential>,
}

/// One user-assigned entry on a VM/VMSS: the id as written and the client id of the identity
/// it was bound to when assigned. An identity deleted and recreated under the same name gets a
/// new client id, so the old entry stays stale (null ids in ARM, `Identity not found` in IMDS)
/// until it is removed, as in Azure.
#[derive(Debug, Clone)]
pub(crate) struct AssignedEntry {
    pub(crate) resource_id: String,
    pub(crate) client_id: Option<String>,
}

impl State {
    /// The live identity an entry refers to, or `None` if the entry is stale.
    pub(crate) fn resolve(
        &self,
        key: &str,
        entry: &AssignedEntry,
    ) -> Option<&UserAssignedIdentity> {
        self.identities
            .get(key)
            .filter(|id| entry.client_id.as_deref() == Some(id.client_id.as_str()))
    }

    /// A new entry for `resource_id`, bound to the identity that exists now (if any).
    pub(crate) fn new_entry(&self, resource_id: &str) -> AssignedEntry {
        AssignedEntry {
            resource_id: resource_id.to_owned(),
            client_id: self
                .identities
                .get(&resource_id.to_ascii_lowercase())
                .map(|id| id.client_id.clone()),
        }
    }
}

/// A VM or VMSS.
#[derive(Debug, Clone)]
pub(crate) struct Compute {
    pub(crate) r: ComputeRef,
    pub(crate) system: bool,
    /// Principal and client id of the system-assigned identity while enabled.
    pub(crate) system_ids: Option<(String, String)>,
    /// Keyed by lower-cased resource id.
    pub(crate) user: BTreeMap<String, AssignedEntry>,
    pub(crate) provisioning_state: String,
}

impl Compute {
    pub(crate) fn identity_type(&self) -> ResourceIdentityType {
        ResourceIdentityType::from_flags(self.system, !self.user.is_empty())
    }
}

/// The change a long-running ARM operation applies when it completes.
#[derive(Debug, Clone)]
pub(crate) struct PendingOp {
    pub(crate) id: String,
    pub(crate) compute_key: String,
    pub(crate) completes_at: Instant,
    pub(crate) started_secs: u64,
    pub(crate) new_system: bool,
    pub(crate) new_user: BTreeMap<String, AssignedEntry>,
    pub(crate) done: bool,
}

#[derive(Debug)]
pub(crate) struct State {
    /// Keyed by lower-cased client id.
    pub(crate) apps: HashMap<String, App>,
    /// Keyed by lower-cased resource id.
    pub(crate) identities: HashMap<String, UserAssignedIdentity>,
    /// Keyed by lower-cased resource id.
    pub(crate) computes: HashMap<String, Compute>,
    pub(crate) ops: Vec<PendingOp>,
    pub(crate) entra_token_lifetime: u64,
    pub(crate) imds_token_lifetime: u64,
    /// Resources (lower-case, without trailing `/`) Entra and IMDS refuse as unknown.
    pub(crate) unknown_resources: std::collections::HashSet<String>,
}

impl State {
    /// Applies every long-running operation whose time has come.
    pub(crate) fn settle(&mut self) {
        let now = Instant::now();
        for op in self
            .ops
            .iter_mut()
            .filter(|o| !o.done && o.completes_at <= now)
        {
            op.done = true;
            if let Some(c) = self.computes.get_mut(&op.compute_key) {
                c.system = op.new_system;
                if c.system && c.system_ids.is_none() {
                    c.system_ids = Some((guid(), guid()));
                }
                if !c.system {
                    c.system_ids = None;
                }
                c.user = op.new_user.clone();
                // A state set meanwhile (e.g. `Deleting`) wins over the operation's end.
                if c.provisioning_state == "Updating" {
                    c.provisioning_state = "Succeeded".to_owned();
                }
            }
        }
    }
}

pub(crate) struct Inner {
    pub(crate) tenant_id: String,
    pub(crate) subscription_id: String,
    pub(crate) resource_group: String,
    pub(crate) location: String,
    pub(crate) key: SigningKey,
    pub(crate) state: Mutex<State>,
    pub(crate) jwks_cache: Mutex<HashMap<String, jsonwebtoken::jwk::JwkSet>>,
    /// Issuer → base URL where its OIDC discovery document is served, when not at the issuer.
    pub(crate) discovery_overrides: Mutex<HashMap<String, String>>,
    pub(crate) http: Mutex<Option<reqwest::Client>>,
    pub(crate) entra_log: Mutex<Vec<crate::entra::EntraCall>>,
}

/// The simulated cloud: one tenant, its applications and identities, its VMs and VMSS.
/// Cheap to clone (shared state); every server takes one.
#[derive(Clone)]
pub struct Cloud {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Cloud {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cloud")
            .field("tenant_id", &self.inner.tenant_id)
            .field("subscription_id", &self.inner.subscription_id)
            .finish_non_exhaustive()
    }
}

fn resource_key(resource: &str) -> String {
    resource.trim_end_matches('/').to_ascii_lowercase()
}

/// Entra's AADSTS500011 text for an unknown resource.
pub(crate) fn unknown_resource_message(resource: &str, tenant: &str) -> String {
    format!(
        "The resource principal named {resource} was not found in the tenant named {tenant}. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You might have sent your authentication request to the wrong tenant."
    )
}

fn identity_resource_id(sub: &str, rg: &str, name: &str) -> String {
    format!(
        "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
    )
}

impl Cloud {
    /// A new cloud with a random tenant id, a default subscription and resource group
    /// (`podid-nodes`), location `westeurope`, and a fresh token-signing key.
    pub fn new() -> Result<Self, Error> {
        Self::with_tenant(&guid())
    }

    /// Like [`Cloud::new`] with a chosen tenant id.
    pub fn with_tenant(tenant_id: &str) -> Result<Self, Error> {
        let key = SigningKey::generate().map_err(Error::Keys)?;
        Ok(Self {
            inner: Arc::new(Inner {
                tenant_id: tenant_id.to_owned(),
                subscription_id: guid(),
                resource_group: "podid-nodes".to_owned(),
                location: "westeurope".to_owned(),
                key,
                state: Mutex::new(State {
                    apps: HashMap::new(),
                    identities: HashMap::new(),
                    computes: HashMap::new(),
                    ops: Vec::new(),
                    entra_token_lifetime: 3599,
                    imds_token_lifetime: 86_399,
                    unknown_resources: std::collections::HashSet::new(),
                }),
                jwks_cache: Mutex::new(HashMap::new()),
                discovery_overrides: Mutex::new(HashMap::new()),
                http: Mutex::new(None),
                entra_log: Mutex::new(Vec::new()),
            }),
        })
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock only happens in a failing test; keep going.
        let mut g = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        g.settle();
        g
    }

    /// The tenant id.
    pub fn tenant_id(&self) -> &str {
        &self.inner.tenant_id
    }

    /// The default subscription id.
    pub fn subscription_id(&self) -> &str {
        &self.inner.subscription_id
    }

    /// The default resource group.
    pub fn resource_group(&self) -> &str {
        &self.inner.resource_group
    }

    /// The cloud config (AKS's `azure.json`) an operator such as MIC reads to manage VMs and
    /// scale sets in the default resource group, signing in as the service principal
    /// `client_id` with `secret`.
    pub fn azure_json(&self, client_id: &str, secret: &str) -> String {
        serde_json::json!({
            "cloud": "AzurePublicCloud",
            "tenantId": self.tenant_id(),
            "aadClientId": client_id,
            "aadClientSecret": secret,
            "subscriptionId": self.subscription_id(),
            "resourceGroup": self.resource_group(),
            "vmType": "vmss",
        })
        .to_string()
    }

    /// The location reported for VMs and operations.
    pub fn location(&self) -> &str {
        &self.inner.location
    }

    /// JWKS of the key that signs this cloud's access tokens.
    pub fn jwks(&self) -> serde_json::Value {
        podid_test_keys::jwks([&self.inner.key])
    }

    /// Fetch the OIDC discovery document of `issuer` from `<base_url>/.well-known/openid-configuration`
    /// instead of from the issuer URL itself (for issuers such as `https://kubernetes.default.svc`
    /// whose documents a fake API server serves elsewhere). Clears that issuer's cached keys.
    pub fn set_issuer_discovery_url(&self, issuer: &str, base_url: &str) {
        self.inner
            .discovery_overrides
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(issuer.to_owned(), base_url.to_owned());
        self.forget_issuer_keys(issuer);
    }

    /// Drops the cached signing keys of `issuer` (the next federated exchange refetches them).
    pub fn forget_issuer_keys(&self, issuer: &str) {
        self.inner
            .jwks_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(issuer);
    }

    /// Makes Entra and IMDS refuse tokens for `resource` as an unknown resource principal
    /// (AADSTS500011). Every other resource is accepted.
    pub fn mark_resource_unknown(&self, resource: &str) {
        self.state()
            .unknown_resources
            .insert(resource_key(resource));
    }

    pub(crate) fn is_resource_unknown(&self, resource: &str) -> bool {
        self.state()
            .unknown_resources
            .contains(&resource_key(resource))
    }

    /// Lifetime (seconds) of tokens from the Entra token endpoint (default 3599).
    pub fn set_entra_token_lifetime(&self, secs: u64) {
        self.state().entra_token_lifetime = secs;
    }

    /// Lifetime (seconds) of tokens from IMDS (default 86399).
    pub fn set_imds_token_lifetime(&self, secs: u64) {
        self.state().imds_token_lifetime = secs;
    }

    /// Adds a user-assigned identity in the default subscription and resource group.
    pub fn add_user_assigned_identity(&self, name: &str) -> UserAssignedIdentity {
        let (sub, rg) = (
            self.inner.subscription_id.clone(),
            self.inner.resource_group.clone(),
        );
        self.add_user_assigned_identity_in(&sub, &rg, name)
    }

    /// Adds a user-assigned identity in a chosen subscription and resource group.
    pub fn add_user_assigned_identity_in(
        &self,
        subscription_id: &str,
        resource_group: &str,
        name: &str,
    ) -> UserAssignedIdentity {
        let id = UserAssignedIdentity {
            name: name.to_owned(),
            subscription_id: subscription_id.to_owned(),
            resource_group: resource_group.to_owned(),
            resource_id: identity_resource_id(subscription_id, resource_group, name),
            client_id: guid(),
            principal_id: guid(),
        };
        let mut st = self.state();
        st.apps.insert(
            id.client_id.to_ascii_lowercase(),
            App {
                client_id: id.client_id.clone(),
                object_id: id.principal_id.clone(),
                mi_resource_id: Some(id.resource_id.clone()),
                secrets: Vec::new(),
                certs: Vec::new(),
                federated: Vec::new(),
            },
        );
        st.identities
            .insert(id.resource_id.to_ascii_lowercase(), id.clone());
        id
    }

    /// Deletes a user-assigned identity. Assignments on VMs/VMSS stay behind as stale entries
    /// (ARM then reports them with null ids, and IMDS cannot issue tokens for them), as in Azure.
    pub fn delete_user_assigned_identity(&self, identity: &UserAssignedIdentity) {
        let mut st = self.state();
        st.identities
            .remove(&identity.resource_id.to_ascii_lowercase());
        st.apps.remove(&identity.client_id.to_ascii_lowercase());
    }

    /// The user-assigned identity with this resource id (case-insensitive), if it exists.
    pub fn user_assigned_identity(&self, resource_id: &str) -> Option<UserAssignedIdentity> {
        self.state()
            .identities
            .get(&resource_id.to_ascii_lowercase())
            .cloned()
    }

    /// Adds an app registration with its service principal (no credentials yet).
    pub fn add_service_principal(&self, display_name: &str) -> ServicePrincipal {
        let sp = ServicePrincipal {
            display_name: display_name.to_owned(),
            client_id: guid(),
            object_id: guid(),
        };
        self.state().apps.insert(
            sp.client_id.to_ascii_lowercase(),
            App {
                client_id: sp.client_id.clone(),
                object_id: sp.object_id.clone(),
                mi_resource_id: None,
                secrets: Vec::new(),
                certs: Vec::new(),
                federated: Vec::new(),
            },
        );
        sp
    }

    fn with_app<T>(&self, client_id: &str, f: impl FnOnce(&mut App) -> T) -> Result<T, Error> {
        let mut st = self.state();
        let app = st
            .apps
            .get_mut(&client_id.to_ascii_lowercase())
            .ok_or_else(|| Error::UnknownApp {
                client_id: client_id.to_owned(),
            })?;
        Ok(f(app))
    }

    /// Generates a new client secret for the application and returns its value.
    pub fn add_client_secret(&self, client_id: &str) -> Result<String, Error> {
        let value = secret_value();
        self.add_client_secret_value(client_id, &value)?;
        Ok(value)
    }

    /// Registers a chosen client secret value for the application.
    pub fn add_client_secret_value(&self, client_id: &str, secret: &str) -> Result<(), Error> {
        self.with_app(client_id, |a| a.secrets.push(Secret(secret.to_owned())))
    }

    /// Registers a certificate credential (matched by `x5t` / `x5t#S256`).
    pub fn add_certificate(&self, client_id: &str, cert: &Certificate) -> Result<(), Error> {
        let cred = CertCredential {
            x5t: cert.x5t(),
            x5t_s256: cert.x5t_s256(),
            key: cert.key().decoding_key().clone(),
        };
        self.with_app(client_id, |a| a.certs.push(cred))
    }

    /// Adds a federated identity credential to an application or user-assigned identity.
    /// Fails beyond [`MAX_FEDERATED_CREDENTIALS`], as Entra does.
    pub fn add_federated_credential(
        &self,
        client_id: &str,
        credential: FederatedCredential,
    ) -> Result<(), Error> {
        self.with_app(client_id, |a| {
            if a.federated.len() >= MAX_FEDERATED_CREDENTIALS {
                return Err(Error::TooManyFederatedCredentials {
                    client_id: a.client_id.clone(),
                });
            }
            a.federated.push(credential);
            Ok(())
        })?
    }

    fn add_compute(&self, kind: ComputeKind, sub: &str, rg: &str, name: &str) -> ComputeRef {
        let r = ComputeRef {
            kind,
            subscription_id: sub.to_owned(),
            resource_group: rg.to_owned(),
            name: name.to_owned(),
            instance_id: None,
        };
        self.state().computes.insert(
            r.key(),
            Compute {
                r: r.clone(),
                system: false,
                system_ids: None,
                user: BTreeMap::new(),
                provisioning_state: "Succeeded".to_owned(),
            },
        );
        r
    }

    /// Adds a virtual machine scale set without identities.
    pub fn add_vmss(&self, subscription_id: &str, resource_group: &str, name: &str) -> ComputeRef {
        self.add_compute(ComputeKind::Vmss, subscription_id, resource_group, name)
    }

    /// Adds a virtual machine without identities.
    pub fn add_vm(&self, subscription_id: &str, resource_group: &str, name: &str) -> ComputeRef {
        self.add_compute(ComputeKind::Vm, subscription_id, resource_group, name)
    }

    fn with_compute<T>(
        &self,
        r: &ComputeRef,
        f: impl FnOnce(&mut Compute) -> T,
    ) -> Result<T, Error> {
        let mut st = self.state();
        let c = st
            .computes
            .get_mut(&r.key())
            .ok_or_else(|| Error::UnknownCompute {
                resource_id: r.resource_id(),
            })?;
        Ok(f(c))
    }

    /// Assigns a user-assigned identity to a VM or VMSS at once (as if done out of band).
    pub fn assign_identity(
        &self,
        compute: &ComputeRef,
        identity: &UserAssignedIdentity,
    ) -> Result<(), Error> {
        self.with_compute(compute, |c| {
            c.user.insert(
                identity.resource_id.to_ascii_lowercase(),
                AssignedEntry {
                    resource_id: identity.resource_id.clone(),
                    client_id: Some(identity.client_id.clone()),
                },
            );
        })
    }

    /// Removes a user-assigned identity from a VM or VMSS at once.
    pub fn unassign_identity(
        &self,
        compute: &ComputeRef,
        identity: &UserAssignedIdentity,
    ) -> Result<(), Error> {
        self.with_compute(compute, |c| {
            c.user.remove(&identity.resource_id.to_ascii_lowercase());
        })
    }

    /// Enables or disables the system-assigned identity; returns its principal id when enabled.
    pub fn set_system_assigned(
        &self,
        compute: &ComputeRef,
        enabled: bool,
    ) -> Result<Option<String>, Error> {
        self.with_compute(compute, |c| {
            c.system = enabled;
            if enabled && c.system_ids.is_none() {
                c.system_ids = Some((guid(), guid()));
            }
            if !enabled {
                c.system_ids = None;
            }
            c.system_ids.as_ref().map(|(p, _)| p.clone())
        })
    }

    /// Resource ids of the user-assigned identities currently on the VM/VMSS (as written).
    pub fn assigned_identities(&self, compute: &ComputeRef) -> Result<Vec<String>, Error> {
        self.with_compute(compute, |c| {
            c.user.values().map(|e| e.resource_id.clone()).collect()
        })
    }

    /// The current identity type of the VM/VMSS.
    pub fn identity_type(&self, compute: &ComputeRef) -> Result<ResourceIdentityType, Error> {
        self.with_compute(compute, |c| c.identity_type())
    }

    /// Sets `provisioningState` (e.g. `Deleting`, which makes ARM refuse updates).
    pub fn set_provisioning_state(&self, compute: &ComputeRef, state: &str) -> Result<(), Error> {
        self.with_compute(compute, |c| c.provisioning_state = state.to_owned())
    }

    /// Number of long-running ARM operations not yet completed.
    pub fn pending_operations(&self) -> usize {
        self.state().ops.iter().filter(|o| !o.done).count()
    }

    /// The application record for a client id (credentials included), if any.
    pub(crate) fn app(&self, client_id: &str) -> Option<App> {
        self.state()
            .apps
            .get(&client_id.to_ascii_lowercase())
            .cloned()
    }

    /// Waits until no long-running operation is pending, or `timeout` passes.
    pub async fn wait_operations_settled(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.pending_operations() == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_types_parse_arm_spellings() {
        for (s, t) in [
            ("None", ResourceIdentityType::None),
            ("", ResourceIdentityType::None),
            ("systemassigned", ResourceIdentityType::SystemAssigned),
            ("UserAssigned", ResourceIdentityType::UserAssigned),
            (
                "SystemAssigned, UserAssigned",
                ResourceIdentityType::SystemAssignedUserAssigned,
            ),
            (
                "SystemAssigned,UserAssigned",
                ResourceIdentityType::SystemAssignedUserAssigned,
            ),
        ] {
            assert_eq!(ResourceIdentityType::parse(s), Some(t), "{s}");
        }
        assert_eq!(ResourceIdentityType::parse("Both"), None);
        assert_eq!(
            ResourceIdentityType::SystemAssignedUserAssigned.as_arm_str(),
            "SystemAssigned, UserAssigned"
        );
        assert_eq!(
            ResourceIdentityType::from_flags(true, true),
            ResourceIdentityType::SystemAssignedUserAssigned
        );
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let cloud = Cloud::new().expect("cloud");
        let sp = cloud.add_service_principal("x");
        let secret = cloud.add_client_secret(&sp.client_id).expect("secret");
        let state = format!("{:?}", *cloud.state());
        assert!(state.contains(&sp.client_id));
        assert!(!state.contains(&secret));
        assert!(!format!("{cloud:?}").contains(&secret));
    }
}
