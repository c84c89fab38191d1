//! The `nmi` binary's command line: `uninstall-interception` is a subcommand with its own help
//! and refuses bad values before it touches iptables. (Removing real rules is tested in a node's
//! network namespace by the e2e suite, tests/tests/nmi_node.rs.)

use std::process::{Command, Output};

fn nmi(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nmi"))
        .args(args)
        .env_remove("NODE_NAME")
        .output()
        .expect("nmi runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn uninstall_interception_has_its_own_help_listing_the_interception_flags() {
    let out = nmi(&["uninstall-interception", "--help"]);
    assert!(out.status.success(), "{out:?}");
    let help = text(&out.stdout);
    assert!(help.contains("Usage: nmi uninstall-interception"), "{help}");
    for flag in [
        "--nmi-listen-address",
        "--nmi-port",
        "--metadata-ip",
        "--metadata-port",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    assert!(!help.contains("--node"), "{help}");
    let top = text(&nmi(&["--help"]).stdout);
    assert!(top.contains("uninstall-interception"), "{top}");
}

#[test]
fn uninstall_interception_refuses_bad_values_before_touching_iptables() {
    for (arg, flag) in [
        ("--nmi-port=0", "--nmi-port"),
        ("--metadata-ip=::1", "--metadata-ip"),
        ("--log-format=xml", "--log-format"),
    ] {
        let out = if flag == "--log-format" {
            nmi(&[arg, "uninstall-interception"])
        } else {
            nmi(&["uninstall-interception", arg])
        };
        assert_eq!(out.status.code(), Some(2), "{arg}: {out:?}");
        let stderr = text(&out.stderr);
        assert!(stderr.contains(flag), "{arg}: {stderr}");
        assert!(!text(&out.stdout).contains("removed"), "{arg}: {out:?}");
    }
    // Serving flags after the subcommand are a usage error, not silently ignored.
    let out = nmi(&["uninstall-interception", "--node=n"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn serving_still_needs_a_node() {
    let out = nmi(&[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(text(&out.stderr).contains("--node is required"), "{out:?}");
}
