//! The install artifacts under `deploy/` parse as the Kubernetes objects they claim to be and keep
//! the invariants podid depends on: NMI on the host network with only the capabilities iptables
//! needs, probes on 8085, the node name passed in, RBAC no wider than the components use (no
//! wildcards, MIC's Lease, NMI read-only on the CRDs), MIC exempted from NMI by an explicit
//! exception, and examples whose references resolve.
//!
//! Every YAML document is parsed into its typed form (k8s-openapi for built-in kinds, `podid_api`
//! for the four CRD kinds); serializing it back must keep every field of the source, so a
//! misspelt or misplaced field fails here instead of being silently dropped by the API server.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Container, Namespace, Pod, PodSpec, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use podid_api::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzurePodIdentityException,
    IdentityType,
};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// One parsed YAML document.
#[derive(Debug)]
enum Object {
    /// Checked, nothing asserted on it.
    Namespace,
    ServiceAccount(Box<ServiceAccount>),
    Secret(Box<Secret>),
    Pod(Box<Pod>),
    ClusterRole(Box<ClusterRole>),
    ClusterRoleBinding(Box<ClusterRoleBinding>),
    Role(Box<Role>),
    RoleBinding(Box<RoleBinding>),
    DaemonSet(Box<DaemonSet>),
    Deployment(Box<Deployment>),
    AzureIdentity(Box<AzureIdentity>),
    AzureIdentityBinding(Box<AzureIdentityBinding>),
    /// Checked, nothing asserted on it (MIC writes these; none ship).
    AzureAssignedIdentity,
    AzurePodIdentityException(Box<AzurePodIdentityException>),
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn yaml_files(dir: &str) -> anyhow::Result<Vec<PathBuf>> {
    let dir = repo_root().join(dir);
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(path);
        }
    }
    files.sort();
    ensure!(!files.is_empty(), "no YAML files in {}", dir.display());
    Ok(files)
}

/// Every non-empty YAML document of a file, as JSON values.
fn documents(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let mut docs = Vec::new();
    for (i, de) in serde_norway::Deserializer::from_str(&text).enumerate() {
        let doc = Value::deserialize(de)
            .with_context(|| format!("{}: document {i} is not YAML", path.display()))?;
        if !doc.is_null() {
            docs.push(doc);
        }
    }
    Ok(docs)
}

/// `orig` must survive a typed round trip: every key present, every scalar equal.
fn assert_subset(orig: &Value, back: &Value, at: &str) -> anyhow::Result<()> {
    match (orig, back) {
        (Value::Object(o), Value::Object(b)) => {
            for (k, v) in o {
                let Some(bv) = b.get(k) else {
                    bail!("unknown or misplaced field {at}.{k}");
                };
                assert_subset(v, bv, &format!("{at}.{k}"))?;
            }
            Ok(())
        }
        (Value::Array(o), Value::Array(b)) => {
            ensure!(
                o.len() == b.len(),
                "{at}: list length changed in round trip"
            );
            for (i, (ov, bv)) in o.iter().zip(b).enumerate() {
                assert_subset(ov, bv, &format!("{at}[{i}]"))?;
            }
            Ok(())
        }
        _ => {
            ensure!(orig == back, "{at}: {orig} became {back} in round trip");
            Ok(())
        }
    }
}

fn typed<T: DeserializeOwned + serde::Serialize>(doc: &Value) -> anyhow::Result<T> {
    let obj: T = serde_json::from_value(doc.clone())?;
    let back = serde_json::to_value(&obj)?;
    assert_subset(doc, &back, "")?;
    Ok(obj)
}

