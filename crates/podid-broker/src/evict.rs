//! Which cache entry goes when the cache is full: the pure part of [`super::TokenBroker`]'s
//! eviction.
//!
//! Entries are charged to the [`Requester`] whose request created them. The victim is the least
//! recently used entry of the requester holding the most entries (the one filling the cache;
//! on a tie, the requester inserting now, else the one with the oldest entry). A pod asking for
//! many resources thus evicts its own entries before any other pod's: a pod holding one entry
//! loses it only once every requester holds at most one.

use std::collections::HashMap;

use super::limiter::Requester;

/// The victim among `entries` (`(key, owner, last used)`, only entries that may go), for a new
/// entry of `inserting`; `None` when there is none.
pub(super) fn victim<'a, K>(
    entries: impl IntoIterator<Item = (K, &'a Requester, u64)>,
    inserting: &Requester,
) -> Option<K> {
    struct Owner<K> {
        count: usize,
        oldest: (u64, K),
    }
    let mut owners: HashMap<&Requester, Owner<K>> = HashMap::new();
    for (key, owner, used) in entries {
        match owners.get_mut(owner) {
            Some(o) => {
                o.count += 1;
                if used < o.oldest.0 {
                    o.oldest = (used, key);
                }
            }
            None => {
                owners.insert(
                    owner,
                    Owner {
                        count: 1,
                        oldest: (used, key),
                    },
                );
            }
        }
    }
    owners
        .into_iter()
        .max_by(|(a_owner, a), (b_owner, b)| {
            a.count
                .cmp(&b.count)
                .then_with(|| (*a_owner == inserting).cmp(&(*b_owner == inserting)))
                .then_with(|| b.oldest.0.cmp(&a.oldest.0))
        })
        .map(|(_, owner)| owner.oldest.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_holding_most_entries_loses_its_oldest_first() {
        let noisy = Requester::new("ns/noisy");
        let quiet = Requester::new("ns/quiet");
        let entries = [
            ("quiet-1", &quiet, 1),
            ("noisy-1", &noisy, 5),
            ("noisy-2", &noisy, 3),
            ("noisy-3", &noisy, 9),
        ];
        // The quiet pod's entry is the least recently used, yet the noisy pod's oldest goes,
        // whoever inserts.
        assert_eq!(victim(entries, &quiet), Some("noisy-2"));
        assert_eq!(victim(entries, &noisy), Some("noisy-2"));
    }

    #[test]
    fn ties_hit_the_inserting_pod_then_the_oldest() {
        let a = Requester::new("ns/a");
        let b = Requester::new("ns/b");
        let c = Requester::new("ns/c");
        let entries = [("a", &a, 1), ("b", &b, 2), ("c", &c, 3)];
        assert_eq!(victim(entries, &c), Some("c"));
        assert_eq!(victim(entries, &Requester::new("ns/new")), Some("a"));
        assert_eq!(victim::<&str>([], &a), None);
    }
}
