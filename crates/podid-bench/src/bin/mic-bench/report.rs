//! What a run measured and how it is printed: per phase, per cluster, and against the targets.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::Args;
use crate::world::Scale;

const MIB: f64 = 1024.0;

/// mic's (and upstream's) default `--clientQps`; the burst is the same integer.
pub(crate) const DEFAULT_QPS: f64 = 5.0;

/// What one phase cost.
#[derive(Debug, Clone, Default)]
pub(crate) struct Phase {
    /// Time to convergence (`None`: not converged within the timeout).
    pub(crate) converged: Option<Duration>,
    /// ARM GETs per scale set during the phase.
    pub(crate) gets: Vec<u64>,
    /// ARM PATCHes per scale set during the phase.
    pub(crate) patches: Vec<u64>,
    /// mic passes that did something (its `pass done` log lines) during the phase.
    pub(crate) passes: usize,
    /// API-server requests by verb and resource during the phase.
    pub(crate) api: BTreeMap<String, usize>,
    /// CPU seconds used by mic during the phase.
    pub(crate) mic_cpu: f64,
    /// CPU seconds used by this process (fake API server, simulators, polling) in the phase.
    pub(crate) bench_cpu: f64,
    /// mic's VmRSS at the end of the phase (KiB).
    pub(crate) rss_kib: u64,
    /// mic's VmHWM at the end of the phase (KiB).
    pub(crate) hwm_kib: u64,
    /// What was still missing when the phase timed out.
    pub(crate) missing: String,
}

/// What one cluster run measured.
#[derive(Debug, Clone)]
pub(crate) struct Figures {
    pub(crate) scale: Scale,
    /// mic start → its caches synced (its `caches synced` log line).
    pub(crate) synced: Option<Duration>,
    pub(crate) create: Phase,
    pub(crate) delete: Phase,
}

fn secs(d: Option<Duration>) -> String {
    d.map_or_else(
        || "timeout".to_owned(),
        |d| format!("{:.2} s", d.as_secs_f64()),
    )
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISSED" }
}

fn print_phase(name: &str, phase: &Phase, scale: &Scale, released: usize) {
    let total_gets: u64 = phase.gets.iter().sum();
    let total_patches: u64 = phase.patches.iter().sum();
    let max_patches = phase.patches.iter().copied().max().unwrap_or(0);
    let max_gets = phase.gets.iter().copied().max().unwrap_or(0);
    let api: Vec<String> = phase.api.iter().map(|(v, n)| format!("{v} {n}")).collect();
    println!(
        "  {name:<28} {}{}",
        secs(phase.converged),
        if phase.missing.is_empty() {
            String::new()
        } else {
            format!("  (still: {})", phase.missing)
        }
    );
    println!(
        "  {:<28} {total_patches} PATCH, {total_gets} GET; per scale set PATCH max {max_patches}, GET max {max_gets} ({} scale sets{})",
        "  ARM calls",
        scale.scale_sets,
        if released > 0 {
            format!(", {released} identities to release on each")
        } else {
            String::new()
        }
    );
    println!("  {:<28} PATCH {:?}", "  ARM per scale set", phase.patches);
    println!("  {:<28} GET   {:?}", "", phase.gets);
    println!("  {:<28} {}", "  mic passes (pass done)", phase.passes);
    println!("  {:<28} {}", "  API requests", api.join(", "));
    println!(
        "  {:<28} mic {:.2} s, bench process {:.2} s (fake API server, simulators, polling)",
        "  CPU time", phase.mic_cpu, phase.bench_cpu
    );
    println!(
        "  {:<28} VmRSS {:.1} MiB, VmHWM {:.1} MiB",
        "  mic memory at the end",
        phase.rss_kib as f64 / MIB,
        phase.hwm_kib as f64 / MIB
    );
}

fn print_cluster(name: &str, figures: &Figures) {
    println!("{name}: {}", figures.scale.describe());
    println!(
        "  {:<28} {}",
        "mic start -> caches synced",
        secs(figures.synced)
    );
    print_phase(
        "mic start -> all Assigned",
        &figures.create,
        &figures.scale,
        0,
    );
    let deleted = figures.scale.pods() / 10;
    print_phase(
        &format!("delete {deleted} pods -> converged"),
        &figures.delete,
        &figures.scale,
        figures.scale.released_identities_per_set(),
    );
    let limited = rate_limited(&figures.create.api);
    println!(
        "  {:<28} phase 1 sent {limited} rate-limited requests: at least {:.0} s at the default rate (burst {DEFAULT_QPS}, then {DEFAULT_QPS}/s)",
        format!("at --clientQps {DEFAULT_QPS}"),
        at_default_rate(limited).as_secs_f64()
    );
    let writes = writes(&figures.create.api);
    println!(
        "  {:<28} phase 1 wrote {writes} times for {} assignments: {:.3} writes per assignment (creates, updates, patches, deletes of any kind, events included; leader election's Lease and Endpoints excluded)",
        "writes per assignment",
        figures.scale.pods(),
        writes as f64 / figures.scale.pods().max(1) as f64
    );
}

