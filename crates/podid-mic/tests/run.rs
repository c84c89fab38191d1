//! The controller loop against the fake API server: assignment objects appear, turn
//! `Assigned` after the VM/VMSS work, and go away (finalizer removed, identity released) when
//! their pod does; a failing VM/VMSS update is retried without a new event.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, NodeSpec, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, PostParams};
use podid_api::{ASSIGNED_IDENTITY_FINALIZER, AssignedIdentityState, AzureAssignedIdentity};
use podid_fake_apiserver::FakeApiServer;
use podid_mic::desired::ArmTarget;
use podid_mic::probe::Health;
mod common;

use common::{Cluster, HOUR, WAIT, lease_holder, wait_for};
use podid_mic::assigner::{AssignFuture, IdentityAssigner, NoArm};
use podid_mic::client::kube_client;
use podid_mic::run::RunError;
use podid_mic::serve::serve;

const RID: &str = "/subscriptions/S/resourcegroups/RG/providers/Microsoft.ManagedIdentity/userAssignedIdentities/kv-id";

type Call = (ArmTarget, BTreeSet<String>, BTreeSet<String>);

#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<Call>>,
    fail: AtomicBool,
}

impl IdentityAssigner for Recorder {
    fn apply<'a>(
        &'a self,
        target: &'a ArmTarget,
        required: &'a BTreeSet<String>,
        release: &'a BTreeSet<String>,
    ) -> AssignFuture<'a> {
        Box::pin(async move {
            self.calls.lock().expect("lock").push((
                target.clone(),
                required.clone(),
                release.clone(),
            ));
            if self.fail.load(Ordering::SeqCst) {
                return Err("ARM said no".into());
            }
            Ok(())
        })
    }
}

impl Recorder {
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("lock").clone()
    }
}

#[tokio::test]
async fn kubeconfig_errors_name_the_file() {
    let Err(err) = kube_client(Some(std::path::Path::new("/nonexistent/podid/kubeconfig"))).await
    else {
        panic!("a missing kubeconfig must be refused");
    };
    assert_eq!(
        err.to_string(),
        "failed to load kubeconfig /nonexistent/podid/kubeconfig"
    );
}

/// A pod on `node` with the binding selector `kv`.
fn pod(name: &str, node: &str) -> Pod {
    common::pod(name, node, "kv")
}

fn vmss_node(name: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            provider_id: Some("azure:///subscriptions/S/resourceGroups/MC/providers/Microsoft.Compute/virtualMachineScaleSets/pool/virtualMachines/0".to_owned()),
            ..Default::default()
        }),
        status: None,
    }
}

async fn seed(client: &kube::Client) {
    let pp = PostParams::default();
    Api::<Node>::all(client.clone())
        .create(&pp, &vmss_node("n1"))
        .await
        .expect("node");
    common::create_binding(client, "kv-id", RID, "client-1", "kv-binding", "kv").await;
}

/// MIC's loop with a [`Recorder`] as its ARM side (failing with `fail`), on a server seeded by
/// [`seed`].
async fn start(fail: bool, identity_reconcile: Duration) -> (Cluster, Arc<Recorder>) {
    let recorder = Arc::new(Recorder::default());
    recorder.fail.store(fail, Ordering::SeqCst);
    let cluster = Cluster::start(recorder.clone(), &[], identity_reconcile, &[]).await;
    seed(&cluster.client).await;
    (cluster, recorder)
}

