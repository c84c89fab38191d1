//! The loop's Kubernetes API writes: assignments created, rewritten, patched to a state and
//! deleted (finalizer included), with their metrics; and the hold record in mic's ConfigMap.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use podid_api::{ASSIGNED_IDENTITY_FINALIZER, AssignedIdentityState, AzureAssignedIdentity};
use serde_json::json;
use tracing::warn;

use super::{HoldRecordLocation, name_of, namespace_of};
use crate::hold::Record;
use crate::preexisting::PREEXISTING_ANNOTATION;

/// The hold record from MIC's ConfigMap; `None` when the ConfigMap or its key is absent.
pub(super) async fn read_hold_record(
    client: &Client,
    location: &HoldRecordLocation,
) -> Result<Option<Record>, kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &location.namespace);
    let Some(map) = api.get_opt(&location.config_map).await? else {
        return Ok(None);
    };
    let Some(text) = map
        .data
        .as_ref()
        .and_then(|d| d.get(crate::hold::RECORD_KEY))
    else {
        return Ok(None);
    };
    match serde_json::from_str(text) {
        Ok(record) => Ok(Some(record)),
        Err(e) => {
            // Unreadable (edited by hand): nothing can be trusted in it; holds it named stay
            // on their VMs/VMSS (never a removal by mistake).
            warn!(error = %e, "ignoring an unreadable hold record");
            Ok(None)
        }
    }
}

/// Stores the hold record in MIC's ConfigMap (created when absent; other keys kept). A GET
/// and an update (the verbs MIC's role has on ConfigMaps); a conflict fails the write, which
/// the next pass repeats.
pub(super) async fn write_hold_record(
    client: &Client,
    location: &HoldRecordLocation,
    record: &Record,
) -> Result<(), kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &location.namespace);
    let text = serde_json::to_string(record).unwrap_or_default();
    match api.get_opt(&location.config_map).await? {
        Some(mut map) => {
            map.data
                .get_or_insert_default()
                .insert(crate::hold::RECORD_KEY.to_owned(), text);
            api.replace(&location.config_map, &PostParams::default(), &map)
                .await
                .map(drop)
        }
        None => {
            let map = ConfigMap {
                metadata: kube::api::ObjectMeta {
                    name: Some(location.config_map.clone()),
                    namespace: Some(location.namespace.clone()),
                    ..Default::default()
                },
                data: Some([(crate::hold::RECORD_KEY.to_owned(), text)].into()),
                ..Default::default()
            };
            api.create(&PostParams::default(), &map).await.map(drop)
        }
    }
}

pub(super) fn api(client: &Client, namespace: &str) -> Api<AzureAssignedIdentity> {
    Api::namespaced(client.clone(), namespace)
}

pub(super) fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// Creates `object`; the resourceVersion created (`None` when it already existed).
pub(super) async fn create_assigned(
    client: &Client,
    object: &AzureAssignedIdentity,
) -> Result<Option<String>, kube::Error> {
    let started = std::time::Instant::now();
    match api(client, namespace_of(object))
        .create(&PostParams::default(), object)
        .await
    {
        Ok(created) => {
            crate::metrics::addition(started.elapsed());
            Ok(created.metadata.resource_version)
        }
        // The cache lags our own writes; the next pass sees the object.
        Err(e) if is_status(&e, 409) => Ok(None),
        Err(e) => {
            crate::metrics::kube_error(crate::metrics::OP_ADDITION);
            Err(e)
        }
    }
}

/// Rewrites `object`; the resourceVersion written.
pub(super) async fn replace_assigned(
    client: &Client,
    object: &AzureAssignedIdentity,
) -> Result<Option<String>, kube::Error> {
    let started = std::time::Instant::now();
    let result = api(client, namespace_of(object))
        .replace(name_of(object), &PostParams::default(), object)
        .await;
    match result {
        Ok(written) => {
            crate::metrics::update(started.elapsed());
            Ok(written.metadata.resource_version)
        }
        Err(e) => {
            crate::metrics::kube_error(crate::metrics::OP_UPDATE);
            Err(e)
        }
    }
}

/// Patches the state; the object as the API server returned it.
pub(super) async fn set_state(
    client: &Client,
    namespace: &str,
    name: &str,
    state: AssignedIdentityState,
) -> Result<AzureAssignedIdentity, kube::Error> {
    api(client, namespace)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"status": state}})),
        )
        .await
        .inspect_err(|_| crate::metrics::kube_error(crate::metrics::OP_STATUS))
}

/// Marks a confirmed assignment `Assigned`; with `mark`, also records that its identity was
/// found on the VM/VMSS ([`PREEXISTING_ANNOTATION`]), in the same patch.
pub(super) async fn set_assigned(
    client: &Client,
    namespace: &str,
    name: &str,
    mark: bool,
) -> Result<AzureAssignedIdentity, kube::Error> {
    if !mark {
        return set_state(client, namespace, name, AssignedIdentityState::Assigned).await;
    }
    api(client, namespace)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({
                "metadata": {"annotations": {PREEXISTING_ANNOTATION: "true"}},
                "status": {"status": AssignedIdentityState::Assigned},
            })),
        )
        .await
        .inspect_err(|_| crate::metrics::kube_error(crate::metrics::OP_STATUS))
}

/// Deletes and, when the API server keeps the object for our finalizer, removes it (upstream
/// `RemoveAssignedIdentity`). A 404 counts as done.
pub(super) async fn delete_assigned(
    client: &Client,
    object: &AzureAssignedIdentity,
) -> Result<(), kube::Error> {
    let started = std::time::Instant::now();
    let result = delete_and_unfinalize(client, object).await;
    match &result {
        Ok(()) => crate::metrics::deletion(started.elapsed()),
        Err(_) => crate::metrics::kube_error(crate::metrics::OP_DELETION),
    }
    result
}

pub(super) async fn delete_and_unfinalize(
    client: &Client,
    object: &AzureAssignedIdentity,
) -> Result<(), kube::Error> {
    let api = api(client, namespace_of(object));
    let name = name_of(object);
    // Already being deleted (by someone else): only our finalizer is left to remove.
    let remaining = if object.metadata.deletion_timestamp.is_some() {
        Some(object.clone())
    } else {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(either) => either.left(),
            Err(e) if is_status(&e, 404) => return Ok(()),
            Err(e) => return Err(e),
        }
    };
    let Some(remaining) = remaining else {
        return Ok(());
    };
    let finalizers = remaining.metadata.finalizers.unwrap_or_default();
    if !finalizers.iter().any(|f| f == ASSIGNED_IDENTITY_FINALIZER) {
        return Ok(());
    }
    let kept: Vec<String> = finalizers
        .into_iter()
        .filter(|f| f != ASSIGNED_IDENTITY_FINALIZER)
        .collect();
    match api
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": kept}})),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_status(&e, 404) => Ok(()),
        Err(e) => Err(e),
    }
}
