//! The stop signal of both binaries.

use tracing::{info, warn};

/// Resolves on SIGTERM or SIGINT (logged at info). If SIGTERM cannot be watched (logged), only
/// SIGINT stops.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                warn!(error = %e, "cannot watch SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT received; stopping"),
        () = terminate => info!("SIGTERM received; stopping"),
    }
}