fn parse(doc: &Value) -> anyhow::Result<Object> {
    let api_version = doc["apiVersion"].as_str().context("no apiVersion")?;
    let kind = doc["kind"].as_str().context("no kind")?;
    Ok(match (api_version, kind) {
        ("v1", "Namespace") => {
            typed::<Namespace>(doc)?;
            Object::Namespace
        }
        ("v1", "ServiceAccount") => Object::ServiceAccount(typed(doc)?),
        ("v1", "Secret") => Object::Secret(typed(doc)?),
        ("v1", "Pod") => Object::Pod(typed(doc)?),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => Object::ClusterRole(typed(doc)?),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            Object::ClusterRoleBinding(typed(doc)?)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => Object::Role(typed(doc)?),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => Object::RoleBinding(typed(doc)?),
        ("apps/v1", "DaemonSet") => Object::DaemonSet(typed(doc)?),
        ("apps/v1", "Deployment") => Object::Deployment(typed(doc)?),
        ("aadpodidentity.k8s.io/v1", "AzureIdentity") => Object::AzureIdentity(typed(doc)?),
        ("aadpodidentity.k8s.io/v1", "AzureIdentityBinding") => {
            Object::AzureIdentityBinding(typed(doc)?)
        }
        ("aadpodidentity.k8s.io/v1", "AzureAssignedIdentity") => {
            typed::<AzureAssignedIdentity>(doc)?;
            Object::AzureAssignedIdentity
        }
        ("aadpodidentity.k8s.io/v1", "AzurePodIdentityException") => {
            Object::AzurePodIdentityException(typed(doc)?)
        }
        (a, k) => bail!("unexpected kind {a}/{k}"),
    })
}

/// All objects of one file, each parsed and round-tripped.
fn objects(path: &Path) -> anyhow::Result<Vec<Object>> {
    documents(path)?
        .iter()
        .enumerate()
        .map(|(i, doc)| parse(doc).with_context(|| format!("{}: document {i}", path.display())))
        .collect()
}

fn infra(file: &str) -> Vec<Object> {
    objects(&repo_root().join("deploy/infra").join(file)).expect("manifest parses")
}

fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or_default()
}

fn daemonset<'a>(objs: &'a [Object], name: &str) -> &'a DaemonSet {
    objs.iter()
        .find_map(|o| match o {
            Object::DaemonSet(d) if name_of(&d.metadata) == name => Some(&**d),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no DaemonSet {name}"))
}

fn deployment<'a>(objs: &'a [Object], name: &str) -> Option<&'a Deployment> {
    objs.iter().find_map(|o| match o {
        Object::Deployment(d) if name_of(&d.metadata) == name => Some(&**d),
        _ => None,
    })
}

fn cluster_role<'a>(objs: &'a [Object], name: &str) -> &'a ClusterRole {
    objs.iter()
        .find_map(|o| match o {
            Object::ClusterRole(r) if name_of(&r.metadata) == name => Some(&**r),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no ClusterRole {name}"))
}

fn pod_spec(template: &k8s_openapi::api::core::v1::PodTemplateSpec) -> &PodSpec {
    template.spec.as_ref().expect("pod template has a spec")
}

fn ds_pod_spec(ds: &DaemonSet) -> &PodSpec {
    pod_spec(&ds.spec.template)
}

fn container<'a>(spec: &'a PodSpec, name: &str) -> &'a Container {
    spec.containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn args(c: &Container) -> Vec<&str> {
    c.args.iter().flatten().map(String::as_str).collect()
}

