//! The running agent: what `nmi` does after its flags validate (docs/upstream.md#start-up,
//! docs/ARCHITECTURE.md, docs/security.md).
//!
//! Start-up order: the node is closed before anything that can fail. First the interception
//! (`aad-metadata` chain and `PREROUTING` jump; fatal only if iptables itself fails), then
//! `route_localnet` (with the CVE-2020-8558 guard when nmi turns it on; a failure keeps nmi up
//! with the chain in place, so DNAT-ed requests are dropped, and is reported on `/readyz`, in
//! `podid_nmi_not_ready` and as a Node event), the conntrack flush, and only then what can fail:
//! the kubenet refusal, the kube client, the probe and metrics listeners (fatal; the chain
//! stays) and the IMDS listener (a held port is retried every 100 ms while `/readyz` says why).
//! Then the watches, the reconcile loop (which also retries `route_localnet` and repairs a
//! removed or altered piece within a second, [`crate::ruleset`]) and, with
//! `--startup-taint`, the removal of the start-up taint once the caches are synced. `/readyz`
//! turns 200 only once the caches are synced, the interception is installed and nothing blocks
//! it; until then the IMDS port answers no token (fail closed).
//!
//! Shutdown (SIGTERM/SIGINT): stop accepting, let in-flight requests finish, and keep the
//! iptables rules, so pods never reach the real IMDS unattributed while nmi restarts.
//! `nmi uninstall-interception` removes them explicitly.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use dashmap::DashMap;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use podid_api::{AzureIdentity, IdentityType};
use podid_broker::{
    BrokerConfig, BrokerError, BrokerStats, CertificateSource, ClientSecretSource, Credential,
    CredentialOrigin, EntraConfig, ImdsConfig, ImdsLimiter, ImdsSource, LimiterConfig,
    Secret as SecretValue, Sources, SystemClock, TokenBroker,
};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{Config, check_kubenet};
use crate::conntrack;
use crate::events::{self, EventSink};
use crate::health::{Blocker, Health};
use crate::interception::{self, Interception, SystemIptables};
use crate::metrics::Metrics;
use crate::pods::PodIndex;
use crate::provider::{
    Issued, TokenFuture, TokenProvider, TokenRequest, TokenTarget, identity_spec, requester,
};
use crate::route::NetlinkRoutes;
use crate::run::{Revoke, WatchConfig, spawn_service_account_watch, spawn_watches};
use crate::server::{NmiState, ServerOptions, serve, serve_metrics, serve_probes};
use crate::state::Matcher;
use crate::taint;
use crate::workload::ServiceAccounts;

/// How long a Secret read for a type 1/2 identity is reused before it is read again.
pub const SECRET_TTL: Duration = Duration::from_secs(60);

