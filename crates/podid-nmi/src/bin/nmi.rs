//! `nmi` entry point: parse and validate the flags, then run the agent.
//!
//! `nmi uninstall-interception` removes the iptables chain and jump (the rules otherwise stay
//! when nmi stops, so pods never reach the real IMDS unattributed), and, when nmi turned
//! `route_localnet` on, restores its prior value and removes nmi's CVE-2020-8558 guard.

use std::process::ExitCode;

use clap::Parser as _;
use podid_nmi::config::{Flags, version_line};
use podid_nmi::interception::{Interception, SystemIptables, uninstall, uninstall_localnet};

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
            // `--help` is not an error (clap's code 0); bad flags are 2.
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
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
    podid_runtime::logging::init(config.log_format, config.verbosity);
    if uninstall_requested {
        let interception = Interception {
            metadata: config.metadata,
            target: config.dnat_target,
        };
        let result = (|| -> Result<Option<String>, Box<dyn std::error::Error>> {
            let iptables = SystemIptables::new()?;
            uninstall(&iptables, &interception)?;
            Ok(uninstall_localnet(
                &iptables,
                std::path::Path::new("/proc/sys"),
            )?)
        })();
        return match result {
            Ok(restored) => {
                println!(
                    "nmi: removed the {} chain and its jump, and the {} chain and its jumps",
                    podid_nmi::interception::CHAIN,
                    podid_nmi::interception::GUARD_CHAIN
                );
                if let Some(prior) = restored {
                    println!(
                        "nmi: restored net.ipv4.conf.all.route_localnet={prior} and removed the {} chain",
                        podid_nmi::interception::LOCALNET_CHAIN
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("nmi: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("nmi: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(podid_nmi::agent::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("nmi: {e:#}");
            ExitCode::FAILURE
        }
    }
}
