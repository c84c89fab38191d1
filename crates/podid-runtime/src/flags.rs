//! Command-line pieces `nmi` and `mic` share: Go's boolean and duration syntax, Go's
//! single-dash long flags, and klog's flags, so manifests written for upstream's Go binaries
//! keep parsing.

use std::time::Duration;

use clap::{Arg, ArgAction, Args};

/// Parses a boolean the way Go's `strconv.ParseBool` does.
pub fn parse_go_bool(value: &str) -> Result<bool, String> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        other => Err(format!("invalid boolean value {other:?}")),
    }
}

/// A flag value that cannot be used. The message names the flag and the value:
/// `invalid value "0" for --nmi-port: want a port number 1-65535`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidFlag {
    /// The flag's name without dashes.
    pub flag: &'static str,
    /// The value given.
    pub value: String,
    /// Why it is refused.
    pub reason: String,
}

impl std::fmt::Display for InvalidFlag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "invalid value {:?} for --{}: {}",
            self.value, self.flag, self.reason
        )
    }
}

impl std::error::Error for InvalidFlag {}

/// An [`InvalidFlag`] as the caller's error type (a binary's `ConfigError` with a
/// `From<InvalidFlag>` variant).
pub fn invalid<E: From<InvalidFlag>>(
    flag: &'static str,
    value: &str,
    reason: impl Into<String>,
) -> E {
    E::from(InvalidFlag {
        flag,
        value: value.to_owned(),
        reason: reason.into(),
    })
}

/// A TCP port flag: 1 to 65535.
pub fn parse_port(flag: &'static str, value: &str) -> Result<u16, InvalidFlag> {
    match value.parse::<u16>() {
        Ok(0) | Err(_) => Err(invalid(flag, value, "want a port number 1-65535")),
        Ok(port) => Ok(port),
    }
}

/// Prints a command-line parse result that ends the process (`--help`, or an error with the
/// usage) and returns its status: 0 for `--help`, 2 for bad flags.
pub fn exit(e: &clap::Error) -> std::process::ExitCode {
    let _ = e.print();
    std::process::ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
}

/// Gives a boolean flag Go's syntax: `--flag` sets it, `--flag=<bool>` sets it to a value
/// [`parse_go_bool`] reads (`--flag false` is not a value: Go's `flag` package stops there too).
/// Other arguments are returned unchanged.
///
/// Declare booleans as plain `bool` fields (`default_value = "true"` for those on by default;
/// otherwise the default is `false`) and apply this to the whole command:
/// `#[command(mut_args = podid_runtime::flags::go_bool)]`. The derive then parses, and `--help`
/// shows, `--flag[=<FLAG>] … [default: …]` for each of them.
pub fn go_bool(arg: Arg) -> Arg {
    // clap's derive gives `bool` fields `SetTrue`; nothing else in these commands uses it.
    if !matches!(arg.get_action(), ArgAction::SetTrue) {
        return arg;
    }
    let arg = if arg.get_default_values().is_empty() {
        arg.default_value("false")
    } else {
        arg
    };
    arg.num_args(0..=1)
        .require_equals(true)
        .default_missing_value("true")
        .action(ArgAction::Set)
        .value_parser(parse_go_bool)
}

/// Parses a duration the way Go's `time.ParseDuration` does: an optional sign, then one or more
/// decimal numbers each followed by a unit (`ns`, `us`, `µs`, `ms`, `s`, `m`, `h`); `0` alone is
/// allowed. Negative durations are refused here (no MIC flag accepts them).
pub fn parse_go_duration(value: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {value:?} (want Go syntax such as 30s, 3m or 1h30m)");
    let mut rest = value.strip_prefix('+').unwrap_or(value);
    if rest.starts_with('-') {
        return Err(format!("negative duration {value:?}"));
    }
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total_nanos: f64 = 0.0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let number = &rest[..number_len];
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return Err(bad());
        }
        let amount: f64 = number.parse().map_err(|_| bad())?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos_per_unit = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total_nanos += amount * nanos_per_unit;
    }
    // Go's limit: durations are int64 nanoseconds.
    if total_nanos > i64::MAX as f64 {
        return Err(format!("duration {value:?} is too large"));
    }
    Ok(Duration::from_nanos(total_nanos.round() as u64))
}

/// Rewrites Go-style single-dash long flags (`-kubeconfig=x`, `-forceNamespaced`) to the
/// double-dash form clap parses. Single-letter flags (`-v=4`), `--…` and values are unchanged;
/// everything after a bare `--` is left alone.
pub fn normalize_go_args<I, S>(args: I) -> Vec<String>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut out = Vec::new();
    let mut passthrough = false;
    for (i, arg) in args.into_iter().map(Into::into).enumerate() {
        if i == 0 || passthrough {
            out.push(arg);
            continue;
        }
        if arg == "--" {
            passthrough = true;
            out.push(arg);
            continue;
        }
        let name_len = arg
            .strip_prefix('-')
            .filter(|rest| {
                !rest.starts_with('-') && !rest.starts_with(|c: char| c.is_ascii_digit())
            })
            .map(|rest| rest.split('=').next().unwrap_or_default().chars().count());
        match name_len {
            Some(len) if len > 1 => out.push(format!("-{arg}")),
            _ => out.push(arg),
        }
    }
    out
}

