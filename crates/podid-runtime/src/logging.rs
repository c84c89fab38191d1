//! The `tracing` subscriber of both binaries: `--log-format` picks text or JSON lines on
//! stderr, klog's `-v` the default level, `RUST_LOG` overrides it.

/// Log output format (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// Parses `--log-format`'s value (`text` or `json`, exactly); `None` for anything else.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "text" => Some(Self::Text),
            "json" => Some(Self::Json),
            _ => None,
        }
    }
}

/// The default filter for klog verbosity `verbosity`: `info` up to 2, `debug` up to 5, then
/// `trace`.
pub fn default_level(verbosity: u8) -> &'static str {
    match verbosity {
        0..=2 => "info",
        3..=5 => "debug",
        _ => "trace",
    }
}

/// Installs the global subscriber: `format` on stderr (colours only on a terminal), level from
/// `RUST_LOG` if set, else from `verbosity` ([`default_level`]). Call once, before logging.
pub fn init(format: LogFormat, verbosity: u8) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level(verbosity)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_levels() {
        assert_eq!(LogFormat::parse("text"), Some(LogFormat::Text));
        assert_eq!(LogFormat::parse("json"), Some(LogFormat::Json));
        assert_eq!(LogFormat::parse("JSON"), None);
        assert_eq!(LogFormat::parse("xml"), None);
        assert_eq!(default_level(0), "info");
        assert_eq!(default_level(2), "info");
        assert_eq!(default_level(3), "debug");
        assert_eq!(default_level(5), "debug");
        assert_eq!(default_level(6), "trace");
    }
}
