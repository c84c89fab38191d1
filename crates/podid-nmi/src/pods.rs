//! The IP → pod index NMI attributes requests with (docs/upstream.md#finding-the-caller,
//! docs/ARCHITECTURE.md, docs/security.md).
//!
//! Fed by pod watch events of this node ([`PodIndex::apply`], [`PodIndex::delete`],
//! [`PodIndex::replace_all`] on a relist). Only pods in phase `Pending` or `Running` that do not
//! use the host network are indexed (host-network pods share the node's address); their
//! addresses come from `status.podIP` and `status.podIPs`.
//!
//! Trust boundary: an address is only as good as the last thing the API server said about it,
//! and addresses are reused. The rules, in lookup order (docs/security.md, "Stale attribution"):
//!
//! * A pod whose containers have all terminated is not indexed (its sandbox, and with it its
//!   address, may already belong to another pod), nor is a pod past its deletion deadline
//!   (`metadata.deletionTimestamp`, compared with the node's clock at every lookup).
//! * Of several pods claiming one address, a terminating one (deletion requested) yields to a
//!   live one: the address was only handed out again once the old sandbox released it. Two live
//!   claims, or two terminating ones, make the address ambiguous and every lookup fails closed.
//! * An address held only by a terminating pod while a pod of this node waits for its address
//!   (`Pending`, no `podIP` yet) is [`LookupError::Reassigning`]: the caller may be that new pod,
//!   so it waits (bounded, [`PodIndex::wait_for`]) and is refused if the index still cannot tell.
//! * While the pod watch is blind (it failed and has not listed again), the index is kept and
//!   served (static stability), but an address is trusted only while the node's route to it
//!   still leaves through the interface it used when the pod was indexed ([`RouteProbe`]): a
//!   sandbox torn down and rebuilt for another pod gets a new interface. Without an anchor, or
//!   when the route changed, the lookup is [`LookupError::Untrusted`].
//!
//! Lookups are O(1) hash lookups under a short read lock that is never held across an await;
//! the route probe runs only while the watch is blind. [`PodIndex::wait_for`] gives a
//! just-started pod a bounded wait for the watch to catch up.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use podid_select::matching::CallerPod;
use tokio::sync::watch;

/// Why no single pod owns an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// No indexed pod has the address.
    #[error("no pod with address {ip}")]
    NotFound {
        /// The address.
        ip: IpAddr,
    },
    /// Several live pods claim the address; NMI fails closed.
    #[error("{count} pods claim address {ip}")]
    Ambiguous {
        /// The address.
        ip: IpAddr,
        /// How many pods claim it.
        count: usize,
    },
    /// Only a terminating pod holds the address while a pod of this node still waits for its
    /// address: the caller may be that new pod.
    #[error("address {ip} is held by a terminating pod while a new pod awaits its address")]
    Reassigning {
        /// The address.
        ip: IpAddr,
    },
    /// The pod watch is blind and the node's route to the address is not the one it had when
    /// the pod was indexed (or was never recorded).
    #[error("address {ip} cannot be trusted: the pod watch is failing and its route changed")]
    Untrusted {
        /// The address.
        ip: IpAddr,
    },
}

impl LookupError {
    /// The matching IMDS error (500 in every case, as upstream answers a caller it cannot
    /// attribute; an address that cannot be trusted is answered as one that matches no pod).
    pub fn to_imds_error(self) -> podid_imds::ImdsError {
        match self {
            Self::NotFound { ip } | Self::Reassigning { ip } | Self::Untrusted { ip } => {
                podid_imds::ImdsError::NoPodForAddress { ip }
            }
            Self::Ambiguous { ip, count } => {
                podid_imds::ImdsError::AmbiguousPodAddress { ip, count }
            }
        }
    }

    /// The `reason` label of `podid_nmi_attribution_failures_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Self::NotFound { .. } => "not_found",
            Self::Ambiguous { .. } => "ambiguous",
            Self::Reassigning { .. } => "address_reassigned",
            Self::Untrusted { .. } => "untrusted_route",
        }
    }
}

/// The node's route to a pod address, as the kernel resolves it: the index of the interface
/// the route leaves through. Injected (netlink in `nmi`, [`crate::route`]); fakes in tests.
pub trait RouteProbe: Send + Sync + fmt::Debug {
    /// The outgoing interface index of the route to `ip`, `None` when there is none or the
    /// kernel could not be asked.
    fn interface(&self, ip: IpAddr) -> Option<u32>;
}

