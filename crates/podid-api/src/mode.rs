//! The operation mode (`--operation-mode` of NMI, podidctl's copy of it), shared so that NMI,
//! the matcher and podidctl name it with one type.

use std::fmt;

/// How NMI selects identities (docs/upstream.md#identity-selection).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum OperationMode {
    /// MIC writes `AzureAssignedIdentity` objects; NMI serves a pod's `Assigned` one only.
    #[default]
    Standard,
    /// No MIC: identities are pre-assigned to the VM/VMSS by the user; bindings and identities
    /// in the pod's namespace decide (namespaced mode only).
    Managed,
}

impl OperationMode {
    /// Every mode, in the order help texts list them.
    pub const ALL: [Self; 2] = [Self::Standard, Self::Managed];

    /// The flag spelling (`standard`, `managed`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Standard => "standard",
            Self::Managed => "managed",
        }
    }

    /// Parses a flag value ignoring ASCII case, as upstream's NMI does; `None` for anything
    /// else.
    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|mode| mode.as_str().eq_ignore_ascii_case(value))
    }
}

impl fmt::Display for OperationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_any_case_and_nothing_else() {
        assert_eq!(
            OperationMode::parse("standard"),
            Some(OperationMode::Standard)
        );
        assert_eq!(
            OperationMode::parse("MANAGED"),
            Some(OperationMode::Managed)
        );
        assert_eq!(
            OperationMode::parse("Managed"),
            Some(OperationMode::Managed)
        );
        assert_eq!(OperationMode::parse("sidecar"), None);
        assert_eq!(OperationMode::parse(""), None);
        for mode in OperationMode::ALL {
            assert_eq!(OperationMode::parse(&mode.to_string()), Some(mode));
        }
    }
}
