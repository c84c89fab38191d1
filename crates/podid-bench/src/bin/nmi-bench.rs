//! `nmi-bench`: the cache-hit throughput, latency and memory of nmi's IMDS server, measured
//! against a minimal hyper server in the same run (`make bench`, docs/performance.md "nmi").
//!
//! Everything runs in this one process on 127.0.0.1: the real [`serve`] with a real
//! [`PodIndex`] (110 pods, this process's 127.0.0.1 is one of them), a real [`MatchIndex`]
//! (500 identities, bindings and assignments) and a real [`TokenBroker`] whose only source is
//! an in-process fake that counts its calls, so every measured request takes the broker's
//! cache-hit path. `--pods`, `--identities` and `--used-identities` change that shape (the
//! largest node: `--pods 250 --identities 2000 --used-identities 500`, the unused identities
//! and their bindings in the indexes only). The load client opens keep-alive HTTP/1.1 connections and writes raw
//! requests; it shares the machine (and the runtime) with the server it measures, as does the
//! baseline, so the ratio between the two is the figure to read; the two servers are loaded in
//! alternating one-second turns so both see the same machine. Each server is loaded twice:
//! with many connections (throughput) and with a few (latency at light load, where the p99
//! target applies). A counting global allocator gives the heap allocations per request of the
//! whole process (server and load client) for each run.
//!
//! A last phase measures one pod's share of the node (docs/security.md, "One pod starving the
//! node"): the quiet pod (127.0.0.1) loads nmi with the light-load connections alone, then
//! while a noisy pod (127.0.0.2, pod 1) keeps trying to hold 1024 idle connections and churns
//! through 1,000 distinct resources, each a miss that waits for a turn in an IMDS budget of
//! the real limiter (5 concurrent, 20 per second, 50 ms per call); it prints the quiet pod's
//! p50 and p99 in both and their ratio, and counts the quiet pod's refusals.
//!
//! Must not depend on the test doubles (`podid-testkit` and friends): the fakes are here.

use std::alloc::System;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail, ensure};
use bytes::Bytes;
use clap::Parser;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Pod, PodIP, PodSpec, PodStatus};
use podid_api::{
    AssignedIdentityState, AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding,
};
use podid_controller::broker::{
    BrokerConfig, BrokerError, Credential, FetchRequest, ImdsLimiter, LimiterConfig, SourceFuture,
    SourceKind, Sources, SystemClock, Token, TokenBroker, TokenSource,
};
use podid_imds::ErrorOptions;
use podid_nmi::health::Health;
use podid_nmi::metrics::Metrics;
use podid_nmi::pods::PodIndex;
use podid_nmi::provider::identity_spec;
use podid_nmi::server::{Limits, NmiState, ServerOptions, serve};
use podid_nmi::state::Matcher;
use podid_select::assigned::AssignedBindings;
use podid_select::matching::{MatchIndex, MatchOptions};
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

const NAMESPACES: usize = 10;
const RESOURCE: &str = "https://vault.azure.net";
const REQUEST: &str = "GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\nUser-Agent: nmi-bench\r\n\r\n";
/// Length of the fake access tokens: the size of a typical Entra access token.
const TOKEN_LEN: usize = 1400;
const MIB: f64 = 1024.0 * 1024.0;

/// Counts every heap allocation of the process (server and load client alike).
#[global_allocator]
static ALLOCATOR: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Heap allocations made by the process so far.
fn allocations() -> usize {
    ALLOCATOR.stats().allocations + ALLOCATOR.stats().reallocations
}