type PodKey = (String, String);

#[derive(Debug)]
struct Entry {
    ips: Vec<IpAddr>,
    /// The outgoing interface of the node's route to each address in `ips` when the pod was
    /// first indexed with it (same order; `None` when unknown).
    anchors: Vec<Option<u32>>,
    pod: Arc<CallerPod>,
    /// `metadata.uid` (a federated token is bound to it).
    uid: String,
    /// `metadata.deletionTimestamp`: the pod is terminating, and not attributable from then on.
    deleted_at: Option<SystemTime>,
}

impl Entry {
    fn terminating(&self) -> bool {
        self.deleted_at.is_some()
    }

    fn live_at(&self, now: SystemTime) -> bool {
        self.deleted_at.is_none_or(|deadline| now < deadline)
    }

    fn anchor(&self, ip: IpAddr) -> Option<u32> {
        let i = self.ips.iter().position(|a| *a == ip)?;
        self.anchors.get(i).copied().flatten()
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// namespace → name → entry (looked up with borrowed names).
    pods: HashMap<String, HashMap<String, Entry>>,
    /// Number of entries in `pods`.
    count: usize,
    by_ip: HashMap<IpAddr, Vec<PodKey>>,
    /// Pods of this node that will get an address and have none yet.
    awaiting: HashSet<PodKey>,
}

impl Inner {
    fn entry(&self, namespace: &str, name: &str) -> Option<&Entry> {
        self.pods.get(namespace)?.get(name)
    }

    fn remove(&mut self, key: &PodKey) {
        self.awaiting.remove(key);
        let Some(names) = self.pods.get_mut(&key.0) else {
            return;
        };
        let Some(entry) = names.remove(&key.1) else {
            return;
        };
        if names.is_empty() {
            self.pods.remove(&key.0);
        }
        self.count -= 1;
        for ip in entry.ips {
            if let Some(keys) = self.by_ip.get_mut(&ip) {
                keys.retain(|k| k != key);
                if keys.is_empty() {
                    self.by_ip.remove(&ip);
                }
            }
        }
    }

    fn insert(&mut self, key: PodKey, indexed: Indexed) {
        let entry = match indexed {
            Indexed::Entry(entry) => entry,
            Indexed::Awaiting => {
                self.awaiting.insert(key);
                return;
            }
        };
        for ip in &entry.ips {
            let keys = self.by_ip.entry(*ip).or_default();
            if !keys.contains(&key) {
                keys.push(key.clone());
            }
        }
        let (namespace, name) = key;
        if self
            .pods
            .entry(namespace)
            .or_default()
            .insert(name, entry)
            .is_none()
        {
            self.count += 1;
        }
    }

