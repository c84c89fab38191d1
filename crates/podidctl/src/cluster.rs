//! Reading the cluster: client configuration (kubeconfig, context, in-cluster) and the
//! [`Snapshot`] the explanations work on. Read-only: only GET and LIST requests.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use podid_api::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzurePodIdentityException,
    FEDERATED_SERVICE_ACCOUNT_ANNOTATION,
};
use podid_select::matching::CallerPod;
use podid_select::workload::service_account_name;
use serde::de::DeserializeOwned;

use crate::error::Error;
use crate::explain::{SecretState, Snapshot, referenced_secrets};

/// Key of MIC's hold record in its ConfigMap.
const HELD_KEY: &str = "podid-held-identities";

/// MIC's record of held identities.
#[derive(Debug, serde::Deserialize)]
struct HeldRecord {
    #[serde(default)]
    held: Vec<HeldIdentity>,
}

/// An identity MIC keeps on a VM/VMSS after its last pod (mic `--identity-release-grace-period`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct HeldIdentity {
    /// `vmss` or `vm`.
    pub kind: String,
    /// VM or scale set name.
    pub name: String,
    /// The identity's resource id (lower-cased).
    pub id: String,
    /// When its last pod went (seconds since the epoch).
    pub since: u64,
    /// When MIC releases it (seconds since the epoch).
    pub until: u64,
}

/// Which pods a snapshot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Pods of one namespace.
    Namespace(String),
    /// Pods of every namespace.
    All,
}

/// A connection to one cluster.
#[derive(Clone)]
pub struct Cluster {
    client: Client,
    url: String,
    default_namespace: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("url", &self.url)
            .field("default_namespace", &self.default_namespace)
            .finish_non_exhaustive()
    }
}

fn read_error(what: impl Into<String>, url: &str, err: kube::Error) -> Error {
    match err {
        kube::Error::Api(status) => Error::Read {
            what: what.into(),
            detail: format!("{} {}", status.code, status.message),
        },
        other => Error::Unreachable {
            url: url.to_owned(),
            source: other,
        },
    }
}

impl Cluster {
    /// Connects through `kubeconfig` (or $KUBECONFIG / ~/.kube/config, then in-cluster) and
    /// `context` (or the current one). No request is made yet.
    pub async fn connect(kubeconfig: Option<&Path>, context: Option<&str>) -> Result<Self, Error> {
        let options = KubeConfigOptions {
            context: context.map(str::to_owned),
            ..Default::default()
        };
        let mut config = match kubeconfig {
            Some(path) => {
                let file = Kubeconfig::read_from(path).map_err(|e| Error::Config(Box::new(e)))?;
                Config::from_custom_kubeconfig(file, &options)
                    .await
                    .map_err(|e| Error::Config(Box::new(e)))?
            }
            None if context.is_some() => Config::from_kubeconfig(&options)
                .await
                .map_err(|e| Error::Config(Box::new(e)))?,
            None => Config::infer()
                .await
                .map_err(|e| Error::Config(Box::new(e)))?,
        };
        config.connect_timeout = Some(Duration::from_secs(5));
        config.read_timeout = Some(Duration::from_secs(30));
        let url = config
            .cluster_url
            .to_string()
            .trim_end_matches('/')
            .to_owned();
        let default_namespace = config.default_namespace.clone();
        let client = Client::try_from(config).map_err(|e| Error::Config(Box::new(e)))?;
        Ok(Self {
            client,
            url,
            default_namespace,
        })
    }

    /// The kubeconfig's namespace (or `default`).
    pub fn default_namespace(&self) -> &str {
        &self.default_namespace
    }

