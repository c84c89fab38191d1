//! The accept loop the three servers share, the bounds it enforces ([`Limits`]), what the IMDS port
//! does ([`ServerOptions`]) and the IMDS port's server ([`serve`]).

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use podid_imds::ErrorOptions;
use podid_select::matching::MatchOptions;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument as _;

use crate::config::Config;
use crate::watchdog::{self, Activity, Watched};

use super::routes::handle;
use super::{Body, NmiState};

/// Connection and request bounds.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most connections served at once.
    pub max_connections: usize,
    /// Most connections one source address holds at once (0: unbounded). A connection beyond
    /// it is closed as soon as it is accepted, before a byte is read: one pod cannot take the
    /// node's [`Limits::max_connections`] from the others.
    pub max_connections_per_source: usize,
    /// How long a connection may go without a request starting or finishing while none is in
    /// flight: bounds both slow request heads and idle keep-alive connections (closed after
    /// one to one and a half times this).
    pub header_read_timeout: Duration,
    /// Most request headers; `None` keeps hyper's own bound of 100. hyper parses into a stack
    /// buffer under its own bound, but fills a buffer of the configured size on every request
    /// when one is set (a measurable share of a cache hit), so set it only to go lower.
    pub max_headers: Option<usize>,
    /// Read buffer size, which bounds the request head (at least 8192).
    pub max_buf_size: usize,
    /// Largest request body forwarded on passthrough.
    pub max_passthrough_body: usize,
    /// Largest response body read from IMDS on passthrough.
    pub max_upstream_body: usize,
    /// Deadline of one passthrough exchange with IMDS.
    pub upstream_timeout: Duration,
    /// How long shutdown waits for requests in flight.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_connections_per_source: 64,
            header_read_timeout: Duration::from_secs(10),
            max_headers: None,
            max_buf_size: 16 * 1024,
            max_passthrough_body: 64 * 1024,
            max_upstream_body: 4 * 1024 * 1024,
            upstream_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// What the IMDS port does, derived from [`Config`].
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The real IMDS for passthrough.
    pub metadata: SocketAddr,
    /// Require `Metadata: true`.
    pub metadata_header_required: bool,
    /// 403 for `/metadata/instance*`.
    pub block_instance_metadata: bool,
    /// Serve `/host/token` (otherwise it is proxied like any other path).
    pub enable_host_token: bool,
    /// Error body style and `--set-retry-after-header`.
    pub errors: ErrorOptions,
    /// How long a request waits for its pod to appear in the index.
    pub pod_wait: Duration,
    /// How long a request waits while its identity assignment is in progress.
    pub pending_wait: Duration,
    /// Bounds.
    pub limits: Limits,
    /// `--federated-default-tenant-id` is set (Workload Identity pods whose service account
    /// names no tenant can be served).
    pub federated_default_tenant: bool,
}

impl ServerOptions {
    /// The options `config` asks for. The pending wait is upstream's poll budget
    /// (`(created + assigned attempts) × interval`), spent only while an assignment is actually
    /// in progress.
    pub fn from_config(config: &Config) -> Self {
        let polls = config
            .retry_attempts_for_created
            .saturating_add(config.retry_attempts_for_assigned);
        Self {
            metadata: SocketAddr::V4(config.metadata),
            metadata_header_required: config.metadata_header_required,
            block_instance_metadata: config.block_instance_metadata,
            enable_host_token: config.enable_host_token,
            errors: ErrorOptions {
                style: config.error_bodies,
                set_retry_after_header: config.set_retry_after_header,
                not_found_for_final_refusals: config.not_found_for_final_refusals,
            },
            pod_wait: Duration::from_millis(1200),
            pending_wait: config.find_identity_retry_interval.saturating_mul(polls),
            limits: Limits {
                max_connections_per_source: config.max_connections_per_source,
                ..Limits::default()
            },
            federated_default_tenant: config.federated_default_tenant.is_some(),
        }
    }

    /// The matcher options `config` asks for.
    pub fn match_options(config: &Config) -> MatchOptions {
        MatchOptions {
            mode: config.mode,
            force_namespaced: config.namespaced,
        }
    }
}

/// Serve the IMDS emulation on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    state: Arc<NmiState>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let limits = state.options.limits.clone();
    let refused = state
        .metrics
        .connections_refused
        .with_label_values(&["per_source"]);
    serve_with(listener, &limits, Some(refused), shutdown, move |peer| {
        let state = Arc::clone(&state);
        service_fn(move |request| {
            let state = Arc::clone(&state);
            let span = tracing::debug_span!(
                "imds",
                client_ip = %peer.ip(),
                path = %request
                    .uri()
                    .path_and_query()
                    .map_or(std::borrow::Cow::Borrowed("/"), |p| podid_imds::decoded_path(p.as_str())),
            );
            async move { Ok::<_, Infallible>(handle(&state, peer, request).await) }.instrument(span)
        })
    })
    .await;
}

/// Connections held per source address, for [`Limits::max_connections_per_source`].
#[derive(Debug, Default)]
struct PerSource(std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>);

/// One connection counted against its source; uncounted when dropped.
struct SourceSlot {
    sources: Arc<PerSource>,
    ip: IpAddr,
}

impl PerSource {
    /// Count a connection from `ip` unless it already holds `max` (0: no bound).
    fn admit(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<SourceSlot> {
        let ip = ip.to_canonical();
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = held.entry(ip).or_insert(0);
        if max > 0 && *count >= max {
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            sources: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut held = self.sources.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = held.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

/// The accept loop shared by the three servers. A connection from a source already holding
/// [`Limits::max_connections_per_source`] is closed at once and counted in `refused`.
pub(super) async fn serve_with<M, S>(
    listener: TcpListener,
    limits: &Limits,
    refused: Option<prometheus::IntCounter>,
    shutdown: impl Future<Output = ()> + Send,
    make_service: M,
) where
    M: Fn(SocketAddr) -> S,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    // No hyper timer: its header-read timeout arms a timer per request; the watchdog below
    // bounds idle and stalled connections per connection instead.
    let mut builder = http1::Builder::new();
    builder
        .max_buf_size(limits.max_buf_size.max(8192))
        .keep_alive(true);
    if let Some(max_headers) = limits.max_headers {
        builder.max_headers(max_headers);
    }
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let sources = Arc::new(PerSource::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        let Some(slot) = sources.admit(peer.ip(), limits.max_connections_per_source) else {
            // Closed before a byte is read; the client sees the connection end and retries.
            drop(stream);
            if let Some(refused) = &refused {
                refused.inc();
            }
            tracing::debug!(%peer, "closing a connection: its source holds too many");
            continue;
        };
        let activity = Arc::new(Activity::default());
        let service = Watched::new(make_service(peer), Arc::clone(&activity));
        let builder = builder.clone();
        let mut stop = stop_rx.clone();
        let header_read_timeout = limits.header_read_timeout;
        connections.spawn(async move {
            let _permit = permit;
            let _slot = slot;
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let stopping = async move {
                let _ = stop.wait_for(|stop| *stop).await;
            };
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = stopping => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
                () = watchdog::stalled(&activity, header_read_timeout) => {
                    tracing::debug!(%peer, "closing an idle or stalled connection");
                    return;
                }
            };
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            remaining = connections.len(),
            "shutdown grace elapsed, dropping connections"
        );
        connections.abort_all();
    }
}
