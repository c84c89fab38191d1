//! `--enable-conntrack-deletion` (docs/upstream.md#interception): after the first rule install,
//! delete the connection-tracking entries of TCP flows to IMDS, so connections opened before the
//! DNAT existed (which conntrack keeps routing to the real IMDS) are cut and reconnect through nmi.
//!
//! Upstream does this over netlink; podid runs the `conntrack` tool from conntrack-tools:
//! `conntrack -D -p tcp --orig-dst <metadata ip> --orig-port-dst <metadata port>`. When the tool
//! is not installed nmi logs one warning and carries on (the rules still catch every new
//! connection).

use std::io;
use std::net::SocketAddrV4;
use std::process::Command;

/// The program run, looked up in `PATH`.
pub const PROGRAM: &str = "conntrack";

/// What a flush did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flushed {
    /// The tool ran; this many entries were deleted (0 when none matched).
    Deleted(u64),
    /// The tool is not installed.
    ToolMissing,
}

/// The conntrack tool failed.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    /// It could not be started (other than not being installed).
    #[error("running {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// It exited with an error.
    #[error("{program} {args} failed ({status}): {stderr}")]
    Failed {
        /// The program.
        program: String,
        /// Its arguments, space-separated.
        args: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr (trimmed).
        stderr: String,
    },
}

/// The arguments that delete every TCP flow whose original destination is `metadata`.
pub fn delete_args(metadata: SocketAddrV4) -> Vec<String> {
    vec![
        "-D".to_owned(),
        "-p".to_owned(),
        "tcp".to_owned(),
        "--orig-dst".to_owned(),
        metadata.ip().to_string(),
        "--orig-port-dst".to_owned(),
        metadata.port().to_string(),
    ]
}

/// The number in conntrack's summary line `... N flow entries have been deleted.`.
fn deleted_count(stderr: &str) -> Option<u64> {
    stderr.lines().find_map(|line| {
        let (before, _) = line.split_once(" flow entries have been deleted")?;
        before.rsplit(' ').next()?.parse().ok()
    })
}

/// Delete the flows to `metadata` with [`PROGRAM`].
///
/// # Errors
/// [`ConntrackError`] when the tool is installed but fails.
pub fn flush_imds_flows(metadata: SocketAddrV4) -> Result<Flushed, ConntrackError> {
    flush_with(PROGRAM, metadata)
}

/// [`flush_imds_flows`] with another program (tests).
///
/// # Errors
/// [`ConntrackError`] when `program` is installed but fails.
pub fn flush_with(program: &str, metadata: SocketAddrV4) -> Result<Flushed, ConntrackError> {
    let args = delete_args(metadata);
    let output = match Command::new(program).args(&args).output() {
        Ok(output) => output,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Flushed::ToolMissing),
        Err(source) => {
            return Err(ConntrackError::Spawn {
                program: program.to_owned(),
                source,
            });
        }
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    let count = deleted_count(&stderr);
    // conntrack-tools exits 1 when nothing matched; its summary line says so.
    match (output.status.success(), count) {
        (true, count) => Ok(Flushed::Deleted(count.unwrap_or(0))),
        (false, Some(0)) => Ok(Flushed::Deleted(0)),
        (false, _) => Err(ConntrackError::Failed {
            program: program.to_owned(),
            args: args.join(" "),
            status: output.status.to_string(),
            stderr: stderr.trim().to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;
    use std::path::PathBuf;

    use super::*;

    const IMDS: SocketAddrV4 = SocketAddrV4::new(std::net::Ipv4Addr::new(169, 254, 169, 254), 80);

    #[test]
    fn the_command_deletes_tcp_flows_to_the_metadata_address() {
        assert_eq!(
            delete_args(IMDS).join(" "),
            "-D -p tcp --orig-dst 169.254.169.254 --orig-port-dst 80"
        );
        let custom = SocketAddrV4::new(std::net::Ipv4Addr::new(10, 0, 0, 9), 8080);
        assert_eq!(
            delete_args(custom).join(" "),
            "-D -p tcp --orig-dst 10.0.0.9 --orig-port-dst 8080"
        );
    }

    #[test]
    fn reads_the_summary_line() {
        let out = "tcp 6 431999 ESTABLISHED src=10.0.0.2 dst=169.254.169.254 ...\n\
                   conntrack v1.4.6 (conntrack-tools): 3 flow entries have been deleted.\n";
        assert_eq!(deleted_count(out), Some(3));
        assert_eq!(
            deleted_count(
                "conntrack v1.4.8 (conntrack-tools): 0 flow entries have been deleted.\n"
            ),
            Some(0)
        );
        assert_eq!(deleted_count("conntrack: Operation not permitted\n"), None);
    }

    #[test]
    fn a_missing_tool_is_reported_not_an_error() {
        let flushed = flush_with("/nonexistent/podid-conntrack", IMDS).expect("not an error");
        assert_eq!(flushed, Flushed::ToolMissing);
    }

    /// A stand-in `conntrack`: records its arguments and answers like conntrack-tools.
    fn fake_tool(name: &str, stderr: &str, code: i32) -> (PathBuf, PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("podid-conntrack-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let args = dir.join("args");
        let script = dir.join("conntrack");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"$@\" > '{}'\necho '{stderr}' >&2\nexit {code}\n",
                args.display()
            ),
        )
        .expect("script");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        (script, args)
    }

    /// `flush_with`, retrying while another test's fork still holds the fresh script open
    /// for writing (`ETXTBSY`).
    fn flush_fake(tool: &std::path::Path) -> Result<Flushed, ConntrackError> {
        let program = tool.to_str().expect("utf-8");
        for _ in 0..100 {
            match flush_with(program, IMDS) {
                Err(ConntrackError::Spawn { source, .. })
                    if source.kind() == io::ErrorKind::ExecutableFileBusy =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => return other,
            }
        }
        flush_with(program, IMDS)
    }

    #[test]
    fn runs_the_tool_and_counts_deleted_flows() {
        let (tool, args) = fake_tool(
            "ok",
            "conntrack v1.4.6 (conntrack-tools): 2 flow entries have been deleted.",
            0,
        );
        let flushed = flush_fake(&tool).expect("ran");
        assert_eq!(flushed, Flushed::Deleted(2));
        assert_eq!(
            std::fs::read_to_string(&args).expect("args").trim(),
            "-D -p tcp --orig-dst 169.254.169.254 --orig-port-dst 80"
        );
    }

    #[test]
    fn nothing_to_delete_is_success_and_other_failures_are_errors() {
        let (tool, _) = fake_tool(
            "none",
            "conntrack v1.4.6 (conntrack-tools): 0 flow entries have been deleted.",
            1,
        );
        let flushed = flush_fake(&tool).expect("nothing matched");
        assert_eq!(flushed, Flushed::Deleted(0));
        let (tool, _) = fake_tool("denied", "conntrack: Operation not permitted", 1);
        let error = flush_fake(&tool).expect_err("failed");
        assert!(
            error.to_string().contains("Operation not permitted"),
            "{error}"
        );
    }
}
