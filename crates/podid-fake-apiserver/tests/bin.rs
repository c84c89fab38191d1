//! The `fake-apiserver` binary starts, writes its kubeconfig and serves kube.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};

#[tokio::test]
async fn binary_serves_and_writes_a_kubeconfig() {
    let dir = std::env::temp_dir().join(format!("podid-fake-apiserver-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let kubeconfig = dir.join("kubeconfig");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fake-apiserver"))
        .args(["--listen", "127.0.0.1:0", "--kubeconfig-out"])
        .arg(&kubeconfig)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    // The first stdout line is the URL, printed once the kubeconfig is written.
    let url = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("read");
        line.trim().to_string()
    });
    let url = tokio::time::timeout(std::time::Duration::from_secs(30), url)
        .await
        .expect("url in time")
        .expect("join");
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    let kc = kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("config");
    assert_eq!(cfg.cluster_url.to_string().trim_end_matches('/'), url);
    let client = kube::Client::try_from(cfg).expect("client");
    let v = client.apiserver_version().await.expect("version");
    assert_eq!(v.major, "1");
    child.kill().expect("kill the child we started");
    child.wait().expect("reap");
}
