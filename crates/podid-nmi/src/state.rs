//! The state the watches fill and the servers read: the current [`MatchIndex`] and the binding
//! copies of the node's assignments, swapped whole by the watches ([`crate::run`]) and read by
//! every token request under short locks. The pod index is [`crate::pods`], the health flags
//! [`crate::health`], the service accounts [`crate::workload`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use podid_select::matching::{MatchIndex, MatchOptions};
use tokio::sync::watch;

use podid_select::assigned::AssignedBindings;

/// The current [`MatchIndex`], swapped whole when a watched object changes.
#[derive(Debug)]
pub struct Matcher {
    current: RwLock<Arc<MatchIndex>>,
    assigned: RwLock<Arc<AssignedBindings>>,
    changed: watch::Sender<u64>,
    synced: AtomicBool,
}

impl Matcher {
    /// An empty index with `options`, not synced.
    pub fn new(options: MatchOptions) -> Self {
        Self {
            current: RwLock::new(Arc::new(MatchIndex::new(options, [], [], [], []))),
            assigned: RwLock::new(Arc::new(AssignedBindings::default())),
            changed: watch::Sender::new(0),
            synced: AtomicBool::new(false),
        }
    }

    /// The index requests read now.
    pub fn current(&self) -> Arc<MatchIndex> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Replace the index and wake requests waiting on a pending assignment.
    pub fn replace(&self, index: MatchIndex) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(index);
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Replace the index together with the binding copies of the node's assignments (which
    /// decide the federated switch in standard mode, see [`podid_select::assigned`]).
    pub fn replace_with_assigned(&self, index: MatchIndex, assigned: AssignedBindings) {
        *self.assigned.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(assigned);
        self.replace(index);
    }

    /// The binding copies recorded in the node's assignments, swapped with the index.
    pub fn assigned(&self) -> Arc<AssignedBindings> {
        Arc::clone(&self.assigned.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Mark the index as built from fully synced caches.
    pub fn mark_synced(&self) {
        self.synced.store(true, Ordering::Release);
    }

    /// Whether [`Matcher::mark_synced`] was called.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Requests currently waiting for the index to change (pending assignments).
    pub fn waiting(&self) -> usize {
        self.changed.receiver_count()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}
