//! `nmi` entry point: parse and validate the flags, then act.
//!
//! `nmi uninstall-interception` removes the iptables chain and jump (the rules otherwise stay
//! when nmi stops, so pods never reach the real IMDS unattributed).

use std::process::ExitCode;

use clap::Parser as _;
use podid_nmi::config::{Flags, version_line};
use podid_nmi::interception::{Interception, SystemIptables, uninstall};

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().collect();
    let uninstall_requested = args.get(1).is_some_and(|a| a == "uninstall-interception");
    if uninstall_requested {
        args.remove(1);
    }
    let flags = match Flags::try_parse_from(&args) {
        Ok(flags) => flags,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(2);
        }
    };
    if flags.version {
        println!("{}", version_line());
        return ExitCode::SUCCESS;
    }
    // Uninstalling needs only the addresses, not a node name.
    let flags = if uninstall_requested && flags.node.is_empty() {
        Flags {
            node: "uninstall".into(),
            ..flags
        }
    } else {
        flags
    };
    let config = match flags.into_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("nmi: {e}");
            return ExitCode::from(2);
        }
    };
    let interception = Interception {
        metadata: config.metadata,
        target: config.dnat_target,
    };
    if uninstall_requested {
        let result = SystemIptables::new().and_then(|ipt| uninstall(&ipt, &interception));
        return match result {
            Ok(()) => {
                println!(
                    "nmi: removed the {} chain and its jump",
                    podid_nmi::interception::CHAIN
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("nmi: {e}");
                ExitCode::FAILURE
            }
        };
    }
    eprintln!(
        "nmi: configuration valid for node {}; the serving loop is not built yet (issue 3)",
        config.node_name
    );
    ExitCode::FAILURE
}
