//! Node namespaces: creation, teardown, isolation from the host.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use podid_netsim::SimNode;

fn netns_list() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("run ip netns list");
    assert!(out.status.success(), "ip netns list failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn host_links() -> String {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("run ip link");
    assert!(out.status.success(), "ip link failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The interface index of `name` in the host namespace, if it exists.
fn link_index(links: &str, name: &str) -> Option<String> {
    links.lines().find_map(|line| {
        let mut fields = line.split(": ");
        let index = fields.next()?;
        let link = fields.next()?.split('@').next()?;
        (link == name).then(|| index.to_owned())
    })
}

#[test]
fn create_then_drop_leaves_nothing() {
    let node = SimNode::create().expect("create node");
    let name = node.name().to_owned();
    let link = node.host_link().to_owned();
    let slot_file = format!("{}/slot-{}", podid_netsim::STATE_DIR, node.slot());
    let own_pid = std::process::id().to_string();
    assert!(
        netns_list().contains(&name),
        "netns {name} exists while alive"
    );
    let index = link_index(&host_links(), &link).expect("host link exists while alive");
    assert_eq!(
        std::fs::read_to_string(&slot_file).expect("slot file"),
        own_pid
    );
    drop(node);
    assert!(
        !netns_list().contains(&name),
        "netns {name} gone after drop"
    );
    // Another test process may reuse the slot (and the name pdh<N>) at once, but never the
    // interface index, nor this process's pid in the slot file.
    let prefix = format!("{index}: ");
    assert!(
        !host_links().lines().any(|l| l.starts_with(&prefix)),
        "{link} (index {index}) gone after drop"
    );
    match std::fs::read_to_string(&slot_file) {
        Ok(owner) => assert_ne!(owner, own_pid, "slot released"),
        Err(err) => assert_eq!(err.kind(), ErrorKind::NotFound),
    }
}

#[test]
fn node_is_reachable_from_host_over_its_veth() {
    let node = SimNode::create().expect("create node");
    let listener = node
        .bind_tcp(SocketAddr::from((node.ip(), 0)))
        .expect("bind on node ip");
    let addr = listener.local_addr().expect("local addr");
    let mut client =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("host connects to node");
    let (mut server, peer) = listener.accept().expect("accept");
    assert_eq!(peer.ip(), std::net::IpAddr::V4(node.host_ip()));
    client.write_all(b"ping").expect("write");
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"ping");
}

#[test]
fn loopback_listener_in_node_is_invisible_from_host() {
    let node = SimNode::create().expect("create node");
    let listener = node
        .bind_tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .expect("bind in node");
    let addr = listener.local_addr().expect("local addr");
    // Reachable from inside the node …
    let inside = node.connect_tcp(addr).expect("connect inside node");
    let (_conn, peer) = listener.accept().expect("accept");
    assert_eq!(peer, inside.local_addr().expect("client addr"));
    // … but on the host nothing listens there and the port is free.
    let err = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .expect_err("host must not reach the node's loopback listener");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    TcpListener::bind(addr).expect("port is free on the host");
}

#[test]
fn run_executes_inside_the_node_namespace() {
    let node = SimNode::create().expect("create node");
    // The node ip is local only inside the node.
    let inside = node
        .run(|| TcpListener::bind(SocketAddr::from((node.ip(), 0))).is_ok())
        .expect("run in node");
    assert!(inside, "node ip is bindable inside the node");
    let err = TcpListener::bind(SocketAddr::from((node.ip(), 0))).expect_err("not on host");
    assert_eq!(err.kind(), ErrorKind::AddrNotAvailable);
    let out = node
        .command("ip")
        .args(["-o", "-4", "addr", "show", "dev", "eth0"])
        .output()
        .expect("ip addr in node");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("{}/30", node.ip())),
        "node eth0 has its address"
    );
}

#[test]
fn sysctls_and_iptables_are_per_node() {
    let node = SimNode::create().expect("create node");
    assert_eq!(node.read_sysctl("net.ipv4.ip_forward").expect("read"), "1");
    node.sysctl("net.ipv4.conf.all.route_localnet", "1")
        .expect("set");
    assert_eq!(
        node.read_sysctl("net.ipv4.conf.all.route_localnet")
            .expect("read"),
        "1"
    );
    let chain = format!("podid-test-{}", node.slot());
    node.iptables(&["-t", "filter", "-N", &chain])
        .expect("new chain");
    let listed = node.iptables(&["-t", "filter", "-S"]).expect("list");
    assert!(
        listed.contains(&format!("-N {chain}")),
        "chain exists in node"
    );
    let host = Command::new("iptables")
        .args(["-w", "-t", "filter", "-S"])
        .output()
        .expect("host iptables");
    assert!(
        !String::from_utf8_lossy(&host.stdout).contains(&chain),
        "chain must not appear on the host"
    );
    let err = node
        .iptables(&["-t", "filter", "-N", &chain])
        .expect_err("duplicate chain");
    assert!(
        err.to_string().contains("iptables"),
        "error names the command: {err}"
    );
}

#[test]
fn parallel_nodes_get_distinct_slots_and_addresses() {
    let a = SimNode::create().expect("create a");
    let b = SimNode::create().expect("create b");
    assert_ne!(a.slot(), b.slot());
    assert_ne!(a.ip(), b.ip());
    assert_ne!(a.name(), b.name());
    // a can reach b through the host? No: the host does not forward. But each reaches its host end.
    let listener = TcpListener::bind(SocketAddr::from((b.host_ip(), 0))).expect("bind host end");
    let addr = listener.local_addr().expect("addr");
    b.connect_tcp(addr).expect("node b reaches host end");
    let (_c, peer) = listener.accept().expect("accept");
    assert_eq!(peer.ip(), std::net::IpAddr::V4(b.ip()));
}
