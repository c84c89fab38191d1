//! Simulated Kubernetes nodes and pods as Linux network namespaces, for tests. Test-only.
//!
//! A [`SimNode`] is a network namespace with its own iptables tables and sysctls, linked to the
//! host by a veth pair; a [`SimPod`] is a namespace linked to its node, so a pod's request to
//! `169.254.169.254` crosses the node's `nat PREROUTING` exactly as on a real node. Tests run
//! in parallel (each node claims one of 64 slots) and never touch the machine's own interfaces
//! or iptables rules: every address is in the benchmark range 198.18.0.0/15.
//!
//! Addressing for slot `N`: host `pdh<N>` 198.18.N.1/30 ↔ node `eth0` 198.18.N.2/30; pods
//! 198.19.N.(k+2)/32 behind node-side veths `pdp<N>x<k>` (gateway 198.19.N.1); the host routes
//! 198.19.N.0/24 via the node.
//!
//! Cleanup: `Drop` removes everything (also on panic unwind); [`sweep`] (and the
//! `netsim-sweep` binary, and every [`SimNode::create`]) removes what dead processes left.
//! Needs root (CAP_NET_ADMIN); without it every constructor fails with [`Error::NeedsRoot`].
//!
//! ```no_run
//! use std::io::Write;
//! use podid_netsim::SimNode;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let node = SimNode::create()?;
//! let nmi = node.bind_tcp("127.0.0.1:2579".parse()?)?;
//! node.iptables(&["-t", "nat", "-A", "PREROUTING", "-d", "169.254.169.254/32", "-p", "tcp",
//!     "--dport", "80", "-j", "DNAT", "--to-destination", "127.0.0.1:2579"])?;
//! node.sysctl("net.ipv4.conf.all.route_localnet", "1")?;
//! let pod = node.add_pod("app")?;
//! let mut stream = pod.connect_tcp("169.254.169.254:80".parse()?)?;
//! stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
//! let (_conn, peer) = nmi.accept()?;
//! assert_eq!(peer.ip(), pod.ip());
//! # Ok(())
//! # }
//! ```
//!
//! Depends only on `nix` and the `ip` and `iptables` commands; must not depend on product
//! crates.

mod cmd;
mod node;
mod ns;
mod pod;
mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitStatus;

pub use node::SimNode;
pub use pod::SimPod;
pub use state::{HOST_LINK_PREFIX, MAX_NODES, NETNS_PREFIX, STATE_DIR, SweepReport, sweep};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The process is not root.
    #[error(
        "podid-netsim needs root (CAP_NET_ADMIN) to create network namespaces, veth pairs and \
         iptables rules; run the tests as root (CI does)"
    )]
    NeedsRoot,
    /// All node slots are held by live processes.
    #[error("podid-netsim: all {MAX_NODES} node slots are in use by live processes")]
    NoFreeSlot,
    /// A node has no pod address left.
    #[error("podid-netsim: node {node} has no pod address left")]
    TooManyPods {
        /// The node's namespace.
        node: String,
    },
    /// A command could not be started.
    #[error("cannot run `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A command exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// A file operation failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was attempted.
        action: &'static str,
        /// On which file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Joining a namespace failed.
    #[error("cannot enter network namespace {netns}")]
    Setns {
        /// The namespace.
        netns: String,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// A socket operation inside a namespace failed.
    #[error("cannot {action} {addr} in network namespace {netns}")]
    Socket {
        /// `bind` or `connect`.
        action: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The namespace.
        netns: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
