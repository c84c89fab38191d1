//! NMI's Prometheus metrics (docs/upstream.md#nmi-probes-and-metrics) plus podid's own counters.
//!
//! Upstream names are kept: `aadpodidentity_nmi_operations_duration_seconds`,
//! `aadpodidentity_imds_operations_duration_seconds`, `aadpodidentity_imds_operations_errors_count`,
//! `aadpodidentity_kubernetes_api_operations_errors_count`. Label values are bounded: the
//! `operation_type` of the NMI histogram is the route name (`token`, `host_token`), never the raw
//! path (upstream's unbounded cardinality), and `resource` is only recorded for issued tokens,
//! as one of [`KNOWN_RESOURCES`] or `other` ([`resource_label`]).
//! podid adds `podid_nmi_token_cache_hits_total`, `podid_nmi_token_cache_misses_total` (copied
//! from the broker's counters at scrape time), `podid_nmi_attribution_failures_total`,
//! `podid_nmi_not_ready{reason}` (copied from [`Health`] at scrape time: 1 for each condition
//! that keeps the installed interception from serving, see [`crate::health`]),
//! `podid_nmi_pod_watch_blind_seconds` (how long the pod watch has been failing, read at scrape
//! time) and `podid_nmi_connections_refused_total{reason}`.

use std::sync::{Arc, Mutex, OnceLock};

use podid_broker::BrokerStats;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::health::{Blocker, Health};
use crate::pods::PodIndex;

/// `identity_type` values of `podid_nmi_tokens_issued_total` (plus `other` for an unsupported
/// type, which never gets a token).
pub const TOKEN_SOURCES: [&str; 6] = [
    "user_assigned_msi",
    "service_principal",
    "service_principal_certificate",
    "federated",
    "workload_identity",
    "node_identity",
];

/// `reason` values of `podid_nmi_attribution_failures_total`.
const ATTRIBUTION_REASONS: [&str; 4] = [
    "not_found",
    "ambiguous",
    "address_reassigned",
    "untrusted_route",
];

/// `cache` values of `podid_nmi_tokens_issued_total`.
const TOKEN_CACHE: [&str; 3] = ["hit", "miss", "unknown"];

/// `part` values of `podid_nmi_interception_repairs_total`: the `aad-metadata` chain, its
/// `PREROUTING` jump, the `aad-metadata-guard` chain or its jumps, the `route_localnet` sysctl.
pub const REPAIR_PARTS: [&str; 4] = ["chain", "jump", "guard", "route_localnet"];

/// `reason` of `podid_nmi_not_ready` when the interception itself is not installed.
pub const NOT_READY_INTERCEPTION: &str = "interception";

/// Upstream's NMI request histogram buckets (seconds).
const NMI_BUCKETS: [f64; 18] = [
    0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0,
    100.0,
];
/// Upstream's IMDS histogram buckets (seconds).
const IMDS_BUCKETS: [f64; 10] = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0];

/// The audiences recorded as themselves in the `resource` label of
/// `aadpodidentity_nmi_operations_duration_seconds`; any other resource is recorded as
/// [`OTHER_RESOURCE`], so a pod asking for endless distinct resources cannot grow the series
/// count (docs/metrics.md). A trailing `/` is ignored when matching.
pub const KNOWN_RESOURCES: [&str; 14] = [
    "https://management.azure.com/",
    "https://management.core.windows.net/",
    "https://vault.azure.net",
    "https://storage.azure.com/",
    "https://database.windows.net/",
    "https://ossrdbms-aad.database.windows.net",
    "https://graph.microsoft.com/",
    "https://servicebus.azure.net",
    "https://eventhubs.azure.net",
    "https://cognitiveservices.azure.com",
    "https://monitor.azure.com/",
    "https://api.loganalytics.io",
    "https://redis.azure.com",
    "api://AzureADTokenExchange",
];

/// The `resource` label value of a resource not in [`KNOWN_RESOURCES`].
pub const OTHER_RESOURCE: &str = "other";

/// The bounded `resource` label for `resource` (empty stays empty: no token was issued).
pub fn resource_label(resource: &str) -> &'static str {
    if resource.is_empty() {
        return "";
    }
    let trimmed = resource.trim_end_matches('/');
    KNOWN_RESOURCES
        .iter()
        .find(|known| known.trim_end_matches('/').eq_ignore_ascii_case(trimmed))
        .copied()
        .unwrap_or(OTHER_RESOURCE)
}

