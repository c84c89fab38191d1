//! "helm install" / "kubectl apply" into the simulated cluster: the chart rendered by the real
//! Helm engine (or the plain manifests of `deploy/infra/`) parsed into objects, applied to the
//! fake API server as the cluster admin, and the container args and ServiceAccounts of the
//! rendered workloads, so the real `mic` and `nmi` start exactly as their pods would. Shared by
//! the install and upgrade suites.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::cluster::{Cluster, NODE};

fn root() -> PathBuf {
    crate::workspace_root()
}

/// The chart rendered for release `podid` in `namespace`, CRDs first (as `helm install`).
pub fn render_chart(namespace: &str, values: &Value) -> anyhow::Result<Vec<Value>> {
    render_release("podid", namespace, values, true)
}

/// The chart rendered for `release` in `namespace`, with its CRDs first when `crds` (`helm
/// install`; `helm upgrade` leaves CRDs alone).
pub fn render_release(
    release: &str,
    namespace: &str,
    values: &Value,
    crds: bool,
) -> anyhow::Result<Vec<Value>> {
    let python = crate::python()?;
    let output = Command::new(&python)
        .arg(root().join("tests/scripts/helm.py"))
        .args(["render"])
        .arg(root().join("deploy/charts/podid"))
        .args([release, namespace, "--set-json"])
        .arg(values.to_string())
        .args(crds.then_some("--include-crds"))
        .output()
        .context("running helm.py")?;
    if !output.status.success() {
        bail!(
            "helm render failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    documents(&String::from_utf8(output.stdout)?)
}

pub fn documents(text: &str) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for doc in serde_norway::Deserializer::from_str(text) {
        let value: Value = serde::Deserialize::deserialize(doc)?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// The plain manifests, in the documented order: CRDs, the deployment, the exceptions.
pub fn plain_manifests(file: &str) -> anyhow::Result<Vec<Value>> {
    let mut objects = Vec::new();
    let mut crds: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/crds"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    crds.sort();
    for path in crds {
        objects.extend(documents(&std::fs::read_to_string(path)?)?);
    }
    objects.extend(documents(&std::fs::read_to_string(
        root().join("deploy/infra").join(file),
    )?)?);
    if file == "deployment-rbac.yaml" {
        objects.extend(documents(&std::fs::read_to_string(
            root().join("deploy/infra/mic-exception.yaml"),
        )?)?);
    }
    Ok(objects)
}

/// The collection a manifest object is created in; `None` for workloads, which nothing runs
/// here (their pods are started by hand below).
pub fn collection(object: &Value) -> anyhow::Result<Option<String>> {
    let kind = object["kind"].as_str().context("kind")?;
    let namespace = object["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default");
    Ok(Some(match kind {
        "CustomResourceDefinition" => {
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions".to_owned()
        }
        "ServiceAccount" | "Secret" | "ConfigMap" => format!(
            "/api/v1/namespaces/{namespace}/{}s",
            kind.to_ascii_lowercase()
        ),
        "ClusterRole" | "ClusterRoleBinding" => format!(
            "/apis/rbac.authorization.k8s.io/v1/{}s",
            kind.to_ascii_lowercase()
        ),
        "Role" | "RoleBinding" => format!(
            "/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/{}s",
            kind.to_ascii_lowercase()
        ),
        "AzurePodIdentityException" | "AzureIdentity" | "AzureIdentityBinding" => format!(
            "/apis/aadpodidentity.k8s.io/v1/namespaces/{namespace}/{}s",
            kind.to_ascii_lowercase()
        ),
        "DaemonSet" | "Deployment" | "PodDisruptionBudget" => return Ok(None),
        other => bail!("the install test does not know where a {other} goes"),
    }))
}

/// Applies every object but the workloads, as the cluster admin (`helm install` / `kubectl apply`).
pub fn apply(cluster: &Cluster, objects: &[Value]) -> anyhow::Result<()> {
    for object in objects {
        if let Some(path) = collection(object)? {
            cluster.create(&path, object.clone())?;
        }
    }
    Ok(())
}

/// Applies every object but the workloads over what exists (`helm upgrade` / `kubectl apply`
/// of a release already there): created, or, when the name is taken, replaced in place (the
/// existing object's `resourceVersion`, the new content). Returns the objects replaced.
pub fn apply_over(cluster: &Cluster, objects: &[Value]) -> anyhow::Result<Vec<String>> {
    let mut replaced = Vec::new();
    for object in objects {
        let Some(path) = collection(object)? else {
            continue;
        };
        match cluster.api.create_json(&path, object.clone()) {
            Ok(_) => {}
            Err(e) if e.code == 409 => {
                let name = object["metadata"]["name"].as_str().context("name")?;
                let item = format!("{path}/{name}");
                let existing = cluster
                    .api
                    .get_json(&item)
                    .map_err(|e| anyhow::anyhow!("reading {item}: {}", e.message))?;
                let mut object = object.clone();
                object["metadata"]["resourceVersion"] =
                    existing["metadata"]["resourceVersion"].clone();
                cluster
                    .api
                    .replace_json(&item, object)
                    .map_err(|e| anyhow::anyhow!("replacing {item}: {}", e.message))?;
                replaced.push(item);
            }
            Err(e) => bail!("creating under {path}: {}", e.message),
        }
    }
    Ok(replaced)
}

/// The first object of `kind` (a chart or manifest has one Deployment and one DaemonSet).
pub fn workload<'a>(objects: &'a [Value], kind: &str) -> anyhow::Result<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"] == kind)
        .with_context(|| format!("no {kind} in the manifests"))
}

/// The container's args with `$(VAR)` expanded from its env, as the kubelet does (`NODE_NAME`
/// comes from `spec.nodeName`).
pub fn container_args(workload: &Value, container: &str) -> anyhow::Result<Vec<String>> {
    let spec = &workload["spec"]["template"]["spec"];
    let c = spec["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == container))
        .with_context(|| format!("no container {container}"))?;
    let mut env: Vec<(String, String)> = Vec::new();
    for var in c["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap_or_default().to_owned();
        let value = match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some("spec.nodeName") => NODE.to_owned(),
            Some(_) => continue,
            None => var["value"].as_str().unwrap_or_default().to_owned(),
        };
        env.push((name, value));
    }
    Ok(c["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|arg| {
            env.iter().fold(arg.to_owned(), |arg, (name, value)| {
                arg.replace(&format!("$({name})"), value)
            })
        })
        .collect())
}

