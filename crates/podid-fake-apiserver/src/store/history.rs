//! The watch-history window: per kind, the recent changes a watch may resume from, and the
//! broadcast of every change to the watches.
//!
//! The window follows the real API server's watch cache: one window per resource (a burst of
//! Event writes does not expire the Pods' history), holding at least
//! [`Store::new`](super::Store::new)'s `history_limit` changes and, beyond that, every change
//! younger than the freshness period (kube-apiserver keeps 75 s of events and grows its cache
//! up to 102,400 to do so), never more than [`HISTORY_CAP`]. A watch from a version older than
//! its kind's window gets `410 Expired`.

use crate::status::ApiError;
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

/// The most changes a kind's history window holds however fresh (kube-apiserver's watch-cache
/// upper bound, 100 × 1024).
pub const HISTORY_CAP: usize = 100 * 1024;

/// How long a change stays in its kind's history window at least (up to [`HISTORY_CAP`]):
/// kube-apiserver's watch-cache freshness period.
pub const HISTORY_FRESH: Duration = Duration::from_secs(75);

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Created.
    Added,
    /// Changed.
    Modified,
    /// Removed.
    Deleted,
}

/// One stored change, as kept in the history window and broadcast to watches.
#[derive(Debug)]
pub struct Change {
    /// The global resourceVersion of this change.
    pub rv: u64,
    /// Index of the kind.
    pub kind: usize,
    /// Namespace (`""` for cluster-scoped).
    pub namespace: String,
    /// What happened.
    pub op: Op,
    /// The object before the change (for selector transitions).
    pub old: Option<Value>,
    /// The object after the change (the last state for deletions).
    pub new: Value,
}

/// How a watch starts.
#[derive(Debug)]
pub struct WatchStart {
    /// Events to send before live ones.
    pub initial: Vec<Arc<Change>>,
    /// resourceVersion up to which `initial` covers everything.
    pub rv: u64,
    /// Live changes after `rv`.
    pub rx: broadcast::Receiver<Arc<Change>>,
}

/// Every kind's history window, and the broadcast of changes to watches.
#[derive(Debug)]
pub(super) struct History {
    /// Per kind: its recent changes and when each was made.
    windows: Vec<VecDeque<(Instant, Arc<Change>)>>,
    /// Per kind: watches may resume from any rv >= floor.
    floor: Vec<u64>,
    limit: usize,
    fresh: Duration,
    tx: broadcast::Sender<Arc<Change>>,
}

impl History {
    /// Windows for `kinds` kinds of at least `limit` changes each, fresh for [`HISTORY_FRESH`].
    pub(super) fn new(kinds: usize, limit: usize) -> Self {
        let (tx, _) = broadcast::channel(16_384);
        Self {
            windows: (0..kinds).map(|_| VecDeque::new()).collect(),
            floor: vec![0; kinds],
            limit: limit.max(1),
            fresh: HISTORY_FRESH,
            tx,
        }
    }

    /// A window for a newly registered kind.
    pub(super) fn add_kind(&mut self) {
        self.windows.push(VecDeque::new());
        // It had no changes before: a watch from any version replays only what follows.
        self.floor.push(0);
    }

    /// See [`Store::set_history_fresh`](super::Store::set_history_fresh).
    pub(super) fn set_fresh(&mut self, fresh: Duration) {
        self.fresh = fresh;
    }

    /// Empties every window: watches resume only from `rv` on.
    pub(super) fn compact(&mut self, rv: u64) {
        for history in &mut self.windows {
            history.clear();
        }
        for floor in &mut self.floor {
            *floor = rv;
        }
    }

    /// Keeps a stored change in its kind's window (dropping what falls out of it) and sends it
    /// to the watches.
    pub(super) fn record(&mut self, change: Arc<Change>) {
        let kind = change.kind;
        let now = Instant::now();
        let history = &mut self.windows[kind];
        history.push_back((now, change.clone()));
        while history.len() > self.limit
            && history.front().is_some_and(|(at, _)| {
                history.len() > HISTORY_CAP || now.duration_since(*at) >= self.fresh
            })
        {
            if let Some((_, c)) = history.pop_front() {
                self.floor[kind] = c.rv;
            }
        }
        // No receivers is fine.
        let _ = self.tx.send(change);
    }