/// Measure nmi's IMDS cache-hit path against a minimal hyper server.
#[derive(Debug, Parser)]
struct Args {
    /// Seconds of load per server.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent keep-alive connections of the throughput run.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Concurrent keep-alive connections of the light-load (latency) run.
    #[arg(long, default_value_t = 4)]
    light_connections: usize,
    /// Seconds of the quiet pod's load in each half of the noisy-neighbour phase (0: skip it).
    #[arg(long, default_value_t = 5)]
    noisy_seconds: u64,
    /// Running pods on the node (the bench's own 127.0.0.1 is pod 0).
    #[arg(long, default_value_t = 110)]
    pods: usize,
    /// AzureIdentities (and bindings) in the cluster.
    #[arg(long, default_value_t = 500)]
    identities: usize,
    /// Of those, the identities this node's pods use (an assignment and a cached token each;
    /// default: all). The others are bound to selectors no pod on the node carries.
    #[arg(long)]
    used_identities: Option<usize>,
    /// The RSS-after-setup target printed, MiB.
    #[arg(long, default_value_t = 30.0)]
    target_rss_mib: f64,
}

/// The node and cluster the bench builds.
#[derive(Debug, Clone, Copy)]
struct Shape {
    pods: usize,
    identities: usize,
    used: usize,
}

/// The noisy pod's source address (pod 1).
const NOISY_IP: [u8; 4] = [127, 0, 0, 2];
/// Idle connections the noisy pod tries to hold.
const NOISY_HELD: usize = 1024;
/// The noisy pod's concurrent requests for distinct resources.
const NOISY_CHURNERS: usize = 32;
/// Distinct resources the noisy pod asks for.
const NOISY_RESOURCES: u64 = 1000;

/// A token source that answers at once and counts its calls; once `limited`, each call first
/// takes a turn in `limiter` and lasts 50 ms, like a call to IMDS.
#[derive(Debug)]
struct CountingSource {
    calls: AtomicU64,
    limited: std::sync::atomic::AtomicBool,
    limiter: ImdsLimiter,
}

impl Default for CountingSource {
    fn default() -> Self {
        Self {
            calls: AtomicU64::new(0),
            limited: std::sync::atomic::AtomicBool::new(false),
            limiter: ImdsLimiter::new(LimiterConfig::default()),
        }
    }
}

