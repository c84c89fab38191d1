//! `azure-sim`: the Azure simulator as a process (Entra, ARM and optionally one IMDS).

use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = podid_azure_sim::cli::Config::from_args(podid_azure_sim::cli::Args::parse())?;
    podid_azure_sim::cli::run(config, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}