/// `(verb set)` granted on `group/resource` by a list of rules (resource names ignored).
fn verbs(rules: &[PolicyRule], group: &str, resource: &str) -> BTreeSet<String> {
    rules
        .iter()
        .filter(|r| r.api_groups.iter().flatten().any(|g| g == group))
        .filter(|r| r.resources.iter().flatten().any(|x| x == resource))
        .flat_map(|r| r.verbs.iter().cloned())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn all_rules(objs: &[Object]) -> Vec<(String, &PolicyRule)> {
    let mut out = Vec::new();
    for o in objs {
        let (name, rules) = match o {
            Object::ClusterRole(r) => (name_of(&r.metadata), r.rules.as_deref()),
            Object::Role(r) => (name_of(&r.metadata), r.rules.as_deref()),
            _ => continue,
        };
        for rule in rules.unwrap_or_default() {
            out.push((name.to_owned(), rule));
        }
    }
    out
}

const WORKSPACE_VERSION: &str = env!("CARGO_PKG_VERSION");

fn probe(p: &Option<k8s_openapi::api::core::v1::Probe>) -> (String, String) {
    let get = p
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("HTTP probe");
    let port = match &get.port {
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => n.to_string(),
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s.clone(),
    };
    (get.path.clone().unwrap_or_default(), port)
}

/// The NMI DaemonSet invariants shared by standard and managed mode.
fn check_nmi(ds: &DaemonSet) -> &Container {
    let spec = ds_pod_spec(ds);
    assert_eq!(
        spec.host_network,
        Some(true),
        "NMI must run on the host network"
    );
    assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical"),
        "nmi fails closed: its eviction cuts the node's pods off IMDS"
    );
    let nmi = container(spec, "nmi");
    assert_eq!(
        nmi.image.as_deref(),
        Some(format!("ghcr.io/podid/nmi:v{WORKSPACE_VERSION}").as_str())
    );
    let a = args(nmi);
    assert!(a.contains(&"--node=$(NODE_NAME)"), "args {a:?}");
    assert!(a.contains(&"--http-probe-port=8085"), "args {a:?}");
    let node_env = nmi
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(node_env, Some("spec.nodeName"));
    assert_eq!(
        probe(&nmi.liveness_probe),
        ("/healthz".into(), "8085".into())
    );
    assert_eq!(
        probe(&nmi.readiness_probe),
        ("/readyz".into(), "8085".into())
    );
    let sc = nmi.security_context.as_ref().expect("securityContext");
    assert_ne!(sc.privileged, Some(true), "NMI must not be privileged");
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let added: BTreeSet<String> = caps.add.iter().flatten().cloned().collect();
    assert_eq!(
        added,
        set(&["NET_ADMIN", "NET_RAW"]),
        "only what iptables needs"
    );
    let lock = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| {
            v.host_path
                .as_ref()
                .is_some_and(|h| h.path == "/run/xtables.lock")
        })
        .expect("xtables lock hostPath");
    assert!(
        nmi.volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == lock.name && m.mount_path == "/run/xtables.lock"),
        "xtables lock mounted where iptables looks for it"
    );
    let requests = nmi
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .expect("requests");
    assert_eq!(requests.get("cpu").map(|q| q.0.as_str()), Some("10m"));
    assert_eq!(requests.get("memory").map(|q| q.0.as_str()), Some("32Mi"));
    assert!(
        nmi.resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .is_some(),
        "limits set"
    );
    nmi
}

#[test]
fn every_manifest_and_example_parses_into_known_kinds_without_unknown_fields() {
    let mut files = yaml_files("deploy/infra").expect("infra");
    files.extend(yaml_files("deploy/examples").expect("examples"));
    let mut count = 0;
    for file in &files {
        count += objects(file).expect("parses").len();
    }
    assert!(count >= 20, "only {count} objects in {files:?}");
}

#[test]
fn the_round_trip_check_rejects_a_misplaced_field() {
    let doc: Value = serde_json::json!({
        "apiVersion": "aadpodidentity.k8s.io/v1",
        "kind": "AzureIdentityBinding",
        "metadata": {"name": "b", "namespace": "default"},
        "spec": {"azureIdentity": "id", "selectr": "typo"}
    });
    let err = parse(&doc).expect_err("typo must be caught");
    assert!(format!("{err:#}").contains("spec.selectr"), "{err:#}");
    let doc: Value = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "x"},
        "spec": {"selector": {}, "template": {"spec": {"hostNetwrk": true, "containers": []}}}
    });
    assert!(parse(&doc).is_err());
    let doc: Value = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMapp"});
    assert!(parse(&doc).is_err());
}

