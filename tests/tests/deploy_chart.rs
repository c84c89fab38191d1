//! The Helm chart under `deploy/charts/podid` accepts every values key of the aad-pod-identity
//! chart 4.1.18 (so an existing values file upgrades in place), adds only documented podid keys,
//! references no value that values.yaml lacks, ships the generated CRDs unchanged, and has
//! templates for every kind of the plain manifests.
//!
//! The rendered chart (real Helm) is checked in chart_render.rs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Keys podid adds to upstream's values, each with the reason it exists.
const PODID_ONLY_KEYS: &[(&str, &str)] = &[
    (
        "imagePullSecrets",
        "documented (commented out) in upstream's values.yaml; podid gives it a default",
    ),
    (
        "mic.releaseFinishedPods",
        "mic --release-finished-pods: drop assignments of finished pods",
    ),
    (
        "mic.identityReleaseGracePeriod",
        "mic --identity-release-grace-period: hold an identity after its last pod",
    ),
    (
        "mic.identityLimitPerVm",
        "mic --identity-limit-per-vm: most identities in use or held per VM/VMSS",
    ),
    (
        "mic.upstreamLeaderLock",
        "mic --upstream-leader-lock: honour and renew upstream's Endpoints lock during the upgrade",
    ),
    (
        "nmi.enableHostToken",
        "nmi --enable-host-token: /host/token is off by default in podid",
    ),
    (
        "nmi.errorFormat",
        "nmi --error-format: JSON or upstream's plain-text error bodies",
    ),
    (
        "nmi.notFoundForFinalRefusals",
        "nmi --not-found-for-final-refusals: upstream's 404 for final refusals",
    ),
    (
        "nmi.updateStrategy.rollingUpdate.maxSurge",
        "nmi rolls with surge: the new pod closes the node before the old one opens it",
    ),
    (
        "nmi.manageRouteLocalnet",
        "nmi --manage-route-localnet: route_localnet for nodes without kube-proxy",
    ),
    (
        "nmi.federatedDefaultTenantID",
        "nmi --federated-default-tenant-id: tenant of federated exchanges",
    ),
    (
        "nmi.federatedAuthorityHost",
        "nmi --federated-authority-host: Entra authority of federated exchanges",
    ),
    (
        "nmi.serveWorkloadIdentityPods",
        "nmi --serve-workload-identity-pods: Workload Identity pods served through IMDS",
    ),
    (
        "nmi.allowedAuthorities",
        "nmi --allowed-authorities: Entra authorities besides the clouds'",
    ),
    (
        "nmi.allowCrossNamespaceSecrets",
        "nmi --allow-cross-namespace-secrets: upstream's cross-namespace Secrets",
    ),
    (
        "nmi.startupTaint",
        "nmi --startup-taint: node pools closed from their first second (taint removed by nmi)",
    ),
    (
        "monitoring.grafanaDashboard.enabled",
        "opt-in ConfigMap with podid's Grafana dashboard",
    ),
    (
        "monitoring.grafanaDashboard.namespace",
        "namespace of the dashboard ConfigMap",
    ),
    (
        "monitoring.grafanaDashboard.labels.grafana_dashboard",
        "the label Grafana's dashboard sidecar watches for",
    ),
    (
        "monitoring.prometheusRule.enabled",
        "opt-in PrometheusRule with podid's alerting rules",
    ),
    (
        "monitoring.prometheusRule.labels",
        "extra labels for the PrometheusRule",
    ),
    (
        "rbac.allowServiceAccountTokens",
        "opt-in TokenRequest RBAC for federated identities (Workload Identity migration)",
    ),
];

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .join("deploy/charts/podid")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn values() -> Value {
    serde_norway::from_str(&read(&chart().join("values.yaml"))).expect("values.yaml is YAML")
}

/// Dotted paths of a values tree: maps are followed; scalars, lists, `null` and empty maps end a
/// path (the rule upstream-values-keys.txt was written with).
fn flatten(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(child, &p, out);
            }
        }
        _ => {
            out.insert(prefix.to_owned());
        }
    }
}