#[tokio::test]
async fn assignment_lifecycle() {
    let (cluster, recorder) = start(false, HOUR).await;
    cluster.add_pod("web-1", "n1", "kv").await;

    let object = cluster
        .wait_state("web-1-default-kv-id", AssignedIdentityState::Assigned)
        .await;
    assert_eq!(
        object.metadata.finalizers,
        Some(vec![ASSIGNED_IDENTITY_FINALIZER.to_owned()])
    );
    assert_eq!(object.spec.node_name.as_deref(), Some("n1"));
    let event = wait_for("a binding applied event", || async {
        Api::<k8s_openapi::api::events::v1::Event>::namespaced(cluster.client.clone(), "default")
            .list(&Default::default())
            .await
            .expect("list events")
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("binding applied"))
    })
    .await;
    assert_eq!(event.type_.as_deref(), Some("Normal"));
    // One event per identity and scale set (upstream: one per assignment, on the binding).
    assert_eq!(
        event.note.as_deref(),
        Some("Binding kv-binding applied on vmss pool for 1 pod: default/web-1")
    );
    assert_eq!(
        event.regarding.as_ref().and_then(|r| r.kind.as_deref()),
        Some("AzureIdentity")
    );
    assert_eq!(
        event.reporting_controller.as_deref(),
        Some("aadpodidentity.k8s.io")
    );
    let id = RID.to_ascii_lowercase();
    let calls = recorder.calls();
    assert_eq!(
        calls.first(),
        Some(&(
            ArmTarget::Vmss("pool".to_owned()),
            BTreeSet::from([id.clone()]),
            BTreeSet::new()
        ))
    );

    // The pod goes: the identity leaves the scale set and the object is gone, finalizer and all.
    Api::<Pod>::namespaced(cluster.client.clone(), "default")
        .delete("web-1", &DeleteParams::default())
        .await
        .expect("delete pod");
    wait_for("web-1-default-kv-id deleted", || async {
        cluster
            .assigned("web-1-default-kv-id")
            .await
            .is_none()
            .then_some(())
    })
    .await;
    assert!(
        recorder.calls().iter().any(|(target, required, release)| {
            target == &ArmTarget::Vmss("pool".to_owned())
                && required.is_empty()
                && release == &BTreeSet::from([id.clone()])
        }),
        "{:?}",
        recorder.calls()
    );
    cluster.stop().await;
}

#[tokio::test]
async fn each_removed_assignment_is_deleted_once() {
    const PODS: usize = 30;
    let (cluster, _recorder) = start(false, HOUR).await;
    let pods = Api::<Pod>::namespaced(cluster.client.clone(), "default");
    for i in 0..PODS {
        pods.create(&PostParams::default(), &pod(&format!("web-d{i}"), "n1"))
            .await
            .expect("pod");
    }
    let assigned_count = || async {
        cluster
            .assignment_list()
            .await
            .iter()
            .filter(|o| o.state() == AssignedIdentityState::Assigned)
            .count()
    };
    wait_for("every assignment Assigned", || async {
        (assigned_count().await == PODS).then_some(())
    })
    .await;
    let faults = cluster.server.faults();
    faults.clear_log();
    for i in 0..PODS {
        pods.delete(&format!("web-d{i}"), &DeleteParams::default())
            .await
            .expect("delete pod");
    }
    wait_for("every assignment gone", || async {
        cluster.assignment_list().await.is_empty().then_some(())
    })
    .await;
    // Stopping waits for the pass in flight: every request mic meant to send is in the log.
    cluster.stop().await;
    assert_eq!(
        faults.count("delete", "azureassignedidentities"),
        PODS,
        "one DELETE per removed assignment, none repeated for objects the cache still showed"
    );
}

#[tokio::test]
async fn each_new_assignment_is_confirmed_once() {
    const PODS: usize = 60;
    let (cluster, _recorder) = start(false, HOUR).await;
    let faults = cluster.server.faults();
    faults.clear_log();
    let pods = Api::<Pod>::namespaced(cluster.client.clone(), "default");
    for i in 0..PODS {
        pods.create(&PostParams::default(), &pod(&format!("web-c{i}"), "n1"))
            .await
            .expect("pod");
    }
    wait_for("every assignment Assigned", || async {
        let list = cluster.assignment_list().await;
        (list.len() == PODS
            && list
                .iter()
                .all(|o| o.state() == AssignedIdentityState::Assigned))
        .then_some(())
    })
    .await;
    cluster.stop().await;
    assert_eq!(
        faults.count("create", "azureassignedidentities"),
        PODS,
        "one create per pod"
    );
    // The first assignment of the identity on the scale set goes `Created` → `Assigned`;
    // every later one finds it there and is created `Assigned` (this test pinned one status
    // patch per assignment until then).
    assert_eq!(
        faults.count("patch", "azureassignedidentities"),
        1,
        "one status patch: the first assignment's, none repeated for objects the cache still showed Created"
    );
}

