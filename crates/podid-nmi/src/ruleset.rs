//! When to look at the interception again between reconcile passes, so a removed or altered
//! piece is put back within a second instead of at the next `--ipt-update-interval-sec` pass.
//!
//! * With an nftables-based `iptables` (`iptables --version` says `nf_tables`: the `iptables`
//!   nmi runs drives nftables) the kernel announces every change of the node's ruleset on
//!   the `NFNLGRP_NFTABLES` netlink group. [`subscribe`] listens there on a thread of its own
//!   and wakes the repair loop, which then runs one pass (a few `iptables` commands): nothing
//!   runs while nobody touches the rules, and a repair follows a change by milliseconds.
//! * With the legacy `iptables` there are no notifications: the loop runs a pass every second.
//!   That costs eight `iptables` commands a second, about 11 ms of CPU (docs/performance.md).
//!
//! `route_localnet` is a sysctl, which announces nothing: the loop reads it every 250 ms (one
//! read of a `/proc/sys` file, no command), and runs a pass when it is not 1.
//!
//! A lost notification (the socket's buffer overflowed: `ENOBUFS`) wakes the loop too; if the
//! listener dies, the loop falls back to the one-second pass.

use std::os::fd::AsRawFd as _;
use std::process::Command;

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket,
};
use tokio::sync::mpsc;

/// The nftables multicast group of `NETLINK_NETFILTER` (`NFNLGRP_NFTABLES`).
const NFNLGRP_NFTABLES: u32 = 7;

/// Which kernel interface the `iptables` command drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IptablesMode {
    /// `iptables-nft`: rules live in nftables tables, whose changes are announced.
    Nft,
    /// `iptables-legacy`, or a version line that says neither.
    Legacy,
}

/// The mode a `iptables --version` line names (`iptables v1.8.9 (nf_tables)`).
pub fn mode_of(version: &str) -> IptablesMode {
    if version.contains("nf_tables") {
        IptablesMode::Nft
    } else {
        IptablesMode::Legacy
    }
}

/// Runs `<command> --version` once; legacy when it cannot tell.
pub fn detect_mode(command: &str) -> IptablesMode {
    match Command::new(command).arg("--version").output() {
        Ok(output) => mode_of(&String::from_utf8_lossy(&output.stdout)),
        Err(error) => {
            tracing::warn!(command, %error, "cannot run iptables --version; checking the rules every second");
            IptablesMode::Legacy
        }
    }
}

/// Subscribes to the nftables change notifications of nmi's network namespace (needs
/// `CAP_NET_ADMIN`, which nmi has for iptables). Every burst of changes yields one message on
/// the returned channel (capacity 1: changes during a pass fold into one more pass). The channel
/// closes if the listener fails.
pub fn subscribe() -> std::io::Result<mpsc::Receiver<()>> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )?;
    bind(
        fd.as_raw_fd(),
        &NetlinkAddr::new(0, 1 << (NFNLGRP_NFTABLES - 1)),
    )?;
    let (tx, rx) = mpsc::channel(1);
    std::thread::Builder::new()
        .name("nft-changes".into())
        .spawn(move || {
            // Only the arrival matters, not the content: a message is read whole or truncated.
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let changed = match recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                    Ok(_) => true,
                    // Notifications were dropped: something changed that we did not see.
                    Err(Errno::ENOBUFS) => true,
                    Err(Errno::EINTR) => false,
                    Err(error) => {
                        tracing::warn!(%error, "nftables change notifications failed; checking the rules every second");
                        return;
                    }
                };
                if changed
                    && let Err(mpsc::error::TrySendError::Closed(())) = tx.try_send(())
                {
                    return;
                }
            }
        })?;
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_line_names_the_mode() {
        assert_eq!(mode_of("iptables v1.8.9 (nf_tables)\n"), IptablesMode::Nft);
        assert_eq!(mode_of("iptables v1.8.7 (legacy)\n"), IptablesMode::Legacy);
        assert_eq!(mode_of("iptables v1.6.1\n"), IptablesMode::Legacy);
        assert_eq!(mode_of(""), IptablesMode::Legacy);
    }

    /// A rule change in the namespace the subscription was made in is announced; a quiet
    /// ruleset announces nothing. Needs root (a simulated node) and an nftables `iptables`.
    #[tokio::test]
    async fn a_ruleset_change_in_the_node_is_announced() {
        if detect_mode("iptables") != IptablesMode::Nft {
            eprintln!("skipped: iptables is not nftables-based here");
            return;
        }
        let node = podid_netsim::SimNode::create().expect("a simulated node needs root");
        let mut changes = node
            .run(subscribe)
            .expect("enter the node")
            .expect("subscribe");
        let quiet =
            tokio::time::timeout(std::time::Duration::from_millis(300), changes.recv()).await;
        assert!(quiet.is_err(), "nothing changed yet: {quiet:?}");
        node.iptables(&["-t", "nat", "-N", "probe"])
            .expect("new chain");
        let announced =
            tokio::time::timeout(std::time::Duration::from_secs(5), changes.recv()).await;
        assert_eq!(announced, Ok(Some(())));
        // One `iptables` command is several netlink messages, and the listener may still be
        // reading the tail of that burst: wait until this node has been quiet for 300 ms.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let next =
                tokio::time::timeout(std::time::Duration::from_millis(300), changes.recv()).await;
            match next {
                Err(_) => break,
                Ok(Some(())) => assert!(
                    tokio::time::Instant::now() < deadline,
                    "the node's ruleset never went quiet"
                ),
                Ok(None) => panic!("the listener ended"),
            }
        }
        // Changes in another namespace are not this node's.
        let other = podid_netsim::SimNode::create().expect("second node");
        other
            .iptables(&["-t", "nat", "-N", "elsewhere"])
            .expect("new chain");
        let foreign =
            tokio::time::timeout(std::time::Duration::from_millis(300), changes.recv()).await;
        assert!(foreign.is_err(), "{foreign:?}");
    }
}
