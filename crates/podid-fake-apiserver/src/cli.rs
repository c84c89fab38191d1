//! Command-line arguments and the run loop of the `fake-apiserver` binary.

use crate::{Error, FakeApiServer};
use std::net::SocketAddr;
use std::path::PathBuf;

/// `fake-apiserver` flags.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "fake-apiserver",
    about = "A fake Kubernetes API server for tests"
)]
pub struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Write a kubeconfig pointing at the server to this path.
    #[arg(long = "kubeconfig-out")]
    pub kubeconfig_out: Option<PathBuf>,
    /// Changes kept for watches to resume from.
    #[arg(long, default_value_t = crate::DEFAULT_HISTORY)]
    pub history: usize,
    /// Serve HTTPS with a self-signed certificate (kubectl sends credentials only over TLS).
    #[arg(long)]
    pub tls: bool,
}

/// Starts the server, writes the kubeconfig, prints the URL on stdout, and serves until
/// `shutdown` resolves.
pub async fn run(args: Args, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let server = FakeApiServer::builder()
        .listen(args.listen)
        .history(args.history)
        .tls(args.tls)
        .start()
        .await?;
    if let Some(path) = &args.kubeconfig_out {
        server.write_kubeconfig(path)?;
    }
    println!("{}", server.url());
    shutdown.await;
    server.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[test]
    fn flags_parse_and_bad_addresses_fail() {
        let a = Args::try_parse_from([
            "fake-apiserver",
            "--listen",
            "127.0.0.1:6443",
            "--kubeconfig-out",
            "/tmp/k",
        ])
        .expect("parses");
        assert_eq!(a.listen.port(), 6443);
        assert_eq!(
            a.kubeconfig_out.as_deref(),
            Some(std::path::Path::new("/tmp/k"))
        );
        assert!(Args::try_parse_from(["fake-apiserver", "--listen", "nope"]).is_err());
    }
}