/// klog's flags, accepted for manifest compatibility (`#[command(flatten)]` them): `-v` sets
/// the log verbosity, the others are ignored (logs always go to stderr). Its booleans take Go's
/// syntax on their own.
#[derive(Debug, Clone, Default, Args)]
#[command(mut_args = go_bool)]
pub struct KlogFlags {
    /// Log verbosity (klog `-v`).
    #[arg(short = 'v', long = "v", default_value_t = 0)]
    pub verbosity: u8,
    #[arg(long = "logtostderr", hide = true)]
    #[doc(hidden)]
    pub logtostderr: bool,
    #[arg(long = "alsologtostderr", hide = true)]
    #[doc(hidden)]
    pub alsologtostderr: bool,
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
    use clap::{CommandFactory as _, Parser};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        klog: KlogFlags,
    }

    #[test]
    fn go_durations() {
        let cases = [
            ("3600s", Duration::from_secs(3600)),
            ("1h", Duration::from_secs(3600)),
            ("3m", Duration::from_secs(180)),
            ("2m30s", Duration::from_secs(150)),
            ("1.5h", Duration::from_secs(5400)),
            ("500ms", Duration::from_millis(500)),
            ("10us", Duration::from_micros(10)),
            ("10µs", Duration::from_micros(10)),
            ("7ns", Duration::from_nanos(7)),
            ("+1s", Duration::from_secs(1)),
            ("0", Duration::ZERO),
        ];
        for (text, want) in cases {
            assert_eq!(parse_go_duration(text), Ok(want), "{text}");
        }
        for bad in ["", "1", "s", "1x", "1.2.3s", "-1s", "1h-5m", ".s", "3600"] {
            assert!(parse_go_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn single_dash_long_flags_become_double_dash() {
        let out = normalize_go_args([
            "mic",
            "-kubeconfig=/k",
            "-forceNamespaced",
            "-v=3",
            "--cloudconfig",
            "-x",
            "--createDeleteBatch",
            "-10",
            "--",
            "-after",
        ]);
        assert_eq!(
            out,
            [
                "mic",
                "--kubeconfig=/k",
                "--forceNamespaced",
                "-v=3",
                "--cloudconfig",
                "-x",
                "--createDeleteBatch",
                "-10",
                "--",
                "-after"
            ]
        );
    }

    /// Booleans declared as plain `bool`s, as nmi's and mic's are.
    #[derive(Debug, Parser)]
    #[command(name = "x", mut_args = go_bool)]
    struct Bools {
        /// Off unless given.
        #[arg(long = "off")]
        off: bool,
        /// On unless turned off.
        #[arg(long = "on", default_value = "true")]
        on: bool,
        /// Not a boolean.
        #[arg(long = "name", default_value = "")]
        name: String,
    }

    fn bools(args: &[&str]) -> Result<Bools, clap::Error> {
        Bools::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
    }

    #[test]
    fn booleans_take_gos_syntax() {
        let b = bools(&[]).expect("defaults");
        assert!(!b.off && b.on && b.name.is_empty());
        let b = bools(&["--off", "--on=false"]).expect("valid");
        assert!(b.off && !b.on);
        let b = bools(&["--off=T", "--on=0"]).expect("valid");
        assert!(b.off && !b.on);
        let b = bools(&["--off=False", "--on"]).expect("valid");
        assert!(!b.off && b.on);
        // A value only with `=`: `--on false` leaves `false` as a stray argument.
        assert!(bools(&["--on", "false"]).is_err());
        assert!(bools(&["--off=maybe"]).is_err());
        assert_eq!(bools(&["--name=n"]).expect("valid").name, "n");
        let help = Bools::command().render_long_help().to_string();
        assert!(help.contains("--off[=<OFF>]"), "{help}");
        assert!(help.contains("--on[=<ON>]"), "{help}");
        assert!(help.contains("[default: false]"), "{help}");
        assert!(help.contains("[default: true]"), "{help}");
        assert!(help.contains("--name <NAME>"), "{help}");
    }

    #[test]
    fn ports_and_invalid_values() {
        assert_eq!(parse_port("p", "1"), Ok(1));
        assert_eq!(parse_port("p", "65535"), Ok(65535));
        for bad in ["0", "65536", "-1", "http", ""] {
            let error = parse_port("nmi-port", bad).expect_err(bad);
            assert_eq!(
                error.to_string(),
                format!("invalid value {bad:?} for --nmi-port: want a port number 1-65535")
            );
        }
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
        assert!(cli.klog.logtostderr);
        assert!(!cli.klog.alsologtostderr);
        assert!(Cli::try_parse_from(["x", "--logtostderr=maybe"]).is_err());
    }
}