#[test]
fn generated_crds_parse_and_cover_the_four_kinds() {
    let mut kinds = BTreeSet::new();
    for file in yaml_files("deploy/crds").expect("crds") {
        for doc in documents(&file).expect("yaml") {
            let crd: CustomResourceDefinition = typed(&doc).expect("CRD");
            assert_eq!(crd.spec.group, "aadpodidentity.k8s.io");
            kinds.insert(crd.spec.names.kind.clone());
        }
    }
    assert_eq!(
        kinds,
        set(&[
            "AzureAssignedIdentity",
            "AzureIdentity",
            "AzureIdentityBinding",
            "AzurePodIdentityException"
        ])
    );
}

#[test]
fn no_rbac_rule_uses_wildcards_or_crd_access() {
    for file in yaml_files("deploy/infra").expect("infra") {
        let objs = objects(&file).expect("parses");
        for (role, rule) in all_rules(&objs) {
            let fields = [
                rule.verbs.clone(),
                rule.resources.clone().unwrap_or_default(),
                rule.api_groups.clone().unwrap_or_default(),
            ];
            for f in fields.iter().flatten() {
                assert_ne!(f, "*", "{}: wildcard in role {role}", file.display());
            }
            assert!(
                !rule
                    .resources
                    .iter()
                    .flatten()
                    .any(|r| r == "customresourcedefinitions"),
                "{role}: podid never touches CRDs"
            );
            // Upstream's Endpoints lock (kept while --upstream-leader-lock is on, the default):
            // only in MIC's leader-election Role, reading and updating only that one object.
            if rule.resources.iter().flatten().any(|r| r == "endpoints") {
                assert_eq!(role, "aad-pod-id-mic-leader-election", "{}", file.display());
                if rule.verbs.iter().any(|v| v == "get" || v == "update") {
                    assert_eq!(
                        rule.resource_names.as_deref(),
                        Some(&["aad-pod-identity-mic".to_owned()][..]),
                        "{role}: only the lock object"
                    );
                }
            }
        }
    }
}

#[test]
fn standard_mode_nmi_runs_on_the_host_network_with_probes_and_node_name() {
    let objs = infra("deployment-rbac.yaml");
    let ds = daemonset(&objs, "nmi");
    assert_eq!(ds.metadata.namespace.as_deref(), Some("default"));
    let labels = ds.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels.get("component").map(String::as_str), Some("nmi"));
    assert_eq!(labels.get("tier").map(String::as_str), Some("node"));
    let selector = ds.spec.selector.match_labels.clone().unwrap_or_default();
    assert_eq!(
        selector,
        BTreeMap::from([
            ("component".to_owned(), "nmi".to_owned()),
            ("tier".to_owned(), "node".to_owned())
        ]),
        "selector is immutable: must equal upstream's for an in-place upgrade"
    );
    let nmi = check_nmi(ds);
    assert!(args(nmi).contains(&"--metadata-header-required=true"));
    assert!(
        !args(nmi)
            .iter()
            .any(|a| a.starts_with("--operation-mode=managed"))
    );
    let spec = ds_pod_spec(ds);
    assert_eq!(
        spec.service_account_name.as_deref(),
        Some("aad-pod-id-nmi-service-account")
    );
}

