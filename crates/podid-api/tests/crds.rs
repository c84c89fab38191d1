//! The generated CRDs: up to date in deploy/crds, shaped like upstream's, accepting every
//! fixture object without pruning a field, and the `crdgen` binary's `--out`/`--check`.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use podid_api::crd;
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

fn deploy_crds() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/crds")
}

/// A fresh, empty directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("podid-api-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn deploy_crds_are_up_to_date() {
    let report = crd::check_dir(&deploy_crds()).expect("check");
    assert!(report.is_clean(), "{report}");
}

#[test]
fn rendering_is_deterministic_and_named_by_group_and_plural() {
    let a = crd::render().expect("render");
    let b = crd::render().expect("render");
    assert_eq!(a, b);
    let names: Vec<&str> = a.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "aadpodidentity.k8s.io_azureassignedidentities.yaml",
            "aadpodidentity.k8s.io_azureidentities.yaml",
            "aadpodidentity.k8s.io_azureidentitybindings.yaml",
            "aadpodidentity.k8s.io_azurepodidentityexceptions.yaml",
        ]
    );
    for (name, text) in &a {
        assert!(text.starts_with(crd::GENERATED_HEADER), "{name}");
        let _: CustomResourceDefinition =
            serde_norway::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn check_names_missing_differing_and_extra_files() {
    let dir = TempDir::new("check");
    let report = crd::check_dir(&dir.0).expect("check");
    assert_eq!(report.missing.len(), 4);
    assert!(!report.is_clean());

    crd::write_dir(&dir.0).expect("write");
    assert!(crd::check_dir(&dir.0).expect("check").is_clean());

    let changed = "aadpodidentity.k8s.io_azureidentities.yaml";
    let path = dir.0.join(changed);
    let mut text = std::fs::read_to_string(&path).expect("read");
    text.push_str("# hand edit\n");
    std::fs::write(&path, text).expect("write");
    let removed = "aadpodidentity.k8s.io_azurepodidentityexceptions.yaml";
    std::fs::remove_file(dir.0.join(removed)).expect("remove");
    std::fs::write(dir.0.join("stray.yaml"), "x").expect("write");

    let report = crd::check_dir(&dir.0).expect("check");
    assert_eq!(report.differs, [changed]);
    assert_eq!(report.missing, [removed]);
    assert_eq!(report.extra, ["stray.yaml"]);
    let msg = report.to_string();
    for name in [changed, removed, "stray.yaml"] {
        assert!(msg.contains(name), "{msg}");
    }

    let missing_dir = crd::check_dir(&dir.0.join("nope")).expect("check");
    assert_eq!(missing_dir.missing.len(), 4);
}

#[test]
fn crdgen_binary_out_and_check() {
    let exe = env!("CARGO_BIN_EXE_crdgen");
    let dir = TempDir::new("bin");
    let out = Command::new(exe)
        .args(["--check"])
        .arg(&dir.0)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("missing aadpodidentity.k8s.io_azureidentities.yaml"),
        "{stderr}"
    );

    let out = Command::new(exe)
        .arg("--out")
        .arg(&dir.0)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(exe)
        .arg("--check")
        .arg(&dir.0)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let files = std::fs::read_dir(&dir.0).expect("list").count();
    assert_eq!(files, 4, "--out writes the CRDs and nothing else");

    let out = Command::new(exe).arg("--bogus").output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage"));
}

fn crd_of(kind: &str) -> CustomResourceDefinition {
    crd::crds()
        .expect("crds")
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD for {kind}"))
}

