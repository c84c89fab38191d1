//! The reflector both binaries run for every watched kind.

use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;

use futures::StreamExt as _;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

/// A reflector of `api` (filtered by `config`): the store it fills and the task that fills it,
/// which the caller spawns where it keeps its tasks. After every watch event the task notifies
/// `changed` (one permit, so a burst of events wakes the consumer once); a failed watch is
/// logged with the kind and retried with kube's default backoff. The task never ends by itself.
pub fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    changed: Arc<Notify>,
) -> (Store<K>, impl Future<Output = ()> + Send + 'static)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    reflect_projected(api, config, |_| {}, changed)
}

/// [`reflect`], with each object reduced by `project` before it is stored: a cache that keeps
/// only what its reader uses stays small on a large cluster. A watch whose resourceVersion the
/// API server no longer has (`410 Gone`) is relisted by the watcher, which swaps the store in
/// one step once the list is complete; that is logged as the relist it is, not as a failure.
pub fn reflect_projected<K>(
    api: Api<K>,
    config: watcher::Config,
    project: fn(&mut K),
    changed: Arc<Notify>,
) -> (Store<K>, impl Future<Output = ()> + Send + 'static)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let (store, writer) = reflector::store::<K>();
    let task = async move {
        let kind = K::kind(&K::DynamicType::default()).into_owned();
        let stream = reflector::reflector(
            writer,
            watcher(api, config).modify(project).default_backoff(),
        );
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => changed.notify_one(),
                Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                    tracing::info!(%kind, message = %status.message, "watch expired, relisting");
                }
                Err(error) => tracing::warn!(%kind, %error, "watch failed, retrying"),
            }
        }
    };
    (store, task)
}
