//! The loop's caches: one reflector per watched kind, each object reduced to what a pass
//! reads.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Client, Resource};
use podid_api::{AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use super::RunError;

pub(super) struct Stores {
    pub(super) pods: Store<Pod>,
    pub(super) nodes: Store<Node>,
    pub(super) identities: Store<AzureIdentity>,
    pub(super) bindings: Store<AzureIdentityBinding>,
    pub(super) assigned: Store<AzureAssignedIdentity>,
}

impl Stores {
    /// The five caches, each kept by its own task (pushed to `tasks`); every change wakes
    /// `notify`.
    pub(super) fn new(
        client: &Client,
        notify: &Arc<Notify>,
        tasks: &mut Vec<tokio::task::JoinHandle<()>>,
    ) -> Self {
        Self {
            pods: reflect(
                Api::all(client.clone()),
                pod_projection,
                notify.clone(),
                tasks,
            ),
            nodes: reflect(
                Api::all(client.clone()),
                node_projection,
                notify.clone(),
                tasks,
            ),
            // Identities and bindings are copied into the assignments mic writes: kept whole.
            identities: reflect(Api::all(client.clone()), |_| {}, notify.clone(), tasks),
            bindings: reflect(Api::all(client.clone()), |_| {}, notify.clone(), tasks),
            assigned: reflect(
                Api::all(client.clone()),
                without_managed_fields,
                notify.clone(),
                tasks,
            ),
        }
    }

    /// Resolves once every cache holds its first complete list; fails if a watch ended for
    /// good before that.
    pub(super) async fn ready(&self) -> Result<(), RunError> {
        self.pods
            .wait_until_ready()
            .await
            .map_err(|_| RunError::CacheSync("pod"))?;
        self.nodes
            .wait_until_ready()
            .await
            .map_err(|_| RunError::CacheSync("node"))?;
        self.identities
            .wait_until_ready()
            .await
            .map_err(|_| RunError::CacheSync("AzureIdentity"))?;
        self.bindings
            .wait_until_ready()
            .await
            .map_err(|_| RunError::CacheSync("AzureIdentityBinding"))?;
        self.assigned
            .wait_until_ready()
            .await
            .map_err(|_| RunError::CacheSync("AzureAssignedIdentity"))
    }
}

/// A cache of `api` kept by its own task. Each object is reduced by `project` before it is
/// stored (what a pass reads, not the whole object: the caches of a 50,000-pod cluster stay
/// small). A watch whose resourceVersion the API server no longer has (`410 Gone`, after a
/// compaction or a long disconnect) is relisted by the watcher; the cache keeps its contents
/// until the new list is complete and is then replaced in one step, so a pass never sees a
/// half-listed cache and nothing is lost meanwhile.
pub(super) fn reflect<K>(
    api: Api<K>,
    project: fn(&mut K),
    notify: Arc<Notify>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let (reader, task) =
        podid_runtime::reflect_projected(api, watcher::Config::default(), project, notify);
    tasks.push(tokio::spawn(task));
    reader
}

/// Drops what no pass reads from a cached object: its managed fields.
pub(super) fn without_managed_fields<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// A pod as a pass reads it: namespace, name, labels, node and phase (its containers,
/// volumes, conditions and annotations are most of its size and never read).
pub(super) fn pod_projection(pod: &mut Pod) {
    let metadata = &mut pod.metadata;
    metadata.managed_fields = None;
    metadata.annotations = None;
    metadata.owner_references = None;
    let node_name = pod.spec.as_mut().and_then(|s| s.node_name.take());
    pod.spec = node_name.map(|node_name| k8s_openapi::api::core::v1::PodSpec {
        node_name: Some(node_name),
        ..Default::default()
    });
    let phase = pod.status.as_mut().and_then(|s| s.phase.take());
    pod.status = phase.map(|phase| k8s_openapi::api::core::v1::PodStatus {
        phase: Some(phase),
        ..Default::default()
    });
}

/// A node as a pass reads it: name and providerID (its status, with the images it holds, is
/// tens of kilobytes on a real node).
pub(super) fn node_projection(node: &mut Node) {
    let metadata = &mut node.metadata;
    metadata.managed_fields = None;
    metadata.annotations = None;
    metadata.labels = None;
    let provider_id = node.spec.as_mut().and_then(|s| s.provider_id.take());
    node.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
        provider_id,
        ..Default::default()
    });
    node.status = None;
}