#[test]
fn standard_mode_rbac_matches_what_nmi_and_mic_do() {
    let objs = infra("deployment-rbac.yaml");
    let nmi = cluster_role(&objs, "aad-pod-id-nmi-role");
    let nmi_rules = nmi.rules.clone().unwrap_or_default();
    let read = set(&["get", "list", "watch"]);
    for r in [
        "azureidentities",
        "azureidentitybindings",
        "azurepodidentityexceptions",
        "azureassignedidentities",
    ] {
        assert_eq!(
            verbs(&nmi_rules, "aadpodidentity.k8s.io", r),
            read,
            "NMI on {r}"
        );
    }
    assert_eq!(verbs(&nmi_rules, "", "pods"), read);
    assert_eq!(verbs(&nmi_rules, "", "secrets"), set(&["get"]));
    assert_eq!(verbs(&nmi_rules, "", "events"), set(&["create", "patch"]));
    assert!(
        verbs(&nmi_rules, "", "serviceaccounts/token").is_empty(),
        "TokenRequest is opt-in (nmi-federated-rbac.yaml)"
    );
    assert!(
        verbs(&nmi_rules, "", "nodes").is_empty(),
        "patching nodes is opt-in (nmi-startup-taint-rbac.yaml)"
    );

    let mic = cluster_role(&objs, "aad-pod-id-mic-role");
    let mic_rules = mic.rules.clone().unwrap_or_default();
    assert_eq!(
        verbs(
            &mic_rules,
            "aadpodidentity.k8s.io",
            "azureassignedidentities"
        ),
        set(&[
            "get", "list", "watch", "create", "update", "patch", "delete"
        ])
    );
    assert_eq!(
        verbs(&mic_rules, "aadpodidentity.k8s.io", "azureidentities"),
        set(&["get", "list", "watch", "update"])
    );
    assert_eq!(
        verbs(
            &mic_rules,
            "aadpodidentity.k8s.io",
            "azurepodidentityexceptions"
        ),
        set(&["list", "update"])
    );
    assert_eq!(verbs(&mic_rules, "", "pods"), set(&["list", "watch"]));
    assert_eq!(verbs(&mic_rules, "", "nodes"), set(&["list", "watch"]));
    assert_eq!(
        verbs(&mic_rules, "", "configmaps"),
        set(&["get", "create", "update"])
    );
    assert!(
        verbs(&mic_rules, "", "secrets").is_empty(),
        "MIC reads no secrets"
    );

    // Leader election: a namespaced Role on the Lease, bound to MIC's service account.
    let lease_role = objs
        .iter()
        .find_map(|o| match o {
            Object::Role(r) => {
                let rules = r.rules.clone().unwrap_or_default();
                (!verbs(&rules, "coordination.k8s.io", "leases").is_empty())
                    .then_some((&**r, rules))
            }
            _ => None,
        })
        .expect("a Role on leases");
    assert_eq!(lease_role.0.metadata.namespace.as_deref(), Some("default"));
    assert_eq!(
        verbs(&lease_role.1, "coordination.k8s.io", "leases"),
        set(&["get", "create", "update"])
    );
    for rule in &lease_role.1 {
        if rule.verbs.iter().any(|v| v == "get" || v == "update") {
            assert_eq!(
                rule.resource_names.as_deref(),
                Some(&["aad-pod-identity-mic".to_owned()][..]),
                "get/update limited to the lock"
            );
        }
    }
    let bound = objs.iter().any(|o| match o {
        Object::RoleBinding(b) => {
            b.role_ref.name == name_of(&lease_role.0.metadata)
                && b.role_ref.kind == "Role"
                && b.subjects
                    .iter()
                    .flatten()
                    .any(|s| s.name == "aad-pod-id-mic-service-account")
        }
        _ => false,
    });
    assert!(bound, "Lease role bound to MIC's service account");

    // Every binding names a role and service account of this file.
    let sas: BTreeSet<(String, String)> = objs
        .iter()
        .filter_map(|o| match o {
            Object::ServiceAccount(s) => Some((
                s.metadata.namespace.clone().unwrap_or_default(),
                name_of(&s.metadata).to_owned(),
            )),
            _ => None,
        })
        .collect();
    for o in &objs {
        let (role_ref, subjects) = match o {
            Object::ClusterRoleBinding(b) => (&b.role_ref, &b.subjects),
            Object::RoleBinding(b) => (&b.role_ref, &b.subjects),
            _ => continue,
        };
        let exists = objs.iter().any(|r| match (r, role_ref.kind.as_str()) {
            (Object::ClusterRole(c), "ClusterRole") => name_of(&c.metadata) == role_ref.name,
            (Object::Role(c), "Role") => name_of(&c.metadata) == role_ref.name,
            _ => false,
        });
        assert!(
            exists,
            "binding to missing {} {}",
            role_ref.kind, role_ref.name
        );
        for s in subjects.iter().flatten() {
            let key = (s.namespace.clone().unwrap_or_default(), s.name.clone());
            assert!(
                sas.contains(&key),
                "binding to missing service account {key:?}"
            );
        }
    }
}