impl TokenSource for CountingSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Imds
    }

    fn fetch<'a>(&'a self, request: &'a FetchRequest) -> SourceFuture<'a> {
        Box::pin(async move {
            if self.limited.load(Ordering::Relaxed) {
                let _turn = self
                    .limiter
                    .acquire_for(request.requester.clone())
                    .await
                    .map_err(|e| BrokerError::Unavailable {
                        source_kind: SourceKind::Imds,
                        client_id: request.identity.client_id.clone(),
                        reason: e.to_string(),
                        retry_after: None,
                    })?;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let n = self.calls.fetch_add(1, Ordering::Relaxed);
            let mut access = format!("bench-token-{}-{n}-", request.identity.client_id);
            while access.len() < TOKEN_LEN {
                access.push('x');
            }
            Ok::<_, BrokerError>(Token::new(
                access,
                request.resource.clone(),
                unix_now() + 86_400,
            ))
        })
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn pod(i: usize) -> Pod {
    // Pod 0 is this process: its address is the load client's; pod 1 is the noisy pod.
    let ip = if i == 0 {
        "127.0.0.1".to_owned()
    } else if i == 1 {
        std::net::Ipv4Addr::from(NOISY_IP).to_string()
    } else {
        format!("10.244.{}.{}", i / 250, i % 250 + 1)
    };
    let mut p = Pod::default();
    p.metadata.namespace = Some(format!("ns-{}", i % NAMESPACES));
    p.metadata.name = Some(format!("pod-{i}"));
    p.metadata.labels = Some(
        [
            ("aadpodidbinding".to_owned(), format!("sel-{i}")),
            ("app".to_owned(), format!("app-{i}")),
        ]
        .into(),
    );
    p.spec = Some(PodSpec {
        service_account_name: Some(format!("sa-{i}")),
        ..Default::default()
    });
    p.status = Some(PodStatus {
        phase: Some("Running".into()),
        pod_ip: Some(ip.clone()),
        pod_ips: Some(vec![PodIP { ip }]),
        ..Default::default()
    });
    p
}

/// Identity `j < used` lives in pod `j % pods`'s namespace, is bound to that pod's selector
/// and assigned to it; identity `j ≥ used` is bound to a selector no pod on the node carries
/// (it is in the indexes, not in the assignments or the token cache).
struct Objects {
    identities: Vec<Arc<AzureIdentity>>,
    bindings: Vec<Arc<AzureIdentityBinding>>,
    assignments: Vec<Arc<AzureAssignedIdentity>>,
}

fn objects(shape: Shape) -> Objects {
    let mut out = Objects {
        identities: Vec::with_capacity(shape.identities),
        bindings: Vec::with_capacity(shape.identities),
        assignments: Vec::with_capacity(shape.used),
    };
    for j in 0..shape.identities {
        let owner = j % shape.pods;
        let ns = format!("ns-{}", owner % NAMESPACES);
        let name = format!("id-{j}");
        let client_id = format!("{j:08x}-0000-4000-8000-{j:012x}");
        let resource_id = format!(
            "/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
        );
        let identity = AzureIdentity::user_assigned(&ns, &name, &resource_id, &client_id);
        let selector = if j < shape.used {
            format!("sel-{owner}")
        } else {
            format!("sel-elsewhere-{j}")
        };
        let binding =
            AzureIdentityBinding::for_selector(&ns, &format!("{name}-binding"), &name, &selector);
        let mut assigned = AzureAssignedIdentity::for_pod(
            "default",
            &format!("pod-{owner}"),
            &ns,
            "node-0",
            identity.clone(),
            binding.clone(),
        );
        if let Some(status) = assigned.status.as_mut() {
            status.status = Some(AssignedIdentityState::Assigned);
        }
        out.identities.push(Arc::new(identity));
        out.bindings.push(Arc::new(binding));
        if j < shape.used {
            out.assignments.push(Arc::new(assigned));
        }
    }
    out
}

/// VmRSS of this process, bytes.
fn rss_bytes() -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS in /proc/self/status")?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .context("parsing VmRSS")?;
    Ok(kib * 1024)
}

/// Read one response from `stream` (buffer `buf` keeps bytes past it); its status and body length.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<(u16, usize)> {
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed mid-response");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("response head is not UTF-8")?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status code")?;
    let length: usize = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .context("no Content-Length")?;
    let total = head_end + length;
    while buf.len() < total {
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed mid-body");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    buf.drain(..total);
    Ok((status, length))
}

/// One request on a fresh connection; the status and body length.
async fn probe(addr: SocketAddr) -> anyhow::Result<(u16, usize)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(REQUEST.as_bytes()).await?;
    let mut buf = Vec::new();
    read_response(&mut stream, &mut buf).await
}

/// Figures of one load run.
#[derive(Debug)]
struct Run {
    requests: u64,
    errors: u64,
    rps: f64,
    p50: Duration,
    p99: Duration,
    /// Heap allocations per request (server and client together).
    allocs_per_request: f64,
}

/// What one slice of load measured.
#[derive(Debug, Default)]
struct Slice {
    latencies: Vec<Duration>,
    errors: u64,
    elapsed: Duration,
    allocations: usize,
}

impl Slice {
    fn add(&mut self, other: Slice) {
        self.latencies.extend(other.latencies);
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        self.allocations += other.allocations;
    }

    fn run(mut self) -> anyhow::Result<Run> {
        let all = &mut self.latencies;
        ensure!(!all.is_empty(), "no request completed");
        all.sort_unstable();
        let at = |q: f64| {
            // Nearest-rank percentile.
            let rank = ((q * all.len() as f64).ceil() as usize).clamp(1, all.len());
            all[rank - 1]
        };
        let requests = all.len() as u64;
        Ok(Run {
            requests,
            errors: self.errors,
            rps: requests as f64 / self.elapsed.as_secs_f64(),
            p50: at(0.50),
            p99: at(0.99),
            allocs_per_request: self.allocations as f64 / requests as f64,
        })
    }
}

