//! [`NetlinkRoutes`]: the kernel's route to a pod address, asked over rtnetlink
//! (`RTM_GETROUTE`, what `ip route get <addr>` does), for the pod index's blind-watch rule
//! ([`crate::pods`]). One request and one answer on a fresh socket per call (tens of
//! microseconds): the index calls it when a pod is indexed and, per request, only while the
//! pod watch is blind.

use std::io::Read as _;
use std::net::IpAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::pods::RouteProbe;

const AF_NETLINK: i32 = 16;
const NETLINK_ROUTE: i32 = 0;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const NLMSG_HDRLEN: usize = 16;
const RTMSG_LEN: usize = 12;

/// Routes from the kernel of the network namespace nmi runs in (the node's, `hostNetwork`).
#[derive(Debug, Default, Clone, Copy)]
pub struct NetlinkRoutes;

impl RouteProbe for NetlinkRoutes {
    fn interface(&self, ip: IpAddr) -> Option<u32> {
        match route_interface(ip) {
            Ok(interface) => interface,
            Err(error) => {
                tracing::debug!(%ip, %error, "route lookup failed");
                None
            }
        }
    }
}

/// The `RTM_GETROUTE` request for `ip`.
fn request(ip: IpAddr, seq: u32) -> Vec<u8> {
    let (family, addr): (u8, Vec<u8>) = match ip.to_canonical() {
        IpAddr::V4(v4) => (AF_INET, v4.octets().to_vec()),
        IpAddr::V6(v6) => (AF_INET6, v6.octets().to_vec()),
    };
    let attr_len = 4 + addr.len();
    let total = NLMSG_HDRLEN + RTMSG_LEN + attr_len;
    let mut buf = Vec::with_capacity(total);
    buf.extend_from_slice(&u32::try_from(total).unwrap_or(0).to_ne_bytes());
    buf.extend_from_slice(&RTM_GETROUTE.to_ne_bytes());
    buf.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    let dst_len = u8::try_from(addr.len() * 8).unwrap_or(0);
    buf.extend_from_slice(&[family, dst_len, 0, 0, 0, 0, 0, 0]);
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&u16::try_from(attr_len).unwrap_or(0).to_ne_bytes());
    buf.extend_from_slice(&RTA_DST.to_ne_bytes());
    buf.extend_from_slice(&addr);
    buf
}

fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(buf.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

/// The `RTA_OIF` of the first `RTM_NEWROUTE` message in `reply`; `None` for an error answer
/// (no route) or a route without an outgoing interface.
fn parse_reply(reply: &[u8]) -> Option<u32> {
    let len = usize::try_from(u32_at(reply, 0)?).ok()?;
    let kind = u16_at(reply, 4)?;
    if kind == NLMSG_ERROR || kind != RTM_NEWROUTE || len > reply.len() {
        return None;
    }
    let mut at = NLMSG_HDRLEN + RTMSG_LEN;
    while at + 4 <= len {
        let attr_len = usize::from(u16_at(reply, at)?);
        let attr_kind = u16_at(reply, at + 2)?;
        if attr_len < 4 {
            return None;
        }
        if attr_kind == RTA_OIF && attr_len >= 8 {
            return u32_at(reply, at + 4);
        }
        at += (attr_len + 3) & !3;
    }
    None
}

fn route_interface(ip: IpAddr) -> std::io::Result<Option<u32>> {
    let socket = Socket::new(
        Domain::from(AF_NETLINK),
        Type::DGRAM,
        Some(Protocol::from(NETLINK_ROUTE)),
    )?;
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    // An unconnected netlink socket sends to the kernel.
    socket.send(&request(ip, 1))?;
    let mut reply = [0u8; 1024];
    let read = (&socket).read(&mut reply)?;
    Ok(parse_reply(reply.get(..read).unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn request_is_a_well_formed_getroute() {
        let request = request("10.1.2.3".parse().unwrap(), 7);
        assert_eq!(request.len(), 16 + 12 + 8);
        assert_eq!(u32_at(&request, 0), Some(36));
        assert_eq!(u16_at(&request, 4), Some(RTM_GETROUTE));
        assert_eq!(request[16], AF_INET);
        assert_eq!(request[17], 32);
        assert_eq!(&request[32..36], &[10, 1, 2, 3]);
    }

    #[test]
    fn the_loopback_route_leaves_through_an_interface() {
        // Every network namespace routes 127.0.0.1 through `lo`.
        let lo = NetlinkRoutes.interface("127.0.0.1".parse().unwrap());
        assert!(lo.is_some_and(|index| index > 0), "{lo:?}");
    }

    #[test]
    fn error_and_short_answers_give_no_interface() {
        assert_eq!(parse_reply(&[]), None);
        let mut error = vec![0u8; 36];
        error[0..4].copy_from_slice(&36u32.to_ne_bytes());
        error[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        assert_eq!(parse_reply(&error), None);
        let mut route = vec![0u8; 36];
        route[0..4].copy_from_slice(&36u32.to_ne_bytes());
        route[4..6].copy_from_slice(&RTM_NEWROUTE.to_ne_bytes());
        route[28..30].copy_from_slice(&8u16.to_ne_bytes());
        route[30..32].copy_from_slice(&RTA_OIF.to_ne_bytes());
        route[32..36].copy_from_slice(&42u32.to_ne_bytes());
        assert_eq!(parse_reply(&route), Some(42));
    }
}
