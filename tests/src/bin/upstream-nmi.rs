//! A stand-in for aad-pod-identity's Go NMI in the simulated node, as far as the node swap sees
//! it: it installs upstream's `aad-metadata` chain and `PREROUTING` jump (the same rule strings
//! podid uses), holds the IMDS emulation port, answers each pod's request by asking the VM's IMDS
//! for it (as the Go NMI does for a user-assigned identity), and on SIGTERM deletes the jump,
//! flushes and deletes the chain, keeps running for the grace period upstream sleeps (10 s by
//! default, `--grace-ms`) and exits.
//!
//! Run inside the node's network namespace (`SimNode::command`). Prints `ready` once the rules
//! are in and the port is bound, `cleaned` once the rules are gone. It does no attribution and no
//! identity matching: the swap test only needs something that serves and then opens the node.

use std::process::{Command, ExitCode};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

const CHAIN: &str = "aad-metadata";
const DNAT: &str = "! -s 127.0.0.1/32 -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 127.0.0.1:2579";
const LISTEN: &str = "127.0.0.1:2579";
const IMDS: &str = "169.254.169.254:80";

fn iptables(args: &str) -> bool {
    Command::new("iptables")
        .arg("-w")
        .args(args.split_whitespace())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Upstream's pass: the chain with its two rules, the jump at the top of `PREROUTING`.
fn install() -> bool {
    let _ = iptables(&format!("-t nat -N {CHAIN}"));
    iptables(&format!("-t nat -F {CHAIN}"))
        && iptables(&format!("-t nat -A {CHAIN} {DNAT}"))
        && iptables(&format!("-t nat -A {CHAIN} -j RETURN"))
        && (iptables(&format!("-t nat -C PREROUTING -j {CHAIN}"))
            || iptables(&format!("-t nat -I PREROUTING 1 -j {CHAIN}")))
}

/// Upstream's SIGTERM clean-up: the jump if present, then flush and delete the chain.
fn clean_up() {
    if iptables(&format!("-t nat -C PREROUTING -j {CHAIN}")) {
        let _ = iptables(&format!("-t nat -D PREROUTING -j {CHAIN}"));
    }
    let _ = iptables(&format!("-t nat -F {CHAIN}"));
    let _ = iptables(&format!("-t nat -X {CHAIN}"));
}

/// Reads one request head from the pod and relays the request to the VM's IMDS, its answer back.
async fn relay(mut pod: TcpStream) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = pod.read(&mut buf).await?;
        if n == 0 || head.len() > 64 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let request = String::from_utf8_lossy(&head);
    let target = request.split_whitespace().nth(1).unwrap_or("/");
    let mut imds = TcpStream::connect(IMDS).await?;
    imds.write_all(
        format!("GET {target} HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut answer = Vec::new();
    imds.read_to_end(&mut answer).await?;
    pod.write_all(&answer).await?;
    pod.shutdown().await
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let grace = std::env::args()
        .find_map(|a| a.strip_prefix("--grace-ms=").and_then(|v| v.parse().ok()))
        .map_or(Duration::from_secs(10), Duration::from_millis);
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        eprintln!("upstream-nmi: no SIGTERM handler");
        return ExitCode::FAILURE;
    };
    if !install() {
        eprintln!("upstream-nmi: installing the rules failed");
        return ExitCode::FAILURE;
    }
    let listener = match TcpListener::bind(LISTEN).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("upstream-nmi: binding {LISTEN}: {error}");
            return ExitCode::FAILURE;
        }
    };
    println!("ready");
    let serve = async {
        loop {
            if let Ok((pod, _)) = listener.accept().await {
                tokio::spawn(relay(pod));
            }
        }
    };
    tokio::select! {
        () = serve => {}
        _ = term.recv() => {}
    }
    clean_up();
    println!("cleaned");
    // Upstream keeps its process (and so its listener) for the grace period, then exits.
    let serve = async {
        loop {
            if let Ok((pod, _)) = listener.accept().await {
                tokio::spawn(relay(pod));
            }
        }
    };
    let _ = tokio::time::timeout(grace, serve).await;
    ExitCode::SUCCESS
}
