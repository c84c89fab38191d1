//! MIC's Prometheus metrics under upstream's names (docs/upstream.md#mic-metrics-and-probes, prefix
//! `aadpodidentity_`), in one process-wide registry that the `/metrics` endpoint renders.
//!
//! Labels are bounded: `operation_type` takes only the fixed values listed on each metric.
//! Counters keep upstream's names without `_total` (they were OpenCensus `Count` views).

use std::sync::OnceLock;
use std::time::Duration;

use podid_api::AssignedIdentityState;
use podid_arm::{ArmError, ArmOperation, ComputeKind};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// `operation_type` of a failed AzureAssignedIdentity create.
pub(crate) const OP_ADDITION: &str = "assigned_identity_addition";
/// `operation_type` of a failed AzureAssignedIdentity delete.
pub(crate) const OP_DELETION: &str = "assigned_identity_deletion";
/// `operation_type` of a failed AzureAssignedIdentity update.
pub(crate) const OP_UPDATE: &str = "assigned_identity_update";
/// `operation_type` of a failed status patch (`Assigned`/`Unassigned`).
pub(crate) const OP_STATUS: &str = "update_azure_assigned_identity_status";

/// All of MIC's collectors.
#[derive(Debug)]
struct Metrics {
    registry: Registry,
    addition_duration: Histogram,
    addition_count: IntCounter,
    deletion_duration: Histogram,
    deletion_count: IntCounter,
    update_duration: Histogram,
    update_count: IntCounter,
    cycle_duration: Histogram,
    cycle_count: IntCounter,
    leader_elections: IntCounter,
    cloud_errors: IntCounterVec,
    cloud_duration: HistogramVec,
    kube_errors: IntCounterVec,
    leader: IntGauge,
    assignments: IntGaugeVec,
    held: IntGaugeVec,
    holds_reused: IntCounter,
}

/// The states `podid_mic_assignments` counts by name; any other status counts as
/// [`OTHER_STATE`].
const COUNTED_STATES: [AssignedIdentityState; 3] = [
    AssignedIdentityState::Created,
    AssignedIdentityState::Assigned,
    AssignedIdentityState::Unassigned,
];

/// `state` label of the assignments in none of [`COUNTED_STATES`].
const OTHER_STATE: &str = "other";

/// Every `state` label value of `podid_mic_assignments`.
fn assignment_state_labels() -> impl Iterator<Item = &'static str> {
    COUNTED_STATES
        .iter()
        .map(AssignedIdentityState::as_str)
        .chain([OTHER_STATE])
}

const PREFIX: &str = "aadpodidentity";

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> HistogramOpts {
    HistogramOpts::new(name, help)
        .namespace(PREFIX)
        .buckets(buckets)
}

fn counter(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(PREFIX)
}

