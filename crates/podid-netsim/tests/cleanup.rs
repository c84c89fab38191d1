//! Cleanup when tests panic or die, sweeping, and the error without root.
//!
//! Some tests re-run this test binary as a child process (`--exact <test>` with
//! `PODID_NETSIM_CHILD` set) so that a process can die while holding a node.

use std::io::Write;
use std::process::{Command, Output};
use std::sync::mpsc;

use podid_netsim::{Error, SimNode, sweep};

const CHILD_ENV: &str = "PODID_NETSIM_CHILD";

fn netns_list() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("run ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn host_link_indexes() -> Vec<String> {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("run ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').next().map(str::to_owned))
        .collect()
}

fn host_link_index(name: &str) -> String {
    let out = Command::new("ip")
        .args(["-o", "link", "show", "dev", name])
        .output()
        .expect("run ip link");
    assert!(out.status.success(), "{name} exists");
    String::from_utf8_lossy(&out.stdout)
        .split(':')
        .next()
        .expect("index field")
        .to_owned()
}

/// Re-runs this binary for test `name` with the child mode set.
fn run_child(name: &str, mode: &str) -> Output {
    Command::new(std::env::current_exe().expect("test binary path"))
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, mode)
        .output()
        .expect("spawn child test process")
}

/// What a child reported before dying: node netns, pod netns, host link index.
fn child_report(out: &Output) -> (String, String, String) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("NETSIM_CHILD ").map(|(_, rest)| rest))
        .unwrap_or_else(|| {
            panic!(
                "child reported nothing; stdout: {stdout}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let mut parts = line.split_whitespace().map(str::to_owned);
    let mut next = || parts.next().expect("three fields");
    (next(), next(), next())
}

/// Child side: builds a node with a pod and reports their names on stdout.
fn child_build() -> (SimNode, podid_netsim::SimPod) {
    let node = SimNode::create().expect("child creates node");
    let pod = node.add_pod("doomed").expect("child adds pod");
    println!(
        "NETSIM_CHILD {} {} {}",
        node.name(),
        pod.name(),
        host_link_index(node.host_link())
    );
    std::io::stdout().flush().expect("flush");
    (node, pod)
}

#[test]
fn panic_in_a_thread_holding_a_node_cleans_up() {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let node = SimNode::create().expect("create node");
        let pod = node.add_pod("p").expect("add pod");
        tx.send((node.name().to_owned(), pod.name().to_owned()))
            .expect("send names");
        panic!("deliberate panic while holding a node");
    });
    assert!(handle.join().is_err(), "thread panicked");
    let (node_ns, pod_ns) = rx.recv().expect("names");
    let list = netns_list();
    assert!(!list.contains(&node_ns), "{node_ns} removed on unwind");
    assert!(!list.contains(&pod_ns), "{pod_ns} removed on unwind");
}

#[test]
fn panicking_child_process_cleans_up() {
    if std::env::var(CHILD_ENV).as_deref() == Ok("panic") {
        let (_node, _pod) = child_build();
        panic!("deliberate panic in child process");
    }
    let out = run_child("panicking_child_process_cleans_up", "panic");
    assert_eq!(out.status.code(), Some(101), "child test failed by panic");
    let (node_ns, pod_ns, index) = child_report(&out);
    let list = netns_list();
    assert!(!list.contains(&node_ns), "{node_ns} removed: {list}");
    assert!(!list.contains(&pod_ns), "{pod_ns} removed: {list}");
    assert!(!host_link_indexes().contains(&index), "host link removed");
}

#[test]
fn sweep_removes_leftovers_of_a_dead_process() {
    if std::env::var(CHILD_ENV).as_deref() == Ok("exit") {
        let (_node, _pod) = child_build();
        // exit() runs no destructors: everything is leaked, as after a SIGKILL.
        std::process::exit(3);
    }
    let out = run_child("sweep_removes_leftovers_of_a_dead_process", "exit");
    assert_eq!(out.status.code(), Some(3), "child exited without cleanup");
    let (node_ns, pod_ns, index) = child_report(&out);
    // Every SimNode::create (in parallel tests too) runs the same sweep first, so another
    // process may get there before us; whoever sweeps removes all of the child's leftovers in
    // one pass, and a sweep that removed nothing would leave them in place below.
    let report = sweep().expect("sweep");
    if report.namespaces.contains(&node_ns) {
        assert!(report.namespaces.contains(&pod_ns), "report: {report:?}");
        assert!(!report.slots.is_empty(), "the child's slot: {report:?}");
    }
    let list = netns_list();
    assert!(!list.contains(&node_ns), "{node_ns} swept: {list}");
    assert!(!list.contains(&pod_ns), "{pod_ns} swept: {list}");
    assert!(!host_link_indexes().contains(&index), "host link swept");
}

#[test]
fn sweep_leaves_live_nodes_alone() {
    let node = SimNode::create().expect("create node");
    let pod = node.add_pod("alive").expect("add pod");
    let report = sweep().expect("sweep");
    assert!(
        !report
            .namespaces
            .iter()
            .any(|n| n == node.name() || n == pod.name())
    );
    assert!(!report.slots.contains(&node.slot()));
    assert!(!report.links.iter().any(|l| l == node.host_link()));
    let list = netns_list();
    assert!(list.contains(node.name()) && list.contains(pod.name()));
    // And the node still works.
    node.iptables(&["-t", "nat", "-S"])
        .expect("iptables in node");
}

#[test]
fn netsim_sweep_binary_runs() {
    let out = Command::new(env!("CARGO_BIN_EXE_netsim-sweep"))
        .output()
        .expect("run netsim-sweep");
    assert!(out.status.success(), "netsim-sweep failed: {out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("netsim-sweep: "));
}

#[test]
fn without_root_create_fails_with_a_clear_error() {
    if std::env::var(CHILD_ENV).as_deref() == Ok("unprivileged") {
        nix::unistd::setuid(nix::unistd::Uid::from_raw(65534)).expect("drop root");
        let err = SimNode::create().expect_err("must fail without root");
        assert!(matches!(err, Error::NeedsRoot), "{err:?}");
        println!("NETSIM_ERROR {err}");
        return;
    }
    let out = run_child(
        "without_root_create_fails_with_a_clear_error",
        "unprivileged",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child: {stdout}");
    assert!(
        stdout.contains("NETSIM_ERROR podid-netsim needs root (CAP_NET_ADMIN)"),
        "clear message: {stdout}"
    );
    let err = sweep().err();
    assert!(err.is_none(), "as root, sweep works: {err:?}");
}
