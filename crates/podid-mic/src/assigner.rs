//! The seam between the loop and Azure Resource Manager: an [`IdentityAssigner`] puts
//! user-assigned identities on a VM or VM scale set and takes them off. [`crate::arm`] is the
//! production one; [`NoArm`] changes nothing (tests of the Kubernetes side).

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::desired::ArmTarget;

/// The error an [`IdentityAssigner`] reports.
pub type AssignError = Box<dyn std::error::Error + Send + Sync>;

/// A boxed future returned by [`IdentityAssigner::apply`].
pub type AssignFuture<'a> = Pin<Box<dyn Future<Output = Result<(), AssignError>> + Send + 'a>>;

/// A boxed future returned by [`IdentityAssigner::apply_reporting`]: the outcome and the ids
/// found already present.
pub type ReportingFuture<'a> =
    Pin<Box<dyn Future<Output = (Result<(), AssignError>, BTreeSet<String>)> + Send + 'a>>;

/// Puts user-assigned identities on VMs and VM scale sets (the ARM client in production).
pub trait IdentityAssigner: Send + Sync {
    /// Makes every id of `required` present on `target` and every id of `release` absent
    /// (ids lower-cased). Resolves `Ok` once ARM has applied the change.
    fn apply<'a>(
        &'a self,
        target: &'a ArmTarget,
        required: &'a BTreeSet<String>,
        release: &'a BTreeSet<String>,
    ) -> AssignFuture<'a>;

    /// [`IdentityAssigner::apply`], also returning the ids of `required` that were already on
    /// `target` before the call (the assigner did not add them). The default knows none: every
    /// id counts as added by MIC, as upstream assumes.
    fn apply_reporting<'a>(
        &'a self,
        target: &'a ArmTarget,
        required: &'a BTreeSet<String>,
        release: &'a BTreeSet<String>,
    ) -> ReportingFuture<'a> {
        Box::pin(async move { (self.apply(target, required, release).await, BTreeSet::new()) })
    }

    /// How long the remote side asked to be left alone after `error` (ARM's `Retry-After`);
    /// the loop retries no sooner. Default: no such hint.
    fn retry_after(&self, error: &AssignError) -> Option<Duration> {
        let _ = error;
        None
    }
}

/// An [`IdentityAssigner`] error saying that everything was applied except `ids` (lower-cased
/// resource ids refused by ARM or unusable). Assignments of the other ids are confirmed;
/// these stay `Created` and the pass is retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("identities not applied {ids:?}: {reason}")]
pub struct NotApplied {
    /// The ids that were not added (or not removed).
    pub ids: BTreeSet<String>,
    /// Why (ARM's refusal).
    pub reason: String,
}

/// An assigner that changes nothing and always succeeds. Only tests use it: public for the
/// integration tests of the Kubernetes side (`crates/podid-mic/tests`), which run the loop
/// without ARM; the `mic` binary always runs [`crate::arm::ArmAssigner`].
#[derive(Debug, Clone, Copy, Default)]
pub struct NoArm;

impl IdentityAssigner for NoArm {
    fn apply<'a>(
        &'a self,
        _: &'a ArmTarget,
        _: &'a BTreeSet<String>,
        _: &'a BTreeSet<String>,
    ) -> AssignFuture<'a> {
        Box::pin(async { Ok(()) })
    }
}
