//! The whole controller as the `mic` binary runs it: the Kubernetes clients, leader election,
//! the one-time type upgrade on becoming leader ([`crate::upgrade`]), then the loop
//! ([`crate::run::run`]) for as long as the lease is held.

use std::future::Future;
use std::sync::Arc;

use tracing::warn;

use crate::assigner::IdentityAssigner;
use crate::client::{ClientRate, kube_client, kube_client_with_rate};
use crate::run::{RunError, Settings, run};

/// The whole controller: Kubernetes client from `--kubeconfig` (or in-cluster) limited to
/// `--clientQps` (Lease requests exempt, see [`crate::throttle`]), leader election on the
/// Lease, then [`run`] while the lease is held. Returns `Ok` after `shutdown` (a pass in flight
/// finishes first; the lease is then released for a fast hand-over) and
/// [`RunError::LostLease`] as soon as the lease is lost (the pass in flight is cancelled), on
/// which upstream exits with status 1. `health` turns active while the loop runs.
pub async fn serve(
    config: &crate::config::Config,
    cloud: &crate::cloud::CloudConfig,
    assigner: Arc<dyn IdentityAssigner>,
    health: Arc<crate::probe::Health>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    crate::metrics::leader_election();
    let client =
        kube_client_with_rate(config.kubeconfig.as_deref(), Some(ClientRate::of(config))).await?;
    // The leader election has a client of its own (its own connections, no rate limit): its
    // renewals never queue behind the loop's requests.
    let mut elector = crate::leader::Elector::new(
        kube_client(config.kubeconfig.as_deref()).await?,
        crate::leader::LeaderSettings::new(config),
    );
    tokio::pin!(shutdown);
    tokio::select! {
        () = elector.acquire() => {}
        () = &mut shutdown => return Ok(()),
    }
    // Upstream runs the type upgrade first thing as leader; the lease is renewed meanwhile.
    let upgrade = config
        .type_upgrade
        .then(|| crate::upgrade::UpgradeSettings {
            namespace: config.pod_namespace.clone(),
            config_map: config.config_map_name.clone(),
            key: config.type_upgrade_status_key.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        });
    let mut settings = Settings::new(config, cloud);
    settings.health = health;
    let stopped = async {
        if let Some(upgrade) = &upgrade {
            crate::upgrade::run(&client, upgrade)
                .await
                .map_err(RunError::TypeUpgrade)?;
        }
        run(client.clone(), settings, assigner, &mut shutdown).await
    };
    // Renewals run on their own task: a pass busy with a large cluster (or a cache relisting
    // one) never delays them past the renew deadline.
    let mut holder = crate::leader::Holder::spawn(elector);
    tokio::select! {
        r = stopped => r?,
        // Dropping the loop's future cancels the pass in flight with its API and ARM requests
        // (and turns /healthz Not Active): another replica may lead from now on, so not one
        // more write. Upstream exits here.
        () = holder.lost() => return Err(RunError::LostLease),
    }
    let Some(mut elector) = holder.stop().await else {
        return Err(RunError::LostLease);
    };
    if let Err(e) = elector.release().await {
        warn!(error = %e, "failed to release the leader lease");
    }
    Ok(())
}