/// Load `a` and `b` in turns of one second each, `seconds` turns per server, so both see the
/// same share of whatever else the (shared) machine is doing.
async fn interleaved(
    a: SocketAddr,
    b: SocketAddr,
    connections: usize,
    seconds: u64,
) -> anyhow::Result<(Run, Run)> {
    let (mut on_a, mut on_b) = (Slice::default(), Slice::default());
    for _ in 0..seconds {
        on_a.add(load(a, connections, Duration::from_secs(1)).await?);
        on_b.add(load(b, connections, Duration::from_secs(1)).await?);
    }
    Ok((on_a.run()?, on_b.run()?))
}

/// `connections` keep-alive connections sending requests back to back for `duration`.
async fn load(addr: SocketAddr, connections: usize, duration: Duration) -> anyhow::Result<Slice> {
    let allocs_before = allocations();
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        tasks.spawn(async move {
            let mut stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let mut buf = Vec::with_capacity(16 * 1024);
            let mut latencies = Vec::with_capacity(64 * 1024);
            let mut errors = 0u64;
            loop {
                let sent = Instant::now();
                if sent >= deadline {
                    break;
                }
                stream.write_all(REQUEST.as_bytes()).await?;
                let (status, _) = read_response(&mut stream, &mut buf).await?;
                latencies.push(sent.elapsed());
                if status != 200 {
                    errors += 1;
                }
            }
            Ok::<_, anyhow::Error>((latencies, errors))
        });
    }
    let mut all = Vec::new();
    let mut errors = 0;
    while let Some(joined) = tasks.join_next().await {
        let (latencies, e) = joined.context("load task panicked")??;
        all.extend(latencies);
        errors += e;
    }
    Ok(Slice {
        latencies: all,
        errors,
        elapsed: started.elapsed(),
        allocations: allocations().saturating_sub(allocs_before),
    })
}

/// A connection to `addr` from the noisy pod's address.
async fn noisy_connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((NOISY_IP, 0)))?;
    socket.connect(addr).await
}

/// What the noisy pod got.
#[derive(Debug, Default)]
struct Noise {
    tokens: AtomicU64,
    refused: AtomicU64,
    closed: AtomicU64,
}

