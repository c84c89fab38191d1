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
//!
//! `node` builds the node and cluster (pods, match index objects, the counting token source),
//! `load` is the load client, `noise` the noisy pod and `baseline` the hyper server; this file
//! puts them together and prints the figures.

mod baseline;
mod load;
mod node;
mod noise;

use std::alloc::System;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use bytes::Bytes;
use clap::Parser;
use k8s_openapi::api::core::v1::Pod;
use podid_broker::{BrokerConfig, Credential, Sources, SystemClock, TokenBroker};
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
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use baseline::baseline;
use load::{RESOURCE, Slice, interleaved, load, probe};
use node::{CountingSource, Shape, objects, pod};
use noise::{NOISY_CHURNERS, NOISY_HELD, NOISY_RESOURCES, Noise, spawn_noise};

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
