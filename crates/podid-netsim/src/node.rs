//! A simulated node: a network namespace linked to the host by a veth pair.

use std::ffi::OsStr;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::pod::SimPod;
use crate::{Error, Result, cmd, ns, state};

/// Highest pod index on one node: pod `k` gets 198.19.N.(k+2), up to .254.
pub(crate) const MAX_PODS: u32 = 253;

/// Shared by a [`SimNode`] and its pods; the node is torn down when the last one goes.
#[derive(Debug)]
pub(crate) struct NodeInner {
    pub(crate) slot: u32,
    pub(crate) pid: u32,
    pub(crate) netns: String,
    host_link: String,
    next_pod: AtomicU32,
}

impl NodeInner {
    fn setup(&self) -> Result<()> {
        let n = self.slot;
        let host_cidr = format!("198.18.{n}.1/30");
        let node_cidr = format!("198.18.{n}.2/30");
        let gateway = format!("198.18.{n}.1");
        let pod_cidr = format!("198.19.{n}.0/24");
        let node_ip = format!("198.18.{n}.2");
        let ns = self.netns.as_str();
        let link = self.host_link.as_str();
        // The slot was just claimed exclusively, so anything already carrying these names is
        // a leftover of an earlier process that had this pid.
        state::delete_link(None, link)?;
        state::delete_netns(ns)?;
        cmd::ip(&["netns", "add", ns])?;
        cmd::ip(&[
            "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        cmd::ip(&["addr", "add", &host_cidr, "dev", link])?;
        cmd::ip(&["link", "set", link, "up"])?;
        cmd::ip_in(ns, &["link", "set", "lo", "up"])?;
        cmd::ip_in(ns, &["addr", "add", &node_cidr, "dev", "eth0"])?;
        cmd::ip_in(ns, &["link", "set", "eth0", "up"])?;
        cmd::ip_in(ns, &["route", "add", "default", "via", &gateway])?;
        ns::write_sysctl(ns, "net.ipv4.ip_forward", "1")?;
        cmd::ip(&["route", "add", &pod_cidr, "via", &node_ip, "dev", link])?;
        Ok(())
    }

    pub(crate) fn next_pod_index(&self) -> Result<u32> {
        let k = self.next_pod.fetch_add(1, Ordering::Relaxed);
        if k >= MAX_PODS {
            return Err(Error::TooManyPods {
                node: self.netns.clone(),
            });
        }
        Ok(k)
    }
}

impl Drop for NodeInner {
    fn drop(&mut self) {
        // Deleting the host end removes the peer and the host route with it, even when a
        // socket still holds the namespace open.
        if let Err(err) = state::delete_link(None, &self.host_link) {
            tracing::warn!(link = %self.host_link, error = %err, "podid-netsim: cannot delete link");
        }
        let pod_prefix = format!("{}p{}x", state::NETNS_PREFIX, self.slot);
        let pod_suffix = format!("-{}", self.pid);
        for name in state::list_netns() {
            if name.starts_with(&pod_prefix)
                && name.ends_with(&pod_suffix)
                && let Err(err) = state::delete_netns(&name)
            {
                tracing::warn!(netns = %name, error = %err, "podid-netsim: cannot delete pod netns");
            }
        }
        if let Err(err) = state::delete_netns(&self.netns) {
            tracing::warn!(netns = %self.netns, error = %err, "podid-netsim: cannot delete netns");
        }
        state::release_slot(self.slot);
    }
}

/// A simulated Kubernetes node: its own network namespace (own iptables tables and sysctls)
/// with `eth0` = `198.18.N.2/30` linked to the host's `pdh<N>` = `198.18.N.1/30`, a default
/// route via the host, `ip_forward=1`, and the pod subnet `198.19.N.0/24` routed from the host
/// through it.
///
/// Dropping the node (and all its [`SimPod`]s) deletes its namespaces, links and slot file,
/// also when a test panics.
#[derive(Debug)]
pub struct SimNode {
    pub(crate) inner: Arc<NodeInner>,
}

impl SimNode {
    /// Creates a node in a free slot, after sweeping leftovers of dead processes.
    ///
    /// Fails with [`Error::NeedsRoot`] when not run as root.
    pub fn create() -> Result<SimNode> {
        state::require_root()?;
        let slot = state::claim_slot()?;
        let pid = std::process::id();
        // Built before setup so that a failing step still tears down what exists.
        let inner = Arc::new(NodeInner {
            slot,
            pid,
            netns: format!("{}n{slot}-{pid}", state::NETNS_PREFIX),
            host_link: format!("{}{slot}", state::HOST_LINK_PREFIX),
            next_pod: AtomicU32::new(0),
        });
        inner.setup()?;
        tracing::debug!(netns = %inner.netns, "podid-netsim: node created");
        Ok(SimNode { inner })
    }

    /// The network namespace name (`podid-n<N>-<pid>`), usable with `ip netns exec`.
    pub fn name(&self) -> &str {
        &self.inner.netns
    }

    /// The node's slot `N`.
    pub fn slot(&self) -> u32 {
        self.inner.slot
    }

    /// The node's address on its `eth0` (198.18.N.2).
    pub fn ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, slot_octet(self.inner.slot), 2)
    }

