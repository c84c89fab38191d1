//! Running `ip`, `iptables` and friends, with their stderr turned into errors.

use std::process::Command;

use crate::{Error, Result};

/// Renders a command line for error messages (no secrets ever pass through here: the
/// arguments are interface names, addresses and iptables rules).
pub(crate) fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Runs `cmd` to completion; a non-zero exit becomes [`Error::Command`] carrying stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    let output = cmd.output().map_err(|source| Error::Spawn {
        command: describe(cmd),
        source,
    })?;
    if !output.status.success() {
        return Err(Error::Command {
            command: describe(cmd),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `ip <args>` in the caller's namespace.
pub(crate) fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// `ip -n <netns> <args>`.
pub(crate) fn ip_in(netns: &str, args: &[&str]) -> Result<String> {
    run(Command::new("ip").arg("-n").arg(netns).args(args))
}

/// A `Command` that runs `program` inside `netns` through `ip netns exec`.
pub(crate) fn exec_in(netns: &str, program: &std::ffi::OsStr) -> Command {
    let mut cmd = Command::new("ip");
    cmd.arg("netns").arg("exec").arg(netns).arg(program);
    cmd
}