#[test]
fn standard_mode_mic_is_leader_elected_and_exempted_from_nmi() {
    let objs = infra("deployment-rbac.yaml");
    let mic = deployment(&objs, "mic").expect("mic Deployment");
    let dspec = &mic.spec;
    assert_eq!(dspec.replicas, Some(2));
    let spec = pod_spec(&dspec.template);
    assert_ne!(spec.host_network, Some(true));
    assert_eq!(
        spec.service_account_name.as_deref(),
        Some("aad-pod-id-mic-service-account")
    );
    let c = container(spec, "mic");
    assert_eq!(
        c.image.as_deref(),
        Some(format!("ghcr.io/podid/mic:v{WORKSPACE_VERSION}").as_str())
    );
    assert!(args(c).contains(&"--cloudconfig=/etc/kubernetes/azure.json"));
    assert_eq!(probe(&c.liveness_probe), ("/healthz".into(), "8080".into()));
    let ns_env = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "MIC_POD_NAMESPACE")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(
        ns_env,
        Some("metadata.namespace"),
        "MIC refuses to start without it"
    );
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert!(
        sc.capabilities
            .as_ref()
            .and_then(|c| c.add.as_ref())
            .is_none()
    );

    // The exception lives in mic-exception.yaml (applied after the CRDs), not in this file: a
    // custom resource in the same file as the Deployment fails on a cluster without the CRDs.
    assert!(
        !objs
            .iter()
            .any(|o| matches!(o, Object::AzurePodIdentityException(_))),
        "deployment-rbac.yaml must not carry a custom resource"
    );
    let pod_labels = dspec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let exceptions = infra("mic-exception.yaml");
    let mic_exception = mic_exception(&exceptions, "mic-exception");
    assert_eq!(mic_exception.metadata.namespace, mic.metadata.namespace);
    assert!(
        mic_exception.excepts(&pod_labels),
        "mic-exception does not match MIC's pods ({pod_labels:?})"
    );
}

