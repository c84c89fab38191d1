//! "helm install" into the simulated cluster: the chart rendered by the real Helm engine (and,
//! separately, the plain manifests of `deploy/infra/`) is applied to the fake API server — CRDs,
//! ServiceAccounts, RBAC, the MIC exception — and the real `mic` and `nmi` start with exactly the
//! container args of the rendered Deployment and DaemonSet, each authenticated with a token of
//! its own ServiceAccount, so they run under the RBAC the chart grants and nothing more. A pod
//! then gets its token through the official Python SDK. A verb the code needs and the manifests
//! lack shows up here as a 403, which fails the test. Needs root.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use podid_api::AzureIdentity;
use podid_e2e::cluster::{Cluster, NODE, sdk_for};
use serde_json::{Value, json};

fn root() -> PathBuf {
    podid_e2e::workspace_root()
}

/// The chart rendered for release `podid` in `namespace`, CRDs first (as `helm install`).
fn render_chart(namespace: &str, values: &Value) -> anyhow::Result<Vec<Value>> {
    let python = podid_e2e::python()?;
    let output = Command::new(&python)
        .arg(root().join("tests/scripts/helm.py"))
        .args(["render"])
        .arg(root().join("deploy/charts/podid"))
        .args(["podid", namespace, "--include-crds", "--set-json"])
        .arg(values.to_string())
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

fn documents(text: &str) -> anyhow::Result<Vec<Value>> {
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
fn plain_manifests(file: &str) -> anyhow::Result<Vec<Value>> {
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
fn collection(object: &Value) -> anyhow::Result<Option<String>> {
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
fn apply(cluster: &Cluster, objects: &[Value]) -> anyhow::Result<()> {
    for object in objects {
        if let Some(path) = collection(object)? {
            cluster.create(&path, object.clone())?;
        }
    }
    Ok(())
}

fn workload<'a>(objects: &'a [Value], kind: &str) -> anyhow::Result<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"] == kind)
        .with_context(|| format!("no {kind} in the manifests"))
}

/// The container's args with `$(VAR)` expanded from its env, as the kubelet does (`NODE_NAME`
/// comes from `spec.nodeName`).
fn container_args(workload: &Value, container: &str) -> anyhow::Result<Vec<String>> {
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
fn node_files(cluster: &Cluster, args: Vec<String>, extra: &[(&str, &PathBuf)]) -> Vec<String> {
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
fn nmi_args(cluster: &Cluster, nmi: &Value) -> anyhow::Result<Vec<String>> {
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
fn service_account(workload: &Value) -> anyhow::Result<(String, String)> {
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
fn kubeconfig_for(
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
fn refused(cluster: &Cluster) -> Vec<String> {
    cluster
        .api
        .faults()
        .requests()
        .into_iter()
        .filter(|r| r.code == 401 || r.code == 403)
        .map(|r| format!("{} {} {} -> {}", r.method, r.verb, r.path, r.code))
        .collect()
}

/// Standard mode: identity, binding and pod in `app`; mic (under its ServiceAccount) assigns
/// the identity through ARM; nmi (under its own) serves the SDK's token.
async fn standard_mode(cluster: &mut Cluster, objects: &[Value]) -> anyhow::Result<()> {
    apply(cluster, objects)?;
    let mic = workload(objects, "Deployment")?;
    let nmi = workload(objects, "DaemonSet")?;
    let mic_account = service_account(mic)?;
    let nmi_account = service_account(nmi)?;
    // The pod's hostPath /etc/kubernetes/azure.json is the test's cloud config.
    let azure_json = cluster.write_azure_json()?;
    let mic_kubeconfig = kubeconfig_for(cluster, &mic_account)?;
    let mut mic_args = node_files(
        cluster,
        container_args(mic, "mic")?,
        &[("/etc/kubernetes/azure.json", &azure_json)],
    );
    // In a pod, mic reads its ServiceAccount's token in-cluster; here the same token comes
    // through a kubeconfig.
    mic_args.push(format!("--kubeconfig={}", mic_kubeconfig.display()));
    let nmi_kubeconfig = kubeconfig_for(cluster, &nmi_account)?;
    cluster.api.faults().clear_log();

    let web = cluster.cloud.add_user_assigned_identity("web");
    cluster.add_identity_and_binding(
        &AzureIdentity::user_assigned("app", "web", &web.resource_id, &web.client_id),
        "web",
    )?;
    cluster.spawn_mic_with(&mic_args, &mic_kubeconfig, &mic_account.0)?;
    let nmi_args = nmi_args(cluster, nmi)?;
    cluster.spawn_nmi_exactly(&nmi_args, &nmi_kubeconfig)?;
    cluster.wait_ready().await?;
    cluster.wait_mic_active().await?;
    let pod = Arc::new(cluster.node.add_pod("web")?);
    cluster.add_pod_in("app", "web-1", &[("aadpodidbinding", "web")], pod.ip())?;
    let token = sdk_for(&pod, &web.client_id).await?.token()?;
    assert_eq!(
        cluster.cloud.verify_access_token(&token)?.appid,
        web.client_id
    );
    let denied = refused(cluster);
    assert!(
        denied.is_empty(),
        "requests mic or nmi needed and their RBAC refused: {denied:#?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_in_standard_mode_runs_under_its_own_rbac() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let objects = render_chart("kube-system", &json!({}))?;
    standard_mode(&mut cluster, &objects).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plain_manifests_run_under_their_own_rbac() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    let objects = plain_manifests("deployment-rbac.yaml")?;
    standard_mode(&mut cluster, &objects).await
}

/// Managed mode: no MIC; the identity is assigned to the scale set out of band, the binding is
/// in the pod's namespace, and nmi (under its ServiceAccount) serves the token.
async fn managed_mode(objects: Vec<Value>) -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    apply(&cluster, &objects)?;
    assert!(
        objects.iter().all(|o| o["kind"] != "Deployment"),
        "no MIC in managed mode"
    );
    let nmi = workload(&objects, "DaemonSet")?;
    let nmi_kubeconfig = kubeconfig_for(&cluster, &service_account(nmi)?)?;
    cluster.api.faults().clear_log();

    let web = cluster.cloud.add_user_assigned_identity("web");
    cluster.cloud.assign_identity(&cluster.vmss, &web)?;
    cluster.add_identity_and_binding(
        &AzureIdentity::user_assigned("app", "web", &web.resource_id, &web.client_id),
        "web",
    )?;
    let nmi_args = nmi_args(&cluster, nmi)?;
    cluster.spawn_nmi_exactly(&nmi_args, &nmi_kubeconfig)?;
    cluster.wait_ready().await?;
    let pod = Arc::new(cluster.node.add_pod("web")?);
    cluster.add_pod_in("app", "web-1", &[("aadpodidbinding", "web")], pod.ip())?;
    let token = tokio::time::timeout(Duration::from_secs(120), sdk_for(&pod, &web.client_id))
        .await??
        .token()?;
    assert_eq!(
        cluster.cloud.verify_access_token(&token)?.appid,
        web.client_id
    );
    let denied = refused(&cluster);
    assert!(
        denied.is_empty(),
        "requests nmi needed and its RBAC refused: {denied:#?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_in_managed_mode_serves_a_token_under_its_own_rbac() -> anyhow::Result<()> {
    let objects = render_chart(
        "kube-system",
        &json!({"operationMode": "managed", "forceNamespaced": "true"}),
    )?;
    managed_mode(objects).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plain_managed_mode_manifests_serve_a_token_under_their_own_rbac() -> anyhow::Result<()>
{
    managed_mode(plain_manifests("managed-mode-deployment.yaml")?).await
}