/// `operation_type` of the IMDS metrics (upstream's adal operation names).
pub mod imds_operation {
    /// System-assigned token (exception path without `client_id`).
    pub const MSI: &str = "adal_token_msi";
    /// User-assigned managed identity token.
    pub const MSI_USER_ASSIGNED: &str = "adal_token_msi_userassignedid";
    /// Service principal token (secret or certificate).
    pub const SERVICE_PRINCIPAL: &str = "adal_token";
    /// podid: token by federated exchange (an identity switched to `podid.io/token-source:
    /// federated`, or a Workload Identity pod served with `--serve-workload-identity-pods`).
    pub const FEDERATED: &str = "federated_token";
}

/// The metric families NMI records. Create once, share as `Arc<Metrics>`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `aadpodidentity_nmi_operations_duration_seconds{operation_type,status_code,namespace,resource}`.
    pub nmi_operations_duration: HistogramVec,
    /// `aadpodidentity_imds_operations_duration_seconds{operation_type}`.
    pub imds_operations_duration: HistogramVec,
    /// `aadpodidentity_imds_operations_errors_count{operation_type}`.
    pub imds_operations_errors: IntCounterVec,
    /// `aadpodidentity_kubernetes_api_operations_errors_count{operation_type}`.
    pub kubernetes_api_errors: IntCounterVec,
    /// `podid_nmi_attribution_failures_total{reason}` (`not_found`, `ambiguous`,
    /// `address_reassigned`, `untrusted_route`).
    pub attribution_failures: IntCounterVec,
    /// `podid_nmi_not_ready{reason}`: `interception` and each [`Blocker::label`].
    pub not_ready: IntGaugeVec,
    /// `podid_nmi_connections_refused_total{reason}` (`per_source`: the peer already held
    /// `--max-connections-per-source` connections).
    pub connections_refused: IntCounterVec,
    /// `podid_nmi_interception_repairs_total{part}`: pieces of the installed interception found
    /// missing or altered and put back ([`REPAIR_PARTS`]).
    pub interception_repairs: IntCounterVec,
    /// `podid_nmi_tokens_issued_total{identity_type,cache}`, each child resolved once (the
    /// cache-hit path hashes no labels): `[identity_type][cache]`, in [`TOKEN_SOURCES`] order
    /// then `other`, and `hit`, `miss`, `unknown`.
    tokens_issued: Vec<[IntCounter; 3]>,
    pod_watch_blind: Gauge,
    pod_watch: Mutex<Option<Arc<PodIndex>>>,
    cache_hits: IntCounter,
    cache_misses: IntCounter,
    broker: Mutex<Option<BrokerMirror>>,
    health: Mutex<Option<Arc<Health>>>,
    /// The `imds_operations_duration` child of each known `operation_type`, resolved on first
    /// use (so the exposition still shows only observed series): every token request records
    /// one, and resolving a child hashes its label and takes the family's lock.
    imds_durations: [OnceLock<Histogram>; IMDS_OPERATIONS.len()],
}

/// The `operation_type`s [`Metrics::observe_imds_operation`] keeps a resolved child for.
const IMDS_OPERATIONS: [&str; 4] = [
    imds_operation::MSI,
    imds_operation::MSI_USER_ASSIGNED,
    imds_operation::SERVICE_PRINCIPAL,
    imds_operation::FEDERATED,
];

#[derive(Debug)]
struct BrokerMirror {
    stats: Arc<BrokerStats>,
    hits: u64,
    misses: u64,
}

/// Registering a fixed, distinct set of families into a fresh registry cannot fail.
const REGISTER: &str = "fresh registry with distinct metric names";

