//! What a pass or a VM/VMSS job achieved: counts for the log and the retry, and the records
//! the loop's memory takes in.

use std::time::Duration;

use podid_api::AzureAssignedIdentity;
use tracing::warn;

use super::memory::Written;
use super::name_of;

/// What one pass achieved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct PassReport {
    /// Objects created.
    pub(super) created: usize,
    /// Objects rewritten.
    pub(super) updated: usize,
    /// Objects deleted.
    pub(super) deleted: usize,
    /// Objects that turned `Assigned`: patched, or created in that state.
    pub(super) assigned: usize,
    /// Of those, confirmed without an ARM call: their identity was known to be on the VM/VMSS
    /// (held after its last pod, or kept by another assignment).
    pub(super) confirmed_without_arm: usize,
    /// Failed API or ARM calls (the pass is retried).
    pub(super) failures: usize,
    /// The longest `Retry-After` an assigner reported: the retry waits at least this long.
    pub(super) retry_after: Option<Duration>,
    /// Uids of the objects deleted (or found gone) by this pass. The loop keeps them out of
    /// later passes while its cache still shows them, so they are not deleted twice.
    pub(super) removed: Vec<String>,
    /// What this pass created or marked `Assigned` (compact: names, versions, the new state).
    /// While the cache has not caught up, the loop waits for created objects to show up and
    /// reads confirmed ones with their new state, so a later pass neither creates nor confirms
    /// them again (with their events).
    pub(super) written: Vec<Written>,
}

impl PassReport {
    /// Adds what [`super::job::create_after_arm`] did.
    pub(super) fn absorb_created(&mut self, other: PassReport) {
        self.created += other.created;
        self.assigned += other.assigned;
        self.failures += other.failures;
        self.written.extend(other.written);
    }

    /// Counts confirmation results and keeps the record of each successful one (`None` when
    /// the object it confirmed is not known).
    pub(super) fn confirmations(
        &mut self,
        results: impl IntoIterator<Item = Result<Option<Written>, kube::Error>>,
    ) {
        for result in results {
            match result {
                Ok(written) => {
                    self.assigned += 1;
                    self.written.extend(written);
                }
                Err(e) => {
                    warn!(error = %e, "AzureAssignedIdentity call failed");
                    self.failures += 1;
                }
            }
        }
    }

    /// Counts deletion results and records the uids of the objects now gone.
    pub(super) fn deletions(
        &mut self,
        results: Vec<(&AzureAssignedIdentity, Result<(), kube::Error>)>,
    ) {
        for (object, result) in results {
            match result {
                Ok(()) => {
                    self.deleted += 1;
                    self.removed.extend(object.metadata.uid.clone());
                }
                Err(e) => {
                    warn!(name = name_of(object), error = %e, "failed to delete AzureAssignedIdentity");
                    self.failures += 1;
                }
            }
        }
    }
}

/// A confirmation's outcome: its record (`None` when the object it confirmed is not known).
pub(super) type ConfirmResult = Result<Option<Written>, kube::Error>;