    /// The anchors `key` already has for its addresses, to keep them across updates.
    fn anchors_of(&self, key: &PodKey) -> Vec<(IpAddr, Option<u32>)> {
        self.entry(&key.0, &key.1)
            .map(|e| {
                e.ips
                    .iter()
                    .copied()
                    .zip(e.anchors.iter().copied())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The pod owning `ip` at `now` by the index rules (module docs), before any route check.
    fn resolve(&self, ip: IpAddr, now: SystemTime) -> Result<&Entry, LookupError> {
        let Some(keys) = self.by_ip.get(&ip) else {
            return Err(LookupError::NotFound { ip });
        };
        let mut live = 0;
        let mut live_found = None;
        let mut terminating = 0;
        let mut terminating_found = None;
        for key in keys {
            let Some(entry) = self.entry(&key.0, &key.1) else {
                continue;
            };
            if !entry.live_at(now) {
                continue;
            }
            if entry.terminating() {
                terminating += 1;
                terminating_found = Some(entry);
            } else {
                live += 1;
                live_found = Some(entry);
            }
        }
        match (live, live_found, terminating, terminating_found) {
            (1, Some(entry), _, _) => Ok(entry),
            (0, _, 1, Some(_)) if !self.awaiting.is_empty() => Err(LookupError::Reassigning { ip }),
            (0, _, 1, Some(entry)) => Ok(entry),
            (0, _, 0, _) => Err(LookupError::NotFound { ip }),
            (0, _, count, _) | (count, _, _, _) => Err(LookupError::Ambiguous { ip, count }),
        }
    }
}

/// What a pod becomes in the index.
#[derive(Debug)]
enum Indexed {
    Entry(Entry),
    /// Scheduled here, will get an address, has none yet.
    Awaiting,
}

/// The pod watch's health, for the blind-watch rule, `/readyz` and the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchState {
    /// No complete list yet.
    NotSynced,
    /// Listed and watching without an error since.
    Streaming,
    /// Failed at `since` and not listed again yet: the index may be stale.
    Blind {
        /// When the first failure since the last complete list happened.
        since: Instant,
    },
}

/// The node's pods by address. Share it as `Arc<PodIndex>`.
pub struct PodIndex {
    inner: RwLock<Inner>,
    changed: watch::Sender<u64>,
    synced: AtomicBool,
    /// Whether the pod watch is blind (read on every lookup; details in `watch`).
    blind: AtomicBool,
    watch: Mutex<WatchState>,
    probe: Option<Arc<dyn RouteProbe>>,
}

impl fmt::Debug for PodIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PodIndex")
            .field("pods", &self.len())
            .field("watch", &self.watch_state())
            .field("probe", &self.probe)
            .finish_non_exhaustive()
    }
}

impl Default for PodIndex {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether every container of the pod has terminated (its sandbox may be gone): all of
/// `containerStatuses` terminated and no init container (a sidecar) still running.
fn all_containers_terminated(pod: &Pod) -> bool {
    let Some(status) = pod.status.as_ref() else {
        return false;
    };
    let terminated = |s: &ContainerStatus| {
        s.state
            .as_ref()
            .is_some_and(|state| state.terminated.is_some() && state.running.is_none())
    };
    let running = |s: &ContainerStatus| s.state.as_ref().is_some_and(|st| st.running.is_some());
    match status.container_statuses.as_deref() {
        None | Some([]) => false,
        Some(containers) => {
            containers.iter().all(terminated)
                && !status.init_container_statuses.iter().flatten().any(running)
        }
    }
}

/// What `pod` becomes in the index, or `None` when it must not be indexed at all.
fn index_entry(pod: &Pod) -> Option<(PodKey, Indexed)> {
    let key = pod_key(pod)?;
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return None;
    }
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref());
    // A pod just scheduled may have no status yet: it is Pending.
    if !matches!(phase, Some("Pending" | "Running") | None) || all_containers_terminated(pod) {
        return None;
    }
    let meta = &pod.metadata;
    let deleted_at = meta
        .deletion_timestamp
        .as_ref()
        .map(|t| SystemTime::from(t.0));
    let mut ips: Vec<IpAddr> = status
        .into_iter()
        .flat_map(|s| {
            s.pod_ip
                .iter()
                .chain(s.pod_ips.iter().flatten().map(|p| &p.ip))
        })
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
        .collect();
    ips.sort();
    ips.dedup();
    if ips.is_empty() {
        // Only a pod that will still get an address makes other pods' addresses suspect.
        let waits = deleted_at.is_none() && matches!(phase, Some("Pending") | None);
        return waits.then_some((key, Indexed::Awaiting));
    }
    let caller = CallerPod::of(pod);
    Some((
        key,
        Indexed::Entry(Entry {
            anchors: vec![None; ips.len()],
            ips,
            pod: Arc::new(caller),
            uid: meta.uid.clone().unwrap_or_default(),
            deleted_at,
        }),
    ))
}

fn pod_key(pod: &Pod) -> Option<PodKey> {
    Some((
        pod.metadata.namespace.clone().unwrap_or_default(),
        pod.metadata.name.clone()?,
    ))
}

impl PodIndex {
    /// An empty, not yet synced index without a route probe (addresses are then never
    /// re-checked while the watch is blind: tests and benchmarks).
    pub fn new() -> Self {
        Self {
            inner: RwLock::new(Inner::default()),
            changed: watch::Sender::new(0),
            synced: AtomicBool::new(false),
            blind: AtomicBool::new(false),
            watch: Mutex::new(WatchState::NotSynced),
            probe: None,
        }
    }

