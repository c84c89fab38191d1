//! The HTTP servers: the IMDS emulation (docs/upstream.md, routing to status codes), the probe port
//! (docs/upstream.md#nmi-probes-and-metrics, plus `/readyz`) and the metrics port.
//!
//! Every status code and body of the IMDS port comes from `podid-imds`; this module only decides
//! which one. The state a request reads — the pod index and the current [`MatchIndex`] — is read
//! under short locks that are never held across an await.
//!
//! Bounds (docs/security.md): at most [`Limits::max_connections`] connections (further connections
//! wait in the listen backlog) and at most [`Limits::max_connections_per_source`] from one address
//! (further ones from it are closed at once), request headers limited in size and count (hyper
//! answers 431), a deadline for reading request headers (slow clients and idle keep-alive
//! connections are closed), request bodies ignored on the token routes and limited on passthrough,
//! upstream timeouts on passthrough. Shutdown stops accepting, lets requests in flight finish
//! within [`Limits::shutdown_grace`], then drops the rest.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use podid_api::AzureIdentity;
use podid_controller::broker::{BrokerError, Credential, Tokens};
use podid_imds::{
    ErrorOptions, HostTokenResponse, IdentitySelector, ImdsError, Route, TokenResponse,
    WireResponse, check_metadata_header, classify, parse_token_query, pod_headers,
    token_list_response,
};
use podid_select::federated::FederatedCredential;
use podid_select::matching::{CallerPod, MatchIndex, MatchOptions, NoMatch, NodeIdentity};
use podid_select::workload::{Refusal as WorkloadRefusal, WorkloadAccounts, WorkloadGrant};
use podid_select::{Refusal, Selection, Snapshot, Source};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument as _;

use crate::config::Config;
use crate::events::{EventSink, PodEvent, PodEventReason};
pub use crate::health::Health;
use crate::metrics::{Metrics, imds_operation, resource_label};
use crate::pods::{LookupError, PodIndex, WatchState};
use crate::provider::{TokenProvider, TokenRequest, TokenTarget};
use crate::watchdog::{self, Activity, Watched};
use crate::workload::ServiceAccounts;
use podid_select::assigned::AssignedBindings;

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

/// The current [`MatchIndex`], swapped whole when a watched object changes.
#[derive(Debug)]
pub struct Matcher {
    current: RwLock<Arc<MatchIndex>>,
    assigned: RwLock<Arc<AssignedBindings>>,
    changed: watch::Sender<u64>,
    synced: AtomicBool,
}

impl Matcher {
    /// An empty index with `options`, not synced.
    pub fn new(options: MatchOptions) -> Self {
        Self {
            current: RwLock::new(Arc::new(MatchIndex::new(options, [], [], [], []))),
            assigned: RwLock::new(Arc::new(AssignedBindings::default())),
            changed: watch::Sender::new(0),
            synced: AtomicBool::new(false),
        }
    }

    /// The index requests read now.
    pub fn current(&self) -> Arc<MatchIndex> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Replace the index and wake requests waiting on a pending assignment.
    pub fn replace(&self, index: MatchIndex) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(index);
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Replace the index together with the binding copies of the node's assignments (which
    /// decide the federated switch in standard mode, see [`podid_select::assigned`]).
    pub fn replace_with_assigned(&self, index: MatchIndex, assigned: AssignedBindings) {
        *self.assigned.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(assigned);
        self.replace(index);
    }

