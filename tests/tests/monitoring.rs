//! The shipped dashboard and alerting rules (deploy/monitoring/, and as opt-in objects in the
//! chart): `promtool check rules` accepts the rules, the chart's copies are the shipped files,
//! and every metric a panel or a rule uses is one the real `nmi` or `mic` exports (names read
//! from their `/metrics` while they run). The last needs root (network namespaces).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use std::sync::Arc;

use podid_api::AzureIdentity;
use podid_e2e::cluster::{Cluster, Component, sdk_for};
use serde_json::Value;

fn root() -> PathBuf {
    podid_e2e::workspace_root()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// Every PromQL expression of the dashboard's panels and of the rules.
fn expressions() -> Vec<String> {
    let dashboard: Value = serde_json::from_str(&read("deploy/monitoring/podid-dashboard.json"))
        .expect("dashboard is JSON");
    let mut out: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    let rules: Value = serde_norway::from_str(&read("deploy/monitoring/podid-alerts.rules.yaml"))
        .expect("rules are YAML");
    out.extend(
        rules["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .filter_map(|r| r["expr"].as_str().map(str::to_owned)),
    );
    out
}

/// The podid and upstream metric names in `expr` (`aadpodidentity_…`, `podid_…`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &expr[i..];
        let starts_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts_word && (rest.starts_with("aadpodidentity_") || rest.starts_with("podid_")) {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            i += name.len();
            names.insert(name);
        } else {
            i += 1;
        }
    }
    names
}

/// Sample names in a Prometheus text exposition (histograms give `_bucket`, `_sum`, `_count`).
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn metric_names_are_read_from_expressions() {
    let names = metric_names(
        "sum(rate(podid_nmi_token_cache_hits_total[5m])) / histogram_quantile(0.9, aadpodidentity_x_bucket{a=\"podid_not_a_metric\"})",
    );
    assert!(names.contains("podid_nmi_token_cache_hits_total"));
    assert!(names.contains("aadpodidentity_x_bucket"));
    assert_eq!(
        exported("# HELP a b\na_count{x=\"1\"} 2\nb 1\n"),
        BTreeSet::from(["a_count".to_owned(), "b".to_owned()])
    );
    let all: BTreeSet<String> = expressions().iter().flat_map(|e| metric_names(e)).collect();
    assert!(all.len() >= 10, "{all:?}");
}

#[test]
fn promtool_accepts_the_shipped_rules() {
    let output = Command::new("promtool")
        .args(["check", "rules"])
        .arg(root().join("deploy/monitoring/podid-alerts.rules.yaml"))
        .output()
        .expect("promtool (Debian package prometheus; tests/scripts/install-deps.sh installs it)");
    assert!(
        output.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_chart_ships_the_same_dashboard_and_rules() {
    for file in ["podid-dashboard.json", "podid-alerts.rules.yaml"] {
        assert_eq!(
            read(&format!("deploy/charts/podid/files/{file}")),
            read(&format!("deploy/monitoring/{file}")),
            "deploy/charts/podid/files/{file} differs: cp deploy/monitoring/{file} deploy/charts/podid/files/"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_a_panel_or_rule_uses_is_exported_by_nmi_or_mic() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    // One pod served end to end, so the histograms that exist only once observed (nmi's
    // answers, its IMDS calls) have samples.
    let web = cluster.cloud.add_user_assigned_identity("web");
    cluster.add_identity_and_binding(
        &AzureIdentity::user_assigned("default", "web", &web.resource_id, &web.client_id),
        "web",
    )?;
    cluster.spawn_mic()?;
    cluster.spawn_nmi(&[])?;
    cluster.wait_ready().await?;
    cluster.wait_mic_active().await?;
    let pod = Arc::new(cluster.node.add_pod("web")?);
    cluster.add_pod("web-1", Some("web"), pod.ip())?;
    sdk_for(&pod, &web.client_id).await?.token()?;
    let mut names = exported(&cluster.metrics_text(Component::Nmi).await?);
    names.extend(exported(&cluster.metrics_text(Component::Mic).await?));
    let mut missing = BTreeSet::new();
    for expr in expressions() {
        for name in metric_names(&expr) {
            if !names.contains(&name) {
                missing.insert(name);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "used by the dashboard or the rules but exported by neither nmi nor mic: {missing:?}"
    );
    Ok(())
}
