//! The HTTP servers: the IMDS emulation (docs/upstream.md, routing to status codes), the probe port
//! (docs/upstream.md#nmi-probes-and-metrics, plus `/readyz`) and the metrics port.
//!
//! Every status code and body of the IMDS port comes from `podid-imds`; this module only decides
//! which one. The state a request reads — the pod index and the current
//! [`MatchIndex`](podid_select::matching::MatchIndex) held by [`crate::state`] — is read under
//! short locks that are never held across an await.
//!
//! Bounds (docs/security.md): at most [`Limits::max_connections`] connections (further connections
//! wait in the listen backlog) and at most [`Limits::max_connections_per_source`] from one address
//! (further ones from it are closed at once), request headers limited in size and count (hyper
//! answers 431), a deadline for reading request headers (slow clients and idle keep-alive
//! connections are closed), request bodies ignored on the token routes and limited on passthrough,
//! upstream timeouts on passthrough. Shutdown stops accepting, lets requests in flight finish
//! within [`Limits::shutdown_grace`], then drops the rest.
//!
//! The parts: the accept loop, its bounds and the IMDS port's options (`serve`), the IMDS port's
//! routes (`routes`), a token for an attributed pod (`grant`), refusals and failures as IMDS
//! answers (`answer`), the proxy to the real IMDS (`passthrough`) and the probe and metrics ports
//! (`probes`).

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::events::EventSink;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::pods::PodIndex;
use crate::provider::TokenProvider;
use crate::workload::ServiceAccounts;

mod answer;
mod grant;
mod passthrough;
mod probes;
mod routes;
mod serve;

pub use probes::{serve_metrics, serve_probes};
pub use serve::{Limits, ServerOptions, serve};

use crate::state::Matcher;

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
