//! A simulated pod: a network namespace attached to its node by a veth pair.

use std::ffi::OsStr;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use crate::node::{NodeInner, slot_octet};
use crate::{Result, cmd, ns, state};

/// A simulated pod on a [`SimNode`](crate::SimNode): namespace `podid-p<N>x<k>-<pid>` with
/// `eth0` = `198.19.N.(k+2)/32`, default route via the node's `198.19.N.1`, and the node-side
/// veth `pdp<N>x<k>` with a /32 route to the pod. Traffic from the pod to any address enters
/// the node's `PREROUTING`, so the node's iptables rules apply to it.
///
/// Dropping the pod deletes its namespace and veth. It keeps its node alive until then.
#[derive(Debug)]
pub struct SimPod {
    node: Arc<NodeInner>,
    label: String,
    netns: String,
    node_link: String,
    ip: Ipv4Addr,
}

impl SimPod {
    pub(crate) fn create(node: Arc<NodeInner>, label: &str) -> Result<SimPod> {
        let k = node.next_pod_index()?;
        Self::create_at(node, label, k)
    }

    /// Tear this pod's sandbox down and build a new one for another pod with the same address:
    /// a new namespace and a new node-side veth (same name, new interface index), as a CNI does
    /// when it hands a released address to the next pod. `label` is only for logs.
    pub fn reuse_address(self, label: &str) -> Result<SimPod> {
        let node = Arc::clone(&self.node);
        let k = u32::from(self.ip.octets()[3]) - 2;
        drop(self);
        Self::create_at(node, label, k)
    }

    fn create_at(node: Arc<NodeInner>, label: &str, k: u32) -> Result<SimPod> {
        let n = node.slot;
        let host_octet = u8::try_from(k + 2).expect("pod index is below MAX_PODS (253)");
        let pod = SimPod {
            label: label.to_owned(),
            netns: format!("{}p{n}x{k}-{}", state::NETNS_PREFIX, node.pid),
            node_link: format!("pdp{n}x{k}"),
            ip: Ipv4Addr::new(198, 19, slot_octet(n), host_octet),
            node,
        };
        pod.setup()?;
        tracing::debug!(netns = %pod.netns, label = %pod.label, ip = %pod.ip, "podid-netsim: pod created");
        Ok(pod)
    }

    fn setup(&self) -> Result<()> {
        let n = self.node.slot;
        let gateway = format!("198.19.{n}.1");
        let gateway_cidr = format!("{gateway}/32");
        let pod_cidr = format!("{}/32", self.ip);
        let node_ns = self.node.netns.as_str();
        let pod_ns = self.netns.as_str();
        let link = self.node_link.as_str();
        // Pod names are unique per node and process; an existing one is a leftover of an
        // earlier process that had this pid.
        state::delete_netns(pod_ns)?;
        cmd::ip(&["netns", "add", pod_ns])?;
        cmd::ip_in(
            node_ns,
            &[
                "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", pod_ns,
            ],
        )?;
        cmd::ip_in(node_ns, &["addr", "add", &gateway_cidr, "dev", link])?;
        cmd::ip_in(node_ns, &["link", "set", link, "up"])?;
        cmd::ip_in(node_ns, &["route", "add", &pod_cidr, "dev", link])?;
        cmd::ip_in(pod_ns, &["link", "set", "lo", "up"])?;
        cmd::ip_in(pod_ns, &["addr", "add", &pod_cidr, "dev", "eth0"])?;
        cmd::ip_in(pod_ns, &["link", "set", "eth0", "up"])?;
        cmd::ip_in(
            pod_ns,
            &["route", "add", &gateway, "dev", "eth0", "scope", "link"],
        )?;
        cmd::ip_in(
            pod_ns,
            &["route", "add", "default", "via", &gateway, "dev", "eth0"],
        )?;
        Ok(())
    }

    /// The label given to [`SimNode::add_pod`](crate::SimNode::add_pod).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The pod's network namespace name (`podid-p<N>x<k>-<pid>`).
    pub fn name(&self) -> &str {
        &self.netns
    }

    /// The pod IP (198.19.N.(k+2)); the peer address a node listener sees.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The node-side veth name (`pdp<N>x<k>`).
    pub fn node_link(&self) -> &str {
        &self.node_link
    }

    /// The namespace's bind-mount path (`/run/netns/<name>`).
    pub fn netns_path(&self) -> PathBuf {
        ns::path(&self.netns)
    }

    /// Binds a TCP listener inside the pod's namespace.
    pub fn bind_tcp(&self, addr: SocketAddr) -> Result<TcpListener> {
        ns::bind_tcp(&self.netns, addr)
    }

    /// Connects to `addr` from inside the pod (5 s timeout).
    pub fn connect_tcp(&self, addr: SocketAddr) -> Result<TcpStream> {
        ns::connect_tcp(&self.netns, addr)
    }

    /// Runs `f` on a thread inside the pod's namespace and returns its result.
    pub fn run<F, T>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        ns::run_in(&self.netns, f)
    }

    /// A command that runs `program` inside the pod (`ip netns exec <ns> <program>`).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        cmd::exec_in(&self.netns, program.as_ref())
    }
}

impl Drop for SimPod {
    fn drop(&mut self) {
        if let Err(err) = state::delete_link(Some(&self.node.netns), &self.node_link) {
            tracing::warn!(link = %self.node_link, error = %err, "podid-netsim: cannot delete pod link");
        }
        if let Err(err) = state::delete_netns(&self.netns) {
            tracing::warn!(netns = %self.netns, error = %err, "podid-netsim: cannot delete pod netns");
        }
    }
}