#[tokio::test]
async fn an_assignment_deleted_by_a_user_loses_its_finalizer_without_a_second_delete() {
    let (cluster, _recorder) = start(false, HOUR).await;
    cluster.add_pod("web-u", "n1", "kv").await;
    let name = "web-u-default-kv-id";
    let first = cluster
        .wait_state(name, AssignedIdentityState::Assigned)
        .await;
    let faults = cluster.server.faults();
    faults.clear_log();
    // `kubectl delete`: the finalizer keeps it, terminating, until mic lets go.
    cluster
        .assignments()
        .delete(name, &DeleteParams::default())
        .await
        .expect("delete");
    // The pod still wants it: a new object (new uid) takes the name once the old one is gone.
    wait_for("web-u recreated and Assigned", || async {
        cluster.assigned(name).await.filter(|o| {
            o.metadata.uid != first.metadata.uid && o.state() == AssignedIdentityState::Assigned
        })
    })
    .await;
    cluster.stop().await;
    assert_eq!(
        faults.count("delete", "azureassignedidentities"),
        1,
        "only the user's DELETE; mic removes the finalizer of a terminating object without deleting it again"
    );
}

#[tokio::test]
async fn failed_vmss_update_is_retried_without_a_new_event() {
    let (cluster, recorder) = start(true, HOUR).await;
    cluster.add_pod("web-2", "n1", "kv").await;
    // ARM refuses: the object exists but stays Created.
    let object = wait_for("web-2-default-kv-id created", || async {
        cluster.assigned("web-2-default-kv-id").await
    })
    .await;
    assert_eq!(object.state(), AssignedIdentityState::Created);
    let event = wait_for("a binding apply error event", || async {
        Api::<k8s_openapi::api::events::v1::Event>::namespaced(cluster.client.clone(), "default")
            .list(&Default::default())
            .await
            .expect("list events")
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("binding apply error"))
    })
    .await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(
        event.note.as_deref(),
        Some(
            "failed to apply binding default/kv-binding node n1 for pod default/web-2, error: ARM said no"
        )
    );
    wait_for("a second ARM attempt", || async {
        (recorder.calls().len() >= 2).then_some(())
    })
    .await;
    assert_eq!(
        cluster
            .assigned("web-2-default-kv-id")
            .await
            .map(|o| o.state()),
        Some(AssignedIdentityState::Created)
    );
    // ARM recovers: the retry (no event involved) makes it Assigned.
    recorder.fail.store(false, Ordering::SeqCst);
    cluster
        .wait_state("web-2-default-kv-id", AssignedIdentityState::Assigned)
        .await;
    cluster.stop().await;
}

/// Assignments that wait for their scale set's confirmation are created `Created` when ARM
/// fails (upstream's shape: visible, retried), never left out nor created `Assigned`; once ARM
/// recovers, one `binding applied` event covers all the pods of the identity on the scale set.
#[tokio::test]
async fn waiting_assignments_are_created_created_when_arm_fails_and_share_one_event() {
    const PODS: usize = 8;
    let (mut cluster, recorder) = start(true, HOUR).await;
    cluster.add_pod("web-e0", "n1", "kv").await;
    wait_for("web-e0 created", || async {
        cluster.assigned("web-e0-default-kv-id").await
    })
    .await;
    for i in 1..PODS {
        cluster.add_pod(&format!("web-e{i}"), "n1", "kv").await;
    }
    let list = wait_for("every assignment created", || async {
        let list = cluster.assignment_list().await;
        (list.len() == PODS).then_some(list)
    })
    .await;
    for object in &list {
        assert_eq!(
            object.state(),
            AssignedIdentityState::Created,
            "{:?}",
            object.metadata.name
        );
    }
    // ARM recovers; a pod that uses no identity wakes the loop out of its backoff. Every
    // pass from now on sees all eight `Created` (and confirms them together).
    recorder.fail.store(false, Ordering::SeqCst);
    cluster.add_pod("wake", "n1", "no-binding").await;
    wait_for("every assignment Assigned", || async {
        let list = cluster.assignment_list().await;
        list.iter()
            .all(|o| o.state() == AssignedIdentityState::Assigned)
            .then_some(())
    })
    .await;
    let client = cluster.client.clone();
    let applied = || async {
        Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), "default")
            .list(&Default::default())
            .await
            .expect("list events")
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("binding applied"))
            .collect::<Vec<_>>()
    };
    wait_for("a binding applied event", || async {
        (!applied().await.is_empty()).then_some(())
    })
    .await;
    // Stopping waits for the pass in flight: every event mic meant to publish is out.
    cluster.stop_loop().await;
    let events = applied().await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        events[0].note.as_deref(),
        Some(
            "Binding kv-binding applied on vmss pool for 8 pods: default/web-e0, default/web-e1, default/web-e2, default/web-e3, default/web-e4 and 3 more"
        )
    );
    let regarding = events[0].regarding.as_ref().expect("regarding");
    assert_eq!(regarding.kind.as_deref(), Some("AzureIdentity"));
    assert_eq!(regarding.name.as_deref(), Some("kv-id"));
}

