//! mic when the API server expires its watches (`410 Gone`, as after an etcd compaction or a
//! watch cache that moved on): every cache is relisted, no assignment is lost or written twice,
//! and the leader keeps its lease throughout, on a cluster large enough that a pass and a
//! relist take real CPU time.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, ListParams};
use podid_api::{AssignedIdentityState, AzureAssignedIdentity};
use podid_fake_apiserver::FakeApiServer;
use podid_mic::assigner::NoArm;
use podid_mic::client::kube_client;
use podid_mic::probe::Health;
use podid_mic::serve::serve;
use serde_json::json;

mod common;

const RID: &str = "/subscriptions/S/resourcegroups/RG/providers/Microsoft.ManagedIdentity/userAssignedIdentities/kv-id";

/// Pods of the cluster: enough that a relist and a pass cost mic real CPU time.
const PODS: usize = 1_000;

/// Rounds of expiry.
const ROUNDS: usize = 3;

/// Converging 1,000 assignments in a debug build on a shared machine.
const CONVERGE: Duration = Duration::from_secs(120);

fn pod_json(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"aadpodidbinding": "kv"}},
        "spec": {"nodeName": "n1", "containers": [{"name": "app", "image": "app:1"}]},
        "status": {"phase": "Running"}
    })
}

fn seed(server: &FakeApiServer) {
    server
        .create_json(
            "/api/v1/nodes",
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
                   "spec": {"providerID": "azure:///subscriptions/S/resourceGroups/MC/providers/Microsoft.Compute/virtualMachineScaleSets/pool/virtualMachines/0"}}),
        )
        .expect("node");
    let crds = "/apis/aadpodidentity.k8s.io/v1/namespaces/default";
    server
        .create_json(
            &format!("{crds}/azureidentities"),
            serde_json::to_value(podid_api::AzureIdentity::user_assigned(
                "default", "kv-id", RID, "client-1",
            ))
            .expect("identity"),
        )
        .expect("identity");
    server
        .create_json(
            &format!("{crds}/azureidentitybindings"),
            serde_json::to_value(podid_api::AzureIdentityBinding::for_selector(
                "default",
                "kv-binding",
                "kv-id",
                "kv",
            ))
            .expect("binding"),
        )
        .expect("binding");
}

fn config_for(kubeconfig: &std::path::Path) -> podid_mic::config::Config {
    // Upstream's lease (15 s, renew deadline 7.5 s): the relists and passes of each round run
    // while it must be renewed several times.
    common::mic_config(
        kubeconfig,
        &["--leader-election-instance=mic-expiry", "--clientQps=10000"],
    )
}

/// Assignment name → (uid, state), when every one of `pods` has its assignment `Assigned` and
/// there is no other.
async fn converged(
    api: &Api<AzureAssignedIdentity>,
    pods: &BTreeSet<String>,
) -> Option<BTreeMap<String, String>> {
    let list = api.list(&ListParams::default()).await.ok()?;
    let mut uids = BTreeMap::new();
    for object in list.items {
        if object.state() != AssignedIdentityState::Assigned {
            return None;
        }
        uids.insert(
            object.metadata.name.clone().unwrap_or_default(),
            object.metadata.uid.clone().unwrap_or_default(),
        );
    }
    let want: BTreeSet<String> = pods.iter().map(|p| format!("{p}-default-kv-id")).collect();
    (uids.keys().cloned().collect::<BTreeSet<_>>() == want).then_some(uids)
}

async fn lease(client: &kube::Client) -> (Option<String>, i32) {
    let spec = Api::<Lease>::namespaced(client.clone(), "default")
        .get("aad-pod-identity-mic")
        .await
        .expect("lease")
        .spec
        .unwrap_or_default();
    (
        spec.holder_identity,
        spec.lease_transitions.unwrap_or_default(),
    )
}