impl Metrics {
    /// A registry with every family registered.
    pub fn new() -> Self {
        let registry = Registry::new();
        let nmi_operations_duration = HistogramVec::new(
            HistogramOpts::new(
                "nmi_operations_duration_seconds",
                "Duration of NMI token operations in seconds",
            )
            .namespace("aadpodidentity")
            .buckets(NMI_BUCKETS.to_vec()),
            &["operation_type", "status_code", "namespace", "resource"],
        )
        .expect(REGISTER);
        let imds_operations_duration = HistogramVec::new(
            HistogramOpts::new(
                "imds_operations_duration_seconds",
                "Duration of token operations against IMDS or Entra in seconds",
            )
            .namespace("aadpodidentity")
            .buckets(IMDS_BUCKETS.to_vec()),
            &["operation_type"],
        )
        .expect(REGISTER);
        let imds_operations_errors = IntCounterVec::new(
            Opts::new(
                "imds_operations_errors_count",
                "Number of failed token operations",
            )
            .namespace("aadpodidentity"),
            &["operation_type"],
        )
        .expect(REGISTER);
        let kubernetes_api_errors = IntCounterVec::new(
            Opts::new(
                "kubernetes_api_operations_errors_count",
                "Number of failed Kubernetes lookups",
            )
            .namespace("aadpodidentity"),
            &["operation_type"],
        )
        .expect(REGISTER);
        let attribution_failures = IntCounterVec::new(
            Opts::new(
                "podid_nmi_attribution_failures_total",
                "Token requests whose source address matched no single pod",
            ),
            &["reason"],
        )
        .expect(REGISTER);
        // Error counters exist at 0 from the start, so rates and alerts see zeros, not gaps.
        for operation in IMDS_OPERATIONS {
            imds_operations_errors.with_label_values(&[operation]);
        }
        for reason in ATTRIBUTION_REASONS {
            attribution_failures.with_label_values(&[reason]);
        }
        let not_ready = IntGaugeVec::new(
            Opts::new(
                "podid_nmi_not_ready",
                "1 while this condition keeps nmi from serving pods (the node stays closed): interception not installed, route_localnet not settable, IMDS port held",
            ),
            &["reason"],
        )
        .expect(REGISTER);
        let connections_refused = IntCounterVec::new(
            Opts::new(
                "podid_nmi_connections_refused_total",
                "Connections to the IMDS port closed at once without being served",
            ),
            &["reason"],
        )
        .expect(REGISTER);
        let interception_repairs = IntCounterVec::new(
            Opts::new(
                "podid_nmi_interception_repairs_total",
                "Pieces of the installed interception found missing or altered and put back (part: chain, jump, guard, route_localnet)",
            ),
            &["part"],
        )
        .expect(REGISTER);
        for part in REPAIR_PARTS {
            interception_repairs.with_label_values(&[part]);
        }
        let tokens_issued = IntCounterVec::new(
            Opts::new(
                "podid_nmi_tokens_issued_total",
                "Token answers by how the token was obtained (identity_type: user_assigned_msi, service_principal, service_principal_certificate, federated, workload_identity, node_identity) and whether the cache answered (cache: hit, miss, unknown)",
            ),
            &["identity_type", "cache"],
        )
        .expect(REGISTER);
        let tokens_issued_children: Vec<[IntCounter; 3]> = TOKEN_SOURCES
            .iter()
            .chain(std::iter::once(&"other"))
            .map(|source| {
                TOKEN_CACHE.map(|cache| tokens_issued.with_label_values(&[*source, cache]))
            })
            .collect();
        let pod_watch_blind = Gauge::new(
            "podid_nmi_pod_watch_blind_seconds",
            "How long the pod watch has been failing without a complete list since (0 while it streams)",
        )
        .expect(REGISTER);
        let cache_hits = IntCounter::new(
            "podid_nmi_token_cache_hits_total",
            "Token requests answered from the broker cache",
        )
        .expect(REGISTER);
        let cache_misses = IntCounter::new(
            "podid_nmi_token_cache_misses_total",
            "Token requests that waited for an upstream call",
        )
        .expect(REGISTER);
        registry
            .register(Box::new(nmi_operations_duration.clone()))
            .expect(REGISTER);
        registry
            .register(Box::new(imds_operations_duration.clone()))
            .expect(REGISTER);
        registry
            .register(Box::new(imds_operations_errors.clone()))
            .expect(REGISTER);
        registry
            .register(Box::new(kubernetes_api_errors.clone()))
            .expect(REGISTER);
        registry
            .register(Box::new(attribution_failures.clone()))
            .expect(REGISTER);
        registry
            .register(Box::new(not_ready.clone()))
            .expect(REGISTER);
        registry
            .register(Box::new(connections_refused.clone()))
            .expect(REGISTER);
        registry
            .register(Box::new(tokens_issued.clone()))
            .expect(REGISTER);
        registry
            .register(Box::new(interception_repairs.clone()))
            .expect(REGISTER);
        registry
            .register(Box::new(pod_watch_blind.clone()))
            .expect(REGISTER);
        registry
            .register(Box::new(cache_hits.clone()))
            .expect(REGISTER);
        registry
            .register(Box::new(cache_misses.clone()))
            .expect(REGISTER);
        Self {
            registry,
            nmi_operations_duration,
            imds_operations_duration,
            imds_operations_errors,
            kubernetes_api_errors,
            attribution_failures,
            not_ready,
            connections_refused,
            interception_repairs,
            tokens_issued: tokens_issued_children,
            pod_watch_blind,
            pod_watch: Mutex::new(None),
            cache_hits,
            cache_misses,
            broker: Mutex::new(None),
            health: Mutex::new(None),
            imds_durations: Default::default(),
        }
    }

