//! The Helm chart rendered by the real Helm engine (tests/scripts/helm.py, the Helm library
//! bundled as a Python extension) for each values case a user meets: the defaults, standard mode
//! with every key set, managed mode, `adminsecret`, `rbac.enabled: false`, and an upstream values
//! file (which must fail with a message naming the keys to drop). `helm lint --strict` is clean
//! for every case, and the rendered objects keep the invariants the plain manifests are held to.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};
use serde_json::{Value, json};

fn root() -> PathBuf {
    podid_e2e::workspace_root()
}

fn chart() -> PathBuf {
    root().join("deploy/charts/podid")
}

/// Runs tests/scripts/helm.py; `Ok(Ok(stdout))` on success, `Ok(Err(stderr))` when Helm refused.
fn helm(args: &[&str]) -> anyhow::Result<Result<String, String>> {
    let python = podid_e2e::python()?;
    let output = Command::new(&python)
        .arg(root().join("tests/scripts/helm.py"))
        .args(args)
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    let stdout = String::from_utf8(output.stdout)?;
    let stderr = String::from_utf8(output.stderr)?;
    match output.status.code() {
        Some(0) => Ok(Ok(stdout)),
        Some(1 | 2) => Ok(Err(format!("{stdout}{stderr}"))),
        _ => bail!("helm.py failed: {stderr}"),
    }
}

/// A values case: a name and the values given with `--set-json`.
struct Case {
    name: &'static str,
    namespace: &'static str,
    values: Value,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "defaults",
            namespace: "kube-system",
            values: json!({}),
        },
        Case {
            name: "standard, every key set",
            namespace: "identity",
            values: every_key_set(),
        },
        Case {
            name: "managed mode",
            namespace: "kube-system",
            values: json!({"operationMode": "managed", "forceNamespaced": "true"}),
        },
        Case {
            name: "adminsecret",
            namespace: "kube-system",
            values: json!({"adminsecret": {
                "cloud": "AzurePublicCloud",
                "subscriptionID": "00000000-0000-0000-0000-000000000001",
                "resourceGroup": "rg",
                "vmType": "vmss",
                "tenantID": "00000000-0000-0000-0000-000000000002",
                "clientID": "00000000-0000-0000-0000-000000000003",
                "clientSecret": "not-a-real-secret",
            }}),
        },
        Case {
            name: "rbac disabled",
            namespace: "kube-system",
            values: json!({"rbac": {"enabled": false}}),
        },
    ]
}