/// Each round forgets the API server's history and cuts every watch, so all five of mic's
/// watches get `410` and relist a thousand-odd objects, while pods come and go. mic converges after
/// each round; the assignments of pods that stayed keep their uid (none deleted and created
/// again), none of them is written again, and the lease stays with the same holder without a
/// transition while mic runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_watches_are_relisted_without_losing_assignments_or_the_lease() {
    let server = FakeApiServer::start().await.expect("server");
    let path = common::kubeconfig(&server);
    let client = kube_client(Some(&path)).await.expect("client");
    seed(&server);
    let mut pods: BTreeSet<String> = BTreeSet::new();
    for i in 0..PODS {
        let name = format!("web-{i}");
        server
            .create_json("/api/v1/namespaces/default/pods", pod_json(&name))
            .expect("pod");
        pods.insert(name);
    }
    let config = config_for(&path);
    let task = tokio::spawn(async move {
        serve(
            &config,
            &Default::default(),
            Arc::new(NoArm),
            Arc::new(Health::default()),
            std::future::pending(),
        )
        .await
    });
    let assigned: Api<AzureAssignedIdentity> = Api::namespaced(client.clone(), "default");
    let started = std::time::Instant::now();
    let mut task = task;
    let mut uids = tokio::select! {
        uids = common::wait_within(CONVERGE, "first convergence", || {
            let (assigned, pods) = (&assigned, &pods);
            async move { converged(assigned, pods).await }
        }) => uids,
        stopped = &mut task => panic!("mic stopped: {stopped:?}"),
    };
    eprintln!("first convergence {:?}", started.elapsed());
    assert!(!task.is_finished(), "mic runs: {:?}", task.await);
    let (holder, transitions) = lease(&client).await;
    assert_eq!(holder.as_deref(), Some("mic-expiry"));
    let faults = server.faults();
    for round in 0..ROUNDS {
        faults.clear_log();
        // Expire every watch: a change the watches have not seen yet, the history forgotten,
        // every stream cut. Repeated (a second apart) until each of the five caches relisted:
        // a watch that saw the change before the cut resumes without a 410.
        let kinds = [
            "/pods",
            "/nodes",
            "/azureidentities",
            "/azureidentitybindings",
            "/azureassignedidentities",
        ];
        let deadline = std::time::Instant::now() + CONVERGE;
        let mut bump = 0;
        while !kinds.iter().all(|kind| faults.count("list", kind) >= 1) {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: relists"
            );
            bump += 1;
            server
                .create_json(
                    "/api/v1/namespaces/default/configmaps",
                    json!({"metadata": {"name": format!("bump-{round}-{bump}")}}),
                )
                .expect("bump");
            faults.compact();
            faults.drop_watches();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // The cluster changes right after.
        for i in 0..10 {
            let gone = format!("web-{}", round * 10 + i);
            server
                .delete_json(&format!("/api/v1/namespaces/default/pods/{gone}"))
                .expect("delete pod");
            pods.remove(&gone);
            let new = format!("new-{round}-{i}");
            server
                .create_json("/api/v1/namespaces/default/pods", pod_json(&new))
                .expect("pod");
            pods.insert(new);
        }
        let started = std::time::Instant::now();
        let now = common::wait_within(CONVERGE, "convergence after the expiry", || {
            let (assigned, pods, task) = (&assigned, &pods, &task);
            async move {
                assert!(!task.is_finished(), "round {round}: mic stopped");
                converged(assigned, pods).await
            }
        })
        .await;
        eprintln!("round {round}: converged {:?}", started.elapsed());
        // The pods that stayed kept their assignments: same objects, not recreated.
        for (name, uid) in &now {
            if let Some(before) = uids.get(name) {
                assert_eq!(uid, before, "round {round}: {name} was recreated");
            }
        }
        // Only the new pods' assignments were written (created, then confirmed) and only the
        // removed ones deleted: nothing of a pod that stayed.
        let writes: Vec<String> = faults
            .requests()
            .into_iter()
            .filter(|r| {
                r.path.contains("/azureassignedidentities/")
                    && matches!(r.verb.as_str(), "update" | "patch" | "delete")
            })
            .map(|r| r.path)
            .collect();
        for path in &writes {
            let name = path.rsplit('/').next().unwrap_or_default();
            assert!(
                !uids.contains_key(name) || !now.contains_key(name),
                "round {round}: {name}, whose pod stayed, was written again: {path}"
            );
        }
        uids = now;
        assert!(!task.is_finished(), "mic runs: {:?}", task.await);
        assert_eq!(
            lease(&client).await,
            (holder.clone(), transitions),
            "round {round}: the lease changed hands"
        );
    }
    task.abort();
}