/// Where nmi reads and writes sysctls.
const PROC_SYS: &str = "/proc/sys";

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    // 1. Close the node first: nothing before this can fail but iptables itself.
    let intercept = Interception {
        metadata: config.metadata,
        target: config.dnat_target,
    };
    let iptables = Arc::new(SystemIptables::new().context("finding the iptables command")?);
    let first = {
        let iptables = Arc::clone(&iptables);
        tokio::task::spawn_blocking(move || interception::reconcile(&*iptables, &intercept))
            .await?
            .context("installing the aad-metadata interception")?
    };
    tracing::info!(?first, "interception installed");
    let health = Arc::new(Health::default());
    health.set_interception_installed(true);
    // 2. Make the DNAT deliver. A failure leaves the node closed (the kernel drops what is
    // DNAT-ed to 127.0.0.1) and is reported, not fatal.
    let manage_localnet = config.manage_route_localnet && config.dnat_target.ip().is_loopback();
    if manage_localnet {
        check_route_localnet(&iptables, &health, None).await;
    }
    if config.conntrack_deletion {
        flush_conntrack(config.metadata).await?;
    }

    // 3. Everything that can fail comes after; failing here leaves the rules in place.
    check_kubenet(&config)?;
    if config.profile_requested {
        tracing::warn!("--enableProfile is ignored: podid serves no pprof endpoint");
    }
    let client = kube::Client::try_default()
        .await
        .context("building the Kubernetes client (in-cluster or KUBECONFIG)")?;
    let probe_listener = bind(
        SocketAddr::from(([0, 0, 0, 0], config.probe_port)),
        "health probe",
    )
    .await?;
    let metrics_listener = bind(
        SocketAddr::from(([0, 0, 0, 0], config.prometheus_port)),
        "metrics",
    )
    .await?;
    let imds_listener = match bind(config.listen, "IMDS emulation").await {
        Ok(listener) => Some(listener),
        Err(error) => {
            health.block(
                Blocker::ImdsListener,
                listener_reason(config.listen, &error),
            );
            tracing::error!(
                "{error:#}; the interception stays installed (pods' IMDS requests go to whatever holds the port, never to the VM's IMDS) and nmi retries every 100 ms"
            );
            None
        }
    };
    let node_events = NodeEvents {
        client: client.clone(),
        node: config.node_name.clone(),
    };
    for (blocker, reason) in health.blocked() {
        node_events.report(blocker, reason);
    }

    let clock = Arc::new(SystemClock);
    let limiter = Arc::new(ImdsLimiter::new(LimiterConfig::default()));
    let imds = Arc::new(ImdsSource::new(
        ImdsConfig {
            endpoint: format!("http://{}", config.metadata),
            ..ImdsConfig::default()
        },
        limiter,
        clock.clone(),
    )?);
    // Where identities' credentials may go besides the clouds' Entra hosts: what the operator
    // lists, and the federated authority the operator chose.
    let mut extra_authorities = config.allowed_authorities.clone();
    if let Some(host) = &config.federated_authority_host {
        extra_authorities
            .push(url::Url::parse(host).context("parsing --federated-authority-host")?);
    }
    let entra = EntraConfig {
        extra_authorities,
        ..EntraConfig::default()
    };
    let secret = Arc::new(ClientSecretSource::new(entra.clone(), clock.clone())?);
    let certificate = Arc::new(CertificateSource::new(entra.clone(), clock.clone())?);
    let sources = Sources {
        imds,
        client_secret: secret,
        certificate,
        federated: Arc::new(podid_broker::FederatedSource::new(
            client.clone(),
            podid_broker::FederatedConfig {
                default_tenant: config.federated_default_tenant.clone(),
                entra: EntraConfig {
                    default_authority: config
                        .federated_authority_host
                        .clone()
                        .unwrap_or_else(|| EntraConfig::default().default_authority),
                    ..entra
                },
                ..podid_broker::FederatedConfig::default()
            },
            clock.clone(),
        )?),
    };
    let broker = TokenBroker::new(BrokerConfig::default(), sources, clock);
    let provider = Arc::new(
        CredentialedBroker::new(broker.clone(), client.clone())
            .allow_cross_namespace_secrets(config.allow_cross_namespace_secrets),
    );

    let pods = Arc::new(PodIndex::with_route_probe(Arc::new(NetlinkRoutes)));
    let matcher = Arc::new(Matcher::new(ServerOptions::match_options(&config)));
    let metrics = Arc::new(Metrics::new());
    metrics.follow_health(Arc::clone(&health));
    let options = ServerOptions::from_config(&config);
    let limits = options.limits.clone();
    let (events, queued) = EventSink::new(events::DEFAULT_QUEUE, events::DEFAULT_INTERVAL);
    let publisher = tokio::spawn(events::publish(
        client.clone(),
        config.node_name.clone(),
        queued,
    ));
    let mut state = NmiState::new(
        options,
        Arc::clone(&pods),
        Arc::clone(&matcher),
        provider.clone(),
        Arc::clone(&metrics),
        Arc::clone(&health),
    )
    .with_events(Arc::new(events));
    let service_accounts = config
        .serve_workload_identity_pods
        .then(|| Arc::new(ServiceAccounts::default()));
    if let Some(accounts) = &service_accounts {
        state = state.with_workload_identity(Arc::clone(accounts));
    }
    let state = Arc::new(state);

    let revoke: Revoke = {
        let broker = broker.clone();
        let provider = provider.clone();
        Arc::new(move |key| {
            broker.invalidate_identity(key);
            provider.forget_secrets();
        })
    };
    let mut watches = spawn_watches(
        client.clone(),
        &WatchConfig {
            node_name: config.node_name.clone(),
            match_options: ServerOptions::match_options(&config),
            scale_features: config.scale_features,
        },
        pods,
        matcher,
        Some(revoke),
    );
    if let Some(accounts) = service_accounts {
        spawn_service_account_watch(&mut watches, client.clone(), accounts);
    }
    let taint = config.startup_taint.clone().map(|key| {
        let state = Arc::clone(&state);
        let client = client.clone();
        let node = config.node_name.clone();
        tokio::spawn(async move {
            // The interception is installed (step 1); wait for the caches, then open the node
            // to workloads.
            while !state.caches_synced() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            match taint::remove(client, &node, &key).await {
                taint::Removed::Removed => {}
                taint::Removed::Absent => {
                    tracing::info!(%node, key, "the node does not carry the start-up taint");
                }
            }
        })
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let reconcile = tokio::spawn(reconcile_loop(
        Repair {
            iptables,
            intercept,
            localnet: manage_localnet.then(|| node_events.clone()),
            health: Arc::clone(&health),
            metrics: Arc::clone(&metrics),
        },
        config.ipt_update_interval,
        stop_rx.clone(),
    ));
    let imds_server = {
        let state = state.clone();
        let health = Arc::clone(&health);
        let addr = config.listen;
        let stop = stop_rx.clone();
        tokio::spawn(async move {
            let listener = match imds_listener {
                Some(listener) => listener,
                None => match bind_when_free(addr, &health, node_events, stop.clone()).await {
                    Some(listener) => listener,
                    None => return,
                },
            };
            serve(listener, state, stopped(stop)).await;
        })
    };
    let probe_server = tokio::spawn(serve_probes(
        probe_listener,
        state,
        stopped(stop_rx.clone()),
    ));
    let metrics_server = tokio::spawn(serve_metrics(
        metrics_listener,
        metrics,
        limits,
        stopped(stop_rx),
    ));
    tracing::info!(
        node = %config.node_name,
        listen = %config.listen,
        probe_port = config.probe_port,
        prometheus_port = config.prometheus_port,
        "nmi serving"
    );

    podid_runtime::shutdown_signal().await;
    tracing::info!("shutting down: draining requests; the interception rules stay (fail closed)");
    let _ = stop_tx.send(true);
    watches.abort();
    publisher.abort();
    if let Some(taint) = taint {
        taint.abort();
    }
    let _ = tokio::join!(imds_server, probe_server, metrics_server, reconcile);
    Ok(())
}

/// `--enable-conntrack-deletion`: cut flows to IMDS opened before the DNAT existed. A missing
/// `conntrack` tool is one warning; a failing one is fatal, as upstream.
async fn flush_conntrack(metadata: std::net::SocketAddrV4) -> anyhow::Result<()> {
    let flushed = tokio::task::spawn_blocking(move || conntrack::flush_imds_flows(metadata))
        .await?
        .context("deleting conntrack entries to the metadata address")?;
    match flushed {
        conntrack::Flushed::Deleted(count) => {
            tracing::info!(count, %metadata, "deleted conntrack entries to the metadata address");
        }
        conntrack::Flushed::ToolMissing => tracing::warn!(
            %metadata,
            "--enable-conntrack-deletion is set but the conntrack tool (conntrack-tools) is not installed: connections to the metadata address opened before nmi started keep bypassing the interception until they close"
        ),
    }
    Ok(())
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("error creating http server: binding the {what} port {addr}"))
}