    /// Count one repair of `part` (one of [`REPAIR_PARTS`]).
    pub fn interception_repaired(&self, part: &str) {
        self.interception_repairs.with_label_values(&[part]).inc();
    }

    /// Record one token operation of `operation` (an [`imds_operation`] name) taking `seconds`
    /// in `aadpodidentity_imds_operations_duration_seconds`.
    pub fn observe_imds_operation(&self, operation: &str, seconds: f64) {
        match IMDS_OPERATIONS.iter().position(|known| *known == operation) {
            Some(i) => self.imds_durations[i]
                .get_or_init(|| {
                    self.imds_operations_duration
                        .with_label_values(&[operation])
                })
                .observe(seconds),
            None => self
                .imds_operations_duration
                .with_label_values(&[operation])
                .observe(seconds),
        }
    }

    /// The registry (to add more families).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Mirror the broker's hit/miss counters into the podid counters at every scrape.
    pub fn follow_broker(&self, stats: Arc<BrokerStats>) {
        let mut broker = self.broker.lock().unwrap_or_else(|e| e.into_inner());
        *broker = Some(BrokerMirror {
            stats,
            hits: 0,
            misses: 0,
        });
    }

    /// Mirror `health` into `podid_nmi_not_ready` at every scrape.
    pub fn follow_health(&self, health: Arc<Health>) {
        *self.health.lock().unwrap_or_else(|e| e.into_inner()) = Some(health);
    }

    fn sync_health(&self) {
        let health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let Some(health) = health.as_ref() else {
            return;
        };
        self.not_ready
            .with_label_values(&[NOT_READY_INTERCEPTION])
            .set(i64::from(!health.interception_installed()));
        for blocker in Blocker::ALL {
            self.not_ready
                .with_label_values(&[blocker.label()])
                .set(i64::from(health.is_blocked(blocker)));
        }
    }

    /// One token answer: how it was obtained (one of [`TOKEN_SOURCES`], else `other`) and
    /// whether the cache answered (`hit`, `miss`, else `unknown`).
    pub fn token_issued(&self, identity_type: &str, cache: &str) {
        let source = TOKEN_SOURCES
            .iter()
            .position(|s| *s == identity_type)
            .unwrap_or(TOKEN_SOURCES.len());
        let cache = TOKEN_CACHE.iter().position(|c| *c == cache).unwrap_or(2);
        if let Some(children) = self.tokens_issued.get(source) {
            children[cache].inc();
        }
    }

    /// Read the pod watch's blindness from `pods` at every scrape.
    pub fn follow_pod_watch(&self, pods: Arc<PodIndex>) {
        *self.pod_watch.lock().unwrap_or_else(|e| e.into_inner()) = Some(pods);
    }