    /// The host's address on the other end of the node's veth (198.18.N.1).
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, slot_octet(self.inner.slot), 1)
    }

    /// The host-side veth name (`pdh<N>`).
    pub fn host_link(&self) -> &str {
        &self.inner.host_link
    }

    /// The pod subnet `198.19.N.0/24` in CIDR notation.
    pub fn pod_cidr(&self) -> String {
        format!("198.19.{}.0/24", self.inner.slot)
    }

    /// The pods' gateway address, held by the node on every pod veth (198.19.N.1).
    pub fn pod_gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, slot_octet(self.inner.slot), 1)
    }

    /// The namespace's bind-mount path (`/run/netns/<name>`), for `setns` or `nsenter`.
    pub fn netns_path(&self) -> PathBuf {
        ns::path(&self.inner.netns)
    }

    /// Adds an address (CIDR, e.g. `169.254.169.254/32`) to the node's loopback, so a
    /// simulated service (the VM's IMDS) can listen on it inside the node.
    pub fn add_local_address(&self, cidr: &str) -> Result<()> {
        cmd::ip_in(&self.inner.netns, &["addr", "add", cidr, "dev", "lo"]).map(drop)
    }

    /// Binds a TCP listener inside the node's namespace; it stays there for its whole life.
    pub fn bind_tcp(&self, addr: SocketAddr) -> Result<TcpListener> {
        ns::bind_tcp(&self.inner.netns, addr)
    }

    /// Connects to `addr` from inside the node's namespace (5 s timeout).
    pub fn connect_tcp(&self, addr: SocketAddr) -> Result<TcpStream> {
        ns::connect_tcp(&self.inner.netns, addr)
    }

    /// Runs `f` on a thread inside the node's namespace and returns its result. Sockets and
    /// threads (e.g. a tokio runtime built in `f`) created by `f` live in the node namespace.
    pub fn run<F, T>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        ns::run_in(&self.inner.netns, f)
    }

    /// A command that runs `program` inside the node (`ip netns exec <ns> <program>`).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        cmd::exec_in(&self.inner.netns, program.as_ref())
    }

    /// Runs `iptables -w <args>` inside the node and returns its stdout.
    pub fn iptables(&self, args: &[&str]) -> Result<String> {
        cmd::run(self.command("iptables").arg("-w").args(args))
    }

    /// Sets a sysctl (`net.ipv4.conf.all.route_localnet`, …) inside the node.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        ns::write_sysctl(&self.inner.netns, key, value)
    }

    /// Reads a sysctl inside the node.
    pub fn read_sysctl(&self, key: &str) -> Result<String> {
        ns::read_sysctl(&self.inner.netns, key)
    }

    /// Adds a pod: its own namespace with `eth0` = `198.19.N.(k+2)/32`, a veth `pdp<N>x<k>`
    /// in the node, and a default route via the node. `label` is only for logs.
    pub fn add_pod(&self, label: &str) -> Result<SimPod> {
        SimPod::create(Arc::clone(&self.inner), label)
    }
}

/// Slots are below 64 by construction, so the octet conversion cannot fail.
pub(crate) fn slot_octet(slot: u32) -> u8 {
    u8::try_from(slot).expect("slots are below MAX_NODES (64)")
}