fn listener_reason(addr: SocketAddr, error: &anyhow::Error) -> String {
    let cause = error.root_cause();
    format!(
        "cannot bind the IMDS emulation port {addr} ({cause}); pods' IMDS requests go to whatever holds it, never to the VM's IMDS, until nmi can bind it"
    )
}

/// How often a held IMDS port is tried again: the gap in service when the Go NMI hands the port
/// over during the node swap (one `bind` call each, nothing else).
const BIND_RETRY: Duration = Duration::from_millis(100);

/// Binds the IMDS port once it is free, trying every [`BIND_RETRY`], while the interception stays in
/// place (DNAT-ed connections never reach the VM's IMDS meanwhile: closed). `None` when nmi stops first.
async fn bind_when_free(
    addr: SocketAddr,
    health: &Health,
    events: NodeEvents,
    mut stop: watch::Receiver<bool>,
) -> Option<TcpListener> {
    loop {
        tokio::select! {
            () = tokio::time::sleep(BIND_RETRY) => {}
            _ = stop.wait_for(|s| *s) => return None,
        }
        match bind(addr, "IMDS emulation").await {
            Ok(listener) => {
                health.unblock(Blocker::ImdsListener);
                tracing::info!(%addr, "bound the IMDS emulation port");
                return Some(listener);
            }
            Err(error) => {
                if health.block(Blocker::ImdsListener, listener_reason(addr, &error)) {
                    events.report(Blocker::ImdsListener, listener_reason(addr, &error));
                }
            }
        }
    }
}

