//! Pods behind a node: routing, source addresses, teardown, and the interception docs/testing.md
//! describes.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use podid_netsim::SimNode;

fn netns_list() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("run ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn host_nat_rules() -> String {
    let out = Command::new("iptables")
        .args(["-w", "-t", "nat", "-S"])
        .output()
        .expect("run host iptables");
    assert!(out.status.success(), "host iptables -t nat -S failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sends a line from `client`, accepts the connection on `listener`, echoes the line back and
/// checks it arrives; returns the peer address the listener saw.
fn exchange(client: &mut TcpStream, listener: &TcpListener) -> SocketAddr {
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    client.write_all(b"hello").expect("write");
    let (mut conn, peer) = listener.accept().expect("accept");
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = [0u8; 5];
    conn.read_exact(&mut buf).expect("read from client");
    conn.write_all(&buf).expect("echo");
    let mut back = [0u8; 5];
    client.read_exact(&mut back).expect("read echo");
    assert_eq!(&back, b"hello");
    peer
}

#[test]
fn pod_to_node_tcp_shows_pod_ip_as_peer() {
    let node = SimNode::create().expect("create node");
    let pod = node.add_pod("app").expect("add pod");
    let other = node.add_pod("other").expect("add second pod");
    assert_ne!(pod.ip(), other.ip());
    assert_eq!(pod.label(), "app");
    for target in [node.ip(), node.pod_gateway()] {
        let listener = node
            .bind_tcp(SocketAddr::from((target, 0)))
            .expect("bind in node");
        let addr = listener.local_addr().expect("addr");
        let mut client = pod.connect_tcp(addr).expect("pod connects to node");
        let peer = exchange(&mut client, &listener);
        assert_eq!(
            peer.ip(),
            IpAddr::V4(pod.ip()),
            "peer of {target} is the pod"
        );
        assert_eq!(
            client.local_addr().expect("local").ip(),
            IpAddr::V4(pod.ip())
        );
    }
}

#[test]
fn host_and_pods_reach_each_other_through_the_node() {
    let node = SimNode::create().expect("create node");
    let a = node.add_pod("a").expect("pod a");
    let b = node.add_pod("b").expect("pod b");

    // host → pod
    let listener = a
        .bind_tcp(SocketAddr::from((a.ip(), 0)))
        .expect("bind in pod a");
    let addr = listener.local_addr().expect("addr");
    let mut client = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("host → pod");
    let peer = exchange(&mut client, &listener);
    assert_eq!(peer.ip(), IpAddr::V4(node.host_ip()));

    // pod b → pod a on the same node
    let mut client = b.connect_tcp(addr).expect("pod b → pod a");
    let peer = exchange(&mut client, &listener);
    assert_eq!(peer.ip(), IpAddr::V4(b.ip()));

    // pod listener is not on the host or node loopback
    let out = b
        .command("ip")
        .args(["-o", "-4", "route", "show", "default"])
        .output()
        .expect("ip route in pod");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&node.pod_gateway().to_string()),
        "pod default route goes via the node"
    );
}

#[test]
fn dropping_a_pod_removes_its_namespace_and_link_but_keeps_the_node() {
    let node = SimNode::create().expect("create node");
    let pod = node.add_pod("short-lived").expect("add pod");
    let pod_ns = pod.name().to_owned();
    let link = pod.node_link().to_owned();
    assert!(netns_list().contains(&pod_ns));
    drop(pod);
    assert!(!netns_list().contains(&pod_ns), "pod netns gone");
    let out = node
        .command("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip link in node");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(&link),
        "pod veth gone from the node"
    );
    assert!(netns_list().contains(node.name()), "node survives its pod");

    // A pod outliving its SimNode handle keeps the node until it is dropped.
    let node_ns = node.name().to_owned();
    let pod = node.add_pod("survivor").expect("add pod");
    drop(node);
    assert!(
        netns_list().contains(&node_ns),
        "node kept alive by its pod"
    );
    let pod_ns = pod.name().to_owned();
    drop(pod);
    let list = netns_list();
    assert!(
        !list.contains(&node_ns) && !list.contains(&pod_ns),
        "all gone: {list}"
    );
}

