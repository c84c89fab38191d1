//! [`ArmError`]: why reading or changing the identities of a VM or VMSS failed. Every variant
//! names the compute resource (and, for updates, the identity ids involved); none carries a
//! token or a request body.

use std::fmt;
use std::time::Duration;

use podid_broker::BrokerError;

use super::ids::{ComputeId, ComputeKind, IdentityResourceId};

/// Which ARM call failed (upstream's metric label values, docs/upstream.md#arm-calls).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ArmOperation {
    /// GET of a VM.
    VmGet,
    /// PATCH of a VM (and the wait for its long-running operation).
    VmUpdate,
    /// GET of a VMSS.
    VmssGet,
    /// PATCH of a VMSS (and the wait for its long-running operation).
    VmssUpdate,
}

impl ArmOperation {
    /// The GET of `kind`.
    pub fn get(kind: ComputeKind) -> Self {
        match kind {
            ComputeKind::VirtualMachine => Self::VmGet,
            ComputeKind::VirtualMachineScaleSet => Self::VmssGet,
        }
    }

    /// The PATCH of `kind`.
    pub fn update(kind: ComputeKind) -> Self {
        match kind {
            ComputeKind::VirtualMachine => Self::VmUpdate,
            ComputeKind::VirtualMachineScaleSet => Self::VmssUpdate,
        }
    }

    /// Upstream's `operation_type` metric label (`vm_get`, `vmss_update`, …).
    pub fn metric_label(self) -> &'static str {
        match self {
            Self::VmGet => "vm_get",
            Self::VmUpdate => "vm_update",
            Self::VmssGet => "vmss_get",
            Self::VmssUpdate => "vmss_update",
        }
    }

    /// Upstream's client name in throttling messages (`VMSSGet`, `VMUpdate`, …).
    pub fn client_name(self) -> &'static str {
        match self {
            Self::VmGet => "VMGet",
            Self::VmUpdate => "VMUpdate",
            Self::VmssGet => "VMSSGet",
            Self::VmssUpdate => "VMSSUpdate",
        }
    }
}

impl fmt::Display for ArmOperation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.metric_label())
    }
}

/// Identity ids joined for messages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdList(pub Vec<IdentityResourceId>);

impl fmt::Display for IdList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, id) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(id.as_str())?;
        }
        f.write_str("]")
    }
}

