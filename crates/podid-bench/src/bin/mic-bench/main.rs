//! `mic-bench`: the real `mic` binary at cluster scale against the fake API server and the
//! simulated Entra and ARM (`make bench`, docs/performance.md "mic").
//!
//! One run measures two clusters, each with a fresh fake API server, simulated Azure and `mic`
//! process: a baseline of one scale set (10 nodes, 50 identities, 100 bindings, 500 pods) and
//! the full cluster of ten such scale sets (100 nodes, 500 identities, 1,000 bindings, 5,000
//! pods). Identities are partitioned by scale set: the pods of scale set `s` only use the 50
//! identities of partition `s`, so no scale set needs more than 50 identities (ARM allows 150
//! per request). For each cluster it reports:
//!
//! - phase 1: from the `mic` process start to every expected `AzureAssignedIdentity` being
//!   `Assigned` and every scale set carrying exactly its identities;
//! - phase 2: 10 % of the pods deleted (every pod of 5 identities per scale set, so those
//!   identities must leave their scale set) until the survivors are all `Assigned`, the rest
//!   gone and the scale sets carry only what is still used;
//! - ARM GETs and PATCHes per scale set, controller passes (mic's `pass done` log lines),
//!   API-server requests by verb, and `mic`'s `VmRSS` / `VmHWM` from `/proc/<pid>/status`.
//!
//! mic runs with `--clientQps` 10000 (`--client-qps`): at mic's default of 5 (upstream's), a
//! first convergence is bound by the client-side rate, not by mic. For each cluster the bench
//! also prints what the measured phase-1 requests would take at the default rate.
//!
//! The fake API server and the simulators run in this process; `mic` runs as a child process
//! on 127.0.0.1, killed on every way out (a drop guard, and Ctrl-C).
//!
//! It lives in the `podid-bench` crate, so the test doubles are never dependencies of the
//! shipped `mic`; `mic` is found next to this executable (build both:
//! `cargo build --release -p podid-mic -p podid-bench --bins`).
//!
//! `world` builds a cluster and its simulated Azure and waits for mic to converge, `mic` runs
//! the `mic` child process, `report` prints the figures; this file runs the clusters.

mod mic;
mod report;
mod world;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;

use report::{DEFAULT_QPS, Figures, report};
use world::{Scale, World};

/// Run `mic` at scale against the fake API server and the simulated ARM.
#[derive(Debug, Parser)]
struct Args {
    /// Scale sets of the full cluster (10 nodes, 50 identities, 100 bindings and 500 pods
    /// each); the baseline has one.
    #[arg(long, default_value_t = 10)]
    scale_sets: usize,
    /// Seconds to wait for a phase to converge before reporting it as not converged.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// The `mic` binary (default: `mic` next to this executable).
    #[arg(long)]
    mic: Option<PathBuf>,
    /// Also run the baseline (one scale set) for the ratio.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    baseline: bool,
    /// Append mic's JSON log lines to this file (for profiling; default: kept in memory only).
    #[arg(long)]
    mic_log: Option<PathBuf>,
    /// `--clientQps` given to mic: high, so that the figures measure mic rather than its
    /// client-side rate limit (mic's default, as upstream's, is 5).
    #[arg(long, default_value_t = 10_000.0)]
    client_qps: f64,
    /// Nodes per scale set.
    #[arg(long, default_value_t = 10)]
    nodes_per_set: usize,
    /// Identities per scale set (the pods of a set use only its own; at most 150, ARM's limit
    /// per request, so that a set needs one PATCH).
    #[arg(long, default_value_t = 50)]
    identities_per_set: usize,
    /// Bindings per scale set (binding `j` uses identity `j % identities`).
    #[arg(long, default_value_t = 100)]
    bindings_per_set: usize,
    /// Pods per scale set (pod `p` uses binding `p % bindings`, on node `p % nodes`).
    #[arg(long, default_value_t = 500)]
    pods_per_set: usize,
    /// The convergence target printed for the full cluster, in seconds (both phases).
    #[arg(long, default_value_t = 5.0)]
    target_seconds: f64,
    /// The peak-RSS target printed for the full cluster, in MiB.
    #[arg(long, default_value_t = 150.0)]
    target_rss_mib: f64,
    /// `--identity-release-grace-period` given to mic: none by default, so that phase 2
    /// measures mic's release path rather than the grace period (mic's default is 5m).
    #[arg(long, default_value = "0s")]
    release_grace_period: String,
}

async fn run_cluster(
    scale: Scale,
    mic_path: &Path,
    args: &Args,
    timeout: Duration,
) -> anyhow::Result<Figures> {
    let world = World::build(scale).await?;
    let mut mic = world.spawn_mic(
        mic_path,
        args.client_qps,
        &args.release_grace_period,
        args.mic_log.as_deref(),
    )?;
    let started = Instant::now();
    let create = world
        .phase(
            &mut mic,
            started,
            scale.pods(),
            &world.expected_on_sets(0),
            timeout,
        )
        .await?;
    let synced = mic.log().synced.map(|t| t.duration_since(started));

    let released = scale.released_identities_per_set();
    // The clock starts before the first deletion: mic sees the first events at once.
    let started = Instant::now();
    let deleted = world.delete_pods(released)?;
    let delete = world
        .phase(
            &mut mic,
            started,
            scale.pods() - deleted,
            &world.expected_on_sets(released),
            timeout,
        )
        .await?;
    if mic.log().warnings > 0 {
        eprintln!(
            "note: mic logged {} warnings/errors; last lines:\n{}",
            mic.log().warnings,
            mic.log().tail.join("\n")
        );
    }
    drop(mic);
    Ok(Figures {
        scale,
        synced,
        create,
        delete,
    })
}

fn mic_binary(args: &Args) -> anyhow::Result<PathBuf> {
    let path = match &args.mic {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .context("locating this executable")?
            .with_file_name("mic"),
    };
    if !path.is_file() {
        bail!(
            "{} not found: build it first with `cargo build --release -p podid-mic -p podid-bench --bins`, or pass --mic",
            path.display()
        );
    }
    Ok(path)
}

async fn bench(args: Args) -> anyhow::Result<()> {
    podid_azure_sim::install_crypto_provider();
    let mic = mic_binary(&args)?;
    let timeout = Duration::from_secs(args.timeout);
    println!(
        "mic scale benchmark: real mic ({}) against the in-process fake API server and simulated Entra/ARM (zero latency), {} CPUs",
        mic.display(),
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    println!(
        "mic runs with --clientQps {} (its default, as upstream's, is {DEFAULT_QPS}: a first convergence would be bound by that rate; see \"at --clientQps {DEFAULT_QPS}\")",
        args.client_qps
    );
    let baseline = if args.baseline {
        let scale = Scale::with_sets(1, &args);
        eprintln!("running the baseline: {}", scale.describe());
        Some(run_cluster(scale, &mic, &args, timeout).await?)
    } else {
        None
    };
    let scale = Scale::with_sets(args.scale_sets, &args);
    eprintln!("running the full cluster: {}", scale.describe());
    let full = run_cluster(scale, &mic, &args, timeout).await?;
    report(&full, baseline.as_ref(), &args);
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("mic-bench: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        tokio::select! {
            r = bench(args) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mic-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
