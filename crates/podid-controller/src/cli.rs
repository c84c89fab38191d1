//! Command-line pieces `nmi` and `mic` share (feature `cli`): Go's boolean syntax and klog's
//! flags, so manifests written for upstream's Go binaries keep parsing.

use clap::{ArgAction, Args};

/// Parses a boolean the way Go's `strconv.ParseBool` does.
pub fn parse_go_bool(value: &str) -> Result<bool, String> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        other => Err(format!("invalid boolean value {other:?}")),
    }
}

/// klog's flags, accepted for manifest compatibility (`#[command(flatten)]` them): `-v` sets
/// the log verbosity, the others are ignored (logs always go to stderr).
#[derive(Debug, Clone, Default, Args)]
pub struct KlogFlags {
    /// Log verbosity (klog `-v`).
    #[arg(short = 'v', long = "v", default_value_t = 0)]
    pub verbosity: u8,
    #[arg(long = "logtostderr", hide = true, num_args = 0..=1, require_equals = true,
          default_missing_value = "true", action = ArgAction::Set, value_parser = parse_go_bool)]
    #[doc(hidden)]
    pub logtostderr: Option<bool>,
    #[arg(long = "alsologtostderr", hide = true, num_args = 0..=1, require_equals = true,
          default_missing_value = "true", action = ArgAction::Set, value_parser = parse_go_bool)]
    #[doc(hidden)]
    pub alsologtostderr: Option<bool>,
    #[arg(long = "log_dir", hide = true)]
    #[doc(hidden)]
    pub log_dir: Option<String>,
    #[arg(long = "log_file", hide = true)]
    #[doc(hidden)]
    pub log_file: Option<String>,
    #[arg(long = "vmodule", hide = true)]
    #[doc(hidden)]
    pub vmodule: Option<String>,
    #[arg(long = "stderrthreshold", hide = true)]
    #[doc(hidden)]
    pub stderrthreshold: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        klog: KlogFlags,
    }

    #[test]
    fn go_booleans() {
        for yes in ["1", "t", "T", "TRUE", "true", "True"] {
            assert_eq!(parse_go_bool(yes), Ok(true));
        }
        for no in ["0", "f", "F", "FALSE", "false", "False"] {
            assert_eq!(parse_go_bool(no), Ok(false));
        }
        assert!(parse_go_bool("yes").is_err());
    }

    #[test]
    fn klog_flags_parse_and_only_v_counts() {
        let cli = Cli::try_parse_from([
            "x",
            "-v=3",
            "--logtostderr",
            "--alsologtostderr=false",
            "--log_dir=/tmp",
            "--vmodule=a=1",
        ])
        .expect("valid");
        assert_eq!(cli.klog.verbosity, 3);
        assert_eq!(cli.klog.logtostderr, Some(true));
        assert_eq!(cli.klog.alsologtostderr, Some(false));
        assert!(Cli::try_parse_from(["x", "--logtostderr=maybe"]).is_err());
    }
}
