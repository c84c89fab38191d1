//! Documents, and pins, every difference between the generated CRD schemas and upstream
//! aad-pod-identity v1.8.17's (`charts/aad-pod-identity/crds/crd.yaml`, same schema as
//! `config/crd/aadpodidentity.k8s.io.yaml`).
//!
//! Upstream's structural facts are in `upstream-crd-schema.txt`, one line per schema node:
//! `<path> <type> [format] [nullable] [embedded]`. The test flattens our schema the same way
//! (adding `preserve-unknown` and `required=<fields>` where set) and requires the difference to
//! be exactly [`DOCUMENTED_DIFFERENCES`]. Changing a type so that the schema drifts fails here
//! until the difference is listed below and in docs/crds.md.
//!
//! Not compared (documented in docs/crds.md): descriptions (ours come from our doc comments),
//! the `controller-gen.kubebuilder.io/version` annotation, the Helm labels of the chart copy, the
//! empty `status:` block controller-gen writes, and the description of the `Age` column.

use podid_api::crd;
use serde_json::Value;
use std::collections::BTreeSet;

/// Upstream's schema facts, one file shared with the upgrade e2e suite.
const UPSTREAM: &str = include_str!("upstream-crd-schema.txt");

/// The lines of `[section]` in [`UPSTREAM`].
fn section(name: &str) -> Vec<&'static str> {
    let mut lines = UPSTREAM
        .lines()
        .map(str::trim)
        .skip_while(|l| *l != format!("[{name}]"))
        .skip(1);
    let mut out = Vec::new();
    for line in lines.by_ref() {
        if line.starts_with('[') {
            break;
        }
        if !line.is_empty() && !line.starts_with('#') {
            out.push(line);
        }
    }
    assert!(!out.is_empty(), "no [{name}] in upstream-crd-schema.txt");
    out
}

/// `(kind, only in upstream, only in podid)`. Each pair is one documented difference.
const DOCUMENTED_DIFFERENCES: &[(&str, &str, &str)] = &[
    // 1. `spec` is required at the root (and in the embedded copies): the Rust types need it,
    //    and an object the API server stored but watchers cannot decode would break every
    //    watcher. Upstream's Go types always write `spec`.
    ("*", "(root) object", "(root) object required=spec"),
    // 2. The odd embedded `metadata` in spec/status keeps unknown fields instead of being
    //    pruned to `{}`, so the Go MIC's `{"creationTimestamp":null}` round-trips.
    (
        "*",
        "spec.metadata object",
        "spec.metadata object preserve-unknown",
    ),
    (
        "*",
        "status.metadata object",
        "status.metadata object preserve-unknown",
    ),
];

fn upstream_lines(kind: &str) -> BTreeSet<String> {
    let type_meta = section("TypeMeta");
    let mut lines: BTreeSet<String> = type_meta.iter().map(|s| s.to_string()).collect();
    lines.insert("(root) object".into());
    lines.extend(section(kind).iter().map(|s| s.to_string()));
    if kind == "AzureAssignedIdentity" {
        for (prefix, body) in [
            ("spec.azureIdentityRef.", section("AzureIdentity")),
            ("spec.azureBindingRef.", section("AzureIdentityBinding")),
        ] {
            for l in type_meta.iter().chain(&body) {
                lines.insert(format!("{prefix}{l}"));
            }
        }
    }
    lines
}

fn flatten(schema: &Value, path: &str, out: &mut BTreeSet<String>) {
    let mut line = format!(
        "{} {}",
        if path.is_empty() { "(root)" } else { path },
        schema
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("<none>")
    );
    if let Some(f) = schema.get("format").and_then(Value::as_str) {
        line.push_str(&format!(" {f}"));
    }
    let flag = |k: &str| schema.get(k) == Some(&Value::Bool(true));
    if flag("nullable") {
        line.push_str(" nullable");
    }
    if flag("x-kubernetes-embedded-resource") {
        line.push_str(" embedded");
    }
    if flag("x-kubernetes-preserve-unknown-fields") {
        line.push_str(" preserve-unknown");
    }
    if let Some(req) = schema.get("required").and_then(Value::as_array) {
        let names: Vec<&str> = req.iter().filter_map(Value::as_str).collect();
        line.push_str(&format!(" required={}", names.join(",")));
    }
    out.insert(line);
    let prefix = if path.is_empty() {
        String::new()
    } else {
        format!("{path}.")
    };
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            flatten(v, &format!("{prefix}{k}"), out);
        }
    }
    if let Some(items) = schema.get("items") {
        flatten(items, &format!("{path}[]"), out);
    }
    if let Some(ap) = schema.get("additionalProperties").filter(|v| v.is_object()) {
        flatten(ap, &format!("{path}{{}}"), out);
    }
}

/// The documented pairs that apply to `kind`, expanded into the embedded copies of the
/// assigned identity (whose identity/binding copies carry the same differences).
fn expected_differences(kind: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut up = BTreeSet::new();
    let mut ours = BTreeSet::new();
    let prefixes: &[&str] = if kind == "AzureAssignedIdentity" {
        &["", "spec.azureIdentityRef.", "spec.azureBindingRef."]
    } else {
        &[""]
    };
    for (k, u, o) in DOCUMENTED_DIFFERENCES {
        if *k != "*" && *k != kind {
            continue;
        }
        for p in prefixes {
            let (u, o) = if p.is_empty() {
                (u.to_string(), o.to_string())
            } else if let Some(rest) = u.strip_prefix("(root) ") {
                // The embedded copy's own root line carries the `embedded` flag.
                let o_rest = o.strip_prefix("(root) ").unwrap_or(o);
                let (o_ty, o_req) = o_rest.split_once(' ').unwrap_or((o_rest, ""));
                (
                    format!("{} {rest} embedded", p.trim_end_matches('.')),
                    format!("{} {o_ty} embedded {o_req}", p.trim_end_matches('.'))
                        .trim_end()
                        .to_string(),
                )
            } else {
                (format!("{p}{u}"), format!("{p}{o}"))
            };
            up.insert(u);
            ours.insert(o);
        }
    }
    (up, ours)
}

#[test]
fn schema_differences_from_upstream_are_exactly_the_documented_ones() {
    for c in crd::crds().expect("crds") {
        let kind = c.spec.names.kind.clone();
        let schema = c.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("schema");
        let mut ours = BTreeSet::new();
        flatten(&serde_json::to_value(schema).expect("json"), "", &mut ours);
        let upstream = upstream_lines(&kind);
        let only_upstream: BTreeSet<String> = upstream.difference(&ours).cloned().collect();
        let only_ours: BTreeSet<String> = ours.difference(&upstream).cloned().collect();
        let (want_up, want_ours) = expected_differences(&kind);
        assert_eq!(
            only_upstream, want_up,
            "{kind}: upstream schema nodes missing or changed in ours (document them)"
        );
        assert_eq!(
            only_ours, want_ours,
            "{kind}: our schema nodes not in upstream's (document them)"
        );
    }
}
