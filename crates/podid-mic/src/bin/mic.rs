//! `mic` entry point: parse and validate the flags and the cloud configuration, then act.

use std::process::ExitCode;

use podid_mic::cloud::{CloudConfig, Endpoints};
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
    if config.cloud_config.is_none() {
        eprintln!("mic: --cloudconfig not passed will use aadpodidentity-admin-secret");
    }
    let env = |name: &str| std::env::var(name).ok();
    let cloud = match CloudConfig::load(config.cloud_config.as_deref(), env) {
        Ok(cloud) => cloud,
        Err(e) => {
            eprintln!("mic: failed to create MIC client, error: {}", chain(&e));
            return ExitCode::from(2);
        }
    };
    if let Err(e) = cloud
        .credential()
        .and_then(|_| Endpoints::resolve(&cloud, &config.endpoints, env))
    {
        eprintln!("mic: failed to create MIC client, error: {}", chain(&e));
        return ExitCode::from(2);
    }
    eprintln!(
        "mic: configuration valid (namespace {}); the ARM identity assigner is not wired yet, \
         so the controller loop (podid_mic::run::serve) does not start",
        config.pod_namespace
    );
    ExitCode::FAILURE
}

/// The error and its causes, one after the other.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
