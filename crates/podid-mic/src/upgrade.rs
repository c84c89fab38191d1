//! The one-time type upgrade upstream MIC runs when it becomes leader
//! (docs/upstream.md#type-upgrade).
//!
//! With `--enable-type-upgrade` (default on): GET ConfigMap `<MIC_POD_NAMESPACE>/<--config-map-name>`.
//! When its key `--type-upgrade-status-key` is absent, every
//! AzureIdentity, AzureIdentityBinding and AzurePodIdentityException is read raw, its keys are
//! matched case-insensitively against the current field names (the capitalised keys of
//! releases before 1.6 — `ResourceID`, `ClientID`, `Selector`, `PodLabels` … — become
//! `resourceID`, `clientID`, `selector`, `podLabels`) and it is PUT back; then every
//! AzureAssignedIdentity is PUT back the same way with its embedded identity and binding
//! replaced by the current objects. Finally the key is set to MIC's version (a missing ConfigMap is
//! created with the key then, in one write, where upstream creates it empty first).
//!
//! Unlike upstream, an object whose stored form the upgrade would not change (already in the
//! current shape, embedded copies already current) is not PUT back: on a cluster written by
//! MIC ≥ 1.6 that is every object, and upstream's rewrite of each one cost a rate-limited
//! write (1,500 on the 5,000-pod benchmark) for nothing. When the
//! key is present, upstream's log line `type upgrade status configmap found from version: <v>.
//! Skipping type upgrade!` is written and nothing else happens.
//!
//! Objects are handled as raw JSON, so fields podid does not know survive the rewrite. A
//! failure stops the upgrade before the marker is written (the next leader tries again); the
//! caller decides whether that is fatal (upstream exits).

use std::collections::HashMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, PostParams};
use serde_json::{Map, Value};
use tracing::info;

/// What to run, from the flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeSettings {
    /// MIC's namespace (`MIC_POD_NAMESPACE`), where the ConfigMap lives.
    pub namespace: String,
    /// `--config-map-name`.
    pub config_map: String,
    /// `--type-upgrade-status-key`.
    pub key: String,
    /// The value written to the key (MIC's version).
    pub version: String,
}