fn every_key_set() -> Value {
    json!({
        "imagePullSecrets": [{"name": "pull"}],
        "forceNamespaced": "true",
        "customUserAgent": "tests",
        "mic": {
            "priorityClassName": "system-cluster-critical",
            "logVerbosity": 4,
            "loggingFormat": "json",
            "replicas": 3,
            "podAnnotations": {"a": "b"},
            "podLabels": {"team": "platform"},
            "tolerations": [{"operator": "Exists"}],
            "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "mic"}}}],
            "podDisruptionBudget": {"minAvailable": 1},
            "leaderElection": {"instance": "x", "namespace": "identity", "name": "lock", "duration": "20s"},
            "probePort": "8081",
            "syncRetryDuration": "1800s",
            "immutableUserMSIs": ["00000000-0000-0000-0000-000000000004"],
            "createDeleteBatch": "10",
            "clientQps": "10",
            "prometheusPort": "8889",
            "customCloud": {"enabled": true},
            "updateUserMSIMaxRetry": "3",
            "updateUserMSIRetryInterval": "2s",
            "identityAssignmentReconcileInterval": "5m",
            "releaseFinishedPods": "false",
            "upstreamLeaderLock": false,
            "identityReleaseGracePeriod": 0,
            "identityLimitPerVm": "50",
        },
        "nmi": {
            "logVerbosity": 2,
            "loggingFormat": "json",
            "podAnnotations": {"a": "b"},
            "podLabels": {"team": "platform"},
            "affinity": {"nodeAffinity": {}},
            "ipTableUpdateTimeIntervalInSeconds": "30",
            "micNamespace": "identity",
            "probePort": "8086",
            "retryAttemptsForCreated": "10",
            "retryAttemptsForAssigned": "3",
            "findIdentityRetryIntervalInSeconds": "2",
            "enableScaleFeatures": false,
            "prometheusPort": "9091",
            "blockInstanceMetadata": "true",
            "metadataHeaderRequired": false,
            "allowNetworkPluginKubenet": true,
            "setRetryAfterHeader": true,
            "enableConntrackDeletion": true,
            "enableHostToken": true,
            "errorFormat": "text",
            "notFoundForFinalRefusals": true,
            "manageRouteLocalnet": "false",
            "federatedDefaultTenantID": "00000000-0000-0000-0000-000000000002",
            "federatedAuthorityHost": "https://login.microsoftonline.us/",
            "serveWorkloadIdentityPods": true,
            "startupTaint": "podid.io/nmi-not-ready",
            "allowedAuthorities": ["https://login.example.net/", "https://entra.internal.example/"],
            "allowCrossNamespaceSecrets": true,
        },
        "rbac": {"createUserFacingClusterRoles": true, "allowServiceAccountTokens": true},
        "monitoring": {
            "grafanaDashboard": {"enabled": true, "namespace": "grafana"},
            "prometheusRule": {"enabled": true, "labels": {"release": "prometheus"}},
        },
        "azureIdentities": {
            "app": {
                "namespace": "team-a",
                "type": 0,
                "resourceID": "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/app",
                "clientID": "00000000-0000-0000-0000-000000000005",
                "binding": {"name": "app-binding", "selector": "app"},
            },
        },
    })
}

fn render(case: &Case) -> anyhow::Result<Result<Vec<Value>, String>> {
    let values = case.values.to_string();
    let rendered = helm(&[
        "render",
        chart().to_str().context("utf-8 path")?,
        "podid",
        case.namespace,
        "--set-json",
        &values,
    ])?;
    Ok(match rendered {
        Ok(text) => Ok(documents(&text)?),
        Err(message) => Err(message),
    })
}