/// A pod whose identity an `Assigned` assignment already keeps on its scale set gets its
/// assignment in one write, created `Assigned`: no ARM call, no status patch (main created it
/// `Created` and patched it), and its `binding applied` event names only the new pod.
#[tokio::test]
async fn a_pod_joining_an_identity_already_on_its_scale_set_is_created_assigned() {
    let (mut cluster, recorder) = start(false, HOUR).await;
    cluster.add_pod("web-1", "n1", "kv").await;
    cluster
        .wait_state("web-1-default-kv-id", AssignedIdentityState::Assigned)
        .await;
    let calls = recorder.calls().len();
    assert_eq!(calls, 1, "{:?}", recorder.calls());
    // web-1's event goes out after its status patch: wait for it before counting.
    cluster.event("binding applied", "kv-id").await;
    let faults = cluster.server.faults();
    faults.clear_log();
    cluster.add_pod("web-2", "n1", "kv").await;
    cluster
        .wait_state("web-2-default-kv-id", AssignedIdentityState::Assigned)
        .await;
    // One event write for web-2: a new `binding applied` event, or (kube's event series: same
    // reason on the same AzureIdentity) a patch of web-1's counting a repeat.
    let event_writes = || faults.count("create", "events") + faults.count("patch", "events");
    wait_for("web-2's binding applied event", || async {
        (event_writes() > 0).then_some(())
    })
    .await;
    // Stopping waits for the pass in flight: every request mic meant to send is in the log.
    cluster.stop_loop().await;
    assert_eq!(recorder.calls().len(), calls, "no ARM call for web-2");
    assert_eq!(faults.count("create", "azureassignedidentities"), 1);
    assert_eq!(
        faults.count("patch", "azureassignedidentities"),
        0,
        "created in its final state, not patched"
    );
    assert_eq!(event_writes(), 1, "one binding applied event write");
    let applied = cluster.event("binding applied", "kv-id").await;
    assert_eq!(
        applied.series.map(|s| s.count),
        Some(2),
        "web-1's event counts web-2's"
    );
}

#[tokio::test]
async fn periodic_reconcile_hands_required_ids_again_without_events() {
    let (cluster, recorder) = start(false, Duration::from_millis(300)).await;
    cluster.add_pod("web-3", "n1", "kv").await;
    cluster
        .wait_state("web-3-default-kv-id", AssignedIdentityState::Assigned)
        .await;
    let after_assignment = recorder.calls().len();
    let id = RID.to_ascii_lowercase();
    let calls = wait_for("two reconcile calls", || async {
        let calls = recorder.calls();
        (calls.len() >= after_assignment + 2).then_some(calls)
    })
    .await;
    for (target, required, release) in &calls[after_assignment..] {
        assert_eq!(target, &ArmTarget::Vmss("pool".to_owned()));
        assert_eq!(required, &BTreeSet::from([id.clone()]));
        assert!(release.is_empty());
    }
    cluster.stop().await;
}

fn config_for(kubeconfig: &std::path::Path) -> podid_mic::config::Config {
    common::mic_config(
        kubeconfig,
        &[
            "--leader-election-instance=mic-serve",
            "--leader-election-duration=1s",
        ],
    )
}

