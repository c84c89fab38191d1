//! README's main command, `make demo`, runs the `podid-demo` binary: these tests run that binary
//! as a user would and check what it prints and what it leaves behind — a finished run and a run
//! interrupted with Ctrl-C (SIGINT) half-way.
//!
//! Needs root (network namespaces, iptables) and the workspace binaries (`make test` builds them).

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use podid_e2e::binary;

/// The demo's process with its stdout and stderr lines arriving on a channel.
struct Demo {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    _log: tempdir::Dir,
}

mod tempdir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Demo {
    fn start(tag: &str) -> Demo {
        let dir =
            std::env::temp_dir().join(format!("podid-demo-test-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut child = Command::new(binary("podid-demo").expect("podid-demo is built"))
            .env("PODID_DEMO_LOG", dir.join("demo.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning podid-demo");
        let (tx, lines) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Demo {
            child,
            lines,
            seen: Vec::new(),
            _log: tempdir::Dir(dir),
        }
    }

    /// Collects output until a line contains `needle`; panics with everything seen on timeout.
    fn wait_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line containing {needle:?} within {timeout:?}; output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits for the process to exit (killing it past `timeout`) and drains its output.
    fn finish(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "podid-demo did not exit within {timeout:?}; output:\n{}",
                    self.seen.join("\n")
                );
            }
            while let Ok(line) = self.lines.try_recv() {
                self.seen.push(line);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // The reader threads end at EOF, which follows the exit.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        status
    }

    fn output(&self) -> String {
        self.seen.join("\n")
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The node namespace named on the demo's "node …" line (`podid-n<slot>-<pid>`).
fn node_namespace(line: &str) -> String {
    line.split("namespace ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no namespace on {line:?}"))
}

/// Network namespaces and host links the demo process `pid` (node slot `slot`) still has.
fn leftovers(pid: u32, node_ns: &str) -> Vec<String> {
    let suffix = format!("-{pid}");
    let mut left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|dir| {
            dir.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with("podid-") && name.ends_with(&suffix))
                .collect()
        })
        .unwrap_or_default();
    let slot = node_ns
        .strip_prefix("podid-n")
        .and_then(|rest| rest.split('-').next())
        .expect("slot in the namespace name");
    let link = format!("pdh{slot}");
    let shown = Command::new("ip")
        .args(["-o", "link", "show", "dev", &link])
        .output()
        .expect("ip link");
    if shown.status.success() {
        left.push(format!("link {link}"));
    }
    left
}

#[test]
fn the_demo_prints_each_pods_token_or_refusal_and_leaves_nothing_behind() {
    let mut demo = Demo::start("full");
    let pid = demo.child.id();
    let node_line = demo.wait_line("(namespace podid-n", Duration::from_secs(120));
    let node_ns = node_namespace(&node_line);
    let status = demo.finish(Duration::from_secs(300));
    let output = demo.output();
    assert!(status.success(), "podid-demo failed:\n{output}");

    // The identities come from deploy/examples/ and each pod gets its own.
    for (pod, asked) in [
        ("demo", "demo-msi (type 0)"),
        ("sp-app", "demo-sp (type 1)"),
        ("team-a-app", "team-a-id (namespaced)"),
        ("agent", "demo-msi (exception"),
    ] {
        let row = output
            .lines()
            .find(|l| l.trim_start().starts_with(pod) && l.contains(asked))
            .unwrap_or_else(|| panic!("no row for {pod} asking {asked}:\n{output}"));
        assert!(
            row.contains("token for client"),
            "{pod} did not get {asked}: {row}"
        );
    }
    for (pod, asked) in [
        ("demo", "demo-sp (not its own)"),
        ("intruder", "team-a-id (other namespace)"),
    ] {
        let row = output
            .lines()
            .find(|l| l.trim_start().starts_with(pod) && l.contains(asked))
            .unwrap_or_else(|| panic!("no row for {pod} asking {asked}:\n{output}"));
        assert!(
            row.contains("refused"),
            "{pod} was not refused {asked}: {row}"
        );
    }
    assert!(
        output.contains("HTTP 400"),
        "the unbound pod's final 400 is missing:\n{output}"
    );
    assert!(
        output.contains("apply AzurePodIdentityException monitoring/monitoring-agent-exception"),
        "the examples were not applied:\n{output}"
    );
    let left = leftovers(pid, &node_ns);
    assert!(left.is_empty(), "the demo left {left:?} behind");
}

#[test]
fn ctrl_c_half_way_stops_the_demo_and_removes_its_namespaces() {
    let mut demo = Demo::start("interrupted");
    let pid = demo.child.id();
    let node_line = demo.wait_line("(namespace podid-n", Duration::from_secs(120));
    let node_ns = node_namespace(&node_line);
    // Interrupt once the pods exist and the binaries are starting.
    demo.wait_line("Start the real mic", Duration::from_secs(120));
    assert!(
        std::path::Path::new("/run/netns").join(&node_ns).exists(),
        "the node namespace should exist while the demo runs"
    );
    let sent = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .expect("kill -INT");
    assert!(sent.success());
    let status = demo.finish(Duration::from_secs(60));
    let output = demo.output();
    assert!(!status.success(), "an interrupted demo must not report OK");
    assert!(
        output.contains("interrupted (Ctrl-C)"),
        "the demo should say it was interrupted:\n{output}"
    );
    let left = leftovers(pid, &node_ns);
    assert!(left.is_empty(), "the interrupted demo left {left:?} behind");
}