/// Why an ARM call failed.
#[derive(Debug, thiserror::Error)]
pub enum ArmError {
    /// ARM answered 429 (or 503 with `Retry-After`), or an earlier answer still gates this
    /// subscription. No request was retried; callers should come back after `retry_after`.
    #[error("{} client throttled, retry after: {}s ({compute})", operation.client_name(), retry_after.as_secs())]
    Throttled {
        /// The resource.
        compute: ComputeId,
        /// The call.
        operation: ArmOperation,
        /// How long to wait.
        retry_after: Duration,
    },
    /// ARM rejected the bearer token or the caller lacks permission (401/403 other than a
    /// linked-authorization failure on identities).
    #[error("{operation} of {compute} not authorized (HTTP {status}): {code}: {message}")]
    Auth {
        /// The resource.
        compute: ComputeId,
        /// The call.
        operation: ArmOperation,
        /// 401 or 403.
        status: u16,
        /// ARM's error code (`InvalidAuthenticationToken`, `AuthorizationFailed`, …).
        code: String,
        /// ARM's message, truncated.
        message: String,
    },
    /// The VM or VMSS does not exist (404).
    #[error("{operation} of {compute}: not found: {code}: {message}")]
    NotFound {
        /// The resource.
        compute: ComputeId,
        /// The call.
        operation: ArmOperation,
        /// ARM's error code.
        code: String,
        /// ARM's message, truncated.
        message: String,
    },
    /// The resource is being deleted; no PATCH was sent (upstream's message,
    /// docs/upstream.md#arm-calls).
    #[error("{}", deleting_message(compute))]
    Deleting {
        /// The resource.
        compute: ComputeId,
        /// The ids that were to be added.
        add: IdList,
        /// The ids that were to be removed.
        remove: IdList,
    },
    /// ARM refused to assign some identities (`LinkedAuthorizationFailed`,
    /// `FailedIdentityOperation`) and no retry without them was possible or it failed the same way.
    #[error("{operation} of {compute} refused identities {ids} (HTTP {status}): {code}: {message}")]
    IdentitiesRefused {
        /// The resource.
        compute: ComputeId,
        /// The call.
        operation: ArmOperation,
        /// The ids named in ARM's message.
        ids: IdList,
        /// HTTP status.
        status: u16,
        /// ARM's error code.
        code: String,
        /// ARM's message, truncated.
        message: String,
    },
    /// Any other unsuccessful answer.
    #[error("{operation} of {compute} failed (HTTP {status}): {code}: {message}; ids {ids}")]
    Status {
        /// The resource.
        compute: ComputeId,
        /// The call.
        operation: ArmOperation,
        /// The ids of the PATCH (empty for GET).
        ids: IdList,
        /// HTTP status.
        status: u16,
        /// ARM's error code, or `unknown`.
        code: String,
        /// ARM's message, truncated.
        message: String,
    },
    /// The long-running operation of a PATCH ended `Failed` or `Canceled`.
    #[error("{operation} of {compute} ended {status}: {code}: {message}; ids {ids}")]
    OperationFailed {
        /// The resource.
        compute: ComputeId,
        /// The call.
        operation: ArmOperation,
        /// The ids of the PATCH.
        ids: IdList,
        /// `Failed` or `Canceled`.
        status: String,
        /// The operation's error code, or `unknown`.
        code: String,
        /// The operation's error message, truncated.
        message: String,
    },
    /// The long-running operation of a PATCH was still running when the wait ended.
    #[error("{operation} of {compute} still in progress after {waited:?}; ids {ids}")]
    OperationTimeout {
        /// The resource.
        compute: ComputeId,
        /// The call.
        operation: ArmOperation,
        /// The ids of the PATCH.
        ids: IdList,
        /// How long it was polled.
        waited: Duration,
    },
    /// ARM could not be reached or the connection failed.
    #[error("{operation} of {compute}: request failed; ids {ids}")]
    Transport {
        /// The resource.
        compute: ComputeId,
        /// The call.
        operation: ArmOperation,
        /// The ids of the PATCH (empty for GET).
        ids: IdList,
        /// The cause (no headers, no body).
        #[source]
        source: reqwest::Error,
    },
    /// ARM answered something this client cannot read.
    #[error("{operation} of {compute}: unexpected response: {reason}")]
    InvalidResponse {
        /// The resource.
        compute: ComputeId,
        /// The call.
        operation: ArmOperation,
        /// What was wrong.
        reason: String,
    },
    /// No ARM token could be obtained.
    #[error("{operation} of {compute}: no ARM token")]
    Token {
        /// The resource.
        compute: ComputeId,
        /// The call.
        operation: ArmOperation,
        /// Why.
        #[source]
        source: BrokerError,
    },
}

fn deleting_message(compute: &ComputeId) -> String {
    match compute.kind() {
        ComputeKind::VirtualMachineScaleSet => format!(
            "failed to update identities for {} in {}, vmss is in Deleting provisioning state",
            compute.name(),
            compute.resource_group()
        ),
        ComputeKind::VirtualMachine => format!(
            "failed to update identities for {} in {}, vm is in 'Deleting' provisioning state",
            compute.name(),
            compute.resource_group()
        ),
    }
}

impl ArmError {
    /// The resource the failed call was about.
    pub fn compute(&self) -> &ComputeId {
        match self {
            Self::Throttled { compute, .. }
            | Self::Auth { compute, .. }
            | Self::NotFound { compute, .. }
            | Self::Deleting { compute, .. }
            | Self::IdentitiesRefused { compute, .. }
            | Self::Status { compute, .. }
            | Self::OperationFailed { compute, .. }
            | Self::OperationTimeout { compute, .. }
            | Self::Transport { compute, .. }
            | Self::InvalidResponse { compute, .. }
            | Self::Token { compute, .. } => compute,
        }
    }

    /// How long ARM asked callers to wait, for [`ArmError::Throttled`].
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Throttled { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// Whether trying again later can help (throttling, 5xx, transport, timeouts). Auth
    /// failures, refusals, 4xx and `Deleting` need a change elsewhere first.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Throttled { .. }
            | Self::Transport { .. }
            | Self::OperationTimeout { .. }
            | Self::Token { .. } => true,
            Self::Status { status, .. } => *status >= 500 || *status == 408 || *status == 409,
            Self::OperationFailed { .. } => true,
            Self::Auth { .. }
            | Self::NotFound { .. }
            | Self::Deleting { .. }
            | Self::IdentitiesRefused { .. }
            | Self::InvalidResponse { .. } => false,
        }
    }
}