#[tokio::test]
async fn serve_leads_assigns_and_hands_the_lease_back() {
    let server = FakeApiServer::start().await.expect("server");
    let path = common::kubeconfig(&server);
    let client = kube_client(Some(&path)).await.expect("client");
    seed(&client).await;
    Api::<Pod>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &pod("web-9", "n1"))
        .await
        .expect("pod");
    let config = config_for(&path);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let health = Arc::new(Health::default());
    assert!(!health.is_active());
    let task = tokio::spawn({
        let health = health.clone();
        async move {
            let assigner: Arc<dyn IdentityAssigner> = Arc::new(Recorder::default());
            serve(&config, &Default::default(), assigner, health, async {
                let _ = stopped.await;
            })
            .await
        }
    });
    let assigned: Api<AzureAssignedIdentity> = Api::namespaced(client.clone(), "default");
    wait_for("web-9-default-kv-id Assigned", || async {
        assigned
            .get_opt("web-9-default-kv-id")
            .await
            .expect("get")
            .filter(|o| o.state() == AssignedIdentityState::Assigned)
    })
    .await;
    assert_eq!(lease_holder(&client).await.as_deref(), Some("mic-serve"));
    assert!(
        health.is_active(),
        "the leader's loop runs: /healthz says Active"
    );
    let _ = stop.send(());
    tokio::time::timeout(WAIT, task)
        .await
        .expect("stops in time")
        .expect("no panic")
        .expect("clean stop");
    assert!(!health.is_active(), "stopped: /healthz says Not Active");
    assert_eq!(lease_holder(&client).await, None, "lease released");
}

/// Another replica writes itself into the lease (again when a renewal came in between, 409).
async fn take_lease(client: &kube::Client) {
    let leases =
        Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), "default");
    wait_for("the lease taken over", || async {
        let mut lease = leases.get("aad-pod-identity-mic").await.expect("lease");
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = Some("mic-other".to_owned());
            spec.lease_duration_seconds = Some(3600);
        }
        match leases
            .replace("aad-pod-identity-mic", &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Some(()),
            Err(kube::Error::Api(status)) if status.code == 409 => None,
            Err(e) => panic!("taking the lease over: {e}"),
        }
    })
    .await;
}

#[tokio::test]
async fn serve_stops_with_lost_lease_when_another_replica_took_it() {
    let server = FakeApiServer::start().await.expect("server");
    let path = common::kubeconfig(&server);
    let client = kube_client(Some(&path)).await.expect("client");
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
    wait_for("mic-serve leads", || async {
        (lease_holder(&client).await.as_deref() == Some("mic-serve")).then_some(())
    })
    .await;
    take_lease(&client).await;
    let result = tokio::time::timeout(WAIT, task)
        .await
        .expect("serve ends")
        .expect("no panic");
    assert!(matches!(result, Err(RunError::LostLease)), "{result:?}");
    assert_eq!(lease_holder(&client).await.as_deref(), Some("mic-other"));
}

/// An ARM side whose every call hangs (a scale set in a long operation), counting the calls.
#[derive(Default)]
struct Hanging {
    calls: std::sync::atomic::AtomicUsize,
}

impl IdentityAssigner for Hanging {
    fn apply<'a>(
        &'a self,
        _target: &'a ArmTarget,
        _required: &'a BTreeSet<String>,
        _release: &'a BTreeSet<String>,
    ) -> AssignFuture<'a> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(std::future::pending())
    }
}

#[tokio::test]
async fn a_lost_lease_cancels_the_pass_in_flight() {
    let server = FakeApiServer::start().await.expect("server");
    let path = common::kubeconfig(&server);
    let client = kube_client(Some(&path)).await.expect("client");
    seed(&client).await;
    Api::<Pod>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &pod("web-9", "n1"))
        .await
        .expect("pod");
    let config = config_for(&path);
    let arm = Arc::new(Hanging::default());
    let health = Arc::new(Health::default());
    let task = tokio::spawn({
        let (arm, health) = (arm.clone(), health.clone());
        async move {
            serve(
                &config,
                &Default::default(),
                arm,
                health,
                std::future::pending(),
            )
            .await
        }
    });
    wait_for("the pass waiting on ARM", || async {
        (arm.calls.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    take_lease(&client).await;
    // Without cancelling, serve would wait for ARM for ever (and then write `Assigned`).
    let result = tokio::time::timeout(WAIT, task)
        .await
        .expect("serve ends while ARM still hangs")
        .expect("no panic");
    assert!(matches!(result, Err(RunError::LostLease)), "{result:?}");
    assert!(!health.is_active(), "/healthz says Not Active");
    let assigned: Api<AzureAssignedIdentity> = Api::namespaced(client.clone(), "default");
    let object = assigned
        .get("web-9-default-kv-id")
        .await
        .expect("the assignment stays for the next leader");
    assert_eq!(object.state(), AssignedIdentityState::Created);
    assert_eq!(arm.calls.load(Ordering::SeqCst), 1);
}