fn documents(text: &str) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for doc in serde_norway::Deserializer::from_str(text) {
        let value: Value = serde::Deserialize::deserialize(doc).context("rendered YAML")?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

fn rendered(case: &Case) -> Vec<Value> {
    match render(case).expect("helm.py runs") {
        Ok(objects) => objects,
        Err(message) => panic!("{}: render failed: {message}", case.name),
    }
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn args(container: &Value) -> Vec<String> {
    container["args"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn helm_lint_strict_is_clean_for_every_values_case() {
    for case in cases() {
        let values = case.values.to_string();
        let dir = std::env::temp_dir().join(format!("podid-lint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("values.json");
        std::fs::write(&file, &values).expect("write values");
        let result = helm(&[
            "lint",
            chart().to_str().expect("utf-8"),
            "--namespace",
            case.namespace,
            "--values",
            file.to_str().expect("utf-8"),
        ])
        .expect("helm.py runs");
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(findings) = result {
            panic!("{}: helm lint --strict: {findings}", case.name);
        }
    }
}

#[test]
fn every_values_case_renders_objects_with_names_and_no_wildcard_rbac() {
    for case in cases() {
        let objects = rendered(&case);
        assert!(!objects.is_empty(), "{}: nothing rendered", case.name);
        for object in &objects {
            assert!(
                object["apiVersion"].is_string() && object["kind"].is_string(),
                "{}: {object}",
                case.name
            );
            assert!(
                object["metadata"]["name"].is_string(),
                "{}: {object}",
                case.name
            );
            for rule in object["rules"].as_array().into_iter().flatten() {
                for field in ["verbs", "resources", "apiGroups"] {
                    assert!(
                        !rule[field]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|v| v == "*"),
                        "{}: wildcard {field} in {}",
                        case.name,
                        object["metadata"]["name"]
                    );
                }
                assert!(
                    !rule["resources"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|v| v == "customresourcedefinitions"),
                    "{}: CRD access",
                    case.name
                );
            }
        }
        let daemonsets = of_kind(&objects, "DaemonSet");
        assert_eq!(daemonsets.len(), 1, "{}", case.name);
        let nmi = daemonsets[0];
        let pod = &nmi["spec"]["template"]["spec"];
        assert_eq!(pod["hostNetwork"], true, "{}", case.name);
        let c = container(nmi, "nmi");
        assert_eq!(
            c["readinessProbe"]["httpGet"]["path"], "/readyz",
            "{}",
            case.name
        );
        let capabilities: BTreeSet<&str> = c["securityContext"]["capabilities"]["add"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(
            capabilities,
            BTreeSet::from(["NET_ADMIN", "NET_RAW"]),
            "{}",
            case.name
        );
        assert!(
            args(c).iter().any(|a| a == "--node=$(NODE_NAME)"),
            "{}: {:?}",
            case.name,
            args(c)
        );
        if case.name != "standard, every key set" {
            assert_eq!(
                pod["priorityClassName"], "system-node-critical",
                "{}: nmi fails closed, its eviction must be the last resort",
                case.name
            );
        }
    }
}

#[test]
fn every_key_set_reaches_the_flags() {
    let case = &cases()[1];
    let objects = rendered(case);
    let nmi = container(of_kind(&objects, "DaemonSet")[0], "nmi");
    let nmi_args = args(nmi);
    for flag in [
        "--ipt-update-interval-sec=30",
        "--http-probe-port=8086",
        "--retry-attempts-for-created=10",
        "--prometheus-port=9091",
        "--block-instance-metadata=true",
        "--error-format=text",
        "--not-found-for-final-refusals=true",
        "--allowed-authorities=https://login.example.net/,https://entra.internal.example/",
        "--allow-cross-namespace-secrets=true",
        "--manage-route-localnet=false",
        "--serve-workload-identity-pods",
    ] {
        assert!(
            nmi_args.iter().any(|a| a.starts_with(flag)),
            "nmi lacks {flag}: {nmi_args:?}"
        );
    }
    let namespaced = nmi["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "FORCENAMESPACED");
    assert_eq!(
        namespaced.map(|e| e["value"].clone()),
        Some(json!("true")),
        "forceNamespaced reaches nmi as FORCENAMESPACED"
    );
    let mic = container(of_kind(&objects, "Deployment")[0], "mic");
    let mic_args = args(mic);
    for flag in [
        "--leader-election-name=lock",
        "--leader-election-namespace=identity",
        "--createDeleteBatch=10",
        "--clientQps=10",
        "--release-finished-pods=false",
        "--upstream-leader-lock=false",
        "--identity-release-grace-period=0",
        "--identity-limit-per-vm=50",
    ] {
        assert!(
            mic_args.iter().any(|a| a.starts_with(flag)),
            "mic lacks {flag}: {mic_args:?}"
        );
    }
    assert_eq!(of_kind(&objects, "PodDisruptionBudget").len(), 1);
    assert_eq!(of_kind(&objects, "AzureIdentity").len(), 1);
    assert_eq!(of_kind(&objects, "AzureIdentityBinding").len(), 1);
}

#[test]
fn managed_mode_renders_nmi_only_and_lets_it_watch_what_it_waits_for() {
    let objects = rendered(&cases()[2]);
    assert!(
        of_kind(&objects, "Deployment").is_empty(),
        "no MIC in managed mode"
    );
    assert!(
        of_kind(&objects, "AzurePodIdentityException")
            .iter()
            .all(|e| e["metadata"]["name"] != "mic"),
        "no MIC exception without MIC"
    );
    let nmi_args = args(container(of_kind(&objects, "DaemonSet")[0], "nmi"));
    assert!(
        nmi_args.iter().any(|a| a == "--operation-mode=managed"),
        "{nmi_args:?}"
    );
    // nmi watches every one of the four kinds (assignments included) and serves nothing until
    // each watch has synced: the role must let it.
    let role = of_kind(&objects, "ClusterRole")
        .into_iter()
        .find(|r| r["metadata"]["name"] == "aad-pod-identity-nmi")
        .expect("nmi ClusterRole");
    for resource in [
        "azureidentities",
        "azureidentitybindings",
        "azureassignedidentities",
        "azurepodidentityexceptions",
    ] {
        let verbs: BTreeSet<&str> = role["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| {
                r["resources"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|x| x == resource)
            })
            .flat_map(|r| r["verbs"].as_array().into_iter().flatten())
            .filter_map(Value::as_str)
            .collect();
        assert!(
            ["get", "list", "watch"].iter().all(|v| verbs.contains(v)),
            "nmi cannot watch {resource} in managed mode: {verbs:?}"
        );
    }
}

#[test]
fn adminsecret_goes_into_a_secret_mic_reads() {
    let objects = rendered(&cases()[3]);
    let secrets = of_kind(&objects, "Secret");
    assert_eq!(secrets.len(), 1);
    let mic = of_kind(&objects, "Deployment")[0];
    let text = mic.to_string();
    let secret_name = secrets[0]["metadata"]["name"].as_str().expect("name");
    assert!(text.contains(secret_name), "mic does not use {secret_name}");
    assert!(
        !text.contains("not-a-real-secret"),
        "the client secret must not be inline in the Deployment"
    );
}

#[test]
fn rbac_disabled_renders_no_rbac_and_no_service_accounts() {
    let objects = rendered(&cases()[4]);
    for kind in [
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ServiceAccount",
    ] {
        assert!(
            of_kind(&objects, kind).is_empty(),
            "{kind} rendered with rbac.enabled=false"
        );
    }
    for workload in of_kind(&objects, "DaemonSet")
        .into_iter()
        .chain(of_kind(&objects, "Deployment"))
    {
        assert!(workload["spec"]["template"]["spec"]["serviceAccountName"].is_null());
    }
}

/// What `helm get values` prints for a typical aad-pod-identity release that pinned its images.
fn upstream_values() -> Value {
    json!({
        "image": {"repository": "mcr.microsoft.com/oss/azure/aad-pod-identity"},
        "mic": {"tag": "v1.8.17", "logVerbosity": 2},
        "nmi": {"tag": "v1.8.17", "allowNetworkPluginKubenet": false},
        "forceNamespaced": "false",
        "installMICException": "true",
    })
}

#[test]
fn an_upstream_values_file_fails_at_render_time_naming_the_keys_to_drop() {
    let case = Case {
        name: "upstream values",
        namespace: "default",
        values: upstream_values(),
    };
    let message = match render(&case).expect("helm.py runs") {
        Ok(_) => panic!("an upstream values file rendered the Go images without an error"),
        Err(message) => message,
    };
    for key in ["image.repository", "mic.tag", "nmi.tag", "Drop these keys"] {
        assert!(
            message.contains(key),
            "the message does not name {key}: {message}"
        );
    }
    // Only the image keys are the problem: without them the same file renders.
    let mut kept = upstream_values();
    kept.as_object_mut().expect("map").remove("image");
    for component in ["mic", "nmi"] {
        kept[component].as_object_mut().expect("map").remove("tag");
    }
    let objects = rendered(&Case {
        name: "upstream values without image keys",
        namespace: "default",
        values: kept,
    });
    let image = container(of_kind(&objects, "DaemonSet")[0], "nmi")["image"].clone();
    assert_eq!(
        image,
        format!("ghcr.io/podid/nmi:v{}", env!("CARGO_PKG_VERSION"))
    );
    // A mirrored registry or a single pinned tag is caught too.
    for values in [
        json!({"image": {"repository": "myregistry.azurecr.io/oss/azure/aad-pod-identity/"}}),
        json!({"nmi": {"tag": "v1.7.4"}}),
    ] {
        let refused = render(&Case {
            name: "partial",
            namespace: "default",
            values: values.clone(),
        })
        .expect("helm.py runs");
        assert!(refused.is_err(), "{values} rendered");
    }
}

#[test]
fn the_rendered_mic_exception_matches_only_podid_mic_pods() {
    let objects = rendered(&cases()[0]);
    let mic = of_kind(&objects, "Deployment")[0];
    let pod_labels: BTreeMap<String, String> =
        serde_json::from_value(mic["spec"]["template"]["metadata"]["labels"].clone())
            .expect("labels");
    let exception: podid_api::AzurePodIdentityException = serde_json::from_value(
        of_kind(&objects, "AzurePodIdentityException")
            .into_iter()
            .find(|e| e["metadata"]["name"] == "mic")
            .expect("the mic exception")
            .clone(),
    )
    .expect("exception parses");
    assert_eq!(exception.metadata.namespace.as_deref(), Some("kube-system"));
    assert!(exception.excepts(&pod_labels), "{pod_labels:?}");
    for key in exception.spec.pod_labels.iter().flatten().map(|(k, _)| k) {
        assert!(
            key.starts_with("podid.io/"),
            "generic label {key} in the exception"
        );
    }
    // A pod in the release namespace carrying every label MIC carries except the podid one.
    let mut claimed = pod_labels.clone();
    claimed.retain(|k, _| !k.starts_with("podid.io/"));
    claimed.extend([
        ("app".to_owned(), "mic".to_owned()),
        ("component".to_owned(), "mic".to_owned()),
    ]);
    assert!(!exception.excepts(&claimed), "{claimed:?} is excepted");
}

#[test]
fn the_chart_covers_every_kind_of_the_plain_manifests_and_locks_a_lease() {
    let objects = rendered(&cases()[1]);
    let chart_kinds: BTreeSet<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    for file in [
        "deployment-rbac.yaml",
        "mic-exception.yaml",
        "nmi-federated-rbac.yaml",
    ] {
        let text = std::fs::read_to_string(root().join("deploy/infra").join(file)).expect("read");
        for object in documents(&text).expect("manifest parses") {
            let kind = object["kind"].as_str().expect("kind");
            assert!(
                chart_kinds.contains(kind),
                "{file}: chart renders no {kind}"
            );
        }
    }
    let lease_rules: Vec<&Value> = of_kind(&objects, "Role")
        .into_iter()
        .flat_map(|r| r["rules"].as_array().into_iter().flatten())
        .filter(|r| {
            r["apiGroups"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|g| g == "coordination.k8s.io")
        })
        .collect();
    assert!(!lease_rules.is_empty(), "MIC's leader lock is a Lease");
}

/// The rules of every role on core `endpoints`.
fn endpoints_rules(objects: &[Value]) -> Vec<Value> {
    objects
        .iter()
        .filter(|o| o["kind"] == "Role" || o["kind"] == "ClusterRole")
        .flat_map(|o| o["rules"].as_array().cloned().unwrap_or_default())
        .filter(|r| {
            r["resources"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|r| r == "endpoints")
        })
        .collect()
}

/// `endpoints` RBAC (upstream's leader lock) exactly while `mic.upstreamLeaderLock` is on, in
/// the leader-election namespace, reading and updating only the lock's name; off, MIC gets
/// `--upstream-leader-lock=false` and no `endpoints` rule at all.
#[test]
fn endpoints_rbac_exists_exactly_while_the_upstream_leader_lock_is_on() {
    for (values, on) in [
        (json!({}), true),
        (json!({"mic": {"upstreamLeaderLock": true}}), true),
        (json!({"mic": {"upstreamLeaderLock": "true"}}), true),
        (
            json!({"mic": {"upstreamLeaderLock": true, "leaderElection": {"namespace": "identity", "name": "lock"}}}),
            true,
        ),
        (json!({"mic": {"upstreamLeaderLock": false}}), false),
        (json!({"mic": {"upstreamLeaderLock": "false"}}), false),
    ] {
        let case = Case {
            name: "upstream leader lock",
            namespace: "kube-system",
            values: values.clone(),
        };
        let objects = rendered(&case);
        let rules = endpoints_rules(&objects);
        let mic_args = args(container(of_kind(&objects, "Deployment")[0], "mic"));
        let off_flag = mic_args.iter().any(|a| a == "--upstream-leader-lock=false");
        assert_eq!(off_flag, !on, "{values}: {mic_args:?}");
        if !on {
            assert_eq!(rules, Vec::<Value>::new(), "{values}: no Endpoints access");
            continue;
        }
        let name = values["mic"]["leaderElection"]["name"]
            .as_str()
            .unwrap_or("aad-pod-identity-mic");
        let namespace = values["mic"]["leaderElection"]["namespace"]
            .as_str()
            .unwrap_or("default");
        let verbs: BTreeSet<String> = rules
            .iter()
            .flat_map(|r| r["verbs"].as_array().cloned().unwrap_or_default())
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
        assert_eq!(
            verbs,
            BTreeSet::from(["create".to_owned(), "get".to_owned(), "update".to_owned()]),
            "{values}"
        );
        for rule in &rules {
            let verbs = rule["verbs"].as_array().cloned().unwrap_or_default();
            if verbs.iter().any(|v| v == "get" || v == "update") {
                assert_eq!(rule["resourceNames"], json!([name]), "{values}: {rule}");
            }
        }
        let role = objects
            .iter()
            .find(|o| o["kind"] == "Role" && !endpoints_rules(std::slice::from_ref(o)).is_empty())
            .expect("the endpoints rules are in a Role");
        assert_eq!(role["metadata"]["namespace"], namespace, "{values}");
        assert!(
            of_kind(&objects, "ClusterRole")
                .iter()
                .all(|r| endpoints_rules(std::slice::from_ref(*r)).is_empty()),
            "{values}: never cluster-wide"
        );
    }
}

/// nmi's node RBAC, a toleration and the flag only when `nmi.startupTaint` is set.
#[test]
fn the_startup_taint_brings_its_flag_toleration_and_node_rbac_only_when_set() {
    let node_rules = |objects: &[Value]| -> Vec<Value> {
        objects
            .iter()
            .filter(|o| o["metadata"]["name"] == "aad-pod-identity-nmi")
            .flat_map(|o| o["rules"].as_array().cloned().unwrap_or_default())
            .filter(|r| {
                r["resources"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|x| x == "nodes")
            })
            .collect()
    };
    let set = rendered(&cases()[1]);
    let nmi = of_kind(&set, "DaemonSet")[0];
    assert!(
        args(container(nmi, "nmi"))
            .iter()
            .any(|a| a == "--startup-taint=podid.io/nmi-not-ready")
    );
    assert!(
        nmi["spec"]["template"]["spec"]["tolerations"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| t["key"] == "podid.io/nmi-not-ready" || t["operator"] == "Exists"),
        "nmi must tolerate the taint it removes"
    );
    let rules = node_rules(&set);
    assert_eq!(rules.len(), 1, "{rules:?}");
    let verbs: BTreeSet<&str> = rules[0]["verbs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(verbs, BTreeSet::from(["get", "patch"]));
    for case in [&cases()[0], &cases()[2]] {
        let objects = rendered(case);
        assert!(
            node_rules(&objects).is_empty(),
            "{}: node RBAC without the taint",
            case.name
        );
        assert!(
            !args(container(of_kind(&objects, "DaemonSet")[0], "nmi"))
                .iter()
                .any(|a| a.starts_with("--startup-taint")),
            "{}",
            case.name
        );
    }
}

/// The opt-in dashboard ConfigMap (with the sidecar's label) and PrometheusRule carry the
/// shipped files, and promtool accepts the rendered rules; neither is rendered by default.
#[test]
fn monitoring_objects_carry_the_shipped_dashboard_and_rules_only_when_asked() {
    let objects = rendered(&cases()[1]);
    let dashboards = of_kind(&objects, "ConfigMap");
    assert_eq!(dashboards.len(), 1);
    let dashboard = dashboards[0];
    assert_eq!(dashboard["metadata"]["namespace"], "grafana");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/monitoring/podid-dashboard.json"))
            .expect("dashboard"),
    )
    .expect("JSON");
    let carried: Value = serde_json::from_str(
        dashboard["data"]["podid-dashboard.json"]
            .as_str()
            .expect("data"),
    )
    .expect("the ConfigMap holds JSON");
    assert_eq!(carried, shipped);

    let rules = of_kind(&objects, "PrometheusRule");
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0]["metadata"]["labels"]["release"], "prometheus");
    let shipped: Value = serde_norway::from_str(
        &std::fs::read_to_string(root().join("deploy/monitoring/podid-alerts.rules.yaml"))
            .expect("rules"),
    )
    .expect("YAML");
    assert_eq!(rules[0]["spec"], shipped);
    let file = std::env::temp_dir().join(format!("podid-rules-{}.yaml", std::process::id()));
    std::fs::write(
        &file,
        serde_json::to_string(&rules[0]["spec"]).expect("JSON"),
    )
    .expect("write");
    let output = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("promtool");
    let _ = std::fs::remove_file(&file);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );

    let defaults = rendered(&cases()[0]);
    assert!(of_kind(&defaults, "ConfigMap").is_empty());
    assert!(of_kind(&defaults, "PrometheusRule").is_empty());
}

/// nmi's DaemonSet rolls with surge by default (the new pod starts while the old one holds the
/// port, docs/operations.md "The node swap"); an aad-pod-identity values file that keeps
/// `maxUnavailable: 1` gets upstream's order with the surge turned off (a DaemonSet takes only
/// one of the two), and a strategy other than RollingUpdate carries no rollingUpdate.
#[test]
fn nmi_rolls_with_surge_unless_the_values_ask_for_unavailability() {
    let strategy = |values: Value| -> Value {
        let objects = rendered(&Case {
            name: "update strategy",
            namespace: "kube-system",
            values,
        });
        of_kind(&objects, "DaemonSet")[0]["spec"]["updateStrategy"].clone()
    };
    assert_eq!(
        strategy(json!({})),
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}})
    );
    for unavailable in [json!(1), json!("10%")] {
        assert_eq!(
            strategy(
                json!({"nmi": {"updateStrategy": {"rollingUpdate": {"maxUnavailable": unavailable}}}})
            ),
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": unavailable}}),
        );
    }
    assert_eq!(
        strategy(json!({"nmi": {"updateStrategy": {"rollingUpdate": {"maxSurge": "20%"}}}})),
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "20%", "maxUnavailable": 0}})
    );
    assert_eq!(
        strategy(json!({"nmi": {"updateStrategy": {"type": "OnDelete"}}})),
        json!({"type": "OnDelete"})
    );
    // The plain manifests roll the same way.
    for file in ["deployment-rbac.yaml", "managed-mode-deployment.yaml"] {
        let text = std::fs::read_to_string(root().join("deploy/infra").join(file)).expect(file);
        let objects = documents(&text).expect(file);
        assert_eq!(
            of_kind(&objects, "DaemonSet")[0]["spec"]["updateStrategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}),
            "{file}"
        );
    }
}
