//! `nmi` entry point: parse and validate the flags, then run the agent, or run a subcommand.
//!
//! `nmi uninstall-interception` removes the iptables chain and jump (the rules otherwise stay
//! when nmi stops, so pods never reach the real IMDS unattributed), and, when nmi turned
//! `route_localnet` on, restores its prior value and removes nmi's CVE-2020-8558 guard.

use std::process::ExitCode;

use clap::Parser as _;
use podid_nmi::config::{Flags, LogFormat, NmiCommand, version_line};
use podid_nmi::interception::{
    CHAIN, GUARD_CHAIN, Interception, LOCALNET_CHAIN, SystemIptables, uninstall, uninstall_localnet,
};

fn main() -> ExitCode {
    let flags = match Flags::try_parse() {
        Ok(flags) => flags,
        Err(e) => return podid_runtime::flags::exit(&e),
    };
    if flags.version {
        println!("{}", version_line());
        return ExitCode::SUCCESS;
    }
    if let Some(NmiCommand::UninstallInterception) = flags.command {
        return uninstall_interception(&flags);
    }
    let config = match flags.into_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("nmi: {e}");
            return ExitCode::from(2);
        }
    };
    podid_runtime::logging::init(config.log_format, config.verbosity);
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

/// `nmi uninstall-interception`: needs only the interception addresses (no node name, no
/// cluster); a bad address or log format is refused before iptables is touched (status 2).
/// nmi's other flags may precede the subcommand and are ignored.
fn uninstall_interception(flags: &Flags) -> ExitCode {
    let interception = match flags.interception.validate() {
        Ok((_, interception)) => interception,
        Err(e) => {
            eprintln!("nmi: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(log_format) = LogFormat::parse(&flags.log_format) else {
        eprintln!(
            "nmi: invalid value {:?} for --log-format: want text or json",
            flags.log_format
        );
        return ExitCode::from(2);
    };
    podid_runtime::logging::init(log_format, flags.klog.verbosity);
    match remove(&interception) {
        Ok(restored) => {
            println!(
                "nmi: removed the {CHAIN} chain and its jump, and the {GUARD_CHAIN} chain and its jumps"
            );
            if let Some(prior) = restored {
                println!(
                    "nmi: restored net.ipv4.conf.all.route_localnet={prior} and removed the {LOCALNET_CHAIN} chain"
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nmi: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Removes the rules; the `route_localnet` value written back, if nmi had changed it.
fn remove(interception: &Interception) -> Result<Option<String>, Box<dyn std::error::Error>> {
    let iptables = SystemIptables::new()?;
    uninstall(&iptables, interception)?;
    Ok(uninstall_localnet(
        &iptables,
        std::path::Path::new("/proc/sys"),
    )?)
}
