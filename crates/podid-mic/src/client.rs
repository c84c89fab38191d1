//! mic's Kubernetes client: built from `--kubeconfig` or the in-cluster configuration, limited
//! to `--clientQps` (the token bucket of [`crate::throttle`]) and to 100 requests in flight at
//! once.

use kube::Client;

use crate::run::RunError;

/// The client-side request rate of mic's Kubernetes client (`--clientQps`; upstream's burst is
/// `int(--clientQps)`). See [`crate::throttle`] for what is limited and what is exempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ClientRate {
    /// Requests per second once the burst is spent.
    pub(crate) qps: f64,
    /// Requests that may go at once.
    pub(crate) burst: u32,
}

impl ClientRate {
    /// The rate of the validated flags.
    pub(crate) fn of(config: &crate::config::Config) -> Self {
        Self {
            qps: config.client_qps,
            burst: config.client_burst,
        }
    }
}

/// The Kubernetes client from `--kubeconfig`, or the in-cluster configuration without it; no
/// client-side rate limit: leader election's own client, and tests. The loop's client is
/// limited to `--clientQps` (see [`crate::serve::serve`]).
pub async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<Client, RunError> {
    kube_client_with_rate(kubeconfig, None).await
}

/// The most Kubernetes requests mic's loop has in flight at once (the leader election has a
/// client of its own).
const MAX_IN_FLIGHT: usize = 100;

/// [`kube_client`] whose requests (Leases excepted) take a token of a bucket of `rate`
/// ([`crate::throttle`]); `None`: unlimited.
pub(crate) async fn kube_client_with_rate(
    kubeconfig: Option<&std::path::Path>,
    rate: Option<ClientRate>,
) -> Result<Client, RunError> {
    let config = match kubeconfig {
        Some(path) => {
            let fail = |source: Box<dyn std::error::Error + Send + Sync>| RunError::Kubeconfig {
                path: path.to_owned(),
                source,
            };
            let file = kube::config::Kubeconfig::read_from(path).map_err(|e| fail(e.into()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| fail(e.into()))?
        }
        None => kube::Config::incluster().map_err(RunError::InCluster)?,
    };
    let Some(rate) = rate else {
        return Client::try_from(config).map_err(RunError::Client);
    };
    let bucket = std::sync::Arc::new(crate::throttle::TokenBucket::new(rate.qps, rate.burst));
    // The throttle delays a request inside its response future, so the service behind it must
    // be cloneable: kube's stack goes behind a buffer first. At most MAX_IN_FLIGHT requests
    // are sent at once (a watch counts until its response starts): every VM/VMSS job writing
    // `--createDeleteBatch` at a time would otherwise open thousands of connections on a
    // 50-scale-set cluster and swamp the API server.
    Ok(kube::client::ClientBuilder::try_from(config)
        .map_err(RunError::Client)?
        .with_layer(&tower::buffer::BufferLayer::<
            http::Request<kube::client::Body>,
        >::new(1024))
        .with_layer(&tower::limit::ConcurrencyLimitLayer::new(MAX_IN_FLIGHT))
        .with_layer(&crate::throttle::ThrottleLayer::new(bucket))
        .build())
}