/// The shipped MIC exception in `name` among `objs`.
fn mic_exception<'a>(objs: &'a [Object], name: &str) -> &'a AzurePodIdentityException {
    objs.iter()
        .find_map(|o| match o {
            Object::AzurePodIdentityException(e) if name_of(&e.metadata) == name => Some(&**e),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no AzurePodIdentityException {name}"))
}

/// Pods an attacker who may create pods in MIC's namespace would label to be excepted (and so
/// reach the node's own identity): every label upstream's exceptions matched, and the chart's
/// generic component label.
fn claimed_mic_labels() -> Vec<BTreeMap<String, String>> {
    [
        ("app", "mic"),
        ("component", "mic"),
        ("app.kubernetes.io/component", "mic"),
        ("app.kubernetes.io/name", "aad-pod-identity"),
        ("k8s-app", "aad-pod-id"),
    ]
    .iter()
    .map(|(k, v)| BTreeMap::from([((*k).to_owned(), (*v).to_owned())]))
    .chain(std::iter::once(BTreeMap::from([
        ("app".to_owned(), "mic".to_owned()),
        ("component".to_owned(), "mic".to_owned()),
        ("app.kubernetes.io/component".to_owned(), "mic".to_owned()),
    ])))
    .collect()
}

#[test]
fn the_shipped_mic_exception_matches_only_a_podid_label() {
    let exceptions = infra("mic-exception.yaml");
    let exception = mic_exception(&exceptions, "mic-exception");
    let wanted = exception.spec.pod_labels.clone().unwrap_or_default();
    assert!(!wanted.is_empty());
    for key in wanted.keys() {
        assert!(
            key.starts_with("podid.io/"),
            "mic-exception matches the generic label {key}"
        );
    }
    for labels in claimed_mic_labels() {
        assert!(
            !exception.excepts(&labels),
            "a pod labelled {labels:?} is excepted by mic-exception"
        );
    }
}

#[test]
fn managed_mode_is_nmi_only_in_kube_system() {
    let objs = infra("managed-mode-deployment.yaml");
    assert!(deployment(&objs, "mic").is_none());
    let ds = daemonset(&objs, "nmi");
    assert_eq!(ds.metadata.namespace.as_deref(), Some("kube-system"));
    let nmi = check_nmi(ds);
    let a = args(nmi);
    assert!(a.contains(&"--operation-mode=managed"), "{a:?}");
    assert!(a.contains(&"--forceNamespaced"), "{a:?}");
    let role = cluster_role(&objs, "aad-pod-id-nmi-role");
    let rules = role.rules.clone().unwrap_or_default();
    // nmi watches assignments in every mode and serves nothing until that watch has synced.
    assert_eq!(
        verbs(&rules, "aadpodidentity.k8s.io", "azureassignedidentities"),
        set(&["get", "list", "watch"])
    );
    assert_eq!(
        verbs(&rules, "aadpodidentity.k8s.io", "azureidentities"),
        set(&["get", "list", "watch"])
    );
}

#[test]
fn federated_token_rbac_is_a_separate_opt_in() {
    let objs = infra("nmi-federated-rbac.yaml");
    let role = cluster_role(&objs, "aad-pod-id-nmi-federated-role");
    let rules = role.rules.clone().unwrap_or_default();
    assert_eq!(rules.len(), 1);
    assert_eq!(verbs(&rules, "", "serviceaccounts/token"), set(&["create"]));
    let bound = objs.iter().any(|o| match o {
        Object::ClusterRoleBinding(b) => {
            b.role_ref.name == "aad-pod-id-nmi-federated-role"
                && b.subjects
                    .iter()
                    .flatten()
                    .any(|s| s.name == "aad-pod-id-nmi-service-account")
        }
        _ => false,
    });
    assert!(bound);
}

#[test]
fn startup_taint_rbac_is_a_separate_opt_in_limited_to_get_and_patch_on_nodes() {
    let objs = infra("nmi-startup-taint-rbac.yaml");
    let role = cluster_role(&objs, "aad-pod-id-nmi-startup-taint-role");
    let rules = role.rules.clone().unwrap_or_default();
    assert_eq!(rules.len(), 1);
    assert_eq!(verbs(&rules, "", "nodes"), set(&["get", "patch"]));
    let bound = objs.iter().any(|o| match o {
        Object::ClusterRoleBinding(b) => {
            b.role_ref.name == "aad-pod-id-nmi-startup-taint-role"
                && b.subjects
                    .iter()
                    .flatten()
                    .any(|s| s.name == "aad-pod-id-nmi-service-account")
        }
        _ => false,
    });
    assert!(bound);
}

#[test]
fn uninstall_daemonset_runs_the_uninstall_subcommand_on_every_node() {
    let objs = infra("uninstall-interception.yaml");
    let ds = daemonset(&objs, "podid-uninstall-interception");
    let spec = ds_pod_spec(ds);
    assert_eq!(
        spec.host_network,
        Some(true),
        "the rules live in the node's netns"
    );
    let init = spec.init_containers.as_deref().unwrap_or_default();
    assert_eq!(init.len(), 1);
    assert_eq!(args(&init[0]), ["uninstall-interception"]);
    let caps = init[0]
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.add.clone())
        .unwrap_or_default();
    assert!(caps.contains(&"NET_ADMIN".to_owned()));
    assert!(
        spec.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "must reach every node nmi ran on"
    );
}