    /// An empty index that anchors every address to the node's route to it through `probe`.
    pub fn with_route_probe(probe: Arc<dyn RouteProbe>) -> Self {
        Self {
            probe: Some(probe),
            ..Self::new()
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps inconsistent in a way that makes
        // lookups unsafe (each update is a remove then an insert), so a poisoned lock is used.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Record each address's route anchor: kept from `previous` when the address was already
    /// the pod's, else asked from the probe (off the request path: the watch task calls this).
    fn anchor(&self, indexed: &mut Indexed, previous: &[(IpAddr, Option<u32>)]) {
        let (Indexed::Entry(entry), Some(probe)) = (indexed, &self.probe) else {
            return;
        };
        for (ip, anchor) in entry.ips.iter().zip(entry.anchors.iter_mut()) {
            *anchor = match previous.iter().find(|(old, _)| old == ip) {
                Some((_, Some(kept))) => Some(*kept),
                _ => probe.interface(*ip),
            };
        }
    }

    /// Add or update a pod from a watch event. A pod that left `Pending`/`Running`, uses the
    /// host network, or whose containers all terminated is removed; one without an address yet
    /// is remembered as awaiting one.
    pub fn apply(&self, pod: &Pod) {
        let Some(key) = pod_key(pod) else { return };
        let mut indexed = index_entry(pod);
        if let Some((key, indexed)) = indexed.as_mut() {
            let previous = self.read().anchors_of(key);
            self.anchor(indexed, &previous);
        }
        {
            let mut inner = self.write();
            inner.remove(&key);
            if let Some((key, indexed)) = indexed {
                inner.insert(key, indexed);
            }
        }
        self.notify();
    }

    /// Remove a deleted pod.
    pub fn delete(&self, pod: &Pod) {
        let Some(key) = pod_key(pod) else { return };
        self.write().remove(&key);
        self.notify();
    }

    /// Replace the whole content (initial list or relist after a watch restart).
    pub fn replace_all<'a>(&self, pods: impl IntoIterator<Item = &'a Pod>) {
        let mut fresh = Inner::default();
        {
            let old = self.read();
            for pod in pods {
                if let Some((key, mut indexed)) = index_entry(pod) {
                    self.anchor(&mut indexed, &old.anchors_of(&key));
                    fresh.remove(&key);
                    fresh.insert(key, indexed);
                }
            }
        }
        *self.write() = fresh;
        self.notify();
    }

    /// Mark the index as holding the full pod list of the node (ready to attribute) and the
    /// watch as streaming.
    pub fn mark_synced(&self) {
        self.synced.store(true, Ordering::Release);
        self.watch_listed();
    }

    /// Whether [`PodIndex::mark_synced`] was called.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// The pod watch completed a list: the index is current again.
    pub fn watch_listed(&self) {
        *self.watch.lock().unwrap_or_else(|e| e.into_inner()) = WatchState::Streaming;
        self.blind.store(false, Ordering::Release);
        self.notify();
    }

    /// The pod watch failed at `at`: until its next complete list, addresses are re-checked
    /// against their route anchors.
    pub fn watch_failed(&self, at: Instant) {
        let mut state = self.watch.lock().unwrap_or_else(|e| e.into_inner());
        if !matches!(*state, WatchState::Blind { .. }) {
            *state = WatchState::Blind { since: at };
        }
        self.blind.store(true, Ordering::Release);
    }

    /// The pod watch's health.
    pub fn watch_state(&self) -> WatchState {
        *self.watch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long the pod watch has been blind at `now` (zero while it streams).
    pub fn watch_blind_for(&self, now: Instant) -> Duration {
        match self.watch_state() {
            WatchState::Blind { since } => now.saturating_duration_since(since),
            WatchState::NotSynced | WatchState::Streaming => Duration::ZERO,
        }
    }

    /// Number of indexed pods.
    pub fn len(&self) -> usize {
        self.read().count
    }

    /// Whether no pod is indexed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of pods of this node waiting for an address.
    pub fn awaiting_address(&self) -> usize {
        self.read().awaiting.len()
    }

    /// The indexed pod `namespace/name`, if it is live and has an address.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<CallerPod>> {
        let now = SystemTime::now();
        self.read()
            .entry(namespace, name)
            .filter(|e| e.live_at(now))
            .map(|e| Arc::clone(&e.pod))
    }

    /// The `metadata.uid` of the indexed pod `namespace/name` (empty when the API server sent
    /// none), for binding a federated service-account token to the calling pod.
    pub fn uid(&self, namespace: &str, name: &str) -> Option<String> {
        self.read().entry(namespace, name).map(|e| e.uid.clone())
    }

    /// The pod owning `ip` (IPv4-mapped IPv6 addresses are treated as IPv4), by the rules of
    /// the module docs at the node's current time.
    ///
    /// # Errors
    /// [`LookupError`] when no single pod may be attributed.
    pub fn lookup(&self, ip: IpAddr) -> Result<Arc<CallerPod>, LookupError> {
        self.lookup_at(ip, SystemTime::now())
    }

    /// [`PodIndex::lookup`] at `now` (deletion deadlines are compared with it).
    ///
    /// # Errors
    /// As [`PodIndex::lookup`].
    pub fn lookup_at(&self, ip: IpAddr, now: SystemTime) -> Result<Arc<CallerPod>, LookupError> {
        let ip = ip.to_canonical();
        let (pod, anchor) = {
            let inner = self.read();
            let entry = inner.resolve(ip, now)?;
            (Arc::clone(&entry.pod), entry.anchor(ip))
        };
        if self.blind.load(Ordering::Acquire)
            && let Some(probe) = &self.probe
        {
            // The probe runs outside the lock: a netlink round trip, only while blind.
            match (anchor, probe.interface(ip)) {
                (Some(then), Some(now)) if then == now => {}
                _ => return Err(LookupError::Untrusted { ip }),
            }
        }
        Ok(pod)
    }

    /// Like [`PodIndex::lookup`], but when no pod has `ip` yet, or its only holder is a
    /// terminating pod while a new pod awaits its address, wait up to `timeout` for the watch
    /// to settle it. An ambiguous or untrusted address fails at once.
    ///
    /// # Errors
    /// As [`PodIndex::lookup`] once the time is up.
    pub async fn wait_for(
        &self,
        ip: IpAddr,
        timeout: Duration,
    ) -> Result<Arc<CallerPod>, LookupError> {
        let waits = |result: &Result<Arc<CallerPod>, LookupError>| {
            matches!(
                result,
                Err(LookupError::NotFound { .. } | LookupError::Reassigning { .. })
            )
        };
        // Fast path: an indexed pod needs no subscription (a shared counter every request
        // would touch) and no deadline.
        let first = self.lookup(ip);
        if !waits(&first) {
            return first;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.changed.subscribe();
        loop {
            changes.borrow_and_update();
            let result = self.lookup(ip);
            if !waits(&result) {
                return result;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                // The sender lives as long as `self`; time is up either way.
                Ok(Err(_)) | Err(_) => return self.lookup(ip),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use k8s_openapi::api::core::v1::{PodIP, PodSpec, PodStatus};
    use std::collections::BTreeMap;

    fn pod(ns: &str, name: &str, phase: &str, ips: &[&str], host_network: bool) -> Pod {
        let mut p = Pod::default();
        p.metadata.namespace = Some(ns.into());
        p.metadata.name = Some(name.into());
        p.metadata.labels = Some(BTreeMap::from([("aadpodidbinding".into(), "kv".into())]));
        p.spec = Some(PodSpec {
            host_network: Some(host_network),
            service_account_name: Some("sa".into()),
            ..Default::default()
        });
        p.status = Some(PodStatus {
            phase: Some(phase.into()),
            pod_ip: ips.first().map(|s| (*s).to_owned()),
            pod_ips: Some(
                ips.iter()
                    .map(|ip| PodIP {
                        ip: (*ip).to_owned(),
                    })
                    .collect(),
            ),
            ..Default::default()
        });
        p
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn indexes_live_pods_by_every_address() {
        let index = PodIndex::new();
        index.apply(&pod(
            "app",
            "web",
            "Running",
            &["10.0.0.5", "fd00::5"],
            false,
        ));
        let p = index.lookup(ip("10.0.0.5")).unwrap();
        assert_eq!((p.namespace.as_str(), p.name.as_str()), ("app", "web"));
        assert_eq!(p.service_account, "sa");
        assert_eq!(p.binding_label(), Some("kv"));
        assert_eq!(index.lookup(ip("fd00::5")).unwrap().name, "web");
        // IPv4-mapped IPv6 peer (dual-stack listener) is the IPv4 pod.
        assert_eq!(index.lookup(ip("::ffff:10.0.0.5")).unwrap().name, "web");
        assert_eq!(
            index.lookup(ip("10.0.0.6")),
            Err(LookupError::NotFound { ip: ip("10.0.0.6") })
        );
    }

    #[test]
    fn skips_host_network_and_finished_pods() {
        let index = PodIndex::new();
        index.apply(&pod("kube-system", "hn", "Running", &["192.168.1.1"], true));
        index.apply(&pod("app", "done", "Succeeded", &["10.0.0.7"], false));
        index.apply(&pod("app", "failed", "Failed", &["10.0.0.8"], false));
        index.apply(&pod("app", "pending", "Pending", &["10.0.0.9"], false));
        assert!(index.lookup(ip("192.168.1.1")).is_err());
        assert!(index.lookup(ip("10.0.0.7")).is_err());
        assert!(index.lookup(ip("10.0.0.8")).is_err());
        assert_eq!(index.lookup(ip("10.0.0.9")).unwrap().name, "pending");
        // Running → Succeeded removes it.
        index.apply(&pod("app", "pending", "Succeeded", &["10.0.0.9"], false));
        assert!(index.lookup(ip("10.0.0.9")).is_err());
        assert!(index.is_empty());
    }

    #[test]
    fn shared_address_is_ambiguous_until_one_goes() {
        let index = PodIndex::new();
        let a = pod("app", "a", "Running", &["10.0.0.5"], false);
        let b = pod("other", "b", "Running", &["10.0.0.5"], false);
        index.apply(&a);
        index.apply(&b);
        assert_eq!(
            index.lookup(ip("10.0.0.5")),
            Err(LookupError::Ambiguous {
                ip: ip("10.0.0.5"),
                count: 2
            })
        );
        index.delete(&a);
        assert_eq!(index.lookup(ip("10.0.0.5")).unwrap().name, "b");
    }

    #[test]
    fn address_change_moves_the_pod() {
        let index = PodIndex::new();
        index.apply(&pod("app", "a", "Running", &["10.0.0.5"], false));
        index.apply(&pod("app", "a", "Running", &["10.0.0.6"], false));
        assert!(index.lookup(ip("10.0.0.5")).is_err());
        assert_eq!(index.lookup(ip("10.0.0.6")).unwrap().name, "a");
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn replace_all_drops_pods_missing_from_the_list() {
        let index = PodIndex::new();
        index.apply(&pod("app", "a", "Running", &["10.0.0.5"], false));
        let b = pod("app", "b", "Running", &["10.0.0.6"], false);
        index.replace_all([&b]);
        assert!(index.lookup(ip("10.0.0.5")).is_err());
        assert_eq!(index.lookup(ip("10.0.0.6")).unwrap().name, "b");
    }

    #[tokio::test]
    async fn wait_for_returns_when_the_pod_arrives() {
        let index = Arc::new(PodIndex::new());
        let waiter = {
            let index = Arc::clone(&index);
            tokio::spawn(async move {
                index
                    .wait_for(ip("10.0.0.5"), Duration::from_secs(30))
                    .await
            })
        };
        // Unrelated changes do not end the wait.
        index.apply(&pod("app", "x", "Running", &["10.0.0.99"], false));
        tokio::task::yield_now().await;
        index.apply(&pod("app", "late", "Running", &["10.0.0.5"], false));
        let got = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("wait_for must wake on the change")
            .unwrap()
            .unwrap();
        assert_eq!(got.name, "late");
    }

    fn terminating(mut p: Pod, at: SystemTime) -> Pod {
        p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::try_from(at).unwrap(),
        ));
        p
    }

    fn containers(mut p: Pod, terminated: &[bool]) -> Pod {
        use k8s_openapi::api::core::v1::{
            ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStatus,
        };
        let statuses = terminated
            .iter()
            .enumerate()
            .map(|(i, done)| ContainerStatus {
                name: format!("c{i}"),
                state: Some(if *done {
                    ContainerState {
                        terminated: Some(ContainerStateTerminated::default()),
                        ..Default::default()
                    }
                } else {
                    ContainerState {
                        running: Some(ContainerStateRunning::default()),
                        ..Default::default()
                    }
                }),
                ..Default::default()
            })
            .collect();
        p.status.as_mut().unwrap().container_statuses = Some(statuses);
        p
    }

    #[test]
    fn a_pod_whose_containers_all_terminated_is_not_attributable() {
        let index = PodIndex::new();
        let base = pod("app", "old", "Running", &["10.0.0.5"], false);
        index.apply(&containers(base.clone(), &[false, true]));
        assert_eq!(index.lookup(ip("10.0.0.5")).unwrap().name, "old");
        index.apply(&containers(base, &[true, true]));
        assert_eq!(
            index.lookup(ip("10.0.0.5")),
            Err(LookupError::NotFound { ip: ip("10.0.0.5") })
        );
    }

    #[test]
    fn a_pod_past_its_deletion_deadline_is_not_attributable() {
        let index = PodIndex::new();
        let now = SystemTime::now();
        let deadline = now + Duration::from_secs(30);
        index.apply(&terminating(
            pod("app", "old", "Running", &["10.0.0.5"], false),
            deadline,
        ));
        assert_eq!(index.lookup_at(ip("10.0.0.5"), now).unwrap().name, "old");
        assert_eq!(
            index.lookup_at(ip("10.0.0.5"), deadline),
            Err(LookupError::NotFound { ip: ip("10.0.0.5") })
        );
        assert!(index.get("app", "old").is_some());
    }

    #[test]
    fn a_terminating_holder_yields_to_a_new_pod_awaiting_its_address() {
        let index = PodIndex::new();
        let now = SystemTime::now();
        let old = terminating(
            pod("app", "old", "Running", &["10.0.0.5"], false),
            now + Duration::from_secs(30),
        );
        index.apply(&old);
        // A new pod scheduled here without an address yet: the old one's address is suspect.
        let new = pod("app", "new", "Pending", &[], false);
        index.apply(&new);
        assert_eq!(index.awaiting_address(), 1);
        assert_eq!(
            index.lookup_at(ip("10.0.0.5"), now),
            Err(LookupError::Reassigning { ip: ip("10.0.0.5") })
        );
        // The new pod's address arrives: the same one. The live pod wins, never the old one.
        index.apply(&pod("app", "new", "Running", &["10.0.0.5"], false));
        assert_eq!(index.awaiting_address(), 0);
        assert_eq!(index.lookup_at(ip("10.0.0.5"), now).unwrap().name, "new");
        // A pod that is not terminating keeps its address while others await theirs.
        index.apply(&pod("app", "other", "Running", &["10.0.0.6"], false));
        index.apply(&pod("app", "next", "Pending", &[], false));
        assert_eq!(index.lookup_at(ip("10.0.0.6"), now).unwrap().name, "other");
        // Two terminating claims stay ambiguous.
        index.delete(&pod("app", "next", "Pending", &[], false));
        let twin = terminating(
            pod("app", "twin", "Running", &["10.0.0.6"], false),
            now + Duration::from_secs(30),
        );
        index.apply(&terminating(
            pod("app", "other", "Running", &["10.0.0.6"], false),
            now + Duration::from_secs(30),
        ));
        index.apply(&twin);
        assert_eq!(
            index.lookup_at(ip("10.0.0.6"), now),
            Err(LookupError::Ambiguous {
                ip: ip("10.0.0.6"),
                count: 2
            })
        );
    }

    #[test]
    fn a_terminating_pod_is_served_when_no_pod_awaits_an_address() {
        let index = PodIndex::new();
        let now = SystemTime::now();
        index.apply(&terminating(
            pod("app", "old", "Running", &["10.0.0.5"], false),
            now + Duration::from_secs(30),
        ));
        // Pods that will never get an address (terminating, host network) make nothing wait.
        index.apply(&terminating(
            pod("app", "gone", "Pending", &[], false),
            now + Duration::from_secs(30),
        ));
        index.apply(&pod("app", "hn", "Pending", &[], true));
        assert_eq!(index.awaiting_address(), 0);
        assert_eq!(index.lookup_at(ip("10.0.0.5"), now).unwrap().name, "old");
    }

    #[tokio::test]
    async fn a_reassigning_address_waits_for_the_new_pod() {
        let index = Arc::new(PodIndex::new());
        let later = SystemTime::now() + Duration::from_secs(600);
        index.apply(&terminating(
            pod("app", "old", "Running", &["10.0.0.5"], false),
            later,
        ));
        index.apply(&pod("app", "new", "Pending", &[], false));
        let waiter = {
            let index = Arc::clone(&index);
            tokio::spawn(async move {
                index
                    .wait_for(ip("10.0.0.5"), Duration::from_secs(30))
                    .await
            })
        };
        tokio::task::yield_now().await;
        index.apply(&pod("app", "new", "Running", &["10.0.0.5"], false));
        let got = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("wait_for must wake on the change")
            .unwrap()
            .unwrap();
        assert_eq!(got.name, "new");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reassigning_address_is_refused_when_the_wait_ends() {
        let index = PodIndex::new();
        let later = SystemTime::now() + Duration::from_secs(600);
        index.apply(&terminating(
            pod("app", "old", "Running", &["10.0.0.5"], false),
            later,
        ));
        index.apply(&pod("app", "new", "Pending", &[], false));
        let got = index.wait_for(ip("10.0.0.5"), Duration::from_secs(2)).await;
        assert_eq!(got, Err(LookupError::Reassigning { ip: ip("10.0.0.5") }));
    }

    /// Routes set by the test: address → interface index.
    #[derive(Debug, Default)]
    struct Routes(Mutex<HashMap<IpAddr, u32>>);

    impl Routes {
        fn set(&self, addr: &str, interface: u32) {
            self.0.lock().unwrap().insert(ip(addr), interface);
        }
    }

    impl RouteProbe for Routes {
        fn interface(&self, ip: IpAddr) -> Option<u32> {
            self.0.lock().unwrap().get(&ip).copied()
        }
    }

    #[test]
    fn a_blind_watch_serves_known_pods_only_while_their_route_holds() {
        let routes = Arc::new(Routes::default());
        routes.set("10.0.0.5", 7);
        routes.set("10.0.0.6", 8);
        let index = PodIndex::with_route_probe(routes.clone());
        index.replace_all([
            &pod("app", "a", "Running", &["10.0.0.5"], false),
            &pod("app", "b", "Running", &["10.0.0.6"], false),
        ]);
        index.mark_synced();
        assert_eq!(index.watch_state(), WatchState::Streaming);
        // A pod whose route appears only after it was indexed has no anchor.
        routes.set("10.0.0.7", 9);
        index.apply(&pod("app", "c", "Running", &["10.0.0.8"], false));
        routes.set("10.0.0.8", 10);

        // While streaming, routes are not consulted.
        routes.set("10.0.0.5", 70);
        assert_eq!(index.lookup(ip("10.0.0.5")).unwrap().name, "a");
        routes.set("10.0.0.5", 7);

        let failed = Instant::now();
        index.watch_failed(failed);
        index.watch_failed(failed + Duration::from_secs(5));
        assert_eq!(index.watch_state(), WatchState::Blind { since: failed });
        assert_eq!(
            index.watch_blind_for(failed + Duration::from_secs(9)),
            Duration::from_secs(9)
        );
        // Static stability: known pods on their own routes are served.
        assert_eq!(index.lookup(ip("10.0.0.5")).unwrap().name, "a");
        assert_eq!(index.lookup(ip("10.0.0.6")).unwrap().name, "b");
        // The sandbox of a was rebuilt for someone else: a new interface, never a's identity.
        routes.set("10.0.0.5", 11);
        assert_eq!(
            index.lookup(ip("10.0.0.5")),
            Err(LookupError::Untrusted { ip: ip("10.0.0.5") })
        );
        // No anchor recorded: not trusted while blind.
        assert_eq!(
            index.lookup(ip("10.0.0.8")),
            Err(LookupError::Untrusted { ip: ip("10.0.0.8") })
        );
        // A relist makes the index current again; anchors of unchanged pods are kept.
        index.replace_all([
            &pod("app", "a", "Running", &["10.0.0.5"], false),
            &pod("app", "b", "Running", &["10.0.0.6"], false),
        ]);
        index.watch_listed();
        assert_eq!(index.watch_state(), WatchState::Streaming);
        assert_eq!(index.watch_blind_for(Instant::now()), Duration::ZERO);
        assert_eq!(index.lookup(ip("10.0.0.5")).unwrap().name, "a");
        index.watch_failed(Instant::now());
        assert!(index.lookup(ip("10.0.0.5")).is_err(), "anchor kept: 7");
        assert_eq!(index.lookup(ip("10.0.0.6")).unwrap().name, "b");
    }

    #[tokio::test(start_paused = true)]
    async fn wait_for_is_bounded() {
        let index = PodIndex::new();
        let started = tokio::time::Instant::now();
        let got = index.wait_for(ip("10.0.0.5"), Duration::from_secs(2)).await;
        assert_eq!(got, Err(LookupError::NotFound { ip: ip("10.0.0.5") }));
        assert!(started.elapsed() >= Duration::from_secs(2));
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}
