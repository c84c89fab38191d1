//! The service accounts of the cluster with their Workload Identity set-up, fed by a watch
//! started only with `--serve-workload-identity-pods`, so the token path makes no API call to find
//! them. The decision itself (which Workload Identity pods are served, with what) is
//! [`podid_select::workload`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use k8s_openapi::api::core::v1::ServiceAccount;
use podid_select::workload::WorkloadAccounts;
pub use podid_select::workload::{AccountLookup, WorkloadAccount};

/// Service accounts by namespace and name; `None`: the account exists without a client id.
type AccountMap = HashMap<String, HashMap<String, Option<Arc<WorkloadAccount>>>>;

/// Every service account of the cluster with its Workload Identity set-up (`None`: the account
/// exists without a client id). Fed by a watch; looked up with borrowed names under a short
/// read lock never held across an await.
#[derive(Debug, Default)]
pub struct ServiceAccounts {
    by_namespace: RwLock<AccountMap>,
    synced: AtomicBool,
}

impl ServiceAccounts {
    fn read(&self) -> RwLockReadGuard<'_, AccountMap> {
        // Each update is one insert or remove: a poisoned lock leaves the map usable.
        self.by_namespace.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, AccountMap> {
        self.by_namespace.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Add or update `service_account`.
    pub fn apply(&self, service_account: &ServiceAccount) {
        let Some(name) = service_account.metadata.name.clone() else {
            return;
        };
        let namespace = service_account
            .metadata
            .namespace
            .clone()
            .unwrap_or_default();
        let account = WorkloadAccount::of(service_account).map(Arc::new);
        self.write()
            .entry(namespace)
            .or_default()
            .insert(name, account);
    }

    /// Remove `service_account`.
    pub fn delete(&self, service_account: &ServiceAccount) {
        let (Some(namespace), Some(name)) = (
            service_account.metadata.namespace.as_deref(),
            service_account.metadata.name.as_deref(),
        ) else {
            return;
        };
        let mut map = self.write();
        if let Some(names) = map.get_mut(namespace) {
            names.remove(name);
            if names.is_empty() {
                map.remove(namespace);
            }
        }
    }

    /// Replace everything with a complete listing.
    pub fn replace_all<'a>(&self, listing: impl IntoIterator<Item = &'a ServiceAccount>) {
        let fresh = Self::default();
        for service_account in listing {
            fresh.apply(service_account);
        }
        let map = fresh
            .by_namespace
            .into_inner()
            .unwrap_or_else(|e| e.into_inner());
        *self.write() = map;
    }

    /// Mark the initial listing complete.
    pub fn mark_synced(&self) {
        self.synced.store(true, Ordering::Release);
    }

    /// Whether the initial listing is complete.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Number of service accounts known.
    pub fn len(&self) -> usize {
        self.read().values().map(HashMap::len).sum()
    }

    /// Whether no service account is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl WorkloadAccounts for ServiceAccounts {
    /// The service account `namespace`/`name`.
    fn lookup(&self, namespace: &str, name: &str) -> AccountLookup {
        if !self.is_synced() {
            return AccountLookup::NotSynced;
        }
        match self.read().get(namespace).and_then(|names| names.get(name)) {
            None => AccountLookup::Missing,
            Some(None) => AccountLookup::NotAnnotated,
            Some(Some(account)) => AccountLookup::Found(Arc::clone(account)),
        }
    }
}

#[cfg(test)]
mod tests {
    use podid_api::WORKLOAD_IDENTITY_CLIENT_ID_ANNOTATION;

    use super::*;

    fn account(namespace: &str, name: &str, annotations: &[(&str, &str)]) -> ServiceAccount {
        let mut sa = ServiceAccount::default();
        sa.metadata.namespace = Some(namespace.to_owned());
        sa.metadata.name = Some(name.to_owned());
        if !annotations.is_empty() {
            sa.metadata.annotations = Some(
                annotations
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            );
        }
        sa
    }

    const CLIENT: &str = "0b1c2d3e-0000-4000-8000-00000000000a";

    #[test]
    fn lookups_fail_until_synced_and_follow_updates_and_deletes() {
        let index = ServiceAccounts::default();
        assert_eq!(index.lookup("apps", "web"), AccountLookup::NotSynced);
        index.replace_all(&[account("apps", "web", &[])]);
        index.mark_synced();
        assert_eq!(index.lookup("apps", "web"), AccountLookup::NotAnnotated);
        let annotated = account(
            "apps",
            "web",
            &[(WORKLOAD_IDENTITY_CLIENT_ID_ANNOTATION, CLIENT)],
        );
        index.apply(&annotated);
        assert!(
            matches!(index.lookup("apps", "web"), AccountLookup::Found(a) if a.client_id == CLIENT)
        );
        assert_eq!(index.len(), 1);
        index.delete(&annotated);
        assert_eq!(index.lookup("apps", "web"), AccountLookup::Missing);
        assert!(index.is_empty());
        // A relist replaces everything.
        index.apply(&annotated);
        index.replace_all(&[account("other", "x", &[])]);
        assert_eq!(index.lookup("apps", "web"), AccountLookup::Missing);
        assert_eq!(index.lookup("other", "x"), AccountLookup::NotAnnotated);
    }
}
