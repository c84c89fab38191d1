//! The process plumbing both binaries, `nmi` and `mic`, share, so that each lives in one place:
//!
//! - [`flags`]: Go's command-line syntax (booleans as `strconv.ParseBool` reads them, durations
//!   as `time.ParseDuration` does, single-dash long flags) and klog's flags, so manifests written
//!   for upstream's Go binaries keep parsing;
//! - [`logging`]: the `tracing` subscriber from `--log-format` and klog's `-v`;
//! - [`shutdown_signal`]: SIGTERM or SIGINT;
//! - [`reflect`] and [`reflect_projected`]: a Kubernetes reflector feeding a store (each object
//!   optionally reduced first) and waking a [`tokio::sync::Notify`];
//! - [`error_chain`]: an error and its causes on one line;
//! - [`version_line`]: `--version`'s answer in upstream's shape.
//!
//! Nothing here knows about identities, IMDS or ARM; it must not depend on the product crates
//! (podid-api, podid-broker, podid-arm, podid-nmi, podid-mic) nor on the test doubles.

pub mod flags;
pub mod logging;
mod reflect;
mod signal;

pub use reflect::{reflect, reflect_projected};
pub use signal::shutdown_signal;

/// The error and its causes, one after the other (`outer: cause: root cause`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The version line, in upstream's shape (both Go binaries print the same line).
pub fn version_line() -> String {
    let version = env!("CARGO_PKG_VERSION");
    let commit = option_env!("PODID_GIT_COMMIT").unwrap_or("unknown");
    let date = option_env!("PODID_BUILD_DATE").unwrap_or("unknown");
    format!("MIC Version: {version} - NMI Version: {version} - Commit: {commit} - Date: {date}")
}

/// The user agent of a component's outgoing calls: `podid/<component>/<version>[ <custom>]`.
pub fn user_agent(component: &str, custom: Option<&str>) -> String {
    let base = format!("podid/{component}/{}", env!("CARGO_PKG_VERSION"));
    match custom {
        Some(custom) => format!("{base} {custom}"),
        None => base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn error_chain_names_every_cause_in_order() {
        let root = Layer("connection refused", None);
        let middle = Layer("cannot reach ARM", Some(Box::new(root)));
        let outer = Layer("failed to create MIC client", Some(Box::new(middle)));
        assert_eq!(
            error_chain(&outer),
            "failed to create MIC client: cannot reach ARM: connection refused"
        );
        assert_eq!(error_chain(&Layer("alone", None)), "alone");
    }

    #[test]
    fn version_has_upstreams_shape() {
        let line = version_line();
        assert!(line.starts_with("MIC Version: "), "{line}");
        assert!(line.contains(" - NMI Version: ") && line.contains(" - Commit: "));
        assert_eq!(
            user_agent("NMI", Some("x")),
            format!("{} x", user_agent("NMI", None))
        );
        assert!(user_agent("MIC", None).starts_with("podid/MIC/"));
    }
}