/// As docs/testing.md describes: upstream's `aad-metadata` chain inside the node namespace, plus
/// `route_localnet=1`, delivers a pod's request for 169.254.169.254:80 to a listener on the
/// node's 127.0.0.1:2579 with the pod's source IP intact; the host's nat table is untouched.
#[test]
fn upstream_interception_chain_delivers_pod_requests_to_node_loopback() {
    let host_before = host_nat_rules();
    let node = SimNode::create().expect("create node");
    let pod = node.add_pod("sdk-client").expect("add pod");

    let nmi = node
        .bind_tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, 2579)))
        .expect("nmi listener on node loopback");
    // The simulated VM's IMDS on the node: nmi's own calls to it go through OUTPUT.
    node.add_local_address("169.254.169.254/32")
        .expect("imds address");
    let imds = node
        .bind_tcp(SocketAddr::from(([169, 254, 169, 254], 80)))
        .expect("imds listener");

    for rule in [
        vec!["-t", "nat", "-N", "aad-metadata"],
        vec!["-t", "nat", "-I", "PREROUTING", "1", "-j", "aad-metadata"],
        vec![
            "-t",
            "nat",
            "-A",
            "aad-metadata",
            "!",
            "-s",
            "127.0.0.1/32",
            "-d",
            "169.254.169.254/32",
            "-p",
            "tcp",
            "--dport",
            "80",
            "-j",
            "DNAT",
            "--to-destination",
            "127.0.0.1:2579",
        ],
        vec!["-t", "nat", "-A", "aad-metadata", "-j", "RETURN"],
    ] {
        node.iptables(&rule).expect("install upstream rule");
    }
    node.sysctl("net.ipv4.conf.all.route_localnet", "1")
        .expect("route_localnet all");
    node.sysctl(
        &format!("net.ipv4.conf.{}.route_localnet", pod.node_link()),
        "1",
    )
    .expect("route_localnet on the pod veth");

    let chain = node
        .iptables(&["-t", "nat", "-S", "aad-metadata"])
        .expect("list chain");
    assert_eq!(
        chain,
        "-N aad-metadata\n\
         -A aad-metadata ! -s 127.0.0.1/32 -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 127.0.0.1:2579\n\
         -A aad-metadata -j RETURN\n",
        "chain reads back exactly as upstream expects (docs/upstream.md#interception)"
    );

    let target = SocketAddr::from(([169, 254, 169, 254], 80));
    let mut client = pod
        .connect_tcp(target)
        .expect("pod connects to IMDS address");
    let peer = exchange(&mut client, &nmi);
    assert_eq!(peer.ip(), IpAddr::V4(pod.ip()), "DNAT keeps the pod source");
    assert_eq!(
        client.peer_addr().expect("peer"),
        target,
        "pod still sees IMDS"
    );

    // The node itself reaches the simulated IMDS directly (OUTPUT is not intercepted).
    let mut direct = node.connect_tcp(target).expect("node → imds");
    let peer = exchange(&mut direct, &imds);
    assert_eq!(peer.ip(), IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)));

    assert_eq!(host_nat_rules(), host_before, "host nat table unchanged");
    drop(pod);
    drop(node);
    assert_eq!(host_nat_rules(), host_before, "host nat table unchanged");
}

#[test]
fn without_route_localnet_the_interception_does_not_deliver() {
    let node = SimNode::create().expect("create node");
    let pod = node.add_pod("client").expect("add pod");
    let _nmi = node
        .bind_tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, 2579)))
        .expect("nmi listener");
    node.iptables(&[
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-d",
        "169.254.169.254/32",
        "-p",
        "tcp",
        "--dport",
        "80",
        "-j",
        "DNAT",
        "--to-destination",
        "127.0.0.1:2579",
    ])
    .expect("dnat rule");
    assert_eq!(
        node.read_sysctl("net.ipv4.conf.all.route_localnet")
            .expect("read"),
        "0"
    );
    // Martian destination: the SYN is dropped, so the connect times out.
    let err = pod
        .run(|| {
            TcpStream::connect_timeout(
                &SocketAddr::from(([169, 254, 169, 254], 80)),
                Duration::from_millis(700),
            )
        })
        .expect("run in pod")
        .expect_err("must not connect without route_localnet");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
}
