//! "helm install" into the simulated cluster: the chart rendered by the real Helm engine (and,
//! separately, the plain manifests of `deploy/infra/`) is applied to the fake API server — CRDs,
//! ServiceAccounts, RBAC, the MIC exception — and the real `mic` and `nmi` start with exactly the
//! container args of the rendered Deployment and DaemonSet, each authenticated with a token of
//! its own ServiceAccount, so they run under the RBAC the chart grants and nothing more. A pod
//! then gets its token through the official Python SDK. A verb the code needs and the manifests
//! lack shows up here as a 403, which fails the test. Needs root.

use std::sync::Arc;
use std::time::Duration;

use podid_api::AzureIdentity;
use podid_e2e::cluster::{Cluster, sdk_for};
use podid_e2e::install::{
    apply, container_args, kubeconfig_for, nmi_args, node_files, plain_manifests, refused,
    render_chart, service_account, workload,
};
use serde_json::{Value, json};

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

/// The compatibility lock off: mic (`--upstream-leader-lock=false`) runs under RBAC without
/// any `endpoints` rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_without_the_upstream_leader_lock_runs_under_its_own_rbac() -> anyhow::Result<()>
{
    let mut cluster = Cluster::start().await?;
    let objects = render_chart(
        "kube-system",
        &json!({"mic": {"upstreamLeaderLock": false}}),
    )?;
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
