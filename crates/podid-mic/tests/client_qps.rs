//! `--clientQps` against the fake API server: the whole controller ([`serve`]) at 2 requests per
//! second sends no more than the token bucket allows, while its Lease keeps being renewed at
//! its own pace and its watches open at once (leader-lock requests — the Lease and upstream's
//! Endpoints lock — and watches are exempt).

use std::sync::Arc;
use std::time::{Duration, Instant};

use podid_fake_apiserver::FakeApiServer;
use podid_mic::assigner::{IdentityAssigner, NoArm};
use podid_mic::probe::Health;
use podid_mic::serve::serve;
use serde_json::{Value, json};

mod common;

/// Bound on the whole run (generous: the machine is shared).
const WAIT: Duration = Duration::from_secs(90);
const QPS: f64 = 2.0;
const BURST: f64 = 2.0;
const PODS: usize = 12;
/// `--leader-election-duration`: another replica would take the lease after this long
/// without a renewal.
const LEASE: Duration = Duration::from_secs(2);
const RID: &str = "/subscriptions/S/resourcegroups/RG/providers/Microsoft.ManagedIdentity/userAssignedIdentities/kv-id";
const ASSIGNED: &str = "/apis/aadpodidentity.k8s.io/v1/azureassignedidentities";
const LEASE_PATH: &str =
    "/apis/coordination.k8s.io/v1/namespaces/default/leases/aad-pod-identity-mic";

fn create(server: &FakeApiServer, path: &str, object: Value) {
    server
        .create_json(path, object)
        .unwrap_or_else(|e| panic!("creating under {path}: {}", e.message));
}

/// A node of a scale set, one identity, one binding and [`PODS`] pods using it.
fn seed(server: &FakeApiServer) {
    create(
        server,
        "/api/v1/nodes",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
               "spec": {"providerID": "azure:///subscriptions/S/resourceGroups/RG/providers/Microsoft.Compute/virtualMachineScaleSets/pool/virtualMachines/0"}}),
    );
    let crd = "/apis/aadpodidentity.k8s.io/v1/namespaces/default";
    create(
        server,
        &format!("{crd}/azureidentities"),
        serde_json::to_value(podid_api::AzureIdentity::user_assigned(
            "default", "kv-id", RID, "client-1",
        ))
        .expect("identity"),
    );
    create(
        server,
        &format!("{crd}/azureidentitybindings"),
        serde_json::to_value(podid_api::AzureIdentityBinding::for_selector(
            "default",
            "kv-binding",
            "kv-id",
            "kv",
        ))
        .expect("binding"),
    );
    for i in 0..PODS {
        create(
            server,
            "/api/v1/namespaces/default/pods",
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": format!("web-{i}"), "namespace": "default",
                                "labels": {"aadpodidbinding": "kv"}},
                   "spec": {"nodeName": "n1", "containers": []}}),
        );
    }
}

fn assigned(server: &FakeApiServer) -> usize {
    server
        .get_json(&format!(
            "{ASSIGNED}?fieldSelector=status.status%3DAssigned"
        ))
        .expect("list")["items"]
        .as_array()
        .map_or(0, Vec::len)
}

/// The Lease's resourceVersion, if it exists.
fn lease_version(server: &FakeApiServer) -> Option<String> {
    server.get_json(LEASE_PATH).ok().and_then(|lease| {
        lease
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .map(str::to_owned)
    })
}

/// Requests mic sent that the bucket governs (everything but the leader locks and watches),
/// and the watches.
fn requests(server: &FakeApiServer) -> (usize, usize) {
    let records = server.faults().requests();
    let watches = records.iter().filter(|r| r.verb == "watch").count();
    let throttled = records
        .iter()
        .filter(|r| {
            r.verb != "watch"
                && !r.path.starts_with("/apis/coordination.k8s.io/")
                && !r.path.starts_with("/api/v1/namespaces/default/endpoints")
        })
        .count();
    (throttled, watches)
}

#[tokio::test]
async fn client_qps_bounds_mic_requests_but_not_its_lease_renewals() {
    let server = FakeApiServer::start().await.expect("server");
    let path = common::kubeconfig(&server);
    seed(&server);
    let lease = format!("--leader-election-duration={}s", LEASE.as_secs());
    let qps = format!("--clientQps={QPS}");
    let config = common::mic_config(
        &path,
        &[
            "--leader-election-instance=mic-qps",
            &lease,
            &qps,
            "--enable-type-upgrade=false",
        ],
    );
    assert_eq!(config.client_burst, 2);

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let task = tokio::spawn(async move {
        let assigner: Arc<dyn IdentityAssigner> = Arc::new(NoArm);
        serve(
            &config,
            &Default::default(),
            assigner,
            Arc::new(Health::default()),
            async {
                let _ = stopped.await;
            },
        )
        .await
    });

    // Watch the Lease while the writes trickle out: every change of its resourceVersion is a
    // renewal (or the acquisition).
    let mut renewals: Vec<Instant> = Vec::new();
    let mut last_version = None;
    let converged = loop {
        assert!(!task.is_finished(), "serve stopped early: {:?}", task.await);
        let version = lease_version(&server);
        if version.is_some() && version != last_version {
            renewals.push(Instant::now());
            last_version = version;
        }
        if assigned(&server) == PODS {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < WAIT,
            "timed out waiting for {PODS} Assigned"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (sent, watches) = requests(&server);

    // Each pod costs a create (the first also a status patch), plus the lists and events.
    assert!(
        sent >= PODS + 5,
        "only {sent} requests: the test would not show the limit"
    );
    assert!(watches >= 5, "only {watches} watches");
    // At most `burst` at once, then `qps` per second: `sent` requests need this long.
    let least = Duration::from_secs_f64((sent as f64 - BURST) / QPS);
    assert!(
        converged >= least,
        "{sent} requests went out in {converged:?}; at --clientQps 2 they need at least {least:?}"
    );

    // The Lease was renewed all along, never `LEASE` apart, although the writes queued behind
    // the limit for longer than that.
    assert!(
        renewals.len() >= 3,
        "the lease was renewed only {} times in {converged:?}",
        renewals.len()
    );
    let gaps: Vec<Duration> = renewals.windows(2).map(|w| w[1] - w[0]).collect();
    let longest = gaps.iter().copied().max().unwrap_or_default();
    assert!(
        longest < LEASE,
        "renewals {longest:?} apart (lease {LEASE:?}): the Lease was throttled; gaps {gaps:?}"
    );

    let _ = stop.send(());
    tokio::time::timeout(WAIT, task)
        .await
        .expect("stops in time")
        .expect("no panic")
        .expect("clean stop, the lease never lost");
}