/// Whether a request (`<verb> <resource>`) is leader election's: the Lease, or upstream's
/// Endpoints lock (`--upstream-leader-lock`). Both are exempt from `--clientQps`.
fn leader_election(verb: &str) -> bool {
    verb.ends_with(" leases") || verb.ends_with(" endpoints")
}

/// Write requests of a phase (create, update, patch, delete of any resource, events
/// included), leader election's excluded.
pub(crate) fn writes(api: &BTreeMap<String, usize>) -> usize {
    api.iter()
        .filter(|(verb, _)| !leader_election(verb))
        .filter(|(verb, _)| {
            ["create ", "update ", "patch ", "delete "]
                .iter()
                .any(|w| verb.starts_with(w))
        })
        .map(|(_, n)| n)
        .sum()
}

/// Requests of a phase that `--clientQps` governs: all but leader election's and watches.
fn rate_limited(api: &BTreeMap<String, usize>) -> usize {
    api.iter()
        .filter(|(verb, _)| !leader_election(verb) && !verb.starts_with("watch "))
        .map(|(_, n)| n)
        .sum()
}

/// The least time `requests` take through a token bucket of burst and rate [`DEFAULT_QPS`].
fn at_default_rate(requests: usize) -> Duration {
    Duration::from_secs_f64((requests as f64 - DEFAULT_QPS).max(0.0) / DEFAULT_QPS)
}

/// Prints the figures; missed targets are reported, not turned into a failure (as nmi-bench).
pub(crate) fn report(full: &Figures, baseline: Option<&Figures>, args: &Args) {
    let target = Duration::from_secs_f64(args.target_seconds);
    let target_rss = args.target_rss_mib;
    println!();
    if let Some(baseline) = baseline {
        print_cluster("baseline", baseline);
        println!();
    }
    print_cluster("full", full);
    println!();
    let create_patch_max = full.create.patches.iter().copied().max().unwrap_or(0);
    let delete_patch_max = full.delete.patches.iter().copied().max().unwrap_or(0);
    let rss = full.create.hwm_kib.max(full.delete.hwm_kib) as f64 / MIB;
    let converge_ok = full.create.converged.is_some_and(|d| d < target);
    let reconverge_ok = full.delete.converged.is_some_and(|d| d < target);
    let patch_ok = full.create.passes > 0 && create_patch_max <= 1 && delete_patch_max <= 1;
    let rss_ok = rss < target_rss;
    let secs_target = args.target_seconds;
    println!("targets (full cluster)");
    println!(
        "  {:<40} {}   target < {secs_target} s   {}",
        "convergence after mic start",
        secs(full.create.converged),
        verdict(converge_ok)
    );
    println!(
        "  {:<40} {}   target < {secs_target} s   {}",
        "convergence after deleting 10 % of pods",
        secs(full.delete.converged),
        verdict(reconverge_ok)
    );
    println!(
        "  {:<40} {create_patch_max} / {delete_patch_max}   target <= 1   {}",
        "PATCHes per scale set (phase 1 / phase 2)",
        verdict(patch_ok)
    );
    println!(
        "  {:<40} {rss:.1} MiB   target < {target_rss} MiB   {}",
        "mic peak RSS (VmHWM)",
        verdict(rss_ok)
    );
    let writes = writes(&full.create.api) as f64 / full.scale.pods().max(1) as f64;
    println!(
        "  {:<40} {writes:.3}   target <= 1.2   {}",
        "writes per assignment (phase 1)",
        verdict(writes <= 1.2)
    );
    if let Some(baseline) = baseline {
        let ratio = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
            (Some(a), Some(b)) if !b.is_zero() => {
                format!("{:.2}", a.as_secs_f64() / b.as_secs_f64())
            }
            _ => "n/a".to_owned(),
        };
        println!(
            "ratios full / baseline ({}x the objects)",
            full.scale.scale_sets / baseline.scale.scale_sets.max(1)
        );
        println!(
            "  {:<40} {}",
            "convergence after mic start",
            ratio(full.create.converged, baseline.create.converged)
        );
        println!(
            "  {:<40} {}",
            "convergence after deleting 10 % of pods",
            ratio(full.delete.converged, baseline.delete.converged)
        );
        println!(
            "  {:<40} {:.2}",
            "mic peak RSS",
            full.create.hwm_kib.max(full.delete.hwm_kib) as f64
                / baseline.create.hwm_kib.max(baseline.delete.hwm_kib).max(1) as f64
        );
    }
}
