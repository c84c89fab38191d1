//! The watches that feed NMI's in-memory state (docs/upstream.md#start-up step 3,
//! docs/ARCHITECTURE.md): the node's pods into the [`PodIndex`], the four custom resources into the
//! [`Matcher`].
//!
//! * Pods: field selector `spec.nodeName=<node>`, all namespaces. The initial list (and every
//!   relist after a watch restart) replaces the index at once when complete, so a relist never
//!   empties the index half-way.
//! * `AzureAssignedIdentity`: label selector `nodename=<node>` with `--enableScaleFeatures`
//!   (default), else all; `AzureIdentity`, `AzureIdentityBinding`, `AzurePodIdentityException`:
//!   all namespaces. Each goes into a kube reflector store; a rebuild task turns the stores into
//!   a new [`podid_select::matching::MatchIndex`] after every burst of changes.
//!
//! The pod index and the matcher are marked synced once their initial lists are complete; until
//! then the server answers no token (fail closed) and `/readyz` is 503. Watch errors are retried
//! with kube's default backoff and logged.
//!
//! The pod watch tells the index when it fails ([`PodIndex::watch_failed`]: the index is blind,
//! docs/security.md "Pod watch failure policy") and starts over with a fresh list after a
//! backoff, so that recovery is a complete list ([`PodIndex::watch_listed`]) rather than a
//! resumed watch that may stay silent.

use std::collections::HashSet;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::reflector::Store;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client, Resource};
use podid_api::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzurePodIdentityException,
    NODE_NAME_LABEL,
};
use podid_broker::{Credential, IdentityKey};
use podid_select::matching::{MatchIndex, MatchOptions};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::pods::PodIndex;
use crate::provider::identity_spec;
use crate::state::Matcher;
use crate::workload::ServiceAccounts;
use podid_select::assigned::AssignedBindings;

/// What to watch.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// This node's name (`--node`).
    pub node_name: String,
    /// Matching options (mode, namespaced).
    pub match_options: MatchOptions,
    /// `--enableScaleFeatures`: watch only this node's `AzureAssignedIdentity` objects.
    pub scale_features: bool,
}

/// Start the cluster-wide ServiceAccount watch feeding `accounts` (only with
/// `--serve-workload-identity-pods`) in `watches`.
pub fn spawn_service_account_watch(
    watches: &mut Watches,
    client: Client,
    accounts: Arc<ServiceAccounts>,
) {
    watches.tasks.spawn(feed_listing(
        Api::<ServiceAccount>::all(client),
        watcher::Config::default(),
        accounts,
    ));
}

/// An in-memory index a watch keeps complete: the initial list (and every relist after a watch
/// restart) replaces it at once when complete, so a relist never empties it half-way; then
/// single updates and deletes.
trait Listing<K>: Send + Sync + 'static {
    /// What it holds, for log lines.
    const KIND: &'static str;
    fn replace_all(&self, listing: &[K]);
    fn apply(&self, object: &K);
    fn delete(&self, object: &K);
    fn mark_synced(&self);
    fn is_synced(&self) -> bool;
    fn len(&self) -> usize;
    /// Whether a watch error restarts from a fresh list (and is reported to the index).
    const RELIST_ON_ERROR: bool = false;
    /// The watch failed (only with [`Listing::RELIST_ON_ERROR`]).
    fn watch_failed(&self) {}
    /// A list completed after the first (only with [`Listing::RELIST_ON_ERROR`]).
    fn watch_listed(&self) {}
}

impl Listing<Pod> for PodIndex {
    const KIND: &'static str = "pod";
    fn replace_all(&self, listing: &[Pod]) {
        PodIndex::replace_all(self, listing);
    }
    fn apply(&self, pod: &Pod) {
        PodIndex::apply(self, pod);
    }
    fn delete(&self, pod: &Pod) {
        PodIndex::delete(self, pod);
    }
    fn mark_synced(&self) {
        PodIndex::mark_synced(self);
    }
    fn is_synced(&self) -> bool {
        PodIndex::is_synced(self)
    }
    fn len(&self) -> usize {
        PodIndex::len(self)
    }
    const RELIST_ON_ERROR: bool = true;
    fn watch_failed(&self) {
        PodIndex::watch_failed(self, std::time::Instant::now());
    }
    fn watch_listed(&self) {
        PodIndex::watch_listed(self);
    }
}

impl Listing<ServiceAccount> for ServiceAccounts {
    const KIND: &'static str = "service account";
    fn replace_all(&self, listing: &[ServiceAccount]) {
        ServiceAccounts::replace_all(self, listing);
    }
    fn apply(&self, account: &ServiceAccount) {
        ServiceAccounts::apply(self, account);
    }
    fn delete(&self, account: &ServiceAccount) {
        ServiceAccounts::delete(self, account);
    }
    fn mark_synced(&self) {
        ServiceAccounts::mark_synced(self);
    }
    fn is_synced(&self) -> bool {
        ServiceAccounts::is_synced(self)
    }
    fn len(&self) -> usize {
        ServiceAccounts::len(self)
    }
}