#[test]
fn examples_reference_objects_that_exist() {
    let mut objs = Vec::new();
    for file in yaml_files("deploy/examples").expect("examples") {
        objs.extend(objects(&file).expect("parses"));
    }
    let ns_name = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        (
            m.namespace.clone().unwrap_or_default(),
            m.name.clone().unwrap_or_default(),
        )
    };
    let identities: BTreeMap<(String, String), &AzureIdentity> = objs
        .iter()
        .filter_map(|o| match o {
            Object::AzureIdentity(i) => Some((ns_name(&i.metadata), &**i)),
            _ => None,
        })
        .collect();
    let secrets: BTreeMap<(String, String), &Secret> = objs
        .iter()
        .filter_map(|o| match o {
            Object::Secret(s) => Some((ns_name(&s.metadata), &**s)),
            _ => None,
        })
        .collect();
    let mut types = BTreeSet::new();
    for ((ns, name), id) in &identities {
        types.insert(id.identity_type().as_i64());
        assert!(
            id.spec.client_id.as_deref().is_some_and(|c| !c.is_empty()),
            "{ns}/{name}: clientID"
        );
        match id.identity_type() {
            IdentityType::UserAssignedMsi => {
                let rid = id.spec.resource_id.as_deref().unwrap_or_default();
                assert!(
                    rid.starts_with("/subscriptions/")
                        && rid.contains(
                            "/providers/Microsoft.ManagedIdentity/userAssignedIdentities/"
                        ),
                    "{ns}/{name}: resourceID {rid}"
                );
            }
            IdentityType::ServicePrincipal => {
                assert!(id.spec.tenant_id.is_some(), "{ns}/{name}: tenantID");
                let r = id.spec.client_password.as_ref().expect("clientPassword");
                let key = (
                    r.namespace.clone().unwrap_or_default(),
                    r.name.clone().unwrap_or_default(),
                );
                let secret = secrets.get(&key).expect("referenced Secret exists");
                assert!(
                    secret
                        .string_data
                        .as_ref()
                        .is_some_and(|d| d.contains_key("clientSecret")),
                    "secret key must be clientSecret"
                );
            }
            other => panic!("{ns}/{name}: unexpected type {other:?}"),
        }
    }
    assert!(types.contains(&0) && types.contains(&1), "types {types:?}");
    assert!(
        identities.values().any(|i| i.is_namespaced()),
        "a namespaced identity example"
    );

    let mut selectors = BTreeMap::new();
    for o in &objs {
        if let Object::AzureIdentityBinding(b) = o {
            let (ns, name) = ns_name(&b.metadata);
            let id = b.spec.azure_identity.clone().unwrap_or_default();
            assert!(
                identities.contains_key(&(ns.clone(), id.clone())),
                "binding {ns}/{name} names missing identity {id}"
            );
            selectors.insert((ns, b.spec.selector.clone().unwrap_or_default()), id);
        }
    }
    assert!(
        objs.iter()
            .any(|o| matches!(o, Object::AzurePodIdentityException(_))),
        "an exception example"
    );
    let mut pods = 0;
    for o in &objs {
        if let Object::Pod(p) = o {
            pods += 1;
            let (ns, name) = ns_name(&p.metadata);
            let label = p
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(podid_api::POD_LABEL_KEY))
                .unwrap_or_else(|| panic!("pod {ns}/{name} has no aadpodidbinding label"));
            let identity = selectors
                .get(&(ns.clone(), label.clone()))
                .unwrap_or_else(|| panic!("pod {ns}/{name}: no binding in its namespace"));
            let id = identities
                .get(&(ns.clone(), identity.clone()))
                .expect("checked above");
            if id.is_namespaced() {
                assert_eq!(id.metadata.namespace.as_deref(), Some(ns.as_str()));
            }
        }
    }
    assert!(pods >= 1);
}