#[test]
fn names_scope_and_printer_columns_are_upstreams() {
    let columns = |kind: &str| -> Vec<(String, String, String)> {
        crd_of(kind).spec.versions[0]
            .additional_printer_columns
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|c| (c.name, c.type_, c.json_path))
            .collect()
    };
    let col = |n: &str, t: &str, p: &str| (n.to_owned(), t.to_owned(), p.to_owned());
    let age = col("Age", "date", ".metadata.creationTimestamp");
    assert_eq!(
        columns("AzureIdentity"),
        [
            col("Type", "string", ".spec.type"),
            col("ClientID", "string", ".spec.clientID"),
            age.clone()
        ]
    );
    assert_eq!(
        columns("AzureIdentityBinding"),
        [
            col("AzureIdentity", "string", ".spec.azureIdentity"),
            col("Selector", "string", ".spec.selector"),
            age
        ]
    );
    assert!(columns("AzureAssignedIdentity").is_empty());
    assert!(columns("AzurePodIdentityException").is_empty());

    for (kind, plural, empty_subresources) in [
        ("AzureIdentity", "azureidentities", true),
        ("AzureIdentityBinding", "azureidentitybindings", true),
        ("AzureAssignedIdentity", "azureassignedidentities", false),
        (
            "AzurePodIdentityException",
            "azurepodidentityexceptions",
            false,
        ),
    ] {
        let c = crd_of(kind);
        assert_eq!(
            c.metadata.name.as_deref(),
            Some(format!("{plural}.aadpodidentity.k8s.io").as_str())
        );
        assert_eq!(c.spec.group, "aadpodidentity.k8s.io");
        assert_eq!(c.spec.scope, "Namespaced");
        assert_eq!(c.spec.names.plural, plural);
        assert_eq!(
            c.spec.names.singular.as_deref(),
            Some(kind.to_lowercase().as_str())
        );
        assert_eq!(
            c.spec.names.list_kind.as_deref(),
            Some(format!("{kind}List").as_str())
        );
        assert_eq!(c.spec.names.short_names, None);
        assert_eq!(c.spec.names.categories, None);
        assert_eq!(
            c.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("api-approved.kubernetes.io"))
                .map(String::as_str),
            Some("unapproved")
        );
        assert_eq!(c.spec.versions.len(), 1);
        let v = &c.spec.versions[0];
        assert_eq!((v.name.as_str(), v.served, v.storage), ("v1", true, true));
        // No status subresource: MIC patches /status/status through the main resource.
        let sub = v.subresources.as_ref();
        assert!(
            sub.is_none_or(|s| s.status.is_none() && s.scale.is_none()),
            "{kind}"
        );
        assert_eq!(
            sub.is_some(),
            empty_subresources,
            "{kind}: `subresources: {{}}` as upstream"
        );
    }
}

/// What a structural-schema API server would reject or prune in `value`: type mismatches,
/// `null` on non-nullable fields, and fields the schema does not declare.
fn schema_problems(value: &Value, schema: &Value, path: &str, out: &mut Vec<String>) {
    if value.is_null() {
        if schema.get("nullable") != Some(&Value::Bool(true)) {
            out.push(format!("{path}: null not allowed"));
        }
        return;
    }
    let ty = schema.get("type").and_then(Value::as_str);
    let ok = match (ty, value) {
        (None, _) => true,
        (Some("string"), Value::String(_)) => true,
        (Some("integer"), Value::Number(n)) => n.is_i64() || n.is_u64(),
        (Some("boolean"), Value::Bool(_)) => true,
        (Some("array"), Value::Array(_)) => true,
        (Some("object"), Value::Object(_)) => true,
        _ => false,
    };
    if !ok {
        out.push(format!("{path}: {value} is not {ty:?}"));
        return;
    }
    let embedded = schema.get("x-kubernetes-embedded-resource") == Some(&Value::Bool(true));
    match value {
        Value::Object(map) => {
            if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
                return;
            }
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            for (k, v) in map {
                let p = format!("{path}.{k}");
                // The API server validates ObjectMeta itself at the root and in embedded resources.
                if k == "metadata" && (path.is_empty() || embedded) {
                    continue;
                }
                match (props.and_then(|p| p.get(k)), additional) {
                    (Some(s), _) => schema_problems(v, s, &p, out),
                    (None, Some(s)) => schema_problems(v, s, &p, out),
                    (None, None) => out.push(format!("{p}: not in schema (would be pruned)")),
                }
            }
        }
        Value::Array(items) => {
            if let Some(s) = schema.get("items") {
                for (i, v) in items.iter().enumerate() {
                    schema_problems(v, s, &format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

fn schema_of(kind: &str) -> Value {
    let c = crd_of(kind);
    let s = c.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("schema");
    serde_json::to_value(s).expect("json")
}

#[test]
fn every_fixture_is_accepted_without_pruning() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("fixtures") {
        let path = entry.expect("entry").path();
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        let kind = v["kind"].as_str().expect("kind");
        let mut problems = Vec::new();
        schema_problems(&v, &schema_of(kind), "", &mut problems);
        assert!(problems.is_empty(), "{}: {problems:?}", path.display());
        checked += 1;
    }
    assert!(checked >= 12);
}

#[test]
fn schema_checker_catches_what_it_must() {
    // Guards the checker above: a wrong type, a stray field and a null are all reported.
    let v = serde_json::json!({
        "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity", "metadata": {},
        "spec": {"type": "zero", "ResourceID": "/x", "clientID": null}
    });
    let mut problems = Vec::new();
    schema_problems(&v, &schema_of("AzureIdentity"), "", &mut problems);
    assert_eq!(problems.len(), 3, "{problems:?}");
}

#[test]
fn deploy_dir_has_nothing_but_the_crds() {
    let mut names: Vec<String> = std::fs::read_dir(deploy_crds())
        .expect("deploy/crds")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let expected: Vec<String> = crd::render()
        .expect("render")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, expected);
}