    fn sync_pod_watch(&self) {
        let pods = self.pod_watch.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pods) = pods.as_ref() {
            self.pod_watch_blind.set(
                pods.watch_blind_for(std::time::Instant::now())
                    .as_secs_f64(),
            );
        }
    }

    fn sync_broker(&self) {
        let mut broker = self.broker.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mirror) = broker.as_mut() {
            let hits = mirror.stats.hits();
            let misses = mirror.stats.misses();
            self.cache_hits.inc_by(hits.saturating_sub(mirror.hits));
            self.cache_misses
                .inc_by(misses.saturating_sub(mirror.misses));
            mirror.hits = hits;
            mirror.misses = misses;
        }
    }

    /// The text exposition of every family (the `/metrics` body).
    pub fn encode(&self) -> Vec<u8> {
        self.sync_broker();
        self.sync_health();
        self.sync_pod_watch();
        let mut out = Vec::new();
        // Encoding into a Vec only fails on invalid metric data, which these families never hold.
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(%error, "encoding metrics failed");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_ready_mirrors_health_at_scrape_time() {
        let metrics = Metrics::new();
        let health = Arc::new(Health::default());
        metrics.follow_health(Arc::clone(&health));
        health.set_interception_installed(true);
        health.block(Blocker::RouteLocalnet, "read-only file system".into());
        let text = exposition(&metrics);
        for line in [
            "podid_nmi_not_ready{reason=\"interception\"} 0",
            "podid_nmi_not_ready{reason=\"route_localnet\"} 1",
            "podid_nmi_not_ready{reason=\"imds_listener\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
        assert!(!text.contains("read-only"), "reasons are not label values");
        health.unblock(Blocker::RouteLocalnet);
        assert!(exposition(&metrics).contains("podid_nmi_not_ready{reason=\"route_localnet\"} 0"));
    }

    fn exposition(metrics: &Metrics) -> String {
        String::from_utf8(metrics.encode()).unwrap_or_default()
    }

    #[test]
    fn resource_label_is_bounded() {
        assert_eq!(
            resource_label("https://vault.azure.net/"),
            "https://vault.azure.net"
        );
        assert_eq!(
            resource_label("https://management.azure.com"),
            "https://management.azure.com/"
        );
        assert_eq!(resource_label(""), "");
        let labels: std::collections::BTreeSet<_> = (0..1000)
            .map(|i| resource_label(&format!("https://res{i}.example.com")))
            .chain(KNOWN_RESOURCES.iter().map(|r| resource_label(r)))
            .collect();
        assert_eq!(labels.len(), KNOWN_RESOURCES.len() + 1, "{labels:?}");
    }

    #[test]
    fn imds_operations_are_recorded_in_their_own_series_only_once_observed() {
        let metrics = Metrics::new();
        let family = "aadpodidentity_imds_operations_duration_seconds_count";
        assert!(!exposition(&metrics).contains(family));
        metrics.observe_imds_operation(imds_operation::MSI_USER_ASSIGNED, 0.001);
        metrics.observe_imds_operation(imds_operation::MSI_USER_ASSIGNED, 0.002);
        metrics.observe_imds_operation(imds_operation::FEDERATED, 0.003);
        metrics.observe_imds_operation("something_else", 0.004);
        let text = exposition(&metrics);
        for (operation, count) in [
            (imds_operation::MSI_USER_ASSIGNED, 2),
            (imds_operation::FEDERATED, 1),
            ("something_else", 1),
        ] {
            let line = format!("{family}{{operation_type=\"{operation}\"}} {count}");
            assert!(text.contains(&line), "{line} missing in:\n{text}");
        }
        assert!(!text.contains(&format!(
            "{family}{{operation_type=\"{}\"}}",
            imds_operation::MSI
        )));
    }

    #[test]
    fn tokens_issued_counts_each_source_and_cache_answer() {
        let metrics = Metrics::new();
        metrics.token_issued("federated", "hit");
        metrics.token_issued("federated", "hit");
        metrics.token_issued("user_assigned_msi", "miss");
        metrics.token_issued("made-up", "weird");
        let text = exposition(&metrics);
        for line in [
            "podid_nmi_tokens_issued_total{cache=\"hit\",identity_type=\"federated\"} 2",
            "podid_nmi_tokens_issued_total{cache=\"miss\",identity_type=\"user_assigned_msi\"} 1",
            "podid_nmi_tokens_issued_total{cache=\"unknown\",identity_type=\"other\"} 1",
            "podid_nmi_tokens_issued_total{cache=\"hit\",identity_type=\"node_identity\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
    }
}