/// Publishes a Warning event on nmi's Node when a [`Blocker`] appears.
#[derive(Clone)]
struct NodeEvents {
    client: kube::Client,
    node: String,
}

impl NodeEvents {
    fn report(&self, blocker: Blocker, note: String) {
        tokio::spawn(events::publish_node_event(
            self.client.clone(),
            self.node.clone(),
            events::node_event_reason(blocker),
            note,
        ));
    }
}

/// Turns `route_localnet` on (with the CVE-2020-8558 guard, [`interception::enable_route_localnet`])
/// or records why it cannot be. Returns the reason when the blocker is new (to be reported).
/// `repairs` (after start-up) counts a sysctl nmi had to write again.
async fn check_route_localnet(
    iptables: &Arc<SystemIptables>,
    health: &Health,
    repairs: Option<&Metrics>,
) -> Option<String> {
    let backend = Arc::clone(iptables);
    let outcome = tokio::task::spawn_blocking(move || {
        interception::enable_route_localnet(&*backend, Path::new(PROC_SYS))
    })
    .await;
    let error = match outcome {
        Ok(Ok(localnet)) => {
            if let interception::Localnet::SetByNmi {
                prior,
                guard,
                now: true,
            } = &localnet
            {
                tracing::info!(
                    prior = %prior,
                    guard_added = guard,
                    "set net.ipv4.conf.all.route_localnet=1 for the DNAT to 127.0.0.1, behind the CVE-2020-8558 guard"
                );
                if let Some(metrics) = repairs {
                    metrics.interception_repaired("route_localnet");
                }
            }
            if health.unblock(Blocker::RouteLocalnet) {
                tracing::info!(
                    "net.ipv4.conf.all.route_localnet is 1 now: the interception delivers"
                );
            }
            return None;
        }
        Ok(Err(error)) => error.to_string(),
        Err(error) => error.to_string(),
    };
    let reason = format!(
        "net.ipv4.conf.all.route_localnet is not 1 and nmi cannot set it ({error}); pods' IMDS requests are dropped (closed) until it is set on the node: sysctl -w net.ipv4.conf.all.route_localnet=1"
    );
    let new = health.block(Blocker::RouteLocalnet, reason.clone());
    if new {
        tracing::error!("{reason}");
    }
    new.then_some(reason)
}

/// How often nmi reads the `route_localnet` sysctl between passes (one file read).
const CHECK_EVERY: Duration = Duration::from_millis(250);
/// Every how many checks the rules are looked at when no change notification tells nmi of a
/// change ([`crate::ruleset`]): once a second.
const POLL_RULES_EVERY: u32 = 4;
/// How long a change notification waits for the rest of its burst before the pass.
const SETTLE: Duration = Duration::from_millis(20);

