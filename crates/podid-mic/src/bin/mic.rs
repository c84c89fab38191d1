//! `mic` entry point: parse and validate the flags and the cloud configuration, then act.

use std::process::ExitCode;

use podid_mic::config::{Flags, version_line};

fn main() -> ExitCode {
    let flags = match Flags::parse_go(std::env::args()) {
        Ok(flags) => flags,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(2);
        }
    };
    let version_requested = flags.version;
    // Upstream checks MIC_POD_NAMESPACE before honouring --version; podid answers --version
    // first so the binary can be inspected anywhere.
    if version_requested {
        println!("{}", version_line());
        return ExitCode::SUCCESS;
    }
    let config = match flags.into_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("mic: {e}");
            return ExitCode::from(2);
        }
    };
    eprintln!(
        "mic: configuration valid (namespace {}); the controller loop is not built yet",
        config.pod_namespace
    );
    ExitCode::FAILURE
}
