//! `mic` entry point: parse and validate the flags and the cloud configuration, start the
//! `/healthz` and `/metrics` servers, then run the controller with the ARM identity assigner
//! until SIGTERM/SIGINT. A lost leader lease ends the process with status 1, as upstream.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;

use podid_arm::ArmConfig;
use podid_mic::arm::ArmAssigner;
use podid_mic::cloud::{CloudConfig, Endpoints};
use podid_mic::config::{Config, Flags, user_agent, version_line};
use podid_mic::probe::{self, Endpoint, Health};
use podid_mic::run::RunError;
use podid_mic::serve::serve;
use podid_runtime::{error_chain, shutdown_signal};
use tokio::net::TcpListener;
use tracing::{error, info, warn};

fn main() -> ExitCode {
    let flags = match Flags::parse_go(std::env::args()) {
        Ok(flags) => flags,
        Err(e) => return podid_runtime::flags::exit(&e),
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
    podid_runtime::logging::init(config.log_format, config.verbosity);
    if config.cloud_config.is_none() {
        warn!("--cloudconfig not passed will use aadpodidentity-admin-secret");
    }
    let env = |name: &str| std::env::var(name).ok();
    let cloud = match CloudConfig::load(config.cloud_config.as_deref(), env) {
        Ok(cloud) => cloud,
        Err(e) => {
            error!("failed to create MIC client, error: {}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    let endpoints = match cloud
        .credential()
        .and_then(|_| Endpoints::resolve(&cloud, &config.endpoints, env))
    {
        Ok(endpoints) => endpoints,
        Err(e) => {
            error!("failed to create MIC client, error: {}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            error!(error = %e, "failed to start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config, cloud, endpoints))
}

async fn run(config: Config, cloud: CloudConfig, endpoints: Endpoints) -> ExitCode {
    let arm = ArmConfig {
        base_url: endpoints.arm.clone(),
        user_agent: user_agent(config.custom_user_agent.as_deref()),
        refusal_retries: config.update_user_msi_max_retry,
        refusal_retry_interval: config.update_user_msi_retry_interval,
        ..ArmConfig::default()
    };
    let assigner = match ArmAssigner::from_cloud_with(&cloud, &endpoints, arm) {
        Ok(assigner) => Arc::new(assigner),
        Err(e) => {
            error!("failed to create MIC client, error: {}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    if config.profile_requested {
        warn!("--enableProfile is not supported; no profiling endpoint is served");
    }
    if config.scale_features_requested {
        warn!("--enableScaleFeatures is deprecated and has no effect on MIC");
    }
    let health = Arc::new(Health::default());
    let (stop_probes, probes_stopped) = tokio::sync::watch::channel(false);
    for (port, endpoint, what) in [
        (
            config.probe_port,
            Endpoint::Health(health.clone()),
            "http probe",
        ),
        (config.prometheus_port, Endpoint::Metrics, "metrics"),
    ] {
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let listener = match TcpListener::bind(addr).await {
            Ok(listener) => listener,
            Err(e) => {
                error!(%addr, error = %e, "failed to listen for the {what} server");
                return ExitCode::FAILURE;
            }
        };
        info!(%addr, "{what} server listening");
        let mut stopped = probes_stopped.clone();
        tokio::spawn(probe::serve(listener, endpoint, async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }));
    }
    info!(
        version = env!("CARGO_PKG_VERSION"),
        namespace = %config.pod_namespace,
        "starting mic"
    );
    let result = serve(&config, &cloud, assigner, health, shutdown_signal()).await;
    let _ = stop_probes.send(true);
    match result {
        Ok(()) => {
            info!("mic stopped");
            ExitCode::SUCCESS
        }
        Err(RunError::LostLease) => {
            error!("lost leader lease");
            ExitCode::FAILURE
        }
        Err(e) => {
            error!("{}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
