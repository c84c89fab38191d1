//! What keeps the node's interception from serving, besides the caches: the flags behind
//! `/healthz` and `/readyz`, the `podid_nmi_not_ready{reason}` gauge and the Node events.
//!
//! nmi installs its interception before anything else can fail, so a node whose nmi cannot
//! serve is closed (pods' IMDS requests are DNAT-ed and go nowhere), never open. What is wrong is
//! then said in three places: `/readyz` answers 503 with the reasons, the gauge is 1 for each,
//! and the agent puts a Warning event on the Node when a reason appears.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// A condition that keeps nmi from serving although its interception is installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Blocker {
    /// `net.ipv4.conf.all.route_localnet` is not 1 and nmi cannot set it: the kernel drops the
    /// packets DNAT-ed to 127.0.0.1 (closed, but no pod gets a token).
    RouteLocalnet,
    /// The IMDS emulation's port is held by another process: DNAT-ed connections go to that
    /// process (never to the VM's IMDS) until nmi can bind it (it retries).
    ImdsListener,
}

impl Blocker {
    /// Every blocker, for the gauge and documentation tests.
    pub const ALL: [Self; 2] = [Self::RouteLocalnet, Self::ImdsListener];

    /// The `reason` label of `podid_nmi_not_ready` and the prefix of its `/readyz` line.
    pub fn label(self) -> &'static str {
        match self {
            Self::RouteLocalnet => "route_localnet",
            Self::ImdsListener => "imds_listener",
        }
    }
}

/// Health flags for the probe port. Share as `Arc<Health>`.
#[derive(Debug, Default)]
pub struct Health {
    interception: AtomicBool,
    any_blocked: AtomicBool,
    blocked: Mutex<BTreeMap<Blocker, String>>,
}

impl Health {
    /// Record that the iptables interception is installed (turns `/healthz` `Active`).
    pub fn set_interception_installed(&self, installed: bool) {
        self.interception.store(installed, Ordering::Release);
    }

    /// Whether the interception is installed.
    pub fn interception_installed(&self) -> bool {
        self.interception.load(Ordering::Acquire)
    }

    /// Record that `blocker` holds, with a human-readable `reason` (no secrets). Returns true
    /// when it did not hold before (the caller reports it once, not on every retry).
    pub fn block(&self, blocker: Blocker, reason: String) -> bool {
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        let new = blocked.insert(blocker, reason).is_none();
        self.any_blocked.store(true, Ordering::Release);
        new
    }

    /// Record that `blocker` no longer holds. Returns true when it held.
    pub fn unblock(&self, blocker: Blocker) -> bool {
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        let held = blocked.remove(&blocker).is_some();
        self.any_blocked
            .store(!blocked.is_empty(), Ordering::Release);
        held
    }

    /// Whether `blocker` holds.
    pub fn is_blocked(&self, blocker: Blocker) -> bool {
        self.any_blocked.load(Ordering::Acquire)
            && self
                .blocked
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&blocker)
    }

    /// Whether any blocker holds (one atomic load).
    pub fn any_blocked(&self) -> bool {
        self.any_blocked.load(Ordering::Acquire)
    }

    /// The blockers that hold, with their reasons, in [`Blocker`] order.
    pub fn blocked(&self) -> Vec<(Blocker, String)> {
        if !self.any_blocked() {
            return Vec::new();
        }
        self.blocked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(b, r)| (*b, r.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blockers_are_reported_once_and_cleared() {
        let health = Health::default();
        assert!(!health.any_blocked());
        assert!(health.block(Blocker::RouteLocalnet, "read-only".into()));
        assert!(
            !health.block(Blocker::RouteLocalnet, "still read-only".into()),
            "a retry is not a new blocker"
        );
        assert!(health.block(Blocker::ImdsListener, "port held".into()));
        assert_eq!(
            health.blocked(),
            vec![
                (Blocker::RouteLocalnet, "still read-only".to_owned()),
                (Blocker::ImdsListener, "port held".to_owned()),
            ]
        );
        assert!(health.unblock(Blocker::RouteLocalnet));
        assert!(!health.unblock(Blocker::RouteLocalnet));
        assert!(health.any_blocked() && health.is_blocked(Blocker::ImdsListener));
        assert!(health.unblock(Blocker::ImdsListener));
        assert!(!health.any_blocked() && health.blocked().is_empty());
    }
}