/// What the repair loop needs besides the rules.
struct Repair {
    iptables: Arc<SystemIptables>,
    intercept: Interception,
    /// `Some` when nmi manages `route_localnet` (its Node events).
    localnet: Option<NodeEvents>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

/// Keeps the interception in place: a full pass every `interval` (docs/upstream.md#interception),
/// and between passes a repair within a second of a change ([`crate::ruleset`]): on an nftables
/// change notification, or every second without notifications, and whenever `route_localnet` (read
/// every 250 ms) reads other than 1 while nmi had it set, or 1 while nmi could not set it. Each
/// piece put back counts in `podid_nmi_interception_repairs_total{part}` and is logged. A failed
/// pass marks the interception not installed (`/readyz` 503,
/// `podid_nmi_not_ready{reason="interception"}`) until a pass succeeds (retried every second); the
/// guard goes in first in every pass, so pods meanwhile get a reset, never the VM's IMDS.
async fn reconcile_loop(repair: Repair, interval: Duration, mut stop: watch::Receiver<bool>) {
    let mode = crate::ruleset::detect_mode(repair.iptables.command());
    let mut changes = match mode {
        crate::ruleset::IptablesMode::Nft => match crate::ruleset::subscribe() {
            Ok(changes) => Some(changes),
            Err(error) => {
                tracing::warn!(%error, "cannot subscribe to nftables change notifications; checking the rules every second");
                None
            }
        },
        crate::ruleset::IptablesMode::Legacy => None,
    };
    tracing::info!(
        ?mode,
        notifications = changes.is_some(),
        "repairing the interception within a second of a change"
    );
    let mut full = tokio::time::interval(interval);
    full.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    full.tick().await;
    let mut check = tokio::time::interval(CHECK_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    check.tick().await;
    let mut checks: u32 = 0;
    loop {
        let changed = async {
            match changes.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        let trigger = tokio::select! {
            _ = full.tick() => "interval",
            _ = check.tick() => "check",
            message = changed => match message {
                Some(()) => "change",
                None => {
                    changes = None;
                    "check"
                }
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        match trigger {
            "check" => {
                checks = checks.wrapping_add(1);
                // Without notifications, or after a failed pass (nothing else may announce
                // that the rules are still broken): once a second.
                let poll_rules = (changes.is_none() || !repair.health.interception_installed())
                    && checks.is_multiple_of(POLL_RULES_EVERY);
                // A pass when the sysctl disagrees with what nmi believes: reset while nmi had
                // it set (repair), or set by someone while nmi could not (ready again). One it
                // cannot set stays for the full pass, as before.
                let localnet_due = repair.localnet.is_some()
                    && route_localnet_is_on() == repair.health.is_blocked(Blocker::RouteLocalnet);
                if !poll_rules && !localnet_due {
                    continue;
                }
            }
            "change" => {
                // Let the burst (an `iptables-restore`, a clean-up of several commands) end,
                // then fold what came meanwhile into this pass.
                tokio::time::sleep(SETTLE).await;
                if let Some(rx) = changes.as_mut() {
                    while rx.try_recv().is_ok() {}
                }
            }
            _ => {}
        }
        repair_pass(&repair, trigger).await;
    }
}

/// Whether `route_localnet` reads 1 (a failed read counts as not: the pass then says why).
fn route_localnet_is_on() -> bool {
    std::fs::read_to_string(Path::new(PROC_SYS).join(interception::ROUTE_LOCALNET))
        .is_ok_and(|value| value.trim() == "1")
}

/// One pass: the rules, then `route_localnet`.
async fn repair_pass(repair: &Repair, trigger: &'static str) {
    let backend = Arc::clone(&repair.iptables);
    let intercept = repair.intercept;
    let pass =
        tokio::task::spawn_blocking(move || interception::reconcile(&*backend, &intercept)).await;
    match pass {
        Ok(Ok(outcome)) => {
            if !outcome.unchanged() {
                let parts: Vec<&str> = outcome.parts().collect();
                for part in &parts {
                    repair.metrics.interception_repaired(part);
                }
                tracing::warn!(
                    ?parts,
                    trigger,
                    "flushing iptables to add aad-metadata custom chains: repaired the interception"
                );
            }
            if !repair.health.interception_installed() {
                tracing::info!("the interception is installed again");
            }
            repair.health.set_interception_installed(true);
        }
        Ok(Err(e)) => {
            if repair.health.interception_installed() {
                tracing::error!(error = %e, "iptables reconcile failed; the node stays closed by the guard, not ready until a pass succeeds");
            }
            repair.health.set_interception_installed(false);
        }
        Err(e) => tracing::error!(error = %e, "iptables reconcile task failed"),
    }
    // Retried until it holds (an operator may set the sysctl later); re-checked after, in
    // case someone turns it off again.
    if let Some(events) = &repair.localnet
        && let Some(reason) =
            check_route_localnet(&repair.iptables, &repair.health, Some(&repair.metrics)).await
    {
        events.report(Blocker::RouteLocalnet, reason);
    }
}

/// A Secret-held credential and where it came from, derived once per Secret read.
type Derived = Result<(Credential, Arc<CredentialOrigin>), String>;

/// What one read of a Secret yields: the type 1 and the type 2 credential (or why there is
/// none), each with its origin (namespace, name and digest, computed here, not per request).
#[derive(Debug)]
struct ReadSecret {
    client_secret: Derived,
    certificate: Derived,
}

impl ReadSecret {
    /// The credentials in `data`, read from Secret `namespace/name`: type 1 needs key
    /// `clientSecret` (UTF-8), type 2 keys `certificate` and `password`. Other keys never
    /// count (upstream took any single key, so any Secret could be sent as a client secret).
    fn new(namespace: &str, name: &str, data: &BTreeMap<String, ByteString>) -> Self {
        let origin = |credential: Credential| {
            let origin = Arc::new(CredentialOrigin::new(namespace, name, &credential));
            (credential, origin)
        };
        let client_secret = match data.get("clientSecret") {
            None => Err(format!(
                "Secret {namespace}/{name} has no clientSecret key (a type 1 identity's Secret must hold its client secret under clientSecret)"
            )),
            Some(value) => match std::str::from_utf8(&value.0) {
                Ok(text) => Ok(origin(Credential::ClientSecret(SecretValue::new(
                    text.trim_end(),
                )))),
                Err(_) => Err(format!(
                    "Secret {namespace}/{name}: clientSecret is not UTF-8"
                )),
            },
        };
        let certificate = match (data.get("certificate"), data.get("password")) {
            (Some(certificate), Some(password)) => Ok(origin(Credential::Certificate {
                pkcs12: Arc::from(certificate.0.as_slice()),
                password: SecretValue::new(String::from_utf8_lossy(&password.0).trim_end()),
            })),
            (None, _) => Err(format!("Secret {namespace}/{name} has no certificate key")),
            (Some(_), None) => Err(format!(
                "Secret {namespace}/{name} has no password key (a type 2 identity's Secret holds certificate and password; an empty password is fine)"
            )),
        };
        Self {
            client_secret,
            certificate,
        }
    }
}

/// The broker, with the credentials of type 1 and 2 identities read from their Secret
/// (`spec.clientPassword`). Reads are cached for [`SECRET_TTL`], so a cache hit in the broker
/// costs no API call; a revoked identity drops its Secret at once.
///
/// Trust boundary: the Secret must live in the identity's own namespace (unless the operator
/// passes `--allow-cross-namespace-secrets`), so an identity author reads only credentials of
/// their own namespace, and only its documented keys count. Each credential carries its origin
/// into the broker's cache key, so it never gets a token another Secret produced.
pub struct CredentialedBroker {
    broker: TokenBroker,
    client: kube::Client,
    allow_cross_namespace: bool,
    secrets: DashMap<(String, String), (Instant, Arc<ReadSecret>)>,
}

impl std::fmt::Debug for CredentialedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialedBroker")
            .field("cached_secrets", &self.secrets.len())
            .field("allow_cross_namespace", &self.allow_cross_namespace)
            .finish_non_exhaustive()
    }
}

impl CredentialedBroker {
    /// Wraps `broker`; Secrets are read through `client`, from the identity's namespace only.
    pub fn new(broker: TokenBroker, client: kube::Client) -> Self {
        Self {
            broker,
            client,
            allow_cross_namespace: false,
            secrets: DashMap::new(),
        }
    }

    /// Also read Secrets another namespace's `clientPassword` names (upstream's behaviour,
    /// `--allow-cross-namespace-secrets`).
    pub fn allow_cross_namespace_secrets(mut self, allow: bool) -> Self {
        self.allow_cross_namespace = allow;
        self
    }

    /// Forgets every cached Secret (an identity went away or changed).
    pub fn forget_secrets(&self) {
        self.secrets.clear();
    }

    async fn secret(&self, namespace: &str, name: &str) -> Result<Arc<ReadSecret>, String> {
        let key = (namespace.to_owned(), name.to_owned());
        if let Some(entry) = self.secrets.get(&key)
            && entry.0.elapsed() < SECRET_TTL
        {
            return Ok(Arc::clone(&entry.1));
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let secret = api
            .get(name)
            .await
            .map_err(|e| format!("reading Secret {namespace}/{name}: {}", kube_reason(&e)))?;
        let read = Arc::new(ReadSecret::new(
            namespace,
            name,
            &secret.data.unwrap_or_default(),
        ));
        self.secrets
            .insert(key, (Instant::now(), Arc::clone(&read)));
        Ok(read)
    }

    /// The credential of a type 1 or 2 identity and its origin; `None` for other types.
    async fn credential(
        &self,
        identity: &AzureIdentity,
    ) -> Result<Option<(Credential, Arc<CredentialOrigin>)>, BrokerError> {
        if !identity.identity_type().has_secret_credential() {
            return Ok(None);
        }
        let client_id = identity.spec.client_id.clone().unwrap_or_default();
        let config = |reason: String| BrokerError::Config {
            client_id: client_id.clone(),
            reason,
        };
        let Some(reference) = identity.spec.client_password.as_ref() else {
            return Err(config("spec.clientPassword names no Secret".to_owned()));
        };
        let name = reference.name.clone().unwrap_or_default();
        let own = identity.metadata.namespace.as_deref().unwrap_or("default");
        let namespace = reference
            .namespace
            .as_deref()
            .filter(|ns| !ns.is_empty())
            .unwrap_or(own);
        if namespace != own && !self.allow_cross_namespace {
            return Err(config(format!(
                "spec.clientPassword names Secret {namespace}/{name} outside the identity's namespace {own:?}: nmi reads credentials only from the identity's own namespace (the operator can restore upstream's cross-namespace references with nmi's --allow-cross-namespace-secrets)"
            )));
        }
        let read = self.secret(namespace, &name).await.map_err(&config)?;
        let derived = if identity.identity_type() == IdentityType::ServicePrincipal {
            &read.client_secret
        } else {
            &read.certificate
        };
        derived.clone().map(Some).map_err(config)
    }
}

fn kube_reason(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => format!("{} ({})", status.reason, status.code),
        other => other.to_string(),
    }
}

impl TokenProvider for CredentialedBroker {
    fn tokens<'a>(&'a self, request: TokenRequest<'a>) -> TokenFuture<'a> {
        Box::pin(async move {
            let TokenTarget::Identity(identity) = request.target else {
                return TokenProvider::tokens(&self.broker, request).await;
            };
            if request.federated.is_some() {
                // Federated: no Secret is read, the broker exchanges a service-account token.
                return TokenProvider::tokens(&self.broker, request).await;
            }
            let Some((credential, origin)) = self.credential(identity).await? else {
                return TokenProvider::tokens(&self.broker, request).await;
            };
            let mut spec = identity_spec(identity, credential);
            spec.origin = Some(origin);
            let spec = Arc::new(spec);
            let issued = requester(request.pod)
                .scope(self.broker.issue(&spec, request.resource))
                .await?;
            Ok(Issued {
                tokens: issued.tokens,
                cache_hit: Some(issued.cached),
            })
        })
    }

    /// Types 1 and 2 read their Secret on every request (a deleted or changed Secret stops
    /// or changes the identity at once), so only the other targets are answered from the
    /// cache here.
    fn cached(&self, request: &TokenRequest<'_>) -> Option<Issued> {
        if let TokenTarget::Identity(identity) = request.target
            && request.federated.is_none()
            && identity.identity_type().has_secret_credential()
        {
            return None;
        }
        TokenProvider::cached(&self.broker, request)
    }

    fn stats(&self) -> Option<Arc<BrokerStats>> {
        Some(Arc::clone(self.broker.stats()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use podid_broker::{
        FetchRequest, Secret as SecretValue, SourceFuture, SourceKind, Token, TokenSource,
    };
    use podid_select::matching::CallerPod;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[derive(Debug, Default)]
    struct Counting(AtomicU64);

    impl TokenSource for Counting {
        fn kind(&self) -> SourceKind {
            SourceKind::Imds
        }

        fn fetch<'a>(&'a self, request: &'a FetchRequest) -> SourceFuture<'a> {
            self.0.fetch_add(1, Ordering::Relaxed);
            let resource = request.resource.clone();
            Box::pin(async move { Ok(Token::new("eyJ.a.b", resource, u64::MAX / 2)) })
        }
    }

    /// A cache hit is answered without a future for identities without a Secret; types 1 and 2
    /// always take the full path, which reads their Secret (here: an API server that is not
    /// there, so the request fails instead of serving the cached token).
    #[tokio::test]
    async fn cache_hits_skip_the_future_but_never_the_secret_read() {
        let source = Arc::new(Counting::default());
        let broker = TokenBroker::new(
            BrokerConfig::default(),
            Sources::all(source.clone()),
            Arc::new(SystemClock),
        );
        let msi = AzureIdentity::user_assigned("app", "msi", "/subscriptions/s/x/msi", "client-0");
        let sp = AzureIdentity::service_principal(
            "app",
            "sp",
            IdentityType::ServicePrincipal,
            "tenant",
            "client-1",
            "sp-secret",
        );
        for (identity, credential) in [
            (&msi, Credential::None),
            (&sp, Credential::ClientSecret(SecretValue::new("hunter2"))),
        ] {
            let spec = identity_spec(identity, credential);
            let spec = Arc::new(
                if identity.identity_type() == IdentityType::ServicePrincipal {
                    spec.with_origin_in("app", "sp-secret")
                } else {
                    spec
                },
            );
            broker
                .tokens(&spec, "https://vault.azure.net")
                .await
                .unwrap();
        }
        assert_eq!(source.0.load(Ordering::Relaxed), 2);
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let credentialed = CredentialedBroker::new(broker, kube::Client::try_from(config).unwrap());
        let pod = CallerPod {
            namespace: "app".to_owned(),
            name: "p".to_owned(),
            service_account: String::new(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
        };
        let request = |identity| TokenRequest {
            target: TokenTarget::Identity(identity),
            resource: "https://vault.azure.net",
            pod: &pod,
            federated: None,
        };
        let hit = credentialed.cached(&request(&msi)).unwrap();
        assert_eq!(hit.cache_hit, Some(true));
        assert_eq!(hit.tokens[0].access_token(), "eyJ.a.b");
        assert!(credentialed.cached(&request(&sp)).is_none());
        let error = credentialed.tokens(request(&sp)).await.unwrap_err();
        assert!(error.to_string().contains("sp-secret"), "{error}");
        assert_eq!(source.0.load(Ordering::Relaxed), 2);
    }
    fn data(pairs: &[(&str, &[u8])]) -> BTreeMap<String, ByteString> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), ByteString(v.to_vec())))
            .collect()
    }

    /// Only the documented keys count (upstream sent any single-key Secret as a client
    /// secret, e.g. a pull secret), and each credential's origin is computed once, at read.
    #[test]
    fn only_documented_keys_count_and_the_origin_is_derived_at_read() {
        let pull = ReadSecret::new(
            "kube-system",
            "pull",
            &data(&[(".dockerconfigjson", b"{\"auths\":{}}")]),
        );
        let error = pull
            .client_secret
            .expect_err("a single other key is no secret");
        assert!(error.contains("no clientSecret key"), "{error}");
        assert!(pull.certificate.is_err());
        let no_password = ReadSecret::new("app", "cert", &data(&[("certificate", b"p12")]));
        assert!(
            no_password
                .certificate
                .expect_err("password required")
                .contains("no password key")
        );
        let read = |value: &[u8]| {
            ReadSecret::new("app", "sp", &data(&[("clientSecret", value), ("x", b"y")]))
                .client_secret
                .expect("clientSecret")
        };
        let (credential, origin) = read(b"s3cret\n");
        assert_eq!(
            credential,
            Credential::ClientSecret(SecretValue::new("s3cret"))
        );
        assert_eq!((origin.namespace(), origin.name()), ("app", "sp"));
        assert_eq!(read(b"s3cret").1, origin, "same credential, same origin");
        assert_ne!(read(b"other").1, origin, "other content, other origin");
        let elsewhere = ReadSecret::new("evil", "sp", &data(&[("clientSecret", b"s3cret")]));
        assert_ne!(elsewhere.client_secret.expect("secret").1, origin);
        assert!(!format!("{origin:?}").contains("s3cret"));
    }
}