/// The node files the pods mount with hostPath volumes, mapped to the test's own copies: the
/// kubelet defaults nmi scans for kubenet (the simulated node's), and `extra` (mic's cloud
/// config).
pub fn node_files(cluster: &Cluster, args: Vec<String>, extra: &[(&str, &PathBuf)]) -> Vec<String> {
    let kubelet = cluster.dir().join("kubelet");
    let mut files: Vec<(&str, &PathBuf)> = vec![("/etc/default/kubelet", &kubelet)];
    files.extend_from_slice(extra);
    args.into_iter()
        .map(|arg| {
            files.iter().fold(arg, |arg, (node_path, ours)| {
                arg.replace(node_path, &ours.display().to_string())
            })
        })
        .collect()
}

/// nmi's args with the node files mapped; where the manifest relies on `--kubelet-config`'s
/// default (`/etc/default/kubelet`, a hostPath mount), the mapped path is given explicitly.
pub fn nmi_args(cluster: &Cluster, nmi: &Value) -> anyhow::Result<Vec<String>> {
    let mut args = node_files(cluster, container_args(nmi, "nmi")?, &[]);
    if !args.iter().any(|a| a.starts_with("--kubelet-config")) {
        args.push(format!(
            "--kubelet-config={}",
            cluster.dir().join("kubelet").display()
        ));
    }
    Ok(args)
}

/// The workload's ServiceAccount (`spec.serviceAccountName` in its own namespace).
pub fn service_account(workload: &Value) -> anyhow::Result<(String, String)> {
    Ok((
        workload["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned(),
        workload["spec"]["template"]["spec"]["serviceAccountName"]
            .as_str()
            .context("serviceAccountName")?
            .to_owned(),
    ))
}

/// A kubeconfig carrying a token of `namespace/name`, as the pod's projected token would be.
pub fn kubeconfig_for(
    cluster: &Cluster,
    (namespace, name): &(String, String),
) -> anyhow::Result<PathBuf> {
    let path = cluster.dir().join(format!("kubeconfig-{namespace}-{name}"));
    cluster
        .api
        .write_service_account_kubeconfig(namespace, name, &path)?;
    Ok(path)
}

/// Every request the API server refused for lack of rights during the run.
pub fn refused(cluster: &Cluster) -> Vec<String> {
    cluster
        .api
        .faults()
        .requests()
        .into_iter()
        .filter(|r| r.code == 401 || r.code == 403)
        .map(|r| format!("{} {} {} -> {}", r.method, r.verb, r.path, r.code))
        .collect()
}