/// Keep `index` complete from a watch of `api` (see [`Listing`]); errors are retried with
/// kube's default backoff and logged, or, with [`Listing::RELIST_ON_ERROR`], reported to the
/// index and retried from a fresh list after a backoff (0.8 s doubling to 30 s, reset by a
/// complete list).
async fn feed_listing<K, L>(api: Api<K>, config: watcher::Config, index: Arc<L>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    L: Listing<K>,
{
    const FIRST_BACKOFF: std::time::Duration = std::time::Duration::from_millis(800);
    const MAX_BACKOFF: std::time::Duration = std::time::Duration::from_secs(30);
    let mut backoff = FIRST_BACKOFF;
    loop {
        let stream = watcher(api.clone(), config.clone()).default_backoff();
        futures::pin_mut!(stream);
        let mut listing: Vec<K> = Vec::new();
        while let Some(event) = stream.next().await {
            match event {
                Ok(Event::Init) => listing.clear(),
                Ok(Event::InitApply(object)) => listing.push(object),
                Ok(Event::InitDone) => {
                    index.replace_all(&listing);
                    listing = Vec::new();
                    backoff = FIRST_BACKOFF;
                    if !index.is_synced() {
                        index.mark_synced();
                        tracing::info!(kind = L::KIND, count = index.len(), "cache synced");
                    } else if L::RELIST_ON_ERROR {
                        index.watch_listed();
                        tracing::info!(kind = L::KIND, count = index.len(), "watch listed again");
                    }
                }
                Ok(Event::Apply(object)) => index.apply(&object),
                Ok(Event::Delete(object)) => index.delete(&object),
                Err(error) if L::RELIST_ON_ERROR => {
                    index.watch_failed();
                    tracing::warn!(kind = L::KIND, %error, retry_in = ?backoff, "watch failed, listing again after a backoff");
                    break;
                }
                Err(error) => tracing::warn!(kind = L::KIND, %error, "watch failed, retrying"),
            }
        }
        if !L::RELIST_ON_ERROR {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Called with the cache key of every identity that no watched object references any more
/// (e.g. `TokenBroker::invalidate_identity`), so its cached tokens go at once.
pub type Revoke = Arc<dyn Fn(&IdentityKey) + Send + Sync>;

/// The running watch tasks; dropping it stops them.
#[derive(Debug)]
pub struct Watches {
    tasks: JoinSet<()>,
}

impl Watches {
    /// Stop every watch.
    pub fn abort(&mut self) {
        self.tasks.abort_all();
    }
}

/// Start the watches feeding `pods` and `matcher`.
pub fn spawn_watches(
    client: Client,
    config: &WatchConfig,
    pods: Arc<PodIndex>,
    matcher: Arc<Matcher>,
    revoke: Option<Revoke>,
) -> Watches {
    let mut tasks = JoinSet::new();
    tasks.spawn(watch_pods(
        Api::all(client.clone()),
        config.node_name.clone(),
        pods,
    ));

    let changed = Arc::new(Notify::new());
    let assigned_config = if config.scale_features {
        watcher::Config::default().labels(&format!("{NODE_NAME_LABEL}={}", config.node_name))
    } else {
        watcher::Config::default()
    };
    let identities = reflect::<AzureIdentity>(
        &mut tasks,
        Api::all(client.clone()),
        watcher::Config::default(),
        &changed,
    );
    let bindings = reflect::<AzureIdentityBinding>(
        &mut tasks,
        Api::all(client.clone()),
        watcher::Config::default(),
        &changed,
    );
    let assignments = reflect::<AzureAssignedIdentity>(
        &mut tasks,
        Api::all(client.clone()),
        assigned_config,
        &changed,
    );
    let exceptions = reflect::<AzurePodIdentityException>(
        &mut tasks,
        Api::all(client),
        watcher::Config::default(),
        &changed,
    );
    let options = config.match_options;
    tasks.spawn(async move {
        let ready = futures::future::try_join4(
            identities.wait_until_ready(),
            bindings.wait_until_ready(),
            assignments.wait_until_ready(),
            exceptions.wait_until_ready(),
        )
        .await;
        if ready.is_err() {
            tracing::error!("a custom resource watch ended before its first list");
            return;
        }
        let mut known: HashSet<IdentityKey> = HashSet::new();
        loop {
            let index = MatchIndex::new(
                options,
                identities.state(),
                bindings.state(),
                assignments.state(),
                exceptions.state(),
            );
            let keys: HashSet<IdentityKey> = index
                .identity_objects()
                .map(|identity| identity_spec(identity, Credential::None).key())
                .collect();
            let assigned = AssignedBindings::new(assignments.state().iter().map(|a| &**a));
            matcher.replace_with_assigned(index, assigned);
            if let Some(revoke) = &revoke {
                for gone in known.difference(&keys) {
                    tracing::info!(client_id = %gone.client_id(), "identity no longer referenced, dropping its cached tokens");
                    revoke(gone);
                }
            }
            known = keys;
            if !matcher.is_synced() {
                matcher.mark_synced();
                tracing::info!("identity caches synced");
            }
            changed.notified().await;
        }
    });
    Watches { tasks }
}

/// Runs [`podid_runtime::reflect`] for `K` in `tasks` (notifying `changed` after each event);
/// returns its store.
fn reflect<K>(
    tasks: &mut JoinSet<()>,
    api: Api<K>,
    config: watcher::Config,
    changed: &Arc<Notify>,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let (store, task) = podid_runtime::reflect(api, config, Arc::clone(changed));
    tasks.spawn(task);
    store
}

async fn watch_pods(api: Api<Pod>, node: String, pods: Arc<PodIndex>) {
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    feed_listing(api, config, pods).await;
}