fn upstream_keys() -> BTreeSet<String> {
    read(&chart().join("upstream-values-keys.txt"))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

fn templates() -> BTreeMap<String, String> {
    let dir = chart().join("templates");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).expect("templates dir") {
        let path = entry.expect("dir entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("utf-8 name")
            .to_owned();
        out.insert(name, read(&path));
    }
    out
}

/// `.Values.a.b.c` paths referenced in a template.
fn value_refs(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices(".Values.") {
        let tail = &text[i + ".Values.".len()..];
        let path: String = tail
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '_')
            .collect();
        out.insert(path.trim_end_matches('.').to_owned());
    }
    out
}

/// A referenced path exists, or ends inside a free-form map the user fills (`{}` or `null`).
fn resolves(values: &Value, path: &str) -> bool {
    let mut cur = values;
    for part in path.split('.') {
        match cur {
            Value::Object(m) if m.is_empty() => return true,
            Value::Null => return true,
            Value::Object(m) => match m.get(part) {
                Some(v) => cur = v,
                None => return false,
            },
            _ => return false,
        }
    }
    true
}

#[test]
fn values_keep_every_upstream_key_and_add_only_listed_ones() {
    let upstream = upstream_keys();
    assert!(upstream.len() > 60, "upstream key list looks truncated");
    let mut ours = BTreeSet::new();
    flatten(&values(), "", &mut ours);
    let missing: Vec<_> = upstream.difference(&ours).collect();
    assert!(missing.is_empty(), "upstream keys missing: {missing:?}");
    let allowed: BTreeSet<String> = PODID_ONLY_KEYS.iter().map(|(k, _)| k.to_string()).collect();
    let extra: Vec<_> = ours
        .difference(&upstream)
        .filter(|k| !allowed.contains(*k))
        .collect();
    assert!(
        extra.is_empty(),
        "podid-only keys not in the allow-list: {extra:?}"
    );
    let stale: Vec<_> = allowed.difference(&ours).collect();
    assert!(
        stale.is_empty(),
        "allow-listed keys gone from values: {stale:?}"
    );
}

#[test]
fn podid_only_keys_are_documented_in_the_chart_readme() {
    let readme = read(&chart().join("README.md"));
    for (key, _) in PODID_ONLY_KEYS {
        assert!(readme.contains(&format!("`{key}`")), "README lacks `{key}`");
    }
}

#[test]
fn defaults_point_at_podid_images_and_modest_nmi_requests() {
    let v = values();
    assert_eq!(v["image"]["repository"], "ghcr.io/podid");
    let tag = format!("v{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(v["nmi"]["tag"], tag.as_str());
    assert_eq!(v["mic"]["tag"], tag.as_str());
    assert_eq!(v["nmi"]["resources"]["requests"]["cpu"], "10m");
    assert_eq!(v["nmi"]["resources"]["requests"]["memory"], "32Mi");
    assert_eq!(v["nmi"]["probePort"], "8085");
    assert_eq!(v["operationMode"], "standard");
    assert_eq!(v["rbac"]["allowServiceAccountTokens"], false);
}

#[test]
fn every_value_a_template_references_exists() {
    let v = values();
    let mut seen = 0;
    for (name, text) in templates() {
        for path in value_refs(&text) {
            seen += 1;
            assert!(
                resolves(&v, &path),
                "{name}: .Values.{path} not in values.yaml"
            );
        }
    }
    assert!(seen > 50, "only {seen} value references found");
    assert!(
        !resolves(&v, "nmi.noSuchKey"),
        "the check must be able to fail"
    );
}

#[test]
fn chart_crds_are_the_generated_ones() {
    let generated = chart().join("../../crds");
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(&generated).expect("deploy/crds") {
        let path = entry.expect("entry").path();
        let name = path.file_name().expect("name").to_owned();
        let copy = chart().join("crds").join(&name);
        assert_eq!(
            read(&copy),
            read(&path),
            "{} differs from deploy/crds: cp deploy/crds/*.yaml deploy/charts/podid/crds/",
            copy.display()
        );
        names.insert(name);
    }
    let copies = std::fs::read_dir(chart().join("crds"))
        .expect("chart crds")
        .count();
    assert_eq!(copies, names.len(), "stale CRD files in the chart");
}

#[test]
fn chart_metadata_is_helm_v2() {
    let chart_yaml: Value =
        serde_norway::from_str(&read(&chart().join("Chart.yaml"))).expect("Chart.yaml");
    assert_eq!(chart_yaml["apiVersion"], "v2");
    assert_eq!(chart_yaml["name"], "podid");
    assert_eq!(chart_yaml["appVersion"], env!("CARGO_PKG_VERSION"));
}