    /// The binding copies recorded in the node's assignments, swapped with the index.
    pub fn assigned(&self) -> Arc<AssignedBindings> {
        Arc::clone(&self.assigned.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Mark the index as built from fully synced caches.
    pub fn mark_synced(&self) {
        self.synced.store(true, Ordering::Release);
    }

    /// Whether [`Matcher::mark_synced`] was called.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Requests currently waiting for the index to change (pending assignments).
    pub fn waiting(&self) -> usize {
        self.changed.receiver_count()
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// Everything the servers read.
#[derive(Debug)]
pub struct NmiState {
    /// Options.
    pub options: ServerOptions,
    /// IP → pod.
    pub pods: Arc<PodIndex>,
    /// Identity matching.
    pub matcher: Arc<Matcher>,
    /// Token source.
    pub tokens: Arc<dyn TokenProvider>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Health flags.
    pub health: Arc<Health>,
    /// Where Kubernetes Events about failing pods go (none: no events).
    pub events: Option<Arc<EventSink>>,
    /// `--serve-workload-identity-pods`: the service accounts naming Workload Identity client
    /// ids (none: such pods are not served through IMDS).
    pub workload: Option<Arc<ServiceAccounts>>,
    proxy: Client<HttpConnector, Full<Bytes>>,
}

impl NmiState {
    /// Assemble the state; follows the provider's broker counters in `metrics`.
    pub fn new(
        options: ServerOptions,
        pods: Arc<PodIndex>,
        matcher: Arc<Matcher>,
        tokens: Arc<dyn TokenProvider>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Self {
        if let Some(stats) = tokens.stats() {
            metrics.follow_broker(stats);
        }
        metrics.follow_pod_watch(Arc::clone(&pods));
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(options.limits.upstream_timeout));
        let proxy = Client::builder(TokioExecutor::new()).build(connector);
        Self {
            options,
            pods,
            matcher,
            tokens,
            metrics,
            health,
            events: None,
            workload: None,
            proxy,
        }
    }

    /// Report failures the pod's owner can fix as Kubernetes Events through `sink`.
    #[must_use]
    pub fn with_events(mut self, sink: Arc<EventSink>) -> Self {
        self.events = Some(sink);
        self
    }

    /// Serve Workload Identity pods through IMDS with the service accounts in `accounts`
    /// (`--serve-workload-identity-pods`, [`crate::workload`]).
    #[must_use]
    pub fn with_workload_identity(mut self, accounts: Arc<ServiceAccounts>) -> Self {
        self.workload = Some(accounts);
        self
    }

    /// Ready: pods, matching (and, with `--serve-workload-identity-pods`, service account)
    /// caches synced, the interception installed and nothing blocking it
    /// ([`crate::health::Blocker`]).
    pub fn is_ready(&self) -> bool {
        self.caches_synced() && self.health.interception_installed() && !self.health.any_blocked()
    }

    /// The pod, matching and (with `--serve-workload-identity-pods`) service account caches
    /// have their first complete listing.
    pub fn caches_synced(&self) -> bool {
        self.pods.is_synced()
            && self.matcher.is_synced()
            && self.workload.as_ref().is_none_or(|a| a.is_synced())
    }

    /// Why nmi is not ready, one line per reason (empty when ready): the `/readyz` body.
    pub fn not_ready_reasons(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if !self.health.interception_installed() {
            reasons.push("interception: the aad-metadata chain is not installed".to_owned());
        }
        for (blocker, reason) in self.health.blocked() {
            reasons.push(format!("{}: {reason}", blocker.label()));
        }
        if !self.caches_synced() {
            reasons.push("caches: not yet synced from the API server".to_owned());
        }
        reasons
    }
}

type Body = Full<Bytes>;

fn to_response(wire: WireResponse) -> Response<Body> {
    let (status, headers, body) = wire.into_parts();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

fn error_response(error: &ImdsError, options: ErrorOptions) -> Response<Body> {
    to_response(error.response(options))
}

fn plain(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
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

/// `/readyz`: 200 `ok` only when ready, else 503 `not ready` and one line per reason; the last
/// line gives the pod watch's state (`pod watch: streaming`, or `pod watch: blind for <n>s` while it fails). A
/// blind watch does not make nmi unready: known pods keep being served (docs/security.md,
/// "Pod watch failure policy").
fn readyz(state: &NmiState) -> Response<Body> {
    let (status, first) = if state.is_ready() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    };
    let watch = match state.pods.watch_state() {
        WatchState::NotSynced => "pod watch: not synced".to_owned(),
        WatchState::Streaming => "pod watch: streaming".to_owned(),
        WatchState::Blind { since } => format!(
            "pod watch: blind for {}s",
            std::time::Instant::now()
                .saturating_duration_since(since)
                .as_secs()
        ),
    };
    // One line per reason, so a probe failure in `kubectl describe` says why.
    let mut body = format!("{first}\n");
    for reason in state.not_ready_reasons() {
        body.push_str(&reason);
        body.push('\n');
    }
    body.push_str(&watch);
    body.push('\n');
    let mut response = plain(status, "");
    *response.body_mut() = Full::new(Bytes::from(body));
    response
}

/// Serve `/healthz` (`Active` / `Not Active`, always 200, no newline) and `/readyz` (200 only
/// when ready, else 503 with `not ready` and one line per reason; then the pod watch's state,
/// see [`readyz`]) on `listener` until `shutdown` completes.
pub async fn serve_probes(
    listener: TcpListener,
    state: Arc<NmiState>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let limits = state.options.limits.clone();
    serve_with(listener, &limits, None, shutdown, move |_| {
        let state = Arc::clone(&state);
        service_fn(move |request: Request<Incoming>| {
            let state = Arc::clone(&state);
            async move {
                Ok::<_, Infallible>(match request.uri().path() {
                    "/healthz" if state.health.interception_installed() => {
                        plain(StatusCode::OK, "Active")
                    }
                    "/healthz" => plain(StatusCode::OK, "Not Active"),
                    "/readyz" => readyz(&state),
                    _ => plain(StatusCode::NOT_FOUND, "404 page not found\n"),
                })
            }
        })
    })
    .await;
}

/// Serve `/metrics` on `listener` until `shutdown` completes.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) {
    serve_with(listener, &limits, None, shutdown, move |_| {
        let metrics = Arc::clone(&metrics);
        service_fn(move |request: Request<Incoming>| {
            let metrics = Arc::clone(&metrics);
            async move {
                Ok::<_, Infallible>(if request.uri().path() == "/metrics" {
                    let mut response = Response::new(Full::new(Bytes::from(metrics.encode())));
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; version=0.0.4"),
                    );
                    response
                } else {
                    plain(StatusCode::NOT_FOUND, "404 page not found\n")
                })
            }
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
async fn serve_with<M, S>(
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

async fn handle(state: &NmiState, peer: SocketAddr, request: Request<Incoming>) -> Response<Body> {
    let options = state.options.errors;
    // The token routes borrow their query from the request (no copy per request); only
    // passthrough consumes it.
    let target = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let route = classify(request.method(), target);
    if let Some(response) = route.immediate_response(options) {
        return to_response(response);
    }
    match route {
        Route::Token { query } => {
            let timed = Timed::start(state, "token");
            to_response(token_route(state, timed, peer.ip(), request.headers(), query).await)
        }
        Route::HostToken { query } if state.options.enable_host_token => {
            let timed = Timed::start(state, "host_token");
            let answer = Box::pin(host_token_route(
                state,
                timed,
                peer.ip(),
                request.headers(),
                query,
            ));
            to_response(answer.await)
        }
        Route::InstanceMetadata if state.options.block_instance_metadata => {
            error_response(&ImdsError::InstanceMetadataBlocked, options)
        }
        // Boxed: the proxy's state is large, and every token request would carry (and copy)
        // it inline.
        _ => Box::pin(passthrough(state, request)).await,
    }
}

/// A token route's request, timed for `aadpodidentity_nmi_operations_duration_seconds`: each
/// answer is recorded with the labels it earned (borrowed, no per-request label strings).
#[derive(Clone, Copy)]
struct Timed<'s> {
    state: &'s NmiState,
    route: &'static str,
    started: Instant,
}

impl<'s> Timed<'s> {
    fn start(state: &'s NmiState, route: &'static str) -> Self {
        Self {
            state,
            route,
            started: Instant::now(),
        }
    }

    /// Record `response` (labels `namespace` and `resource`, empty when unknown) and return it.
    fn done(self, response: WireResponse, namespace: &str, resource: &str) -> WireResponse {
        self.state
            .metrics
            .nmi_operations_duration
            .with_label_values(&[
                self.route,
                response.status.as_str(),
                namespace,
                resource_label(resource),
            ])
            .observe(self.started.elapsed().as_secs_f64());
        response
    }

    /// Record and return the answer for `error`.
    fn error(self, error: &ImdsError, options: ErrorOptions, namespace: &str) -> WireResponse {
        self.done(error.response(options), namespace, "")
    }

    /// Record and return the answer for a refused grant ([`denied_response`]).
    fn denied(self, denied: &Denied, options: ErrorOptions, namespace: &str) -> WireResponse {
        self.done(denied_response(denied, options), namespace, "")
    }
}

/// The answer for a refused grant, with its `Retry-After` when it has one.
fn denied_response(denied: &Denied, options: ErrorOptions) -> WireResponse {
    let mut response = denied.error.response(options);
    if let Some(seconds) = denied.retry_after {
        response
            .headers
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// Why [`grant`] gave no token: the IMDS error, and how long the caller should wait before
/// asking again when waiting helps.
#[derive(Debug)]
struct Denied {
    error: ImdsError,
    /// Seconds for `Retry-After` (503 answers only).
    retry_after: Option<u64>,
    /// The Kubernetes Event the pod gets, when its owner can fix the failure.
    event: Option<PodEventReason>,
}

impl From<ImdsError> for Denied {
    fn from(error: ImdsError) -> Self {
        Self {
            error,
            retry_after: None,
            event: None,
        }
    }
}

impl Denied {
    fn with_event(mut self, reason: PodEventReason) -> Self {
        self.event = Some(reason);
        self
    }
}

/// Queue the Event `denied` asks for on `pod` (never waits; rate-limited and bounded by the sink).
fn report_event(state: &NmiState, pod: &CallerPod, denied: &Denied) {
    let (Some(sink), Some(reason)) = (&state.events, denied.event) else {
        return;
    };
    sink.report(PodEvent {
        namespace: pod.namespace.clone(),
        pod: pod.name.clone(),
        uid: pod_uid(state, pod),
        reason,
        note: denied.error.to_string(),
    });
}

/// The pod's uid, for the Event's reference (`kubectl describe pod` matches on it).
fn pod_uid(state: &NmiState, pod: &CallerPod) -> Option<String> {
    state
        .pods
        .uid(&pod.namespace, &pod.name)
        .filter(|uid| !uid.is_empty())
}

/// `Retry-After` sent while nmi's own state is not ready (caches syncing): a short, honest wait.
const NOT_READY_RETRY_AFTER: u64 = 1;

/// Longest `Retry-After` passed on from upstream (IMDS or Entra said to wait).
const MAX_UPSTREAM_RETRY_AFTER: u64 = 60;

/// Tokens for a request after attribution: match, wait while pending, fetch.
struct Granted {
    tokens: Tokens,
    client_id: ClientId,
    cache_hit: Option<bool>,
    exception: bool,
    /// Served as a Workload Identity pod ([`crate::workload`]).
    workload_identity: bool,
    /// An identity switched to federated tokens.
    federated: bool,
}

impl Granted {
    /// `identity_type` of `podid_nmi_tokens_issued_total`: how the token was obtained.
    fn source_label(&self) -> &'static str {
        if self.exception {
            return "node_identity";
        }
        if self.workload_identity {
            return "workload_identity";
        }
        if self.federated {
            return "federated";
        }
        match &self.client_id {
            ClientId::Identity(identity) => match identity.identity_type() {
                podid_api::IdentityType::UserAssignedMsi => "user_assigned_msi",
                podid_api::IdentityType::ServicePrincipal => "service_principal",
                podid_api::IdentityType::ServicePrincipalCertificate => {
                    "service_principal_certificate"
                }
                _ => "other",
            },
            _ => "other",
        }
    }
}

/// The `client_id` a grant answers with: the matched identity's (read from it, not copied per
/// request), another one, or none.
enum ClientId {
    None,
    Identity(Arc<AzureIdentity>),
    Other(String),
}

impl ClientId {
    fn as_deref(&self) -> Option<&str> {
        match self {
            Self::None => None,
            Self::Identity(identity) => identity.spec.client_id.as_deref(),
            Self::Other(id) => Some(id),
        }
    }
}

async fn token_route(
    state: &NmiState,
    timed: Timed<'_>,
    ip: IpAddr,
    headers: &HeaderMap,
    query: &str,
) -> WireResponse {
    let options = state.options.errors;
    if state.options.metadata_header_required
        && let Err(error) = check_metadata_header(headers)
    {
        return timed.error(&error, options, "");
    }
    let query = match parse_token_query(query) {
        Ok(query) => query,
        Err(error) => return timed.error(&error, options, ""),
    };
    // A pod not indexed yet, or an address its old pod may have just released to a new one,
    // is waited for (boxed: the wait's timer would make every request's future larger).
    let pod = match state.pods.lookup(ip) {
        Err(LookupError::NotFound { .. } | LookupError::Reassigning { .. }) => {
            Box::pin(state.pods.wait_for(ip, state.options.pod_wait)).await
        }
        found => found,
    };
    let pod = match pod {
        Ok(pod) => pod,
        Err(error) => {
            record_attribution_failure(&state.metrics, error);
            tracing::info!(client_ip = %ip, %error, "token request from an unattributed address");
            return timed.error(&error.to_imds_error(), options, "");
        }
    };
    match grant(state, &pod, &query.selector, &query.resource).await {
        Ok(granted) => {
            let now = SystemTime::now();
            let client_id = granted.client_id.as_deref();
            let response = match &*granted.tokens {
                // The usual case, without collecting the one answer into a Vec.
                [token] => token.response(client_id, now).response(),
                tokens => {
                    let responses: Vec<TokenResponse<'_>> =
                        tokens.iter().map(|t| t.response(client_id, now)).collect();
                    token_list_response(&responses)
                }
            };
            audit(&state.metrics, &pod, &granted, &query.resource, "token");
            timed.done(response, &pod.namespace, &query.resource)
        }
        Err(denied) => {
            report_event(state, &pod, &denied);
            timed.denied(&denied, options, &pod.namespace)
        }
    }
}

async fn host_token_route(
    state: &NmiState,
    timed: Timed<'_>,
    ip: IpAddr,
    headers: &HeaderMap,
    query: &str,
) -> WireResponse {
    // Upstream answers /host/token errors without the Retry-After variant.
    let options = ErrorOptions {
        set_retry_after_header: false,
        ..state.options.errors
    };
    let pod_ref = match pod_headers(headers) {
        Ok(pod_ref) => pod_ref,
        Err(error) => return timed.error(&error, options, ""),
    };
    if ip.to_canonical() != IpAddr::V4(Ipv4Addr::LOCALHOST) {
        return timed.error(&ImdsError::NotFromHost, options, "");
    }
    let query = match parse_token_query(query) {
        Ok(query) => query,
        Err(error) => return timed.error(&error, options, ""),
    };
    let Some(pod) = state.pods.get(pod_ref.namespace, pod_ref.name) else {
        let error = ImdsError::NoIdentityForPod {
            namespace: pod_ref.namespace.to_owned(),
            pod: pod_ref.name.to_owned(),
        };
        return timed.error(&error, options, pod_ref.namespace);
    };
    match grant(state, &pod, &query.selector, &query.resource).await {
        Ok(granted) => {
            let Some(first) = granted.tokens.first() else {
                let error = ImdsError::TokenUnavailable {
                    detail: "the token source returned no token".to_owned(),
                };
                return timed.error(&error, options, &pod.namespace);
            };
            let client_id = granted.client_id.as_deref().unwrap_or("");
            let body = HostTokenResponse {
                token: first.response(None, SystemTime::now()),
                client_id,
            };
            audit(
                &state.metrics,
                &pod,
                &granted,
                &query.resource,
                "host_token",
            );
            timed.done(body.response(), &pod.namespace, &query.resource)
        }
        Err(denied) => {
            report_event(state, &pod, &denied);
            timed.denied(&denied, options, &pod.namespace)
        }
    }
}

fn record_attribution_failure(metrics: &Metrics, error: LookupError) {
    metrics
        .kubernetes_api_errors
        .with_label_values(&["get_pod_list"])
        .inc();
    metrics
        .attribution_failures
        .with_label_values(&[error.reason()])
        .inc();
}

/// One structured audit line per issued token; never the token itself.
fn audit(metrics: &Metrics, pod: &CallerPod, granted: &Granted, resource: &str, route: &str) {
    let cache = match granted.cache_hit {
        Some(true) => "hit",
        Some(false) => "miss",
        None => "unknown",
    };
    metrics.token_issued(granted.source_label(), cache);
    tracing::info!(
        target: "podid::audit",
        route,
        pod = %pod.name,
        namespace = %pod.namespace,
        service_account = %pod.service_account,
        client_id = granted.client_id.as_deref().unwrap_or(""),
        exception = granted.exception,
        workload_identity = granted.workload_identity,
        resource,
        cache,
        "token issued"
    );
}

/// The selection for `pod` now ([`podid_select::select`] over the state the watches filled):
/// one decision, read under short locks that are released before anything is awaited.
fn select_now(state: &NmiState, pod: &CallerPod, selector: &IdentitySelector<'_>) -> Selection {
    select_with(
        &state.matcher,
        state.workload.as_deref(),
        state.options.federated_default_tenant,
        pod,
        selector,
    )
}

/// [`select_now`] over its parts: the matcher, the service accounts (with
/// `--serve-workload-identity-pods`) and whether a default tenant is set.
fn select_with(
    matcher: &Matcher,
    workload: Option<&ServiceAccounts>,
    federated_default_tenant: bool,
    pod: &CallerPod,
    selector: &IdentitySelector<'_>,
) -> Selection {
    let index = matcher.current();
    let assigned = matcher.assigned();
    let snapshot = Snapshot {
        index: &index,
        assigned: &assigned,
        workload: workload.map(|accounts| accounts as &dyn WorkloadAccounts),
        federated_default_tenant,
    };
    podid_select::select(&snapshot, pod, selector)
}

/// The answer for a refusal: its IMDS error, `Retry-After` when waiting helps, and the Event
/// the pod gets when its owner can fix it. The one place a selection refusal becomes an answer.
fn refusal_denied(pod: &CallerPod, refusal: &Refusal) -> Denied {
    let denied = Denied::from(refusal.to_imds_error(pod));
    match refusal {
        // A pod without the label asks IMDS on its own (SDK probes): nothing to fix.
        Refusal::NoMatch(NoMatch::NoIdentityForPod) if pod.binding_label().is_some() => {
            denied.with_event(PodEventReason::NoIdentityMatched)
        }
        Refusal::NoMatch(NoMatch::IdentityNotFound { .. }) => {
            denied.with_event(PodEventReason::IdentityNotBound)
        }
        Refusal::NoMatch(_) | Refusal::Workload(WorkloadRefusal::Selector(_)) => denied,
        Refusal::FederatedConfined { .. } => denied.with_event(PodEventReason::CredentialInvalid),
        Refusal::Workload(WorkloadRefusal::NotSynced(_)) => Denied {
            retry_after: Some(NOT_READY_RETRY_AFTER),
            ..denied
        },
        Refusal::Workload(WorkloadRefusal::Misconfigured(_)) => {
            denied.with_event(PodEventReason::FederatedTokenFailed)
        }
        Refusal::PendingTimeout => denied.with_event(PodEventReason::AssignmentTimeout),
    }
}

/// Select for the pod (waiting, bounded, while its assignment is in progress) and fetch its
/// tokens.
async fn grant(
    state: &NmiState,
    pod: &CallerPod,
    selector: &IdentitySelector<'_>,
    resource: &str,
) -> Result<Granted, Denied> {
    if !state.matcher.is_synced() {
        return Err(Denied {
            error: ImdsError::TokenUnavailable {
                detail: "NMI has not finished syncing identities from the API server".to_owned(),
            },
            retry_after: Some(NOT_READY_RETRY_AFTER),
            event: None,
        });
    }
    let selection = match select_now(state, pod, selector) {
        // Fast path: no subscription (a shared counter every request would touch), no deadline.
        // Boxed, like the other slow paths: keeps the per-request future small.
        Selection::Wait(_) => Box::pin(wait_while_pending(state, pod, selector)).await,
        other => other,
    };
    match selection {
        Selection::Refused(refusal) => Err(refusal_denied(pod, &refusal)),
        Selection::Wait(_) => Err(refusal_denied(pod, &Refusal::PendingTimeout)),
        Selection::Identity { identity, source } => {
            let operation = match &source {
                Source::Federated(_) => imds_operation::FEDERATED,
                Source::Usual if identity.identity_type().is_user_assigned_msi() => {
                    imds_operation::MSI_USER_ASSIGNED
                }
                Source::Usual => imds_operation::SERVICE_PRINCIPAL,
            };
            let federated = match source {
                Source::Usual => None,
                Source::Federated(credential) => Some(bind_to_pod(state, pod, credential)),
            };
            let request = TokenRequest {
                target: TokenTarget::Identity(&identity),
                resource,
                pod,
                federated: federated.as_ref(),
            };
            let issued = fetch(state, request, operation)
                .await
                .map_err(|e| broker_denial(&e, state.options.errors.set_retry_after_header))?;
            Ok(Granted {
                tokens: issued.tokens,
                client_id: ClientId::Identity(identity),
                cache_hit: issued.cache_hit,
                exception: false,
                workload_identity: false,
                federated: federated.is_some(),
            })
        }
        Selection::Node(node) => {
            let operation = match node {
                NodeIdentity::SystemAssigned => imds_operation::MSI,
                _ => imds_operation::MSI_USER_ASSIGNED,
            };
            let request = TokenRequest {
                target: TokenTarget::Node(&node),
                resource,
                pod,
                federated: None,
            };
            // Upstream answers every exception-path failure with 403.
            let issued =
                fetch(state, request, operation)
                    .await
                    .map_err(|e| ImdsError::TokenRefused {
                        detail: format!("failed to get service principal token, error: {e}"),
                    })?;
            Ok(Granted {
                tokens: issued.tokens,
                client_id: match node {
                    NodeIdentity::ClientId(id) => ClientId::Other(id),
                    _ => ClientId::None,
                },
                cache_hit: issued.cache_hit,
                exception: true,
                workload_identity: false,
                federated: false,
            })
        }
        Selection::Workload(grant) => {
            // Boxed, like the other slow paths: keeps the per-request future small.
            Box::pin(workload_grant(state, pod, grant, resource)).await
        }
    }
}

/// The broker's credential for `chosen`, with the pod's uid filled in when the token is bound to
/// the pod (looked up only then).
fn bind_to_pod(state: &NmiState, pod: &CallerPod, mut chosen: FederatedCredential) -> Credential {
    if let Some(bound) = chosen.bound_pod.as_mut() {
        bound.uid = state
            .pods
            .uid(&pod.namespace, &pod.name)
            .unwrap_or_default();
    }
    Credential::from(chosen)
}

/// Wait (bounded by the pending wait) while the pod's assignment is in progress; the selection
/// once it is not, or the last [`Selection::Wait`] when the wait runs out.
async fn wait_while_pending(
    state: &NmiState,
    pod: &CallerPod,
    selector: &IdentitySelector<'_>,
) -> Selection {
    let deadline = tokio::time::Instant::now() + state.options.pending_wait;
    let mut changes = state.matcher.subscribe();
    loop {
        changes.borrow_and_update();
        match select_now(state, pod, selector) {
            Selection::Wait(reason) => {
                tracing::debug!(pod = %pod.name, namespace = %pod.namespace, ?reason, "identity assignment pending, waiting");
                match tokio::time::timeout_at(deadline, changes.changed()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) | Err(_) => return Selection::Wait(reason),
                }
            }
            other => return other,
        }
    }
}

/// Tokens for a pod served as a Workload Identity pod: its service account's identity, by
/// federated exchange ([`podid_select::workload`]).
async fn workload_grant(
    state: &NmiState,
    pod: &CallerPod,
    grant: WorkloadGrant,
    resource: &str,
) -> Result<Granted, Denied> {
    let credential = bind_to_pod(state, pod, grant.credential);
    let request = TokenRequest {
        target: TokenTarget::Workload(&grant.account),
        resource,
        pod,
        federated: Some(&credential),
    };
    let issued = fetch(state, request, imds_operation::FEDERATED)
        .await
        .map_err(|e| broker_denial(&e, state.options.errors.set_retry_after_header))?;
    Ok(Granted {
        tokens: issued.tokens,
        client_id: ClientId::Other(grant.account.client_id.clone()),
        cache_hit: issued.cache_hit,
        exception: false,
        workload_identity: true,
        federated: true,
    })
}

async fn fetch(
    state: &NmiState,
    request: TokenRequest<'_>,
    operation: &'static str,
) -> Result<crate::provider::Issued, BrokerError> {
    let started = Instant::now();
    let result = match state.tokens.cached(&request) {
        Some(hit) => Ok(hit),
        None => state.tokens.tokens(request).await,
    };
    state
        .metrics
        .observe_imds_operation(operation, started.elapsed().as_secs_f64());
    match &result {
        Ok(issued) if issued.tokens.is_empty() => {
            state
                .metrics
                .imds_operations_errors
                .with_label_values(&[operation])
                .inc();
            return Err(BrokerError::Config {
                client_id: String::new(),
                reason: "the token source returned no token".to_owned(),
            });
        }
        Ok(_) => {}
        Err(_) => state
            .metrics
            .imds_operations_errors
            .with_label_values(&[operation])
            .inc(),
    }
    result
}

/// The answer for a broker failure. A 503 carries `Retry-After` when waiting helps: always
/// when the wait is known (the node's IMDS budget had no turn in time, or upstream sent
/// `Retry-After`, capped at [`MAX_UPSTREAM_RETRY_AFTER`]); for other transport failures only
/// with `--set-retry-after-header`, then upstream's 20 s.
fn broker_denial(error: &BrokerError, set_retry_after_header: bool) -> Denied {
    let retry_after = match error {
        BrokerError::Unavailable {
            retry_after: Some(wait),
            ..
        } => Some(
            (wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
                .clamp(1, MAX_UPSTREAM_RETRY_AFTER),
        ),
        BrokerError::Unavailable {
            retry_after: None, ..
        } if set_retry_after_header => Some(u64::from(podid_imds::RETRY_AFTER_SECONDS)),
        _ => None,
    };
    Denied {
        error: broker_error(error),
        retry_after,
        event: PodEventReason::for_broker_error(error),
    }
}

fn broker_error(error: &BrokerError) -> ImdsError {
    if error.status() == 403 {
        ImdsError::TokenRefused {
            detail: error.to_string(),
        }
    } else {
        ImdsError::TokenUnavailable {
            detail: error.to_string(),
        }
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and the ones a proxy must not forward.
const NOT_FORWARDED: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "x-forwarded-for",
];

fn strip_headers(headers: &mut HeaderMap) {
    for name in NOT_FORWARDED {
        headers.remove(name);
    }
}

/// Forward the request to IMDS and copy its answer back (docs/upstream.md#passthrough).
async fn passthrough(state: &NmiState, request: Request<Incoming>) -> Response<Body> {
    let options = state.options.errors;
    let limits = &state.options.limits;
    if state.options.metadata_header_required
        && let Err(error) = check_metadata_header(request.headers())
    {
        return error_response(&error, options);
    }
    let (parts, body) = request.into_parts();
    let body = match tokio::time::timeout(
        limits.header_read_timeout,
        Limited::new(body, limits.max_passthrough_body).collect(),
    )
    .await
    {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(_)) | Err(_) => {
            let error = ImdsError::Internal {
                detail: "request body too large or not received in time".to_owned(),
            };
            return error_response(&error, options);
        }
    };
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let authority = state.options.metadata.to_string();
    let Ok(uri) = Uri::builder()
        .scheme("http")
        .authority(authority.as_str())
        .path_and_query(target)
        .build()
    else {
        return error_response(&ImdsError::MalformedRequestTarget, options);
    };
    let mut headers = parts.headers;
    strip_headers(&mut headers);
    if let Ok(host) = HeaderValue::from_str(&authority) {
        headers.insert(header::HOST, host);
    }
    let mut upstream = Request::new(Full::new(body));
    *upstream.method_mut() = parts.method;
    *upstream.uri_mut() = uri;
    *upstream.headers_mut() = headers;
    let exchange = async {
        let response = state
            .proxy
            .request(upstream)
            .await
            .map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, limits.max_upstream_body)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>((parts, body))
    };
    match tokio::time::timeout(limits.upstream_timeout, exchange).await {
        Ok(Ok((parts, body))) => {
            let mut headers = parts.headers;
            strip_headers(&mut headers);
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
            let mut response = Response::new(Full::new(body));
            *response.status_mut() = parts.status;
            *response.headers_mut() = headers;
            response
        }
        Ok(Err(detail)) => {
            tracing::warn!(%detail, "passthrough to IMDS failed");
            error_response(
                &ImdsError::Internal {
                    detail: format!(
                        "passthrough to the instance metadata service failed: {detail}"
                    ),
                },
                options,
            )
        }
        Err(_) => error_response(
            &ImdsError::Internal {
                detail: "passthrough to the instance metadata service timed out".to_owned(),
            },
            options,
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use podid_controller::broker::SourceKind;

    use super::*;

    fn unavailable(retry_after: Option<Duration>) -> BrokerError {
        BrokerError::Unavailable {
            source_kind: SourceKind::Imds,
            client_id: "c".into(),
            reason: "no turn in the node's IMDS budget".into(),
            retry_after,
        }
    }

    fn retry_after_of(denied: &Denied, options: ErrorOptions) -> (u16, Option<String>) {
        let response = denied_response(denied, options);
        let header = response
            .headers
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap_or_default().to_owned());
        (response.status.as_u16(), header)
    }

    /// The shared selection cases through nmi's own path: the pod attributed by its address in
    /// the pod index, the matcher and service-account store the watches fill, and the mapping of
    /// refusals to IMDS answers. podidctl runs the same table (`podidctl::explain` tests).
    #[test]
    fn nmi_answers_every_shared_selection_case() {
        use podid_select::cases::{Outcome, POD_IP, cases};

        for case in cases() {
            let pods = PodIndex::new();
            pods.replace_all([&case.pod]);
            pods.mark_synced();
            let ip: IpAddr = POD_IP.parse().expect("address");
            let pod = pods.lookup(ip).expect("attributed");
            let matcher = Matcher::new(case.options);
            matcher.replace_with_assigned(
                MatchIndex::new(
                    case.options,
                    case.identities.iter().cloned().map(Arc::new),
                    case.bindings.iter().cloned().map(Arc::new),
                    case.assignments.iter().cloned().map(Arc::new),
                    case.exceptions.iter().cloned().map(Arc::new),
                ),
                AssignedBindings::new(&case.assignments),
            );
            matcher.mark_synced();
            let accounts = ServiceAccounts::default();
            accounts.replace_all(&case.service_accounts);
            accounts.mark_synced();
            let workload = case.serve_workload_identity_pods.then_some(&accounts);
            let selection = select_with(
                &matcher,
                workload,
                case.federated_default_tenant,
                &pod,
                &case.query.selector(),
            );
            let outcome = Outcome::of(&selection, |refusal| {
                denied_response(&refusal_denied(&pod, refusal), ErrorOptions::default())
                    .status
                    .as_u16()
            });
            assert_eq!(outcome, case.expected, "{}: {selection:?}", case.name);
        }
    }

    #[test]
    fn budget_saturation_always_answers_503_with_a_short_retry_after() {
        let error = unavailable(Some(podid_controller::broker::BUDGET_RETRY_AFTER));
        for flag in [false, true] {
            let denied = broker_denial(&error, flag);
            assert_eq!(denied.retry_after, Some(1));
            let (status, header) = retry_after_of(&denied, ErrorOptions::default());
            assert_eq!(status, 503);
            assert_eq!(header.as_deref(), Some("1"));
        }
    }

    #[test]
    fn upstream_retry_after_is_rounded_up_and_capped() {
        let denied = broker_denial(&unavailable(Some(Duration::from_millis(2500))), false);
        assert_eq!(denied.retry_after, Some(3));
        let denied = broker_denial(&unavailable(Some(Duration::from_secs(3600))), false);
        assert_eq!(denied.retry_after, Some(MAX_UPSTREAM_RETRY_AFTER));
        let denied = broker_denial(&unavailable(Some(Duration::ZERO)), false);
        assert_eq!(denied.retry_after, Some(1));
    }

    #[test]
    fn unreachable_upstream_gets_retry_after_only_with_the_flag() {
        let error = unavailable(None);
        let denied = broker_denial(&error, false);
        let (status, header) = retry_after_of(&denied, ErrorOptions::default());
        assert_eq!((status, header), (503, None));
        let denied = broker_denial(&error, true);
        let (status, header) = retry_after_of(&denied, ErrorOptions::default());
        assert_eq!(status, 503);
        assert_eq!(header.as_deref(), Some("20"));
    }

    #[test]
    fn refusals_and_config_errors_never_get_retry_after() {
        let refused = BrokerError::Refused {
            source_kind: SourceKind::ClientSecret,
            client_id: "c".into(),
            status: 401,
            error: "invalid_client".into(),
            description: "bad secret".into(),
        };
        let config = BrokerError::Config {
            client_id: "c".into(),
            reason: "Secret ns/s has no certificate key".into(),
        };
        for flag in [false, true] {
            let (status, header) =
                retry_after_of(&broker_denial(&refused, flag), ErrorOptions::default());
            assert_eq!((status, header), (403, None));
            let (status, header) =
                retry_after_of(&broker_denial(&config, flag), ErrorOptions::default());
            assert_eq!((status, header), (503, None));
        }
    }
}