impl Metrics {
    fn new() -> Result<Self, prometheus::Error> {
        let api_buckets = vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
        let cycle_buckets = vec![
            0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1200.0,
        ];
        let cloud_buckets = vec![0.5, 1.0, 5.0, 10.0, 20.0, 30.0, 60.0, 300.0, 600.0, 1200.0];
        let registry = Registry::new();
        let m = Self {
            addition_duration: Histogram::with_opts(histogram(
                "assigned_identity_addition_duration_seconds",
                "Duration in seconds of the AzureAssignedIdentity creations",
                api_buckets.clone(),
            ))?,
            addition_count: IntCounter::with_opts(counter(
                "assigned_identity_addition_count",
                "Number of AzureAssignedIdentity creations",
            ))?,
            deletion_duration: Histogram::with_opts(histogram(
                "assigned_identity_deletion_duration_seconds",
                "Duration in seconds of the AzureAssignedIdentity deletions",
                api_buckets.clone(),
            ))?,
            deletion_count: IntCounter::with_opts(counter(
                "assigned_identity_deletion_count",
                "Number of AzureAssignedIdentity deletions",
            ))?,
            update_duration: Histogram::with_opts(histogram(
                "assigned_identity_update_duration_seconds",
                "Duration in seconds of the AzureAssignedIdentity updates",
                api_buckets,
            ))?,
            update_count: IntCounter::with_opts(counter(
                "assigned_identity_update_count",
                "Number of AzureAssignedIdentity updates",
            ))?,
            cycle_duration: Histogram::with_opts(histogram(
                "mic_cycle_duration_seconds",
                "Duration in seconds of the MIC sync cycles",
                cycle_buckets,
            ))?,
            cycle_count: IntCounter::with_opts(counter(
                "mic_cycle_count",
                "Number of MIC sync cycles that did work",
            ))?,
            leader_elections: IntCounter::with_opts(counter(
                "mic_new_leader_election_count",
                "Number of times this MIC process started leader election",
            ))?,
            cloud_errors: IntCounterVec::new(
                counter(
                    "cloud_provider_operations_errors_count",
                    "Number of failed ARM operations",
                ),
                &["operation_type"],
            )?,
            cloud_duration: HistogramVec::new(
                histogram(
                    "cloud_provider_operations_duration_seconds",
                    "Duration in seconds of ARM operations",
                    cloud_buckets,
                ),
                &["operation_type"],
            )?,
            kube_errors: IntCounterVec::new(
                counter(
                    "kubernetes_api_operations_errors_count",
                    "Number of failed Kubernetes API operations",
                ),
                &["operation_type"],
            )?,
            leader: IntGauge::new(
                "podid_mic_leader",
                "1 while this replica holds the leader lease and runs the loop",
            )?,
            assignments: IntGaugeVec::new(
                Opts::new(
                    "podid_mic_assignments",
                    "AzureAssignedIdentity objects in the leader's cache by status, after each pass",
                ),
                &["state"],
            )?,
            held: IntGaugeVec::new(
                Opts::new(
                    "podid_mic_identities_held",
                    "Identities kept on a VM or VM scale set after their last pod left, by reason (grace_period: within --identity-release-grace-period; releasing: the release PATCH is queued, in flight or retried)",
                ),
                &["reason"],
            )?,
            holds_reused: IntCounter::new(
                "podid_mic_identity_holds_reused_total",
                "Held identities a pod needed again within the grace period (assigned without an ARM PATCH)",
            )?,
            registry,
        };
        m.registry.register(Box::new(m.addition_duration.clone()))?;
        m.registry.register(Box::new(m.addition_count.clone()))?;
        m.registry.register(Box::new(m.deletion_duration.clone()))?;
        m.registry.register(Box::new(m.deletion_count.clone()))?;
        m.registry.register(Box::new(m.update_duration.clone()))?;
        m.registry.register(Box::new(m.update_count.clone()))?;
        m.registry.register(Box::new(m.cycle_duration.clone()))?;
        m.registry.register(Box::new(m.cycle_count.clone()))?;
        m.registry.register(Box::new(m.leader_elections.clone()))?;
        m.registry.register(Box::new(m.cloud_errors.clone()))?;
        m.registry.register(Box::new(m.cloud_duration.clone()))?;
        m.registry.register(Box::new(m.kube_errors.clone()))?;
        m.registry.register(Box::new(m.leader.clone()))?;
        m.registry.register(Box::new(m.assignments.clone()))?;
        m.registry.register(Box::new(m.held.clone()))?;
        m.registry.register(Box::new(m.holds_reused.clone()))?;
        for reason in crate::hold::HoldReason::ALL {
            m.held.with_label_values(&[reason.label()]);
        }
        for state in assignment_state_labels() {
            m.assignments.with_label_values(&[state]);
        }
        // Every label value exists from the start, so dashboards see zeros, not gaps.
        for kind in [
            ComputeKind::VirtualMachine,
            ComputeKind::VirtualMachineScaleSet,
        ] {
            for op in [ArmOperation::get(kind), ArmOperation::update(kind)] {
                m.cloud_errors.with_label_values(&[op.metric_label()]);
            }
            m.cloud_duration
                .with_label_values(&[ArmOperation::update(kind).metric_label()]);
        }
        for op in [OP_ADDITION, OP_DELETION, OP_UPDATE, OP_STATUS] {
            m.kube_errors.with_label_values(&[op]);
        }
        Ok(m)
    }
}