    /// A receiver of every change from now on.
    pub(super) fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.tx.subscribe()
    }

    /// The changes of `kind` after `rv`; `410 Expired` if `rv` is older than its window.
    pub(super) fn since(&self, kind: usize, rv: u64) -> Result<Vec<Arc<Change>>, ApiError> {
        if rv < self.floor[kind] {
            return Err(ApiError::expired(rv, self.floor[kind] + 1));
        }
        Ok(self.windows[kind]
            .iter()
            .filter(|(_, c)| c.rv > rv)
            .map(|(_, c)| c.clone())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use crate::store::Filter;
    use crate::store::tests::store;
    use serde_json::json;
    use std::time::Duration;

    #[test]
    fn watch_from_compacted_version_is_expired() {
        let (mut s, pods) = store();
        s.create(pods, "ns", json!({"metadata": {"name": "a"}}))
            .expect("create");
        s.create(pods, "ns", json!({"metadata": {"name": "b"}}))
            .expect("create");
        let w = s.watch(pods, &Filter::default(), Some(3)).expect("watch");
        assert_eq!(w.initial.len(), 1);
        s.compact();
        let err = s
            .watch(pods, &Filter::default(), Some(3))
            .expect_err("expired");
        assert_eq!((err.code, err.reason), (410, "Expired"));
        assert!(s.watch(pods, &Filter::default(), Some(4)).is_ok());
    }

    /// Each kind has its own window, as kube-apiserver has one watch cache per resource: a
    /// burst of another kind's writes (Events, a controller's own objects) does not expire a
    /// pod watch; the pods' own changes beyond the window do.
    #[test]
    fn history_windows_are_per_kind_and_count_only_their_own_changes() {
        let (mut s, pods) = store();
        s.set_history_fresh(Duration::ZERO);
        let cms = s.find("", "v1", "configmaps").expect("configmaps");
        let a = s
            .create(pods, "ns", json!({"metadata": {"name": "a"}}))
            .expect("create");
        let from: u64 = a["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .expect("rv");
        for i in 0..250 {
            s.create(cms, "ns", json!({"metadata": {"name": format!("cm-{i}")}}))
                .expect("configmap");
        }
        s.create(pods, "ns", json!({"metadata": {"name": "b"}}))
            .expect("create");
        let w = s
            .watch(pods, &Filter::default(), Some(from))
            .expect("in the pods' window");
        assert_eq!(w.initial.len(), 1, "b replayed");
        // The configmaps' window (100) lost its oldest 150.
        let err = s
            .watch(cms, &Filter::default(), Some(from))
            .expect_err("configmaps expired");
        assert_eq!((err.code, err.reason), (410, "Expired"));
        for i in 0..100 {
            s.create(pods, "ns", json!({"metadata": {"name": format!("p-{i}")}}))
                .expect("create");
        }
        let err = s
            .watch(pods, &Filter::default(), Some(from))
            .expect_err("pods expired by their own changes");
        assert_eq!((err.code, err.reason), (410, "Expired"));
    }

    /// Beyond its minimum, a window keeps every change younger than the freshness period (as
    /// kube-apiserver grows its watch cache to keep 75 s), up to the cap.
    #[test]
    fn history_keeps_fresh_changes_beyond_the_minimum() {
        let (mut s, pods) = store();
        let a = s
            .create(pods, "ns", json!({"metadata": {"name": "a"}}))
            .expect("create");
        let from: u64 = a["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .expect("rv");
        for i in 0..500 {
            s.create(pods, "ns", json!({"metadata": {"name": format!("p-{i}")}}))
                .expect("create");
        }
        let w = s
            .watch(pods, &Filter::default(), Some(from))
            .expect("fresh changes kept");
        assert_eq!(w.initial.len(), 500);
    }
}
