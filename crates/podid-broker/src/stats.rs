//! [`BrokerStats`]: counters NMI maps to Prometheus. Labels are bounded: the only dimension is
//! [`SourceKind`].

use std::sync::atomic::{AtomicU64, Ordering};

use super::source::SourceKind;

/// Upstream counters of one source kind.
#[derive(Debug, Default)]
pub struct SourceCounters {
    calls: AtomicU64,
    errors: AtomicU64,
}

impl SourceCounters {
    /// Upstream calls started.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Upstream calls that failed.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
}

/// Broker counters (monotonic).
#[derive(Debug, Default)]
pub struct BrokerStats {
    hits: AtomicU64,
    misses: AtomicU64,
    coalesced: AtomicU64,
    background_refreshes: AtomicU64,
    stale_served: AtomicU64,
    evictions: AtomicU64,
    sources: [SourceCounters; 4],
}

macro_rules! counter {
    ($name:ident, $incr:ident, $doc:literal) => {
        #[doc = $doc]
        pub fn $name(&self) -> u64 {
            self.$name.load(Ordering::Relaxed)
        }

        pub(crate) fn $incr(&self) {
            self.$name.fetch_add(1, Ordering::Relaxed);
        }
    };
}

impl BrokerStats {
    counter!(hits, hit, "Requests answered from the cache.");
    counter!(
        misses,
        miss,
        "Requests that found no valid token and waited for an upstream call."
    );
    counter!(
        coalesced,
        coalesce,
        "Misses that joined an upstream call already in flight."
    );
    counter!(
        background_refreshes,
        background_refresh,
        "Background refreshes started."
    );
    counter!(
        stale_served,
        serve_stale,
        "Hits served while the last refresh of the entry had failed."
    );
    counter!(
        evictions,
        evict,
        "Entries evicted to keep the cache bounded."
    );

    /// Upstream counters of `kind`.
    pub fn source(&self, kind: SourceKind) -> &SourceCounters {
        &self.sources[kind.index()]
    }

    pub(crate) fn upstream_call(&self, kind: SourceKind) {
        self.sources[kind.index()]
            .calls
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn upstream_error(&self, kind: SourceKind) {
        self.sources[kind.index()]
            .errors
            .fetch_add(1, Ordering::Relaxed);
    }
}