/// The upgrade failed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// Reading or creating the marker ConfigMap failed.
    #[error("failed to read or create ConfigMap {namespace}/{name}")]
    ConfigMap {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Listing a kind failed.
    #[error("failed to list {plural}")]
    List {
        /// The kind's plural.
        plural: &'static str,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Writing one object back failed.
    #[error("failed to upgrade {plural} {namespace}/{name}")]
    Replace {
        /// The kind's plural.
        plural: &'static str,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// An object could not be turned back into an API object.
    #[error("failed to encode {plural} {namespace}/{name}")]
    Encode {
        /// The kind's plural.
        plural: &'static str,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
}

/// What [`run`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The marker was present (the value found).
    Skipped(String),
    /// Objects rewritten (those whose stored form changed), per kind in upgrade order, then
    /// the marker was written.
    Upgraded(Vec<(&'static str, usize)>),
}

/// Current field names, matched case-insensitively against what is stored (the fields of the
/// four kinds' `spec` and `status` and of the Secret reference in `clientPassword`).
const FIELDS: [&str; 23] = [
    "metadata",
    "type",
    "resourceID",
    "clientID",
    "clientPassword",
    "tenantID",
    "auxiliaryTenantIDs",
    "adResourceID",
    "adEndpoint",
    "replicas",
    "azureIdentity",
    "selector",
    "weight",
    "podLabels",
    "azureIdentityRef",
    "azureBindingRef",
    "pod",
    "podNamespace",
    "nodename",
    "name",
    "namespace",
    "status",
    "availableReplicas",
];

/// Fields whose content is user data (label maps) or an embedded object, left as they are.
const OPAQUE: [&str; 4] = [
    "metadata",
    "podLabels",
    "azureIdentityRef",
    "azureBindingRef",
];

/// Renames the keys of `object` that match a current field name case-insensitively but not
/// exactly; where both spellings are present the current one wins. Recurses into nested
/// objects except [`OPAQUE`] ones. Returns whether anything changed.
pub(crate) fn normalize_keys(object: &mut Map<String, Value>) -> bool {
    let mut changed = false;
    let keys: Vec<String> = object.keys().cloned().collect();
    for key in keys {
        let canonical = FIELDS
            .iter()
            .find(|f| f.eq_ignore_ascii_case(&key))
            .copied();
        let name = match canonical {
            Some(field) if field != key => {
                let value = object.remove(&key).unwrap_or(Value::Null);
                changed = true;
                if !object.contains_key(field) {
                    object.insert(field.to_owned(), value);
                }
                field.to_owned()
            }
            _ => key,
        };
        if OPAQUE.contains(&name.as_str()) {
            continue;
        }
        if let Some(Value::Object(inner)) = object.get_mut(&name) {
            changed |= normalize_keys(inner);
        }
    }
    changed
}

/// Normalises `spec` and `status` of an API object (see [`normalize_keys`]).
pub(crate) fn normalize_object(object: &mut Value) {
    for part in ["spec", "status"] {
        if let Some(Value::Object(inner)) = object.get_mut(part) {
            normalize_keys(inner);
        }
    }
}

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: podid_api::GROUP.to_owned(),
        version: podid_api::VERSION.to_owned(),
        api_version: podid_api::API_VERSION.to_owned(),
        kind: kind.to_owned(),
        plural: plural.to_owned(),
    }
}

/// What [`upgrade_kind`] found: the objects it rewrote and the ones already current, by
/// `namespace/name`, each as stored after the step.
#[derive(Debug, Default)]
struct Upgraded {
    written: HashMap<String, Value>,
    unchanged: HashMap<String, Value>,
}

impl Upgraded {
    /// The current version of `key` (rewritten or not).
    fn get(&self, key: &str) -> Option<&Value> {
        self.written.get(key).or_else(|| self.unchanged.get(key))
    }
}

/// Lists `plural`, normalises each object and PUTs back those whose stored form changes
/// (upstream rewrites every object; one already in the current shape is left alone).
async fn upgrade_kind(
    client: &Client,
    kind: &str,
    plural: &'static str,
    fresh: impl Fn(&mut Value),
) -> Result<Upgraded, UpgradeError> {
    let all: Api<DynamicObject> = Api::all_with(client.clone(), &resource(kind, plural));
    let list = all
        .list(&ListParams::default())
        .await
        .map_err(|source| UpgradeError::List { plural, source })?;
    let mut written = HashMap::new();
    let mut unchanged = HashMap::new();
    for object in list.items {
        let namespace = object.metadata.namespace.clone().unwrap_or_default();
        let name = object.metadata.name.clone().unwrap_or_default();
        let encode = |source| UpgradeError::Encode {
            plural,
            namespace: namespace.clone(),
            name: name.clone(),
            source,
        };
        let stored = serde_json::to_value(&object).map_err(encode)?;
        let mut value = stored.clone();
        normalize_object(&mut value);
        fresh(&mut value);
        if value == stored {
            // Already in the current shape (every object a podid or Go MIC ≥ 1.6 wrote):
            // upstream PUTs it back unchanged; that costs a rate-limited write and a watch
            // event per object and changes nothing.
            unchanged.insert(format!("{namespace}/{name}"), stored);
            continue;
        }
        let object: DynamicObject = serde_json::from_value(value).map_err(encode)?;
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &namespace, &resource(kind, plural));
        let replaced = api
            .replace(&name, &PostParams::default(), &object)
            .await
            .map_err(|source| UpgradeError::Replace {
                plural,
                namespace: namespace.clone(),
                name: name.clone(),
                source,
            })?;
        let value = serde_json::to_value(&replaced).map_err(encode)?;
        written.insert(format!("{namespace}/{name}"), value);
    }
    Ok(Upgraded { written, unchanged })
}

/// The embedded copy of `field` in an AzureAssignedIdentity's spec, replaced by the current
/// (upgraded or already current) object it refers to (by its embedded namespace and name), if
/// there is one.
fn refresh_ref(spec: &mut Map<String, Value>, field: &str, fresh: &Upgraded) {
    let Some(embedded) = spec.get(field) else {
        return;
    };
    let meta = &embedded["metadata"];
    let key = format!(
        "{}/{}",
        meta["namespace"].as_str().unwrap_or_default(),
        meta["name"].as_str().unwrap_or_default()
    );
    if let Some(object) = fresh.get(&key) {
        spec.insert(field.to_owned(), object.clone());
    }
}

/// Sets the marker key to MIC's version: an update of the ConfigMap read before the upgrade, or
/// the creation of the ConfigMap with the key when there was none (created meanwhile by another
/// replica: read it again and update that).
async fn write_marker(
    config_maps: &Api<ConfigMap>,
    stored: Option<ConfigMap>,
    settings: &UpgradeSettings,
) -> Result<(), kube::Error> {
    let mark = |mut map: ConfigMap| {
        map.data
            .get_or_insert_with(Default::default)
            .insert(settings.key.clone(), settings.version.clone());
        map
    };
    let existing = match stored {
        Some(map) => map,
        None => {
            let fresh = mark(ConfigMap {
                metadata: kube::api::ObjectMeta {
                    name: Some(settings.config_map.clone()),
                    namespace: Some(settings.namespace.clone()),
                    ..Default::default()
                },
                ..Default::default()
            });
            match config_maps.create(&PostParams::default(), &fresh).await {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    config_maps.get(&settings.config_map).await?
                }
                Err(e) => return Err(e),
            }
        }
    };
    config_maps
        .replace(
            &settings.config_map,
            &PostParams::default(),
            &mark(existing),
        )
        .await
        .map(drop)
}