    /// The API server URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    async fn list_all<K>(&self, what: &str) -> Result<Vec<K>, Error>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let api: Api<K> = Api::all(self.client.clone());
        api.list(&ListParams::default())
            .await
            .map(|l| l.items)
            .map_err(|e| read_error(what, &self.url, e))
    }

    /// One pod.
    pub async fn pod(&self, namespace: &str, name: &str) -> Result<Pod, Error> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        match api.get_opt(name).await {
            Ok(Some(pod)) => Ok(pod),
            Ok(None) => Err(Error::PodNotFound {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            }),
            Err(e) => Err(read_error(format!("pod {namespace}/{name}"), &self.url, e)),
        }
    }

    /// The identities MIC holds on VMs/VMSS after their last pod: the record in MIC's
    /// ConfigMap `config_map` of `namespace` (key `podid-held-identities`). Empty when the
    /// ConfigMap, the key or the permission to read it is missing, or the record is unreadable.
    pub async fn held_identities(&self, namespace: &str, config_map: &str) -> Vec<HeldIdentity> {
        let api: Api<k8s_openapi::api::core::v1::ConfigMap> =
            Api::namespaced(self.client.clone(), namespace);
        let Ok(Some(map)) = api.get_opt(config_map).await else {
            return Vec::new();
        };
        let Some(text) = map.data.as_ref().and_then(|d| d.get(HELD_KEY)) else {
            return Vec::new();
        };
        serde_json::from_str::<HeldRecord>(text)
            .map(|r| r.held)
            .unwrap_or_default()
    }

    /// Pods of `scope`.
    pub async fn pods(&self, scope: &Scope) -> Result<Vec<Pod>, Error> {
        match scope {
            Scope::All => self.list_all("pods in all namespaces").await,
            Scope::Namespace(ns) => {
                let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
                api.list(&ListParams::default())
                    .await
                    .map(|l| l.items)
                    .map_err(|e| read_error(format!("pods in namespace {ns}"), &self.url, e))
            }
        }
    }

    /// Everything about `pods`: the four custom resources (all namespaces), the service
    /// accounts the pods and the shared subjects name (plus `extra_service_accounts`), and the
    /// state of the Secrets identities reference.
    pub async fn snapshot(
        &self,
        pods: Vec<Pod>,
        extra_service_accounts: &[(String, String)],
    ) -> Result<Snapshot, Error> {
        let identities: Vec<AzureIdentity> = self.list_all("AzureIdentities").await?;
        let bindings: Vec<AzureIdentityBinding> = self.list_all("AzureIdentityBindings").await?;
        let assignments: Vec<AzureAssignedIdentity> =
            self.list_all("AzureAssignedIdentities").await?;
        let exceptions: Vec<AzurePodIdentityException> =
            self.list_all("AzurePodIdentityExceptions").await?;

        let mut wanted: BTreeSet<(String, String)> = pods
            .iter()
            .map(|p| {
                let c = CallerPod::of(p);
                let account = service_account_name(&c).to_owned();
                (c.namespace, account)
            })
            .collect();
        wanted.extend(extra_service_accounts.iter().cloned());
        let shared = identities
            .iter()
            .map(|i| &i.metadata)
            .chain(bindings.iter().map(|b| &b.metadata))
            .filter_map(|m| {
                let value = m
                    .annotations
                    .as_ref()?
                    .get(FEDERATED_SERVICE_ACCOUNT_ANNOTATION)?
                    .trim();
                if value.is_empty() {
                    return None;
                }
                Some(match value.split_once('/') {
                    Some((ns, name)) => (ns.to_owned(), name.to_owned()),
                    None => (m.namespace.clone().unwrap_or_default(), value.to_owned()),
                })
            });
        wanted.extend(shared);

        let mut snapshot = Snapshot {
            pods,
            identities,
            bindings,
            assignments,
            exceptions,
            ..Default::default()
        };
        for (ns, name) in wanted {
            let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &ns);
            match api.get_opt(&name).await {
                Ok(sa) => {
                    snapshot.service_accounts.insert((ns, name), sa);
                }
                // Without permission the account's state stays unknown (absent from the map).
                Err(kube::Error::Api(_)) => {}
                Err(e) => return Err(read_error("service accounts", &self.url, e)),
            }
        }
        for (ns, name) in referenced_secrets(&snapshot.identities) {
            let api: Api<Secret> = Api::namespaced(self.client.clone(), &ns);
            let state = match api.get_opt(&name).await {
                Ok(Some(secret)) => SecretState::Present {
                    keys: secret
                        .data
                        .map(|d| d.into_keys().collect())
                        .unwrap_or_default(),
                },
                Ok(None) => SecretState::Missing,
                Err(kube::Error::Api(status)) => SecretState::Unknown {
                    reason: format!("{} {}", status.code, status.reason),
                },
                Err(e) => return Err(read_error("secrets", &self.url, e)),
            };
            snapshot.secrets.insert((ns, name), state);
        }
        Ok(snapshot)
    }

    /// The service-account issuer from the API server's
    /// `/.well-known/openid-configuration`.
    pub async fn issuer(&self) -> Result<String, Error> {
        let issuer_error = |source: Box<dyn std::error::Error + Send + Sync>| Error::Issuer {
            url: self.url.clone(),
            source,
        };
        let request = http::Request::get("/.well-known/openid-configuration")
            .body(Vec::new())
            .map_err(|e| issuer_error(Box::new(e)))?;
        let text = self
            .client
            .request_text(request)
            .await
            .map_err(|e| issuer_error(Box::new(e)))?;
        let doc: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| issuer_error(Box::new(e)))?;
        doc.get("issuer")
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| issuer_error("the document has no issuer".into()))
    }
}