/// The noisy pod until `stop`: one task keeps trying to hold [`NOISY_HELD`] idle connections
/// (topping up once a second), [`NOISY_CHURNERS`] tasks ask for distinct resources back to
/// back on keep-alive connections (reconnecting 10 ms after a connection closed at accept).
fn spawn_noise(
    addr: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
    noise: Arc<Noise>,
) -> tokio::task::JoinSet<()> {
    let mut tasks = tokio::task::JoinSet::new();
    {
        let stop = Arc::clone(&stop);
        tasks.spawn(async move {
            // The churners connect first (keep-alive, one connection each), then the idle
            // connections take whatever the source may still hold.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut held: Vec<TcpStream> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                held.retain(|s| {
                    let mut byte = [0u8; 1];
                    matches!(s.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                });
                while held.len() < NOISY_HELD {
                    match noisy_connect(addr).await {
                        Ok(stream) => held.push(stream),
                        Err(_) => break,
                    }
                }
                // Top up once a second: a pod holding sockets, not a connect flood (that one
                // costs CPU, which the pod's own cgroup bounds on a real node).
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    let next = Arc::new(AtomicU64::new(0));
    for _ in 0..NOISY_CHURNERS {
        let (stop, noise, next) = (Arc::clone(&stop), Arc::clone(&noise), Arc::clone(&next));
        tasks.spawn(async move {
            let mut buf = Vec::new();
            let mut connection: Option<TcpStream> = None;
            while !stop.load(Ordering::Relaxed) {
                let mut stream = match connection.take() {
                    Some(stream) => stream,
                    None => match noisy_connect(addr).await {
                        Ok(stream) => stream,
                        Err(_) => {
                            noise.refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    },
                };
                let k = next.fetch_add(1, Ordering::Relaxed) % NOISY_RESOURCES;
                let request = format!(
                    "GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fnoisy{k}.example.com HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n\r\n"
                );
                buf.clear();
                let answered = async {
                    stream.write_all(request.as_bytes()).await?;
                    read_response(&mut stream, &mut buf).await
                }
                .await;
                match answered {
                    Ok((status, _)) => {
                        if status == 200 {
                            noise.tokens.fetch_add(1, Ordering::Relaxed);
                        }
                        connection = Some(stream);
                    }
                    Err(_) => {
                        // Closed at accept: the source held too many connections. Retry
                        // after 10 ms, as a client library would, not in a tight loop.
                        noise.closed.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        });
    }
    tasks
}

/// A minimal hyper 1 server answering every request with `body`.
async fn baseline(listener: TcpListener, body: Bytes) {
    while let Ok((stream, _)) = listener.accept().await {
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_: Request<Incoming>| {
                let body = body.clone();
                async move {
                    let mut response = Response::new(Full::new(body));
                    response.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISSED" }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.seconds > 0 && args.connections > 0 && args.light_connections > 0,
        "--seconds, --connections and --light-connections must be positive"
    );
    let shape = Shape {
        pods: args.pods.max(2),
        identities: args.identities.max(1),
        used: args
            .used_identities
            .unwrap_or(args.identities)
            .clamp(1, args.identities.max(1)),
    };
    let (pods_n, identities_n, used_n) = (shape.pods, shape.identities, shape.used);
    let rss_start = rss_bytes()?;

    // ---- nmi: real pod index, matcher, broker and server.
    let pods = Arc::new(PodIndex::new());
    let all_pods: Vec<Pod> = (0..pods_n).map(pod).collect();
    pods.replace_all(&all_pods);
    drop(all_pods);
    pods.mark_synced();
    ensure!(
        pods.len() == pods_n,
        "{} pods indexed, want {pods_n}",
        pods.len()
    );
    let objects = objects(shape);
    let match_options = MatchOptions::default();
    let matcher = Arc::new(Matcher::new(match_options));
    // As nmi's watch loop builds it in standard mode: the index plus the binding copies the
    // assignments record (which the federated-switch check reads).
    matcher.replace_with_assigned(
        MatchIndex::new(
            match_options,
            objects.identities.iter().cloned(),
            objects.bindings.iter().cloned(),
            objects.assignments.iter().cloned(),
            [],
        ),
        AssignedBindings::new(objects.assignments.iter().map(|a| &**a)),
    );
    matcher.mark_synced();
    let source = Arc::new(CountingSource::default());
    let broker = TokenBroker::new(
        BrokerConfig::default(),
        Sources::all(source.clone()),
        Arc::new(SystemClock),
    );
    for identity in objects.identities.iter().take(used_n) {
        let spec = Arc::new(identity_spec(identity, Credential::None));
        broker
            .tokens(&spec, RESOURCE)
            .await
            .with_context(|| format!("warming {:?}", identity.metadata.name))?;
    }
    drop(objects);
    ensure!(
        broker.len() == used_n,
        "{} cache entries, want {used_n}",
        broker.len()
    );
    let options = ServerOptions {
        // Nothing is proxied: every request is a token request.
        metadata: SocketAddr::from(([127, 0, 0, 1], 9)),
        metadata_header_required: true,
        block_instance_metadata: false,
        enable_host_token: false,
        errors: ErrorOptions::default(),
        pod_wait: Duration::from_millis(200),
        pending_wait: Duration::from_secs(1),
        limits: Limits::default(),
        federated_default_tenant: false,
    };
    let health = Arc::new(Health::default());
    health.set_interception_installed(true);
    let state = Arc::new(NmiState::new(
        options,
        pods,
        matcher,
        Arc::new(broker),
        Arc::new(Metrics::new()),
        health,
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let nmi_addr = listener.local_addr()?;
    let (stop_nmi, stopped) = oneshot::channel::<()>();
    let nmi = tokio::spawn(serve(listener, state, async move {
        let _ = stopped.await;
    }));
    let (status, body_len) = probe(nmi_addr).await.context("first nmi request")?;
    ensure!(
        status == 200,
        "nmi answered {status} to the warm-up request"
    );
    let calls_warm = source.calls.load(Ordering::Relaxed);
    ensure!(
        calls_warm == used_n as u64,
        "{calls_warm} source calls after warm-up, want {used_n}"
    );
    let rss_setup = rss_bytes()?;

    // ---- baseline: hyper answering a body of the same size.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let base_addr = listener.local_addr()?;
    let base = tokio::spawn(baseline(listener, Bytes::from(vec![b'x'; body_len])));
    let (status, base_len) = probe(base_addr).await.context("first baseline request")?;
    ensure!(
        status == 200 && base_len == body_len,
        "baseline answered {status} with {base_len} bytes"
    );

    let (nmi_run, base_run) =
        interleaved(nmi_addr, base_addr, args.connections, args.seconds).await?;
    let (nmi_light, base_light) =
        interleaved(nmi_addr, base_addr, args.light_connections, args.seconds).await?;
    let calls_after = source.calls.load(Ordering::Relaxed);
    let rss_after_load = rss_bytes()?;

    // ---- one pod's share: the quiet pod alone, then beside the noisy pod.
    let noisy = if args.noisy_seconds > 0 {
        source.limited.store(true, Ordering::Relaxed);
        let mut alone = Slice::default();
        for _ in 0..args.noisy_seconds {
            alone.add(load(nmi_addr, args.light_connections, Duration::from_secs(1)).await?);
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let noise = Arc::new(Noise::default());
        let mut tasks = spawn_noise(nmi_addr, Arc::clone(&stop), Arc::clone(&noise));
        // Let the noise fill the connections and the budget's queue first.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut beside = Slice::default();
        for _ in 0..args.noisy_seconds {
            beside.add(load(nmi_addr, args.light_connections, Duration::from_secs(1)).await?);
        }
        stop.store(true, Ordering::Relaxed);
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        Some((alone.run()?, beside.run()?, noise))
    } else {
        None
    };
    base.abort();
    let _ = stop_nmi.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), nmi).await;

    let ratio = nmi_run.rps / base_run.rps;
    let p99_ratio = nmi_run.p99.as_secs_f64() / base_run.p99.as_secs_f64();
    let light_ratio = nmi_light.rps / base_light.rps;
    let light_p99_ratio = nmi_light.p99.as_secs_f64() / base_light.p99.as_secs_f64();
    println!(
        "nmi cache-hit benchmark: {} and {} keep-alive connections, {} s per server and load (1 s turns, nmi and baseline alternating), {} pods, {} identities ({} used on the node), token body {} bytes, {} CPUs",
        args.connections,
        args.light_connections,
        args.seconds,
        pods_n,
        identities_n,
        used_n,
        body_len,
        std::thread::available_parallelism().map_or(0, usize::from),
    );
    println!();
    println!(
        "{:<10} {:>6} {:>10} {:>7} {:>10} {:>8} {:>8} {:>11}",
        "server", "conns", "requests", "errors", "req/s", "p50 ms", "p99 ms", "allocs/req"
    );
    for (name, connections, run) in [
        ("nmi", args.connections, &nmi_run),
        ("baseline", args.connections, &base_run),
        ("nmi", args.light_connections, &nmi_light),
        ("baseline", args.light_connections, &base_light),
    ] {
        println!(
            "{:<10} {:>6} {:>10} {:>7} {:>10.0} {:>8.3} {:>8.3} {:>11.1}",
            name,
            connections,
            run.requests,
            run.errors,
            run.rps,
            ms(run.p50),
            ms(run.p99),
            run.allocs_per_request,
        );
    }
    println!();
    println!(
        "throughput ratio nmi/baseline  {ratio:>8.2}   target >= 0.8   {}  ({} connections)",
        verdict(ratio >= 0.8),
        args.connections
    );
    println!(
        "p99 ratio nmi/baseline         {p99_ratio:>8.2}   ({} connections)",
        args.connections
    );
    println!(
        "throughput ratio nmi/baseline  {light_ratio:>8.2}   ({} connections)",
        args.light_connections
    );
    println!(
        "p99 ratio nmi/baseline         {light_p99_ratio:>8.2}   ({} connections)",
        args.light_connections
    );
    println!(
        "nmi p99, light load            {:>8.3} ms  target < 1 ms   {}  ({} connections)",
        ms(nmi_light.p99),
        verdict(nmi_light.p99 < Duration::from_millis(1)),
        args.light_connections
    );
    println!(
        "nmi p99, heavy load            {:>8.3} ms  ({} connections; bounded by Little's law, see docs/performance.md)",
        ms(nmi_run.p99),
        args.connections
    );
    println!(
        "allocations per request        nmi {:.1}, baseline {:.1} (whole process, load client included)",
        nmi_run.allocs_per_request, base_run.allocs_per_request
    );
    println!(
        "token source calls             {calls_warm} after warm-up, {calls_after} after load (every measured request was a cache hit: {})",
        calls_after == calls_warm
    );
    let setup_mib = rss_setup as f64 / MIB;
    println!(
        "VmRSS before setup             {:>8.1} MiB",
        rss_start as f64 / MIB
    );
    println!(
        "VmRSS after setup              {setup_mib:>8.1} MiB  target < {} MiB {}  (+{:.1} MiB: {pods_n} pods, {identities_n} identities/bindings, {used_n} assignments, {used_n} cached tokens; measured before the load client started)",
        args.target_rss_mib,
        verdict(setup_mib < args.target_rss_mib),
        (rss_setup.saturating_sub(rss_start)) as f64 / MIB,
    );
    println!(
        "VmRSS after the loads          {:>8.1} MiB  (includes the in-process load client and the baseline server)",
        rss_after_load as f64 / MIB
    );
    if let Some((alone, beside, noise)) = &noisy {
        println!();
        println!(
            "one pod's share: quiet pod (127.0.0.1, {} keep-alive connections, cache hits) alone, then beside a noisy pod (127.0.0.2) holding up to {NOISY_HELD} idle connections and churning {NOISY_RESOURCES} resources with {NOISY_CHURNERS} keep-alive requests at a time through a 5-concurrent, 20/s, 50 ms IMDS budget; {} s each",
            args.light_connections, args.noisy_seconds
        );
        println!(
            "{:<22} {:>10} {:>7} {:>8} {:>8}",
            "quiet pod", "requests", "errors", "p50 ms", "p99 ms"
        );
        for (name, run) in [("alone", alone), ("beside the noisy pod", beside)] {
            println!(
                "{:<22} {:>10} {:>7} {:>8.3} {:>8.3}",
                name,
                run.requests,
                run.errors,
                ms(run.p50),
                ms(run.p99)
            );
        }
        let p99_ratio = beside.p99.as_secs_f64() / alone.p99.as_secs_f64();
        println!(
            "quiet p99 ratio noisy/alone    {p99_ratio:>8.2}   target <= 2   {}",
            verdict(p99_ratio <= 2.0)
        );
        println!(
            "quiet p50 ratio noisy/alone    {:>8.2}",
            beside.p50.as_secs_f64() / alone.p50.as_secs_f64()
        );
        println!(
            "noisy pod                      {} tokens, {} connections closed at accept, {} connects failed",
            noise.tokens.load(Ordering::Relaxed),
            noise.closed.load(Ordering::Relaxed),
            noise.refused.load(Ordering::Relaxed)
        );
        ensure!(
            alone.errors == 0 && beside.errors == 0,
            "the quiet pod was refused {} times",
            alone.errors + beside.errors
        );
    }
    ensure!(
        nmi_run.errors == 0 && nmi_light.errors == 0,
        "nmi answered {} requests with an error",
        nmi_run.errors + nmi_light.errors
    );
    Ok(())
}
