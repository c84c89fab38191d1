//! The IP → pod index NMI attributes requests with (reference §2.6, DESIGN §2 step 3, §6).
//!
//! Fed by pod watch events of this node ([`PodIndex::apply`], [`PodIndex::delete`],
//! [`PodIndex::replace_all`] on a relist). Only pods in phase `Pending` or `Running` that do not
//! use the host network are indexed (host-network pods share the node's address); their
//! addresses come from `status.podIP` and `status.podIPs`. Two live pods claiming one address
//! make it ambiguous and every lookup of it fails closed.
//!
//! Lookups are O(1) hash lookups under a short read lock that is never held across an await.
//! [`PodIndex::wait_for`] gives a just-started pod a bounded wait for the watch to catch up.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use podid_controller::matching::CallerPod;
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
}

impl LookupError {
    /// The matching IMDS error (500 in both cases, reference §2.14).
    pub fn to_imds_error(self) -> podid_imds::ImdsError {
        match self {
            Self::NotFound { ip } => podid_imds::ImdsError::NoPodForAddress { ip },
            Self::Ambiguous { ip, count } => {
                podid_imds::ImdsError::AmbiguousPodAddress { ip, count }
            }
        }
    }
}

type PodKey = (String, String);

#[derive(Debug)]
struct Entry {
    ips: Vec<IpAddr>,
    pod: Arc<CallerPod>,
    /// `metadata.uid` (a federated token is bound to it).
    uid: String,
}

#[derive(Debug, Default)]
struct Inner {
    /// namespace → name → entry (looked up with borrowed names).
    pods: HashMap<String, HashMap<String, Entry>>,
    /// Number of entries in `pods`.
    count: usize,
    by_ip: HashMap<IpAddr, Vec<PodKey>>,
}

impl Inner {
    fn entry(&self, namespace: &str, name: &str) -> Option<&Entry> {
        self.pods.get(namespace)?.get(name)
    }

    fn remove(&mut self, key: &PodKey) {
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

    fn insert(&mut self, key: PodKey, entry: Entry) {
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
}

/// The node's pods by address. Share it as `Arc<PodIndex>`.
#[derive(Debug)]
pub struct PodIndex {
    inner: RwLock<Inner>,
    changed: watch::Sender<u64>,
    synced: AtomicBool,
}

impl Default for PodIndex {
    fn default() -> Self {
        Self::new()
    }
}

/// A pod's key, addresses and matcher view, or `None` when it must not be indexed.
fn index_entry(pod: &Pod) -> Option<(PodKey, Entry)> {
    let key = pod_key(pod)?;
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return None;
    }
    let status = pod.status.as_ref()?;
    if !matches!(status.phase.as_deref(), Some("Pending" | "Running")) {
        return None;
    }
    let mut ips: Vec<IpAddr> = status
        .pod_ip
        .iter()
        .chain(status.pod_ips.iter().flatten().map(|p| &p.ip))
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
        .collect();
    ips.sort();
    ips.dedup();
    if ips.is_empty() {
        return None;
    }
    let meta = &pod.metadata;
    let caller = CallerPod {
        namespace: key.0.clone(),
        name: key.1.clone(),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        labels: meta.labels.clone().unwrap_or_default(),
        annotations: meta.annotations.clone().unwrap_or_default(),
    };
    Some((
        key,
        Entry {
            ips,
            pod: Arc::new(caller),
            uid: meta.uid.clone().unwrap_or_default(),
        },
    ))
}

fn pod_key(pod: &Pod) -> Option<PodKey> {
    Some((
        pod.metadata.namespace.clone().unwrap_or_default(),
        pod.metadata.name.clone()?,
    ))
}

impl PodIndex {
    /// An empty, not yet synced index.
    pub fn new() -> Self {
        Self {
            inner: RwLock::new(Inner::default()),
            changed: watch::Sender::new(0),
            synced: AtomicBool::new(false),
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

    /// Add or update a pod from a watch event. A pod that left `Pending`/`Running`, uses the
    /// host network or has no address is removed.
    pub fn apply(&self, pod: &Pod) {
        let Some(key) = pod_key(pod) else { return };
        let entry = index_entry(pod);
        {
            let mut inner = self.write();
            inner.remove(&key);
            if let Some((key, entry)) = entry {
                inner.insert(key, entry);
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
        for pod in pods {
            if let Some((key, entry)) = index_entry(pod) {
                fresh.remove(&key);
                fresh.insert(key, entry);
            }
        }
        *self.write() = fresh;
        self.notify();
    }

    /// Mark the index as holding the full pod list of the node (ready to attribute).
    pub fn mark_synced(&self) {
        self.synced.store(true, Ordering::Release);
        self.notify();
    }

    /// Whether [`PodIndex::mark_synced`] was called.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Number of indexed pods.
    pub fn len(&self) -> usize {
        self.read().count
    }

    /// Whether no pod is indexed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The indexed pod `namespace/name`, if it is live and has an address.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<CallerPod>> {
        self.read()
            .entry(namespace, name)
            .map(|e| Arc::clone(&e.pod))
    }

    /// The `metadata.uid` of the indexed pod `namespace/name` (empty when the API server sent
    /// none), for binding a federated service-account token to the calling pod.
    pub fn uid(&self, namespace: &str, name: &str) -> Option<String> {
        self.read().entry(namespace, name).map(|e| e.uid.clone())
    }

    /// The pod owning `ip` (IPv4-mapped IPv6 addresses are treated as IPv4).
    ///
    /// # Errors
    /// [`LookupError::NotFound`] or [`LookupError::Ambiguous`].
    pub fn lookup(&self, ip: IpAddr) -> Result<Arc<CallerPod>, LookupError> {
        let ip = ip.to_canonical();
        let inner = self.read();
        match inner.by_ip.get(&ip).map(Vec::as_slice) {
            None | Some([]) => Err(LookupError::NotFound { ip }),
            Some([key]) => inner
                .entry(&key.0, &key.1)
                .map(|e| Arc::clone(&e.pod))
                .ok_or(LookupError::NotFound { ip }),
            Some(keys) => Err(LookupError::Ambiguous {
                ip,
                count: keys.len(),
            }),
        }
    }

    /// Like [`PodIndex::lookup`], but when no pod has `ip` yet wait up to `timeout` for the
    /// watch to deliver it. An ambiguous address fails at once.
    ///
    /// # Errors
    /// As [`PodIndex::lookup`] once the time is up.
    pub async fn wait_for(
        &self,
        ip: IpAddr,
        timeout: Duration,
    ) -> Result<Arc<CallerPod>, LookupError> {
        // Fast path: an indexed pod needs no subscription (a shared counter every request
        // would touch) and no deadline.
        match self.lookup(ip) {
            Err(LookupError::NotFound { .. }) => {}
            other => return other,
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.changed.subscribe();
        loop {
            changes.borrow_and_update();
            match self.lookup(ip) {
                Err(LookupError::NotFound { .. }) => {}
                other => return other,
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