fn metrics() -> Option<&'static Metrics> {
    static METRICS: OnceLock<Option<Metrics>> = OnceLock::new();
    METRICS
        .get_or_init(|| match Metrics::new() {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::error!(error = %e, "failed to set up the metrics");
                None
            }
        })
        .as_ref()
}

/// One `update_identities` call on a VM/VMSS: its duration under `<vm|vmss>_update`, and on
/// failure one error under the same label.
pub(crate) fn cloud_operation(kind: ComputeKind, elapsed: Duration, error: Option<&ArmError>) {
    let Some(m) = metrics() else { return };
    let label = ArmOperation::update(kind).metric_label();
    m.cloud_duration
        .with_label_values(&[label])
        .observe(elapsed.as_secs_f64());
    if error.is_some() {
        m.cloud_errors.with_label_values(&[label]).inc();
    }
}

/// A successful AzureAssignedIdentity create.
pub(crate) fn addition(elapsed: Duration) {
    if let Some(m) = metrics() {
        m.addition_count.inc();
        m.addition_duration.observe(elapsed.as_secs_f64());
    }
}

/// A successful AzureAssignedIdentity delete.
pub(crate) fn deletion(elapsed: Duration) {
    if let Some(m) = metrics() {
        m.deletion_count.inc();
        m.deletion_duration.observe(elapsed.as_secs_f64());
    }
}

/// A successful AzureAssignedIdentity update.
pub(crate) fn update(elapsed: Duration) {
    if let Some(m) = metrics() {
        m.update_count.inc();
        m.update_duration.observe(elapsed.as_secs_f64());
    }
}

/// A failed Kubernetes call; `operation` is one of the `OP_*` constants.
pub(crate) fn kube_error(operation: &'static str) {
    if let Some(m) = metrics() {
        m.kube_errors.with_label_values(&[operation]).inc();
    }
}

/// A pass that did work.
pub(crate) fn cycle(elapsed: Duration) {
    if let Some(m) = metrics() {
        m.cycle_count.inc();
        m.cycle_duration.observe(elapsed.as_secs_f64());
    }
}

/// Leader election started (once per process start, as upstream).
pub fn leader_election() {
    if let Some(m) = metrics() {
        m.leader_elections.inc();
    }
}

/// The Prometheus text exposition of every MIC metric.
pub fn render() -> String {
    let Some(m) = metrics() else {
        return String::new();
    };
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&m.registry.gather(), &mut out) {
        tracing::warn!(error = %e, "failed to encode metrics");
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether this replica leads (`podid_mic_leader`).
pub fn leading(leading: bool) {
    if let Some(m) = metrics() {
        m.leader.set(i64::from(leading));
    }
}

/// The assignments by status after a pass (`podid_mic_assignments{state}`): `Created` ones
/// that stay are assignments waiting for ARM.
pub(crate) fn assignment_states<'a>(
    states: impl IntoIterator<Item = Option<&'a AssignedIdentityState>>,
) {
    let Some(m) = metrics() else { return };
    let mut counts = [0i64; COUNTED_STATES.len() + 1];
    for state in states {
        let i = COUNTED_STATES
            .iter()
            .position(|s| Some(s) == state)
            .unwrap_or(COUNTED_STATES.len());
        counts[i] += 1;
    }
    for (state, count) in assignment_state_labels().zip(counts) {
        m.assignments.with_label_values(&[state]).set(count);
    }
}

/// The identities held, by reason (`podid_mic_identities_held{reason}`).
pub(crate) fn identities_held(counts: &std::collections::BTreeMap<crate::hold::HoldReason, usize>) {
    let Some(m) = metrics() else { return };
    for (reason, count) in counts {
        m.held
            .with_label_values(&[reason.label()])
            .set(i64::try_from(*count).unwrap_or(i64::MAX));
    }
}

/// Holds ended because a pod needed the identity again (`podid_mic_identity_holds_reused_total`).
pub(crate) fn holds_reused(n: usize) {
    if let Some(m) = metrics() {
        m.holds_reused.inc_by(n as u64);
    }
}
