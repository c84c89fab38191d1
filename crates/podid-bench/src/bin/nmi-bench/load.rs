//! The load client: keep-alive HTTP/1.1 connections writing raw token requests back to back,
//! the latency and allocations of each run, and the two servers loaded in turns.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::allocations;

pub(crate) const RESOURCE: &str = "https://vault.azure.net";
const REQUEST: &str = "GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\nUser-Agent: nmi-bench\r\n\r\n";

/// Read one response from `stream` (buffer `buf` keeps bytes past it); its status and body length.
pub(crate) async fn read_response(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> anyhow::Result<(u16, usize)> {
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
pub(crate) async fn probe(addr: SocketAddr) -> anyhow::Result<(u16, usize)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(REQUEST.as_bytes()).await?;
    let mut buf = Vec::new();
    read_response(&mut stream, &mut buf).await
}

/// Figures of one load run.
#[derive(Debug)]
pub(crate) struct Run {
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    pub(crate) rps: f64,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    /// Heap allocations per request (server and client together).
    pub(crate) allocs_per_request: f64,
}

/// What one slice of load measured.
#[derive(Debug, Default)]
pub(crate) struct Slice {
    latencies: Vec<Duration>,
    errors: u64,
    elapsed: Duration,
    allocations: usize,
}

impl Slice {
    pub(crate) fn add(&mut self, other: Slice) {
        self.latencies.extend(other.latencies);
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        self.allocations += other.allocations;
    }

    pub(crate) fn run(mut self) -> anyhow::Result<Run> {
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
pub(crate) async fn interleaved(
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
pub(crate) async fn load(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<Slice> {
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