/// Runs the type upgrade unless the marker says it ran (see the module docs).
pub async fn run(client: &Client, settings: &UpgradeSettings) -> Result<Outcome, UpgradeError> {
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &settings.namespace);
    let cm_error = |source| UpgradeError::ConfigMap {
        namespace: settings.namespace.clone(),
        name: settings.config_map.clone(),
        source,
    };
    // An absent ConfigMap is created once, with the marker, after the upgrade (upstream creates
    // it empty first and updates it at the end: one write more on every new cluster). Either
    // way a leader that stops half-way leaves no marker, and the next one upgrades again.
    let stored = config_maps
        .get_opt(&settings.config_map)
        .await
        .map_err(cm_error)?;
    if let Some(version) = stored
        .as_ref()
        .and_then(|map| map.data.as_ref())
        .and_then(|data| data.get(&settings.key))
    {
        info!(
            "type upgrade status configmap found from version: {version}. Skipping type upgrade!"
        );
        return Ok(Outcome::Skipped(version.clone()));
    }
    info!(
        "upgrading the stored AzureIdentity, AzureIdentityBinding, AzurePodIdentityException and AzureAssignedIdentity objects"
    );
    let identities = upgrade_kind(client, "AzureIdentity", "azureidentities", |_| {}).await?;
    let bindings = upgrade_kind(
        client,
        "AzureIdentityBinding",
        "azureidentitybindings",
        |_| {},
    )
    .await?;
    let exceptions = upgrade_kind(
        client,
        "AzurePodIdentityException",
        "azurepodidentityexceptions",
        |_| {},
    )
    .await?;
    let assigned = upgrade_kind(
        client,
        "AzureAssignedIdentity",
        "azureassignedidentities",
        |object| {
            if let Some(Value::Object(spec)) = object.get_mut("spec") {
                refresh_ref(spec, "azureIdentityRef", &identities);
                refresh_ref(spec, "azureBindingRef", &bindings);
            }
        },
    )
    .await?;
    write_marker(&config_maps, stored, settings)
        .await
        .map_err(cm_error)?;
    let counts = vec![
        ("azureidentities", identities.written.len()),
        ("azureidentitybindings", bindings.written.len()),
        ("azurepodidentityexceptions", exceptions.written.len()),
        ("azureassignedidentities", assigned.written.len()),
    ];
    info!(?counts, version = %settings.version, "type upgrade done");
    Ok(Outcome::Upgraded(counts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn capitalised_keys_become_current_ones() {
        let mut object = json!({
            "metadata": {"name": "id", "labels": {"ResourceID": "kept"}},
            "spec": {
                "Type": 1,
                "ResourceID": "/subscriptions/s",
                "ClientID": "c",
                "ClientPassword": {"Name": "secret", "Namespace": "ns"},
                "TenantID": "t",
                "unknownField": 1,
            },
        });
        normalize_object(&mut object);
        assert_eq!(
            object,
            json!({
                "metadata": {"name": "id", "labels": {"ResourceID": "kept"}},
                "spec": {
                    "type": 1,
                    "resourceID": "/subscriptions/s",
                    "clientID": "c",
                    "clientPassword": {"name": "secret", "namespace": "ns"},
                    "tenantID": "t",
                    "unknownField": 1,
                },
            })
        );
    }

    #[test]
    fn current_spelling_wins_and_label_maps_are_untouched() {
        let mut object = json!({
            "spec": {
                "Selector": "old",
                "selector": "new",
                "PodLabels": {"App": "x"},
            },
        });
        normalize_object(&mut object);
        assert_eq!(
            object,
            json!({"spec": {"selector": "new", "podLabels": {"App": "x"}}})
        );
    }
}
